//! `vmblk export rbd:...` and `vmblk export null:SIZE` on a real one-node Ceph cluster
//! the tests start themselves: libblkio's conformance checks (the frontend QEMU uses
//! outside QEMU), a UEFI guest booting from an RBD image with one and four queues, and a
//! snapshot exported read-only. The cluster going away under a guest is in
//! rbd_cluster_trouble.rs.

use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::{
    vmblk_bin, BlkioClient, CephCluster, CommandExport, CommandExportParams, Export, Guest,
    GuestParams, TestImage, IMAGE_BYTES,
};

const VOLUME_BYTES: u64 = 192 << 20;
/// Buffer of the libblkio client: room for 1 MiB requests and 1022 scattered segments.
const BUF: usize = 4 << 20;

fn export(volume: &str, queues: u16, extra: &[&str]) -> CommandExport {
    let mut p = CommandExportParams::vmblk(Path::new(volume), 512);
    p.args
        .extend(["--num-queues".to_string(), queues.to_string()]);
    p.args.extend(extra.iter().map(|s| s.to_string()));
    p.num_queues = queues;
    CommandExport::start(p).unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(37).wrapping_add((i % 253) as u8))
        .collect()
}

/// Writes a pattern of `len` bytes at `off` and reads it back into another part of the
/// buffer; returns what came back.
fn write_read(c: &mut BlkioClient, off: u64, len: usize, seed: u8) -> (Vec<u8>, Vec<u8>) {
    let data = pattern(seed, len);
    c.mem()[..len].copy_from_slice(&data);
    assert_eq!(c.write(off, 0, len).unwrap(), 0, "write {len} at {off}");
    c.mem()[BUF / 2..BUF / 2 + len].fill(0xee);
    assert_eq!(c.read(off, BUF / 2, len).unwrap(), 0, "read {len} at {off}");
    (data, c.mem()[BUF / 2..BUF / 2 + len].to_vec())
}

/// The checks both volumes pass: what differs is whether data stays (`stores`).
fn conformance(socket: &Path, size: u64, stores: bool) {
    let mut c = BlkioClient::connect(socket, 1024, BUF).unwrap();
    assert_eq!(c.get_u64("capacity").unwrap(), size);
    for (off, len, seed) in [
        (0u64, 512usize, 1u8),
        (512 * 7, 512, 2),
        (4096 * 3, 4096, 3),
        (1 << 20, 1 << 20, 4),
        (size - 4096, 4096, 5),
    ] {
        let (data, back) = write_read(&mut c, off, len, seed);
        if stores {
            assert!(back == data, "{len} bytes at {off} read back wrong");
        } else {
            assert!(back.iter().all(|&b| b == 0), "null read at {off} not zero");
        }
    }
    assert_eq!(c.flush().unwrap(), 0, "flush");
    // Write-zeroes and discard of a written range (1 MiB: whole RADOS objects are 4 MiB,
    // so librbd zeroes the bytes in place).
    write_read(&mut c, 8 << 20, 1 << 20, 6);
    assert_eq!(c.write_zeroes(8 << 20, 1 << 20).unwrap(), 0, "write zeroes");
    assert_eq!(c.read(8 << 20, 0, 1 << 20).unwrap(), 0);
    assert!(
        c.mem()[..1 << 20].iter().all(|&b| b == 0),
        "not zero after write-zeroes"
    );
    assert_eq!(c.discard(16 << 20, 8 << 20).unwrap(), 0, "discard");
    // Requests of 515 (Windows' largest) and 1022 (seg_max at queue size 1024) segments.
    for n in [515, 1022] {
        if stores {
            c.vectored_round_trip(n, 24 << 20)
                .unwrap_or_else(|e| panic!("{n} segments: {e:#}"));
        }
    }
    // Past the end: an error, promptly, and the queue still works.
    let t0 = Instant::now();
    assert_ne!(
        c.read(size, 0, 4096).unwrap(),
        0,
        "read past the end succeeded"
    );
    assert_ne!(
        c.read(size - 512, 0, 1024).unwrap(),
        0,
        "read across the end succeeded"
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    write_read(&mut c, 0, 4096, 7);
}

#[test]
fn blkio_conformance_on_an_rbd_export_and_on_null() {
    let cluster = CephCluster::start().unwrap();
    let size = 64u64 << 20;
    cluster
        .rbd(&["create", "--size", "64M", "vmblk/blk"])
        .unwrap();
    let rbd = export(&cluster.rbd_spec("blk"), 1, &[]);
    conformance(rbd.socket(), size, true);
    // What the guest wrote is in the image, as QEMU's own librbd driver reads it.
    let back = tempfile::NamedTempFile::new().unwrap();
    integration_tests::run(
        std::process::Command::new("qemu-img")
            .args(["convert", "-O", "raw", &cluster.rbd_spec("blk")])
            .arg(back.path()),
    )
    .unwrap();
    let bytes = std::fs::read(back.path()).unwrap();
    assert_eq!(&bytes[..4096], &pattern(7, 4096)[..], "first block");
    assert_eq!(
        &bytes[(size - 4096) as usize..],
        &pattern(5, 4096)[..],
        "last block"
    );
    assert!(!rbd.logs().contains("panicked"), "{}", rbd.logs());
    drop(rbd);

    let null = export("null:64M", 1, &[]);
    conformance(null.socket(), size, false);
    cluster.stop().unwrap();
}

#[test]
fn a_snapshot_is_exported_read_only() {
    let cluster = CephCluster::start().unwrap();
    cluster
        .rbd(&["create", "--size", "16M", "vmblk/snapped"])
        .unwrap();
    let live = export(&cluster.rbd_spec("snapped"), 1, &[]);
    let mut c = BlkioClient::connect(live.socket(), 256, BUF).unwrap();
    let (data, _) = write_read(&mut c, 0, 4096, 9);
    drop(c);
    drop(live);
    cluster
        .rbd(&["snap", "create", "vmblk/snapped@s1"])
        .unwrap();
    let spec = cluster.rbd_spec("snapped@s1");
    let snap = export(&spec, 1, &[]);
    // libblkio refuses a read-write start of a device that offers VIRTIO_BLK_F_RO.
    let rw = BlkioClient::connect(snap.socket(), 256, BUF);
    let e = rw.expect_err("a read-write client started on a snapshot");
    assert!(format!("{e:#}").contains("read-only"), "{e:#}");
    let mut c = BlkioClient::connect_read_only(snap.socket(), 256, BUF).unwrap();
    assert!(c.get_bool("read-only").unwrap());
    assert_eq!(c.read(0, BUF / 2, 4096).unwrap(), 0);
    assert!(
        c.mem()[BUF / 2..BUF / 2 + 4096] == data[..],
        "snapshot data"
    );
    c.mem()[..4096].fill(1);
    assert_ne!(
        c.write(0, 0, 4096).unwrap(),
        0,
        "a write to a snapshot succeeded"
    );
    cluster.stop().unwrap();
}

/// Boots the test image from an RBD image through `vmblk export` and checks what the
/// guest saw.
fn boot(export: &CommandExport, name: &str, cpus: u32) {
    let mut params = GuestParams::boot_from(export).log_name(name);
    params.cpus = cpus;
    let mut guest = Guest::start(&params).unwrap();
    let outcome = guest.expect_clean_run(1);
    eprintln!("{name}: guest run {:?}", outcome.elapsed);
    let boot = outcome.report.last().unwrap();
    assert_eq!(
        boot.value("logical_block_size"),
        Some("512"),
        "{}",
        guest.diagnostics()
    );
    assert_eq!(
        boot.value("disk_bytes"),
        Some(VOLUME_BYTES.to_string().as_str()),
        "{}",
        guest.diagnostics()
    );
    if let Err(e) = boot.ensure_passed() {
        panic!("{e:#}\n{}", guest.diagnostics());
    }
}

#[test]
fn a_uefi_guest_boots_from_an_rbd_image_with_one_and_four_queues() {
    let image = TestImage::standard().unwrap();
    const { assert!(IMAGE_BYTES < VOLUME_BYTES) };
    let cluster = CephCluster::start().unwrap();
    let spec = cluster.rbd_spec("boot");
    let out = integration_tests::run(
        std::process::Command::new(vmblk_bin())
            .arg("unpack")
            .arg(&image.qcow2)
            .arg(&spec)
            .args(["--size", &VOLUME_BYTES.to_string()]),
    )
    .unwrap();
    eprintln!("{out}");
    let one = export(&spec, 1, &[]);
    boot(&one, "rbd_q1", 1);
    drop(one);
    let four = export(&spec, 4, &[]);
    boot(&four, "rbd_q4", 2);
    assert!(!four.logs().contains("panicked"), "{}", four.logs());
    cluster.stop().unwrap();
}
