"""Batched text generation with a static KV cache, and a command-line chat.

Generation is two small steps, as in gpt-fast: `prefill` runs the whole (left-padded)
prompt batch once and fills the cache (a prefix the prompts share, once for all rows);
`decode_one` feeds one new token per row and reads everything before it from the cache.
Rows stop independently on any of the checkpoint's stop ids; the batch ends when every
row has stopped or `max_new_tokens` is reached. `generate_batched` runs any number of
prompts as such batches. Scoring (`token_logprobs`, `next_token_logprobs`) is the same
prefill without decoding. A prompt the model's context cannot hold is refused, naming
both lengths. `chat` is the front end the pipeline uses: many conversations, each batch
with a seed of its own, tokens and seconds tallied; with `yes_probability` and
`response_logprobs` it saves each batch in the journal it is given as the batch finishes.

    python generate.py --prompt "What is the capital of France?"
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from common.cli import FRACTION, NON_NEGATIVE, POSITIVE, Parser
from common.errors import UserError, fail_point, one_line_errors
from common.files import Journal, content_hash, stable_seed
from model import KVCache, Transformer


class PromptTooLongError(UserError):
    """A prompt longer than the model's context."""


def sample(logits, temperature: float, top_p: float, generator=None):
    """Next token per row from logits (B, V): greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p.
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(seqs: list[list[int]], pad_id: int, device):
    """Stack id lists into (B, T) with padding on the left, so every row ends on the same slot."""
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    valid = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, T - len(s) :] = torch.tensor(s, dtype=torch.long)
        valid[i, T - len(s) :] = True
    return tokens.to(device), valid.to(device)


def shared_prefix_len(prompt_ids: list[list[int]], min_len: int = 16) -> int:
    """Length of the prefix all prompts share (a system prompt, few-shot turns), or 0 if short.

    Each row keeps at least one token of its own, so every row has a last position to
    predict from.
    """
    if len(prompt_ids) < 2:
        return 0
    n = min(len(p) for p in prompt_ids) - 1
    first = prompt_ids[0]
    for i in range(n):
        if any(p[i] != first[i] for p in prompt_ids[1:]):
            n = i
            break
    return n if n >= min_len else 0


def context_room(model: Transformer, prompt_ids: list[list[int]], reply: bool) -> int:
    """Tokens of the model's context left after the longest prompt. A prompt the context cannot
    hold (with one token of reply, when generating) is refused with both lengths named: past its
    trained positions a model writes nothing useful, however long it is given."""
    longest, context = max(map(len, prompt_ids)), model.config.max_seq_len
    if longest + reply > context:
        raise PromptTooLongError(
            f"a prompt of {longest} tokens does not fit the model's context of {context} tokens "
            f"(max_position_embeddings){' with room for a reply' if reply else ''}; shorten it."
        )
    return context - longest


class Prefilled(NamedTuple):
    """A batch of prompts after prefill: the cache holds them, ready for decoding."""

    cache: KVCache
    prefix_len: int  # P: tokens every row shares, computed once (0: none)
    h_prefix: torch.Tensor | None  # (P, dim) hidden states of the shared prefix
    h: torch.Tensor  # (B, T, dim) hidden states of each row's own part, left-padded to T


def prefill(model: Transformer, prompt_ids: list[list[int]], pad_id: int, decode_slots: int = 0) -> Prefilled:
    """Run a batch of prompts through the model once, into a new cache with room for decode_slots more.

    Prompts that start the same way (few-shot exemplars) cost one prefill of that prefix
    instead of B: it runs as one row and is copied into every row's first slots. Each row's
    own part follows, left-padded after the prefix: the padding sits mid-row, which the
    per-row positions and mask already allow.
    """
    device = model.embed_tokens.weight.device
    context_room(model, prompt_ids, reply=decode_slots > 0)
    P = shared_prefix_len(prompt_ids)
    tokens, valid = left_pad([p[P:] for p in prompt_ids], pad_id, device)
    cache = model.new_cache(len(prompt_ids), P + tokens.shape[1] + decode_slots)
    h_prefix = None
    if P:
        one = model.new_cache(1, P)
        h_prefix = model.hidden_states(torch.tensor([prompt_ids[0][:P]], device=device), None, one)[0]
        cache.copy_prefix(one)
    return Prefilled(cache, P, h_prefix, model.hidden_states(tokens, valid, cache))


def last_logits(model: Transformer, h: torch.Tensor) -> torch.Tensor:
    """Next-token logits (B, V) from each row's last position of hidden states (B, T, dim).

    Only the last position's logits are needed, so the output projection (a fifth of a
    small model's prefill work: V x dim per token) runs on B rows, not B x T.
    """
    return F.linear(h[:, -1], model.lm_head_weight)


def decode_one(model: Transformer, token, cache):
    """One step: feed one token per row (B,), get the logits of the next one (B, V)."""
    return model(token[:, None], None, cache)[:, -1]


@torch.inference_mode()
def generate_ids(
    model: Transformer,
    prompt_ids: list[list[int]],
    stop_ids,
    pad_id: int,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator=None,
    on_token=None,
) -> list[list[int]]:
    """New ids for one batch of prompts (stop ids not included).

    on_token(row, token_id) is called as each token is accepted, for streaming.
    """
    device = model.embed_tokens.weight.device
    max_new_tokens = min(max_new_tokens, context_room(model, prompt_ids, reply=True))  # stop where the context ends
    cache, _, _, h = prefill(model, prompt_ids, pad_id, decode_slots=max_new_tokens)
    B = len(prompt_ids)
    stop = torch.tensor(sorted(set(stop_ids)), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n_new = torch.full((B,), max_new_tokens, device=device)  # tokens kept per row
    out = []
    logits = last_logits(model, h)
    for step in range(max_new_tokens):
        nxt = sample(logits, temperature, top_p, generator)
        stopped = torch.isin(nxt, stop) & ~done
        n_new = torch.where(stopped, step, n_new)
        done |= stopped
        nxt = nxt.masked_fill(done, pad_id)  # finished rows keep stepping on padding
        out.append(nxt)
        if on_token is not None:
            for row in (~done).nonzero().flatten().tolist():
                on_token(row, int(nxt[row]))
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = decode_one(model, nxt, cache)
    rows = torch.stack(out, dim=1).tolist() if out else [[] for _ in range(B)]
    return [row[:n] for row, n in zip(rows, n_new.tolist())]


def generate_batched(
    model: Transformer,
    prompt_ids: list[list[int]],
    stop_ids,
    pad_id: int,
    *,
    batch_size: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator_for=lambda start: None,
    order: list[int] | None = None,
    on_token=None,
) -> list[list[int]]:
    """New ids (stop ids not included) for any number of prompts, returned in input order.

    Prompts are taken in `order` (default: as given), batch_size at a time; the batch that
    starts at position `start` of that order samples with generator_for(start).
    on_token(index into prompt_ids, token_id) streams tokens as they are accepted.
    """
    order = list(range(len(prompt_ids))) if order is None else order
    new_ids = [None] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        stream = None if on_token is None else (lambda row, t, b=batch: on_token(b[row], t))
        new = generate_ids(
            model,
            [prompt_ids[i] for i in batch],
            stop_ids,
            pad_id,
            max_new_tokens,
            temperature,
            top_p,
            generator_for(start),
            stream,
        )
        for i, n in zip(batch, new):
            new_ids[i] = n
    return new_ids


def generate(
    model: Transformer,
    tokenizer,
    prompts,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    batch_size: int = 16,
    on_token=None,
) -> list[str]:
    """Replies to `prompts` (each a list of chat messages, or a string for one user turn).

    Prompts are sorted by length into batches of `batch_size` so rows of a batch need little
    padding, and all batches draw from one generator; replies come back in the order of
    `prompts`. Same seed, same replies.
    """
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True) for p in prompts]
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    new = generate_batched(
        model,
        ids,
        tokenizer.stop_ids,
        tokenizer.pad_id,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        generator_for=lambda start: generator,
        order=sorted(range(len(ids)), key=lambda i: len(ids[i])),
        on_token=on_token,
    )
    return [tokenizer.decode(n) for n in new]


# -----------------------------------------------------------------------------
# Scoring: prefill without decoding


@torch.inference_mode()
def token_logprobs(model: Transformer, seqs: list[list[int]], batch_size: int = 8) -> list[torch.Tensor]:
    """log p(seq[t] | seq[:t]) for t = 1 .. len-1 of each id sequence, as fp32 CPU tensors.

    What scoring needs: the likelihood of a reference answer, of a harmful phrase under two
    instructions, of a judge's "Yes". A prefix shared by a batch is run once through the
    cache; logits are formed one row at a time, so a batch never holds B x T x V of them.
    """
    device = model.embed_tokens.weight.device
    W = model.lm_head_weight.float()  # scores from fp32 logits, also for a bf16 model (see next_token_logprobs)
    out = []
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start : start + batch_size]
        _, P, h_prefix, h = prefill(model, batch, 0)
        prefix_logp = None if h_prefix is None else torch.log_softmax(h_prefix.float() @ W.T, dim=-1)  # (P, V)
        for row, s in zip(h, batch):
            own = row[h.shape[1] - (len(s) - P) :]  # this row's own positions
            logp = torch.log_softmax(own[:-1].float() @ W.T, dim=-1)
            if prefix_logp is not None:
                logp = torch.cat([prefix_logp, logp])
            target = torch.tensor(s[1:], device=device)
            out.append(logp.gather(-1, target[:, None]).squeeze(-1).cpu())
    return out


@torch.inference_mode()
def next_token_logprobs(model: Transformer, seqs: list[list[int]], batch_size: int = 8) -> torch.Tensor:
    """log-softmax over the vocabulary of the token after each sequence: (N, V), fp32 on CPU.

    A prefill without decoding; a prefix shared by a batch (a few-shot judge prompt) is
    computed once, as in generation. The output projection runs in fp32 even for a bf16
    model: bf16 logits are rounded to steps of 1/16 to 1/8 at their usual size, which made
    the judge's P(Yes) of different texts tie (equal scores, no ranking between them).
    """
    W = model.lm_head_weight.float()
    out = []
    for start in range(0, len(seqs), batch_size):
        h = prefill(model, seqs[start : start + batch_size], 0).h
        out.append(torch.log_softmax(h[:, -1].float() @ W.T, dim=-1).cpu())
    return torch.cat(out)


# -----------------------------------------------------------------------------
# The pipeline's front end: many conversations at once, reproducible per batch, and
# the scores read from one forward pass (what a model judging or scoring its own text needs)


@dataclass
class Tally:
    """Tokens the model generated and the seconds that took: the pipeline's tokens/s."""

    tokens: int = 0
    seconds: float = 0.0

    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class GenSettings:
    """How to generate, plus what every call made with these settings shares (dataclasses.replace
    keeps both): a running tally, and the journal of the run, if it keeps one (in_batches)."""

    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 0.9
    batch_size: int = 32
    tally: Tally = field(default_factory=Tally, repr=False, compare=False)
    journal: Journal | None = field(default=None, repr=False, compare=False)


def in_batches(items: list, batch_size: int, compute, key: tuple, journal: Journal | None) -> list:
    """compute(batch, start) for each batch of items, the results (JSON lists) concatenated.

    With a journal (`ptalign.py generate` keeps one), each batch's result is saved in it as it
    finishes, or read back if an interrupted run saved it. A batch's result depends only on its
    own seed and items (its key), so a resumed run ends exactly as an uninterrupted one, having
    lost at most the batch that was running.
    """
    out = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        name = content_hash(*key, start, batch) if journal else None
        result = journal.get(name) if journal else None
        if result is None:
            result = compute(batch, start)
            if journal:
                journal.put(name, result)
                fail_point(f"batch {journal.written}")
        out += result
    return out


def trim_to_sentence(text: str) -> str:
    """Cut text back to the end of its last complete sentence, if it has one.

    A reply stopped by the token limit usually ends mid-sentence; as training data that
    would teach the model to stop mid-thought, so what follows the last full stop goes.
    """
    ends = list(re.finditer(r"[.!?][\"')\]]*(?=\s|$)", text))
    return text[: ends[-1].end()] if ends else text


def chat(
    model, tok, conversations, gen: GenSettings, seed, greedy=False, reply_starts=None, whole_sentences=False
) -> list[str]:
    """Replies to many conversations, in fixed batches, each batch with its own derived seed.

    reply_starts: text the assistant's reply is made to begin with (one per conversation);
    the returned reply is what the model wrote after it. whole_sentences: a reply cut off
    by max_new_tokens is trimmed to its last complete sentence. The batches and their seeds
    depend only on the list, so the same list gives the same replies, whether a run was
    interrupted and resumed or not.
    """
    ids = [tok.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    if reply_starts is not None:
        ids = [i + tok.encode(s) for i, s in zip(ids, reply_starts)]
    device = model.embed_tokens.weight.device
    temperature = 0.0 if greedy else gen.temperature

    def batch_replies(batch, start):
        t0 = time.perf_counter()
        new = generate_batched(
            model,
            batch,
            tok.stop_ids,
            tok.pad_id,
            batch_size=gen.batch_size,
            max_new_tokens=gen.max_new_tokens,
            temperature=temperature,
            top_p=gen.top_p,
            generator_for=lambda _: torch.Generator(device=device).manual_seed(stable_seed(seed, start)),
        )
        gen.tally.tokens += sum(map(len, new))
        gen.tally.seconds += time.perf_counter() - t0
        return new

    settings = (temperature, gen.top_p, gen.max_new_tokens)
    new = in_batches(ids, gen.batch_size, batch_replies, ("chat", seed, settings), gen.journal)
    replies = [tok.decode(n).strip() for n in new]
    if whole_sentences:  # a reply as long as max_new_tokens had no stop token: it was cut off
        replies = [trim_to_sentence(r) if len(n) == gen.max_new_tokens else r for r, n in zip(replies, new)]
    return replies


def yes_probability(model, tok, prompts: list[str], batch_size: int = 8, journal=None) -> list[float]:
    """P("Yes") / (P("Yes") + P("No")) for the first token of the reply to each prompt.

    Reading the judge's answer from its next-token probabilities, instead of parsing text it
    generates, gives a number for every sample, even from a small model.
    """
    seqs = [tok.apply_chat_template(p, add_generation_prompt=True) for p in prompts]
    yes, no = tok.encode("Yes")[0], tok.encode("No")[0]

    def batch_probs(batch, start):
        logp = next_token_logprobs(model, batch, batch_size)
        return torch.sigmoid(logp[:, yes] - logp[:, no]).tolist()

    return in_batches(seqs, batch_size, batch_probs, ("yes", yes, no), journal)


def response_logprobs(model, tok, conversations, responses: list[list[int]], batch_size: int = 8, journal=None):
    """Per-token log p(response | conversation in the chat template), one tensor per pair.

    What scoring needs: the likelihood of a reference answer, or of a toxic response under
    two different instructions.
    """
    prompts = [tok.apply_chat_template(c) for c in conversations]
    score = lambda batch, start: [lp.tolist() for lp in token_logprobs(model, batch, batch_size)]
    logp = in_batches([p + r for p, r in zip(prompts, responses)], batch_size, score, ("logprobs",), journal)
    return [torch.tensor(lp, dtype=torch.float32)[len(p) - 1 :] for lp, p in zip(logp, prompts)]


# -----------------------------------------------------------------------------
# Command line


def default_device_dtype(device: str | None, dtype: str | None):
    """cuda with bf16 when there is a GPU, else cpu with fp32 (bf16 matmuls are slow on most CPUs)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return torch.device(device), getattr(torch, dtype)


def load(model_dir: str | None, device: str | None = None, dtype: str | None = None):
    """Model and tokenizer from a checkpoint directory, or the embedded default model."""
    from data import Tokenizer, default_model_path

    path = model_dir or default_model_path()
    device, dtype = default_device_dtype(device, dtype)
    return Transformer.from_pretrained(path, dtype=dtype, device=device), Tokenizer.from_pretrained(path)


def stream_reply(model, tokenizer, messages, args) -> str:
    """Generate one reply, printing text as it arrives, and say how fast it was."""
    new_ids, printed = [], ""

    def on_token(row, token):
        nonlocal printed
        new_ids.append(token)
        text = tokenizer.decode(new_ids)
        # Byte-level tokens can end inside a UTF-8 character; wait until it is whole.
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text

    t0 = time.perf_counter()
    reply = generate(
        model, tokenizer, [messages], args.max_new_tokens, args.temperature, args.top_p, args.seed, on_token=on_token
    )[0]
    dt = time.perf_counter() - t0
    sys.stdout.write(reply[len(printed) :] + "\n")
    sys.stdout.flush()
    print(f"[{len(new_ids)} tokens in {dt:.1f} s, {len(new_ids) / max(dt, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return reply


def build_parser() -> Parser:
    p = Parser(
        description="Chat with a LLaMA-family checkpoint (default: the embedded "
        "SmolLM2-135M-Instruct). With --prompt, answer once; without, chat on stdin."
    )
    p.add_argument(
        "--model",
        help="checkpoint directory (config.json, safetensors, tokenizer); "
        "default: the embedded default model, fetched and converted on first use",
    )
    p.add_argument(
        "--prompt",
        action="append",
        help="a user message; repeat for a batch (answered "
        "together, printed in order). Without it, an interactive chat reads stdin",
    )
    p.add_argument("--system", help="an optional system message put before each prompt")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=256, help="stop after this many new tokens (default 256)")
    p.add_argument(
        "--temperature",
        type=NON_NEGATIVE,
        default=0.0,
        help="0 for greedy decoding (default), else the softmax temperature for sampling",
    )
    p.add_argument(
        "--top-p",
        type=FRACTION,
        default=1.0,
        help="nucleus sampling: keep the smallest set of tokens whose probability reaches this mass (default 1.0: all)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: none)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype (default: bfloat16 on cuda, float32 on cpu)",
    )
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    with one_line_errors(lambda: "generate.py writes no file, so there is nothing to resume."):
        run(args)


def run(args) -> None:
    """Answer --prompt (one streamed, or several as a batch), or chat on stdin."""
    model, tokenizer = load(args.model, args.device, args.dtype)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt and len(args.prompt) == 1:
        stream_reply(model, tokenizer, system + [{"role": "user", "content": args.prompt[0]}], args)
    elif args.prompt:
        t0 = time.perf_counter()
        replies = generate(
            model,
            tokenizer,
            [system + [{"role": "user", "content": q}] for q in args.prompt],
            args.max_new_tokens,
            args.temperature,
            args.top_p,
            args.seed,
        )
        for q, r in zip(args.prompt, replies):
            print(f"> {q}\n{r}\n")
        print(f"[{len(replies)} replies in {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    else:
        history = list(system)
        print("Chat with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                break
            if not line:
                break
            history.append({"role": "user", "content": line})
            history.append({"role": "assistant", "content": stream_reply(model, tokenizer, history, args)})


if __name__ == "__main__":
    main()
