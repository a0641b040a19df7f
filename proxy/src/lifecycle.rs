//! Process lifecycle: building the pingora server from the config, the background tasks
//! (health checks, admin listener, SIGHUP reload) and the reload itself.
//!
//! A reload re-reads the config file and applies only the backend list (additions,
//! removals, address or weight changes); other sections need a restart or a graceful
//! upgrade (`-u`). Neither closes a tunnel: removed backends keep their open tunnels.

use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{DEFAULT_L4_WRITE_BUFFER_SIZE, L4BufferSettings, ListenerConfig};
use pingora::server::Server;
use pingora::server::ShutdownWatch;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::services::background::{BackgroundService, background_service};
use ringcast_shared::config::{self, ConfigError, EdgeConfig};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::admin::{self, AdminState};
use crate::health;
use crate::pool::Pool;
use crate::proxy::{Edge, Settings};
use crate::tunnel::Tunnels;

/// Re-reads the config file and applies its backend list.
pub struct Reloader {
    path: PathBuf,
    pool: Arc<Pool>,
}

impl Reloader {
    /// A reloader for the file at `path`.
    pub fn new(path: PathBuf, pool: Arc<Pool>) -> Self {
        Self { path, pool }
    }

    /// Applies the file's backend list; a bad file changes nothing.
    ///
    /// # Errors
    /// The config error (file, key, problem) when the file does not validate.
    pub async fn reload(&self) -> Result<String, ConfigError> {
        let config: EdgeConfig = config::load(&self.path)?;
        let (added, removed) = self.pool.replace_all(&config.backends).await;
        let summary = format!(
            "reloaded {}: {} backends, {added} added or changed, {removed} removed",
            self.path.display(),
            config.backends.len()
        );
        tracing::info!(added, removed, file = %self.path.display(), "configuration reloaded");
        Ok(summary)
    }
}

/// Health checks, the admin listener and the SIGHUP handler, run by pingora.
struct Tasks {
    config: EdgeConfig,
    pool: Arc<Pool>,
    reloader: Arc<Reloader>,
    tunnels: Arc<Tunnels>,
    upgrading: bool,
}

#[async_trait]
impl BackgroundService for Tasks {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        tokio::spawn(health::run(self.pool.clone(), self.config.health.clone()));
        tokio::spawn(reload_on_sighup(self.reloader.clone()));
        let Some(listener) = bind_admin(&self.config, self.upgrading).await else {
            std::process::exit(1);
        };
        let state = AdminState {
            pool: self.pool.clone(),
            reloader: self.reloader.clone(),
        };
        tokio::select! {
            () = admin::serve(listener, state) => {}
            _ = shutdown.changed() => {
                tracing::info!("shutting down: admin listener closed");
            }
        }
        // Pingora drops whatever is left when the grace period ends; close the tunnels
        // before that, spread over most of it.
        let window = self.config.server.grace_period.mul_f64(CLOSE_WINDOW_SHARE);
        self.tunnels.close_spread(window).await;
    }
}

/// Share of the grace period over which the remaining tunnels are closed.
const CLOSE_WINDOW_SHARE: f64 = 0.8;

/// Binds the admin listener. During a graceful upgrade the old process still holds the
/// port until it sees its shutdown signal, so the bind is retried for a while.
async fn bind_admin(config: &EdgeConfig, upgrading: bool) -> Option<tokio::net::TcpListener> {
    let address = config.admin.listen;
    let attempts = if upgrading { 150 } else { 1 };
    for attempt in 1..=attempts {
        match tokio::net::TcpListener::bind(address).await {
            Ok(listener) => {
                tracing::info!(address = %address, "admin listener ready");
                return Some(listener);
            }
            Err(err) if attempt == attempts => {
                tracing::error!(address = %address, error = %err, "cannot bind admin.listen");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    None
}

async fn reload_on_sighup(reloader: Arc<Reloader>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot listen for SIGHUP; reload only through the admin API");
        return;
    };
    while hangups.recv().await.is_some() {
        if let Err(err) = reloader.reload().await {
            tracing::error!(error = %err, "reload failed; backends unchanged");
        }
    }
}

fn seconds_rounded_up(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

fn server_conf(config: &EdgeConfig) -> ServerConf {
    let server = &config.server;
    ServerConf {
        threads: server.threads,
        grace_period_seconds: Some(seconds_rounded_up(server.grace_period)),
        graceful_shutdown_timeout_seconds: Some(seconds_rounded_up(server.shutdown_timeout)),
        upgrade_sock: server.upgrade_socket.display().to_string(),
        pid_file: server.pid_file.display().to_string(),
        ..ServerConf::default()
    }
}

/// Builds and runs the edge; returns only on a start-up failure.
///
/// # Errors
/// When the pool cannot be built or a listener cannot be set up.
pub fn run(path: PathBuf, config: EdgeConfig, upgrading: bool) -> anyhow::Result<()> {
    let pool = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(Pool::new(&config.backends, config.health.clone()));
    let opt = Opt {
        upgrade: upgrading,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf(&config));
    server.bootstrap();

    let tunnels = Arc::new(Tunnels::default());
    let edge = Edge::new(
        pool.clone(),
        Settings::from_config(&config),
        tunnels.clone(),
    );
    let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, edge);
    let listen = config.server.listen.to_string();
    // No read buffer under the client connection: pingora's default is 64 KiB per
    // accepted connection, zero-filled, which would stay resident for every idle tunnel.
    // The HTTP parser and the tunnel read into their own buffers, so nothing needs it.
    let mut listener = ListenerConfig::tcp(listen.as_str())
        .l4_buffer(L4BufferSettings::new(0, DEFAULT_L4_WRITE_BUFFER_SIZE));
    if let (Some(cert), Some(key)) = (&config.server.tls_cert, &config.server.tls_key) {
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        let tls = TlsSettings::intermediate(&cert, &key)
            .map_err(|err| anyhow::anyhow!("server.tls_cert/tls_key: {err}"))?;
        listener = listener.tls(tls);
    }
    proxy.add_listener(listener);
    tracing::info!(listen = %listen, backends = config.backends.len(), "edge starting");

    let reloader = Arc::new(Reloader::new(path, pool.clone()));
    let tasks = Tasks {
        config,
        pool,
        reloader,
        tunnels,
        upgrading,
    };
    server.add_service(proxy);
    server.add_service(background_service("ringcast-edge tasks", tasks));
    server.run_forever();
}
