#!/usr/bin/env bash
# What the benchmark's loop device gives without any vhost-user server: fio (io_uring,
# O_DIRECT) on a 4096-sector loop device over a tmpfs file, as bench/vhost.sh sets it up,
# pinned to CPU 0. 4 KiB random reads at QD32 and QD1 (QD1 twice: CPU 1 idle, then
# busy with a spinning shell, where the loop worker runs on CPU 0 without a cross-CPU
# wake-up). Prints IOPS, p50 completion latency and fio's CPU.
#
# Results worth keeping go to bench/RESULTS.md, with the commit, the machine and the
# command line.
#
# Usage: bench/loop-raw.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench: needs root (loop devices)" >&2; exit 1; }
command -v fio >/dev/null || { apt-get update -qq && apt-get install -y -qq fio >/dev/null; }

SHM=$(mktemp -d /dev/shm/vmblk-lraw.XXXXXX)
LOOP=""
SPIN=""
cleanup() {
  [ -n "$SPIN" ] && kill "$SPIN" 2>/dev/null
  [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null
  rm -rf "$SHM"
}
trap cleanup EXIT

truncate -s 1G "$SHM/loop.img"
dd if=/dev/urandom of="$SHM/loop.img" bs=1M count=1024 conv=notrunc status=none
LOOP=$(losetup -f --show --sector-size 4096 "$SHM/loop.img")

run() { # label qd
  taskset -c 0 fio --name=raw --filename="$LOOP" --direct=1 --rw=randread --bs=4k \
    --iodepth="$2" --ioengine=io_uring --runtime=5 --time_based --output-format=json |
    python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]; r = j["read"]
print("| %s | %d | %.1f | %.0f%% |" % (sys.argv[1], r["iops"],
      r["clat_ns"]["percentile"]["50.000000"] / 1000, j["usr_cpu"] + j["sys_cpu"]))' "$1"
}

printf '| 4K random read on the loop device | IOPS | p50 µs | fio CPU |\n|---|---|---|---|\n'
run "QD32" 32
run "QD1, CPU 1 idle" 1
taskset -c 1 sh -c 'while :; do :; done' &
SPIN=$!
run "QD1, CPU 1 busy" 1
