"""Chat prompts: the model's Jinja chat template, rendered in a sandbox.

Where the template comes from, first found wins:
  1. ``chat_template.jinja`` in the model directory (what recent transformers save);
  2. ``chat_template`` in ``tokenizer_config.json`` (a string, or a list of named
     templates, of which ``default`` is used);
  3. :data:`DEFAULT_CHATML_TEMPLATE`:

         <|im_start|>{role}\\n{content}<|im_end|>\\n   (each message)
         <|im_start|>assistant\\n                      (the generation prompt)

Rendering follows transformers' ``apply_chat_template``: variables ``messages``,
``add_generation_prompt=True``, ``bos_token``, ``eos_token``; helpers ``raise_exception``
and ``strftime_now``; ``trim_blocks``/``lstrip_blocks`` and the ``loopcontrols``
extension; an ``ImmutableSandboxedEnvironment``, since a template is code from the
checkpoint. A ChatML template (one that writes ``<|im_end|>``) ends a turn with
``<|im_end|>``, which is not the model's EOS for many checkpoints, so unless the EOS is
``<|im_end|>`` the request also stops on it: by token id when the vocabulary has it as one
token (a special token is never rendered as text, so a stop string would not see it, and
would hold streamed text back by its length for nothing), else as a stop string.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.engine.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

DEFAULT_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_END = "<|im_end|>"


class ChatTemplateError(Exception):
    """The template refused or failed on the messages (a client error: HTTP 400)."""


@dataclass(frozen=True)
class TemplateStops:
    """Stop conditions a template implies, added to the client's own."""

    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "",
                 tokenizer: TextTokenizer | None = None, origin: str = "default ChatML"):
        self.source = source
        self.origin = origin
        """Where the template came from (for logs and errors)."""
        self.bos_token, self.eos_token = bos_token, eos_token
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(source)  # TemplateSyntaxError: a broken checkpoint, fail at start-up
        self.stops = _chatml_stops(tokenizer, eos_token) if CHATML_END in source else TemplateStops()

    @classmethod
    def from_model_dir(cls, model_dir: Path | None, tokenizer: TextTokenizer | None) -> "ChatTemplate":
        """The checkpoint's template, or the default ChatML one when it has none."""
        if model_dir is None:
            return cls(DEFAULT_CHATML_TEMPLATE, tokenizer=tokenizer)
        config_path = Path(model_dir) / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        jinja_path = Path(model_dir) / "chat_template.jinja"
        if jinja_path.is_file():
            return cls(jinja_path.read_text(), bos, eos, tokenizer, str(jinja_path))
        source = _named_template(config.get("chat_template"))
        if source is None:
            log.info("%s has no chat template; using the default ChatML template", model_dir)
            return cls(DEFAULT_CHATML_TEMPLATE, bos, eos, tokenizer)
        return cls(source, bos, eos, tokenizer, str(config_path))

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text for ``messages``, ending with the assistant's generation prompt."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=True,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:  # raise_exception, sandbox violations, undefined names
            raise ChatTemplateError(f"the chat template refused these messages: {e}") from None
        except Exception as e:  # a template's own bug on unusual input (e.g. a role it does not expect)
            raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None

    def encode(self, tokenizer: TextTokenizer, prompt: str) -> list[int]:
        """Token ids of a rendered prompt. A template that writes the BOS text itself gets one
        BOS, not two, when the tokenizer's post-processor adds one as well."""
        ids = tokenizer.encode(prompt)
        bos_id = tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        if bos_id is not None and prompt.startswith(self.bos_token) and ids[:2] == [bos_id, bos_id]:
            ids = ids[1:]
        return ids


def _chatml_stops(tokenizer: TextTokenizer | None, eos_token: str) -> TemplateStops:
    if eos_token == CHATML_END:
        return TemplateStops()
    end_id = tokenizer.token_to_id(CHATML_END) if tokenizer is not None else None
    if end_id is None:
        return TemplateStops(stop=(CHATML_END,))
    return TemplateStops(stop_token_ids=(end_id,))


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken dict, or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _named_template(value: Any) -> str | None:
    if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value else None


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, separators=None, sort_keys: bool = False,
            ensure_ascii: bool = False) -> str:
    """transformers' tojson: no HTML escaping, non-ASCII kept."""
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)
