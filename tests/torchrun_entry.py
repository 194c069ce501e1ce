"""What tests/test_distributed.py launches under torchrun: train.py's or ptalign.py's main,
set up the way the in-process tests set them up. Not a test itself.

    python -m torch.distributed.run --nproc_per_node 2 tests/torchrun_entry.py train --model DIR ...
    python -m torch.distributed.run --nproc_per_node 2 tests/torchrun_entry.py ptalign generate ...

- the fused loss runs its PyTorch twin, as in tests/test_train.py (the Triton interpreter
  would take seconds a step at the real vocabulary);
- a random model's replies become questions, as in tests/test_ptalign.py;
- PTALIGN_TEST_NAN=RANK:CALL makes that rank's CALL-th loss NaN (a fault on one rank only).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels is imported (tests/conftest.py)

import torch  # noqa: E402

import commands  # noqa: E402
import kernels.pt_loss  # noqa: E402
import ptalign  # noqa: E402
import train  # noqa: E402


def nan_at(rank: int, call: int):
    """The fused loss, NaN at this rank's call-th call."""
    loss_fn, calls = train.fused_linear_pt_loss, []

    def loss(*args, **kwargs):
        calls.append(1)
        value, parts = loss_fn(*args, **kwargs)
        if int(os.environ["RANK"]) == rank and len(calls) == call:
            value = value * float("nan")
        return value, parts

    return loss


def main(command: str, argv: list[str]) -> None:
    kernels.pt_loss._uses_triton = lambda x: x.is_cuda
    torch.set_num_threads(1)
    if os.environ.get("PTALIGN_TEST_NAN"):
        train.fused_linear_pt_loss = nan_at(*map(int, os.environ["PTALIGN_TEST_NAN"].split(":")))
    if command == "train":
        train.main(argv)
    else:
        from test_ptalign import question_from_reply

        ptalign.clean_question = question_from_reply
        commands.main(argv)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
