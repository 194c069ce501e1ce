"""Generation throughput: generate.py against transformers' generate, same model, same prompts.

Not a test (pytest does not collect it): a benchmark that prints a markdown table.

    python scripts/bench_generate.py [--model DIR] [--new-tokens 64] [--repeats 3]

Rows: decode tokens/s at batch 1 and batch 8 (greedy, fixed number of new tokens, no early
stop), and prefill tokens/s (one forward pass over a batch of prompts). Each number is the
best of --repeats runs, so a busy machine penalises both sides alike.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate import generate_ids, left_pad, load  # noqa: E402

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how vaccines train the immune system.",
    "What are three tips for learning a new language?",
    "Describe the water cycle to a ten-year-old.",
    "Give me a recipe for a simple tomato soup.",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet in a few sentences.",
    "How do I make my houseplants grow faster?",
]


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def hf_generate(ref, tokens, valid, new_tokens: int, pad_id: int) -> None:
    """transformers' greedy generate, exactly new_tokens per row."""
    with torch.inference_mode():
        ref.generate(
            tokens,
            attention_mask=valid.long(),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per row (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="runs per row; the best is reported (default 3)")
    args = p.parse_args()

    import transformers

    model, tok = load(args.model, "cpu", "float32")
    ref = transformers.AutoModelForCausalLM.from_pretrained(model.source_dir, dtype=torch.float32).eval()
    ids = [tok.apply_chat_template(q) for q in PROMPTS]
    never = [-1]  # no stop id can be produced: every row generates exactly --new-tokens
    rows = []
    for B in (1, 8):
        batch = ids[:B]
        n = B * args.new_tokens
        ours = best_of(lambda b=batch: generate_ids(model, b, never, tok.pad_id, args.new_tokens), args.repeats)
        tokens, valid = left_pad(batch, tok.pad_id, "cpu")
        theirs = best_of(lambda t=tokens, v=valid: hf_generate(ref, t, v, args.new_tokens, tok.pad_id), args.repeats)
        rows.append((f"decode, batch {B}, {args.new_tokens} new tokens", n / ours, n / theirs))
    tokens, valid = left_pad(ids, tok.pad_id, "cpu")
    n = int(valid.sum())
    with torch.inference_mode():
        ours = best_of(lambda: model(tokens, valid), args.repeats)
        theirs = best_of(lambda: ref(tokens, attention_mask=valid.long()), args.repeats)
    rows.append((f"prefill, batch 8 ({n} prompt tokens)", n / ours, n / theirs))

    print(
        f"model: {model.source_dir}, fp32, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}\n"
    )
    print("| tokens/s | generate.py | transformers | ratio |\n| --- | ---: | ---: | ---: |")
    for name, a, b in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
