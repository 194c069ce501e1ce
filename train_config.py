"""
Every setting of train.py, in one place: the TrainConfig dataclass.

Each field carries its default and its flag's --help; `build_parser` makes one flag per field
(--max-len for max_len), so a new setting is one line here. The settings that depend on the
machine carry one value per preset instead of a default. OUT/train_config.json is a run's
TrainConfig; its resume fingerprint is the TrainConfig minus RESUME_MAY_CHANGE.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields

import torch

from common.cli import COUNT, NON_NEGATIVE, POSITIVE, POSITIVE_FLOAT, Parser, add_flags, option
from common.files import sha256
from data import DATA_DIR

# The cpu preset makes the whole default run (dataset, both evaluations, training) finish in
# under 20 minutes on 2 cores with the 135M default model; the gpu preset is for a 7B/8B model
# on one GPU. Any flag given overrides its preset.
PRESET_NAMES = ("cpu", "gpu")
# each preset's --lr under --lora-rank; the cpu one was chosen on the dev split by the same rule as --lr, for
# PT-ALIGN before the decision loss joined the default (not chosen again since)
LORA_LR = {"cpu": 1.5e-4, "gpu": 2e-4}


def presets_note(values: dict) -> str:
    """A setting's value in each preset, for its --help: ' (cpu preset: 3, gpu preset: 3)'."""
    return " (" + ", ".join(f"{p} preset: {'all' if v is None else v}" for p, v in values.items()) + ")"


def machine(cpu, gpu, help: str, **flag):
    """A field the preset decides: its value in the cpu and in the gpu preset (the cpu one is the default)."""
    presets = dict(zip(PRESET_NAMES, (cpu, gpu)))
    return field(default=cpu, metadata=dict(flag, help=help + presets_note(presets), presets=presets))


@dataclass
class TrainConfig:
    """Every setting of a run: option(default, help) or machine(cpu preset, gpu preset, help)."""

    model: str | None = option(None, "LLaMA-family checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    data: str | None = option(None, "dual dataset JSONL from `ptalign.py generate` (default: generate OUT/data.jsonl)")
    out: str = option("runs/ptalign", "output directory: final/, ckpt/, metrics.jsonl, eval reports")
    preset: str = option(
        "cpu",
        "machine defaults for the flags marked 'preset' (default: gpu when CUDA is available, else cpu)",
        choices=PRESET_NAMES,
    )
    device: str = option("cpu", "torch device (default: cuda if available, else cpu)")
    precision: str = option(
        "fp32",
        "bf16: autocast with fp32 master weights (and a bf16 frozen base under LoRA); "
        "default: bf16 on cuda, fp32 on cpu",
        choices=("fp32", "bf16"),
    )
    loss: str = option(
        "both",
        "both: MLE on positives + unlikelihood on toxic spans (PT-ALIGN); mle or ut: one side only, for the ablations; "
        "dpo: DPO on the same (positive, toxic) pairs against the frozen starting model, the baseline (no anchor)",
        choices=("both", "mle", "ut", "dpo"),
    )
    dpo_beta: float = option(
        0.1, "DPO's beta: how far the policy may move from the reference (--loss dpo)", type=POSITIVE_FLOAT
    )
    decision_weight: float = machine(
        1.0,
        1.0,
        "weight of the decision loss (this project's addition): a logistic loss on log p(refusal opener | question) "
        "that pushes the dataset's harmful questions up and its anchor questions down, centred on the starting "
        "model's mean score; off when the dataset has no anchor records; 0: off, PT-ALIGN alone (the cpu preset's "
        "1.0 was chosen on the dev split with the default model; the gpu preset's is untuned for larger models)",
        type=NON_NEGATIVE,
    )
    decision_questions: int = option(
        4, "questions of each kind (harmful, anchor) the decision loss scores per step", type=POSITIVE
    )
    alpha: float = machine(
        3.0,
        1.0,
        "weight of the unlikelihood term (the cpu preset's 3.0 was chosen on the dev split with the default model; "
        "1.0, the neutral weight, is untuned for larger models)",
        type=NON_NEGATIVE,
    )
    epochs: int = machine(3, 3, "passes over the dataset", type=POSITIVE)
    max_steps: int | None = option(
        None,
        "stop after this many optimizer steps (the schedule ends there too); default: the epochs' end",
        type=POSITIVE,
    )
    batch_size: int = machine(4, 4, "examples per micro-batch (per process under torchrun)", type=POSITIVE)
    grad_accum: int = machine(1, 8, "micro-batches per optimizer step", type=POSITIVE)
    lr: float = machine(
        4e-5,
        1e-5,
        "peak learning rate (the cpu preset's 4e-5 gave, with the decision loss, the highest harmful refusal within "
        "the over-refusal targets on the dev split with the default model: docs/efficacy.md); "
        f"default: the preset's, for LoRA{presets_note(LORA_LR)} or full fine-tuning",
        type=POSITIVE_FLOAT,
    )
    warmup_steps: int | None = option(
        None,
        "linear warmup steps before the cosine decay to lr/10 (default: 5%% of the steps, at least 1)",
        type=COUNT,
    )
    weight_decay: float = option(0.0, "AdamW weight decay on matrices", type=NON_NEGATIVE)
    grad_clip: float = option(1.0, "clip the gradient's global norm to this", type=POSITIVE_FLOAT)
    max_len: int = machine(
        256,
        1024,
        "tokens per example; longer responses are cut, examples whose prompt does not fit are dropped and counted",
        type=POSITIVE,
    )
    lora_rank: int = option(
        0,
        "train LoRA adapters of this rank on the attention and MLP projections instead of all weights; "
        "merged into the weights on save; 0: full fine-tuning",
        type=COUNT,
    )
    lora_alpha: float = option(16.0, "LoRA scale numerator: the update is alpha/rank * B A", type=POSITIVE_FLOAT)
    grad_checkpointing: bool = machine(
        False,
        True,
        "recompute each block's activations in backward to save memory",
        action=argparse.BooleanOptionalAction,
    )
    seed: int = option(0, "seed for the dataset, data order and LoRA init")
    save_every: int = machine(10, 100, "write OUT/ckpt every N optimizer steps; 0: never", type=COUNT)
    resume: bool = option(
        False,
        "continue from OUT/ckpt (same flags required): weights, optimizer, schedule, data order and RNG, "
        "so the result equals an uninterrupted run",
    )
    anchor: bool = option(
        True,
        "train on the helpfulness anchor's records too (the model's own answers to harmless questions, MLE only; "
        "this project's addition); --no-anchor leaves them out",
        action=argparse.BooleanOptionalAction,
    )
    questions: int = machine(32, 64, "harmful questions to generate when --data is not given", type=POSITIVE)
    anchors: int = machine(48, 96, "harmless anchor questions to generate when --data is not given", type=COUNT)
    inference_dtype: str = machine(
        "bfloat16",
        "bfloat16",
        "weights dtype for generating the dataset and for evaluation (training keeps --precision); on a CPU with "
        "avx512_bf16, bfloat16 generates 1.6x faster than float32",
        choices=("float32", "bfloat16"),
    )
    rounds: int = machine(2, 2, "critique-and-revise rounds when generating", type=COUNT)
    eval_limit: int | None = machine(
        None, None, "evaluate on this many prompts of each held-out set, evenly spaced; 0: all", type=COUNT
    )
    eval_max_new_tokens: int = machine(48, 64, "reply length in evaluation", type=POSITIVE)
    eval_harmful: str = option(
        str(DATA_DIR / "eval_harmful.jsonl"),
        "harmful prompts to evaluate on (default: data/eval_harmful.jsonl; tune on data/dev_harmful.jsonl)",
    )
    eval_benign: str = option(
        str(DATA_DIR / "eval_benign.jsonl"),
        "benign prompts to evaluate on (default: data/eval_benign.jsonl; tune on data/dev_benign.jsonl)",
    )
    eval_public: bool = option(
        True,
        "also evaluate on the public prompt sets written by other people (data/public/; report only, never tuned on)",
        action=argparse.BooleanOptionalAction,
    )
    skip_eval: bool = option(False, "no evaluation before or after (training only)")


def preset_values(name: str) -> dict:
    """The values a preset gives the settings it decides, and its LoRA learning rate as lora_lr."""
    values = {f.name: f.metadata["presets"][name] for f in fields(TrainConfig) if "presets" in f.metadata}
    return values | {"lora_lr": LORA_LR[name]}


# The settings a resumed run may change; every other one must be what the run started with.
# Activation checkpointing recomputes the same numbers; the dataset's hash makes the settings
# that generated it moot.
RESUME_MAY_CHANGE = {
    *("out", "resume", "save_every", "preset", "device", "grad_checkpointing"),  # where and how it runs
    *(
        "skip_eval",
        "eval_limit",
        "eval_max_new_tokens",
        "eval_harmful",
        "eval_benign",
        "eval_public",
    ),  # evaluation around training
    *("model", "data", "questions", "rounds", "anchors", "inference_dtype"),  # named by content: model path, data hash
}


def fingerprint(cfg: TrainConfig, model_path, data_path) -> dict:
    """What must not change between an interrupted run and its resumption."""
    same = {k: v for k, v in asdict(cfg).items() if k not in RESUME_MAY_CHANGE}
    return same | {"model": str(model_path), "data_sha256": sha256(data_path)}


def build_parser() -> Parser:
    """One flag per TrainConfig field, with the field's help and range. A flag not given is left out
    of the parsed namespace (argument_default=SUPPRESS), so parse_args can tell it from a default."""
    p = Parser(
        description="PT-ALIGN dual instruction tuning, end to end: dataset, evaluation before, training with the "
        "fused MLE + unlikelihood loss, aligned checkpoint, evaluation after. With no flags it runs on the "
        "embedded default model.",
        argument_default=argparse.SUPPRESS,
    )
    add_flags(p, TrainConfig, with_defaults=False)
    return p


def parse_args(argv=None) -> TrainConfig:
    """The flags given; for the others, the preset's value (gpu when CUDA is available, else cpu),
    else the TrainConfig default. A setting out of range is a usage error (each field's type)."""
    given = vars(build_parser().parse_args(argv))
    cuda = torch.cuda.is_available()
    values = preset_values(given.setdefault("preset", "gpu" if cuda else "cpu"))
    lora_lr = values.pop("lora_lr")
    if given.get("lora_rank"):
        values["lr"] = lora_lr
    values |= given
    values.setdefault("device", "cuda" if cuda else "cpu")
    values.setdefault("precision", "bf16" if values["device"].startswith("cuda") else "fp32")
    cfg = TrainConfig(**values)
    if cfg.eval_limit == 0:
        cfg.eval_limit = None  # all
    return cfg
