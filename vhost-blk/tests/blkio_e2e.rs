//! End to end: libblkio's virtio-blk-vhost-user driver as a real vhost-user frontend
//! against an export served in-process. Every wait is bounded; the export is stopped and
//! joined when a test ends, pass or fail.
//!
//! Every data-path check is written once and run against each engine (module per engine
//! at the end): io_uring with I/O threads for the rest, io_uring alone (everything it
//! declines runs on the queue thread), and the synchronous I/O threads without io_uring.

use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use vhost_blk::{Export, ExportConfig, StopHandle};

const TIMEOUT: Duration = Duration::from_secs(20);

/// How the export runs its requests.
#[derive(Debug, Clone, Copy)]
enum Engine {
    /// io_uring for aligned reads and writes, I/O threads for the rest (the default).
    Uring,
    /// io_uring, and no I/O threads: declined requests run on the queue thread.
    UringOnly,
    /// I/O threads only, as where io_uring is unavailable.
    Threads,
    /// The volume file in memory (tmpfs): every read and write is a copy made by the queue
    /// thread itself (io_uring set up, but not used for the data).
    InMemory,
}

/// Prefix of volume files the `InMemory` checks place in /dev/shm (removed on drop).
const SHM_PREFIX: &str = "/dev/shm/vhost-blk-e2e-";

impl Engine {
    fn apply(self, cfg: &mut ExportConfig) {
        match self {
            Engine::Uring => cfg.io_uring = true,
            Engine::UringOnly => {
                cfg.io_uring = true;
                cfg.io_threads_per_queue = 0;
            }
            Engine::Threads => cfg.io_uring = false,
            Engine::InMemory => {
                cfg.io_uring = true;
                // Regular files move to tmpfs; block devices stay.
                if std::fs::metadata(&cfg.volume).is_ok_and(|m| m.is_file()) {
                    static N: std::sync::atomic::AtomicUsize =
                        std::sync::atomic::AtomicUsize::new(0);
                    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let to = PathBuf::from(format!("{SHM_PREFIX}{}-{n}.img", std::process::id()));
                    std::fs::copy(&cfg.volume, &to).unwrap();
                    cfg.volume = to;
                }
            }
        }
    }
}

/// An export serving on a thread; stopped and joined on drop.
struct Server {
    export: Arc<Export>,
    stop: StopHandle,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(size: u64, tweak: impl FnOnce(&mut ExportConfig)) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("volume.img");
        std::fs::File::create(&volume)
            .unwrap()
            .set_len(size)
            .unwrap();
        Server::start_on(dir, volume, tweak)
    }

    fn start_on(
        dir: tempfile::TempDir,
        volume: PathBuf,
        tweak: impl FnOnce(&mut ExportConfig),
    ) -> Server {
        let mut cfg = ExportConfig {
            volume,
            socket: dir.path().join("vhost.sock"),
            queue_size: 1024,
            serial: "e2e".into(),
            ..ExportConfig::default()
        };
        tweak(&mut cfg);
        let export = Arc::new(Export::new(cfg).unwrap());
        let stop = export.stop_handle();
        let e2 = export.clone();
        let thread = std::thread::spawn(move || e2.serve().unwrap());
        Server {
            export,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    fn socket(&self) -> PathBuf {
        self.export.config().socket.clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let vol = self.export.config().volume.clone();
        if vol.to_string_lossy().starts_with(SHM_PREFIX) {
            let _ = std::fs::remove_file(&vol);
        }
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(t.join().is_ok());
            });
            let joined = rx.recv_timeout(TIMEOUT);
            if !std::thread::panicking() {
                assert_eq!(joined, Ok(true), "export thread did not stop in time");
            }
        }
    }
}

/// A connected libblkio client with one queue and one mapped buffer.
struct Client {
    q: Blkioq,
    buf: MemoryRegion,
    b: Blkio,
}

impl Client {
    fn connect(server: &Server, num_queues: i32, buf_len: usize) -> Client {
        let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
        b.set_str("path", server.socket().to_str().unwrap())
            .unwrap();
        b.connect().unwrap();
        b.set_i32("num-queues", num_queues).unwrap();
        b.set_i32("queue-size", 1024).unwrap();
        let mut out = b.start().unwrap();
        let buf = b.alloc_mem_region(buf_len).unwrap();
        b.map_mem_region(&buf).unwrap();
        let q = out.queues.remove(0);
        Client { q, buf, b }
    }

    fn mem(&mut self) -> &mut [u8] {
        // SAFETY: the region is a private mapping of `len` bytes owned by `self.b`, alive
        // as long as the client, and no request is in flight while the slice is used.
        unsafe { std::slice::from_raw_parts_mut(self.buf.addr as *mut u8, self.buf.len) }
    }

    /// Waits for one completion (bounded) and returns its `ret`.
    fn wait(&mut self) -> i32 {
        let mut c = [MaybeUninit::<Completion>::uninit()];
        let mut t = TIMEOUT;
        let n = self.q.do_io(&mut c, 1, Some(&mut t), None).unwrap();
        assert_eq!(n, 1, "no completion within {TIMEOUT:?}");
        // SAFETY: do_io initialised the first `n` (== 1) completions.
        unsafe { c[0].assume_init_ref() }.ret
    }

    fn write(&mut self, off: u64, buf_off: usize, len: usize) -> i32 {
        let p = self.buf.addr + buf_off;
        self.q.write(off, p as *const u8, len, 0, ReqFlags::empty());
        self.wait()
    }

    fn read(&mut self, off: u64, buf_off: usize, len: usize) -> i32 {
        let p = self.buf.addr + buf_off;
        self.q.read(off, p as *mut u8, len, 0, ReqFlags::empty());
        self.wait()
    }

    fn capacity(&self) -> u64 {
        self.b.get_u64("capacity").unwrap()
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8))
        .collect()
}

fn round_trip(c: &mut Client, off: u64, len: usize, seed: u8) {
    let data = pattern(seed, len);
    c.mem()[..len].copy_from_slice(&data);
    assert_eq!(c.write(off, 0, len), 0, "write {len} at {off}");
    c.mem()[len..2 * len].fill(0);
    assert_eq!(c.read(off, len, len), 0, "read {len} at {off}");
    assert_eq!(&c.mem()[len..2 * len], &data[..], "data at {off}+{len}");
}

fn blkio_reads_back_writes_of_512_bytes_4k_and_1m(e: Engine) {
    let s = Server::start(16 << 20, |cfg| e.apply(cfg));
    let mut c = Client::connect(&s, 1, 4 << 20);
    assert_eq!(c.capacity(), 16 << 20);
    round_trip(&mut c, 512, 512, 1);
    round_trip(&mut c, 3 * 512, 512, 2);
    round_trip(&mut c, 8192, 4096, 3);
    round_trip(&mut c, 1 << 20, 1 << 20, 4);
    round_trip(&mut c, (1 << 20) + 512, 1 << 20, 5);
    // The 512-byte writes survived their neighbours.
    assert_eq!(c.read(0, 0, 4096), 0);
    assert_eq!(&c.mem()[512..1024], &pattern(1, 512)[..]);
    assert_eq!(&c.mem()[1536..2048], &pattern(2, 512)[..]);
    // Flush.
    c.q.flush(0, ReqFlags::empty());
    assert_eq!(c.wait(), 0);
    let m = s.export.metrics();
    assert!(m.requests.write >= 5 && m.requests.flush >= 1);
}

fn blkio_discard_and_write_zeroes(e: Engine) {
    let s = Server::start(8 << 20, |cfg| e.apply(cfg));
    let mut c = Client::connect(&s, 1, 1 << 20);
    round_trip(&mut c, 0, 64 << 10, 7);
    c.q.write_zeroes(4096, 8192, 0, ReqFlags::empty());
    assert_eq!(c.wait(), 0);
    c.q.write_zeroes(512, 1024, 0, ReqFlags::NO_UNMAP);
    assert_eq!(c.wait(), 0);
    assert_eq!(c.read(0, 0, 64 << 10), 0);
    let want = pattern(7, 64 << 10);
    let got = c.mem()[..64 << 10].to_vec();
    assert_eq!(&got[..512], &want[..512]);
    assert!(got[512..1536].iter().all(|&b| b == 0));
    assert_eq!(&got[1536..4096], &want[1536..4096]);
    assert!(got[4096..12288].iter().all(|&b| b == 0));
    assert_eq!(&got[12288..], &want[12288..]);
    c.q.discard(32 << 10, 32 << 10, 0, ReqFlags::empty());
    assert_eq!(c.wait(), 0);
    let m = s.export.metrics();
    assert_eq!((m.requests.write_zeroes, m.requests.discard), (2, 1));
}

/// A writev/readv of `n` iovecs of 512 bytes, scattered over the buffer.
fn vectored(c: &mut Client, n: usize, off: u64) {
    let data = pattern(n as u8, n * 512);
    let base = c.buf.addr;
    let iov = |k: usize| -> Vec<libc::iovec> {
        (0..n)
            .map(|i| libc::iovec {
                iov_base: (base + k * n * 1024 + i * 1024) as *mut libc::c_void,
                iov_len: 512,
            })
            .collect()
    };
    for i in 0..n {
        c.mem()[i * 1024..i * 1024 + 512].copy_from_slice(&data[i * 512..(i + 1) * 512]);
    }
    let wv = iov(0);
    c.q.writev(off, wv.as_ptr(), n as u32, 0, ReqFlags::empty());
    assert_eq!(c.wait(), 0, "writev of {n} iovecs");
    let rv = iov(1);
    c.q.readv(off, rv.as_ptr(), n as u32, 0, ReqFlags::empty());
    assert_eq!(c.wait(), 0, "readv of {n} iovecs");
    for i in 0..n {
        let at = n * 1024 + i * 1024;
        assert_eq!(
            &c.mem()[at..at + 512],
            &data[i * 512..(i + 1) * 512],
            "iovec {i}"
        );
    }
}

fn blkio_readv_writev_of_515_and_1000_iovecs(e: Engine) {
    let s = Server::start(8 << 20, |cfg| {
        e.apply(cfg);
        cfg.max_iovecs_per_io = 128;
    });
    let mut c = Client::connect(&s, 1, 4 << 20);
    vectored(&mut c, 515, 4096);
    vectored(&mut c, 1000, 1 << 20);
    let m = s.export.metrics();
    assert_eq!(m.errors.io + m.errors.malformed, 0);
}

fn blkio_read_past_the_end_fails_without_hanging(e: Engine) {
    let s = Server::start(1 << 20, |cfg| e.apply(cfg));
    let mut c = Client::connect(&s, 1, 64 << 10);
    assert_ne!(c.read(1 << 20, 0, 4096), 0);
    assert_ne!(c.read((1 << 20) - 512, 0, 1024), 0);
    assert_ne!(c.write(u64::MAX - 4095, 0, 4096), 0);
    // And the queue still serves.
    round_trip(&mut c, (1 << 20) - 4096, 2048, 9);
}

fn blkio_multi_queue_and_reconnect(e: Engine) {
    let s = Server::start(4 << 20, |cfg| {
        e.apply(cfg);
        cfg.num_queues = 4;
    });
    {
        let mut c = Client::connect(&s, 4, 64 << 10);
        round_trip(&mut c, 0, 4096, 1);
    }
    // A second frontend after the first disconnected sees the first one's data.
    let mut c = Client::connect(&s, 2, 64 << 10);
    assert_eq!(c.read(0, 0, 4096), 0);
    assert_eq!(&c.mem()[..4096], &pattern(1, 4096)[..]);
}

fn blkio_sees_a_read_only_export_as_read_only(e: Engine) {
    let s = Server::start(1 << 20, |cfg| {
        e.apply(cfg);
        cfg.read_only = true;
    });
    // The RO feature bit makes libblkio refuse a read-write start ...
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", s.socket().to_str().unwrap()).unwrap();
    b.connect().unwrap();
    let err = b
        .start()
        .err()
        .expect("read-write start of a read-only export");
    assert_eq!(err.errno().raw_os_error(), libc::EROFS);
    drop(b);
    // ... and a read-only client reads. (Server-side refusal of writes is unit-tested.)
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", s.socket().to_str().unwrap()).unwrap();
    b.set_bool("read-only", true).unwrap();
    b.connect().unwrap();
    let mut out = b.start().unwrap();
    let buf = b.alloc_mem_region(4096).unwrap();
    b.map_mem_region(&buf).unwrap();
    let mut c = Client {
        q: out.queues.remove(0),
        buf,
        b,
    };
    assert_eq!(c.read(0, 0, 4096), 0);
}

/// A 4096-sector loop device over a temporary file. Fails the test (never skips) without
/// root: the suite runs as root.
fn loop_4k(size: u64) -> loop_bridge::testing::TempLoop {
    loop_bridge::testing::TempLoop::new(size, 4096)
}

fn blkio_on_a_4096_sector_loop_device_sees_512_byte_sectors(e: Engine) {
    let ld = loop_4k(16 << 20);
    let s = Server::start_on(
        tempfile::tempdir().unwrap(),
        ld.path().to_path_buf(),
        |cfg| e.apply(cfg),
    );
    let mut c = Client::connect(&s, 1, 4 << 20);
    assert_eq!(c.capacity(), 16 << 20);
    assert_eq!(c.b.get_i32("request-alignment").unwrap(), 512);
    // Scattered 512-byte writes inside 4K blocks, then whole-block and 1 MiB I/O.
    for (i, sector) in [1u64, 3, 8, 9, 15, 4095].into_iter().enumerate() {
        round_trip(&mut c, sector * 512, 512, i as u8 + 1);
    }
    round_trip(&mut c, 64 << 10, 4096, 20);
    round_trip(&mut c, (1 << 20) + 512, 1 << 20, 21);
    assert_eq!(c.read(0, 0, 8192), 0);
    assert_eq!(&c.mem()[512..1024], &pattern(1, 512)[..]);
    assert_eq!(&c.mem()[1536..2048], &pattern(2, 512)[..]);
    assert!(c.mem()[..512].iter().all(|&b| b == 0));
    assert!(c.mem()[1024..1536].iter().all(|&b| b == 0));
    vectored(&mut c, 515, 8 << 20);
    c.q.write_zeroes(1024, 512, 0, ReqFlags::empty());
    assert_eq!(c.wait(), 0);
    assert_eq!(c.read(0, 0, 4096), 0);
    assert_eq!(&c.mem()[512..1024], &pattern(1, 512)[..]);
    assert!(c.mem()[1024..1536].iter().all(|&b| b == 0));
    assert_eq!(&c.mem()[1536..2048], &pattern(2, 512)[..]);
    drop(c);
    drop(s);
}

fn blkio_queue_depth_32_of_512_byte_writes_in_shared_4k_blocks(e: Engine) {
    // 32 in-flight 512-byte writes, 8 per 4 KiB block: the I/O threads run them in
    // parallel and the range locks keep every one.
    let s = Server::start(4 << 20, |cfg| {
        cfg.min_device_block_size = 4096;
        cfg.io_threads_per_queue = 4;
        e.apply(cfg);
    });
    let mut c = Client::connect(&s, 1, 1 << 20);
    for round in 0..4u8 {
        for i in 0..32usize {
            let data = pattern(round.wrapping_mul(32).wrapping_add(i as u8), 512);
            c.mem()[i * 512..(i + 1) * 512].copy_from_slice(&data);
        }
        let base = c.buf.addr;
        for i in 0..32usize {
            c.q.write(
                i as u64 * 512,
                (base + i * 512) as *const u8,
                512,
                i,
                ReqFlags::empty(),
            );
        }
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..32).map(|_| MaybeUninit::uninit()).collect();
        let mut got = 0;
        while got < 32 {
            let mut t = TIMEOUT;
            let n = c.q.do_io(&mut comps[got..], 1, Some(&mut t), None).unwrap();
            assert!(n > 0, "no completion within {TIMEOUT:?}");
            for comp in &comps[got..got + n] {
                // SAFETY: do_io initialised these `n` completions.
                assert_eq!(unsafe { comp.assume_init_ref() }.ret, 0);
            }
            got += n;
        }
        assert_eq!(c.read(0, 65536, 32 * 512), 0);
        for i in 0..32usize {
            let want = pattern(round.wrapping_mul(32).wrapping_add(i as u8), 512);
            assert_eq!(
                &c.mem()[65536 + i * 512..65536 + (i + 1) * 512],
                &want[..],
                "round {round} sector {i}"
            );
        }
    }
}

fn blkio_reads_of_a_volume_that_shrank_underneath_fail_promptly(e: Engine) {
    // The backing disappears under the export (here: the file is truncated): reads are
    // answered with an error at once, never left hanging, and the export keeps serving.
    let s = Server::start(4 << 20, |cfg| e.apply(cfg));
    let mut c = Client::connect(&s, 1, 1 << 20);
    round_trip(&mut c, 1 << 20, 4096, 3);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&s.export.config().volume)
        .unwrap()
        .set_len(0)
        .unwrap();
    let t0 = std::time::Instant::now();
    assert_ne!(c.read(1 << 20, 0, 4096), 0);
    assert_ne!(c.read(0, 0, 512), 0);
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(s.export.metrics().errors.io >= 2);
    // Writes still work (they extend the file) and read back.
    round_trip(&mut c, 0, 4096, 4);
}

/// Waits (bounded) for `n` completions, each successful.
fn wait_ok(c: &mut Client, n: usize) {
    let mut comps: Vec<MaybeUninit<Completion>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
    let mut got = 0;
    while got < n {
        let mut t = TIMEOUT;
        let k = c.q.do_io(&mut comps[got..], 1, Some(&mut t), None).unwrap();
        assert!(k > 0, "no completion within {TIMEOUT:?}");
        for comp in &comps[got..got + k] {
            // SAFETY: do_io initialised these `k` completions.
            let comp = unsafe { comp.assume_init_ref() };
            assert_eq!(comp.ret, 0, "request {}", comp.user_data);
        }
        got += k;
    }
}

fn blkio_aligned_and_read_modify_write_requests_in_flight_together(e: Engine) {
    // On a 4 KiB device: 16 512-byte writes (read-modify-write, 8 per block) and 16
    // whole-block writes in flight at once, then 32 reads of both kinds; every byte is
    // where the guest put it.
    let s = Server::start(4 << 20, |cfg| {
        cfg.min_device_block_size = 4096;
        e.apply(cfg);
    });
    let mut c = Client::connect(&s, 1, 1 << 20);
    let base = c.buf.addr;
    for round in 0..3u8 {
        let small = |i: usize| pattern(round.wrapping_mul(64).wrapping_add(i as u8), 512);
        let big = |i: usize| pattern(round.wrapping_mul(64).wrapping_add(32 + i as u8), 4096);
        for i in 0..16usize {
            c.mem()[i * 512..(i + 1) * 512].copy_from_slice(&small(i));
            let at = 8192 + i * 4096;
            c.mem()[at..at + 4096].copy_from_slice(&big(i));
        }
        for i in 0..16usize {
            let p = (base + i * 512) as *const u8;
            c.q.write(i as u64 * 512, p, 512, i, ReqFlags::empty());
            let p = (base + 8192 + i * 4096) as *const u8;
            let off = 8192 + i as u64 * 4096;
            c.q.write(off, p, 4096, 16 + i, ReqFlags::empty());
        }
        wait_ok(&mut c, 32);
        let rb = 512 << 10;
        c.mem()[rb..rb + (80 << 10)].fill(0xee);
        for i in 0..16usize {
            let p = (base + rb + i * 512) as *mut u8;
            c.q.read(i as u64 * 512, p, 512, i, ReqFlags::empty());
            let p = (base + rb + 8192 + i * 4096) as *mut u8;
            let off = 8192 + i as u64 * 4096;
            c.q.read(off, p, 4096, 16 + i, ReqFlags::empty());
        }
        wait_ok(&mut c, 32);
        for i in 0..16usize {
            let at = rb + i * 512;
            assert_eq!(
                &c.mem()[at..at + 512],
                &small(i)[..],
                "round {round} sector {i}"
            );
            let at = rb + 8192 + i * 4096;
            assert_eq!(
                &c.mem()[at..at + 4096],
                &big(i)[..],
                "round {round} block {i}"
            );
        }
    }
    let m = s.export.metrics();
    assert_eq!(m.errors.io + m.errors.malformed, 0);
}

fn blkio_requests_on_every_queue_complete(e: Engine) {
    // Four queues, each with its own worker thread (and io_uring): requests in flight on
    // all of them at once, several rounds.
    let s = Server::start(4 << 20, |cfg| {
        e.apply(cfg);
        cfg.num_queues = 4;
    });
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", s.socket().to_str().unwrap()).unwrap();
    b.connect().unwrap();
    b.set_i32("num-queues", 4).unwrap();
    b.set_i32("queue-size", 1024).unwrap();
    let mut out = b.start().unwrap();
    assert_eq!(out.queues.len(), 4);
    let region = b.alloc_mem_region(1 << 20).unwrap();
    b.map_mem_region(&region).unwrap();
    // SAFETY: the region is a mapping of `len` bytes owned by `b`, alive for this test;
    // the slice is only touched while no request using it is in flight.
    let mem = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
    let wait_all = |q: &mut Blkioq, n: usize| {
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..n).map(|_| MaybeUninit::uninit()).collect();
        let mut got = 0;
        while got < n {
            let mut t = TIMEOUT;
            let k = q.do_io(&mut comps[got..], 1, Some(&mut t), None).unwrap();
            assert!(k > 0, "no completion within {TIMEOUT:?}");
            for c in &comps[got..got + k] {
                // SAFETY: do_io initialised these `k` completions.
                assert_eq!(unsafe { c.assume_init_ref() }.ret, 0);
            }
            got += k;
        }
    };
    for round in 0..3u8 {
        for (qi, q) in out.queues.iter_mut().enumerate() {
            for i in 0..8usize {
                let slot = qi * 8 + i;
                let data = pattern(round.wrapping_mul(32).wrapping_add(slot as u8), 4096);
                mem[slot * 4096..(slot + 1) * 4096].copy_from_slice(&data);
                let p = (region.addr + slot * 4096) as *const u8;
                q.write(slot as u64 * 4096, p, 4096, slot, ReqFlags::empty());
            }
        }
        for q in out.queues.iter_mut() {
            wait_all(q, 8);
        }
        for (qi, q) in out.queues.iter_mut().enumerate() {
            // Read another queue's blocks back.
            for i in 0..8usize {
                let slot = ((qi + 1) % 4) * 8 + i;
                let p = (region.addr + (512 << 10) + slot * 4096) as *mut u8;
                q.read(slot as u64 * 4096, p, 4096, slot, ReqFlags::empty());
            }
        }
        for q in out.queues.iter_mut() {
            wait_all(q, 8);
        }
        for slot in 0..32usize {
            let want = pattern(round.wrapping_mul(32).wrapping_add(slot as u8), 4096);
            let at = (512 << 10) + slot * 4096;
            assert_eq!(&mem[at..at + 4096], &want[..], "round {round} block {slot}");
        }
    }
}

fn blkio_stopping_under_load_returns_promptly(e: Engine) {
    // A client keeps 32 reads in flight while the export is stopped: requests the client
    // makes available after the stop are not taken, and the export stops (the stop is
    // bounded: no new request, a short drain, the rest IOERR, the connection closed).
    let mut s = Server::start(8 << 20, |cfg| e.apply(cfg));
    let mut c = Client::connect(&s, 1, 32 * 4096);
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let r = running.clone();
    let load = std::thread::spawn(move || {
        let base = c.buf.addr;
        let mut done = 0u64;
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..32).map(|_| MaybeUninit::uninit()).collect();
        for i in 0..32usize {
            c.q.read(
                i as u64 * 4096,
                (base + i * 4096) as *mut u8,
                4096,
                i,
                ReqFlags::empty(),
            );
        }
        while r.load(std::sync::atomic::Ordering::Relaxed) {
            let mut t = Duration::from_millis(200);
            let Ok(k) = c.q.do_io(&mut comps, 1, Some(&mut t), None) else {
                break;
            };
            for comp in &comps[..k] {
                // SAFETY: do_io initialised these `k` completions.
                let comp = unsafe { comp.assume_init_ref() };
                let i = comp.user_data;
                c.q.read(
                    i as u64 * 4096,
                    (base + i * 4096) as *mut u8,
                    4096,
                    i,
                    ReqFlags::empty(),
                );
            }
            done += k as u64;
        }
        done
    });
    std::thread::sleep(Duration::from_millis(300));
    let t = std::time::Instant::now();
    s.stop.stop();
    let thread = s.thread.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(thread.join().is_ok());
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)),
        Ok(true),
        "export did not stop"
    );
    let took = t.elapsed();
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let done = load.join().unwrap();
    assert!(done > 32, "the client was not running ({done} reads)");
    assert!(took < Duration::from_secs(2), "stop took {took:?}");
}

/// Runs every data-path check against one engine.
macro_rules! conformance {
    ($engine:ident, $($check:ident),* $(,)?) => {
        #[allow(non_snake_case)]
        mod $engine {
            $(
                #[test]
                fn $check() {
                    super::$check(super::Engine::$engine);
                }
            )*
        }
    };
}

macro_rules! all_checks {
    ($engine:ident) => {
        conformance!(
            $engine,
            blkio_reads_back_writes_of_512_bytes_4k_and_1m,
            blkio_discard_and_write_zeroes,
            blkio_readv_writev_of_515_and_1000_iovecs,
            blkio_read_past_the_end_fails_without_hanging,
            blkio_multi_queue_and_reconnect,
            blkio_sees_a_read_only_export_as_read_only,
            blkio_on_a_4096_sector_loop_device_sees_512_byte_sectors,
            blkio_queue_depth_32_of_512_byte_writes_in_shared_4k_blocks,
            blkio_reads_of_a_volume_that_shrank_underneath_fail_promptly,
            blkio_aligned_and_read_modify_write_requests_in_flight_together,
            blkio_requests_on_every_queue_complete,
            blkio_stopping_under_load_returns_promptly,
        );
    };
}

all_checks!(Uring);
all_checks!(UringOnly);
all_checks!(Threads);
all_checks!(InMemory);
