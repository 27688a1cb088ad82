//! Carrying out a repair plan: the [`PlannedWrite`]s in their planned
//! order (backup, then primary, then MBR, then wipes), then a flush. The
//! only place repair writes to the device.

use std::io::{Seek, SeekFrom, Write};

use crate::partition::Error;

use super::plan::PlannedWrite;

/// Writes `writes` to `dev` in order and flushes it. A failure leaves the
/// repair partial (see [`Error::Write`]); the order keeps at least one
/// consistent GPT copy on the device at every step.
pub(super) fn apply<D: Write + Seek>(dev: &mut D, writes: &[PlannedWrite]) -> Result<(), Error> {
    debug_assert!(
        writes.windows(2).all(|w| w[0].kind <= w[1].kind),
        "repair writes out of order: {:?}",
        writes.iter().map(|w| w.kind).collect::<Vec<_>>()
    );
    for w in writes {
        dev.seek(SeekFrom::Start(w.offset))
            .and_then(|_| dev.write_all(&w.bytes))
            .map_err(|source| Error::Write {
                offset: w.offset,
                len: w.bytes.len(),
                source,
            })?;
    }
    dev.flush().map_err(Error::Flush)
}
