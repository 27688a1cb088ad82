//! Volumes: create (empty, from an image, cloned from a cached image), grow with the
//! partition-table repair, delete, and what they are filled with.

use super::*;

impl Driver {
    pub(super) fn volume_pb(&self, r: &VolumeRecord) -> pb::Volume {
        let origin = match &r.origin {
            Origin::Empty => pb::volume_origin::Source::Empty(pb::Empty {}),
            Origin::Image { path, metadata } => pb::volume_origin::Source::Image(pb::ImageFile {
                path: path.display().to_string(),
                metadata_path: metadata
                    .as_ref()
                    .map(|m| m.display().to_string())
                    .unwrap_or_default(),
            }),
            Origin::Fingerprint(f) => pb::volume_origin::Source::ImageFingerprint(f.clone()),
        };
        pb::Volume {
            pool: r.pool.clone(),
            name: r.name.clone(),
            uuid: r.uuid.clone(),
            size_bytes: r.size_bytes,
            state: state_pb(Some(r.state)) as i32,
            origin: Some(pb::VolumeOrigin {
                source: Some(origin),
            }),
            path: r.path.display().to_string(),
            backing_logical_block_size: sys::size_and_sector(&r.path).map(|s| s.1).unwrap_or(512),
            attachment: r.attachment.as_ref().map(|a| self.attachment_pb(r, a)),
            created_unix_ms: r.created_unix_ms,
            reflinked: r.reflinked,
        }
    }

    /// An attachment for the API, with where its backing device stands.
    pub(super) fn attachment_pb(&self, rec: &VolumeRecord, a: &AttachRecord) -> pb::Attachment {
        let mut pb = attachment_pb(rec, a);
        let (state, reason) = self.backend_state(&rec.pool, &rec.name);
        pb.backend_state = state as i32;
        pb.backend_removed_reason = reason;
        pb
    }

    pub(super) fn record(&self, pool: &str, name: &str) -> Option<VolumeRecord> {
        self.lock().volumes.get(&key(pool, name)).cloned()
    }

    pub(super) fn put_record(&self, r: &VolumeRecord) -> Result<()> {
        self.store.put_volume(r)?;
        self.lock().volumes.insert(key(&r.pool, &r.name), r.clone());
        Ok(())
    }

    pub(super) fn drop_record(&self, pool: &str, name: &str) -> Result<()> {
        self.store.remove_volume(pool, name)?;
        self.lock().volumes.remove(&key(pool, name));
        Ok(())
    }

    /// GetVolume.
    pub fn get_volume(&self, pool: &str, name: &str) -> Result<pb::Volume> {
        check_name("pool", pool)?;
        check_name("volume", name)?;
        self.pool(pool)?;
        let r = self
            .record(pool, name)
            .ok_or_else(|| Error::NotFound(format!("volume {pool}/{name} does not exist")))?;
        Ok(self.volume_pb(&r))
    }

    /// ListVolumes.
    pub fn list_volumes(&self, pool: &str) -> Result<Vec<pb::Volume>> {
        if !pool.is_empty() {
            check_name("pool", pool)?;
            self.pool(pool)?;
        }
        let recs: Vec<VolumeRecord> = self
            .lock()
            .volumes
            .values()
            .filter(|v| pool.is_empty() || v.pool == pool)
            .cloned()
            .collect();
        Ok(recs.iter().map(|r| self.volume_pb(r)).collect())
    }

    /// GetVolumeUsage.
    pub fn volume_usage(&self, pool: &str, name: &str) -> Result<pb::VolumeUsage> {
        let v = self.get_volume(pool, name)?;
        let p = self.pool(pool)?;
        let allocated = match p.kind {
            PoolKind::Dir { .. } => sys::allocated_bytes(Path::new(&v.path))
                .map_err(Error::io("inspecting", &v.path))?,
            PoolKind::Block { .. } => v.size_bytes,
        };
        Ok(pb::VolumeUsage {
            size_bytes: v.size_bytes,
            allocated_bytes: allocated,
        })
    }

    pub(super) fn parse_origin(o: Option<pb::VolumeOrigin>) -> Result<Origin> {
        Ok(match o.and_then(|o| o.source) {
            None | Some(pb::volume_origin::Source::Empty(_)) => Origin::Empty,
            Some(pb::volume_origin::Source::Image(f)) => {
                check_image_path("image", &f.path)?;
                let metadata = if f.metadata_path.is_empty() {
                    None
                } else {
                    check_image_path("metadata tarball", &f.metadata_path)?;
                    Some(PathBuf::from(f.metadata_path))
                };
                Origin::Image {
                    path: PathBuf::from(f.path),
                    metadata,
                }
            }
            Some(pb::volume_origin::Source::ImageFingerprint(fp)) => {
                check_fingerprint(&fp)?;
                Origin::Fingerprint(fp)
            }
        })
    }

    pub(super) fn quota_check(&self, pool: &str, e: &PoolEntry, extra: u64) -> Result<()> {
        if let PoolKind::Dir { capacity_bytes, .. } = e.kind {
            if capacity_bytes > 0 {
                let p = self.pool_pb(pool, e, &self.lock());
                if p.provisioned_bytes.saturating_add(extra) > capacity_bytes {
                    return Err(Error::ResourceExhausted(format!(
                        "pool {pool:?}: {extra} more bytes exceed its capacity of {capacity_bytes} \
                         ({} provisioned)",
                        p.provisioned_bytes
                    )));
                }
            }
        }
        Ok(())
    }

    /// Finds a cached image for a volume of `pool`: the pool's own, or (block pools)
    /// any dir pool's.
    pub(super) fn find_image(&self, pool: &str, fp: &str) -> Result<ImageRecord> {
        let inner = self.lock();
        inner
            .images
            .get(&key(pool, fp))
            .or_else(|| inner.images.values().find(|i| i.fingerprint == fp))
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no cached image with fingerprint {fp}")))
    }

    /// CreateVolume.
    pub fn create_volume(&self, r: pb::CreateVolumeRequest) -> Result<pb::Volume> {
        check_name("pool", &r.pool)?;
        check_name("volume", &r.name)?;
        let origin = Self::parse_origin(r.origin)?;
        if r.size_bytes != 0 || origin == Origin::Empty {
            check_size(r.size_bytes)?;
        }
        let (pool, name) = (r.pool.as_str(), r.name.as_str());
        let _g = self.begin(vkey(pool, name), &format!("volume {pool}/{name}"))?;
        let pe = self.pool(pool)?;
        if let Some(rec) = self.record(pool, name) {
            let same_size = r.size_bytes == rec.requested_bytes || r.size_bytes == rec.size_bytes;
            if rec.origin == origin && same_size && rec.state != VolState::Creating {
                return Ok(self.volume_pb(&rec));
            }
            return Err(Error::AlreadyExists(format!(
                "volume {pool}/{name} exists with another size or origin"
            )));
        }
        // The size: the request's, or the image's.
        let (min_size, image) = match &origin {
            Origin::Empty => (r.size_bytes, None),
            Origin::Image { path, .. } => {
                let rep = image_unpack::inspect(path).map_err(|source| Error::Unpack {
                    step: "inspecting",
                    path: path.clone(),
                    source: Box::new(source),
                })?;
                (rep.size, None)
            }
            Origin::Fingerprint(fp) => {
                let img = self.find_image(pool, fp)?;
                (img.size_bytes, Some(img))
            }
        };
        if r.size_bytes != 0 && r.size_bytes < min_size {
            return Err(Error::InvalidArgument(format!(
                "size {} is smaller than the image's {min_size} bytes",
                r.size_bytes
            )));
        }
        let mut size = if r.size_bytes != 0 {
            r.size_bytes
        } else {
            round_up(min_size)
        };
        let uuid = uuid::Uuid::new_v4().to_string();
        // Choosing a device (or checking the quota) and recording the choice is one step:
        // two creates of different names must not both take the last device or space.
        let alloc = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        let (path, temp_path) = match &pe.kind {
            PoolKind::Dir { path: dir, .. } => {
                self.quota_check(pool, &pe, size)?;
                let vdir = dir.join("volumes");
                (
                    vdir.join(format!("{name}.img")),
                    Some(vdir.join(format!("{TMP_PREFIX}{name}-{uuid}.img"))),
                )
            }
            PoolKind::Block { devices } => {
                let (dev, dev_size) = self.pick_device(pool, devices, size)?;
                size = dev_size;
                (dev, None)
            }
        };
        let mut rec = VolumeRecord {
            pool: pool.to_owned(),
            name: name.to_owned(),
            uuid,
            size_bytes: size,
            state: VolState::Creating,
            origin: origin.clone(),
            path,
            temp_path,
            attachment: None,
            created_unix_ms: now_ms(),
            reflinked: false,
            requested_bytes: r.size_bytes,
            identity: None,
        };
        if matches!(pe.kind, PoolKind::Block { .. }) {
            rec.identity = self.sysfs.identity_of_path(&rec.path);
            if rec.identity.is_none() {
                tracing::warn!(device = %rec.path.display(),
                    "device has no stable identity (wwid, serial, loop backing file): \
                     hot-remove and re-add cannot follow it");
            }
        }
        self.put_record(&rec)?;
        drop(alloc);
        self.emit_state(pool, name, None, Some(VolState::Creating));
        self.pause("record-written");
        let progress = EventProgress::new(self, pool, name, "create");
        let filled = self.fill_volume(&rec, image.as_ref(), r.grow_last_partition, &progress);
        let finished = filled.and_then(|reflinked| {
            rec.reflinked = reflinked;
            self.pause("unpacked");
            if let Some(tmp) = &rec.temp_path {
                let dir = rec.path.parent().unwrap_or(Path::new("/"));
                fs::rename(tmp, &rec.path).map_err(Error::io("renaming", tmp))?;
                sys::fsync_dir(dir).map_err(Error::io("syncing", dir))?;
            }
            self.pause("renamed");
            rec.temp_path = None;
            rec.state = VolState::Ready;
            self.put_record(&rec)
        });
        match finished {
            Ok(()) => {
                self.emit_state(pool, name, Some(VolState::Creating), Some(VolState::Ready));
                tracing::info!(
                    pool,
                    volume = name,
                    size,
                    reflinked = rec.reflinked,
                    "volume created"
                );
                Ok(self.volume_pb(&rec))
            }
            Err(e) => {
                tracing::warn!(pool, volume = name, error = %e.chain(), "create failed; removing");
                self.discard_data(&rec);
                if let Err(e2) = self.drop_record(pool, name) {
                    tracing::error!(error = %e2.chain(), "removing the failed volume's record");
                }
                self.emit_state(pool, name, Some(VolState::Creating), None);
                Err(e)
            }
        }
    }

    pub(super) fn pick_device(
        &self,
        pool: &str,
        devices: &[PathBuf],
        size: u64,
    ) -> Result<(PathBuf, u64)> {
        // Devices are compared by device number: two stable names (by-id, by-path) of
        // one device are one device, whichever pool or volume names it.
        let used_paths: Vec<PathBuf> = self
            .lock()
            .volumes
            .values()
            .map(|v| v.path.clone())
            .collect();
        let used: HashSet<u64> = used_paths.iter().filter_map(|p| device_number(p)).collect();
        let mut best: Option<(PathBuf, u64)> = None;
        let free = devices
            .iter()
            .filter(|d| device_number(d).is_some_and(|n| !used.contains(&n)));
        for d in free {
            match sys::size_and_sector(d) {
                Ok((s, _)) if s >= size && best.as_ref().is_none_or(|b| s < b.1) => {
                    best = Some((d.clone(), s));
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(device = %d.display(), error = %e, "device unavailable"),
            }
        }
        best.ok_or_else(|| {
            Error::ResourceExhausted(format!("pool {pool:?} has no free device of {size} bytes"))
        })
    }

    /// Fills a CREATING volume's data; returns whether it was reflinked.
    pub(super) fn fill_volume(
        &self,
        rec: &VolumeRecord,
        image: Option<&ImageRecord>,
        grow_last_partition: bool,
        progress: &EventProgress<'_>,
    ) -> Result<bool> {
        let target = rec.temp_path.as_ref().unwrap_or(&rec.path);
        let is_file = rec.temp_path.is_some();
        if is_file {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(target)
                .map_err(Error::io("creating", target))?;
            f.set_len(rec.size_bytes)
                .map_err(Error::io("sizing", target))?;
        }
        let opts = UnpackOptions {
            scratch_dir: Some(self.state_dir.join("scratch")),
            grow_last_partition,
            zero_tail: !is_file,
            ..UnpackOptions::default()
        };
        let unpack = |img: &Path, metadata: Option<PathBuf>| -> Result<()> {
            let _ = fs::create_dir_all(self.state_dir.join("scratch"));
            let o = UnpackOptions {
                metadata,
                ..opts.clone()
            };
            image_unpack::unpack(img, target, &o, progress)
                .map(|_| ())
                .map_err(|source| Error::Unpack {
                    step: "unpacking image onto",
                    path: target.clone(),
                    source: Box::new(source),
                })
        };
        let mut reflinked = false;
        match (&rec.origin, image) {
            (Origin::Empty, _) if !is_file => {
                progress.phase("zero", Some(rec.size_bytes));
                let t = image_unpack::Target::open(target)
                    .map_err(|e| Error::io("opening", target)(std::io::Error::other(e)))?;
                t.zero_range(0, rec.size_bytes)
                    .map_err(|e| Error::io("zeroing", target)(std::io::Error::other(e)))?;
            }
            (Origin::Empty, _) => {}
            (Origin::Image { path, metadata }, _) => unpack(path, metadata.clone())?,
            (Origin::Fingerprint(_), Some(img)) if is_file => {
                progress.phase("clone", Some(img.size_bytes));
                reflinked = clone_file(&img.path, target)?;
                progress.advance(img.size_bytes);
                if (rec.size_bytes > img.size_bytes || grow_last_partition) && has_gpt(target) {
                    let o = RepairCommandOptions {
                        grow_last_partition,
                        ..Default::default()
                    };
                    image_unpack::repair(target, &o, progress).map_err(|source| Error::Unpack {
                        step: "repairing",
                        path: target.clone(),
                        source: Box::new(source),
                    })?;
                }
            }
            (Origin::Fingerprint(_), Some(img)) => unpack(&img.path, None)?,
            (Origin::Fingerprint(fp), None) => {
                return Err(Error::NotFound(format!(
                    "no cached image with fingerprint {fp}"
                )))
            }
        }
        self.pause("filled");
        let f = File::options()
            .write(true)
            .open(target)
            .map_err(Error::io("opening", target))?;
        f.sync_all().map_err(Error::io("syncing", target))?;
        Ok(reflinked)
    }

    /// Removes a volume's data: the temporary and final files, or wipes the device.
    pub(super) fn discard_data(&self, rec: &VolumeRecord) {
        if let Some(t) = &rec.temp_path {
            let _ = fs::remove_file(t);
        }
        let is_dev = fs::metadata(&rec.path).is_ok_and(|m| m.file_type().is_block_device());
        if is_dev {
            if let Err(e) = wipe_device(&rec.path) {
                tracing::error!(device = %rec.path.display(), error = %e, "wiping device");
            }
        } else if rec.state != VolState::Creating || rec.temp_path.is_none() {
            let _ = fs::remove_file(&rec.path);
        }
        if let Some(dir) = rec.path.parent() {
            let _ = sys::fsync_dir(dir);
        }
    }

    /// GrowVolume.
    pub fn grow_volume(&self, r: pb::GrowVolumeRequest) -> Result<pb::GrowVolumeResponse> {
        check_name("pool", &r.pool)?;
        check_name("volume", &r.name)?;
        let (pool, name) = (r.pool.as_str(), r.name.as_str());
        let _g = self.begin(vkey(pool, name), &format!("volume {pool}/{name}"))?;
        let pe = self.pool(pool)?;
        let mut rec = self
            .record(pool, name)
            .ok_or_else(|| Error::NotFound(format!("volume {pool}/{name} does not exist")))?;
        if r.size_bytes < rec.size_bytes {
            if rec.attachment.is_some() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {pool}/{name} is attached: it cannot shrink"
                )));
            }
            return Err(Error::InvalidArgument(format!(
                "size {} is smaller than the volume's {}: volumes do not shrink",
                r.size_bytes, rec.size_bytes
            )));
        }
        if r.size_bytes == rec.size_bytes {
            // Same size: repair the table if an earlier grow could not (it was attached).
            let (table_repaired, note) = if rec.attachment.is_some() {
                (false, "size unchanged".to_owned())
            } else {
                self.repair_table(&rec, r.grow_last_partition)?
            };
            return Ok(pb::GrowVolumeResponse {
                volume: Some(self.volume_pb(&rec)),
                table_repaired,
                note,
            });
        }
        check_size(r.size_bytes)?;
        if let PoolKind::Block { .. } = pe.kind {
            return Err(Error::ResourceExhausted(format!(
                "volume {pool}/{name} fills its device of {} bytes",
                rec.size_bytes
            )));
        }
        let old = rec.size_bytes;
        {
            // The GROWING record carries the new size, so concurrent quota checks count it.
            let _alloc = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
            self.quota_check(pool, &pe, r.size_bytes - rec.size_bytes)?;
            rec.state = VolState::Growing;
            rec.size_bytes = r.size_bytes;
            self.put_record(&rec)?;
        }
        self.emit_state(pool, name, Some(VolState::Ready), Some(VolState::Growing));
        let grown = (|| -> Result<(bool, String)> {
            let f = File::options()
                .write(true)
                .open(&rec.path)
                .map_err(Error::io("opening", &rec.path))?;
            f.set_len(r.size_bytes)
                .map_err(Error::io("extending", &rec.path))?;
            f.sync_all().map_err(Error::io("syncing", &rec.path))?;
            if rec.attachment.is_some() {
                return Ok((
                    false,
                    "attached: the guest owns the partition table; repair it in the guest \
                     or grow to this size again once detached"
                        .into(),
                ));
            }
            self.repair_table(&rec, r.grow_last_partition)
        })();
        // The file has its new size whether or not the repair succeeded.
        rec.size_bytes = fs::metadata(&rec.path).map(|m| m.len()).unwrap_or(old);
        rec.state = VolState::Ready;
        self.put_record(&rec)?;
        self.emit_state(pool, name, Some(VolState::Growing), Some(VolState::Ready));
        let (table_repaired, note) = grown?;
        tracing::info!(
            pool,
            volume = name,
            old,
            new = rec.size_bytes,
            table_repaired,
            "volume grown"
        );
        Ok(pb::GrowVolumeResponse {
            volume: Some(self.volume_pb(&rec)),
            table_repaired,
            note,
        })
    }

    /// Repairs a volume's GPT for its size (backup header to the end); returns whether
    /// anything was written, and why not.
    pub(super) fn repair_table(
        &self,
        rec: &VolumeRecord,
        grow_last_partition: bool,
    ) -> Result<(bool, String)> {
        if !has_gpt(&rec.path) {
            return Ok((false, "no GPT on the volume: nothing to repair".into()));
        }
        let progress = EventProgress::new(self, &rec.pool, &rec.name, "grow");
        let o = RepairCommandOptions {
            grow_last_partition,
            ..Default::default()
        };
        let rep =
            image_unpack::repair(&rec.path, &o, &progress).map_err(|source| Error::Unpack {
                step: "repairing",
                path: rec.path.clone(),
                source: Box::new(source),
            })?;
        let repaired = rep
            .table
            .repair
            .as_ref()
            .is_some_and(|x| !x.actions.is_empty());
        let note = match &rep.table.skipped {
            Some(s) => s.clone(),
            None if !repaired => "the partition table needed nothing".into(),
            None => String::new(),
        };
        Ok((repaired, note))
    }

    /// DeleteVolume: returns whether it existed.
    pub fn delete_volume(&self, pool: &str, name: &str) -> Result<bool> {
        check_name("pool", pool)?;
        check_name("volume", name)?;
        let _g = self.begin(vkey(pool, name), &format!("volume {pool}/{name}"))?;
        self.pool(pool)?;
        let Some(mut rec) = self.record(pool, name) else {
            return Ok(false);
        };
        if rec.attachment.is_some() {
            return Err(Error::FailedPrecondition(format!(
                "volume {pool}/{name} is attached: detach it first"
            )));
        }
        let old = rec.state;
        rec.state = VolState::Deleting;
        self.put_record(&rec)?;
        self.emit_state(pool, name, Some(old), Some(VolState::Deleting));
        self.discard_data(&rec);
        self.drop_record(pool, name)?;
        self.emit_state(pool, name, Some(VolState::Deleting), None);
        Ok(true)
    }
}
