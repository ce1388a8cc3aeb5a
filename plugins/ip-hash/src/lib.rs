//! `builtin:ip-hash`: sends each client IP to the same endpoint, as nginx's
//! `ip_hash` (but over the whole address, IPv6 included).
//!
//! The client's address is hashed ([`hash64`]) onto the candidates'
//! cumulative weights ([`WeightedIndex`], cached under the set's
//! fingerprint), so a client keeps its endpoint while the candidate set
//! stays the same. When the set changes (an endpoint fails its health
//! checks, one is added), most clients move: use `consistent-hash` for
//! minimal disruption.

use sluice_sdk::balance::{FingerprintCache, WeightedIndex, hash64};
use sluice_sdk::{Candidates, Policy, Request, Upstream};

/// The ip-hash balancer (it has no configuration).
pub struct IpHash {
    /// Cumulative weights per candidate set.
    indexes: FingerprintCache<WeightedIndex>,
}

impl Policy for IpHash {
    fn init(config: &str) -> Result<Self, String> {
        check_config(config)?;
        Ok(IpHash {
            indexes: FingerprintCache::new(),
        })
    }

    fn pick(&self, req: &Request, _upstream: &Upstream, candidates: &Candidates) -> Option<u32> {
        let len = candidates.len();
        if len == 0 {
            return None;
        }
        let index = self.indexes.get_or_build(candidates.fingerprint(), || {
            WeightedIndex::new(&candidates.weights())
        });
        let position = slot(&index, &req.client_ip()).filter(|&p| p < len);
        Some(position.unwrap_or(0))
    }
}

/// The position for `client_ip` in `index`: a weighted share of the hash space.
fn slot(index: &WeightedIndex, client_ip: &str) -> Option<u32> {
    index.index_for(hash64(client_ip.as_bytes()))
}

/// Accepts only an empty JSON object: the balancer has no settings.
fn check_config(config: &str) -> Result<(), String> {
    sluice_sdk::balance::no_config(config, "ip-hash")
}

sluice_sdk::export_balancer!(IpHash);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_empty_object() {
        assert!(check_config("{}").is_ok());
        let err = check_config(r#"{"key": "client-ip"}"#).unwrap_err();
        assert!(err.contains("\"key\""), "{err}");
        assert!(check_config("[]").is_err());
        assert!(check_config("nope").is_err());
    }

    #[test]
    fn same_ip_same_endpoint_and_weighted_spread() {
        let index = WeightedIndex::new(&[1, 2, 1]);
        assert_eq!(slot(&index, "203.0.113.7"), slot(&index, "203.0.113.7"));
        assert_eq!(slot(&index, "2001:db8::1"), slot(&index, "2001:db8::1"));
        let mut counts = [0u32; 3];
        for a in 0..40u32 {
            for b in 0..250u32 {
                let ip = format!("10.{a}.{b}.1");
                counts[slot(&index, &ip).unwrap() as usize] += 1;
            }
        }
        assert!((2_200..2_800).contains(&counts[0]), "{counts:?}");
        assert!((4_500..5_500).contains(&counts[1]), "{counts:?}");
        assert!((2_200..2_800).contains(&counts[2]), "{counts:?}");
    }
}
