"""Tokenizers: Llama-2 SentencePiece against llama.cpp's reference encodings, chat templates, save/reload."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from reclm_jax import assets
from reclm_jax.llm import tokenizer as tok_lib
from reclm_jax.llm.hf_io import FormatError

pytestmark = pytest.mark.network

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And Italy?"},
]


@pytest.fixture(scope="module")
def llama_vocab():
    return assets.fetch("llama-spm-vocab") / "ggml-vocab-llama-spm.gguf"


@pytest.fixture(scope="module")
def llama(llama_vocab):
    return tok_lib.tokenizer_from_gguf(llama_vocab)


@pytest.fixture(scope="module")
def smollm():
    return tok_lib.load_tokenizer("smollm2-135m")


def reference_cases(vocab_path):
    """llama.cpp's test-tokenizer-0 cases: texts split by a marker line, one line of ids per text."""
    texts = vocab_path.with_name(vocab_path.name + ".inp").read_text(encoding="utf-8")
    ids = vocab_path.with_name(vocab_path.name + ".out").read_text(encoding="utf-8")
    texts = texts.split("\n__ggml_vocab_test__\n")
    lines = ids.split("\n")[: len(texts)]
    return [(t, [int(i) for i in line.split()]) for t, line in zip(texts, lines, strict=True)]


def test_llama_spm_matches_llama_cpp_reference_encodings(llama, llama_vocab, tmp_path):
    cases = reference_cases(llama_vocab)
    assert len(cases) > 40
    # Leading spaces, runs of whitespace, digits, byte fallback for emoji and rare scripts are all covered.
    assert any(t.startswith(" ") for t, _ in cases) and any(243 in ids for _, ids in cases)
    llama.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text, ids in cases:
        assert llama.encode(text, add_special_tokens=False) == ids, repr(text)
        assert reloaded.encode(text, add_special_tokens=False) == ids, repr(text)
        assert llama.decode(ids) == text, repr(text)


def sentencepiece_processor(vocab_path):
    """Llama's SentencePiece model rebuilt from the GGUF's pieces (the reference segmenter)."""
    import gguf
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    fields = gguf.GGUFReader(vocab_path).fields
    model = pb.ModelProto()
    for piece, score, kind in zip(*(fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "scores",
                                                                                        "token_type"))):
        model.pieces.add(piece=piece, score=score, type=kind)
    model.trainer_spec.model_type = pb.TrainerSpec.BPE
    model.trainer_spec.byte_fallback = True
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = False
    return spm.SentencePieceProcessor(model_proto=model.SerializeToString())


def test_llama_spm_matches_sentencepiece_on_random_text(llama, llama_vocab):
    import random

    sp = sentencepiece_processor(llama_vocab)
    alphabet = [" ", "  ", "\n", "\t", "a", "the", "Hello", "ing", "0", "42", "é", "ß", "½", "🦙", "日本", "Ω",
                "'s", "!"]
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert llama.encode(text, add_special_tokens=False) == sp.encode(text), repr(text)
        assert llama.decode(sp.encode(text)) == text, repr(text)


def test_llama_spm_special_tokens_and_bos(llama):
    assert (llama.bos_token_id, llama.eos_token_id, llama.unk_token_id) == (1, 2, 0)
    assert llama.encode("Hello world") == [1, 15043, 3186]  # <s> ▁Hello ▁world
    assert tok_lib.stop_token_ids(llama) == [2]


def test_llama2_chat_template(llama, tmp_path):
    text = llama.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is the capital of France? [/INST] Paris. </s>"
                    "<s>[INST] And Italy? [/INST]")
    ids = llama.apply_chat_template(CONVERSATION, return_dict=False)
    # Meta's reference encodes each turn separately: [bos] + encode("[INST] ... [/INST] answer ") + [eos].
    first_turn = llama.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is the capital of France? [/INST] Paris. ",
                              add_special_tokens=False)
    second_turn = llama.encode("[INST] And Italy? [/INST]", add_special_tokens=False)
    assert ids == [1, *first_turn, 2, 1, *second_turn]
    assert ids[:4] == [1, 518, 25580, 29962]  # <s> ▁[ INST ]
    with pytest.raises(Exception, match="must alternate"):
        llama.apply_chat_template([{"role": "assistant", "content": "hi"}], tokenize=False)
    llama.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.apply_chat_template(CONVERSATION, return_dict=False) == ids
    assert reloaded.encode("Hello world") == [1, 15043, 3186]


def test_smollm2_chatml(smollm, tmp_path):
    text = smollm.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True)
    # SmolLM2-Instruct's template adds its default system prompt when none is given.
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert smollm.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert smollm.eos_token_id == 2 and tok_lib.stop_token_ids(smollm) == [2]
    ids = smollm.apply_chat_template(CONVERSATION, return_dict=False)
    assert ids.count(1) == 4 and ids.count(2) == 4  # one <|im_start|> ... <|im_end|> per message
    sample = "Hello world! Ünïcödé, 12345 and  two spaces."
    assert smollm.decode(smollm.encode(sample)) == sample
    assert smollm.convert_ids_to_tokens(smollm.encode("Hello world")) == ["Hello", "Ġworld"]
    smollm.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(CONVERSATION, return_dict=False) == ids


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FormatError, match="'nope' is not one of"):
        tok_lib.load_tokenizer("nope")
    with pytest.raises(FormatError, match="not one of"):
        tok_lib.load_tokenizer(tmp_path)
