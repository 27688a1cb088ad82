//! Reading the pieces of a table at one sector size: sector-size checks,
//! raw reads, one GPT header with its entry array ([`HeaderRead`]), the
//! MBR's kind, the MiB-boundary search for a surviving backup header, and
//! a GPT laid out for the other sector size ([`ForeignGpt`]).

use std::io::{Read, Seek, SeekFrom};

use zerocopy::FromBytes;

use crate::partition::ondisk::{
    GptEntry, GptHeader, HeaderDefect, Mbr, GPT_ENTRY_SIZE, GPT_HEADER_SIZE, MBR_SIGNATURE,
    MBR_TYPE_GPT_PROTECTIVE,
};
use crate::partition::Error;

use super::report::{HeaderReport, MbrKind};

const MIB: u64 = 1 << 20;

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

    pub(super) fn report(&self) -> HeaderReport {
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

/// A valid GPT header laid out for the other common sector size.
pub(super) fn read_foreign<D: Read + Seek>(
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
