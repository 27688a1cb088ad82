//! The hotplug monitor: kernel uevents of block devices, matched to attached volumes of
//! block pools by stable identity (identity.rs), never by device name.
//!
//! ```text
//!  startup:  Monitor::open()  ── uevent socket bound, events queue from here on
//!            Driver::open()   ── pools, volumes, attachments restored (config order moot)
//!            Driver::apply_configured_attachments()
//!            Monitor::start() ── queued events read, one full reconcile, then the loop
//!
//!  loop:     uevents (add/change/remove, block) ─► taints ─► snapshot of sysfs
//!                 ─► reconcile(tracked volumes, present devices) ─► decisions
//!                 ─► HotplugHost::apply (the driver): export.remove(reason) / resume(dev)
//! ```
//!
//! Every event triggers a reconcile of every tracked volume against what sysfs shows,
//! so a lost or reordered event cannot leave a wrong state behind: the socket
//! overflowing (ENOBUFS) is just one more reason to reconcile, and one runs every few
//! seconds anyway. Events matter in two ways
//! only: a `remove` taints its device (it counts as gone even while its sysfs entry
//! lingers) until the device gets a new medium (`add`, or `change` with a new DISKSEQ),
//! and the devices named by `add`/`change` events are preferred when a volume resumes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::identity::{BlockDev, DeviceIdentity, Sysfs};
use crate::sys::UeventSocket;

/// What the monitor acts on: the daemon's attachments whose devices it follows. The
/// driver implements it; the monitor knows nothing else of the driver.
pub trait HotplugHost: Send + Sync {
    /// Devices that count as gone until they get a new medium.
    fn taints(&self) -> &Taints;
    /// The attached volumes whose devices are followed, with where they stand.
    fn tracked(&self, sysfs: &Sysfs) -> Vec<Tracked>;
    /// Carries out one decision; false if the volume was busy (try again later).
    fn apply(&self, d: &Decision, sysfs: &Sysfs) -> bool;
}

/// A uevent's ACTION.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UeventAction {
    /// A device appeared.
    Add,
    /// A device went away.
    Remove,
    /// A device changed (a loop device got or lost its backing file, a medium changed,
    /// a size changed).
    Change,
    /// Anything else (bind, unbind, move, online, offline).
    Other(String),
}

/// One kernel uevent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    /// ACTION.
    pub action: UeventAction,
    /// DEVPATH (under /sys).
    pub devpath: String,
    /// SUBSYSTEM.
    pub subsystem: String,
    /// DEVNAME (relative to /dev, as the kernel sends it).
    pub devname: Option<String>,
    /// DEVTYPE ("disk", "partition").
    pub devtype: Option<String>,
    /// MAJOR and MINOR.
    pub devnum: Option<(u32, u32)>,
    /// DISKSEQ: the disk's medium sequence number.
    pub diskseq: Option<u64>,
    /// SEQNUM.
    pub seqnum: Option<u64>,
}

impl Uevent {
    /// An event from its KEY=VALUE properties; None without ACTION, DEVPATH or SUBSYSTEM.
    pub fn from_pairs<K, V>(pairs: impl IntoIterator<Item = (K, V)>) -> Option<Uevent>
    where
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut m: HashMap<String, String> = HashMap::new();
        for (k, v) in pairs {
            m.insert(k.as_ref().to_owned(), v.as_ref().to_owned());
        }
        let num = |k: &str| m.get(k).and_then(|v| v.parse::<u64>().ok());
        let action = match m.get("ACTION")?.as_str() {
            "add" => UeventAction::Add,
            "remove" => UeventAction::Remove,
            "change" => UeventAction::Change,
            o => UeventAction::Other(o.to_owned()),
        };
        let devnum = match (num("MAJOR"), num("MINOR")) {
            (Some(a), Some(b)) => Some((u32::try_from(a).ok()?, u32::try_from(b).ok()?)),
            _ => None,
        };
        Some(Uevent {
            action,
            devpath: m.get("DEVPATH")?.clone(),
            subsystem: m.get("SUBSYSTEM")?.clone(),
            devname: m.get("DEVNAME").cloned(),
            devtype: m.get("DEVTYPE").cloned(),
            devnum,
            diskseq: num("DISKSEQ"),
            seqnum: num("SEQNUM"),
        })
    }

    /// Parses a kernel uevent message as the kernel multicasts it: "ACTION@DEVPATH\0"
    /// then "KEY=VALUE\0" pairs. (vmblkd reads the socket through libudev, which does
    /// this parsing; this is the reference the tests check the property mapping with.)
    #[cfg(test)]
    pub fn parse_kernel(buf: &[u8]) -> Option<Uevent> {
        let mut parts = buf.split(|b| *b == 0).filter(|p| !p.is_empty());
        let header = std::str::from_utf8(parts.next()?).ok()?;
        let (action, devpath) = header.split_once('@')?;
        let mut pairs = Vec::new();
        for p in parts {
            let s = std::str::from_utf8(p).ok()?;
            let (k, v) = s.split_once('=')?;
            pairs.push((k.to_owned(), v.to_owned()));
        }
        let ev = Uevent::from_pairs(pairs)?;
        let header_action = match action {
            "add" => UeventAction::Add,
            "remove" => UeventAction::Remove,
            "change" => UeventAction::Change,
            o => UeventAction::Other(o.to_owned()),
        };
        // The header repeats ACTION and DEVPATH: a message where they disagree is corrupt.
        (ev.action == header_action && ev.devpath == devpath).then_some(ev)
    }

    /// The kernel name of the device ("loop3"): DEVNAME's last component, or DEVPATH's.
    pub fn name(&self) -> &str {
        let p = self.devname.as_deref().unwrap_or(&self.devpath);
        p.rsplit('/').next().unwrap_or(p)
    }
}

/// Where an attached block-pool volume's backing stands, as the driver sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackedState {
    /// Exported and served.
    Active,
    /// Exported; every request fails with an I/O error until resumed.
    Removed,
    /// Attached in the records, but its device was absent at startup: no export yet.
    Missing,
}

/// An attached volume of a block pool, for [`reconcile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracked {
    /// Pool.
    pub pool: String,
    /// Volume.
    pub volume: String,
    /// The identity recorded for its device.
    pub identity: DeviceIdentity,
    /// Kernel name of the device at the volume's recorded path now (None: no device).
    pub current: Option<String>,
    /// The volume's size: a device smaller than this is not it.
    pub size_bytes: u64,
    /// Its state.
    pub state: TrackedState,
}

/// What [`reconcile`] decided for one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The device is gone: fail the export's requests until it comes back.
    Remove {
        /// Pool.
        pool: String,
        /// Volume.
        volume: String,
        /// Why, for the event and the log.
        reason: String,
    },
    /// The device is back (perhaps under another name): serve it again.
    Resume {
        /// Pool.
        pool: String,
        /// Volume.
        volume: String,
        /// Its node now.
        device: PathBuf,
    },
    /// An attached volume whose device was absent at startup: start its export.
    Start {
        /// Pool.
        pool: String,
        /// Volume.
        volume: String,
        /// Its node now.
        device: PathBuf,
    },
}

fn fits(t: &Tracked, d: &BlockDev) -> bool {
    d.size_bytes > 0
        && d.size_bytes >= t.size_bytes
        && d.identity
            .as_ref()
            .is_some_and(|i| i.same_device(&t.identity))
}

/// Decides, for every tracked volume, whether its export must be removed, resumed or
/// started, given the block devices present now. `prefer`: names of devices that just
/// appeared or changed, tried first when several devices carry the identity.
pub fn reconcile(tracked: &[Tracked], present: &[BlockDev], prefer: &[String]) -> Vec<Decision> {
    let by_name: HashMap<&str, &BlockDev> = present.iter().map(|d| (d.name.as_str(), d)).collect();
    let mut out = Vec::new();
    for t in tracked {
        let cur = t.current.as_deref().and_then(|n| by_name.get(n).copied());
        // A device that cannot show an identity right now (a loop device whose backing
        // file is unreachable or deleted) but still has its size is left alone: taking a
        // working disk from the guest would be worse; if its I/O fails, the export says so.
        let cur_ok = cur.is_some_and(|d| {
            fits(t, d) || (d.identity.is_none() && d.size_bytes >= t.size_bytes.max(1))
        });
        // Where the device is now: a device that just appeared, then the volume's own
        // path, then any other (by name, so the choice is stable).
        let find = |exclude_current: bool| -> Option<&BlockDev> {
            let preferred = prefer
                .iter()
                .filter_map(|n| by_name.get(n.as_str()).copied());
            let own = cur.into_iter().filter(|_| !exclude_current);
            preferred
                .chain(own)
                .chain(present.iter())
                .filter(|d| !(exclude_current && Some(d.name.as_str()) == t.current.as_deref()))
                .find(|d| fits(t, d))
        };
        let (pool, volume) = (t.pool.clone(), t.volume.clone());
        match t.state {
            TrackedState::Active if cur_ok => {}
            TrackedState::Active => {
                let reason = match (t.current.as_deref(), cur) {
                    (None, _) | (Some(_), None) => "the backing device was removed".to_owned(),
                    (Some(n), Some(d)) if d.size_bytes == 0 => {
                        format!("the backing device {n} has no medium")
                    }
                    (Some(n), Some(d)) if d.size_bytes < t.size_bytes => format!(
                        "the backing device {n} shrank to {} bytes, below the volume's {}",
                        d.size_bytes, t.size_bytes
                    ),
                    (Some(n), Some(_)) => {
                        format!("{n} is another device now (its identity changed)")
                    }
                };
                out.push(Decision::Remove {
                    pool: pool.clone(),
                    volume: volume.clone(),
                    reason,
                });
                if let Some(d) = find(true) {
                    out.push(Decision::Resume {
                        pool,
                        volume,
                        device: d.devnode.clone(),
                    });
                }
            }
            TrackedState::Removed => {
                if let Some(d) = find(false) {
                    out.push(Decision::Resume {
                        pool,
                        volume,
                        device: d.devnode.clone(),
                    });
                }
            }
            TrackedState::Missing => {
                if let Some(d) = find(false) {
                    out.push(Decision::Start {
                        pool,
                        volume,
                        device: d.devnode.clone(),
                    });
                }
            }
        }
    }
    out
}

/// Devices that were reported removed (a `remove` uevent, or their export's I/O failing
/// with ENODEV/ENXIO) and count as absent until they get a new medium, by kernel name,
/// with their DISKSEQ at the time (None: absent until an `add`).
#[derive(Debug, Default)]
pub struct Taints(Mutex<HashMap<String, Option<u64>>>);

impl Taints {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<u64>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `name` absent while its medium is `diskseq`.
    pub fn taint(&self, name: &str, diskseq: Option<u64>) {
        self.map().insert(name.to_owned(), diskseq);
    }

    /// Applies one uevent.
    pub fn apply(&self, ev: &Uevent) {
        let name = ev.name().to_owned();
        let mut m = self.map();
        match ev.action {
            UeventAction::Remove => {
                m.insert(name, ev.diskseq);
            }
            UeventAction::Add => {
                m.remove(&name);
            }
            UeventAction::Change => {
                if let (Some(Some(old)), Some(new)) = (m.get(&name), ev.diskseq) {
                    if *old != new {
                        m.remove(&name);
                    }
                }
            }
            UeventAction::Other(_) => {}
        }
    }

    /// `present` without the devices that count as absent.
    pub fn filter(&self, present: Vec<BlockDev>) -> Vec<BlockDev> {
        let m = self.map();
        present
            .into_iter()
            .filter(|d| match m.get(&d.name) {
                None => true,
                Some(None) => false,
                Some(Some(seq)) => d.diskseq.is_some_and(|s| s != *seq),
            })
            .collect()
    }
}

/// The uevent socket, opened before the state is restored so that no event is lost.
#[derive(Debug)]
pub struct Monitor {
    sock: UeventSocket,
    sysfs: Sysfs,
}

/// A running monitor thread; stopped (and joined) on drop.
#[derive(Debug)]
pub struct MonitorHandle {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MonitorHandle {
    /// Stops the monitor and waits for its thread.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MonitorHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How often the monitor looks at its stop flag.
const TICK: Duration = Duration::from_millis(200);
/// How soon a decision skipped because the volume was busy is retried.
const RETRY: Duration = Duration::from_secs(1);
/// A full reconcile runs at least this often even without events: a backing that fails
/// without the kernel saying so (a loop device whose file became unreachable) is seen.
const RESCAN: Duration = Duration::from_secs(5);

impl Monitor {
    /// Opens the kernel uevent socket: events queue from now on.
    pub fn open() -> std::io::Result<Monitor> {
        Ok(Monitor {
            sock: UeventSocket::open()?,
            sysfs: Sysfs::default(),
        })
    }

    /// Starts processing: the events queued since [`Monitor::open`] first, then a full
    /// reconcile, then every event as it comes. Call after the state is restored.
    pub fn start(self, driver: Arc<dyn HotplugHost>) -> std::io::Result<MonitorHandle> {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("vmblk-hotplug".into())
            .spawn(move || self.run(&driver, &s2))?;
        Ok(MonitorHandle {
            stop,
            thread: Some(thread),
        })
    }

    fn run(self, driver: &Arc<dyn HotplugHost>, stop: &AtomicBool) {
        tracing::info!("hotplug monitor running");
        let mut retry_at: Option<Instant> = None;
        let mut last_pass = Instant::now();
        let mut first = true;
        while !stop.load(Ordering::SeqCst) {
            let ready = first
                || match self.sock.wait(TICK) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "polling the uevent socket");
                        std::thread::sleep(TICK);
                        false
                    }
                };
            let mut prefer = Vec::new();
            let mut due = first
                || retry_at.is_some_and(|t| Instant::now() >= t)
                || last_pass.elapsed() >= RESCAN;
            first = false;
            if ready {
                let batch = self.sock.drain();
                if batch.overflowed {
                    tracing::warn!("uevent socket overflowed: rescanning every device");
                    due = true;
                }
                for props in &batch.events {
                    let Some(ev) = Uevent::from_pairs(props.iter().map(|(k, v)| (k, v))) else {
                        continue;
                    };
                    if ev.subsystem != "block" {
                        continue;
                    }
                    tracing::debug!(action = ?ev.action, device = ev.name(), diskseq = ?ev.diskseq, "uevent");
                    driver.taints().apply(&ev);
                    if matches!(ev.action, UeventAction::Add | UeventAction::Change) {
                        prefer.push(ev.name().to_owned());
                    }
                    due = true;
                }
            }
            if due {
                last_pass = Instant::now();
                let deferred = self.reconcile_once(driver, &prefer);
                retry_at = deferred.then(|| Instant::now() + RETRY);
            }
        }
        tracing::info!("hotplug monitor stopped");
    }

    /// One reconcile pass; returns whether a decision was deferred (volume busy).
    fn reconcile_once(&self, driver: &Arc<dyn HotplugHost>, prefer: &[String]) -> bool {
        let present = match self.sysfs.block_devs() {
            Ok(p) => driver.taints().filter(p),
            Err(e) => {
                tracing::error!(error = %e, "listing block devices");
                return true;
            }
        };
        let tracked = driver.tracked(&self.sysfs);
        let mut deferred = false;
        for d in reconcile(&tracked, &present, prefer) {
            deferred |= !driver.apply(&d, &self.sysfs);
        }
        deferred
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `change` uevent as the kernel sends it when a loop device gets a backing file.
    const LOOP_CHANGE: &[u8] = b"change@/devices/virtual/block/loop7\0ACTION=change\0\
DEVPATH=/devices/virtual/block/loop7\0SUBSYSTEM=block\0MAJOR=7\0MINOR=7\0DEVNAME=loop7\0\
DEVTYPE=disk\0DISKSEQ=42\0SEQNUM=5301\0";

    #[test]
    fn parses_a_kernel_uevent_message() {
        let ev = Uevent::parse_kernel(LOOP_CHANGE).unwrap();
        assert_eq!(
            ev,
            Uevent {
                action: UeventAction::Change,
                devpath: "/devices/virtual/block/loop7".into(),
                subsystem: "block".into(),
                devname: Some("loop7".into()),
                devtype: Some("disk".into()),
                devnum: Some((7, 7)),
                diskseq: Some(42),
                seqnum: Some(5301),
            }
        );
        assert_eq!(ev.name(), "loop7");
    }

    #[test]
    fn parses_remove_and_partition_events_and_refuses_broken_ones() {
        let rm = Uevent::parse_kernel(
            b"remove@/devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1/nvme0n1p2\0\
ACTION=remove\0DEVPATH=/devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1/nvme0n1p2\0\
SUBSYSTEM=block\0DEVNAME=nvme0n1p2\0DEVTYPE=partition\0DISKSEQ=9\0PARTN=2\0SEQNUM=77\0\
MAJOR=259\0MINOR=2\0",
        )
        .unwrap();
        assert_eq!(rm.action, UeventAction::Remove);
        assert_eq!(rm.name(), "nvme0n1p2");
        assert_eq!(rm.devtype.as_deref(), Some("partition"));
        // Without DEVNAME the name comes from DEVPATH.
        let ev = Uevent::from_pairs([
            ("ACTION", "bind"),
            ("DEVPATH", "/devices/virtual/block/loop2"),
            ("SUBSYSTEM", "block"),
        ])
        .unwrap();
        assert_eq!(
            (ev.action.clone(), ev.name()),
            (UeventAction::Other("bind".into()), "loop2")
        );
        // Header and body disagree; no SUBSYSTEM; no header; garbage.
        assert!(Uevent::parse_kernel(
            b"add@/devices/virtual/block/loop1\0ACTION=remove\0DEVPATH=/devices/virtual/block/loop1\0SUBSYSTEM=block\0"
        )
        .is_none());
        assert!(Uevent::parse_kernel(
            b"add@/devices/virtual/block/loop1\0ACTION=add\0DEVPATH=/devices/virtual/block/loop1\0"
        )
        .is_none());
        assert!(Uevent::parse_kernel(b"ACTION=add\0DEVPATH=/x\0SUBSYSTEM=block\0").is_none());
        assert!(Uevent::parse_kernel(b"").is_none());
        assert!(Uevent::parse_kernel(b"libudev\0\xfe\xed\xca\xfe").is_none());
    }

    fn loop_id(ino: u64) -> DeviceIdentity {
        DeviceIdentity::Loop {
            backing_file: format!("/srv/disk{ino}.img").into(),
            backing_dev: 2049,
            backing_ino: ino,
            offset: 0,
        }
    }

    fn dev(name: &str, size: u64, id: Option<DeviceIdentity>) -> BlockDev {
        BlockDev {
            name: name.into(),
            devnode: PathBuf::from("/dev").join(name),
            devnum: 0,
            size_bytes: size,
            diskseq: Some(1),
            identity: id,
        }
    }

    fn tracked(current: Option<&str>, state: TrackedState) -> Tracked {
        Tracked {
            pool: "p".into(),
            volume: "v".into(),
            identity: loop_id(1),
            current: current.map(str::to_owned),
            size_bytes: 1 << 24,
            state,
        }
    }

    fn remove_reason(d: &[Decision]) -> Option<&str> {
        d.iter().find_map(|d| match d {
            Decision::Remove { reason, .. } => Some(reason.as_str()),
            _ => None,
        })
    }

    fn resumed_on(d: &[Decision]) -> Option<PathBuf> {
        d.iter().find_map(|d| match d {
            Decision::Resume { device, .. } => Some(device.clone()),
            _ => None,
        })
    }

    #[test]
    fn an_active_volume_whose_device_is_there_is_left_alone() {
        let t = [tracked(Some("loop3"), TrackedState::Active)];
        let present = [dev("loop3", 1 << 24, Some(loop_id(1)))];
        assert!(reconcile(&t, &present, &["loop3".into()]).is_empty());
    }

    #[test]
    fn a_vanished_device_is_removed() {
        let t = [tracked(Some("loop3"), TrackedState::Active)];
        let d = reconcile(&t, &[dev("loop4", 1 << 24, Some(loop_id(2)))], &[]);
        assert_eq!(d.len(), 1);
        assert_eq!(remove_reason(&d), Some("the backing device was removed"));
        let d = reconcile(&[tracked(None, TrackedState::Active)], &[], &[]);
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn a_device_without_medium_or_too_small_is_removed() {
        let t = [tracked(Some("loop3"), TrackedState::Active)];
        let d = reconcile(&t, &[dev("loop3", 0, None)], &[]);
        assert!(remove_reason(&d).unwrap().contains("no medium"), "{d:?}");
        let d = reconcile(&t, &[dev("loop3", 4096, Some(loop_id(1)))], &[]);
        assert!(remove_reason(&d).unwrap().contains("shrank"), "{d:?}");
        // Its backing file unreachable or deleted: no identity shown, but the device and
        // its size are there: left alone (its I/O decides).
        assert!(reconcile(&t, &[dev("loop3", 1 << 24, None)], &[]).is_empty());
    }

    #[test]
    fn a_different_device_at_the_same_path_is_not_taken_for_the_old_one() {
        // Active: loop3 now maps another file: removed, and nothing to resume on.
        let t = [tracked(Some("loop3"), TrackedState::Active)];
        let present = [dev("loop3", 1 << 24, Some(loop_id(2)))];
        let d = reconcile(&t, &present, &["loop3".into()]);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(
            remove_reason(&d).unwrap().contains("another device"),
            "{d:?}"
        );
        // Removed: a new device at the old path with another identity is ignored.
        let t = [tracked(Some("loop3"), TrackedState::Removed)];
        assert!(reconcile(&t, &present, &["loop3".into()]).is_empty());
        // So is a device with no identity at all.
        assert!(reconcile(&t, &[dev("loop3", 1 << 24, None)], &["loop3".into()]).is_empty());
    }

    #[test]
    fn a_removed_volume_resumes_where_its_device_reappears() {
        let t = [tracked(Some("loop3"), TrackedState::Removed)];
        let present = [
            dev("loop3", 0, None),
            dev("loop9", 1 << 24, Some(loop_id(1))),
        ];
        let d = reconcile(&t, &present, &["loop9".into()]);
        assert_eq!(
            d,
            vec![Decision::Resume {
                pool: "p".into(),
                volume: "v".into(),
                device: "/dev/loop9".into()
            }]
        );
        // Too small a device with the identity is not it.
        let small = [dev("loop9", 4096, Some(loop_id(1)))];
        assert!(reconcile(&t, &small, &[]).is_empty());
    }

    #[test]
    fn a_device_that_moved_is_removed_then_resumed_in_one_pass() {
        let t = [tracked(Some("loop3"), TrackedState::Active)];
        let present = [dev("loop5", 1 << 24, Some(loop_id(1)))];
        let d = reconcile(&t, &present, &[]);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(matches!(d[0], Decision::Remove { .. }));
        assert_eq!(resumed_on(&d), Some("/dev/loop5".into()));
    }

    #[test]
    fn the_device_that_just_appeared_is_preferred_and_the_choice_is_stable() {
        let t = [tracked(Some("loop3"), TrackedState::Removed)];
        let present = [
            dev("loop3", 1 << 24, Some(loop_id(1))),
            dev("loop6", 1 << 24, Some(loop_id(1))),
            dev("loop8", 1 << 24, Some(loop_id(1))),
        ];
        assert_eq!(
            resumed_on(&reconcile(&t, &present, &["loop8".into()])),
            Some("/dev/loop8".into())
        );
        // No hint: its own path first.
        assert_eq!(
            resumed_on(&reconcile(&t, &present, &[])),
            Some("/dev/loop3".into())
        );
    }

    #[test]
    fn a_missing_volume_starts_when_its_device_appears() {
        let t = [tracked(None, TrackedState::Missing)];
        assert!(reconcile(&t, &[], &[]).is_empty());
        let d = reconcile(&t, &[dev("loop2", 1 << 25, Some(loop_id(1)))], &[]);
        assert!(
            matches!(&d[..], [Decision::Start { device, .. }] if device == &PathBuf::from("/dev/loop2")),
            "{d:?}"
        );
    }

    #[test]
    fn taints_hide_a_removed_device_until_it_has_a_new_medium() {
        let taints = Taints::default();
        let ev = |action: &str, seq: &str| {
            Uevent::from_pairs([
                ("ACTION", action),
                ("DEVPATH", "/devices/virtual/block/loop3"),
                ("SUBSYSTEM", "block"),
                ("DEVNAME", "loop3"),
                ("DISKSEQ", seq),
            ])
            .unwrap()
        };
        let mut d = dev("loop3", 1 << 24, Some(loop_id(1)));
        d.diskseq = Some(10);
        taints.apply(&ev("remove", "10"));
        assert!(taints.filter(vec![d.clone()]).is_empty());
        // A change with the same medium keeps it hidden; a new medium shows it.
        taints.apply(&ev("change", "10"));
        assert!(taints.filter(vec![d.clone()]).is_empty());
        d.diskseq = Some(11);
        assert_eq!(taints.filter(vec![d.clone()]).len(), 1);
        taints.apply(&ev("change", "11"));
        d.diskseq = Some(10);
        assert_eq!(taints.filter(vec![d.clone()]).len(), 1);
        // Tainted without a sequence number: hidden until it is added again.
        taints.taint("loop3", None);
        assert!(taints.filter(vec![d.clone()]).is_empty());
        taints.apply(&ev("add", "12"));
        assert_eq!(taints.filter(vec![d]).len(), 1);
    }
}
