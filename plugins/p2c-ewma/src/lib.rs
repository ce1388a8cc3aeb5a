//! `builtin:p2c-ewma`: power of two choices over peak-EWMA latency, as
//! Finagle's and linkerd's balancers.
//!
//! Each pick draws two distinct candidates at random and takes the cheaper
//! by `latency_ewma_us × (in_flight + 1) / weight`; a candidate with no
//! latency data costs 0, so new endpoints are probed. Two `get` calls per
//! pick, whatever the number of candidates
//! ([`p2c_ewma`](sluice_sdk::balance::p2c_ewma)).

use sluice_sdk::balance::{Algorithm, Balancer};
use sluice_sdk::{Candidates, Policy, Request, Upstream};

/// The p2c-ewma balancer (it has no configuration).
pub struct P2cEwma(Balancer);

impl Policy for P2cEwma {
    fn init(config: &str) -> Result<Self, String> {
        check_config(config)?;
        Ok(P2cEwma(Balancer::new(Algorithm::P2cEwma)))
    }

    fn pick(&self, _req: &Request, upstream: &Upstream, candidates: &Candidates) -> Option<u32> {
        self.0.pick(upstream, candidates)
    }
}

/// Accepts only an empty JSON object: the balancer has no settings.
fn check_config(config: &str) -> Result<(), String> {
    sluice_sdk::balance::no_config(config, "p2c-ewma")
}

sluice_sdk::export_balancer!(P2cEwma);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_empty_object() {
        assert!(check_config("{}").is_ok());
        assert!(check_config(" { } ").is_ok());
        let err = check_config(r#"{"mode": "fast"}"#).unwrap_err();
        assert!(err.contains("\"mode\""), "{err}");
        assert!(check_config("[]").is_err());
        assert!(check_config("nope").is_err());
    }

    #[test]
    fn init_runs_p2cewma() {
        let Ok(policy) = P2cEwma::init("{}") else {
            panic!("init failed");
        };
        assert_eq!(policy.0.algorithm(), Algorithm::P2cEwma);
    }
}
