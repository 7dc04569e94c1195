"""Renders chat messages into a prompt with the GGUF's Jinja chat template, or a named fallback.

Fallbacks are chosen by the model's kind when the GGUF carries no template (`tokenizer.chat_template`):
a base model (no instruction-tuning in its name) gets a plain transcript it can continue ("User: ...
Assistant:", stopping at the next "User:" line); an instruction-tuned family its own turn format.
CHAT_TEMPLATE forces one (a fallback name or a file path).

Tools reach the model through the template when it renders `tools` (Jinja, Hugging Face's
convention); otherwise through the generic format of common/tool_format.py: the tool list in the
system turn, earlier calls as the JSON the model would have written, tool results as user turns.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from common import tool_format
from common.protocol import ToolCall, ToolDefinition

# Gemma's turn format; Gemma has no system role, so system text opens the next user turn.
GEMMA = (
    "{{ bos_token }}{% set ns = namespace(sys='') %}"
    "{% for m in messages %}"
    "{% if m.role in ('system', 'developer') %}{% set ns.sys = ns.sys + m.content + '\n\n' %}"
    "{% elif m.role == 'user' %}<start_of_turn>user\n{{ ns.sys + m.content }}<end_of_turn>\n"
    "{% set ns.sys = '' %}"
    "{% else %}<start_of_turn>model\n{{ m.content }}<end_of_turn>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# In the fallbacks below the generation prompt ends at "ASSISTANT:"/"Assistant:" and the model writes
# the space itself (" The ..."); clients send that answer back as it was streamed. So an earlier
# answer that starts with whitespace gets no second space: the history then tokenizes as the cells
# the answer left, and the prompt cache can reuse them (with "Assistant: " + " The", it never could).
# FastChat's vicuna_v1.1 conversation (the format Vicuna and its Medusa heads were trained on).
VICUNA = (
    "{{ bos_token }}{% set ns = namespace(sys='A chat between a curious user and an artificial "
    "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the "
    "user\\'s questions.') %}"
    "{% for m in messages %}{% if m.role in ('system', 'developer') %}{% set ns.sys = m.content %}"
    "{% endif %}{% endfor %}"
    "{{ ns.sys }} "
    "{% for m in messages %}"
    "{% if m.role == 'user' %}USER: {{ m.content }} "
    "{% elif m.role == 'assistant' %}ASSISTANT:{{ '' if m.content[:1] in ' \\n\\t' else ' ' }}{{ m.content }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A transcript a base model continues sensibly (no special tokens it was never trained on).
TRANSCRIPT = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m.role in ('system', 'developer') %}{{ m.content }}\n\n"
    "{% elif m.role == 'user' %}User: {{ m.content }}\n"
    "{% else %}Assistant:{{ '' if m.content[:1] in ' \\n\\t' else ' ' }}{{ m.content }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

FALLBACKS = {"gemma": GEMMA, "vicuna": VICUNA, "chatml": CHATML, "transcript": TRANSCRIPT}
# Stop strings a fallback's turns need on top of the request's (a base model writes the next turn).
FALLBACK_STOPS = {"transcript": ("\nUser:",)}

# Words in a GGUF's name or fine-tune field that say it was tuned to follow a chat format.
_TUNED = re.compile(r"(?:^|[^a-z])(?:it|instruct|chat|sft|dpo|rlhf|vicuna)(?:[^a-z]|$)")


class ChatTemplateError(ValueError):
    pass


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # "gguf", a fallback name, or a file path
    text: str
    stop: tuple[str, ...] = ()  # stop strings every chat request gets with this template

    @property
    def renders_tools(self) -> bool:
        return re.search(r"\btools\b", self.text) is not None

    def render(self, messages: list[dict], bos_token: str, eos_token: str, tools: list[dict] | None = None) -> str:
        """messages: protocol ChatMessage dicts; tools: protocol ToolDefinition dicts."""
        inputs, extra = self._inputs(messages, tools or [])
        try:
            return _compile(self.text).render(
                messages=inputs, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=True, **extra
            )
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template rejected these messages: {e}") from e

    def answer_ranges(self, text: str, messages: list[dict], bos_token: str, eos_token: str,
                      tools: list[dict] | None = None) -> list[tuple[int, int]]:
        """Where `text` (these messages rendered) holds each earlier answer: character ranges. An
        answer is looked for right where the conversation before it ends, rendered with its
        generation prompt (a few characters of slack for a separator; trimmed if the template trims
        it), so text the answer repeats from elsewhere is never taken for it. Answers not found
        there (a template that rewrites them, or one that does not render a prefix as the start of
        the whole) get no range."""
        inputs, extra = self._inputs(messages, tools or [])
        out = []
        for i, m in enumerate(inputs):
            content = m.get("content") or ""
            if m.get("role") != "assistant" or not content.strip():
                continue
            try:
                prefix = _compile(self.text).render(messages=inputs[:i], bos_token=bos_token, eos_token=eos_token,
                                                    add_generation_prompt=True, **extra)
            except Exception:  # a template that refuses a conversation's prefix: no range, never an error
                continue
            if not text.startswith(prefix):
                continue
            for wanted in (content, content.strip()):
                j = text.find(wanted, len(prefix), len(prefix) + len(wanted) + ANSWER_SLACK)
                if j >= 0:
                    out.append((j, j + len(wanted)))
                    break
        return out

    def _inputs(self, messages: list[dict], tools: list[dict]) -> tuple[list[dict], dict]:
        if tools and self.renders_tools:
            return [_hf_message(m) for m in messages], {"tools": [{"type": "function", "function": t} for t in tools]}
        return _generic_messages(messages, tools), {}


# Characters a template may put between its generation prompt and an answer (a space, a newline).
ANSWER_SLACK = 4


def choose_template(
    override: str, gguf_template: str | None, architecture: str, name: str, finetune: str = ""
) -> ChatTemplate:
    if override:
        if override in FALLBACKS:
            return _fallback(override)
        path = Path(override)
        if not path.is_file():
            raise ValueError(f"CHAT_TEMPLATE {override!r} is neither {sorted(FALLBACKS)} nor a file")
        return ChatTemplate(str(path), path.read_text())
    if gguf_template:
        return ChatTemplate("gguf", gguf_template)
    lowered = f"{architecture} {name}".lower()
    if "vicuna" in lowered:
        return _fallback("vicuna")
    if not _TUNED.search(f"{name} {finetune}".lower()):
        return _fallback("transcript")  # a base model: it follows a transcript, not a turn format
    if "gemma" in lowered:
        return _fallback("gemma")
    if architecture == "llama":
        return _fallback("vicuna")
    return _fallback("chatml")


def _fallback(name: str) -> ChatTemplate:
    return ChatTemplate(name, FALLBACKS[name], FALLBACK_STOPS.get(name, ()))


def _hf_message(m: dict) -> dict:
    """A message in the shape Hugging Face chat templates read (tool calls with parsed arguments)."""
    out = {"role": m["role"], "content": m.get("content") or ""}
    if m.get("tool_calls"):
        out["tool_calls"] = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": _arguments(c["arguments"])}}
            for c in m["tool_calls"]
        ]
    for key in ("tool_call_id", "name"):
        if m.get(key):
            out[key] = m[key]
    return out


def _arguments(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _generic_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Messages with only system/user/assistant roles and text: tools, calls and results written in
    the generic format (common/tool_format.py), so any template renders them."""
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            out.append({"role": "user", "content": tool_format.tool_result_text(m.get("name"), m.get("tool_call_id"), content)})
        elif role == "assistant" and m.get("tool_calls"):
            calls = [ToolCall(**c) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": tool_format.reply_text(calls)})
        else:
            out.append({"role": role, "content": content})
    if tools:
        note = tool_format.instructions([ToolDefinition(**t) for t in tools])
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": out[0]["role"], "content": out[0]["content"] + "\n\n" + note}
        else:
            out.insert(0, {"role": "system", "content": note})
    return out


def _raise(message: str) -> None:
    raise TemplateError(message)


_cache: dict[str, object] = {}


def _compile(text: str):
    if text not in _cache:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        _cache[text] = env.from_string(text)
    return _cache[text]
