//! Unit tests of the qcow2 reader on images built in memory.

use std::io::Write;
use std::sync::Arc;

use proptest::prelude::*;
use zerocopy::big_endian::{U32, U64};
use zerocopy::IntoBytes;

use super::entry::L2E_COMPRESSED;
use super::header::{HeaderV2, HeaderV3, INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE, INCOMPAT_EXTL2};
use super::*;
use crate::source::detect::QCOW2_MAGIC;
use crate::source::MemReader;

/// Builds a minimal qcow2 image in memory: header in cluster 0, the L1 table
/// from cluster 1 with one L2 table (for the first L1 entry) right after it,
/// then `extra_clusters` of zeros for data; L2 entries given as (index, entry).
pub(crate) struct Builder {
    pub cluster_bits: u32,
    pub version: u32,
    pub size: u64,
    pub incompat: u64,
    pub compression_type: u8,
}

impl Builder {
    pub fn new(cluster_bits: u32, size: u64) -> Self {
        Builder {
            cluster_bits,
            version: 3,
            size,
            incompat: 0,
            compression_type: 0,
        }
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Header in cluster 0, L1 in cluster 1, L2 in cluster 2; returns the image.
    pub fn build(&self, l2_entries: &[(usize, u64)], extra_clusters: u64) -> Vec<u8> {
        let cs = self.cs();
        let ext = self.incompat & INCOMPAT_EXTL2 != 0;
        let per_l1 = cs * (cs / if ext { 16 } else { 8 });
        let l1_size = self.size.div_ceil(per_l1).max(1) as u32;
        // L1 from cluster 1; the L2 table right after it (cluster 2 for small disks).
        let l2_at = cs * (1 + (u64::from(l1_size) * 8).div_ceil(cs));
        let mut img = vec![0u8; (l2_at + cs * (1 + extra_clusters)) as usize];
        let v2 = HeaderV2 {
            magic: U32::new(u32::from_be_bytes(QCOW2_MAGIC)),
            version: U32::new(self.version),
            backing_file_offset: U64::new(0),
            backing_file_size: U32::new(0),
            cluster_bits: U32::new(self.cluster_bits),
            size: U64::new(self.size),
            crypt_method: U32::new(0),
            l1_size: U32::new(l1_size),
            l1_table_offset: U64::new(cs),
            refcount_table_offset: U64::new(0),
            refcount_table_clusters: U32::new(0),
            nb_snapshots: U32::new(0),
            snapshots_offset: U64::new(0),
        };
        img[..72].copy_from_slice(v2.as_bytes());
        if self.version == 3 {
            let v3 = HeaderV3 {
                incompatible_features: U64::new(self.incompat),
                compatible_features: U64::new(0),
                autoclear_features: U64::new(0),
                refcount_order: U32::new(4),
                header_length: U32::new(112),
            };
            img[72..104].copy_from_slice(v3.as_bytes());
            img[104] = self.compression_type;
        }
        img[cs as usize..cs as usize + 8].copy_from_slice(&l2_at.to_be_bytes());
        let width = if ext { 16 } else { 8 };
        for &(idx, entry) in l2_entries {
            let at = l2_at as usize + idx * width;
            img[at..at + 8].copy_from_slice(&entry.to_be_bytes());
        }
        img
    }
}

fn open(img: Vec<u8>) -> Result<Qcow2Source, SourceError> {
    Qcow2Source::open(Arc::new(MemReader::new(img)))
}

fn assemble(src: &dyn ImageSource) -> Vec<u8> {
    let mut out = vec![0u8; src.virtual_size() as usize];
    let mut pos = 0;
    for e in src.extents() {
        let e = e.unwrap();
        assert_eq!(e.guest_offset, pos);
        assert!(e.len > 0);
        if matches!(e.kind, ExtentKind::Data { .. }) {
            assert!(e.len <= src.max_extent_len());
        }
        pos += e.len;
        let r = e.guest_offset as usize..pos as usize;
        src.read_extent(&e, &mut out[r]).unwrap();
    }
    assert_eq!(pos, src.virtual_size());
    out
}

#[test]
fn plain_clusters_merge_and_read_back() {
    let b = Builder::new(16, 4 << 16);
    let cs = 1u64 << 16;
    // guest clusters 0,1 -> host 3,4 (contiguous); cluster 3 -> host 5.
    let mut img = b.build(&[(0, 3 * cs), (1, 4 * cs), (3, 5 * cs)], 3);
    for (c, v) in [(3usize, 1u8), (4, 2), (5, 3)] {
        img[c << 16..(c + 1) << 16].fill(v);
    }
    let src = open(img).unwrap();
    let ex: Vec<_> = src.extents().map(Result::unwrap).collect();
    assert_eq!(ex.len(), 3, "{ex:?}");
    assert_eq!(ex[0].len, 2 * cs);
    assert_eq!(ex[1].kind, ExtentKind::Zero);
    let out = assemble(&src);
    assert!(out[..1 << 16].iter().all(|&x| x == 1));
    assert!(out[2 << 16..3 << 16].iter().all(|&x| x == 0));
    assert!(out[3 << 16..].iter().all(|&x| x == 3));
}

#[test]
fn zlib_cluster_inflates_to_exactly_a_cluster() {
    let cs = 1u64 << 16;
    let b = Builder::new(16, cs + 1000);
    let data: Vec<u8> = (0..cs).map(|i| (i * 7 % 13) as u8).collect();
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&data).unwrap();
    let comp = enc.finish().unwrap();
    let off = 3 * cs + 100;
    let sectors = (off + comp.len() as u64 - 1) / 512 - off / 512;
    let entry = L2E_COMPRESSED | (sectors << (62 - 8)) | off;
    let mut img = b.build(&[(0, entry), (1, entry)], 1);
    img[off as usize..off as usize + comp.len()].copy_from_slice(&comp);
    img.truncate(off as usize + comp.len());
    let src = open(img).unwrap();
    let out = assemble(&src);
    assert_eq!(&out[..cs as usize], &data[..]);
    assert_eq!(&out[cs as usize..], &data[..1000]);
}

#[test]
fn zstd_cluster_with_padding_decodes() {
    let cs = 1u64 << 16;
    let mut b = Builder::new(16, cs);
    b.incompat = INCOMPAT_COMPRESSION;
    b.compression_type = 1;
    let data: Vec<u8> = (0..cs).map(|i| (i % 97) as u8).collect();
    let comp = zstd::bulk::compress(&data, 3).unwrap();
    let off = 3 * cs;
    let sectors = (comp.len() as u64 + 700) / 512;
    let entry = L2E_COMPRESSED | (sectors << (62 - 8)) | off;
    let mut img = b.build(&[(0, entry)], 1);
    img[off as usize..off as usize + comp.len()].copy_from_slice(&comp);
    let src = open(img).unwrap();
    assert_eq!(assemble(&src), data);
}

#[test]
fn garbage_compressed_cluster_names_guest_offset() {
    let cs = 1u64 << 16;
    let b = Builder::new(16, 2 * cs);
    let off = 3 * cs;
    let entry = L2E_COMPRESSED | (3 << (62 - 8)) | off;
    let mut img = b.build(&[(1, entry)], 1);
    img[off as usize..off as usize + 2048].fill(0xff);
    let src = open(img).unwrap();
    let e = src
        .extents()
        .map(Result::unwrap)
        .find(|e| e.guest_offset == cs)
        .unwrap();
    let mut buf = vec![0u8; cs as usize];
    let err = src.read_extent(&e, &mut buf).unwrap_err();
    assert!(matches!(err, SourceError::Decompress { guest_offset, .. } if guest_offset == cs));
    assert!(err.to_string().contains(&cs.to_string()));
}

#[test]
fn extended_l2_mixed_cluster_splits() {
    let cs = 1u64 << 16;
    let sc = cs / 32;
    let mut b = Builder::new(16, cs);
    b.incompat = INCOMPAT_EXTL2;
    let mut img = b.build(&[], 1);
    let at = 2 * cs as usize;
    img[at..at + 8].copy_from_slice(&(3 * cs).to_be_bytes());
    // subclusters 0-1 allocated, 2 zero, rest unallocated.
    let bitmap: u64 = 0b11 | (0b100 << 32);
    img[at + 8..at + 16].copy_from_slice(&bitmap.to_be_bytes());
    img[3 * cs as usize..4 * cs as usize].fill(9);
    let src = open(img).unwrap();
    let ex: Vec<_> = src.extents().map(Result::unwrap).collect();
    assert_eq!(ex.len(), 2, "{ex:?}");
    assert_eq!(ex[0].len, 2 * sc);
    let out = assemble(&src);
    assert!(out[..2 * sc as usize].iter().all(|&x| x == 9));
    assert!(out[2 * sc as usize..].iter().all(|&x| x == 0));
}

#[test]
fn l2_entry_past_eof_is_corrupt() {
    let b = Builder::new(16, 1 << 16);
    let img = b.build(&[(0, 100 << 16)], 0);
    let err = open(img).unwrap_err();
    assert!(
        matches!(err, SourceError::Corrupt(ref m) if m.contains("guest offset 0")),
        "{err}"
    );
}

#[test]
fn unaligned_l2_entry_is_corrupt() {
    let b = Builder::new(16, 1 << 16);
    let img = b.build(&[(0, (2 << 16) + 512)], 0);
    assert!(matches!(open(img), Err(SourceError::Corrupt(_))));
}

#[test]
fn l1_past_eof_is_corrupt() {
    let b = Builder::new(16, 1 << 16);
    let mut img = b.build(&[], 0);
    img[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes());
    assert!(matches!(open(img), Err(SourceError::Corrupt(m)) if m.contains("L1 table")));
}

#[test]
fn overflowing_l1_offset_is_corrupt() {
    let b = Builder::new(16, 1 << 16);
    let mut img = b.build(&[], 0);
    img[40..48].copy_from_slice(&(u64::MAX - 0xffff).to_be_bytes());
    assert!(matches!(open(img), Err(SourceError::Corrupt(_))));
}

#[test]
fn virtual_size_beyond_l1_capacity_is_corrupt() {
    let b = Builder::new(16, 1 << 16);
    let mut img = b.build(&[], 0);
    img[24..32].copy_from_slice(&u64::MAX.to_be_bytes());
    assert!(matches!(open(img), Err(SourceError::Corrupt(m)) if m.contains("virtual size")));
}

#[test]
fn truncated_header_is_corrupt() {
    let b = Builder::new(16, 1 << 16);
    let img = b.build(&[], 0);
    for n in [4usize, 50, 80] {
        assert!(
            matches!(open(img[..n].to_vec()), Err(SourceError::Corrupt(_))),
            "{n}"
        );
    }
}

#[test]
fn refusals_name_the_reason() {
    let b = Builder::new(16, 1 << 16);
    let mut img = b.build(&[], 0);
    img[8..16].copy_from_slice(&200u64.to_be_bytes());
    img[16..20].copy_from_slice(&8u32.to_be_bytes());
    img[200..208].copy_from_slice(b"base.img");
    let e = open(img).unwrap_err().to_string();
    assert!(e.contains("backing file") && e.contains("base.img"), "{e}");

    let mut img = b.build(&[], 0);
    img[32..36].copy_from_slice(&2u32.to_be_bytes());
    assert!(open(img).unwrap_err().to_string().contains("encrypted"));

    let mut b2 = Builder::new(16, 1 << 16);
    b2.incompat = INCOMPAT_DATA_FILE;
    assert!(open(b2.build(&[], 0))
        .unwrap_err()
        .to_string()
        .contains("external data file"));
    b2.incompat = 1 << 9;
    assert!(open(b2.build(&[], 0))
        .unwrap_err()
        .to_string()
        .contains("0x200"));
    b2.incompat = INCOMPAT_COMPRESSION;
    b2.compression_type = 7;
    assert!(open(b2.build(&[], 0))
        .unwrap_err()
        .to_string()
        .contains("compression type 7"));
}

#[test]
fn v2_zero_flag_is_corrupt() {
    let mut b = Builder::new(16, 1 << 16);
    b.version = 2;
    assert!(matches!(
        open(b.build(&[(0, 1)], 0)),
        Err(SourceError::Corrupt(_))
    ));
    b.version = 3;
    let src = open(b.build(&[(0, 1)], 0)).unwrap();
    assert_eq!(
        src.extents().next().unwrap().unwrap().kind,
        ExtentKind::Zero
    );
}

#[test]
fn extents_from_starts_at_the_cluster_holding_the_offset() {
    let cs = 1u64 << 16;
    let src = open(Builder::new(16, 8 * cs).build(&[(5, 3 * cs)], 1)).unwrap();
    let ex: Vec<_> = src.extents_from(5 * cs + 10).map(Result::unwrap).collect();
    let data = ExtentKind::Data {
        host_offset: 3 * cs,
        compressed_len: None,
    };
    assert_eq!(
        ex,
        vec![
            Extent {
                guest_offset: 5 * cs,
                len: cs,
                kind: data
            },
            Extent {
                guest_offset: 6 * cs,
                len: 2 * cs,
                kind: ExtentKind::Zero
            },
        ]
    );
    let z = src.extents_from(cs + 1).next().unwrap().unwrap();
    assert!(z.kind == ExtentKind::Zero && z.guest_offset <= cs + 1);
    assert_eq!(z.guest_offset + z.len, 5 * cs);
    assert!(src.extents_from(8 * cs).next().is_none());
}

#[test]
fn large_unallocated_disk_is_one_zero_extent() {
    // 1 GiB over 512-byte clusters: 32768 L1 entries, one L2 table, all unallocated.
    let src = open(Builder::new(9, 1 << 30).build(&[], 0)).unwrap();
    let ex: Vec<_> = src.extents().map(Result::unwrap).collect();
    assert_eq!(
        ex,
        vec![Extent {
            guest_offset: 0,
            len: 1 << 30,
            kind: ExtentKind::Zero
        }]
    );
}

/// A reader that counts the bytes read through it.
#[derive(Debug)]
struct Counting {
    inner: MemReader,
    read: std::sync::atomic::AtomicU64,
}

impl ReadAt for Counting {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.read
            .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.inner.read_exact_at(buf, offset)
    }

    fn len(&self) -> u64 {
        self.inner.len()
    }
}

/// Opens `img`, returning the result and the bytes read to get it.
fn open_counting(img: Vec<u8>) -> (Result<Qcow2Source, SourceError>, u64) {
    let r = Arc::new(Counting {
        inner: MemReader::new(img),
        read: Default::default(),
    });
    let res = Qcow2Source::open(r.clone());
    (res, r.read.load(std::sync::atomic::Ordering::Relaxed))
}

/// A v3 image of `cluster_bits` clusters mapping `size` bytes whose L1 entries all
/// name the one L2 table, itself full of entries for one data cluster: a few
/// clusters that map a disk of `size` bytes.
fn shared_l2_image(cluster_bits: u32, size: u64) -> Vec<u8> {
    let b = Builder::new(cluster_bits, size);
    let cs = 1u64 << cluster_bits;
    let l1_size = u32::from_be_bytes(b.build(&[], 0)[36..40].try_into().unwrap());
    let l2_at = cs * (1 + (u64::from(l1_size) * 8).div_ceil(cs));
    let data_at = l2_at + cs;
    let entries: Vec<(usize, u64)> = (0..(cs / 8) as usize).map(|i| (i, data_at)).collect();
    let mut img = b.build(&entries, 1);
    for i in 0..l1_size as usize {
        let at = cs as usize + i * 8;
        img[at..at + 8].copy_from_slice(&l2_at.to_be_bytes());
    }
    img
}

#[test]
fn an_l2_table_shared_by_l1_entries_is_refused_after_reading_each_table_once() {
    // 64 KiB clusters, 4 TiB: 8192 L1 entries on one table (took ~11 s to open
    // when each entry walked the table again); and other cluster sizes.
    for (bits, size) in [
        (16u32, 4u64 << 40),
        (9, 1 << 30),
        (12, 64 << 30),
        (21, 1 << 44),
    ] {
        let img = shared_l2_image(bits, size);
        let len = img.len() as u64;
        let (res, read) = open_counting(img);
        let err = res
            .expect_err("a shared L2 table must be refused")
            .to_string();
        assert!(
            err.contains("L1 entries 0 and 1 both name the L2 table"),
            "{bits}: {err}"
        );
        // Header (twice: its first bytes, then its cluster) and metadata, each once.
        assert!(
            read <= len + (1 << bits),
            "{bits}: read {read} of {len} bytes"
        );
    }
}

#[test]
fn opening_reads_each_l2_table_once_however_many_clusters_it_maps() {
    // 64 distinct L2 tables, each full of data clusters: a valid image. Opening reads
    // the header, the L1 table and each L2 table once: not a cluster more.
    let bits = 12u32;
    let cs = 1u64 << bits;
    let per_l1 = cs * (cs / 8);
    let b = Builder::new(bits, 64 * per_l1);
    let mut img = b.build(&[], 0);
    let l2_base = img.len() as u64 - cs; // the builder's L2 table
    img.resize((l2_base + 64 * cs + cs) as usize, 0);
    let data = l2_base + 64 * cs;
    for i in 0..64u64 {
        let l2 = l2_base + i * cs;
        img[(cs + i * 8) as usize..(cs + i * 8 + 8) as usize].copy_from_slice(&l2.to_be_bytes());
        for j in 0..cs / 8 {
            let at = (l2 + j * 8) as usize;
            img[at..at + 8].copy_from_slice(&data.to_be_bytes());
        }
    }
    let len = img.len() as u64;
    let (res, read) = open_counting(img);
    let src = res.unwrap();
    assert!(read <= len + cs, "read {read} of {len} bytes");
    assert_eq!(src.extents().count(), 64 * (cs / 8) as usize);
}

#[test]
fn an_l1_entry_naming_the_l1_table_is_refused() {
    let cs = 1u64 << 16;
    let mut img = Builder::new(16, 1 << 40).build(&[], 0);
    img[cs as usize + 8..cs as usize + 16].copy_from_slice(&cs.to_be_bytes());
    let err = open(img).unwrap_err().to_string();
    assert!(err.contains("overlaps the L1 table"), "{err}");
}

#[test]
fn a_refcount_table_over_an_l2_table_is_refused() {
    let cs = 1u64 << 16;
    let mut img = Builder::new(16, 1 << 20).build(&[], 0);
    // The builder's L2 table is cluster 2.
    img[48..56].copy_from_slice(&(2 * cs).to_be_bytes());
    img[56..60].copy_from_slice(&1u32.to_be_bytes());
    let err = open(img).unwrap_err().to_string();
    assert!(err.contains("overlaps"), "{err}");
    assert!(err.contains("refcount table"), "{err}");
}

#[test]
fn compressed_clusters_pointing_into_metadata_are_refused_at_open() {
    let cs = 1u64 << 16;
    // Offset 0 (the header), the L1 table (cluster 1), the L2 table (cluster 2).
    for (off, what) in [
        (0u64, "header"),
        (cs + 16, "L1 table"),
        (2 * cs + 512, "L2 table"),
    ] {
        let entry = L2E_COMPRESSED | (3 << (62 - 8)) | off;
        let img = Builder::new(16, 2 * cs).build(&[(1, entry)], 1);
        let err = open(img).unwrap_err().to_string();
        assert!(
            err.contains("compressed cluster") && err.contains(what),
            "{off:#x}: {err}"
        );
        assert!(err.contains(&format!("guest offset {cs}")), "{err}");
    }
}

#[test]
fn data_clusters_pointing_into_metadata_are_refused_at_open() {
    let cs = 1u64 << 16;
    for (off, what) in [(cs, "L1 table"), (2 * cs, "L2 table")] {
        let img = Builder::new(16, 2 * cs).build(&[(0, off)], 1);
        let err = open(img).unwrap_err().to_string();
        assert!(
            err.contains("data at") && err.contains(what),
            "{off:#x}: {err}"
        );
    }
}

#[test]
fn refcount_table_past_the_file_is_refused() {
    let mut img = Builder::new(16, 1 << 20).build(&[], 0);
    img[48..56].copy_from_slice(&(1u64 << 40).to_be_bytes());
    img[56..60].copy_from_slice(&1u32.to_be_bytes());
    let err = open(img).unwrap_err().to_string();
    assert!(err.contains("refcount table"), "{err}");
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = Qcow2Header::parse(&bytes, bytes.len() as u64);
        if let Ok(src) = open(bytes) {
            for e in src.extents().take(1000).flatten() {
                if e.len <= 1 << 16 {
                    let mut buf = vec![0u8; e.len as usize];
                    let _ = src.read_extent(&e, &mut buf);
                }
            }
        }
    }

    #[test]
    fn mutated_valid_image_never_panics(
        cluster_bits in 9u32..=16,
        entries in proptest::collection::vec((0usize..64, any::<u64>()), 0..16),
        flips in proptest::collection::vec((0usize..256, any::<u8>()), 0..8),
    ) {
        let b = Builder::new(cluster_bits, 64 << cluster_bits);
        let mut img = b.build(&entries, 4);
        for (at, v) in flips {
            let n = img.len();
            img[at % n] ^= v;
        }
        if let Ok(src) = open(img) {
            let mut buf = vec![0u8; src.max_extent_len() as usize];
            for e in src.extents().flatten() {
                if let Some(b) = buf.get_mut(..e.len as usize) {
                    let _ = src.read_extent(&e, b);
                }
            }
        }
    }

    #[test]
    fn valid_header_round_trips(
        cluster_bits in 9u32..=21,
        size_clusters in 0u64..100_000,
        version in 2u32..=3,
        zstd in any::<bool>(),
        ext in any::<bool>(),
    ) {
        let mut b = Builder::new(cluster_bits, size_clusters << cluster_bits);
        b.version = version;
        if version == 3 {
            if zstd {
                b.incompat |= INCOMPAT_COMPRESSION;
                b.compression_type = 1;
            }
            if ext && cluster_bits >= 14 {
                b.incompat |= INCOMPAT_EXTL2;
            }
        }
        let img = b.build(&[], 0);
        let h = Qcow2Header::parse(&img, img.len() as u64).unwrap();
        prop_assert_eq!(h.version, version);
        prop_assert_eq!(h.cluster_bits, cluster_bits);
        prop_assert_eq!(h.virtual_size, size_clusters << cluster_bits);
        prop_assert_eq!(h.compression == Compression::Zstd, version == 3 && zstd);
        prop_assert_eq!(h.extended_l2, b.incompat & INCOMPAT_EXTL2 != 0);
        prop_assert_eq!(h.l1_table_offset, 1u64 << cluster_bits);
    }
}
