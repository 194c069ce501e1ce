"""The prompt sets a run reads: held-out and development prompts (eval_*.jsonl, dev_*.jsonl, or
a user's own file in the same format) and the hand-marked span gold set, each checked line by
line; and the evenly spaced subset that a --limit takes of them.
"""

from __future__ import annotations

import re

from common.files import read_jsonl
from data.dataset import check_keys
from data.prompts import PipelineError

SPLITS = ("all", "dev", "test")  # of the span gold set


def load_prompts(path, required=("id", "category", "prompt")) -> list[dict]:
    """A held-out prompt set (JSONL), each line checked for the keys evaluation needs."""
    out = []
    for n, r in read_jsonl(path, PipelineError, "prompt"):
        check_keys(path, n, r, [(key, str) for key in required], PipelineError)
        out.append(r)
    if not out:
        raise PipelineError(f"{path}: prompt file is empty.")
    return out


def given_questions(path, n: int, prefix: str) -> tuple[list[dict], dict]:
    """The first n prompts of a prompt file (one JSON object with a 'prompt' per line, as the
    held-out sets) as question records, in place of self-instruct; returns (records, stats)."""
    prompts = load_prompts(path, required=("prompt",))[:n]
    category = lambda r: r["category"] if isinstance(r.get("category"), str) else "given"
    records = [
        {"id": f"{prefix}{i:04d}", "category": category(r), "question": r["prompt"]} for i, r in enumerate(prompts)
    ]
    return records, {"candidates": len(records), "malformed": 0, "duplicate": 0}


def spread(items: list, limit: int | None) -> list:
    """`limit` items evenly spaced through the list (the prompt sets are grouped by category, so
    the first `limit` would cover one or two categories)."""
    if limit is None or limit >= len(items):
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


ID_NUMBER = re.compile(r"\d+$")  # span-007 -> 7: the split goes by it


def load_span_gold(path) -> list[dict]:
    """The hand-written span gold set (JSONL): toxic responses with the exact phrases that carry
    the harm; a phrase that is not in its response is an error, never a silent miss."""
    out = []
    for n, r in read_jsonl(path, PipelineError, "span gold"):
        check_keys(path, n, r, [(key, str) for key in ("id", "category", "question", "toxic")], PipelineError)
        if not ID_NUMBER.search(r["id"]):
            raise PipelineError(
                f"{path}:{n}: id {r['id']!r} does not end with a number (the dev/test split needs one)."
            )
        harmful = r.get("harmful")
        if not isinstance(harmful, list) or not harmful or not all(isinstance(p, str) and p.strip() for p in harmful):
            raise PipelineError(f"{path}:{n}: key 'harmful' must be a non-empty list of non-empty strings.")
        for phrase in harmful:
            if phrase not in r["toxic"]:
                raise PipelineError(f"{path}:{n}: harmful phrase {phrase!r} is not in its 'toxic' text.")
        out.append(r)
    if not out:
        raise PipelineError(f"{path}: span gold file is empty.")
    return out


def select_split(records, split: str) -> list[dict]:
    """dev: the odd-numbered ids (span-001, 003, ...), where thresholds are chosen; test: the
    even-numbered ones, where the chosen thresholds are reported; all: both."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}.")
    if split == "all":
        return list(records)
    parity = 1 if split == "dev" else 0
    return [r for r in records if int(ID_NUMBER.search(r["id"]).group()) % 2 == parity]
