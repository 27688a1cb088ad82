//! The driver side of hotplug: block-pool volumes followed by their device's identity;
//! removals and returns reported by the monitor or by an export.

use super::*;

impl Driver {
    pub(super) fn is_block_pool(&self, pool: &str) -> bool {
        self.lock()
            .pools
            .get(pool)
            .is_some_and(|p| matches!(p.kind, PoolKind::Block { .. }))
    }

    /// Finds a block volume's device by its identity: records the identity if the record
    /// has none yet (records written before identities were), and follows the device to a
    /// new name when the old path is gone or holds another device.
    pub(super) fn locate_backing(&self, rec: &mut VolumeRecord) -> Result<Located> {
        let here = self.sysfs.identity_of_path(&rec.path);
        let Some(want) = rec.identity.clone() else {
            if here.is_none() {
                return Ok(Located::Unidentified);
            }
            rec.identity = here;
            self.put_record(rec)?;
            return Ok(Located::Here);
        };
        if here.as_ref().is_some_and(|h| h.same_device(&want)) {
            return Ok(Located::Here);
        }
        let present = self
            .sysfs
            .block_devs()
            .map_err(Error::io("listing", "/sys/class/block"))?;
        let found = self.taints.filter(present).into_iter().find(|d| {
            d.size_bytes >= rec.size_bytes
                && d.identity.as_ref().is_some_and(|i| i.same_device(&want))
        });
        match found {
            Some(d) => {
                let from = std::mem::replace(&mut rec.path, d.devnode);
                Ok(Located::Moved(from))
            }
            None => Ok(Located::Absent),
        }
    }

    pub(crate) fn hotplug_taints(&self) -> &Taints {
        &self.taints
    }

    /// The attached volumes of block pools whose device has an identity, for
    /// [`crate::hotplug::reconcile`].
    pub(crate) fn hotplug_tracked(&self, sysfs: &Sysfs) -> Vec<Tracked> {
        let (recs, exports): (Vec<VolumeRecord>, HashMap<_, _>) = {
            let inner = self.lock();
            let recs = inner
                .volumes
                .values()
                .filter(|v| v.attachment.is_some() && v.identity.is_some())
                .filter(|v| {
                    inner
                        .pools
                        .get(&v.pool)
                        .is_some_and(|p| matches!(p.kind, PoolKind::Block { .. }))
                })
                .cloned()
                .collect();
            (recs, inner.exports.clone())
        };
        recs.into_iter()
            .filter_map(|r| {
                let state = match exports.get(&key(&r.pool, &r.name)) {
                    None => TrackedState::Missing,
                    Some(h) if h.state() == BackendState::Removed => TrackedState::Removed,
                    Some(_) => TrackedState::Active,
                };
                Some(Tracked {
                    current: sysfs.name_of_path(&r.path),
                    identity: r.identity?,
                    size_bytes: r.size_bytes,
                    state,
                    pool: r.pool,
                    volume: r.name,
                })
            })
            .collect()
    }

    /// Carries out one hotplug decision; false if the volume was busy (try again later).
    pub(crate) fn hotplug_apply(self: &Arc<Self>, d: &Decision, sysfs: &Sysfs) -> bool {
        let (pool, name) = match d {
            Decision::Remove { pool, volume, .. }
            | Decision::Resume { pool, volume, .. }
            | Decision::Start { pool, volume, .. } => (pool.as_str(), volume.as_str()),
        };
        let Ok(_g) = self.begin(vkey(pool, name), &format!("volume {pool}/{name}")) else {
            tracing::info!(
                pool,
                volume = name,
                "volume busy: hotplug decision deferred"
            );
            return false;
        };
        let Some(mut rec) = self.record(pool, name) else {
            return true;
        };
        if rec.attachment.is_none() {
            return true;
        }
        let h = self.lock().exports.get(&key(pool, name)).cloned();
        match (d, h) {
            (Decision::Remove { reason, .. }, Some(h)) => {
                tracing::warn!(pool, volume = name, device = %rec.path.display(), reason, "backing device removed");
                self.note_removed(pool, name, reason, &rec.path);
                h.remove(reason);
            }
            (Decision::Resume { device, .. }, Some(h)) => {
                // The record names the new device before the export serves it, so
                // whoever hears of the resume finds the record already up to date.
                let previous = std::mem::replace(&mut rec.path, device.clone());
                if let Err(e) = self.put_record(&rec) {
                    tracing::error!(pool, volume = name, error = %e.chain(), "recording the new device path");
                    return true;
                }
                if let Err(e) = h.resume(device) {
                    tracing::error!(pool, volume = name, device = %device.display(), error = format!("{e:#}"),
                        "resuming on the returned device failed");
                    rec.path = previous;
                    if let Err(e) = self.put_record(&rec) {
                        tracing::error!(pool, volume = name, error = %e.chain(), "restoring the device path");
                    }
                    // Not this device, for now: wait for it to change.
                    if let Some(n) = sysfs.name_of_path(device) {
                        let seq = sysfs.block_dev(&n).and_then(|b| b.diskseq);
                        self.taints.taint(&n, seq);
                    }
                    return true;
                }
                tracing::info!(pool, volume = name, device = %device.display(),
                    previous = %previous.display(), "backing device back: export resumed");
                self.note_resumed(pool, name, device);
            }
            (Decision::Start { device, .. }, None) => {
                let previous = std::mem::replace(&mut rec.path, device.clone());
                let a = rec.attachment.clone().unwrap_or_else(|| unreachable!());
                match self.start_export(&rec, &a) {
                    Ok(()) => {
                        if let Err(e) = self.put_record(&rec) {
                            tracing::error!(pool, volume = name, error = %e.chain(), "recording the new device path");
                        }
                        tracing::info!(pool, volume = name, device = %device.display(),
                            "backing device appeared: export started");
                        self.emit(
                            pool,
                            name,
                            pb::event::Kind::BackendResumed(pb::BackendResumed {
                                device: device.display().to_string(),
                                previous_device: previous.display().to_string(),
                            }),
                        );
                    }
                    Err(e) => tracing::error!(pool, volume = name, error = %e.chain(),
                        "starting the export on the appeared device failed"),
                }
            }
            // The export went away (detach) or appeared meanwhile: the next pass decides.
            _ => {}
        }
        true
    }

    /// Records (once) that a volume's backing is removed, and tells Watch.
    pub(super) fn note_removed(&self, pool: &str, name: &str, reason: &str, device: &Path) -> bool {
        let first = self
            .lock()
            .removed
            .insert(key(pool, name), (reason.to_owned(), device.to_owned()))
            .is_none();
        if first {
            self.emit(
                pool,
                name,
                pb::event::Kind::BackendRemoved(pb::BackendRemoved {
                    reason: reason.to_owned(),
                    device: device.display().to_string(),
                }),
            );
        }
        first
    }

    /// Records (once) that a volume's backing is served again, and tells Watch.
    pub(super) fn note_resumed(&self, pool: &str, name: &str, device: &Path) {
        let was = self.lock().removed.remove(&key(pool, name));
        if let Some((_, previous)) = was {
            self.emit(
                pool,
                name,
                pb::event::Kind::BackendResumed(pb::BackendResumed {
                    device: device.display().to_string(),
                    previous_device: previous.display().to_string(),
                }),
            );
        }
    }

    /// An export's own report (on the export's threads).
    pub(super) fn backend_event(&self, pool: &str, name: &str, e: &BackendEvent) {
        match e {
            BackendEvent::Removed { reason } => {
                let Some(rec) = self.record(pool, name) else {
                    return;
                };
                if self.note_removed(pool, name, reason, &rec.path) {
                    // The export found out by itself (its I/O failed with ENODEV/ENXIO):
                    // the device at its path counts as gone until it gets a new medium.
                    tracing::warn!(pool, volume = name, device = %rec.path.display(), reason,
                        "export reports its volume removed");
                    if let Some(n) = self.sysfs.name_of_path(&rec.path) {
                        let seq = self.sysfs.block_dev(&n).and_then(|b| b.diskseq);
                        self.taints.taint(&n, seq);
                    }
                }
            }
            BackendEvent::Resumed { volume } => self.note_resumed(pool, name, volume),
            BackendEvent::TimedOut { requests } => {
                tracing::warn!(
                    pool,
                    volume = name,
                    requests,
                    "requests failed by the I/O timeout"
                );
                self.emit(
                    pool,
                    name,
                    pb::event::Kind::IoTimeout(pb::IoTimeout {
                        requests: *requests,
                    }),
                );
            }
            BackendEvent::Connected => tracing::info!(pool, volume = name, "frontend connected"),
            BackendEvent::Disconnected => {
                tracing::info!(pool, volume = name, "frontend disconnected")
            }
        }
    }

    /// An attachment's backend state for the API, with the removal reason.
    pub(super) fn backend_state(&self, pool: &str, name: &str) -> (pb::BackendState, String) {
        if let Some(why) = self
            .record(pool, name)
            .and_then(|r| r.attachment)
            .and_then(|a| a.failed)
        {
            return (pb::BackendState::Failed, why);
        }
        let inner = self.lock();
        let k = key(pool, name);
        if !inner.exports.contains_key(&k) {
            return (pb::BackendState::Missing, String::new());
        }
        match (
            inner.removed.get(&k),
            inner.exports.get(&k).map(|h| h.state()),
        ) {
            (Some((r, _)), _) => (pb::BackendState::Removed, r.clone()),
            (None, Some(BackendState::Removed)) => (pb::BackendState::Removed, String::new()),
            (None, _) => (pb::BackendState::Active, String::new()),
        }
    }
}
