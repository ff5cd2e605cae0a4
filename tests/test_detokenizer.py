"""Incremental detokenization gives the text a full decode gives, token by token: multi-byte characters
split across byte tokens, invalid byte sequences, and stop strings split across tokens."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernos.kernel.llm.engine.detokenizer import Detokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from kernos.kernel.llm.testing import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def run(tok, ids, stop=()):
    """Feed ids one at a time as the engine does; (final text, streamed text, index of the stopping id)."""
    d = Detokenizer(tok, list(stop))
    streamed, stopped_at = "", None
    for i in range(len(ids)):
        if d.add(ids[:i + 1]):
            stopped_at = i
            break
        streamed += d.ready()
    d.flush(ids[:stopped_at + 1] if stopped_at is not None else ids)
    return d.text, streamed + d.rest(), stopped_at


def full(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", ["héllo wörld", "你好, the agent 🙂 kernel", "naïve café — ok", "🙂🙂🙂 x"])
def test_multibyte_text_equals_a_full_decode(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())          # the characters really are split over byte tokens
    final, streamed, _ = run(tok, ids)
    assert final == full(tok, ids) == text
    assert streamed == text                      # never a half character on the stream


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 999), min_size=1, max_size=40))
def test_any_ids_equal_a_full_decode(tok, ids):
    ids = [i % len(tok) for i in ids]
    final, streamed, _ = run(tok, ids)
    assert final == full(tok, ids)
    assert streamed == final


@pytest.mark.parametrize("stop", ["###END", "ö!", "agent kern", "🙂"])
def test_stop_strings_split_across_tokens(tok, stop):
    text = f"the agent kernel says héllo {stop} and then more text"
    ids = tok.encode(text, add_special_tokens=False)
    final, streamed, stopped_at = run(tok, ids, [stop])
    expected = full(tok, ids)[:full(tok, ids).find(stop)]
    assert final == expected and streamed == expected
    assert stopped_at is not None and stop in full(tok, ids[:stopped_at + 1])
    assert stop not in full(tok, ids[:stopped_at])       # it stopped on the token that completed it


def test_restore_continues_the_same_text(tok):
    ids = tok.encode("memory 你好 storage", add_special_tokens=False)
    for cut in range(1, len(ids)):
        d = Detokenizer(tok, [])
        d.restore(ids[:cut], len(full(tok, ids[:cut]).rstrip("\ufffd")))
        for i in range(cut, len(ids)):
            d.add(ids[:i + 1])
        d.flush(ids)
        assert d.text == full(tok, ids)
