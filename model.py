"""A LLaMA-family transformer, written out by hand, that loads and saves Hugging Face checkpoints.

One file, read top to bottom: the config (from the checkpoint's `config.json`), the four
pieces of a LLaMA block (RMSNorm, rotary position embedding, grouped-query attention,
SwiGLU MLP), the model, a static KV cache for generation, and loading / saving of
safetensors checkpoints. It covers `LlamaForCausalLM`, `MistralForCausalLM` (without a
sliding window) and `Qwen2ForCausalLM` (q/k/v biases). Module names follow the Hugging
Face weight names, so a checkpoint maps onto the model with no renaming table.

Where the families differ is data, not code: `ModelConfig` fields (`qkv_bias`,
`activation`, `norm_offset`, `embedding_scale`) that `family_fields` reads from config.json.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError, fail_point
from common.files import created_mode, read_json, temp_path, write_json

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded; the message names the file or key at fault."""


# -----------------------------------------------------------------------------
# Config


# The MLP's gate activation, by config.json's `hidden_act` name: a family that gates with
# another function (Gemma: "gelu_pytorch_tanh") adds its entry here.
ACTIVATIONS = {"silu": F.silu}


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    dim: int  # hidden_size
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads means grouped-query attention
    head_dim: int  # explicit: Mistral-Nemo has 128 != 5120 / 32
    hidden_dim: int  # the MLP's intermediate_size
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # {"rope_type": "llama3" | "linear", ...} or None
    max_seq_len: int
    tie_embeddings: bool
    # Where the families differ, each field read from config.json by `family_fields`. The
    # defaults are LLaMA's; a new family (Gemma: norm offset 1, GELU, embeddings scaled by
    # sqrt(dim)) is a branch there that sets them, and the module code needs no change.
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v (not on o)
    activation: str = "silu"  # the MLP's gate, a key of ACTIVATIONS
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight)
    embedding_scale: float = 1.0  # token embeddings are multiplied by this

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> ModelConfig:
        """Read the fields we need from a Hugging Face config dict, refusing what we cannot run."""
        arch = check_supported(hf, source)
        rope, rope_type = rope_parameters(hf)
        n_heads = hf["num_attention_heads"]
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,  # absent means MHA
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            hidden_dim=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            max_seq_len=hf.get("max_position_embeddings", 4096),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            **family_fields(arch, hf),
        )


def family_fields(arch: str, hf: dict) -> dict:
    """The ModelConfig fields in which the supported families differ, from their config.json."""
    return {
        "qkv_bias": arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
        "activation": hf.get("hidden_act", "silu"),
    }


def rope_parameters(hf: dict) -> tuple[dict, str]:
    """The rotary embedding's parameters and scaling type ("default" when unscaled)."""
    # transformers 5 moved rope_theta and the scaling into `rope_parameters`.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    return rope, rope.get("rope_type", rope.get("type", "default"))


def check_supported(hf: dict, source: str) -> str:
    """The architecture of a Hugging Face config, or a CheckpointError naming what we cannot run."""
    arch = (hf.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{source}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})."
        )
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key not in hf:
            raise CheckpointError(f"{source}: required key {key!r} is missing.")
    if hf.get("hidden_act", "silu") not in ACTIVATIONS or hf.get("mlp_bias", False):
        raise CheckpointError(
            f"{source}: hidden_act={hf.get('hidden_act')!r}, mlp_bias="
            f"{hf.get('mlp_bias', False)} is not supported (only {', '.join(ACTIVATIONS)}, no bias)."
        )
    # A sliding window changes which keys a query may see; we only implement full
    # causal attention, so a config that actually slides is refused rather than run wrong.
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", arch == "MistralForCausalLM")
    max_pos = hf.get("max_position_embeddings", 4096)
    if uses_window and window is not None and window < max_pos:
        raise CheckpointError(
            f"{source}: sliding_window={window} (< max_position_embeddings="
            f"{max_pos}) is not supported; only full causal attention is."
        )
    rope_type = rope_parameters(hf)[1]
    if rope_type not in ("default", "llama3", "linear"):
        raise CheckpointError(
            f"{source}: rope type {rope_type!r} is not supported (supported: default, linear, llama3)."
        )
    return arch


# -----------------------------------------------------------------------------
# The pieces of a block


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain. Computed in fp32.

    The gain is offset + weight: 0 + weight for LLaMA; Gemma stores its gain minus one.
    """

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32 for the mean of squares: bf16 loses the small components of a large vector.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.offset + self.weight) * x32.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """The rotary frequencies, one per pair of channels, with the checkpoint's scaling applied."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths (low frequencies) are slowed by `factor`, short ones are kept,
    # and the band in between is interpolated smoothly (Llama 3.1 paper, section 4.2 code).
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(in_band, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos and sin tables for integer positions (B, T), in fp32 then cast: (B, T, hd) each."""
    freqs = positions.float()[..., None] * inv_freq.float()  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd): rotate-half layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate channel pairs (i, i + hd/2) of x (B, nh, T, hs): the layout HF checkpoints store q/k in."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    """Causal grouped-query self-attention: n_kv_heads key/value heads shared by n_heads queries."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hs): every slot filled so far
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """A gated linear unit between two projections: SwiGLU with LLaMA's SiLU gate."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# KV cache


class KVCache:
    """Static per-layer key/value buffers for batched decoding (as in gpt-fast).

    All rows share slot numbers: prompts are left-padded so that they end on the same slot
    and every decode step writes one new slot for every row. `valid[b, s]` says whether
    slot s of row b holds a real token (False for left padding); it gives both the
    attention mask and each row's own positions.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype, device):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0  # slots filled by the layers of completed forward passes

    def claim(self, T: int, valid=None) -> torch.Tensor:
        """Take the next T slots for a forward pass; the validity of every slot up to their end (B, S).

        valid (B, T) marks this pass's padding (None: none).
        """
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {T} tokens > max_len {self.max_len}.")
        self.valid[:, self.length : self.length + T] = True if valid is None else valid
        return self.valid[:, : self.length + T]

    def update(self, layer: int, k, v):
        """Write this pass's k/v (B, nkv, T, hs) after the filled slots; return all slots so far."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T: int) -> None:
        """Count the T claimed slots as filled, once every layer has written them."""
        self.length += T

    def copy_prefix(self, other: KVCache) -> None:
        """Fill this empty cache's first slots, in every row, with what a one-row cache holds.

        A prefix shared by all rows (few-shot turns) is then computed once, not once per row.
        """
        if self.length:
            raise ValueError("copy_prefix needs an empty cache.")
        n = other.length
        for layer in range(len(self.k)):
            self.k[layer][:, :, :n] = other.k[layer][:, :, :n]
            self.v[layer][:, :, :n] = other.v[layer][:, :, :n]
        self.valid[:, :n] = other.valid[:, :n]
        self.length = n


def positions_and_mask(valid: torch.Tensor, T: int):
    """Positions of the last T slots and their attention mask, from slot validity (B, S).

    A query at slot i sees key slot j when j <= i (causal) and slot j holds a real token.
    Each row counts positions over its own real tokens, so a left-padded row starts at
    position 0 just like an unpadded one. A padding query is also let see itself: a row of
    the mask with nothing visible would make softmax return NaN, and a NaN value times a
    zero weight is still NaN in every later layer.
    """
    S = valid.shape[1]
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, S - T :]  # (B, T)
    q_slot = torch.arange(S - T, S, device=valid.device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=valid.device)[None, :]  # (1, S)
    mask = (k_slot <= q_slot) & (valid[:, None, :] | (k_slot == q_slot))  # (B, T, S)
    return positions, mask[:, None]  # mask: (B, 1, T, S)


# -----------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    """Token ids in, next-token logits (or the final hidden states) out."""

    def __init__(self, cfg: ModelConfig, hf_config: dict | None = None):
        super().__init__()
        self.config = cfg
        self.hf_config = dict(hf_config or {})  # written back unchanged by save_pretrained
        self.source_dir: Path | None = None
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output projection (V, dim); the token embedding itself when they are tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, tokens, valid=None, cache: KVCache | None = None, every_layer: bool = False):
        """The final normalised hidden states (B, T, dim), before the output projection.

        tokens: (B, T) ids. valid: (B, T) bool, False on padding (None: no padding). With a
        cache, the tokens fill the next T slots and attend to everything cached before them.
        every_layer: return instead the residual stream after the embedding and after each
        block, a list of n_layers + 1 tensors (B, T, dim), none normalised (the default return
        is the final norm of the last one): what a linear probe of each layer reads.
        """
        B, T = tokens.shape
        if cache is not None:
            valid = cache.claim(T, valid)
        if valid is None:
            # No padding: plain causal attention, which SDPA runs without building a mask.
            positions = torch.arange(T, device=tokens.device).expand(B, T)
            mask = None
        else:
            positions, mask = positions_and_mask(valid, T)
        x = self.embed_tokens(tokens) * self.config.embedding_scale  # (B, T, dim)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        states = [x]
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i)
            if every_layer:
                states.append(x)
        if cache is not None:
            cache.advance(T)
        return states if every_layer else self.norm(x)

    def forward(self, tokens, valid=None, cache: KVCache | None = None):
        """Logits (B, T, V) for each position's next token."""
        return F.linear(self.hidden_states(tokens, valid, cache), self.lm_head_weight)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len, p.dtype, p.device)

    # -------------------------------------------------------------------------
    # Loading and saving Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> Transformer:
        """Load a LLaMA-family checkpoint directory (config.json + safetensors, one file or sharded).

        dtype: None keeps the checkpoint's dtype (`torch_dtype` / `dtype` in config.json).
        Tensors are memory-mapped and converted one at a time into the requested dtype and
        device, so peak memory is about one copy of the model.
        """
        model = cls.empty(path)
        dtype = dtype or model.checkpoint_dtype
        shapes = {name: p.shape for name, p in model.named_parameters()}
        state = {
            name: t.to(device=device, dtype=dtype)
            for name, t in checkpoint_state(model.source_dir, shapes, model.config.architecture)
        }
        model.load_state_dict(state, assign=True)
        model.inv_freq = rope_inv_freq(model.config).to(device)
        return model.eval()

    @classmethod
    def empty(cls, path) -> Transformer:
        """The model a checkpoint's config.json describes, on the meta device: every shape, no weight."""
        path = Path(path)
        hf = read_config(path)
        with torch.device("meta"):
            model = cls(ModelConfig.from_hf(hf, str(path / "config.json")), hf)
        model.source_dir = path
        return model

    @property
    def checkpoint_dtype(self) -> torch.dtype:
        """The dtype config.json names (`torch_dtype` or `dtype`; float32 when it names none)."""
        return getattr(torch, str(self.hf_config.get("torch_dtype") or self.hf_config.get("dtype") or "float32"))

    def save_pretrained(self, path, max_shard_size: int = 5 * 2**30):
        """Write config.json and safetensors (sharded above max_shard_size bytes) that transformers loads."""
        params = list(self.named_parameters())
        specs = {hf_name(n): (p.dtype, tuple(p.shape)) for n, p in params}
        self.write_checkpoint(path, specs, (p.detach().cpu() for _, p in params), max_shard_size)

    def write_checkpoint(self, path, specs: dict, tensors, max_shard_size: int = 5 * 2**30) -> None:
        """A checkpoint directory of these weights: specs {HF name: (dtype, shape)}, tensors each of them
        in that order (see write_safetensors).

        Tokenizer and generation files of the checkpoint this model came from are copied
        along, so the directory is a complete model. Written into a temporary directory
        that replaces `path` only when complete.
        """
        path = Path(path)
        tmp = temp_path(path)  # a leftover of this pid can only be a dead process's
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)  # with the user's umask, like every file in it
        try:
            hf = dict(self.hf_config)
            dtype_key = "dtype" if "dtype" in hf else "torch_dtype"
            hf[dtype_key] = str(specs["model.embed_tokens.weight"][0]).removeprefix("torch.")
            write_json(tmp / "config.json", hf, sort_keys=True)
            write_safetensors(tmp, specs, tensors, max_shard_size)
            if self.source_dir is not None:
                for name in AUX_FILES:
                    if (self.source_dir / name).is_file():
                        shutil.copy2(self.source_dir / name, tmp / name)
            for f in tmp.iterdir():  # safetensors writes 0600 and copy2 keeps the source's mode: the umask decides
                os.chmod(f, created_mode())
            fail_point("save")
            replace_dir(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def hf_name(name: str) -> str:
    """A parameter's name in a Hugging Face checkpoint: under `model.`, except the output projection."""
    return name if name.startswith("lm_head") else "model." + name


def checkpoint_state(path: Path, shapes: dict, architecture: str):
    """(our parameter name, tensor) for each weight of the checkpoint at path, checked against the
    model's parameter shapes {name: shape}: no tensor unexpected, none of another shape, none missing.
    Memory-mapped, one tensor at a time."""
    tied = "lm_head.weight" not in shapes
    seen = set()
    for name, tensor, file in iter_checkpoint_tensors(path):
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and tied:
            continue  # some tied checkpoints still carry a copy; the embedding is what counts
        ours = name.removeprefix("model.")
        if ours not in shapes:
            raise CheckpointError(f"{file}: unexpected tensor {name!r} for {architecture}.")
        if tuple(tensor.shape) != tuple(shapes[ours]):
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(shapes[ours])} from config.json."
            )
        seen.add(ours)
        yield ours, tensor
    missing = sorted(set(shapes) - seen)
    if missing:
        raise CheckpointError(
            f"{path}: tensor {hf_name(missing[0])!r} is missing from the checkpoint ({len(missing)} missing in all)."
        )


# Files of a checkpoint that are not weights but make it usable: copied by save_pretrained.
AUX_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


# safetensors' names of the dtypes a checkpoint is written in.
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_safetensors(path: Path, specs: dict, tensors, max_shard_size: int) -> None:
    """model.safetensors, or shards of at most max_shard_size bytes and the index naming them,
    written one tensor at a time.

    specs: {name: (dtype, shape)} of every tensor, in order; tensors: an iterable giving each
    of them in that order (converted to its dtype, moved to the CPU). Every byte offset follows
    from the specs, so a file's header is written first and each tensor goes to disk as it
    arrives: a model gathered from shards one weight at a time is never whole in memory.
    """
    sizes = {n: math.prod(shape) * dtype.itemsize for n, (dtype, shape) in specs.items()}
    shards, size = [[]], 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    tensors = iter(tensors)
    for fname, names in zip(files, shards):
        with open(path / fname, "wb") as f:
            f.write(safetensors_header({n: specs[n] for n in names}, sizes))
            for name in names:
                t = next(tensors).detach().to(specs[name][0]).contiguous()
                if tuple(t.shape) != tuple(specs[name][1]):
                    raise ValueError(f"{name}: got shape {tuple(t.shape)}, its spec says {specs[name][1]}.")
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
    if len(shards) > 1:
        weight_map = {n: fname for fname, names in zip(files, shards) for n in names}
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        write_json(path / "model.safetensors.index.json", index, sort_keys=True)


def safetensors_header(specs: dict, sizes: dict) -> bytes:
    """The header of a safetensors file holding these tensors back to back, in order: its length
    (8 bytes, little-endian), then JSON naming each tensor's dtype, shape and byte range, padded
    with spaces to a multiple of 8 bytes as the format's own writer does."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, shape) in specs.items():
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + sizes[name]],
        }
        offset += sizes[name]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def read_config(path: Path) -> dict:
    """config.json of a checkpoint directory, with a clear error for each way it can be absent."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist.")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: config.json is missing from the checkpoint directory.")
    return read_json(cfg_file, CheckpointError, "config")


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, or the single file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, CheckpointError, "shard index").get("weight_map")
        if not (isinstance(weight_map, dict) and weight_map and all(isinstance(f, str) for f in weight_map.values())):
            raise CheckpointError(f"{index}: 'weight_map' is missing, empty or not a map of tensor names to files.")
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard named in {index.name} is missing.")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if (path / "pytorch_model.bin").is_file() or any(path.glob("pytorch_model-*.bin")):
        # Unpickling can run arbitrary code, so .bin checkpoints are refused, not loaded.
        raise CheckpointError(
            f"{path}: only pytorch_model.bin found; convert it to safetensors (it is never unpickled here)."
        )
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json found.")


def iter_checkpoint_tensors(path: Path):
    """Yield (name, tensor, file) for every tensor of the checkpoint, memory-mapped."""
    from safetensors import SafetensorError, safe_open

    for f in checkpoint_files(path):
        try:
            with safe_open(f, framework="pt", device="cpu") as sf:
                for name in sf.keys():  # noqa: SIM118 (safe_open is not iterable)
                    yield name, sf.get_tensor(name), f
        except SafetensorError as e:
            raise CheckpointError(f"{f}: not a valid safetensors file ({e}).") from None


def replace_dir(src: Path, dst: Path) -> None:
    """Put directory src at dst; an existing dst is moved aside first and removed only after
    (common.files.remove_stale_temps puts it back if a kill comes between the two renames)."""
    old = None
    if dst.exists():
        old = temp_path(dst, "old")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
