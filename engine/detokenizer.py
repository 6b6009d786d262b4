"""Turn a request's output tokens into text, one token at a time, and stop on stop strings.

Decoding: a byte-level BPE token can be part of a multi-byte UTF-8 character, so a token's text
is only known once the following tokens complete it. We keep a window of token ids from just
before the last emitted text (prefix_offset) through the newest token, decode the window, and
emit what lies past the text of its already-emitted part (read_offset) unless it ends in U+FFFD,
the decoder's mark for incomplete bytes. The context tokens before read_offset also let decoders
that strip a leading space (SentencePiece) render a token's space correctly mid-text.
(tokenizers.decoders.DecodeStream steps the same way, but keeps its window to itself, so the
bytes it holds back could not be handed out when a request finishes.)

Stop strings: text whose end could still grow into a stop string (the longest suffix that is a
proper prefix of one) is held back, so a client never sees part of a stop string. A match is
searched in held text + new text; the one that ends first wins (the longest on a tie), which is
also the match a reader going character by character would see first, however the text was
split into tokens.
"""
from __future__ import annotations

from typing import Sequence

import tokenizers

from engine.sampling_params import SamplingParams

# prompt tokens kept as decoding context; a few are enough to render the first output token
_CONTEXT_TOKENS = 4
_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: tokenizers.Tokenizer, params: SamplingParams,
                 skip_special_tokens: bool = True, prompt_token_ids: Sequence[int] = ()):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stops = params.stop
        self._include_stop = params.include_stop_str_in_output
        self._ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # window start: context for the tokens after it
        self._read_offset = len(self._ids)  # tokens before this have been turned into text
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        self._text = ""  # emitted to the client
        self._held = ""  # decoded, but may be the start of a stop string
        # the matched stop string; the engine may set a stop token id here itself
        self.stop_reason: str | int | None = None

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text

    def push(self, token_id: int) -> str:
        """Add the next output token; return the new text it makes printable (maybe "")."""
        if self.stop_reason is not None:
            return ""
        self._ids.append(token_id)
        window = self._decode(self._prefix_offset, len(self._ids))
        if len(window) <= len(self._prefix_text) or window.endswith(_INCOMPLETE):
            return ""  # a special token that renders as nothing, or a character still incomplete
        return self._emit(self._advance(window), final=False)

    def flush(self) -> str:
        """At finish: emit everything held back (incomplete bytes become U+FFFD)."""
        if self.stop_reason is not None:
            return ""
        window = self._decode(self._prefix_offset, len(self._ids))
        new = self._advance(window) if len(window) > len(self._prefix_text) else ""
        return self._emit(new, final=True)

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special)

    def _advance(self, window: str) -> str:
        """Mark every token so far as read; return the window's text past the read part."""
        new = window[len(self._prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        return new

    def _emit(self, new: str, final: bool) -> str:
        """Run new text through stop-string matching; return the part the client may see."""
        if not self._stops:
            self._text += new
            return new
        text = self._held + new
        match = _first_stop(text, self._stops)
        if match is not None:
            start, stop = match
            out = text[:start + len(stop) if self._include_stop else start]
            self.stop_reason = stop
            self._held = ""
        else:
            hold = 0 if final else _stop_prefix_len(text, self._stops)
            out, self._held = text[:len(text) - hold], text[len(text) - hold:]
        self._text += out
        return out


def _first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """(start, stop) of the stop string occurrence that ends first in text (longest on a tie)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        start = text.find(stop)  # a string's first occurrence is also its first to end
        if start < 0:
            continue
        if best is None or (start + len(stop), start) < (best[0] + len(best[1]), best[0]):
            best = (start, stop)
    return best


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
