"""Tokenizer: a ``tokenizers.Tokenizer`` plus BOS/EOS handling, chat templates and streaming decode.

Built from a Hugging Face folder (``tokenizer.json`` + ``tokenizer_config.json``) or rebuilt from
a GGUF vocabulary (see :mod:`offload.loaders.gguf`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tokenizers import Tokenizer as HFTokenizer

from .errors import InvalidRequestError, ModelLoadError


def _render_template(template: str, **context: Any) -> str:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise InvalidRequestError(f"chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(template).render(**context)
    except TemplateError as e:
        raise InvalidRequestError(f"chat template failed to render: {e}") from None


def _check_type(text: Any) -> None:
    """Text, not None, a number or bytes: the Rust tokenizer answers those with a bare TypeError."""
    if isinstance(text, (bytes, bytearray)):
        raise InvalidRequestError(f"the prompt is {type(text).__name__}, not text: decode it first, "
                                  f"e.g. data.decode('utf-8', errors='replace')")
    if not isinstance(text, str):
        raise InvalidRequestError(f"the prompt must be text (str), got {type(text).__name__}")


def _check_encodable(text: str) -> None:
    """A str can hold what UTF-8 cannot: lone surrogates, which is how Python keeps bytes that were not
    UTF-8 (sys.argv, ``errors="surrogateescape"``); the tokenizer then says "TextInputSequence must be str"."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = (f"the byte 0x{code - 0xdc00:02x}, which is not UTF-8 (a binary file or another encoding?)"
                if 0xdc80 <= code <= 0xdcff else f"a lone surrogate U+{code:04X}")
        raise InvalidRequestError(f"the prompt is not valid text: character {e.start} is {what}: "
                                  f"convert it to UTF-8 or read it with errors='replace'") from None


@dataclass
class Tokenizer:
    backend: HFTokenizer
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        _check_type(text)
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            _check_encodable(text)  # checked only on failure: valid text pays nothing
            raise

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template; run without --chat / chat=True")
        return _render_template(self.chat_template, messages=messages, add_generation_prompt=add_generation_prompt,
                                bos_token=self.bos_token, eos_token=self.eos_token)

    def token_text(self, token_id: int) -> str:
        return self.backend.id_to_token(token_id) or ""

    def sentence_end_ids(self) -> frozenset[int]:
        """Token ids that end a sentence: their text ends in . ! ? (maybe followed by closing quotes or
        brackets and spaces) or holds a line break; special tokens (BOS/EOS, chat markers) too.
        Decoding each id alone is how the model's own tokenizer says what text a token is."""
        if "sentence_end_ids" not in self.extra:
            enders, closers = ".!?", "\"')]}\u201d\u2019 \t"
            special = set(self.eos_token_ids) | ({self.bos_token_id} if self.bos_token_id is not None else set())
            ids = set()
            for i in range(self.vocab_size):
                text = self.backend.decode([i], skip_special_tokens=False)
                tail = text.rstrip(closers)
                if "\n" in text or (tail and tail[-1] in enders) or i in special:
                    ids.add(i)
            self.extra["sentence_end_ids"] = frozenset(ids)
        return self.extra["sentence_end_ids"]

    @classmethod
    def from_hf_folder(cls, folder: Path, eos_token_ids: tuple[int, ...] = ()) -> "Tokenizer":
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{folder}: no tokenizer.json; a Hugging Face model folder needs config.json, "
                                 f"*.safetensors and tokenizer.json")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises bare Exceptions on bad JSON
            raise ModelLoadError(f"{path}: cannot parse tokenizer ({e})") from None
        config: dict[str, Any] = {}
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file():
            config = json.loads(cfg_path.read_text())

        def token_str(value: Any) -> str:
            return value.get("content", "") if isinstance(value, dict) else (value or "")

        bos, eos = token_str(config.get("bos_token")), token_str(config.get("eos_token"))
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_path = folder / "chat_template.jinja"
        if template is None and jinja_path.is_file():
            template = jinja_path.read_text()
        eos_ids = list(eos_token_ids)
        if eos and backend.token_to_id(eos) is not None and backend.token_to_id(eos) not in eos_ids:
            eos_ids.append(backend.token_to_id(eos))
        return cls(backend=backend, bos_token_id=backend.token_to_id(bos) if bos else None,
                   eos_token_ids=tuple(eos_ids), chat_template=template, bos_token=bos, eos_token=eos)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting UTF-8 characters.

    Decodes a short window of recent tokens and emits what is new once it no longer ends in
    an incomplete character (U+FFFD), as streaming servers do.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-4:])  # context so that leading spaces decode right
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""
