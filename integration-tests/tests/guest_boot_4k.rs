//! The image on a 4096-byte-sector loop device (a simulated 4K NVMe), its GPT repaired
//! through a 512-byte loop bridge, exported by qemu-storage-daemon with 512-byte logical
//! blocks: the guest boots and sees the 512-byte layout it was built for.
//!
//! qemu-storage-daemon 7.2 serves this with `cache.direct=on`: it probes the device's
//! 4096-byte alignment and turns the guest's 512-byte requests into aligned
//! read-modify-write cycles (the guest's `raw_512_sector` check writes one sector at a
//! non-4K-aligned offset with O_DIRECT and reads it back). The guest is told nothing
//! about the 4K medium: its physical block size reads 512.

use integration_tests::{
    loop_tests_lock, prepared_volume, Export, Guest, GuestParams, ManualBridgeRepair, QsdExport,
    QsdParams, TestImage, DEFAULT_VOLUME_BYTES,
};

#[test]
fn image_on_4k_loop_repaired_through_512_bridge_boots_via_qsd() {
    let _lock = loop_tests_lock().unwrap();
    let image = TestImage::standard().unwrap();
    let (volume, evidence) = prepared_volume(&image, 4096, &ManualBridgeRepair).unwrap();
    eprintln!("prepare: {evidence}");
    assert_eq!(volume.loop_device().logical_block_size().unwrap(), 4096);
    let params = QsdParams::host_device(volume.device());
    assert!(params.cache_direct);
    let export = QsdExport::start(params).unwrap();
    let mut guest =
        Guest::start(&GuestParams::boot_from(&export).log_name("boot_4k_bridge")).unwrap();

    let outcome = guest.expect_clean_run(1);
    eprintln!(
        "guest run {:?}, milestones {:?}",
        outcome.elapsed, outcome.milestones
    );
    let boot = outcome.report.last().unwrap();
    assert_eq!(boot.value("logical_block_size"), Some("512"));
    assert_eq!(boot.value("physical_block_size"), Some("512"));
    assert_eq!(
        boot.value("disk_bytes"),
        Some(DEFAULT_VOLUME_BYTES.to_string().as_str())
    );
    assert!(boot.check("raw_512_sector").is_some_and(|c| c.ok));
    assert!(
        export.logs().trim().is_empty(),
        "qemu-storage-daemon complained:\n{}",
        export.logs()
    );
}
