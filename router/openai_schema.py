"""Pydantic models of the OpenAI requests the gateway accepts.

Unknown fields are ignored. A literal `extra_body` object in the JSON body (the Kimi deployment
guide's curl example sends one) is merged in: its fields apply where the top level does not set
them, and `chat_template_kwargs` from both places are merged. Numeric limits match what the wire
messages can carry, so a valid model always translates to protobuf. Checks that need several
fields at once live in `check()` and raise `OpenAIError` naming the field.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from router.errors import invalid_request

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 128
MAX_TOP_LOGPROBS = 20

TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
# Fields forwarded to the router as JSON text, kept exactly as the client sent them.
_RAW_JSON_FIELDS = ("tools", "tool_choice", "chat_template_kwargs")


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Model):
    url: str
    detail: str | None = None


class ContentPart(_Model):
    type: str
    text: str | None = None
    image_url: str | ImageURL | None = None

    @model_validator(mode="after")
    def _check_kind(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a 'text' part needs a `text` string")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an 'image_url' part needs `image_url` (a URL or {url})")
        if self.type not in ("text", "image_url"):
            raise ValueError(
                f"unsupported content part type {self.type!r}; use 'text' or 'image_url'"
            )
        return self

    @property
    def url(self) -> str:
        return self.image_url.url if isinstance(self.image_url, ImageURL) else self.image_url or ""


class FunctionCall(_Model):
    name: str
    arguments: str | dict[str, Any] | list[Any] | None = None

    @property
    def arguments_json(self) -> str:
        """Arguments as JSON text: a string verbatim, an object serialised like Python's json."""
        if self.arguments is None:
            return "{}"
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(self.arguments, ensure_ascii=False)


class ToolCall(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ChatMessage(_Model):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_validator(mode="after")
    def _check_role(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role!r} message needs `content`")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs `tool_call_id`")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only 'assistant' messages may carry `tool_calls`")
        return self


class FunctionDef(_Model):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDef(_Model):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: Annotated[dict[str, str], Field(min_length=1)]


class StreamOptions(_Model):
    include_usage: bool = False


class JsonSchemaFormat(_Model):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(min_length=1)
    description: str | None = None
    # `schema` would shadow a BaseModel attribute.
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    # Accepted; the schema is always enforced strictly (xgrammar's strict mode).
    strict: bool | None = None


class ResponseFormat(_Model):
    """OpenAI's `response_format`: free text, any JSON object, or JSON following a schema;
    the JSON kinds are enforced by constrained decoding in the workers."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("a 'json_schema' response_format needs `json_schema` {name, schema}")
        if self.type == "json_schema" and self.json_schema.schema_ is None:
            raise ValueError("a 'json_schema' response_format needs `json_schema.schema`")
        return self

    @property
    def schema_json(self) -> str:
        """The schema as JSON text ("" unless `json_schema`); ASCII, so any string travels."""
        return json.dumps(self.json_schema.schema_) if self.type == "json_schema" else ""


class ApiRequest(_Model):
    """Fields and body handling shared by every endpoint that takes a JSON body."""

    model: str | None = None
    extra_body: dict[str, Any] | None = None

    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _merge_extra_body(cls, data: Any, handler: Any) -> Any:
        data = merge_extra_body(data)
        request = handler(data)
        if isinstance(data, dict):
            request._raw = {k: data[k] for k in _RAW_JSON_FIELDS if data.get(k) is not None}
        return request

    def raw_json(self, field: str) -> str:
        """The client's value of a JSON-forwarded field as JSON text, "" when unset."""
        value = self._raw.get(field)
        return "" if value is None else json.dumps(value, ensure_ascii=False)

    def check(self) -> None:
        """Cross-field rules; raises `OpenAIError` (400) naming the field."""


class GenerationRequest(ApiRequest):
    """Fields shared by chat and text completions. Sampling fields left out stay None and
    travel unset, so the router applies the model's defaults."""

    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False
    user: str | None = None
    response_format: ResponseFormat | None = None

    @property
    def grammar_kind(self) -> str:
        """The constraint's kind ("json_object", "json_schema"); "" for free text."""
        kind = self.response_format.type if self.response_format else "text"
        return "" if kind == "text" else kind

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def check(self) -> None:
        """Cross-field rules; raises `OpenAIError` (400) naming the field."""
        if self.stream_options is not None and not self.stream:
            raise invalid_request(
                "`stream_options` is only allowed when `stream` is true", "stream_options"
            )
        for i, stop in enumerate(self.stop_list):
            if not stop:
                param = "stop" if isinstance(self.stop, str) else f"stop[{i}]"
                raise invalid_request(f"{param} must not be an empty string", param)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def completion_limit(self) -> int:
        """`max_completion_tokens` wins over the deprecated `max_tokens`; 0 lets the router decide."""
        return self.max_completion_tokens or self.max_tokens or 0

    @property
    def completion_limit_param(self) -> str:
        """The field `completion_limit` came from, named in the router's length errors."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    @property
    def logprobs_requested(self) -> bool:
        return bool(self.logprobs)

    def check(self) -> None:
        super().check()
        if self.top_logprobs and not self.logprobs:
            raise invalid_request("`top_logprobs` needs `logprobs` set to true", "top_logprobs")
        self._check_tool_choice()
        forced = self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)
        if self.grammar_kind and forced:
            raise invalid_request("response_format cannot be combined with tool_choice "
                                  "'required' or a named function: both decide the output",
                                  "response_format")  # fmt: skip

    def _check_tool_choice(self) -> None:
        choice = self.tool_choice
        if choice is None or choice in ("none", "auto"):
            return
        if not self.tools:
            raise invalid_request("`tool_choice` needs `tools`", "tool_choice")
        if isinstance(choice, NamedToolChoice):
            name = choice.function.get("name", "")
            if name not in {tool.function.name for tool in self.tools}:
                raise invalid_request(
                    f"tool_choice names {name!r}, which is not in `tools`", "tool_choice"
                )


class CompletionRequest(GenerationRequest):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None

    @property
    def logprobs_requested(self) -> bool:
        return self.logprobs is not None

    @property
    def single_prompt(self) -> str | list[int]:
        """The one prompt of this request (a text or token ids); `check()` guarantees it exists."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            return prompt[0]
        return prompt

    def check(self) -> None:
        super().check()
        prompt = self.prompt
        if isinstance(prompt, list) and not prompt:
            raise invalid_request("`prompt` must not be empty", "prompt")
        if isinstance(prompt, list) and isinstance(prompt[0], str | list):
            # Limitation: one prompt per request; batched prompts would need one router call each.
            if len(prompt) > 1:
                raise invalid_request(
                    "send one prompt per request; batches are not supported", "prompt"
                )
            if not prompt[0] and isinstance(prompt[0], list):
                raise invalid_request("`prompt` must not be empty", "prompt[0]")
        if self.suffix:
            raise invalid_request("`suffix` is not supported", "suffix")
        if self.echo and not isinstance(self.single_prompt, str):
            raise invalid_request("`echo` needs a text prompt, not token ids", "echo")


class TokenizeRequest(ApiRequest):
    """vLLM's `/tokenize`: a text `prompt`, or chat `messages` rendered with the template.

    `add_special_tokens` is accepted for compatibility and has no effect: kimiserve adds no BOS
    on any path, so the ids are exactly what generation would use. `return_text` (kimiserve's
    addition) returns the rendered prompt.
    """

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ToolDef] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool | None = None
    return_token_strs: bool = False
    return_text: bool = False

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise invalid_request("give exactly one of `prompt` and `messages`", "messages")
        if self.messages is not None and not self.messages:
            raise invalid_request("`messages` must not be empty", "messages")
        if self.continue_final_message:
            raise invalid_request(
                "`continue_final_message` is not supported", "continue_final_message"
            )


class DetokenizeRequest(ApiRequest):
    """vLLM's `/detokenize`: token ids back to text, special tokens kept."""

    tokens: list[TokenId]


def merge_extra_body(data: Any) -> Any:
    """Folds a literal `extra_body` object into the body; the top level wins on conflicts."""
    if not isinstance(data, dict) or not isinstance(data.get("extra_body"), dict):
        return data
    extra = data["extra_body"]
    merged = {k: v for k, v in extra.items() if k != "extra_body"}
    merged.update(data)
    kwargs = [d.get("chat_template_kwargs") for d in (extra, data)]
    if all(isinstance(k, dict) for k in kwargs):
        merged["chat_template_kwargs"] = {**kwargs[0], **kwargs[1]}
    return merged
