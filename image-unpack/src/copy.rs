//! The bulk data path: image extents onto the target, in parallel, aligned.
//!
//! ```text
//!  extents() ──► producer: cut into fixed windows ──► bounded channel ──► N workers
//!                (aligned to the target, W bytes)                          │
//!      each worker: fill its own aligned buffer (read_extent, inflating    │
//!      compressed clusters), scan it in granules, then                     ▼
//!        data granules ─► one pwrite per run (O_DIRECT when available)
//!        zero granules ─► Target::zero_range (BLKZEROOUT / punch hole)
//! ```
//!
//! Memory is bounded by `threads × window` plus a few jobs in the channel,
//! whatever the image size. Writes go to disjoint ranges, so workers never
//! coordinate beyond the channel and an abort flag.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};

use crate::source::{Extent, ExtentKind, ImageSource, SourceError};
use crate::sys::AlignedBuf;
use crate::target::{Target, TargetError, ZeroMethod};

/// Tuning of the copy.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Worker threads (decompression and writes). 0 means twice the CPUs, at least 4.
    pub threads: usize,
    /// Bytes per window (rounded to the target's alignment and the source's
    /// largest extent).
    pub window: u64,
    /// Granule at which zero data is detected and skipped (rounded up to the
    /// target's alignment).
    pub granule: u64,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            threads: 0,
            window: 8 << 20,
            granule: 64 << 10,
        }
    }
}

/// What the copy did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CopyStats {
    /// Bytes written as data.
    pub bytes_written: u64,
    /// Bytes made to read as zeros without being written byte by byte
    /// (includes zero runs found inside data).
    pub bytes_zeroed: u64,
    /// How zero ranges were produced (the last method that worked).
    pub zero_method: Option<ZeroMethod>,
    /// Worker threads used.
    pub threads: usize,
}

/// Why the copy failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Reading the image failed.
    #[error("reading the image")]
    Source(#[source] SourceError),
    /// Writing the target failed.
    #[error("writing the target")]
    Target(#[source] TargetError),
    /// The extents the source listed are inconsistent.
    #[error("image extents are inconsistent: {0}")]
    Extents(String),
    /// Memory for buffers could not be had.
    #[error("allocating copy buffers")]
    Alloc(#[source] std::io::Error),
    /// A worker thread panicked.
    #[error("a copy worker failed unexpectedly")]
    Worker,
}

/// A piece of one extent that falls inside one window.
#[derive(Debug, Clone, Copy)]
struct Piece {
    extent: Extent,
    /// Bytes of the extent to skip (only for extents that straddle windows).
    skip: u64,
    /// Bytes taken from the extent.
    take: u64,
    /// Offset of the piece in the window.
    at: u64,
}

#[derive(Debug)]
struct Job {
    start: u64,
    /// Bytes of the window to write (aligned; the tail window may be shorter).
    len: u64,
    pieces: Vec<Piece>,
}

impl Job {
    fn all_zero(&self) -> bool {
        self.pieces
            .iter()
            .all(|p| p.extent.kind == ExtentKind::Zero)
    }
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// Copies `source` onto `target` from offset 0. The target must be at least
/// the source's virtual size rounded up to its alignment. `progress` is called
/// with the number of guest bytes done so far.
pub fn copy(
    source: &dyn ImageSource,
    target: &Target,
    opts: &CopyOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<CopyStats, CopyError> {
    let align = target.alignment().max(512);
    let vsize = source.virtual_size();
    let end = round_up(vsize, align).min(target.info().size.max(vsize));
    let window = {
        let w = round_up(opts.window.max(align), align);
        let m = source.max_extent_len().max(1);
        if m.is_power_of_two() && w.is_power_of_two() {
            w.max(m)
        } else {
            w
        }
    };
    let granule = round_up(opts.granule.max(align), align).min(window);
    // Twice the CPUs (at least 4): while some workers wait on their writes, the others
    // keep inflating, so the device always has writes queued.
    let threads = match opts.threads {
        0 => (2 * std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2))
        .max(4),
        n => n,
    }
    .clamp(1, 16);

    let written = AtomicU64::new(0);
    let zeroed = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let abort = AtomicBool::new(false);
    let first_err: Mutex<Option<CopyError>> = Mutex::new(None);
    let zero_method: Mutex<Option<ZeroMethod>> = Mutex::new(None);
    let fail = |e: CopyError| {
        abort.store(true, Ordering::SeqCst);
        if let Ok(mut g) = first_err.lock() {
            g.get_or_insert(e);
        }
    };

    let mut buffers = Vec::with_capacity(threads);
    for _ in 0..threads {
        buffers.push(AlignedBuf::new(window as usize, 4096).map_err(CopyError::Alloc)?);
    }

    let (tx, rx) = mpsc::sync_channel::<Job>(threads * 2);
    let rx = Mutex::new(rx);
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for mut buf in buffers {
            let rx = &rx;
            let ctx = Worker {
                source,
                target,
                granule,
                written: &written,
                zeroed: &zeroed,
                zero_method: &zero_method,
            };
            let (done, abort, fail) = (&done, &abort, &fail);
            handles.push(s.spawn(move || loop {
                let job = match rx.lock() {
                    Ok(r) => match r.recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    },
                    Err(_) => return,
                };
                if abort.load(Ordering::SeqCst) {
                    continue; // drain so the producer never blocks
                }
                match ctx.run(&job, &mut buf) {
                    Ok(()) => {
                        let d = done.fetch_add(job.len, Ordering::Relaxed) + job.len;
                        progress(d.min(vsize));
                    }
                    Err(e) => fail(e),
                }
            }));
        }

        if let Err(e) = produce(source, window, end, &tx, &abort) {
            fail(e);
        }
        drop(tx);
        for h in handles {
            if h.join().is_err() {
                fail(CopyError::Worker);
            }
        }
    });

    if let Some(e) = first_err.into_inner().ok().flatten() {
        return Err(e);
    }
    Ok(CopyStats {
        bytes_written: written.into_inner(),
        bytes_zeroed: zeroed.into_inner(),
        zero_method: zero_method.into_inner().ok().flatten(),
        threads,
    })
}

/// Walks the extents and cuts them into window jobs.
fn produce(
    source: &dyn ImageSource,
    window: u64,
    end: u64,
    tx: &mpsc::SyncSender<Job>,
    abort: &AtomicBool,
) -> Result<(), CopyError> {
    let vsize = source.virtual_size();
    let mut job = Job {
        start: 0,
        len: window.min(end),
        pieces: Vec::new(),
    };
    let mut expect = 0u64;
    let send = |job: Job| -> Result<(), CopyError> { tx.send(job).map_err(|_| CopyError::Worker) };
    for ext in source.extents() {
        if abort.load(Ordering::SeqCst) {
            return Ok(());
        }
        let ext = ext.map_err(CopyError::Source)?;
        if ext.guest_offset != expect || ext.len == 0 {
            return Err(CopyError::Extents(format!(
                "extent at {} (len {}) where {expect} was expected",
                ext.guest_offset, ext.len
            )));
        }
        let ext_end = ext
            .guest_offset
            .checked_add(ext.len)
            .filter(|&e| e <= vsize)
            .ok_or_else(|| {
                CopyError::Extents(format!(
                    "extent at {} runs past the disk end",
                    ext.guest_offset
                ))
            })?;
        expect = ext_end;
        let mut pos = ext.guest_offset;
        while pos < ext_end {
            while pos >= job.start + window {
                let next = job.start + window;
                let full = std::mem::replace(
                    &mut job,
                    Job {
                        start: next,
                        len: window.min(end - next),
                        pieces: Vec::new(),
                    },
                );
                send(full)?;
            }
            let take = (ext_end - pos).min(job.start + window - pos);
            job.pieces.push(Piece {
                extent: ext,
                skip: pos - ext.guest_offset,
                take,
                at: pos - job.start,
            });
            pos += take;
        }
    }
    if expect != vsize {
        return Err(CopyError::Extents(format!(
            "extents end at {expect}, disk is {vsize} bytes"
        )));
    }
    if job.len > 0 {
        send(job)?;
    }
    Ok(())
}

struct Worker<'a> {
    source: &'a dyn ImageSource,
    target: &'a Target,
    granule: u64,
    written: &'a AtomicU64,
    zeroed: &'a AtomicU64,
    zero_method: &'a Mutex<Option<ZeroMethod>>,
}

impl Worker<'_> {
    fn run(&self, job: &Job, buf: &mut AlignedBuf) -> Result<(), CopyError> {
        if job.all_zero() {
            return self.zero(job.start, job.len);
        }
        let win = &mut buf[..job.len as usize];
        win.fill(0);
        let mut scratch: Vec<u8> = Vec::new();
        for p in &job.pieces {
            let dst = &mut win[p.at as usize..(p.at + p.take) as usize];
            match p.extent.kind {
                ExtentKind::Zero => {}
                ExtentKind::Data {
                    compressed_len: None,
                    host_offset,
                } => {
                    let sub = Extent {
                        guest_offset: p.extent.guest_offset + p.skip,
                        len: p.take,
                        kind: ExtentKind::Data {
                            host_offset: host_offset + p.skip,
                            compressed_len: None,
                        },
                    };
                    self.source
                        .read_extent(&sub, dst)
                        .map_err(CopyError::Source)?;
                }
                ExtentKind::Data {
                    compressed_len: Some(_),
                    ..
                } => {
                    if p.skip == 0 && p.take == p.extent.len {
                        self.source
                            .read_extent(&p.extent, dst)
                            .map_err(CopyError::Source)?;
                    } else {
                        scratch.resize(p.extent.len as usize, 0);
                        self.source
                            .read_extent(&p.extent, &mut scratch)
                            .map_err(CopyError::Source)?;
                        dst.copy_from_slice(&scratch[p.skip as usize..(p.skip + p.take) as usize]);
                    }
                }
            }
        }
        // Runs of data granules become one write; runs of zero granules one zeroing call.
        let g = self.granule as usize;
        let mut run_start = 0usize;
        let mut run_zero = is_zero(&win[..g.min(win.len())]);
        let mut i = 0usize;
        while i < win.len() {
            let gend = (i + g).min(win.len());
            let z = is_zero(&win[i..gend]);
            if z != run_zero {
                self.flush_run(job.start, win, run_start, i, run_zero)?;
                run_start = i;
                run_zero = z;
            }
            i = gend;
        }
        self.flush_run(job.start, win, run_start, win.len(), run_zero)
    }

    fn flush_run(
        &self,
        base: u64,
        win: &[u8],
        from: usize,
        to: usize,
        zero: bool,
    ) -> Result<(), CopyError> {
        if from == to {
            return Ok(());
        }
        if zero {
            self.zero(base + from as u64, (to - from) as u64)
        } else {
            self.target
                .write_at(&win[from..to], base + from as u64)
                .map_err(CopyError::Target)?;
            self.written
                .fetch_add((to - from) as u64, Ordering::Relaxed);
            Ok(())
        }
    }

    fn zero(&self, offset: u64, len: u64) -> Result<(), CopyError> {
        let m = self
            .target
            .zero_range(offset, len)
            .map_err(CopyError::Target)?;
        self.zeroed.fetch_add(len, Ordering::Relaxed);
        if let Ok(mut g) = self.zero_method.lock() {
            *g = Some(m);
        }
        Ok(())
    }
}

/// True when every byte is zero; word-at-a-time.
pub(crate) fn is_zero(b: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns, so viewing aligned bytes as
        // u64 words is sound; align_to puts misaligned bytes in head/tail.
        unsafe { b.align_to::<u64>() }
    };
    head.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0) && words.iter().all(|&w| w == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{SourceError, SourceFormat};
    use std::os::unix::fs::FileExt;

    /// A synthetic source: data described by a list of (len, Some(byte) | None).
    #[derive(Debug)]
    struct Fake {
        runs: Vec<(u64, Option<u8>)>,
        compressed: bool,
    }

    impl ImageSource for Fake {
        fn format(&self) -> SourceFormat {
            SourceFormat::Raw
        }
        fn virtual_size(&self) -> u64 {
            self.runs.iter().map(|r| r.0).sum()
        }
        fn extents(&self) -> Box<dyn Iterator<Item = Result<Extent, SourceError>> + Send + '_> {
            let mut off = 0;
            let v: Vec<_> = self
                .runs
                .iter()
                .map(|&(len, b)| {
                    let e = Extent {
                        guest_offset: off,
                        len,
                        kind: match b {
                            None => ExtentKind::Zero,
                            Some(b) => ExtentKind::Data {
                                host_offset: u64::from(b) << 40 | off,
                                compressed_len: self.compressed.then_some(len),
                            },
                        },
                    };
                    off += len;
                    Ok(e)
                })
                .collect();
            Box::new(v.into_iter())
        }
        fn max_extent_len(&self) -> u64 {
            self.runs.iter().map(|r| r.0).max().unwrap_or(512)
        }
        fn read_extent(&self, e: &Extent, buf: &mut [u8]) -> Result<(), SourceError> {
            let ExtentKind::Data { host_offset, .. } = e.kind else {
                panic!("zero read")
            };
            assert_eq!(buf.len() as u64, e.len);
            buf.fill((host_offset >> 40) as u8);
            Ok(())
        }
    }

    fn expected(f: &Fake) -> Vec<u8> {
        let mut v = Vec::new();
        for &(len, b) in &f.runs {
            v.extend(std::iter::repeat_n(b.unwrap_or(0), len as usize));
        }
        v
    }

    fn run(f: &Fake, opts: &CopyOptions) -> (Vec<u8>, CopyStats) {
        let size = f.virtual_size();
        let file = tempfile::NamedTempFile::new().unwrap();
        // Old data everywhere: zero extents must come back as zeros.
        file.as_file()
            .write_all_at(&vec![0xEE; size as usize], 0)
            .unwrap();
        let t = Target::open(file.path()).unwrap();
        let st = copy(f, &t, opts, &|_| {}).unwrap();
        t.sync().unwrap();
        let out = std::fs::read(file.path()).unwrap();
        assert_eq!(out.len() as u64, size);
        (out, st)
    }

    #[test]
    fn zero_extents_overwrite_old_data_and_data_lands_exactly() {
        let f = Fake {
            runs: vec![
                (512, Some(1)),
                (1536, None),
                (65536 * 3, Some(2)),
                (1 << 20, None),
                (4096, Some(3)),
            ],
            compressed: false,
        };
        let opts = CopyOptions {
            threads: 3,
            window: 128 << 10,
            granule: 4096,
        };
        let (out, st) = run(&f, &opts);
        assert_eq!(out, expected(&f));
        // The 1 MiB zero run is not granule-aligned: all but its edge granules are skipped.
        assert!(st.bytes_zeroed >= (1 << 20) - 2 * 4096, "{st:?}");
        assert!(st.bytes_written < f.virtual_size(), "{st:?}");
    }

    #[test]
    fn compressed_extents_straddling_windows_are_split() {
        // 96 KiB "clusters" against a 64 KiB window force straddling.
        let f = Fake {
            runs: vec![
                (98304, Some(7)),
                (98304, Some(8)),
                (98304, None),
                (98304, Some(9)),
            ],
            compressed: true,
        };
        let opts = CopyOptions {
            threads: 2,
            window: 65536,
            granule: 4096,
        };
        let (out, _) = run(&f, &opts);
        assert_eq!(out, expected(&f));
    }

    #[test]
    fn data_that_is_zero_is_not_written() {
        let f = Fake {
            runs: vec![(1 << 20, Some(0)), (4096, Some(1))],
            compressed: false,
        };
        let (out, st) = run(&f, &CopyOptions::default());
        assert_eq!(out, expected(&f));
        // Only the 4 KiB tail holds data; the zero megabyte before it is not written.
        assert_eq!(st.bytes_written, 4096, "{st:?}");
        assert_eq!(st.bytes_zeroed, 1 << 20, "{st:?}");
    }

    #[test]
    fn gaps_in_extents_are_refused() {
        #[derive(Debug)]
        struct Gappy;
        impl ImageSource for Gappy {
            fn format(&self) -> SourceFormat {
                SourceFormat::Raw
            }
            fn virtual_size(&self) -> u64 {
                8192
            }
            fn extents(&self) -> Box<dyn Iterator<Item = Result<Extent, SourceError>> + Send + '_> {
                Box::new(
                    vec![Ok(Extent {
                        guest_offset: 4096,
                        len: 4096,
                        kind: ExtentKind::Zero,
                    })]
                    .into_iter(),
                )
            }
            fn max_extent_len(&self) -> u64 {
                4096
            }
            fn read_extent(&self, _: &Extent, _: &mut [u8]) -> Result<(), SourceError> {
                Ok(())
            }
        }
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(8192).unwrap();
        let t = Target::open(file.path()).unwrap();
        let e = copy(&Gappy, &t, &CopyOptions::default(), &|_| {}).unwrap_err();
        assert!(matches!(e, CopyError::Extents(_)), "{e}");
    }

    #[test]
    fn is_zero_checks_every_byte() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        for i in [0, 1, 8, 4095, 4098] {
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
            v[i] = 0;
        }
    }
}
