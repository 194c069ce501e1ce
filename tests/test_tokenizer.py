"""The tokenizer, chat template and the real default model against transformers."""

import pytest
import torch
import transformers

from data import Tokenizer
from data.tokenizer import TokenizerError
from generate import generate, generate_ids

STRINGS = [
    "Hello, world!",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "Unicode: naïve café, Straße, Ελληνικά, русский, 日本語の文章, 한국어",
    "Emoji 🎉🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n",
    "Numbers 1234567890 3.14159 -42 1e-9",
    "     \n\t   \u00a0  ",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>",
    "",
]


@pytest.fixture(scope="session")
def ours_tok(default_tok):
    return default_tok


@pytest.fixture(scope="session")
def hf_tok(default_dir):
    return transformers.AutoTokenizer.from_pretrained(default_dir)


@pytest.mark.parametrize("text", STRINGS)
def test_encode_matches_transformers(ours_tok, hf_tok, text):
    assert ours_tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert ours_tok.decode(ours_tok.encode(text), skip_special_tokens=False) == text


def test_offsets_cover_the_text(ours_tok):
    text = "Go ahead, make them pay — nobody will know 🎉"
    ids, offsets = ours_tok.encode_with_offsets(text)
    assert len(ids) == len(offsets)
    assert all(0 <= s <= e <= len(text) for s, e in offsets)
    assert offsets[-1][1] == len(text)


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_chat_template_matches_transformers(ours_tok, hf_tok, conv, gen_prompt):
    ref = hf_tok.apply_chat_template(conv, add_generation_prompt=gen_prompt, tokenize=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    ours = ours_tok.apply_chat_template(conv, add_generation_prompt=gen_prompt)
    assert ours == list(ref)
    assert ours.count(ours_tok.special_ids["<|im_start|>"]) == sum(1 for _ in conv) + gen_prompt + (
        0 if conv[0]["role"] == "system" else 1
    )  # SmolLM2 adds a default system turn


def test_stop_ids_and_pad(ours_tok):
    assert 2 in ours_tok.stop_ids  # <|im_end|>
    assert ours_tok.pad_id is not None


def test_default_model_logits_match_transformers(default_model, hf_default_model, ours_tok):
    ours, ref = default_model, hf_default_model
    ids = torch.tensor([ours_tok.apply_chat_template("Tell me a fun fact about octopuses.")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits)


def test_default_model_knows_paris(default_model, default_tok):
    reply = generate(default_model, default_tok, ["What is the capital of France?"], max_new_tokens=16)[0]
    assert "Paris" in reply


def test_default_model_greedy_matches_transformers(default_model, hf_default_model, ours_tok):
    model, ref = default_model, hf_default_model
    prompt = ours_tok.apply_chat_template("Name three colours.")
    ours = generate_ids(model, [prompt], ours_tok.stop_ids, ours_tok.pad_id, max_new_tokens=12)[0]
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([prompt]),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=ours_tok.stop_ids,
            pad_token_id=ours_tok.pad_id,
        )
    theirs = [t for t in out[0, len(prompt) :].tolist() if t not in ours_tok.stop_ids]
    assert ours == theirs[: len(ours)] and len(ours) == len(theirs)


def test_sampling_is_seeded(default_model, ours_tok):
    model = default_model
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9)
    a = generate(model, ours_tok, ["Say something."] * 2, seed=3, **kw)
    b = generate(model, ours_tok, ["Say something."] * 2, seed=3, **kw)
    assert a == b


# -----------------------------------------------------------------------------
# A sentencepiece tokenizer (tokenizer.model), trained here on a few sentences


def test_sentencepiece_encode_decode_offsets(sp_dir):
    tok = Tokenizer.from_pretrained(sp_dir)
    assert tok.kind == "sentencepiece"
    text = "go ahead and make them pay"
    ids, offsets = tok.encode_with_offsets(text)
    assert tok.decode(ids) == text
    assert "".join(text[s:e] for s, e in offsets).replace(" ", "") == text.replace(" ", "")
    chat = tok.apply_chat_template("hello")
    assert chat[0] == 1 and chat.count(1) == 1  # one BOS, from the template only
    assert 2 in tok.stop_ids


def test_missing_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)


def test_no_chat_template(sp_dir, tmp_path):
    import shutil

    shutil.copy(sp_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    tok = Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(TokenizerError, match="no 'chat_template'"):
        tok.apply_chat_template("hi")
