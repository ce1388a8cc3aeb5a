//! The manifest as written: serde types that mirror the TOML one to one.
//!
//! These types are the user-facing format. They are parsed with unknown keys
//! denied and then turned into the runtime tables by [`super::validate`]; the
//! request path never sees them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// The whole manifest file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ManifestFile {
    pub(crate) admin: Option<AdminFile>,
    pub(crate) server: Option<ServerFile>,
    pub(crate) geo: Option<GeoFile>,
    pub(crate) state: Option<StateFile>,
    #[serde(default)]
    pub(crate) listener: Vec<ListenerFile>,
    #[serde(default)]
    pub(crate) plugin: BTreeMap<String, PluginFile>,
    #[serde(default)]
    pub(crate) upstream: BTreeMap<String, UpstreamFile>,
    #[serde(default)]
    pub(crate) route: Vec<RouteFile>,
}

/// One `[plugin.NAME]`: a policy component and how to run it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PluginFile {
    /// `builtin:NAME` or a path to a `.wasm` component.
    pub(crate) source: String,
    /// Handed to the plugin's `init` as JSON.
    pub(crate) config: Option<toml::Table>,
    pub(crate) on_error: Option<OnErrorFile>,
    pub(crate) deadline: Option<DurationText>,
    pub(crate) memory: Option<ByteSize>,
    /// Most host calls one hook call may make.
    pub(crate) max_host_calls: Option<u32>,
    pub(crate) instances: Option<InstancesFile>,
    pub(crate) pool_size: Option<usize>,
    /// Where the plugin's `state` lives: `[state]`'s backend or in process.
    pub(crate) state: Option<PluginStateFile>,
}

/// `state = "shared" | "local"` on a plugin.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum PluginStateFile {
    /// The `[state]` backend (the default).
    Shared,
    /// In process, whatever `[state]` says.
    Local,
}

/// `[state]`: where plugins' shared state lives.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StateFile {
    pub(crate) backend: Option<StateBackendFile>,
    /// `redis://[user:password@]host:port/db`.
    pub(crate) url: Option<String>,
    pub(crate) prefix: Option<String>,
    pub(crate) timeout: Option<DurationText>,
    pub(crate) connect_timeout: Option<DurationText>,
    pub(crate) mode: Option<StateModeFile>,
    pub(crate) sync_interval: Option<DurationText>,
}

/// `backend = "memory" | "redis"`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum StateBackendFile {
    /// In process (the default).
    Memory,
    /// A Redis server shared by several gateways.
    Redis,
}

/// `mode = "strict" | "batched"`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum StateModeFile {
    /// One round trip per call.
    Strict,
    /// Rate limits decided in process, synced every `sync_interval`.
    Batched,
}

/// `on_error = "open" | "closed"`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum OnErrorFile {
    /// Skip the failed policy.
    Open,
    /// Answer 503.
    Closed,
}

/// `instances = "pooled" | "per-request"`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum InstancesFile {
    /// Keep instances and reuse them (the default).
    Pooled,
    /// A fresh instance for every call: full isolation between requests, at ~25–50 µs a call.
    PerRequest,
}

/// `[server]`: process-wide settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerFile {
    pub(crate) drain_timeout: Option<DurationText>,
}

/// One `[[listener]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListenerFile {
    pub(crate) name: String,
    pub(crate) listen: String,
    pub(crate) tls: Option<Vec<TlsCertFile>>,
    pub(crate) redirect_https: Option<u16>,
    pub(crate) max_connections: Option<usize>,
    pub(crate) header_read_timeout: Option<DurationText>,
    /// Longest wait between two reads of a request body (nginx's `client_body_timeout`).
    pub(crate) body_read_timeout: Option<DurationText>,
    pub(crate) idle_timeout: Option<DurationText>,
    pub(crate) max_header_bytes: Option<ByteSize>,
    pub(crate) max_headers: Option<usize>,
    pub(crate) max_body_bytes: Option<ByteSize>,
}

/// One certificate of a TLS listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsCertFile {
    pub(crate) cert: String,
    pub(crate) key: String,
    pub(crate) sni: Option<Vec<String>>,
}

/// One `[upstream.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpstreamFile {
    pub(crate) endpoints: Vec<EndpointFile>,
    pub(crate) balancer: Option<String>,
    pub(crate) health: Option<HealthFile>,
    pub(crate) passive: Option<PassiveFile>,
    pub(crate) retries: Option<RetriesFile>,
    pub(crate) keepalive: Option<usize>,
    pub(crate) keepalive_timeout: Option<DurationText>,
    pub(crate) max_connections: Option<usize>,
    pub(crate) connect_timeout: Option<DurationText>,
    pub(crate) timeout: Option<DurationText>,
}

/// `passive = { max_fails = 3, fail_timeout = "10s" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PassiveFile {
    pub(crate) max_fails: Option<u32>,
    pub(crate) fail_timeout: Option<DurationText>,
}

/// `health = { path = "/health", interval = "2s", timeout = "1s", rise = 2, fall = 3 }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HealthFile {
    /// `http` (default) or `tcp`.
    #[serde(rename = "type")]
    pub(crate) kind: Option<String>,
    pub(crate) path: Option<String>,
    pub(crate) host: Option<String>,
    /// `"200-399"` or one status like `200`.
    pub(crate) expect: Option<toml::Value>,
    pub(crate) interval: Option<DurationText>,
    pub(crate) timeout: Option<DurationText>,
    pub(crate) rise: Option<u32>,
    pub(crate) fall: Option<u32>,
    pub(crate) jitter: Option<DurationText>,
}

/// `retries = { attempts = 3, per_try_timeout = "2s", on = [...], backoff = "25ms", budget = {...} }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetriesFile {
    pub(crate) attempts: Option<u32>,
    pub(crate) per_try_timeout: Option<DurationText>,
    pub(crate) on: Option<Vec<String>>,
    /// `"25ms"`, or `{ initial, multiplier, max, jitter }`.
    pub(crate) backoff: Option<toml::Value>,
    pub(crate) budget: Option<BudgetFile>,
}

/// `budget = { percent = 20, min_per_sec = 10 }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BudgetFile {
    pub(crate) percent: Option<u32>,
    pub(crate) min_per_sec: Option<u32>,
}

/// `[geo]`: the database behind the `geo` host import.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GeoFile {
    /// A MaxMind-format (`.mmdb`) file, relative to the manifest's directory.
    pub(crate) database: String,
}

/// `[admin]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminFile {
    pub(crate) listen: String,
    /// The token, or `env:NAME` to read it from the environment.
    pub(crate) token: Option<String>,
    /// The JSONL file admin changes are appended to, relative to the manifest's directory.
    pub(crate) audit_log: Option<String>,
}

/// An endpoint: either `"host:port"` or a table with details.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum EndpointFile {
    /// `"127.0.0.1:9101"`
    Addr(String),
    /// `{ addr = "127.0.0.1:9102", weight = 2, labels = { region = "eu" }, backup = false }`
    Detailed(EndpointDetailFile),
}

/// The table form of an endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EndpointDetailFile {
    pub(crate) addr: String,
    pub(crate) weight: Option<u32>,
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) backup: bool,
}

/// One `[[route]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteFile {
    pub(crate) name: String,
    #[serde(rename = "match", default)]
    pub(crate) matcher: MatchFile,
    pub(crate) upstream: String,
    pub(crate) policies: Option<Vec<String>>,
    pub(crate) max_body_bytes: Option<ByteSize>,
}

/// A route's `match` table. Every present field must match.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MatchFile {
    pub(crate) host: Option<String>,
    pub(crate) path: Option<String>,
    pub(crate) path_prefix: Option<String>,
    pub(crate) methods: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) headers: BTreeMap<String, String>,
}

/// A duration written with units: `"250ms"`, `"2s"`, `"1m 30s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DurationText(pub(crate) Duration);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = DurationText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration with units, like \"250ms\" or \"2s\"")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<DurationText, E> {
                parse_duration(text).map(DurationText).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(DurationVisitor)
    }
}

/// Parses a duration with units. A bare number is refused: `"2"` could mean
/// seconds or milliseconds, and guessing wrong is worse than an error.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if !trimmed.is_empty() && trimmed.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "invalid duration \"{text}\": a unit is required, like \"{trimmed}s\" or \"{trimmed}ms\""
        ));
    }
    humantime::parse_duration(trimmed).map_err(|e| {
        format!("invalid duration \"{text}\": {e} (use units like \"250ms\" or \"2s\")")
    })
}

/// A size in bytes: an integer, or a string with a unit (`"16MiB"`, `"64KiB"`, `"1MB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ByteSize(pub(crate) u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: a number of bytes or a string like \"16MiB\"")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<ByteSize, E> {
                u64::try_from(n)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid size {n}: must not be negative")))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(n))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<ByteSize, E> {
                parse_size(text).map(ByteSize).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// Parses `"16MiB"`, `"64 KiB"`, `"1MB"`, `"512"` into bytes.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let bad =
        || format!("invalid size \"{text}\": use a number with a unit like \"16MiB\" or \"64KiB\"");
    let number: u64 = digits.parse().map_err(|_| bad())?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("invalid size \"{text}\": too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert!(
            parse_duration("2")
                .unwrap_err()
                .contains("unit is required")
        );
        assert!(parse_duration("2 parsecs").is_err());
    }

    #[test]
    fn sizes_accept_binary_and_decimal_units() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("64 KiB"), Ok(64 << 10));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("12 furlongs").is_err());
        assert!(
            parse_size("99999999999999GiB")
                .unwrap_err()
                .contains("too large")
        );
    }
}
