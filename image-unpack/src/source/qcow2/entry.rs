//! One L2 entry decoded: what a guest cluster maps to. Shared by the validation at open
//! ([`super::metadata`]) and the lazy walk ([`super::walk`]), so both read entries by
//! the same rules. Positions in the file (inside it, clear of the metadata) are the
//! callers' checks; this module checks what an entry says about itself.

use super::header::Qcow2Header;

/// Standard L2 entry: bits 9..=55 hold the host cluster offset.
pub(super) const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 62: the cluster is compressed.
pub(super) const L2E_COMPRESSED: u64 = 1 << 62;
/// Bit 0: the cluster reads as zeros (version 3).
pub(super) const L2E_ZERO: u64 = 1;
/// Subclusters per cluster with extended L2 entries.
pub(super) const SUBCLUSTERS: u32 = 32;

/// What one guest cluster maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mapping {
    /// Reads as zeros: unallocated, or allocated with the zero flag.
    Zero,
    /// A whole cluster stored at `host` (cluster-aligned).
    Data { host: u64 },
    /// A compressed cluster: `len` bytes from `host`, sector-granular, so the last
    /// sector may reach up to 511 bytes past the end of the file.
    Compressed { host: u64, len: u64 },
    /// Extended L2: the cluster at `host` (0 when none is allocated) split into
    /// [`SUBCLUSTERS`] subclusters, `alloc` of them stored, `zero` of them zero, the
    /// others unallocated (zeros: there is no backing file).
    Subclusters { host: u64, alloc: u32, zero: u32 },
}

/// Decodes the L2 entry `entry` (and, with extended L2 entries, its subcluster
/// `bitmap`). Errors say what is wrong with the entry, for the caller to place.
pub(super) fn decode(h: &Qcow2Header, entry: u64, bitmap: u64) -> Result<Mapping, String> {
    let cs = h.cluster_size();
    if entry & L2E_COMPRESSED != 0 {
        if h.extended_l2 && bitmap != 0 {
            return Err(format!(
                "compressed cluster with a nonzero subcluster bitmap {bitmap:#x}"
            ));
        }
        let (host, len) = compressed_range(h.cluster_bits, entry);
        return Ok(Mapping::Compressed { host, len });
    }
    let host = entry & L2E_OFFSET_MASK;
    if h.extended_l2 {
        let alloc = bitmap as u32;
        let zero = (bitmap >> 32) as u32;
        if alloc & zero != 0 {
            return Err(format!(
                "subclusters {:#x} marked both allocated and zero",
                alloc & zero
            ));
        }
        if host == 0 && alloc != 0 {
            return Err(format!(
                "allocated subclusters {alloc:#x} in an unallocated cluster"
            ));
        }
        if host % cs != 0 {
            return Err(format!("cluster offset {host:#x} is not cluster-aligned"));
        }
        return Ok(Mapping::Subclusters { host, alloc, zero });
    }
    if entry & L2E_ZERO != 0 {
        if h.version < 3 {
            return Err("zero flag in a version 2 image".into());
        }
        return Ok(Mapping::Zero);
    }
    if host == 0 {
        return Ok(Mapping::Zero);
    }
    if host % cs != 0 {
        return Err(format!("cluster offset {host:#x} is not cluster-aligned"));
    }
    Ok(Mapping::Data { host })
}

/// The host offset and stored length of a compressed cluster descriptor.
fn compressed_range(cluster_bits: u32, entry: u64) -> (u64, u64) {
    let csize_shift = 62 - (cluster_bits - 8);
    let offset_mask = (1u64 << csize_shift) - 1;
    let csize_mask = (1u64 << (cluster_bits - 8)) - 1;
    let host = entry & offset_mask;
    let sectors = ((entry >> csize_shift) & csize_mask) + 1;
    (host, sectors * 512 - (host & 511))
}

/// Whether `[host, host + len)` of a compressed cluster lies in a file of `file_len`
/// bytes, its last sector allowed to reach past the end by less than a sector (QEMU
/// does not pad the last compressed cluster).
pub(super) fn compressed_in_file(host: u64, len: u64, file_len: u64) -> bool {
    let limit = file_len.next_multiple_of(512);
    host < file_len && host.checked_add(len).is_some_and(|end| end <= limit)
}

/// Whether `[host, host + len)` lies in a file of `file_len` bytes.
pub(super) fn in_file(host: u64, len: u64, file_len: u64) -> bool {
    host.checked_add(len).is_some_and(|end| end <= file_len)
}
