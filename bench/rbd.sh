#!/usr/bin/env bash
# RBD benchmarks against the peers users would pick today, on a throwaway one-node Ceph
# cluster (one mon, one OSD with BlueStore on a sparse file; what the tests start):
#
#  export: `vmblk export rbd:...` against `qemu-storage-daemon --blockdev driver=rbd`
#          on the same image, and `vmblk export null:1G` against QSD's `null-co`
#          (read-zeroes=on), with libblkio (virtio-blk-vhost-user, queue size 1024) as
#          the client; server pinned to CPU 0, client to CPU 1 (the OSD runs where it
#          can). Workloads: 4 KiB random read and write at QD1 and QD32, 128 KiB
#          sequential read and write at QD8. Each point is the median of BENCH_RUNS
#          (default 3) runs of BENCH_SECS (default 5) seconds, interleaved across servers.
#          Both servers use librbd's defaults (its writeback cache on). Reported as
#          ratios vmblk/QSD: IOPS, p50 latency, IOPS per server CPU-second.
#  unpack: `vmblk unpack IMAGE rbd:... --size S` against `rbd create` + `qemu-img
#          convert -n -O raw IMAGE rbd:...`, onto a new image each run, for the plain,
#          zlib and zstd qcow2 of bench/build-image.sh (BENCH_IMAGE_GIB, default 1, with
#          BENCH_DATA_MB, default 500, of real files). Median of BENCH_RUNS runs.
#
# Results: bench/RESULTS.md.
#
# Usage: bench/rbd.sh [--quick]   (--quick: 1 run of 2 s)
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${BENCH_RUNS:-3}
SECS=${BENCH_SECS:-5}
GIB=${BENCH_IMAGE_GIB:-1}
DATA_MB=${BENCH_DATA_MB:-500}
if [ "${1:-}" = "--quick" ]; then RUNS=1; SECS=2; fi

[ "$(id -u)" = 0 ] || { echo "bench: needs root (Ceph daemons, vhost-user)" >&2; exit 1; }
./scripts/setup.sh >/dev/null
cargo build --release --locked -p vmblk -p vhost-blk -p integration-tests --bins \
  --example blkio_bench --example ceph_cluster >/dev/null 2>&1
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
VMBLK=$TARGET/release/vmblk
CLIENT=$TARGET/release/examples/blkio_bench
WORK=$(bench/build-image.sh "$GIB" "$DATA_MB")

SHM=$(mktemp -d /dev/shm/vmblk-rbdbench.XXXXXX)
SERVER=""
CEPH_PID=""
cleanup() {
  [ -f "$SHM/server.pid" ] && kill "$(cat "$SHM/server.pid")" 2>/dev/null
  [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null
  # Closing its stdin stops the cluster (OSD, then mon, by PID).
  if [ -n "$CEPH_PID" ]; then eval "exec ${CEPH[1]}>&-" 2>/dev/null || true; wait "$CEPH_PID" 2>/dev/null || true; fi
  rm -rf "$SHM"
}
trap cleanup EXIT

coproc CEPH { exec "$TARGET/release/examples/ceph_cluster"; }
while read -r line <&"${CEPH[0]}"; do
  case $line in
    CEPH_*=*) export "${line?}" ;;
    READY) break ;;
  esac
done
[ -n "${CEPH_CONF:-}" ] || { echo "bench: the Ceph cluster did not start" >&2; exit 1; }
RBD=(rbd -c "$CEPH_CONF" --id "$CEPH_ID" --keyring "$CEPH_KEYRING")
spec() { echo "rbd:$CEPH_POOL/$1:conf=$CEPH_CONF:id=$CEPH_ID:keyring=$CEPH_KEYRING"; }

# The export image: 1 GiB of random data (reads of a thin image's holes never reach an
# OSD object).
"${RBD[@]}" create --size 1G "$CEPH_POOL/bench"
head -c 1G /dev/urandom >"$SHM/random.raw"
qemu-img convert -n -f raw -O raw "$SHM/random.raw" "$(spec bench)"
rm -f "$SHM/random.raw"

SOCK=$SHM/vhost.sock
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

start_server() { # tool
  rm -f "$SOCK"
  local qsd_disk=""
  case $1 in
    vmblk-rbd) taskset -c 0 "$VMBLK" export "$(spec bench)" --socket "$SOCK" \
                 --logical-block-size 512 --queue-size 1024 2>"$SHM/server.log" & ;;
    vmblk-null) taskset -c 0 "$VMBLK" export null:1G --socket "$SOCK" \
                 --logical-block-size 512 --queue-size 1024 2>"$SHM/server.log" & ;;
    qsd-rbd) qsd_disk="driver=rbd,node-name=disk,pool=$CEPH_POOL,image=bench,conf=$CEPH_CONF,user=$CEPH_ID" ;;
    qsd-null) qsd_disk="driver=null-co,node-name=disk,size=1073741824,read-zeroes=on" ;;
  esac
  if [ -n "$qsd_disk" ]; then
    taskset -c 0 qemu-storage-daemon --blockdev "$qsd_disk" \
      --export "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path=$SOCK,writable=on,logical-block-size=512,num-queues=1" \
      2>"$SHM/server.log" &
  fi
  SERVER=$!
  # run_one runs in a subshell: the parent's cleanup finds the server through this file.
  echo "$SERVER" >"$SHM/server.pid"
  for _ in $(seq 200); do [ -S "$SOCK" ] && return 0; sleep 0.05; done
  echo "bench: $1 did not create its socket:" >&2; cat "$SHM/server.log" >&2; exit 1
}
stop_server() {
  kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=""; rm -f "$SHM/server.pid"
}

# run tool mode bs qd -> "iops p50 iops_per_cpu_s"
run_one() {
  start_server "$1"
  local t0 t1 out
  t0=$(cpu_ticks "$SERVER")
  if ! out=$(taskset -c 1 "$CLIENT" "$SOCK" "$2" "$3" "$4" "$SECS" 2>"$SHM/client.log"); then
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

median() { sort -g | awk '{a[NR]=$1} END{ if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }

printf '| volume | workload | vmblk IOPS | QSD IOPS | IOPS ratio | vmblk p50 µs | QSD p50 µs | p50 ratio | IOPS/CPU-s ratio |\n|---|---|---|---|---|---|---|---|---|\n'
for kind in ${BENCH_VOLUMES:-rbd null}; do
  for w in "randread 4096 1" "randread 4096 32" "randwrite 4096 1" "randwrite 4096 32" \
           "seqread 131072 8" "seqwrite 131072 8"; do
    set -- $w
    declare -A is=() ps=() es=()
    for _ in $(seq "$RUNS"); do
      for tool in "vmblk-$kind" "qsd-$kind"; do
        read -r a b c < <(run_one "$tool" "$1" "$2" "$3")
        is[$tool]+="$a "; ps[$tool]+="$b "; es[$tool]+="$c "
        [ -n "${BENCH_VERBOSE:-}" ] && echo "  $kind $1 $2 QD$3 $tool: iops $a p50 $b iops/cpu-s $c" >&2
      done
    done
    vi=$(printf '%s\n' ${is[vmblk-$kind]} | median); qi=$(printf '%s\n' ${is[qsd-$kind]} | median)
    vp=$(printf '%s\n' ${ps[vmblk-$kind]} | median); qp=$(printf '%s\n' ${ps[qsd-$kind]} | median)
    ve=$(printf '%s\n' ${es[vmblk-$kind]} | median); qe=$(printf '%s\n' ${es[qsd-$kind]} | median)
    awk -v k="$kind" -v w="$1 $(( $2 / 1024 ))K QD$3" -v vi="$vi" -v qi="$qi" -v vp="$vp" \
        -v qp="$qp" -v ve="$ve" -v qe="$qe" \
      'BEGIN{printf "| %s | %s | %.0f | %.0f | %.2fx | %d | %d | %.2fx | %.2fx |\n", k, w, vi, qi, vi/qi, vp, qp, (qp>0?vp/qp:0), ve/qe}'
  done
done

now() { date +%s.%N; }
IMG_BYTES=$(( (GIB + 1) << 30 ))
printf '\n| image | rbd create + qemu-img convert -n (s) | vmblk unpack (s) | ratio |\n|---|---|---|---|\n'
for fmt in plain zlib zstd; do
  img=$WORK/$fmt.qcow2
  p=(); v=()
  for _ in $(seq "$RUNS"); do
    for tool in peer vmblk; do
      "${RBD[@]}" rm "$CEPH_POOL/unpack" >/dev/null 2>&1 || true
      t0=$(now)
      if [ "$tool" = peer ]; then
        "${RBD[@]}" create --size "${IMG_BYTES}B" "$CEPH_POOL/unpack"
        qemu-img convert -f qcow2 -O raw -n "$img" "$(spec unpack)"
      else
        "$VMBLK" unpack "$img" "$(spec unpack)" --size "$IMG_BYTES" --json >/dev/null
      fi
      t1=$(now)
      dt=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b - a}')
      if [ "$tool" = peer ]; then p+=("$dt"); else v+=("$dt"); fi
    done
  done
  mp=$(printf '%s\n' "${p[@]}" | median)
  mv=$(printf '%s\n' "${v[@]}" | median)
  printf '| %s | %.2f | %.2f | %.2fx |\n' "$fmt" "$mp" "$mv" "$(awk -v a="$mv" -v b="$mp" 'BEGIN{print a / b}')"
done
"${RBD[@]}" rm "$CEPH_POOL/unpack" >/dev/null 2>&1 || true
