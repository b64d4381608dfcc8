#!/usr/bin/env bash
# Runs the whole test suite. The target dir lives outside the clone so that
# repeat runs (and CI) build incrementally.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/entente-target}"
exec cargo test --workspace --locked "$@"
