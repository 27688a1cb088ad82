//! [`detect_table_sector_size`]: which sector size the table on a device
//! was built for (512, 4096, MBR-only, none, or both: the `sgdisk -e`
//! accident), with the evidence found at each size.

use std::io::{Read, Seek};

use serde::Serialize;
use zerocopy::FromBytes;

use crate::partition::ondisk::{Mbr, MBR_SIZE};
use crate::partition::Error;

use super::read::{mbr_kind, read_at};
use super::report::{HeaderCopy, MbrKind};
use super::scan::Scan;

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
