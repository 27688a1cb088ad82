//! The exclusive lock of an image and fencing: no two writers.
//!
//! librbd's exclusive-lock feature is cooperative by default: a second client that
//! writes asks the owner to hand the lock over, and it does. An image taken with
//! [`Image::lock_exclusive`] is held instead: another client's writes fail (EROFS) and
//! its own `lock_exclusive` fails (EBUSY) until the holder closes the image. A holder
//! that died is removed with [`Image::break_lock`], which blocklists its client address
//! in the cluster, so a late write of the old holder is refused by the OSDs.

use std::ffi::CStr;
use std::ptr;

use crate::error::{check, cstring, RbdError};
use crate::ffi;
use crate::image::Image;

/// At most this many lock owners are listed (an exclusive lock has one).
const MAX_OWNERS: usize = 16;

impl Image {
    /// Takes the image's exclusive lock and keeps it until the image is closed. Fails
    /// with EBUSY (or EROFS) when another client holds it.
    pub fn lock_exclusive(&self) -> Result<(), RbdError> {
        // SAFETY: the image is open.
        let r = unsafe {
            ffi::rbd_lock_acquire(self.handle(), ffi::rbd_lock_mode_t_RBD_LOCK_MODE_EXCLUSIVE)
        };
        check(i64::from(r), "take the exclusive lock of RBD image", || {
            self.path().to_owned()
        })?;
        Ok(())
    }

    /// The clients holding the image's lock (`client.ID` addresses as librbd names them).
    pub fn lock_owners(&self) -> Result<Vec<String>, RbdError> {
        let mut mode: ffi::rbd_lock_mode_t = 0;
        let mut owners: [*mut libc::c_char; MAX_OWNERS] = [ptr::null_mut(); MAX_OWNERS];
        let mut n = MAX_OWNERS;
        // SAFETY: the image is open; `owners` has room for `n` pointers, which librbd
        // fills with strings it allocates and `rbd_lock_get_owners_cleanup` frees.
        let r = unsafe {
            ffi::rbd_lock_get_owners(self.handle(), &mut mode, owners.as_mut_ptr(), &mut n)
        };
        // ENOENT: nobody holds it; EINVAL: the image has no exclusive-lock feature.
        if r == -libc::ENOENT || r == -libc::EINVAL {
            return Ok(Vec::new());
        }
        check(i64::from(r), "list the lock owners of RBD image", || {
            self.path().to_owned()
        })?;
        let n = n.min(MAX_OWNERS);
        let list = owners[..n]
            .iter()
            .filter(|p| !p.is_null())
            // SAFETY: librbd set the first `n` entries to NUL-terminated strings.
            .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
            .collect();
        // SAFETY: the first `n` entries came from rbd_lock_get_owners; freed once.
        unsafe { ffi::rbd_lock_get_owners_cleanup(owners.as_mut_ptr(), n) };
        Ok(list)
    }

    /// Breaks the exclusive lock held by `owner` (from [`Image::lock_owners`]); librbd
    /// blocklists the owner's client address first, so its later writes are refused.
    pub fn break_lock(&self, owner: &str) -> Result<(), RbdError> {
        let c_owner = cstring(owner, || format!("lock owner {owner:?}"))?;
        // SAFETY: the image is open; the owner string is NUL-terminated for the call.
        let r = unsafe {
            ffi::rbd_lock_break(
                self.handle(),
                ffi::rbd_lock_mode_t_RBD_LOCK_MODE_EXCLUSIVE,
                c_owner.as_ptr(),
            )
        };
        // The holder let go meanwhile: nothing to break.
        if r == -libc::ENOENT {
            return Ok(());
        }
        check(i64::from(r), "break the lock of RBD image", || {
            format!("{} held by {owner}", self.path())
        })?;
        Ok(())
    }

    /// Whether this client holds the image's exclusive lock.
    pub fn is_lock_owner(&self) -> Result<bool, RbdError> {
        let mut owner: libc::c_int = 0;
        // SAFETY: the image is open; `owner` is a valid out-pointer.
        let r = unsafe { ffi::rbd_is_exclusive_lock_owner(self.handle(), &mut owner) };
        check(i64::from(r), "ask for the lock of RBD image", || {
            self.path().to_owned()
        })?;
        Ok(owner != 0)
    }
}
