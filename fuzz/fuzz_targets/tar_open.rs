//! Format detection and the Incus tarball reader on arbitrary bytes
//! (`image_unpack::fuzzing::tar_open`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    image_unpack::fuzzing::tar_open(data);
});
