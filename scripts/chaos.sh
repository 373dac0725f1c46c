#!/usr/bin/env bash
# The fault storms, long mode, then a table of what they saw:
# - storms::  100 kill -9 of the agent at random moments of a patch stream
#   (RAMPART_CHAOS_AGENT_KILLS), 20 broker restarts under a patch stream
#   (RAMPART_CHAOS_BROKER_RESTARTS);
# - faults::  a dead node followed at once, nacked acks, a missing dead-letter queue, a
#   frozen broker, SIGSTOP, a partition, a full state disk, the 3-node cluster with the
#   session's node killed RAMPART_CHAOS_KILLS times (default 5);
# - ops::     a broker memory alarm held RAMPART_CHAOS_ALARM_SECS (60) under the watchdog.
# CI runs the same tests in their short mode (3 agent kills, 2 restarts, 2 node kills, a
# 7 s alarm) as part of scripts/test.sh. RAMPART_CHAOS_SEED repeats a storm's kill moments.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export RAMPART_CHAOS_KILLS=${RAMPART_CHAOS_KILLS:-5}
export RAMPART_CHAOS_AGENT_KILLS=${RAMPART_CHAOS_AGENT_KILLS:-100}
export RAMPART_CHAOS_BROKER_RESTARTS=${RAMPART_CHAOS_BROKER_RESTARTS:-20}
export RAMPART_CHAOS_ALARM_SECS=${RAMPART_CHAOS_ALARM_SECS:-60}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# One filter per run: the test harness takes a single one.
for filter in storms:: faults:: ops::broker_memory_alarm; do
    cargo test --test e2e --locked -- "$filter" 2>&1 | tee -a "$log" || status=1
done
echo
echo "== chaos (long mode) =="
printf '%-34s %6s %8s %6s %11s %7s %11s\n' fault sent applied stale duplicates faults mismatches
sed -n 's/^storm-agent: sent \([0-9]*\) applied \([0-9]*\) stale \([0-9]*\) duplicates \([0-9]*\) kills \([0-9]*\) mismatches \([0-9]*\)$/\1 \2 \3 \4 \5 \6/p' "$log" |
    while read -r a b c d e f; do printf '%-34s %6s %8s %6s %11s %7s %11s\n' "agent kill -9 (patch stream)" "$a" "$b" "$c" "$d" "$e" "$f"; done
sed -n 's/^storm-broker: sent \([0-9]*\) applied \([0-9]*\) stale \([0-9]*\) duplicates \([0-9]*\) restarts \([0-9]*\) mismatches \([0-9]*\)$/\1 \2 \3 \4 \5 \6/p' "$log" |
    while read -r a b c d e f; do printf '%-34s %6s %8s %6s %11s %7s %11s\n' "broker restart (patch stream)" "$a" "$b" "$c" "$d" "$e" "$f"; done
sed -n 's/^cluster: \([0-9]*\) commands, \([0-9]*\) answered more than once (duplicates), \([0-9]*\) kills$/\1 \1 0 \2 \3 -/p' "$log" |
    while read -r a b c d e f; do printf '%-34s %6s %8s %6s %11s %7s %11s\n' "cluster node kill -9 (pings)" "$a" "$b" "$c" "$d" "$e" "$f"; done
echo
grep -E '^storm-(agent|broker): (restart|broker up)' "$log" || true
sed -n 's/^cluster: node kill to the next processed command: /node kill -> next command: /p' "$log"
sed -n 's/^failover: node kill to the next session: /relay node kill -> next session: /p' "$log"
sed -n 's/^partition noticed after /partition noticed after /p' "$log"
grep -E '^storm seed' "$log" || true
grep -E '^test result' "$log" || true
exit $status
