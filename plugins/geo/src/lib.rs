//! `builtin:geo`: steers each request to the upstream of the client's
//! region, by the country of its address (world `request-policy`).
//!
//! ```json
//! {"regions": {"us-east": ["US", "CA", "MX"], "eu-west": ["GB", "DE", "continent:EU"]},
//!  "upstreams": {"us-east": "us", "eu-west": "eu"},
//!  "default": "us-east",
//!  "failover": ["us-east", "eu-west"],
//!  "trusted_proxies": ["10.0.0.0/8"]}
//! ```
//!
//! 1. **Country**: a trusted proxy's country header (`CF-IPCountry`), when
//!    the TCP peer is in `trusted_proxies` and the config lists the header;
//!    else the gateway's geo database (`[geo] database`), for the client's
//!    address (the peer, or the address trusted proxies forwarded in
//!    `X-Forwarded-For`).
//! 2. **Region**: the country's entry in `regions`, else its continent's,
//!    else `default`.
//! 3. **Upstream**: the region's, if it has a healthy endpoint; else that of
//!    the first region in the failover order that has one; else the region's
//!    own (the upstream's panic mode tries every endpoint).
//!
//! The request goes on with `x-sluice-country` and `x-sluice-region` set, so
//! the upstream sees where its client is. The README has every setting.

pub mod config;
pub mod steering;

use std::net::IpAddr;

use sluice_sdk::net::{canonical, forwarded_client};
use sluice_sdk::text::push_ip;
use sluice_sdk::{Action, Location, Policy, Request};

use crate::config::Config;
use crate::steering::{Decision, Host};

/// The policy: its validated config.
pub struct Geo {
    config: Config,
}

impl Policy for Geo {
    fn init(config: &str) -> Result<Self, String> {
        Ok(Geo {
            config: Config::parse(config)?,
        })
    }

    fn on_request(&self, req: &Request) -> Action {
        let peer = req.client_ip().parse().ok().map(canonical);
        let client = peer.map(|peer| forwarded_client(req, peer, &self.config.trusted_proxies));
        let decision = steering::decide(&Imports, &self.config, peer, client, |name| {
            req.header(name)
        });
        let (country, region, upstream) = self.outcome(&decision);
        set_or_remove(req, &self.config.country_header, country);
        set_or_remove(req, &self.config.region_header, region);
        match upstream {
            Some(upstream) => Action::steer(upstream),
            None => Action::Continue,
        }
    }
}

impl Geo {
    /// The country and region headers' values and the upstream to steer to.
    fn outcome<'a>(
        &'a self,
        decision: &'a Decision,
    ) -> (Option<&'a str>, Option<&'a str>, Option<&'a str>) {
        let served = decision
            .choice
            .region()
            .and_then(|id| self.config.regions.get(id));
        (
            decision.country.as_deref(),
            served.map(|r| r.name.as_str()),
            served.map(|r| r.upstream.as_str()),
        )
    }
}

/// Sets header `name` to `value`, or removes it (so that a client cannot
/// send its own) when there is no value.
fn set_or_remove(req: &Request, name: &str, value: Option<&str>) {
    match value {
        Some(value) => {
            if let Err(error) = req.set_header(name, value) {
                sluice_sdk::log::warn(&format!("geo: cannot set {name}: {error}"));
            }
        }
        None => req.remove_header(name),
    }
}

/// The gateway's host imports.
struct Imports;

impl Host for Imports {
    fn lookup(&self, ip: IpAddr) -> Location {
        let mut text = String::with_capacity(15);
        push_ip(&mut text, ip);
        sluice_sdk::geo::lookup(&text)
    }

    fn healthy(&self, upstream: &str) -> Option<u32> {
        sluice_sdk::health::healthy(upstream)
    }

    fn count(&self, metric: &str) {
        sluice_sdk::metrics::counter_add(metric, 1);
    }

    fn warn(&self, message: &str) {
        sluice_sdk::log::warn(message);
    }
}

sluice_sdk::export_request_policy!(Geo);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steering::Choice;

    fn geo() -> Geo {
        Geo::init(
            r#"{"regions": {"us-east": ["US"], "eu-west": ["DE"]},
                "upstreams": {"us-east": "us", "eu-west": "eu"},
                "default": "us-east", "failover": ["us-east", "eu-west"]}"#,
        )
        .unwrap()
    }

    #[test]
    fn init_validates() {
        assert!(Geo::init(r#"{"upstreams": {"a": "b"}, "default": "a"}"#).is_ok());
        let err = Geo::init(r#"{"upstreams": {"a": "b"}, "default": "a", "region": {}}"#)
            .err()
            .unwrap();
        assert!(err.contains("\"region\": unknown key"), "{err}");
    }

    #[test]
    fn the_outcome_names_the_served_region() {
        let geo = geo();
        let eu = geo
            .config
            .regions
            .iter()
            .position(|r| r.name == "eu-west")
            .unwrap();
        let us = geo
            .config
            .regions
            .iter()
            .position(|r| r.name == "us-east")
            .unwrap();
        let decision = Decision {
            country: Some("DE".to_string()),
            home: eu,
            choice: Choice::Failover(us),
        };
        assert_eq!(
            geo.outcome(&decision),
            (Some("DE"), Some("us-east"), Some("us"))
        );
        let decision = Decision {
            country: None,
            home: us,
            choice: Choice::Unroutable,
        };
        assert_eq!(geo.outcome(&decision), (None, None, None));
    }
}
