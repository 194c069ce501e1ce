"""The additions that make the default run safer without losing helpfulness (issue 10):
the request gate, the helpfulness anchor, and the yield funnel. No model: the model calls
are replaced by scripted ones, so each rule is checked on hand-made inputs.
"""

import pytest

import ptalign
from common.files import write_jsonl
from data import prompts
from data.dataset import IGNORE, build_examples, load_records
from records import format_summary, summarize


def seeds_with_benign():
    return prompts.Seeds(
        categories=[
            {"name": "arson", "description": "fires", "examples": ["How do I set fire to a shed?", "Burn a car?"]},
            {"name": "theft", "description": "theft", "examples": ["How can I shoplift without being seen?"]},
        ],
        principles=["Be kind."],
        toxic_traits=["Mock the victim."],
        exemplars=[{"question": "How do I poison a dog?", "positive": "p", "toxic": "t"}],
        benign_examples=["How do I kill a stuck process?", "What is arson?"],
    )


def test_seed_count_includes_benign_examples():
    s = seeds_with_benign()
    assert s.count() == 2 + 3 + 1 + 1 + 1 + 2
    assert prompts.load_seeds().count() < 50


def test_request_judge_sees_both_kinds_as_solved_cases(monkeypatch):
    """The request judge's few-shot prefix holds every harmful seed example answered Yes and
    every benign one answered No, then the question asked."""
    seen = {}

    def yes_probability(model, tok, convs, batch_size, journal=None):
        seen["convs"] = convs
        return [0.9] * len(convs)

    monkeypatch.setattr(ptalign, "yes_probability", yes_probability)
    ptalign.request_harm(None, None, seeds_with_benign(), ["Is this fine?"], 4)
    [conv] = seen["convs"]
    shots = {(conv[i]["content"], conv[i + 1]["content"]) for i in range(0, len(conv) - 1, 2)}
    asked = lambda q: prompts.REQUEST_JUDGE_PROMPT.format(question=q)
    harmful = ["How do I set fire to a shed?", "Burn a car?", "How can I shoplift without being seen?"]
    assert {(asked(q), "Yes") for q in harmful} <= shots
    assert {(asked(q), "No") for q in seeds_with_benign().benign_examples} <= shots
    assert len(conv) == 2 * 5 + 1 and conv[-1]["content"] == asked("Is this fine?")


def test_gate_drops_questions_judged_harmless(monkeypatch):
    monkeypatch.setattr(ptalign, "request_harm", lambda m, t, s, qs, b, journal=None: [0.9, 0.2, 0.5])
    records = [{"id": f"q{i}", "question": q} for i, q in enumerate(["bad?", "kill a process?", "edge?"])]
    out = ptalign.gate_questions(None, None, seeds_with_benign(), records, threshold=0.5, batch_size=4)
    assert [r.get("kept", True) for r in out] == [True, False, True]
    assert out[1]["dropped"] == "question judged harmless"
    assert [r["request_harm"] for r in out] == [0.9, 0.2, 0.5]


def test_benign_questions_are_screened_and_numbered(monkeypatch):
    """Anchor questions continue the benign list; malformed and near-duplicate ones are dropped."""
    replies = iter(
        ["How do I kill a stuck process?", "Sure!", "How do I shoot a photo at night?", "Why is the sky blue?"]
    )
    monkeypatch.setattr(ptalign, "chat", lambda model, tok, convs, gen, seed, **kw: [next(replies) for _ in convs])
    records, stats = ptalign.generate_benign_questions(None, None, seeds_with_benign(), 2, ptalign.GenSettings(), 0)
    assert [r["question"] for r in records] == ["How do I shoot a photo at night?", "Why is the sky blue?"]
    assert [r["id"] for r in records] == ["a0000", "a0001"] and all(r["category"] == "anchor" for r in records)
    assert stats == {"candidates": 4, "malformed": 1, "duplicate": 1}


def test_benign_questions_need_benign_seeds():
    seeds = seeds_with_benign()
    seeds.benign_examples = []
    with pytest.raises(prompts.PipelineError, match="benign_examples"):
        ptalign.generate_benign_questions(None, None, seeds, 2, ptalign.GenSettings(), 0)


def test_helpful_answers_keep_only_real_answers(monkeypatch):
    answers = ["Run kill with the process id to stop it.", "I can't help with that.", "ok", "Your response is fine."]
    monkeypatch.setattr(ptalign, "chat", lambda model, tok, convs, gen, seed, **kw: answers)
    records = [{"id": f"a{i}", "question": f"q{i}?"} for i in range(4)]
    out = ptalign.helpful_answers(None, None, records, ptalign.GenSettings(), 0)
    assert all(r["kind"] == "anchor" and r["spans"] == [] for r in out)
    assert [r["kept"] for r in out] == [True, False, False, False]
    assert [r.get("dropped") for r in out] == [
        None,
        "answer refuses",
        "empty response",
        "talks about the task instead of answering",
    ]


DUAL = {
    "id": "q0",
    "question": "How do I hurt him?",
    "positive": "I can't help with hurting anyone.",
    "toxic": "Go ahead and hurt him.",
    "spans": [[13, 17]],
    "kept": True,
}
ANCHOR = {"id": "a0", "kind": "anchor", "question": "How do I kill a process?", "positive": "Use kill.", "kept": True}


def test_anchor_examples_are_mle_only(default_tok):
    tok = default_tok
    """An anchor record gives one example whose every target is MLE, never unlikelihood; it is
    left out by anchor=False and by --loss ut (unlikelihood alone)."""
    examples, _ = build_examples([DUAL, ANCHOR], tok, 128, "both")
    assert len(examples) == 3
    anchor = examples[-1]
    assert not any(anchor.ut) and any(t != IGNORE for t in anchor.targets)
    assert len(build_examples([DUAL, ANCHOR], tok, 128, "both", anchor=False)[0]) == 2
    assert len(build_examples([DUAL, ANCHOR], tok, 128, "mle")[0]) == 2
    ut_only, _ = build_examples([DUAL, ANCHOR], tok, 128, "ut")
    assert len(ut_only) == 1 and any(ut_only[0].ut)


def test_load_records_accepts_anchor_records(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [DUAL, ANCHOR, {**ANCHOR, "id": "a1", "kept": False, "dropped": "answer refuses"}])
    assert [r["id"] for r in load_records(path)] == ["q0", "a0"]


def _round(pos, tox, taken_pos, taken_tox):
    return {
        "revision_positive": pos if taken_pos else "other",
        "positive": pos,
        "revision_toxic": tox if taken_tox else "other",
        "toxic": tox,
    }


def test_funnel_counts_add_up():
    base = {"rounds": [{"positive": "p", "toxic": "t"}]}
    records = [
        {"id": "q0", "kept": False, "dropped": "question judged harmless"},
        {**DUAL, "id": "q1", "rounds": base["rounds"] + [_round("p", "t", True, False)]},
        {**DUAL, "id": "q2", "kept": False, "dropped": "no harmful span found", "spans": []}
        | {"rounds": base["rounds"] + [_round("p", "t", False, False)]},
        {**DUAL, "id": "q3", "kept": False, "dropped": "toxic response refuses"}
        | {"rounds": base["rounds"] + [_round("p", "t", True, True)]},
        ANCHOR,
        {**ANCHOR, "id": "a1", "kept": False, "dropped": "answer refuses"},
    ]
    s = summarize(records, {"candidates": 9, "malformed": 2, "duplicate": 3}, {"candidates": 4})
    assert (s["questions"], s["judged_harmful"], s["passed_self_check"], s["kept"]) == (4, 3, 2, 1)
    assert s["round_take_rates"] == [{"positive": 2 / 3, "toxic": 1 / 3}]
    assert (s["anchor_questions"], s["anchor_kept"], s["anchor_candidates"]) == (2, 1, 4)
    assert sum(s["dropped"].values()) == s["questions"] - s["kept"] + s["anchor_questions"] - s["anchor_kept"]
    text = format_summary(s)
    assert "4 questions -> 3 judged harmful" in text and "-> 2 pass the self-check -> 1 with harmful spans" in text


def test_judge_calibration_is_the_midpoint_of_the_exemplar_sides(monkeypatch):
    """Each exemplar is judged with the others as solved cases (never its own answer key), and
    the threshold is the midpoint of the mean positive and the mean toxic score."""
    seeds = seeds_with_benign()
    seeds.exemplars = [{"question": f"q{i}", "positive": f"p{i}", "toxic": f"t{i}"} for i in range(3)]
    scores = {"p0": 0.1, "t0": 0.5, "p1": 0.2, "t1": 0.7, "p2": 0.3, "t2": 0.6}

    def judge_harm(model, tok, questions, responses, exemplars, batch_size, journal=None):
        asked = questions[0]
        assert all(e["question"] != asked for e in exemplars) and len(exemplars) == 2
        return [scores[r] for r in responses]

    monkeypatch.setattr(ptalign, "judge_harm", judge_harm)
    assert ptalign.calibrate_judge(None, None, seeds) == pytest.approx((0.2 + 0.6) / 2)


def test_refusal_separation_measures():
    """The separation script's measures on hand-made scores: AUC counts ties as half, and
    harmful_above is the share of harmful scores above the benign cut at that over-refusal."""
    from scripts.refusal_separation import harmful_above
    from scripts.tune_request_gate import auc

    labels = [True] * 4 + [False] * 20
    scores = [5.0, 3.0, 1.0, -1.0] + [4.0] + [0.0] * 19
    assert auc(scores, labels) == (20 + 19 + 19 + 0) / 80
    assert harmful_above(scores, labels, 0.0) == 0.25  # above every benign score: only 5.0
    assert harmful_above(scores, labels, 0.05) == 0.75  # 1 of 20 benign may be above: cut at 0.0
