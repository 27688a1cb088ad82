//! Exports of attached volumes, behind a small trait so the driver can be tested with a
//! fake and run with the vhost-user-blk server of the `vhost-blk` crate.
//!
//! ```text
//!  Driver::attach ──► Exporter::start(ExportParams, on_exit) ──► Box<dyn ExportHandle>
//!                              │ VhostExporter: binds the socket now, serves on a thread
//!  Driver::detach ──► ExportHandle::stop() (stop serving, join the thread)
//!  thread ends with an error ──► on_exit(Some(message)) ──► Watch ExportError event
//! ```

use std::path::PathBuf;
#[cfg(any(test, feature = "test-utils"))]
use std::sync::Arc;
use std::sync::Mutex;
use std::thread::JoinHandle;

/// What to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportParams {
    /// The volume (file or device).
    pub volume: PathBuf,
    /// The vhost-user socket to listen on.
    pub socket: PathBuf,
    /// Guest sector size.
    pub logical_block_size: u32,
    /// Read-only.
    pub read_only: bool,
    /// Virtqueues.
    pub num_queues: u16,
    /// Virtqueue size.
    pub queue_size: u16,
    /// Serial number (at most 20 bytes).
    pub serial: String,
    /// O_DIRECT where possible.
    pub direct_io: bool,
}

/// Called once when an export stops on its own: `Some(error)` if it failed.
pub type OnExit = Box<dyn FnOnce(Option<String>) + Send>;

/// A running export.
pub trait ExportHandle: Send + Sync + std::fmt::Debug {
    /// Stops serving (the guest's requests are answered first) and waits for it.
    fn stop(&self);
}

/// Starts exports.
pub trait Exporter: Send + Sync + std::fmt::Debug {
    /// Starts serving `params`; errors that happen before serving are returned.
    fn start(
        &self,
        params: &ExportParams,
        on_exit: OnExit,
    ) -> anyhow::Result<Box<dyn ExportHandle>>;
}

/// The real exporter: `vhost_blk::Export` on a thread per volume.
#[derive(Debug, Default)]
pub struct VhostExporter;

#[derive(Debug)]
struct VhostHandle {
    stop: vhost_blk::StopHandle,
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
}

impl Exporter for VhostExporter {
    fn start(&self, p: &ExportParams, on_exit: OnExit) -> anyhow::Result<Box<dyn ExportHandle>> {
        let cfg = vhost_blk::ExportConfig {
            volume: p.volume.clone(),
            socket: p.socket.clone(),
            logical_block_size: p.logical_block_size,
            read_only: p.read_only,
            num_queues: p.num_queues,
            queue_size: p.queue_size,
            serial: p.serial.clone(),
            direct_io: p.direct_io,
            ..vhost_blk::ExportConfig::default()
        };
        let stop = vhost_blk::StopHandle::new()?;
        let export = vhost_blk::Export::with_stop_handle(cfg, stop.clone())?;
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
            thread: Mutex::new(Some(thread)),
        }))
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
    /// The exit callbacks of running exports, to simulate an export failing.
    pub on_exit: Arc<Mutex<Vec<OnExit>>>,
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
}

#[cfg(any(test, feature = "test-utils"))]
#[derive(Debug)]
struct FakeHandle {
    params: ExportParams,
    running: Arc<Mutex<Vec<ExportParams>>>,
}

#[cfg(any(test, feature = "test-utils"))]
impl ExportHandle for FakeHandle {
    fn stop(&self) {
        let mut r = self.running.lock().unwrap_or_else(|e| e.into_inner());
        r.retain(|p| p != &self.params);
    }
}

#[cfg(any(test, feature = "test-utils"))]
impl Exporter for FakeExporter {
    fn start(&self, p: &ExportParams, on_exit: OnExit) -> anyhow::Result<Box<dyn ExportHandle>> {
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
        Ok(Box::new(FakeHandle {
            params: p.clone(),
            running: self.running.clone(),
        }))
    }
}
