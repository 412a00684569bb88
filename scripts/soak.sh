#!/usr/bin/env bash
# The soak check: CI's suite RUNS times in a row (default 3) on a clean clone of HEAD while one
# busy loop per core keeps the machine loaded; stops at the first failure.
#   bash scripts/soak.sh [RUNS]        logs in $SOAK_DIR (default: a new temporary folder)
set -euo pipefail
runs=${1:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${SOAK_DIR:-$(mktemp -d)}
mkdir -p "$dir"
git clone -q "$root" "$dir/clone"
echo "soak of $(git -C "$dir/clone" log -1 --format='%h %s'): $runs runs, $(nproc) busy loops; logs in $dir"
burners=()
for _ in $(seq "$(nproc)"); do yes >/dev/null & burners+=($!); done
trap 'kill "${burners[@]}" 2>/dev/null || true' EXIT
for run in $(seq "$runs"); do
    start=$(date +%s)
    status=passed
    (cd "$dir/clone" && CI=true bash .ci/run) >"$dir/run-$run.log" 2>&1 || status=FAILED
    echo "run $run: $status in $(( $(date +%s) - start )) s, load average $(cut -d' ' -f1-3 /proc/loadavg)," \
         "$(grep -E '^=+ .* in [0-9.]+s' "$dir/run-$run.log" | tail -1 | tr -d '=')"
    [ "$status" = passed ] || exit 1
done
