"""Draft tokens for speculative decoding from the request's own tokens (prompt lookup).

Why: code editing repeats itself: a renamed identifier, a line like the one above, a call that
mirrors a definition in the prompt. When the last few tokens of a request (prompt and generated
ones) occurred earlier, the tokens that followed them there are a good guess for what comes next.
The engine checks a guess of k tokens with one forward of k + 1 positions, which at batch 1 costs
about one decode step (the weights are read once either way), and keeps the longest prefix the
model itself would have chosen greedily, plus the model's next token: the same tokens as one step
at a time, in fewer steps when the guess was right. No second model is needed.

`NgramIndex` remembers, for every n-gram of the request's tokens (n in `DRAFT_NGRAMS`), where it
last ended, so each step's lookup costs O(1) instead of a scan of the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

# Matched n-grams, longest first: one token alone matches too often to be worth a verification.
DRAFT_NGRAMS = (3, 2)
# Draft tokens per verification: with the step's pending token, 8 positions: a 16-wide tail graph.
MAX_DRAFT = 7


class NgramIndex:
    """The tokens of one request and, per n-gram, the position just past its latest occurrence
    before the current end (the tokens that followed it are the draft)."""

    def __init__(self, tokens: Sequence[int], ngrams: Sequence[int] = DRAFT_NGRAMS) -> None:
        self.tokens: list[int] = []
        self.ngrams = tuple(sorted(ngrams, reverse=True))
        self._after: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self._remember_last()
            self.tokens.append(token)

    def draft(self, limit: int = MAX_DRAFT) -> list[int]:
        """Up to `limit` tokens that followed the longest n-gram ending here, where it occurred
        before; empty when none did."""
        for n in self.ngrams:
            if len(self.tokens) < n:
                continue
            after = self._after.get(tuple(self.tokens[-n:]))
            if after is not None:
                return self.tokens[after : after + limit]
        return []

    def _remember_last(self) -> None:
        # Before a token is appended, the n-grams ending at the current end get "followed here":
        # so a lookup never finds the n-gram it is looking up (nothing followed it yet).
        end = len(self.tokens)
        for n in self.ngrams:
            if end >= n:
                self._after[tuple(self.tokens[end - n : end])] = end


def accepted_length(draft: Sequence[int], chosen: Sequence[int]) -> int:
    """How many draft tokens the model confirms: `chosen[i]` is its greedy token after the
    pending token and the first i draft tokens; draft token i stands while it equals it."""
    n = 0
    while n < len(draft) and draft[n] == chosen[n]:
        n += 1
    return n
