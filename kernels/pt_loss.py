"""
The fused PT-ALIGN loss over logits: Triton kernels for the loss and its gradient.

For a row with logits z (V values) and target y, everything follows from the target's
logit z_y and the log-sum-exp of its competitors:

    lse_ex = log sum_{j != y} exp(z_j)     summed over j != y directly, never as "all minus y"
    a      = lse_ex - z_y                  the log-odds against the target: log((1 - p_y) / p_y)

    MLE token   loss = -log p_y       = softplus(a)      grad g_j = exp(z_j - lse),         g_y = -(1 - p_y)
    UT  token   loss = -log(1 - p_y)  = softplus(-a)     grad g_j = -p_y exp(z_j - lse_ex), g_y = p_y

with lse = log(e^z_y + e^lse_ex) the log-sum-exp of the whole row, p_y = exp(-MLE loss) and
1 - p_y = exp(-UT loss). Nothing ever forms 1 - p, so losses and gradients keep full fp32
accuracy however sure the model is. lse is taken as max(z_y, lse_ex) + softplus(-|a|), so a
target logit of -inf gives an infinite MLE loss (p_y is 0) and a finite gradient.

The sum behind lse_ex is taken relative to its own running max, the max over j != y, so it
is at least 1 and cannot underflow: it needs no floor. (Relative to the row max it would
underflow once the target leads the others by ~100 nats, and a floor there turns the loss
into one whose gradient vanishes on exactly the harmful tokens the model is surest of.) It is
0 only in a row with no finite competitor (V = 1, or all others masked to -inf), where
1 - p is exactly 0: the UT loss is +inf and its gradient g_y = p_y = 1, finite.

The gradient is one formula, coef * exp(z_j - c) with per-row c and coef, plus the target
column computed apart in fp32; each row is scaled by w_i * grad_output_i, its token's weight
from the reduction (reference.token_weights) times what autograd hands backward. The three
numbers (c, coef, g_y) are the row's "stats": `_pt_grad_kernel` rebuilds any block of
columns' gradient from them and the logits.

When is the gradient written? The product w * grad_output must be applied before the
gradient is rounded to the logits' dtype: fp16 under a GradScaler (grad_output 1024 or
65536, w = 1/n) otherwise loses every entry below fp16's smallest normal before the scale
can lift it. But grad_output is only known in backward, and learning on the host that it is
exactly 1 (the usual `loss.backward()`) would cost a device sync. So:

    forward   reads each row and writes the gradient for grad_output = 1 (and the stats);
    backward  launches `_pt_grad_kernel`, whose programs read grad_output on the device.
              A scalar grad_output of exactly 1 ends every program at once: one launch,
              nothing else moved. Rows with any other value are rewritten from the saved
              logits and stats with w * grad_output folded in, rounded once.

The usual case thus moves one read and one write where the row is held on chip (below); a
GradScaler's backward pays one more read and write, and is exact. The alternatives: the
gradient only in forward cannot fold grad_output in; only in backward, from the stats, it is
always exact but reads every row twice (forward for the loss, backward for the gradient),
6·N·V bytes even for rows that fit on chip. The price of this design: pt_loss keeps the
logits alive until backward. inplace=True instead writes the gradient over the logits in
backward (forward only reads): no second N x V buffer ever exists, for one more read.

Bytes moved on a GPU (2-byte logits, N rows, V columns, training):

    V up to ONE_READ_MAX   the row is held on chip (sm_90: 16384, sm_80: 32768): one read and
                           one write, 4·N·V bytes
    larger V               streamed: pass 1 reads the row for lse_ex, pass 2 reads it again
                           and writes the gradient: 6·N·V bytes unless pass 2 finds the row
                           in L2. So the grid is persistent and small enough for that: with P
                           programs, P rows (2·V bytes each) wait in L2 between their two
                           reads; P = min(programs the SMs hold, half the L2 / row bytes). At
                           V = 128256 (256.5 KB a row) on an H200 (50 MiB L2, 132 SMs):
                           P = min(132, 25 MiB / 256.5 KB = 102) = 102 rows in flight, so
                           DRAM sees 4·N·V bytes; each program must then draw 4.8 TB/s / 102
                           = 47 GB/s, which needs loads in flight, not barriers: pass 1
                           keeps a running max and sum per lane and reduces once per row,
                           with the next blocks prefetched (`_lse_streamed` has the arithmetic).
                           Pass 1 loads with evict_last, pass 2 with evict_first and walks
                           the row backwards: what pass 1 read last comes first.
    eval (no gradient)     one read: 2·N·V bytes, with no eviction hint and the full grid
                           (every SM: nothing waits in L2 for a second read).

Launch parameters come from `triton.autotune` over `LOSS_CONFIGS` (pruned by V and the GPU:
the one-read path has one config per width, the streamed one four), keyed by V, WRITE_GRAD and
the dtypes: every compile-time switch the launcher sets, so the forward with and without the
gradient are tuned apart (timed on the GPU at first use). `_pt_grad_kernel`, which may write
over its own input, takes `GRAD_LAUNCH` instead (autotuning it would need a copy of the buffer,
the memory fused_linear exists to save). `python -m kernels.compile_check` compiles all of them
for sm_80 and sm_90.

Without CUDA the same math runs as the Triton kernels under TRITON_INTERPRET=1 (tests), or
otherwise as chunked PyTorch (`_token_losses_torch`), which gives the same results.
"""

import functools

import torch
import triton
import triton.language as tl

from .reference import check_loss_args, loss_parts, token_weights

# Kernels defined while TRITON_INTERPRET=1 is set run on CPU tensors through the interpreter
# (the setting triton.jit reads when it defines them).
_INTERPRETED = bool(triton.knobs.runtime.interpret)

# The one interpreter workaround. The GPU converts fp32 to bf16 rounding to nearest even;
# the interpreter (triton 3.9) does not, so under it `_cast_for` rounds on the bits itself
# and CPU tests see the GPU's values. A compile-time constant: on a GPU the branch is gone.
_ROUND_BY_HAND = tl.constexpr(_INTERPRETED)

# -----------------------------------------------------------------------------
# 1. Launch parameters: what the launchers may choose, all of it compile-checked

# The widest row the one-read path holds on chip, by compute capability: the row sits in
# registers as fp32, BLOCK_V / (32 · num_warps) values per thread, and at 32 warps a thread has
# 64 registers (65536 per SM / 1024 threads). Measured on the compiled kernel with its gradient
# (python -m kernels.compile_check --probe, bf16 and fp32): at 32 values per thread sm_80 uses
# 64 registers without spilling, sm_90 spills (152 to 192 bytes); at 16 values sm_90 uses 54
# registers and no spill. At 64 values both spill. Other GPUs get the smaller width.
ONE_READ_MAX = {80: 32768, 90: 16384}
_ONE_READ_MIN = 1024  # narrower rows are padded to this: 4 warps x 32 threads x 8 values, 16-byte loads

# Streamed rows: (BLOCK_V, num_warps, programs per SM, STAGES). A program reads BLOCK_V logits per step;
# 8 or 16 values per thread keeps the loads 16 bytes wide, and leaves room for the per-lane running
# max and sum (2 more fp32 values per loaded one). Exactly PER_SM programs share an SM, so each
# thread may have 65536 / (32 · num_warps · PER_SM) registers, 128 here (maxnreg; left to itself
# ptxas aims at more programs per SM, and spilled for it). STAGES is the software pipeline's depth
# (`tl.range(..., num_stages=STAGES)`): the blocks in flight are staged in shared memory
# ((STAGES - 1) · BLOCK_V · element bytes, 64 KB at most here, PER_SM programs sharing 164 KB on
# sm_80, 228 KB on sm_90). Measured with the compile check: 32 values per thread spill on sm_90
# once the lanes keep their own statistics, and so does STAGES 4 at 16 values.
_STREAMED = [(2048, 4, 4, 3), (4096, 8, 2, 3), (4096, 16, 1, 3), (8192, 16, 1, 3)]

LOSS_CONFIGS = [
    triton.Config(
        dict(ONE_READ=True, ROWS=1, BLOCK_V=1 << k, PER_SM=0, STAGES=1), num_warps=min(32, max(4, (1 << k) // 512))
    )
    for k in range(_ONE_READ_MIN.bit_length() - 1, max(ONE_READ_MAX.values()).bit_length())
] + [
    triton.Config(
        dict(ONE_READ=False, ROWS=1, BLOCK_V=b, PER_SM=s, STAGES=n), num_warps=w, maxnreg=min(255, 2048 // (w * s))
    )
    for b, w, s, n in _STREAMED
]

# `_pt_grad_kernel`: one read and one write per element, no reuse: 16 KB of logits per step,
# the next block's read issued while this one is written (STAGES 2).
GRAD_LAUNCH = {
    2: dict(ROWS=1, BLOCK_V=8192, num_warps=16, PER_SM=2, STAGES=2),
    4: dict(ROWS=1, BLOCK_V=4096, num_warps=16, PER_SM=2, STAGES=2),
}

_L2_SHARE = 0.5  # of L2 for rows waiting for their second read; the rest for gradient writes

# Under the interpreter (CPU tests): the streamed path's block width, and a cap on the grid that
# makes it persistent (None: one program per tile). Tests shrink both to reach, on small inputs,
# the cases a GPU meets at V = 128256: many blocks per row, several tiles per program.
INTERPRETER_LAUNCH = {"stream_block": 4096, "max_programs": None}


def one_read_width(n_vocab, capability=None):
    """BLOCK_V of the one-read path for rows of n_vocab logits on a GPU of this compute capability
    (80, 90, ...; None: the smallest limit), or None when they do not fit on chip."""
    width = max(_ONE_READ_MIN, triton.next_power_of_2(n_vocab))
    return width if width <= ONE_READ_MAX.get(capability, min(ONE_READ_MAX.values())) else None


def capability_of(device):
    """Compute capability as one number (90 for sm_90), None off CUDA."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _interpreter_config(n_vocab):
    """Under the interpreter the cost is per program and per loop step, not per byte: tiles of
    several rows, the same choice of path as on a GPU (with the smallest on-chip limit)."""
    width = one_read_width(n_vocab)
    block = width or INTERPRETER_LAUNCH["stream_block"]
    rows = min(16, max(1, 65536 // block))
    return triton.Config(dict(ONE_READ=width is not None, ROWS=rows, BLOCK_V=block, PER_SM=0, STAGES=2))


def choose_loss_configs(n_vocab, capability):
    """The configs `_pt_loss_kernel` may take for rows of n_vocab logits on this GPU: the one-read
    config of their width if they fit on chip, else the streamed ones (triton.autotune times those)."""
    if _INTERPRETED:
        return [_interpreter_config(n_vocab)]
    width = one_read_width(n_vocab, capability)
    held = [c for c in LOSS_CONFIGS if c.kwargs["ONE_READ"] and c.kwargs["BLOCK_V"] == width]
    return held or [c for c in LOSS_CONFIGS if not c.kwargs["ONE_READ"]]


def _prune_loss_configs(configs, named_args, **kwargs):
    """triton.autotune's hook: `choose_loss_configs` for this launch's V and GPU."""
    return choose_loss_configs(named_args["n_vocab"], capability_of(named_args["logits_ptr"].device))


@functools.lru_cache
def _device_caps(index):
    """(SM count, L2 bytes) of a CUDA device."""
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, props.L2_cache_size


def device_caps(device):
    """(SM count, L2 bytes) of a CUDA device; None elsewhere."""
    if device.type != "cuda":
        return None
    return _device_caps(device.index if device.index is not None else torch.cuda.current_device())


def grid_size(n_tiles, meta, caps, row_bytes=None):
    """Programs to launch for n_tiles tiles of meta["ROWS"] rows, on a GPU of caps = (SMs, L2 bytes).

    PER_SM = 0: one program per tile. Else persistent: no more programs than the SMs hold at
    once (SMs x PER_SM), and, given row_bytes (the streamed forward that writes the gradient,
    whose pass 2 re-reads each row from L2), no more rows in flight than fit in _L2_SHARE of L2.
    A forward without gradient reads each row once and gets the full grid: on an H100 at
    V = 128256 that is 132 programs where the L2 cap would leave 102 (and 30 SMs idle).
    caps None (no GPU): one program per tile, capped by INTERPRETER_LAUNCH["max_programs"].
    """
    if caps is None:
        cap = INTERPRETER_LAUNCH["max_programs"] if _INTERPRETED else None
        return max(1, min(n_tiles, cap or n_tiles))
    if meta["PER_SM"] == 0:
        return n_tiles
    sms, l2_bytes = caps
    programs = min(n_tiles, sms * meta["PER_SM"])
    if row_bytes is not None:
        programs = min(programs, int(l2_bytes * _L2_SHARE) // (meta["ROWS"] * row_bytes))
    return max(1, programs)


# -----------------------------------------------------------------------------
# 2. Triton helpers: numerics and the pieces of a row


@triton.jit
def _log1p(x):
    """log(1 + x) to full fp32 precision for small x (log(1 + x) alone loses it when p ~ 1)."""
    u = 1.0 + x
    # log(u) * x / (u - 1) cancels the rounding of 1 + x (Goldberg's trick)
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _softplus(x):
    """log(1 + e^x) without overflow, and exact to fp32 precision when it is tiny."""
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _cast_for(x, ptr):
    """fp32 x in the element type of ptr, rounded to nearest even (see _ROUND_BY_HAND)."""
    out = x.to(ptr.dtype.element_ty)
    if _ROUND_BY_HAND and ptr.dtype.element_ty == tl.bfloat16:  # both known at compile time
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return out


@triton.jit
def _row_start(rows, seq_len, stride_seq, stride_row):
    """Offset of each row: (r // seq_len) * stride_seq + (r % seq_len) * stride_row, so (N, V) and
    sliced (B, T, V) tensors alike are read in place. Row numbers divide in int32 (cheap), offsets
    are int64: N * V passes 2^31 at real sizes."""
    return (rows // seq_len).to(tl.int64) * stride_seq + (rows % seq_len).to(tl.int64) * stride_row


@triton.jit
def _lse_from(m_ex, d_ex):
    """(lse_ex, has_ex) from the competitors' max and sum of exp(z_j - max); lse_ex is -inf
    (and has_ex False) in a row with no finite competitor."""
    has_ex = d_ex > 0.0
    return tl.where(has_ex, m_ex + tl.log(tl.where(has_ex, d_ex, 1.0)), float("-inf")), has_ex


@triton.jit
def _grad_tile(z, cols, y, c, coef, g_y):
    """One tile of the gradient: coef * exp(z_j - c) per row, the target column replaced by g_y."""
    # z_j - c <= 0 for every j != y; the clamp only keeps the (replaced) target column finite
    g = coef[:, None] * tl.exp(tl.minimum(z - c[:, None], 0.0))
    return tl.where(cols[None, :] == y[:, None], g_y[:, None], g)


@triton.jit
def _row_results(logits_ptr, row_start, rows, in_batch, y, is_ut, active, lse_ex, has_ex, n_vocab, loss_ptr, stats_ptr):
    """Each row's loss, and its gradient's (c, coef, g_y), unweighted; both stored, the latter returned."""
    # The target column, read on its own in fp32. A target outside [0, V) gives NaN, not a
    # read out of bounds (checking on the host would need a sync).
    y_ok = active & (y >= 0) & (y < n_vocab)
    z_y = tl.load(logits_ptr + row_start + y, mask=y_ok, other=0.0).to(tl.float32)
    z_y = tl.where(y_ok | ~active, z_y, float("nan"))
    a = tl.where(active, lse_ex - z_y, 0.0)  # log((1 - p_y) / p_y)
    mle_loss = _softplus(a)  # -log p_y
    ut_loss = _softplus(-a)  # -log(1 - p_y)
    tl.store(loss_ptr + rows, tl.where(active, tl.where(is_ut, ut_loss, mle_loss), 0.0), mask=in_batch)

    p_y = tl.exp(-mle_loss)
    q_y = tl.exp(-ut_loss)  # 1 - p_y, without computing 1 - p_y
    lse = tl.maximum(z_y, lse_ex) + _softplus(-tl.abs(a))  # finite unless the whole row is -inf
    c = tl.where(active & has_ex, tl.where(is_ut, lse_ex, lse), 0.0)
    coef = tl.where(active, tl.where(is_ut, -p_y, 1.0), 0.0)
    g_y = tl.where(active, tl.where(is_ut, p_y, -q_y), 0.0)
    tl.store(stats_ptr + rows * 3, c, mask=in_batch)
    tl.store(stats_ptr + rows * 3 + 1, coef, mask=in_batch)
    tl.store(stats_ptr + rows * 3 + 2, g_y, mask=in_batch)
    return c, coef, g_y


# -----------------------------------------------------------------------------
# 3. The forward kernel: loss, stats and (for grad_output = 1) the gradient, by tiles of rows


@triton.jit
def _load_logits(ptrs, mask, WRITE_GRAD: tl.constexpr, HINT: tl.constexpr):
    """Logits at ptrs (-inf where masked). Only a pass that writes the gradient steers L2 (HINT:
    evict_first for lines read for the last time, evict_last for rows pass 2 reads again); a
    forward without gradient reads every line once and leaves L2 to the hardware."""
    if WRITE_GRAD:
        z = tl.load(ptrs, mask=mask, other=float("-inf"), eviction_policy=HINT)
    else:
        z = tl.load(ptrs, mask=mask, other=float("-inf"))
    return z


@triton.jit
def _held_row_pass(
    logits_ptr, grad_ptr, weights_ptr, loss_ptr, stats_ptr, rows, in_batch, y, is_ut, active,
    row_start, grad_start, n_vocab, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """One read: the whole row in registers; its exponentials, rescaled, are the gradient."""
    cols = tl.arange(0, BLOCK_V)
    in_vocab = cols[None, :] < n_vocab
    ptrs = logits_ptr + row_start[:, None] + cols[None, :]
    z = _load_logits(ptrs, active[:, None] & in_vocab, WRITE_GRAD, "evict_first")
    # (The target is dropped after the load: a mask that varies inside a vector of columns
    # would stop the loads from being vectorised.)
    z_ex = tl.where(cols[None, :] == y[:, None], float("-inf"), z.to(tl.float32))  # (ROWS, BLOCK_V)
    m_ex = tl.maximum(tl.max(z_ex, axis=1), -1.0e30)  # finite, so that exp(-inf - m_ex) is 0, never NaN
    e = tl.exp(z_ex - m_ex[:, None])  # exp(z_j - m_ex), 0 at the target and past the row
    lse_ex, has_ex = _lse_from(m_ex, tl.sum(e, axis=1))
    c, coef, g_y = _row_results(
        logits_ptr, row_start, rows, in_batch, y, is_ut, active, lse_ex, has_ex, n_vocab, loss_ptr, stats_ptr
    )
    if WRITE_GRAD:
        w = tl.load(weights_ptr + rows, mask=in_batch, other=0.0)
        # coef * exp(z_j - c) = e_j * coef * exp(m_ex - c), with m_ex <= c: no second exponential per element
        g = e * (w * coef * tl.exp(m_ex - c))[:, None]
        g = tl.where(cols[None, :] == y[:, None], (w * g_y)[:, None], g)
        tl.store(
            grad_ptr + grad_start[:, None] + cols[None, :],
            _cast_for(g, grad_ptr),
            mask=in_batch[:, None] & in_vocab,
            eviction_policy="evict_first",
        )


@triton.jit
def _lse_streamed(
    logits_ptr, row_start, y, active, n_vocab,
    WRITE_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Pass 1 over a row too wide to hold: lse_ex = log sum_{j != y} exp(z_j), BLOCK_V columns a step.

    Each lane (column position k of the block) keeps its own running max m_k and sum
    d_k = sum exp(z_j - m_k) over the columns j = k, k + BLOCK_V, k + 2·BLOCK_V, ... it has seen.
    A step is elementwise: with t = exp(-|z - m_k|),

        z > m_k:   d_k <- d_k · t + 1,  m_k <- z       (the old terms rescaled to the new max)
        else:      d_k <- d_k + t                      (one exponential per element either way)

    and the row is reduced once, after the last step: M = max_k m_k, D = sum_k d_k · exp(m_k - M),
    lse_ex = M + log D. Arithmetic at V = 128256, bf16, BLOCK_V = 8192 (16 warps, 16 values per
    thread): 16 steps of 16 KB. A reduction across the block is a warp shuffle tree, a store to
    shared memory, a barrier, a second tree and another barrier: 2 barriers. Reducing max and sum
    at every step cost 4 barriers a step, 64 a row, and each step's load waited for the last
    step's reductions, so a program had 16 KB in flight at a time: ~16 KB per ~1 µs of DRAM
    latency, 1.6 TB/s for 102 programs, a third of an H200. Now the loop has no barrier (4 a
    row, at the end) and `tl.range(num_stages=STAGES)` issues the loads of the next STAGES - 1
    blocks (through shared memory, cp.async) while one is reduced: with STAGES = 3, 32 KB in
    flight per program, ~3.3 TB/s for 102 programs at the same latency, ~4.5 TB/s for 132
    (a forward without gradient, whose grid is not capped by L2). The cost: m and d in
    registers, 2 x 16 fp32 values per thread here.
    Loads keep their lines in L2 (evict_last) for pass 2 when the gradient follows.
    """
    cols0 = tl.arange(0, BLOCK_V)
    m = tl.full([ROWS, BLOCK_V], -1.0e30, tl.float32)  # starts finite: exp(-inf - m) is 0, never NaN
    d = tl.zeros([ROWS, BLOCK_V], tl.float32)
    for v0 in tl.range(0, n_vocab, BLOCK_V, num_stages=STAGES):
        cols = v0 + cols0
        mask = active[:, None] & (cols[None, :] < n_vocab)
        z = _load_logits(logits_ptr + row_start[:, None] + cols[None, :], mask, WRITE_GRAD, "evict_last")
        z = tl.where(cols[None, :] == y[:, None], float("-inf"), z.to(tl.float32))  # (ROWS, BLOCK_V)
        t = tl.exp(-tl.abs(z - m))  # 0 for z = -inf (masked, the target, past the row)
        d = tl.where(z > m, d * t + 1.0, d + t)
        m = tl.maximum(m, z)
    m_ex = tl.max(m, axis=1)  # >= -1e30
    d_ex = tl.sum(d * tl.exp(m - m_ex[:, None]), axis=1)
    return _lse_from(m_ex, d_ex)


@triton.jit
def _write_grad_blocks(
    logits_ptr, grad_ptr, row_start, grad_start, y, read, write, c, coef, g_y, n_cols, n_blocks,
    BLOCK_V: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Write coef * exp(z_j - c) (g_y at the target) over the first n_blocks blocks of n_cols
    columns, last block first, the next block's read in flight while one is written (STAGES).
    Rows not `read` load nothing (ignored rows: zeros are written)."""
    cols0 = tl.arange(0, BLOCK_V)
    for b in tl.range(0, n_blocks, num_stages=STAGES):
        cols = (n_blocks - 1 - b) * BLOCK_V + cols0
        in_cols = cols[None, :] < n_cols
        z = tl.load(
            logits_ptr + row_start[:, None] + cols[None, :],
            mask=read[:, None] & in_cols,
            other=float("-inf"),
            eviction_policy="evict_first",
        )
        g = _grad_tile(z.to(tl.float32), cols, y, c, coef, g_y)  # (ROWS, BLOCK_V)
        tl.store(
            grad_ptr + grad_start[:, None] + cols[None, :],
            _cast_for(g, grad_ptr),
            mask=write[:, None] & in_cols,
            eviction_policy="evict_first",
        )


# Autotuned per (V, WRITE_GRAD, dtypes): with and without the gradient the kernel is a different
# program (a second pass, other eviction hints, another grid), so each variant is timed for itself.
@triton.autotune(
    configs=LOSS_CONFIGS,
    key=["n_vocab", "WRITE_GRAD"],
    prune_configs_by={"early_config_prune": _prune_loss_configs},
)
@triton.jit
def _pt_loss_kernel(
    logits_ptr, grad_ptr, targets_ptr, is_ut_ptr, weights_ptr, loss_ptr, stats_ptr,
    n_rows, n_vocab, ignore_index, seq_len, stride_seq, stride_row, grad_stride_seq, grad_stride_row,
    WRITE_GRAD: tl.constexpr, ONE_READ: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
    PER_SM: tl.constexpr,  # read by the launcher's grid (`grid_size`), not here
    STAGES: tl.constexpr,
):  # fmt: skip
    """Loss and stats of every row and, with WRITE_GRAD, its gradient weighted by the row's
    token weight. Each program takes tiles of ROWS rows in turn (a persistent grid)."""
    for tile in range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        # 1. The tile's rows: targets, roles, where they start
        rows = tile * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        in_batch = rows < n_rows
        y = tl.load(targets_ptr + rows, mask=in_batch, other=ignore_index).to(tl.int64)
        is_ut = tl.load(is_ut_ptr + rows, mask=in_batch, other=0) != 0
        active = in_batch & (y != ignore_index)
        row_start = _row_start(rows, seq_len, stride_seq, stride_row)
        grad_start = _row_start(rows, seq_len, grad_stride_seq, grad_stride_row)
        if ONE_READ:
            # 2a. Rows that fit on chip: one read, one write
            _held_row_pass(
                logits_ptr, grad_ptr, weights_ptr, loss_ptr, stats_ptr, rows, in_batch, y, is_ut, active,
                row_start, grad_start, n_vocab, WRITE_GRAD, BLOCK_V,
            )  # fmt: skip
        else:
            # 2b. Wider rows: lse_ex in pass 1, the gradient in pass 2 (from L2, if the grid allows)
            lse_ex, has_ex = _lse_streamed(logits_ptr, row_start, y, active, n_vocab, WRITE_GRAD, ROWS, BLOCK_V, STAGES)
            c, coef, g_y = _row_results(
                logits_ptr, row_start, rows, in_batch, y, is_ut, active, lse_ex, has_ex, n_vocab, loss_ptr, stats_ptr
            )
            if WRITE_GRAD:
                w = tl.load(weights_ptr + rows, mask=in_batch, other=0.0)
                n_blocks = tl.cdiv(n_vocab, BLOCK_V)
                _write_grad_blocks(
                    logits_ptr, grad_ptr, row_start, grad_start, y, active, in_batch, c, w * coef, w * g_y,
                    n_vocab, n_blocks, BLOCK_V, STAGES,
                )  # fmt: skip


# -----------------------------------------------------------------------------
# 4. The backward kernel: the gradient from the stats, with grad_output folded in


@triton.jit
def _pt_grad_kernel(
    logits_ptr,
    grad_ptr,
    targets_ptr,
    stats_ptr,
    weights_ptr,
    go_ptr,
    go_stride,
    n_rows,
    n_cols,
    col0,
    seq_len,
    stride_seq,
    stride_row,
    grad_stride_seq,
    grad_stride_row,
    SKIP_UNIT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    PER_SM: tl.constexpr,  # read by the launcher's grid (`grid_size`), not here
    STAGES: tl.constexpr,
):
    """Write the gradient of columns [col0, col0 + n_cols) of every row, weighted by
    w * grad_output (go_stride 0: one scalar grad_output). With SKIP_UNIT, rows whose
    grad_output is exactly 1 are left alone: the forward pass already wrote them."""
    n_tiles = tl.cdiv(n_rows, ROWS)
    if SKIP_UNIT:
        # a scalar grad_output of exactly 1 (loss.backward()): every program ends here
        n_tiles = tl.where((go_stride == 0) & (tl.load(go_ptr) == 1.0), 0, n_tiles)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        rows = tile * ROWS + tl.arange(0, ROWS)
        in_batch = rows < n_rows
        go = tl.load(go_ptr + rows * go_stride, mask=in_batch, other=1.0).to(tl.float32)
        n_blocks = tl.cdiv(n_cols, BLOCK_V)
        if SKIP_UNIT:
            n_blocks = tl.where(tl.max((go != 1.0).to(tl.int32), axis=0) > 0, n_blocks, 0)
        w = tl.load(weights_ptr + rows, mask=in_batch, other=0.0) * go
        y = tl.load(targets_ptr + rows, mask=in_batch, other=-1).to(tl.int64) - col0  # target column in the block
        c = tl.load(stats_ptr + rows * 3, mask=in_batch, other=0.0)
        coef = tl.load(stats_ptr + rows * 3 + 1, mask=in_batch, other=0.0)
        g_y = tl.load(stats_ptr + rows * 3 + 2, mask=in_batch, other=0.0)
        row_start = _row_start(rows, seq_len, stride_seq, stride_row)
        grad_start = _row_start(rows, seq_len, grad_stride_seq, grad_stride_row)
        live = in_batch & (w * coef != 0.0)  # ignored rows: write zeros, read nothing
        _write_grad_blocks(
            logits_ptr, grad_ptr, row_start, grad_start, y, live, in_batch, c, w * coef, w * g_y,
            n_cols, n_blocks, BLOCK_V, STAGES,
        )  # fmt: skip


# -----------------------------------------------------------------------------
# 5. Launching the kernels


def _uses_triton(x):
    """Triton on CUDA, and on CPU when the kernels were defined under the interpreter."""
    return x.is_cuda or (x.device.type == "cpu" and _INTERPRETED)


def _row_layout(x):
    """(seq_len, stride_seq, stride_row) locating the rows of a (N, V) or (B, T, V) tensor."""
    if x.dim() == 2:
        return 1, x.stride(0), 0
    return x.shape[1], x.stride(0), x.stride(1)


def loss_kernel_args(logits, targets, is_ut, ignore_index, stats, weights, grad, token_loss):
    """The positional arguments of `_pt_loss_kernel` and its WRITE_GRAD, as the launcher passes them
    (kernels.compile_check builds the same from tensors on the meta device)."""
    out = grad if grad is not None else logits  # never written without WRITE_GRAD
    args = (logits, out, targets, is_ut.view(torch.int8), weights if weights is not None else token_loss)
    args += (token_loss, stats, targets.numel(), logits.shape[-1], ignore_index)
    return args + _row_layout(logits) + _row_layout(out)[1:], dict(WRITE_GRAD=grad is not None)


def grad_kernel_args(logits, col0, targets, stats, weights, grad_output, grad, skip_unit):
    """The positional arguments of `_pt_grad_kernel` and its SKIP_UNIT, as the launcher passes them."""
    go = grad_output.reshape(-1)
    go_stride = go.stride(0) if go.numel() > 1 else 0
    args = (logits, grad, targets, stats, weights, go, go_stride, targets.numel(), logits.shape[-1], col0)
    return args + _row_layout(logits) + _row_layout(grad)[1:], dict(SKIP_UNIT=skip_unit)


def grad_launch(elem_size):
    """`_pt_grad_kernel`'s (ROWS, BLOCK_V, num_warps, PER_SM, STAGES) for logits of this element size."""
    if _INTERPRETED:
        return dict(ROWS=16, BLOCK_V=1024, num_warps=4, PER_SM=0, STAGES=2)
    return GRAD_LAUNCH[min(elem_size, 4)]


def _token_losses_triton(logits, targets, is_ut, ignore_index, stats, weights, grad):
    """Per-token loss (fp32, (N,)) from `_pt_loss_kernel`; fills `stats`, and `grad` when given."""
    n_rows, row_bytes = targets.numel(), logits.shape[-1] * logits.element_size()
    token_loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return token_loss
    args, flags = loss_kernel_args(logits, targets, is_ut, ignore_index, stats, weights, grad, token_loss)
    caps, l2_bound = device_caps(logits.device), row_bytes if grad is not None else None
    grid = lambda meta: (grid_size(triton.cdiv(n_rows, meta["ROWS"]), meta, caps, l2_bound),)
    _pt_loss_kernel[grid](*args, **flags)
    return token_loss


def _grads_from_stats_triton(logits, col0, targets, stats, weights, grad_output, grad, skip_unit):
    """`_pt_grad_kernel` over the rows of logits, whose first column is vocabulary id col0."""
    n_rows = targets.numel()
    if n_rows == 0:
        return
    launch = grad_launch(logits.element_size())
    args, flags = grad_kernel_args(logits, col0, targets, stats, weights, grad_output, grad, skip_unit)
    grid = (grid_size(triton.cdiv(n_rows, launch["ROWS"]), launch, device_caps(logits.device)),)
    _pt_grad_kernel[grid](*args, **flags, **launch)


# -----------------------------------------------------------------------------
# 6. The same math in chunked PyTorch, for machines with neither CUDA nor the interpreter

_TORCH_CHUNK_ELEMENTS = 1 << 23  # 8M logits per chunk: a few fp32 temporaries of 32 MB each


def _row_chunks(x, rows):
    """(first_row, view) pairs covering the rows of a (N, V) or (B, T, V) tensor, `rows` at a time."""
    if x.dim() == 2:
        for start in range(0, x.shape[0], rows):
            yield start, x[start : start + rows]
        return
    for b in range(x.shape[0]):
        for t in range(0, x.shape[1], rows):
            yield b * x.shape[1] + t, x[b, t : t + rows]


def _softplus_torch(x):
    """log(1 + e^x) without overflow, and exact when it is tiny (as the kernel's)."""
    return x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))


def _token_losses_torch(logits, targets, is_ut, ignore_index, stats, weights, grad):
    """What `_token_losses_triton` computes, a chunk of rows at a time with PyTorch ops."""
    n_vocab = logits.shape[-1]
    token_loss = torch.empty(targets.numel(), dtype=torch.float32, device=logits.device)
    rows = max(1, _TORCH_CHUNK_ELEMENTS // n_vocab)
    grad_chunks = _row_chunks(grad, rows) if grad is not None else None
    for start, z in _row_chunks(logits, rows):
        span = slice(start, start + z.shape[0])
        y, ut = targets[span], is_ut[span]
        active = y != ignore_index
        y_ok = active & (y >= 0) & (y < n_vocab)
        y_col = torch.where(y_ok, y, 0)[:, None]  # (n, 1)
        z_y = z.gather(1, y_col)[:, 0].float()
        z_y = torch.where(y_ok | ~active, z_y, float("nan"))
        z_ex = z.to(torch.float32, copy=True).scatter_(1, y_col, float("-inf"))  # (n, V) competitors only
        m_ex = z_ex.amax(dim=1).clamp(min=-1e30)  # (n,)
        e = z_ex.sub_(m_ex[:, None]).exp_()  # exp(z_j - m_ex), 0 at y
        d_ex = e.sum(dim=1)
        has_ex = d_ex > 0
        lse_ex = torch.where(has_ex, m_ex + torch.log(d_ex), float("-inf"))
        a = torch.where(active, lse_ex - z_y, 0.0)
        mle_loss, ut_loss = _softplus_torch(a), _softplus_torch(-a)
        token_loss[span] = torch.where(active, torch.where(ut, ut_loss, mle_loss), 0.0)

        p_y, q_y = torch.exp(-mle_loss), torch.exp(-ut_loss)
        lse = torch.maximum(z_y, lse_ex) + _softplus_torch(-a.abs())
        c = torch.where(active & has_ex, torch.where(ut, lse_ex, lse), 0.0)
        coef = torch.where(active, torch.where(ut, -p_y, 1.0), 0.0)
        g_y = torch.where(active, torch.where(ut, p_y, -q_y), 0.0)
        stats[span] = torch.stack([c, coef, g_y], dim=1)
        if grad is not None:
            w = weights[span]
            # e holds exp(z_j - m_ex): rescale each row to w * coef * exp(z_j - c)
            g = e.mul_((w * coef * torch.exp(m_ex - c))[:, None]).scatter_(1, y_col, (w * g_y)[:, None])
            g.masked_fill_(~active[:, None], 0.0)  # ignored rows: exactly 0
            next(grad_chunks)[1].copy_(g)
    return token_loss


def _grads_from_stats_torch(logits, col0, targets, stats, weights, grad_output, grad, skip_unit):
    """What `_grads_from_stats_triton` computes, a chunk of rows at a time with PyTorch ops
    (on the CPU, where asking whether grad_output is all ones costs no sync)."""
    go = grad_output.reshape(-1).float().expand(targets.numel())
    if skip_unit and bool((go == 1).all()):
        return
    n_cols = logits.shape[-1]
    rows = max(1, _TORCH_CHUNK_ELEMENTS // n_cols)
    grad_chunks = _row_chunks(grad, rows)
    for start, z in _row_chunks(logits, rows):
        span = slice(start, start + z.shape[0])
        c, coef, g_y = stats[span].unbind(1)
        w = weights[span] * go[span]
        g = z.to(torch.float32, copy=True).sub_(c[:, None]).clamp_(max=0.0).exp_()
        g.mul_((w * coef)[:, None])  # (n, n_cols)
        y = targets[span] - col0  # the target's column in this block
        in_block = (y >= 0) & (y < n_cols)
        y_col = torch.where(in_block, y, 0)[:, None]
        g.scatter_(1, y_col, torch.where(in_block, w * g_y, g.gather(1, y_col)[:, 0])[:, None])
        next(grad_chunks)[1].copy_(g)


# -----------------------------------------------------------------------------
# 7. The two entry points fused_linear.py and pt_loss share


def token_losses(logits, targets, is_ut, ignore_index, stats, weights=None, grad=None):
    """Per-token loss, fp32 (N,): -log p on MLE rows, -log(1 - p) on UT rows, 0 on ignored rows.

    targets (N,) int64 and is_ut (N,) bool, contiguous; stats (N, 3) fp32 receives each row's
    unweighted gradient coefficients, from which `grads_from_stats` rebuilds the gradient of
    any block of columns later. With `grad` (shaped like logits), also writes
    weights[i] * d loss_i / d logits[i] into it: the gradient for grad_output = 1.
    """
    if _uses_triton(logits):
        return _token_losses_triton(logits, targets, is_ut, ignore_index, stats, weights, grad)
    return _token_losses_torch(logits, targets, is_ut, ignore_index, stats, weights, grad)


def grads_from_stats(logits, col0, targets, stats, weights, grad_output, grad, skip_unit=False):
    """Write into grad the gradient of logits ((N, n) or (B, T, n), vocabulary columns col0
    onwards), weighted by weights * grad_output (a scalar or one per row), from `stats` of
    `token_losses` on the full rows. logits and grad may be the same tensor. With skip_unit,
    rows whose grad_output is exactly 1 are left as they are.
    """
    if _uses_triton(logits):
        return _grads_from_stats_triton(logits, col0, targets, stats, weights, grad_output, grad, skip_unit)
    return _grads_from_stats_torch(logits, col0, targets, stats, weights, grad_output, grad, skip_unit)


# -----------------------------------------------------------------------------
# 8. The logits API: pt_loss and its autograd function


class _PTLoss(torch.autograd.Function):
    """Forward: loss, stats and the gradient for grad_output = 1 (unless inplace).
    Backward: grad_output applied before rounding, by `grads_from_stats`."""

    @staticmethod
    def forward(ctx, logits, targets, is_ut, weights, ignore_index, reduction, inplace, want_grad):
        stats = torch.empty(targets.numel(), 3, dtype=torch.float32, device=logits.device)  # (c, coef, g_y)
        grad = None
        if want_grad and not inplace:
            grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        token_loss = token_losses(logits, targets, is_ut, ignore_index, stats, weights, grad)
        if want_grad and inplace:
            # backward writes the gradient over the logits: make autograd refuse any other
            # backward that still needs their values
            torch.autograd.graph.increment_version(logits)
        ctx.save_for_backward(logits, targets, weights, stats)
        ctx.grad, ctx.inplace, ctx.backward_done = grad, inplace, False
        ctx.mark_non_differentiable(token_loss)
        weighted = weights * token_loss  # (N,) fp32
        loss = weighted if reduction == "none" else weighted.sum()
        return loss, token_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_token_loss):
        if ctx.inplace and ctx.backward_done:
            raise RuntimeError(
                "pt_loss(inplace=True) writes its gradient over the logits and can be backpropagated "
                "once; compute the loss again for another backward"
            )
        logits, targets, weights, stats = ctx.saved_tensors
        grad, skip_unit = ctx.grad, True  # rows with grad_output 1 are already written
        if ctx.inplace:
            grad, skip_unit = logits, False
        elif grad is None:  # a second backward: the first one's buffer belongs to autograd now
            grad, skip_unit = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device), False
        grads_from_stats(logits, 0, targets, stats, weights, grad_loss, grad, skip_unit)
        ctx.grad, ctx.backward_done = None, True
        return grad, None, None, None, None, None, None, None


def pt_loss(
    logits, targets, ut_mask, alpha=1.0, ignore_index=-100, reduction="mean", inplace=False, return_parts=False
):
    """The PT-ALIGN loss from logits, fused: loss and gradient from one read of the logits.

    logits (N, V) or (B, T, V), bf16 / fp16 / fp32, any row stride (the vocabulary dim must be
    contiguous); targets int64 or int32 and ut_mask bool, one per row, any strides
    (ignore_index = ignored, ut_mask True = unlikelihood token, else MLE). Returns an fp32
    loss: "mean" is sum_MLE(-log p) / max(n_mle, 1) + alpha * sum_UT(-log(1 - p)) / max(n_ut, 1),
    "sum" drops the two denominators, "none" gives the per-token terms of "sum", shaped like targets.

    The gradient is written in forward for grad_output = 1 and rewritten in backward, rounded
    once, for any other grad_output; the logits are kept until backward for that.
    inplace=True writes the gradient over `logits` in backward instead (no second N x V
    buffer, one more read; backward then runs once): use it only when nothing else needs
    the logits afterwards, autograd raises if something does.
    return_parts=True returns (loss, LossParts) with the MLE and UT means for logging.
    """
    check_loss_args(logits, targets, ut_mask, alpha, ignore_index, reduction)
    if logits.stride(-1) != 1:
        raise ValueError(
            f"logits must be contiguous along the vocabulary (last) dim, got strides {tuple(logits.stride())}"
        )
    token_shape = targets.shape
    # one entry per row, contiguous: a copy of N numbers at most, never of the logits
    targets, is_ut = targets.reshape(-1).long().contiguous(), ut_mask.reshape(-1).contiguous()
    weights = token_weights(targets, is_ut, alpha, ignore_index, reduction)
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, token_loss = _PTLoss.apply(logits, targets, is_ut, weights, ignore_index, reduction, inplace, want_grad)
    if reduction == "none":
        loss = loss.view(token_shape)
    if return_parts:
        return loss, loss_parts(token_loss, targets, is_ut, ignore_index)
    return loss
