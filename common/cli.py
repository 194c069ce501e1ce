"""Settings as dataclasses whose fields are also command-line flags: one place for each default and each range.

A field made with `option(default, help)` carries its flag's --help (and any other
add_argument option, such as type=POSITIVE) in its metadata; `add_flags` turns the fields
of a dataclass into --flags (--max-new-tokens for max_new_tokens), typed from the field's
annotation unless the field names a type of its own. The number types below check a value
as argparse reads it, so a bad one is a usage error naming the flag and the value (exit
code 2) before anything runs; `Parser` says it in one line.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, field, fields

TYPES = {"str": str, "int": int, "float": float}


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: `PROG: error: argument --flag: ... (see --help)`, exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def number(kind: type, low: float = -math.inf, high: float = math.inf, low_open: bool = False):
    """An argparse type: a finite int or float in [low, high] ((low, high] when low_open)."""
    name = "an integer" if kind is int else "a finite number"
    if high < math.inf:  # a range: "a number in (0, 1]"
        wanted = f"{name.replace('finite ', '')} in {'(' if low_open else '['}{low:g}, {high:g}]"
    elif low > -math.inf:  # a bound: "an integer >= 1"
        wanted = f"{name} {'>' if low_open else '>='} {low:g}"
    else:
        wanted = name

    def parse(text: str):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if not math.isfinite(x) or x < low or (low_open and x == low) or x > high:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return x

    parse.__name__ = wanted  # what argparse calls the type in its own messages
    return parse


COUNT = number(int, 0)  # 0, 1, 2, ...
POSITIVE = number(int, 1)  # 1, 2, ...
FINITE = number(float)
NON_NEGATIVE = number(float, 0)
POSITIVE_FLOAT = number(float, 0, low_open=True)
PROBABILITY = number(float, 0, 1)  # [0, 1]
FRACTION = number(float, 0, 1, low_open=True)  # (0, 1]: a share that cannot be nothing


def option(default, help: str, **flag):
    """A field with its default and its flag's help; the help ends with the default unless it says it."""
    if "default" not in help and not isinstance(default, bool):
        help += f" (default: {default})"
    return field(default=default, metadata=dict(flag, help=help))


def add_flags(parser: argparse.ArgumentParser, config_class, names=None, with_defaults: bool = True) -> None:
    """One flag per field of `config_class` (or per field named in `names`).

    with_defaults=False leaves the parser's own default (e.g. argparse.SUPPRESS, so a caller
    can tell a flag not given from one given with the default value, as presets need).
    Metadata keys that are not add_argument options (e.g. "presets") are left out.
    """
    for f in fields(config_class):
        if names is not None and f.name not in names:
            continue
        flag = {k: v for k, v in f.metadata.items() if k != "presets"}
        kind = f.type.removesuffix(" | None")  # the annotation as text (from __future__ import annotations)
        if kind == "bool":
            flag.setdefault("action", "store_true")
        else:
            flag.setdefault("type", TYPES[kind])
        if with_defaults and f.default is not MISSING:
            flag.setdefault("default", f.default)
        parser.add_argument("--" + f.name.replace("_", "-"), **flag)
