//! Header rewriting between client and upstream: hop-by-hop removal,
//! `X-Forwarded-*`, `Via`, `x-request-id`.

use std::io::Write as _;
use std::net::IpAddr;

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Request, Uri, Version};

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
    // One pass over the names finds which are there: a removal hashes and
    // probes, and most messages carry one of the six at most.
    let hop = hop_by_hop();
    let mut present = [false; 6];
    for name in headers.keys() {
        if let Some(i) = hop.iter().position(|h| *h == name) {
            present[i] = true;
        }
    }
    if present == [false; 6] {
        return;
    }
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
    for (name, present) in hop.into_iter().zip(present) {
        if present {
            headers.remove(name);
        }
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
    let mut text = [0u8; 32];
    put_hex(&mut text, fastrand::u128(..));
    HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// Writes the low `out.len()` hex digits of `value` into `out`, lowercase,
/// most significant first.
pub(super) fn put_hex(out: &mut [u8], mut value: u128) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for digit in out.iter_mut().rev() {
        *digit = HEX[(value & 0xf) as usize];
        value >>= 4;
    }
}

/// Moves an HTTP/1 request's path and header values out of the connection's
/// read buffer into one allocation sized to them.
///
/// hyper parses a request head in place: the URI and every header value are
/// slices of the connection's 8 KiB read buffer, which cannot be reused while
/// any of them lives; when hyper next needs room in it and finds it shared, it
/// allocates another. Copying the few hundred bytes that matter as the request
/// leaves hyper's hands keeps one read buffer per connection. Measured under
/// 10,000 busy connections with `max_header_bytes = "8KiB"`: 313 -> 281 MB
/// RSS (BENCHMARKS.md).
pub(crate) fn detach_head<B>(req: Request<B>) -> Request<B> {
    if req.version() > Version::HTTP_11 {
        return req;
    }
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("", |p| p.as_str());
    let origin_form = parts.uri.scheme().is_none() && parts.uri.authority().is_none();
    let values: usize = parts.headers.values().map(HeaderValue::len).sum();
    let mut head = BytesMut::with_capacity(values + if origin_form { path.len() } else { 0 });
    for value in parts.headers.values() {
        head.extend_from_slice(value.as_bytes());
    }
    if origin_form {
        head.extend_from_slice(path.as_bytes());
    }
    let head = head.freeze();
    let mut at = 0;
    for value in parts.headers.values_mut() {
        let len = value.len();
        let sensitive = value.is_sensitive();
        if let Ok(mut copy) = HeaderValue::from_maybe_shared(head.slice(at..at + len)) {
            copy.set_sensitive(sensitive);
            *value = copy;
        }
        at += len;
    }
    if origin_form && let Ok(uri) = Uri::from_maybe_shared(head.slice(at..)) {
        parts.uri = uri;
    }
    Request::from_parts(parts, body)
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
    fn each_hop_by_hop_header_alone_is_stripped_and_nothing_else() {
        for name in hop_by_hop() {
            let mut headers = HeaderMap::new();
            headers.insert(header::HOST, HeaderValue::from_static("a.example"));
            headers.append(name, HeaderValue::from_static("x"));
            headers.append(name, HeaderValue::from_static("y"));
            headers.insert("x-kept", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut headers);
            assert!(headers.get(name).is_none(), "{name} should be stripped");
            assert_eq!(headers.len(), 2, "only {name} goes");
        }
        let mut untouched = HeaderMap::new();
        untouched.insert(header::HOST, HeaderValue::from_static("a.example"));
        untouched.append("x-a", HeaderValue::from_static("1"));
        untouched.append("x-a", HeaderValue::from_static("2"));
        let before = untouched.clone();
        strip_hop_by_hop(&mut untouched);
        assert_eq!(untouched, before);
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

    #[test]
    fn detached_head_keeps_every_value_and_leaves_the_read_buffer() {
        let buffer = bytes::Bytes::from_static(b"/search?q=1 text/html secret a b");
        let inside = |value: &[u8]| buffer.as_ptr_range().contains(&value.as_ptr());
        let mut secret = HeaderValue::from_maybe_shared(buffer.slice(22..28)).unwrap();
        secret.set_sensitive(true);
        let req = Request::builder()
            .uri(Uri::from_maybe_shared(buffer.slice(0..11)).unwrap())
            .header(
                header::ACCEPT,
                HeaderValue::from_maybe_shared(buffer.slice(12..21)).unwrap(),
            )
            .header(header::AUTHORIZATION, secret)
            .header(
                "x-many",
                HeaderValue::from_maybe_shared(buffer.slice(29..30)).unwrap(),
            )
            .header(
                "x-many",
                HeaderValue::from_maybe_shared(buffer.slice(31..32)).unwrap(),
            )
            .body(())
            .unwrap();
        assert!(inside(req.uri().path().as_bytes()));

        let req = detach_head(req);
        assert_eq!(req.uri(), "/search?q=1");
        assert_eq!(req.headers()[header::ACCEPT], "text/html");
        assert_eq!(req.headers()[header::AUTHORIZATION], "secret");
        assert!(req.headers()[header::AUTHORIZATION].is_sensitive());
        let many: Vec<_> = req.headers().get_all("x-many").iter().collect();
        assert_eq!(many, ["a", "b"]);
        assert!(!inside(req.uri().path().as_bytes()));
        for value in req.headers().values() {
            assert!(
                !inside(value.as_bytes()),
                "{value:?} still points into the read buffer"
            );
        }
    }

    #[test]
    fn absolute_form_and_http2_heads_are_left_as_they_are() {
        let req = Request::builder()
            .uri("http://example.com/a")
            .header(header::ACCEPT, "*/*")
            .body(())
            .unwrap();
        let req = detach_head(req);
        assert_eq!(req.uri(), "http://example.com/a");
        assert_eq!(req.headers()[header::ACCEPT], "*/*");

        let req = Request::builder()
            .version(Version::HTTP_2)
            .uri("/b")
            .body(())
            .unwrap();
        assert_eq!(detach_head(req).uri(), "/b");
    }
}
