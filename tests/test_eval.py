"""Evaluation: scoring answers by hand, the tables, the generation loop on a tiny random model, the
recommend command's marking, and training-curve plots."""

import json
import math

import jax
import numpy as np
import pytest

from reclm_jax.data.schema import Dataset
from reclm_jax.eval import evaluate as E
from reclm_jax.eval import tables as T
from reclm_jax import cli as command
from reclm_jax.eval.cli import history_items, recommendation_lines
from reclm_jax.core.controls import Control
from reclm_jax.core.errors import UserError
from reclm_jax.eval.parse import Catalogue
from reclm_jax.eval.plots import LogError, panels, plot_log, plot_logs, read_log
from reclm_jax.tasks.config import TaskConfig
from reclm_jax.tasks.evaluation import EvalSet, build_eval_set
from reclm_jax.tasks.samples import SEQ, Sample, TaskContext

# ---- a tiny catalogue --------------------------------------------------------------------------------
TITLES = ["Toy Story (1995)", "Heat (1995)", "Babe (1995)", "Casino (1995)", "Fargo (1996)", "Scream (1996)",
          "Twister (1996)", "Evita (1996)", "Contact (1997)", "Titanic (1997)", "Alien (1979)", "Jaws (1975)"]
GENRES = [("Animation", "Comedy"), ("Action", "Crime"), ("Comedy", "Drama"), ("Crime", "Drama"), ("Crime", "Drama"),
          ("Horror",), ("Action",), ("Drama",), ("Drama",), ("Drama",), ("Action", "Horror"), ("Action", "Horror")]

TABLE = {t.key: t for t in T.TABLES}


def tiny_dataset() -> Dataset:
    rng = np.random.default_rng(0)
    sequences = [rng.permutation(len(TITLES))[: 5 + u % 4].astype(np.int32) for u in range(6)]
    return Dataset("tiny", list(TITLES), list(GENRES), sequences, [f"u{u}" for u in range(6)],
                   [f"i{i}" for i in range(len(TITLES))])


def cat(ds, name):
    return ds.category_index[name]


def answer(*titles):
    return "\n".join(f"{n}. {t}" for n, t in enumerate(titles, 1))


def means(task_metrics):
    return {name: e["mean"] for name, e in task_metrics.items()}


# ---- scoring by hand ---------------------------------------------------------------------------------
def hand_set(ds):
    """Two users; SeqRec k=3 for both, +C 'Drama' for user 0, '<= 20%' 'Action' for user 1."""
    drama, action, crime = cat(ds, "Drama"), cat(ds, "Action"), cat(ds, "Crime")
    seq = [Sample("seqrec", (("user", "p"),), user=0, history=(0, 1), target=2, k=3, controls=((SEQ, -1),)),
           Sample("seqrec", (("user", "p"),), user=1, history=(5,), target=6, k=3, controls=((SEQ, -1),))]
    plus = [Sample("+c", (("user", "p"),), user=0, history=(0, 1), target=2, k=3, controls=((Control("+c"), drama),))]
    prop = [Sample("<=20%", (("user", "p"),), user=1, history=(5,), target=6, k=5,
                   controls=((Control("<=", 0.2), action),))]
    combo = [Sample("c1<=20%&-c2", (("user", "p"),), user=1, history=(5,), target=6, k=5,
                    controls=((Control("<=", 0.2), action), (Control("-c"), crime)))]
    return EvalSet("test", {"seqrec": seq, "+c": plus, "<=20%": prop, "c1<=20%&-c2": combo}, {})


def test_score_answers_by_hand():
    ds = tiny_dataset()
    es = hand_set(ds)
    answers = {
        # user 0: target Babe at position 1, then an unknown title; user 1: empty answer
        "seqrec": [answer("Casino (1995)", "Babe (1995)", "Nope (2020)"), ""],
        # Drama: Evita, Babe in C; Heat (history) not; 3 slots -> TCP 66.67
        "+c": [answer("Evita (1996)", "Heat (1995)", "Babe (1995)")],
        # Action: Twister, Jaws -> 2 of 5 > 1 -> CPA 0; Crime: Fargo -> TC2P 20
        "<=20%": [answer("Twister (1996)", "Jaws (1975)", "Fargo (1996)")],
        "c1<=20%&-c2": ["I cannot help with that."],  # one line, no list marker: one unknown item
    }
    m = E.score_answers(es, answers, ds.category_matrix, Catalogue(ds.titles))
    assert {e["n"] for e in m["seqrec"].values()} == {2} and {e["n"] for e in m["+c"].values()} == {1}
    # HR of users (1, 0): resample means 0, 1/2, 1 with chances 1/4, 1/2, 1/4, so the 2.5 % and 97.5 %
    # quantiles of 1000 resamples are 0 and 1
    assert (m["seqrec"]["HR@K"]["lo"], m["seqrec"]["HR@K"]["hi"]) == (0.0, 1.0)
    assert m["+c"]["TCP@K"]["lo"] == m["+c"]["TCP@K"]["hi"] == pytest.approx(200 / 3)  # one user: no spread
    m = {task: means(metrics) for task, metrics in m.items()}
    s = m["seqrec"]
    assert s["HR@K"] == 0.5 and s["NDCG@K"] == pytest.approx(0.5 / math.log2(3))
    assert s["HR@5"] == 0.5 and s["NDCG@5"] == pytest.approx(0.5 / math.log2(3))
    assert s["CorrectCount"] == 50.0 and s["NonExist@K"] == pytest.approx(100 / 3 / 2)
    assert s["Unparsed"] == 50.0  # the empty answer counts, as a failure
    assert "TCP@K" not in s
    p = m["+c"]
    assert p["TCP@K"] == pytest.approx(200 / 3) and p["HR@K"] == 1.0 and p["InHistory@K"] == pytest.approx(100 / 3)
    # without the control text: user 0's SeqRec answer Casino, Babe, unknown -> 2 of 3 are Drama
    assert p["TCP@K/no_control"] == pytest.approx(200 / 3)
    q = m["<=20%"]
    assert q["CPA"] == 0.0 and q["TCP@K"] == 40.0
    assert q["CPA/no_control"] == 0.0  # user 1's SeqRec answer was empty: no item, so the control fails
    c = m["c1<=20%&-c2"]
    assert c["C1PA"] == 0.0 and c["TC2P@K"] == 0.0 and c["NonExist@K"] == 20.0 and c["Unparsed"] == 0.0
    assert c["C1PA/no_control"] == 0.0 and c["TC2P@K/no_control"] == 0.0


def test_combined_plus_minus_metric_by_hand():
    ds = tiny_dataset()
    drama, crime = cat(ds, "Drama"), cat(ds, "Crime")
    s = Sample("+c1&-c2", (("user", "p"),), user=0, history=(), target=9, k=4,
               controls=((Control("+c"), drama), (Control("-c"), crime)))
    # Evita, Titanic: Drama not Crime; Casino: Drama and Crime; Heat: Crime only -> 2 of 4
    ids = E.parse_answers([answer("Evita (1996)", "Casino (1995)", "Titanic (1997)", "Heat (1995)")],
                          Catalogue(ds.titles))
    out = E.score_task("+c1&-c2", [s], ids, None, ds.category_matrix)
    assert out["TC1not2P@K"] == {"mean": 50.0, "lo": 50.0, "hi": 50.0, "n": 1}
    assert out["HR@K"]["mean"] == 1.0 and "TC1not2P@K/no_control" not in out


def test_score_answers_rejects_mismatched_answers():
    ds = tiny_dataset()
    es = hand_set(ds)
    with pytest.raises(ValueError, match="no answers for tasks"):
        E.score_answers(es, {"seqrec": ["", ""]}, ds.category_matrix, Catalogue(ds.titles))
    bad = {t: [""] * len(s) for t, s in es.tasks.items()} | {"seqrec": [""]}
    with pytest.raises(ValueError, match="seqrec: 1 answers for 2 samples"):
        E.score_answers(es, bad, ds.category_matrix, Catalogue(ds.titles))


def test_paired_differences_resample_the_same_users():
    # four users; "after" adds 10 points to every user's TCP: a user-to-user spread of 0 to 90 makes each
    # model's own interval wide, the difference's interval is exactly the shift
    before = {"+c": {"TCP@K": np.array([0.0, 30.0, 60.0, 90.0]), "HR@K": np.array([0.0, 1.0, 0.0, 0.0])},
              "seqrec": {}}
    after = {"+c": {"TCP@K": np.array([10.0, 40.0, 70.0, 100.0]), "HR@K": np.array([0.0, 1.0, 0.0, 1.0]),
                    "Reward": np.array([1.0, 2.0, 3.0, 4.0])}, "seqrec": {}}
    boot = E.Bootstrap(resamples=200)
    own = E.estimates(after, boot)["+c"]["TCP@K"]
    assert own["hi"] - own["lo"] > 30
    diff = E.paired_differences(after, before, boot)
    assert diff["+c"]["TCP@K"] == {"mean": 10.0, "lo": 10.0, "hi": 10.0, "n": 4}
    assert set(diff["+c"]) == {"TCP@K", "HR@K"} and diff["seqrec"] == {}  # only what both models have
    hr = diff["+c"]["HR@K"]  # one user of four gained a hit: the mean 0.25, resamples without that user give 0
    assert hr["mean"] == 0.25 and hr["lo"] == 0.0 and 0.5 <= hr["hi"] <= 0.75
    with pytest.raises(ValueError, match="task \\+c: 3 answers against 4: paired differences need the same test users"):
        E.paired_differences({"+c": {"TCP@K": np.zeros(3)}}, before, boot)


def test_markdown_of_paired_differences_is_signed_and_marks_intervals_without_zero():
    rows = [("ours − base", {"-c": {"TCP@K": est(-6.0, 17, -11.5, -0.5), "TCP@K/no_control": est(19.5, 17, 0.0, 38.0),
                                    "NonExist@K": est(-20.0, 17, -35.0, 0.0)}})]
    lines = T.markdown(TABLE["table3"], rows, paired=True).splitlines()
    assert lines[0] == ("### Table 3: category control (I1); in parentheses: the same model without the control text"
                        " — paired differences: each run minus the run before it, on the same users (bold: the "
                        "interval excludes 0)")
    cells = lines[4].split(" | ")
    assert cells[-2] == "**-6.0** [-11.5, -0.5] (+19.5 [+0.0, +38.0]) n=17"
    assert cells[-1] == "-20.0 [-35.0, +0.0] n=17 |"  # the interval reaches 0: not marked


# ---- tables ------------------------------------------------------------------------------------------
def est(mean, n, lo=None, hi=None):
    return {"mean": mean, "lo": mean if lo is None else lo, "hi": mean if hi is None else hi, "n": n}


ROWS = [
    ("SASRec", {"seqrec": {"HR@K": est(0.12, 20, 0.02, 0.3), "NDCG@K": est(0.09, 20), "HR@5": est(0.10, 20),
                           "NDCG@5": est(0.08, 20)}}),
    ("base", {"seqrec": {"HR@K": est(0.01, 20), "NDCG@K": est(0.005, 20), "HR@5": est(0.0, 20),
                         "NDCG@5": est(0.0, 20)},
              "+c": {"HR@K": est(0.02, 18), "NDCG@K": est(0.01, 18), "TCP@K": est(4.5, 18, 1.25, 9.0),
                     "TCP@K/no_control": est(2.25, 18, 0.0, 5.0), "NonExist@K": est(20.0, 18)},
              "-c": {"HR@K": est(0.03, 18), "NDCG@K": est(0.02, 18), "TCP@K": est(11.0, 18),
                     "TCP@K/no_control": est(18.5, 18), "NonExist@K": est(30.0, 18)}}),
    ("ours", {"seqrec": {"HR@K": est(0.11, 20), "NDCG@K": est(0.095, 20), "HR@5": est(0.1, 20),
                         "NDCG@5": est(0.07, 20)},
              "+c": {"HR@K": est(0.25, 18), "NDCG@K": est(0.18, 18), "TCP@K": est(93.5, 18),
                     "TCP@K/no_control": est(7.75, 18), "NonExist@K": est(5.0, 18)},
              "-c": {"HR@K": est(0.10, 17), "NDCG@K": est(0.07, 17), "TCP@K": est(5.0, 17, 2.0, 8.25),
                     "TCP@K/no_control": est(38.0, 17), "NonExist@K": est(10.0, 17)}}),
]


def test_markdown_values_intervals_users_order_emphasis_and_missing_cells():
    t2 = T.markdown(TABLE["table2"], ROWS).splitlines()
    assert t2[0] == "### Table 2: sequential recommendation (I0)"
    assert t2[2] == "| Model | HR@10 | NDCG@10 | HR@5 | NDCG@5 |"
    assert [line.split(" | ")[0] for line in t2[4:7]] == ["| SASRec", "| base", "| ours"]  # the given order
    assert t2[4] == ("| SASRec | **0.120** [0.020, 0.300] n=20 | <u>0.090</u> [0.090, 0.090] n=20 "
                     "| **0.100** [0.100, 0.100] n=20 | **0.080** [0.080, 0.080] n=20 |")
    assert t2[6].startswith("| ours | <u>0.110</u> [0.110, 0.110] n=20 | **0.095** [0.095, 0.095] n=20 "
                            "| **0.100** [0.100, 0.100] n=20 |")  # ties share a place
    t3 = T.markdown(TABLE["table3"], ROWS).splitlines()
    assert not any(line.startswith("| SASRec") for line in t3)  # no cell of Table 3 applies to the teacher
    base, ours = t3[4], t3[5]
    assert base.split(" | ")[3] == "<u>4.5</u> [1.2, 9.0] (2.2 [0.0, 5.0]) n=18"  # Python rounds half to even
    # -C's TCP is lower-is-better: 5.0 is the best; each control's NonExist@10 follows its TCP
    assert ours.split(" | ")[-2] == "**5.0** [2.0, 8.2] (38.0 [38.0, 38.0]) n=17"
    assert ours.endswith("| **10.0** [10.0, 10.0] n=17 |") and base.split(" | ")[4] == "<u>20.0</u> [20.0, 20.0] n=18"
    lenient = T.markdown(TABLE["table3"], ROWS, "lenient+fuzzy<=3").splitlines()[0]
    assert lenient.endswith("[titles matched lenient+fuzzy<=3: some invented titles count as real]")


def test_records_csv_json_and_charts(tmp_path):
    rows = ROWS + [("partial", {"+c": {"HR@K": est(0.3, 5), "NDCG@K": est(0.2, 5)}})]  # no TCP measured
    recs = T.records(TABLE["table3"], rows)
    assert [r["model"] for r in recs] == ["base", "ours", "partial"]
    assert recs[1]["+C TCP@10 (%) ↑"] == est(93.5, 18) and recs[1]["+C TCP@10 (%) ↑ (no control)"] == est(7.75, 18)
    assert recs[2]["+C TCP@10 (%) ↑"] is None and recs[2]["-C HR@10"] is None
    partial = ("| partial | **0.300** [0.300, 0.300] n=5 | **0.200** [0.200, 0.200] n=5 "
               "| – | – | – | – | – | – |")
    assert partial in T.markdown(TABLE["table3"], rows)
    written = T.write_tables(rows, tmp_path, title_match="lenient")
    assert set(written) == {"table2", "table3"}  # tables without any row are left out
    assert [p.name for p in written["table3"]] == ["table3.csv", "table3.png"]
    assert (tmp_path / "table3.png").stat().st_size > 5000
    lines = (tmp_path / "table3.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("model,+C HR@10,+C HR@10 lo,+C HR@10 hi,+C HR@10 n,+C NDCG@10,")
    assert lines[1].startswith("base,0.02,0.02,0.02,18,0.01,0.01,0.01,18,4.5,1.25,9.0,18,2.25,0.0,5.0,18,")
    assert lines[3].startswith("partial,0.3,0.3,0.3,5,0.2,0.2,0.2,5,,,,,")
    js = json.loads((tmp_path / "tables.json").read_text(encoding="utf-8"))
    assert js["table2"]["rows"][0]["HR@10"] == {"mean": 0.12, "lo": 0.02, "hi": 0.3, "n": 20}
    assert js["table3"]["answers_per_task"] == {"+c": "5-18", "-c": "17-18"}
    assert js["table3"]["title_match"] == "lenient" and "titles matched lenient" in js["table3"]["title"]
    md = (tmp_path / "tables.md").read_text(encoding="utf-8")
    assert md.startswith("Each figure: mean [95 % bootstrap interval") and "titles matched lenient." in md
    assert "### Table 2" in md and "### Table 3" in md and "Table 4" not in md


def test_formatting_of_the_i0_answers_has_its_own_table_beside_table_5():
    rows = [("ours", {"seqrec": {"CorrectCount": est(87.5, 8), "RepeatItem@K": est(12.5, 8), "NonExist@K": est(25.0, 8),
                                 "InHistory@K": est(0.0, 8)}})]
    lines = T.markdown(TABLE["format_i0"], rows).splitlines()
    assert lines[2] == "| Model | CorrectCount (%) ↑ | RepeatItem@K (%) ↓ | NonExist@K (%) ↓ | InHistory@K (%) ↓ |"
    assert lines[4].startswith("| ours | 87.5 [87.5, 87.5] n=8 | 12.5 [12.5, 12.5] n=8 | 25.0 ")
    assert T.records(TABLE["table5"], rows) == []  # Table 5 is the item-count task's


# ---- the generation loop on a tiny random model ------------------------------------------------------
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges (256 byte tokens) plus ChatML's two special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE({ch: i for i, ch in enumerate(sorted(alphabet))}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   chat_template=CHATML)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """An HF directory (config, safetensors, tokenizer) of a random 2-layer Llama."""
    from reclm_jax.llm import hf_io, model
    from reclm_jax.llm.config import PRESETS

    tok = byte_tokenizer()
    cfg = PRESETS["tiny"].replace(vocab_size=len(tok), max_position_embeddings=1024,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    rng = np.random.default_rng(0)  # numpy, not model.init_params: no compilation needed for random weights
    params = jax.tree.map(lambda shape: rng.normal(0, 0.5, shape).astype(np.float32), model.param_shapes(cfg),
                          is_leaf=lambda x: isinstance(x, tuple))
    return hf_io.save_hf_dir(tmp_path_factory.mktemp("tiny-llm"), params, cfg, tokenizer=tok)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A teacher directory holding an untrained (randomly initialised) SASRec for the tiny catalogue."""
    from flax import nnx

    from reclm_jax.teacher import checkpoint
    from reclm_jax.teacher.config import EvalConfig, ModelConfig, TeacherConfig
    from reclm_jax.teacher.query import build_model

    cfg = TeacherConfig(model=ModelConfig(max_len=10, width=16, num_blocks=1, num_heads=1, ffn_dim=16),
                        eval=EvalConfig(batch_size=8, num_negatives=5))
    out = tmp_path_factory.mktemp("teacher")
    checkpoint.write_info(out, cfg, len(TITLES), "tiny")
    checkpoint.save_best(out, 0, nnx.to_pure_dict(nnx.split(build_model(cfg, len(TITLES)))[1]))
    return out


def test_generation_loop_end_to_end(tiny_model_dir, teacher_dir):
    from reclm_jax.teacher.query import Teacher

    ds = tiny_dataset()
    teacher = Teacher.load(teacher_dir)
    model = E.load_chat_model(str(tiny_model_dir), name="tiny")
    es = build_eval_set(TaskContext(ds, teacher, TaskConfig(test_users=4, sharegpt_ratio=0.0)), "test")
    settings = E.GenerationSettings(max_new_tokens=12, batch_size=64)
    answers = E.generate_answers(model, es, settings, progress=False)
    assert {t: len(a) for t, a in answers.items()} == {t: len(s) for t, s in es.tasks.items()}
    catalogue = Catalogue(ds.titles)
    metrics = E.score_answers(es, answers, ds.category_matrix, catalogue)
    for task, samples in es.tasks.items():
        assert {e["n"] for e in metrics[task].values()} == {len(samples)} == {4}  # every answer is scored
        m = means(metrics[task])
        # 12 random byte tokens never spell a catalogue title: every answer fails, none is left out
        ids = E.parse_answers(answers[task], catalogue)
        assert all(i == -1 for row in ids for i in row)
        assert m["Unparsed"] == pytest.approx(100 * np.mean([not row for row in ids]))
        assert m["HR@K"] == 0.0 and m["CorrectCount"] == 0.0
        assert m.get("CPA", 0.0) == 0.0 and m.get("TCP@K", 0.0) == 0.0
    sasrec = E.teacher_metrics(teacher, es, ds)["seqrec"]
    assert {e["n"] for e in sasrec.values()} == {4}
    assert all(0.0 <= e["lo"] <= e["mean"] <= e["hi"] <= 1.0 for e in sasrec.values())
    sasrec = means(sasrec)
    assert 0.0 <= sasrec["NDCG@5"] <= sasrec["NDCG@K"] <= sasrec["HR@K"] <= 1.0


def test_reward_of_each_answer_by_hand(teacher_dir):
    """Answers whose rewards need no teacher rank (the target, unknown, repeated and history items): the
    paper's Eq. 1-5 by hand; an empty answer to "+C" earns the list term of 3 misses."""
    from reclm_jax.teacher.query import Teacher

    ds = tiny_dataset()
    es = hand_set(ds)
    es = EvalSet("test", {"seqrec": es.tasks["seqrec"], "+c": es.tasks["+c"] * 2}, {})
    answers = {"seqrec": [answer("Babe (1995)", "Babe (1995)"), ""],
               "+c": [answer("Babe (1995)", "Heat (1995)", "Nope (2020)"), ""]}
    m = E.score_answers(es, answers, ds.category_matrix, Catalogue(ds.titles), teacher=Teacher.load(teacher_dir))
    # I0, user 0: the target (R_item 1, sum(Scores*) += 1) then a repeat (-1, -1): sum R_item 0, R_list 0;
    # user 1: nothing, 0
    assert m["seqrec"]["Reward"]["mean"] == pytest.approx(0.0)
    # +C Drama: the target Babe is Drama (R_item 0.5 * 1 + 0.5 * 1), Heat is in the history and Nope unknown
    # (-1 each): sum R_item -1; sum(Scores*) = 1 - 2, 1 of 3 in C: Score_list^ctl = 1 / log2(2 + 2), so
    # 10 x R_list = 10 * (0.5 * -1 + 0.5 * 0.5) = -2.5. The empty answer: 3 misses, 10 * 0.5 / log2(5).
    empty = 5.0 / math.log2(5.0)
    assert m["+c"]["Reward"]["mean"] == pytest.approx((-3.5 + empty) / 2)
    assert (m["+c"]["Reward"]["lo"], m["+c"]["Reward"]["hi"]) == pytest.approx((-3.5, empty))
    assert "Reward" not in E.score_answers(es, answers, ds.category_matrix, Catalogue(ds.titles))["+c"]
    # an evaluation of control tasks only: the teacher, which answers I0 alone, has an empty row
    only_c = EvalSet("test", {"+c": es.tasks["+c"]}, {})
    assert E.teacher_metrics(Teacher.load(teacher_dir), only_c, ds) == {"seqrec": {}}


def run_cli(argv):
    args, handler = command.parse(argv)
    return handler(args)


@pytest.fixture(scope="module")
def fresh_adapter_dir(tiny_model_dir, tmp_path_factory):
    """A PEFT directory of a freshly initialised LoRA (B = 0): merged, it leaves the model unchanged."""
    from reclm_jax.llm import hf_io, lora
    from reclm_jax.llm.config import LoraConfig

    cfg, params = hf_io.load_pretrained(tiny_model_dir)
    lora_cfg = LoraConfig(rank=2, alpha=4.0)
    adapter = lora.init(jax.random.key(1), params, cfg, lora_cfg)
    return hf_io.save_peft_dir(tmp_path_factory.mktemp("adapter"), adapter, cfg, lora_cfg)


def test_evaluate_command_writes_tables_and_reuses_results(tiny_model_dir, teacher_dir, fresh_adapter_dir,
                                                           tmp_path, monkeypatch, capsys):
    import reclm_jax.eval.cli as cli

    monkeypatch.setattr(cli, "dataset_from_args", lambda args: tiny_dataset())
    argv = ["evaluate", "--model", str(tiny_model_dir), "--teacher", str(teacher_dir), "--out", str(tmp_path),
            "--limit", "4", "--max-new-tokens", "12", "--batch-size", "64",  # the loop test's shapes: no recompile
            "--lora", f"{fresh_adapter_dir},{fresh_adapter_dir}", "--name", "fresh x2"]
    assert run_cli(argv) == 0
    out = capsys.readouterr()
    assert "### Table 2" in out.out and "| SASRec |" in out.out and f"| {tiny_model_dir.name} zero-shot |" in out.out
    base_run = json.loads((tmp_path / "runs" / f"{tiny_model_dir.name}_zero-shot" / "metrics.json").read_text())
    fresh_run = json.loads((tmp_path / "runs" / "fresh_x2" / "metrics.json").read_text())
    assert fresh_run["metrics"] == base_run["metrics"]  # two no-op adapters merged: the same answers
    for name in ("tables.md", "tables.json", "table2.csv", "table3.csv", "table3.png", "table4.png", "table5.csv",
                 "table7.png"):
        assert (tmp_path / name).is_file(), name
    run = tmp_path / "runs" / f"{tiny_model_dir.name}_zero-shot"
    scored = json.loads((run / "metrics.json").read_text())["metrics"]
    assert len((run / "answers.jsonl").read_text().splitlines()) == sum(m["HR@K"]["n"] for m in scored.values())
    assert all("Reward" in m for task, m in scored.items() if "&" not in task)  # the combined tasks have none
    assert "The rule reward of each answer" in (tmp_path / "tables.md").read_text()
    # the second run against the first on the same users: the same answers, so every difference is exactly 0
    js = json.loads((tmp_path / "tables.json").read_text())
    (diff,) = js["table2"]["differences"]
    assert diff["model"] == f"fresh x2 − {tiny_model_dir.name} zero-shot"
    assert diff["HR@10"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "n": 4}
    assert "paired differences: each run minus the run before it" in (tmp_path / "tables.md").read_text()

    # again: the answers are read back and scored, not decoded (a run from before a metric existed gains it)
    (run / "metrics.json").write_text(json.dumps(json.loads((run / "metrics.json").read_text()) | {"metrics": {}}))
    assert run_cli(argv) == 0
    assert "were made with these settings; scoring them again" in capsys.readouterr().err
    assert json.loads((run / "metrics.json").read_text())["metrics"] == scored

    with pytest.raises(UserError, match="--name was given 2 times for 1 --lora"):
        run_cli(argv + ["--name", "x"])
    with pytest.raises(UserError, match="--lora ',' names no adapter"):
        run_cli(argv[:-4] + ["--lora", ","])
    with pytest.raises(UserError, match="max_history"):
        run_cli(argv + ["--max-history", "0"])


# ---- recommend ---------------------------------------------------------------------------------------
def test_recommendation_lines_mark_unknown_history_and_repeats():
    ds = tiny_dataset()
    items = Catalogue(ds.titles).parse(answer("Fargo (1996)", "The Matrix (1999)", "Heat (1995)", "Fargo (1996)"))
    lines = recommendation_lines(items, ds.item_categories, history={1})
    assert lines == [" 1. Fargo (1996)  [Crime, Drama]",
                     " 2. The Matrix (1999)  [not in the catalogue]",
                     " 3. Heat (1995)  [Action, Crime] (already in the history)",
                     " 4. Fargo (1996)  [Crime, Drama] (repeated)"]


def test_recommend_history_and_prompt():

    cat_ = Catalogue(TITLES, "lenient")  # as `recommend` matches the typed history
    assert history_items(["Heat (1995)", "  fargo (1996)"], cat_) == [1, 4]
    with pytest.raises(UserError, match=r"'Heet \(1995\)' is not in the catalogue; close titles: 'Heat \(1995\)'"):
        history_items(["Heet (1995)"], cat_)


def test_recommend_command_runs(tiny_model_dir, monkeypatch, capsys):
    import reclm_jax.eval.cli as cli

    monkeypatch.setattr(cli, "dataset_from_args", lambda args: tiny_dataset())
    code = run_cli(["recommend", "--model", str(tiny_model_dir), "--history", "Heat (1995)", "Fargo (1996)",
                    "--intent", "no comedies", "-k", "3", "--max-new-tokens", "8", "--show-prompt",
                    "--constrain", "none"])
    out = capsys.readouterr().out
    assert "user's intention: no comedies" in out and "--- answer" in out
    # a random model's 8 bytes: either no list at all (exit 1) or lines marked as unknown or cut-off titles
    assert (code == 1 and "no list in the answer" in out) or (code == 0 and "[truncated by --max-new-tokens]" in out
                                                              and "reached --max-new-tokens 8" in out)


# ---- plots -------------------------------------------------------------------------------------------
def test_training_curves(tmp_path):
    log = tmp_path / "ppo.jsonl"
    lines = [{"event": "config", "lr": 1e-3}]
    lines += [{"step": s, "loss": 2.0 / (s + 1), "lr": 1e-3, "reward": {"mean": 0.1 * s}, "approx_kl": 0.01 * s,
               "valid": {"+c": {"TCP@K": 10.0 + s}, "seqrec": {"HR@K": 0.01 * s}}, "time/rewards_s": 1.5}
              for s in range(5)]
    log.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    series = read_log(log)
    assert series["reward/mean"] == ([0, 1, 2, 3, 4], [0.0, 0.1, 0.2, 0.30000000000000004, 0.4])
    assert panels(series) == {"KL": ["approx_kl"], "loss": ["loss"], "reward": ["reward/mean"],
                              "TCP (%)": ["valid/+c/TCP@K"], "accuracy": ["valid/seqrec/HR@K"]}
    png = plot_log(log, tmp_path / "out" / "ppo.png")
    assert png.stat().st_size > 10000
    assert run_cli(["plot", "--log", str(log), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "ppo.png").is_file()
    for run in ("sft", "ppo"):  # the trainers' logs all end in log.jsonl: one PNG each, named by the run
        (tmp_path / run).mkdir()
        (tmp_path / run / "log.jsonl").write_text(log.read_text())
    written = plot_logs([tmp_path / "sft" / "log.jsonl", tmp_path / "ppo" / "log.jsonl"], tmp_path / "both")
    assert [p.name for p in written] == ["sft-log.png", "ppo-log.png"] and all(p.is_file() for p in written)
    (tmp_path / "bad.jsonl").write_text('{"step": 1, "loss": 1}\n{oops\n')
    with pytest.raises(LogError, match="bad.jsonl:2"):
        read_log(tmp_path / "bad.jsonl")
    (tmp_path / "none.jsonl").write_text('{"step": 1, "lr": 1}\n')
    with pytest.raises(LogError, match="no loss, reward"):
        plot_log(tmp_path / "none.jsonl", tmp_path / "none.png")

    with pytest.raises(UserError, match="missing.jsonl does not exist"):
        run_cli(["plot", "--log", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)])
