//! Image metadata (`rbd image-meta`): small key/value strings stored with the image in the
//! cluster, where every host that opens the pool reads them.

use crate::error::{check, cstring, RbdError};
use crate::ffi;
use crate::image::Image;

/// Largest value read back.
const MAX_VALUE: usize = 64 * 1024;

impl Image {
    /// The value of `key`, or `None` if the image has no such key.
    pub fn metadata_get(&self, key: &str) -> Result<Option<String>, RbdError> {
        let c_key = cstring(key, || format!("metadata key {key:?}"))?;
        let mut len: usize = 4096;
        loop {
            let mut buf = vec![0u8; len];
            // SAFETY: the image is open; `buf` is writable for `len` bytes and librbd
            // writes at most that many (or says how many it needs, in `len`).
            let r = unsafe {
                ffi::rbd_metadata_get(
                    self.handle(),
                    c_key.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    &mut len,
                )
            };
            match r {
                r if r == -libc::ENOENT => return Ok(None),
                r if r == -libc::ERANGE && len > buf.len() && len <= MAX_VALUE => continue,
                r => {
                    check(i64::from(r), "read metadata of RBD image", || {
                        format!("{} key {key}", self.path())
                    })?;
                }
            }
            let end = buf
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(len.min(buf.len()));
            buf.truncate(end);
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
    }

    /// Sets `key` to `value`.
    pub fn metadata_set(&self, key: &str, value: &str) -> Result<(), RbdError> {
        let c_key = cstring(key, || format!("metadata key {key:?}"))?;
        let c_value = cstring(value, || format!("value of metadata key {key}"))?;
        // SAFETY: the image is open; both strings are NUL-terminated for the call.
        let r = unsafe { ffi::rbd_metadata_set(self.handle(), c_key.as_ptr(), c_value.as_ptr()) };
        check(i64::from(r), "write metadata of RBD image", || {
            format!("{} key {key}", self.path())
        })?;
        Ok(())
    }

    /// Removes `key` (absent is fine).
    pub fn metadata_remove(&self, key: &str) -> Result<(), RbdError> {
        let c_key = cstring(key, || format!("metadata key {key:?}"))?;
        // SAFETY: the image is open; the key is NUL-terminated for the call.
        let r = unsafe { ffi::rbd_metadata_remove(self.handle(), c_key.as_ptr()) };
        if r == -libc::ENOENT {
            return Ok(());
        }
        check(i64::from(r), "remove metadata of RBD image", || {
            format!("{} key {key}", self.path())
        })?;
        Ok(())
    }
}
