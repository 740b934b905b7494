#!/usr/bin/env bash
# A multi-host SFT or PPO run: start the SAME command on every host; each joins the run through
# jax.distributed.initialize.
#
#   COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=4 PROCESS_ID=<0..3> scripts/launch.sh sft --config configs/sft/x.yaml [key=value ...]
#   COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=2 PROCESS_ID=<0..1> scripts/launch.sh ppo --config configs/ppo/x.yaml [key=value ...]
#
# PROCESS_ID / NUM_PROCESSES default to SLURM's SLURM_PROCID / SLURM_NTASKS. Without COORDINATOR, JAX detects
# the cluster itself (SLURM, Cloud TPU, ...). All hosts must see the same out_dir (a shared file system), the
# same teacher and base model. SFT: each host feeds its own rows of every batch. PPO: each host samples and
# trains on its own rows of every rollout batch, and scores all of them. PYTHON picks the interpreter.
set -euo pipefail

STAGE="${1:-}"
if [[ "$STAGE" != sft && "$STAGE" != ppo ]]; then
  echo "usage: scripts/launch.sh sft|ppo [--config FILE] [key=value ...]" >&2
  exit 2
fi
shift
PROCESS_ID="${PROCESS_ID:-${SLURM_PROCID:-}}"
NUM_PROCESSES="${NUM_PROCESSES:-${SLURM_NTASKS:-}}"
args=(mesh.multi_host=true)
if [[ -n "${COORDINATOR:-}" ]]; then
  if [[ -z "$PROCESS_ID" || -z "$NUM_PROCESSES" ]]; then
    echo "launch.sh: with COORDINATOR set, also set PROCESS_ID and NUM_PROCESSES (or run under SLURM)" >&2
    exit 2
  fi
  args+=("mesh.coordinator_address=$COORDINATOR")
fi
[[ -n "$PROCESS_ID" ]] && args+=("mesh.process_id=$PROCESS_ID")
[[ -n "$NUM_PROCESSES" ]] && args+=("mesh.num_processes=$NUM_PROCESSES")

exec "${PYTHON:-python}" -m reclm_jax.cli "$STAGE" "$@" "${args[@]}"
