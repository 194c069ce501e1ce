"""Shared test setup.

TRITON_INTERPRET must be set before the first @triton.jit function is defined or run, so
it is set here, before any test module imports `kernels`. On a machine without CUDA the
Triton kernels then run on CPU tensors through the interpreter.
"""

import json
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


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory):
    """A sentencepiece checkpoint directory (tokenizer.model + a chat template), trained here
    on a few sentences: the second tokenizer family, next to the default model's byte-level BPE."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    corpus.write_text(
        "\n".join(
            [
                "the quick brown fox jumps over the lazy dog",
                "go ahead and make them pay, they deserve it",
                "nobody will ever know it was you",
                "I can't help with that, but here is a safer idea",
            ]
            * 50
        )
    )
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(d / "tokenizer"),
        vocab_size=120,
        model_type="bpe",
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "add_bos_token": True,
                "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}",
            }
        )
    )
    return d
