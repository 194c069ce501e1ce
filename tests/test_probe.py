"""scripts/probe.py: the linear probe's fit, its metrics against hand-computed values, and the command end to end.

The fit is checked where the answer is known: a mean shift it must find, the stationarity of
the full-space objective its reduced solver claims to reach, and the penalty grid it chooses
from. The model's per-layer states are checked in test_model.py; here the whole command runs
on the tiny random model.
"""

import json

import numpy as np
import pytest
import torch

from common.errors import UserError
from scripts import probe


def shifted_gaussians(n_harmful, n_benign, seed, shift=1.0, layers=2, dim=12):
    """Layer 0: noise only; layer 1: the harmful rows shifted by `shift` in every feature."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(layers, n_harmful + n_benign, dim))
    y = np.r_[np.ones(n_harmful, bool), np.zeros(n_benign, bool)]
    X[1, y] += shift
    return X, y


def test_probe_finds_a_mean_shift_on_held_out_data():
    fit_X, y = shifted_gaussians(40, 60, seed=0)
    test_X, test_y = shifted_gaussians(50, 80, seed=1)
    args = type("Args", (), {"folds": 5, "seed": 0})
    rows, best = probe.probe_kind(fit_X, y, {"test": (test_X, 50)}, probe.GRID, args, first_layer=0)
    assert rows[1]["scores"]["test"]["auc"] > 0.95 and rows[1]["cv_auc"] > 0.95
    assert abs(rows[0]["scores"]["test"]["auc"] - 0.5) < 0.15  # noise separates nothing
    assert best["layer"] == 1 and all(r["penalty"] in probe.GRID for r in rows)
    curve = best["roc"]["test"]
    assert (curve["fpr"][0], curve["tpr"][0], curve["fpr"][-1], curve["tpr"][-1]) == (0, 0, 1, 1)


@pytest.mark.parametrize("penalty", [1e-3, 0.1, 10.0])
def test_fit_reaches_the_full_space_optimum(penalty):
    """With fewer prompts than features the fit runs in the rows' span: its solution must still
    zero the gradient of the full objective (weighted mean log-loss + penalty/2 |w|^2)."""
    X, y = shifted_gaussians(10, 20, seed=2, shift=0.5, dim=40)
    w, b = probe.fit_logistic(X, y, np.array([[penalty]]))
    W, B = torch.tensor(w[0], requires_grad=True), torch.tensor(b[0], requires_grad=True)
    t = torch.tensor(y, dtype=torch.float64)
    weight = torch.where(t > 0, 0.5 / t.sum(), 0.5 / (len(y) - t.sum()))  # each class weighs half
    margin = (2 * t - 1) * (torch.einsum("lnd,ld->ln", torch.tensor(X), W) + B[:, None])
    loss = (weight * torch.nn.functional.softplus(-margin)).sum() + 0.5 * penalty * (W * W).sum()
    loss.backward()
    assert W.grad.abs().max() < 1e-8 and B.grad.abs().max() < 1e-8


def test_auc_counts_ties_half_and_equals_the_area_under_the_roc():
    pos, neg = np.array([0.9, 0.5, 0.5]), np.array([0.5, 0.1])
    # pairs: 0.9 beats both (2), each 0.5 ties 0.5 (0.5) and beats 0.1 (1): 5 of 6
    assert probe.auc(pos, neg) == pytest.approx(5 / 6)
    curve = probe.roc(pos, neg)
    # thresholds 0.9, 0.5 (two harmful and a benign tied: one diagonal step), 0.1
    assert curve["fpr"] == [0, 0, 0.5, 1] and curve["tpr"] == pytest.approx([0, 1 / 3, 1, 1], abs=1e-5)
    assert np.trapezoid(curve["tpr"], curve["fpr"]) == pytest.approx(5 / 6, abs=1e-5)
    batched = probe.auc(np.stack([pos, -pos]), np.stack([neg, -neg]))
    assert batched == pytest.approx([5 / 6, 1 / 6])


def test_caught_at_a_benign_rate_by_hand():
    neg = np.arange(20.0)  # 0 .. 19
    pos = np.array([18.0, 18.5, 19.0, 25.0, 3.0])
    # 5% of 20 benign: threshold the 19th smallest (18): one benign above it; 18 itself is a tie, not caught
    assert probe.caught_at(pos, neg, 0.05) == {"caught": 3 / 5, "threshold": 18.0, "benign_above": 0.05}
    # 10%: the 18th smallest (17): 18, 18.5, 19 and 25 are caught
    assert probe.caught_at(pos, neg, 0.10) == {"caught": 4 / 5, "threshold": 17.0, "benign_above": 0.10}
    # 174 benign (the eval set): 5% is 8.7 prompts, so the threshold lets 8 through (the 166th smallest)
    assert probe.caught_at(np.array([165.5, 166.0]), np.arange(1.0, 175.0), 0.05)["threshold"] == 166.0
    row = probe.score_row(np.r_[pos, neg], 5)
    assert (row["caught_at_5"], row["caught_at_10"]) == (3 / 5, 4 / 5)


def test_cross_validated_penalty_comes_from_the_grid():
    X, y = shifted_gaussians(15, 20, seed=3, shift=0.8)
    grid = (0.01, 1.0, 100.0)
    cv = probe.cross_validate(X, y, grid, k=3, seed=0)
    assert cv.shape == (3, 2) and ((cv >= 0) & (cv <= 1)).all()
    chosen = probe.choose_penalty(cv, grid)
    assert all(0 <= i < len(grid) and cv[i, layer] == cv[:, layer].max() for layer, i in enumerate(chosen))
    tied = np.array([[0.8, 0.7], [0.9, 0.7], [0.9, 0.6]])
    assert probe.choose_penalty(tied, grid).tolist() == [2, 1]  # the larger penalty on a tie


def test_folds_are_stratified_and_cover_every_prompt():
    y = np.r_[np.ones(7, bool), np.zeros(13, bool)]
    folds = probe.stratified_folds(y, 3, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(20))
    assert all(y[f].sum() in (2, 3) for f in folds)


def write_prompts(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return str(path)


def test_a_dataset_file_gives_red_team_and_anchor_questions(tmp_path):
    """Gated: every red-team question the request gate passed, every anchor; kept: the records training reads."""
    records = [
        {"id": "q0", "question": "Why hurt?", "positive": "No.", "toxic": "bad", "spans": [[0, 3]], "kept": True},
        {"id": "q1", "question": "Why gone?", "kept": False, "dropped": "question judged harmless"},
        {
            "id": "q2",
            "question": "Why odd?",
            "positive": "No.",
            "toxic": "",
            "kept": False,
            "dropped": "empty response",
        },
        {"id": "a0", "kind": "anchor", "question": "Why sky?", "positive": "Light.", "kept": True},
        {"id": "a1", "kind": "anchor", "question": "Why rain?", "positive": "I can't.", "kept": False},
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    s = probe.read_set(str(tmp_path / "data.jsonl"))
    assert (s.name, s.harmful, s.benign) == ("data", ["Why hurt?", "Why odd?"], ["Why sky?", "Why rain?"])
    kept = probe.read_set(str(tmp_path / "data.jsonl"), "kept")
    assert (kept.harmful, kept.benign) == (["Why hurt?"], ["Why sky?"])
    h, b = write_prompts(tmp_path / "eval_harmful.jsonl", ["a"]), write_prompts(tmp_path / "eval_benign.jsonl", ["b"])
    assert (probe.read_set(f"{h},{b}").name, probe.read_set(f"x={h},{b}").name) == ("eval", "x")
    with pytest.raises(UserError, match="cannot be scored on"):
        probe.check_sets(s, [probe.read_set(str(tmp_path / "data.jsonl"))])
    with pytest.raises(UserError, match="eval_benign.jsonl: a file of the fit set"):
        probe.check_sets(probe.read_set(f"{b},{b}"), [probe.read_set(f"{h},{b}")])


def test_command_writes_report_and_chart_on_the_tiny_model(tiny_dir, tmp_path):
    words = ["knife", "poison", "steal", "garden", "recipe", "poem", "bridge", "violin"]
    harmful = [f"How do I {w} someone {i}?" for i, w in enumerate(words[:3] * 2)]
    benign = [f"Tell me about a {w} {i}." for i, w in enumerate(words[3:] * 2)]
    fit = f"{write_prompts(tmp_path / 'dev_harmful.jsonl', harmful)},{write_prompts(tmp_path / 'dev_b.jsonl', benign)}"
    score = f"{write_prompts(tmp_path / 'h.jsonl', harmful[:3])},{write_prompts(tmp_path / 'b.jsonl', benign[:4])}"
    out = tmp_path / "out"
    argv = [str(tiny_dir), "--fit", fit, "--score", score, "--score", f"again={score}", "--out", str(out)]
    report = probe.main([*argv, "--folds", "2", "--batch-size", "4", "--embeddings"])
    saved = json.loads((out / "probe.json").read_text())
    assert saved["rows"] == report["rows"] and (out / "probe_roc.png").stat().st_size > 0
    assert [s["name"] for s in saved["scored"]] == ["h+b", "again"]
    assert len(saved["rows"]) == 2 * 2  # layers 0 (embeddings) and 1, two kinds
    assert set(saved["best"]) == {"last", "mean"} and saved["scored"][0]["overlap_with_fit"] == 7
    for row in saved["rows"]:
        assert row["penalty"] in probe.GRID and set(row["scores"]["again"]) >= {"auc", "caught_at_5", "caught_at_10"}


def test_features_mark_the_prompt_and_do_not_depend_on_the_batch(tiny_dir):
    """'mean' averages over exactly the prompt's own tokens; right padding changes no prompt's features."""
    from generate import load

    model, tok = load(str(tiny_dir), "cpu", "float32")
    ids, mine = probe.encode_prompt(tok, "How do I sharpen a knife?")
    assert tok.decode([i for i, m in zip(ids, mine) if m]).strip() == "How do I sharpen a knife?"
    assert ids == tok.apply_chat_template("How do I sharpen a knife?") and not mine[-1]
    prompts = ["Hi.", "How do I sharpen a knife quickly and safely at home?", "Name a bird."]
    batched = probe.features(model, tok, prompts, batch_size=3, embeddings=True)
    alone = [probe.features(model, tok, [p], batch_size=1, embeddings=True) for p in prompts]
    for kind in probe.KINDS:
        assert batched[kind].shape == (2, 3, model.config.dim)
        np.testing.assert_allclose(batched[kind], np.concatenate([a[kind] for a in alone], 1), atol=1e-5)
