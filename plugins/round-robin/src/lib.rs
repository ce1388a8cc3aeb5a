//! `builtin:round-robin`: a balancer that takes the candidates in turn.
//!
//! The turn is the host's rotation counter for the upstream
//! ([`Upstream::turn`](sluice_sdk::Upstream::turn)), so every instance and every gateway worker shares
//! one rotation.

use sluice_sdk::balance::Algorithm;

sluice_sdk::export_algorithm!(RoundRobin, Algorithm::RoundRobin);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::Policy as _;

    #[test]
    fn init_takes_only_an_empty_object() {
        assert!(RoundRobin::init(" { } ").is_ok());
        let Err(err) = RoundRobin::init(r#"{"mode": "fast"}"#) else {
            panic!("a key was accepted");
        };
        assert!(
            err.contains("\"mode\"") && err.contains("round-robin"),
            "{err}"
        );
        assert!(RoundRobin::init("[]").is_err());
        assert!(RoundRobin::init("nope").is_err());
    }

    #[test]
    fn init_runs_round_robin() {
        let Ok(policy) = RoundRobin::init("{}") else {
            panic!("init failed");
        };
        assert_eq!(policy.0.algorithm(), Algorithm::RoundRobin);
    }
}
