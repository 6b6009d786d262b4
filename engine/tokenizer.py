"""Text <-> token ids, and chat prompts: a thin wrapper over a `tokenizers.Tokenizer`.

Built by `engine.loader.load_tokenizer` from a model directory's tokenizer.json and
tokenizer_config.json. Chat templates render in a sandboxed Jinja environment set up the way
HF transformers does it (trim_blocks, lstrip_blocks, loop controls, raise_exception, tojson that
keeps non-ASCII), so a prompt renders to the same text as `apply_chat_template(tokenize=False)`.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from typing import Any

import tokenizers


class ChatTemplateError(ValueError):
    """The model has no chat template, it does not compile, or it raised while rendering."""


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id: int | None = None,
                 eos_token_ids: Sequence[int] = (), chat_template: str | None = None,
                 special_tokens: dict[str, str] | None = None):
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)
        self.chat_template = chat_template
        # names the template may use: bos_token, eos_token, pad_token, unk_token
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)

    @classmethod
    def from_hf_config(cls, backend: tokenizers.Tokenizer, tokenizer_config: dict[str, Any], *,
                       chat_template: str | None = None, bos_token_id: int | None = None,
                       eos_token_ids: Sequence[int] = ()) -> Tokenizer:
        """From a tokenizer_config.json's special tokens and chat template. `chat_template` (a
        chat_template.jinja file) wins over the config's; the ids (from config.json and
        generation_config.json) fill in a missing bos and add end-of-sequence ids."""
        special = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = tokenizer_config.get(key)
            if isinstance(value, dict):  # older files spell them as AddedToken dicts
                value = value.get("content")
            if isinstance(value, str):
                special[key] = value
        template = chat_template or tokenizer_config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        eos = [backend.token_to_id(special["eos_token"])] if "eos_token" in special else []
        bos = backend.token_to_id(special["bos_token"]) if "bos_token" in special else None
        return cls(backend, bos_token_id=bos if bos is not None else bos_token_id,
                   eos_token_ids=tuple(dict.fromkeys(i for i in eos + list(eos_token_ids) if i is not None)),
                   chat_template=template, special_tokens=special)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (like <|im_start|>) stay whole;
        add_special_tokens adds what the model's post-processor asks for (e.g. BOS), if anything."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}]); `extra` (tools, ...)
        is passed to the template as is. Encode the result with add_special_tokens=False."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens, **extra)
        except ChatTemplateError:
            raise
        except Exception as e:  # jinja errors, SecurityError, a template's own raise_exception
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e

    @cached_property
    def _template(self) -> Any:
        # compiled on first use: a model whose template we cannot compile still serves plain prompts
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template (tokenizer_config.json chat_template)")
        from jinja2.exceptions import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template)
        except TemplateError as e:
            raise ChatTemplateError(f"chat template does not compile: {e}") from e


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; prompts need the plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template: {message}")
