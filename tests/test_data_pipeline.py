"""A dataset the project has never seen, given only as a directory: `data stats`, `teacher train` and the
whole pipeline on it, with the smallest real model (the tiny Llama-vocabulary GGUF)."""

import json

import pytest
from own_data import bookshop, write_bookshop

from reclm_jax import assets
from reclm_jax.cli import main
from reclm_jax.pipeline import Layout


@pytest.mark.slow
@pytest.mark.network
def test_own_files_through_stats_teacher_and_pipeline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RECLM_JAX_CACHE", str(tmp_path / "cache"))
    gguf = str(assets.fetch("tiny-llama-vocab") / "tiny.gguf")
    shop = tmp_path / "my shop"
    write_bookshop(shop, "parquet")
    assert main(["data", "stats", "--dataset", str(shop), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["users"], stats["items"], stats["interactions"], stats["categories"]) == (48, 30, 336, 6)

    out = tmp_path / "run"
    teacher = ["model.max_len=10", "model.width=16", "train.max_epochs=2", "train.batch_size=64"]
    assert main(["teacher", "train", "--dataset", str(shop), "--out", str(Layout(out).teacher), "--quiet",
                 "--config", "configs/teacher/paper.yaml", *teacher]) == 0
    capsys.readouterr()
    assert main(["data", "preview", "--dataset", str(shop), "--teacher", str(Layout(out).teacher), "--task",
                 "control", "-n", "1"]) == 0
    titles = {t for _, t, _ in bookshop()[1]}
    assert "[control]" in (text := capsys.readouterr().out) and any(f"'{t}'" in text for t in titles)
    overrides = [
        f"out_dir={out}", f"data.name={shop}",
        f"sft.model.base={gguf}", f"sft.model.tokenizer={gguf}",
        "sft.tasks.min_k=3", "sft.tasks.max_k=3", "sft.tasks.max_length=384", "sft.tasks.buckets=[384]",
        "sft.train.global_batch=2", "sft.train.micro_batch=2", "sft.train.steps=2", "sft.valid.every=0",
        "sft.checkpoint.every=2",
        "ppo.rollout.prompts_per_step=2", "ppo.rollout.max_new_tokens=8", "ppo.ppo.minibatches=1",
        "ppo.ppo.epochs=1", "ppo.train.steps=1", "ppo.checkpoint.every=1",
        "eval.users=2", "eval.generation.max_new_tokens=8", "eval.generation.batch_size=4",
    ]
    assert main(["pipeline", "--config", "configs/pipeline/demo.yaml", "--quiet", *overrides]) == 0
    err = capsys.readouterr().err
    assert f"dataset {shop.resolve()}: 48 users, 30 items" in err
    assert "[teacher] done already" in err  # the teacher trained above, by `teacher train`
    lay = Layout(out)
    assert all(lay.done(stage) for stage in ("sft", "ppo", "evaluate", "export"))
    tables = json.dumps(json.loads((lay.eval / "tables.json").read_text()))
    assert "SFT + PPO" in tables and "SASRec" in tables
