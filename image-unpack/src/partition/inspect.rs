//! Reading a partition table at a given sector size: the raw [`Scan`] that
//! repair works from, the serialisable [`TableReport`], and
//! [`detect_table_sector_size`].

use std::io::{Read, Seek, SeekFrom};

use serde::Serialize;
use zerocopy::FromBytes;

use super::ondisk::{
    guid_to_string, type_name, GptEntry, GptHeader, HeaderDefect, Mbr, GPT_ENTRY_SIZE,
    GPT_HEADER_SIZE, MBR_SIGNATURE, MBR_SIZE, MBR_TYPE_GPT_PROTECTIVE,
};
use super::Error;

const MIB: u64 = 1 << 20;

/// What kind of table a device holds at the sector size it was read at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TableKind {
    /// A GPT with a protective MBR (or no MBR).
    Gpt,
    /// A GPT whose MBR also carries real partitions next to the 0xEE entry.
    Hybrid,
    /// An MBR-only (legacy) table.
    Mbr,
    /// No partition table at all.
    None,
    /// Traces of a table, but no copy of it that can be trusted.
    Damaged,
}

/// What LBA 0 holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MbrKind {
    /// No 0x55AA boot signature.
    Absent,
    /// Boot signature but no partition entries.
    Empty,
    /// Only a 0xEE entry.
    Protective,
    /// A 0xEE entry plus real entries.
    Hybrid,
    /// Real entries and no 0xEE entry.
    Legacy,
}

/// Which copy of the GPT header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderCopy {
    /// The primary header at LBA 1.
    Primary,
    /// The backup header (normally at the last LBA).
    Backup,
}

/// Something wrong (or worth knowing) about a table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Problem {
    /// The header at this LBA is missing or invalid.
    HeaderInvalid {
        copy: HeaderCopy,
        lba: u64,
        reason: String,
    },
    /// The header is valid but its entry array does not match its CRC.
    EntriesCrcMismatch { copy: HeaderCopy, lba: u64 },
    /// The backup header is valid but not at the last LBA of the device.
    BackupNotAtEnd { backup_lba: u64, last_lba: u64 },
    /// The primary names an alternate LBA other than where the backup is.
    AlternateLbaWrong { alternate_lba: u64, expected: u64 },
    /// The last usable LBA leaves space unused at the end of the device.
    LastUsableNotAtEnd {
        last_usable_lba: u64,
        max_last_usable_lba: u64,
    },
    /// Both headers are valid but describe different tables.
    HeadersDisagree { what: String },
    /// The protective MBR's 0xEE entry does not cover the device.
    PmbrSizeMismatch { found: u32, expected: u32 },
    /// A GPT without an MBR boot signature in LBA 0.
    MbrMissing,
    /// A GPT next to an MBR with partitions but no 0xEE entry.
    MbrWithoutProtectiveEntry,
    /// A 0xEE entry but no usable GPT.
    ProtectiveEntryWithoutGpt,
    /// A partition outside the usable range or the device.
    PartitionOutsideUsable {
        index: u32,
        first_lba: u64,
        last_lba: u64,
    },
    /// Two partitions overlap.
    PartitionsOverlap { a: u32, b: u32 },
    /// A GPT laid out for another sector size is also present.
    ForeignGpt {
        sector_size: u32,
        header_offset: u64,
        partitions: usize,
    },
    /// A surviving backup header was found away from the device end.
    SurvivingBackupFound { lba: u64 },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::HeaderInvalid { copy, lba, reason } => {
                write!(f, "{copy:?} GPT header at LBA {lba} invalid: {reason}")
            }
            Self::EntriesCrcMismatch { copy, lba } => {
                write!(
                    f,
                    "{copy:?} GPT header at LBA {lba}: partition entry array CRC mismatch"
                )
            }
            Self::BackupNotAtEnd {
                backup_lba,
                last_lba,
            } => {
                write!(
                    f,
                    "backup GPT header at LBA {backup_lba}, device ends at LBA {last_lba}"
                )
            }
            Self::AlternateLbaWrong {
                alternate_lba,
                expected,
            } => {
                write!(
                    f,
                    "primary names backup LBA {alternate_lba}, expected {expected}"
                )
            }
            Self::LastUsableNotAtEnd {
                last_usable_lba,
                max_last_usable_lba,
            } => write!(
                f,
                "last usable LBA {last_usable_lba}, the device allows {max_last_usable_lba}"
            ),
            Self::HeadersDisagree { what } => write!(f, "primary and backup disagree: {what}"),
            Self::PmbrSizeMismatch { found, expected } => {
                write!(
                    f,
                    "protective MBR covers {found} sectors, expected {expected}"
                )
            }
            Self::MbrMissing => write!(f, "no MBR boot signature in front of the GPT"),
            Self::MbrWithoutProtectiveEntry => {
                write!(f, "MBR has partitions but no 0xEE protective entry")
            }
            Self::ProtectiveEntryWithoutGpt => {
                write!(
                    f,
                    "protective MBR present but no valid GPT at this sector size"
                )
            }
            Self::PartitionOutsideUsable {
                index,
                first_lba,
                last_lba,
            } => write!(
                f,
                "partition {index} ({first_lba}..={last_lba}) lies outside the usable range"
            ),
            Self::PartitionsOverlap { a, b } => write!(f, "partitions {a} and {b} overlap"),
            Self::ForeignGpt {
                sector_size,
                header_offset,
                partitions,
            } => write!(
                f,
                "a {sector_size}-byte-sector GPT header at byte {header_offset} \
                 ({partitions} partitions)"
            ),
            Self::SurvivingBackupFound { lba } => {
                write!(f, "surviving backup GPT header found at LBA {lba}")
            }
        }
    }
}

/// One GPT header as found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HeaderReport {
    /// Where it was read.
    pub lba: u64,
    /// Signature, size, CRC and geometry all valid.
    pub valid: bool,
    /// The header CRC matches (false also when there is no header).
    pub header_crc_ok: bool,
    /// The entry array CRC matches.
    pub entries_crc_ok: bool,
    /// Why it is not valid.
    pub defect: Option<String>,
    /// Fields, when the signature is present.
    pub alternate_lba: Option<u64>,
    /// First usable LBA.
    pub first_usable_lba: Option<u64>,
    /// Last usable LBA.
    pub last_usable_lba: Option<u64>,
    /// Start of its entry array.
    pub partition_entry_lba: Option<u64>,
    /// Number of entries.
    pub num_partition_entries: Option<u32>,
    /// Size of one entry.
    pub partition_entry_size: Option<u32>,
}

/// One entry of the MBR.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MbrEntryReport {
    /// Slot 1..=4.
    pub slot: u8,
    /// Partition type byte.
    pub os_type: u8,
    /// Boot flag set.
    pub bootable: bool,
    /// First LBA.
    pub starting_lba: u32,
    /// Size in sectors.
    pub size_in_lba: u32,
}

/// One GPT partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PartitionReport {
    /// 1-based entry index, as sgdisk and the kernel number it.
    pub index: u32,
    /// Type GUID.
    pub type_guid: String,
    /// Friendly type name for well-known types.
    pub type_name: Option<&'static str>,
    /// Partition GUID (PARTUUID).
    pub partition_guid: String,
    /// Partition name (PARTLABEL).
    pub name: String,
    /// First LBA.
    pub first_lba: u64,
    /// Last LBA, inclusive.
    pub last_lba: u64,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Attribute bits.
    pub attributes: u64,
}

/// Everything [`inspect`] found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TableReport {
    /// Sector size the device was read at.
    pub sector_size: u32,
    /// Device size in bytes.
    pub device_size: u64,
    /// Last LBA of the device.
    pub last_lba: u64,
    /// Kind of table.
    pub kind: TableKind,
    /// What LBA 0 holds.
    pub mbr: MbrKind,
    /// MBR entries.
    pub mbr_entries: Vec<MbrEntryReport>,
    /// The 0xEE entry's size field.
    pub pmbr_size: Option<u32>,
    /// What the 0xEE entry's size should be for a protective MBR.
    pub pmbr_expected_size: u32,
    /// Disk GUID from the trusted header.
    pub disk_guid: Option<String>,
    /// The primary header.
    pub primary: HeaderReport,
    /// The backup header (at the primary's alternate LBA, else the device end).
    pub backup: Option<HeaderReport>,
    /// The backup header sits at the last LBA.
    pub backup_at_end: bool,
    /// First usable LBA of the trusted header.
    pub first_usable_lba: Option<u64>,
    /// Last usable LBA of the trusted header.
    pub last_usable_lba: Option<u64>,
    /// Partitions from the trusted header's entry array.
    pub partitions: Vec<PartitionReport>,
    /// Problems found.
    pub problems: Vec<Problem>,
}

impl TableReport {
    /// No problems at all.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// Nothing is damaged: at most problems [`repair`](super::repair) fixes
    /// as routine (a grown device, a stale protective MBR size). MBR-only
    /// and table-less devices count as good.
    pub fn is_good(&self) -> bool {
        self.kind != TableKind::Damaged && !self.problems.iter().any(Problem::is_damage)
    }
}

impl Problem {
    /// This problem means corruption or contradiction, not just a table
    /// that has not followed its device's growth.
    pub fn is_damage(&self) -> bool {
        !matches!(
            self,
            Problem::BackupNotAtEnd { .. }
                | Problem::AlternateLbaWrong { .. }
                | Problem::LastUsableNotAtEnd { .. }
                | Problem::PmbrSizeMismatch { .. }
                | Problem::MbrMissing
                | Problem::ForeignGpt { partitions: 0, .. }
        )
    }
}

/// A header as read from the device, with its entry array when the header is valid.
#[derive(Clone, Debug)]
pub(crate) struct HeaderRead {
    pub lba: u64,
    pub raw: Vec<u8>,
    pub hdr: GptHeader,
    pub defect: Option<HeaderDefect>,
    pub entries: Option<Vec<u8>>,
    pub entries_crc_ok: bool,
}

impl HeaderRead {
    /// Valid header whose entry array matches its CRC.
    pub fn is_good(&self) -> bool {
        self.defect.is_none() && self.entries_crc_ok
    }

    fn report(&self) -> HeaderReport {
        let has_sig = !matches!(self.defect, Some(HeaderDefect::NoSignature));
        let h = &self.hdr;
        let f = |v: u64| has_sig.then_some(v);
        HeaderReport {
            lba: self.lba,
            valid: self.defect.is_none(),
            header_crc_ok: has_sig && !matches!(self.defect, Some(HeaderDefect::BadCrc { .. })),
            entries_crc_ok: self.entries_crc_ok,
            defect: self.defect.as_ref().map(|d| d.to_string()),
            alternate_lba: f(h.alternate_lba.get()),
            first_usable_lba: f(h.first_usable_lba.get()),
            last_usable_lba: f(h.last_usable_lba.get()),
            partition_entry_lba: f(h.partition_entry_lba.get()),
            num_partition_entries: has_sig.then_some(h.num_partition_entries.get()),
            partition_entry_size: has_sig.then_some(h.partition_entry_size.get()),
        }
    }

    /// Used entries as (1-based index, entry).
    pub fn used_entries(&self) -> Vec<(u32, GptEntry)> {
        let Some(entries) = &self.entries else {
            return Vec::new();
        };
        let es = self.hdr.partition_entry_size.get() as usize;
        if es < GPT_ENTRY_SIZE {
            return Vec::new();
        }
        entries
            .chunks_exact(es)
            .enumerate()
            .filter_map(|(i, c)| {
                let e = GptEntry::read_from_bytes(&c[..GPT_ENTRY_SIZE]).ok()?;
                let idx = u32::try_from(i).ok()?.checked_add(1)?;
                e.is_used().then_some((idx, e))
            })
            .collect()
    }
}

/// A GPT built for another sector size, seen through this one.
#[derive(Clone, Debug)]
pub(crate) struct ForeignGpt {
    pub sector_size: u32,
    pub header_offset: u64,
    /// Byte offset of its backup header, when that one is valid too.
    pub backup_offset: Option<u64>,
    /// End of its primary entry array: everything before it was written
    /// when this table was created.
    pub entries_end_offset: u64,
    pub partitions: usize,
}

/// The raw state of a device at one sector size.
#[derive(Clone, Debug)]
pub(crate) struct Scan {
    pub sector_size: u32,
    pub dev_size: u64,
    pub dev_sectors: u64,
    pub mbr: Mbr,
    pub mbr_kind: MbrKind,
    pub primary: HeaderRead,
    /// Backup at the primary's alternate LBA, the PMBR's end, a hinted
    /// image end or the device end; the invalid one at the device end if
    /// none is valid.
    pub backup: Option<HeaderRead>,
    pub foreign: Option<ForeignGpt>,
}

pub(crate) fn check_sector_size(sector_size: u32) -> Result<(), Error> {
    if !sector_size.is_power_of_two() || !(512..=65536).contains(&sector_size) {
        return Err(Error::InvalidSectorSize(sector_size));
    }
    Ok(())
}

pub(crate) fn read_at<D: Read + Seek>(
    dev: &mut D,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; len];
    dev.seek(SeekFrom::Start(offset))
        .and_then(|_| dev.read_exact(&mut buf))
        .map_err(|source| Error::Read {
            offset,
            len,
            source,
        })?;
    Ok(buf)
}

pub(crate) fn mbr_kind(mbr: &Mbr) -> MbrKind {
    if mbr.signature.get() != MBR_SIGNATURE {
        return MbrKind::Absent;
    }
    let used: Vec<_> = mbr.partitions.iter().filter(|p| !p.is_empty()).collect();
    let ee = used
        .iter()
        .filter(|p| p.os_type == MBR_TYPE_GPT_PROTECTIVE)
        .count();
    match (used.len(), ee) {
        (0, _) => MbrKind::Empty,
        (1, 1) => MbrKind::Protective,
        (_, 0) => MbrKind::Legacy,
        _ => MbrKind::Hybrid,
    }
}

/// Expected 0xEE size for a protective MBR: the whole device after LBA 0, capped.
pub(crate) fn pmbr_expected_size(dev_sectors: u64) -> u32 {
    u32::try_from(dev_sectors.saturating_sub(1)).unwrap_or(u32::MAX)
}

/// Reads and validates the header at `lba`, and its entry array if valid.
pub(crate) fn read_header<D: Read + Seek>(
    dev: &mut D,
    sector_size: u32,
    dev_sectors: u64,
    lba: u64,
) -> Result<HeaderRead, Error> {
    let offset = lba
        .checked_mul(u64::from(sector_size))
        .ok_or(Error::Overflow)?;
    let raw = read_at(dev, offset, sector_size as usize)?;
    let hdr = GptHeader::read_from_bytes(&raw[..GPT_HEADER_SIZE]).map_err(|_| Error::Overflow)?;
    let defect = hdr.validate(&raw, sector_size, lba, dev_sectors).err();
    let mut out = HeaderRead {
        lba,
        raw,
        hdr,
        defect,
        entries: None,
        entries_crc_ok: false,
    };
    if out.defect.is_none() {
        let bytes = out.hdr.entry_array_bytes().ok_or(Error::Overflow)?;
        let off = out
            .hdr
            .partition_entry_lba
            .get()
            .checked_mul(u64::from(sector_size))
            .ok_or(Error::Overflow)?;
        let len = usize::try_from(bytes).map_err(|_| Error::Overflow)?;
        let entries = read_at(dev, off, len)?;
        out.entries_crc_ok = crc32fast::hash(&entries) == out.hdr.partition_entry_array_crc32.get();
        out.entries = Some(entries);
    }
    Ok(out)
}

/// Looks for a valid backup header (alternate LBA 1) at each MiB boundary
/// of the device, from the end down: where a 512-byte image's backup sits
/// when the image was written onto a bigger device.
pub(crate) fn scan_for_backup<D: Read + Seek>(
    dev: &mut D,
    sector_size: u32,
    dev_sectors: u64,
    dev_size: u64,
) -> Result<Option<HeaderRead>, Error> {
    let ss = u64::from(sector_size);
    let mut k = dev_size / MIB;
    while k > 0 {
        let lba = (k * MIB) / ss - 1;
        k -= 1;
        if lba < 2 || lba >= dev_sectors {
            continue;
        }
        let raw = read_at(dev, lba * ss, 8)?;
        if raw != b"EFI PART" {
            continue;
        }
        let h = read_header(dev, sector_size, dev_sectors, lba)?;
        if h.is_good() && h.hdr.alternate_lba.get() == 1 {
            return Ok(Some(h));
        }
    }
    Ok(None)
}

impl Scan {
    /// Reads everything at `sector_size`. `image_size` hints where an
    /// image's backup header may be; `deep` allows the MiB scan for a
    /// surviving backup when no header is valid.
    pub fn read<D: Read + Seek>(
        dev: &mut D,
        sector_size: u32,
        dev_size: u64,
        image_size: Option<u64>,
        deep: bool,
    ) -> Result<Self, Error> {
        check_sector_size(sector_size)?;
        let ss = u64::from(sector_size);
        let dev_sectors = dev_size / ss;
        if dev_sectors < 3 {
            return Err(Error::DeviceTooSmall {
                dev_size,
                sector_size,
            });
        }
        let last = dev_sectors - 1;
        let mbr_raw = read_at(dev, 0, MBR_SIZE)?;
        let mbr = Mbr::read_from_bytes(&mbr_raw).map_err(|_| Error::Overflow)?;
        let kind = mbr_kind(&mbr);
        let primary = read_header(dev, sector_size, dev_sectors, 1)?;

        let mut candidates = Vec::new();
        if primary.defect.is_none() {
            candidates.push(primary.hdr.alternate_lba.get());
        }
        candidates.push(last);
        if let Some(ee) = mbr
            .partitions
            .iter()
            .find(|p| p.os_type == MBR_TYPE_GPT_PROTECTIVE)
        {
            let end = u64::from(ee.starting_lba.get()) + u64::from(ee.size_in_lba.get());
            if ee.size_in_lba.get() != u32::MAX {
                candidates.push(end.saturating_sub(1));
            }
        }
        if let Some(sz) = image_size {
            candidates.push((sz / ss).saturating_sub(1));
        }
        let mut backup = None;
        let mut at_end = None;
        for lba in candidates {
            if lba < 2 || lba >= dev_sectors {
                continue;
            }
            let h = read_header(dev, sector_size, dev_sectors, lba)?;
            if h.defect.is_none() && h.lba != 1 && h.hdr.alternate_lba.get() == 1 {
                backup = Some(h);
                break;
            }
            if lba == last && at_end.is_none() {
                at_end = Some(h);
            }
        }
        let foreign = read_foreign(dev, sector_size, dev_size)?;
        let suspicious = primary.defect != Some(HeaderDefect::NoSignature)
            || matches!(kind, MbrKind::Protective | MbrKind::Hybrid)
            || foreign.is_some();
        if backup.is_none() && !primary.is_good() && deep && suspicious {
            backup = scan_for_backup(dev, sector_size, dev_sectors, dev_size)?;
        }
        Ok(Scan {
            sector_size,
            dev_size,
            dev_sectors,
            mbr,
            mbr_kind: kind,
            primary,
            backup: backup.or(at_end),
            foreign,
        })
    }

    pub fn last_lba(&self) -> u64 {
        self.dev_sectors - 1
    }

    pub fn good_backup(&self) -> Option<&HeaderRead> {
        self.backup.as_ref().filter(|b| b.is_good())
    }

    /// The copy to trust: the primary if good, else a good backup.
    pub fn trusted(&self) -> Option<(HeaderCopy, &HeaderRead)> {
        if self.primary.is_good() {
            Some((HeaderCopy::Primary, &self.primary))
        } else {
            self.good_backup().map(|b| (HeaderCopy::Backup, b))
        }
    }

    pub fn ee_entry(&self) -> Option<usize> {
        self.mbr
            .partitions
            .iter()
            .position(|p| p.os_type == MBR_TYPE_GPT_PROTECTIVE)
    }

    pub fn kind(&self) -> TableKind {
        if self.trusted().is_some() {
            return if self.mbr_kind == MbrKind::Hybrid {
                TableKind::Hybrid
            } else {
                TableKind::Gpt
            };
        }
        let traces = self.primary.defect != Some(HeaderDefect::NoSignature)
            || self
                .backup
                .as_ref()
                .is_some_and(|b| b.defect != Some(HeaderDefect::NoSignature))
            || matches!(self.mbr_kind, MbrKind::Protective | MbrKind::Hybrid)
            || self.foreign.is_some();
        if traces {
            TableKind::Damaged
        } else if self.mbr_kind == MbrKind::Legacy {
            TableKind::Mbr
        } else {
            TableKind::None
        }
    }

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

/// A valid GPT header laid out for the other common sector size.
fn read_foreign<D: Read + Seek>(
    dev: &mut D,
    sector_size: u32,
    dev_size: u64,
) -> Result<Option<ForeignGpt>, Error> {
    let fss: u32 = if sector_size == 512 { 4096 } else { 512 };
    let f_sectors = dev_size / u64::from(fss);
    if f_sectors < 3 {
        return Ok(None);
    }
    let h = read_header(dev, fss, f_sectors, 1)?;
    if h.defect.is_some() {
        return Ok(None);
    }
    let alt = h.hdr.alternate_lba.get();
    let backup_offset = if alt > 1 && alt < f_sectors {
        let b = read_header(dev, fss, f_sectors, alt)?;
        b.defect.is_none().then(|| alt * u64::from(fss))
    } else {
        None
    };
    Ok(Some(ForeignGpt {
        sector_size: fss,
        header_offset: u64::from(fss),
        backup_offset,
        entries_end_offset: h
            .hdr
            .partition_entry_lba
            .get()
            .saturating_add(h.hdr.entry_array_sectors(fss).unwrap_or(0))
            .saturating_mul(u64::from(fss)),
        partitions: h.used_entries().len(),
    }))
}

/// Inspects the partition table of `dev` (of `dev_size` bytes) read at
/// `sector_size`. Never writes.
pub fn inspect<D: Read + Seek>(
    dev: &mut D,
    sector_size: u32,
    dev_size: u64,
) -> Result<TableReport, Error> {
    Ok(Scan::read(dev, sector_size, dev_size, None, true)?.report())
}

/// Where a GPT was found by [`detect_table_sector_size`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GptEvidence {
    /// The sector size it is laid out for.
    pub sector_size: u32,
    /// Which copy was found (primary first, then backup).
    pub copy: HeaderCopy,
    /// LBA of that copy, in its own sector size.
    pub lba: u64,
    /// Number of used partition entries.
    pub partitions: usize,
}

/// The sector size a table was built for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum DetectedLayout {
    /// A GPT for this sector size.
    Gpt { sector_size: u32 },
    /// An MBR-only table (sector size assumed 512).
    Mbr,
    /// No table.
    None,
    /// GPTs for both sector sizes; `likely` is the one that has partitions
    /// (the other is typically the empty table `sgdisk -e` writes on a 4K
    /// device over a 512-byte image, see docs/sgdisk-e-accident.md).
    Both { likely: u32 },
}

/// Everything [`detect_table_sector_size`] found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Detection {
    /// The verdict.
    pub layout: DetectedLayout,
    /// A GPT at 512-byte sectors.
    pub gpt_512: Option<GptEvidence>,
    /// A GPT at 4096-byte sectors.
    pub gpt_4096: Option<GptEvidence>,
    /// What LBA 0 holds.
    pub mbr: MbrKind,
    /// An empty 4K GPT over a 512-byte GPT with partitions: the `sgdisk -e` accident.
    pub suspected_sgdisk_accident: bool,
}

impl Detection {
    /// The sector size partition work should use, if any table was found.
    pub fn sector_size(&self) -> Option<u32> {
        match self.layout {
            DetectedLayout::Gpt { sector_size } => Some(sector_size),
            DetectedLayout::Mbr => Some(512),
            DetectedLayout::Both { likely } => Some(likely),
            DetectedLayout::None => None,
        }
    }
}

fn evidence_at<D: Read + Seek>(
    dev: &mut D,
    ss: u32,
    dev_size: u64,
    deep: bool,
) -> Result<Option<GptEvidence>, Error> {
    let sectors = dev_size / u64::from(ss);
    if sectors < 3 {
        return Ok(None);
    }
    let scan = Scan::read(dev, ss, dev_size, None, deep)?;
    let found = if scan.primary.defect.is_none() {
        Some((HeaderCopy::Primary, &scan.primary))
    } else {
        scan.backup
            .as_ref()
            .filter(|b| b.defect.is_none())
            .map(|b| (HeaderCopy::Backup, b))
    };
    Ok(found.map(|(copy, h)| GptEvidence {
        sector_size: ss,
        copy,
        lba: h.lba,
        partitions: h.used_entries().len(),
    }))
}

/// Finds which sector size the partition table on `dev` was built for:
/// "EFI PART" at byte 512 means 512, at byte 4096 means 4096; backup
/// headers at the device end, at the end named by the protective MBR, and
/// (when a 4K GPT is empty) at MiB boundaries count too.
pub fn detect_table_sector_size<D: Read + Seek>(
    dev: &mut D,
    dev_size: u64,
) -> Result<Detection, Error> {
    if dev_size < MBR_SIZE as u64 {
        return Ok(Detection {
            layout: DetectedLayout::None,
            gpt_512: None,
            gpt_4096: None,
            mbr: MbrKind::Absent,
            suspected_sgdisk_accident: false,
        });
    }
    let mbr = Mbr::read_from_bytes(&read_at(dev, 0, MBR_SIZE)?).map_err(|_| Error::Overflow)?;
    let mbr = mbr_kind(&mbr);
    let g4096 = evidence_at(dev, 4096, dev_size, false)?;
    let deep = g4096.as_ref().is_some_and(|g| g.partitions == 0);
    let g512 = evidence_at(dev, 512, dev_size, deep)?;
    let accident =
        matches!((&g512, &g4096), (Some(a), Some(b)) if a.partitions > 0 && b.partitions == 0);
    let layout = match (&g512, &g4096) {
        (Some(a), Some(b)) => Some(DetectedLayout::Both {
            likely: if b.partitions > a.partitions {
                4096
            } else {
                512
            },
        }),
        (Some(_), None) => Some(DetectedLayout::Gpt { sector_size: 512 }),
        (None, Some(_)) => Some(DetectedLayout::Gpt { sector_size: 4096 }),
        (None, None) => None,
    }
    .unwrap_or(match mbr {
        MbrKind::Legacy | MbrKind::Hybrid | MbrKind::Protective => DetectedLayout::Mbr,
        _ => DetectedLayout::None,
    });
    Ok(Detection {
        layout,
        gpt_512: g512,
        gpt_4096: g4096,
        mbr,
        suspected_sgdisk_accident: accident,
    })
}
