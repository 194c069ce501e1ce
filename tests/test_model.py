"""model.py against transformers: tiny random checkpoints saved by transformers, loaded by us.

transformers is the independent reference here (a test-only dependency). Each case builds
a small random model of one architecture and shape family, saves it with safetensors, and
checks that our logits equal transformers' at the default fp32 tolerances.
"""

import dataclasses
import json

import pytest
import torch
import transformers
from conftest import tiny_model

from generate import generate_batched, generate_ids
from model import CheckpointError, Transformer

VOCAB = 97  # tiny_model's


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


CASES = {
    "llama-gqa-untied": ("llama", {}),
    "llama-mha-tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-head-dim-32": ("llama", dict(head_dim=32)),
    "llama3-rope-factor-8": (
        "llama",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            )
        ),
    ),
    "llama3-rope-factor-32": (
        "llama",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=32.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            )
        ),
    ),
    "qwen2-bias-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-bias-untied": ("qwen2", dict(num_key_value_heads=1)),
    "mistral-untied": ("mistral", dict(sliding_window=None)),
    "mistral-head-dim-24": ("mistral", dict(sliding_window=None, head_dim=24, tie_word_embeddings=True)),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tmp_path):
    arch, kw = CASES[case]
    ref = tiny_model(arch, **kw)
    ref.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    tokens = torch.randint(0, VOCAB, (2, 40))  # 40 > 16: past llama3's original context
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf_logits(ref, tokens))


def test_sharded_checkpoint_loads(tmp_path):
    ref = tiny_model("llama")
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    ours = Transformer.from_pretrained(tmp_path)
    tokens = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf_logits(ref, tokens))


@pytest.mark.parametrize("shard", [False, True])
@pytest.mark.parametrize("case", ["llama-gqa-untied", "qwen2-bias-tied"])
def test_save_pretrained_roundtrip(case, shard, tmp_path):
    arch, kw = CASES[case]
    ref = tiny_model(arch, **kw)
    ref.save_pretrained(tmp_path / "src")
    ours = Transformer.from_pretrained(tmp_path / "src")
    ours.save_pretrained(tmp_path / "out", max_shard_size=30_000 if shard else 5 * 2**30)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file() == shard
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(back, tokens), ours(tokens))
    assert not list(tmp_path.glob(".out.tmp-*")), "temporary directory left behind"


def test_hidden_states_project_to_logits(tmp_path):
    tiny_model("llama", tie_word_embeddings=True).save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    tokens = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        h = ours.hidden_states(tokens)
        assert h.shape == (2, 7, 64)
        torch.testing.assert_close(h @ ours.lm_head_weight.T, ours(tokens))
    assert ours.lm_head_weight is ours.embed_tokens.weight


def test_every_layer_states_match_transformers_and_the_forward(tmp_path):
    """hidden_states(every_layer=True): the embedding and each block's output, as transformers'
    output_hidden_states gives them (its last one normalised), and the final norm of the last
    one is the forward's own hidden state, which projects to its logits."""
    hf = tiny_model("llama")
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    tokens = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        states = ours.hidden_states(tokens, every_layer=True)
        ref = hf(tokens, output_hidden_states=True).hidden_states
        assert len(states) == len(ref) == ours.config.n_layers + 1
        for mine, theirs in zip(states[:-1], ref[:-1]):
            torch.testing.assert_close(mine, theirs)
        torch.testing.assert_close(ours.norm(states[-1]), ref[-1])
        torch.testing.assert_close(ours.norm(states[-1]), ours.hidden_states(tokens))
        torch.testing.assert_close(ours.norm(states[-1]) @ ours.lm_head_weight.T, ours(tokens))


def test_bf16_load(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert ours(torch.randint(0, VOCAB, (1, 5))).dtype == torch.bfloat16


def test_family_differences_are_config_fields(tmp_path):
    """A family's norm offset and embedding scale are fields, not code: the same function with the
    gains stored minus one (offset 1) and the embedding stored divided by 4 (scale 4) gives the same logits."""
    model = ours_from_tiny("qwen2", tmp_path)
    assert model.config.qkv_bias and model.config.activation == "silu"
    other = Transformer(dataclasses.replace(model.config, norm_offset=1.0, embedding_scale=4.0))
    state = {
        k: v - 1 if "norm" in k else v / 4 if k == "embed_tokens.weight" else v for k, v in model.state_dict().items()
    }
    other.load_state_dict(state)
    tokens = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(other(tokens), model(tokens))


def ours_from_tiny(arch, tmp_path) -> Transformer:
    """Our model, loaded from a tiny random checkpoint of the family saved into tmp_path."""
    tiny_model(arch).save_pretrained(tmp_path)
    return Transformer.from_pretrained(tmp_path)


# -----------------------------------------------------------------------------
# KV cache: cached greedy decoding equals recomputing everything at every step


def greedy_uncached(model, prompts, n_new, pad_id=0):
    """Greedy decoding that re-runs the whole left-padded sequence each step (no cache)."""
    T = max(len(p) for p in prompts)
    tokens = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts])
    valid = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts])
    out = []
    with torch.no_grad():
        for _ in range(n_new):
            nxt = model(tokens, valid)[:, -1].argmax(-1)
            out.append(nxt)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            valid = torch.cat([valid, torch.ones_like(valid[:, :1])], 1)
    return torch.stack(out, 1).tolist()


@pytest.mark.parametrize("case", ["llama-gqa-untied", "qwen2-bias-tied", "llama3-rope-factor-8"])
def test_cached_greedy_equals_uncached_left_padded(case, tmp_path):
    arch, kw = CASES[case]
    tiny_model(arch, **kw).save_pretrained(tmp_path)
    model = Transformer.from_pretrained(tmp_path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (3, 11, 7, 1)]
    cached = generate_ids(model, prompts, stop_ids=[], pad_id=0, max_new_tokens=24)
    assert cached == greedy_uncached(model, prompts, 24)
    # and a row decoded alone equals the same row decoded in the padded batch
    for i, p in enumerate(prompts):
        assert generate_ids(model, [p], stop_ids=[], pad_id=0, max_new_tokens=24)[0] == cached[i]


def test_shared_prefix_prefill_equals_uncached(tmp_path):
    """Prompts with a common start (few-shot turns) share one prefill; decoding must not change."""
    from generate import shared_prefix_len

    model = ours_from_tiny("llama", tmp_path)
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(1, VOCAB, (20,), generator=g).tolist()
    prompts = [prefix + torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (1, 6, 3)]
    assert shared_prefix_len(prompts) == 20
    cached = generate_ids(model, prompts, stop_ids=[], pad_id=0, max_new_tokens=16)
    assert cached == greedy_uncached(model, prompts, 16)


def test_prefill_gives_the_last_positions_logits(tmp_path):
    """After prefill only each row's last position is projected; it must equal the full forward's."""
    from generate import last_logits, left_pad, prefill

    model = ours_from_tiny("llama", tmp_path)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (5, 2, 9)]
    tokens, valid = left_pad(prompts, 0, "cpu")
    with torch.no_grad():
        batch = prefill(model, prompts, 0, decode_slots=3)
        assert (batch.prefix_len, batch.cache.length, batch.cache.max_len) == (0, 9, 12)
        torch.testing.assert_close(last_logits(model, batch.h), model(tokens, valid)[:, -1])


def test_scoring_helpers_match_plain_forward(tmp_path):
    """token_logprobs and next_token_logprobs (which prefills a shared prefix once) equal a plain forward."""
    from generate import next_token_logprobs, token_logprobs

    model = ours_from_tiny("qwen2", tmp_path)
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(1, VOCAB, (18,), generator=g).tolist()
    seqs = [prefix + torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (2, 5, 1)]
    nxt = next_token_logprobs(model, seqs, batch_size=3)
    per_tok = token_logprobs(model, seqs, batch_size=2)
    with torch.no_grad():
        for i, s in enumerate(seqs):
            logp = torch.log_softmax(model(torch.tensor([s]))[0], -1)
            torch.testing.assert_close(nxt[i], logp[-1])
            torch.testing.assert_close(per_tok[i], logp[:-1].gather(-1, torch.tensor(s[1:])[:, None])[:, 0])


def test_uncached_padded_equals_unpadded(tmp_path):
    model = ours_from_tiny("llama", tmp_path)
    p = [5, 9, 13, 2, 40]
    with torch.no_grad():
        alone = model(torch.tensor([p]))[0]
        padded = model(torch.tensor([[0, 0, 0] + p]), torch.tensor([[False] * 3 + [True] * 5]))[0, 3:]
    torch.testing.assert_close(padded, alone)


def test_generate_batched_takes_order_and_returns_input_order(tmp_path):
    """Batches follow `order`, each sampling with generator_for(its start); replies come back in input order."""
    model = ours_from_tiny("llama", tmp_path)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (7, 2, 5, 3, 4)]
    starts, streamed = [], []
    new = generate_batched(
        model,
        prompts,
        [],
        0,
        batch_size=2,
        max_new_tokens=6,
        order=[1, 3, 2, 0, 4],
        generator_for=lambda start: starts.append(start),
        on_token=lambda i, t: streamed.append((i, t)),
    )
    assert starts == [0, 2, 4]
    assert new == [generate_ids(model, [p], [], 0, 6)[0] for p in prompts]
    assert [i for i, _ in streamed[:2]] == [1, 3]  # the first batch streams first, under input indices
    assert sorted(streamed) == sorted((i, t) for i, n in enumerate(new) for t in n)


def test_generate_ids_stops_on_any_stop_id(tmp_path):
    model = ours_from_tiny("llama", tmp_path)
    free = generate_ids(model, [[3, 4, 5]], stop_ids=[], pad_id=0, max_new_tokens=10)[0]
    stop_at = free[4]
    first = free.index(stop_at)
    cut = generate_ids(model, [[3, 4, 5]], stop_ids=[VOCAB + 5, stop_at], pad_id=0, max_new_tokens=10)[0]
    assert cut == free[:first]


# -----------------------------------------------------------------------------
# Bad checkpoints: one clear sentence naming the file or key


@pytest.fixture
def saved(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    return tmp_path


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Transformer.from_pretrained(tmp_path / "nope")


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        Transformer.from_pretrained(saved)


def test_missing_shard(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path, max_shard_size="40KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        Transformer.from_pretrained(tmp_path)


def test_corrupt_safetensors_header(saved):
    f = saved / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"{ this is not json at all !!!!!!"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
        Transformer.from_pretrained(saved)


def test_wrong_shape(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight' has shape"):
        Transformer.from_pretrained(saved)


def test_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_model("llama").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' is missing"):
        Transformer.from_pretrained(tmp_path)


def test_unknown_architecture(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'GPTNeoXForCausalLM' is not supported"):
        Transformer.from_pretrained(saved)


def test_sliding_window_refused(tmp_path):
    tiny_model("mistral", sliding_window=64).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="sliding_window=64"):
        Transformer.from_pretrained(tmp_path)


def test_pytorch_model_bin_never_unpickled(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    # A pickle that would run code if loaded: the loader must refuse before touching it.
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch pwned'\ntR.")
    with pytest.raises(CheckpointError, match=r"only pytorch_model\.bin found"):
        Transformer.from_pretrained(tmp_path)
    assert not (tmp_path / "pwned").exists()
