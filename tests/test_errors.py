"""Every user error is one sentence and loses nothing (issue 13).

One table of what a user can get wrong on each command line (bad flags, broken checkpoints,
hostile chat templates, malformed files, output paths that cannot be written, a refused
resume), each answered with its exit code (2 for a flag, 1 for the rest), one line naming the
file, flag or value, no traceback, and every file that existed before byte for byte as it was.
Most cases call the CLI's main() in process, as the interpreter would run it; a representative
set runs the real scripts as subprocesses. Then interruptions: Ctrl-C (a real SIGINT) and
SIGKILL at chosen moments of training (PTALIGN_FAIL_AT, common/errors.py), each resumed to the
uninterrupted run's checkpoint. (The dataset stage's interruption: test_ptalign.py.)
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_ptalign
import test_train
from safetensors.torch import load_file

import commands
import generate
import kernels.bench
import train
from common.files import TEMP_NAME, remove_stale_temps, temp_path
from model import CheckpointError

# Fixtures of the other test modules: one intra-op thread, a random one-layer LLaMA with the default
# model's tokenizer, and the fused loss's PyTorch path (the Triton interpreter takes seconds a step).
one_thread, loss_in_pytorch = test_ptalign.one_thread, test_train.loss_in_pytorch
RECORDS = test_train.RECORDS
ROOT = Path(__file__).resolve().parents[1]
MAINS = {
    "generate.py": generate.main,
    "ptalign.py": commands.main,
    "train.py": train.main,
    "bench.py": kernels.bench.main,
}
TRAIN = ["--skip-eval", "--preset", "cpu", "--lr", "1e-2", "--batch-size", "8", "--save-every", "0"]


# -----------------------------------------------------------------------------
# Running a command line and reading what it left


def run_in_process(script: str, argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """(exit code, stderr, stdout) of `python SCRIPT ARGV`, run through its main() as the interpreter would."""
    monkeypatch.setattr(sys, "argv", [script, *argv])  # argparse names the program after it
    capsys.readouterr()
    code = 0
    try:
        MAINS[script](argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) or e.code is None else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)  # what the interpreter prints for a SystemExit with a message
    captured = capsys.readouterr()
    return code or 0, captured.err, captured.out


def subprocess_env(**extra) -> dict:
    """The environment of a CLI run as a subprocess: the fused loss's PyTorch path (no Triton
    interpreter), one thread, so its numbers are those of the in-process runs."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PTALIGN_FAIL_AT")}
    return env | {"OMP_NUM_THREADS": "1"} | extra


def default_sigint() -> None:
    """In the child before exec: Ctrl-C as a terminal gives it. A shell's background job (`make test &`,
    some CI runners) starts with SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_subprocess(script: str, argv: list[str], **env) -> tuple[int, str, str]:
    p = subprocess.run(
        [sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, env=subprocess_env(**env)
    )
    return p.returncode, p.stderr, p.stdout


def snapshot(root: Path) -> dict[Path, bytes]:
    """Every file under root (symlinks left out: they point into the shared tiny model) and its bytes."""
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def temp_leftovers(root: Path) -> list[Path]:
    """Temporary files and directories of our writers (common.files.temp_path names) under root."""
    return [p for p in root.rglob(".*") if TEMP_NAME.fullmatch(p.name)]


def unwritable(directory: Path) -> bool:
    try:
        (directory / "probe").touch()
    except OSError:
        return True
    (directory / "probe").unlink()
    return False


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write in: a 0555 one, or /sys where root writes anyway."""
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o555)
    yield d if unwritable(d) else Path("/sys")
    d.chmod(0o755)


# -----------------------------------------------------------------------------
# What the cases start from


def model_with(tiny_dir, where: Path, file: str, content: str | None = None, template: str | None = None) -> Path:
    """A copy of the tiny model (its files linked, not copied) with one file replaced by `content`,
    or with `template` as the chat template of its tokenizer_config.json."""
    where.mkdir()
    for f in tiny_dir.iterdir():
        if f.name != file:
            (where / f.name).symlink_to(f)
    if template is not None:
        content = json.dumps(json.loads((tiny_dir / file).read_text()) | {"chat_template": template})
    (where / file).write_text(content)
    return where


def jsonl(path: Path, *lines) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def trained_out(tiny_dir, tmp_path_factory):
    """OUT of a finished training run that kept its checkpoint (2 steps, one saved), and its data."""
    d = tmp_path_factory.mktemp("trained")
    data = jsonl(d / "data.jsonl", *RECORDS)
    argv = ["--model", str(tiny_dir), "--data", str(data), "--out", str(d / "out"), *TRAIN]
    train.main(argv + ["--batch-size", "2", "--grad-accum", "2", "--max-steps", "2", "--save-every", "1"])
    return d


@pytest.fixture
def files(tiny_dir, tmp_path, read_only_dir):
    """The names a case's command line may use: {tiny}, {ro}, {tmp}, {data}, broken models, bad files."""
    record = RECORDS[0]
    names = {"tiny": tiny_dir, "ro": read_only_dir, "tmp": tmp_path, "data": jsonl(tmp_path / "data.jsonl", *RECORDS)}
    names["float_span"] = jsonl(tmp_path / "float.jsonl", {**record, "spans": [[0.0, 15]]})
    names["negative_span"] = jsonl(tmp_path / "neg.jsonl", {**record, "spans": [[-3, 4]]})
    names["no_question"] = jsonl(tmp_path / "noq.jsonl", {k: v for k, v in record.items() if k != "question"})
    names["not_object"] = jsonl(tmp_path / "list.jsonl", record, "[1, 2]")
    names["empty"] = jsonl(tmp_path / "empty.jsonl")
    names["file"] = jsonl(tmp_path / "a-file.txt", "text")
    names["report"] = tmp_path / "report.json"
    names["report"].write_text(json.dumps({"harm_score": 0.5}))
    names["long"] = " ".join(["word"] * 5000)
    for name, template in HOSTILE_TEMPLATES.items():
        names[name] = model_with(tiny_dir, tmp_path / name, "tokenizer_config.json", template=template)
    names["bad_index"] = model_with(tiny_dir, tmp_path / "bad_index", "model.safetensors.index.json", "{oops")
    names["config_list"] = model_with(tiny_dir, tmp_path / "config_list", "config.json", "[1, 2]")
    return names


def with_trained_out(names: dict, trained_out: Path) -> None:
    """{out}: a copy of a finished run's OUT, checkpoint included; {damaged}: one whose trainer_state.pt is garbage."""
    for name in ("out", "damaged"):
        names[name] = shutil.copytree(trained_out / "out", names["tmp"] / name)
    (names["damaged"] / "ckpt" / "trainer_state.pt").write_bytes(b"not a checkpoint")


HOSTILE_TEMPLATES = {
    "escape": "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # the sandbox's SecurityError
    "syntax": "{% for m in messages %}{{ m.content }",  # TemplateSyntaxError
    "huge_range": "{% for i in range(10**9) %}x{% endfor %}",  # the sandbox's OverflowError
    "raises": "{{ raise_exception('Conversation roles must alternate') }}",  # the template's own refusal
}


# -----------------------------------------------------------------------------
# The table. A flag out of range: exit code 2 and argparse's one line naming the flag, the range
# and the value. Anything else: exit code 1 and one sentence naming the file or value.
# S: run as a subprocess of the real script too.

S = True
FLAGS = [
    ("generate.py", "--top-p", "-1", r"a number in \(0, 1\]"),  # issue item 1
    ("generate.py", "--temperature", "nan", "a finite number >= 0"),
    ("generate.py", "--max-new-tokens", "-5", "an integer >= 1"),
    ("train.py", "--lr", "-1", "a finite number > 0"),  # item 8
    ("train.py", "--lr", "nan", "a finite number > 0"),
    ("train.py", "--alpha", "nan", "a finite number >= 0"),
    ("train.py", "--alpha", "inf", "a finite number >= 0"),
    ("train.py", "--max-steps", "-1", "an integer >= 1"),
    ("train.py", "--warmup-steps", "-3", "an integer >= 0"),
    ("train.py", "--grad-clip", "-1", "a finite number > 0"),
    ("train.py", "--weight-decay", "-1", "a finite number >= 0"),
    ("ptalign.py generate --out {tmp}/d.jsonl", "--batch-size", "0", "an integer >= 1"),
    ("ptalign.py generate --out {tmp}/d.jsonl", "--temperature", "-1", "a finite number >= 0"),
    ("ptalign.py generate --out {tmp}/d.jsonl", "--top-p", "2", r"a number in \(0, 1\]"),
    ("ptalign.py eval", "--limit", "-1", "an integer >= 1"),
    ("ptalign.py show {data}", "--limit", "-1", "an integer >= 1"),
    ("bench.py", "--reps", "0", "an integer >= 1"),  # python -m kernels.bench
    ("bench.py", "--v", "-5", "an integer >= 1"),
]
TRAIN_TINY = "train.py --model {tiny} --data {data} " + " ".join(TRAIN)
RESUME_TRAINED = TRAIN_TINY + " --batch-size 2 --grad-accum 2 --max-steps 2 --resume"  # trained_out's flags
TEMPLATE_FAILED = r"error: {%s}/tokenizer_config\.json: the chat template failed \(%s: .*\)\."
ERRORS = {
    # generate.py (items 1, 2, 7, 11)
    "generate: missing model": (
        "generate.py --model {tmp}/no/such/dir --prompt hi",
        r"error: {tmp}/no/such/dir: checkpoint directory does not exist\.",
        S,
    ),
    "generate: prompt longer than the context": (
        "generate.py --model {tiny} --prompt {long}",
        r"error: a prompt of 50\d\d tokens does not fit the model's context of 4096 tokens .*",
        S,
    ),
    "generate: template escapes the sandbox": (
        "generate.py --model {escape} --prompt hi",
        TEMPLATE_FAILED % ("escape", "SecurityError"),
        S,
    ),
    "generate: template syntax error": (
        "generate.py --model {syntax} --prompt hi",
        TEMPLATE_FAILED % ("syntax", "TemplateSyntaxError"),
    ),
    "generate: template huge range": (
        "generate.py --model {huge_range} --prompt hi",
        TEMPLATE_FAILED % ("huge_range", "OverflowError"),
    ),
    "generate: template raise_exception": (
        "generate.py --model {raises} --prompt hi",
        r"error: {raises}/tokenizer_config\.json: the chat template refused the messages \(Conversation roles .*\)\.",
    ),
    "generate: shard index not JSON": (
        "generate.py --model {bad_index} --prompt hi",
        r"error: {bad_index}/model\.safetensors\.index\.json: not valid JSON \(.*\)\.",
    ),
    "generate: config.json a list": (
        "generate.py --model {config_list} --prompt hi",
        r"error: {config_list}/config\.json: expected a JSON object, found a list\.",
    ),
    # train.py (items 2, 5, 9, 10, 11)
    "train: --out is a file": (
        TRAIN_TINY + " --out {file}",
        r"error: {file}: --out must name a directory, and this is a file\.",
        S,
    ),
    "train: --out read-only": (TRAIN_TINY + " --out {ro}/run", r"error: {ro}(/run)?: --out is not writable \(.*\)\."),
    "train: float span, the earlier run's files kept": (
        TRAIN_TINY + " --out {out} --data {float_span}",
        r"error: {float_span}:1: span \[0\.0, 15\] is not \[start, end\) inside the toxic response\.",
    ),
    "train: refused --resume, train_config.json kept": (
        RESUME_TRAINED + " --out {out} --lr 1e-3",
        r"error: {out}/ckpt: written with lr=0\.01, this run has lr=0\.001; .*",
        S,
    ),
    "train: damaged trainer_state.pt": (
        RESUME_TRAINED + " --out {damaged}",
        r"error: {damaged}/ckpt/trainer_state\.pt: cannot be read \(.*\); remove .* to start over\.",
    ),
    "train: template escapes the sandbox": (
        TRAIN_TINY + " --out {tmp}/run --model {escape}",
        TEMPLATE_FAILED % ("escape", "SecurityError"),
    ),
    "train: shard index not JSON": (
        TRAIN_TINY + " --out {tmp}/run --model {bad_index}",
        r"error: {bad_index}/model\.safetensors\.index\.json: not valid JSON .*",
    ),
    # ptalign.py (items 9, 10, 11); the output is checked before the missing model is noticed
    "ptalign generate: --out read-only": (
        "ptalign.py generate --model {tmp}/no-model --out {ro}/d.jsonl",
        r"error: {ro}: --out is not writable \(.*\)\.",
    ),
    "ptalign eval: --out read-only": (
        "ptalign.py eval --model {tmp}/no-model --limit 1 --out {ro}/r.json",
        r"error: {ro}: --out is not writable \(.*\)\.",
        S,
    ),
    "ptalign eval: --out a directory": (
        "ptalign.py eval --model {tmp}/no-model --limit 1 --out {tmp}",
        r"error: {tmp}: --out names a directory; give it a file name\.",
    ),
    "ptalign eval: config.json a list": (
        "ptalign.py eval --model {config_list} --limit 1",
        r"error: {config_list}/config\.json: expected a JSON object, found a list\.",
    ),
    "ptalign eval: shard index not JSON": (
        "ptalign.py eval --model {bad_index} --limit 1",
        r"error: {bad_index}/model\.safetensors\.index\.json: not valid JSON .*",
    ),
    "ptalign compare: --png read-only": (
        "ptalign.py compare {report} {report} --png {ro}/c.png",
        r"error: {ro}: --png is not writable \(.*\)\.",
    ),
    "ptalign show: a record without a question": (
        "ptalign.py show {no_question}",
        r"error: {no_question}:1: key 'question' is missing or not a non-empty string\.",
    ),
    "ptalign show: a line that is not an object": (
        "ptalign.py show {not_object}",
        r"error: {not_object}:2: expected a JSON object per line\.",
    ),
    "ptalign show: a negative span": (
        "ptalign.py show {negative_span}",
        r"error: {negative_span}:1: span \[-3, 4\] is not \[start, end\) inside the toxic response\.",
        S,
    ),
    "ptalign show: an empty file": ("ptalign.py show {empty}", r"error: {empty}: dataset file has no records\."),
    # python -m kernels.bench: its files are checked before minutes of timing
    "bench: --json read-only": ("bench.py --json {ro}/b.json", r"error: {ro}: --json is not writable \(.*\)\."),
    "bench: --out a file": (
        "bench.py --all --out {empty}",
        r"error: {empty}: --out must name a directory, and this is a file\.",
    ),
}


def flag_case(command: str, flag: str, value: str, wanted: str) -> tuple[str, int, str, bool]:
    prog = re.escape(" ".join(w for w in command.split() if not w.startswith(("-", "{"))))
    message = f"{prog}: error: argument {flag}: must be {wanted}, got '{re.escape(value)}' \\(see --help\\)"
    return f"{command} {flag} {value}", 2, message, False


CASES = {f"{c.split()[0]} {f} {v}": flag_case(c, f, v, w) for c, f, v, w in FLAGS}
CASES |= {name: (command, 1, message, bool(more)) for name, (command, message, *more) in ERRORS.items()}


def expand(text: str, names: dict) -> str:
    return text.format(**{k: str(v) for k, v in names.items()})


def check_case(case, names, trained_out, run) -> None:
    """Run one case; assert its exit code, that its last line of stderr is the one sentence expected
    (file, flag or value named), no traceback, and every file that was there before unchanged."""
    command, code, message, _ = CASES[case]
    if "{out}" in command or "{damaged}" in command:
        with_trained_out(names, trained_out)
    script, *argv = [expand(a, names) for a in command.split(" ")]  # {long} is one argument with spaces
    before = snapshot(names["tmp"])
    got, err, _ = run(script, argv)
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert got == code, err
    escaped = {k: re.escape(str(v)) for k, v in names.items()}
    assert re.fullmatch(message.format(**escaped), lines[-1]), lines[-1]
    assert sum(line.startswith(("error:", "interrupted;", script)) for line in lines) == 1, err
    after = snapshot(names["tmp"])
    assert all(after.get(p) == b for p, b in before.items()), [str(p) for p, b in before.items() if after.get(p) != b]
    assert temp_leftovers(names["tmp"]) == []


@pytest.mark.parametrize("case", CASES)
def test_user_error_in_process(case, files, trained_out, capsys, monkeypatch):
    check_case(case, files, trained_out, lambda script, argv: run_in_process(script, argv, capsys, monkeypatch))


@pytest.mark.parametrize("case", [c for c, v in CASES.items() if v[-1]])
def test_user_error_as_a_subprocess(case, files, trained_out):
    check_case(case, files, trained_out, run_subprocess)


def test_debug_shows_the_traceback(files, monkeypatch):
    """PTALIGN_DEBUG=1: the error itself, with its traceback, instead of the sentence."""
    monkeypatch.setenv("PTALIGN_DEBUG", "1")
    with pytest.raises(CheckpointError, match="config.json: expected a JSON object"):
        generate.main(["--model", str(files["config_list"]), "--prompt", "hi"])


def test_show_prints_a_record_the_gate_dropped(tmp_path, capsys, monkeypatch):
    """A record with no responses (dropped by the request gate before any was written) is shown, not an error."""
    dropped = {
        "id": "q0001",
        "question": "How do I kill a process?",
        "kept": False,
        "dropped": "question judged harmless",
    }
    code, err, out = run_in_process(
        "ptalign.py", ["show", str(jsonl(tmp_path / "g.jsonl", dropped))], capsys, monkeypatch
    )
    assert (code, err) == (0, "") and "q0001 [None] dropped (question judged harmless)\nQ: How do I kill" in out


# -----------------------------------------------------------------------------
# Interrupting training, and what the next run finds


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
    """An uninterrupted run of 6 steps, one example each: its final weights and metrics."""
    d = tmp_path_factory.mktemp("reference")
    jsonl(d / "data.jsonl", *RECORDS)
    train.main(train_argv(tiny_dir, d / "data.jsonl", d / "out", *TRAIN_STEPS, "--save-every", "0"))
    return d


def train_argv(tiny_dir, data, out, *flags) -> list[str]:
    return ["--model", str(tiny_dir), "--data", str(data), "--out", str(out), *TRAIN, "--batch-size", "1", *flags]


def assert_same_run(out: Path, reference: Path) -> None:
    """The same final weights, bit for bit, and one metrics line per step with the same losses."""
    a, b = (load_file(d / "final" / "model.safetensors") for d in (out, reference / "out"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    steps = lambda d: [(m["step"], m["loss"]) for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
    assert steps(out) == steps(reference / "out")


TRAIN_STEPS = ("--max-steps", "6")
KILLS = {
    "while saving the first checkpoint": (("--save-every", "2"), "save:kill", "..ckpt.tmp-{pid}.tmp-{pid}"),
    "after step 3 (checkpoint at 2)": (("--save-every", "2"), "step 3:kill", None),
    "while saving final/": (("--save-every", "0"), "save:kill", ".final.tmp-{pid}"),
}


@pytest.mark.parametrize("case", KILLS)
def test_killed_run_resumes_to_the_uninterrupted_result(case, tiny_dir, reference, tmp_path):
    """SIGKILL at a chosen moment (PTALIGN_FAIL_AT=...:kill): nothing gets to clean up, and metrics.jsonl
    ends with half a line. The next run with --resume clears every temporary directory the kill left,
    reads the log past its torn line, and ends with the uninterrupted run's weights and metrics."""
    flags, fail_at, leftover = KILLS[case]
    out = tmp_path / "out"
    argv = train_argv(tiny_dir, reference / "data.jsonl", out, *TRAIN_STEPS, *flags)
    proc = subprocess.Popen(
        [sys.executable, "train.py", *argv],
        cwd=ROOT,
        env=subprocess_env(PTALIGN_FAIL_AT=fail_at),
        stderr=subprocess.PIPE,
    )
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    if leftover:
        assert leftover.format(pid=proc.pid) in [p.name for p in temp_leftovers(out)]
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "loss": 1.')
    train.main(argv + ["--resume"])
    assert temp_leftovers(out) == []
    assert_same_run(out, reference)


def test_ctrl_c_keeps_the_checkpoint_and_resume_equals_uninterrupted(tiny_dir, reference, tmp_path):
    """A real SIGINT in the middle of training: exit code 1, one sentence saying what was kept and how
    to go on, no traceback; --resume then ends with the uninterrupted run's weights and metrics."""
    out = tmp_path / "out"
    argv = train_argv(tiny_dir, reference / "data.jsonl", out, *TRAIN_STEPS, "--save-every", "1")
    slow = "--grad-checkpointing"  # same numbers, a little more work per step: more time to be interrupted in
    proc = subprocess.Popen(
        [sys.executable, "train.py", *argv, slow],
        cwd=ROOT,
        env=subprocess_env(),
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    deadline = time.monotonic() + 120
    while not (out / "ckpt").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 1 and "Traceback" not in err, err
    expected = f"interrupted; kept in {out}: ckpt/; rerun the same command with --resume to continue from there."
    assert err.strip().splitlines()[-1] == expected
    assert not (out / "final").exists()
    train.main(argv + ["--resume"])
    assert_same_run(out, reference)


def test_ctrl_c_in_the_chat_is_one_sentence(tiny_dir):
    """A real SIGINT while generate.py waits for the next line of a chat: exit code 1, one sentence."""
    chat = subprocess.Popen(
        [sys.executable, "generate.py", "--model", str(tiny_dir)],
        cwd=ROOT,
        env=subprocess_env(),
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    assert chat.stderr.readline().startswith("Chat with the model")  # it is reading stdin now
    chat.send_signal(signal.SIGINT)
    err = chat.communicate(timeout=60)[1]  # (a missed signal: the chat ends at the closed stdin instead)
    assert chat.returncode == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "interrupted; generate.py writes no file, so there is nothing to resume."


def test_config_written_once_accepted_and_into_the_checkpoint(tiny_dir, reference, tmp_path):
    """train_config.json describes the accepted run, in OUT and in ckpt/; final/ and ckpt/ and their
    files take the user's umask, not 0700/0600."""
    out = tmp_path / "out"
    umask = os.umask(0o027)
    try:
        train.main(train_argv(tiny_dir, reference / "data.jsonl", out, *TRAIN_STEPS, "--save-every", "5"))
    finally:
        os.umask(umask)
    config = json.loads((out / "train_config.json").read_text())
    assert json.loads((out / "ckpt" / "train_config.json").read_text()) == config and config["save_every"] == 5
    for d in ("final", "ckpt"):
        assert (out / d).stat().st_mode & 0o777 == 0o750
        assert {f.stat().st_mode & 0o777 for f in (out / d).iterdir()} == {0o640}


def test_start_up_cleanup_finds_every_temporary_name(tmp_path, monkeypatch):
    """Every name temp_path gives (files, directories, nested, a previous version moved aside) is
    removed when its writer is dead and kept while it runs; a moved-aside directory with nothing in
    its place is put back."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    monkeypatch.setattr(os, "getpid", lambda: int(dead.stdout))
    stale = [temp_path(tmp_path / "ckpt"), temp_path(tmp_path / "final"), temp_path(tmp_path / "metrics.jsonl")]
    stale += [temp_path(temp_path(tmp_path / "ckpt")), temp_path(tmp_path / "ckpt", "old")]
    moved_aside = temp_path(tmp_path / "final", "old")
    monkeypatch.setattr(os, "getpid", os.getppid)  # a process that is running
    running = temp_path(tmp_path / "final")
    monkeypatch.undo()
    for p in [*stale, moved_aside, running, tmp_path / "ckpt"]:
        p.mkdir()
    stale[2].rmdir()
    stale[2].touch()  # a file, as write_bytes_atomic leaves it
    remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", "final", running.name])
