"""OpenAI request bodies the API accepts, with the limits OpenAI documents.

Responses are built from the `openai` package's own types (see serving_*.py). Unknown fields are
ignored, as OpenAI-compatible servers do; fields we know but do not support yet are rejected with a
clear 400 in `reject_unsupported`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.errors import InvalidRequest, Unsupported


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="the id /v1/models lists")
    temperature: float | None = Field(1.0, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int | None = Field(1, ge=1, le=128, description="choices per prompt")
    stop: str | list[str] | None = Field(None, description="up to 16 stop strings; never emitted")
    seed: int | None = Field(None, description="same seed, same output")
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias in [-100, 100]")
    ignore_eos: bool | None = Field(False, description="vLLM extension: keep generating past EOS (benchmarks)")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, a token array or a list of token arrays"
    )
    max_tokens: int | None = Field(16, ge=0, description="OpenAI's default is 16; null: up to the context")
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0, description="deprecated by OpenAI; same as max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: ResponseFormat | None = None


def reject_unsupported(req: SamplingFields) -> None:
    """Raise a 400 naming the first field we accept in the schema but cannot honour yet."""
    if len(req.stop_list()) > 16:
        raise InvalidRequest("At most 16 stop sequences are supported.", param="stop")
    for key, bias in (req.logit_bias or {}).items():
        if not key.lstrip("-").isdigit():
            raise InvalidRequest(f"logit_bias keys must be token ids, got '{key}'.", param="logit_bias")
        if not -100 <= bias <= 100:
            raise InvalidRequest(f"logit_bias values must be in [-100, 100], got {bias}.", param="logit_bias")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise Unsupported("'suffix' (insertion) is not supported yet.", param="suffix")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise Unsupported("'best_of' other than n is not supported yet.", param="best_of")
    if isinstance(req, ChatCompletionRequest):
        if req.tools or req.functions:
            raise Unsupported("Tool and function calling are not supported yet.", param="tools" if req.tools else "functions")
        if req.tool_choice not in (None, "none") or req.function_call not in (None, "none"):
            raise Unsupported("Tool and function calling are not supported yet.", param="tool_choice")
        if req.response_format is not None and req.response_format.type != "text":
            raise Unsupported(
                f"response_format '{req.response_format.type}' is not supported yet; only 'text'.",
                param="response_format",
            )
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequest("'top_logprobs' needs 'logprobs' set to true.", param="top_logprobs")
        for i, m in enumerate(req.messages):
            if m.role in ("tool", "function") or m.tool_calls:
                raise Unsupported("Tool messages are not supported yet.", param=f"messages[{i}].role")
            for part in m.content if isinstance(m.content, list) else []:
                if part.type != "text" or part.text is None:
                    raise Unsupported(
                        f"Content parts of type '{part.type}' are not supported; only 'text'.",
                        param=f"messages[{i}].content",
                    )
