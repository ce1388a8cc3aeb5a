//! The plugin's settings: parsed from the manifest's `config` JSON once per
//! instance, every key checked, every error naming its key.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use sluice_sdk::net::IpRanges;

/// A region's index in [`Config::regions`].
pub type RegionId = usize;

/// One region: where its clients go, and where they go when it is down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// The region's name, as the manifest spells it (also the value of the
    /// region header).
    pub name: String,
    /// The upstream serving it.
    pub upstream: String,
    /// The regions to try, in order, when its upstream has no healthy endpoint.
    pub failover: Vec<RegionId>,
}

/// The validated settings; see the README for what each one means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Every region, sorted by name.
    pub regions: Vec<Region>,
    /// The region of each listed country (ISO 3166-1 alpha-2, uppercase).
    pub countries: BTreeMap<String, RegionId>,
    /// The region of each listed continent (`EU`, `NA`, ...), for countries
    /// not listed themselves.
    pub continents: BTreeMap<String, RegionId>,
    /// The region of clients whose country is unknown or not mapped.
    pub default: RegionId,
    /// Proxies in front of the gateway: their `X-Forwarded-For` is believed,
    /// and so are the country headers they send.
    pub trusted_proxies: IpRanges,
    /// Headers (lowercase) whose country code is believed, in order, when the
    /// TCP peer is a trusted proxy.
    pub trusted_country_headers: Vec<String>,
    /// The request header that tells the upstream the client's country.
    pub country_header: String,
    /// The request header that tells the upstream the region serving it.
    pub region_header: String,
}

/// The settings [`Config::parse`] knows.
const KEYS: [&str; 8] = [
    "regions",
    "upstreams",
    "default",
    "failover",
    "trusted_proxies",
    "trusted_country_headers",
    "country_header",
    "region_header",
];

/// The continent codes a `continent:XX` entry may name (MaxMind's).
pub const CONTINENT_CODES: [&str; 7] = ["AF", "AN", "AS", "EU", "NA", "OC", "SA"];

/// Written before a continent code in a region's list.
const CONTINENT_PREFIX: &str = "continent:";

impl Config {
    /// Parses and checks the plugin's config JSON.
    pub fn parse(json: &str) -> Result<Config, String> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| format!("config is not valid JSON: {e}"))?;
        let Some(object) = value.as_object() else {
            return Err("config must be a JSON object".to_string());
        };
        if let Some(key) = object.keys().find(|k| !KEYS.contains(&k.as_str())) {
            return Err(format!(
                "{key:?}: unknown key (expected one of {})",
                KEYS.join(", ")
            ));
        }

        let mut regions = upstreams(object.get("upstreams"))?;
        let names: Vec<String> = regions.iter().map(|r| r.name.clone()).collect();
        let find = |path: &str, name: &Value| region_id(&names, path, name);

        let default = match object.get("default") {
            Some(name) => find("default", name)?,
            None => {
                return Err(format!(
                    "\"default\": missing: name the region of clients whose country is unknown or not listed (one of {})",
                    names.join(", ")
                ));
            }
        };

        let mut countries = BTreeMap::new();
        let mut continents = BTreeMap::new();
        if let Some(value) = object.get("regions") {
            let table = value.as_object().ok_or_else(|| {
                format!(
                    "\"regions\": expected a table of region = [countries], such as {{ eu-west = [\"GB\", \"DE\", \"continent:EU\"] }}, got {value}"
                )
            })?;
            for (name, entries) in table {
                let path = format!("regions.{name}");
                let id = names.iter().position(|n| n == name).ok_or_else(|| {
                    format!(
                        "{path:?}: region {name:?} has no upstream: add it to \"upstreams\" (regions with one: {})",
                        names.join(", ")
                    )
                })?;
                let entries = entries.as_array().ok_or_else(|| {
                    format!(
                        "{path:?}: expected a list of country codes (\"US\") or continents (\"continent:EU\"), got {entries}"
                    )
                })?;
                for (i, entry) in entries.iter().enumerate() {
                    let path = format!("{path}[{i}]");
                    let (map, code, kind) =
                        match place(entry).map_err(|e| format!("{path:?}: {e}"))? {
                            Place::Country(code) => (&mut countries, code, "country"),
                            Place::Continent(code) => (&mut continents, code, "continent"),
                        };
                    if let Some(&other) = map.get(&code) {
                        let where_ = if other == id {
                            "earlier in this list".to_string()
                        } else {
                            format!("in region {:?}", names[other])
                        };
                        return Err(format!("{path:?}: {kind} {code} is already {where_}"));
                    }
                    map.insert(code, id);
                }
            }
        }

        match object.get("failover") {
            None => {}
            Some(Value::Array(order)) => {
                let order = region_list("failover", order, &find)?;
                for (id, region) in regions.iter_mut().enumerate() {
                    region.failover = order.iter().copied().filter(|&o| o != id).collect();
                }
            }
            Some(Value::Object(table)) => {
                for (name, order) in table {
                    let path = format!("failover.{name}");
                    let id = find(&path, &Value::String(name.clone()))?;
                    let Some(order) = order.as_array() else {
                        return Err(format!(
                            "{path:?}: expected a list of regions to try in order, got {order}"
                        ));
                    };
                    let order = region_list(&path, order, &find)?;
                    if order.contains(&id) {
                        return Err(format!(
                            "{path:?}: a region cannot fail over to itself ({name:?})"
                        ));
                    }
                    regions[id].failover = order;
                }
            }
            Some(other) => {
                return Err(format!(
                    "\"failover\": expected one order for every region ([\"us-east\", \"eu-west\"]) or a table of region = [regions], got {other}"
                ));
            }
        }

        let used = |id: RegionId| {
            id == default
                || countries.values().any(|&r| r == id)
                || continents.values().any(|&r| r == id)
                || regions.iter().any(|r| r.failover.contains(&id))
        };
        if let Some(unused) = (0..regions.len()).find(|&id| !used(id)) {
            return Err(format!(
                "\"upstreams.{}\": region {:?} is never used: no country or continent maps to it, it is not the default and no failover names it",
                names[unused], names[unused]
            ));
        }

        let trusted_proxies = match object.get("trusted_proxies") {
            None => IpRanges::default(),
            Some(value) => {
                let entries = strings("trusted_proxies", value)?;
                IpRanges::parse(entries.iter().copied())
                    .map_err(|e| format!("\"trusted_proxies\": {e}"))?
            }
        };
        let trusted_country_headers = match object.get("trusted_country_headers") {
            None => Vec::new(),
            Some(value) => {
                let names = strings("trusted_country_headers", value)?;
                let mut headers = Vec::with_capacity(names.len());
                for (i, name) in names.iter().enumerate() {
                    headers.push(
                        header_name(name)
                            .map_err(|e| format!("\"trusted_country_headers[{i}]\": {e}"))?,
                    );
                }
                headers
            }
        };
        if !trusted_country_headers.is_empty() && trusted_proxies.is_empty() {
            return Err(
                "\"trusted_country_headers\": these headers are believed only from a trusted proxy: set \"trusted_proxies\" too"
                    .to_string(),
            );
        }
        let country_header = output_header(object, "country_header", "x-sluice-country")?;
        let region_header = output_header(object, "region_header", "x-sluice-region")?;
        if country_header == region_header {
            return Err(format!(
                "\"region_header\": {region_header:?} is also the country header"
            ));
        }

        Ok(Config {
            regions,
            countries,
            continents,
            default,
            trusted_proxies,
            trusted_country_headers,
            country_header,
            region_header,
        })
    }

    /// The region of a client in `country` (on `continent`): the country's
    /// own entry, else its continent's, else the default.
    pub fn region_of(&self, country: Option<&str>, continent: Option<&str>) -> RegionId {
        country
            .and_then(|c| self.countries.get(c))
            .or_else(|| continent.and_then(|c| self.continents.get(c)))
            .copied()
            .unwrap_or(self.default)
    }
}

/// The `upstreams` table: every region, sorted by name.
fn upstreams(value: Option<&Value>) -> Result<Vec<Region>, String> {
    let example = "such as { us-east = \"us\", eu-west = \"eu\" }";
    let table = match value {
        Some(Value::Object(table)) if !table.is_empty() => table,
        Some(other) => {
            return Err(format!(
                "\"upstreams\": expected a table of region = \"upstream\", {example}, got {other}"
            ));
        }
        None => {
            return Err(format!(
                "\"upstreams\": missing: give each region's upstream, {example}"
            ));
        }
    };
    let mut regions = Vec::with_capacity(table.len());
    for (name, upstream) in table {
        let path = format!("upstreams.{name}");
        region_name(name).map_err(|e| format!("{path:?}: {e}"))?;
        let upstream = upstream
            .as_str()
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .ok_or_else(|| format!("{path:?}: expected an upstream's name, got {upstream}"))?;
        regions.push(Region {
            name: name.clone(),
            upstream: upstream.to_string(),
            failover: Vec::new(),
        });
    }
    // serde_json's map is sorted already; the order is part of the contract.
    regions.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(regions)
}

/// Checks a region's name: it becomes a header value and a log field.
fn region_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a region name (letters, digits, '-', '_' and '.')"
        ))
    }
}

/// The id of the region named by `name`, or an error at `path`.
fn region_id(names: &[String], path: &str, name: &Value) -> Result<RegionId, String> {
    let Some(text) = name.as_str() else {
        return Err(format!("{path:?}: expected a region's name, got {name}"));
    };
    names.iter().position(|n| n == text).ok_or_else(|| {
        format!(
            "{path:?}: region {text:?} has no upstream: add it to \"upstreams\" (regions with one: {})",
            names.join(", ")
        )
    })
}

/// A list of distinct regions, each checked with `find`.
fn region_list(
    path: &str,
    entries: &[Value],
    find: &impl Fn(&str, &Value) -> Result<RegionId, String>,
) -> Result<Vec<RegionId>, String> {
    let mut ids = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let id = find(&format!("{path}[{i}]"), entry)?;
        if ids.contains(&id) {
            return Err(format!("\"{path}[{i}]\": {entry} is listed twice"));
        }
        ids.push(id);
    }
    Ok(ids)
}

/// What one entry of a region's list names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Place {
    /// An ISO 3166-1 alpha-2 country code, uppercase.
    Country(String),
    /// A continent code, uppercase.
    Continent(String),
}

/// Parses `"US"` (any case) or `"continent:EU"`.
fn place(entry: &Value) -> Result<Place, String> {
    let Some(text) = entry.as_str() else {
        return Err(format!(
            "expected a country code (\"US\") or a continent (\"continent:EU\"), got {entry}"
        ));
    };
    let trimmed = text.trim();
    if let Some(continent) = trimmed
        .get(..CONTINENT_PREFIX.len())
        .filter(|p| p.eq_ignore_ascii_case(CONTINENT_PREFIX))
        .and_then(|_| trimmed.get(CONTINENT_PREFIX.len()..))
    {
        let code = continent.trim().to_ascii_uppercase();
        return if CONTINENT_CODES.contains(&code.as_str()) {
            Ok(Place::Continent(code))
        } else {
            Err(format!(
                "{text:?} names no continent (continent:{})",
                CONTINENT_CODES.join(", continent:")
            ))
        };
    }
    country_code(trimmed).map(Place::Country).ok_or_else(|| {
        format!(
            "{text:?} is not a two-letter country code (ISO 3166-1 alpha-2, such as \"US\") or a continent (\"continent:EU\")"
        )
    })
}

/// `text` as an uppercase two-letter country code, if it is one.
pub fn country_code(text: &str) -> Option<String> {
    let text = text.trim();
    (text.len() == 2 && text.bytes().all(|b| b.is_ascii_alphabetic()))
        .then(|| text.to_ascii_uppercase())
}

/// `value` as a list of strings, or an error naming `key`.
fn strings<'a>(key: &str, value: &'a Value) -> Result<Vec<&'a str>, String> {
    let bad = || format!("{key:?}: expected a list of strings, got {value}");
    value
        .as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|entry| entry.as_str().ok_or_else(bad))
        .collect()
}

/// An HTTP header name (an RFC 9110 token), lowercase.
fn header_name(name: &str) -> Result<String, String> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !name.is_empty() && name.bytes().all(token) {
        Ok(name.to_ascii_lowercase())
    } else {
        Err(format!("{name:?} is not a header name"))
    }
}

/// The header name at `key`, or `default` when absent.
fn output_header(object: &Map<String, Value>, key: &str, default: &str) -> Result<String, String> {
    match object.get(key) {
        None => Ok(default.to_string()),
        Some(Value::String(name)) => header_name(name).map_err(|e| format!("{key:?}: {e}")),
        Some(other) => Err(format!("{key:?}: expected a header name, got {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Config, String> {
        Config::parse(json)
    }

    /// The README's example.
    const EXAMPLE: &str = r#"{
        "regions": {
            "us-east": ["US", "CA", "MX", "continent:SA"],
            "eu-west": ["GB", "DE", "FR", "continent:EU", "continent:AF"],
            "ap-southeast": ["JP", "SG", "AU", "continent:AS", "continent:OC"]
        },
        "upstreams": {"us-east": "us", "eu-west": "eu", "ap-southeast": "ap"},
        "default": "us-east",
        "failover": {"us-east": ["eu-west", "ap-southeast"],
                     "eu-west": ["us-east"],
                     "ap-southeast": ["us-east", "eu-west"]},
        "trusted_proxies": ["10.0.0.0/8", "::1"],
        "trusted_country_headers": ["CF-IPCountry", "x-country"]
    }"#;

    fn id(config: &Config, name: &str) -> RegionId {
        config.regions.iter().position(|r| r.name == name).unwrap()
    }

    fn names(config: &Config, ids: &[RegionId]) -> Vec<String> {
        ids.iter()
            .map(|&i| config.regions[i].name.clone())
            .collect()
    }

    #[test]
    fn the_example() {
        let config = parse(EXAMPLE).unwrap();
        let regions: Vec<(&str, &str)> = config
            .regions
            .iter()
            .map(|r| (r.name.as_str(), r.upstream.as_str()))
            .collect();
        assert_eq!(
            regions,
            [("ap-southeast", "ap"), ("eu-west", "eu"), ("us-east", "us")]
        );
        let us = id(&config, "us-east");
        let eu = id(&config, "eu-west");
        let ap = id(&config, "ap-southeast");
        assert_eq!(config.default, us);
        assert_eq!(config.countries["US"], us);
        assert_eq!(config.countries["DE"], eu);
        assert_eq!(config.countries["SG"], ap);
        assert_eq!(config.continents["EU"], eu);
        assert_eq!(
            names(&config, &config.regions[us].failover),
            ["eu-west", "ap-southeast"]
        );
        assert_eq!(names(&config, &config.regions[eu].failover), ["us-east"]);
        assert_eq!(
            config.trusted_country_headers,
            ["cf-ipcountry", "x-country"]
        );
        assert!(config.trusted_proxies.contains("10.1.2.3".parse().unwrap()));
        assert_eq!(config.country_header, "x-sluice-country");
        assert_eq!(config.region_header, "x-sluice-region");
    }

    #[test]
    fn countries_before_continents_before_the_default() {
        let config = parse(EXAMPLE).unwrap();
        let region = |country, continent| {
            config.regions[config.region_of(country, continent)]
                .name
                .as_str()
        };
        assert_eq!(region(Some("DE"), Some("EU")), "eu-west");
        assert_eq!(
            region(Some("US"), Some("EU")),
            "us-east",
            "the country's entry wins"
        );
        assert_eq!(region(Some("PL"), Some("EU")), "eu-west");
        assert_eq!(region(Some("BR"), Some("SA")), "us-east");
        assert_eq!(region(Some("NZ"), Some("OC")), "ap-southeast");
        assert_eq!(
            region(Some("AQ"), Some("AN")),
            "us-east",
            "no entry: the default"
        );
        assert_eq!(region(None, None), "us-east");
        assert_eq!(region(Some("PL"), None), "us-east");
    }

    #[test]
    fn one_global_failover_order() {
        let config = parse(
            r#"{"regions": {"a": ["US"], "b": ["DE"], "c": ["JP"], "d": ["BR"]},
                "upstreams": {"a": "ua", "b": "ub", "c": "uc", "d": "ud"},
                "default": "a",
                "failover": ["c", "a", "b"]}"#,
        )
        .unwrap();
        let order = |name| names(&config, &config.regions[id(&config, name)].failover);
        assert_eq!(order("a"), ["c", "b"]);
        assert_eq!(order("b"), ["c", "a"]);
        assert_eq!(order("c"), ["a", "b"]);
        assert_eq!(
            order("d"),
            ["c", "a", "b"],
            "not in the list: every listed region"
        );
    }

    #[test]
    fn the_smallest_config_and_lenient_spelling() {
        let config = parse(
            r#"{"upstreams": {"only": "app"}, "default": "only",
                "regions": {"only": [" us ", "Continent:eu"]},
                "country_header": "X-Geo-Country", "region_header": "x-geo-region"}"#,
        )
        .unwrap();
        assert_eq!(config.countries["US"], 0);
        assert_eq!(config.continents["EU"], 0);
        assert_eq!(config.country_header, "x-geo-country");
        assert_eq!(config.region_header, "x-geo-region");
        assert!(config.trusted_proxies.is_empty());
        assert!(config.trusted_country_headers.is_empty());
        let config = parse(r#"{"upstreams": {"only": "app"}, "default": "only"}"#).unwrap();
        assert!(config.countries.is_empty());
    }

    #[test]
    fn a_failover_only_region_is_used() {
        let config = parse(
            r#"{"upstreams": {"main": "a", "spare": "b"}, "default": "main",
                "failover": {"main": ["spare"]}}"#,
        )
        .unwrap();
        assert_eq!(names(&config, &config.regions[0].failover), ["spare"]);
    }

    #[test]
    fn country_codes() {
        assert_eq!(country_code("us"), Some("US".to_string()));
        assert_eq!(country_code(" De "), Some("DE".to_string()));
        for bad in ["", "U", "USA", "T1", "1A", "é"] {
            assert_eq!(country_code(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let base =
            r#""upstreams": {"us": "u1", "eu": "u2"}, "default": "us", "regions": {"eu": ["DE"]}"#;
        let with = |extra: &str| format!("{{{base}, {extra}}}");
        // One region, "us".
        let solo =
            |extra: &str| format!(r#"{{"upstreams": {{"us": "a"}}, "default": "us", {extra}}}"#);
        let cases = [
            (r#"{"region": {}}"#.to_string(), "\"region\": unknown key"),
            (r#"{"default": "us"}"#.to_string(), "\"upstreams\": missing"),
            (r#"{"upstreams": {}, "default": "us"}"#.to_string(), "\"upstreams\": expected"),
            (r#"{"upstreams": ["us"], "default": "us"}"#.to_string(), "\"upstreams\": expected"),
            (r#"{"upstreams": {"us": ""}, "default": "us"}"#.to_string(), "\"upstreams.us\": expected"),
            (r#"{"upstreams": {"us": 1}, "default": "us"}"#.to_string(), "\"upstreams.us\": expected"),
            (r#"{"upstreams": {"u s": "a"}, "default": "u s"}"#.to_string(), "\"upstreams.u s\": \"u s\" is not a region name"),
            (r#"{"upstreams": {"us": "a"}}"#.to_string(), "\"default\": missing"),
            (r#"{"upstreams": {"us": "a"}, "default": "eu"}"#.to_string(), "\"default\": region \"eu\" has no upstream"),
            (r#"{"upstreams": {"us": "a"}, "default": 1}"#.to_string(), "\"default\": expected a region"),
            (r#"{"upstreams": {"us": "a", "eu": "b"}, "default": "us"}"#.to_string(), "\"upstreams.eu\": region \"eu\" is never used"),
            (
                solo(r#""regions": []"#),
                "\"regions\": expected a table",
            ),
            (
                solo(r#""regions": {"eu": ["DE"]}"#),
                "\"regions.eu\": region \"eu\" has no upstream",
            ),
            (
                solo(r#""regions": {"us": "US"}"#),
                "\"regions.us\": expected a list",
            ),
            (
                solo(r#""regions": {"us": ["US", "USA"]}"#),
                "\"regions.us[1]\": \"USA\" is not a two-letter country code",
            ),
            (
                solo(r#""regions": {"us": [1]}"#),
                "\"regions.us[0]\": expected a country code",
            ),
            (
                solo(r#""regions": {"us": ["continent:XX"]}"#),
                "\"regions.us[0]\": \"continent:XX\" names no continent",
            ),
            (
                solo(r#""regions": {"us": ["US", "us"]}"#),
                "\"regions.us[1]\": country US is already earlier in this list",
            ),
            (
                r#"{"upstreams": {"us": "a", "eu": "b"}, "default": "us", "regions": {"eu": ["continent:EU"], "us": ["Continent:EU"]}}"#.to_string(),
                "\"regions.us[0]\": continent EU is already in region \"eu\"",
            ),
            (with(r#""failover": "eu""#), "\"failover\": expected"),
            (with(r#""failover": ["us", "xx"]"#), "\"failover[1]\": region \"xx\" has no upstream"),
            (with(r#""failover": ["us", "us"]"#), "\"failover[1]\": \"us\" is listed twice"),
            (with(r#""failover": {"xx": ["us"]}"#), "\"failover.xx\": region \"xx\" has no upstream"),
            (with(r#""failover": {"us": "eu"}"#), "\"failover.us\": expected a list"),
            (with(r#""failover": {"us": ["eu", "us"]}"#), "\"failover.us\": a region cannot fail over to itself"),
            (with(r#""failover": {"us": ["eu", 3]}"#), "\"failover.us[1]\": expected a region's name"),
            (with(r#""trusted_proxies": "10.0.0.0/8""#), "\"trusted_proxies\": expected a list"),
            (with(r#""trusted_proxies": ["10.0.0.0/33"]"#), "\"trusted_proxies\": \"10.0.0.0/33\""),
            (with(r#""trusted_country_headers": ["cf-ipcountry"]"#), "\"trusted_country_headers\": these headers are believed only"),
            (
                with(r#""trusted_proxies": ["::1"], "trusted_country_headers": ["cf ipcountry"]"#),
                "\"trusted_country_headers[0]\": \"cf ipcountry\" is not a header name",
            ),
            (with(r#""country_header": """#), "\"country_header\": \"\" is not a header name"),
            (with(r#""region_header": true"#), "\"region_header\": expected a header name"),
            (with(r#""region_header": "X-Sluice-Country""#), "\"region_header\": \"x-sluice-country\" is also"),
        ];
        for (json, expected) in cases {
            let err = parse(&json).unwrap_err();
            assert!(
                err.contains(expected),
                "{json}\n  {err}\n  expected: {expected}"
            );
        }
        assert!(parse("[]").is_err());
        assert!(parse("{").is_err());
    }
}
