#!/usr/bin/env bash
# Thin torchrun wrapper: computes the run directory once and passes it, with every extra argument
# as a Hydra override, to all ranks. The configuration is validated once first (a bad one is one
# "longtrain: error:" line and exit 2, torchrun never starts); a rank that fails later has its error
# line shown last, after torchrun's report, with the rank's exit code.
#
#   bash launch/run.sh [--nproc N] [--recipe NAME] [key=value ...]
#
# Environment: NPROC (default 1), RECIPE (default tiny), RUN_DIR (default runs/<recipe>-<time>),
# MASTER_PORT (default 29500 via --standalone), TORCHRUN (default "python -m torch.distributed.run"),
# PYTHON (default python; runs the check), PRECHECK=0 skips the check.
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
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
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

args=(-m longtrain.train --config-name "$recipe" "${overrides[@]}")
if [[ "${PRECHECK:-1}" != 0 ]]; then
  read -r -a python <<< "${PYTHON:-python}"
  # The same checks every rank makes at start-up, once, for the world size torchrun will give.
  WORLD_SIZE="$nproc" "${python[@]}" -m longtrain.train --precheck --config-name "$recipe" "${overrides[@]}" || exit $?
fi

read -r -a torchrun <<< "${TORCHRUN:-python -m torch.distributed.run}"
# Each rank that fails appends "<exit code><TAB><its error line>" here; the first is shown last.
error_file="$(mktemp "${TMPDIR:-/tmp}/longtrain-error.XXXXXX")"
trap 'rm -f "$error_file"' EXIT
export LONGTRAIN_ERROR_FILE="$error_file"
set -x
rc=0
"${torchrun[@]}" --standalone --nproc_per_node "$nproc" "${args[@]}" || rc=$?
{ set +x; } 2>/dev/null
if [[ $rc -ne 0 && -s "$error_file" ]]; then
  IFS=$'\t' read -r code line < "$error_file"
  echo "$line" >&2
  exit "$code"
fi
exit "$rc"
