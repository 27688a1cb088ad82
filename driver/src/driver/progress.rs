//! Progress of long operations (unpack, clone, repair) as Watch events and logs.

use std::time::{Duration, Instant};

use image_unpack::Progress;

use super::*;

/// Turns unpack progress into Watch events (throttled), and hosts the mid-copy test pause.
pub(super) struct EventProgress<'a> {
    driver: &'a Driver,
    pool: &'a str,
    name: &'a str,
    operation: &'static str,
    phase: Mutex<(String, u64, Instant)>,
}

impl<'a> EventProgress<'a> {
    pub(super) fn new(
        driver: &'a Driver,
        pool: &'a str,
        name: &'a str,
        operation: &'static str,
    ) -> Self {
        EventProgress {
            driver,
            pool,
            name,
            operation,
            phase: Mutex::new((String::new(), 0, Instant::now())),
        }
    }

    fn send(&self, phase: &str, done: u64, total: u64) {
        self.driver.emit(
            self.pool,
            self.name,
            EventKind::Progress {
                operation: self.operation,
                phase: phase.into(),
                done,
                total,
            },
        );
    }
}

impl Progress for EventProgress<'_> {
    fn phase(&self, name: &str, total: Option<u64>) {
        let mut p = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        *p = (name.to_owned(), total.unwrap_or(0), Instant::now());
        tracing::info!(
            pool = self.pool,
            name = self.name,
            op = self.operation,
            phase = name,
            total,
            "progress"
        );
        self.send(name, 0, total.unwrap_or(0));
        drop(p);
        if self.operation == "create" && name == "verify" {
            // Partition work and verification run through the loop bridge on devices
            // whose sector size differs from the image's.
            self.driver.pause("verify");
        }
    }

    fn advance(&self, done: u64) {
        let (phase, total) = {
            let mut p = self.phase.lock().unwrap_or_else(|e| e.into_inner());
            let due = p.2.elapsed() >= Duration::from_millis(200) || (p.1 > 0 && done >= p.1);
            if !due {
                (None, p.1)
            } else {
                p.2 = Instant::now();
                (Some(p.0.clone()), p.1)
            }
        };
        if let Some(phase) = &phase {
            self.send(phase, done, total);
        }
        if self.operation == "create" && total > 0 && done.saturating_mul(2) >= total {
            let is_copy = self.phase.lock().map(|p| p.0 == "copy").unwrap_or(false);
            if is_copy {
                self.driver.pause("copy-midway");
            }
        }
    }
}
