//! The data plane: listeners, TLS, the HTTP service and forwarding.
//!
//! [`Gateway::bind`] opens every listener (so a port-0 manifest learns its
//! ports before serving); [`Gateway::serve`] accepts until the shutdown
//! future resolves, then stops accepting and drains in-flight requests.

mod activity;
pub(crate) mod body;
mod forward;
mod service;
pub(crate) mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ListenerConfig};
use crate::route::RouteTable;
use crate::upstream::{Directory, Upstream};
pub use body::ResponseBody;
use service::ConnectionContext;

/// Accept backlog of each listening socket.
const LISTEN_BACKLOG: i32 = 4096;

/// What the request path reads, swapped whole on reload.
#[derive(Debug)]
pub(crate) struct Tables {
    pub(crate) routes: RouteTable,
    pub(crate) upstreams: Vec<Upstream>,
    /// Every upstream's endpoints, lent to policies (`health.healthy`).
    pub(crate) directory: Directory,
}

impl Tables {
    fn new(config: &Config) -> Self {
        let upstreams: Vec<Upstream> = config.upstreams.iter().map(Upstream::new).collect();
        Tables {
            routes: config.routes.clone(),
            directory: upstreams.iter().map(|u| u.endpoints.clone()).collect(),
            upstreams,
        }
    }
}

/// A listener's settings and shared state, one per listener.
pub(crate) struct ListenerContext {
    pub(crate) name: Arc<str>,
    pub(crate) config: ListenerConfig,
    pub(crate) tables: Arc<ArcSwap<Tables>>,
    http: auto::Builder<TokioExecutor>,
    tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for ListenerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerContext")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener's address could not be bound.
    #[error("listener \"{name}\": cannot listen on {addr}: {source}")]
    Bind {
        /// The listener's name.
        name: String,
        /// The address it asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// A gateway with its listeners bound, ready to serve.
pub struct Gateway {
    listeners: Vec<(Arc<ListenerContext>, TcpListener)>,
    tables: Arc<ArcSwap<Tables>>,
    drain_timeout: Duration,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("listeners", &self.local_addrs())
            .finish_non_exhaustive()
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every connection finished its in-flight requests.
    Complete,
    /// The drain timeout passed with connections still open; they were dropped.
    TimedOut {
        /// Connections still open at the deadline.
        open: usize,
    },
}

impl Gateway {
    /// Binds every listener of `config`. Must run inside a Tokio runtime.
    pub async fn bind(config: &Config) -> Result<Gateway, StartError> {
        let mut sockets = bind_for_workers(config, 1)?;
        Gateway::from_listeners(config, sockets.pop().unwrap_or_default())
    }

    /// A gateway serving already-bound sockets, one per listener in manifest
    /// order (see [`bind_for_workers`]), with upstream pools of its own.
    /// Must run inside a Tokio runtime.
    pub fn from_listeners(
        config: &Config,
        sockets: Vec<std::net::TcpListener>,
    ) -> Result<Gateway, StartError> {
        let tables = Arc::new(ArcSwap::from_pointee(Tables::new(config)));
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for (listener, socket) in config.listeners.iter().zip(sockets) {
            let socket = TcpListener::from_std(socket).map_err(|source| StartError::Bind {
                name: listener.name.clone(),
                addr: listener.addr,
                source,
            })?;
            let context = ListenerContext {
                name: Arc::from(listener.name.as_str()),
                http: http_builder(listener),
                tls: listener.tls.clone().map(TlsAcceptor::from),
                config: listener.clone(),
                tables: tables.clone(),
            };
            listeners.push((Arc::new(context), socket));
        }
        Ok(Gateway {
            listeners,
            tables,
            drain_timeout: config.drain_timeout,
        })
    }

    /// Each listener's name and the address it is bound to.
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|(ctx, socket)| {
                socket
                    .local_addr()
                    .ok()
                    .map(|addr| (ctx.name.to_string(), addr))
            })
            .collect()
    }

    /// The bound address of the listener called `name`.
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(ctx, _)| &*ctx.name == name)
            .and_then(|(_, socket)| socket.local_addr().ok())
    }

    /// A handle that swaps in new routes and upstreams while serving.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            tables: self.tables.clone(),
        }
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight
    /// requests finish for up to the drain timeout, and returns.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Drained {
        let connections = TaskTracker::new();
        let stop = CancellationToken::new();
        let mut accept_loops = Vec::new();
        for (context, socket) in self.listeners {
            accept_loops.push(tokio::spawn(accept_loop(
                context,
                socket,
                connections.clone(),
                stop.clone(),
            )));
        }
        shutdown.await;
        // One signal: accept loops stop (closing their sockets), and every
        // connection finishes its in-flight requests and closes.
        stop.cancel();
        for accept in accept_loops {
            let _ = accept.await;
        }
        connections.close();
        let open = connections.len();
        tracing::info!(open_connections = open, drain_timeout = ?self.drain_timeout, "stopped accepting; draining");
        match tokio::time::timeout(self.drain_timeout, connections.wait()).await {
            Ok(()) => Drained::Complete,
            Err(_) => Drained::TimedOut {
                open: connections.len(),
            },
        }
    }
}

/// Publishes a new config's routes and upstreams to a running gateway.
#[derive(Clone)]
pub struct Reloader {
    tables: Arc<ArcSwap<Tables>>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader").finish_non_exhaustive()
    }
}

impl Reloader {
    /// Swaps in `config`'s routes and upstreams. Requests already running keep
    /// the tables they started with. Listener changes need a restart.
    pub fn apply(&self, config: &Config) {
        self.tables.store(Arc::new(Tables::new(config)));
    }

    /// Swaps in `config`'s plugins (its routes' chains and upstreams'
    /// balancers), keeping this worker's upstream connection pools. For a
    /// config made from the running one by [`Config::with_plugin`], whose
    /// upstreams are the same in the same order. Requests already running
    /// finish with the plugins they started with.
    pub(crate) fn apply_plugins(&self, config: &Config) {
        let running = self.tables.load();
        let upstreams = running
            .upstreams
            .iter()
            .zip(&config.upstreams)
            .map(|(upstream, new)| Upstream {
                balancer: new.balancer.clone(),
                ..upstream.clone()
            })
            .collect();
        self.tables.store(Arc::new(Tables {
            routes: config.routes.clone(),
            upstreams,
            directory: running.directory.clone(),
        }));
    }
}

/// Binds each listener `workers` times with `SO_REUSEPORT`, so every worker
/// thread accepts on a socket of its own and the kernel spreads connections
/// between them. Returns, per worker, one socket per listener in manifest
/// order. A port-0 listener gets one port, shared by all its sockets.
pub fn bind_for_workers(
    config: &Config,
    workers: usize,
) -> Result<Vec<Vec<std::net::TcpListener>>, StartError> {
    let mut per_worker: Vec<Vec<std::net::TcpListener>> =
        (0..workers.max(1)).map(|_| Vec::new()).collect();
    for listener in &config.listeners {
        let mut addr = listener.addr;
        for sockets in &mut per_worker {
            let socket = reuseport_listener(addr).map_err(|source| StartError::Bind {
                name: listener.name.clone(),
                addr,
                source,
            })?;
            if addr.port() == 0 {
                addr = socket.local_addr().map_err(|source| StartError::Bind {
                    name: listener.name.clone(),
                    addr,
                    source,
                })?;
            }
            sockets.push(socket);
        }
    }
    Ok(per_worker)
}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

fn http_builder(listener: &ListenerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(listener.header_read_timeout)
        .max_buf_size(listener.max_header_bytes)
        .max_headers(listener.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(listener.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

async fn accept_loop(
    context: Arc<ListenerContext>,
    socket: TcpListener,
    connections: TaskTracker,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(context.config.max_connections));
    loop {
        // Past max_connections we stop accepting; clients wait in the backlog.
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = stop.cancelled() => return,
        };
        let accepted = tokio::select! {
            accepted = socket.accept() => accepted,
            () = stop.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(listener = &*context.name, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let context = context.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            serve_connection(context, stream, peer, stop).await;
            drop(permit);
        });
    }
}

async fn serve_connection(
    context: Arc<ListenerContext>,
    stream: TcpStream,
    peer: SocketAddr,
    stop: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let Some(acceptor) = context.tls.clone() else {
        let conn = ConnectionContext::new(context.clone(), peer, false);
        serve_http(&context, TokioIo::new(stream), conn, stop).await;
        return;
    };
    let handshake = tokio::select! {
        handshake = tokio::time::timeout(context.config.header_read_timeout, acceptor.accept(stream)) => handshake,
        () = stop.cancelled() => return,
    };
    match handshake {
        Ok(Ok(tls)) => {
            let conn = ConnectionContext::new(context.clone(), peer, true);
            serve_http(&context, TokioIo::new(tls), conn, stop).await;
        }
        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

/// Serves one connection until it ends, closing it gracefully (finishing
/// in-flight requests; GOAWAY on HTTP/2) on shutdown or after `idle_timeout`
/// with no request in flight.
async fn serve_http<I>(
    context: &ListenerContext,
    io: TokioIo<I>,
    conn: Arc<ConnectionContext>,
    stop: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = conn.activity.clone();
    let service = service_fn(move |req| service::handle(conn.clone(), req));
    let connection = context.http.serve_connection_with_upgrades(io, service);
    let mut connection = std::pin::pin!(connection);
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            () = stop.cancelled(), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            () = activity.idle_for(context.config.idle_timeout), if !closing => {
                closing = true;
                tracing::debug!("closing idle connection");
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}
