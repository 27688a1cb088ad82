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

#[cfg(test)]
mod tests {
    //! The plan on byte buffers: what it decides to write, in which order, and that it
    //! reads nothing but the scan.
    use std::io::Cursor;

    use super::*;
    use crate::partition::testutil::image_on_device;

    const MIB: u64 = 1 << 20;

    fn plan_of(buf: &[u8], ss: u32, opts: &RepairOptions) -> Result<Plan, Error> {
        let mut dev = Cursor::new(buf.to_vec());
        let scan = Scan::read(&mut dev, ss, buf.len() as u64, opts.image_size, true).unwrap();
        let before = scan.report();
        let plan = plan(&scan, &before, opts);
        assert!(dev.get_ref() == buf, "planning wrote to the device");
        plan
    }

    #[test]
    fn a_grown_device_gets_backup_entries_then_backup_header_at_the_true_end() {
        for ss in [512u32, 4096] {
            let (image, dev) = (32 * MIB, 96 * MIB);
            let buf = image_on_device(ss, image, dev);
            let p = plan_of(&buf, ss, &RepairOptions::default()).unwrap();
            assert_eq!(p.outcome, RepairOutcome::Repaired);
            let kinds: Vec<WriteKind> = p.writes.iter().map(|w| w.kind).collect();
            assert!(kinds.windows(2).all(|k| k[0] <= k[1]), "{kinds:?}");
            let ss64 = u64::from(ss);
            let last_lba = dev / ss64 - 1;
            let backup = p
                .writes
                .iter()
                .find(|w| w.kind == WriteKind::BackupHeader)
                .expect("a backup header write");
            assert_eq!(backup.offset, last_lba * ss64, "sector size {ss}");
            assert_eq!(backup.bytes.len() as u64, ss64);
            assert_eq!(&backup.bytes[..8], b"EFI PART");
            let entries = p
                .writes
                .iter()
                .find(|w| w.kind == WriteKind::BackupEntries)
                .expect("backup entries");
            assert_eq!(entries.offset + entries.bytes.len() as u64, backup.offset);
            assert!(p.actions.iter().any(|a| matches!(
                a,
                RepairAction::RelocateBackup { to_lba, .. } if *to_lba == last_lba
            )));
            // The primary header follows the backup (an interrupted repair keeps one
            // consistent copy), and points at the new backup.
            let primary = p
                .writes
                .iter()
                .find(|w| w.kind == WriteKind::PrimaryHeader)
                .expect("a primary header write");
            assert_eq!(primary.offset, ss64);
            let alternate = u64::from_le_bytes(primary.bytes[32..40].try_into().unwrap());
            assert_eq!(alternate, last_lba);
        }
    }

    #[test]
    fn a_table_already_at_the_end_plans_nothing() {
        let buf = image_on_device(512, 32 * MIB, 32 * MIB);
        let p = plan_of(&buf, 512, &RepairOptions::default()).unwrap();
        assert_eq!(p.outcome, RepairOutcome::AlreadyClean);
        assert!(
            p.writes.is_empty() && p.actions.is_empty(),
            "{:?}",
            p.actions
        );
    }

    #[test]
    fn nothing_trusted_is_refused_before_any_write_is_planned() {
        let mut buf = image_on_device(512, 32 * MIB, 96 * MIB);
        // Both headers' signatures gone; the protective MBR still says GPT.
        buf[512..520].fill(0);
        let backup = (32 * MIB - 512) as usize;
        buf[backup..backup + 8].fill(0);
        let e = plan_of(&buf, 512, &RepairOptions::default()).unwrap_err();
        assert!(matches!(e, Error::NothingToRestore { .. }), "{e}");
    }

    #[test]
    fn growing_the_last_partition_ends_it_at_the_new_last_usable_lba() {
        let (image, dev) = (32 * MIB, 96 * MIB);
        let buf = image_on_device(512, image, dev);
        let opts = RepairOptions {
            grow_last_partition: true,
            ..RepairOptions::default()
        };
        let p = plan_of(&buf, 512, &opts).unwrap();
        let grown = p.actions.iter().find_map(|a| match a {
            RepairAction::GrowLastPartition { to_last_lba, .. } => Some(*to_last_lba),
            _ => None,
        });
        // 32 entry sectors and the header before the end.
        assert_eq!(grown, Some(dev / 512 - 34));
    }

    #[test]
    fn a_protective_entry_not_at_lba_1_is_reported_and_moved_not_resized() {
        let mut buf = image_on_device(512, 32 * MIB, 32 * MIB);
        // The 0xEE entry is the first at 446; its starting LBA at +8.
        buf[446 + 8..446 + 12].copy_from_slice(&2u32.to_le_bytes());
        let mut dev = Cursor::new(buf.clone());
        let scan = Scan::read(&mut dev, 512, buf.len() as u64, None, true).unwrap();
        let before = scan.report();
        assert!(
            before
                .problems
                .iter()
                .any(|p| matches!(p, crate::partition::Problem::PmbrStartWrong { found: 2 })),
            "{:?}",
            before.problems
        );
        let p = plan_of(&buf, 512, &RepairOptions::default()).unwrap();
        assert_eq!(p.actions, [RepairAction::FixProtectiveMbrStart { from: 2 }]);
        let mbr = &p
            .writes
            .iter()
            .find(|w| w.kind == WriteKind::ProtectiveMbr)
            .unwrap()
            .bytes;
        assert_eq!(&mbr[446 + 8..446 + 12], &1u32.to_le_bytes());
    }
}
