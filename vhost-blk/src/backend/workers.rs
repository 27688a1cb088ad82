//! The I/O threads of one queue: requests the queue thread hands off (read-modify-write,
//! flush, discard; everything when io_uring is off) run here in parallel.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

pub(super) type Job = Box<dyn FnOnce() + Send>;

/// How long dropping a pool waits for its threads; threads stuck in the volume (a stalled
/// device) are left to finish on their own.
const POOL_JOIN_WAIT: Duration = Duration::from_millis(200);

/// I/O threads of one queue. Dropping the pool lets every queued request finish; threads
/// still busy after [`POOL_JOIN_WAIT`] are detached (their requests were answered by the
/// watchdog or the ring stop; they only hold references to the device and guest memory).
pub(super) struct Pool {
    tx: Option<mpsc::Sender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    running: Arc<(Mutex<usize>, Condvar)>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl Pool {
    pub(super) fn new(threads: usize, queue: usize) -> io::Result<Pool> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let running = Arc::new((Mutex::new(0usize), Condvar::new()));
        let mut handles = Vec::new();
        for i in 0..threads {
            let rx = rx.clone();
            let running = running.clone();
            *running.0.lock().unwrap_or_else(PoisonError::into_inner) += 1;
            let h = std::thread::Builder::new()
                .name(format!("vhost-blk-q{queue}-io{i}"))
                .spawn(move || {
                    loop {
                        let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => break,
                        }
                    }
                    let (n, cv) = &*running;
                    *n.lock().unwrap_or_else(PoisonError::into_inner) -= 1;
                    cv.notify_all();
                });
            match h {
                Ok(h) => handles.push(h),
                Err(e) => {
                    drop(tx);
                    for h in handles {
                        let _ = h.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok(Pool {
            tx: Some(tx),
            threads: handles,
            running,
        })
    }

    pub(super) fn submit(&self, job: Job) {
        let job = match self.tx.as_ref().map(|tx| tx.send(job)) {
            Some(Ok(())) => return,
            Some(Err(mpsc::SendError(job))) => job,
            None => return,
        };
        // Every I/O thread is gone: run it here rather than lose the request.
        job();
    }
}

static DETACHED_IO_THREADS: AtomicUsize = AtomicUsize::new(0);

impl Drop for Pool {
    fn drop(&mut self) {
        self.tx = None;
        let (n, cv) = &*self.running;
        let left = {
            let g = n.lock().unwrap_or_else(PoisonError::into_inner);
            let (g, _) = cv
                .wait_timeout_while(g, POOL_JOIN_WAIT, |n| *n > 0)
                .unwrap_or_else(PoisonError::into_inner);
            *g
        };
        if left > 0 {
            let total = DETACHED_IO_THREADS.fetch_add(left, Ordering::Relaxed) + left;
            tracing::warn!(
                threads = left,
                total,
                "I/O threads still waiting for the volume are left to finish on their own"
            );
            self.threads.clear();
            return;
        }
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}
