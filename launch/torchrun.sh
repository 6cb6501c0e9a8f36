#!/usr/bin/env bash
# Data-parallel training on one node: one process per GPU (or N CPU processes with gloo).
#   launch/torchrun.sh NPROC RECIPE [key.sub=value ...]
# DDP (engine auto/ddp): each rank loads its own 4-bit copy of the base on its own device and
# syncs LoRA grads only; distributed.engine=fsdp shards the base across the ranks instead.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 NPROC RECIPE [key.sub=value ...]" >&2; exit 2; }
nproc=$1; shift
CMD=(torchrun --standalone --nproc_per_node "$nproc" -m qtrain train "$@")
if [ -n "${QTRAIN_DRY_RUN:-}" ]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
exec "${CMD[@]}"
