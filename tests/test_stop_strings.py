"""Stop strings over streamed chunks."""

from __future__ import annotations

import random

import pytest

from cluster.stop_strings import StopStringFilter


def run(stops: list[str], chunks: list[str]) -> tuple[list[str], bool, str]:
    """Push every chunk (stopping at the first hit) and flush; return (outputs, hit, flushed)."""
    f = StopStringFilter(stops)
    outs: list[str] = []
    for chunk in chunks:
        out, hit = f.push(chunk)
        outs.append(out)
        if hit:
            return outs, True, f.flush()
    return outs, False, f.flush()


def test_no_stop_strings_pass_text_through() -> None:
    f = StopStringFilter([])
    assert f.push("hello <") == ("hello <", False)
    assert f.push("") == ("", False)
    assert f.flush() == ""
    assert not f.stopped and f.matched is None


def test_stop_inside_one_chunk() -> None:
    f = StopStringFilter(["</s>"])
    assert f.push("answer</s>ignored") == ("answer", True)
    assert f.stopped and f.matched == "</s>"
    assert f.push("more") == ("", True)
    assert f.flush() == ""


def test_stop_spanning_several_pushes() -> None:
    outs, hit, rest = run(["<|im_end|>"], ["Hi", " there<", "|im", "_e", "nd|", ">after"])
    assert outs == ["Hi", " there", "", "", "", ""]
    assert hit and rest == ""


def test_holds_back_only_a_possible_prefix() -> None:
    f = StopStringFilter(["STOP"])
    assert f.push("go ST") == ("go ", False)
    assert f.push("AR") == ("STAR", False)  # "STA" + "R" can no longer become "STOP"
    assert f.push("S") == ("", False)
    assert f.push("!") == ("S!", False)
    assert f.push("xS") == ("x", False)
    assert f.flush() == "S"


def test_overlapping_prefixes() -> None:
    # "abab" + "ac": the stop starts at the second "ab", which an early commit would lose.
    outs, hit, _ = run(["abac"], list("ababac"))
    assert "".join(outs) == "ab" and hit
    outs, hit, _ = run(["aab"], list("aaab"))
    assert "".join(outs) == "a" and hit


def test_multiple_stop_strings_first_to_complete_wins() -> None:
    f = StopStringFilter(["world", "o w"])
    assert f.push("hello world") == ("hell", True)
    assert f.matched == "o w"
    f = StopStringFilter(["abc", "ab"])
    assert f.push("xabcd") == ("x", True)
    assert f.matched == "ab"
    f = StopStringFilter(["c", "abc"])
    assert f.push("xabcd") == ("x", True)
    assert f.matched == "abc"  # both complete at the same character: the longer one


def test_result_does_not_depend_on_chunking() -> None:
    # "c" completes before "bcc" does, whether the text comes at once or a character at a time.
    assert run(["bcc", "c"], ["abcc"])[:2] == (["ab"], True)
    outs, hit, _ = run(["bcc", "c"], list("abcc"))
    assert "".join(outs) == "ab" and hit


def test_multiple_stop_strings_hold_the_longest_prefix() -> None:
    f = StopStringFilter(["\n\nUser:", "###"])
    assert f.push("done\n\nUs") == ("done", False)
    assert f.push("ed ##") == ("\n\nUsed ", False)
    assert f.push("#") == ("", True)


def test_flush_releases_held_text_at_the_end() -> None:
    f = StopStringFilter(["</answer>"])
    assert f.push("42</ans") == ("42", False)
    assert f.flush() == "</ans"
    assert f.flush() == ""


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError):
        StopStringFilter(["ok", ""])


def test_bare_string_is_one_stop() -> None:
    f = StopStringFilter("END")
    assert f.stops == ("END",)
    assert f.push("aEND") == ("a", True)


def test_matches_a_whole_text_search_for_random_chunking() -> None:
    rng = random.Random(2024)
    for _ in range(3000):
        text = "".join(rng.choice("abc😀") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("abc😀") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 8))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        f = StopStringFilter(stops)
        outs, hit = [], False
        for chunk in chunks:
            out, hit = f.push(chunk)
            outs.append(out)
            held = len(text[: sum(map(len, chunks[: len(outs)]))]) - len("".join(outs))
            assert hit or held < max(map(len, stops), default=1)
            if hit:
                break
        emitted = "".join(outs) + f.flush()
        # Reference: the first position at which some stop string ends, over the whole text.
        ends = [(i + len(s), i) for s, i in ((s, text.find(s)) for s in stops) if i >= 0]
        expected = text[: min(ends)[1]] if ends else text
        assert (emitted, hit) == (expected, bool(ends)), (text, stops, chunks)
