//! The plugin's settings: parsed from the manifest's `config` JSON once per
//! instance, every key checked, every error naming its key.

use serde_json::Value;

/// `Strict-Transport-Security`, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hsts {
    /// The header's value: `max-age=N[; includeSubDomains][; preload]`.
    pub value: String,
    /// Send it only on responses to requests that came over https (RFC 6797 §7.2).
    pub https_only: bool,
}

/// The validated settings; see the README for what each one means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `Strict-Transport-Security`, unless turned off.
    pub hsts: Option<Hsts>,
    /// The other headers to send, `(lowercase name, value)`, in table order.
    pub headers: Vec<(&'static str, String)>,
    /// Whether our value replaces one the upstream already sent.
    pub replace: bool,
    /// Response headers to remove (lowercase names).
    pub strip: Vec<String>,
}

/// What a header's value may be.
#[derive(Debug, Clone, Copy)]
enum Check {
    /// One of these tokens, compared case-insensitively, written as listed.
    OneOf(&'static [&'static str]),
    /// A comma-separated list of these tokens (browsers use the last they know).
    ListOf(&'static [&'static str]),
    /// Any header value: a policy the user writes.
    Text,
}

/// A header the plugin can send, other than HSTS.
#[derive(Debug)]
struct Spec {
    /// The config key.
    key: &'static str,
    /// The header name, lowercase.
    header: &'static str,
    /// Sent when the key is absent; `None`: not sent unless configured.
    default: Option<&'static str>,
    /// What `true` means; `None`: `true` is an error (the value must be written).
    recommended: Option<&'static str>,
    check: Check,
}

const REFERRER_POLICIES: &[&str] = &[
    "no-referrer",
    "no-referrer-when-downgrade",
    "origin",
    "origin-when-cross-origin",
    "same-origin",
    "strict-origin",
    "strict-origin-when-cross-origin",
    "unsafe-url",
];

/// Every header but HSTS, in the order they are sent.
const SPECS: &[Spec] = &[
    Spec {
        key: "x_frame_options",
        header: "x-frame-options",
        default: Some("DENY"),
        recommended: Some("DENY"),
        check: Check::OneOf(&["DENY", "SAMEORIGIN"]),
    },
    Spec {
        key: "x_content_type_options",
        header: "x-content-type-options",
        default: Some("nosniff"),
        recommended: Some("nosniff"),
        check: Check::OneOf(&["nosniff"]),
    },
    Spec {
        key: "referrer_policy",
        header: "referrer-policy",
        default: Some("strict-origin-when-cross-origin"),
        recommended: Some("strict-origin-when-cross-origin"),
        check: Check::ListOf(REFERRER_POLICIES),
    },
    Spec {
        key: "content_security_policy",
        header: "content-security-policy",
        default: None,
        recommended: None,
        check: Check::Text,
    },
    Spec {
        key: "content_security_policy_report_only",
        header: "content-security-policy-report-only",
        default: None,
        recommended: None,
        check: Check::Text,
    },
    Spec {
        key: "permissions_policy",
        header: "permissions-policy",
        default: None,
        recommended: None,
        check: Check::Text,
    },
    Spec {
        key: "cross_origin_opener_policy",
        header: "cross-origin-opener-policy",
        default: None,
        recommended: Some("same-origin"),
        check: Check::OneOf(&[
            "same-origin",
            "same-origin-allow-popups",
            "noopener-allow-popups",
            "unsafe-none",
        ]),
    },
    Spec {
        key: "cross_origin_embedder_policy",
        header: "cross-origin-embedder-policy",
        default: None,
        recommended: Some("require-corp"),
        check: Check::OneOf(&["require-corp", "credentialless", "unsafe-none"]),
    },
    Spec {
        key: "cross_origin_resource_policy",
        header: "cross-origin-resource-policy",
        default: None,
        recommended: Some("same-origin"),
        check: Check::OneOf(&["same-origin", "same-site", "cross-origin"]),
    },
];

/// HSTS defaults: one year, subdomains included, not preloaded.
const DEFAULT_MAX_AGE_SECS: u64 = 365 * 24 * 3600;
/// hstspreload.org refuses a shorter max-age.
const PRELOAD_MIN_MAX_AGE_SECS: u64 = 365 * 24 * 3600;

/// The response headers stripped by default: they advertise the software.
pub const DEFAULT_STRIP: [&str; 2] = ["server", "x-powered-by"];

impl Config {
    /// Parses and checks the plugin's config JSON.
    pub fn parse(json: &str) -> Result<Config, String> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| format!("config is not valid JSON: {e}"))?;
        let Some(object) = value.as_object() else {
            return Err("config must be a JSON object".to_string());
        };
        for key in object.keys() {
            let known = matches!(key.as_str(), "hsts" | "override" | "strip")
                || SPECS.iter().any(|spec| spec.key == key);
            if !known {
                return Err(format!("{key}: unknown key (expected {})", known_keys()));
            }
        }
        let hsts = match object.get("hsts") {
            None => Some(parse_hsts(&Value::Bool(true))?),
            Some(value) => match value {
                Value::Bool(false) => None,
                _ => Some(parse_hsts(value)?),
            },
        };
        let mut headers = Vec::new();
        for spec in SPECS {
            let value = match object.get(spec.key) {
                None => spec.default.map(str::to_string),
                Some(value) => parse_header(spec, value)?,
            };
            if let Some(value) = value {
                headers.push((spec.header, value));
            }
        }
        let replace = match object.get("override") {
            None => false,
            Some(Value::Bool(replace)) => *replace,
            Some(_) => return Err("override: expected true or false".to_string()),
        };
        let strip = match object.get("strip") {
            None => DEFAULT_STRIP.iter().map(|name| name.to_string()).collect(),
            Some(value) => parse_strip(value)?,
        };
        Ok(Config {
            hsts,
            headers,
            replace,
            strip,
        })
    }
}

fn known_keys() -> String {
    let mut keys: Vec<String> = ["hsts"]
        .into_iter()
        .chain(SPECS.iter().map(|spec| spec.key))
        .chain(["override", "strip"])
        .map(|key| format!("`{key}`"))
        .collect();
    let last = keys.pop().unwrap_or_default();
    format!("{} or {last}", keys.join(", "))
}

/// `true`, or `{ max_age, include_subdomains, preload, https_only }`.
fn parse_hsts(value: &Value) -> Result<Hsts, String> {
    let mut max_age = DEFAULT_MAX_AGE_SECS;
    let mut include_subdomains = true;
    let mut preload = false;
    let mut https_only = true;
    match value {
        Value::Bool(true) => {}
        Value::Object(table) => {
            for (key, value) in table {
                let at = format!("hsts.{key}");
                match key.as_str() {
                    "max_age" => max_age = parse_max_age(value, &at)?,
                    "include_subdomains" => include_subdomains = boolean(value, &at)?,
                    "preload" => preload = boolean(value, &at)?,
                    "https_only" => https_only = boolean(value, &at)?,
                    _ => {
                        return Err(format!(
                            "{at}: unknown key (expected `max_age`, `include_subdomains`, `preload` or `https_only`)"
                        ));
                    }
                }
            }
        }
        _ => {
            return Err(
                "hsts: expected false, true or a table such as { max_age = \"365d\" }".to_string(),
            );
        }
    }
    if preload && (!include_subdomains || max_age < PRELOAD_MIN_MAX_AGE_SECS) {
        return Err(format!(
            "hsts.preload: the preload list needs include_subdomains = true and a max_age of at least 365d ({PRELOAD_MIN_MAX_AGE_SECS} seconds)"
        ));
    }
    let mut value = format!("max-age={max_age}");
    if include_subdomains {
        value.push_str("; includeSubDomains");
    }
    if preload {
        value.push_str("; preload");
    }
    Ok(Hsts { value, https_only })
}

/// Seconds, as a number or a string with a unit: `"31536000s"`, `"30m"`,
/// `"12h"`, `"365d"`.
fn parse_max_age(value: &Value, at: &str) -> Result<u64, String> {
    let expected = || {
        format!(
            "{at}: expected seconds (a whole number) or a duration such as \"365d\", \"12h\", \"30m\" or \"600s\""
        )
    };
    match value {
        Value::Number(n) => n.as_u64().ok_or_else(expected),
        Value::String(text) => {
            let text = text.trim();
            let split = text
                .find(|c: char| !c.is_ascii_digit())
                .ok_or_else(expected)?;
            let (number, unit) = text.split_at(split);
            let number: u64 = number.parse().map_err(|_| expected())?;
            let scale = match unit.trim() {
                "s" => 1,
                "m" => 60,
                "h" => 3600,
                "d" => 86_400,
                _ => return Err(expected()),
            };
            number.checked_mul(scale).ok_or_else(expected)
        }
        _ => Err(expected()),
    }
}

/// A header's config value: a string, `true` (the recommended value) or
/// `false` / `""` (not sent).
fn parse_header(spec: &Spec, value: &Value) -> Result<Option<String>, String> {
    let key = spec.key;
    let text = match value {
        Value::Bool(false) => return Ok(None),
        Value::Bool(true) => {
            return match spec.recommended {
                Some(value) => Ok(Some(value.to_string())),
                None => Err(format!("{key}: give the policy as a string (or false)")),
            };
        }
        Value::String(text) => text.trim(),
        _ => return Err(format!("{key}: expected a string, true or false")),
    };
    if text.is_empty() {
        return Ok(None);
    }
    let normalised =
        match spec.check {
            Check::OneOf(tokens) => token(text, tokens)
                .ok_or_else(|| format!("{key}: {text:?} is not {}", alternatives(tokens)))?
                .to_string(),
            Check::ListOf(tokens) => {
                let mut list = Vec::new();
                for part in text.split(',') {
                    let part = part.trim();
                    list.push(token(part, tokens).ok_or_else(|| {
                        format!("{key}: {part:?} is not {}", alternatives(tokens))
                    })?);
                }
                list.join(", ")
            }
            Check::Text => {
                check_value(text, key)?;
                text.to_string()
            }
        };
    Ok(Some(normalised))
}

/// `text`, as written in `tokens`, when it is one of them (ignoring case).
fn token(text: &str, tokens: &[&'static str]) -> Option<&'static str> {
    tokens
        .iter()
        .find(|token| token.eq_ignore_ascii_case(text))
        .copied()
}

/// `"a", "b" or "c"`.
fn alternatives(tokens: &[&str]) -> String {
    let quoted: Vec<String> = tokens.iter().map(|t| format!("{t:?}")).collect();
    match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

fn parse_strip(value: &Value) -> Result<Vec<String>, String> {
    let Value::Array(list) = value else {
        return Err("strip: expected a list of header names".to_string());
    };
    let mut names = Vec::with_capacity(list.len());
    for (i, name) in list.iter().enumerate() {
        let at = format!("strip[{i}]");
        let Value::String(name) = name else {
            return Err(format!("{at}: expected a header name (a string)"));
        };
        check_name(name, &at)?;
        names.push(name.to_ascii_lowercase());
    }
    Ok(names)
}

fn boolean(value: &Value, at: &str) -> Result<bool, String> {
    value
        .as_bool()
        .ok_or_else(|| format!("{at}: expected true or false"))
}

/// A header name is an RFC 9110 token.
fn check_name(name: &str, at: &str) -> Result<(), String> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(format!("{at}: invalid header name {name:?}"));
    }
    Ok(())
}

/// A header value has no control characters other than tab.
fn check_value(value: &str, at: &str) -> Result<(), String> {
    if value
        .chars()
        .any(|c| (c.is_control() && c != '\t') || c == '\u{7f}')
    {
        return Err(format!("{at}: invalid header value (control character)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        Config::parse(json).unwrap_err()
    }

    fn headers(config: &Config) -> Vec<(&str, &str)> {
        config
            .headers
            .iter()
            .map(|(n, v)| (*n, v.as_str()))
            .collect()
    }

    #[test]
    fn defaults() {
        let config = Config::parse("{}").unwrap();
        assert_eq!(
            config.hsts,
            Some(Hsts {
                value: "max-age=31536000; includeSubDomains".into(),
                https_only: true
            })
        );
        assert_eq!(
            headers(&config),
            [
                ("x-frame-options", "DENY"),
                ("x-content-type-options", "nosniff"),
                ("referrer-policy", "strict-origin-when-cross-origin"),
            ]
        );
        assert!(!config.replace);
        assert_eq!(config.strip, ["server", "x-powered-by"]);
    }

    #[test]
    fn everything_configured() {
        let config = Config::parse(
            r#"{"hsts": {"max_age": "730d", "preload": true, "https_only": false},
                "x_frame_options": "sameorigin", "x_content_type_options": true,
                "referrer_policy": "no-referrer, Strict-Origin",
                "content_security_policy": "default-src 'self'",
                "content_security_policy_report_only": "default-src 'none'; report-uri /csp",
                "permissions_policy": "geolocation=(), camera=()",
                "cross_origin_opener_policy": true,
                "cross_origin_embedder_policy": "credentialless",
                "cross_origin_resource_policy": "same-site",
                "override": true, "strip": ["Server", "X-AspNet-Version"]}"#,
        )
        .unwrap();
        assert_eq!(
            config.hsts,
            Some(Hsts {
                value: "max-age=63072000; includeSubDomains; preload".into(),
                https_only: false
            })
        );
        assert_eq!(
            headers(&config),
            [
                ("x-frame-options", "SAMEORIGIN"),
                ("x-content-type-options", "nosniff"),
                ("referrer-policy", "no-referrer, strict-origin"),
                ("content-security-policy", "default-src 'self'"),
                (
                    "content-security-policy-report-only",
                    "default-src 'none'; report-uri /csp"
                ),
                ("permissions-policy", "geolocation=(), camera=()"),
                ("cross-origin-opener-policy", "same-origin"),
                ("cross-origin-embedder-policy", "credentialless"),
                ("cross-origin-resource-policy", "same-site"),
            ]
        );
        assert!(config.replace);
        assert_eq!(config.strip, ["server", "x-aspnet-version"]);
    }

    #[test]
    fn false_or_empty_turns_a_default_off() {
        let config = Config::parse(
            r#"{"hsts": false, "x_frame_options": false, "referrer_policy": "", "strip": []}"#,
        )
        .unwrap();
        assert_eq!(config.hsts, None);
        assert_eq!(headers(&config), [("x-content-type-options", "nosniff")]);
        assert!(config.strip.is_empty());
    }

    #[test]
    fn max_age_units() {
        let age = |v: &str| parse_max_age(&serde_json::from_str(v).unwrap(), "hsts.max_age");
        assert_eq!(age("0"), Ok(0));
        assert_eq!(age("600"), Ok(600));
        assert_eq!(age(r#""600s""#), Ok(600));
        assert_eq!(age(r#""30m""#), Ok(1800));
        assert_eq!(age(r#""12h""#), Ok(43_200));
        assert_eq!(age(r#""365d""#), Ok(31_536_000));
        for bad in [r#""365""#, r#""1y""#, r#""d""#, "-1", "1.5", "true"] {
            assert!(
                age(bad).unwrap_err().starts_with("hsts.max_age: expected"),
                "{bad}"
            );
        }
        assert!(age(r#""99999999999999999999d""#).is_err());
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err(r#"{"x_frame_option": "DENY"}"#).starts_with("x_frame_option: unknown key"));
        assert_eq!(
            err(r#"{"x_frame_options": "ALLOW-FROM https://a.example"}"#),
            r#"x_frame_options: "ALLOW-FROM https://a.example" is not "DENY" or "SAMEORIGIN""#
        );
        assert_eq!(
            err(r#"{"x_content_type_options": "sniff"}"#),
            r#"x_content_type_options: "sniff" is not "nosniff""#
        );
        assert!(
            err(r#"{"referrer_policy": "no-referrer, never"}"#)
                .starts_with(r#"referrer_policy: "never" is not "no-referrer", "#)
        );
        assert_eq!(
            err(r#"{"content_security_policy": true}"#),
            "content_security_policy: give the policy as a string (or false)"
        );
        assert_eq!(
            err(r#"{"permissions_policy": "a\nb"}"#),
            "permissions_policy: invalid header value (control character)"
        );
        assert_eq!(
            err(r#"{"referrer_policy": 3}"#),
            "referrer_policy: expected a string, true or false"
        );
        assert!(
            err(r#"{"hsts": {"preload": true, "include_subdomains": false}}"#)
                .starts_with("hsts.preload: the preload list needs")
        );
        assert!(
            err(r#"{"hsts": {"preload": true, "max_age": "30d"}}"#)
                .starts_with("hsts.preload: the preload list needs")
        );
        assert!(err(r#"{"hsts": {"maxage": 5}}"#).starts_with("hsts.maxage: unknown key"));
        assert!(err(r#"{"hsts": "on"}"#).starts_with("hsts: expected"));
        assert_eq!(
            err(r#"{"hsts": {"include_subdomains": "yes"}}"#),
            "hsts.include_subdomains: expected true or false"
        );
        assert_eq!(
            err(r#"{"override": "yes"}"#),
            "override: expected true or false"
        );
        assert_eq!(
            err(r#"{"strip": ["server", "bad name"]}"#),
            r#"strip[1]: invalid header name "bad name""#
        );
        assert_eq!(
            err(r#"{"strip": "server"}"#),
            "strip: expected a list of header names"
        );
        assert!(err("[").starts_with("config is not valid JSON"));
        assert_eq!(err("[]"), "config must be a JSON object");
    }
}
