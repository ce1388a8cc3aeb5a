//! `builtin:round-robin`: a balancer that takes the candidates in turn.
//!
//! The turn is the host's rotation counter for the upstream
//! ([`Upstream::turn`]), so every instance and every gateway worker shares
//! one rotation.

use sluice_sdk::balance::{Algorithm, Balancer};
use sluice_sdk::{Candidates, Policy, Request, Upstream};

/// The round-robin balancer (it has no configuration).
pub struct RoundRobin(Balancer);

impl Policy for RoundRobin {
    fn init(config: &str) -> Result<Self, String> {
        check_config(config)?;
        Ok(RoundRobin(Balancer::new(Algorithm::RoundRobin)))
    }

    fn pick(&self, _req: &Request, upstream: &Upstream, candidates: &Candidates) -> Option<u32> {
        self.0.pick(upstream, candidates)
    }
}

/// Accepts only an empty JSON object: the balancer has no settings.
fn check_config(config: &str) -> Result<(), String> {
    sluice_sdk::balance::no_config(config, "round-robin")
}

sluice_sdk::export_balancer!(RoundRobin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_empty_object() {
        assert!(check_config("{}").is_ok());
        assert!(check_config(" { } ").is_ok());
        let err = check_config(r#"{"weights": true}"#).unwrap_err();
        assert!(err.contains("\"weights\""), "{err}");
        assert!(check_config("[]").is_err());
        assert!(check_config("nope").is_err());
    }

    #[test]
    fn init_runs_round_robin() {
        let Ok(policy) = RoundRobin::init("{}") else {
            panic!("init failed");
        };
        assert_eq!(policy.0.algorithm(), Algorithm::RoundRobin);
    }
}
