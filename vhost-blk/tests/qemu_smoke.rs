//! Real QEMU (TCG, no guest OS) against the export: SeaBIOS reads the disk through
//! vhost-user-blk; then QEMU is killed and started again (`reconnect=1`), and the same
//! export serves the new instance. Skipped when qemu-system-x86_64 is not installed.

use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use vhost_blk::{Export, ExportConfig};

/// Kills and reaps QEMU when dropped.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts QEMU (SeaBIOS) booting from the export; fails the test where QEMU cannot be
/// started (scripts/setup.sh installs it).
fn qemu(socket: &std::path::Path) -> Qemu {
    let child = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35,accel=tcg", "-m", "128"])
        .args([
            "-object",
            "memory-backend-memfd,id=mem,size=128M,share=on",
            "-numa",
            "node,memdev=mem",
        ])
        .arg("-chardev")
        .arg(format!("socket,id=c,path={},reconnect=1", socket.display()))
        .args([
            "-device",
            "vhost-user-blk-pci,chardev=c,num-queues=2,bootindex=1",
            "-display",
            "none",
            "-nodefaults",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-system-x86_64 (scripts/setup.sh installs it)");
    Qemu(child)
}

#[test]
fn seabios_reads_through_the_export_across_a_qemu_restart() {
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("disk.img");
    std::fs::File::create(&volume)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let export = Arc::new(
        Export::new(ExportConfig {
            volume,
            socket: dir.path().join("vhost.sock"),
            num_queues: 2,
            ..ExportConfig::default()
        })
        .unwrap(),
    );
    let stop = export.stop_handle();
    let e2 = export.clone();
    let server = std::thread::spawn(move || e2.serve().unwrap());

    let mut reads_before = 0;
    for run in 0..2 {
        let q = qemu(&export.config().socket);
        let deadline = Instant::now() + Duration::from_secs(60);
        while export.metrics().requests.read == reads_before {
            assert!(
                Instant::now() < deadline,
                "QEMU run {run}: no read through the export within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        reads_before = export.metrics().requests.read;
        drop(q);
    }
    assert_eq!(export.metrics().errors.malformed, 0);

    stop.stop();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(server.join().is_ok());
    });
    assert_eq!(rx.recv_timeout(Duration::from_secs(20)), Ok(true));
}
