//! `vmblk volume ...` and `vmblk pool ...`: clients of vmblkd over its unix socket.
// Calls return tonic::Status, the gRPC error type, by value as tonic does.
#![allow(clippy::result_large_err)]

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use vmblk_proto::v1 as pb;
use vmblkd::client::{BlockingClient, Client};

/// How to reach vmblkd.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// vmblkd's gRPC socket.
    #[arg(long, global = true, default_value = vmblkd::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Print the result as JSON.
    #[arg(long, global = true)]
    pub json: bool,
}

/// `vmblk volume`.
#[derive(Debug, Args)]
pub struct VolumeArgs {
    /// Connection.
    #[command(flatten)]
    pub conn: Conn,
    /// What to do.
    #[command(subcommand)]
    pub cmd: VolumeCommand,
}

/// A volume by pool and name.
#[derive(Debug, Args)]
pub struct VolumeName {
    /// The volume's name.
    pub name: String,
    /// Its pool.
    #[arg(long, default_value = vmblkd::DEFAULT_POOL)]
    pub pool: String,
}

/// Volume subcommands.
#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume: empty, from an image file, from a cached image's fingerprint, or
    /// as a copy of another volume of the pool or of one of its snapshots.
    Create {
        /// The volume.
        #[command(flatten)]
        vol: VolumeName,
        /// Size (bytes, or with K/M/G/T suffix, binary); from an image: default its size.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Unpack this image (qcow2, raw, Incus tarball, or a split image's rootfs).
        #[arg(long, conflicts_with = "fingerprint")]
        image: Option<PathBuf>,
        /// The metadata tarball of a split Incus image.
        #[arg(long, requires = "image")]
        metadata: Option<PathBuf>,
        /// Clone the cached image with this fingerprint.
        #[arg(long, conflicts_with = "image")]
        fingerprint: Option<String>,
        /// Clone volume VOL of the same pool (detached), or its snapshot SNAP (VOL@SNAP).
        #[arg(long, value_name = "VOL[@SNAP]", conflicts_with_all = ["image", "fingerprint"])]
        from: Option<String>,
        /// Extend the last partition to the end of the volume.
        #[arg(long)]
        grow_last_partition: bool,
    },
    /// List volumes.
    List {
        /// Only this pool's.
        #[arg(long, default_value = "")]
        pool: String,
    },
    /// Show a volume.
    Get(VolumeName),
    /// Grow a volume (and move its backup GPT to the new end).
    Grow {
        /// The volume.
        #[command(flatten)]
        vol: VolumeName,
        /// The new size (bytes, or with K/M/G/T suffix).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Extend the last partition too.
        #[arg(long)]
        grow_last_partition: bool,
    },
    /// Rename a detached volume; its snapshots follow it.
    Rename {
        /// The volume.
        #[command(flatten)]
        vol: VolumeName,
        /// Its new name.
        new_name: String,
    },
    /// Write a volume (detached) or a snapshot of it (VOL@SNAP) as a compressed qcow2
    /// image on the daemon's host.
    Publish {
        /// VOL or VOL@SNAP.
        #[arg(value_name = "VOL[@SNAP]")]
        source: String,
        /// The image to write (absolute, must not exist).
        image: PathBuf,
        /// The pool.
        #[arg(long, default_value = vmblkd::DEFAULT_POOL)]
        pool: String,
        /// Cluster compression.
        #[arg(long, default_value = "zlib", value_parser = ["zlib", "zstd"])]
        compress: String,
    },
    /// Delete a volume (succeeds if it does not exist).
    Delete(VolumeName),
    /// Export a volume over vhost-user-blk; prints the QEMU arguments.
    Attach {
        /// The volume.
        #[command(flatten)]
        vol: VolumeName,
        /// Sector size the guest sees: 512 or 4096.
        #[arg(long, default_value_t = 512)]
        logical_block_size: u32,
        /// Read-only export.
        #[arg(long)]
        read_only: bool,
        /// Virtqueues (0: the daemon's default).
        #[arg(long, default_value_t = 0)]
        num_queues: u32,
        /// Shared (rbd) pools: take the volume over from the host that has it attached,
        /// fencing that host's client first.
        #[arg(long)]
        force: bool,
    },
    /// Stop a volume's export.
    Detach(VolumeName),
    /// Snapshots of a volume: create, list, delete, restore.
    Snapshot {
        /// What to do.
        #[command(subcommand)]
        cmd: SnapshotCommand,
    },
}

/// `vmblk volume snapshot ...`.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot (an attached volume's export pauses for it: crash-consistent).
    Create {
        /// The volume.
        #[command(flatten)]
        vol: VolumeName,
        /// The snapshot's name (unique in the pool).
        #[arg(long)]
        snapshot: String,
    },
    /// List the snapshots of a volume (or, without a name, of the pool).
    List {
        /// The volume ("" for every volume of the pool).
        #[arg(default_value = "")]
        name: String,
        /// The pool.
        #[arg(long, default_value = vmblkd::DEFAULT_POOL)]
        pool: String,
    },
    /// Delete a snapshot (succeeds if it does not exist).
    Delete {
        /// The snapshot.
        snapshot: String,
        /// The pool.
        #[arg(long, default_value = vmblkd::DEFAULT_POOL)]
        pool: String,
    },
    /// Put its volume back as the snapshot has it (the volume must be detached).
    Restore {
        /// The snapshot.
        snapshot: String,
        /// The pool.
        #[arg(long, default_value = vmblkd::DEFAULT_POOL)]
        pool: String,
    },
}

/// `vmblk pool`.
#[derive(Debug, Args)]
pub struct PoolArgs {
    /// Connection.
    #[command(flatten)]
    pub conn: Conn,
    /// What to do.
    #[command(subcommand)]
    pub cmd: PoolCommand,
}

/// Pool subcommands.
#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// List pools.
    List,
    /// Create a pool: `--dir PATH`, one or more `--device PATH`, or `--rbd-pool NAME`.
    Create {
        /// The pool's name.
        name: String,
        /// A directory for a dir pool.
        #[arg(long, conflicts_with_all = ["device", "rbd_pool"])]
        dir: Option<PathBuf>,
        /// The RADOS pool of an rbd pool.
        #[arg(long, conflicts_with = "device")]
        rbd_pool: Option<String>,
        /// Rbd pools: the RADOS namespace.
        #[arg(long, requires = "rbd_pool", default_value = "")]
        rbd_namespace: String,
        /// Rbd pools: ceph.conf (default: librados' search).
        #[arg(long, requires = "rbd_pool")]
        ceph_conf: Option<PathBuf>,
        /// Rbd pools: the cephx client id (default: admin).
        #[arg(long, requires = "rbd_pool")]
        ceph_id: Option<String>,
        /// Rbd pools: the client's keyring (default: what ceph.conf names).
        #[arg(long, requires = "rbd_pool")]
        ceph_keyring: Option<PathBuf>,
        /// Block devices for a block pool (stable paths).
        #[arg(long)]
        device: Vec<PathBuf>,
        /// Dir pools: quota on provisioned bytes.
        #[arg(long, value_parser = parse_size)]
        capacity: Option<u64>,
    },
    /// Delete a pool created with `pool create` (it must be empty).
    Delete {
        /// The pool's name.
        name: String,
    },
}

/// Parses "4096", "10G", "512MiB", "1T".
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let shift = match suffix.trim().trim_end_matches("iB").trim_end_matches('B') {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(format!("{s:?}: unknown size suffix")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Runs `f` against a connected client; prints errors; returns the exit code.
pub(crate) fn with_client<T>(
    conn: &Conn,
    f: impl FnOnce(&BlockingClient, Client) -> Result<T, tonic::Status>,
    show: impl FnOnce(&T, bool),
) -> i32 {
    let c = match BlockingClient::connect(&conn.socket) {
        Ok(c) => c,
        Err(e) => return fail(conn.json, &format!("{e:#}"), "Unavailable"),
    };
    match f(&c, c.client()) {
        Ok(v) => {
            show(&v, conn.json);
            0
        }
        Err(s) => fail(conn.json, s.message(), &format!("{:?}", s.code())),
    }
}

fn fail(json: bool, message: &str, code: &str) -> i32 {
    if json {
        println!(
            "{}",
            json!({ "error": message, "code": code, "exit_code": 1 })
        );
    } else {
        eprintln!("vmblk: {message} ({code})");
    }
    1
}

pub(crate) fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn state_name(s: i32) -> &'static str {
    match pb::VolumeState::try_from(s) {
        Ok(pb::VolumeState::Creating) => "creating",
        Ok(pb::VolumeState::Ready) => "ready",
        Ok(pb::VolumeState::Growing) => "growing",
        Ok(pb::VolumeState::Deleting) => "deleting",
        _ => "unknown",
    }
}

pub(crate) fn backend_state_name(s: i32) -> &'static str {
    match pb::BackendState::try_from(s) {
        Ok(pb::BackendState::Active) => "active",
        Ok(pb::BackendState::Removed) => "removed",
        Ok(pb::BackendState::Missing) => "missing",
        Ok(pb::BackendState::Failed) => "failed",
        _ => "unknown",
    }
}

fn attachment_json(a: &pb::Attachment) -> Value {
    json!({
        "backend_state": backend_state_name(a.backend_state),
        "backend_removed_reason": a.backend_removed_reason,
        "socket_path": a.socket_path,
        "logical_block_size": a.logical_block_size,
        "read_only": a.read_only,
        "num_queues": a.num_queues,
        "queue_size": a.queue_size,
        "serial": a.serial,
        "qemu_chardev": a.qemu_chardev,
        "qemu_device": a.qemu_device,
        "qemu_args": a.qemu_args,
    })
}

/// A volume as `--json` asks: JSON, or the human form.
fn print_volume(v: &pb::Volume, json: bool) {
    if json {
        print_json(&volume_json(v))
    } else {
        show_volume(v)
    }
}

/// `VOL` or `VOL@SNAP`: the volume and the snapshot ("" for none).
fn volume_at_snapshot(s: String) -> (String, String) {
    match s.split_once('@') {
        Some((v, snap)) => (v.to_owned(), snap.to_owned()),
        None => (s, String::new()),
    }
}

fn volume_json(v: &pb::Volume) -> Value {
    let origin = match v.origin.as_ref().and_then(|o| o.source.as_ref()) {
        Some(pb::volume_origin::Source::Image(f)) => {
            json!({ "image": f.path, "metadata": f.metadata_path })
        }
        Some(pb::volume_origin::Source::ImageFingerprint(fp)) => json!({ "fingerprint": fp }),
        Some(pb::volume_origin::Source::Volume(s)) => {
            json!({ "volume": s.name, "snapshot": s.snapshot })
        }
        _ => json!("empty"),
    };
    json!({
        "pool": v.pool,
        "name": v.name,
        "uuid": v.uuid,
        "size_bytes": v.size_bytes,
        "state": state_name(v.state),
        "origin": origin,
        "path": v.path,
        "backing_logical_block_size": v.backing_logical_block_size,
        "reflinked": v.reflinked,
        "attachment": v.attachment.as_ref().map(attachment_json),
    })
}

fn pool_json(p: &pb::Pool) -> Value {
    let ty = match pb::PoolType::try_from(p.r#type) {
        Ok(pb::PoolType::Dir) => "dir",
        Ok(pb::PoolType::Block) => "block",
        Ok(pb::PoolType::Rbd) => "rbd",
        _ => "unknown",
    };
    let origin = match pb::PoolOrigin::try_from(p.origin) {
        Ok(pb::PoolOrigin::Config) => "config",
        _ => "api",
    };
    json!({
        "name": p.name,
        "type": ty,
        "origin": origin,
        "path": p.path,
        "devices": p.devices,
        "capacity_bytes": p.capacity_bytes,
        "provisioned_bytes": p.provisioned_bytes,
        "available_bytes": p.available_bytes,
        "reflink": p.reflink,
        "volume_count": p.volume_count,
        "rbd": p.rbd.as_ref().map(|r| json!({
            "pool": r.pool,
            "namespace": r.namespace,
            "conf": r.conf,
            "id": r.id,
            "keyring": r.keyring,
        })),
        "available": p.available,
        "unavailable_reason": p.unavailable_reason,
    })
}

fn show_volume(v: &pb::Volume) {
    let att = v
        .attachment
        .as_ref()
        .map(|a| match pb::BackendState::try_from(a.backend_state) {
            Ok(pb::BackendState::Removed) => format!(
                "{} (backing device removed: {})",
                a.socket_path, a.backend_removed_reason
            ),
            Ok(pb::BackendState::Missing) => {
                format!("{} (waiting for its backing device)", a.socket_path)
            }
            Ok(pb::BackendState::Failed) => format!(
                "{} (export failed: {}; attach again or detach)",
                a.socket_path, a.backend_removed_reason
            ),
            _ => a.socket_path.clone(),
        })
        .unwrap_or_else(|| "-".into());
    println!(
        "{}/{}  {}  {} bytes  {}  attached: {}",
        v.pool,
        v.name,
        state_name(v.state),
        v.size_bytes,
        v.path,
        att
    );
}

/// Runs `vmblk volume ...`.
pub fn run_volume(a: VolumeArgs) -> i32 {
    let conn = a.conn.clone();
    match a.cmd {
        VolumeCommand::Create {
            vol,
            size,
            image,
            metadata,
            fingerprint,
            from,
            grow_last_partition,
        } => {
            let source = if let Some(from) = from {
                let (name, snapshot) = volume_at_snapshot(from);
                Some(pb::volume_origin::Source::Volume(pb::VolumeSource {
                    name,
                    snapshot,
                }))
            } else if let Some(fp) = fingerprint {
                Some(pb::volume_origin::Source::ImageFingerprint(fp))
            } else if let Some(img) = image {
                let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p).display().to_string();
                Some(pb::volume_origin::Source::Image(pb::ImageFile {
                    path: abs(img),
                    metadata_path: metadata.map(abs).unwrap_or_default(),
                }))
            } else {
                None
            };
            let req = pb::CreateVolumeRequest {
                pool: vol.pool,
                name: vol.name,
                size_bytes: size.unwrap_or(0),
                origin: Some(pb::VolumeOrigin { source }),
                grow_last_partition,
            };
            with_client(
                &conn,
                |b, mut c| b.block_on(c.create_volume(req)).map(|r| r.into_inner()),
                print_volume,
            )
        }
        VolumeCommand::List { pool } => with_client(
            &conn,
            |b, mut c| {
                b.block_on(c.list_volumes(pb::ListVolumesRequest { pool }))
                    .map(|r| r.into_inner())
            },
            |l, j| {
                if j {
                    print_json(&Value::Array(l.volumes.iter().map(volume_json).collect()));
                } else {
                    l.volumes.iter().for_each(show_volume);
                }
            },
        ),
        VolumeCommand::Get(v) => with_client(
            &conn,
            |b, mut c| {
                b.block_on(c.get_volume(pb::GetVolumeRequest {
                    pool: v.pool,
                    name: v.name,
                }))
                .map(|r| r.into_inner())
            },
            print_volume,
        ),
        VolumeCommand::Grow {
            vol,
            size,
            grow_last_partition,
        } => {
            let req = pb::GrowVolumeRequest {
                pool: vol.pool,
                name: vol.name,
                size_bytes: size,
                grow_last_partition,
            };
            with_client(
                &conn,
                |b, mut c| b.block_on(c.grow_volume(req)).map(|r| r.into_inner()),
                |g, j| {
                    if j {
                        print_json(&json!({
                            "volume": g.volume.as_ref().map(volume_json),
                            "table_repaired": g.table_repaired,
                            "note": g.note,
                        }));
                    } else {
                        if let Some(v) = &g.volume {
                            show_volume(v);
                        }
                        println!("partition table repaired: {} {}", g.table_repaired, g.note);
                    }
                },
            )
        }
        VolumeCommand::Rename { vol, new_name } => with_client(
            &conn,
            |b, mut c| {
                b.block_on(c.rename_volume(pb::RenameVolumeRequest {
                    pool: vol.pool,
                    name: vol.name,
                    new_name,
                }))
                .map(|r| r.into_inner())
            },
            print_volume,
        ),
        VolumeCommand::Publish {
            source,
            image,
            pool,
            compress,
        } => {
            let (name, snapshot) = volume_at_snapshot(source);
            let compression = if compress == "zstd" {
                pb::ImageCompression::Zstd
            } else {
                pb::ImageCompression::Zlib
            };
            let req = pb::PublishVolumeRequest {
                pool,
                name,
                snapshot,
                path: std::path::absolute(&image)
                    .unwrap_or(image)
                    .display()
                    .to_string(),
                compression: compression as i32,
            };
            with_client(
                &conn,
                |b, mut c| b.block_on(c.publish_volume(req)).map(|r| r.into_inner()),
                |r, j| {
                    if j {
                        print_json(&json!({
                            "path": r.path,
                            "virtual_size": r.virtual_size,
                            "file_bytes": r.file_bytes,
                            "compressed_clusters": r.compressed_clusters,
                            "raw_clusters": r.raw_clusters,
                            "zero_clusters": r.zero_clusters,
                        }));
                    } else {
                        println!(
                            "published {} ({} bytes of a {}-byte volume)",
                            r.path, r.file_bytes, r.virtual_size
                        );
                    }
                },
            )
        }
        VolumeCommand::Delete(v) => with_client(
            &conn,
            |b, mut c| {
                b.block_on(c.delete_volume(pb::DeleteVolumeRequest {
                    pool: v.pool,
                    name: v.name,
                }))
                .map(|r| r.into_inner())
            },
            |r, j| {
                if j {
                    print_json(&json!({ "existed": r.existed }));
                } else {
                    println!(
                        "{}",
                        if r.existed {
                            "deleted"
                        } else {
                            "did not exist"
                        }
                    );
                }
            },
        ),
        VolumeCommand::Attach {
            vol,
            logical_block_size,
            read_only,
            num_queues,
            force,
        } => {
            let req = pb::AttachVolumeRequest {
                pool: vol.pool,
                name: vol.name,
                logical_block_size,
                read_only,
                num_queues,
                queue_size: 0,
                force,
            };
            with_client(
                &conn,
                |b, mut c| b.block_on(c.attach_volume(req)).map(|r| r.into_inner()),
                |a, j| {
                    if j {
                        print_json(&attachment_json(a));
                    } else {
                        println!("socket: {}", a.socket_path);
                        println!("qemu: {}", a.qemu_args.join(" "));
                    }
                },
            )
        }
        VolumeCommand::Detach(v) => with_client(
            &conn,
            |b, mut c| {
                b.block_on(c.detach_volume(pb::DetachVolumeRequest {
                    pool: v.pool,
                    name: v.name,
                }))
                .map(|r| r.into_inner())
            },
            |r, j| {
                if j {
                    print_json(&json!({ "was_attached": r.was_attached }));
                } else {
                    println!(
                        "{}",
                        if r.was_attached {
                            "detached"
                        } else {
                            "was not attached"
                        }
                    );
                }
            },
        ),
        VolumeCommand::Snapshot { cmd } => run_snapshot(&conn, cmd),
    }
}

fn snapshot_json(s: &pb::Snapshot) -> Value {
    json!({
        "pool": s.pool,
        "volume": s.volume,
        "name": s.name,
        "size_bytes": s.size_bytes,
        "created_unix_ms": s.created_unix_ms,
        "taken_attached": s.taken_attached,
    })
}

fn run_snapshot(conn: &Conn, cmd: SnapshotCommand) -> i32 {
    match cmd {
        SnapshotCommand::Create { vol, snapshot } => with_client(
            conn,
            |b, mut c| {
                b.block_on(c.create_snapshot(pb::CreateSnapshotRequest {
                    pool: vol.pool,
                    volume: vol.name,
                    name: snapshot,
                }))
                .map(|r| r.into_inner())
            },
            |s, j| {
                if j {
                    print_json(&snapshot_json(s));
                } else {
                    println!("snapshot {} of {}/{} taken", s.name, s.pool, s.volume);
                }
            },
        ),
        SnapshotCommand::List { name, pool } => with_client(
            conn,
            |b, mut c| {
                b.block_on(c.list_snapshots(pb::ListSnapshotsRequest { pool, volume: name }))
                    .map(|r| r.into_inner())
            },
            |l, j| {
                if j {
                    print_json(&Value::Array(
                        l.snapshots.iter().map(snapshot_json).collect(),
                    ));
                } else {
                    for s in &l.snapshots {
                        println!("{}/{}@{}  {} bytes", s.pool, s.volume, s.name, s.size_bytes);
                    }
                }
            },
        ),
        SnapshotCommand::Delete { snapshot, pool } => with_client(
            conn,
            |b, mut c| {
                b.block_on(c.delete_snapshot(pb::DeleteSnapshotRequest {
                    pool,
                    name: snapshot,
                }))
                .map(|r| r.into_inner())
            },
            |r, j| {
                if j {
                    print_json(&json!({ "existed": r.existed }));
                } else {
                    println!(
                        "{}",
                        if r.existed {
                            "deleted"
                        } else {
                            "did not exist"
                        }
                    );
                }
            },
        ),
        SnapshotCommand::Restore { snapshot, pool } => with_client(
            conn,
            |b, mut c| {
                b.block_on(c.restore_snapshot(pb::RestoreSnapshotRequest {
                    pool,
                    name: snapshot,
                }))
                .map(|r| r.into_inner())
            },
            |v, j| {
                if j {
                    print_json(&json!({ "restored": v.name, "size_bytes": v.size_bytes }));
                } else {
                    println!("volume {} restored", v.name);
                }
            },
        ),
    }
}

/// Runs `vmblk pool ...`.
pub fn run_pool(a: PoolArgs) -> i32 {
    let conn = a.conn.clone();
    match a.cmd {
        PoolCommand::List => with_client(
            &conn,
            |b, mut c| {
                b.block_on(c.list_pools(pb::ListPoolsRequest {}))
                    .map(|r| r.into_inner())
            },
            |l, j| {
                if j {
                    print_json(&Value::Array(l.pools.iter().map(pool_json).collect()));
                } else {
                    for p in &l.pools {
                        let v = pool_json(p);
                        println!(
                            "{}  {}  {}  volumes: {}  provisioned: {}  available: {}",
                            p.name,
                            v["type"].as_str().unwrap_or(""),
                            v["origin"].as_str().unwrap_or(""),
                            p.volume_count,
                            p.provisioned_bytes,
                            p.available_bytes
                        );
                    }
                }
            },
        ),
        PoolCommand::Create {
            name,
            dir,
            device,
            capacity,
            rbd_pool,
            rbd_namespace,
            ceph_conf,
            ceph_id,
            ceph_keyring,
        } => {
            let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p).display().to_string();
            let rbd = rbd_pool.map(|pool| pb::RbdPool {
                pool,
                namespace: rbd_namespace,
                conf: ceph_conf.map(abs).unwrap_or_default(),
                id: ceph_id.unwrap_or_default(),
                keyring: ceph_keyring.map(abs).unwrap_or_default(),
            });
            let req = pb::CreatePoolRequest {
                name,
                r#type: if dir.is_some() {
                    pb::PoolType::Dir
                } else if rbd.is_some() {
                    pb::PoolType::Rbd
                } else {
                    pb::PoolType::Block
                } as i32,
                rbd,
                path: dir
                    .map(|d| std::path::absolute(&d).unwrap_or(d).display().to_string())
                    .unwrap_or_default(),
                devices: device.iter().map(|d| d.display().to_string()).collect(),
                capacity_bytes: capacity.unwrap_or(0),
            };
            with_client(
                &conn,
                |b, mut c| b.block_on(c.create_pool(req)).map(|r| r.into_inner()),
                |p, j| {
                    if j {
                        print_json(&pool_json(p))
                    } else {
                        println!("pool {} ready", p.name)
                    }
                },
            )
        }
        PoolCommand::Delete { name } => with_client(
            &conn,
            |b, mut c| {
                b.block_on(c.delete_pool(pb::DeletePoolRequest { name }))
                    .map(|r| r.into_inner())
            },
            |r, j| {
                if j {
                    print_json(&json!({ "existed": r.existed }));
                } else {
                    println!(
                        "{}",
                        if r.existed {
                            "deleted"
                        } else {
                            "did not exist"
                        }
                    );
                }
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("1X").is_err());
    }
}
