//! The test image itself, checked on the host without a guest: GPT layout and
//! PARTUUIDs, the ESP's bootloader, loader entry, kernel and initramfs, the qcow2 copy.

use std::process::Command;

use integration_tests::{run, ImageSpec, TestImage, ESP, IMAGE_BYTES, PARTITIONS};

#[test]
fn standard_image_has_gpt_esp_and_root_with_fixed_partuuids() {
    let started = std::time::Instant::now();
    let image = TestImage::standard().unwrap();
    eprintln!(
        "image ready in {:?}: {}",
        started.elapsed(),
        image.raw.display()
    );
    assert_eq!(std::fs::metadata(&image.raw).unwrap().len(), IMAGE_BYTES);

    for p in PARTITIONS {
        let info = run(Command::new("sgdisk")
            .arg(format!("--info={}", p.number))
            .arg(&image.raw))
        .unwrap();
        assert!(
            info.to_lowercase()
                .contains(&format!("unique guid: {}", p.partuuid)),
            "{info}"
        );
        assert!(
            info.contains(&format!("First sector: {} ", p.start_lba)),
            "{info}"
        );
    }

    let esp = format!("{}@@{}", image.raw.display(), ESP.offset());
    let dir = |path: &str| {
        run(Command::new("mdir")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-b", "-i", &esp, path]))
        .unwrap()
    };
    assert!(dir("::/EFI/BOOT").contains("BOOTX64.EFI"));
    assert!(dir("::/vmblk").contains("vmlinuz"));
    assert!(dir("::/vmblk").contains("initrd.img"));
    let entry = run(Command::new("mtype").env("MTOOLS_SKIP_CHECK", "1").args([
        "-i",
        &esp,
        "::/loader/entries/vmblk.conf",
    ]))
    .unwrap();
    assert!(entry.contains(&image.cmdline), "{entry}");

    let info = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&image.qcow2))
    .unwrap();
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");
    assert!(
        info.contains(&format!("\"virtual-size\": {IMAGE_BYTES}")),
        "{info}"
    );

    // Same inputs, same cache entry.
    let again = ImageSpec::default().build().unwrap();
    assert_eq!(again.raw, image.raw);
}
