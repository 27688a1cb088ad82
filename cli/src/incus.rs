//! `vmblk incus ...`: vmblkd's volumes in Incus and LXD virtual machines, through what
//! those daemons support: the instance's `raw.qemu` carries the export's vhost-user disk,
//! images are read through the REST API, instances are created and started through it.
//!
//! ```text
//!  attach INSTANCE VOLUME [--boot]
//!     vmblkd AttachVolume (export up, socket there) ──► raw.qemu += -chardev/-device
//!  detach INSTANCE VOLUME
//!     raw.qemu -= the disk ──► vmblkd DetachVolume
//!  launch IMAGE INSTANCE --pool P [--size S]
//!     image (API) ──► vmblkd ImportImage (its files) ──► CreateVolume (clone)
//!       ──► empty VM ──► attach --boot ──► start       (undone in reverse on failure)
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use incus_api::{raw_qemu, IncusClient, NewVm};
use serde_json::{json, Value};
use vmblk_proto::v1 as pb;
use vmblkd::client::Client;

use crate::volume::{parse_size, print_json, Conn};

/// `vmblk incus`.
#[derive(Debug, Args)]
pub struct IncusArgs {
    /// Connection to vmblkd.
    #[command(flatten)]
    pub conn: Conn,
    /// The Incus or LXD socket (default: /var/lib/incus/unix.socket,
    /// /var/lib/lxd/unix.socket or the LXD snap's, whichever exists).
    #[arg(long, global = true)]
    pub incus_socket: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub cmd: IncusCommand,
}

/// `vmblk incus` subcommands.
#[derive(Debug, Subcommand)]
pub enum IncusCommand {
    /// Export a volume and add it to a VM instance's QEMU (raw.qemu); takes effect at
    /// the instance's next start.
    Attach {
        /// The instance.
        instance: String,
        /// The volume.
        volume: String,
        /// Its pool.
        #[arg(long, default_value = vmblkd::DEFAULT_POOL)]
        pool: String,
        /// Give it the boot index after the instance's own disks and NICs: firmware
        /// boots from it when those hold nothing bootable (the empty root disk of an
        /// instance made by `launch`).
        #[arg(long)]
        boot: bool,
    },
    /// Remove a volume from a VM instance's QEMU and stop its export (the volume
    /// stays). The instance must be stopped, or gone.
    Detach {
        /// The instance.
        instance: String,
        /// The volume.
        volume: String,
        /// Its pool.
        #[arg(long, default_value = vmblkd::DEFAULT_POOL)]
        pool: String,
    },
    /// Make a VM volume from an Incus image, an empty VM instance booting from it, and
    /// start it.
    Launch {
        /// The image: fingerprint (or a prefix of 12+ digits) or alias.
        image: String,
        /// The instance to create.
        instance: String,
        /// The vmblkd pool of the volume.
        #[arg(long)]
        pool: String,
        /// The dir pool the image is cached in (default: vmblkd's default dir pool).
        #[arg(long, default_value = "")]
        image_pool: String,
        /// The volume's name (default: the instance's).
        #[arg(long)]
        volume: Option<String>,
        /// The volume's size (default: the image's).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Profiles of the instance (default: the daemon's default profile).
        #[arg(long)]
        profile: Vec<String>,
        /// Create and attach, do not start.
        #[arg(long)]
        no_start: bool,
    },
}

/// Runs `vmblk incus ...`.
pub fn run(a: IncusArgs) -> i32 {
    let json = a.conn.json;
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vmblk incus: cannot start a runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(dispatch(a)) {
        Ok(v) => {
            if json {
                print_json(&v);
            } else if let Some(s) = v["summary"].as_str() {
                println!("{s}");
            }
            0
        }
        Err(e) => {
            let msg = format!("{e:#}");
            if json {
                println!("{}", json!({"error": msg, "exit_code": 1}));
            } else {
                eprintln!("vmblk incus: {msg}");
            }
            1
        }
    }
}

async fn dispatch(a: IncusArgs) -> anyhow::Result<Value> {
    let socket = incus_api::find_socket(a.incus_socket.as_deref())?;
    let incus = IncusClient::new(socket);
    let mut vmblkd = vmblkd::client::connect(&a.conn.socket)
        .await
        .with_context(|| format!("connecting to vmblkd at {}", a.conn.socket.display()))?;
    match a.cmd {
        IncusCommand::Attach {
            instance,
            volume,
            pool,
            boot,
        } => attach(&incus, &mut vmblkd, &instance, &pool, &volume, boot).await,
        IncusCommand::Detach {
            instance,
            volume,
            pool,
        } => detach(&incus, &mut vmblkd, &instance, &pool, &volume).await,
        IncusCommand::Launch {
            image,
            instance,
            pool,
            image_pool,
            volume,
            size,
            profile,
            no_start,
        } => {
            let l = Launch {
                image,
                volume: volume.unwrap_or_else(|| instance.clone()),
                instance,
                pool,
                image_pool,
                size,
                profiles: profile,
                start: !no_start,
            };
            launch(&incus, &mut vmblkd, &l).await
        }
    }
}

fn status(s: tonic::Status) -> anyhow::Error {
    anyhow!("vmblkd: {} ({:?})", s.message(), s.code())
}

/// Attaches `pool/volume` to `instance`'s QEMU.
async fn attach(
    incus: &IncusClient,
    vmblkd: &mut Client,
    instance: &str,
    pool: &str,
    volume: &str,
    boot: bool,
) -> anyhow::Result<Value> {
    let inst = incus.instance(instance).await?;
    if !inst.is_vm() {
        bail!(
            "instance {instance} is a {}, not a virtual machine",
            inst.kind
        );
    }
    let a = vmblkd
        .attach_volume(pb::AttachVolumeRequest {
            pool: pool.into(),
            name: volume.into(),
            ..Default::default()
        })
        .await
        .map_err(status)?
        .into_inner();
    // QEMU with reconnect= blocks the instance's start while its socket is missing: only
    // a socket that is there goes into raw.qemu.
    if !std::path::Path::new(&a.socket_path).exists() {
        bail!(
            "volume {pool}/{volume} is attached but its export socket {} is not there \
             (backend {}): not adding it to {instance}",
            a.socket_path,
            crate::volume::backend_state_name(a.backend_state)
        );
    }
    let id = chardev_id(&a)?;
    let boot_index = boot.then(|| raw_qemu::next_boot_index(&inst.expanded_devices));
    let mut device = a.qemu_device.clone();
    if let Some(b) = boot_index {
        device.push_str(&format!(",bootindex={b}"));
    }
    let before = inst.expanded("raw.qemu").to_owned();
    let after = raw_qemu::merge_disk(&before, &id, &a.qemu_chardev, &device);
    let changed = raw_qemu::split(&after) != raw_qemu::split(&before);
    if changed {
        let change = BTreeMap::from([("raw.qemu".to_string(), Some(after.clone()))]);
        incus.update_config(instance, &change).await?;
    }
    let restart = changed && inst.is_running();
    Ok(json!({
        "instance": instance,
        "pool": pool,
        "volume": volume,
        "socket": a.socket_path,
        "boot_index": boot_index,
        "raw_qemu": after,
        "changed": changed,
        "restart_needed": restart,
        "summary": format!(
            "{pool}/{volume} attached to {instance} ({}){}",
            a.socket_path,
            if restart { "; restart the instance to use it" } else { "" }
        ),
    }))
}

/// The chardev id of an attachment (`id=` of its `-chardev`).
fn chardev_id(a: &pb::Attachment) -> anyhow::Result<String> {
    a.qemu_chardev
        .split(',')
        .find_map(|p| p.strip_prefix("id="))
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("vmblkd's chardev {:?} has no id", a.qemu_chardev))
}

/// Detaches `pool/volume` from `instance`'s QEMU (the instance may be gone) and stops
/// the export.
async fn detach(
    incus: &IncusClient,
    vmblkd: &mut Client,
    instance: &str,
    pool: &str,
    volume: &str,
) -> anyhow::Result<Value> {
    let v = vmblkd
        .get_volume(pb::GetVolumeRequest {
            pool: pool.into(),
            name: volume.into(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let id = raw_qemu::disk_id(&v.uuid);
    let mut removed = false;
    match incus.instance(instance).await {
        Ok(inst) => {
            let own = inst.config.get("raw.qemu").cloned().unwrap_or_default();
            if raw_qemu::has_disk(&own, &id) {
                if inst.is_running() {
                    bail!("instance {instance} is running with {pool}/{volume}: stop it first");
                }
                let after = raw_qemu::remove_disk(&own, &id);
                let value = (!after.is_empty()).then_some(after);
                let change = BTreeMap::from([("raw.qemu".to_string(), value)]);
                incus.update_config(instance, &change).await?;
                removed = true;
            }
        }
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    let existed = vmblkd
        .detach_volume(pb::DetachVolumeRequest {
            pool: pool.into(),
            name: volume.into(),
        })
        .await
        .map_err(status)?
        .into_inner()
        .was_attached;
    Ok(json!({
        "instance": instance,
        "pool": pool,
        "volume": volume,
        "removed_from_instance": removed,
        "export_stopped": existed,
        "summary": format!("{pool}/{volume} detached from {instance}"),
    }))
}

/// What `launch` makes.
struct Launch {
    image: String,
    instance: String,
    pool: String,
    image_pool: String,
    volume: String,
    size: Option<u64>,
    profiles: Vec<String>,
    start: bool,
}

/// Image → cached image → volume → empty VM → attached → started; undone in reverse if
/// a step fails (only what this call made).
async fn launch(incus: &IncusClient, vmblkd: &mut Client, l: &Launch) -> anyhow::Result<Value> {
    let img = incus.image(&l.image).await?;
    if !img.is_vm() {
        bail!(
            "image {} is a {} image, not a virtual-machine image",
            l.image,
            img.kind
        );
    }
    let dir = incus_api::images_dir(incus.socket());
    let files = img.files(&dir).ok_or_else(|| {
        anyhow!(
            "image {}'s files are not in {} (is this the daemon's data directory?)",
            img.fingerprint,
            dir.display()
        )
    })?;
    let cached = vmblkd
        .import_image(pb::ImportImageRequest {
            pool: l.image_pool.clone(),
            fingerprint: img.fingerprint.clone(),
            image: Some(pb::ImageFile {
                path: files.image.display().to_string(),
                metadata_path: files
                    .metadata
                    .as_ref()
                    .map(|m| m.display().to_string())
                    .unwrap_or_default(),
            }),
        })
        .await
        .map_err(status)?
        .into_inner();
    vmblkd
        .create_volume(pb::CreateVolumeRequest {
            pool: l.pool.clone(),
            name: l.volume.clone(),
            size_bytes: l.size.unwrap_or(0),
            origin: Some(pb::VolumeOrigin {
                source: Some(pb::volume_origin::Source::ImageFingerprint(
                    img.fingerprint.clone(),
                )),
            }),
            grow_last_partition: false,
        })
        .await
        .map_err(status)?;
    let made = async {
        let mut config = BTreeMap::new();
        // What the image asks of the instance, as Incus does when it creates one from
        // the image itself.
        if let Some(v) = img.properties.get("requirements.secureboot") {
            if v == "false" {
                config.insert("security.secureboot".to_string(), "false".to_string());
            }
        }
        let vm = NewVm {
            name: l.instance.clone(),
            profiles: l.profiles.clone(),
            config,
        };
        incus.create_empty_vm(&vm).await?;
        let attached = async {
            let a = attach(incus, vmblkd, &l.instance, &l.pool, &l.volume, true).await?;
            if l.start {
                incus.set_state(&l.instance, "start", false).await?;
            }
            Ok::<_, anyhow::Error>(a)
        }
        .await;
        if attached.is_err() {
            let _ = incus.set_state(&l.instance, "stop", true).await;
            let _ = incus.delete_instance(&l.instance).await;
        }
        attached
    }
    .await;
    let a = match made {
        Ok(a) => a,
        Err(e) => {
            let _ = vmblkd
                .detach_volume(pb::DetachVolumeRequest {
                    pool: l.pool.clone(),
                    name: l.volume.clone(),
                })
                .await;
            let _ = vmblkd
                .delete_volume(pb::DeleteVolumeRequest {
                    pool: l.pool.clone(),
                    name: l.volume.clone(),
                })
                .await;
            return Err(e.context(format!(
                "launching {}: undone (instance and volume removed)",
                l.instance
            )));
        }
    };
    Ok(json!({
        "instance": l.instance,
        "image": img.fingerprint,
        "image_unpacked": cached.unpacked,
        "pool": l.pool,
        "volume": l.volume,
        "socket": a["socket"],
        "boot_index": a["boot_index"],
        "started": l.start,
        "summary": format!(
            "{} {} from image {} on volume {}/{}",
            if l.start { "started" } else { "created" },
            l.instance,
            &img.fingerprint[..12.min(img.fingerprint.len())],
            l.pool,
            l.volume
        ),
    }))
}
