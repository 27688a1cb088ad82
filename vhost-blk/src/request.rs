//! virtio-blk request parsing, validation and execution.
//!
//! Validation follows the order of the virtio spec (5.2.6): the chain must end, the last byte
//! must be a device-writable status byte, the 16-byte header must be device-readable, every
//! buffer must lie in guest memory, and then the type decides the data direction, length and
//! range. [`process_chain`] is the one completion site: it writes the status byte and records
//! metrics; the caller adds the used element with the length it returns.

use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use zerocopy::FromBytes;

use crate::chain::{RawChain, Seg, Segs};
use crate::device::Device;
use crate::metrics::{Failure, Kind};
use crate::volume::{Volume, VolumeError, SECTOR_SIZE};
use crate::wire::{
    DwzSegment, RequestHeader, DWZ_SEG_LEN, HEADER_LEN, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

/// Most discard / write-zeroes segments accepted in one request.
pub const MAX_DWZ_SEGS: u32 = 256;

/// A request type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read.
    In,
    /// Write.
    Out,
    /// Flush.
    Flush,
    /// Device id (serial).
    GetId,
    /// Discard.
    Discard,
    /// Write zeroes.
    WriteZeroes,
    /// Any other type.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            t => RequestType::Unsupported(t),
        }
    }
}

impl RequestType {
    fn kind(self) -> Kind {
        match self {
            RequestType::In => Kind::Read,
            RequestType::Out => Kind::Write,
            RequestType::Flush => Kind::Flush,
            RequestType::GetId => Kind::GetId,
            RequestType::Discard => Kind::Discard,
            RequestType::WriteZeroes => Kind::WriteZeroes,
            RequestType::Unsupported(_) => Kind::Unsupported,
        }
    }
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain was empty, looped, nested indirect tables or pointed outside the queue.
    #[error("descriptor chain is broken or does not end")]
    BrokenChain,
    /// The last descriptor is not a device-writable buffer of at least one byte.
    #[error("descriptor chain has no device-writable status byte")]
    NoStatus,
    /// Fewer than 16 device-readable bytes precede the data.
    #[error("request header is missing or not device-readable")]
    BadHeader,
    /// A buffer lies outside guest memory.
    #[error("buffer at guest address {0:#x} lies outside guest memory")]
    BadAddress(u64),
    /// A data buffer has the wrong direction for the request type.
    #[error("data buffer direction does not match request type {0:?}")]
    WrongDirection(RequestType),
    /// The data length is not a multiple of the sector or segment size.
    #[error("data length {len} is invalid for request type {kind:?}")]
    BadLength {
        /// Request type.
        kind: RequestType,
        /// Data length in bytes.
        len: u64,
    },
    /// The sectors lie (partly) past the end of the volume, or the offset overflows.
    #[error("sectors {sector}+{count} lie past the end of the volume ({capacity} sectors)")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        count: u64,
        /// Volume capacity in sectors.
        capacity: u64,
    },
    /// Write-type request on a read-only export.
    #[error("request type {0:?} refused: the export is read-only")]
    ReadOnly(RequestType),
    /// Unknown request type.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// Unknown flags in a discard / write-zeroes segment.
    #[error("unsupported discard/write-zeroes flags {0:#x}")]
    UnsupportedFlags(u32),
    /// The volume failed the operation.
    #[error("volume operation failed")]
    Volume(#[source] VolumeError),
    /// The volume was removed (hot-remove); the request was not sent to it.
    #[error("the volume was removed")]
    Removed,
}

impl RequestError {
    /// The status byte this error is answered with.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::UnsupportedFlags(_) => STATUS_UNSUPP,
            _ => STATUS_IOERR,
        }
    }

    fn failure(&self) -> Failure {
        match self {
            RequestError::Unsupported(_) | RequestError::UnsupportedFlags(_) => {
                Failure::Unsupported
            }
            RequestError::ReadOnly(_) => Failure::ReadOnly,
            RequestError::Volume(_) => Failure::Io,
            RequestError::Removed => Failure::Removed,
            _ => Failure::Malformed,
        }
    }
}

/// Guest buffers of a request: typical ones (one data buffer, or a few) need no allocation.
pub(crate) type Slices<'m> = smallvec::SmallVec<[VolatileSlice<'m, ()>; 4]>;

/// A validated request.
struct Request<'m> {
    kind: RequestType,
    sector: u64,
    data: Slices<'m>,
    data_len: u64,
}

fn slices_of<'m>(mem: &'m GuestMemoryMmap<()>, segs: &[Seg]) -> Result<Slices<'m>, RequestError> {
    let mut out = Slices::with_capacity(segs.len());
    for s in segs.iter().filter(|s| s.len > 0) {
        let len = usize::try_from(s.len).map_err(|_| RequestError::BadAddress(s.addr))?;
        if s.addr.checked_add(s.len).is_none() {
            return Err(RequestError::BadAddress(s.addr));
        }
        for slice in GuestMemoryBackend::get_slices(mem, GuestAddress(s.addr), len) {
            out.push(slice.map_err(|_| RequestError::BadAddress(s.addr))?);
        }
    }
    Ok(out)
}

/// Splits the header off the front of `segs`.
fn take_header(mem: &GuestMemoryMmap<()>, segs: &mut Segs) -> Result<RequestHeader, RequestError> {
    let mut hdr = [0u8; HEADER_LEN];
    let mut got = 0usize;
    let mut consumed = 0usize;
    for s in segs.iter_mut() {
        if got == HEADER_LEN {
            break;
        }
        if s.writable {
            return Err(RequestError::BadHeader);
        }
        let n = (HEADER_LEN - got).min(usize::try_from(s.len).unwrap_or(usize::MAX));
        mem.read_slice(&mut hdr[got..got + n], GuestAddress(s.addr))
            .map_err(|_| RequestError::BadAddress(s.addr))?;
        got += n;
        s.addr = s.addr.wrapping_add(n as u64);
        s.len -= n as u64;
        if s.len == 0 {
            consumed += 1;
        }
    }
    if got < HEADER_LEN {
        return Err(RequestError::BadHeader);
    }
    segs.drain(..consumed);
    RequestHeader::read_from_bytes(&hdr).map_err(|_| RequestError::BadHeader)
}

fn parse<'m>(
    dev: &Device,
    mem: &'m GuestMemoryMmap<()>,
    mut segs: Segs,
) -> Result<Request<'m>, RequestError> {
    let hdr = take_header(mem, &mut segs)?;
    let sector = hdr.sector.get();
    let t = hdr.request_type.get();
    let kind = RequestType::from(t);
    let data_len: u64 = segs.iter().map(|s| s.len).sum();
    let all = |w: bool| segs.iter().all(|s| s.writable == w || s.len == 0);
    match kind {
        RequestType::In | RequestType::Out => {
            if !all(kind == RequestType::In) {
                return Err(RequestError::WrongDirection(kind));
            }
            if data_len % SECTOR_SIZE != 0 {
                return Err(RequestError::BadLength {
                    kind,
                    len: data_len,
                });
            }
            check_range(dev, sector, data_len / SECTOR_SIZE)?;
        }
        RequestType::GetId => {
            if !all(true) {
                return Err(RequestError::WrongDirection(kind));
            }
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            if !all(false) {
                return Err(RequestError::WrongDirection(kind));
            }
            if data_len == 0
                || data_len % DWZ_SEG_LEN as u64 != 0
                || data_len / DWZ_SEG_LEN as u64 > u64::from(MAX_DWZ_SEGS)
            {
                return Err(RequestError::BadLength {
                    kind,
                    len: data_len,
                });
            }
        }
        RequestType::Flush => {}
        RequestType::Unsupported(t) => return Err(RequestError::Unsupported(t)),
    }
    if dev.is_read_only()
        && matches!(
            kind,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
        )
    {
        return Err(RequestError::ReadOnly(kind));
    }
    let data = slices_of(mem, &segs)?;
    if dev.is_removed() && kind != RequestType::GetId {
        return Err(RequestError::Removed);
    }
    Ok(Request {
        kind,
        sector,
        data,
        data_len,
    })
}

fn check_range(dev: &Device, sector: u64, count: u64) -> Result<(u64, u64), RequestError> {
    let capacity = dev.capacity();
    let err = RequestError::OutOfRange {
        sector,
        count,
        capacity,
    };
    match sector.checked_add(count) {
        Some(end) if end <= capacity => Ok((sector * SECTOR_SIZE, count * SECTOR_SIZE)),
        _ => Err(err),
    }
}

/// Runs a validated request; returns the number of bytes written into guest data buffers.
fn execute(dev: &Device, req: &Request<'_>) -> Result<u64, RequestError> {
    let volume = dev.volume();
    let r = execute_on(dev, &volume, req);
    if let Err(RequestError::Volume(e)) = &r {
        dev.note_io_error(&volume, e);
    }
    r
}

fn execute_on(dev: &Device, volume: &Volume, req: &Request<'_>) -> Result<u64, RequestError> {
    let offset = req
        .sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(RequestError::OutOfRange {
            sector: req.sector,
            count: 0,
            capacity: dev.capacity(),
        })?;
    match req.kind {
        RequestType::In => {
            volume
                .read(offset, &req.data)
                .map_err(RequestError::Volume)?;
            Ok(req.data_len)
        }
        RequestType::Out => {
            volume
                .write(offset, &req.data)
                .map_err(RequestError::Volume)?;
            if !dev.wce.load(std::sync::atomic::Ordering::Relaxed) {
                volume.flush().map_err(RequestError::Volume)?;
            }
            Ok(0)
        }
        RequestType::Flush => {
            volume.flush().map_err(RequestError::Volume)?;
            Ok(0)
        }
        RequestType::GetId => {
            let mut left: &[u8] = &dev.serial;
            let mut written = 0u64;
            for s in &req.data {
                if left.is_empty() {
                    break;
                }
                let n = s.len().min(left.len());
                let sub = s.subslice(0, n).map_err(|_| RequestError::BadHeader)?;
                sub.copy_from(&left[..n]);
                left = &left[n..];
                written += n as u64;
            }
            Ok(written)
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            let mut raw = vec![0u8; usize::try_from(req.data_len).unwrap_or(0)];
            let mut pos = 0usize;
            for s in &req.data {
                s.copy_to(&mut raw[pos..pos + s.len()]);
                pos += s.len();
            }
            // Validate every segment before touching the volume.
            let mut ranges = Vec::new();
            for seg in raw.chunks_exact(DWZ_SEG_LEN) {
                let seg =
                    DwzSegment::read_from_bytes(seg).map_err(|_| RequestError::BadLength {
                        kind: req.kind,
                        len: req.data_len,
                    })?;
                let (sector, count, flags) = (
                    seg.sector.get(),
                    u64::from(seg.num_sectors.get()),
                    seg.flags.get(),
                );
                let allowed = if req.kind == RequestType::WriteZeroes {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                } else {
                    0
                };
                if flags & !allowed != 0 {
                    return Err(RequestError::UnsupportedFlags(flags));
                }
                let (off, len) = check_range(dev, sector, count)?;
                ranges.push((off, len, flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0));
            }
            for (off, len, unmap) in ranges {
                if req.kind == RequestType::Discard {
                    volume.discard(off, len)
                } else {
                    volume.write_zeroes(off, len, unmap)
                }
                .map_err(RequestError::Volume)?;
            }
            Ok(0)
        }
        RequestType::Unsupported(t) => Err(RequestError::Unsupported(t)),
    }
}

/// Outcome of one descriptor chain, to be written to the guest by the queue's completion
/// site (which writes the status byte and the used element, unless the request was
/// answered already: see `queue.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Completion {
    /// Head descriptor index, for the used ring.
    pub head: u16,
    /// The request's ticket: which of the requests with this head it is.
    pub seq: u64,
    /// Bytes written into device-writable buffers, status byte included (the used length).
    pub used_len: u32,
    /// Where the status byte goes and its value, if the chain had a status byte.
    pub status: Option<(GuestAddress, u8)>,
}

/// A request as taken from the avail ring: its ticket's sequence number, and when it was
/// taken (its latency counts from there; one clock read serves a whole batch).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Taken {
    pub seq: u64,
    pub at: Instant,
}

#[cfg(any(test, feature = "fuzzing"))]
impl Taken {
    /// Ticket `seq`, taken now.
    pub(crate) fn now(seq: u64) -> Taken {
        Taken {
            seq,
            at: Instant::now(),
        }
    }
}

/// Where a validated chain is answered: its head, ticket, status byte and start time.
#[derive(Debug)]
pub(crate) struct Answer {
    head: u16,
    seq: u64,
    status_addr: GuestAddress,
    start: Instant,
}

/// The request type an error is counted under.
fn error_kind(e: &RequestError) -> Option<RequestType> {
    match e {
        RequestError::Unsupported(t) => Some(RequestType::Unsupported(*t)),
        RequestError::ReadOnly(k)
        | RequestError::WrongDirection(k)
        | RequestError::BadLength { kind: k, .. } => Some(*k),
        _ => None,
    }
}

/// Validates a chain. `Err`: the chain has no usable status byte and is answered with
/// used length 0 and no status.
#[allow(clippy::type_complexity)]
fn open<'m>(
    dev: &Device,
    mem: &'m GuestMemoryMmap<()>,
    chain: RawChain,
    taken: Taken,
) -> Result<(Answer, Result<Request<'m>, RequestError>), Completion> {
    let Taken { seq, at: start } = taken;
    let head = chain.head;
    let unanswerable = || {
        dev.metrics
            .record(None, Some(Failure::Malformed), 0, start.elapsed());
        Completion {
            head,
            seq,
            used_len: 0,
            status: None,
        }
    };
    let Some(mut segs) = chain.segs else {
        tracing::debug!(head, "broken descriptor chain");
        return Err(unanswerable());
    };
    let Some(status_addr) = split_status(mem, &mut segs) else {
        tracing::debug!(head, "request without a usable status byte");
        return Err(unanswerable());
    };
    let answer = Answer {
        head,
        seq,
        status_addr,
        start,
    };
    Ok((answer, parse(dev, mem, segs)))
}

/// Takes the status byte off the chain: the last byte of the last buffer, which must be
/// device-writable and inside guest memory.
fn split_status(mem: &GuestMemoryMmap<()>, segs: &mut [Seg]) -> Option<GuestAddress> {
    let addr = match segs.last_mut() {
        Some(s) if s.writable && s.len >= 1 => {
            s.len -= 1;
            s.addr.checked_add(s.len)
        }
        _ => None,
    };
    addr.map(GuestAddress).filter(|&a| mem.address_in_range(a))
}

/// The status byte of a chain, if it has one (for answering it without running it).
pub(crate) fn status_address(mem: &GuestMemoryMmap<()>, chain: RawChain) -> Option<GuestAddress> {
    let mut segs = chain.segs?;
    split_status(mem, &mut segs)
}

/// Records the metrics and returns what to write to the guest: the single place every
/// answerable request ends. `result`: (bytes written into guest data buffers, data
/// length) on success.
fn finish(
    dev: &Device,
    answer: Answer,
    kind: Option<RequestType>,
    result: Result<(u64, u64), RequestError>,
) -> Completion {
    let head = answer.head;
    let (status, written, failure, bytes) = match result {
        Ok((written, data_len)) => (STATUS_OK, written, None, data_len),
        Err(e) => {
            tracing::debug!(head, error = %e, "request failed");
            (e.status(), 0, Some(e.failure()), 0)
        }
    };
    dev.metrics.record(
        kind.map(RequestType::kind),
        failure,
        bytes,
        answer.start.elapsed(),
    );
    Completion {
        head,
        seq: answer.seq,
        used_len: u32::try_from(written.saturating_add(1)).unwrap_or(u32::MAX),
        status: Some((answer.status_addr, status)),
    }
}

/// Parses, validates and executes one chain.
pub(crate) fn process_chain(
    dev: &Device,
    mem: &GuestMemoryMmap<()>,
    chain: RawChain,
    taken: Taken,
) -> Completion {
    let (answer, parsed) = match open(dev, mem, chain, taken) {
        Ok(x) => x,
        Err(done) => return done,
    };
    let (kind, result) = match parsed {
        Ok(req) => {
            let r = execute(dev, &req);
            (Some(req.kind), r.map(|w| (w, req.data_len)))
        }
        Err(e) => (error_kind(&e), Err(e)),
    };
    finish(dev, answer, kind, result)
}

/// A validated read or write whose data transfer the caller runs (asynchronously), then
/// completes with [`finish_io`].
#[derive(Debug)]
pub(crate) struct Pending {
    answer: Answer,
    /// Write (OUT) rather than read (IN).
    pub write: bool,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Data length in bytes.
    pub len: u64,
}

/// What [`begin`] did with a chain.
pub(crate) enum Begun<'m, T> {
    /// Refused: answer with this.
    Done(Completion),
    /// A validated read or write the caller accepted: transfer `slices`, then [`finish_io`].
    Io(Pending, Slices<'m>, T),
    /// Valid, but not a read or write the caller accepted: nothing was done, the caller
    /// serves the chain with [`process_chain`].
    Declined,
}

/// Validates a chain for asynchronous execution. Reads and writes (writes only with the
/// write cache enabled) are offered to `accept` (type is write, byte offset, guest
/// buffers), which returns `Some` to take over the data transfer. Invalid chains are
/// answered here, anything else is declined.
pub(crate) fn begin<'m, T>(
    dev: &Device,
    mem: &'m GuestMemoryMmap<()>,
    chain: RawChain,
    taken: Taken,
    accept: impl FnOnce(bool, u64, &[VolatileSlice<'m, ()>]) -> Option<T>,
) -> Begun<'m, T> {
    let (answer, parsed) = match open(dev, mem, chain, taken) {
        Ok(x) => x,
        Err(done) => return Begun::Done(done),
    };
    let req = match parsed {
        Ok(req) => req,
        Err(e) => return Begun::Done(finish(dev, answer, error_kind(&e), Err(e))),
    };
    let write = match req.kind {
        RequestType::In => false,
        RequestType::Out if dev.wce.load(std::sync::atomic::Ordering::Relaxed) => true,
        _ => return Begun::Declined,
    };
    // parse() checked `sector + count <= capacity`, so the offset cannot overflow.
    let Some(offset) = req.sector.checked_mul(SECTOR_SIZE) else {
        return Begun::Declined;
    };
    match accept(write, offset, &req.data) {
        Some(t) => Begun::Io(
            Pending {
                answer,
                write,
                offset,
                len: req.data_len,
            },
            req.data,
            t,
        ),
        None => Begun::Declined,
    }
}

/// Completes a read or write taken with [`begin`], once its transfer ended.
pub(crate) fn finish_io(dev: &Device, p: Pending, result: Result<(), VolumeError>) -> Completion {
    let kind = if p.write {
        RequestType::Out
    } else {
        RequestType::In
    };
    let written = if p.write { 0 } else { p.len };
    let result = result
        .map(|()| (written, p.len))
        .map_err(RequestError::Volume);
    finish(dev, p.answer, Some(kind), result)
}
