#!/usr/bin/env bash
# Installs everything vmblk needs to build, test and run on a fresh Debian 12 host.
# Idempotent: packages already present are not fetched again.
set -euo pipefail

PKGS=(
  # -sys crates: libudev (udev), libblkid (blkid, via bindgen)
  pkg-config libudev-dev libblkid-dev libclang-dev clang
  # partition and filesystem tools used by tests and the demo
  gdisk fdisk dosfstools e2fsprogs mtools util-linux xfsprogs btrfs-progs
  # image tools and compressors
  qemu-utils xz-utils zstd cpio kmod
  # guests
  qemu-system-x86 ovmf busybox-static systemd-boot-efi
  # FUSE-backed volumes for hot-remove tests
  fuse3 libfuse3-dev
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Loop devices are needed by the bridge and the tests.
modprobe loop 2>/dev/null || true
[ -e /dev/loop-control ] || { echo "setup: /dev/loop-control is missing" >&2; exit 1; }
