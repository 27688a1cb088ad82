#!/usr/bin/env bash
# A fuzz campaign over every target: seeds (fuzz/seeds.sh) and the committed corpus in,
# new inputs into fuzz/corpus/<target>/, then minimized (cargo fuzz cmin); a crash is
# copied to fuzz/regressions/<target>/ and stops the campaign.
#
#   fuzz/campaign.sh [SECONDS_PER_TARGET] [TARGET...]     (default 300, every target)
#
# Runs on the machine's stable toolchain: RUSTC_BOOTSTRAP=1 lets cargo-fuzz use the
# sanitizer flags it needs. `cargo install cargo-fuzz` once.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-300}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(qcow2_header tar_open partition_table virtio_chain)
[ -d seeds ] || ./seeds.sh >/dev/null
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
max_len() {
  case $1 in
    qcow2_header) echo 131072 ;;
    tar_open) echo 65536 ;;
    partition_table) echo 1048576 ;;
    virtio_chain) echo 16384 ;;
  esac
}
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "regressions/$t"
  seeds=()
  [ -d "seeds/$t" ] && seeds=("seeds/$t")
  echo "== $t: ${secs}s"
  if ! cargo fuzz run -O "$t" "corpus/$t" "${seeds[@]}" -- \
      -max_len="$(max_len "$t")" -max_total_time="$secs" -print_final_stats=1 \
      2>&1 | tee "/tmp/fuzz-$t.log" | grep -E '^#[0-9]+ *DONE|stat::|SUMMARY|ERROR'; then
    cp artifacts/"$t"/* "regressions/$t/" 2>/dev/null || true
    echo "== $t: crashed; inputs kept in regressions/$t" >&2
    exit 1
  fi
  cargo fuzz cmin -O "$t" "corpus/$t" -- -max_len="$(max_len "$t")" >/dev/null 2>&1
  echo "== $t: $(ls "corpus/$t" | wc -l) inputs kept, $(du -sh "corpus/$t" | cut -f1)"
done
