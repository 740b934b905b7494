"""Turn generated text into an ordered list of items, each with its exact character span.

The RL stage maps each item's span to token positions and puts the item's reward on the token that ends
its title, so `ParsedItem.end` is the index just past the title's last character in the generated text.

Parsing (`parse_items`), robust to real model output:
- A line is an item when it starts with a list marker: "1.", "1)", "1]", "(1)", "1 -", or a bullet
  ("-", "*", "•", "·", "+", "–", "—"), optionally indented. If no line has a marker, every non-empty line
  is an item (a list written one title per line). Text before or after the list, and blank lines, are
  skipped when markers are present. "\\r\\n" line ends and a missing final newline are fine.
- One line holding a whole numbered list ("1. A 2. B 3. C") is split at " 2. ", " 3. ", ... (each next
  number in turn, so a number inside a title that does not continue the count is left alone).
- The parsed title is the rest of the line (whitespace trimmed), quotes and annotations included: only
  the catalogue can tell "Toy Story (1995)" or '"Great Performances" Cats (1998)' (real ML-1M titles)
  from "Heat (1995) - a great film" or '"Heat" - great' (a title plus a note); the strict matcher
  counts such a line as unknown, the lenient one narrows the span to the part that names a known item.

Mapping (`Catalogue`), in one of two modes (`MATCH_MODES`):
- "strict" (the default, for evaluation and PPO rewards): the whole parsed title must be a catalogue title,
  compared after `normalise(..., lenient=False)`: Unicode NFKC, runs of whitespace as one space, stripped,
  and an English article filed last moved to the front ("Big Lebowski, The (1998)" = "The Big Lebowski
  (1998)"). Case, quotes and punctuation count: "heat (1995)", '"Heat (1995)"', "Heat (1995)." and
  "Heat (3)" are not "Heat (1995)" or "Heat", "Star Wars - The Clone Wars" is not "Star Wars". This is
  the paper's rule (a title exists only when it is in the catalogue) and the official code's exact match.
- "lenient": the raw title, then normalised titles with case folded and curly quotes straightened, each
  tried on the whole text and then on shorter parts (`title_candidates`: the text inside quotes, prefixes
  that end before an annotation such as " (1995) - a great film"). Friendlier to free-form output, but it
  scores invented titles ("Heat (3)" as "Heat") as real: results made with it must say so.
With `fuzzy=True`, either mode falls back to a Levenshtein match (distance <= max_distance on the mode's
normalised text, nearest wins, ties to the lowest item id): strict on the whole title (the paper's
optional edit-distance rule), lenient over the same candidates. Unknown titles keep item id -1 and their
whole span; a matched item's span is the part of the text that named it (the whole title when strict).
"""

from __future__ import annotations

import re
import unicodedata
from typing import NamedTuple, Sequence

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

UNKNOWN = -1
MATCH_MODES = ("strict", "lenient")

_NUMBERED = re.compile(r"[ \t]*\(?(\d{1,3})(?:[.)\]](?!\d)|[ \t]*[-–—](?=\s))[ \t]*")
_BULLET = re.compile(r"[ \t]*[-*•·+–—](?=\s)[ \t]*")
_QUOTES = (("**", "**"), ('"', '"'), ("“", "”"), ("'", "'"), ("‘", "’"), ("«", "»"), ("*", "*"), ("_", "_"))
_SEPARATORS = re.compile(r"\s+(?:[(\[]|[-–—|]+\s)")  # a cut before an annotation: " (", " [", " - ", " | "
_GROUP_END = re.compile(r"(?<=[)\]])(?=.)")  # a cut after ")" or "]": "Heat (1995): a thriller"
_TRAILING = " \t\r.,;"
_SPACES = re.compile(r"\s+")
# MovieLens and other catalogues file "The Big Lebowski (1998)" as "Big Lebowski, The (1998)".
_TRAILING_ARTICLE = re.compile(r"^(.+), (the|a|an)((?: \([^()]*\))*)$", re.IGNORECASE)
_QUOTE_MAP = str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'", "`": "'"})


class ParsedItem(NamedTuple):
    title: str  # the title text exactly as it appears: text[start:end]
    start: int  # index of the title's first character in the generated text
    end: int  # index just past the title's last character
    line_end: int  # index of the end of the item's line: its "\n", or len(text) on the last line
    item_id: int = UNKNOWN  # set by Catalogue.match; -1 for an unknown title


def _line_spans(text: str):
    """(start, end) of each "\n"-separated line, end at its "\n" (a "\r" before it is trimmed later)."""
    start = 0
    for line in text.split("\n"):
        yield start, start + len(line)
        start += len(line) + 1


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    """text[start:end] without surrounding whitespace, as (start, end)."""
    piece = text[start:end]
    stripped = piece.lstrip()
    start += len(piece) - len(stripped)
    return start, start + len(stripped.rstrip())


_INLINE_NUMBER = re.compile(r"\s(\d{1,3})[.)]\s")


def _split_inline(text: str, start: int, end: int, number: int) -> list[tuple[int, int]]:
    """Split "A 2. B 3. C" (the content after "1.") at each next number in turn."""
    pieces = []
    for m in _INLINE_NUMBER.finditer(text, start, end):
        if int(m.group(1)) == number + 1:
            pieces.append((start, m.start()))
            start, number = m.end(), number + 1
    pieces.append((start, end))
    return pieces


def parse_items(text: str) -> list[ParsedItem]:
    """Items in order of appearance, ids unset (see the module docstring). Never raises on a str."""
    lines = list(_line_spans(text))
    numbered, bulleted = [], []
    for start, end in lines:
        number = _NUMBERED.match(text, start, end)
        bullet = None if number else _BULLET.match(text, start, end)
        if number:
            numbered += [(s, e, end) for s, e in _split_inline(text, number.end(), end, int(number.group(1)))]
        elif bullet:
            bulleted.append((bullet.end(), end, end))
    # Numbered lines win over bullets (a bullet under a numbered item is a note, not an item).
    pieces = numbered or bulleted or [(s, e, e) for s, e in lines]
    items = []
    for s, e, line_end in pieces:
        s, e = _trim(text, s, e)
        if e > s:
            items.append(ParsedItem(text[s:e], s, e, line_end))
    return items


def normalise(title: str, lenient: bool = False) -> str:
    """The key titles are compared by. Strict: Unicode-compatible (NFKC), single spaces, stripped, and an
    English article filed at the end ("Big Lebowski, The (1998)") moved to the front ("The Big Lebowski
    (1998)"). Lenient: also straight quotes and case-folded ("the big lebowski (1998)")."""
    title = unicodedata.normalize("NFKC", title)
    if lenient:
        title = title.translate(_QUOTE_MAP).casefold()
    title = _SPACES.sub(" ", title).strip()
    return _TRAILING_ARTICLE.sub(r"\2 \1\3", title)


def _unquoted(title: str) -> list[tuple[int, int]]:
    """(offset, length) of the text between the quote or emphasis mark that opens `title` and each
    closing mark after it, longest first (the quoted title may itself hold quotes)."""
    for left, right in _QUOTES:
        if title.startswith(left):
            spans = []
            close = title.rfind(right, len(left))
            while close > len(left):
                start, end = _trim(title, len(left), close)
                if end > start:
                    spans.append((start, end - start))
                close = title.rfind(right, len(left), close)
            return spans
    return []


def title_candidates(title: str) -> list[tuple[int, int]]:
    """Substrings of `title` that may name an item, as (offset, length), most specific first.

    The whole title; the text inside opening quotes ('"Heat" (1995) - great' -> 'Heat'); then prefixes
    that end before an annotation separator (" (", " [", " - ", " | "), just after a ")" or "]"
    ('Heat (1995): a thriller' -> 'Heat (1995)'), or before trailing '.,;', longest first. A catalogue
    title that itself holds quotes, " - " or a year matches as the whole title first. No cut at ": "
    alone: "Star Wars: Episode X" must not become "Star Wars".
    """
    cuts = {len(title.rstrip(_TRAILING))}
    cuts.update(m.start() for m in _SEPARATORS.finditer(title))
    cuts.update(m.start() for m in _GROUP_END.finditer(title))
    spans = [(0, len(title))] + _unquoted(title)
    spans += [(0, len(title[:c].rstrip(_TRAILING))) for c in sorted(cuts, reverse=True)]
    return [s for s in dict.fromkeys(spans) if s[1] > 0]


class Catalogue:
    """Title -> item id, with item ids the positions in `titles` (the dataset's unique titles), matched in
    `mode` "strict" or "lenient" (see the module docstring), optionally with a fuzzy fallback.

    Titles that collide after normalisation map to the lowest item id (exact raw matches still tell them
    apart); `collisions` counts them.
    """

    def __init__(self, titles: Sequence[str], mode: str = "strict", fuzzy: bool = False, max_distance: int = 3):
        if mode not in MATCH_MODES:
            raise ValueError(f"title match mode {mode!r} is not one of {', '.join(MATCH_MODES)}")
        if max_distance < 0:
            raise ValueError(f"Catalogue max_distance={max_distance} must be >= 0")
        self.titles = list(titles)
        self.mode = mode
        self.fuzzy = fuzzy
        self.max_distance = max_distance
        self._lenient = mode == "lenient"
        self._exact = {}
        self._normalised = {}
        for item, title in enumerate(self.titles):
            self._exact.setdefault(title, item)
            self._normalised.setdefault(normalise(title, self._lenient), item)
        self.collisions = len(self.titles) - len(self._normalised)
        # Fuzzy candidates sorted by length: a key within distance d differs in length by at most d.
        by_length = sorted(self._normalised.items(), key=lambda kv: len(kv[0]))
        self._keys = [key for key, _ in by_length]
        self._key_items = np.array([item for _, item in by_length], dtype=np.int64)
        self._key_lengths = np.array([len(key) for key in self._keys], dtype=np.int64)

    @property
    def rule(self) -> str:
        """How titles are matched, for labelling results: "strict", "lenient", "strict+fuzzy<=3", ..."""
        return self.mode + (f"+fuzzy<={self.max_distance}" if self.fuzzy else "")

    def __len__(self) -> int:
        return len(self.titles)

    def lookup(self, title: str) -> tuple[int, tuple[int, int]]:
        """(item id, (offset, length) of the part of `title` that named it); unknown: (-1, whole title)."""
        if title in self._exact:  # the SFT format: most titles match as they stand
            return self._exact[title], (0, len(title))
        candidates = title_candidates(title) if self._lenient else [(0, len(title))]
        for offset, length in candidates:
            text = title[offset:offset + length]
            item = self._exact.get(text)
            if item is None:
                item = self._normalised.get(normalise(text, self._lenient))
            if item is not None:
                return item, (offset, length)
        if self.fuzzy:
            for offset, length in candidates:
                item = self._nearest(normalise(title[offset:offset + length], self._lenient))
                if item != UNKNOWN:
                    return item, (offset, length)
        return UNKNOWN, (0, len(title))

    def _nearest(self, key: str) -> int:
        """The catalogue item nearest to `key` within max_distance, ties to the lowest item id; else -1."""
        # One query at a time: rapidfuzz's multi-query cdist was slower here, and most lookups stop early.
        lo = int(np.searchsorted(self._key_lengths, len(key) - self.max_distance, side="left"))
        hi = int(np.searchsorted(self._key_lengths, len(key) + self.max_distance, side="right"))
        distances = process.cdist([key], self._keys[lo:hi], scorer=Levenshtein.distance,
                                  score_cutoff=self.max_distance, dtype=np.int32)[0]
        nearest = distances.min(initial=self.max_distance + 1)  # beyond the cutoff reads max_distance + 1
        if nearest > self.max_distance:
            return UNKNOWN
        return int(self._key_items[lo:hi][distances == nearest].min())

    def match(self, items: Sequence[ParsedItem]) -> list[ParsedItem]:
        """Items with `item_id` set and the span narrowed to the matched title."""
        matched = []
        for it in items:
            item, (offset, length) = self.lookup(it.title)
            start = it.start + offset
            matched.append(ParsedItem(it.title[offset:offset + length], start, start + length, it.line_end, item))
        return matched

    def parse(self, text: str) -> list[ParsedItem]:
        """`parse_items` then `match`."""
        return self.match(parse_items(text))
