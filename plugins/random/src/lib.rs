//! `builtin:random`: picks a candidate at random, in proportion to its
//! weight (uniformly when the weights are equal).
//!
//! The cumulative weights are cached under the set's fingerprint; a pick
//! is one random number and a binary search
//! ([`WeightedIndex`](sluice_sdk::balance::WeightedIndex)).

use sluice_sdk::balance::{Algorithm, Balancer};
use sluice_sdk::{Candidates, Policy, Request, Upstream};

/// The random balancer (it has no configuration).
pub struct Random(Balancer);

impl Policy for Random {
    fn init(config: &str) -> Result<Self, String> {
        check_config(config)?;
        Ok(Random(Balancer::new(Algorithm::Random)))
    }

    fn pick(&self, _req: &Request, upstream: &Upstream, candidates: &Candidates) -> Option<u32> {
        self.0.pick(upstream, candidates)
    }
}

/// Accepts only an empty JSON object: the balancer has no settings.
fn check_config(config: &str) -> Result<(), String> {
    sluice_sdk::balance::no_config(config, "random")
}

sluice_sdk::export_balancer!(Random);

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
    fn init_runs_random() {
        let Ok(policy) = Random::init("{}") else {
            panic!("init failed");
        };
        assert_eq!(policy.0.algorithm(), Algorithm::Random);
    }
}
