//! Daemon startup and shutdown: configuration, the state-directory lock, stale bridge
//! cleanup, crash recovery, the unix socket (mode 0660 by default), gRPC health and
//! reflection, and a clean stop on SIGTERM/SIGINT.
//!
//! Startup order (whatever order the configuration file lists things in):
//!
//! ```text
//!  uevent socket opened (events queue, unread) ─► pools, volumes, recorded attachments
//!  restored ─► configured attachments exported ─► hotplug monitor started (queued events,
//!  then a full reconcile) ─► gRPC socket bound
//! ```

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio_stream::wrappers::UnixListenerStream;
use vmblk_proto::v1::storage_driver_server::StorageDriverServer;

use crate::config::{Config, DEFAULT_CONFIG_PATH, DEFAULT_SOCKET, DEFAULT_STATE_DIR};
use crate::driver::{Driver, DriverParams};
use crate::export::VhostExporter;
use crate::hotplug::Monitor;
use crate::service::Service;

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// vmblkd's command line.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "vmblkd",
    version,
    about = "gRPC storage driver for VM block volumes"
)]
pub struct Args {
    /// Configuration file (default /etc/vmblk/vmblkd.yaml, if it exists).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// State directory (overrides the configuration; default /var/lib/vmblk).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// gRPC unix socket (overrides the configuration; default /run/vmblk/vmblkd.sock).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Log format on standard error.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// More logging (-v debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// Sets up logging.
pub fn init_tracing(format: LogFormat, verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = if verbose > 0 { "debug" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

/// The daemon's settings after merging the file, the flags and the defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The parsed configuration.
    pub config: Config,
    /// gRPC socket.
    pub socket: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// Export sockets' directory.
    pub export_dir: PathBuf,
}

impl Settings {
    /// Reads the configuration and applies the flags.
    pub fn resolve(args: &Args) -> anyhow::Result<Settings> {
        let config = match &args.config {
            Some(p) => Config::load(p, true)?,
            None => Config::load(Path::new(DEFAULT_CONFIG_PATH), false)?,
        };
        let socket = args
            .socket
            .clone()
            .or_else(|| config.socket.clone())
            .unwrap_or_else(|| DEFAULT_SOCKET.into());
        let state_dir = args
            .state_dir
            .clone()
            .or_else(|| config.state_dir.clone())
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        let export_dir = config.export_dir.clone().unwrap_or_else(|| {
            socket
                .parent()
                .unwrap_or(Path::new("/run/vmblk"))
                .join("exports")
        });
        Ok(Settings {
            config,
            socket,
            state_dir,
            export_dir,
        })
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(args: Args) -> anyhow::Result<()> {
    let settings = Settings::resolve(&args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vmblkd")
        .build()
        .context("starting the runtime")?;
    let r = rt.block_on(serve(settings));
    // Do not wait for an operation abandoned after the grace period.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    r
}

fn lock_state_dir(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let p = dir.join("vmblkd.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .with_context(|| format!("opening {}", p.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "{}: another vmblkd uses this state directory ({e})",
            p.display()
        )
    })
}

fn bind(socket: &Path, mode: u32) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            bail!("{}: another server is listening there", socket.display());
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale {}", socket.display()))?;
    }
    let l = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", socket.display()))?;
    Ok(l)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
}

/// Serves `settings` until a stop signal.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    let _lock = lock_state_dir(&settings.state_dir)?;
    tracing::info!(
        pools = settings.config.pools.len(),
        "configuration loaded{}",
        if settings.config == Config::default() {
            " (embedded default)"
        } else {
            ""
        }
    );
    match loop_bridge::cleanup_stale_bridges() {
        Ok(removed) if !removed.is_empty() => {
            tracing::warn!(
                count = removed.len(),
                "removed loop bridges left by dead processes"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot look for stale loop bridges"),
    }
    let params = DriverParams {
        state_dir: settings.state_dir.clone(),
        export_dir: settings.export_dir.clone(),
        config: settings.config.clone(),
        exporter: Box::new(VhostExporter),
        #[cfg(feature = "test-hooks")]
        pause: crate::test_hooks::Pause::from_env(),
    };
    // The uevent socket is bound before anything is restored, so no hot-remove or re-add
    // that happens meanwhile is lost; its events are read only once everything
    // configured is in place (an early reader would race the restore).
    let monitor = if settings.config.hotplug.enabled {
        match Monitor::open() {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::error!(error = %e, "cannot open the kernel uevent socket: hotplug is off");
                None
            }
        }
    } else {
        tracing::info!("hotplug disabled by the configuration");
        None
    };
    let driver = tokio::task::spawn_blocking(move || {
        let d = Driver::open(params)?;
        d.apply_configured_attachments();
        Ok::<_, crate::error::Error>(d)
    })
    .await?
    .map_err(|e| anyhow::anyhow!("{}", e.chain()))?;
    let mut hotplug = match monitor {
        Some(m) => Some(
            m.start(Arc::clone(&driver) as Arc<dyn crate::hotplug::HotplugHost>)
                .context("starting the hotplug monitor")?,
        ),
        None => None,
    };
    let images =
        settings.config.incus.follow_images.then(|| {
            crate::incus_images::start(Arc::clone(&driver), settings.config.incus.clone())
        });
    let listener = bind(&settings.socket, settings.config.socket_mode())?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<StorageDriverServer<Service>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(vmblk_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(vmblk_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    tracing::info!(
        socket = %settings.socket.display(),
        state_dir = %settings.state_dir.display(),
        pools = driver.list_pools().len(),
        "vmblkd serving"
    );
    let d2 = Arc::clone(&driver);
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown_signal().await;
        let _ = stopping_tx.send(());
    };
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(StorageDriverServer::new(Service::new(driver)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), signal);
    // Running operations get a grace period to finish; one that does not is abandoned
    // like a crash (its volume stays CREATING and is removed at the next start).
    let grace_period = settings.config.shutdown_grace();
    let grace = async move {
        if stopping_rx.await.is_ok() {
            tokio::time::sleep(grace_period).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = server => r?,
        () = grace => tracing::warn!(
            grace_secs = grace_period.as_secs(),
            "operations still running after the grace period; stopping without them"
        ),
    }
    if let Some(t) = images {
        t.abort();
    }
    tokio::task::spawn_blocking(move || {
        if let Some(h) = hotplug.as_mut() {
            h.stop();
        }
        d2.shutdown()
    })
    .await?;
    let _ = std::fs::remove_file(&settings.socket);
    tracing::info!("vmblkd stopped");
    Ok(())
}
