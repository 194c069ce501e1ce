"""
The PT-ALIGN loss, written as its definition in plain PyTorch.

Every token of a batch has one of three roles, read from `targets` and `ut_mask`:

    ignored        targets == ignore_index (prompt, template, padding)
    MLE token      a token of a positive response: learn to say it,      loss -log p
    UT  token      a harmful token of a toxic response: learn not to,   loss -log(1 - p)

where p is the model's probability of the target token. The batch loss is

    L = sum_MLE(-log p) / max(n_mle, 1) + alpha * sum_UT(-log(1 - p)) / max(n_ut, 1)

so each kind of token is averaged on its own (a batch with no token of a kind adds 0 for it).

This file is the yardstick: `pt_loss_reference` is slow and holds several N x V tensors,
but it is short enough to check by eye, autograd gives its gradient, and the fast paths
(`pt_loss.py`, `fused_linear.py`) are tested against it in float64. It also holds what the
three paths share: argument checks, the token weights that express the reduction, and the
per-part numbers training logs.
"""

import math
from typing import NamedTuple

import torch

REDUCTIONS = ("mean", "sum", "none")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class LossParts(NamedTuple):
    """The two halves of the loss, for logging: with reduction="mean", loss = mle + alpha * ut."""

    mle: torch.Tensor  # mean -log p over MLE tokens (0 when there are none)
    ut: torch.Tensor  # mean -log(1 - p) over UT tokens (0 when there are none)
    n_mle: torch.Tensor  # number of MLE tokens
    n_ut: torch.Tensor  # number of UT tokens


def check_loss_args(logits, targets, ut_mask, alpha, ignore_index, reduction, dtypes=LOGIT_DTYPES):
    """Raise ValueError, naming the argument, for inputs the loss functions cannot take."""
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a tensor of shape (N, V) or (B, T, V), got {shape}")
    if logits.dtype not in dtypes:
        raise ValueError(f"logits dtype must be one of {[str(d) for d in dtypes]}, got {logits.dtype}")
    if logits.shape[-1] < 1:
        raise ValueError(f"logits must have a vocabulary dimension of at least 1, got shape {tuple(logits.shape)}")
    check_token_args(targets, ut_mask, logits, "logits", alpha, ignore_index, reduction)


def check_token_args(targets, ut_mask, rows, rows_name, alpha, ignore_index, reduction):
    """Raise ValueError for targets / ut_mask / alpha / ignore_index / reduction that do not fit `rows`."""
    for name, t in (("targets", targets), ("ut_mask", ut_mask)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.shape != rows.shape[:-1] and t.shape != (rows.shape[:-1].numel(),):
            raise ValueError(
                f"{name} must have shape {tuple(rows.shape[:-1])} (one entry per row of "
                f"{rows_name}), got {tuple(t.shape)}"
            )
        if t.device != rows.device:
            raise ValueError(f"{name} must be on the device of {rows_name} ({rows.device}), got {t.device}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an int64 or int32 tensor of token ids, got {targets.dtype}")
    if ut_mask.dtype != torch.bool:
        raise ValueError(f"ut_mask must be a bool tensor (True = unlikelihood token), got {ut_mask.dtype}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def token_roles(targets, ut_mask, ignore_index):
    """Flat bool masks (is_mle, is_ut) of shape (N,): each token is MLE, UT or neither."""
    active = targets.reshape(-1) != ignore_index
    ut = ut_mask.reshape(-1)
    return active & ~ut, active & ut


def pt_loss_reference(logits, targets, ut_mask, alpha=1.0, ignore_index=-100, reduction="mean", return_parts=False):
    """The PT-ALIGN loss from logits, in float64 if given float64 (else fp32); autograd does the gradient.

    logits (N, V) or (B, T, V); targets and ut_mask one entry per row. reduction="mean" is L
    above, "sum" is sum_MLE(-log p) + alpha * sum_UT(-log(1 - p)), "none" the per-token terms
    of that sum (0 for ignored tokens), shaped like targets. With return_parts=True the
    result is (loss, LossParts).
    """
    check_loss_args(logits, targets, ut_mask, alpha, ignore_index, reduction, dtypes=LOGIT_DTYPES + (torch.float64,))
    V = logits.shape[-1]
    z = logits.reshape(-1, V)  # (N, V)
    z = z if z.dtype == torch.float64 else z.float()
    is_mle, is_ut = token_roles(targets, ut_mask, ignore_index)
    y = torch.where(is_mle | is_ut, targets.reshape(-1), 0)  # ignored rows look at column 0, then drop out
    y = y.long()[:, None]  # (N, 1)

    lse = torch.logsumexp(z, dim=-1)  # log sum_j e^{z_j}
    log_p = z.gather(1, y)[:, 0] - lse  # log p_y
    # log(1 - p_y) straight from the other columns: no 1 - p, which is 0 in floating point
    # as soon as p rounds to 1.
    lse_others = torch.logsumexp(z.scatter(1, y, -math.inf), dim=-1)  # log sum_{j != y} e^{z_j}
    log_1mp = lse_others - lse  # log(1 - p_y)

    zero = z.new_zeros(())
    mle_loss = torch.where(is_mle, -log_p, zero)  # (N,)  -log p on MLE tokens
    ut_loss = torch.where(is_ut, -log_1mp, zero)  # (N,)  -log(1 - p) on UT tokens
    n_mle, n_ut = is_mle.sum(), is_ut.sum()

    if reduction == "mean":
        loss = mle_loss.sum() / n_mle.clamp(min=1) + alpha * ut_loss.sum() / n_ut.clamp(min=1)
    elif reduction == "sum":
        loss = mle_loss.sum() + alpha * ut_loss.sum()
    else:
        loss = (mle_loss + alpha * ut_loss).view(targets.shape)
    if return_parts:
        return loss, loss_parts(mle_loss + ut_loss, targets, ut_mask, ignore_index)
    return loss


def token_weights(targets, ut_mask, alpha, ignore_index, reduction):
    """The reduction as one fp32 weight per token, so that loss = sum_i weight_i * loss_i.

    This is how the fast paths reduce: the kernel scales each row's gradient by its weight,
    and the counts behind "mean" stay on the device (no .item(), no host sync).
    "none" uses the "sum" weights: its per-token losses are the terms of the sum.
    """
    is_mle, is_ut = token_roles(targets, ut_mask, ignore_index)
    w_mle, w_ut = 1.0, float(alpha)
    if reduction == "mean":
        w_mle = 1.0 / is_mle.sum().clamp(min=1).float()
        w_ut = alpha / is_ut.sum().clamp(min=1).float()
    return is_mle * w_mle + is_ut * w_ut  # (N,) fp32, 0 on ignored tokens


def loss_parts(token_loss, targets, ut_mask, ignore_index):
    """LossParts from per-token -log p / -log(1 - p) (0 on ignored tokens); detached, on the device."""
    token_loss = token_loss.detach().reshape(-1)
    is_mle, is_ut = token_roles(targets, ut_mask, ignore_index)
    n_mle, n_ut = is_mle.sum(), is_ut.sum()
    mle = torch.where(is_mle, token_loss, 0.0).sum() / n_mle.clamp(min=1)
    ut = torch.where(is_ut, token_loss, 0.0).sum() / n_ut.clamp(min=1)
    return LossParts(mle, ut, n_mle, n_ut)
