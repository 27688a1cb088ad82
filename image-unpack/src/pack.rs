//! Packing a volume (or a snapshot of one) as a compressed qcow2 image: `vmblk pack`
//! and vmblkd's PublishVolume, what `incus publish` does for a VM.
//!
//! ```text
//!  source (file, device, rbd:...) ──► batches of 64 KiB clusters
//!        each batch: zero clusters left out; the rest compressed by N threads
//!        (zlib raw deflate with a 4 KiB window, as QEMU reads it, or zstd),
//!        kept raw where compression does not save a byte
//!                       ▼ in order
//!  .tmp-OUTPUT: header cluster │ data (compressed packed, raw aligned) │ L2 │ L1 │ refcounts
//!                       ▼ fsync, rename
//!  OUTPUT (qcow2 v3; `qemu-img check` clean)
//! ```
//!
//! The bytes are the volume's as the guest reads them: the partition table is at the
//! image's sector size (512 on a 4K volume, as unpack wrote it), so the image boots
//! wherever it is unpacked again.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use flate2::{Compress, FlushCompress, Status};
use serde::Serialize;

use crate::copy::is_zero;
use crate::target::{Target, TargetError};
use crate::unpack::Progress;

const CLUSTER_BITS: u32 = 16;
const CLUSTER: usize = 1 << CLUSTER_BITS;
const CS: u64 = CLUSTER as u64;
/// L2 entries per table (8-byte entries in one cluster).
const L2_ENTRIES: u64 = CS / 8;
/// Refcounts per refcount block (16-bit refcounts).
const REFCOUNTS_PER_BLOCK: u64 = CS / 2;
/// Clusters each thread takes per batch.
const CLUSTERS_PER_THREAD: usize = 32;

/// L2/L1 flag: the cluster's refcount is exactly one.
const QCOW_OFLAG_COPIED: u64 = 1 << 63;
/// L2 flag: a compressed cluster.
const QCOW_OFLAG_COMPRESSED: u64 = 1 << 62;
/// Where a compressed descriptor's sector count starts: 62 - (cluster_bits - 8).
const CSIZE_SHIFT: u32 = 62 - (CLUSTER_BITS - 8);
/// Incompatible feature bit: the header names a compression type other than zlib.
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Header length with the compression type field (padded to 8).
const HEADER_LENGTH: u32 = 112;

/// How clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Raw deflate, 4 KiB window, level 6 (QEMU's zlib compression type).
    Zlib,
    /// Zstandard, level 3 (QEMU's zstd compression type).
    Zstd,
}

impl Compression {
    /// `zlib` or `zstd`.
    pub fn parse(s: &str) -> Option<Compression> {
        match s {
            "zlib" => Some(Compression::Zlib),
            "zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }

    /// The header's compression type byte.
    fn header_type(self) -> u8 {
        match self {
            Compression::Zlib => 0,
            Compression::Zstd => 1,
        }
    }
}

/// Options of [`pack`].
#[derive(Debug, Clone, Copy)]
pub struct PackOptions {
    /// How clusters are compressed.
    pub compression: Compression,
    /// Compressing threads (0: one per CPU).
    pub threads: usize,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            compression: Compression::Zlib,
            threads: 0,
        }
    }
}

/// What [`pack`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct PackReport {
    /// The volume read.
    pub source: PathBuf,
    /// The image written.
    pub output: PathBuf,
    /// How clusters were compressed.
    pub compression: Compression,
    /// The image's virtual size (the volume's).
    pub virtual_size: u64,
    /// Cluster size of the image.
    pub cluster_size: u64,
    /// Clusters stored compressed.
    pub compressed_clusters: u64,
    /// Clusters stored as they are (compression would not save anything).
    pub raw_clusters: u64,
    /// Clusters left out (all zeros).
    pub zero_clusters: u64,
    /// Size of the image file.
    pub file_bytes: u64,
    /// Compressing threads.
    pub threads: usize,
    /// Wall time.
    pub elapsed_ms: u64,
}

/// Why [`pack`] failed; the output file does not exist then.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// The source could not be opened.
    #[error(transparent)]
    Source(#[from] TargetError),
    /// Reading the source failed.
    #[error("reading {path} at byte {offset}")]
    Read {
        /// The source.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// The output exists already.
    #[error("{0} exists: pack writes a new image, it does not overwrite one")]
    OutputExists(PathBuf),
    /// The source's size is no whole number of 512-byte sectors (qcow2 sizes are).
    #[error("{path} holds {size} bytes, not a whole number of 512-byte sectors")]
    Unaligned {
        /// The source.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Writing the output failed.
    #[error("{step} {path}")]
    Write {
        /// What was being done.
        step: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
}

/// How one cluster is stored.
enum Packed {
    /// All zeros: left out.
    Zero,
    /// Compressed to these bytes.
    Compressed(Vec<u8>),
    /// Stored as it is.
    Raw,
}

/// A compressor of whole clusters, one per thread.
enum Compressor {
    Zlib(Box<Compress>),
    Zstd(Box<zstd::bulk::Compressor<'static>>),
}

impl Compressor {
    fn new(c: Compression) -> io::Result<Compressor> {
        Ok(match c {
            // QEMU inflates with a 4 KiB window (-12): a larger one would let the
            // stream refer back further than QEMU can follow.
            Compression::Zlib => Compressor::Zlib(Box::new(Compress::new_with_window_bits(
                flate2::Compression::new(6),
                false,
                12,
            ))),
            Compression::Zstd => Compressor::Zstd(Box::new(zstd::bulk::Compressor::new(3)?)),
        })
    }

    /// Compresses `data` into `out` (less than a cluster); `None` when it does not fit.
    fn compress(&mut self, data: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        out.clear();
        out.resize(CLUSTER - 1, 0);
        match self {
            Compressor::Zlib(z) => {
                z.reset();
                match z.compress(data, out, FlushCompress::Finish) {
                    Ok(Status::StreamEnd) => Some(z.total_out() as usize),
                    _ => None,
                }
            }
            Compressor::Zstd(z) => z.compress_to_buffer(data, out.as_mut_slice()).ok(),
        }
    }
}

/// Reads the source (a file, a device or an RBD image).
struct Reader {
    target: Target,
    path: PathBuf,
}

impl Reader {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), PackError> {
        let err = |source| PackError::Read {
            path: self.path.clone(),
            offset,
            source,
        };
        if let Some(f) = self.target.file() {
            return f.read_exact_at(buf, offset).map_err(err);
        }
        if let Some(img) = self.target.rbd_image() {
            let mut done = 0;
            while done < buf.len() {
                let n = img
                    .read_at(&mut buf[done..], offset + done as u64)
                    .map_err(|e| err(io::Error::other(e)))?;
                if n == 0 {
                    return Err(err(io::ErrorKind::UnexpectedEof.into()));
                }
                done += n;
            }
            return Ok(());
        }
        Err(err(io::ErrorKind::Unsupported.into()))
    }
}

/// The image being written: where the next byte goes and what each host cluster's
/// refcount is.
struct Writer {
    file: File,
    path: PathBuf,
    pos: u64,
    refcounts: Vec<u16>,
}

impl Writer {
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), PackError> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|source| PackError::Write {
                step: "writing",
                path: self.path.clone(),
                source,
            })
    }

    /// One more reference to each host cluster of `[offset, offset + len)`.
    fn reference(&mut self, offset: u64, len: u64) {
        let last = (offset + len - 1) / CS;
        if self.refcounts.len() as u64 <= last {
            self.refcounts.resize(last as usize + 1, 0);
        }
        for c in offset / CS..=last {
            self.refcounts[c as usize] += 1;
        }
    }

    /// Writes whole clusters of metadata at the end; returns their offset.
    fn append_clusters(&mut self, data: &[u8]) -> Result<u64, PackError> {
        self.pos = self.pos.next_multiple_of(CS);
        let at = self.pos;
        let len = (data.len() as u64).next_multiple_of(CS).max(CS);
        let mut buf = data.to_vec();
        buf.resize(len as usize, 0);
        self.write_at(&buf, at)?;
        self.reference(at, len);
        self.pos += len;
        Ok(at)
    }
}

/// Packs the volume at `source` (a file, a block device, or `rbd:POOL/IMAGE[@SNAP]`)
/// into a new qcow2 image at `output`: zero clusters left out, the rest compressed in
/// parallel. Written under a temporary name and renamed when complete.
pub fn pack(
    source: &Path,
    output: &Path,
    opts: &PackOptions,
    progress: &dyn Progress,
) -> Result<PackReport, PackError> {
    let t0 = Instant::now();
    let reader = Reader {
        target: Target::open_read_only(source)?,
        path: source.to_owned(),
    };
    let size = reader.target.info().size;
    if size % 512 != 0 {
        return Err(PackError::Unaligned {
            path: source.to_owned(),
            size,
        });
    }
    if output.exists() {
        return Err(PackError::OutputExists(output.to_owned()));
    }
    let dir = match output.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    // A new file of its own (O_EXCL, a random name): never another writer's, never a
    // symlink's target. Removed if anything fails, even a panic.
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-pack-")
        .tempfile_in(&dir)
        .map_err(|source| PackError::Write {
            step: "creating a temporary file in",
            path: dir.clone(),
            source,
        })?;
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut w = Writer {
        file: tmp
            .as_file()
            .try_clone()
            .map_err(|source| PackError::Write {
                step: "opening",
                path: tmp.path().to_owned(),
                source,
            })?,
        path: tmp.path().to_owned(),
        pos: CS,
        refcounts: vec![1],
    };
    let mut rep = write_image(&reader, &mut w, size, opts.compression, threads, progress)?;
    w.file.sync_all().map_err(|source| PackError::Write {
        step: "syncing",
        path: w.path.clone(),
        source,
    })?;
    // Into place only if nothing is there meanwhile (link, then unlink the temporary).
    tmp.persist_noclobber(output).map_err(|e| {
        if e.error.kind() == io::ErrorKind::AlreadyExists {
            PackError::OutputExists(output.to_owned())
        } else {
            PackError::Write {
                step: "renaming the image to",
                path: output.to_owned(),
                source: e.error,
            }
        }
    })?;
    let _ = File::open(&dir).and_then(|d| d.sync_all());
    rep.source = source.to_owned();
    rep.output = output.to_owned();
    rep.threads = threads;
    rep.elapsed_ms = t0.elapsed().as_millis() as u64;
    Ok(rep)
}

fn write_image(
    reader: &Reader,
    w: &mut Writer,
    size: u64,
    compression: Compression,
    threads: usize,
    progress: &dyn Progress,
) -> Result<PackReport, PackError> {
    let clusters = size.div_ceil(CS);
    // L2 tables only where something is stored: memory follows the data, not the size.
    let mut l2: std::collections::BTreeMap<u64, Vec<u64>> = std::collections::BTreeMap::new();
    let mut rep = PackReport {
        source: PathBuf::new(),
        output: PathBuf::new(),
        compression,
        virtual_size: size,
        cluster_size: CS,
        compressed_clusters: 0,
        raw_clusters: 0,
        zero_clusters: 0,
        file_bytes: 0,
        threads,
        elapsed_ms: 0,
    };
    progress.phase("pack", Some(size));
    let batch = threads * CLUSTERS_PER_THREAD;
    let mut buf = vec![0u8; batch * CLUSTER];
    let mut compressors = (0..threads)
        .map(|_| Compressor::new(compression))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|source| PackError::Write {
            step: "starting the compressor for",
            path: w.path.clone(),
            source,
        })?;
    let mut first = 0u64;
    while first < clusters {
        let n = (clusters - first).min(batch as u64) as usize;
        let start = first * CS;
        let len = (size - start).min(n as u64 * CS) as usize;
        buf[len..n * CLUSTER].fill(0);
        reader.read_exact_at(&mut buf[..len], start)?;
        // Each thread compresses its own run of clusters of the batch.
        let per = n.div_ceil(threads);
        let packed: Vec<Packed> = std::thread::scope(|s| {
            let handles: Vec<_> = buf[..n * CLUSTER]
                .chunks(per * CLUSTER)
                .zip(compressors.iter_mut())
                .map(|(chunk, comp)| {
                    s.spawn(move || {
                        let mut out = Vec::with_capacity(CLUSTER);
                        chunk
                            .chunks(CLUSTER)
                            .map(|c| {
                                if is_zero(c) {
                                    return Packed::Zero;
                                }
                                match comp.compress(c, &mut out) {
                                    Some(k) => Packed::Compressed(out[..k].to_vec()),
                                    None => Packed::Raw,
                                }
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("a compressing thread panicked"))
                .collect()
        });
        // In order: one write for the batch.
        let base = w.pos;
        let mut out: Vec<u8> = Vec::with_capacity(n * CLUSTER);
        for (i, p) in packed.iter().enumerate() {
            if let Packed::Zero = p {
                rep.zero_clusters += 1;
                continue;
            }
            let c = first + i as u64;
            let entry = &mut l2
                .entry(c / L2_ENTRIES)
                .or_insert_with(|| vec![0; L2_ENTRIES as usize])[(c % L2_ENTRIES) as usize];
            match p {
                Packed::Zero => {}
                Packed::Compressed(data) => {
                    let off = base + out.len() as u64;
                    let len = data.len() as u64;
                    let sectors = ((off + len - 1) >> 9) - (off >> 9);
                    *entry = QCOW_OFLAG_COMPRESSED | (sectors << CSIZE_SHIFT) | off;
                    out.extend_from_slice(data);
                    w.reference(off, len);
                    rep.compressed_clusters += 1;
                }
                Packed::Raw => {
                    let pad = (base + out.len() as u64).next_multiple_of(CS) - base;
                    out.resize(pad as usize, 0);
                    let off = base + pad;
                    *entry = QCOW_OFLAG_COPIED | off;
                    out.extend_from_slice(&buf[i * CLUSTER..(i + 1) * CLUSTER]);
                    w.reference(off, CS);
                    rep.raw_clusters += 1;
                }
            }
        }
        w.write_at(&out, base)?;
        w.pos = base + out.len() as u64;
        first += n as u64;
        progress.advance(start + len as u64);
    }

    // L2 tables (none for a range of zeros), then the L1 table.
    let l1_size = clusters.div_ceil(L2_ENTRIES);
    let mut l1 = vec![0u64; l1_size as usize];
    for (j, table) in &l2 {
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        l1[*j as usize] = QCOW_OFLAG_COPIED | w.append_clusters(&bytes)?;
    }
    drop(l2);
    let l1_offset = if l1.is_empty() {
        // An empty volume: no L1 table at all (QEMU counts none).
        0
    } else {
        let l1_bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        w.append_clusters(&l1_bytes)?
    };

    // Refcount table and blocks, counting themselves.
    w.pos = w.pos.next_multiple_of(CS);
    let used = w.pos / CS;
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let total = used + blocks + table;
        let need_blocks = total.div_ceil(REFCOUNTS_PER_BLOCK);
        let need_table = (need_blocks * 8).div_ceil(CS);
        if (need_blocks, need_table) == (blocks, table) {
            break;
        }
        (blocks, table) = (need_blocks, need_table);
    }
    let table_offset = w.pos;
    let blocks_offset = table_offset + table * CS;
    w.reference(table_offset, (table + blocks) * CS);
    w.refcounts
        .resize((blocks * REFCOUNTS_PER_BLOCK) as usize, 0);
    let table_bytes: Vec<u8> = (0..blocks)
        .flat_map(|k| (blocks_offset + k * CS).to_be_bytes())
        .collect();
    let block_bytes: Vec<u8> = w.refcounts.iter().flat_map(|r| r.to_be_bytes()).collect();
    let mut tail = table_bytes;
    tail.resize((table * CS) as usize, 0);
    tail.extend_from_slice(&block_bytes);
    w.write_at(&tail, table_offset)?;
    w.pos = blocks_offset + blocks * CS;

    // The header, last: until now the file is no image.
    let mut h = vec![0u8; CLUSTER];
    h[0..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&CLUSTER_BITS.to_be_bytes());
    h[24..32].copy_from_slice(&size.to_be_bytes());
    h[36..40].copy_from_slice(&(l1_size as u32).to_be_bytes());
    h[40..48].copy_from_slice(&l1_offset.to_be_bytes());
    h[48..56].copy_from_slice(&table_offset.to_be_bytes());
    h[56..60].copy_from_slice(&(table as u32).to_be_bytes());
    let incompat = match compression {
        Compression::Zlib => 0,
        Compression::Zstd => INCOMPAT_COMPRESSION,
    };
    h[72..80].copy_from_slice(&incompat.to_be_bytes());
    h[96..100].copy_from_slice(&4u32.to_be_bytes());
    h[100..104].copy_from_slice(&HEADER_LENGTH.to_be_bytes());
    h[104] = compression.header_type();
    // The header extension area ends at once (type 0, length 0: zeros).
    w.write_at(&h, 0)?;
    rep.file_bytes = w.pos;
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::unpack::NoProgress;

    /// A volume of every kind of cluster: zeros, text (compresses), random (does not),
    /// a partial last cluster.
    fn volume(dir: &Path) -> (PathBuf, Vec<u8>) {
        let size = 300 * CLUSTER + 4096;
        let mut data = vec![0u8; size];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for c in 0..300 {
            let chunk = &mut data[c * CLUSTER..(c + 1) * CLUSTER];
            match c % 3 {
                0 => {}
                1 => {
                    for (i, b) in chunk.iter_mut().enumerate() {
                        *b = b"vmblk packs volumes "[i % 20];
                    }
                }
                _ => {
                    for b in chunk.iter_mut() {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        *b = x as u8;
                    }
                }
            }
        }
        data[size - 10..].copy_from_slice(b"last bytes");
        let p = dir.join("vol.raw");
        fs::write(&p, &data).unwrap();
        (p, data)
    }

    fn read_back(image: &Path) -> Vec<u8> {
        let src = crate::source::open(image, &crate::source::OpenOptions::default()).unwrap();
        let mut out = vec![0u8; src.virtual_size() as usize];
        for e in src.extents() {
            let e = e.unwrap();
            let mut b = vec![0u8; e.len as usize];
            src.read_extent(&e, &mut b).unwrap();
            let at = e.guest_offset as usize;
            out[at..at + b.len()].copy_from_slice(&b);
        }
        out
    }

    #[test]
    fn a_packed_volume_reads_back_byte_for_byte_with_either_compression() {
        let t = tempfile::tempdir().unwrap();
        let (vol, data) = volume(t.path());
        for (c, threads) in [(Compression::Zlib, 2), (Compression::Zstd, 3)] {
            let out = t.path().join(format!("{c:?}.qcow2"));
            let rep = pack(
                &vol,
                &out,
                &PackOptions {
                    compression: c,
                    threads,
                },
                &NoProgress,
            )
            .unwrap();
            assert_eq!(rep.virtual_size, data.len() as u64);
            assert_eq!(rep.zero_clusters, 100, "{rep:?}");
            assert_eq!(rep.raw_clusters, 100, "{rep:?}");
            assert_eq!(rep.compressed_clusters, 101, "{rep:?}");
            assert_eq!(rep.file_bytes, fs::metadata(&out).unwrap().len());
            assert!(
                read_back(&out) == data,
                "{c:?}: the image reads back different"
            );
            // No temporary file left; an existing output is not overwritten.
            let tmp: Vec<_> = fs::read_dir(t.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with(".tmp")
                })
                .collect();
            assert!(tmp.is_empty(), "{tmp:?}");
            assert!(matches!(
                pack(&vol, &out, &PackOptions::default(), &NoProgress),
                Err(PackError::OutputExists(_))
            ));
        }
    }

    #[test]
    fn an_empty_volume_and_an_unaligned_one() {
        let t = tempfile::tempdir().unwrap();
        let empty = t.path().join("empty.raw");
        fs::write(&empty, b"").unwrap();
        let out = t.path().join("empty.qcow2");
        let rep = pack(&empty, &out, &PackOptions::default(), &NoProgress).unwrap();
        assert_eq!(rep.virtual_size, 0);
        let check = std::process::Command::new("qemu-img")
            .arg("check")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stdout)
        );
        let odd = t.path().join("odd.raw");
        fs::write(&odd, vec![1u8; 1000]).unwrap();
        let e = pack(
            &odd,
            &t.path().join("odd.qcow2"),
            &PackOptions::default(),
            &NoProgress,
        )
        .unwrap_err();
        assert!(matches!(e, PackError::Unaligned { size: 1000, .. }), "{e}");
        assert!(!t.path().join("odd.qcow2").exists());
    }

    /// A cluster of `period` random bytes repeated: compressible only by matches
    /// `period` bytes back.
    fn repeating(period: usize) -> Vec<u8> {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut data = vec![0u8; CLUSTER];
        for b in data[..period].iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 24) as u8;
        }
        for i in period..CLUSTER {
            data[i] = data[i - period];
        }
        data
    }

    #[test]
    fn zlib_clusters_use_a_window_qemu_can_inflate() {
        let mut c = Compressor::new(Compression::Zlib).unwrap();
        let mut out = Vec::new();
        // QEMU inflates with a 4 KiB window: repetition 8 KiB back must not be used...
        assert!(
            c.compress(&repeating(8192), &mut out).is_none(),
            "the deflate window reaches past 4 KiB"
        );
        // ...repetition 2 KiB back is, and inflates with that window.
        let data = repeating(2048);
        let n = c
            .compress(&data, &mut out)
            .expect("2 KiB repetition compresses");
        let mut d = flate2::Decompress::new_with_window_bits(false, 12);
        let mut back = vec![0u8; CLUSTER];
        d.decompress(&out[..n], &mut back, flate2::FlushDecompress::Finish)
            .unwrap();
        assert_eq!(d.total_out() as usize, CLUSTER);
        assert!(back == data);
    }
}
