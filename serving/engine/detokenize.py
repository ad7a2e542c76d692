"""Incremental detokenization with stop strings, per request, on the host.

Text is released only once it can no longer change: never half a UTF-8 character, and never the first
characters of what may still become a stop string (those are held back until they either complete the stop
string, which ends the request, or stop matching it).
"""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far that is stable
        self.emitted = 0  # characters of self.text already released
        self.stopped = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; returns the newly released text. After a stop string is found, `stopped` is True and the
        text ends right before it."""
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        text = self._decode()
        if text.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        self.text = text
        return self._release(final=False)

    def finish(self) -> str:
        """The request ended: release what was held back (a stop string's partial match included)."""
        if self.stopped:
            return ""
        self.text = self._decode()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s) + 1))
            if at != -1 and at < end:
                end = at
                self.stopped = True
        if not self.stopped and not final:
            # hold back the longest tail that is a prefix of a stop string
            for s in self.stop:
                for n in range(min(len(s) - 1, end - self.emitted), 0, -1):
                    if self.text.endswith(s[:n]):
                        end = min(end, len(self.text) - n)
                        break
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
