//! RBD images (`rbd_image_t`): create, open, size, resize, remove, and I/O, synchronous
//! and asynchronous.

use std::ptr;
use std::sync::Arc;

use crate::aio::{submit, Completion, Wait};
use crate::cluster::IoCtx;
use crate::error::{check, cstring, RbdError};
use crate::ffi;

/// Largest discard or write-zeroes librbd takes in one call (its results are `int`s:
/// lengths past INT_MAX are refused).
const MAX_RANGE: u64 = 1 << 30;

/// `[offset, offset + len)` in pieces of at most [`MAX_RANGE`] bytes.
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset.saturating_add(len);
    (offset..end)
        .step_by(MAX_RANGE as usize)
        .map(move |at| (at, MAX_RANGE.min(end - at)))
}

/// An open RBD image. Keeps its pool context (and so its cluster) open.
#[derive(Debug)]
pub struct Image {
    handle: ffi::rbd_image_t,
    ioctx: Arc<IoCtx>,
    /// `pool[/namespace]/image[@snap]`, for messages.
    path: String,
    read_only: bool,
}

// SAFETY: librbd image handles may be used from several threads at once for I/O (librbd
// serialises internally; QEMU's and SPDK's RBD drivers issue I/O from several threads);
// the handle is closed only in Drop.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Image {
    fn path_of(ioctx: &IoCtx, name: &str, snapshot: Option<&str>) -> String {
        let mut p = format!("{}/{name}", ioctx.describe().trim_start_matches("pool "));
        if let Some(s) = snapshot {
            p.push('@');
            p.push_str(s);
        }
        p.replace(" namespace ", "/")
    }

    /// Creates image `name` of `size` bytes (format 2) with the features `rbd create`
    /// gives by default ([`crate::DEFAULT_FEATURES`]: layering, exclusive-lock,
    /// object-map, fast-diff, deep-flatten), whatever `rbd_default_features` says: its
    /// exports hold the exclusive lock.
    pub fn create(ioctx: &Arc<IoCtx>, name: &str, size: u64) -> Result<(), RbdError> {
        let path = Self::path_of(ioctx, name, None);
        let c_name = cstring(name, || format!("image name {name:?}"))?;
        let mut order: libc::c_int = 0;
        // SAFETY: the context is open; the name is NUL-terminated; `order` is a valid
        // in/out pointer (0: the default object size).
        let r = unsafe {
            ffi::rbd_create2(
                ioctx.handle,
                c_name.as_ptr(),
                size,
                crate::DEFAULT_FEATURES,
                &mut order,
            )
        };
        check(i64::from(r), "create RBD image", || path)?;
        Ok(())
    }

    /// Removes image `name` (it must have no snapshots and no watchers).
    pub fn remove(ioctx: &Arc<IoCtx>, name: &str) -> Result<(), RbdError> {
        let path = Self::path_of(ioctx, name, None);
        let c_name = cstring(name, || format!("image name {name:?}"))?;
        // SAFETY: the context is open; the name is NUL-terminated for the call.
        let r = unsafe { ffi::rbd_remove(ioctx.handle, c_name.as_ptr()) };
        check(i64::from(r), "remove RBD image", || path)?;
        Ok(())
    }

    /// Opens image `name`, at `snapshot` if given (always read-only), read-only if asked.
    /// Blocking: it talks to the cluster.
    pub fn open(
        ioctx: &Arc<IoCtx>,
        name: &str,
        snapshot: Option<&str>,
        read_only: bool,
    ) -> Result<Image, RbdError> {
        let path = Self::path_of(ioctx, name, snapshot);
        let c_name = cstring(name, || format!("image name {name:?}"))?;
        let c_snap = snapshot
            .map(|s| cstring(s, || format!("snapshot name {s:?}")))
            .transpose()?;
        let snap_ptr = c_snap.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        let read_only = read_only || snapshot.is_some();
        let mut handle: ffi::rbd_image_t = ptr::null_mut();
        // SAFETY: the context is open; the strings are NUL-terminated (or NULL for no
        // snapshot) for the call; `handle` is a valid out-pointer.
        let r = unsafe {
            if read_only {
                ffi::rbd_open_read_only(ioctx.handle, c_name.as_ptr(), &mut handle, snap_ptr)
            } else {
                ffi::rbd_open(ioctx.handle, c_name.as_ptr(), &mut handle, snap_ptr)
            }
        };
        check(i64::from(r), "open RBD image", || path.clone())?;
        Ok(Image {
            handle,
            ioctx: ioctx.clone(),
            path,
            read_only,
        })
    }

    /// The librbd handle, for this crate's other modules.
    pub(crate) fn handle(&self) -> ffi::rbd_image_t {
        self.handle
    }

    /// `pool[/namespace]/image[@snap]`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Opened read-only (or at a snapshot).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The pool context the image was opened in.
    pub fn ioctx(&self) -> &Arc<IoCtx> {
        &self.ioctx
    }

    /// Size in bytes.
    pub fn size(&self) -> Result<u64, RbdError> {
        let mut size = 0u64;
        // SAFETY: the image is open; `size` is a valid out-pointer.
        let r = unsafe { ffi::rbd_get_size(self.handle, &mut size) };
        check(i64::from(r), "read the size of RBD image", || {
            self.path.clone()
        })?;
        Ok(size)
    }

    /// Size of the image's RADOS objects in bytes (its unit of allocation).
    pub fn object_size(&self) -> Result<u64, RbdError> {
        // SAFETY: rbd_image_info_t is plain integers and byte arrays: all-zero is valid.
        let mut info: ffi::rbd_image_info_t = unsafe { std::mem::zeroed() };
        // SAFETY: the image is open; `info` is a writable struct of the size passed.
        let r = unsafe {
            ffi::rbd_stat(
                self.handle,
                &mut info,
                std::mem::size_of::<ffi::rbd_image_info_t>(),
            )
        };
        check(i64::from(r), "stat RBD image", || self.path.clone())?;
        Ok(info.obj_size)
    }

    /// Grows (or shrinks) the image to `size` bytes.
    pub fn resize(&self, size: u64) -> Result<(), RbdError> {
        // SAFETY: the image is open.
        let r = unsafe { ffi::rbd_resize(self.handle, size) };
        check(i64::from(r), "resize RBD image", || self.path.clone())?;
        Ok(())
    }

    /// The image's feature bits (`RBD_FEATURE_*`).
    pub fn features(&self) -> Result<u64, RbdError> {
        let mut f = 0u64;
        // SAFETY: the image is open; `f` is a valid out-pointer.
        let r = unsafe { ffi::rbd_get_features(self.handle, &mut f) };
        check(i64::from(r), "read the features of RBD image", || {
            self.path.clone()
        })?;
        Ok(f)
    }

    /// Reads up to `buf.len()` bytes at `offset`; fewer only at the end of the image.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize, RbdError> {
        // SAFETY: the image is open; `buf` is writable for its length for the call.
        let r = unsafe { ffi::rbd_read(self.handle, offset, buf.len(), buf.as_mut_ptr().cast()) };
        let n = check(r as i64, "read RBD image", || {
            format!("{} at {offset}", self.path)
        })?;
        Ok(n as usize)
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), RbdError> {
        // SAFETY: the image is open; `buf` is readable for its length for the call.
        let r = unsafe { ffi::rbd_write(self.handle, offset, buf.len(), buf.as_ptr().cast()) };
        let n = check(r as i64, "write RBD image", || {
            format!("{} at {offset}", self.path)
        })?;
        if n as usize != buf.len() {
            return Err(RbdError::Call {
                op: "write RBD image",
                what: format!("{} at {offset}: {n} of {} bytes", self.path, buf.len()),
                source: std::io::Error::from(std::io::ErrorKind::WriteZero),
            });
        }
        Ok(())
    }

    /// Deallocates `[offset, offset + len)`: reads back as zeros.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), RbdError> {
        for (at, n) in pieces(offset, len) {
            // SAFETY: the image is open.
            let r = unsafe { ffi::rbd_discard(self.handle, at, n) };
            check(i64::from(r), "discard RBD image", || {
                format!("{} at {at}+{n}", self.path)
            })?;
        }
        Ok(())
    }

    /// Zeroes `[offset, offset + len)` (deallocating where whole objects are covered).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), RbdError> {
        for (at, n) in pieces(offset, len) {
            // SAFETY: the image is open.
            let r = unsafe { ffi::rbd_write_zeroes(self.handle, at, n as usize, 0, 0) };
            check(r as i64, "zero RBD image", || {
                format!("{} at {at}+{n}", self.path)
            })?;
        }
        Ok(())
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<(), RbdError> {
        // SAFETY: the image is open.
        let r = unsafe { ffi::rbd_flush(self.handle) };
        check(i64::from(r), "flush RBD image", || self.path.clone())?;
        Ok(())
    }

    /// Starts a vectored read of `iov` at `offset`; its result goes to `done`.
    ///
    /// # Safety
    /// Every buffer in `iov` must stay valid and writable, and the `iov` array itself
    /// readable, until `done`'s sink has been called (librbd reads the array and fills
    /// the buffers from its own threads). Nothing else may access the buffers meanwhile.
    pub unsafe fn aio_readv(
        &self,
        iov: &[libc::iovec],
        offset: u64,
        done: Completion,
    ) -> Result<(), RbdError> {
        let cnt = libc::c_int::try_from(iov.len()).unwrap_or(libc::c_int::MAX);
        submit(
            done,
            "read RBD image",
            || format!("{} at {offset}", self.path),
            |c| {
                // SAFETY: the caller keeps `iov` and its buffers valid until the completion.
                unsafe { ffi::rbd_aio_readv(self.handle, iov.as_ptr(), cnt, offset, c) }
            },
        )
    }

    /// Starts a vectored write of `iov` at `offset`; its result (0 on success, not a
    /// byte count) goes to `done`.
    ///
    /// # Safety
    /// Every buffer in `iov` must stay valid and readable, and the `iov` array itself
    /// readable, until `done`'s sink has been called.
    pub unsafe fn aio_writev(
        &self,
        iov: &[libc::iovec],
        offset: u64,
        done: Completion,
    ) -> Result<(), RbdError> {
        let cnt = libc::c_int::try_from(iov.len()).unwrap_or(libc::c_int::MAX);
        submit(
            done,
            "write RBD image",
            || format!("{} at {offset}", self.path),
            |c| {
                // SAFETY: the caller keeps `iov` and its buffers valid until the completion.
                unsafe { ffi::rbd_aio_writev(self.handle, iov.as_ptr(), cnt, offset, c) }
            },
        )
    }

    /// Starts a discard; its result goes to `done`.
    pub fn aio_discard(&self, offset: u64, len: u64, done: Completion) -> Result<(), RbdError> {
        submit(
            done,
            "discard RBD image",
            || format!("{} at {offset}+{len}", self.path),
            |c| {
                // SAFETY: the image is open; no buffers are involved.
                unsafe { ffi::rbd_aio_discard(self.handle, offset, len, c) }
            },
        )
    }

    /// Starts a write-zeroes; its result goes to `done`.
    pub fn aio_write_zeroes(
        &self,
        offset: u64,
        len: u64,
        done: Completion,
    ) -> Result<(), RbdError> {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        submit(
            done,
            "zero RBD image",
            || format!("{} at {offset}+{len}", self.path),
            |c| {
                // SAFETY: the image is open; no buffers are involved.
                unsafe { ffi::rbd_aio_write_zeroes(self.handle, offset, len, c, 0, 0) }
            },
        )
    }

    /// Starts a flush; its result goes to `done`.
    pub fn aio_flush(&self, done: Completion) -> Result<(), RbdError> {
        submit(
            done,
            "flush RBD image",
            || self.path.clone(),
            |c| {
                // SAFETY: the image is open.
                unsafe { ffi::rbd_aio_flush(self.handle, c) }
            },
        )
    }

    /// A vectored read that waits for its result: bytes read.
    ///
    /// # Safety
    /// Every buffer in `iov` must be valid and writable for the call, and not accessed by
    /// anything else meanwhile.
    pub unsafe fn readv(&self, iov: &[libc::iovec], offset: u64) -> Result<u64, RbdError> {
        let wait = Arc::new(Wait::default());
        // SAFETY: this call does not return before the completion: the caller's buffers
        // outlive it.
        unsafe { self.aio_readv(iov, offset, Completion::new(wait.clone(), 0))? };
        check(wait.wait(), "read RBD image", || {
            format!("{} at {offset}", self.path)
        })
    }

    /// A vectored write that waits for its result.
    ///
    /// # Safety
    /// Every buffer in `iov` must be valid and readable for the call.
    pub unsafe fn writev(&self, iov: &[libc::iovec], offset: u64) -> Result<(), RbdError> {
        let wait = Arc::new(Wait::default());
        // SAFETY: this call does not return before the completion: the caller's buffers
        // outlive it.
        unsafe { self.aio_writev(iov, offset, Completion::new(wait.clone(), 0))? };
        check(wait.wait(), "write RBD image", || {
            format!("{} at {offset}", self.path)
        })?;
        Ok(())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open*; closed once. rbd_close waits for the image's
        // operations in flight: owners keep an Image (through an Arc) until theirs ended.
        let r = unsafe { ffi::rbd_close(self.handle) };
        if r < 0 {
            tracing::warn!(image = %self.path, errno = -r, "closing RBD image failed");
        }
    }
}

/// `Read + Write + Seek` over an image, for code written against files (partition table
/// repair and inspection). Reads stop at the end of the image; writes past it fail.
#[derive(Debug)]
pub struct Cursor<'a> {
    image: &'a Image,
    pos: u64,
    size: u64,
}

impl Image {
    /// A cursor at offset 0 (the image's size read once, now).
    pub fn cursor(&self) -> Result<Cursor<'_>, RbdError> {
        Ok(Cursor {
            image: self,
            pos: 0,
            size: self.size()?,
        })
    }
}

fn to_io(e: RbdError) -> std::io::Error {
    match e.errno() {
        Some(errno) => std::io::Error::from_raw_os_error(errno),
        None => std::io::Error::other(e.to_string()),
    }
}

impl std::io::Read for Cursor<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.size.saturating_sub(self.pos);
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if n == 0 {
            return Ok(0);
        }
        let got = self.image.read_at(&mut buf[..n], self.pos).map_err(to_io)?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl std::io::Write for Cursor<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.pos.saturating_add(buf.len() as u64) > self.size {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.image.write_at(buf, self.pos).map_err(to_io)?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.image.flush().map_err(to_io)
    }
}

impl std::io::Seek for Cursor<'_> {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        let pos = match to {
            std::io::SeekFrom::Start(p) => Some(p),
            std::io::SeekFrom::End(d) => self.size.checked_add_signed(d),
            std::io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok(self.pos)
    }
}
