//! Unpack VM images onto volumes of any logical sector size.
//!
//! ```text
//!  image file ──► source::open ──► ImageSource (raw / qcow2 / Incus tarball)
//!                                      │ extents, parallel read_extent
//!                                      ▼
//!  target (block device or file) ◄── copy (aligned, O_DIRECT, zeroing by BLKZEROOUT/punch)
//!        │
//!        ├─ logical block size == image's sector size ──► partition work on the target
//!        └─ otherwise ──► loop-bridge (512-byte loop over the target) ──► partition work
//!                                      │ repair (GPT backup to the end, PMBR, CRCs)
//!                                      ▼ verify (both headers, CRCs, libblkid probe)
//!                                   report (JSON-serialisable)
//! ```

pub mod copy;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod guest;
pub mod pack;
pub mod partition;
pub mod source;
mod sys;
pub mod target;
mod unpack;
pub mod verify;

pub use copy::{copy, CopyError, CopyOptions, CopyStats};
pub use guest::GuestReader;
pub use pack::{pack, Compression, PackError, PackOptions, PackReport};
pub use target::{Target, TargetError, TargetInfo, TargetKind, ZeroMethod};
pub use unpack::{
    inspect, repair, unpack, BridgeUsed, InspectReport, NoProgress, Progress, RepairCommandOptions,
    RepairCommandReport, TableWork, UnpackError, UnpackErrorKind, UnpackOptions, UnpackReport,
};
pub use verify::{verify, verify_file, PartitionProbe, VerifyError, VerifyReport};
