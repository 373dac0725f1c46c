#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every test (unit and end-to-end
# against a real RabbitMQ the tests start themselves, then the package tests). Needs root
# (nftables, namespaces, dpkg).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo test --all-targets --locked
# Packaging: build the .deb, check its files and modes, install, upgrade, remove, purge.
scripts/test-package.sh
