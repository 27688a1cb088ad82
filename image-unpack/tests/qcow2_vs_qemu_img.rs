//! The qcow2 reader against QEMU: every variant `qemu-img` can write, read back
//! byte-identical to `qemu-img convert -O raw`; and malformed or refused images.
//!
//! Images are built at test time with `qemu-img` and `qemu-io` (package qemu-utils).

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use image_unpack::source::{self, ExtentKind, ImageSource, OpenOptions, SourceError, SourceFormat};

const MIB: u64 = 1 << 20;
/// Not a multiple of 64 KiB or 2 MiB, so the last cluster is partial.
const DISK_SIZE: u64 = 6 * MIB + 3584;

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e} (install qemu-utils)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_img(args: &[&str]) {
    run(Command::new("qemu-img").args(args));
}

fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(img);
    run(&mut c);
}

/// Deterministic bytes: compressible text-like runs, incompressible noise, zero runs.
fn pattern_disk() -> Vec<u8> {
    let mut d = vec![0u8; DISK_SIZE as usize];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut noise = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    };
    for (i, b) in d.iter_mut().enumerate() {
        let i = i as u64;
        *b = match i / MIB {
            0 => b"vmblk qcow2 reader test pattern "[(i % 32) as usize],
            1 => 0,
            2 => noise(),
            // 4 KiB of data, 4 KiB of zeros: mixed subclusters with extended L2.
            3 => {
                if (i / 4096) % 2 == 0 {
                    (i % 251) as u8 | 1
                } else {
                    0
                }
            }
            4 => {
                if i % MIB < 64 * 1024 {
                    0
                } else {
                    (i / 512) as u8 ^ (i % 7) as u8
                }
            }
            _ => noise() & 0x0f,
        };
    }
    d
}

struct Fixture {
    dir: tempfile::TempDir,
    raw: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.raw");
        fs::write(&raw, pattern_disk()).unwrap();
        Fixture { dir, raw }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `qemu-img convert` of the pattern disk with extra arguments.
    fn convert(&self, name: &str, args: &[&str]) -> PathBuf {
        let out = self.path(name);
        let mut a = vec!["convert", "-f", "raw", "-O", "qcow2"];
        a.extend_from_slice(args);
        a.push(self.raw.to_str().unwrap());
        a.push(out.to_str().unwrap());
        qemu_img(&a);
        out
    }

    /// What QEMU reads from `img`.
    fn reference(&self, img: &Path) -> Vec<u8> {
        let out = img.with_extension("ref");
        qemu_img(&[
            "convert",
            "-O",
            "raw",
            img.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        fs::read(out).unwrap()
    }
}

/// Reads the whole guest disk through the source, checking extent invariants.
fn assemble(src: &dyn ImageSource) -> Result<Vec<u8>, SourceError> {
    let mut out = vec![0u8; src.virtual_size() as usize];
    let mut pos = 0;
    for e in src.extents() {
        let e = e?;
        assert_eq!(e.guest_offset, pos, "extents leave a gap or overlap");
        assert!(e.len > 0);
        if matches!(e.kind, ExtentKind::Data { .. }) {
            assert!(e.len <= src.max_extent_len());
        }
        pos += e.len;
        src.read_extent(&e, &mut out[e.guest_offset as usize..pos as usize])?;
    }
    assert_eq!(pos, src.virtual_size());
    Ok(out)
}

fn assert_identical(fx: &Fixture, img: &Path) -> Box<dyn ImageSource> {
    let src = source::open(img, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("opening {}: {e}", img.display()));
    let got = assemble(src.as_ref()).unwrap();
    let want = fx.reference(img);
    assert_eq!(got.len(), want.len(), "virtual size of {}", img.display());
    if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!("{}: first difference at guest offset {at}", img.display());
    }
    check_extents_from(src.as_ref(), &want);
    src
}

/// Walks started anywhere agree with the reference from their first extent on.
fn check_extents_from(src: &dyn ImageSource, want: &[u8]) {
    let size = src.virtual_size();
    let mut offsets = vec![
        0,
        1,
        511,
        4096 + 100,
        MIB - 1,
        MIB + 2048,
        3 * MIB + 5000,
        size - 1,
    ];
    offsets.extend((1..16).map(|i| i * 389_711 % size));
    for off in offsets {
        let mut it = src.extents_from(off);
        let first = it.next().unwrap().unwrap();
        assert!(
            first.guest_offset <= off && off < first.guest_offset + first.len,
            "extents_from({off}) starts with {first:?}"
        );
        let mut pos = first.guest_offset;
        for e in std::iter::once(Ok(first)).chain(it).take(4) {
            let e = e.unwrap();
            assert_eq!(e.guest_offset, pos);
            pos += e.len;
            if e.len > 8 * MIB {
                continue;
            }
            let mut buf = vec![0u8; e.len as usize];
            src.read_extent(&e, &mut buf).unwrap();
            assert!(
                buf[..] == want[e.guest_offset as usize..pos as usize],
                "extent {e:?} from {off}"
            );
        }
    }
    assert!(src.extents_from(size).next().is_none());
}

fn qcow2_info(src: &dyn ImageSource) -> (u32, u64, String, bool) {
    match src.format() {
        SourceFormat::Qcow2 {
            version,
            cluster_size,
            compression,
            extended_l2,
        } => (version, cluster_size, compression, extended_l2),
        f => panic!("not qcow2: {f}"),
    }
}

fn count_compressed(src: &dyn ImageSource) -> usize {
    src.extents()
        .filter(|e| {
            matches!(
                e.as_ref().unwrap().kind,
                ExtentKind::Data {
                    compressed_len: Some(_),
                    ..
                }
            )
        })
        .count()
}

#[test]
fn qcow2_v2_matches_qemu() {
    let fx = Fixture::new();
    let img = fx.convert("v2.qcow2", &["-o", "compat=0.10"]);
    let src = assert_identical(&fx, &img);
    assert_eq!(qcow2_info(src.as_ref()).0, 2);
}

#[test]
fn qcow2_v3_default_matches_qemu() {
    let fx = Fixture::new();
    let img = fx.convert("v3.qcow2", &["-o", "compat=1.1"]);
    let src = assert_identical(&fx, &img);
    assert_eq!(
        qcow2_info(src.as_ref()),
        (3, 64 * 1024, "zlib".into(), false)
    );
}

#[test]
fn qcow2_cluster_sizes_match_qemu() {
    let fx = Fixture::new();
    for cs in ["512", "4k", "64k", "2M"] {
        let img = fx.convert(
            &format!("cs{cs}.qcow2"),
            &["-o", &format!("cluster_size={cs}")],
        );
        assert_identical(&fx, &img);
    }
}

#[test]
fn qcow2_zlib_compressed_matches_qemu() {
    let fx = Fixture::new();
    for (name, opts) in [
        ("zlib.qcow2", "compat=1.1"),
        ("zlib-v2.qcow2", "compat=0.10"),
        ("zlib-512.qcow2", "cluster_size=512"),
        ("zlib-2M.qcow2", "cluster_size=2M"),
    ] {
        let img = fx.convert(name, &["-c", "-o", opts]);
        let src = assert_identical(&fx, &img);
        assert_eq!(qcow2_info(src.as_ref()).2, "zlib");
        assert!(
            count_compressed(src.as_ref()) > 0,
            "{name} has no compressed cluster"
        );
    }
}

#[test]
fn qcow2_zstd_compressed_matches_qemu() {
    let fx = Fixture::new();
    for (name, opts) in [
        ("zstd.qcow2", "compression_type=zstd"),
        ("zstd-512.qcow2", "compression_type=zstd,cluster_size=512"),
        ("zstd-2M.qcow2", "compression_type=zstd,cluster_size=2M"),
    ] {
        let img = fx.convert(name, &["-c", "-o", opts]);
        let src = assert_identical(&fx, &img);
        assert_eq!(qcow2_info(src.as_ref()).2, "zstd");
        assert!(
            count_compressed(src.as_ref()) > 0,
            "{name} has no compressed cluster"
        );
    }
}

#[test]
fn qcow2_extended_l2_matches_qemu() {
    let fx = Fixture::new();
    for cs in ["16k", "64k", "2M"] {
        let img = fx.convert(
            &format!("extl2-{cs}.qcow2"),
            &["-o", &format!("extended_l2=on,cluster_size={cs}")],
        );
        let src = assert_identical(&fx, &img);
        assert!(qcow2_info(src.as_ref()).3);
    }
    let img = fx.convert("extl2-zlib.qcow2", &["-c", "-o", "extended_l2=on"]);
    assert_identical(&fx, &img);
}

#[test]
fn qcow2_extended_l2_partial_writes_match_qemu() {
    let fx = Fixture::new();
    let img = fx.path("extl2-partial.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=64k",
        img.to_str().unwrap(),
        "8M",
    ]);
    // Subclusters of 2 KiB: data, zero and unallocated ones mixed in one cluster.
    qemu_io(
        &img,
        &[
            "write -P 0x11 0 2k",
            "write -P 0x22 6k 4k",
            "write -z 16k 8k",
            "write -P 0x33 62k 2k",
            "write -P 0x44 1M 64k",
            "write -z 1M 2k",
            "write -z 1034k 6k",
            "write -P 0x55 2M 512",
            "discard 1040k 8k",
        ],
    );
    let src = assert_identical(&fx, &img);
    let kinds: Vec<_> = src.extents().map(|e| e.unwrap()).take(8).collect();
    assert!(kinds.len() >= 5, "mixed clusters should split: {kinds:?}");
}

#[test]
fn qcow2_preallocated_metadata_matches_qemu() {
    let fx = Fixture::new();
    let img = fx.convert("prealloc.qcow2", &["-o", "preallocation=metadata"]);
    assert_identical(&fx, &img);
    let empty = fx.path("prealloc-empty.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        empty.to_str().unwrap(),
        "5M",
    ]);
    let src = assert_identical(&fx, &empty);
    // Allocated clusters nothing was written to lie in holes of the file: zero extents.
    let data: u64 = src
        .extents()
        .map(|e| e.unwrap())
        .filter(|e| matches!(e.kind, ExtentKind::Data { .. }))
        .map(|e| e.len)
        .sum();
    assert_eq!(data, 0, "preallocated but unwritten clusters read as data");
    let v2 = fx.path("prealloc-v2.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata,compat=0.10",
        v2.to_str().unwrap(),
        "5M",
    ]);
    qemu_io(&v2, &["write -P 0x66 1M 100k"]);
    assert_identical(&fx, &v2);
}

#[test]
fn qcow2_zero_clusters_match_qemu() {
    let fx = Fixture::new();
    let img = fx.convert("zeroed.qcow2", &["-o", "compat=1.1"]);
    qemu_io(
        &img,
        &[
            "write -z 0 1M",
            "write -z 2M 64k",
            "write -z 3000k 200k",
            "write -z 5M 4k",
        ],
    );
    let src = assert_identical(&fx, &img);
    let zero = src
        .extents()
        .map(|e| e.unwrap())
        .find(|e| e.guest_offset == 0)
        .unwrap();
    assert_eq!(zero.kind, ExtentKind::Zero);
    assert!(zero.len >= MIB);
}

#[test]
fn qcow2_discarded_regions_match_qemu() {
    let fx = Fixture::new();
    for compat in ["1.1", "0.10"] {
        let img = fx.convert(
            &format!("discard-{compat}.qcow2"),
            &["-o", &format!("compat={compat}")],
        );
        qemu_io(
            &img,
            &["discard 0 512k", "discard 2M 1M", "discard 4160k 64k"],
        );
        assert_identical(&fx, &img);
    }
    let img = fx.convert("discard-zlib.qcow2", &["-c"]);
    qemu_io(&img, &["discard 2M 1M"]);
    assert_identical(&fx, &img);
}

#[test]
fn compressed_clusters_inflate_in_parallel() {
    let fx = Fixture::new();
    for opts in ["compression_type=zlib", "compression_type=zstd"] {
        let img = fx.convert("par.qcow2", &["-c", "-o", opts]);
        let src = source::open(&img, &OpenOptions::default()).unwrap();
        let want = fx.reference(&img);
        let extents: Vec<_> = src.extents().map(|e| e.unwrap()).collect();
        std::thread::scope(|s| {
            for t in 0..4 {
                let (src, extents, want) = (&src, &extents, &want);
                s.spawn(move || {
                    for e in extents.iter().skip(t).step_by(4) {
                        let mut buf = vec![0u8; e.len as usize];
                        src.read_extent(e, &mut buf).unwrap();
                        let r = e.guest_offset as usize..(e.guest_offset + e.len) as usize;
                        assert_eq!(buf, want[r], "extent {e:?}");
                    }
                });
            }
        });
    }
}

#[test]
fn probe_reports_format_and_size_without_reading_data() {
    let fx = Fixture::new();
    let img = fx.convert(
        "probe.qcow2",
        &["-c", "-o", "compression_type=zstd,cluster_size=128k"],
    );
    let info = source::probe(&img, &OpenOptions::default()).unwrap();
    assert_eq!(info.virtual_size, DISK_SIZE);
    assert_eq!(
        info.format,
        SourceFormat::Qcow2 {
            version: 3,
            cluster_size: 128 * 1024,
            compression: "zstd".into(),
            extended_l2: false
        }
    );
    let raw = source::probe(&fx.raw, &OpenOptions::default()).unwrap();
    assert_eq!(raw.format, SourceFormat::Raw);
    assert_eq!(raw.virtual_size, DISK_SIZE);
}

// ---- bad input ----

fn open_err(img: &Path) -> SourceError {
    match source::open(img, &OpenOptions::default()) {
        Ok(src) => match assemble(src.as_ref()) {
            Ok(_) => panic!("{} was accepted", img.display()),
            Err(e) => e,
        },
        Err(e) => e,
    }
}

fn be64_at(path: &Path, at: u64) -> u64 {
    let f = fs::File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at).unwrap();
    u64::from_be_bytes(b)
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

#[test]
fn truncated_qcow2_is_refused() {
    let fx = Fixture::new();
    for (name, args) in [("t.qcow2", vec![]), ("tc.qcow2", vec!["-c"])] {
        let img = fx.convert(name, &args);
        let full = fs::read(&img).unwrap();
        // Cut inside the last data the image maps (refcount blocks may follow it).
        let src = source::open(&img, &OpenOptions::default()).unwrap();
        let data_end = src
            .extents()
            .map(|e| e.unwrap())
            .filter_map(|e| match e.kind {
                ExtentKind::Data {
                    host_offset,
                    compressed_len,
                } => Some(host_offset + compressed_len.unwrap_or(e.len)),
                ExtentKind::Zero => None,
            })
            .max()
            .unwrap() as usize;
        drop(src);
        for keep in [10, 71, 100, 64 * 1024 + 8, full.len() / 2, data_end - 600] {
            let cut = fx.path(&format!("cut-{keep}-{name}"));
            fs::write(&cut, &full[..keep]).unwrap();
            let e = open_err(&cut);
            assert!(e.is_bad_image(), "{keep} bytes of {name}: {e}");
        }
    }
}

#[test]
fn l1_entry_past_eof_is_refused() {
    let fx = Fixture::new();
    let img = fx.convert("l1.qcow2", &[]);
    let l1 = be64_at(&img, 40);
    patch(&img, l1, &(1u64 << 40).to_be_bytes());
    let e = open_err(&img);
    assert!(
        matches!(&e, SourceError::Corrupt(m) if m.contains("L1 entry 0")),
        "{e}"
    );
}

#[test]
fn l2_entry_past_eof_is_refused() {
    let fx = Fixture::new();
    let img = fx.convert("l2.qcow2", &[]);
    let l2 = be64_at(&img, be64_at(&img, 40)) & 0x00ff_ffff_ffff_fe00;
    patch(&img, l2 + 8, &((1u64 << 40) | (1 << 63)).to_be_bytes());
    let e = open_err(&img);
    assert!(
        matches!(&e, SourceError::Corrupt(m) if m.contains("guest offset 65536")),
        "{e}"
    );
}

#[test]
fn overflowing_offsets_are_refused() {
    let fx = Fixture::new();
    let base = fx.convert("ovf.qcow2", &["-c"]);
    let cases: [(&str, u64, Vec<u8>); 4] = [
        ("l1 offset", 40, (!0xffff_u64).to_be_bytes().to_vec()),
        ("l1 size", 36, u32::MAX.to_be_bytes().to_vec()),
        ("virtual size", 24, u64::MAX.to_be_bytes().to_vec()),
        ("header length", 100, u32::MAX.to_be_bytes().to_vec()),
    ];
    for (what, at, bytes) in cases {
        let img = fx.path(&format!("ovf-{at}.qcow2"));
        fs::copy(&base, &img).unwrap();
        patch(&img, at, &bytes);
        let e = open_err(&img);
        assert!(matches!(e, SourceError::Corrupt(_)), "{what}: {e}");
    }
    // A compressed descriptor whose offset lies far past the end of the file.
    let img = fx.path("ovf-desc.qcow2");
    fs::copy(&base, &img).unwrap();
    let l2 = be64_at(&img, be64_at(&img, 40)) & 0x00ff_ffff_ffff_fe00;
    patch(
        &img,
        l2,
        &((1u64 << 62) | ((1u64 << 54) - 512)).to_be_bytes(),
    );
    let e = open_err(&img);
    assert!(
        matches!(&e, SourceError::Corrupt(m) if m.contains("compressed")),
        "{e}"
    );
}

#[test]
fn garbage_in_compressed_cluster_names_guest_offset() {
    let fx = Fixture::new();
    for opts in ["compression_type=zlib", "compression_type=zstd"] {
        let img = fx.convert("garbage.qcow2", &["-c", "-o", opts]);
        let src = source::open(&img, &OpenOptions::default()).unwrap();
        let victim = src
            .extents()
            .map(|e| e.unwrap())
            .find(|e| {
                e.guest_offset >= MIB
                    && matches!(
                        e.kind,
                        ExtentKind::Data {
                            compressed_len: Some(_),
                            ..
                        }
                    )
            })
            .unwrap();
        drop(src);
        let ExtentKind::Data {
            host_offset,
            compressed_len: Some(n),
        } = victim.kind
        else {
            unreachable!()
        };
        patch(&img, host_offset, &vec![0xa5; n.min(256) as usize]);
        let e = open_err(&img);
        match &e {
            SourceError::Decompress { guest_offset, .. } => {
                assert_eq!(*guest_offset, victim.guest_offset)
            }
            _ => panic!("{opts}: {e}"),
        }
        assert!(
            e.to_string().contains(&victim.guest_offset.to_string()),
            "{e}"
        );
    }
}

#[test]
fn backing_file_is_refused() {
    let fx = Fixture::new();
    let base = fx.convert("base.qcow2", &[]);
    let over = fx.path("overlay.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        over.to_str().unwrap(),
    ]);
    let e = open_err(&over);
    assert!(
        matches!(&e, SourceError::Unsupported(m) if m.contains("backing file") && m.contains("base.qcow2")),
        "{e}"
    );
}

#[test]
fn encrypted_image_is_refused() {
    let fx = Fixture::new();
    let img = fx.path("luks.qcow2");
    // qemu-img times a PBKDF run to pick the LUKS iteration count and fails with
    // "Unable to get accurate CPU usage" when the machine is busy: try a few times.
    let mut last = String::new();
    let created = (0..5).any(|_| {
        let out = Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "--object",
                "secret,id=sec0,data=vmblk",
                "-f",
                "qcow2",
            ])
            .args([
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            ])
            .arg(&img)
            .arg("4M")
            .output()
            .expect("running qemu-img");
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        out.status.success()
    });
    assert!(created, "qemu-img could not create a LUKS image: {last}");
    let e = open_err(&img);
    assert!(
        matches!(&e, SourceError::Unsupported(m) if m.contains("encrypted") && m.contains("LUKS")),
        "{e}"
    );
    // Legacy AES encryption, which qemu-img no longer creates: crypt_method = 1.
    let aes = fx.convert("aes.qcow2", &[]);
    patch(&aes, 32, &1u32.to_be_bytes());
    let e = open_err(&aes);
    assert!(
        matches!(&e, SourceError::Unsupported(m) if m.contains("AES")),
        "{e}"
    );
}

#[test]
fn external_data_file_is_refused() {
    let fx = Fixture::new();
    let img = fx.path("ext.qcow2");
    let data = fx.path("ext.data");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", data.display()),
        img.to_str().unwrap(),
        "4M",
    ]);
    let e = open_err(&img);
    assert!(
        matches!(&e, SourceError::Unsupported(m) if m.contains("external data file")),
        "{e}"
    );
}

#[test]
fn unknown_incompatible_feature_is_refused() {
    let fx = Fixture::new();
    let img = fx.convert("feat.qcow2", &[]);
    let bits = be64_at(&img, 72) | (1 << 20);
    patch(&img, 72, &bits.to_be_bytes());
    let e = open_err(&img);
    assert!(
        matches!(&e, SourceError::Unsupported(m) if m.contains("incompatible")),
        "{e}"
    );
}
