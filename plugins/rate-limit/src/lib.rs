//! `builtin:rate-limit`: rate limits per client, API key, route or any mix
//! of them (world `rewrite-policy`).
//!
//! ```json
//! {"rate": "10r/s", "burst": 20, "nodelay": true, "key": "client-ip"}
//! {"requests": 100, "window": "10s", "key": "client-ip"}
//! ```
//!
//! - **A rate** (`rate`, `burst`, `nodelay`, `delay`) is nginx's
//!   `limit_req`: GCRA through the host's `state.throttle`, one atomic call
//!   per request. Without `nodelay`, excess requests within the burst are
//!   held (`request.delay`) so that they reach the upstream at the rate.
//! - **A window** (`requests`, `window`) is HAProxy's `http_req_rate`: a
//!   sliding window counter over `state.counter-add` (see [`window`]).
//! - **Tiers** (`tier_header`, `tiers`, `default_tier`) give each class of
//!   client its own limit and its own budgets.
//!
//! A refusal is `429` with `Retry-After` and the `RateLimit-Limit`,
//! `RateLimit-Remaining` and `RateLimit-Reset` headers of the IETF draft;
//! with `headers = "all"`, admitted requests' responses carry them too. The
//! README has every setting.

pub mod config;
pub mod key;
pub mod limit;
pub mod window;

use std::cell::RefCell;
use std::net::IpAddr;

use sluice_sdk::hooks::Hook;
use sluice_sdk::net::IpRanges;
use sluice_sdk::state::ThrottleResult;
use sluice_sdk::{Action, Policy, Reply, Request, Response};

use crate::config::{Config, QuotaHeaders};
use crate::key::Caller;
use crate::limit::{Decision, Host, Quota, Use};

/// The policy: its validated config, and the buffer each request's state
/// key is written into (an instance runs one call at a time).
pub struct RateLimit {
    config: Config,
    key: RefCell<String>,
}

impl RateLimit {
    /// Decides for `req` with the host's state.
    fn decide(&self, req: &Request, use_: Use) -> Decision {
        match self.key.try_borrow_mut() {
            Ok(mut key) => limit::decide(&Imports, &self.config, req, &mut key, use_),
            // Never in practice: a call does not re-enter its instance.
            Err(_) => limit::decide(&Imports, &self.config, req, &mut String::new(), use_),
        }
    }
}

impl Policy for RateLimit {
    fn init(config: &str) -> Result<Self, String> {
        let config = Config::parse(config)?;
        if config.quota_headers != QuotaHeaders::All {
            // Quota headers on admitted responses are all `on_response` adds.
            sluice_sdk::hooks::skip(Hook::OnResponse);
        }
        Ok(RateLimit {
            config,
            key: RefCell::new(String::with_capacity(96)),
        })
    }

    fn on_request(&self, req: &Request) -> Action {
        match self.decide(req, Use::Take) {
            Decision::Exempt => Action::Continue,
            Decision::Admit { delay_ms, .. } => {
                if delay_ms > 0 {
                    req.delay(delay_ms);
                }
                Action::Continue
            }
            Decision::Deny {
                quota,
                retry_after_ms,
            } => {
                sluice_sdk::metrics::counter_add("ratelimit_denied", 1);
                refusal(&self.config, Some((&quota, retry_after_ms))).into()
            }
            Decision::MissingKey => {
                sluice_sdk::metrics::counter_add("ratelimit_key_missing", 1);
                refusal(&self.config, None).into()
            }
        }
    }

    fn on_response(&self, req: &Request, resp: &Response) {
        if self.config.quota_headers != QuotaHeaders::All {
            return;
        }
        if let Decision::Admit { quota, .. } = self.decide(req, Use::Peek) {
            for (name, value) in quota_headers(&quota) {
                // The names and values are always valid HTTP.
                let _ = resp.set_header(name, &value);
            }
        }
    }
}

/// `n` milliseconds in whole seconds, rounded up.
fn seconds(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

/// The IETF draft's `RateLimit-Limit`, `RateLimit-Remaining` and
/// `RateLimit-Reset` (seconds, rounded up).
fn quota_headers(quota: &Quota) -> [(&'static str, String); 3] {
    [
        ("ratelimit-limit", quota.limit.to_string()),
        ("ratelimit-remaining", quota.remaining.to_string()),
        ("ratelimit-reset", seconds(quota.reset_ms).to_string()),
    ]
}

/// The answer to a refused request: the configured status, body and
/// content type; for a spent budget (`spent`: its quota and when to retry)
/// also `Retry-After` (whole seconds, at least 1) and, unless
/// `headers = "none"`, the `RateLimit-*` headers.
fn refusal(config: &Config, spent: Option<(&Quota, u64)>) -> Reply {
    let mut reply = Reply::new(config.status)
        .with_header("content-type", config.content_type.as_str())
        .with_body(config.body.as_str());
    if let Some((quota, retry_after_ms)) = spent {
        reply = reply.with_header("retry-after", seconds(retry_after_ms).max(1).to_string());
        if config.quota_headers != QuotaHeaders::None {
            for (name, value) in quota_headers(quota) {
                reply = reply.with_header(name, value);
            }
        }
    }
    reply
}

impl Caller for Request {
    fn header(&self, name: &str) -> Option<String> {
        Request::header(self, name)
    }

    fn client_address(&self, trusted: &IpRanges) -> Option<IpAddr> {
        sluice_sdk::net::client_address(self, trusted)
    }

    fn route(&self) -> String {
        Request::route(self)
    }

    fn host(&self) -> String {
        Request::host(self)
    }
}

/// The gateway's host imports.
struct Imports;

impl Host for Imports {
    fn throttle(&self, key: &str, interval_ns: u64, burst: u32, cost: u32) -> ThrottleResult {
        sluice_sdk::state::throttle(key, interval_ns, burst, cost)
    }

    fn counter_add(&self, key: &str, delta: i64, ttl_ms: u64) -> i64 {
        sluice_sdk::state::counter_add(key, delta, ttl_ms)
    }

    fn get(&self, key: &str) -> Option<String> {
        sluice_sdk::state::get(key)
    }

    fn now_ms(&self) -> u64 {
        sluice_sdk::clock::unix_ms()
    }
}

sluice_sdk::export_rewrite_policy!(RateLimit);

#[cfg(test)]
mod tests {
    use super::*;

    fn header<'a>(reply: &'a Reply, name: &str) -> Option<&'a str> {
        reply
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    const QUOTA: Quota = Quota {
        limit: 21,
        remaining: 0,
        reset_ms: 2_050,
    };

    #[test]
    fn a_refusal_carries_retry_after_and_the_quota() {
        let config = Config::parse(r#"{"rate": "10r/s", "burst": 20}"#).unwrap();
        let reply = refusal(&config, Some((&QUOTA, 100)));
        assert_eq!(reply.status, 429);
        assert_eq!(header(&reply, "retry-after"), Some("1"));
        assert_eq!(header(&reply, "ratelimit-limit"), Some("21"));
        assert_eq!(header(&reply, "ratelimit-remaining"), Some("0"));
        assert_eq!(header(&reply, "ratelimit-reset"), Some("3"));
        assert_eq!(
            header(&reply, "content-type"),
            Some("text/plain; charset=utf-8")
        );
        assert_eq!(reply.body, config::DEFAULT_BODY.as_bytes());
        let later = refusal(&config, Some((&QUOTA, 10_001)));
        assert_eq!(header(&later, "retry-after"), Some("11"), "rounded up");
        let now = refusal(&config, Some((&QUOTA, 0)));
        assert_eq!(header(&now, "retry-after"), Some("1"), "at least 1");
    }

    #[test]
    fn a_configured_refusal() {
        let config = Config::parse(
            r#"{"rate": 1, "status": 503, "body": "{\"error\": \"busy\"}",
                "content_type": "application/json", "headers": "none"}"#,
        )
        .unwrap();
        let reply = refusal(&config, Some((&QUOTA, 1_500)));
        assert_eq!(reply.status, 503);
        assert_eq!(header(&reply, "retry-after"), Some("2"));
        assert_eq!(header(&reply, "ratelimit-limit"), None);
        assert_eq!(header(&reply, "content-type"), Some("application/json"));
        assert_eq!(reply.body, br#"{"error": "busy"}"#);
    }

    #[test]
    fn a_missing_key_is_refused_without_retry_after() {
        let config = Config::parse(
            r#"{"rate": 1, "key": "header:x-api-key", "missing": "deny", "status": 401}"#,
        )
        .unwrap();
        let reply = refusal(&config, None);
        assert_eq!(reply.status, 401);
        assert_eq!(header(&reply, "retry-after"), None);
        assert_eq!(header(&reply, "ratelimit-remaining"), None);
    }

    #[test]
    fn quota_headers_in_seconds() {
        let quota = Quota {
            limit: 100,
            remaining: 42,
            reset_ms: 0,
        };
        assert_eq!(
            quota_headers(&quota),
            [
                ("ratelimit-limit", "100".to_string()),
                ("ratelimit-remaining", "42".to_string()),
                ("ratelimit-reset", "0".to_string()),
            ]
        );
    }

    #[test]
    fn init_validates() {
        assert!(RateLimit::init(r#"{"rate": "10r/s", "burst": 20, "nodelay": true}"#).is_ok());
        let error = RateLimit::init(r#"{"rate": "10r/s", "brust": 20}"#)
            .err()
            .unwrap();
        assert!(error.starts_with("brust: unknown key"), "{error}");
    }
}
