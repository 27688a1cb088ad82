//! The qcow2 parser on arbitrary bytes (`image_unpack::fuzzing::qcow2`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    image_unpack::fuzzing::qcow2(data);
});
