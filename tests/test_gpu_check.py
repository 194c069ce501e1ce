"""The GPU check's own pieces, on the CPU: its dataset is a valid dual dataset and its
train.py command line is one train.py accepts (the GPU stages themselves need CUDA)."""

from data.dataset import load_records
from kernels.gpu_check import commands, smoke_dataset
from train_config import parse_args


def test_smoke_dataset_is_a_dual_dataset(tmp_path):
    n = smoke_dataset(tmp_path / "smoke.jsonl")
    records = load_records(tmp_path / "smoke.jsonl")
    assert n == len(records) >= 20
    assert all(r["toxic"][s:e] for r in records for s, e in r["spans"])


def test_train_command_is_a_20_step_bf16_run(tmp_path):
    command = commands(tmp_path, None)["train"]
    assert command[1] == "train.py"
    cfg = parse_args(command[2:])
    assert (cfg.max_steps, cfg.precision, cfg.skip_eval) == (20, "bf16", True)
    assert cfg.data == str(tmp_path / "smoke.jsonl")
