"""`reclm-jax recommend`: structured intent options, constrained answers, the prompt budget and bad input."""

import json
from pathlib import Path

import pytest
from test_eval import run_cli, teacher_dir, tiny_dataset, tiny_model_dir  # noqa: F401  (fixtures)

from reclm_jax.core.errors import UserError
from reclm_jax.eval.recommend import IntentError, IntentSpec, fit_history, instruction, recognise
from reclm_jax.tasks.templates import load_templates

TPL = load_templates()
CATS = tiny_dataset().categories


@pytest.fixture
def tiny_data(monkeypatch):
    import reclm_jax.eval.cli as cli

    monkeypatch.setattr(cli, "dataset_from_args", lambda args: tiny_dataset())


def test_structured_options_render_the_papers_phrasings_and_drive_the_constraint():
    spec = IntentSpec.from_options(CATS, TPL, include=["drama"], exclude=["Horror"], share="Crime<=20%")
    text = spec.text(TPL)
    assert text == ("I like 'Drama' products. I don't like 'Horror' products. In the recommendation list, the "
                    "proportion of 'Crime' items should be less than or equal to 20%")
    intent = spec.constraint()
    assert intent.include == (CATS.index("Drama"),) and intent.exclude == (CATS.index("Horror"),)
    assert intent.share == (CATS.index("Crime"), "<=", 0.2) and intent.bounds(10) == (0, 2)
    p = instruction(TPL, ["Heat (1995)"], 7, text)
    assert "user's intention: I like 'Drama' products." in p and "with 7 different items" in p
    assert "proportion of" not in instruction(TPL, ["Heat (1995)"], 7, None)
    alone = IntentSpec.from_options(CATS, TPL, share="Drama~30%")
    assert alone.proportion_only and "Here are user's historical interactions" in instruction(
        TPL, [], 10, alone.text(TPL), True) and "If user's preference conflicts" not in instruction(
        TPL, [], 10, alone.text(TPL), True)


def test_free_text_in_the_templates_phrasings_is_recognised_and_other_text_is_not():
    spec = recognise("Please exclude any 'Horror' item. I'm interested in 'Drama'", TPL, CATS)
    assert spec.exclude == (CATS.index("Horror"),) and spec.include == (CATS.index("Drama"),)
    spec = recognise("In the recommendation list, the proportion of 'Action' items should be more than or equal "
                     "to 30%", TPL, CATS)
    assert spec.share == (CATS.index("Action"), ">=", 0.3)
    assert recognise("no comedies please", TPL, CATS) is None
    assert IntentSpec.from_options(CATS, TPL, intent="no comedies").free_text == "no comedies"


def test_bad_intent_options_name_the_option_and_close_categories():
    with pytest.raises(IntentError, match=r"--exclude: unknown category 'Horor'; close ones: Horror"):
        IntentSpec.from_options(CATS, TPL, exclude=["Horor"])
    with pytest.raises(IntentError, match=r"--share 'Drama 20': write CATEGORY"):
        IntentSpec.from_options(CATS, TPL, share="Drama 20")
    with pytest.raises(IntentError, match="both included and excluded"):
        IntentSpec.from_options(CATS, TPL, include=["Drama"], exclude=["Drama"])


def test_the_prompt_budget_drops_the_oldest_history_first_never_the_instruction():
    render = lambda items: [0] * (100 + 10 * len(items))  # noqa: E731
    assert fit_history(render, [1, 2, 3, 4], 125) == ([3, 4], [1, 2])
    with pytest.raises(IntentError, match="the instruction alone takes 100 tokens"):
        fit_history(render, [1, 2], 99)


def test_constrained_recommendation_of_a_random_model_is_valid_json(tiny_model_dir, tiny_data, capsys):
    code = run_cli(["recommend", "--model", str(tiny_model_dir), "--history", "Heat (1995)", "Fargo (1996)",
                    "--exclude", "Comedy", "-k", "4", "--max-new-tokens", "200", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["constrain"] == "intent"
    ds = tiny_dataset()
    titles = [it["title"] for it in out["items"]]
    assert len(titles) == 4 == len(set(titles)) and not {"Heat (1995)", "Fargo (1996)"} & set(titles)
    assert all("Comedy" not in it["categories"] and it["id"] == ds.item_names[ds.titles.index(it["title"])]
               for it in out["items"])


def test_recommend_reports_dropped_history_and_rejects_bad_sizes(tiny_model_dir, tiny_data, capsys):
    code = run_cli(["recommend", "--model", str(tiny_model_dir), "--history", "Heat (1995)", "Fargo (1996)",
                    "Alien (1979)", "-k", "2", "--max-new-tokens", "100", "--max-prompt-tokens", "320",
                    "--constrain", "catalogue"])
    out = capsys.readouterr().out
    assert code == 0 and "left out the 1 oldest history items: 'Heat (1995)'" in out
    for argv, message in ((["-k", "5000"], "-k 5000: the catalogue of tiny has 12 items"),
                          (["--max-new-tokens", "8000"], "exceeds the model's context of 1024 tokens"),
                          (["--intent", "x" * 30000], "the instruction alone takes"),
                          (["--share", "Dramma<=20%"], "unknown category 'Dramma'; close ones: Drama")):
        with pytest.raises(UserError, match=message):
            run_cli(["recommend", "--model", str(tiny_model_dir), "--history", "Heat (1995)", *argv])


@pytest.mark.slow
def test_evaluate_adds_constrained_rows_beside_the_unconstrained_ones(tiny_model_dir, teacher_dir, tiny_data,
                                                                        tmp_path, capsys):
    argv = ["evaluate", "--model", str(tiny_model_dir), "--teacher", str(teacher_dir), "--out", str(tmp_path),
            "--limit", "4", "--max-new-tokens", "200", "--batch-size", "64", "--constrain", "catalogue",
            "--constrain", "intent"]
    assert run_cli(argv) == 0
    tables = capsys.readouterr().out
    name = Path(tiny_model_dir).name
    for label in (f"{name} zero-shot", f"{name} zero-shot [catalogue-constrained]",
                  f"{name} zero-shot [intent-constrained]"):
        assert f"| {label} |" in tables
    for mode in ("catalogue", "intent"):
        metrics = json.loads((tmp_path / "runs" / f"{name}_zero-shot__{mode}-constrained" / "metrics.json")
                             .read_text())["metrics"]
        for task, m in metrics.items():
            assert all(m[k]["mean"] == m[k]["hi"] == 0 for k in ("NonExist@K", "RepeatItem@K", "InHistory@K")), \
                (mode, task)
    intent = json.loads((tmp_path / "runs" / f"{name}_zero-shot__intent-constrained" / "metrics.json")
                        .read_text())["metrics"]
    assert intent["-c"]["TCP@K"]["mean"] == 0 and intent["c1<=20%&-c2"]["TC2P@K"]["mean"] == 0
