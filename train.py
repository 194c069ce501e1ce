"""
Dual instruction tuning: the second half of PT-ALIGN, and the project's main entry point.

    python train.py                                   # everything, on the embedded default model
    python train.py --model DIR --data d.jsonl --lora-rank 16   # a LLaMA-family checkpoint, one GPU

Read top to bottom, one run is:
  1. the dual dataset: --data, or OUT/data.jsonl written by `ptalign.py generate` (resumable);
  2. an evaluation of the original model on held-out prompts (OUT/eval_before.json);
  3. dual instruction tuning: MLE on the positive responses, unlikelihood on the harmful
     spans of the toxic ones, one fused loss straight from the final hidden states;
  4. the aligned checkpoint at OUT/final (transformers loads it), its evaluation
     (OUT/eval_after.json) and the before/after table.
OUT/ckpt holds the checkpoint --resume continues from; OUT/metrics.jsonl one line per step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import ptalign
from data import Tokenizer, default_model_path
from data.dataset import IGNORE, DatasetError, batches, build_examples, load_records
from data.default_model import DefaultModelError
from data.tokenizer import TokenizerError
from kernels import fused_linear_pt_loss
from model import CheckpointError, Transformer, iter_checkpoint_tensors, replace_dir

# Settings that depend on the machine. The cpu preset makes the whole default run (dataset,
# both evaluations, training) finish in under 20 minutes on 2 cores with the 135M default
# model; the gpu preset is for a 7B/8B model on one GPU. Any flag given overrides its preset.
PRESETS = {
    "cpu": dict(
        questions=32,
        rounds=2,
        epochs=3,
        batch_size=4,
        grad_accum=1,
        max_len=256,
        lr=5e-5,
        lora_lr=5e-4,
        save_every=10,
        eval_limit=24,
        eval_max_new_tokens=48,
        grad_checkpointing=False,
    ),
    "gpu": dict(
        questions=64,
        rounds=2,
        epochs=3,
        batch_size=4,
        grad_accum=8,
        max_len=1024,
        lr=1e-5,
        lora_lr=2e-4,
        save_every=100,
        eval_limit=None,
        eval_max_new_tokens=64,
        grad_checkpointing=True,
    ),
}


@dataclass
class TrainConfig:
    model: str | None = None  # checkpoint directory; None: the embedded default model
    data: str | None = None  # dual dataset JSONL; None: generate OUT/data.jsonl
    out: str = "runs/ptalign"
    preset: str = "cpu"
    device: str = "cpu"
    precision: str = "fp32"  # fp32, or bf16 (autocast, fp32 master weights)
    loss: str = "both"  # both | mle | ut
    alpha: float = 1.0
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 5e-5
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_len: int = 256
    lora_rank: int = 0
    lora_alpha: float = 16.0
    grad_checkpointing: bool = False
    seed: int = 0
    save_every: int = 10
    resume: bool = False
    questions: int = 32
    rounds: int = 2
    eval_limit: int | None = 24
    eval_max_new_tokens: int = 48
    skip_eval: bool = False


class TrainError(RuntimeError):
    """A run that cannot go on; the message says why and what to do."""


# -----------------------------------------------------------------------------
# LoRA: a trainable low-rank update on each attention and MLP projection

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
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))  # B = 0: starts as the base model
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged_weight(self) -> torch.Tensor:
        """W + scale B A, added in fp32 and returned in W's dtype."""
        w = self.base.weight
        return (w.float() + self.scale * (self.lora_B.float() @ self.lora_A.float())).to(w.dtype)


def add_lora(model: Transformer, rank: int, alpha: float) -> None:
    """Freeze the model and put a LoRA adapter on every attention and MLP projection."""
    model.requires_grad_(False)
    for parent in list(model.modules()):
        for name in LORA_TARGETS:
            if isinstance(getattr(parent, name, None), nn.Linear):
                setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))


def lora_layers(model):
    """(parent module, attribute name, LoRALinear) for each adapted projection."""
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, LoRALinear)
    ]


@contextmanager
def merged(model):
    """The model with each LoRA layer swapped for a plain nn.Linear holding the merged weight.

    What save_pretrained then writes is an ordinary checkpoint with the HF weight names. The
    merged weights go to the CPU one at a time (saving copies them there anyway), so the GPU
    never holds a second copy of the projections.
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


# -----------------------------------------------------------------------------
# The loss


def micro_batch_loss(model, ids, targets, ut, w_mle: float, alpha_eff: float, device, precision: str):
    """Loss of one micro-batch, scaled so that the micro-batches of one step add up to its mean loss.

    The step's loss is  sum_MLE(-log p) / n_mle + alpha * sum_UT(-log(1 - p)) / n_ut  with the
    counts taken over all its micro-batches (a plain mean per micro-batch would weigh a token
    by the size of its micro-batch). So each micro-batch runs the fused loss with
    reduction="sum" and alpha_eff = alpha * n_mle / n_ut, times w_mle = 1 / n_mle: that is
    exactly its share. Only positions with a target reach the loss: the prompt, the toxic
    tokens outside the spans and the padding are left out before the output projection.
    Returns (scaled loss, LossParts of this micro-batch).
    """
    keep = (targets.reshape(-1) != IGNORE).nonzero().squeeze(1)  # found on the CPU: no device sync
    t, u = targets.reshape(-1)[keep].to(device), ut.reshape(-1)[keep].to(device)
    # No autocast cache: it would hold a bf16 copy of every weight until the forward ends
    # (16 GB for an 8B model), which full fine-tuning on one 141 GB GPU cannot spare.
    bf16 = torch.autocast(device.type, torch.bfloat16, cache_enabled=False) if precision == "bf16" else nullcontext()
    with bf16:
        # Right padding with plain causal attention: no real token ever attends to a pad.
        hidden = model.hidden_states(ids.to(device))
    hidden = hidden.flatten(0, 1).index_select(0, keep.to(device))
    weight = model.lm_head_weight
    if precision == "bf16":  # bf16 logits, fp32 statistics inside the kernel
        hidden, weight = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
    loss, parts = fused_linear_pt_loss(hidden, weight, t, u, alpha=alpha_eff, reduction="sum", return_parts=True)
    return loss * w_mle, parts


def lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    """Linear warmup to lr over `warmup` steps, then cosine decay to lr / 10 at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)
    return lr / 10 + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (lr - lr / 10)


# -----------------------------------------------------------------------------
# Checkpoints


def save_model(model, path) -> None:
    """save_pretrained of the model as it is, with LoRA merged: a plain checkpoint transformers loads."""
    with merged(model):
        model.save_pretrained(path)


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def save_checkpoint(model, optimizer, step: int, cfg: TrainConfig, fingerprint: dict, out: Path) -> None:
    """OUT/ckpt: the weights (save_pretrained) and trainer_state.pt, built in a temporary
    directory and renamed into place only when complete, so a crash never leaves half of one."""
    tmp = out / f".ckpt.tmp-{os.getpid()}"
    save_model(model, tmp)
    lora = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "lora": lora,
            "rng": rng_state(),
            "config": asdict(cfg),
            "fingerprint": fingerprint,
        },
        tmp / "trainer_state.pt",
    )
    replace_dir(tmp, out / "ckpt")


def load_checkpoint(model, optimizer, fingerprint: dict, out: Path, device) -> int:
    """Restore weights, optimiser, RNG from OUT/ckpt; return the number of steps it had done."""
    ckpt = out / "ckpt"
    state = torch.load(ckpt / "trainer_state.pt", map_location=device, weights_only=True)
    for key, value in fingerprint.items():
        old = state["fingerprint"].get(key)
        if old != value:
            raise TrainError(
                f"{ckpt}: written with {key}={old!r}, this run has {key}={value!r}; "
                "resume with the same settings, or use another --out."
            )
    if state["lora"]:
        model.load_state_dict(state["lora"], strict=False)
    else:  # full fine-tuning: the weights are the checkpoint's safetensors, in the master dtype
        ours = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor, _ in iter_checkpoint_tensors(ckpt):  # memory-mapped, one at a time
                ours[name.removeprefix("model.")].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"].cpu())
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
    return state["step"]


# -----------------------------------------------------------------------------
# What the user sees


class Progress:
    """One status line on stderr: step, loss and its parts, tokens/s, ETA.

    On a terminal the line is redrawn in place; into a file or pipe it is printed once per step.
    """

    def __init__(self, total: int, start: int):
        self.total, self.start, self.t0, self.tokens = total, start, time.perf_counter(), 0
        self.tty = sys.stderr.isatty()

    def update(self, m: dict) -> None:
        self.tokens += m["tokens"]
        dt = time.perf_counter() - self.t0
        done = m["step"] - self.start
        eta = (self.total - m["step"]) * dt / max(done, 1)
        bar = "#" * int(20 * m["step"] / self.total)
        line = (
            f"step {m['step']}/{self.total} [{bar:<20}] loss {m['loss']:.4g} (mle {m['mle']:.4g}, "
            f"ut {m['ut']:.4g})  lr {m['lr']:.2e}  {self.tokens / dt:.0f} tok/s  ETA {eta / 60:.1f} min"
        )
        print(("\r" + line + "\033[K") if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def plot_losses(metrics: list[dict], path: Path) -> None:
    """OUT/loss.png: total loss and its MLE and UT parts per step (needs matplotlib, optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{path}: not written; the loss plot needs matplotlib (pip install matplotlib).", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [m["step"] for m in metrics]
    for key in ("loss", "mle", "ut"):
        ax.plot(steps, [m[key] for m in metrics], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def spread(items: list, limit: int | None) -> list:
    """`limit` items evenly spaced through the list (the prompt sets are grouped by category)."""
    if limit is None or limit >= len(items):
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


def evaluate(model, tok, records, cfg: TrainConfig, run: dict) -> dict:
    """ptalign's evaluation on the held-out prompt sets (an evenly spaced --eval-limit subset)."""
    harmful = spread(ptalign.load_prompts(ptalign.DATA / "eval_harmful.jsonl"), cfg.eval_limit)
    benign = spread(ptalign.load_prompts(ptalign.DATA / "eval_benign.jsonl"), cfg.eval_limit)
    report = ptalign.evaluate(
        model, tok, harmful, benign, records, cfg.eval_max_new_tokens, log=lambda s: print(s, file=sys.stderr)
    )
    return {**report, "run": run}


# -----------------------------------------------------------------------------
# Training


def setup(cfg: TrainConfig, model_path, device):
    """The model to train (LoRA-wrapped if asked), its trainable parameters and their AdamW."""
    torch.manual_seed(cfg.seed)
    # Full fine-tuning keeps fp32 master weights even for bf16 compute: an AdamW update is
    # often below bf16's resolution (2^-8 relative) and would be rounded away. Under LoRA the
    # base weights never change, so they may stay bf16; the adapters are fp32.
    base_dtype = torch.bfloat16 if cfg.precision == "bf16" and cfg.lora_rank else torch.float32
    model = Transformer.from_pretrained(model_path, dtype=base_dtype, device=device)
    if cfg.lora_rank:
        add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    model.gradient_checkpointing = cfg.grad_checkpointing
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]  # norms, biases
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    return model, params, optimizer


def train_step(model, params, optimizer, micro, cfg: TrainConfig, lr: float, device) -> dict:
    """One optimizer step over a list of micro-batches; its metrics. A non-finite loss or gradient
    raises TrainError (naming the parts) before the update."""
    n_mle = sum(int(((t != IGNORE) & ~u).sum()) for _, t, u in micro)  # counted on the CPU
    n_ut = sum(int(((t != IGNORE) & u).sum()) for _, t, u in micro)
    w_mle, alpha_eff = 1 / max(n_mle, 1), cfg.alpha * max(n_mle, 1) / max(n_ut, 1)
    t0 = time.perf_counter()
    sums = torch.zeros(3, device=device)  # loss, sum of MLE -log p, sum of UT -log(1 - p)
    for ids, targets, ut in micro:
        loss, parts = micro_batch_loss(model, ids, targets, ut, w_mle, alpha_eff, device, cfg.precision)
        loss.backward()
        sums += torch.stack([loss.detach(), parts.mle * parts.n_mle, parts.ut * parts.n_ut])
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    # One host sync per step, before the update: a non-finite loss must never reach the weights.
    loss_v, mle_sum, ut_sum, norm_v = torch.cat([sums, grad_norm.reshape(1).float()]).tolist()
    m = {
        "loss": loss_v,
        "mle": mle_sum / max(n_mle, 1),
        "ut": ut_sum / max(n_ut, 1),
        "n_mle": n_mle,
        "n_ut": n_ut,
        "lr": lr,
        "grad_norm": norm_v,
        "tokens": sum(ids.numel() for ids, _, _ in micro),
    }
    if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
        raise TrainError(f"mle={m['mle']:.4g}, ut={m['ut']:.4g}, grad norm={norm_v:.4g}")
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**m, "seconds": time.perf_counter() - t0}


def train(cfg: TrainConfig, examples, tok, model_path, fingerprint: dict, out: Path) -> None:
    """Dual instruction tuning from `examples`; writes OUT/final, OUT/ckpt and OUT/metrics.jsonl."""
    device = torch.device(cfg.device)
    model, params, optimizer = setup(cfg, model_path, device)
    # Optimizer steps never span two epochs; the last one of an epoch may have fewer micro-batches.
    steps_per_epoch = math.ceil(math.ceil(len(examples) / cfg.batch_size) / cfg.grad_accum)
    total = cfg.epochs * steps_per_epoch
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * total))

    start = 0
    if cfg.resume and (out / "ckpt" / "trainer_state.pt").is_file():
        start = load_checkpoint(model, optimizer, fingerprint, out, device)
        print(f"resuming from {out / 'ckpt'} at step {start}/{total}", file=sys.stderr)
    elif cfg.resume:
        print(f"no checkpoint in {out / 'ckpt'}; starting from step 0", file=sys.stderr)
    elif (out / "ckpt").exists():
        print(f"note: starting over; {out / 'ckpt'} will be replaced (--resume continues it)", file=sys.stderr)
    # Keep the metrics of the steps the weights contain; a crashed run may have logged more.
    metrics_file = out / "metrics.jsonl"
    old = [json.loads(x) for x in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    history = [m for m in old if m["step"] <= start]
    metrics_file.write_text("".join(json.dumps(m) + "\n" for m in history))
    kind = f"LoRA r={cfg.lora_rank}" if cfg.lora_rank else "full"
    print(
        f"training: {len(examples)} examples, {total} steps of {cfg.batch_size}x{cfg.grad_accum}, "
        f"{sum(p.numel() for p in params) / 1e6:.1f}M trainable parameters ({kind}), {cfg.device} {cfg.precision}",
        file=sys.stderr,
    )

    progress, epoch_batches, last_saved = Progress(total, start), {}, start
    for step in range(start, total):
        epoch, k = divmod(step, steps_per_epoch)
        if epoch not in epoch_batches:  # the order is a function of (seed, epoch) alone: resumable
            epoch_batches = {epoch: list(batches(examples, cfg.batch_size, cfg.seed, epoch, tok.pad_id))}
        micro = epoch_batches[epoch][k * cfg.grad_accum : (k + 1) * cfg.grad_accum]
        try:
            m = {
                "step": step + 1,
                "epoch": epoch,
                **train_step(model, params, optimizer, micro, cfg, lr_at(step, total, warmup, cfg.lr), device),
            }
        except TrainError as err:
            kept = (
                f"last good checkpoint kept at {out / 'ckpt'} (step {last_saved})"
                if last_saved
                else "no checkpoint had been saved yet"
            )
            raise TrainError(
                f"non-finite loss at step {step + 1} ({err}); the weights were not updated; {kept}. "
                "Try a lower --lr, or --precision fp32."
            ) from None
        history.append(m)
        with open(metrics_file, "a") as f:
            f.write(json.dumps(m) + "\n")
        progress.update(m)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
            save_checkpoint(model, optimizer, step + 1, cfg, fingerprint, out)
            last_saved = step + 1
    progress.close()

    # The final checkpoint in the source checkpoint's dtype (a bf16 8B model stays 16 GB).
    del optimizer
    model.to(getattr(torch, str(model.hf_config.get("torch_dtype") or model.hf_config.get("dtype")), torch.float32))
    save_model(model, out / "final")
    if history:
        first, last = history[0], history[-1]
        print(
            f"loss {first['loss']:.4g} -> {last['loss']:.4g} (mle {first['mle']:.4g} -> {last['mle']:.4g}, "
            f"ut {first['ut']:.4g} -> {last['ut']:.4g}); aligned checkpoint: {out / 'final'}",
            file=sys.stderr,
        )
        plot_losses(history, out / "loss.png")


# -----------------------------------------------------------------------------
# The whole pipeline


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def run(cfg: TrainConfig) -> dict:
    """Dataset, evaluation before, training, evaluation after; returns the two reports."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".ckpt.tmp-*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    ptalign.write_json_atomic(out / "train_config.json", asdict(cfg))
    model_path = Path(cfg.model) if cfg.model else default_model_path()
    tok = Tokenizer.from_pretrained(model_path)
    device = torch.device(cfg.device)
    infer_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    phase = time.perf_counter()
    records = load_records(cfg.data) if cfg.data else None  # bad data fails before any model loads
    data_path = Path(cfg.data) if cfg.data else out / "data.jsonl"
    model = None
    if records is None:
        print(f"== dataset: generating {data_path} ==", file=sys.stderr)
        model = Transformer.from_pretrained(model_path, dtype=infer_dtype, device=device)
        gen = ptalign.build_parser().parse_args(
            [
                "generate",
                "--out",
                str(data_path),
                "--questions",
                str(cfg.questions),
                "--rounds",
                str(cfg.rounds),
                "--seed",
                str(cfg.seed),
            ]
            + (["--model", cfg.model] if cfg.model else [])
        )
        ptalign.run_generate(gen, model, tok)
        records = load_records(data_path)
        print(f"[dataset: {time.perf_counter() - phase:.0f} s]", file=sys.stderr)

    reports, before_file = {}, out / "eval_before.json"
    eval_run = {
        "model": str(model_path),
        "data_sha256": sha256(data_path),
        "eval_limit": cfg.eval_limit,
        "eval_max_new_tokens": cfg.eval_max_new_tokens,
    }
    if cfg.skip_eval:
        pass
    elif before_file.is_file() and json.loads(before_file.read_text()).get("run") == eval_run:
        reports["before"] = json.loads(before_file.read_text())
        print(f"evaluation before: reusing {before_file}", file=sys.stderr)
    else:
        phase = time.perf_counter()
        print("== evaluation before ==", file=sys.stderr)
        model = model or Transformer.from_pretrained(model_path, dtype=infer_dtype, device=device)
        reports["before"] = evaluate(model, tok, records, cfg, eval_run)
        ptalign.write_json_atomic(before_file, reports["before"])
        print(f"[evaluation before: {time.perf_counter() - phase:.0f} s]", file=sys.stderr)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the inference copy's memory goes back before the master weights load

    examples, stats = build_examples(records, tok, cfg.max_len, cfg.loss)
    print(
        f"dataset {data_path}: {len(records)} records -> {len(examples)} examples ({stats['dropped_long_prompt']} "
        f"dropped: prompt longer than --max-len, {stats['truncated']} truncated)",
        file=sys.stderr,
    )
    if not examples:
        raise TrainError(f"{data_path}: no example fits in --max-len {cfg.max_len}; raise --max-len.")
    # What must not change between an interrupted run and its resumption.
    fingerprint = {
        k: getattr(cfg, k)
        for k in (
            "loss",
            "alpha",
            "epochs",
            "max_steps",
            "batch_size",
            "grad_accum",
            "lr",
            "warmup_steps",
            "weight_decay",
            "grad_clip",
            "max_len",
            "lora_rank",
            "lora_alpha",
            "seed",
            "precision",
        )
    }
    fingerprint |= {"model": str(model_path), "data_sha256": sha256(data_path)}
    phase = time.perf_counter()
    print("== dual instruction tuning ==", file=sys.stderr)
    train(cfg, examples, tok, model_path, fingerprint, out)
    print(f"[training: {time.perf_counter() - phase:.0f} s]", file=sys.stderr)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if not cfg.skip_eval:
        phase = time.perf_counter()
        print("== evaluation after ==", file=sys.stderr)
        model = Transformer.from_pretrained(out / "final", dtype=infer_dtype, device=device)  # what was saved
        reports["after"] = evaluate(model, tok, records, cfg, {**eval_run, "model": str(out / "final")})
        ptalign.write_json_atomic(out / "eval_after.json", reports["after"])
        print(f"[evaluation after: {time.perf_counter() - phase:.0f} s]", file=sys.stderr)
        print(ptalign.report_table(reports))
        ptalign.bar_chart(reports, out / "eval.png")
    return reports


def build_parser() -> argparse.ArgumentParser:
    def preset(key):
        cpu, gpu = (("all" if v is None else v) for v in (PRESETS["cpu"][key], PRESETS["gpu"][key]))
        return f" (cpu preset: {cpu}, gpu preset: {gpu})"

    p = argparse.ArgumentParser(
        description="PT-ALIGN dual instruction tuning, end to end: dataset, evaluation "
        "before, training with the fused MLE + unlikelihood loss, aligned checkpoint, "
        "evaluation after. With no flags it runs on the embedded default model."
    )
    a = p.add_argument
    a("--model", help="LLaMA-family checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    a("--data", help="dual dataset JSONL from `ptalign.py generate` (default: generate OUT/data.jsonl)")
    a(
        "--out",
        default="runs/ptalign",
        help="output directory: final/, ckpt/, metrics.jsonl, eval reports (default: runs/ptalign)",
    )
    a(
        "--preset",
        choices=list(PRESETS),
        help="machine defaults for the flags marked 'preset' (default: gpu when CUDA is available, else cpu)",
    )
    a("--device", help="torch device (default: cuda if available, else cpu)")
    a(
        "--precision",
        choices=["fp32", "bf16"],
        help="bf16: autocast with fp32 master weights (and a bf16 "
        "frozen base under LoRA); default: bf16 on cuda, fp32 on cpu",
    )
    a(
        "--loss",
        choices=["both", "mle", "ut"],
        default="both",
        help="both: MLE on positives + unlikelihood on "
        "toxic spans (PT-ALIGN); mle or ut: one side only, for the ablations (default: both)",
    )
    a("--alpha", type=float, default=1.0, help="weight of the unlikelihood term (default: 1.0)")
    a("--epochs", type=int, help="passes over the dataset" + preset("epochs"))
    a("--max-steps", type=int, help="stop after this many optimizer steps (the schedule ends there too)")
    a("--batch-size", type=int, help="examples per micro-batch" + preset("batch_size"))
    a("--grad-accum", type=int, help="micro-batches per optimizer step" + preset("grad_accum"))
    a(
        "--lr",
        type=float,
        help="peak learning rate; default: the preset's, for full fine-tuning"
        + preset("lr")
        + " or LoRA"
        + preset("lora_lr"),
    )
    a(
        "--warmup-steps",
        type=int,
        help="linear warmup steps before the cosine decay to lr/10 (default: 5%% of the steps, at least 1)",
    )
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices (default: 0)")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient's global norm to this (default: 1.0)")
    a(
        "--max-len",
        type=int,
        help="tokens per example; longer responses are cut, examples whose prompt does "
        "not fit are dropped and counted" + preset("max_len"),
    )
    a(
        "--lora-rank",
        type=int,
        default=0,
        help="train LoRA adapters of this rank on the attention and MLP "
        "projections instead of all weights; merged into the weights on save (default: 0, full fine-tuning)",
    )
    a(
        "--lora-alpha",
        type=float,
        default=16.0,
        help="LoRA scale numerator: the update is alpha/rank * B A (default: 16)",
    )
    a(
        "--grad-checkpointing",
        action=argparse.BooleanOptionalAction,
        help="recompute each block's activations in backward to save memory" + preset("grad_checkpointing"),
    )
    a("--seed", type=int, default=0, help="seed for the dataset, data order and LoRA init (default: 0)")
    a("--save-every", type=int, help="write OUT/ckpt every N optimizer steps; 0: never" + preset("save_every"))
    a(
        "--resume",
        action="store_true",
        help="continue from OUT/ckpt (same flags required): weights, optimizer, "
        "schedule, data order and RNG, so the result equals an uninterrupted run",
    )
    a("--questions", type=int, help="harmful questions to generate when --data is not given" + preset("questions"))
    a("--rounds", type=int, help="critique-and-revise rounds when generating" + preset("rounds"))
    a(
        "--eval-limit",
        type=int,
        help="evaluate on this many prompts of each held-out set, evenly spaced; 0 or less: all" + preset("eval_limit"),
    )
    a("--eval-max-new-tokens", type=int, help="reply length in evaluation" + preset("eval_max_new_tokens"))
    a("--skip-eval", action="store_true", help="no evaluation before or after (training only)")
    return p


def parse_args(argv=None) -> TrainConfig:
    """Flags, then the preset's values for the ones not given, as a TrainConfig."""
    args = vars(build_parser().parse_args(argv))
    cuda = torch.cuda.is_available()
    values = dict(PRESETS[args["preset"] or ("gpu" if cuda else "cpu")])
    lora_lr = values.pop("lora_lr")
    if args["lora_rank"]:
        values["lr"] = lora_lr
    values |= {k: v for k, v in args.items() if v is not None}
    values.setdefault("preset", "gpu" if cuda else "cpu")
    values.setdefault("device", "cuda" if cuda else "cpu")
    values.setdefault("precision", "bf16" if values["device"].startswith("cuda") else "fp32")
    if values["eval_limit"] is not None and values["eval_limit"] <= 0:
        values["eval_limit"] = None
    for key in ("epochs", "batch_size", "grad_accum", "max_len"):
        if values[key] < 1:
            raise SystemExit(f"error: --{key.replace('_', '-')} must be at least 1, got {values[key]}.")
    if values["lora_rank"] < 0:
        raise SystemExit(f"error: --lora-rank must be 0 (full fine-tuning) or positive, got {values['lora_rank']}.")
    return TrainConfig(**values)


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    try:
        return run(cfg)
    except (DatasetError, CheckpointError, TokenizerError, DefaultModelError, ptalign.PipelineError, TrainError) as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit(
            f"\ninterrupted; rerun with --resume to continue from the last checkpoint in {Path(cfg.out) / 'ckpt'}."
        )


if __name__ == "__main__":
    main()
