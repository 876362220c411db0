"""Chat templates (Jinja) rendered the way transformers renders them: a sandboxed environment
(templates come from checkpoints: untrusted code) with trim_blocks / lstrip_blocks and loop
controls, `raise_exception(msg)`, `strftime_now(fmt)` and a `tojson` filter that does not
escape HTML. The `{% generation %}` tag (assistant masks for training) is not supported."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache


@lru_cache(maxsize=16)
def _compile(template: str):
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as err:  # transformers needs it too; vlmfast only for chat templates
        raise ImportError("apply_chat_template needs jinja2: pip install jinja2") from err

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise ValueError(f"chat_template: not a valid Jinja template ({err})") from err


def render_chat_template(template: str, messages: list[dict], *, add_generation_prompt: bool = False,
                         **variables) -> str:
    """The prompt text of one conversation. messages: [{"role": str, "content": str | list}]."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise TypeError(f"messages[{i}]: expected a dict with 'role' and 'content', got {message!r}")
    return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
