//! Per-export counters.
//!
//! Exported shape (`MetricsSnapshot`, serialised with serde):
//!
//! ```text
//! { "requests": { "read", "write", "flush", "get_id", "discard", "write_zeroes", "unsupported" },
//!   "bytes_read", "bytes_written",
//!   "errors": { "io", "malformed", "unsupported", "read_only", "removed", "timed_out" },
//!   "latency_us_log2": [n0, n1, ...] }   n0: under 1 µs; ni: [2^(i-1), 2^i) µs; last: the rest
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Number of power-of-two latency buckets: bucket 0 counts latencies under 1 µs, bucket
/// `i` those in `[2^(i-1), 2^i)` µs, the last one everything longer.
pub const LATENCY_BUCKETS: usize = 32;

/// Lock-free counters of one export, shared by every queue and connection.
#[derive(Debug, Default)]
pub struct Metrics {
    read: AtomicU64,
    write: AtomicU64,
    flush: AtomicU64,
    get_id: AtomicU64,
    discard: AtomicU64,
    write_zeroes: AtomicU64,
    unsupported: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    err_io: AtomicU64,
    err_malformed: AtomicU64,
    err_unsupported: AtomicU64,
    err_read_only: AtomicU64,
    err_removed: AtomicU64,
    err_timed_out: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
}

/// Request counts by type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RequestCounts {
    /// VIRTIO_BLK_T_IN.
    pub read: u64,
    /// VIRTIO_BLK_T_OUT.
    pub write: u64,
    /// VIRTIO_BLK_T_FLUSH.
    pub flush: u64,
    /// VIRTIO_BLK_T_GET_ID.
    pub get_id: u64,
    /// VIRTIO_BLK_T_DISCARD.
    pub discard: u64,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    pub write_zeroes: u64,
    /// Any other type.
    pub unsupported: u64,
}

/// Failed requests by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ErrorCounts {
    /// The volume returned an error (answered IOERR).
    pub io: u64,
    /// The descriptor chain or header was invalid (answered IOERR or with no status).
    pub malformed: u64,
    /// Unknown request types or flags (answered UNSUPP).
    pub unsupported: u64,
    /// Writes refused on a read-only export (answered IOERR).
    pub read_only: u64,
    /// Requests answered IOERR because the volume was removed.
    pub removed: u64,
    /// Requests answered IOERR by the I/O timeout or when their queue was stopped,
    /// before the volume finished them.
    pub timed_out: u64,
}

/// A point-in-time copy of [`Metrics`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MetricsSnapshot {
    /// Requests by type.
    pub requests: RequestCounts,
    /// Bytes read from the volume into guest memory.
    pub bytes_read: u64,
    /// Bytes written from guest memory to the volume.
    pub bytes_written: u64,
    /// Errors by kind.
    pub errors: ErrorCounts,
    /// Latency histogram, power-of-two microsecond buckets.
    pub latency_us_log2: Vec<u64>,
}

/// The type of a completed request, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported,
}

/// How a request failed, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    Io,
    Malformed,
    Unsupported,
    ReadOnly,
    Removed,
}

impl Metrics {
    /// Counts a request the export answered IOERR itself because the volume did not
    /// finish it in time (I/O timeout, queue stop, removal); its late completion is not
    /// counted again.
    pub(crate) fn record_timed_out(&self, elapsed: Duration) {
        self.err_timed_out.fetch_add(1, Ordering::Relaxed);
        self.bucket(elapsed);
    }

    fn bucket(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = (64 - us.leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record(
        &self,
        kind: Option<Kind>,
        failure: Option<Failure>,
        bytes: u64,
        elapsed: Duration,
    ) {
        let r = Ordering::Relaxed;
        if let Some(kind) = kind {
            let c = match kind {
                Kind::Read => &self.read,
                Kind::Write => &self.write,
                Kind::Flush => &self.flush,
                Kind::GetId => &self.get_id,
                Kind::Discard => &self.discard,
                Kind::WriteZeroes => &self.write_zeroes,
                Kind::Unsupported => &self.unsupported,
            };
            c.fetch_add(1, r);
            if failure.is_none() {
                match kind {
                    Kind::Read => self.bytes_read.fetch_add(bytes, r),
                    Kind::Write => self.bytes_written.fetch_add(bytes, r),
                    _ => 0,
                };
            }
        }
        if let Some(f) = failure {
            let c = match f {
                Failure::Io => &self.err_io,
                Failure::Malformed => &self.err_malformed,
                Failure::Unsupported => &self.err_unsupported,
                Failure::ReadOnly => &self.err_read_only,
                Failure::Removed => &self.err_removed,
            };
            c.fetch_add(1, r);
        }
        self.bucket(elapsed);
    }

    /// Copies the counters.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MetricsSnapshot {
            requests: RequestCounts {
                read: g(&self.read),
                write: g(&self.write),
                flush: g(&self.flush),
                get_id: g(&self.get_id),
                discard: g(&self.discard),
                write_zeroes: g(&self.write_zeroes),
                unsupported: g(&self.unsupported),
            },
            bytes_read: g(&self.bytes_read),
            bytes_written: g(&self.bytes_written),
            errors: ErrorCounts {
                io: g(&self.err_io),
                malformed: g(&self.err_malformed),
                unsupported: g(&self.err_unsupported),
                read_only: g(&self.err_read_only),
                removed: g(&self.err_removed),
                timed_out: g(&self.err_timed_out),
            },
            latency_us_log2: self.latency.iter().map(g).collect(),
        }
    }
}

impl Serialize for Metrics {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.snapshot().serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_counts_type_bytes_error_and_latency_bucket() {
        let m = Metrics::default();
        m.record(Some(Kind::Read), None, 4096, Duration::from_micros(3));
        m.record(
            Some(Kind::Write),
            Some(Failure::Io),
            512,
            Duration::from_micros(0),
        );
        let s = m.snapshot();
        assert_eq!(s.requests.read, 1);
        assert_eq!(s.requests.write, 1);
        assert_eq!(s.bytes_read, 4096);
        assert_eq!(s.bytes_written, 0);
        assert_eq!(s.errors.io, 1);
        assert_eq!(s.latency_us_log2[2], 1);
        assert_eq!(s.latency_us_log2[0], 1);
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["requests"]["read"], 1);
    }
}
