"""Training throughput and peak memory of one step: ours against transformers + F.cross_entropy.

    python scripts/bench_train.py [--batch-size 4] [--seq-len 256] [--steps 3] [--model DIR]

Same model (default: the embedded SmolLM2-135M), same batch, fp32, AdamW, no activation
checkpointing. Three variants, each in a fresh process so that its peak memory is its own:

    ours           model.py + kernels.fused_linear_pt_loss (what train.py runs)
    ours+CE        model.py, full logits, F.cross_entropy        (isolates the loss)
    transformers   LlamaForCausalLM, full logits, F.cross_entropy

Every position is a target in every variant (ours: half MLE, half UT), so all three compute
the same number of loss rows; train.py also skips the prompt rows, which this does not
credit. tokens/s is B*T / mean step time (forward, backward, optimizer) after one warm-up
step; the variants run in turn, --repeats times, and each keeps its fastest run, so that
other work on a shared machine does not land on one variant only. Memory on CPU: the
process's peak resident set (getrusage ru_maxrss), and that peak minus the resident set
after loading the model, which is what training itself adds (activations, logits,
gradients, AdamW state). Not collected by pytest (no test_ prefix).
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("ours", "ours+CE", "transformers")


def rss_mb() -> float:
    """Current resident set size of this process, MB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def one_variant(variant: str, model_dir: Path, batch_size: int, seq_len: int, steps: int) -> dict:
    """Load the model, run 1 + steps training steps on a fixed random batch, report time and memory."""
    sys.path.insert(0, str(ROOT))
    torch.manual_seed(0)
    if variant == "transformers":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:
        from model import Transformer

        model = Transformer.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    V = model.config.vocab_size
    ids = torch.randint(0, V, (batch_size, seq_len))
    targets = torch.roll(ids, -1, dims=1)
    ut = torch.rand(batch_size, seq_len) < 0.5
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rss_loaded = rss_mb()

    def step():
        if variant == "ours":
            import train

            loss, _ = train.micro_batch_loss(
                model,
                ids,
                targets,
                ut,
                1 / int((~ut).sum()),
                int((~ut).sum()) / int(ut.sum()),
                torch.device("cpu"),
                "fp32",
            )
        elif variant == "ours+CE":
            loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
        else:
            loss = F.cross_entropy(model(ids).logits.flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up; also allocates the AdamW state
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t0) / steps
    return {
        "variant": variant,
        "step_s": dt,
        "tokens_per_s": batch_size * seq_len / dt,
        "peak_rss_mb": peak_rss_mb(),
        "step_added_mb": peak_rss_mb() - rss_loaded,
        "loaded_rss_mb": rss_loaded,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (default 3)")
    p.add_argument(
        "--repeats", type=int, default=2, help="runs of each variant, in turn; the fastest counts (default 2)"
    )
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process's job
    args = p.parse_args()
    if args.model is None:
        sys.path.insert(0, str(ROOT))
        from data import default_model_path

        args.model = str(default_model_path())
    if args.variant:
        print(json.dumps(one_variant(args.variant, Path(args.model), args.batch_size, args.seq_len, args.steps)))
        return
    best = {}
    for _ in range(args.repeats):
        for v in VARIANTS:
            cmd = [
                sys.executable,
                __file__,
                "--variant",
                v,
                "--model",
                args.model,
                "--batch-size",
                str(args.batch_size),
                "--seq-len",
                str(args.seq_len),
                "--steps",
                str(args.steps),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if res.returncode:
                sys.exit(f"{v} failed:\n{res.stderr[-2000:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"{v}: {r['step_s']:.1f} s/step, peak RSS {r['peak_rss_mb']:.0f} MB", file=sys.stderr)
            if v not in best or r["step_s"] < best[v]["step_s"]:
                best[v] = r
    rows = [best[v] for v in VARIANTS]
    print(
        f"\n{args.batch_size} x {args.seq_len} tokens, fp32, AdamW, {torch.get_num_threads()} CPU threads, "
        f"mean of {args.steps} steps after a warm-up step, fastest of {args.repeats} runs\n"
    )
    print("| variant | s/step | tokens/s | peak RSS (MB) | added by training (MB) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['variant']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['step_added_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
