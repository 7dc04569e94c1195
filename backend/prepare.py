"""Turns a protocol GenerationRequest into what the engine runs: prompt tokens, limits, sampling.

Runs on the caller's thread (it only reads the vocabulary), so tokenizing a long prompt never stalls
the decode loop. Client mistakes come back as ErrorEvents, never exceptions.
"""

from __future__ import annotations

import logging
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from itertools import accumulate

import llguidance

from backend.chat_template import ChatTemplate, ChatTemplateError
from backend.grammar import GrammarCompiler, GrammarError
from backend.llama_model import LlamaModel
from backend.sampling import SamplingParams
from common.protocol import ErrorEvent, GenerationRequest

log = logging.getLogger("backend.prepare")


@dataclass
class PreparedRequest:
    req: GenerationRequest
    tokens: list[int]
    max_tokens: int
    sampling: SamplingParams
    prompt_text: str | None
    stop: list[str]  # the request's stop strings and the chat template's
    grammar: llguidance.LLMatcher | None = None  # a pristine matcher; each sequence copies it
    # A chat prompt's earlier answers as token ranges (answer_spans; [] without any); None: not a chat
    # prompt. The exact prompt cache's cold schedule follows them (backend/decode_plan.py).
    spans: list[tuple[int, int]] | None = None


def prepare(
    model: LlamaModel, template: ChatTemplate, req: GenerationRequest, grammars: GrammarCompiler | None = None
) -> PreparedRequest | ErrorEvent:
    """The request ready to run, or the ErrorEvent that refuses it. Never raises: a failure here is this
    request's alone, never its batch's."""
    try:
        return _prepare(model, template, req, grammars)
    except UnicodeEncodeError:
        param = "messages" if req.messages is not None else "prompt"
        return ErrorEvent(id=req.id, message="The text is not valid Unicode (a lone surrogate).", param=param,
                          code="invalid_request")
    except Exception as e:
        log.exception("preparing request %s failed", req.id)
        return ErrorEvent(id=req.id, message=f"Preparing the request failed: {type(e).__name__}", code="internal")


def _prepare(
    model: LlamaModel, template: ChatTemplate, req: GenerationRequest, grammars: GrammarCompiler | None
) -> PreparedRequest | ErrorEvent:
    def error(message: str, param: str | None = None, code: str = "invalid_request") -> ErrorEvent:
        return ErrorEvent(id=req.id, message=message, param=param, code=code)

    if (req.messages is None) == (req.prompt is None):
        return error("Give exactly one of 'prompt' and 'messages'.", "prompt")
    if req.n > model.n_parallel:
        return error(
            f"n={req.n} is more than this server decodes at once (N_PARALLEL={model.n_parallel}).", "n"
        )
    if req.messages is not None:
        messages, tools = [m.model_dump() for m in req.messages], [t.model_dump() for t in req.tools]
        bos, eos = model.special_text(model.bos), model.special_text(model.eos)
        try:
            text = template.render(messages, bos_token=bos, eos_token=eos, tools=tools)
        except ChatTemplateError as e:
            return error(str(e), "messages")
        tokens = model.tokenize(text, add_special=False)
        ranges = template.answer_ranges(text, messages, bos, eos, tools) if any(m.role == "assistant" for m in req.messages) else []
        spans = answer_spans(text, model.pieces(tokens), ranges) if ranges else []
        if model.add_bos and (not tokens or tokens[0] != model.bos):
            tokens.insert(0, model.bos)
            spans = [(a + 1, b + 1) for a, b in spans]
    elif isinstance(req.prompt, str):
        tokens = model.tokenize(req.prompt, add_special=True)
    else:
        tokens = list(req.prompt)
        bad = next((t for t in tokens if not 0 <= t < model.n_vocab), None)
        if bad is not None:
            return error(f"The prompt holds token id {bad}, outside the vocabulary (0..{model.n_vocab - 1}).", "prompt")
    if not tokens:
        return error("The prompt is empty.", "prompt")

    n_ctx = model.n_ctx_per_seq
    wanted = len(tokens) + (req.max_tokens or 0)
    if wanted > n_ctx or (req.max_tokens is None and len(tokens) >= n_ctx):
        return error(
            f"This model's maximum context length is {n_ctx} tokens. However, you requested {wanted} "
            f"tokens ({len(tokens)} in the prompt, {req.max_tokens or 0} for the completion). "
            "Please reduce the prompt or the completion length.",
            "max_tokens" if req.max_tokens else ("messages" if req.messages is not None else "prompt"),
            "context_length_exceeded",
        )
    bad = next((t for t in req.logit_bias if not 0 <= t < model.n_vocab), None)
    if bad is not None:
        return error(f"logit_bias names token id {bad}, outside the vocabulary (0..{model.n_vocab - 1}).", "logit_bias")

    grammar = None
    if req.grammar is not None:
        if grammars is None:
            return error("This server was built without constrained decoding.", req.grammar.param)
        try:
            grammar = grammars.matcher(req.grammar)
        except GrammarError as e:
            return error(f"Invalid or unsupported grammar: {e}", req.grammar.param)

    prompt_text = None
    if req.echo_prompt:
        prompt_text = req.prompt if isinstance(req.prompt, str) else model.detokenize(tokens)
    return PreparedRequest(
        req=req,
        tokens=tokens,
        max_tokens=req.max_tokens if req.max_tokens is not None else n_ctx - len(tokens),
        sampling=SamplingParams(
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=tuple(sorted(req.logit_bias.items())),
        ),
        prompt_text=prompt_text,
        stop=req.stop + [s for s in template.stop if req.messages is not None and s not in req.stop],
        grammar=grammar,
        spans=spans if req.messages is not None else None,
    )


def answer_spans(text: str, pieces: list[bytes], ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The token ranges of a rendered chat prompt that hold its earlier answers: for each character
    range (ChatTemplate.answer_ranges), the tokens wholly inside it. pieces: each token's bytes; if
    they do not spell the text (a tokenizer that rewrites it), no spans."""
    data = text.encode()
    if b"".join(pieces) != data:
        return []
    ends = list(accumulate(len(p) for p in pieces))
    starts = [0] + ends[:-1]
    spans = []
    for a, b in ranges:
        i, j = len(text[:a].encode()), len(text[:b].encode())
        first, last = bisect_left(starts, i), bisect_right(ends, j)
        if last > first:
            spans.append((first, last))
    return spans
