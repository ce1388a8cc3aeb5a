//! Header rewriting between client and upstream: hop-by-hop removal,
//! `X-Forwarded-*`, `Via`, `x-request-id`.

use std::io::Write as _;
use std::net::IpAddr;

use http::Version;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;

/// `x-request-id`.
pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one hop, never the message (RFC 9110 §7.6.1).
fn hop_by_hop() -> [&'static HeaderName; 6] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ]
}

/// Removes hop-by-hop headers and every header the `Connection` header
/// names, except `Host`: a client naming it must not make the gateway send an
/// HTTP/1.1 request without one (RFC 9110 §7.6.1 forbids naming a field meant
/// for every recipient; ignoring that token is what keeps the request valid).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Vec::new() does not allocate: the common `Connection: keep-alive` costs nothing.
    let mut named = Vec::new();
    for token in headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
    {
        let standard = ["keep-alive", "close", "upgrade", "host", ""]
            .iter()
            .any(|t| token.eq_ignore_ascii_case(t));
        if !standard && let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
            named.push(name);
        }
    }
    for name in &named {
        headers.remove(name);
    }
    for name in hop_by_hop() {
        headers.remove(name);
    }
}

/// Whether the client asks to switch protocols (WebSocket and other
/// `Upgrade`s); returns the protocol token to pass on.
pub(crate) fn upgrade_request(version: Version, headers: &HeaderMap) -> Option<HeaderValue> {
    if version != Version::HTTP_11 {
        return None;
    }
    let asks = headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
    });
    if asks {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// What the gateway knows about the client hop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientHop<'a> {
    pub(crate) ip: IpAddr,
    pub(crate) https: bool,
    pub(crate) version: Version,
    /// The authority of an absolute-form or HTTP/2 request.
    pub(crate) authority: Option<&'a Authority>,
}

/// Rewrites a client request's headers for the upstream hop.
pub(crate) fn request_headers(
    headers: &mut HeaderMap,
    hop: ClientHop<'_>,
    upgrade: Option<HeaderValue>,
) {
    // The URI's authority overrides Host (RFC 9112 §3.2.2); HTTP/2 requests carry no Host.
    if let Some(authority) = hop.authority
        && let Ok(value) = HeaderValue::from_str(authority.as_str())
    {
        headers.insert(header::HOST, value);
    }
    strip_hop_by_hop(headers);
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }

    // The client's chain as it came (bytes, not text: an entry that is not
    // UTF-8 is kept, as nginx's $proxy_add_x_forwarded_for keeps it), then
    // the client.
    let mut forwarded_for = Vec::with_capacity(64);
    for value in headers.get_all(&X_FORWARDED_FOR) {
        forwarded_for.extend_from_slice(value.as_bytes());
        forwarded_for.extend_from_slice(b", ");
    }
    let _ = write!(forwarded_for, "{}", hop.ip);
    if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(forwarded_for)) {
        headers.insert(&X_FORWARDED_FOR, value);
    }
    headers.insert(
        &X_FORWARDED_PROTO,
        HeaderValue::from_static(if hop.https { "https" } else { "http" }),
    );
    if let Some(host) = headers.get(header::HOST).cloned() {
        headers.insert(&X_FORWARDED_HOST, host);
    }
    let via = match hop.version {
        Version::HTTP_2 => "2 sluice",
        Version::HTTP_10 => "1.0 sluice",
        _ => "1.1 sluice",
    };
    append_via(headers, via);
}

fn append_via(headers: &mut HeaderMap, via: &'static str) {
    match headers.get(header::VIA).and_then(|v| v.to_str().ok()) {
        Some(existing) => {
            if let Ok(value) = HeaderValue::from_str(&format!("{existing}, {via}")) {
                headers.insert(header::VIA, value);
            }
        }
        None => {
            headers.insert(header::VIA, HeaderValue::from_static(via));
        }
    }
}

/// Rewrites an upstream response's headers for the client hop.
pub(crate) fn response_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
}

/// The request's id, set to a new random one when the client sent none.
pub(crate) fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(&X_REQUEST_ID) {
        return id.clone();
    }
    let id = new_request_id();
    headers.insert(&X_REQUEST_ID, id.clone());
    id
}

/// 32 lower-case hex digits of randomness.
fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut random = fastrand::u128(..);
    let mut text = [0u8; 32];
    for byte in &mut text {
        *byte = HEX[(random & 0xf) as usize];
        random >>= 4;
    }
    HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop() -> ClientHop<'static> {
        ClientHop {
            ip: IpAddr::from([10, 0, 0, 7]),
            https: true,
            version: Version::HTTP_11,
            authority: None,
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        request_headers(&mut headers, hop(), None);
        for gone in ["connection", "x-secret", "keep-alive", "te", "upgrade"] {
            assert!(headers.get(gone).is_none(), "{gone} should be stripped");
        }
        assert_eq!(headers["x-kept"], "1");
    }

    #[test]
    fn connection_naming_host_keeps_host_and_forwarded_host() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Host, x-a"));
        headers.insert(header::HOST, HeaderValue::from_static("a.example"));
        headers.insert("x-a", HeaderValue::from_static("1"));
        request_headers(&mut headers, hop(), None);
        assert_eq!(headers[header::HOST], "a.example");
        assert_eq!(headers["x-forwarded-host"], "a.example");
        assert!(headers.get("x-a").is_none());
    }

    #[test]
    fn forwarded_for_appends_to_the_chain() {
        let mut headers = HeaderMap::new();
        headers.append("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        headers.append("x-forwarded-for", HeaderValue::from_static("2.2.2.2"));
        headers.insert(header::HOST, HeaderValue::from_static("a.example"));
        request_headers(&mut headers, hop(), None);
        assert_eq!(headers["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.0.0.7");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(headers["x-forwarded-host"], "a.example");
        assert_eq!(headers["via"], "1.1 sluice");
    }

    #[test]
    fn a_forwarded_for_chain_that_is_not_utf8_is_kept() {
        let mut headers = HeaderMap::new();
        let odd = HeaderValue::from_bytes(b"203.0.113.9, \xe2\x80").expect("obs-text");
        headers.append("x-forwarded-for", odd);
        headers.append("x-forwarded-for", HeaderValue::from_static("198.51.100.2"));
        request_headers(&mut headers, hop(), None);
        assert_eq!(
            headers["x-forwarded-for"].as_bytes(),
            b"203.0.113.9, \xe2\x80, 198.51.100.2, 10.0.0.7"
        );
    }

    #[test]
    fn upgrade_is_kept_only_when_asked_for() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let protocol = upgrade_request(Version::HTTP_11, &headers);
        assert_eq!(
            protocol.as_ref().map(|p| p.as_bytes()),
            Some(&b"websocket"[..])
        );
        request_headers(&mut headers, hop(), protocol);
        assert_eq!(headers["connection"], "upgrade");
        assert_eq!(headers["upgrade"], "websocket");
        assert!(upgrade_request(Version::HTTP_2, &headers).is_none());
    }

    #[test]
    fn request_ids_are_kept_or_made() {
        let mut headers = HeaderMap::new();
        let made = ensure_request_id(&mut headers);
        assert_eq!(made.len(), 32);
        assert_eq!(ensure_request_id(&mut headers), made);
    }
}
