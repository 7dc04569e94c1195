"""POST /v1/chat/completions: chat messages rendered by the model server's chat template."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionTokenLogprob,
)
from openai.types.chat.chat_completion import Choice, ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.chat.chat_completion_chunk import ChoiceLogprobs as ChunkLogprobs
from openai.types.chat.chat_completion_token_logprob import TopLogprob

from app.generation import Generation, new_request_id, sampling_kwargs
from app.schemas import ChatCompletionRequest
from common.protocol import ChatMessage, DeltaEvent, GenerationRequest, TokenLogprob


def build_request(req: ChatCompletionRequest) -> GenerationRequest:
    messages = []
    for m in req.messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text or "" for p in m.content or [])
        messages.append(ChatMessage(role="system" if m.role == "developer" else m.role, content=content))
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return GenerationRequest(
        id=new_request_id(),
        messages=messages,
        max_tokens=max_tokens,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        **sampling_kwargs(req),
    )


def _chat_logprobs(entries: list[TokenLogprob]) -> list[ChatCompletionTokenLogprob]:
    return [
        ChatCompletionTokenLogprob(
            token=e.token,
            bytes=e.bytes,
            logprob=e.logprob,
            top_logprobs=[TopLogprob(token=t.token, bytes=t.bytes, logprob=t.logprob) for t in e.top],
        )
        for e in entries
    ]


class ChatResponder:
    def __init__(self, req: ChatCompletionRequest, model: str, gen: Generation):
        self.req = req
        self.model = model
        self.gen = gen
        self.id = "chatcmpl-" + new_request_id()
        self.created = int(time.time())
        self.n = req.n or 1

    async def full(self) -> ChatCompletion:
        texts = {i: [] for i in range(self.n)}
        logprobs: dict[int, list] = {i: [] for i in range(self.n)}
        finish: dict[int, str] = {}
        completion_tokens = 0
        async for ev in self.gen.events():
            if isinstance(ev, DeltaEvent):
                texts[ev.index].append(ev.text)
                if ev.logprobs:
                    logprobs[ev.index].extend(_chat_logprobs(ev.logprobs))
            else:
                finish[ev.index] = ev.finish_reason
                completion_tokens += ev.completion_tokens
        choices = [
            Choice(
                index=i,
                message=ChatCompletionMessage(role="assistant", content="".join(texts[i])),
                finish_reason=finish.get(i, "stop"),
                logprobs=ChoiceLogprobs(content=logprobs[i]) if self.req.logprobs else None,
            )
            for i in range(self.n)
        ]
        return ChatCompletion(
            id=self.id, object="chat.completion", created=self.created, model=self.model, choices=choices,
            usage=self.gen.usage(completion_tokens),
        )

    def _chunk(self, choice: ChunkChoice | None, usage=None) -> str:
        chunk = ChatCompletionChunk(
            id=self.id, object="chat.completion.chunk", created=self.created, model=self.model,
            choices=[choice] if choice else [],
        )
        if self.req.include_usage():
            chunk.usage = usage  # OpenAI sends "usage": null on every chunk but the last
        return chunk.model_dump_json(exclude_unset=True)

    async def stream(self) -> AsyncIterator[str]:
        for i in range(self.n):
            yield self._chunk(
                ChunkChoice(index=i, delta=ChoiceDelta(role="assistant", content=""), finish_reason=None, logprobs=None)
            )
        completion_tokens = 0
        async for ev in self.gen.events():
            if isinstance(ev, DeltaEvent):
                lp = ChunkLogprobs(content=_chat_logprobs(ev.logprobs)) if (self.req.logprobs and ev.logprobs) else None
                if ev.text or lp:
                    yield self._chunk(
                        ChunkChoice(index=ev.index, delta=ChoiceDelta(content=ev.text), finish_reason=None, logprobs=lp)
                    )
            else:
                completion_tokens += ev.completion_tokens
                yield self._chunk(ChunkChoice(index=ev.index, delta=ChoiceDelta(), finish_reason=ev.finish_reason, logprobs=None))
        if self.req.include_usage():
            yield self._chunk(None, usage=self.gen.usage(completion_tokens))
        yield "[DONE]"
