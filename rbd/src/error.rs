//! Errors of librados and librbd calls, naming the call and what it was about.

use std::io;

use crate::spec::SpecError;

/// A failed librados/librbd call.
#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    /// The call returned a negative errno.
    #[error("{op} {what}: {source}")]
    Call {
        /// What was attempted ("connect to the Ceph cluster", "open RBD image", ...).
        op: &'static str,
        /// What it was attempted on (a pool, an image path, a conf file).
        what: String,
        #[source]
        source: io::Error,
    },
    /// A name or option holds a NUL byte, which C strings cannot carry.
    #[error("{what} contains a NUL byte")]
    Nul { what: String },
    #[error(transparent)]
    Spec(#[from] SpecError),
}

impl RbdError {
    /// The errno of a failed call.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RbdError::Call { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// Whether the pool, image or snapshot does not exist.
    pub fn is_not_found(&self) -> bool {
        self.errno() == Some(libc::ENOENT)
    }

    /// Whether the cluster did not answer in time.
    pub fn is_timeout(&self) -> bool {
        self.errno() == Some(libc::ETIMEDOUT)
    }
}

/// `Ok(n)` for a non-negative return value, the errno otherwise.
pub(crate) fn check(
    ret: i64,
    op: &'static str,
    what: impl FnOnce() -> String,
) -> Result<u64, RbdError> {
    if ret < 0 {
        let errno = i32::try_from(-ret).unwrap_or(libc::EIO);
        Err(RbdError::Call {
            op,
            what: what(),
            source: io::Error::from_raw_os_error(errno),
        })
    } else {
        Ok(ret.unsigned_abs())
    }
}

/// A C string of `s`, or an error naming `what`.
pub(crate) fn cstring(
    s: &str,
    what: impl FnOnce() -> String,
) -> Result<std::ffi::CString, RbdError> {
    std::ffi::CString::new(s).map_err(|_| RbdError::Nul { what: what() })
}
