//! Judging a [`Scan`]: the [`Problem`]s it shows, its partitions, and the
//! [`TableReport`] built from them. Also the checks repair reuses
//! (header disagreements, partitions outside the usable range or
//! overlapping).

use crate::partition::ondisk::{guid_to_string, type_name};

use super::read::{pmbr_expected_size, HeaderRead};
use super::report::{HeaderCopy, MbrEntryReport, MbrKind, PartitionReport, Problem, TableReport};
use super::scan::Scan;

impl Scan {
    /// Partitions of the trusted copy.
    pub fn partitions(&self) -> Vec<PartitionReport> {
        let Some((_, h)) = self.trusted() else {
            return Vec::new();
        };
        partition_reports(h, self.sector_size)
    }

    pub fn report(&self) -> TableReport {
        let kind = self.kind();
        let last = self.last_lba();
        let trusted = self.trusted();
        let mut problems = Vec::new();
        for (copy, h) in [
            (HeaderCopy::Primary, Some(&self.primary)),
            (HeaderCopy::Backup, self.backup.as_ref()),
        ] {
            match h {
                Some(h) if h.defect.is_some() => problems.push(Problem::HeaderInvalid {
                    copy,
                    lba: h.lba,
                    reason: h.defect.as_ref().map(|d| d.to_string()).unwrap_or_default(),
                }),
                Some(h) if !h.entries_crc_ok => {
                    problems.push(Problem::EntriesCrcMismatch { copy, lba: h.lba })
                }
                Some(_) => {}
                None => problems.push(Problem::HeaderInvalid {
                    copy,
                    lba: last,
                    reason: "not found".into(),
                }),
            }
        }
        if let Some(b) = self.good_backup() {
            if b.lba != last {
                problems.push(Problem::BackupNotAtEnd {
                    backup_lba: b.lba,
                    last_lba: last,
                });
                // A backup is only "surviving" news when no primary named it.
                if !self.primary.is_good() {
                    problems.push(Problem::SurvivingBackupFound { lba: b.lba });
                }
            }
        }
        if self.primary.is_good() {
            let alt = self.primary.hdr.alternate_lba.get();
            let expected = self.good_backup().map_or(last, |b| b.lba);
            if alt != expected {
                problems.push(Problem::AlternateLbaWrong {
                    alternate_lba: alt,
                    expected,
                });
            }
        }
        if let (true, Some(b)) = (self.primary.is_good(), self.good_backup()) {
            problems.extend(
                disagreements(&self.primary, b)
                    .into_iter()
                    .map(|what| Problem::HeadersDisagree { what }),
            );
        }
        let mut first_usable = None;
        let mut last_usable = None;
        if let Some((_, h)) = trusted {
            first_usable = Some(h.hdr.first_usable_lba.get());
            last_usable = Some(h.hdr.last_usable_lba.get());
            let sectors = h.hdr.entry_array_sectors(self.sector_size).unwrap_or(0);
            let max_last_usable = last.saturating_sub(sectors).saturating_sub(1);
            if h.hdr.last_usable_lba.get() < max_last_usable {
                problems.push(Problem::LastUsableNotAtEnd {
                    last_usable_lba: h.hdr.last_usable_lba.get(),
                    max_last_usable_lba: max_last_usable,
                });
            }
            match self.mbr_kind {
                MbrKind::Absent | MbrKind::Empty => problems.push(Problem::MbrMissing),
                MbrKind::Legacy => problems.push(Problem::MbrWithoutProtectiveEntry),
                _ => {}
            }
        } else if matches!(self.mbr_kind, MbrKind::Protective | MbrKind::Hybrid) {
            problems.push(Problem::ProtectiveEntryWithoutGpt);
        }
        let expected = pmbr_expected_size(self.dev_sectors);
        let pmbr_size = self
            .ee_entry()
            .map(|i| self.mbr.partitions[i].size_in_lba.get());
        if self.mbr_kind == MbrKind::Protective && pmbr_size != Some(expected) {
            problems.push(Problem::PmbrSizeMismatch {
                found: pmbr_size.unwrap_or(0),
                expected,
            });
        }
        let pmbr_start = self
            .ee_entry()
            .map(|i| self.mbr.partitions[i].starting_lba.get());
        if let Some(found) = pmbr_start.filter(|&s| self.mbr_kind == MbrKind::Protective && s != 1)
        {
            problems.push(Problem::PmbrStartWrong { found });
        }
        let partitions = self.partitions();
        if let Some((_, h)) = trusted {
            problems.extend(partition_problems(
                &partitions,
                h.hdr.first_usable_lba.get(),
                h.hdr.last_usable_lba.get().min(last),
            ));
        }
        if let Some(f) = &self.foreign {
            problems.push(Problem::ForeignGpt {
                sector_size: f.sector_size,
                header_offset: f.header_offset,
                partitions: f.partitions,
            });
        }
        TableReport {
            sector_size: self.sector_size,
            device_size: self.dev_size,
            last_lba: last,
            kind,
            mbr: self.mbr_kind,
            mbr_entries: self
                .mbr
                .partitions
                .iter()
                .enumerate()
                .filter(|(_, p)| !p.is_empty())
                .map(|(i, p)| MbrEntryReport {
                    slot: i as u8 + 1,
                    os_type: p.os_type,
                    bootable: p.boot_indicator == 0x80,
                    starting_lba: p.starting_lba.get(),
                    size_in_lba: p.size_in_lba.get(),
                })
                .collect(),
            pmbr_size,
            pmbr_expected_size: expected,
            disk_guid: trusted.map(|(_, h)| guid_to_string(&h.hdr.disk_guid)),
            primary: self.primary.report(),
            backup: self.backup.as_ref().map(HeaderRead::report),
            backup_at_end: self.good_backup().is_some_and(|b| b.lba == last),
            first_usable_lba: first_usable,
            last_usable_lba: last_usable,
            partitions,
            problems,
        }
    }
}

/// Fields in which two good headers describe different tables.
pub(crate) fn disagreements(p: &HeaderRead, b: &HeaderRead) -> Vec<String> {
    let mut out = Vec::new();
    if p.hdr.disk_guid != b.hdr.disk_guid {
        out.push("disk GUID".to_string());
    }
    if p.hdr.first_usable_lba != b.hdr.first_usable_lba {
        out.push("first usable LBA".to_string());
    }
    if p.hdr.num_partition_entries != b.hdr.num_partition_entries
        || p.hdr.partition_entry_size != b.hdr.partition_entry_size
    {
        out.push("entry array geometry".to_string());
    }
    if p.entries != b.entries {
        out.push("partition entries".to_string());
    }
    if b.lba != p.hdr.alternate_lba.get() {
        // Not a disagreement in content; reported as AlternateLbaWrong.
    }
    out
}

pub(crate) fn partition_reports(h: &HeaderRead, sector_size: u32) -> Vec<PartitionReport> {
    h.used_entries()
        .into_iter()
        .map(|(index, e)| {
            let (first, last) = (e.starting_lba.get(), e.ending_lba.get());
            let type_guid = guid_to_string(&e.type_guid);
            PartitionReport {
                index,
                type_name: type_name(&type_guid),
                type_guid,
                partition_guid: guid_to_string(&e.unique_guid),
                name: e.name(),
                first_lba: first,
                last_lba: last,
                size_bytes: last
                    .checked_sub(first)
                    .and_then(|n| n.checked_add(1))
                    .and_then(|n| n.checked_mul(u64::from(sector_size)))
                    .unwrap_or(0),
                attributes: e.attributes.get(),
            }
        })
        .collect()
}

pub(crate) fn partition_problems(parts: &[PartitionReport], first: u64, last: u64) -> Vec<Problem> {
    let mut out = Vec::new();
    for p in parts {
        if p.first_lba > p.last_lba || p.first_lba < first || p.last_lba > last {
            out.push(Problem::PartitionOutsideUsable {
                index: p.index,
                first_lba: p.first_lba,
                last_lba: p.last_lba,
            });
        }
    }
    for (i, a) in parts.iter().enumerate() {
        for b in &parts[i + 1..] {
            if a.first_lba <= b.last_lba && b.first_lba <= a.last_lba {
                out.push(Problem::PartitionsOverlap {
                    a: a.index,
                    b: b.index,
                });
            }
        }
    }
    out
}
