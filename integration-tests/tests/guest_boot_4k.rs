//! The image on a 4096-byte-sector loop device (a simulated 4K NVMe), its GPT repaired
//! through a 512-byte loop bridge, exported by qemu-storage-daemon with 512-byte logical
//! blocks: the guest boots and sees the 512-byte layout it was built for.

use integration_tests::{
    loop_tests_lock, prepared_volume, Guest, GuestParams, ManualBridgeRepair, QsdExport, QsdParams,
    TestImage,
};

#[test]
fn image_on_4k_loop_repaired_through_512_bridge_boots_via_qsd() {
    let _lock = loop_tests_lock().unwrap();
    let image = TestImage::standard().unwrap();
    let (volume, evidence) = prepared_volume(&image, 4096, &ManualBridgeRepair).unwrap();
    eprintln!("prepare: {evidence}");
    assert_eq!(volume.loop_device().logical_block_size().unwrap(), 4096);
    let export = QsdExport::start(QsdParams::host_device(volume.device())).unwrap();
    let mut guest =
        Guest::start(&GuestParams::boot_from(&export).log_name("boot_4k_bridge")).unwrap();

    let outcome = guest.run_to_completion(1).unwrap();
    eprintln!("guest finished in {:?}", outcome.elapsed);
    assert!(!outcome.killed, "guest timed out\n{}", guest.diagnostics());
    assert!(outcome.exit.is_some_and(|s| s.success()));
    let boot = outcome.report.last().unwrap();
    eprintln!("{:#?}", boot.checks);
    boot.ensure_passed().unwrap();
    assert_eq!(boot.value("logical_block_size"), Some("512"));
}
