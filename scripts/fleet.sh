#!/usr/bin/env bash
# The fleet benchmark (benches/fleet.rs): N real agents against one broker node and a
# 3-node cluster, N = 100, 500, 1000 by default. Not part of CI (minutes, and most of the
# machine's memory at N = 1000).
#   RAMPART_FLEET_SIZES=100,500 RAMPART_FLEET_TOPOLOGIES=node scripts/fleet.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# A connection, a control socket and a few files per agent; the brokers inherit it (not
# more: an Erlang VM sizes its port table by it, and a million-entry table makes it slow
# to stop).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec cargo bench --locked --bench fleet
