#!/usr/bin/env bash
# The main job on an embedded default: a simulated 4K NVMe drive (a 4096-byte-sector
# loop device), a sample VM image built for 512-byte sectors, `vmblk unpack` onto it
# (copy, bridge, GPT repair, verify), `vmblk export` over vhost-user-blk, and a UEFI
# guest that boots from it. Installs what it needs first; run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "demo.sh: needs root (loop devices, QEMU with vhost-user)" >&2
  exit 1
fi
./scripts/setup.sh
cargo build --locked -p vmblk -p integration-tests --bins
exec target/debug/vmblk-demo
