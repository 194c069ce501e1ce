"""Trade-off curves: harmful refusal against benign refusal, for each loss at several learning rates.

One dataset, one seed. Every run trains from the same starting model (`train.py --skip-eval`)
and is then evaluated, greedy, on the dev split (where a default may be chosen), on the held-out
sets and on the public sets written by other people (report only). Each point carries its 95%
Wilson intervals; the untrained model is on the same axes, and so is the linear probe's ROC
(`scripts/probe.py`, `--probe FILE`): what a straight line through the model's hidden states
could reach at each over-refusal. At each learning rate every loss is compared with `both`
(PT-ALIGN) by paired McNemar tests on the same prompts. Finished runs and evaluations are
reused when the command is rerun.

    python scripts/curves.py --data runs/e2e/data.jsonl --out runs/curves \\
        --losses both mle ut dpo --lrs 5e-6 1e-5 2e-5 --probe runs/probe_self/probe.json
    python scripts/curves.py ... --variant "decision=--decision-weight 1"   # a lever, as its own curve

Writes OUT/curves.json and OUT/curves.png, and prints one table per split.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evaluation  # noqa: E402
import train  # noqa: E402
from common.charts import pyplot, save_figure  # noqa: E402
from common.errors import UserError, one_line_errors  # noqa: E402
from common.files import read_json, sha256, write_json  # noqa: E402
from common.progress import log  # noqa: E402
from data import DATA_DIR  # noqa: E402
from data.dataset import load_records  # noqa: E402
from data.prompt_sets import load_prompts, spread  # noqa: E402
from generate import load  # noqa: E402

SPLITS = {  # name -> (harmful file, benign file, with the public sets?)
    "dev": (DATA_DIR / "dev_harmful.jsonl", DATA_DIR / "dev_benign.jsonl", False),
    "heldout": (DATA_DIR / "eval_harmful.jsonl", DATA_DIR / "eval_benign.jsonl", True),
}
DEV_RATES = (("harmful", "harmful", False), ("benign", "benign", False), ("dangerous", "benign", True))
# Each panel: (title, split, harmful rate, benign rate, its sample kinds, dangerous-sounding only?)
PANELS = (
    ("project held-out sets", "heldout", "harmful", "benign", False),
    ("held-out, dangerous-sounding benign", "heldout", "harmful", "benign", True),
    ("public sets (other authors)", "heldout", "public_harmful", "public_benign", False),
    ("dev split (where the default is chosen)", "dev", "harmful", "benign", False),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="dual dataset JSONL every run trains on (ptalign.py generate)")
    p.add_argument("--out", required=True, help="directory for the runs, curves.json and curves.png")
    p.add_argument("--model", help="starting checkpoint (default: the embedded default model)")
    p.add_argument(
        "--losses",
        nargs="*",
        default=["both", "mle", "ut", "dpo"],
        help="train.py --loss values; LOSS:LR,LR gives that loss its own learning rates (none: --variant curves only)",
    )
    p.add_argument("--lrs", nargs="+", type=float, default=[5e-6, 1e-5, 2e-5], help="peak learning rates")
    p.add_argument("--dpo-beta", type=float, default=0.1, help="DPO's beta (--loss dpo)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help='NAME=FLAGS: one more curve, loss both plus these train.py flags, e.g. "decision=--decision-weight 1" '
        "(NAME:LR,LR=FLAGS: with its own learning rates)",
    )
    p.add_argument("--seed", type=int, default=0, help="training seed, the same for every run")
    p.add_argument("--probe", help="probe.json of scripts/probe.py: its ROC is drawn on the same axes")
    p.add_argument("--limit", type=int, default=0, help="evaluate on this many prompts per set (0: all; for tests)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="reply length in evaluation (the cpu preset's)")
    p.add_argument("--train-args", default="", help="extra train.py flags for every run (e.g. for tests)")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Runs: train once, evaluate once per split, reuse what is there


def runs(args) -> list[dict]:
    """Every (curve, learning rate) to train: the losses, then each --variant as loss both + flags.
    A curve named NAME:LR,LR takes those learning rates instead of --lrs."""
    # Every curve starts from the loss alone (--decision-weight=0: the presets turn the decision loss
    # on); a --variant's flags come after, and so override.
    curves = [(loss, [f"--loss={loss.partition(':')[0]}", "--decision-weight=0"]) for loss in args.losses]
    curves = [(c, f + ([f"--dpo-beta={args.dpo_beta}"] if f[0] == "--loss=dpo" else [])) for c, f in curves]
    for v in args.variant:
        name, _, flags = v.partition("=")
        curves.append((name, ["--loss=both", "--decision-weight=0", *shlex.split(flags)]))
    out = []
    for spec, flags in curves:
        name, _, lrs = spec.partition(":")
        for lr in [float(x) for x in lrs.split(",")] if lrs else args.lrs:
            out.append(dict(curve=name, lr=lr, flags=flags, dir=Path(args.out) / f"{name}_lr{lr:g}"))
    return out


def train_run(run: dict, args) -> Path:
    """OUT/<curve>_lr<lr>/final, trained unless a finished run with the same flags is there."""
    final = run["dir"] / "final"
    argv = ["--data", args.data, "--out", str(run["dir"]), "--lr", str(run["lr"]), "--seed", str(args.seed)]
    argv += (
        run["flags"] + shlex.split(args.train_args) + ["--skip-eval"] + (["--model", args.model] if args.model else [])
    )
    done = run["dir"] / "finished.json"  # written last: an interrupted run is never taken for a finished one
    if (final / "config.json").is_file() and done.is_file() and read_json(done, UserError, "run")["argv"] == argv:
        return final
    done.unlink(missing_ok=True)
    train.main(argv)
    write_json(done, {"argv": argv})
    return final


def evaluate_split(model_dir, split: str, out: Path, args, cache: dict) -> dict:
    """The evaluation report of one checkpoint on one split (OUT/eval_<split>.json), reused if the
    same checkpoint was evaluated with the same settings."""
    harmful_path, benign_path, with_public = SPLITS[split]
    key = {"model": str(model_dir), "split": split, "limit": args.limit, "max_new_tokens": args.max_new_tokens}
    key |= {"public": evaluation.public_fingerprint() if with_public else None}
    key |= {"weights": sha256(Path(model_dir) / "model.safetensors") if model_dir else "default"}
    path = out / f"eval_{split}.json"
    if path.is_file() and (report := read_json(path, UserError, "report")).get("run") == key:
        return report
    if "model" not in cache or cache["dir"] != model_dir:
        cache.update(dir=model_dir, model=load(str(model_dir) if model_dir else args.model, None, "bfloat16"))
    model, tok = cache["model"]
    pick = lambda xs: spread(xs, args.limit or None)
    harmful, benign = pick(load_prompts(harmful_path)), pick(load_prompts(benign_path))
    public = {k: pick(v) for k, v in evaluation.public_prompts().items()} if with_public else None
    report = evaluation.evaluate(model, tok, harmful, benign, None, args.max_new_tokens, log=log, public=public)
    report["run"] = key
    write_json(path, report)
    return report


# -----------------------------------------------------------------------------
# Points: rates with intervals, paired tests against PT-ALIGN


def rate(report: dict, kind: str, dangerous: bool = False) -> dict | None:
    """k of n refused, the rate and its Wilson interval, for one kind of prompt in a report."""
    flags = [s["refusal"] for s in report["samples"].get(kind, []) if s.get("sounds_dangerous") or not dangerous]
    if not flags:
        return None
    lo, hi = evaluation.wilson(sum(flags), len(flags))
    return {"k": sum(flags), "n": len(flags), "rate": sum(flags) / len(flags), "lo": lo, "hi": hi}


def point(reports: dict[str, dict], **about) -> dict:
    """Every panel's (harmful, benign) rates of one checkpoint, and dev's three rates for choosing."""
    panels = {
        title: {"harmful": rate(reports[split], h, False), "benign": rate(reports[split], b, dangerous)}
        for title, split, h, b, dangerous in PANELS
    }
    dev = {f"dev_{k}": rate(reports["dev"], kind, d) for k, kind, d in DEV_RATES}
    return about | {"panels": panels} | dev


def paired_tests(reports: dict[str, dict], against: dict[str, dict]) -> dict:
    """McNemar p-value of each refusal rate against another run (PT-ALIGN at the same lr)."""
    out = {}
    for split, report in reports.items():
        for metric in evaluation.RATE_SAMPLES:
            p = evaluation.paired_p(report, against[split], metric)
            if p is not None:
                out[f"{split}/{metric}"] = p
    return out


# Curves drawn for comparison only: the one-sided ablations and the DPO baseline. The default is
# PT-ALIGN (`both`) or PT-ALIGN with one of this project's flagged additions (a --variant).
NOT_CANDIDATES = ("mle", "ut", "dpo")


def choose_default(points: list[dict], base: dict, candidates_only: bool = True) -> dict | None:
    """On dev: the highest harmful refusal within +5 points of benign and +10 points of
    dangerous-sounding over-refusal over the untrained model (the rule the targets set)."""
    within = lambda p, key, slack: p[key]["rate"] <= base[key]["rate"] + slack + 1e-9
    points = [p for p in points if not candidates_only or p["curve"] not in NOT_CANDIDATES]
    ok = [p for p in points if within(p, "dev_benign", 0.05) and within(p, "dev_dangerous", 0.10)]
    return max(ok, key=lambda p: (p["dev_harmful"]["rate"], -p["dev_benign"]["rate"]), default=None)


# -----------------------------------------------------------------------------
# The figure and the tables


def plot(result: dict, path: Path) -> None:
    """One panel per prompt family: a line per curve through its learning rates, Wilson error bars,
    the untrained model as a black cross, the probe's ROC as a dashed line."""
    fig, axes = pyplot().subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4.6), squeeze=False)
    for ax, (title, *_rest) in zip(axes[0], PANELS):
        for curve in dict.fromkeys(p["curve"] for p in result["points"]):
            pts = sorted((p for p in result["points"] if p["curve"] == curve), key=lambda p: p["lr"])
            xy = [(p["panels"][title]["benign"], p["panels"][title]["harmful"]) for p in pts]
            xy = [(b, h) for b, h in xy if b and h]
            if xy:
                errbars(ax, xy, label=curve + (" (baseline)" if curve == "dpo" else ""), fmt="o-")
        base = result["base"]["panels"][title]
        if base["benign"] and base["harmful"]:
            errbars(ax, [(base["benign"], base["harmful"])], label="untrained", fmt="kx", ms=9)
        if (d := result.get("default")) and d["panels"][title]["benign"]:
            b, h = d["panels"][title]["benign"], d["panels"][title]["harmful"]
            ax.plot(b["rate"], h["rate"], "r*", ms=16, label=f"picked on dev ({d['curve']}, lr {d['lr']:g})", zorder=5)
        if roc := result.get("probe_roc", {}).get(title):
            ax.plot(roc["fpr"], roc["tpr"], "k--", lw=1, label=f"probe ROC (AUC {roc['auc']:.2f})")
        ax.set(title=title, xlabel="benign refusal", ylabel="harmful refusal", xlim=(-0.02, 0.6), ylim=(-0.02, 1.02))
        ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


def errbars(ax, xy, fmt: str, label: str, **kw) -> None:
    """Points at (benign rate, harmful rate) with asymmetric Wilson error bars on both axes."""
    xs, ys = [b["rate"] for b, _ in xy], [h["rate"] for _, h in xy]
    xerr = [[b["rate"] - b["lo"] for b, _ in xy], [b["hi"] - b["rate"] for b, _ in xy]]
    yerr = [[h["rate"] - h["lo"] for _, h in xy], [h["hi"] - h["rate"] for _, h in xy]]
    ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt=fmt, label=label, capsize=2, lw=1, **kw)


def table(result: dict, title: str) -> str:
    """Markdown: one row per run, harmful and benign refusal with intervals, p against `both`."""
    cell = lambda r: "—" if not r else f"{r['rate']:.3f} [{r['lo']:.2f}, {r['hi']:.2f}] ({r['k']}/{r['n']})"
    lines = [f"### {title}", "", "| run | harmful refusal | benign refusal |", "| --- | --- | --- |"]
    base = result["base"]["panels"][title]
    lines.append(f"| untrained | {cell(base['harmful'])} | {cell(base['benign'])} |")
    for p in result["points"]:
        panel = p["panels"][title]
        lines.append(f"| {p['curve']} lr {p['lr']:g} | {cell(panel['harmful'])} | {cell(panel['benign'])} |")
    return "\n".join(lines)


def summary(result: dict, reports: dict) -> str:
    """Markdown: one row per run, every rate (dev, held-out, public) with its interval, and the
    held-out likelihood of good benign answers; the default picked on dev in bold."""
    cell = lambda r: "—" if not r else f"{r['rate']:.3f} [{r['lo']:.2f}, {r['hi']:.2f}]"
    held, public = PANELS[0][0], PANELS[2][0]
    head = ["run", "dev harmful", "dev benign", "dev dangerous", "harmful", "benign", "dangerous-sounding"]
    head += ["public harmful", "public benign", "good-answer log p"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * (len(head) - 1) + " ---: |"]
    for p in [result["base"], *result["points"]]:
        name = p["curve"] + (f", lr {p['lr']:g}" if "lr" in p else "")
        name = f"**{name}** (default)" if result.get("default") and p == result["default"] else name
        cells = [p["dev_harmful"], p["dev_benign"], p["dev_dangerous"], *p["panels"][held].values()]
        cells += [p["panels"][PANELS[1][0]]["benign"], *p["panels"][public].values()]
        logp = reports[(p["curve"], p.get("lr"))]["heldout"].get("benign_reference_logprob")
        lines.append(f"| {name} | " + " | ".join(map(cell, cells)) + f" | {logp:.3f} |")
    return "\n".join(lines)


def probe_rocs(path) -> dict:
    """The ROC, on the held-out and public sets, of the probe kind with the best cross-validated AUC on
    its fit set, keyed by panel title (scripts/probe.py run with --score heldout=... --score public=...)."""
    if not path:
        return {}
    best = max(read_json(path, UserError, "probe report")["best"].values(), key=lambda b: b["cv_auc"])
    panels = {
        "heldout": "project held-out sets",
        "eval": "project held-out sets",
        "public": "public sets (other authors)",
    }
    return {panels[name]: roc for name, roc in best["roc"].items() if name in panels}


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    load_records(args.data)  # a bad dataset stops here, before any model loads
    cache = {}
    base_reports = {s: evaluate_split(None, s, out / "base", args, cache) for s in SPLITS}
    result = {"data": args.data, "data_sha256": sha256(args.data), "seed": args.seed}
    result["base"] = point(base_reports, curve="untrained")
    all_reports, points = {}, []
    for run in runs(args):
        final = train_run(run, args)
        reports = {s: evaluate_split(final, s, run["dir"], args, cache) for s in SPLITS}
        all_reports[(run["curve"], run["lr"])] = reports
        points.append(point(reports, curve=run["curve"], lr=run["lr"], flags=run["flags"]))
    for p in points:
        if ("both", p["lr"]) in all_reports and p["curve"] != "both":
            p["mcnemar_vs_both"] = paired_tests(all_reports[(p["curve"], p["lr"])], all_reports[("both", p["lr"])])
    result |= {"points": points, "probe_roc": probe_rocs(args.probe)}
    result["default"] = choose_default(points, result["base"])
    result["best_of_all"] = choose_default(points, result["base"], candidates_only=False)  # baselines too
    write_json(out / "curves.json", result)
    plot(result, out / "curves.png")
    print("\n\n".join(table(result, title) for title, *_ in PANELS))
    print("\n### every rate\n\n" + summary(result, all_reports | {("untrained", None): base_reports}))
    for key, what in (("default", "default chosen on dev"), ("best_of_all", "the same rule over every curve")):
        if p := result[key]:
            print(f"{what}: {p['curve']} at lr {p['lr']:g}")
    return result


if __name__ == "__main__":
    with one_line_errors(lambda: "finished runs and evaluations are kept in --out; rerun to go on."):
        main()
