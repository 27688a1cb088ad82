//! The incident, reproduced: the image written to a 4096-byte-sector device and
//! "repaired" with `sgdisk -e` directly on it. sgdisk finds no GPT at 4K LBA 1, writes
//! a fresh, empty 4K GPT (protective MBR sized in 4K sectors, header at byte 4096), and
//! the firmware no longer finds the EFI system partition: OVMF reports the disk's boot
//! option as "Not Found" and falls back to its shell; the guest never runs its checks.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use integration_tests::{
    loop_tests_lock, prepared_volume, DirectSgdiskRepair, Guest, GuestParams, QsdExport, QsdParams,
    TestImage, DEFAULT_VOLUME_BYTES, IMAGE_BYTES,
};

/// OVMF's serial line when the disk's boot option has no loadable ESP.
const BOOT_OPTION_NOT_FOUND: &str = "failed to load Boot0001";

/// Sector count of the protective MBR's partition (offset 446 + 12, little endian).
fn pmbr_sectors(file: &std::path::Path) -> u32 {
    let mut b = [0u8; 4];
    std::fs::File::open(file)
        .unwrap()
        .read_exact_at(&mut b, 446 + 12)
        .unwrap();
    u32::from_le_bytes(b)
}

fn signature_at(file: &std::path::Path, offset: u64) -> bool {
    let mut b = [0u8; 8];
    std::fs::File::open(file)
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    &b == b"EFI PART"
}

#[test]
fn image_on_4k_loop_after_direct_sgdisk_does_not_boot() {
    let _lock = loop_tests_lock().unwrap();
    let image = TestImage::standard().unwrap();
    assert_eq!(pmbr_sectors(&image.raw) as u64, IMAGE_BYTES / 512 - 1);
    let (volume, evidence) = prepared_volume(&image, 4096, &DirectSgdiskRepair).unwrap();
    eprintln!("{evidence}");
    // What sgdisk did: a protective MBR counted in 4K sectors and a GPT header at 4K LBA 1.
    assert_eq!(
        pmbr_sectors(volume.file()) as u64,
        DEFAULT_VOLUME_BYTES / 4096 - 1
    );
    assert!(signature_at(volume.file(), 4096));

    let export = QsdExport::start(QsdParams::host_device(volume.device())).unwrap();
    let mut params = GuestParams::boot_from(&export).log_name("negative_direct_sgdisk");
    params.timeout = Duration::from_secs(60);
    let mut guest = Guest::start(&params).unwrap();

    let seen = guest
        .wait_for(Duration::from_secs(55), |log| {
            if log.contains("VMBLK-") {
                Some(Err(()))
            } else if log.contains(BOOT_OPTION_NOT_FOUND) && log.contains("Not Found") {
                Some(Ok(()))
            } else {
                None
            }
        })
        .unwrap();
    eprintln!("after {:?}:\n{}", guest.elapsed(), guest.serial_tail(12));
    assert_eq!(
        seen,
        Some(Ok(())),
        "expected OVMF to report the boot disk as not bootable\n{}",
        guest.diagnostics()
    );
    assert!(guest.report().boots.is_empty());
    guest.kill().unwrap();
}
