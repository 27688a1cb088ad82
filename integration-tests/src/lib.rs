//! Test infrastructure for vmblk: loop devices, a bootable test image, exports and real
//! QEMU guests.
//!
//! ```text
//!  ImageSpec::build() ──> TestImage (raw + qcow2, GPT/ESP/systemd-boot/ext4, cached)
//!          │
//!  Volume::new(4096) + PrepareVolume  (WriteRawImage | ManualBridgeRepair | ...)
//!          │
//!  QsdExport / CommandExport  ──socket──>  Guest::start(GuestParams)
//!                                             │ serial log
//!                                    GuestReport (VMBLK-CHECK lines)
//! ```
//!
//! Tests that create loop devices or guests hold [`loop_tests_lock`] for their whole
//! run. Everything the harness starts is killed by PID and removed on drop.

mod blkio;
mod ceph;
mod export;
mod fusefile;
mod guest;
mod image;
mod initramfs;
mod kernel;
mod lock;
mod loopdev;
mod lxd;
mod process;
mod report;
mod util;
mod vmblkd;
mod volume;
mod workload;

pub use blkio::{BlkioClient, BLKIO_TIMEOUT};
pub use ceph::{
    CephCluster, CEPH_CLI_TIMEOUT, CEPH_OSD_TIMEOUT, CEPH_POOL, CEPH_START_TIMEOUT,
    CEPH_TESTS_LOCK, OSD_BLOCK_BYTES,
};
pub use export::{
    CommandExport, CommandExportParams, Export, QsdDriver, QsdExport, QsdParams,
    EXPORT_READY_TIMEOUT,
};
pub use fusefile::{FuseControl, FuseFile, FuseStats, Mode, ReleaseOnDrop, FUSE_FILE_NAME};
pub use guest::{
    CommandResult, Guest, GuestDisk, GuestOutcome, GuestParams, DEFAULT_GUEST_TIMEOUT, MILESTONES,
    OVMF_CODE, OVMF_VARS,
};
pub use image::{
    copy_into, BootMode, GuestFile, ImageSpec, PartitionSpec, TestImage, DISK_GUID, ESP,
    IMAGE_BYTES, IMAGE_SECTOR_SIZE, PARTITIONS, ROOT, SCRATCH, SYSTEMD_BOOT_EFI,
};
pub use initramfs::{build_initramfs, resolve_modules, Initramfs, GUEST_MODULES, INIT_SCRIPT};
pub use kernel::{guest_kernel, GuestKernel, KERNEL_METAPACKAGE};
pub use lock::{loop_tests_lock, FileLock, LOOP_TESTS_LOCK};
pub use loopdev::LoopDevice;
pub use lxd::Lxd;
pub use process::ManagedProcess;
pub use report::{BootReport, Check, GuestReport};
pub use util::{cache_dir, run, sha256_file, sha256_hex, tail, target_dir, vmblk_bin, wait_until};
pub use vmblkd::{vmblkd_bin, Vmblkd};
pub use volume::{
    damage_with_direct_sgdisk, prepared_volume, unpacked_volume, vmblk_unpack, write_image,
    CommandPrepare, DirectSgdiskRepair, ManualBridgeRepair, PrepareVolume, Volume, WriteRawImage,
    DEFAULT_VOLUME_BYTES,
};
pub use workload::{
    check_blocks, io_lines, parse_io_line, pattern_block, shutdown_times, verify_digest, IO_BLOCK,
};
