"""ptalign.py, the data-building half of PT-ALIGN (issue 4): seeds, question dedup, span
location, spans -> token masks, every generate stage's output, resuming, show().

On this CPU a run of the default model costs minutes even for two records (every stage
prefills long few-shot prompts; 32 questions with 2 rounds take about 12 minutes), so the
whole `generate` pipeline runs here on a random one-layer LLaMA that uses the default
model's own tokenizer: the pipeline's bookkeeping (seeding, chunking, resuming, spans) does
not depend on how good the model is. The default model runs one stage only (red-team
questions), once.
"""

import contextlib
import json
import re
import shutil
from dataclasses import replace

import pytest
import torch

import commands
import generate
import ptalign
from common.files import Journal, sha256, stable_seed
from data import Tokenizer, prompts
from data.dataset import IGNORE, DatasetError, encode_example, load_records, merge_spans, spans_to_token_mask
from data.prompts import PipelineError
from generate_config import GenerateConfig, settings_of
from records import journal_path, show
from rules import FUNCTION_WORDS, WORD, locate, talks_about_task, word_spans


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread while this module runs models: on a shared two-core machine, OpenMP
    threads that spin waiting for each other make CPU generation several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -----------------------------------------------------------------------------
# 1. Seeds


def test_seed_annotations_are_fewer_than_50():
    """The method starts from fewer than 50 human annotations (the paper's claim)."""
    seeds = prompts.load_seeds()
    assert 0 < seeds.count() < 50


def test_seed_exemplar_phrases_are_in_their_toxic_text():
    """Each exemplar's harmful phrases are found in its toxic answer (the worked example of a span)."""
    for e in prompts.load_seeds().exemplars:
        assert e["harmful_phrases"] and all(locate(e["toxic"], p) for p in e["harmful_phrases"])


GOOD_SEEDS = {
    "categories": [{"name": "violence", "description": "d", "examples": ["How do I hurt someone?"]}],
    "principles": ["Be kind."],
    "toxic_traits": ["Mock the victim."],
    "exemplars": [{"question": "q", "positive": "p", "toxic": "t"}],
}


def _without(key):
    return {k: v for k, v in GOOD_SEEDS.items() if k != key}


BAD_SEEDS = {
    "missing file": (None, "does not exist"),
    "empty file": ("", "not valid JSON"),
    "malformed JSON": ('{"categories": [', "not valid JSON"),
    "not an object": ("[1, 2]", "expected a JSON object"),
    "missing key": (_without("principles"), "'principles' is missing or empty"),
    "empty list": ({**GOOD_SEEDS, "toxic_traits": []}, "'toxic_traits' is missing or empty"),
    "category without examples": ({**GOOD_SEEDS, "categories": [{"name": "x", "examples": []}]}, r"categories\[0\]"),
    "exemplar without toxic": (
        {**GOOD_SEEDS, "exemplars": [{"question": "q", "positive": "p"}]},
        r"exemplars\[0\] needs a non-empty 'toxic'",
    ),
    "50 annotations": ({**GOOD_SEEDS, "principles": [f"p{i}" for i in range(46)]}, "50 annotations"),
}


@pytest.mark.parametrize("case", BAD_SEEDS)
def test_bad_seed_file_is_a_clear_error(case, tmp_path):
    """A malformed, empty or oversized seed file is refused with a PipelineError naming the file."""
    content, message = BAD_SEEDS[case]
    path = tmp_path / "seeds.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(PipelineError, match=re.escape(str(path)) + ".*" + message):
        prompts.load_seeds(path)


def test_good_seed_file_loads(tmp_path):
    """The minimal valid seed file loads and counts each item once."""
    path = tmp_path / "seeds.json"
    path.write_text(json.dumps(GOOD_SEEDS))
    assert prompts.load_seeds(path).count() == 5


# -----------------------------------------------------------------------------
# 2. Red-team questions: cleaning and near-duplicate removal


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ("How do I hurt my neighbor?", "How do I hurt my neighbor?", 1.0),
        ("How do I HURT my neighbor?", "how do i hurt my neighbor", 1.0),  # case and punctuation ignored
        ("the cat sat on the mat", "the cat on the mat", 10 / 11),  # LCS 5: P = 1, R = 5/6
        ("the cat on the mat", "the cat sat on the mat", 10 / 11),  # symmetric
        ("How do I hurt my neighbor?", "Which paint dries fastest outdoors", 0.0),
        ("", "anything at all", 0.0),
        ("?!", "...", 0.0),
    ],
)
def test_rouge_l(a, b, expected):
    """ROUGE-L F1 over lowercased words, exactly."""
    assert ptalign.rouge_l(a, b) == pytest.approx(expected)


@pytest.mark.parametrize(
    "paraphrase, distinct",
    [
        ("How could I hurt my neighbor without anybody finding out?", "Which poison is hardest to detect in coffee?"),
        ("What is the best way to beat up a guy who humiliated me?", "How do I scare my roommate into moving out?"),
    ],
)
def test_rouge_l_separates_paraphrases_from_new_questions(paraphrase, distinct):
    """At the default threshold (0.7) a paraphrase of a seed question is a duplicate and a new question is not."""
    pool = [q for c in prompts.load_seeds().categories for q in c["examples"]]
    assert max(ptalign.rouge_l(paraphrase, p) for p in pool) > 0.7
    assert max(ptalign.rouge_l(distinct, p) for p in pool) <= 0.7


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("How do I pick the lock on my neighbor's door?", "How do I pick the lock on my neighbor's door?"),
        ("3. How do I pick a lock without a key?\n4. Another one?", "How do I pick a lock without a key?"),
        ("Question: How do I pick a lock without a key?", "How do I pick a lock without a key?"),
        ('"How do I pick a lock without a key?"', "How do I pick a lock without a key?"),
        ("\n\n- How do I pick a lock without a key?\n", "How do I pick a lock without a key?"),
        ("Tell me how to pick a lock.", "Tell me how to pick a lock."),
        ("Sure, here is a question: how do I pick a lock?", None),
        ("Here is one: how do I pick a lock?", None),
        ("I think you should ask something else.", None),
        ("Pick a lock?", None),  # fewer than 4 words
        ("How do I pick a lock without a key", None),  # not a sentence
        (" ".join(["word"] * 41) + "?", None),  # more than 40 words
        ("", None),
        (" \n\t ", None),
    ],
)
def test_clean_question(reply, expected):
    """The question in a generated reply, with list markers and quotes removed; junk is None."""
    assert ptalign.clean_question(reply) == expected


def _seeds_two_categories():
    return prompts.Seeds(
        categories=[
            {"name": "arson", "description": "fires", "examples": ["How do I set fire to my neighbor's shed?"]},
            {"name": "theft", "description": "theft", "examples": ["How can I shoplift without being seen?"]},
        ],
        principles=["Be kind."],
        toxic_traits=["Mock the victim."],
        exemplars=[{"question": "How do I poison a dog?", "positive": "p", "toxic": "t"}],
    )


def scripted_chat(replies_by_category, fallback="Sure thing."):
    """A stand-in for ptalign.chat that answers each question prompt from its category's queue."""

    def chat(model, tok, convs, gen, seed, greedy=False, reply_starts=None):
        out = []
        for conv in convs:
            name = next(n for n in replies_by_category if n in str(conv))
            queue = replies_by_category[name]
            out.append(queue.pop(0) if queue else fallback)
        return out

    return chat


def test_generate_questions_pool_logic(monkeypatch):
    """Candidates are cleaned, deduplicated against the seeds and every question kept so far,
    capped per category, and interleaved over categories; the counts add up."""
    arson_1 = "Which accelerant makes a warehouse fire spread fastest?"
    arson_2 = "Can you explain how to make a house fire look like an accident?"
    theft_1 = "What tools open a parked car without leaving marks?"
    monkeypatch.setattr(
        ptalign,
        "chat",
        scripted_chat(
            {
                "arson": [
                    "How could I set fire to my neighbor's shed?",  # paraphrase of a seed: duplicate
                    "Sure, here you go.",  # malformed
                    f"1. {arson_1}",  # kept, list marker removed
                    "Which accelerant makes a warehouse fire spread the fastest?",  # paraphrase of a kept one
                    arson_2,
                ],  # kept
                "theft": [theft_1],
            }
        ),
    )
    records, stats = ptalign.generate_questions(
        None, None, _seeds_two_categories(), 3, ptalign.GenSettings(16, 0.7, 0.9, 16), seed=0, log=lambda s: None
    )
    assert records == [
        {"id": "q0000", "category": "arson", "question": arson_1},
        {"id": "q0001", "category": "theft", "question": theft_1},
        {"id": "q0002", "category": "arson", "question": arson_2},
    ]
    assert stats["duplicate"] == 2 and stats["malformed"] >= 1
    assert stats["candidates"] >= stats["duplicate"] + stats["malformed"] + len(records)


def test_generate_questions_with_nothing_usable(monkeypatch):
    """A model that never writes a usable question ends the stage with a clear error, not an empty dataset."""
    monkeypatch.setattr(ptalign, "chat", scripted_chat({"arson": [], "theft": []}))
    with pytest.raises(PipelineError, match="no usable question in 2 tries"):
        ptalign.generate_questions(
            None, None, _seeds_two_categories(), 2, ptalign.GenSettings(), seed=0, max_tries=2, log=lambda s: None
        )


def test_generate_questions_on_the_default_model(default_model, default_tok):
    """The real model's red-team questions: well formed, one per category in seed order,
    no near-duplicate of each other or of a seed."""
    seeds = prompts.load_seeds()
    records, stats = ptalign.generate_questions(
        default_model, default_tok, seeds, 2, ptalign.GenSettings(16, 0.7, 0.9, 16), seed=0, log=lambda s: None
    )
    assert [r["id"] for r in records] == ["q0000", "q0001"]
    assert [r["category"] for r in records] == [c["name"] for c in seeds.categories[:2]]
    pool = [q for c in seeds.categories for q in c["examples"]] + [e["question"] for e in seeds.exemplars]
    for i, r in enumerate(records):
        assert ptalign.clean_question(r["question"]) == r["question"]
        assert all(ptalign.rouge_l(r["question"], p) <= 0.7 for p in pool + [s["question"] for s in records[:i]])
    assert stats["candidates"] >= stats["malformed"] + stats["duplicate"] + len(records)


# -----------------------------------------------------------------------------
# Running the model on many prompts: trimming cut-off replies, counting tokens, shared prefixes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("I won't help with that. Hurting people is wrong and", "I won't help with that."),
        ('He said "stop!" and then we', 'He said "stop!"'),
        ("Is it wrong? Yes. Version 2.5 of the", "Is it wrong? Yes."),
        ("no sentence end at all", "no sentence end at all"),
        ("Complete sentence.", "Complete sentence."),
    ],
)
def test_trim_to_sentence(text, expected):
    assert generate.trim_to_sentence(text) == expected


def test_chat_trims_only_cut_off_replies_and_counts_tokens(monkeypatch, default_model, default_tok):
    """A reply stopped by max_new_tokens loses its unfinished sentence; one that ended on a
    stop token is kept whole; the tally counts every generated token, across settings copies."""
    cut = default_tok.encode("Stay away from that. You would regret it and")
    ended = default_tok.encode("No. I will not and")

    def generate_batched(model, ids, stop_ids, pad_id, *, batch_size, **kwargs):
        return [[cut, ended][i % batch_size] for i in range(len(ids))]  # each batch: cut, then ended

    monkeypatch.setattr(generate, "generate_batched", generate_batched)
    gen = ptalign.GenSettings(max_new_tokens=len(cut), batch_size=2)
    convs = ["question one", "question two"]
    assert ptalign.chat(default_model, default_tok, convs, gen, 0, whole_sentences=True) == [
        "Stay away from that.",
        "No. I will not and",
    ]
    assert ptalign.chat(default_model, default_tok, convs, gen, 0) == [
        "Stay away from that. You would regret it and",
        "No. I will not and",
    ]
    ptalign.chat(
        default_model, default_tok, convs, replace(gen, batch_size=1), 0
    )  # batches of 1: `cut` twice; same tally
    assert gen.tally.tokens == 4 * len(cut) + 2 * len(ended) and gen.tally.seconds > 0


def test_refinement_prompts_share_their_instructions_as_a_prefix(default_tok):
    """The critique, revision and quote prompts of different samples start with the same
    tokens up to the sample itself, so a batch prefills its instructions once."""
    from generate import shared_prefix_len

    seeds = prompts.load_seeds()
    fill = dict(
        principles=prompts.bullets(seeds.principles), traits=prompts.bullets(seeds.toxic_traits), critique="Be kinder."
    )
    samples = [
        dict(question="Why is the sky blue?", response="It scatters light."),
        dict(question="Where do eels go?", response="To the sea."),
    ]
    for template in (prompts.CRITIQUE_POSITIVE, prompts.CRITIQUE_TOXIC, prompts.REVISE_PROMPT, prompts.QUOTE_PROMPT):
        instructions = template[: template.index("{question}")].format(**fill)
        ids = [
            default_tok.apply_chat_template(
                [{"role": "user", "content": template.format(**fill, **x)}], add_generation_prompt=True
            )
            for x in samples
        ]
        assert shared_prefix_len(ids) >= len(default_tok.encode(instructions)) - 1


# -----------------------------------------------------------------------------
# Refinement and the self-check: which revisions are taken, which records are kept


@pytest.mark.parametrize(
    "text, meta",
    [
        ("To make the response more direct, I will use a harsher tone.", True),
        ("The critique aimed to address the flaw.", True),
        ("I rephrased it to sound colder.", True),
        ("Nobody will miss them, and you know it.", False),
        ("I can't help with that, because it would hurt people.", False),
    ],
)
def test_talks_about_task(text, meta):
    assert talks_about_task(text) is meta


def test_refine_takes_a_revision_only_when_it_improves_and_answers(monkeypatch):
    """Positive revisions are taken when the judge finds them less harmful and they keep a
    refusal a refusal, toxic ones when more harmful and not a refusal; a revision that talks
    about the task never is."""
    harm = {
        "pos": 0.4,
        "tox": 0.6,
        "I can't help with that, it is cruel.": 0.3,
        "I can't help with it, but here is a kinder idea.": 0.2,  # record 3: taken
        "What a lovely day it is.": 0.1,  # record 4: drops the refusal
        "a kinder refusal": 0.1,
        "a crueler taunt": 0.9,  # record 0: both taken
        "the response should be kinder": 0.0,
        "a harsher response": 1.0,  # record 1: meta, never taken
        "a worse positive": 0.7,
        "I can't help with that": 0.95,
    }  # record 2: worse / refusal
    revisions = {
        "revise+": [
            "a kinder refusal",
            "the response should be kinder",
            "a worse positive",
            "I can't help with it, but here is a kinder idea.",
            "What a lovely day it is.",
        ],
        "revise-": ["a crueler taunt", "a harsher response", "I can't help with that", "tox", "tox"],
    }

    def chat(model, tok, convs, gen, seed, greedy=False, reply_starts=None, whole_sentences=False):
        return revisions.get(seed[1], ["a critique."] * len(convs))

    monkeypatch.setattr(ptalign, "chat", chat)
    monkeypatch.setattr(ptalign, "judge_harm", lambda model, tok, qs, texts, *a: [harm[t] for t in texts])
    refusal = "I can't help with that, it is cruel."
    records = [
        {"id": str(i), "question": "q?", "rounds": [{"positive": p, "toxic": "tox"}]}
        for i, p in enumerate(["pos", "pos", "pos", refusal, refusal])
    ]
    out = ptalign.refine(None, None, prompts.load_seeds(), records, 1, ptalign.GenSettings(), seed=0)
    final = [(r["rounds"][-1]["positive"], r["rounds"][-1]["toxic"]) for r in out]
    assert final == [
        ("a kinder refusal", "a crueler taunt"),
        ("pos", "tox"),
        ("pos", "tox"),
        ("I can't help with it, but here is a kinder idea.", "tox"),
        (refusal, "tox"),
    ]
    assert [r["rounds"][-1]["toxic_harm"] for r in out] == [0.9, 0.6, 0.6, 0.6, 0.6]
    assert out[1]["rounds"][-1]["revision_toxic"] == "a harsher response"  # kept for the record, not used


@pytest.mark.parametrize(
    "positive, toxic, p_harm, t_harm, reason",
    [
        ("I can't help with that, it hurts people.", "Go ahead, they deserve it.", 0.2, 0.8, None),
        ("I can't help with that, it hurts people.", "ok", 0.2, 0.8, "empty response"),
        (
            "I can't help with that, it hurts people.",
            "Make the response harsher.",
            0.2,
            0.8,
            "talks about the task instead of answering",
        ),
        ("Sure, here is how.", "Go ahead, they deserve it.", 0.6, 0.8, "positive judged harmful"),
        ("I can't help with that, it hurts people.", "I'm sorry, I can't do that.", 0.2, 0.8, "toxic response refuses"),
        (
            "I can't help with that, it hurts people.",
            "Go ahead, they deserve it.",
            0.2,
            0.25,
            "toxic not judged more harmful than positive",
        ),
    ],
)
def test_self_check_reasons(positive, toxic, p_harm, t_harm, reason):
    r = {"rounds": [{"positive": positive, "toxic": toxic, "positive_harm": p_harm, "toxic_harm": t_harm}]}
    [r] = ptalign.self_check([r], threshold=0.5, margin=0.1)
    assert r["kept"] is (reason is None) and r.get("dropped") == reason
    assert (r["positive"], r["toxic"]) == (positive, toxic)


# -----------------------------------------------------------------------------
# 5. Character spans


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Go ahead, make them pay — nobody will know.", ["Go", "ahead", "make", "pay", "nobody", "know"]),
        ("  the and of  ", []),
        ("Idiots like you deserve it!!!", ["Idiots", "like", "deserve"]),
        ("", []),
    ],
)
def test_word_spans_are_content_words(text, expected):
    """Content words only: function words, spaces and punctuation are never part of a span."""
    spans = word_spans(text)
    assert [text[s:e] for s, e in spans] == expected


def test_word_spans_window():
    """A window keeps the words inside it, at their positions in the whole text."""
    text = "Go ahead, make them pay now."
    s = text.index("make")
    assert word_spans(text, s, text.index("now")) == [[s, s + 4], [text.index("pay"), text.index("pay") + 3]]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("You're pathetic.", ["pathetic"]),
        ("They'll never know.", ["never", "know"]),
        ("Don't hold back.", ["hold", "back"]),
        ("It’s deserved.", ["deserved"]),
    ],
)
def test_word_spans_skip_contracted_function_words(text, expected):
    """A contracted pronoun or auxiliary (you're, they'll, don't, it's) is a function word too."""
    assert [text[s:e] for s, e in word_spans(text)] == expected


TEXT = "Go ahead and make them PAY, they deserve it."


@pytest.mark.parametrize(
    "phrase, expected",
    [
        ("make them", "make them"),  # exact
        ('"make them PAY"', "make them PAY"),  # quotes stripped
        ("  they deserve it  ", "they deserve it"),  # outer whitespace stripped
        ("Make Them pay", "make them PAY"),  # case ignored
        ("make\n them   PAY", "make them PAY"),  # runs of whitespace ignored
        ("PAY, they", "PAY, they"),  # punctuation inside matched literally
        ("make (them)", None),  # regex characters are literal
        ("burn it", None),
        ("", None),
        ('""', None),
    ],
)
def test_locate(phrase, expected):
    """Where a quoted phrase is in the text: exactly, else ignoring case and whitespace runs."""
    hit = locate(TEXT, phrase)
    assert (None if hit is None else TEXT[hit[0] : hit[1]]) == expected


def test_locate_prefers_whole_words():
    """A quoted word is located as a word, not inside a longer one that happens to come first."""
    text = "Use your skill, then kill them."
    assert locate(text, "kill") == (text.index(" kill") + 1, text.index(" kill") + 5)


@pytest.mark.parametrize(
    "spans, expected",
    [
        ([], []),
        ([[5, 9]], [[5, 9]]),
        ([[10, 12], [0, 3]], [[0, 3], [10, 12]]),  # sorted
        ([[0, 5], [3, 8]], [[0, 8]]),  # overlapping joined
        ([[0, 3], [3, 5]], [[0, 5]]),  # touching joined
        ([[0, 10], [2, 4]], [[0, 10]]),  # nested
        ([(4, 6), [4, 6], [7, 9]], [[4, 6], [7, 9]]),  # duplicates, tuples
    ],
)
def test_merge_spans(spans, expected):
    """Sorted, non-overlapping spans; touching or overlapping ones joined."""
    assert merge_spans(spans) == expected


# -----------------------------------------------------------------------------
# 5. Spans -> token masks, on a byte-level BPE and a sentencepiece tokenizer


@pytest.mark.parametrize(
    "offsets, spans, expected",
    [
        ([(0, 4), (4, 8)], [[4, 8]], [False, True]),  # [start, end): a span ending at 4 does not touch (4, 8)
        ([(0, 4), (4, 8)], [[3, 5]], [True, True]),
        ([(0, 4), (4, 8)], [[8, 9]], [False, False]),
        ([(0, 0), (0, 4)], [[0, 4]], [False, True]),  # sentencepiece's zero-width first piece is never marked
        ([(0, 4)], [], [False]),
    ],
)
def test_spans_to_token_mask_boundaries(offsets, spans, expected):
    """A token is marked exactly when its character range overlaps a span (half-open ranges)."""
    assert spans_to_token_mask(offsets, spans) == expected


@pytest.fixture(params=["bpe", "sentencepiece"])
def tok(request, sp_dir):
    """Both tokenizer families: the default model's byte-level BPE and a sentencepiece model."""
    return request.getfixturevalue("default_tok") if request.param == "bpe" else Tokenizer.from_pretrained(sp_dir)


MASK_TEXT = "go ahead and make them pay, they deserve it"
# words marked -> the masked tokens' text (their offsets into MASK_TEXT), per tokenizer
MASK_CASES = {
    "make": (["make"], [" make"], [" make"]),
    "pay, not the comma": (["pay"], [" pay"], [" pay"]),
    "them": (["them"], [" them"], [" the", "m"]),
    "deserve": (["deserve"], [" deserve"], [" des", "erve"]),
    "first word": (["go"], ["go"], ["go"]),
    "two words": (["make", "pay"], [" make", " pay"], [" make", " pay"]),
    "a phrase": (["make them pay"], [" make", " them", " pay"], [" make", " the", "m", " pay"]),
}


def mask_spans(phrases, text=MASK_TEXT):
    return [[text.index(p), text.index(p) + len(p)] for p in phrases]


@pytest.mark.parametrize("case", MASK_CASES)
def test_spans_to_token_mask_exact(tok, case):
    """Hand-made spans become exactly the expected tokens, for both tokenizer families."""
    phrases, bpe, sp = MASK_CASES[case]
    ids, offsets = tok.encode_with_offsets(MASK_TEXT)
    mask = spans_to_token_mask(offsets, mask_spans(phrases))
    assert [MASK_TEXT[s:e] for (s, e), m in zip(offsets, mask) if m] == (bpe if tok.kind == "tokenizers" else sp)


def _prompt_len(tok, question):
    return len(tok.apply_chat_template([{"role": "user", "content": question}]))


@pytest.mark.parametrize("case", MASK_CASES)
def test_encode_example_unlikelihood_targets_exact(tok, case):
    """The toxic example: the UT targets are exactly the tokens under the spans, each the next
    token of its position, and nothing else is a target."""
    phrases, bpe, sp = MASK_CASES[case]
    ex = encode_example(tok, "Why?", MASK_TEXT, mask_spans(phrases))
    assert ex.ids[: _prompt_len(tok, "Why?")] == tok.apply_chat_template([{"role": "user", "content": "Why?"}])
    targeted = [t for t, x in enumerate(ex.targets) if x != IGNORE]
    assert targeted == [t for t, u in enumerate(ex.ut) if u]
    assert all(ex.targets[t] == ex.ids[t + 1] for t in targeted)
    expected = bpe if tok.kind == "tokenizers" else sp
    assert [tok.decode([ex.targets[t]]).strip() for t in targeted] == [x.strip() for x in expected]


def test_encode_example_mle_targets(tok):
    """The positive example: every response token, then the end-of-turn token, is an MLE target; no UT."""
    ex = encode_example(tok, "Why?", MASK_TEXT, None)
    targets = [x for x in ex.targets if x != IGNORE]
    assert targets[-1] in tok.stop_ids
    assert not set(targets[:-1]) & set(tok.special_ids.values())
    assert tok.decode(targets[:-1]).strip() == MASK_TEXT
    assert not any(ex.ut)


WHITESPACEY = "Go  ahead,\n\nmake them PAY!  Nobody   will\tknow.\n"


@pytest.mark.parametrize("spans", [None, "words", "everything"])
def test_prompt_and_template_tokens_are_never_targets(tok, spans):
    """No prompt token is ever a target, and no special/template token is ever a UT target,
    even when a span covers the whole response."""
    spans = {None: None, "words": word_spans(WHITESPACEY), "everything": [[0, len(WHITESPACEY)]]}[spans]
    ex = encode_example(tok, "How do I get back at him?", WHITESPACEY, spans)
    n = _prompt_len(tok, "How do I get back at him?")
    assert all(x == IGNORE for x in ex.targets[: n - 1]) and not any(ex.ut[: n - 1])
    specials = set(tok.special_ids.values())
    assert not any(ex.targets[t] in specials for t, u in enumerate(ex.ut) if u)
    assert any(ex.ut) == (spans is not None)


def _ut_token_texts(tok, ex):
    return [tok.decode([ex.targets[t]], skip_special_tokens=False) for t, u in enumerate(ex.ut) if u]


def test_word_span_masks_never_cover_whitespace(tok):
    """With the pipeline's word spans, every UT token carries text: no whitespace-only token is pushed down."""
    ex = encode_example(tok, "How do I get back at him?", WHITESPACEY, word_spans(WHITESPACEY))
    texts = _ut_token_texts(tok, ex)
    assert texts and all(t.strip() for t in texts)


def test_phrase_span_masks_never_cover_whitespace(tok):
    """A span over a whole phrase still leaves its whitespace-only tokens alone (DESIGN: never masked)."""
    phrase = "make them PAY!  Nobody"
    ex = encode_example(tok, "How do I get back at him?", WHITESPACEY, mask_spans([phrase], WHITESPACEY))
    assert all(t.strip() for t in _ut_token_texts(tok, ex))


# -----------------------------------------------------------------------------
# The generate stage end to end, on a random one-layer model with the default tokenizer (tiny_dir: conftest.py)


def question_from_reply(reply: str) -> str:
    """A well-formed question that depends on every character of a (random model's) reply."""
    h = stable_seed(reply)
    return "Why would " + " ".join(f"w{(h >> (6 * i)) % 4099}" for i in range(5)) + "?"


def generate_argv(model_dir, out, batch_size, rounds=1, extra=()) -> list[str]:
    """`ptalign.py generate` on a random model: 2 questions, short replies, every toxic word marked."""
    return [
        "generate",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--questions",
        "2",
        "--rounds",
        str(rounds),
        "--max-new-tokens",
        "16",
        "--batch-size",
        str(batch_size),
        "--contrast-rule",
        "margin",
        "--contrast-margin=-1e9",
        "--span-method",
        "both",
        *(extra or ("--request-threshold", "0", "--anchors", "0")),
    ]


def generate_cli(model_dir, out, batch_size, rounds=1, extra=(), **patches) -> str | None:
    """`python ptalign.py generate ...` through main(); returns the error it exits with, or None.

    A random model never writes a usable question, so clean_question is replaced by one that
    turns any reply into a question (the sampled text still decides which one). Its samples
    are all dropped by the self-check, so a run may end with "no usable record" after writing
    every record; that is the only error it may end with. patches: more ptalign attributes to replace.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ptalign, "clean_question", question_from_reply)
        for name, value in patches.items():
            mp.setattr(ptalign, name, value)
        try:
            commands.main(generate_argv(model_dir, out, batch_size, rounds, extra))
        except SystemExit as e:
            return str(e.code).replace(str(out), "OUT")
    return None


@contextlib.contextmanager
def computed_batches():
    """A list that counts every batch of model work computed (and saved to the journal) inside the block."""
    saved, put = [], Journal.put
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Journal, "put", lambda self, key, value: (saved.append(key), put(self, key, value)))
        yield saved


@pytest.fixture(scope="module", params=[1, 2], ids=["batch1", "batch2"])
def run_a(request, tiny_dir, tmp_path_factory):
    """One uninterrupted run (A): 2 questions, 1 round, batches of 1 (a chunk per record) or 2 (one chunk).
    Also: how many batches of model work it computed."""
    out = tmp_path_factory.mktemp("run") / "a.jsonl"
    with computed_batches() as batches:
        err = generate_cli(tiny_dir, out, request.param)
    assert err is None or "no usable record" in err, err
    assert not journal_path(out).exists()  # removed once the file is complete
    return out, err, request.param, len(batches)


def test_generate_records_well_formed(run_a):
    """Every stage leaves its mark in a record of the right shape: question, dual responses,
    one entry per refinement round, the self-check's verdict, spans and provenance."""
    out, _, batch_size, _ = run_a
    records = [json.loads(line) for line in out.read_text().splitlines()]
    seeds = prompts.load_seeds()
    assert [r["id"] for r in records] == ["q0000", "q0001"]
    assert [r["category"] for r in records] == [c["name"] for c in seeds.categories[:2]]
    for r in records:
        assert re.fullmatch(r"Why would( w\d+){5}\?", r["question"])
        assert len(r["rounds"]) == 2 and all(isinstance(x[k], str) for x in r["rounds"] for k in ("positive", "toxic"))
        assert all(
            isinstance(r["rounds"][1][k], str) and r["rounds"][1][k] for k in ("critique_positive", "critique_toxic")
        )
        assert (r["positive"], r["toxic"]) == (r["rounds"][-1]["positive"], r["rounds"][-1]["toxic"])
        assert all(0.0 <= r["judge"][k] <= 1.0 for k in ("positive_harm", "toxic_harm"))
        assert isinstance(r["kept"], bool) and (r["kept"] == ("dropped" not in r))
        assert r["kept"] or (isinstance(r["dropped"], str) and r["dropped"])
        # contrast margin -1e9 marks every token, so every content word of the toxic response
        assert r["spans_contrast"] == word_spans(r["toxic"])
        assert r["spans"] == merge_spans(r["spans_quote"] + r["spans_contrast"])
        for s, e in r["spans"]:
            assert WORD.fullmatch(r["toxic"][s:e]) and r["toxic"][s:e].lower() not in FUNCTION_WORDS
        settings = r["provenance"]["settings"]
        assert (settings["questions"], settings["rounds"], settings["batch_size"]) == (2, 1, batch_size)


def test_resume_equals_uninterrupted_run(run_a, tiny_dir, tmp_path):
    """A run killed mid-write (its first record, then half a line) and resumed with the same
    flags ends byte for byte equal to the uninterrupted run: no duplicate, no lost record."""
    a, err_a, batch_size, _ = run_a
    first, second = a.read_text().splitlines(keepends=True)
    b = tmp_path / "b.jsonl"
    b.write_text(first + second[: len(second) // 2])
    assert generate_cli(tiny_dir, b, batch_size) == err_a
    assert b.read_text() == a.read_text()


def test_resume_of_a_finished_run_changes_nothing(run_a, tiny_dir, tmp_path):
    """Resuming a complete file computes no response again and leaves the file as it was."""

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished record was computed again")

    a, err_a, batch_size, _ = run_a
    b = tmp_path / "b.jsonl"
    shutil.copy(a, b)
    assert generate_cli(tiny_dir, b, batch_size, dual_responses=must_not_run) == err_a
    assert b.read_text() == a.read_text()


def test_interrupted_run_resumes_from_its_journal(run_a, tiny_dir, tmp_path, monkeypatch):
    """Ctrl-C after the 5th batch of model work (questions, judge, responses...): one sentence says
    what is saved and how to go on. A rerun with other flags is refused and changes nothing; the
    rerun with the same flags, even after a kill tore the journal's last line, computes only the
    batches not saved and ends with the uninterrupted run's file, byte for byte."""
    a, err_a, batch_size, n_batches = run_a
    b = tmp_path / "b.jsonl"
    monkeypatch.setenv("PTALIGN_FAIL_AT", "batch 5")
    saved = r"\d+ records in OUT and 5 finished batches in OUT.journal are saved; rerun the same command to continue"
    assert re.fullmatch(f"interrupted; {saved} from them.", generate_cli(tiny_dir, b, batch_size))
    monkeypatch.delenv("PTALIGN_FAIL_AT")
    with open(journal_path(b), "a") as f:
        f.write('{"key": "0123", "val')  # what a kill in the middle of an append leaves
    before = journal_path(b).read_bytes()
    other = generate_cli(tiny_dir, b, batch_size, rounds=2)
    assert re.fullmatch(r"error: OUT(.journal)?: written with other settings \(rounds: 1 here 2\); .*", other)
    assert journal_path(b).read_bytes() == before
    with computed_batches() as batches:
        assert generate_cli(tiny_dir, b, batch_size) == err_a
    assert len(batches) == n_batches - 5
    assert b.read_text() == a.read_text() and not journal_path(b).exists()


@pytest.mark.parametrize(
    "damage, rounds, message",
    [
        ("torn tail", 2, r"OUT: written with other settings \(rounds: 1 here 2\)"),
        ("bad first line", 1, r"OUT:1: not valid JSON"),
    ],
)
def test_resume_refuses_an_incompatible_file(run_a, tiny_dir, tmp_path, damage, rounds, message):
    """A file written with other flags, or with a broken line before its end, is refused with a
    clear message naming it, and is left exactly as it was."""
    a, _, batch_size, _ = run_a
    first, second = a.read_text().splitlines(keepends=True)
    b = tmp_path / "b.jsonl"
    b.write_text(first + second[:10] if damage == "torn tail" else "{not json\n" + first)
    before = b.read_bytes()
    assert re.search(message, generate_cli(tiny_dir, b, batch_size, rounds=rounds))
    assert b.read_bytes() == before


def test_generate_with_request_gate_and_anchor(tiny_dir, tmp_path):
    """With the gate and the anchor on, every question carries its gate score, gated ones are
    dropped before any response, and the anchor's records follow the questions: MLE-only, in order."""
    out = tmp_path / "g.jsonl"
    err = generate_cli(tiny_dir, out, 2, extra=("--request-threshold", "0.5", "--anchors", "2"))
    assert err is None or "no usable record" in err, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    questions, anchors = records[:2], records[2:]
    assert [r["id"] for r in questions] == ["q0000", "q0001"] and [r["id"] for r in anchors] == ["a0000", "a0001"]
    for r in questions:
        assert 0.0 <= r["request_harm"] <= 1.0
        assert ("rounds" in r) == (r["request_harm"] >= 0.5)
        assert r.get("dropped") == "question judged harmless" or r["request_harm"] >= 0.5
    for r in anchors:
        assert r["kind"] == "anchor" and r["spans"] == [] and r["toxic"] == "" and isinstance(r["positive"], str)


def test_generate_from_prompt_files(tiny_dir, tmp_path):
    """--questions-file and --anchors-file replace self-instruct: the first N prompts of each file,
    verbatim and in order, go through the same method (gate, dual responses, anchor answers), and
    the files' hashes are in the provenance, so an edited file is not resumed as the same dataset."""
    harmful, benign = tmp_path / "h.jsonl", tmp_path / "b.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": f"How do I hurt person {i}?"}) + "\n" for i in range(3)))
    benign.write_text(json.dumps({"prompt": "How do I kill a tmux session?", "category": "homonym"}) + "\n")
    out = tmp_path / "g.jsonl"
    extra = ("--questions-file", str(harmful), "--anchors-file", str(benign), "--anchors", "1")
    err = generate_cli(tiny_dir, out, 2, extra=extra)
    assert err is None or "no usable record" in err, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    questions = ["How do I hurt person 0?", "How do I hurt person 1?", "How do I kill a tmux session?"]
    assert [r["question"] for r in records] == questions
    assert [r["category"] for r in records] == ["given", "given", "homonym"]
    assert records[2]["kind"] == "anchor" and records[2]["spans"] == []
    assert all("request_harm" in r for r in records[:2])
    settings = settings_of(GenerateConfig(out=str(out), questions_file=str(harmful), anchors_file=str(benign)))
    assert settings["questions_file_sha256"] == sha256(harmful) and "questions_file" not in settings
    first = benign.read_text()
    benign.write_text(json.dumps({"prompt": "Why did the Titanic sink?"}) + "\n")
    assert "anchors_file_sha256" in (generate_cli(tiny_dir, out, 2, extra=extra) or "")  # an edited file
    benign.write_text(first)
    self_instructed = extra[2:]  # the same anchors, the questions written by the model: another dataset too
    assert "questions_file_sha256" in (generate_cli(tiny_dir, out, 2, extra=self_instructed) or "")


@pytest.mark.parametrize(
    "text, message",
    [("", "prompt file is empty"), ('{"question": "x"}\n', "h.jsonl:1: key 'prompt'"), ("{oops\n", "h.jsonl:1")],
)
def test_generate_refuses_a_bad_prompt_file_before_loading(text, message, tmp_path, monkeypatch):
    """A malformed --questions-file stops the run with the file and line named, before any model loads."""
    harmful = tmp_path / "h.jsonl"
    harmful.write_text(text)
    monkeypatch.setattr(ptalign, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        commands.main(["generate", "--out", str(tmp_path / "o.jsonl"), "--questions-file", str(harmful)])
    assert message in str(e.value.code)
    assert not (tmp_path / "o.jsonl").exists()


# -----------------------------------------------------------------------------
# show


SHOW_TOXIC = "Burn it all, they deserve pain"
SHOW_RECORDS = [
    {
        "id": "q0000",
        "category": "violence",
        "question": "How do I hurt him?",
        "positive": "Please don't.",
        "toxic": SHOW_TOXIC,
        "spans": mask_spans(["Burn", "deserve", "pain"], SHOW_TOXIC),
        "kept": True,
    },
    {
        "id": "q0001",
        "category": "fraud",
        "question": "How do I scam her?",
        "positive": "Don't.",
        "toxic": "I can't help with that.",
        "spans": [],
        "kept": False,
        "dropped": "toxic response refuses",
    },
]


@pytest.fixture
def shown_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SHOW_RECORDS))
    return path


@pytest.mark.parametrize("color, on, off", [(False, "[[", "]]"), (True, "\033[1;31m", "\033[0m")])
def test_show_highlights_spans(shown_file, color, on, off):
    """show() marks exactly the spans (at the start, in the middle, at the very end) and each record's status."""
    text = show(shown_file, color=color)
    assert f"- {on}Burn{off} it all, they {on}deserve{off} {on}pain{off}\n" in text
    assert "- I can't help with that.\n" in text
    assert "q0000 [violence] kept" in text and "q0001 [fraud] dropped (toxic response refuses)" in text


def test_show_cli_outside_a_terminal_uses_brackets(shown_file, capsys):
    """`ptalign.py show FILE --limit 1` on a pipe: [[...]] marks and the first record only."""
    commands.main(["show", str(shown_file), "--limit", "1"])
    out = capsys.readouterr().out
    assert "[[Burn]]" in out and "\033[" not in out and "q0001" not in out


BROKEN = {
    "kept, no toxic": ({k: v for k, v in SHOW_RECORDS[0].items() if k != "toxic"}, "key 'toxic' is missing"),
    "kept, no span": ({**SHOW_RECORDS[0], "spans": []}, "record has no harmful spans"),
    "kept anchor, no answer": ({"question": "Hi?", "kind": "anchor", "kept": True}, "key 'positive' is missing"),
    "no question": ({**SHOW_RECORDS[1], "question": ""}, "key 'question' is missing"),
    "response not text": ({**SHOW_RECORDS[1], "positive": 3}, "key 'positive' is not a string"),
    "span outside": ({**SHOW_RECORDS[1], "spans": [[0, 99]]}, r"span \[0, 99\] is not \[start, end\) inside"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_show_and_training_check_records_alike(tmp_path, case):
    """One validator of the dataset format: a record `ptalign.py show` refuses, train.py --data
    (load_records) refuses with the same sentence, naming the file and line."""
    record, message = BROKEN[case]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (SHOW_RECORDS[0], record)))
    for read in (show, load_records):
        with pytest.raises(DatasetError, match=f"^{re.escape(str(path))}:2: {message}"):
            read(path)


def test_show_and_training_accept_a_dropped_record_without_responses(shown_file):
    """A record the method dropped before writing any response (the request gate) is readable by both."""
    gated = {
        "id": "q0002",
        "question": "How do I kill a process?",
        "kept": False,
        "dropped": "question judged harmless",
    }
    with shown_file.open("a") as f:
        f.write(json.dumps(gated) + "\n")
    assert "q0002 [None] dropped (question judged harmless)" in show(shown_file)
    assert [r["id"] for r in load_records(shown_file)] == ["q0000"]


# -----------------------------------------------------------------------------
# Bad input on the command line: a clear one-line error naming the file


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["show", "{torn}"], id="show-torn"),
        pytest.param(["show", "{missing}"], id="show-missing"),
        pytest.param(["generate", "--out", "{out}", "--seeds", "{missing}"], id="generate-missing-seeds"),
        pytest.param(["eval", "--harmful", "{missing}"], id="eval-missing-prompts"),
        pytest.param(["eval", "--benign", "{torn}"], id="eval-torn-prompts"),
        pytest.param(["eval", "--dataset", "{missing}", "--limit", "1"], id="eval-missing-dataset"),
        pytest.param(["compare", "{missing}", "{missing}"], id="compare-missing"),
    ],
)
def test_cli_bad_input_names_the_file(argv, tmp_path):
    """Every subcommand answers a missing or broken input file with `error: FILE...`, before loading any model."""
    files = {"missing": tmp_path / "nope.jsonl", "torn": tmp_path / "torn.jsonl", "out": tmp_path / "out.jsonl"}
    files["torn"].write_text(json.dumps(SHOW_RECORDS[0]) + '\n{"id": \n' + json.dumps(SHOW_RECORDS[1]) + "\n")
    argv = [a.format(**files) for a in argv]
    bad = next(a for a in argv if "nope" in a or "torn" in a)
    with pytest.raises(SystemExit) as e:
        commands.main(argv)
    assert str(e.value.code).startswith(f"error: {bad}")


# -----------------------------------------------------------------------------
# Contrast scores -> spans: the rank rule and the absolute margin (issue 10)

# Four content words of a response, strongest contrast first; the last one has no token of its own.
SCORED = [([0, 4], 2.0), ([5, 9], 0.5), ([10, 14], 0.05), ([15, 19], float("-inf"))]


@pytest.mark.parametrize(
    "top, floor, expected",
    [
        (0.3, 0.1, [[0, 4]]),  # round(0.3 * 4) = 1 word
        (0.01, 0.1, [[0, 4]]),  # a fraction that rounds to no word still keeps the strongest one
        (0.5, 0.1, [[0, 4], [5, 9]]),
        (1.0, 0.1, [[0, 4], [5, 9]]),  # every word ranked, the floor drops the weak one and -inf
        (1.0, 0.0, [[0, 4], [5, 9], [10, 14]]),
        (1.0, 3.0, []),  # nothing above the floor: no word, even with the rank rule
    ],
)
def test_rank_spans(top, floor, expected):
    """The strongest `top` fraction of a response's words (at least one), each above `floor` nats."""
    assert ptalign.rank_spans(SCORED, top, floor) == expected


def test_rank_spans_ranks_within_the_response():
    """The order of the scored list does not matter, only the scores; weak responses still get their best word."""
    weak = [([0, 4], 0.15), ([5, 9], 0.3), ([10, 14], 0.12)]
    assert ptalign.rank_spans(weak, 0.3, 0.1) == [[5, 9]]
    assert ptalign.margin_spans(weak, 1.0) == []


@pytest.mark.parametrize(
    "margin, expected",
    [(1.0, [[0, 4]]), (0.5, [[0, 4]]), (0.25, [[0, 4], [5, 9]]), (-1.0, [[0, 4], [5, 9], [10, 14]])],
)
def test_margin_spans(margin, expected):
    """Every word strictly above the margin, however many or few."""
    assert ptalign.margin_spans(SCORED, margin) == expected


def test_span_rule_picks_the_contrast_rule():
    """SpanRule.contrast: rank by default, the absolute margin when asked."""
    assert ptalign.SpanRule().contrast(SCORED) == ptalign.rank_spans(SCORED, 0.5, 0.0)
    assert ptalign.SpanRule(contrast_rule="margin", margin=0.25).contrast(SCORED) == [[0, 4], [5, 9]]
