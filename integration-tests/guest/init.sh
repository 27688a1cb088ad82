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
#
# Workload (after the checks, before powering off): the commands in /vmblk/workload on
# the root fs, one a line, then, when the guest has a second UART (the harness's control
# channel, /dev/ttyS1), commands read from it as `<id> <command> <args>`. Each prints
#
#   VMBLK-CMD id=<id> start <command...> t=<uptime>
#   VMBLK-CMD id=<id> rc=<exit code> t=<uptime>
#
# Commands (DEV is a kernel name like vdb, or `data`/`data2` for the first/second disk
# that is not the boot disk, or `scratch`):
#   writer NAME DEV SEED FROM COUNT [PASSES]  background: writes 64 KiB blocks FROM..
#        FROM+COUNT-1 with O_DIRECT+fsync, pass p with seed SEED+p (PASSES 0: until
#        stopped); block b of seed s holds `vmblk-io seed=s block=b\n` repeated. Records
#        each block's outcome in /vmblk/io/NAME.rec on the root fs (kept across reboots):
#        `b x` before the write, `b s` once it succeeded.
#        Prints `VMBLK-IO writer=NAME ...` every 16 blocks, on every error, and at the end.
#   scanner NAME DEV   background: reads the first 1 MiB with O_DIRECT every 0.2 s, as
#        lvm2-monitor scans devices; prints `VMBLK-IO scanner=NAME reads= errors= state=`
#        on every change of state and every 50 reads.
#   stop NAME [SECS]   SIGTERM to the job's process group, SIGKILL after 2 s, waits at
#        most SECS (10) for every process of it to end.
#   wait NAME [SECS]   waits at most SECS (600) for the job to end.
#   verify NAME DEV    reads back every block whose last write by NAME succeeded and
#        compares it with the pattern; prints `VMBLK-IO verify=NAME blocks= bad=
#        skipped= sha256=<sha256 of the per-block sha256 lines, in block order>` and a
#        check `verify:NAME` (passed when no block differs; blocks whose last write failed
#        or was cut short are skipped).
#   probe DEV          one 4 KiB O_DIRECT read; prints `VMBLK-IO probe dev= ok= t0= t1=`.
#   size DEV           prints `VMBLK-IO size dev= sectors=` (/sys/block/DEV/size: what the
#        guest's driver sees now, grown online without a reboot).
#   gpt-grow DEV       `sgdisk -e` on the disk (after an online grow: the backup GPT to
#        the new end, as a guest's own tools do it); prints `VMBLK-IO gpt-grow dev= rc=`.
#   fs-grow DEV        after `gpt-grow`: an ext4 filesystem made on the scratch partition
#        (the last one), the partition grown to the disk's end (sgdisk, same start, type,
#        name and GUID; resizepart tells the kernel), the filesystem grown (resize2fs);
#        prints `VMBLK-IO fs-grow dev= rc= blocks_before= blocks_after=` (ext4 blocks).
#   sleep SECS | poweroff | reboot
# poweroff/reboot (or the end of the commands) shut the jobs down as an init system
# does: `VMBLK-SHUTDOWN begin`, SIGTERM to every job's process group, SIGKILL after 2 s,
# wait (at most 90 s) until none of their processes is left, `VMBLK-SHUTDOWN
# jobs-stopped left=<n>`, then the usual finish and `poweroff -f` / `reboot -f`.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
BS=65536
SHUTDOWN_WAIT=90

now() { cut -d' ' -f1 /proc/uptime; }

# Block $2 of seed $1, 64 KiB.
pattern() { yes "vmblk-io seed=$1 block=$2" | head -c $BS; }

job_writer() { # name dev seed from count [passes]
    name=$1 dev=$2 seed=$3 from=$4 count=$5 passes=${6:-1}
    rec=$IODIR/$name.rec
    trap 'echo "VMBLK-IO writer=$name stopped ok=$ok err=$err t=$(now)"; exit 0' TERM
    p=0 ok=0 err=0
    while [ "$passes" = 0 ] || [ $p -lt "$passes" ]; do
        s=$((seed + p))
        i=$from
        while [ $i -lt $((from + count)) ]; do
            # Unknown until the write is known to have completed (a job stopped in the
            # middle of a write leaves the block unknown).
            echo "$i x" >>"$rec"
            if pattern $s $i | dd of=/dev/$dev bs=$BS seek=$i count=1 iflag=fullblock \
                oflag=direct conv=notrunc,fsync 2>/dev/null; then
                echo "$i $s" >>"$rec"
                ok=$((ok + 1))
                [ $((ok % 16)) = 0 ] && echo "VMBLK-IO writer=$name pass=$p block=$i ok=$ok err=$err t=$(now)"
            else
                err=$((err + 1))
                echo "VMBLK-IO writer=$name pass=$p block=$i write-error ok=$ok err=$err t=$(now)"
            fi
            i=$((i + 1))
        done
        p=$((p + 1))
    done
    sync
    echo "VMBLK-IO writer=$name done ok=$ok err=$err t=$(now)"
}

job_scanner() { # name dev
    name=$1 dev=$2 n=0 e=0 state=start
    while :; do
        if dd if=/dev/$dev of=/dev/null bs=$BS count=16 iflag=direct 2>/dev/null; then
            st=ok
        else
            st=error
            e=$((e + 1))
        fi
        n=$((n + 1))
        if [ $st != $state ] || [ $((n % 50)) = 0 ]; then
            echo "VMBLK-IO scanner=$name reads=$n errors=$e state=$st t=$(now)"
            state=$st
        fi
        sleep 0.2
    done
}

job_verify() { # name dev
    name=$1 dev=$2
    [ -f "$IODIR/$name.rec" ] || { echo "VMBLK-IO verify=$name no-record"; return 1; }
    awk '{ last[$1] = $2 } END { for (b in last) print b, last[b] }' "$IODIR/$name.rec" |
        sort -n >/tmp/verify-$name.last
    n=0 bad=0 skipped=0
    : >/tmp/verify-$name.sums
    while read -r b s; do
        if [ "$s" = x ]; then skipped=$((skipped + 1)); continue; fi
        want=$(pattern "$s" "$b" | sha256sum | cut -d' ' -f1)
        got=$(dd if=/dev/$dev bs=$BS skip="$b" count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
        echo "$got" >>/tmp/verify-$name.sums
        if [ "$want" = "$got" ]; then
            n=$((n + 1))
        else
            bad=$((bad + 1))
            found=$(dd if=/dev/$dev bs=$BS skip="$b" count=1 iflag=direct 2>/dev/null | head -n 1 | tr -c 'a-z0-9=\n' '.')
            echo "VMBLK-IO verify=$name block=$b seed=$s differs found=${found:-nothing}"
        fi
    done </tmp/verify-$name.last
    sum=$(sha256sum </tmp/verify-$name.sums | cut -d' ' -f1)
    echo "VMBLK-IO verify=$name blocks=$n bad=$bad skipped=$skipped sha256=$sum"
    [ $bad = 0 ]
}

job_probe() { # dev
    t0=$(now)
    if dd if=/dev/$1 of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null; then ok=1; else ok=0; fi
    echo "VMBLK-IO probe dev=$1 ok=$ok t0=$t0 t1=$(now)"
    [ $ok = 1 ]
}

# `sh /init vmblk-job <job> args...`: one workload job, in a session of its own.
if [ "${1-}" = vmblk-job ]; then
    shift
    job=$1
    shift
    "job_$job" "$@"
    exit $?
fi

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

# ---- Workload ----
JOBS=

# Kernel name of a disk argument.
resolve_dev() {
    case "$1" in
        scratch) echo "$SCRATCHDEV" ;;
        data | data[0-9])
            k=${1#data}
            k=${k:-1}
            ls /sys/block | grep '^vd' | grep -v "^$DISK\$" | sed -n "${k}p"
            ;;
        *) echo "$1" ;;
    esac
}

job_pid() { for j in $JOBS; do [ "${j%%:*}" = "$1" ] && echo "${j#*:}"; done; }

# Processes left in process group $1 (zombies do not count).
group_alive() {
    cat /proc/[0-9]*/stat 2>/dev/null | awk -v g="$1" '$5 == g && $3 != "Z" { n++ } END { print n + 0 }'
}

start_job() { # name job args...
    name=$1
    shift
    [ -z "$(job_pid "$name")" ] || { echo "VMBLK-IO job=$name exists"; return 1; }
    setsid sh /init vmblk-job "$@" </dev/null &
    JOBS="$JOBS $name:$!"
    echo "VMBLK-IO job=$name pid=$! started t=$(now)"
}

# Waits at most $2 seconds (tenths) for the groups in $1 to end; sends SIGKILL once
# after $3 tenths (0: never). Prints the processes left.
wait_groups() {
    i=0
    while :; do
        left=0
        for g in $1; do left=$((left + $(group_alive "$g"))); done
        [ $left = 0 ] && break
        [ $i -ge $(($2 * 10)) ] && break
        if [ "$3" != 0 ] && [ $i = "$3" ]; then
            for g in $1; do kill -KILL -"$g" 2>/dev/null; done
        fi
        sleep 0.1
        i=$((i + 1))
    done
    echo $left
}

stop_job() { # name [secs]
    g=$(job_pid "$1")
    [ -n "$g" ] || return 1
    kill -TERM -"$g" 2>/dev/null
    left=$(wait_groups "$g" "${2:-10}" 20)
    echo "VMBLK-IO job=$1 stop left=$left t=$(now)"
    [ "$left" = 0 ]
}

wait_job() { # name [secs]
    g=$(job_pid "$1")
    [ -n "$g" ] || return 1
    left=$(wait_groups "$g" "${2:-600}" 0)
    [ "$left" = 0 ]
}

shutdown_jobs() {
    echo "VMBLK-SHUTDOWN begin action=$ACTION jobs=$(echo $JOBS | wc -w) t=$(now)"
    groups=
    for j in $JOBS; do
        groups="$groups ${j#*:}"
        kill -TERM -"${j#*:}" 2>/dev/null
    done
    left=$(wait_groups "$groups" $SHUTDOWN_WAIT 20)
    echo "VMBLK-SHUTDOWN jobs-stopped left=$left t=$(now)"
}

run_cmd() { # id command args...
    id=$1
    shift
    echo "VMBLK-CMD id=$id start $* t=$(now)"
    rc=0
    cmd=$1
    [ $# -gt 0 ] && shift
    case "$cmd" in
        writer) start_job "$1" writer "$1" "$(resolve_dev "$2")" "$3" "$4" "$5" "${6:-1}" || rc=1 ;;
        scanner) start_job "$1" scanner "$1" "$(resolve_dev "$2")" || rc=1 ;;
        stop) stop_job "$1" "$2" || rc=1 ;;
        wait) wait_job "$1" "$2" || rc=1 ;;
        verify)
            out=$(sh /init vmblk-job verify "$1" "$(resolve_dev "$2")")
            rc=$?
            echo "$out"
            check "verify:$1" "$(bool test $rc = 0)" "$(echo "$out" | tail -n 1 | sed 's/^VMBLK-IO //')"
            ;;
        probe) sh /init vmblk-job probe "$(resolve_dev "$1")" || rc=1 ;;
        size)
            d=$(resolve_dev "$1")
            echo "VMBLK-IO size dev=$d sectors=$(cat /sys/block/$d/size 2>/dev/null) t=$(now)"
            ;;
        gpt-grow)
            d=$(resolve_dev "$1")
            sgdisk -e "/dev/$d" >/tmp/sgdisk.out 2>&1
            r=$?
            sed 's/^/sgdisk: /' /tmp/sgdisk.out
            echo "VMBLK-IO gpt-grow dev=$d rc=$r t=$(now)"
            [ $r = 0 ] || rc=1
            ;;
        fs-grow)
            d=$(resolve_dev "$1")
            p=$SCRATCHDEV
            n=${p##*[!0-9]}
            # Full paths: busybox's shell prefers its own applets (its mke2fs makes no ext4).
            blocks() { /sbin/dumpe2fs -h "/dev/$p" 2>/dev/null | awk -F: '/^Block count/ {print $2 + 0}'; }
            {
                /sbin/mke2fs -q -F -t ext4 "/dev/$p" &&
                    before=$(blocks) &&
                    first=$(sgdisk -i "$n" "/dev/$d" | awk '/^First sector/ {print $3}') &&
                    guid=$(sgdisk -i "$n" "/dev/$d" | awk '/unique GUID/ {print $4}') &&
                    sgdisk -d "$n" -n "$n:$first:0" -t "$n:8300" -c "$n:vmblk-scratch" \
                        -u "$n:$guid" "/dev/$d" &&
                    last=$(sgdisk -i "$n" "/dev/$d" | awk '/^Last sector/ {print $3}') &&
                    /usr/bin/resizepart "/dev/$d" "$n" $((last - first + 1)) &&
                    /sbin/resize2fs "/dev/$p" &&
                    after=$(blocks)
            } >/tmp/fsgrow.out 2>&1
            r=$?
            sed 's/^/fs-grow: /' /tmp/fsgrow.out
            echo "VMBLK-IO fs-grow dev=$d rc=$r blocks_before=$before blocks_after=$after t=$(now)"
            [ $r = 0 ] || rc=1
            ;;
        sleep) sleep "$1" ;;
        poweroff | reboot) ACTION=$cmd ;;
        '') ;;
        *) echo "VMBLK-IO unknown command $cmd"; rc=2 ;;
    esac
    echo "VMBLK-CMD id=$id rc=$rc t=$(now)"
}

WORKLOAD=
[ -f $ROOT/vmblk/workload ] && WORKLOAD=$ROOT/vmblk/workload
CONTROL=
grep -q '^1: uart:16550' /proc/tty/driver/serial 2>/dev/null && CONTROL=/dev/ttyS1
if [ -n "$WORKLOAD$CONTROL" ]; then
    IODIR=$ROOT/vmblk/io
    mkdir -p $IODIR
    export IODIR BS
    disks=$(for d in /sys/block/vd*; do printf '%s:%s,' "${d##*/}" $(($(cat $d/size) * 512)); done)
    echo "VMBLK-WORKLOAD disks=${disks%,} boot=$DISK t=$(now)"
    START_ACTION=$ACTION
    ACTION=
    if [ -n "$WORKLOAD" ]; then
        n=0
        while read -r line; do
            n=$((n + 1))
            run_cmd "f$n" $line
            [ -n "$ACTION" ] && break
        done <"$WORKLOAD"
    fi
    if [ -z "$ACTION" ] && [ -n "$CONTROL" ]; then
        stty -F $CONTROL -echo -icrnl 2>/dev/null
        exec 3<$CONTROL
        echo "VMBLK-WORKLOAD ready control=$CONTROL t=$(now)"
        while [ -z "$ACTION" ] && read -r line <&3; do
            run_cmd $line
        done
        exec 3<&-
    fi
    # The end of the commands powers off (or reboots as the image says).
    ACTION=${ACTION:-$START_ACTION}
    shutdown_jobs
fi

finish
