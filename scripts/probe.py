"""A linear probe of a model's hidden states: how well each layer tells harmful prompts from benign ones.

A diagnostic only: nothing it computes feeds generation, training, evaluation or any default. It
says how much a model's hidden states already know about which prompts are harmful, to set beside
what the model does (the refusal rates of `ptalign.py eval`): if training makes the two kinds of
prompt more separable, the probe's AUC rises; if it only moves the model's operating point, the
refusal rates move and the AUC does not.

    python scripts/probe.py default --fit data/dev_harmful.jsonl,data/dev_benign.jsonl \\
        --score data/eval_harmful.jsonl,data/eval_benign.jsonl --out runs/probe
    python scripts/probe.py runs/e2e/final --fit runs/e2e/data.jsonl \\
        --score data/eval_harmful.jsonl,data/eval_benign.jsonl --score public=H.jsonl,B.jsonl --out runs/probe

Prompt sets (--fit, --score): `HARMFUL.jsonl,BENIGN.jsonl` (a 'prompt' per line, as data/eval_*.jsonl),
optionally named as `NAME=HARMFUL.jsonl,BENIGN.jsonl`; or a dataset file of `ptalign.py generate`,
whose red-team questions are the harmful class and its anchor questions the benign one: no label
beyond what self-generation assigns (--questions: those the request gate passed, or only those of
the records training reads).

Features, per layer: the residual stream after each block (and after the embedding with
--embeddings), for the prompt as a user turn in the chat template with the generation prompt
(the assistant header) after it. Two kinds:
- `last`: the state of the last token, the assistant header's end, where the reply begins;
- `mean`: the mean of the states over the prompt's own tokens (the user's text), not over the
  template's tokens (role markers, a default system prompt), which every prompt shares.

The probe: features standardised with the fit set's mean and standard deviation; logistic regression
with class-balanced weights (each class weighs half) and an L2 penalty: minimise the weighted mean
log-loss + penalty/2 * |w|^2, bias unpenalised, by Newton's method. The penalty is chosen per layer
and kind by stratified k-fold cross-validation inside the fit set (best mean fold AUC; the larger
penalty on a tie), then the probe is refitted on the whole fit set. A scoring set is never fitted
on: one that shares a file with the fit set is refused.

Reported per layer and kind, on each scoring set: the AUC (the chance that a harmful prompt scores
above a benign one, ties counting half) and the share of harmful prompts caught at 5% and 10% of
benign: the threshold is the ceil((1 - a) * n)-th smallest of the n benign scores, a prompt is
caught when it scores strictly above it, so at most a share a of the benign ones pass it; a
harmful prompt tied with the threshold is not caught. The best layer of each kind is the one with
the best cross-validated AUC on the fit set, never chosen by a scoring set; its ROC on each
scoring set is drawn in OUT/probe_roc.png. stdout: a markdown table of the best layers;
OUT/probe.json: every row, and the ROC points of the best layers.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.charts import pyplot, save_figure  # noqa: E402
from common.cli import POSITIVE, POSITIVE_FLOAT, Parser, number  # noqa: E402
from common.errors import UserError, one_line_errors  # noqa: E402
from common.files import check_output_dir, write_json  # noqa: E402
from common.progress import log  # noqa: E402
from data.dataset import load_records, read_records, spans_to_token_mask  # noqa: E402
from data.prompt_sets import load_prompts  # noqa: E402
from data.public import overlapping_prompts  # noqa: E402
from generate import load  # noqa: E402
from ptalign import GATE_DROPPED  # noqa: E402

KINDS = ("last", "mean")
GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)  # penalties cross-validation chooses from
RATES = (0.05, 0.10)  # benign shares the caught-at thresholds let through


# -----------------------------------------------------------------------------
# 1. Prompt sets


@dataclass
class PromptSet:
    name: str
    files: list[Path]
    harmful: list[str]
    benign: list[str]


def read_set(spec: str, questions: str = "gated") -> PromptSet:
    """A prompt set from its flag: [NAME=]HARMFUL.jsonl,BENIGN.jsonl, or a `ptalign.py generate` dataset file
    (`questions`: which of its questions, see dataset_questions)."""
    m = re.fullmatch(r"(\w[\w.-]*)=(.+)", spec)
    name, spec = (m[1], m[2]) if m else (None, spec)
    paths = [Path(p) for p in spec.split(",")]
    if len(paths) == 2:
        harmful, benign = ([r["prompt"] for r in load_prompts(p, ("prompt",))] for p in paths)
        return PromptSet(name or pair_name(paths), paths, harmful, benign)
    if len(paths) != 1:
        raise UserError(f"{spec}: a prompt set is HARMFUL.jsonl,BENIGN.jsonl or one dataset file, not {len(paths)}.")
    harmful, benign = dataset_questions(paths[0], questions)
    if not (harmful and benign):
        raise UserError(f"{paths[0]}: the dataset needs red-team and anchor questions (the probe's two classes).")
    return PromptSet(name or paths[0].stem, paths, harmful, benign)


def dataset_questions(path: Path, questions: str) -> tuple[list[str], list[str]]:
    """The red-team and the anchor questions of a dataset file: "kept", those of the records training
    reads; "gated", every red-team question the request gate passed and every anchor question, the
    labels the method gives its questions whatever became of their replies."""
    if questions == "kept":
        records = load_records(path)
    else:
        records = [r for _, r in read_records(path) if r.get("dropped") != GATE_DROPPED]
    harmful = [r["question"] for r in records if r.get("kind") != "anchor"]
    return harmful, [r["question"] for r in records if r.get("kind") == "anchor"]


def pair_name(paths: list[Path]) -> str:
    """A pair's name: the stems' shared prefix ("eval" for eval_harmful, eval_benign), else both stems."""
    a, b = paths[0].stem, paths[1].stem
    prefix = a[: next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))]
    prefix = prefix.rstrip("_-.")
    return prefix if prefix else f"{a}+{b}"


def check_sets(fit: PromptSet, scored: list[PromptSet]) -> None:
    """Refuse a scoring set that shares a file with the fit set; give repeated names a number."""
    names, fitted = set(), {p.resolve() for p in fit.files}
    for s in scored:
        shared = [p for p in s.files if p.resolve() in fitted]
        if shared:
            raise UserError(f"{shared[0]}: a file of the fit set cannot be scored on (the probe was fitted on it).")
        base, n = s.name, 2
        while s.name in names:
            s.name, n = f"{base}{n}", n + 1
        names.add(s.name)


def overlap(fit: PromptSet, s: PromptSet) -> int:
    """How many of a scoring set's prompts are in the fit set (as data.public compares prompts)."""
    return len(overlapping_prompts(s.harmful + s.benign, fit.harmful + fit.benign))


# -----------------------------------------------------------------------------
# 2. Features: the hidden states of each layer at the last token, and over the prompt's tokens


def encode_prompt(tok, prompt: str) -> tuple[list[int], list[bool]]:
    """Ids of the prompt as a user turn with the generation prompt, and which of them are the prompt's text."""
    text, content = tok.render_chat(prompt), prompt.strip()  # some templates trim the message
    start = text.rfind(content)
    if start < 0:
        raise UserError(f"the chat template changes the prompt {prompt[:40]!r}; its tokens cannot be found for 'mean'.")
    ids, offsets = tok.encode_with_offsets(text)
    mine = spans_to_token_mask(offsets, [[start, start + len(content)]])
    if not any(mine):
        raise UserError(f"the prompt {prompt!r} has no text of its own to average over for 'mean'.")
    return ids, mine


@torch.inference_mode()
def features(model, tok, prompts: list[str], batch_size: int, embeddings: bool) -> dict[str, np.ndarray]:
    """{kind: (layers, prompts, dim) float32}: each layer's state at the last token, and the mean over the prompt.

    Batches are right-padded with no mask: under causal attention a real token never sees
    the padding after it, and its positions start at 0, so it gets the state it has alone.
    """
    encoded = [encode_prompt(tok, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i][0]))  # similar lengths batch together
    device = model.embed_tokens.weight.device
    out = {k: [None] * len(prompts) for k in KINDS}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        T = max(len(encoded[i][0]) for i in rows)
        ids = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T)
        for j, i in enumerate(rows):
            ids[j, : len(encoded[i][0])] = torch.tensor(encoded[i][0])
            mask[j, : len(encoded[i][1])] = torch.tensor(encoded[i][1], dtype=torch.float)
        states = model.hidden_states(ids.to(device), every_layer=True)[0 if embeddings else 1 :]
        h = torch.stack(states).float().cpu()  # (layers, B, T, dim)
        mean = (h * mask[None, :, :, None]).sum(2) / mask.sum(1)[None, :, None]
        for j, i in enumerate(rows):
            out["last"][i] = h[:, j, len(encoded[i][0]) - 1]
            out["mean"][i] = mean[:, j]
        log(f"  features: {min(start + batch_size, len(order))}/{len(order)} prompts")
    return {k: torch.stack(v, 1).numpy() for k, v in out.items()}


# -----------------------------------------------------------------------------
# 3. The probe: standardised, class-balanced, L2-penalised logistic regression


def standardiser(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each feature over the prompts (axis -2); a constant feature keeps scale 1."""
    mu, sd = X.mean(-2, keepdims=True), X.std(-2, keepdims=True)
    return mu, np.where(sd > 1e-6 * (np.abs(mu) + 1), sd, 1.0)


def fit_logistic(X: np.ndarray, y: np.ndarray, penalties: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights (G, L, d) and biases (G, L) of one probe per layer and penalty: X (L, n, d) standardised,
    y (n,) bool, penalties (G, L), or (G, 1) for the same penalty at every layer.

    The optimal w lies in the span of the training rows (the loss sees X w only; the penalty
    only grows off the span), so w = V z with X = U S V^T and the fit runs on the n x r
    coordinates U S: exact, and far smaller than d when there are fewer prompts than features.
    """
    U, S, Vh = torch.linalg.svd(torch.as_tensor(X, dtype=torch.float64), full_matrices=False)
    lam = torch.as_tensor(penalties, dtype=torch.float64)
    G, L = lam.shape[0], X.shape[0]
    lam = lam.expand(G, L).reshape(G * L)
    Z = (U * S[:, None, :]).expand(G, *U.shape).reshape(G * L, *U.shape[1:])
    z, b = newton(Z, torch.as_tensor(y, dtype=torch.float64), lam)
    w = torch.einsum("lrd,glr->gld", Vh, z.view(G, L, -1))
    return w.numpy(), b.view(G, L).numpy()


def newton(Z, y, lam, iters: int = 100, tol: float = 1e-12):
    """Minimise sum_i c_i log(1 + exp(-s_i (z . x_i + b))) + lam/2 |z|^2 for a batch of problems
    (Z (P, n, r), lam (P,)) by Newton's method with step halving; c_i = 1 / (2 * its class's count)."""
    P, n, r = Z.shape
    A = torch.cat([Z, Z.new_ones(P, n, 1)], -1)
    c = torch.where(y > 0, 0.5 / y.sum(), 0.5 / (n - y.sum()))
    reg = torch.cat([lam[:, None].expand(P, r), lam.new_zeros(P, 1)], 1)  # the bias is not penalised
    sign = 2 * y - 1
    objective = lambda th: (
        (c * torch.nn.functional.softplus(-sign * (A @ th[..., None])[..., 0])).sum(-1) + 0.5 * (reg * th * th).sum(-1)
    )
    theta = Z.new_zeros(P, r + 1)
    for _ in range(iters):
        p = torch.sigmoid((A @ theta[..., None])[..., 0])
        grad = (A * (c * (p - y))[..., None]).sum(1) + reg * theta
        H = A.transpose(1, 2) @ (A * (c * p * (1 - p))[..., None]) + torch.diag_embed(reg + 1e-12)
        step = torch.linalg.solve(H, grad)
        decrement = (grad * step).sum(-1)
        if decrement.max() < tol:
            break
        t, f0 = torch.ones(P, 1, dtype=Z.dtype), objective(theta)
        for _ in range(40):  # halve the step of each problem whose objective did not fall enough
            worse = objective(theta - t * step) > f0 - 1e-4 * t[:, 0] * decrement
            if not worse.any():
                break
            t[worse] /= 2
        theta = theta - t * step
    return theta[:, :r], theta[:, r]


def auc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """P(a harmful score > a benign one), ties counting half, over the last axis of each (batched over the rest)."""
    pos, neg = pos[..., :, None], neg[..., None, :]
    return ((pos > neg) + 0.5 * (pos == neg)).mean((-2, -1))


def stratified_folds(y: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """k disjoint sets of indices covering y, each with its share of both classes (a seeded shuffle)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=int)
    for cls in (True, False):
        idx = rng.permutation(np.flatnonzero(y == cls))
        fold[idx] = np.arange(len(idx)) % k
    return [np.flatnonzero(fold == f) for f in range(k)]


def cross_validate(X: np.ndarray, y: np.ndarray, grid, k: int, seed: int) -> np.ndarray:
    """Mean held-out-fold AUC (G, L) of each penalty and layer; each fold standardised by its training part."""
    total = 0.0
    for test in stratified_folds(y, k, seed):
        train = np.setdiff1d(np.arange(len(y)), test)
        mu, sd = standardiser(X[:, train])
        w, b = fit_logistic((X[:, train] - mu) / sd, y[train], np.array(grid)[:, None])
        s = np.einsum("lnd,gld->gln", (X[:, test] - mu) / sd, w) + b[..., None]
        total = total + auc(s[..., y[test]], s[..., ~y[test]])
    return total / k


def choose_penalty(cv: np.ndarray, grid) -> np.ndarray:
    """Index into grid of each layer's best cross-validated AUC (the larger penalty on a tie)."""
    flipped = np.round(cv[::-1], 12)  # argmax takes the first best: look from the largest penalty
    return len(grid) - 1 - flipped.argmax(0)


# -----------------------------------------------------------------------------
# 4. Scoring: AUC, caught at a benign rate, ROC


def caught_at(pos: np.ndarray, neg: np.ndarray, rate: float) -> dict:
    """Share of harmful scores strictly above the ceil((1 - rate) n)-th smallest of the n benign ones
    (at most `rate` of the benign pass it; a tie with it is not caught), with the threshold and benign share."""
    k = math.ceil(round((1 - rate) * len(neg), 9))
    t = np.sort(neg)[k - 1] if k > 0 else -np.inf
    return {"caught": float((pos > t).mean()), "threshold": float(t), "benign_above": float((neg > t).mean())}


def roc(pos: np.ndarray, neg: np.ndarray) -> dict:
    """ROC points (false and true positive rates), a threshold at each distinct score, from (0, 0) to (1, 1)."""
    s = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)])
    order = np.argsort(-s, kind="stable")
    s, is_pos = s[order], is_pos[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tpr = np.r_[0, np.cumsum(is_pos)[last_of_tie] / len(pos)]
    fpr = np.r_[0, np.cumsum(~is_pos)[last_of_tie] / len(neg)]
    return {"fpr": np.round(fpr, 5).tolist(), "tpr": np.round(tpr, 5).tolist()}


def score_row(scores: np.ndarray, n_harmful: int) -> dict:
    """AUC and caught-at rates of one probe's scores on a set (its harmful prompts first)."""
    pos, neg = scores[:n_harmful], scores[n_harmful:]
    row = {"auc": float(auc(pos, neg))}
    for rate in RATES:
        c = caught_at(pos, neg, rate)
        pct = round(rate * 100)
        row |= {
            f"caught_at_{pct}": c["caught"],
            f"threshold_{pct}": c["threshold"],
            f"benign_above_{pct}": c["benign_above"],
        }
    return row


# -----------------------------------------------------------------------------
# 5. One kind of feature: fit, choose, score


def probe_kind(fit_X, y, scored: dict, grid, args, first_layer: int) -> tuple[list[dict], dict]:
    """Rows (one per layer) for one feature kind, and the best layer's ROC on each scoring set.

    fit_X (L, n, d); scored {name: (X (L, m, d), n_harmful)}."""
    cv = cross_validate(fit_X, y, grid, args.folds, args.seed)
    best = choose_penalty(cv, grid)
    mu, sd = standardiser(fit_X)
    penalties = np.array(grid)[best]
    w, b = fit_logistic((fit_X - mu) / sd, y, penalties[None, :])
    scores = {name: np.einsum("lnd,ld->ln", (X - mu) / sd, w[0]) + b[0][:, None] for name, (X, _) in scored.items()}
    rows = []
    for layer in range(fit_X.shape[0]):
        rows.append(
            {
                "layer": layer + first_layer,
                "penalty": float(penalties[layer]),
                "cv_auc": float(cv[best[layer], layer]),
                "cv_auc_by_penalty": {f"{g:g}": round(float(cv[i, layer]), 5) for i, g in enumerate(grid)},
                "scores": {name: score_row(s[layer], scored[name][1]) for name, s in scores.items()},
            }
        )
    top = int(np.argmax(np.round([r["cv_auc"] for r in rows], 12)))  # the first (shallowest) on a tie
    curves = {
        name: roc(s[top][:n], s[top][n:]) | {"auc": rows[top]["scores"][name]["auc"]}
        for name, s in scores.items()
        for n in [scored[name][1]]
    }
    return rows, {"layer": rows[top]["layer"], "cv_auc": rows[top]["cv_auc"], "roc": curves}


# -----------------------------------------------------------------------------
# 6. Report: table, JSON, chart


def table(rows: list[dict], names: list[str], top: int) -> str:
    """Markdown: the `top` layers of each kind by cross-validated AUC on the fit set, with their scores."""
    head = "| feature | layer | penalty | CV AUC (fit) | " + " | ".join(f"{n} AUC | {n} @5% | {n} @10%" for n in names)
    lines = [head + " |", "| --- | ---: | ---: | ---: |" + " ---: | ---: | ---: |" * len(names)]
    for kind in KINDS:
        mine = sorted((r for r in rows if r["feature"] == kind), key=lambda r: (-round(r["cv_auc"], 12), r["layer"]))
        for r in mine[:top]:
            cells = [f"{r['scores'][n][k]:.3f}" for n in names for k in ("auc", "caught_at_5", "caught_at_10")]
            lines.append(
                f"| {kind} | {r['layer']} | {r['penalty']:g} | {r['cv_auc']:.3f} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def roc_chart(best: dict, scored: list[PromptSet], title: str, path) -> None:
    """One panel per scoring set: the ROC of the best layer of each kind (chosen on the fit set)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(scored), figsize=(4.5 * len(scored), 4.4), squeeze=False)
    for ax, s in zip(axes[0], scored):
        for kind, b in best.items():
            c = b["roc"][s.name]
            # straight lines between the points: a tie of harmful and benign scores is a diagonal step
            ax.plot(c["fpr"], c["tpr"], label=f"{kind}, layer {b['layer']} (AUC {c['auc']:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        for rate in RATES:
            ax.axvline(rate, color="grey", lw=0.6, ls="--")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="benign share above threshold", ylabel="harmful share caught")
        ax.set_title(f"{s.name} ({len(s.harmful)} harmful, {len(s.benign)} benign)", fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(title, 60 * len(scored))), fontsize=10)
    save_figure(fig, path)


# -----------------------------------------------------------------------------
# 7. The command


def parse_args(argv=None) -> argparse.Namespace:
    """The command's flags; --help gives the module's description of the method and outputs."""
    p = Parser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="checkpoint directory, or 'default' for the embedded SmolLM2-135M-Instruct")
    p.add_argument("--fit", required=True, help="set the probe is fitted on: HARMFUL.jsonl,BENIGN.jsonl or a dataset")
    p.add_argument(
        "--score",
        action="append",
        required=True,
        help="set it is scored on: [NAME=]HARMFUL.jsonl,BENIGN.jsonl or a dataset file; repeat for several",
    )
    p.add_argument(
        "--questions",
        choices=["gated", "kept"],
        default="gated",
        help="a dataset file's questions: every red-team question the request gate passed and every anchor question "
        "(gated, the default), or only those of the records training reads (kept)",
    )
    p.add_argument("--out", required=True, help="directory for probe.json and probe_roc.png")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype (default: float32)"
    )
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--batch-size", type=POSITIVE, default=16, help="prompts run through the model together (default: 16)"
    )
    p.add_argument("--embeddings", action="store_true", help="probe the token embeddings too (as layer 0)")
    p.add_argument("--folds", type=number(int, 2), default=5, help="cross-validation folds in the fit set (default: 5)")
    grid = ", ".join(f"{g:g}" for g in GRID)
    p.add_argument("--penalty", type=POSITIVE_FLOAT, help=f"fix the L2 penalty (default: chosen from {grid})")
    p.add_argument("--seed", type=int, default=0, help="seed of the cross-validation folds (default: 0)")
    p.add_argument("--top", type=POSITIVE, default=3, help="layers of each kind in the printed table (default: 3)")
    return p.parse_args(argv)


def run(args) -> dict:
    """Fit and score the probe of every layer and kind; write probe.json and probe_roc.png; return the report."""
    t0 = time.perf_counter()
    check_output_dir(args.out, "--out")
    fit, scored = read_set(args.fit, args.questions), [read_set(s, args.questions) for s in args.score]
    check_sets(fit, scored)
    grid = (args.penalty,) if args.penalty else GRID
    if min(len(fit.harmful), len(fit.benign)) < args.folds:
        raise UserError(f"{args.fit}: --folds {args.folds} needs at least that many prompts of each class.")
    model, tok = load(None if args.model == "default" else args.model, args.device, args.dtype)
    feats = lambda s: features(model, tok, s.harmful + s.benign, args.batch_size, args.embeddings)
    fit_f, scored_f = feats(fit), {s.name: feats(s) for s in scored}
    y = np.r_[np.ones(len(fit.harmful), bool), np.zeros(len(fit.benign), bool)]
    rows, best = [], {}
    for kind in KINDS:
        sets = {s.name: (scored_f[s.name][kind], len(s.harmful)) for s in scored}
        kind_rows, best[kind] = probe_kind(fit_f[kind], y, sets, grid, args, 0 if args.embeddings else 1)
        rows += [{"feature": kind} | r for r in kind_rows]
    report = {
        "model": args.model,
        "fit": describe(fit),
        "scored": [describe(s) | {"overlap_with_fit": overlap(fit, s)} for s in scored],
        "settings": {k: getattr(args, k) for k in ("dtype", "embeddings", "folds", "seed", "questions")}
        | {"penalties": list(grid)},
        "best": best,
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(Path(args.out) / "probe.json", report)
    title = (
        f"linear probe of {args.model}, fit on {fit.name} ({len(fit.harmful)} harmful, {len(fit.benign)} benign); "
        "best layer of each kind by cross-validated AUC on the fit set"
    )
    roc_chart(best, scored, title, Path(args.out) / "probe_roc.png")
    return report


def describe(s: PromptSet) -> dict:
    return {"name": s.name, "files": [str(p) for p in s.files], "n_harmful": len(s.harmful), "n_benign": len(s.benign)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    with one_line_errors(lambda: "nothing was written."):
        report = run(args)
    for s in report["scored"]:
        if s["overlap_with_fit"]:
            log(f"note: {s['overlap_with_fit']} prompts of {s['name']} are in the fit set too.")
    print(table(report["rows"], [s["name"] for s in report["scored"]], args.top))
    log(f"\n[{report['seconds']:.0f} s; every layer in {Path(args.out) / 'probe.json'}]")
    return report


if __name__ == "__main__":
    main()
