//! The crate's error type.

use std::io;
use std::path::PathBuf;

/// What went wrong, named by the step that failed.
///
/// The kernel's answer, where there is one, is the [`source`](std::error::Error::source);
/// the message carries the context (paths, loop number, sector size).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The options were rejected before anything was attached.
    #[error("invalid options for a loop device over {backing}: {reason}")]
    InvalidOptions {
        /// Backing file or device the caller asked for.
        backing: PathBuf,
        /// Why the options were refused.
        reason: String,
    },
    /// The backing file or device could not be opened.
    #[error("cannot open backing {backing} ({mode})")]
    OpenBacking {
        /// Backing file or device.
        backing: PathBuf,
        /// `read-only` or `read-write`.
        mode: &'static str,
        /// Error from `open(2)`.
        #[source]
        source: io::Error,
    },
    /// A volume could not be locked while its bridge was being set up.
    #[error("cannot lock volume {volume} for bridge setup")]
    LockVolume {
        /// The volume.
        volume: PathBuf,
        /// Error from `flock(2)`, `EWOULDBLOCK` after the wait timed out.
        #[source]
        source: io::Error,
    },
    /// `/dev/loop-control` could not be opened.
    #[error("cannot open {path}")]
    OpenControl {
        /// Usually `/dev/loop-control`.
        path: PathBuf,
        /// Error from `open(2)`.
        #[source]
        source: io::Error,
    },
    /// `LOOP_CTL_GET_FREE` failed.
    #[error("LOOP_CTL_GET_FREE failed")]
    GetFree {
        /// Error from the ioctl.
        #[source]
        source: io::Error,
    },
    /// A loop device node could not be opened.
    #[error("cannot open loop device {device}")]
    OpenDevice {
        /// `/dev/loopN`.
        device: PathBuf,
        /// Error from `open(2)`.
        #[source]
        source: io::Error,
    },
    /// Every free loop device was taken by a concurrent attach before we could bind it.
    #[error("no loop device could be bound to {backing} after {attempts} attempts: each was taken concurrently")]
    Exhausted {
        /// Backing file or device.
        backing: PathBuf,
        /// How many loop numbers were tried.
        attempts: u32,
        /// The last `EBUSY`.
        #[source]
        source: io::Error,
    },
    /// `LOOP_CONFIGURE` failed.
    #[error("LOOP_CONFIGURE of {device} over {backing} with {block_size}-byte sectors failed")]
    Configure {
        /// `/dev/loopN`.
        device: PathBuf,
        /// Backing file or device.
        backing: PathBuf,
        /// Requested logical block size.
        block_size: u32,
        /// Error from the ioctl.
        #[source]
        source: io::Error,
    },
    /// `LOOP_SET_FD` failed (setup on kernels without `LOOP_CONFIGURE`).
    #[error("LOOP_SET_FD of {device} to {backing} failed")]
    SetFd {
        /// `/dev/loopN`.
        device: PathBuf,
        /// Backing file or device.
        backing: PathBuf,
        /// Error from the ioctl.
        #[source]
        source: io::Error,
    },
    /// `LOOP_SET_STATUS64` failed (setup on kernels without `LOOP_CONFIGURE`).
    #[error("LOOP_SET_STATUS64 on {device} failed")]
    SetStatus {
        /// `/dev/loopN`.
        device: PathBuf,
        /// Error from the ioctl.
        #[source]
        source: io::Error,
    },
    /// `LOOP_SET_BLOCK_SIZE` failed (setup on kernels without `LOOP_CONFIGURE`).
    #[error("LOOP_SET_BLOCK_SIZE {block_size} on {device} failed")]
    SetBlockSize {
        /// `/dev/loopN`.
        device: PathBuf,
        /// Requested logical block size.
        block_size: u32,
        /// Error from the ioctl.
        #[source]
        source: io::Error,
    },
    /// `LOOP_SET_DIRECT_IO` failed (setup on kernels without `LOOP_CONFIGURE`).
    #[error("LOOP_SET_DIRECT_IO on {device} failed")]
    SetDirectIo {
        /// `/dev/loopN`.
        device: PathBuf,
        /// Error from the ioctl.
        #[source]
        source: io::Error,
    },
    /// Reading back the state of a loop device failed.
    #[error("cannot read {what} of {device}")]
    Query {
        /// `/dev/loopN` or a sysfs path.
        device: PathBuf,
        /// What was being read (`BLKSSZGET`, `LOOP_GET_STATUS64`, ...).
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The device was bound but does not have the requested properties.
    #[error("{device} over {backing} is not what was requested: {reason}")]
    Verify {
        /// `/dev/loopN`.
        device: PathBuf,
        /// Backing file or device.
        backing: PathBuf,
        /// The mismatch.
        reason: String,
    },
    /// Detaching (`LOOP_CLR_FD`, then waiting for the kernel to unbind) failed.
    #[error("cannot detach {device}")]
    Detach {
        /// `/dev/loopN`.
        device: PathBuf,
        /// Error from the ioctl, or `EBUSY` if the device stayed bound because another
        /// process holds it open (the kernel unbinds it when that process closes it).
        #[source]
        source: io::Error,
    },
    /// The volume already has a vmblk bridge.
    #[error("{volume} already has a bridge: {existing} (label {label:?}, owner {owner})")]
    AlreadyBridged {
        /// The volume a bridge was asked for.
        volume: PathBuf,
        /// The loop device already bridging it.
        existing: PathBuf,
        /// Its label.
        label: String,
        /// Whether its owner is still running (`running`, `dead: run cleanup_stale_bridges`,
        /// or `unknown`).
        owner: &'static str,
    },
    /// Listing loop devices in sysfs failed.
    #[error("cannot list loop devices in {path}")]
    List {
        /// Usually `/sys/block`.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// True when the failure comes from someone else using the device or volume right now
    /// (`EBUSY`, a held lock, an existing bridge, every loop number taken concurrently), so
    /// that retrying later may succeed.
    pub fn is_busy(&self) -> bool {
        match self {
            Error::Exhausted { .. } | Error::AlreadyBridged { .. } => true,
            Error::LockVolume { source, .. } => source.raw_os_error() == Some(libc::EWOULDBLOCK),
            other => other.errno() == Some(libc::EBUSY),
        }
    }

    /// True when the kernel does not support what was asked (no loop driver, an unknown
    /// ioctl, a sector size it rejects).
    pub fn is_unsupported(&self) -> bool {
        match self {
            Error::OpenControl { source, .. } => source.kind() == io::ErrorKind::NotFound,
            Error::Configure { source, .. }
            | Error::SetBlockSize { source, .. }
            | Error::SetDirectIo { source, .. } => {
                matches!(source.raw_os_error(), Some(libc::EINVAL | libc::ENOTTY))
            }
            _ => false,
        }
    }

    fn errno(&self) -> Option<i32> {
        let source = match self {
            Error::OpenBacking { source, .. }
            | Error::LockVolume { source, .. }
            | Error::OpenControl { source, .. }
            | Error::GetFree { source }
            | Error::OpenDevice { source, .. }
            | Error::Exhausted { source, .. }
            | Error::Configure { source, .. }
            | Error::SetFd { source, .. }
            | Error::SetStatus { source, .. }
            | Error::SetBlockSize { source, .. }
            | Error::SetDirectIo { source, .. }
            | Error::Query { source, .. }
            | Error::Detach { source, .. }
            | Error::List { source, .. } => source,
            Error::InvalidOptions { .. } | Error::Verify { .. } | Error::AlreadyBridged { .. } => {
                return None
            }
        };
        source.raw_os_error()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_policy_follows_the_errno() {
        let busy = Error::Detach {
            device: "/dev/loop3".into(),
            source: io::Error::from_raw_os_error(libc::EBUSY),
        };
        assert!(busy.is_busy());
        let gone = Error::Detach {
            device: "/dev/loop3".into(),
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert!(!gone.is_busy());
        let bridged = Error::AlreadyBridged {
            volume: "/dev/nvme0n1".into(),
            existing: "/dev/loop4".into(),
            label: "vmblk-bridge:1:2:3:x".into(),
            owner: "running",
        };
        assert!(bridged.is_busy());
        assert!(bridged.to_string().contains("/dev/loop4"));
    }

    #[test]
    fn message_carries_context_and_source_is_separate() {
        let e = Error::Configure {
            device: "/dev/loop7".into(),
            backing: "/tmp/vol".into(),
            block_size: 4096,
            source: io::Error::from_raw_os_error(libc::EINVAL),
        };
        let msg = e.to_string();
        assert!(msg.contains("/dev/loop7") && msg.contains("/tmp/vol") && msg.contains("4096"));
        assert!(!msg.contains("Invalid argument"));
        assert!(std::error::Error::source(&e).is_some());
        assert!(e.is_unsupported());
    }
}
