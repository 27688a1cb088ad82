//! The null volume (`null:SIZE`): reads return zeros, writes and flushes succeed without
//! storing anything, like qemu-storage-daemon's `null-co` with `read-zeroes=on`. It
//! measures what the export itself costs, with no storage under it.

use vm_memory::VolatileSlice;

use super::{VolumeError, SECTOR_SIZE};

/// Zeros copied into guest buffers, a piece at a time.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

#[derive(Debug)]
pub(crate) struct NullVolume {
    size: u64,
}

impl NullVolume {
    pub(crate) fn new(size: u64) -> NullVolume {
        NullVolume {
            size: size - size % SECTOR_SIZE,
        }
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn refresh_size(&self) -> Result<u64, VolumeError> {
        Ok(self.size)
    }

    pub(crate) fn read(
        &self,
        _offset: u64,
        slices: &[VolatileSlice<'_, ()>],
    ) -> Result<(), VolumeError> {
        for s in slices {
            let mut at = 0;
            while at < s.len() {
                let n = (s.len() - at).min(ZEROES.len());
                if let Ok(sub) = s.subslice(at, n) {
                    sub.copy_from(&ZEROES[..n]);
                }
                at += n;
            }
        }
        Ok(())
    }

    pub(crate) fn write(
        &self,
        _offset: u64,
        _slices: &[VolatileSlice<'_, ()>],
    ) -> Result<(), VolumeError> {
        Ok(())
    }

    pub(crate) fn flush(&self) -> Result<(), VolumeError> {
        Ok(())
    }

    pub(crate) fn discard(&self, _offset: u64, _len: u64) -> Result<(), VolumeError> {
        Ok(())
    }

    pub(crate) fn write_zeroes(
        &self,
        _offset: u64,
        _len: u64,
        _unmap: bool,
    ) -> Result<(), VolumeError> {
        Ok(())
    }
}
