"""A seeded share of a dual dataset, each kind (red-team, anchor) cut in the same proportion.

For learning curves over the amount of self-generated data: train on a quarter, a half and all
of one dataset's questions (`scripts/curves.py --data` on each) and see whether more would help.

    python scripts/subsample.py runs/e2e/data.jsonl --fraction 0.5 --out runs/half/data.jsonl
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import Parser, number  # noqa: E402
from common.errors import one_line_errors  # noqa: E402
from common.files import write_jsonl  # noqa: E402
from data.dataset import load_records  # noqa: E402


def subsample(records: list[dict], fraction: float, seed: int) -> list[dict]:
    """round(fraction * n) records of each kind (at least one), drawn by `seed`, in file order."""
    keep = set()
    for anchor in (False, True):
        ids = [i for i, r in enumerate(records) if (r.get("kind") == "anchor") == anchor]
        if ids:
            keep |= set(random.Random(seed * 2 + anchor).sample(ids, max(1, round(fraction * len(ids)))))
    return [r for i, r in enumerate(records) if i in keep]


def main(argv=None) -> list[dict]:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="dual dataset JSONL (ptalign.py generate)")
    p.add_argument(
        "--fraction",
        type=number(float, 0, 1, low_open=True),
        required=True,
        help="share of each kind to keep, in (0, 1]",
    )
    p.add_argument("--seed", type=int, default=0, help="which records are drawn")
    p.add_argument("--out", required=True, help="JSONL to write (written to a temporary name, then renamed)")
    args = p.parse_args(argv)
    kept = subsample(load_records(args.data), args.fraction, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out, kept)
    anchors = sum(r.get("kind") == "anchor" for r in kept)
    print(f"{args.out}: {len(kept) - anchors} red-team and {anchors} anchor records")
    return kept


if __name__ == "__main__":
    with one_line_errors(lambda: "nothing was written."):
        main()
