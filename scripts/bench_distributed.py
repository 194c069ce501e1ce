"""Peak memory per process of full fine-tuning: one process against torchrun's two (FSDP2).

    python scripts/bench_distributed.py [--model DIR] [--batch-size 4] [--steps 2]

The same run of train.py both ways (default: the embedded SmolLM2-135M, fp32, AdamW, no
activation checkpointing, no evaluation; the 4 records of tests/test_train.py with each
response said 10 times, so that examples fill the cpu preset's --max-len 256; --batch-size
rows per step in all): `python train.py` with --batch-size, then `torchrun --nproc_per_node 2
train.py` with half of it per process. Each process reports its peak resident set (getrusage
ru_maxrss), which includes what every Python process with torch holds (the last row).

Under torchrun a CPU process fixes glibc's mmap threshold (distributed.return_freed_memory);
one process does not, so the single process also runs with the same threshold set through
the environment (MALLOC_MMAP_THRESHOLD_), for the comparison at equal allocators. Not
collected by pytest (no test_ prefix).
"""

import argparse
import atexit
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def worker(argv: list[str]) -> None:
    """train.main(argv) in this process, its peak RSS printed at exit (on every rank)."""
    sys.path.insert(0, str(ROOT))
    import train

    rank = os.environ.get("RANK", "0")
    atexit.register(lambda: print(f"PEAK {rank} {peak_rss_mb():.0f}", file=sys.__stderr__, flush=True))
    train.main(argv)


def long_records(records: list[dict], times: int = 10) -> list[dict]:
    """The records with each response said `times` times over, spans repeated with it."""
    out = []
    for r in records:
        step = len(r["toxic"]) + 1
        spans = [[s + k * step, e + k * step] for k in range(times) for s, e in r["spans"]]
        out.append(r | {"positive": " ".join([r["positive"]] * times), "toxic": " ".join([r["toxic"]] * times)})
        out[-1]["spans"] = spans
    return out


def run(cmd: list[str], env=None) -> dict[str, float]:
    """Peak RSS (MB) of each process of a command, by rank."""
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    if res.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return {line.split()[1]: float(line.split()[2]) for line in res.stderr.splitlines() if line.startswith("PEAK ")}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per step over all processes (default 4)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps (default 2)")
    p.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # a child's train.py flags
    args = p.parse_args()
    if args.worker is not None:
        return worker(args.worker)
    sys.path.insert(0, str(ROOT / "tests"))
    from test_train import RECORDS

    from data import default_model_path

    model = args.model or str(default_model_path())
    tmp = Path(tempfile.mkdtemp(prefix="bench_distributed-"))
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in long_records(RECORDS)))
    flags = ["--model", model, "--data", str(data), "--skip-eval", "--max-steps", str(args.steps), "--save-every", "0"]
    flags += ["--precision", "fp32", "--no-grad-checkpointing"]
    me = [__file__, "--worker"]
    one_cmd = [sys.executable, *me, *flags, "--out", str(tmp / "one"), "--batch-size", str(args.batch_size)]
    one = run(one_cmd)
    one_fixed = run(one_cmd, env={"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)})
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = run([*launch, *me, *flags, "--out", str(tmp / "two"), "--batch-size", str(args.batch_size // 2)])
    base = run(
        [
            sys.executable,
            "-c",
            "import resource, sys, torch; print('PEAK 0', resource.getrusage(0).ru_maxrss // 1024, file=sys.stderr)",
        ]
    )
    print(f"\n{Path(model).name}, full fine-tuning, fp32, AdamW, {args.batch_size} rows a step, {args.steps} steps\n")
    print("| run | peak RSS per process (MB) | vs one process | vs one process, same threshold |")
    print("| --- | --- | --- | --- |")
    rows = [(f"python train.py --batch-size {args.batch_size}", one["0"])]
    rows += [(f"MALLOC_MMAP_THRESHOLD_=131072 python train.py --batch-size {args.batch_size}", one_fixed["0"])]
    for rank, mb in sorted(two.items()):
        rows += [(f"torchrun --nproc_per_node 2 train.py --batch-size {args.batch_size // 2}: rank {rank}", mb)]
    rows += [("python -c 'import torch' (what any process holds)", base["0"])]
    for label, mb in rows:
        print(f"| {label} | {mb:.0f} | {mb / one['0']:.2f} | {mb / one_fixed['0']:.2f} |")


if __name__ == "__main__":
    main()
