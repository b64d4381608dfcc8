#!/usr/bin/env bash
# Installs what building Entente needs beyond the Rust toolchain.
# The `rocksdb` crate generates its bindings with bindgen, which needs libclang.
set -euo pipefail

have_libclang() {
  [ -n "${LIBCLANG_PATH:-}" ] && return 0
  ldconfig -p 2>/dev/null | grep -Eq 'libclang(-[0-9.]+)?\.so' && return 0
  ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1
}

if ! have_libclang; then
  echo "setup: libclang not found; installing libclang-dev (needed to build RocksDB bindings)" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update
  $SUDO apt-get install -y libclang-dev
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi
