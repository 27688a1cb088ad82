//! Cluster connections (`rados_t`) and pool contexts (`rados_ioctx_t`).

use std::ffi::CString;
use std::path::PathBuf;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{check, cstring, RbdError};
use crate::ffi;
use crate::spec::RbdSpec;

/// How long connecting waits for the monitors by default (librados' own default,
/// `client_mount_timeout`, is 300 s: a cluster that is down would hang the caller).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// What a connection needs: the conf file, the client id, and other librados options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterOptions {
    /// ceph.conf to read; `None`: librados' default search (`$CEPH_CONF`,
    /// /etc/ceph/ceph.conf, ...).
    pub conf: Option<PathBuf>,
    /// Client id (`client.ID`); `None`: `admin`.
    pub id: Option<String>,
    /// Other librados options set after the conf file is read (`keyring`, `mon_host`, ...).
    pub options: Vec<(String, String)>,
    /// Longest wait for the monitors when connecting (and for monitor operations).
    pub connect_timeout: Option<Duration>,
    /// Longest wait for an OSD operation (`rados_osd_op_timeout`): an I/O the cluster does
    /// not answer in time fails with ETIMEDOUT instead of waiting for the cluster.
    pub op_timeout: Option<Duration>,
}

impl ClusterOptions {
    /// The connection an address asks for.
    pub fn from_spec(spec: &RbdSpec) -> ClusterOptions {
        ClusterOptions {
            conf: spec.conf.as_ref().map(PathBuf::from),
            id: spec.id.clone(),
            options: spec.options.clone(),
            connect_timeout: None,
            op_timeout: None,
        }
    }

    /// "client.ID (conf PATH)", for messages.
    pub fn describe(&self) -> String {
        let id = self.id.as_deref().unwrap_or("admin");
        match &self.conf {
            Some(c) => format!("client.{id}, conf {}", c.display()),
            None => format!("client.{id}, default conf"),
        }
    }
}

/// A connected cluster handle. librados handles are thread-safe.
#[derive(Debug)]
pub struct Cluster {
    handle: ffi::rados_t,
    what: String,
}

// SAFETY: a connected rados_t may be used from any thread concurrently (librados
// serialises internally; QEMU and SPDK share one across threads); it is only shut down in
// Drop, when no other reference exists.
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

fn secs(d: Duration) -> String {
    // librados takes whole seconds here; never 0 (which means "no timeout").
    d.as_secs().max(1).to_string()
}

impl Cluster {
    /// Connects (blocking: up to the connect timeout when the monitors do not answer).
    pub fn connect(opts: &ClusterOptions) -> Result<Arc<Cluster>, RbdError> {
        let what = opts.describe();
        let name = format!("client.{}", opts.id.as_deref().unwrap_or("admin"));
        let c_name = cstring(&name, || format!("client id {name:?}"))?;
        let c_cluster = cstring("ceph", String::new)?;
        let mut handle: ffi::rados_t = ptr::null_mut();
        // SAFETY: `handle` is a valid out-pointer; the strings are NUL-terminated and
        // outlive the call.
        let r = unsafe { ffi::rados_create2(&mut handle, c_cluster.as_ptr(), c_name.as_ptr(), 0) };
        check(i64::from(r), "create a cluster handle for", || what.clone())?;
        // From here on Drop shuts the handle down.
        let cluster = Cluster {
            handle,
            what: what.clone(),
        };
        match &opts.conf {
            Some(path) => {
                let p = path.to_string_lossy();
                let c_path = cstring(&p, || format!("conf path {p:?}"))?;
                // SAFETY: the handle is live; the path is NUL-terminated for the call.
                let r = unsafe { ffi::rados_conf_read_file(cluster.handle, c_path.as_ptr()) };
                check(i64::from(r), "read Ceph conf", || p.to_string())?;
            }
            None => {
                // SAFETY: the handle is live; NULL asks for the default search path.
                let r = unsafe { ffi::rados_conf_read_file(cluster.handle, ptr::null()) };
                // No default ceph.conf is fine (QEMU goes on too): the options given
                // (mon_host, keyring) may be all the client needs.
                if r < 0 && r != -libc::ENOENT {
                    check(i64::from(r), "read the default Ceph conf for", || {
                        what.clone()
                    })?;
                }
            }
        }
        let connect = opts.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        cluster.set("client_mount_timeout", &secs(connect))?;
        cluster.set("rados_mon_op_timeout", &secs(connect))?;
        if let Some(t) = opts.op_timeout {
            cluster.set("rados_osd_op_timeout", &secs(t))?;
        }
        for (k, v) in &opts.options {
            cluster.set(k, v)?;
        }
        // SAFETY: the handle is live and configured; connect blocks until the monitors
        // answer or the mount timeout passes.
        let r = unsafe { ffi::rados_connect(cluster.handle) };
        check(i64::from(r), "connect to the Ceph cluster", || what.clone())?;
        Ok(Arc::new(cluster))
    }

    /// Sets a librados option.
    fn set(&self, key: &str, value: &str) -> Result<(), RbdError> {
        let k = cstring(key, || format!("option name {key:?}"))?;
        let v = cstring(value, || format!("value of option {key}"))?;
        // SAFETY: the handle is live; both strings are NUL-terminated for the call.
        let r = unsafe { ffi::rados_conf_set(self.handle, k.as_ptr(), v.as_ptr()) };
        check(i64::from(r), "set Ceph option", || format!("{key}={value}"))?;
        Ok(())
    }

    /// A context for `pool` (and `namespace`, "" for the default).
    pub fn pool(self: &Arc<Cluster>, pool: &str, namespace: &str) -> Result<Arc<IoCtx>, RbdError> {
        let what = if namespace.is_empty() {
            format!("pool {pool}")
        } else {
            format!("pool {pool} namespace {namespace}")
        };
        let c_pool = cstring(pool, || what.clone())?;
        let mut io: ffi::rados_ioctx_t = ptr::null_mut();
        // SAFETY: the cluster is connected; `io` is a valid out-pointer; the pool name is
        // NUL-terminated for the call.
        let r = unsafe { ffi::rados_ioctx_create(self.handle, c_pool.as_ptr(), &mut io) };
        check(i64::from(r), "open", || format!("{what} ({})", self.what))?;
        let ctx = IoCtx {
            handle: io,
            cluster: self.clone(),
            what,
        };
        if !namespace.is_empty() {
            let c_ns: CString = cstring(namespace, || ctx.what.clone())?;
            // SAFETY: the context is live; the namespace string is copied by librados.
            unsafe { ffi::rados_ioctx_set_namespace(ctx.handle, c_ns.as_ptr()) };
        }
        Ok(Arc::new(ctx))
    }

    /// This client's address as the OSDs see it (what a blocklist entry names).
    pub fn address(&self) -> Result<String, RbdError> {
        let mut addrs: *mut libc::c_char = ptr::null_mut();
        // SAFETY: the cluster is connected; `addrs` is a valid out-pointer, set to a
        // buffer librados allocates and `rados_buffer_free` frees.
        let r = unsafe { ffi::rados_getaddrs(self.handle, &mut addrs) };
        check(i64::from(r), "read the client address of", || {
            self.what.clone()
        })?;
        if addrs.is_null() {
            return Ok(String::new());
        }
        // SAFETY: on success `addrs` is a NUL-terminated string owned by librados.
        let s = unsafe { std::ffi::CStr::from_ptr(addrs) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: `addrs` came from rados_getaddrs and is freed once.
        unsafe { ffi::rados_buffer_free(addrs) };
        Ok(s)
    }

    /// "client.ID, conf PATH", for messages.
    pub fn describe(&self) -> &str {
        &self.what
    }

    /// Total and available bytes of the cluster's storage.
    pub fn capacity(&self) -> Result<(u64, u64), RbdError> {
        // SAFETY: rados_cluster_stat_t is integers: all-zero is valid.
        let mut st: ffi::rados_cluster_stat_t = unsafe { std::mem::zeroed() };
        // SAFETY: the cluster is connected; `st` is a writable struct of the right type.
        let r = unsafe { ffi::rados_cluster_stat(self.handle, &mut st) };
        check(
            i64::from(r),
            "read the capacity of the Ceph cluster",
            || self.what.clone(),
        )?;
        Ok((st.kb.saturating_mul(1024), st.kb_avail.saturating_mul(1024)))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle was created by rados_create2 and every IoCtx (which holds an
        // Arc of this) is gone; it is shut down once.
        unsafe { ffi::rados_shutdown(self.handle) };
    }
}

/// An open pool (and namespace). Keeps its cluster connected.
#[derive(Debug)]
pub struct IoCtx {
    pub(crate) handle: ffi::rados_ioctx_t,
    cluster: Arc<Cluster>,
    what: String,
}

// SAFETY: an ioctx may be used from several threads for independent operations (librados
// documents it thread-safe except for changing its settings, done only at creation).
unsafe impl Send for IoCtx {}
// SAFETY: as above.
unsafe impl Sync for IoCtx {}

impl IoCtx {
    /// The cluster this context belongs to.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// "pool P[ namespace N]", for messages.
    pub fn describe(&self) -> &str {
        &self.what
    }
}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create; every Image (holding an Arc of this) is
        // closed; destroyed once.
        unsafe { ffi::rados_ioctx_destroy(self.handle) };
    }
}
