"""
LoRA for train.py: a trainable low-rank update on each attention and MLP projection.

The base weights stay frozen (and may stay bf16); the adapters are fp32. `merged` swaps each
adapted projection for a plain nn.Linear holding W + scale B A, so what `save_pretrained`
writes under it is an ordinary checkpoint with the HF weight names: nothing downstream needs
to know LoRA was used.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: y = W x + (alpha / r) B A x."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        # The adapters are the weights being trained, so they stay fp32 even on a bf16 base.
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, **kw))
        init_adapter(self.lora_A, self.lora_B)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return merge(self.base.weight, self.lora_A, self.lora_B, self.scale)


def init_adapter(lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    """A as nn.Linear initialises a weight, B = 0: the adapted model starts as the base model."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        lora_B.zero_()


def merge(w: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale B A, added in fp32 and returned in W's dtype."""
    return (w.float() + scale * (lora_B.float() @ lora_A.float())).to(w.dtype)


def add_lora(model: nn.Module, rank: int, alpha: float) -> None:
    """Freeze the model and put a LoRA adapter on every attention and MLP projection."""
    model.requires_grad_(False)
    for parent in list(model.modules()):
        for name in LORA_TARGETS:
            if isinstance(getattr(parent, name, None), nn.Linear):
                setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))


def base_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """The parameter a checkpoint's name refers to; in an adapted projection, its frozen base weight."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    return getattr(module.base if isinstance(module, LoRALinear) else module, attr)


def lora_layers(model: nn.Module) -> list[tuple[nn.Module, str, LoRALinear]]:
    """(parent module, attribute name, LoRALinear) for each adapted projection."""
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, LoRALinear)
    ]


@contextmanager
def merged(model: nn.Module):
    """The model with each LoRA layer swapped for a plain nn.Linear holding the merged weight.

    The merged weights go to the CPU one at a time (saving copies them there anyway), so the
    GPU never holds a second copy of the projections. Without adapters: the model as it is.
    """
    swaps = lora_layers(model)
    for parent, name, lora in swaps:
        plain = nn.Linear(lora.base.in_features, lora.base.out_features, bias=False, device="meta")
        plain.weight = nn.Parameter(lora.merged_weight().cpu(), requires_grad=False)
        plain.bias = lora.base.bias
        setattr(parent, name, plain)
    try:
        yield model
    finally:
        for parent, name, lora in swaps:
            setattr(parent, name, lora)
