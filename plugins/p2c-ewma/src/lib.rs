//! `builtin:p2c-ewma`: power of two choices over peak-EWMA latency, as
//! Finagle's and linkerd's balancers.
//!
//! Each pick draws two distinct candidates at random and takes the cheaper
//! by `latency_ewma_us × (in_flight + 1) / weight`; a candidate with no
//! latency data costs 0, so new endpoints are probed. Two `get` calls per
//! pick, whatever the number of candidates
//! ([`p2c_ewma`](sluice_sdk::balance::p2c_ewma)).

use sluice_sdk::balance::Algorithm;

sluice_sdk::export_algorithm!(P2cEwma, Algorithm::P2cEwma);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::Policy as _;

    #[test]
    fn init_takes_only_an_empty_object() {
        assert!(P2cEwma::init(" { } ").is_ok());
        let Err(err) = P2cEwma::init(r#"{"mode": "fast"}"#) else {
            panic!("a key was accepted");
        };
        assert!(
            err.contains("\"mode\"") && err.contains("p2c-ewma"),
            "{err}"
        );
        assert!(P2cEwma::init("[]").is_err());
        assert!(P2cEwma::init("nope").is_err());
    }

    #[test]
    fn init_runs_p2c_ewma() {
        let Ok(policy) = P2cEwma::init("{}") else {
            panic!("init failed");
        };
        assert_eq!(policy.0.algorithm(), Algorithm::P2cEwma);
    }
}
