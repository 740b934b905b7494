"""A dataset the project has never seen, given only as a directory: `data stats`, `teacher train` and the
whole pipeline on it, with the smallest real model (the tiny Llama-vocabulary GGUF)."""

import json

import pytest
from own_data import bookshop, write_bookshop
from test_pipeline import tiny_model_stages

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
        *tiny_model_stages(gguf),
    ]
    assert main(["pipeline", "--config", "configs/pipeline/demo.yaml", "--quiet", *overrides]) == 0
    err = capsys.readouterr().err
    assert f"dataset {shop.resolve()}: 48 users, 30 items" in err
    assert "[teacher] done already" in err  # the teacher trained above, by `teacher train`
    lay = Layout(out)
    assert all(lay.done(stage) for stage in ("sft", "ppo", "evaluate", "export"))
    tables = json.dumps(json.loads((lay.eval / "tables.json").read_text()))
    assert "SFT + PPO" in tables and "SASRec" in tables
