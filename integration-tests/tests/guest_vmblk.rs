//! The whole chain with vmblk's own tools: `vmblk unpack` onto a simulated 4K NVMe
//! (a 4096-sector loop device), `vmblk export` presenting 512-byte sectors, and a real
//! UEFI guest that boots from it and passes every check — including 512-byte O_DIRECT
//! writes at scattered offsets and concurrent writers inside the same 4 KiB blocks,
//! which the export must read-modify-write without losing either.
//!
//! The negative control ends here too: after `sgdisk -e` on the 4K device the image no
//! longer boots (guest_negative_control.rs); after `vmblk repair` it boots again.

use std::process::Command;

use integration_tests::{
    damage_with_direct_sgdisk, loop_tests_lock, run, vmblk_bin, vmblk_unpack, write_image,
    BootMode, CommandExport, CommandExportParams, Export, Guest, GuestFile, GuestParams, ImageSpec,
    TestImage, Volume,
};

const VOLUME_BYTES: u64 = 192 << 20;

/// Scattered single-sector O_DIRECT writes and two concurrent writers interleaving
/// 512-byte sectors of the same 4 KiB blocks, all read back after dropping caches.
const SECTOR_IO_CHECK: &str = r#"
set -e
dev=/dev/$SCRATCHDEV
i=0
for sec in 1 7 9 15 4097 8191 12289 16383; do
    head -c 512 /dev/urandom >/tmp/s$i
    dd if=/tmp/s$i of=$dev bs=512 seek=$sec count=1 oflag=direct conv=fsync,notrunc 2>/dev/null
    i=$((i+1))
done
# Two writers: even sectors and odd sectors of blocks 256..319, at the same time.
head -c 32768 /dev/urandom >/tmp/even
head -c 32768 /dev/urandom >/tmp/odd
w() { # parity file
    n=0
    while [ $n -lt 64 ]; do
        dd if=$2 of=$dev bs=512 skip=$n seek=$((2048 + n*2 + $1)) count=1 oflag=direct conv=notrunc 2>/dev/null
        n=$((n+1))
    done
}
w 0 /tmp/even & p1=$!
w 1 /tmp/odd & p2=$!
wait $p1; wait $p2
sync
echo 3 >/proc/sys/vm/drop_caches
i=0
for sec in 1 7 9 15 4097 8191 12289 16383; do
    a=$(sha256sum </tmp/s$i)
    b=$(dd if=$dev bs=512 skip=$sec count=1 iflag=direct 2>/dev/null | sha256sum)
    [ "$a" = "$b" ] || { echo "sector $sec differs"; exit 1; }
    i=$((i+1))
done
n=0
while [ $n -lt 64 ]; do
    for par in 0 1; do
        f=/tmp/even; [ $par = 1 ] && f=/tmp/odd
        a=$(dd if=$f bs=512 skip=$n count=1 2>/dev/null | sha256sum)
        b=$(dd if=$dev bs=512 skip=$((2048 + n*2 + par)) count=1 iflag=direct 2>/dev/null | sha256sum)
        [ "$a" = "$b" ] || { echo "interleaved sector $((2048 + n*2 + par)) lost"; exit 1; }
    done
    n=$((n+1))
done
echo "8 scattered + 128 interleaved sectors exact"
"#;

fn image_with_sector_checks() -> TestImage {
    ImageSpec {
        extra_files: vec![GuestFile::check_script("sector_io", SECTOR_IO_CHECK)],
        ..ImageSpec::default()
    }
    .build()
    .unwrap()
}

fn export(volume: &Volume, queues: u16) -> CommandExport {
    let mut p = CommandExportParams::vmblk(volume.device(), 512);
    p.args
        .extend(["--num-queues".to_string(), queues.to_string()]);
    p.num_queues = queues;
    CommandExport::start(p).unwrap()
}

fn boot_and_check(export: &CommandExport, name: &str) {
    boot_and_check_on(export, name, 4096);
}

/// Boots once from `export` and checks what the guest saw; `physical` is the physical
/// block size the guest must report (the volume's, so that it aligns its I/O).
fn boot_and_check_on(export: &CommandExport, name: &str, physical: u32) {
    boot_and_check_with(export, name, physical, 1);
}

/// As [`boot_and_check_on`], with `cpus` virtual CPUs (so that several queues are used).
fn boot_and_check_with(export: &CommandExport, name: &str, physical: u32, cpus: u32) {
    let mut params = GuestParams::boot_from(export).log_name(name);
    params.cpus = cpus;
    let mut guest = Guest::start(&params).unwrap();
    let outcome = guest.expect_clean_run(1);
    eprintln!("{name}: guest run {:?}", outcome.elapsed);
    let boot = outcome.report.last().unwrap();
    assert_eq!(
        boot.value("logical_block_size"),
        Some("512"),
        "{}",
        guest.diagnostics()
    );
    assert_eq!(
        boot.value("physical_block_size"),
        Some(physical.to_string().as_str()),
        "{}",
        guest.diagnostics()
    );
    assert_eq!(
        boot.value("disk_bytes"),
        Some(VOLUME_BYTES.to_string().as_str())
    );
    assert!(
        boot.check("raw_512_sector").is_some_and(|c| c.ok),
        "{}",
        guest.diagnostics()
    );
    let io = boot.check("extra:sector_io");
    assert!(
        io.is_some_and(|c| c.ok),
        "sector I/O check: {io:?}\n{}",
        guest.diagnostics()
    );
}

#[test]
fn unpacked_on_4k_volume_boots_through_vmblk_export_one_queue_and_again_after_qemu_exits() {
    let _lock = loop_tests_lock().unwrap();
    let image = image_with_sector_checks();
    let volume = Volume::new(4096, VOLUME_BYTES).unwrap();
    vmblk_unpack(&image.qcow2, &volume).unwrap();
    let export = export(&volume, 1);
    boot_and_check(&export, "vmblk_4k_q1");
    // QEMU exited and disconnected; a new QEMU connects to the same export process.
    boot_and_check(&export, "vmblk_4k_q1_second_qemu");
    assert!(
        !export.logs().contains("panicked"),
        "export panicked:\n{}",
        export.logs()
    );
}

#[test]
fn unpacked_on_512_volume_boots_through_vmblk_export() {
    let _lock = loop_tests_lock().unwrap();
    let image = image_with_sector_checks();
    let volume = Volume::new(512, VOLUME_BYTES).unwrap();
    vmblk_unpack(&image.qcow2, &volume).unwrap();
    let export = export(&volume, 1);
    boot_and_check_on(&export, "vmblk_512", 512);
}

#[test]
fn guest_reboot_through_vmblk_export_runs_checks_twice() {
    let _lock = loop_tests_lock().unwrap();
    let image = ImageSpec {
        boot_mode: BootMode::RebootOnce,
        ..ImageSpec::default()
    }
    .build()
    .unwrap();
    let volume = Volume::new(4096, VOLUME_BYTES).unwrap();
    vmblk_unpack(&image.qcow2, &volume).unwrap();
    let export = export(&volume, 2);
    let mut params = GuestParams::boot_from(&export).log_name("vmblk_reboot");
    params.allow_reboot = true;
    let mut guest = Guest::start(&params).unwrap();
    let outcome = guest.expect_clean_run(2);
    eprintln!("two boots in {:?}", outcome.elapsed);
    let boots: Vec<u32> = outcome.report.boots.iter().map(|b| b.boot).collect();
    assert_eq!(boots, [1, 2]);
    for b in &outcome.report.boots {
        assert_eq!(b.value("physical_block_size"), Some("4096"));
        assert!(b.check("fs_pattern").is_some_and(|c| c.ok));
    }
}

#[test]
fn unpacked_on_4k_volume_boots_through_vmblk_export_four_queues() {
    let _lock = loop_tests_lock().unwrap();
    let image = image_with_sector_checks();
    let volume = Volume::new(4096, VOLUME_BYTES).unwrap();
    vmblk_unpack(&image.qcow2, &volume).unwrap();
    let export = export(&volume, 4);
    boot_and_check_with(&export, "vmblk_4k_q4", 4096, 2);
}

#[test]
fn direct_sgdisk_damage_is_undone_by_vmblk_repair_and_the_guest_boots() {
    let _lock = loop_tests_lock().unwrap();
    let image = image_with_sector_checks();
    let volume = Volume::new(4096, VOLUME_BYTES).unwrap();
    write_image(&image.raw, volume.device()).unwrap();
    eprintln!("{}", damage_with_direct_sgdisk(&volume).unwrap());
    let out =
        run(Command::new(vmblk_bin()).arg("repair").arg(volume.device())).expect("vmblk repair");
    eprintln!("{out}");
    let export = export(&volume, 1);
    boot_and_check(&export, "vmblk_repaired_after_sgdisk_e");
}
