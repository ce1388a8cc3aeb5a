//! `builtin:round-robin`: a balancer that takes the candidates in turn.
//!
//! The turn is a host counter per upstream (`rr:<upstream>`), so every
//! instance and every gateway worker shares one rotation.

use sluice_sdk::{Candidate, Policy, Request, Upstream, state};

/// The round-robin balancer (it has no configuration).
pub struct RoundRobin;

impl Policy for RoundRobin {
    fn init(config: &str) -> Result<Self, String> {
        check_config(config)?;
        Ok(RoundRobin)
    }

    fn pick(&self, _req: &Request, upstream: &Upstream, candidates: &[Candidate]) -> Option<u32> {
        if candidates.is_empty() {
            return None;
        }
        let turn = state::counter_add(&format!("rr:{}", upstream.name()), 1, 0);
        Some(position(turn, candidates.len()))
    }
}

/// Accepts only an empty JSON object: the balancer has no settings.
fn check_config(config: &str) -> Result<(), String> {
    let value: serde_json::Value =
        serde_json::from_str(config).map_err(|e| format!("config is not valid JSON: {e}"))?;
    let Some(object) = value.as_object() else {
        return Err("config must be a JSON object".to_string());
    };
    match object.keys().next() {
        Some(key) => Err(format!(
            "{key:?}: unknown key (round-robin takes no configuration)"
        )),
        None => Ok(()),
    }
}

/// The candidate for the `turn`-th pick (the counter's value after the add,
/// so the first pick has turn 1 and takes position 0).
fn position(turn: i64, len: usize) -> u32 {
    // `rem_euclid` stays in 0..len even if the counter was ever negative.
    let len = i64::try_from(len).unwrap_or(i64::MAX);
    u32::try_from((turn - 1).rem_euclid(len)).unwrap_or(0)
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
    fn rotates() {
        let picks: Vec<u32> = (1..=7).map(|turn| position(turn, 3)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(position(1, 1), 0);
        assert_eq!(position(-4, 3), 1);
    }
}
