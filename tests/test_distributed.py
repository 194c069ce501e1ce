"""torchrun on CPU processes (gloo), two of them, against one process: the distributed path
(distributed.py) computes what python train.py / ptalign.py compute.

Each test launches `python -m torch.distributed.run --standalone --nproc_per_node 2` on
tests/torchrun_entry.py (train.py's or ptalign.py's main, set up as the in-process tests set
them up) and compares with the same command run in this process on one thread:

- FSDP2 full fine-tuning, 2 processes x batch 2 = 1 process x batch 4 (losses, final weights),
  and its gathered OUT/final loads in transformers with our logits; the same for LoRA, and
  with the decision loss;
- a NaN on rank 1 stops both ranks with one message and the last sharded checkpoint whole,
  which one process then resumes to the uninterrupted run's weights;
- generation on 2 ranks, resuming a torn file, writes the records one process writes;
- evaluation on 2 ranks reports what one process reports.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import test_train
import torch
import transformers
from safetensors.torch import load_file
from test_ptalign import generate_argv, generate_cli
from test_train import run_train, steps_of

import commands
import lora
from model import Transformer

# test_train's fixtures: its tiny 2-layer Llama, its 4-record dataset, the loss on one thread.
tiny_dir, data4, loss_in_pytorch = test_train.tiny_dir, test_train.data4, test_train.loss_in_pytorch

ROOT = Path(__file__).resolve().parent.parent
# A step is 4 examples (8 examples: 2 steps an epoch, 4 in all); one process takes them as one
# micro-batch of 4, two take 2 each.
TRAIN = ("--skip-eval", "--preset", "cpu", "--lr", "1e-2", "--epochs", "2")


def torchrun(*argv, env=None) -> subprocess.CompletedProcess:
    """tests/torchrun_entry.py on two CPU processes; its exit code and output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(ROOT / "tests" / "torchrun_entry.py"), *map(str, argv)]
    env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def train_two(tiny_dir, data, out, *flags, env=None):
    """train.py on two processes of 2 rows each."""
    argv = ["train", "--model", tiny_dir, "--data", data, "--out", out, *TRAIN, "--batch-size", "2", *flags]
    return torchrun(*argv, env=env)


def weights(out) -> dict:
    return load_file(Path(out) / "final" / "model.safetensors")


def assert_same_run(a, b) -> None:
    """Two runs' losses per step and final weights, equal up to fp32 summation order."""
    assert [m["step"] for m in steps_of(a)] == [m["step"] for m in steps_of(b)] == [1, 2, 3, 4]
    for x, y in zip(steps_of(a), steps_of(b)):
        assert (x["n_mle"], x["n_ut"]) == (y["n_mle"], y["n_ut"])
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-8)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:  # four AdamW steps at lr 1e-2: the summation order shows at about 1e-5
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.fixture(scope="module")
def one_process(tiny_dir, data4, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    run_train(tiny_dir, data4, out, *TRAIN, "--batch-size", "4")
    return out


# -----------------------------------------------------------------------------
# Training


def test_fsdp_two_processes_equal_one_and_final_loads_in_transformers(tiny_dir, data4, one_process, tmp_path):
    result = train_two(tiny_dir, data4, tmp_path, "--save-every", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("step 4/4") == 1  # rank 0 alone reports
    assert_same_run(one_process, tmp_path)
    state = torch.load(tmp_path / "ckpt" / "trainer_state.pt", weights_only=True)
    assert state["sharded"] and state["world_size"] == 2 and state["step"] == 3
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    final = tmp_path / "final"
    ids = torch.tensor([[1, 504, 2914, 28, 4127, 17, 2]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(Transformer.from_pretrained(final)(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    assert (final / "tokenizer.json").is_file() and not list(tmp_path.glob(".*tmp*"))


def test_lora_two_processes_equal_one(tiny_dir, tmp_path):
    """LoRA on 5 examples: each epoch's second micro-batch has one row, so rank 0 has none (it
    runs a row with no target, since every rank joins every collective)."""
    anchor = {"id": "a0", "kind": "anchor", "question": "What soup is easy?", "positive": "Tomato soup is easy."}
    data = test_train.write_jsonl(tmp_path / "d5.jsonl", [*test_train.RECORDS[:2], anchor])
    run_train(tiny_dir, data, tmp_path / "one", *TRAIN, "--batch-size", "4", "--lora-rank", "4")
    result = train_two(tiny_dir, data, tmp_path / "two", "--lora-rank", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "two")
    before, after = load_file(tiny_dir / "model.safetensors"), weights(tmp_path / "two")
    for name in before:  # adapters merged into the projections; every other weight as it was
        changed = not torch.equal(before[name], after[name])
        assert changed == (name.split(".")[-2] in lora.LORA_TARGETS), name


def test_decision_loss_two_processes_equal_one(tiny_dir, tmp_path):
    """The decision loss (on in the presets, given anchor records) under FSDP2: each rank scores
    its share of the step's 3 + 3 questions, and the run is one process's."""
    anchors = [("What soup is easy?", "Tomato soup."), ("Name a fruit.", "An apple."), ("Is tea hot?", "Often.")]
    anchors = [{"id": f"a{i}", "kind": "anchor", "question": q, "positive": a} for i, (q, a) in enumerate(anchors)]
    data = test_train.write_jsonl(tmp_path / "d.jsonl", [*test_train.RECORDS, *anchors])
    flags = ("--decision-questions", "3", "--max-steps", "4")
    run_train(tiny_dir, data, tmp_path / "one", *TRAIN, "--batch-size", "4", *flags)
    result = train_two(tiny_dir, data, tmp_path / "two", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "two")
    for x, y in zip(steps_of(tmp_path / "one"), steps_of(tmp_path / "two")):
        assert x["decision"] > 0 and x["decision"] == pytest.approx(y["decision"], rel=1e-5)


def test_nan_on_one_rank_stops_both_and_one_process_resumes(tiny_dir, data4, one_process, tmp_path):
    """Rank 1's loss is NaN at step 3: both ranks stop before the update, one message is printed,
    the sharded checkpoint of step 2 is whole; python train.py --resume continues it with one
    process of 4 rows and ends where the uninterrupted run ends."""
    result = train_two(tiny_dir, data4, tmp_path, "--save-every", "1", env={"PTALIGN_TEST_NAN": "1:3"})
    assert result.returncode != 0
    message = r"non-finite loss at step 3 "
    assert result.stderr.count(message) == 1, result.stderr[-3000:]
    assert f"kept at {tmp_path / 'ckpt'} (step 2)" in result.stderr
    state = torch.load(tmp_path / "ckpt" / "trainer_state.pt", weights_only=True)
    assert state["sharded"] and state["step"] == 2
    assert not (tmp_path / "final").exists() and not list(tmp_path.glob(".ckpt.tmp-*"))
    assert [m["step"] for m in steps_of(tmp_path)] == [1, 2]
    run_train(tiny_dir, data4, tmp_path, *TRAIN, "--batch-size", "4", "--resume")
    assert_same_run(one_process, tmp_path)


# -----------------------------------------------------------------------------
# Generation and evaluation


def test_generation_on_two_ranks_writes_the_records_of_one(tiny_dir, tmp_path):
    """Chunks of one question (and of one anchor question) dealt to two ranks, resuming a file
    cut in the middle of its second record: byte for byte the file of one uninterrupted process."""
    extra = ("--request-threshold", "0.5", "--anchors", "2")
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    err = generate_cli(tiny_dir, one, 1, extra=extra)
    assert err is None or "no usable record" in err, err
    first, second = one.read_text().splitlines(keepends=True)[:2]
    two.write_text(first + second[: len(second) // 2])
    result = torchrun("ptalign", *generate_argv(tiny_dir, two, 1, extra=extra))
    assert two.read_text() == one.read_text()
    assert len(one.read_text().splitlines()) == 4
    assert (result.returncode == 0) == (err is None), result.stderr[-3000:]


def test_evaluation_on_two_ranks_equals_one(tiny_dir, data4, tmp_path):
    argv = ["eval", "--model", tiny_dir, "--limit", "5", "--max-new-tokens", "4", "--batch-size", "2"]
    argv += ["--dataset", data4]
    commands.main([*map(str, argv), "--out", str(tmp_path / "one.json")])
    result = torchrun("ptalign", *argv, "--out", tmp_path / "two.json")
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{x}.json").read_text()) for x in ("one", "two"))
    assert one.pop("seconds") > 0 and two.pop("seconds") > 0
    assert one == two and one["n_harmful"] == 5 and one["n_pairs"] == 4
    assert result.stdout.count("| harmful_refusal_rate |") == 1  # the table from rank 0 alone
