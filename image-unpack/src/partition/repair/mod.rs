//! Repairing a GPT in place: backup relocation after growth, protective MBR
//! size, restoring one header from the other, and recovery from the
//! `sgdisk -e`-on-4K accident (docs/sgdisk-e-accident.md).
//!
//! Every decision is made on an in-memory plan first; nothing is written
//! when the plan cannot be made, and nothing at all on `dry_run`. Writes go
//! backup first, then primary, then MBR, then wipes, so an interrupted
//! repair leaves at least one consistent copy.
//!
//! ```text
//!  repair ─► Scan::read ─► plan::plan (pure: actions, warnings, writes; or refuse)
//!         ─► dry run / nothing to do: stop
//!         ─► apply::apply (the writes in order, flush) ─► re-read (`after`)
//! ```
//!
//! | file        | holds                                                      |
//! |-------------|------------------------------------------------------------|
//! | `mod.rs`    | [`RepairOptions`] and the entry point [`repair`]            |
//! | `report.rs` | [`RepairAction`], [`RepairOutcome`], [`RepairReport`]       |
//! | `plan/`     | deciding what to write, and every refusal (pure; tested on byte buffers) |
//! | `apply.rs`  | performing the planned writes                              |

use std::io::{Read, Seek, Write};

use super::inspect::Scan;
use super::Error;

mod apply;
mod plan;
mod report;

pub use report::{RepairAction, RepairOutcome, RepairReport};

/// How [`repair`] may act.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepairOptions {
    /// Compute the actions but write nothing.
    pub dry_run: bool,
    /// Proceed past contradictions (the primary wins). Never overrides a
    /// refusal that would overwrite partition data.
    pub force: bool,
    /// Extend the last partition on disk to the new last usable LBA.
    pub grow_last_partition: bool,
    /// Size of the image that was written onto the device, when known: where
    /// its backup header is looked for first if the primary is lost.
    pub image_size: Option<u64>,
}

/// Repairs the GPT on `dev` read at `sector_size`; see the module doc.
///
/// MBR-only and table-less devices are left alone (`Ok`, nothing written).
/// A table that cannot be trusted, or contradicts itself, is refused with
/// an error and nothing written unless `force`.
pub fn repair<D: Read + Write + Seek>(
    dev: &mut D,
    sector_size: u32,
    dev_size: u64,
    opts: &RepairOptions,
) -> Result<RepairReport, Error> {
    let scan = Scan::read(dev, sector_size, dev_size, opts.image_size, true)?;
    let before = scan.report();
    let plan = plan::plan(&scan, &before, opts)?;
    let mut report = RepairReport {
        sector_size,
        device_size: dev_size,
        dry_run: opts.dry_run,
        outcome: plan.outcome,
        before,
        actions: plan.actions,
        warnings: plan.warnings,
        after: None,
    };
    if report.outcome != RepairOutcome::Repaired || opts.dry_run {
        return Ok(report);
    }
    apply::apply(dev, &plan.writes)?;
    report.after = Some(Scan::read(dev, sector_size, dev_size, None, false)?.report());
    Ok(report)
}
