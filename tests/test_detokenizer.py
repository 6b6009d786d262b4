"""Detokenizer tests on small tokenizers trained here, so no model files are needed."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams

CORPUS = ["hello world, the quick brown fox", "你好世界 日本語のテキスト 한국어",
          "🙂🚀 emoji 👩\u200d👩\u200d👧 family", "café naïve über",
          "stop here. STOP now\nnew line"] * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """Byte-level BPE: merges learn whole CJK/emoji characters and pieces of them."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def stream(tok: Tokenizer, ids: list[int], params: SamplingParams = SamplingParams(),
           **kwargs) -> tuple[IncrementalDetokenizer, list[str]]:
    detok = IncrementalDetokenizer(tok, params, **kwargs)
    pieces = []
    for i in ids:
        pieces.append(detok.push(i))
        assert detok.text == "".join(pieces)
    return detok, pieces


def reference_stop(text: str, stops: tuple[str, ...], include: bool) -> tuple[str, str | None]:
    """Read text one character at a time; stop at the first stop string completed."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return (text[:end] if include else text[:end - len(stop)]), stop
    return text, None


@pytest.mark.parametrize("text", ["hi 🙂 世界 é", "🚀🚀🚀", "日本語テキスト 👩\u200d👩\u200d👧 naïve",
                                  "한국어🙂x", "plain ascii"])
def test_multibyte_characters_are_never_split(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text).ids
    detok, pieces = stream(tok, ids)
    assert not any("\ufffd" in p for p in pieces)
    assert detok.flush() == ""
    assert "".join(pieces) == detok.text == tok.decode(ids) == text


def test_the_tokenizer_really_splits_characters(tok: Tokenizer) -> None:
    # guards the test above: some tokens here are fragments of a character
    ids = tok.encode("hi 🙂 世界 é 🚀").ids
    assert any("\ufffd" in tok.decode([i]) for i in ids)


def test_flush_emits_an_incomplete_tail(tok: Tokenizer) -> None:
    ids = tok.encode("ok 🙂").ids
    cut = next(n for n in range(len(ids), 0, -1) if tok.decode(ids[:n]).endswith("\ufffd"))
    detok, pieces = stream(tok, ids[:cut])
    assert "\ufffd" not in "".join(pieces)
    tail = detok.flush()
    assert tail.endswith("\ufffd")
    assert detok.text == "".join(pieces) + tail == tok.decode(ids[:cut])


def test_special_tokens(tok: Tokenizer) -> None:
    eos = tok.token_to_id("<eos>")
    ids = tok.encode("ab").ids + [eos] + tok.encode("cd").ids
    assert stream(tok, ids)[0].text == "abcd"
    assert stream(tok, ids, skip_special_tokens=False)[0].text == "ab<eos>cd"


def test_stop_string_split_across_tokens(tok: Tokenizer) -> None:
    text = "hello world, the quick brown fox"
    ids = tok.encode(text).ids
    stop = "world, the"
    # the stop spans several tokens: no single token's text holds it whole
    assert all(stop not in tok.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tok, SamplingParams(stop=(stop,)))
    for i in ids:
        detok.push(i)
        assert "w" not in detok.text  # no part of the stop string leaks, even briefly
    assert detok.text == "hello "
    assert detok.stop_reason == stop
    assert detok.push(ids[0]) == "" and detok.flush() == ""


def test_include_stop_str_in_output(tok: Tokenizer) -> None:
    ids = tok.encode("the quick brown fox").ids
    params = SamplingParams(stop=("ck br",), include_stop_str_in_output=True)
    detok, pieces = stream(tok, ids, params)
    assert detok.text == "".join(pieces) == "the quick br"
    assert detok.stop_reason == "ck br"


def test_partial_stop_is_held_then_released(tok: Tokenizer) -> None:
    ids = tok.encode("hello world news").ids
    detok = IncrementalDetokenizer(tok, SamplingParams(stop=("world peace",)))
    seen = []
    for i in ids:
        detok.push(i)
        seen.append(detok.text)
    # "world " could still become "world peace": nothing of it shows until the "n" rules it out
    assert "hello " in seen
    assert all(t.startswith("hello world n") for t in seen if t.startswith("hello w"))
    assert detok.text == "hello world news" and detok.stop_reason is None


def test_flush_releases_a_held_prefix(tok: Tokenizer) -> None:
    ids = tok.encode("the end wor").ids
    detok, pieces = stream(tok, ids, SamplingParams(stop=("world",)))
    assert detok.text == "the end "
    assert detok.flush() == "wor"
    assert detok.text == "the end wor" and detok.stop_reason is None


def test_first_stop_to_complete_wins(tok: Tokenizer) -> None:
    text = "stop here. STOP now"
    ids = tok.encode(text).ids
    detok, _ = stream(tok, ids, SamplingParams(stop=("STOP", "here. ST", "e")))
    assert (detok.text, detok.stop_reason) == reference_stop(text, ("STOP", "here. ST", "e"), False)
    assert detok.text == "stop h"
    # both stops complete within one token; the one a character-by-character reader meets first
    # ("orl") wins over the one that starts first ("world")
    assert len(tok.encode(" world").ids) == 1
    detok, _ = stream(tok, tok.encode("hello world").ids, SamplingParams(stop=("world", "orl")))
    assert (detok.text, detok.stop_reason) == ("hello w", "orl")
    # two stops completing at the same character: the longer one, so none of it shows
    detok, _ = stream(tok, tok.encode("hello world").ids, SamplingParams(stop=("ld", "world")))
    assert (detok.text, detok.stop_reason) == ("hello ", "world")


def test_prompt_context_renders_a_leading_space() -> None:
    # SentencePiece-style: "▁world" decodes to "world" alone but " world" after "hello"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(vocab_size=60))
    ids = tokenizer.encode("hello world").ids
    prompt, output = ids[:1], ids[1:]
    assert tokenizer.decode(output) == "world"
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(), prompt_token_ids=prompt)
    assert "".join(detok.push(i) for i in output) == " world"


# mostly characters the tokenizer has merges for, plus any others (it falls back to bytes)
TEXT = st.text(alphabet=st.sampled_from(list("ab .,\nxyzé世界日本🙂🚀👩\u200d한"))
               | st.characters(exclude_characters="\ufffd", exclude_categories=("Cs",)),
               max_size=40)


@settings(max_examples=150, deadline=None)
@given(text=TEXT, data=st.data())
def test_stream_equals_reference_property(tok: Tokenizer, text: str, data: st.DataObject) -> None:
    stops = tuple(data.draw(st.lists(st.one_of(
        st.builds(lambda a, n: text[a:a + n], st.integers(0, 40), st.integers(1, 6)),
        st.text(alphabet="ab xé世", min_size=1, max_size=4)), max_size=3).map(
            lambda ss: [s for s in ss if s])))
    include = data.draw(st.booleans())
    ids = tok.encode(text).ids
    expected, reason = reference_stop(text, stops, include)
    params = SamplingParams(stop=stops, include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(tok, params)
    pieces = []
    for i in ids:
        pieces.append(detok.push(i))
        assert expected.startswith(detok.text)  # nothing past the final text ever goes out
    pieces.append(detok.flush())
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) == detok.text == expected
    assert detok.stop_reason == reason


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(1, 399), max_size=30))
def test_any_token_sequence_decodes_like_the_tokenizer(tok: Tokenizer, ids: list[int]) -> None:
    detok = IncrementalDetokenizer(tok, SamplingParams())
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids)
