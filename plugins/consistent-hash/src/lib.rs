//! `builtin:consistent-hash`: Maglev consistent hashing on a request key.
//!
//! ```json
//! {"key": "header:x-user-id"}
//! ```
//!
//! The key (`client-ip` by default, or a header, cookie, the path or a query
//! parameter) is hashed ([`hash64`]) and looked up in a Maglev table
//! ([`Maglev`]) built from the candidates' addresses and weights and cached
//! under the set's fingerprint. Requests with the same key reach the same
//! endpoint, and when an endpoint leaves or joins the set only about 1/N of
//! the keys move. A request without the key (no such header, cookie or
//! parameter) goes to a random candidate, weighted, as Envoy does.

use serde_json::Value;
use sluice_sdk::balance::{Algorithm, Balancer, FingerprintCache, Maglev, cookie, hash64};
use sluice_sdk::{Candidates, Policy, Request, Upstream};

/// What part of the request is hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HashKey {
    /// `client-ip`: the TCP peer's address.
    ClientIp,
    /// `header:NAME`: the first value of header `NAME`.
    Header(String),
    /// `cookie:NAME`: the value of cookie `NAME`.
    Cookie(String),
    /// `path`: the path, without the query.
    Path,
    /// `query:NAME`: the first value of query parameter `NAME`, undecoded.
    Query(String),
}

impl HashKey {
    /// Parses the `key` setting.
    fn parse(text: &str) -> Result<HashKey, String> {
        let expected =
            "expected \"client-ip\", \"path\", \"header:NAME\", \"cookie:NAME\" or \"query:NAME\"";
        match text {
            "client-ip" => return Ok(HashKey::ClientIp),
            "path" => return Ok(HashKey::Path),
            _ => {}
        }
        let Some((kind, name)) = text.split_once(':') else {
            return Err(format!("\"key\": {text:?} is not a key ({expected})"));
        };
        if name.is_empty() {
            return Err(format!("\"key\": {text:?} needs a name after ':'"));
        }
        match kind {
            "header" => {
                if !name.bytes().all(is_token_byte) {
                    return Err(format!("\"key\": {name:?} is not a valid header name"));
                }
                Ok(HashKey::Header(name.to_ascii_lowercase()))
            }
            "cookie" => {
                if !name.bytes().all(is_token_byte) {
                    return Err(format!("\"key\": {name:?} is not a valid cookie name"));
                }
                Ok(HashKey::Cookie(name.to_string()))
            }
            "query" => Ok(HashKey::Query(name.to_string())),
            _ => Err(format!("\"key\": {text:?} is not a key ({expected})")),
        }
    }

    /// The key's value in `req`, if the request has it.
    fn value(&self, req: &Request) -> Option<String> {
        match self {
            HashKey::ClientIp => Some(req.client_ip()),
            HashKey::Header(name) => req.header(name),
            HashKey::Cookie(name) => cookie(req, name),
            HashKey::Path => Some(req.path()),
            HashKey::Query(name) => query_param(&req.query()?, name).map(str::to_string),
        }
    }
}

/// Whether `byte` may appear in an HTTP token (header and cookie names).
fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// The value of the first `name=value` parameter in `query` (`&`-separated,
/// not percent-decoded; a bare `name` has the empty value).
fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

/// The settings: which key to hash.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Config {
    key: HashKey,
}

/// Parses and checks the whole config.
fn parse_config(config: &str) -> Result<Config, String> {
    let value: Value =
        serde_json::from_str(config).map_err(|e| format!("config is not valid JSON: {e}"))?;
    let Some(object) = value.as_object() else {
        return Err("config must be a JSON object".to_string());
    };
    let mut parsed = Config {
        key: HashKey::ClientIp,
    };
    for (name, value) in object {
        match name.as_str() {
            "key" => {
                let Some(text) = value.as_str() else {
                    return Err(format!("\"key\": expected a string, got {value}"));
                };
                parsed.key = HashKey::parse(text)?;
            }
            _ => return Err(format!("{name:?}: unknown key (expected \"key\")")),
        }
    }
    Ok(parsed)
}

/// The consistent-hash balancer.
pub struct ConsistentHash {
    key: HashKey,
    /// Maglev tables per candidate set.
    tables: FingerprintCache<Maglev>,
    /// For requests without the key.
    random: Balancer,
}

impl Policy for ConsistentHash {
    fn init(config: &str) -> Result<Self, String> {
        let config = parse_config(config)?;
        Ok(ConsistentHash {
            key: config.key,
            tables: FingerprintCache::new(),
            random: Balancer::new(Algorithm::Random),
        })
    }

    fn pick(&self, req: &Request, upstream: &Upstream, candidates: &Candidates) -> Option<u32> {
        let len = candidates.len();
        if len == 0 {
            return None;
        }
        let Some(key) = self.key.value(req) else {
            return self.random.pick(upstream, candidates);
        };
        let table = self.tables.get_or_build(candidates.fingerprint(), || {
            build_table(upstream, candidates)
        });
        let position = table.lookup(hash64(key.as_bytes())).filter(|&p| p < len);
        Some(position.unwrap_or(0))
    }
}

/// The Maglev table of `candidates`, from their addresses and weights.
fn build_table(upstream: &Upstream, candidates: &Candidates) -> Maglev {
    let weights = candidates.weights();
    let backends: Vec<(String, u32)> = candidates
        .ids()
        .into_iter()
        .zip(weights)
        .map(|(id, weight)| {
            // Every candidate has an address; the id keeps the table whole if not.
            let address = upstream.address(id).unwrap_or_else(|| format!("#{id}"));
            (address, weight)
        })
        .collect();
    Maglev::new(&backends)
}

sluice_sdk::export_balancer!(ConsistentHash);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_key_is_client_ip() {
        assert_eq!(parse_config("{}").unwrap().key, HashKey::ClientIp);
    }

    #[test]
    fn keys_parse() {
        let key = |text: &str| parse_config(&format!("{{\"key\": {text:?}}}")).map(|c| c.key);
        assert_eq!(key("client-ip"), Ok(HashKey::ClientIp));
        assert_eq!(key("path"), Ok(HashKey::Path));
        assert_eq!(key("header:X-User"), Ok(HashKey::Header("x-user".into())));
        assert_eq!(key("cookie:sid"), Ok(HashKey::Cookie("sid".into())));
        assert_eq!(key("query:user"), Ok(HashKey::Query("user".into())));
        for bad in [
            "ip",
            "header:",
            "header:bad name",
            "cookie:a;b",
            "body:x",
            "",
        ] {
            let err = key(bad).unwrap_err();
            assert!(err.starts_with("\"key\""), "{bad}: {err}");
        }
    }

    #[test]
    fn config_errors_name_the_key() {
        let err = parse_config(r#"{"key": 3}"#).unwrap_err();
        assert!(err.contains("\"key\": expected a string"), "{err}");
        let err = parse_config(r#"{"kee": "path"}"#).unwrap_err();
        assert!(err.contains("\"kee\": unknown key"), "{err}");
        assert!(parse_config("[]").is_err());
        assert!(parse_config("{").is_err());
    }

    #[test]
    fn query_params() {
        assert_eq!(query_param("a=1&user=bob&b", "user"), Some("bob"));
        assert_eq!(query_param("a=1&b", "b"), Some(""));
        assert_eq!(query_param("a=1&a=2", "a"), Some("1"));
        assert_eq!(query_param("user2=x", "user"), None);
        assert_eq!(query_param("", "user"), None);
    }
}
