//! Volumes: create (empty, from an image, cloned from a cached image, a volume or a
//! snapshot), grow with the partition-table repair, rename, delete, and what they are
//! filled with.

use std::fs::File;

use image_unpack::{Progress, RepairCommandOptions, UnpackOptions};

use super::*;
use crate::model::{GrowVolume, Grown, NewVolume, Usage};
use crate::names::{check_fingerprint, check_image_path, check_name, check_size, round_up};
use crate::pool::Cloned;
use crate::state::Origin;

impl Driver {
    /// GetVolume.
    pub fn get_volume(&self, id: &VolumeId) -> Result<Volume> {
        check_volume_id(id)?;
        self.pool(&id.pool)?;
        self.refresh_shared(&id.pool)?;
        let r = self
            .record(id)
            .ok_or_else(|| Error::VolumeNotFound(id.clone()))?;
        Ok(self.view(&r))
    }

    /// ListVolumes ("" for every pool).
    pub fn list_volumes(&self, pool: &str) -> Result<Vec<Volume>> {
        if !pool.is_empty() {
            check_name("pool", pool)?;
            self.pool(pool)?;
            self.refresh_shared(pool)?;
        } else {
            let names: Vec<String> = self.lock().pools.keys().cloned().collect();
            for p in names {
                // Every pool: one that cannot be read now is listed as last read.
                if let Err(e) = self.refresh_shared(&p) {
                    tracing::warn!(pool = %p, error = %e.chain(), "listing a shared pool");
                }
            }
        }
        let recs: Vec<VolumeRecord> = self
            .lock()
            .volumes
            .values()
            .filter(|v| pool.is_empty() || v.pool == pool)
            .cloned()
            .collect();
        Ok(recs.iter().map(|r| self.view(r)).collect())
    }

    /// GetVolumeUsage.
    pub fn volume_usage(&self, id: &VolumeId) -> Result<Usage> {
        let v = self.get_volume(id)?;
        let p = self.pool(&id.pool)?;
        Ok(Usage {
            size_bytes: v.size_bytes,
            allocated_bytes: p.backend.allocated(&v.path, v.size_bytes)?,
        })
    }

    /// Finds a cached image for a volume of `pool`: the pool's own, or (block pools)
    /// any dir pool's.
    pub(super) fn find_image(&self, pool: &str, fp: &str) -> Result<ImageRecord> {
        let inner = self.lock();
        inner
            .images
            .get(&ImageId::new(pool, fp))
            .or_else(|| inner.images.values().find(|i| i.fingerprint == fp))
            .cloned()
            .ok_or_else(|| Error::ImageNotFound(fp.to_owned()))
    }

    /// CreateVolume: idempotent for the same size and origin.
    pub fn create_volume(&self, req: NewVolume) -> Result<Volume> {
        let id = &req.id;
        check_volume_id(id)?;
        check_origin(&req.origin)?;
        if req.size_bytes != 0 || req.origin == Origin::Empty {
            check_size(req.size_bytes)?;
        }
        let _g = self.begin_volume(id)?;
        let pool_entry = self.pool(&id.pool)?;
        self.refresh_shared(&id.pool)?;
        if let Some(rec) = self.record(id) {
            let same_size =
                req.size_bytes == rec.requested_bytes || req.size_bytes == rec.size_bytes;
            if rec.origin == req.origin && same_size && rec.state != VolState::Creating {
                return Ok(self.view(&rec));
            }
            return Err(Error::AlreadyExists {
                what: format!("volume {id}"),
                how: "with another size or origin".into(),
            });
        }
        // The size: the request's, or the image's (the source volume's or snapshot's).
        let mut clone_from = None;
        let mut _source_guard = None;
        let (min_size, image) = match &req.origin {
            Origin::Empty => (req.size_bytes, None),
            Origin::Volume { name, snapshot } => {
                let src = VolumeId::new(&id.pool, name);
                if src == *id {
                    return Err(Error::BadRequest(format!(
                        "volume {id} cannot be cloned from itself"
                    )));
                }
                // The source stays as it is (not grown, restored, deleted) while copied.
                _source_guard = Some(self.begin_volume(&src)?);
                let (path, len) = self.clone_source(&src, snapshot.as_deref())?;
                clone_from = Some((path, len));
                (len, None)
            }
            Origin::Image { path, .. } => {
                let rep = image_unpack::inspect(path).map_err(|source| Error::Unpack {
                    step: "inspecting",
                    path: path.clone(),
                    source: Box::new(source),
                })?;
                (rep.size, None)
            }
            Origin::Fingerprint(fp) => {
                let img = self.find_image(&id.pool, fp)?;
                (img.size_bytes, Some(img))
            }
        };
        if req.size_bytes != 0 && req.size_bytes < min_size {
            return Err(Error::BadRequest(format!(
                "size {} is smaller than the image's {min_size} bytes",
                req.size_bytes
            )));
        }
        let size = if req.size_bytes != 0 {
            req.size_bytes
        } else {
            round_up(min_size)
        };
        let uuid = uuid::Uuid::new_v4().to_string();
        // Choosing the place (checking the quota, taking a device) and recording the
        // choice is one step: two creates must not both take the last space or device.
        let alloc = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        self.quota_check(&id.pool, &pool_entry, size)?;
        let taken = Self::taken(&self.lock());
        let placed = pool_entry.backend.place(id, &uuid, size, &taken)?;
        let mut rec = VolumeRecord {
            pool: id.pool.clone(),
            name: id.name.clone(),
            uuid,
            size_bytes: placed.size_bytes,
            state: VolState::Creating,
            origin: req.origin.clone(),
            path: placed.path.clone(),
            temp_path: placed.temp_path.clone(),
            attachment: None,
            created_unix_ms: now_ms(),
            reflinked: false,
            requested_bytes: req.size_bytes,
            identity: None,
            snapshots: Vec::new(),
            renamed_from: None,
        };
        if pool_entry.backend.follows_devices() {
            rec.identity = pool_entry.backend.identity(&rec.path);
            if rec.identity.is_none() {
                tracing::warn!(device = %rec.path.display(),
                    "device has no stable identity (wwid, serial, loop backing file): \
                     hot-remove and re-add cannot follow it");
            }
        }
        self.put_record(&rec)?;
        drop(alloc);
        self.emit_state(id, None, Some(VolState::Creating));
        self.pause("record-written");
        let progress = EventProgress::new(self, &id.pool, &id.name, "create");
        // Nothing was made if this fails (a shared pool's image of that name made by
        // another host, say): only the record goes.
        if let Err(e) = pool_entry.backend.create(&backing(&rec)) {
            if let Err(e2) = self.drop_record(id) {
                tracing::error!(error = %e2.chain(), "removing the failed volume's record");
            }
            self.emit_state(id, Some(VolState::Creating), None);
            return Err(e);
        }
        let filled = self.fill(
            &pool_entry,
            &rec,
            image.as_ref(),
            clone_from.as_ref().map(|(p, len)| (p.as_path(), *len)),
            req.grow_last_partition,
            &progress,
        );
        let finished = filled.and_then(|reflinked| {
            rec.reflinked = reflinked;
            self.pause("unpacked");
            pool_entry.backend.commit(&backing(&rec))?;
            self.pause("renamed");
            rec.temp_path = None;
            rec.state = VolState::Ready;
            self.put_record(&rec)
        });
        match finished {
            Ok(()) => {
                self.emit_state(id, Some(VolState::Creating), Some(VolState::Ready));
                tracing::info!(pool = %id.pool, volume = %id.name, size = rec.size_bytes,
                    reflinked = rec.reflinked, "volume created");
                Ok(self.view(&rec))
            }
            Err(e) => {
                tracing::warn!(pool = %id.pool, volume = %id.name, error = %e.chain(),
                    "create failed; removing");
                pool_entry.backend.discard(&backing(&rec));
                if let Err(e2) = self.drop_record(id) {
                    tracing::error!(error = %e2.chain(), "removing the failed volume's record");
                }
                self.emit_state(id, Some(VolState::Creating), None);
                Err(e)
            }
        }
    }

    /// Where a clone's data comes from: the snapshot's or the (detached) volume's, and
    /// its length.
    pub(super) fn clone_source(
        &self,
        src: &VolumeId,
        snapshot: Option<&str>,
    ) -> Result<(PathBuf, u64)> {
        let rec = self
            .record(src)
            .ok_or_else(|| Error::VolumeNotFound(src.clone()))?;
        if rec.state != VolState::Ready {
            return Err(Error::NotReady(src.clone()));
        }
        match snapshot {
            Some(name) => rec
                .snapshots
                .iter()
                .find(|s| s.name == name)
                .map(|s| (s.path.clone(), s.size_bytes))
                .ok_or_else(|| Error::SnapshotNotFound {
                    pool: src.pool.clone(),
                    name: format!("{name} (of volume {})", src.name),
                }),
            None if rec.attachment.is_some() => Err(Error::Attached {
                id: src.clone(),
                what: "a volume in use is cloned from a snapshot of it: snapshot it, \
                       clone the snapshot",
            }),
            None => Ok((rec.path.clone(), rec.size_bytes)),
        }
    }

    /// Fills a CREATING volume's data; returns whether it was reflinked.
    fn fill(
        &self,
        pool_entry: &PoolEntry,
        rec: &VolumeRecord,
        image: Option<&ImageRecord>,
        clone_from: Option<(&Path, u64)>,
        grow_last_partition: bool,
        progress: &EventProgress<'_>,
    ) -> Result<bool> {
        let placed = backing(rec);
        let target = placed.target();
        let unpack = |img: &Path, metadata: Option<PathBuf>| -> Result<()> {
            let scratch = self.state_dir.join("scratch");
            let _ = fs::create_dir_all(&scratch);
            let o = UnpackOptions {
                metadata,
                scratch_dir: Some(scratch),
                grow_last_partition,
                zero_tail: pool_entry.backend.needs_zeroing(),
                // Just created, holes everywhere: zero ranges are not written.
                target_is_new: !pool_entry.backend.needs_zeroing(),
                ..UnpackOptions::default()
            };
            image_unpack::unpack(img, target, &o, progress)
                .map(|_| ())
                .map_err(|source| Error::Unpack {
                    step: "unpacking image onto",
                    path: target.to_owned(),
                    source: Box::new(source),
                })
        };
        // A clone larger than its source (or asked to): the backup GPT to the new end.
        let repair_clone = |source_len: u64| -> Result<()> {
            if (rec.size_bytes > source_len || grow_last_partition) && has_gpt(target) {
                let o = RepairCommandOptions {
                    grow_last_partition,
                    ..Default::default()
                };
                image_unpack::repair(target, &o, progress).map_err(|source| Error::Unpack {
                    step: "repairing",
                    path: target.to_owned(),
                    source: Box::new(source),
                })?;
            }
            Ok(())
        };
        let mut reflinked = false;
        match (&rec.origin, image) {
            (Origin::Volume { name, .. }, _) => {
                let (src, len) = clone_from.ok_or_else(|| {
                    Error::BadRequest(format!("volume {name} to clone is not known"))
                })?;
                progress.phase("clone", Some(len));
                match pool_entry.backend.clone_volume(src, len, &placed)? {
                    Cloned::Unpack => {
                        return Err(Error::Unimplemented(format!(
                            "pool {} does not clone volumes",
                            rec.pool
                        )))
                    }
                    how => reflinked = how == Cloned::Reflinked,
                }
                progress.advance(len);
                repair_clone(len)?;
            }
            (Origin::Empty, _) if pool_entry.backend.needs_zeroing() => {
                progress.phase("zero", Some(rec.size_bytes));
                let t = image_unpack::Target::open(target)
                    .map_err(|e| Error::io("opening", target)(std::io::Error::other(e)))?;
                t.zero_range(0, rec.size_bytes)
                    .map_err(|e| Error::io("zeroing", target)(std::io::Error::other(e)))?;
            }
            (Origin::Empty, _) => {}
            (Origin::Image { path, metadata }, _) => unpack(path, metadata.clone())?,
            (Origin::Fingerprint(_), Some(img)) => {
                progress.phase("clone", Some(img.size_bytes));
                match pool_entry.backend.clone_image(&img.path, &placed)? {
                    Cloned::Unpack => unpack(&img.path, None)?,
                    how => {
                        reflinked = how == Cloned::Reflinked;
                        progress.advance(img.size_bytes);
                        repair_clone(img.size_bytes)?;
                    }
                }
            }
            (Origin::Fingerprint(fp), None) => return Err(Error::ImageNotFound(fp.clone())),
        }
        self.pause("filled");
        if pool_entry.backend.shared().is_none() {
            // Files and devices: durable before the volume is READY (librbd's writes are
            // durable when they complete, and unpack flushed).
            let f = File::options()
                .write(true)
                .open(target)
                .map_err(Error::io("opening", target))?;
            f.sync_all().map_err(Error::io("syncing", target))?;
        }
        Ok(reflinked)
    }

    /// GrowVolume: the volume's storage grown, then (detached) its partition table
    /// repaired for the new size.
    pub fn grow_volume(&self, req: GrowVolume) -> Result<Grown> {
        let id = &req.id;
        check_volume_id(id)?;
        let _g = self.begin_volume(id)?;
        let pool_entry = self.pool(&id.pool)?;
        self.refresh_shared(&id.pool)?;
        let mut rec = self
            .record(id)
            .ok_or_else(|| Error::VolumeNotFound(id.clone()))?;
        if req.size_bytes < rec.size_bytes {
            if rec.attachment.is_some() {
                return Err(Error::Attached {
                    id: id.clone(),
                    what: "it cannot shrink",
                });
            }
            return Err(Error::BadRequest(format!(
                "size {} is smaller than the volume's {}: volumes do not shrink",
                req.size_bytes, rec.size_bytes
            )));
        }
        if req.size_bytes == rec.size_bytes {
            // Same size: repair the table if an earlier grow could not (it was attached).
            let (table_repaired, note) = if rec.attachment.is_some() {
                (false, "size unchanged".to_owned())
            } else {
                self.repair_table(&rec, req.grow_last_partition)?
            };
            return Ok(Grown {
                volume: self.view(&rec),
                table_repaired,
                note,
            });
        }
        check_size(req.size_bytes)?;
        if !pool_entry.backend.grows() {
            pool_entry.backend.grow(&rec.path, req.size_bytes)?;
        }
        let old = rec.size_bytes;
        {
            // The GROWING record carries the new size, so concurrent quota checks count it.
            let _alloc = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
            self.quota_check(&id.pool, &pool_entry, req.size_bytes - rec.size_bytes)?;
            rec.state = VolState::Growing;
            rec.size_bytes = req.size_bytes;
            self.put_record(&rec)?;
        }
        self.emit_state(id, Some(VolState::Ready), Some(VolState::Growing));
        let mut new_size = None;
        let grown = pool_entry
            .backend
            .grow(&rec.path, req.size_bytes)
            .and_then(|size| {
                rec.size_bytes = size;
                new_size = Some(size);
                if rec.attachment.is_some() {
                    return Ok((false, self.grow_online(id)));
                }
                self.repair_table(&rec, req.grow_last_partition)
            });
        // The storage has its new size whether or not the repair succeeded.
        rec.size_bytes = new_size
            .or_else(|| fs::metadata(&rec.path).ok().map(|m| m.len()))
            .unwrap_or(old);
        rec.state = VolState::Ready;
        self.put_record(&rec)?;
        self.emit_state(id, Some(VolState::Growing), Some(VolState::Ready));
        let (table_repaired, note) = grown?;
        tracing::info!(pool = %id.pool, volume = %id.name, old, new = rec.size_bytes,
            table_repaired, "volume grown");
        Ok(Grown {
            volume: self.view(&rec),
            table_repaired,
            note,
        })
    }

    /// An attached volume grew: its export shows the guest the new capacity now
    /// (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG); the partition table is the guest's to grow.
    /// Returns the note for the reply.
    fn grow_online(&self, id: &VolumeId) -> String {
        let export = self
            .lock()
            .live
            .get(id)
            .and_then(Live::export)
            .map(|(e, _)| e.clone());
        let told = match export {
            Some(e) => match e.grow() {
                Ok(bytes) => format!("the running guest sees {bytes} bytes now"),
                Err(err) => {
                    tracing::warn!(pool = %id.pool, volume = %id.name, error = %format!("{err:#}"),
                        "telling the frontend of the new size");
                    format!("the guest sees the new size when it reconnects or reboots ({err:#})")
                }
            },
            None => "the guest sees the new size when its export starts".into(),
        };
        format!(
            "attached: {told}; the partition table is at the image's sector size inside the \
             guest: grow it there (growpart, sgdisk -e), or grow to this size again once \
             detached"
        )
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

    /// RenameVolume of a detached volume; its snapshots follow it. Once renamed, the
    /// same call again returns the renamed volume.
    pub fn rename_volume(&self, id: &VolumeId, new_name: &str) -> Result<Volume> {
        check_volume_id(id)?;
        check_name("new volume", new_name)?;
        let to = VolumeId::new(&id.pool, new_name);
        if *id == to {
            return self.get_volume(id);
        }
        let _g = self.begin_volume(id)?;
        let _g2 = self.begin_volume(&to)?;
        let pool_entry = self.pool(&id.pool)?;
        self.refresh_shared(&id.pool)?;
        let Some(mut rec) = self.record(id) else {
            return match self.record(&to) {
                Some(r) => Ok(self.view(&r)),
                None => Err(Error::VolumeNotFound(id.clone())),
            };
        };
        if self.record(&to).is_some() {
            return Err(Error::AlreadyExists {
                what: format!("volume {to}"),
                how: format!("(renaming {id})"),
            });
        }
        if rec.attachment.is_some() {
            return Err(Error::Attached {
                id: id.clone(),
                what: "detach it before renaming",
            });
        }
        if rec.state != VolState::Ready {
            return Err(Error::NotReady(id.clone()));
        }
        // The storage renamed (dir: linked, the old name kept until the records are
        // done), the new record (naming the old one), the old record dropped, the old
        // name of the storage let go, the mark cleared. A crash anywhere leaves the
        // volume under one name or the other (startup drops an old record the new one
        // names; a retry finishes a rename the storage already has).
        let old_path = rec.path.clone();
        let snapshots: Vec<PathBuf> = rec.snapshots.iter().map(|s| s.path.clone()).collect();
        let (path, moved) = pool_entry.backend.rename(&rec.path, &to, &snapshots)?;
        rec.name = to.name.clone();
        rec.path = path;
        for (s, p) in rec.snapshots.iter_mut().zip(moved) {
            s.path = p;
        }
        rec.renamed_from = Some(id.name.clone());
        self.put_record(&rec)?;
        self.drop_record(id)?;
        pool_entry.backend.rename_done(&old_path, &rec.path);
        rec.renamed_from = None;
        self.put_record(&rec)?;
        self.emit_state(id, Some(VolState::Ready), None);
        self.emit_state(&to, None, Some(VolState::Ready));
        tracing::info!(pool = %id.pool, volume = %id.name, new_name, "volume renamed");
        Ok(self.view(&rec))
    }

    /// DeleteVolume: returns whether it existed.
    pub fn delete_volume(&self, id: &VolumeId) -> Result<bool> {
        check_volume_id(id)?;
        let _g = self.begin_volume(id)?;
        let pool_entry = self.pool(&id.pool)?;
        self.refresh_shared(&id.pool)?;
        let Some(mut rec) = self.record(id) else {
            return Ok(false);
        };
        if let Some(host) = rec
            .attachment
            .as_ref()
            .filter(|a| a.failed.is_none() && !a.host.is_empty() && a.host != self.node)
            .map(|a| a.host.clone())
        {
            return Err(Error::AttachedElsewhere {
                id: id.clone(),
                host,
                what: "detach it on that host first".into(),
            });
        }
        if rec.attachment.is_some() {
            return Err(Error::Attached {
                id: id.clone(),
                what: "detach it first",
            });
        }
        let old = rec.state;
        rec.state = VolState::Deleting;
        self.put_record(&rec)?;
        self.emit_state(id, Some(old), Some(VolState::Deleting));
        self.drop_snapshots(&pool_entry, &rec);
        if let Err(e) = pool_entry.backend.remove(&backing(&rec)) {
            // Still there (in use by another client, say): the volume stays.
            rec.state = old;
            self.put_record(&rec)?;
            self.emit_state(id, Some(VolState::Deleting), Some(old));
            return Err(e);
        }
        self.drop_record(id)?;
        self.emit_state(id, Some(VolState::Deleting), None);
        Ok(true)
    }
}

/// Checks a volume id's pool and volume names.
pub(super) fn check_volume_id(id: &VolumeId) -> Result<()> {
    check_name("pool", &id.pool)?;
    check_name("volume", &id.name)
}

/// Checks what a volume is to be made from: image files that exist, a fingerprint.
fn check_origin(o: &Origin) -> Result<()> {
    match o {
        Origin::Empty => Ok(()),
        Origin::Image { path, metadata } => {
            check_image_path("image", path)?;
            match metadata {
                Some(m) => check_image_path("metadata tarball", m),
                None => Ok(()),
            }
        }
        Origin::Fingerprint(fp) => check_fingerprint(fp),
        Origin::Volume { name, snapshot } => {
            check_name("source volume", name)?;
            match snapshot {
                Some(s) => check_name("source snapshot", s),
                None => Ok(()),
            }
        }
    }
}
