"""Constrained decoding: a random-weight model (so it tries everything) under the catalogue automaton always
answers k distinct catalogue titles outside the history that satisfy the intent, for SmolLM2's byte-level BPE
and Llama-2's SentencePiece tokenizers; checked by parsing the decoded text with the strict (exact) matcher."""

import dataclasses

import jax
import numpy as np
import pytest

from reclm_jax.data.load import load_dataset
from reclm_jax.core.controls import quota
from reclm_jax.eval.parse import Catalogue, parse_items
from reclm_jax.llm import automaton
from reclm_jax.llm import model, sampling
from reclm_jax.llm.config import PRESETS
from reclm_jax.llm.tokenizer import load_tokenizer, stop_token_ids
from reclm_jax.tasks.templates import load_templates


@pytest.fixture(scope="module")
def ml100k():
    return load_dataset("ml-100k")


@pytest.fixture(scope="module", params=["smollm2-135m", "llama2"])
def tokenizer(request):
    return load_tokenizer(request.param)


def _random_intent(rng, cats, k):
    n = cats.shape[1]
    c1, c2 = (int(c) for c in rng.choice(n, 2, replace=False))
    kind = rng.choice(["none", "+c", "-c", "<=", ">=", "~", "+c&-c", "<=&-c"])
    m = float(rng.choice([0.0, 0.2, 0.3, 0.5, 1.0]))
    return {"none": automaton.Intent(), "+c": automaton.Intent(include=(c1,)), "-c": automaton.Intent(exclude=(c1,)),
            "<=": automaton.Intent(share=(c1, "<=", m)), ">=": automaton.Intent(share=(c1, ">=", m)),
            "~": automaton.Intent(share=(c1, "~", m)), "+c&-c": automaton.Intent(include=(c1,), exclude=(c2,)),
            "<=&-c": automaton.Intent(exclude=(c2,), share=(c1, "<=", 0.2))}[kind]


def _satisfies(intent, ids, cats, k):
    if any(not cats[i, c] for i in ids for c in intent.include):
        return False
    if any(cats[i, c] for i in ids for c in intent.exclude):
        return False
    if intent.share:
        c, kind, m = intent.share
        n_in, q = sum(bool(cats[i, c]) for i in ids), quota(k, m)
        return {"<=": n_in <= q, ">=": n_in >= q, "~": abs(n_in - q) <= 1}[kind]
    return True


def test_the_trained_answer_format_is_what_the_automaton_emits(ml100k, tokenizer):
    # The tokens of a whole rendered response (as SFT trains on them) are H_1 T(a) G_2 T(b) ... F.
    from reclm_jax.llm.chat import ChatPolicy
    from reclm_jax.tasks.encode import encode_samples
    from reclm_jax.tasks.samples import Sample

    auto = automaton.catalogue_automaton(ml100k.titles, tokenizer)
    items = [0, 49, 99, 180, 257, 312, 500, 1000, 1500, 1600, 1681]
    titles = [ml100k.titles[i] for i in items]
    sample = Sample("seqrec", (("user", "x"),), load_templates().response(titles))
    enc = encode_samples([sample], ChatPolicy.of(tokenizer), 4096, 4096)[0]
    response = enc["tokens"][enc["loss_mask"]].tolist()
    position = {int(item): p for p, item in enumerate(auto.items)}
    expected = list(auto.first_line)
    for n, item in enumerate(items):
        # The title's tokens: the trie path of its sorted position.
        path, node = [], 0
        while True:
            lo, hi = auto.edge_start[node], auto.edge_start[node + 1]
            child = [(t, c) for t, c in zip(auto.edge_token[lo:hi], auto.edge_child[lo:hi])
                     if auto.node_lo[c] <= position[item] < auto.node_hi[c]]
            (token, node), = child
            if token == automaton.END:
                break
            path.append(int(token))
        expected += path + (list(auto.join(n + 2)) if n + 1 < len(items) else [])
    assert response[:len(expected)] == expected
    assert response[-1] == auto.final[-1] and response[-1] in stop_token_ids(tokenizer)


@pytest.mark.slow
def test_random_model_answers_are_k_distinct_new_titles_that_follow_the_intent(ml100k, tokenizer):
    auto = automaton.catalogue_automaton(ml100k.titles, tokenizer)
    assert auto.dropped == {}
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=len(tokenizer), max_position_embeddings=4096)
    params = model.init_params(jax.random.key(0), cfg, std=0.3)
    cats = ml100k.category_matrix
    catalogue = Catalogue(ml100k.titles)  # the strict matcher
    rng = np.random.default_rng(0)
    checked = 0
    for batch in range(2):  # greedy, then sampled hot: 64 random cases per tokenizer
        b = 32
        ks = [int(rng.integers(1, 13)) for _ in range(b)]
        histories = [rng.choice(ml100k.num_items, int(rng.integers(0, 30)), replace=False).tolist() for _ in range(b)]
        intents = [_random_intent(rng, cats, k) for k in ks]
        rows = auto.rows(ks, histories, intents, cats)
        prompts = [rng.integers(3, 1000, int(rng.integers(2, 12))).tolist() for _ in range(b)]
        out = sampling.generate(params, cfg, prompts, max_new_tokens=12 * 50, temperature=0.0 if batch == 0 else 1.5,
                                rng=jax.random.key(batch), eos_ids=stop_token_ids(tokenizer), constraint=rows,
                                keep_allowed=True)
        for row in range(b):
            assert out.tokens[row, out.lengths[row] - 1] in stop_token_ids(tokenizer), "the answer must end"
            text = tokenizer.decode(out.tokens[row, :out.lengths[row]].tolist(), skip_special_tokens=True)
            parsed = parse_items(text)
            assert [p.title for p in parsed] == [line.split(". ", 1)[1] for line in text.strip().split("\n")] \
                if parsed else text.strip() == ""
            ids = [it.item_id for it in catalogue.match(parsed)]
            assert all(ml100k.titles[i] == p.title for i, p in zip(ids, parsed) if i >= 0)  # and exactly
            k = ks[row]
            reason = rows.shortfall(row)
            assert -1 not in ids, text
            assert len(set(ids)) == len(ids), text
            assert not set(ids) & set(histories[row]), text
            assert _satisfies(intents[row], ids, cats, k) or (reason and len(ids) < k), (intents[row], text)
            assert len(ids) == k if reason is None else len(ids) <= k, (k, reason, text)
            if row < 4:  # the host walk (what the vLLM processor runs) allows exactly what the device loop did
                walker = automaton.Walker(rows, row)
                for step, token in enumerate(out.tokens[row, :out.lengths[row]].tolist()):
                    kept = np.unpackbits(out.allowed[row, step], count=cfg.vocab_size)  # the masks PPO trains on
                    assert np.flatnonzero(kept).tolist() == sorted(walker.allowed()) and token in walker.allowed()
                    walker.advance(token)
                assert walker.count == len(ids)
            checked += 1
    assert checked == 64


def test_saved_automaton_loads_without_the_tokenizer(ml100k, tokenizer, tmp_path):
    auto = automaton.catalogue_automaton(ml100k.titles, tokenizer)
    automaton.save_automaton(auto, tmp_path / "a.npz", max_lines=12)
    back = automaton.load_automaton(tmp_path / "a.npz")
    assert back.pieces(12) == auto.pieces(12) and np.array_equal(back.edge_token, auto.edge_token)
    with pytest.raises(ValueError, match="at most 12 lines"):
        back.join(13)


def test_bad_catalogues_give_a_defined_result(tokenizer):
    titles = ["Heat", "Heat Wave", "Heat", "", "  ", "Two\nLines", "Alien"]
    auto = automaton.catalogue_automaton(titles, tokenizer)
    assert sorted(auto.dropped.get("duplicate title", [])) == [2]
    assert sorted(auto.dropped["empty title"]) == [3, 4] and auto.dropped["line break in the title"] == [5]
    assert sorted(auto.items.tolist()) == [0, 1, 6]
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=len(tokenizer))
    params = model.init_params(jax.random.key(1), cfg, std=0.3)
    # k larger than what is left: a shorter list, with the reason; a title that is a prefix of another works.
    rows = auto.rows([5, 2], [[6], [0, 1, 6]])
    assert "only 2" in rows.shortfall(0) and "only 0" in rows.shortfall(1)
    out = sampling.generate(params, cfg, [[5, 6], [7]], max_new_tokens=40, eos_ids=stop_token_ids(tokenizer),
                            constraint=rows)
    texts = [tokenizer.decode(t[:n].tolist(), skip_special_tokens=True).strip()
             for t, n in zip(out.tokens, out.lengths)]
    assert sorted(texts[0].split("\n")) == ["1. Heat", "2. Heat Wave"] or sorted(texts[0].split("\n")) == [
        "1. Heat Wave", "2. Heat"]
    assert texts[1] == ""
