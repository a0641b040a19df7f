//! The request path: pingora's `ProxyHttp` callbacks, one named phase each.
//!
//! 1. `early_request_filter`: plain HTTP gets `server.http_read_timeout`; an upgrade gets
//!    no pingora read timeout at all (its tunnel applies `tunnel.idle_timeout` itself).
//! 2. `request_filter`: client identity (trusted proxies), per-client admission, hash key;
//!    upgrades are then handled completely by `Edge::handle_upgrade` and [`tunnel`].
//! 3. `upstream_peer` (plain HTTP): sticky cookie or the ring.
//! 4. `fail_to_connect` / `error_while_proxy`: passive ejection and a retry on the next
//!    ring node while nothing has reached the client.
//! 5. `upstream_request_filter`: forwarding headers and the request id.
//! 6. `response_filter`: sticky cookie, metrics.
//! 7. `fail_to_proxy`: every rejection answers its status with `Retry-After`.

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
use crate::tunnel;

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
    pub limits: ringcast_shared::config::EdgeLimitsConfig,
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
    tunnels: Arc<tunnel::Tunnels>,
}

impl Edge {
    /// Builds the proxy over `pool`; its tunnels are registered in `tunnels`.
    pub fn new(pool: Arc<Pool>, settings: Settings, tunnels: Arc<tunnel::Tunnels>) -> Self {
        Self {
            pool,
            settings,
            clients: Arc::new(ClientLimits::default()),
            tunnels,
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
        if session.is_upgrade_req() {
            metrics::upgrade("-", "rejected");
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

    /// `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Request-Id` for the upstream request.
    fn forwarding_values(&self, session: &Session, ctx: &Ctx) -> Vec<(&'static str, String)> {
        let peer = peer_ip(session);
        let trusted = self.settings.trusted.contains(peer);
        let headers = &session.req_header().headers;
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let forwarded_for = match text("x-forwarded-for") {
            Some(chain) if trusted => format!("{chain}, {peer}"),
            _ => peer.to_string(),
        };
        let proto = match text("x-forwarded-proto") {
            Some(proto) if trusted => proto.to_owned(),
            _ => self.settings.scheme.to_owned(),
        };
        vec![
            ("X-Forwarded-For", forwarded_for),
            ("X-Forwarded-Proto", proto),
            ("X-Request-Id", ctx.request_id.clone()),
        ]
    }

    /// Picks the next backend for an upgrade; `Err` is the rejection to answer.
    fn next_upgrade_backend(
        &self,
        session: &Session,
        ctx: &mut Ctx,
    ) -> std::result::Result<Arc<BackendState>, Limit> {
        let backend = self.choose(session, ctx).ok_or(Limit::NoBackend)?;
        let cap = self.settings.limits.backend_upgrades_per_second;
        if !lock(&backend.upgrade_window).try_take(Instant::now(), cap) {
            tracing::debug!(backend = %backend.id, "backend upgrade rate cap reached");
            return Err(Limit::BackendUpgradeRate);
        }
        if !ctx.tried.is_empty() {
            metrics::retry();
        }
        Ok(backend)
    }

    /// Runs a WebSocket handshake and its tunnel (see [`crate::tunnel`]).
    async fn handle_upgrade(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let head = tunnel::request_head(session, &self.forwarding_values(session, ctx));
        // The last 503 a backend answered, passed on when no other backend can take over.
        let mut refused = None;
        let (backend, answer) = loop {
            let backend = match self.next_upgrade_backend(session, ctx) {
                Ok(backend) => backend,
                Err(limit) => {
                    if let (Limit::NoBackend, Some(last)) = (&limit, refused.take()) {
                        break last;
                    }
                    self.write_rejection(session, limit).await?;
                    return Ok(true);
                }
            };
            let (connect, answer) = (
                self.settings.connect_timeout,
                self.settings.http_read_timeout,
            );
            match tunnel::attempt(backend.address, &head, connect, answer).await {
                Ok(answer)
                    if is_draining_refusal(&answer)
                        && ctx.tried.len() + 1 < MAX_CONNECT_ATTEMPTS =>
                {
                    // A draining node refuses new clients with 503 until the health checks
                    // notice. Nothing reached the client yet: try the next ring node. This
                    // is not a failure, so the backend is not ejected.
                    tracing::info!(backend = %backend.id, "upgrade refused with 503; trying the next ring node");
                    metrics::upgrade(&backend.id, "refused_retried");
                    ctx.tried.push(backend.address);
                    refused = Some((backend, answer));
                }
                Ok(answer) => break (backend, answer),
                Err(err) => {
                    tracing::warn!(backend = %backend.id, error = %err, "upgrade attempt failed");
                    self.pool.passive_failure(backend.address);
                    ctx.tried.push(backend.address);
                }
            }
            if ctx.tried.len() >= MAX_CONNECT_ATTEMPTS {
                session.respond_error(502).await?;
                return Ok(true);
            }
        };
        backend.new_connections.fetch_add(1, Ordering::Relaxed);

        if answer.head.status.as_u16() != 101 {
            metrics::upgrade(&backend.id, "refused");
            tunnel::relay_refusal(session, answer).await?;
            return Ok(true);
        }
        let tunnel::Answer {
            mut head,
            rest,
            stream,
        } = answer;
        self.add_sticky_cookie(&mut head, &backend, ctx)?;
        session.set_keepalive(None);
        let downstream = session.as_downstream_mut();
        downstream.write_response_header(Box::new(head)).await?;
        metrics::upgrade(&backend.id, "switched");

        // The tunnel gets its own task and owns the client connection; pingora finishes
        // the request now and frees its per-request state.
        let client = tunnel::take_client(session).await?;
        let guard = TunnelGuard::open(backend.clone());
        let handle = self.tunnels.register();
        let idle = self.settings.tunnel_idle_timeout;
        let client_slot = ctx.client_slot.take();
        let request_id = std::mem::take(&mut ctx.request_id);
        tokio::spawn(async move {
            let end = tunnel::relay(client, stream, rest, idle, &handle).await;
            tunnel::record_end(&backend, end, guard.opened, &request_id);
            drop((guard, client_slot));
        });
        Ok(true)
    }

    fn add_sticky_cookie(
        &self,
        head: &mut ResponseHeader,
        backend: &BackendState,
        ctx: &Ctx,
    ) -> Result<()> {
        if let Some(name) = &self.settings.sticky_cookie
            && !ctx.sticky_hit
        {
            let cookie = format!("{name}={}; Path=/; HttpOnly", backend.id);
            head.append_header("Set-Cookie", cookie)?;
        }
        Ok(())
    }
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
        // Upgrades are relayed by `tunnel`, which applies its own idle timeout.
        let timeout = (!ctx.upgrade).then_some(self.settings.http_read_timeout);
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
        if ctx.upgrade {
            return self.handle_upgrade(session, ctx).await;
        }
        Ok(false)
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let Some(backend) = self.choose(session, ctx) else {
            tracing::warn!(tried = ctx.tried.len(), "no backend takes new connections");
            ctx.reject = Some(Limit::NoBackend);
            return Err(status_error(503, "no backend takes new connections"));
        };

        if !ctx.tried.is_empty() {
            metrics::retry();
        }

        let mut peer = HttpPeer::new(backend.address, false, String::new());
        peer.options.connection_timeout = Some(self.settings.connect_timeout);
        peer.options.read_timeout = Some(self.settings.http_read_timeout);
        tracing::trace!(backend = %backend.id, "backend chosen");
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

    /// A backend that dies between accepting the connection and answering (e.g. killed
    /// with connections in its accept queue) is treated like a connect failure: nothing
    /// reached the client yet, so an idempotent request retries on the next ring node.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let safe = session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated();
        let unanswered = session.response_written().is_none();
        if !safe {
            e.set_retry(false);
        } else if unanswered && *e.esource() == ErrorSource::Upstream && !client_reused {
            if let Some(backend) = ctx.backend.take() {
                tracing::warn!(backend = %backend.id, error = %e, "backend failed before answering");
                self.pool.passive_failure(backend.address);
                ctx.tried.push(backend.address);
            }
            e.set_retry(ctx.tried.len() < MAX_CONNECT_ATTEMPTS);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        for (name, value) in self.forwarding_values(session, ctx) {
            request.insert_header(name, value)?;
        }
        Ok(())
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
        metrics::request(&backend.id);
        self.add_sticky_cookie(response, &backend, ctx)
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
}

/// Whether a backend's answer to an upgrade is the 503 of a node that is draining or full.
fn is_draining_refusal(answer: &tunnel::Answer) -> bool {
    answer.head.status.as_u16() == 503
}
