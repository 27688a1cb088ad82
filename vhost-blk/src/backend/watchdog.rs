//! The session's watchdog: answers requests the volume does not finish in time, and all
//! of them once the volume is removed, so the guest never waits on a dead disk.

use std::io;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::device::{Device, ExportEvent};
use crate::queue::{Expire, QueueState};

/// How often the watchdog looks for requests to answer without the volume.
const WATCHDOG_TICK: Duration = Duration::from_millis(100);

/// Answers requests the volume does not finish in time, and all of them once it is
/// removed: one thread per session, waking every [`WATCHDOG_TICK`].
#[derive(Debug)]
pub(super) struct Watchdog {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    pub(super) fn start(
        dev: Arc<Device>,
        queues: Arc<Vec<Arc<QueueState>>>,
        timeout: Option<Duration>,
    ) -> io::Result<Watchdog> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vhost-blk-watchdog".into())
            .spawn(move || {
                let (lock, cv) = &*s;
                let mut stopped = lock.lock().unwrap_or_else(PoisonError::into_inner);
                loop {
                    let (g, _) = cv
                        .wait_timeout(stopped, WATCHDOG_TICK)
                        .unwrap_or_else(PoisonError::into_inner);
                    stopped = g;
                    if *stopped {
                        break;
                    }
                    let expire = if dev.is_removed() {
                        Some(Expire::All)
                    } else {
                        timeout
                            .and_then(|t| Instant::now().checked_sub(t))
                            .map(Expire::Before)
                    };
                    let Some(expire) = expire else {
                        continue;
                    };
                    let n: usize = queues.iter().map(|q| q.fail(expire)).sum();
                    if n > 0 && expire != Expire::All {
                        dev.emit(&ExportEvent::TimedOut { requests: n as u64 });
                    }
                }
            })?;
        Ok(Watchdog {
            stop,
            thread: Some(thread),
        })
    }

    pub(super) fn stop(mut self) {
        *self.stop.0.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
