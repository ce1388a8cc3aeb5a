//! `builtin:least-request`: the candidate with the fewest requests in
//! flight per unit of weight, as nginx's `least_conn`.
//!
//! Each pick reads the host's live in-flight counts (one list) and the
//! weights (cached under the set's fingerprint); ties are broken at random,
//! so idle endpoints share the load
//! ([`least_request`](sluice_sdk::balance::least_request)).

use sluice_sdk::balance::{Algorithm, Balancer};
use sluice_sdk::{Candidates, Policy, Request, Upstream};

/// The least-request balancer (it has no configuration).
pub struct LeastRequest(Balancer);

impl Policy for LeastRequest {
    fn init(config: &str) -> Result<Self, String> {
        check_config(config)?;
        Ok(LeastRequest(Balancer::new(Algorithm::LeastRequest)))
    }

    fn pick(&self, _req: &Request, upstream: &Upstream, candidates: &Candidates) -> Option<u32> {
        self.0.pick(upstream, candidates)
    }
}

/// Accepts only an empty JSON object: the balancer has no settings.
fn check_config(config: &str) -> Result<(), String> {
    sluice_sdk::balance::no_config(config, "least-request")
}

sluice_sdk::export_balancer!(LeastRequest);

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
    fn init_runs_leastrequest() {
        let Ok(policy) = LeastRequest::init("{}") else {
            panic!("init failed");
        };
        assert_eq!(policy.0.algorithm(), Algorithm::LeastRequest);
    }
}
