"""Renders chat messages into a prompt with the GGUF's Jinja chat template, or a named fallback.

Fallbacks are chosen by the model's architecture and name when the GGUF carries no template
(`tokenizer.chat_template`), and can be forced with CHAT_TEMPLATE (a fallback name or a file path).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

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
    "{% elif m.role == 'assistant' %}ASSISTANT: {{ m.content }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

FALLBACKS = {"gemma": GEMMA, "vicuna": VICUNA, "chatml": CHATML}


class ChatTemplateError(ValueError):
    pass


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # "gguf", a fallback name, or a file path
    text: str

    def render(self, messages: list[dict], bos_token: str, eos_token: str) -> str:
        try:
            return _compile(self.text).render(
                messages=messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=True
            )
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template rejected these messages: {e}") from e


def choose_template(override: str, gguf_template: str | None, architecture: str, name: str) -> ChatTemplate:
    if override:
        if override in FALLBACKS:
            return ChatTemplate(override, FALLBACKS[override])
        path = Path(override)
        if not path.is_file():
            raise ValueError(f"CHAT_TEMPLATE {override!r} is neither {sorted(FALLBACKS)} nor a file")
        return ChatTemplate(str(path), path.read_text())
    if gguf_template:
        return ChatTemplate("gguf", gguf_template)
    lowered = f"{architecture} {name}".lower()
    if "vicuna" in lowered or architecture == "llama":
        return ChatTemplate("vicuna", VICUNA)
    if "gemma" in lowered:
        return ChatTemplate("gemma", GEMMA)
    return ChatTemplate("chatml", CHATML)


def _raise(message: str) -> None:
    raise TemplateError(message)


_cache: dict[str, object] = {}


def _compile(text: str):
    if text not in _cache:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        _cache[text] = env.from_string(text)
    return _cache[text]
