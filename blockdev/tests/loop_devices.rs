//! The probes on real loop devices with 512- and 4096-byte sectors (root).

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;

use loop_bridge::testing::TempLoop;

const SIZE: u64 = 8 << 20;

fn probes_match(logical: u32) {
    let dev = TempLoop::new(SIZE, logical);
    let f = std::fs::File::open(dev.path()).unwrap();
    assert_eq!(blockdev::size(&f).unwrap(), SIZE);
    assert_eq!(blockdev::logical_block_size(&f).unwrap(), logical);
    assert!(blockdev::physical_block_size(&f).unwrap() >= logical);
    let (min, _opt) = blockdev::io_sizes(&f).unwrap();
    assert!(
        min >= logical,
        "BLKIOMIN {min} below the sector size {logical}"
    );
}

#[test]
fn sizes_of_a_512_byte_sector_device() {
    probes_match(512);
}

#[test]
fn sizes_of_a_4096_byte_sector_device() {
    probes_match(4096);
}

#[test]
fn zero_out_zeroes_exactly_the_range_and_flush_shows_it() {
    let dev = TempLoop::new(SIZE, 4096);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_SYNC)
        .open(dev.path())
        .unwrap();
    f.write_all(&vec![0xa5u8; 3 * 4096]).unwrap();
    f.sync_all().unwrap();
    blockdev::zero_out(&f, 4096, 4096).unwrap();
    blockdev::flush_buffers(&f).unwrap();
    let mut back = vec![0u8; 3 * 4096];
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_exact(&mut back).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0xa5));
    assert!(back[4096..8192].iter().all(|&b| b == 0));
    assert!(back[8192..].iter().all(|&b| b == 0xa5));
    // A range that is not whole sectors is refused, not rounded.
    let e = blockdev::zero_out(&f, 512, 512).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
}
