"""Which part of a document goes into a prompt: whole lines around the cursor, within a budget.

`select_window` keeps the text nearest the cursor: the cursor line whole on both sides when it
fits, then whole lines outward, the prefix filling up to `prefix_share` of the budget and the
suffix the rest, after which whatever one side left unused flows to the other (prefix first).
A cursor line longer than what is left is cut inside, at a character, keeping the text next to
the cursor; lines further out are only ever taken whole.

Cost is bounded by the budget, not the document: each side is first cut to `budget *
chars_per_token` characters (no token is longer than that on average), lines are counted one by
one only until the budget is spent, and the result is counted once more as a whole. That final
count is what the guarantee rests on, so it holds for any counter, even one that is not
additive over lines: `count_tokens(w.prefix) + count_tokens(w.suffix) <= budget`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

TokenCounter = Callable[[str], int]

# Upper bound on the characters one token stands for, on average over a window of code; the
# pre-cut only has to keep enough text, so a generous value costs a little time, never quality.
CHARS_PER_TOKEN = 8
# Interpolation search on a line stops within this many characters of the longest fitting cut.
_CUT_TOLERANCE = 8
_CUT_MAX_STEPS = 24


@dataclass(frozen=True)
class Window:
    """The selected text; `*_truncated` says whether anything of that side was left out."""

    prefix: str
    suffix: str
    prefix_truncated: bool
    suffix_truncated: bool
    prefix_tokens: int
    suffix_tokens: int


@dataclass
class _Side:
    """Pieces of one side, nearest to the cursor first; `taken` of them are in the window."""

    pieces: list[str]
    keep_end: bool  # the prefix keeps the end of a cut line, the suffix its start
    taken: int = 0
    used: int = 0  # estimated tokens of the taken pieces
    blocked: bool = False  # the cursor line was cut: nothing further out may follow
    costs: dict[int, int] = field(default_factory=dict)

    def cost(self, index: int, count: TokenCounter) -> int:
        """Tokens of one piece, counted once even when the quota and flow passes both ask."""
        if index not in self.costs:
            self.costs[index] = count(self.pieces[index])
        return self.costs[index]

    def text(self) -> str:
        taken = self.pieces[: self.taken]
        return "".join(reversed(taken) if self.keep_end else taken)


def select_window(
    prefix: str,
    suffix: str,
    count_tokens: TokenCounter,
    budget: int,
    *,
    prefix_share: float = 0.75,
    chars_per_token: int = CHARS_PER_TOKEN,
) -> Window:
    """Choose the text before and after the cursor that fits `budget` tokens (see module doc)."""
    budget = max(0, budget)
    max_chars = budget * chars_per_token
    pre = _Side(_prefix_pieces(prefix, max_chars), keep_end=True)
    suf = _Side(_suffix_pieces(suffix, max_chars), keep_end=False)
    count = _counter(count_tokens)
    prefix_quota = int(budget * min(max(prefix_share, 0.0), 1.0))
    _take_cursor_line(pre, suf, count, budget, prefix_quota)
    _extend(pre, count, min(prefix_quota, budget - suf.used) - pre.used)
    _extend(suf, count, budget - prefix_quota - suf.used)
    _extend(pre, count, budget - pre.used - suf.used)
    _extend(suf, count, budget - pre.used - suf.used)
    return _verified(prefix, suffix, pre, suf, count, budget)


def _counter(count_tokens: TokenCounter) -> TokenCounter:
    return lambda text: count_tokens(text) if text else 0


# -- pieces ----------------------------------------------------------------------------------
def _prefix_pieces(prefix: str, max_chars: int) -> list[str]:
    """The cursor line's start, then whole lines upward (newline included), from a bounded tail."""
    start = max(0, len(prefix) - max_chars)
    tail = prefix[start:]
    lines = tail.split("\n")
    pieces = [lines[-1], *(line + "\n" for line in reversed(lines[:-1]))]
    if start > 0 and prefix[start - 1] != "\n" and len(pieces) > 1:
        pieces.pop()  # the pre-cut fell inside that line: only whole lines are kept
    return pieces


def _suffix_pieces(suffix: str, max_chars: int) -> list[str]:
    """The cursor line's rest, then whole lines downward (newline included), from a bounded head."""
    head = suffix[:max_chars]
    pieces = _split_lf(head) or [""]
    if len(head) < len(suffix) and not pieces[-1].endswith("\n") and len(pieces) > 1:
        pieces.pop()  # the pre-cut fell inside that line
    return pieces


def _split_lf(text: str) -> list[str]:
    lines = text.split("\n")
    pieces = [line + "\n" for line in lines[:-1]]
    return [*pieces, lines[-1]] if lines[-1] else pieces


# -- filling ---------------------------------------------------------------------------------
def _take_cursor_line(
    pre: _Side, suf: _Side, count: TokenCounter, budget: int, prefix_quota: int
) -> None:
    """The cursor line first: whole when it fits, otherwise cut next to the cursor.

    When both parts do not fit, the suffix's part keeps up to its share of the budget, so a
    megabyte line around the cursor still shows the model some text after the cursor.
    """
    pre_tokens, suf_tokens = count(pre.pieces[0]), count(suf.pieces[0])
    _take_first(pre, count, budget - min(suf_tokens, budget - prefix_quota), pre_tokens)
    _take_first(suf, count, budget - pre.used, suf_tokens)


def _take_first(side: _Side, count: TokenCounter, allowance: int, tokens: int) -> None:
    """Take the side's cursor-line part, cut to `allowance` when it is longer."""
    if tokens > allowance:
        cut = _cut_to_fit(side.pieces[0], count, allowance, side.keep_end, tokens)
        side.pieces[0], tokens = cut
        side.blocked = True
    side.taken, side.used = 1, tokens


def _extend(side: _Side, count: TokenCounter, allowance: int) -> None:
    """Take whole pieces outward while they fit `allowance` more tokens."""
    while not side.blocked and side.taken < len(side.pieces):
        tokens = side.cost(side.taken, count)
        if tokens > allowance:
            return  # a later pass with more allowance may still take it
        side.taken += 1
        side.used += tokens
        allowance -= tokens


def _cut_to_fit(
    text: str, count: TokenCounter, allowance: int, keep_end: bool, full_tokens: int
) -> tuple[str, int]:
    """The longest (within a few characters) end or start of `text` with at most `allowance`.

    Interpolation search: token counts grow about linearly with length, so a handful of counts
    of window-sized text find the cut even in a megabyte line.
    """

    def part(n: int) -> str:
        return text[len(text) - n :] if keep_end else text[:n]

    lo, lo_tokens, hi, hi_tokens = 0, 0, len(text), full_tokens
    for step in range(_CUT_MAX_STEPS):
        if hi - lo <= _CUT_TOLERANCE or allowance <= 0:
            break
        if step % 3 == 2:  # a bisection now and then guarantees progress
            guess = (lo + hi) // 2
        else:
            share = (allowance - lo_tokens) / max(1, hi_tokens - lo_tokens)
            guess = lo + int((hi - lo) * share)
        guess = min(max(guess, lo + 1), hi - 1)
        tokens = count(part(guess))
        if tokens <= allowance:
            lo, lo_tokens = guess, tokens
        else:
            hi, hi_tokens = guess, tokens
    return part(lo), lo_tokens


# -- the guarantee ---------------------------------------------------------------------------
def _verified(
    prefix: str, suffix: str, pre: _Side, suf: _Side, count: TokenCounter, budget: int
) -> Window:
    """Count the window as a whole and give up outer lines until it really fits the budget."""
    pre_tokens, suf_tokens = count(pre.text()), count(suf.text())
    while pre_tokens + suf_tokens > budget:
        _shrink(pre, suf, count, budget, pre_tokens)
        pre_tokens, suf_tokens = count(pre.text()), count(suf.text())
    pre_text, suf_text = pre.text(), suf.text()
    return Window(
        prefix=pre_text,
        suffix=suf_text,
        prefix_truncated=len(pre_text) < len(prefix),
        suffix_truncated=len(suf_text) < len(suffix),
        prefix_tokens=pre_tokens,
        suffix_tokens=suf_tokens,
    )


def _shrink(pre: _Side, suf: _Side, count: TokenCounter, budget: int, pre_tokens: int) -> None:
    """One step towards the budget: an outer suffix line, else an outer prefix line, else the
    suffix's part of the cursor line, else cut the prefix's part. Only reached when the counter
    is not additive over lines (per-line counts of SentencePiece never underestimate)."""
    if suf.taken > 1:
        suf.taken -= 1
    elif pre.taken > 1:
        pre.taken -= 1
    elif suf.pieces[0]:
        suf.pieces[0] = ""
    else:
        pre.pieces[0], _ = _cut_to_fit(pre.pieces[0], count, budget, True, pre_tokens)
