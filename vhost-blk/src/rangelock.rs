//! Exclusive byte-range locks shared by every queue of an export.
//!
//! A read-modify-write of a partial device block must not interleave with any other write to
//! that block, or one of the two guest writes is lost. Writers take the device-aligned range
//! they touch; non-overlapping ranges proceed in parallel.

use std::sync::{Condvar, Mutex, PoisonError};

/// A set of held `[start, end)` ranges; waiters block until their range is free.
#[derive(Debug, Default)]
pub(crate) struct RangeLock {
    held: Mutex<Vec<(u64, u64)>>,
    freed: Condvar,
}

/// Releases its range on drop.
#[derive(Debug)]
pub(crate) struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

impl RangeLock {
    /// Blocks until `[start, end)` overlaps no held range, then holds it.
    pub(crate) fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        while held.iter().any(|&(s, e)| s < end && start < e) {
            held = self
                .freed
                .wait(held)
                .unwrap_or_else(PoisonError::into_inner);
        }
        held.push((start, end));
        RangeGuard {
            lock: self,
            range: (start, end),
        }
    }
}

impl RangeLock {
    /// Holds `[start, end)` if it overlaps no held range; the caller releases it with
    /// [`RangeLock::unlock`] (for writes that outlive the submitting call).
    pub(crate) fn try_lock(&self, start: u64, end: u64) -> bool {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if held.iter().any(|&(s, e)| s < end && start < e) {
            return false;
        }
        held.push((start, end));
        true
    }

    /// Releases a range taken with [`RangeLock::try_lock`].
    pub(crate) fn unlock(&self, start: u64, end: u64) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = held.iter().position(|r| *r == (start, end)) {
            held.swap_remove(i);
        }
        drop(held);
        self.freed.notify_all();
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.lock.unlock(self.range.0, self.range.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn overlapping_range_waits_for_release() {
        let lock = Arc::new(RangeLock::default());
        let g = lock.lock(0, 4096);
        let got = Arc::new(AtomicBool::new(false));
        let (l2, g2) = (lock.clone(), got.clone());
        let t = std::thread::spawn(move || {
            let _g = l2.lock(2048, 8192);
            g2.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!got.load(Ordering::SeqCst));
        let _other = lock.lock(4096, 8192 - 1);
        drop(_other);
        drop(g);
        t.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
    }
}
