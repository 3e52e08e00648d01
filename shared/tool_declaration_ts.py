"""TypeScript-style tool declarations, the format Kimi-K2.5 was trained on (spec section 9.3).

`encode_tools_to_typescript(tools)` turns OpenAI `tools` (JSON Schema parameters) into

    # Tools

    ## functions
    namespace functions {
    // description
    type NAME = (_: {
      // field description
      field: string,
      optional_field?: number
    }) => any;
    }

byte for byte as Kimi's `tool_declaration_ts.py` renders it, including its quirks (required
fields first, each group sorted by name; `integer` shown as `number`; arrays as `Array<T>`;
non-string enum values and numeric defaults printed with Python's `str`/`repr`). A schema it
cannot express raises `ValueError` (or `KeyError` for an unknown type in a type list); the
chat template then falls back to JSON, as Kimi's tokenizer does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

logger = logging.getLogger(__name__)

INDENT = "  "
FIELD_SEP = ",\n"
_CONSTRAINT_KEYS = {
    "string": ("maxLength", "minLength", "pattern"),
    "number": ("maximum", "minimum"),
    "integer": ("maximum", "minimum"),
    "array": ("minItems", "maxItems"),
}
_UNION_NAMES = {
    "string": "string",
    "number": "number",
    "integer": "number",
    "boolean": "boolean",
    "null": "null",
    "object": "{}",
    "array": "Array<any>",
}


@dataclasses.dataclass
class _Node:
    """One parsed schema. `kind` is scalar, object, array, enum, any_of, union or ref."""

    kind: str
    description: str = ""
    constraints: dict[str, Any] = dataclasses.field(default_factory=dict)
    name: str = ""  # scalar type name or ref target
    children: list[_Node] = dataclasses.field(default_factory=list)
    fields: list[_Field] = dataclasses.field(default_factory=list)
    extra: Any = None  # object: additionalProperties (None, bool or _Node)
    values: list[Any] = dataclasses.field(default_factory=list)  # enum values


@dataclasses.dataclass
class _Field:
    name: str
    node: _Node
    optional: bool
    default: Any = None


class _Defs:
    """`$defs` seen while parsing one function, and whether `#` (self) was referenced."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}
        self.self_ref = False

    def resolve(self, ref: str) -> str:
        if ref == "#":
            self.self_ref = True
            return "parameters"
        if ref.startswith("#/$defs/"):
            name = ref.split("/")[-1]
            if name not in self.schemas:
                raise ValueError(f"reference not found: {ref}")
            return name
        raise ValueError(f"unsupported reference format: {ref}")


def _base(kind: str, schema: dict, constraint_type: str = "", **kw: Any) -> _Node:
    keys = _CONSTRAINT_KEYS.get(constraint_type, ())
    constraints = {k: v for k, v in schema.items() if k in keys}
    return _Node(kind, schema.get("description", ""), constraints, **kw)


def _parse(schema: dict | bool, defs: _Defs) -> _Node:
    if isinstance(schema, bool):
        if not schema:
            logger.debug("schema `false` is not supported; rendered as null")
        return _Node("scalar", name="any" if schema else "null")
    if "$ref" in schema:
        return _base("ref", schema, name=defs.resolve(schema["$ref"]))
    if "anyOf" in schema:
        return _base("any_of", schema, children=[_parse(s, defs) for s in schema["anyOf"]])
    if "enum" in schema:
        return _parse_enum(schema)
    if "type" in schema:
        typ = schema["type"]
        if isinstance(typ, list):
            return _base("union", schema, values=[_UNION_NAMES[t] for t in typ])
        if typ == "object":
            return _parse_object(schema, defs)
        if typ == "array":
            items = schema.get("items")
            item = _parse(items, defs) if items else _Node("scalar", name="any")
            return _base("array", schema, "array", children=[item])
        return _base("scalar", schema, typ, name=typ)
    if schema == {}:
        return _Node("scalar", name="any")
    raise ValueError(f"invalid JSON schema: {schema}")


def _parse_object(schema: dict, defs: _Defs) -> _Node:
    node = _base("object", schema)
    if not schema:
        return node
    defs.schemas.update(schema.get("$defs") or {})
    extra = schema.get("additionalProperties")
    node.extra = _parse(extra, defs) if isinstance(extra, dict) else extra
    properties = schema.get("properties")
    if properties is None:
        return node
    required = set(schema.get("required", []))
    for name, prop in properties.items():
        default = prop.get("default") if isinstance(prop, dict) else None
        node.fields.append(_Field(name, _parse(prop, defs), name not in required, default))
    return node


def _parse_enum(schema: dict) -> _Node:
    values = schema["enum"]
    typ = schema.get("type")
    if isinstance(typ, list):
        # One type, or one type plus "null"; anything else is rejected.
        if len(typ) == 1 or (len(typ) == 2 and "null" in typ):
            typ = typ[1] if typ[0] == "null" and len(typ) == 2 else typ[0]
        else:
            raise ValueError(f"enum type {typ} is not supported")
    checks = {
        "string": lambda v: isinstance(v, str),
        "number": lambda v: isinstance(v, (int, float)),
        "integer": lambda v: isinstance(v, int),
        "boolean": lambda v: isinstance(v, bool),
    }
    check = checks.get(typ)
    for value in values:
        if value is not None and check is not None and not check(value):
            raise ValueError(f"enum value {value!r} does not match type {typ}")
    return _base("enum", schema, values=list(values))


def _comment(text: str, indent: str = "") -> str:
    return "\n".join(f"{indent}// {line}" if line else "" for line in text.split("\n"))


def _doc(node: _Node, indent: str) -> str:
    lines = []
    if node.description:
        lines.append(_comment(node.description, indent))
    if node.constraints:
        pairs = sorted(node.constraints.items())
        lines.append(f"{indent}// " + ", ".join(f"{k}: {v}" for k, v in pairs))
    return "".join(line + "\n" for line in lines)


def _render(node: _Node, indent: str = "") -> str:
    if node.kind == "scalar":
        return "number" if node.name == "integer" else node.name
    if node.kind == "ref":
        return node.name
    if node.kind == "union":
        return " | ".join(node.values)
    if node.kind == "enum":
        return " | ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in node.values)
    if node.kind == "any_of":
        return " | ".join(_render(child, indent) for child in node.children)
    if node.kind == "array":
        return _render_array(node.children[0], indent)
    return _render_object(node, indent)


def _render_array(item: _Node, indent: str) -> str:
    inner = indent + INDENT
    item_doc = _doc(item, inner)
    if not item_doc:
        return f"Array<{_render(item, indent)}>"
    return f"Array<\n{item_doc}{inner}{_render(item, inner)}\n{indent}>"


def _render_object(node: _Node, indent: str) -> str:
    inner = indent + INDENT
    ordered = sorted(node.fields, key=lambda f: (f.optional, f.name))
    parts = [_render_field(f, inner) for f in ordered]
    if node.extra is not None:
        if node.extra is True:
            extra = "any"
        elif node.extra is False:
            extra = "never"
        elif isinstance(node.extra, _Node):
            extra = _render(node.extra, inner)
        else:
            raise ValueError(f"unknown additionalProperties: {node.extra!r}")
        parts.append(f"{inner}[k: string]: {extra}")
    if not parts:
        return "{}"
    return "{\n" + FIELD_SEP.join(parts) + "\n" + indent + "}"


def _render_field(field: _Field, indent: str) -> str:
    doc = _doc(field.node, indent)
    if field.default is not None:
        default = field.default
        shown = repr(default) if isinstance(default, (int, float, bool)) else None
        doc += f"{indent}// Default: {shown or json.dumps(default, ensure_ascii=False)}\n"
    mark = "?" if field.optional else ""
    return f"{doc}{indent}{field.name}{mark}: {_render(field.node, indent)}"


def _function_to_typescript(function: dict) -> str:
    defs = _Defs()
    params = _parse_object(function.get("parameters") or {}, defs)
    blocks = []
    self_ref = defs.self_ref  # decided before the `$defs` below are parsed
    if self_ref:
        # The root schema is referenced recursively: declare it as an interface. Kimi keeps
        # the fields in their given order here (no required-first sort).
        body = FIELD_SEP.join(_render_field(f, INDENT) for f in params.fields)
        blocks.append("interface parameters {" + (f"\n{body}\n" if body else "") + "}")
    for name, schema in dict(defs.schemas).items():
        description = schema.get("description", "")
        prefix = _comment(description) + "\n" if description else ""
        blocks.append(f"{prefix}interface {name} {_render(_parse(schema, defs))}")
    signature = "parameters" if self_ref else _render(params)
    name = function.get("name", "function")
    description = function.get("description")
    parts = [
        "\n".join(blocks),
        _comment(description) if description else "",
        f"type {name} = (_: {signature}) => any;",
    ]
    return "\n".join(p for p in parts if p)


def encode_tools_to_typescript(tools: list[dict] | None) -> str:
    """The `# Tools` block for OpenAI-format `tools`; "" when there is no function tool."""
    functions = [
        _function_to_typescript(tool["function"])
        for tool in tools or []
        if tool.get("type") == "function" and tool.get("function")
    ]
    if not functions:
        return ""
    return "# Tools\n\n## functions\nnamespace functions {\n" + "\n".join(functions) + "\n}\n"


def deep_sort(value: Any) -> Any:
    """A copy with every dict's keys sorted, recursively (lists keep their order)."""
    if isinstance(value, dict):
        return {k: deep_sort(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [deep_sort(v) for v in value]
    return value
