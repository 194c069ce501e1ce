"""Every setting of the dataset stage, `ptalign.py generate`: one field per flag, with its default,
range and --help (as train_config.py is for train.py), and the settings a dataset records in its
provenance, which decide whether a run may resume it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from common.cli import COUNT, FINITE, FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY, option
from common.files import sha256
from data import DATA_DIR
from data.default_model import model_label
from data.prompts import POSITIVE_REPLY_START


@dataclass
class GenerateConfig:
    """Every setting of the dataset stage: `ptalign.py generate` makes one flag per field, and
    train.py builds one for its dataset stage."""

    out: str = field(metadata=dict(help="output JSONL; an existing file is resumed (same flags needed)", required=True))
    model: str | None = option(None, "checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    device: str | None = option(None, "torch device (default: cuda if available, else cpu)")
    dtype: str | None = option(
        None, "weights dtype (default: bfloat16 on cuda, float32 on cpu)", choices=["float32", "bfloat16", "float16"]
    )
    seeds: str = option(str(DATA_DIR / "seeds.json"), "seed annotations JSON (default: data/seeds.json)")
    questions: int = option(32, "harmful questions to generate", type=POSITIVE)
    questions_file: str | None = option(
        None,
        "harmful prompts to use instead of self-instructed questions, the first --questions of them (JSONL, a "
        "'prompt' per line, as data/eval_harmful.jsonl): the method on prompts you have, or what better questions "
        "would buy",
    )
    rounds: int = option(2, "critique-and-revise rounds per sample", type=COUNT)
    seed: int = option(0, "random seed; same seed and flags, same dataset")
    max_new_tokens: int = option(
        64,
        "max tokens per generated response; a reply cut off there is trimmed to its last full sentence",
        type=POSITIVE,
    )
    temperature: float = option(0.7, "sampling temperature for responses", type=NON_NEGATIVE)
    top_p: float = option(0.9, "nucleus sampling mass", type=FRACTION)
    batch_size: int = option(
        32,
        "prompts generated together (and, when generating, the chunk of records computed and written together)",
        type=POSITIVE,
    )
    span_method: str = option(
        "contrast",
        "how harmful words are found: the model quotes them, log-prob contrast between the harmful and harmless "
        "instruction, or the union of both (the 135M default model quoted no word of the span set: "
        "`ptalign.py spans`)",
        choices=["quote", "contrast", "both"],
    )
    positive_start: str = option(
        POSITIVE_REPLY_START,
        "text every positive reply starts with, taken from the exemplars (default %(default)r; '' lets the model "
        "write the whole reply)",
    )
    contrast_rule: str = option(
        "rank",
        "how contrast scores become harmful words: rank (the strongest --contrast-top fraction of each response's "
        "content words above --contrast-floor) or margin (every word above --contrast-margin)",
        choices=["rank", "margin"],
    )
    contrast_top: float = option(
        0.5,
        "rank rule: fraction of a response's content words marked (at least one); chosen on the span set's dev half",
        type=FRACTION,
    )
    contrast_floor: float = option(
        0.0,
        "rank rule: nats a marked word's contrast must exceed (0: likelier under the harmful instruction at all)",
        type=FINITE,
    )
    contrast_margin: float = option(
        1.0,
        "margin rule: nats by which a token's log-prob under the harmful instruction must beat the harmless one",
        type=FINITE,
    )
    judge_threshold: float = option(
        0.5, "self-check: P(harmful) from the model-as-judge that separates harmful from harmless", type=PROBABILITY
    )
    judge_calibration: bool = option(
        True,
        "self-check: set --judge-threshold from the seed exemplars (the midpoint of the judge's mean score of their "
        "positive and their toxic responses); --no-judge-calibration uses --judge-threshold as given",
        action=argparse.BooleanOptionalAction,
    )
    judge_margin: float = option(
        0.0, "self-check: the toxic sample's P(harmful) must exceed the positive's by more than this", type=FINITE
    )
    dedup_threshold: float = option(
        0.7, "drop a new question whose ROUGE-L with any kept one exceeds this", type=PROBABILITY
    )
    request_threshold: float = option(
        0.5,
        "request gate: a question whose P(should refuse) from the request judge is below this is dropped before "
        "its refusal is written (chosen on the dev split; 0 turns the gate off)",
        type=PROBABILITY,
    )
    anchors: int = option(
        48,
        "helpfulness anchor: harmless questions self-instructed from the benign seed examples, answered by the "
        "model itself, as MLE-only records (this project's addition; 0 turns it off)",
        type=COUNT,
    )
    anchors_file: str | None = option(
        None,
        "harmless prompts for the anchor to answer instead of self-instructed ones, the first --anchors of them "
        "(JSONL, a 'prompt' per line, as data/eval_benign.jsonl)",
    )


# Fields that do not change what a dataset contains, or that its provenance records otherwise.
NOT_PROVENANCE = ("out", "model", "device", "seeds", "questions_file", "anchors_file")


def settings_of(cfg: GenerateConfig) -> dict:
    """The settings a dataset records in its provenance: a run resumes a file only if they match."""
    model = model_label(cfg.model)
    settings = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in NOT_PROVENANCE}
    given = {f"{k}_sha256": getattr(cfg, k) and sha256(getattr(cfg, k)) for k in ("questions_file", "anchors_file")}
    return {"model": model, **settings, "seeds_sha256": sha256(cfg.seeds), **given}  # None: self-instructed
