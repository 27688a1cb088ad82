#!/usr/bin/env bash
# Makes seed inputs for the fuzz targets in fuzz/seeds/<target>/: small real qcow2
# images (v2, v3, every cluster size, zlib, zstd, extended L2), tarballs holding them,
# and GPT disks at 512 and 4096-byte sectors. A campaign starts from these plus the
# committed corpus (see fuzz/README.md).
set -euo pipefail
cd "$(dirname "$0")"
out=seeds
rm -rf "$out"
mkdir -p "$out"/{qcow2_header,tar_open,partition_table}
t=$(mktemp -d)
trap 'rm -rf "$t"' EXIT

raw="$t/disk.raw"
truncate -s 256K "$raw"
sgdisk -o -n 1:34:200 -t 1:ef00 -n 2:201:0 "$raw" >/dev/null
printf 'vmblk seed data' | dd of="$raw" bs=1 seek=150000 conv=notrunc status=none

n=0
for opts in "compat=0.10,cluster_size=512" "cluster_size=512" "cluster_size=4096" \
            "cluster_size=65536" "cluster_size=16384,extended_l2=on" \
            "cluster_size=4096,compression_type=zstd"; do
  n=$((n + 1))
  qemu-img convert -f raw -O qcow2 -o "$opts" "$raw" "$out/qcow2_header/plain-$n.qcow2"
  qemu-img convert -c -f raw -O qcow2 -o "$opts" "$raw" "$out/qcow2_header/compressed-$n.qcow2"
done
qemu-img create -q -f qcow2 -o cluster_size=512 "$out/qcow2_header/empty.qcow2" 64K

# Tarballs: unified Incus image (metadata.yaml + rootfs.img), plain and compressed.
printf 'architecture: x86_64\ncreation_date: 1\nproperties:\n  os: seed\n' > "$t/metadata.yaml"
cp "$out/qcow2_header/compressed-3.qcow2" "$t/rootfs.img"
tar -C "$t" -cf "$out/tar_open/unified.tar" metadata.yaml rootfs.img
gzip -9 -c "$out/tar_open/unified.tar" > "$out/tar_open/unified.tar.gz"
xz -c "$out/tar_open/unified.tar" > "$out/tar_open/unified.tar.xz"
zstd -q -c "$out/tar_open/unified.tar" > "$out/tar_open/unified.tar.zst"
cp "$out/qcow2_header/plain-3.qcow2" "$out/tar_open/"

# GPT disks: 512-byte sectors, and one laid out for 4096-byte sectors.
cp "$raw" "$out/partition_table/gpt-512.raw"
truncate -s 1M "$t/big.raw"
sgdisk -o -n 1:0:+256K -n 2:0:0 "$t/big.raw" >/dev/null
cp "$t/big.raw" "$out/partition_table/gpt-512-1m.raw"
truncate -s 1M "$t/k4.raw"
l=$(losetup --show -f --sector-size 4096 "$t/k4.raw")
sgdisk -o -n 1:0:+256K -n 2:0:0 "$l" >/dev/null || true
losetup -d "$l"
cp "$t/k4.raw" "$out/partition_table/gpt-4096.raw"
ls -la "$out"/*
