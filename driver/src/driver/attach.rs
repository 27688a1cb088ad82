//! Attachments: exporting a volume over vhost-user-blk, detaching it, the configured
//! attachments at startup, and an export that stops on its own. What runs for each
//! attached volume is one [`Live`] state; a failed export is recorded in its
//! attachment record, so a restart does not report it serving.

use std::time::{Duration, Instant};

use super::hotplug::Located;
use super::volumes::check_volume_id;
use super::*;
use crate::config::AttachmentConfig;
use crate::export::{BackendEvent, EventSink, ExportParams};
use crate::model::AttachOptions;

impl Driver {
    /// AttachVolume: idempotent for the same parameters; a failed attachment is
    /// replaced.
    pub fn attach_volume(&self, id: &VolumeId, o: AttachOptions) -> Result<Attachment> {
        self.attach(id, o, false)
    }

    /// The export of the volume at `volume` (UUID `uuid`) attached as `a`: every
    /// parameter, validated once.
    fn export_params(&self, volume: &Path, uuid: &str, a: &AttachRecord) -> Result<ExportParams> {
        // Validated with the configuration.
        let access = self.export_defaults.socket_access().unwrap_or_default();
        let p = ExportParams {
            volume: volume.to_owned(),
            socket: a.socket.clone(),
            logical_block_size: a.logical_block_size,
            read_only: a.read_only,
            num_queues: a.num_queues,
            queue_size: a.queue_size,
            serial: serial(uuid),
            direct_io: self.export_defaults.direct_io,
            io_timeout_ms: self.export_defaults.io_timeout_ms,
            socket_owner: access.uid,
            socket_group: access.gid,
            socket_mode: access.mode,
            ..ExportParams::default()
        };
        p.validate().map_err(|e| match e {
            vhost_blk::ExportError::Config(m) => Error::BadRequest(m),
            other => Error::BadRequest(other.to_string()),
        })?;
        Ok(p)
    }

    /// Attaches; with `allow_missing`, a block volume whose device is absent is recorded
    /// attached anyway (its export starts when the device appears) instead of refused.
    pub(super) fn attach(
        &self,
        id: &VolumeId,
        o: AttachOptions,
        allow_missing: bool,
    ) -> Result<Attachment> {
        check_volume_id(id)?;
        let or_default = |v: u32, d: u16, what: &str| -> Result<u16> {
            match v {
                0 => Ok(d),
                v => u16::try_from(v)
                    .map_err(|_| Error::BadRequest(format!("{what} {v} is out of range"))),
            }
        };
        let a = AttachRecord {
            socket: PathBuf::new(),
            logical_block_size: if o.logical_block_size == 0 {
                512
            } else {
                o.logical_block_size
            },
            read_only: o.read_only,
            num_queues: or_default(o.num_queues, self.export_defaults.num_queues, "queue count")?,
            queue_size: or_default(o.queue_size, self.export_defaults.queue_size, "queue size")?,
            attached_unix_ms: now_ms(),
            host: self.node.clone(),
            failed: None,
        };
        // Every parameter checked before anything is looked at or changed.
        self.export_params(Path::new("/"), "", &a)?;
        let _g = self.begin_volume(id)?;
        let pool_entry = self.pool(&id.pool)?;
        self.refresh_shared(&id.pool)?;
        let mut rec = self
            .record(id)
            .ok_or_else(|| Error::VolumeNotFound(id.clone()))?;
        if let Some(shared) = pool_entry.backend.shared() {
            self.take_over(id, &mut rec, shared, o.force)?;
        }
        let a = AttachRecord {
            socket: self.export_dir.join(format!("{}.sock", rec.uuid)),
            ..a
        };
        if rec.state != VolState::Ready {
            return Err(Error::NotReady(id.clone()));
        }
        if let Some(old) = rec.attachment.as_ref().filter(|a| a.failed.is_some()) {
            // The export stopped on its own: this attach replaces it.
            tracing::info!(pool = %id.pool, volume = %id.name,
                reason = old.failed.as_deref().unwrap_or(""),
                "re-attaching a volume whose export had failed");
            rec.attachment = None;
        }
        if let Some(have) = &rec.attachment {
            if have.logical_block_size == a.logical_block_size
                && have.read_only == a.read_only
                && have.num_queues == a.num_queues
                && have.queue_size == a.queue_size
            {
                // Recorded attached here but nothing runs for it (a shared pool that was
                // unavailable when this host started): export it now.
                let mine = have.host.is_empty() || have.host == self.node;
                let running = self.lock().live.contains_key(id);
                if mine && !running && !self.is_block_pool(&id.pool) {
                    self.start_export(&rec, have)?;
                }
                return Ok(self.attachment_view(&rec, have));
            }
            return Err(Error::AlreadyExists {
                what: format!("volume {id}"),
                how: "attached with other parameters".into(),
            });
        }
        let mut missing = false;
        if self.is_block_pool(&id.pool) {
            match self.locate_backing(&mut rec)? {
                Located::Here | Located::Unidentified => {}
                Located::Absent if allow_missing => missing = true,
                Located::Moved(from) => {
                    tracing::warn!(pool = %id.pool, volume = %id.name, from = %from.display(),
                        to = %rec.path.display(), "backing device found under a new name");
                    self.put_record(&rec)?;
                }
                Located::Absent => {
                    return Err(Error::DeviceAbsent {
                        id: id.clone(),
                        identity: rec
                            .identity
                            .as_ref()
                            .map(|i| i.to_string())
                            .unwrap_or_default(),
                    })
                }
            }
        }
        // An export of this host's left from before a takeover (fenced): gone first.
        self.stop_export(id);
        if missing {
            tracing::warn!(pool = %id.pool, volume = %id.name,
                "backing device absent: attached, the export waits for it");
            self.lock().live.insert(id.clone(), Live::WaitingForDevice);
        } else {
            self.start_export(&rec, &a)?;
        }
        rec.attachment = Some(a.clone());
        if let Err(e) = self.put_record(&rec) {
            self.stop_export(id);
            return Err(e);
        }
        self.emit(
            &id.pool,
            &id.name,
            EventKind::Hotplug {
                attached: true,
                socket: a.socket.clone(),
            },
        );
        tracing::info!(pool = %id.pool, volume = %id.name, socket = %a.socket.display(),
            "volume attached");
        Ok(self.attachment_view(&rec, &a))
    }

    /// Before attaching a volume of a shared pool here: refused (naming the host) while
    /// another host has it attached or another client holds its lock, unless `force`,
    /// which fences that client first (blocklisted in the cluster: a write it still sends
    /// is refused) and drops the other host's attachment record.
    fn take_over(
        &self,
        id: &VolumeId,
        rec: &mut VolumeRecord,
        shared: &dyn crate::pool::SharedStorage,
        force: bool,
    ) -> Result<()> {
        let elsewhere = rec
            .attachment
            .as_ref()
            .filter(|a| a.failed.is_none() && !a.host.is_empty() && a.host != self.node)
            .map(|a| a.host.clone());
        let mine = rec.attachment.as_ref().is_some_and(|a| a.host == self.node);
        let holders = if mine && self.lock().live.contains_key(id) {
            // Our own export holds it.
            Vec::new()
        } else {
            shared.lock_holders(&rec.path)?
        };
        if elsewhere.is_none() && holders.is_empty() {
            return Ok(());
        }
        let host = elsewhere
            .clone()
            .unwrap_or_else(|| format!("unknown (lock held by {})", holders.join(", ")));
        if !force {
            return Err(Error::AttachedElsewhere {
                id: id.clone(),
                host,
                what: "detach it there, or attach with force to take it over (the other host's \
                       client is fenced)"
                    .into(),
            });
        }
        let fenced = shared.fence(&rec.path)?;
        tracing::warn!(pool = %id.pool, volume = %id.name, from = %host, fenced = ?fenced,
            "taking the volume over: the other host's client is fenced");
        if elsewhere.is_some() {
            rec.attachment = None;
        }
        Ok(())
    }

    /// Starts `rec`'s export as attached by `a`; it is Serving once this returns.
    pub(super) fn start_export(&self, rec: &VolumeRecord, a: &AttachRecord) -> Result<()> {
        let params = self.export_params(&rec.path, &rec.uuid, a)?;
        let export_id = {
            let mut inner = self.lock();
            inner.next_export_id += 1;
            inner.next_export_id
        };
        let weak = self.me.clone();
        let vid = rec.id();
        let on_exit = Box::new(move |err: Option<String>| {
            if let (Some(d), Some(message)) = (weak.upgrade(), err) {
                d.export_failed(&vid, export_id, &message);
            }
        });
        let weak = self.me.clone();
        let vid = rec.id();
        let events: EventSink = Arc::new(move |e: &BackendEvent| {
            if let Some(d) = weak.upgrade() {
                d.backend_event(&vid, e);
            }
        });
        let h = self
            .exporter
            .start(&params, on_exit, events)
            .map_err(|source| Error::Export {
                path: rec.path.clone(),
                source,
            })?;
        self.lock().live.insert(
            rec.id(),
            Live::Serving {
                export: Arc::from(h),
                id: export_id,
            },
        );
        Ok(())
    }

    /// An export stopped on its own with an error (on its own thread, as it ends): the
    /// attachment is recorded failed with the reason, Watch is told, and the export is
    /// forgotten, so a new Attach starts another without a Detach.
    fn export_failed(&self, id: &VolumeId, export_id: u64, message: &str) {
        let is_current = |inner: &Inner| {
            inner
                .live
                .get(id)
                .and_then(Live::export)
                .is_some_and(|(_, n)| n == export_id)
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        // An operation on the volume (detach, attach) may hold it: it forgets this
        // export first (then this report is stale) or finishes soon.
        let _g = loop {
            if !is_current(&self.lock()) {
                return;
            }
            match self.begin_volume(id) {
                Ok(g) => break g,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    tracing::error!(pool = %id.pool, volume = %id.name, error = %e.chain(),
                        "cannot record a failed export");
                    return;
                }
            }
        };
        {
            let mut inner = self.lock();
            if !is_current(&inner) {
                return;
            }
            inner.live.remove(id);
        }
        tracing::error!(pool = %id.pool, volume = %id.name, reason = message,
            "export stopped on its own");
        if let Err(e) = self.refresh_shared(&id.pool) {
            tracing::warn!(pool = %id.pool, error = %e.chain(), "reading a shared pool");
        }
        if let Some(mut rec) = self.record(id) {
            // Another host's attachment now (it took the volume over): not ours to mark.
            let mine = rec
                .attachment
                .as_ref()
                .is_some_and(|a| a.host.is_empty() || a.host == self.node);
            if let Some(a) = rec.attachment.as_mut().filter(|_| mine) {
                a.failed = Some(message.to_owned());
                if let Err(e) = self.put_record(&rec) {
                    tracing::error!(pool = %id.pool, volume = %id.name, error = %e.chain(),
                        "cannot record the failed export");
                }
            }
        }
        self.emit(
            &id.pool,
            &id.name,
            EventKind::ExportError {
                message: message.to_owned(),
            },
        );
    }

    /// Stops whatever runs for `id` (its export, if any) and forgets it.
    pub(super) fn stop_export(&self, id: &VolumeId) {
        let live = self.lock().live.remove(id);
        if let Some((h, _)) = live.as_ref().and_then(Live::export) {
            h.stop();
        }
    }

    /// DetachVolume: returns whether it was attached.
    pub fn detach_volume(&self, id: &VolumeId) -> Result<bool> {
        check_volume_id(id)?;
        let _g = self.begin_volume(id)?;
        self.refresh_shared(&id.pool)?;
        let Some(mut rec) = self.record(id) else {
            return Ok(false);
        };
        if let Some(a) = rec.attachment.as_ref() {
            if !a.host.is_empty() && a.host != self.node && a.failed.is_none() {
                // Taken over by that host: an export still running here (fenced) stops;
                // the record is that host's.
                if self.lock().live.contains_key(id) {
                    self.stop_export(id);
                    tracing::warn!(pool = %id.pool, volume = %id.name, host = %a.host,
                        "detached here: the volume was taken over by another host");
                    return Ok(true);
                }
                return Err(Error::AttachedElsewhere {
                    id: id.clone(),
                    host: a.host.clone(),
                    what: "detach it on that host".into(),
                });
            }
        }
        let Some(a) = rec.attachment.take() else {
            return Ok(false);
        };
        self.stop_export(id);
        let _ = fs::remove_file(&a.socket);
        self.put_record(&rec)?;
        self.emit(
            &id.pool,
            &id.name,
            EventKind::Hotplug {
                attached: false,
                socket: a.socket.clone(),
            },
        );
        tracing::info!(pool = %id.pool, volume = %id.name, "volume detached");
        Ok(true)
    }

    /// Stops every export (daemon shutdown); the records keep them attached so they are
    /// exported again at the next start.
    pub fn shutdown(&self) {
        let all: Vec<Live> = self.lock().live.drain().map(|(_, l)| l).collect();
        for l in all {
            if let Some((h, _)) = l.export() {
                h.stop();
            }
        }
    }

    /// Attaches (exports) every volume the configuration lists that is not attached yet.
    /// Called once at startup, after [`Driver::open`] and before the hotplug monitor
    /// starts. A block volume whose device is absent is attached "missing": its export
    /// starts when the device appears. A listed volume that cannot be attached is logged;
    /// the others still are.
    pub fn apply_configured_attachments(&self) {
        for c in self.config_attachments.clone() {
            let AttachmentConfig {
                pool,
                volume,
                logical_block_size,
                read_only,
                num_queues,
                queue_size,
            } = c;
            let id = VolumeId::new(pool, volume);
            let o = AttachOptions {
                logical_block_size,
                read_only,
                num_queues,
                queue_size,
                force: false,
            };
            match self.attach(&id, o, true) {
                Ok(a) => tracing::info!(pool = %id.pool, volume = %id.name,
                    socket = %a.socket.display(), "configured attachment exported"),
                Err(e) => tracing::error!(pool = %id.pool, volume = %id.name,
                    error = %e.chain(), "configured attachment failed"),
            }
        }
    }
}
