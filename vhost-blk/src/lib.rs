//! vhost-user-blk export of a volume.
//!
//! Serves one block device or regular file to QEMU (or libblkio) over a vhost-user socket,
//! presenting the guest the logical sector size its image was built for (512 by default)
//! even when the volume is a 4096-sector device: aligned requests go straight to the volume
//! with O_DIRECT, misaligned ones are read-modify-written under per-range locks shared by
//! all queues.
//!
//! ```text
//!  Export (socket, Device)                   one per volume, lives across connections
//!    |-- Device: Volume + Metrics + RangeLock   shared by every session and queue
//!    `-- serve(): accept -> Session -> wait -> drop (join workers) -> accept ...
//!          Session: guest memory + one worker thread per virtqueue
//!            worker: pop chains -> validate -> aligned reads/writes: io_uring (one submit
//!                    per batch, completions reaped by the worker); the rest: I/O threads
//!                    (process_chain) -> used ring, one notification per batch
//! ```
//!
//! Entry points: [`Export`] with [`ExportConfig`], [`StopHandle`], or [`run`].

mod backend;
mod chain;
mod device;
mod engine;
mod export;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod inflight;
mod memory;
mod metrics;
mod queue;
mod rangelock;
mod request;
mod sys;
mod volume;
mod wire;

pub use device::{
    EventSink, ExportControl, ExportEvent, GrowError, PauseError, PauseGuard, ResumeError,
    VolumeState,
};
pub use engine::{settle_requests_in_flight, DEFAULT_POLL_US};
pub use export::{
    run, Export, ExportConfig, ExportError, StopHandle, DEFAULT_IO_THREADS, DEFAULT_IO_TIMEOUT_MS,
    DEFAULT_QUEUE_SIZE,
};
pub use metrics::{ErrorCounts, Metrics, MetricsSnapshot, RequestCounts, LATENCY_BUCKETS};
pub use request::{RequestError, RequestType};
pub use volume::{VolumeAddress, VolumeError};

#[cfg(test)]
mod tests;
