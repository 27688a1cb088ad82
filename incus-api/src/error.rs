//! What can go wrong talking to Incus or LXD.

use std::path::PathBuf;

/// An error of the Incus/LXD API client; the message names the call and what failed.
#[derive(Debug, thiserror::Error)]
pub enum IncusError {
    /// No socket at any of the known places.
    #[error("no Incus or LXD socket found (looked at {looked}); is the daemon running? pass --incus-socket")]
    NoSocket {
        /// The paths tried.
        looked: String,
    },
    /// The socket could not be connected.
    #[error("cannot connect to {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed (connection reset, malformed response).
    #[error("{method} {path}: HTTP exchange failed: {message}")]
    Http {
        /// Method.
        method: String,
        /// API path.
        path: String,
        /// What failed.
        message: String,
    },
    /// The daemon answered with an error.
    #[error("{method} {path}: {message} (HTTP {status})")]
    Api {
        /// Method.
        method: String,
        /// API path.
        path: String,
        /// HTTP status (or the API's error code).
        status: u16,
        /// The daemon's error message.
        message: String,
    },
    /// The response was not what the API documents.
    #[error("{method} {path}: unexpected response: {message}")]
    Decode {
        /// Method.
        method: String,
        /// API path.
        path: String,
        /// What did not fit.
        message: String,
    },
    /// A background operation ended in failure.
    #[error("operation {operation} failed: {message}")]
    Operation {
        /// The operation's path.
        operation: String,
        /// The daemon's error.
        message: String,
    },
    /// The event stream failed.
    #[error("event stream: {0}")]
    Events(String),
    /// A call took longer than allowed.
    #[error("{what}: no answer within {secs} s")]
    Timeout {
        /// The call.
        what: String,
        /// The bound.
        secs: u64,
    },
}

impl IncusError {
    /// Whether the daemon said the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, IncusError::Api { status: 404, .. })
    }
}
