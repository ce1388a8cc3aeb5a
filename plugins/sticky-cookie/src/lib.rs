//! `builtin:sticky-cookie`: session affinity by cookie.
//!
//! ```json
//! {"cookie": "sluice_affinity", "ttl": "1h", "fallback": "least-request"}
//! ```
//!
//! A client without the cookie (or whose endpoint is no longer a candidate)
//! gets an endpoint from the `fallback` algorithm; the response then sets
//! the cookie to the endpoint's affinity value (16 hex digits of
//! [`hash64`] of its address, which does not reveal the address), and later
//! requests carrying it go to the same endpoint. When that endpoint fails
//! its health checks the client is picked afresh and re-pinned.

use std::time::Duration;

use serde_json::Value;
use sluice_sdk::balance::{Algorithm, Balancer, FingerprintCache, cookie, hash64};
use sluice_sdk::{Candidates, Policy, Request, Response, Upstream, log};

/// The `SameSite` attribute of the cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SameSite {
    Strict,
    Lax,
    None,
}

impl SameSite {
    fn as_str(self) -> &'static str {
        match self {
            SameSite::Strict => "Strict",
            SameSite::Lax => "Lax",
            SameSite::None => "None",
        }
    }
}

/// The validated settings.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Config {
    /// The cookie's name.
    cookie: String,
    /// `Max-Age` in seconds; 0 for a session cookie (no `Max-Age`).
    ttl_secs: u64,
    /// The cookie's `Path`.
    path: String,
    /// Whether to add `Secure`.
    secure: bool,
    /// Whether to add `HttpOnly`.
    http_only: bool,
    /// The `SameSite` attribute, if any.
    same_site: Option<SameSite>,
    /// How to pick without a valid cookie.
    fallback: Algorithm,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cookie: "sluice_affinity".to_string(),
            ttl_secs: 3600,
            path: "/".to_string(),
            secure: false,
            http_only: true,
            same_site: None,
            fallback: Algorithm::RoundRobin,
        }
    }
}

impl Config {
    /// Everything after `name=value` in the `Set-Cookie` header.
    fn attributes(&self) -> String {
        let mut attributes = format!("; Path={}", self.path);
        if self.ttl_secs > 0 {
            attributes.push_str(&format!("; Max-Age={}", self.ttl_secs));
        }
        if self.http_only {
            attributes.push_str("; HttpOnly");
        }
        if self.secure {
            attributes.push_str("; Secure");
        }
        if let Some(same_site) = self.same_site {
            attributes.push_str("; SameSite=");
            attributes.push_str(same_site.as_str());
        }
        attributes
    }
}

/// Parses and checks the whole config.
fn parse_config(config: &str) -> Result<Config, String> {
    let value: Value =
        serde_json::from_str(config).map_err(|e| format!("config is not valid JSON: {e}"))?;
    let Some(object) = value.as_object() else {
        return Err("config must be a JSON object".to_string());
    };
    let mut parsed = Config::default();
    for (key, value) in object {
        match key.as_str() {
            "cookie" => {
                let name = string(key, value)?;
                if name.is_empty() || !name.bytes().all(is_token_byte) {
                    return Err(format!("\"cookie\": {name:?} is not a valid cookie name"));
                }
                parsed.cookie = name.to_string();
            }
            "ttl" => parsed.ttl_secs = ttl_secs(value)?,
            "path" => {
                let path = string(key, value)?;
                if !path.starts_with('/')
                    || path
                        .bytes()
                        .any(|b| b == b';' || !(0x20..0x7f).contains(&b))
                {
                    return Err(format!(
                        "\"path\": {path:?} must start with '/' and hold no ';' or control characters"
                    ));
                }
                parsed.path = path.to_string();
            }
            "secure" => parsed.secure = boolean(key, value)?,
            "http_only" => parsed.http_only = boolean(key, value)?,
            "same_site" => {
                parsed.same_site = match string(key, value)? {
                    "Strict" => Some(SameSite::Strict),
                    "Lax" => Some(SameSite::Lax),
                    "None" => Some(SameSite::None),
                    other => {
                        return Err(format!(
                            "\"same_site\": {other:?} is not \"Strict\", \"Lax\" or \"None\""
                        ));
                    }
                }
            }
            "fallback" => {
                parsed.fallback = Algorithm::parse(string(key, value)?)
                    .map_err(|e| format!("\"fallback\": {e}"))?;
            }
            _ => return Err(unknown_key(key)),
        }
    }
    if parsed.same_site == Some(SameSite::None) && !parsed.secure {
        return Err(
            "\"same_site\": \"None\" needs \"secure\": true (browsers drop the cookie otherwise)"
                .to_string(),
        );
    }
    Ok(parsed)
}

/// The settings [`parse_config`] knows.
const KEYS: [&str; 7] = [
    "cookie",
    "ttl",
    "path",
    "secure",
    "http_only",
    "same_site",
    "fallback",
];

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

/// `value` as a boolean, or an error naming `key`.
fn boolean(key: &str, value: &Value) -> Result<bool, String> {
    value
        .as_bool()
        .ok_or_else(|| format!("{key:?}: expected true or false, got {value}"))
}

/// The `ttl` setting in whole seconds: a number of seconds, or a duration
/// such as `"30m"`; 0 means a session cookie.
fn ttl_secs(value: &Value) -> Result<u64, String> {
    let duration = match value {
        Value::Number(n) => n.as_u64().map(Duration::from_secs).ok_or_else(|| {
            format!("\"ttl\": {n} is not a whole, non-negative number of seconds")
        })?,
        Value::String(text) => parse_duration(text).map_err(|e| format!("\"ttl\": {e}"))?,
        _ => {
            return Err(format!(
                "\"ttl\": expected a duration such as \"1h\" or a number of seconds, got {value}"
            ));
        }
    };
    if duration.subsec_nanos() != 0 {
        return Err(format!(
            "\"ttl\": {duration:?} is not a whole number of seconds (cookies count in seconds)"
        ));
    }
    Ok(duration.as_secs())
}

/// Parses `"250ms"`, `"30s"`, `"10m"`, `"1h"`, `"1d"` or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let invalid =
        || format!("{text:?} is not a duration (a number with ms, s, m, h or d, such as \"30m\")");
    let amount: u64 = digits.parse().map_err(|_| invalid())?;
    let millis_per_unit: u64 = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(invalid()),
    };
    amount
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// Whether `byte` may appear in a cookie name (an HTTP token).
fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// The cookie value that pins a client to the endpoint at `address`.
fn affinity_value(address: &str) -> String {
    format!("{:016x}", hash64(address.as_bytes()))
}

/// The affinity hash in a cookie value, if it is one.
fn parse_affinity(value: &str) -> Option<u64> {
    if value.len() != 16 {
        return None;
    }
    u64::from_str_radix(value, 16).ok()
}

/// The sticky-cookie balancer.
pub struct StickyCookie {
    config: Config,
    /// `Path=...; Max-Age=...` and the rest, computed once.
    attributes: String,
    /// Affinity hash → position, per candidate set.
    positions: FingerprintCache<AffinityMap>,
    /// For clients without a valid cookie.
    fallback: Balancer,
}

impl Policy for StickyCookie {
    fn init(config: &str) -> Result<Self, String> {
        let config = parse_config(config)?;
        Ok(StickyCookie {
            attributes: config.attributes(),
            fallback: Balancer::new(config.fallback),
            positions: FingerprintCache::new(),
            config,
        })
    }

    fn pick(&self, req: &Request, upstream: &Upstream, candidates: &Candidates) -> Option<u32> {
        let len = candidates.len();
        if len == 0 {
            return None;
        }
        let pinned = cookie(req, &self.config.cookie)
            .as_deref()
            .and_then(parse_affinity)
            .and_then(|hash| {
                let positions = self.positions.get_or_build(candidates.fingerprint(), || {
                    affinity_positions(upstream, candidates)
                });
                positions.position(hash)
            })
            .filter(|&p| p < len);
        pinned.or_else(|| self.fallback.pick(upstream, candidates))
    }

    fn on_response(&self, req: &Request, resp: &Response) {
        let Some(address) = req.endpoint() else {
            return;
        };
        let value = affinity_value(&address);
        if cookie(req, &self.config.cookie).as_deref() == Some(value.as_str()) {
            return;
        }
        let header = format!("{}={value}{}", self.config.cookie, self.attributes);
        if let Err(e) = resp.append_header("set-cookie", &header) {
            log::warn(&format!("cannot set the affinity cookie: {e}"));
        }
    }
}

/// Affinity hash → position for every candidate of a set, sorted by hash.
///
/// (A sorted list rather than a `HashMap`, whose random seed would make the
/// component import `wasi:random`.)
#[derive(Debug, Default, PartialEq, Eq)]
struct AffinityMap(Vec<(u64, u32)>);

impl AffinityMap {
    /// The map for candidates' `addresses`, by position (`None`: unknown;
    /// the first position wins on a duplicate address).
    fn new(addresses: impl IntoIterator<Item = Option<String>>) -> Self {
        let mut entries: Vec<(u64, u32)> = (0u32..)
            .zip(addresses)
            .filter_map(|(position, address)| Some((hash64(address?.as_bytes()), position)))
            .collect();
        entries.sort_unstable();
        entries.dedup_by_key(|(hash, _)| *hash);
        AffinityMap(entries)
    }

    /// The position of the candidate whose affinity hash is `hash`.
    fn position(&self, hash: u64) -> Option<u32> {
        let index = self.0.binary_search_by_key(&hash, |(h, _)| *h).ok()?;
        self.0.get(index).map(|(_, position)| *position)
    }
}

/// The affinity map of `candidates`, from their addresses.
fn affinity_positions(upstream: &Upstream, candidates: &Candidates) -> AffinityMap {
    AffinityMap::new(candidates.ids().into_iter().map(|id| upstream.address(id)))
}

sluice_sdk::export_tracking_balancer!(StickyCookie);

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Config, String> {
        parse_config(json)
    }

    #[test]
    fn defaults() {
        let config = parse("{}").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.attributes(), "; Path=/; Max-Age=3600; HttpOnly");
    }

    #[test]
    fn every_setting() {
        let config = parse(
            r#"{"cookie": "srv", "ttl": "10m", "path": "/app", "secure": true,
                "http_only": false, "same_site": "None", "fallback": "p2c-ewma"}"#,
        )
        .unwrap();
        assert_eq!(config.cookie, "srv");
        assert_eq!(config.fallback, Algorithm::P2cEwma);
        assert_eq!(
            config.attributes(),
            "; Path=/app; Max-Age=600; Secure; SameSite=None"
        );
    }

    #[test]
    fn ttl_forms() {
        let ttl = |json: &str| parse(&format!("{{\"ttl\": {json}}}")).map(|c| c.ttl_secs);
        assert_eq!(ttl("90"), Ok(90));
        assert_eq!(ttl("\"90\""), Ok(90));
        assert_eq!(ttl("\"30s\""), Ok(30));
        assert_eq!(ttl("\"1h\""), Ok(3600));
        assert_eq!(ttl("\"2d\""), Ok(172_800));
        assert_eq!(ttl("\"2000ms\""), Ok(2));
        assert_eq!(ttl("0"), Ok(0));
        assert_eq!(ttl("\"0\""), Ok(0));
        for bad in [
            "\"250ms\"",
            "\"1.5h\"",
            "\"h\"",
            "\"10 years\"",
            "-1",
            "1.5",
            "true",
        ] {
            let err = ttl(bad).unwrap_err();
            assert!(err.starts_with("\"ttl\""), "{bad}: {err}");
        }
        let session = parse(r#"{"ttl": 0}"#).unwrap();
        assert_eq!(session.attributes(), "; Path=/; HttpOnly");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (r#"{"cookie": ""}"#, "\"cookie\""),
            (r#"{"cookie": "a b"}"#, "\"cookie\""),
            (r#"{"cookie": 1}"#, "\"cookie\": expected a string"),
            (r#"{"path": "app"}"#, "\"path\""),
            (r#"{"path": "/a;b"}"#, "\"path\""),
            (r#"{"secure": "yes"}"#, "\"secure\": expected true or false"),
            (
                r#"{"http_only": 1}"#,
                "\"http_only\": expected true or false",
            ),
            (r#"{"same_site": "lax"}"#, "\"same_site\""),
            (
                r#"{"same_site": "None"}"#,
                "\"same_site\": \"None\" needs \"secure\"",
            ),
            (r#"{"fallback": "fastest"}"#, "\"fallback\": \"fastest\""),
            (r#"{"ttl_secs": 5}"#, "\"ttl_secs\": unknown key"),
        ];
        for (json, expected) in cases {
            let err = parse(json).unwrap_err();
            assert!(err.contains(expected), "{json}: {err}");
        }
        assert!(parse("[]").is_err());
        assert!(parse("{").is_err());
    }

    #[test]
    fn affinity_map() {
        let addresses = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.1:80"];
        let map = AffinityMap::new(addresses.iter().map(|a| Some(a.to_string())).chain([None]));
        assert_eq!(map.position(hash64(b"10.0.0.1:80")), Some(0));
        assert_eq!(map.position(hash64(b"10.0.0.2:80")), Some(1));
        assert_eq!(map.position(hash64(b"10.0.0.3:80")), None);
        let pinned = parse_affinity(&affinity_value("10.0.0.2:80")).unwrap();
        assert_eq!(map.position(pinned), Some(1));
    }

    #[test]
    fn affinity_values_round_trip() {
        let value = affinity_value("127.0.0.1:9101");
        assert_eq!(value.len(), 16);
        assert!(
            value
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert!(!value.contains("127"));
        assert_eq!(parse_affinity(&value), Some(hash64(b"127.0.0.1:9101")));
        assert_ne!(value, affinity_value("127.0.0.1:9102"));
        assert_eq!(parse_affinity("xyz"), None);
        assert_eq!(parse_affinity("zzzzzzzzzzzzzzzz"), None);
        assert_eq!(parse_affinity("0123456789abcdef0"), None);
    }
}
