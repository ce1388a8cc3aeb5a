//! The `sluice` command line: `run`, `check`, `demo`, `plugin`.

mod plugin;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use std::net::SocketAddr;
use std::sync::mpsc;

use tokio::sync::watch;

use crate::admin::{Admin, Control};
use crate::{Config, Drained, Gateway, Reloader, Worker, bind_for_workers, telemetry};

/// Exit status for a manifest that does not validate.
const EXIT_CONFIG: u8 = 2;
/// Exit status for a failure to start (bind, runtime).
const EXIT_START: u8 = 1;

#[derive(Debug, Parser)]
#[command(
    name = "sluice",
    version,
    about = "An edge gateway programmable with WebAssembly"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the manifest. SIGTERM/SIGINT drain and exit; SIGHUP reloads routes and upstreams.
    Run {
        /// The manifest.
        #[arg(short, long, default_value = "sluice.toml")]
        config: PathBuf,
        /// Runtime worker threads (default: one per core).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Parse and validate the manifest; print every problem; exit non-zero if any.
    Check {
        /// The manifest.
        #[arg(short, long, default_value = "sluice.toml")]
        config: PathBuf,
    },
    /// Start echo backends on every endpoint of the demo manifest, then the gateway.
    Demo {
        /// The demo manifest.
        #[arg(short, long, default_value = "examples/demo.toml")]
        config: PathBuf,
    },
    /// List, push and roll back the Wasm policies of a running gateway (admin API).
    Plugin(plugin::PluginArgs),
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config, workers } => run(&config, workers, false),
        Command::Demo { config } => run(&config, None, true),
        Command::Plugin(args) => plugin::main(args),
    }
}

fn check(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            let listeners = config.listener_addrs().len();
            println!("{}: ok ({listeners} listener(s))", path.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            let count = error.problems().len();
            eprintln!("{count} problem{} found", if count == 1 { "" } else { "s" });
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn run(path: &Path, workers: Option<usize>, demo: bool) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let workers = workers
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(1)
        .max(1);
    let _log_guard = telemetry::init();
    // The main thread's runtime handles signals, reloads and the demo's backends;
    // requests are served by the worker threads.
    let control = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::from(EXIT_START);
        }
    };
    if demo {
        let started = control.block_on(async {
            for addr in config.endpoint_addrs() {
                crate::demo::spawn_echo_backend(addr)
                    .await
                    .map_err(|error| {
                        format!("demo: cannot start an echo backend on {addr}: {error}")
                    })?;
            }
            Ok::<(), String>(())
        });
        if let Err(error) = started {
            eprintln!("{error}");
            return ExitCode::from(EXIT_START);
        }
    }
    let sockets = match bind_for_workers(&config, workers) {
        Ok(sockets) => sockets,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(EXIT_START);
        }
    };
    let bound: Vec<(String, SocketAddr)> = config
        .listener_addrs()
        .into_iter()
        .zip(&sockets[0])
        .map(|((name, configured, _), socket)| (name, socket.local_addr().unwrap_or(configured)))
        .collect();

    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut threads = Vec::new();
    let places = Worker::all(workers);
    for (index, (sockets, worker)) in sockets.into_iter().zip(places).enumerate() {
        let config = config.clone();
        let stop = stop_rx.clone();
        let ready = ready_tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("sluice-worker-{index}"))
            .spawn(move || serve_worker(&config, sockets, worker, stop, &ready));
        match spawned {
            Ok(thread) => threads.push(thread),
            Err(error) => {
                eprintln!("cannot start worker thread {index}: {error}");
                return ExitCode::from(EXIT_START);
            }
        }
    }
    drop(ready_tx);
    let mut reloaders = Vec::with_capacity(workers);
    for ready in ready_rx.iter().take(workers) {
        match ready {
            Ok(reloader) => reloaders.push(reloader),
            Err(error) => {
                eprintln!("{error}");
                let _ = stop_tx.send(true);
                return ExitCode::from(EXIT_START);
            }
        }
    }

    for (name, addr) in &bound {
        tracing::info!(listener = name, %addr, workers, "listening");
    }
    if demo {
        print_demo_help(&bound, &config);
    }
    let served = control.block_on(async {
        let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let control = Control::new(config.clone(), reloaders, config.start_health_checks());
        match Admin::bind(&control).await {
            None => {}
            Some(Ok(admin)) => {
                if let Some(addr) = admin.local_addr() {
                    tracing::info!(%addr, "admin API listening");
                }
                tokio::spawn(admin.serve(async move {
                    let _ = admin_stopped.await;
                }));
            }
            Some(Err(error)) => return Err(error.to_string()),
        }
        tokio::spawn(reload_on_sighup(path.to_path_buf(), control));
        shutdown_signal().await;
        let _ = admin_stop.send(());
        Ok(())
    });
    if let Err(error) = served {
        eprintln!("{error}");
        let _ = stop_tx.send(true);
        return ExitCode::from(EXIT_START);
    }
    let _ = stop_tx.send(true);
    let mut open = 0;
    for thread in threads {
        if let Ok(Drained::TimedOut { open: left }) = thread.join() {
            open += left;
        }
    }
    if open == 0 {
        tracing::info!("drained; exiting");
    } else {
        tracing::warn!(
            open_connections = open,
            "drain timeout passed; closed the remaining connections"
        );
    }
    ExitCode::SUCCESS
}

/// One worker thread: a current-thread runtime serving its own sockets with
/// its own upstream pools, so no request crosses threads (a connection may,
/// once, when it is accepted: see `proxy::spread`).
fn serve_worker(
    config: &Config,
    sockets: Vec<std::net::TcpListener>,
    worker: Worker,
    mut stop: watch::Receiver<bool>,
    ready: &mpsc::Sender<Result<Reloader, String>>,
) -> Drained {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            let _ = ready.send(Err(format!("cannot start a worker runtime: {error}")));
            return Drained::Complete;
        }
    };
    runtime.block_on(async {
        let gateway = match Gateway::from_listeners(config, sockets, worker) {
            Ok(gateway) => gateway,
            Err(error) => {
                let _ = ready.send(Err(error.to_string()));
                return Drained::Complete;
            }
        };
        let _ = ready.send(Ok(gateway.reloader()));
        gateway
            .serve(async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            })
            .await
    })
}

fn print_demo_help(bound: &[(String, SocketAddr)], config: &Config) {
    let backends: Vec<String> = config
        .endpoint_addrs()
        .iter()
        .map(ToString::to_string)
        .collect();
    println!();
    println!(
        "Sluice demo is running. Echo backends: {}",
        backends.join(", ")
    );
    for (name, addr) in bound {
        println!("  listener {name}: http://{addr}/");
    }
    if let Some((_, addr)) = bound.first() {
        println!();
        println!("Try:");
        println!(
            "  curl -si http://{addr}/api/hello           # weighted round-robin (Wasm) across the echo backends; the `tag` policy adds x-demo / x-policy"
        );
        println!(
            "  curl -s -H 'x-canary: 1' http://{addr}/api/  # header match picks the canary route"
        );
        println!(
            "  curl -s --http2-prior-knowledge http://{addr}/api/h2   # HTTP/2 in, HTTP/1.1 upstream"
        );
        println!("  curl -si http://{addr}/nowhere                # no route: 404");
        println!(
            "  for i in $(seq 25); do curl -s -o /dev/null -w '%{{http_code}} ' http://{addr}/api/; done   # rate limit: 21 x 200, then 429"
        );
        println!(
            "  curl -s -H 'x-user-id: alice' http://{addr}/shop/   # 95/5 canary split, sticky per user"
        );
        println!(
            "  curl -s -H 'X-Forwarded-For: 193.99.144.80' http://{addr}/geo/   # geo: a German client goes to eu-west"
        );
        if let Some(admin) = &config.admin {
            println!(
                "  curl -s http://{}/upstreams        # admin API: endpoint health, load, requests per endpoint",
                admin.addr
            );
            println!(
                "  curl -s -X PUT -d '{{\"upstreams\":{{\"api\":0,\"canary\":100}}}}' http://{}/plugins/split/config   # flip the split live",
                admin.addr
            );
        }
        println!();
        println!("Access log lines (JSON) follow. Ctrl-C drains and exits.");
    }
}

async fn reload_on_sighup(path: PathBuf, control: Control) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        tracing::warn!("cannot listen for SIGHUP; reload by restart only");
        return;
    };
    while hangups.recv().await.is_some() {
        let signal = crate::admin::Actor::Signal("SIGHUP");
        if let Err(error) = control.reload_as(&path, &signal).await {
            tracing::error!(error = %error, "reload refused; the running config keeps serving");
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            // Without signal handlers, serve until the process is killed.
            std::future::pending::<()>().await;
        }
    }
}
