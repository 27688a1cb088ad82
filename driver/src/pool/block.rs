//! `block` pools: each volume a whole device of the pool (an NVMe namespace, a
//! partition, a loop device): the smallest free one that fits, zeroed past an unpacked
//! image, wiped at its head and tail when the volume is deleted, and followed by its
//! stable identity when it goes away and comes back (hotplug).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use super::{device_number, Backing, Cloned, PoolBackend, Space};
use crate::config::PoolKind;
use crate::error::{Error, Result};
use crate::identity::{DeviceIdentity, Sysfs};
use crate::model::VolumeId;
use crate::sys;

/// Bytes wiped at the head and tail of a device when a volume on it is removed.
const WIPE_BYTES: u64 = 1 << 20;

/// A pool of whole devices.
#[derive(Debug)]
pub(crate) struct BlockPool {
    kind: PoolKind,
    devices: Vec<PathBuf>,
    sysfs: Sysfs,
}

impl BlockPool {
    pub(crate) fn new(kind: PoolKind) -> BlockPool {
        let devices = match &kind {
            PoolKind::Block { devices } => devices.clone(),
            PoolKind::Dir { .. } | PoolKind::Rbd(_) => Vec::new(),
        };
        BlockPool {
            kind,
            devices,
            sysfs: Sysfs::default(),
        }
    }

    /// The pool's devices no volume uses (two names of one device are one device).
    fn free<'a>(&'a self, taken: &[PathBuf]) -> impl Iterator<Item = &'a PathBuf> + 'a {
        let used: Vec<u64> = taken.iter().filter_map(|p| device_number(p)).collect();
        self.devices
            .iter()
            .filter(move |d| device_number(d).is_some_and(|n| !used.contains(&n)))
    }
}

impl PoolBackend for BlockPool {
    fn kind(&self) -> &PoolKind {
        &self.kind
    }

    fn prepare(&self) -> Result<()> {
        Ok(())
    }

    fn follows_devices(&self) -> bool {
        true
    }

    fn overlaps(&self, other: &PoolKind) -> bool {
        matches!(other, PoolKind::Block { devices } if devices.iter().any(|d| self.devices.contains(d)))
    }

    fn place(&self, id: &VolumeId, _uuid: &str, size: u64, taken: &[PathBuf]) -> Result<Backing> {
        let mut best: Option<(PathBuf, u64)> = None;
        for d in self.free(taken) {
            match sys::size_and_sector(d) {
                Ok((s, _)) if s >= size && best.as_ref().is_none_or(|b| s < b.1) => {
                    best = Some((d.clone(), s));
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(device = %d.display(), error = %e, "device unavailable"),
            }
        }
        let (path, size_bytes) = best.ok_or_else(|| {
            Error::NoSpace(format!(
                "pool {:?} has no free device of {size} bytes",
                id.pool
            ))
        })?;
        Ok(Backing {
            path,
            temp_path: None,
            size_bytes,
        })
    }

    fn create(&self, _b: &Backing) -> Result<()> {
        Ok(())
    }

    fn needs_zeroing(&self) -> bool {
        true
    }

    fn clone_image(&self, _image: &Path, _b: &Backing) -> Result<Cloned> {
        Ok(Cloned::Unpack)
    }

    /// Copies the source device onto the volume's, zero runs written as zeroes
    /// (BLKZEROOUT), the rest of a larger device zeroed.
    fn clone_volume(&self, source: &Path, len: u64, b: &Backing) -> Result<Cloned> {
        copy_device(source, len, &b.path)?;
        Ok(Cloned::Copied)
    }

    fn commit(&self, _b: &Backing) -> Result<()> {
        Ok(())
    }

    fn grows(&self) -> bool {
        false
    }

    fn grow(&self, path: &Path, _size: u64) -> Result<u64> {
        let size = sys::size_and_sector(path).map(|s| s.0).unwrap_or(0);
        Err(Error::NoSpace(format!(
            "the volume fills its device {} of {size} bytes",
            path.display()
        )))
    }

    fn discard(&self, b: &Backing) {
        if let Err(e) = wipe_device(&b.path) {
            tracing::error!(device = %b.path.display(), error = %e, "wiping device");
        }
    }

    fn allocated(&self, _path: &Path, size: u64) -> Result<u64> {
        Ok(size)
    }

    fn space(&self, taken: &[PathBuf]) -> Space {
        let size = |d: &PathBuf| sys::size_and_sector(d).map(|s| s.0).unwrap_or(0);
        Space {
            capacity_bytes: self.devices.iter().map(size).sum(),
            available_bytes: self.free(taken).map(size).sum(),
        }
    }

    fn identity(&self, path: &Path) -> Option<DeviceIdentity> {
        self.sysfs.identity_of_path(path)
    }
}

/// Copies `len` bytes of device `src` onto device `dst` and zeroes the rest of `dst`.
fn copy_device(src: &Path, len: u64, dst: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 1 << 20;
    let s = File::open(src).map_err(Error::io("opening", src))?;
    let io =
        |e: image_unpack::TargetError| Error::io("copying onto", dst)(std::io::Error::other(e));
    let t = image_unpack::Target::open(dst).map_err(io)?;
    let size = t.info().size;
    if size < len {
        return Err(Error::NoSpace(format!(
            "device {} has {size} bytes, the source {len}",
            dst.display()
        )));
    }
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0;
    while off < len {
        let n = CHUNK.min((len - off) as usize);
        s.read_exact_at(&mut buf[..n], off)
            .map_err(Error::io("reading", src))?;
        if buf[..n].iter().all(|&b| b == 0) {
            t.zero_range(off, n as u64).map_err(io)?;
        } else {
            t.write_at(&buf[..n], off).map_err(io)?;
        }
        off += n as u64;
    }
    t.zero_range(len, size - len).map_err(io)?;
    t.sync().map_err(io)
}

/// Zeroes the first and last MiB of a device (partition tables, signatures).
fn wipe_device(dev: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{FileExt, FileTypeExt};
    if !std::fs::metadata(dev)?.file_type().is_block_device() {
        return Ok(());
    }
    let f = OpenOptions::new().write(true).open(dev)?;
    let size = blockdev::size(&f)?;
    let n = WIPE_BYTES.min(size);
    let zeros = vec![0u8; n as usize];
    f.write_all_at(&zeros, 0)?;
    f.write_all_at(&zeros, size - n)?;
    f.sync_all()
}
