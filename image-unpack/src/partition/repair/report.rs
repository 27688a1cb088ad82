//! What [`repair`](super::repair()) did or would do: the [`RepairAction`]s
//! (with the sentences the CLI prints), the [`RepairOutcome`] and the
//! serialisable [`RepairReport`]. Plain data; nothing here touches a device.

use serde::Serialize;

use crate::partition::inspect::TableReport;

/// One change [`repair`](super::repair()) makes (or would make, on a dry run).
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
    /// The 0xEE entry made to start at LBA 1.
    FixProtectiveMbrStart { from: u32 },
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
            Self::FixProtectiveMbrStart { from } => {
                write!(f, "start the protective MBR entry at LBA 1 (was {from})")
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

/// What [`repair`](super::repair()) concluded.
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

/// The result of [`repair`](super::repair()).
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
