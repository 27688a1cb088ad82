//! Validation at open, in time linear in the image's metadata: the L1 table, each
//! distinct L2 table once, and every cluster descriptor checked against the file and
//! against the metadata's own clusters.
//!
//! ```text
//!  header cluster, L1 table, refcount table and blocks ──► Regions (sorted, disjoint)
//!  L1 entries ──► each L2 table: aligned, in the file, clear of the regions, named by
//!                 one L1 entry only ──► Regions += L2 tables
//!  each L2 table, read once ──► every entry decoded (entry::decode); data and
//!                 compressed clusters in the file and clear of the regions
//! ```
//!
//! Why "named by one L1 entry only": an L2 table shared by several entries of the
//! active L1 table (or an L1 entry naming the L1 table itself) makes a tiny file map a
//! huge disk, and walking it costs L1 × L2 steps: a 128 KiB image took seconds to
//! open, a 32 MiB L1 table would take days. QEMU never writes such a table (each
//! L2 table of the active L1 has a reference count of one), so it is refused by name.
//! Compressed cluster descriptors pointing into metadata (offset 0 is the header)
//! would otherwise be found only mid-copy, after part of the target was written.

use std::collections::HashMap;

use super::corrupt;
use super::entry::{self, Mapping};
use super::header::Qcow2Header;
use crate::source::{ReadAt, SourceError};

/// L1 entry: bits 9..=55 hold the L2 table offset.
pub(super) const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry reserved bits (1..=8 and 56..=62).
pub(super) const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01fe;
/// Refcount table entry: bits 9..=63 hold a refcount block's offset.
const RTE_OFFSET_MASK: u64 = !0x1ff;
/// Largest refcount table QEMU accepts (8 MiB).
const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;

/// What a metadata region holds, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Header,
    L1Table,
    RefcountTable,
    RefcountBlock,
    L2Table,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Header => "the header cluster",
            Kind::L1Table => "the L1 table",
            Kind::RefcountTable => "the refcount table",
            Kind::RefcountBlock => "a refcount block",
            Kind::L2Table => "an L2 table",
        }
    }
}

/// Byte ranges of the file that hold metadata, sorted and disjoint once sealed.
#[derive(Debug, Default)]
struct Regions {
    /// `(start, end, kind)`, half-open.
    spans: Vec<(u64, u64, Kind)>,
}

impl Regions {
    fn add(&mut self, start: u64, end: u64, kind: Kind) {
        self.spans.push((start, end, kind));
    }

    /// Sorts the spans; two that overlap make the image corrupt.
    fn seal(&mut self) -> Result<(), SourceError> {
        self.spans.sort_unstable_by_key(|s| (s.0, s.1));
        for w in self.spans.windows(2) {
            let (a, b) = (w[0], w[1]);
            if b.0 < a.1 {
                return Err(corrupt(format!(
                    "{} at {:#x} overlaps {} at {:#x}",
                    b.2.name(),
                    b.0,
                    a.2.name(),
                    a.0
                )));
            }
        }
        Ok(())
    }

    /// The metadata `[start, start + len)` overlaps, if any (after `seal`).
    fn overlap(&self, start: u64, len: u64) -> Option<(u64, Kind)> {
        let end = start.saturating_add(len);
        // The first span that ends after `start`; spans are disjoint and sorted, so
        // their ends are sorted too.
        let i = self.spans.partition_point(|s| s.1 <= start);
        self.spans
            .get(i)
            .filter(|s| s.0 < end)
            .map(|&(at, _, kind)| (at, kind))
    }
}

/// Reads the active L1 table's used entries and validates the whole map: every L1
/// entry, each distinct L2 table once, every cluster descriptor. Returns the L2 table
/// offsets, one per used L1 entry (0: unallocated).
pub(super) fn validate(reader: &dyn ReadAt, h: &Qcow2Header) -> Result<Vec<u64>, SourceError> {
    let file_len = reader.len();
    let cs = h.cluster_size();
    let mut regions = Regions::default();
    regions.add(0, cs, Kind::Header);
    if h.l1_size > 0 {
        let l1_bytes = u64::from(h.l1_size) * 8;
        regions.add(
            h.l1_table_offset,
            h.l1_table_offset + l1_bytes.next_multiple_of(cs),
            Kind::L1Table,
        );
    }
    refcount_regions(reader, h, &mut regions)?;

    let l1 = read_l1(reader, h)?;
    let mut named_by: HashMap<u64, usize> = HashMap::new();
    for (i, &off) in l1.iter().enumerate() {
        if off == 0 {
            continue;
        }
        let at = h.l1_table_offset + i as u64 * 8;
        if !entry::in_file(off, cs, file_len) {
            return Err(corrupt(format!(
                "L1 entry {i} (file offset {at:#x}): L2 table at {off:#x} runs past the end of the {file_len}-byte file"
            )));
        }
        if let Some(first) = named_by.insert(off, i) {
            return Err(corrupt(format!(
                "L1 entries {first} and {i} both name the L2 table at {off:#x} (an L2 table maps one L1 entry)"
            )));
        }
        regions.add(off, off + cs, Kind::L2Table);
    }
    regions.seal()?;

    let mut table = vec![0u8; cs as usize];
    let width = if h.extended_l2 { 16 } else { 8 };
    let per_l1 = cs * h.l2_entries();
    for (i, &l2_off) in l1.iter().enumerate() {
        if l2_off == 0 {
            continue;
        }
        reader
            .read_exact_at(&mut table, l2_off)
            .map_err(|e| SourceError::read("qcow2 L2 table", l2_off, e))?;
        let l1_base = i as u64 * per_l1;
        // Entries past the virtual size are never used.
        let used = (h.virtual_size - l1_base).div_ceil(cs).min(h.l2_entries()) as usize;
        for (j, raw) in table.chunks_exact(width).take(used).enumerate() {
            let word = u64::from_be_bytes(raw[..8].try_into().unwrap_or_default());
            let bitmap = match raw.get(8..16) {
                Some(b) => u64::from_be_bytes(b.try_into().unwrap_or_default()),
                None => 0,
            };
            let guest = l1_base + j as u64 * cs;
            let place = || {
                format!("L2 entry for guest offset {guest} (L2 table at {l2_off:#x}, index {j})")
            };
            let mapping = entry::decode(h, word, bitmap)
                .map_err(|why| corrupt(format!("{}: {why}", place())))?;
            let left = h.virtual_size - guest;
            let (host, len, what) = match mapping {
                Mapping::Zero | Mapping::Subclusters { alloc: 0, .. } => continue,
                Mapping::Data { host } => (host, cs.min(left), "data"),
                Mapping::Subclusters { host, alloc, .. } => {
                    // Up to the end of the last stored subcluster.
                    let sc = cs / u64::from(entry::SUBCLUSTERS);
                    let stored = u64::from(u32::BITS - alloc.leading_zeros()) * sc;
                    (host, stored.min(left), "data")
                }
                Mapping::Compressed { host, len } => (host, len, "compressed cluster"),
            };
            let inside = match mapping {
                Mapping::Compressed { .. } => entry::compressed_in_file(host, len, file_len),
                _ => entry::in_file(host, len, file_len),
            };
            if !inside {
                return Err(corrupt(format!(
                    "{}: {what} at {host:#x} ({len} bytes) runs past the end of the {file_len}-byte file",
                    place()
                )));
            }
            if let Some((at, kind)) = regions.overlap(host, len) {
                return Err(corrupt(format!(
                    "{}: {what} at {host:#x} ({len} bytes) overlaps {} at {at:#x}",
                    place(),
                    kind.name()
                )));
            }
        }
    }
    Ok(l1)
}

/// The used entries of the active L1 table, each checked for reserved bits and
/// alignment.
fn read_l1(reader: &dyn ReadAt, h: &Qcow2Header) -> Result<Vec<u64>, SourceError> {
    let cs = h.cluster_size();
    // Only the entries that map the virtual size are used; the rest are ignored.
    let used = h.virtual_size.div_ceil(cs * h.l2_entries()) as usize;
    let mut raw = vec![0u8; used * 8];
    reader
        .read_exact_at(&mut raw, h.l1_table_offset)
        .map_err(|e| SourceError::read("qcow2 L1 table", h.l1_table_offset, e))?;
    let mut l1 = Vec::with_capacity(used);
    for (i, b) in raw.chunks_exact(8).enumerate() {
        let entry = u64::from_be_bytes(b.try_into().unwrap_or_default());
        let at = h.l1_table_offset + i as u64 * 8;
        if entry & L1E_RESERVED_MASK != 0 {
            return Err(corrupt(format!(
                "L1 entry {i} (file offset {at:#x}) has reserved bits set: {entry:#x}"
            )));
        }
        let off = entry & L1E_OFFSET_MASK;
        if off % cs != 0 {
            return Err(corrupt(format!(
                "L1 entry {i} (file offset {at:#x}): L2 table offset {off:#x} is not cluster-aligned"
            )));
        }
        l1.push(off);
    }
    Ok(l1)
}

/// Adds the refcount table and the refcount blocks it names to `regions`. The table
/// itself must lie in the file (QEMU refuses to open the image otherwise); refcount
/// blocks outside the file are not metadata anything reads here, and are left out.
fn refcount_regions(
    reader: &dyn ReadAt,
    h: &Qcow2Header,
    regions: &mut Regions,
) -> Result<(), SourceError> {
    let (off, clusters) = (h.refcount_table_offset, h.refcount_table_clusters);
    if off == 0 || clusters == 0 {
        return Ok(());
    }
    let cs = h.cluster_size();
    let file_len = reader.len();
    let bytes = u64::from(clusters) * cs;
    if bytes > MAX_REFCOUNT_TABLE_BYTES {
        return Err(corrupt(format!(
            "refcount table of {clusters} clusters is too large"
        )));
    }
    if off % cs != 0 || !entry::in_file(off, bytes, file_len) {
        return Err(corrupt(format!(
            "refcount table at {off:#x} ({clusters} clusters) is not cluster-aligned inside the {file_len}-byte file"
        )));
    }
    regions.add(off, off + bytes, Kind::RefcountTable);
    let mut raw = vec![0u8; bytes as usize];
    reader
        .read_exact_at(&mut raw, off)
        .map_err(|e| SourceError::read("qcow2 refcount table", off, e))?;
    for b in raw.chunks_exact(8) {
        let block = u64::from_be_bytes(b.try_into().unwrap_or_default()) & RTE_OFFSET_MASK;
        if block != 0 && block % cs == 0 && entry::in_file(block, cs, file_len) {
            regions.add(block, block + cs, Kind::RefcountBlock);
        }
    }
    Ok(())
}
