#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every test (unit and end-to-end
# against a real RabbitMQ the tests start themselves). Needs root (nftables, namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo test --all-targets --locked
