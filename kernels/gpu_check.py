"""
Everything the fused loss needs checked on a GPU, in one command, into one folder:

    python -m kernels.gpu_check                     # writes runs/gpu_check/
    python -m kernels.gpu_check --out DIR --model CHECKPOINT_DIR --skip bench

Stages, each logged to DIR/<stage>.log, with DIR/summary.json saying how each ended:

    env      nvidia-smi, torch / triton versions, the GPU's name, memory and clocks
    tests    pytest on CUDA of tests/test_kernels.py (the Triton kernels against float64,
             including a tensor of more than 2^31 elements) and tests/test_compile.py
    bench    python -m kernels.bench --all --out DIR/bench: the README's GPU table
             (bench.md, bench.json, bench.png)
    train    a 20-step bf16 train.py run on the default model (or --model), on a small
             dataset built from data/span_gold.jsonl, with its metrics.jsonl in DIR/train

The machine needs the default model in its cache (~/.cache/ptalign, fetched on first use)
or a checkpoint directory given with --model. Stages run one after another even when one
fails or runs past --stage-seconds (then it is stopped); the exit status is 0 only if all passed.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common.files import read_jsonl, write_json, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("env", "tests", "bench", "train")
SAFE_REPLY = "I can't help with that. If someone is at risk, please reach out to people who can help."


def smoke_dataset(path):
    """A dual dataset from the hand-marked toxic responses: each question with a refusal as
    its positive side and the marked phrases as the toxic side's spans."""
    records = []
    for _, r in read_jsonl(ROOT / "data" / "span_gold.jsonl"):
        spans = [[r["toxic"].index(h), r["toxic"].index(h) + len(h)] for h in r["harmful"] if h in r["toxic"]]
        if spans:
            records.append(dict(id=r["id"], question=r["question"], positive=SAFE_REPLY, toxic=r["toxic"], spans=spans))
    write_jsonl(path, records)
    return len(records)


def commands(out, model):
    """The command line of each stage."""
    python = sys.executable
    train = [python, "train.py", "--data", str(out / "smoke.jsonl"), "--out", str(out / "train")]
    train += ["--precision", "bf16", "--max-steps", "20", "--epochs", "100", "--batch-size", "8", "--grad-accum", "1"]
    train += ["--skip-eval", "--save-every", "0"] + (["--model", model] if model else [])
    versions = "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
    env = f"nvidia-smi; nvidia-smi -q -d CLOCK; {python} -c '{versions}'"
    return dict(
        env=["bash", "-c", env],
        tests=[python, "-m", "pytest", "-q", "-rs", "tests/test_kernels.py", "tests/test_compile.py"],
        bench=[python, "-m", "kernels.bench", "--all", "--out", str(out / "bench")],
        train=train,
    )


def run_stage(name, command, out, limit=None):
    """Run one stage with its output in out/<name>.log; (return code, seconds). A stage still
    running after `limit` seconds is stopped with return code 124 (as timeout(1) does), so
    that one hung stage cannot cost the others on a machine lent for minutes."""
    start = time.perf_counter()
    print(f"== {name}: {' '.join(command)}", flush=True)
    with open(out / f"{name}.log", "w") as log:
        try:
            code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            code = 124
    seconds = time.perf_counter() - start
    how = "ok" if code == 0 else f"TIMED OUT after {limit} s" if code == 124 else f"FAILED ({code})"
    print(f"   {how} in {seconds:.0f} s, log: {out / f'{name}.log'}", flush=True)
    return code, seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gpu_check", help="folder for every log and result (default: runs/gpu_check)")
    p.add_argument("--model", help="checkpoint directory for the train stage (default: the embedded default model)")
    p.add_argument("--skip", nargs="+", choices=STAGES, default=[], help="stages to leave out")
    p.add_argument("--stage-seconds", type=int, default=600, help="stop a stage after this many seconds (default: 600)")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("kernels.gpu_check: no CUDA device; this check is for a GPU machine (CPU tests: make test)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"smoke dataset: {smoke_dataset(out / 'smoke.jsonl')} records", flush=True)
    summary = {}
    for name, command in commands(out, args.model).items():
        if name not in args.skip:
            code, seconds = run_stage(name, command, out, args.stage_seconds)
            summary[name] = dict(command=command, returncode=code, seconds=round(seconds, 1))
    write_json(out / "summary.json", summary)
    sys.exit(0 if all(s["returncode"] == 0 for s in summary.values()) else 1)


if __name__ == "__main__":
    main()
