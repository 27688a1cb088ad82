//! `dir` pools: each volume a file `volumes/<name>.img` (sparse), written under a
//! temporary name and renamed once complete; cached images in `images/`; clones by
//! reflink where the file system has it (xfs, btrfs), sparse copies elsewhere.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use super::{Backing, Cloned, PoolBackend, Space};
use crate::config::PoolKind;
use crate::error::{Error, Result};
use crate::identity::DeviceIdentity;
use crate::model::VolumeId;
use crate::state::{remove_temp_files_under, TMP_PREFIX};
use crate::sys;

/// A pool of files under one directory.
#[derive(Debug)]
pub(crate) struct DirPool {
    kind: PoolKind,
    dir: PathBuf,
    reflink: std::sync::atomic::AtomicBool,
}

impl DirPool {
    pub(crate) fn new(kind: PoolKind) -> DirPool {
        let dir = match &kind {
            PoolKind::Dir { path, .. } => path.clone(),
            PoolKind::Block { .. } | PoolKind::Rbd(_) => PathBuf::new(),
        };
        DirPool {
            kind,
            dir,
            reflink: Default::default(),
        }
    }
}

impl PoolBackend for DirPool {
    fn kind(&self) -> &PoolKind {
        &self.kind
    }

    fn prepare(&self) -> Result<()> {
        for sub in ["volumes", "images"] {
            let d = self.dir.join(sub);
            fs::create_dir_all(&d).map_err(Error::io("creating", &d))?;
            remove_temp_files_under(&d, 1)?;
        }
        let reflink = probe_reflink(&self.dir);
        self.reflink
            .store(reflink, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(path = %self.dir.display(), reflink, "dir pool ready");
        Ok(())
    }

    fn reflink(&self) -> bool {
        self.reflink.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn holds_images(&self) -> bool {
        true
    }

    fn overlaps(&self, other: &PoolKind) -> bool {
        matches!(other, PoolKind::Dir { path, .. } if *path == self.dir)
    }

    fn place(&self, id: &VolumeId, uuid: &str, size: u64, _taken: &[PathBuf]) -> Result<Backing> {
        let vdir = self.dir.join("volumes");
        Ok(Backing {
            path: vdir.join(format!("{}.img", id.name)),
            temp_path: Some(vdir.join(format!("{TMP_PREFIX}{}-{uuid}.img", id.name))),
            size_bytes: size,
        })
    }

    fn create(&self, b: &Backing) -> Result<()> {
        let target = b.target();
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(target)
            .map_err(Error::io("creating", target))?;
        f.set_len(b.size_bytes).map_err(Error::io("sizing", target))
    }

    fn needs_zeroing(&self) -> bool {
        false
    }

    /// Reflinks (or copies) the image, then gives the volume its own size: a clone
    /// takes the image's length, and a volume may be larger.
    fn clone_image(&self, image: &Path, b: &Backing) -> Result<Cloned> {
        let target = b.target();
        let how = clone_file(image, target)?;
        let f = OpenOptions::new()
            .write(true)
            .open(target)
            .map_err(Error::io("opening", target))?;
        let len = f.metadata().map_err(Error::io("inspecting", target))?.len();
        if len < b.size_bytes {
            f.set_len(b.size_bytes)
                .map_err(Error::io("sizing", target))?;
        }
        Ok(how)
    }

    /// `volumes/<new name>.img` linked to the volume's file (never over another
    /// volume's file); the old name is unlinked once the records say the new one
    /// ([`PoolBackend::rename_done`]). Snapshots are named by the volume's UUID and stay.
    fn rename(
        &self,
        path: &Path,
        to: &VolumeId,
        snapshots: &[PathBuf],
    ) -> Result<(PathBuf, Vec<PathBuf>)> {
        use std::os::unix::fs::MetadataExt;
        let vdir = self.dir.join("volumes");
        let new = vdir.join(format!("{}.img", to.name));
        match fs::hard_link(path, &new) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // Linked already by a rename that crashed before its records: the same file.
                let same = match (fs::metadata(path), fs::metadata(&new)) {
                    (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                    _ => false,
                };
                if !same {
                    return Err(Error::AlreadyExists {
                        what: format!("file {}", new.display()),
                        how: "in the pool's directory".into(),
                    });
                }
            }
            Err(e) => return Err(Error::io("linking", &new)(e)),
        }
        sys::fsync_dir(&vdir).map_err(Error::io("syncing", &vdir))?;
        Ok((new, snapshots.to_vec()))
    }

    fn rename_done(&self, old: &Path, new: &Path) {
        if old == new {
            return;
        }
        match fs::remove_file(old) {
            Ok(()) => {
                if let Some(d) = old.parent() {
                    let _ = sys::fsync_dir(d);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(file = %old.display(), error = %e,
                "removing a renamed volume's old name"),
        }
    }

    fn commit(&self, b: &Backing) -> Result<()> {
        let Some(tmp) = &b.temp_path else {
            return Ok(());
        };
        let dir = b.path.parent().unwrap_or(Path::new("/"));
        fs::rename(tmp, &b.path).map_err(Error::io("renaming", tmp))?;
        sys::fsync_dir(dir).map_err(Error::io("syncing", dir))
    }

    fn grow(&self, path: &Path, size: u64) -> Result<u64> {
        let f = File::options()
            .write(true)
            .open(path)
            .map_err(Error::io("opening", path))?;
        f.set_len(size).map_err(Error::io("extending", path))?;
        f.sync_all().map_err(Error::io("syncing", path))?;
        Ok(f.metadata().map(|m| m.len()).unwrap_or(size))
    }

    fn discard(&self, b: &Backing) {
        match &b.temp_path {
            // Not complete: only the temporary file is its.
            Some(t) => {
                let _ = fs::remove_file(t);
            }
            None => {
                let _ = fs::remove_file(&b.path);
            }
        }
        if let Some(dir) = b.path.parent() {
            let _ = sys::fsync_dir(dir);
        }
    }

    fn allocated(&self, path: &Path, _size: u64) -> Result<u64> {
        sys::allocated_bytes(path).map_err(Error::io("inspecting", path))
    }

    fn space(&self, _taken: &[PathBuf]) -> Space {
        let capacity_bytes = match &self.kind {
            PoolKind::Dir { capacity_bytes, .. } => *capacity_bytes,
            PoolKind::Block { .. } | PoolKind::Rbd(_) => 0,
        };
        Space {
            capacity_bytes,
            available_bytes: sys::available_bytes(&self.dir).unwrap_or(0),
        }
    }

    fn identity(&self, _path: &Path) -> Option<DeviceIdentity> {
        None
    }

    fn image_place(&self, fingerprint: &str, size: u64) -> Result<Backing> {
        let idir = self.dir.join("images");
        Ok(Backing {
            path: idir.join(format!("{fingerprint}.img")),
            temp_path: Some(idir.join(format!(
                "{TMP_PREFIX}{fingerprint}-{}.img",
                uuid::Uuid::new_v4()
            ))),
            size_bytes: size,
        })
    }

    fn image_exists(&self, b: &Backing) -> Result<bool> {
        Ok(b.path.is_file())
    }

    /// A reflink copy of the volume's file where the filesystem has reflink, a sparse
    /// copy elsewhere, under `snapshots/`.
    fn snapshot(&self, volume: &Path, uuid: &str, name: &str) -> Result<PathBuf> {
        let sdir = self.dir.join("snapshots");
        fs::create_dir_all(&sdir).map_err(Error::io("creating", &sdir))?;
        let path = sdir.join(format!("{uuid}@{name}.img"));
        let tmp = sdir.join(format!("{TMP_PREFIX}{uuid}@{name}.img"));
        let run = || -> Result<()> {
            File::create(&tmp).map_err(Error::io("creating", &tmp))?;
            clone_file(volume, &tmp)?;
            File::options()
                .write(true)
                .open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(Error::io("syncing", &tmp))?;
            fs::rename(&tmp, &path).map_err(Error::io("renaming", &tmp))?;
            sys::fsync_dir(&sdir).map_err(Error::io("syncing", &sdir))
        };
        if let Err(e) = run() {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(path)
    }

    fn delete_snapshot(&self, _volume: &Path, snapshot: &Path) {
        if let Err(e) = fs::remove_file(snapshot) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(snapshot = %snapshot.display(), error = %e, "removing a snapshot");
            }
        }
    }

    /// The snapshot cloned (reflink or sparse copy) to a temporary file that then
    /// replaces the volume's: the volume is either as it was or as the snapshot.
    fn restore_snapshot(&self, volume: &Path, snapshot: &Path) -> Result<()> {
        let dir = volume.parent().unwrap_or(Path::new("/"));
        let name = volume
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!("{TMP_PREFIX}restore-{name}"));
        let run = || -> Result<()> {
            File::create(&tmp).map_err(Error::io("creating", &tmp))?;
            clone_file(snapshot, &tmp)?;
            File::options()
                .write(true)
                .open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(Error::io("syncing", &tmp))?;
            fs::rename(&tmp, volume).map_err(Error::io("renaming", &tmp))?;
            sys::fsync_dir(dir).map_err(Error::io("syncing", dir))
        };
        if let Err(e) = run() {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(())
    }
}

/// Clones `src` into the new file `dst` by reflink, or copies it (skipping zero
/// blocks, so the copy stays sparse).
fn clone_file(src: &Path, dst: &Path) -> Result<Cloned> {
    let s = File::open(src).map_err(Error::io("opening", src))?;
    let d = OpenOptions::new()
        .write(true)
        .open(dst)
        .map_err(Error::io("opening", dst))?;
    match sys::ficlone(&d, &s) {
        Ok(()) => return Ok(Cloned::Reflinked),
        Err(e) if sys::is_reflink_unsupported(&e) => {
            tracing::info!(src = %src.display(), error = %e, "no reflink here; copying");
        }
        Err(e) => return Err(Error::io("cloning into", dst)(e)),
    }
    sparse_copy(&s, &d).map_err(Error::io("copying into", dst))?;
    Ok(Cloned::Copied)
}

/// Copies only the data extents (SEEK_DATA/SEEK_HOLE), in the kernel
/// (copy_file_range); holes stay holes.
fn sparse_copy(s: &File, d: &File) -> std::io::Result<()> {
    let len = s.metadata()?.len();
    d.set_len(len)?;
    let mut off = 0u64;
    while off < len {
        let Some(start) = sys::next_data(s, off)? else {
            break;
        };
        let end = sys::next_hole(s, start)?.min(len);
        sys::copy_range(s, d, start, end - start)?;
        off = end;
    }
    Ok(())
}

/// Whether files under `dir` can be reflinked.
fn probe_reflink(dir: &Path) -> bool {
    let a = dir.join(format!("{TMP_PREFIX}reflink-probe-a"));
    let b = dir.join(format!("{TMP_PREFIX}reflink-probe-b"));
    let r = (|| -> std::io::Result<()> {
        fs::write(&a, vec![1u8; 4096])?;
        let s = File::open(&a)?;
        let d = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&b)?;
        sys::ficlone(&d, &s)
    })();
    let _ = fs::remove_file(&a);
    let _ = fs::remove_file(&b);
    r.is_ok()
}
