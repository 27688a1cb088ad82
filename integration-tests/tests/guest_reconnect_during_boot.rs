//! A backend restart at moments of a boot: the export of a guest's only disk is killed
//! with SIGKILL and started again on the same socket, at points read from the serial
//! console, and the guest carries on to a clean run.
//!
//! ```text
//!  right after QEMU connected, before the firmware drives the disk (device stopped)
//!  BdsDxe: loading ...   (the firmware reads the disk: device started)
//!  VMBLK-BOOT n=1        (the guest's kernel drives it: checks and writes follow)
//! ```
//!
//! A restart while the device is stopped is one QEMU 7.2 loses: it misses the
//! disconnect, never repeats the vhost-user handshake, and starts the device on the new
//! backend directly; the vendored `vhost` crate adopts such a connection
//! (third_party/vhost/README.vmblk.md). QEMU 7.2 then ignores that chardev's events for
//! good, so a later restart of the backend hangs the disk until QEMU restarts: that
//! case gets a guest of its own. Each restart waits for QEMU to have reconnected before
//! the next, so the test does not race the second QEMU takes to reconnect.

use std::time::{Duration, Instant};

use integration_tests::{
    loop_tests_lock, unpacked_volume, CommandExport, CommandExportParams, Guest, GuestDisk,
    GuestParams, TestImage,
};

/// Waits (bounded) until the export's current process has accepted QEMU.
fn wait_connected(export: &CommandExport, since: usize) {
    let t0 = Instant::now();
    while export.all_logs()[since..]
        .matches("frontend connected")
        .count()
        == 0
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "QEMU did not reconnect:\n{}",
            export.all_logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A guest booting from an export of the test image on a 4096-sector loop device; the
/// export and the guest, and the volume behind them.
fn boot() -> (CommandExport, Guest, integration_tests::Volume) {
    let image = TestImage::standard().unwrap();
    let vol = unpacked_volume(&image.qcow2, 4096, 192 << 20).unwrap();
    let export = CommandExport::start(CommandExportParams::vmblk(vol.device(), 512)).unwrap();
    let params = GuestParams {
        reconnect: Some(1),
        disks: vec![GuestDisk::from_export(&export, Some(1))],
        log_name: Some("reconnect_during_boot".into()),
        timeout: Duration::from_secs(240),
        ..GuestParams::default()
    };
    let guest = Guest::start(&params).unwrap();
    (export, guest, vol)
}

/// Restarts the export and waits until QEMU has connected to the new one.
fn restart(export: &mut CommandExport) {
    let mark = export.all_logs().len();
    export.restart().unwrap();
    wait_connected(export, mark);
}

#[test]
fn a_restart_before_the_firmware_drives_the_disk_is_survived() {
    let _lock = loop_tests_lock().unwrap();
    let (mut export, mut guest, _vol) = boot();
    // QEMU connects at its start; the firmware drives the disk a second or more later.
    wait_connected(&export, 0);
    restart(&mut export);
    guest.expect_clean_run(1);
    assert_eq!(
        export
            .all_logs()
            .matches("export: frontend connected")
            .count(),
        2,
        "{}",
        export.all_logs()
    );
}

#[test]
fn restarts_while_firmware_and_kernel_use_the_disk_are_survived() {
    let _lock = loop_tests_lock().unwrap();
    let (mut export, mut guest, _vol) = boot();
    for marker in ["BdsDxe: loading", "VMBLK-BOOT n=1"] {
        let seen = guest
            .wait_for_line(marker, Duration::from_secs(120))
            .unwrap();
        assert!(
            seen.is_some(),
            "no {marker:?} on the console:\n{}\nexport:\n{}",
            guest.diagnostics(),
            integration_tests::tail(&export.all_logs(), 40)
        );
        restart(&mut export);
    }
    guest.expect_clean_run(1);
}
