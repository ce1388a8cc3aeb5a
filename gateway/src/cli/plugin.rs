//! `sluice plugin`: list, push and roll back the Wasm policies of a running
//! gateway through its admin API (`GET /plugins`, `PUT /plugins/{name}`,
//! `POST /plugins/{name}/rollback`).
//!
//! Exit status: 0 done; [`EXIT_REFUSED`] the admin API answered with an
//! error; [`EXIT_INPUT`] a local input is wrong (file, `--config`, manifest,
//! address); [`EXIT_UNREACHABLE`] the admin API could not be reached.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Subcommand};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

/// Exit status when the admin API answered with an error (including 401).
const EXIT_REFUSED: u8 = 1;
/// Exit status for a local input that is wrong: the file, `--config`, the manifest, the address.
const EXIT_INPUT: u8 = 2;
/// Exit status when the admin API could not be reached or broke off.
const EXIT_UNREACHABLE: u8 = 3;

/// Where the admin API is when neither `--admin`, `SLUICE_ADMIN` nor a manifest says.
const DEFAULT_ADMIN: &str = "127.0.0.1:9901";
/// The manifest read for `[admin] listen` when `-c` is not given (when it exists).
const DEFAULT_MANIFEST: &str = "sluice.toml";

/// Time to open the TCP connection to the admin API.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for the whole exchange; an upload is compiled and `init`ed before the answer.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(120);

/// `sluice plugin ...`: the admin API's address and token, and what to do.
#[derive(Debug, Args)]
pub(super) struct PluginArgs {
    /// The admin API, HOST:PORT [default: [admin] listen of the manifest, else 127.0.0.1:9901].
    #[arg(long, env = "SLUICE_ADMIN", value_name = "ADDR", global = true)]
    admin: Option<String>,
    /// The admin API's bearer token ([admin] token in the manifest).
    #[arg(
        long,
        env = "SLUICE_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        global = true
    )]
    token: Option<String>,
    /// The manifest whose [admin] listen is the default address [default: sluice.toml, when it exists].
    #[arg(short = 'c', long = "manifest", value_name = "PATH", global = true)]
    manifest: Option<PathBuf>,
    #[command(subcommand)]
    action: PluginAction,
}

#[derive(Debug, Subcommand)]
enum PluginAction {
    /// List the loaded plugins: source, version, calls, errors, traps, p99, versions kept for rollback.
    Ls {
        /// Print the admin API's JSON as it came.
        #[arg(long)]
        json: bool,
    },
    /// Upload a component and swap it in for plugin NAME (validated first; refused → the running one stays).
    Push {
        /// The plugin, as named in [plugin.NAME].
        name: String,
        /// The component (.wasm).
        file: PathBuf,
        /// Config for the new version, a JSON object [default: the running config].
        #[arg(long, value_name = "JSON")]
        config: Option<String>,
    },
    /// Put back the version plugin NAME ran before its last swap.
    Rollback {
        /// The plugin, as named in [plugin.NAME].
        name: String,
    },
}

/// Why a `sluice plugin` command failed. Messages never carry the token.
#[derive(Debug, thiserror::Error)]
enum PluginCliError {
    #[error("cannot read {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--config is not valid JSON: {0}")]
    ConfigJson(serde_json::Error),
    #[error("--config must be a JSON object, like '{{\"header\": \"x-block\"}}'")]
    ConfigNotObject,
    #[error("manifest {}: {reason}", path.display())]
    Manifest { path: PathBuf, reason: String },
    #[error(
        "invalid admin address \"{0}\": expected HOST:PORT (or http://HOST:PORT), like 127.0.0.1:9901"
    )]
    Address(String),
    #[error("the token cannot be sent in an HTTP header (it has characters a header cannot carry)")]
    TokenUnsendable,
    #[error(
        "the admin API at {addr} is not reachable: {source}\n(is the gateway running with an [admin] table? pass the address with --admin ADDR or SLUICE_ADMIN)"
    )]
    Unreachable {
        addr: String,
        source: std::io::Error,
    },
    #[error("the admin API at {addr} broke off the exchange: {reason}")]
    Broken { addr: String, reason: String },
    #[error(
        "the admin API at {addr} needs a token (401 Unauthorized) and none was given: pass it with --token TOKEN or set SLUICE_ADMIN_TOKEN"
    )]
    TokenMissing { addr: String },
    #[error(
        "the admin API at {addr} refused the token (401 Unauthorized): it is wrong; pass the manifest's [admin] token with --token TOKEN or SLUICE_ADMIN_TOKEN"
    )]
    TokenWrong { addr: String },
    #[error("{action}: refused by the admin API ({status}): {message}")]
    Refused {
        action: String,
        status: StatusCode,
        message: String,
    },
    #[error("{action}: unexpected answer from the admin API at {addr}: {reason}")]
    Unexpected {
        action: String,
        addr: String,
        reason: String,
    },
}

impl PluginCliError {
    fn exit_code(&self) -> u8 {
        match self {
            PluginCliError::ReadFile { .. }
            | PluginCliError::ConfigJson(_)
            | PluginCliError::ConfigNotObject
            | PluginCliError::Manifest { .. }
            | PluginCliError::Address(_)
            | PluginCliError::TokenUnsendable => EXIT_INPUT,
            PluginCliError::Unreachable { .. } | PluginCliError::Broken { .. } => EXIT_UNREACHABLE,
            PluginCliError::TokenMissing { .. }
            | PluginCliError::TokenWrong { .. }
            | PluginCliError::Refused { .. }
            | PluginCliError::Unexpected { .. } => EXIT_REFUSED,
        }
    }
}

/// Runs `sluice plugin ...` and returns the process exit code.
pub(super) fn main(args: PluginArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("sluice plugin: cannot start the runtime: {error}");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sluice plugin: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

async fn run(args: PluginArgs) -> Result<(), PluginCliError> {
    let addr = admin_addr(args.admin.as_deref(), args.manifest.as_deref())?;
    let client = AdminClient {
        addr,
        token: args.token.filter(|token| !token.is_empty()),
    };
    match args.action {
        PluginAction::Ls { json } => ls(&client, json).await,
        PluginAction::Push { name, file, config } => {
            push(&client, &name, &file, config.as_deref()).await
        }
        PluginAction::Rollback { name } => rollback(&client, &name).await,
    }
}

/// One plugin in `GET /plugins`.
#[derive(Debug, Deserialize)]
struct ListedPlugin {
    name: String,
    #[serde(default)]
    source: String,
    version: String,
    /// Versions kept for rollback.
    #[serde(default)]
    previous: Vec<String>,
    #[serde(default)]
    stats: ListedStats,
}

#[derive(Debug, Default, Deserialize)]
struct ListedStats {
    #[serde(default)]
    calls: u64,
    #[serde(default)]
    errors: u64,
    #[serde(default)]
    traps: u64,
    #[serde(default)]
    p99_us: u64,
}

/// The answer to a swap or rollback.
#[derive(Debug, Deserialize)]
struct Swapped {
    /// The version now running.
    version: String,
    /// The version it replaced.
    previous: String,
    #[serde(default)]
    config: serde_json::Value,
}

async fn ls(client: &AdminClient, json: bool) -> Result<(), PluginCliError> {
    let action = "ls";
    let body = client.send(action, Method::GET, "/plugins", None).await?;
    if json {
        let text = String::from_utf8_lossy(&body);
        println!("{}", text.trim_end());
        return Ok(());
    }
    let plugins: Vec<ListedPlugin> = client.decode(action, &body)?;
    if plugins.is_empty() {
        println!("no plugins loaded");
        return Ok(());
    }
    let mut rows = vec![
        [
            "NAME", "SOURCE", "VERSION", "CALLS", "ERRORS", "TRAPS", "P99", "KEPT",
        ]
        .map(String::from),
    ];
    rows.extend(plugins.iter().map(|p| {
        [
            p.name.clone(),
            p.source.clone(),
            short(&p.version).to_string(),
            p.stats.calls.to_string(),
            p.stats.errors.to_string(),
            p.stats.traps.to_string(),
            if p.stats.calls == 0 {
                "-".to_string()
            } else {
                micros(p.stats.p99_us)
            },
            p.previous.len().to_string(),
        ]
    }));
    let right = [false, false, false, true, true, true, true, true];
    print!("{}", table(&rows, right));
    Ok(())
}

async fn push(
    client: &AdminClient,
    name: &str,
    file: &Path,
    config: Option<&str>,
) -> Result<(), PluginCliError> {
    let action = format!("push {name}");
    let config = config.map(object_json).transpose()?;
    let bytes = std::fs::read(file).map_err(|source| PluginCliError::ReadFile {
        path: file.to_path_buf(),
        source,
    })?;
    let mut path = format!("/plugins/{}", path_segment(name));
    if let Some(config) = &config {
        path.push('?');
        path.push_str(
            &form_urlencoded::Serializer::new(String::new())
                .append_pair("config", config)
                .finish(),
        );
    }
    let body = client
        .send(&action, Method::PUT, &path, Some(Bytes::from(bytes)))
        .await?;
    let swapped: Swapped = client.decode(&action, &body)?;
    let mut line = format!(
        "swapped {name}: {} -> {}",
        short(&swapped.previous),
        short(&swapped.version)
    );
    if config.is_some() {
        line.push_str(&format!(", config {}", swapped.config));
    }
    println!("{line}");
    Ok(())
}

async fn rollback(client: &AdminClient, name: &str) -> Result<(), PluginCliError> {
    let action = format!("rollback {name}");
    let path = format!("/plugins/{}/rollback", path_segment(name));
    let body = client.send(&action, Method::POST, &path, None).await?;
    let restored: Swapped = client.decode(&action, &body)?;
    println!(
        "rolled back {name}: {} -> {}, config {}",
        short(&restored.previous),
        short(&restored.version),
        restored.config
    );
    Ok(())
}

/// `--config`: a JSON object, checked here so a typo never reaches the gateway.
fn object_json(text: &str) -> Result<String, PluginCliError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(PluginCliError::ConfigJson)?;
    if !value.is_object() {
        return Err(PluginCliError::ConfigNotObject);
    }
    Ok(value.to_string())
}

/// The admin API's address: `--admin`/`SLUICE_ADMIN`, else the manifest's
/// `[admin] listen`, else [`DEFAULT_ADMIN`]. A manifest named with `-c` must
/// be readable and have an `[admin]` table; the default `sluice.toml` is
/// used only when it exists and parses.
fn admin_addr(flag: Option<&str>, manifest: Option<&Path>) -> Result<String, PluginCliError> {
    if let Some(addr) = flag.filter(|addr| !addr.is_empty()) {
        return host_port(addr);
    }
    let listen = match manifest {
        Some(path) => Some(manifest_listen(path)?.ok_or_else(|| {
            PluginCliError::Manifest {
                path: path.to_path_buf(),
                reason: "no [admin] table with a listen address; the gateway serves no admin API"
                    .to_string(),
            }
        })?),
        None => manifest_listen(Path::new(DEFAULT_MANIFEST)).ok().flatten(),
    };
    match listen {
        Some(listen) => Ok(dialable(&listen)),
        None => Ok(DEFAULT_ADMIN.to_string()),
    }
}

/// `[admin] listen` of the manifest at `path`, when it has one.
fn manifest_listen(path: &Path) -> Result<Option<String>, PluginCliError> {
    let manifest = |reason: String| PluginCliError::Manifest {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| manifest(e.to_string()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| manifest(e.to_string()))?;
    Ok(table
        .get("admin")
        .and_then(|admin| admin.get("listen"))
        .and_then(toml::Value::as_str)
        .map(str::to_string))
}

/// A listen address as a client dials it: a wildcard (`0.0.0.0`, `[::]`)
/// becomes loopback.
fn dialable(listen: &str) -> String {
    match listen.parse::<SocketAddr>() {
        Ok(mut addr) if addr.ip().is_unspecified() => {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
            addr.to_string()
        }
        _ => listen.to_string(),
    }
}

/// `HOST:PORT` from `--admin`, which may also be written `http://HOST:PORT/`.
fn host_port(addr: &str) -> Result<String, PluginCliError> {
    let bare = addr.strip_prefix("http://").unwrap_or(addr);
    let bare = bare.strip_suffix('/').unwrap_or(bare);
    let valid = bare
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        && !bare.contains('/');
    if valid {
        Ok(bare.to_string())
    } else {
        Err(PluginCliError::Address(addr.to_string()))
    }
}

/// A plugin name as one URL path segment.
fn path_segment(name: &str) -> String {
    form_urlencoded::byte_serialize(name.as_bytes()).collect()
}

/// The first 12 hex digits of a version, as `git` shortens commits.
fn short(version: &str) -> &str {
    version.get(..12).unwrap_or(version)
}

/// A latency in microseconds, in the unit that reads best.
fn micros(us: u64) -> String {
    match us {
        0..1_000 => format!("{us}µs"),
        1_000..1_000_000 => format!("{:.1}ms", us as f64 / 1e3),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

/// Rows as aligned columns, two spaces apart; a column marked in `right` is
/// right-aligned (numbers), the others left-aligned.
fn table<const N: usize>(rows: &[[String; N]], right: [bool; N]) -> String {
    let mut widths = [0; N];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .zip(right)
            .map(|((cell, width), right)| {
                let pad = " ".repeat(width - cell.chars().count());
                if right {
                    format!("{pad}{cell}")
                } else {
                    format!("{cell}{pad}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// One admin API, one request per connection.
struct AdminClient {
    /// `HOST:PORT`.
    addr: String,
    token: Option<String>,
}

impl AdminClient {
    /// Sends one request, with `wasm` as an `application/wasm` body when
    /// given, and returns the body of a 2xx answer; any other answer becomes
    /// the error it describes.
    async fn send(
        &self,
        action: &str,
        method: Method,
        path: &str,
        wasm: Option<Bytes>,
    ) -> Result<Bytes, PluginCliError> {
        let (status, body) =
            tokio::time::timeout(EXCHANGE_TIMEOUT, self.exchange(action, method, path, wasm))
                .await
                .map_err(|_| PluginCliError::Broken {
                    addr: self.addr.clone(),
                    reason: format!("no answer within {}s", EXCHANGE_TIMEOUT.as_secs()),
                })??;
        if status.is_success() {
            return Ok(body);
        }
        let addr = self.addr.clone();
        if status == StatusCode::UNAUTHORIZED {
            return Err(match self.token {
                None => PluginCliError::TokenMissing { addr },
                Some(_) => PluginCliError::TokenWrong { addr },
            });
        }
        #[derive(Deserialize)]
        struct ErrorBody {
            error: String,
        }
        let message = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(answer) => answer.error,
            Err(_) => String::from_utf8_lossy(&body).trim().to_string(),
        };
        Err(PluginCliError::Refused {
            action: action.to_string(),
            status,
            message,
        })
    }

    async fn exchange(
        &self,
        action: &str,
        method: Method,
        path: &str,
        wasm: Option<Bytes>,
    ) -> Result<(StatusCode, Bytes), PluginCliError> {
        let broken = |reason: String| PluginCliError::Broken {
            addr: self.addr.clone(),
            reason,
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.addr))
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {}s", CONNECT_TIMEOUT.as_secs()),
                ))
            })
            .map_err(|source| PluginCliError::Unreachable {
                addr: self.addr.clone(),
                source,
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| broken(e.to_string()))?;
        let connection = tokio::spawn(connection);

        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.addr);
        if let Some(token) = &self.token {
            let mut value = http::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| PluginCliError::TokenUnsendable)?;
            value.set_sensitive(true);
            request = request.header(header::AUTHORIZATION, value);
        }
        let body = match wasm {
            Some(wasm) => {
                request = request.header(header::CONTENT_TYPE, "application/wasm");
                wasm
            }
            None => Bytes::new(),
        };
        let request = request
            .body(Full::new(body))
            .map_err(|e| PluginCliError::Unexpected {
                action: action.to_string(),
                addr: self.addr.clone(),
                reason: format!("cannot build the request for {path}: {e}"),
            })?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| broken(e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| broken(e.to_string()))?
            .to_bytes();
        connection.abort();
        Ok((status, body))
    }

    /// The JSON of a 2xx answer as `T`.
    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        action: &str,
        body: &[u8],
    ) -> Result<T, PluginCliError> {
        serde_json::from_slice(body).map_err(|e| PluginCliError::Unexpected {
            action: action.to_string(),
            addr: self.addr.clone(),
            reason: format!("the JSON does not read as expected: {e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addresses_are_host_and_port() {
        assert_eq!(
            host_port("127.0.0.1:9901").ok(),
            Some("127.0.0.1:9901".into())
        );
        assert_eq!(
            host_port("http://localhost:9901/").ok(),
            Some("localhost:9901".into())
        );
        assert_eq!(host_port("[::1]:9901").ok(), Some("[::1]:9901".into()));
        for bad in ["127.0.0.1", "https://a:1", ":9901", "a:port", "a:1/x"] {
            assert!(host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wildcard_listen_addresses_are_dialled_on_loopback() {
        assert_eq!(dialable("0.0.0.0:9901"), "127.0.0.1:9901");
        assert_eq!(dialable("[::]:9901"), "[::1]:9901");
        assert_eq!(dialable("10.0.0.1:9901"), "10.0.0.1:9901");
    }

    #[test]
    fn config_must_be_a_json_object() {
        assert_eq!(object_json(r#"{ "a": 1 }"#).ok(), Some(r#"{"a":1}"#.into()));
        assert!(matches!(
            object_json("{a"),
            Err(PluginCliError::ConfigJson(_))
        ));
        assert!(matches!(
            object_json("[1]"),
            Err(PluginCliError::ConfigNotObject)
        ));
    }

    #[test]
    fn latencies_read_in_their_unit() {
        assert_eq!(micros(512), "512µs");
        assert_eq!(micros(2048), "2.0ms");
        assert_eq!(micros(4_194_304), "4.19s");
    }

    #[test]
    fn tables_align_columns_left_or_right() {
        let rows = [
            ["NAME", "CALLS"].map(String::from),
            ["a", "5"].map(String::from),
            ["long-name", "1234"].map(String::from),
        ];
        assert_eq!(
            table(&rows, [false, true]),
            "NAME       CALLS\na              5\nlong-name   1234\n"
        );
    }
}
