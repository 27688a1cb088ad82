//! GPT and MBR parsing on arbitrary bytes at both sector sizes
//! (`image_unpack::fuzzing::partition_table`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    image_unpack::fuzzing::partition_table(data);
});
