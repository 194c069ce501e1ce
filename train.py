"""
Dual instruction tuning: the second half of PT-ALIGN, and the project's main entry point.

    python train.py                                   # everything, on the embedded default model
    python train.py --model DIR --data d.jsonl --lora-rank 16   # a LLaMA-family checkpoint, one GPU

Read top to bottom, one run is:
  1. the dual dataset: --data, or OUT/data.jsonl written by `ptalign.run_generate` (resumable);
  2. an evaluation of the original model on held-out prompts (OUT/eval_before.json);
  3. dual instruction tuning: MLE on the positive responses, unlikelihood on the harmful
     spans of the toxic ones, one fused loss straight from the final hidden states;
  4. the aligned checkpoint at OUT/final (transformers loads it), its evaluation
     (OUT/eval_after.json) and the before/after table.
OUT/ckpt holds the checkpoint --resume continues from; OUT/metrics.jsonl one line per step;
OUT/train_config.json the settings of the run that was accepted last (ckpt/ holds its own).
Every setting, its flag and its presets: train_config.py.
"""

from __future__ import annotations

import copy
import math
import random
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import distributed
import evaluation
import ptalign
from common.charts import pyplot, save_figure
from common.errors import UserError, fail_point, one_line_errors
from common.files import (
    append_jsonl,
    check_output_dir,
    read_json,
    read_jsonl,
    remove_stale_temps,
    sha256,
    temp_path,
    write_json,
    write_jsonl,
)
from common.progress import Progress, log
from data import Tokenizer, default_model_path
from data.dataset import IGNORE, batches, build_examples, build_pairs, load_records
from data.prompt_sets import load_prompts, spread
from data.public import overlapping_prompts, public_prompts
from generate_config import GenerateConfig
from kernels import fused_linear_pt_loss
from lora import add_lora, merged
from model import Transformer, iter_checkpoint_tensors, replace_dir
from objectives import DecisionLoss, dpo_micro_batch_loss
from train_config import TrainConfig, fingerprint, parse_args


class TrainError(UserError):
    """A run that cannot go on; the message says why and what to do."""


@contextmanager
def stage(name: str, title: str | None = None):
    """A stage of the run, announced as `== title ==` and timed as `[name: N s]`."""
    t0 = time.perf_counter()
    log(f"== {title or name} ==")
    yield
    log(f"[{name}: {time.perf_counter() - t0:.0f} s]")


# -----------------------------------------------------------------------------
# The loss


def micro_batch_loss(model, ids, targets, ut, w_mle: float, alpha_eff: float, device, precision: str):
    """Loss of one micro-batch, scaled so that the micro-batches of one step add up to its mean loss.

    The step's loss is  sum_MLE(-log p) / n_mle + alpha * sum_UT(-log(1 - p)) / n_ut  with the
    counts taken over all its micro-batches (a plain mean per micro-batch would weigh a token
    by the size of its micro-batch). So each micro-batch runs the fused loss with
    reduction="sum" and alpha_eff = alpha * n_mle / n_ut, scaled by w_mle = 1 / n_mle: that is
    exactly its share. The scale goes into the call, not onto its result, so loss.backward()
    hands it a grad_output of 1 and the gradients the fused loss made in its forward pass are
    used as they are (3 GEMMs, not 4). Only positions with a target reach the loss: the prompt,
    the toxic tokens outside the spans and the padding are left out before the output projection.
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
    return fused_linear_pt_loss(hidden, weight, t, u, alpha=alpha_eff, reduction="sum", scale=w_mle, return_parts=True)


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


def save_checkpoint(model, optimizer, step: int, cfg: TrainConfig, fingerprint: dict, out: Path) -> None:
    """OUT/ckpt: the weights (save_pretrained), trainer_state.pt and the run's train_config.json,
    built in a temporary directory and renamed into place only when complete, so a crash never
    leaves half of one. Under torchrun: sharded, in torch.distributed.checkpoint's format (distributed.py)."""
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    rng["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    state = {"step": step, "rng": rng, "config": asdict(cfg), "fingerprint": fingerprint}
    if distributed.active():
        return distributed.save_checkpoint(model, optimizer, state, out)
    tmp = temp_path(out / "ckpt")
    try:
        save_model(model, tmp)
        write_json(tmp / "train_config.json", asdict(cfg))
        lora = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
        torch.save(state | {"optimizer": optimizer.state_dict(), "lora": lora}, tmp / "trainer_state.pt")
        replace_dir(tmp, out / "ckpt")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # an interrupted save leaves nothing (a kill: start-up cleanup)


def load_checkpoint(model, optimizer, fingerprint: dict, out: Path, device) -> int:
    """Restore weights, optimiser, RNG from OUT/ckpt; return the number of steps it had done."""
    ckpt = out / "ckpt"
    try:
        state = torch.load(ckpt / "trainer_state.pt", map_location=device, weights_only=True)
    except Exception as e:  # written atomically, so only damage from outside gets here
        raise TrainError(f"{ckpt / 'trainer_state.pt'}: cannot be read ({e}); remove {ckpt} to start over.") from None
    for key, value in fingerprint.items():
        old = state["fingerprint"].get(key)
        if old != value:
            rows = " (a micro-batch's rows over all processes: --batch-size x processes)" if key == "batch_size" else ""
            raise TrainError(
                f"{ckpt}: written with {key}={old!r}, this run has {key}={value!r}{rows}; "
                "resume with the same settings, or use another --out."
            )
    if state.get("sharded"):  # written under torchrun, by any number of processes
        distributed.load_checkpoint(model, optimizer, ckpt)
    elif distributed.active():
        raise TrainError(f"{ckpt}: written by one process (python train.py); resume it the same way.")
    elif state["lora"]:
        model.load_state_dict(state["lora"], strict=False)
    else:  # full fine-tuning: the weights are the checkpoint's safetensors, in the master dtype
        ours = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor, _ in iter_checkpoint_tensors(ckpt):  # memory-mapped, one at a time
                ours[name.removeprefix("model.")].copy_(tensor)
    if not state.get("sharded"):
        optimizer.load_state_dict(state["optimizer"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"].cpu())
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
    return state["step"]


def starting_step(cfg: TrainConfig, model, optimizer, fingerprint: dict, out: Path, device, total: int) -> int:
    """0, or under --resume the step OUT/ckpt had reached (weights, optimizer and RNG restored)."""
    ckpt = out / "ckpt"
    if cfg.resume and (ckpt / "trainer_state.pt").is_file():
        start = load_checkpoint(model, optimizer, fingerprint, out, device)
        log(f"resuming from {ckpt} at step {start}/{total}")
        return start
    if cfg.resume:
        log(f"no checkpoint in {ckpt}; starting from step 0")
    elif ckpt.exists():
        log(f"note: starting over; {ckpt} will be replaced (--resume continues it)")
    return 0


def metrics_until(path: Path, start: int) -> list[dict]:
    """The metrics of the steps the weights contain, kept in OUT/metrics.jsonl; a crashed run
    may have logged more (or been killed halfway through a line)."""
    old = [m for _, m in read_jsonl(path, TrainError, "metrics", allow_torn_tail=True)] if path.exists() else []
    history = [m for m in old if m["step"] <= start]
    write_jsonl(path, history)
    return history


# -----------------------------------------------------------------------------
# What the user sees


def step_line(progress: Progress, m: dict, tokens: int) -> str:
    """The status line after a step: step, loss and its parts, tokens/s (`tokens` so far in this run), ETA."""
    dt, eta = progress.times()
    return (
        f"step {m['step']}/{progress.total} {progress.bar(20)} loss {m['loss']:.4g} (mle {m['mle']:.4g}, "
        f"ut {m['ut']:.4g})  lr {m['lr']:.2e}  {tokens / dt:.0f} tok/s  ETA {eta / 60:.1f} min"
    )


def plot_losses(metrics: list[dict], path: Path) -> None:
    """OUT/loss.png: total loss and its MLE and UT parts per step."""
    fig, ax = pyplot().subplots(figsize=(7, 4))
    steps = [m["step"] for m in metrics]
    for key in ("loss", "mle", "ut"):
        ax.plot(steps, [m[key] for m in metrics], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    save_figure(fig, path)


def evaluate(model, tok, records, cfg: TrainConfig, run: dict, path: Path) -> dict:
    """The evaluation on the held-out prompt sets (an evenly spaced --eval-limit subset), written to `path`."""
    harmful = spread(load_prompts(cfg.eval_harmful), cfg.eval_limit)
    benign = spread(load_prompts(cfg.eval_benign), cfg.eval_limit)
    public = {k: spread(v, cfg.eval_limit) for k, v in evaluation.public_prompts().items()} if cfg.eval_public else None
    report = evaluation.evaluate(
        model, tok, harmful, benign, dataset=records, max_new_tokens=cfg.eval_max_new_tokens, log=log, public=public
    )
    report["run"] = run
    if distributed.is_main():
        write_json(path, report)
    return report


def earlier_report(path: Path, run: dict) -> dict | None:
    """The report at `path`, if an earlier run wrote it with the same model, data and settings."""
    report = read_json(path, TrainError, "evaluation report") if path.is_file() else None
    return report if report and report.get("run") == run else None


# -----------------------------------------------------------------------------
# Training


def setup(cfg: TrainConfig, model_path, device):
    """The model to train (LoRA-wrapped if asked), its trainable parameters and their AdamW."""
    torch.manual_seed(cfg.seed)
    # Full fine-tuning keeps fp32 master weights even for bf16 compute: an AdamW update is
    # often below bf16's resolution (2^-8 relative) and would be rounded away. Under LoRA the
    # base weights never change, so they may stay bf16; the adapters are fp32.
    base_dtype = torch.bfloat16 if cfg.precision == "bf16" and cfg.lora_rank else torch.float32
    adapters = (lambda m: add_lora(m, cfg.lora_rank, cfg.lora_alpha)) if cfg.lora_rank else None
    if distributed.active():  # sharded over the ranks (FSDP2) as it loads
        model = distributed.load_sharded(model_path, base_dtype, device, cfg.precision, adapters)
    else:
        model = Transformer.from_pretrained(model_path, dtype=base_dtype, device=device)
        if adapters:
            adapters(model)
    model.gradient_checkpointing = cfg.grad_checkpointing
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]  # norms, biases
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    return model, params, optimizer


def schedule(cfg: TrainConfig, n_examples: int) -> tuple[int, int, int]:
    """Optimizer steps per epoch, in all, and of warmup. A step never spans two epochs; the last
    one of an epoch may have fewer micro-batches."""
    steps_per_epoch = math.ceil(math.ceil(n_examples / cfg.batch_size) / cfg.grad_accum)
    total = cfg.epochs * steps_per_epoch
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * total))
    return steps_per_epoch, total, warmup


@dataclass
class Objectives:
    """What a step needs beyond the model: the frozen reference (--loss dpo) and the decision loss."""

    reference: torch.nn.Module | None = None
    decision: DecisionLoss | None = None


def pt_align_sums(model, micro, cfg: TrainConfig, device):
    """Backward of the fused loss over a step's micro-batches; (sums of loss, MLE and UT, metrics)."""
    n_mle = sum(int(((t != IGNORE) & ~u).sum()) for _, t, u in micro)  # counted on the CPU
    n_ut = sum(int(((t != IGNORE) & u).sum()) for _, t, u in micro)
    n_mle, n_ut = distributed.sum_counts(n_mle, n_ut, 0)[:2]  # over all ranks' rows, under torchrun
    w_mle, alpha_eff = 1 / max(n_mle, 1), cfg.alpha * max(n_mle, 1) / max(n_ut, 1)
    sums = torch.zeros(3, device=device)  # loss, sum of MLE -log p, sum of UT -log(1 - p)
    for ids, targets, ut in micro:
        loss, parts = micro_batch_loss(model, ids, targets, ut, w_mle, alpha_eff, device, cfg.precision)
        loss.backward()
        sums += torch.stack([loss.detach(), parts.mle * parts.n_mle, parts.ut * parts.n_ut])
    return sums, dict(n_mle=n_mle, n_ut=n_ut)


def dpo_sums(model, reference, micro, cfg: TrainConfig, device):
    """Backward of DPO over a step's micro-batches of pairs; (sums of loss, pair loss, reward margin, metrics)."""
    n_pairs = sum(ids.shape[0] // 2 for ids, _, _ in micro)
    sums = torch.zeros(3, device=device)
    for ids, targets, _ in micro:
        loss, pair_loss, margin = dpo_micro_batch_loss(
            model, reference, ids.to(device), targets.to(device), cfg.dpo_beta, 1 / n_pairs
        )
        loss.backward()
        sums += torch.stack([loss.detach(), pair_loss, margin])
    return sums, dict(n_mle=n_pairs, n_ut=n_pairs)


def train_step(model, params, optimizer, micro, cfg: TrainConfig, lr: float, device, step: int, obj: Objectives):
    """One optimizer step over a list of micro-batches; its metrics. A non-finite loss or gradient
    raises TrainError (naming the parts) before the update. Under --loss dpo the metrics' mle and
    ut are the mean DPO loss and reward margin per pair."""
    tokens = distributed.sum_counts(0, 0, sum(ids.numel() for ids, _, _ in micro))[2]
    t0 = time.perf_counter()
    if obj.reference is not None:
        sums, counts = dpo_sums(model, obj.reference, micro, cfg, device)
    else:
        sums, counts = pt_align_sums(model, micro, cfg, device)
    decision = torch.zeros((), device=device)
    if obj.decision is not None:  # this rank's share of the step's questions
        share = obj.decision.loss(model, step, distributed.rank(), distributed.world(), cfg.precision == "bf16")
        decision = cfg.decision_weight * share
        decision.backward()
    grad_norm = distributed.clip_grad_norm_(params, cfg.grad_clip)
    # One host sync per step, before the update: a non-finite loss must never reach the weights
    # (nor, summed over the ranks first, any rank's weights).
    totals = distributed.all_sum(torch.cat([sums, decision.detach().reshape(1)]))
    totals[0] += totals[3]
    loss_v, mle_sum, ut_sum, decision_v, norm_v = torch.cat([totals, grad_norm.reshape(1).float()]).tolist()
    n_mle, n_ut = counts["n_mle"], counts["n_ut"]
    m = dict(loss=loss_v, mle=mle_sum / max(n_mle, 1), ut=ut_sum / max(n_ut, 1), n_mle=n_mle, n_ut=n_ut, lr=lr)
    m |= dict(grad_norm=norm_v, tokens=tokens) | (dict(decision=decision_v) if obj.decision is not None else {})
    if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
        raise TrainError(f"mle={m['mle']:.4g}, ut={m['ut']:.4g}, grad norm={norm_v:.4g}")
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**m, "seconds": time.perf_counter() - t0}


def objectives(cfg: TrainConfig, model, records, tok) -> Objectives:
    """The frozen starting model for --loss dpo, and the decision loss calibrated on it when asked."""
    obj = Objectives()
    if distributed.active() and cfg.loss == "dpo":
        raise TrainError("--loss dpo runs in one process (python train.py), not under torchrun.")
    if cfg.loss == "dpo":
        obj.reference = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.decision_weight > 0:
        obj.decision = DecisionLoss(records, tok, cfg.decision_questions, cfg.seed, cfg.max_len)
        centre = obj.decision.calibrate(model, cfg.precision == "bf16")
        log(f"decision loss: centred on the starting model's mean score {centre:.3f}")
    return obj


def decision_setting(cfg: TrainConfig, records, data_path: Path) -> TrainConfig:
    """The decision loss needs questions of both kinds: with no anchor record in the dataset (or
    --no-anchor) it is off, said once, and train_config.json records weight 0."""
    has_anchor = any(r.get("kind") == "anchor" for r in records)
    has_red_team = any(r.get("kind") != "anchor" for r in records)
    if cfg.decision_weight == 0 or (has_anchor and has_red_team and cfg.anchor):
        return cfg
    if not cfg.anchor:
        why = "--no-anchor leaves the anchor questions out"
    else:
        why = f"{data_path} has no {'red-team' if has_anchor else 'anchor'} record"
    log(f"decision loss off: it needs harmful and anchor questions, and {why}")
    return replace(cfg, decision_weight=0.0)


def train(cfg: TrainConfig, examples, tok, model_path, fingerprint: dict, out: Path, records) -> None:
    """Dual instruction tuning from `examples`; writes OUT/final, OUT/ckpt and OUT/metrics.jsonl."""
    device = torch.device(cfg.device)
    model, params, optimizer = setup(cfg, model_path, device)
    obj = objectives(cfg, model, records, tok)  # from the starting weights, before any resume
    steps_per_epoch, total, warmup = schedule(cfg, len(examples))
    start = starting_step(cfg, model, optimizer, fingerprint, out, device, total)
    if distributed.is_main():
        write_json(out / "train_config.json", asdict(cfg))  # only now: a refused run leaves the last one's in place
    history = metrics_until(out / "metrics.jsonl", start) if distributed.is_main() else []
    kind = f"LoRA r={cfg.lora_rank}" if cfg.lora_rank else "full"
    log(
        f"training: {len(examples)} examples, {total} steps of {cfg.batch_size}x{cfg.grad_accum}, "
        f"{sum(p.numel() for p in params) / 1e6:.1f}M trainable parameters ({kind}), {cfg.device} {cfg.precision}"
    )
    progress, tokens, epoch_batches, last_saved = Progress(total, start, redraw=True), 0, {}, start
    for step in range(start, total):
        epoch, k = divmod(step, steps_per_epoch)
        if epoch not in epoch_batches:  # the order is a function of (seed, epoch) alone: resumable
            epoch_batches = {epoch: list(batches(examples, cfg.batch_size, cfg.seed, epoch, tok.pad_id))}
        micro = distributed.my_rows(epoch_batches[epoch][k * cfg.grad_accum : (k + 1) * cfg.grad_accum])
        try:
            m = train_step(model, params, optimizer, micro, cfg, lr_at(step, total, warmup, cfg.lr), device, step, obj)
        except TrainError as err:
            kept = f"last good checkpoint kept at {out / 'ckpt'} (step {last_saved})"
            raise TrainError(
                f"non-finite loss at step {step + 1} ({err}); the weights were not updated; "
                f"{kept if last_saved else 'no checkpoint had been saved yet'}. Try a lower --lr, or --precision fp32."
            ) from None
        history.append(m := {"step": step + 1, "epoch": epoch, **m})
        if distributed.is_main():
            with open(out / "metrics.jsonl", "a") as f:
                append_jsonl(f, m)
        tokens += m["tokens"]
        progress.advance(1)
        progress.show(step_line(progress, m, tokens))
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
            save_checkpoint(model, optimizer, step + 1, cfg, fingerprint, out)
            last_saved = step + 1
        fail_point(f"step {step + 1}")
    progress.close()
    del optimizer
    finish(model, history, out)


def finish(model, history: list[dict], out: Path) -> None:
    """OUT/final in the source checkpoint's dtype (a bf16 8B model stays 16 GB), the loss summary and OUT/loss.png."""
    if distributed.active():  # gathered a weight at a time, written by rank 0
        distributed.save_pretrained(model, out / "final", model.checkpoint_dtype)
    else:
        model.to(model.checkpoint_dtype)
        save_model(model, out / "final")
    if history:
        first, last = history[0], history[-1]
        log(
            f"loss {first['loss']:.4g} -> {last['loss']:.4g} (mle {first['mle']:.4g} -> {last['mle']:.4g}, "
            f"ut {first['ut']:.4g} -> {last['ut']:.4g}); aligned checkpoint: {out / 'final'}"
        )
        plot_losses(history, out / "loss.png")


# -----------------------------------------------------------------------------
# The whole pipeline


def dual_dataset(cfg: TrainConfig, out: Path, model_path, tok, load):
    """(records, their file, the model if one was loaded): --data, or OUT/data.jsonl generated
    (or resumed) by the method's first half with the run's seed, --questions and --rounds."""
    if cfg.data:
        return load_records(cfg.data), Path(cfg.data), None  # bad data fails before any model loads
    data_path = out / "data.jsonl"
    with stage("dataset", f"dataset: generating {data_path}"):
        model = load(model_path)
        same = {k: getattr(cfg, k) for k in ("model", "questions", "rounds", "anchors", "seed")}
        gen = GenerateConfig(out=str(data_path), dtype=cfg.inference_dtype, **same)
        ptalign.run_generate(gen, model, tok)
        return load_records(data_path), data_path, model


def training_examples(records, tok, cfg: TrainConfig, data_path: Path) -> list:
    """The records as training examples (as (positive, toxic) pairs under --loss dpo), cut to --max-len.
    A question that is one of the public held-out prompts stops the run: they are never trained on."""
    if leaked := overlapping_prompts([r["question"] for r in records], public_prompts()):
        raise TrainError(f"{data_path}: {len(leaked)} question(s) are public held-out prompts, e.g. {leaked[0]!r}.")
    if cfg.loss == "dpo":
        examples, stats = build_pairs(records, tok, cfg.max_len)
    else:
        examples, stats = build_examples(records, tok, cfg.max_len, cfg.loss, cfg.anchor)
    log(
        f"dataset {data_path}: {len(records)} records -> {len(examples)} examples ({stats['dropped_long_prompt']} "
        f"dropped: prompt longer than --max-len, {stats['truncated']} truncated)"
    )
    if not examples:
        raise TrainError(f"{data_path}: no example fits in --max-len {cfg.max_len}; raise --max-len.")
    return examples


def run(cfg: TrainConfig) -> dict:
    """Dataset, evaluation before, training, evaluation after; returns the two reports."""
    out = Path(cfg.out)
    check_output_dir(out, "--out")  # before any work, not after it
    if distributed.is_main():
        remove_stale_temps(out)  # what a run killed while saving left
    distributed.barrier()
    model_path = Path(cfg.model) if cfg.model else default_model_path()
    tok = Tokenizer.from_pretrained(model_path)
    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.inference_dtype)
    load = lambda path: Transformer.from_pretrained(path, dtype=dtype, device=device)  # for inference
    records, data_path, model = dual_dataset(cfg, out, model_path, tok, load)

    reports, before = {}, out / "eval_before.json"
    eval_run = {"model": str(model_path), "data_sha256": sha256(data_path)}
    eval_run |= {"eval_limit": cfg.eval_limit, "eval_max_new_tokens": cfg.eval_max_new_tokens}
    eval_run |= {"dtype": cfg.inference_dtype, "harmful": cfg.eval_harmful, "benign": cfg.eval_benign}
    eval_run |= {"public": evaluation.public_fingerprint() if cfg.eval_public else None}
    if not cfg.skip_eval and (report := earlier_report(before, eval_run)):
        reports["before"] = report
        log(f"evaluation before: reusing {before}")
    elif not cfg.skip_eval:
        with stage("evaluation before"):
            reports["before"] = evaluate(model or load(model_path), tok, records, cfg, eval_run, before)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the inference copy's memory goes back before the master weights load

    examples = training_examples(records, tok, cfg, data_path)
    cfg = decision_setting(cfg, records, data_path)
    # Under torchrun --batch-size counts one process's rows: each rank takes its share of one global
    # order of micro-batches (a single process's, with that many rows), resumable on any number of them.
    every_rank = replace(cfg, batch_size=cfg.batch_size * distributed.world())
    with stage("training", "dual instruction tuning"):
        train(every_rank, examples, tok, model_path, fingerprint(every_rank, model_path, data_path), out, records)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not cfg.skip_eval:
        with stage("evaluation after"):
            final = {**eval_run, "model": str(out / "final")}
            reports["after"] = evaluate(load(out / "final"), tok, records, cfg, final, out / "eval_after.json")
        print(evaluation.report_table(reports))
        if distributed.is_main():
            evaluation.bar_chart(reports, out / "eval.png")
    return reports


def interrupted(out: Path) -> str:
    """The last message of an interrupted run: what it kept in OUT, and how to go on from it."""
    kept = [name for name in ("data.jsonl", "eval_before.json", "ckpt/") if (out / name).exists()]
    if not kept:
        return f"nothing was kept in {out} yet; rerun the same command to start again."
    return f"kept in {out}: {', '.join(kept)}; rerun the same command with --resume to continue from there."


def main(argv=None) -> dict:
    distributed.init()  # under torchrun: join the other processes (distributed.py); else nothing
    cfg = parse_args(argv)
    with one_line_errors(lambda: interrupted(Path(cfg.out))):
        return run(cfg)


if __name__ == "__main__":
    main()
