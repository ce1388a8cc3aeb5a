//! Where a request goes: the client's country (from a trusted proxy's
//! header, or the geo database on the client's address), the region that
//! country belongs to, and the first region in that region's failover order
//! whose upstream has a healthy endpoint.
//!
//! The host is behind the [`Host`] trait: the plugin passes the real
//! imports, the tests a fake database and fake health.

use std::net::IpAddr;

use sluice_sdk::Location;

use crate::config::{Config, RegionId, country_code};

/// What steering needs from the host (see the WIT `geo`, `health`,
/// `metrics` and `log` interfaces).
pub trait Host {
    /// `geo.lookup`.
    fn lookup(&self, ip: IpAddr) -> Location;
    /// `health.healthy`: how many endpoints of `upstream` may take traffic,
    /// `None` when there is no such upstream.
    fn healthy(&self, upstream: &str) -> Option<u32>;
    /// `metrics.counter-add` by one.
    fn count(&self, metric: &str);
    /// `log.write` at warn.
    fn warn(&self, message: &str);
}

/// Which region serves a request, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The client's own region: its upstream has a healthy endpoint.
    Home(RegionId),
    /// The first region of the failover order with a healthy endpoint.
    Failover(RegionId),
    /// No region of the order has a healthy endpoint: the client's own region,
    /// whose upstream then serves in panic mode (every endpoint is tried).
    Panic(RegionId),
    /// No region of the order has an upstream the gateway knows (a mistake in
    /// the manifest): the request stays on the route's upstream.
    Unroutable,
}

impl Choice {
    /// The region whose upstream the request is steered to, if any.
    pub fn region(self) -> Option<RegionId> {
        match self {
            Choice::Home(id) | Choice::Failover(id) | Choice::Panic(id) => Some(id),
            Choice::Unroutable => None,
        }
    }
}

/// What [`decide`] found out about a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The client's country, uppercase, when known.
    pub country: Option<String>,
    /// The client's own region.
    pub home: RegionId,
    /// The region that serves it.
    pub choice: Choice,
}

/// Decides where a request goes. `peer` is the TCP peer, `client` the
/// client's address (the peer, or what trusted proxies forwarded), and
/// `header` reads a request header.
pub fn decide<H: Host>(
    host: &H,
    config: &Config,
    peer: Option<IpAddr>,
    client: Option<IpAddr>,
    header: impl Fn(&str) -> Option<String>,
) -> Decision {
    let location = locate(host, config, peer, client, header);
    if location.country.is_none() {
        host.count("geo_country_unknown");
    }
    let home = config.region_of(location.country.as_deref(), location.continent.as_deref());
    let choice = choose(host, config, home);
    match choice {
        Choice::Home(_) => {}
        Choice::Failover(_) => host.count("geo_failover"),
        Choice::Panic(_) => host.count("geo_panic"),
        Choice::Unroutable => host.count("geo_unroutable"),
    }
    Decision {
        country: location.country,
        home,
        choice,
    }
}

/// The client's country and continent: from the first trusted country
/// header that holds a country code, when the TCP peer is a trusted proxy;
/// else from the database, for the client's address.
pub fn locate<H: Host>(
    host: &H,
    config: &Config,
    peer: Option<IpAddr>,
    client: Option<IpAddr>,
    header: impl Fn(&str) -> Option<String>,
) -> Location {
    let lookup = |ip: IpAddr| {
        let found = host.lookup(ip);
        Location {
            country: found.country.as_deref().and_then(country_code),
            continent: found.continent.map(|c| c.trim().to_ascii_uppercase()),
        }
    };
    let trusted_peer = peer.is_some_and(|peer| config.trusted_proxies.contains(peer));
    if trusted_peer {
        // "XX" is Cloudflare's "unknown"; "T1" (Tor) is not a country code.
        let from_header = config
            .trusted_country_headers
            .iter()
            .filter_map(|name| header(name).as_deref().and_then(country_code))
            .find(|code| code != "XX");
        if let Some(country) = from_header {
            // Only the database knows continents: ask it about the client when
            // a continent entry could decide, and believe it only if it agrees
            // on the country.
            let continent =
                if config.countries.contains_key(&country) || config.continents.is_empty() {
                    None
                } else {
                    client
                        .map(lookup)
                        .filter(|found| found.country.as_deref() == Some(country.as_str()))
                        .and_then(|found| found.continent)
                };
            return Location {
                country: Some(country),
                continent,
            };
        }
    }
    client.map(lookup).unwrap_or(Location {
        country: None,
        continent: None,
    })
}

/// The region that serves the clients of region `home`: `home` if its
/// upstream has a healthy endpoint, else the first such region of its
/// failover order, else `home` in panic mode.
pub fn choose<H: Host>(host: &H, config: &Config, home: RegionId) -> Choice {
    let Some(own) = config.regions.get(home) else {
        return Choice::Unroutable;
    };
    // The first region whose upstream exists: panic mode's choice.
    let mut known = None;
    for (i, id) in std::iter::once(home)
        .chain(own.failover.iter().copied())
        .enumerate()
    {
        let Some(region) = config.regions.get(id) else {
            continue;
        };
        match host.healthy(&region.upstream) {
            Some(0) => {
                known.get_or_insert(id);
            }
            Some(_) if i == 0 => return Choice::Home(id),
            Some(_) => return Choice::Failover(id),
            None => host.warn(&format!(
                "geo: region {:?}: the gateway has no upstream {:?}",
                region.name, region.upstream
            )),
        }
    }
    known.map_or(Choice::Unroutable, Choice::Panic)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use super::*;

    /// A database, health per upstream, and what was reported.
    #[derive(Default)]
    struct Fake {
        database: HashMap<IpAddr, (&'static str, &'static str)>,
        healthy: HashMap<&'static str, u32>,
        lookups: RefCell<Vec<IpAddr>>,
        health_calls: RefCell<Vec<String>>,
        counted: RefCell<Vec<String>>,
        warned: RefCell<Vec<String>>,
    }

    impl Fake {
        fn new() -> Fake {
            let mut fake = Fake::default();
            for (ip, country, continent) in [
                ("8.8.8.8", "US", "NA"),
                ("193.99.144.80", "DE", "EU"),
                ("195.113.0.1", "CZ", "EU"),
                ("133.11.0.1", "JP", "AS"),
                ("200.160.2.3", "BR", "SA"),
                ("2a01:4f8::1", "DE", "EU"),
                ("41.0.0.1", "za", "af"),
            ] {
                fake.database
                    .insert(ip.parse().unwrap(), (country, continent));
            }
            for upstream in ["us", "eu", "ap"] {
                fake.healthy.insert(upstream, 2);
            }
            fake
        }

        fn down(mut self, upstream: &'static str) -> Fake {
            self.healthy.insert(upstream, 0);
            self
        }

        fn missing(mut self, upstream: &'static str) -> Fake {
            self.healthy.remove(upstream);
            self
        }

        fn counted(&self) -> Vec<String> {
            self.counted.borrow().clone()
        }
    }

    impl Host for Fake {
        fn lookup(&self, ip: IpAddr) -> Location {
            self.lookups.borrow_mut().push(ip);
            match self.database.get(&ip) {
                Some((country, continent)) => Location {
                    country: Some(country.to_string()),
                    continent: Some(continent.to_string()),
                },
                None => Location {
                    country: None,
                    continent: None,
                },
            }
        }

        fn healthy(&self, upstream: &str) -> Option<u32> {
            self.health_calls.borrow_mut().push(upstream.to_string());
            self.healthy.get(upstream).copied()
        }

        fn count(&self, metric: &str) {
            self.counted.borrow_mut().push(metric.to_string());
        }

        fn warn(&self, message: &str) {
            self.warned.borrow_mut().push(message.to_string());
        }
    }

    fn config() -> Config {
        Config::parse(
            r#"{
                "regions": {
                    "us-east": ["US", "CA", "MX"],
                    "eu-west": ["GB", "DE", "FR", "continent:EU"],
                    "ap-southeast": ["JP", "SG", "AU"]
                },
                "upstreams": {"us-east": "us", "eu-west": "eu", "ap-southeast": "ap"},
                "default": "us-east",
                "failover": {"us-east": ["eu-west", "ap-southeast"],
                             "eu-west": ["us-east", "ap-southeast"],
                             "ap-southeast": ["us-east"]},
                "trusted_proxies": ["10.0.0.0/8", "::1"],
                "trusted_country_headers": ["cf-ipcountry", "x-country"]
            }"#,
        )
        .unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn no_headers(_: &str) -> Option<String> {
        None
    }

    /// Headers from a list of (name, value).
    fn headers(list: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            list.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    fn region(config: &Config, choice: Choice) -> &str {
        choice
            .region()
            .map_or("(none)", |id| config.regions[id].name.as_str())
    }

    /// Decides for a client at `client` behind peer `peer` with `header`.
    fn run(
        fake: &Fake,
        peer: &str,
        client: &str,
        header: impl Fn(&str) -> Option<String>,
    ) -> (Option<String>, String, String) {
        let config = config();
        let decision = decide(fake, &config, Some(ip(peer)), Some(ip(client)), header);
        let home = config.regions[decision.home].name.clone();
        (
            decision.country,
            home,
            region(&config, decision.choice).to_string(),
        )
    }

    #[test]
    fn the_database_places_the_client() {
        let fake = Fake::new();
        let (country, home, served) = run(&fake, "8.8.8.8", "8.8.8.8", no_headers);
        assert_eq!(
            (country.as_deref(), home.as_str(), served.as_str()),
            (Some("US"), "us-east", "us-east")
        );
        let (country, _, served) = run(&fake, "193.99.144.80", "193.99.144.80", no_headers);
        assert_eq!(
            (country.as_deref(), served.as_str()),
            (Some("DE"), "eu-west")
        );
        let (country, _, served) = run(&fake, "2a01:4f8::1", "2a01:4f8::1", no_headers);
        assert_eq!(
            (country.as_deref(), served.as_str()),
            (Some("DE"), "eu-west")
        );
        let (_, _, served) = run(&fake, "133.11.0.1", "133.11.0.1", no_headers);
        assert_eq!(served, "ap-southeast");
        assert!(fake.counted().is_empty(), "{:?}", fake.counted());
        assert!(fake.warned.borrow().is_empty());
    }

    #[test]
    fn a_continent_entry_catches_unlisted_countries() {
        let fake = Fake::new();
        let (country, home, _) = run(&fake, "195.113.0.1", "195.113.0.1", no_headers);
        assert_eq!((country.as_deref(), home.as_str()), (Some("CZ"), "eu-west"));
    }

    #[test]
    fn unknown_and_unlisted_countries_get_the_default() {
        let fake = Fake::new();
        let (country, home, served) = run(&fake, "192.0.2.1", "192.0.2.1", no_headers);
        assert_eq!(
            (country, home.as_str(), served.as_str()),
            (None, "us-east", "us-east")
        );
        assert_eq!(fake.counted(), ["geo_country_unknown"]);
        let (country, home, _) = run(&fake, "200.160.2.3", "200.160.2.3", no_headers);
        assert_eq!((country.as_deref(), home.as_str()), (Some("BR"), "us-east"));
    }

    #[test]
    fn database_answers_are_normalised() {
        let fake = Fake::new();
        let location = locate(&fake, &config(), None, Some(ip("41.0.0.1")), no_headers);
        assert_eq!(location.country.as_deref(), Some("ZA"));
        assert_eq!(location.continent.as_deref(), Some("AF"));
    }

    #[test]
    fn no_address_is_an_unknown_country() {
        let fake = Fake::new();
        let config = config();
        let decision = decide(
            &fake,
            &config,
            None,
            None,
            headers(&[("cf-ipcountry", "JP")]),
        );
        assert_eq!(decision.country, None);
        assert_eq!(decision.home, config.default);
        assert!(fake.lookups.borrow().is_empty());
    }

    #[test]
    fn a_trusted_proxy_s_country_header_wins() {
        let fake = Fake::new();
        let (country, _, served) = run(
            &fake,
            "10.0.0.1",
            "8.8.8.8",
            headers(&[("cf-ipcountry", "jp")]),
        );
        assert_eq!(
            (country.as_deref(), served.as_str()),
            (Some("JP"), "ap-southeast")
        );
        assert!(
            fake.lookups.borrow().is_empty(),
            "a listed country needs no lookup"
        );
        // The list's order decides; "XX" and malformed values are skipped.
        let (country, _, _) = run(
            &fake,
            "::1",
            "8.8.8.8",
            headers(&[("cf-ipcountry", "XX"), ("x-country", "GB")]),
        );
        assert_eq!(country.as_deref(), Some("GB"));
        let (country, _, _) = run(
            &fake,
            "::1",
            "8.8.8.8",
            headers(&[("cf-ipcountry", "T1"), ("x-country", "United States")]),
        );
        assert_eq!(country.as_deref(), Some("US"), "from the database");
    }

    #[test]
    fn an_untrusted_peer_s_country_header_is_ignored() {
        let fake = Fake::new();
        let (country, _, served) = run(
            &fake,
            "8.8.8.8",
            "8.8.8.8",
            headers(&[("cf-ipcountry", "JP")]),
        );
        assert_eq!(
            (country.as_deref(), served.as_str()),
            (Some("US"), "us-east")
        );
        let (country, home, _) = run(
            &fake,
            "192.0.2.1",
            "192.0.2.1",
            headers(&[("x-country", "DE")]),
        );
        assert_eq!((country, home.as_str()), (None, "us-east"));
    }

    #[test]
    fn a_header_country_takes_its_continent_from_the_database_when_they_agree() {
        let fake = Fake::new();
        // CZ is listed only through continent:EU; the database agrees on CZ.
        let (country, home, _) = run(
            &fake,
            "10.0.0.1",
            "195.113.0.1",
            headers(&[("cf-ipcountry", "CZ")]),
        );
        assert_eq!((country.as_deref(), home.as_str()), (Some("CZ"), "eu-west"));
        // The database says US for this address: no continent, the default.
        let (country, home, _) = run(
            &fake,
            "10.0.0.1",
            "8.8.8.8",
            headers(&[("cf-ipcountry", "CZ")]),
        );
        assert_eq!((country.as_deref(), home.as_str()), (Some("CZ"), "us-east"));
    }

    #[test]
    fn a_region_without_healthy_endpoints_fails_over_in_order() {
        let fake = Fake::new().down("eu");
        let (_, home, served) = run(&fake, "193.99.144.80", "193.99.144.80", no_headers);
        assert_eq!((home.as_str(), served.as_str()), ("eu-west", "us-east"));
        assert_eq!(fake.counted(), ["geo_failover"]);

        let fake = Fake::new().down("eu").down("us");
        let (_, _, served) = run(&fake, "193.99.144.80", "193.99.144.80", no_headers);
        assert_eq!(served, "ap-southeast");
        assert_eq!(*fake.health_calls.borrow(), ["eu", "us", "ap"]);
    }

    #[test]
    fn healthy_home_asks_once() {
        let fake = Fake::new();
        run(&fake, "8.8.8.8", "8.8.8.8", no_headers);
        assert_eq!(*fake.health_calls.borrow(), ["us"]);
    }

    #[test]
    fn everything_down_keeps_the_home_region() {
        let fake = Fake::new().down("eu").down("us").down("ap");
        let (_, home, served) = run(&fake, "193.99.144.80", "193.99.144.80", no_headers);
        assert_eq!((home.as_str(), served.as_str()), ("eu-west", "eu-west"));
        assert_eq!(fake.counted(), ["geo_panic"]);
        // A region without failover order panics at once.
        let fake = Fake::new().down("ap").down("us");
        let (_, _, served) = run(&fake, "133.11.0.1", "133.11.0.1", no_headers);
        assert_eq!(served, "ap-southeast");
    }

    #[test]
    fn an_upstream_the_gateway_lacks_is_skipped() {
        let fake = Fake::new().missing("eu");
        let (_, _, served) = run(&fake, "193.99.144.80", "193.99.144.80", no_headers);
        assert_eq!(served, "us-east");
        assert_eq!(fake.warned.borrow().len(), 1);
        assert!(fake.warned.borrow()[0].contains("\"eu\""));

        // Missing and down: panic on the first region that exists.
        let fake = Fake::new().missing("eu").down("us").down("ap");
        let (_, _, served) = run(&fake, "193.99.144.80", "193.99.144.80", no_headers);
        assert_eq!(served, "us-east");
        assert_eq!(fake.counted(), ["geo_panic"]);

        let fake = Fake::new().missing("eu").missing("us").missing("ap");
        let config = config();
        let decision = decide(&fake, &config, None, Some(ip("193.99.144.80")), no_headers);
        assert_eq!(decision.choice, Choice::Unroutable);
        assert_eq!(fake.counted(), ["geo_unroutable"]);
    }
}
