//! `builtin:ip-filter`: admits or refuses requests by the client's IP
//! address, against allow and deny lists of IPv4 and IPv6 ranges (world
//! `request-policy`).
//!
//! ```json
//! {"allow": ["10.0.0.0/8", "2001:db8::/32"], "deny": ["10.66.0.0/16"],
//!  "trusted_proxies": ["127.0.0.1"], "status": 403}
//! ```
//!
//! The rule, the same whatever the order of the entries: an address in
//! `deny` is refused; otherwise, when `allow` is not empty, an address not
//! in `allow` is refused; every other address passes. The client's address
//! is the TCP peer, or, when the peer is one of `trusted_proxies`, the
//! right-most untrusted `X-Forwarded-For` entry. The README has every
//! setting.

use std::net::IpAddr;

use serde_json::Value;
use sluice_sdk::net::{IpRanges, client_address};
use sluice_sdk::{Action, Policy, Reply, Request, metrics};

/// The policy: its validated config.
#[derive(Debug, PartialEq, Eq)]
pub struct IpFilter {
    /// When not empty, only these addresses may pass.
    allow: IpRanges,
    /// These addresses never pass.
    deny: IpRanges,
    /// Proxies whose `X-Forwarded-For` names the client.
    trusted_proxies: IpRanges,
    /// The refusal's status code.
    status: u16,
    /// The refusal's body.
    body: String,
}

/// What the filter decides for an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The address may pass.
    Pass,
    /// The address is in `deny`.
    Denied,
    /// `allow` is not empty and the address is not in it.
    NotAllowed,
}

impl Policy for IpFilter {
    fn init(config: &str) -> Result<Self, String> {
        IpFilter::parse(config)
    }

    fn on_request(&self, req: &Request) -> Action {
        // An unreadable peer address cannot be checked: refuse it.
        let verdict = client_address(req, &self.trusted_proxies)
            .map_or(Verdict::NotAllowed, |ip| self.judge(ip));
        if verdict == Verdict::Pass {
            return Action::Continue;
        }
        metrics::counter_add("ip_filter_refused", 1);
        Reply::new(self.status)
            .with_header("content-type", "text/plain; charset=utf-8")
            .with_body(self.body.as_str())
            .into()
    }
}

sluice_sdk::export_request_policy!(IpFilter);

/// The settings [`IpFilter::parse`] knows.
const KEYS: &str = "`allow`, `deny`, `trusted_proxies`, `status` or `body`";

impl IpFilter {
    /// Whether `ip` may pass: `deny` first, then `allow` when it is not empty.
    pub fn judge(&self, ip: IpAddr) -> Verdict {
        if self.deny.contains(ip) {
            Verdict::Denied
        } else if !self.allow.is_empty() && !self.allow.contains(ip) {
            Verdict::NotAllowed
        } else {
            Verdict::Pass
        }
    }

    /// Parses and checks the plugin's config JSON.
    pub fn parse(json: &str) -> Result<IpFilter, String> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| format!("config is not valid JSON: {e}"))?;
        let Some(object) = value.as_object() else {
            return Err("config must be a JSON object".to_string());
        };
        let mut filter = IpFilter {
            allow: IpRanges::default(),
            deny: IpRanges::default(),
            trusted_proxies: IpRanges::default(),
            status: 403,
            body: "forbidden\n".to_string(),
        };
        for (key, value) in object {
            match key.as_str() {
                "allow" => filter.allow = ranges(key, value)?,
                "deny" => filter.deny = ranges(key, value)?,
                "trusted_proxies" => filter.trusted_proxies = ranges(key, value)?,
                "status" => {
                    filter.status = value
                        .as_u64()
                        .and_then(|s| u16::try_from(s).ok())
                        .filter(|s| (200..=599).contains(s))
                        .ok_or_else(|| {
                            "status: expected a status code from 200 to 599".to_string()
                        })?;
                }
                "body" => {
                    filter.body = value
                        .as_str()
                        .ok_or_else(|| "body: expected a string".to_string())?
                        .to_string();
                }
                _ => return Err(format!("{key}: unknown key (expected {KEYS})")),
            }
        }
        if filter.allow.is_empty() && filter.deny.is_empty() {
            return Err(
                "allow, deny: give at least one address or range in either (as allow = [\"10.0.0.0/8\"])"
                    .to_string(),
            );
        }
        Ok(filter)
    }
}

/// A list of addresses and CIDR ranges; an error names the bad entry by
/// its position, as `deny[2]: "10.0.0.0/33" is not an IP range ...`.
fn ranges(key: &str, value: &Value) -> Result<IpRanges, String> {
    let Value::Array(list) = value else {
        return Err(format!(
            "{key}: expected a list of addresses or CIDR ranges (as [\"10.0.0.0/8\", \"2001:db8::/32\"])"
        ));
    };
    let mut entries = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let at = format!("{key}[{i}]");
        let entry = entry
            .as_str()
            .ok_or_else(|| format!("{at}: expected an address or CIDR range (a string)"))?;
        IpRanges::parse([entry]).map_err(|e| format!("{at}: {e}"))?;
        entries.push(entry);
    }
    IpRanges::parse(entries).map_err(|e| format!("{key}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn err(json: &str) -> String {
        IpFilter::parse(json).unwrap_err()
    }

    #[test]
    fn deny_only_refuses_the_listed_ranges() {
        let filter =
            IpFilter::parse(r#"{"deny": ["203.0.113.0/24", "2001:db8:bad::/48"]}"#).unwrap();
        assert_eq!(filter.judge(ip("203.0.113.9")), Verdict::Denied);
        assert_eq!(filter.judge(ip("203.0.114.1")), Verdict::Pass);
        assert_eq!(filter.judge(ip("2001:db8:bad:1::5")), Verdict::Denied);
        assert_eq!(filter.judge(ip("2001:db8:bae::1")), Verdict::Pass);
        // An IPv4-mapped IPv6 client is judged as its IPv4 address.
        assert_eq!(filter.judge(ip("::ffff:203.0.113.9")), Verdict::Denied);
    }

    #[test]
    fn allow_admits_only_its_ranges_and_deny_wins() {
        let filter = IpFilter::parse(
            r#"{"allow": ["10.0.0.0/8", "::1", "2001:db8::/32"], "deny": ["10.66.0.0/16", "10.1.2.3"]}"#,
        )
        .unwrap();
        assert_eq!(filter.judge(ip("10.9.8.7")), Verdict::Pass);
        assert_eq!(filter.judge(ip("10.66.1.1")), Verdict::Denied);
        assert_eq!(filter.judge(ip("10.1.2.3")), Verdict::Denied);
        assert_eq!(filter.judge(ip("10.1.2.4")), Verdict::Pass);
        assert_eq!(filter.judge(ip("11.0.0.1")), Verdict::NotAllowed);
        assert_eq!(filter.judge(ip("::1")), Verdict::Pass);
        assert_eq!(filter.judge(ip("::2")), Verdict::NotAllowed);
        assert_eq!(filter.judge(ip("2001:db8:1::1")), Verdict::Pass);
        // The order of the keys changes nothing.
        let swapped = IpFilter::parse(
            r#"{"deny": ["10.1.2.3", "10.66.0.0/16"], "allow": ["2001:db8::/32", "::1", "10.0.0.0/8"]}"#,
        )
        .unwrap();
        assert_eq!(swapped, filter);
    }

    #[test]
    fn defaults_and_reply_settings() {
        let filter = IpFilter::parse(r#"{"allow": ["127.0.0.1"]}"#).unwrap();
        assert_eq!((filter.status, filter.body.as_str()), (403, "forbidden\n"));
        assert!(filter.trusted_proxies.is_empty());
        let filter =
            IpFilter::parse(r#"{"deny": ["0.0.0.0/0", "::/0"], "status": 404, "body": "", "trusted_proxies": ["10.0.0.1"]}"#)
                .unwrap();
        assert_eq!((filter.status, filter.body.as_str()), (404, ""));
        assert!(filter.trusted_proxies.contains(ip("10.0.0.1")));
        assert_eq!(filter.judge(ip("::1")), Verdict::Denied);
    }

    #[test]
    fn errors_name_the_entry() {
        let bad = err(r#"{"allow": ["10.0.0.0/8"], "deny": ["192.0.2.0/24", "10.0.0.0/33"]}"#);
        assert!(
            bad.starts_with("deny[1]: ") && bad.contains("\"10.0.0.0/33\""),
            "{bad}"
        );
        let bad = err(r#"{"allow": ["2001:db8::/129"]}"#);
        assert!(
            bad.starts_with("allow[0]: ") && bad.contains("2001:db8::/129"),
            "{bad}"
        );
        let bad = err(r#"{"allow": ["10.0.0.1"], "trusted_proxies": ["proxy.local"]}"#);
        assert!(
            bad.starts_with("trusted_proxies[0]: ") && bad.contains("proxy.local"),
            "{bad}"
        );
        assert_eq!(
            err(r#"{"allow": [10]}"#),
            "allow[0]: expected an address or CIDR range (a string)"
        );
        assert!(err(r#"{"allow": "10.0.0.0/8"}"#).starts_with("allow: expected a list"));
        assert!(err(r#"{}"#).starts_with("allow, deny: give at least one"));
        assert!(err(r#"{"allow": [], "deny": []}"#).starts_with("allow, deny: give at least one"));
        assert_eq!(
            err(r#"{"deny": ["10.0.0.1"], "status": 99}"#),
            "status: expected a status code from 200 to 599"
        );
        assert_eq!(
            err(r#"{"deny": ["10.0.0.1"], "status": 700}"#),
            "status: expected a status code from 200 to 599"
        );
        assert_eq!(
            err(r#"{"deny": ["10.0.0.1"], "body": 1}"#),
            "body: expected a string"
        );
        assert!(err(r#"{"deny": ["10.0.0.1"], "block": []}"#).starts_with("block: unknown key"));
        assert!(err("[").starts_with("config is not valid JSON"));
        assert_eq!(err("[]"), "config must be a JSON object");
    }
}
