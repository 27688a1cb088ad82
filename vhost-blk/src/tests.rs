//! Request-level tests: hostile chains, round trips, segment splitting and the 4K bridge,
//! driven through virtio-queue's mock split queue and a real volume.

use std::io::Write;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Instant;

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::chain::RawChain;
use crate::device::*;
use crate::request::*;
use crate::volume::{Volume, VolumeParams, SECTOR_SIZE};
use crate::wire::*;

const MEM_SIZE: usize = 64 << 20;
const HDR: u64 = 0x10_0000;
const STATUS: u64 = 0x10_1000;
const DATA: u64 = 0x20_0000;
const INDIRECT: u64 = 0x18_0000;

struct Fixture {
    mem: GuestMemoryMmap<()>,
    dev: Device,
    _file: Option<tempfile::NamedTempFile>,
}

/// Files behave as 4096-byte-sector devices, so the bridge is exercised without root.
fn params() -> VolumeParams {
    VolumeParams {
        read_only: false,
        direct: true,
        min_block_size: 4096,
        max_iovecs: 1024,
        op_timeout: None,
    }
}

fn fixture_with(size: u64, p: VolumeParams) -> Fixture {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    // A recognisable pattern: every sector starts with its number.
    let mut buf = vec![0u8; size as usize];
    for (i, s) in buf.chunks_mut(512).enumerate() {
        s.fill(0xee);
        s[..8].copy_from_slice(&(i as u64).to_le_bytes());
    }
    f.write_all(&buf).unwrap();
    f.flush().unwrap();
    let volume = Volume::open(f.path(), &p).unwrap();
    Fixture {
        mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        dev: device_with(volume, p),
        _file: Some(f),
    }
}

fn fixture() -> Fixture {
    fixture_with(1 << 20, params())
}

fn device(volume: Volume) -> Device {
    device_with(volume, params())
}

fn device_with(volume: Volume, p: VolumeParams) -> Device {
    let capacity = volume.size() / SECTOR_SIZE;
    let mut serial = [0u8; SERIAL_LEN];
    serial[..5].copy_from_slice(b"disk0");
    Device::new(volume, std::path::PathBuf::new(), p, capacity, serial)
}

/// What the guest sees of a request: its used element and the status byte written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Answered {
    head: u16,
    used_len: u32,
    status: Option<u8>,
}

/// Writes the status byte as the queue's completion site does.
fn answer(mem: &GuestMemoryMmap<()>, c: Completion) -> Answered {
    if let Some((addr, status)) = c.status {
        mem.write_obj(status, addr).unwrap();
    }
    Answered {
        head: c.head,
        used_len: c.used_len,
        status: c.status.map(|(_, s)| s),
    }
}

/// Runs a chain popped from a mock queue through the synchronous path and answers it.
fn run_chain<M>(dev: &Device, mem: &GuestMemoryMmap<()>, chain: DescriptorChain<M>) -> Answered
where
    M: Deref<Target = GuestMemoryMmap<()>>,
{
    answer(
        mem,
        process_chain(dev, mem, RawChain::from_chain(chain), Taken::now(1)),
    )
}

fn rd(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
}

fn wr(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(
        addr,
        len,
        VRING_DESC_F_WRITE as u16,
        0,
    ))
}

impl Fixture {
    fn header(&self, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&t.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Submits a chain whose NEXT links the mock sets up, in a queue of `qsize`.
    fn submit_chain(&self, descs: &[RawDescriptor], qsize: u16) -> Answered {
        let vq = MockSplitQueue::new(&self.mem, qsize);
        let chain = vq.build_desc_chain(descs).unwrap();
        run_chain(&self.dev, &self.mem, chain)
    }

    /// Submits descriptors exactly as given (flags and next untouched).
    fn submit_raw(&self, descs: &[RawDescriptor]) -> Answered {
        let vq = MockSplitQueue::new(&self.mem, 16);
        let chain = vq.build_multiple_desc_chains(descs).unwrap();
        run_chain(&self.dev, &self.mem, chain)
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn io(&self, t: u32, sector: u64, data: RawDescriptor) -> Answered {
        self.header(t, sector);
        self.submit_chain(&[rd(HDR, 16), data, wr(STATUS, 1)], 16)
    }

    fn write_guest(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    fn read_guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn write_sectors(&self, sector: u64, data: &[u8]) {
        self.write_guest(DATA, data);
        let c = self.io(VIRTIO_BLK_T_OUT, sector, rd(DATA, data.len() as u32));
        assert_eq!(c.status, Some(STATUS_OK));
    }

    fn read_sectors(&self, sector: u64, len: usize) -> Vec<u8> {
        self.write_guest(DATA + 0x10_0000, &vec![0x55; len]);
        let c = self.io(VIRTIO_BLK_T_IN, sector, wr(DATA + 0x10_0000, len as u32));
        assert_eq!(c.status, Some(STATUS_OK));
        assert_eq!(c.used_len as usize, len + 1);
        self.read_guest(DATA + 0x10_0000, len)
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i / 7) as u8)).collect()
}

#[test]
fn write_then_read_round_trips() {
    let f = fixture();
    let data = pattern(1, 4096);
    f.write_sectors(8, &data);
    assert_eq!(f.read_sectors(8, 4096), data);
    let m = f.dev.metrics.snapshot();
    assert_eq!((m.requests.read, m.requests.write), (1, 1));
    assert_eq!((m.bytes_read, m.bytes_written), (4096, 4096));
}

/// A request's latency counts from when it was taken from the avail ring (the batch's
/// clock read), not from when its turn in the batch came.
#[test]
fn latency_counts_from_when_the_request_was_taken() {
    let f = fixture();
    f.header(VIRTIO_BLK_T_IN, 0);
    let vq = MockSplitQueue::new(&f.mem, 16);
    let chain = vq
        .build_desc_chain(&[rd(HDR, 16), wr(DATA, 4096), wr(STATUS, 1)])
        .unwrap();
    let taken = Taken {
        seq: 1,
        at: Instant::now() - std::time::Duration::from_millis(300),
    };
    let c = process_chain(&f.dev, &f.mem, RawChain::from_chain(chain), taken);
    assert_eq!(c.status.map(|(_, s)| s), Some(STATUS_OK));
    let hist = f.dev.metrics.snapshot().latency_us_log2;
    // Bucket i holds latencies in [2^(i-1), 2^i) µs: 300 ms is bucket 19.
    let bucket = hist.iter().position(|&n| n > 0);
    assert_eq!(bucket, Some(19), "{hist:?}");
}

#[test]
fn misaligned_512_byte_write_keeps_neighbouring_sectors() {
    // The volume works in 4096-byte units: sector 3 is inside block 0.
    let f = fixture();
    let data = pattern(9, 512);
    f.write_sectors(3, &data);
    let back = f.read_sectors(0, 4096);
    assert_eq!(&back[3 * 512..4 * 512], &data[..]);
    for s in [0usize, 1, 2, 4, 5, 6, 7] {
        assert_eq!(&back[s * 512..s * 512 + 8], &(s as u64).to_le_bytes());
    }
}

#[test]
fn unaligned_guest_buffers_take_the_bounce_path() {
    let f = fixture();
    let data = pattern(3, 4096);
    // A buffer at an odd address, split in three descriptors of odd 512-multiple sizes.
    f.write_guest(DATA + 512, &data);
    f.header(VIRTIO_BLK_T_OUT, 16);
    let c = f.submit_chain(
        &[
            rd(HDR, 16),
            rd(DATA + 512, 1024),
            rd(DATA + 512 + 1024, 2560),
            rd(DATA + 512 + 3584, 512),
            wr(STATUS, 1),
        ],
        16,
    );
    assert_eq!(c.status, Some(STATUS_OK));
    assert_eq!(f.read_sectors(16, 4096), data);
}

#[test]
fn header_and_status_may_share_descriptors_with_data() {
    let f = fixture();
    let data = pattern(4, 512);
    // Header followed directly by data in one readable buffer, status in its own.
    let mut buf = vec![0u8; 16];
    buf[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    buf[8..].copy_from_slice(&2u64.to_le_bytes());
    buf.extend_from_slice(&data);
    f.write_guest(DATA, &buf);
    let c = f.submit_chain(&[rd(DATA, 528), wr(STATUS, 1)], 16);
    assert_eq!(c.status, Some(STATUS_OK));
    // Read data and status in one writable buffer.
    f.header(VIRTIO_BLK_T_IN, 2);
    let c = f.submit_chain(&[rd(HDR, 16), wr(DATA + 0x1000, 513)], 16);
    assert_eq!(c.status, Some(STATUS_OK));
    assert_eq!(c.used_len, 513);
    assert_eq!(f.read_guest(DATA + 0x1000, 512), data);
    assert_eq!(f.read_guest(DATA + 0x1000 + 512, 1), [STATUS_OK]);
}

#[test]
fn chain_without_status_descriptor_completes_with_zero_length() {
    let f = fixture();
    f.header(VIRTIO_BLK_T_OUT, 0);
    let c = f.submit_chain(&[rd(HDR, 16), rd(DATA, 512)], 16);
    assert_eq!((c.status, c.used_len), (None, 0));
    assert_eq!(f.dev.metrics.snapshot().errors.malformed, 1);
}

#[test]
fn readable_status_descriptor_is_refused() {
    let f = fixture();
    f.header(VIRTIO_BLK_T_IN, 0);
    let c = f.submit_chain(&[rd(HDR, 16), wr(DATA, 512), rd(STATUS, 1)], 16);
    assert_eq!((c.status, c.used_len), (None, 0));
    assert_eq!(f.status(), 0xff);
}

#[test]
fn writable_or_short_header_is_an_io_error() {
    let f = fixture();
    f.header(VIRTIO_BLK_T_IN, 0);
    let c = f.submit_chain(&[wr(HDR, 16), wr(DATA, 512), wr(STATUS, 1)], 16);
    assert_eq!(c.status, Some(STATUS_IOERR));
    assert_eq!(c.used_len, 1);
    let c = f.submit_chain(&[rd(HDR, 8), wr(STATUS, 1)], 16);
    assert_eq!(c.status, Some(STATUS_IOERR));
}

#[test]
fn data_direction_must_match_type() {
    let f = fixture();
    assert_eq!(
        f.io(VIRTIO_BLK_T_IN, 0, rd(DATA, 512)).status,
        Some(STATUS_IOERR)
    );
    assert_eq!(
        f.io(VIRTIO_BLK_T_OUT, 0, wr(DATA, 512)).status,
        Some(STATUS_IOERR)
    );
    assert_eq!(
        f.io(VIRTIO_BLK_T_DISCARD, 0, wr(DATA, 16)).status,
        Some(STATUS_IOERR)
    );
}

#[test]
fn length_not_multiple_of_512_is_an_io_error() {
    let f = fixture();
    assert_eq!(
        f.io(VIRTIO_BLK_T_OUT, 0, rd(DATA, 500)).status,
        Some(STATUS_IOERR)
    );
    assert_eq!(
        f.io(VIRTIO_BLK_T_IN, 0, wr(DATA, 513)).status,
        Some(STATUS_IOERR)
    );
}

#[test]
fn sectors_past_the_end_and_overflowing_offsets_are_io_errors() {
    let f = fixture();
    let cap = f.dev.capacity();
    assert_eq!(
        f.io(VIRTIO_BLK_T_IN, cap, wr(DATA, 512)).status,
        Some(STATUS_IOERR)
    );
    assert_eq!(
        f.io(VIRTIO_BLK_T_IN, cap - 1, wr(DATA, 1024)).status,
        Some(STATUS_IOERR)
    );
    assert_eq!(
        f.io(VIRTIO_BLK_T_OUT, u64::MAX, rd(DATA, 512)).status,
        Some(STATUS_IOERR)
    );
    assert_eq!(
        f.io(VIRTIO_BLK_T_OUT, u64::MAX / 512 + 1, rd(DATA, 512))
            .status,
        Some(STATUS_IOERR)
    );
    // The last sector itself is fine.
    assert_eq!(
        f.io(VIRTIO_BLK_T_IN, cap - 1, wr(DATA, 512)).status,
        Some(STATUS_OK)
    );
    // Discard segments are range-checked too.
    let mut seg = [0u8; 16];
    seg[..8].copy_from_slice(&(cap - 1).to_le_bytes());
    seg[8..12].copy_from_slice(&2u32.to_le_bytes());
    f.write_guest(DATA, &seg);
    assert_eq!(
        f.io(VIRTIO_BLK_T_DISCARD, 0, rd(DATA, 16)).status,
        Some(STATUS_IOERR)
    );
}

#[test]
fn descriptor_loop_is_refused_without_status() {
    let f = fixture();
    f.header(VIRTIO_BLK_T_IN, 0);
    let n = VRING_DESC_F_NEXT as u16;
    let w = VRING_DESC_F_WRITE as u16;
    let c = f.submit_raw(&[
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, n, 1)),
        RawDescriptor::from(SplitDescriptor::new(DATA, 512, n | w, 2)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, n | w, 1)),
    ]);
    assert_eq!((c.status, c.used_len), (None, 0));
}

#[test]
fn next_index_outside_the_queue_is_refused() {
    let f = fixture();
    f.header(VIRTIO_BLK_T_IN, 0);
    let c = f.submit_raw(&[RawDescriptor::from(SplitDescriptor::new(
        HDR,
        16,
        VRING_DESC_F_NEXT as u16,
        500,
    ))]);
    assert_eq!((c.status, c.used_len), (None, 0));
}

fn store_table(f: &Fixture, at: u64, descs: &[RawDescriptor]) {
    for (i, d) in descs.iter().enumerate() {
        f.mem
            .write_obj(*d, GuestAddress(at + 16 * i as u64))
            .unwrap();
    }
}

/// Links `descs` with NEXT flags and indices 0..n, as an indirect table wants them.
fn linked(descs: &[RawDescriptor]) -> Vec<RawDescriptor> {
    descs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let d = SplitDescriptor::from(*d);
            let last = i == descs.len() - 1;
            let flags = if last {
                d.flags()
            } else {
                d.flags() | VRING_DESC_F_NEXT as u16
            };
            RawDescriptor::from(SplitDescriptor::new(
                d.addr().0,
                d.len(),
                flags,
                if last { 0 } else { i as u16 + 1 },
            ))
        })
        .collect()
}

fn indirect(at: u64, n: usize) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(
        at,
        16 * n as u32,
        VRING_DESC_F_INDIRECT as u16,
        0,
    ))
}

#[test]
fn nested_indirect_table_is_refused() {
    let f = fixture();
    f.header(VIRTIO_BLK_T_IN, 0);
    let inner = linked(&[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]);
    store_table(&f, INDIRECT + 0x1000, &inner);
    store_table(&f, INDIRECT, &[indirect(INDIRECT + 0x1000, 3)]);
    let c = f.submit_raw(&[indirect(INDIRECT, 1)]);
    assert_eq!((c.status, c.used_len), (None, 0));
    // The same chain one level deep is served.
    store_table(&f, INDIRECT, &inner);
    let c = f.submit_raw(&[indirect(INDIRECT, 3)]);
    assert_eq!(c.status, Some(STATUS_OK));
}

#[test]
fn buffers_outside_guest_memory_are_refused() {
    let f = fixture();
    let outside = MEM_SIZE as u64 + 0x1000;
    assert_eq!(
        f.io(VIRTIO_BLK_T_IN, 0, wr(outside, 512)).status,
        Some(STATUS_IOERR)
    );
    assert_eq!(
        f.io(VIRTIO_BLK_T_OUT, 0, rd(MEM_SIZE as u64 - 512, 1024))
            .status,
        Some(STATUS_IOERR)
    );
    assert_eq!(
        f.io(VIRTIO_BLK_T_OUT, 0, rd(u64::MAX - 100, 512)).status,
        Some(STATUS_IOERR)
    );
    // Header outside memory: status still answered.
    let c = f.submit_chain(&[rd(outside, 16), wr(STATUS, 1)], 16);
    assert_eq!(c.status, Some(STATUS_IOERR));
    // Status outside memory: nothing can be written back.
    f.header(VIRTIO_BLK_T_IN, 0);
    let c = f.submit_chain(&[rd(HDR, 16), wr(DATA, 512), wr(outside, 1)], 16);
    assert_eq!((c.status, c.used_len), (None, 0));
}

#[test]
fn unknown_type_is_unsupported() {
    let f = fixture();
    f.header(0x1234, 0);
    let c = f.submit_chain(&[rd(HDR, 16), wr(STATUS, 1)], 16);
    assert_eq!(c.status, Some(STATUS_UNSUPP));
    let m = f.dev.metrics.snapshot();
    assert_eq!((m.requests.unsupported, m.errors.unsupported), (1, 1));
}

#[test]
fn get_id_returns_the_serial() {
    let f = fixture();
    f.write_guest(DATA, &[0xaa; 20]);
    let c = f.io(VIRTIO_BLK_T_GET_ID, 0, wr(DATA, 20));
    assert_eq!(c.status, Some(STATUS_OK));
    assert_eq!(c.used_len, 21);
    let mut want = b"disk0".to_vec();
    want.resize(20, 0);
    assert_eq!(f.read_guest(DATA, 20), want);
}

#[test]
fn flush_succeeds() {
    let f = fixture();
    f.header(VIRTIO_BLK_T_FLUSH, 0);
    let c = f.submit_chain(&[rd(HDR, 16), wr(STATUS, 1)], 16);
    assert_eq!(c.status, Some(STATUS_OK));
}

fn dwz(f: &Fixture, t: u32, sector: u64, count: u32, flags: u32) -> Answered {
    let mut seg = [0u8; 16];
    seg[..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&count.to_le_bytes());
    seg[12..].copy_from_slice(&flags.to_le_bytes());
    f.write_guest(DATA + 0x8000, &seg);
    f.io(t, 0, rd(DATA + 0x8000, 16))
}

#[test]
fn write_zeroes_zeroes_aligned_and_partial_blocks() {
    let f = fixture();
    for (sector, count, flags) in [(8u64, 16u32, 0u32), (35, 3, 1), (60, 9, 1)] {
        let c = dwz(&f, VIRTIO_BLK_T_WRITE_ZEROES, sector, count, flags);
        assert_eq!(c.status, Some(STATUS_OK));
        let back = f.read_sectors(sector - 1, (count as usize + 2) * 512);
        assert_eq!(&back[..8], &(sector - 1).to_le_bytes());
        assert!(back[512..512 * (count as usize + 1)]
            .iter()
            .all(|&b| b == 0));
        let after = sector + u64::from(count);
        assert_eq!(
            &back[512 * (count as usize + 1)..][..8],
            &after.to_le_bytes()
        );
    }
    // Unknown flags are unsupported.
    let c = dwz(&f, VIRTIO_BLK_T_WRITE_ZEROES, 0, 1, 4);
    assert_eq!(c.status, Some(STATUS_UNSUPP));
}

#[test]
fn discard_succeeds_and_rejects_unmap_flag() {
    let f = fixture();
    let c = dwz(&f, VIRTIO_BLK_T_DISCARD, 8, 64, 0);
    assert_eq!(c.status, Some(STATUS_OK));
    let c = dwz(&f, VIRTIO_BLK_T_DISCARD, 8, 64, 1);
    assert_eq!(c.status, Some(STATUS_UNSUPP));
    // Discard of partial blocks keeps them.
    let c = dwz(&f, VIRTIO_BLK_T_DISCARD, 1, 2, 0);
    assert_eq!(c.status, Some(STATUS_OK));
    assert_eq!(&f.read_sectors(1, 512)[..8], &1u64.to_le_bytes());
}

#[test]
fn read_only_export_refuses_writes() {
    let mut p = params();
    p.read_only = true;
    let f = fixture_with(1 << 20, p);
    assert_eq!(
        f.io(VIRTIO_BLK_T_OUT, 0, rd(DATA, 512)).status,
        Some(STATUS_IOERR)
    );
    assert_eq!(
        dwz(&f, VIRTIO_BLK_T_DISCARD, 0, 8, 0).status,
        Some(STATUS_IOERR)
    );
    assert_eq!(
        dwz(&f, VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 0).status,
        Some(STATUS_IOERR)
    );
    assert_eq!(&f.read_sectors(0, 512)[..8], &0u64.to_le_bytes());
    assert_eq!(f.dev.metrics.snapshot().errors.read_only, 3);
}

/// Writes then reads `n` segments of 512 bytes scattered in guest memory, in a direct
/// chain (`indirect == false`) or one indirect table.
fn many_segments(f: &Fixture, n: usize, indirect_table: bool) {
    let data = pattern(11, n * 512);
    // Segment i lives at DATA + i * 1024 (never contiguous).
    for i in 0..n {
        f.write_guest(DATA + i as u64 * 1024, &data[i * 512..(i + 1) * 512]);
    }
    let run = |t: u32, w: bool| {
        f.header(t, 24);
        let mut descs = vec![rd(HDR, 16)];
        for i in 0..n {
            let a = DATA + i as u64 * 1024;
            descs.push(if w { wr(a, 512) } else { rd(a, 512) });
        }
        descs.push(wr(STATUS, 1));
        if indirect_table {
            store_table(f, INDIRECT, &linked(&descs));
            f.submit_raw(&[indirect(INDIRECT, descs.len())])
        } else {
            f.submit_chain(&descs, 1024)
        }
    };
    let c = run(VIRTIO_BLK_T_OUT, false);
    assert_eq!(c.status, Some(STATUS_OK));
    for i in 0..n {
        f.write_guest(DATA + i as u64 * 1024, &[0u8; 512]);
    }
    let c = run(VIRTIO_BLK_T_IN, true);
    assert_eq!(c.status, Some(STATUS_OK));
    assert_eq!(c.used_len as usize, n * 512 + 1);
    for i in 0..n {
        assert_eq!(
            f.read_guest(DATA + i as u64 * 1024, 512),
            &data[i * 512..(i + 1) * 512],
            "segment {i}"
        );
    }
    // Also check through a contiguous read.
    assert_eq!(f.read_sectors(24, n * 512), data);
}

#[test]
fn request_of_515_segments_is_split_and_completed_once() {
    let mut p = params();
    p.max_iovecs = 100;
    let f = fixture_with(4 << 20, p);
    many_segments(&f, 515, false);
    let m = f.dev.metrics.snapshot();
    assert_eq!(m.requests.write, 1);
}

#[test]
fn request_of_1000_segments_in_an_indirect_table_is_served() {
    let f = fixture_with(4 << 20, params());
    many_segments(&f, 1000, true);
}

#[test]
fn request_of_3000_segments_exceeding_iov_max_is_split() {
    let f = fixture_with(4 << 20, params());
    many_segments(&f, 3000, true);
}

#[test]
fn aligned_segments_go_straight_to_the_volume_in_sub_ios() {
    // 4096-byte segments at 4096-aligned addresses take the O_DIRECT path.
    let mut p = params();
    p.max_iovecs = 7;
    let f = fixture_with(4 << 20, p);
    let n = 50;
    let data = pattern(21, n * 4096);
    f.write_guest(DATA, &data);
    f.header(VIRTIO_BLK_T_OUT, 0);
    let mut descs = vec![rd(HDR, 16)];
    descs.extend((0..n).map(|i| rd(DATA + i as u64 * 4096, 4096)));
    descs.push(wr(STATUS, 1));
    assert_eq!(f.submit_chain(&descs, 256).status, Some(STATUS_OK));
    assert_eq!(f.read_sectors(0, n * 4096), data);
}

/// Several threads each write their own 512-byte sector of the same device blocks, many
/// times; every sector must end up with its thread's last write.
fn concurrent_rmw_survives(dev: Arc<Device>) {
    let threads = 8usize;
    let rounds = 200usize;
    let mut handles = Vec::new();
    for t in 0..threads {
        let dev = dev.clone();
        handles.push(std::thread::spawn(move || {
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
            for r in 0..rounds {
                let vq = MockSplitQueue::new(&mem, 16);
                let mut h = [0u8; 16];
                h[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
                // Sector t of block 0 and sector t of block 1 (two blocks per request
                // for the odd threads, to mix single-block and multi-block RMW).
                let sector = t as u64;
                h[8..].copy_from_slice(&sector.to_le_bytes());
                mem.write_slice(&h, GuestAddress(HDR)).unwrap();
                let mut data = vec![(t * 16 + r % 16) as u8; 512];
                data[0] = t as u8;
                data[1] = (r & 0xff) as u8;
                mem.write_slice(&data, GuestAddress(DATA)).unwrap();
                let chain = vq
                    .build_desc_chain(&[rd(HDR, 16), rd(DATA, 512), wr(STATUS, 1)])
                    .unwrap();
                let c = run_chain(&dev, &mem, chain);
                assert_eq!(c.status, Some(STATUS_OK));
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    let chain = vq
        .build_desc_chain(&[rd(HDR, 16), wr(DATA, 4096), wr(STATUS, 1)])
        .unwrap();
    assert_eq!(run_chain(&dev, &mem, chain).status, Some(STATUS_OK));
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    let last = rounds - 1;
    for t in 0..threads {
        let s = &back[t * 512..(t + 1) * 512];
        assert_eq!(s[0], t as u8, "sector {t} lost its owner");
        assert_eq!(s[1], (last & 0xff) as u8, "sector {t} lost its last write");
        assert!(s[2..].iter().all(|&b| b == (t * 16 + last % 16) as u8));
    }
}

#[test]
fn concurrent_writes_to_adjacent_sectors_of_one_block_both_survive() {
    let f = fixture_with(1 << 20, params());
    assert_eq!(f.dev.volume().block_size(), 4096);
    concurrent_rmw_survives(Arc::new(f.dev));
}

// ---- 4096-sector loop devices (root only; serialized with the shared lock file) ----

/// A 4096-sector loop device over a temporary file. Fails the test (never skips) without
/// root: the suite runs as root.
fn loop_4k(size: u64) -> loop_bridge::testing::TempLoop {
    loop_bridge::testing::TempLoop::new(size, 4096)
}

#[test]
fn regular_file_uses_the_filesystem_direct_io_alignment() {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(1 << 20).unwrap();
    let mut p = params();
    p.min_block_size = 0;
    let v = Volume::open(f.path(), &p).unwrap();
    if v.is_direct() {
        let (_, off) = crate::sys::dio_alignment(f.as_file()).unwrap_or((0, 4096));
        assert_eq!(v.block_size(), u64::from(off).max(512));
    } else {
        assert_eq!(v.block_size(), 512);
    }
}

#[test]
fn misaligned_writes_on_a_4096_sector_loop_device_read_modify_write() {
    let ld = loop_4k(4 << 20);
    let mut p = params();
    p.min_block_size = 0;
    let volume = Volume::open(ld.path(), &p).unwrap();
    assert_eq!(volume.block_size(), 4096);
    let f = Fixture {
        mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        dev: device(volume),
        _file: None,
    };
    let a = pattern(1, 512);
    let b = pattern(2, 1536);
    f.write_sectors(1, &a);
    f.write_sectors(13, &b); // crosses from block 1 into block 2
    let back = f.read_sectors(0, 3 * 4096);
    assert!(back[..512].iter().all(|&x| x == 0));
    assert_eq!(&back[512..1024], &a[..]);
    assert!(back[1024..13 * 512].iter().all(|&x| x == 0));
    assert_eq!(&back[13 * 512..16 * 512], &b[..]);
    assert!(back[16 * 512..].iter().all(|&x| x == 0));
    // 515 segments of 512 bytes on the 4K device.
    many_segments(&f, 515, true);
}

#[test]
fn a_4096_sector_loop_device_takes_512_byte_aligned_buffers_through_io_uring() {
    use crate::engine::{Engine, Started};
    let ld = loop_4k(4 << 20);
    let mut p = params();
    p.min_block_size = 0;
    let open = || Volume::open(ld.path(), &p).unwrap();
    let volume = open();
    assert!(volume.is_direct());
    assert_eq!(volume.block_size(), 4096);
    // Linux >= 6.0 takes O_DIRECT memory aligned to the device's dma_alignment (511 on a
    // loop device), whatever its sector size.
    let (mem_align, _) = crate::sys::dio_alignment(volume.file().unwrap()).expect("STATX_DIOALIGN");
    assert_eq!(mem_align, 512);
    let dev = Arc::new(device(volume));
    let f = Fixture {
        mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        dev: device(open()),
        _file: None,
    };
    let mem = Arc::new(f.mem.clone());
    let engine = Engine::new(dev.clone(), 16, std::time::Duration::ZERO, true).unwrap();
    // Runs one chain through the engine; panics if it went to the bounce path instead.
    let run = |descs: &[RawDescriptor]| -> Answered {
        let vq = MockSplitQueue::new(&*mem, 16);
        let chain = RawChain::from_chain(vq.build_desc_chain(descs).unwrap());
        let mut inner = engine.lock();
        let mut done = Vec::new();
        let started = inner.start(&mem, chain, Taken::now(1), &mut done);
        assert!(
            matches!(started, Started::Taken(8192)),
            "512-byte aligned buffers bounced: {started:?}"
        );
        inner.submit().unwrap();
        inner.wait_all(&mut done).unwrap();
        answer(&mem, done.pop().unwrap())
    };
    // Device blocks 1 and 2 written from three buffers that are 512-byte aligned, not
    // 4 KiB aligned, with lengths of 512, 3584 and 4096 bytes...
    let data = pattern(7, 8192);
    let segs = [
        (DATA + 512, 512u32),
        (DATA + 0x1_0000 + 1536, 3584),
        (DATA + 0x2_0200, 4096),
    ];
    let mut at = 0;
    for &(addr, len) in &segs {
        f.write_guest(addr, &data[at..at + len as usize]);
        at += len as usize;
    }
    // A request of type `t` at sector 8 with data buffers `bufs`.
    let request = |t, bufs: &[(u64, u32)]| {
        f.header(t, 8);
        let data = |&(a, l)| {
            if t == VIRTIO_BLK_T_IN {
                wr(a, l)
            } else {
                rd(a, l)
            }
        };
        let mut descs = vec![rd(HDR, 16)];
        descs.extend(bufs.iter().map(data));
        descs.push(wr(STATUS, 1));
        let c = run(&descs);
        (c.status, c.used_len)
    };
    assert_eq!(request(VIRTIO_BLK_T_OUT, &segs), (Some(STATUS_OK), 1));
    // ...read back into other such buffers...
    let back = [(DATA + 0x30_0200, 2560u32), (DATA + 0x31_0a00, 5632)];
    assert_eq!(request(VIRTIO_BLK_T_IN, &back), (Some(STATUS_OK), 8193));
    let mut got = f.read_guest(back[0].0, back[0].1 as usize);
    got.extend(f.read_guest(back[1].0, back[1].1 as usize));
    assert_eq!(got, data);
    // ...and on the device at bytes 4096..12288, blocks 0 and 3 untouched.
    let mut disk = vec![0u8; 16384];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(ld.path()).unwrap(),
        &mut disk,
        0,
    )
    .unwrap();
    assert!(disk[..4096].iter().all(|&b| b == 0));
    assert_eq!(&disk[4096..12288], &data[..]);
    assert!(disk[12288..].iter().all(|&b| b == 0));
}

#[test]
fn concurrent_rmw_on_a_4096_sector_loop_device_keeps_every_write() {
    let ld = loop_4k(4 << 20);
    let mut p = params();
    p.min_block_size = 0;
    let volume = Volume::open(ld.path(), &p).unwrap();
    assert!(volume.is_direct());
    assert_eq!(volume.block_size(), 4096);
    concurrent_rmw_survives(Arc::new(device(volume)));
}

#[test]
fn config_space_shows_512_byte_sectors_and_4k_physical_blocks() {
    let f = fixture_with(1 << 20, params());
    let g = crate::backend::Geometry {
        logical_block_size: 512,
        num_queues: 4,
        queue_size: 1024,
    };
    let cfg = crate::backend::config_space(&f.dev, &g);
    // Read back at the offsets the virtio spec gives, not through the struct's fields.
    let c = zerocopy::IntoBytes::as_bytes(&cfg);
    assert_eq!(c.len(), 60);
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
    assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 1022);
    assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
    assert_eq!(c[24], 3, "physical_block_exp: 4096 = 512 << 3");
    assert_eq!(u16::from_le_bytes(c[26..28].try_into().unwrap()), 8);
    assert_eq!(c[32], 1);
    assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
    assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
}

#[test]
fn features_offer_ro_only_for_read_only_exports() {
    use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_F_RO;
    let rw = crate::backend::features(false);
    let ro = crate::backend::features(true);
    assert_eq!(rw & (1 << VIRTIO_BLK_F_RO), 0);
    assert_ne!(ro & (1 << VIRTIO_BLK_F_RO), 0);
    // VERSION_1, EVENT_IDX, INDIRECT_DESC and VHOST_USER_F_PROTOCOL_FEATURES.
    for bit in [32u32, 29, 28, 30] {
        assert_ne!(rw & (1 << bit), 0, "bit {bit}");
    }
}

/// Random descriptor tables, headers and segments: every chain gets an answer (a valid
/// status or none), nothing panics, and a good request afterwards still round-trips.
#[test]
fn random_chains_never_panic_and_the_device_keeps_serving() {
    let f = fixture_with(1 << 20, params());
    let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let interesting_addr = [
        HDR,
        STATUS,
        DATA,
        INDIRECT,
        MEM_SIZE as u64 - 8,
        u64::MAX - 7,
    ];
    for _ in 0..20_000 {
        // A random header.
        let t = [0u32, 1, 4, 8, 11, 13, 7, u32::MAX][(next() % 8) as usize];
        let sector = match next() % 4 {
            0 => next() % 2048,
            1 => 2048 - next() % 4,
            2 => u64::MAX - next() % 4,
            _ => next(),
        };
        f.header(t, sector);
        // Random discard/write-zeroes segments in the data area.
        let mut seg = [0u8; 16];
        seg[..8].copy_from_slice(&(next() % 2100).to_le_bytes());
        seg[8..12].copy_from_slice(&((next() % 64) as u32).to_le_bytes());
        seg[12..].copy_from_slice(&((next() % 3) as u32).to_le_bytes());
        f.write_guest(DATA, &seg);
        // A random table of up to 8 descriptors, some indirect.
        let n = 1 + (next() % 8) as u16;
        let descs: Vec<RawDescriptor> = (0..n)
            .map(|_| {
                let addr = if next() % 4 == 0 {
                    next()
                } else {
                    interesting_addr[(next() % interesting_addr.len() as u64) as usize]
                        .wrapping_add((next() % 4) * 512)
                };
                let len = [0u32, 1, 16, 17, 512, 513, 4096, u32::MAX][(next() % 8) as usize];
                let flags = (next() % 8) as u16;
                let nxt = (next() % 10) as u16;
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, nxt))
            })
            .collect();
        store_table(&f, INDIRECT, &descs);
        let c = f.submit_raw(&descs);
        if let Some(s) = c.status {
            assert!(s <= STATUS_UNSUPP);
            assert!(c.used_len >= 1);
        } else {
            assert_eq!(c.used_len, 0);
        }
    }
    let data = pattern(5, 4096);
    f.write_sectors(0, &data);
    assert_eq!(f.read_sectors(0, 4096), data);
}

#[test]
fn sessions_serve_queues_through_io_uring_where_the_kernel_allows() {
    use crate::backend::{Geometry, Session};
    use vm_memory::GuestMemoryAtomic;
    let Fixture { dev, _file, .. } = fixture();
    let dev = Arc::new(dev);
    let geometry = Geometry {
        logical_block_size: 512,
        num_queues: 2,
        queue_size: 64,
    };
    let mem = || GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let allowed = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|v| v.trim() == "0")
        .unwrap_or(false);
    let tuning = |io_threads, io_uring| crate::backend::Tuning {
        io_threads,
        io_uring,
        io_timeout: None,
        max_poll: std::time::Duration::ZERO,
    };
    let s = Session::new(dev.clone(), geometry, mem(), tuning(0, true)).unwrap();
    // Per queue: the io_uring fd and the resubmission event.
    if allowed {
        assert_eq!(s.extra_fds().len(), 4);
    }
    let s = Session::new(dev, geometry, mem(), tuning(2, false)).unwrap();
    assert_eq!(s.extra_fds().len(), 2);
}

#[test]
fn io_uring_engine_round_trips_declines_the_rest_and_fails_short_reads() {
    // With completion work deferred to the queue thread, and without.
    engine_round_trip(true);
    engine_round_trip(false);
}

fn engine_round_trip(defer: bool) {
    use crate::engine::{Engine, Started};
    let Fixture { mem, dev, _file } = fixture();
    let (mem, dev) = (Arc::new(mem), Arc::new(dev));
    let engine = Engine::new(dev.clone(), 16, std::time::Duration::ZERO, defer)
        .expect("io_uring (the suite runs where the kernel has it)");
    let f = Fixture {
        mem: (*mem).clone(),
        dev: device(Volume::open(_file.as_ref().unwrap().path(), &params()).unwrap()),
        _file: None,
    };
    // Runs one chain through the engine; None if it was declined.
    let run = |descs: &[RawDescriptor]| -> Option<Answered> {
        let vq = MockSplitQueue::new(&*mem, 16);
        let chain = vq.build_desc_chain(descs).unwrap();
        let mut inner = engine.lock();
        let mut done = Vec::new();
        let chain = RawChain::from_chain(chain);
        if !matches!(
            inner.start(&mem, chain, Taken::now(1), &mut done),
            Started::Taken(_)
        ) {
            return None;
        }
        inner.submit().unwrap();
        inner.wait_all(&mut done).unwrap();
        assert_eq!(inner.busy(), 0);
        assert_eq!(done.len(), 1);
        done.pop().map(|c| answer(&mem, c))
    };
    let data = pattern(3, 8192);
    f.write_guest(DATA, &data);
    f.header(VIRTIO_BLK_T_OUT, 16);
    let c = run(&[rd(HDR, 16), rd(DATA, 8192), wr(STATUS, 1)]).expect("aligned write taken");
    assert_eq!((c.status, c.used_len), (Some(STATUS_OK), 1));
    f.header(VIRTIO_BLK_T_IN, 16);
    let c = run(&[rd(HDR, 16), wr(DATA + 0x10_0000, 8192), wr(STATUS, 1)]).unwrap();
    assert_eq!((c.status, c.used_len), (Some(STATUS_OK), 8193));
    assert_eq!(f.read_guest(DATA + 0x10_0000, 8192), data);
    // Misaligned (read-modify-write) and flush are declined to the synchronous path.
    f.header(VIRTIO_BLK_T_OUT, 1);
    assert!(run(&[rd(HDR, 16), rd(DATA, 512), wr(STATUS, 1)]).is_none());
    f.header(VIRTIO_BLK_T_FLUSH, 0);
    assert!(run(&[rd(HDR, 16), wr(STATUS, 1)]).is_none());
    // Invalid chains are answered by the engine itself.
    f.header(VIRTIO_BLK_T_IN, u64::MAX / 512);
    let c = run(&[rd(HDR, 16), wr(DATA, 4096), wr(STATUS, 1)]).unwrap();
    assert_eq!(c.status, Some(STATUS_IOERR));
    // The file shrinks under the export: a read ending past the new end is short, the
    // rest is resubmitted, finds the end, and the request fails instead of hanging.
    _file
        .as_ref()
        .unwrap()
        .as_file()
        .set_len(8192 + 2048)
        .unwrap();
    f.header(VIRTIO_BLK_T_IN, 16);
    let c = run(&[rd(HDR, 16), wr(DATA, 4096), wr(STATUS, 1)]).unwrap();
    assert_eq!((c.status, c.used_len), (Some(STATUS_IOERR), 1));
    let m = dev.metrics.snapshot();
    assert_eq!((m.requests.read, m.requests.write), (2, 1));
    assert_eq!((m.errors.io, m.errors.malformed), (1, 1));
}

#[test]
fn the_engine_leaves_reads_and_writes_of_a_file_in_memory_to_the_queue_thread() {
    // io_uring hands tmpfs reads to its io-wq workers (two context switches per read on
    // Linux 6.18); the queue thread copies them itself instead.
    use crate::engine::{Engine, Started};
    let file = tempfile::NamedTempFile::new_in("/dev/shm").expect("a file in /dev/shm (tmpfs)");
    file.as_file().set_len(1 << 20).unwrap();
    let open = || Volume::open(file.path(), &params()).unwrap();
    let dev = Arc::new(device(open()));
    assert!(dev.volume().is_memory_backed());
    let f = Fixture {
        mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        dev: device(open()),
        _file: None,
    };
    let mem = Arc::new(f.mem.clone());
    let engine = Engine::new(dev, 16, std::time::Duration::ZERO, true).unwrap();
    for (t, data) in [
        (VIRTIO_BLK_T_IN, wr(DATA, 4096)),
        (VIRTIO_BLK_T_OUT, rd(DATA, 4096)),
    ] {
        f.header(t, 8);
        let vq = MockSplitQueue::new(&*mem, 16);
        let descs = [rd(HDR, 16), data, wr(STATUS, 1)];
        let chain = RawChain::from_chain(vq.build_desc_chain(&descs).unwrap());
        let mut done = Vec::new();
        let started = engine.lock().start(&mem, chain, Taken::now(1), &mut done);
        assert!(
            matches!(started, Started::Inline(..)),
            "type {t}: {started:?}"
        );
        assert_eq!(engine.lock().busy(), 0);
    }
}

#[test]
fn a_deferred_engine_declines_chains_on_any_thread_but_its_queue_thread() {
    use crate::engine::{Engine, Started};
    let f = fixture();
    f.header(VIRTIO_BLK_T_IN, 16);
    let Fixture { mem, dev, _file } = f;
    let (mem, dev) = (Arc::new(mem), Arc::new(dev));
    let engine = Engine::new(dev, 16, std::time::Duration::ZERO, true).unwrap();
    let start = || {
        let vq = MockSplitQueue::new(&*mem, 16);
        let descs = [rd(HDR, 16), wr(DATA, 4096), wr(STATUS, 1)];
        let chain = RawChain::from_chain(vq.build_desc_chain(&descs).unwrap());
        let mut done = Vec::new();
        let mut inner = engine.lock();
        let started = inner.start(&mem, chain, Taken::now(1), &mut done);
        inner.submit().unwrap();
        inner.wait_all(&mut done).unwrap();
        (started, done.len())
    };
    // The first thread to lock the engine owns its ring.
    let (started, n) = start();
    assert!(matches!(started, Started::Taken(4096)), "{started:?}");
    assert_eq!(n, 1);
    let (started, n) = std::thread::scope(|s| s.spawn(start).join().unwrap());
    assert!(matches!(started, Started::Declined(_)), "{started:?}");
    assert_eq!(n, 0);
}

#[test]
fn a_file_in_memory_is_opened_buffered_with_512_byte_blocks() {
    let f = tempfile::NamedTempFile::new_in("/dev/shm").expect("a file in /dev/shm (tmpfs)");
    f.as_file().set_len(1 << 20).unwrap();
    let p = VolumeParams {
        min_block_size: 0,
        ..params()
    };
    let v = Volume::open(f.path(), &p).unwrap();
    assert!(v.is_memory_backed());
    assert!(!v.is_direct());
    assert_eq!(v.block_size(), 512);
}

/// A vring over the mock queue's rings, as the vhost-user handler sets one up.
fn mock_vring(
    mem: &GuestMemoryMmap<()>,
    vq: &MockSplitQueue<'_, GuestMemoryMmap<()>>,
) -> vhost_user_backend::VringRwLock<crate::memory::Mem> {
    use vhost_user_backend::{VringRwLock, VringT};
    let vring = VringRwLock::new(vm_memory::GuestMemoryAtomic::new(mem.clone()), 16).unwrap();
    vring
        .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
        .unwrap();
    vring.set_queue_size(16);
    // As the handler does at SET_VRING_ADDR: resume the used ring where the guest sees it.
    let used = vring.queue_used_idx().unwrap();
    vring.set_queue_next_used(used);
    vring.set_queue_ready(true);
    vring
}

const QHDR: u64 = 0x30_0000;
const QDATA: u64 = 0x31_0000;
const QSTATUS: u64 = 0x38_0000;

/// Three read requests of sectors 0, 1, 2 at descriptor heads 0, 3, 6 in the avail ring.
fn three_reads(mem: &GuestMemoryMmap<()>, vq: &MockSplitQueue<'_, GuestMemoryMmap<()>>) {
    let mut descs = Vec::new();
    for k in 0..3u64 {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        h[8..].copy_from_slice(&k.to_le_bytes());
        mem.write_slice(&h, GuestAddress(QHDR + k * 16)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(QSTATUS + k)).unwrap();
        let base = (k * 3) as u16;
        let f = |flags: u32, _next: u16| (flags | VRING_DESC_F_NEXT) as u16;
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            QHDR + k * 16,
            16,
            f(0, base + 1),
            base + 1,
        )));
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            QDATA + k * 512,
            512,
            f(VRING_DESC_F_WRITE, base + 2),
            base + 2,
        )));
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            QSTATUS + k,
            1,
            VRING_DESC_F_WRITE as u16,
            0,
        )));
    }
    vq.add_desc_chains(&descs, 0).unwrap();
}

/// The used ring: (id, len) of every element, in order.
fn used_elems(
    mem: &GuestMemoryMmap<()>,
    vq: &MockSplitQueue<'_, GuestMemoryMmap<()>>,
) -> Vec<(u32, u32)> {
    let base = vq.used_addr().0;
    let idx: u16 = mem.read_obj(GuestAddress(base + 2)).unwrap();
    (0..u64::from(idx))
        .map(|i| {
            let at = base + 4 + 8 * i;
            (
                mem.read_obj(GuestAddress(at)).unwrap(),
                mem.read_obj(GuestAddress(at + 4)).unwrap(),
            )
        })
        .collect()
}

#[allow(clippy::type_complexity)]
fn pop_all(
    vring: &vhost_user_backend::VringRwLock<crate::memory::Mem>,
    qs: &crate::queue::QueueState,
    mem: &Arc<GuestMemoryMmap<()>>,
) -> Vec<(RawChain, Taken)> {
    use vhost_user_backend::VringT;
    use virtio_queue::QueueT;
    let mut out = Vec::new();
    loop {
        let chain = vring
            .get_mut()
            .get_queue_mut()
            .pop_descriptor_chain(mem.clone());
        let Some(chain) = chain else { break };
        let taken = qs.take(chain.head_index(), mem, Instant::now());
        out.push((RawChain::from_chain(chain), taken));
    }
    out
}

#[test]
fn requests_the_watchdog_answered_are_not_answered_again_by_their_late_completion() {
    use crate::queue::{Expire, QueueState};
    let f = fixture();
    let dev = Arc::new(f.dev);
    let mem = f.mem;
    let vq = MockSplitQueue::new(&mem, 16);
    three_reads(&mem, &vq);
    let vring = mock_vring(&mem, &vq);
    let qs = QueueState::new(
        0,
        dev.clone(),
        16,
        Arc::new(crate::queue::Inflight::empty()),
    );
    assert!(!qs.started(&vring, &mem));
    let m = Arc::new(mem.clone());
    let mut chains = pop_all(&vring, &qs, &m);
    assert_eq!(chains.len(), 3);
    assert_eq!(qs.live(), 3);
    let (c, b, a) = (
        chains.pop().unwrap(),
        chains.pop().unwrap(),
        chains.pop().unwrap(),
    );
    // A completes normally.
    let mut done = vec![process_chain(&dev, &mem, a.0, a.1)];
    qs.complete(&vring, &mut done).unwrap();
    // B and C are stuck: the timeout answers both, without the volume.
    assert_eq!(qs.fail(Expire::Before(std::time::Instant::now())), 2);
    assert_eq!(qs.live(), 0);
    assert_eq!(used_elems(&mem, &vq), vec![(0, 513), (3, 1), (6, 1)]);
    let st = |k: u64| mem.read_obj::<u8>(GuestAddress(QSTATUS + k)).unwrap();
    assert_eq!(
        (st(0), st(1), st(2)),
        (STATUS_OK, STATUS_IOERR, STATUS_IOERR)
    );
    // Their completions come later: nothing more reaches the guest.
    let mut done = vec![
        process_chain(&dev, &mem, b.0, b.1),
        process_chain(&dev, &mem, c.0, c.1),
    ];
    assert!(done
        .iter()
        .all(|c| c.status.map(|s| s.1) == Some(STATUS_OK)));
    qs.complete(&vring, &mut done).unwrap();
    assert_eq!(used_elems(&mem, &vq).len(), 3);
    assert_eq!((st(1), st(2)), (STATUS_IOERR, STATUS_IOERR));
    assert_eq!(dev.metrics.snapshot().errors.timed_out, 2);
    // A stop with nothing in flight returns at once and answers nothing.
    let t = std::time::Instant::now();
    qs.stop(std::time::Duration::from_secs(5));
    assert!(t.elapsed() < std::time::Duration::from_secs(1));
    assert_eq!(used_elems(&mem, &vq).len(), 3);
}

#[test]
fn a_removed_volume_fails_new_requests_at_once_and_a_resume_serves_them_again() {
    let f = fixture();
    f.dev.remove("test");
    assert_eq!(f.dev.state(), crate::VolumeState::Removed);
    let c = f.io(VIRTIO_BLK_T_IN, 0, wr(DATA, 512));
    assert_eq!(c.status, Some(STATUS_IOERR));
    assert_eq!(f.dev.metrics.snapshot().errors.removed, 1);
    // GET_ID does not touch the volume.
    f.header(VIRTIO_BLK_T_GET_ID, 0);
    let c = f.submit_chain(&[rd(HDR, 16), wr(DATA, 20), wr(STATUS, 1)], 16);
    assert_eq!(c.status, Some(STATUS_OK));
    // Back on a copy of the volume under another name.
    let copy = tempfile::NamedTempFile::new().unwrap();
    std::fs::copy(f._file.as_ref().unwrap().path(), copy.path()).unwrap();
    f.dev.resume(copy.path()).unwrap();
    assert_eq!(f.dev.state(), crate::VolumeState::Active);
    assert_eq!(f.dev.path(), copy.path());
    let c = f.io(VIRTIO_BLK_T_IN, 5, wr(DATA, 512));
    assert_eq!(c.status, Some(STATUS_OK));
    assert_eq!(&f.read_guest(DATA, 8), &5u64.to_le_bytes());
    // ENODEV from a request still on the volume that was swapped out does not remove the
    // new one; from the current one it does.
    let enodev = || crate::VolumeError::Io {
        op: "test",
        offset: 0,
        source: std::io::Error::from_raw_os_error(libc::ENODEV),
    };
    let old = Volume::open(f._file.as_ref().unwrap().path(), &params()).unwrap();
    f.dev.note_io_error(&old, &enodev());
    assert_eq!(f.dev.state(), crate::VolumeState::Active);
    f.dev.note_io_error(&f.dev.volume(), &enodev());
    assert_eq!(f.dev.state(), crate::VolumeState::Removed);
    f.dev.resume(copy.path()).unwrap();
    // A smaller volume is refused, and the export keeps the one it has.
    let small = tempfile::NamedTempFile::new().unwrap();
    small.as_file().set_len(4096).unwrap();
    assert!(matches!(
        f.dev.resume(small.path()),
        Err(crate::ResumeError::TooSmall { .. })
    ));
    assert_eq!(f.dev.path(), copy.path());
}

#[test]
fn requests_in_flight_at_a_crash_are_resubmitted_once_from_the_inflight_buffer() {
    use crate::inflight::Region;
    use crate::queue::QueueState;
    use vhost_user_backend::VringT;
    use virtio_queue::QueueT;
    let f = fixture();
    let dev = Arc::new(f.dev);
    let mem = f.mem;
    let vq = MockSplitQueue::new(&mem, 16);
    three_reads(&mem, &vq);
    let (file, size) = Region::create(1, 16).unwrap();
    let m = Arc::new(mem.clone());
    {
        // The first backend takes all three and completes the second one only.
        let region = Region::map(file.try_clone().unwrap(), size, 0, 1, 16).unwrap();
        let vring = mock_vring(&mem, &vq);
        let qs = QueueState::new(
            0,
            dev.clone(),
            16,
            Arc::new(crate::queue::Inflight::from_pointee(region)),
        );
        assert!(!qs.started(&vring, &mem));
        let mut chains = pop_all(&vring, &qs, &m);
        let b = chains.remove(1);
        let mut done = vec![process_chain(&dev, &mem, b.0, b.1)];
        qs.complete(&vring, &mut done).unwrap();
        // ... and dies.
    }
    assert_eq!(used_elems(&mem, &vq), vec![(3, 513)]);
    // The new backend gets the buffer back; QEMU resets the base to the used index.
    let region = Region::map(file, size, 0, 1, 16).unwrap();
    let vring = mock_vring(&mem, &vq);
    vring.set_queue_next_avail(1);
    let qs = QueueState::new(
        0,
        dev.clone(),
        16,
        Arc::new(crate::queue::Inflight::from_pointee(region)),
    );
    assert!(qs.started(&vring, &mem));
    assert_eq!(vring.get_ref().get_queue().next_avail(), 3);
    let heads = qs.take_resubmit();
    assert_eq!(heads, vec![0, 6]);
    assert!(
        pop_all(&vring, &qs, &m).is_empty(),
        "nothing left in the avail ring"
    );
    let (table, qsize) = {
        let v = vring.get_ref();
        (v.get_queue().desc_table(), v.get_queue().size())
    };
    let mut done = Vec::new();
    for h in heads {
        let taken = qs.take(h, &m, Instant::now());
        let chain = RawChain::from_table(&mem, table, qsize, h);
        done.push(process_chain(&dev, &mem, chain, taken));
    }
    qs.complete(&vring, &mut done).unwrap();
    assert_eq!(used_elems(&mem, &vq), vec![(3, 513), (0, 513), (6, 513)]);
    for k in 0..3u64 {
        let mut b = [0u8; 8];
        mem.read_slice(&mut b, GuestAddress(QDATA + k * 512))
            .unwrap();
        assert_eq!(u64::from_le_bytes(b), k, "sector {k} read back");
    }
    // A third start finds nothing in flight.
    let vring = mock_vring(&mem, &vq);
    assert!(!qs.started(&vring, &mem));
}

#[test]
fn stopping_a_ring_answers_stuck_requests_or_leaves_them_in_the_inflight_buffer() {
    use crate::inflight::Region;
    use crate::queue::QueueState;
    use std::time::{Duration, Instant};
    for with_buffer in [false, true] {
        let f = fixture();
        let dev = Arc::new(f.dev);
        let mem = f.mem;
        let vq = MockSplitQueue::new(&mem, 16);
        three_reads(&mem, &vq);
        let region = with_buffer.then(|| {
            let (file, size) = Region::create(1, 16).unwrap();
            Region::map(file, size, 0, 1, 16).unwrap()
        });
        let region = Arc::new(crate::queue::Inflight::new(region.map(Arc::new)));
        let vring = mock_vring(&mem, &vq);
        let qs = QueueState::new(0, dev.clone(), 16, region.clone());
        qs.started(&vring, &mem);
        let m = Arc::new(mem.clone());
        let chains = pop_all(&vring, &qs, &m);
        let t = Instant::now();
        qs.stop(Duration::from_millis(100));
        assert!(t.elapsed() < Duration::from_secs(1), "stop is bounded");
        assert_eq!(qs.live(), 0);
        let used = used_elems(&mem, &vq);
        if with_buffer {
            assert!(used.is_empty(), "left for resubmission, not answered");
            let r = region.load();
            assert_eq!(
                r.as_ref().unwrap().queue(0).unwrap().recover(0).0,
                vec![0, 3, 6]
            );
        } else {
            assert_eq!(used, vec![(0, 1), (3, 1), (6, 1)]);
        }
        // The stuck requests finish later: nothing reaches the guest.
        let mut done: Vec<_> = chains
            .into_iter()
            .map(|(c, taken)| process_chain(&dev, &mem, c, taken))
            .collect();
        qs.complete(&vring, &mut done).unwrap();
        assert_eq!(used_elems(&mem, &vq), used);
    }
}

#[test]
fn chains_read_again_from_the_table_match_the_popped_ones() {
    // Random descriptor tables, direct and indirect, with loops, bad indices and nested
    // tables: reading a chain from its head gives what virtio-queue's iterator gives.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let table_at = 0x8_0000u64;
    for _ in 0..3000 {
        let vq = MockSplitQueue::new(&mem, 16);
        let n = 1 + rnd(6) as usize;
        let mut descs = Vec::new();
        for i in 0..n {
            let mut flags = 0u16;
            if rnd(3) > 0 && i + 1 < n {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            if rnd(2) == 0 {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            let (addr, len) = if rnd(8) == 0 {
                flags |= VRING_DESC_F_INDIRECT as u16;
                (
                    table_at,
                    16 * rnd(5) as u32 + if rnd(6) == 0 { 3 } else { 0 },
                )
            } else {
                (0x1_0000 + rnd(0x1000) * 16, rnd(4096) as u32)
            };
            let next = if rnd(10) == 0 {
                rnd(20) as u16
            } else {
                i as u16 + 1
            };
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                addr, len, flags, next,
            )));
        }
        for i in 0..4u64 {
            let flags = (rnd(8) as u16)
                & (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE | VRING_DESC_F_INDIRECT) as u16;
            let d = SplitDescriptor::new(0x2_0000 + i * 64, rnd(1024) as u32, flags, rnd(5) as u16);
            mem.write_obj(d, GuestAddress(table_at + i * 16)).unwrap();
        }
        let Ok(chain) = vq.build_multiple_desc_chains(&descs) else {
            continue;
        };
        let popped = RawChain::from_chain(chain);
        let again = RawChain::from_table(&mem, vq.desc_table_addr().0, 16, popped.head);
        assert_eq!(popped, again, "descriptors {descs:?}");
    }
}
