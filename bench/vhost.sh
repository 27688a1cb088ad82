#!/usr/bin/env bash
# vhost-user-blk export benchmark: `vmblk export` against qemu-storage-daemon serving
# the same backing, in the same run, with libblkio (virtio-blk-vhost-user, queue size
# 1024) as the client. Server pinned to CPU 0, client to CPU 1 (unpinned runs vary
# several-fold on 2 cores). Each point is the median of BENCH_RUNS (default 3) runs of
# BENCH_SECS (default 5) seconds.
#
# Backings: a file on tmpfs; a 4096-sector loop device over a tmpfs file, exported with
# 512-byte guest sectors (the 4K NVMe case). Workloads: 4 KiB random read at QD1 and
# QD32, 128 KiB sequential read and write at QD8. Reported as ratios vmblk/QSD: IOPS,
# p50 latency, and IOPS per server CPU-second. QSD runs in each I/O mode a user would
# pick for the backing (tmpfs: aio=threads and aio=io_uring, buffered; loop device:
# aio=native and aio=io_uring with O_DIRECT), and every ratio is against the best QSD
# figure of those modes (highest IOPS, lowest p50, highest IOPS per CPU-second). At QD1 vmblk also runs without busy-poll
# (`--poll-us 0`, the "no poll" rows) and spinning through waits up to 50 µs
# (`--poll-us 100`, the "poll 100 µs" rows): polling trades CPU for latency.
#
# Runs of one point are interleaved across the servers. BENCH_BACKINGS="loop" (or
# "tmpfs") measures one backing only; BENCH_VERBOSE=1 prints every run on stderr.
#
# Results worth keeping go to bench/RESULTS.md, with the commit, the machine and the
# command line.
#
# Usage: bench/vhost.sh [--quick]   (--quick: 1 run of 2 s)
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${BENCH_RUNS:-3}
SECS=${BENCH_SECS:-5}
if [ "${1:-}" = "--quick" ]; then RUNS=1; SECS=2; fi

[ "$(id -u)" = 0 ] || { echo "bench: needs root (loop devices, vhost-user)" >&2; exit 1; }
./scripts/setup.sh >/dev/null
cargo build --release --locked -p vmblk -p vhost-blk --bins --example blkio_bench >/dev/null 2>&1
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
VMBLK=$TARGET/release/vmblk
CLIENT=$TARGET/release/examples/blkio_bench

SHM=$(mktemp -d /dev/shm/vmblk-vbench.XXXXXX)
LOOP=""
SERVER=""
cleanup() {
  [ -f "$SHM/server.pid" ] && kill "$(cat "$SHM/server.pid")" 2>/dev/null
  [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null
  [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null
  rm -rf "$SHM"
}
trap cleanup EXIT

truncate -s 1G "$SHM/file.img"
dd if=/dev/urandom of="$SHM/file.img" bs=1M count=1024 conv=notrunc status=none
cp "$SHM/file.img" "$SHM/loop.img"
LOOP=$(losetup -f --show --sector-size 4096 "$SHM/loop.img")
SOCK=$SHM/vhost.sock

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

start_server() { # tool backing-kind path
  rm -f "$SOCK"
  if [ "${1%%-*}" = vmblk ]; then
    local poll=()
    [ "$1" = vmblk-nopoll ] && poll=(--poll-us 0)
    [ "$1" = vmblk-poll100 ] && poll=(--poll-us 100)
    taskset -c 0 "$VMBLK" export "$3" --socket "$SOCK" --logical-block-size 512 \
      --queue-size 1024 "${poll[@]}" 2>"$SHM/server.log" &
  else
    local drv=file direct=off aio=${1#qsd-}
    if [ "$2" = loop ]; then drv=host_device; direct=on; fi
    taskset -c 0 qemu-storage-daemon \
      --blockdev "driver=$drv,node-name=disk,filename=$3,cache.direct=$direct,aio=$aio" \
      --export "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path=$SOCK,writable=on,logical-block-size=512,num-queues=1" \
      2>"$SHM/server.log" &
  fi
  SERVER=$!
  # run_one runs in a subshell: the parent's cleanup finds the server through this file.
  echo "$SERVER" >"$SHM/server.pid"
  for _ in $(seq 100); do [ -S "$SOCK" ] && return 0; sleep 0.05; done
  echo "bench: $1 did not create its socket:" >&2; cat "$SHM/server.log" >&2; exit 1
}
stop_server() {
  kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=""; rm -f "$SHM/server.pid"
}

# run tool kind path mode bs qd -> "iops p50 iops_per_cpu_s"
run_one() {
  start_server "$1" "$2" "$3"
  local t0 t1 out
  t0=$(cpu_ticks "$SERVER")
  if ! out=$(taskset -c 1 "$CLIENT" "$SOCK" "$4" "$5" "$6" "$SECS" 2>"$SHM/client.log"); then
    echo "bench: the client failed against $1: $(cat "$SHM/client.log")" >&2
    tail -5 "$SHM/server.log" >&2
    stop_server
    exit 1
  fi
  t1=$(cpu_ticks "$SERVER")
  stop_server
  python3 -c '
import json, os, sys
r = json.loads(sys.argv[1]); ticks = (int(sys.argv[2]) - int(sys.argv[3])) / os.sysconf("SC_CLK_TCK")
print(r["iops"], r["p50_us"], r["iops"] * float(sys.argv[4]) / max(ticks, 1e-3))' "$out" "$t1" "$t0" "$SECS"
}

# best max|min values...: the best of a QSD metric over its modes.
best() {
  local how=$1; shift
  printf '%s\n' "$@" | sort -g | { if [ "$how" = max ]; then tail -1; else head -1; fi; }
}

# row backing label tool: one table row, the tool against the best QSD figures.
row() {
  local qi qp qe m
  qi=$(best max $(for m in "${qsd_modes[@]}"; do echo "${iops[qsd-$m]}"; done))
  qp=$(best min $(for m in "${qsd_modes[@]}"; do echo "${p50[qsd-$m]}"; done))
  qe=$(best max $(for m in "${qsd_modes[@]}"; do echo "${eff[qsd-$m]}"; done))
  local modes=""
  for m in "${qsd_modes[@]}"; do modes+="$m $(printf '%.0f' "${iops[qsd-$m]}"), "; done
  awk -v k="$1" -v w="$2" -v vi="${iops[$3]}" -v qi="$qi" -v m="${modes%, }" \
      -v vp="${p50[$3]}" -v qp="$qp" -v ve="${eff[$3]}" -v qe="$qe" \
    'BEGIN{printf "| %s | %s | %.0f | %.0f (%s) | %.2fx | %d | %d | %.2fx | %.2fx |\n", k, w, vi, qi, m, vi/qi, vp, qp, (qp>0?vp/qp:0), ve/qe}'
}

median() { sort -g | awk '{a[NR]=$1} END{ if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }

printf '| backing | workload | vmblk IOPS | best QSD IOPS (each mode) | IOPS ratio | vmblk p50 µs | best QSD p50 µs | p50 ratio | IOPS/CPU-s ratio |\n|---|---|---|---|---|---|---|---|---|\n'
for kind in ${BENCH_BACKINGS:-tmpfs loop}; do
  path=$SHM/file.img; qsd_modes=(threads io_uring)
  if [ "$kind" = loop ]; then path=$LOOP; qsd_modes=(native io_uring); fi
  for w in "randread 4096 1" "randread 4096 32" "seqread 131072 8" "seqwrite 131072 8"; do
    set -- $w
    declare -A iops=() p50=() eff=()
    tools=(vmblk "${qsd_modes[@]/#/qsd-}")
    [ "$3" = 1 ] && tools+=(vmblk-nopoll vmblk-poll100)
    # Runs interleaved (every tool once, then again), so a drift of the machine during
    # the point weighs on every tool alike.
    declare -A is=() ps=() es=()
    for _ in $(seq "$RUNS"); do
      for tool in "${tools[@]}"; do
        read -r a b c < <(run_one "$tool" "$kind" "$path" "$1" "$2" "$3")
        is[$tool]+="$a "; ps[$tool]+="$b "; es[$tool]+="$c "
        [ -n "${BENCH_VERBOSE:-}" ] && echo "  $kind $1 $2 QD$3 $tool: iops $a p50 $b iops/cpu-s $c" >&2
      done
    done
    for tool in "${tools[@]}"; do
      iops[$tool]=$(printf '%s\n' ${is[$tool]} | median)
      p50[$tool]=$(printf '%s\n' ${ps[$tool]} | median)
      eff[$tool]=$(printf '%s\n' ${es[$tool]} | median)
    done
    label="$1 $(( $2 / 1024 ))K QD$3"
    row "$kind" "$label" vmblk
    if [ "$3" = 1 ]; then
      row "$kind" "$label, no poll" vmblk-nopoll
      row "$kind" "$label, poll 100 µs" vmblk-poll100
    fi
  done
done
