#!/usr/bin/env bash
# The fault storms, long mode: every faults:: test (a dead node followed at once, nacked
# acks, a missing dead-letter queue, a frozen broker, SIGSTOP, a partition, a full state
# disk, the 3-node cluster with the session's node killed RAMPART_CHAOS_KILLS times,
# default 5) and the agent kill -9 test, then a table of what the cluster run saw.
# CI runs the same tests in their short mode (2 node kills) as part of scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export RAMPART_CHAOS_KILLS=${RAMPART_CHAOS_KILLS:-5}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --test e2e --locked -- faults:: 2>&1 | tee "$log" || status=1
cargo test --test e2e --locked -- firewall::kill9 2>&1 | tee -a "$log" || status=1
echo
echo "== chaos (long mode) =="
sed -n 's/^cluster: \([0-9]*\) commands, \([0-9]*\) answered more than once (duplicates), \([0-9]*\) kills$/commands sent: \1  duplicates: \2  node kills: \3/p' "$log"
sed -n 's/^cluster: node kill to the next processed command: /node kill -> next command: /p' "$log"
sed -n 's/^failover: node kill to the next session: /relay node kill -> next session: /p' "$log"
sed -n 's/^partition noticed after /partition noticed after /p' "$log"
grep -E '^test result' "$log" || true
exit $status
