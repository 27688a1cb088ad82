//! The driver in-process with a fake exporter: the attach/detach paths, restart
//! re-exports, export failures as events and as INTERNAL.

use super::*;
use crate::export::{BackendEvent, BackendState, FakeExporter};
use crate::hotplug::{Decision, HotplugHost};
use crate::model::{AttachOptions, NewVolume};
use crate::service::status_code;
use crate::state::Origin;

fn id(name: &str) -> VolumeId {
    VolumeId::new(DEFAULT_POOL, name)
}

fn open(dir: &Path, fake: &FakeExporter) -> Arc<Driver> {
    Driver::open(DriverParams {
        state_dir: dir.join("state"),
        export_dir: dir.join("exports"),
        config: Config::default(),
        exporter: Box::new(fake.clone()),
        #[cfg(feature = "test-hooks")]
        pause: None,
    })
    .unwrap()
}

fn empty(name: &str) -> NewVolume {
    NewVolume {
        id: id(name),
        size_bytes: 1 << 20,
        origin: Origin::Empty,
        grow_last_partition: false,
    }
}

fn attach(_name: &str) -> AttachOptions {
    AttachOptions {
        logical_block_size: 0,
        read_only: true,
        num_queues: 2,
        queue_size: 0,
        force: false,
    }
}

#[test]
fn attach_starts_one_export_with_the_requested_parameters() {
    let t = tempfile::tempdir().unwrap();
    let fake = FakeExporter::default();
    let d = open(t.path(), &fake);
    let v = d.create_volume(empty("a")).unwrap();
    let a = d.attach_volume(&id("a"), attach("a")).unwrap();
    let running = fake.running.lock().unwrap().clone();
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].volume, v.path);
    assert_eq!(running[0].socket, a.socket);
    assert_eq!(
        (running[0].logical_block_size, running[0].num_queues),
        (512, 2)
    );
    assert!(running[0].read_only);
    assert_eq!(running[0].serial.len(), 20);
    // Same parameters: no second export.
    d.attach_volume(&id("a"), attach("a")).unwrap();
    assert_eq!(fake.running.lock().unwrap().len(), 1);
    assert!(d.detach_volume(&id("a")).unwrap());
    assert!(fake.running.lock().unwrap().is_empty());
}

#[test]
fn attached_volumes_are_exported_again_after_a_restart() {
    let t = tempfile::tempdir().unwrap();
    let fake = FakeExporter::default();
    let d = open(t.path(), &fake);
    d.create_volume(empty("a")).unwrap();
    d.attach_volume(&id("a"), attach("a")).unwrap();
    drop(d);
    let fake2 = FakeExporter::default();
    let d2 = open(t.path(), &fake2);
    assert_eq!(fake2.running.lock().unwrap().len(), 1);
    assert!(d2.get_volume(&id("a")).unwrap().attachment.is_some());
}

#[test]
fn a_failed_re_export_marks_the_volume_detached() {
    let t = tempfile::tempdir().unwrap();
    let fake = FakeExporter::default();
    let d = open(t.path(), &fake);
    d.create_volume(empty("a")).unwrap();
    d.attach_volume(&id("a"), attach("a")).unwrap();
    drop(d);
    let broken = FakeExporter::default();
    *broken.fail_start.lock().unwrap() = Some("socket busy".into());
    let d2 = open(t.path(), &broken);
    assert!(d2.get_volume(&id("a")).unwrap().attachment.is_none());
}

#[test]
fn export_start_failure_is_internal_and_leaves_the_volume_detached() {
    let t = tempfile::tempdir().unwrap();
    let fake = FakeExporter::default();
    *fake.fail_start.lock().unwrap() = Some("no vhost".into());
    let d = open(t.path(), &fake);
    d.create_volume(empty("a")).unwrap();
    let e = d.attach_volume(&id("a"), attach("a")).unwrap_err();
    assert_eq!(status_code(&e), tonic::Code::Internal);
    assert!(e.chain().contains("no vhost"), "{}", e.chain());
    assert!(d.get_volume(&id("a")).unwrap().attachment.is_none());
}

#[test]
fn a_failing_export_is_reported_on_watch() {
    let t = tempfile::tempdir().unwrap();
    let fake = FakeExporter::default();
    let d = open(t.path(), &fake);
    d.create_volume(empty("a")).unwrap();
    let mut rx = d.subscribe();
    d.attach_volume(&id("a"), attach("a")).unwrap();
    fake.fail_running("guest memory mapping failed");
    let mut kinds = Vec::new();
    while let Ok(e) = rx.try_recv() {
        kinds.push(e.what);
    }
    assert!(matches!(
        kinds.first(),
        Some(EventKind::Hotplug { attached: true, .. })
    ));
    assert!(
        kinds.iter().any(
            |k| matches!(k, EventKind::ExportError { message } if message.contains("guest memory"))
        ),
        "{kinds:?}"
    );
}

#[test]
fn a_busy_volume_refuses_other_operations_with_aborted() {
    let t = tempfile::tempdir().unwrap();
    let fake = FakeExporter::default();
    let d = open(t.path(), &fake);
    d.create_volume(empty("a")).unwrap();
    let _g = d.begin_volume(&id("a")).unwrap();
    for e in [
        d.delete_volume(&id("a")).unwrap_err(),
        d.attach_volume(&id("a"), attach("a")).unwrap_err(),
        d.create_volume(empty("a")).unwrap_err(),
    ] {
        assert_eq!(status_code(&e), tonic::Code::Aborted);
    }
}

fn backend_kinds(rx: &mut broadcast::Receiver<Event>) -> Vec<EventKind> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        if let k @ (EventKind::BackendRemoved { .. }
        | EventKind::BackendResumed { .. }
        | EventKind::IoTimeout { .. }) = e.what
        {
            out.push(k);
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
    let a = d.attach_volume(&id("a"), attach("a")).unwrap();
    assert_eq!(a.backend, Backend::Serving);
    let mut rx = d.subscribe();
    let x = fake.export(&a.socket).unwrap();
    x.fail_io("I/O failed: No such device");
    x.fail_io("I/O failed: No such device");
    let v = d.get_volume(&id("a")).unwrap();
    let att = v.attachment.unwrap();
    assert!(
        matches!(&att.backend, Backend::Removed { reason } if reason.contains("No such device")),
        "{att:?}"
    );
    let k = backend_kinds(&mut rx);
    assert!(
        matches!(&k[..], [EventKind::BackendRemoved { device, .. }] if *device == v.path),
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
        matches!(&k[..], [EventKind::BackendResumed { device, .. }, EventKind::IoTimeout { requests: 3 }]
            if *device == v.path),
        "{k:?}"
    );
    let att = d.get_volume(&id("a")).unwrap().attachment.unwrap();
    assert_eq!(att.backend, Backend::Serving);
}

#[test]
fn hotplug_decisions_remove_and_resume_the_export_on_the_new_path() {
    let t = tempfile::tempdir().unwrap();
    let fake = FakeExporter::default();
    let d = open(t.path(), &fake);
    let v = d.create_volume(empty("a")).unwrap();
    let a = d.attach_volume(&id("a"), attach("a")).unwrap();
    let x = fake.export(&a.socket).unwrap();
    let mut rx = d.subscribe();
    let sysfs = Sysfs::new(t.path().join("no-sysfs"));
    let (pool, volume) = (DEFAULT_POOL.to_owned(), "a".to_owned());
    assert!(d.apply(
        &Decision::Remove {
            pool: pool.clone(),
            volume: volume.clone(),
            reason: "the backing device was removed".into()
        },
        &sysfs
    ));
    assert_eq!(x.backend().0, BackendState::Removed);
    let moved = t.path().join("moved.img");
    assert!(d.apply(
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
        matches!(&k[..], [EventKind::BackendRemoved { .. }, EventKind::BackendResumed { device, previous_device }]
            if *device == moved && *previous_device == v.path),
        "{k:?}"
    );
    // The record follows the device, across a restart too.
    assert_eq!(d.get_volume(&id("a")).unwrap().path, moved);
    drop(d);
    let d2 = open(t.path(), &FakeExporter::default());
    assert_eq!(d2.get_volume(&id("a")).unwrap().path, moved);
}

#[test]
fn a_failed_resume_leaves_the_export_removed_and_a_busy_volume_defers() {
    let t = tempfile::tempdir().unwrap();
    let fake = FakeExporter::default();
    let d = open(t.path(), &fake);
    let v = d.create_volume(empty("a")).unwrap();
    let a = d.attach_volume(&id("a"), attach("a")).unwrap();
    let x = fake.export(&a.socket).unwrap();
    let sysfs = Sysfs::new(t.path().join("no-sysfs"));
    let remove = Decision::Remove {
        pool: DEFAULT_POOL.into(),
        volume: "a".into(),
        reason: "gone".into(),
    };
    {
        let _g = d.begin_volume(&id("a")).unwrap();
        assert!(!d.apply(&remove, &sysfs), "busy: deferred");
    }
    assert_eq!(x.backend().0, BackendState::Active);
    assert!(d.apply(&remove, &sysfs));
    *fake.fail_resume.lock().unwrap() = Some("volume too small".into());
    let resume = Decision::Resume {
        pool: DEFAULT_POOL.into(),
        volume: "a".into(),
        device: t.path().join("other.img"),
    };
    assert!(d.apply(&resume, &sysfs));
    assert_eq!(x.backend().0, BackendState::Removed);
    assert_eq!(d.get_volume(&id("a")).unwrap().path, v.path);
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
        #[cfg(feature = "test-hooks")]
        pause: None,
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

#[test]
fn a_rename_interrupted_between_its_records_is_finished_at_startup() {
    let t = tempfile::tempdir().unwrap();
    let fake = FakeExporter::default();
    let d = open(t.path(), &fake);
    let v = d.create_volume(empty("a")).unwrap();
    // What rename_volume had done when the daemon died: the file linked under the new
    // name, the new record (naming the old one) written, the old record still there.
    let mut rec = d.record(&id("a")).unwrap();
    let old_path = rec.path.clone();
    let new_path = old_path.with_file_name("b.img");
    fs::hard_link(&old_path, &new_path).unwrap();
    rec.name = "b".into();
    rec.path = new_path.clone();
    rec.renamed_from = Some("a".into());
    d.store.put_volume(&rec).unwrap();
    drop(d);

    let d = open(t.path(), &fake);
    assert!(matches!(
        d.get_volume(&id("a")),
        Err(Error::VolumeNotFound(_))
    ));
    let b = d.get_volume(&id("b")).unwrap();
    assert_eq!(
        (b.uuid.as_str(), b.path.as_path()),
        (v.uuid.as_str(), new_path.as_path())
    );
    assert!(!old_path.exists(), "the old name of the file is left");
    assert!(new_path.exists());
    // And a rename of it runs to the end.
    let c = d.rename_volume(&id("b"), "c").unwrap();
    assert!(c.path.exists() && !new_path.exists());
    assert!(d.record(&id("c")).unwrap().renamed_from.is_none());
}
