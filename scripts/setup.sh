#!/usr/bin/env bash
# Installs everything vmblk needs to build, test and run on a fresh Debian 12 host,
# then checks that every command and file the demo and the tests use is there.
#
#   scripts/setup.sh           install (when anything is missing), then check
#   scripts/setup.sh --check   only check; exit 1 naming each missing tool and its package
#
# Why one transaction, and why the check: machine images of this kind ship packages
# from bookworm-backports (qemu-utils 10.0 among them). Asking apt only for what is
# missing (qemu-system-x86 7.2) let apt resolve the version conflict by *removing*
# qemu-utils, and nothing noticed. So every package the project needs goes to apt in
# one call, already-installed ones too; a package installed at a version no
# configured source offers (a backport installed from a file) is asked for at the
# version the sources offer, so the set stays consistent; and nothing is trusted
# until every tool has been found afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(
  # -sys crates: libudev (udev), libblkid (blkid, via bindgen)
  pkg-config libudev-dev libblkid-dev libclang-dev clang
  # partition and filesystem tools used by tests and the demo
  gdisk fdisk dosfstools e2fsprogs mtools util-linux xfsprogs btrfs-progs
  # image tools and compressors; kmod for depmod on the guest kernel
  qemu-utils xz-utils zstd cpio kmod tar
  # guests
  qemu-system-x86 ovmf busybox-static systemd-boot-efi
  # FUSE-backed volumes for hot-remove tests
  fuse3 libfuse3-dev
  # a real LXD daemon (Incus's REST API and VM options) for the Incus tests
  lxd lxd-client lxd-agent dnsmasq-base
  # a throwaway one-node Ceph cluster (mon + OSD) for the RBD tests, librbd/librados
  # for the Rust bindings, and QEMU's rbd block driver (a module in qemu-block-extra)
  ceph-mon ceph-osd ceph-common librbd-dev librados-dev qemu-block-extra
)

# What the demo and the tests run or read, with the package that brings it.
# Commands are looked up on PATH; entries starting with / are files.
CHECKS=(
  "pkg-config pkg-config"
  "clang clang"
  "/usr/include/libudev.h libudev-dev"
  "/usr/include/blkid/blkid.h libblkid-dev"
  "sgdisk gdisk"
  "sfdisk fdisk"
  "mkfs.vfat dosfstools"
  "fsck.vfat dosfstools"
  "mkfs.ext4 e2fsprogs"
  "e2fsck e2fsprogs"
  "debugfs e2fsprogs"
  "/sbin/mke2fs e2fsprogs"
  "/sbin/resize2fs e2fsprogs"
  "/sbin/dumpe2fs e2fsprogs"
  "/usr/bin/resizepart util-linux"
  "ldd libc-bin"
  "mcopy mtools"
  "mmd mtools"
  "mdir mtools"
  "mtype mtools"
  "losetup util-linux"
  "blockdev util-linux"
  "mount util-linux"
  "umount util-linux"
  "mkfs.xfs xfsprogs"
  "mkfs.btrfs btrfs-progs"
  "qemu-img qemu-utils"
  "qemu-io qemu-utils"
  "qemu-storage-daemon qemu-utils"
  "xz xz-utils"
  "zstd zstd"
  "cpio cpio"
  "depmod kmod"
  "tar tar"
  "qemu-system-x86_64 qemu-system-x86"
  "/usr/share/OVMF/OVMF_CODE_4M.fd ovmf"
  "/usr/share/OVMF/OVMF_VARS_4M.fd ovmf"
  "/bin/busybox busybox-static"
  "/usr/lib/systemd/boot/efi/systemd-bootx64.efi systemd-boot-efi"
  "fusermount3 fuse3"
  "apt-get apt"
  "dpkg-deb dpkg"
  "python3 python3"
  "lxd lxd"
  "lxc lxd-client"
  "/usr/bin/lxd-agent lxd-agent"
  "dnsmasq dnsmasq-base"
  "ceph-mon ceph-mon"
  "ceph-osd ceph-osd"
  "ceph ceph-common"
  "rbd ceph-common"
  "ceph-authtool ceph-common"
  "monmaptool ceph-base"
  "/usr/include/rbd/librbd.h librbd-dev"
  "/usr/include/rados/librados.h librados-dev"
  "/usr/lib/x86_64-linux-gnu/qemu/block-rbd.so qemu-block-extra"
)

# Prints "missing: TOOL (package PKG)" for each check that fails; returns 1 if any did.
check_tools() {
  local entry tool pkg bad=0
  for entry in "${CHECKS[@]}"; do
    tool=${entry% *}
    pkg=${entry##* }
    if [[ $tool == /* ]]; then
      [ -e "$tool" ] && continue
    else
      command -v "$tool" >/dev/null 2>&1 && continue
    fi
    echo "setup: missing: $tool (package $pkg)" >&2
    bad=1
  done
  return "$bad"
}

# installed[p]: installed version of each package (absent if not installed);
# offered[p]: the versions the configured sources offer, one per line, highest first.
read_versions() {
  local p v
  installed=()
  offered=()
  while read -r p status v; do
    [ "$status" = ii ] && installed[$p]=$v
  done < <(dpkg-query -W -f='${Package} ${db:Status-Abbrev} ${Version}\n' "${PKGS[@]}" 2>/dev/null || true)
  while IFS='|' read -r p v _; do
    p=${p// /}
    v=${v// /}
    offered[$p]+="$v"$'\n'
  done < <(apt-cache madison "${PKGS[@]}" 2>/dev/null || true)
}

# The apt arguments for every package: "pkg", or "pkg=VERSION" for one installed at a
# version no source offers. Sets `foreign` to those packages and their versions.
apt_args() {
  local p have
  args=()
  foreign=()
  for p in "${PKGS[@]}"; do
    have=${installed[$p]:-}
    if [ -n "$have" ] && [ -n "${offered[$p]:-}" ] && ! grep -qxF "$have" <<<"${offered[$p]}"; then
      args+=("$p=$(head -n1 <<<"${offered[$p]}")")
      foreign+=("$p $have")
    else
      args+=("$p")
    fi
  done
}

# True when nothing needs apt: every package installed at a version the sources offer.
# (A machine with no package lists yet offers nothing: then apt runs.)
all_installed() {
  local p
  for p in "${PKGS[@]}"; do
    [ -n "${installed[$p]:-}" ] || return 1
    grep -qxF "${installed[$p]}" <<<"${offered[$p]:-}" || return 1
  done
}

declare -A installed offered

if [ "${1:-}" = "--check" ]; then
  check_tools
  exit
fi

read_versions
if ! all_installed || ! check_tools 2>/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  echo "setup: apt-get update"
  apt-get update -q >/dev/null
  read_versions
  apt_args
  for f in ${foreign[@]+"${foreign[@]}"}; do
    echo "setup: ${f% *} ${f#* } is from outside the configured sources; installing the sources' version with the rest"
  done
  echo "setup: installing ${#args[@]} packages in one transaction"
  apt-get install -y -q --no-install-recommends --allow-downgrades "${args[@]}"
fi

if ! check_tools; then
  echo "setup: the tools above are missing after installing; see apt's output" >&2
  exit 1
fi

# Foreign gRPC clients for the tests (driver/tests/foreign_clients.rs): grpcio from
# PyPI in a virtual environment under target/, reinstalled when the pins change.
VENV=target/pyvenv
REQS=driver/tests/python/requirements.txt
if ! cmp -s "$REQS" "$VENV/requirements.txt" 2>/dev/null; then
  echo "setup: Python clients into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQS"
  cp "$REQS" "$VENV/requirements.txt"
fi
"$VENV/bin/python3" -c 'import grpc, grpc_reflection, grpc_health' || {
  echo "setup: grpcio is missing from $VENV (from PyPI: $REQS)" >&2
  exit 1
}

# Loop devices are needed by the bridge and the tests.
modprobe loop 2>/dev/null || true
[ -e /dev/loop-control ] || { echo "setup: /dev/loop-control is missing" >&2; exit 1; }
echo "setup: every tool is there"
