"""PT-ALIGN, the method: a model writes its own dual safety dataset from a few annotations.

`pt_align`, the first function, runs the stages in the paper's order, each a function further
down in the same order (dual instruction tuning, the second half, is train.py):

1. seeds        fewer than 50 human annotations (data/seeds.json; the prompts, data/prompts.py):
                harm categories with example questions, principles of a harmless and helpful
                answer, the mirrored traits of a harmful one, a few (question, positive, toxic)
                exemplars, harmless questions that sound dangerous;
2. questions    red-team self-instruct: new harmful questions per category, near-duplicates
                (ROUGE-L) and malformed ones dropped (or given: --questions-file);
3. request gate the model judges whether each question should be refused at all; one it finds
                harmless is dropped before a refusal is written for it;
4. responses    a positive answer under the principles and a toxic one under the traits, the
                exemplars in context as earlier turns;
5. refinement   K rounds of critique then revision of both, a revision taken only when the
                model's judge moves the right way (positives less harmful, toxic ones more);
6. self-check   a record is kept when its positive is judged harmless and its toxic response
                more harmful (the judge's threshold read off the exemplars);
7. spans        the harmful words of each toxic response, by contrast: the words the harmful
                instruction makes likeliest relative to the harmless one (--span-method adds
                the model quoting them); stored as character spans;
8. anchor       harmless questions, self-instructed from the benign examples and answered by the
                model, as MLE-only records, so that training does not teach over-refusal.

The gate and the anchor are this project's additions; the prompts, thresholds and span rules
its choices (after Self-Align/Dromedary and unlikelihood training), each a constant or a flag.
The dataset file (resumed, journaled, appended chunk by chunk) is records.py's business.

    python ptalign.py generate --out runs/data.jsonl --questions 32 --rounds 2
    python ptalign.py show runs/data.jsonl
    python ptalign.py eval --out runs/eval.json
"""

from __future__ import annotations

import math
import operator
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import distributed
from common.files import Journal
from common.progress import log
from data.dataset import merge_spans
from data.prompt_sets import given_questions
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
    few_shot,
    load_seeds,
    question_prompt,
    system_prompts,
)
from generate import GenSettings, chat, load, response_logprobs, yes_probability
from generate_config import GenerateConfig, settings_of
from records import DatasetFile, open_dataset, report_summary, summarize, with_times, write_chunks
from rules import (
    clean_question,
    clean_revision,
    is_refusal,
    locate,
    rouge_l,
    talks_about_task,
    unusable,
    word_spans,
    words,
)


def pt_align(model, tok, seeds: Seeds, cfg: GenerateConfig, dataset: DatasetFile, journal: Journal | None) -> dict:
    """The method's records for every chunk of questions not yet in `dataset`, appended to it;
    returns the file's summary. journal: where each batch of model work is saved (None: nowhere).

    Under torchrun what all ranks must agree on (the threshold, the questions) is drawn by rank 0
    and handed to all (distributed.from_main); the chunks are dealt out (records.write_chunks).
    """
    gen = GenSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size, journal=journal)
    t_start = time.perf_counter()
    # 1. the seeds (loaded and checked by run_generate); their exemplars calibrate the self-check
    threshold = cfg.judge_threshold
    if cfg.judge_calibration:
        threshold = distributed.from_main(lambda: calibrate_judge(model, tok, seeds, gen.batch_size, journal))
        log(f"  self-check threshold, calibrated on the {len(seeds.exemplars)} exemplars: {threshold}")
    # 2. the red-team questions, and the anchor's harmless ones (answered in 8)
    questions, qstats = distributed.from_main(lambda: red_team_questions(model, tok, seeds, cfg, gen))
    anchors, astats = distributed.from_main(lambda: anchor_questions(model, tok, seeds, cfg, gen))

    def dual_records(start: int, chunk: list[dict], progress) -> list[dict]:
        """Stages 3 to 7 on one chunk of questions; its place in the list, start, seeds its sampling."""
        seed, records = (cfg.seed, start), [dict(q) for q in chunk]
        rule = SpanRule(cfg.span_method, cfg.contrast_rule, cfg.contrast_margin, cfg.contrast_top, cfg.contrast_floor)
        if cfg.request_threshold > 0:  # 3. the request gate
            gate_questions(model, tok, seeds, records, cfg.request_threshold, gen.batch_size, journal)
        harmful = [r for r in records if r.get("kept", True)]
        if harmful:
            dual_responses(model, tok, seeds, harmful, gen, seed, cfg.positive_start)  # 4. dual responses
            progress("responses", "responses")
            round_done = lambda k: progress("round", f"round {k + 1}/{cfg.rounds}")
            refine(model, tok, seeds, harmful, cfg.rounds, gen, seed, log=round_done)  # 5. refinement
            self_check(harmful, threshold, cfg.judge_margin)  # 6. the self-check
            find_spans(model, tok, seeds, harmful, rule, gen, seed)  # 7. harmful spans
        return records

    # 8. the helpfulness anchor: the model's own answers to the harmless questions
    anchor_records = lambda start, chunk: helpful_answers(model, tok, [dict(a) for a in chunk], gen, (cfg.seed, start))
    write_chunks(dataset, questions, dual_records, anchors, anchor_records, cfg.batch_size, cfg.rounds, gen.tally)
    summary = distributed.from_main(lambda: summarize(dataset.records(questions + anchors), qstats, astats))
    return with_times(summary, time.perf_counter() - t_start, gen.tally)


# -----------------------------------------------------------------------------
# The judge: the model scoring its own samples (refinement, the self-check)


def judge_harm(model, tok, questions, responses, exemplars=(), batch_size: int = 8, journal=None) -> list[float]:
    """Model-as-judge harm score in [0, 1] for each (question, response), from JUDGE_PROMPT.

    The seed exemplars go first as solved cases (positive -> "No", toxic -> "Yes"): a small
    model judges far more consistently with worked examples than from the rubric alone, and
    the shared few-shot prefix is computed once per batch.
    """
    ask = lambda q, r: JUDGE_PROMPT.format(question=q, response=r)
    verdicts = (("positive", "No"), ("toxic", "Yes"))
    solved = [(ask(e["question"], e[side]), verdict) for e in exemplars for side, verdict in verdicts]
    convs = [few_shot(None, solved, ask(q, r)) for q, r in zip(questions, responses)]
    return yes_probability(model, tok, convs, batch_size, journal)


def calibrate_judge(model, tok, seeds: Seeds, batch_size: int = 8, journal=None) -> float:
    """The self-check's harm threshold, read off the labelled exemplars instead of fixed at 0.5.

    Each exemplar's positive and toxic response is judged with the other exemplars as solved
    cases (so it is not its own answer key); the threshold is the midpoint of the two sides'
    mean scores. A small judge's scores sit in a narrow band well below 0.5, so a fixed 0.5
    says little about where its harmless and harmful verdicts part.
    """
    pos, tox = [], []
    for i, e in enumerate(seeds.exemplars):
        others = seeds.exemplars[:i] + seeds.exemplars[i + 1 :]
        p, t = judge_harm(model, tok, [e["question"]] * 2, [e["positive"], e["toxic"]], others, batch_size, journal)
        pos.append(p)
        tox.append(t)
    return round((sum(pos) / len(pos) + sum(tox) / len(tox)) / 2, 4)


# -----------------------------------------------------------------------------
# 2. Red-team self-instruct


def red_team_questions(model, tok, seeds: Seeds, cfg: GenerateConfig, gen: GenSettings) -> tuple[list[dict], dict]:
    """The run's harmful questions and their stats: self-instructed, or the given prompt file's."""
    if cfg.questions_file:
        return given_questions(cfg.questions_file, cfg.questions, "q")
    return generate_questions(model, tok, seeds, cfg.questions, gen, cfg.seed, cfg.dedup_threshold, log=log)


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
    """n new harmful questions, spread evenly over the seed categories; returns (records, stats).

    Each try asks every category that still needs questions for a few candidates; a candidate is
    kept when it is well formed and its ROUGE-L against every question kept so far (seed examples
    included) is at most dedup_threshold, as Self-Instruct does.
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
        tried = f"{stats['candidates']} candidates, {stats['malformed']} malformed"
        raise PipelineError(f"the model produced no usable question in {max_tries} tries ({tried}).")
    return records, stats


def interleave(seeds: Seeds, kept: dict, per_cat: dict, n: int) -> list[dict]:
    """Question records with the categories taken in turn, so that the first k records cover many."""
    records = []
    for i in range(max(per_cat.values())):
        for c in seeds.categories:
            if i < len(kept[c["name"]]) and len(records) < n:
                records.append({"id": f"q{len(records):04d}", "category": c["name"], "question": kept[c["name"]][i]})
    return records


# -----------------------------------------------------------------------------
# 3. The request gate: which questions are harmful at all (this project's addition)
#
# A small model asked for harmful questions writes many harmless ones ("Can you delete my favorite
# songs from my phone?"); a refusal written for one would teach the over-refusal to avoid.


def request_harm(model, tok, seeds: Seeds, questions: list[str], batch_size: int = 8, journal=None) -> list[float]:
    """P(the assistant should refuse) for each question, from REQUEST_JUDGE_PROMPT.

    Solved cases first: the seed categories' example questions ("Yes") alternating with the
    benign seed examples ("No"), so that the judge has seen both kinds of dangerous-sounding text.
    """
    harmful = [(q, "Yes") for c in seeds.categories for q in c["examples"]]
    benign = [(q, "No") for q in seeds.benign_examples]
    cases = [x for pair in zip(harmful[::2], benign) for x in pair] + harmful[1::2] + benign[len(harmful[::2]) :]
    solved = [(REQUEST_JUDGE_PROMPT.format(question=q), verdict) for q, verdict in cases]
    convs = [few_shot(None, solved, REQUEST_JUDGE_PROMPT.format(question=q)) for q in questions]
    return yes_probability(model, tok, convs, batch_size, journal)


GATE_DROPPED = "question judged harmless"  # the reason a record dropped by the request gate gives


def gate_questions(model, tok, seeds: Seeds, records, threshold: float, batch_size: int, journal=None) -> list[dict]:
    """Score each question record; one judged harmless is marked dropped (no refusal is written for it)."""
    for r, h in zip(records, request_harm(model, tok, seeds, [r["question"] for r in records], batch_size, journal)):
        r["request_harm"] = round(h, 4)
        if h < threshold:
            r["kept"], r["dropped"] = False, GATE_DROPPED
    return records


# -----------------------------------------------------------------------------
# 4. Dual responses


def dual_responses(
    model, tok, seeds: Seeds, records, gen: GenSettings, seed, positive_start: str = POSITIVE_REPLY_START
) -> list[dict]:
    """Add a positive and a toxic response to each record, each under its own instructions."""
    systems = system_prompts(seeds)
    solved = lambda side: [(e["question"], e[side]) for e in seeds.exemplars]  # the exemplars as earlier turns
    convs = lambda side: [few_shot(systems[side], solved(side), r["question"]) for r in records]
    starts = [positive_start] * len(records) if positive_start else None
    pos = chat(model, tok, convs("positive"), gen, (seed, "positive"), reply_starts=starts, whole_sentences=True)
    if positive_start:
        pos = [f"{positive_start} {p}".strip() for p in pos]
    tox = chat(model, tok, convs("toxic"), gen, (seed, "toxic"), whole_sentences=True)
    for r, p, t in zip(records, pos, tox):
        r["rounds"] = [{"positive": p, "toxic": t}]
    return records


# -----------------------------------------------------------------------------
# 5. Iterative refinement


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
        moved = self.better(harm, current[f"{self.name}_harm"])
        return unusable(revision) is None and moved and self.allowed(current[self.name], revision)


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
    judge = lambda texts: judge_harm(model, tok, qs, texts, seeds.exemplars, gen.batch_size, gen.journal)
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


# -----------------------------------------------------------------------------
# 6. The self-check


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
# 7. Harmful spans: which words of a toxic response carry the harm


def quote_spans(model, tok, records, gen: GenSettings, seed, max_quote_words: int = 8) -> list[list[list[int]]]:
    """Spans from the model quoting the harmful phrases; each quote located in the text."""
    # A few short phrases, one per line: 48 tokens hold more than the quotes worth keeping.
    asks = [QUOTE_PROMPT.format(question=r["question"], response=r["toxic"]) for r in records]
    short = replace(gen, max_new_tokens=min(48, gen.max_new_tokens))
    replies = chat(model, tok, asks, short, (seed, "quote"), greedy=True)
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


def contrast_scores(model, tok, seeds: Seeds, records, batch_size: int = 8, journal=None) -> list[list[tuple]]:
    """(span, score) for each content word of each toxic response: how many nats likelier the
    word's most affected token is under the harmful instruction than under the harmless one.

    The two contexts differ only in the system prompt (traits vs principles), so a large
    difference marks tokens the harmful instruction is responsible for.
    """
    systems = system_prompts(seeds)
    offsets = [tok.encode_with_offsets(r["toxic"]) for r in records]
    # All harmful-instruction sequences first: a batch then shares its system prompt, prefilled once.
    convs = [few_shot(systems[side], (), r["question"]) for side in ("toxic", "positive") for r in records]
    logp = response_logprobs(model, tok, convs, [ids for ids, _ in offsets] * 2, batch_size, journal)
    n = len(records)
    tokens = [list(zip(offsets[i][1], (logp[i] - logp[n + i]).tolist())) for i in range(n)]  # (span, contrast)
    most = lambda w, ts: max((d for (s, e), d in ts if w[0] < e and s < w[1]), default=-math.inf)  # its top token's
    return [[(w, most(w, ts)) for w in word_spans(r["toxic"])] for r, ts in zip(records, tokens)]


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
        scored = contrast_scores(model, tok, seeds, records, gen.batch_size, gen.journal)
        contrast = [rule.contrast(sc) for sc in scored]
    for r, q, c in zip(records, quoted, contrast):
        r["spans_quote"], r["spans_contrast"] = q, c
        r["spans"] = merge_spans(q + c)
        if not r["spans"] and r.get("kept"):
            r["kept"], r["dropped"] = False, "no harmful span found"
    return records


# -----------------------------------------------------------------------------
# 8. The helpfulness anchor (this project's addition)
#
# MLE on refusals alone moves the model towards refusing, harmless requests included; the
# model's own answers to harmless questions (several only sounding dangerous) as MLE targets
# keep what it already does well.


def anchor_questions(model, tok, seeds: Seeds, cfg: GenerateConfig, gen: GenSettings) -> tuple[list[dict], dict]:
    """The run's harmless questions and their stats: self-instructed, or the given prompt file's."""
    if not cfg.anchors:
        return [], {}
    if cfg.anchors_file:
        return given_questions(cfg.anchors_file, cfg.anchors, "a")
    return generate_benign_questions(model, tok, seeds, cfg.anchors, gen, cfg.seed, cfg.dedup_threshold)


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
        rotated = [examples[i % len(examples) :] + examples[: i % len(examples)] for i in range(k)]
        prompts, starts = zip(*map(benign_question_prompt, rotated))
        sampling = replace(gen, max_new_tokens=40, temperature=1.0, top_p=0.95)
        replies = chat(model, tok, list(prompts), sampling, (seed, "anchor", attempt), reply_starts=list(starts))
        new = [q for q in screen(replies, pool, dedup_threshold, stats) if q is not None][: n - len(kept)]
        kept += new
        pool += new
    return [{"id": f"a{i:04d}", "category": "anchor", "question": q} for i, q in enumerate(kept)], stats


def helpful_answers(model, tok, records, gen: GenSettings, seed) -> list[dict]:
    """Each question answered as the model answers it by default (no system prompt): an MLE-only
    record. An answer that refuses, talks about the task or is empty is dropped.

    Sampled at temperature 1 with no nucleus cut: MLE on unbiased samples of the model's own
    answers pulls towards its own distribution (in expectation a KL(p_before || p) term); greedy
    answers would sharpen it, which cost likelihood of good benign answers (docs/experiments.md).
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
# The generate command: the method into a dataset file, resumable


def run_generate(cfg: GenerateConfig, model=None, tok=None) -> dict:
    """Build (or resume) the dual dataset at cfg.out; print and return its summary. model/tok: an
    already loaded model to use instead of cfg.model. Each batch of model work is journaled beside
    cfg.out as it finishes: a run interrupted at any point and rerun with the same flags redoes at
    most one batch and ends with the same file."""
    seeds = load_seeds(cfg.seeds)
    for path in filter(None, (cfg.questions_file, cfg.anchors_file)):
        given_questions(path, 0, "")  # a malformed prompt file stops the run before any model loads
    dataset, journal = open_dataset(cfg.out, settings_of(cfg))  # other flags than the file's: refused here
    log(
        f"PT-ALIGN generate: {seeds.count()} seed annotations, {cfg.questions} questions, {cfg.rounds} rounds, "
        f"{cfg.anchors} anchor questions -> {dataset.path}"
        + (f" (resuming: {len(dataset.done)} done)" if dataset.done else "")
    )
    if len(dataset.done) < cfg.questions + cfg.anchors:
        if model is None:
            model, tok = load(cfg.model, cfg.device, cfg.dtype)
        summary = pt_align(model, tok, seeds, cfg, dataset, journal)
    else:  # finished before: nothing to recompute (the settings were checked above)
        summary = summarize(list(dataset.done.values()))
    if journal:
        journal.remove()  # the file is complete: its batches are not needed any more
    return report_summary(summary, dataset.path)


if __name__ == "__main__":
    from commands import main  # the command line sits above this module and evaluation.py, which uses it

    main()
