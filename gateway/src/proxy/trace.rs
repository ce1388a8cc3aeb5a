//! W3C Trace Context (level 1): every request joins the client's trace or
//! starts one, and the gateway's hop is a span of it.
//!
//! A request with one valid `traceparent` keeps its trace id and sampled
//! flag; the gateway's own span id replaces the parent id, so the upstream
//! sees the gateway as its parent, and `tracestate` passes unchanged. A
//! request without one, or with one that does not parse (or with several),
//! starts a new trace: random trace and span ids, flagged sampled, and any
//! `tracestate` (which belonged to the broken trace) is dropped. The access
//! log names the trace and the gateway's span (`trace_id`, `span_id`).

use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::forward::put_hex;

/// `traceparent`: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate`: vendors' entries, opaque to the gateway.
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The `traceparent` of version 00 is exactly this long.
const HEADER_LEN: usize = 55;

/// The sampled flag: the caller may have recorded trace data.
const SAMPLED: u8 = 0x01;

/// The trace a request belongs to and the gateway's span in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TraceContext {
    /// 16 bytes, never all zero.
    pub(crate) trace_id: u128,
    /// The gateway's span: the parent id it sends upstream. Never zero.
    pub(crate) span_id: u64,
    /// Trace flags as sent upstream (level 1 defines only `sampled`).
    flags: u8,
}

/// What a valid incoming `traceparent` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Parent {
    trace_id: u128,
    flags: u8,
}

impl TraceContext {
    /// Joins the trace of `headers`' `traceparent`, or starts one, and sets
    /// `traceparent` to the gateway's span (see the module docs).
    pub(crate) fn enter(headers: &mut HeaderMap) -> TraceContext {
        let mut values = headers.get_all(&TRACEPARENT).iter();
        let parent = match (values.next(), values.next()) {
            (Some(only), None) => parse(only.as_bytes()),
            _ => None,
        };
        let context = match parent {
            Some(parent) => TraceContext {
                trace_id: parent.trace_id,
                span_id: new_span_id(),
                // Level 1: flags this version does not define are sent as zero.
                flags: parent.flags & SAMPLED,
            },
            None => {
                headers.remove(&TRACESTATE);
                TraceContext {
                    trace_id: new_trace_id(),
                    span_id: new_span_id(),
                    flags: SAMPLED,
                }
            }
        };
        headers.insert(&TRACEPARENT, context.header_value());
        context
    }

    /// The `traceparent` value naming the gateway's span.
    fn header_value(&self) -> HeaderValue {
        let mut text = [b'-'; HEADER_LEN];
        text[..2].copy_from_slice(b"00");
        put_hex(&mut text[3..35], self.trace_id);
        put_hex(&mut text[36..52], u128::from(self.span_id));
        put_hex(&mut text[53..55], u128::from(self.flags));
        // Hex digits and dashes: always a valid header value.
        HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// Reads lowercase hex digits (the spec allows no uppercase).
fn read_hex(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |value, &digit| {
        let nibble = match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            _ => return None,
        };
        Some(value << 4 | u128::from(nibble))
    })
}

/// Parses a `traceparent` value. Version 00 must be exactly 55 bytes; a
/// later version is read by its version-00 fields, and may carry more after
/// a dash. Version `ff`, zero ids and uppercase hex are invalid.
fn parse(value: &[u8]) -> Option<Parent> {
    if value.len() < HEADER_LEN || [value[2], value[35], value[52]] != [b'-'; 3] {
        return None;
    }
    let version = read_hex(&value[..2])?;
    let exact = if version == 0 {
        value.len() == HEADER_LEN
    } else {
        version != 0xff && (value.len() == HEADER_LEN || value[HEADER_LEN] == b'-')
    };
    let trace_id = read_hex(&value[3..35])?;
    let parent_id = read_hex(&value[36..52])?;
    let flags = read_hex(&value[53..55])?;
    (exact && trace_id != 0 && parent_id != 0).then_some(Parent {
        trace_id,
        flags: u8::try_from(flags).ok()?,
    })
}

fn new_trace_id() -> u128 {
    fastrand::u128(1..)
}

fn new_span_id() -> u64 {
    fastrand::u64(1..)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn sent(map: &HeaderMap) -> Parent {
        let values: Vec<_> = map.get_all("traceparent").iter().collect();
        assert_eq!(values.len(), 1, "one traceparent goes upstream: {values:?}");
        parse(values[0].as_bytes()).expect("the gateway sends a valid traceparent")
    }

    #[test]
    fn a_valid_parent_is_joined_with_the_gateway_as_the_new_parent() {
        let mut map = headers(&[("traceparent", CLIENT), ("tracestate", "congo=t61rcWkgMzE")]);
        let context = TraceContext::enter(&mut map);
        assert_eq!(context.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_ne!(context.span_id, 0x00f067aa0ba902b7);
        let value = map["traceparent"].to_str().unwrap().to_string();
        assert_eq!(
            value,
            format!(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-{:016x}-01",
                context.span_id
            )
        );
        assert_eq!(map["tracestate"], "congo=t61rcWkgMzE");
    }

    #[test]
    fn the_sampled_flag_is_kept_and_undefined_flags_are_cleared() {
        let mut map = headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        )]);
        TraceContext::enter(&mut map);
        assert_eq!(sent(&map).flags, 0);
        let mut map = headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff",
        )]);
        TraceContext::enter(&mut map);
        assert_eq!(sent(&map).flags, 0x01);
    }

    #[test]
    fn without_a_parent_a_sampled_trace_starts_and_tracestate_is_dropped() {
        let mut map = headers(&[("tracestate", "congo=t61rcWkgMzE")]);
        let first = TraceContext::enter(&mut map);
        let parent = sent(&map);
        assert_eq!(parent.trace_id, first.trace_id);
        assert_eq!(parent.flags, SAMPLED);
        assert!(map.get("tracestate").is_none());
        let value = map["traceparent"].to_str().unwrap();
        assert_eq!(value.len(), HEADER_LEN);
        assert_eq!(value[36..52], format!("{:016x}", first.span_id));

        let second = TraceContext::enter(&mut HeaderMap::new());
        assert_ne!(
            first.trace_id, second.trace_id,
            "each new trace has its own id"
        );
    }

    #[test]
    fn an_invalid_parent_starts_a_new_trace() {
        let bad = [
            // uppercase hex
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // all-zero trace id, all-zero parent id
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // version ff, version 00 with more after it, too short
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            // wrong separators, not hex
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            // a later version whose extra part does not start with a dash
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ];
        for value in bad {
            let mut map = headers(&[("traceparent", value), ("tracestate", "a=1")]);
            let context = TraceContext::enter(&mut map);
            assert_ne!(
                context.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736,
                "{value} was accepted"
            );
            assert_eq!(sent(&map).trace_id, context.trace_id);
            assert!(map.get("tracestate").is_none(), "{value}: tracestate kept");
        }
    }

    #[test]
    fn two_traceparents_start_a_new_trace() {
        let mut map = headers(&[("traceparent", CLIENT), ("traceparent", CLIENT)]);
        let context = TraceContext::enter(&mut map);
        assert_ne!(context.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(sent(&map).trace_id, context.trace_id);
    }

    #[test]
    fn a_later_version_is_read_by_its_version_00_fields_and_sent_as_00() {
        let mut map = headers(&[(
            "traceparent",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds",
        )]);
        let context = TraceContext::enter(&mut map);
        assert_eq!(context.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert!(map["traceparent"].to_str().unwrap().starts_with("00-4bf9"));
    }
}
