"""Files every stage reads and writes, each written one way.

- atomic writes: a file is written under a temporary name and renamed into place, so a
  reader (or a run killed mid-write) never sees half of it;
- JSONL reading, with the torn-last-line option that resuming an appended file needs;
- content hashes, for the fingerprints that decide whether a run may resume or reuse;
- word splitting, the one definition of a "word" (dedup, meta-word checks, spans);
- charts: matplotlib set up for files, not screens.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

# A word: letters/digits, with inner apostrophes kept ("don't" is one word, not "don" + "t").
WORD = re.compile(r"\w+(?:['’]\w+)*")


class FileFormatError(ValueError):
    """A file that cannot be read as what it should be; the message names the file and line."""


def words(text: str) -> list[str]:
    """The lowercased words of a text."""
    return [w.lower() for w in WORD.findall(text)]


def write_bytes_atomic(path, data: bytes | str) -> None:
    """Write bytes or text under a temporary name, then rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj, sort_keys: bool = False) -> None:
    """Indented JSON, atomically; NaN and infinity are refused rather than written as non-JSON."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False, sort_keys=sort_keys)
    write_bytes_atomic(path, text + "\n")


def write_jsonl(path, records) -> None:
    """One JSON object per line, atomically (the whole file replaced at once)."""
    write_bytes_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def append_jsonl(f, record) -> None:
    """Append one record to an open file and make it durable before going on."""
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def read_jsonl(path, error=FileFormatError, what: str = "JSONL", allow_torn_tail: bool = False):
    """(line number, object) for each non-blank line of a JSONL file.

    `error` (an exception class) names the file and line of anything malformed. A torn last
    line (a run killed mid-append) is skipped with a note when allow_torn_tail is set.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} file does not exist.")
    lines = path.read_text(encoding="utf-8").split("\n")  # a torn line is the one with no newline
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if allow_torn_tail and n == len(lines):
                print(f"{path}:{n}: ignoring an incomplete last line (interrupted write).", file=sys.stderr)
                continue
            raise error(f"{path}:{n}: not valid JSON ({e.msg}).") from None
        if not isinstance(obj, dict):
            raise error(f"{path}:{n}: expected a JSON object per line.")
        yield n, obj


def sha256(path, length: int = 16) -> str:
    """Hex digest of a file's bytes (the first `length` digits), read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def stable_seed(*parts) -> int:
    """A seed that depends only on its parts (never on Python's randomised hash())."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:12], 16)


def pyplot():
    """matplotlib's pyplot, drawing to files (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> None:
    """Write a figure as PNG atomically and free it."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.tight_layout()
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        pyplot().close(fig)
