#!/usr/bin/env bash
# SFT or PPO on a Cloud TPU pod slice (e.g. v5litepod-16: 4 hosts x 4 chips): the same command on every worker.
#
#   reclm-jax plan --config configs/sft/llama2-7b-paper.yaml --devices 16 --accelerator tpu-v5e mesh.fsdp=16
#   TPU=my-v5e-16 ZONE=us-west4-a scripts/tpu_pod.sh sft --config configs/sft/llama2-7b-paper.yaml mesh.fsdp=16
#   TPU=my-v5e-16 ZONE=us-west4-a scripts/tpu_pod.sh ppo --config configs/ppo/llama2-7b-paper.yaml mesh.data=16
#
# Every worker must have this repository at the same path (REPO, default ~/reclm-jax) with `pip install -e .`
# and jax[tpu] done, and see out_dir, the teacher and the base model (a GCS-fused or NFS path). On TPU,
# jax.distributed.initialize finds the other workers by itself; mesh.multi_host=true asks for it.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
STAGE="${1:-}"
if [[ "$STAGE" != sft && "$STAGE" != ppo ]]; then
  echo "usage: TPU=... ZONE=... scripts/tpu_pod.sh sft|ppo [--config FILE] [key=value ...]" >&2
  exit 2
fi
shift
REPO="${REPO:-~/reclm-jax}"
printf -v ARGS ' %q' "$@"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all \
  --command "cd $REPO && python -m reclm_jax.cli $STAGE$ARGS mesh.multi_host=true"
