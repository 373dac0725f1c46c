#!/usr/bin/env bash
# Builds the Debian package: release binary, man page and completions from the CLI
# definition, then cargo-deb with the metadata in Cargo.toml. Prints the .deb path.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked >&2
cargo build --release --locked >&2
mkdir -p target/assets
bin=target/release/rampart
"$bin" man | gzip -9n > target/assets/rampart.1.gz
"$bin" completions bash > target/assets/rampart.bash
"$bin" completions zsh > target/assets/_rampart
"$bin" completions fish > target/assets/rampart.fish
cargo deb --no-build --locked "$@" | tail -n 1
