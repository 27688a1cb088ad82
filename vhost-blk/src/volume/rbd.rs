//! RBD volumes (`rbd:POOL/IMAGE...`): a librbd image, byte-addressed, so guest requests
//! of any alignment go to it as they are (no bridge, no read-modify-write). Requests the
//! librbd engine does not take (flush, discard, write-zeroes, and everything when the
//! engine is off) run here, on an I/O thread, waiting for their completion.
//!
//! Connecting and opening block (up to the connect timeout): they run where the export
//! is created or resumed, never on a queue thread. With an op timeout, an operation the
//! cluster does not answer in time fails with ETIMEDOUT (the guest sees IOERR) and the
//! image serves again once the cluster answers.

use std::io;
use std::sync::Arc;

use vm_memory::VolatileSlice;

use super::{VolumeError, VolumeParams, SECTOR_SIZE};
use crate::sys::IOV_MAX;

#[derive(Debug)]
pub(crate) struct RbdVolume {
    image: Arc<::rbd::Image>,
    /// Image size, in whole sectors (read again when the image grows).
    size: std::sync::atomic::AtomicU64,
    /// Object size of the image (its optimal I/O size).
    object_size: u32,
    max_iovecs: usize,
}

fn rbd_err(op: &'static str, offset: u64) -> impl FnOnce(::rbd::RbdError) -> VolumeError {
    move |e| {
        let source = match e.errno() {
            Some(errno) => io::Error::from_raw_os_error(errno),
            None => io::Error::other(e.to_string()),
        };
        VolumeError::Io { op, offset, source }
    }
}

fn iovecs(slices: &[VolatileSlice<'_, ()>]) -> Vec<libc::iovec> {
    slices
        .iter()
        .map(|s| libc::iovec {
            iov_base: s.ptr_guard_mut().as_ptr().cast(),
            iov_len: s.len(),
        })
        .collect()
}

/// Takes the image's exclusive lock for as long as it is open: no second writer, on this
/// host or another, until this export ends (or is fenced). An image without the
/// exclusive-lock feature cannot be locked; it is served, with a warning.
fn take_lock(image: &::rbd::Image) -> Result<(), ::rbd::RbdError> {
    match image.lock_exclusive() {
        Ok(()) => Ok(()),
        Err(e) if e.errno() == Some(libc::EINVAL) => {
            tracing::warn!(image = %image.path(), "RBD image without the exclusive-lock feature: another client could write it too");
            Ok(())
        }
        Err(e) if matches!(e.errno(), Some(libc::EBUSY | libc::EROFS | libc::EAGAIN)) => {
            let holders = image.lock_owners().unwrap_or_default();
            Err(::rbd::RbdError::Call {
                op: "take the exclusive lock of RBD image",
                what: format!(
                    "{}: held by {} (another export writes it; fence it to take over)",
                    image.path(),
                    if holders.is_empty() {
                        "another client".to_owned()
                    } else {
                        holders.join(", ")
                    }
                ),
                source: std::io::Error::from_raw_os_error(libc::EBUSY),
            })
        }
        Err(e) => Err(e),
    }
}

impl RbdVolume {
    /// Connects to the cluster and opens the image (read-only at a snapshot, or if asked).
    pub(crate) fn open(
        spec: &::rbd::RbdSpec,
        params: &VolumeParams,
    ) -> Result<RbdVolume, VolumeError> {
        let address = spec.to_string();
        let err = |source| VolumeError::Rbd {
            address: address.clone(),
            source,
        };
        let mut opts = ::rbd::ClusterOptions::from_spec(spec);
        opts.op_timeout = params.op_timeout;
        let image = ::rbd::open(spec, &opts, params.read_only).map_err(err)?;
        if !image.is_read_only() {
            take_lock(&image).map_err(|source| VolumeError::Rbd {
                address: address.clone(),
                source,
            })?;
        }
        let raw_size = image.size().map_err(err)?;
        let object_size = image.object_size().map_err(err)?;
        tracing::info!(
            image = %image.path(),
            size = raw_size,
            object_size,
            read_only = image.is_read_only(),
            "RBD image opened"
        );
        Ok(RbdVolume {
            image: Arc::new(image),
            size: (raw_size - raw_size % SECTOR_SIZE).into(),
            object_size: u32::try_from(object_size).unwrap_or(0),
            max_iovecs: params.max_iovecs.clamp(1, IOV_MAX),
        })
    }

    pub(crate) fn size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Reads the image's size again (it was resized); returns it.
    pub(crate) fn refresh_size(&self) -> Result<u64, VolumeError> {
        let raw = self.image.size().map_err(rbd_err("rbd size", 0))?;
        let size = raw - raw % SECTOR_SIZE;
        self.size.store(size, std::sync::atomic::Ordering::Release);
        Ok(size)
    }

    pub(crate) fn io_sizes(&self) -> (u32, u32) {
        (0, self.object_size)
    }

    pub(crate) fn is_read_only(&self) -> bool {
        self.image.is_read_only()
    }

    pub(crate) fn image(&self) -> &Arc<::rbd::Image> {
        &self.image
    }

    /// librbd takes any alignment, up to IOV_MAX buffers per call.
    pub(crate) fn direct_ok(&self, slices: &[VolatileSlice<'_, ()>]) -> bool {
        slices.len() <= self.max_iovecs
    }

    pub(crate) fn read(
        &self,
        mut offset: u64,
        slices: &[VolatileSlice<'_, ()>],
    ) -> Result<(), VolumeError> {
        for batch in slices.chunks(self.max_iovecs) {
            let iov = iovecs(batch);
            let len: u64 = batch.iter().map(|s| s.len() as u64).sum();
            // SAFETY: the iovecs describe guest memory slices borrowed for this call,
            // writable and not otherwise accessed by this export meanwhile; `readv`
            // returns only after librbd completed the read.
            let n =
                unsafe { self.image.readv(&iov, offset) }.map_err(rbd_err("rbd read", offset))?;
            if n != len {
                return Err(VolumeError::Short {
                    op: "rbd read",
                    offset: offset + n,
                });
            }
            offset += len;
        }
        Ok(())
    }

    pub(crate) fn write(
        &self,
        mut offset: u64,
        slices: &[VolatileSlice<'_, ()>],
    ) -> Result<(), VolumeError> {
        for batch in slices.chunks(self.max_iovecs) {
            let iov = iovecs(batch);
            // SAFETY: the iovecs describe guest memory slices borrowed for this call;
            // `writev` returns only after librbd completed the write.
            unsafe { self.image.writev(&iov, offset) }.map_err(rbd_err("rbd write", offset))?;
            offset += batch.iter().map(|s| s.len() as u64).sum::<u64>();
        }
        Ok(())
    }

    pub(crate) fn flush(&self) -> Result<(), VolumeError> {
        self.image.flush().map_err(rbd_err("rbd flush", 0))
    }

    pub(crate) fn discard(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.image
            .discard(offset, len)
            .map_err(rbd_err("rbd discard", offset))
    }

    /// librbd deallocates whole objects of the range and zeroes the rest: `unmap` is
    /// what it does anyway.
    pub(crate) fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _unmap: bool,
    ) -> Result<(), VolumeError> {
        self.image
            .write_zeroes(offset, len)
            .map_err(rbd_err("rbd write zeroes", offset))
    }
}
