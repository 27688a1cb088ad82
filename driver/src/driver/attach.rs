//! Attachments: exporting a volume over vhost-user-blk, detaching it, the configured
//! attachments at startup, and an export that stops on its own.

use super::*;

impl Driver {
    /// AttachVolume.
    pub fn attach_volume(self: &Arc<Self>, r: pb::AttachVolumeRequest) -> Result<pb::Attachment> {
        self.attach(r, false)
    }

    /// Attaches; with `allow_missing`, a block volume whose device is absent is recorded
    /// attached anyway (its export starts when the device appears) instead of refused.
    pub(super) fn attach(
        self: &Arc<Self>,
        r: pb::AttachVolumeRequest,
        allow_missing: bool,
    ) -> Result<pb::Attachment> {
        check_name("pool", &r.pool)?;
        check_name("volume", &r.name)?;
        let lbs = match r.logical_block_size {
            0 => 512,
            v @ (512 | 4096) => v,
            v => {
                return Err(Error::InvalidArgument(format!(
                    "logical block size {v} is not 512 or 4096"
                )))
            }
        };
        let num_queues = match r.num_queues {
            0 => self.export_defaults.num_queues,
            n @ 1..=64 => n as u16,
            n => {
                return Err(Error::InvalidArgument(format!(
                    "{n} queues is not within 1..=64"
                )))
            }
        };
        let queue_size = match r.queue_size {
            0 => self.export_defaults.queue_size,
            n if n.is_power_of_two() && n <= 32768 => n as u16,
            n => {
                return Err(Error::InvalidArgument(format!(
                    "queue size {n} is not a power of two up to 32768"
                )))
            }
        };
        let (pool, name) = (r.pool.as_str(), r.name.as_str());
        let _g = self.begin(vkey(pool, name), &format!("volume {pool}/{name}"))?;
        self.pool(pool)?;
        let mut rec = self
            .record(pool, name)
            .ok_or_else(|| Error::NotFound(format!("volume {pool}/{name} does not exist")))?;
        if rec.state != VolState::Ready {
            return Err(Error::FailedPrecondition(format!(
                "volume {pool}/{name} is not ready"
            )));
        }
        if let Some(a) = rec.attachment.as_ref().filter(|a| a.failed.is_some()) {
            // The export stopped on its own: this attach replaces it.
            tracing::info!(
                pool,
                volume = name,
                reason = a.failed.as_deref().unwrap_or(""),
                "re-attaching a volume whose export had failed"
            );
            rec.attachment = None;
        }
        if let Some(a) = &rec.attachment {
            if a.logical_block_size == lbs
                && a.read_only == r.read_only
                && a.num_queues == num_queues
                && a.queue_size == queue_size
            {
                return Ok(self.attachment_pb(&rec, a));
            }
            return Err(Error::AlreadyExists(format!(
                "volume {pool}/{name} is attached with other parameters"
            )));
        }
        let mut missing = false;
        if self.is_block_pool(pool) {
            match self.locate_backing(&mut rec)? {
                Located::Here | Located::Unidentified => {}
                Located::Absent if allow_missing => missing = true,
                Located::Moved(from) => {
                    tracing::warn!(pool, volume = name, from = %from.display(), to = %rec.path.display(),
                        "backing device found under a new name");
                    self.put_record(&rec)?;
                }
                Located::Absent => {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {pool}/{name}: its backing device ({}) is not present",
                        rec.identity
                            .as_ref()
                            .map(|i| i.to_string())
                            .unwrap_or_default()
                    )))
                }
            }
        }
        let a = AttachRecord {
            socket: self.export_dir.join(format!("{}.sock", rec.uuid)),
            logical_block_size: lbs,
            read_only: r.read_only,
            num_queues,
            queue_size,
            attached_unix_ms: now_ms(),
            failed: None,
        };
        if missing {
            tracing::warn!(
                pool,
                volume = name,
                "backing device absent: attached, the export waits for it"
            );
        } else {
            self.start_export(&rec, &a)?;
        }
        rec.attachment = Some(a.clone());
        if let Err(e) = self.put_record(&rec) {
            self.stop_export(pool, name);
            return Err(e);
        }
        self.emit(
            pool,
            name,
            pb::event::Kind::Hotplug(pb::Hotplug {
                attached: true,
                socket_path: a.socket.display().to_string(),
            }),
        );
        tracing::info!(pool, volume = name, socket = %a.socket.display(), "volume attached");
        Ok(self.attachment_pb(&rec, &a))
    }

    pub(super) fn start_export(
        self: &Arc<Self>,
        rec: &VolumeRecord,
        a: &AttachRecord,
    ) -> Result<()> {
        let params = ExportParams {
            volume: rec.path.clone(),
            socket: a.socket.clone(),
            logical_block_size: a.logical_block_size,
            read_only: a.read_only,
            num_queues: a.num_queues,
            queue_size: a.queue_size,
            serial: serial(&rec.uuid),
            direct_io: self.export_defaults.direct_io,
            io_timeout_ms: self.export_defaults.io_timeout_ms,
            // Validated with the configuration.
            socket_access: self.export_defaults.socket_access().unwrap_or_default(),
        };
        let id = {
            let mut inner = self.lock();
            inner.next_export_id += 1;
            inner.next_export_id
        };
        let weak = Arc::downgrade(self);
        let (pool, name) = (rec.pool.clone(), rec.name.clone());
        let on_exit = Box::new(move |err: Option<String>| {
            if let (Some(d), Some(message)) = (weak.upgrade(), err) {
                d.export_failed(&pool, &name, id, &message);
            }
        });
        let weak = Arc::downgrade(self);
        let (pool, name) = (rec.pool.clone(), rec.name.clone());
        let events: EventSink = Arc::new(move |e: &BackendEvent| {
            if let Some(d) = weak.upgrade() {
                d.backend_event(&pool, &name, e);
            }
        });
        let h = self
            .exporter
            .start(&params, on_exit, events)
            .map_err(|source| Error::Export {
                path: rec.path.clone(),
                source,
            })?;
        let mut inner = self.lock();
        inner.removed.remove(&key(&rec.pool, &rec.name));
        inner.export_ids.insert(key(&rec.pool, &rec.name), id);
        inner
            .exports
            .insert(key(&rec.pool, &rec.name), Arc::from(h));
        Ok(())
    }

    /// An export stopped on its own with an error (on its own thread, as it ends): the
    /// attachment is recorded failed with the reason, Watch is told, and the export is
    /// forgotten, so a new Attach starts another without a Detach.
    pub(super) fn export_failed(&self, pool: &str, name: &str, id: u64, message: &str) {
        let k = key(pool, name);
        let deadline = Instant::now() + Duration::from_secs(60);
        // An operation on the volume (detach, attach) may hold it: it forgets this
        // export first (then this report is stale) or finishes soon.
        let _g = loop {
            if self.lock().export_ids.get(&k) != Some(&id) {
                return;
            }
            match self.begin(vkey(pool, name), &format!("volume {pool}/{name}")) {
                Ok(g) => break g,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    tracing::error!(pool, volume = name, error = %e.chain(),
                        "cannot record a failed export");
                    return;
                }
            }
        };
        {
            let mut inner = self.lock();
            if inner.export_ids.get(&k) != Some(&id) {
                return;
            }
            inner.export_ids.remove(&k);
            inner.exports.remove(&k);
            inner.removed.remove(&k);
        }
        tracing::error!(
            pool,
            volume = name,
            reason = message,
            "export stopped on its own"
        );
        if let Some(mut rec) = self.record(pool, name) {
            if let Some(a) = rec.attachment.as_mut() {
                a.failed = Some(message.to_owned());
                if let Err(e) = self.put_record(&rec) {
                    tracing::error!(pool, volume = name, error = %e.chain(),
                        "cannot record the failed export");
                }
            }
        }
        self.emit(
            pool,
            name,
            pb::event::Kind::ExportError(pb::ExportError {
                message: message.to_owned(),
            }),
        );
    }

    pub(super) fn stop_export(&self, pool: &str, name: &str) {
        let h = {
            let mut inner = self.lock();
            inner.removed.remove(&key(pool, name));
            inner.export_ids.remove(&key(pool, name));
            inner.exports.remove(&key(pool, name))
        };
        if let Some(h) = h {
            h.stop();
        }
    }

    /// DetachVolume: returns whether it was attached.
    pub fn detach_volume(&self, pool: &str, name: &str) -> Result<bool> {
        check_name("pool", pool)?;
        check_name("volume", name)?;
        let _g = self.begin(vkey(pool, name), &format!("volume {pool}/{name}"))?;
        let Some(mut rec) = self.record(pool, name) else {
            return Ok(false);
        };
        let Some(a) = rec.attachment.take() else {
            return Ok(false);
        };
        self.stop_export(pool, name);
        let _ = fs::remove_file(&a.socket);
        self.put_record(&rec)?;
        self.emit(
            pool,
            name,
            pb::event::Kind::Hotplug(pb::Hotplug {
                attached: false,
                socket_path: a.socket.display().to_string(),
            }),
        );
        tracing::info!(pool, volume = name, "volume detached");
        Ok(true)
    }

    /// Stops every export (daemon shutdown); the records keep them attached so they are
    /// exported again at the next start.
    pub fn shutdown(&self) {
        let all: Vec<Arc<dyn ExportHandle>> = {
            let mut inner = self.lock();
            inner.export_ids.clear();
            inner.exports.drain().map(|(_, h)| h).collect()
        };
        for h in all {
            h.stop();
        }
    }

    /// Attaches (exports) every volume the configuration lists that is not attached yet.
    /// Called once at startup, after [`Driver::open`] and before the hotplug monitor
    /// starts. A block volume whose device is absent is attached "missing": its export
    /// starts when the device appears. A listed volume that cannot be attached is logged;
    /// the others still are.
    pub fn apply_configured_attachments(self: &Arc<Self>) {
        for c in self.config_attachments.clone() {
            let r = pb::AttachVolumeRequest {
                pool: c.pool.clone(),
                name: c.volume.clone(),
                logical_block_size: c.logical_block_size,
                read_only: c.read_only,
                num_queues: c.num_queues,
                queue_size: c.queue_size,
            };
            match self.attach(r, true) {
                Ok(a) => {
                    tracing::info!(pool = %c.pool, volume = %c.volume, socket = %a.socket_path,
                        "configured attachment exported")
                }
                Err(e) => {
                    tracing::error!(pool = %c.pool, volume = %c.volume, error = %e.chain(),
                        "configured attachment failed")
                }
            }
        }
    }
}
