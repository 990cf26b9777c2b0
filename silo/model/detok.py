"""Incremental detokenisation: each new token costs the decoding of a few tokens, not of the whole completion.

A token's text depends on its neighbours (a byte-level BPE token may hold half of a UTF-8 character;
SentencePiece drops a word's leading space when a token is decoded alone), so a token is never decoded
by itself. Two offsets walk along the ids: `prefix` (where the last decode window starts) and `read`
(what has been turned into text). A new token's text is decode(ids[prefix:]) minus decode(ids[prefix:read]);
while it ends in an incomplete character (U+FFFD) nothing is released and the next token is awaited.
"""

from __future__ import annotations

from typing import Sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer, context: Sequence[int] = ()):
        """`context`: ids that come before the completion (the prompt's last tokens), decoded with the first
        new tokens so that their text reads as it does after a word; their own text is never released."""
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context)[-4:]
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _delta(self) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        return after[len(before):] if len(after) > len(before) else ""

    def push(self, token: int) -> str:
        """Add one token; returns the text it completes ('' while a character is still incomplete)."""
        self.ids.append(int(token))
        delta = self._delta()
        if not delta or delta.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return delta

    def flush(self) -> str:
        """The text of tokens still held back (an incomplete character at the very end)."""
        if self.read == len(self.ids):
            return ""
        delta = self._delta()
        self.prefix = self.read = len(self.ids)
        return delta


def decode_with_offsets(tokenizer, ids: Sequence[int]) -> tuple[str, list[int]]:
    """The text of `ids` and where each token's text starts in it (a token whose character is completed by
    a later one starts where that character does), decoded incrementally."""
    d = IncrementalDetokenizer(tokenizer)
    text, offsets = "", []
    for t in ids:
        offsets.append(len(text))
        text += d.push(t)
    return text + d.flush(), offsets
