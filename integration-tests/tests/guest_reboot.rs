//! A guest reboot inside one QEMU run: the first boot runs the checks, leaves a marker
//! on the root fs and reboots; the second boot sees the marker, runs the checks again
//! and powers off.

use integration_tests::{
    loop_tests_lock, prepared_volume, BootMode, Guest, GuestParams, ImageSpec, QsdExport,
    QsdParams, WriteRawImage,
};

#[test]
fn guest_reboots_once_and_runs_checks_twice_in_one_qemu_run() {
    let _lock = loop_tests_lock().unwrap();
    let image = ImageSpec {
        boot_mode: BootMode::RebootOnce,
        ..ImageSpec::default()
    }
    .build()
    .unwrap();
    let (volume, _) = prepared_volume(&image, 512, &WriteRawImage).unwrap();
    let export = QsdExport::start(QsdParams::host_device(volume.device())).unwrap();
    let mut params = GuestParams::boot_from(&export).log_name("reboot_once");
    params.allow_reboot = true;
    let mut guest = Guest::start(&params).unwrap();
    let pid = guest.pid();

    let outcome = guest.expect_clean_run(2);
    eprintln!("two boots in {:?} (QEMU pid {pid})", outcome.elapsed);
    let boots: Vec<u32> = outcome.report.boots.iter().map(|b| b.boot).collect();
    assert_eq!(boots, [1, 2]);
    assert!(guest.serial_log().contains("VMBLK-REBOOT"));
    for b in &outcome.report.boots {
        assert_eq!(b.value("logical_block_size"), Some("512"));
        assert!(b.check("fs_pattern").is_some_and(|c| c.ok));
    }
}
