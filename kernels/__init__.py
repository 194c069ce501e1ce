"""
The fused MLE + unlikelihood loss of PT-ALIGN.

    pt_loss(logits, targets, ut_mask, alpha=1.0, ignore_index=-100, reduction="mean", inplace=False)
        loss and gradient from logits, read once per row where the row fits on chip
        (reference.py has the definition, pt_loss.py the Triton kernels);
    fused_linear_pt_loss(hidden, weight, targets, ut_mask, ..., scale=1.0)
        the same loss (times scale) from the final hidden states and the output projection, a
        chunk of rows at a time, never holding the N x V logits, its gradients made in the
        forward pass (3 GEMMs) when backward's grad_output will be 1: what training uses;
    pt_loss_reference(...)
        the readable PyTorch definition every fast path is tested against.

All three take return_parts=True and then return (loss, LossParts(mle, ut, n_mle, n_ut)):
the mean -log p over MLE tokens and the mean -log(1 - p) over UT tokens, for logging
(with reduction="mean", loss = mle + alpha * ut). `python -m kernels.bench` benchmarks them,
`python -m kernels.compile_check` compiles the kernels for sm_80 / sm_90 without a GPU, and
`python3 -m kernels.gpu_check --out DIR` runs everything that needs one (docs/kernels.md, "GPU check").
"""

from .fused_linear import fused_linear_pt_loss
from .pt_loss import pt_loss
from .reference import LossParts, pt_loss_reference

__all__ = ["pt_loss", "fused_linear_pt_loss", "pt_loss_reference", "LossParts"]
