//! [`Scan`]: everything read from a device at one sector size (MBR, both
//! GPT headers wherever the backup turned up, a foreign-sector-size GPT),
//! with the accessors repair works from: which copy to trust and what kind
//! of table it is. Judging it into a report is in `diagnose.rs`.

use std::io::{Read, Seek};

use zerocopy::FromBytes;

use crate::partition::ondisk::{HeaderDefect, Mbr, MBR_SIZE, MBR_TYPE_GPT_PROTECTIVE};
use crate::partition::Error;

use super::read::{
    check_sector_size, mbr_kind, read_at, read_foreign, read_header, scan_for_backup, ForeignGpt,
    HeaderRead,
};
use super::report::{HeaderCopy, MbrKind, TableKind};

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
}
