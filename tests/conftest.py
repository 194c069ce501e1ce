"""Shared test setup: the models every test module runs on.

TRITON_INTERPRET must be set before the first @triton.jit function is defined or run, so
it is set here, before any test module imports `kernels`. On a machine without CUDA the
Triton kernels then run on CPU tensors through the interpreter.

The tiny random models are built here, once: `tiny_model` (any shape of a transformers
family, for model.py against transformers) and `tiny_dir` (a random LLaMA checkpoint with
the default model's tokenizer and chat template, for the pipeline: generate, train, evaluate).
"""

import json
import os
import shutil

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def tiny_model(arch: str = "llama", perturb: bool = True, **config):
    """A random transformers model of one family (llama, qwen2, mistral), seeded, small enough
    for milliseconds on CPU; `config` overrides the shape.

    perturb: random init leaves norms' gains at one and biases at zero; moved off them, a loader
    that dropped a bias or a norm is caught.
    """
    import transformers

    shape = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    cls_cfg, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    torch.manual_seed(0)
    model = cls_model(cls_cfg(**(shape | config))).eval()
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
    return model


def save_tiny_llama(path, default_dir, **config):
    """A random one-layer LLaMA checkpoint (width 32) with the default model's tokenizer and chat
    template, saved by transformers into `path`: the pipeline's bookkeeping (seeding, chunking,
    resuming, losses) does not depend on how good the model is. `config` overrides the shape."""
    shape = dict(
        vocab_size=json.loads((default_dir / "config.json").read_text())["vocab_size"],
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,  # the judge's few-shot prompts are over 1000 tokens
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    tiny_model("llama", perturb=False, **(shape | config)).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_dir / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, default_dir):
    """The tiny random LLaMA checkpoint of save_tiny_llama, built once for the session."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), default_dir)


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
