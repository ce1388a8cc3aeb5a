//! The plugin's settings: parsed from the manifest's `config` JSON once per
//! instance, every key checked, every error naming its key path
//! (`tiers.pro.rate: "10 per sec" is not a rate (as "10r/s" or "600r/m")`).

use serde_json::{Map, Value};
use sluice_sdk::net::IpRanges;

/// A GCRA limit, as nginx `limit_req`: one request per `interval_ns` on
/// average, `burst` more at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// The steady rate, as the time between two requests.
    pub interval_ns: u64,
    /// How many requests beyond the rate are admitted at once.
    pub burst: u32,
    /// How many of those excess requests go through without a delay
    /// (nginx `delay = N`; `nodelay` is the whole burst). The others are
    /// held until the rate allows them.
    pub undelayed: u32,
}

impl Rate {
    /// How long to hold an admitted request that is `ahead_ms` ahead of the
    /// steady rate: not at all for the first `undelayed` excess requests,
    /// then long enough to pace it at the rate.
    pub fn delay_ms(&self, ahead_ms: u64) -> u32 {
        let ahead_ns = u128::from(ahead_ms) * 1_000_000;
        let free_ns = u128::from(self.undelayed) * u128::from(self.interval_ns);
        let delay_ms = ahead_ns.saturating_sub(free_ns) / 1_000_000;
        u32::try_from(delay_ms).unwrap_or(u32::MAX)
    }
}

/// A sliding-window cap, as HAProxy's `http_req_rate` or Cloudflare's rate
/// limiting: at most `requests` in any `window_ms`, estimated from the
/// current fixed window's count and the previous one's, weighted by how much
/// of it the sliding window still covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The most requests in one window.
    pub requests: u32,
    /// The window's length.
    pub window_ms: u64,
    /// Whether refused requests count too (HAProxy's stick-table way: a
    /// client must slow down to get through again).
    pub count_denied: bool,
}

/// What one tier (or the whole plugin, without tiers) allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// A rate and a burst (GCRA).
    Rate(Rate),
    /// A number of requests per sliding window.
    Window(Window),
    /// No limit at all (`tiers.NAME = "unlimited"`).
    Unlimited,
}

/// A named limit; its budgets are apart from every other tier's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    /// The name a request's `tier_header` gives; empty without tiers.
    pub name: String,
    /// What the tier allows.
    pub limit: Limit,
}

/// One part of the key that says whose budget a request draws from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    /// The client's address (behind `trusted_proxies`, from `X-Forwarded-For`).
    ClientIp,
    /// The name of the route that matched.
    Route,
    /// The host the client asked for.
    Host,
    /// A request header's first value (lowercase name), such as an API key.
    Header(String),
}

/// What a request lacking a keyed header gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// The client's address stands in for the header (Kong's fallback).
    ClientIp,
    /// Every such request shares one budget.
    Group,
    /// The request is not limited.
    Skip,
    /// The request is refused.
    Deny,
}

/// Where the `RateLimit-*` headers go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaHeaders {
    /// On refusals only.
    Denied,
    /// On refusals and on the responses to admitted requests.
    All,
    /// Nowhere (`Retry-After` is still sent on refusals).
    None,
}

/// The validated settings; see the README for what each one means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The tiers; without `tiers`, one with an empty name.
    pub tiers: Vec<Tier>,
    /// The request header naming a request's tier (lowercase); `None` without tiers.
    pub tier_header: Option<String>,
    /// The position in `tiers` of the tier for requests naming none (or an unknown one).
    pub default_tier: usize,
    /// Whose budget a request draws from; empty: one budget for all.
    pub key: Vec<KeyPart>,
    /// What a request lacking a keyed header gets.
    pub missing: Missing,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: IpRanges,
    /// IPv6 clients are keyed by this prefix of their address.
    pub ipv6_prefix: u8,
    /// The refusal's status.
    pub status: u16,
    /// The refusal's body.
    pub body: String,
    /// The refusal's `Content-Type`.
    pub content_type: String,
    /// Where the `RateLimit-*` headers go.
    pub quota_headers: QuotaHeaders,
}

impl Config {
    /// The tier a request naming `requested` (its `tier_header` value) is
    /// in: the one of that name (ignoring ASCII case), else the default.
    pub fn tier(&self, requested: Option<&str>) -> &Tier {
        let named = requested.map(str::trim).and_then(|name| {
            self.tiers
                .iter()
                .find(|tier| tier.name.eq_ignore_ascii_case(name))
        });
        match named {
            Some(tier) => tier,
            None => &self.tiers[self.default_tier],
        }
    }

    /// Whether keys read the client's address (for a part or a fallback).
    pub fn uses_client_ip(&self) -> bool {
        let has_header = self.key.iter().any(|p| matches!(p, KeyPart::Header(_)));
        self.key.contains(&KeyPart::ClientIp) || (has_header && self.missing == Missing::ClientIp)
    }
}

/// The settings of one limit: at the top level, or in each tier.
const LIMIT_KEYS: [&str; 7] = [
    "rate",
    "burst",
    "nodelay",
    "delay",
    "requests",
    "window",
    "count_denied",
];

/// The other settings [`Config::parse`] knows at the top level.
const OTHER_KEYS: [&str; 11] = [
    "key",
    "missing",
    "trusted_proxies",
    "ipv6_prefix",
    "tier_header",
    "tiers",
    "default_tier",
    "status",
    "body",
    "content_type",
    "headers",
];

/// The body of a refusal unless `body` says otherwise.
pub const DEFAULT_BODY: &str = "rate limit exceeded\n";

impl Config {
    /// Parses and checks the plugin's config JSON.
    pub fn parse(json: &str) -> Result<Config, String> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| format!("config is not valid JSON: {e}"))?;
        let Some(object) = value.as_object() else {
            return Err("config must be a JSON object".to_string());
        };
        let known =
            |k: &&String| LIMIT_KEYS.contains(&k.as_str()) || OTHER_KEYS.contains(&k.as_str());
        if let Some(key) = object.keys().find(|k| !known(k)) {
            return Err(unknown_key(
                key,
                &[&LIMIT_KEYS[..], &OTHER_KEYS[..]].concat(),
            ));
        }
        let limit_fields: Map<String, Value> = object
            .iter()
            .filter(|(k, _)| LIMIT_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();

        let (tiers, tier_header, default_tier) = match object.get("tiers") {
            None => {
                if let Some(key) = ["tier_header", "default_tier"]
                    .into_iter()
                    .find(|k| object.contains_key(*k))
                {
                    return Err(format!("{key}: applies only with tiers"));
                }
                let limit = parse_limit("", &limit_fields)?;
                let tier = Tier {
                    name: String::new(),
                    limit,
                };
                (vec![tier], None, 0)
            }
            Some(value) => {
                if let Some(key) = limit_fields.keys().next() {
                    return Err(format!(
                        "{key}: with tiers, each tier has its own limit: give tiers.NAME.{key} instead"
                    ));
                }
                let tiers = parse_tiers(value)?;
                let header = match object.get("tier_header") {
                    Some(value) => header_name("tier_header", value)?,
                    None => "x-api-tier".to_string(),
                };
                let default = default_tier(object.get("default_tier"), &tiers)?;
                (tiers, Some(header), default)
            }
        };

        let key = match object.get("key") {
            Some(value) => key_parts(value)?,
            None => vec![KeyPart::ClientIp],
        };
        let has_header = key.iter().any(|p| matches!(p, KeyPart::Header(_)));
        let missing = match object.get("missing") {
            None => Missing::ClientIp,
            Some(_) if !has_header => {
                return Err("missing: applies only when key has a \"header:NAME\" part".to_string());
            }
            Some(value) => match string("missing", value)? {
                "client-ip" => Missing::ClientIp,
                "group" => Missing::Group,
                "skip" => Missing::Skip,
                "deny" => Missing::Deny,
                other => {
                    return Err(format!(
                        "missing: {other:?} is not \"client-ip\", \"group\", \"skip\" or \"deny\""
                    ));
                }
            },
        };

        let mut config = Config {
            tiers,
            tier_header,
            default_tier,
            key,
            missing,
            trusted_proxies: IpRanges::default(),
            ipv6_prefix: 64,
            status: 429,
            body: DEFAULT_BODY.to_string(),
            content_type: "text/plain; charset=utf-8".to_string(),
            quota_headers: QuotaHeaders::Denied,
        };
        for (key, value) in object {
            let key = key.as_str();
            match key {
                "trusted_proxies" => config.trusted_proxies = ip_ranges(key, value)?,
                "ipv6_prefix" => {
                    config.ipv6_prefix = u8::try_from(integer(key, value, 1, 128)?).unwrap_or(128)
                }
                "status" => {
                    config.status = u16::try_from(integer(key, value, 400, 599)?).unwrap_or(429)
                }
                "body" => config.body = string(key, value)?.to_string(),
                "content_type" => config.content_type = header_value(key, value)?,
                "headers" => {
                    config.quota_headers = match string(key, value)? {
                        "denied" => QuotaHeaders::Denied,
                        "all" => QuotaHeaders::All,
                        "none" => QuotaHeaders::None,
                        other => {
                            return Err(format!(
                                "headers: {other:?} is not \"denied\", \"all\" or \"none\""
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
        if !config.uses_client_ip()
            && let Some(key) = ["trusted_proxies", "ipv6_prefix"]
                .into_iter()
                .find(|k| object.contains_key(*k))
        {
            return Err(format!(
                "{key}: applies only when key uses the client's address (\"client-ip\", or a \"header:NAME\" with missing = \"client-ip\")"
            ));
        }
        Ok(config)
    }
}

/// One limit from its fields; `path` (`""` or `tiers.NAME.`) prefixes
/// every key in errors.
fn parse_limit(path: &str, fields: &Map<String, Value>) -> Result<Limit, String> {
    let mut rate = None;
    let mut burst = None;
    let mut nodelay = None;
    let mut delay = None;
    let mut requests = None;
    let mut window = None;
    let mut count_denied = None;
    for (key, value) in fields {
        let at = format!("{path}{key}");
        match key.as_str() {
            "rate" => rate = Some(interval_ns(&at, value)?),
            "burst" => burst = Some(integer(&at, value, 0, u64::from(u32::MAX))?),
            "nodelay" => nodelay = Some(boolean(&at, value)?),
            "delay" => delay = Some(integer(&at, value, 0, u64::from(u32::MAX))?),
            "requests" => requests = Some(integer(&at, value, 1, u64::from(u32::MAX))?),
            "window" => window = Some(duration_ms(&at, value)?),
            "count_denied" => count_denied = Some(boolean(&at, value)?),
            _ => return Err(unknown_key(&at, &LIMIT_KEYS)),
        }
    }
    let either = "give either rate (as rate = \"10r/s\", burst = 20) or requests and window (as requests = 100, window = \"10s\")";
    match (rate, requests, window) {
        (Some(interval_ns), None, None) => {
            if count_denied.is_some() {
                return Err(format!(
                    "{path}count_denied: applies only to a window limit (requests and window)"
                ));
            }
            let burst = u32::try_from(burst.unwrap_or(0)).unwrap_or(u32::MAX);
            let undelayed = match (nodelay, delay) {
                (Some(true), Some(_)) => {
                    return Err(format!(
                        "{path}delay: give either nodelay = true or delay = N, not both"
                    ));
                }
                (Some(true), None) => burst,
                (_, Some(n)) if n > u64::from(burst) => {
                    return Err(format!(
                        "{path}delay: {n} is more than the burst ({burst}); only excess requests within the burst can go undelayed"
                    ));
                }
                (_, Some(n)) => u32::try_from(n).unwrap_or(burst),
                (_, None) => 0,
            };
            Ok(Limit::Rate(Rate {
                interval_ns,
                burst,
                undelayed,
            }))
        }
        (None, Some(requests), Some(window_ms)) => {
            let rate_only = [
                ("burst", burst.is_some()),
                ("nodelay", nodelay.is_some()),
                ("delay", delay.is_some()),
            ];
            if let Some((key, _)) = rate_only.into_iter().find(|(_, given)| *given) {
                return Err(format!(
                    "{path}{key}: applies only to a rate limit (rate), not to requests per window"
                ));
            }
            Ok(Limit::Window(Window {
                requests: u32::try_from(requests).unwrap_or(u32::MAX),
                window_ms,
                count_denied: count_denied.unwrap_or(false),
            }))
        }
        (Some(_), requests, _) => {
            let key = if requests.is_some() {
                "requests"
            } else {
                "window"
            };
            Err(format!("{path}{key}: {either}, not both"))
        }
        (None, Some(_), None) => Err(format!(
            "{path}window: missing: requests needs a window (as window = \"10s\")"
        )),
        (None, None, Some(_)) => Err(format!(
            "{path}requests: missing: window needs a number of requests (as requests = 100)"
        )),
        (None, None, None) => Err(format!("{path}rate: missing: {either}")),
    }
}

/// The `tiers` table: each entry a limit table or `"unlimited"`.
fn parse_tiers(value: &Value) -> Result<Vec<Tier>, String> {
    let Some(table) = value.as_object() else {
        return Err(format!(
            "tiers: expected a table such as {{ free = {{ rate = \"10r/s\" }}, pro = {{ rate = \"100r/s\" }} }}, got {value}"
        ));
    };
    if table.is_empty() {
        return Err("tiers: expected at least one tier".to_string());
    }
    let mut tiers = Vec::with_capacity(table.len());
    for (name, value) in table {
        if name.trim().is_empty() || name.trim() != name {
            return Err(format!(
                "tiers: {name:?} is not a tier name (no spaces around it, not empty)"
            ));
        }
        if tiers
            .iter()
            .any(|t: &Tier| t.name.eq_ignore_ascii_case(name))
        {
            return Err(format!(
                "tiers.{name}: another tier has the same name in another case"
            ));
        }
        let limit = match value {
            Value::String(text) if text == "unlimited" => Limit::Unlimited,
            Value::Object(fields) => parse_limit(&format!("tiers.{name}."), fields)?,
            _ => {
                return Err(format!(
                    "tiers.{name}: expected a table such as {{ rate = \"10r/s\", burst = 5 }} or \"unlimited\", got {value}"
                ));
            }
        };
        tiers.push(Tier {
            name: name.clone(),
            limit,
        });
    }
    Ok(tiers)
}

/// The position of `default_tier` among `tiers`.
fn default_tier(value: Option<&Value>, tiers: &[Tier]) -> Result<usize, String> {
    let names: Vec<&str> = tiers.iter().map(|t| t.name.as_str()).collect();
    let Some(value) = value else {
        return Err(format!(
            "default_tier: missing: name the tier of requests without a known tier header (one of {})",
            names.join(", ")
        ));
    };
    let name = string("default_tier", value)?;
    names.iter().position(|n| *n == name).ok_or_else(|| {
        format!(
            "default_tier: {name:?} is not one of the tiers ({})",
            names.join(", ")
        )
    })
}

/// `key`: one part as a string, or a list of parts.
fn key_parts(value: &Value) -> Result<Vec<KeyPart>, String> {
    match value {
        Value::String(text) => Ok(vec![key_part("key", text)?]),
        Value::Array(entries) => entries
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                let at = format!("key[{i}]");
                key_part(&at, string(&at, entry)?)
            })
            .collect(),
        _ => Err(format!(
            "key: expected a key part such as \"client-ip\", or a list such as [\"client-ip\", \"header:x-api-key\"], got {value}"
        )),
    }
}

/// One key part: `client-ip`, `route`, `host` or `header:NAME`.
fn key_part(at: &str, text: &str) -> Result<KeyPart, String> {
    match text.trim() {
        "client-ip" => Ok(KeyPart::ClientIp),
        "route" => Ok(KeyPart::Route),
        "host" => Ok(KeyPart::Host),
        other => match other.strip_prefix("header:") {
            Some(name) => Ok(KeyPart::Header(
                checked_header_name(name.trim()).map_err(|e| format!("{at}: {e}"))?,
            )),
            None => Err(format!(
                "{at}: {text:?} is not a key part (expected \"client-ip\", \"route\", \"host\" or \"header:NAME\")"
            )),
        },
    }
}

/// `value` as an HTTP header name, lowercase.
fn header_name(key: &str, value: &Value) -> Result<String, String> {
    checked_header_name(string(key, value)?).map_err(|e| format!("{key}: {e}"))
}

fn checked_header_name(name: &str) -> Result<String, String> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(format!("{name:?} is not a header name"));
    }
    Ok(name.to_ascii_lowercase())
}

/// `value` as a header value: visible ASCII and spaces.
fn header_value(key: &str, value: &Value) -> Result<String, String> {
    let raw = string(key, value)?;
    let text = raw.trim();
    if text.is_empty() || !raw.chars().all(|c| c == ' ' || c.is_ascii_graphic()) {
        return Err(format!("{key}: {text:?} is not a header value"));
    }
    Ok(text.to_string())
}

/// `trusted_proxies`: a list of addresses and CIDR ranges.
fn ip_ranges(key: &str, value: &Value) -> Result<IpRanges, String> {
    let bad = || {
        format!(
            "{key}: expected a list of addresses and ranges such as [\"10.0.0.0/8\"], got {value}"
        )
    };
    let entries = value.as_array().ok_or_else(bad)?;
    let texts: Vec<&str> = entries
        .iter()
        .map(Value::as_str)
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    IpRanges::parse(texts).map_err(|e| format!("{key}: {e}"))
}

/// The error for an unknown key, listing the known ones.
fn unknown_key(at: &str, known: &[&str]) -> String {
    format!("{at}: unknown key (expected one of {})", known.join(", "))
}

/// `value` as a string, or an error naming `key`.
fn string<'a>(key: &str, value: &'a Value) -> Result<&'a str, String> {
    value
        .as_str()
        .ok_or_else(|| format!("{key}: expected a string, got {value}"))
}

/// `value` as `true` or `false`, or an error naming `key`.
fn boolean(key: &str, value: &Value) -> Result<bool, String> {
    value
        .as_bool()
        .ok_or_else(|| format!("{key}: expected true or false, got {value}"))
}

/// `value` as a whole number in `min..=max`, or an error naming `key`.
fn integer(key: &str, value: &Value, min: u64, max: u64) -> Result<u64, String> {
    value
        .as_u64()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| format!("{key}: expected a whole number from {min} to {max}, got {value}"))
}

/// `value` as a rate: `"10r/s"`, `"600r/m"`, `"1000r/h"`, or a number of
/// requests per second (`10`, `0.5`). Returns the interval between two
/// requests in nanoseconds.
fn interval_ns(key: &str, value: &Value) -> Result<u64, String> {
    let bad = || format!("{key}: {value} is not a rate (as \"10r/s\" or \"600r/m\")");
    let zero = || format!("{key}: the rate must be above 0, got {value}");
    match value {
        Value::Number(number) => {
            let per_second = number.as_f64().ok_or_else(bad)?;
            if per_second <= 0.0 {
                return Err(zero());
            }
            let interval = (1e9 / per_second).round();
            if !(1.0..=1e18).contains(&interval) {
                return Err(format!(
                    "{key}: {value} requests per second is out of range"
                ));
            }
            // In range: the cast is exact enough (whole nanoseconds).
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Ok(interval as u64)
        }
        Value::String(text) => {
            let (count, unit) = text.trim().split_once("r/").ok_or_else(bad)?;
            let count: u64 = count.trim().parse().map_err(|_| bad())?;
            let unit_ns: u64 = match unit.trim() {
                "s" => 1_000_000_000,
                "m" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                _ => return Err(bad()),
            };
            if count == 0 {
                return Err(zero());
            }
            if count > unit_ns {
                return Err(format!(
                    "{key}: {value} is more than one request per nanosecond"
                ));
            }
            Ok(unit_ns / count)
        }
        _ => Err(bad()),
    }
}

/// `value` as a positive duration in milliseconds, or an error naming `key`.
fn duration_ms(key: &str, value: &Value) -> Result<u64, String> {
    let text = value.as_str().ok_or_else(|| {
        format!("{key}: expected a duration such as \"10s\" or \"1m\", got {value}")
    })?;
    let ms = parse_duration_ms(text).map_err(|e| format!("{key}: {e}"))?;
    if ms == 0 {
        return Err(format!("{key}: must be longer than 0"));
    }
    Ok(ms)
}

use sluice_sdk::config::parse_duration_ms;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Config, String> {
        Config::parse(json)
    }

    fn only_limit(config: &Config) -> Limit {
        assert_eq!(config.tiers.len(), 1);
        config.tiers[0].limit
    }

    #[test]
    fn the_seed_configs() {
        // nginx: limit_req zone=api burst=20 nodelay; rate=10r/s.
        let api = parse(r#"{"rate": "10r/s", "burst": 20, "nodelay": true}"#).unwrap();
        assert_eq!(
            only_limit(&api),
            Limit::Rate(Rate {
                interval_ns: 100_000_000,
                burst: 20,
                undelayed: 20
            })
        );
        assert_eq!(api.key, vec![KeyPart::ClientIp]);
        // nginx: limit_req zone=auth burst=5; rate=5r/s (paced).
        let auth = parse(r#"{"rate": "5r/s", "burst": 5}"#).unwrap();
        assert_eq!(
            only_limit(&auth),
            Limit::Rate(Rate {
                interval_ns: 200_000_000,
                burst: 5,
                undelayed: 0
            })
        );
        // HAProxy: deny if { sc_http_req_rate(0) gt 100 } over 10s per IP.
        let haproxy = parse(r#"{"requests": 100, "window": "10s", "key": "client-ip"}"#).unwrap();
        assert_eq!(
            only_limit(&haproxy),
            Limit::Window(Window {
                requests: 100,
                window_ms: 10_000,
                count_denied: false
            })
        );
    }

    #[test]
    fn defaults() {
        let config = parse(r#"{"rate": 10}"#).unwrap();
        assert_eq!(config.status, 429);
        assert_eq!(config.body, DEFAULT_BODY);
        assert_eq!(config.content_type, "text/plain; charset=utf-8");
        assert_eq!(config.quota_headers, QuotaHeaders::Denied);
        assert_eq!(config.missing, Missing::ClientIp);
        assert_eq!(config.ipv6_prefix, 64);
        assert!(config.trusted_proxies.is_empty());
        assert_eq!(config.tier_header, None);
        assert_eq!(config.tier(Some("anything")).name, "");
    }

    #[test]
    fn rates() {
        let interval = |json: &str| match only_limit(&parse(json).unwrap()) {
            Limit::Rate(rate) => rate.interval_ns,
            other => panic!("{other:?}"),
        };
        assert_eq!(interval(r#"{"rate": "10r/s"}"#), 100_000_000);
        assert_eq!(interval(r#"{"rate": " 600r/m "}"#), 100_000_000);
        assert_eq!(interval(r#"{"rate": "3600r/h"}"#), 1_000_000_000);
        assert_eq!(interval(r#"{"rate": "1r/m"}"#), 60_000_000_000);
        assert_eq!(interval(r#"{"rate": 10}"#), 100_000_000);
        assert_eq!(interval(r#"{"rate": 0.5}"#), 2_000_000_000);
        assert_eq!(interval(r#"{"rate": "3r/s"}"#), 333_333_333);
    }

    #[test]
    fn pacing_and_nginx_delay() {
        let rate = |json: &str| match only_limit(&parse(json).unwrap()) {
            Limit::Rate(rate) => rate,
            other => panic!("{other:?}"),
        };
        let paced = rate(r#"{"rate": "10r/s", "burst": 5}"#);
        assert_eq!(paced.undelayed, 0);
        assert_eq!(paced.delay_ms(0), 0);
        assert_eq!(paced.delay_ms(300), 300);
        let two_free = rate(r#"{"rate": "10r/s", "burst": 5, "delay": 2}"#);
        assert_eq!(two_free.delay_ms(100), 0);
        assert_eq!(two_free.delay_ms(200), 0);
        assert_eq!(two_free.delay_ms(300), 100);
        assert_eq!(two_free.delay_ms(500), 300);
        let nodelay = rate(r#"{"rate": "10r/s", "burst": 5, "nodelay": true}"#);
        assert_eq!(nodelay.delay_ms(500), 0);
        assert_eq!(rate(r#"{"rate": "10r/s", "nodelay": false}"#).undelayed, 0);
    }

    #[test]
    fn tiers() {
        let config = parse(
            r#"{"tier_header": "X-API-Tier", "default_tier": "free", "key": "header:x-api-key",
                "tiers": {"free": {"rate": "10r/s", "burst": 5},
                          "pro": {"rate": "100r/s", "burst": 50, "nodelay": true},
                          "batch": {"requests": 1000, "window": "1m"},
                          "enterprise": "unlimited"}}"#,
        )
        .unwrap();
        assert_eq!(config.tier_header.as_deref(), Some("x-api-tier"));
        assert_eq!(config.tier(None).name, "free");
        assert_eq!(config.tier(Some("gold")).name, "free");
        assert_eq!(config.tier(Some(" PRO ")).name, "pro");
        assert_eq!(config.tier(Some("enterprise")).limit, Limit::Unlimited);
        assert!(matches!(
            config.tier(Some("batch")).limit,
            Limit::Window(Window {
                requests: 1000,
                window_ms: 60_000,
                ..
            })
        ));
        let default_header =
            parse(r#"{"default_tier": "a", "tiers": {"a": {"rate": 1}}}"#).unwrap();
        assert_eq!(default_header.tier_header.as_deref(), Some("x-api-tier"));
    }

    #[test]
    fn keys_and_missing() {
        let config = parse(
            r#"{"rate": 1, "key": ["client-ip", "header:X-Api-Key", "route", "host"], "missing": "group"}"#,
        )
        .unwrap();
        assert_eq!(
            config.key,
            vec![
                KeyPart::ClientIp,
                KeyPart::Header("x-api-key".to_string()),
                KeyPart::Route,
                KeyPart::Host
            ]
        );
        assert_eq!(config.missing, Missing::Group);
        assert!(config.uses_client_ip());
        let global = parse(r#"{"rate": 1, "key": []}"#).unwrap();
        assert!(global.key.is_empty());
        assert!(!global.uses_client_ip());
        let fallback = parse(r#"{"rate": 1, "key": "header:x-api-key"}"#).unwrap();
        assert!(fallback.uses_client_ip(), "the fallback reads the address");
        let skip = parse(r#"{"rate": 1, "key": "header:x-api-key", "missing": "skip"}"#).unwrap();
        assert!(!skip.uses_client_ip());
    }

    #[test]
    fn answers() {
        let config = parse(
            r#"{"rate": 1, "status": 503, "body": "{\"error\":\"slow down\"}",
                "content_type": "application/json", "headers": "all",
                "trusted_proxies": ["10.0.0.0/8", "::1"], "ipv6_prefix": 56}"#,
        )
        .unwrap();
        assert_eq!(config.status, 503);
        assert_eq!(config.body, r#"{"error":"slow down"}"#);
        assert_eq!(config.content_type, "application/json");
        assert_eq!(config.quota_headers, QuotaHeaders::All);
        assert!(!config.trusted_proxies.is_empty());
        assert_eq!(config.ipv6_prefix, 56);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (r#"{}"#, "rate: missing"),
            (
                r#"{"ratee": "10r/s"}"#,
                "ratee: unknown key (expected one of rate,",
            ),
            (
                r#"{"rate": "10 per sec"}"#,
                r#"rate: "10 per sec" is not a rate (as "10r/s" or "600r/m")"#,
            ),
            (r#"{"rate": "10r/d"}"#, "rate: \"10r/d\" is not a rate"),
            (r#"{"rate": "0r/s"}"#, "rate: the rate must be above 0"),
            (r#"{"rate": 0}"#, "rate: the rate must be above 0"),
            (r#"{"rate": -3}"#, "rate: the rate must be above 0"),
            (r#"{"rate": true}"#, "rate: true is not a rate"),
            (
                r#"{"rate": 1e-12}"#,
                "rate: 1e-12 requests per second is out of range",
            ),
            (
                r#"{"rate": 1, "burst": -1}"#,
                "burst: expected a whole number",
            ),
            (
                r#"{"rate": 1, "burst": 2.5}"#,
                "burst: expected a whole number",
            ),
            (
                r#"{"rate": 1, "nodelay": "yes"}"#,
                "nodelay: expected true or false",
            ),
            (
                r#"{"rate": 1, "burst": 2, "delay": 3}"#,
                "delay: 3 is more than the burst (2)",
            ),
            (
                r#"{"rate": 1, "burst": 2, "delay": 1, "nodelay": true}"#,
                "delay: give either",
            ),
            (
                r#"{"rate": 1, "count_denied": true}"#,
                "count_denied: applies only to a window",
            ),
            (
                r#"{"rate": 1, "requests": 10, "window": "1s"}"#,
                "requests: give either rate",
            ),
            (r#"{"requests": 10}"#, "window: missing"),
            (r#"{"window": "10s"}"#, "requests: missing"),
            (
                r#"{"requests": 0, "window": "10s"}"#,
                "requests: expected a whole number from 1",
            ),
            (
                r#"{"requests": 10, "window": 10}"#,
                "window: expected a duration",
            ),
            (
                r#"{"requests": 10, "window": "10 secs"}"#,
                "window: \"10 secs\" is not a duration",
            ),
            (
                r#"{"requests": 10, "window": "0s"}"#,
                "window: must be longer than 0",
            ),
            (
                r#"{"requests": 10, "window": "1s", "burst": 5}"#,
                "burst: applies only to a rate limit",
            ),
            (
                r#"{"requests": 10, "window": "1s", "nodelay": true}"#,
                "nodelay: applies only",
            ),
            (
                r#"{"rate": 1, "key": "ip"}"#,
                r#"key: "ip" is not a key part"#,
            ),
            (
                r#"{"rate": 1, "key": ["client-ip", "cookie:a"]}"#,
                r#"key[1]: "cookie:a" is not a key part"#,
            ),
            (
                r#"{"rate": 1, "key": ["header:bad name"]}"#,
                r#"key[0]: "bad name" is not a header name"#,
            ),
            (r#"{"rate": 1, "key": [1]}"#, "key[0]: expected a string"),
            (r#"{"rate": 1, "key": 1}"#, "key: expected a key part"),
            (
                r#"{"rate": 1, "missing": "skip"}"#,
                "missing: applies only when key has",
            ),
            (
                r#"{"rate": 1, "key": "header:a", "missing": "ip"}"#,
                r#"missing: "ip" is not"#,
            ),
            (
                r#"{"rate": 1, "trusted_proxies": ["10.0.0.0/33"]}"#,
                "trusted_proxies: \"10.0.0.0/33\"",
            ),
            (
                r#"{"rate": 1, "trusted_proxies": "10.0.0.0/8"}"#,
                "trusted_proxies: expected a list",
            ),
            (
                r#"{"rate": 1, "key": "route", "trusted_proxies": ["10.0.0.0/8"]}"#,
                "trusted_proxies: applies only",
            ),
            (
                r#"{"rate": 1, "key": "route", "ipv6_prefix": 64}"#,
                "ipv6_prefix: applies only",
            ),
            (
                r#"{"rate": 1, "ipv6_prefix": 0}"#,
                "ipv6_prefix: expected a whole number from 1 to 128",
            ),
            (
                r#"{"rate": 1, "status": 200}"#,
                "status: expected a whole number from 400 to 599",
            ),
            (r#"{"rate": 1, "body": 5}"#, "body: expected a string"),
            (
                r#"{"rate": 1, "content_type": "text/plain\n"}"#,
                "content_type:",
            ),
            (
                r#"{"rate": 1, "headers": "yes"}"#,
                r#"headers: "yes" is not"#,
            ),
            (
                r#"{"rate": 1, "tier_header": "x-tier"}"#,
                "tier_header: applies only with tiers",
            ),
            (
                r#"{"rate": 1, "default_tier": "free"}"#,
                "default_tier: applies only with tiers",
            ),
            (
                r#"{"rate": 1, "tiers": {"a": {"rate": 1}}, "default_tier": "a"}"#,
                "rate: with tiers, each tier has its own limit",
            ),
            (r#"{"tiers": {"a": {"rate": 1}}}"#, "default_tier: missing"),
            (
                r#"{"tiers": {"a": {"rate": 1}}, "default_tier": "b"}"#,
                r#"default_tier: "b" is not one of the tiers (a)"#,
            ),
            (
                r#"{"tiers": {}, "default_tier": "a"}"#,
                "tiers: expected at least one tier",
            ),
            (
                r#"{"tiers": [], "default_tier": "a"}"#,
                "tiers: expected a table",
            ),
            (
                r#"{"tiers": {"pro": {"rate": "10 per sec"}}, "default_tier": "pro"}"#,
                r#"tiers.pro.rate: "10 per sec" is not a rate (as "10r/s" or "600r/m")"#,
            ),
            (
                r#"{"tiers": {"pro": {"rate": 1, "brust": 5}}, "default_tier": "pro"}"#,
                "tiers.pro.brust: unknown key",
            ),
            (
                r#"{"tiers": {"pro": {"burst": 5}}, "default_tier": "pro"}"#,
                "tiers.pro.rate: missing",
            ),
            (
                r#"{"tiers": {"pro": "none"}, "default_tier": "pro"}"#,
                "tiers.pro: expected a table",
            ),
            (
                r#"{"tiers": {"pro": {"rate": 1}, "PRO": {"rate": 2}}, "default_tier": "pro"}"#,
                "tiers.pro: another tier",
            ),
            (
                r#"{"tiers": {" a": {"rate": 1}}, "default_tier": " a"}"#,
                "tiers: \" a\" is not a tier name",
            ),
            (
                r#"{"tiers": {"a": {"rate": 1}}, "default_tier": "a", "tier_header": "a b"}"#,
                "tier_header: \"a b\" is not a header name",
            ),
        ];
        for (json, expected) in cases {
            let err = parse(json).unwrap_err();
            assert!(err.contains(expected), "{json}: {err}");
        }
        assert!(parse("[]").is_err());
        assert!(parse("{").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("10s"), Ok(10_000));
        assert_eq!(parse_duration_ms("5m"), Ok(300_000));
        assert_eq!(parse_duration_ms("1h"), Ok(3_600_000));
        for bad in ["60", "1.5s", "s", "10 years", "-1s", ""] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
    }
}
