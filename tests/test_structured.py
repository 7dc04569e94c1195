"""Structured outputs and tools without a model: the generic tool format's schema, the streaming
reply reader, the token-mask arithmetic, when a draft is verified, and prompt rendering of tools."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from backend.chat_template import choose_template
from backend.grammar import apply_mask
from backend.scheduler import forced_alone
from common import schema_refs, tool_format
from common.protocol import ChatMessage, ToolCall, ToolDefinition
from common.tool_reply import Call, Content, ReplyReader

WEATHER = ToolDefinition(name="get_weather", description="Weather in a city",
                         parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
TIME = ToolDefinition(name="get_time", parameters={"type": "object", "properties": {}})


def feed_in_pieces(text: str, seed: int) -> tuple[ReplyReader, list]:
    rng = random.Random(seed)
    reader, pieces, i = ReplyReader(), [], 0
    while i < len(text):
        n = rng.randint(1, 6)
        pieces += reader.feed(text[i:i + n])
        i += n
    return reader, pieces


@pytest.mark.parametrize("arguments_first", (False, True))
@pytest.mark.parametrize("seed", range(5))
def test_reader_hands_out_each_call_once_whole_when_its_object_closes(seed, arguments_first):
    args0 = '{"city": "Pa\\"ris \\u00e9", "days": [1, 2], "nested": {"a": {"b": null}}}'
    if arguments_first:  # JSON objects are unordered: a reply may hold a call's arguments before its name
        text = '{"tool_calls": [{"arguments": ' + args0 + ', "name": "get_weather"}, {"arguments": {}, "name": "get_time"}]}'
    else:
        text = '{"tool_calls": [{"name": "get_weather", "arguments": ' + args0 + '}, {"name": "get_time", "arguments": {}}]}'
    reader, pieces = feed_in_pieces(text, seed)
    assert reader.complete and not reader.duplicate
    assert pieces == reader.calls == [Call(0, "get_weather", args0), Call(1, "get_time", "{}")]
    assert reader.content is None
    json.loads(args0)


@pytest.mark.parametrize("seed", range(3))
def test_reader_streams_a_text_reply_decoded(seed):
    text = json.dumps({"content": 'Line "one"\nsmile 😀 café \\ end'}, ensure_ascii=seed % 2 == 0)
    reader, pieces = feed_in_pieces(text, seed)
    assert reader.complete and not reader.calls
    assert "".join(p.text for p in pieces if isinstance(p, Content)) == reader.content == 'Line "one"\nsmile 😀 café \\ end'


@pytest.mark.parametrize("cut", range(1, 60))
def test_reader_never_hands_out_a_call_cut_short(cut):
    text = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "n": [1, {"x": 2}]}}]}'
    reader, pieces = feed_in_pieces(text[:cut], cut)
    assert pieces == reader.calls == [] and not reader.complete
    reader.feed(text[cut:])
    assert reader.calls == [Call(0, "get_weather", '{"city": "Paris", "n": [1, {"x": 2}]}')]


def test_reader_drops_a_call_identical_to_an_earlier_one_and_says_so():
    text = ('{"tool_calls": [{"name": "f", "arguments": {"a": 1, "b": [2]}}, {"name": "f", "arguments": {"a": 2}}, '
            '{"name": "g", "arguments": {"a": 1, "b": [2]}}, {"name": "f", "arguments": {"b": [2], "a": 1}}, '
            '{"name": "g", "arguments": {"a": 3}}]}')
    reader, pieces = feed_in_pieces(text, 0)
    # key order does not make a call different; the same arguments under another name do
    assert [(c.index, c.name, json.loads(c.arguments)) for c in pieces] == [
        (0, "f", {"a": 1, "b": [2]}), (1, "f", {"a": 2}), (2, "g", {"a": 1, "b": [2]}), (3, "g", {"a": 3})]
    assert reader.duplicate


def test_reply_schema_modes():
    auto = tool_format.reply_schema([WEATHER, TIME], "auto", parallel=True)
    calls, text = auto["anyOf"]
    assert text["required"] == ["content"]
    items = calls["properties"]["tool_calls"]
    assert items["maxItems"] == tool_format.MAX_PARALLEL_CALLS and [c["properties"]["name"]["const"] for c in items["items"]["anyOf"]] == ["get_weather", "get_time"]
    # name before arguments: the reader streams the name first
    assert list(items["items"]["anyOf"][0]["properties"]) == ["name", "arguments"]
    required = tool_format.reply_schema([WEATHER, TIME], "required", parallel=False)
    assert "anyOf" not in required and required["properties"]["tool_calls"]["maxItems"] == 1
    named = tool_format.reply_schema([WEATHER, TIME], "get_time", parallel=True)
    one = named["properties"]["tool_calls"]
    assert one["maxItems"] == 1 and one["items"]["properties"]["name"] == {"const": "get_time"}


def test_reply_text_is_what_the_reader_reads_back():
    calls = [ToolCall(id="call_1", name="get_weather", arguments='{"city": "Oslo"}')]
    reader = ReplyReader()
    reader.feed(tool_format.reply_text(calls))
    assert reader.calls == [Call(0, "get_weather", '{"city": "Oslo"}')]


def test_apply_mask_keeps_exactly_the_allowed_tokens():
    rng = np.random.default_rng(0)
    n_vocab = 1000  # not a multiple of 32: the last word is partly unused
    allowed = rng.random(n_vocab) < 0.1
    mask = np.zeros((n_vocab + 31) // 32, dtype=np.uint32)
    for t in np.flatnonzero(allowed):
        mask[t // 32] |= np.uint32(1 << (t % 32))
    logits = rng.standard_normal(n_vocab).astype(np.float32)
    before = logits.copy()
    apply_mask(logits, mask.view(np.int32))
    assert np.array_equal(logits[allowed], before[allowed])
    assert np.all(np.isneginf(logits[~allowed]))


def test_without_a_speculator_a_forced_run_is_verified_only_while_its_sequence_decodes_alone():
    forcing = type("S", (), {"constraint": type("C", (), {"forced": lambda self, limit: [5, 6, 7][:limit]})()})()
    free = type("S", (), {"constraint": None})()
    assert forced_alone(forcing, 1, 6, fast_forward=True) == [5, 6, 7]
    assert forced_alone(forcing, 1, 2, fast_forward=True) == [5, 6]
    assert forced_alone(forcing, 4, 6, fast_forward=True) == []  # its own decode would slow the others
    assert forced_alone(forcing, 1, 6, fast_forward=False) == []
    assert forced_alone(free, 1, 6, fast_forward=True) == []


def test_base_model_without_template_gets_a_transcript_that_stops_at_the_next_user_line():
    t = choose_template("", None, "gemma3", "Gemma 3 270m")
    assert t.source == "transcript" and t.stop == ("\nUser:",)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"}]
    assert t.render(msgs, "<bos>", "<eos>") == "<bos>Be brief.\n\nUser: Hi\nAssistant: Hello!\nUser: Capital of France?\nAssistant:"
    assert choose_template("", None, "gemma3", "Gemma 3 270m it").source == "gemma"
    assert choose_template("", None, "gemma3", "Gemma 3 270m", finetune="it").source == "gemma"
    assert choose_template("", None, "qwen2", "Qwen2.5 0.5B Instruct").source == "chatml"


def test_tools_reach_a_template_without_tools_in_the_generic_format():
    t = choose_template("transcript", None, "gemma3", "x")
    msgs = [
        ChatMessage(role="user", content="Weather in Oslo?"),
        ChatMessage(role="assistant", tool_calls=[ToolCall(id="call_1", name="get_weather", arguments='{"city": "Oslo"}')]),
        ChatMessage(role="tool", content="12 C", tool_call_id="call_1", name="get_weather"),
    ]
    text = t.render([m.model_dump() for m in msgs], "", "", tools=[WEATHER.model_dump()])
    assert text.startswith("You can call these tools")
    assert '"name": "get_weather"' in text and "Weather in a city" in text
    assert 'Assistant: {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}' in text
    assert "User: Tool result get_weather (call call_1):\n12 C" in text


def test_tools_reach_a_template_that_renders_them_through_it():
    jinja = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
             "{% for m in messages %}<{{ m.role }}>{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments.city }}"
             "{% else %}{{ m.content }}{% endif %}{% endfor %}")
    t = choose_template("", jinja, "x", "y")
    assert t.renders_tools
    msgs = [ChatMessage(role="user", content="Q"),
            ChatMessage(role="assistant", tool_calls=[ToolCall(id="c", name="get_weather", arguments='{"city": "Oslo"}')]),
            ChatMessage(role="tool", content="12 C", tool_call_id="c")]
    out = t.render([m.model_dump() for m in msgs], "", "", tools=[WEATHER.model_dump(), TIME.model_dump()])
    assert out == "[get_weather][get_time]<user>Q<assistant>Oslo<tool>12 C"


ADDRESS_TOOL = ToolDefinition(name="ship", parameters={  # what Pydantic writes for a nested model
    "type": "object", "properties": {"to": {"$ref": "#/$defs/Address"}, "parts": {"type": "array", "items": {"$ref": "#/$defs/Part"}}},
    "required": ["to"], "$defs": {
        "Address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "Part": {"type": "object", "properties": {"name": {"type": "string"}, "sub": {"type": "array", "items": {"$ref": "#/$defs/Part"}}}}}})
TREE_TOOL = ToolDefinition(name="tree", parameters={  # recursion through the root
    "type": "object", "properties": {"label": {"type": "string"}, "kids": {"type": "array", "items": {"$ref": "#"}}}, "required": ["label"]})


def test_schema_refs_finds_what_points_nowhere_and_rebases_what_moves():
    schema = {"type": "object", "properties": {
        "a": {"$ref": "#/$defs/A"}, "b": {"$ref": "#/$defs/Missing"}, "c": {"$ref": "https://example.com/x.json"},
        "enum": {"$ref": "#/properties/a"},  # a property called "enum" is a schema, not data
        "d": {"const": {"$ref": "#/nowhere"}},  # data: not a reference
        "e": {"$ref": "#/$defs/A~1B"}, "f": {"$ref": "#anchor"}, "g": {"$ref": "#"}},
        "$defs": {"A": {"type": "integer"}, "A/B": {"type": "string"}}}
    assert schema_refs.unresolved_refs(schema) == ["#/$defs/Missing", "https://example.com/x.json", "#anchor"]
    moved = schema_refs.rebase(schema, "/$defs/t")
    assert moved["properties"]["a"] == {"$ref": "#/$defs/t/$defs/A"} and moved["properties"]["g"] == {"$ref": "#/$defs/t"}
    assert moved["properties"]["c"] == {"$ref": "https://example.com/x.json"}  # not local: left alone
    assert moved["properties"]["d"] == {"const": {"$ref": "#/nowhere"}}
    assert moved["properties"]["enum"] == {"$ref": "#/$defs/t/properties/a"}


@pytest.mark.parametrize("mode", ("auto", "required", "ship"))
def test_reply_schema_moves_parameters_with_refs_where_their_refs_still_resolve(mode):
    import jsonschema
    import llguidance

    reply = tool_format.reply_schema([ADDRESS_TOOL, TREE_TOOL, WEATHER], mode, parallel=True)
    assert schema_refs.unresolved_refs(reply) == []
    assert set(reply["$defs"]) == ({"ship", "tree"} if mode != "ship" else {"ship"})  # WEATHER has no refs: inline
    good = {"tool_calls": [{"name": "ship", "arguments": {"to": {"city": "Oslo"}, "parts": [{"name": "a", "sub": [{"name": "b"}]}]}}]}
    bad = {"tool_calls": [{"name": "ship", "arguments": {"to": {"town": "Oslo"}}}]}
    jsonschema.validate(good, reply)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, reply)
    if mode != "ship":
        jsonschema.validate({"tool_calls": [{"name": "tree", "arguments": {"label": "r", "kids": [{"label": "k", "kids": []}]}}]}, reply)
        with pytest.raises(jsonschema.ValidationError):  # "#" is the tool's parameters, not the reply
            jsonschema.validate({"tool_calls": [{"name": "tree", "arguments": {"label": "r", "kids": [{"tool_calls": []}]}}]}, reply)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(reply)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    assert not is_error, messages
