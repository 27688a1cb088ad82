//! Two vhost-user-blk disks in one guest, the boot disk with two virtqueues on two
//! vCPUs: the guest sees both, the boot disk's two queues, and a pattern written to the
//! second disk reads back. Also exercises checks added by a test (`/vmblk/checks.d`).

use integration_tests::{
    loop_tests_lock, prepared_volume, Guest, GuestDisk, GuestFile, GuestParams, ImageSpec,
    QsdExport, QsdParams, Volume, WriteRawImage,
};

const SECOND_DISK_CHECK: &str = r#"#!/bin/sh
# The data disk: present, writable with O_DIRECT, reads back after a cache drop.
d=$(ls /sys/block | grep -v "^$DISK\$" | grep '^vd' | head -n 1)
[ -n "$d" ] || { echo "no second disk"; exit 1; }
q=$(ls -d /sys/block/$DISK/mq/* | wc -l)
dd if=/dev/urandom of=/tmp/p2 bs=4096 count=64 2>/dev/null
dd if=/tmp/p2 of=/dev/$d bs=4096 seek=3 oflag=direct conv=fsync,notrunc 2>/dev/null || exit 1
echo 3 >/proc/sys/vm/drop_caches
a=$(sha256sum </tmp/p2 | cut -d' ' -f1)
b=$(dd if=/dev/$d bs=4096 skip=3 count=64 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
echo "second=$d bytes=$(($(cat /sys/block/$d/size) * 512)) lbs=$(cat /sys/block/$d/queue/logical_block_size) boot_queues=$q"
[ "$a" = "$b" ] && [ "$q" = 2 ]
"#;

#[test]
fn guest_sees_two_disks_and_two_queues() {
    let _lock = loop_tests_lock().unwrap();
    let image = ImageSpec {
        extra_files: vec![GuestFile::check_script("second_disk", SECOND_DISK_CHECK)],
        ..ImageSpec::default()
    }
    .build()
    .unwrap();
    let (boot_volume, _) = prepared_volume(&image, 512, &WriteRawImage).unwrap();
    let data_volume = Volume::new(4096, 32 << 20).unwrap();

    let mut boot_params = QsdParams::host_device(boot_volume.device());
    boot_params.num_queues = 2;
    let boot = QsdExport::start(boot_params).unwrap();
    let data = QsdExport::start(QsdParams::host_device(data_volume.device())).unwrap();
    let params = GuestParams {
        disks: vec![
            GuestDisk::from_export(&boot, Some(1)),
            GuestDisk::from_export(&data, None),
        ],
        cpus: 2,
        log_name: Some("two_disks".into()),
        ..GuestParams::default()
    };
    let mut guest = Guest::start(&params).unwrap();

    let outcome = guest.expect_clean_run(1);
    eprintln!(
        "guest run {:?}, milestones {:?}",
        outcome.elapsed, outcome.milestones
    );
    let check = outcome
        .report
        .last()
        .unwrap()
        .value("extra:second_disk")
        .unwrap();
    assert!(check.contains("bytes=33554432"), "{check}");
    assert!(check.contains("lbs=512"), "{check}");
    assert!(check.contains("boot_queues=2"), "{check}");
}
