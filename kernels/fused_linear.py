"""
The PT-ALIGN loss straight from the final hidden states, never holding all the logits.

With a 128k vocabulary the logits are the largest tensor of a training step: 8192 rows are
2.1 GB in bf16, and eager PyTorch holds several such tensors at once (an fp32 copy, the
log-softmax, their gradients). Here they only ever exist a chunk at a time.

Training (a gradient wanted, reduction "mean" or "sum", bf16 or fp32 inputs): the gradients are
made in the forward pass, a chunk of n rows at a time, with Liger's fused linear cross-entropy's
3 GEMMs:

    1. logits  = h @ W^T       (n, V)   GEMM 1
    2. g       = the kernel    (n, V)   per-token loss, and d loss / d logits for grad_output = 1,
                                        each row scaled by its token weight
    3. grad_h  = g @ W         (n, H)   GEMM 2: the sum over all V columns inside one GEMM
                                        (fp32 accumulate), rounded once
    4. grad_W += g^T @ h       (V, H)   GEMM 3: each chunk's product added in one GEMM (fp32
                                        accumulate), the running sum kept in W's dtype

Backward then has only grad_output left to apply: `_scale_kernel` reads it on the device and
ends at once when it is exactly 1, and otherwise scales both gradients in fp32, one more
rounding (none for a power of two). So a caller that wants the speed puts every factor of its
loss into the call (the token weights through alpha and reduction, anything else through
`scale`) and calls loss.backward(): train.py passes its 1 / n_mle as scale for that.

Otherwise, the exact path: fp16 (its narrow exponent range needs grad_output folded in before
the gradient is rounded, as under a GradScaler), reduction "none" (grad_output per token), or
a second backward (the first one's gradients belong to autograd now). Forward keeps three
numbers per row and backward walks blocks of b vocabulary columns, 4 GEMMs:

    1. logits     = hidden @ W[b]^T  (N, v)  recomputed: the fourth GEMM
    2. g          = from the row numbers     weighted by token weight x grad_output, in place
    3. grad_W[b]  = g^T @ hidden     (v, H)  summed over all N rows inside one GEMM
    4. grad_h    += g @ W[b]         (N, H)  into one fp32 sum (`add_product_fp32`): the GEMM's
                                             fp32 result is added, not a 16-bit rounding of it

Memory beyond the inputs (N = 8192, H = 4096, V = 128256, bf16): training holds one chunk's
logits and gradient (2 x 128 MB by default) and the two gradients it returns (grad_W 1.05 GB,
grad_h 67 MB); eager holds the bf16 logits, their fp32 copy and log-softmax and the gradients
of those (> 12 GB). The price of the 3-GEMM path is grad_W's precision: the running sum is
rounded to W's dtype after each chunk (16 roundings in bf16 at these sizes; Liger's default
does the same). An fp32 accumulator would round once but costs V·H·4 bytes (2.1 GB here),
more than the gradient itself, and would break the target of 1/10 of eager's peak; the exact
path keeps each block of grad_W one rounding from its fp32 sum.

Each chunk runs the same code as pt_loss (`token_losses`, `grads_from_stats`): the Triton
kernels on CUDA and under TRITON_INTERPRET=1, chunked PyTorch otherwise.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from .pt_loss import _cast_for, _uses_triton, device_caps, grads_from_stats, grid_size, token_losses
from .reference import LOGIT_DTYPES, check_token_args, loss_parts, token_weights

_CHUNK_BYTES = 256 << 20  # logits (and their gradient, in training) held at a time
_COLUMN_ALIGN = 128  # vocabulary columns per backward block: a multiple of this
_WIDEN_BYTES = 16 << 20  # fallback GEMM with fp32 output: fp32 copy of the 16-bit operand made at a time
SCALE_LAUNCH = dict(BLOCK=4096, num_warps=4, PER_SM=4)  # `_scale_kernel`: 8-16 KB a step, 4 programs an SM

# -----------------------------------------------------------------------------
# 1. Sizes and the fp32-accumulating GEMM


def default_chunk_size(n_vocab, elem_size, buffers=1):
    """Rows per chunk: `buffers` (n, V) tensors in about _CHUNK_BYTES, and never fewer than 16 rows."""
    return max(16, _CHUNK_BYTES // (buffers * n_vocab * elem_size))


def column_block(chunk_size, n_rows, n_vocab):
    """Columns per backward block: as many logits as a chunk of rows holds, a multiple of 128."""
    block = chunk_size * n_vocab // max(n_rows, 1)
    return max(_COLUMN_ALIGN, block // _COLUMN_ALIGN * _COLUMN_ALIGN)


def grads_in_forward(dtype, reduction):
    """Whether the training path (gradients made in forward, 3 GEMMs) may serve this call."""
    return reduction != "none" and dtype != torch.float16


@functools.lru_cache
def fp32_out_gemm(device, dtype):
    """Whether `torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)` runs for 16-bit a, b on
    this device: a GEMM whose fp32 accumulator is written out unrounded. CUDA builds of recent
    torch have it; the CPU backend does not, nor may an older GPU or torch. Asked once per device
    and dtype, by running it on 2 x 2 inputs and checking the answer."""
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device)
        acc = torch.ones(2, 2, dtype=torch.float32, device=device)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return bool((acc == 3).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def add_product_fp32(acc, a, b):
    """acc += a @ b with acc fp32 and a, b 16-bit or fp32: the product is never rounded to 16 bits.

    Where `fp32_out_gemm` says so, one GEMM writes its fp32 result straight into acc. Elsewhere
    (the CPU, which the tests run) b is widened once and a a few rows at a time (_WIDEN_BYTES
    of copy): the same sum, at fp32 GEMM speed.
    """
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif fp32_out_gemm(a.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        b32 = b.float()
        rows = max(1, _WIDEN_BYTES // (4 * a.shape[1]))
        for start in range(0, a.shape[0], rows):
            acc[start : start + rows].addmm_(a[start : start + rows].float(), b32)


# -----------------------------------------------------------------------------
# 2. grad_output, applied on the device


@triton.jit
def _scale_kernel(x_ptr, n, go_ptr, BLOCK: tl.constexpr, PER_SM: tl.constexpr):
    """x *= grad_output (one fp32 scalar, read on the device), in fp32, rounded once. When it is
    exactly 1 (loss.backward()) every program ends at once: nothing is read or written."""
    go = tl.load(go_ptr).to(tl.float32)
    n_blocks = tl.where(go == 1.0, 0, tl.cdiv(n, BLOCK))
    for block in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        offsets = tl.cast(block, tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: V·H may pass 2^31
        mask = offsets < n
        x = tl.load(x_ptr + offsets, mask=mask)
        tl.store(x_ptr + offsets, _cast_for(x.to(tl.float32) * go, x_ptr), mask=mask)


def scale_by(x, grad_output):
    """x (contiguous) *= grad_output (a 0-dim fp32 tensor on x's device), without a host sync."""
    if x is None:
        return
    if _uses_triton(x):
        n_blocks = triton.cdiv(x.numel(), SCALE_LAUNCH["BLOCK"])
        grid = (grid_size(n_blocks, SCALE_LAUNCH, device_caps(x.device)),)
        _scale_kernel[grid](x, x.numel(), grad_output.float().reshape(1), **SCALE_LAUNCH)
    elif bool(grad_output != 1):  # on the CPU reading it costs nothing
        for part in x.view(-1).split(_WIDEN_BYTES // 4):
            part.copy_(part.float() * grad_output)


# -----------------------------------------------------------------------------
# 3. The two passes


def forward_chunks(hidden, weight, targets, is_ut, weights, ignore_index, chunk_size, want):
    """Per-token loss and row stats, a chunk of rows at a time; with want = (hidden?, weight?),
    also the gradients for grad_output = 1 (3 GEMMs). Returns (token_loss, stats, grad_h, grad_W)."""
    n_rows = hidden.shape[0]
    token_loss = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    stats = torch.empty(n_rows, 3, dtype=torch.float32, device=hidden.device)  # (c, coef, g_y)
    grad_h = torch.empty_like(hidden) if want[0] else None
    grad_w = torch.empty_like(weight) if want[1] else None
    for start in range(0, n_rows, chunk_size):
        rows = slice(start, start + chunk_size)
        logits = hidden[rows] @ weight.t()  # (n, V), GEMM 1
        g = torch.empty_like(logits) if any(want) else None
        token_loss[rows] = token_losses(logits, targets[rows], is_ut[rows], ignore_index, stats[rows], weights[rows], g)
        del logits
        if grad_h is not None:
            torch.mm(g, weight, out=grad_h[rows])  # GEMM 2
        if grad_w is not None:  # GEMM 3; beta 0 on the first chunk: empty_like's contents are ignored
            grad_w.addmm_(g.t(), hidden[rows], beta=0 if start == 0 else 1)
    return token_loss, stats, grad_h, grad_w


def backward_columns(hidden, weight, targets, stats, weights, grad_loss, chunk_size, want):
    """The exact path: (grad_h, grad_W) from the row stats, a block of vocabulary columns at a
    time, grad_output folded in before rounding (4 GEMMs with forward's)."""
    n_rows, n_vocab = hidden.shape[0], weight.shape[0]
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want[0] else None
    grad_weight = torch.empty_like(weight) if want[1] else None
    block = column_block(chunk_size, n_rows, n_vocab)
    for v0 in range(0, n_vocab, block):
        cols = slice(v0, v0 + block)
        logits = hidden @ weight[cols].t()  # (N, v)
        # now d loss / d logits, grad_output (per token if need be) folded in before rounding
        grads_from_stats(logits, v0, targets, stats, weights, grad_loss, logits)
        if grad_weight is not None:
            torch.mm(logits.t(), hidden, out=grad_weight[cols])
        if grad_hidden is not None:
            add_product_fp32(grad_hidden, logits, weight[cols])
    return (grad_hidden.to(hidden.dtype) if grad_hidden is not None else None), grad_weight


class _FusedLinearPTLoss(torch.autograd.Function):
    """Forward: loss and row statistics by chunks of rows, and in training the gradients.
    Backward: grad_output applied to those, or the exact path by blocks of columns."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, is_ut, weights, ignore_index, reduction, chunk_size, want):
        token_loss, stats, grad_h, grad_w = forward_chunks(
            hidden, weight, targets, is_ut, weights, ignore_index, chunk_size, want
        )
        ctx.save_for_backward(hidden, weight, targets, weights, stats)
        ctx.chunk_size = chunk_size
        ctx.grads = (grad_h, grad_w) if any(want) else None
        ctx.mark_non_differentiable(token_loss)
        weighted = weights * token_loss  # (N,) fp32
        return (weighted if reduction == "none" else weighted.sum()), token_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_token_loss):
        hidden, weight, targets, weights, stats = ctx.saved_tensors
        want = ctx.needs_input_grad[:2]
        if ctx.grads is not None:  # made in forward for grad_output = 1; handed to autograd once
            grad_h, grad_w = ctx.grads
            ctx.grads = None
            scale_by(grad_h, grad_loss)
            scale_by(grad_w, grad_loss)
        else:
            grad_h, grad_w = backward_columns(hidden, weight, targets, stats, weights, grad_loss, ctx.chunk_size, want)
        return grad_h, grad_w, None, None, None, None, None, None, None


def _check_inputs(hidden, weight, chunk_size, scale):
    """Raise ValueError, naming the argument, for hidden / weight / chunk_size / scale it cannot take."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 2-D tensor ({'N, H' if name == 'hidden' else 'V, H'}), got {shape}")
    if hidden.dtype not in LOGIT_DTYPES:
        raise ValueError(f"hidden dtype must be one of {[str(d) for d in LOGIT_DTYPES]}, got {hidden.dtype}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(
            f"weight must have the dtype and device of hidden ({hidden.dtype}, {hidden.device}), "
            f"got {weight.dtype}, {weight.device}"
        )
    if weight.shape[1] != hidden.shape[1] or weight.shape[0] < 1:
        raise ValueError(
            f"weight must have shape (V, {hidden.shape[1]}) to match hidden's width, got {tuple(weight.shape)}"
        )
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")


def fused_linear_pt_loss(
    hidden,
    weight,
    targets,
    ut_mask,
    alpha=1.0,
    ignore_index=-100,
    reduction="mean",
    chunk_size=None,
    return_parts=False,
    scale=1.0,
):
    """scale * pt_loss(hidden @ weight.T, ...) without ever holding the (N, V) logits.

    hidden (N, H) final hidden states, weight (V, H) the output projection (lm_head or tied
    embedding), same dtype (bf16 / fp16 / fp32); targets, ut_mask, alpha, ignore_index,
    reduction and return_parts as in pt_loss (the parts are not scaled). scale multiplies the
    loss and its gradient: a caller that would multiply the loss afterwards passes the factor
    here instead, so that backward's grad_output stays 1 and the gradients made in the forward
    pass are used as they are. chunk_size bounds the logits held at a time to chunk_size x V
    (default: about 256 MB with, in training, their gradient). Gradients come back in the
    inputs' dtypes. No bias: LLaMA-family output projections have none.
    """
    _check_inputs(hidden, weight, chunk_size, scale)
    check_token_args(targets, ut_mask, hidden, "hidden", alpha, ignore_index, reduction)

    # one entry per row, contiguous: a copy of N numbers at most
    targets, is_ut = targets.reshape(-1).long().contiguous(), ut_mask.reshape(-1).contiguous()
    weights = token_weights(targets, is_ut, alpha, ignore_index, reduction) * scale
    want = (False, False)
    if torch.is_grad_enabled() and grads_in_forward(hidden.dtype, reduction):
        want = (hidden.requires_grad, weight.requires_grad)
    chunk_size = chunk_size or default_chunk_size(weight.shape[0], weight.element_size(), 2 if any(want) else 1)
    loss, token_loss = _FusedLinearPTLoss.apply(
        hidden, weight, targets, is_ut, weights, ignore_index, reduction, chunk_size, want
    )
    if return_parts:
        return loss, loss_parts(token_loss, targets, is_ut, ignore_index)
    return loss
