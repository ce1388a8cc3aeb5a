//! `builtin:weighted`: smooth weighted round-robin, as nginx's default
//! balancer.
//!
//! The rotation for a candidate set is computed once and cached under the
//! set's fingerprint ([`WeightedRotation`](sluice_sdk::balance::WeightedRotation));
//! each pick indexes it with the host's rotation counter for the upstream
//! ([`Upstream::turn`]), so every instance and worker shares one rotation.

use sluice_sdk::balance::{Algorithm, Balancer};
use sluice_sdk::{Candidates, Policy, Request, Upstream};

/// The weighted balancer (it has no configuration).
pub struct Weighted(Balancer);

impl Policy for Weighted {
    fn init(config: &str) -> Result<Self, String> {
        check_config(config)?;
        Ok(Weighted(Balancer::new(Algorithm::Weighted)))
    }

    fn pick(&self, _req: &Request, upstream: &Upstream, candidates: &Candidates) -> Option<u32> {
        self.0.pick(upstream, candidates)
    }
}

/// Accepts only an empty JSON object: the balancer has no settings.
fn check_config(config: &str) -> Result<(), String> {
    sluice_sdk::balance::no_config(config, "weighted")
}

sluice_sdk::export_balancer!(Weighted);

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
    fn init_runs_weighted() {
        let Ok(policy) = Weighted::init("{}") else {
            panic!("init failed");
        };
        assert_eq!(policy.0.algorithm(), Algorithm::Weighted);
    }
}
