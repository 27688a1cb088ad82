//! Loop devices with a chosen logical sector size, and the 512-byte *bridge* over 4K volumes.
//!
//! A VM image built for 512-byte sectors, written onto a drive formatted with 4096-byte
//! sectors, keeps its GPT at byte 512; every partition tool on the host looks for it at
//! byte 4096. The fix is to do partition work through a temporary loop device with 512-byte
//! sectors over the volume, then remove it. This crate provides that loop device:
//!
//! ```text
//!   AttachOptions ──► LoopDevice::attach ──► LoopDevice (RAII: detached on drop)
//!                                                 ▲
//!   Bridge::open(volume, 512, tag) ───────────────┘  labelled "vmblk-bridge:<pid>:…:<tag>"
//!   list_bridges() / cleanup_stale_bridges() ──► find bridges again by label, remove the
//!                                                 ones whose owner process died
//! ```
//!
//! * [`LoopDevice::attach`] binds a free loop device to a file or block device with
//!   `LOOP_CONFIGURE` (falling back to `LOOP_SET_FD` + `LOOP_SET_STATUS64` +
//!   `LOOP_SET_BLOCK_SIZE` on kernels before 5.8), checks the result with `BLKSSZGET`, and
//!   detaches again if any step fails. Concurrent callers that are handed the same free
//!   number retry with another.
//! * [`Bridge`] is a [`LoopDevice`] whose `lo_file_name` names its owner process and volume;
//!   a second bridge over the same volume is refused with [`Error::AlreadyBridged`].
//! * Loop devices are attached with autoclear by default, so a process killed with
//!   `SIGKILL` leaves nothing behind; [`cleanup_stale_bridges`] removes bridges left by a
//!   dead owner anyway (for example one attached without autoclear).
//!
//! ```no_run
//! # fn main() -> Result<(), loop_bridge::Error> {
//! use std::path::Path;
//! let bridge = loop_bridge::Bridge::open(Path::new("/dev/nvme0n1"), 512, "vm1-root")?;
//! // ... run partition tools on bridge.path() ...
//! bridge.close()?;
//! # Ok(()) }
//! ```
//!
//! Every call here needs `CAP_SYS_ADMIN` (root) and the kernel's loop driver.
//!
//! # Kernel behaviour this crate relies on
//!
//! * `LOOP_CTL_GET_FREE` may hand the same number to two callers; the loser's
//!   `LOOP_CONFIGURE` (or `LOOP_SET_FD`) fails with `EBUSY` and it tries a fresh number
//!   (bounded).
//! * `LOOP_CLR_FD` does not unbind a device that is still open: it marks it autoclear and the
//!   kernel unbinds it on last close. [`LoopDevice::detach`] therefore closes its own
//!   descriptor and waits (about 2 s at most) until the binding is gone, recognised by the
//!   disk sequence number in `/sys/block/loopN/diskseq`, which changes on every attach and
//!   detach, so a number reused at once by someone else is not mistaken for ours.
//! * `lo_file_name` is free text that the kernel stores as given; the real backing is in
//!   `/sys/block/loopN/loop/backing_file` ([`LoopStatus::backing_file`]). Bridges are
//!   matched to volumes by the device/inode numbers `LOOP_GET_STATUS64` reports, never by
//!   name.
//! * Root may open a read-only loop device for writing; the writes then fail.
//! * A 512-byte loop device over a 4096-byte device cannot use direct I/O.

mod bridge;
mod device;
mod error;
mod sys;
#[cfg(feature = "test-utils")]
pub mod testing;

pub use bridge::{
    cleanup_stale_bridges, cleanup_stale_bridges_where, encode_label, list_bridges, parse_label,
    Bridge, BridgeInfo, Owner, OwnerState, BRIDGE_LABEL_PREFIX,
};
pub use device::{
    bound_loop_devices, logical_block_size, AttachOptions, BackingId, LoopDevice, LoopStatus,
};
pub use error::Error;
