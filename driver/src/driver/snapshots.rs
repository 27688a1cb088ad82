//! Snapshots of volumes (CSI's rules): taken with the volume quiet (detached, or its
//! export paused: every write the guest was told was complete is in the snapshot, no
//! request is torn), listed, deleted, restored onto a detached volume. They are part of
//! the volume's record, so they follow it (a shared pool keeps them with the volume).

use std::time::Duration;

use super::volumes::check_volume_id;
use super::*;
use crate::model::Snapshot;
use crate::names::check_name;
use crate::state::SnapshotRecord;

/// Longest an export may take to finish its requests in flight for a snapshot.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

impl Driver {
    /// The volume of pool `pool` that has snapshot `name`, if any.
    fn snapshot_owner(&self, pool: &str, name: &str) -> Option<VolumeId> {
        self.lock()
            .volumes
            .values()
            .find(|v| v.pool == pool && v.snapshots.iter().any(|s| s.name == name))
            .map(VolumeRecord::id)
    }

    /// CreateSnapshot: idempotent by name.
    pub fn create_snapshot(&self, id: &VolumeId, name: &str) -> Result<Snapshot> {
        check_volume_id(id)?;
        check_name("snapshot", name)?;
        let _g = self.begin_volume(id)?;
        let pool_entry = self.pool(&id.pool)?;
        self.refresh_shared(&id.pool)?;
        let mut rec = self
            .record(id)
            .ok_or_else(|| Error::VolumeNotFound(id.clone()))?;
        if let Some(s) = rec.snapshots.iter().find(|s| s.name == name) {
            return Ok(snapshot_view(&rec, s));
        }
        if let Some(other) = self.snapshot_owner(&id.pool, name) {
            return Err(Error::AlreadyExists {
                what: format!("snapshot {name:?}"),
                how: format!("of volume {other}"),
            });
        }
        if rec.state != VolState::Ready {
            return Err(Error::NotReady(id.clone()));
        }
        let export = self
            .lock()
            .live
            .get(id)
            .and_then(Live::export)
            .map(|(e, _)| e.clone());
        let attached = rec.attachment.is_some();
        let t0 = std::time::Instant::now();
        // The export paused: nothing taken, everything in flight completed.
        let pause = match &export {
            Some(e) => Some(e.pause(PAUSE_TIMEOUT).map_err(|source| Error::Export {
                path: rec.path.clone(),
                source,
            })?),
            None => None,
        };
        let taken = pool_entry.backend.snapshot(&rec.path, &rec.uuid, name);
        drop(pause);
        let path = taken?;
        tracing::info!(pool = %id.pool, volume = %id.name, snapshot = name, attached,
            paused_ms = t0.elapsed().as_millis() as u64, "snapshot taken");
        let s = SnapshotRecord {
            name: name.to_owned(),
            path,
            size_bytes: rec.size_bytes,
            created_unix_ms: now_ms(),
            taken_attached: export.is_some(),
        };
        rec.snapshots.push(s.clone());
        if let Err(e) = self.put_record(&rec) {
            pool_entry.backend.delete_snapshot(&rec.path, &s.path);
            return Err(e);
        }
        Ok(snapshot_view(&rec, &s))
    }

    /// ListSnapshots of one volume, or ("") of every volume of the pool.
    pub fn list_snapshots(&self, pool: &str, volume: &str) -> Result<Vec<Snapshot>> {
        check_name("pool", pool)?;
        if !volume.is_empty() {
            check_name("volume", volume)?;
        }
        self.pool(pool)?;
        self.refresh_shared(pool)?;
        let inner = self.lock();
        if !volume.is_empty() && !inner.volumes.contains_key(&VolumeId::new(pool, volume)) {
            return Err(Error::VolumeNotFound(VolumeId::new(pool, volume)));
        }
        Ok(inner
            .volumes
            .values()
            .filter(|v| v.pool == pool && (volume.is_empty() || v.name == volume))
            .flat_map(|v| v.snapshots.iter().map(move |s| snapshot_view(v, s)))
            .collect())
    }

    /// DeleteSnapshot: returns whether it existed.
    pub fn delete_snapshot(&self, pool: &str, name: &str) -> Result<bool> {
        check_name("pool", pool)?;
        check_name("snapshot", name)?;
        let pool_entry = self.pool(pool)?;
        self.refresh_shared(pool)?;
        let Some(id) = self.snapshot_owner(pool, name) else {
            return Ok(false);
        };
        let _g = self.begin_volume(&id)?;
        let Some(mut rec) = self.record(&id) else {
            return Ok(false);
        };
        let Some(i) = rec.snapshots.iter().position(|s| s.name == name) else {
            return Ok(false);
        };
        let s = rec.snapshots.remove(i);
        self.put_record(&rec)?;
        pool_entry.backend.delete_snapshot(&rec.path, &s.path);
        tracing::info!(pool, volume = %id.name, snapshot = name, "snapshot deleted");
        Ok(true)
    }

    /// RestoreSnapshot onto its (detached) volume.
    pub fn restore_snapshot(&self, pool: &str, name: &str) -> Result<Volume> {
        check_name("pool", pool)?;
        check_name("snapshot", name)?;
        let pool_entry = self.pool(pool)?;
        self.refresh_shared(pool)?;
        let id = self
            .snapshot_owner(pool, name)
            .ok_or_else(|| Error::SnapshotNotFound {
                pool: pool.to_owned(),
                name: name.to_owned(),
            })?;
        let _g = self.begin_volume(&id)?;
        let mut rec = self
            .record(&id)
            .ok_or_else(|| Error::VolumeNotFound(id.clone()))?;
        if rec.attachment.is_some() {
            return Err(Error::Attached {
                id: id.clone(),
                what: "detach it before restoring a snapshot",
            });
        }
        let s = rec
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| Error::SnapshotNotFound {
                pool: pool.to_owned(),
                name: name.to_owned(),
            })?;
        pool_entry.backend.restore_snapshot(&rec.path, &s.path)?;
        rec.size_bytes = s.size_bytes;
        self.put_record(&rec)?;
        tracing::info!(pool, volume = %id.name, snapshot = name, "snapshot restored");
        Ok(self.view(&rec))
    }

    /// Removes every snapshot of a volume being deleted.
    pub(super) fn drop_snapshots(&self, pool_entry: &PoolEntry, rec: &VolumeRecord) {
        for s in &rec.snapshots {
            pool_entry.backend.delete_snapshot(&rec.path, &s.path);
        }
    }
}

fn snapshot_view(v: &VolumeRecord, s: &SnapshotRecord) -> Snapshot {
    Snapshot {
        volume: v.id(),
        name: s.name.clone(),
        size_bytes: s.size_bytes,
        created_unix_ms: s.created_unix_ms,
        taken_attached: s.taken_attached,
    }
}
