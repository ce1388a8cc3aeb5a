//! `builtin:least-request`: the candidate with the fewest requests in
//! flight per unit of weight, as nginx's `least_conn`.
//!
//! Each pick reads the host's live in-flight counts (one list) and the
//! weights (cached under the set's fingerprint); ties are broken at random,
//! so idle endpoints share the load
//! ([`least_request`](sluice_sdk::balance::least_request)).

use sluice_sdk::balance::Algorithm;

sluice_sdk::export_algorithm!(LeastRequest, Algorithm::LeastRequest);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::Policy as _;

    #[test]
    fn init_takes_only_an_empty_object() {
        assert!(LeastRequest::init(" { } ").is_ok());
        let Err(err) = LeastRequest::init(r#"{"mode": "fast"}"#) else {
            panic!("a key was accepted");
        };
        assert!(
            err.contains("\"mode\"") && err.contains("least-request"),
            "{err}"
        );
        assert!(LeastRequest::init("[]").is_err());
        assert!(LeastRequest::init("nope").is_err());
    }

    #[test]
    fn init_runs_least_request() {
        let Ok(policy) = LeastRequest::init("{}") else {
            panic!("init failed");
        };
        assert_eq!(policy.0.algorithm(), Algorithm::LeastRequest);
    }
}
