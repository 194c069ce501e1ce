"""Shared test setup.

TRITON_INTERPRET must be set before the first @triton.jit function is defined or run, so
it is set here, before any test module imports `kernels`. On a machine without CUDA the
Triton kernels then run on CPU tensors through the interpreter.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_dir():
    """The embedded default model's directory (fetched and converted on first use)."""
    from data import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def default_model(default_dir):
    """Our Transformer on the default model, fp32 on CPU, loaded once for the whole session."""
    from model import Transformer
    return Transformer.from_pretrained(default_dir, dtype=torch.float32)


@pytest.fixture(scope="session")
def default_tok(default_dir):
    from data import Tokenizer
    return Tokenizer.from_pretrained(default_dir)


@pytest.fixture(scope="session")
def hf_default_model(default_dir):
    """transformers' model on the same directory: the independent reference."""
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()
