//! The wipes of a repair plan: a GPT header laid out for the other sector
//! size (the `sgdisk -e` accident's empty table) and the stale backup
//! header left behind by relocation, never inside partition data.

use crate::partition::inspect::{HeaderCopy, Scan};
use crate::partition::ondisk::MBR_SIZE;
use crate::partition::repair::RepairAction;
use crate::partition::Error;

use super::layout::{lba_off, Layout};
use super::{PartitionBytes, Plan, PlannedWrite, WriteKind};

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    // Half-open byte ranges.
    a.0 < b.1 && b.0 < a.1
}

/// Wipes: the foreign (bogus) GPT and a stale backup header. A header
/// inside live partition data is never touched; one inside the region
/// the restored table is written to goes with that write.
pub(super) fn plan_wipes(
    scan: &Scan,
    copy: HeaderCopy,
    layout: &Layout,
    final_parts: &[PartitionBytes],
    plan: &mut Plan,
) -> Result<(), Error> {
    let ss = scan.sector_size;
    let last = layout.last;
    // Regions the new table occupies (bytes, half-open).
    let table_regions = [
        (0, MBR_SIZE as u64),
        (lba_off(1, ss)?, lba_off(2, ss)?),
        (
            lba_off(layout.primary_entries_lba, ss)?,
            lba_off(layout.primary_entries_end, ss)?,
        ),
        (lba_off(layout.backup_entries_lba, ss)?, scan.dev_size),
    ];
    let in_partition = |r: (u64, u64)| final_parts.iter().any(|&(_, p)| overlaps(p, r));
    let covered = |r: (u64, u64)| table_regions.iter().any(|&t| t.0 <= r.0 && r.1 <= t.1);
    let rewritten = |writes: &[PlannedWrite], r: (u64, u64)| {
        writes.iter().any(|w| {
            let (start, end) = w.range();
            start <= r.0 && r.1 <= end
        })
    };

    if let Some(f) = &scan.foreign {
        for off in std::iter::once(f.header_offset).chain(f.backup_offset) {
            let r = (off, off + MBR_SIZE as u64);
            if rewritten(&plan.writes, r) {
                plan.actions.push(RepairAction::WipeForeignGptHeader {
                    sector_size: f.sector_size,
                    offset: off,
                    covered_by_table: true,
                });
            } else if in_partition(r) || covered(r) {
                plan.warnings.push(format!(
                    "{}-byte-sector GPT header at byte {off} lies inside a partition or the \
                     table: left alone",
                    f.sector_size
                ));
            } else {
                plan.actions.push(RepairAction::WipeForeignGptHeader {
                    sector_size: f.sector_size,
                    offset: off,
                    covered_by_table: false,
                });
                plan.writes.push(PlannedWrite {
                    kind: WriteKind::Wipe,
                    offset: off,
                    bytes: vec![0; MBR_SIZE],
                });
            }
        }
        // What the foreign table's own structures overwrote cannot be restored.
        if copy == HeaderCopy::Backup {
            let damaged = (0, f.entries_end_offset);
            for &(index, p) in final_parts {
                if overlaps(p, damaged) {
                    plan.warnings.push(format!(
                        "partition {index} overlaps bytes 0..{} which the {}-byte-sector table \
                         overwrote: data there may be lost",
                        damaged.1, f.sector_size
                    ));
                }
            }
        }
    }
    let old_backup = scan.good_backup().map(|b| b.lba);
    if let Some(old) = old_backup.filter(|&b| b != last) {
        let r = (
            lba_off(old, ss)?,
            lba_off(old.checked_add(1).ok_or(Error::Overflow)?, ss)?,
        );
        if !in_partition(r) && !covered(r) {
            plan.actions
                .push(RepairAction::WipeStaleBackupHeader { lba: old });
            plan.writes.push(PlannedWrite {
                kind: WriteKind::Wipe,
                offset: r.0,
                bytes: vec![0; ss as usize],
            });
        }
    }
    Ok(())
}
