//! `builtin:random`: picks a candidate at random, in proportion to its
//! weight (uniformly when the weights are equal).
//!
//! The cumulative weights are cached under the set's fingerprint; a pick
//! is one random number and a binary search
//! ([`WeightedIndex`](sluice_sdk::balance::WeightedIndex)).

use sluice_sdk::balance::Algorithm;

sluice_sdk::export_algorithm!(Random, Algorithm::Random);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::Policy as _;

    #[test]
    fn init_takes_only_an_empty_object() {
        assert!(Random::init(" { } ").is_ok());
        let Err(err) = Random::init(r#"{"mode": "fast"}"#) else {
            panic!("a key was accepted");
        };
        assert!(err.contains("\"mode\"") && err.contains("random"), "{err}");
        assert!(Random::init("[]").is_err());
        assert!(Random::init("nope").is_err());
    }

    #[test]
    fn init_runs_random() {
        let Ok(policy) = Random::init("{}") else {
            panic!("init failed");
        };
        assert_eq!(policy.0.algorithm(), Algorithm::Random);
    }
}
