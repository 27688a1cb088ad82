//! The daemon's configuration: YAML (`/etc/vmblk/vmblkd.yaml`) onto serde structs that
//! reject unknown keys by name.
//!
//! ```yaml
//! socket: /run/vmblk/vmblkd.sock     # gRPC unix socket
//! socket_mode: "0660"                 # octal, as a string
//! state_dir: /var/lib/vmblk           # records, default pool, scratch space
//! export_dir: /run/vmblk/exports      # vhost-user sockets of attached volumes
//! exports: { num_queues: 1, queue_size: 1024, direct_io: true, io_timeout_ms: 30000,
//!            socket_owner: auto, socket_mode: "0600" }   # QEMU's user (incus / nobody)
//! hotplug: { enabled: true }          # kernel uevents for block pools' devices
//! shutdown_grace_secs: 30             # after SIGTERM, then running operations are abandoned
//! pools:
//!   - name: default
//!     type: dir
//!     path: /var/lib/vmblk/pools/default
//!     capacity_bytes: 0               # quota on provisioned bytes, 0: none
//!   - name: nvme
//!     type: block
//!     devices: [/dev/disk/by-id/nvme-Samsung_SSD_980_1TB_S64ANS0T123456]
//! attachments:                        # exported at every start, before hotplug runs
//!   - { pool: nvme, volume: vm1, logical_block_size: 512, read_only: false }
//! incus:                              # opt-in: cache VM images Incus/LXD imports
//!   follow_images: true               # socket, images_dir: found; pool: "" (default)
//! ```
//!
//! The order of the keys does not matter: whatever the file says first, vmblkd restores
//! pools, volumes and attachments before the hotplug monitor acts (docs/hotplug.md).
//!
//! Every key is optional. With no file at all the embedded default applies: one `dir`
//! pool named `default` under the state directory, the socket under /run/vmblk.

pub use crate::model::{PoolKind, RbdPoolConfig};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the configuration is read from when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/vmblk/vmblkd.yaml";
/// Default gRPC socket.
pub const DEFAULT_SOCKET: &str = "/run/vmblk/vmblkd.sock";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vmblk";
/// Name of the pool of the embedded default.
pub const DEFAULT_POOL: &str = "default";

/// The configuration file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The gRPC unix socket (default /run/vmblk/vmblkd.sock).
    pub socket: Option<PathBuf>,
    /// The socket's mode, octal (default "0660").
    pub socket_mode: Option<String>,
    /// The state directory (default /var/lib/vmblk).
    pub state_dir: Option<PathBuf>,
    /// Directory of the exports' vhost-user sockets (default: `exports/` next to `socket`).
    pub export_dir: Option<PathBuf>,
    /// Defaults of exports.
    #[serde(default)]
    pub exports: ExportDefaults,
    /// The pools (default: one dir pool `default` under the state directory).
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    /// Seconds running operations get to finish after SIGTERM (default 30); an
    /// operation still running then is abandoned as if the daemon had crashed.
    pub shutdown_grace_secs: Option<u64>,
    /// The hotplug monitor (kernel uevents of the block pools' devices).
    #[serde(default)]
    pub hotplug: HotplugConfig,
    /// Volumes exported at every start (they must exist; created over the API).
    #[serde(default)]
    pub attachments: Vec<AttachmentConfig>,
    /// Following an Incus or LXD daemon on this host.
    #[serde(default)]
    pub incus: IncusConfig,
    /// This host's name in pools other hosts share (rbd): who attached a volume. Default:
    /// the host name.
    pub node: Option<String>,
}

impl Config {
    /// This host's name: `node`, else the kernel's host name.
    pub fn node_name(&self) -> String {
        self.node.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_owned())
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "localhost".into())
        })
    }
}

/// Following an Incus or LXD daemon (opt-in): Incus runs no host program when it
/// imports an image, but says so on its event stream.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct IncusConfig {
    /// Cache virtual-machine images when the daemon reports them (`image-created`, and
    /// those already there at each connection) and drop them when it deletes them
    /// (`image-deleted`).
    pub follow_images: bool,
    /// The daemon's socket (default: /var/lib/incus/unix.socket, /var/lib/lxd/unix.socket
    /// or the LXD snap's, whichever exists).
    pub socket: Option<PathBuf>,
    /// Its image directory (default: `images/` beside the socket).
    pub images_dir: Option<PathBuf>,
    /// The pool images are cached in ("": the default dir pool).
    pub pool: String,
}

/// The hotplug monitor's settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HotplugConfig {
    /// Watch kernel uevents: hot-remove and re-add of block pools' devices (default true).
    pub enabled: bool,
}

impl Default for HotplugConfig {
    fn default() -> Self {
        HotplugConfig { enabled: true }
    }
}

/// A volume the configuration attaches (exports) at every start.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AttachmentConfig {
    /// The pool.
    pub pool: String,
    /// The volume.
    pub volume: String,
    /// Guest sector size: 512 or 4096 (default 512).
    #[serde(default)]
    pub logical_block_size: u32,
    /// Read-only export (default false).
    #[serde(default)]
    pub read_only: bool,
    /// Virtqueues (default: `exports.num_queues`).
    #[serde(default)]
    pub num_queues: u32,
    /// Virtqueue size (default: `exports.queue_size`).
    #[serde(default)]
    pub queue_size: u32,
}

/// Defaults for attachments that do not say.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ExportDefaults {
    /// Virtqueues per export.
    pub num_queues: u16,
    /// Virtqueue size: what QEMU is told (`queue-size=`), and the largest the export
    /// accepts (a frontend may pick any smaller size).
    pub queue_size: u16,
    /// Open volumes with O_DIRECT where the filesystem allows it.
    pub direct_io: bool,
    /// Guest requests older than this fail with an I/O error, so a backing device that
    /// stalls never stalls the guest (milliseconds; 0: no timeout).
    pub io_timeout_ms: u64,
    /// Who owns export sockets, so QEMU can connect and reconnect as its own user:
    /// "auto" (the user Incus or LXD runs QEMU as: `incus` if that user exists, else
    /// `nobody`), a user name, "user:group", or "" (vmblkd's own user).
    pub socket_owner: String,
    /// Mode of export sockets, octal (default "0600": their owner only).
    pub socket_mode: String,
}

/// Owner, group and mode of export sockets, resolved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketAccess {
    /// Owner (None: vmblkd's).
    pub uid: Option<u32>,
    /// Group (None: vmblkd's).
    pub gid: Option<u32>,
    /// Mode.
    pub mode: Option<u32>,
}

impl ExportDefaults {
    /// `socket_owner` and `socket_mode` resolved to ids; errors name what is unknown.
    pub fn socket_access(&self) -> Result<SocketAccess, String> {
        use nix::unistd::{Group, User};
        let mode = match self.socket_mode.as_str() {
            "" => None,
            m => Some(parse_mode(m).filter(|m| *m <= 0o777).ok_or_else(|| {
                format!("exports.socket_mode {m:?} is not an octal mode like \"0600\"")
            })?),
        };
        let user = |name: &str| {
            User::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| format!("exports.socket_owner: no user {name:?}"))
        };
        let (uid, gid) = match self.socket_owner.as_str() {
            "" => (None, None),
            "auto" => match ["incus", "nobody"].iter().find_map(|n| user(n).ok()) {
                Some(u) => (Some(u.uid.as_raw()), Some(u.gid.as_raw())),
                None => (None, None),
            },
            spec => {
                let (name, group) = match spec.split_once(':') {
                    Some((u, g)) => (u, Some(g)),
                    None => (spec, None),
                };
                let u = user(name)?;
                let gid = match group {
                    Some(g) => Group::from_name(g)
                        .ok()
                        .flatten()
                        .ok_or_else(|| format!("exports.socket_owner: no group {g:?}"))?
                        .gid
                        .as_raw(),
                    None => u.gid.as_raw(),
                };
                (Some(u.uid.as_raw()), Some(gid))
            }
        };
        Ok(SocketAccess { uid, gid, mode })
    }
}

/// Default of `exports.io_timeout_ms`.
pub const DEFAULT_IO_TIMEOUT_MS: u64 = 30_000;

impl Default for ExportDefaults {
    fn default() -> Self {
        ExportDefaults {
            num_queues: 1,
            queue_size: vhost_blk::DEFAULT_QUEUE_SIZE,
            direct_io: true,
            io_timeout_ms: DEFAULT_IO_TIMEOUT_MS,
            socket_owner: "auto".into(),
            socket_mode: "0600".into(),
        }
    }
}

/// One pool.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(from = "RawPool")]
pub struct PoolConfig {
    /// The pool's name.
    pub name: String,
    /// Its kind and where its storage is.
    pub kind: PoolKind,
}

/// A pool as written in YAML: `type` selects the variant. (serde cannot combine
/// `flatten` with `deny_unknown_fields`, so the name sits in each variant.)
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum RawPool {
    Dir {
        name: String,
        path: PathBuf,
        #[serde(default)]
        capacity_bytes: u64,
    },
    Block {
        name: String,
        devices: Vec<PathBuf>,
    },
    Rbd {
        name: String,
        pool: String,
        #[serde(default)]
        namespace: String,
        #[serde(default)]
        conf: Option<PathBuf>,
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        keyring: Option<PathBuf>,
    },
}

impl From<RawPool> for PoolConfig {
    fn from(r: RawPool) -> PoolConfig {
        match r {
            RawPool::Dir {
                name,
                path,
                capacity_bytes,
            } => PoolConfig {
                name,
                kind: PoolKind::Dir {
                    path,
                    capacity_bytes,
                },
            },
            RawPool::Block { name, devices } => PoolConfig {
                name,
                kind: PoolKind::Block { devices },
            },
            RawPool::Rbd {
                name,
                pool,
                namespace,
                conf,
                id,
                keyring,
            } => PoolConfig {
                name,
                kind: PoolKind::Rbd(RbdPoolConfig {
                    pool,
                    namespace,
                    conf,
                    id,
                    keyring,
                }),
            },
        }
    }
}

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The YAML is malformed or has unknown keys.
    #[error("parsing {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error (names the unknown key and its line).
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// A value is not acceptable.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Parses YAML text.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        // An empty file is an empty mapping.
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        let c: Config = serde_yaml_ng::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        c.validate(path)?;
        Ok(c)
    }

    /// Reads `path`; with `required` false a missing file is the embedded default.
    pub fn load(path: &Path, required: bool) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(t) => Config::parse(&t, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(Config::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |message: String| {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                message,
            })
        };
        if let Some(m) = &self.socket_mode {
            if parse_mode(m).is_none() {
                return bad(format!(
                    "socket_mode {m:?} is not an octal mode like \"0660\""
                ));
            }
        }
        if let Err(e) = self.exports.socket_access() {
            return bad(e);
        }
        let mut seen = std::collections::HashSet::new();
        for p in &self.pools {
            if let Err(e) = crate::names::check_name("pool", &p.name) {
                return bad(e.to_string());
            }
            if !seen.insert(&p.name) {
                return bad(format!("pool {:?} is defined twice", p.name));
            }
            match &p.kind {
                PoolKind::Dir { path: d, .. } if !d.is_absolute() => {
                    return bad(format!(
                        "pool {}: path {} is not absolute",
                        p.name,
                        d.display()
                    ))
                }
                PoolKind::Block { devices } if devices.is_empty() => {
                    return bad(format!("pool {}: no devices", p.name))
                }
                PoolKind::Block { devices } => {
                    if let Some(d) = devices.iter().find(|d| !d.is_absolute()) {
                        return bad(format!(
                            "pool {}: device {} is not absolute",
                            p.name,
                            d.display()
                        ));
                    }
                }
                PoolKind::Rbd(r) => {
                    if let Err(e) = crate::pool::check_rbd_config(r) {
                        return bad(format!("pool {}: {e}", p.name));
                    }
                }
                _ => {}
            }
        }
        let mut attached = std::collections::HashSet::new();
        for a in &self.attachments {
            for (what, n) in [("pool", &a.pool), ("volume", &a.volume)] {
                if let Err(e) = crate::names::check_name(what, n) {
                    return bad(format!("attachment {}/{}: {e}", a.pool, a.volume));
                }
            }
            if !attached.insert((&a.pool, &a.volume)) {
                return bad(format!(
                    "attachment {}/{} is listed twice",
                    a.pool, a.volume
                ));
            }
            if !matches!(a.logical_block_size, 0 | 512 | 4096) {
                return bad(format!(
                    "attachment {}/{}: logical_block_size {} is not 512 or 4096",
                    a.pool, a.volume, a.logical_block_size
                ));
            }
        }
        Ok(())
    }

    /// The shutdown grace period (default 30 s).
    pub fn shutdown_grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.shutdown_grace_secs.unwrap_or(30))
    }

    /// The socket's mode (default 0o660).
    pub fn socket_mode(&self) -> u32 {
        self.socket_mode
            .as_deref()
            .and_then(parse_mode)
            .unwrap_or(0o660)
    }
}

/// Parses an octal mode like "0660" or "660".
pub fn parse_mode(s: &str) -> Option<u32> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, Path::new("test.yaml"))
    }

    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut c = e.source();
        while let Some(x) = c {
            s += &format!(": {x}");
            c = x.source();
        }
        s
    }

    #[test]
    fn full_config_parses() {
        let c = parse(
            "socket: /tmp/s.sock\nsocket_mode: \"0600\"\nstate_dir: /tmp/st\n\
             exports: {num_queues: 2, queue_size: 128, direct_io: false}\n\
             pools:\n  - name: a\n    type: dir\n    path: /srv/a\n    capacity_bytes: 4096\n\
             \x20 - name: b\n    type: block\n    devices: [/dev/disk/by-id/x]\n",
        )
        .unwrap();
        assert_eq!(c.socket_mode(), 0o600);
        assert_eq!(c.exports.num_queues, 2);
        assert_eq!(
            c.pools[0].kind,
            PoolKind::Dir {
                path: "/srv/a".into(),
                capacity_bytes: 4096
            }
        );
        assert_eq!(
            c.pools[1].kind,
            PoolKind::Block {
                devices: vec!["/dev/disk/by-id/x".into()]
            }
        );
    }

    #[test]
    fn empty_config_is_the_default() {
        assert_eq!(parse("").unwrap(), Config::default());
        assert_eq!(Config::default().socket_mode(), 0o660);
    }

    #[test]
    fn unknown_top_level_key_is_named() {
        let e = parse("sokcet: /x\n").unwrap_err();
        assert!(chain(&e).contains("sokcet"), "{}", chain(&e));
    }

    #[test]
    fn unknown_pool_key_is_named() {
        let e = parse("pools:\n  - name: a\n    type: dir\n    path: /a\n    colour: red\n")
            .unwrap_err();
        assert!(chain(&e).contains("colour"), "{}", chain(&e));
    }

    #[test]
    fn unknown_export_key_is_named() {
        let e = parse("exports: {queues: 3}\n").unwrap_err();
        assert!(chain(&e).contains("queues"), "{}", chain(&e));
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(parse("socket_mode: rw\n").is_err());
        assert!(parse("pools:\n  - {name: a, type: dir, path: rel}\n").is_err());
        assert!(parse("pools:\n  - {name: a/b, type: dir, path: /a}\n").is_err());
        assert!(parse("pools:\n  - {name: a, type: block, devices: []}\n").is_err());
        assert!(parse("pools:\n  - {name: a, type: tape, path: /a}\n").is_err());
    }

    #[test]
    fn hotplug_attachments_and_io_timeout_parse_in_any_order() {
        let c = parse(
            "hotplug: {enabled: true}\n\
             attachments:\n  - {pool: nvme, volume: vm1, logical_block_size: 4096}\n\
             \x20 - {pool: nvme, volume: vm2, read_only: true, num_queues: 2}\n\
             exports: {io_timeout_ms: 5000}\n\
             pools:\n  - {name: nvme, type: block, devices: [/dev/loop0]}\n",
        )
        .unwrap();
        assert!(c.hotplug.enabled);
        assert_eq!(c.exports.io_timeout_ms, 5000);
        assert_eq!(c.exports.queue_size, 1024);
        assert_eq!(c.attachments.len(), 2);
        assert_eq!(
            c.attachments[1],
            AttachmentConfig {
                pool: "nvme".into(),
                volume: "vm2".into(),
                logical_block_size: 0,
                read_only: true,
                num_queues: 2,
                queue_size: 0,
            }
        );
        let d = Config::default();
        assert!(d.hotplug.enabled);
        assert_eq!(d.exports.io_timeout_ms, DEFAULT_IO_TIMEOUT_MS);
        assert!(
            !parse("hotplug: {enabled: false}\n")
                .unwrap()
                .hotplug
                .enabled
        );
    }

    #[test]
    fn hotplug_and_attachment_keys_are_checked() {
        let e = parse("hotplug: {enable: true}\n").unwrap_err();
        assert!(chain(&e).contains("enable"), "{}", chain(&e));
        let e = parse("attachments:\n  - {pool: a, volume: b, queues: 2}\n").unwrap_err();
        assert!(chain(&e).contains("queues"), "{}", chain(&e));
        assert!(parse("attachments:\n  - {pool: a}\n").is_err());
        assert!(parse("attachments:\n  - {pool: a, volume: b/c}\n").is_err());
        assert!(
            parse("attachments:\n  - {pool: a, volume: b, logical_block_size: 1024}\n").is_err()
        );
        assert!(
            parse("attachments:\n  - {pool: a, volume: b}\n  - {pool: a, volume: b}\n").is_err()
        );
    }

    #[test]
    fn missing_optional_file_is_the_default() {
        let c = Config::load(Path::new("/nonexistent/vmblkd.yaml"), false).unwrap();
        assert_eq!(c, Config::default());
        assert!(Config::load(Path::new("/nonexistent/vmblkd.yaml"), true).is_err());
    }
}
