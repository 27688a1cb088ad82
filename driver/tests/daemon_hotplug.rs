//! Hotplug with the real daemon, real loop devices and the kernel's own uevents (root
//! only; serialized by /tmp/vmblk-loop-tests.lock): a block volume whose device is
//! removed and comes back under a new name, and the startup race of incident 3 (a config
//! that lists hotplug before its devices, restarted 50 times).

mod common;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use vmblk_proto::v1 as pb;

const MIB: u64 = 1 << 20;

fn sparse_file(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// The kernel name of a loop device node ("/dev/loop3" -> "loop3").
fn kname(dev: &Path) -> String {
    dev.file_name().unwrap().to_string_lossy().into_owned()
}

/// Makes the kernel send a uevent for `dev` (ACTION `action`), as it does for a real
/// hot-remove or change; the device itself is not touched.
fn kernel_uevent(dev: &Path, action: &str) {
    std::fs::write(
        format!("/sys/class/block/{}/uevent", kname(dev)),
        action.as_bytes(),
    )
    .unwrap();
}

/// Whether process `pid` has `dev` open.
fn has_open(pid: u32, dev: &Path) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == dev))
        })
        .unwrap_or(false)
}

async fn next_backend_event(w: &mut tonic::Streaming<pb::Event>, d: &Daemon) -> pb::event::Kind {
    let t0 = Instant::now();
    loop {
        let left = Duration::from_secs(15).saturating_sub(t0.elapsed());
        let Ok(r) = tokio::time::timeout(left, w.message()).await else {
            panic!("no backend event within 15 s:\n{}", d.log_text());
        };
        let e = r.unwrap().unwrap();
        match e.kind {
            Some(k @ pb::event::Kind::BackendRemoved(_))
            | Some(k @ pb::event::Kind::BackendResumed(_)) => return k,
            _ => {}
        }
    }
}

async fn attachment(c: &mut vmblkd::client::Client, pool: &str, name: &str) -> pb::Attachment {
    c.get_volume(pb::GetVolumeRequest {
        pool: pool.into(),
        name: name.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .attachment
    .unwrap_or_else(|| panic!("{pool}/{name} is not attached"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_device_that_comes_back_under_a_new_name_resumes_its_export() {
    let _lock = loop_lock();
    let t = tempfile::Builder::new()
        .prefix("vmblkd-hotplug")
        .tempdir()
        .unwrap();
    let file = t.path().join("disk4k.img");
    sparse_file(&file, 32 * MIB);
    let l1 = Loop::attach(&file, 4096);
    let cfg = format!(
        "hotplug: {{enabled: true}}\npools:\n  - name: nvme\n    type: block\n    devices: [{}]\n",
        l1.dev.display()
    );
    let mut d = Daemon::start(
        t.path(),
        DaemonOpts {
            config: Some(cfg),
            ..Default::default()
        },
    );
    let mut c = d.client().await;
    let v = c
        .create_volume(empty_request("nvme", "vm", 16 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.path, l1.dev.display().to_string());
    assert_eq!(v.backing_logical_block_size, 4096);
    let a = c
        .attach_volume(pb::AttachVolumeRequest {
            pool: "nvme".into(),
            name: "vm".into(),
            logical_block_size: 4096,
            read_only: false,
            num_queues: 0,
            queue_size: 0,
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.backend_state, pb::BackendState::Active as i32);
    let pid = d.pid().unwrap();
    assert!(
        has_open(pid, &l1.dev),
        "export does not hold {}",
        l1.dev.display()
    );
    let mut w = c
        .watch(pb::WatchRequest {
            pool: "nvme".into(),
            name: "vm".into(),
        })
        .await
        .unwrap()
        .into_inner();

    // Removal: the kernel's remove uevent for the device (through the monitor's netlink
    // socket, the same path as a pulled NVMe namespace).
    let t0 = Instant::now();
    kernel_uevent(&l1.dev, "remove");
    let k = next_backend_event(&mut w, &d).await;
    let removed_ms = t0.elapsed().as_millis();
    assert!(
        matches!(&k, pb::event::Kind::BackendRemoved(r) if r.device == v.path),
        "{k:?}"
    );
    let att = attachment(&mut c, "nvme", "vm").await;
    assert_eq!(att.backend_state, pb::BackendState::Removed as i32);
    assert!(!att.backend_removed_reason.is_empty());
    // Another event for the removed device (same medium) does not bring it back.
    kernel_uevent(&l1.dev, "change");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let att = attachment(&mut c, "nvme", "vm").await;
    assert_eq!(att.backend_state, pb::BackendState::Removed as i32);

    // Re-add: the same backing file behind a new loop device (a new name; the kernel
    // announces it with a change event carrying a new DISKSEQ).
    let t1 = Instant::now();
    let l2 = Loop::attach(&file, 4096);
    assert_ne!(l1.dev, l2.dev);
    let k = next_backend_event(&mut w, &d).await;
    let resumed_ms = t1.elapsed().as_millis();
    assert!(
        matches!(&k, pb::event::Kind::BackendResumed(r)
            if r.device == l2.dev.display().to_string() && r.previous_device == v.path),
        "{k:?}"
    );
    let v2 = c
        .get_volume(pb::GetVolumeRequest {
            pool: "nvme".into(),
            name: "vm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v2.path, l2.dev.display().to_string());
    let att = v2.attachment.unwrap();
    assert_eq!(att.backend_state, pb::BackendState::Active as i32);
    assert_eq!(
        att.socket_path, a.socket_path,
        "same socket: QEMU keeps its session"
    );
    assert!(
        has_open(pid, &l2.dev),
        "export does not serve {}",
        l2.dev.display()
    );
    assert!(
        !has_open(pid, &l1.dev),
        "export still holds the old device {}",
        l1.dev.display()
    );
    UnixStream::connect(&a.socket_path).expect("the export's socket accepts");
    eprintln!(
        "remove event -> BackendRemoved: {removed_ms} ms; new loop device -> BackendResumed: {resumed_ms} ms"
    );

    // A restart finds the volume on its new device, by identity.
    drop(w);
    drop(c);
    d.restart_with_env(vec![]);
    let mut c = d.client().await;
    let att = attachment(&mut c, "nvme", "vm").await;
    assert_eq!(att.backend_state, pb::BackendState::Active as i32);
    assert!(has_open(d.pid().unwrap(), &l2.dev));
    c.detach_volume(pb::DetachVolumeRequest {
        pool: "nvme".into(),
        name: "vm".into(),
    })
    .await
    .unwrap();
    drop(c);
    d.stop();
    drop(d);
    drop(l2);
    drop(l1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_device_at_the_old_path_is_not_exported_and_the_right_one_is_when_it_appears() {
    use std::os::unix::fs::FileExt;
    let _lock = loop_lock();
    let t = tempfile::Builder::new()
        .prefix("vmblkd-identity")
        .tempdir()
        .unwrap();
    // Two volumes: "rec" attached over the API (the record brings it back), "cfg"
    // attached by the configuration only.
    let names = ["rec", "cfg"];
    let marker = b"ANOTHER-DISK-NOT-TO-BE-TOUCHED";
    let mut right = Vec::new();
    let mut other = Vec::new();
    for n in names {
        let (fa, fb) = (
            t.path().join(format!("{n}-a.img")),
            t.path().join(format!("{n}-b.img")),
        );
        sparse_file(&fa, 16 * MIB);
        sparse_file(&fb, 16 * MIB);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&fb)
            .unwrap()
            .write_all_at(marker, 0)
            .unwrap();
        right.push(fa);
        other.push(fb);
    }
    let las: Vec<Loop> = right.iter().map(|f| Loop::attach(f, 512)).collect();
    let old_paths: Vec<PathBuf> = las.iter().map(|l| l.dev.clone()).collect();
    let cfg = format!(
        "attachments:\n  - {{pool: nvme, volume: cfg}}\npools:\n  - name: nvme\n    type: block\n    devices: [{}, {}]\nhotplug: {{enabled: true}}\n",
        old_paths[0].display(),
        old_paths[1].display()
    );
    let mut d = Daemon::start(
        t.path(),
        DaemonOpts {
            config: Some(cfg),
            ..Default::default()
        },
    );
    let mut c = d.client().await;
    let mut sockets = Vec::new();
    for n in names {
        c.create_volume(empty_request("nvme", n, 8 * MIB))
            .await
            .unwrap();
        let a = c
            .attach_volume(pb::AttachVolumeRequest {
                pool: "nvme".into(),
                name: n.into(),
                logical_block_size: 512,
                read_only: false,
                num_queues: 0,
                queue_size: 0,
                force: false,
            })
            .await
            .unwrap()
            .into_inner();
        sockets.push(a.socket_path);
    }
    c.detach_volume(pb::DetachVolumeRequest {
        pool: "nvme".into(),
        name: "cfg".into(),
    })
    .await
    .unwrap();
    drop(c);
    // The daemon dies; while it is down, the disks go away and other disks get their
    // names.
    d.kill();
    drop(las);
    let lbs: Vec<Loop> = old_paths
        .iter()
        .zip(&other)
        .map(|(dev, f)| {
            run(Command::new("losetup").arg(dev).arg(f));
            Loop { dev: dev.clone() }
        })
        .collect();
    d.restart_with_env(vec![]);
    let pid = d.pid().unwrap();
    let mut c = d.client().await;
    for (i, n) in names.iter().enumerate() {
        let att = attachment(&mut c, "nvme", n).await;
        assert_eq!(
            att.backend_state,
            pb::BackendState::Missing as i32,
            "{n}:\n{}",
            d.log_text()
        );
        assert_eq!(att.socket_path, sockets[i]);
        assert!(
            !has_open(pid, &old_paths[i]),
            "the other disk at {} was exported",
            old_paths[i].display()
        );
        assert!(UnixStream::connect(&sockets[i]).is_err());
    }
    let mut w = c
        .watch(pb::WatchRequest {
            pool: "nvme".into(),
            name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    // Events about the other disks change nothing.
    for l in &lbs {
        kernel_uevent(&l.dev, "change");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(old_paths.iter().all(|p| !has_open(pid, p)));
    // The right disks appear under new names: their exports start, on the same sockets.
    let mut la2s = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let t0 = Instant::now();
        let la2 = Loop::attach(&right[i], 512);
        let k = next_backend_event(&mut w, &d).await;
        let started_ms = t0.elapsed().as_millis();
        assert!(
            matches!(&k, pb::event::Kind::BackendResumed(r) if r.device == la2.dev.display().to_string()),
            "{n}: {k:?}"
        );
        let v = c
            .get_volume(pb::GetVolumeRequest {
                pool: "nvme".into(),
                name: (*n).into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(v.path, la2.dev.display().to_string());
        let att = v.attachment.unwrap();
        assert_eq!(att.backend_state, pb::BackendState::Active as i32);
        assert_eq!(att.socket_path, sockets[i]);
        UnixStream::connect(&sockets[i]).expect("the export's socket accepts");
        assert!(has_open(pid, &la2.dev));
        eprintln!("{n}: missing device appeared -> export started: {started_ms} ms");
        la2s.push(la2);
    }
    assert!(old_paths.iter().all(|p| !has_open(pid, p)));
    for f in &other {
        assert_eq!(
            read_at(f, 0, marker.len()),
            marker,
            "another disk was written"
        );
    }
    drop(w);
    for n in names {
        c.detach_volume(pb::DetachVolumeRequest {
            pool: "nvme".into(),
            name: n.into(),
        })
        .await
        .unwrap();
    }
    drop(c);
    d.stop();
    drop(d);
    drop(la2s);
    drop(lbs);
}

/// Sends change uevents for `devs` every few milliseconds until stopped, so events are
/// queued and arrive while the daemon restores its state.
struct EventStorm {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EventStorm {
    fn start(devs: Vec<PathBuf>) -> EventStorm {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (s2, n2) = (stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            while !s2.load(Ordering::SeqCst) {
                for d in &devs {
                    kernel_uevent(d, "change");
                    n2.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        EventStorm {
            stop,
            sent,
            thread: Some(thread),
        }
    }
}

impl Drop for EventStorm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_listing_hotplug_first_comes_up_with_every_export_attached_50_times() {
    let _lock = loop_lock();
    let t_start = Instant::now();
    let t = tempfile::Builder::new()
        .prefix("vmblkd-startup")
        .tempdir()
        .unwrap();
    let loops: Vec<Loop> = (0..3)
        .map(|i| {
            let f = t.path().join(format!("dev{i}.img"));
            sparse_file(&f, 8 * MIB);
            Loop::attach(&f, if i == 0 { 4096 } else { 512 })
        })
        .collect();
    let devs: Vec<PathBuf> = loops.iter().map(|l| l.dev.clone()).collect();
    let vols = [
        ("nvme", "b0"),
        ("nvme", "b1"),
        ("nvme", "b2"),
        ("local", "d0"),
    ];
    // hotplug first, then the attachments, then the devices they live on.
    let mut cfg = String::from("hotplug: {enabled: true}\nattachments:\n");
    for (p, v) in vols {
        cfg += &format!("  - {{pool: {p}, volume: {v}}}\n");
    }
    cfg += &format!(
        "pools:\n  - name: nvme\n    type: block\n    devices: [{}]\n  - name: local\n    type: dir\n    path: {}\n",
        devs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        t.path().join("dirpool").display()
    );
    let mut d = Daemon::start(
        t.path(),
        DaemonOpts {
            config: Some(cfg),
            ..Default::default()
        },
    );
    // The volumes do not exist yet: the configured attachments are skipped, the daemon
    // serves. Create them (not attached over the API: only the config attaches them).
    let mut c = d.client().await;
    for (p, v) in vols {
        c.create_volume(empty_request(p, v, 4 * MIB)).await.unwrap();
    }
    drop(c);
    eprintln!("setup (3 loop devices, 4 volumes): {:?}", t_start.elapsed());
    let t_loop = Instant::now();
    let storm = EventStorm::start(devs.clone());
    let mut startup = Vec::new();
    for round in 0..50 {
        if round % 2 == 1 {
            // Detached over the API before the crash: the records no longer say
            // attached, so only the configured attachments can bring them back.
            let mut c = d.client().await;
            for (p, v) in vols {
                c.detach_volume(pb::DetachVolumeRequest {
                    pool: p.into(),
                    name: v.into(),
                })
                .await
                .unwrap();
            }
        }
        d.kill();
        let t0 = Instant::now();
        d.restart_with_env(vec![]);
        startup.push(t0.elapsed());
        let mut c = d.client().await;
        for (p, v) in vols {
            let a = attachment(&mut c, p, v).await;
            assert_eq!(
                a.backend_state,
                pb::BackendState::Active as i32,
                "round {round}: {p}/{v} not active:\n{}",
                d.log_text()
            );
            UnixStream::connect(&a.socket_path).unwrap_or_else(|e| {
                panic!(
                    "round {round}: {p}/{v}: socket {} refuses: {e}",
                    a.socket_path
                )
            });
        }
        // The block volumes are on their own devices.
        for v in ["b0", "b1", "b2"] {
            let vol = c
                .get_volume(pb::GetVolumeRequest {
                    pool: "nvme".into(),
                    name: v.into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert!(
                devs.iter().any(|d| d.display().to_string() == vol.path),
                "round {round}: {v} on {}",
                vol.path
            );
        }
    }
    eprintln!("50 restarts and checks: {:?}", t_loop.elapsed());
    let sent = storm.sent.load(Ordering::Relaxed);
    drop(storm);
    startup.sort();
    eprintln!(
        "50 restarts with {sent} kernel uevents sent meanwhile: startup (spawn to gRPC socket) \
         median {:?}, max {:?}",
        startup[startup.len() / 2],
        startup[startup.len() - 1]
    );
    let log = d.log_text();
    assert!(
        !log.contains("configured attachment failed")
            || log.matches("configured attachment failed").count() == 4,
        "only the first start (volumes not yet created) may skip attachments:\n{log}"
    );
    let t_stop = Instant::now();
    d.stop();
    drop(d);
    drop(loops);
    eprintln!("stop and cleanup: {:?}", t_stop.elapsed());
}
