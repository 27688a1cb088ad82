//! The image cache: images unpacked once into a dir pool (a file) or an rbd pool (an
//! image with a protected snapshot), cloned into volumes.

use std::fs::File;

use image_unpack::UnpackOptions;

use super::*;
use crate::model::{CachedImage, ImageImport, Imported};
use crate::names::{check_fingerprint, check_image_path, check_name, round_up};

impl Driver {
    /// The pool images are cached in: `pool`, or ("") the default pool if it holds
    /// images, else the first that does (dir and rbd pools).
    pub(super) fn image_pool(&self, pool: &str) -> Result<(String, PoolEntry)> {
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
                        Error::PoolUnsuitable("no dir or rbd pool to cache images in".into())
                    })?,
            }
        } else {
            check_name("pool", pool)?;
            pool.to_owned()
        };
        match inner.pools.get(&name) {
            Some(e) if holds_images(e) => Ok((name, e.clone())),
            Some(_) => Err(Error::PoolUnsuitable(format!(
                "pool {name:?} is a block pool: images are cached in dir and rbd pools"
            ))),
            None => Err(Error::PoolNotFound(name)),
        }
    }

    /// Records a cached image: with it in a shared pool, else in the state directory.
    fn put_image_record(&self, pool_entry: &PoolEntry, rec: &ImageRecord) -> Result<()> {
        match pool_entry.backend.shared() {
            Some(shared) => {
                let json = serde_json::to_string(rec)
                    .map_err(|e| Error::BadRequest(format!("image record: {e}")))?;
                shared.put_image_record(&rec.path, &json)?;
            }
            None => self.store.put_image(rec)?,
        }
        self.lock().images.insert(rec.id(), rec.clone());
        Ok(())
    }

    /// ImportImage: unpacks the image into the cache once; again, it is found there.
    pub fn import_image(&self, req: ImageImport) -> Result<Imported> {
        check_fingerprint(&req.fingerprint)?;
        check_image_path("image", &req.image)?;
        if let Some(m) = &req.metadata {
            check_image_path("metadata tarball", m)?;
        }
        let (pool, pool_entry) = self.image_pool(&req.pool)?;
        let fp = req.fingerprint.as_str();
        let iid = ImageId::new(&pool, fp);
        let _g = self.begin(OpKey::Image(iid.clone()))?;
        self.refresh_shared(&pool)?;
        if let Some(img) = self.lock().images.get(&iid) {
            return Ok(Imported {
                image: img.view(),
                unpacked: false,
            });
        }
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
        let placed = pool_entry.backend.image_place(fp, size)?;
        let rec = ImageRecord {
            pool: pool.clone(),
            fingerprint: fp.to_owned(),
            size_bytes: size,
            path: placed.path.clone(),
            created_unix_ms: now_ms(),
        };
        if pool_entry.backend.image_exists(&placed)? {
            // Complete already (a deleted image with clones, imported again; or made by
            // another host whose record this one had not read).
            self.put_image_record(&pool_entry, &rec)?;
            return Ok(Imported {
                image: rec.view(),
                unpacked: false,
            });
        }
        let progress = EventProgress::new(self, &pool, fp, "import");
        // Nothing was made if this fails (another host importing the same image): it is
        // not ours to remove.
        pool_entry.backend.create(&placed)?;
        let run = || -> Result<()> {
            let scratch = self.state_dir.join("scratch");
            let _ = fs::create_dir_all(&scratch);
            let o = UnpackOptions {
                metadata: req.metadata.clone(),
                scratch_dir: Some(scratch),
                target_is_new: true,
                ..UnpackOptions::default()
            };
            let target = placed.target();
            image_unpack::unpack(&req.image, target, &o, &progress).map_err(|source| {
                Error::Unpack {
                    step: "unpacking image onto",
                    path: target.to_owned(),
                    source: Box::new(source),
                }
            })?;
            if pool_entry.backend.shared().is_none() {
                File::options()
                    .write(true)
                    .open(target)
                    .and_then(|f| f.sync_all())
                    .map_err(Error::io("syncing", target))?;
            }
            pool_entry.backend.image_commit(&placed)
        };
        if let Err(e) = run() {
            pool_entry.backend.image_discard(&placed);
            return Err(e);
        }
        self.put_image_record(&pool_entry, &rec)?;
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
            self.refresh_shared(pool)?;
        }
        Ok(self
            .lock()
            .images
            .values()
            .filter(|i| pool.is_empty() || i.pool == pool)
            .map(ImageRecord::view)
            .collect())
    }

    /// DeleteImage: returns whether it existed. Volumes cloned from it keep working
    /// (dir: reflinks and copies are independent; rbd: the image is hidden and removed
    /// with its last clone).
    pub fn delete_image(&self, pool: &str, fp: &str) -> Result<bool> {
        check_fingerprint(fp)?;
        let (pool, pool_entry) = self.image_pool(pool)?;
        let iid = ImageId::new(&pool, fp);
        let _g = self.begin(OpKey::Image(iid.clone()))?;
        self.refresh_shared(&pool)?;
        let Some(rec) = self.lock().images.get(&iid).cloned() else {
            return Ok(false);
        };
        if pool_entry.backend.shared().is_none() {
            self.store.remove_image(&pool, fp)?;
        }
        self.lock().images.remove(&iid);
        pool_entry.backend.image_discard(&crate::pool::Backing {
            path: rec.path.clone(),
            temp_path: None,
            size_bytes: rec.size_bytes,
        });
        Ok(true)
    }
}
