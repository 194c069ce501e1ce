"""Training objectives beside the fused PT-ALIGN loss: the DPO baseline and the decision loss.

- **DPO** (Rafailov et al. 2023), the baseline PT-ALIGN is compared with, on the very same
  (positive, toxic) pairs: L = -log sigmoid(beta * [(log pi(y+|x) - log pi_ref(y+|x)) -
  (log pi(y-|x) - log pi_ref(y-|x))]), log-probabilities summed over the response tokens,
  pi_ref the frozen starting model.
- **The decision loss** (this project's addition; on by default, `--decision-weight`): the
  method's own data says which questions are harmful (the gated red-team questions) and which
  are not (the anchor questions), and a linear probe on the model's hidden states separates
  those two kinds far better than MLE and unlikelihood training make the model behave. This
  loss trains the decision itself: a logistic loss on the score s(q) = log p(a refusal opener |
  q) after each question, harmful questions pushed up and anchor questions pushed down, centred
  on the starting model's mean score so that it moves the two classes apart rather than both
  one way. Without it the anchor answers are the model's own samples, so in expectation they
  carry no gradient that says "do not refuse this". On the dev split it gave the same harmful
  refusal as PT-ALIGN alone with a third of the over-refusal (docs/efficacy.md).

Both use plain log-softmax (not the fused kernel): their sequences are few and short.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data.dataset import IGNORE, encode_example, pad_rows

# The refusal openers the decision score reads: the positives' own refusal and the base model's
# usual way of declining. The score is log p(either opener) = logsumexp of the two.
REFUSAL_OPENERS = ("I can't help with", "I'm sorry")


def sequence_logprobs(model, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target) over each row's target positions: the log-probability of the response.
    Only the target positions go through the output projection: a decision-loss row is a few
    opener tokens after a long prompt, and a full (T, V) log-softmax would cost more than the
    transformer itself."""
    rows, cols = (targets != IGNORE).nonzero(as_tuple=True)
    hidden = model.hidden_states(ids)[rows, cols]
    logits = F.linear(hidden, model.lm_head_weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up to fp32, fp64 kept
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[rows, cols].unsqueeze(-1)).squeeze(-1)
    return torch.zeros(ids.shape[0], dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)


def dpo_loss(policy_lp: torch.Tensor, reference_lp: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair DPO loss from sequence log-probs laid out as rows (positive, toxic, positive, toxic, ...)."""
    logratio = policy_lp - reference_lp
    margin = logratio[0::2] - logratio[1::2]
    return -F.logsigmoid(beta * margin)


def dpo_micro_batch_loss(model, reference, ids, targets, beta: float, weight: float):
    """DPO on one micro-batch of pairs, scaled by `weight` (1 / pairs in the step); also returns,
    for the metrics, the unscaled sum of the pairs' losses and of their reward margins."""
    policy = sequence_logprobs(model, ids, targets)
    with torch.no_grad():
        ref = sequence_logprobs(reference, ids, targets)
    losses = dpo_loss(policy, ref, beta)
    logratio = (policy - ref).detach()
    return losses.sum() * weight, losses.detach().sum(), (logratio[0::2] - logratio[1::2]).sum()


@dataclass
class DecisionBatch:
    """One step's decision-loss questions: prompt+opener rows and each question's label."""

    ids: torch.Tensor
    targets: torch.Tensor
    labels: torch.Tensor  # 1 for a harmful question, 0 for an anchor question


class DecisionLoss:
    """The balanced decision loss: per step, `per_class` harmful and `per_class` anchor questions,
    drawn in an order fixed by the seed, each scored by log p(refusal opener | question)."""

    def __init__(self, records, tok, per_class: int, seed: int, max_len: int):
        harmful = [r["question"] for r in records if r.get("kind") != "anchor"]
        benign = [r["question"] for r in records if r.get("kind") == "anchor"]
        if not harmful or not benign:
            raise ValueError("the decision loss needs both red-team and anchor records in the dataset")
        self.questions = {1: harmful, 0: benign}
        self.tok, self.per_class, self.seed, self.max_len = tok, per_class, seed, max_len
        self.centre = 0.0

    def rows(self, questions: list[str], labels: list[int]) -> DecisionBatch:
        """Every (question, opener) sequence, openers of one question in consecutive rows."""
        exs = [encode_example(self.tok, q, o, None, self.max_len) for q in questions for o in REFUSAL_OPENERS]
        for ex in exs:  # the opener is a target, the end-of-turn after it is not: it does not end there
            last = max(i for i, t in enumerate(ex.targets) if t != IGNORE)
            ex.targets[last] = IGNORE
        ids, targets, _ = pad_rows(exs, self.tok.pad_id)
        return DecisionBatch(ids, targets, torch.tensor(labels, dtype=torch.float32))

    def scores(self, model, batch: DecisionBatch, bf16: bool = False) -> torch.Tensor:
        """s(q) = log p(any refusal opener | q), one per question (bf16: under autocast, as training runs)."""
        device = next(model.parameters()).device  # a DTensor's local device under torchrun
        autocast = torch.autocast(device.type, torch.bfloat16, cache_enabled=False) if bf16 else nullcontext()
        with autocast:
            lp = sequence_logprobs(model, batch.ids.to(device), batch.targets.to(device))
        return torch.logsumexp(lp.view(-1, len(REFUSAL_OPENERS)), dim=1)

    @torch.no_grad()
    def calibrate(self, model, bf16: bool = False) -> float:
        """Centre the scores on the starting model's mean over all training questions (both classes).
        Every rank scores them all: the same forward passes, so the same centre."""
        qs = self.questions[1] + self.questions[0]
        batches = [qs[i : i + 8] for i in range(0, len(qs), 8)]
        scores = [self.scores(model, self.rows(b, [0] * len(b)), bf16) for b in batches]
        self.centre = float(torch.cat(scores).mean())
        return self.centre

    def batch(self, step: int) -> DecisionBatch:
        """The step's questions: `per_class` of each kind, cycling through a seeded shuffle of each."""
        picked, labels = [], []
        for label, qs in self.questions.items():
            for k in range(step * self.per_class, (step + 1) * self.per_class):
                epoch, i = divmod(k, len(qs))
                order = list(range(len(qs)))
                random.Random(self.seed * 7919 + epoch * 2 + label).shuffle(order)
                picked.append(qs[order[i]])
                labels.append(label)
        return self.rows(picked, labels)

    def loss(self, model, step: int, rank: int = 0, world: int = 1, bf16: bool = False) -> torch.Tensor:
        """This process's share of the mean logistic loss of the step's centred scores against the labels.

        Under torchrun question i goes to rank i % world, and each rank returns its questions'
        summed loss over the step's question count: the gradients summed over the ranks (FSDP's
        reduce-scatter here sums, see distributed.shard) are the mean's. A rank left without a
        question scores one at weight 0: every rank joins every all-gather and reduce-scatter.
        """
        b = self.batch(step)
        n = len(b.labels)
        mine = list(range(rank, n, world)) or [0]
        rows = [q * len(REFUSAL_OPENERS) + j for q in mine for j in range(len(REFUSAL_OPENERS))]
        share = DecisionBatch(b.ids[rows], b.targets[rows], b.labels[mine])
        logits = self.scores(model, share, bf16) - self.centre
        bce = F.binary_cross_entropy_with_logits(logits, share.labels.to(logits), reduction="sum")
        return bce * (1.0 if rank < n else 0.0) / n
