//! The protective-MBR part of a repair plan: the 0xEE entry made to cover
//! the grown device (a hybrid MBR's other entries untouched), or a
//! protective MBR written where LBA 0 has none.

use zerocopy::little_endian::U32;
use zerocopy::IntoBytes;

use crate::partition::inspect::{pmbr_expected_size, HeaderRead, MbrKind, Scan};
use crate::partition::ondisk::{MBR_SIGNATURE, MBR_TYPE_GPT_PROTECTIVE};
use crate::partition::repair::RepairAction;
use crate::partition::Error;

use super::layout::Layout;
use super::{Plan, PlannedWrite, WriteKind};

/// Protective MBR: the 0xEE entry's size made to cover the device, or a
/// protective MBR written where LBA 0 has none.
pub(super) fn plan_protective_mbr(
    scan: &Scan,
    src: &HeaderRead,
    layout: &Layout,
    plan: &mut Plan,
) -> Result<(), Error> {
    let last = layout.last;
    let mut mbr = scan.mbr.clone();
    let expected = pmbr_expected_size(scan.dev_sectors);
    let mut mbr_changed = false;
    match scan.mbr_kind {
        MbrKind::Protective => {
            let i = scan.ee_entry().ok_or(Error::Overflow)?;
            let e = &mut mbr.partitions[i];
            if e.starting_lba.get() != 1 {
                plan.actions.push(RepairAction::FixProtectiveMbrStart {
                    from: e.starting_lba.get(),
                });
                e.starting_lba = U32::new(1);
                mbr_changed = true;
            }
            if e.size_in_lba.get() != expected {
                plan.actions.push(RepairAction::FixProtectiveMbrSize {
                    from: e.size_in_lba.get(),
                    to: expected,
                });
                e.size_in_lba = U32::new(expected);
                mbr_changed = true;
            }
        }
        MbrKind::Hybrid => {
            // Only an 0xEE entry that ran to the image's old end follows the
            // device end; the hybrid entries stay exactly as they are.
            let i = scan.ee_entry().ok_or(Error::Overflow)?;
            let e = &mut mbr.partitions[i];
            let start = u64::from(e.starting_lba.get());
            let size = e.size_in_lba.get();
            let old_last = src.hdr.alternate_lba.get().max(src.lba);
            let end = start + u64::from(size);
            let dev_end = last.checked_add(1).ok_or(Error::Overflow)?;
            let want = u32::try_from(dev_end.saturating_sub(start)).unwrap_or(u32::MAX);
            let ran_to_old_end = old_last.checked_add(1) == Some(end);
            if (size == u32::MAX || ran_to_old_end || end > dev_end) && size != want {
                plan.actions.push(RepairAction::FixProtectiveMbrSize {
                    from: size,
                    to: want,
                });
                e.size_in_lba = U32::new(want);
                mbr_changed = true;
            }
        }
        MbrKind::Absent | MbrKind::Empty => {
            if scan.mbr_kind == MbrKind::Absent {
                mbr.disk_signature = U32::new(0);
                mbr.reserved = 0.into();
            }
            for p in mbr.partitions.iter_mut() {
                *p = Default::default();
            }
            let e = &mut mbr.partitions[0];
            e.start_chs = [0x00, 0x02, 0x00];
            e.os_type = MBR_TYPE_GPT_PROTECTIVE;
            e.end_chs = [0xFF, 0xFF, 0xFF];
            e.starting_lba = U32::new(1);
            e.size_in_lba = U32::new(expected);
            mbr.signature = MBR_SIGNATURE.into();
            plan.actions
                .push(RepairAction::WriteProtectiveMbr { size: expected });
            mbr_changed = true;
        }
        MbrKind::Legacy => {}
    }
    if mbr_changed {
        plan.writes.push(PlannedWrite {
            kind: WriteKind::ProtectiveMbr,
            offset: 0,
            bytes: mbr.as_bytes().to_vec(),
        });
    }
    Ok(())
}
