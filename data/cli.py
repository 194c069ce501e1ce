"""Settings as dataclasses whose fields are also command-line flags: one place for each default.

A field made with `option(default, help)` carries its flag's --help (and any other
add_argument option) in its metadata; `add_flags` turns the fields of a dataclass into
--flags (--max-new-tokens for max_new_tokens), typed from the field's annotation.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, field, fields

TYPES = {"str": str, "int": int, "float": float}


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
            flag["type"] = TYPES[kind]
        if with_defaults and f.default is not MISSING:
            flag.setdefault("default", f.default)
        parser.add_argument("--" + f.name.replace("_", "-"), **flag)
