"""The GPU check's own pieces, on the CPU: its dataset is a valid dual dataset and its
train.py command line is one train.py accepts (the GPU stages themselves need CUDA)."""

from data.dataset import load_records
from kernels.gpu_check import commands, run_stage, smoke_dataset
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


def test_a_stage_past_its_limit_is_stopped_and_the_check_goes_on(tmp_path):
    code, seconds = run_stage(
        "hang", ["python3", "-c", "print('started', flush=True); import time; time.sleep(30)"], tmp_path, 1
    )
    assert code == 124 and seconds < 20
    assert (tmp_path / "hang.log").read_text() == "started\n"
    assert run_stage("fine", ["python3", "-c", "print('done')"], tmp_path, 10)[0] == 0
