//! IP address ranges, and the client's address behind trusted proxies.
//!
//! ```no_run
//! use sluice_sdk::net::{IpRanges, client_address};
//! # fn f(req: &sluice_sdk::Request) -> Result<(), String> {
//! let trusted = IpRanges::parse(["10.0.0.0/8", "::1"])?;
//! let client = client_address(req, &trusted);
//! # Ok(()) }
//! ```

use std::net::IpAddr;

use crate::Request;

/// A set of IPv4 and IPv6 ranges (`10.0.0.0/8`, `2001:db8::/32`, or single
/// addresses), merged and sorted so that a lookup is a binary search.
///
/// An IPv4-mapped IPv6 address (`::ffff:10.1.2.3`) matches as its IPv4
/// address, so a dual-stack listener's clients match IPv4 ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpRanges {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl IpRanges {
    /// Parses each entry as a CIDR range or a single address. The error
    /// names the first bad entry.
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<IpRanges, String> {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for entry in entries {
            let net = parse_range(entry)?;
            match net {
                ipnet::IpNet::V4(net) => {
                    v4.push((u32::from(net.network()), u32::from(net.broadcast())))
                }
                ipnet::IpNet::V6(net) => {
                    v6.push((u128::from(net.network()), u128::from(net.broadcast())))
                }
            }
        }
        Ok(IpRanges {
            v4: merge(v4),
            v6: merge(v6),
        })
    }

    /// Whether no range was given.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// Whether `ip` is in one of the ranges.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match canonical(ip) {
            IpAddr::V4(ip) => covers(&self.v4, u32::from(ip)),
            IpAddr::V6(ip) => covers(&self.v6, u128::from(ip)),
        }
    }
}

/// `ip`, with an IPv4-mapped IPv6 address turned into its IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

fn parse_range(entry: &str) -> Result<ipnet::IpNet, String> {
    let entry = entry.trim();
    if entry.contains('/') {
        let net: ipnet::IpNet = entry.parse().map_err(|_| {
            format!("\"{entry}\" is not an IP range (as 10.0.0.0/8 or 2001:db8::/32)")
        })?;
        // Normalise the IPv4-mapped form so `::ffff:10.0.0.0/104` matches like 10.0.0.0/8.
        if let ipnet::IpNet::V6(v6) = net
            && let Some(v4) = v6.network().to_ipv4_mapped()
            && v6.prefix_len() >= 96
        {
            let net = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map_err(|e| format!("\"{entry}\": {e}"))?;
            return Ok(ipnet::IpNet::V4(net));
        }
        Ok(net.trunc())
    } else {
        let ip: IpAddr = entry
            .parse()
            .map_err(|_| format!("\"{entry}\" is not an IP address or range"))?;
        Ok(ipnet::IpNet::from(canonical(ip)))
    }
}

/// Sorts ranges and merges those that overlap or touch.
fn merge<T: Copy + Ord + Successor>(mut ranges: Vec<(T, T)>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut merged: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if last.1.successor().is_none_or(|next| start <= next) => {
                last.1 = last.1.max(end);
            }
            _ => merged.push((start, end)),
        }
    }
    merged
}

fn covers<T: Copy + Ord>(ranges: &[(T, T)], value: T) -> bool {
    // The last range starting at or before `value`.
    let after = ranges.partition_point(|(start, _)| *start <= value);
    after > 0 && ranges.get(after - 1).is_some_and(|(_, end)| value <= *end)
}

/// The next integer, for merging adjacent ranges.
trait Successor: Sized {
    fn successor(self) -> Option<Self>;
}

impl Successor for u32 {
    fn successor(self) -> Option<u32> {
        self.checked_add(1)
    }
}

impl Successor for u128 {
    fn successor(self) -> Option<u128> {
        self.checked_add(1)
    }
}

/// The client's address: the TCP peer, unless the peer is in `trusted`
/// (a proxy or load balancer in front of the gateway). Then it is the
/// right-most `X-Forwarded-For` entry that is not trusted, as nginx's
/// `real_ip_recursive on`: a client cannot forge its way past the last
/// trusted hop by sending its own `X-Forwarded-For`. When every entry is
/// trusted, the left-most one; when an entry is not an address, the last
/// trusted hop before it. `None` only when the peer address cannot be read.
pub fn client_address(req: &Request, trusted: &IpRanges) -> Option<IpAddr> {
    let peer = req.client_ip().parse().ok()?;
    Some(forwarded_client(req, peer, trusted))
}

/// [`client_address`] for a policy that has read the TCP peer `peer`
/// already (one host call less): the client behind `peer` when `peer` is
/// trusted, else `peer` itself.
pub fn forwarded_client(req: &Request, peer: IpAddr, trusted: &IpRanges) -> IpAddr {
    let peer = canonical(peer);
    if trusted.is_empty() || !trusted.contains(peer) {
        return peer;
    }
    let values = req.header_all("x-forwarded-for");
    let mut client = peer;
    for entry in values.iter().rev().flat_map(|v| v.rsplit(',')) {
        let entry = entry.trim();
        if entry.is_empty() {
            continue;
        }
        let Some(ip) = parse_forwarded_entry(entry) else {
            return client;
        };
        client = ip;
        if !trusted.contains(ip) {
            return ip;
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, optionally `[v6]:port` or `v4:port`.
fn parse_forwarded_entry(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Some(rest) = entry.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok().map(canonical);
    }
    let (host, _port) = entry.rsplit_once(':')?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ranges_match_v4_and_v6() {
        let ranges =
            IpRanges::parse(["10.0.0.0/8", "192.168.1.7", "2001:db8::/32", "::1"]).unwrap();
        assert!(ranges.contains(ip("10.255.0.1")));
        assert!(!ranges.contains(ip("11.0.0.0")));
        assert!(ranges.contains(ip("192.168.1.7")));
        assert!(!ranges.contains(ip("192.168.1.8")));
        assert!(ranges.contains(ip("2001:db8:ffff::1")));
        assert!(!ranges.contains(ip("2001:db9::1")));
        assert!(ranges.contains(ip("::1")));
        assert!(
            ranges.contains(ip("::ffff:10.1.2.3")),
            "mapped v4 matches v4 ranges"
        );
    }

    #[test]
    fn overlapping_and_adjacent_ranges_merge() {
        let ranges =
            IpRanges::parse(["10.0.0.0/24", "10.0.1.0/24", "10.0.0.128/25", "0.0.0.0/0"]).unwrap();
        assert_eq!(ranges.v4, vec![(0, u32::MAX)]);
        let ranges = IpRanges::parse(["10.0.0.0/24", "10.0.1.0/24"]).unwrap();
        assert_eq!(ranges.v4.len(), 1);
        assert!(ranges.contains(ip("10.0.1.255")));
        assert!(!ranges.contains(ip("10.0.2.0")));
    }

    #[test]
    fn a_host_address_with_bits_set_is_its_network() {
        let ranges = IpRanges::parse(["10.1.2.3/16"]).unwrap();
        assert!(ranges.contains(ip("10.1.200.1")));
    }

    #[test]
    fn bad_entries_are_named() {
        let error = IpRanges::parse(["10.0.0.0/8", "10.0.0.0/33"]).unwrap_err();
        assert!(error.contains("10.0.0.0/33"), "{error}");
        let error = IpRanges::parse(["example.com"]).unwrap_err();
        assert!(error.contains("example.com"), "{error}");
    }

    #[test]
    fn forwarded_entries_with_ports() {
        assert_eq!(
            parse_forwarded_entry("203.0.113.7:443"),
            Some(ip("203.0.113.7"))
        );
        assert_eq!(
            parse_forwarded_entry("[2001:db8::1]:80"),
            Some(ip("2001:db8::1"))
        );
        assert_eq!(parse_forwarded_entry("unknown"), None);
    }
}
