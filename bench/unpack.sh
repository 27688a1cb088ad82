#!/usr/bin/env bash
# Unpack benchmark: vmblk against the path Incus takes today, on the same target.
#
#   peer:  qemu-img convert -f qcow2 -O raw -n -t none -W -m 16 IMAGE /dev/loopN   (4K loop)
#          + the repair step: a 512-byte loop over it, sgdisk -e, detach
#   vmblk: vmblk unpack IMAGE /dev/loopN  (copy, bridge, repair, verify)
#
# Image: a GPT disk of BENCH_IMAGE_GIB (default 3) GiB whose ext4 root holds about
# BENCH_DATA_MB (default 1700) MB of real files copied from this machine, as plain,
# zlib and zstd qcow2. Target: a 4096-sector loop device over a tmpfs file.
# Each tool runs BENCH_RUNS (default 5) times per format; the median is reported
# with the ratio vmblk/peer (lower is better), and vmblk's peak RSS.
#
# Results worth keeping go to bench/RESULTS.md, with the commit, the machine and the
# command line.
#
# Usage: bench/unpack.sh [--quick]    (--quick: 1 GiB image, 500 MB of files, 3 runs)
set -euo pipefail
cd "$(dirname "$0")/.."

GIB=${BENCH_IMAGE_GIB:-3}
DATA_MB=${BENCH_DATA_MB:-1700}
RUNS=${BENCH_RUNS:-5}
if [ "${1:-}" = "--quick" ]; then GIB=1; DATA_MB=500; RUNS=3; fi

[ "$(id -u)" = 0 ] || { echo "bench: needs root (loop devices)" >&2; exit 1; }
./scripts/setup.sh >/dev/null
cargo build --release -p vmblk --locked >/dev/null
VMBLK=$PWD/target/release/vmblk

WORK=$(bench/build-image.sh "$GIB" "$DATA_MB")
SHM=$(mktemp -d /dev/shm/vmblk-bench.XXXXXX)
LOOPS=()
cleanup() {
  for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null || true; done
  rm -rf "$SHM"
}
trap cleanup EXIT
ls -l "$WORK"/*.qcow2 >&2

VOL=$SHM/volume
VOL_BYTES=$(( (GIB + 1) << 30 ))
new_target() { # sets TGT
  rm -f "$VOL"
  truncate -s "$VOL_BYTES" "$VOL"
  TGT=$(losetup -f --show --sector-size 4096 "$VOL")
  LOOPS+=("$TGT")
}
drop_target() {
  losetup -d "$1"
  rm -f "$VOL"
}

run_peer() { # image loopdev
  qemu-img convert -f qcow2 -O raw -n -t none -W -m 16 "$1" "$2"
  local b
  b=$(losetup -f --show --sector-size 512 "$2")
  LOOPS+=("$b")
  sgdisk -e "$b" >/dev/null
  losetup -d "$b"
}
run_vmblk() { # image loopdev rssfile
  /usr/bin/time -f %M -o "$3" "$VMBLK" unpack "$1" "$2" --json >/dev/null
}

median() { sort -n | awk '{a[NR]=$1} END{ if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }
now() { date +%s.%N; }

printf '\n| image | qemu-img + sgdisk -e (s) | vmblk unpack (s) | ratio | vmblk peak RSS (MiB) |\n|---|---|---|---|---|\n'
for fmt in plain zlib zstd; do
  img=$WORK/$fmt.qcow2
  p=(); v=(); rss=0
  for _ in $(seq "$RUNS"); do
    for tool in peer vmblk; do
      new_target; l=$TGT
      t0=$(now)
      if [ "$tool" = peer ]; then run_peer "$img" "$l"; else run_vmblk "$img" "$l" "$WORK/rss"; fi
      t1=$(now)
      drop_target "$l"
      dt=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b - a}')
      if [ "$tool" = peer ]; then p+=("$dt"); else v+=("$dt"); r=$(cat "$WORK/rss"); [ "$r" -gt "$rss" ] && rss=$r; fi
    done
  done
  mp=$(printf '%s\n' "${p[@]}" | median)
  mv=$(printf '%s\n' "${v[@]}" | median)
  printf '| %s | %.2f | %.2f | %.2fx | %d |\n' "$fmt" "$mp" "$mv" "$(awk -v a="$mv" -v b="$mp" 'BEGIN{print a / b}')" $((rss / 1024))
done
