"""TextStream: whole UTF-8 characters only, and no part of a stop string ever released."""

from backend.text_stream import TextStream


def feed(stream: TextStream, pieces: list[bytes]) -> tuple[list[str], bool]:
    out = []
    for p in pieces:
        text, stopped = stream.push(p)
        out.append(text)
        if stopped:
            return out, True
    out.append(stream.flush())
    return out, False


def test_multibyte_character_split_across_tokens_is_never_emitted_broken():
    euro = "€".encode()  # 3 bytes
    out, _ = feed(TextStream([]), [b"a", euro[:1], euro[1:2], euro[2:], b"b"])
    assert out == ["a", "", "", "€", "b", ""]
    assert all("\ufffd" not in chunk for chunk in out)


def test_invalid_bytes_become_replacement_characters_at_the_end():
    out, _ = feed(TextStream([]), [b"ok", b"\xe2\x82"])
    assert "".join(out) == "ok\ufffd"


def test_stop_string_spanning_tokens_is_held_back_and_dropped():
    out, stopped = feed(TextStream(["###"]), [b"Hello #", b"#", b"# world"])
    assert stopped
    assert "".join(out) == "Hello "
    assert not any("#" in chunk for chunk in out)


def test_held_prefix_is_released_when_it_stops_matching():
    out, stopped = feed(TextStream(["STOP"]), [b"ST", b"AR", b"T"])
    assert not stopped
    assert out == ["", "STAR", "T", ""]


def test_earliest_of_several_stops_wins():
    stream = TextStream(["b", "cd"])
    out, stopped = feed(stream, [b"a cd b"])
    assert stopped and "".join(out) == "a " and stream.matched == "cd"  # which one ended it
    stream = TextStream(["xy", "x"])
    assert feed(stream, [b"axyz"])[1] and stream.matched == "xy"  # at one place: the first listed
    assert TextStream(["q"]).matched is None


def test_stop_inside_multibyte_text():
    out, stopped = feed(TextStream(["é"]), ["caf".encode(), "é".encode()[:1], "é".encode()[1:], b"!"])
    assert stopped and "".join(out) == "caf"
