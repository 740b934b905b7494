"""One process of `test_multiprocess.py`: SFT steps, then PPO steps, on the tiny presets (random tiny Llama, SmolLM2's
tokenizer), through the stages' own trainers and the one training loop, on a 2-device mesh.

    python tests/multiprocess_worker.py OUT_DIR PROCESS_ID NUM_PROCESSES PORT [KILL_AT_BATCH]

With 1 process it has both CPU devices, with 2 one each (the same mesh, the same programs). SFT batches come
from the grain pipeline (`tasks.batches.sft_batches`), each process reading its own shard of the samples.
PPO prompts are the same on every process (the rollout batch is split over the mesh inside the trainer).
With KILL_AT_BATCH this process SIGKILLs itself when the SFT loop asks for that batch (1-based). Each process
writes OUT_DIR/result-<id>.json: the logged scalars and checksums of its shards of the trained parameters.
"""

import json
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import jax

OUT, PID, NPROC, PORT = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
KILL_AT = int(sys.argv[5]) if len(sys.argv) > 5 else None
DEVICES = 2
jax.config.update("jax_num_cpu_devices", DEVICES // NPROC)
# No persistent compilation cache: 2-process resume runs that loaded the kill run's cached programs hung or
# timed out in their first collective (seen twice here; fresh compiles of the same programs run).

import grain  # noqa: E402
from flax import nnx  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from reclm_jax import config  # noqa: E402
from reclm_jax.eval.parse import Catalogue  # noqa: E402
from reclm_jax.llm import hf_io, lora as lora_lib, sharding  # noqa: E402
from reclm_jax.llm.chat import ChatPolicy  # noqa: E402
from reclm_jax.rl import rollout  # noqa: E402
from reclm_jax.rl.config import PPOConfig  # noqa: E402
from reclm_jax.rl.trainer import PPOTrainer, data_mesh  # noqa: E402
from reclm_jax.sft import trainer as sft  # noqa: E402
from reclm_jax.sft.config import SFTConfig  # noqa: E402
from reclm_jax.tasks.batches import sft_batches  # noqa: E402
from reclm_jax.tasks.samples import Sample  # noqa: E402
from reclm_jax.teacher.config import EvalConfig, ModelConfig as TeacherModel, TeacherConfig  # noqa: E402
from reclm_jax.teacher.query import Teacher, build_model  # noqa: E402
from reclm_jax.training import loop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TITLES = ["Heat", "Alien", "Brazil", "Fargo", "Casino", "Clue", "Speed", "Jaws", "Rocky", "Tron"]
SFT_STEPS, PPO_STEPS = 4, 1

mesh_cfg = sharding.MeshConfig(fsdp=-1, multi_host=NPROC > 1, coordinator_address=f"localhost:{PORT}",
                               num_processes=NPROC, process_id=PID, heartbeat_timeout_s=10)
sharding.initialize_distributed(mesh_cfg)
assert jax.device_count() == DEVICES and jax.process_count() == NPROC
if NPROC > 1:  # set gloo's context up now, while initialize has just lined the processes up (it gives a late
    multihost_utils.sync_global_devices("start")  # peer 30 s; a loaded box skews the processes' start-up more)

policy = ChatPolicy.load("smollm2-135m")



def samples(epoch: int) -> list[Sample]:
    """16 short recommendation conversations, in an order that depends on the epoch."""
    rng = np.random.default_rng([7, epoch])
    out = []
    for user in rng.permutation(16):
        items = np.random.default_rng(int(user)).permutation(len(TITLES))
        history = ", ".join(TITLES[i] for i in items[:3])
        out.append(Sample(task="seqrec", user=int(user), k=2,
                          messages=(("user", f"I watched {history}. Name 2 more films."),),
                          response="\n".join(f"{j + 1}. {TITLES[i]}" for j, i in enumerate(items[3:5]))))
    return out


# ---- SFT: 4 steps of 8 samples (4 per process), checkpoints every step
sft_cfg = config.load(SFTConfig, ROOT / "configs/sft/tiny.yaml", [
    f"out_dir={OUT / 'sft'}", "train.global_batch=8", "train.micro_batch=2", f"train.steps={SFT_STEPS}",
    "tasks.max_length=96", "tasks.max_response_tokens=16", "tasks.buckets=[96]", "tasks.num_epochs=2",
    "tasks.prefetch=0", "checkpoint.every=1", "valid.every=0"])
sft_cfg = replace(sft_cfg, mesh=mesh_cfg)
per_process, accum = sft.batch_sizes(sft_cfg)
model_cfg, params = hf_io.load_model(sft_cfg.model, policy.tokenizer, sft_cfg.train.seed)
batches = sft_batches(samples, policy, replace(sft_cfg.tasks, batch_size=per_process))
if KILL_AT is not None:
    asked = iter(range(1, 1 << 30))
    batches = batches.map(lambda b: os.kill(os.getpid(), signal.SIGKILL) if next(asked) == KILL_AT else b)
setup = sft.RunSetup(model_cfg=model_cfg, lora_cfg=sft_cfg.lora, params=params,
                     lora=jax.jit(lora_lib.init, static_argnums=(2, 3))(jax.random.key(sft_cfg.train.seed), params, model_cfg,
                                                                        sft_cfg.lora),
                     batches=batches, total_steps=SFT_STEPS, accum=accum, mesh=sharding.make_mesh(mesh_cfg))
sft_result = sft.train(setup, sft_cfg, progress=False)

# ---- PPO: 1 step of 2 prompts x 2 responses, the rollout split over both devices
ppo_cfg = config.load(PPOConfig, ROOT / "configs/ppo/tiny.yaml", [
    f"out_dir={OUT / 'ppo'}", "rollout.prompts_per_step=2", "rollout.max_new_tokens=8",
    "rollout.max_prompt_tokens=64", "ppo.epochs=1", "ppo.minibatches=1", f"train.steps={PPO_STEPS}",
    "checkpoint.every=1"])
teacher_cfg = TeacherConfig(model=TeacherModel(max_len=8, width=8, num_heads=1, ffn_dim=8), eval=EvalConfig(batch_size=8))
_, teacher_state = nnx.split(build_model(teacher_cfg, len(TITLES)))  # a random SASRec: rewards need only its ranks
teacher = Teacher(teacher_cfg, len(TITLES), nnx.to_pure_dict(teacher_state))
scorer = rollout.Scorer(Catalogue(TITLES), teacher, np.ones((len(TITLES), 1), bool),
                        policy.decode, ppo_cfg.rewards)
prompts = rollout.prompts_from_samples([replace(s, history=(1, 2, 3), target=4) for s in samples(0)], policy,
                                       ppo_cfg.rollout.max_prompt_tokens)
stream = grain.MapDataset.range(PPO_STEPS).map(lambda i: prompts[2 * i:2 * i + 2]).to_iter_dataset()
trainer = PPOTrainer(ppo_cfg, params, model_cfg, scorer, policy, data_mesh())
ppo_result = loop.train(loop.RunDir(ppo_cfg.out_dir, ppo_cfg), trainer.state, trainer.step, iter(stream),
                        total_steps=PPO_STEPS, checkpoint=ppo_cfg.checkpoint, progress=False, description="ppo")


def checksums(tree) -> dict[str, float]:
    """Sum |x| of each leaf over this process's shards (one copy of replicated ones): the processes' sums add
    up to the whole array's, with no collective (a late process would time gloo's rendezvous out)."""
    return {jax.tree_util.keystr(path): sum(float(np.abs(np.asarray(s.data, np.float64)).sum())
                                            for s in x.addressable_shards if s.replica_id == 0)
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


(OUT / f"result-{PID}.json").write_text(json.dumps({
    "sft_log": logged(OUT / "sft"), "sft_resumed_from": sft_result.resumed_from,
    "adapter": checksums(sft_result.state.params), "ppo_log": logged(OUT / "ppo"),
    "ppo": checksums(ppo_result.state.params)}))
