//! Format detection and the Incus tarball reader on arbitrary bytes (plain or
//! compressed tar holding rootfs.img): never panic, and refuse unsafe entries.
//! A compressed input may extract a rootfs.img into the system temporary directory
//! (an unlinked file, gone when the source is dropped).
#![no_main]

use std::sync::Arc;

use image_unpack::source::{open_reader, ExtentKind, MemReader, OpenOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let reader = Arc::new(MemReader::new(data.to_vec()));
    let Ok(src) = open_reader(reader, &OpenOptions::default()) else {
        return;
    };
    let _ = src.format();
    let mut buf = vec![0u8; src.max_extent_len() as usize];
    for extent in src.extents().take(4096).flatten() {
        if let ExtentKind::Data { .. } = extent.kind {
            let _ = src.read_extent(&extent, &mut buf[..extent.len as usize]);
        }
    }
});
