"""What a run tells its user while it works: log lines, and a progress line with an ETA.

Both go to stderr, so stdout carries only what a command prints as its result (a table, the
records shown). Each stage formats its own progress line (training shows the loss, generation
the records written); the arithmetic of the bar, the time so far and the ETA is here, once.
"""

from __future__ import annotations

import sys
import time


def log(text: str) -> None:
    """A line for the user on stderr (stdout carries only a command's result)."""
    print(text, file=sys.stderr)


class Progress:
    """Work done out of a run's total, in any unit (optimizer steps, weighted model calls), with
    the time so far and the ETA at the pace so far.

    `done` is work an earlier run already did (a resumed run): it fills the bar but does not
    count towards the pace. With redraw, `show` redraws the line in place on a terminal; into a
    file or a pipe every line is printed.
    """

    def __init__(self, total: float, done: float = 0.0, redraw: bool = False):
        self.total, self.done, self.start = total, done, done
        self.t0 = time.perf_counter()
        self.redraw = redraw and sys.stderr.isatty()

    def advance(self, work: float) -> None:
        self.done += work

    def bar(self, width: int) -> str:
        """The share done as a bar of `width` characters: [#####     ]."""
        return f"[{'#' * int(width * self.done / max(self.total, 1e-9)):<{width}}]"

    def times(self) -> tuple[float, float]:
        """(seconds so far, seconds left at the pace so far)."""
        elapsed = time.perf_counter() - self.t0
        return elapsed, elapsed / max(self.done - self.start, 1e-9) * max(self.total - self.done, 0.0)

    def show(self, line: str) -> None:
        if self.redraw:
            print("\r" + line + "\033[K", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        """End a redrawn line, so what follows starts on its own."""
        if self.redraw:
            print(file=sys.stderr)
