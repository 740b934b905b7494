"""Small real objects for the instruction-data tests: a random dataset, an untrained SASRec teacher and a
byte-level BPE tokenizer with a ChatML chat template, all built in-process in well under a second."""

from __future__ import annotations

import numpy as np

from reclm_jax.data.schema import Dataset

CATEGORIES = ("Action", "Comedy", "Drama", "Horror", "Sci-Fi")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The Llama-2 chat format (user turns only; what the tests need): <s>[INST] user [/INST] answer </s>
LLAMA2 = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<s>[INST] ' + message['content'].strip()"
    " + ' [/INST]' }}{% else %}{{ ' ' + message['content'].strip() + ' </s>' }}{% endif %}{% endfor %}"
)


def tiny_dataset(num_users: int = 40, num_items: int = 60, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    item_categories = []
    for i in range(num_items):
        k = 1 + (i % 3 == 0)
        item_categories.append(tuple(sorted(rng.choice(CATEGORIES, size=k, replace=False))))
    sequences = [rng.permutation(num_items)[: rng.integers(5, 25)].astype(np.int32) for _ in range(num_users)]
    return Dataset(
        name="tiny",
        titles=[f"Movie {i} ({1950 + i})" for i in range(num_items)],
        item_categories=item_categories,
        sequences=sequences,
        user_names=[f"u{u}" for u in range(num_users)],
        item_names=[f"i{i}" for i in range(num_items)],
    )


def tiny_teacher(dataset: Dataset):
    """An untrained (randomly initialised) SASRec: its rankings are arbitrary but real and deterministic,
    which is all the label-construction invariants need."""
    from flax import nnx

    from reclm_jax.teacher.config import EvalConfig, ModelConfig, TeacherConfig
    from reclm_jax.teacher.query import Teacher, build_model

    cfg = TeacherConfig(model=ModelConfig(max_len=10, width=16, ffn_dim=16), eval=EvalConfig(batch_size=64))
    _, state = nnx.split(build_model(cfg, dataset.num_items))
    return Teacher(cfg, dataset.num_items, nnx.to_pure_dict(state))


def tiny_tokenizer(corpus: list[str], chat_template: str = CHATML, eos: str = "<|im_end|>"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<|endoftext|>",
                                   chat_template=chat_template)
