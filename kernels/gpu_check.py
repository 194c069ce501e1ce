"""
Everything that needs a GPU, in one command sized for the machine it is lent for: one GPU for
minutes, no network, its own python3 (torch >= 2.11, Triton, pytest, transformers, safetensors,
tokenizers), nothing installed, a working tree of at most 64 MiB (so no default model):

    python3 -m kernels.gpu_check --out DIR               # on the GPU machine (~8 minutes at most)
    python3 -m kernels.gpu_check --out DIR --dry-run     # every stage at toy sizes on the CPU (~1 minute)

DIR and summary.json come first, then the stages, most valuable first, each in a process group
of its own that is stopped whole (compile workers, pytest, train.py included) at its limit;
summary.json is rewritten after every stage, so a run cut short still says what happened:

    stage     limit  what it measures
    env        20 s  GPU, driver, clocks, SM count, L2, memory; versions of python, torch, CUDA,
                     Triton, transformers and the optional libraries (nvidia-smi into env.log)
    tests     140 s  tests/test_kernels.py on CUDA: first the two tests only a GPU can run (bf16
                     logits of more than 2^31 elements, one-read and streamed), then the rest
    loss      110 s  `kernels.bench` loss rows, bf16, target shape first (N 16384 x V 128256,
                     then 16384 x 16384 on the one-read path, ...): ours end to end and kernel
                     only (do_bench), eager, Liger / quack where importable, torch.compile with
                     --compile; each row checked against float64 before it is timed
    linear     60 s  the *-linear rows at N 8192, H 4096, V 128256: time, TFLOP/s, peak memory
                     against eager (ours, eager, Liger / cut-cross-entropy where importable)
    train      80 s  a bf16 train.py run (20 steps) on a random Llama-3-shaped checkpoint the
                     check builds (vocabulary 128256, hidden 4096, 2 layers, GQA 32/8 heads):
                     losses finite, s/step, tokens/s
    generate   70 s  greedy generation on that checkpoint, generate.py's `generate` against
                     transformers' LlamaForCausalLM loaded from the same directory: tokens/s at
                     batch 1 and 32 in bf16 (median of 3 runs), and the replies compared (equal
                     in fp32; bf16 may part where two logits tie within its rounding)

All of them together stop at --total-seconds (480). DIR holds at most 8 files, none over 16 MiB,
nothing below DIR itself: summary.json (environment, each stage's status, seconds and numbers),
report.md (the tables), env.log and one log per stage. The checkpoint, the dataset and the
training run live in a scratch folder (--scratch; a temporary one is removed at the end).
Exit status 0 only if every stage passed.
"""

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common.files import read_jsonl, write_bytes_atomic, write_json, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
MAX_FILE_BYTES = 16 << 20
TOTAL_SECONDS = 480
SAFE_REPLY = "I can't help with that. If someone is at risk, please reach out to people who can help."


@dataclass(frozen=True)
class Stage:
    name: str
    seconds: int  # its limit on the GPU machine
    dry_seconds: int  # and in the dry run, on a busy CPU


STAGES = (
    Stage("env", 20, 60),
    Stage("tests", 140, 120),
    Stage("loss", 110, 120),
    Stage("linear", 60, 120),
    Stage("train", 80, 120),
    Stage("generate", 70, 120),
)

# The random checkpoint: Llama 3 8B's widths and vocabulary with 2 layers (1.5B parameters,
# 3 GB in bf16); the dry run's toy has the same shape family.
LLAMA3 = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=2,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
)
TOY_LLAMA = dict(
    LLAMA3, vocab_size=2048, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
)
LOSS_SHAPES = [(16384, 128256), (16384, 16384), (4096, 128256), (16384, 32000), (4096, 32000)]  # by value
LINEAR_SHAPES = [(8192, 4096, 128256)]

# -----------------------------------------------------------------------------
# 1. A stage in a process group of its own


def run_stage(name, command, out, limit, env=None):
    """Run one stage's command with its output in out/<name>.log; (return code, seconds). Past
    `limit` seconds the whole process group is stopped and the code is 124 (as timeout(1) says).
    The group is cleared after a normal exit too: nothing a stage started outlives it."""
    start = time.monotonic()
    print(f"== {name} (limit {limit:.0f} s): {' '.join(map(str, command))}", flush=True)
    with open(out / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            code = 124
        stop_group(proc)
    cap_file(out / f"{name}.log")
    seconds = time.monotonic() - start
    print(f"   {describe(code, limit)} in {seconds:.0f} s, log: {out / f'{name}.log'}", flush=True)
    return code, seconds


def stop_group(proc, grace=5.0):
    """SIGTERM to the process group led by proc, SIGKILL to what is left after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return  # nobody left in the group
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        time.sleep(0.2)  # let the others of the group act on the signal too


def describe(code, limit):
    return "ok" if code == 0 else f"TIMED OUT after {limit:.0f} s" if code == 124 else f"FAILED ({code})"


def cap_file(path, limit=MAX_FILE_BYTES):
    """Keep a log under `limit` bytes: its first and last halves, with a line saying what was cut."""
    size = path.stat().st_size
    if size <= limit:
        return
    with open(path, "rb") as f:
        head = f.read(limit // 2 - 200)
        f.seek(size - (limit // 2 - 200))
        tail = f.read()
    cut = f"\n[... {size - len(head) - len(tail)} bytes cut to keep the log under {limit} bytes ...]\n".encode()
    write_bytes_atomic(path, head + cut + tail)


# -----------------------------------------------------------------------------
# 2. The summary, rewritten after every stage


class Summary:
    """summary.json: what ran where, and each stage's status, seconds and numbers."""

    def __init__(self, out, args, argv):
        self.path = out / "summary.json"
        self.data = dict(
            command=" ".join([Path(sys.executable).name, "-m", "kernels.gpu_check", *argv]),
            started=time.strftime("%Y-%m-%d %H:%M:%S %z"),
            dry_run=args.dry_run,
            host=dict(python=platform.python_version(), platform=platform.platform(), cpus=os.cpu_count()),
            env=None,
            stages={},
        )
        self.start = time.monotonic()
        self.write()

    def record(self, name, **fields):
        self.data["stages"][name] = fields
        if name == "env" and isinstance(fields.get("result"), dict):
            self.data["env"] = fields["result"]
        self.data["seconds"] = round(time.monotonic() - self.start, 1)
        self.write()

    def write(self):
        write_json(self.path, self.data)

    def passed(self):
        return all(s["status"] in ("ok", "skipped") for s in self.data["stages"].values())


def read_result(path):
    """A stage's numbers, as far as it got (it rewrites them as it goes); None if it wrote none."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# -----------------------------------------------------------------------------
# 3. The check: every stage in turn


def stage_command(name, args, scratch):
    """The command line that runs one stage's body in a fresh python3."""
    command = [sys.executable, "-m", "kernels.gpu_check", "--stage", name, "--scratch", str(scratch)]
    return command + ["--dry-run"] * args.dry_run + ["--compile"] * args.compile


def run_check(args, argv, out, scratch):
    """Run the stages in order under the total limit; the summary as it ends."""
    summary = Summary(out, args, argv)
    deadline = time.monotonic() + args.total_seconds
    env = dict(os.environ, **({"TRITON_INTERPRET": "1"} if args.dry_run else {}))
    for stage in STAGES:
        if stage.name in args.skip:
            summary.record(stage.name, status="skipped")
            continue
        limit = min(stage.dry_seconds if args.dry_run else stage.seconds, deadline - time.monotonic())
        if limit < 5:
            summary.record(stage.name, status="not run: out of time")
            continue
        result_file = scratch / f"{stage.name}.json"
        result_file.unlink(missing_ok=True)
        code, seconds = run_stage(stage.name, stage_command(stage.name, args, scratch), out, limit, env)
        status = "ok" if code == 0 else "timed out" if code == 124 else f"failed ({code})"
        summary.record(
            stage.name, status=status, seconds=round(seconds, 1), limit=round(limit), result=read_result(result_file)
        )
        write_report(out / "report.md", summary.data)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/gpu_check", help="folder for summary.json, report.md and the logs")
    p.add_argument("--dry-run", action="store_true", help="every stage at toy sizes on the CPU (kernels interpreted)")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows to the loss benchmark")
    p.add_argument("--skip", nargs="+", default=[], choices=[s.name for s in STAGES], help="stages to leave out")
    p.add_argument("--total-seconds", type=float, default=TOTAL_SECONDS, help="limit for all stages together")
    p.add_argument("--scratch", help="folder for the checkpoint and the training run (default: a temporary one)")
    p.add_argument("--stage", choices=[s.name for s in STAGES], help=argparse.SUPPRESS)  # one stage's body
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.stage:
        return run_body(args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.scratch).resolve() if args.scratch else Path(tempfile.mkdtemp(prefix="gpu_check."))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        summary = run_check(args, argv, out, scratch)
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"summary: {out / 'summary.json'}, report: {out / 'report.md'}")
    sys.exit(0 if summary.passed() else 1)


# -----------------------------------------------------------------------------
# 4. Inside a stage: its body, writing its numbers as it goes


class Body:
    """What a stage's body gets: the flags, the scratch folder, and `save` for its numbers."""

    def __init__(self, args):
        self.dry_run, self.compile = args.dry_run, args.compile
        self.scratch = Path(args.scratch)
        self.result_file = self.scratch / f"{args.stage}.json"

    def save(self, result):
        write_json(self.result_file, result)


def run_body(args):
    """One stage's body (in the stage's own process); exits 0 when its checks pass."""
    body = Body(args)
    stages = dict(
        env=stage_env,
        tests=stage_tests,
        loss=lambda b: stage_bench(b, "loss"),
        linear=lambda b: stage_bench(b, "linear"),
        train=stage_train,
        generate=stage_generate,
    )
    sys.exit(0 if stages[args.stage](body) else 1)


def _versions():
    """Installed versions of what the stages use or compare against."""
    import importlib.metadata

    names = ["torch", "triton", "transformers", "safetensors", "tokenizers", "pytest"]
    names += ["liger-kernel", "cut-cross-entropy", "quack-kernels"]
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def stage_env(body):
    """The machine: nvidia-smi (into the log), the GPU as torch sees it, versions."""
    query = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,memory.total,pstate"
    env = dict(versions=_versions(), python=platform.python_version(), executable=sys.executable)
    try:
        smi = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True
        )
        env["nvidia_smi"] = [
            dict(zip(query.split(","), (x.strip() for x in line.split(",")))) for line in smi.stdout.splitlines()
        ]
        subprocess.run(["nvidia-smi"], check=False)
        subprocess.run(["nvidia-smi", "-q", "-d", "CLOCK,PERFORMANCE"], check=False)
    except OSError as e:
        env["nvidia_smi"] = f"not run: {e}"
    body.save(env)
    import torch

    env["cuda_runtime"] = torch.version.cuda
    if not torch.cuda.is_available():
        env["gpu"] = None
        body.save(env)
        print(json.dumps(env, indent=1))
        return body.dry_run  # no GPU is a failure, except in the dry run
    props = torch.cuda.get_device_properties(0)
    env["gpu"] = dict(
        name=props.name,
        capability=f"sm_{props.major}{props.minor}",
        sm_count=props.multi_processor_count,
        l2_bytes=props.L2_cache_size,
        memory_bytes=props.total_memory,
        count=torch.cuda.device_count(),
    )
    body.save(env)
    print(json.dumps(env, indent=1))
    return True


_PYTEST_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def _pytest(selection, env):
    """Run pytest on tests/test_kernels.py with this -k selection, its output into the log; (code, counts)."""
    command = [sys.executable, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", "tests/test_kernels.py"]
    command += ["-k", selection]
    print("$", " ".join(command), flush=True)
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = ""
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        last = line if line.strip() else last
    code = proc.wait()
    return code, {
        kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in _PYTEST_COUNTS.findall(last)
    }


# The kernel tests on CUDA in three runs, most valuable first, so that a run cut short at its limit
# has said the most it could: what only a GPU can run, the core of the kernels against float64,
# then the rest (the PyTorch fallback's cases are left out everywhere: they run on the CPU).
CORE_TESTS = "vocabulary_sizes or dtypes_and_reductions or one_read_path or fused_linear or scale_by or fp32_accum"
TEST_RUNS = [
    ("gpu only", "2_31"),
    ("core", f"not torch and ({CORE_TESTS})"),
    ("rest", f"not torch and not 2_31 and not ({CORE_TESTS})"),
]


def stage_tests(body):
    """tests/test_kernels.py on CUDA, in the runs of TEST_RUNS; a toy selection in the dry run."""
    runs = TEST_RUNS
    if body.dry_run:
        runs = [("toy", "no_competitor and triton")]
    result = {}
    for label, selection in runs:
        code, counts = _pytest(selection, dict(os.environ))
        result[label] = dict(selection=selection, returncode=code, **counts)
        body.save(result)
    return all(r["returncode"] == 0 for r in result.values())


def stage_bench(body, kind):
    """`kernels.bench` rows of one kind, a shape at a time (most valuable first), saved as they come."""
    import torch

    from kernels import bench

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = bench.TOY_TABLE[kind] if body.dry_run else (LOSS_SHAPES if kind == "loss" else LINEAR_SHAPES)
    skip = () if body.compile else ("compile",)
    result = dict(environment=bench.environment(device), rows=[])
    for shape in shapes:
        table = dict(loss=[shape] if kind == "loss" else [], linear=[shape] if kind == "linear" else [])
        reps, warmups = (2, 1) if body.dry_run else (20, bench.WARMUPS)
        rows, bandwidth = bench.run_table(table, dtype, device, reps, 1.0, skip=skip, warmups=warmups)
        result["copy_bandwidth_gbs"] = bandwidth
        result["rows"] += rows
        body.save(result)
    ours = [r for r in result["rows"] if r["method"] in bench.AUTOTUNED]  # ptalign, ptalign-linear, fused-linear
    return bool(ours) and all(r["check"].startswith("ok") for r in ours)


# -----------------------------------------------------------------------------
# 5. The random Llama-3-shaped checkpoint, its tokenizer, a dataset


def smoke_dataset(path):
    """A dual dataset from the hand-marked toxic responses: each question with a refusal as
    its positive side and the marked phrases as the toxic side's spans."""
    records = []
    for _, r in read_jsonl(ROOT / "data" / "span_gold.jsonl"):
        spans = [[r["toxic"].index(h), r["toxic"].index(h) + len(h)] for h in r["harmful"] if h in r["toxic"]]
        if spans:
            records.append(dict(id=r["id"], question=r["question"], positive=SAFE_REPLY, toxic=r["toxic"], spans=spans))
    write_jsonl(path, records)
    return len(records)


def questions(n):
    """n prompts for the generation stage: the questions of data/span_gold.jsonl, again with a
    request appended once they run out (so a batch has prompts of many lengths)."""
    found = [r["question"] for _, r in read_jsonl(ROOT / "data" / "span_gold.jsonl")]
    return [found[i % len(found)] + " Please answer briefly." * (i // len(found)) for i in range(n)]


def build_tokenizer(path, vocab_size):
    """A byte-level BPE trained on the repository's own texts (1000 tokens), its vocabulary filled
    up to vocab_size with placeholder tokens so that every id the model can emit decodes; the
    special tokens and a chat template in tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=min(1000, vocab_size // 2),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((ROOT / "data" / "span_gold.jsonl").read_text().splitlines(), trainer)
    filler = vocab_size - tok.get_vocab_size()
    tok.add_tokens([AddedToken(f"<|x{i}|>", special=False, normalized=False) for i in range(filler)])
    tok.save(str(path / "tokenizer.json"))
    template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    config = dict(bos_token=specials[0], eos_token=specials[1], chat_template=template)
    write_json(path / "tokenizer_config.json", config)
    return [tok.token_to_id(s) for s in specials]


def ensure_checkpoint(body):
    """The random checkpoint in scratch/llama3 (built on first use): bf16 on a GPU, fp32 on the CPU."""
    import torch
    import transformers

    path = body.scratch / "llama3"
    if (path / "config.json").is_file():
        return path
    tmp = body.scratch / "llama3.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dims = TOY_LLAMA if body.dry_run else LLAMA3
    bos, eos = build_tokenizer(tmp, dims["vocab_size"])
    config = transformers.LlamaConfig(**dims, tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    model.to(torch.bfloat16 if device == "cuda" else torch.float32).save_pretrained(tmp)
    del model
    tmp.rename(path)
    return path


# -----------------------------------------------------------------------------
# 6. Training and generation on it


def stage_train(body):
    """A bf16 train.py run on the random checkpoint; its losses, s/step and tokens/s."""
    import torch

    ckpt = ensure_checkpoint(body)
    data = body.scratch / "smoke.jsonl"
    smoke_dataset(data)
    run = body.scratch / "train"
    shutil.rmtree(run, ignore_errors=True)
    steps, batch = (3, 4) if body.dry_run else (20, 8)
    command = [sys.executable, "train.py", "--model", str(ckpt), "--data", str(data), "--out", str(run)]
    command += ["--precision", "bf16", "--max-steps", str(steps), "--epochs", "100", "--batch-size", str(batch)]
    command += ["--grad-accum", "1", "--skip-eval", "--save-every", "0"]
    command += ["--device", "cuda" if torch.cuda.is_available() else "cpu"]
    print("$", " ".join(command), flush=True)
    code = subprocess.run(command, cwd=ROOT).returncode
    metrics = [m for _, m in read_jsonl(run / "metrics.jsonl")] if (run / "metrics.jsonl").is_file() else []
    timed = metrics[1:] or metrics  # the first step pays for compilation and autotuning
    result = dict(returncode=code, steps=len(metrics))
    if metrics:
        seconds = sorted(m["seconds"] for m in timed)[len(timed) // 2]
        tokens = sorted(m["tokens"] / m["seconds"] for m in timed)[len(timed) // 2]
        result |= dict(first_loss=metrics[0]["loss"], last_loss=metrics[-1]["loss"], median_s_per_step=seconds)
        result |= dict(median_tokens_per_s=tokens, all_finite=all(map(_finite, (m["loss"] for m in metrics))))
    body.save(result)
    return code == 0 and result.get("steps") == steps and result.get("all_finite", False)


def _finite(x):
    return x == x and abs(x) != float("inf")


def _hf_model(path, dtype, device):
    """transformers' LlamaForCausalLM from the checkpoint directory, in dtype on device."""
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype).to(device=device, dtype=dtype).eval()


def _hf_replies(model, tok, prompts, max_new_tokens):
    """transformers' greedy replies to prompts, left-padded as generate.py pads, decoded by our tokenizer."""
    import torch

    ids = [tok.apply_chat_template(p, add_generation_prompt=True) for p in prompts]
    width = max(map(len, ids))
    device = next(model.parameters()).device
    input_ids = torch.tensor([[tok.pad_id] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.stop_ids,
            pad_token_id=tok.pad_id,
        )
    replies = []
    for row in out[:, width:].tolist():
        stop = next((i for i, t in enumerate(row) if t in tok.stop_ids), len(row))
        replies.append(tok.decode(row[:stop]))
    return replies


def _timed(fn):
    """(fn(), seconds), with the GPU's queue drained before and after."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def _compare(ours_model, hf_model, tok, prompts, batch, new_tokens, reps):
    """Our greedy replies against transformers' at one batch size: how many are equal and, with
    reps > 0, tokens/s of each (the median of reps runs after a short warm-up run)."""
    from generate import generate

    ours = lambda n: generate(ours_model, tok, prompts[:batch], max_new_tokens=n, batch_size=batch)  # noqa: E731
    theirs = lambda n: _hf_replies(hf_model, tok, prompts[:batch], n)  # noqa: E731
    if reps:  # kernels, cuBLAS handles and caches warm
        ours(4), theirs(4)
    (a, t_ours), (b, t_hf) = _timed(lambda: ours(new_tokens)), _timed(lambda: theirs(new_tokens))
    row = dict(batch=batch, new_tokens=new_tokens, equal=sum(x == y for x, y in zip(a, b)), of=len(a))
    if reps:  # a random model never meets its stop token in practice: every row runs to new_tokens
        t_ours = sorted([t_ours] + [_timed(lambda: ours(new_tokens))[1] for _ in range(reps - 1)])[reps // 2]
        t_hf = sorted([t_hf] + [_timed(lambda: theirs(new_tokens))[1] for _ in range(reps - 1)])[reps // 2]
        row |= dict(ours_tokens_per_s=batch * new_tokens / t_ours, hf_tokens_per_s=batch * new_tokens / t_hf)
    return row


def stage_generate(body):
    """Greedy generation, ours against transformers on the same checkpoint: tokens/s in bf16 at
    batch 1 and 32, then the replies compared in fp32 (bf16 may part at near-ties). Without a GPU
    (the dry run): fp32 only, timed."""
    import torch

    from data import Tokenizer
    from model import Transformer

    ckpt = ensure_checkpoint(body)
    tok = Tokenizer.from_pretrained(ckpt)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompts = questions(32)
    # (dtype, timed runs, new tokens): bf16 timed, fp32 for equality; the dry run times fp32 once
    plan = [("bfloat16", 3, 128), ("float32", 0, 32)] if device.type == "cuda" else [("float32", 1, 8)]
    result = {}
    for name, reps, new_tokens in plan:
        dtype = getattr(torch, name)
        ours, hf = Transformer.from_pretrained(ckpt, dtype=dtype, device=device), _hf_model(ckpt, dtype, device)
        result[name] = [_compare(ours, hf, tok, prompts, batch, new_tokens, reps) for batch in (1, 32)]
        body.save(result)
        del ours, hf
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return all(r["equal"] == r["of"] for r in result["float32"])


# -----------------------------------------------------------------------------
# 7. report.md: the numbers as tables


def write_report(path, summary):
    """report.md from the summary: each stage's status, the benchmark tables, training and generation."""
    from kernels import bench

    gpu = (summary.get("env") or {}).get("gpu") or {}
    lines = [f"# GPU check: {gpu.get('name', 'no GPU')} ({'dry run' if summary['dry_run'] else 'full'})", ""]
    lines += [
        f"`{summary['command']}`, started {summary['started']}",
        "",
        "| stage | status | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {s['status']} | {s.get('seconds', '-')} |" for n, s in summary["stages"].items()]
    for name in ("loss", "linear"):
        result = (summary["stages"].get(name) or {}).get("result") or {}
        if result.get("rows"):
            lines += ["", f"## {name} (copy bandwidth {result.get('copy_bandwidth_gbs', 0):.0f} GB/s)", ""]
            lines += [bench.table(result["rows"])]
    train = (summary["stages"].get("train") or {}).get("result")
    if train:
        lines += ["", "## train", "", "```", json.dumps(train, indent=1), "```"]
    generation = (summary["stages"].get("generate") or {}).get("result") or {}
    for dtype, rows in generation.items():
        lines += ["", f"## generate, {dtype}", "", "| batch | new tokens | equal | ours tok/s | transformers tok/s |"]
        lines += ["|---|---|---|---|---|"]
        for r in rows:
            speed = [f"{r[k]:.0f}" if k in r else "-" for k in ("ours_tokens_per_s", "hf_tokens_per_s")]
            lines += [f"| {r['batch']} | {r['new_tokens']} | {r['equal']}/{r['of']} | {speed[0]} | {speed[1]} |"]
    write_bytes_atomic(path, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
