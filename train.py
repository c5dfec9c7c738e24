"""Reference training script: a tiny GPT-2 with on-demand checkpoints.

    accelerate launch --multi_gpu --num_processes 2 train.py --config configs/tiny.yaml
    python train.py --config configs/tiny.yaml

The model is built from a config (no download) and the data is made here
from the seed: sequences drawn from a fixed random Markov chain, so the loss
falls from ln(vocab_size) toward the chain's entropy and every run with the
same seed sees the same data.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Imported first: it notes this process's parent, its launcher, before anything slow runs (see docs/schedulers.md).
from ckptbus.plugins.integrations.startup_checks import (
    check_resume_target,
    exit_if_launcher_gone,
    is_local_main,
    refuse,
)

from ckptbus import CheckpointConfig, CkptbusError, ConfigError, RankFailure, SetupError, load_config
from ckptbus._names import METRICS_NAME

# torch, transformers and accelerate take seconds to import. Each function that needs them imports them, and
# main() calls none before the config is loaded and checked: a typo in the config is reported at once.
if TYPE_CHECKING:
    from accelerate import Accelerator
    from ckptbus.plugins import DynamicCheckpoint
    from torch.utils.data import TensorDataset
    from transformers import GPT2LMHeadModel

logger = logging.getLogger("train")


@dataclasses.dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The ``model`` block: GPT-2 sizes."""

    n_layer: int = 2
    """Transformer blocks."""
    n_head: int = 2
    """Attention heads (must divide n_embd)."""
    n_embd: int = 64
    """Hidden size."""
    vocab_size: int = 64
    """Tokens in the synthetic language."""

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "n_embd", "vocab_size"):
            value = getattr(self, key)
            if value < 1:
                raise ConfigError(f"config key 'model.{key}': got {value!r}, expected a whole number >= 1")
        if self.n_embd % self.n_head:
            raise ConfigError(f"config key 'model.n_head': {self.n_head} does not divide model.n_embd={self.n_embd}")


@dataclasses.dataclass(kw_only=True, slots=True)
class TrainConfig:
    """The training keys of the YAML file (beside ckptbus's own keys)."""

    max_steps: int = 200
    """Optimizer steps to train for."""
    seed: int = 42
    """Seeds the data, the model initialisation and every RNG."""
    learning_rate: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Linear warm-up steps, then linear decay to 0 at max_steps."""
    micro_batch_size: int = 8
    """Sequences per rank per forward pass."""
    gradient_accumulation_steps: int = 1
    """Forward passes per optimizer step."""
    sequence_len: int = 32
    """Tokens per sequence."""
    dataset_size: int = 1024
    """Sequences in the synthetic data set."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """GPT-2 sizes."""
    save_on_each_node: bool = False
    """Multi-node runs where output_dir is NOT shared between nodes: every node writes (and commits) its own
    copy of each checkpoint (accelerate's ProjectConfiguration.save_on_each_node). See docs/multinode.md."""

    def __post_init__(self) -> None:
        for key in ("max_steps", "micro_batch_size", "gradient_accumulation_steps", "sequence_len", "dataset_size"):
            value = getattr(self, key)
            if value < 1:
                raise ConfigError(f"config key '{key}': got {value!r}, expected a whole number >= 1")
        for key, ok, allowed in (
            ("warmup_steps", self.warmup_steps >= 0, "a whole number >= 0"),
            ("learning_rate", self.learning_rate > 0, "a number > 0"),
            ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
        ):
            if not ok:
                raise ConfigError(f"config key '{key}': got {getattr(self, key)!r}, expected {allowed}")


def make_data(cfg: TrainConfig) -> TensorDataset:
    """Sequences from a random Markov chain with a few likely successors per token."""
    import torch
    from torch.utils.data import TensorDataset

    gen = torch.Generator().manual_seed(cfg.seed)
    vocab = cfg.model.vocab_size
    logits = torch.randn(vocab, vocab, generator=gen) * 3.0
    probs = torch.softmax(logits, dim=-1)
    tokens = torch.empty(cfg.dataset_size, cfg.sequence_len, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab, (cfg.dataset_size,), generator=gen)
    for t in range(1, cfg.sequence_len):
        tokens[:, t] = torch.multinomial(probs[tokens[:, t - 1]], 1, generator=gen).squeeze(1)
    return TensorDataset(tokens)


def make_model(cfg: TrainConfig) -> GPT2LMHeadModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=cfg.model.vocab_size,
        n_positions=cfg.sequence_len,
        n_embd=cfg.model.n_embd,
        n_layer=cfg.model.n_layer,
        n_head=cfg.model.n_head,
        # GPT-2's default special tokens (50256) lie outside the small vocabulary.
        bos_token_id=cfg.model.vocab_size - 1,
        eos_token_id=cfg.model.vocab_size - 1,
    )
    return GPT2LMHeadModel(config)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--max-steps", type=int, help="override max_steps")
    parser.add_argument("--resume-from-checkpoint", help="override resume_from_checkpoint: a path or 'latest'")
    parser.add_argument(
        "--show-commands",
        action="store_true",
        help="once the run is ready, print the commands that ask it for a checkpoint from another terminal",
    )
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> tuple[CheckpointConfig, TrainConfig]:
    """The checked config with the command line's overrides. A bad key or value exits with status 2 (as a bad
    command line does) and one line that names it."""
    try:
        ckpt_cfg, train_cfg = load_config(args.config, TrainConfig)
        if args.output_dir:
            ckpt_cfg = dataclasses.replace(ckpt_cfg, output_dir=args.output_dir)
        if args.resume_from_checkpoint:
            ckpt_cfg = dataclasses.replace(ckpt_cfg, resume_from_checkpoint=args.resume_from_checkpoint)
        if args.max_steps is not None:
            train_cfg = dataclasses.replace(train_cfg, max_steps=args.max_steps)
    except ConfigError as exc:
        refuse("train.py", exc)  # once per machine, not once per rank
    return ckpt_cfg, train_cfg


def has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def check_engine(accelerator: Any) -> None:
    """Refuse a run that ``accelerate launch`` asked to shard with DeepSpeed or FSDP but that runs without it.

    accelerate takes DeepSpeed and FSDP only on GPUs (or other accelerators): on a machine without one it
    trains plain data-parallel, without a word, and the run would save checkpoints in a layout the user did
    not ask for and could not resume under the engine later.
    """
    from accelerate.utils import DistributedType, parse_flag_from_env

    asked = (("DeepSpeed", "--use_deepspeed", DistributedType.DEEPSPEED), ("FSDP", "--use_fsdp", DistributedType.FSDP))
    for name, flag, kind in asked:
        if parse_flag_from_env(f"ACCELERATE_USE_{kind.value}") and accelerator.distributed_type != kind:
            raise SetupError(
                f"accelerate launch asked for {name} ({flag}, or distributed_type: {kind.value} in its config), "
                f"but this run has no GPU, and accelerate would train plain data-parallel on the CPU instead, "
                f"without {name}. Run it on a machine with GPUs, or launch without {name} "
                "(accelerate launch --multi_gpu --num_processes N train.py ...); see docs/deepspeed-fsdp.md"
            )


def check_writable(output_dir: str) -> None:
    """Refuse, before torch is imported, an ``output_dir`` this process cannot write: ckptbus's lock, checkpoints
    and event log and this script's metrics all go there, and the run would otherwise train up to its first
    write. Raises :class:`~ckptbus.SetupError` naming the directory (exit status 2). Creates ``output_dir`` (as
    the run would) but writes nothing in it: every rank checks, and only the main process writes metrics."""
    what = "the output directory"
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        raise SetupError(
            f"output_dir {os.path.abspath(output_dir)} is a file, not a directory: the run writes its checkpoints, "
            f"lock, event log and {METRICS_NAME} in a directory there. Give another output_dir (--output-dir DIR, "
            "or output_dir in the config), or move the file away"
        )
    try:
        os.makedirs(output_dir, exist_ok=True)
        if not os.access(output_dir, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), output_dir)
        metrics = os.path.join(output_dir, METRICS_NAME)
        if os.path.lexists(metrics):
            what = METRICS_NAME
            os.close(os.open(metrics, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC))
    except OSError as exc:
        raise _not_writable(output_dir, what, exc) from None


def _not_writable(output_dir: str, what: str, exc: OSError) -> SetupError:
    return SetupError(
        f"output_dir {os.path.abspath(output_dir)} is not writable by this run ({what}: {exc.strerror}): the run "
        f"writes its checkpoints, lock, event log and {METRICS_NAME} there. Make it writable, or give another "
        "output_dir (--output-dir DIR, or output_dir in the config)"
    )


def try_commands(ckpt_cfg: CheckpointConfig) -> str:
    """The commands that ask this run for a checkpoint, with absolute paths: they work from any directory."""
    out = os.path.abspath(ckpt_cfg.output_dir)
    dyn = ckpt_cfg.dynamic_checkpoint
    beside = Path(sys.executable).with_name("ckptbus")  # the CLI of this virtualenv, also when it is not on PATH
    cli = shlex.quote(str(beside)) if beside.exists() else "ckptbus"
    commands = []
    if dyn.enabled:
        trigger = os.path.join(out, dyn.trigger_file_path)  # an absolute trigger_file_path stays itself
        commands.append((f"touch {shlex.quote(trigger)}", f"a full checkpoint within {dyn.check_interval} steps"))
        if dyn.socket.enabled:
            commands.append((f"{cli} request --output-dir {shlex.quote(out)}", "waits, prints the checkpoint's path"))
    commands.append((f"{cli} list --output-dir {shlex.quote(out)}", "the complete checkpoints on disk"))
    width = max(len(command) for command, _ in commands)
    lines = [f"  {command.ljust(width)}  # {what}" for command, what in commands]
    return "\n".join(["From another terminal, try:", *lines, "Ctrl+C here stops every rank at the same step."])


def train(ckpt_cfg: CheckpointConfig, cfg: TrainConfig, *, show_commands: bool = False) -> int:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from ckptbus.plugins import DynamicCheckpoint, release
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    exit_if_launcher_gone()  # again, after the seconds torch took: an orphan must not join a process group
    # Without cpu=True, `accelerate launch --multi_gpu` on a machine with no GPU
    # gives every rank an Accelerator that believes it is alone.
    accelerator = Accelerator(
        cpu=not has_accelerator(),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        # The LR schedule counts optimizer steps: run_loop steps it once per optimizer step. Linked to the
        # optimizer (the default), a prepared scheduler steps once per process at each call, so on 2 ranks the
        # warm-up would end at warmup_steps / 2 and the LR reach 0 at max_steps / 2. A schedule built for
        # max_steps * num_processes would fix the rate but not its saved state, which would then mean another
        # step under another number of ranks; counted in optimizer steps, a run may resume on any number.
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        project_config=ProjectConfiguration(save_on_each_node=cfg.save_on_each_node),
    )
    check_engine(accelerator)
    set_seed(cfg.seed)
    model = make_model(cfg)
    # The loader gets a generator of its own: without one, every iter() of a torch DataLoader draws its
    # base seed from the global torch RNG, the one dropout uses. A resume mid-epoch starts a new iter()
    # where the uninterrupted run did not, so dropout masks (and losses) would drift after resuming.
    loader = DataLoader(
        make_data(cfg),
        batch_size=cfg.micro_batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)  # type: ignore[no-untyped-call]
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    try:
        with DynamicCheckpoint(accelerator, ckpt_cfg) as ckpt:
            step = ckpt.resume()
            if show_commands and accelerator.is_main_process:
                print(try_commands(ckpt_cfg), file=sys.stderr, flush=True)  # the triggers are up by now
            run_loop(accelerator, ckpt, model, optimizer, loader, scheduler, cfg, step)
        code = int(ckpt.exit_code)
        failed = ckpt.failed_save
        if failed is not None and code == 1:
            # Every rank stops at the same step (the failure was agreed); one clear line from the main process.
            if accelerator.is_main_process:
                logger.error(
                    "training stopped at step %d because the checkpoint could not be saved "
                    "(dynamic_checkpoint.on_save_failure: stop): %s",
                    failed.step,
                    failed.error,
                )
        elif code > 128 and accelerator.is_main_process:
            logger.info(
                "stopped by a signal at step %d; exiting with status %d (128 + signal number)", ckpt.last_step, code
            )
        elif code and accelerator.is_main_process:
            logger.info(
                "stopped at step %d before max_steps (the launcher is gone); exiting with status 1", ckpt.last_step
            )
        return code
    finally:
        # Our references to the DDP model go before the process group; release() says why (a hang at exit).
        del model, optimizer, loader, scheduler
        release(accelerator)


def run_loop(
    accelerator: Accelerator,
    ckpt: DynamicCheckpoint,
    model: Any,
    optimizer: Any,
    loader: Any,
    scheduler: Any,
    cfg: TrainConfig,
    step: int,
) -> None:
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    steps_per_epoch = len(loader) // cfg.gradient_accumulation_steps
    if steps_per_epoch < 1:
        raise SystemExit("train.py: dataset_size is too small for one optimizer step; raise dataset_size")
    metrics_path = Path(ckpt.config.output_dir) / METRICS_NAME
    # Log lines go through tqdm while its bar is drawn, so that no line lands in the middle of the bar.
    with logging_redirect_tqdm():
        progress = tqdm(
            total=cfg.max_steps,
            initial=step,
            desc="train",
            disable=not accelerator.is_main_process,
            mininterval=0.1 if sys.stderr.isatty() else 5.0,  # a log file gets a line every few seconds, not every step
        )
        model.train()
        epoch = step // steps_per_epoch
        while step < cfg.max_steps:
            loader.set_epoch(epoch)
            # Resuming mid-epoch: skip the batches of this epoch that were already trained on.
            done_in_epoch = (step - epoch * steps_per_epoch) * cfg.gradient_accumulation_steps
            batches = accelerator.skip_first_batches(loader, done_in_epoch) if done_in_epoch else loader
            for (input_ids,) in batches:
                with accelerator.accumulate(model):
                    loss = model(input_ids=input_ids, labels=input_ids).loss
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                step += 1
                lr = scheduler.get_last_lr()[0]  # the rate this step trained with
                # Once per optimizer step, before ckpt.step() (a checkpoint holds the next step's rate); not after a
                # step that fp16's loss scaler skipped, as accelerate's own stepping does.
                if not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                mean_loss = accelerator.reduce(loss.detach(), "mean").item()
                if accelerator.is_main_process:
                    record = {"step": step, "loss": mean_loss, "lr": lr, "time": time.time()}
                    try:
                        with open(metrics_path, "a", encoding="utf-8") as fh:
                            fh.write(json.dumps(record) + "\n")
                    except OSError as exc:  # made read-only (or full) since the start: one line, not a traceback
                        raise _not_writable(ckpt.config.output_dir, METRICS_NAME, exc) from None
                    _draw(progress, mean_loss)
                if ckpt.step(step) or step >= cfg.max_steps:
                    break
            else:
                epoch += 1
                continue
            break
        with contextlib.suppress(OSError):  # (see _draw)
            progress.close()
    if accelerator.is_main_process:
        logger.info("training ended at step %d (max_steps %d)", step, cfg.max_steps)


def _draw(progress: Any, loss: float) -> None:
    """Advance the progress bar; a terminal or pipe that went away (a dead launcher, a ``| tee`` that ended first)
    turns the bar off instead of ending the run before ckptbus can save."""
    try:
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.3f}", refresh=False)
    except OSError:
        progress.disable = True


def main(argv: list[str] | None = None) -> int:
    exit_if_launcher_gone()  # started by a launcher that is gone already: save nothing, say so, exit
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    # accelerate logs every file it writes at INFO, and warns on every save that
    # GPT-2's tied lm_head is stored once (expected, and restored on load).
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    args = parse_args(argv)
    ckpt_cfg, cfg = load(args)
    # Start-up mistakes before torch and the model: one line per machine, exit 2, nothing written.
    try:
        check_resume_target(ckpt_cfg)
        check_writable(ckpt_cfg.output_dir)
    except CkptbusError as exc:
        if is_local_main():
            logger.error("%s", exc)
        return 2
    try:
        code = train(ckpt_cfg, cfg, show_commands=args.show_commands)
    except RankFailure:
        return 1  # another rank failed; ckptbus logged what was saved (docs/crash.md)
    except CkptbusError as exc:
        logger.error("%s", exc)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
