#!/usr/bin/env bash
# Builds (once; kept between runs) the benchmark images: a GPT disk of GIB GiB whose ext4
# root holds about DATA_MB MB of real files copied from this machine, as plain, zlib and
# zstd qcow2, in /var/tmp/vmblk-bench-<GIB>g-<DATA_MB>mb. Prints that directory.
#
# Usage: bench/build-image.sh GIB DATA_MB
set -euo pipefail
GIB=$1
DATA_MB=$2
# The images are kept between runs (they take minutes to build): remove the folder to
# rebuild them.
WORK=/var/tmp/vmblk-bench-${GIB}g-${DATA_MB}mb
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
echo "$WORK"
