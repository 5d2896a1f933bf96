#!/usr/bin/env bash
# dshal on an Ascend 910B host, in one go: install with the npu extra, `dshal info`, the
# ci-tier conformance on the NPU, `dshal run` (tiny model in bf16) in int8 (W8A8) and in high precision.
# Run from the repository root, CANN installed:
#   plugins/ascend/tools/npu_host_check.sh [OUT_DIR]        (default OUT_DIR: ascend-check)
# DRY_RUN=1 writes the configs and prints every command without running anything (tested in CI).
# ENV_ONLY=1 sources CANN's set_env.sh (ASCEND_SET_ENV, default below), prints the library and
# Python paths it set, and stops: checks the environment step alone (tested in CI with a stub).
# Each stage's output goes to OUT_DIR/<stage>.log; the script stops at the first failure.
set -euo pipefail

OUT="${1:-ascend-check}"
DRY_RUN="${DRY_RUN:-0}"
ENV_ONLY="${ENV_ONLY:-0}"
SET_ENV="${ASCEND_SET_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"

stage() {  # stage NAME CMD... : print, then run with output to OUT/NAME.log (not in a dry run)
    local name="$1"; shift
    echo "+ [$name] $*"
    if [ "$DRY_RUN" != 1 ]; then
        "$@" > "$OUT/$name.log" 2>&1 || { echo "stage $name failed: see $OUT/$name.log"; tail -20 "$OUT/$name.log"; exit 1; }
    fi
}

if [ "$DRY_RUN" != 1 ] || [ "$ENV_ONLY" = 1 ]; then
    # CANN's environment: libascendcl / libhccl on the library path. set_env.sh appends to
    # PYTHONPATH / LD_LIBRARY_PATH whether set or not ("unbound variable" under set -u).
    set +u
    # shellcheck disable=SC1090
    source "$SET_ENV"
    set -u
fi
if [ "$ENV_ONLY" = 1 ]; then
    echo "env: sourced $SET_ENV"
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    echo "PYTHONPATH=${PYTHONPATH:-}"
    exit 0
fi

cat > "$OUT/int8.yaml" <<'YAML'
backend: ascend
fallback: warn
precision:
  gemm: int8
YAML
cat > "$OUT/high.yaml" <<'YAML'
backend: ascend
fallback: warn
precision:
  gemm: high
YAML

stage install "$PYTHON" -m pip install -e . -e ./conformance -e "./plugins/ascend[npu]"
stage info dshal info --backend ascend   # exit 1, with the reason, unless ascend is available
stage conformance dshal conformance --backend ascend --tier ci --report-dir "$OUT/reports"
stage run-int8 dshal run --config "$OUT/int8.yaml" --dtype bfloat16 --prompt-len 16 --new-tokens 8
stage run-high dshal run --config "$OUT/high.yaml" --dtype bfloat16 --prompt-len 16 --new-tokens 8
if [ "$DRY_RUN" = 1 ]; then
  echo "done (dry run): configs in $OUT; nothing was installed or run"
else
  echo "done: logs, configs and reports/ascend.json in $OUT"
fi
