"""The GPU check on the CPU: `--dry-run` runs every stage end to end at toy sizes (kernels under
the interpreter), so the command cannot rot before a GPU runs it; and its machinery: a stage past
its limit is stopped with everything it started, the summary exists whatever happens, logs
stay under the size the GPU machine sends back."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from data.dataset import load_records
from kernels.gpu_check import MAX_FILE_BYTES, STAGES, cap_file, run_stage, smoke_dataset

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_dataset_is_a_dual_dataset(tmp_path):
    n = smoke_dataset(tmp_path / "smoke.jsonl")
    records = load_records(tmp_path / "smoke.jsonl")
    assert n == len(records) >= 20
    assert all(r["toxic"][s:e] for r in records for s, e in r["spans"])


def test_dry_run_end_to_end(tmp_path):
    """Every stage at toy sizes: all pass, and the folder is what the GPU machine can send back."""
    out = tmp_path / "out"
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, "-m", "kernels.gpu_check", "--out", str(out), "--dry-run", "--scratch", str(tmp_path / "s")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert run.returncode == 0, (summary["stages"], run.stdout[-2000:])
    assert list(summary["stages"]) == [s.name for s in STAGES]
    assert all(s["status"] == "ok" for s in summary["stages"].values())
    assert summary["env"]["versions"]["torch"] and summary["env"]["gpu"] is None
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(p.stat().st_size <= MAX_FILE_BYTES for p in files)
    assert all(len(p.relative_to(out).parts) <= 2 for p in files)
    stages = {name: s["result"] for name, s in summary["stages"].items()}
    ours = [r for r in stages["loss"]["rows"] + stages["linear"]["rows"] if r["method"] in ("ptalign", "fused-linear")]
    assert len(ours) == 3 and all(r["check"].startswith("ok") and r["ms"] > 0 for r in ours)
    assert all("kernel_ms" in r for r in ours if r["method"] == "ptalign")
    assert stages["train"]["steps"] == 3 and stages["train"]["all_finite"]
    assert [r["batch"] for r in stages["generate"]["float32"]] == [1, 32]
    assert all(r["equal"] == r["of"] and r["ours_tokens_per_s"] > 0 for r in stages["generate"]["float32"])
    assert "## generate, float32" in (out / "report.md").read_text()


def test_summary_exists_whatever_happens(tmp_path):
    """The folder and summary.json come first: with no time left for any stage, they still say so."""
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "kernels.gpu_check", "--out", str(out), "--total-seconds", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    summary = json.loads((out / "summary.json").read_text())
    assert {s["status"] for s in summary["stages"].values()} == {"not run: out of time"}


def _state(pid):
    """A process's state letter from /proc (Z: a zombie, as good as gone), None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def test_a_stage_past_its_limit_is_stopped_with_its_process_group(tmp_path):
    """What the stage started (here a grandchild, as pytest or a compile worker would be) is
    stopped with it; a stage that ends on time keeps its return code."""
    pid_file = tmp_path / "grandchild"
    script = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)"
    )
    code, seconds = run_stage("hang", [sys.executable, "-c", script], tmp_path, 3)
    assert code == 124 and seconds < 30
    assert (tmp_path / "hang.log").read_text() == "started\n"
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        if _state(grandchild) in (None, "Z"):
            break
        time.sleep(0.1)
    assert _state(grandchild) in (None, "Z")
    assert run_stage("fine", [sys.executable, "-c", "print('done')"], tmp_path, 30)[0] == 0


def test_logs_are_capped(tmp_path):
    """A log over the limit keeps its first and last halves and says what was cut."""
    log = tmp_path / "big.log"
    log.write_bytes(b"a" * (1 << 20) + b"b" * (1 << 20))
    cap_file(log, limit=1 << 20)
    text = log.read_bytes()
    assert len(text) <= 1 << 20 and text.startswith(b"aaa") and text.endswith(b"bbb") and b"bytes cut" in text
