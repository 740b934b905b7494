import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rapidfuzz.distance import Levenshtein

from reclm_jax.eval.parse import UNKNOWN, Catalogue, ParsedItem, normalise, parse_items, title_candidates

# Real ML-1M titles with the traps they hold: years in parentheses, quotes, " - ", "!", "?", digits.
TITLES = [
    "Toy Story (1995)",
    '"Great Performances" Cats (1998)',
    "Star Wars: Episode IV - A New Hope (1977)",
    "'Til There Was You (1997)",
    "Seven (Se7en) (1995)",
    "8 1/2 (1963)",
    "1-900 (1994)",
    "Airplane! (1980)",
    "Shall We Dance? (1937)",
    "City of Lost Children, The (1995)",
    "Heat (1995)",
    "Heat",
    "Oldboy",
    "Madonna - The Immaculate Collection",
]
CAT = Catalogue(TITLES)  # strict, the default
LENIENT = Catalogue(TITLES, "lenient")
ID = {t: i for i, t in enumerate(TITLES)}


def ids(text, catalogue=CAT):
    return [it.item_id for it in catalogue.parse(text)]


def check_spans(text, items):
    for it in items:
        assert 0 <= it.start < it.end <= it.line_end <= len(text)
        assert text[it.start:it.end] == it.title


def test_sft_format_round_trips_exactly():
    text = "".join(f"{i + 1}. {t}\n" for i, t in enumerate(TITLES))
    items = CAT.parse(text)
    assert [it.item_id for it in items] == list(range(len(TITLES)))
    assert [it.title for it in items] == TITLES
    check_spans(text, items)
    # the title of item 2 ends just before its line's newline
    line2 = text.index("\n") + 1
    assert items[1].start == line2 + 3 and items[1].end == items[1].line_end == text.index("\n", line2)


@pytest.mark.parametrize("marker", ["1.", "1)", "1 -", "1 –", "(1)", "1]", "-", "*", "•", "1.  "])
def test_numbering_and_bullet_variants(marker):
    text = f"{marker} Oldboy\n{marker.replace('1', '2')} Heat (1995)"
    assert ids(text) == [ID["Oldboy"], ID["Heat (1995)"]]


def test_text_before_and_after_the_list_blank_lines_crlf_and_no_final_newline():
    text = "Sure! Here are 3 movies you may like:\r\n\r\n1. Oldboy\r\n\r\n2. Heat\r\n3. Toy Story (1995)\r\nEnjoy!"
    items = CAT.parse(text)
    assert [it.item_id for it in items] == [ID["Oldboy"], ID["Heat"], ID["Toy Story (1995)"]]
    check_spans(text, items)
    assert text[items[2].end:items[2].line_end] == "\r" and text[items[2].line_end:] == "\nEnjoy!"


def test_strict_matching_counts_only_whole_catalogue_titles():
    """Invented suffixes and annotations are unknown titles; spans stay whole (the PPO reward sits at the end)."""
    cat = Catalogue(["Heat", "Star Wars", "Toy Story (1995)", "Big Lebowski, The (1998)"])
    text = ("1. Heat (3)\n2. Star Wars - The Clone Wars\n3. heat\n4. \"Heat\"\n5. Heat.\n"
            "6. Toy  Story\u00a0(1995)\n7. The Big Lebowski (1998)\n8. Toy Story (1995) - a classic\n")
    items = cat.parse(text)
    assert [it.item_id for it in items] == [UNKNOWN] * 5 + [2, 3, UNKNOWN]
    assert [it.title for it in items][:2] == ["Heat (3)", "Star Wars - The Clone Wars"]
    check_spans(text, items)
    lenient = Catalogue(cat.titles, "lenient")  # today's forgiving rule scores the invented ones as real
    assert [it.item_id for it in lenient.parse(text)] == [0, 1, 0, 0, 0, 2, 3, 2]
    assert cat.rule == "strict" and lenient.rule == "lenient"
    assert Catalogue(cat.titles, fuzzy=True).rule == "strict+fuzzy<=3"


def test_quotes_and_trailing_annotations_narrow_the_span_when_lenient():
    text = ('1. "Heat" (1995) - a great film\n'
            "2. Toy Story (1995) - a classic\n"
            "3. **Oldboy** - dark\n"
            "4. “Heat”\n"
            "5. Heat.\n"
            "6. Star Wars: Episode IV - A New Hope (1977) [sci-fi]\n"
            "7. Madonna - The Immaculate Collection\n"
            "8. Heat (1995): a heist thriller\n"
            "9. Star Wars: Episode X\n")
    items = LENIENT.parse(text)
    assert [it.title for it in items] == ["Heat", "Toy Story (1995)", "Oldboy", "Heat", "Heat",
                                          "Star Wars: Episode IV - A New Hope (1977)",
                                          "Madonna - The Immaculate Collection", "Heat (1995)",
                                          "Star Wars: Episode X"]
    assert [it.item_id for it in items] == [ID["Heat"], ID["Toy Story (1995)"], ID["Oldboy"], ID["Heat"],
                                            ID["Heat"], 2, ID["Madonna - The Immaculate Collection"],
                                            ID["Heat (1995)"], UNKNOWN]
    check_spans(text, items)
    strict = CAT.parse(text)
    assert [it.item_id for it in strict] == [UNKNOWN] * 6 + [ID["Madonna - The Immaculate Collection"], UNKNOWN,
                                                             UNKNOWN]
    assert [it.end for it in strict] == [it.line_end for it in strict]  # unknown: the whole line
    assert items[0].start == text.index('"Heat"') + 1  # inside the quotes


def test_titles_that_look_like_markers_or_annotations_stay_whole():
    text = "1. 1-900 (1994)\n2. 8 1/2 (1963)\n3. 'Til There Was You (1997)\n4. Seven (Se7en) (1995)"
    assert ids(text) == [ID["1-900 (1994)"], ID["8 1/2 (1963)"], ID["'Til There Was You (1997)"],
                         ID["Seven (Se7en) (1995)"]]


def test_numbered_lines_win_over_bullets_and_plain_lines():
    text = "Here:\n1. Oldboy\n   - a dark revenge film\n2. Heat"
    assert ids(text) == [ID["Oldboy"], ID["Heat"]]


def test_one_line_list_is_split_at_consecutive_numbers():
    text = "1. Oldboy 2. Heat (1995) 3. 8 1/2 (1963)"
    items = CAT.parse(text)
    assert [it.item_id for it in items] == [ID["Oldboy"], ID["Heat (1995)"], ID["8 1/2 (1963)"]]
    assert all(it.line_end == len(text) for it in items)
    check_spans(text, items)


def test_plain_lines_without_markers_are_items():
    assert ids("Oldboy\n\nHeat (1995)\n") == [ID["Oldboy"], ID["Heat (1995)"]]


def test_unknown_titles_stay_in_place_marked():
    text = "1. Oldboy\n2. The Room (2003) - so bad\n3. Heat"
    items = CAT.parse(text)
    assert [it.item_id for it in items] == [ID["Oldboy"], UNKNOWN, ID["Heat"]]
    assert items[1].title == "The Room (2003) - so bad"  # the whole text: nothing narrowed it


@pytest.mark.parametrize("text", ["", "\n\n  \n", "1.\n2. \n", "I cannot help with that."])
def test_empty_or_unparseable_outputs(text):
    items = CAT.parse(text)
    check_spans(text, items)
    assert all(it.item_id == UNKNOWN for it in items)


def test_lenient_match_is_case_space_and_quote_insensitive_strict_only_space():
    text = "1. toy  story (1995)\n2. ‘TIL THERE WAS YOU (1997)\n3. Toy  Story\t(1995) "
    assert ids(text, LENIENT) == [ID["Toy Story (1995)"], ID["'Til There Was You (1997)"], ID["Toy Story (1995)"]]
    assert ids(text) == [UNKNOWN, UNKNOWN, ID["Toy Story (1995)"]]


def test_fuzzy_match_nearest_wins_within_distance_3():
    fuzzy = Catalogue(TITLES, fuzzy=True)
    assert ids("1. Oldbo\n2. Toy Stroy (1995)\n3. Shall We Dance (1937)", fuzzy) == [
        ID["Oldboy"], ID["Toy Story (1995)"], ID["Shall We Dance? (1937)"]]
    assert ids("1. Completely Different Film", fuzzy) == [UNKNOWN]
    assert ids("1. Oldbo") == [UNKNOWN]  # fuzzy is off by default


def test_fuzzy_ties_go_to_the_lowest_item_id():
    cat = Catalogue(["Abcd", "Abce", "Abcf"], fuzzy=True)
    assert cat.lookup("Abcx") == (0, (0, 4))
    cat = Catalogue(["Abce", "Abcd"], fuzzy=True, max_distance=1)
    assert cat.lookup("Abcx")[0] == 0
    assert cat.lookup("Axyz")[0] == UNKNOWN  # distance 3 > 1


def test_normalised_collisions_go_to_the_lowest_id_but_exact_titles_stay_distinct():
    cat = Catalogue(["Heat", "HEAT", "heat  "], "lenient")
    assert cat.collisions == 2
    assert [cat.lookup(t)[0] for t in ["Heat", "HEAT", "hEaT"]] == [0, 1, 0]
    strict = Catalogue(["Heat", "HEAT", "heat  "])
    assert strict.collisions == 0
    assert [strict.lookup(t)[0] for t in ["Heat", "HEAT", "heat", "hEaT"]] == [0, 1, 2, UNKNOWN]


def test_title_candidates_order():
    title = '"Heat" (1995) - great'
    assert [title[o:o + n] for o, n in title_candidates(title)] == [title, "Heat", '"Heat" (1995)', '"Heat"']
    title = "Seven (Se7en) (1995), a classic."
    assert [title[o:o + n] for o, n in title_candidates(title)] == [
        title, "Seven (Se7en) (1995), a classic", "Seven (Se7en) (1995)", "Seven (Se7en)", "Seven"]


def test_bad_catalogue_option():
    with pytest.raises(ValueError, match="max_distance"):
        Catalogue(TITLES, max_distance=-1)
    with pytest.raises(ValueError, match="'loose' is not one of strict, lenient"):
        Catalogue(TITLES, "loose")


# Arbitrary text, text made of the characters the parser cares about, and pieces of real list output.
LISTY = st.text(alphabet=st.sampled_from(list("0123456789.)(]-–—*•\"'“”« »_\n\r\t ab:|[,;١\u2028\x85\x0c")))
PIECES = st.lists(st.sampled_from(TITLES + ["1. ", "\n", " - ", '"', "(1995)", "2) ", "**", "\r\n"])).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), LISTY, PIECES))
def test_parser_never_raises_and_spans_are_exact(text):
    items = parse_items(text)
    check_spans(text, items)
    check_spans(text, Catalogue(TITLES, fuzzy=True).match(items))
    check_spans(text, Catalogue(TITLES, "lenient", fuzzy=True).match(items))
    assert all(isinstance(it, ParsedItem) and it.title == it.title.strip() for it in items)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(TITLES), min_size=1, max_size=12),
       st.sampled_from(["{n}. {t}", "{n}) {t}", "- {t}", '{n}. "{t}" - fine', "{n}. {t} (so good)"]),
       st.sampled_from(["\n", "\r\n", "\n\n"]), st.booleans())
def test_rendered_lists_parse_back(titles, fmt, newline, final_newline):
    text = newline.join(fmt.format(n=i + 1, t=t) for i, t in enumerate(titles)) + (newline if final_newline else "")
    items = LENIENT.parse(text)
    check_spans(text, items)
    assert [it.item_id for it in items] == [ID[t] for t in titles]
    strict = CAT.parse(text)
    check_spans(text, strict)
    annotated = "fine" in fmt or "good" in fmt
    assert [it.item_id for it in strict] == [UNKNOWN if annotated else ID[t] for t in titles]


def test_normalise():
    assert normalise("  Toy\u00a0STORY  “x”  ", lenient=True) == 'toy story "x"'
    assert normalise("  Toy\u00a0STORY  “x”  ") == "Toy STORY “x”"
    assert normalise("ﬁlm\tnoir") == "film noir"  # NFKC: the ligature is the same text
    assert normalise("Big Lebowski, The (1998)") == normalise("The Big Lebowski (1998)") == "The Big Lebowski (1998)"
    assert normalise("Big Lebowski, The (1998)", lenient=True) == "the big lebowski (1998)"
    assert normalise("Man Who Knew Too Much, The (1934) (2)") == "The Man Who Knew Too Much (1934) (2)"
    assert normalise("American in Paris, An") == "An American in Paris"
    assert normalise("Pirates of the Caribbean, Part 2") == "Pirates of the Caribbean, Part 2"


def test_article_first_titles_match_catalogue_titles_filed_with_the_article_last():
    cat = Catalogue(["Big Lebowski, The (1998)", "Toy Story (1995)"])
    assert [it.item_id for it in cat.parse("1. The Big Lebowski (1998)\n2. Toy Story (1995)")] == [0, 1]
    assert cat.lookup("the big lebowski (1998)")[0] == UNKNOWN  # strict: case counts
    assert Catalogue(cat.titles, "lenient").lookup("the big lebowski (1998)")[0] == 0


def test_lenient_makes_no_cut_at_a_bare_colon():
    cat = Catalogue(["Star Wars", "Heat (1995)"], "lenient")
    assert cat.lookup("Star Wars: Episode X")[0] == UNKNOWN
    assert cat.lookup("Heat (1995): a heist thriller") == (1, (0, 11))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text("abc", min_size=1, max_size=8), min_size=1, max_size=30, unique=True),
       st.text("abc", min_size=1, max_size=10))
def test_fuzzy_lookup_equals_brute_force_nearest(titles, query):
    best = min((Levenshtein.distance(query, t), i) for i, t in enumerate(titles))
    expected = best[1] if best[0] <= 3 else UNKNOWN
    assert Catalogue(titles, fuzzy=True).lookup(query)[0] == expected
