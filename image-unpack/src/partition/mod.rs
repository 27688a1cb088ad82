//! Partition tables (GPT, MBR) at any sector size: inspect, repair, verify.
//!
//! ```text
//!  detect_table_sector_size(dev)      which sector size the table was built for
//!            │ 512 / 4096 / Mbr / None / Both (the sgdisk -e accident)
//!            ▼
//!  inspect(dev, ss, size) ──► TableReport   (never writes)
//!  repair(dev, ss, size, opts) ──► RepairReport
//!            │ plan in memory ─► refuse (nothing written) or
//!            │ write backup ─► primary ─► MBR ─► wipes ─► flush ─► re-read
//!            ▼
//!  verify::verify(path, ss) ──► VerifyReport (headers, CRCs, libblkid probe)
//! ```
//!
//! Everything is generic over `Read + Seek` / `Read + Write + Seek` and
//! takes the sector size and the device size as parameters, so the same
//! code runs on a block device, a loop bridge or a `Cursor<Vec<u8>>`.

mod inspect;
mod ondisk;
mod repair;

pub use inspect::{
    detect_table_sector_size, inspect, DetectedLayout, Detection, GptEvidence, HeaderCopy,
    HeaderReport, MbrEntryReport, MbrKind, PartitionReport, Problem, TableKind, TableReport,
};
pub use repair::{repair, RepairAction, RepairOptions, RepairOutcome, RepairReport};

/// Errors of partition inspection and repair. Every variant that refuses a
/// repair is raised before anything is written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Sector size not a power of two in 512..=65536.
    #[error("invalid sector size {0}: must be a power of two from 512 to 65536")]
    InvalidSectorSize(u32),
    /// Device too small to hold a table.
    #[error("device of {dev_size} bytes is too small for a partition table at {sector_size}-byte sectors")]
    DeviceTooSmall { dev_size: u64, sector_size: u32 },
    /// Reading failed.
    #[error("reading {len} bytes at offset {offset}")]
    Read {
        offset: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    /// Writing failed (the repair may be partial; re-run it).
    #[error("writing {len} bytes at offset {offset}")]
    Write {
        offset: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    /// Flushing failed.
    #[error("flushing the device")]
    Flush(#[source] std::io::Error),
    /// An LBA or offset computation overflowed (corrupt table).
    #[error("LBA or offset arithmetic overflowed: the table is corrupt")]
    Overflow,
    /// The table is unrecognised or contradicts itself.
    #[error("unrecognised or contradictory partition table at {sector_size}-byte sectors: {reason}; nothing written (force overrides)")]
    Unrecognised { sector_size: u32, reason: String },
    /// No trustworthy GPT copy survives.
    #[error(
        "no valid GPT header survives at {sector_size}-byte sectors ({detail}); nothing written"
    )]
    NothingToRestore { sector_size: u32, detail: String },
    /// A partition lies outside what the table may cover on this device.
    #[error("partition {index} ({first_lba}..={last_lba}) lies outside the usable range {first_usable}..={last_usable} of a {dev_size}-byte device; nothing written")]
    PartitionOutsideTable {
        index: u32,
        first_lba: u64,
        last_lba: u64,
        first_usable: u64,
        last_usable: u64,
        dev_size: u64,
    },
}

impl Error {
    /// The repair was refused before writing anything.
    pub fn wrote_nothing(&self) -> bool {
        !matches!(self, Error::Write { .. } | Error::Flush(_))
    }

    /// `force` would let the repair proceed.
    pub fn is_forceable(&self) -> bool {
        matches!(self, Error::Unrecognised { .. })
    }
}

#[cfg(test)]
mod testutil;

#[cfg(test)]
mod tests;
