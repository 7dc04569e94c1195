"""Reads a reply in the generic tool format (common/tool_format.py) as its text streams in.

The model writes one JSON object, a piece at a time; OpenAI's stream wants a tool call's id and
name first, then its arguments as text fragments whose concatenation is the arguments JSON, or the
text of a plain reply. `ReplyReader` follows the JSON character by character (which value each
character belongs to) and hands out those pieces as soon as they are known. The same reader builds
the non-streaming reply, so both carry the very arguments text the model wrote.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from common.tool_format import CALLS_KEY, CONTENT_KEY


@dataclass
class CallStart:
    index: int
    name: str


@dataclass
class Arguments:
    index: int
    text: str


@dataclass
class Content:
    text: str


@dataclass
class _Frame:
    kind: str  # "obj" or "arr"
    path: tuple
    key: str | None = None  # obj: the key whose value comes next
    expect_key: bool = True  # obj: a string here is a key
    index: int = 0  # arr: the item being written


@dataclass
class _Call:
    name: str | None = None
    arguments: list[str] = field(default_factory=list)


class ReplyReader:
    def __init__(self):
        self._stack: list[_Frame] = []
        self._in_string = False
        self._escape = False
        self._string_is_key = False
        self._string_path: tuple = ()
        self._raw: list[str] = []  # the current string's characters (escapes undecoded)
        self._content_raw = ""  # the text reply's characters so far (escapes undecoded)
        self._content_sent = 0  # decoded characters handed out
        self._content_seen = False  # the text reply's string has closed
        self._calls: list[_Call] = []
        self._started = False  # the top-level object has begun
        self.complete = False  # the top-level object has closed

    # --- results ----------------------------------------------------------------------------------
    @property
    def calls(self) -> list[tuple[str, str]]:
        """(name, arguments text) of every call whose name is known."""
        return [(c.name, "".join(c.arguments)) for c in self._calls if c.name is not None]

    @property
    def content(self) -> str | None:
        """The text reply so far, or None if the reply is not one."""
        return _decode_prefix(self._content_raw) if self._content_raw or self._content_seen else None

    # --- reading ------------------------------------------------------------------------------------
    def feed(self, text: str) -> list:
        out: list = []
        for ch in text:
            self._char(ch, out)
        if self._content_raw:
            decoded = _decode_prefix(self._content_raw)
            if len(decoded) > self._content_sent:
                out.append(Content(decoded[self._content_sent:]))
                self._content_sent = len(decoded)
        return _merge(out)

    def _char(self, ch: str, out: list) -> None:
        if self.complete:
            return
        if self._in_string:
            self._string_char(ch, out)
            return
        top = self._stack[-1] if self._stack else None
        if ch in " \t\r\n":
            self._route(top.path if top else (), ch, out)
        elif ch in "{[":
            path = self._value_path()
            self._route(path, ch, out)
            self._stack.append(_Frame("obj" if ch == "{" else "arr", path))
            self._started = True
        elif ch in "}]":
            if top is None:
                return
            self._route(top.path, ch, out)
            self._stack.pop()
            if not self._stack and self._started:
                self.complete = True
        elif ch == ":":
            if top is not None:
                self._route(top.path, ch, out)
        elif ch == ",":
            if top is None:
                return
            self._route(top.path, ch, out)
            if top.kind == "arr":
                top.index += 1
            else:
                top.key, top.expect_key = None, True
        elif ch == '"':
            self._in_string, self._escape, self._raw = True, False, []
            self._string_is_key = top is not None and top.kind == "obj" and top.expect_key
            self._string_path = top.path if self._string_is_key else self._value_path()
            self._route(self._string_path, ch, out)
        else:  # a number, true, false or null
            self._route(self._value_path(), ch, out)

    def _string_char(self, ch: str, out: list) -> None:
        closing = not self._escape and ch == '"'
        self._escape = not self._escape and ch == "\\"
        self._route(self._string_path, ch, out)
        if not closing:
            self._raw.append(ch)
            if not self._string_is_key and self._string_path == (CONTENT_KEY,):
                self._content_raw += ch
            return
        self._in_string = False
        text = _decode_prefix("".join(self._raw))
        if self._string_is_key:
            top = self._stack[-1]
            top.key, top.expect_key = text, False
            return
        path = self._string_path
        if path == (CONTENT_KEY,):
            self._content_seen = True
        if len(path) == 3 and path[0] == CALLS_KEY and path[2] == "name":
            call = self._call(path[1])
            call.name = text
            out.append(CallStart(path[1], text))
            if call.arguments:  # written before the name: hand them out now
                out.append(Arguments(path[1], "".join(call.arguments)))

    def _route(self, path: tuple, ch: str, out: list) -> None:
        """A character of the value at `path`: arguments text goes out as fragments."""
        if len(path) >= 3 and path[0] == CALLS_KEY and isinstance(path[1], int) and path[2] == "arguments":
            call = self._call(path[1])
            call.arguments.append(ch)
            if call.name is not None:
                out.append(Arguments(path[1], ch))

    def _call(self, index: int) -> _Call:
        while len(self._calls) <= index:
            self._calls.append(_Call())
        return self._calls[index]

    def _value_path(self) -> tuple:
        if not self._stack:
            return ()
        top = self._stack[-1]
        return top.path + ((top.key,) if top.kind == "obj" else (top.index,))


def _decode_prefix(raw: str) -> str:
    """The JSON string characters `raw` decoded, leaving out an escape cut short at the end."""
    for cut in range(len(raw), max(-1, len(raw) - 12), -1):
        try:
            text = json.loads('"' + raw[:cut] + '"')
        except json.JSONDecodeError:
            continue
        if text and "\ud800" <= text[-1] <= "\udbff":  # half a surrogate pair: wait for the other
            continue
        return text
    return ""


def _merge(pieces: list) -> list:
    """Join consecutive fragments of one kind (one delta per kind per step, not one per character)."""
    merged: list = []
    for p in pieces:
        last = merged[-1] if merged else None
        if isinstance(p, Arguments) and isinstance(last, Arguments) and last.index == p.index:
            last.text += p.text
        elif isinstance(p, Content) and isinstance(last, Content):
            last.text += p.text
        else:
            merged.append(p)
    return merged
