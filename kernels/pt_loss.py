"""
The fused PT-ALIGN loss over logits: one Triton kernel for loss and gradient together.

For a row with logits z (V values) and target y, everything follows from the target's
logit z_y and the log-sum-exp of its competitors:

    lse_ex = log sum_{j != y} exp(z_j)     summed over j != y directly, never as "all minus y"
    a      = lse_ex - z_y                  the log-odds against the target: log((1 - p_y) / p_y)

    MLE token   loss = -log p_y       = softplus(a)      grad g_j = exp(z_j - lse),         g_y = -(1 - p_y)
    UT  token   loss = -log(1 - p_y)  = softplus(-a)     grad g_j = -p_y exp(z_j - lse_ex), g_y = p_y

with lse = z_y + softplus(a) the log-sum-exp of the whole row, p_y = exp(-MLE loss) and
1 - p_y = exp(-UT loss). Nothing ever forms 1 - p, so losses and gradients keep full fp32
accuracy however sure the model is.

The sum behind lse_ex is taken relative to its own running max, the max over j != y, so it
is at least 1 and cannot underflow: it needs no floor. (Relative to the row max it would
underflow once the target leads the others by ~100 nats, and a floor there turns the loss
into one whose gradient vanishes on exactly the harmful tokens the model is surest of.) It is
0 only in a row with no finite competitor (V = 1, or all others masked to -inf), where
1 - p is exactly 0: the UT loss is +inf and its gradient g_y = p_y = 1, finite.

The gradient is one formula, coef * exp(z_j - c) with per-row c and coef, plus the target
column computed apart in fp32; each row is scaled by its token's weight from the reduction
(reference.token_weights). The kernel writes the gradient in the forward pass, so backward
only applies grad_output, and skips even that where grad_output is exactly 1. It can instead
store (c, coef, g_y) per row, from which `_pt_grad_kernel` rebuilds any block of columns'
gradient later: that is how fused_linear.py walks the vocabulary in backward.

Bytes moved on a GPU (2-byte logits): pass 1 reads the row for lse_ex, pass 2 reads it again
and writes the gradient: 6·N·V bytes from DRAM at worst, against the 4·N·V floor of "read
once, write once". Pass 2 walks the row backwards, so its first blocks are the ones pass 1
read last, which L2 may still hold. Reading the row only once needs the whole row on chip
(256 KB for V = 128256 in bf16: more than one SM has) or a row split across programs that
exchange (max, sum) mid-kernel, which needs every program resident at once; that is left
for a version tuned on hardware. Without gradients (eval) the kernel reads once: 2·N·V.

Without CUDA the same math runs as the Triton kernel under TRITON_INTERPRET=1 (tests), or
otherwise as chunked PyTorch (`_token_losses_torch`), which gives the same results.

Who uses what:

    training (fused_linear.py)  `token_losses` with stats in forward, `grads_from_stats` in
                                backward (`_pt_loss_kernel` with WRITE_STATS, `_pt_grad_kernel`)
    logits API (`pt_loss`)      `_PTLoss`: `token_losses` with grad in forward (WRITE_GRAD),
                                `scale_rows_` in backward (`_scale_rows_kernel`)
"""

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
# The Triton kernels: `_pt_loss_kernel` serves both paths, `_pt_grad_kernel` training,
# `_scale_rows_kernel` the logits API


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
def _grad_tile(z, cols, y, c, coef, g_y):
    """One tile of the gradient: coef * exp(z_j - c) per row, the target column replaced by g_y."""
    # z_j - c <= 0 for every j != y; the clamp only keeps the (replaced) target column finite
    g = coef[:, None] * tl.exp(tl.minimum(z - c[:, None], 0.0))
    return tl.where(cols[None, :] == y[:, None], g_y[:, None], g)


@triton.jit
def _lse_competitors(logits_ptr, row_start, y, active, n_vocab, ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 1 over the vocabulary: per row, lse_ex = log sum_{j != y} exp(z_j) in fp32 and
    has_ex, whether any competitor is finite (lse_ex is -inf where none is)."""
    cols0 = tl.arange(0, BLOCK_V)
    # Online max and sum of the competitors j != y, in fp32. Ignored rows load nothing.
    # m_ex starts finite so that exp(-inf - m_ex) is 0, never NaN.
    m_ex = tl.full([ROWS], -1.0e30, tl.float32)
    d_ex = tl.zeros([ROWS], tl.float32)  # sum_{j != y} exp(z_j - m_ex)
    # (The target is dropped after the load: a mask that varies inside a vector of columns
    # would stop the loads from being vectorised.)
    for v0 in range(0, n_vocab, BLOCK_V):
        cols = v0 + cols0
        mask = active[:, None] & (cols[None, :] < n_vocab)
        z = tl.load(logits_ptr + row_start[:, None] + cols[None, :], mask=mask, other=float("-inf"))
        z = tl.where(cols[None, :] == y[:, None], float("-inf"), z.to(tl.float32))  # (ROWS, BLOCK_V)
        m_new = tl.maximum(m_ex, tl.max(z, axis=1))
        d_ex = d_ex * tl.exp(m_ex - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_ex = m_new
    has_ex = d_ex > 0.0  # False: no finite competitor
    lse_ex = tl.where(has_ex, m_ex + tl.log(tl.where(has_ex, d_ex, 1.0)), float("-inf"))
    return lse_ex, has_ex


@triton.jit
def _store_grad_rows(
    logits_ptr, grad_ptr, row_start, grad_start, y, active, in_batch, c, coef, g_y, w, n_vocab, BLOCK_V: tl.constexpr
):
    """Pass 2: write each row's gradient w * coef * exp(z_j - c), w * g_y at the target.
    Every row is written, ignored ones with zeros. Walked backwards: what pass 1 read last
    comes first."""
    cols0 = tl.arange(0, BLOCK_V)
    n_blocks = tl.cdiv(n_vocab, BLOCK_V)
    for b in range(0, n_blocks):
        cols = (n_blocks - 1 - b) * BLOCK_V + cols0
        in_vocab = cols[None, :] < n_vocab
        z = tl.load(
            logits_ptr + row_start[:, None] + cols[None, :], mask=active[:, None] & in_vocab, other=float("-inf")
        )
        g = _grad_tile(z.to(tl.float32), cols, y, c, w * coef, w * g_y)  # (ROWS, BLOCK_V)
        mask = in_batch[:, None] & in_vocab
        tl.store(grad_ptr + grad_start[:, None] + cols[None, :], _cast_for(g, grad_ptr), mask=mask)


@triton.jit
def _pt_loss_kernel(
    logits_ptr,
    grad_ptr,
    targets_ptr,
    is_ut_ptr,
    weights_ptr,
    loss_ptr,
    stats_ptr,
    n_rows,
    n_vocab,
    ignore_index,
    # row r starts at (r // seq_len) * stride_seq + (r % seq_len) * stride_row: (N, V) and
    # sliced (B, T, V) logits alike, without a copy
    seq_len,
    stride_seq,
    stride_row,
    grad_stride_seq,
    grad_stride_row,
    WRITE_GRAD: tl.constexpr,
    WRITE_STATS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Loss of ROWS rows and, as asked, their weighted gradient (a second pass over the
    vocabulary) and their gradient coefficients (c, coef, g_y) for a later `_pt_grad_kernel`."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    in_batch = rows < n_rows
    y = tl.load(targets_ptr + rows, mask=in_batch, other=ignore_index).to(tl.int64)
    is_ut = tl.load(is_ut_ptr + rows, mask=in_batch, other=0) != 0
    active = in_batch & (y != ignore_index)
    rows64 = rows.to(tl.int64)  # N * V passes 2^31 at real sizes
    row_start = (rows64 // seq_len) * stride_seq + (rows64 % seq_len) * stride_row
    lse_ex, has_ex = _lse_competitors(logits_ptr, row_start, y, active, n_vocab, ROWS, BLOCK_V)

    # The target column, read on its own in fp32. A target outside [0, V) gives NaN, not a
    # read out of bounds (checking on the host would need a sync).
    y_ok = active & (y >= 0) & (y < n_vocab)
    z_y = tl.load(logits_ptr + row_start + y, mask=y_ok, other=0.0).to(tl.float32)
    z_y = tl.where(y_ok | ~active, z_y, float("nan"))
    a = tl.where(active, lse_ex - z_y, 0.0)  # log((1 - p_y) / p_y)
    mle_loss = _softplus(a)  # -log p_y
    ut_loss = _softplus(-a)  # -log(1 - p_y)
    loss = tl.where(active, tl.where(is_ut, ut_loss, mle_loss), 0.0)
    tl.store(loss_ptr + rows, loss, mask=in_batch)

    # The gradient, unweighted: g_j = coef * exp(z_j - c) for j != y, and g_y
    p_y = tl.exp(-mle_loss)
    q_y = tl.exp(-ut_loss)  # 1 - p_y, without computing 1 - p_y
    c = tl.where(is_ut, lse_ex, z_y + mle_loss)  # lse_ex, or lse = z_y - log p_y
    c = tl.where(active & has_ex, c, 0.0)
    coef = tl.where(active, tl.where(is_ut, -p_y, 1.0), 0.0)
    g_y = tl.where(active, tl.where(is_ut, p_y, -q_y), 0.0)
    if WRITE_STATS:
        tl.store(stats_ptr + rows * 3, c, mask=in_batch)
        tl.store(stats_ptr + rows * 3 + 1, coef, mask=in_batch)
        tl.store(stats_ptr + rows * 3 + 2, g_y, mask=in_batch)

    if WRITE_GRAD:
        w = tl.load(weights_ptr + rows, mask=in_batch, other=0.0)
        grad_start = (rows64 // seq_len) * grad_stride_seq + (rows64 % seq_len) * grad_stride_row
        _store_grad_rows(
            logits_ptr, grad_ptr, row_start, grad_start, y, active, in_batch, c, coef, g_y, w, n_vocab, BLOCK_V
        )


@triton.jit
def _pt_grad_kernel(
    logits_ptr,
    grad_ptr,
    targets_ptr,
    stats_ptr,
    weights_ptr,
    n_rows,
    n_cols,
    col0,
    stride_row,
    grad_stride_row,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """The weighted gradient of one tile of a block of columns [col0, col0 + n_cols) of the
    logits, from the row statistics an earlier pass stored: one read, one write."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_batch = rows < n_rows
    y = tl.load(targets_ptr + rows, mask=in_batch, other=-1).to(tl.int64) - col0  # target column in the block
    w = tl.load(weights_ptr + rows, mask=in_batch, other=0.0)
    c = tl.load(stats_ptr + rows * 3, mask=in_batch, other=0.0)
    coef = tl.load(stats_ptr + rows * 3 + 1, mask=in_batch, other=0.0)
    g_y = tl.load(stats_ptr + rows * 3 + 2, mask=in_batch, other=0.0)
    rows64 = rows.to(tl.int64)
    mask = in_batch[:, None] & (cols[None, :] < n_cols)
    live = (w * coef != 0.0)[:, None]  # ignored rows: write zeros, read nothing
    z = tl.load(logits_ptr + rows64[:, None] * stride_row + cols[None, :], mask=mask & live, other=float("-inf"))
    g = _grad_tile(z.to(tl.float32), cols, y, c, w * coef, w * g_y)
    tl.store(grad_ptr + rows64[:, None] * grad_stride_row + cols[None, :], _cast_for(g, grad_ptr), mask=mask)


@triton.jit
def _scale_rows_kernel(
    x_ptr,
    scale_ptr,
    scale_stride,
    n_rows,
    n_cols,
    seq_len,
    stride_seq,
    stride_row,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """x[row] *= scale[row] for one tile; a tile whose scales are all exactly 1 touches no memory."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    in_batch = rows < n_rows
    scale = tl.load(scale_ptr + rows * scale_stride, mask=in_batch, other=1.0).to(tl.float32)
    if tl.sum((scale != 1.0).to(tl.int32), axis=0) > 0:
        rows64 = rows.to(tl.int64)
        row_start = (rows64 // seq_len) * stride_seq + (rows64 % seq_len) * stride_row
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = in_batch[:, None] & (cols[None, :] < n_cols)
        ptrs = x_ptr + row_start[:, None] + cols[None, :]
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, _cast_for(x * scale[:, None], x_ptr), mask=mask)


# -----------------------------------------------------------------------------
# Launching the kernels


def _uses_triton(x):
    """Triton on CUDA, and on CPU when the kernels were defined under the interpreter."""
    return x.is_cuda or (x.device.type == "cpu" and _INTERPRETED)


def _row_layout(x):
    """(seq_len, stride_seq, stride_row) locating the rows of a (N, V) or (B, T, V) tensor."""
    if x.dim() == 2:
        return 1, x.stride(0), 0
    return x.shape[1], x.stride(0), x.stride(1)


def _launch_shape(n_vocab, elem_size):
    """(ROWS, BLOCK_V, num_warps) for the loss kernel.

    On a GPU one row per program with wide vocabulary blocks (untuned defaults, for lack of
    hardware). The interpreter's cost is per program and per loop step, not per byte, so
    there each program takes a tile of several rows.
    """
    block_v = min(triton.next_power_of_2(n_vocab), 8192 if elem_size <= 2 else 4096)
    if _INTERPRETED:
        block_v = min(block_v, 4096)
        return min(16, max(1, 32768 // block_v)), block_v, 4
    return max(1, 2048 // block_v), block_v, 16


def _token_losses_triton(logits, targets, is_ut, weights, ignore_index, grad, stats):
    """Per-token loss (fp32, (N,)) from the kernel; fills `grad` and `stats` when given."""
    n_rows, n_vocab = targets.numel(), logits.shape[-1]
    token_loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return token_loss
    rows, block_v, num_warps = _launch_shape(n_vocab, logits.element_size())
    seq_len, stride_seq, stride_row = _row_layout(logits)
    _, grad_stride_seq, grad_stride_row = _row_layout(grad if grad is not None else logits)
    _pt_loss_kernel[(triton.cdiv(n_rows, rows),)](
        logits,
        grad if grad is not None else logits,
        targets,
        is_ut.view(torch.int8),
        weights if weights is not None else token_loss,
        token_loss,
        stats if stats is not None else token_loss,
        n_rows,
        n_vocab,
        ignore_index,
        seq_len,
        stride_seq,
        stride_row,
        grad_stride_seq,
        grad_stride_row,
        WRITE_GRAD=grad is not None,
        WRITE_STATS=stats is not None,
        ROWS=rows,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return token_loss


def _grads_from_stats_triton(logits, col0, targets, stats, weights, grad):
    """`_pt_grad_kernel` over a (N, n_cols) block of logits whose first column is vocabulary id col0."""
    n_rows, n_cols = logits.shape
    rows, block_v, num_warps = _launch_shape(n_cols, logits.element_size())
    grid = (triton.cdiv(n_rows, rows), triton.cdiv(n_cols, block_v))
    _pt_grad_kernel[grid](
        logits,
        grad,
        targets,
        stats,
        weights,
        n_rows,
        n_cols,
        col0,
        logits.stride(0),
        grad.stride(0),
        ROWS=rows,
        BLOCK_V=block_v,
        num_warps=min(num_warps, 8),
    )


# -----------------------------------------------------------------------------
# The same math in chunked PyTorch, for machines with neither CUDA nor the interpreter

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


def _token_losses_torch(logits, targets, is_ut, weights, ignore_index, grad, stats):
    """What `_token_losses_triton` computes, a chunk of rows at a time with PyTorch ops."""
    n_vocab = logits.shape[-1]
    token_loss = torch.empty(targets.numel(), dtype=torch.float32, device=logits.device)
    rows = max(1, _TORCH_CHUNK_ELEMENTS // n_vocab)
    grad_chunks = _row_chunks(grad, rows) if grad is not None else None
    for start, z in _row_chunks(logits, rows):
        n = z.shape[0]
        span = slice(start, start + n)
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
        c = torch.where(active & has_ex, torch.where(ut, lse_ex, z_y + mle_loss), 0.0)
        coef = torch.where(active, torch.where(ut, -p_y, 1.0), 0.0)
        g_y = torch.where(active, torch.where(ut, p_y, -q_y), 0.0)
        if stats is not None:
            stats[span] = torch.stack([c, coef, g_y], dim=1)
        if grad is not None:
            w = weights[span]
            # e holds exp(z_j - m_ex): rescale each row to w * coef * exp(z_j - c)
            g = e.mul_((w * coef * torch.exp(m_ex - c))[:, None]).scatter_(1, y_col, (w * g_y)[:, None])
            g.masked_fill_(~active[:, None], 0.0)  # ignored rows: exactly 0
            next(grad_chunks)[1].copy_(g)
    return token_loss


def _grads_from_stats_torch(logits, col0, targets, stats, weights, grad):
    """What `_grads_from_stats_triton` computes, a chunk of rows at a time with PyTorch ops."""
    n_rows, n_cols = logits.shape
    rows = max(1, _TORCH_CHUNK_ELEMENTS // n_cols)
    for start in range(0, n_rows, rows):
        span = slice(start, start + rows)
        c, coef, g_y = stats[span].unbind(1)
        w = weights[span]
        g = logits[span].to(torch.float32, copy=True).sub_(c[:, None]).clamp_(max=0.0).exp_()
        g.mul_((w * coef)[:, None])  # (n, n_cols)
        y = targets[span] - col0  # the target's column in this block
        in_block = (y >= 0) & (y < n_cols)
        y_col = torch.where(in_block, y, 0)[:, None]
        g.scatter_(1, y_col, torch.where(in_block, w * g_y, g.gather(1, y_col)[:, 0])[:, None])
        grad[span].copy_(g)


# -----------------------------------------------------------------------------
# The training path (fused_linear.py); pt_loss's forward runs token_losses too


def token_losses(logits, targets, is_ut, weights, ignore_index, grad=None, stats=None):
    """Per-token loss, fp32 (N,): -log p on MLE rows, -log(1 - p) on UT rows, 0 on ignored rows.

    targets (N,) int64, is_ut (N,) bool, weights (N,) fp32 (needed only with grad). With
    `grad` (shaped like logits, and it may be logits itself), also writes
    weights[i] * d loss_i / d logits[i] into it. With `stats` (N, 3) fp32, stores each row's
    unweighted gradient coefficients, from which `grads_from_stats` rebuilds the gradient of
    any block of columns later without another pass over the whole row.
    """
    if _uses_triton(logits):
        return _token_losses_triton(logits, targets, is_ut, weights, ignore_index, grad, stats)
    return _token_losses_torch(logits, targets, is_ut, weights, ignore_index, grad, stats)


def grads_from_stats(logits, col0, targets, stats, weights, grad):
    """Write into grad (N, n) the weighted gradient of logits (N, n), vocabulary columns col0 onwards.

    `stats` come from `token_losses` on the full rows; logits and grad may be the same tensor.
    """
    if _uses_triton(logits):
        return _grads_from_stats_triton(logits, col0, targets, stats, weights, grad)
    return _grads_from_stats_torch(logits, col0, targets, stats, weights, grad)


# -----------------------------------------------------------------------------
# The logits API: pt_loss, its autograd function, and the row scaling its backward applies


def scale_rows_(x, scale):
    """x[i] *= scale[i] in place along the first dim(s) of x, or by one scalar; returns x.

    This is how grad_output reaches a gradient the forward pass already wrote. On the
    Triton path rows whose scale is exactly 1 (the usual `loss.backward()`) move no bytes,
    and nothing waits on the host to find out.
    """
    per_row = scale.dim() > 0
    if not _uses_triton(x):
        return x.mul_(scale.reshape(*x.shape[:-1], 1) if per_row else scale)
    n_rows, n_cols = x.shape[:-1].numel(), x.shape[-1]
    scale = scale.reshape(-1)
    seq_len, stride_seq, stride_row = _row_layout(x)
    block = min(triton.next_power_of_2(n_cols), 4096)
    rows = max(1, (32768 if _INTERPRETED else 4096) // block)
    grid = (triton.cdiv(n_rows, rows), triton.cdiv(n_cols, block))
    _scale_rows_kernel[grid](
        x,
        scale,
        scale.stride(0) if per_row else 0,
        n_rows,
        n_cols,
        seq_len,
        stride_seq,
        stride_row,
        ROWS=rows,
        BLOCK=block,
    )
    return x


class _PTLoss(torch.autograd.Function):
    """Forward computes the loss and writes the gradient; backward applies grad_output to it."""

    @staticmethod
    def forward(ctx, logits, targets, is_ut, weights, ignore_index, reduction, inplace, want_grad):
        grad = None
        if want_grad:
            grad = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        token_loss = token_losses(logits, targets, is_ut, weights, ignore_index, grad)
        if want_grad and inplace:
            # logits now hold the gradient: make autograd refuse any other use of their old values
            torch.autograd.graph.increment_version(logits)
        ctx.grad, ctx.grad_used = grad, False
        ctx.mark_non_differentiable(token_loss)
        weighted = weights * token_loss  # (N,) fp32
        loss = weighted if reduction == "none" else weighted.sum()
        return loss, token_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_token_loss):
        if ctx.grad_used:
            raise RuntimeError(
                "pt_loss writes its gradient in the forward pass and can be backpropagated "
                "once; compute the loss again for another backward"
            )
        ctx.grad_used = True
        grad = scale_rows_(ctx.grad, grad_loss)
        ctx.grad = None
        return grad, None, None, None, None, None, None, None


def pt_loss(
    logits, targets, ut_mask, alpha=1.0, ignore_index=-100, reduction="mean", inplace=False, return_parts=False
):
    """The PT-ALIGN loss from logits, fused: loss and gradient in one kernel.

    logits (N, V) or (B, T, V), bf16 / fp16 / fp32, any row stride (the vocabulary dim must be
    contiguous); targets int64 and ut_mask bool, one per row (ignore_index = ignored,
    ut_mask True = unlikelihood token, else MLE). Returns an fp32 loss: "mean" is
    sum_MLE(-log p) / max(n_mle, 1) + alpha * sum_UT(-log(1 - p)) / max(n_ut, 1), "sum" drops
    the two denominators, "none" gives the per-token terms of "sum", shaped like targets.

    inplace=True writes the gradient over `logits` (saving an N x V buffer); use it only
    when nothing else needs the logits afterwards: autograd raises if something does.
    return_parts=True returns (loss, LossParts) with the MLE and UT means for logging.
    The gradient is computed during forward, so backward can run once, and a grad_output
    other than 1 rounds a 16-bit gradient a second time when it scales it.
    """
    check_loss_args(logits, targets, ut_mask, alpha, ignore_index, reduction)
    if logits.stride(-1) != 1:
        raise ValueError(
            f"logits must be contiguous along the vocabulary (last) dim, got strides {tuple(logits.stride())}"
        )
    token_shape = targets.shape
    targets, is_ut = targets.reshape(-1).long(), ut_mask.reshape(-1)
    weights = token_weights(targets, is_ut, alpha, ignore_index, reduction)
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, token_loss = _PTLoss.apply(logits, targets, is_ut, weights, ignore_index, reduction, inplace, want_grad)
    if reduction == "none":
        loss = loss.view(token_shape)
    if return_parts:
        return loss, loss_parts(token_loss, targets, is_ut, ignore_index)
    return loss
