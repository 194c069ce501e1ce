"""
Benchmark of the fused PT-ALIGN loss against what one would otherwise use.

    python -m kernels.bench                                # GPU: N 4096 8192 16384 x V 32000 128256 256000, bf16
                                                           # CPU: N 1024, V 32000, fp32 (the CPU paths)
    python -m kernels.bench --n 16384 --v 128256 --dtype bf16
    python -m kernels.bench --memory                       # peak memory at N 8192, V 128256: eager vs fused-linear
    python -m kernels.bench --markdown bench.md --png bench.png

Each row is forward + backward of one loss:

    eager           log-softmax in fp32 + gather + log(1 - p) clamped, as hand-written training code does
    compile         torch.compile of kernels.pt_loss_reference
    liger-ce        Liger's fused cross-entropy, MLE only (when liger_kernel is installed, on CUDA)
    ptalign         kernels.pt_loss
    eager-linear    hidden @ weight.T, then eager          (the baseline for the next rows)
    ptalign-linear  hidden @ weight.T, then kernels.pt_loss(inplace=True): the logits are ours to overwrite
    fused-linear    kernels.fused_linear_pt_loss

Columns: ms, the median time; floor ms, the time to read the logits once and write their
gradient once (2·N·V·bytes, 4·N·V in bf16) at the copy bandwidth measured in the same run;
% floor = floor ms / ms (100% = at the floor; not given for the *-linear rows, whose time is
mostly GEMMs); peak MB, the most memory allocated during forward + backward beyond what was
allocated before (inputs), gradients included. On CUDA that is torch.cuda's peak counter; on
CPU it is the allocator's running total recorded by torch.profiler for every allocation.
"""

import argparse
import statistics
import time

import torch

from data.files import pyplot, save_figure

from . import fused_linear_pt_loss, pt_loss, pt_loss_reference
from .pt_loss import _INTERPRETED

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# -----------------------------------------------------------------------------
# The contenders, all with the signature (logits or hidden, [weight,] targets, ut_mask, alpha)


def eager_loss(logits, targets, ut_mask, alpha):
    """The loss as typically written by hand, without a fused kernel."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V) fp32
    active = targets != -100
    logp_y = logp.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    is_mle, is_ut = active & ~ut_mask, active & ut_mask
    mle = -(logp_y * is_mle).sum() / is_mle.sum().clamp(min=1)
    one_minus_p = (1 - logp_y.exp()).clamp(min=1e-5)  # the usual guard against log(0)
    ut = -(one_minus_p.log() * is_ut).sum() / is_ut.sum().clamp(min=1)
    return mle + alpha * ut


def liger_loss():
    """Liger's cross-entropy (MLE only: it has no unlikelihood term), or None when unavailable."""
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except ImportError:
        return None
    # Liger writes its gradient over the logits; the timing loop reuses them, which is fine for timing.
    return lambda logits, targets, ut_mask, alpha: liger_cross_entropy(logits, targets, ignore_index=-100)


def logit_methods(device):
    methods = {
        "eager": eager_loss,
        "compile": torch.compile(pt_loss_reference, dynamic=False),
        "ptalign": lambda z, t, u, a: pt_loss(z, t, u, alpha=a),
    }
    liger = liger_loss() if device.type == "cuda" else None
    if liger is not None:
        methods["liger-ce"] = liger
    return methods


LINEAR_METHODS = {
    "eager-linear": lambda h, w, t, u, a: eager_loss(h @ w.t(), t, u, a),
    "ptalign-linear": lambda h, w, t, u, a: pt_loss(h @ w.t(), t, u, alpha=a, inplace=True),
    "fused-linear": lambda h, w, t, u, a: fused_linear_pt_loss(h, w, t, u, alpha=a),
}


# -----------------------------------------------------------------------------
# Measuring


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(step, device, reps):
    """Median wall time of step() in milliseconds, after two warm-up calls (compilation, caches)."""
    step()
    step()
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_mb(step, device):
    """Peak memory allocated while step() runs, beyond what was allocated when it started, in MB."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return _cpu_peak_mb(step)


def _cpu_peak_mb(step):
    """CPU has no peak counter: record every allocation with torch.profiler and take the
    largest running total it reports (private profiler API: None if it changed)."""
    try:
        from torch._C._profiler import _EventType

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        allocations, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            event = stack.pop()
            stack.extend(event.children)
            if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
                allocations.append(
                    (event.start_time_ns, event.extra_fields.alloc_size, event.extra_fields.total_allocated)
                )
    except (ImportError, AttributeError, RuntimeError):
        return None
    if not allocations:
        return 0.0
    allocations.sort()
    start = allocations[0][2] - allocations[0][1]
    return (max(total for _, _, total in allocations) - start) / 2**20


def copy_bandwidth_gbs(device):
    """Achievable bandwidth: bytes read + written by a large copy, per second."""
    n_bytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps=10)
    return 2 * n_bytes / ms / 1e6


# -----------------------------------------------------------------------------
# Inputs and one benchmark row


def make_inputs(n_rows, n_vocab, hidden_size, dtype, device, seed=0):
    """Random logits, hidden states and weight, with 20% ignored tokens and 30% UT tokens."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    targets = torch.randint(0, n_vocab, (n_rows,), generator=gen)
    targets[torch.rand(n_rows, generator=gen) < 0.2] = -100
    ut_mask = torch.rand(n_rows, generator=gen) < 0.3
    logits = (torch.randn(n_rows, n_vocab, generator=gen) * 2).to(dtype)
    hidden = torch.randn(n_rows, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(n_vocab, hidden_size, generator=gen) / hidden_size**0.5).to(dtype)
    to = lambda t: t.to(device)
    return to(logits), to(hidden), to(weight), to(targets), to(ut_mask)


def step_for(fn, leaves, rest, alpha):
    """forward + backward of fn(*leaves, *rest), gradients dropped afterwards."""

    def step():
        loss = fn(*leaves, *rest, alpha)
        loss.backward()
        for leaf in leaves:
            leaf.grad = None

    return step


def run(args, device):
    """Time and measure every method at every shape; returns the table rows."""
    dtype = DTYPES[args.dtype]
    bandwidth = args.bandwidth or copy_bandwidth_gbs(device)
    print(f"copy bandwidth: {bandwidth:.1f} GB/s ({'given' if args.bandwidth else 'measured'})")
    print(
        table(
            [dict(method=None, n=None, v=None, dtype=None, ms=None, floor_ms=None, share=None, peak_mb=None)]
        ).splitlines()[0]
    )
    rows = []
    for n_vocab in args.v:
        for n_rows in args.n:
            logits, hidden, weight, targets, ut_mask = make_inputs(n_rows, n_vocab, args.hidden, dtype, device)
            floor_ms = 2 * n_rows * n_vocab * logits.element_size() / bandwidth / 1e6
            methods = [(name, fn, [logits]) for name, fn in logit_methods(device).items()]
            methods += [(name, fn, [hidden, weight]) for name, fn in LINEAR_METHODS.items()]
            for name, fn, leaves in methods:
                if args.only and name not in args.only:
                    continue
                leaves = [leaf.detach().requires_grad_() for leaf in leaves]
                step = step_for(fn, leaves, (targets, ut_mask), args.alpha)
                ms = time_ms(step, device, args.reps)
                mb = peak_mb(step, device)
                share = None if name.endswith("linear") else floor_ms / ms
                rows.append(
                    dict(
                        method=name,
                        n=n_rows,
                        v=n_vocab,
                        dtype=args.dtype,
                        ms=ms,
                        floor_ms=floor_ms,
                        share=share,
                        peak_mb=mb,
                    )
                )
                print(format_row(rows[-1]), flush=True)
    return rows


def run_memory(args, device):
    """Peak memory of eager vs our paths from hidden states, at one shape."""
    dtype = DTYPES[args.dtype]
    n_rows, n_vocab = args.n[0], args.v[0]
    _, hidden, weight, targets, ut_mask = make_inputs(n_rows, n_vocab, args.hidden, dtype, device)
    print(
        f"peak memory, forward + backward from hidden ({n_rows}, {args.hidden}) and weight "
        f"({n_vocab}, {args.hidden}), {args.dtype}; the gradients returned are "
        f"{(hidden.numel() + weight.numel()) * hidden.element_size() / 2**20:.0f} MB of each peak"
    )
    rows = []
    for name, fn in LINEAR_METHODS.items():
        if args.only and name not in args.only:
            continue
        leaves = [hidden.detach().requires_grad_(), weight.detach().requires_grad_()]
        mb = peak_mb(step_for(fn, leaves, (targets, ut_mask), args.alpha), device)
        rows.append(dict(method=name, n=n_rows, v=n_vocab, dtype=args.dtype, peak_mb=mb))
        print(format_row(rows[-1]), flush=True)
    eager = next((r["peak_mb"] for r in rows if r["method"] == "eager-linear"), None)
    for r in rows:
        r["vs_eager"] = r["peak_mb"] / eager if eager and r["peak_mb"] is not None else None
    return rows


# -----------------------------------------------------------------------------
# Output: a markdown table, and a plot

COLUMNS = [
    ("method", "{}"),
    ("n", "{}"),
    ("v", "{}"),
    ("dtype", "{}"),
    ("ms", "{:.2f}"),
    ("floor_ms", "{:.2f}"),
    ("share", "{:.0%}"),
    ("peak_mb", "{:.0f}"),
    ("vs_eager", "{:.3f}"),
]
HEADERS = {
    "method": "method",
    "n": "N",
    "v": "V",
    "dtype": "dtype",
    "ms": "ms",
    "floor_ms": "floor ms",
    "share": "% floor",
    "peak_mb": "peak MB",
    "vs_eager": "peak / eager",
}


def format_row(row, columns=None):
    cells = [
        fmt.format(row[key]) if row.get(key) is not None else "-"
        for key, fmt in COLUMNS
        if key in (columns or [k for k, _ in COLUMNS if k in row])
    ]
    return "| " + " | ".join(cells) + " |"


def table(rows):
    columns = [key for key, _ in COLUMNS if any(key in r for r in rows)]
    lines = ["| " + " | ".join(HEADERS[c] for c in columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + [format_row(r, columns) for r in rows])


def write_png(rows, path):
    """ms against N, one panel per vocabulary size, one line per method."""
    plt = pyplot()
    vocabs = sorted({r["v"] for r in rows})
    fig, axes = plt.subplots(1, len(vocabs), figsize=(5 * len(vocabs), 4), squeeze=False)
    for ax, v in zip(axes[0], vocabs):
        for method in dict.fromkeys(r["method"] for r in rows):
            points = sorted((r["n"], r["ms"]) for r in rows if r["v"] == v and r["method"] == method)
            ax.plot(*zip(*points), marker="o", label=method)
        ax.set(title=f"V = {v}", xlabel="N (tokens)", ylabel="forward + backward ms", yscale="log")
    axes[0][0].legend()
    save_figure(fig, path)
    print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, nargs="+", help="tokens (rows of logits)")
    p.add_argument("--v", type=int, nargs="+", help="vocabulary sizes")
    p.add_argument("--dtype", choices=DTYPES, help="logits / hidden dtype (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--hidden", type=int, help="hidden size H for the *-linear rows")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--reps", type=int, help="timed repetitions per row")
    p.add_argument("--only", nargs="+", help="run only these methods")
    p.add_argument("--bandwidth", type=float, help="GB/s to use for the floor instead of measuring a copy")
    p.add_argument("--memory", action="store_true", help="peak memory of the *-linear methods at one shape")
    p.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    p.add_argument("--png", metavar="FILE", help="also plot ms against N to FILE (PNG)")
    return p


def main():
    cuda = torch.cuda.is_available()
    args = build_parser().parse_args()

    device = torch.device("cuda" if cuda else "cpu")
    # CPU: fp32, since bf16 GEMMs there can be thousands of times slower, and small shapes.
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.memory:
        args.n, args.v = args.n or [8192], args.v or [128256]
        args.hidden = args.hidden or (4096 if cuda else 256)
    else:
        args.n = args.n or ([4096, 8192, 16384] if cuda else [1024])
        args.v = args.v or ([32000, 128256, 256000] if cuda else [32000])
        args.hidden = args.hidden or (4096 if cuda else 576)
    args.reps = args.reps or (20 if cuda else 3)
    if cuda:
        print(f"device: {torch.cuda.get_device_name()}")
    else:
        path = "the Triton interpreter" if _INTERPRETED else "chunked PyTorch"
        print(
            f"device: CPU ({torch.get_num_threads()} threads). GPU timings need CUDA: these are the CPU paths, "
            f"ptalign running as {path}."
        )
    rows = run_memory(args, device) if args.memory else run(args, device)
    text = table(rows)
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
        print(f"wrote {args.markdown}")
    if args.png:
        write_png(rows, args.png)


if __name__ == "__main__":
    main()
