"""
Benchmark of the fused PT-ALIGN loss against what one would otherwise use.

    python -m kernels.bench --all                 # the README's table, written to runs/bench/
                                                  # (bench.md, bench.json, bench.png): on a GPU
                                                  # the GPU table, on a CPU a small CPU table
    python -m kernels.bench --n 16384 --v 128256 --only ptalign liger-ce
    python -m kernels.bench --memory              # peak memory from hidden states, N 8192, V 128256

Rows, each checked against the float64 reference (kernels.pt_loss_reference) on a slice of its
inputs before it is timed; a library that is not installed gives a row that says so:

    eager           log-softmax in fp32 + gather + log(1 - p) clamped, as hand-written training code does
    compile         torch.compile of kernels.pt_loss_reference (recompiled for every shape; --skip compile
                    leaves it out)
    liger-ce        Liger's cross-entropy (MLE only: it has no unlikelihood term)
    quack-ce        quack's cross-entropy (CuTe DSL; MLE only)
    ptalign         kernels.pt_loss
    eager-linear    hidden @ weight.T, then eager
    liger-linear    Liger's fused linear cross-entropy (MLE only)
    cce-linear      Apple's cut-cross-entropy, linear_cross_entropy (MLE only)
    ptalign-linear  hidden @ weight.T, then kernels.pt_loss(inplace=True)
    fused-linear    kernels.fused_linear_pt_loss

Timing, two ways. End to end: each repetition flushes L2 (writes a buffer of twice its size),
then records CUDA events around the forward and the backward of one loss on inputs made on the
device, host-side work (argument checks, token weights, allocations) included; after
WARMUPS = 10 warm-up runs (compilation, autotuning of the variant that is timed: the warm-up
runs forward and backward at the timed shape), the median over repetitions of forward, backward
and their sum, and the 20th-80th percentile of the sum (the spread). Kernel only (ptalign rows):
`triton.testing.do_bench` of the one kernel launch that does a training step's work (the forward
kernel writing the gradient for grad_output = 1; backward then launches a kernel that returns at
once), its own L2 flush before each run, median and 20th-80th percentile. torch._dynamo is reset
for every shape. On a CPU: perf_counter, no flush.

Columns: GB/s is the loss's floor of bytes, one read of the logits and one write of their
gradient (2·N·V·bytes), over the time, with its share of the copy bandwidth measured in the same
run (end to end, and kernel only); TFLOP/s (*-linear rows) is 6·N·V·H, the three GEMMs of
forward and backward, over the total time (the exact path of fused-linear runs a fourth,
recomputing the logits; its training path does not); peak MB is the memory allocated during
forward + backward beyond the inputs, gradients included (CUDA's peak counter; on a CPU the
allocator's running total from torch.profiler).
"""

import argparse
import importlib.metadata
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from common.charts import pyplot, save_figure
from common.cli import NON_NEGATIVE, POSITIVE, Parser
from common.errors import one_line_errors
from common.files import check_output_dir, check_output_file, write_bytes_atomic, write_json

from . import fused_linear_pt_loss, pt_loss, pt_loss_reference
from .pt_loss import _INTERPRETED, token_losses
from .reference import token_weights

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IGNORE = -100

# The README's table: loss rows at these (N, V), *-linear rows at (N, H, V). V = 16384 is held
# on chip on every GPU (the one-read path); 32000 on sm_80 only; 128256 is streamed everywhere.
GPU_TABLE = dict(
    loss=[(16384, 16384), (4096, 32000), (16384, 32000), (4096, 128256), (16384, 128256)],
    linear=[(8192, 4096, 128256)],
)
CPU_TABLE = dict(loss=[(512, 32000)], linear=[(512, 576, 32000)])
TOY_TABLE = dict(loss=[(48, 1000), (48, 20000)], linear=[(48, 32, 1000)])  # seconds under the interpreter
TABLES = dict(gpu=GPU_TABLE, cpu=CPU_TABLE, toy=TOY_TABLE)
CHECK_ROWS = 512  # rows of the slice each method is checked on
AUTOTUNED = ("ptalign", "ptalign-linear", "fused-linear")  # run once at the timed shape before the check
CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}  # relative error of loss and grads
WARMUPS = 10  # untimed runs before the timed ones

# -----------------------------------------------------------------------------
# 1. The contenders


@dataclass
class Method:
    """One row of the table: fn(logits or hidden, [weight,] targets, ut_mask, alpha) -> loss."""

    name: str
    takes: str  # "logits" or "linear" (hidden, weight)
    fn: object = None  # None: unavailable, for the reason in `missing`
    missing: str = ""
    mle_only: bool = False  # no unlikelihood term: checked and timed as plain cross-entropy


def eager_loss(logits, targets, ut_mask, alpha):
    """The loss as typically written by hand, without a fused kernel."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V) fp32
    active = targets != IGNORE
    logp_y = logp.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    is_mle, is_ut = active & ~ut_mask, active & ut_mask
    mle = -(logp_y * is_mle).sum() / is_mle.sum().clamp(min=1)
    one_minus_p = (1 - logp_y.exp()).clamp(min=1e-5)  # the usual guard against log(0)
    ut = -(one_minus_p.log() * is_ut).sum() / is_ut.sum().clamp(min=1)
    return mle + alpha * ut


def _library(name, takes, module, make, device):
    """A Method from an optional library, or a row saying why it cannot run here."""
    try:
        lib = importlib.import_module(module)
    except ImportError:
        return Method(name, takes, missing=f"not installed ({module})", mle_only=True)
    except Exception as e:  # installed but broken here (a CUDA or DSL mismatch): its row says so
        return Method(name, takes, missing=f"import failed: {type(e).__name__}: {str(e)[:60]}", mle_only=True)
    if device.type != "cuda":
        return Method(name, takes, missing="needs CUDA", mle_only=True)
    return Method(name, takes, fn=make(lib), mle_only=True)


def methods(device):
    """Every contender, in table order. `compile` is built afresh per shape (see run_table)."""
    return [
        Method("eager", "logits", eager_loss),
        Method("compile", "logits"),
        _library(
            "liger-ce",
            "logits",
            "liger_kernel.transformers",
            lambda lib: lambda z, t, u, a: lib.LigerCrossEntropyLoss(ignore_index=IGNORE)(z, t),
            device,
        ),
        _library(
            "quack-ce",
            "logits",
            "quack",
            lambda lib: lambda z, t, u, a: lib.cross_entropy(z, t, ignore_index=IGNORE, reduction="mean"),
            device,
        ),
        Method("ptalign", "logits", lambda z, t, u, a: pt_loss(z, t, u, alpha=a)),
        Method("eager-linear", "linear", lambda h, w, t, u, a: eager_loss(h @ w.t(), t, u, a)),
        _library(
            "liger-linear",
            "linear",
            "liger_kernel.transformers",
            lambda lib: lambda h, w, t, u, a: lib.LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)(w, h, t),
            device,
        ),
        _library(
            "cce-linear",
            "linear",
            "cut_cross_entropy",
            lambda lib: lambda h, w, t, u, a: lib.linear_cross_entropy(h, w, t, ignore_index=IGNORE),
            device,
        ),
        Method("ptalign-linear", "linear", lambda h, w, t, u, a: pt_loss(h @ w.t(), t, u, alpha=a, inplace=True)),
        Method("fused-linear", "linear", lambda h, w, t, u, a: fused_linear_pt_loss(h, w, t, u, alpha=a)),
    ]


def compiled_reference():
    """torch.compile of the reference, after a dynamo reset: one fresh compilation per shape
    (reusing one across shapes hits the recompile limit and silently falls back to eager)."""
    torch._dynamo.reset()
    compiled = torch.compile(pt_loss_reference, dynamic=False)
    return lambda z, t, u, a: compiled(z, t, u, alpha=a)


# -----------------------------------------------------------------------------
# 2. Inputs, and the check against float64


def make_inputs(n_rows, n_vocab, hidden_size, dtype, device, seed=0):
    """Logits, or hidden states and weight, made on the device, with targets (20% ignored) and ut_mask (30%)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    targets = torch.randint(0, n_vocab, (n_rows,), generator=gen, device=device)
    targets[torch.rand(n_rows, generator=gen, device=device) < 0.2] = IGNORE
    ut_mask = torch.rand(n_rows, generator=gen, device=device) < 0.3
    if hidden_size is None:
        return [torch.randn(n_rows, n_vocab, generator=gen, device=device).mul_(2).to(dtype)], targets, ut_mask
    hidden = torch.randn(n_rows, hidden_size, generator=gen, device=device).to(dtype)
    weight = torch.randn(n_vocab, hidden_size, generator=gen, device=device).div_(hidden_size**0.5).to(dtype)
    return [hidden, weight], targets, ut_mask


def check(method, leaves, targets, ut_mask, alpha):
    """Largest relative error (by norm) of loss and gradients against float64, on the first CHECK_ROWS rows."""
    rows = slice(0, CHECK_ROWS)
    part = [leaves[0][rows]] + leaves[1:]
    ut = torch.zeros_like(ut_mask[rows]) if method.mle_only else ut_mask[rows]
    ours = [x.detach().clone().requires_grad_() for x in part]
    ref = [x.detach().double().requires_grad_() for x in part]
    loss = method.fn(*ours, targets[rows], ut, alpha)
    ref_logits = ref[0] if method.takes == "logits" else ref[0] @ ref[1].t()
    ref_loss = pt_loss_reference(ref_logits, targets[rows], ut, alpha=alpha)
    loss.backward()
    ref_loss.backward()
    pairs = [(loss.detach(), ref_loss.detach())] + [(x.grad, r.grad) for x, r in zip(ours, ref)]
    return max(((got.double() - want).norm() / want.norm().clamp(min=1e-300)).item() for got, want in pairs)


# -----------------------------------------------------------------------------
# 3. Measuring: time per phase, peak memory, copy bandwidth


class Timer:
    """Times phases of one repetition: CUDA events (after an L2 flush) on a GPU, perf_counter on a CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
            self.flush_buffer = torch.empty(2 * l2_bytes, dtype=torch.int8, device=device)

    def start(self):
        """Begin a repetition: flush L2, then mark the first instant."""
        if self.cuda:
            self.flush_buffer.zero_()
        self.marks = []
        self.mark()

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def durations_ms(self):
        """Milliseconds between consecutive marks."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def spread(times_ms):
    """{median, p20, p80} of a list of times: the middle and the spread a rerun should land in."""
    if len(times_ms) == 1:
        return dict(median=times_ms[0], p20=times_ms[0], p80=times_ms[0])
    deciles = statistics.quantiles(times_ms, n=10, method="inclusive")  # the 10th, 20th, ..., 90th percentile
    return dict(median=deciles[4], p20=deciles[1], p80=deciles[7])


def time_phases(fn, leaves, rest, timer, reps, warmup=WARMUPS):
    """End to end: median forward, backward and total ms of fn(*leaves, *rest) and its backward
    (fresh leaves each time), and the 20th / 80th percentile of the total."""
    times = []
    for rep in range(warmup + reps):
        xs = [x.detach().requires_grad_() for x in leaves]
        timer.start()
        loss = fn(*xs, *rest)
        timer.mark()
        loss.backward()
        timer.mark()
        forward, backward = timer.durations_ms()
        if rep >= warmup:
            times.append((forward, backward, forward + backward))
        del loss, xs
    total = spread([t[2] for t in times])
    fwd, bwd = (statistics.median(t[i] for t in times) for i in range(2))
    return dict(fwd_ms=fwd, bwd_ms=bwd, ms=total["median"], ms_p20=total["p20"], ms_p80=total["p80"])


def kernel_only_ms(logits, targets, ut_mask, alpha, reps, warmups=WARMUPS):
    """Kernel only: {median, p20, p80} ms of the one launch that does a training step's work, the
    forward kernel writing the gradient (buffers made beforehand). do_bench on a GPU (it flushes L2
    before each run); perf_counter over warmups + reps runs on a CPU."""
    t, u = targets.long().contiguous(), ut_mask.contiguous()
    weights = token_weights(t, u, alpha, IGNORE, "mean")
    stats = torch.empty(t.numel(), 3, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits)
    launch = lambda: token_losses(logits, t, u, IGNORE, stats, weights, grad)  # noqa: E731
    if logits.is_cuda:
        p20, median, p80 = triton.testing.do_bench(launch, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
        return dict(median=median, p20=p20, p80=p80)
    times = []
    for rep in range(warmups + reps):
        start = time.perf_counter()
        launch()
        if rep >= warmups:
            times.append((time.perf_counter() - start) * 1e3)
    return spread(times)


def peak_mb(step, device):
    """Peak memory allocated while step() runs, beyond what was allocated when it started, in MB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize()
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


def step_for(fn, leaves, rest):
    """forward + backward of fn(*leaves, *rest), gradients dropped afterwards."""

    def step():
        xs = [x.detach().requires_grad_() for x in leaves]
        fn(*xs, *rest).backward()

    return step


def copy_bandwidth_gbs(device, timer):
    """Achievable bandwidth: bytes read + written by a large copy, per second (median of 10)."""
    n_bytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.ones(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        timer.start()
        dst.copy_(src)
        timer.mark()
        times.append(timer.durations_ms()[0])
    return 2 * n_bytes / statistics.median(times[2:]) / 1e6


# -----------------------------------------------------------------------------
# 4. Where it ran: versions, device, clocks


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(device):
    """Versions and the device (with its clocks on a GPU), for the header of every result."""
    env = dict(
        torch=torch.__version__,
        triton=triton.__version__,
        liger_kernel=_version("liger-kernel"),
        cut_cross_entropy=_version("cut-cross-entropy"),
        python=platform.python_version(),
    )
    if device.type != "cuda":
        path = "the Triton interpreter" if _INTERPRETED else "the chunked PyTorch path"
        env["device"] = f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        env["note"] = f"CPU table: not GPU numbers (ptalign runs as {path})"
        return env
    props = torch.cuda.get_device_properties(device)
    env["device"] = f"{props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MB"
    env["capability"] = f"sm_{props.major}{props.minor}"
    query = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader", f"--id={device.index or 0}"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        env["clocks"] = dict(zip(query.split(","), (x.strip() for x in out.split(","))))
    except (OSError, subprocess.SubprocessError):
        env["clocks"] = "nvidia-smi unavailable"
    return env


# -----------------------------------------------------------------------------
# 5. Running the table


def run_row(method, leaves, rest, timer, reps, row, warmups=WARMUPS):
    """One method at one shape: the check, then times and peak memory, added to `row`."""
    targets, ut_mask, alpha = rest
    dtype = leaves[0].dtype
    if method.fn is None:
        row["check"] = method.missing
        return row
    if method.name in AUTOTUNED:
        # autotune's key is the vocabulary, the variant and the dtypes, not the row count: tune at
        # the timed shape (not CHECK_ROWS) the variant that is timed (forward and backward)
        step_for(method.fn, leaves, rest)()
    try:
        error = check(method, leaves, targets, ut_mask, alpha)
    except Exception as e:  # an optional library failing must not cost the rest of the table
        if not method.mle_only:  # only the optional libraries are mle_only
            raise
        row["check"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        return row
    row["check"] = f"{'ok' if error <= CHECK_TOL[dtype] else 'FAILED'} {error:.0e}"
    if error > CHECK_TOL[dtype]:
        return row  # a wrong answer is not timed
    if method.mle_only:
        rest = (targets, torch.zeros_like(ut_mask), alpha)
    # fresh copies: some methods write their gradient over the inputs they are given
    leaves = [x.clone() for x in leaves]
    row.update(time_phases(method.fn, leaves, rest, timer, reps, warmups))
    if method.name == "ptalign":
        kernel = kernel_only_ms(leaves[0], targets, ut_mask, alpha, reps, warmups)
        row["kernel_ms"], row["kernel_p20"], row["kernel_p80"] = kernel["median"], kernel["p20"], kernel["p80"]
    row["peak_mb"] = peak_mb(step_for(method.fn, leaves, rest), leaves[0].device)
    return row


def throughput(row, elem_size, bandwidth):
    """GB/s and its share of the copy bandwidth (loss rows), TFLOP/s (*-linear rows)."""
    if "ms" not in row:
        return row
    if row["h"] is None:
        floor_bytes = 2 * row["n"] * row["v"] * elem_size
        row["gbs"] = floor_bytes / row["ms"] / 1e6
        row["share"] = row["gbs"] / bandwidth
        if "kernel_ms" in row:
            row["kernel_share"] = floor_bytes / row["kernel_ms"] / 1e6 / bandwidth
    else:
        row["tflops"] = 6 * row["n"] * row["v"] * row["h"] / row["ms"] / 1e9
    return row


def run_table(shapes, dtype, device, reps, alpha, only=None, skip=(), warmups=WARMUPS):
    """Every method (of `only`, if given, and not in `skip`) at every shape: the table's rows,
    each after `warmups` untimed runs."""
    timer = Timer(device)
    bandwidth = copy_bandwidth_gbs(device, timer)
    print(f"copy bandwidth: {bandwidth:.0f} GB/s")
    rows = []
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    for takes, shape in [("logits", s) for s in shapes["loss"]] + [("linear", s) for s in shapes["linear"]]:
        n_rows, hidden_size, n_vocab = shape[0], (shape[1] if takes == "linear" else None), shape[-1]
        leaves, targets, ut_mask = make_inputs(n_rows, n_vocab, hidden_size, dtype, device)
        for method in methods(device):
            if method.takes != takes or (only and method.name not in only) or method.name in skip:
                continue
            if method.name == "compile":
                method.fn = compiled_reference()
            row = dict(method=method.name, n=n_rows, v=n_vocab, h=hidden_size, dtype=dtype_name)
            run_row(method, leaves, (targets, ut_mask, alpha), timer, reps, row, warmups)
            rows.append(throughput(row, dtype.itemsize, bandwidth))
            print(format_row(row), flush=True)
        del leaves
        if device.type == "cuda":
            torch.cuda.empty_cache()
    relative_to_eager(rows)
    return rows, bandwidth


def relative_to_eager(rows):
    """peak / eager: each *-linear row's peak memory over eager-linear's at the same shape."""
    for row in rows:
        same_shape = (r for r in rows if (r["method"], r["n"], r["v"]) == ("eager-linear", row["n"], row["v"]))
        eager = next(same_shape, None)
        if row["h"] is not None and eager and eager.get("peak_mb") and row.get("peak_mb") is not None:
            row["vs_eager"] = row["peak_mb"] / eager["peak_mb"]


def run_memory(args, dtype, device):
    """Peak memory of the *-linear methods at one shape (no timing): the memory target's numbers."""
    n_rows, n_vocab, hidden_size = args.n[0], args.v[0], args.hidden
    leaves, targets, ut_mask = make_inputs(n_rows, n_vocab, hidden_size, dtype, device)
    rows = []
    for method in methods(device):
        if method.takes != "linear" or method.fn is None or (args.only and method.name not in args.only):
            continue
        mb = peak_mb(step_for(method.fn, leaves, (targets, ut_mask, args.alpha)), device)
        rows.append(dict(method=method.name, n=n_rows, v=n_vocab, h=hidden_size, dtype=args.dtype, peak_mb=mb))
        print(format_row(rows[-1]), flush=True)
    relative_to_eager(rows)
    return rows


# -----------------------------------------------------------------------------
# 6. Output: a markdown table, JSON, a plot


def _number(x):
    """Three significant digits, without an exponent for large numbers."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


COLUMNS = [
    ("method", "method", "{}"),
    ("n", "N", "{}"),
    ("v", "V", "{}"),
    ("h", "H", "{}"),
    ("dtype", "dtype", "{}"),
    ("check", "vs float64", "{}"),
    ("fwd_ms", "fwd ms", "{:.3f}"),
    ("bwd_ms", "bwd ms", "{:.3f}"),
    ("ms", "total ms", "{:.3f}"),
    ("ms_p20", "p20", "{:.3f}"),
    ("ms_p80", "p80", "{:.3f}"),
    ("gbs", "GB/s", _number),
    ("share", "% of copy", "{:.0%}"),
    ("kernel_ms", "kernel ms", "{:.3f}"),
    ("kernel_p20", "kernel p20", "{:.3f}"),
    ("kernel_p80", "kernel p80", "{:.3f}"),
    ("kernel_share", "kernel % of copy", "{:.0%}"),
    ("tflops", "TFLOP/s", _number),
    ("peak_mb", "peak MB", "{:.0f}"),
    ("vs_eager", "peak / eager", "{:.3f}"),
]


def format_row(row, keys=None):
    keys = keys or [k for k, _, _ in COLUMNS if k in row]
    cells = [
        "-" if row.get(k) is None else fmt(row[k]) if callable(fmt) else fmt.format(row[k])
        for k, _, fmt in COLUMNS
        if k in keys
    ]
    return "| " + " | ".join(cells) + " |"


def table(rows):
    keys = [k for k, _, _ in COLUMNS if any(k in r for r in rows)]
    head = "| " + " | ".join(title for k, title, _ in COLUMNS if k in keys) + " |"
    return "\n".join([head, "|" + "---|" * len(keys)] + [format_row(r, keys) for r in rows])


def write_png(rows, path):
    """Total ms of each method, one panel per shape (log scale)."""
    plt = pyplot()
    shapes = list(dict.fromkeys((r["n"], r["v"], r.get("h")) for r in rows if r.get("ms") is not None))
    if not shapes:
        return  # nothing was timed: no chart
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 3.5), squeeze=False)
    for ax, (n, v, h) in zip(axes[0], shapes):
        timed = [r for r in rows if (r["n"], r["v"], r.get("h")) == (n, v, h) and r.get("ms") is not None]
        ax.barh([r["method"] for r in timed], [r["ms"] for r in timed])
        ax.set(title=f"N={n} V={v}" + (f" H={h}" if h else ""), xlabel="forward + backward ms", xscale="log")
        ax.invert_yaxis()
    save_figure(fig, path)


def write_outputs(rows, env, bandwidth, out):
    """bench.md (the README table, with its header), bench.json and bench.png in out/."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    versions = (
        f"torch {env['torch']}, triton {env['triton']}, liger-kernel {env['liger_kernel']}, "
        f"cut-cross-entropy {env['cut_cross_entropy']}; copy bandwidth {bandwidth:.0f} GB/s"
    )
    clocks = f"; clocks {env['clocks']}" if "clocks" in env else ""
    header = [f"{env.get('note', 'GPU table')}: {env['device']}", versions + clocks]
    write_bytes_atomic(out / "bench.md", "\n\n".join(header + [table(rows)]) + "\n")
    write_json(out / "bench.json", dict(environment=env, copy_bandwidth_gbs=bandwidth, rows=rows))
    write_png(rows, out / "bench.png")
    print(f"wrote {out / 'bench.md'}, bench.json, bench.png")


# -----------------------------------------------------------------------------
# 7. Command line


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", action="store_true", help="the README's table (GPU shapes on CUDA, small ones on a CPU)")
    p.add_argument("--n", type=POSITIVE, nargs="+", help="tokens (rows of logits)")
    p.add_argument("--v", type=POSITIVE, nargs="+", help="vocabulary sizes")
    p.add_argument("--hidden", type=POSITIVE, help="hidden size H for the *-linear rows")
    p.add_argument("--dtype", choices=DTYPES, help="logits / hidden dtype (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--alpha", type=NON_NEGATIVE, default=1.0, help="weight of the unlikelihood term (default: 1.0)")
    p.add_argument("--reps", type=POSITIVE, help="timed repetitions per row (default 20 on CUDA, 3 on CPU)")
    p.add_argument("--only", nargs="+", help="run only these methods")
    p.add_argument("--skip", nargs="+", default=[], help="leave these methods out (e.g. compile)")
    p.add_argument("--table", choices=TABLES, help="the shapes of this table (default: gpu on CUDA, else cpu)")
    p.add_argument("--kind", choices=("loss", "linear"), help="only the loss rows, or only the *-linear rows")
    p.add_argument("--memory", action="store_true", help="peak memory of the *-linear methods at one shape")
    p.add_argument("--out", default="runs/bench", help="with --all: directory for bench.md, bench.json, bench.png")
    p.add_argument("--json", metavar="FILE", help="also write the rows and environment as JSON")
    p.add_argument("--png", metavar="FILE", help="also plot total ms per method")
    return p


def shapes_of(args, cuda):
    """{"loss": [(N, V)], "linear": [(N, H, V)]} from the flags, or a table's (--table, or the
    README's for this device), less the kind --kind leaves out."""
    if args.table or args.all or not (args.n or args.v):
        shapes = TABLES[args.table or ("gpu" if cuda else "cpu")]
    else:
        n, v = args.n or [4096], args.v or [128256]
        hidden = args.hidden or (4096 if cuda else 576)
        shapes = dict(loss=[(a, b) for b in v for a in n], linear=[(a, hidden, b) for b in v for a in n])
    return {kind: rows if args.kind in (None, kind) else [] for kind, rows in shapes.items()}


def main(argv=None):
    args = build_parser().parse_args(argv)
    with one_line_errors(lambda: "the benchmark writes its files only at the end, so nothing was written."):
        bench(args)


def bench(args) -> None:
    """Print the table for the parsed flags, and write the files they ask for."""
    if args.all:  # every output path checked before minutes of timing, not after
        check_output_dir(Path(args.out), "--out")
    for flag in ("json", "png"):
        if getattr(args, flag):
            check_output_file(getattr(args, flag), "--" + flag)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    # CPU: fp32, since bf16 GEMMs there can be thousands of times slower, and small shapes
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    dtype = DTYPES[args.dtype]
    env = environment(device)
    print("\n".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    if args.memory:
        args.n, args.v = args.n or [8192], args.v or [128256]
        args.hidden = args.hidden or (4096 if cuda else 256)
        rows, bandwidth = run_memory(args, dtype, device), None
    else:
        reps = args.reps or (20 if cuda else 3)
        rows, bandwidth = run_table(shapes_of(args, cuda), dtype, device, reps, args.alpha, args.only, args.skip)
    print("\n" + table(rows))
    if args.all:
        write_outputs(rows, env, bandwidth, args.out)
    if args.json:
        write_json(args.json, dict(environment=env, copy_bandwidth_gbs=bandwidth, rows=rows))
    if args.png:
        write_png(rows, args.png)


if __name__ == "__main__":
    main()
