"""The checkpoint's own tokenizer and chat template: text to ids and back.

A LLaMA-family checkpoint ships its tokenizer in one of two forms: `tokenizer.json` (the
`tokenizers` library; byte-level BPE for Llama 3, Qwen2, SmolLM2) or `tokenizer.model`
(a sentencepiece model; Llama 2, Mistral v0.1). The chat template is a Jinja program in
`tokenizer_config.json["chat_template"]` or `chat_template.jinja`. It is rendered in a
sandbox, like transformers does, because it is code that came with a download.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

from common.errors import UserError
from common.files import read_json


class TokenizerError(UserError):
    """A tokenizer directory that cannot be used; the message names the file or key."""


def _token_text(tok) -> str | None:
    """Special tokens are stored either as a string or as {"content": ...}."""
    return tok.get("content") if isinstance(tok, dict) else tok


def _read_json(file: Path) -> dict:
    """An optional JSON file of the checkpoint: {} when absent, an error naming it when broken."""
    return read_json(file, TokenizerError) if file.is_file() else {}


def _chat_template(path: Path, config: dict) -> tuple[str | None, Path]:
    """The chat template and the file it comes from: chat_template.jinja, else tokenizer_config.json."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8"), path / "chat_template.jinja"
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template, path / "tokenizer_config.json"


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


class Tokenizer:
    """encode / decode / apply_chat_template over either tokenizer backend."""

    def __init__(self, path: Path, backend, kind: str, config: dict, chat_template: str | None, stop_ids: list[int]):
        self.path, self.backend, self.kind = path, backend, kind
        self.config = config
        self.chat_template = chat_template
        self.template_file = path / "tokenizer_config.json"  # where the template came from, for errors
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        # Every special token string and its id: the template writes them as text and
        # encoding must turn them back into single ids, never into their characters.
        self.special_ids = self._special_ids()
        self.stop_ids = stop_ids or _as_list(self.special_ids.get(self.eos_token))
        pad = self.special_ids.get(self.pad_token) if self.pad_token else None
        self.pad_id = pad if pad is not None else (self.stop_ids[0] if self.stop_ids else 0)

    @classmethod
    def from_pretrained(cls, path) -> Tokenizer:
        """Load the tokenizer, chat template and stop ids of a checkpoint directory."""
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"{path}: tokenizer directory does not exist.")
        config = _read_json(path / "tokenizer_config.json")
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            try:
                backend, kind = HFTokenizer.from_file(str(path / "tokenizer.json")), "tokenizers"
            except Exception as e:
                raise TokenizerError(f"{path / 'tokenizer.json'}: cannot be read ({e}).") from None
        elif (path / "tokenizer.model").is_file():
            import sentencepiece as spm

            try:
                backend, kind = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model")), "sentencepiece"
            except Exception as e:
                raise TokenizerError(f"{path / 'tokenizer.model'}: cannot be read ({e}).") from None
        else:
            raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model found.")
        template, template_file = _chat_template(path, config)
        # Stop on every end-of-sequence id the checkpoint names: Llama 3 has three.
        stop_ids = []
        for file in ("generation_config.json", "config.json"):
            for i in _as_list(_read_json(path / file).get("eos_token_id")):
                if i not in stop_ids:
                    stop_ids.append(i)
        tok = cls(path, backend, kind, config, template, stop_ids)
        tok.template_file = template_file
        eos = tok.special_ids.get(tok.eos_token)
        if eos is not None and eos not in tok.stop_ids:
            tok.stop_ids.append(eos)
        return tok

    def _special_ids(self) -> dict[str, int]:
        ids = {}
        for i, tok in (self.config.get("added_tokens_decoder") or {}).items():
            if tok.get("special", True):
                ids[tok["content"]] = int(i)
        if self.kind == "tokenizers":
            for tok in (
                self.backend.get_added_tokens_decoder().values()
                if hasattr(self.backend, "get_added_tokens_decoder")
                else []
            ):
                if tok.special:
                    ids.setdefault(tok.content, self.backend.token_to_id(tok.content))
        for text in (self.bos_token, self.eos_token, self.pad_token, _token_text(self.config.get("unk_token"))):
            if text and text not in ids:
                i = self._piece_id(text)
                if i is not None:
                    ids[text] = i
        return ids

    def _piece_id(self, text: str) -> int | None:
        if self.kind == "tokenizers":
            return self.backend.token_to_id(text)
        i = self.backend.piece_to_id(text)
        return None if i == self.backend.unk_id() and text != self.backend.id_to_piece(i) else i

    # -------------------------------------------------------------------------
    # text <-> ids

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, with no BOS/EOS added; special-token strings in it become their ids."""
        return self.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and, for each, the (start, end) character span of `text` it came from.

        Offsets are what lets a character span (a harmful phrase) become a token mask that
        does not depend on which tokenizer produced the ids.
        """
        if self.kind == "tokenizers":
            enc = self.backend.encode(text, add_special_tokens=False)
            return list(enc.ids), [tuple(o) for o in enc.offsets]
        # sentencepiece knows nothing of chat-template special strings: split them out first.
        ids, offsets = [], []
        pattern = "|".join(re.escape(s) for s in sorted(self.special_ids, key=len, reverse=True))
        pos = 0
        for m in list(re.finditer(pattern, text)) if pattern else []:
            self._sp_encode(text, pos, m.start(), ids, offsets)
            ids.append(self.special_ids[m.group()])
            offsets.append((m.start(), m.end()))
            pos = m.end()
        self._sp_encode(text, pos, len(text), ids, offsets)
        return ids, offsets

    def _sp_encode(self, text, start, end, ids, offsets):
        """sentencepiece ids of text[start:end] and their character offsets into text."""
        if start >= end:
            return
        enc = self.backend.encode(text[start:end], return_type="offset_mapping")
        ids += enc["ids"]
        offsets += [(start + s, start + e) for s, e in enc["offsets"]]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (template markers, EOS) are dropped by default."""
        ids = [int(i) for i in ids]
        if self.kind == "tokenizers":
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        special = set(self.special_ids.values())
        if skip_special_tokens:
            return self.backend.decode([i for i in ids if i not in special])
        out, run = [], []
        for i in ids:
            if i in special:
                out.append(self.backend.decode(run) + self.backend.id_to_piece(i))
                run = []
            else:
                run.append(i)
        return "".join(out) + self.backend.decode(run)

    # -------------------------------------------------------------------------
    # chat template

    def render_chat(self, messages, add_generation_prompt: bool = True) -> str:
        """The chat template's text for `messages` (a list of {"role", "content"} or one string)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not self.chat_template:
            raise TokenizerError(
                f"{self.path / 'tokenizer_config.json'}: no 'chat_template' "
                "(and no chat_template.jinja); this checkpoint has no chat format."
            )
        specials = {
            k: _token_text(v)
            for k, v in self.config.items()
            if k.endswith("_token") and isinstance(_token_text(v), str)
        }
        try:
            template = _compile(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **specials)
        except TemplateRaised as e:
            raise TokenizerError(f"{self.template_file}: the chat template refused the messages ({e}).") from None
        except Exception as e:
            # The template is code that came with the checkpoint: whatever it raises (a syntax
            # error, the sandbox's SecurityError, OverflowError for a huge range) is its failure.
            why = f"{type(e).__name__}: {str(e).rstrip('.')}"
            raise TokenizerError(f"{self.template_file}: the chat template failed ({why}).") from None

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered chat. The template writes BOS itself, so encode adds none (no double BOS)."""
        return self.encode(self.render_chat(messages, add_generation_prompt))


_templates: dict[str, object] = {}


class TemplateRaised(Exception):
    """A chat template's own raise_exception("..."): it refuses the messages it was given."""


def _compile(source: str):
    """Compile a chat template in a sandboxed Jinja environment with the helpers templates expect."""
    if source not in _templates:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateRaised(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        # Jinja's own tojson escapes <, > and & for HTML; templates expect plain JSON.
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _templates[source] = env.from_string(source)
    return _templates[source]
