"""Reads a reply in the generic tool format (common/tool_format.py) as its text streams in.

The model writes one JSON object, a piece at a time. `ReplyReader` follows the JSON character by
character (which value each character belongs to) and hands out:
- `Content`: fragments of a text reply (`{"content": ...}`), decoded, as soon as they are known;
- `Call`: a tool call, once, when its object has closed: its name and its arguments text, a complete
  JSON value (the grammar made it valid against the tool's parameters). A call cut short (by
  `max_tokens` or a stop) is never handed out, and neither is a call identical (same name, same
  arguments as JSON values) to an earlier one: `duplicate` turns true instead.

Both layers use it: the API layer builds the reply (streamed or not) from what it hands out, and the
model server ends a reply at its first duplicate call (a small model given room repeats a call until
`max_tokens`), so a reply is the same whichever layer reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from common.tool_format import CALLS_KEY, CONTENT_KEY


@dataclass
class Content:
    text: str


@dataclass
class Call:
    index: int  # among the calls handed out: 0, 1, ...
    name: str
    arguments: str  # the JSON text the model wrote


@dataclass
class _Frame:
    kind: str  # "obj" or "arr"
    path: tuple
    key: str | None = None  # obj: the key whose value comes next
    expect_key: bool = True  # obj: a string here is a key
    index: int = 0  # arr: the item being written


@dataclass
class _Draft:
    name: str | None = None
    arguments: list[str] = field(default_factory=list)


def call_key(name: str, arguments: str) -> tuple[str, str] | None:
    """What makes two calls the same call (key order and spacing aside); None: not JSON."""
    try:
        return name, json.dumps(json.loads(arguments), sort_keys=True, ensure_ascii=False)
    except (json.JSONDecodeError, RecursionError):
        return None


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
        self._drafts: dict[int, _Draft] = {}  # calls being written, by their item index in the reply
        self._seen: set[tuple[str, str]] = set()
        self.calls: list[Call] = []  # complete, distinct calls, in order
        self.duplicate = False  # a complete call repeated an earlier one
        self.started = False  # the top-level object has begun: the reply is JSON, not free text
        self.complete = False  # the top-level object has closed

    @property
    def content(self) -> str | None:
        """The text reply so far, or None if the reply is not one."""
        return _decode_prefix(self._content_raw) if self._content_raw or self._content_seen else None

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
            self._string_char(ch)
            return
        top = self._stack[-1] if self._stack else None
        if ch in " \t\r\n":
            self._route(top.path if top else (), ch)
        elif ch in "{[":
            path = self._value_path()
            self._route(path, ch)
            self._stack.append(_Frame("obj" if ch == "{" else "arr", path))
            self.started = True
        elif ch in "}]":
            if top is None:
                return
            self._route(top.path, ch)
            self._stack.pop()
            if _is_call_path(top.path) and top.kind == "obj":
                self._call_closed(top.path[1], out)
            if not self._stack and self.started:
                self.complete = True
        elif ch == ":":
            if top is not None:
                self._route(top.path, ch)
        elif ch == ",":
            if top is None:
                return
            self._route(top.path, ch)
            if top.kind == "arr":
                top.index += 1
            else:
                top.key, top.expect_key = None, True
        elif ch == '"':
            self._in_string, self._escape, self._raw = True, False, []
            self._string_is_key = top is not None and top.kind == "obj" and top.expect_key
            self._string_path = top.path if self._string_is_key else self._value_path()
            self._route(self._string_path, ch)
        else:  # a number, true, false or null
            self._route(self._value_path(), ch)

    def _string_char(self, ch: str) -> None:
        closing = not self._escape and ch == '"'
        self._escape = not self._escape and ch == "\\"
        self._route(self._string_path, ch)
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
        if len(path) == 3 and _is_call_path(path[:2]) and path[2] == "name":
            self._drafts.setdefault(path[1], _Draft()).name = text

    def _call_closed(self, item: int, out: list) -> None:
        draft = self._drafts.pop(item, None)
        if draft is None or draft.name is None:
            return
        arguments = "".join(draft.arguments)
        key = call_key(draft.name, arguments)
        if key is None:
            return
        if key in self._seen:
            self.duplicate = True
            return
        self._seen.add(key)
        call = Call(len(self.calls), draft.name, arguments)
        self.calls.append(call)
        out.append(call)

    def _route(self, path: tuple, ch: str) -> None:
        """A character of the value at `path`: a call's arguments text is kept."""
        if len(path) >= 3 and _is_call_path(path[:2]) and path[2] == "arguments":
            self._drafts.setdefault(path[1], _Draft()).arguments.append(ch)

    def _value_path(self) -> tuple:
        if not self._stack:
            return ()
        top = self._stack[-1]
        return top.path + ((top.key,) if top.kind == "obj" else (top.index,))


def _is_call_path(path: tuple) -> bool:
    return len(path) == 2 and path[0] == CALLS_KEY and isinstance(path[1], int)


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
    """Join consecutive text fragments (one delta per step, not one per character)."""
    merged: list = []
    for p in pieces:
        if isinstance(p, Content) and merged and isinstance(merged[-1], Content):
            merged[-1].text += p.text
        else:
            merged.append(p)
    return merged
