//! Planning a repair: from a [`Scan`] and the [`RepairOptions`] to the
//! [`RepairAction`]s, the warnings, and the ordered list of
//! [`PlannedWrite`]s that carry them out.
//!
//! Pure: the device has already been read into the [`Scan`] and nothing
//! here touches it. Every refusal is raised here, so a refused repair has
//! written nothing.
//!
//! ```text
//!  plan ─► left alone (MBR-only / no table)
//!       ─► refuse: nothing trusted, contradictions (force overrides),  checks.rs
//!          entry array or partitions that do not fit                   layout.rs, checks.rs
//!       ─► entries (grow the last partition) ─► GPT headers            gpt.rs
//!          (backup, primary) ─► protective MBR                         mbr.rs
//!          ─► wipes (foreign GPT, stale backup)                        wipes.rs
//! ```

use crate::partition::inspect::{partition_reports, Scan, TableKind, TableReport};
use crate::partition::Error;

use super::{RepairAction, RepairOptions, RepairOutcome};

mod checks;
mod gpt;
mod layout;
mod mbr;
mod wipes;

use layout::Layout;

/// What a [`PlannedWrite`] puts on the device. The variants are declared
/// in the order the writes are planned and applied: backup first, then
/// primary, then MBR, then wipes, so an interrupted repair leaves at least
/// one consistent copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum WriteKind {
    /// The backup entry array, at the device end.
    BackupEntries,
    /// The backup header, at the last LBA.
    BackupHeader,
    /// The primary entry array.
    PrimaryEntries,
    /// The primary header, at LBA 1.
    PrimaryHeader,
    /// LBA 0.
    ProtectiveMbr,
    /// Zeroes over a foreign-sector-size GPT header or a stale backup header.
    Wipe,
}

/// A byte range to write.
#[derive(Clone, Debug)]
pub(super) struct PlannedWrite {
    /// What is written.
    pub kind: WriteKind,
    /// Byte offset on the device.
    pub offset: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
}

impl PlannedWrite {
    /// The half-open byte range written.
    fn range(&self) -> (u64, u64) {
        (self.offset, self.offset + self.bytes.len() as u64)
    }
}

/// Everything a repair will do, decided before anything is written.
#[derive(Debug)]
pub(super) struct Plan {
    /// [`RepairOutcome::Repaired`] exactly when there is something to do.
    pub outcome: RepairOutcome,
    /// The actions, in the order reported.
    pub actions: Vec<RepairAction>,
    /// What the repair cannot fix or proceeds past with `force`.
    pub warnings: Vec<String>,
    /// The writes, in [`WriteKind`] order.
    pub writes: Vec<PlannedWrite>,
}

/// A partition's 1-based index and half-open byte range.
type PartitionBytes = (u32, (u64, u64));

/// Plans the repair of `scan`, whose report is `before`; see the module doc.
pub(super) fn plan(scan: &Scan, before: &TableReport, opts: &RepairOptions) -> Result<Plan, Error> {
    let sector_size = scan.sector_size;
    let mut plan = Plan {
        outcome: RepairOutcome::AlreadyClean,
        actions: Vec::new(),
        warnings: Vec::new(),
        writes: Vec::new(),
    };
    let kind = scan.kind();
    if matches!(kind, TableKind::Mbr | TableKind::None) {
        plan.outcome = RepairOutcome::LeftAlone;
        plan.warnings.push(format!(
            "{} table: left as it is",
            if kind == TableKind::Mbr {
                "MBR-only"
            } else {
                "no partition"
            }
        ));
        return Ok(plan);
    }
    let Some((copy, src)) = scan.trusted() else {
        let detail = before
            .problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        return Err(Error::NothingToRestore {
            sector_size,
            detail,
        });
    };
    checks::check_contradictions(scan, opts, &mut plan.warnings)?;
    let layout = Layout::new(scan, copy, src)?;

    // Partitions: all inside the new usable range, whatever `force` says.
    let parts = partition_reports(src, sector_size);
    checks::check_partitions(scan, &parts, &layout, opts, &mut plan.warnings)?;

    // The plan.
    let entries = gpt::plan_entries(src, &parts, &layout, opts, &mut plan)?;
    let final_parts = gpt::partition_byte_ranges(src, &entries, sector_size)?;
    gpt::plan_gpt(scan, copy, src, &layout, &entries, &mut plan)?;
    mbr::plan_protective_mbr(scan, src, &layout, &mut plan)?;
    wipes::plan_wipes(scan, copy, &layout, &final_parts, &mut plan)?;

    if !(plan.writes.is_empty() && plan.actions.is_empty()) {
        plan.outcome = RepairOutcome::Repaired;
    }
    Ok(plan)
}
