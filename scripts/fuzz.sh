#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer): runs every target (or those named) for
# SECONDS each and prints a table of executions. Needs the nightly toolchain; the seed
# corpus is fuzz/seeds/<target>, the working corpus fuzz/corpus/<target>, crashes land in
# fuzz/artifacts/<target> (each one becomes a regression test).
#   scripts/fuzz.sh [SECONDS] [TARGET...]
# With RUNS=N in the environment each target stops after N executions instead (SECONDS is
# then only an upper bound), e.g. the documented run: RUNS=10000000 scripts/fuzz.sh 7200
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz.sh: needs the nightly toolchain (cargo +nightly); this machine has none" >&2
    exit 1
fi
command -v cargo-fuzz >/dev/null || cargo +nightly install cargo-fuzz --locked >&2
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(decode render patch_plan nfnl_batch router_plan)
printf '%-12s %14s %10s %8s %8s\n' target executions exec/s seconds result
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    log=$(mktemp)
    start=$(date +%s)
    if cargo +nightly fuzz run --fuzz-dir fuzz "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$secs" ${RUNS:+-runs="$RUNS"} -print_final_stats=1 >"$log" 2>&1; then
        result=ok
    else
        result=CRASH
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    took=$(( $(date +%s) - start ))
    rate=$(( ${runs:-0} / (took > 0 ? took : 1) ))
    printf '%-12s %14s %10s %8s %8s\n' "$t" "${runs:-?}" "$rate" "$took" "$result"
    [ "$result" = ok ] || { tail -n 30 "$log" >&2; }
    rm -f "$log"
done
