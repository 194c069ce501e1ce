"""The pipeline's batched generation against plain batch-1 generation, on the pipeline's own prompts.

Not a test (pytest does not collect it): a benchmark that prints a markdown table.

    python scripts/bench_pipeline.py [--model DIR] [--prompts 32] [--batch1-prompts 4]

The prompts are the dual-response prompts of `ptalign.py generate` (system instructions, the
seed exemplars as earlier turns, then a question; the positive side with its forced opening)
for the seed categories' example questions. Both rows sample with the pipeline's settings
(temperature 0.7, top-p 0.9, --max-new-tokens) and count generated tokens over wall time,
prompt prefill included:

- batch 1: `generate_ids` on one prompt at a time, as `python generate.py` runs a prompt;
  only the first --batch1-prompts prompts, since it is the slow row;
- pipeline: `generate.chat` over all --prompts prompts in batches of --batch-size, with the
  shared few-shot prefix prefilled once per batch, as `generate` runs them.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ptalign  # noqa: E402
from data.prompts import POSITIVE_REPLY_START, load_seeds, system_prompts  # noqa: E402
from generate import generate_ids, load  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--prompts", type=int, default=32, help="prompts for the pipeline row (default 32)")
    p.add_argument("--batch1-prompts", type=int, default=4, help="prompts for the batch-1 row (default 4)")
    p.add_argument("--batch-size", type=int, default=32, help="the pipeline's batch size (default 32, as generate)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per reply at most (default 64, as generate)")
    args = p.parse_args()

    model, tok = load(args.model, "cpu", "float32")
    seeds = load_seeds()
    questions = [q for c in seeds.categories for q in c["examples"]]
    questions = (questions * (args.prompts // len(questions) + 1))[: args.prompts]
    system = system_prompts(seeds)["positive"]
    convs = [ptalign.few_shot(system, seeds.exemplars, "positive", q) for q in questions]
    start = POSITIVE_REPLY_START
    gen = ptalign.GenSettings(args.max_new_tokens, batch_size=args.batch_size)

    ids = [
        tok.apply_chat_template(c, add_generation_prompt=True) + tok.encode(start) for c in convs[: args.batch1_prompts]
    ]
    g = torch.Generator().manual_seed(0)
    t0, n1 = time.perf_counter(), 0
    for one in ids:
        n1 += len(
            generate_ids(model, [one], tok.stop_ids, tok.pad_id, gen.max_new_tokens, gen.temperature, gen.top_p, g)[0]
        )
    t1 = time.perf_counter() - t0

    ptalign.chat(model, tok, convs, gen, 0, reply_starts=[start] * len(convs))
    rows = [
        ("batch 1 (generate_ids, one prompt at a time)", len(ids), n1, t1),
        (f"pipeline (generate.chat, batch {args.batch_size})", len(convs), gen.tally.tokens, gen.tally.seconds),
    ]

    print(
        f"model: {model.source_dir}, fp32, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"prompt: {len(ids[0])} tokens, {args.max_new_tokens} new tokens at most, sampled\n"
    )
    print(
        "| generation | prompts | tokens | seconds | tokens/s | speed-up |\n| --- | ---: | ---: | ---: | ---: | ---: |"
    )
    base = n1 / t1
    for name, n_prompts, n, t in rows:
        print(f"| {name} | {n_prompts} | {n} | {t:.1f} | {n / t:.1f} | {n / t / base:.1f}x |")


if __name__ == "__main__":
    main()
