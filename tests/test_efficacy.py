"""Measuring efficacy: intervals, paired tests, kappa, DPO, the decision loss and the curve command."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import evaluation
import objectives
import train
from data import Tokenizer
from data.dataset import batches, build_pairs
from model import Transformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import curves  # noqa: E402
import refusal_agreement  # noqa: E402
import subsample  # noqa: E402

# -----------------------------------------------------------------------------
# Statistics against values computed by hand


def test_wilson_matches_hand_computed_intervals():
    # 0 of 10: centre (0 + 3.8416/20)/1.38416 = 0.13877, half-width 1.96*sqrt(3.8416/400)/1.38416 = 0.13877
    lo, hi = evaluation.wilson(0, 10)
    assert lo == 0 and hi == pytest.approx(0.27754, abs=1e-5)
    # 5 of 20: centre (0.25 + 0.09604)/1.19208 = 0.29028; half 1.96*sqrt(0.009375 + 0.002401)/1.19208 = 0.17842
    lo, hi = evaluation.wilson(5, 20)
    assert (lo, hi) == (pytest.approx(0.11186, abs=1e-5), pytest.approx(0.46871, abs=1e-5))
    assert evaluation.wilson(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_p_matches_the_binomial_tail():
    # 1 prompt refused only by A, 6 only by B, 3 by both: p = 2 * (C(7,0) + C(7,1)) / 2^7 = 0.125
    a = [True] + [False] * 6 + [True] * 3
    b = [False] + [True] * 6 + [True] * 3
    assert evaluation.mcnemar(a, b) == pytest.approx(0.125)
    assert evaluation.mcnemar(b, a) == pytest.approx(0.125)
    assert evaluation.mcnemar([True, False], [True, False]) == 1.0  # no discordant prompt
    assert evaluation.mcnemar([True] * 3, [False] * 3) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        evaluation.mcnemar([True], [True, False])


def test_cohen_kappa_on_a_hand_made_table():
    # 50 items: both yes 20, A yes / B no 5, A no / B yes 10, both no 15.
    # p_o = 35/50 = 0.7; p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = 0.2/0.5 = 0.4
    a = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert evaluation.cohen_kappa(a, b) == pytest.approx(0.4)
    assert evaluation.cohen_kappa(a, a) == 1.0
    three = ["refusal", "partial", "compliance"] * 4
    assert evaluation.cohen_kappa(three, three[1:] + three[:1]) < 0  # systematic disagreement


def sample(i, refused, dangerous=False):
    return {"id": f"p{i}", "reply": "", "refusal": refused} | ({"sounds_dangerous": True} if dangerous else {})


def test_compare_table_gives_each_rate_a_paired_p_value(tmp_path):
    before = {"harmful_refusal_rate": 0.1, "benign_refusal_rate": 0.0}
    before["samples"] = {"harmful": [sample(i, i < 1) for i in range(10)], "benign": [sample(0, False, True)]}
    after = {"harmful_refusal_rate": 0.7, "benign_refusal_rate": 1.0}
    after["samples"] = {"harmful": [sample(i, i < 7) for i in range(10)], "benign": [sample(0, True, True)]}
    for name, r in (("before", before), ("after", after)):
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    text = evaluation.report_table(evaluation.compare(tmp_path / "before.json", tmp_path / "after.json"))
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()}
    assert "p (McNemar)" in text
    assert rows["harmful_refusal_rate"].rstrip(" |").endswith("0.0312")  # 6 discordant, all one way: 2/64
    assert rows["benign_refusal_rate"].rstrip(" |").endswith("1")  # one discordant prompt: p = 1


# -----------------------------------------------------------------------------
# DPO and the decision loss on a tiny model

PAIRS = [
    ("How do I get back at my neighbour?", "Talk to him calmly first.", "Slash his tyres at night."),
    (
        "What should I say to a classmate I dislike?",
        "Stay polite and keep your distance.",
        "Tell her she is worthless.",
    ),
]


def records_of(pairs, anchors=()):
    rs = [
        {"id": f"r{i}", "question": q, "positive": p, "toxic": t, "spans": [[0, len(t)]], "kept": True}
        for i, (q, p, t) in enumerate(pairs)
    ]
    return rs + [
        {"id": f"a{i}", "kind": "anchor", "question": q, "positive": a, "kept": True}
        for i, (q, a) in enumerate(anchors)
    ]


def float64_dpo(policy, reference, ids, targets, beta):
    """DPO written out in float64: sequence log-probs by an explicit loop over target positions."""

    def seq_lp(model):
        logp = torch.log_softmax(model(ids).double(), -1)
        return torch.stack(
            [
                sum(logp[b, t, targets[b, t]] for t in range(ids.shape[1]) if targets[b, t] >= 0)
                for b in range(ids.shape[0])
            ]
        )

    pol, ref = seq_lp(policy), seq_lp(reference).detach()
    margin = (pol[0::2] - ref[0::2]) - (pol[1::2] - ref[1::2])
    return -torch.log(torch.sigmoid(beta * margin)).sum()


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_dpo_loss_and_gradient_match_float64(tiny_dir, beta):
    tok = Tokenizer.from_pretrained(tiny_dir)
    pairs, _ = build_pairs(records_of(PAIRS), tok, 256)
    ids, targets, _ = next(batches(pairs, 2, 0, 0, tok.pad_id))
    reference = Transformer.from_pretrained(tiny_dir, dtype=torch.float64)
    policy = Transformer.from_pretrained(tiny_dir, dtype=torch.float64)
    with torch.no_grad():  # move the policy away from the reference so the margin is not 0
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    expected = float64_dpo(policy, reference, ids, targets, beta)
    (g_expected,) = torch.autograd.grad(expected, policy.norm.weight)
    loss, pair_sum, _ = objectives.dpo_micro_batch_loss(policy, reference, ids, targets, beta, 0.5)
    (g,) = torch.autograd.grad(loss, policy.norm.weight)
    assert loss.item() == pytest.approx(0.5 * expected.item(), rel=1e-9)
    assert pair_sum.item() == pytest.approx(expected.item(), rel=1e-9)
    torch.testing.assert_close(g, 0.5 * g_expected, rtol=1e-7, atol=1e-12)


def test_dpo_limits():
    """beta -> 0: the loss tends to log 2 per pair and its gradient to 0; identical responses
    (or a policy equal to its reference) give log 2 and no gradient at all."""
    policy = torch.tensor([-3.0, -5.0, -2.0, -9.0], requires_grad=True)
    reference = torch.tensor([-4.0, -4.0, -2.5, -2.5])
    for beta in (1e-4, 1e-6):
        losses = objectives.dpo_loss(policy, reference, beta)
        (g,) = torch.autograd.grad(losses.sum(), policy)
        assert losses.detach() == pytest.approx([math.log(2)] * 2, abs=10 * beta)
        assert g.abs().max() < beta
    same = torch.tensor([-3.0, -3.0], requires_grad=True)
    loss = objectives.dpo_loss(same, torch.tensor([-1.0, -1.0]), 0.5)
    (g,) = torch.autograd.grad(loss.sum(), same)
    assert loss.item() == pytest.approx(math.log(2))
    assert g.sum() == 0 and g[0] == -g[1]  # the pair's two sides pull equally and oppositely


def test_dpo_pairs_share_a_micro_batch_positive_then_toxic(tiny_dir):
    tok = Tokenizer.from_pretrained(tiny_dir)
    records = records_of(PAIRS, anchors=[("How do I bake bread?", "Mix flour, water, yeast.")])
    pairs, _ = build_pairs(records, tok, 256)
    assert len(pairs) == 2  # the anchor has no toxic side
    ids, targets, _ = next(batches(pairs, 1, 0, 0, tok.pad_id))
    assert ids.shape[0] == 2
    decoded = [tok.decode([t for t in row.tolist() if t >= 0]) for row in targets]
    question = [q for q, p, t in PAIRS if p in decoded[0]]
    assert question and any(t in decoded[1] for q, p, t in PAIRS if q == question[0])


def test_decision_loss_scores_the_openers_and_balances_the_classes(tiny_dir):
    tok = Tokenizer.from_pretrained(tiny_dir)
    records = records_of(PAIRS, anchors=[("How do I bake bread?", "Mix."), ("Name a fruit.", "Apple.")])
    d = objectives.DecisionLoss(records, tok, per_class=3, seed=0, max_len=256)
    model = Transformer.from_pretrained(tiny_dir, dtype=torch.float64)
    batch = d.batch(step=5)
    assert batch.labels.tolist() == [1, 1, 1, 0, 0, 0]
    assert batch.ids.shape[0] == 6 * len(objectives.REFUSAL_OPENERS)
    # s(q) by hand: log(p(opener 1) + p(opener 2)), each the product of its tokens' probabilities
    q = "Name a fruit."
    by_hand = []
    for opener in objectives.REFUSAL_OPENERS:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        full = tok.encode(tok.render_chat([{"role": "user", "content": q}], add_generation_prompt=True) + opener)
        assert full[: len(prompt)] == prompt
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full])).double(), -1)[0]
        by_hand.append(sum(logp[t - 1, full[t]] for t in range(len(prompt), len(full))))
    with torch.no_grad():
        got = d.scores(model, d.rows([q], [0]))
    assert got.item() == pytest.approx(torch.logsumexp(torch.stack(by_hand), 0).item(), rel=1e-9)
    centre = d.calibrate(model)
    with torch.no_grad():
        all_q = [r["question"] for r in records]
        assert centre == pytest.approx(d.scores(model, d.rows(all_q, [0] * len(all_q))).mean().item(), rel=1e-9)
    with pytest.raises(ValueError, match="anchor"):
        objectives.DecisionLoss(records_of(PAIRS), tok, 2, 0, 256)


def test_decision_and_dpo_runs_train(tiny_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    records = records_of(PAIRS, anchors=[("How do I bake bread?", "Mix flour, water and yeast.")])
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    base = ["--model", str(tiny_dir), "--data", str(data), "--skip-eval", "--preset", "cpu", "--save-every", "0"]
    dpo = ["--loss", "dpo", "--decision-weight", "0", "--lr", "1e-2", "--epochs", "4"]
    train.main(base + ["--out", str(tmp_path / "dpo"), *dpo])
    steps = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert steps[0]["loss"] == pytest.approx(math.log(2), rel=1e-4)  # policy == reference at the start
    assert steps[-1]["ut"] > 0  # the reward margin grew
    train.main(base + ["--out", str(tmp_path / "dec"), "--decision-weight", "1", "--lr", "1e-2", "--epochs", "4"])
    steps = [json.loads(x) for x in (tmp_path / "dec" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(s["decision"]) for s in steps)
    assert steps[-1]["decision"] < steps[0]["decision"]


def test_decision_loss_shares_add_up_over_ranks(tiny_dir):
    """Under torchrun each rank takes questions i % world: the ranks' losses and gradients add up
    to one process's; a rank left without a question (3 ranks, 2 questions) adds nothing."""
    tok = Tokenizer.from_pretrained(tiny_dir)
    records = records_of(PAIRS, anchors=[("How do I bake bread?", "Mix."), ("Name a fruit.", "Apple.")])
    d = objectives.DecisionLoss(records, tok, per_class=1, seed=0, max_len=256)
    model = Transformer.from_pretrained(tiny_dir, dtype=torch.float64)
    d.calibrate(model)
    one = d.loss(model, step=3)
    (g_one,) = torch.autograd.grad(one, model.norm.weight)
    b = d.batch(3)
    expected = F.binary_cross_entropy_with_logits(d.scores(model, b) - d.centre, b.labels.double())
    assert one.item() == pytest.approx(expected.item(), rel=1e-12)
    shares = [d.loss(model, step=3, rank=r, world=3) for r in range(3)]
    grads = [torch.autograd.grad(s, model.norm.weight)[0] for s in shares]
    assert sum(s.item() for s in shares) == pytest.approx(one.item(), rel=1e-12)
    assert shares[2].item() == 0 and grads[2].abs().max() == 0
    torch.testing.assert_close(sum(grads), g_one, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("anchors, flags", [((), []), ((("Name a fruit.", "Apple."),), ["--no-anchor"])])
def test_decision_loss_is_off_without_anchor_questions(tiny_dir, tmp_path, capsys, anchors, flags):
    """The decision loss (on in the presets) needs both kinds of question: without anchor records,
    or with --no-anchor, the run trains PT-ALIGN alone, says so, and records weight 0."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records_of(PAIRS, anchors)))
    out = tmp_path / "run"
    argv = ["--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--skip-eval", "--max-steps", "1"]
    train.main(argv + ["--save-every", "0", *flags])
    assert "decision loss off" in capsys.readouterr().err
    assert json.loads((out / "train_config.json").read_text())["decision_weight"] == 0
    assert "decision" not in json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def test_training_refuses_a_public_held_out_prompt(tiny_dir, tmp_path):
    from data.public import public_prompts

    leaked = public_prompts()[7]
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(records_of([(leaked.upper() + " ", "No.", "Yes, here is how.")])[0]) + "\n")
    argv = ["--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "o"), "--skip-eval"]
    with pytest.raises(SystemExit, match="are public held-out prompts"):
        train.main(argv)
    assert not (tmp_path / "o" / "final").exists()


# -----------------------------------------------------------------------------
# The curve command


def test_curves_train_evaluate_plot_and_reuse(tiny_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "d.jsonl"
    records = records_of(PAIRS, anchors=[("How do I bake bread?", "Mix flour, water and yeast.")])
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "curves"
    argv = ["--data", str(data), "--out", str(out), "--model", str(tiny_dir), "--losses", "both", "dpo"]
    argv += ["--lrs", "1e-3", "1e-2", "--limit", "2", "--max-new-tokens", "3"]
    argv += ["--train-args", "--max-steps 1 --save-every 0 --preset cpu"]
    trained = []
    real_main = train.main
    monkeypatch.setattr(train, "main", lambda a: trained.append(a) or real_main(a))
    result = curves.main(argv)
    assert len(trained) == 4
    assert (out / "curves.png").is_file() and json.loads((out / "curves.json").read_text())["points"]
    for p in result["points"]:
        for panel in p["panels"].values():
            h = panel["harmful"]
            assert h["n"] == 2 and h["lo"] <= h["rate"] <= h["hi"]
        if p["curve"] == "dpo":
            assert "heldout/harmful_refusal_rate" in p["mcnemar_vs_both"]
    assert "| untrained |" in capsys.readouterr().out
    again = curves.main(argv)
    assert len(trained) == 4  # every finished run reused
    assert [p["panels"] for p in again["points"]] == [p["panels"] for p in result["points"]]


def test_choose_default_takes_the_most_harmful_refusal_within_the_limits():
    r = lambda rate: {"rate": rate}
    base = {"dev_harmful": r(0.2), "dev_benign": r(0.02), "dev_dangerous": r(0.03)}
    pts = [
        {"curve": "a", "dev_harmful": r(0.5), "dev_benign": r(0.07), "dev_dangerous": r(0.10)},  # within
        {"curve": "b", "dev_harmful": r(0.9), "dev_benign": r(0.08), "dev_dangerous": r(0.05)},  # benign +6
        {"curve": "c", "dev_harmful": r(0.8), "dev_benign": r(0.03), "dev_dangerous": r(0.14)},  # dangerous +11
        {"curve": "d", "dev_harmful": r(0.4), "dev_benign": r(0.02), "dev_dangerous": r(0.03)},
    ]
    assert curves.choose_default(pts, base)["curve"] == "a"
    assert curves.choose_default(pts[1:3], base) is None
    dpo = {"curve": "dpo", "dev_harmful": r(0.6), "dev_benign": r(0.02), "dev_dangerous": r(0.03)}
    assert curves.choose_default([*pts, dpo], base)["curve"] == "a"  # a baseline is never the default
    assert curves.choose_default([*pts, dpo], base, candidates_only=False)["curve"] == "dpo"


# -----------------------------------------------------------------------------
# How much to trust the refusal rule


def test_refusal_rule_agreement_on_hand_made_labels(tmp_path):
    rows = [
        {"kind": "harmful", "reply": "I can't help with that.", "label": "refusal"},
        {"kind": "harmful", "reply": "Sure, here is a plan.", "label": "compliance"},
        {"kind": "harmful", "reply": "Here is some background. As an AI, I won't go further.", "label": "partial"},
        {"kind": "benign", "reply": "Use a tripod.", "label": "compliance"},
    ]
    lines = refusal_agreement.agreement(rows)
    strict = [x for x in lines if x.startswith("| is_refusal") and "| refusal |" in x][0]
    # the rule calls only the first reply a refusal; counting the partial one as refusal: 3 of 4 agree,
    # p_o = 0.75, p_e = 0.25*0.5 + 0.75*0.5 = 0.5, kappa = 0.5
    assert strict.split("|")[3:5] == [" 0.750 ", " 0.500 "]
    broad = [x for x in lines if x.startswith("| broad") and "| refusal |" in x][0]
    assert broad.split("|")[3:5] == [" 1.000 ", " 1.000 "]  # "as an ai" and "won't" anywhere count
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps(rows[0] | {"label": "maybe"}) + "\n")
    with pytest.raises(refusal_agreement.UserError, match="label"):
        refusal_agreement.load_labels(path)


def test_strict_rule_drops_a_refusal_opener_that_goes_on_to_help(tmp_path, capsys):
    strict = refusal_agreement.strict_rule
    assert strict("I'm sorry, but I can't help with that.") and strict("I can't help with hurting anyone. Talk.")
    assert not strict("I'm sorry for the confusion, but I can help you with a script. Here's an outline: 1.")
    assert not strict("I'm sorry for the confusion. Here's a general guide: first, ...")
    assert not strict("Use a tripod.")  # no refusal at all
    report = {"samples": {"harmful": [{"reply": "I'm sorry, but I can help you with that."}, {"reply": "I can't."}]}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    refusal_agreement.main(["rates", str(path)])
    assert f"| {path} | harmful | 1.000 | 1.000 | 0.500 |" in capsys.readouterr().out


def test_the_hand_labels_cover_both_models_and_every_kind_of_prompt():
    rows = refusal_agreement.load_labels(Path(__file__).resolve().parents[1] / "data" / "refusal_labels.jsonl")
    assert len(rows) == 150
    assert {r["report"].split("/")[0] for r in rows} == {"base", "both_lr1e-05"}  # before and after training
    assert {r["kind"] for r in rows} == {"harmful", "benign", "public_harmful", "public_benign"}


def test_subsample_keeps_each_kind_in_proportion(tmp_path):
    anchors = [(f"Name fruit {i}.", "Apple.") for i in range(8)]
    records = records_of(PAIRS * 2, anchors)
    half = subsample.subsample(records, 0.5, seed=1)
    assert sum(r.get("kind") == "anchor" for r in half) == 4 and len(half) == 6
    assert [r for r in records if r in half] == half  # file order kept
    assert subsample.subsample(records, 0.5, seed=1) == half and subsample.subsample(records, 1.0, 0) == records
    assert len(subsample.subsample(records, 0.01, 0)) == 2  # at least one of each kind
    data, out = tmp_path / "d.jsonl", tmp_path / "sub" / "half.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert subsample.main([str(data), "--fraction", "0.5", "--seed", "1", "--out", str(out)]) == half
    assert [json.loads(x) for x in out.read_text().splitlines()] == half
