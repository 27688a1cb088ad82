//! Hostile qcow2 images made from real ones (qemu-img, then a few bytes changed): a tiny
//! file whose L1 entries all name one L2 table (a 4 TiB disk from 192 KiB, which took
//! seconds to minutes to open when each entry walked the table again), plain and inside
//! an Incus tarball; and a compressed cluster descriptor pointing at the header, which
//! was found only mid-copy. Each is refused at open, naming what is wrong, and `unpack`
//! writes nothing to the target.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use image_unpack::source::{self, OpenOptions, SourceError};
use image_unpack::{NoProgress, UnpackError, UnpackOptions};

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// A real qcow2 of `size` with `cluster_size` clusters and one cluster written, whose
/// every L1 entry is then pointed at that cluster's L2 table.
fn shared_l2(dir: &Path, cluster_size: u64, size: &str) -> PathBuf {
    let p = dir.join(format!("shared-{cluster_size}.qcow2"));
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o"])
        .arg(format!("cluster_size={cluster_size}"))
        .arg(&p)
        .arg(size));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 4k"])
        .arg(&p));
    let mut img = fs::read(&p).unwrap();
    let l1_size = u32::from_be_bytes(img[36..40].try_into().unwrap()) as usize;
    let l1 = be64(&img, 40) as usize;
    let first = img[l1..l1 + 8].to_vec();
    assert_ne!(be64(&first, 0), 0, "qemu-io allocated an L2 table");
    for i in 1..l1_size {
        img[l1 + 8 * i..l1 + 8 * i + 8].copy_from_slice(&first);
    }
    fs::write(&p, &img).unwrap();
    p
}

fn corrupt_message(r: Result<Box<dyn source::ImageSource>, SourceError>) -> String {
    match r {
        Err(SourceError::Corrupt(m)) => m,
        Err(e) => panic!("refused, but not as corrupt: {e}"),
        Ok(_) => panic!("a hostile image was opened"),
    }
}

#[test]
fn an_l2_table_shared_by_every_l1_entry_is_refused_at_open_for_every_cluster_size() {
    let dir = tempfile::tempdir().unwrap();
    for (cs, size) in [
        (512u64, "1G"),
        (4096, "64G"),
        (65536, "4T"),
        (2 << 20, "16T"),
    ] {
        let p = shared_l2(dir.path(), cs, size);
        let len = fs::metadata(&p).unwrap().len();
        let m = corrupt_message(source::open(&p, &OpenOptions::default()));
        assert!(m.contains("both name the L2 table"), "{cs}: {m}");
        assert!(len < 16 << 20, "{cs}: the image is {len} bytes");
    }
}

#[test]
fn an_l2_table_shared_by_every_l1_entry_is_refused_inside_an_incus_tarball() {
    let dir = tempfile::tempdir().unwrap();
    let p = shared_l2(dir.path(), 65536, "4T");
    let tree = dir.path().join("tree");
    fs::create_dir(&tree).unwrap();
    fs::write(
        tree.join("metadata.yaml"),
        "architecture: x86_64\ncreation_date: 1\nproperties:\n  os: hostile\n",
    )
    .unwrap();
    fs::copy(&p, tree.join("rootfs.img")).unwrap();
    for (name, flag) in [("image.tar", None), ("image.tar.xz", Some("-J"))] {
        let tarball = dir.path().join(name);
        let mut cmd = Command::new("tar");
        if let Some(f) = flag {
            cmd.arg(f);
        }
        run(cmd
            .arg("-C")
            .arg(&tree)
            .arg("-cf")
            .arg(&tarball)
            .args(["metadata.yaml", "rootfs.img"]));
        let m = corrupt_message(source::open(&tarball, &OpenOptions::default()));
        assert!(m.contains("both name the L2 table"), "{name}: {m}");
    }
}

/// A compressed qcow2 of a 4 MiB disk of data, with the descriptor of its second
/// cluster rewritten to point at offset 0 (the header).
fn compressed_at_zero(dir: &Path) -> PathBuf {
    let raw = dir.join("data.raw");
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    fs::write(&raw, &data).unwrap();
    let p = dir.join("compressed.qcow2");
    run(Command::new("qemu-img")
        .args([
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=65536",
        ])
        .arg(&raw)
        .arg(&p));
    let mut img = fs::read(&p).unwrap();
    let l1 = be64(&img, 40) as usize;
    let l2 = (be64(&img, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    // 64 KiB clusters: the host offset is the low 62 - 8 bits.
    let entry = be64(&img, l2 + 8);
    assert_ne!(entry & (1 << 62), 0, "cluster 1 is compressed");
    let mask = (1u64 << 54) - 1;
    img[l2 + 8..l2 + 16].copy_from_slice(&(entry & !mask).to_be_bytes());
    fs::write(&p, &img).unwrap();
    p
}

#[test]
fn a_compressed_cluster_at_the_header_is_refused_at_open_and_unpack_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = compressed_at_zero(dir.path());
    let m = corrupt_message(source::open(&p, &OpenOptions::default()));
    assert!(
        m.contains("compressed cluster at 0x0") && m.contains("header"),
        "{m}"
    );
    assert!(m.contains("guest offset 65536"), "{m}");

    let target = dir.path().join("target.img");
    let before = vec![0xa5u8; 8 << 20];
    fs::write(&target, &before).unwrap();
    let r = image_unpack::unpack(&p, &target, &UnpackOptions::default(), &NoProgress);
    match r {
        Err(UnpackError::Image {
            source: SourceError::Corrupt(m),
            ..
        }) => assert!(m.contains("compressed cluster at 0x0"), "{m}"),
        Err(e) => panic!("refused, but not as a corrupt image: {e}"),
        Ok(_) => panic!("unpacked a hostile image"),
    }
    assert!(
        fs::read(&target).unwrap() == before,
        "the target was written"
    );
}
