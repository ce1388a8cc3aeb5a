//! Whose budget a request draws from: the state key, written into a buffer
//! the policy reuses, so a request costs no allocation beyond the fields it
//! reads.
//!
//! A key is `<limit>|<tier length>:<tier>` followed by one field per key
//! part, each tagged so that different parts never read alike:
//!
//! ```text
//! |i<address>          client-ip (an IPv6 address cut to ipv6_prefix), or a missing header's fallback
//! |r<length>:<route>   route
//! |n<hash>             host
//! |h<hash>             header:NAME
//! |g                   a missing header, missing = "group"
//! ```
//!
//! Header values (and the host) are stored as a 64-bit hash: an API key
//! never sits in the state store, and a long value costs no more than a
//! short one. `<limit>` is `r` for a rate and `w<ms>` for a window, so a
//! reload that changes a rate keeps each budget and one that changes a
//! window's length starts afresh.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv6Addr};

use sluice_sdk::balance::hash64;
use sluice_sdk::net::IpRanges;

use crate::config::{Config, KeyPart, Limit, Missing, Tier};

/// What a key is made from: the request's fields (the real request in the
/// gateway, a fake in tests).
pub trait Caller {
    /// The first value of header `name`.
    fn header(&self, name: &str) -> Option<String>;
    /// The client's address, behind `trusted` proxies (see
    /// [`sluice_sdk::net::client_address`]).
    fn client_address(&self, trusted: &IpRanges) -> Option<IpAddr>;
    /// The name of the route that matched.
    fn route(&self) -> String;
    /// The host the client asked for.
    fn host(&self) -> String;
}

/// Whether a request has a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyed {
    /// The key is in the buffer.
    Ready,
    /// A keyed header is missing and `missing = "skip"`: no limit applies.
    Skip,
    /// A keyed header is missing and `missing = "deny"`.
    Deny,
}

/// Writes the key of `caller`'s budget in `tier` into `key` (cleared first).
pub fn write_key<C: Caller>(key: &mut String, config: &Config, tier: &Tier, caller: &C) -> Keyed {
    key.clear();
    match tier.limit {
        Limit::Window(window) => {
            let _ = write!(key, "w{}", window.window_ms);
        }
        Limit::Rate(_) | Limit::Unlimited => key.push('r'),
    }
    let _ = write!(key, "|{}:{}", tier.name.len(), tier.name);
    for part in &config.key {
        match part {
            KeyPart::ClientIp => write_client(key, config, caller),
            KeyPart::Route => {
                let route = caller.route();
                let _ = write!(key, "|r{}:{route}", route.len());
            }
            KeyPart::Host => {
                let _ = write!(key, "|n{:016x}", hash64(caller.host().as_bytes()));
            }
            KeyPart::Header(name) => match caller.header(name) {
                Some(value) if !value.trim().is_empty() => {
                    let _ = write!(key, "|h{:016x}", hash64(value.trim().as_bytes()));
                }
                _ => match config.missing {
                    Missing::ClientIp => write_client(key, config, caller),
                    Missing::Group => key.push_str("|g"),
                    Missing::Skip => return Keyed::Skip,
                    Missing::Deny => return Keyed::Deny,
                },
            },
        }
    }
    Keyed::Ready
}

/// `|i<address>`: the client's address, an IPv6 one cut to its prefix.
fn write_client<C: Caller>(key: &mut String, config: &Config, caller: &C) {
    key.push_str("|i");
    match caller.client_address(&config.trusted_proxies) {
        Some(IpAddr::V4(ip)) => {
            let _ = write!(key, "{ip}");
        }
        Some(IpAddr::V6(ip)) => {
            let _ = write!(key, "{}", ipv6_network(ip, config.ipv6_prefix));
        }
        // The peer's address is unreadable: such requests share a budget.
        None => {}
    }
}

/// `ip` with every bit after the first `prefix` cleared.
fn ipv6_network(ip: Ipv6Addr, prefix: u8) -> Ipv6Addr {
    let mask = u128::MAX
        .checked_shl(128 - u32::from(prefix.min(128)))
        .unwrap_or(0);
    Ipv6Addr::from(u128::from(ip) & mask)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A request with the given fields; `client_address` ignores the
    /// trusted proxies (the SDK's `client_address` has its own tests).
    #[derive(Debug, Clone)]
    pub(crate) struct FakeCaller {
        pub(crate) headers: HashMap<String, String>,
        pub(crate) ip: Option<IpAddr>,
        pub(crate) route: String,
        pub(crate) host: String,
    }

    impl FakeCaller {
        pub(crate) fn from(ip: &str) -> FakeCaller {
            FakeCaller {
                headers: HashMap::new(),
                ip: ip.parse().ok(),
                route: "api".to_string(),
                host: "api.example.com".to_string(),
            }
        }

        pub(crate) fn with(mut self, name: &str, value: &str) -> FakeCaller {
            self.headers.insert(name.to_string(), value.to_string());
            self
        }
    }

    impl Caller for FakeCaller {
        fn header(&self, name: &str) -> Option<String> {
            self.headers.get(name).cloned()
        }

        fn client_address(&self, _trusted: &IpRanges) -> Option<IpAddr> {
            self.ip
        }

        fn route(&self) -> String {
            self.route.clone()
        }

        fn host(&self) -> String {
            self.host.clone()
        }
    }

    fn key_of(json: &str, caller: &FakeCaller) -> (Keyed, String) {
        let config = Config::parse(json).unwrap();
        let tier = config.tier(None);
        let mut key = String::new();
        let keyed = write_key(&mut key, &config, tier, caller);
        (keyed, key)
    }

    #[test]
    fn client_ip_keys() {
        let (keyed, key) = key_of(r#"{"rate": 1}"#, &FakeCaller::from("203.0.113.7"));
        assert_eq!(keyed, Keyed::Ready);
        assert_eq!(key, "r|0:|i203.0.113.7");
        let (_, other) = key_of(r#"{"rate": 1}"#, &FakeCaller::from("203.0.113.8"));
        assert_ne!(key, other);
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_prefix() {
        let a = key_of(r#"{"rate": 1}"#, &FakeCaller::from("2001:db8:1:2:aaaa::1")).1;
        let b = key_of(r#"{"rate": 1}"#, &FakeCaller::from("2001:db8:1:2:bbbb::2")).1;
        let c = key_of(r#"{"rate": 1}"#, &FakeCaller::from("2001:db8:1:3::1")).1;
        assert_eq!(a, "r|0:|i2001:db8:1:2::");
        assert_eq!(a, b, "one /64");
        assert_ne!(a, c);
        let full = r#"{"rate": 1, "ipv6_prefix": 128}"#;
        let a = key_of(full, &FakeCaller::from("2001:db8:1:2:aaaa::1")).1;
        let b = key_of(full, &FakeCaller::from("2001:db8:1:2:bbbb::2")).1;
        assert_ne!(a, b);
        assert_eq!(
            ipv6_network("::1".parse().unwrap(), 0),
            Ipv6Addr::UNSPECIFIED
        );
    }

    #[test]
    fn combined_parts() {
        let json = r#"{"rate": 1, "key": ["client-ip", "header:x-api-key", "route", "host"]}"#;
        let caller = FakeCaller::from("10.0.0.1").with("x-api-key", "secret-1");
        let (keyed, key) = key_of(json, &caller);
        assert_eq!(keyed, Keyed::Ready);
        assert!(key.starts_with("r|0:|i10.0.0.1|h"), "{key}");
        assert!(key.contains("|r3:api|n"), "{key}");
        assert!(!key.contains("secret"), "header values are hashed: {key}");
        let (_, other_key) = key_of(json, &caller.clone().with("x-api-key", "secret-2"));
        assert_ne!(key, other_key);
        let mut elsewhere = caller.clone();
        elsewhere.route = "web".to_string();
        assert_ne!(key, key_of(json, &elsewhere).1);
    }

    #[test]
    fn tiers_and_limits_separate_keys() {
        let config = Config::parse(
            r#"{"default_tier": "free", "tiers": {"free": {"rate": 1}, "pro": {"rate": 2},
                "batch": {"requests": 5, "window": "2s"}}}"#,
        )
        .unwrap();
        let caller = FakeCaller::from("10.0.0.1");
        let mut keys = Vec::new();
        for name in ["free", "pro", "batch"] {
            let mut key = String::new();
            write_key(&mut key, &config, config.tier(Some(name)), &caller);
            keys.push(key);
        }
        assert_eq!(keys[0], "r|4:free|i10.0.0.1");
        assert_eq!(keys[1], "r|3:pro|i10.0.0.1");
        assert_eq!(keys[2], "w2000|5:batch|i10.0.0.1");
    }

    #[test]
    fn a_missing_header() {
        let caller = FakeCaller::from("10.0.0.1");
        let empty = caller.clone().with("x-api-key", "  ");
        let fallback = r#"{"rate": 1, "key": "header:x-api-key"}"#;
        assert_eq!(
            key_of(fallback, &caller),
            (Keyed::Ready, "r|0:|i10.0.0.1".to_string())
        );
        assert_eq!(
            key_of(fallback, &empty).1,
            "r|0:|i10.0.0.1",
            "empty is missing"
        );
        let group = r#"{"rate": 1, "key": "header:x-api-key", "missing": "group"}"#;
        assert_eq!(key_of(group, &caller), (Keyed::Ready, "r|0:|g".to_string()));
        let skip = r#"{"rate": 1, "key": "header:x-api-key", "missing": "skip"}"#;
        assert_eq!(key_of(skip, &caller).0, Keyed::Skip);
        let deny = r#"{"rate": 1, "key": ["client-ip", "header:x-api-key"], "missing": "deny"}"#;
        assert_eq!(key_of(deny, &caller).0, Keyed::Deny);
        let keyed = caller.with("x-api-key", "k");
        assert_eq!(key_of(deny, &keyed).0, Keyed::Ready);
    }

    #[test]
    fn a_global_budget() {
        let (keyed, key) = key_of(r#"{"rate": 1, "key": []}"#, &FakeCaller::from("10.0.0.1"));
        assert_eq!((keyed, key.as_str()), (Keyed::Ready, "r|0:"));
    }

    #[test]
    fn the_buffer_is_reused() {
        let config = Config::parse(r#"{"rate": 1, "key": ["client-ip", "route"]}"#).unwrap();
        let mut key = String::with_capacity(64);
        let capacity = key.capacity();
        for ip in ["10.0.0.1", "192.168.100.200", "10.0.0.2"] {
            write_key(&mut key, &config, config.tier(None), &FakeCaller::from(ip));
        }
        assert_eq!(key, "r|0:|i10.0.0.2|r3:api");
        assert_eq!(key.capacity(), capacity);
    }
}
