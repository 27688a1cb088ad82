//! The qcow2 header: the stored layouts (big-endian, read with zerocopy), and their
//! validation into a [`Qcow2Header`], with every refusal named (backing files,
//! encryption, external data files, unknown features, impossible geometry).

use zerocopy::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::corrupt;
use crate::source::detect::QCOW2_MAGIC;
use crate::source::{ReadAt, SourceError, SourceFormat};

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

pub(super) const V2_HEADER_LEN: u32 = 72;
pub(super) const V3_HEADER_LEN: u32 = 104;

pub(super) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(super) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(super) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(super) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(super) const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

const EXT_END: u32 = 0;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;

/// Largest L1 table QEMU creates (32 MiB); anything larger is refused.
pub(super) const MAX_L1_BYTES: u64 = 32 << 20;

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
    /// File offset of the refcount table (0: none recorded).
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
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
            refcount_table_offset: v2.refcount_table_offset.get(),
            refcount_table_clusters: v2.refcount_table_clusters.get(),
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
            return Qcow2Header::parse(&small[..n], file_len);
        }
        // The header and its extensions live in the first cluster.
        let first = (1u64 << cluster_bits).min(file_len) as usize;
        let mut head = vec![0u8; first];
        reader
            .read_exact_at(&mut head, 0)
            .map_err(|e| SourceError::read("qcow2 header cluster", 0, e))?;
        Qcow2Header::parse(&head, file_len)
    }
}

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
