//! Volumes: a sparse file behind a loop device with a chosen sector size (512 for the
//! control, 4096 to simulate a 4K NVMe), and the steps that put an image on them.
//!
//! "Preparing" a volume is pluggable ([`PrepareVolume`]) so the manual steps used today
//! can be swapped for `vmblk unpack` / `vmblk repair` without touching the tests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::image::TestImage;
use crate::loopdev::LoopDevice;
use crate::util::{run, run_unchecked};

/// Default volume size: larger than the image, so the backup GPT must be moved.
pub const DEFAULT_VOLUME_BYTES: u64 = 192 << 20;

/// A loop device over a sparse file in a temporary directory.
#[derive(Debug)]
pub struct Volume {
    // Field order: the device is detached before the directory is removed.
    device: LoopDevice,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Volume {
    /// A zeroed volume of `size_bytes` with `sector_size`-byte logical sectors.
    pub fn new(sector_size: u32, size_bytes: u64) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("vmblk-volume-")
            .tempdir()
            .context("creating volume directory")?;
        let file = dir.path().join("volume.img");
        std::fs::File::create(&file)?.set_len(size_bytes)?;
        let device = LoopDevice::attach(&file, sector_size)?;
        Ok(Self {
            device,
            file,
            _dir: dir,
        })
    }

    /// The block device (`/dev/loopN`).
    pub fn device(&self) -> &Path {
        self.device.path()
    }

    /// The loop device handle.
    pub fn loop_device(&self) -> &LoopDevice {
        &self.device
    }

    /// The backing file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Logical sector size of the device.
    pub fn sector_size(&self) -> u32 {
        self.device.sector_size()
    }
}

/// A step that puts a test image onto a volume (what `vmblk unpack` will do).
pub trait PrepareVolume: std::fmt::Debug {
    /// Human-readable name of the step.
    fn describe(&self) -> String;
    /// Runs it; returns the tool output worth keeping as evidence.
    fn prepare(&self, image: &TestImage, volume: &Volume) -> Result<String>;
}

/// Writes the raw image byte for byte onto the device, like `dd`.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteRawImage;

impl PrepareVolume for WriteRawImage {
    fn describe(&self) -> String {
        "raw image written byte for byte".into()
    }

    fn prepare(&self, image: &TestImage, volume: &Volume) -> Result<String> {
        write_image(&image.raw, volume.device())?;
        Ok(String::new())
    }
}

/// Writes the image, then repairs the GPT the way Incus does on 4K drives: a temporary
/// 512-byte loop device stacked on the volume, `sgdisk -e` on that, bridge removed.
#[derive(Debug, Clone, Copy, Default)]
pub struct ManualBridgeRepair;

impl PrepareVolume for ManualBridgeRepair {
    fn describe(&self) -> String {
        "raw image + `sgdisk -e` through a 512-byte loop bridge".into()
    }

    fn prepare(&self, image: &TestImage, volume: &Volume) -> Result<String> {
        write_image(&image.raw, volume.device())?;
        let bridge = LoopDevice::attach(volume.device(), 512)
            .context("stacking a 512-byte bridge on the volume")?;
        let out = run(Command::new("sgdisk").arg("-e").arg(bridge.path()))
            .context("sgdisk -e on the bridge")?;
        let verify = run(Command::new("sgdisk").arg("--verify").arg(bridge.path()))
            .context("sgdisk --verify on the bridge")?;
        bridge.detach()?;
        Ok(format!("{out}{verify}"))
    }
}

/// The incident: the image written to a 4K device and "repaired" with `sgdisk -e`
/// directly on it, which writes a fresh 4K GPT over the image's 512-byte one.
#[derive(Debug, Clone, Copy, Default)]
pub struct DirectSgdiskRepair;

impl PrepareVolume for DirectSgdiskRepair {
    fn describe(&self) -> String {
        "raw image + `sgdisk -e` directly on the device (the damaging repair)".into()
    }

    fn prepare(&self, image: &TestImage, volume: &Volume) -> Result<String> {
        write_image(&image.raw, volume.device())?;
        damage_with_direct_sgdisk(volume)
    }
}

/// Runs `sgdisk -e` directly on the volume's device, whatever its sector size, and
/// returns sgdisk's output (it may exit non-zero; the damage is the point).
pub fn damage_with_direct_sgdisk(volume: &Volume) -> Result<String> {
    let (status, out) = run_unchecked(Command::new("sgdisk").arg("-e").arg(volume.device()))?;
    Ok(format!(
        "sgdisk -e {} ({status}):\n{out}",
        volume.device().display()
    ))
}

/// Any command as a preparation step (e.g. `vmblk unpack {image} {volume}`): every
/// `{image}` in the arguments becomes the raw image path, `{qcow2}` the qcow2 path and
/// `{volume}` the volume's device.
#[derive(Debug, Clone)]
pub struct CommandPrepare {
    /// Program to run.
    pub program: PathBuf,
    /// Its arguments, with placeholders.
    pub args: Vec<String>,
}

impl PrepareVolume for CommandPrepare {
    fn describe(&self) -> String {
        format!("{} {}", self.program.display(), self.args.join(" "))
    }

    fn prepare(&self, image: &TestImage, volume: &Volume) -> Result<String> {
        let subst = |a: &String| {
            a.replace("{image}", &image.raw.display().to_string())
                .replace("{qcow2}", &image.qcow2.display().to_string())
                .replace("{volume}", &volume.device().display().to_string())
        };
        run(Command::new(&self.program).args(self.args.iter().map(subst)))
    }
}

/// A volume with `image` prepared on it by `step`.
pub fn prepared_volume(
    image: &TestImage,
    sector_size: u32,
    step: &dyn PrepareVolume,
) -> Result<(Volume, String)> {
    let volume = Volume::new(sector_size, DEFAULT_VOLUME_BYTES)?;
    let evidence = step
        .prepare(image, &volume)
        .with_context(|| format!("preparing volume: {}", step.describe()))?;
    Ok((volume, evidence))
}

/// Runs `vmblk unpack IMAGE VOLUME`; returns its output.
pub fn vmblk_unpack(image: &Path, volume: &Volume) -> Result<String> {
    crate::run(
        Command::new(crate::vmblk_bin())
            .arg("unpack")
            .arg(image)
            .arg(volume.device()),
    )
    .context("vmblk unpack")
}

/// A `sector_size` volume of `bytes` with `image` unpacked onto it by `vmblk unpack`.
pub fn unpacked_volume(image: &Path, sector_size: u32, bytes: u64) -> Result<Volume> {
    let volume = Volume::new(sector_size, bytes)?;
    vmblk_unpack(image, &volume)?;
    Ok(volume)
}

/// Copies `image` onto the block device `dev` from offset 0 and flushes it.
pub fn write_image(image: &Path, dev: &Path) -> Result<()> {
    let mut src =
        std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .open(dev)
        .with_context(|| format!("opening {}", dev.display()))?;
    std::io::copy(&mut src, &mut dst)
        .with_context(|| format!("writing {} to {}", image.display(), dev.display()))?;
    dst.flush()?;
    dst.sync_all()?;
    Ok(())
}
