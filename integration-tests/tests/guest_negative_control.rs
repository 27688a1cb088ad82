//! The incident, reproduced: the image written to a 4096-byte-sector device and
//! "repaired" with `sgdisk -e` directly on it. sgdisk finds no GPT at 4K LBA 1, writes
//! a fresh 4K GPT over the image's protective MBR and primary table, and the firmware
//! no longer finds the EFI system partition: the guest never reaches its checks.

use std::time::Duration;

use integration_tests::{
    loop_tests_lock, prepared_volume, DirectSgdiskRepair, Guest, GuestParams, QsdExport, QsdParams,
    TestImage,
};

/// Serial text OVMF prints when no boot option works.
const FIRMWARE_FAILURE: &[&str] = &[
    "No bootable option",
    "No bootable device",
    "Boot Failed",
    "UEFI Interactive Shell",
    "Shell>",
];

#[test]
fn image_on_4k_loop_after_direct_sgdisk_does_not_boot() {
    let _lock = loop_tests_lock().unwrap();
    let image = TestImage::standard().unwrap();
    let (volume, evidence) = prepared_volume(&image, 4096, &DirectSgdiskRepair).unwrap();
    eprintln!("{evidence}");
    let export = QsdExport::start(QsdParams::host_device(volume.device())).unwrap();
    let mut params = GuestParams::boot_from(&export).log_name("negative_direct_sgdisk");
    params.timeout = Duration::from_secs(75);
    let mut guest = Guest::start(&params).unwrap();

    let seen = guest
        .wait_for(Duration::from_secs(70), |log| {
            if log.contains("VMBLK-") {
                return Some("guest-init".to_owned());
            }
            FIRMWARE_FAILURE
                .iter()
                .find(|m| log.contains(**m))
                .map(|m| (*m).to_owned())
        })
        .unwrap();
    eprintln!("after {:?}: {seen:?}", guest.elapsed());
    eprintln!("{}", guest.serial_tail(15));
    let report = guest.report();
    assert!(
        report.boots.is_empty() && seen.as_deref() != Some("guest-init"),
        "the damaged volume booted into the test init\n{}",
        guest.diagnostics()
    );
    assert_eq!(report.completed_boots(), 0);
    guest.kill().unwrap();
}
