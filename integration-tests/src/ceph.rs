//! A throwaway one-node Ceph cluster (Debian 12's Ceph 16.2 Pacific) that a test starts
//! itself: one `ceph-mon`, one `ceph-osd` with BlueStore on a sparse file, and a pool
//! `vmblk` of size 1 with the `rbd` application enabled. Real Ceph, no mocks; for the
//! RBD tests (librbd, `qemu-img ... rbd:`, `qemu-storage-daemon --blockdev driver=rbd`).
//!
//! ```text
//!  CephCluster::start()            everything in /tmp/vmblk-ceph-XXXXXX/ (removed on drop)
//!   ├─ ceph.conf, ceph.client.admin.keyring, mon.keyring, monmap, osd-secrets.json
//!   ├─ ceph-osd --mkfs (osd/ceph-0, block = 10 GiB sparse file) ─┐ in parallel with
//!   ├─ monmaptool, ceph-mon --mkfs, ceph-mon -f (ManagedProcess)  │ the mon's start
//!   ├─ ceph osd new, ceph osd pool create vmblk 8 ◄───────────────┘
//!   ├─ ceph-osd -f (ManagedProcess), wait until the mon has it up
//!   └─ rbd pool init vmblk  (application rbd; its I/O proves the pool serves requests)
//!  cluster.rbd(["create", ...]) / cluster.ceph([...])   -c ceph.conf --id admin --keyring ..
//!  cluster.rbd_spec("img")  ──> rbd:vmblk/img:conf=..:id=admin:keyring=..  (qemu-img, QEMU)
//!  stop_osd() / start_osd()    the cluster going away and coming back (same OSD and data)
//!  drop: OSD, then mon, killed by PID and reaped; the directory removed
//! ```
//!
//! Nothing goes to `/etc/ceph`, `/var/lib/ceph`, `/var/log/ceph` or `/run/ceph`: the
//! configuration points every path a daemon or client writes (data, keyrings, logs, the
//! cluster and audit logs, admin sockets, pid files, crash dumps) into the directory, and
//! every tool gets `-c <dir>/ceph.conf`. No systemd, no `ceph` user: the daemons run in
//! the foreground (`-f`) as children of the test, as root.
//!
//! Test settings (each one changes only how fast a one-node cluster comes up; measured
//! on a 2-core VM: ~1.7 s from nothing to a pool that serves I/O, of which the OSD's
//! mkfs ~0.5 s and its boot ~0.7 s):
//! - `osd pool default size = 1`, `mon allow pool size one`, `osd crush chooseleaf type
//!   = 0`: one OSD is enough for `active+clean`;
//! - `paxos propose interval = 0.1`: the mon commits map changes every 0.1 s, not 1 s;
//! - `ms bind msgr1 = false`: msgr2 only (`mon host = [v2:127.0.0.1:PORT]`);
//! - `bluestore fsck on mkfs = false`, `bdev aio poll ms = 10` (BlueStore's I/O thread
//!   polls every 250 ms by default, and each close of the block device waits for it),
//!   `osd op num shards = 1` (each shard costs ~0.3 s at OSD start): mkfs 2.5 s → 0.5 s,
//!   OSD boot 2.6 s → 0.7 s;
//! - `bluestore cache autotune = false`, `bluestore cache size = 128 MiB`: bounded RSS.
//!
//! There is no `ceph-mgr`: RBD does not need one; `ceph -s` shows no PG statistics and
//! `ceph pg ...`/`rbd perf` do not answer. The client defaults `rados_osd_op_timeout` and
//! `rados_mon_op_timeout` are left unset (0: wait forever, as in production); a test
//! that stops the OSD bounds its own clients (`--rados-osd-op-timeout 5`, or
//! `:rados_osd_op_timeout=5` in an `rbd:` spec).
//!
//! Only one cluster runs at a time: [`CephCluster::start`] takes [`CEPH_TESTS_LOCK`] and
//! holds it until the cluster is dropped. A test that also needs
//! [`crate::loop_tests_lock`] takes that one first, then starts the cluster (one order
//! for every test, so two tests cannot wait for each other).
//!
//! The daemons get SIGKILL when the thread that spawned them exits (PR_SET_PDEATHSIG, as
//! every [`ManagedProcess`]): start and drop a cluster in the test's own thread, and
//! call [`CephCluster::start_osd`] from a thread that outlives the OSD.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::lock::FileLock;
use crate::process::ManagedProcess;
use crate::util::{run, tail, wait_until};

/// Lock file held by every running [`CephCluster`]: one cluster at a time on a host.
pub const CEPH_TESTS_LOCK: &str = "/tmp/vmblk-ceph-tests.lock";

/// Longest time [`CephCluster::start`] takes before it gives up (and cleans up).
pub const CEPH_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest time [`CephCluster::start_osd`] / [`CephCluster::stop_osd`] take.
pub const CEPH_OSD_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest run of one `ceph`/`rbd` command started through the cluster; it is killed
/// (by PID) after that.
pub const CEPH_CLI_TIMEOUT: Duration = Duration::from_secs(120);

/// The RBD pool every cluster has.
pub const CEPH_POOL: &str = "vmblk";

/// Size of the OSD's block file (sparse: only what is written takes disk space).
pub const OSD_BLOCK_BYTES: u64 = 10 << 30;

/// The cephx user of every client command.
const CLIENT_ID: &str = "admin";

/// The only monitor's name and the only OSD's id.
const MON_ID: &str = "a";
const OSD_ID: u32 = 0;

/// Polling step of the waits for commands and the mon.
const POLL: Duration = Duration::from_millis(10);

/// Polling step of the wait for the OSD: until its init is done, each `status` on its
/// admin socket logs an error line in its log.
const OSD_POLL: Duration = Duration::from_millis(50);

/// How many lines of each daemon log an error or a failing test shows.
const LOG_TAIL: usize = 25;

/// A running one-node Ceph cluster in its own temporary directory.
#[derive(Debug)]
pub struct CephCluster {
    // Drop order after `Drop::drop` (which stops the daemons): the directory, then the
    // lock, so the next cluster never sees this one's processes or files.
    osd: Option<ManagedProcess>,
    mon: Option<ManagedProcess>,
    mon_addr: SocketAddr,
    fsid: String,
    osd_uuid: String,
    osd_starts: u32,
    mon_starts: u32,
    commands: AtomicU32,
    started_in: Duration,
    dir: tempfile::TempDir,
    _lock: FileLock,
}

impl CephCluster {
    /// Starts the monitor and the OSD in a new temporary directory, creates pool
    /// [`CEPH_POOL`] (application `rbd`) and returns once the pool serves I/O. Fails
    /// after [`CEPH_START_TIMEOUT`] with the tails of the daemon logs; whatever it
    /// started by then is stopped and the directory removed.
    ///
    /// Blocks while another cluster runs (see [`CEPH_TESTS_LOCK`]).
    pub fn start() -> Result<CephCluster> {
        let lock = FileLock::exclusive(Path::new(CEPH_TESTS_LOCK))?;
        let t0 = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("vmblk-ceph-")
            .tempdir()
            .context("creating the Ceph cluster's directory")?;
        let shown = dir.path().display().to_string();
        // rbd: specs separate their options with ':'.
        if shown.contains(':') || shown.contains('@') {
            bail!("the temporary directory {shown} contains ':' or '@' (set TMPDIR)");
        }
        let mut cluster = CephCluster {
            osd: None,
            mon: None,
            mon_addr: free_local_port()?,
            fsid: new_uuid()?,
            osd_uuid: new_uuid()?,
            osd_starts: 0,
            mon_starts: 1,
            commands: AtomicU32::new(0),
            started_in: Duration::ZERO,
            dir,
            _lock: lock,
        };
        let deadline = t0 + CEPH_START_TIMEOUT;
        if let Err(e) = cluster.bootstrap(deadline) {
            let logs = cluster.log_tails();
            // Dropping it stops what was started and removes the directory.
            drop(cluster);
            bail!(
                "starting a Ceph cluster in {shown} failed after {:.1?}: {e:#}\n{logs}",
                t0.elapsed()
            );
        }
        cluster.started_in = t0.elapsed();
        tracing::info!(dir = %shown, took = ?cluster.started_in, "ceph cluster started");
        Ok(cluster)
    }

    /// The whole start sequence (see the module doc).
    fn bootstrap(&mut self, deadline: Instant) -> Result<()> {
        let d = self.dir.path().to_owned();
        for sub in ["mon", "osd/ceph-0", "run", "log", "crash", "cmd"] {
            std::fs::create_dir_all(d.join(sub))
                .with_context(|| format!("creating {}", d.join(sub).display()))?;
        }
        std::fs::write(self.conf_path(), self.conf_text()).context("writing ceph.conf")?;

        // osd.0's key first, then the OSD's mkfs: it needs neither the mon nor its id in
        // the osdmap (--no-mon-config, fsid from ceph.conf), so it runs while the mon
        // is set up and started.
        let osd_name = format!("osd.{OSD_ID}");
        let osd_keyring = self.osd_data().join("keyring");
        authtool(&[
            "--create-keyring",
            path_str(&osd_keyring)?,
            "--gen-key",
            "-n",
            &osd_name,
        ])?;
        let mut mkfs_cmd = Command::new("ceph-osd");
        mkfs_cmd
            .arg("-c")
            .arg(self.conf_path())
            .args(["-i", &OSD_ID.to_string(), "--mkfs", "--no-mon-config"])
            .args(["--osd-uuid", &self.osd_uuid]);
        let mut mkfs = ManagedProcess::spawn("osd-mkfs", mkfs_cmd, &d.join("log"))?;

        // The mon's keyring, with client.admin's imported (the mon knows admin from its
        // mkfs on); osd.0's key goes to `ceph osd new`.
        let mon_keyring = d.join("mon.keyring");
        let admin = self.keyring_path();
        authtool(&[
            "--create-keyring",
            path_str(&mon_keyring)?,
            "--gen-key",
            "-n",
            "mon.",
            "--cap",
            "mon",
            "allow *",
        ])?;
        authtool(&[
            "--create-keyring",
            path_str(&admin)?,
            "--gen-key",
            "-n",
            &format!("client.{CLIENT_ID}"),
            "--cap",
            "mon",
            "allow *",
            "--cap",
            "osd",
            "allow *",
            "--cap",
            "mgr",
            "allow *",
        ])?;
        authtool(&[
            path_str(&mon_keyring)?,
            "--import-keyring",
            path_str(&admin)?,
        ])?;
        let osd_key = authtool(&["-p", "-n", &osd_name, path_str(&osd_keyring)?])?;
        let secrets = d.join("osd-secrets.json");
        std::fs::write(
            &secrets,
            serde_json::json!({ "cephx_secret": osd_key.trim() }).to_string(),
        )?;

        let monmap = d.join("monmap");
        run(Command::new("monmaptool")
            .args(["--create", "--fsid", &self.fsid, "--addv", MON_ID])
            .arg(format!("[v2:{}]", self.mon_addr))
            .arg(&monmap))?;
        run(Command::new("ceph-mon")
            .arg("-c")
            .arg(self.conf_path())
            .args(["--mkfs", "-i", MON_ID, "--monmap"])
            .arg(&monmap)
            .arg("--keyring")
            .arg(&mon_keyring))?;
        let mut cmd = Command::new("ceph-mon");
        cmd.arg("-c")
            .arg(self.conf_path())
            .args(["-i", MON_ID, "-f"]);
        self.mon = Some(ManagedProcess::spawn("mon", cmd, &d.join("log"))?);
        self.wait_mon_leader(deadline)?;

        // Two independent mon commands (~0.3 s of Python each), side by side.
        let id = OSD_ID.to_string();
        let new_osd = self.spawn_client(
            "ceph",
            &["osd", "new", &self.osd_uuid, &id, "-i", path_str(&secrets)?],
        )?;
        let pool = self.spawn_client(
            "ceph",
            &["osd", "pool", "create", CEPH_POOL, "8", "8", "replicated"],
        )?;
        let got = self.finish(new_osd, remaining(deadline)?)?;
        if got.trim() != id {
            bail!(
                "ceph osd new gave the OSD id {:?}, expected {id}",
                got.trim()
            );
        }
        self.finish(pool, remaining(deadline)?)?;

        match wait_exit(&mut mkfs, remaining(deadline)?)? {
            Some(st) if st.success() => {}
            Some(st) => bail!(
                "ceph-osd --mkfs failed ({st}):\n{}",
                tail(&mkfs.stderr(), LOG_TAIL)
            ),
            None => {
                mkfs.kill()?;
                bail!("ceph-osd --mkfs did not finish in time")
            }
        }

        self.spawn_osd()?;
        self.wait_osd_active(deadline)?;
        // Enables application rbd and does I/O on the pool: once it answers, the PGs
        // serve requests.
        self.rbd_bounded(&["pool", "init", CEPH_POOL], remaining(deadline)?)?;
        Ok(())
    }

    /// ceph.conf: everything in the directory, and the test settings of the module doc.
    fn conf_text(&self) -> String {
        let d = self.dir.path().display();
        format!(
            "# vmblk test cluster (integration-tests/src/ceph.rs): one mon, one OSD,\n\
             # every file in {d}.\n\
             [global]\n\
             fsid = {fsid}\n\
             mon host = [v2:{mon}]\n\
             mon initial members = {MON_ID}\n\
             public addr = 127.0.0.1\n\
             ms bind msgr1 = false\n\
             ms bind ipv6 = false\n\
             auth allow insecure global id reclaim = false\n\
             run dir = {d}/run\n\
             crash dir = {d}/crash\n\
             keyring = {d}/$cluster.$name.keyring\n\
             mon cluster log file = {d}/log/$cluster.$channel.log\n\
             osd pool default size = 1\n\
             osd pool default min size = 1\n\
             osd pool default pg autoscale mode = off\n\
             osd crush chooseleaf type = 0\n\
             mon allow pool size one = true\n\
             mon allow pool delete = true\n\
             mon warn on pool no redundancy = false\n\
             # /tmp may be fuller than the mon's default 30 % (warn) / 5 % (shut down).\n\
             mon data avail warn = 1\n\
             mon data avail crit = 0\n\
             paxos propose interval = 0.1\n\
             \n\
             [mon]\n\
             mon data = {d}/mon/$cluster-$id\n\
             log file = {d}/log/$cluster-$name.log\n\
             admin socket = {d}/run/$cluster-$name.asok\n\
             pid file = {d}/run/$cluster-$name.pid\n\
             \n\
             [osd]\n\
             osd data = {d}/osd/$cluster-$id\n\
             osd journal = {d}/osd/$cluster-$id/journal\n\
             keyring = {d}/osd/$cluster-$id/keyring\n\
             log file = {d}/log/$cluster-$name.log\n\
             admin socket = {d}/run/$cluster-$name.asok\n\
             pid file = {d}/run/$cluster-$name.pid\n\
             osd objectstore = bluestore\n\
             bluestore block create = true\n\
             bluestore block size = {OSD_BLOCK_BYTES}\n\
             bluestore fsck on mkfs = false\n\
             bdev aio poll ms = 10\n\
             osd op num shards = 1\n\
             osd op num threads per shard = 2\n\
             bluestore cache autotune = false\n\
             bluestore cache size = {cache}\n\
             \n\
             [client]\n\
             # One log and admin socket per client process (rbd, qemu-img, QEMU, ...).\n\
             log file = {d}/log/$cluster-$name.$pid.log\n\
             admin socket = {d}/run/$cluster-$name.$pid.asok\n",
            fsid = self.fsid,
            mon = self.mon_addr,
            cache = 128u64 << 20,
        )
    }

    /// Waits until the mon answers on its admin socket as the (only) quorum's leader.
    fn wait_mon_leader(&mut self, deadline: Instant) -> Result<()> {
        let asok = self.dir.path().join(format!("run/ceph-mon.{MON_ID}.asok"));
        let port = self.mon_addr.port();
        let mon = self.mon.as_mut().context("no mon")?;
        let mut last = String::new();
        let up = wait_until(remaining(deadline)?, POLL, || {
            if let Some(st) = mon.try_wait()? {
                bail!(
                    "ceph-mon exited at startup ({st}) (port {port} taken?): {}",
                    tail(&mon.stderr(), LOG_TAIL)
                );
            }
            match admin_socket(&asok, "mon_status") {
                Ok(v) => {
                    last = v["state"].to_string();
                    Ok((v["state"] == "leader").then_some(()))
                }
                Err(e) => {
                    last = format!("{e:#}");
                    Ok(None)
                }
            }
        })?;
        if up.is_none() {
            bail!("ceph-mon did not become leader (last: {last})");
        }
        Ok(())
    }

    /// Starts `ceph-osd -f` on the existing OSD data.
    fn spawn_osd(&mut self) -> Result<()> {
        self.osd_starts += 1;
        let name = match self.osd_starts {
            1 => "osd".to_owned(),
            n => format!("osd-{n}"),
        };
        let mut cmd = Command::new("ceph-osd");
        cmd.arg("-c")
            .arg(self.conf_path())
            .args(["-i", &OSD_ID.to_string(), "-f"]);
        self.osd = Some(ManagedProcess::spawn(
            &name,
            cmd,
            &self.dir.path().join("log"),
        )?);
        Ok(())
    }

    /// Whether the mon's osdmap has the OSD up.
    fn osd_up_in_map(&self, timeout: Duration) -> Result<bool> {
        let out = self.ceph_bounded(&["osd", "dump", "--format", "json"], timeout)?;
        let v: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("parsing osd dump: {out}"))?;
        let osd = v["osds"]
            .as_array()
            .and_then(|a| a.iter().find(|o| o["osd"] == OSD_ID))
            .with_context(|| format!("osd.{OSD_ID} is not in the osdmap: {out}"))?;
        Ok(osd["up"] == 1)
    }

    /// Waits until the OSD says (on its admin socket) it is `active`: the mon has
    /// committed an osdmap with it up, and it has that map. Fails as soon as the OSD
    /// process exits.
    fn wait_osd_active(&mut self, deadline: Instant) -> Result<()> {
        let asok = self.dir.path().join(format!("run/ceph-osd.{OSD_ID}.asok"));
        let osd = self.osd.as_mut().context("the OSD is not running")?;
        let mut last = String::new();
        let up = wait_until(remaining(deadline)?, OSD_POLL, || {
            if let Some(st) = osd.try_wait()? {
                bail!(
                    "ceph-osd exited at startup ({st}): {}",
                    tail(&osd.stderr(), LOG_TAIL)
                );
            }
            match admin_socket(&asok, "status") {
                Ok(v) => {
                    last = v["state"].to_string();
                    Ok((v["state"] == "active").then_some(()))
                }
                Err(e) => {
                    last = format!("{e:#}");
                    Ok(None)
                }
            }
        })?;
        if up.is_none() {
            bail!("osd.{OSD_ID} did not become active (last state: {last})");
        }
        Ok(())
    }

    /// Waits until the mon's osdmap has the OSD down.
    fn wait_osd_down(&self, deadline: Instant) -> Result<()> {
        let r = wait_until(remaining(deadline)?, Duration::from_millis(100), || {
            let t = remaining(deadline)?.min(Duration::from_secs(30));
            Ok((!self.osd_up_in_map(t)?).then_some(()))
        })?;
        if r.is_none() {
            bail!("osd.{OSD_ID} is still up in the osdmap");
        }
        Ok(())
    }

    /// Stops the OSD (SIGTERM: it tells the mon it goes down; SIGKILL after 10 s) and
    /// waits until the mon has it down. Clients then get no answer for I/O on the pool
    /// (they wait, or time out after their `rados_osd_op_timeout`). The mon keeps
    /// running.
    pub fn stop_osd(&mut self) -> Result<()> {
        let deadline = Instant::now() + CEPH_OSD_TIMEOUT;
        let mut osd = self.osd.take().context("the OSD is not running")?;
        osd.terminate(Duration::from_secs(10))?;
        // A SIGKILLed OSD could not say goodbye: mark it down ourselves.
        if self.osd_up_in_map(remaining(deadline)?)? {
            self.ceph_bounded(&["osd", "down", &OSD_ID.to_string()], remaining(deadline)?)?;
        }
        self.wait_osd_down(deadline)
            .context("after stopping the OSD")?;
        tracing::info!(pid = osd.pid(), "ceph osd stopped");
        Ok(())
    }

    /// Starts the OSD again (same id and data) and waits until it is up and the pool
    /// serves I/O again; returns how long that took. Bounded by [`CEPH_OSD_TIMEOUT`].
    pub fn start_osd(&mut self) -> Result<Duration> {
        if self.osd.is_some() {
            bail!("the OSD is already running");
        }
        let t0 = Instant::now();
        let deadline = t0 + CEPH_OSD_TIMEOUT;
        let r = (|| {
            self.spawn_osd()?;
            self.wait_osd_active(deadline)?;
            // A read of the pool's directory object: answered once its PG is active.
            self.rbd_bounded(&["ls", "-p", CEPH_POOL], remaining(deadline)?)
        })();
        if let Err(e) = r {
            bail!(
                "restarting the OSD failed after {:.1?}: {e:#}\n{}",
                t0.elapsed(),
                self.log_tails()
            );
        }
        Ok(t0.elapsed())
    }

    /// Stops the monitor (SIGTERM, SIGKILL after 10 s): the cluster is down for every
    /// client (connects time out; I/O to the OSD goes on until a map is needed).
    pub fn stop_mon(&mut self) -> Result<()> {
        let mut mon = self.mon.take().context("the mon is not running")?;
        mon.terminate(Duration::from_secs(10))?;
        tracing::info!(pid = mon.pid(), "ceph mon stopped");
        Ok(())
    }

    /// Starts the monitor again (same data and address) and waits until it leads its
    /// quorum again; returns how long that took.
    pub fn start_mon(&mut self) -> Result<Duration> {
        if self.mon.is_some() {
            bail!("the mon is already running");
        }
        let t0 = Instant::now();
        let deadline = t0 + CEPH_OSD_TIMEOUT;
        let mut cmd = Command::new("ceph-mon");
        cmd.arg("-c")
            .arg(self.conf_path())
            .args(["-i", MON_ID, "-f"]);
        self.mon_starts += 1;
        let name = format!("mon-{}", self.mon_starts);
        self.mon = Some(ManagedProcess::spawn(
            &name,
            cmd,
            &self.dir.path().join("log"),
        )?);
        self.wait_mon_leader(deadline)?;
        Ok(t0.elapsed())
    }

    /// Stops the OSD, then the mon (SIGKILL by PID, reaped), and removes the directory.
    /// The same happens on drop; this one reports errors.
    pub fn stop(mut self) -> Result<()> {
        self.kill_daemons()?;
        let dir = self.dir.path().to_owned();
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        Ok(())
    }

    /// SIGKILL to the OSD, then to the mon; each is reaped before the next.
    fn kill_daemons(&mut self) -> Result<()> {
        if let Some(mut osd) = self.osd.take() {
            osd.kill()?;
        }
        if let Some(mut mon) = self.mon.take() {
            mon.kill()?;
        }
        Ok(())
    }

    /// The cluster's configuration file: every client tool takes it with `-c`.
    pub fn conf_path(&self) -> PathBuf {
        self.dir.path().join("ceph.conf")
    }

    /// The keyring of `client.admin` (also found through ceph.conf's `keyring`).
    pub fn keyring_path(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("ceph.client.{CLIENT_ID}.keyring"))
    }

    /// The cephx user of the clients: `admin` (as `--id admin`, `id=admin`, `user=admin`).
    pub fn client_id(&self) -> &'static str {
        CLIENT_ID
    }

    /// The RBD pool: [`CEPH_POOL`].
    pub fn pool(&self) -> &'static str {
        CEPH_POOL
    }

    /// The cluster's directory (conf, keyrings, daemon data, `log/`, `run/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The monitor's address (msgr2 only; ceph.conf has `mon host = [v2:ADDR]`).
    pub fn mon_addr(&self) -> SocketAddr {
        self.mon_addr
    }

    /// The cluster's fsid.
    pub fn fsid(&self) -> &str {
        &self.fsid
    }

    /// The mon's PID, while it runs.
    pub fn mon_pid(&self) -> Option<u32> {
        self.mon.as_ref().map(ManagedProcess::pid)
    }

    /// The OSD's PID, while it runs.
    pub fn osd_pid(&self) -> Option<u32> {
        self.osd.as_ref().map(ManagedProcess::pid)
    }

    /// How long [`CephCluster::start`] took (to a pool that serves I/O).
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The QEMU / qemu-img form of `image` in the pool:
    /// `rbd:vmblk/IMAGE:conf=PATH:id=admin:keyring=PATH`. Further Ceph options can be
    /// appended as `:key=value` (e.g. `:rados_osd_op_timeout=5`).
    pub fn rbd_spec(&self, image: &str) -> String {
        format!(
            "rbd:{}/{image}:conf={}:id={CLIENT_ID}:keyring={}",
            CEPH_POOL,
            self.conf_path().display(),
            self.keyring_path().display()
        )
    }

    /// The same image as QEMU block options (`--blockdev`, `qemu-img --image-opts`):
    /// `driver=rbd,pool=vmblk,image=IMAGE,conf=PATH,user=admin`. The driver has no
    /// keyring option; librbd finds the keyring through ceph.conf's `keyring`.
    pub fn blockdev_opts(&self, image: &str) -> String {
        format!(
            "driver=rbd,pool={CEPH_POOL},image={image},conf={},user={CLIENT_ID}",
            self.conf_path().display()
        )
    }

    /// The options every client tool gets: `-c CONF --id admin --keyring KEYRING`.
    pub fn client_args(&self) -> Vec<String> {
        vec![
            "-c".into(),
            self.conf_path().display().to_string(),
            "--id".into(),
            CLIENT_ID.into(),
            "--keyring".into(),
            self.keyring_path().display().to_string(),
        ]
    }

    /// Runs `rbd -c CONF --id admin --keyring KEYRING ARGS` (killed after
    /// [`CEPH_CLI_TIMEOUT`]); returns its standard output, or an error naming the
    /// command and its standard error.
    pub fn rbd(&self, args: &[&str]) -> Result<String> {
        self.rbd_bounded(args, CEPH_CLI_TIMEOUT)
    }

    /// Runs `ceph -c CONF --id admin --keyring KEYRING ARGS`, as [`CephCluster::rbd`].
    pub fn ceph(&self, args: &[&str]) -> Result<String> {
        self.ceph_bounded(args, CEPH_CLI_TIMEOUT)
    }

    /// Runs the client tool `program` (`rbd`, `ceph`, `rados`, ...) with
    /// [`CephCluster::client_args`] and `args`, killed after `timeout`.
    pub fn client_tool(&self, program: &str, args: &[&str], timeout: Duration) -> Result<String> {
        let p = self.spawn_client(program, args)?;
        self.finish(p, timeout)
    }

    fn rbd_bounded(&self, args: &[&str], timeout: Duration) -> Result<String> {
        self.client_tool("rbd", args, timeout)
    }

    fn ceph_bounded(&self, args: &[&str], timeout: Duration) -> Result<String> {
        self.client_tool("ceph", args, timeout)
    }

    /// Starts a client tool as a [`ManagedProcess`] with its output in `cmd/`.
    fn spawn_client(&self, program: &str, args: &[&str]) -> Result<Running> {
        let mut cmd = Command::new(program);
        cmd.args(self.client_args()).args(args);
        let shown = format!("{cmd:?}");
        let n = self.commands.fetch_add(1, Ordering::Relaxed);
        let name = format!("{n:03}-{program}");
        let proc = ManagedProcess::spawn(&name, cmd, &self.dir.path().join("cmd"))?;
        Ok(Running { proc, shown })
    }

    /// Waits for a client tool (killed after `timeout`); returns its stdout, or an
    /// error naming the command with its output.
    fn finish(&self, r: Running, timeout: Duration) -> Result<String> {
        let Running { mut proc, shown } = r;
        let status = wait_exit(&mut proc, timeout)?;
        if status.is_none() {
            proc.kill()?;
        }
        let stdout = std::fs::read(proc.stdout_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let stderr = proc.stderr();
        let _ = std::fs::remove_file(proc.stdout_path());
        let _ = std::fs::remove_file(proc.stderr_path());
        match status {
            Some(st) if st.success() => Ok(stdout),
            Some(st) => bail!("{shown} failed ({st}): {}{stdout}", stderr.trim_end()),
            None => bail!(
                "{shown} did not finish within {timeout:.1?} (killed): {}{stdout}",
                stderr.trim_end()
            ),
        }
    }

    fn osd_data(&self) -> PathBuf {
        self.dir.path().join(format!("osd/ceph-{OSD_ID}"))
    }

    /// The last lines of the mon's and the OSD's logs (and of their stderr).
    pub fn log_tails(&self) -> String {
        let log = self.dir.path().join("log");
        let mut out = String::new();
        let mut files: Vec<PathBuf> = vec![
            log.join(format!("ceph-mon.{MON_ID}.log")),
            log.join(format!("ceph-osd.{OSD_ID}.log")),
        ];
        if let Ok(rd) = std::fs::read_dir(&log) {
            let mut errs: Vec<PathBuf> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "stderr"))
                .collect();
            errs.sort();
            files.extend(errs);
        }
        for f in files {
            let Ok(text) = std::fs::read_to_string(&f) else {
                continue;
            };
            if text.trim().is_empty() {
                continue;
            }
            let _ = writeln!(
                out,
                "---- {} (tail) ----\n{}",
                f.display(),
                tail(&text, LOG_TAIL)
            );
        }
        out
    }
}

impl Drop for CephCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails());
        }
        if let Err(e) = self.kill_daemons() {
            tracing::warn!("ceph teardown: {e:#}");
        }
        // The TempDir field removes the directory, then the lock is released.
    }
}

/// A client tool started by [`CephCluster::spawn_client`].
#[derive(Debug)]
struct Running {
    proc: ManagedProcess,
    shown: String,
}

/// Waits at most `timeout` for `p` to exit, polling every [`POLL`] (finer than
/// [`ManagedProcess::wait_timeout`]: the start runs a dozen short commands).
fn wait_exit(p: &mut ManagedProcess, timeout: Duration) -> Result<Option<ExitStatus>> {
    wait_until(timeout, POLL, || p.try_wait())
}

/// Runs `ceph-authtool ARGS` (local, quick); returns its stdout.
fn authtool(args: &[&str]) -> Result<String> {
    run(Command::new("ceph-authtool").args(args))
}

/// Sends `{"prefix": COMMAND}` to a daemon's admin socket and parses the JSON answer
/// (the protocol of `ceph daemon`: the request ends with a NUL; the answer is a
/// big-endian u32 length and that many bytes).
fn admin_socket(path: &Path, command: &str) -> Result<serde_json::Value> {
    let mut s =
        UnixStream::connect(path).with_context(|| format!("connecting to {}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let req = serde_json::json!({ "prefix": command }).to_string();
    s.write_all(req.as_bytes())?;
    s.write_all(b"\0")?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len)
        .context("reading the answer's length")?;
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).context("reading the answer")?;
    serde_json::from_slice(&buf).with_context(|| {
        format!(
            "parsing the answer to {command}: {}",
            String::from_utf8_lossy(&buf)
        )
    })
}

/// Time left until `deadline`; an error once it has passed.
fn remaining(deadline: Instant) -> Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        bail!("timed out");
    }
    Ok(left)
}

/// A random UUID from the kernel.
fn new_uuid() -> Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .context("reading /proc/sys/kernel/random/uuid")?
        .trim()
        .to_owned())
}

/// A TCP port on 127.0.0.1 that is free now (the kernel's choice).
fn free_local_port() -> Result<SocketAddr> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(l.local_addr()?)
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}
