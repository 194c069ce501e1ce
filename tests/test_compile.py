"""
The fused loss's kernels compile for the GPUs they are written for, without one: every launch
configuration the launchers can choose, for sm_80 and sm_90, by Triton's own compiler and
ptxas, specialised with the divisibility hints a launch passes (kernels/compile_check.py).

conftest.py sets TRITON_INTERPRET=1, under which @triton.jit functions are interpreted and
cannot be compiled, so the check runs in a subprocess without it. The first run compiles about
200 kernels (a minute or two on two cores); Triton's cache makes later runs fast.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.compile_check import ARCHS, DTYPES
from kernels.pt_loss import LOSS_CONFIGS, ONE_READ_MAX

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The results of `python -m kernels.compile_check --json`, one dict per compiled kernel."""
    out = tmp_path_factory.mktemp("compile") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "kernels.compile_check", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())["results"]


def test_every_choice_compiles_for_every_arch_and_dtype(compiled):
    seen = {(r["arch"], r["dtype"]) for r in compiled}
    assert seen == {(f"sm_{a}", d) for a in ARCHS for d in DTYPES}
    for arch in ARCHS:
        cases = [r["case"] for r in compiled if r["arch"] == f"sm_{arch}" and r["dtype"] == "bf16"]
        for config in LOSS_CONFIGS:
            width, one_read = config.kwargs["BLOCK_V"], config.kwargs["ONE_READ"]
            expected = not one_read or width <= ONE_READ_MAX[arch]  # wider one-read rows are streamed there
            label = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
            found = [c for c in cases if c.startswith("loss") and c.endswith(label)]
            assert bool(found) == expected, (arch, label)
        assert sum(c.startswith("grad") for c in cases) == 4  # backward skipping 1s, in place; scalar, per token


def test_logits_are_read_16_bytes_at_a_time(compiled):
    """ld.global.v4.b32 (8 bf16 / 4 fp32 values) or wider, in every kernel."""
    narrow = [(r["arch"], r["dtype"], r["case"], r["load_bytes"]) for r in compiled if r["load_bytes"] < 16]
    assert not narrow


def test_nothing_spills(compiled):
    """No kernel spills registers: the one-read path really holds its row on chip."""
    spilled = [(r["arch"], r["dtype"], r["case"], r["spill_bytes"]) for r in compiled if r["spill_bytes"]]
    assert not spilled
