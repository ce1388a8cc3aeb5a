//! Writing numbers and addresses into strings without `core::fmt`.
//!
//! In a guest, `format!` and `to_string` on numbers go through `core::fmt`'s
//! dynamic dispatch and padding logic: in the gateway's profiles of the
//! builtin plugins that was the largest share of the guests' own time. These
//! write the same text directly.
//!
//! ```
//! use sluice_sdk::text::{push_decimal, push_ip};
//! let mut key = String::from("hits|");
//! push_decimal(&mut key, 42);
//! key.push('|');
//! push_ip(&mut key, "192.0.2.7".parse().unwrap());
//! assert_eq!(key, "hits|42|192.0.2.7");
//! ```

use std::net::IpAddr;

/// Appends `n` in decimal, as `n.to_string()` would.
pub fn push_decimal(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[at..].iter().map(|&d| char::from(d)));
}

/// Appends `ip` as `ip.to_string()` would: dotted decimal for IPv4 without
/// `core::fmt`; IPv6 (rarer, and with its zero-run compression) through
/// `to_string`.
pub fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_decimal(out, u64::from(octet));
            }
        }
        IpAddr::V6(v6) => out.push_str(&v6.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_decimal_writes_what_to_string_does() {
        for n in [0, 7, 10, 99, 100, 4_294_967_296, u64::MAX] {
            let mut text = String::from("k|");
            push_decimal(&mut text, n);
            assert_eq!(text, format!("k|{n}"));
        }
    }

    #[test]
    fn push_ip_writes_what_to_string_does() {
        for ip in [
            "0.0.0.0",
            "10.0.0.1",
            "193.99.144.80",
            "255.255.255.255",
            "::1",
            "2001:db8::7",
            "::ffff:10.1.2.3",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut text = String::new();
            push_ip(&mut text, ip);
            assert_eq!(text, ip.to_string());
        }
    }
}
