//! Descriptor chains as plain data: the buffers of a request, read once from the
//! descriptor table.
//!
//! Chains popped from the avail ring come from virtio-queue's iterator
//! ([`RawChain::from_chain`]); requests recorded in flight before a reconnect are read again
//! from their head index ([`RawChain::from_table`]), with the same rules: at most
//! `queue_size` descriptors (so a loop ends), one level of indirect table whose length is a
//! multiple of 16 and at most 65535 entries, indices inside the table, at most 4 GiB in
//! total. A chain broken by any of these has no segments and is answered without a status.

use std::ops::Deref;

use smallvec::SmallVec;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// VIRTQ_DESC_F_NEXT.
const F_NEXT: u16 = 1;
/// VIRTQ_DESC_F_WRITE.
const F_WRITE: u16 = 2;
/// VIRTQ_DESC_F_INDIRECT.
const F_INDIRECT: u16 = 4;
/// Size of one split-ring descriptor.
const DESC_SIZE: u64 = 16;

/// A buffer of a chain (before the header and status are split off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seg {
    pub addr: u64,
    pub len: u64,
    pub writable: bool,
}

/// The buffers of a chain: typical requests (header, data, status) need no allocation.
pub(crate) type Segs = SmallVec<[Seg; 4]>;

/// A request's head index and buffers; `segs` is None when the chain is broken (loop,
/// index out of the table, nested indirect table, unreadable descriptor, no end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawChain {
    pub head: u16,
    pub segs: Option<Segs>,
}

impl RawChain {
    /// Reads a chain popped by virtio-queue.
    pub(crate) fn from_chain<M>(chain: DescriptorChain<M>) -> RawChain
    where
        M: Deref<Target = GuestMemoryMmap<()>>,
    {
        let head = chain.head_index();
        let mut segs = Segs::new();
        let mut last: Option<Descriptor> = None;
        for d in chain {
            segs.push(Seg {
                addr: d.addr().0,
                len: u64::from(d.len()),
                writable: d.is_write_only(),
            });
            last = Some(d);
        }
        // The iterator stops silently on errors: a complete chain ends with a descriptor
        // without NEXT.
        let complete = matches!(last, Some(d) if !d.has_next());
        RawChain {
            head,
            segs: complete.then_some(segs),
        }
    }

    /// Reads the chain starting at descriptor `head` of the table at `desc_table`.
    pub(crate) fn from_table(
        mem: &GuestMemoryMmap<()>,
        desc_table: u64,
        queue_size: u16,
        head: u16,
    ) -> RawChain {
        RawChain {
            head,
            segs: walk(mem, desc_table, queue_size, head),
        }
    }
}

/// One raw descriptor as laid out in guest memory (little endian).
fn read_desc(mem: &GuestMemoryMmap<()>, table: u64, index: u16) -> Option<(u64, u32, u16, u16)> {
    let at = table.checked_add(u64::from(index) * DESC_SIZE)?;
    let mut raw = [0u8; DESC_SIZE as usize];
    mem.read_slice(&mut raw, GuestAddress(at)).ok()?;
    let addr = u64::from_le_bytes(raw[0..8].try_into().ok()?);
    let len = u32::from_le_bytes(raw[8..12].try_into().ok()?);
    let flags = u16::from_le_bytes(raw[12..14].try_into().ok()?);
    let next = u16::from_le_bytes(raw[14..16].try_into().ok()?);
    Some((addr, len, flags, next))
}

fn walk(mem: &GuestMemoryMmap<()>, desc_table: u64, queue_size: u16, head: u16) -> Option<Segs> {
    let mut table = desc_table;
    let mut size = queue_size;
    let mut index = head;
    let mut ttl = queue_size;
    let mut indirect = false;
    let mut total: u32 = 0;
    let mut segs = Segs::new();
    loop {
        if ttl == 0 || index >= size {
            return None;
        }
        let (addr, len, flags, next) = read_desc(mem, table, index)?;
        if flags & F_INDIRECT != 0 {
            if indirect || len % DESC_SIZE as u32 != 0 {
                return None;
            }
            let entries = u16::try_from(len / DESC_SIZE as u32).ok()?;
            table = addr;
            size = entries;
            ttl = entries;
            index = 0;
            indirect = true;
            continue;
        }
        total = total.checked_add(len)?;
        segs.push(Seg {
            addr,
            len: u64::from(len),
            writable: flags & F_WRITE != 0,
        });
        if flags & F_NEXT == 0 {
            return Some(segs);
        }
        index = next;
        ttl -= 1;
    }
}
