#!/usr/bin/env bash
# SFT or PPO on a Cloud TPU pod slice (e.g. v5litepod-16: 4 hosts x 4 chips): `scripts/launch.sh` on every worker.
#
#   reclm-jax plan --config configs/sft/llama2-7b-paper.yaml --devices 16 --accelerator tpu-v5e mesh.fsdp=16
#   TPU=my-v5e-16 ZONE=us-west4-a scripts/tpu_pod.sh sft --config configs/sft/llama2-7b-paper.yaml mesh.fsdp=16
#   TPU=my-v5e-16 ZONE=us-west4-a scripts/tpu_pod.sh ppo --config configs/ppo/llama2-7b-paper.yaml mesh.data=16
#
# Every worker must have this repository at the same path (REPO, default ~/reclm-jax) with `pip install -e .`
# and jax[tpu] done, and see out_dir, the teacher and the base model (a GCS-fused or NFS path). On TPU,
# jax.distributed.initialize finds the other workers by itself; launch.sh checks the stage and asks for it.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
REPO="${REPO:-~/reclm-jax}"
printf -v ARGS ' %q' "$@"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "cd $REPO && scripts/launch.sh$ARGS"
