//! The image cache: images unpacked once into a dir pool, cloned into volumes.

use super::*;

impl Driver {
    pub(super) fn image_pool(&self, pool: &str) -> Result<(String, PathBuf)> {
        let inner = self.lock();
        let name = if pool.is_empty() {
            match inner.pools.get(DEFAULT_POOL) {
                Some(e) if matches!(e.kind, PoolKind::Dir { .. }) => DEFAULT_POOL.to_owned(),
                _ => inner
                    .pools
                    .iter()
                    .find(|(_, e)| matches!(e.kind, PoolKind::Dir { .. }))
                    .map(|(n, _)| n.clone())
                    .ok_or_else(|| {
                        Error::FailedPrecondition("no dir pool to cache images in".into())
                    })?,
            }
        } else {
            check_name("pool", pool)?;
            pool.to_owned()
        };
        match inner.pools.get(&name).map(|e| &e.kind) {
            Some(PoolKind::Dir { path, .. }) => Ok((name, path.clone())),
            Some(_) => Err(Error::InvalidArgument(format!(
                "pool {name:?} is a block pool: images are cached in dir pools"
            ))),
            None => Err(Error::NotFound(format!("pool {name:?} does not exist"))),
        }
    }

    pub(super) fn image_pb(r: &ImageRecord) -> pb::CachedImage {
        pb::CachedImage {
            pool: r.pool.clone(),
            fingerprint: r.fingerprint.clone(),
            size_bytes: r.size_bytes,
            path: r.path.display().to_string(),
            created_unix_ms: r.created_unix_ms,
        }
    }

    /// ImportImage.
    pub fn import_image(&self, r: pb::ImportImageRequest) -> Result<pb::ImportImageResponse> {
        check_fingerprint(&r.fingerprint)?;
        let f = r
            .image
            .ok_or_else(|| Error::InvalidArgument("image is required".into()))?;
        check_image_path("image", &f.path)?;
        let metadata = if f.metadata_path.is_empty() {
            None
        } else {
            check_image_path("metadata tarball", &f.metadata_path)?;
            Some(PathBuf::from(&f.metadata_path))
        };
        let (pool, dir) = self.image_pool(&r.pool)?;
        let fp = r.fingerprint.as_str();
        let _g = self.begin(ikey(&pool, fp), &format!("image {fp}"))?;
        if let Some(img) = self.lock().images.get(&key(&pool, fp)) {
            return Ok(pb::ImportImageResponse {
                image: Some(Self::image_pb(img)),
                unpacked: false,
            });
        }
        let pe = self.pool(&pool)?;
        let image = PathBuf::from(&f.path);
        let rep = image_unpack::inspect(&image).map_err(|source| Error::Unpack {
            step: "inspecting",
            path: image.clone(),
            source: Box::new(source),
        })?;
        let size = round_up(rep.size);
        // The quota check and the reservation are one step: two imports must not both
        // fit in the space of one.
        let _reservation = {
            let _alloc = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
            self.quota_check(&pool, &pe, size)?;
            let k = key(&pool, fp);
            self.lock().reserved.insert(k.clone(), size);
            Reservation {
                driver: self,
                key: k,
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
            let _ = fs::create_dir_all(self.state_dir.join("scratch"));
            let o = UnpackOptions {
                metadata,
                scratch_dir: Some(self.state_dir.join("scratch")),
                ..UnpackOptions::default()
            };
            image_unpack::unpack(&image, &tmp, &o, &progress).map_err(|source| Error::Unpack {
                step: "unpacking image onto",
                path: tmp.clone(),
                source: Box::new(source),
            })?;
            File::options()
                .write(true)
                .open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(Error::io("syncing", &tmp))?;
            fs::rename(&tmp, &final_path).map_err(Error::io("renaming", &tmp))?;
            sys::fsync_dir(&idir).map_err(Error::io("syncing", &idir))
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
        self.lock().images.insert(key(&pool, fp), rec.clone());
        tracing::info!(pool, fingerprint = fp, size, "image cached");
        Ok(pb::ImportImageResponse {
            image: Some(Self::image_pb(&rec)),
            unpacked: true,
        })
    }

    /// ListImages.
    pub fn list_images(&self, pool: &str) -> Result<Vec<pb::CachedImage>> {
        if !pool.is_empty() {
            check_name("pool", pool)?;
            self.pool(pool)?;
        }
        Ok(self
            .lock()
            .images
            .values()
            .filter(|i| pool.is_empty() || i.pool == pool)
            .map(Self::image_pb)
            .collect())
    }

    /// DeleteImage: returns whether it existed.
    pub fn delete_image(&self, pool: &str, fp: &str) -> Result<bool> {
        check_fingerprint(fp)?;
        let (pool, _) = self.image_pool(pool)?;
        let _g = self.begin(ikey(&pool, fp), &format!("image {fp}"))?;
        let Some(rec) = self.lock().images.get(&key(&pool, fp)).cloned() else {
            return Ok(false);
        };
        self.store.remove_image(&pool, fp)?;
        self.lock().images.remove(&key(&pool, fp));
        let _ = fs::remove_file(&rec.path);
        Ok(true)
    }
}
