"""On CUDA: the async snapshot (deferred copies on a side stream, optimizer.step held by a pre-hook) writes what
save_state writes at the same step, while training goes on."""

import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from ckptbus.plugins.saving.async_writer import HostSnapshot, WriteJob
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

acc = Accelerator()
assert acc.device.type == "cuda", acc.device
set_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_head=4, n_embd=256, vocab_size=1000, n_positions=64))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
model, opt = acc.prepare(model, opt)


def step():
    ids = torch.randint(0, 1000, (8, 64), device=acc.device)
    acc.backward(model(input_ids=ids, labels=ids).loss)
    opt.step()
    opt.zero_grad()


for _ in range(3):
    step()
tmp = Path(tempfile.mkdtemp())
snaps = HostSnapshot()
for r in range(3):
    step()
    ref, out = tmp / f"ref{r}", tmp / f"out{r}"
    out.mkdir()
    acc.save_state(str(ref))
    job = WriteJob(snaps.take(acc), out)

    def hold(*_, job=job):
        job.wait_copied()

    h = opt.optimizer.register_step_pre_hook(hold)
    job.start()
    for _ in range(3):
        step()  # training goes on at once; the first optimizer.step waits for the copies
    h.remove()
    job.wait()
    assert job.error is None, job.error
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "model differs"
    oa, ob = (
        torch.load(ref / "optimizer.bin", weights_only=False),
        torch.load(out / "optimizer.bin", weights_only=False),
    )
    for k in oa["state"]:
        for n, t in oa["state"][k].items():
            assert torch.equal(t.cpu(), ob["state"][k][n].cpu()), (k, n)
    print(
        "round",
        r,
        "async snapshot == save_state at the same step; deferred tensors:",
        len(job.snapshot.deferred),
        "pinned:",
        all(b.is_pinned() for b, src, _, _ in job.snapshot.deferred if src.is_cuda),
    )
acc.load_state(str(tmp / "out2"))
print("load_state OK")
