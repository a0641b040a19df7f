//! The request path: pingora's `ProxyHttp` callbacks, one named phase each.
//!
//! 1. `early_request_filter`: timeouts — plain HTTP gets `server.http_read_timeout`, an
//!    upgrade request gets `tunnel.idle_timeout` (or none), never pingora's 60 s default.
//! 2. `request_filter`: client identity (trusted proxies), per-client admission, hash key.
//! 3. `upstream_peer`: sticky cookie or the ring; the per-backend upgrade cap.
//! 4. `fail_to_connect`: passive ejection and a retry on the next ring node.
//! 5. `upstream_request_filter`: forwarding headers and the request id.
//! 6. `response_filter`: tunnel accounting, sticky cookie, metrics.
//! 7. `fail_to_proxy`: every rejection answers its status with `Retry-After`.
//! 8. `logging`: idle-timeout accounting when a tunnel ends.

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType};
use ringcast_shared::config::{EdgeConfig, HashSource};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::key::{self, TrustedProxies};
use crate::limits::{ClientLimits, ClientSlot, Limit};
use crate::metrics;
use crate::pool::{BackendState, Pool, lock};

/// How many backends one request may try before it fails.
const MAX_CONNECT_ATTEMPTS: usize = 8;

/// Request-path settings taken from the config at start (a reload changes only backends).
pub struct Settings {
    /// Plain HTTP read timeout, both directions.
    pub http_read_timeout: Duration,
    /// Tunnel idle timeout (downstream silence); `None` = off.
    pub tunnel_idle_timeout: Option<Duration>,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Hash key sources, in order.
    pub sources: Vec<HashSource>,
    /// Sticky cookie name, if stickiness is on.
    pub sticky_cookie: Option<String>,
    /// Whose forwarding headers are believed.
    pub trusted: TrustedProxies,
    /// Scheme clients used (`X-Forwarded-Proto`).
    pub scheme: &'static str,
    /// Admission limits.
    pub limits: ringcast_shared::config::LimitsConfig,
}

impl Settings {
    /// Derives the settings from a validated config.
    pub fn from_config(config: &EdgeConfig) -> Self {
        let sources = config.hash.sources.iter();
        Self {
            http_read_timeout: config.server.http_read_timeout,
            tunnel_idle_timeout: Some(config.tunnel.idle_timeout).filter(|t| !t.is_zero()),
            connect_timeout: config.health.connect_timeout,
            sources: sources.filter_map(|s| HashSource::parse(s).ok()).collect(),
            sticky_cookie: config.hash.sticky_cookie.clone(),
            trusted: TrustedProxies::new(&config.server.trusted_proxies),
            scheme: if config.server.tls_cert.is_some() {
                "https"
            } else {
                "http"
            },
            limits: config.limits.clone(),
        }
    }
}

/// The edge proxy.
pub struct Edge {
    pool: Arc<Pool>,
    settings: Settings,
    clients: Arc<ClientLimits>,
}

impl Edge {
    /// Builds the proxy over `pool`.
    pub fn new(pool: Arc<Pool>, settings: Settings) -> Self {
        Self {
            pool,
            settings,
            clients: Arc::new(ClientLimits::default()),
        }
    }
}

/// Counts one open tunnel on a backend for as long as it lives.
pub struct TunnelGuard {
    backend: Arc<BackendState>,
    opened: Instant,
}

impl TunnelGuard {
    fn open(backend: Arc<BackendState>) -> Self {
        backend.tunnels.fetch_add(1, Ordering::Relaxed);
        metrics::tunnel_delta(&backend.id, 1);
        Self {
            backend,
            opened: Instant::now(),
        }
    }
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.backend.tunnels.fetch_sub(1, Ordering::Relaxed);
        metrics::tunnel_delta(&self.backend.id, -1);
    }
}

/// Per-request state.
#[derive(Default)]
pub struct Ctx {
    upgrade: bool,
    client_ip: Option<IpAddr>,
    key: Vec<u8>,
    backend: Option<Arc<BackendState>>,
    tried: Vec<SocketAddr>,
    reject: Option<Limit>,
    sticky_hit: bool,
    request_id: String,
    client_slot: Option<ClientSlot>,
    tunnel: Option<TunnelGuard>,
}

fn peer_ip(session: &Session) -> IpAddr {
    session
        .client_addr()
        .and_then(|addr| addr.as_inet().map(|a| a.ip()))
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

fn status_error(status: u16, why: &'static str) -> Box<Error> {
    Error::explain(ErrorType::HTTPStatus(status), why)
}

impl Edge {
    /// Sticky cookie first (while its backend takes new clients), then the ring.
    fn choose(&self, session: &Session, ctx: &mut Ctx) -> Option<Arc<BackendState>> {
        if let Some(name) = &self.settings.sticky_cookie {
            let named = key::cookie(&session.req_header().headers, name)
                .and_then(|id| self.pool.get(id))
                .filter(|b| b.accepts_new() && !ctx.tried.contains(&b.address));
            if let Some(backend) = named {
                ctx.sticky_hit = true;
                return Some(backend);
            }
        }
        ctx.sticky_hit = false;
        self.pool.select(&ctx.key, &ctx.tried)
    }

    fn admit_client(&self, ctx: &mut Ctx, client: IpAddr) -> Result<(), Limit> {
        let limits = &self.settings.limits;
        let slot = self.clients.admit(
            client,
            limits.client_concurrent,
            limits.client_requests_per_second,
        )?;
        ctx.client_slot = Some(slot);
        Ok(())
    }

    async fn write_rejection(&self, session: &mut Session, limit: Limit) -> Result<()> {
        metrics::rejection(limit.label());
        if ctx_upgrade(session) {
            metrics::upgrade("", "rejected");
        }
        let retry_after = self.settings.limits.retry_after.as_secs().max(1);
        let mut response = ResponseHeader::build(limit.status(), Some(4))?;
        response.insert_header("Retry-After", retry_after.to_string())?;
        response.insert_header("Content-Length", "0")?;
        response.insert_header("Connection", "close")?;
        session.set_keepalive(None);
        session
            .write_response_header(Box::new(response), true)
            .await
    }

    fn forwarding_headers(
        &self,
        session: &Session,
        request: &mut RequestHeader,
        ctx: &Ctx,
    ) -> Result<()> {
        let peer = peer_ip(session);
        let trusted = self.settings.trusted.contains(peer);
        let prior = request
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let forwarded_for = match prior {
            Some(chain) if trusted => format!("{chain}, {peer}"),
            _ => peer.to_string(),
        };
        request.insert_header("X-Forwarded-For", forwarded_for)?;
        let proto_given = request.headers.contains_key("x-forwarded-proto");
        if !(trusted && proto_given) {
            request.insert_header("X-Forwarded-Proto", self.settings.scheme)?;
        }
        request.insert_header("X-Request-Id", ctx.request_id.as_str())?;
        Ok(())
    }
}

fn ctx_upgrade(session: &Session) -> bool {
    session.is_upgrade_req()
}

fn request_id(session: &Session, trusted: bool) -> String {
    let given = session.req_header().headers.get("x-request-id");
    match given.and_then(|v| v.to_str().ok()) {
        Some(id) if trusted && !id.is_empty() && id.len() <= 128 => id.to_owned(),
        _ => uuid::Uuid::new_v4().to_string(),
    }
}

#[async_trait]
impl ProxyHttp for Edge {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::default()
    }

    async fn early_request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        ctx.upgrade = session.is_upgrade_req();
        let timeout = if ctx.upgrade {
            self.settings.tunnel_idle_timeout
        } else {
            Some(self.settings.http_read_timeout)
        };
        session.set_read_timeout(timeout);
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let peer = peer_ip(session);
        let headers = &session.req_header().headers;
        let client = self.settings.trusted.client_ip(peer, headers);
        ctx.client_ip = Some(client);
        ctx.request_id = request_id(session, self.settings.trusted.contains(peer));

        if let Err(limit) = self.admit_client(ctx, client) {
            tracing::debug!(client = %client, limit = limit.label(), "request rejected");
            self.write_rejection(session, limit).await?;
            return Ok(true);
        }

        let header = session.req_header();
        ctx.key = key::hash_key(
            &self.settings.sources,
            header.uri.query(),
            &header.headers,
            client,
        );
        Ok(false)
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let Some(backend) = self.choose(session, ctx) else {
            tracing::warn!(tried = ctx.tried.len(), "no backend takes new connections");
            ctx.reject = Some(Limit::NoBackend);
            return Err(status_error(503, "no backend takes new connections"));
        };

        let cap = self.settings.limits.backend_upgrades_per_second;
        if ctx.upgrade && !lock(&backend.upgrade_window).try_take(Instant::now(), cap) {
            tracing::debug!(backend = %backend.id, "backend upgrade rate cap reached");
            ctx.reject = Some(Limit::BackendUpgradeRate);
            return Err(status_error(503, "backend upgrade rate cap reached"));
        }
        if !ctx.tried.is_empty() {
            metrics::retry();
        }

        let mut peer = HttpPeer::new(backend.address, false, String::new());
        peer.options.connection_timeout = Some(self.settings.connect_timeout);
        peer.options.read_timeout = (!ctx.upgrade).then_some(self.settings.http_read_timeout);
        tracing::trace!(backend = %backend.id, upgrade = ctx.upgrade, "backend chosen");
        ctx.backend = Some(backend);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(backend) = ctx.backend.take() {
            tracing::warn!(backend = %backend.id, error = %e, "upstream connect failed");
            self.pool.passive_failure(backend.address);
            ctx.tried.push(backend.address);
        }
        e.set_retry(ctx.tried.len() < MAX_CONNECT_ATTEMPTS);
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        self.forwarding_headers(session, request, ctx)
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(backend) = ctx.backend.clone() else {
            return Ok(());
        };
        backend.new_connections.fetch_add(1, Ordering::Relaxed);
        match (ctx.upgrade, response.status.as_u16()) {
            (true, 101) => {
                metrics::upgrade(&backend.id, "switched");
                ctx.tunnel = Some(TunnelGuard::open(backend.clone()));
            }
            (true, _) => metrics::upgrade(&backend.id, "refused"),
            (false, _) => metrics::request(&backend.id),
        }
        if let Some(name) = &self.settings.sticky_cookie
            && !ctx.sticky_hit
        {
            let cookie = format!("{name}={}; Path=/; HttpOnly", backend.id);
            response.append_header("Set-Cookie", cookie)?;
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        if let Some(limit) = ctx.reject {
            if let Err(err) = self.write_rejection(session, limit).await {
                tracing::debug!(error = %err, "could not write the rejection");
            }
            return FailToProxy {
                error_code: limit.status(),
                can_reuse_downstream: false,
            };
        }
        let code = match (e.etype(), e.esource()) {
            (ErrorType::HTTPStatus(code), _) => *code,
            (_, ErrorSource::Upstream) => 502,
            (ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed, _) => 0,
            (ErrorType::ReadTimedout, ErrorSource::Downstream) => 0,
            (_, ErrorSource::Downstream) => 400,
            _ => 500,
        };
        if code > 0
            && let Err(err) = session.respond_error(code).await
        {
            tracing::debug!(error = %err, "could not write the error response");
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, _session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let Some(tunnel) = ctx.tunnel.take() else {
            return;
        };
        let lived_ms = u64::try_from(tunnel.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        let idle = e.is_some_and(|e| {
            *e.etype() == ErrorType::ReadTimedout && *e.esource() == ErrorSource::Downstream
        });
        if idle {
            metrics::idle_timeout();
            tracing::info!(backend = %tunnel.backend.id, lived_ms, request_id = %ctx.request_id,
                "tunnel closed: idle timeout");
        } else {
            tracing::debug!(backend = %tunnel.backend.id, lived_ms, error = ?e.map(|e| e.to_string()),
                "tunnel closed");
        }
    }
}
