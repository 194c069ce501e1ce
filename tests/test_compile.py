"""
The fused loss's kernels compile for the GPUs they are written for, without one: every launch
configuration the launchers can choose, for sm_80 and sm_90, by Triton's own compiler and
ptxas, specialised with the divisibility hints a launch passes (kernels/compile_check.py).

conftest.py sets TRITON_INTERPRET=1, under which @triton.jit functions are interpreted and
cannot be compiled, so the check runs in a subprocess without it. The first run compiles about
220 kernels (a few minutes on two cores); Triton's cache makes later runs fast.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.compile_check import ARCHS, DTYPES, ODD_V
from kernels.pt_loss import LOSS_CONFIGS, ONE_READ_MAX

SHARED_PER_SM = {80: 163 * 1024, 90: 227 * 1024}  # shared memory a block may use, by compute capability

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
            odd = [c for c in found if f"V={ODD_V} " in c]
            assert len(odd) == (0 if one_read else 2), (arch, label)  # odd V, streamed: with and without gradient
        assert sum(c.startswith("grad") for c in cases) == 4  # backward skipping 1s, in place; scalar, per token
        assert sum(c.startswith("scale") for c in cases) == 1  # fused_linear's grad_output


def test_logits_are_read_16_bytes_at_a_time(compiled):
    """ld.global.v4.b32 (8 bf16 / 4 fp32 values), a 16-byte cp.async or wider, in every kernel
    whose rows are 16-byte aligned; an odd V compiles, to narrower loads."""
    narrow = [
        (r["arch"], r["dtype"], r["case"], r["load_bytes"])
        for r in compiled
        if r["load_bytes"] < 16 and f"V={ODD_V} " not in r["case"]
    ]
    assert not narrow


def test_forward_without_gradient_gives_no_cache_hint(compiled):
    """Only a pass that writes the gradient steers L2: evict_first for lines read for the last
    time and, streamed, evict_last for the rows pass 2 reads again. (On sm_80 Triton 3.9 issues
    the prefetched loads as cp.async without the evict_last policy; sm_90 keeps it.)"""
    for r in compiled:
        if r["case"].startswith("loss") and " no-grad " in r["case"]:
            assert r["hints"] == [], r["case"]
        elif r["case"].startswith("loss"):
            assert "L2::evict_first" in r["hints"], (r["arch"], r["case"])
            if "ONE_READ=False" in r["case"] and r["arch"] == "sm_90":
                assert "L2::evict_last" in r["hints"], (r["arch"], r["case"])


def test_streamed_pass_prefetches_within_shared_memory(compiled):
    """The streamed loops are software-pipelined (shared memory holds the blocks in flight) where
    rows are aligned, and PER_SM programs fit in an SM's shared memory together."""
    for r in compiled:
        if "STAGES=" not in r["case"] or "ONE_READ=True" in r["case"]:
            continue
        per_sm = int(r["case"].split("PER_SM=")[1].split()[0]) or 1
        assert r["shared_bytes"] * per_sm <= SHARED_PER_SM[int(r["arch"][3:])], (r["arch"], r["case"])
        if f"V={ODD_V} " not in r["case"]:
            assert r["shared_bytes"] > 0, (r["arch"], r["dtype"], r["case"])


def test_nothing_spills(compiled):
    """No kernel spills registers: the one-read path really holds its row on chip."""
    spilled = [(r["arch"], r["dtype"], r["case"], r["spill_bytes"]) for r in compiled if r["spill_bytes"]]
    assert not spilled
