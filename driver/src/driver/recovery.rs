//! Startup after a crash: half-made volumes removed, interrupted grows finished,
//! attached volumes exported again (a failed one stays failed).

use super::hotplug::Located;
use super::*;

impl Driver {
    pub(super) fn recover_volumes(&self) -> Result<()> {
        let all = self.store.volumes()?;
        // A rename interrupted between its two records: the new one names the old.
        let renamed: Vec<(String, String, String, PathBuf)> = all
            .iter()
            .filter_map(|r| {
                r.renamed_from
                    .clone()
                    .map(|from| (r.pool.clone(), from, r.uuid.clone(), r.path.clone()))
            })
            .collect();
        for mut rec in all {
            if let Some((_, _, _, new_path)) = renamed
                .iter()
                .find(|(p, from, uuid, _)| *p == rec.pool && *from == rec.name && *uuid == rec.uuid)
            {
                tracing::warn!(pool = %rec.pool, volume = %rec.name,
                    "a rename was interrupted: finishing it (the old record goes)");
                if let Ok(pool_entry) = self.pool(&rec.pool) {
                    pool_entry.backend.rename_done(&rec.path, new_path);
                }
                self.store.remove_volume(&rec.pool, &rec.name)?;
                continue;
            }
            match rec.state {
                VolState::Creating | VolState::Deleting => {
                    tracing::warn!(pool = %rec.pool, volume = %rec.name, state = ?rec.state,
                        "removing a volume interrupted while {}",
                        if rec.state == VolState::Creating { "being created" } else { "being deleted" });
                    if rec.state == VolState::Creating && rec.temp_path.is_some() {
                        // The final name may exist if the crash came after the rename.
                        let _ = fs::remove_file(&rec.path);
                    }
                    match self.pool(&rec.pool) {
                        Ok(pool_entry) if self.made_elsewhere(&pool_entry, &rec) => {
                            tracing::warn!(pool = %rec.pool, volume = %rec.name,
                                "another host made a volume of that name: left alone");
                        }
                        Ok(pool_entry) => pool_entry.backend.discard(&backing(&rec)),
                        Err(_) => tracing::warn!(pool = %rec.pool, volume = %rec.name,
                            "its pool is gone: only the record is removed"),
                    }
                    self.store.remove_volume(&rec.pool, &rec.name)?;
                    continue;
                }
                VolState::Growing => {
                    rec.size_bytes = fs::metadata(&rec.path)
                        .map(|m| m.len())
                        .unwrap_or(rec.size_bytes);
                    rec.state = VolState::Ready;
                    tracing::warn!(pool = %rec.pool, volume = %rec.name, size = rec.size_bytes,
                        "grow was interrupted; run GrowVolume again to repair the partition table");
                    self.store.put_volume(&rec)?;
                }
                VolState::Ready => {}
            }
            self.lock().volumes.insert(rec.id(), rec.clone());
            let Some(a) = rec.attachment.clone() else {
                continue;
            };
            if let Some(why) = &a.failed {
                tracing::warn!(pool = %rec.pool, volume = %rec.name, reason = %why,
                    "not re-exporting: the export had stopped on its own; attach again or detach");
                continue;
            }
            if self.is_block_pool(&rec.pool) {
                match self.locate_backing(&mut rec) {
                    Ok(Located::Here) | Ok(Located::Unidentified) => {}
                    Ok(Located::Moved(from)) => {
                        tracing::warn!(pool = %rec.pool, volume = %rec.name, from = %from.display(),
                            to = %rec.path.display(), "backing device found under a new name");
                        self.put_record(&rec)?;
                    }
                    Ok(Located::Absent) => {
                        // Keep the attachment: the export starts when the device appears
                        // (hotplug), on the same socket.
                        tracing::warn!(pool = %rec.pool, volume = %rec.name,
                            identity = %rec.identity.as_ref().map(|i| i.to_string()).unwrap_or_default(),
                            "backing device absent: the export waits for it");
                        self.lock().live.insert(rec.id(), Live::WaitingForDevice);
                        continue;
                    }
                    Err(e) => tracing::warn!(pool = %rec.pool, volume = %rec.name,
                        error = %e.chain(), "recording the backing device's identity"),
                }
            }
            if let Err(e) = self.start_export(&rec, &a) {
                tracing::error!(pool = %rec.pool, volume = %rec.name, error = %e.chain(),
                    "re-exporting an attached volume failed; marking it detached");
                rec.attachment = None;
                self.put_record(&rec)?;
            } else {
                tracing::info!(pool = %rec.pool, volume = %rec.name, "re-exported attached volume");
            }
        }
        Ok(())
    }

    pub(super) fn recover_images(&self) -> Result<()> {
        for rec in self.store.images()? {
            if !rec.path.is_file() {
                tracing::warn!(fingerprint = %rec.fingerprint, "cached image file missing; forgetting it");
                self.store.remove_image(&rec.pool, &rec.fingerprint)?;
                continue;
            }
            self.lock().images.insert(rec.id(), rec);
        }
        Ok(())
    }

    /// Shared pools: their records read, and the volumes this host had attached exported
    /// again. This host's previous process held their locks; it is gone, so they are
    /// taken back (fenced first). A pool that is unavailable now is read when it is used.
    pub(super) fn recover_shared(&self) {
        let pools: Vec<String> = self
            .lock()
            .pools
            .iter()
            .filter(|(_, e)| e.backend.shared().is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for pool in pools {
            if let Err(e) = self.refresh_shared(&pool) {
                tracing::warn!(pool, error = %e.chain(), "shared pool not read at startup");
                continue;
            }
            let mine: Vec<VolumeRecord> = self
                .lock()
                .volumes
                .values()
                .filter(|r| r.pool == pool)
                .filter(|r| {
                    r.attachment
                        .as_ref()
                        .is_some_and(|a| a.host == self.node && a.failed.is_none())
                })
                .cloned()
                .collect();
            for mut rec in mine {
                let Some(a) = rec.attachment.clone() else {
                    continue;
                };
                if self.lock().live.contains_key(&rec.id()) {
                    continue;
                }
                if let Ok(e) = self.pool(&pool) {
                    if let Some(shared) = e.backend.shared() {
                        match shared.fence(&rec.path) {
                            Ok(old) if !old.is_empty() => tracing::warn!(pool, volume = %rec.name,
                                fenced = ?old, "lock of this host's previous process broken"),
                            Ok(_) => {}
                            Err(e) => tracing::warn!(pool, volume = %rec.name, error = %e.chain(),
                                "breaking the lock of this host's previous process"),
                        }
                    }
                }
                match self.start_export(&rec, &a) {
                    Ok(()) => {
                        tracing::info!(pool, volume = %rec.name, "re-exported attached volume")
                    }
                    Err(e) => {
                        tracing::error!(pool, volume = %rec.name, error = %e.chain(),
                            "re-exporting an attached volume failed; marking it detached");
                        rec.attachment = None;
                        if let Err(e) = self.put_record(&rec) {
                            tracing::error!(pool, volume = %rec.name, error = %e.chain(),
                                "recording the detach");
                        }
                    }
                }
            }
        }
    }

    /// Whether a shared pool holds a complete volume named as `rec` with another UUID
    /// (this host crashed before making its own): then it is not this host's to remove.
    fn made_elsewhere(&self, pool_entry: &PoolEntry, rec: &VolumeRecord) -> bool {
        let Some(shared) = pool_entry.backend.shared() else {
            return false;
        };
        shared.volume_records().is_ok_and(|all| {
            all.iter()
                .filter_map(|j| serde_json::from_str::<VolumeRecord>(j).ok())
                .any(|r| r.name == rec.name && r.pool == rec.pool && r.uuid != rec.uuid)
        })
    }
}
