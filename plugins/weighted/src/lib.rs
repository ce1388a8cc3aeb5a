//! `builtin:weighted`: smooth weighted round-robin, as nginx's default
//! balancer.
//!
//! The rotation for a candidate set is computed once and cached under the
//! set's fingerprint ([`WeightedRotation`](sluice_sdk::balance::WeightedRotation));
//! each pick indexes it with the host's rotation counter for the upstream
//! ([`Upstream::turn`](sluice_sdk::Upstream::turn)), so every instance and worker shares one rotation.

use sluice_sdk::balance::Algorithm;

sluice_sdk::export_algorithm!(Weighted, Algorithm::Weighted);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::Policy as _;

    #[test]
    fn init_takes_only_an_empty_object() {
        assert!(Weighted::init(" { } ").is_ok());
        let Err(err) = Weighted::init(r#"{"mode": "fast"}"#) else {
            panic!("a key was accepted");
        };
        assert!(
            err.contains("\"mode\"") && err.contains("weighted"),
            "{err}"
        );
        assert!(Weighted::init("[]").is_err());
        assert!(Weighted::init("nope").is_err());
    }

    #[test]
    fn init_runs_weighted() {
        let Ok(policy) = Weighted::init("{}") else {
            panic!("init failed");
        };
        assert_eq!(policy.0.algorithm(), Algorithm::Weighted);
    }
}
