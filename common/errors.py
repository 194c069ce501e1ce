"""How every command ends when something goes wrong: one sentence, nothing lost.

- `UserError` is the base of every error a user can cause and fix (a missing or malformed
  file, a checkpoint we cannot run, a refused resume, a prompt longer than the context). Each
  module keeps its own subclass (CheckpointError, DatasetError, ...); its message is one
  sentence naming the file, key, flag or value.
- `one_line_errors` is the one place a command line turns those, an OSError on a path (a
  read-only directory, a full disk) and Ctrl-C into that sentence on stderr and exit code 1
  (argparse answers a bad flag with exit code 2 before any of this runs). A bug is not a
  user error and keeps its traceback; so does everything when PTALIGN_DEBUG=1.
- `fail_point` is the test hook that interrupts a run at a named moment.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from contextlib import contextmanager


class UserError(Exception):
    """An error the user can fix; the message is one sentence naming what is wrong."""


def one_line(err: BaseException) -> str:
    """The message of an error on one line: a file name or a template's text may hold newlines."""
    return " ".join(str(err).split())


def describe_os_error(err: OSError) -> str:
    """The sentence for an OSError about a file (what open, mkdir or rename could not do): PATH: reason."""
    where = f"{err.filename} -> {err.filename2}" if err.filename2 else err.filename
    reason = err.strerror or one_line(err)
    return f"{where}: {reason.lower()}." if where else f"{reason.lower()}."


@contextmanager
def one_line_errors(interrupted: Callable[[], str]):
    """Run a command's work; a user error, an OSError or Ctrl-C ends it with one sentence and exit code 1.

    interrupted() says what the interrupted command saved and how to go on from it; it is
    asked only when Ctrl-C comes, so it can look at what is on disk by then.
    """
    try:
        yield
    except (UserError, OSError, KeyboardInterrupt) as err:
        if os.environ.get("PTALIGN_DEBUG") == "1":
            raise
        if isinstance(err, KeyboardInterrupt):
            if sys.stderr.isatty():
                print(file=sys.stderr)  # off the line a progress display was redrawing
            message = f"interrupted; {interrupted()}"
        elif isinstance(err, OSError):
            message = f"error: {describe_os_error(err)}"
        else:
            message = f"error: {one_line(err)}"
        raise SystemExit(message) from None


def fail_point(name: str) -> None:
    """Stop here if PTALIGN_FAIL_AT names this point: how the tests interrupt a run at a chosen moment.

    PTALIGN_FAIL_AT=NAME raises KeyboardInterrupt (as Ctrl-C would); NAME:kill kills the
    process outright (as SIGKILL or a power cut would: nothing gets to clean up).
    Points: "step N" (train.py, after step N is logged), "save" (model.save_pretrained, its
    files written, not yet renamed into place), "batch N" (the N-th batch of generation work
    saved by this process).
    """
    at = os.environ.get("PTALIGN_FAIL_AT")
    if at == name:
        raise KeyboardInterrupt
    if at == f"{name}:kill":
        os.kill(os.getpid(), signal.SIGKILL)
