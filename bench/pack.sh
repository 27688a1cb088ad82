#!/usr/bin/env bash
# Pack benchmark: vmblk pack against qemu-img convert -c, the same volume, the same
# compression, in turn.
#
#   peer:  qemu-img convert -f raw -O qcow2 -c [-o compression_type=zstd] VOLUME OUT
#   vmblk: vmblk pack VOLUME OUT [--compress zstd]
#
# Volume: the benchmark image (bench/build-image.sh: a GPT disk of BENCH_IMAGE_GIB,
# default 3, GiB whose ext4 root holds about BENCH_DATA_MB, default 1700, MB of real
# files) unpacked onto a sparse file in /dev/shm; outputs go to /dev/shm too, so the
# disk is not what is measured. Each tool runs BENCH_RUNS (default 5) times per
# compression; the medians are reported with the ratios vmblk/peer of time and of
# output size (lower is better), and both images are checked (`qemu-img compare`
# against the volume) once.
#
# Results worth keeping go to bench/RESULTS.md, with the commit, the machine and the
# command line.
#
# Usage: bench/pack.sh [--quick]    (--quick: 1 GiB image, 500 MB of files, 3 runs)
set -euo pipefail
cd "$(dirname "$0")/.."

GIB=${BENCH_IMAGE_GIB:-3}
DATA_MB=${BENCH_DATA_MB:-1700}
RUNS=${BENCH_RUNS:-5}
if [ "${1:-}" = "--quick" ]; then GIB=1; DATA_MB=500; RUNS=3; fi

./scripts/setup.sh >/dev/null
cargo build --release -p vmblk --locked >/dev/null
VMBLK=$PWD/target/release/vmblk

WORK=$(bench/build-image.sh "$GIB" "$DATA_MB")
SHM=$(mktemp -d /dev/shm/vmblk-pack.XXXXXX)
trap 'rm -rf "$SHM"' EXIT
VOL=$SHM/volume.raw
truncate -s "${GIB}G" "$VOL"
"$VMBLK" unpack "$WORK/plain.qcow2" "$VOL" --json >/dev/null
echo "bench: volume $(du -h --apparent-size "$VOL" | cut -f1) ($(du -h "$VOL" | cut -f1) allocated), $(nproc) CPUs" >&2

median() { sort -n | awk '{a[NR]=$1} END{ if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }
now() { date +%s.%N; }

run_peer() { # compression out
  local o=()
  [ "$1" = zstd ] && o=(-o compression_type=zstd)
  qemu-img convert -f raw -O qcow2 -c "${o[@]}" "$VOL" "$2"
}
run_vmblk() { # compression out
  "$VMBLK" pack "$VOL" "$2" --compress "$1" --json >/dev/null
}

printf '\n| compression | qemu-img convert -c (s) | vmblk pack (s) | time ratio | qemu-img output (MB) | vmblk output (MB) | size ratio |\n|---|---|---|---|---|---|---|\n'
for c in zlib zstd; do
  p=(); v=()
  for i in $(seq "$RUNS"); do
    for tool in peer vmblk; do
      out=$SHM/$tool-$c.qcow2
      rm -f "$out"
      t0=$(now)
      if [ "$tool" = peer ]; then run_peer "$c" "$out"; else run_vmblk "$c" "$out"; fi
      t1=$(now)
      dt=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b - a}')
      if [ "$tool" = peer ]; then p+=("$dt"); else v+=("$dt"); fi
      if [ "$i" = 1 ]; then
        qemu-img compare -q -f raw -F qcow2 "$VOL" "$out" \
          || { echo "bench: $tool's $c image differs from the volume" >&2; exit 1; }
      fi
    done
  done
  sp=$(stat -c %s "$SHM/peer-$c.qcow2")
  sv=$(stat -c %s "$SHM/vmblk-$c.qcow2")
  mp=$(printf '%s\n' "${p[@]}" | median)
  mv=$(printf '%s\n' "${v[@]}" | median)
  printf '| %s | %.2f | %.2f | %.2fx | %.1f | %.1f | %.3fx |\n' "$c" "$mp" "$mv" \
    "$(awk -v a="$mv" -v b="$mp" 'BEGIN{print a / b}')" \
    "$(awk -v s="$sp" 'BEGIN{print s / 1e6}')" "$(awk -v s="$sv" 'BEGIN{print s / 1e6}')" \
    "$(awk -v a="$sv" -v b="$sp" 'BEGIN{print a / b}')"
  rm -f "$SHM"/*-"$c".qcow2
done
