//! A real `redis-server` for tests of the Redis state backend: started on a
//! free loopback port with no persistence, killed (SIGKILL, by the PID this
//! harness started) when dropped, and restartable on the same port so a
//! gateway can reconnect to it.
//!
//! The harness talks to it with the `redis` crate's blocking client
//! ([`RedisServer::command`]), enough to ping, list keys and read values.
//!
//! When `redis-server` is not installed, [`RedisServer::start`] returns
//! `Ok(None)` and prints why to stderr, so `cargo test` works on a machine
//! without it; under `CI=true` a missing `redis-server` is an error
//! instead, so CI cannot skip these tests silently (the convention of
//! [`crate::guests`]).
//!
//! Its methods block (for at most a few seconds); from a test on the
//! multi-threaded tokio runtime, call the slow ones ([`RedisServer::start`],
//! [`RedisServer::restart`]) inside `tokio::task::block_in_place`.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// The server binary, found on `PATH` (Debian's `redis-server` package).
const SERVER: &str = "redis-server";

/// How long a start or restart may take before it is an error.
const READY_LIMIT: Duration = Duration::from_secs(10);

/// The read and write timeout of the harness's own connections.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// A running `redis-server` child process. Dropping it kills it.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    /// The server's working directory and log file; removed on drop.
    dir: tempfile::TempDir,
    /// How many times it was started (each start appends to the same log).
    starts: u32,
}

impl RedisServer {
    /// Starts `redis-server` on a free loopback port and waits until it
    /// answers `PING`. `Ok(None)`: it is not installed and `CI` is not
    /// `true`, so the caller should skip its test (this prints why).
    pub fn start() -> anyhow::Result<Option<RedisServer>> {
        if !installed() {
            let why = format!(
                "{SERVER} is not installed (install it with `apt-get install redis-server`)"
            );
            if in_ci() {
                bail!("{why}, and CI=true requires it");
            }
            eprintln!("skipped: {why}");
            return Ok(None);
        }
        let mut last_error = None;
        // A free port found by binding :0 may be taken by someone else
        // before redis-server binds it: try another one.
        for _ in 0..5 {
            let port = free_port()?;
            let mut server = RedisServer {
                child: None,
                port,
                dir: tempfile::tempdir().context("creating redis-server's directory")?,
                starts: 0,
            };
            match server.spawn() {
                Ok(()) => return Ok(Some(server)),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The port it listens on (kept across [`RedisServer::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Whether the process this harness started is running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Kills the server with SIGKILL (the process this harness started, by
    /// its PID) and reaps it. Its data is gone: it keeps none on disk.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            bail!("redis-server on port {} is not running", self.port);
        };
        // std's Child::kill sends SIGKILL to exactly this PID.
        child.kill().context("killing redis-server")?;
        child.wait().context("reaping redis-server")?;
        Ok(())
    }

    /// Stops (`SIGSTOP`) or continues (`SIGCONT`) the server process, by
    /// the PID this harness started: while stopped it keeps its connections
    /// but answers nothing, as a hung Redis does.
    pub fn pause(&self, paused: bool) -> anyhow::Result<()> {
        let Some(child) = &self.child else {
            bail!("redis-server on port {} is not running", self.port);
        };
        let signal = if paused { "-STOP" } else { "-CONT" };
        let status = std::process::Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .context("running kill")?;
        anyhow::ensure!(status.success(), "kill {signal} {}: {status}", child.id());
        Ok(())
    }

    /// Starts the server again on the same port (after [`RedisServer::kill`])
    /// and waits until it answers `PING`; empty, as after a crash without
    /// persistence.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.running() {
            bail!("redis-server on port {} is still running", self.port);
        }
        self.child = None;
        let started = Instant::now();
        // The port was just released; retry briefly should the bind race
        // anything.
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(error) if started.elapsed() > Duration::from_secs(3) => return Err(error),
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Sends one command on a new connection and returns its reply; a
    /// Redis error reply is an `Err`.
    pub fn command<T: redis::FromRedisValue>(&self, args: &[&str]) -> anyhow::Result<T> {
        let client = redis::Client::open(self.url())?;
        let mut connection = client
            .get_connection_with_timeout(IO_TIMEOUT)
            .with_context(|| format!("connecting to redis-server on {}", self.addr()))?;
        connection.set_read_timeout(Some(IO_TIMEOUT))?;
        connection.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut command = redis::cmd(args.first().copied().unwrap_or("PING"));
        for arg in args.iter().skip(1) {
            command.arg(*arg);
        }
        command
            .query(&mut connection)
            .with_context(|| format!("{args:?}"))
    }

    /// Whether it answers `PING` with `PONG` now.
    pub fn ping(&self) -> bool {
        matches!(self.command::<String>(&["PING"]), Ok(pong) if pong == "PONG")
    }

    /// Every key matching `pattern` (Redis glob syntax, as `KEYS`), sorted.
    pub fn keys(&self, pattern: &str) -> anyhow::Result<Vec<String>> {
        let mut keys: Vec<String> = self.command(&["KEYS", pattern])?;
        keys.sort();
        Ok(keys)
    }

    /// The string value of `key` (`None`: no such key).
    pub fn get(&self, key: &str) -> anyhow::Result<Option<String>> {
        self.command(&["GET", key])
    }

    /// Its log so far (every start appends to it), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Starts the process on `self.port` and waits until it answers `PING`.
    fn spawn(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let port = self.port.to_string();
        let log = self.log_path();
        let mut child = Command::new(SERVER)
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {SERVER}"))?;
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "redis-server on port {port} exited ({status}) before answering PING; its log:\n{}",
                    self.log()
                );
            }
            if self.ping() {
                self.child = Some(child);
                return Ok(());
            }
            if started.elapsed() > READY_LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "redis-server on port {port} did not answer PING within {READY_LIMIT:?}; its log:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether `redis-server --version` runs.
fn installed() -> bool {
    Command::new(SERVER)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true")
}

/// A loopback port nothing listens on right now.
fn free_port() -> anyhow::Result<u16> {
    let socket = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(socket.local_addr()?.port())
}
