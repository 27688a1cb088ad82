//! Test hooks (feature `test-hooks`, enabled by vmblkd's own tests): a daemon built
//! with them stops an operation at a named step until it is killed, so crash recovery
//! can be tested at every step. Production builds have none of this.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Stop at one step of one operation: `VMBLKD_TEST_PAUSE_AT` names the step,
/// `VMBLKD_TEST_PAUSE_MARKER` a file written when it is reached.
#[derive(Debug)]
pub struct Pause {
    step: String,
    marker: Option<PathBuf>,
    reached: AtomicBool,
}

impl Pause {
    /// The pause the environment asks for, if any.
    pub fn from_env() -> Option<Pause> {
        let step = std::env::var("VMBLKD_TEST_PAUSE_AT")
            .ok()
            .filter(|s| !s.is_empty())?;
        Some(Pause {
            step,
            marker: std::env::var_os("VMBLKD_TEST_PAUSE_MARKER").map(PathBuf::from),
            reached: AtomicBool::new(false),
        })
    }

    /// The first time `step` is the pause step: write the marker and wait forever.
    pub fn at(&self, step: &str) {
        if self.step != step || self.reached.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::warn!(step, "test pause: waiting to be killed");
        if let Some(m) = &self.marker {
            let _ = std::fs::write(m, step);
        }
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}
