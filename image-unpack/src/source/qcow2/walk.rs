//! The lazy walk of the L1 and L2 tables in guest order, one L2 table held at a time,
//! yielding extents: zero runs and host-contiguous data merged, compressed clusters one
//! by one, and (when the image is a whole file) allocated clusters that lie in the
//! file's holes reported as zero.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use super::entry::{self, Mapping, SUBCLUSTERS};
use super::{corrupt, Qcow2Source};
use crate::source::{Extent, ExtentKind, SourceError, MAX_DATA_EXTENT};

impl Qcow2Source {
    /// Walks from the cluster (or unallocated L1 range) holding `guest_offset`.
    pub(super) fn walk_from(&self, guest_offset: u64) -> Walker<'_> {
        let cs = self.header.cluster_size();
        let per_l1 = cs * self.header.l2_entries();
        Walker {
            src: self,
            l1_index: usize::try_from(guest_offset / per_l1).unwrap_or(usize::MAX),
            l2_index: guest_offset % per_l1 / cs,
            l2: Vec::new(),
            queue: VecDeque::new(),
            pending: None,
            done: guest_offset >= self.header.virtual_size,
            hole: (0, 0),
            data: if self.holes.is_some() {
                (0, 0)
            } else {
                (0, u64::MAX)
            },
        }
    }
}

/// Walks L1 and L2 tables in guest order, yielding merged extents.
pub(super) struct Walker<'a> {
    src: &'a Qcow2Source,
    l1_index: usize,
    /// Next entry of the current L2 table (`l2` holds it when non-empty).
    l2_index: u64,
    /// The current L2 table, raw.
    l2: Vec<u8>,
    /// Pieces of the current cluster not yet merged.
    queue: VecDeque<Extent>,
    /// The extent being grown by merging.
    pending: Option<Extent>,
    done: bool,
    /// Last hole and data region of the host file found by `SEEK_DATA`/`SEEK_HOLE`
    /// (`data` covers everything when holes are not looked for).
    hole: (u64, u64),
    data: (u64, u64),
}

impl Walker<'_> {
    /// Queues plain data at `host` for `[guest, guest + len)`, as zero where the
    /// host file has holes.
    fn push_data(&mut self, guest: u64, host: u64, len: u64) {
        let mut done = 0;
        while done < len {
            let h = host + done;
            let left = len - done;
            let (is_data, n) = if (self.data.0..self.data.1).contains(&h) {
                (true, (self.data.1 - h).min(left))
            } else if (self.hole.0..self.hole.1).contains(&h) {
                (false, (self.hole.1 - h).min(left))
            } else {
                self.find_region(h);
                continue;
            };
            let kind = if is_data {
                ExtentKind::Data {
                    host_offset: h,
                    compressed_len: None,
                }
            } else {
                ExtentKind::Zero
            };
            self.queue.push_back(Extent {
                guest_offset: guest + done,
                len: n,
                kind,
            });
            done += n;
        }
    }

    /// Sets `hole` or `data` to a region of the host file that contains `h`.
    fn find_region(&mut self, h: u64) {
        let (Some(file), Ok(pos)) = (&self.src.holes, i64::try_from(h)) else {
            self.data = (h, u64::MAX);
            return;
        };
        let fd = file.as_raw_fd();
        match lseek(fd, pos, Whence::SeekData) {
            Ok(ds) if ds as u64 > h => self.hole = (h, ds as u64),
            Ok(ds) if ds as u64 == h => {
                let de = match lseek(fd, ds, Whence::SeekHole) {
                    Ok(de) => (de as u64).max(h + 1),
                    Err(_) => u64::MAX,
                };
                self.data = (h, de);
            }
            Err(Errno::ENXIO) => self.hole = (h, u64::MAX),
            // No hole information: everything is data.
            _ => self.data = (h, u64::MAX),
        }
    }

    /// Appends the pieces of the next cluster (or unallocated L1 range) to `queue`.
    /// Returns false at the end of the disk.
    fn refill(&mut self) -> Result<bool, SourceError> {
        let h = &self.src.header;
        let cs = h.cluster_size();
        let n_l2 = h.l2_entries();
        let vsize = h.virtual_size;
        let per_l1 = cs * n_l2;
        loop {
            let Some(&l2_off) = self.src.l1.get(self.l1_index) else {
                return Ok(false);
            };
            let l1_base = self.l1_index as u64 * per_l1;
            if l1_base >= vsize {
                return Ok(false);
            }
            if l2_off == 0 {
                let len = per_l1.min(vsize - l1_base);
                self.queue.push_back(Extent {
                    guest_offset: l1_base,
                    len,
                    kind: ExtentKind::Zero,
                });
                self.l1_index += 1;
                self.l2_index = 0;
                return Ok(true);
            }
            let guest = l1_base + self.l2_index * cs;
            if self.l2_index >= n_l2 || guest >= vsize {
                self.l1_index += 1;
                self.l2_index = 0;
                self.l2.clear();
                continue;
            }
            if self.l2.is_empty() {
                self.l2.resize(cs as usize, 0);
                self.src
                    .reader
                    .read_exact_at(&mut self.l2, l2_off)
                    .map_err(|e| SourceError::read("qcow2 L2 table", l2_off, e))?;
            }
            let i = self.l2_index as usize;
            let len = cs.min(vsize - guest);
            let (word, bitmap) = if h.extended_l2 {
                (be64(&self.l2, i * 16), be64(&self.l2, i * 16 + 8))
            } else {
                (be64(&self.l2, i * 8), 0)
            };
            self.queue_entry(word, bitmap, guest, len, l2_off, i)?;
            self.l2_index += 1;
            return Ok(true);
        }
    }

    /// Where an L2 entry is, for messages.
    fn place(guest: u64, l2_off: u64, i: usize) -> String {
        format!("L2 entry for guest offset {guest} (L2 table at {l2_off:#x}, index {i})")
    }

    /// Queues the pieces of the guest cluster `[guest, guest + len)` that the L2
    /// entry `i` of the table at `l2_off` maps.
    fn queue_entry(
        &mut self,
        word: u64,
        bitmap: u64,
        guest: u64,
        len: u64,
        l2_off: u64,
        i: usize,
    ) -> Result<(), SourceError> {
        let h = &self.src.header;
        let cs = h.cluster_size();
        let file_len = self.src.reader.len();
        let mapping = entry::decode(h, word, bitmap)
            .map_err(|why| corrupt(format!("{}: {why}", Self::place(guest, l2_off, i))))?;
        let past_end = |what: &str, host: u64, n: u64| {
            corrupt(format!(
                "{}: {what} at {host:#x} ({n} bytes) runs past the end of the {file_len}-byte file",
                Self::place(guest, l2_off, i)
            ))
        };
        match mapping {
            Mapping::Zero => self.queue.push_back(Extent {
                guest_offset: guest,
                len,
                kind: ExtentKind::Zero,
            }),
            Mapping::Data { host } => {
                if !entry::in_file(host, len, file_len) {
                    return Err(past_end("data", host, len));
                }
                self.push_data(guest, host, len);
            }
            Mapping::Compressed { host, len: clen } => {
                if !entry::compressed_in_file(host, clen, file_len) {
                    return Err(past_end("compressed cluster", host, clen));
                }
                self.queue.push_back(Extent {
                    guest_offset: guest,
                    len,
                    kind: ExtentKind::Data {
                        host_offset: host,
                        compressed_len: Some(clen),
                    },
                });
            }
            Mapping::Subclusters { host, alloc, .. } => {
                let sc = cs / u64::from(SUBCLUSTERS);
                // Split into runs of subclusters that are all data or all zero.
                let mut s = 0u32;
                while s < SUBCLUSTERS {
                    let start = u64::from(s) * sc;
                    if start >= len {
                        break;
                    }
                    let is_data = alloc & (1 << s) != 0;
                    let mut e = s + 1;
                    while e < SUBCLUSTERS && (alloc & (1 << e) != 0) == is_data {
                        e += 1;
                    }
                    let run = (u64::from(e) * sc).min(len) - start;
                    if is_data {
                        if !entry::in_file(host + start, run, file_len) {
                            return Err(past_end("data", host + start, run));
                        }
                        self.push_data(guest + start, host + start, run);
                    } else {
                        self.queue.push_back(Extent {
                            guest_offset: guest + start,
                            len: run,
                            kind: ExtentKind::Zero,
                        });
                    }
                    s = e;
                }
            }
        }
        Ok(())
    }
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Merges `next` into `cur` when both are zero, or plain data contiguous in the
/// file and the result stays within [`MAX_DATA_EXTENT`].
fn try_merge(cur: &mut Extent, next: &Extent) -> bool {
    if cur.guest_offset + cur.len != next.guest_offset {
        return false;
    }
    match (cur.kind, next.kind) {
        (ExtentKind::Zero, ExtentKind::Zero) => {
            cur.len += next.len;
            true
        }
        (
            ExtentKind::Data {
                host_offset: a,
                compressed_len: None,
            },
            ExtentKind::Data {
                host_offset: b,
                compressed_len: None,
            },
        ) if a + cur.len == b && cur.len + next.len <= MAX_DATA_EXTENT => {
            cur.len += next.len;
            true
        }
        _ => false,
    }
}

impl Iterator for Walker<'_> {
    type Item = Result<Extent, SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.done {
                return self.pending.take().map(Ok);
            }
            let Some(piece) = self.queue.pop_front() else {
                match self.refill() {
                    Ok(true) => continue,
                    Ok(false) => {
                        self.done = true;
                        continue;
                    }
                    Err(e) => {
                        self.done = true;
                        self.pending = None;
                        return Some(Err(e));
                    }
                }
            };
            match &mut self.pending {
                Some(cur) => {
                    if !try_merge(cur, &piece) {
                        let out = *cur;
                        self.pending = Some(piece);
                        return Some(Ok(out));
                    }
                }
                None => self.pending = Some(piece),
            }
        }
    }
}
