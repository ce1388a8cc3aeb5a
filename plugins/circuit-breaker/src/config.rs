//! The plugin's settings: parsed from the manifest's `config` JSON once per
//! instance, every key checked, every error naming its key.

use serde_json::{Map, Value};

/// What one breaker watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One breaker per upstream: when open, requests are answered 503 (or steered).
    Upstream,
    /// One breaker per endpoint: when open, the endpoint is ejected and traffic
    /// fails over to the others (outlier detection).
    Endpoint,
}

/// Which outcomes the rates are computed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The last N outcomes (resilience4j's count-based sliding window).
    Count(u32),
    /// The outcomes of about the last `ms` milliseconds, in ten buckets.
    Time {
        /// The window's length in milliseconds (at least [`Window::BUCKETS`]).
        ms: u64,
    },
}

impl Window {
    /// How many buckets a time-based window is cut into.
    pub const BUCKETS: u64 = 10;
}

/// What upstream scope does with a request while the breaker is open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WhenOpen {
    /// Answer 503 with `Retry-After`.
    Reject,
    /// Forward to this upstream instead.
    Steer(String),
}

/// A set of HTTP status codes (100–599) that count as failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSet([u64; 10]);

impl StatusSet {
    /// No status counts as a failure (only errors do).
    pub const fn empty() -> StatusSet {
        StatusSet([0; 10])
    }

    /// Every `5xx` status: the default.
    pub fn server_errors() -> StatusSet {
        let mut set = StatusSet::empty();
        set.insert_range(500, 599);
        set
    }

    fn insert_range(&mut self, first: u16, last: u16) {
        for code in first..=last {
            let bit = usize::from(code);
            self.0[bit / 64] |= 1 << (bit % 64);
        }
    }

    /// Whether `status` is in the set.
    pub fn contains(&self, status: u16) -> bool {
        let bit = usize::from(status);
        self.0
            .get(bit / 64)
            .is_some_and(|word| word & (1 << (bit % 64)) != 0)
    }

    /// Parses one entry: a class (`"5xx"`) or a code (`"503"` or `503`).
    fn insert(&mut self, entry: &Value) -> Result<(), String> {
        let text = match entry {
            Value::String(text) => text.trim().to_ascii_lowercase(),
            Value::Number(n) => n.to_string(),
            _ => {
                return Err(format!(
                    "expected a string such as \"5xx\" or \"503\", got {entry}"
                ));
            }
        };
        if let Some(class) = text.strip_suffix("xx")
            && let Ok(class @ 1..=5) = class.parse::<u16>()
        {
            self.insert_range(class * 100, class * 100 + 99);
            return Ok(());
        }
        match text.parse::<u16>() {
            Ok(code @ 100..=599) => {
                self.insert_range(code, code);
                Ok(())
            }
            _ => Err(format!(
                "{entry} is not a status class (\"1xx\" to \"5xx\") or a status code (100 to 599)"
            )),
        }
    }
}

/// The validated settings; see the README for what each one means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Whether a breaker guards an upstream or each endpoint.
    pub scope: Scope,
    /// Trip after this many failures in a row; 0 = off.
    pub consecutive_failures: u32,
    /// Trip when at least this percentage of the window failed; 0 = off.
    pub failure_rate: u32,
    /// Trip when at least this percentage of the window was slow; 0 = off.
    pub slow_call_rate: u32,
    /// An outcome slower than this (microseconds) is slow.
    pub slow_call_us: u64,
    /// The rates are judged only once the window holds this many outcomes.
    pub minimum_calls: u32,
    /// The sliding window the rates are computed over.
    pub window: Window,
    /// Status codes that count as failures (errors always do).
    pub failure_statuses: StatusSet,
    /// How long the breaker stays open before trial calls (milliseconds);
    /// in endpoint scope, the base ejection time.
    pub wait_ms: u64,
    /// How many trial calls half-open lets through and judges.
    pub permitted_half_open: u32,
    /// What an open upstream-scope breaker does with requests.
    pub when_open: WhenOpen,
    /// Endpoint scope: the longest ejection (milliseconds), and how long
    /// after an ejection its count is forgotten.
    pub max_ejection_ms: u64,
    /// Endpoint scope: the largest share of an upstream's endpoints ejected at once.
    pub max_ejection_percent: u32,
}

/// resilience4j's default sliding-window size and minimum number of calls.
const DEFAULT_WINDOW: u32 = 100;
/// Upper bound on `window`: each slot is one key in the host's store.
const MAX_WINDOW: u32 = 10_000;
/// Upper bound on `permitted_half_open`.
const MAX_PERMITTED: u32 = 10_000;

impl Default for Config {
    fn default() -> Self {
        Config {
            scope: Scope::Upstream,
            consecutive_failures: 0,
            failure_rate: 50,
            slow_call_rate: 100,
            slow_call_us: 60_000_000,
            minimum_calls: DEFAULT_WINDOW,
            window: Window::Count(DEFAULT_WINDOW),
            failure_statuses: StatusSet::server_errors(),
            wait_ms: 60_000,
            permitted_half_open: 10,
            when_open: WhenOpen::Reject,
            max_ejection_ms: 300_000,
            max_ejection_percent: 10,
        }
    }
}

/// The settings [`Config::parse`] knows.
const KEYS: [&str; 14] = [
    "scope",
    "consecutive_failures",
    "failure_rate",
    "slow_call_rate",
    "slow_call_duration",
    "minimum_calls",
    "window",
    "window_duration",
    "failure_statuses",
    "wait_duration",
    "permitted_half_open",
    "when_open",
    "max_ejection_time",
    "max_ejection_percent",
];

impl Config {
    /// Parses and checks the plugin's config JSON.
    pub fn parse(json: &str) -> Result<Config, String> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| format!("config is not valid JSON: {e}"))?;
        let Some(object) = value.as_object() else {
            return Err("config must be a JSON object".to_string());
        };
        let mut config = Config::default();
        let mut window = None;
        let mut window_duration = None;
        let mut minimum_calls = None;
        for (key, value) in object {
            let key = key.as_str();
            match key {
                "scope" => {
                    config.scope = match string(key, value)? {
                        "upstream" => Scope::Upstream,
                        "endpoint" => Scope::Endpoint,
                        other => {
                            return Err(format!(
                                "\"scope\": {other:?} is not \"upstream\" or \"endpoint\""
                            ));
                        }
                    }
                }
                "consecutive_failures" => {
                    config.consecutive_failures = integer(key, value, 0, u32::MAX)?
                }
                "failure_rate" => config.failure_rate = percent(key, value)?,
                "slow_call_rate" => config.slow_call_rate = percent(key, value)?,
                "slow_call_duration" => config.slow_call_us = duration_ms(key, value)? * 1000,
                "minimum_calls" => minimum_calls = Some(integer(key, value, 1, u32::MAX)?),
                "window" => window = Some(integer(key, value, 1, MAX_WINDOW)?),
                "window_duration" => {
                    let ms = duration_ms(key, value)?;
                    if ms < Window::BUCKETS {
                        return Err(format!(
                            "\"window_duration\": must be at least {}ms (the window has {} buckets)",
                            Window::BUCKETS,
                            Window::BUCKETS
                        ));
                    }
                    window_duration = Some(ms);
                }
                "failure_statuses" => config.failure_statuses = statuses(value)?,
                "wait_duration" => config.wait_ms = duration_ms(key, value)?,
                "permitted_half_open" => {
                    config.permitted_half_open = integer(key, value, 1, MAX_PERMITTED)?;
                }
                "when_open" => config.when_open = when_open(value)?,
                "max_ejection_time" => config.max_ejection_ms = duration_ms(key, value)?,
                "max_ejection_percent" => {
                    config.max_ejection_percent = integer(key, value, 0, 100)?
                }
                _ => return Err(unknown_key(key)),
            }
        }

        config.window = match (window, window_duration) {
            (Some(_), Some(_)) => {
                return Err(
                    "\"window_duration\": give either \"window\" (a number of calls) or \"window_duration\" (a time), not both"
                        .to_string(),
                );
            }
            (_, Some(ms)) => Window::Time { ms },
            (Some(calls), None) => Window::Count(calls),
            (None, None) => Window::Count(DEFAULT_WINDOW),
        };
        config.minimum_calls = match (minimum_calls, config.window) {
            (Some(min), Window::Count(calls)) if min > calls => {
                return Err(format!(
                    "\"minimum_calls\": {min} is more than the window's {calls} calls, so the rates could never be judged"
                ));
            }
            (Some(min), _) => min,
            // resilience4j: a count-based window smaller than the minimum lowers it.
            (None, Window::Count(calls)) => DEFAULT_WINDOW.min(calls),
            (None, Window::Time { .. }) => DEFAULT_WINDOW,
        };

        let endpoint_only = ["max_ejection_time", "max_ejection_percent"];
        match config.scope {
            Scope::Upstream => {
                if let Some(key) = endpoint_only.iter().find(|k| object.contains_key(**k)) {
                    return Err(format!(
                        "{key:?}: applies only to scope = \"endpoint\" (outlier ejection)"
                    ));
                }
            }
            Scope::Endpoint => {
                if object.contains_key("when_open") {
                    return Err(
                        "\"when_open\": applies only to scope = \"upstream\"; an open endpoint is ejected and traffic goes to the others"
                            .to_string(),
                    );
                }
            }
        }
        if config.consecutive_failures == 0 && !config.rates_enabled() {
            return Err(
                "\"consecutive_failures\": nothing can trip the breaker: set consecutive_failures, failure_rate or slow_call_rate above 0"
                    .to_string(),
            );
        }
        Ok(config)
    }

    /// Whether the failure or slow-call rate is judged (so the window is kept).
    pub fn rates_enabled(&self) -> bool {
        self.failure_rate > 0 || self.slow_call_rate > 0
    }

    /// How long an open breaker stays open at most (milliseconds): a stored
    /// deadline further away than this means the clock went back.
    pub fn longest_open_ms(&self) -> u64 {
        match self.scope {
            Scope::Upstream => self.wait_ms,
            Scope::Endpoint => self.wait_ms.max(self.max_ejection_ms),
        }
    }

    /// How long the endpoint is ejected the `count`-th time in a row
    /// (Envoy: base ejection time × count, capped by `max_ejection_time`,
    /// but never below the base).
    pub fn ejection_ms(&self, count: u64) -> u64 {
        self.wait_ms
            .saturating_mul(count.max(1))
            .min(self.max_ejection_ms.max(self.wait_ms))
    }

    /// How long half-open waits for its trial calls to report before it
    /// hands out new permits (trial requests answered by a later policy, or
    /// whose client went away, never report).
    pub fn half_open_stall_ms(&self) -> u64 {
        self.wait_ms.max(self.slow_call_us / 1000)
    }
}

/// The error for an unknown key, listing the known ones.
fn unknown_key(key: &str) -> String {
    format!("{key:?}: unknown key (expected one of {})", KEYS.join(", "))
}

/// `value` as a string, or an error naming `key`.
fn string<'a>(key: &str, value: &'a Value) -> Result<&'a str, String> {
    value
        .as_str()
        .ok_or_else(|| format!("{key:?}: expected a string, got {value}"))
}

/// `value` as a whole number in `min..=max`, or an error naming `key`.
fn integer(key: &str, value: &Value, min: u32, max: u32) -> Result<u32, String> {
    value
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| format!("{key:?}: expected a whole number from {min} to {max}, got {value}"))
}

/// `value` as a whole percentage, 0 (off) to 100.
fn percent(key: &str, value: &Value) -> Result<u32, String> {
    integer(key, value, 0, 100).map_err(|_| {
        format!(
            "{key:?}: expected a whole percentage from 1 to 100, or 0 to turn it off, got {value}"
        )
    })
}

/// `value` as a positive duration in milliseconds, or an error naming `key`.
fn duration_ms(key: &str, value: &Value) -> Result<u64, String> {
    let text = value.as_str().ok_or_else(|| {
        format!("{key:?}: expected a duration such as \"250ms\" or \"60s\", got {value}")
    })?;
    let ms = parse_duration_ms(text).map_err(|e| format!("{key:?}: {e}"))?;
    if ms == 0 {
        return Err(format!("{key:?}: must be longer than 0"));
    }
    Ok(ms)
}

use sluice_sdk::config::parse_duration_ms;

/// The `failure_statuses` list.
fn statuses(value: &Value) -> Result<StatusSet, String> {
    let Some(entries) = value.as_array() else {
        return Err(format!(
            "\"failure_statuses\": expected a list such as [\"5xx\", \"429\"], got {value}"
        ));
    };
    let mut set = StatusSet::empty();
    for entry in entries {
        set.insert(entry)
            .map_err(|e| format!("\"failure_statuses\": {e}"))?;
    }
    Ok(set)
}

/// The `when_open` setting: `"reject"` or `{"steer": "UPSTREAM"}`.
fn when_open(value: &Value) -> Result<WhenOpen, String> {
    let bad =
        || format!("\"when_open\": expected \"reject\" or {{ steer = \"UPSTREAM\" }}, got {value}");
    match value {
        Value::String(text) if text == "reject" => Ok(WhenOpen::Reject),
        Value::Object(table) => steer(table).ok_or_else(bad),
        _ => Err(bad()),
    }
}

/// `{"steer": "NAME"}` with a non-empty name and nothing else.
fn steer(table: &Map<String, Value>) -> Option<WhenOpen> {
    if table.len() != 1 {
        return None;
    }
    let name = table.get("steer")?.as_str()?.trim();
    (!name.is_empty()).then(|| WhenOpen::Steer(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Config, String> {
        Config::parse(json)
    }

    #[test]
    fn defaults_are_resilience4j_s() {
        let config = parse("{}").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.scope, Scope::Upstream);
        assert_eq!(config.failure_rate, 50);
        assert_eq!(config.slow_call_rate, 100);
        assert_eq!(config.slow_call_us, 60_000_000);
        assert_eq!(config.window, Window::Count(100));
        assert_eq!(config.minimum_calls, 100);
        assert_eq!(config.wait_ms, 60_000);
        assert_eq!(config.permitted_half_open, 10);
        assert!(config.failure_statuses.contains(500));
        assert!(config.failure_statuses.contains(599));
        assert!(!config.failure_statuses.contains(499));
        assert!(!config.failure_statuses.contains(200));
    }

    #[test]
    fn the_seed_numbers() {
        let config = parse(
            r#"{"failure_rate": 50, "slow_call_duration": "1s", "window": 100,
                "wait_duration": "60s", "permitted_half_open": 10}"#,
        )
        .unwrap();
        assert_eq!(config.slow_call_us, 1_000_000);
        assert_eq!(config.window, Window::Count(100));
        assert_eq!(config.wait_ms, 60_000);
    }

    #[test]
    fn envoy_style_outlier_ejection() {
        let config = parse(
            r#"{"scope": "endpoint", "consecutive_failures": 5, "failure_rate": 0,
                "slow_call_rate": 0, "wait_duration": "30s", "max_ejection_time": "300s",
                "max_ejection_percent": 10}"#,
        )
        .unwrap();
        assert_eq!(config.scope, Scope::Endpoint);
        assert!(!config.rates_enabled());
        assert_eq!(config.ejection_ms(1), 30_000);
        assert_eq!(config.ejection_ms(2), 60_000);
        assert_eq!(config.ejection_ms(10), 300_000);
        assert_eq!(config.ejection_ms(11), 300_000);
        assert_eq!(config.longest_open_ms(), 300_000);
    }

    #[test]
    fn ejection_time_is_never_below_the_base() {
        let config =
            parse(r#"{"scope": "endpoint", "wait_duration": "10m", "max_ejection_time": "1m"}"#)
                .unwrap();
        assert_eq!(config.ejection_ms(1), 600_000);
        assert_eq!(config.ejection_ms(3), 600_000);
    }

    #[test]
    fn windows() {
        let config = parse(r#"{"window": 10}"#).unwrap();
        assert_eq!(config.window, Window::Count(10));
        assert_eq!(
            config.minimum_calls, 10,
            "a small window lowers the minimum"
        );
        let config = parse(r#"{"window": 20, "minimum_calls": 5}"#).unwrap();
        assert_eq!(config.minimum_calls, 5);
        let config = parse(r#"{"window_duration": "60s"}"#).unwrap();
        assert_eq!(config.window, Window::Time { ms: 60_000 });
        assert_eq!(config.minimum_calls, 100);
        let config = parse(r#"{"window_duration": "10s", "minimum_calls": 1000}"#).unwrap();
        assert_eq!(config.minimum_calls, 1000);
    }

    #[test]
    fn statuses() {
        let config = parse(r#"{"failure_statuses": ["503", 429, "4XX"]}"#).unwrap();
        let set = &config.failure_statuses;
        assert!(set.contains(503));
        assert!(!set.contains(500));
        assert!(set.contains(429));
        assert!(set.contains(404));
        let config = parse(r#"{"failure_statuses": []}"#).unwrap();
        assert!(!config.failure_statuses.contains(500));
    }

    #[test]
    fn when_open_forms() {
        assert_eq!(
            parse(r#"{"when_open": "reject"}"#).unwrap().when_open,
            WhenOpen::Reject
        );
        assert_eq!(
            parse(r#"{"when_open": {"steer": "fallback"}}"#)
                .unwrap()
                .when_open,
            WhenOpen::Steer("fallback".to_string())
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("60s"), Ok(60_000));
        assert_eq!(parse_duration_ms("5m"), Ok(300_000));
        assert_eq!(parse_duration_ms("1h"), Ok(3_600_000));
        for bad in ["60", "1.5s", "s", "10 years", "-1s", ""] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (r#"{"scope": "route"}"#, "\"scope\""),
            (
                r#"{"consecutive_failures": -1}"#,
                "\"consecutive_failures\"",
            ),
            (
                r#"{"consecutive_failures": "5"}"#,
                "\"consecutive_failures\"",
            ),
            (r#"{"failure_rate": 101}"#, "\"failure_rate\""),
            (r#"{"failure_rate": 50.5}"#, "\"failure_rate\""),
            (r#"{"slow_call_rate": -5}"#, "\"slow_call_rate\""),
            (r#"{"slow_call_duration": 1000}"#, "\"slow_call_duration\""),
            (
                r#"{"slow_call_duration": "0ms"}"#,
                "\"slow_call_duration\": must be longer than 0",
            ),
            (r#"{"minimum_calls": 0}"#, "\"minimum_calls\""),
            (r#"{"window": 0}"#, "\"window\""),
            (r#"{"window": 100000}"#, "\"window\""),
            (
                r#"{"window": 10, "minimum_calls": 11}"#,
                "\"minimum_calls\": 11 is more than",
            ),
            (
                r#"{"window": 10, "window_duration": "10s"}"#,
                "\"window_duration\": give either",
            ),
            (
                r#"{"window_duration": "5ms"}"#,
                "\"window_duration\": must be at least",
            ),
            (r#"{"failure_statuses": "5xx"}"#, "\"failure_statuses\""),
            (r#"{"failure_statuses": ["6xx"]}"#, "\"failure_statuses\""),
            (r#"{"failure_statuses": ["99"]}"#, "\"failure_statuses\""),
            (r#"{"failure_statuses": [true]}"#, "\"failure_statuses\""),
            (r#"{"wait_duration": "soon"}"#, "\"wait_duration\""),
            (r#"{"permitted_half_open": 0}"#, "\"permitted_half_open\""),
            (r#"{"when_open": "steer"}"#, "\"when_open\""),
            (r#"{"when_open": {"steer": ""}}"#, "\"when_open\""),
            (r#"{"when_open": {"steer": "a", "x": 1}}"#, "\"when_open\""),
            (
                r#"{"max_ejection_time": "1m"}"#,
                "\"max_ejection_time\": applies only",
            ),
            (
                r#"{"max_ejection_percent": 20}"#,
                "\"max_ejection_percent\": applies only",
            ),
            (
                r#"{"scope": "endpoint", "max_ejection_percent": 101}"#,
                "\"max_ejection_percent\"",
            ),
            (
                r#"{"scope": "endpoint", "when_open": "reject"}"#,
                "\"when_open\": applies only",
            ),
            (
                r#"{"failure_rate": 0, "slow_call_rate": 0}"#,
                "nothing can trip",
            ),
            (
                r#"{"failure_threshold": 5}"#,
                "\"failure_threshold\": unknown key",
            ),
            (
                r#"{"window_type": "count"}"#,
                "\"window_type\": unknown key",
            ),
        ];
        for (json, expected) in cases {
            let err = parse(json).unwrap_err();
            assert!(err.contains(expected), "{json}: {err}");
        }
        assert!(parse("[]").is_err());
        assert!(parse("{").is_err());
    }
}
