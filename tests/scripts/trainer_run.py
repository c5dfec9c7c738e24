"""A real ``transformers.Trainer`` run with the ckptbus callback, configured by an axolotl-style YAML file.

    accelerate launch --multi_gpu --num_processes 2 trainer_run.py CONFIG.yaml [--resume latest|PATH] [--no-cpu]
        [--every SECONDS]

Started by tests/test_hf_trainer.py. The YAML file is an axolotl config: its
``dynamic_checkpoint`` block is read by ckptbus and every other key (model,
data, ...) is axolotl's; ``max_steps`` and ``micro_batch_size`` are read here.
The model is a tiny GPT-2 built from a config and the data is made here from
a seed, so nothing is downloaded. The main process appends ``{"step", "loss"}``
to ``<output_dir>/metrics.jsonl`` after every optimizer step, so tests can
wait on progress. The script exits with the callback's exit code (130 after
Ctrl+C). ``--every SECONDS`` adds a trigger source of the user's own
(every_seconds.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from ckptbus.plugins import release
from ckptbus.plugins.hf_trainer import DynamicCheckpointCallback
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

VOCAB = 32
SEQ = 16


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Sequences that count up modulo the vocabulary from a random start: easy to learn, made from a seed."""

    def __init__(self, size: int, seed: int) -> None:
        starts = torch.randint(VOCAB, (size, 1), generator=torch.Generator().manual_seed(seed))
        self.rows = (starts + torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


class Metrics(TrainerCallback):
    """``{"step", "loss"}`` per optimizer step, main process only (``logging_steps=1``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if state.is_world_process_zero and logs and "loss" in logs:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": state.global_step, "loss": logs["loss"]}) + "\n")


def main() -> int:
    config_path = sys.argv[1]
    raw = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    resume = sys.argv[sys.argv.index("--resume") + 1] if "--resume" in sys.argv else None

    sources = []
    if "--every" in sys.argv:
        from every_seconds import EverySeconds

        sources.append(EverySeconds(float(sys.argv[sys.argv.index("--every") + 1])))
    ckpt = DynamicCheckpointCallback.from_yaml(config_path, ignore_unknown=True, sources=sources)  # ckptbus
    args = TrainingArguments(
        output_dir=raw["output_dir"],
        max_steps=int(raw["max_steps"]),
        per_device_train_batch_size=int(raw.get("micro_batch_size", 4)),
        learning_rate=1e-3,
        seed=int(raw.get("seed", 42)),
        use_cpu="--no-cpu" not in sys.argv,  # gloo on a machine without a GPU: see docs/trainer.md
        save_strategy="no",  # only ckptbus asks for checkpoints in these tests
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(4096, seed=args.seed),
        callbacks=[ckpt, Metrics(Path(args.output_dir) / "metrics.jsonl")],  # ckptbus
    )
    trainer.train(resume_from_checkpoint=ckpt.resume_checkpoint(resume))  # ckptbus: complete checkpoints only
    code = ckpt.exit_code  # ckptbus: 128 + signal number after Ctrl+C
    accelerator = trainer.accelerator
    del trainer, model  # before the process group goes: see ckptbus.plugins.release
    release(accelerator)
    return code


if __name__ == "__main__":
    sys.exit(main())
