"""Free-text MLLM answers -> candidate rankings: the shapes real models answer in, every fallback counted."""

from __future__ import annotations

import pytest

from vlm_jax.mllm.answers import EVENTS, Ranking, count_events, dedupe, normalize_name, parse_list, rank_candidates

NAMES = ["zorvid", "blicket", "dax", "wug"]
AIRCRAFT = ["Boeing 747", "Cessna 172, Skyhawk", "Cessna 172", "Skyhawk"]
BIRDS = ["Bewick's wren", "Mc'Donnell", "house wren"]


def ranks(text, candidates):
    ranking = rank_candidates(text, candidates)
    return ranking.order, ranking.events


@pytest.mark.parametrize("text", [
    "['dax', 'wug', 'zorvid', 'blicket']",
    '["dax", "wug", "zorvid", "blicket"]',
    '```json\n["dax","wug","zorvid","blicket"]\n```',
    '{"ranking": ["dax", "wug", "zorvid", "blicket"]}',
    "Sure! Here is the ranking: ['dax', 'wug', 'zorvid', 'blicket']. Hope this helps!",
    "1. dax\n2. wug\n3. zorvid\n4. blicket",
    "Ranking:\n\n1) dax\n2) wug\n\n3) zorvid\n4) blicket\n\nThe first is most likely.",
    "- dax\n- wug\n* zorvid\n\u2022 blicket",
    "1. **dax**\n2. **wug**\n3. **zorvid**\n4. **blicket**",
    "[1. dax, 2. wug, 3. zorvid, 4. blicket]",
    "[1. 'dax', 2. 'wug', 3. 'zorvid', 4. 'blicket']",
    "[dax, wug, zorvid, blicket]",
    "[  DAX ,Wug,   ZORVID.  ,  Blicket ]",
    "[\u201cdax\u201d, \u2018wug\u2019, `zorvid`, 'blicket']",
    "- [dax, wug, zorvid, blicket]",
])
def test_every_answer_shape_naming_all_candidates_gives_their_order_and_no_events(text):
    assert ranks(text, NAMES) == ((2, 3, 0, 1), ())


def test_parse_list_strips_quotes_numbering_bullets_and_trailing_punctuation_but_keeps_case():
    assert parse_list("Answer: ['Dax', \"wug.\"]") == ["Dax", "wug"]
    assert parse_list("1. Dax;\n2) wug!\n(3) 'Zorvid'") == ["Dax", "wug", "Zorvid"]
    assert parse_list("- dax\n+ wug") == ["dax", "wug"]
    assert parse_list("[1. dax, 2. wug]") == ["dax", "wug"]


def test_parse_list_returns_none_without_a_list():
    assert parse_list("I'm sorry, I can't help with that.") is None
    assert parse_list("") is None
    # Without candidates a bare line is prose, not a list.
    assert parse_list("zorvid") is None
    assert parse_list("zorvid", NAMES) == ["zorvid"]


def test_quoted_names_keep_their_commas_and_apostrophes():
    text = "['Cessna 172, Skyhawk', 'Boeing 747']"
    assert parse_list(text) == ["Cessna 172, Skyhawk", "Boeing 747"]
    assert ranks(text, AIRCRAFT) == ((1, 0, 2, 3), ("completed",))
    text = "['Bewick's wren', \"Mc'Donnell\", 'house wren']"
    assert parse_list(text) == ["Bewick's wren", "Mc'Donnell", "house wren"]
    assert ranks(text, BIRDS) == ((0, 1, 2), ())


def test_python_and_json_escapes_are_resolved():
    assert ranks("['house wren', 'Bewick\\'s wren', 'Mc\\'Donnell']", BIRDS) == ((2, 0, 1), ())
    assert ranks('["Mc\'Donnell", "Bewick\\u2019s wren", "house wren"]', BIRDS) == ((1, 0, 2), ())


def test_typographic_apostrophes_match_ascii_ones():
    assert ranks("[\u2018Bewick\u2019s wren\u2019, \u201chouse wren\u201d, Mc\u2019Donnell]", BIRDS) == ((0, 2, 1), ())


def test_unquoted_names_with_commas_are_split_where_the_candidates_match_whole():
    # "Cessna 172, Skyhawk" is a candidate and its full text appears: matched whole, not as two names.
    text = "[Cessna 172, Skyhawk, Boeing 747, Cessna 172, Skyhawk]"
    assert parse_list(text, AIRCRAFT) == ["Cessna 172, Skyhawk", "Boeing 747", "Cessna 172, Skyhawk"]
    assert ranks(text, AIRCRAFT) == ((1, 0, 2, 3), ("duplicate", "completed"))
    # Without candidates every comma splits.
    assert parse_list(text) == ["Cessna 172", "Skyhawk", "Boeing 747", "Cessna 172", "Skyhawk"]
    # In another order the pieces are separate candidates.
    assert ranks("[Skyhawk, Boeing 747, Cessna 172]", AIRCRAFT) == ((3, 0, 2, 1), ("completed",))
    assert ranks("[1. Cessna 172, Skyhawk, 2. Skyhawk, 3. Boeing 747, 4. Cessna 172]", AIRCRAFT) == ((1, 3, 0, 2), ())


def test_unquoted_apostrophes_are_part_of_the_name():
    assert ranks("[Mc'Donnell, Bewick's wren, house wren]", BIRDS) == ((1, 0, 2), ())
    assert parse_list("[Mc'Donnell, Bewick's wren]") == ["Mc'Donnell", "Bewick's wren"]


def test_a_unmatched_piece_next_to_a_comma_name_is_an_unknown_name_of_its_own():
    assert ranks("[Cessna 172, Skyhawk, Airbus, Boeing 747]", ["Boeing 747", "Cessna 172, Skyhawk"]) == (
        (1, 0), ("unknown_name",))


def test_case_and_whitespace_do_not_matter():
    assert ranks("['  WUG', 'Zorvid  ', 'DAX', 'bLiCkEt']", NAMES) == ((3, 0, 2, 1), ())
    assert ranks("['house   WREN', 'bewick\\'s  wren', 'MC\\'DONNELL']", BIRDS) == ((2, 0, 1), ())


def test_duplicates_are_dropped_and_counted_once_per_repeat():
    assert ranks("['dax', 'dax', 'wug', 'DAX', 'zorvid', 'blicket']", NAMES) == (
        (2, 3, 0, 1), ("duplicate", "duplicate"))


def test_names_outside_the_candidates_are_dropped_one_event_each():
    assert ranks("['dax', 'cat', 'wug', 'dog', 'zorvid', 'blicket']", NAMES) == (
        (2, 3, 0, 1), ("unknown_name", "unknown_name"))


def test_no_prefix_or_plural_tolerance():
    assert ranks("['daxes', 'wu', 'zorvid', 'blicket']", NAMES) == (
        (0, 1, 2, 3), ("unknown_name", "unknown_name", "completed"))


def test_a_short_list_is_completed_in_retrieval_order():
    assert ranks("['wug', 'blicket']", NAMES) == ((3, 1, 0, 2), ("completed",))
    assert ranks("[]", NAMES) == ((0, 1, 2, 3), ("completed",))


def test_mixed_fallbacks_are_listed_in_the_order_they_happened():
    assert ranks("['wug', 'cat', 'wug', 'dax']", NAMES) == (
        (3, 2, 0, 1), ("unknown_name", "duplicate", "completed"))


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_an_empty_answer_keeps_the_retrieval_order(text):
    assert ranks(text, NAMES) == ((0, 1, 2, 3), ("empty",))


@pytest.mark.parametrize("text", [
    "I'm sorry, I can't help with that.",
    "The image shows a red star.",
    "I think it is a zorvid, but I am not sure.",
    "zorvid\nblicket",
])
def test_an_answer_without_a_list_keeps_the_retrieval_order(text):
    assert ranks(text, NAMES) == ((0, 1, 2, 3), ("unparseable",))


def test_a_bare_top1_name_is_a_one_item_list_then_completed():
    assert ranks("dax", NAMES) == ((2, 0, 1, 3), ("unbracketed", "completed"))
    assert ranks("  'Dax'.\n", NAMES) == ((2, 0, 1, 3), ("unbracketed", "completed"))
    assert ranks("wug, dax", NAMES) == ((3, 2, 0, 1), ("unbracketed", "completed"))
    assert ranks("Cessna 172, Skyhawk", AIRCRAFT) == ((1, 0, 2, 3), ("unbracketed", "completed"))


def test_of_two_lists_the_first_is_used():
    assert ranks("['wug', 'dax', 'zorvid', 'blicket'] or perhaps ['dax', 'wug', 'zorvid', 'blicket']", NAMES) == (
        (3, 2, 0, 1), ())
    assert ranks("1. wug\n2. dax\n3. zorvid\n4. blicket\n\nAs a list: ['dax', 'wug']", NAMES) == ((3, 2, 0, 1), ())
    assert ranks("Candidates given: [zorvid, blicket, dax, wug]\n1. wug\n2. dax", NAMES) == ((0, 1, 2, 3), ())


def test_a_list_cut_before_its_closing_bracket_is_used_and_counted():
    assert ranks("['wug', 'dax', 'zorvid', 'blicket'", NAMES) == ((3, 2, 0, 1), ("unclosed",))
    assert ranks("['wug', 'dax', 'zorv", NAMES) == ((3, 2, 0, 1), ("unclosed", "unknown_name", "completed"))


def test_a_trailing_comma_is_not_a_name():
    assert ranks("['wug', 'dax', 'zorvid', 'blicket',]", NAMES) == ((3, 2, 0, 1), ())


def test_a_leading_number_that_belongs_to_a_candidate_stays():
    teams = ["1. FC Köln", "FC Bayern"]
    assert ranks("['FC Bayern', '1. FC Köln']", teams) == ((1, 0), ())
    assert ranks("1. 1. FC Köln\n2. FC Bayern", teams) == ((0, 1), ())


def test_candidates_equal_after_normalization_are_rejected_and_dedupe_removes_them():
    with pytest.raises(ValueError, match="de-duplicate"):
        rank_candidates("['dax']", ["dax", "wug", "DAX "])
    assert dedupe(["dax", "wug", "DAX ", "'wug'", "zorvid", "dax"]) == ["dax", "wug", "zorvid"]
    assert normalize_name("  \u2018Bewick\u2019s   WREN\u2019. ") == "bewick's wren"


def test_count_events_lists_every_event_and_the_number_of_answers():
    answers = ("", "['dax', 'cat', 'dog']", "nope", "['dax','wug','zorvid','blicket']")
    rankings = [rank_candidates(text, NAMES) for text in answers]
    assert count_events(rankings) == {
        "empty": 1, "unparseable": 1, "unbracketed": 0, "unclosed": 0, "unknown_name": 2, "duplicate": 0,
        "completed": 1, "answers": 4,
    }
    assert count_events([]) == {**dict.fromkeys(EVENTS, 0), "answers": 0}


def test_every_ranking_is_a_permutation():
    for text in ("", "['dax', 'dax']", "dax", "[wug, cat", "1. blicket"):
        ranking = rank_candidates(text, NAMES)
        assert isinstance(ranking, Ranking)
        assert sorted(ranking.order) == [0, 1, 2, 3]
        assert set(ranking.events) <= set(EVENTS)
