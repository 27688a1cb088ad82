//! Errors of the driver, and their one mapping to gRPC status codes.

use std::io;
use std::path::PathBuf;

use image_unpack::UnpackError;

/// Why a driver operation failed. [`Error::code`] is the gRPC code it maps to;
/// `From<Error> for tonic::Status` is the only place errors become statuses.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A name, size, path or option is not acceptable.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such pool, volume or image.
    #[error("{0}")]
    NotFound(String),
    /// A create was repeated with incompatible arguments.
    #[error("{0}")]
    AlreadyExists(String),
    /// The object is not in a state that allows the operation (e.g. attached).
    #[error("{0}")]
    FailedPrecondition(String),
    /// No space, quota or free device left.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Another operation on the same object is running.
    #[error("{0}")]
    Aborted(String),
    /// Unpacking, repairing or inspecting an image or volume failed.
    #[error("{step} {path}")]
    Unpack {
        /// The step: "unpacking image onto", "repairing", "inspecting".
        step: &'static str,
        /// The volume or image.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: Box<UnpackError>,
    },
    /// A file-system or device operation failed.
    #[error("{step} {path}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A worker task of the service died (a bug: it panicked).
    #[error("internal task failed: {0}")]
    Task(String),
    /// Starting or running an export failed.
    #[error("exporting {path}")]
    Export {
        /// The volume.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: anyhow::Error,
    },
}

/// Shorthand.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A closure mapping an `io::Error` of `step` on `path` to [`Error::Io`].
    pub fn io(step: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { step, path, source }
    }

    /// The gRPC code of this error.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Aborted(_) => Code::Aborted,
            _ if self.is_no_space() => Code::ResourceExhausted,
            // The image is corrupt, unsupported, or its table is not understood.
            Error::Unpack { source, .. } if matches!(source.exit_code(), 3 | 5) => {
                Code::InvalidArgument
            }
            Error::Unpack { .. } | Error::Io { .. } | Error::Export { .. } | Error::Task(_) => {
                Code::Internal
            }
        }
    }

    /// Whether some cause in the chain is `ENOSPC` or `EDQUOT`.
    pub fn is_no_space(&self) -> bool {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                if matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
                    return true;
                }
            }
            cur = e.source();
        }
        false
    }

    /// The message with every cause, "a: b: c".
    pub fn chain(&self) -> String {
        let mut s = self.to_string();
        let mut cur = std::error::Error::source(self);
        while let Some(e) = cur {
            s.push_str(": ");
            s.push_str(&e.to_string());
            cur = e.source();
        }
        s
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        let code = e.code();
        if matches!(code, tonic::Code::Internal) {
            tracing::error!(error = %e.chain(), "operation failed");
        }
        tonic::Status::new(code, e.chain())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_anywhere_in_the_chain_is_resource_exhausted() {
        let e = Error::Io {
            step: "writing",
            path: "/x".into(),
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn other_io_errors_are_internal() {
        let e = Error::Io {
            step: "writing",
            path: "/x".into(),
            source: io::Error::from_raw_os_error(libc::EIO),
        };
        assert_eq!(e.code(), tonic::Code::Internal);
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Internal);
    }
}
