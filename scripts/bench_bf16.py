"""bf16 against fp32 for inference on this machine: generation speed and greedy agreement.

The dataset stage and the evaluations generate tens of thousands of tokens; on a CPU with
avx512_bf16 a bf16 copy of the model is faster, but rounds differently. This measures both
sides of that trade on held-out-style prompts (the dev split): tokens/s, how many greedy
replies are identical, how far they agree token by token, and whether the refusal rule
decides the same on both.

    python scripts/bench_bf16.py                  # markdown table on stdout
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from data import DATA_DIR  # noqa: E402
from data.prompt_sets import load_prompts  # noqa: E402
from generate import generate_batched, load  # noqa: E402
from rules import is_refusal  # noqa: E402


def replies(model, tok, prompts, new_tokens: int, batch_size: int) -> tuple[list[list[int]], float]:
    """Greedy replies (token ids) and the seconds they took."""
    ids = [tok.apply_chat_template(p, add_generation_prompt=True) for p in prompts]
    t0 = time.perf_counter()
    out = generate_batched(
        model, ids, tok.stop_ids, tok.pad_id, batch_size=batch_size, max_new_tokens=new_tokens, temperature=0.0
    )
    return out, time.perf_counter() - t0


def shared_prefix(a: list[int], b: list[int]) -> float:
    """Fraction of the fp32 reply that the bf16 reply repeats before they part."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k / max(len(a), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=48, help="greedy tokens per reply (default 48)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts generated together (default 32)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    prompts = [r["prompt"] for f in ("dev_harmful", "dev_benign") for r in load_prompts(DATA_DIR / f"{f}.jsonl")]
    runs = {}
    for dtype in ("float32", "bfloat16"):
        model, tok = load(None, "cpu", dtype)
        replies(model, tok, prompts[:4], 4, 4)  # warm-up
        runs[dtype] = replies(model, tok, prompts, args.new_tokens, args.batch_size)
    (a, ta), (b, tb) = runs["float32"], runs["bfloat16"]
    rate = lambda out, t: sum(map(len, out)) / t
    same_refusal = sum(is_refusal(tok.decode(x)) == is_refusal(tok.decode(y)) for x, y in zip(a, b))
    print(f"{len(prompts)} dev prompts, greedy, {args.new_tokens} new tokens, batch {args.batch_size}\n")
    print("| dtype | tokens/s | identical replies | mean shared prefix | same refusal decision |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| float32 | {rate(a, ta):.1f} | — | — | — |")
    prefix = sum(shared_prefix(x, y) for x, y in zip(a, b)) / len(a)
    same = sum(x == y for x, y in zip(a, b))
    print(f"| bfloat16 | {rate(b, tb):.1f} | {same}/{len(a)} | {prefix:.2f} | {same_refusal}/{len(a)} |")


if __name__ == "__main__":
    main()
