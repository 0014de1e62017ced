"""An MLLM's free-text ranking answer -> a permutation of the given candidates, every fallback counted.

    ranking = rank_candidates("Sure! Here is the ranking: ['dax', 'zorvid'].", ["zorvid", "dax", "blicket"])
    ranking.order   # (1, 0, 2): the answer's order, then the unnamed candidates in the given order
    ranking.events  # ("completed",)

What counts as the answer's list (`parse_list`), first match wins:
  1. the first numbered or bulleted list over lines ("1. x", "2) y", "- z") when it ends before the first
     "[": it starts at the first such line and ends at the first non-blank line that is not a list line;
  2. the first bracketed list `[...]` anywhere in the text (a JSON list, a Python list, a JSON object
     holding a list, `[1. a, 2. b]`, "- [a, b]"); a list whose `]` is missing (an answer cut at
     max_tokens) runs to the end of the text ("unclosed");
  3. with candidates only: a single line without brackets whose comma-separated pieces are all candidates,
     e.g. the bare top-1 "zorvid" ("unbracketed"); it counts as a list of those names.
Items lose surrounding whitespace, quotes (' " ` and typographic ones), markdown asterisks, a leading
number ("1.", "2)", "(3)", "4:") or bullet ("-", "*", "•", "+") and trailing punctuation (. , ; : ! ?);
a leading number stays when the item with it is a candidate ("1. FC Köln"). An item quoted in the answer is
kept whole, commas and apostrophes included. Unquoted text between commas is split where that lets the
most comma-separated pieces match candidates whole (fewest items on a tie), so "Cessna 172, Skyhawk" stays
one name when it is a candidate; pieces that match nothing are items of their own.

Names match candidates exactly after `normalize_name`: typographic quotes made ASCII, case-folded, runs of
whitespace made one space, surrounding quotes, asterisks and trailing punctuation stripped. Empty items (a
trailing comma) are not names. The events, in the order they happened (`EVENTS`):
  empty         the answer is empty or whitespace: the whole retrieval order
  unparseable   no list in the answer (a refusal, prose): the whole retrieval order
  unbracketed   the list was a bare line without brackets (rule 3)
  unclosed      the bracketed list had no closing bracket
  unknown_name  a name that is not a candidate, dropped (one event per name)
  duplicate     a candidate named again, dropped (one event per repeat)
  completed     some candidates were not named; they follow in the given (retrieval) order
An answer that names every candidate once in a closed bracketed or line list has no events.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from collections.abc import Iterable, Sequence

EVENTS = ("empty", "unparseable", "unbracketed", "unclosed", "unknown_name", "duplicate", "completed")

_TYPOGRAPHIC = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
_QUOTES = "'\"`\u2018\u2019\u201c\u201d"
_SURROUNDING = _QUOTES + "*"
_TRAILING = ".,;:!?"
# Quote openers -> the characters that may close them (models mix typographic and ASCII quotes).
_CLOSERS = {"'": "'\u2019", '"': '"\u201d', "`": "`", "\u2018": "\u2019'", "\u201c": "\u201d\""}
_MARKER = r"(?:\(?\d{1,3}[.):]|[-*\u2022+])"
_LEADING_MARKER = re.compile(rf"^{_MARKER}\s+")
_LINE_ITEM = re.compile(rf"^\s*{_MARKER}\s+(\S.*)$")
# A numbering or bullet in front of a quoted item inside brackets: `[1. "a", 2. "b"]`.
_MARKER_BEFORE_QUOTE = re.compile(rf"{_MARKER}\s*(?=[{_QUOTES}])")
_CLOSE_AFTER_QUOTE = re.compile(r"\s*(?:,|\]|\Z)")
_ITEM_END = re.compile(r"[,\]]")


@dataclasses.dataclass(frozen=True)
class Ranking:
    """`order`: indices into the candidates, a permutation of range(len(candidates)); `events`: the
    fallbacks that produced it, names from `EVENTS`, in the order they happened."""

    order: tuple[int, ...]
    events: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Item:
    text: str
    quoted: bool


def normalize_name(name: str) -> str:
    """The form names are compared in: ASCII quotes, case-folded, whitespace collapsed, surrounding quotes,
    asterisks and trailing punctuation stripped."""
    name = " ".join(name.translate(_TYPOGRAPHIC).split()).casefold()
    previous = None
    while name != previous:
        previous = name
        name = name.strip().strip(_SURROUNDING).rstrip(_TRAILING)
    return name


def _clean(item: str, known: frozenset[str]) -> str:
    """An item without surrounding whitespace, quotes, asterisks, leading marker or trailing punctuation."""
    previous = None
    while item != previous:
        previous = item
        item = item.strip()
        if normalize_name(item) not in known:
            item = _LEADING_MARKER.sub("", item, count=1)
        item = item.strip(_SURROUNDING).rstrip(_TRAILING)
    return item


def _candidate_index(candidates: Sequence[str]) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, name in enumerate(candidates):
        key = normalize_name(name)
        if key in index:
            raise ValueError(f"candidates {index[key]} ({candidates[index[key]]!r}) and {i} ({name!r}) are the same "
                             "name after normalization; de-duplicate them first (answers.dedupe).")
        index[key] = i
    return index


def dedupe(names: Sequence[str]) -> list[str]:
    """`names` with every name after its first occurrence (compared by `normalize_name`) removed, order kept."""
    seen: set[str] = set()
    kept = []
    for name in names:
        key = normalize_name(name)
        if key not in seen:
            seen.add(key)
            kept.append(name)
    return kept


def _segment(pieces: Sequence[str], known: frozenset[str]) -> list[str]:
    """Comma-separated `pieces` regrouped (joined by ",") so that the most pieces lie in groups matching a
    known name, fewest groups on a tie; a group that matches nothing is a single piece."""
    longest = 1 + max((name.count(",") for name in known), default=0)
    # best[i]: (pieces covered by matching groups, -groups) over pieces[:i], and where the last group starts.
    best: list[tuple[int, int]] = [(0, 0)]
    start: list[int] = [0]
    for end in range(1, len(pieces) + 1):
        choice, choice_start = None, end - 1
        for begin in range(max(0, end - longest), end):
            matched = normalize_name(_clean(",".join(pieces[begin:end]), known)) in known
            if not matched and end - begin > 1:
                continue
            covered, groups = best[begin]
            score = (covered + (end - begin if matched else 0), groups - 1)
            if choice is None or score > choice:
                choice, choice_start = score, begin
        best.append(choice)
        start.append(choice_start)
    groups, end = [], len(pieces)
    while end > 0:
        groups.append(",".join(pieces[start[end]:end]))
        end = start[end]
    return groups[::-1]


def _quoted_end(text: str, start: int) -> int | None:
    """Index of the quote closing the one at `start`: the first closer followed by `,`, `]` or the end."""
    closers = _CLOSERS[text[start]]
    for end in range(start + 1, len(text)):
        if text[end] in closers and _CLOSE_AFTER_QUOTE.match(text, end + 1):
            return end
    return None


def _scan_brackets(text: str, start: int) -> tuple[list[_Item], int | None]:
    """Raw items of the bracketed list opening at text[start] == "[", and the index of its "]" (None: none)."""
    items: list[_Item] = []
    i = start + 1
    while True:
        begin = i  # unquoted items keep their whitespace, so that joining them back restores the text
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return items, None
        if text[i] == "]":
            return items, i
        marker = _MARKER_BEFORE_QUOTE.match(text, i)
        quote_at = marker.end() if marker else i
        end = _quoted_end(text, quote_at) if text[quote_at] in _CLOSERS else None
        if end is not None:
            items.append(_Item(text[quote_at + 1:end], quoted=True))
            i = _CLOSE_AFTER_QUOTE.match(text, end + 1).end()
            if text[i - 1:i] == "]":
                return items, i - 1
            continue
        stop = _ITEM_END.search(text, i)
        if stop is None:
            items.append(_Item(text[begin:], quoted=False))
            return items, None
        items.append(_Item(text[begin:stop.start()], quoted=False))
        if stop.group() == "]":
            return items, stop.start()
        i = stop.end()


def _literal_strings(text: str) -> list[str] | None:
    """The strings of `text` read as a JSON or Python list of strings (escapes resolved), else None."""
    for read in (json.loads, ast.literal_eval):
        try:
            value = read(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    return None


def _bracketed(text: str, start: int, known: frozenset[str]) -> tuple[list[str], tuple[str, ...]]:
    """Items of the bracketed list opening at text[start] and its events (("unclosed",) or ())."""
    raw, end = _scan_brackets(text, start)
    literal = None if end is None else _literal_strings(text[start:end + 1])
    if literal is not None:
        raw = [_Item(s, quoted=True) for s in literal]
    items: list[str] = []
    run: list[str] = []
    for item in [*raw, None]:
        if item is not None and not item.quoted:
            run.append(item.text)
            continue
        items.extend(_clean(group, known) for group in _segment(run, known))
        run = []
        if item is not None:
            items.append(_clean(item.text, known))
    return [item for item in items if item], () if end is not None else ("unclosed",)


def _lines(text: str, known: frozenset[str]) -> tuple[list[str], int] | None:
    """Items of the first numbered or bulleted list over lines and the offset where it ends; None without one."""
    items: list[str] = []
    offset = end = 0
    for line in text.splitlines(keepends=True):
        offset += len(line)
        match = _LINE_ITEM.match(line)
        if match:
            items.append(_clean(match.group(1), known))
            end = offset
        elif items and line.strip():
            break
    items = [item for item in items if item]
    return (items, end) if items else None


def _bare_line(text: str, known: frozenset[str]) -> list[str] | None:
    """The names of a single unbracketed line whose comma-separated pieces are all known; else None."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        return None
    items = [_clean(group, known) for group in _segment(lines[0].split(","), known)]
    items = [item for item in items if item]
    if items and all(normalize_name(item) in known for item in items):
        return items
    return None


def _parse(text: str, known: frozenset[str]) -> tuple[list[str], tuple[str, ...]] | None:
    """The answer's list and the format events; None when it has none."""
    bracket = text.find("[")
    lines = _lines(text, known)
    # A line list wins only when it ends before the first "[" ("- [a, b]" is a bracketed list).
    if lines is not None and (bracket < 0 or lines[1] <= bracket):
        return lines[0], ()
    if bracket >= 0:
        return _bracketed(text, bracket, known)
    items = _bare_line(text, known) if known else None
    return None if items is None else (items, ("unbracketed",))


def parse_list(text: str, candidates: Sequence[str] | None = None) -> list[str] | None:
    """The items of the answer's list (see the module docstring for what counts), cleaned but not
    case-folded; None when the answer holds no list. `candidates` guide the splitting of unquoted
    comma-separated names and enable the bare-line rule."""
    known = frozenset(_candidate_index(candidates)) if candidates is not None else frozenset()
    found = _parse(text, known)
    return None if found is None else found[0]


def rank_candidates(text: str, candidates: Sequence[str]) -> Ranking:
    """The answer's ranking of `candidates` (unique after `normalize_name`, else ValueError): the names it
    gives in its order, then the candidates it does not name in the given order; every fallback in `events`."""
    index = _candidate_index(candidates)
    retrieval_order = tuple(range(len(candidates)))
    if not text.strip():
        return Ranking(retrieval_order, ("empty",))
    found = _parse(text, frozenset(index))
    if found is None:
        return Ranking(retrieval_order, ("unparseable",))
    items, events = found[0], list(found[1])
    order: list[int] = []
    for item in items:
        position = index.get(normalize_name(item))
        if position is None:
            events.append("unknown_name")
        elif position in order:
            events.append("duplicate")
        else:
            order.append(position)
    if len(order) < len(candidates):
        events.append("completed")
        named = set(order)
        order.extend(i for i in retrieval_order if i not in named)
    return Ranking(tuple(order), tuple(events))


def count_events(rankings: Iterable[Ranking]) -> dict[str, int]:
    """{"answers": number of rankings, <event>: occurrences over all rankings} with every name of `EVENTS`."""
    counts = dict.fromkeys(EVENTS, 0)
    counts["answers"] = 0
    for ranking in rankings:
        counts["answers"] += 1
        for event in ranking.events:
            counts[event] += 1
    return counts


# -- short descriptions (GRAIN's annotation pipeline) -------------------------------------------------------

def normalize_text(text: str) -> str:
    """A description as queries are matched: lowercased, whitespace collapsed, a trailing full stop dropped."""
    return re.sub(r"\s+", " ", str(text)).strip().lower().rstrip(".").strip()


_LINE_SPLIT = re.compile(r"[\n;\u2022]+")
_MARKER_SPLIT = re.compile(r"(?:^|\s)\(?\d{1,2}[.)](?:\s+|$)|^\s*[-*]\s+")
_EDGES = " \t\"'`*_-:.,!?()[]{}"


def trim_description(text: str, cut: Sequence[str] = (), drop: Sequence[str] = ()) -> str:
    """`text` up to the first phrase of `cut` (whole words, case-insensitive), without the words of `drop`:
    a scene captioner's "a large striped red star above a small blue ring" with cut ("above", ...) and drop
    ("large", "small") reads "a striped red star"."""
    for phrase in cut:
        match = re.search(rf"\b{re.escape(phrase)}\b", text, flags=re.IGNORECASE)
        if match:
            text = text[:match.start()]
    dropped = {word.lower() for word in drop}
    return " ".join(word for word in text.split() if word.lower() not in dropped).strip()


def parse_descriptions(answer: str, max_descriptions: int = 10, max_words: int = 12, *, cut: Sequence[str] = (),
                       drop: Sequence[str] = ()) -> list[str]:
    """The short descriptions of an MLLM answer: split on newlines, semicolons, bullets and numbered-list markers
    ("1.", "2)"), edges stripped of quotes and punctuation, a lead-in ending in ":" dropped, each trimmed by
    `trim_description(cut, drop)`, duplicates (compared lowercased, whitespace collapsed) dropped, empties and
    those of more than `max_words` words dropped; at most `max_descriptions`, in order."""
    kept: list[str] = []
    seen: set[str] = set()
    parts = [piece for line in _LINE_SPLIT.split(answer or "") for piece in _MARKER_SPLIT.split(line)]
    for part in parts:
        part = part.strip()
        if not part or part.endswith(":"):
            continue
        text = re.sub(r"\s+", " ", part.strip(_EDGES)).strip()
        if cut or drop:
            text = trim_description(text, cut, drop).strip(_EDGES).strip()
        key = normalize_text(text)
        if not key or key in seen or len(text.split()) > max_words:
            continue
        seen.add(key)
        kept.append(text)
        if len(kept) >= max_descriptions:
            break
    return kept
