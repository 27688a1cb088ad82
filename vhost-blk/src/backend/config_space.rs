//! The virtio-blk configuration space the guest reads: capacity, block sizes, topology,
//! queue count, discard and write-zeroes limits, and the one writable field (`writeback`).

use std::mem::offset_of;
use std::sync::atomic::Ordering;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::device::Device;
use crate::request::MAX_DWZ_SEGS;
use crate::volume::SECTOR_SIZE;

/// Geometry the guest is shown.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    /// Guest logical block size in bytes.
    pub logical_block_size: u32,
    pub num_queues: u16,
    pub queue_size: u16,
}

/// `struct virtio_blk_config` (virtio 1.2, 5.2.4) up to and including the write-zeroes
/// fields, as the guest reads it: little endian, no padding.
#[derive(Debug, Default, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct VirtioBlkConfig {
    /// In 512-byte sectors, whatever the block size.
    pub capacity: U64,
    /// Unused: VIRTIO_BLK_F_SIZE_MAX is not offered.
    pub size_max: U32,
    pub seg_max: U32,
    /// Unused: VIRTIO_BLK_F_GEOMETRY is not offered.
    pub cylinders: U16,
    pub heads: u8,
    pub sectors: u8,
    pub blk_size: U32,
    /// log2(physical block / logical block).
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    /// In logical blocks.
    pub min_io_size: U16,
    /// In logical blocks.
    pub opt_io_size: U32,
    /// Write-cache mode: 1 writeback, 0 writethrough. The only field the guest writes.
    pub writeback: u8,
    pub unused0: u8,
    pub num_queues: U16,
    pub max_discard_sectors: U32,
    pub max_discard_seg: U32,
    pub discard_sector_alignment: U32,
    pub max_write_zeroes_sectors: U32,
    pub max_write_zeroes_seg: U32,
    pub write_zeroes_may_unmap: u8,
    pub unused1: [u8; 3],
}

/// Size of the configuration space offered.
pub(crate) const CONFIG_LEN: usize = std::mem::size_of::<VirtioBlkConfig>();
/// Byte offset of the writable `writeback` field.
pub(crate) const WRITEBACK_OFFSET: usize = offset_of!(VirtioBlkConfig, writeback);

/// The configuration space of `dev` as shown to the guest.
pub(crate) fn config_space(dev: &Device, g: &Geometry) -> VirtioBlkConfig {
    let lbs = u64::from(g.logical_block_size);
    let vol = dev.volume();
    let phys = vol.physical_block_size().max(vol.block_size()).max(lbs);
    let (io_min, io_opt) = vol.io_sizes();
    let min_io = (u64::from(io_min).max(vol.block_size()) / lbs).clamp(1, u64::from(u16::MAX));
    let opt_io = u64::from(io_opt) / lbs;
    // Discard and write-zeroes sizes are in 512-byte sectors, kept whole volume blocks.
    let volume_sectors = (vol.block_size() / SECTOR_SIZE) as u32;
    let max_sectors: u32 = (u32::MAX / 2) & !(volume_sectors - 1);
    VirtioBlkConfig {
        capacity: dev.capacity().into(),
        seg_max: u32::from(g.queue_size.saturating_sub(2).max(1)).into(),
        blk_size: g.logical_block_size.into(),
        physical_block_exp: u8::try_from((phys / lbs).trailing_zeros()).unwrap_or(0),
        min_io_size: (min_io as u16).into(),
        opt_io_size: u32::try_from(opt_io).unwrap_or(0).into(),
        writeback: u8::from(dev.wce.load(Ordering::Relaxed)),
        num_queues: g.num_queues.into(),
        max_discard_sectors: max_sectors.into(),
        max_discard_seg: MAX_DWZ_SEGS.into(),
        discard_sector_alignment: volume_sectors.into(),
        max_write_zeroes_sectors: max_sectors.into(),
        max_write_zeroes_seg: MAX_DWZ_SEGS.into(),
        write_zeroes_may_unmap: 1,
        ..VirtioBlkConfig::default()
    }
}

/// The bytes `[offset, offset + size)` of `cfg` as GET_CONFIG answers them: zero past the
/// end, at most 256 bytes (the vhost-user protocol's cap; `size` comes from the frontend).
pub(crate) fn read(cfg: &VirtioBlkConfig, offset: u32, size: u32) -> Vec<u8> {
    let bytes = cfg.as_bytes();
    let mut out = vec![0u8; (size as usize).min(256)];
    let start = (offset as usize).min(CONFIG_LEN);
    let end = (offset as usize).saturating_add(out.len()).min(CONFIG_LEN);
    out[..end - start].copy_from_slice(&bytes[start..end]);
    out
}

/// The write-cache mode a SET_CONFIG of `buf` at `offset` sets, if it covers `writeback`.
pub(crate) fn written_writeback(offset: u32, buf: &[u8]) -> Option<bool> {
    let i = WRITEBACK_OFFSET.checked_sub(offset as usize)?;
    buf.get(i).map(|&v| v != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_virtio_spec() {
        assert_eq!(CONFIG_LEN, 60);
        assert_eq!(offset_of!(VirtioBlkConfig, seg_max), 12);
        assert_eq!(offset_of!(VirtioBlkConfig, blk_size), 20);
        assert_eq!(offset_of!(VirtioBlkConfig, physical_block_exp), 24);
        assert_eq!(offset_of!(VirtioBlkConfig, opt_io_size), 28);
        assert_eq!(WRITEBACK_OFFSET, 32);
        assert_eq!(offset_of!(VirtioBlkConfig, num_queues), 34);
        assert_eq!(offset_of!(VirtioBlkConfig, max_discard_sectors), 36);
        assert_eq!(offset_of!(VirtioBlkConfig, max_write_zeroes_seg), 52);
        assert_eq!(offset_of!(VirtioBlkConfig, write_zeroes_may_unmap), 56);
    }

    #[test]
    fn reads_past_the_end_are_zero_and_capped() {
        let cfg = VirtioBlkConfig {
            capacity: 0x0102_0304_0506_0708u64.into(),
            write_zeroes_may_unmap: 1,
            ..Default::default()
        };
        assert_eq!(read(&cfg, 0, 8), 0x0102_0304_0506_0708u64.to_le_bytes());
        let tail = read(&cfg, 56, 16);
        assert_eq!(tail.len(), 16);
        assert_eq!(tail[0], 1);
        assert!(tail[1..].iter().all(|&b| b == 0));
        assert_eq!(read(&cfg, u32::MAX, u32::MAX).len(), 256);
        assert!(read(&cfg, u32::MAX, 4).iter().all(|&b| b == 0));
    }

    #[test]
    fn only_writeback_is_written() {
        assert_eq!(written_writeback(32, &[1]), Some(true));
        assert_eq!(written_writeback(30, &[9, 9, 0]), Some(false));
        assert_eq!(written_writeback(33, &[1]), None);
        assert_eq!(written_writeback(0, &[1; 32]), None);
        assert_eq!(written_writeback(0, &[1; 33]), Some(true));
    }
}
