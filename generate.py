"""Batched text generation with a static KV cache, and a command-line chat.

Generation is two small steps, as in gpt-fast: `prefill` runs the whole (left-padded)
prompt batch once and fills the cache; `decode_one` feeds one new token per row and reads
everything before it from the cache. Rows stop independently on any of the checkpoint's
stop ids; the batch ends when every row has stopped or `max_new_tokens` is reached.

    python generate.py --prompt "What is the capital of France?"
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from model import Transformer


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


def prefill(model: Transformer, tokens, valid, cache):
    """Run the prompts through the model, filling the cache; the logits of each last position (B, V).

    Only the last position's logits are needed, so the output projection (a fifth of a
    small model's prefill work: V x dim per token) runs on B rows, not B x T.
    """
    h = model.hidden_states(tokens, valid, cache)[:, -1]  # (B, dim)
    return F.linear(h, model.lm_head_weight)


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


def prefill_shared(model: Transformer, prefix: list[int], cache):
    """Fill the first slots of every row's cache with one shared prefix, computed once.

    Prompts that start the same way (few-shot exemplars) then cost one prefill of the
    prefix instead of B. Each row's own part follows, left-padded after the prefix: the
    padding sits mid-row, which the per-row positions and mask already allow.
    """
    one = model.new_cache(1, len(prefix))
    h = model.hidden_states(torch.tensor([prefix], device=cache.valid.device), None, one)  # (1, P, dim)
    for layer in range(len(cache.k)):
        cache.k[layer][:, :, : len(prefix)] = one.k[layer]
        cache.v[layer][:, :, : len(prefix)] = one.v[layer]
    cache.valid[:, : len(prefix)] = True
    cache.length = len(prefix)
    return h


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
    P = shared_prefix_len(prompt_ids)
    tokens, valid = left_pad([p[P:] for p in prompt_ids], pad_id, device)
    B, T = tokens.shape
    cache = model.new_cache(B, P + T + max_new_tokens)
    stop = torch.tensor(sorted(set(stop_ids)), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n_new = torch.full((B,), max_new_tokens, device=device)  # tokens kept per row
    out = []
    if P:
        prefill_shared(model, prompt_ids[0][:P], cache)
    logits = prefill(model, tokens, valid, cache)
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
    padding; replies come back in the order of `prompts`. Same seed, same replies.
    """
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True) for p in prompts]
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    replies = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        stream = None if on_token is None else (lambda row, t, b=batch: on_token(b[row], t))
        new = generate_ids(
            model,
            [ids[i] for i in batch],
            tokenizer.stop_ids,
            tokenizer.pad_id,
            max_new_tokens,
            temperature,
            top_p,
            generator,
            stream,
        )
        for i, n in zip(batch, new):
            replies[i] = tokenizer.decode(n)
    return replies


def right_pad(seqs: list[list[int]], pad_id: int, device):
    """Stack id lists into (B, T) with padding on the right: under causal attention a real
    token never sees the padding after it, so no mask is needed when only scoring."""
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return tokens.to(device)


@torch.inference_mode()
def token_logprobs(model: Transformer, seqs: list[list[int]], batch_size: int = 8) -> list[torch.Tensor]:
    """log p(seq[t] | seq[:t]) for t = 1 .. len-1 of each id sequence, as fp32 CPU tensors.

    What scoring needs: the likelihood of a reference answer, of a harmful phrase under two
    instructions, of a judge's "Yes". A prefix shared by a batch is run once through the
    cache; logits are formed one row at a time, so a batch never holds B x T x V of them.
    """
    device = model.embed_tokens.weight.device
    W = model.lm_head_weight
    out = []
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start : start + batch_size]
        P = shared_prefix_len(batch)
        tokens, valid = left_pad([s[P:] for s in batch], 0, device)
        cache = model.new_cache(len(batch), P + tokens.shape[1])
        prefix_logp = None
        if P:
            h_prefix = prefill_shared(model, batch[0][:P], cache)[0]  # (P, dim)
            prefix_logp = torch.log_softmax((h_prefix @ W.T).float(), dim=-1)  # (P, V)
        h = model.hidden_states(tokens, valid, cache)  # (B, T, dim)
        for row, s in zip(h, batch):
            own = row[tokens.shape[1] - (len(s) - P) :]  # this row's own positions
            logp = torch.log_softmax((own[:-1] @ W.T).float(), dim=-1)
            if prefix_logp is not None:
                logp = torch.cat([prefix_logp, logp])
            target = torch.tensor(s[1:], device=device)
            out.append(logp.gather(-1, target[:, None]).squeeze(-1).cpu())
    return out


def next_token_logprobs(model: Transformer, seqs: list[list[int]], batch_size: int = 8) -> torch.Tensor:
    """log-softmax over the vocabulary of the token after each sequence: (N, V), fp32 on CPU.

    A prefill without decoding; a prefix shared by a batch (a few-shot judge prompt) is
    computed once, as in generation.
    """
    device = model.embed_tokens.weight.device
    out = []
    with torch.inference_mode():
        for start in range(0, len(seqs), batch_size):
            batch = seqs[start : start + batch_size]
            P = shared_prefix_len(batch)
            tokens, valid = left_pad([s[P:] for s in batch], 0, device)
            cache = model.new_cache(len(batch), P + tokens.shape[1])
            if P:
                prefill_shared(model, batch[0][:P], cache)
            out.append(torch.log_softmax(prefill(model, tokens, valid, cache).float(), dim=-1).cpu())
    return torch.cat(out)


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


def main(argv=None):
    p = argparse.ArgumentParser(
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
    p.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many new tokens (default 256)")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 for greedy decoding (default), else the softmax temperature for sampling",
    )
    p.add_argument(
        "--top-p",
        type=float,
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
    args = p.parse_args(argv)
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
