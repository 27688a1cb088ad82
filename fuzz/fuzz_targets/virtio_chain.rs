//! A virtqueue request from arbitrary guest memory: descriptor table (direct, indirect,
//! looped, out of range), header, data buffers and status, run against a 4096-sector
//! volume. Must never panic nor answer outside the chain or guest memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vhost_blk::fuzzing::virtio_chain(data);
});
