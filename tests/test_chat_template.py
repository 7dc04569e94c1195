"""Chat template choice and rendering."""

import pytest

from backend.chat_template import ChatTemplate, ChatTemplateError, choose_template

MSGS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a colour."},
]


def test_gemma_fallback_for_an_instruction_tuned_gemma_gguf_without_template():
    t = choose_template("", None, "gemma3", "Gemma 3 270m it")
    assert t.source == "gemma"
    text = t.render(MSGS, bos_token="<bos>", eos_token="<eos>")
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nName a colour.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_vicuna_fallback_matches_fastchat_v1_1():
    t = choose_template("", None, "llama", "vicuna-7b-v1.3")
    assert t.source == "vicuna"
    text = t.render(MSGS, bos_token="<s>", eos_token="</s>")
    assert text == "<s>Be brief. USER: Hi ASSISTANT: Hello!</s>USER: Name a colour. ASSISTANT:"
    default = t.render(MSGS[1:2], bos_token="<s>", eos_token="</s>")
    assert default.startswith("<s>A chat between a curious user and an artificial intelligence assistant.")
    assert default.endswith("USER: Hi ASSISTANT:")


@pytest.mark.parametrize("name,colon", [("transcript", "Assistant:"), ("vicuna", "ASSISTANT:")])
def test_fallbacks_render_a_streamed_answer_as_it_was_generated(name, colon):
    """The generation prompt ends at the colon and the model writes the space: an answer sent back with
    it gets no second one (else the history tokenizes unlike the answer's cells); one without gets one."""
    t = choose_template(name, None, "llama", "x")
    with_space = t.render([*MSGS[1:2], {"role": "assistant", "content": " Hello!"}, MSGS[3]], "<s>", "</s>")
    without = t.render(MSGS[1:], "<s>", "</s>")
    assert with_space == without and f"{colon} Hello!" in without and f"{colon}  Hello" not in with_space


def test_gguf_template_wins_and_override_beats_it(tmp_path):
    gguf = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    assert choose_template("", gguf, "gemma3", "x").render(MSGS[1:2], "", "") == "[user]Hi"
    assert choose_template("chatml", gguf, "gemma3", "x").source == "chatml"
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[0].content | upper }}")
    assert choose_template(str(f), gguf, "gemma3", "x").render(MSGS[1:2], "", "") == "HI"
    with pytest.raises(ValueError):
        choose_template("no-such-template", None, "gemma3", "x")


def test_template_errors_are_reported_not_crashed():
    t = choose_template("", "{{ raise_exception('roles must alternate') }}", "x", "y")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        t.render(MSGS, "", "")


def test_answer_spans_are_the_tokens_wholly_inside_each_answer():
    from backend.prepare import answer_spans

    pieces = [b"<s>", b"User:", b" Hi", b"\n", b"Assistant:", b" H\xc3\xa9llo", b" there", b"\n", b"User:", b" ok",
              b"\n", b"Assistant:"]
    text = b"".join(pieces).decode()
    start = text.index(" H\u00e9llo")
    assert answer_spans(text, pieces, [(start, start + 12)]) == [(5, 7)]
    assert answer_spans(text, pieces, [(start + 1, start + 12)]) == [(6, 7)]  # " Héllo" straddles the start
    assert answer_spans(text, pieces[:-1], [(start, start + 12)]) == []  # pieces that do not spell the text


def test_answer_ranges_find_each_answer_where_its_turn_renders_it():
    """An answer is looked for right after the conversation before it, so a base model's answer that
    repeats the user's message (and the template's own lines) is found where it is, not earlier."""
    t = choose_template("transcript", None, "gemma3", "x")
    echo = " Name a color.\nAssistant: Name a color.\n"
    msgs = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": echo},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Thanks."}]
    text = t.render(msgs, "<s>", "</s>")
    (a1, b1), (a2, b2) = t.answer_ranges(text, msgs, "<s>", "</s>")
    assert text[a1:b1] == echo and a1 == len(t.render(msgs[:1], "<s>", "</s>"))
    assert text[a2:b2] == "Blue." and text[a2 - 1] == " "  # the separator the template adds
    trims = ChatTemplate("test", "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</>{% endfor %}"
                                 "{% if add_generation_prompt %}<assistant>{% endif %}")  # as Gemma's own does
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there\n"}, {"role": "user", "content": "Bye"}]
    text = trims.render(msgs, "<bos>", "<eos>")
    assert [text[a:b] for a, b in trims.answer_ranges(text, msgs, "<bos>", "<eos>")] == ["Hello there"]
