//! The driver in-process with a fake exporter: the attach/detach paths, restart
//! re-exports, export failures as events and as INTERNAL.

use super::*;
use crate::export::FakeExporter;

fn open(dir: &Path, fake: &FakeExporter) -> Arc<Driver> {
    Driver::open(DriverParams {
        state_dir: dir.join("state"),
        export_dir: dir.join("exports"),
        config: Config::default(),
        exporter: Box::new(fake.clone()),
        pause_at: None,
        pause_marker: None,
    })
    .unwrap()
}

fn empty(name: &str) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        pool: DEFAULT_POOL.into(),
        name: name.into(),
        size_bytes: 1 << 20,
        origin: None,
        grow_last_partition: false,
    }
}

fn attach(name: &str) -> pb::AttachVolumeRequest {
    pb::AttachVolumeRequest {
        pool: DEFAULT_POOL.into(),
        name: name.into(),
        logical_block_size: 0,
        read_only: true,
        num_queues: 2,
        queue_size: 0,
    }
}

#[test]
fn attach_starts_one_export_with_the_requested_parameters() {
    let t = tempfile::tempdir().unwrap();
    let fake = FakeExporter::default();
    let d = open(t.path(), &fake);
    let v = d.create_volume(empty("a")).unwrap();
    let a = d.attach_volume(attach("a")).unwrap();
    let running = fake.running.lock().unwrap().clone();
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].volume, PathBuf::from(&v.path));
    assert_eq!(running[0].socket, PathBuf::from(&a.socket_path));
    assert_eq!(
        (running[0].logical_block_size, running[0].num_queues),
        (512, 2)
    );
    assert!(running[0].read_only);
    assert_eq!(running[0].serial.len(), 20);
    // Same parameters: no second export.
    d.attach_volume(attach("a")).unwrap();
    assert_eq!(fake.running.lock().unwrap().len(), 1);
    assert!(d.detach_volume(DEFAULT_POOL, "a").unwrap());
    assert!(fake.running.lock().unwrap().is_empty());
}

#[test]
fn attached_volumes_are_exported_again_after_a_restart() {
    let t = tempfile::tempdir().unwrap();
    let fake = FakeExporter::default();
    let d = open(t.path(), &fake);
    d.create_volume(empty("a")).unwrap();
    d.attach_volume(attach("a")).unwrap();
    drop(d);
    let fake2 = FakeExporter::default();
    let d2 = open(t.path(), &fake2);
    assert_eq!(fake2.running.lock().unwrap().len(), 1);
    assert!(d2
        .get_volume(DEFAULT_POOL, "a")
        .unwrap()
        .attachment
        .is_some());
}

#[test]
fn a_failed_re_export_marks_the_volume_detached() {
    let t = tempfile::tempdir().unwrap();
    let fake = FakeExporter::default();
    let d = open(t.path(), &fake);
    d.create_volume(empty("a")).unwrap();
    d.attach_volume(attach("a")).unwrap();
    drop(d);
    let broken = FakeExporter::default();
    *broken.fail_start.lock().unwrap() = Some("socket busy".into());
    let d2 = open(t.path(), &broken);
    assert!(d2
        .get_volume(DEFAULT_POOL, "a")
        .unwrap()
        .attachment
        .is_none());
}

#[test]
fn export_start_failure_is_internal_and_leaves_the_volume_detached() {
    let t = tempfile::tempdir().unwrap();
    let fake = FakeExporter::default();
    *fake.fail_start.lock().unwrap() = Some("no vhost".into());
    let d = open(t.path(), &fake);
    d.create_volume(empty("a")).unwrap();
    let e = d.attach_volume(attach("a")).unwrap_err();
    assert_eq!(e.code(), tonic::Code::Internal);
    assert!(e.chain().contains("no vhost"), "{}", e.chain());
    assert!(d
        .get_volume(DEFAULT_POOL, "a")
        .unwrap()
        .attachment
        .is_none());
}

#[test]
fn a_failing_export_is_reported_on_watch() {
    let t = tempfile::tempdir().unwrap();
    let fake = FakeExporter::default();
    let d = open(t.path(), &fake);
    d.create_volume(empty("a")).unwrap();
    let mut rx = d.subscribe();
    d.attach_volume(attach("a")).unwrap();
    fake.fail_running("guest memory mapping failed");
    let mut kinds = Vec::new();
    while let Ok(e) = rx.try_recv() {
        kinds.push(e.kind);
    }
    assert!(matches!(kinds.first(), Some(Some(pb::event::Kind::Hotplug(h))) if h.attached));
    assert!(
        kinds
            .iter()
            .any(|k| matches!(k, Some(pb::event::Kind::ExportError(e))
            if e.message.contains("guest memory"))),
        "{kinds:?}"
    );
}

#[test]
fn a_busy_volume_refuses_other_operations_with_aborted() {
    let t = tempfile::tempdir().unwrap();
    let fake = FakeExporter::default();
    let d = open(t.path(), &fake);
    d.create_volume(empty("a")).unwrap();
    let _g = d.begin(vkey(DEFAULT_POOL, "a"), "a").unwrap();
    for e in [
        d.delete_volume(DEFAULT_POOL, "a").unwrap_err(),
        d.attach_volume(attach("a")).unwrap_err(),
        d.create_volume(empty("a")).unwrap_err(),
    ] {
        assert_eq!(e.code(), tonic::Code::Aborted);
    }
}

fn backend_kinds(rx: &mut broadcast::Receiver<pb::Event>) -> Vec<pb::event::Kind> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        match e.kind {
            Some(k @ pb::event::Kind::BackendRemoved(_))
            | Some(k @ pb::event::Kind::BackendResumed(_))
            | Some(k @ pb::event::Kind::IoTimeout(_)) => out.push(k),
            _ => {}
        }
    }
    out
}

#[test]
fn an_export_that_reports_its_volume_removed_is_shown_removed_once_then_resumed() {
    let t = tempfile::tempdir().unwrap();
    let fake = FakeExporter::default();
    let d = open(t.path(), &fake);
    d.create_volume(empty("a")).unwrap();
    let a = d.attach_volume(attach("a")).unwrap();
    assert_eq!(a.backend_state, pb::BackendState::Active as i32);
    let mut rx = d.subscribe();
    let x = fake.export(Path::new(&a.socket_path)).unwrap();
    x.fail_io("I/O failed: No such device");
    x.fail_io("I/O failed: No such device");
    let v = d.get_volume(DEFAULT_POOL, "a").unwrap();
    let att = v.attachment.unwrap();
    assert_eq!(att.backend_state, pb::BackendState::Removed as i32);
    assert!(att.backend_removed_reason.contains("No such device"));
    let k = backend_kinds(&mut rx);
    assert!(
        matches!(&k[..], [pb::event::Kind::BackendRemoved(r)] if r.device == v.path),
        "{k:?}"
    );
    // The export comes back by itself (e.g. resumed through the export's own API).
    *x.state.lock().unwrap() = (BackendState::Active, PathBuf::from(&v.path));
    (x.events)(&BackendEvent::Resumed {
        volume: PathBuf::from(&v.path),
    });
    (x.events)(&BackendEvent::TimedOut { requests: 3 });
    let k = backend_kinds(&mut rx);
    assert!(
        matches!(&k[..], [pb::event::Kind::BackendResumed(r), pb::event::Kind::IoTimeout(t)]
            if r.device == v.path && t.requests == 3),
        "{k:?}"
    );
    let att = d.get_volume(DEFAULT_POOL, "a").unwrap().attachment.unwrap();
    assert_eq!(att.backend_state, pb::BackendState::Active as i32);
}

#[test]
fn hotplug_decisions_remove_and_resume_the_export_on_the_new_path() {
    let t = tempfile::tempdir().unwrap();
    let fake = FakeExporter::default();
    let d = open(t.path(), &fake);
    let v = d.create_volume(empty("a")).unwrap();
    let a = d.attach_volume(attach("a")).unwrap();
    let x = fake.export(Path::new(&a.socket_path)).unwrap();
    let mut rx = d.subscribe();
    let sysfs = Sysfs::new(t.path().join("no-sysfs"));
    let (pool, volume) = (DEFAULT_POOL.to_owned(), "a".to_owned());
    assert!(d.hotplug_apply(
        &Decision::Remove {
            pool: pool.clone(),
            volume: volume.clone(),
            reason: "the backing device was removed".into()
        },
        &sysfs
    ));
    assert_eq!(x.backend().0, BackendState::Removed);
    let moved = t.path().join("moved.img");
    assert!(d.hotplug_apply(
        &Decision::Resume {
            pool: pool.clone(),
            volume: volume.clone(),
            device: moved.clone()
        },
        &sysfs
    ));
    assert_eq!(x.backend(), (BackendState::Active, moved.clone()));
    let k = backend_kinds(&mut rx);
    assert!(
        matches!(&k[..], [pb::event::Kind::BackendRemoved(_), pb::event::Kind::BackendResumed(r)]
            if r.device == moved.display().to_string() && r.previous_device == v.path),
        "{k:?}"
    );
    // The record follows the device, across a restart too.
    assert_eq!(
        d.get_volume(DEFAULT_POOL, "a").unwrap().path,
        moved.display().to_string()
    );
    drop(d);
    let d2 = open(t.path(), &FakeExporter::default());
    assert_eq!(
        d2.get_volume(DEFAULT_POOL, "a").unwrap().path,
        moved.display().to_string()
    );
}

#[test]
fn a_failed_resume_leaves_the_export_removed_and_a_busy_volume_defers() {
    let t = tempfile::tempdir().unwrap();
    let fake = FakeExporter::default();
    let d = open(t.path(), &fake);
    let v = d.create_volume(empty("a")).unwrap();
    let a = d.attach_volume(attach("a")).unwrap();
    let x = fake.export(Path::new(&a.socket_path)).unwrap();
    let sysfs = Sysfs::new(t.path().join("no-sysfs"));
    let remove = Decision::Remove {
        pool: DEFAULT_POOL.into(),
        volume: "a".into(),
        reason: "gone".into(),
    };
    {
        let _g = d.begin(vkey(DEFAULT_POOL, "a"), "a").unwrap();
        assert!(!d.hotplug_apply(&remove, &sysfs), "busy: deferred");
    }
    assert_eq!(x.backend().0, BackendState::Active);
    assert!(d.hotplug_apply(&remove, &sysfs));
    *fake.fail_resume.lock().unwrap() = Some("volume too small".into());
    let resume = Decision::Resume {
        pool: DEFAULT_POOL.into(),
        volume: "a".into(),
        device: t.path().join("other.img"),
    };
    assert!(d.hotplug_apply(&resume, &sysfs));
    assert_eq!(x.backend().0, BackendState::Removed);
    assert_eq!(d.get_volume(DEFAULT_POOL, "a").unwrap().path, v.path);
}

#[test]
fn configured_attachments_are_exported_at_startup_and_missing_ones_are_skipped() {
    let t = tempfile::tempdir().unwrap();
    let fake = FakeExporter::default();
    let d = open(t.path(), &fake);
    d.create_volume(empty("a")).unwrap();
    drop(d);
    let mut config = Config::default();
    for v in ["ghost", "a"] {
        config.attachments.push(AttachmentConfig {
            pool: DEFAULT_POOL.into(),
            volume: v.into(),
            logical_block_size: 4096,
            read_only: false,
            num_queues: 0,
            queue_size: 0,
        });
    }
    let fake2 = FakeExporter::default();
    let d2 = Driver::open(DriverParams {
        state_dir: t.path().join("state"),
        export_dir: t.path().join("exports"),
        config,
        exporter: Box::new(fake2.clone()),
        pause_at: None,
        pause_marker: None,
    })
    .unwrap();
    d2.apply_configured_attachments();
    let running = fake2.running.lock().unwrap().clone();
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].logical_block_size, 4096);
    assert_eq!(
        running[0].io_timeout_ms,
        crate::config::DEFAULT_IO_TIMEOUT_MS
    );
    // Again (a restart): the same attachment, not a second export.
    d2.apply_configured_attachments();
    assert_eq!(fake2.running.lock().unwrap().len(), 1);
}
