"""Render Kimi-K2.5 prompts from OpenAI-style messages (spec section 9).

`render_chat` behaves like Hugging Face's `apply_chat_template` with Kimi's tokenizer: the
template runs in a sandboxed Jinja environment (`trim_blocks`, `lstrip_blocks`, a `tojson`
filter), and tool declarations are computed in Python as `tools_ts_str` (TypeScript style,
after a recursive key sort) before rendering, as Kimi's `tokenization_kimi.py` does.

The template text comes from the checkpoint (`chat_template.jinja`); `DEFAULT_TEMPLATE_PATH`
is kimiserve's own copy, written into generated checkpoints.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from shared.tool_declaration_ts import deep_sort, encode_tools_to_typescript

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE_PATH = Path(__file__).parent / "data" / "chat_template.jinja"
_TRUE_STRINGS = frozenset({"true", "1", "yes", "on"})
_FALSE_STRINGS = frozenset({"false", "0", "no", "off"})
# Official-API spelling: {"thinking": {"type": "enabled" | "disabled"}}.
_THINKING_TYPES = {"enabled": True, "disabled": False}


def load_chat_template(model_dir: str | Path) -> str:
    """The template text of a model directory: `chat_template.jinja`, else the
    `chat_template` string in `tokenizer_config.json`."""
    model_dir = Path(model_dir)
    path = model_dir / "chat_template.jinja"
    if path.exists():
        return path.read_text(encoding="utf-8")
    config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = config.get("chat_template")
    if not isinstance(template, str):
        raise FileNotFoundError(f"no chat template in {model_dir}")
    return template


def parse_bool(value: Any, name: str = "value") -> bool:
    """A boolean from JSON-ish input: bools, 0/1, and strings such as "false" or "True".

    Raises ValueError for anything else, so a request with `"thinking": "maybe"` becomes a
    400 instead of being read as truthy the way Jinja reads any non-empty string.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE_STRINGS:
            return True
        if lowered in _FALSE_STRINGS:
            return False
    if isinstance(value, dict) and value.get("type") in _THINKING_TYPES:
        return _THINKING_TYPES[value["type"]]
    raise ValueError(f"{name} must be a boolean, got {value!r}")


def resolve_thinking(chat_template_kwargs: dict | None) -> bool:
    """The effective thinking switch of a request; both the template and the reasoning
    parser must use this one value.

    Reads `thinking` or its alias `enable_thinking` (string booleans normalised); absent
    means on (K2.5's default). Raises ValueError when the two keys disagree or a value is not
    a boolean.
    """
    kwargs = chat_template_kwargs or {}
    values = {
        key: parse_bool(kwargs[key], key)
        for key in ("thinking", "enable_thinking")
        if kwargs.get(key) is not None
    }
    if len(set(values.values())) > 1:
        raise ValueError("chat_template_kwargs: thinking and enable_thinking disagree")
    return next(iter(values.values()), True)


def tools_typescript(tools: list[dict] | None) -> str | None:
    """`tools_ts_str` for (already key-sorted) tools, or None when the TypeScript encoder
    cannot express a schema; the template then declares the tools as JSON."""
    if not tools:
        return None
    try:
        return encode_tools_to_typescript(tools)
    except Exception as exc:  # Kimi's tokenizer falls back on any encoder error, too
        # Debug, and cut short: the client chooses the schema, so it must not choose the volume
        # of the operator's log.
        logger.debug("tool declaration falls back to JSON: %.200s", exc)
        return None


def render_chat(
    template_text: str,
    messages: list[dict],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = True,
    thinking: bool = True,
    **kwargs: Any,
) -> str:
    """The prompt text for `messages` (and optional OpenAI `tools`).

    `thinking` selects the generation prompt (`<think>` when on, `<think></think>` when off)
    and whether current-turn reasoning is kept; pass `resolve_thinking(...)` of the request.
    Extra keyword arguments reach the template as variables. Raises `jinja2.TemplateError`
    (including `SecurityError`) when the template fails.
    """
    if tools:
        tools = deep_sort(tools)
        if "tools_ts_str" not in kwargs:
            ts = tools_typescript(tools)
            if ts is not None:
                kwargs["tools_ts_str"] = ts
    template = _compile(template_text)
    return template.render(
        messages=messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        thinking=parse_bool(thinking, "thinking"),
        **kwargs,
    )


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Hugging Face's `tojson`: `json.dumps` with default separators, non-ASCII kept."""
    return json.dumps(
        value,
        ensure_ascii=ensure_ascii,
        indent=indent,
        separators=separators,
        sort_keys=sort_keys,
    )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env


@functools.lru_cache(maxsize=16)
def _compile(template_text: str) -> jinja2.Template:
    return _environment().from_string(template_text)
