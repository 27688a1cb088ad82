//! The driver's side of hotplug ([`HotplugHost`]): block-pool volumes followed by their
//! device's identity; removals and returns reported by the monitor or by an export.

use super::*;
use crate::export::{BackendEvent, BackendState};
use crate::hotplug::{Decision, HotplugHost, Tracked, TrackedState};

/// Where [`Driver::locate_backing`] found a block volume's device.
#[derive(Debug)]
pub(super) enum Located {
    /// At its recorded path.
    Here,
    /// Elsewhere: the record's path was changed from this one.
    Moved(PathBuf),
    /// Nowhere.
    Absent,
    /// The device has no stable identity: taken as it is.
    Unidentified,
}

impl Driver {
    pub(super) fn is_block_pool(&self, pool: &str) -> bool {
        self.lock()
            .pools
            .get(pool)
            .is_some_and(|p| p.backend.follows_devices())
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

    /// Records (once) that a volume's backing is removed, and tells Watch. Returns
    /// whether this was news.
    fn note_removed(&self, id: &VolumeId, reason: &str, device: &Path) -> bool {
        let news = {
            let mut inner = self.lock();
            match inner.live.get(id).cloned() {
                Some(Live::Serving { export, id: n }) => {
                    inner.live.insert(
                        id.clone(),
                        Live::Removed {
                            export,
                            id: n,
                            reason: reason.to_owned(),
                            device: device.to_owned(),
                        },
                    );
                    true
                }
                _ => false,
            }
        };
        if news {
            self.emit(
                &id.pool,
                &id.name,
                EventKind::BackendRemoved {
                    reason: reason.to_owned(),
                    device: device.to_owned(),
                },
            );
        }
        news
    }

    /// Records (once) that a volume's backing is served again, and tells Watch.
    fn note_resumed(&self, id: &VolumeId, device: &Path) {
        let previous = {
            let mut inner = self.lock();
            match inner.live.get(id).cloned() {
                Some(Live::Removed {
                    export,
                    id: n,
                    device: previous,
                    ..
                }) => {
                    inner
                        .live
                        .insert(id.clone(), Live::Serving { export, id: n });
                    Some(previous)
                }
                _ => None,
            }
        };
        if let Some(previous) = previous {
            self.emit(
                &id.pool,
                &id.name,
                EventKind::BackendResumed {
                    device: device.to_owned(),
                    previous_device: previous,
                },
            );
        }
    }

    /// An export's own report (on the export's threads).
    pub(super) fn backend_event(&self, id: &VolumeId, e: &BackendEvent) {
        let (pool, name) = (id.pool.as_str(), id.name.as_str());
        match e {
            BackendEvent::Removed { reason } => {
                let Some(rec) = self.record(id) else {
                    return;
                };
                if self.note_removed(id, reason, &rec.path) {
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
            BackendEvent::Resumed { volume } => self.note_resumed(id, volume),
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
                    EventKind::IoTimeout {
                        requests: *requests,
                    },
                );
            }
            BackendEvent::Connected => tracing::info!(pool, volume = name, "frontend connected"),
            BackendEvent::Disconnected => {
                tracing::info!(pool, volume = name, "frontend disconnected")
            }
        }
    }
}

impl HotplugHost for Driver {
    fn taints(&self) -> &crate::hotplug::Taints {
        &self.taints
    }

    /// The attached volumes of block pools whose device has an identity.
    fn tracked(&self, sysfs: &Sysfs) -> Vec<Tracked> {
        let rows: Vec<(VolumeRecord, TrackedState)> = {
            let inner = self.lock();
            inner
                .volumes
                .values()
                .filter(|v| v.attachment.as_ref().is_some_and(|a| a.failed.is_none()))
                .filter(|v| v.identity.is_some())
                .filter(|v| {
                    inner
                        .pools
                        .get(&v.pool)
                        .is_some_and(|p| p.backend.follows_devices())
                })
                .map(|v| {
                    let state = match inner.live.get(&v.id()) {
                        None | Some(Live::WaitingForDevice) => TrackedState::Missing,
                        Some(Live::Removed { .. }) => TrackedState::Removed,
                        Some(Live::Serving { export, .. })
                            if export.state() == BackendState::Removed =>
                        {
                            TrackedState::Removed
                        }
                        Some(Live::Serving { .. }) => TrackedState::Active,
                    };
                    (v.clone(), state)
                })
                .collect()
        };
        rows.into_iter()
            .filter_map(|(r, state)| {
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
    fn apply(&self, d: &Decision, sysfs: &Sysfs) -> bool {
        let (pool, name) = match d {
            Decision::Remove { pool, volume, .. }
            | Decision::Resume { pool, volume, .. }
            | Decision::Start { pool, volume, .. } => (pool.as_str(), volume.as_str()),
        };
        let id = VolumeId::new(pool, name);
        let Ok(_g) = self.begin_volume(&id) else {
            tracing::info!(
                pool,
                volume = name,
                "volume busy: hotplug decision deferred"
            );
            return false;
        };
        let Some(mut rec) = self.record(&id) else {
            return true;
        };
        let Some(a) = rec.attachment.clone().filter(|a| a.failed.is_none()) else {
            return true;
        };
        let export = self
            .lock()
            .live
            .get(&id)
            .and_then(|l| l.export().map(|(h, _)| h.clone()));
        match (d, export) {
            (Decision::Remove { reason, .. }, Some(h)) => {
                tracing::warn!(pool, volume = name, device = %rec.path.display(), reason,
                    "backing device removed");
                self.note_removed(&id, reason, &rec.path);
                h.remove(reason);
            }
            (Decision::Resume { device, .. }, Some(h)) => {
                // The record names the new device before the export serves it, so
                // whoever hears of the resume finds the record already up to date.
                let previous = std::mem::replace(&mut rec.path, device.clone());
                if let Err(e) = self.put_record(&rec) {
                    tracing::error!(pool, volume = name, error = %e.chain(),
                        "recording the new device path");
                    return true;
                }
                if let Err(e) = h.resume(device) {
                    tracing::error!(pool, volume = name, device = %device.display(),
                        error = format!("{e:#}"), "resuming on the returned device failed");
                    rec.path = previous;
                    if let Err(e) = self.put_record(&rec) {
                        tracing::error!(pool, volume = name, error = %e.chain(),
                            "restoring the device path");
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
                self.note_resumed(&id, device);
            }
            (Decision::Start { device, .. }, None) => {
                let previous = std::mem::replace(&mut rec.path, device.clone());
                match self.start_export(&rec, &a) {
                    Ok(()) => {
                        if let Err(e) = self.put_record(&rec) {
                            tracing::error!(pool, volume = name, error = %e.chain(),
                                "recording the new device path");
                        }
                        tracing::info!(pool, volume = name, device = %device.display(),
                            "backing device appeared: export started");
                        self.emit(
                            pool,
                            name,
                            EventKind::BackendResumed {
                                device: device.clone(),
                                previous_device: previous,
                            },
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
}
