"""Files every stage reads and writes, each written one way.

- atomic writes: a file is written under a temporary name and renamed into place, so a
  reader (or a run killed mid-write) never sees half of it; `temp_path` is the one way every
  writer (directories too) names what it is still writing, so `remove_stale_temps` finds all
  that a killed writer left; new files and directories get the user's umask;
- output paths checked writable before a run does any work;
- JSON and JSONL reading: one error naming the file (and line) for every way it can be
  broken, and the torn-last-line rule that resuming an appended file needs; the journal of
  finished work a long run appends to as it goes;
- content hashes, for the fingerprints that decide whether a run may resume or reuse, and the
  seeds derived from them.

Charts are in common/charts.py; the definition of a word is the method's (rules.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

from common.errors import UserError


class FileFormatError(UserError):
    """A file that cannot be read as what it should be; the message names the file and line."""


# -----------------------------------------------------------------------------
# Writing: temporary names, atomic replacement, the user's umask


def temp_path(path, kind: str = "tmp") -> Path:
    """The hidden name beside `path` for it while it is being written ("tmp"), or for the
    previous version while it is being replaced ("old"): .NAME.tmp-PID. The writer's pid in the
    name tells a dead writer's leftovers from a live one's."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)")  # what temp_path makes


def writer_alive(pid: int) -> bool:
    """Whether the process that named a temporary file is still running (not this one: at start-up
    it has written nothing yet, so a name with its pid is a dead process's that had the same pid)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_temps(directory, name: str = "*") -> None:
    """Remove what killed writers left in `directory` (for the file `name` only, when given).

    A previous version moved aside (.NAME.old-PID) with nothing at NAME is put back instead: a
    kill between the two renames of a replacement leaves it the only complete copy.
    """
    directory = Path(directory)
    for p in sorted(directory.glob(f".{name}.*-*")):
        m = TEMP_NAME.fullmatch(p.name)
        if not m or writer_alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not (directory / m["name"]).exists():
            with contextlib.suppress(FileNotFoundError):  # another process of the same run (torchrun) was first
                os.replace(p, directory / m["name"])
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def created_mode(directory: bool = False) -> int:
    """The mode open() and mkdir() give new files and directories under this process's umask
    (for files a library creates 0600, such as safetensors', which the user's group should read too)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def write_bytes_atomic(path, data: bytes | str) -> None:
    """Write bytes or text under a temporary name, then rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
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


# -----------------------------------------------------------------------------
# Output paths, checked before the work


def check_output_dir(directory, flag: str) -> None:
    """Stop before any work unless `directory` is, or can be made, a directory this process can write in."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory}: {flag} must name a directory, and this is a file.")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = temp_path(directory / "write-test")
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"{directory}: {flag} is not writable ({(e.strerror or str(e)).lower()}).") from None


def check_output_file(path, flag: str) -> None:
    """Stop before any work unless `path` can be written as a file; clear what a killed writer of it left."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: {flag} names a directory; give it a file name.")
    check_output_dir(path.parent, flag)
    remove_stale_temps(path.parent, path.name)


# -----------------------------------------------------------------------------
# Reading: JSON, JSONL and the journal


def read_text(path, error, what: str) -> str:
    """A text file's contents; `error` says which file when it is missing or not UTF-8."""
    path = Path(path)
    if not path.exists():
        raise error(f"{path}: {what} file does not exist.")
    if not path.is_file():
        raise error(f"{path}: {what} file is not a regular file (a directory or a device).")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: {what} file is not UTF-8 text.") from None


def read_json(path, error=FileFormatError, what: str = "JSON") -> dict:
    """The JSON object in a file; `error` names the file if it is missing, not UTF-8, not JSON or not an object."""
    try:
        obj = json.loads(read_text(path, error, what))
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, found a {type(obj).__name__}.")
    return obj


def read_jsonl(path, error=FileFormatError, what: str = "JSONL", allow_torn_tail: bool = False):
    """(line number, object) for each non-blank line of a JSONL file.

    `error` (an exception class) names the file and line of anything malformed. A torn last
    line (a run killed mid-append) is skipped with a note when allow_torn_tail is set.
    """
    lines = read_text(path, error, what).split("\n")  # a torn line is the one with no newline
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) and allow_torn_tail:
                print(f"{path}:{n}: ignoring an incomplete last line (interrupted write).", file=sys.stderr)
                continue
            torn = " (an incomplete last line: was the run that wrote it interrupted?)" if n == len(lines) else ""
            raise error(f"{path}:{n}: not valid JSON ({e.msg}){torn}.") from None
        if not isinstance(obj, dict):
            raise error(f"{path}:{n}: expected a JSON object per line.")
        yield n, obj


class Journal:
    """Finished pieces of a long computation, by key, appended to a JSONL file as each one
    finishes: a run killed at any moment redoes only the piece it was in.

    Its first line is a stamp (the settings of the run that began it): opening it reads back
    the stamp (`stamp`, None for a new journal) and what earlier runs saved, and changes
    nothing, so a caller can refuse a journal of other settings first. The first `put` rewrites
    it with this run's stamp (a torn last line dropped); `remove` deletes it once the result it
    served is complete.
    """

    def __init__(self, path, stamp: dict, error=FileFormatError):
        self.path, self.new_stamp, self.written = Path(path), stamp, 0
        entries = (
            [e for _, e in read_jsonl(self.path, error, "journal", allow_torn_tail=True)] if self.path.exists() else []
        )
        self.stamp = entries[0].get("stamp") if entries else None
        self.saved = {e["key"]: e["value"] for e in entries[1:] if "key" in e and "value" in e}

    def get(self, key: str):
        return self.saved.get(key)

    def put(self, key: str, value) -> None:
        if self.written == 0:
            write_jsonl(
                self.path, [{"stamp": self.new_stamp}] + [{"key": k, "value": v} for k, v in self.saved.items()]
            )
        with open(self.path, "a", encoding="utf-8") as f:
            append_jsonl(f, {"key": key, "value": value})
        self.saved[key] = value
        self.written += 1

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# Hashes


def content_hash(*parts, length: int = 32) -> str:
    """Hex digest of the parts' repr (the first `length` digits): the same parts, the same hash, in any process."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:length]


def sha256(path, length: int = 16) -> str:
    """Hex digest of a file's bytes (the first `length` digits), read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def stable_seed(*parts) -> int:
    """A seed that depends only on its parts (never on Python's randomised hash())."""
    return int(content_hash(*parts, length=12), 16)
