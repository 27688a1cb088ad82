//! The shared in-flight buffer (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`).
//!
//! The frontend (QEMU) keeps this memory across backend restarts and hands it back on
//! reconnect with `SET_INFLIGHT_FD`; the backend records in it which requests it has taken
//! from the avail ring and not yet put in the used ring, so a new backend process can
//! resubmit exactly those. Layout per queue (the split-ring layout of the vhost-user spec
//! and libvhost-user), queues one after the other, each region 64-byte aligned:
//!
//! ```text
//!  0  u64 features   8  u16 version (1)   10 u16 desc_num   12 u16 last_batch_head
//!  14 u16 used_idx   16 desc[desc_num]: { u8 inflight, u8 pad[5], u16 next, u64 counter }
//! ```
//!
//! Protocol, one used element at a time (what the completion site does, under the queue's
//! lock):
//! - taken from the avail ring: `desc[head].counter = ++counter; desc[head].inflight = 1`;
//! - completed: `last_batch_head = head`; add the used element (used->idx += 1);
//!   `desc[head].inflight = 0; used_idx = used->idx`.
//!
//! A crash between the used element and clearing `inflight` leaves `used_idx` one behind
//! the ring; on start the entry at `last_batch_head` is cleared then. Every entry still
//! marked is resubmitted in `counter` order, and the avail ring is resumed at
//! `used->idx + (entries marked)`.

use std::fs::File;
use std::io;
use std::sync::atomic::{fence, Ordering};

use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory, VolatileSlice};

const HDR: usize = 16;
const DESC: usize = 16;
const ALIGN: usize = 64;
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const D_INFLIGHT: usize = 0;
const D_COUNTER: usize = 8;

/// Bytes of one queue's region.
pub(crate) fn queue_region_size(queue_size: u16) -> usize {
    (HDR + DESC * usize::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// A mapped in-flight buffer.
#[derive(Debug)]
pub(crate) struct Region {
    map: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
}

fn einval(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.to_owned())
}

impl Region {
    /// A new zeroed buffer for `num_queues` queues of `queue_size` (GET_INFLIGHT_FD):
    /// returns the memfd to hand the frontend and its size.
    pub(crate) fn create(num_queues: u16, queue_size: u16) -> io::Result<(File, u64)> {
        if num_queues == 0 || queue_size == 0 {
            return Err(einval("in-flight buffer for no queue"));
        }
        let size = queue_region_size(queue_size) * usize::from(num_queues);
        let file = crate::sys::memfd("vhost-blk-inflight", size as u64)?;
        let region = Region::map(file.try_clone()?, size as u64, 0, num_queues, queue_size)?;
        for q in 0..num_queues {
            let s = region.queue_slice(q)?;
            put(&s, OFF_VERSION, 1u16)?;
            put(&s, OFF_DESC_NUM, queue_size)?;
        }
        Ok((file, size as u64))
    }

    /// Maps the buffer the frontend handed over (SET_INFLIGHT_FD).
    pub(crate) fn map(
        file: File,
        size: u64,
        offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<Region> {
        let need = queue_region_size(queue_size) * usize::from(num_queues);
        let size = usize::try_from(size).map_err(|_| einval("in-flight buffer too large"))?;
        if num_queues == 0 || queue_size == 0 || size < need {
            return Err(einval("in-flight buffer smaller than its queues"));
        }
        let map = MmapRegion::from_file(FileOffset::new(file, offset), size)
            .map_err(|e| io::Error::other(format!("cannot map the in-flight buffer: {e}")))?;
        Ok(Region {
            map,
            num_queues,
            queue_size,
        })
    }

    pub(crate) fn num_queues(&self) -> u16 {
        self.num_queues
    }

    fn queue_slice(&self, q: u16) -> io::Result<VolatileSlice<'_, ()>> {
        let len = queue_region_size(self.queue_size);
        self.map
            .get_slice(usize::from(q) * len, len)
            .map_err(|e| io::Error::other(format!("in-flight buffer: {e}")))
    }

    /// The view of queue `q`.
    pub(crate) fn queue(&self, q: u16) -> Option<QueueInflight<'_>> {
        if q >= self.num_queues {
            return None;
        }
        let s = self.queue_slice(q).ok()?;
        // A buffer from a frontend that sized it for fewer descriptors than its header says
        // is taken at the smaller size.
        let desc_num = get::<u16>(&s, OFF_DESC_NUM)
            .unwrap_or(0)
            .min(self.queue_size);
        Some(QueueInflight { s, desc_num })
    }
}

fn put<T: vm_memory::ByteValued>(s: &VolatileSlice<'_, ()>, off: usize, v: T) -> io::Result<()> {
    s.write_obj(v, off)
        .map_err(|e| io::Error::other(format!("in-flight buffer: {e}")))
}

fn get<T: vm_memory::ByteValued>(s: &VolatileSlice<'_, ()>, off: usize) -> io::Result<T> {
    s.read_obj(off)
        .map_err(|e| io::Error::other(format!("in-flight buffer: {e}")))
}

/// One queue's records.
#[derive(Debug)]
pub(crate) struct QueueInflight<'a> {
    s: VolatileSlice<'a, ()>,
    desc_num: u16,
}

impl QueueInflight<'_> {
    fn desc(head: u16) -> usize {
        HDR + DESC * usize::from(head)
    }

    /// `head` was taken from the avail ring as the `counter`-th request.
    pub(crate) fn taken(&self, head: u16, counter: u64) {
        if head >= self.desc_num {
            return;
        }
        let d = Self::desc(head);
        let _ = put(&self.s, d + D_COUNTER, counter.to_le());
        fence(Ordering::SeqCst);
        let _ = put(&self.s, d + D_INFLIGHT, 1u8);
    }

    /// Before the used element of `head` is added.
    pub(crate) fn completing(&self, head: u16) {
        let _ = put(&self.s, OFF_LAST_BATCH_HEAD, head.to_le());
        fence(Ordering::SeqCst);
    }

    /// After the used element of `head` was added and the used index is `used_idx`.
    pub(crate) fn completed(&self, head: u16, used_idx: u16) {
        fence(Ordering::SeqCst);
        if head < self.desc_num {
            let _ = put(&self.s, Self::desc(head) + D_INFLIGHT, 0u8);
        }
        fence(Ordering::SeqCst);
        let _ = put(&self.s, OFF_USED_IDX, used_idx.to_le());
    }

    /// On (re)start with the used ring at `used_idx`: repairs an interrupted completion and
    /// returns the heads still in flight in the order they were taken, and the highest
    /// counter seen.
    pub(crate) fn recover(&self, used_idx: u16) -> (Vec<u16>, u64) {
        let recorded = get::<u16>(&self.s, OFF_USED_IDX)
            .map(u16::from_le)
            .unwrap_or(0);
        if recorded != used_idx {
            let last = get::<u16>(&self.s, OFF_LAST_BATCH_HEAD)
                .map(u16::from_le)
                .unwrap_or(u16::MAX);
            if last < self.desc_num {
                let _ = put(&self.s, Self::desc(last) + D_INFLIGHT, 0u8);
            }
            let _ = put(&self.s, OFF_USED_IDX, used_idx.to_le());
        }
        let mut heads: Vec<(u64, u16)> = (0..self.desc_num)
            .filter_map(|h| {
                let d = Self::desc(h);
                match get::<u8>(&self.s, d + D_INFLIGHT) {
                    Ok(1) => Some((
                        get::<u64>(&self.s, d + D_COUNTER)
                            .map(u64::from_le)
                            .unwrap_or(0),
                        h,
                    )),
                    _ => None,
                }
            })
            .collect();
        heads.sort_unstable();
        let max = heads.last().map_or(0, |&(c, _)| c);
        (heads.into_iter().map(|(_, h)| h).collect(), max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_new_mapping_and_are_recovered_in_order() {
        let (file, size) = Region::create(2, 8).unwrap();
        assert_eq!(size as usize, 2 * queue_region_size(8));
        {
            let r = Region::map(file.try_clone().unwrap(), size, 0, 2, 8).unwrap();
            let q = r.queue(1).unwrap();
            q.taken(5, 1);
            q.taken(2, 2);
            q.taken(7, 3);
            // 5 completes cleanly; 2 crashes between the used element and the record.
            q.completing(5);
            q.completed(5, 1);
            q.completing(2);
        }
        let r = Region::map(file, size, 0, 2, 8).unwrap();
        assert_eq!(r.queue(0).unwrap().recover(0), (vec![], 0));
        // The used ring got 2's element (idx 2), the record says 1: 2 is not resubmitted.
        let (heads, max) = r.queue(1).unwrap().recover(2);
        assert_eq!(heads, vec![7]);
        assert_eq!(max, 3);
        // Without the crash the same record would resubmit both, oldest first.
        let (file, size) = Region::create(1, 8).unwrap();
        let r = Region::map(file, size, 0, 1, 8).unwrap();
        let q = r.queue(0).unwrap();
        q.taken(3, 10);
        q.taken(1, 9);
        assert_eq!(q.recover(0).0, vec![1, 3]);
        assert!(r.queue(1).is_none());
    }

    #[test]
    fn short_or_empty_buffers_are_refused() {
        let (file, size) = Region::create(1, 8).unwrap();
        assert!(Region::map(file.try_clone().unwrap(), size, 0, 2, 8).is_err());
        assert!(Region::map(file, size, 0, 0, 8).is_err());
        assert!(Region::create(0, 8).is_err());
    }
}
