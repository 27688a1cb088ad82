//! [`Layout`]: where the rebuilt GPT goes on the device (backup at the
//! last LBA, its entries just before it, the last usable LBA before them).

use crate::partition::inspect::{HeaderCopy, HeaderRead, Scan};
use crate::partition::Error;

/// Where the rebuilt table goes, in LBAs of the scan's sector size.
pub(super) struct Layout {
    /// Last LBA of the device: the backup header.
    pub(super) last: u64,
    /// Start of the backup entry array, just before the backup header.
    pub(super) backup_entries_lba: u64,
    /// Last usable LBA of the rebuilt table, just before the backup entries.
    pub(super) new_last_usable: u64,
    /// First usable LBA, kept from the trusted copy.
    pub(super) first_usable: u64,
    /// Start of the primary entry array (LBA 2 when rebuilt from a backup).
    pub(super) primary_entries_lba: u64,
    /// First LBA after the primary entry array.
    pub(super) primary_entries_end: u64,
}

impl Layout {
    /// Where the table rebuilt from `src` (the trusted `copy`) goes on this
    /// device; refuses an entry array that does not fit before the first
    /// usable LBA.
    pub(super) fn new(scan: &Scan, copy: HeaderCopy, src: &HeaderRead) -> Result<Self, Error> {
        let ss = scan.sector_size;
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
                sector_size: ss,
                reason: format!(
                    "entry array at LBA {primary_entries_lba} ({entries_sectors} sectors) does not \
                     fit before first usable LBA {first_usable} on a device ending at LBA {last}"
                ),
            });
        }
        Ok(Self {
            last,
            backup_entries_lba,
            new_last_usable,
            first_usable,
            primary_entries_lba,
            primary_entries_end,
        })
    }
}

/// Byte offset of `lba` at `ss`-byte sectors.
pub(super) fn lba_off(lba: u64, ss: u32) -> Result<u64, Error> {
    lba.checked_mul(u64::from(ss)).ok_or(Error::Overflow)
}
