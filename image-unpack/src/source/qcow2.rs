//! qcow2 images, versions 2 and 3, read-only and without backing files.
//!
//! ```text
//!  header (big-endian, zerocopy) ──► validate ──► L1 table (read once, every entry checked)
//!                                                   │ per L1 entry, lazily
//!                                                   ▼
//!                                     L2 table (one cluster, standard or extended entries)
//!                                                   │ per cluster / subcluster run
//!                                                   ▼
//!          Zero | Data{plain, merged while host-contiguous} | Data{compressed: one cluster}
//! ```
//!
//! Opening walks every L2 table once and checks each entry (alignment, offsets
//! inside the file, reserved bits), so a corrupt map is refused before anything
//! is written; [`ImageSource::extents`] walks them again lazily, holding one L2
//! table at a time. Compressed clusters are inflated in [`ImageSource::read_extent`]
//! with per-thread decoder state, so several threads can inflate at once.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use flate2::{Decompress, FlushDecompress, Status};
use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use zerocopy::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};
use zstd::stream::raw::{InBuffer, Operation, OutBuffer};

use super::detect::QCOW2_MAGIC;
use super::{
    skip_before, Extent, ExtentKind, ImageSource, ReadAt, SourceError, SourceFormat,
    MAX_DATA_EXTENT,
};

/// The version 2 header (72 bytes), as stored.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct HeaderV2 {
    pub magic: U32,
    pub version: U32,
    pub backing_file_offset: U64,
    pub backing_file_size: U32,
    pub cluster_bits: U32,
    pub size: U64,
    pub crypt_method: U32,
    pub l1_size: U32,
    pub l1_table_offset: U64,
    pub refcount_table_offset: U64,
    pub refcount_table_clusters: U32,
    pub nb_snapshots: U32,
    pub snapshots_offset: U64,
}

/// The version 3 additions (bytes 72..104), as stored.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct HeaderV3 {
    pub incompatible_features: U64,
    pub compatible_features: U64,
    pub autoclear_features: U64,
    pub refcount_order: U32,
    pub header_length: U32,
}

const V2_HEADER_LEN: u32 = 72;
const V3_HEADER_LEN: u32 = 104;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

const EXT_END: u32 = 0;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;

/// L1 entry: bits 9..=55 hold the L2 table offset.
const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry reserved bits (1..=8 and 56..=62).
const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01fe;
/// Standard L2 entry: bits 9..=55 hold the host cluster offset.
const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2E_COMPRESSED: u64 = 1 << 62;
const L2E_ZERO: u64 = 1;
/// Largest L1 table QEMU creates (32 MiB); anything larger is refused.
const MAX_L1_BYTES: u64 = 32 << 20;
/// Subclusters per cluster with extended L2 entries.
const SUBCLUSTERS: u32 = 32;

/// Compression used for compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (as QEMU writes it: no zlib header).
    Zlib,
    /// A zstd frame, possibly followed by padding.
    Zstd,
}

impl Compression {
    /// "zlib" or "zstd".
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

/// A validated qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size, 9..=21.
    pub cluster_bits: u32,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// File offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Header length in bytes (72 for v2).
    pub header_length: u32,
    /// Incompatible feature bits (v3).
    pub incompatible_features: u64,
    /// Compression type of compressed clusters.
    pub compression: Compression,
    /// Extended L2 entries (32 subclusters per cluster).
    pub extended_l2: bool,
}

fn corrupt(msg: impl Into<String>) -> SourceError {
    SourceError::Corrupt(msg.into())
}

impl Qcow2Header {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended_l2 { 16 } else { 8 }
    }

    /// The format as reported to the user.
    pub fn format(&self) -> SourceFormat {
        SourceFormat::Qcow2 {
            version: self.version,
            cluster_size: self.cluster_size(),
            compression: self.compression.name().into(),
            extended_l2: self.extended_l2,
        }
    }

    /// Parses and validates the header from `head` (the first bytes of the file,
    /// at least the header length, and ideally the whole first cluster so header
    /// extensions can be read) of a file of `file_len` bytes. Does not read the
    /// L1 table.
    pub fn parse(head: &[u8], file_len: u64) -> Result<Self, SourceError> {
        let (v2, _) = HeaderV2::read_from_prefix(head).map_err(|_| {
            corrupt(format!(
                "qcow2 header truncated: {} bytes, need {V2_HEADER_LEN}",
                head.len()
            ))
        })?;
        if v2.magic.get().to_be_bytes() != QCOW2_MAGIC {
            return Err(SourceError::Unrecognised("no qcow2 magic".into()));
        }
        let version = v2.version.get();
        if version != 2 && version != 3 {
            return Err(SourceError::Unsupported(format!("qcow2 version {version}")));
        }
        let cluster_bits = v2.cluster_bits.get();
        if !(9..=21).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "cluster_bits {cluster_bits} outside 9..=21"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;

        let (incompatible, header_length, compression_byte) = if version == 3 {
            let rest = &head[V2_HEADER_LEN as usize..];
            let (v3, _) = HeaderV3::read_from_prefix(rest).map_err(|_| {
                corrupt(format!(
                    "qcow2 v3 header truncated: {} bytes, need {V3_HEADER_LEN}",
                    head.len()
                ))
            })?;
            let len = v3.header_length.get();
            if len < V3_HEADER_LEN || u64::from(len) > cluster_size || len % 8 != 0 {
                return Err(corrupt(format!(
                    "header_length {len} (must be >= {V3_HEADER_LEN}, a multiple of 8 and at most the cluster size {cluster_size})"
                )));
            }
            if (len as usize) > head.len() {
                return Err(corrupt(format!(
                    "header_length {len} past the {} bytes available",
                    head.len()
                )));
            }
            let refcount_order = v3.refcount_order.get();
            if refcount_order > 6 {
                return Err(corrupt(format!("refcount_order {refcount_order} > 6")));
            }
            let comp = if len > V3_HEADER_LEN {
                head[V3_HEADER_LEN as usize]
            } else {
                0
            };
            (v3.incompatible_features.get(), len, comp)
        } else {
            (0, V2_HEADER_LEN, 0)
        };
        if u64::from(header_length) > file_len {
            return Err(corrupt(format!(
                "file of {file_len} bytes is shorter than its {header_length}-byte header"
            )));
        }

        // Refusals, most fundamental first.
        let backing_offset = v2.backing_file_offset.get();
        if backing_offset != 0 {
            let name = backing_name(head, backing_offset, v2.backing_file_size.get());
            return Err(SourceError::Unsupported(format!(
                "qcow2 image has a backing file{name}; flatten it first (qemu-img convert -O qcow2)"
            )));
        }
        let crypt = v2.crypt_method.get();
        if crypt != 0 {
            let how = match crypt {
                1 => "AES",
                2 => "LUKS",
                _ => "an unknown method",
            };
            return Err(SourceError::Unsupported(format!(
                "qcow2 image is encrypted ({how}, crypt_method {crypt})"
            )));
        }
        if incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(SourceError::Unsupported(
                "qcow2 image keeps its data in an external data file".into(),
            ));
        }
        let unknown = incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names = feature_names(head, header_length, unknown);
            return Err(SourceError::Unsupported(format!(
                "qcow2 image uses unknown incompatible features {unknown:#x}{names}"
            )));
        }
        if incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(corrupt(
                "qcow2 image is marked corrupt by QEMU; check it with `qemu-img check -r`",
            ));
        }
        let compression = match (incompatible & INCOMPAT_COMPRESSION != 0, compression_byte) {
            (_, 0) => Compression::Zlib,
            (true, 1) => Compression::Zstd,
            (false, c) => {
                return Err(corrupt(format!(
                    "compression_type {c} set without the compression type feature bit"
                )))
            }
            (true, c) => {
                return Err(SourceError::Unsupported(format!(
                    "qcow2 compression type {c} (only zlib and zstd are known)"
                )))
            }
        };
        let extended_l2 = incompatible & INCOMPAT_EXTL2 != 0;
        if extended_l2 && cluster_bits < 14 {
            return Err(corrupt(format!(
                "extended L2 entries with {cluster_size}-byte clusters (need at least 16384)"
            )));
        }

        let header = Qcow2Header {
            version,
            cluster_bits,
            virtual_size: v2.size.get(),
            l1_size: v2.l1_size.get(),
            l1_table_offset: v2.l1_table_offset.get(),
            header_length,
            incompatible_features: incompatible,
            compression,
            extended_l2,
        };
        header.validate_l1_geometry(file_len)?;
        Ok(header)
    }

    /// Checks the L1 table's position and size against the file and the virtual size.
    fn validate_l1_geometry(&self, file_len: u64) -> Result<(), SourceError> {
        let cs = self.cluster_size();
        // Guest bytes one L1 entry maps.
        let per_l1 = cs * self.l2_entries();
        let needed = self.virtual_size.div_ceil(per_l1);
        if u64::from(self.l1_size) < needed {
            return Err(corrupt(format!(
                "L1 table of {} entries maps {} bytes, less than the virtual size {}",
                self.l1_size,
                u128::from(self.l1_size) * u128::from(per_l1),
                self.virtual_size
            )));
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "L1 table of {} entries is too large",
                self.l1_size
            )));
        }
        if self.l1_size == 0 {
            return Ok(());
        }
        if self.l1_table_offset % cs != 0 || self.l1_table_offset == 0 {
            return Err(corrupt(format!(
                "L1 table offset {:#x} is not a nonzero multiple of the cluster size",
                self.l1_table_offset
            )));
        }
        match self.l1_table_offset.checked_add(l1_bytes) {
            Some(end) if end <= file_len => Ok(()),
            _ => Err(corrupt(format!(
                "L1 table at {:#x} ({} entries) runs past the end of the {file_len}-byte file",
                self.l1_table_offset, self.l1_size
            ))),
        }
    }

    /// Reads and validates the header (and its extensions) from `reader`.
    pub fn read(reader: &dyn ReadAt) -> Result<Self, SourceError> {
        let file_len = reader.len();
        let mut small = [0u8; V3_HEADER_LEN as usize + 8];
        let n = usize::try_from(file_len)
            .unwrap_or(usize::MAX)
            .min(small.len());
        reader
            .read_exact_at(&mut small[..n], 0)
            .map_err(|e| SourceError::read("qcow2 header", 0, e))?;
        if n < V2_HEADER_LEN as usize {
            return Err(corrupt(format!(
                "qcow2 file of {file_len} bytes is shorter than the {V2_HEADER_LEN}-byte header"
            )));
        }
        let cluster_bits = u32::from_be_bytes([small[20], small[21], small[22], small[23]]);
        if !(9..=21).contains(&cluster_bits) {
            return Header::parse(&small[..n], file_len);
        }
        // The header and its extensions live in the first cluster.
        let first = (1u64 << cluster_bits).min(file_len) as usize;
        let mut head = vec![0u8; first];
        reader
            .read_exact_at(&mut head, 0)
            .map_err(|e| SourceError::read("qcow2 header cluster", 0, e))?;
        Header::parse(&head, file_len)
    }
}

type Header = Qcow2Header;

/// " \"name\"" of the backing file when it can be read from `head`.
fn backing_name(head: &[u8], offset: u64, size: u32) -> String {
    let start = usize::try_from(offset).ok();
    let end = start.and_then(|s| s.checked_add(size.min(1023) as usize));
    match (start, end) {
        (Some(s), Some(e)) if e <= head.len() && e > s => {
            format!(
                " \"{}\"",
                String::from_utf8_lossy(&head[s..e]).escape_debug()
            )
        }
        _ => String::new(),
    }
}

/// " (name, name)" of the incompatible feature bits in `bits`, from the feature name
/// table header extension when there is one. Malformed extensions yield nothing.
fn feature_names(head: &[u8], header_length: u32, bits: u64) -> String {
    let mut names = Vec::new();
    let mut pos = header_length as usize;
    while let Some(h) = head.get(pos..pos + 8) {
        let ty = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]) as usize;
        if ty == EXT_END {
            break;
        }
        let Some(data) = head.get(pos + 8..(pos + 8).saturating_add(len)) else {
            break;
        };
        if ty == EXT_FEATURE_NAMES {
            for entry in data.chunks_exact(48) {
                if entry[0] == 0 && entry[1] < 64 && bits & (1 << entry[1]) != 0 {
                    let raw = &entry[2..];
                    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                    names.push(String::from_utf8_lossy(&raw[..end]).into_owned());
                }
            }
        }
        pos = pos + 8 + len.next_multiple_of(8);
    }
    if names.is_empty() {
        String::new()
    } else {
        format!(" ({})", names.join(", "))
    }
}

/// A qcow2 image opened for reading.
#[derive(Debug)]
pub struct Qcow2Source {
    reader: Arc<dyn ReadAt>,
    header: Qcow2Header,
    /// The active L1 table, every entry validated.
    l1: Vec<u64>,
    /// The file behind `reader`, when it is a whole file: data clusters that lie in
    /// its holes (preallocated metadata) are reported as zero.
    holes: Option<File>,
}

impl Qcow2Source {
    /// Opens a qcow2 image: validates the header, the L1 table and every L2 entry.
    pub fn open(reader: Arc<dyn ReadAt>) -> Result<Self, SourceError> {
        Self::open_with_holes(reader, None)
    }

    /// Like [`Qcow2Source::open`]; `file`, when given, must be the same whole file as
    /// `reader` and is used only to find holes (`SEEK_DATA`/`SEEK_HOLE`), so that
    /// allocated clusters nothing was written to read as zero extents.
    pub fn open_with_holes(
        reader: Arc<dyn ReadAt>,
        file: Option<File>,
    ) -> Result<Self, SourceError> {
        let header = Qcow2Header::read(reader.as_ref())?;
        let file_len = reader.len();
        let cs = header.cluster_size();
        // Only the entries that map the virtual size are used; the rest are ignored.
        let used = header.virtual_size.div_ceil(cs * header.l2_entries()) as usize;
        let mut raw = vec![0u8; used * 8];
        reader
            .read_exact_at(&mut raw, header.l1_table_offset)
            .map_err(|e| SourceError::read("qcow2 L1 table", header.l1_table_offset, e))?;
        let mut l1 = Vec::with_capacity(used);
        for (i, b) in raw.chunks_exact(8).enumerate() {
            let entry = u64::from_be_bytes(b.try_into().unwrap_or_default());
            let at = header.l1_table_offset + i as u64 * 8;
            if entry & L1E_RESERVED_MASK != 0 {
                return Err(corrupt(format!(
                    "L1 entry {i} (file offset {at:#x}) has reserved bits set: {entry:#x}"
                )));
            }
            let off = entry & L1E_OFFSET_MASK;
            if off != 0 {
                if off % cs != 0 {
                    return Err(corrupt(format!(
                        "L1 entry {i} (file offset {at:#x}): L2 table offset {off:#x} is not cluster-aligned"
                    )));
                }
                match off.checked_add(cs) {
                    Some(end) if end <= file_len => {}
                    _ => {
                        return Err(corrupt(format!(
                            "L1 entry {i} (file offset {at:#x}): L2 table at {off:#x} runs past the end of the {file_len}-byte file"
                        )))
                    }
                }
            }
            l1.push(off);
        }
        let src = Qcow2Source {
            reader,
            header,
            l1,
            holes: file,
        };
        for e in src.walk() {
            e?;
        }
        Ok(src)
    }

    /// The validated header.
    pub fn header(&self) -> &Qcow2Header {
        &self.header
    }

    fn walk(&self) -> Walker<'_> {
        self.walk_from(0)
    }

    /// Walks from the cluster (or unallocated L1 range) holding `guest_offset`.
    fn walk_from(&self, guest_offset: u64) -> Walker<'_> {
        let cs = self.header.cluster_size();
        let per_l1 = cs * self.header.l2_entries();
        Walker {
            src: self,
            l1_index: usize::try_from(guest_offset / per_l1).unwrap_or(usize::MAX),
            l2_index: guest_offset % per_l1 / cs,
            l2: Vec::new(),
            queue: VecDeque::new(),
            pending: None,
            done: guest_offset >= self.header.virtual_size,
            hole: (0, 0),
            data: if self.holes.is_some() {
                (0, 0)
            } else {
                (0, u64::MAX)
            },
        }
    }

    fn read_compressed(
        &self,
        extent: &Extent,
        host_offset: u64,
        clen: u64,
        buf: &mut [u8],
    ) -> Result<(), SourceError> {
        let cs = self.header.cluster_size() as usize;
        let file_len = self.reader.len();
        // The descriptor's sector count may reach up to 511 bytes past the end of
        // the file (QEMU does not pad the last compressed cluster).
        // A descriptor never covers more than two clusters; bound what a caller passes.
        let avail = file_len
            .saturating_sub(host_offset)
            .min(clen)
            .min(2 * cs as u64) as usize;
        let compression = self.header.compression;
        let fail = |source: io::Error| SourceError::Decompress {
            guest_offset: extent.guest_offset,
            host_offset,
            source,
        };
        SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            let Scratch {
                input,
                cluster,
                zlib,
                fast,
                zstd,
            } = &mut *scratch;
            input.resize(avail, 0);
            self.reader
                .read_exact_at(input, host_offset)
                .map_err(|e| SourceError::read("qcow2 compressed cluster", host_offset, e))?;
            let direct = buf.len() == cs;
            let out: &mut [u8] = if direct {
                buf
            } else {
                cluster.resize(cs, 0);
                cluster
            };
            match compression {
                // libdeflate inflates a whole cluster in one call, about twice as fast
                // as a streaming inflater; anything it does not finish exactly (a
                // stream longer than the cluster, corrupt data) goes through the
                // streaming path, which has QEMU's semantics and precise errors.
                Compression::Zlib => match fast.deflate_decompress(input, out) {
                    Ok(n) if n == out.len() => {}
                    _ => inflate_raw(zlib, input, out).map_err(fail)?,
                },
                Compression::Zstd => {
                    if zstd.is_none() {
                        *zstd = Some(zstd::stream::raw::Decoder::new().map_err(fail)?);
                    }
                    let dec = zstd
                        .as_mut()
                        .ok_or_else(|| fail(io::Error::other("no decoder")))?;
                    unzstd(dec, input, out).map_err(fail)?
                }
            }
            if !direct {
                buf.copy_from_slice(&cluster[..buf.len()]);
            }
            Ok(())
        })
    }
}

/// Per-thread decompression state, reused across clusters.
struct Scratch {
    input: Vec<u8>,
    cluster: Vec<u8>,
    zlib: Decompress,
    fast: libdeflater::Decompressor,
    zstd: Option<zstd::stream::raw::Decoder<'static>>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        input: Vec::new(),
        cluster: Vec::new(),
        zlib: Decompress::new(false),
        fast: libdeflater::Decompressor::new(),
        zstd: None,
    });
}

/// Inflates raw deflate `input` into exactly `out.len()` bytes. Like QEMU, input
/// left over after the output is full is ignored (the descriptor's size is only
/// sector-precise).
fn inflate_raw(d: &mut Decompress, input: &[u8], out: &mut [u8]) -> io::Result<()> {
    d.reset(false);
    let status = d
        .decompress(input, out, FlushDecompress::Finish)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let produced = d.total_out();
    if produced == out.len() as u64 {
        return Ok(());
    }
    let why = match status {
        Status::StreamEnd => "deflate stream ended early",
        _ => "compressed data truncated",
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{why}: {produced} of {} bytes", out.len()),
    ))
}

/// Decodes a zstd frame (possibly followed by padding) into exactly `out.len()` bytes.
fn unzstd(
    dec: &mut zstd::stream::raw::Decoder<'static>,
    input: &[u8],
    out: &mut [u8],
) -> io::Result<()> {
    dec.reinit()?;
    let want = out.len();
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    while outb.pos() < want {
        let (ip, op) = (inb.pos(), outb.pos());
        let hint = dec.run(&mut inb, &mut outb)?;
        if outb.pos() < want && (hint == 0 || (inb.pos() == ip && outb.pos() == op)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("zstd frame ended after {} of {want} bytes", outb.pos()),
            ));
        }
    }
    Ok(())
}

impl ImageSource for Qcow2Source {
    fn format(&self) -> SourceFormat {
        self.header.format()
    }

    fn virtual_size(&self) -> u64 {
        self.header.virtual_size
    }

    fn extents(&self) -> Box<dyn Iterator<Item = Result<Extent, SourceError>> + Send + '_> {
        Box::new(self.walk())
    }

    fn extents_from(
        &self,
        guest_offset: u64,
    ) -> Box<dyn Iterator<Item = Result<Extent, SourceError>> + Send + '_> {
        Box::new(skip_before(self.walk_from(guest_offset), guest_offset))
    }

    fn max_extent_len(&self) -> u64 {
        MAX_DATA_EXTENT.max(self.header.cluster_size())
    }

    fn read_extent(&self, extent: &Extent, buf: &mut [u8]) -> Result<(), SourceError> {
        if buf.len() as u64 != extent.len {
            return Err(corrupt(format!(
                "buffer of {} bytes for extent of {} at guest offset {}",
                buf.len(),
                extent.len,
                extent.guest_offset
            )));
        }
        match extent.kind {
            ExtentKind::Zero => {
                buf.fill(0);
                Ok(())
            }
            ExtentKind::Data {
                host_offset,
                compressed_len: None,
            } => self
                .reader
                .read_exact_at(buf, host_offset)
                .map_err(|e| SourceError::read("qcow2 data cluster", host_offset, e)),
            ExtentKind::Data {
                host_offset,
                compressed_len: Some(clen),
            } => {
                if extent.len > self.header.cluster_size() {
                    return Err(corrupt(format!(
                        "compressed extent of {} bytes at guest offset {} is larger than a cluster",
                        extent.len, extent.guest_offset
                    )));
                }
                self.read_compressed(extent, host_offset, clen, buf)
            }
        }
    }
}

/// Walks L1 and L2 tables in guest order, yielding merged extents.
struct Walker<'a> {
    src: &'a Qcow2Source,
    l1_index: usize,
    /// Next entry of the current L2 table (`l2` holds it when non-empty).
    l2_index: u64,
    /// The current L2 table, raw.
    l2: Vec<u8>,
    /// Pieces of the current cluster not yet merged.
    queue: VecDeque<Extent>,
    /// The extent being grown by merging.
    pending: Option<Extent>,
    done: bool,
    /// Last hole and data region of the host file found by `SEEK_DATA`/`SEEK_HOLE`
    /// (`data` covers everything when holes are not looked for).
    hole: (u64, u64),
    data: (u64, u64),
}

impl Walker<'_> {
    /// Queues plain data at `host` for `[guest, guest + len)`, as zero where the
    /// host file has holes.
    fn push_data(&mut self, guest: u64, host: u64, len: u64) {
        let mut done = 0;
        while done < len {
            let h = host + done;
            let left = len - done;
            let (is_data, n) = if (self.data.0..self.data.1).contains(&h) {
                (true, (self.data.1 - h).min(left))
            } else if (self.hole.0..self.hole.1).contains(&h) {
                (false, (self.hole.1 - h).min(left))
            } else {
                self.find_region(h);
                continue;
            };
            let kind = if is_data {
                ExtentKind::Data {
                    host_offset: h,
                    compressed_len: None,
                }
            } else {
                ExtentKind::Zero
            };
            self.queue.push_back(Extent {
                guest_offset: guest + done,
                len: n,
                kind,
            });
            done += n;
        }
    }

    /// Sets `hole` or `data` to a region of the host file that contains `h`.
    fn find_region(&mut self, h: u64) {
        let (Some(file), Ok(pos)) = (&self.src.holes, i64::try_from(h)) else {
            self.data = (h, u64::MAX);
            return;
        };
        let fd = file.as_raw_fd();
        match lseek(fd, pos, Whence::SeekData) {
            Ok(ds) if ds as u64 > h => self.hole = (h, ds as u64),
            Ok(ds) if ds as u64 == h => {
                let de = match lseek(fd, ds, Whence::SeekHole) {
                    Ok(de) => (de as u64).max(h + 1),
                    Err(_) => u64::MAX,
                };
                self.data = (h, de);
            }
            Err(Errno::ENXIO) => self.hole = (h, u64::MAX),
            // No hole information: everything is data.
            _ => self.data = (h, u64::MAX),
        }
    }

    /// Appends the pieces of the next cluster (or unallocated L1 range) to `queue`.
    /// Returns false at the end of the disk.
    fn refill(&mut self) -> Result<bool, SourceError> {
        let h = &self.src.header;
        let cs = h.cluster_size();
        let n_l2 = h.l2_entries();
        let vsize = h.virtual_size;
        let per_l1 = cs * n_l2;
        loop {
            let Some(&l2_off) = self.src.l1.get(self.l1_index) else {
                return Ok(false);
            };
            let l1_base = self.l1_index as u64 * per_l1;
            if l1_base >= vsize {
                return Ok(false);
            }
            if l2_off == 0 {
                let len = per_l1.min(vsize - l1_base);
                self.queue.push_back(Extent {
                    guest_offset: l1_base,
                    len,
                    kind: ExtentKind::Zero,
                });
                self.l1_index += 1;
                self.l2_index = 0;
                return Ok(true);
            }
            let guest = l1_base + self.l2_index * cs;
            if self.l2_index >= n_l2 || guest >= vsize {
                self.l1_index += 1;
                self.l2_index = 0;
                self.l2.clear();
                continue;
            }
            if self.l2.is_empty() {
                self.l2.resize(cs as usize, 0);
                self.src
                    .reader
                    .read_exact_at(&mut self.l2, l2_off)
                    .map_err(|e| SourceError::read("qcow2 L2 table", l2_off, e))?;
            }
            let i = self.l2_index as usize;
            let len = cs.min(vsize - guest);
            if h.extended_l2 {
                let entry = be64(&self.l2, i * 16);
                let bitmap = be64(&self.l2, i * 16 + 8);
                self.extended_entry(entry, bitmap, guest, len, l2_off, i)?;
            } else {
                let entry = be64(&self.l2, i * 8);
                self.standard_entry(entry, guest, len, l2_off, i)?;
            }
            self.l2_index += 1;
            return Ok(true);
        }
    }

    fn where_(&self, guest: u64, l2_off: u64, i: usize) -> String {
        format!("L2 entry for guest offset {guest} (L2 table at {l2_off:#x}, index {i})")
    }

    /// Checks that `[off, off + len)` lies inside the file.
    fn check_data(
        &self,
        off: u64,
        len: u64,
        guest: u64,
        l2_off: u64,
        i: usize,
    ) -> Result<(), SourceError> {
        let file_len = self.src.reader.len();
        match off.checked_add(len) {
            Some(end) if end <= file_len => Ok(()),
            _ => Err(corrupt(format!(
                "{}: data at {off:#x} ({len} bytes) runs past the end of the {file_len}-byte file",
                self.where_(guest, l2_off, i)
            ))),
        }
    }

    /// A compressed cluster descriptor.
    fn compressed(
        &self,
        entry: u64,
        guest: u64,
        len: u64,
        l2_off: u64,
        i: usize,
    ) -> Result<Extent, SourceError> {
        let cb = self.src.header.cluster_bits;
        let csize_shift = 62 - (cb - 8);
        let offset_mask = (1u64 << csize_shift) - 1;
        let csize_mask = (1u64 << (cb - 8)) - 1;
        let off = entry & offset_mask;
        let sectors = ((entry >> csize_shift) & csize_mask) + 1;
        let clen = sectors * 512 - (off & 511);
        let file_len = self.src.reader.len();
        // The last sector may reach past the end of the file by less than a sector.
        let limit = file_len.next_multiple_of(512);
        if off >= file_len || off + clen > limit {
            return Err(corrupt(format!(
                "{}: compressed cluster at {off:#x} ({clen} bytes) runs past the end of the {file_len}-byte file",
                self.where_(guest, l2_off, i)
            )));
        }
        Ok(Extent {
            guest_offset: guest,
            len,
            kind: ExtentKind::Data {
                host_offset: off,
                compressed_len: Some(clen),
            },
        })
    }

    fn standard_entry(
        &mut self,
        entry: u64,
        guest: u64,
        len: u64,
        l2_off: u64,
        i: usize,
    ) -> Result<(), SourceError> {
        let cs = self.src.header.cluster_size();
        if entry & L2E_COMPRESSED != 0 {
            let e = self.compressed(entry, guest, len, l2_off, i)?;
            self.queue.push_back(e);
            return Ok(());
        }
        if entry & L2E_ZERO != 0 {
            if self.src.header.version < 3 {
                return Err(corrupt(format!(
                    "{}: zero flag in a version 2 image",
                    self.where_(guest, l2_off, i)
                )));
            }
            self.queue.push_back(Extent {
                guest_offset: guest,
                len,
                kind: ExtentKind::Zero,
            });
            return Ok(());
        }
        let off = entry & L2E_OFFSET_MASK;
        if off == 0 {
            self.queue.push_back(Extent {
                guest_offset: guest,
                len,
                kind: ExtentKind::Zero,
            });
            return Ok(());
        }
        if off % cs != 0 {
            return Err(corrupt(format!(
                "{}: cluster offset {off:#x} is not cluster-aligned",
                self.where_(guest, l2_off, i)
            )));
        }
        self.check_data(off, len, guest, l2_off, i)?;
        self.push_data(guest, off, len);
        Ok(())
    }

    fn extended_entry(
        &mut self,
        entry: u64,
        bitmap: u64,
        guest: u64,
        len: u64,
        l2_off: u64,
        i: usize,
    ) -> Result<(), SourceError> {
        let cs = self.src.header.cluster_size();
        if entry & L2E_COMPRESSED != 0 {
            if bitmap != 0 {
                return Err(corrupt(format!(
                    "{}: compressed cluster with a nonzero subcluster bitmap {bitmap:#x}",
                    self.where_(guest, l2_off, i)
                )));
            }
            let e = self.compressed(entry, guest, len, l2_off, i)?;
            self.queue.push_back(e);
            return Ok(());
        }
        let alloc = bitmap as u32;
        let zero = (bitmap >> 32) as u32;
        if alloc & zero != 0 {
            return Err(corrupt(format!(
                "{}: subclusters {:#x} marked both allocated and zero",
                self.where_(guest, l2_off, i),
                alloc & zero
            )));
        }
        let off = entry & L2E_OFFSET_MASK;
        if off == 0 && alloc != 0 {
            return Err(corrupt(format!(
                "{}: allocated subclusters {alloc:#x} in an unallocated cluster",
                self.where_(guest, l2_off, i)
            )));
        }
        if off % cs != 0 {
            return Err(corrupt(format!(
                "{}: cluster offset {off:#x} is not cluster-aligned",
                self.where_(guest, l2_off, i)
            )));
        }
        let sc = cs / u64::from(SUBCLUSTERS);
        // Split into runs of subclusters that are all data or all zero.
        let mut s = 0u32;
        while s < SUBCLUSTERS {
            let start = u64::from(s) * sc;
            if start >= len {
                break;
            }
            let is_data = alloc & (1 << s) != 0;
            let mut e = s + 1;
            while e < SUBCLUSTERS && (alloc & (1 << e) != 0) == is_data {
                e += 1;
            }
            let run = (u64::from(e) * sc).min(len) - start;
            if is_data {
                self.check_data(off + start, run, guest, l2_off, i)?;
                self.push_data(guest + start, off + start, run);
            } else {
                self.queue.push_back(Extent {
                    guest_offset: guest + start,
                    len: run,
                    kind: ExtentKind::Zero,
                });
            }
            s = e;
        }
        Ok(())
    }
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Merges `next` into `cur` when both are zero, or plain data contiguous in the
/// file and the result stays within [`MAX_DATA_EXTENT`].
fn try_merge(cur: &mut Extent, next: &Extent) -> bool {
    if cur.guest_offset + cur.len != next.guest_offset {
        return false;
    }
    match (cur.kind, next.kind) {
        (ExtentKind::Zero, ExtentKind::Zero) => {
            cur.len += next.len;
            true
        }
        (
            ExtentKind::Data {
                host_offset: a,
                compressed_len: None,
            },
            ExtentKind::Data {
                host_offset: b,
                compressed_len: None,
            },
        ) if a + cur.len == b && cur.len + next.len <= MAX_DATA_EXTENT => {
            cur.len += next.len;
            true
        }
        _ => false,
    }
}

impl Iterator for Walker<'_> {
    type Item = Result<Extent, SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.done {
                return self.pending.take().map(Ok);
            }
            let Some(piece) = self.queue.pop_front() else {
                match self.refill() {
                    Ok(true) => continue,
                    Ok(false) => {
                        self.done = true;
                        continue;
                    }
                    Err(e) => {
                        self.done = true;
                        self.pending = None;
                        return Some(Err(e));
                    }
                }
            };
            match &mut self.pending {
                Some(cur) => {
                    if !try_merge(cur, &piece) {
                        let out = *cur;
                        self.pending = Some(piece);
                        return Some(Ok(out));
                    }
                }
                None => self.pending = Some(piece),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::source::MemReader;
    use proptest::prelude::*;
    use std::io::Write;

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
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
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
}
