//! Incus images: unified tarballs in every compression, split images, raw and qcow2
//! disks inside, and tarballs that must be refused. Tarballs are made by GNU tar and
//! the disks by qemu-img, as Incus users get them.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use image_unpack::source::{self, ImageSource, OpenOptions, SourceError, SourceFormat};

const MIB: usize = 1 << 20;

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

const METADATA: &str = "architecture: x86_64\ncreation_date: 1700000000\nproperties:\n  description: Debian bookworm amd64\n  os: Debian\n";

/// A raw disk of 5 MiB: data, a 2 MiB zero run, data.
fn disk() -> Vec<u8> {
    (0..5 * MIB)
        .map(|i| {
            if (MIB..3 * MIB).contains(&i) {
                0
            } else {
                (i * 31 % 241) as u8
            }
        })
        .collect()
}

struct Fx {
    dir: tempfile::TempDir,
}

impl Fx {
    /// A directory with metadata.yaml, rootfs.raw and rootfs.qcow2 (zlib-compressed).
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fx { dir };
        fs::write(fx.p("metadata.yaml"), METADATA).unwrap();
        fs::write(fx.p("disk.raw"), disk()).unwrap();
        run(Command::new("qemu-img")
            .args(["convert", "-c", "-O", "qcow2"])
            .arg(fx.p("disk.raw"))
            .arg(fx.p("disk.qcow2")));
        fs::create_dir(fx.p("templates")).unwrap();
        fs::write(fx.p("templates/hostname.tpl"), "{{ instance.name }}\n").unwrap();
        fx
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Stages `disk` as rootfs.img in a fresh directory and tars it with GNU tar,
    /// then compresses the tarball.
    fn unified(&self, disk: &str, compression: &str, extra_tar_args: &[&str]) -> PathBuf {
        let stage = self.p(&format!("stage-{disk}-{compression}"));
        fs::create_dir_all(stage.join("templates")).unwrap();
        fs::copy(self.p("metadata.yaml"), stage.join("metadata.yaml")).unwrap();
        fs::copy(
            self.p("templates/hostname.tpl"),
            stage.join("templates/hostname.tpl"),
        )
        .unwrap();
        // cp keeps zero runs as holes, so `tar --sparse` has something to find.
        run(Command::new("cp")
            .arg("--sparse=always")
            .arg(self.p(disk))
            .arg(stage.join("rootfs.img")));
        let tar = self.p(&format!("{disk}.tar"));
        run(Command::new("tar")
            .args(extra_tar_args)
            .arg("-cf")
            .arg(&tar)
            .arg("-C")
            .arg(&stage)
            .args(["metadata.yaml", "rootfs.img", "templates"]));
        compress(&tar, compression)
    }

    fn reference(&self, disk: &str) -> Vec<u8> {
        let out = self.p(&format!("{disk}.ref"));
        run(Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(self.p(disk))
            .arg(&out));
        fs::read(out).unwrap()
    }
}

/// Compresses `tar` with the crates' encoders; the name deliberately says nothing.
fn compress(tar: &Path, compression: &str) -> PathBuf {
    let data = fs::read(tar).unwrap();
    let out = tar.with_extension(format!("{compression}.img"));
    let bytes = match compression {
        "none" => data,
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&data).unwrap();
            e.finish().unwrap()
        }
        "xz" => {
            let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
            e.write_all(&data).unwrap();
            e.finish().unwrap()
        }
        "zstd" => zstd::encode_all(&data[..], 3).unwrap(),
        c => panic!("{c}"),
    };
    fs::write(&out, bytes).unwrap();
    out
}

fn assemble(src: &dyn ImageSource) -> Vec<u8> {
    let mut out = vec![0u8; src.virtual_size() as usize];
    let mut pos = 0;
    for e in src.extents() {
        let e = e.unwrap();
        assert_eq!(e.guest_offset, pos);
        pos += e.len;
        src.read_extent(&e, &mut out[e.guest_offset as usize..pos as usize])
            .unwrap();
    }
    assert_eq!(pos, src.virtual_size());
    out
}

fn incus(layout: &str, compression: &str, inner: SourceFormat) -> SourceFormat {
    SourceFormat::Incus {
        layout: layout.into(),
        compression: compression.into(),
        inner: Box::new(inner),
    }
}

fn qcow2_zlib() -> SourceFormat {
    SourceFormat::Qcow2 {
        version: 3,
        cluster_size: 65536,
        compression: "zlib".into(),
        extended_l2: false,
    }
}

#[test]
fn unified_tarball_with_qcow2_in_every_compression() {
    let fx = Fx::new();
    let want = fx.reference("disk.qcow2");
    for c in ["none", "gzip", "xz", "zstd"] {
        let img = fx.unified("disk.qcow2", c, &[]);
        let scratch = tempfile::tempdir().unwrap();
        let opts = OpenOptions {
            metadata: None,
            scratch_dir: Some(scratch.path().to_path_buf()),
        };
        let src = source::open(&img, &opts).unwrap_or_else(|e| panic!("{c}: {e}"));
        assert_eq!(src.format(), incus("unified", c, qcow2_zlib()), "{c}");
        assert!(assemble(src.as_ref()) == want, "{c}: contents differ");
        let md = src.incus_metadata().unwrap();
        assert_eq!(md.architecture.as_deref(), Some("x86_64"));
        assert_eq!(md.description.as_deref(), Some("Debian bookworm amd64"));
        // The scratch copy is unlinked: nothing is left behind, even while open.
        assert_eq!(fs::read_dir(scratch.path()).unwrap().count(), 0, "{c}");
        let info = source::probe(&img, &OpenOptions::default()).unwrap();
        assert_eq!(info.format, src.format());
        assert_eq!(info.virtual_size, 5 * MIB as u64);
    }
}

#[test]
fn unified_tarball_with_raw_disk_in_every_compression() {
    let fx = Fx::new();
    let want = disk();
    for c in ["none", "gzip", "xz", "zstd"] {
        let img = fx.unified("disk.raw", c, &[]);
        let src =
            source::open(&img, &OpenOptions::default()).unwrap_or_else(|e| panic!("{c}: {e}"));
        assert_eq!(src.format(), incus("unified", c, SourceFormat::Raw), "{c}");
        assert!(assemble(src.as_ref()) == want, "{c}: contents differ");
    }
}

#[test]
fn gnu_sparse_rootfs_is_read_through_the_archive() {
    let fx = Fx::new();
    let img = fx.unified("disk.raw", "none", &["--sparse", "--format=gnu"]);
    let mut archive = tar::Archive::new(fs::File::open(&img).unwrap());
    let sparse = archive.entries().unwrap().map(|e| e.unwrap()).any(|e| {
        e.path().unwrap().ends_with("rootfs.img") && e.header().entry_type().is_gnu_sparse()
    });
    assert!(
        sparse,
        "GNU tar did not store rootfs.img as a sparse member"
    );
    let src = source::open(&img, &OpenOptions::default()).unwrap();
    assert!(assemble(src.as_ref()) == disk());
}

#[test]
fn split_image_takes_rootfs_and_metadata_tarball() {
    let fx = Fx::new();
    let meta_tar = fx.p("meta.tar");
    run(Command::new("tar")
        .arg("-cf")
        .arg(&meta_tar)
        .arg("-C")
        .arg(fx.dir.path())
        .args(["metadata.yaml", "templates"]));
    let meta = compress(&meta_tar, "xz");
    let opts = OpenOptions {
        metadata: Some(meta.clone()),
        scratch_dir: None,
    };
    let src = source::open(&fx.p("disk.qcow2"), &opts).unwrap();
    assert_eq!(src.format(), incus("split", "xz", qcow2_zlib()));
    assert_eq!(
        src.incus_metadata().unwrap().architecture.as_deref(),
        Some("x86_64")
    );
    assert!(assemble(src.as_ref()) == fx.reference("disk.qcow2"));
    let info = source::probe(&fx.p("disk.qcow2"), &opts).unwrap();
    assert_eq!(info.format, src.format());

    // The metadata tarball alone is not an image, and says how to use it.
    let e = source::open(&meta, &OpenOptions::default()).unwrap_err();
    assert!(
        matches!(&e, SourceError::Unsupported(m) if m.contains("split")),
        "{e}"
    );
    // A metadata "tarball" that is not one.
    let bad = OpenOptions {
        metadata: Some(fx.p("disk.raw")),
        scratch_dir: None,
    };
    assert!(matches!(
        source::open(&fx.p("disk.qcow2"), &bad),
        Err(SourceError::Unsupported(_))
    ));
}

/// A tar whose first entry has `name` written verbatim into the header.
fn tar_with_raw_name(name: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(4);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_cksum();
    b.append(&h, &b"evil"[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(1024);
    h.set_cksum();
    b.append_data(&mut h, "rootfs.img", &[0u8; 1024][..])
        .unwrap();
    b.into_inner().unwrap()
}

#[test]
fn unsafe_entry_paths_are_refused_in_every_compression() {
    let dir = tempfile::tempdir().unwrap();
    for (name, why) in [
        ("../../etc/cron.d/x", "`..`"),
        ("/etc/passwd", "absolute"),
        ("a/../../b", "`..`"),
    ] {
        let plain = dir.path().join("evil.tar");
        fs::write(&plain, tar_with_raw_name(name)).unwrap();
        for c in ["none", "gzip", "xz", "zstd"] {
            let img = compress(&plain, c);
            let e = source::open(&img, &OpenOptions::default()).unwrap_err();
            assert!(
                matches!(&e, SourceError::Unsupported(m) if m.contains(why)),
                "{name} {c}: {e}"
            );
        }
    }
}

#[test]
fn rootfs_that_is_a_link_or_device_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (ty, why) in [
        (tar::EntryType::Symlink, "symbolic link"),
        (tar::EntryType::Link, "hard link"),
        (tar::EntryType::Block, "device"),
    ] {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(ty);
        h.set_size(0);
        if ty == tar::EntryType::Block {
            h.set_device_major(8).unwrap();
            h.set_device_minor(0).unwrap();
            h.set_cksum();
            b.append_data(&mut h, "rootfs.img", &[][..]).unwrap();
        } else {
            b.append_link(&mut h, "rootfs.img", "/dev/sda").unwrap();
        }
        let img = dir.path().join("link.tar");
        fs::write(&img, b.into_inner().unwrap()).unwrap();
        let e = source::open(&img, &OpenOptions::default()).unwrap_err();
        assert!(
            matches!(&e, SourceError::Unsupported(m) if m.contains(why)),
            "{ty:?}: {e}"
        );
    }
}

#[test]
fn compressed_file_that_is_not_a_tarball_is_refused() {
    let fx = Fx::new();
    let gz = compress(&fx.p("disk.raw"), "gzip");
    let e = source::open(&gz, &OpenOptions::default()).unwrap_err();
    assert!(
        matches!(&e, SourceError::Unsupported(m) if m.contains("not a tar")),
        "{e}"
    );
}

#[test]
fn directories_and_missing_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        source::open(dir.path(), &OpenOptions::default()),
        Err(SourceError::Unsupported(_))
    ));
    assert!(matches!(
        source::open(&dir.path().join("nope"), &OpenOptions::default()),
        Err(SourceError::Io { .. })
    ));
}
