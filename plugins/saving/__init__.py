"""How a checkpoint is written: the staged accelerate save, the asynchronous writer, torch.save's CRC32 switch."""
