//! virtio-blk's wire formats (virtio 1.2, 5.2.6): the request header, the discard and
//! write-zeroes segment, and the status byte. Type and flag values come from
//! `virtio_bindings`; the structs are little endian whatever the host.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
pub(crate) use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

/// Status byte: done.
pub(crate) const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// Status byte: the device failed the request.
pub(crate) const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// Status byte: the request type or flags are not supported.
pub(crate) const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// `struct virtio_blk_outhdr`: the device-readable bytes that open every request.
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RequestHeader {
    /// VIRTIO_BLK_T_*.
    pub request_type: U32,
    /// Unused.
    pub ioprio: U32,
    /// First 512-byte sector, whatever the block size.
    pub sector: U64,
}

/// Bytes of [`RequestHeader`].
pub(crate) const HEADER_LEN: usize = std::mem::size_of::<RequestHeader>();

/// `struct virtio_blk_discard_write_zeroes`: one range of a discard or write-zeroes request.
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct DwzSegment {
    pub sector: U64,
    pub num_sectors: U32,
    /// VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP (write zeroes only).
    pub flags: U32,
}

/// Bytes of [`DwzSegment`].
pub(crate) const DWZ_SEG_LEN: usize = std::mem::size_of::<DwzSegment>();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_virtio_spec() {
        assert_eq!(HEADER_LEN, 16);
        assert_eq!(DWZ_SEG_LEN, 16);
        let h = RequestHeader::read_from_bytes(&[1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 1])
            .unwrap();
        assert_eq!(h.request_type.get(), VIRTIO_BLK_T_OUT);
        assert_eq!(h.sector.get(), 0x0100_0000_0000_0002);
    }
}
