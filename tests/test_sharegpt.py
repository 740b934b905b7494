"""I4: reading ShareGPT/Vicuna files (malformed records are named) and turning conversations into samples."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reclm_jax.tasks.sharegpt import ShareGPTError, read_sharegpt, sharegpt_samples


def turn(who, text):
    return {"from": who, "value": text}


GOOD = [
    {"id": "a", "conversations": [turn("human", "hi"), turn("gpt", "hello"), turn("human", "2+2?"), turn("gpt", "4")]},
    {"id": "b", "conversations": [turn("gpt", "nobody asked")]},  # no human turn answered: skipped, counted
    {"id": "c", "conversations": [turn("system", "be brief"), turn("human", "name?"), turn("gpt", "Bob")]},
]


def write(tmp_path, records, name="sg.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def test_reads_conversations_and_counts_unusable_records(tmp_path):
    conv = read_sharegpt(write(tmp_path, GOOD), cache_dir=tmp_path / "cache")
    assert conv.skipped == 1 and len(conv.turns) == 2
    assert conv.turns[1] == (("system", "be brief"), ("user", "name?"), ("assistant", "Bob"))


def test_json_lines_are_read_too(tmp_path):
    path = tmp_path / "sg.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in GOOD))
    assert len(read_sharegpt(path, cache_dir=tmp_path / "cache").turns) == 2


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"id": "x1", "conversations": [turn("robot", "beep")]}, r"record 3 \(id 'x1'\): turn 0 has 'from' = 'robot'"),
        ({"id": "x2", "conversations": [turn("human", 3)]}, r"record 3 \(id 'x2'\): turn 0 has no text 'value'"),
        ({"id": "x3", "turns": []}, r"record 3 \(id 'x3'\): 'conversations' must be a list"),
        ({"id": "x4", "conversations": "hi"}, r"record 3 \(id 'x4'\): 'conversations' must be a list"),
    ],
)
def test_malformed_records_are_rejected_by_name(tmp_path, bad, message):
    path = write(tmp_path, GOOD + [bad])
    with pytest.raises(ShareGPTError, match=message):
        read_sharegpt(path, cache_dir=tmp_path / "cache")


def test_missing_or_empty_files_are_rejected(tmp_path):
    with pytest.raises(ShareGPTError, match="does not exist"):
        read_sharegpt(tmp_path / "none.json")
    with pytest.raises(ShareGPTError, match="no record has a human turn"):
        read_sharegpt(write(tmp_path, [GOOD[1]]), cache_dir=tmp_path / "cache")


def test_samples_cut_at_a_human_turn_with_the_reply_as_response(tmp_path):
    conv = read_sharegpt(write(tmp_path, GOOD), cache_dir=tmp_path / "cache")
    samples = sharegpt_samples(conv, 200, np.random.default_rng(0))
    assert len(samples) == 200
    seen = set()
    for s in samples:
        assert s.task == "sharegpt" and s.messages[-1][0] == "user"
        whole = next(t for t in conv.turns if t[: len(s.messages)] == s.messages)
        assert whole[len(s.messages)] == ("assistant", s.response)
        seen.add(s.response)
    assert seen == {"hello", "4", "Bob"}  # every cut point is used over 200 draws
    assert samples == sharegpt_samples(conv, 200, np.random.default_rng(0))
    assert sharegpt_samples(conv, 0, np.random.default_rng(0)) == []
