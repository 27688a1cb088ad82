//! On-disk layouts of the MBR, the GPT header and a GPT entry, parsed with
//! `zerocopy` little-endian types. Nothing here trusts the bytes: every
//! header goes through [`GptHeader::validate`] before its LBAs are used.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// "EFI PART", the GPT header signature.
pub(crate) const GPT_SIGNATURE: [u8; 8] = *b"EFI PART";
/// GPT revision 1.0.
#[cfg(test)]
pub(crate) const GPT_REVISION: u32 = 0x0001_0000;
/// Size of the defined part of the GPT header.
pub(crate) const GPT_HEADER_SIZE: usize = 92;
/// Size of the defined part of a GPT entry.
pub(crate) const GPT_ENTRY_SIZE: usize = 128;
/// Largest partition entry array accepted (the usual one is 16 KiB).
pub(crate) const MAX_ENTRY_ARRAY_BYTES: u64 = 16 << 20;
/// MBR partition type of the GPT protective entry.
pub(crate) const MBR_TYPE_GPT_PROTECTIVE: u8 = 0xEE;
/// The MBR boot signature, 0x55 0xAA on disk.
pub(crate) const MBR_SIGNATURE: u16 = 0xAA55;
/// Size of the MBR record (the rest of LBA 0 at larger sector sizes is unused).
pub(crate) const MBR_SIZE: usize = 512;

/// One of the four primary MBR partition records.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub(crate) struct MbrPartitionRecord {
    pub boot_indicator: u8,
    pub start_chs: [u8; 3],
    pub os_type: u8,
    pub end_chs: [u8; 3],
    pub starting_lba: U32,
    pub size_in_lba: U32,
}

impl MbrPartitionRecord {
    pub fn is_empty(&self) -> bool {
        self.os_type == 0 && self.size_in_lba.get() == 0
    }
}

/// The master boot record, the first 512 bytes of LBA 0 at any sector size.
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub(crate) struct Mbr {
    pub boot_code: [u8; 440],
    pub disk_signature: U32,
    pub reserved: U16,
    pub partitions: [MbrPartitionRecord; 4],
    pub signature: U16,
}

/// The defined 92 bytes of a GPT header (UEFI 2.10, 5.3.2).
#[derive(Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub(crate) struct GptHeader {
    pub signature: [u8; 8],
    pub revision: U32,
    pub header_size: U32,
    pub header_crc32: U32,
    pub reserved: U32,
    pub my_lba: U64,
    pub alternate_lba: U64,
    pub first_usable_lba: U64,
    pub last_usable_lba: U64,
    pub disk_guid: [u8; 16],
    pub partition_entry_lba: U64,
    pub num_partition_entries: U32,
    pub partition_entry_size: U32,
    pub partition_entry_array_crc32: U32,
}

/// The defined 128 bytes of a GPT partition entry.
#[derive(Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub(crate) struct GptEntry {
    pub type_guid: [u8; 16],
    pub unique_guid: [u8; 16],
    pub starting_lba: U64,
    pub ending_lba: U64,
    pub attributes: U64,
    pub name: [U16; 36],
}

const _: () = assert!(size_of::<Mbr>() == MBR_SIZE);
const _: () = assert!(size_of::<MbrPartitionRecord>() == 16);
const _: () = assert!(size_of::<GptHeader>() == GPT_HEADER_SIZE);
const _: () = assert!(size_of::<GptEntry>() == GPT_ENTRY_SIZE);

impl GptEntry {
    pub fn is_used(&self) -> bool {
        self.type_guid != [0; 16]
    }

    pub fn name(&self) -> String {
        let units: Vec<u16> = self
            .name
            .iter()
            .map(|u| u.get())
            .take_while(|&u| u != 0)
            .collect();
        String::from_utf16_lossy(&units)
    }
}

/// Computes a GPT header's CRC over its first `header_size` bytes of `raw`
/// (the header sector as read) with the CRC field taken as zero.
pub(crate) fn header_crc(raw: &[u8], header_size: usize) -> Option<u32> {
    let bytes = raw.get(..header_size)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[..16]);
    h.update(&[0; 4]);
    h.update(&bytes[20..]);
    Some(h.finalize())
}

/// The highest LBA whose sector ends at a byte offset a `u64` holds, at `sector_size`.
pub(crate) fn max_lba(sector_size: u32) -> u64 {
    u64::MAX / u64::from(sector_size.max(1)) - 1
}

/// Why a GPT header was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum HeaderDefect {
    NoSignature,
    BadHeaderSize(u32),
    BadCrc {
        stored: u32,
        computed: u32,
    },
    WrongMyLba {
        stored: u64,
        read_at: u64,
    },
    BadEntrySize(u32),
    BadEntryCount(u32),
    BadUsableRange {
        first: u64,
        last: u64,
    },
    BadAlternate {
        alternate: u64,
        read_at: u64,
        first: u64,
        last: u64,
    },
    EntriesOutOfRange,
    EntriesOverlapHeader,
}

impl std::fmt::Display for HeaderDefect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoSignature => write!(f, "no \"EFI PART\" signature"),
            Self::BadHeaderSize(s) => write!(f, "header size {s} out of range"),
            Self::BadCrc { stored, computed } => {
                write!(f, "header CRC {stored:#010x} != computed {computed:#010x}")
            }
            Self::WrongMyLba { stored, read_at } => {
                write!(
                    f,
                    "header says it is at LBA {stored} but was read at LBA {read_at}"
                )
            }
            Self::BadEntrySize(s) => write!(f, "partition entry size {s} invalid"),
            Self::BadEntryCount(n) => write!(f, "partition entry count {n} invalid"),
            Self::BadUsableRange { first, last } => {
                write!(f, "usable range {first}..={last} invalid")
            }
            Self::BadAlternate {
                alternate,
                read_at,
                first,
                last,
            } => write!(
                f,
                "alternate header LBA {alternate} is impossible for a header at LBA {read_at} \
                 with usable range {first}..={last}"
            ),
            Self::EntriesOutOfRange => write!(f, "partition entry array outside the device"),
            Self::EntriesOverlapHeader => {
                write!(
                    f,
                    "partition entry array overlaps a header or the usable range"
                )
            }
        }
    }
}

impl GptHeader {
    /// Size of the entry array in bytes (checked).
    pub fn entry_array_bytes(&self) -> Option<u64> {
        u64::from(self.num_partition_entries.get())
            .checked_mul(u64::from(self.partition_entry_size.get()))
    }

    /// Sectors covered by the entry array (checked).
    pub fn entry_array_sectors(&self, sector_size: u32) -> Option<u64> {
        self.entry_array_bytes()?
            .checked_next_multiple_of(u64::from(sector_size))
            .map(|b| b / u64::from(sector_size))
    }

    /// Validates a header read at `read_at` from `raw` (the whole sector)
    /// on a device of `dev_sectors` sectors of `sector_size` bytes.
    /// Checks signature, size, CRC, self-location, and every LBA field: the header
    /// and its entry array inside the device; the usable range and the alternate
    /// header consistent with it (a primary's backup past the usable range, a
    /// backup's primary before it) and addressable in bytes, though they may
    /// describe a disk bigger than this device.
    pub fn validate(
        &self,
        raw: &[u8],
        sector_size: u32,
        read_at: u64,
        dev_sectors: u64,
    ) -> Result<(), HeaderDefect> {
        if self.signature != GPT_SIGNATURE {
            return Err(HeaderDefect::NoSignature);
        }
        let hs = self.header_size.get();
        if (hs as usize) < GPT_HEADER_SIZE || hs > sector_size || hs as usize > raw.len() {
            return Err(HeaderDefect::BadHeaderSize(hs));
        }
        let computed = header_crc(raw, hs as usize).ok_or(HeaderDefect::BadHeaderSize(hs))?;
        if computed != self.header_crc32.get() {
            return Err(HeaderDefect::BadCrc {
                stored: self.header_crc32.get(),
                computed,
            });
        }
        if self.my_lba.get() != read_at {
            return Err(HeaderDefect::WrongMyLba {
                stored: self.my_lba.get(),
                read_at,
            });
        }
        let es = self.partition_entry_size.get();
        if (es as usize) < GPT_ENTRY_SIZE || es % 8 != 0 || es > sector_size.max(4096) {
            return Err(HeaderDefect::BadEntrySize(es));
        }
        let n = self.num_partition_entries.get();
        let bytes = self
            .entry_array_bytes()
            .ok_or(HeaderDefect::BadEntryCount(n))?;
        if n == 0 || bytes > MAX_ENTRY_ARRAY_BYTES {
            return Err(HeaderDefect::BadEntryCount(n));
        }
        let (first, last) = (self.first_usable_lba.get(), self.last_usable_lba.get());
        // What the header says of the disk it was made for (the usable range, the
        // other header) may reach past this device: a table for a bigger disk is
        // still a table, and repair refuses it by its partitions. It must still be
        // consistent, and every LBA a byte offset (so no sum over them overflows).
        // What it says is here (itself, its entry array) must be inside the device.
        let top = max_lba(sector_size);
        // LBA 0 is the MBR, LBA 1 the primary header: nothing usable before 2.
        if first < 2 || first > last || last > top {
            return Err(HeaderDefect::BadUsableRange { first, last });
        }
        let alternate = self.alternate_lba.get();
        // A primary's backup lies past the usable range; a backup's primary before it.
        let alternate_ok = if read_at < first {
            alternate > last && alternate <= top
        } else {
            alternate >= 1 && alternate < first
        };
        if !alternate_ok {
            return Err(HeaderDefect::BadAlternate {
                alternate,
                read_at,
                first,
                last,
            });
        }
        let sectors = self
            .entry_array_sectors(sector_size)
            .ok_or(HeaderDefect::BadEntryCount(n))?;
        let start = self.partition_entry_lba.get();
        let end = start
            .checked_add(sectors)
            .ok_or(HeaderDefect::EntriesOutOfRange)?;
        if end > dev_sectors || start == 0 {
            return Err(HeaderDefect::EntriesOutOfRange);
        }
        // The array must sit between the header and the usable range:
        // after a primary header, before a backup header.
        let ok = if read_at < first {
            start > read_at && end <= first
        } else {
            start > last && end <= read_at
        };
        if !ok || read_at == 0 || (read_at >= first && read_at <= last) {
            return Err(HeaderDefect::EntriesOverlapHeader);
        }
        Ok(())
    }
}

/// Formats a GUID stored in the mixed-endian GPT layout.
pub(crate) fn guid_to_string(g: &[u8; 16]) -> String {
    format!(
        "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        g[3], g[2], g[1], g[0], g[5], g[4], g[7], g[6], g[8], g[9], g[10], g[11], g[12], g[13],
        g[14], g[15]
    )
}

/// Parses "XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX" into the mixed-endian layout.
#[cfg(test)]
pub(crate) fn guid_from_str(s: &str) -> [u8; 16] {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    let mut b = [0u8; 16];
    for (i, out) in b.iter_mut().enumerate() {
        *out = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    b
}

/// Friendly names of the partition types an image is likely to carry.
pub(crate) fn type_name(type_guid: &str) -> Option<&'static str> {
    Some(match type_guid {
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" => "EFI System",
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4" => "Linux filesystem",
        "21686148-6449-6E6F-744E-656564454649" => "BIOS boot",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" => "Linux swap",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" => "Linux root (x86-64)",
        "B921B045-1DF0-41C3-AF44-4C6F280D3FAE" => "Linux root (ARM64)",
        "BC13C2FF-59E6-4262-A352-B275FD6F7172" => "Linux extended boot",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928" => "Linux LVM",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" => "Microsoft basic data",
        "E3C9E316-0B5C-4DB8-817D-F92DF00215AE" => "Microsoft reserved",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_round_trips_mixed_endian() {
        let s = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
        let g = guid_from_str(s);
        assert_eq!(g[0], 0x28);
        assert_eq!(guid_to_string(&g), s);
    }
}
