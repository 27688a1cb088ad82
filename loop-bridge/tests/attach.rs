//! Attaching and detaching real loop devices. Needs root.

mod common;

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Barrier};

use loop_bridge::{logical_block_size, AttachOptions, Error, LoopDevice};

const MIB: u64 = 1 << 20;

fn opts(bs: u32) -> AttachOptions {
    AttachOptions {
        logical_block_size: bs,
        ..AttachOptions::default()
    }
}

#[test]
fn attach_4096_over_sparse_file_reports_4096_sectors_and_full_size() {
    let _lock = common::lock();
    let dir = tempfile::tempdir().unwrap();
    let file = common::sparse_file(dir.path(), "vol.img", 64 * MIB);
    let dev = LoopDevice::attach(&file, &opts(4096)).unwrap();
    assert_eq!(dev.logical_block_size(), 4096);
    assert_eq!(dev.size(), 64 * MIB);
    let f = OpenOptions::new().read(true).open(dev.path()).unwrap();
    assert_eq!(logical_block_size(&f).unwrap(), 4096);
    drop(f);
    let status = common::status(dev.number()).expect("device is bound");
    assert_eq!(status.logical_block_size, 4096);
    assert_eq!(status.backing_file.as_deref(), Some(file.as_path()));
    assert_eq!(
        status.label,
        file.to_str().unwrap(),
        "default label is the backing path"
    );
    assert!(status.autoclear && !status.read_only);
    dev.detach().unwrap();
    assert!(common::loops_over(&file).is_empty());
}

#[test]
fn bridge_512_over_4k_loop_writes_land_at_the_same_byte_offset() {
    let _lock = common::lock();
    let dir = tempfile::tempdir().unwrap();
    let file = common::sparse_file(dir.path(), "nvme.img", 32 * MIB);
    let nvme = LoopDevice::attach(&file, &opts(4096)).unwrap();
    let bridge = LoopDevice::attach(nvme.path(), &opts(512)).unwrap();
    assert_eq!(bridge.logical_block_size(), 512);
    assert_eq!(bridge.size(), 32 * MIB);
    let mut dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(bridge.path())
        .unwrap();
    assert_eq!(logical_block_size(&dev).unwrap(), 512);
    let sector: Vec<u8> = (0..512u32).map(|i| (i % 251) as u8 + 1).collect();
    dev.seek(SeekFrom::Start(512)).unwrap();
    dev.write_all(&sector).unwrap();
    dev.sync_all().unwrap();
    drop(dev);
    bridge.detach().unwrap();
    nvme.detach().unwrap();
    let mut got = vec![0u8; 1024];
    std::fs::File::open(&file)
        .unwrap()
        .read_exact(&mut got)
        .unwrap();
    assert_eq!(&got[..512], &[0u8; 512][..], "LBA 0 untouched");
    assert_eq!(
        &got[512..],
        &sector[..],
        "512-byte LBA 1 is byte 512 of the volume"
    );
}

#[test]
fn read_only_device_refuses_writes() {
    let _lock = common::lock();
    let dir = tempfile::tempdir().unwrap();
    let file = common::sparse_file(dir.path(), "ro.img", 8 * MIB);
    let dev = LoopDevice::attach(
        &file,
        &AttachOptions {
            read_only: true,
            ..opts(4096)
        },
    )
    .unwrap();
    assert!(common::status(dev.number()).unwrap().read_only);
    // Linux lets root open a read-only block device for writing; the writes themselves fail.
    if let Ok(f) = OpenOptions::new().write(true).open(dev.path()) {
        let res = f.write_all_at(&[0xAA; 4096], 0).and_then(|()| f.sync_all());
        assert!(
            res.is_err(),
            "write through a read-only loop device succeeded"
        );
    }
    let mut got = vec![1u8; 4096];
    std::fs::File::open(&file)
        .unwrap()
        .read_exact(&mut got)
        .unwrap();
    assert!(got.iter().all(|&b| b == 0), "backing changed");
    dev.detach().unwrap();
}

#[test]
fn direct_io_is_on_when_sector_size_matches_the_backing() {
    let _lock = common::lock();
    let dir = tempfile::tempdir().unwrap();
    let file = common::sparse_file(dir.path(), "dio-ok.img", 8 * MIB);
    let dev = LoopDevice::attach(
        &file,
        &AttachOptions {
            direct_io: true,
            ..opts(4096)
        },
    )
    .unwrap();
    assert!(common::status(dev.number()).unwrap().direct_io);
    dev.detach().unwrap();
}

#[test]
fn offset_and_size_limit_select_a_window_of_the_backing() {
    let _lock = common::lock();
    let dir = tempfile::tempdir().unwrap();
    let file = common::sparse_file(dir.path(), "win.img", 16 * MIB);
    let dev = LoopDevice::attach(
        &file,
        &AttachOptions {
            offset: MIB,
            size_limit: 4 * MIB,
            ..opts(4096)
        },
    )
    .unwrap();
    assert_eq!(dev.size(), 4 * MIB);
    let f = OpenOptions::new().write(true).open(dev.path()).unwrap();
    f.write_all_at(b"window", 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    dev.detach().unwrap();
    let mut got = [0u8; 6];
    std::fs::File::open(&file)
        .unwrap()
        .read_exact_at(&mut got, MIB)
        .unwrap();
    assert_eq!(&got, b"window");
}

#[test]
fn drop_detaches_the_device() {
    let _lock = common::lock();
    let dir = tempfile::tempdir().unwrap();
    let file = common::sparse_file(dir.path(), "drop.img", 8 * MIB);
    let dev = LoopDevice::attach(&file, &opts(512)).unwrap();
    let number = dev.number();
    assert_eq!(common::loops_over(&file).len(), 1);
    drop(dev);
    assert!(common::loops_over(&file).is_empty());
    let backing = std::fs::read_to_string(format!("/sys/block/loop{number}/loop/backing_file"));
    assert!(
        backing.map_or(true, |b| b.trim() != file.to_str().unwrap()),
        "loop{number} still bound to the test file"
    );
}

#[test]
fn drop_detaches_a_device_without_autoclear() {
    let _lock = common::lock();
    let dir = tempfile::tempdir().unwrap();
    let file = common::sparse_file(dir.path(), "noauto.img", 8 * MIB);
    let dev = LoopDevice::attach(
        &file,
        &AttachOptions {
            autoclear: false,
            ..opts(512)
        },
    )
    .unwrap();
    assert!(!common::status(dev.number()).unwrap().autoclear);
    drop(dev);
    assert!(common::loops_over(&file).is_empty());
}

#[test]
fn bad_sector_size_is_refused_and_leaves_nothing_attached() {
    let _lock = common::lock();
    let dir = tempfile::tempdir().unwrap();
    let file = common::sparse_file(dir.path(), "bad.img", 8 * MIB);
    let label = common::unique_label("bad-size");
    let err = LoopDevice::attach(
        &file,
        &AttachOptions {
            label: Some(label.clone()),
            ..opts(1000)
        },
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidOptions { .. }), "{err:?}");
    assert!(err.to_string().contains("1000"), "{err}");
    assert!(common::loops_over(&file).is_empty());
    assert!(common::loops_labelled(&label).is_empty());
}

#[test]
fn missing_backing_fails_to_open_and_leaves_nothing_attached() {
    let _lock = common::lock();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    let label = common::unique_label("missing");
    let err = LoopDevice::attach(
        &missing,
        &AttachOptions {
            label: Some(label.clone()),
            ..opts(512)
        },
    )
    .unwrap_err();
    assert!(matches!(err, Error::OpenBacking { .. }), "{err:?}");
    assert!(err.to_string().contains("missing.img"), "{err}");
    assert!(common::loops_labelled(&label).is_empty());
}

/// Direct I/O with 512-byte sectors over a 4096-byte device is impossible: the kernel
/// either refuses it or binds the device buffered. Either way the failure comes after the
/// device was bound, so this exercises the rollback.
#[test]
fn failure_after_binding_detaches_again_and_keeps_the_first_error() {
    let _lock = common::lock();
    let dir = tempfile::tempdir().unwrap();
    let file = common::sparse_file(dir.path(), "dio.img", 8 * MIB);
    let nvme = LoopDevice::attach(&file, &opts(4096)).unwrap();
    let err = LoopDevice::attach(
        nvme.path(),
        &AttachOptions {
            direct_io: true,
            ..opts(512)
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Verify { .. } | Error::SetDirectIo { .. } | Error::Configure { .. }
        ),
        "{err:?}"
    );
    assert!(common::loops_over(nvme.path()).is_empty(), "{err}");
    nvme.detach().unwrap();
}

#[test]
fn legacy_setup_attaches_with_the_requested_sector_size_and_label() {
    let _lock = common::lock();
    let dir = tempfile::tempdir().unwrap();
    let file = common::sparse_file(dir.path(), "legacy.img", 16 * MIB);
    let label = common::unique_label("legacy");
    for (bs, read_only) in [(4096, false), (2048, true), (512, false)] {
        let dev = LoopDevice::attach_legacy(
            &file,
            &AttachOptions {
                read_only,
                label: Some(label.clone()),
                ..opts(bs)
            },
        )
        .unwrap();
        assert_eq!(dev.logical_block_size(), bs);
        let status = common::status(dev.number()).unwrap();
        assert_eq!(status.label, label);
        assert_eq!(status.read_only, read_only);
        assert!(status.autoclear);
        dev.detach().unwrap();
    }
    assert!(common::loops_over(&file).is_empty());
}

#[test]
fn legacy_setup_failure_after_set_fd_detaches_again() {
    let _lock = common::lock();
    let dir = tempfile::tempdir().unwrap();
    let file = common::sparse_file(dir.path(), "legacy-dio.img", 8 * MIB);
    let nvme = LoopDevice::attach(&file, &opts(4096)).unwrap();
    let err = LoopDevice::attach_legacy(
        nvme.path(),
        &AttachOptions {
            direct_io: true,
            ..opts(512)
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::SetDirectIo { .. } | Error::Verify { .. }),
        "{err:?}"
    );
    assert!(common::loops_over(nvme.path()).is_empty(), "{err}");
    nvme.detach().unwrap();
}

#[test]
fn detach_reports_busy_while_another_opener_holds_the_device() {
    let _lock = common::lock();
    let dir = tempfile::tempdir().unwrap();
    let file = common::sparse_file(dir.path(), "held.img", 8 * MIB);
    let dev = LoopDevice::attach(&file, &opts(512)).unwrap();
    let holder = OpenOptions::new().read(true).open(dev.path()).unwrap();
    let err = dev.detach().unwrap_err();
    assert!(
        matches!(err, Error::Detach { .. }) && err.is_busy(),
        "{err:?}"
    );
    // The kernel removes it when the last opener closes it.
    drop(holder);
    assert!(common::loops_over(&file).is_empty());
}

#[test]
fn concurrent_attaches_all_succeed_on_distinct_devices() {
    const THREADS: usize = 8;
    let _lock = common::lock();
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<_> = (0..THREADS)
        .map(|i| common::sparse_file(dir.path(), &format!("c{i}.img"), 4 * MIB))
        .collect();
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = files
        .iter()
        .cloned()
        .map(|file| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                LoopDevice::attach(&file, &opts(4096))
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let devices: Vec<LoopDevice> = results
        .into_iter()
        .map(|r| r.expect("every concurrent attach succeeds"))
        .collect();
    let mut numbers: Vec<u32> = devices.iter().map(LoopDevice::number).collect();
    numbers.sort_unstable();
    numbers.dedup();
    assert_eq!(numbers.len(), THREADS, "distinct devices: {numbers:?}");
    for (dev, file) in devices.iter().zip(&files) {
        let status = common::status(dev.number()).unwrap();
        assert_eq!(status.backing_file.as_deref(), Some(file.as_path()));
        assert_eq!(status.logical_block_size, 4096);
    }
    for dev in devices {
        dev.detach().unwrap();
    }
    for file in &files {
        assert!(common::loops_over(file).is_empty());
    }
}
