//! What [`inspect`](super::inspect()) reports: the serialisable
//! [`TableReport`] and its parts ([`TableKind`], [`MbrKind`],
//! [`HeaderReport`], [`MbrEntryReport`], [`PartitionReport`]) and the
//! [`Problem`]s it lists. Plain data; nothing here reads a device.

use serde::Serialize;

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
    /// The protective MBR's 0xEE entry does not start at LBA 1 (UEFI 2.10, 5.2.3).
    PmbrStartWrong { found: u32 },
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
            Self::PmbrStartWrong { found } => {
                write!(f, "protective MBR entry starts at LBA {found}, not 1")
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

/// Everything [`inspect`](super::inspect()) found.
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

    /// Nothing is damaged: at most problems [`repair`](crate::partition::repair()) fixes
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
                | Problem::PmbrStartWrong { .. }
                | Problem::MbrMissing
                | Problem::ForeignGpt { partitions: 0, .. }
        )
    }
}
