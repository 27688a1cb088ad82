//! `vmblk pack`: a guest image unpacked onto a simulated 4K NVMe (a 4096-sector loop
//! device) is packed back into qcow2 (zlib and zstd); `qemu-img check` finds the images
//! clean and `qemu-img compare` equal to the volume; `vmblk unpack` of the packed image
//! onto another 4K volume gives the same bytes, and a UEFI guest boots from it. Bad
//! requests say what is wrong and leave no file behind.

use std::process::Command;

use integration_tests::{
    loop_tests_lock, run, vmblk_bin, vmblk_unpack, CommandExport, CommandExportParams, Guest,
    GuestParams, TestImage, Volume,
};

const VOLUME_BYTES: u64 = 192 << 20;

fn vmblk(args: &[&str]) -> std::process::Output {
    Command::new(vmblk_bin()).args(args).output().unwrap()
}

/// `qemu-img compare` of two images; true when equal.
fn qemu_img_equal(a: &str, fa: &str, b: &str, fb: &str) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", "-f", fa, "-F", fb, a, b])
        .status()
        .unwrap()
        .success()
}

#[test]
fn a_packed_4k_volume_checks_clean_compares_equal_and_boots_once_unpacked_again() {
    let _lock = loop_tests_lock().unwrap();
    let image = TestImage::standard().unwrap();
    let t = tempfile::tempdir().unwrap();
    let volume = Volume::new(4096, VOLUME_BYTES).unwrap();
    vmblk_unpack(&image.qcow2, &volume).unwrap();
    let dev = volume.device().to_str().unwrap().to_owned();

    for c in ["zlib", "zstd"] {
        let out = t.path().join(format!("{c}.qcow2"));
        let o = vmblk(&[
            "pack",
            &dev,
            out.to_str().unwrap(),
            "--compress",
            c,
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(rep["virtual_size"], VOLUME_BYTES, "{rep:#}");
        assert_eq!(rep["compression"], c);
        assert!(rep["zero_clusters"].as_u64().unwrap() > 0, "{rep:#}");
        assert!(rep["compressed_clusters"].as_u64().unwrap() > 0, "{rep:#}");
        // The kernel and initramfs do not compress: stored raw (QEMU's COPIED clusters).
        assert!(rep["raw_clusters"].as_u64().unwrap() > 0, "{rep:#}");
        let check = run(Command::new("qemu-img").args(["check", out.to_str().unwrap()]))
            .expect("qemu-img check");
        assert!(check.contains("No errors were found"), "{check}");
        let info = run(Command::new("qemu-img").args(["info", out.to_str().unwrap()])).unwrap();
        assert!(info.contains(&format!("compression type: {c}")), "{info}");
        assert!(
            qemu_img_equal(&dev, "raw", out.to_str().unwrap(), "qcow2"),
            "{c}: qemu-img compare finds the image different from the volume"
        );
        // Packed again onto an existing file: refused, the file untouched.
        let before = std::fs::read(&out).unwrap();
        let again = vmblk(&["pack", &dev, out.to_str().unwrap(), "--json"]);
        assert_eq!(again.status.code(), Some(1));
        let err: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
        assert!(err["error"].as_str().unwrap().contains("exists"), "{err:#}");
        assert!(std::fs::read(&out).unwrap() == before);
    }
    let missing = vmblk(&["pack", "/dev/no-such-volume", "/tmp/never.qcow2", "--json"]);
    assert_eq!(missing.status.code(), Some(4), "{missing:?}");
    assert!(!std::path::Path::new("/tmp/never.qcow2").exists());
    let leftovers: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Unpacked onto another 4K volume: the same bytes, and it boots.
    let second = Volume::new(4096, VOLUME_BYTES).unwrap();
    vmblk_unpack(&t.path().join("zstd.qcow2"), &second).unwrap();
    let a = std::fs::read(volume.device()).unwrap();
    let b = std::fs::read(second.device()).unwrap();
    assert_eq!(a.len(), b.len());
    assert!(a == b, "the volume unpacked from the packed image differs");
    drop((a, b));
    let export = CommandExport::start(CommandExportParams::vmblk(second.device(), 512)).unwrap();
    let params = GuestParams::boot_from(&export).log_name("pack_unpacked_again");
    let outcome = Guest::start(&params).unwrap().expect_clean_run(1);
    eprintln!("packed, unpacked again, booted in {:?}", outcome.elapsed);
}
