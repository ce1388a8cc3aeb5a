//! The `sluice` command line: `run`, `check`, `demo`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::{Config, Drained, Gateway, telemetry};

/// Exit status for a manifest that does not validate.
const EXIT_CONFIG: u8 = 2;
/// Exit status for a failure to start (bind, runtime).
const EXIT_START: u8 = 1;

#[derive(Debug, Parser)]
#[command(name = "sluice", version, about = "An edge gateway programmable with WebAssembly")]
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
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config, workers } => run(&config, workers, false),
        Command::Demo { config } => run(&config, None, true),
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("sluice-worker")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::from(EXIT_START);
        }
    };
    let _log_guard = telemetry::init();
    runtime.block_on(async move {
        if demo {
            for addr in config.endpoint_addrs() {
                if let Err(error) = crate::demo::spawn_echo_backend(addr).await {
                    eprintln!("demo: cannot start an echo backend on {addr}: {error}");
                    return ExitCode::from(EXIT_START);
                }
            }
        }
        let gateway = match Gateway::bind(&config).await {
            Ok(gateway) => gateway,
            Err(error) => {
                eprintln!("{error}");
                return ExitCode::from(EXIT_START);
            }
        };
        for (name, addr) in gateway.local_addrs() {
            tracing::info!(listener = name, %addr, workers, "listening");
        }
        if demo {
            print_demo_help(&gateway, &config);
        }
        tokio::spawn(reload_on_sighup(path.to_path_buf(), config.clone(), gateway.reloader()));
        match gateway.serve(shutdown_signal()).await {
            Drained::Complete => tracing::info!("drained; exiting"),
            Drained::TimedOut { open } => {
                tracing::warn!(open_connections = open, "drain timeout passed; closing remaining connections")
            }
        }
        ExitCode::SUCCESS
    })
}

fn print_demo_help(gateway: &Gateway, config: &Config) {
    let backends: Vec<String> = config.endpoint_addrs().iter().map(ToString::to_string).collect();
    println!();
    println!("Sluice demo is running. Echo backends: {}", backends.join(", "));
    for (name, addr) in gateway.local_addrs() {
        println!("  listener {name}: http://{addr}/");
    }
    if let Some((_, addr)) = gateway.local_addrs().first() {
        println!();
        println!("Try:");
        println!("  curl -s http://{addr}/api/hello            # round-robin across the echo backends");
        println!("  curl -s -H 'x-canary: 1' http://{addr}/api/  # header match picks the canary route");
        println!("  curl -s --http2-prior-knowledge http://{addr}/api/h2   # HTTP/2 in, HTTP/1.1 upstream");
        println!("  curl -si http://{addr}/nowhere                # no route: 404");
        println!();
        println!("Access log lines (JSON) follow. Ctrl-C drains and exits.");
    }
}

async fn reload_on_sighup(path: PathBuf, mut current: Config, reloader: crate::Reloader) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload by restart only");
        return;
    };
    while hangups.recv().await.is_some() {
        let loaded = tokio::task::spawn_blocking({
            let path = path.clone();
            move || Config::load(&path)
        })
        .await;
        match loaded {
            Ok(Ok(config)) => {
                if config.listener_addrs() != current.listener_addrs() {
                    tracing::warn!("listener changes in the manifest take effect on restart only");
                }
                reloader.apply(&config);
                tracing::info!(manifest = %path.display(), "reloaded routes and upstreams");
                current = config;
            }
            Ok(Err(error)) => {
                tracing::error!(error = %error, "reload refused; the running config keeps serving");
            }
            Err(error) => tracing::error!(%error, "reload failed"),
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
