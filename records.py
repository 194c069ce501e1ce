"""The dual-dataset file as `ptalign.py generate` writes it, and its bookkeeping.

One JSON record per question, appended chunk by chunk (`write_chunks`, which runs the method's
stages on each chunk not yet written) and stamped with the settings that made it. Next to it,
while a run is unfinished, OUT.journal holds every batch of model work as it finishes
(generate.in_batches): a run killed at any point loses at most the batch in progress, and
resuming with the same settings gives exactly the file an uninterrupted run writes. Also here:
the progress line of a run and its ETA, the summary of a finished file, and `show` (the records
as text).
Training reads the same file through `data.dataset.load_records`; the settings that make it
are generate_config.py's.
"""

from __future__ import annotations

import math
import sys
from functools import partial
from pathlib import Path

import distributed
from common.files import Journal, append_jsonl, read_jsonl, remove_stale_temps, write_jsonl
from common.progress import Progress, log
from data.dataset import read_records
from data.prompts import PipelineError
from rules import word_spans


def journal_path(out) -> Path:
    """Where a run's finished batches wait until its dataset file is complete: OUT.journal."""
    return Path(out).with_name(Path(out).name + ".journal")


def saved_work(out) -> str:
    """What an interrupted run has saved, and how to go on: for its last message."""
    count = lambda f: sum(1 for line in f.open(encoding="utf-8") if line.strip()) if f.is_file() else 0
    out, journal = Path(out), journal_path(out)
    batches = max(count(journal) - 1, 0)  # its first line is the stamp
    return (
        f"{count(out)} records in {out} and {batches} finished batches in {journal} are saved; "
        "rerun the same command to continue from them."
    )


class DatasetFile:
    """The records already in a dataset file, by id, and appending new ones to it.

    Opening it resumes it: every record must carry `settings` in its provenance (else the
    run stops with the first difference), a torn last line (a run killed mid-write) is
    dropped by rewriting the file without it, and what a killed writer left beside it goes.
    `journal` is where the run's finished batches wait until the file is complete.
    """

    def __init__(self, path, settings: dict, method: str = "PT-ALIGN (ptalign.py)"):
        self.path, self.settings, self.method = Path(path), settings, method
        self.journal = journal_path(self.path)
        self.done: dict[str, dict] = {}
        remove_stale_temps(self.path.parent, self.path.name)
        if self.path.exists():
            for _, r in read_jsonl(self.path, PipelineError, "dataset", allow_torn_tail=True):
                self.check(r.get("provenance", {}).get("settings", {}), self.path)
                self.done[r["id"]] = r
            write_jsonl(self.path, self.done.values())

    def check(self, old: dict, where: Path) -> None:
        """Stop unless `old` (the settings a record or the journal was written with) are this run's."""
        diff = [k for k in self.settings if not isinstance(old, dict) or old.get(k) != self.settings[k]]
        if diff:
            was = old.get(diff[0]) if isinstance(old, dict) else None
            raise PipelineError(
                f"{where}: written with other settings ({diff[0]}: {was!r} here {self.settings[diff[0]]!r}); "
                "use the same flags to resume, or another --out."
            )

    def open_journal(self) -> Journal:
        """The journal of this run's finished batches; one that a run with other settings left is refused."""
        journal = Journal(self.journal, self.settings, PipelineError)
        if journal.stamp is not None:
            self.check(journal.stamp, journal.path)
        return journal

    def pending(self, items: list[dict], chunk_size: int) -> list[tuple[int, list[dict]]]:
        """(start, chunk) for every chunk of `items` with an id not yet in the file.

        A chunk is computed whole even if part of it was written: its batches, and so its
        samples, are then exactly those of an uninterrupted run.
        """
        chunks = [(c, items[c : c + chunk_size]) for c in range(0, len(items), chunk_size)]
        return [(c, chunk) for c, chunk in chunks if not all(x["id"] in self.done for x in chunk)]

    def append(self, records: list[dict]) -> int:
        """Append the records not yet in the file, each with its provenance; returns how many."""
        new = [r for r in records if r["id"] not in self.done]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for r in new:
                r["provenance"] = {"settings": self.settings, "method": self.method}
                append_jsonl(f, r)
                self.done[r["id"]] = r
        return len(new)

    def records(self, items: list[dict]) -> list[dict]:
        """The file's records of these items, in their order."""
        return [self.done[x["id"]] for x in items if x["id"] in self.done]


def open_dataset(out, settings: dict) -> tuple[DatasetFile, Journal | None]:
    """The dataset file at `out`, resumed, and the journal of its run's finished batches; a file or
    journal of other settings is refused here, before any model loads. Under torchrun only rank 0
    keeps the journal (another rank loses at most the chunk it is computing)."""
    dataset = DatasetFile(out, settings)
    journal = dataset.open_journal() if distributed.is_main() else None
    distributed.barrier()  # every rank has read the file before rank 0 appends to it
    return dataset, journal


class Meter:
    """The progress line of a generate run: its work (weighted model calls, common.progress),
    records written, generated tokens/s (from a tally with .rate()), elapsed time and ETA."""

    def __init__(self, work: float, records: int, tally, records_done: int = 0):
        self.progress, self.records, self.tally, self.records_done = Progress(work), records, tally, records_done

    def step(self, label: str, work: float, records: int = 0) -> str:
        self.progress.advance(work)
        self.records_done += records
        dt, eta = self.progress.times()
        return (
            f"{self.progress.bar(30)} {label:<28} {self.records_done}/{self.records} records  "
            f"{self.tally.rate():5.1f} tok/s  {dt:5.0f} s  ETA {eta:4.0f} s"
        )


# Relative cost of the stages of a chunk, for the ETA (measured on the default model: a
# refinement round, with its two critiques, two revisions and two judgements, costs about
# three times the dual responses or the self-check and spans; the anchor's questions and
# answers about as much as the dual responses).
STAGE_COST = {"responses": 1.0, "round": 3.0, "spans": 1.0, "anchor": 1.0}


def write_chunks(dataset: DatasetFile, questions, dual, anchors, answer, chunk_size: int, rounds: int, tally) -> None:
    """dual(start, chunk, progress) on every chunk of questions not yet in the file, then
    answer(start, chunk) on every chunk of anchor questions; each chunk's records are appended
    as it is done (the resume points), with a progress line for each stage.

    `start` is the chunk's place in its list (it seeds the chunk's sampling); dual reports each
    stage it finishes with progress(stage, label), stage a key of STAGE_COST. Under torchrun the
    chunks are dealt out to the ranks and rank 0 appends them in order: a chunk's samples depend
    only on its questions and its start, so the file is the one a single process writes.
    """
    todo, anchor_todo = dataset.pending(questions, chunk_size), dataset.pending(anchors, chunk_size)
    per_chunk = STAGE_COST["responses"] + rounds * STAGE_COST["round"] + STAGE_COST["spans"]
    work = len(todo) * per_chunk + len(anchor_todo) * STAGE_COST["anchor"]
    meter = Meter(work, len(questions) + len(anchors), tally, len(dataset.records(questions + anchors)))
    name = lambda start: f"chunk {start // chunk_size + 1}/{math.ceil(len(questions) / chunk_size)}"
    step = lambda start, stage, label, n=0: log(meter.step(f"{name(start)}: {label}", STAGE_COST[stage], n))
    for (start, _), records, here in distributed.in_turns(todo, lambda job: dual(*job, partial(step, job[0]))):
        written = dataset.append(records)
        if here:
            step(start, "spans", "self-check, spans", written)
        else:  # computed by another rank: all of its work arrives at once
            log(meter.step(f"{name(start)}: from another rank", per_chunk, written))
    for (start, chunk), records, _ in distributed.in_turns(anchor_todo, lambda job: answer(*job)):
        written = dataset.append(records)
        log(meter.step(f"anchor answers {start + len(chunk)}/{len(anchors)}", STAGE_COST["anchor"], written))


def summarize(records, qstats=None, astats=None) -> dict:
    """The yield funnel of a dataset: how many questions reach each stage, and why the others stopped.

    questions -> judged harmful (the request gate) -> dual responses -> each refinement round's
    take rate -> self-check -> harmful spans -> kept; and for the anchor: questions -> answers kept.
    """
    dual = [r for r in records if r.get("kind") != "anchor"]
    anchors = [r for r in records if r.get("kind") == "anchor"]
    responded = [r for r in dual if "rounds" in r]
    dropped = {}
    for r in records:
        if not r.get("kept"):
            dropped[r.get("dropped", "?")] = dropped.get(r.get("dropped", "?"), 0) + 1
    kept = [r for r in dual if r.get("kept")]
    coverage = [sum(e - s for s, e in r["spans"]) / max(1, sum(e - s for s, e in word_spans(r["toxic"]))) for r in kept]
    qstats, astats = qstats or {}, astats or {}
    return {
        "questions": len(dual),
        "kept": len(kept),
        "dropped": dropped,
        "question_candidates": qstats.get("candidates"),
        "question_malformed": qstats.get("malformed"),
        "question_duplicates": qstats.get("duplicate"),
        "judged_harmful": len(responded),
        "round_take_rates": take_rates(responded),
        "passed_self_check": sum(r.get("kept") or r.get("dropped") == "no harmful span found" for r in responded),
        "mean_span_coverage": sum(coverage) / len(coverage) if coverage else 0.0,
        "anchor_candidates": astats.get("candidates"),
        "anchor_questions": len(anchors),
        "anchor_kept": sum(bool(r.get("kept")) for r in anchors),
    }


def take_rates(records) -> list[dict]:
    """For each refinement round, the share of positive and of toxic revisions that were taken."""
    rounds = min((len(r["rounds"]) for r in records), default=1) - 1
    rates = []
    for k in range(1, rounds + 1):
        entries = [r["rounds"][k] for r in records]
        rates.append(
            {
                side: sum(e[side] == e[f"revision_{side}"] for e in entries) / len(entries)
                for side in ("positive", "toxic")
            }
        )
    return rates


def with_times(summary: dict, seconds: float, tally) -> dict:
    """The summary of a run that generated, with its time and its generation's tokens/s (from a tally)."""
    return summary | dict(
        seconds=round(seconds, 1),
        generated_tokens=tally.tokens,
        generation_seconds=round(tally.seconds, 1),
        generated_tokens_per_s=round(tally.rate(), 1),
    )


def format_summary(s: dict) -> str:
    """The funnel as a few lines of text, for the end of a run."""
    drops = ", ".join(f"{k}: {v}" for k, v in s["dropped"].items()) or "none"
    rounds = ", ".join(
        f"round {k + 1}: {r['positive']:.0%} positive / {r['toxic']:.0%} toxic revisions taken"
        for k, r in enumerate(s.get("round_take_rates", []))
    )
    text = (
        f"questions: {s['question_candidates']} candidates, {s['question_malformed']} malformed, "
        f"{s['question_duplicates']} near-duplicates, {s['questions']} kept\n"
        f"funnel: {s['questions']} questions -> {s.get('judged_harmful', '?')} judged harmful (dual responses)"
        f" -> {s.get('passed_self_check', '?')} pass the self-check -> {s['kept']} with harmful spans, kept\n"
        + (f"refinement: {rounds}\n" if rounds else "")
        + f"anchor: {s.get('anchor_questions', 0)} questions ({s.get('anchor_candidates')} candidates) -> "
        f"{s.get('anchor_kept', 0)} answers kept\n"
        f"dropped: {drops}\n"
        f"mean span coverage of content characters in kept toxic responses: {s['mean_span_coverage']:.1%}"
    )
    if "seconds" in s:
        text += (
            f"\ntime: {s['seconds']:.0f} s; generation: {s['generated_tokens']} tokens in "
            f"{s['generation_seconds']:.0f} s, {s['generated_tokens_per_s']:.1f} tok/s "
            "(prompt prefill included; the rest of the time is judging and scoring)"
        )
    return text


def report_summary(summary: dict, out) -> dict:
    """Print the summary; stop with a clear message when nothing usable was produced."""
    log(format_summary(summary))
    if summary["kept"] == 0:
        raise PipelineError(
            f"{out}: the model produced no usable record (every sample was dropped: "
            f"{summary['dropped']}); try more --rounds, another --seed or a larger model."
        )
    return summary


def show(path, limit: int | None = None, color: bool | None = None) -> str:
    """Records of a dataset as text, the harmful spans highlighted (red in a terminal, [[...]] otherwise)."""
    color = sys.stdout.isatty() if color is None else color
    on, off = ("\033[1;31m", "\033[0m") if color else ("[[", "]]")
    records = read_records(path, allow_torn_tail=True)  # a file still being written; checked as training checks it
    if not records:
        raise PipelineError(f"{path}: dataset file has no records.")
    out = []
    for n, r in records[:limit]:
        toxic, last, text = "", 0, r.get("toxic") or ""
        for s, e in r.get("spans", []):
            toxic += text[last:s] + on + text[s:e] + off
            last = e
        toxic += text[last:]
        status = f"dropped ({r.get('dropped')})" if r.get("kept") is False else "kept"
        text = f"── {r.get('id', f'line {n}')} [{r.get('category')}] {status}\nQ: {r['question']}\n"
        text += (f"+ {r['positive']}\n" if r.get("positive") else "") + (f"- {toxic}\n" if toxic else "")
        out.append(text)
    return "\n".join(out)
