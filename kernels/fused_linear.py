"""
The PT-ALIGN loss straight from the final hidden states, never holding all the logits.

With a 128k vocabulary the logits are the largest tensor of a training step: 8192 rows are
2.1 GB in bf16, and eager PyTorch holds several such tensors at once (an fp32 copy, the
log-softmax, their gradients). Here they only ever exist a chunk at a time.

Forward, in chunks of rows:

    logits = h @ W^T               (n, V)   the fused kernel: per-token loss, and per row the
                                            three numbers (c, coef, g_y) its gradient is made of

Backward, in blocks of vocabulary columns, once grad_output is known:

    logits = hidden @ W[b]^T       (N, v)   recomputed
    g      = from the row numbers  (N, v)   weighted by token weight x grad_output, in place
    grad_W[b]  = g^T @ hidden      (v, H)   summed over all N rows inside one GEMM (fp32 accumulate)
    grad_h    += g @ W[b]          (N, H)   into one fp32 sum: the GEMM's fp32 result is added,
                                            not a 16-bit rounding of it per block

Walking the columns in backward costs one more GEMM than computing the gradient with the
loss (4 instead of 3), and buys the memory: no V x H fp32 accumulator for grad_W (2 GB at
H = 4096), only one (N, v) block and an (N, H) fp32 sum on top of the gradients themselves;
grad_output, per token for reduction="none", enters through the row weights before the
gradient is rounded. v is a multiple of 128, so every block (and every GEMM operand cut from
W) starts 16-byte aligned and tiles evenly.

Each chunk runs the same code as pt_loss (`token_losses`, `grads_from_stats`): the Triton
kernels on CUDA and under TRITON_INTERPRET=1, chunked PyTorch otherwise.
"""

import torch

from .pt_loss import grads_from_stats, token_losses
from .reference import LOGIT_DTYPES, check_token_args, loss_parts, token_weights

_CHUNK_BYTES = 256 << 20  # logits held at a time: 1024 rows of a 128k vocabulary in bf16


_COLUMN_ALIGN = 128  # vocabulary columns per backward block: a multiple of this
_WIDEN_BYTES = 16 << 20  # CPU, 16-bit: fp32 copy of the gradient block made at a time


def default_chunk_size(n_vocab, elem_size):
    """Rows per chunk: about _CHUNK_BYTES of logits, and never fewer than 16 rows."""
    return max(16, _CHUNK_BYTES // (n_vocab * elem_size))


def column_block(chunk_size, n_rows, n_vocab):
    """Columns per backward block: as many logits as a chunk of rows holds, a multiple of 128."""
    block = chunk_size * n_vocab // max(n_rows, 1)
    return max(_COLUMN_ALIGN, block // _COLUMN_ALIGN * _COLUMN_ALIGN)


def add_product_fp32(acc, a, b):
    """acc += a @ b with acc fp32 and a, b 16-bit or fp32: the product is never rounded to 16 bits.

    CUDA has a GEMM with fp32 output for 16-bit inputs, written straight into acc. The CPU build
    has none, so there b is widened once and a a few rows at a time (_WIDEN_BYTES of copy).
    """
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        b32 = b.float()
        rows = max(1, _WIDEN_BYTES // (4 * a.shape[1]))
        for start in range(0, a.shape[0], rows):
            acc[start : start + rows].addmm_(a[start : start + rows].float(), b32)


class _FusedLinearPTLoss(torch.autograd.Function):
    """Forward: loss and row statistics by chunks of rows. Backward: gradients by blocks of columns."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, is_ut, weights, ignore_index, reduction, chunk_size):
        n_rows = hidden.shape[0]
        token_loss = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        stats = torch.empty(n_rows, 3, dtype=torch.float32, device=hidden.device)  # (c, coef, g_y)
        for start in range(0, n_rows, chunk_size):
            rows = slice(start, start + chunk_size)
            logits = hidden[rows] @ weight.t()  # (n, V)
            token_loss[rows] = token_losses(logits, targets[rows], is_ut[rows], ignore_index, stats[rows])
        ctx.save_for_backward(hidden, weight, targets, weights, stats)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(token_loss)
        weighted = weights * token_loss  # (N,) fp32
        return (weighted if reduction == "none" else weighted.sum()), token_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_token_loss):
        hidden, weight, targets, weights, stats = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        n_rows, n_vocab = hidden.shape[0], weight.shape[0]
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want_hidden else None
        grad_weight = torch.empty_like(weight) if want_weight else None
        block = column_block(ctx.chunk_size, n_rows, n_vocab)
        for v0 in range(0, n_vocab, block):
            cols = slice(v0, v0 + block)
            logits = hidden @ weight[cols].t()  # (N, v)
            # now d loss / d logits, grad_output (per token if need be) folded in before rounding
            grads_from_stats(logits, v0, targets, stats, weights, grad_loss, logits)
            if want_weight:
                torch.mm(logits.t(), hidden, out=grad_weight[cols])
            if want_hidden:
                add_product_fp32(grad_hidden, logits, weight[cols])
        if want_hidden:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


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
):
    """pt_loss(hidden @ weight.T, ...) without ever holding the (N, V) logits.

    hidden (N, H) final hidden states, weight (V, H) the output projection (lm_head or tied
    embedding), same dtype (bf16 / fp16 / fp32); targets, ut_mask, alpha, ignore_index,
    reduction and return_parts as in pt_loss. chunk_size bounds the logits held at a time to
    chunk_size x V (default: about 256 MB). Gradients come back in the inputs' dtypes, summed
    in fp32. No bias: LLaMA-family output projections have none.
    """
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
    check_token_args(targets, ut_mask, hidden, "hidden", alpha, ignore_index, reduction)

    # one entry per row, contiguous: a copy of N numbers at most
    targets, is_ut = targets.reshape(-1).long().contiguous(), ut_mask.reshape(-1).contiguous()
    weights = token_weights(targets, is_ut, alpha, ignore_index, reduction)
    chunk_size = chunk_size or default_chunk_size(weight.shape[0], weight.element_size())
    loss, token_loss = _FusedLinearPTLoss.apply(
        hidden, weight, targets, is_ut, weights, ignore_index, reduction, chunk_size
    )
    if return_parts:
        return loss, loss_parts(token_loss, targets, is_ut, ignore_index)
    return loss
