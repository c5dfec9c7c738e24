"""Adapters from a training framework to the runtime: a hand-written accelerate loop, ``transformers.Trainer``."""
