#!/bin/sh
# /init of the vmblk test initramfs.
#
# Loads the modules listed in /etc/vmblk-modules, mounts the root partition named by
# `vmblk.root=PARTUUID=...` on the kernel command line, runs the checks and prints one
# line per check on the console:
#
#   VMBLK-BOOT n=<boot number>
#   VMBLK-CHECK name=<name> ok=<0|1> value=<value without spaces>
#   VMBLK-DONE pass=<n> fail=<m> boot=<boot number>
#
# then powers off, or reboots once when /vmblk/mode on the root fs says `reboot-once`.
# Extra checks: every /vmblk/checks.d/*.sh on the root fs is run with DISK, ROOTDEV,
# SCRATCHDEV and ROOT in its environment; exit code 0 passes, its last line is the value.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

PASS=0
FAIL=0
BOOT=0
ACTION=poweroff

check() { # name ok value...
    name=$1
    ok=$2
    shift 2
    v=$(echo "$*" | tr -s ' \t\n' ',,,' | sed 's/^,//; s/,$//')
    echo "VMBLK-CHECK name=$name ok=$ok value=${v:--}"
    if [ "$ok" = 1 ]; then PASS=$((PASS + 1)); else FAIL=$((FAIL + 1)); fi
}

bool() { if "$@"; then echo 1; else echo 0; fi; }

finish() {
    sync
    cd /
    umount /mnt/esp 2>/dev/null
    if grep -q ' /mnt/root ' /proc/mounts; then
        check root_umount "$(bool umount /mnt/root)" /mnt/root
    fi
    echo "VMBLK-DONE pass=$PASS fail=$FAIL boot=$BOOT"
    sync
    if [ "$ACTION" = reboot ]; then
        echo "VMBLK-REBOOT"
        reboot -f
    fi
    poweroff -f
    sleep 5
    echo o >/proc/sysrq-trigger
}

fatal() {
    check fatal 0 "$*"
    finish
}

for w in $(cat /proc/cmdline); do
    case "$w" in
        vmblk.root=PARTUUID=*) ROOT_UUID=${w#vmblk.root=PARTUUID=} ;;
        vmblk.esp=PARTUUID=*) ESP_UUID=${w#vmblk.esp=PARTUUID=} ;;
        vmblk.scratch=PARTUUID=*) SCRATCH_UUID=${w#vmblk.scratch=PARTUUID=} ;;
    esac
done

while read -r m; do
    insmod "/lib/modules/$m" 2>/dev/null || echo "VMBLK-LOG insmod $m failed"
done </etc/vmblk-modules

# Prints the unique partition GUID of partition $2 of disk $1, read from the GPT
# (the 6.1 kernel does not put PARTUUID in the partition's uevent).
gpt_partuuid() {
    lbs=$(cat "/sys/block/$1/queue/logical_block_size")
    sig=$(dd if="/dev/$1" bs=1 skip="$lbs" count=8 2>/dev/null)
    [ "$sig" = "EFI PART" ] || return 1
    elba=$(od -An -tu8 -j $((lbs + 72)) -N8 "/dev/$1" | tr -d ' ')
    esz=$(od -An -tu4 -j $((lbs + 84)) -N4 "/dev/$1" | tr -d ' ')
    off=$((elba * lbs + ($2 - 1) * esz + 16))
    set -- $(od -An -tx1 -j "$off" -N16 "/dev/$1")
    echo "$4$3$2$1-$6$5-$8$7-$9${10}-${11}${12}${13}${14}${15}${16}"
}

# Prints the kernel name of the partition whose GPT unique GUID is $1.
find_partuuid() {
    want=$(echo "$1" | tr 'A-F' 'a-f')
    for d in /sys/block/*; do
        disk=${d##*/}
        for p in "$d"/"$disk"*; do
            [ -f "$p/partition" ] || continue
            if [ "$(gpt_partuuid "$disk" "$(cat "$p/partition")")" = "$want" ]; then
                echo "${p##*/}"
                return 0
            fi
        done
    done
    return 1
}

[ -n "$ROOT_UUID" ] || fatal no vmblk.root=PARTUUID on the command line
ROOTDEV=
i=0
while [ $i -lt 100 ]; do
    ROOTDEV=$(find_partuuid "$ROOT_UUID") && break
    sleep 0.1
    i=$((i + 1))
done
[ -n "$ROOTDEV" ] || fatal no partition with PARTUUID $ROOT_UUID: $(cat /proc/partitions)
DISK=$(basename "$(dirname "$(readlink -f "/sys/class/block/$ROOTDEV")")")

mkdir -p /mnt/root /mnt/esp
mount -t ext4 "/dev/$ROOTDEV" /mnt/root || fatal mount of /dev/$ROOTDEV failed
ROOT=/mnt/root
BOOT=$(($(cat $ROOT/vmblk/boot-count 2>/dev/null || echo 0) + 1))
echo "$BOOT" >$ROOT/vmblk/boot-count
sync
echo "VMBLK-BOOT n=$BOOT"
if [ "$(cat $ROOT/vmblk/mode 2>/dev/null)" = reboot-once ] && [ "$BOOT" = 1 ]; then
    ACTION=reboot
fi
check root_partuuid 1 "$ROOTDEV=$ROOT_UUID"

# The disk as the guest sees it.
check disk "$(bool test -n "$DISK")" "$DISK"
check logical_block_size 1 "$(cat /sys/block/$DISK/queue/logical_block_size)"
check physical_block_size 1 "$(cat /sys/block/$DISK/queue/physical_block_size)"
check disk_bytes 1 $(($(cat /sys/block/$DISK/size) * 512))
parts=$(awk -v d="$DISK" '$4 ~ "^"d {printf "%s:%s ", $4, $3 * 1024}' /proc/partitions)
check partitions "$(bool grep -q " $ROOTDEV\$" /proc/partitions)" "$parts"

# The EFI system partition the firmware booted from.
if [ -n "$ESP_UUID" ]; then
    ESPDEV=$(find_partuuid "$ESP_UUID")
    if [ -n "$ESPDEV" ] && mount -t vfat -o ro "/dev/$ESPDEV" /mnt/esp; then
        check esp_vfat "$(bool test -f /mnt/esp/loader/loader.conf)" "$ESPDEV"
    else
        check esp_vfat 0 "${ESPDEV:-missing}"
    fi
fi

# Known files.
if [ -f $ROOT/vmblk/manifest ]; then
    while read -r sum path; do
        got=$(sha256sum "$ROOT/$path" 2>/dev/null | cut -d' ' -f1)
        check "sha256:$path" "$(bool test "$got" = "$sum")" "${got:-unreadable}"
    done <$ROOT/vmblk/manifest
else
    check manifest 0 missing
fi

# A pattern written with O_DIRECT, read back after dropping the caches.
dd if=/dev/urandom of=/tmp/pattern bs=64k count=16 2>/dev/null
want=$(sha256sum /tmp/pattern | cut -d' ' -f1)
f=$ROOT/vmblk/pattern-boot$BOOT.bin
dd if=/tmp/pattern of="$f" bs=64k oflag=direct conv=fsync 2>/dev/null
sync
echo 3 >/proc/sys/vm/drop_caches
got=$(dd if="$f" bs=64k iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
check fs_pattern "$(bool test "$got" = "$want")" "$got"

if [ -n "$SCRATCH_UUID" ]; then
    SCRATCHDEV=$(find_partuuid "$SCRATCH_UUID")
    if [ -n "$SCRATCHDEV" ]; then
        s=/dev/$SCRATCHDEV
        dd if=/tmp/pattern of=$s bs=64k oflag=direct conv=fsync,notrunc 2>/dev/null
        # A single 512-byte sector at an offset that is not 4 KiB aligned.
        head -c 512 /dev/urandom >/tmp/sector
        dd if=/tmp/sector of=$s bs=512 seek=2055 count=1 oflag=direct conv=fsync,notrunc 2>/dev/null
        echo 3 >/proc/sys/vm/drop_caches
        got=$(dd if=$s bs=64k count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
        check raw_pattern "$(bool test "$got" = "$want")" "$got"
        want1=$(sha256sum /tmp/sector | cut -d' ' -f1)
        got1=$(dd if=$s bs=512 skip=2055 count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
        check raw_512_sector "$(bool test "$got1" = "$want1")" "$got1"
    else
        check raw_pattern 0 "no scratch partition $SCRATCH_UUID"
    fi
fi

# Checks added by tests.
export DISK ROOTDEV SCRATCHDEV ROOT BOOT
for s in $ROOT/vmblk/checks.d/*.sh; do
    [ -f "$s" ] || continue
    out=$(sh "$s" 2>&1)
    rc=$?
    echo "$out" | sed 's/^/VMBLK-LOG /'
    check "extra:$(basename "$s" .sh)" "$(bool test $rc = 0)" "$(echo "$out" | tail -n 1)"
done

finish
