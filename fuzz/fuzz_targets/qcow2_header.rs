//! The qcow2 parser on arbitrary bytes: header validation, L1/L2 walk and
//! compressed-cluster decoding must never panic, hang or allocate without bound.
#![no_main]

use std::sync::Arc;

use image_unpack::source::{ExtentKind, ImageSource, MemReader, Qcow2Header, Qcow2Source};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Qcow2Header::parse(data, data.len() as u64);
    let Ok(src) = Qcow2Source::open(Arc::new(MemReader::new(data.to_vec()))) else {
        return;
    };
    let mut buf = vec![0u8; src.max_extent_len() as usize];
    for extent in src.extents().take(4096).flatten() {
        if let ExtentKind::Data { .. } = extent.kind {
            let _ = src.read_extent(&extent, &mut buf[..extent.len as usize]);
        }
    }
});
