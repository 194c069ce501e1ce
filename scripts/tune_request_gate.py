"""Choose the request gate's threshold on the dev split, and report it on the held-out sets.

The gate (ptalign.request_harm) drops a generated question the model judges harmless before a
refusal is written for it. Its threshold is chosen here on data/dev_*.jsonl only: the one with
the best balanced accuracy (the mean of the harmful prompts kept and the benign ones dropped;
the lower threshold on a tie, since every harmful question dropped is a lost record). The same
threshold is then reported on data/eval_*.jsonl, which never tune anything.

    python scripts/tune_request_gate.py                  # markdown tables on stdout
    python scripts/tune_request_gate.py --dtype float32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ptalign  # noqa: E402
from data import DATA_DIR  # noqa: E402
from data.prompt_sets import load_prompts  # noqa: E402
from generate import load  # noqa: E402

THRESHOLDS = tuple(round(0.3 + 0.05 * i, 2) for i in range(13))  # 0.30 .. 0.90


def scores(model, tok, seeds, split: str, batch_size: int) -> tuple[list[float], list[bool]]:
    """Gate scores of a split's harmful and benign prompts, and which are harmful."""
    harmful = [r["prompt"] for r in load_prompts(DATA_DIR / f"{split}_harmful.jsonl")]
    benign = [r["prompt"] for r in load_prompts(DATA_DIR / f"{split}_benign.jsonl")]
    s = ptalign.request_harm(model, tok, seeds, harmful + benign, batch_size)
    return s, [True] * len(harmful) + [False] * len(benign)


def auc(s: list[float], y: list[bool]) -> float:
    """Probability that a harmful prompt scores above a benign one (ties count half)."""
    pos = [a for a, b in zip(s, y) if b]
    neg = [a for a, b in zip(s, y) if not b]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def rates(s: list[float], y: list[bool], t: float) -> tuple[float, float]:
    """(harmful kept, benign dropped) at threshold t."""
    kept = sum(x >= t for x, b in zip(s, y) if b) / sum(y)
    dropped = sum(x < t for x, b in zip(s, y) if not b) / (len(y) - sum(y))
    return kept, dropped


def table(name: str, s, y, thresholds) -> str:
    lines = [f"{name}: AUC {auc(s, y):.3f}", "", "| threshold | harmful kept | benign dropped | balanced accuracy |"]
    lines.append("| ---: | ---: | ---: | ---: |")
    for t in thresholds:
        kept, dropped = rates(s, y, t)
        lines.append(f"| {t:.2f} | {kept:.2f} | {dropped:.2f} | {(kept + dropped) / 2:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="weights dtype")
    p.add_argument("--batch-size", type=int, default=16, help="prompts scored together")
    args = p.parse_args()
    model, tok = load(args.model, "cpu", args.dtype)
    seeds = ptalign.load_seeds()
    t0 = time.perf_counter()
    dev_s, dev_y = scores(model, tok, seeds, "dev", args.batch_size)
    best = max(THRESHOLDS, key=lambda t: (round(sum(rates(dev_s, dev_y, t)), 9), -t))
    print(table("dev split (chooses)", dev_s, dev_y, THRESHOLDS))
    print(f"\nchosen on dev: threshold {best} (best balanced accuracy)\n")
    eval_s, eval_y = scores(model, tok, seeds, "eval", args.batch_size)
    print(table("held-out eval sets (report only)", eval_s, eval_y, (best,)))
    print(f"\n[{time.perf_counter() - t0:.0f} s, {args.dtype}]", file=sys.stderr)


if __name__ == "__main__":
    main()
