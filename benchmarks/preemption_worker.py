"""One rank of benchmarks/preemption_compare.py: a tiny GPT-2 under ``transformers.Trainer``, 2 CPU ranks.

    accelerate launch --multi_gpu --num_processes 2 -m benchmarks.preemption_worker \
        --arm jit|ckptbus|both|plain --out DIR --hashes FILE [--max-steps N] [--resume CHECKPOINT]

``jit``: ``TrainingArguments(enable_jit_checkpoint=True)``, transformers'
own SIGTERM checkpoint. ``ckptbus``: the ckptbus callback (SIGTERM: a full
checkpoint at a step every rank agreed on). ``both``: the two together, as a user
may turn them on (ckptbus takes SIGTERM over: tests/test_jit_checkpoint.py). ``plain``: neither (the
reference run, and every resume). The main process appends a digest of
every parameter after each optimizer step to ``--hashes``
(``{"step", "sha256"}``), which is what "bit-exact" is judged by. Exits with
the ckptbus callback's exit code in the ckptbus arm, else 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Sequences of random tokens, the same for a seed."""

    def __init__(self, size: int = 512, length: int = 16, vocab: int = 32, seed: int = 42) -> None:
        self.tokens = torch.randint(vocab, (size, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


class Digests(TrainerCallback):
    """After every optimizer step, the main process records a digest of all parameters."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if not state.is_world_process_zero or model is None:
            return
        digest = hashlib.sha256()
        for _, tensor in sorted(model.state_dict().items()):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": int(state.global_step), "sha256": digest.hexdigest()}) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", choices=["jit", "ckptbus", "both", "plain"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--hashes", required=True)
    parser.add_argument("--max-steps", type=int, default=100000)
    parser.add_argument("--resume")
    args = parser.parse_args()

    callbacks: list[Any] = [Digests(Path(args.hashes))]
    ckpt = None
    if args.arm in ("ckptbus", "both"):
        from ckptbus.plugins.hf_trainer import DynamicCheckpointCallback

        ckpt = DynamicCheckpointCallback()
        callbacks.append(ckpt)
    extra: dict[str, Any] = {"enable_jit_checkpoint": True} if args.arm in ("jit", "both") else {}
    training = TrainingArguments(
        output_dir=args.out,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="constant",  # the same rate at a step whatever max_steps is: runs compare step by step
        seed=42,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        **extra,
    )
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=32, n_positions=16, bos_token_id=31, eos_token_id=31)
    torch.manual_seed(42)
    trainer = Trainer(model=GPT2LMHeadModel(config), args=training, train_dataset=Tokens(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=args.resume)
    return int(ckpt.exit_code) if ckpt is not None else 0


if __name__ == "__main__":
    sys.exit(main())
