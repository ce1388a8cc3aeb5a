//! `builtin:split`: weighted traffic splitting between upstreams (world
//! `request-policy`): canary releases, blue-green switches and gradual
//! feature rollouts.
//!
//! ```json
//! {"upstreams": {"stable": 95, "canary": 5}, "sticky": "header:x-user-id",
//!  "overrides": [{"header": "x-canary", "value": "1", "upstream": "canary"}]}
//! ```
//!
//! Each request is steered to one of `upstreams`:
//!
//! 1. the first matching `override` (a header or cookie value) decides;
//! 2. otherwise the request gets a point in `[0, 2^64)` — the hash of its
//!    sticky key (with `sticky`), or a random number — and goes to the
//!    upstream whose share of that space, laid out by weight in a fixed
//!    order, holds the point.
//!
//! The same key always lands on the same point, so a user stays on one side
//! while the weights stay the same; raising one side's weight moves users
//! only towards it. The README has every setting.

pub mod config;

use std::cell::OnceCell;

use sluice_sdk::balance::{cookie_in, hash64};
use sluice_sdk::net::client_address;
use sluice_sdk::{Action, Policy, Request, metrics, random};

use crate::config::{Config, Field, Override, Sticky};

/// The policy: its validated config.
pub struct Split {
    config: Config,
}

impl Policy for Split {
    fn init(config: &str) -> Result<Self, String> {
        Ok(Split {
            config: Config::parse(config)?,
        })
    }

    fn on_request(&self, req: &Request) -> Action {
        let view = View::new(req);
        if let Some(upstream) = self.overridden(&view) {
            metrics::counter_add("split_overridden", 1);
            return Action::steer(upstream);
        }
        let point = match self.sticky_key(&view) {
            Some(key) => point(&self.config.salt, &key),
            None => {
                if self.config.sticky.is_some() {
                    metrics::counter_add("split_unkeyed", 1);
                }
                random::next_u64()
            }
        };
        Action::steer(self.config.weights.pick(point))
    }
}

sluice_sdk::export_request_policy!(Split);

impl Split {
    /// The upstream of the first override the request matches.
    fn overridden(&self, view: &View<'_>) -> Option<&str> {
        self.config
            .overrides
            .iter()
            .find(|o| matches(o, view))
            .map(|o| o.upstream.as_str())
    }

    /// The request's sticky key, when there is one and it is not empty.
    fn sticky_key(&self, view: &View<'_>) -> Option<String> {
        let key = match self.config.sticky.as_ref()? {
            Sticky::Header(name) => view.req.header(name)?,
            Sticky::Cookie(name) => view.cookie(name)?,
            Sticky::ClientIp => client_address(view.req, &self.config.trusted_proxies)?.to_string(),
        };
        (!key.is_empty()).then_some(key)
    }
}

/// Whether the request has the override's header or cookie (with its value,
/// when one is given).
fn matches(rule: &Override, view: &View<'_>) -> bool {
    let found = match &rule.field {
        Field::Header(name) => view.req.header(name),
        Field::Cookie(name) => view.cookie(name),
    };
    match (&rule.value, found) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(expected), Some(found)) => *expected == found,
    }
}

/// Where a sticky key lands: its hash, salted, so that two splits keyed
/// the same way assign users independently when their salts differ.
pub fn point(salt: &str, key: &str) -> u64 {
    if salt.is_empty() {
        return hash64(key.as_bytes());
    }
    let mut bytes = Vec::with_capacity(salt.len() + 1 + key.len());
    bytes.extend_from_slice(salt.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(key.as_bytes());
    hash64(&bytes)
}

/// The request, with its `cookie` headers read at most once.
struct View<'a> {
    req: &'a Request,
    cookies: OnceCell<Vec<String>>,
}

impl<'a> View<'a> {
    fn new(req: &'a Request) -> View<'a> {
        View {
            req,
            cookies: OnceCell::new(),
        }
    }

    fn cookie(&self, name: &str) -> Option<String> {
        let headers = self.cookies.get_or_init(|| self.req.header_all("cookie"));
        cookie_in(headers.iter().map(String::as_str), name).map(str::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Weights;

    fn weights(sides: &[(&str, u32)]) -> Weights {
        Weights::new(sides.iter().map(|(n, w)| (n.to_string(), *w)).collect()).unwrap()
    }

    fn users() -> impl Iterator<Item = String> {
        (0..20_000).map(|i| format!("user-{i}"))
    }

    #[test]
    fn shares_follow_the_weights() {
        let split = weights(&[("canary", 5), ("stable", 95)]);
        let canary = users()
            .filter(|u| split.pick(point("", u)) == "canary")
            .count();
        // 5% of 20,000 = 1,000, to within 1% of all users.
        assert!((800..1200).contains(&canary), "{canary}");

        let thirds = weights(&[("a", 1), ("b", 1), ("c", 1)]);
        let mut counts = [0usize; 3];
        for user in users() {
            let side = thirds.pick(point("", &user));
            counts[usize::from(side.as_bytes()[0] - b'a')] += 1;
        }
        for count in counts {
            assert!((6_300..7_000).contains(&count), "{counts:?}");
        }
    }

    #[test]
    fn raising_a_rollout_moves_users_only_to_the_new_side() {
        // Both orders: the new side first (by name) or last (a list).
        for (low, high) in [
            (
                weights(&[("new", 10), ("old", 90)]),
                weights(&[("new", 30), ("old", 70)]),
            ),
            (
                weights(&[("old", 90), ("new", 10)]),
                weights(&[("old", 70), ("new", 30)]),
            ),
        ] {
            let mut moved = 0;
            for user in users() {
                let p = point("flag", &user);
                let (before, after) = (low.pick(p), high.pick(p));
                assert!(
                    before == after || (before == "old" && after == "new"),
                    "{user}: {before} -> {after}"
                );
                moved += usize::from(before != after);
            }
            // About 20% of the users move.
            assert!((3_600..4_400).contains(&moved), "{moved}");
        }
        // Weights need not add up to 100: 1:9 is 10%, 3:7 is 30%.
        let (low, high) = (
            weights(&[("new", 1), ("old", 9)]),
            weights(&[("new", 3), ("old", 7)]),
        );
        for user in users() {
            let p = point("", &user);
            assert!(low.pick(p) == high.pick(p) || low.pick(p) == "old");
        }
    }

    #[test]
    fn salts_assign_independently() {
        let split = weights(&[("a", 50), ("b", 50)]);
        let same = users()
            .filter(|u| split.pick(point("one", u)) == split.pick(point("two", u)))
            .count();
        // Independent halves agree about half the time.
        assert!((9_400..10_600).contains(&same), "{same}");
        assert_eq!(point("", "u"), hash64(b"u"));
        assert_ne!(point("x", "u"), point("", "u"));
        assert_ne!(point("ab", "c"), point("a", "bc"));
    }
}
