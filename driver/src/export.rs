//! Exports of attached volumes, behind a small trait so the driver can be tested with a
//! fake and run with the vhost-user-blk server of the `vhost-blk` crate.
//!
//! ```text
//!  Driver::attach ──► Exporter::start(ExportParams, on_exit) ──► Box<dyn ExportHandle>
//!                              │ VhostExporter: binds the socket now, serves on a thread
//!  Driver::detach ──► ExportHandle::stop() (stop serving, join the thread)
//!  thread ends with an error ──► on_exit(Some(message)) ──► Watch ExportError event
//!  hotplug ──► ExportHandle::remove(reason) / resume(new device)
//!  export ──► EventSink(BackendEvent: Removed, Resumed, TimedOut, ...) ──► Watch events
//! ```

use std::path::{Path, PathBuf};
#[cfg(any(test, feature = "test-utils"))]
use std::sync::Arc;
use std::sync::Mutex;
use std::thread::JoinHandle;

/// What to export: the vhost-blk export's own configuration, one set of parameters,
/// validated once (`ExportConfig::validate`) when the driver builds it.
pub type ExportParams = vhost_blk::ExportConfig;

/// Called once when an export stops on its own: `Some(error)` if it failed.
pub type OnExit = Box<dyn FnOnce(Option<String>) + Send>;

/// Whether an export's volume is being served (vhost-blk's own type).
pub use vhost_blk::VolumeState as BackendState;

/// What an export reports while it serves (vhost-blk's own type).
pub use vhost_blk::ExportEvent as BackendEvent;

/// Receives an export's [`BackendEvent`]s, on the export's own threads.
pub use vhost_blk::EventSink;

/// A running export.
pub trait ExportHandle: Send + Sync + std::fmt::Debug {
    /// Stops serving (the guest's requests are answered first) and waits for it.
    fn stop(&self);
    /// The volume is gone: fail its requests (in flight and new) with an I/O error until
    /// [`ExportHandle::resume`]; the vhost-user session stays up. Idempotent.
    fn remove(&self, reason: &str);
    /// Serves `volume` (the same disk, perhaps under a new path) from now on.
    fn resume(&self, volume: &Path) -> anyhow::Result<()>;
    /// Active or removed.
    fn state(&self) -> BackendState;
    /// The path of the volume served (or last served).
    fn volume_path(&self) -> PathBuf;
    /// The volume grew: the guest is shown its new size now. Returns the capacity in
    /// bytes.
    fn grow(&self) -> anyhow::Result<u64>;
    /// Pauses the export (nothing taken, everything in flight completed) until the
    /// returned guard is dropped: a crash-consistent point for a snapshot.
    fn pause(&self, timeout: std::time::Duration) -> anyhow::Result<Box<dyn std::any::Any + Send>>;
}

/// Starts exports.
pub trait Exporter: Send + Sync + std::fmt::Debug {
    /// Starts serving `params`; errors that happen before serving are returned. Events
    /// go to `events` from the start.
    fn start(
        &self,
        params: &ExportParams,
        on_exit: OnExit,
        events: EventSink,
    ) -> anyhow::Result<Box<dyn ExportHandle>>;
}

/// The real exporter: `vhost_blk::Export` on a thread per volume.
#[derive(Debug, Default)]
pub struct VhostExporter;

#[derive(Debug)]
struct VhostHandle {
    stop: vhost_blk::StopHandle,
    control: vhost_blk::ExportControl,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl ExportHandle for VhostHandle {
    fn stop(&self) {
        self.stop.stop();
        let t = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = t {
            if t.join().is_err() {
                tracing::error!("export thread panicked");
            }
        }
    }

    fn remove(&self, reason: &str) {
        self.control.remove(reason);
    }

    fn resume(&self, volume: &Path) -> anyhow::Result<()> {
        self.control.resume(volume)?;
        Ok(())
    }

    fn state(&self) -> BackendState {
        self.control.state()
    }

    fn volume_path(&self) -> PathBuf {
        self.control.volume_path()
    }

    fn grow(&self) -> anyhow::Result<u64> {
        Ok(self.control.grow()?)
    }

    fn pause(&self, timeout: std::time::Duration) -> anyhow::Result<Box<dyn std::any::Any + Send>> {
        Ok(Box::new(self.control.pause(timeout)?))
    }
}

impl Exporter for VhostExporter {
    fn start(
        &self,
        p: &ExportParams,
        on_exit: OnExit,
        events: EventSink,
    ) -> anyhow::Result<Box<dyn ExportHandle>> {
        let cfg = p.clone();
        let stop = vhost_blk::StopHandle::new()?;
        let export = vhost_blk::Export::with_stop_handle(cfg, stop.clone())?;
        let control = export.control();
        control.set_event_sink(events);
        let socket = p.socket.clone();
        let thread = std::thread::Builder::new()
            .name("vmblk-export".into())
            .spawn(move || {
                let r = export.serve();
                let err = r.err().map(|e| {
                    let e = anyhow::Error::from(e);
                    tracing::error!(socket = %socket.display(), error = format!("{e:#}"), "export failed");
                    format!("{e:#}")
                });
                on_exit(err);
            })?;
        Ok(Box::new(VhostHandle {
            stop,
            control,
            thread: Mutex::new(Some(thread)),
        }))
    }
}

/// One export of the [`FakeExporter`], as the test sees it.
#[cfg(any(test, feature = "test-utils"))]
#[derive(Clone)]
pub struct FakeExport {
    /// What it was started with.
    pub params: ExportParams,
    /// Its state and current volume.
    pub state: Arc<Mutex<(BackendState, PathBuf)>>,
    /// Its event sink (to simulate the export reporting an I/O failure).
    pub events: EventSink,
}

#[cfg(any(test, feature = "test-utils"))]
impl std::fmt::Debug for FakeExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeExport")
            .field("params", &self.params)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

#[cfg(any(test, feature = "test-utils"))]
impl FakeExport {
    /// Simulates the export's I/O failing with ENODEV: it removes itself and says so.
    pub fn fail_io(&self, reason: &str) {
        let was = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut s.0, BackendState::Removed)
        };
        if was == BackendState::Active {
            (self.events)(&BackendEvent::Removed {
                reason: reason.to_owned(),
            });
        }
    }

    /// Its state now.
    pub fn backend(&self) -> (BackendState, PathBuf) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// An exporter that only records what it was asked, and can be told to fail (tests).
#[cfg(any(test, feature = "test-utils"))]
#[derive(Default, Clone)]
pub struct FakeExporter {
    /// Exports started and not stopped.
    pub running: Arc<Mutex<Vec<ExportParams>>>,
    /// Make the next starts fail with this message.
    pub fail_start: Arc<Mutex<Option<String>>>,
    /// Make resumes fail with this message.
    pub fail_resume: Arc<Mutex<Option<String>>>,
    /// The exit callbacks of running exports, to simulate an export failing.
    pub on_exit: Arc<Mutex<Vec<OnExit>>>,
    /// Every export started, by socket.
    pub exports: Arc<Mutex<Vec<FakeExport>>>,
}

#[cfg(any(test, feature = "test-utils"))]
impl std::fmt::Debug for FakeExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeExporter")
            .field("running", &self.running)
            .finish_non_exhaustive()
    }
}

#[cfg(any(test, feature = "test-utils"))]
impl FakeExporter {
    /// Simulates every running export failing with `message`.
    pub fn fail_running(&self, message: &str) {
        let cbs: Vec<OnExit> = self
            .on_exit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for cb in cbs {
            cb(Some(message.to_owned()));
        }
    }

    /// The last export started on `socket`.
    pub fn export(&self, socket: &Path) -> Option<FakeExport> {
        self.exports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .rev()
            .find(|e| e.params.socket == socket)
            .cloned()
    }
}

#[cfg(any(test, feature = "test-utils"))]
#[derive(Debug)]
struct FakeHandle {
    params: ExportParams,
    running: Arc<Mutex<Vec<ExportParams>>>,
    export: FakeExport,
    fail_resume: Arc<Mutex<Option<String>>>,
}

#[cfg(any(test, feature = "test-utils"))]
impl ExportHandle for FakeHandle {
    fn stop(&self) {
        let mut r = self.running.lock().unwrap_or_else(|e| e.into_inner());
        r.retain(|p| p != &self.params);
    }

    fn remove(&self, reason: &str) {
        self.export.fail_io(reason);
    }

    fn resume(&self, volume: &Path) -> anyhow::Result<()> {
        if let Some(m) = self
            .fail_resume
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            anyhow::bail!("{m}");
        }
        *self.export.state.lock().unwrap_or_else(|e| e.into_inner()) =
            (BackendState::Active, volume.to_owned());
        (self.export.events)(&BackendEvent::Resumed {
            volume: volume.to_owned(),
        });
        Ok(())
    }

    fn state(&self) -> BackendState {
        self.export.backend().0
    }

    fn volume_path(&self) -> PathBuf {
        self.export.backend().1
    }

    fn grow(&self) -> anyhow::Result<u64> {
        let path = self.export.backend().1;
        Ok(crate::sys::size_and_sector(&path).map(|s| s.0).unwrap_or(0))
    }

    fn pause(
        &self,
        _timeout: std::time::Duration,
    ) -> anyhow::Result<Box<dyn std::any::Any + Send>> {
        Ok(Box::new(()))
    }
}

#[cfg(any(test, feature = "test-utils"))]
impl Exporter for FakeExporter {
    fn start(
        &self,
        p: &ExportParams,
        on_exit: OnExit,
        events: EventSink,
    ) -> anyhow::Result<Box<dyn ExportHandle>> {
        if let Some(m) = self
            .fail_start
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            anyhow::bail!("{m}");
        }
        self.on_exit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(on_exit);
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(p.clone());
        let export = FakeExport {
            params: p.clone(),
            state: Arc::new(Mutex::new((BackendState::Active, p.volume.clone()))),
            events,
        };
        self.exports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(export.clone());
        Ok(Box::new(FakeHandle {
            params: p.clone(),
            running: self.running.clone(),
            export,
            fail_resume: self.fail_resume.clone(),
        }))
    }
}
