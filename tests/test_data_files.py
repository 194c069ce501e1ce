"""Checks on the hand-written data files: seed annotations and eval prompt sets.

Standard library only (json, re, pathlib); runs in milliseconds.
"""

import itertools
import json
import pathlib
import re

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"

MAX_SEED_ITEMS = 49  # "fewer than 50 human annotations"
MAX_PROMPT_CHARS = 200
NEAR_DUP_JACCARD = 0.7  # word-set Jaccard at or above this counts as a near-duplicate


def load_seeds():
    with open(DATA / "seeds.json", encoding="utf-8") as f:
        return json.load(f)


def load_jsonl(name):
    rows = []
    with open(DATA / name, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                assert isinstance(row, dict), f"{name}:{lineno} is not an object"
                rows.append(row)
    return rows


def count_seed_items(seeds):
    """Every category, example question, principle, toxic trait and exemplar is one item."""
    categories = seeds["categories"]
    return (
        len(categories)
        + sum(len(c["examples"]) for c in categories)
        + len(seeds["principles"])
        + len(seeds["toxic_traits"])
        + len(seeds["exemplars"])
        + len(seeds.get("benign_examples", []))
    )


def normalise(text):
    return " ".join(re.sub(r"[^\w\s]", "", text.lower()).split())


def words(text):
    return frozenset(normalise(text).split())


def jaccard(a, b):
    """Jaccard similarity of two word sets (from words())."""
    return len(a & b) / max(len(a | b), 1)


def seed_questions(seeds):
    qs = [q for c in seeds["categories"] for q in c["examples"]]
    return qs + [e["question"] for e in seeds["exemplars"]] + seeds.get("benign_examples", [])


def _nonempty_str(x):
    return isinstance(x, str) and x.strip() != ""


# ---------------------------------------------------------------- seeds


def test_seed_count_under_50():
    n = count_seed_items(load_seeds())
    assert n <= MAX_SEED_ITEMS, f"{n} seed items; must be fewer than 50"


def test_count_seed_items_counts_everything():
    toy = {
        "categories": [
            {"name": "a", "description": "", "examples": ["q1", "q2"]},
            {"name": "b", "description": "", "examples": ["q3"]},
        ],
        "principles": ["p"],
        "toxic_traits": ["t1", "t2"],
        "exemplars": [{"category": "a", "question": "q", "positive": "p", "toxic": "t", "harmful_phrases": ["t"]}],
    }
    assert count_seed_items(toy) == 2 + 3 + 1 + 2 + 1


def test_seed_schema():
    seeds = load_seeds()
    assert set(seeds) == {"categories", "principles", "toxic_traits", "exemplars", "benign_examples"}
    assert all(_nonempty_str(q) and len(q) <= MAX_PROMPT_CHARS for q in seeds["benign_examples"])
    names = [c["name"] for c in seeds["categories"]]
    assert len(names) == len(set(names)) and len(names) >= 5
    for c in seeds["categories"]:
        assert set(c) == {"name", "description", "examples"}
        assert re.fullmatch(r"[a-z_]+", c["name"]), c["name"]
        assert _nonempty_str(c["description"])
        assert isinstance(c["examples"], list) and 1 <= len(c["examples"]) <= 2
        assert all(_nonempty_str(q) and len(q) <= MAX_PROMPT_CHARS for q in c["examples"])
    for key in ("principles", "toxic_traits"):
        assert isinstance(seeds[key], list) and len(seeds[key]) >= 3
        assert all(_nonempty_str(x) for x in seeds[key])
        assert len(set(seeds[key])) == len(seeds[key])
    assert len(seeds["exemplars"]) >= 2
    for e in seeds["exemplars"]:
        assert set(e) == {"category", "question", "positive", "toxic", "harmful_phrases"}
        assert e["category"] in names
        for key in ("question", "positive", "toxic"):
            assert _nonempty_str(e[key])
        assert isinstance(e["harmful_phrases"], list) and e["harmful_phrases"]
    qs = [normalise(q) for q in seed_questions(seeds)]
    assert len(qs) == len(set(qs)), "duplicate seed questions"


def test_harmful_phrases_are_substrings_of_toxic():
    for e in load_seeds()["exemplars"]:
        for phrase in e["harmful_phrases"]:
            assert _nonempty_str(phrase)
            assert phrase in e["toxic"], f"{phrase!r} not in toxic text of {e['question']!r}"
            assert phrase not in e["positive"]


def test_toxic_exemplars_carry_no_operational_detail():
    # Crude guard: no numbers, no numbered or "step" lists. Toxic text is tone only.
    for e in load_seeds()["exemplars"]:
        assert not re.search(r"\d", e["toxic"]), e["toxic"]
        assert not re.search(r"\bsteps?\b|\bfirst,|\bthen\b", e["toxic"], re.I), e["toxic"]


# ---------------------------------------------------------------- eval sets


def _check_common(rows, prefix):
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicate ids"
    for r in rows:
        assert re.fullmatch(prefix + r"-\d{3}", r["id"]), r["id"]
        assert _nonempty_str(r["category"])
        assert _nonempty_str(r["prompt"]) and len(r["prompt"]) <= MAX_PROMPT_CHARS, r["id"]
    prompts = [normalise(r["prompt"]) for r in rows]
    assert len(prompts) == len(set(prompts)), "duplicate prompts"


def test_harmful_schema_and_count():
    rows = load_jsonl("eval_harmful.jsonl")
    assert len(rows) >= 100
    _check_common(rows, "harm")
    for r in rows:
        assert set(r) == {"id", "category", "prompt", "in_seed_category"}, r["id"]
        assert isinstance(r["in_seed_category"], bool)


def test_harmful_categories_cover_seed_and_beyond():
    seed_names = {c["name"] for c in load_seeds()["categories"]}
    rows = load_jsonl("eval_harmful.jsonl")
    for r in rows:
        assert r["in_seed_category"] == (r["category"] in seed_names), r["id"]
    cats = {r["category"] for r in rows}
    assert seed_names <= cats, f"seed categories missing: {seed_names - cats}"
    beyond = cats - seed_names
    assert len(beyond) >= 5, beyond
    assert sum(not r["in_seed_category"] for r in rows) >= 25


def test_benign_schema_and_counts():
    rows = load_jsonl("eval_benign.jsonl")
    assert len(rows) >= 100
    _check_common(rows, "benign")
    for r in rows:
        assert set(r) == {"id", "category", "prompt", "sounds_dangerous", "reference"}, r["id"]
        assert isinstance(r["sounds_dangerous"], bool)
        ref = r["reference"]
        assert ref is None or (_nonempty_str(ref) and len(ref) <= MAX_PROMPT_CHARS), r["id"]
    assert 3 * sum(r["sounds_dangerous"] for r in rows) >= len(rows)
    assert sum(r["reference"] is not None for r in rows) >= 50


def test_eval_prompts_disjoint_from_seeds_and_each_other():
    seeds = load_seeds()
    seed_qs = [(q, words(q)) for q in seed_questions(seeds)]
    harmful = [(r["prompt"], words(r["prompt"])) for r in load_jsonl("eval_harmful.jsonl")]
    benign = [(r["prompt"], words(r["prompt"])) for r in load_jsonl("eval_benign.jsonl")]
    seed_norm = {normalise(q) for q, _ in seed_qs}
    for p, wp in harmful + benign:
        assert normalise(p) not in seed_norm, p
        for q, wq in seed_qs:
            assert jaccard(wp, wq) < NEAR_DUP_JACCARD, (p, q)
    # no near-duplicates among the harmful prompts, nor between harmful and benign ones
    # (short templated benign facts, e.g. "What does X stand for?", are only checked for
    # exact duplicates, in _check_common)
    pairs = itertools.chain(itertools.combinations(harmful, 2), itertools.product(harmful, benign))
    for (a, wa), (b, wb) in pairs:
        assert jaccard(wa, wb) < NEAR_DUP_JACCARD, (a, b)


# ---------------------------------------------------------------- dev split and span set


def test_dev_split_schema():
    for name, prefix, keys in (
        ("dev_harmful.jsonl", "dev-harm", {"id", "category", "prompt", "in_seed_category"}),
        ("dev_benign.jsonl", "dev-benign", {"id", "category", "prompt", "sounds_dangerous", "reference"}),
    ):
        rows = load_jsonl(name)
        assert len(rows) >= 40, name
        _check_common(rows, prefix)
        assert all(set(r) == keys for r in rows), name
    benign = load_jsonl("dev_benign.jsonl")
    assert 3 * sum(r["sounds_dangerous"] for r in benign) >= len(benign)


def test_dev_and_eval_share_no_prompt():
    """The dev split tunes, the eval sets report: not one prompt (or near-paraphrase) in common."""
    dev = [r["prompt"] for name in ("dev_harmful.jsonl", "dev_benign.jsonl") for r in load_jsonl(name)]
    evals = [r["prompt"] for name in ("eval_harmful.jsonl", "eval_benign.jsonl") for r in load_jsonl(name)]
    assert not {normalise(p) for p in dev} & {normalise(p) for p in evals}
    eval_words = [words(p) for p in evals]
    for p in dev:
        wp = words(p)
        assert all(jaccard(wp, we) < NEAR_DUP_JACCARD for we in eval_words), p


def test_benign_eval_covers_the_over_refusal_kinds():
    kinds = ("homonym", "figurative", "safe_target", "safe_context", "definition", "historical_event", "public_figure")
    rows = load_jsonl("eval_benign.jsonl")
    assert len(rows) >= 150
    counts = {k: sum(r["category"] == k for r in rows) for k in kinds}
    assert all(n >= 5 for n in counts.values()), counts
    assert all(r["sounds_dangerous"] for r in rows if r["category"] in kinds)


def test_span_gold_set():
    """Hand-marked harmful phrases of toxic responses: an evaluation set for the span methods."""
    rows = load_jsonl("span_gold.jsonl")
    assert len(rows) >= 20
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == {"id", "category", "question", "toxic", "harmful"}, r["id"]
        assert r["harmful"] and all(_nonempty_str(p) and p in r["toxic"] for p in r["harmful"]), r["id"]
        assert not re.search(r"\d", r["toxic"]), r["id"]
        assert not re.search(r"\bsteps?\b|\bfirst,|\bthen\b", r["toxic"], re.I), r["id"]


def _count(name, keep=lambda r: True):
    return sum(1 for r in load_jsonl(name) if keep(r))


def _late(r):
    return int(r["id"].rsplit("-", 1)[1]) > 117  # benign-118... : the dangerous-sounding kinds added last


def test_readme_states_the_files_counts():
    """Every count data/README.md states is read from the files: the page cannot go stale."""
    text = " ".join((DATA / "README.md").read_text(encoding="utf-8").split())
    seeds = load_seeds()
    sounds = lambda r: r["sounds_dangerous"]
    has_reference = lambda r: r["reference"] is not None
    stated = [
        f"the seed annotations ({count_seed_items(seeds)} items, fewer than 50)",
        f"| **total** | **{count_seed_items(seeds)}** |",
        f"| `exemplars` | {len(seeds['exemplars'])} (",
        f"| `categories` | {len(seeds['categories'])} |",
        f"| example questions (2 per category) | {sum(len(c['examples']) for c in seeds['categories'])} |",
        f"| `principles` | {len(seeds['principles'])} |",
        f"| `toxic_traits` | {len(seeds['toxic_traits'])} |",
        f"| `benign_examples` | {len(seeds['benign_examples'])} |",
        f"held-out harmful requests ({_count('eval_harmful.jsonl')})",
        f"In the seed categories: {_count('eval_harmful.jsonl', lambda r: r['in_seed_category'])} prompts",
        f"Beyond them: {_count('eval_harmful.jsonl', lambda r: not r['in_seed_category'])} prompts",
        f"benign requests ({_count('eval_benign.jsonl')})",
        f"`sounds_dangerous: true` on {_count('eval_benign.jsonl', sounds)} records**, "
        f"{_count('eval_benign.jsonl', lambda r: sounds(r) and not _late(r))} of the first "
        f"{_count('eval_benign.jsonl', lambda r: not _late(r))} and all of the last "
        f"{_count('eval_benign.jsonl', _late)}",
        f"The other {_count('eval_benign.jsonl', lambda r: not sounds(r))} are ordinary",
        f"`reference` is set on {_count('eval_benign.jsonl', has_reference)} records** "
        f"({_count('eval_benign.jsonl', lambda r: has_reference(r) and not _late(r))} of the first",
        f"`dev_harmful.jsonl` ({_count('dev_harmful.jsonl')}), `dev_benign.jsonl` ({_count('dev_benign.jsonl')})",
        f"{_count('dev_harmful.jsonl', lambda r: r['in_seed_category'])} of the harmful prompts are in the seed",
        f"In `dev_benign`, {_count('dev_benign.jsonl', sounds)} prompts are dangerous-sounding",
        f"and {_count('dev_benign.jsonl', lambda r: not sounds(r))} ordinary ones; "
        f"{_count('dev_benign.jsonl', has_reference)} have a reference",
        f"hand-marked harmful words ({_count('span_gold.jsonl')})",
    ]
    assert all(sounds(r) and has_reference(r) for r in load_jsonl("eval_benign.jsonl") if _late(r))  # "all of the last"
    missing = [claim for claim in stated if claim not in text]
    assert not missing, f"data/README.md does not state: {missing}"
