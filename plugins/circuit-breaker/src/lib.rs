//! `builtin:circuit-breaker`: a circuit breaker per upstream, or outlier
//! ejection per endpoint (world `guard`).
//!
//! ```json
//! {"failure_rate": 50, "slow_call_duration": "1s", "window": 100,
//!  "wait_duration": "60s", "permitted_half_open": 10}
//! ```
//!
//! - **closed**: every outcome is counted in a sliding window (the last N
//!   calls, or the last `window_duration`); the breaker opens when the
//!   failure or slow-call rate reaches its threshold (once the window holds
//!   `minimum_calls`), or after `consecutive_failures` failures in a row.
//! - **open**: upstream scope answers 503 with `Retry-After` (or steers to
//!   another upstream) for `wait_duration`; endpoint scope ejects the
//!   endpoint instead (Envoy's outlier detection), longer each time in a row.
//! - **half-open**: `permitted_half_open` trial calls decide whether to
//!   close or open again.
//!
//! Instances are pooled, so every bit of state lives in the host's store
//! and transitions are compare-and-swaps: see [`breaker`] and [`circuit`].
//! The README has every setting.

pub mod breaker;
pub mod circuit;
pub mod config;
pub mod window;

use sluice_sdk::balance::hash64;
use sluice_sdk::health::Circuit;
use sluice_sdk::{Action, Outcome, Policy, Reply, Request};

use crate::breaker::{Admission, Breaker, Host};
use crate::circuit::Phase;
use crate::config::{Config, Scope, WhenOpen};
use crate::window::Sample;

/// The policy: its validated config and the key prefix that keeps one
/// config's state apart from another's (after a reload that changes it).
pub struct CircuitBreaker {
    config: Config,
    prefix: String,
}

impl Policy for CircuitBreaker {
    fn init(config: &str) -> Result<Self, String> {
        let config = Config::parse(config)?;
        let prefix = format!("{:016x}", hash64(format!("{config:?}").as_bytes()));
        Ok(CircuitBreaker { config, prefix })
    }

    fn on_request(&self, req: &Request) -> Action {
        if self.config.scope == Scope::Endpoint {
            // Fail over: the host keeps ejected endpoints out of the candidates.
            return Action::Continue;
        }
        let upstream = req.upstream();
        let breaker = Breaker::upstream(&Imports, &self.config, &self.prefix, &upstream);
        match breaker.admit() {
            Admission::Admit => Action::Continue,
            Admission::Reject { retry_after_secs } => match &self.config.when_open {
                WhenOpen::Reject => {
                    sluice_sdk::metrics::counter_add("breaker_rejected", 1);
                    refusal(&upstream, retry_after_secs).into()
                }
                WhenOpen::Steer(fallback) => {
                    sluice_sdk::metrics::counter_add("breaker_steered", 1);
                    Action::steer(fallback.as_str())
                }
            },
        }
    }

    fn on_outcome(&self, outcome: &Outcome) {
        let sample = Sample::classify(
            outcome.status,
            outcome.error.is_some(),
            outcome.latency_us,
            &self.config,
        );
        match self.config.scope {
            Scope::Upstream => {
                Breaker::upstream(&Imports, &self.config, &self.prefix, &outcome.upstream)
                    .record(sample);
            }
            Scope::Endpoint => {
                let (Some(id), Some(address)) = (outcome.endpoint_id, outcome.endpoint.as_deref())
                else {
                    // No endpoint was picked: nothing to judge.
                    return;
                };
                Breaker::endpoint(
                    &Imports,
                    &self.config,
                    &self.prefix,
                    &outcome.upstream,
                    id,
                    address,
                )
                .record(sample);
            }
        }
    }
}

/// The 503 an open breaker answers with.
fn refusal(upstream: &str, retry_after_secs: u64) -> Reply {
    Reply::new(503)
        .with_header("content-type", "text/plain; charset=utf-8")
        .with_header("retry-after", retry_after_secs.to_string())
        .with_body(format!(
            "circuit breaker open: upstream {upstream} is failing; retry in {retry_after_secs}s\n"
        ))
}

/// The gateway's host imports.
struct Imports;

impl Host for Imports {
    fn now_ms(&self) -> u64 {
        sluice_sdk::clock::unix_ms()
    }

    fn counter_add(&self, key: &str, delta: i64, ttl_ms: u64) -> i64 {
        sluice_sdk::state::counter_add(key, delta, ttl_ms)
    }

    fn get(&self, key: &str) -> Option<String> {
        sluice_sdk::state::get(key)
    }

    fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&str>,
        value: &str,
        ttl_ms: u64,
    ) -> Result<(), Option<String>> {
        sluice_sdk::state::compare_and_swap(key, expected, value, ttl_ms)
    }

    fn remove(&self, key: &str) {
        sluice_sdk::state::remove(key);
    }

    fn eject(&self, endpoint: u32, duration_ms: u64, max_percent: u32) -> bool {
        sluice_sdk::health::eject(endpoint, duration_ms, max_percent)
    }

    fn report(&self, endpoint: Option<u32>, phase: Phase) {
        let circuit = match phase {
            Phase::Closed => Circuit::Closed,
            Phase::Open => Circuit::Open,
            Phase::HalfOpen => Circuit::HalfOpen,
        };
        sluice_sdk::health::report(endpoint, circuit);
    }

    fn count(&self, metric: &str) {
        sluice_sdk::metrics::counter_add(metric, 1);
    }

    fn info(&self, message: &str) {
        sluice_sdk::log::info(message);
    }
}

sluice_sdk::export_guard!(CircuitBreaker);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_validates_and_separates_configs() {
        let a = CircuitBreaker::init(r#"{"consecutive_failures": 5}"#).unwrap();
        let b = CircuitBreaker::init(r#"{"consecutive_failures": 6}"#).unwrap();
        let a2 = CircuitBreaker::init(r#"{ "consecutive_failures" : 5 }"#).unwrap();
        assert_ne!(a.prefix, b.prefix);
        assert_eq!(a.prefix, a2.prefix);
        assert!(CircuitBreaker::init(r#"{"nope": 1}"#).is_err());
    }

    #[test]
    fn the_refusal() {
        let reply = refusal("app", 7);
        assert_eq!(reply.status, 503);
        assert!(
            reply
                .headers
                .contains(&("retry-after".to_string(), "7".to_string()))
        );
        assert!(
            reply
                .headers
                .iter()
                .any(|(n, v)| n == "content-type" && v.starts_with("text/plain"))
        );
        assert!(String::from_utf8_lossy(&reply.body).contains("upstream app"));
    }
}
