"""The text of an answer as its tokens arrive: decoded, cut at stop strings, released in deltas.

Each step decodes all the answer's tokens again (a few hundred at most: microseconds with the
`tokenizers` library) instead of token by token, since byte-level BPE tokens are not whole
characters: a character split over two tokens decodes to U+FFFD until its last byte arrives, so
a trailing U+FFFD is held back. So is the longest end of the text that could still grow into a
stop string: a client never sees text that a stop string later takes back.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"


class AnswerText:
    """decode: token ids -> text (special tokens skipped). stop: strings that end the answer."""

    def __init__(self, decode: Callable[[list[int]], str] | None, stop: list[str]):
        if stop and decode is None:
            raise ValueError("stop: stop strings need a tokenizer to decode the answer with")
        self.decode, self.stop = decode, list(stop)
        self.tokens: list[int] = []
        self.text = ""  # the answer so far (cut at a stop string once one appeared)
        self.sent = 0  # characters of self.text already released
        self.stopped = False

    def add(self, token: int) -> None:
        """Appends a token; sets `stopped` when the text now holds a stop string."""
        self.tokens.append(token)
        if self.decode is None:
            return
        text = self.decode(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped = text[:cut], True
        self.text = text

    def delta(self, final: bool = False) -> str:
        """Text not released yet; unless final, what may still change is held back."""
        end = len(self.text)
        if not final:
            while end > self.sent and self.text[end - 1] == REPLACEMENT:
                end -= 1
            end -= self._stop_prefix_at_end(self.text[:end])
        if end <= self.sent:
            return ""
        out = self.text[self.sent:end]
        self.sent = end
        return out

    def _stop_prefix_at_end(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper beginning of a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest
