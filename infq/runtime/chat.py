"""Chat prompts: a conversation rendered by the model's chat template, then tokenized.

What `infq run --chat` does, as vLLM's `LLM.chat` and llama.cpp's conversation mode do: a prompt
becomes a user turn (after an optional system turn), or a `.jsonl` record's `messages` is the whole
conversation; the model's Jinja chat template renders it with the assistant's turn opened
(`add_generation_prompt`), and the text is tokenized with special tokens parsed and none added by
the tokenizer (the template writes its own BOS where the model wants one).

The template: `--chat-template FILE` (a Jinja file, or a JSON file with a `chat_template` field), else
the model's own: tokenizer_config.json's `chat_template` or chat_template.jinja (transformers reads
both), or a GGUF's `tokenizer.chat_template`. Rendering follows transformers' documented environment
(sandboxed Jinja with trim_blocks and lstrip_blocks, loop controls, `raise_exception`, a `tojson`
filter that keeps non-ASCII text, `strftime_now`, the tokenizer's special tokens as variables), so
templates written for transformers render the same here (tests compare with `apply_chat_template`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from infq.errors import InfqError

Message = Mapping[str, Any]
_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def read_template(path: str | Path) -> str:
    """A template file: Jinja text, or JSON with a `chat_template` field (tokenizer_config.json)."""
    p = Path(path)
    if not p.is_file():
        raise InfqError(f"--chat-template {p}: no such file")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            text = _pick(json.loads(text)["chat_template"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InfqError(f"--chat-template {p}: a .json file needs a 'chat_template' field") from None
    if not text.strip():
        raise InfqError(f"--chat-template {p} is empty")
    return text


def _pick(template: Any) -> str:
    """A template as stored: a string, a {name: template} dict or a [{name, template}] list -> the default."""
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        template = {t["name"]: t["template"] for t in template}
    if isinstance(template, dict) and isinstance(template.get("default"), str):
        return template["default"]
    raise TypeError("no default chat template")


def model_template(tokenizer: Any) -> str | None:
    """The chat template the model ships with its tokenizer, or None."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    try:
        return _pick(template)
    except (TypeError, KeyError):
        return None


def special_tokens(tokenizer: Any) -> dict[str, str]:
    """The tokenizer's special token strings by name (bos_token, eos_token, ...), as templates see them."""
    out = {}
    for name in _SPECIALS:
        value = getattr(tokenizer, name, None)
        if isinstance(value, str):
            out[name] = value
    return out


def _environment() -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise _TemplateRaised(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class _TemplateRaised(Exception):
    pass


def compile_template(template: str) -> Any:
    """The template parsed once (InfqError for a Jinja syntax error)."""
    import jinja2

    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise InfqError(f"chat template: Jinja syntax error on line {e.lineno}: {e.message}") from None


def render(template: str | Any, messages: Sequence[Message], specials: Mapping[str, str] | None = None,
           add_generation_prompt: bool = True) -> str:
    """The conversation as the template (text, or `compile_template`'s result) writes it; InfqError
    for a broken template or one that refuses the conversation (its `raise_exception`, e.g. roles
    that do not alternate)."""
    import jinja2

    compiled = compile_template(template) if isinstance(template, str) else template
    try:
        return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               **dict(specials or {}))
    except _TemplateRaised as e:
        raise InfqError(f"chat template refused the conversation: {e}") from None
    except jinja2.TemplateError as e:
        raise InfqError(f"chat template failed: {type(e).__name__}: {e}") from None


def check_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    """A conversation read from a file: a non-empty list of {"role": str, "content": ...} objects."""
    if not isinstance(messages, list) or not messages:
        raise InfqError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise InfqError(f"{where}: every message needs a 'role' string and a 'content' field, got {m!r:.80}")
    return messages


class ChatEncoder:
    """Prompts -> token ids through a chat template: a string is one user turn (after `system`, if
    given); a list of messages is a whole conversation."""

    def __init__(self, tokenizer: Any, template: str | None = None, system: str | None = None,
                 model_name: str = "the model") -> None:
        template = template or model_template(tokenizer)
        if template is None:
            raise InfqError(f"{model_name} has no chat template (tokenizer_config.json 'chat_template', "
                            "chat_template.jinja or GGUF tokenizer.chat_template); pass one with --chat-template "
                            "FILE, or drop --chat/--system for plain prompts")
        self.tokenizer, self.template, self.system = tokenizer, template, system
        self.compiled = compile_template(template)
        self.specials = special_tokens(tokenizer)

    def messages(self, prompt: str | Sequence[Message]) -> list[Message]:
        if not isinstance(prompt, str):
            return list(prompt)
        turns: list[Message] = [{"role": "system", "content": self.system}] if self.system is not None else []
        return [*turns, {"role": "user", "content": prompt}]

    def text(self, prompt: str | Sequence[Message]) -> str:
        return render(self.compiled, self.messages(prompt), self.specials)

    def __call__(self, prompt: str | Sequence[Message]) -> list[int]:
        return encode_text(self.tokenizer, self.text(prompt), add_special_tokens=False)


def encode_text(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of a prompt, special tokens in the text parsed (HF tokenizers always match their
    added tokens; the GGUF SPM tokenizer does when asked, as llama.cpp does for prompts)."""
    from infq.formats.gguf_tokenizer import SpmTokenizer

    if isinstance(tokenizer, SpmTokenizer):
        return tokenizer.encode(text, add_special_tokens, parse_special=True)
    return list(tokenizer(text, add_special_tokens=add_special_tokens).input_ids)
