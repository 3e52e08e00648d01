"""Kimi-K2 output parsers: reasoning (`<think>`) and tool calls, streaming and not.

See docs/parsers.md for the rules and the decisions on malformed output.
"""

from shared.parsers.markers import Marker, MarkerScanner, MarkerTable
from shared.parsers.output import ChatOutputParser, ChatOutputStream, OutputDelta, ParsedOutput
from shared.parsers.reasoning import (
    KimiK2ReasoningParser,
    ReasoningDelta,
    ReasoningResult,
    ReasoningStream,
)
from shared.parsers.tool_calls import (
    KimiK2ToolParser,
    ToolCall,
    ToolCallDelta,
    ToolCallStream,
    ToolDelta,
    ToolParseResult,
    count_history_tool_calls,
    tool_name_from_id,
    unwrap_arguments,
)

__all__ = [
    "ChatOutputParser",
    "ChatOutputStream",
    "KimiK2ReasoningParser",
    "KimiK2ToolParser",
    "Marker",
    "MarkerScanner",
    "MarkerTable",
    "OutputDelta",
    "ParsedOutput",
    "ReasoningDelta",
    "ReasoningResult",
    "ReasoningStream",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallStream",
    "ToolDelta",
    "ToolParseResult",
    "count_history_tool_calls",
    "tool_name_from_id",
    "unwrap_arguments",
]
