//! The control: the test image on a 512-byte-sector loop device, exported by
//! qemu-storage-daemon, boots under OVMF and passes every guest check.

use integration_tests::{
    loop_tests_lock, prepared_volume, Guest, GuestParams, QsdExport, QsdParams, TestImage,
    WriteRawImage, ESP, IMAGE_BYTES, ROOT, SCRATCH,
};

#[test]
fn image_on_512_sector_loop_boots_via_qsd_and_passes_checks() {
    let _lock = loop_tests_lock().unwrap();
    let image = TestImage::standard().unwrap();
    let (volume, _) = prepared_volume(&image, 512, &WriteRawImage).unwrap();
    let export = QsdExport::start(QsdParams::host_device(volume.device())).unwrap();
    let mut guest = Guest::start(&GuestParams::boot_from(&export).log_name("boot_512")).unwrap();

    let outcome = guest.run_to_completion(1).unwrap();
    eprintln!("guest finished in {:?}", outcome.elapsed);
    assert!(!outcome.killed, "guest timed out\n{}", guest.diagnostics());
    assert!(
        outcome.exit.is_some_and(|s| s.success()),
        "QEMU exit {:?}\n{}",
        outcome.exit,
        guest.diagnostics()
    );
    assert_eq!(outcome.report.completed_boots(), 1);
    let boot = outcome.report.last().unwrap();
    boot.ensure_passed().unwrap();
    assert_eq!(boot.value("logical_block_size"), Some("512"));
    assert_eq!(boot.value("disk_bytes"), Some(volume_bytes().as_str()));
    let parts = boot.value("partitions").unwrap();
    for (n, p) in [(1, ESP), (2, ROOT), (3, SCRATCH)] {
        assert!(
            parts.contains(&format!("vda{n}:{}", p.size_bytes)),
            "partition {n} missing or wrong size in {parts}"
        );
    }
    assert!(boot.value("root_partuuid").unwrap().starts_with("vda2="));
    for (path, _) in &image.manifest {
        assert!(boot.check(&format!("sha256:{path}")).is_some_and(|c| c.ok));
    }
    assert!(IMAGE_BYTES < volume_bytes().parse::<u64>().unwrap());
}

fn volume_bytes() -> String {
    integration_tests::DEFAULT_VOLUME_BYTES.to_string()
}
