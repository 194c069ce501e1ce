"""PT-ALIGN, the method: a model writes its own dual safety dataset from a few annotations.

Read top to bottom, this file is the first half of the method (the second half, dual
instruction tuning, is `train.py`; the measurement, `evaluation.py`):

1. seeds        fewer than 50 human annotations (data/seeds.json, loaded and checked by
                data/prompts.py next to every prompt text the model is shown): harm categories
                with example questions, principles of a harmless and helpful answer, the
                mirrored traits of a harmful one, and a few (question, positive, toxic) exemplars;
2. questions    red-team self-instruct: the model writes new harmful questions per category,
                near-duplicates (ROUGE-L against all kept so far) and malformed ones dropped;
3. responses    for each question a positive answer under the principles and a toxic one
                under the traits, each with the exemplars in context as earlier turns;
4. refinement   K rounds of critique then revision on both sides (positives towards more
                harmless and more helpful, toxic ones towards more clearly harmful), then a
                self-check that drops samples that did not get there;
5. masks        the harmful words of each toxic response, found by the model quoting them and
                by contrast (tokens far more likely under the harmful instruction than the
                harmless one); stored as character spans of content words.

The dataset file those records go to (resumed, appended chunk by chunk, summarised, shown)
is data/records.py's business; here is only what the model is asked and what is kept.

The paper's abstract fixes the shape of the method; the prompts, thresholds and the two
span-finding methods here are this project's choices (following Self-Align/Dromedary and
unlikelihood training), each a named constant or a flag.

    python ptalign.py generate --out runs/data.jsonl --questions 32 --rounds 2
    python ptalign.py show runs/data.jsonl
    python ptalign.py eval --out runs/eval.json
"""

from __future__ import annotations

import math
import operator
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from functools import partial

import distributed
from data.cli import POSITIVE, Parser, add_flags
from data.dataset import locate, merge_spans, word_spans
from data.errors import one_line_errors
from data.files import check_output_file, words
from data.prompts import (
    CRITIQUE_POSITIVE,
    CRITIQUE_POSITIVE_START,
    CRITIQUE_TOXIC,
    CRITIQUE_TOXIC_START,
    JUDGE_PROMPT,
    POSITIVE_REPLY_START,
    QUOTE_PROMPT,
    REQUEST_JUDGE_PROMPT,
    REVISE_PROMPT,
    PipelineError,
    Seeds,
    benign_question_prompt,
    bullets,
    clean_question,
    clean_revision,
    is_refusal,
    load_seeds,
    question_prompt,
    rouge_l,
    system_prompts,
    talks_about_task,
    unusable,
)
from data.records import (
    DatasetFile,
    GenerateConfig,
    Meter,
    report_summary,
    saved_work,
    settings_of,
    show,
    summarize,
)
from generate import GenSettings, chat, journaled, load, response_logprobs, yes_probability


def eprint(text: str) -> None:
    """Progress and summaries go to stderr, so stdout carries only what a command prints as its result."""
    print(text, file=sys.stderr)


# -----------------------------------------------------------------------------
# The judge: the model scoring its own samples


def judge_harm(model, tok, questions, responses, exemplars=(), batch_size: int = 8) -> list[float]:
    """Model-as-judge harm score in [0, 1] for each (question, response), from JUDGE_PROMPT.

    The seed exemplars go first as solved cases (positive -> "No", toxic -> "Yes"): a small
    model judges far more consistently with worked examples than from the rubric alone, and
    the shared few-shot prefix is computed once per batch.
    """
    shots = []
    for e in exemplars:
        for side, answer in (("positive", "No"), ("toxic", "Yes")):
            shots += [
                {"role": "user", "content": JUDGE_PROMPT.format(question=e["question"], response=e[side])},
                {"role": "assistant", "content": answer},
            ]
    asks = [JUDGE_PROMPT.format(question=q, response=r) for q, r in zip(questions, responses)]
    return yes_probability(model, tok, [shots + [{"role": "user", "content": a}] for a in asks], batch_size)


def calibrate_judge(model, tok, seeds: Seeds, batch_size: int = 8) -> float:
    """The self-check's harm threshold, read off the labelled exemplars instead of fixed at 0.5.

    Each exemplar's positive and toxic response is judged with the other exemplars as solved
    cases (so it is not its own answer key); the threshold is the midpoint of the two sides'
    mean scores. A small judge's scores sit in a narrow band well below 0.5, so a fixed 0.5
    says little about where its harmless and harmful verdicts part.
    """
    pos, tox = [], []
    for i, e in enumerate(seeds.exemplars):
        others = seeds.exemplars[:i] + seeds.exemplars[i + 1 :]
        p, t = judge_harm(model, tok, [e["question"]] * 2, [e["positive"], e["toxic"]], others, batch_size)
        pos.append(p)
        tox.append(t)
    return round((sum(pos) / len(pos) + sum(tox) / len(tox)) / 2, 4)


# -----------------------------------------------------------------------------
# 2. Red-team self-instruct


def screen(replies: list[str], pool: list[str], dedup_threshold: float, stats: dict) -> list[str | None]:
    """Each reply's question, or None when it is malformed or a near-duplicate of the pool (ROUGE-L
    above dedup_threshold, as Self-Instruct filters); counts both in stats."""
    out = []
    for reply in replies:
        stats["candidates"] += 1
        q = clean_question(reply)
        if q is None:
            stats["malformed"] += 1
        elif any(rouge_l(q, p) > dedup_threshold for p in pool + [x for x in out if x]):
            stats["duplicate"] += 1
            q = None
        out.append(q)
    return out


def generate_questions(
    model, tok, seeds: Seeds, n: int, gen: GenSettings, seed: int, dedup_threshold=0.7, max_tries=8, log=print
) -> tuple[list[dict], dict]:
    """n new harmful questions, spread evenly over the seed categories.

    Each try asks every category that still needs questions for a few candidates; a
    candidate is kept when it is well formed and its ROUGE-L against every question kept
    so far (seed examples included) is at most dedup_threshold, as Self-Instruct does.
    Returns (records, stats).
    """
    C = len(seeds.categories)
    per_cat = {c["name"]: n // C + (i < n % C) for i, c in enumerate(seeds.categories)}
    kept = {c["name"]: [] for c in seeds.categories}
    pool = [q for c in seeds.categories for q in c["examples"]] + [e["question"] for e in seeds.exemplars]
    stats = {"candidates": 0, "malformed": 0, "duplicate": 0}
    for attempt in range(max_tries):
        asks = [c for c in seeds.categories if len(kept[c["name"]]) < per_cat[c["name"]]]
        if not asks or sum(map(len, kept.values())) >= n:
            break
        # twice as many candidates as a category still needs, at most a batch
        cats = [c for c in asks for _ in range(min(2 * (per_cat[c["name"]] - len(kept[c["name"]])), gen.batch_size))]
        prompts, starts = zip(*map(question_prompt, cats))
        sampling = replace(gen, max_new_tokens=40, temperature=1.0, top_p=0.95)
        replies = chat(model, tok, list(prompts), sampling, (seed, "questions", attempt), reply_starts=list(starts))
        for c, q in zip(cats, screen(replies, pool, dedup_threshold, stats)):
            if q is not None and len(kept[c["name"]]) < per_cat[c["name"]]:
                kept[c["name"]].append(q)
                pool.append(q)
        log(f"  questions: try {attempt + 1}, kept {sum(map(len, kept.values()))}/{n}")
    records = interleave(seeds, kept, per_cat, n)
    if not records:
        raise PipelineError(
            f"the model produced no usable question in {max_tries} tries "
            f"({stats['candidates']} candidates, {stats['malformed']} malformed)."
        )
    return records, stats


def given_questions(path, n: int, prefix: str) -> tuple[list[dict], dict]:
    """The first n prompts of a prompt file (one JSON object with a 'prompt' per line, as the
    held-out sets) as question records, in place of self-instruct; returns (records, stats)."""
    from evaluation import load_prompts  # it imports this module: imported when needed

    prompts = load_prompts(path, required=("prompt",))[:n]
    category = lambda r: r["category"] if isinstance(r.get("category"), str) else "given"
    records = [
        {"id": f"{prefix}{i:04d}", "category": category(r), "question": r["prompt"]} for i, r in enumerate(prompts)
    ]
    return records, {"candidates": len(records), "malformed": 0, "duplicate": 0}


def interleave(seeds: Seeds, kept: dict, per_cat: dict, n: int) -> list[dict]:
    """Question records with the categories taken in turn, so that the first k records cover many."""
    records = []
    for i in range(max(per_cat.values())):
        for c in seeds.categories:
            if i < len(kept[c["name"]]) and len(records) < n:
                records.append({"id": f"q{len(records):04d}", "category": c["name"], "question": kept[c["name"]][i]})
    return records


# -----------------------------------------------------------------------------
# 2b. Which questions are harmful at all (this project's addition)
#
# A 135M model asked for "questions a person with bad intentions might ask" writes many that
# are harmless ("Can you delete my favorite songs from my phone?"). Its positive would be a
# refusal, and training on it would teach the model to refuse a harmless request: the
# over-refusal the method exists to avoid. So each question is judged first, and one the judge
# finds harmless is dropped before any response is written.


def request_harm(model, tok, seeds: Seeds, questions: list[str], batch_size: int = 8) -> list[float]:
    """P(the assistant should refuse) for each question, from REQUEST_JUDGE_PROMPT.

    Solved cases first: the seed categories' example questions ("Yes") alternating with the
    benign seed examples ("No"), so that the judge has seen both kinds of dangerous-sounding text.
    """
    harmful = [(q, "Yes") for c in seeds.categories for q in c["examples"]]
    benign = [(q, "No") for q in seeds.benign_examples]
    cases = [x for pair in zip(harmful[::2], benign) for x in pair] + harmful[1::2] + benign[len(harmful[::2]) :]
    shots = []
    for q, answer in cases:
        shots += [
            {"role": "user", "content": REQUEST_JUDGE_PROMPT.format(question=q)},
            {"role": "assistant", "content": answer},
        ]
    asks = [shots + [{"role": "user", "content": REQUEST_JUDGE_PROMPT.format(question=q)}] for q in questions]
    return yes_probability(model, tok, asks, batch_size)


GATE_DROPPED = "question judged harmless"  # the reason a record dropped by the request gate gives


def gate_questions(model, tok, seeds: Seeds, records, threshold: float, batch_size: int) -> list[dict]:
    """Score each question record; one judged harmless is marked dropped (no refusal is written for it)."""
    for r, h in zip(records, request_harm(model, tok, seeds, [r["question"] for r in records], batch_size)):
        r["request_harm"] = round(h, 4)
        if h < threshold:
            r["kept"], r["dropped"] = False, GATE_DROPPED
    return records


# -----------------------------------------------------------------------------
# 2c. The helpfulness anchor (this project's addition)
#
# MLE on refusals alone moves the model towards refusing, harmless requests included. The
# anchor adds the model's own answers to harmless questions, several of which only sound
# dangerous, as MLE targets: what it already does well is trained to stay. Its questions are
# self-instructed from the benign seed examples, the same way as the red-team questions.


def generate_benign_questions(
    model, tok, seeds: Seeds, n: int, gen: GenSettings, seed: int, dedup_threshold=0.7, max_tries=8
) -> tuple[list[dict], dict]:
    """n harmless questions continuing the benign seed examples, deduplicated like the red-team ones."""
    examples = seeds.benign_examples
    if not examples:
        raise PipelineError("the helpfulness anchor needs 'benign_examples' in the seed file (or --anchors 0).")
    pool = list(examples) + [q for c in seeds.categories for q in c["examples"]]
    kept, stats = [], {"candidates": 0, "malformed": 0, "duplicate": 0}
    for attempt in range(max_tries):
        if len(kept) >= n:
            break
        # each candidate sees the examples in another order, for variety
        k = min(2 * (n - len(kept)), gen.batch_size)
        asks = [benign_question_prompt(examples[i % len(examples) :] + examples[: i % len(examples)]) for i in range(k)]
        sampling = replace(gen, max_new_tokens=40, temperature=1.0, top_p=0.95)
        replies = chat(
            model, tok, [a for a, _ in asks], sampling, (seed, "anchor", attempt), reply_starts=[b for _, b in asks]
        )
        new = [q for q in screen(replies, pool, dedup_threshold, stats) if q is not None][: n - len(kept)]
        kept += new
        pool += new
    return [{"id": f"a{i:04d}", "category": "anchor", "question": q} for i, q in enumerate(kept)], stats


def helpful_answers(model, tok, records, gen: GenSettings, seed) -> list[dict]:
    """Each question answered as the model answers it by default (no system prompt): an MLE-only
    record. An answer that refuses, talks about the task or is empty is dropped.

    Sampled at temperature 1 with no nucleus cut: MLE on unbiased samples of the model's own
    answers pulls towards its own distribution (in expectation it is a KL(p_before || p) term),
    whereas greedy answers would sharpen it, which lowered the likelihood of good benign
    answers on the dev split (-0.80 nats/token against -0.14; README).
    """
    unbiased = replace(gen, temperature=1.0, top_p=1.0)
    answers = chat(model, tok, [r["question"] for r in records], unbiased, (seed, "answer"), whole_sentences=True)
    for r, a in zip(records, answers):
        r.update(kind="anchor", positive=a, toxic="", spans=[], kept=True)
        reason = unusable(a) or ("answer refuses" if is_refusal(a) else None)
        if reason:
            r["kept"], r["dropped"] = False, reason
    return records


# -----------------------------------------------------------------------------
# 3. Dual responses


def few_shot(system: str, exemplars, side: str, question: str) -> list[dict]:
    """A conversation: instructions, the exemplars as earlier turns, then the new question."""
    conv = [{"role": "system", "content": system}]
    for e in exemplars:
        conv += [{"role": "user", "content": e["question"]}, {"role": "assistant", "content": e[side]}]
    return conv + [{"role": "user", "content": question}]


def dual_responses(
    model, tok, seeds: Seeds, records, gen: GenSettings, seed, positive_start: str = POSITIVE_REPLY_START
) -> list[dict]:
    """Add a positive and a toxic response to each record, each under its own instructions."""
    systems = system_prompts(seeds)
    convs = lambda side: [few_shot(systems[side], seeds.exemplars, side, r["question"]) for r in records]
    starts = [positive_start] * len(records) if positive_start else None
    pos = chat(model, tok, convs("positive"), gen, (seed, "positive"), reply_starts=starts, whole_sentences=True)
    if positive_start:
        pos = [f"{positive_start} {p}".strip() for p in pos]
    tox = chat(model, tok, convs("toxic"), gen, (seed, "toxic"), whole_sentences=True)
    for r, p, t in zip(records, pos, tox):
        r["rounds"] = [{"positive": p, "toxic": t}]
    return records


# -----------------------------------------------------------------------------
# 4. Iterative refinement and the self-check


def keeps_refusal(current: str, revision: str) -> bool:
    # A positive that refuses stays a refusal: the judge may score a vague non-answer as less
    # harmful, but the refusal is the behaviour the positives are there to teach.
    return is_refusal(revision) or not is_refusal(current)


def does_not_refuse(current: str, revision: str) -> bool:
    # A toxic sample that refuses would teach the model to avoid refusing.
    return not is_refusal(revision)


@dataclass(frozen=True)
class Side:
    """One side of a record, as refinement sees it."""

    name: str  # the record's key: "positive" or "toxic"
    sign: str  # "+" or "-", in the seeds of this side's model calls
    critique: str  # the critique prompt
    critique_start: str  # the text every critique is made to begin with
    better: Callable[[float, float], bool]  # (revision's harm, current harm): the way the judge must move
    allowed: Callable[[str, str], bool]  # (current text, revision): the side's own rule

    def takes(self, current: dict, revision: str, harm: float) -> bool:
        """Whether a revision replaces the current text: it answers (three words or more, not
        about the task), the judge moved the right way, and the side's own rule holds."""
        return (
            unusable(revision) is None
            and self.better(harm, current[f"{self.name}_harm"])
            and self.allowed(current[self.name], revision)
        )


SIDES = (
    Side("positive", "+", CRITIQUE_POSITIVE, CRITIQUE_POSITIVE_START, operator.lt, keeps_refusal),
    Side("toxic", "-", CRITIQUE_TOXIC, CRITIQUE_TOXIC_START, operator.gt, does_not_refuse),
)


def critique(model, tok, side: Side, questions, current, fill: dict, gen: GenSettings, seed) -> list[str]:
    """The model's critique of each current text of one side, greedy, opening with side.critique_start."""
    prompts = [side.critique.format(question=q, response=c[side.name], **fill) for q, c in zip(questions, current)]
    starts = [side.critique_start] * len(prompts)
    replies = chat(model, tok, prompts, gen, seed, greedy=True, reply_starts=starts, whole_sentences=True)
    return [f"{side.critique_start} {r}" for r in replies]


def revise(model, tok, side: Side, questions, current, critiques, gen: GenSettings, seed) -> list[str]:
    """The model's rewrite of each current text of one side, following its critique."""
    prompts = [
        REVISE_PROMPT.format(question=q, response=c[side.name], critique=k)
        for q, c, k in zip(questions, current, critiques)
    ]
    return [clean_revision(x) for x in chat(model, tok, prompts, gen, seed, whole_sentences=True)]


def refine(model, tok, seeds: Seeds, records, rounds: int, gen: GenSettings, seed, log=lambda k: None) -> list[dict]:
    """K rounds of critique then revision, for both sides of every record.

    A revision replaces the current text only if the judge moves the right way: less harmful
    for a positive, more harmful for a toxic sample (self-refinement with a self-check per
    round, so a round never makes a sample worse by the model's own measure); a revision that
    talks about the task instead of answering is never taken, nor one that turns a refusing
    positive into a non-refusal. Every round's critique, revision and verdict is kept in the
    record. log(k) is called as round k ends.
    """
    fill = {"principles": bullets(seeds.principles), "traits": bullets(seeds.toxic_traits)}
    qs = [r["question"] for r in records]
    judge = lambda texts: judge_harm(model, tok, qs, texts, seeds.exemplars, gen.batch_size)
    for side in SIDES:  # the judge's verdict on the dual responses: where refinement starts
        for r, h in zip(records, judge([r["rounds"][-1][side.name] for r in records])):
            r["rounds"][-1][f"{side.name}_harm"] = round(h, 4)
    short = replace(gen, max_new_tokens=min(40, gen.max_new_tokens))  # a critique is a sentence or two
    for k in range(rounds):
        last = [r["rounds"][-1] for r in records]
        crits = [critique(model, tok, s, qs, last, fill, short, (seed, f"critique{s.sign}", k)) for s in SIDES]
        revs = [revise(model, tok, s, qs, last, c, gen, (seed, f"revise{s.sign}", k)) for s, c in zip(SIDES, crits)]
        harms = [judge(v) for v in revs]
        for i, (r, current) in enumerate(zip(records, last)):
            r["rounds"].append(
                next_round(current, [(s, c[i], v[i], h[i]) for s, c, v, h in zip(SIDES, crits, revs, harms)])
            )
        log(k)
    return records


def next_round(current: dict, drafts) -> dict:
    """A round's entry: each side's critique, revision and the revision's harm, then the text
    (and harm) each side goes on with. drafts: (side, critique, revision, harm) per side."""
    entry = {}
    for side, crit, rev, harm in drafts:
        entry[f"critique_{side.name}"] = crit
        entry[f"revision_{side.name}"] = rev
        entry[f"revision_{side.name}_harm"] = round(harm, 4)
    for side, _, rev, harm in drafts:
        take = side.takes(current, rev, harm)
        entry[side.name] = rev if take else current[side.name]
        entry[f"{side.name}_harm"] = round(harm, 4) if take else current[f"{side.name}_harm"]
    return entry


def self_check(records, threshold: float = 0.5, margin: float = 0.0) -> list[dict]:
    """Keep a record only if its two sides ended up apart: a harmless positive, a harmful toxic one.

    Uses the judge's scores from the last round: the positive's P(harmful) must be below
    `threshold` and the toxic one's above the positive's by more than `margin` (polarised
    samples, the method's aim); a toxic sample that refuses is dropped too, since it would
    teach the model to avoid refusing. Sets record["kept"] and, when dropped, the reason.
    """
    for r in records:
        f = r["rounds"][-1]
        r["positive"], r["toxic"] = f["positive"], f["toxic"]
        r["judge"] = {"positive_harm": f["positive_harm"], "toxic_harm": f["toxic_harm"]}
        reason = None
        if len(words(f["positive"])) < 3 or len(words(f["toxic"])) < 3:
            reason = "empty response"
        elif talks_about_task(f["positive"]) or talks_about_task(f["toxic"]):
            reason = "talks about the task instead of answering"
        elif f["positive_harm"] >= threshold:
            reason = "positive judged harmful"
        elif is_refusal(f["toxic"]):
            reason = "toxic response refuses"
        elif f["toxic_harm"] <= f["positive_harm"] + margin:
            reason = "toxic not judged more harmful than positive"
        r["kept"] = reason is None
        if reason:
            r["dropped"] = reason
    return records


# -----------------------------------------------------------------------------
# 5. Fine-grained masks: which words of a toxic response carry the harm


def quote_spans(model, tok, records, gen: GenSettings, seed, max_quote_words: int = 8) -> list[list[list[int]]]:
    """Spans from the model quoting the harmful phrases; each quote located in the text."""
    # A few short phrases, one per line: 48 tokens hold more than the quotes worth keeping.
    replies = chat(
        model,
        tok,
        [QUOTE_PROMPT.format(question=r["question"], response=r["toxic"]) for r in records],
        replace(gen, max_new_tokens=min(48, gen.max_new_tokens)),
        (seed, "quote"),
        greedy=True,
    )
    out = []
    for r, reply in zip(records, replies):
        spans = []
        for line in reply.splitlines():
            line = re.sub(r"^\s*(\d+[.)]|[-*•])\s*", "", line)
            hit = locate(r["toxic"], line)
            # A quote of a whole sentence or more is not a pointer to harmful words.
            if hit and len(words(line)) <= max_quote_words:
                spans += word_spans(r["toxic"], *hit)
        out.append(merge_spans(spans))
    return out


def contrast_scores(model, tok, seeds: Seeds, records, batch_size: int = 8) -> list[list[tuple[list[int], float]]]:
    """(span, score) for each content word of each toxic response: how many nats likelier the
    word's most affected token is under the harmful instruction than under the harmless one.

    The two contexts differ only in the system prompt (traits vs principles), so a large
    difference marks tokens the harmful instruction is responsible for.
    """
    systems = system_prompts(seeds)
    offsets = [tok.encode_with_offsets(r["toxic"]) for r in records]
    # All harmful-instruction sequences first, then all harmless ones: each batch then shares
    # its system prompt, which is prefilled once.
    convs = [
        [{"role": "system", "content": systems[side]}, {"role": "user", "content": r["question"]}]
        for side in ("toxic", "positive")
        for r in records
    ]
    logp = response_logprobs(model, tok, convs, [ids for ids, _ in offsets] * 2, batch_size)
    n = len(records)
    out = []
    for i, r in enumerate(records):
        diff = (logp[i] - logp[n + i]).tolist()
        tokens = list(zip(offsets[i][1], diff))
        out.append(
            [
                (w, max((d for (s, e), d in tokens if w[0] < e and s < w[1]), default=-math.inf))
                for w in word_spans(r["toxic"])
            ]
        )
    return out


def margin_spans(scored, margin: float) -> list[list[int]]:
    """The words whose contrast beats an absolute margin (in nats)."""
    return merge_spans([w for w, score in scored if score > margin])


def rank_spans(scored, top: float, floor: float) -> list[list[int]]:
    """The strongest-contrast `top` fraction of a response's content words (at least one), each
    above `floor` nats.

    A small model's system prompt moves its token log-probabilities by well under a nat, so an
    absolute margin finds nothing in most responses; ranking within the response keeps the
    words the harmful instruction moved most, and the floor keeps words it did not move out.
    """
    k = max(1, round(top * len(scored)))
    best = sorted(scored, key=lambda ws: -ws[1])[:k]
    return merge_spans([w for w, score in best if score > floor])


@dataclass
class SpanRule:
    """How harmful words are found: which methods, and how contrast scores become words."""

    method: str = "contrast"  # quote | contrast | both (their union)
    contrast_rule: str = "rank"  # rank: the strongest words of each response; margin: every word above `margin`
    margin: float = 1.0
    top: float = 0.5
    floor: float = 0.0

    def contrast(self, scored) -> list[list[int]]:
        if self.contrast_rule == "margin":
            return margin_spans(scored, self.margin)
        return rank_spans(scored, self.top, self.floor)


def find_spans(model, tok, seeds, records, rule: SpanRule, gen: GenSettings, seed):
    """Attach `spans` (and each method's own spans) to every record; a kept record with no
    harmful word found is dropped."""
    none = [[]] * len(records)
    quoted = quote_spans(model, tok, records, gen, seed) if rule.method in ("quote", "both") else none
    contrast = none
    if rule.method in ("contrast", "both"):
        contrast = [rule.contrast(sc) for sc in contrast_scores(model, tok, seeds, records, gen.batch_size)]
    for r, q, c in zip(records, quoted, contrast):
        r["spans_quote"], r["spans_contrast"] = q, c
        r["spans"] = merge_spans(q + c)
        if not r["spans"] and r.get("kept"):
            r["kept"], r["dropped"] = False, "no harmful span found"
    return records


# -----------------------------------------------------------------------------
# The generate stage: all of the above, in fixed chunks of questions, appended to a JSONL file


def method_on_chunk(model, tok, seeds: Seeds, cfg: GenerateConfig, gen: GenSettings, questions, start, progress):
    """The method on one chunk of questions: the request gate, dual responses, refinement,
    self-check, spans.

    start: the chunk's position in the question list; with cfg.seed it seeds every sampling
    call of the chunk. progress(stage, label) is called as the responses and each round end.
    """
    seed = (cfg.seed, start)
    records = [dict(q) for q in questions]
    if cfg.request_threshold > 0:
        gate_questions(model, tok, seeds, records, cfg.request_threshold, gen.batch_size)
    harmful = [r for r in records if r.get("kept", True)]
    if harmful:
        dual_responses(model, tok, seeds, harmful, gen, seed, cfg.positive_start)
        progress("responses", "responses")
        report_round = lambda k: progress("round", f"round {k + 1}/{cfg.rounds}")
        refine(model, tok, seeds, harmful, cfg.rounds, gen, seed, log=report_round)
        self_check(harmful, cfg.judge_threshold, cfg.judge_margin)  # judge_threshold: as calibrated
        rule = SpanRule(cfg.span_method, cfg.contrast_rule, cfg.contrast_margin, cfg.contrast_top, cfg.contrast_floor)
        find_spans(model, tok, seeds, harmful, rule, gen, seed)
    return records


# Relative cost of the stages of a chunk, for the ETA (measured on the default model: a
# refinement round, with its two critiques, two revisions and two judgements, costs about
# three times the dual responses or the self-check and spans; the anchor's questions and
# answers about as much as the dual responses).
STAGE_COST = {"responses": 1.0, "round": 3.0, "spans": 1.0, "anchor": 1.0}


def run_generate(cfg: GenerateConfig, model=None, tok=None) -> dict:
    """Build (or resume) a dual dataset at cfg.out, chunk by chunk; return the summary.

    model/tok: an already loaded model to use instead of loading cfg.model. Each batch of model
    work is saved in the journal beside cfg.out as it finishes, so a run interrupted at any
    point and rerun with the same flags redoes at most one batch and ends with the same file.
    """
    seeds = load_seeds(cfg.seeds)
    for path in (cfg.questions_file, cfg.anchors_file):
        if path:
            given_questions(path, 0, "")  # a malformed prompt file stops the run before any model loads
    dataset = DatasetFile(cfg.out, settings_of(cfg))  # other flags than the file's: refused before any model loads
    # (and than its journal's); under torchrun only rank 0 journals: another rank loses at most its chunk
    journal = dataset.open_journal() if distributed.is_main() else None
    distributed.barrier()  # every rank has read the file before rank 0 appends to it
    eprint(
        f"PT-ALIGN generate: {seeds.count()} seed annotations, {cfg.questions} questions, {cfg.rounds} rounds, "
        f"{cfg.anchors} anchor questions -> {dataset.path}"
        + (f" (resuming: {len(dataset.done)} done)" if dataset.done else "")
    )
    if len(dataset.done) < cfg.questions + cfg.anchors:
        if model is None:
            model, tok = load(cfg.model, cfg.device, cfg.dtype)
        with journaled(journal):
            summary = generate_records(model, tok, seeds, cfg, dataset)
    else:  # finished before: nothing to recompute (the settings were checked above)
        summary = summarize(list(dataset.done.values()))
    if journal:
        journal.remove()  # the file is complete: its batches are not needed any more
    return report_summary(summary, dataset.path)


def generate_records(model, tok, seeds: Seeds, cfg: GenerateConfig, dataset: DatasetFile) -> dict:
    """The whole method into the dataset file: the judge's calibration, the questions, the anchor's
    questions, then every chunk of records; returns the summary of the file."""
    gen = GenSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size)
    t_start = time.perf_counter()
    # Under torchrun what every rank must agree on is drawn by rank 0 and handed to all (distributed.py).
    if cfg.judge_calibration:
        threshold = distributed.from_main(lambda: calibrate_judge(model, tok, seeds, gen.batch_size))
        cfg = replace(cfg, judge_threshold=threshold)
        eprint(f"  self-check threshold, calibrated on the {len(seeds.exemplars)} exemplars: {cfg.judge_threshold}")
    questions, qstats = distributed.from_main(
        lambda: (
            given_questions(cfg.questions_file, cfg.questions, "q")
            if cfg.questions_file
            else generate_questions(model, tok, seeds, cfg.questions, gen, cfg.seed, cfg.dedup_threshold, log=eprint)
        )
    )
    anchors, astats = [], {}
    if cfg.anchors:
        anchors, astats = distributed.from_main(
            lambda: (
                given_questions(cfg.anchors_file, cfg.anchors, "a")
                if cfg.anchors_file
                else generate_benign_questions(model, tok, seeds, cfg.anchors, gen, cfg.seed, cfg.dedup_threshold)
            )
        )
    write_chunks(model, tok, seeds, cfg, gen, dataset, questions, anchors)
    summary = distributed.from_main(lambda: summarize(dataset.records(questions + anchors), qstats, astats))
    return summary | dict(
        seconds=round(time.perf_counter() - t_start, 1),
        generated_tokens=gen.tally.tokens,
        generation_seconds=round(gen.tally.seconds, 1),
        generated_tokens_per_s=round(gen.tally.rate(), 1),
    )


def write_chunks(model, tok, seeds, cfg: GenerateConfig, gen: GenSettings, dataset, questions, anchors) -> None:
    """Run the method on every chunk of questions not yet written, then answer the anchor
    questions, appending each chunk's records as it is done (the resume points).

    Under torchrun the chunks are dealt out to the ranks and rank 0 appends them in order: a
    chunk's samples depend only on its questions and its start (its seeds), so the file is the
    one a single process writes."""
    todo = dataset.pending(questions, cfg.batch_size)
    anchor_todo = dataset.pending(anchors, cfg.batch_size)
    per_chunk = STAGE_COST["responses"] + cfg.rounds * STAGE_COST["round"] + STAGE_COST["spans"]
    work = len(todo) * per_chunk + len(anchor_todo) * STAGE_COST["anchor"]
    meter = Meter(work, len(questions) + len(anchors), gen.tally, len(dataset.records(questions + anchors)))
    name = lambda start: f"chunk {start // cfg.batch_size + 1}/{math.ceil(len(questions) / cfg.batch_size)}"
    step = lambda start, stage, label, n=0: eprint(meter.step(f"{name(start)}: {label}", STAGE_COST[stage], n))
    dual = lambda job: method_on_chunk(model, tok, seeds, cfg, gen, job[1], job[0], partial(step, job[0]))
    for (start, _), records, here in distributed.in_turns(todo, dual):
        written = dataset.append(records)
        if here:
            step(start, "spans", "self-check, spans", written)
        else:  # computed by another rank: all of its work arrives at once
            eprint(meter.step(f"{name(start)}: from another rank", per_chunk, written))
    answers = lambda job: helpful_answers(model, tok, [dict(a) for a in job[1]], gen, (cfg.seed, job[0]))
    for (start, chunk), records, _ in distributed.in_turns(anchor_todo, answers):
        written = dataset.append(records)
        eprint(meter.step(f"anchor answers {start + len(chunk)}/{len(anchors)}", STAGE_COST["anchor"], written))


# -----------------------------------------------------------------------------
# Command line


def build_parser() -> Parser:
    p = Parser(description="PT-ALIGN: self-generated dual safety data, and evaluation.")
    sub = p.add_subparsers(dest="command", required=True)
    add_flags(sub.add_parser("generate", help="build a dual dataset (JSONL) from the seed annotations"), GenerateConfig)

    s = sub.add_parser("show", help="print a dataset's records with the harmful spans highlighted")
    s.add_argument("file", help="dataset JSONL written by generate")
    s.add_argument("--limit", type=POSITIVE, default=None, help="show only the first N records")

    import evaluation  # it imports this module: imported when needed, never as this one loads

    evaluation.add_commands(sub, lambda q: add_flags(q, GenerateConfig, ("model", "device", "dtype", "batch_size")))
    return p


def interrupted(args) -> str:
    """The last message of an interrupted command: what it saved, and how to go on."""
    if args.command == "generate":
        return saved_work(args.out)
    return f"`{args.command}` writes its output only at the end, so nothing was written; rerun it to start again."


def main(argv=None):
    distributed.init()  # under torchrun: generate and eval split their work over the processes
    args = build_parser().parse_args(argv)
    with one_line_errors(lambda: interrupted(args)):
        for flag in ("out", "png"):  # every output path, checked before any model loads
            if getattr(args, flag, None):
                check_output_file(getattr(args, flag), "--" + flag)
        if args.command == "generate":
            run_generate(GenerateConfig(**{f.name: getattr(args, f.name) for f in fields(GenerateConfig)}))
        elif args.command == "show":
            print(show(args.file, args.limit))
        else:
            args.run(args)  # eval, compare and spans (evaluation.py)


if __name__ == "__main__":
    main()
