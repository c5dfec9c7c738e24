"""A weights save does not import DeepSpeed in a run that does not use it (accelerate's save_model would).

Run in a fresh interpreter: whether DeepSpeed is imported is a property of
the process. The figures (the first weights save with and without the
import) are printed with ``pytest -s``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest
from runs import REPO

SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile, time
    from pathlib import Path
    from accelerate import Accelerator
    from accelerate.utils import other
    from transformers import GPT2Config, GPT2LMHeadModel
    from ckptbus.plugins.saving.weights import save_weights

    accelerator = Accelerator(cpu=True)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=32, n_positions=16)
    model = accelerator.prepare(GPT2LMHeadModel(config))
    before = other.is_deepspeed_available
    out = Path(tempfile.mkdtemp())
    started = time.perf_counter()
    save_weights(accelerator, model, out / "ckptbus", is_committer=True)
    ckptbus_first = time.perf_counter() - started
    imported_by_ckptbus = "deepspeed" in sys.modules
    restored = other.is_deepspeed_available is before
    loaded = GPT2LMHeadModel.from_pretrained(out / "ckptbus").num_parameters() == model.num_parameters()
    started = time.perf_counter()
    accelerator.save_model(model, str(out / "accelerate"), safe_serialization=True)  # accelerate's own first call
    accelerate_first = time.perf_counter() - started
    print(json.dumps({"imported_by_ckptbus": imported_by_ckptbus, "restored": restored, "loaded": loaded,
                      "ckptbus_first": ckptbus_first, "accelerate_first": accelerate_first,
                      "imported_by_accelerate": "deepspeed" in sys.modules}))
    """
)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_the_first_weights_save_does_not_import_deepspeed() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert not result["imported_by_ckptbus"], "the weights save imported DeepSpeed"
    assert result["restored"] and result["loaded"]
    assert result["imported_by_accelerate"], "accelerate's save_model no longer imports DeepSpeed: drop the guard"
    assert (
        "Setting accelerator to CPU" not in proc.stderr.split("accelerate_first")[0] or result["imported_by_accelerate"]
    )
    print(
        f"\nfirst weights save: {result['ckptbus_first']:.2f} s through ckptbus (no DeepSpeed import), "
        f"{result['accelerate_first']:.2f} s through accelerate's save_model (imports DeepSpeed)"
    )
