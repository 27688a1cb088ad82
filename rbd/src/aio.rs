//! librbd's asynchronous completions.
//!
//! librbd calls a completion back on one of its own threads. The callback here does only
//! what must happen there: read the result, release the completion, and hand the result
//! to an [`AioSink`] (which posts it, e.g. to a queue and an eventfd the owner polls).

use std::ptr;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use crate::error::{check, RbdError};
use crate::ffi;

/// Receives the results of asynchronous operations. Called on librbd's threads: it must
/// not block and must not call back into librbd.
pub trait AioSink: Send + Sync + 'static {
    /// Operation `tag` ended with `result` (bytes for reads, 0 for other successes, a
    /// negative errno on failure).
    fn complete(&self, tag: u64, result: i64);
}

/// Where the result of one operation goes: exactly one [`AioSink::complete`] call with
/// `tag`, or, if submitting fails, none (the submit returns the error instead).
pub struct Completion {
    sink: Arc<dyn AioSink>,
    tag: u64,
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion")
            .field("tag", &self.tag)
            .finish()
    }
}

impl Completion {
    pub fn new(sink: Arc<dyn AioSink>, tag: u64) -> Completion {
        Completion { sink, tag }
    }
}

/// librbd's callback: `arg` is the `Box<Completion>` leaked by [`submit`].
unsafe extern "C" fn finished(c: ffi::rbd_completion_t, arg: *mut libc::c_void) {
    // SAFETY: `c` is the completion this callback was registered on; its result is read
    // once, then it is released (librbd allows both from the callback).
    let result = unsafe { ffi::rbd_aio_get_return_value(c) } as i64;
    // SAFETY: as above; not used after this.
    unsafe { ffi::rbd_aio_release(c) };
    // SAFETY: `arg` is the pointer `submit` made with Box::into_raw, and librbd calls
    // this callback exactly once per completion, so the box is taken back exactly once.
    let done = unsafe { Box::from_raw(arg.cast::<Completion>()) };
    done.sink.complete(done.tag, result);
}

/// Creates a librbd completion for `done` and runs `start` with it. If `start` fails,
/// the completion is released and `done` dropped without a callback.
pub(crate) fn submit(
    done: Completion,
    op: &'static str,
    what: impl FnOnce() -> String,
    start: impl FnOnce(ffi::rbd_completion_t) -> libc::c_int,
) -> Result<(), RbdError> {
    let arg = Box::into_raw(Box::new(done));
    let mut c: ffi::rbd_completion_t = ptr::null_mut();
    // SAFETY: `c` is a valid out-pointer; `arg` stays valid until the callback (or the
    // failure path below) takes it back; `finished` has the callback's signature.
    let r = unsafe { ffi::rbd_aio_create_completion(arg.cast(), Some(finished), &mut c) };
    if r < 0 {
        // SAFETY: no completion exists, so no callback will take `arg`: take it back.
        drop(unsafe { Box::from_raw(arg) });
        check(i64::from(r), "create a completion for", what)?;
        return Ok(());
    }
    let r = start(c);
    if r < 0 {
        // SAFETY: the operation was refused, so librbd will not call back: release the
        // completion and take `arg` back, once each.
        unsafe { ffi::rbd_aio_release(c) };
        // SAFETY: as above.
        drop(unsafe { Box::from_raw(arg) });
        check(i64::from(r), op, what)?;
    }
    Ok(())
}

/// A sink for one operation the caller waits for.
#[derive(Default)]
pub(crate) struct Wait {
    result: Mutex<Option<i64>>,
    cv: Condvar,
}

impl AioSink for Wait {
    fn complete(&self, _tag: u64, result: i64) {
        *self.result.lock().unwrap_or_else(PoisonError::into_inner) = Some(result);
        self.cv.notify_all();
    }
}

impl Wait {
    /// Blocks until the operation ended; its result.
    pub(crate) fn wait(&self) -> i64 {
        let mut g = self.result.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(r) = *g {
                return r;
            }
            g = self.cv.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
    }
}
