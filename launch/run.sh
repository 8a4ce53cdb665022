#!/usr/bin/env bash
# Thin torchrun wrapper: computes the run directory once and passes it, with every extra argument
# as a Hydra override, to all ranks.
#
#   bash launch/run.sh [--nproc N] [--recipe NAME] [key=value ...]
#
# Environment: NPROC (default 1), RECIPE (default tiny), RUN_DIR (default runs/<recipe>-<time>),
# MASTER_PORT (default 29500 via --standalone), TORCHRUN (default "python -m torch.distributed.run").
set -euo pipefail

nproc="${NPROC:-1}"
recipe="${RECIPE:-tiny}"
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc) nproc="$2"; shift 2 ;;
    --nproc=*) nproc="${1#*=}"; shift ;;
    --recipe) recipe="$2"; shift 2 ;;
    --recipe=*) recipe="${1#*=}"; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) overrides+=("$1"); shift ;;
  esac
done

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ ! -f "$here/../recipes/$recipe.yaml" ]]; then
  echo "launch/run.sh: unknown recipe '$recipe'; choose one of: $(cd "$here/../recipes" && ls *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
  exit 2
fi

has_run_dir=0
for o in "${overrides[@]+"${overrides[@]}"}"; do
  [[ "$o" == run.dir=* ]] && has_run_dir=1
done
if [[ $has_run_dir -eq 0 ]]; then
  overrides+=("run.dir=${RUN_DIR:-runs/${recipe}-$(date +%Y%m%d-%H%M%S)}")
fi

read -r -a torchrun <<< "${TORCHRUN:-python -m torch.distributed.run}"
set -x
exec "${torchrun[@]}" --standalone --nproc_per_node "$nproc" -m longtrain.train \
  --config-name "$recipe" "${overrides[@]}"
