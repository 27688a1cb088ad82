//! vmblk in a real LXD daemon (Debian 12's LXD 5.0.2: Incus's REST API and VM options),
//! started by the test (integration-tests/src/lxd.rs lists the host adaptations).
//!
//! ```text
//!  lxc image import (test image)  ──/1.0/events──► vmblkd caches it (no hook)
//!  vmblk incus launch IMAGE vm --pool nvme   (block pool: a 4096-sector loop device)
//!     └─ volume cloned, empty VM, raw.qemu += vhost-user disk (bootindex after LXD's),
//!        started; QEMU runs as LXD's unprivileged user `nobody`
//!  guest checks: 512-byte logical / 4096-byte physical sectors, checksums, writes
//!  again, vmblkd SIGKILLed at several moments of the boot and restarted: the guest
//!  carries on (QEMU, as nobody, reconnects to the sockets vmblkd recreates)
//!  vmblk incus detach, lxc delete: no export, socket or loop device left; volume stays
//!  the stock path: vmblk unpack onto a block device + LXD's own disk device
//! ```

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::{
    loop_tests_lock, run, unpacked_volume, GuestReport, LoopDevice, Lxd, TestImage, Vmblkd,
};

/// Longest run of one boot of the test image under LXD (TCG), to poweroff.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// A metadata tarball for `lxc image import` of the test image (split VM image).
fn metadata_tarball(dir: &Path) -> std::path::PathBuf {
    std::fs::write(
        dir.join("metadata.yaml"),
        "architecture: x86_64\ncreation_date: 1700000000\nproperties:\n  \
         description: vmblk test guest\n  os: vmblk\n  requirements.secureboot: \"false\"\n",
    )
    .unwrap();
    let t = dir.join("metadata.tar.gz");
    run(Command::new("tar")
        .arg("-C")
        .arg(dir)
        .arg("-czf")
        .arg(&t)
        .arg("metadata.yaml"))
    .unwrap();
    t
}

/// The guest's report of its last boot from the console log; every check passed.
fn last_boot_passed(console: &Path) -> integration_tests::BootReport {
    let log = std::fs::read_to_string(console).unwrap_or_default();
    let report = GuestReport::parse(&log);
    let last = report
        .last()
        .cloned()
        .unwrap_or_else(|| panic!("no guest report in the console log:\n{log}"));
    last.ensure_passed()
        .unwrap_or_else(|e| panic!("{e:#}\nconsole:\n{log}"));
    last
}

fn loop_devices() -> usize {
    let out = Command::new("losetup").arg("-a").output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn launch_boots_from_a_4k_block_pool_and_survives_vmblkd_crashes_during_boot_and_writes() {
    let _lock = loop_tests_lock().unwrap();
    let image = TestImage::standard().unwrap();
    let loops_before = loop_devices();
    let work = tempfile::tempdir().unwrap();
    let lxd = Lxd::start().unwrap();

    // The simulated 4K NVMe drive: vmblkd's block pool.
    let nvme_file = work.path().join("nvme.img");
    std::fs::File::create(&nvme_file)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let nvme = LoopDevice::attach(&nvme_file, 4096).unwrap();
    let config = format!(
        "pools:\n\
         - {{name: default, type: dir, path: {}}}\n\
         - {{name: nvme, type: block, devices: [{}]}}\n\
         incus: {{follow_images: true, socket: {}}}\n",
        work.path().join("dirpool").display(),
        nvme.path().display(),
        lxd.socket().display()
    );
    let mut vd = Vmblkd::start(&config).unwrap();

    // The image reaches vmblkd's cache through LXD's event stream.
    let meta = metadata_tarball(work.path());
    let out = lxd
        .lxc(&[
            "image",
            "import",
            meta.to_str().unwrap(),
            image.qcow2.to_str().unwrap(),
            "--alias",
            "vmblk-test",
        ])
        .unwrap();
    let fp = out
        .split_whitespace()
        .last()
        .expect("lxc image import prints the fingerprint")
        .to_owned();
    let t0 = Instant::now();
    while !vd.logs().contains("image imported by Incus/LXD: cached") {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "vmblkd did not cache the image from the event stream:\n{}",
            vd.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let socket = lxd.socket();
    let inc = |vd: &Vmblkd, args: &[&str]| {
        let mut a = vec!["incus", "--incus-socket", socket.to_str().unwrap()];
        a.extend_from_slice(args);
        vd.vmblk(&a)
    };
    let l = inc(&vd, &["launch", "vmblk-test", "vm1", "--pool", "nvme"]).unwrap();
    assert_eq!(l["image"], fp.as_str(), "{l}");
    assert_eq!(
        l["image_unpacked"], false,
        "the event stream had cached it: {l}"
    );
    let export_socket = l["socket"].as_str().unwrap().to_owned();
    // QEMU runs as `nobody` under LXD: the socket is its.
    let meta_sock = std::fs::metadata(&export_socket).unwrap();
    use std::os::unix::fs::MetadataExt;
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert_eq!(meta_sock.uid(), nobody.uid.as_raw());
    assert_eq!(meta_sock.mode() & 0o777, 0o600);

    lxd.wait_stopped("vm1", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", lxd.log()));
    let boot = last_boot_passed(&lxd.console_log());
    assert_eq!(boot.value("logical_block_size"), Some("512"));
    assert_eq!(boot.value("physical_block_size"), Some("4096"));

    // vmblkd killed with SIGKILL and restarted while the firmware reads the disk and
    // while the guest's kernel runs its checks and writes: the guest carries on. (Not in
    // the windows where the device is stopped: QEMU 7.2 survives one restart there, then
    // ignores the socket's later events; guest_reconnect_during_boot.rs has that case.)
    std::fs::write(lxd.console_log(), b"").unwrap();
    lxd.lxc(&["start", "vm1"]).unwrap();
    for marker in ["BdsDxe:", "VMBLK-BOOT n=2"] {
        let t0 = Instant::now();
        loop {
            let console = std::fs::read_to_string(lxd.console_log()).unwrap_or_default();
            if console.contains(marker) {
                break;
            }
            assert!(
                t0.elapsed() < BOOT_TIMEOUT,
                "no {marker:?} on the console:\n{console}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        vd.restart().unwrap();
    }
    lxd.wait_stopped("vm1", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}\nvmblkd:\n{}", vd.logs()));
    let again = last_boot_passed(&lxd.console_log());
    assert_eq!(again.boot, 2, "the guest booted from the same disk again");
    vd.check_alive().unwrap();

    // Detach and delete: no export, no socket, no loop device left; the volume stays.
    let d = inc(&vd, &["detach", "vm1", "vm1", "--pool", "nvme"]).unwrap();
    assert_eq!(d["removed_from_instance"], true, "{d}");
    lxd.lxc(&["delete", "vm1"]).unwrap();
    assert!(!Path::new(&export_socket).exists());
    let v = vd
        .vmblk(&["volume", "get", "vm1", "--pool", "nvme"])
        .unwrap();
    assert!(v["attachment"].is_null(), "{v}");
    drop(vd);
    drop(lxd);
    drop(nvme);
    assert_eq!(loop_devices(), loops_before, "a loop device was left");
}

#[test]
fn the_stock_path_boots_through_lxds_own_disk_device() {
    let _lock = loop_tests_lock().unwrap();
    let image = TestImage::standard().unwrap();
    let lxd = Lxd::start().unwrap();
    // vmblk unpack onto a host block device (4096-byte sectors), no daemon.
    let vol = unpacked_volume(&image.qcow2, 4096, 1 << 30).unwrap();
    lxd.lxc(&[
        "init",
        "vm2",
        "--empty",
        "--vm",
        "-c",
        "security.secureboot=false",
    ])
    .unwrap();
    lxd.lxc(&[
        "config",
        "device",
        "add",
        "vm2",
        "root2",
        "disk",
        &format!("source={}", vol.device().display()),
        "boot.priority=10",
    ])
    .unwrap();
    lxd.lxc(&["start", "vm2"]).unwrap();
    lxd.wait_stopped("vm2", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", lxd.log()));
    let boot = last_boot_passed(&lxd.console_log());
    // LXD attaches it as virtio-scsi with 512-byte sectors, logical and physical.
    assert!(
        boot.value("disk").is_some_and(|d| d.starts_with("sd")),
        "{boot:?}"
    );
    assert_eq!(boot.value("logical_block_size"), Some("512"));
    assert_eq!(boot.value("physical_block_size"), Some("512"));
    lxd.lxc(&["delete", "vm2"]).unwrap();
}
