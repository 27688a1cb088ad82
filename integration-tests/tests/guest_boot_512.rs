//! The control: the test image on a 512-byte-sector loop device, exported by
//! qemu-storage-daemon, boots under OVMF and passes every guest check.

use integration_tests::{
    loop_tests_lock, prepared_volume, Guest, GuestParams, QsdExport, QsdParams, TestImage,
    WriteRawImage, DEFAULT_VOLUME_BYTES, ESP, ROOT, SCRATCH,
};

#[test]
fn image_on_512_sector_loop_boots_via_qsd_and_passes_checks() {
    let _lock = loop_tests_lock().unwrap();
    let image = TestImage::standard().unwrap();
    let (volume, _) = prepared_volume(&image, 512, &WriteRawImage).unwrap();
    let export = QsdExport::start(QsdParams::host_device(volume.device())).unwrap();
    let mut guest = Guest::start(&GuestParams::boot_from(&export).log_name("boot_512")).unwrap();

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
    let parts = boot.value("partitions").unwrap();
    for (n, p) in [(1, ESP), (2, ROOT), (3, SCRATCH)] {
        assert!(
            parts.contains(&format!("vda{n}:{}", p.size_bytes)),
            "partition {n} missing or wrong size in {parts}"
        );
    }
    assert_eq!(
        boot.value("root_partuuid"),
        Some(format!("vda2={}", ROOT.partuuid).as_str())
    );
    for (path, sum) in &image.manifest {
        assert_eq!(boot.value(&format!("sha256:{path}")), Some(sum.as_str()));
    }
}
