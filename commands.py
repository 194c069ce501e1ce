"""`python ptalign.py COMMAND`: generate and show (the dual dataset), eval, compare and spans
(the scoreboard).

The command line sits above both halves it serves: the method (ptalign.py, records.py) and the
evaluation (evaluation.py), which uses the method's judge and span finders. So neither module
imports the other's commands; ptalign.py hands over to main() when it is the program.
"""

from __future__ import annotations

from dataclasses import fields

import distributed
import evaluation
from common.cli import POSITIVE, Parser, add_flags
from common.errors import one_line_errors
from common.files import check_output_file
from generate_config import GenerateConfig
from ptalign import run_generate
from records import saved_work, show


def build_parser() -> Parser:
    p = Parser(description="PT-ALIGN: self-generated dual safety data, and evaluation.")
    sub = p.add_subparsers(dest="command", required=True)
    add_flags(sub.add_parser("generate", help="build a dual dataset (JSONL) from the seed annotations"), GenerateConfig)

    s = sub.add_parser("show", help="print a dataset's records with the harmful spans highlighted")
    s.add_argument("file", help="dataset JSONL written by generate")
    s.add_argument("--limit", type=POSITIVE, default=None, help="show only the first N records")

    evaluation.add_commands(sub, lambda q: add_flags(q, GenerateConfig, ("model", "device", "dtype", "batch_size")))
    return p


def interrupted(args) -> str:
    """The last message of an interrupted command: what it saved, and how to go on."""
    if args.command == "generate":
        return saved_work(args.out)
    return f"`{args.command}` writes its output only at the end, so nothing was written; rerun it to start again."


def main(argv=None):
    distributed.init()  # under torchrun: generate and eval split their work over the processes
    args = build_parser().parse_args(argv)
    with one_line_errors(lambda: interrupted(args)):
        for flag in ("out", "png"):  # every output path, checked before any model loads
            if getattr(args, flag, None):
                check_output_file(getattr(args, flag), "--" + flag)
        if args.command == "generate":
            run_generate(GenerateConfig(**{f.name: getattr(args, f.name) for f in fields(GenerateConfig)}))
        elif args.command == "show":
            print(show(args.file, args.limit))
        else:
            args.run(args)  # eval, compare and spans (evaluation.py)
