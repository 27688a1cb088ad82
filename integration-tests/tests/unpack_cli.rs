//! `vmblk unpack` / `repair` / `inspect` on real loop devices: a 4096-sector loop over
//! a sparse file stands in for a 4K NVMe drive, a 512-sector one is the control.
//!
//! After unpack, `sgdisk -v` through a 512-byte loop device finds no problems, fsck of
//! each partition is clean, and the known files read back identical. Bad input fails
//! with its documented exit code and leaves the target untouched.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::{Command, Output};

use integration_tests::{
    damage_with_direct_sgdisk, loop_tests_lock, run, sha256_hex, vmblk_bin, TestImage, Volume, ESP,
    IMAGE_BYTES, ROOT,
};
use loop_bridge::{bound_loop_devices, AttachOptions, LoopDevice};

const VOLUME_BYTES: u64 = 192 << 20;

fn vmblk_run(args: &[&str]) -> (i32, serde_json::Value, String) {
    let out: Output = Command::new(vmblk_bin())
        .args(args)
        .output()
        .expect("running vmblk");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (
        out.status.code().unwrap_or(-1),
        json,
        format!("stdout:\n{stdout}\nstderr:\n{stderr}"),
    )
}

fn loops_bound() -> usize {
    bound_loop_devices().expect("listing loop devices").len()
}

/// A read-only loop device over `[offset, offset + len)` of `file`.
fn window(file: &Path, offset: u64, len: u64) -> LoopDevice {
    LoopDevice::attach(
        file,
        &AttachOptions {
            read_only: true,
            offset,
            size_limit: len,
            ..AttachOptions::default()
        },
    )
    .expect("attaching a partition window")
}

/// `sgdisk -v` and `sgdisk -p` through a 512-byte loop device over the volume.
fn sgdisk_verify(volume: &Volume) -> String {
    let bridge = LoopDevice::attach(
        volume.device(),
        &AttachOptions {
            logical_block_size: 512,
            read_only: true,
            ..AttachOptions::default()
        },
    )
    .expect("attaching a 512 view");
    let mut text = String::new();
    for flag in ["-v", "-p"] {
        let out = Command::new("sgdisk")
            .arg(flag)
            .arg(bridge.path())
            .output()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    text
}

/// The table seen at 512-byte sectors is the image's, intact.
fn assert_table_intact(volume: &Volume) {
    let v = sgdisk_verify(volume);
    assert!(v.contains("No problems found"), "sgdisk -v:\n{v}");
    for p in integration_tests::PARTITIONS {
        assert!(v.contains(p.name), "partition {} missing:\n{v}", p.name);
    }
}

/// fsck of both file systems and the known files, read from the backing file.
fn check_filesystems(volume: &Volume, image: &TestImage) {
    let esp = window(volume.file(), ESP.offset(), ESP.size_bytes);
    run(Command::new("fsck.vfat").arg("-n").arg(esp.path())).expect("ESP fsck");
    drop(esp);
    let root = window(volume.file(), ROOT.offset(), ROOT.size_bytes);
    run(Command::new("e2fsck").arg("-fn").arg(root.path())).expect("root fsck");
    for (path, sum) in &image.manifest {
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat /{path}"))
            .arg(root.path())
            .output()
            .unwrap();
        assert_eq!(
            &sha256_hex(&out.stdout),
            sum,
            "/{path} differs after unpack"
        );
    }
}

fn unpack_onto(sector_size: u32, image_path: &Path) -> (Volume, serde_json::Value) {
    let volume = Volume::new(sector_size, VOLUME_BYTES).unwrap();
    let (code, json, out) = vmblk_run(&[
        "unpack",
        image_path.to_str().unwrap(),
        volume.device().to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "unpack failed\n{out}");
    (volume, json)
}

#[test]
fn unpack_qcow2_on_4k_volume_repairs_through_a_512_bridge() {
    let _lock = loop_tests_lock().unwrap();
    let image = TestImage::standard().unwrap();
    let before = loops_bound();
    let (volume, r) = unpack_onto(4096, &image.qcow2);

    assert_eq!(r["target"]["logical_block_size"], 4096, "{r:#}");
    assert_eq!(r["virtual_size"], IMAGE_BYTES);
    assert_eq!(r["table"]["table_sector_size"], 512);
    assert_eq!(r["table"]["bridge"]["sector_size"], 512, "{r:#}");
    assert_eq!(r["table"]["verify"]["ok"], true, "{r:#}");
    let actions = r["table"]["repair"]["actions"].as_array().unwrap();
    assert!(
        actions.iter().any(|a| a["action"] == "relocate_backup"),
        "backup GPT not moved to the volume end: {actions:?}"
    );
    assert!(
        r["copy"]["bytes_zeroed"].as_u64().unwrap() > 0,
        "zero regions were written"
    );
    assert_eq!(loops_bound(), before + 1, "the bridge was not removed");

    assert_table_intact(&volume);
    check_filesystems(&volume, &image);
}

#[test]
fn unpack_raw_on_512_volume_needs_no_bridge() {
    let _lock = loop_tests_lock().unwrap();
    let image = TestImage::standard().unwrap();
    let (volume, r) = unpack_onto(512, &image.raw);
    assert_eq!(r["source_format"], "raw");
    assert_eq!(r["table"]["bridge"], serde_json::Value::Null, "{r:#}");
    assert_eq!(r["table"]["verify"]["ok"], true, "{r:#}");
    assert_table_intact(&volume);
    check_filesystems(&volume, &image);
}

#[test]
fn unpack_overwrites_an_older_guests_data_in_zero_regions() {
    let _lock = loop_tests_lock().unwrap();
    let image = TestImage::standard().unwrap();
    let volume = Volume::new(4096, VOLUME_BYTES).unwrap();
    // An older guest's data everywhere the new image is zero (its scratch partition).
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(volume.file())
        .unwrap();
    let junk = vec![0xA5u8; 1 << 20];
    let scratch = integration_tests::SCRATCH;
    f.write_all_at(&junk, scratch.offset()).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let (code, _, out) = vmblk_run(&[
        "unpack",
        image.qcow2.to_str().unwrap(),
        volume.device().to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{out}");
    let f = std::fs::File::open(volume.file()).unwrap();
    let mut back = vec![0u8; 1 << 20];
    f.read_exact_at(&mut back, scratch.offset()).unwrap();
    assert!(
        back.iter().all(|&b| b == 0),
        "old data survived in a region the image leaves zero"
    );
}

#[test]
fn sgdisk_e_accident_on_4k_device_is_recovered_by_repair() {
    let _lock = loop_tests_lock().unwrap();
    let image = TestImage::standard().unwrap();
    let volume = Volume::new(4096, VOLUME_BYTES).unwrap();
    integration_tests::write_image(&image.raw, volume.device()).unwrap();
    damage_with_direct_sgdisk(&volume).unwrap();
    let before = sgdisk_verify(&volume);
    assert!(
        !before.contains(ROOT.name),
        "the damage did not happen:\n{before}"
    );

    let (code, insp, out) = vmblk_run(&["inspect", volume.device().to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        insp["detection"]["suspected_sgdisk_accident"], true,
        "{insp:#}"
    );

    let (code, r, out) = vmblk_run(&["repair", volume.device().to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "repair failed\n{out}");
    assert_eq!(r["table"]["bridge"]["sector_size"], 512, "{r:#}");
    assert_eq!(r["table"]["verify"]["ok"], true, "{r:#}");
    assert_table_intact(&volume);
    check_filesystems(&volume, &image);
}

#[test]
fn repair_dry_run_writes_nothing() {
    let _lock = loop_tests_lock().unwrap();
    let image = TestImage::standard().unwrap();
    let volume = Volume::new(4096, VOLUME_BYTES).unwrap();
    integration_tests::write_image(&image.raw, volume.device()).unwrap();
    let sum = integration_tests::sha256_file(volume.file()).unwrap();
    let (code, r, out) = vmblk_run(&[
        "repair",
        volume.device().to_str().unwrap(),
        "--dry-run",
        "--json",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        !r["table"]["repair"]["actions"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{r:#}"
    );
    assert_eq!(integration_tests::sha256_file(volume.file()).unwrap(), sum);
}

/// Runs `vmblk unpack IMAGE TARGET` expecting failure with `code`; checks the target
/// is unchanged and no loop device leaked.
fn expect_refusal(image: &Path, volume: &Volume, code: i32, needle: &str) {
    let before_loops = loops_bound();
    let sum = integration_tests::sha256_file(volume.file()).unwrap();
    let (got, json, out) = vmblk_run(&[
        "unpack",
        image.to_str().unwrap(),
        volume.device().to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(got, code, "{out}");
    assert_eq!(json["exit_code"], code, "{out}");
    let msg = json["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains(needle),
        "error {msg:?} does not name {needle:?}"
    );
    assert_eq!(
        integration_tests::sha256_file(volume.file()).unwrap(),
        sum,
        "target was written"
    );
    assert_eq!(loops_bound(), before_loops, "a loop device leaked");
}

#[test]
fn bad_images_and_targets_are_refused_before_writing() {
    let _lock = loop_tests_lock().unwrap();
    let image = TestImage::standard().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let volume = Volume::new(4096, VOLUME_BYTES).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(volume.file())
        .unwrap()
        .write_all_at(b"previous contents", 1 << 20)
        .unwrap();

    // Truncated qcow2: header and tables intact, clusters missing.
    let q = std::fs::read(&image.qcow2).unwrap();
    let truncated = dir.path().join("truncated.qcow2");
    std::fs::write(&truncated, &q[..q.len() / 3]).unwrap();
    expect_refusal(&truncated, &volume, 3, "truncated.qcow2");

    // A qcow2 header whose L1 table lies past the end of the file.
    let mut bad_l1 = q[..65536.min(q.len())].to_vec();
    bad_l1[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes());
    let bad = dir.path().join("bad-l1.qcow2");
    std::fs::write(&bad, &bad_l1).unwrap();
    expect_refusal(&bad, &volume, 3, "bad-l1.qcow2");

    // Image larger than the target.
    let small = Volume::new(4096, 64 << 20).unwrap();
    expect_refusal(&image.qcow2, &small, 4, "needs");

    // Missing target.
    let (code, json, out) = vmblk_run(&[
        "unpack",
        image.qcow2.to_str().unwrap(),
        "/dev/vmblk-no-such-volume",
        "--json",
    ]);
    assert_eq!(code, 4, "{out}");
    assert!(json["error"]
        .as_str()
        .unwrap()
        .contains("/dev/vmblk-no-such-volume"));

    // Busy target: held open exclusively by someone else.
    let held = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(volume.device())
        .unwrap();
    expect_refusal(&image.qcow2, &volume, 4, "busy");
    drop(held);
}

/// Every qcow2 variant qemu-img writes, unpacked onto a 4K volume, boots the same
/// bytes: the table verifies and the file systems and known files are intact.
#[test]
fn every_qcow2_variant_unpacks_onto_a_4k_volume() {
    let _lock = loop_tests_lock().unwrap();
    let image = TestImage::standard().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let variants: &[(&str, &[&str])] = &[
        ("v2", &["-o", "compat=0.10"]),
        ("c512", &["-o", "cluster_size=512"]),
        ("c2m", &["-o", "cluster_size=2M"]),
        ("zlib", &["-c"]),
        ("zstd", &["-c", "-o", "compression_type=zstd"]),
        ("extl2", &["-o", "extended_l2=on,cluster_size=128k"]),
        ("prealloc", &["-o", "preallocation=metadata"]),
    ];
    for (name, opts) in variants {
        let q = dir.path().join(format!("{name}.qcow2"));
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .args(*opts)
            .arg(&image.raw)
            .arg(&q))
        .unwrap();
        let (volume, r) = unpack_onto(4096, &q);
        assert_eq!(r["table"]["verify"]["ok"], true, "{name}: {r:#}");
        assert_table_intact(&volume);
        check_filesystems(&volume, &image);
        std::fs::remove_file(&q).unwrap();
    }
}
