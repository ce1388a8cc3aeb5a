//! The data plane: listeners, TLS, the HTTP service and forwarding.
//!
//! [`Gateway::bind`] opens every listener (so a port-0 manifest learns its
//! ports before serving); [`Gateway::serve`] accepts until the shutdown
//! future resolves, then stops accepting and drains in-flight requests.
//!
//! A reload ([`Reloader`]) swaps the routes and upstreams, keeping the
//! connection pools of upstreams it leaves unchanged, and changes the
//! listeners while they serve: a listener whose address is unchanged keeps
//! its socket and takes the new settings for new connections; a new one is
//! bound before anything changes (`ListenerChange::bind`) and starts
//! accepting; a removed one stops accepting and drains its connections,
//! as a shutdown does.

mod activity;
pub(crate) mod body;
mod forward;
mod service;
mod spread;
pub(crate) mod tls;
mod trace;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigError, ListenerConfig};
use crate::route::RouteTable;
use crate::upstream::{Directory, Upstream};
pub use body::ResponseBody;
use service::ConnectionContext;
pub use spread::Worker;
use spread::{Handoff, Load, WorkerSeat};

/// Accept backlog of each listening socket.
const LISTEN_BACKLOG: i32 = 4096;
/// How long a reload waits for a removed listener's accept loops to close its sockets.
const ACCEPT_STOP_WAIT: Duration = Duration::from_secs(5);

/// What the request path reads, swapped whole on reload.
#[derive(Debug)]
pub(crate) struct Tables {
    pub(crate) routes: RouteTable,
    pub(crate) upstreams: Vec<Upstream>,
    /// Every upstream's endpoints, lent to policies (`health.healthy`).
    pub(crate) directory: Directory,
}

impl Tables {
    /// `config`'s tables, with fresh upstream pools.
    fn new(config: &Config) -> Self {
        Tables::replacing(config, &[])
    }

    /// `config`'s tables. An upstream whose endpoint set is one of
    /// `running`'s (a reload kept it: its definition is unchanged) keeps
    /// that worker's pool; the others get fresh ones.
    fn replacing(config: &Config, running: &[Upstream]) -> Self {
        let upstreams: Vec<Upstream> = config
            .upstreams
            .iter()
            .map(|new| {
                running
                    .iter()
                    .find(|u| Arc::ptr_eq(&u.endpoints, &new.endpoint_set))
                    .map_or_else(|| Upstream::new(new), |kept| kept.kept(new))
            })
            .collect();
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

impl ListenerContext {
    fn new(listener: &ListenerConfig, tables: &Arc<ArcSwap<Tables>>) -> Self {
        ListenerContext {
            name: Arc::from(listener.name.as_str()),
            http: http_builder(listener),
            tls: listener.tls.clone().map(TlsAcceptor::from),
            config: listener.clone(),
            tables: tables.clone(),
        }
    }
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
    tables: Arc<ArcSwap<Tables>>,
    listeners: Arc<Listeners>,
    /// Connections other workers accepted for this one to serve.
    inbox: mpsc::UnboundedReceiver<Handoff>,
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
    /// Binds every listener of `config`, for one worker. Must run inside a
    /// Tokio runtime.
    pub async fn bind(config: &Config) -> Result<Gateway, StartError> {
        let mut sockets = bind_for_workers(config, 1)?;
        let worker = Worker::all(1)
            .pop()
            .expect("Worker::all(1) makes one worker");
        Gateway::from_listeners(config, sockets.pop().unwrap_or_default(), worker)
    }

    /// A gateway serving already-bound sockets, one per listener in manifest
    /// order (see [`bind_for_workers`]), with upstream pools of its own, as
    /// `worker` of its process's workers ([`Worker::all`]): it hands connections to the
    /// other workers and serves the ones they hand to it, so that each
    /// serves about as many (see `spread`).
    ///
    /// # Panics
    /// Outside a Tokio runtime: the gateway serves on the runtime it is made on.
    pub fn from_listeners(
        config: &Config,
        sockets: Vec<std::net::TcpListener>,
        worker: Worker,
    ) -> Result<Gateway, StartError> {
        let tables = Arc::new(ArcSwap::from_pointee(Tables::new(config)));
        let shutdown = CancellationToken::new();
        let mut served = Vec::with_capacity(config.listeners.len());
        for (listener, socket) in config.listeners.iter().zip(sockets) {
            let socket = TcpListener::from_std(socket).map_err(|source| StartError::Bind {
                name: listener.name.clone(),
                addr: listener.addr,
                source,
            })?;
            served.push(ServedListener::new(listener, &tables, socket, &shutdown));
        }
        let listeners = Listeners {
            runtime: tokio::runtime::Handle::current(),
            seat: worker.seat,
            connections: TaskTracker::new(),
            shutdown,
            state: Mutex::new(ListenerState {
                phase: Phase::Bound,
                drain_timeout: config.drain_timeout,
                served,
            }),
        };
        Ok(Gateway {
            tables,
            listeners: Arc::new(listeners),
            inbox: worker.inbox,
        })
    }

    /// Each listener's name and the address it is bound to.
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners.local_addrs()
    }

    /// The bound address of the listener called `name`.
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.local_addrs()
            .into_iter()
            .find(|(listener, _)| listener == name)
            .map(|(_, addr)| addr)
    }

    /// A handle that swaps in new routes, upstreams and listeners while serving.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            tables: self.tables.clone(),
            listeners: self.listeners.clone(),
        }
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight
    /// requests finish for up to the drain timeout, and returns. Listeners
    /// a reload adds meanwhile are served too.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Drained {
        self.listeners.start();
        let handoffs = tokio::spawn(serve_handoffs(self.listeners.clone(), self.inbox));
        shutdown.await;
        // One signal: accept loops stop (closing their sockets), and every
        // connection finishes its in-flight requests and closes.
        let (accept_loops, drain_timeout) = self.listeners.stop();
        for accept in accept_loops {
            let _ = accept.await;
        }
        let _ = handoffs.await;
        let connections = &self.listeners.connections;
        connections.close();
        let open = connections.len();
        tracing::info!(
            open_connections = open,
            ?drain_timeout,
            "stopped accepting; draining"
        );
        match tokio::time::timeout(drain_timeout, connections.wait()).await {
            Ok(()) => Drained::Complete,
            Err(_) => Drained::TimedOut {
                open: connections.len(),
            },
        }
    }
}

/// Publishes a new config's routes, upstreams and listeners to a running
/// gateway (one worker).
#[derive(Clone)]
pub struct Reloader {
    tables: Arc<ArcSwap<Tables>>,
    listeners: Arc<Listeners>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader").finish_non_exhaustive()
    }
}

impl Reloader {
    /// Swaps in `config`'s routes and upstreams. Requests already running keep
    /// the tables they started with. An upstream whose endpoint set is the
    /// running one's (see `Config::keep_unchanged_upstreams`) keeps this
    /// worker's connection pool; the others start with empty pools.
    /// Listeners change through `ListenerChange`.
    pub fn apply(&self, config: &Config) {
        let running = self.tables.load();
        self.tables
            .store(Arc::new(Tables::replacing(config, &running.upstreams)));
    }

    /// Each listener this worker serves now, with the address it is bound to.
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners.local_addrs()
    }

    /// The client connections this worker serves now, over all its listeners.
    pub(crate) fn open_connections(&self) -> usize {
        self.listeners.seat.open_connections()
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

/// The listeners one worker serves. [`Gateway::serve`] starts and stops
/// them; a reload adds, removes and reconfigures them meanwhile.
struct Listeners {
    /// The worker's runtime, where a reload's new accept loops run.
    runtime: tokio::runtime::Handle,
    /// Which worker this is: its accept loops assign connections by it.
    seat: WorkerSeat,
    /// Every connection of every listener, removed ones' too, for the drain.
    connections: TaskTracker,
    /// Cancelled at shutdown: every accept loop stops and every connection
    /// closes once its in-flight requests are done.
    shutdown: CancellationToken,
    /// Touched by serve's start and stop and by reloads, never per request.
    state: Mutex<ListenerState>,
}

struct ListenerState {
    phase: Phase,
    drain_timeout: Duration,
    /// In the running config's order.
    served: Vec<ServedListener>,
}

/// Where [`Gateway::serve`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Bound, not accepting yet.
    Bound,
    /// Accepting.
    Serving,
    /// Shutting down: a listener added now is not served.
    Stopped,
}

/// One listener on one worker.
struct ServedListener {
    /// Its name in the running config.
    name: Arc<str>,
    /// The address it is bound to.
    local: Option<SocketAddr>,
    /// Its settings; a reload swaps them, and each new connection takes the current ones.
    context: Arc<ArcSwap<ListenerContext>>,
    closing: Closing,
    accept: Accept,
}

/// A listener's socket, or the task accepting on it.
enum Accept {
    /// Bound; serving has not started.
    Bound(TcpListener),
    /// The accept loop, which owns the socket.
    Running(JoinHandle<()>),
    /// Handed to a stop.
    Stopped,
}

/// How a listener's connections are told to close.
#[derive(Clone)]
struct Closing {
    /// Finish in-flight requests, then close: at shutdown (a child of the
    /// gateway's token) or when a reload removes the listener.
    graceful: CancellationToken,
    /// Close at once: a removed listener's drain timeout has passed.
    now: CancellationToken,
    /// The listener's open connections.
    open: TaskTracker,
}

impl ServedListener {
    fn new(
        listener: &ListenerConfig,
        tables: &Arc<ArcSwap<Tables>>,
        socket: TcpListener,
        shutdown: &CancellationToken,
    ) -> Self {
        ServedListener {
            name: Arc::from(listener.name.as_str()),
            local: socket.local_addr().ok(),
            context: Arc::new(ArcSwap::from_pointee(ListenerContext::new(
                listener, tables,
            ))),
            closing: Closing {
                graceful: shutdown.child_token(),
                now: CancellationToken::new(),
                open: TaskTracker::new(),
            },
            accept: Accept::Bound(socket),
        }
    }

    /// Starts accepting on `runtime`, if not already.
    fn start(
        &mut self,
        runtime: &tokio::runtime::Handle,
        connections: &TaskTracker,
        seat: &WorkerSeat,
    ) {
        self.accept = match std::mem::replace(&mut self.accept, Accept::Stopped) {
            Accept::Bound(socket) => Accept::Running(runtime.spawn(accept_loop(
                self.context.clone(),
                socket,
                connections.clone(),
                self.closing.clone(),
                seat.clone(),
            ))),
            started => started,
        };
    }
}

impl Listeners {
    fn state(&self) -> std::sync::MutexGuard<'_, ListenerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.state()
            .served
            .iter()
            .filter_map(|l| l.local.map(|addr| (l.name.to_string(), addr)))
            .collect()
    }

    /// Starts accepting on every listener.
    fn start(&self) {
        let mut state = self.state();
        if state.phase != Phase::Bound {
            return;
        }
        state.phase = Phase::Serving;
        for listener in &mut state.served {
            listener.start(&self.runtime, &self.connections, &self.seat);
        }
    }

    /// Stops every listener; returns the accept loops to wait for and the drain timeout.
    fn stop(&self) -> (Vec<JoinHandle<()>>, Duration) {
        let mut state = self.state();
        state.phase = Phase::Stopped;
        self.shutdown.cancel();
        let accept_loops = state
            .served
            .iter_mut()
            .filter_map(
                |l| match std::mem::replace(&mut l.accept, Accept::Stopped) {
                    Accept::Running(accept) => Some(accept),
                    Accept::Bound(_) | Accept::Stopped => None,
                },
            )
            .collect();
        (accept_loops, state.drain_timeout)
    }

    /// Serves `next`'s listeners, `sockets` saying for each where its socket
    /// comes from; the running listeners none of them keeps are closed.
    /// Returns the accept loops of the closed ones.
    fn change(
        &self,
        next: &Config,
        tables: &Arc<ArcSwap<Tables>>,
        sockets: Vec<ListenerSocket>,
    ) -> Vec<JoinHandle<()>> {
        let mut state = self.state();
        state.drain_timeout = next.drain_timeout;
        let mut running = std::mem::take(&mut state.served);
        for (listener, socket) in next.listeners.iter().zip(sockets) {
            let served = match socket {
                ListenerSocket::Keep(name) => {
                    let Some(index) = running.iter().position(|l| *l.name == *name) else {
                        tracing::error!(listener = %listener.name, "reload: the listener to keep is not served here");
                        continue;
                    };
                    let mut kept = running.swap_remove(index);
                    kept.name = Arc::from(listener.name.as_str());
                    kept.context
                        .store(Arc::new(ListenerContext::new(listener, tables)));
                    kept
                }
                ListenerSocket::New(socket) => {
                    let mut added = ServedListener::new(listener, tables, socket, &self.shutdown);
                    if state.phase == Phase::Serving {
                        added.start(&self.runtime, &self.connections, &self.seat);
                    }
                    added
                }
            };
            state.served.push(served);
        }
        let drain_timeout = state.drain_timeout;
        drop(state);
        running
            .into_iter()
            .filter_map(|removed| self.close(removed, drain_timeout))
            .collect()
    }

    /// Stops accepting on `listener` and lets its connections finish their
    /// in-flight requests for up to `drain_timeout`, then closes the rest.
    /// Returns its accept loop, which closes the socket as it ends.
    fn close(&self, listener: ServedListener, drain_timeout: Duration) -> Option<JoinHandle<()>> {
        let Closing {
            graceful,
            now,
            open,
        } = listener.closing;
        graceful.cancel();
        open.close();
        let name = listener.name;
        tracing::info!(
            listener = &*name,
            open_connections = open.len(),
            ?drain_timeout,
            "listener removed; draining its connections"
        );
        self.runtime.spawn(async move {
            if tokio::time::timeout(drain_timeout, open.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    listener = &*name,
                    open_connections = open.len(),
                    "drain timeout passed; closing the removed listener's connections"
                );
                now.cancel();
            }
        });
        match listener.accept {
            Accept::Running(accept) => Some(accept),
            Accept::Bound(_) | Accept::Stopped => None,
        }
    }
}

/// Where a listener of the new config gets its socket, on one worker.
enum ListenerSocket {
    /// It keeps the socket of the running listener of this name.
    Keep(Arc<str>),
    /// A new socket, registered with the worker's runtime.
    New(TcpListener),
}

/// The listener changes of a reload, with the new sockets bound for every
/// worker: made by [`ListenerChange::bind`] before anything changes, served
/// by [`ListenerChange::apply`].
pub(crate) struct ListenerChange {
    /// Per worker, one entry per listener of the new config.
    per_worker: Vec<Vec<ListenerSocket>>,
    /// The listeners bound anew, with their addresses.
    pub(crate) added: Vec<(String, SocketAddr)>,
    /// The running listeners that close.
    pub(crate) removed: Vec<String>,
}

impl ListenerChange {
    /// Matches `next`'s listeners with `running`'s (see [`kept_sockets`]) and
    /// binds the others once per worker of `reloaders`, as
    /// [`bind_for_workers`] does. A socket that cannot be bound refuses the
    /// change, naming the listener and its address; nothing serves
    /// differently until [`ListenerChange::apply`].
    pub(crate) fn bind(
        running: &Config,
        next: &Config,
        reloaders: &[Reloader],
    ) -> Result<ListenerChange, ConfigError> {
        let kept = kept_sockets(&running.listeners, &next.listeners);
        let mut per_worker: Vec<Vec<ListenerSocket>> =
            reloaders.iter().map(|_| Vec::new()).collect();
        let mut added = Vec::new();
        for (index, (listener, kept)) in next.listeners.iter().zip(&kept).enumerate() {
            if let Some(running) = kept {
                let name: Arc<str> = Arc::from(running.name.as_str());
                for sockets in &mut per_worker {
                    sockets.push(ListenerSocket::Keep(name.clone()));
                }
                continue;
            }
            let refused = |error: StartError| {
                ConfigError::single(
                    &next.source,
                    format!("listener[{index}].listen"),
                    error.to_string(),
                )
            };
            let sockets = bind_listener(listener, reloaders.len()).map_err(refused)?;
            if let Some(addr) = sockets.first().and_then(|s| s.local_addr().ok()) {
                added.push((listener.name.clone(), addr));
            }
            for ((worker, socket), reloader) in per_worker.iter_mut().zip(sockets).zip(reloaders) {
                let socket = reloader
                    .listeners
                    .adopt(socket, listener)
                    .map_err(refused)?;
                worker.push(ListenerSocket::New(socket));
            }
        }
        let removed = running
            .listeners
            .iter()
            .filter(|r| !kept.iter().flatten().any(|k| k.name == r.name))
            .map(|r| r.name.clone())
            .collect();
        Ok(ListenerChange {
            per_worker,
            added,
            removed,
        })
    }

    /// Serves `next`'s listeners on every worker: new ones start accepting;
    /// kept ones keep their sockets, connections and accept loops, and new
    /// connections take `next`'s settings (TLS, limits, timeouts); removed
    /// ones stop accepting, and their connections finish their in-flight
    /// requests and close (bounded by the drain timeout). The returned
    /// [`ListenersClosing`] resolves once the removed sockets are closed.
    pub(crate) fn apply(self, next: &Config, reloaders: &[Reloader]) -> ListenersClosing {
        let mut accept_loops = Vec::new();
        for (reloader, sockets) in reloaders.iter().zip(self.per_worker) {
            accept_loops.extend(reloader.listeners.change(next, &reloader.tables, sockets));
        }
        ListenersClosing(accept_loops)
    }
}

impl Listeners {
    /// Registers `socket`, bound for `listener`, with this worker's runtime.
    fn adopt(
        &self,
        socket: std::net::TcpListener,
        listener: &ListenerConfig,
    ) -> Result<TcpListener, StartError> {
        let _runtime = self.runtime.enter();
        TcpListener::from_std(socket).map_err(|source| StartError::Bind {
            name: listener.name.clone(),
            addr: listener.addr,
            source,
        })
    }
}

/// The accept loops of the listeners a reload removed.
pub(crate) struct ListenersClosing(Vec<JoinHandle<()>>);

impl ListenersClosing {
    /// Waits (a few seconds at most) until the removed listeners' sockets are closed.
    pub(crate) async fn closed(self) {
        let all = futures_util::future::join_all(self.0);
        if tokio::time::timeout(ACCEPT_STOP_WAIT, all).await.is_err() {
            tracing::warn!("a removed listener's socket did not close within {ACCEPT_STOP_WAIT:?}");
        }
    }
}

/// For each listener of `next`, the running listener whose socket it keeps:
/// the one with its name and address, else, for a fixed port, the one with
/// its address (a rename). Port-0 listeners match by name only, since any
/// two of them ask for the same address.
fn kept_sockets<'a>(
    running: &'a [ListenerConfig],
    next: &[ListenerConfig],
) -> Vec<Option<&'a ListenerConfig>> {
    let mut kept: Vec<Option<&ListenerConfig>> = next
        .iter()
        .map(|l| {
            running
                .iter()
                .find(|r| r.name == l.name && r.addr == l.addr)
        })
        .collect();
    for (slot, listener) in next.iter().enumerate() {
        if kept[slot].is_some() || listener.addr.port() == 0 {
            continue;
        }
        let renamed = running
            .iter()
            .find(|r| r.addr == listener.addr && !kept.iter().flatten().any(|k| k.name == r.name));
        kept[slot] = renamed;
    }
    kept
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
        for (sockets, socket) in per_worker.iter_mut().zip(bind_listener(listener, workers)?) {
            sockets.push(socket);
        }
    }
    Ok(per_worker)
}

/// Binds `listener` `workers` times with `SO_REUSEPORT` (see
/// [`bind_for_workers`]): one socket per worker, all on one port.
fn bind_listener(
    listener: &ListenerConfig,
    workers: usize,
) -> Result<Vec<std::net::TcpListener>, StartError> {
    let mut addr = listener.addr;
    let mut sockets = Vec::with_capacity(workers.max(1));
    for _ in 0..workers.max(1) {
        let failed = |addr, source| StartError::Bind {
            name: listener.name.clone(),
            addr,
            source,
        };
        let socket = reuseport_listener(addr).map_err(|e| failed(addr, e))?;
        if addr.port() == 0 {
            addr = socket.local_addr().map_err(|e| failed(addr, e))?;
        }
        sockets.push(socket);
    }
    Ok(sockets)
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

/// Accepts on `socket` until the listener closes. Each connection takes
/// the listener's settings current when it is accepted, and is served by
/// this worker or handed to a less loaded one (see `spread`).
async fn accept_loop(
    settings: Arc<ArcSwap<ListenerContext>>,
    socket: TcpListener,
    connections: TaskTracker,
    closing: Closing,
    seat: WorkerSeat,
) {
    let mut limit = settings.load().config.max_connections;
    let mut slots = Arc::new(Semaphore::new(limit));
    loop {
        // A reload changed max_connections: it counts the connections accepted from now on.
        let wanted = settings.load().config.max_connections;
        if wanted != limit {
            limit = wanted;
            slots = Arc::new(Semaphore::new(limit));
        }
        // Past max_connections we stop accepting; clients wait in the backlog.
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = closing.graceful.cancelled() => return,
        };
        let accepted = tokio::select! {
            accepted = socket.accept() => accepted,
            () = closing.graceful.cancelled() => return,
        };
        let context = settings.load_full();
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(listener = &*context.name, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let load = seat.assign();
        if load.worker() == seat.index() {
            spawn_connection(
                &connections,
                context,
                stream,
                peer,
                &closing,
                (permit, load),
            );
            continue;
        }
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%peer, %error, "cannot hand a connection to another worker; closed");
                continue;
            }
        };
        let handoff = Handoff {
            listener: context.name.clone(),
            stream,
            peer,
            permit,
            load,
        };
        // The other worker has stopped (a shutdown is under way): serve it here.
        if let Err(back) = seat.hand_off(handoff) {
            let Handoff { stream, permit, .. } = back;
            let held = (permit, seat.count_here());
            spawn_std_connection(&connections, context, stream, peer, &closing, held);
        }
    }
}

/// Serves the connections other workers hand to this one, each under this
/// worker's listener of the name it was accepted by, until shutdown.
async fn serve_handoffs(listeners: Arc<Listeners>, mut inbox: mpsc::UnboundedReceiver<Handoff>) {
    loop {
        let handoff = tokio::select! {
            handoff = inbox.recv() => match handoff {
                Some(handoff) => handoff,
                None => return,
            },
            () = listeners.shutdown.cancelled() => return,
        };
        listeners.serve_handoff(handoff);
    }
}

impl Listeners {
    /// Serves `handoff` as its listener's connection on this worker. A
    /// listener a reload has removed here meanwhile closes it unserved, as
    /// it would a connection still in its backlog.
    fn serve_handoff(&self, handoff: Handoff) {
        let Handoff {
            listener,
            stream,
            peer,
            permit,
            load,
        } = handoff;
        let served = self
            .state()
            .served
            .iter()
            .find(|l| l.name == listener)
            .map(|l| (l.context.load_full(), l.closing.clone()));
        let Some((context, closing)) = served else {
            tracing::debug!(listener = &*listener, %peer, "handed a connection for a listener this worker no longer serves; closed");
            return;
        };
        if closing.graceful.is_cancelled() {
            return;
        }
        spawn_std_connection(
            &self.connections,
            context,
            stream,
            peer,
            &closing,
            (permit, load),
        );
    }
}

/// [`spawn_connection`] for a socket that moved between workers as a std
/// stream; one that cannot join this worker's runtime is closed.
fn spawn_std_connection(
    connections: &TaskTracker,
    context: Arc<ListenerContext>,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    closing: &Closing,
    held: (OwnedSemaphorePermit, Load),
) {
    match TcpStream::from_std(stream) {
        Ok(stream) => spawn_connection(connections, context, stream, peer, closing, held),
        Err(error) => {
            tracing::debug!(%peer, %error, "cannot serve a handed-over connection; closed")
        }
    }
}

/// Serves `stream` in a task of `connections`, holding `held` (the
/// listener's `max_connections` slot and the worker's count) until it closes.
fn spawn_connection(
    connections: &TaskTracker,
    context: Arc<ListenerContext>,
    stream: TcpStream,
    peer: SocketAddr,
    closing: &Closing,
    held: (OwnedSemaphorePermit, Load),
) {
    let closing = closing.clone();
    let open = closing.open.token();
    connections.spawn(async move {
        serve_connection(context, stream, peer, &closing).await;
        drop(open);
        drop(held);
    });
}

async fn serve_connection(
    context: Arc<ListenerContext>,
    stream: TcpStream,
    peer: SocketAddr,
    closing: &Closing,
) {
    let _counted = context.config.connections.open();
    let _ = stream.set_nodelay(true);
    // The TLS handshake and the TLS connection's state are boxed, so a
    // plain connection's task (one per client connection) is not sized for them.
    let Some(acceptor) = context.tls.clone() else {
        let conn = ConnectionContext::new(context.clone(), peer, false);
        serve_http(&context, TokioIo::new(stream), conn, closing).await;
        return;
    };
    let handshake = tokio::select! {
        handshake = Box::pin(tokio::time::timeout(context.config.header_read_timeout, acceptor.accept(stream))) => handshake,
        () = closing.graceful.cancelled() => return,
    };
    match handshake {
        Ok(Ok(tls)) => {
            let conn = ConnectionContext::new(context.clone(), peer, true);
            Box::pin(serve_http(&context, TokioIo::new(tls), conn, closing)).await;
        }
        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

/// Serves one connection until it ends, closing it gracefully (finishing
/// in-flight requests; GOAWAY on HTTP/2) on shutdown, when its listener is
/// removed, or after `idle_timeout` with no request in flight; and at once
/// when a removed listener's drain timeout passes.
async fn serve_http<I>(
    context: &ListenerContext,
    io: TokioIo<I>,
    conn: Arc<ConnectionContext>,
    closing: &Closing,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = conn.activity.clone();
    let service = service_fn(move |req| service::handle(conn.clone(), forward::detach_head(req)));
    let connection = context.http.serve_connection_with_upgrades(io, service);
    let mut connection = std::pin::pin!(connection);
    let mut ending = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            () = closing.graceful.cancelled(), if !ending => {
                ending = true;
                connection.as_mut().graceful_shutdown();
            }
            () = closing.now.cancelled() => {
                tracing::debug!("closing a removed listener's connection: its drain timeout passed");
                return;
            }
            () = activity.idle_for(context.config.idle_timeout), if !ending => {
                ending = true;
                tracing::debug!("closing idle connection");
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The listeners of a manifest with these `[[listener]]` tables.
    fn listeners(tables: &[(&str, &str)]) -> Vec<ListenerConfig> {
        let mut text = String::new();
        for (name, listen) in tables {
            text.push_str(&format!(
                "[[listener]]\nname = \"{name}\"\nlisten = \"{listen}\"\n"
            ));
        }
        text.push_str("[upstream.app]\nendpoints = [\"127.0.0.1:9\"]\n");
        text.push_str("[[route]]\nname = \"all\"\nupstream = \"app\"\n");
        Config::parse(&text, std::path::Path::new("t.toml"))
            .expect("a valid manifest")
            .listeners
    }

    #[test]
    fn a_reloaded_listener_keeps_the_socket_of_its_address() {
        let running = listeners(&[
            ("a", "127.0.0.1:8080"),
            ("b", "127.0.0.1:0"),
            ("c", "127.0.0.1:0"),
            ("d", "127.0.0.1:9090"),
        ]);
        let next = listeners(&[
            ("renamed", "127.0.0.1:8080"),
            ("b", "127.0.0.1:0"),
            ("e", "127.0.0.1:0"),
            ("d", "127.0.0.1:9091"),
        ]);
        let kept: Vec<Option<&str>> = kept_sockets(&running, &next)
            .iter()
            .map(|k| k.map(|l| l.name.as_str()))
            .collect();
        // A rename on a fixed port keeps the socket; port 0 matches by name
        // only; a moved listener is bound anew.
        assert_eq!(kept, [Some("a"), Some("b"), None, None]);
        let swapped = listeners(&[("d", "127.0.0.1:8080"), ("a", "127.0.0.1:9090")]);
        let kept: Vec<Option<&str>> = kept_sockets(&running, &swapped)
            .iter()
            .map(|k| k.map(|l| l.name.as_str()))
            .collect();
        assert_eq!(kept, [Some("a"), Some("d")], "sockets follow addresses");
    }
}
