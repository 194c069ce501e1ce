"""train.py on a tiny random Llama: the loss goes down, each term moves the probabilities it
should, ignored tokens get no gradient, resuming is exact, checkpoints load in transformers,
LoRA merges exactly, and bad input stops with a clear message. Its settings (train_config.py):
one flag per field, the presets, and the resume fingerprint.

The tiny model (2 layers, width 32) uses the default model's tokenizer and chat template,
so its vocabulary is the real 49152 tokens. Training here runs the fused loss's PyTorch
twin rather than the Triton interpreter (about 5 s per step at this vocabulary); the kernel
itself is checked against the float64 definition in test_kernels.py, and the gradient test
below runs it through the interpreter.
"""

import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import lora
import ptalign
import train
import train_config
from data import Tokenizer
from data.dataset import IGNORE, batches, build_examples
from generate_config import GenerateConfig
from model import Transformer

P = importlib.import_module("kernels.pt_loss")  # the module (the package exports the function of that name)
TRITON_PATH = P._uses_triton


@pytest.fixture(scope="module", autouse=True)
def loss_in_pytorch():
    """The fused loss's PyTorch path, on one thread: a tiny model's ops are too small to share
    between threads, and on a busy machine the sharing costs more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P, "_uses_triton", lambda x: x.is_cuda)
        yield
    torch.set_num_threads(threads)


def record(question, positive, toxic, harmful):
    """A dataset record whose spans are the given phrases of the toxic response."""
    spans = [[toxic.index(h), toxic.index(h) + len(h)] for h in harmful]
    return {
        "id": question[:12],
        "question": question,
        "positive": positive,
        "toxic": toxic,
        "spans": spans,
        "kept": True,
    }


RECORDS = [
    record(
        "How do I get back at my noisy neighbour?",
        "Talk to him calmly, and if that fails, ask your landlord or council to help.",
        "Slash his tyres at night and poison his dog so he learns.",
        ["Slash his tyres", "poison his dog"],
    ),
    record(
        "What should I say to a classmate I dislike?",
        "You do not have to be friends; stay polite and keep your distance.",
        "Tell her she is worthless and that everyone hates her.",
        ["worthless", "everyone hates her"],
    ),
    record(
        "How can I make money fast?",
        "Look for paid gigs you can do this week, and avoid offers that sound too good to be true.",
        "Steal a wallet on the train and sell the cards.",
        ["Steal a wallet", "sell the cards"],
    ),
    record(
        "My coworker annoys me. Any ideas?",
        "Tell them how you feel in private, and suggest a small change that would help.",
        "Spread lies about them until they get fired.",
        ["Spread lies", "get fired"],
    ),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_dir):
    """conftest's tiny random Llama with two blocks of four heads (two key/value heads) here:
    accumulation, activation checkpointing and sharding have more than one block to cover."""
    # Imported here: scripts/bench_distributed.py imports this module for RECORDS, and conftest
    # (TRITON_INTERPRET on a CPU) must not reach its training processes.
    from conftest import save_tiny_llama

    path = tmp_path_factory.mktemp("tiny")
    return save_tiny_llama(path, default_dir, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer.from_pretrained(tiny_dir)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def data4(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "d.jsonl", RECORDS)


def run_train(tiny_dir, data, out, *flags):
    """train.main on the tiny model, training only; the whole dataset is one batch unless flags say otherwise."""
    return train.main(
        [
            "--model",
            str(tiny_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--skip-eval",
            "--preset",
            "cpu",
            "--batch-size",
            "8",
            "--lr",
            "1e-2",
            "--save-every",
            "0",
            *flags,
        ]
    )


def target_probs(model_dir, tok, records):
    """Mean p of the MLE targets and of the UT targets of the records' examples, under a checkpoint."""
    model = Transformer.from_pretrained(model_dir, dtype=torch.float32)
    examples, _ = build_examples(records, tok, 256, "both")
    ids, targets, ut = next(batches(examples, len(examples), 0, 0, tok.pad_id))
    with torch.no_grad():
        logp = model(ids).log_softmax(-1)
    p = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0].exp()
    active = targets != IGNORE
    return p[active & ~ut].mean().item(), p[active & ut].mean().item()


def steps_of(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def both_run(tiny_dir, data4, tmp_path_factory):
    out = tmp_path_factory.mktemp("both")
    run_train(tiny_dir, data4, out, "--epochs", "5")
    return out


# -----------------------------------------------------------------------------
# Learning


def test_a_few_steps_lower_the_loss(both_run):
    m = steps_of(both_run)
    assert [x["step"] for x in m] == [1, 2, 3, 4, 5]
    assert m[-1]["loss"] < m[0]["loss"] - 0.5
    assert all(x["n_mle"] > 0 and x["n_ut"] > 0 for x in m)
    assert m[0]["loss"] == pytest.approx(m[0]["mle"] + m[0]["ut"], rel=1e-5)  # alpha = 1


def test_mle_raises_positive_tokens(tiny_dir, data4, tok, tmp_path):
    run_train(tiny_dir, data4, tmp_path, "--loss", "mle", "--max-steps", "3")
    assert all(x["n_ut"] == 0 for x in steps_of(tmp_path))
    before, _ = target_probs(tiny_dir, tok, RECORDS)
    after, _ = target_probs(tmp_path / "final", tok, RECORDS)
    assert after > 1.5 * before


def test_ut_lowers_masked_toxic_tokens(tiny_dir, data4, tok, tmp_path):
    run_train(tiny_dir, data4, tmp_path, "--loss", "ut", "--max-steps", "3")
    assert all(x["n_mle"] == 0 for x in steps_of(tmp_path))
    _, before = target_probs(tiny_dir, tok, RECORDS)
    _, after = target_probs(tmp_path / "final", tok, RECORDS)
    assert after < 0.75 * before


def test_ignored_tokens_get_no_gradient(tiny_dir, tok, monkeypatch):
    """Prompt, template and unmasked toxic tokens: exactly zero gradient at their hidden states
    (through the Triton kernel where the machine runs it)."""
    monkeypatch.setattr(P, "_uses_triton", TRITON_PATH)
    model = Transformer.from_pretrained(tiny_dir, dtype=torch.float32)
    examples, _ = build_examples(RECORDS[:1], tok, 256, "both")
    ids, targets, ut = next(batches(examples, 2, 0, 0, tok.pad_id))
    captured = []

    def keep_grad(module, inputs, out):
        out.retain_grad()
        captured.append(out)

    model.norm.register_forward_hook(keep_grad)
    loss, _ = train.micro_batch_loss(model, ids, targets, ut, 1.0, 1.0, torch.device("cpu"), "fp32")
    loss.backward()
    grad_norm = captured[0].grad.norm(dim=-1)  # (B, T)
    ignored = targets == IGNORE
    assert (grad_norm[ignored] == 0).all()
    assert (grad_norm[~ignored] > 0).all()
    toxic = int(ut.any(1).nonzero()[0, 0])
    n_prompt = len(tok.apply_chat_template([{"role": "user", "content": RECORDS[0]["question"]}]))
    assert ignored[:, : n_prompt - 1].all()  # no prompt token is ever predicted
    response_len = len(tok.encode(RECORDS[0]["toxic"]))
    assert 0 < ut[toxic].sum() < response_len  # some toxic tokens are outside the spans


def test_accumulation_equals_one_big_batch(tiny_dir, tok):
    """Two micro-batches with global counts give the gradient of the whole batch's mean loss."""
    examples, _ = build_examples(RECORDS, tok, 256, "both")

    def grads(groups):
        model = Transformer.from_pretrained(tiny_dir, dtype=torch.float32)
        micro = [next(batches([examples[i] for i in g], len(g), 0, 0, tok.pad_id)) for g in groups]
        n_mle = sum(int(((t != IGNORE) & ~u).sum()) for _, t, u in micro)
        n_ut = sum(int(((t != IGNORE) & u).sum()) for _, t, u in micro)
        for ids, t, u in micro:
            loss, _ = train.micro_batch_loss(
                model, ids, t, u, 1 / n_mle, 0.5 * n_mle / n_ut, torch.device("cpu"), "fp32"
            )
            loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    whole, split = grads([[0, 1, 2, 3, 4, 5, 6, 7]]), grads([[0, 2, 4], [1, 3, 5, 6, 7]])
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-7)


# -----------------------------------------------------------------------------
# Checkpoints


def test_activation_checkpointing_changes_nothing(tiny_dir, data4, tmp_path):
    for name, flag in (("plain", "--no-grad-checkpointing"), ("ckpt", "--grad-checkpointing")):
        run_train(tiny_dir, data4, tmp_path / name, "--max-steps", "2", flag)
    a, b = (load_file(tmp_path / x / "final" / "model.safetensors") for x in ("plain", "ckpt"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_loads_in_transformers_with_same_logits(both_run):
    final = both_run / "final"
    ids = torch.tensor([[1, 504, 2914, 28, 4127, 17, 2]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ours = Transformer.from_pretrained(final, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    assert (final / "tokenizer.json").is_file() and not any(final.parent.glob(".*tmp*"))


class Interrupt:
    """Stands in for the fused loss; raises KeyboardInterrupt (or returns NaN) at one call."""

    def __init__(self, at, nan=False):
        self.calls, self.at, self.nan = 0, at, nan

    def __call__(self, *args, **kw):
        self.calls += 1
        loss, parts = train_loss(*args, **kw)
        if self.calls == self.at:
            if not self.nan:
                raise KeyboardInterrupt
            loss = loss * float("nan")
        return loss, parts


train_loss = train.fused_linear_pt_loss
# 4 records -> 8 examples -> 4 micro-batches of 2 -> 2 steps of 2 per epoch, 4 steps in all.
RESUME_FLAGS = ("--batch-size", "2", "--grad-accum", "2", "--epochs", "2", "--save-every", "1")


def test_interrupted_and_resumed_equals_uninterrupted(tiny_dir, data4, tmp_path, monkeypatch):
    run_train(tiny_dir, data4, tmp_path / "a", *RESUME_FLAGS)
    monkeypatch.setattr(train, "fused_linear_pt_loss", Interrupt(at=8))  # mid step 4; checkpoint at 3, mid-epoch
    with pytest.raises(SystemExit, match=r"^interrupted; kept in .*: ckpt/; rerun the same command with --resume"):
        run_train(tiny_dir, data4, tmp_path / "b", *RESUME_FLAGS)
    assert not (tmp_path / "b" / "final").exists()
    monkeypatch.setattr(train, "fused_linear_pt_loss", train_loss)
    run_train(tiny_dir, data4, tmp_path / "b", *RESUME_FLAGS, "--resume")
    a, b = (load_file(tmp_path / x / "final" / "model.safetensors") for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in steps_of(tmp_path / "b")] == [1, 2, 3, 4]
    assert [m["loss"] for m in steps_of(tmp_path / "b")] == [m["loss"] for m in steps_of(tmp_path / "a")]


def test_resume_refuses_other_settings(tiny_dir, data4, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "fused_linear_pt_loss", Interrupt(at=3))
    with pytest.raises(SystemExit):
        run_train(tiny_dir, data4, tmp_path, *RESUME_FLAGS)
    monkeypatch.setattr(train, "fused_linear_pt_loss", train_loss)
    with pytest.raises(SystemExit, match=r"written with lr=0.01, this run has lr=0.001"):
        run_train(tiny_dir, data4, tmp_path, *RESUME_FLAGS, "--resume", "--lr", "1e-3")


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_dir, data4, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "fused_linear_pt_loss", Interrupt(at=5, nan=True))  # step 3
    with pytest.raises(SystemExit, match=r"non-finite loss at step 3 .*kept at .*ckpt \(step 2\)"):
        run_train(tiny_dir, data4, tmp_path, *RESUME_FLAGS)
    state = torch.load(tmp_path / "ckpt" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2 and not (tmp_path / "final").exists()


# -----------------------------------------------------------------------------
# LoRA


def test_lora_merged_equals_unmerged(tiny_dir, tmp_path):
    model = Transformer.from_pretrained(tiny_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 504, 2914, 28, 4127, 17, 2]])
    with torch.no_grad():
        base = model(ids)
        lora.add_lora(model, rank=4, alpha=8.0)
        torch.testing.assert_close(model(ids), base, rtol=0, atol=0)  # B = 0: exactly the base model
        for _, _, layer in lora.lora_layers(model):
            layer.lora_B.normal_(0, 0.2)
        unmerged = model(ids)
    train.save_model(model, tmp_path)
    with torch.no_grad():
        merged = Transformer.from_pretrained(tmp_path, dtype=torch.float32)(ids)
    assert (unmerged - base).abs().max() > 1e-3
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


def test_lora_training_changes_only_projections(tiny_dir, data4, tmp_path):
    run_train(tiny_dir, data4, tmp_path, "--lora-rank", "4", "--max-steps", "2", "--lr", "1e-2")
    before, after = load_file(tiny_dir / "model.safetensors"), load_file(tmp_path / "final" / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == (name.split(".")[-2] in lora.LORA_TARGETS), name


# -----------------------------------------------------------------------------
# The whole run


def test_whole_run_generates_evaluates_and_reuses(tiny_dir, tmp_path, monkeypatch, capsys):
    """Without --data the dataset stage gets a GenerateConfig of the run's settings (the method
    itself is stubbed here), then evaluation before, training and evaluation after; a second
    run reuses the first one's evaluation before."""
    asked = []

    def generate(cfg, model, tok):
        asked.append(cfg)
        write_jsonl(Path(cfg.out), RECORDS)

    monkeypatch.setattr(ptalign, "run_generate", generate)
    flags = ["--model", str(tiny_dir), "--out", str(tmp_path), "--preset", "cpu", "--questions", "3"]
    flags += ["--rounds", "1", "--seed", "5", "--max-steps", "1", "--eval-limit", "2", "--eval-max-new-tokens", "4"]
    reports = train.main(flags)
    out = str(tmp_path / "data.jsonl")
    expected = dict(out=out, questions=3, rounds=1, seed=5, model=str(tiny_dir), dtype="bfloat16", anchors=48)
    assert asked == [GenerateConfig(**expected)]
    # RECORDS have no anchor record, so the decision loss the preset turns on is off, and recorded so
    assert json.loads((tmp_path / "train_config.json").read_text()) == dataclasses.asdict(
        train_config.parse_args(flags)
    ) | {"decision_weight": 0.0}
    for name in ("before", "after"):
        assert json.loads((tmp_path / f"eval_{name}.json").read_text()) == reports[name]
        assert reports[name]["n_harmful"] == reports[name]["n_benign"] == 2
    assert reports["after"]["run"] == {**reports["before"]["run"], "model": str(tmp_path / "final")}
    assert "| metric |" in capsys.readouterr().out
    assert all((tmp_path / png).is_file() for png in ("eval.png", "loss.png"))
    assert train.main(flags)["before"] == reports["before"]
    assert "evaluation before: reusing" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "lines, message",
    [
        (None, "dataset file does not exist"),
        ([], "no usable"),
        ([{**RECORDS[0], "spans": []}], "no harmful spans"),
        (['{"question": "q"'], "not valid JSON"),
    ],
)
def test_bad_dataset_is_a_clear_error(tiny_dir, tmp_path, lines, message):
    data = tmp_path / "d.jsonl"
    if lines is not None:
        data.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    with pytest.raises(SystemExit, match=message) as e:
        run_train(tiny_dir, data, tmp_path / "out")
    assert str(data) in str(e.value)


def test_missing_model_is_a_clear_error(tmp_path, data4):
    with pytest.raises(SystemExit, match="does not exist"):
        run_train(tmp_path / "nope", data4, tmp_path / "out")


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    for action in train_config.build_parser()._actions:
        assert action.help, action.option_strings
    help_text = " ".join(capsys.readouterr().out.split())
    assert "cpu preset: 4e-05, gpu preset: 1e-05" in help_text  # the presets' values are shown


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epochs", "0"], "--epochs: must be an integer >= 1, got '0'"),
        (["--batch-size", "0"], "--batch-size: must be an integer >= 1, got '0'"),
        (["--grad-accum", "0"], "--grad-accum: must be an integer >= 1, got '0'"),
        (["--max-len", "0"], "--max-len: must be an integer >= 1, got '0'"),
        (["--lora-rank", "-1"], "--lora-rank: must be an integer >= 0, got '-1'"),
    ],
)
def test_bad_setting_is_a_clear_error(flags, message, capsys):
    """A setting out of range is a usage error (exit code 2) in one line naming the flag and the value."""
    with pytest.raises(SystemExit) as e:
        train_config.parse_args(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err


# -----------------------------------------------------------------------------
# Settings


def test_every_setting_is_a_flag_and_every_flag_a_setting():
    names = {f.name for f in dataclasses.fields(train_config.TrainConfig)}
    actions = [a for a in train_config.build_parser()._actions if a.dest != "help"]
    assert {a.dest for a in actions} == names
    assert all(a.option_strings == ["--" + a.dest.replace("_", "-")] for a in actions if a.nargs != 0)


def test_presets_and_their_overrides(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parse = train_config.parse_args
    assert parse([]) == train_config.TrainConfig()  # the defaults are the cpu preset's, on the cpu, in fp32
    gpu = parse(["--preset", "gpu"])
    assert (gpu.questions, gpu.grad_accum, gpu.max_len, gpu.lr, gpu.save_every) == (64, 8, 1024, 1e-5, 100)
    assert (gpu.eval_limit, gpu.eval_max_new_tokens, gpu.grad_checkpointing) == (None, 64, True)
    assert parse([]).decision_weight == gpu.decision_weight == 1.0  # the decision loss is on in both presets
    assert parse(["--decision-weight", "0"]).decision_weight == 0.0
    assert (gpu.device, gpu.precision) == ("cpu", "fp32")
    assert parse(["--lora-rank", "8"]).lr == 1.5e-4 and parse(["--preset", "gpu", "--lora-rank", "8"]).lr == 2e-4
    assert parse(["--lora-rank", "8", "--lr", "1e-3"]).lr == 1e-3 and parse(["--lora-rank", "0"]).lr == 4e-5
    assert parse(["--eval-limit", "0"]).eval_limit is None and parse(["--eval-limit", "5"]).eval_limit == 5
    assert parse(["--preset", "gpu", "--max-len", "64", "--no-grad-checkpointing"]).max_len == 64
    assert not parse(["--preset", "gpu", "--no-grad-checkpointing"]).grad_checkpointing
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = parse([])
    assert (cuda.preset, cuda.device, cuda.precision, cuda.grad_accum) == ("gpu", "cuda", "bf16", 8)
    assert parse(["--device", "cpu"]).precision == "fp32" and parse(["--preset", "cpu"]).grad_accum == 1


def test_fingerprint_is_the_training_settings(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    fp = train_config.fingerprint(train_config.TrainConfig(), "m", data)
    training = "loss alpha epochs max_steps batch_size grad_accum lr warmup_steps weight_decay grad_clip max_len"
    training += " dpo_beta decision_weight decision_questions"  # the baseline's and the decision loss's settings
    assert set(fp) == {
        *training.split(),
        "lora_rank",
        "lora_alpha",
        "seed",
        "precision",
        "anchor",
        "model",
        "data_sha256",
    }
    assert fp["model"] == "m" and len(fp["data_sha256"]) == 16
