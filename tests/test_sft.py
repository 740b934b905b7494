"""SFT: the loss against hand values, the schedule, micro-batching, over-fitting, resume, non-finite stops,
a sharded step on 8 fake devices, and validation scoring."""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reclm_jax.core.controls import Control
from reclm_jax.eval.evaluate import parse_answers, score_task
from reclm_jax.eval.parse import Catalogue
from reclm_jax.llm import lora as lora_lib
from reclm_jax.llm import model
from reclm_jax.llm.config import LORA_TARGETS, PRESETS, LoraConfig
from reclm_jax.sft import step as step_lib
from reclm_jax.sft.config import SFT_OPTIM, CheckpointConfig, SFTConfig, TrainConfig, ValidConfig
from reclm_jax.core.errors import RunError
from reclm_jax.sft.trainer import RunSetup, place, train
from reclm_jax.tasks.batches import collate, pack
from reclm_jax.tasks.samples import Sample
from reclm_jax.training import optim
from reference_logprobs import token_logprobs

token_logprobs = jax.jit(token_logprobs, static_argnames=("cfg", "lora_cfg"))
batch_loss = jax.jit(step_lib.batch_loss, static_argnames=("cfg", "lora_cfg", "response_len"))

CFG = PRESETS["tiny"]
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=LORA_TARGETS)  # lm_head too: a 0.02-init base caps logits
B, T, ACCUM, TOTAL = 4, 16, 2, 12


def test_response_positions_are_the_states_before_response_tokens():
    loss_mask = jnp.array([[0, 0, 1, 1, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
    idx, valid = step_lib.response_positions(loss_mask, 3)
    np.testing.assert_array_equal(idx, [[1, 2, 0], [0, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(valid, [[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert step_lib.response_positions(loss_mask, 99)[0].shape == (3, 4)  # never more than T - 1


def test_batch_loss_equals_the_per_sample_mean_over_all_positions():
    """Logits at the gathered response positions only give the full forward pass's loss: each sample's mean
    response-token cross-entropy, averaged over samples (long and short answers weigh the same)."""
    params = base_params()
    lora = jax.tree.map(lambda x: x + 0.01, init_lora(jax.random.key(1), params, CFG, LORA))
    batch = jax.tree.map(jnp.asarray, next(iter(batches())))
    logprobs, _ = token_logprobs(params, CFG, batch["tokens"], batch["segment_ids"] > 0, lora=lora, lora_cfg=LORA)
    mask = np.asarray(batch["loss_weight"][:, 1:] > 0, np.float32)
    expected = np.mean(-(logprobs * mask).sum(-1) / mask.sum(-1))
    for size in (T, int(mask.sum(-1).max())):
        got = batch_loss(lora, params, batch, None, cfg=CFG, lora_cfg=LORA, response_len=size)
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_packed_rows_give_the_bucketed_loss_and_gradient():
    """Nine samples of 3-16 tokens packed into rows of 32: attention stays within each sample, positions
    restart, and the loss and adapter gradient equal those of one padded row per sample."""
    params = base_params()
    lora = jax.tree.map(lambda x: x + 0.01, init_lora(jax.random.key(1), params, CFG, LORA))
    rng = np.random.default_rng(3)
    samples = []
    for n in (16, 3, 9, 12, 5, 16, 7, 11, 4):
        answer = np.zeros(n, bool)
        answer[rng.integers(1, n):] = True
        samples.append({"tokens": rng.integers(3, CFG.vocab_size, n).astype(np.int32), "loss_mask": answer})
    rows = pack([len(s["tokens"]) for s in samples], [int(s["loss_mask"].sum()) for s in samples], 32, 16,
                row_multiple=2)
    assert len(rows) == 4 and sorted(i for r in rows for i in r) == list(range(9))
    packed = collate(samples, rows, 32, pad_id=0)
    padded = collate(samples, [[i] for i in range(9)], 16, pad_id=0)
    grad = jax.jit(jax.value_and_grad(step_lib.batch_loss), static_argnames=("cfg", "lora_cfg", "response_len"))
    loss_packed, grad_packed = grad(lora, params, packed, None, cfg=CFG, lora_cfg=LORA, response_len=16)
    loss_padded, grad_padded = grad(lora, params, padded, None, cfg=CFG, lora_cfg=LORA, response_len=16)
    np.testing.assert_allclose(loss_packed, loss_padded, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grad_packed, grad_padded)


def test_schedule_warmup_then_quadratic_decay():
    sched = optim.schedule(replace(SFT_OPTIM, lr=1e-3, warmup_ratio=0.1, decay_power=2.0), 100)
    np.testing.assert_allclose([sched(0), sched(5), sched(10), sched(55), sched(100)],
                               [0.0, 5e-4, 1e-3, 1e-3 * 0.25, 0.0], atol=1e-9)


def test_split_micro_keeps_device_blocks_in_every_micro_batch():
    batch = {k: np.arange(8)[:, None].repeat(3, 1) for k in step_lib.BATCH_KEYS}
    micro = step_lib.split_micro(batch, 4)["tokens"]  # micro-batches of 4 rows
    assert micro.shape == (2, 4, 3)
    np.testing.assert_array_equal(micro[:, :, 0], [[0, 2, 4, 6], [1, 3, 5, 7]])


def batches(seed: int = 0, packed: bool = False) -> grain.IterDataset:
    """Batches drawn from a pool of 8 fixed samples (a random prompt, then a response to learn: counting up
    from the prompt's last token), different per step; one row per sample, or `packed` into rows of 2T tokens
    (an even number of rows, which varies between steps)."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(3, CFG.vocab_size - T, (8, T)).astype(np.int32)
    lengths = np.array([16, 14, 12, 16, 10, 15, 13, 16])
    prompt = np.array([6, 5, 4, 8, 3, 7, 6, 9])
    for row, p in enumerate(prompt):
        pool[row, p:] = pool[row, p - 1] + np.arange(1, T - p + 1)

    def make(i):
        picked = np.random.default_rng([seed, i]).permutation(8)[:B]
        samples = [{"tokens": pool[r, :lengths[r]], "loss_mask": np.arange(lengths[r]) >= prompt[r]} for r in picked]
        if packed:
            return collate(samples, pack(lengths[picked], [s["loss_mask"].sum() for s in samples], 2 * T, T, 2),
                           2 * T, pad_id=0)
        return collate(samples, [[j] for j in range(B)], T, pad_id=0)

    return grain.MapDataset.range(TOTAL).map(make).to_iter_dataset()


init_params = jax.jit(model.init_params, static_argnums=1)
init_lora = jax.jit(lora_lib.init, static_argnums=(2, 3))


def base_params():
    return init_params(jax.random.key(0), CFG)


def setup(params=None, lora_cfg=LORA, packed=False) -> RunSetup:
    params = base_params() if params is None else params
    return RunSetup(model_cfg=CFG, lora_cfg=lora_cfg, params=params,
                    lora=init_lora(jax.random.key(1), params, CFG, lora_cfg), batches=batches(packed=packed),
                    total_steps=TOTAL, micro_rows=B // ACCUM)


def sft_config(out_dir) -> SFTConfig:
    return SFTConfig(out_dir=str(out_dir), optim=replace(SFT_OPTIM, lr=3e-2, warmup_ratio=0.0),
                     train=TrainConfig(global_batch=B, micro_batch=B // ACCUM),
                     checkpoint=CheckpointConfig(every=2, keep_last=2), valid=ValidConfig(every=0))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return train(setup(), sft_config(out), progress=False), out


def test_loss_falls_when_overfitting_a_handful_of_samples(straight):
    result, out = straight
    losses = [result.losses[s] for s in range(1, TOTAL + 1)]
    assert result.step == TOTAL
    assert np.mean(losses[-3:]) < 0.85 * losses[0], losses
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, TOTAL + 1))
    # Throughput is measured between consecutive steps, so not on the first one or right after a checkpoint.
    measured = [r["step"] for r in log if "tokens_per_s" in r]
    assert measured == [s for s in range(2, TOTAL + 1) if s % 2 == 0], measured
    assert all(r["tokens_per_s"] > 0 and r["lr"] >= 0 for r in log if r["step"] in measured)
    assert list((out / "tensorboard").iterdir())


def test_interrupted_run_resumes_with_identical_losses(straight, tmp_path):
    first = train(setup(), sft_config(tmp_path), progress=False, max_steps=3)
    assert sorted(first.losses) == [1, 2, 3]
    # A fresh trainer resumes from the step-3 checkpoint (the end of a call always saves) and the same data.
    second = train(setup(), sft_config(tmp_path), progress=False)
    assert sorted(second.losses) == list(range(4, TOTAL + 1))
    resumed = {**first.losses, **second.losses}
    np.testing.assert_allclose([resumed[s] for s in range(1, TOTAL + 1)],
                               [straight[0].losses[s] for s in range(1, TOTAL + 1)], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 second.state.params, straight[0].state.params)


def test_packed_training_resumes_and_follows_the_padded_run(tmp_path):
    """Without dropout (whose masks depend on the layout), training on packed rows takes the padded run's
    steps: the same losses and adapter, through row counts that change between steps and a resume."""
    lora_cfg = replace(LORA, dropout=0.0)
    shapes = {b["tokens"].shape for b in batches(packed=True)}
    assert len(shapes) > 1, shapes
    padded = train(setup(lora_cfg=lora_cfg), sft_config(tmp_path / "padded"), progress=False)
    train(setup(lora_cfg=lora_cfg, packed=True), sft_config(tmp_path / "packed"), progress=False, max_steps=5)
    packed = train(setup(lora_cfg=lora_cfg, packed=True), sft_config(tmp_path / "packed"), progress=False)
    log = [json.loads(line) for line in (tmp_path / "packed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, TOTAL + 1)) and all(r["samples"] == B for r in log)
    np.testing.assert_allclose([r["loss"] for r in log], [padded.losses[s] for s in range(1, TOTAL + 1)], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6),
                 packed.state.params, padded.state.params)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    train(setup(), sft_config(tmp_path), progress=False, max_steps=2)
    params = base_params()
    poisoned = {**params, "final_norm": params["final_norm"].at[0].set(jnp.nan)}
    with pytest.raises(RunError, match=r"step 3: .*not finite.*last good checkpoint is step 2"):
        train(setup(poisoned), sft_config(tmp_path), progress=False)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints" / "last").iterdir() if p.name.isdigit())
    assert steps == [2]


def test_non_finite_step_leaves_the_state_unchanged():
    # The trainer's own step (same optimiser and schedule), so the compiled program is shared.
    optim_cfg = sft_config("unused").optim
    tx = optim.optimizer(optim_cfg, TOTAL)
    params = base_params()
    placed = place(None, params, init_lora(jax.random.key(1), params, CFG, LORA), tx)
    poisoned = {**params, "final_norm": params["final_norm"].at[0].set(jnp.inf)}
    before = jax.device_get(placed.state)
    step = step_lib.jit_train_step(CFG, LORA, tx, B // ACCUM, sft_config("unused").tasks.max_response_tokens,
                                   lr=optim.schedule(optim_cfg, TOTAL))
    new, metrics = step(placed.state, poisoned, placed.put_batch(next(iter(batches()))), jax.random.key(0))
    assert not bool(metrics["finite"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(new), before)


SHARDED_STEP = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import sys
    from dataclasses import replace
    import jax, numpy as np
    sys.path.insert(0, "tests")
    import tests.test_sft as t
    from reclm_jax.llm import sharding
    from reclm_jax.sft import step as step_lib
    from reclm_jax.sft.config import SFT_OPTIM
    from reclm_jax.training import optim
    from reclm_jax.sft.trainer import place

    params = t.base_params()
    lora = t.init_lora(jax.random.key(1), params, t.CFG, t.LORA)
    lora = jax.tree.map(lambda x: x + 0.01, lora)  # non-zero b, so every factor gets a gradient
    tx = optim.optimizer(replace(SFT_OPTIM, lr=1e-2, warmup_ratio=0.0), t.TOTAL)
    host_batch = next(iter(t.batches()))
    results = []
    for mesh in (None, sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))):
        placed = place(mesh, params, lora, tx)
        fn = step_lib.jit_train_step(t.CFG, t.LORA, tx, t.B // t.ACCUM, t.T, placed.shardings)
        state, metrics = fn(placed.state, placed.params, placed.put_batch(host_batch), jax.random.key(0))
        if mesh is not None:
            spec = state.params["layers"]["q"]["a"].sharding.spec
            assert tuple(spec) == (None, "fsdp", None), spec
        results.append(jax.device_get((state, metrics)))
    (s1, m1), (s8, m8) = results
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
    # (atol 1e-5: the suite's fast-compile flags sum in another order than XLA's default emitters, ~2e-6 apart)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), s8, s1)
    print("OK", len(jax.devices()))
""")


@pytest.mark.slow
def test_sharded_step_on_8_devices_equals_single_device_step():
    env = {**os.environ, "PYTHONPATH": os.getcwd()}  # with the session's compilation cache (conftest) and XLA flags
    proc = subprocess.run([sys.executable, "-c", SHARDED_STEP], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK 8" in proc.stdout


def test_validation_scores_by_hand():
    catalogue = Catalogue(["Heat (1995)", "Alien (1979)", "Up (2009)"])
    cats = np.array([[1, 0], [0, 1], [1, 1]], bool)  # item x category
    text = "1. Alien (1979)\n2. Unknown Film\n3. Heat (1995)"

    def score(kind, m=0.0, category=-1):
        control = () if category < 0 else ((Control(kind, m), category),)
        sample = Sample(task="t", messages=(("user", "?"),), user=0, history=(2,), target=0, k=4, controls=control)
        scored = score_task("t", [sample], parse_answers([text], catalogue), None, cats)
        return {metric: e["mean"] for metric, e in scored.items()}

    seq = score("seq")
    assert seq["HR@K"] == 1.0 and seq["NDCG@K"] == pytest.approx(1 / np.log2(4))  # target at position 2
    assert seq["NonExist@K"] == 25.0 and seq["CorrectCount"] == 0.0 and "TCP@K" not in seq
    plus = score("+c", category=1)
    assert plus["TCP@K"] == 25.0 and "CPA" not in plus  # Alien is in category 1: 1 of k = 4
    about = score("~", 0.5, category=0)
    assert about["TCP@K"] == 25.0 and about["CPA"] == 100.0  # 1 in C vs 4 x 0.5 = 2: within 1


def test_merged_export_of_the_trained_adapter_generates_the_same_greedy_tokens_in_transformers(straight, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from reclm_jax.llm import hf_io, sampling

    params, adapter = jax.device_get(base_params()), jax.device_get(straight[0].state.params)
    hf_io.save_hf_dir(tmp_path, lora_lib.merge(params, adapter, LORA), CFG)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    tokens = next(iter(batches()))["tokens"]
    prompts = [tokens[0, :6].tolist(), tokens[1, :9].tolist()]
    ours = sampling.generate(params, CFG, prompts, max_new_tokens=6, eos_ids=[], lora=adapter, lora_cfg=LORA)
    for prompt, generated in zip(prompts, ours.tokens):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)
        assert out[0, len(prompt):].tolist() == generated.tolist()


def test_validation_on_the_valid_tasks_with_greedy_generation():
    from tasks_helpers import tiny_dataset, tiny_teacher, tiny_tokenizer

    from reclm_jax.llm import sampling
    from reclm_jax.llm.chat import ChatPolicy
    from reclm_jax.sft.validation import evaluate
    from reclm_jax.tasks.config import TaskConfig
    from reclm_jax.tasks.evaluation import build_eval_set
    from reclm_jax.tasks.samples import TaskContext

    ds = tiny_dataset(num_users=24)
    ctx = TaskContext(ds, tiny_teacher(ds), TaskConfig(task_set="v1", sharegpt_ratio=0, valid_users=3))
    eval_set = build_eval_set(ctx, "valid")
    tok = tiny_tokenizer(["1. Movie 3 (1953)\n2. Movie 4 (1954)"] * 5)
    catalogue = Catalogue(ds.titles)
    tasks = iter(eval_set.tasks.values())

    def oracle(prompts):  # called once per task, prompts in sample order; lists the target first
        samples = next(tasks)
        assert len(prompts) == len(samples) and all(len(p) <= 400 for p in prompts)
        return [f"1. {ds.titles[s.target]}\n2. Nope" for s in samples]

    policy = ChatPolicy.of(tok)
    metrics, answers = evaluate(eval_set, oracle, policy, catalogue, ds.category_matrix, 400)
    assert set(answers) == {"seqrec", "+c", "-c", "~50%"}
    for task, samples in eval_set.tasks.items():
        assert metrics[f"{task}/n"] == len(samples) and metrics[f"{task}/HR@K"] == 1.0
        assert metrics[f"{task}/NonExist@K"] == pytest.approx(10.0)  # "Nope" is 1 of k = 10
    assert "CPA" not in {k.split("/")[1] for k in metrics if k.startswith("+c/")} and "~50%/CPA" in metrics

    cfg = CFG.replace(vocab_size=len(tok))
    params = init_params(jax.random.key(0), cfg)
    prompts = [tok.encode("Movie 3"), tok.encode("1. Movie 4 (1954)\n2."), tok.encode("Mo")]
    answers = policy.answer(params, cfg, prompts, max_new_tokens=5, batch_size=2)  # two batches, sorted by length
    direct = sampling.generate(params, cfg, prompts, max_new_tokens=5, eos_ids=policy.stop_ids, pad_id=policy.pad_id)
    assert answers == [tok.decode(t[:n].tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
                       for t, n in zip(direct.tokens, direct.lengths)]


def test_training_flops_per_token_and_peak_table():
    from reclm_jax.training.run_log import peak_flops

    # tiny: 2 x (64*16*(2*4 + 2*2) + 3*64*128 + 2*64) + 2 * 256*64 + 64 = 106816 parameters
    assert CFG.num_params == 106816
    assert CFG.train_flops_per_token(100) == 6 * 106816 + 12 * 2 * 4 * 16 * 100
    assert peak_flops(jax.devices("cpu")[0]) is None and peak_flops(override=1e12) == 1e12


@pytest.mark.parametrize("preset", ["tiny", "smollm2-135m", "llama2-7b-paper"])
def test_presets_load_and_the_paper_preset_holds_the_paper_setting(preset):
    from pathlib import Path

    from reclm_jax import config as config_lib
    from reclm_jax.llm.config import LAYER_TARGETS

    cfg = config_lib.load(SFTConfig, Path(__file__).parent.parent / "configs" / "sft" / f"{preset}.yaml")
    assert cfg.train.global_batch % cfg.train.micro_batch == 0
    if preset == "llama2-7b-paper":
        assert (cfg.tasks.max_length, cfg.train.global_batch, cfg.model.tokenizer) == (1024, 64, "llama2")
        assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets) == (16, 8.0, 0.1, LAYER_TARGETS)
        o = cfg.optim
        assert (o.lr, o.weight_decay, o.eps, o.warmup_ratio, o.decay_power, o.clip_norm) == (1e-3, 0.01, 1e-5, 0.0125,
                                                                                             2.0, 1.0)
        assert cfg.mesh.sizes == (1, 4, 1) and cfg.model.compute_dtype == "bfloat16"
        assert cfg.tasks.valid_users == 320 and cfg.valid.users is None
