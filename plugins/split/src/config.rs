//! The plugin's settings: parsed from the manifest's `config` JSON once per
//! instance, every key checked, every error naming its key.

use serde_json::{Map, Value};
use sluice_sdk::net::IpRanges;

/// The upstreams traffic is split between, in their fixed order, and where
/// each one's share of `[0, 2^64)` ends.
///
/// A request's point (a hash of its sticky key, or a random number) goes to
/// the first upstream whose range holds it. The ranges follow the order, so
/// moving weight from one upstream to its neighbour moves only the points
/// between the old and the new boundary: users move one way, never back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weights {
    /// Upstream names, in order.
    names: Vec<String>,
    /// The configured weights, by position.
    weights: Vec<u32>,
    /// `ends[i]` = (sum of weights `0..=i`) × 2^64 / total: upstream `i`
    /// takes the points in `ends[i - 1] .. ends[i]`. The last end is 2^64.
    ends: Vec<u128>,
}

impl Weights {
    /// The table for `(name, weight)` pairs in order; `None` when the list is
    /// empty or every weight is 0.
    pub fn new(sides: Vec<(String, u32)>) -> Option<Weights> {
        let total: u128 = sides.iter().map(|(_, w)| u128::from(*w)).sum();
        if total == 0 {
            return None;
        }
        let mut sum = 0u128;
        let mut ends = Vec::with_capacity(sides.len());
        for (_, weight) in &sides {
            sum += u128::from(*weight);
            ends.push((sum << 64) / total);
        }
        let (names, weights) = sides.into_iter().unzip();
        Some(Weights {
            names,
            weights,
            ends,
        })
    }

    /// The upstream whose range holds `point`.
    pub fn pick(&self, point: u64) -> &str {
        let point = u128::from(point);
        // The last end is 2^64, above every point, so the search always lands.
        let position = self.ends.partition_point(|&end| end <= point);
        self.names
            .get(position)
            .or(self.names.last())
            .map_or("", String::as_str)
    }

    /// The upstream names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The configured weights, in order.
    pub fn weights(&self) -> &[u32] {
        &self.weights
    }
}

/// Where the sticky key of a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sticky {
    /// The first value of this request header (lowercase name).
    Header(String),
    /// The value of this cookie.
    Cookie(String),
    /// The client's address (behind `trusted_proxies`, from `X-Forwarded-For`).
    ClientIp,
}

/// What an override looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// The first value of this request header (lowercase name).
    Header(String),
    /// The value of this cookie.
    Cookie(String),
}

/// A request that matches goes to `upstream`, whatever the weights say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    /// The header or cookie to look at.
    pub field: Field,
    /// The value it must have; `None`: present with any value.
    pub value: Option<String>,
    /// Where a matching request goes.
    pub upstream: String,
}

/// The validated settings; see the README for what each one means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The weighted upstreams, in order.
    pub weights: Weights,
    /// Where a request's sticky key comes from; `None`: a random pick per request.
    pub sticky: Option<Sticky>,
    /// Mixed into the hash of the sticky key, so that two splits on the same
    /// key assign users independently.
    pub salt: String,
    /// Proxies whose `X-Forwarded-For` names the client (`sticky = "client-ip"`).
    pub trusted_proxies: IpRanges,
    /// Checked in order before the weights; the first match wins.
    pub overrides: Vec<Override>,
}

/// The settings [`Config::parse`] knows.
const KEYS: &str = "`upstreams`, `sticky`, `salt`, `trusted_proxies` or `overrides`";

impl Config {
    /// Parses and checks the plugin's config JSON.
    pub fn parse(json: &str) -> Result<Config, String> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| format!("config is not valid JSON: {e}"))?;
        let Some(object) = value.as_object() else {
            return Err("config must be a JSON object".to_string());
        };
        let mut weights = None;
        let mut sticky = None;
        let mut salt = String::new();
        let mut trusted_proxies = None;
        let mut overrides = Vec::new();
        for (key, value) in object {
            match key.as_str() {
                "upstreams" => weights = Some(parse_upstreams(value)?),
                "sticky" => sticky = Some(parse_sticky(value)?),
                "salt" => salt = string("salt", value)?.to_string(),
                "trusted_proxies" => {
                    trusted_proxies = Some(parse_ranges("trusted_proxies", value)?)
                }
                "overrides" => overrides = parse_overrides(value)?,
                _ => return Err(format!("{key}: unknown key (expected {KEYS})")),
            }
        }
        let weights = weights.ok_or_else(|| {
            "upstreams: required (as { stable = 95, canary = 5 } or [{ upstream = \"stable\", weight = 95 }, ...])"
                .to_string()
        })?;
        if trusted_proxies.is_some() && sticky != Some(Sticky::ClientIp) {
            return Err("trusted_proxies: only used with sticky = \"client-ip\"".to_string());
        }
        Ok(Config {
            weights,
            sticky,
            salt,
            trusted_proxies: trusted_proxies.unwrap_or_default(),
            overrides,
        })
    }
}

/// `{ "stable": 95, "canary": 5 }` (ordered by name) or
/// `[{ "upstream": "stable", "weight": 95 }, ...]` (in list order).
fn parse_upstreams(value: &Value) -> Result<Weights, String> {
    let mut sides: Vec<(String, u32)> = Vec::new();
    match value {
        Value::Object(map) => {
            for (name, weight) in map {
                let at = format!("upstreams.{name}");
                check_upstream_name(name, &at)?;
                sides.push((name.clone(), parse_weight(weight, &at)?));
            }
            // By name, whatever order the JSON object kept: the order decides
            // which users move when weights change, so it must never drift.
            sides.sort();
        }
        Value::Array(list) => {
            for (i, entry) in list.iter().enumerate() {
                let at = format!("upstreams[{i}]");
                let entry = object(entry, &at)?;
                let mut name = None;
                let mut weight = None;
                for (key, value) in entry {
                    let at = format!("{at}.{key}");
                    match key.as_str() {
                        "upstream" => {
                            let value = string(&at, value)?;
                            check_upstream_name(value, &at)?;
                            name = Some(value.to_string());
                        }
                        "weight" => weight = Some(parse_weight(value, &at)?),
                        _ => {
                            return Err(format!(
                                "{at}: unknown key (expected `upstream` and `weight`)"
                            ));
                        }
                    }
                }
                let name = name.ok_or_else(|| format!("{at}.upstream: required"))?;
                let weight = weight.ok_or_else(|| format!("{at}.weight: required"))?;
                if sides.iter().any(|(n, _)| *n == name) {
                    return Err(format!("{at}.upstream: \"{name}\" is listed twice"));
                }
                sides.push((name, weight));
            }
        }
        _ => {
            return Err(
                "upstreams: expected a table of weights ({ stable = 95, canary = 5 }) or a list ([{ upstream = \"stable\", weight = 95 }, ...])"
                    .to_string(),
            );
        }
    }
    if sides.is_empty() {
        return Err("upstreams: name at least one upstream".to_string());
    }
    Weights::new(sides).ok_or_else(|| "upstreams: the weights are all 0".to_string())
}

fn parse_weight(value: &Value, at: &str) -> Result<u32, String> {
    value
        .as_u64()
        .and_then(|w| u32::try_from(w).ok())
        .ok_or_else(|| {
            format!(
                "{at}: expected a weight, a whole number from 0 to {}",
                u32::MAX
            )
        })
}

/// Upstream names follow the manifest's rule for names.
fn check_upstream_name(name: &str, at: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{at}: invalid upstream name \"{name}\": use letters, digits, '-' and '_'"
        ))
    }
}

/// `"header:NAME"`, `"cookie:NAME"` or `"client-ip"`.
fn parse_sticky(value: &Value) -> Result<Sticky, String> {
    let text = string("sticky", value)?.trim();
    if text == "client-ip" {
        return Ok(Sticky::ClientIp);
    }
    let expected =
        || format!("sticky: {text:?} is not \"header:NAME\", \"cookie:NAME\" or \"client-ip\"");
    let (kind, name) = text.split_once(':').ok_or_else(expected)?;
    let name = name.trim();
    match kind.trim() {
        "header" => {
            check_token(name, "sticky", "header")?;
            Ok(Sticky::Header(name.to_ascii_lowercase()))
        }
        "cookie" => {
            check_token(name, "sticky", "cookie")?;
            Ok(Sticky::Cookie(name.to_string()))
        }
        _ => Err(expected()),
    }
}

/// A list of addresses and CIDR ranges; an error names the bad entry by
/// its position.
fn parse_ranges(key: &str, value: &Value) -> Result<IpRanges, String> {
    let Value::Array(list) = value else {
        return Err(format!(
            "{key}: expected a list of addresses or CIDR ranges"
        ));
    };
    let mut entries = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let at = format!("{key}[{i}]");
        let entry = string(&at, entry)?;
        IpRanges::parse([entry]).map_err(|e| format!("{at}: {e}"))?;
        entries.push(entry);
    }
    IpRanges::parse(entries).map_err(|e| format!("{key}: {e}"))
}

fn parse_overrides(value: &Value) -> Result<Vec<Override>, String> {
    let Value::Array(list) = value else {
        return Err(
            "overrides: expected a list such as [{ header = \"x-canary\", value = \"1\", upstream = \"canary\" }]"
                .to_string(),
        );
    };
    let mut overrides = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let at = format!("overrides[{i}]");
        let mut field = None;
        let mut value = None;
        let mut upstream = None;
        for (key, v) in object(entry, &at)? {
            let at = format!("{at}.{key}");
            match key.as_str() {
                "header" | "cookie" => {
                    if field.is_some() {
                        return Err(format!(
                            "overrides[{i}]: give either `header` or `cookie`, not both"
                        ));
                    }
                    let name = string(&at, v)?;
                    field = Some(if key == "header" {
                        check_token(name, &at, "header")?;
                        Field::Header(name.to_ascii_lowercase())
                    } else {
                        check_token(name, &at, "cookie")?;
                        Field::Cookie(name.to_string())
                    });
                }
                "value" => value = Some(string(&at, v)?.to_string()),
                "upstream" => {
                    let name = string(&at, v)?;
                    check_upstream_name(name, &at)?;
                    upstream = Some(name.to_string());
                }
                _ => {
                    return Err(format!(
                        "{at}: unknown key (expected `header` or `cookie`, `value` and `upstream`)"
                    ));
                }
            }
        }
        let field = field.ok_or_else(|| format!("{at}: give `header` or `cookie`"))?;
        let upstream = upstream.ok_or_else(|| format!("{at}.upstream: required"))?;
        overrides.push(Override {
            field,
            value,
            upstream,
        });
    }
    Ok(overrides)
}

fn object<'a>(value: &'a Value, at: &str) -> Result<&'a Map<String, Value>, String> {
    value
        .as_object()
        .ok_or_else(|| format!("{at}: expected a table"))
}

fn string<'a>(at: &str, value: &'a Value) -> Result<&'a str, String> {
    value
        .as_str()
        .ok_or_else(|| format!("{at}: expected a string"))
}

/// Header and cookie names are RFC 9110 tokens (RFC 6265 asks the same of
/// cookie names); `what` says which it is.
fn check_token(name: &str, at: &str, what: &str) -> Result<(), String> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(format!("{at}: invalid {what} name {name:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        Config::parse(json).unwrap_err()
    }

    #[test]
    fn a_table_of_weights_is_ordered_by_name() {
        let config = Config::parse(r#"{"upstreams": {"stable": 95, "canary": 5}}"#).unwrap();
        assert_eq!(config.weights.names(), ["canary", "stable"]);
        assert_eq!(config.weights.weights(), [5, 95]);
        assert_eq!(config.sticky, None);
        assert!(config.overrides.is_empty());
    }

    #[test]
    fn a_list_of_weights_keeps_its_order() {
        let config = Config::parse(
            r#"{"upstreams": [{"upstream": "stable", "weight": 95}, {"weight": 5, "upstream": "canary"}]}"#,
        )
        .unwrap();
        assert_eq!(config.weights.names(), ["stable", "canary"]);
        assert_eq!(config.weights.weights(), [95, 5]);
    }

    #[test]
    fn full_config() {
        let config = Config::parse(
            r#"{"upstreams": {"a": 1, "b": 3}, "sticky": "client-ip", "salt": "exp-7",
                "trusted_proxies": ["10.0.0.0/8", "::1"],
                "overrides": [{"header": "X-Canary", "value": "1", "upstream": "b"},
                              {"cookie": "beta", "upstream": "a"}]}"#,
        )
        .unwrap();
        assert_eq!(config.sticky, Some(Sticky::ClientIp));
        assert_eq!(config.salt, "exp-7");
        assert!(config.trusted_proxies.contains("10.1.2.3".parse().unwrap()));
        assert_eq!(
            config.overrides,
            [
                Override {
                    field: Field::Header("x-canary".into()),
                    value: Some("1".into()),
                    upstream: "b".into()
                },
                Override {
                    field: Field::Cookie("beta".into()),
                    value: None,
                    upstream: "a".into()
                },
            ]
        );
        let header =
            Config::parse(r#"{"upstreams": {"a": 1}, "sticky": "header:X-User-Id"}"#).unwrap();
        assert_eq!(header.sticky, Some(Sticky::Header("x-user-id".into())));
        let cookie = Config::parse(r#"{"upstreams": {"a": 1}, "sticky": "cookie:user"}"#).unwrap();
        assert_eq!(cookie.sticky, Some(Sticky::Cookie("user".into())));
    }

    #[test]
    fn errors_name_the_key() {
        assert_eq!(
            err(r#"{"upstreams": {}}"#),
            "upstreams: name at least one upstream"
        );
        assert_eq!(
            err(r#"{"upstreams": {"a": 0, "b": 0}}"#),
            "upstreams: the weights are all 0"
        );
        assert!(err(r#"{}"#).starts_with("upstreams: required"));
        assert!(err(r#"{"upstreams": {"a": -1}}"#).starts_with("upstreams.a: expected a weight"));
        assert!(err(r#"{"upstreams": {"a": 2.5}}"#).starts_with("upstreams.a: expected a weight"));
        assert!(
            err(r#"{"upstreams": {"a b": 1}}"#).starts_with("upstreams.a b: invalid upstream name")
        );
        assert_eq!(
            err(
                r#"{"upstreams": [{"upstream": "a", "weight": 1}, {"upstream": "a", "weight": 2}]}"#
            ),
            "upstreams[1].upstream: \"a\" is listed twice"
        );
        assert_eq!(
            err(r#"{"upstreams": [{"upstream": "a"}]}"#),
            "upstreams[0].weight: required"
        );
        assert!(
            err(r#"{"upstreams": [{"upstream": "a", "weight": 1, "w": 2}]}"#)
                .starts_with("upstreams[0].w: unknown key")
        );
        assert!(err(r#"{"upstreams": 5}"#).starts_with("upstreams: expected a table"));
        assert!(
            err(r#"{"upstreams": {"a": 1}, "sticky": "session"}"#)
                .starts_with("sticky: \"session\" is not")
        );
        assert_eq!(
            err(r#"{"upstreams": {"a": 1}, "sticky": "header:bad name"}"#),
            "sticky: invalid header name \"bad name\""
        );
        assert_eq!(
            err(r#"{"upstreams": {"a": 1}, "trusted_proxies": ["10.0.0.0/8"]}"#),
            "trusted_proxies: only used with sticky = \"client-ip\""
        );
        let bad_cidr = err(
            r#"{"upstreams": {"a": 1}, "sticky": "client-ip", "trusted_proxies": ["10.0.0.0/33"]}"#,
        );
        assert!(
            bad_cidr.starts_with("trusted_proxies[0]: ") && bad_cidr.contains("10.0.0.0/33"),
            "{bad_cidr}"
        );
        assert_eq!(
            err(
                r#"{"upstreams": {"a": 1}, "overrides": [{"header": "x", "cookie": "y", "upstream": "a"}]}"#
            ),
            "overrides[0]: give either `header` or `cookie`, not both"
        );
        assert_eq!(
            err(r#"{"upstreams": {"a": 1}, "overrides": [{"value": "1", "upstream": "a"}]}"#),
            "overrides[0]: give `header` or `cookie`"
        );
        assert_eq!(
            err(r#"{"upstreams": {"a": 1}, "overrides": [{"header": "x"}]}"#),
            "overrides[0].upstream: required"
        );
        assert!(
            err(r#"{"upstreams": {"a": 1}, "overrides": [{"header": "x", "upstream": "a", "when": 1}]}"#)
                .starts_with("overrides[0].when: unknown key")
        );
        assert!(
            err(r#"{"upstreams": {"a": 1}, "weights": {}}"#).starts_with("weights: unknown key")
        );
        assert!(err("[").starts_with("config is not valid JSON"));
        assert_eq!(err("[]"), "config must be a JSON object");
    }

    #[test]
    fn weights_cut_the_points_in_order() {
        let weights =
            Weights::new(vec![("a".into(), 1), ("b".into(), 0), ("c".into(), 3)]).unwrap();
        assert_eq!(weights.pick(0), "a");
        assert_eq!(weights.pick(u64::MAX / 4 - 1), "a");
        assert_eq!(weights.pick(u64::MAX / 4 + 1), "c");
        assert_eq!(weights.pick(u64::MAX), "c");
        assert_eq!(Weights::new(vec![("a".into(), 0)]), None);
        assert_eq!(Weights::new(Vec::new()), None);
        let one = Weights::new(vec![("only".into(), u32::MAX)]).unwrap();
        assert_eq!(one.pick(u64::MAX), "only");
        // Blue-green: every point goes to the side with all the weight.
        let green = Weights::new(vec![("blue".into(), 0), ("green".into(), 100)]).unwrap();
        assert_eq!(green.pick(0), "green");
        assert_eq!(green.pick(u64::MAX), "green");
        let blue = Weights::new(vec![("blue".into(), 100), ("green".into(), 0)]).unwrap();
        assert_eq!(blue.pick(0), "blue");
        assert_eq!(blue.pick(u64::MAX), "blue");
    }
}
