#!/usr/bin/env bash
# DeepSpeed ZeRO-1/2 data parallelism on one node: one process per GPU.
#   launch/deepspeed.sh NGPUS RECIPE [key.sub=value ...]
# The recipe (or an override) names the ZeRO settings, e.g.
#   distributed.deepspeed_config=configs/deepspeed/zero2.json
# batch sizes, accumulation, clipping and precision come from the recipe, never from the JSON.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 NGPUS RECIPE [key.sub=value ...]" >&2; exit 2; }
ngpus=$1; shift
# --no_local_rank: ranks read LOCAL_RANK from the environment (qtrain/distributed/env.py), as under torchrun.
CMD=(deepspeed --no_local_rank --num_gpus "$ngpus" --module qtrain train "$@")
if [ -n "${QTRAIN_DRY_RUN:-}" ]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
exec "${CMD[@]}"
