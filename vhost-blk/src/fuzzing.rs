//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`): untrusted guest bytes
//! fed to the same code the queues run.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::chain::RawChain;
use crate::device::{Device, SERIAL_LEN};
use crate::request::{process_chain, Taken};
use crate::volume::{Volume, VolumeParams, SECTOR_SIZE};

/// Guest memory of a fuzz input.
const MEM: usize = 64 * 1024;

fn device() -> Arc<Device> {
    static DEV: OnceLock<Arc<Device>> = OnceLock::new();
    DEV.get_or_init(|| {
        // A 1 MiB file treated as a 4096-byte-sector device (read-modify-write included),
        // unlinked once open.
        let path: PathBuf =
            std::env::temp_dir().join(format!("vhost-blk-fuzz-{}", std::process::id()));
        let f = std::fs::File::create(&path).expect("fuzz volume");
        f.set_len(1 << 20).expect("fuzz volume size");
        let params = VolumeParams {
            read_only: false,
            direct: false,
            min_block_size: 4096,
            max_iovecs: 16,
            op_timeout: None,
        };
        let vol = Volume::open(&path, &params).expect("open fuzz volume");
        let _ = std::fs::remove_file(&path);
        let capacity = vol.size() / SECTOR_SIZE;
        Arc::new(Device::new(vol, path, params, capacity, [b'f'; SERIAL_LEN]))
    })
    .clone()
}

/// One request from arbitrary bytes: `data[0..2]` the head index, `data[2]` the queue
/// size (as a power of two), the rest the guest memory from address 0, where the
/// descriptor table starts. Reading the chain and running it must not panic, and what
/// the request reports must stay inside the chain and guest memory.
pub fn virtio_chain(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let head = u16::from_le_bytes([data[0], data[1]]);
    let qsize = 1u16 << (data[2] % 9);
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    let body = &data[3..data.len().min(MEM + 3)];
    if mem.write_slice(body, GuestAddress(0)).is_err() {
        return;
    }
    let chain = RawChain::from_table(&mem, 0, qsize, head);
    let writable: u64 = chain
        .segs
        .iter()
        .flatten()
        .filter(|s| s.writable)
        .map(|s| s.len)
        .sum();
    let c = process_chain(&device(), &mem, chain, Taken::now(1));
    assert_eq!(c.head, head);
    match c.status {
        Some((addr, _)) => {
            assert!(mem.address_in_range(addr), "status outside guest memory");
            assert!(
                u64::from(c.used_len) <= writable,
                "used length past the chain"
            );
        }
        None => assert_eq!(c.used_len, 0),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn short_and_empty_inputs_are_fine() {
        super::virtio_chain(&[]);
        super::virtio_chain(&[0, 0, 4]);
        super::virtio_chain(&[0; 64]);
    }

    /// Every committed input of the fuzz target (`fuzz/corpus/virtio_chain/` and
    /// `fuzz/regressions/virtio_chain/`) runs again here, on the stable toolchain.
    #[test]
    fn virtio_chain_corpus_replays() {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut files = Vec::new();
        for dir in ["corpus", "regressions"] {
            if let Ok(rd) = std::fs::read_dir(fuzz.join(dir).join("virtio_chain")) {
                files.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_file()));
            }
        }
        files.sort();
        assert!(!files.is_empty(), "no committed virtio_chain inputs");
        for f in &files {
            let data = std::fs::read(f).expect("read corpus input");
            let r = std::panic::catch_unwind(|| super::virtio_chain(&data));
            assert!(r.is_ok(), "virtio_chain panicked on {}", f.display());
        }
    }
}
