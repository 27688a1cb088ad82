//! The refusals of a repair plan: a table that contradicts itself
//! (refused unless `force`, which turns them into warnings) and partitions
//! that do not fit the rebuilt table (refused always; overlaps unless
//! `force`).

use crate::partition::inspect::{
    disagreements, partition_problems, MbrKind, PartitionReport, Problem, Scan,
};
use crate::partition::repair::RepairOptions;
use crate::partition::Error;

use super::layout::Layout;

/// A contradiction: an error that writes nothing, or with `force` a warning.
fn refuse(
    opts: &RepairOptions,
    sector_size: u32,
    warnings: &mut Vec<String>,
    reason: String,
) -> Result<(), Error> {
    if opts.force {
        warnings.push(format!("proceeding despite: {reason}"));
        Ok(())
    } else {
        Err(Error::Unrecognised {
            sector_size,
            reason,
        })
    }
}

/// Refuses (unless `force`) a table that contradicts itself: a legacy MBR
/// next to the GPT, primary and backup describing different tables, or a
/// GPT with partitions laid out for the other sector size.
pub(super) fn check_contradictions(
    scan: &Scan,
    opts: &RepairOptions,
    warnings: &mut Vec<String>,
) -> Result<(), Error> {
    let sector_size = scan.sector_size;
    if scan.mbr_kind == MbrKind::Legacy {
        refuse(
            opts,
            sector_size,
            warnings,
            "the MBR has partitions but no 0xEE protective entry".into(),
        )?;
    }
    if let (true, Some(b)) = (scan.primary.is_good(), scan.good_backup()) {
        let d = disagreements(&scan.primary, b);
        if !d.is_empty() {
            refuse(
                opts,
                sector_size,
                warnings,
                format!("primary and backup GPT disagree on {}", d.join(", ")),
            )?;
        }
    }
    if let Some(f) = &scan.foreign {
        if f.partitions > 0 {
            refuse(
                opts,
                sector_size,
                warnings,
                format!(
                    "a GPT for {}-byte sectors with {} partitions is also present",
                    f.sector_size, f.partitions
                ),
            )?;
        }
    }
    Ok(())
}

/// Refuses a partition outside the new usable range (always) and
/// overlapping partitions (unless `force`).
pub(super) fn check_partitions(
    scan: &Scan,
    parts: &[PartitionReport],
    layout: &Layout,
    opts: &RepairOptions,
    warnings: &mut Vec<String>,
) -> Result<(), Error> {
    let (first_usable, new_last_usable) = (layout.first_usable, layout.new_last_usable);
    for p in parts {
        if p.first_lba > p.last_lba || p.first_lba < first_usable || p.last_lba > new_last_usable {
            return Err(Error::PartitionOutsideTable {
                index: p.index,
                first_lba: p.first_lba,
                last_lba: p.last_lba,
                first_usable,
                last_usable: new_last_usable,
                dev_size: scan.dev_size,
            });
        }
    }
    for pr in partition_problems(parts, first_usable, new_last_usable) {
        if let Problem::PartitionsOverlap { a, b } = pr {
            refuse(
                opts,
                scan.sector_size,
                warnings,
                format!("partitions {a} and {b} overlap"),
            )?;
        }
    }
    Ok(())
}
