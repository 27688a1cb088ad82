//! Test harness: starts the real `vmblkd` binary on a temporary socket and state
//! directory, builds test images, and cleans up every process and loop device it made
//! (by PID and by device path, never by name).
#![allow(dead_code)]

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tonic::Code;
use vmblk_proto::v1 as pb;
use vmblkd::client::Client;

/// Image size of the test images.
pub const IMAGE_BYTES: u64 = 64 << 20;
/// Most time one call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(180);
/// Most time a daemon may take to start.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running vmblkd.
pub struct Daemon {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub config: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
    pub log: PathBuf,
    child: Option<Child>,
}

/// Options of [`Daemon::start`].
#[derive(Default, Clone)]
pub struct DaemonOpts {
    /// YAML configuration (None: no --config, so the embedded default).
    pub config: Option<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Extra arguments.
    pub args: Vec<String>,
}

impl Daemon {
    /// Starts vmblkd in `dir` (socket `dir/vmblkd.sock`, state `dir/state`).
    pub fn start(dir: &Path, opts: DaemonOpts) -> Daemon {
        let config = opts.config.map(|c| {
            let p = dir.join("vmblkd.yaml");
            fs::write(&p, c).unwrap();
            p
        });
        let mut d = Daemon {
            dir: dir.to_owned(),
            socket: dir.join("vmblkd.sock"),
            state_dir: dir.join("state"),
            config,
            env: opts.env,
            args: opts.args,
            log: dir.join("vmblkd.log"),
            child: None,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmblkd"));
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_dir);
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        cmd.args(&self.args);
        cmd.env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("starting vmblkd");
        let t0 = Instant::now();
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!("vmblkd exited at startup ({st}):\n{}", self.log_text());
            }
            assert!(
                t0.elapsed() < START_TIMEOUT,
                "vmblkd did not start:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A connected client.
    pub async fn client(&self) -> Client {
        vmblkd::client::connect(&self.socket)
            .await
            .expect("connecting")
    }

    /// Kills the daemon with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops with SIGTERM, waits (bounded), SIGKILL if needed.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
            panic!("vmblkd did not stop on SIGTERM");
        }
    }

    /// Starts it again with the same settings, replacing the environment.
    pub fn restart_with_env(&mut self, env: Vec<(String, String)>) {
        self.kill();
        self.env = env;
        self.spawn();
    }

    /// The PID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Asserts a call failed with `code`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code) {
    match r {
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
        Err(s) => assert_eq!(s.code(), code, "wrong code, message: {}", s.message()),
    }
}

/// Runs a command; panics with its output on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Test images, built once per test binary.
pub struct Images {
    _dir: tempfile::TempDir,
    /// Raw GPT disk (ESP + Linux partition), 512-byte sectors.
    pub raw: PathBuf,
    /// The same as qcow2.
    pub qcow2: PathBuf,
    /// An Incus unified tarball: metadata.yaml + rootfs.img (the qcow2).
    pub unified: PathBuf,
    /// A corrupt qcow2 file.
    pub garbage: PathBuf,
    /// The metadata tarball of the split form (rootfs: `qcow2`).
    pub metadata: PathBuf,
}

/// The test images.
pub fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(build_images)
}

fn build_images() -> Images {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let f = fs::File::create(&raw).unwrap();
    f.set_len(IMAGE_BYTES).unwrap();
    drop(f);
    run(Command::new("sgdisk")
        .args([
            "-n1:2048:+16M",
            "-t1:ef00",
            "-c1:esp",
            "-n2:0:0",
            "-t2:8300",
            "-c2:root",
        ])
        .arg(&raw));
    // Some data in both partitions, so copies have something to carry.
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&raw).unwrap();
        f.write_all_at(&[0xAB; 65536], 1 << 20).unwrap();
        f.write_all_at(b"VMBLK-ROOT-MARKER", 20 << 20).unwrap();
        f.write_all_at(&[0xCD; 1 << 20], 40 << 20).unwrap();
    }
    let qcow2 = dir.path().join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2));
    let tdir = dir.path().join("unified");
    fs::create_dir(&tdir).unwrap();
    fs::write(
        tdir.join("metadata.yaml"),
        "architecture: x86_64\ncreation_date: 1700000000\nproperties:\n  description: vmblk test\n",
    )
    .unwrap();
    fs::copy(&qcow2, tdir.join("rootfs.img")).unwrap();
    let unified = dir.path().join("unified.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&tdir)
        .arg("-cf")
        .arg(&unified)
        .args(["metadata.yaml", "rootfs.img"]));
    let metadata = dir.path().join("metadata.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&tdir)
        .arg("-cf")
        .arg(&metadata)
        .arg("metadata.yaml"));
    let garbage = dir.path().join("garbage.img");
    // qcow2 magic and version, then nonsense: a corrupt image.
    let mut g = b"QFI\xfb\x00\x00\x00\x03".to_vec();
    g.extend(std::iter::repeat_n(0xFFu8, 1 << 16));
    fs::write(&garbage, g).unwrap();
    Images {
        _dir: dir,
        raw,
        qcow2,
        unified,
        garbage,
        metadata,
    }
}

/// `sgdisk -v` on a volume reports no problems.
pub fn assert_gpt_clean(path: &Path) {
    let out = Command::new("sgdisk").arg("-v").arg(path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("No problems found"),
        "sgdisk -v {}:\n{text}",
        path.display()
    );
}

/// Bytes at `off` of `path`.
pub fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; len];
    fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    b
}

/// Files under `dir` (recursively) whose name starts with `.tmp-`.
pub fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(temp_files(&p));
        } else if e.file_name().to_string_lossy().starts_with(".tmp-") {
            out.push(p);
        }
    }
    out
}

/// Loop devices whose backing file is under `dir`.
pub fn loops_under(dir: &Path) -> Vec<String> {
    let out = Command::new("losetup")
        .args(["-l", "-n", "-O", "NAME,BACK-FILE"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(dir.to_str().unwrap()))
        .map(str::to_owned)
        .collect()
}

/// A create-from-image request.
pub fn image_request(pool: &str, name: &str, image: &Path, size: u64) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        pool: pool.into(),
        name: name.into(),
        size_bytes: size,
        origin: Some(pb::VolumeOrigin {
            source: Some(pb::volume_origin::Source::Image(pb::ImageFile {
                path: image.display().to_string(),
                metadata_path: String::new(),
            })),
        }),
        grow_last_partition: false,
    }
}

/// An empty-volume request.
/// CreateVolume of `name` in `pool` cloned from volume `from` (or its `snapshot`, if
/// not empty).
pub fn clone_request(
    pool: &str,
    name: &str,
    from: &str,
    snapshot: &str,
    size: u64,
) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        pool: pool.into(),
        name: name.into(),
        size_bytes: size,
        origin: Some(pb::VolumeOrigin {
            source: Some(pb::volume_origin::Source::Volume(pb::VolumeSource {
                name: from.into(),
                snapshot: snapshot.into(),
            })),
        }),
        grow_last_partition: false,
    }
}

pub fn empty_request(pool: &str, name: &str, size: u64) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        pool: pool.into(),
        name: name.into(),
        size_bytes: size,
        origin: None,
        grow_last_partition: false,
    }
}

/// Waits (bounded) until `path` exists.
pub fn wait_for_file(path: &Path, timeout: Duration, what: &Daemon) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(
            t0.elapsed() < timeout,
            "{} did not appear:\n{}",
            path.display(),
            what.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The exclusive lock that serializes tests using loop devices across the workspace.
pub struct LoopLock(#[allow(dead_code)] nix::fcntl::Flock<fs::File>);

/// Takes /tmp/vmblk-loop-tests.lock; fails (not skips) when not root.
pub fn loop_lock() -> LoopLock {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (loop devices)"
    );
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/vmblk-loop-tests.lock")
        .unwrap();
    LoopLock(
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .unwrap(),
    )
}

/// A loop device over a sparse file, detached (by its path) on drop.
pub struct Loop {
    pub dev: PathBuf,
}

impl Loop {
    /// Attaches `file` with `sector_size`.
    pub fn attach(file: &Path, sector_size: u32) -> Loop {
        let out = run(Command::new("losetup")
            .args(["--show", "-f", "--sector-size", &sector_size.to_string()])
            .arg(file));
        Loop {
            dev: PathBuf::from(out.trim()),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A mount, unmounted on drop: retried for a few seconds while busy (a killed
/// process's io_uring releases its files asynchronously), lazily after that.
pub struct Mount {
    pub dir: PathBuf,
}

impl Drop for Mount {
    fn drop(&mut self) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            let ok = Command::new("umount")
                .arg(&self.dir)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "{}: still busy after 5 s, unmounting lazily",
            self.dir.display()
        );
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Reads a child's whole output.
pub fn read_all(mut r: impl Read) -> String {
    let mut s = String::new();
    let _ = r.read_to_string(&mut s);
    s
}

/// The `vmblk` binary of this build (built by scripts/test.sh before the tests).
pub fn vmblk_bin() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
        Some(d) => workspace.join(d),
        None => workspace.join("target"),
    };
    let p = target.join("debug/vmblk");
    assert!(
        p.exists(),
        "{} is missing: build it first (scripts/test.sh does)",
        p.display()
    );
    p
}

// ---------------------------------------------------------- requests and pools

pub fn snap(pool: &str, volume: &str, name: &str) -> pb::CreateSnapshotRequest {
    pb::CreateSnapshotRequest {
        pool: pool.into(),
        volume: volume.into(),
        name: name.into(),
    }
}

pub fn restore(pool: &str, name: &str) -> pb::RestoreSnapshotRequest {
    pb::RestoreSnapshotRequest {
        pool: pool.into(),
        name: name.into(),
    }
}

pub fn attach(pool: &str, name: &str) -> pb::AttachVolumeRequest {
    pb::AttachVolumeRequest {
        pool: pool.into(),
        name: name.into(),
        logical_block_size: 512,
        read_only: false,
        num_queues: 1,
        queue_size: 0,
        force: false,
    }
}

pub fn write(path: &Path, off: u64, byte: u8, len: usize) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![byte; len], off).unwrap();
    f.sync_all().unwrap();
}

/// A dir pool on a new file system of `fs` on a loop device, served by a daemon.
pub struct DirPool {
    pub daemon: Daemon,
    pub dir: PathBuf,
    _mount: Mount,
    _loop: Loop,
}

pub fn dir_pool(t: &Path, fs: &str) -> DirPool {
    let img = t.join(format!("{fs}.img"));
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let l = Loop::attach(&img, 512);
    run(std::process::Command::new(format!("mkfs.{fs}"))
        .arg("-q")
        .arg(&l.dev));
    let mnt = t.join(format!("{fs}-mnt"));
    std::fs::create_dir_all(&mnt).unwrap();
    run(std::process::Command::new("mount").arg(&l.dev).arg(&mnt));
    let mount = Mount { dir: mnt.clone() };
    let dir = mnt.join("pool");
    let ddir = t.join(format!("{fs}-daemon"));
    std::fs::create_dir_all(&ddir).unwrap();
    let daemon = Daemon::start(
        &ddir,
        DaemonOpts {
            config: Some(format!(
                "pools:\n  - name: p\n    type: dir\n    path: {}\n",
                dir.display()
            )),
            ..DaemonOpts::default()
        },
    );
    DirPool {
        daemon,
        dir,
        _mount: mount,
        _loop: l,
    }
}
