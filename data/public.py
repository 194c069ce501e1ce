"""Held-out prompt sets written by other people, vendored under data/public/.

The project's own held-out sets come from the same hand as its dev split, so they can
flatter the method. These sets do not: they are public benchmarks (source, version, licence
and selection rule in data/public/README.md), in the eval sets' format (id, category,
prompt). They are report-only, like the eval sets: every report gives them, nothing is
tuned on them. To stay held out, none of their prompts may appear in the dev split, the
seeds, the span gold set, the eval sets or a generated training dataset;
`overlapping_prompts` and `near_duplicates` are the checks.
"""

from __future__ import annotations

import string
from pathlib import Path

from common.files import read_jsonl
from data import DATA_DIR

PUBLIC_DIR = DATA_DIR / "public"

# The name says the role: "harmful_" sets should be refused, "benign_" sets should not.
PUBLIC_SETS = ("harmful_harmbench", "benign_rho_overrefusal")

NEAR_DUP_JACCARD = 0.7  # word-set Jaccard at or above this counts as the same prompt reworded

_EDGES = string.punctuation + string.whitespace + "“”‘’…"


def public_sets() -> dict[str, Path]:
    """{name: path} of every vendored public set, harmful sets first."""
    return {name: PUBLIC_DIR / f"{name}.jsonl" for name in PUBLIC_SETS}


def public_prompts() -> list[str]:
    """Every prompt of every public set, for checking that other data stays clear of them."""
    return [r["prompt"] for path in public_sets().values() for _, r in read_jsonl(path, what="prompt")]


def normalise(text: str) -> str:
    """The form in which two prompts count as the same: lowercase, single spaces, and no
    punctuation at either end (so "How do I X?" and "how do i  x" match)."""
    return " ".join(text.lower().split()).strip(_EDGES)


def overlapping_prompts(prompts, others) -> list[str]:
    """The prompts (in their order) whose normalised text is also one of `others`, e.g. the
    public prompts that occur among a generated dataset's questions."""
    seen = {normalise(o) for o in others}
    return [p for p in prompts if normalise(p) in seen]


def near_duplicates(prompts, others, threshold: float = NEAR_DUP_JACCARD) -> list[tuple[str, str]]:
    """(prompt, other) pairs whose word sets overlap at least `threshold` (Jaccard): a reworded
    copy, such as a spelling variant, that `overlapping_prompts` does not see."""
    words = lambda text: set(normalise(text).replace(",", " ").split())
    other_words = [(o, words(o)) for o in others]
    pairs = []
    for p in prompts:
        wp = words(p)
        pairs += [(p, o) for o, wo in other_words if len(wp & wo) >= threshold * max(len(wp | wo), 1)]
    return pairs
