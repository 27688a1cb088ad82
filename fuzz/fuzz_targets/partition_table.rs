//! GPT and MBR parsing on arbitrary bytes, at both sector sizes: detection, inspection
//! and (on a copy) repair must never panic, and repair must never grow the device.
#![no_main]

use std::io::Cursor;

use image_unpack::partition::{detect_table_sector_size, inspect, repair, RepairOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let size = data.len() as u64;
    let _ = detect_table_sector_size(&mut Cursor::new(data), size);
    for ss in [512u32, 4096] {
        let _ = inspect(&mut Cursor::new(data), ss, size);
        let mut dev = Cursor::new(data.to_vec());
        let _ = repair(&mut dev, ss, size, &RepairOptions::default());
        assert_eq!(dev.get_ref().len(), data.len(), "repair changed the device size");
    }
});
