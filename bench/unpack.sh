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

# The images are kept between runs (they take minutes to build): remove the folder to
# rebuild them.
WORK=/var/tmp/vmblk-bench-${GIB}g-${DATA_MB}mb
SHM=$(mktemp -d /dev/shm/vmblk-bench.XXXXXX)
LOOPS=()
cleanup() {
  for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null || true; done
  rm -rf "$SHM"
}
trap cleanup EXIT

if [ ! -f "$WORK/zstd.qcow2" ]; then
rm -rf "$WORK"; mkdir -p "$WORK"
echo "bench: building a ${GIB} GiB image with ~${DATA_MB} MB of files in $WORK" >&2
STAGE=$WORK/stage
mkdir -p "$STAGE"
# Real files: libraries, binaries and documentation from this machine, up to DATA_MB.
budget=$((DATA_MB * 1000 * 1000))
total=0
while IFS= read -r -d '' f; do
  s=$(stat -c %s "$f")
  [ $((total + s)) -gt "$budget" ] && continue
  d="$STAGE/$(dirname "${f#/}")"
  mkdir -p "$d"
  cp -p "$f" "$d/" 2>/dev/null && total=$((total + s))
  [ "$total" -ge $((budget * 99 / 100)) ] && break
done < <(find /usr/lib /usr/share /usr/bin /root/.rustup -xdev -type f -size +1k -print0 2>/dev/null)
echo "bench: staged $((total / 1000000)) MB" >&2

RAW=$WORK/image.raw
truncate -s "${GIB}G" "$RAW"
sgdisk -o -n1:2048:+100M -t1:ef00 -c1:esp -n2:0:0 -t2:8300 -c2:root "$RAW" >/dev/null
ESP_OFF=$((2048 * 512)); ESP_SIZE=$((100 << 20))
ROOT_OFF=$(( (2048 + (100 << 11)) * 512 ))
ROOT_SIZE=$(( ( $(sgdisk -i2 "$RAW" | awk '/Last sector/{print $3}') + 1 ) * 512 - ROOT_OFF ))
mkfs.vfat -C "$WORK/esp.fs" $((ESP_SIZE / 1024)) >/dev/null
mkfs.ext4 -q -F -d "$STAGE" "$WORK/root.fs" $((ROOT_SIZE / 4096 * 4))k
dd if="$WORK/esp.fs" of="$RAW" bs=1M seek=$((ESP_OFF)) oflag=seek_bytes conv=notrunc,sparse status=none
dd if="$WORK/root.fs" of="$RAW" bs=1M seek=$((ROOT_OFF)) oflag=seek_bytes conv=notrunc,sparse status=none
rm -rf "$STAGE" "$WORK/esp.fs" "$WORK/root.fs"

qemu-img convert -f raw -O qcow2 "$RAW" "$WORK/plain.qcow2"
qemu-img convert -f raw -O qcow2 -c "$RAW" "$WORK/zlib.qcow2"
qemu-img convert -f raw -O qcow2 -c -o compression_type=zstd "$RAW" "$WORK/zstd.qcow2.tmp"
mv "$WORK/zstd.qcow2.tmp" "$WORK/zstd.qcow2"
rm -f "$RAW"
fi
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
