//! A libblkio vhost-user-blk client (the `virtio-blk-vhost-user` driver, a real
//! vhost-user frontend outside QEMU) with bounded waits, for tests that drive an export
//! request by request: queue sizes, segment counts, data checks.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context};
use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// Longest wait for one completion.
pub const BLKIO_TIMEOUT: Duration = Duration::from_secs(20);

/// A connected libblkio instance with one queue and one memory region.
pub struct BlkioClient {
    q: Blkioq,
    buf: MemoryRegion,
    b: Blkio,
}

impl std::fmt::Debug for BlkioClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkioClient")
            .field("buf_len", &self.buf.len)
            .finish_non_exhaustive()
    }
}

impl BlkioClient {
    /// Connects to the vhost-user socket `path` asking for `queue_size` descriptors per
    /// queue, with a buffer of `buf_len` bytes mapped for requests.
    pub fn connect(path: &Path, queue_size: i32, buf_len: usize) -> anyhow::Result<BlkioClient> {
        Self::connect_with(path, queue_size, buf_len, false)
    }

    /// As [`BlkioClient::connect`], read-only (libblkio refuses a read-only device
    /// otherwise).
    pub fn connect_read_only(
        path: &Path,
        queue_size: i32,
        buf_len: usize,
    ) -> anyhow::Result<BlkioClient> {
        Self::connect_with(path, queue_size, buf_len, true)
    }

    fn connect_with(
        path: &Path,
        queue_size: i32,
        buf_len: usize,
        read_only: bool,
    ) -> anyhow::Result<BlkioClient> {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(|e| anyhow!("{e}"))?;
        let p = path.to_str().context("socket path is not UTF-8")?;
        b.set_str("path", p).map_err(|e| anyhow!("{e}"))?;
        if read_only {
            b.set_bool("read-only", true)
                .map_err(|e| anyhow!("read-only: {e}"))?;
        }
        b.connect().map_err(|e| anyhow!("connect: {e}"))?;
        b.set_i32("num-queues", 1).map_err(|e| anyhow!("{e}"))?;
        b.set_i32("queue-size", queue_size)
            .map_err(|e| anyhow!("queue-size {queue_size}: {e}"))?;
        let mut out = b
            .start()
            .map_err(|e| anyhow!("start with queue-size {queue_size}: {e}"))?;
        let buf = b.alloc_mem_region(buf_len).map_err(|e| anyhow!("{e}"))?;
        b.map_mem_region(&buf).map_err(|e| anyhow!("{e}"))?;
        let q = out.queues.remove(0);
        Ok(BlkioClient { q, buf, b })
    }

    /// The mapped buffer.
    pub fn mem(&mut self) -> &mut [u8] {
        // SAFETY: the region is a mapping of `len` bytes owned by `self.b`, alive as long
        // as the client, and no request is in flight while the slice is used (every
        // request is waited for before its method returns).
        unsafe { std::slice::from_raw_parts_mut(self.buf.addr as *mut u8, self.buf.len) }
    }

    /// A libblkio property (`max-segments`, `capacity`, ...).
    pub fn get_u64(&self, name: &str) -> anyhow::Result<u64> {
        self.b.get_u64(name).map_err(|e| anyhow!("{name}: {e}"))
    }

    /// A libblkio property of type bool.
    pub fn get_bool(&self, name: &str) -> anyhow::Result<bool> {
        self.b.get_bool(name).map_err(|e| anyhow!("{name}: {e}"))
    }

    /// A libblkio property of type int.
    pub fn get_i32(&self, name: &str) -> anyhow::Result<i32> {
        self.b.get_i32(name).map_err(|e| anyhow!("{name}: {e}"))
    }

    /// Waits (bounded) for one completion; returns its `ret` (0: success).
    fn wait(&mut self) -> anyhow::Result<i32> {
        let mut c = [MaybeUninit::<Completion>::uninit()];
        let mut t = BLKIO_TIMEOUT;
        let n = self
            .q
            .do_io(&mut c, 1, Some(&mut t), None)
            .map_err(|e| anyhow!("do_io: {e}"))?;
        if n != 1 {
            return Err(anyhow!("no completion within {BLKIO_TIMEOUT:?}"));
        }
        // SAFETY: do_io initialised the first `n` (== 1) completions.
        Ok(unsafe { c[0].assume_init_ref() }.ret)
    }

    /// Writes `len` bytes from the buffer at `buf_off` to `off`; returns `ret`.
    pub fn write(&mut self, off: u64, buf_off: usize, len: usize) -> anyhow::Result<i32> {
        self.check(buf_off, len)?;
        let p = self.buf.addr + buf_off;
        self.q.write(off, p as *const u8, len, 0, ReqFlags::empty());
        self.wait()
    }

    /// Reads `len` bytes at `off` into the buffer at `buf_off`; returns `ret`.
    pub fn read(&mut self, off: u64, buf_off: usize, len: usize) -> anyhow::Result<i32> {
        self.check(buf_off, len)?;
        let p = self.buf.addr + buf_off;
        self.q.read(off, p as *mut u8, len, 0, ReqFlags::empty());
        self.wait()
    }

    /// A flush; returns `ret`.
    pub fn flush(&mut self) -> anyhow::Result<i32> {
        self.q.flush(0, ReqFlags::empty());
        self.wait()
    }

    /// A discard of `[off, off + len)`; returns `ret`.
    pub fn discard(&mut self, off: u64, len: u64) -> anyhow::Result<i32> {
        self.q.discard(off, len, 0, ReqFlags::empty());
        self.wait()
    }

    /// A write-zeroes of `[off, off + len)` (the device may unmap); returns `ret`.
    pub fn write_zeroes(&mut self, off: u64, len: u64) -> anyhow::Result<i32> {
        self.q.write_zeroes(off, len, 0, ReqFlags::empty());
        self.wait()
    }

    fn check(&self, buf_off: usize, len: usize) -> anyhow::Result<()> {
        if buf_off
            .checked_add(len)
            .is_none_or(|end| end > self.buf.len)
        {
            return Err(anyhow!(
                "{len} bytes at {buf_off} do not fit the {} byte buffer",
                self.buf.len
            ));
        }
        Ok(())
    }

    /// A writev then a readv of `n` 512-byte segments at `off`, scattered over the
    /// buffer (one segment every KiB); checks the data read back. Needs a buffer of at
    /// least `2 * n` KiB.
    pub fn vectored_round_trip(&mut self, n: usize, off: u64) -> anyhow::Result<()> {
        if self.buf.len < 2 * n * 1024 {
            return Err(anyhow!("buffer too small for {n} segments"));
        }
        let data: Vec<u8> = (0..n * 512)
            .map(|i| (n as u8).wrapping_mul(31).wrapping_add((i % 251) as u8))
            .collect();
        let base = self.buf.addr;
        let iov = |k: usize| -> Vec<libc::iovec> {
            (0..n)
                .map(|i| libc::iovec {
                    iov_base: (base + k * n * 1024 + i * 1024) as *mut libc::c_void,
                    iov_len: 512,
                })
                .collect()
        };
        for i in 0..n {
            self.mem()[i * 1024..i * 1024 + 512].copy_from_slice(&data[i * 512..(i + 1) * 512]);
        }
        let wv = iov(0);
        self.q
            .writev(off, wv.as_ptr(), n as u32, 0, ReqFlags::empty());
        let r = self.wait()?;
        if r != 0 {
            return Err(anyhow!("writev of {n} segments failed: {r}"));
        }
        let rv = iov(1);
        self.q
            .readv(off, rv.as_ptr(), n as u32, 0, ReqFlags::empty());
        let r = self.wait()?;
        if r != 0 {
            return Err(anyhow!("readv of {n} segments failed: {r}"));
        }
        for i in 0..n {
            let at = n * 1024 + i * 1024;
            if self.mem()[at..at + 512] != data[i * 512..(i + 1) * 512] {
                return Err(anyhow!("segment {i} of {n} read back wrong"));
            }
        }
        Ok(())
    }
}
