//! Partition repair and verification on real loop devices.
//!
//! A 4096-byte-sector loop device over a sparse file stands in for a 4K
//! NVMe drive; a 512-byte loop device stacked over it is the bridge the
//! repair runs through. The image is built at test time with sgdisk,
//! mkfs.vfat and mkfs.ext4. Needs root; serialised with every other
//! loop-device test through an flock on /tmp/vmblk-loop-tests.lock; every
//! loop device is detached by an RAII guard, also when a test fails.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use image_unpack::partition::{
    detect_table_sector_size, inspect, repair, DetectedLayout, Error, RepairAction, RepairOptions,
    RepairOutcome,
};
use image_unpack::verify;

const MIB: u64 = 1 << 20;
const IMAGE: u64 = 64 * MIB;
const DEVICE: u64 = 160 * MIB;
const EXT4_UUID: &str = "3f1b9c2e-5a47-4c1d-9e0a-7b6d2c8f1a55";
const VFAT_ID: &str = "1234ABCD";

/// Holds the cross-binary loop-test lock for the life of a test and says
/// how long the test held it (the rest of a run is waiting for other tests).
struct LoopLock {
    _flock: nix::fcntl::Flock<File>,
    since: std::time::Instant,
}

impl Drop for LoopLock {
    fn drop(&mut self) {
        eprintln!(
            "held the loop-test lock for {:.1} s",
            self.since.elapsed().as_secs_f64()
        );
    }
}

fn lock() -> LoopLock {
    assert!(
        nix::unistd::geteuid().is_root(),
        "partition loop-device tests need root (they attach loop devices); run them as root"
    );
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/vmblk-loop-tests.lock")
        .expect("open /tmp/vmblk-loop-tests.lock");
    let flock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("flock /tmp/vmblk-loop-tests.lock");
    LoopLock {
        _flock: flock,
        since: std::time::Instant::now(),
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}):\n{text}",
        out.status
    );
    text
}

/// A loop device this test attached; detached on drop.
struct Loop(String);

impl Loop {
    fn attach(
        backing: &Path,
        sector_size: u32,
        range: Option<(u64, u64)>,
        read_only: bool,
    ) -> Loop {
        let ss = sector_size.to_string();
        let mut args = vec!["-f", "--show", "--sector-size", ss.as_str()];
        let (off, len);
        if let Some((o, l)) = range {
            off = o.to_string();
            len = l.to_string();
            args.extend(["--offset", off.as_str(), "--sizelimit", len.as_str()]);
        }
        if read_only {
            args.push("-r");
        }
        let b = backing.to_str().unwrap();
        args.push(b);
        let dev = run("losetup", &args).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        Loop(dev)
    }

    fn path(&self) -> &Path {
        Path::new(&self.0)
    }

    fn size(&self) -> u64 {
        File::open(&self.0).unwrap().seek(SeekFrom::End(0)).unwrap()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let ok = Command::new("losetup")
            .args(["-d", &self.0])
            .status()
            .is_ok_and(|s| s.success());
        if !ok && !std::thread::panicking() {
            panic!("losetup -d {} failed", self.0);
        }
    }
}

/// Builds a 64 MiB 512-byte-sector GPT image: ESP (vfat) at 1 MiB, 16 MiB;
/// Linux root (ext4) after it to the end.
fn build_image(dir: &Path) -> PathBuf {
    let img = dir.join("image.raw");
    File::create(&img).unwrap().set_len(IMAGE).unwrap();
    let p = img.to_str().unwrap();
    run(
        "sgdisk",
        &[
            "-o",
            "-n",
            "1:2048:+16M",
            "-t",
            "1:ef00",
            "-c",
            "1:ESP",
            "-n",
            "2:0:0",
            "-t",
            "2:8300",
            "-c",
            "2:root",
            p,
        ],
    );
    let rep = inspect(&mut File::open(&img).unwrap(), 512, IMAGE).unwrap();
    assert_eq!(rep.partitions.len(), 2);
    let (esp, root) = (&rep.partitions[0], &rep.partitions[1]);
    let esp_kib = (esp.size_bytes / 1024).to_string();
    run(
        "mkfs.vfat",
        &[
            "-F",
            "32",
            "-n",
            "ESP",
            "-i",
            VFAT_ID,
            &format!("--offset={}", esp.first_lba),
            p,
            &esp_kib,
        ],
    );
    let root_kib = format!("{}k", root.size_bytes / 1024);
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-L",
            "root",
            "-U",
            EXT4_UUID,
            "-E",
            &format!("offset={}", root.first_lba * 512),
            p,
            &root_kib,
        ],
    );
    img
}

fn copy_onto(img: &Path, dev: &Path) {
    let mut src = File::open(img).unwrap();
    let mut dst = OpenOptions::new().write(true).open(dev).unwrap();
    std::io::copy(&mut src, &mut dst).unwrap();
    dst.sync_all().unwrap();
}

/// A 4K loop device over a fresh sparse file with the image on it.
fn four_k_device(dir: &Path, img: &Path) -> Loop {
    let backing = dir.join("volume");
    File::create(&backing).unwrap().set_len(DEVICE).unwrap();
    let l = Loop::attach(&backing, 4096, None, false);
    copy_onto(img, l.path());
    l
}

fn read_all(dev: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(dev).unwrap().read_to_end(&mut v).unwrap();
    v
}

fn repair_dev(
    dev: &Path,
    opts: &RepairOptions,
) -> Result<image_unpack::partition::RepairReport, Error> {
    let mut f = OpenOptions::new().read(true).write(true).open(dev).unwrap();
    let size = f.seek(SeekFrom::End(0)).unwrap();
    let r = repair(&mut f, 512, size, opts);
    f.sync_all().unwrap();
    r
}

fn assert_sgdisk_clean(dev: &Path) {
    let out = run("sgdisk", &["-v", dev.to_str().unwrap()]);
    assert!(
        out.contains("No problems found"),
        "sgdisk -v {}:\n{out}",
        dev.display()
    );
}

/// fsck each partition through a read-only loop device with --offset/--sizelimit.
fn assert_fsck_clean(bridge: &Loop) {
    let rep = inspect(&mut File::open(bridge.path()).unwrap(), 512, bridge.size()).unwrap();
    for p in &rep.partitions {
        let l = Loop::attach(
            bridge.path(),
            512,
            Some((p.first_lba * 512, p.size_bytes)),
            true,
        );
        let d = l.path().to_str().unwrap();
        match p.name.as_str() {
            "ESP" => {
                run("fsck.vfat", &["-n", d]);
            }
            "root" => {
                run("e2fsck", &["-f", "-n", d]);
            }
            other => panic!("unexpected partition {other}"),
        }
    }
}

fn assert_verified(dev: &Path) {
    let v = verify(dev, 512).unwrap();
    assert!(v.ok, "{:#?}", v.problems);
    assert!(v.headers_valid && v.backup_at_end && v.entries_identical);
    let esp = &v.partitions[0];
    assert_eq!(esp.fs_type.as_deref(), Some("vfat"));
    assert_eq!(esp.label.as_deref(), Some("ESP"));
    assert_eq!(esp.uuid.as_deref(), Some("1234-ABCD"));
    let root = &v.partitions[1];
    assert_eq!(root.fs_type.as_deref(), Some("ext4"));
    assert_eq!(root.uuid.as_deref(), Some(EXT4_UUID));
    assert_eq!(root.label.as_deref(), Some("root"));
    assert_eq!(root.part_label, "root");
    assert_eq!(root.partuuid.len(), 36);
}

#[test]
fn partition_repair_through_512_bridge_on_4k_device() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let img = build_image(dir.path());
    let dev4k = four_k_device(dir.path(), &img);
    // The 4K device itself shows no GPT at 4096.
    let d = detect_table_sector_size(&mut File::open(dev4k.path()).unwrap(), DEVICE).unwrap();
    assert_eq!(d.layout, DetectedLayout::Gpt { sector_size: 512 });
    {
        let bridge = Loop::attach(dev4k.path(), 512, None, false);
        assert_eq!(bridge.size(), DEVICE);
        let r = repair_dev(bridge.path(), &RepairOptions::default()).unwrap();
        assert_eq!(r.outcome, RepairOutcome::Repaired);
        assert!(
            r.actions
                .iter()
                .any(|a| matches!(a, RepairAction::RelocateBackup { .. })),
            "{:?}",
            r.actions
        );
        assert_sgdisk_clean(bridge.path());
        assert_fsck_clean(&bridge);
        assert_verified(bridge.path());
        // Idempotent.
        let r = repair_dev(bridge.path(), &RepairOptions::default()).unwrap();
        assert_eq!(r.outcome, RepairOutcome::AlreadyClean);
    }
    // Verification reads the 4K device directly at 512-byte offsets too.
    assert_verified(dev4k.path());
}

#[test]
fn partition_dry_run_on_4k_device_changes_nothing() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let img = build_image(dir.path());
    let dev4k = four_k_device(dir.path(), &img);
    let bridge = Loop::attach(dev4k.path(), 512, None, false);
    let before = read_all(bridge.path());
    let r = repair_dev(
        bridge.path(),
        &RepairOptions {
            dry_run: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!r.actions.is_empty());
    assert!(
        read_all(bridge.path()) == before,
        "dry run wrote to the device"
    );
}

#[test]
fn partition_sgdisk_e_accident_recovered() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let img = build_image(dir.path());
    let dev4k = four_k_device(dir.path(), &img);
    // The accident: sgdisk -e straight on the 4K device.
    run("sgdisk", &["-e", dev4k.path().to_str().unwrap()]);
    let d = detect_table_sector_size(&mut File::open(dev4k.path()).unwrap(), DEVICE).unwrap();
    assert!(d.suspected_sgdisk_accident, "{d:?}");
    assert_eq!(d.layout, DetectedLayout::Both { likely: 512 });
    let bridge = Loop::attach(dev4k.path(), 512, None, false);
    let r = repair_dev(bridge.path(), &RepairOptions::default()).unwrap();
    assert!(
        r.actions
            .contains(&RepairAction::RecoverFromSurvivingBackup {
                lba: IMAGE / 512 - 1
            }),
        "{:#?}",
        r.actions
    );
    assert_sgdisk_clean(bridge.path());
    assert_fsck_clean(&bridge);
    assert_verified(bridge.path());
    drop(bridge);
    let d = detect_table_sector_size(&mut File::open(dev4k.path()).unwrap(), DEVICE).unwrap();
    assert_eq!(
        d.layout,
        DetectedLayout::Gpt { sector_size: 512 },
        "no 4K GPT left: {d:?}"
    );
}

#[test]
fn partition_sgdisk_e_accident_without_survivor_writes_nothing() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let img = build_image(dir.path());
    // Lose the image's backup header too.
    let mut f = OpenOptions::new().write(true).open(&img).unwrap();
    f.seek(SeekFrom::Start(IMAGE - 512)).unwrap();
    f.write_all(&[0; 512]).unwrap();
    drop(f);
    let dev4k = four_k_device(dir.path(), &img);
    run("sgdisk", &["-e", dev4k.path().to_str().unwrap()]);
    let bridge = Loop::attach(dev4k.path(), 512, None, false);
    let before = read_all(bridge.path());
    let e = repair_dev(
        bridge.path(),
        &RepairOptions {
            force: true,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::NothingToRestore { .. }), "{e}");
    assert!(
        read_all(bridge.path()) == before,
        "a refused repair wrote to the device"
    );
}

#[test]
fn partition_4k_native_table_repaired_at_4096_after_growth() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("volume4k");
    File::create(&backing).unwrap().set_len(IMAGE).unwrap();
    {
        // A 4K-native table, built by sgdisk on a 4K device.
        let l = Loop::attach(&backing, 4096, None, false);
        let d = l.path().to_str().unwrap();
        run(
            "sgdisk",
            &[
                "-o",
                "-n",
                "1:256:+16M",
                "-t",
                "1:ef00",
                "-c",
                "1:ESP",
                "-n",
                "2:0:0",
                "-t",
                "2:8300",
                d,
            ],
        );
    }
    // The volume grows.
    File::options()
        .write(true)
        .open(&backing)
        .unwrap()
        .set_len(DEVICE)
        .unwrap();
    let l = Loop::attach(&backing, 4096, None, false);
    let d = detect_table_sector_size(&mut File::open(l.path()).unwrap(), DEVICE).unwrap();
    assert_eq!(d.layout, DetectedLayout::Gpt { sector_size: 4096 });
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(l.path())
        .unwrap();
    let r = repair(
        &mut f,
        4096,
        DEVICE,
        &RepairOptions {
            grow_last_partition: true,
            ..Default::default()
        },
    )
    .unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert!(r
        .actions
        .iter()
        .any(|a| matches!(a, RepairAction::GrowLastPartition { index: 2, .. })));
    assert_sgdisk_clean(l.path());
    let v = verify(l.path(), 4096).unwrap();
    assert!(v.ok, "{:#?}", v.problems);
    assert_eq!(v.table.partitions[1].last_lba, DEVICE / 4096 - 6);
}
