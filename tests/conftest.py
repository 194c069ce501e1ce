"""Shared test setup.

TRITON_INTERPRET must be set before the first @triton.jit function is defined or run, so
it is set here, before any test module imports `kernels`. On a machine without CUDA the
Triton kernels then run on CPU tensors through the interpreter.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
