"""The exported EBNF grammar, checked with xgrammar (vLLM's structured-outputs backend) against the real
tokenizer: constrained answers are accepted token by token; a title outside the catalogue or another line
format is rejected."""

import dataclasses

import jax
import pytest

from reclm_jax.data.load import load_dataset
from reclm_jax.llm import model, sampling
from reclm_jax.llm.automaton import catalogue_automaton
from reclm_jax.llm.config import PRESETS
from reclm_jax.llm.grammar import catalogue_grammar
from reclm_jax.llm.tokenizer import load_tokenizer, stop_token_ids
from reclm_jax.tasks.config import TaskConfig
from reclm_jax.tasks.encode import display_titles
from reclm_jax.llm.chat import ChatPolicy

xgr = pytest.importorskip("xgrammar")


@pytest.fixture(scope="module")
def setup():
    ds = load_dataset("ml-100k")
    tok = load_tokenizer("smollm2-135m")
    titles = display_titles(ds.titles, ChatPolicy.of(tok), TaskConfig.max_title_tokens)
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok), stop_token_ids=stop_token_ids(tok))
    compiled = xgr.GrammarCompiler(info).compile_grammar(catalogue_grammar(titles, 10))
    return ds, tok, titles, compiled


def test_constrained_answers_are_accepted_token_by_token(setup):
    ds, tok, titles, compiled = setup
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=len(tok), max_position_embeddings=1024)
    params = model.init_params(jax.random.key(2), cfg, std=0.3)
    rows = catalogue_automaton(titles, tok).rows([10] * 4, [[0, 1, 2]] * 4)
    out = sampling.generate(params, cfg, [[5, 6, 7]] * 4, max_new_tokens=600, temperature=1.5,
                            rng=jax.random.key(0), eos_ids=stop_token_ids(tok), constraint=rows)
    for tokens, n in zip(out.tokens, out.lengths):
        matcher = xgr.GrammarMatcher(compiled)
        assert all(matcher.accept_token(int(t)) for t in tokens[:n])
        assert matcher.is_terminated()


def test_titles_outside_the_catalogue_and_other_formats_are_rejected(setup):
    _, _, titles, compiled = setup
    good = "\n".join(f"{i}. {titles[i * 7]}" for i in range(1, 11))
    assert xgr.GrammarMatcher(compiled).accept_string(good)
    assert "Star Trek: First Contact (1997)" not in titles and "Star Trek: First Contact (1996)" in titles
    bad_title = good.replace(titles[7], "Star Trek: First Contact (1997)")
    matcher = xgr.GrammarMatcher(compiled)
    assert not matcher.accept_string(bad_title)
    assert not xgr.GrammarMatcher(compiled).accept_string(good.replace("1. ", "1) ", 1))
    nine = xgr.GrammarMatcher(compiled)
    assert nine.accept_string(good.rsplit("\n", 1)[0]) and not nine.is_completed()  # 9 lines: not an answer yet
