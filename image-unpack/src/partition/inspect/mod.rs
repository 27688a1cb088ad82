//! Reading a partition table at a given sector size, never writing.
//!
//! | file          | holds                                                        |
//! |---------------|--------------------------------------------------------------|
//! | `report.rs`   | the serialisable [`TableReport`] and [`Problem`] types        |
//! | `read.rs`     | low-level reads: one GPT header, the MBR kind, backup search  |
//! | `scan.rs`     | [`Scan`]: the raw state of a device that repair works from    |
//! | `diagnose.rs` | turning a [`Scan`] into problems and a [`TableReport`]        |
//! | `detect.rs`   | [`detect_table_sector_size`]                                  |
//!
//! [`inspect`] is the entry point: `Scan::read` then `Scan::report`.

use std::io::{Read, Seek};

use super::Error;

mod detect;
mod diagnose;
mod read;
mod report;
mod scan;

pub use detect::{detect_table_sector_size, DetectedLayout, Detection, GptEvidence};
pub(crate) use diagnose::{disagreements, partition_problems, partition_reports};
pub(crate) use read::{pmbr_expected_size, HeaderRead};
pub use report::{
    HeaderCopy, HeaderReport, MbrEntryReport, MbrKind, PartitionReport, Problem, TableKind,
    TableReport,
};
pub(crate) use scan::Scan;

/// Inspects the partition table of `dev` (of `dev_size` bytes) read at
/// `sector_size`. Never writes.
pub fn inspect<D: Read + Seek>(
    dev: &mut D,
    sector_size: u32,
    dev_size: u64,
) -> Result<TableReport, Error> {
    Ok(Scan::read(dev, sector_size, dev_size, None, true)?.report())
}
