#!/usr/bin/env bash
# Runs every test of vmblk: formatting, lints, unit tests, and the privileged
# tests on real loop devices and real QEMU guests. Installs what it needs first.
# Must run as root (loop devices, QEMU with vhost-user); CI runs it as root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "test.sh: the suite attaches loop devices and starts guests: run it as root" >&2
  exit 1
fi

./scripts/setup.sh

export CARGO_TERM_COLOR=never
# A fresh clone gains nothing from incremental state; it only doubles the
# size of target/.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== fuzz/Cargo.lock is current"
cargo metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build binaries"
cargo build --workspace --bins --examples --locked
loops_before=$(losetup -a | wc -l)
echo "== cargo test"
# Privileged and guest tests serialise themselves with a file lock; unit tests
# run in parallel.
mkdir -p target
cargo test --workspace --locked --no-fail-fast 2>&1 | tee target/test.log
# Nothing the suite started may survive it.
if [ "$(losetup -a | wc -l)" -gt "$loops_before" ]; then
  echo "test.sh: the suite left loop devices attached:" >&2
  losetup -a >&2
  exit 1
fi
