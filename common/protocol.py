"""The internal protocol between the API layer (app/) and the model server (backend/).

Both layers import these models; nothing here knows OpenAI's JSON shapes or llama.cpp.

    POST /generate   GenerateBatch  -> NDJSON stream of Event lines, each tagged with its request id
    POST /cancel     CancelRequest  -> {"cancelled": [ids still running that were stopped]}
    GET  /health                    -> Health
    GET  /info                      -> ModelInfo
    GET  /stats                     -> Stats
    POST /tokenize   TokenizeRequest -> TokenizeResponse
    POST /embed      EmbedRequest   -> EmbedResponse, or 400 EmbedError (503 Health while not ready)

One /generate call carries a whole batch. Per request the stream holds, in order: one `prompt` event,
then `delta` events per choice, then one `done` event per choice. An `error` event may come at any
point (before the prompt event when the request is refused, later when the engine fails it) and
ends the request: nothing of it follows. `RequestProgress` writes that rule down for every reader.
Closing the /generate connection cancels every request of the batch that is still running.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, Field, TypeAdapter

FinishReason = Literal["stop", "length", "cancelled"]


class ToolCall(BaseModel):
    """A function call the assistant made earlier in the conversation (rendered into the prompt)."""

    id: str
    name: str
    arguments: str = Field(description="the arguments as a JSON text, as the model wrote them")


class ChatMessage(BaseModel):
    role: str  # system, user, assistant, tool
    content: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list, description="assistant: the calls it made")
    tool_call_id: str | None = Field(None, description="tool: the call this message answers")
    name: str | None = Field(None, description="tool: the function that produced it")


class ToolDefinition(BaseModel):
    """A function the model may call (rendered into the prompt, by the GGUF's template or the generic format)."""

    name: str
    description: str = ""
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})


class Grammar(BaseModel):
    """A constraint on the generated text: every token sampled keeps the text a prefix of the language.
    The model server compiles it with llguidance (backend/grammar.py)."""

    type: Literal["json_schema", "lark", "regex"]
    value: dict | str = Field(description="a JSON schema (object), or a Lark grammar / regex text")
    param: str = Field("response_format", description="the API field it came from, named in errors")


class GenerationRequest(BaseModel):
    """One generation: a prompt (text or token ids) or chat messages, and how to sample it."""

    id: str
    request_id: str = Field("", description="the API request it belongs to (x-request-id), for log lines")
    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: int | None = Field(None, ge=0, description="None: up to the context size")
    temperature: float = Field(1.0, ge=0.0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="sample among the k most likely tokens only (Anthropic's top_k); 0: all")
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = Field(default_factory=dict)
    stop: list[str] = Field(default_factory=list)
    ignore_eos: bool = Field(False, description="keep generating past end-of-generation tokens (benchmarks)")
    n: int = Field(1, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20, description="None: none; k: sampled + top k")
    echo_prompt: bool = Field(False, description="send the prompt text back in the prompt event")
    prompt_logprobs: bool = Field(False, description="logprobs of every prompt token (needs logprobs)")
    grammar: Grammar | None = Field(None, description="constrain the output (structured outputs, tool calls)")
    tools: list[ToolDefinition] = Field(default_factory=list, description="chat: functions shown to the model")


class GenerateBatch(BaseModel):
    requests: list[GenerationRequest] = Field(min_length=1)


class TopLogprob(BaseModel):
    token_id: int
    token: str  # the token's text; may hold a partial UTF-8 character's replacement
    bytes: list[int]
    logprob: float


class TokenLogprob(BaseModel):
    token_id: int
    token: str
    bytes: list[int]
    logprob: float | None  # None only for a prompt's first token
    top: list[TopLogprob] = Field(default_factory=list)


class PromptEvent(BaseModel):
    type: Literal["prompt"] = "prompt"
    id: str
    prompt_tokens: int
    cached_tokens: int = Field(0, description="prompt tokens whose KV cells came from the prompt cache")
    text: str | None = None  # the prompt as text, when echo_prompt
    logprobs: list[TokenLogprob] | None = None  # prompt_logprobs: one per prompt token


class DeltaEvent(BaseModel):
    type: Literal["delta"] = "delta"
    id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None


class DoneEvent(BaseModel):
    type: Literal["done"] = "done"
    id: str
    index: int
    finish_reason: FinishReason
    completion_tokens: int
    stop_sequence: str | None = Field(None, description="the stop string that ended the choice (a chat template's "
                                      "included), for Anthropic's stop_sequence")


class ErrorEvent(BaseModel):
    type: Literal["error"] = "error"
    id: str
    message: str
    code: Literal["context_length_exceeded", "invalid_request", "overloaded", "internal"]
    param: str | None = None


Event = Annotated[Union[PromptEvent, DeltaEvent, DoneEvent, ErrorEvent], Field(discriminator="type")]


# Parses one NDJSON line into the right event class.
event_adapter: TypeAdapter[Event] = TypeAdapter(Event)


class RequestProgress:
    """The rule that ends a request on the stream: its n-th done event, or any error event."""

    def __init__(self, n: int):
        self.choices_left = n

    def see(self, event) -> bool:
        """Take one event of this request; True when the request has ended with it."""
        if isinstance(event, ErrorEvent):
            self.choices_left = 0
            return True
        if isinstance(event, DoneEvent):
            self.choices_left -= 1
            return self.choices_left <= 0
        return False


class CancelRequest(BaseModel):
    ids: list[str]


class CancelResponse(BaseModel):
    cancelled: list[str]


class Health(BaseModel):
    status: Literal["ok", "loading", "draining", "error"]
    detail: str | None = None


class MedusaReport(BaseModel):
    heads: int
    choices: list[list[int]] = Field(description="the draft path verified each step (Medusa choices)")
    max_streams: int = Field(description="speculate while at most this many sequences decode")
    acceptance: str = Field(description="'lossless' or 'typical'")
    note: str = Field("", description="how the draft was tuned, or why speculation is off")
    speculative_steps: int = 0
    mean_tokens_per_step: float | None = Field(None, description="accepted draft tokens + 1, per speculative step")
    per_head_acceptance: list[float | None] = Field(default_factory=list, description="per depth, given the depths before passed")
    typical_accepted: int = Field(0, description="draft tokens taken by typical acceptance (not lossless) instead of sampled")


class ModelInfo(BaseModel):
    name: str
    path: str
    n_ctx: int = Field(description="most tokens (prompt + completion) one request may use")
    n_vocab: int
    n_parallel: int = Field(description="sequences decoded together")
    chat_template: str = Field(description="the Jinja template chat requests are rendered with")
    chat_template_source: str = Field(description="'gguf' or the name of the built-in fallback")
    medusa: bool = False
    medusa_report: MedusaReport | None = None
    speculation: dict | None = Field(None, description="drafting sources, their live acceptance, the decode costs the plan uses")
    created: int = Field(description="unix time the model was loaded")


class PromptCacheReport(BaseModel):
    mode: Literal["exact", "fast", "off"] = Field(description="exact: reuse only cells a cold prefill computes identically")
    queries: int = Field(0, description="prompts admitted while the cache is on")
    hits: int = Field(0, description="prompts that reused at least one cached token")
    tokens_reused: int = Field(0, description="prompt tokens not prefilled thanks to the cache")
    tokens_prefilled: int = Field(0, description="prompt tokens prefilled (cache on)")
    ram_entries: int = Field(0, description="sequence states held in the RAM tier")
    ram_bytes: int = Field(0)
    ram_capacity_bytes: int = Field(0)
    ram_saves: int = 0
    ram_restores: int = Field(0, description="prompts served by restoring a RAM-tier state")
    ram_hit_rate: float | None = Field(None, description="restores / RAM-tier lookups that could have paid")
    canonicalized_tokens: int = Field(0, description="kept tokens re-prefilled while idle so a next turn can reuse them")
    parked_seqs: int = Field(0, description="parked streams: sequences that hold idle conversations' cells, copied whole")
    parked_entries: int = Field(0, description="parked streams holding a conversation now")
    parked_saves: int = 0
    parked_restores: int = Field(0, description="prompts served by copying a parked stream back into a slot")


class GrammarReport(BaseModel):
    library: str = Field(description="the constrained-decoding library and its version")
    compiled: int = Field(0, description="distinct grammars compiled")
    cache_hits: int = Field(0, description="requests whose grammar was already compiled")
    compile_seconds: float = 0.0
    forced_drafted: int = Field(0, description="grammar-forced tokens verified as drafts (fast-forward)")
    forced_accepted: int = Field(0, description="of those, tokens the model chose too")


class DeviceReport(BaseModel):
    name: str = Field(description="llama.cpp's device name, e.g. CUDA0 or CPU")
    description: str = Field(description="e.g. NVIDIA H200")
    kind: str = Field(description="cpu, gpu, igpu or accel")
    memory_total_bytes: int
    memory_used_bytes: int = Field(description="total minus free, as the device reports it")


class Stats(BaseModel):
    active_requests: int
    steps: int = Field(description="llama_decode calls so far")
    prompt_tokens: int
    tokens_generated: int
    decode_seconds: float
    step_seconds: float = Field(0.0, description="wall time of the engine steps; minus decode_seconds, the time a step "
                                "spends outside llama_decode (scheduling, sampling, drafting, handing events over)")
    medusa: MedusaReport | None = None
    speculation: dict | None = Field(None, description="drafting sources (medusa, lookup, forced): verified and judged "
                                     "acceptance, decode costs, per-step decisions")
    prompt_cache: PromptCacheReport | None = None
    grammar: GrammarReport | None = None
    devices: list[DeviceReport] = Field(default_factory=list, description="where llama.cpp computes")
    n_gpu_layers: int = Field(0, description="model layers offloaded to a GPU (a number past the model's: all)")
    verify: dict | None = Field(None, description="EXACTNESS and the most rows of one verify decode: measured at load "
                                "under strict (exact_by_rows: the row counts probed)")


class TokenizeRequest(BaseModel):
    text: str
    add_special: bool = True


class TokenizeResponse(BaseModel):
    tokens: list[int]


class EmbedRequest(BaseModel):
    """POST /embed: texts or token arrays, one vector each, in order. Texts are tokenized with the model's
    special tokens (BOS); token arrays are embedded as given."""

    inputs: list[str] | list[list[int]] = Field(min_length=1)
    dimensions: int | None = Field(None, description="the size the client asked for: refused unless it is the model's")


class EmbedResponse(BaseModel):
    vectors: list[list[float]] = Field(description="one unit-norm (L2) vector per input; float32 values")
    prompt_tokens: int = Field(description="tokens embedded, all inputs together (padding not counted)")


class EmbedError(BaseModel):
    """The body of a 400 from /embed: a client mistake, or embeddings unavailable on this server."""

    message: str
    code: Literal["invalid_request", "context_length_exceeded", "unsupported"]
    param: str | None = None
