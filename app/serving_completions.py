"""POST /v1/completions: OpenAI's legacy completions, streaming and not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from openai.types import Completion, CompletionChoice
from openai.types.completion_choice import Logprobs

from app.errors import InvalidRequest
from app.generation import Generation, new_request_id, sampling_kwargs
from app.schemas import CompletionRequest
from common.protocol import DeltaEvent, DoneEvent, GenerationRequest, Grammar, TokenLogprob


def build_requests(req: CompletionRequest) -> list[GenerationRequest]:
    p = req.prompt
    # A token array is one prompt; a list of strings or of token arrays is several.
    prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    if not prompts:
        raise InvalidRequest("'prompt' must not be empty.", param="prompt")
    wants_logprobs = req.logprobs is not None
    schema = req.response_format.schema_or_none() if req.response_format is not None else None
    grammar = Grammar(type="json_schema", value=schema, param="response_format") if schema is not None else None
    return [
        GenerationRequest(
            id=new_request_id(),
            prompt=prompt,
            max_tokens=req.max_tokens,
            logprobs=req.logprobs,
            echo_prompt=bool(req.echo),
            prompt_logprobs=bool(req.echo) and wants_logprobs,
            grammar=grammar,
            **sampling_kwargs(req),
        )
        for prompt in prompts
    ]


class _LogprobsBuilder:
    """Accumulates OpenAI's completions logprobs shape: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, offset: int = 0):
        self.lp = Logprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        self.offset = offset

    def add(self, entries: list[TokenLogprob]) -> Logprobs:
        """Append entries; returns just the added part (for a stream chunk)."""
        added = Logprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for e in entries:
            for target in (self.lp, added):
                target.tokens.append(e.token)
                target.token_logprobs.append(e.logprob)
                # The prompt's first token has no logprob (nothing precedes it).
                target.top_logprobs.append(_top_dict(e) if e.logprob is not None else None)
                target.text_offset.append(self.offset)
            self.offset += len(e.token)
        return added


def _top_dict(e: TokenLogprob) -> dict[str, float]:
    top = {t.token: t.logprob for t in e.top}
    top.setdefault(e.token, e.logprob)  # OpenAI always includes the sampled token
    return top


class CompletionsResponder:
    def __init__(self, req: CompletionRequest, model: str, gen: Generation):
        self.req = req
        self.model = model
        self.gen = gen
        self.id = "cmpl-" + new_request_id()
        self.created = int(time.time())
        self.n = req.n or 1
        # choice index = prompt index * n + choice of that prompt
        self.base = {r.id: i * self.n for i, r in enumerate(gen.reqs)}

    def _choice_index(self, ev: DeltaEvent | DoneEvent) -> int:
        return self.base[ev.id] + ev.index

    def _echo(self, rid: str) -> tuple[str, list]:
        prompt = self.gen.prompts[rid]
        return (prompt.text or "", prompt.logprobs or []) if self.req.echo else ("", [])

    async def full(self) -> Completion:
        texts: dict[int, list[str]] = {}
        builders: dict[int, _LogprobsBuilder] = {}
        finish: dict[int, str] = {}
        completion_tokens = 0
        for r in self.gen.reqs:
            echo_text, echo_lps = self._echo(r.id)
            for j in range(r.n):
                i = self.base[r.id] + j
                texts[i] = [echo_text]
                builders[i] = _LogprobsBuilder()
                builders[i].add(echo_lps)
        async for ev in self.gen.events():
            i = self._choice_index(ev)
            if isinstance(ev, DeltaEvent):
                texts[i].append(ev.text)
                if ev.logprobs:
                    builders[i].add(ev.logprobs)
            else:
                finish[i] = ev.finish_reason
                completion_tokens += ev.completion_tokens
        choices = [
            CompletionChoice(
                index=i,
                text="".join(texts[i]),
                finish_reason=finish.get(i, "stop"),
                logprobs=builders[i].lp if self.req.logprobs is not None else None,
            )
            for i in sorted(texts)
        ]
        return Completion(
            id=self.id, object="text_completion", created=self.created, model=self.model, choices=choices,
            usage=self.gen.usage(completion_tokens),
        )

    def _chunk(self, index: int, text: str, finish_reason=None, logprobs=None) -> str:
        choice = CompletionChoice.model_construct(index=index, text=text, finish_reason=finish_reason, logprobs=logprobs)
        chunk = Completion.model_construct(
            id=self.id, object="text_completion", created=self.created, model=self.model, choices=[choice]
        )
        # No "usage": null on these chunks (the chat stream has one): OpenAI's published schema of a
        # completion, which its chunks share, does not allow null there; only the last chunk has usage.
        return chunk.model_dump_json(exclude_unset=True)

    async def stream(self) -> AsyncIterator[str]:
        include_usage = self.req.include_usage()
        wants_lp = self.req.logprobs is not None
        builders: dict[int, _LogprobsBuilder] = {}
        for r in self.gen.reqs:
            echo_text, echo_lps = self._echo(r.id)
            for j in range(r.n):
                i = self.base[r.id] + j
                builders[i] = _LogprobsBuilder()
                if self.req.echo:
                    lp = builders[i].add(echo_lps) if (wants_lp and echo_lps) else None
                    yield self._chunk(i, echo_text, logprobs=lp)
        completion_tokens = 0
        async for ev in self.gen.events():
            i = self._choice_index(ev)
            if isinstance(ev, DeltaEvent):
                lp = builders[i].add(ev.logprobs) if (wants_lp and ev.logprobs) else None
                if ev.text or lp:
                    yield self._chunk(i, ev.text, logprobs=lp)
            else:
                completion_tokens += ev.completion_tokens
                yield self._chunk(i, "", finish_reason=ev.finish_reason, logprobs=None)
        if include_usage:
            yield Completion(
                id=self.id, object="text_completion", created=self.created, model=self.model, choices=[],
                usage=self.gen.usage(completion_tokens),
            ).model_dump_json(exclude_unset=True)
        yield "[DONE]"
