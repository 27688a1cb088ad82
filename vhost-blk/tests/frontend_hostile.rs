//! A raw vhost-user frontend (the vhost crate's `Frontend`, memfd guest memory) sends
//! hostile descriptor chains through the socket: each gets its answer, the export keeps
//! serving, and a reconnecting frontend finds the data and a working queue.

use std::sync::atomic::{fence, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use vhost_blk::{Export, ExportConfig, StopHandle};

const MEM: usize = 8 << 20;
const QSIZE: u16 = 256;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x10000;
const STATUS: u64 = 0x11000;
const DATA: u64 = 0x20000;
const INDIRECT: u64 = 0x18000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

struct Server {
    stop: StopHandle,
    thread: Option<JoinHandle<()>>,
    export: Arc<Export>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(t.join().is_ok());
            });
            let joined = rx.recv_timeout(Duration::from_secs(20));
            if !std::thread::panicking() {
                assert_eq!(joined, Ok(true), "export thread did not stop in time");
            }
        }
    }
}

fn server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("vol");
    std::fs::File::create(&volume)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let export = Arc::new(
        Export::new(ExportConfig {
            volume,
            socket: dir.path().join("sock"),
            queue_size: QSIZE,
            serial: "hostile".into(),
            ..ExportConfig::default()
        })
        .unwrap(),
    );
    let stop = export.stop_handle();
    let e2 = export.clone();
    Server {
        stop,
        thread: Some(std::thread::spawn(move || e2.serve().unwrap())),
        export,
        _dir: dir,
    }
}

/// One frontend connection with one queue of QSIZE entries in memfd guest memory.
struct Guest {
    fe: Frontend,
    mem: GuestMemoryMmap<()>,
    kick: EventFd,
    _call: EventFd,
    host: u64,
    info: VhostUserMemoryRegionInfo,
    avail_idx: u16,
    used_seen: u16,
}

impl Guest {
    fn connect(s: &Server) -> Guest {
        let fd = nix::sys::memfd::memfd_create(c"guest", nix::sys::memfd::MemFdCreateFlag::empty())
            .unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(MEM as u64).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap();
        let region = mem.iter().next().unwrap();
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
        let host = info.userspace_addr;

        let mut fe = Frontend::connect(s.export.config().socket.clone(), 1).unwrap();
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        let pf = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(
            pf & (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK),
        )
        .unwrap();
        // Everything offered but EVENT_IDX, so every completion signals.
        fe.set_features(features & !(1 << 29)).unwrap();
        fe.set_mem_table(&[info]).unwrap();
        let kick = EventFd::new(0).unwrap();
        let call = EventFd::new(0).unwrap();
        let mut g = Guest {
            fe,
            mem,
            kick,
            _call: call,
            host,
            info,
            avail_idx: 0,
            used_seen: 0,
        };
        g.setup_ring();
        g
    }

    /// SET_VRING_NUM/ADDR/BASE/CALL/KICK/ENABLE for queue 0 over zeroed rings.
    fn setup_ring(&mut self) {
        self.mem
            .write_slice(&[0u8; 0x3000], GuestAddress(DESC))
            .unwrap();
        self.avail_idx = 0;
        self.used_seen = 0;
        let host = self.host;
        let fe = &mut self.fe;
        fe.set_vring_num(0, QSIZE).unwrap();
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: host + DESC,
                used_ring_addr: host + USED,
                avail_ring_addr: host + AVAIL,
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(0, 0).unwrap();
        fe.set_vring_call(0, &self._call).unwrap();
        fe.set_vring_kick(0, &self.kick).unwrap();
        fe.set_vring_enable(0, true).unwrap();
    }

    /// What QEMU does on a guest reboot: stop the ring, resend the memory table, and set
    /// the ring up again from index 0.
    fn reboot(&mut self) {
        self.fe.set_vring_enable(0, false).unwrap();
        self.fe.get_vring_base(0).unwrap();
        self.fe.set_mem_table(&[self.info]).unwrap();
        self.setup_ring();
    }
    fn desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(table + 16 * u64::from(i));
        self.mem.write_obj(addr, at).unwrap();
        self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    fn header(&self, t: u32, sector: u64) {
        self.mem.write_obj(t, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Makes `head` available, kicks, and waits (bounded) for its used element.
    fn submit(&mut self, head: u16) -> (u32, u8) {
        let slot = u64::from(self.avail_idx % QSIZE);
        self.mem
            .write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        self.kick.write(1).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let used: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
            if used != self.used_seen {
                assert_eq!(used, self.used_seen.wrapping_add(1));
                let e = USED + 4 + 8 * u64::from(self.used_seen % QSIZE);
                let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
                assert_eq!(id, u32::from(head));
                self.used_seen = used;
                let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
                return (len, status);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no used element within 10 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Header, one data buffer, status: a well-formed request.
    fn io(&mut self, t: u32, sector: u64, len: u32, write_data: bool) -> (u32, u8) {
        self.header(t, sector);
        let dflags = if write_data { F_WRITE } else { 0 };
        self.desc(DESC, 0, HDR, 16, F_NEXT, 1);
        self.desc(DESC, 1, DATA, len, dflags | F_NEXT, 2);
        self.desc(DESC, 2, STATUS, 1, F_WRITE, 0);
        self.submit(0)
    }
}

#[test]
fn hostile_chains_are_answered_and_the_export_keeps_serving() {
    let s = server();
    let mut g = Guest::connect(&s);

    // Config space through the socket: 1 MiB in 512-byte sectors, blk_size 512.
    let (_, cfg) =
        g.fe.get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
            .unwrap();
    assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), 2048);
    assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 512);

    // A good write.
    g.mem
        .write_slice(&[0x5a; 4096], GuestAddress(DATA))
        .unwrap();
    assert_eq!(g.io(1, 8, 4096, false), (1, 0));

    // No status descriptor: used length 0, status untouched.
    g.header(1, 0);
    g.desc(DESC, 0, HDR, 16, F_NEXT, 1);
    g.desc(DESC, 1, DATA, 512, 0, 0);
    assert_eq!(g.submit(0), (0, 0xff));

    // Descriptor loop.
    g.header(0, 0);
    g.desc(DESC, 0, HDR, 16, F_NEXT, 1);
    g.desc(DESC, 1, DATA, 512, F_WRITE | F_NEXT, 0);
    assert_eq!(g.submit(0), (0, 0xff));

    // Nested indirect table.
    g.header(0, 0);
    g.desc(INDIRECT, 0, INDIRECT + 0x100, 16, F_INDIRECT, 0);
    g.desc(DESC, 0, INDIRECT, 16, F_INDIRECT, 0);
    assert_eq!(g.submit(0), (0, 0xff));

    // Data buffer outside guest memory; sectors past the end; overflowing sector.
    g.header(0, 0);
    g.desc(DESC, 0, HDR, 16, F_NEXT, 1);
    g.desc(DESC, 1, (MEM as u64) + 4096, 512, F_WRITE | F_NEXT, 2);
    g.desc(DESC, 2, STATUS, 1, F_WRITE, 0);
    assert_eq!(g.submit(0), (1, 1));
    assert_eq!(g.io(0, 2048, 512, true), (1, 1));
    assert_eq!(g.io(1, u64::MAX, 512, false), (1, 1));
    // Wrong direction, bad length, unknown type.
    assert_eq!(g.io(0, 0, 512, false), (1, 1));
    assert_eq!(g.io(1, 0, 100, false), (1, 1));
    assert_eq!(g.io(99, 0, 512, true), (1, 2));

    // Still serving: the good write reads back.
    g.mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(g.io(0, 8, 4096, true), (4097, 0));
    let mut back = [0u8; 4096];
    g.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back.iter().all(|&b| b == 0x5a));

    // Disconnect without any cleanup (QEMU crash / reconnect=1), then a new frontend.
    drop(g);
    let mut g = Guest::connect(&s);
    assert_eq!(g.io(0, 8, 4096, true), (4097, 0));
    g.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back.iter().all(|&b| b == 0x5a));

    // Guest reboot on the same connection.
    g.reboot();
    g.mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(g.io(0, 8, 4096, true), (4097, 0));
    g.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back.iter().all(|&b| b == 0x5a));
    let m = s.export.metrics();
    assert_eq!(m.errors.malformed, 8);
    assert_eq!(m.errors.unsupported, 1);
}
