//! The GPT part of a repair plan: the entry array (with the last
//! partition grown when asked), both headers rebuilt for the device, and
//! the writes of whichever copy differs from what is on disk, backup first.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, IntoBytes};

use crate::partition::inspect::{partition_reports, HeaderCopy, HeaderRead, PartitionReport, Scan};
use crate::partition::ondisk::{header_crc, GptEntry, GptHeader, GPT_ENTRY_SIZE, GPT_HEADER_SIZE};
use crate::partition::repair::{RepairAction, RepairOptions};
use crate::partition::Error;

use super::layout::{lba_off, Layout};
use super::{PartitionBytes, Plan, PlannedWrite, WriteKind};

/// Serialises `hdr` into a header sector based on `template` and fixes its CRC.
fn header_sector(template: &[u8], hdr: &mut GptHeader) -> Result<Vec<u8>, Error> {
    let mut raw = template.to_vec();
    hdr.header_crc32 = U32::new(0);
    raw[..GPT_HEADER_SIZE].copy_from_slice(hdr.as_bytes());
    let hs = hdr.header_size.get() as usize;
    let crc = header_crc(&raw, hs).ok_or(Error::Overflow)?;
    hdr.header_crc32 = U32::new(crc);
    raw[..GPT_HEADER_SIZE].copy_from_slice(hdr.as_bytes());
    Ok(raw)
}

/// The entry array to write: the trusted copy's, with the last partition
/// grown to the new last usable LBA when asked and possible.
pub(super) fn plan_entries(
    src: &HeaderRead,
    parts: &[PartitionReport],
    layout: &Layout,
    opts: &RepairOptions,
    plan: &mut Plan,
) -> Result<Vec<u8>, Error> {
    let new_last_usable = layout.new_last_usable;
    let mut entries = src.entries.clone().ok_or(Error::Overflow)?;
    let es = src.hdr.partition_entry_size.get() as usize;
    if opts.grow_last_partition {
        if let Some(lastp) = parts.iter().max_by_key(|p| p.last_lba) {
            let is_last = parts
                .iter()
                .all(|p| p.index == lastp.index || p.first_lba < lastp.first_lba);
            if !is_last {
                plan.warnings.push(format!(
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
                plan.actions.push(RepairAction::GrowLastPartition {
                    index: lastp.index,
                    from_last_lba: lastp.last_lba,
                    to_last_lba: new_last_usable,
                });
            }
        }
    }
    Ok(entries)
}

/// The partitions of `entries` as (index, half-open byte range).
pub(super) fn partition_byte_ranges(
    src: &HeaderRead,
    entries: &[u8],
    ss: u32,
) -> Result<Vec<PartitionBytes>, Error> {
    let mut h = src.clone();
    h.entries = Some(entries.to_vec());
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
        .collect::<Result<_, Error>>()
}

/// Both GPT copies: the header actions (which go in front of any already
/// planned) and the writes of whichever copy differs from what is on disk,
/// backup first.
pub(super) fn plan_gpt(
    scan: &Scan,
    copy: HeaderCopy,
    src: &HeaderRead,
    layout: &Layout,
    entries: &[u8],
    plan: &mut Plan,
) -> Result<(), Error> {
    let ss = scan.sector_size;
    let last = layout.last;
    let entries_crc = crc32fast::hash(entries);
    let mut ph = src.hdr.clone();
    ph.my_lba = U64::new(1);
    ph.alternate_lba = U64::new(last);
    ph.last_usable_lba = U64::new(layout.new_last_usable);
    ph.partition_entry_lba = U64::new(layout.primary_entries_lba);
    ph.partition_entry_array_crc32 = U32::new(entries_crc);
    let mut bh = ph.clone();
    bh.my_lba = U64::new(last);
    bh.alternate_lba = U64::new(1);
    bh.partition_entry_lba = U64::new(layout.backup_entries_lba);
    let praw = header_sector(&src.raw, &mut ph)?;
    let braw = header_sector(&src.raw, &mut bh)?;

    let same = |h: Option<&HeaderRead>, raw: &[u8]| {
        h.is_some_and(|h| h.is_good() && h.raw == raw && h.entries.as_deref() == Some(entries))
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
            entries_lba: layout.backup_entries_lba,
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
    if src.hdr.last_usable_lba.get() != layout.new_last_usable {
        head.push(RepairAction::SetLastUsableLba {
            from: src.hdr.last_usable_lba.get(),
            to: layout.new_last_usable,
        });
    }
    // The per-header actions above explain the writes; any residual
    // difference (e.g. a stale backup entry CRC) is still written.
    head.append(&mut plan.actions);
    plan.actions = head;

    if !backup_ok {
        plan.writes.push(PlannedWrite {
            kind: WriteKind::BackupEntries,
            offset: lba_off(layout.backup_entries_lba, ss)?,
            bytes: entries.to_vec(),
        });
        plan.writes.push(PlannedWrite {
            kind: WriteKind::BackupHeader,
            offset: lba_off(last, ss)?,
            bytes: braw,
        });
    }
    if !primary_ok {
        plan.writes.push(PlannedWrite {
            kind: WriteKind::PrimaryEntries,
            offset: lba_off(layout.primary_entries_lba, ss)?,
            bytes: entries.to_vec(),
        });
        plan.writes.push(PlannedWrite {
            kind: WriteKind::PrimaryHeader,
            offset: lba_off(1, ss)?,
            bytes: praw,
        });
    }
    if (!backup_ok || !primary_ok) && plan.actions.is_empty() {
        plan.actions.push(if primary_ok {
            RepairAction::RestoreBackupFromPrimary { to_lba: last }
        } else {
            RepairAction::RestorePrimaryFromBackup { backup_lba: last }
        });
    }
    Ok(())
}
