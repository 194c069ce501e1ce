"""From dual-dataset records to training tensors.

A record (written by `ptalign.py generate`) holds a question, a positive response, a toxic
response and the character spans of the toxic response's harmful words. Training sees the
bare question in the model's chat template (no principles, no exemplars) and two examples
per record:

    positive: every response token (and the end-of-turn token) is an MLE target
    toxic:    response tokens under a harmful span are unlikelihood (UT) targets; all else ignored

Spans are stored as characters so a dataset does not depend on the tokenizer; here they
become a token mask through the tokenizer's offsets.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from common.errors import UserError
from common.files import read_jsonl

IGNORE = -100
WORD_CHAR = re.compile(r"\w")  # a token that carries none carries no harm: never masked


class DatasetError(UserError):
    """A dataset that cannot be used; the message names the file, line or key."""


# -----------------------------------------------------------------------------
# Character spans (which words they mark is the method's rule: rules.word_spans)


def merge_spans(spans) -> list[list[int]]:
    """Sorted, non-overlapping spans; touching or overlapping ones are joined."""
    out = []
    for s, e in sorted(map(tuple, spans)):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def spans_to_token_mask(offsets, spans) -> list[bool]:
    """True for each token whose character range overlaps a span."""
    spans = merge_spans(spans)
    return [any(s < te and ts < e for s, e in spans) for ts, te in offsets]


# -----------------------------------------------------------------------------
# Checking a file's records: the one validator of the dataset format


def check_keys(path, n: int, record: dict, keys, error=DatasetError) -> None:
    """Stop with one sentence naming the file, line and key unless each (key, type) of `keys`
    holds a value of that type; a string must not be empty. For every JSONL file read here."""
    for key, kind in keys:
        value = record.get(key)
        if not isinstance(value, kind) or (kind is str and not value):
            what = "non-empty string" if kind is str else kind.__name__
            raise error(f"{path}:{n}: key {key!r} is missing or not a {what}.")


def check_spans(path, n: int, record: dict, required: bool = True) -> None:
    """A record's spans: a list of [start, end) integer pairs inside its toxic response (at least
    one when required, as training needs; a dropped record may have none)."""
    spans, toxic = record.get("spans", []), record.get("toxic") or ""
    if not isinstance(spans, list):
        raise DatasetError(f"{path}:{n}: key 'spans' is not a list.")
    if required and not spans:
        raise DatasetError(f"{path}:{n}: record has no harmful spans; the toxic side would train nothing.")
    for s in spans:
        ok = isinstance(s, list) and len(s) == 2 and all(type(x) is int for x in s)  # not 1.5, not true
        if not (ok and 0 <= s[0] < s[1] <= len(toxic)):
            raise DatasetError(f"{path}:{n}: span {s!r} is not [start, end) inside the toxic response.")


def check_record(path, n: int, record: dict) -> None:
    """A dual-dataset record as every reader needs it (train.py --data and ptalign.py show alike).

    Every record has a question; the texts it has are strings and its spans lie inside its toxic
    response. A record the method kept has what training reads: an anchor (kind "anchor", the
    model's answer to a harmless question, MLE only) its answer; a dual record both responses
    and at least one harmful span. A dropped one (kept: false, left in the file for resuming and
    reading) may have stopped before any response was written.
    """
    check_keys(path, n, record, (("question", str),))
    for key in ("id", "positive", "toxic"):
        if key in record and not isinstance(record[key], str):
            raise DatasetError(f"{path}:{n}: key {key!r} is not a string.")
    if record.get("kept") is False:
        check_spans(path, n, record, required=False)
    elif record.get("kind") == "anchor":
        check_keys(path, n, record, (("positive", str),))
        check_spans(path, n, record, required=False)
    else:
        check_keys(path, n, record, (("positive", str), ("toxic", str), ("spans", list)))
        check_spans(path, n, record)


def read_records(path, allow_torn_tail: bool = False) -> list[tuple[int, dict]]:
    """(line number, record) for every record of a dataset file, each checked by check_record."""
    records = list(read_jsonl(path, DatasetError, "dataset", allow_torn_tail=allow_torn_tail))
    for n, r in records:
        check_record(path, n, r)
    return records


def load_records(path) -> list[dict]:
    """The kept records of a dual-dataset JSONL file: what training reads."""
    records = [r for _, r in read_records(path) if r.get("kept") is not False]
    if not records:
        raise DatasetError(f"{path}: dataset has no usable (kept) record.")
    return records


# -----------------------------------------------------------------------------
# Records -> examples


@dataclass
class Example:
    ids: list[int]  # prompt + response tokens
    targets: list[int]  # targets[t] is the token predicted at position t, or IGNORE
    ut: list[bool]  # ut[t]: position t is an unlikelihood target
    truncated: bool = False


def encode_example(tokenizer, question: str, response: str, spans=None, max_len: int = 1024) -> Example | None:
    """Tokens and targets for one (question, response): MLE on the response if spans is None,
    else unlikelihood on the tokens under spans and nothing elsewhere.

    The response is located inside the template's rendering of the full conversation, so its
    tokens (and the end-of-turn marker after it) are exactly those the model would produce.
    Returns None when the prompt alone does not fit in max_len: it is dropped, not cut.
    """
    messages = [{"role": "user", "content": question}]
    prompt_text = tokenizer.render_chat(messages, add_generation_prompt=True)
    full_text = tokenizer.render_chat(
        messages + [{"role": "assistant", "content": response}], add_generation_prompt=False
    )
    if not full_text.startswith(prompt_text):
        raise DatasetError(
            "chat template: the rendered conversation does not start with the rendered "
            "prompt, so response tokens cannot be located."
        )
    suffix = full_text[len(prompt_text) :]
    r0 = suffix.find(response)
    if r0 < 0:
        raise DatasetError(f"chat template changed the response text (e.g. trimmed it): {response[:40]!r}.")
    r1 = r0 + len(response)
    prompt_ids = tokenizer.encode(prompt_text)
    if len(prompt_ids) >= max_len:
        return None
    suffix_ids, offsets = tokenizer.encode_with_offsets(suffix)
    in_response = [s < r1 and r0 < e for s, e in offsets]
    if spans is None:
        # MLE: the response, and the first token after it (end of turn) so the model learns to stop.
        target = list(in_response)
        after = next((i for i, (s, _) in enumerate(offsets) if s >= r1), None)
        if after is not None:
            target[after] = True
        ut_tok = [False] * len(suffix_ids)
    else:
        # A token is marked only if it carries a word character: a phrase span given by hand
        # may cover spaces and punctuation, which never carry the harm.
        marked = spans_to_token_mask(offsets, [[s + r0, e + r0] for s, e in spans])
        ut_tok = [m and r and bool(WORD_CHAR.search(suffix[s:e])) for m, r, (s, e) in zip(marked, in_response, offsets)]
        target = ut_tok
    ids = prompt_ids + suffix_ids
    is_target = [False] * len(prompt_ids) + target
    is_ut = [False] * len(prompt_ids) + ut_tok
    truncated = len(ids) > max_len
    ids, is_target, is_ut = ids[:max_len], is_target[:max_len], is_ut[:max_len]
    # Position t predicts token t + 1.
    targets = [ids[t + 1] if is_target[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    ut = [is_ut[t + 1] for t in range(len(ids) - 1)] + [False]
    return Example(ids, targets, ut, truncated)


def build_examples(records, tokenizer, max_len: int, loss: str = "both", anchor: bool = True):
    """Two examples per record (positive MLE, toxic UT), or one side only for --loss mle / ut.

    An anchor record (kind "anchor": the model's own answer to a harmless question) gives one
    MLE example, never an unlikelihood one; anchor=False (or --loss ut) leaves anchor records out.

    Returns (examples, stats) where stats counts what was dropped or truncated, for the summary.
    An example left with no target by truncation (harmful spans all past max_len) trains
    nothing and is skipped.
    """
    examples, stats = [], {"dropped_long_prompt": 0, "truncated": 0}
    for r in records:
        is_anchor = r.get("kind") == "anchor"
        if is_anchor and (not anchor or loss == "ut"):  # --loss ut is unlikelihood alone
            continue
        sides = []
        if loss in ("mle", "both") or is_anchor:
            sides.append((r["positive"], None))
        if loss in ("ut", "both") and not is_anchor:
            sides.append((r["toxic"], r["spans"]))
        for response, spans in sides:
            ex = encode_example(tokenizer, r["question"], response, spans, max_len)
            if ex is None:
                stats["dropped_long_prompt"] += 1
            elif any(t != IGNORE for t in ex.targets):
                stats["truncated"] += ex.truncated
                examples.append(ex)
    return examples, stats


def build_pairs(records, tokenizer, max_len: int):
    """(positive, toxic) example pairs for the DPO baseline, both sides with every response token
    a target (DPO compares whole-sequence log-probabilities); anchor records have no pair.

    Returns (pairs, stats) as build_examples does.
    """
    pairs, stats = [], {"dropped_long_prompt": 0, "truncated": 0}
    for r in records:
        if r.get("kind") == "anchor":
            continue
        pos, tox = (encode_example(tokenizer, r["question"], r[side], None, max_len) for side in ("positive", "toxic"))
        if pos is None or tox is None:
            stats["dropped_long_prompt"] += 1
        else:
            stats["truncated"] += pos.truncated or tox.truncated
            pairs.append((pos, tox))
    return pairs, stats


def batches(units: list, batch_size: int, seed: int, epoch: int, pad_id: int):
    """Length-bucketed batches in a shuffled order that depends only on (seed, epoch).

    A unit is an Example, or a tuple of Examples that must share a micro-batch (a DPO pair),
    laid out as consecutive rows. Units are sorted by length within windows of 8 batches so a
    batch pads little, and the batch order is shuffled so training does not see lengths in order.
    Yields (ids, targets, ut_mask) as (rows, T) tensors, right-padded.
    """
    flat = lambda unit: unit if isinstance(unit, tuple) else (unit,)
    rng = random.Random(seed * 1000003 + epoch)
    order = list(range(len(units)))
    rng.shuffle(order)
    window = batch_size * 8
    order = [
        i
        for w in range(0, len(order), window)
        for i in sorted(order[w : w + window], key=lambda i: max(len(e.ids) for e in flat(units[i])))
    ]
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(groups)
    for group in groups:
        yield pad_rows([e for i in group for e in flat(units[i])], pad_id)


def pad_rows(exs: list[Example], pad_id: int):
    """Examples as right-padded (ids, targets, ut_mask) tensors of one micro-batch."""
    T = max(len(e.ids) for e in exs)
    ids = torch.full((len(exs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(exs), T), IGNORE, dtype=torch.long)
    ut = torch.zeros((len(exs), T), dtype=torch.bool)
    for b, e in enumerate(exs):
        n = len(e.ids)
        ids[b, :n] = torch.tensor(e.ids)
        targets[b, :n] = torch.tensor(e.targets)
        ut[b, :n] = torch.tensor(e.ut)
    return ids, targets, ut
