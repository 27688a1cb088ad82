//! Repairing a GPT in place: backup relocation after growth, protective MBR
//! size, restoring one header from the other, and recovery from the
//! `sgdisk -e`-on-4K accident (docs/sgdisk-e-accident.md).
//!
//! Every decision is made on an in-memory plan first; nothing is written
//! when the plan cannot be made, and nothing at all on `dry_run`. Writes go
//! backup first, then primary, then MBR, then wipes, so an interrupted
//! repair leaves at least one consistent copy.

use std::io::{Read, Seek, SeekFrom, Write};

use serde::Serialize;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, IntoBytes};

use super::inspect::{
    disagreements, partition_problems, partition_reports, pmbr_expected_size, HeaderCopy,
    HeaderRead, MbrKind, Problem, Scan, TableKind, TableReport,
};
use super::ondisk::{
    header_crc, GptEntry, GPT_ENTRY_SIZE, GPT_HEADER_SIZE, MBR_SIGNATURE, MBR_SIZE,
    MBR_TYPE_GPT_PROTECTIVE,
};
use super::Error;

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

/// One change [`repair`] makes (or would make, on a dry run).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum RepairAction {
    /// The primary was lost; the table is rebuilt from a backup header found
    /// away from the device end (the image's own backup).
    RecoverFromSurvivingBackup { lba: u64 },
    /// Primary header and entries rewritten from the backup.
    RestorePrimaryFromBackup { backup_lba: u64 },
    /// Backup header and entries rewritten from the primary.
    RestoreBackupFromPrimary { to_lba: u64 },
    /// Backup header and entries moved to the device end.
    RelocateBackup {
        from_lba: u64,
        to_lba: u64,
        entries_lba: u64,
    },
    /// The primary's alternate LBA changed.
    SetAlternateLba { from: u64, to: u64 },
    /// Both headers' last usable LBA changed.
    SetLastUsableLba { from: u64, to: u64 },
    /// The last partition extended.
    GrowLastPartition {
        index: u32,
        from_last_lba: u64,
        to_last_lba: u64,
    },
    /// The 0xEE entry's size field corrected.
    FixProtectiveMbrSize { from: u32, to: u32 },
    /// A protective MBR written where LBA 0 had none.
    WriteProtectiveMbr { size: u32 },
    /// A GPT header laid out for another sector size removed.
    WipeForeignGptHeader {
        sector_size: u32,
        offset: u64,
        covered_by_table: bool,
    },
    /// The old backup header, left behind by relocation, removed.
    WipeStaleBackupHeader { lba: u64 },
}

impl std::fmt::Display for RepairAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::RecoverFromSurvivingBackup { lba } => {
                write!(
                    f,
                    "rebuild the GPT from the surviving backup header at LBA {lba}"
                )
            }
            Self::RestorePrimaryFromBackup { backup_lba } => {
                write!(
                    f,
                    "restore the primary GPT from the backup at LBA {backup_lba}"
                )
            }
            Self::RestoreBackupFromPrimary { to_lba } => {
                write!(f, "restore the backup GPT from the primary at LBA {to_lba}")
            }
            Self::RelocateBackup {
                from_lba,
                to_lba,
                entries_lba,
            } => write!(
                f,
                "move the backup GPT from LBA {from_lba} to LBA {to_lba} (entries at {entries_lba})"
            ),
            Self::SetAlternateLba { from, to } => {
                write!(f, "set the primary's alternate LBA {from} -> {to}")
            }
            Self::SetLastUsableLba { from, to } => {
                write!(f, "set the last usable LBA {from} -> {to}")
            }
            Self::GrowLastPartition {
                index,
                from_last_lba,
                to_last_lba,
            } => write!(
                f,
                "grow partition {index}: last LBA {from_last_lba} -> {to_last_lba}"
            ),
            Self::FixProtectiveMbrSize { from, to } => {
                write!(f, "set the protective MBR size {from} -> {to} sectors")
            }
            Self::WriteProtectiveMbr { size } => {
                write!(f, "write a protective MBR covering {size} sectors")
            }
            Self::WipeForeignGptHeader {
                sector_size,
                offset,
                covered_by_table,
            } => {
                write!(
                    f,
                    "remove the {sector_size}-byte-sector GPT header at byte {offset}"
                )?;
                if *covered_by_table {
                    write!(f, " (overwritten by the restored table)")?;
                }
                Ok(())
            }
            Self::WipeStaleBackupHeader { lba } => {
                write!(f, "wipe the stale backup GPT header at LBA {lba}")
            }
        }
    }
}

/// What [`repair`] concluded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RepairOutcome {
    /// Changes were made (or would be, on a dry run).
    Repaired,
    /// The table needed nothing.
    AlreadyClean,
    /// An MBR-only or table-less device: nothing to do, nothing written.
    LeftAlone,
}

/// The result of [`repair`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RepairReport {
    /// Sector size worked at.
    pub sector_size: u32,
    /// Device size in bytes.
    pub device_size: u64,
    /// Nothing was written.
    pub dry_run: bool,
    /// What happened.
    pub outcome: RepairOutcome,
    /// The table as found.
    pub before: TableReport,
    /// Actions taken (or planned, on a dry run), in order.
    pub actions: Vec<RepairAction>,
    /// Things the repair could not fix, or proceeded past with `force`.
    pub warnings: Vec<String>,
    /// The table re-read after writing (None on a dry run or when nothing changed).
    pub after: Option<TableReport>,
}

/// A byte range to write.
struct Write_ {
    offset: u64,
    bytes: Vec<u8>,
}

fn lba_off(lba: u64, ss: u32) -> Result<u64, Error> {
    lba.checked_mul(u64::from(ss)).ok_or(Error::Overflow)
}

/// Serialises `hdr` into a header sector based on `template` and fixes its CRC.
fn header_sector(template: &[u8], hdr: &mut super::ondisk::GptHeader) -> Result<Vec<u8>, Error> {
    let mut raw = template.to_vec();
    hdr.header_crc32 = U32::new(0);
    raw[..GPT_HEADER_SIZE].copy_from_slice(hdr.as_bytes());
    let hs = hdr.header_size.get() as usize;
    let crc = header_crc(&raw, hs).ok_or(Error::Overflow)?;
    hdr.header_crc32 = U32::new(crc);
    raw[..GPT_HEADER_SIZE].copy_from_slice(hdr.as_bytes());
    Ok(raw)
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    // Half-open byte ranges.
    a.0 < b.1 && b.0 < a.1
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
    let mut report = RepairReport {
        sector_size,
        device_size: dev_size,
        dry_run: opts.dry_run,
        outcome: RepairOutcome::AlreadyClean,
        before: before.clone(),
        actions: Vec::new(),
        warnings: Vec::new(),
        after: None,
    };
    let kind = scan.kind();
    if matches!(kind, TableKind::Mbr | TableKind::None) {
        report.outcome = RepairOutcome::LeftAlone;
        report.warnings.push(format!(
            "{} table: left as it is",
            if kind == TableKind::Mbr {
                "MBR-only"
            } else {
                "no partition"
            }
        ));
        return Ok(report);
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
    let refuse = |report: &mut RepairReport, reason: String| -> Result<(), Error> {
        if opts.force {
            report
                .warnings
                .push(format!("proceeding despite: {reason}"));
            Ok(())
        } else {
            Err(Error::Unrecognised {
                sector_size,
                reason,
            })
        }
    };
    if scan.mbr_kind == MbrKind::Legacy {
        refuse(
            &mut report,
            "the MBR has partitions but no 0xEE protective entry".into(),
        )?;
    }
    if let (true, Some(b)) = (scan.primary.is_good(), scan.good_backup()) {
        let d = disagreements(&scan.primary, b);
        if !d.is_empty() {
            refuse(
                &mut report,
                format!("primary and backup GPT disagree on {}", d.join(", ")),
            )?;
        }
    }
    if let Some(f) = &scan.foreign {
        if f.partitions > 0 {
            refuse(
                &mut report,
                format!(
                    "a GPT for {}-byte sectors with {} partitions is also present",
                    f.sector_size, f.partitions
                ),
            )?;
        }
    }

    let ss = sector_size;
    let last = scan.last_lba();
    let entries_sectors = src.hdr.entry_array_sectors(ss).ok_or(Error::Overflow)?;
    let backup_entries_lba = last.checked_sub(entries_sectors).ok_or(Error::Overflow)?;
    let new_last_usable = backup_entries_lba.checked_sub(1).ok_or(Error::Overflow)?;
    let first_usable = src.hdr.first_usable_lba.get();
    let primary_entries_lba = if copy == HeaderCopy::Primary {
        src.hdr.partition_entry_lba.get()
    } else {
        2
    };
    let primary_entries_end = primary_entries_lba
        .checked_add(entries_sectors)
        .ok_or(Error::Overflow)?;
    if primary_entries_end > first_usable || first_usable > new_last_usable {
        return Err(Error::Unrecognised {
            sector_size,
            reason: format!(
                "entry array at LBA {primary_entries_lba} ({entries_sectors} sectors) does not \
                 fit before first usable LBA {first_usable} on a device ending at LBA {last}"
            ),
        });
    }

    // Partitions: all inside the new usable range, whatever `force` says.
    let parts = partition_reports(src, ss);
    for p in &parts {
        if p.first_lba > p.last_lba || p.first_lba < first_usable || p.last_lba > new_last_usable {
            return Err(Error::PartitionOutsideTable {
                index: p.index,
                first_lba: p.first_lba,
                last_lba: p.last_lba,
                first_usable,
                last_usable: new_last_usable,
                dev_size,
            });
        }
    }
    for pr in partition_problems(&parts, first_usable, new_last_usable) {
        if let Problem::PartitionsOverlap { a, b } = pr {
            refuse(&mut report, format!("partitions {a} and {b} overlap"))?;
        }
    }

    // The plan.
    let mut entries = src.entries.clone().ok_or(Error::Overflow)?;
    let es = src.hdr.partition_entry_size.get() as usize;
    if opts.grow_last_partition {
        if let Some(lastp) = parts.iter().max_by_key(|p| p.last_lba) {
            let is_last = parts
                .iter()
                .all(|p| p.index == lastp.index || p.first_lba < lastp.first_lba);
            if !is_last {
                report.warnings.push(format!(
                    "partition {} is not the last on disk: not grown",
                    lastp.index
                ));
            } else if lastp.last_lba < new_last_usable {
                let at = (lastp.index as usize - 1) * es;
                let slot = entries
                    .get_mut(at..at + GPT_ENTRY_SIZE)
                    .ok_or(Error::Overflow)?;
                let mut e = GptEntry::read_from_bytes(slot).map_err(|_| Error::Overflow)?;
                e.ending_lba = U64::new(new_last_usable);
                slot.copy_from_slice(e.as_bytes());
                report.actions.push(RepairAction::GrowLastPartition {
                    index: lastp.index,
                    from_last_lba: lastp.last_lba,
                    to_last_lba: new_last_usable,
                });
            }
        }
    }
    let final_parts: Vec<(u32, (u64, u64))> = {
        let mut h = src.clone();
        h.entries = Some(entries.clone());
        partition_reports(&h, ss)
            .iter()
            .map(|p| {
                Ok((
                    p.index,
                    (
                        lba_off(p.first_lba, ss)?,
                        lba_off(p.last_lba.checked_add(1).ok_or(Error::Overflow)?, ss)?,
                    ),
                ))
            })
            .collect::<Result<_, Error>>()?
    };
    let entries_crc = crc32fast::hash(&entries);
    let mut ph = src.hdr.clone();
    ph.my_lba = U64::new(1);
    ph.alternate_lba = U64::new(last);
    ph.last_usable_lba = U64::new(new_last_usable);
    ph.partition_entry_lba = U64::new(primary_entries_lba);
    ph.partition_entry_array_crc32 = U32::new(entries_crc);
    let mut bh = ph.clone();
    bh.my_lba = U64::new(last);
    bh.alternate_lba = U64::new(1);
    bh.partition_entry_lba = U64::new(backup_entries_lba);
    let praw = header_sector(&src.raw, &mut ph)?;
    let braw = header_sector(&src.raw, &mut bh)?;

    let same = |h: Option<&HeaderRead>, raw: &[u8]| {
        h.is_some_and(|h| h.is_good() && h.raw == raw && h.entries.as_deref() == Some(&entries[..]))
    };
    let primary_ok = same(Some(&scan.primary), &praw);
    let backup_ok = same(scan.backup.as_ref().filter(|b| b.lba == last), &braw);

    let old_backup = scan.good_backup().map(|b| b.lba);
    let mut head = Vec::new();
    if copy == HeaderCopy::Backup {
        let lba = old_backup.unwrap_or(last);
        head.push(
            if lba != last && scan.primary.hdr.signature != *b"EFI PART" {
                RepairAction::RecoverFromSurvivingBackup { lba }
            } else {
                RepairAction::RestorePrimaryFromBackup { backup_lba: lba }
            },
        );
    }
    match old_backup {
        Some(from) if from != last => head.push(RepairAction::RelocateBackup {
            from_lba: from,
            to_lba: last,
            entries_lba: backup_entries_lba,
        }),
        None => head.push(RepairAction::RestoreBackupFromPrimary { to_lba: last }),
        _ => {}
    }
    if copy == HeaderCopy::Primary && src.hdr.alternate_lba.get() != last {
        head.push(RepairAction::SetAlternateLba {
            from: src.hdr.alternate_lba.get(),
            to: last,
        });
    }
    if src.hdr.last_usable_lba.get() != new_last_usable {
        head.push(RepairAction::SetLastUsableLba {
            from: src.hdr.last_usable_lba.get(),
            to: new_last_usable,
        });
    }
    // The per-header actions above explain the writes; any residual
    // difference (e.g. a stale backup entry CRC) is still written.
    head.append(&mut report.actions);
    report.actions = head;

    let mut writes = Vec::new();
    if !backup_ok {
        writes.push(Write_ {
            offset: lba_off(backup_entries_lba, ss)?,
            bytes: entries.clone(),
        });
        writes.push(Write_ {
            offset: lba_off(last, ss)?,
            bytes: braw,
        });
    }
    if !primary_ok {
        writes.push(Write_ {
            offset: lba_off(primary_entries_lba, ss)?,
            bytes: entries.clone(),
        });
        writes.push(Write_ {
            offset: lba_off(1, ss)?,
            bytes: praw,
        });
    }
    if (!backup_ok || !primary_ok) && report.actions.is_empty() {
        report.actions.push(if primary_ok {
            RepairAction::RestoreBackupFromPrimary { to_lba: last }
        } else {
            RepairAction::RestorePrimaryFromBackup { backup_lba: last }
        });
    }

    // Protective MBR.
    let mut mbr = scan.mbr.clone();
    let expected = pmbr_expected_size(scan.dev_sectors);
    let mut mbr_changed = false;
    match scan.mbr_kind {
        MbrKind::Protective => {
            let i = scan.ee_entry().ok_or(Error::Overflow)?;
            let e = &mut mbr.partitions[i];
            if e.size_in_lba.get() != expected || e.starting_lba.get() != 1 {
                report.actions.push(RepairAction::FixProtectiveMbrSize {
                    from: e.size_in_lba.get(),
                    to: expected,
                });
                e.starting_lba = U32::new(1);
                e.size_in_lba = U32::new(expected);
                mbr_changed = true;
            }
        }
        MbrKind::Hybrid => {
            // Only an 0xEE entry that ran to the image's old end follows the
            // device end; the hybrid entries stay exactly as they are.
            let i = scan.ee_entry().ok_or(Error::Overflow)?;
            let e = &mut mbr.partitions[i];
            let start = u64::from(e.starting_lba.get());
            let size = e.size_in_lba.get();
            let old_last = src.hdr.alternate_lba.get().max(src.lba);
            let end = start + u64::from(size);
            let dev_end = last.checked_add(1).ok_or(Error::Overflow)?;
            let want = u32::try_from(dev_end.saturating_sub(start)).unwrap_or(u32::MAX);
            let ran_to_old_end = old_last.checked_add(1) == Some(end);
            if (size == u32::MAX || ran_to_old_end || end > dev_end) && size != want {
                report.actions.push(RepairAction::FixProtectiveMbrSize {
                    from: size,
                    to: want,
                });
                e.size_in_lba = U32::new(want);
                mbr_changed = true;
            }
        }
        MbrKind::Absent | MbrKind::Empty => {
            if scan.mbr_kind == MbrKind::Absent {
                mbr.disk_signature = U32::new(0);
                mbr.reserved = 0.into();
            }
            for p in mbr.partitions.iter_mut() {
                *p = Default::default();
            }
            let e = &mut mbr.partitions[0];
            e.start_chs = [0x00, 0x02, 0x00];
            e.os_type = MBR_TYPE_GPT_PROTECTIVE;
            e.end_chs = [0xFF, 0xFF, 0xFF];
            e.starting_lba = U32::new(1);
            e.size_in_lba = U32::new(expected);
            mbr.signature = MBR_SIGNATURE.into();
            report
                .actions
                .push(RepairAction::WriteProtectiveMbr { size: expected });
            mbr_changed = true;
        }
        MbrKind::Legacy => {}
    }
    if mbr_changed {
        writes.push(Write_ {
            offset: 0,
            bytes: mbr.as_bytes().to_vec(),
        });
    }

    // Regions the new table occupies (bytes, half-open).
    let table_regions = [
        (0, MBR_SIZE as u64),
        (lba_off(1, ss)?, lba_off(2, ss)?),
        (
            lba_off(primary_entries_lba, ss)?,
            lba_off(primary_entries_end, ss)?,
        ),
        (lba_off(backup_entries_lba, ss)?, dev_size),
    ];
    let in_partition = |r: (u64, u64)| final_parts.iter().any(|&(_, p)| overlaps(p, r));
    let covered = |r: (u64, u64)| table_regions.iter().any(|&t| t.0 <= r.0 && r.1 <= t.1);

    // Wipes: the foreign (bogus) GPT and a stale backup header. A header
    // inside live partition data is never touched; one inside the region
    // the restored table is written to goes with that write.
    let rewritten = |writes: &[Write_], r: (u64, u64)| {
        writes
            .iter()
            .any(|w| w.offset <= r.0 && r.1 <= w.offset + w.bytes.len() as u64)
    };
    if let Some(f) = &scan.foreign {
        for off in std::iter::once(f.header_offset).chain(f.backup_offset) {
            let r = (off, off + MBR_SIZE as u64);
            if rewritten(&writes, r) {
                report.actions.push(RepairAction::WipeForeignGptHeader {
                    sector_size: f.sector_size,
                    offset: off,
                    covered_by_table: true,
                });
            } else if in_partition(r) || covered(r) {
                report.warnings.push(format!(
                    "{}-byte-sector GPT header at byte {off} lies inside a partition or the \
                     table: left alone",
                    f.sector_size
                ));
            } else {
                report.actions.push(RepairAction::WipeForeignGptHeader {
                    sector_size: f.sector_size,
                    offset: off,
                    covered_by_table: false,
                });
                writes.push(Write_ {
                    offset: off,
                    bytes: vec![0; MBR_SIZE],
                });
            }
        }
        // What the foreign table's own structures overwrote cannot be restored.
        if copy == HeaderCopy::Backup {
            let damaged = (0, f.entries_end_offset);
            for &(index, p) in &final_parts {
                if overlaps(p, damaged) {
                    report.warnings.push(format!(
                        "partition {index} overlaps bytes 0..{} which the {}-byte-sector table \
                         overwrote: data there may be lost",
                        damaged.1, f.sector_size
                    ));
                }
            }
        }
    }
    if let Some(old) = old_backup.filter(|&b| b != last) {
        let r = (
            lba_off(old, ss)?,
            lba_off(old.checked_add(1).ok_or(Error::Overflow)?, ss)?,
        );
        if !in_partition(r) && !covered(r) {
            report
                .actions
                .push(RepairAction::WipeStaleBackupHeader { lba: old });
            writes.push(Write_ {
                offset: r.0,
                bytes: vec![0; ss as usize],
            });
        }
    }

    if writes.is_empty() && report.actions.is_empty() {
        return Ok(report);
    }
    report.outcome = RepairOutcome::Repaired;
    if opts.dry_run {
        return Ok(report);
    }
    for w in &writes {
        dev.seek(SeekFrom::Start(w.offset))
            .and_then(|_| dev.write_all(&w.bytes))
            .map_err(|source| Error::Write {
                offset: w.offset,
                len: w.bytes.len(),
                source,
            })?;
    }
    dev.flush().map_err(Error::Flush)?;
    report.after = Some(Scan::read(dev, ss, dev_size, None, false)?.report());
    Ok(report)
}
