//! A frontend picks the queue size: libblkio asks for 128, 256, 512 and 1024
//! descriptors from a default `vmblk export` and from a volume attached by vmblkd with
//! its defaults, and sends a request of as many segments as that size allows (all but
//! the header and status descriptors); at 1024 also the 515-segment requests of Windows
//! guests.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use integration_tests::BlkioClient;
use vmblk_proto::v1 as pb;

const SIZES: [i32; 4] = [128, 256, 512, 1024];

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmblk-queue-sizes")
        .tempdir()
        .unwrap()
}

/// Every size in turn, one connection each (an export serves one frontend at a time).
fn every_queue_size_takes_its_largest_request(socket: &Path) {
    for qs in SIZES {
        let mut c = BlkioClient::connect(socket, qs, 2 << 20)
            .unwrap_or_else(|e| panic!("queue size {qs}: {e:#}"));
        let segments = (qs - 2) as usize;
        assert!(
            c.get_i32("max-segments").unwrap() as usize >= segments,
            "queue size {qs}: libblkio allows fewer than {segments} segments"
        );
        c.vectored_round_trip(segments, 4096)
            .unwrap_or_else(|e| panic!("queue size {qs}: {e:#}"));
        if qs == 1024 {
            c.vectored_round_trip(515, 1 << 20)
                .unwrap_or_else(|e| panic!("queue size {qs}, 515 segments: {e:#}"));
        }
    }
}

/// Kills the export process by PID when the test ends, pass or fail.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_default_vmblk_export_takes_every_queue_size_up_to_1024() {
    let t = tmp();
    let vol = t.path().join("volume.img");
    std::fs::File::create(&vol)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let socket = t.path().join("export.sock");
    let log = std::fs::File::create(t.path().join("export.log")).unwrap();
    let mut child = Killed(
        Command::new(vmblk_bin())
            .arg("export")
            .arg(&vol)
            .arg("--socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting vmblk export"),
    );
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if let Ok(Some(st)) = child.0.try_wait() {
            panic!(
                "vmblk export exited ({st}): {}",
                std::fs::read_to_string(t.path().join("export.log")).unwrap_or_default()
            );
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "no export socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The probe connection above ends at once; the export takes the next frontend.
    every_queue_size_takes_its_largest_request(&socket);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_attached_with_vmblkd_defaults_takes_every_queue_size_up_to_1024() {
    let t = tmp();
    let d = Daemon::start(t.path(), DaemonOpts::default());
    let mut c = d.client().await;
    c.create_volume(empty_request("default", "qs", 64 << 20))
        .await
        .unwrap();
    let a = c
        .attach_volume(pb::AttachVolumeRequest {
            pool: "default".into(),
            name: "qs".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.queue_size, 1024);
    assert!(
        a.qemu_device.contains("queue-size=1024"),
        "{}",
        a.qemu_device
    );
    let socket = std::path::PathBuf::from(&a.socket_path);
    tokio::task::spawn_blocking(move || every_queue_size_takes_its_largest_request(&socket))
        .await
        .unwrap();
    c.detach_volume(pb::DetachVolumeRequest {
        pool: "default".into(),
        name: "qs".into(),
    })
    .await
    .unwrap();
}
