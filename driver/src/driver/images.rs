//! The image cache: images unpacked once into a dir pool, cloned into volumes.

use std::fs::{File, OpenOptions};

use image_unpack::UnpackOptions;

use super::*;
use crate::model::{CachedImage, ImageImport, Imported};
use crate::names::{check_fingerprint, check_image_path, check_name, round_up};
use crate::state::TMP_PREFIX;

impl Driver {
    /// The pool images are cached in: `pool`, or ("") the default dir pool; and its
    /// directory.
    pub(super) fn image_pool(&self, pool: &str) -> Result<(String, PathBuf)> {
        let inner = self.lock();
        let holds_images = |e: &PoolEntry| e.backend.holds_images();
        let name = if pool.is_empty() {
            match inner.pools.get(DEFAULT_POOL) {
                Some(e) if holds_images(e) => DEFAULT_POOL.to_owned(),
                _ => inner
                    .pools
                    .iter()
                    .find(|(_, e)| holds_images(e))
                    .map(|(n, _)| n.clone())
                    .ok_or_else(|| {
                        Error::PoolUnsuitable("no dir pool to cache images in".into())
                    })?,
            }
        } else {
            check_name("pool", pool)?;
            pool.to_owned()
        };
        match inner.pools.get(&name) {
            Some(e) => match e.backend.kind() {
                PoolKind::Dir { path, .. } => Ok((name, path.clone())),
                PoolKind::Block { .. } => Err(Error::PoolUnsuitable(format!(
                    "pool {name:?} is a block pool: images are cached in dir pools"
                ))),
            },
            None => Err(Error::PoolNotFound(name)),
        }
    }

    /// ImportImage: unpacks the image into the cache once; again, it is found there.
    pub fn import_image(&self, req: ImageImport) -> Result<Imported> {
        check_fingerprint(&req.fingerprint)?;
        check_image_path("image", &req.image)?;
        if let Some(m) = &req.metadata {
            check_image_path("metadata tarball", m)?;
        }
        let (pool, dir) = self.image_pool(&req.pool)?;
        let fp = req.fingerprint.as_str();
        let iid = ImageId::new(&pool, fp);
        let _g = self.begin(OpKey::Image(iid.clone()))?;
        if let Some(img) = self.lock().images.get(&iid) {
            return Ok(Imported {
                image: img.view(),
                unpacked: false,
            });
        }
        let pool_entry = self.pool(&pool)?;
        let rep = image_unpack::inspect(&req.image).map_err(|source| Error::Unpack {
            step: "inspecting",
            path: req.image.clone(),
            source: Box::new(source),
        })?;
        let size = round_up(rep.size);
        // The quota check and the reservation are one step: two imports must not both
        // fit in the space of one.
        let _reservation = {
            let _alloc = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
            self.quota_check(&pool, &pool_entry, size)?;
            self.lock().reserved.insert(iid.clone(), size);
            Reservation {
                driver: self,
                image: iid.clone(),
            }
        };
        let idir = dir.join("images");
        let final_path = idir.join(format!("{fp}.img"));
        let tmp = idir.join(format!("{TMP_PREFIX}{fp}-{}.img", uuid::Uuid::new_v4()));
        let progress = EventProgress::new(self, &pool, fp, "import");
        let run = || -> Result<()> {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(Error::io("creating", &tmp))?;
            f.set_len(size).map_err(Error::io("sizing", &tmp))?;
            drop(f);
            let scratch = self.state_dir.join("scratch");
            let _ = fs::create_dir_all(&scratch);
            let o = UnpackOptions {
                metadata: req.metadata.clone(),
                scratch_dir: Some(scratch),
                ..UnpackOptions::default()
            };
            image_unpack::unpack(&req.image, &tmp, &o, &progress).map_err(|source| {
                Error::Unpack {
                    step: "unpacking image onto",
                    path: tmp.clone(),
                    source: Box::new(source),
                }
            })?;
            File::options()
                .write(true)
                .open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(Error::io("syncing", &tmp))?;
            fs::rename(&tmp, &final_path).map_err(Error::io("renaming", &tmp))?;
            crate::sys::fsync_dir(&idir).map_err(Error::io("syncing", &idir))
        };
        if let Err(e) = run() {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let rec = ImageRecord {
            pool: pool.clone(),
            fingerprint: fp.to_owned(),
            size_bytes: size,
            path: final_path,
            created_unix_ms: now_ms(),
        };
        self.store.put_image(&rec)?;
        self.lock().images.insert(iid, rec.clone());
        tracing::info!(pool, fingerprint = fp, size, "image cached");
        Ok(Imported {
            image: rec.view(),
            unpacked: true,
        })
    }

    /// ListImages ("" for every pool).
    pub fn list_images(&self, pool: &str) -> Result<Vec<CachedImage>> {
        if !pool.is_empty() {
            check_name("pool", pool)?;
            self.pool(pool)?;
        }
        Ok(self
            .lock()
            .images
            .values()
            .filter(|i| pool.is_empty() || i.pool == pool)
            .map(ImageRecord::view)
            .collect())
    }

    /// DeleteImage: returns whether it existed.
    pub fn delete_image(&self, pool: &str, fp: &str) -> Result<bool> {
        check_fingerprint(fp)?;
        let (pool, _) = self.image_pool(pool)?;
        let iid = ImageId::new(&pool, fp);
        let _g = self.begin(OpKey::Image(iid.clone()))?;
        let Some(rec) = self.lock().images.get(&iid).cloned() else {
            return Ok(false);
        };
        self.store.remove_image(&pool, fp)?;
        self.lock().images.remove(&iid);
        let _ = fs::remove_file(&rec.path);
        Ok(true)
    }
}
