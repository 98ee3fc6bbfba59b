#!/usr/bin/env bash
# CI smoke test of the asv suite: every benchmark imports and is well formed
# (asv check), then a quick single-sample run of the cheap benchmarks in the
# current environment (no virtualenv builds, no network). A couple of minutes.
#
#   bash benchmarks/ci_smoke.sh            # from the repository root
#   ASV_BENCH='dispatch|import' bash benchmarks/ci_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BENCH=${ASV_BENCH:-'Dispatch|Import|AttentionForward.time_forward'}

"$PY" -m asv --version
"$PY" -m asv machine --yes --machine ci-smoke >/dev/null
"$PY" -m asv check --python=same

# --quick: one sample per benchmark; --dry-run: do not store results;
# --show-stderr: surface import/setup errors in the CI log.
log=$(mktemp)
start=$(date +%s)
"$PY" -m asv run --python=same --quick --dry-run --show-stderr --machine ci-smoke \
    -b "$BENCH" 2>&1 | tee "$log"
echo "asv smoke run took $(( $(date +%s) - start ))s"
# asv exits 0 even when a benchmark raises; fail CI on 'failed' results.
if grep -Eq '(^|[[:space:]])failed($|[[:space:]])|Traceback' "$log"; then
    echo "ci_smoke: some benchmarks failed" >&2
    exit 1
fi
echo "ci_smoke: OK"
