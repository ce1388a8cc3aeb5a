//! Header rewriting between client and origin: `X-Forwarded-*`, `Via`,
//! `x-request-id`, W3C `traceparent`, and removal of hop-by-hop headers.

use http::HeaderValue;
use sluice_tests::client::{fetch, get};
use sluice_tests::{Manifest, Origin};

fn header<'a>(seen: &'a http::HeaderMap, name: &str) -> Vec<&'a str> {
    seen.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_are_appended_and_set() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let gateway = Manifest::simple(origin.addr(), "", "").start().await?;

    let mut req = get("shop.example.com:8080", "/cart?id=7");
    req.headers_mut()
        .append("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
    req.headers_mut().append(
        "x-forwarded-for",
        HeaderValue::from_static("198.51.100.2, 192.0.2.1"),
    );
    let reply = fetch(gateway.addr("web"), req).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());

    let seen = origin
        .last_request()
        .ok_or_else(|| anyhow::anyhow!("origin saw no request"))?;
    assert_eq!(
        header(&seen.headers, "x-forwarded-for"),
        ["203.0.113.9, 198.51.100.2, 192.0.2.1, 127.0.0.1"],
        "the client's address is appended to the existing chain"
    );
    assert_eq!(header(&seen.headers, "x-forwarded-proto"), ["http"]);
    assert_eq!(
        header(&seen.headers, "x-forwarded-host"),
        ["shop.example.com:8080"]
    );
    assert_eq!(
        header(&seen.headers, "host"),
        ["shop.example.com:8080"],
        "Host passes through unchanged"
    );
    assert_eq!(header(&seen.headers, "via"), ["1.1 sluice"]);
    assert_eq!(
        seen.uri.path_and_query().map(|p| p.as_str()),
        Some("/cart?id=7")
    );

    let ids = header(&seen.headers, "x-request-id");
    assert_eq!(ids.len(), 1, "exactly one x-request-id: {ids:?}");
    assert!(
        ids[0].len() >= 16,
        "a generated request id should be long enough to be unique: {ids:?}"
    );

    // A second request gets a different id.
    fetch(gateway.addr("web"), get("shop.example.com", "/")).await?;
    let second = origin
        .last_request()
        .ok_or_else(|| anyhow::anyhow!("origin saw no second request"))?;
    assert_ne!(
        header(&second.headers, "x-request-id"),
        ids,
        "request ids must differ"
    );
    assert_eq!(
        header(&second.headers, "x-forwarded-for"),
        ["127.0.0.1"],
        "no chain: just the client"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_request_id_and_via_chain_are_kept() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let gateway = Manifest::simple(origin.addr(), "", "").start().await?;

    let mut req = get("app.test", "/");
    req.headers_mut().insert(
        "x-request-id",
        HeaderValue::from_static("client-chosen-id-42"),
    );
    req.headers_mut()
        .insert("via", HeaderValue::from_static("1.1 edge-cdn"));
    let reply = fetch(gateway.addr("web"), req).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());

    let seen = origin
        .last_request()
        .ok_or_else(|| anyhow::anyhow!("origin saw no request"))?;
    assert_eq!(
        header(&seen.headers, "x-request-id"),
        ["client-chosen-id-42"]
    );
    assert_eq!(header(&seen.headers, "via"), ["1.1 edge-cdn, 1.1 sluice"]);
    Ok(())
}

/// The fields of a `traceparent` the origin saw: trace id, parent id, flags.
fn traceparent(seen: &http::HeaderMap) -> (String, String, String) {
    let values = header(seen, "traceparent");
    assert_eq!(values.len(), 1, "one traceparent upstream: {values:?}");
    let parts: Vec<&str> = values[0].split('-').collect();
    assert_eq!(parts.len(), 4, "{values:?}");
    assert_eq!(parts[0], "00", "{values:?}");
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    assert!(
        hex(parts[1], 32) && parts[1] != "0".repeat(32),
        "{values:?}"
    );
    assert!(
        hex(parts[2], 16) && parts[2] != "0".repeat(16),
        "{values:?}"
    );
    assert!(hex(parts[3], 2), "{values:?}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

/// A request carrying `traceparent` and a vendor's `tracestate`.
fn traced(traceparent: &'static str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut req = get("app.test", "/");
    req.headers_mut()
        .insert("traceparent", HeaderValue::from_static(traceparent));
    req.headers_mut()
        .insert("tracestate", HeaderValue::from_static("congo=t61rcWkgMzE"));
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_is_joined_or_started() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let gateway = Manifest::simple(origin.addr(), "", "").start().await?;
    let seen = |what: &str| {
        origin
            .last_request()
            .ok_or_else(|| anyhow::anyhow!("origin saw no request ({what})"))
    };

    // The client's trace is joined: same trace id and flags, the gateway's
    // span as the parent, tracestate untouched.
    let req = traced("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
    assert_eq!(fetch(gateway.addr("web"), req).await?.status, 200);
    let joined = seen("joined")?;
    let (trace, parent, flags) = traceparent(&joined.headers);
    assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(parent, "00f067aa0ba902b7", "the gateway is the new parent");
    assert_eq!(flags, "00", "the client's sampling decision is kept");
    assert_eq!(header(&joined.headers, "tracestate"), ["congo=t61rcWkgMzE"]);

    // No traceparent: a sampled trace starts; each request its own.
    let mut started = Vec::new();
    for what in ["started", "started again"] {
        let reply = fetch(gateway.addr("web"), get("app.test", "/")).await?;
        assert_eq!(reply.status, 200);
        let (trace, _, flags) = traceparent(&seen(what)?.headers);
        assert_eq!(flags, "01", "{what}");
        started.push(trace);
    }
    assert_ne!(started[0], started[1]);

    // A malformed one (uppercase hex) starts a new trace and drops the
    // broken trace's tracestate.
    let req = traced("00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01");
    assert_eq!(fetch(gateway.addr("web"), req).await?.status, 200);
    let restarted = seen("malformed")?;
    let (trace, _, _) = traceparent(&restarted.headers);
    assert_ne!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(header(&restarted.headers, "tracestate").is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_not_forwarded() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let gateway = Manifest::simple(origin.addr(), "", "").start().await?;

    let mut req = get("app.test", "/");
    let headers = req.headers_mut();
    headers.insert(
        "connection",
        HeaderValue::from_static("keep-alive, x-drop-me"),
    );
    headers.insert("x-drop-me", HeaderValue::from_static("1"));
    headers.insert("keep-alive", HeaderValue::from_static("timeout=5, max=100"));
    headers.insert("te", HeaderValue::from_static("trailers"));
    headers.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
    headers.insert("x-keep-me", HeaderValue::from_static("yes"));
    let reply = fetch(gateway.addr("web"), req).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());

    let seen = origin
        .last_request()
        .ok_or_else(|| anyhow::anyhow!("origin saw no request"))?;
    for gone in [
        "x-drop-me",
        "keep-alive",
        "te",
        "proxy-connection",
        "upgrade",
        "transfer-encoding",
    ] {
        assert!(
            seen.headers.get(gone).is_none(),
            "{gone} reached the origin: {:?}",
            seen.headers
        );
    }
    // The client's Connection header must not be forwarded as sent (the
    // gateway's own hop may say keep-alive, never name x-drop-me).
    for value in header(&seen.headers, "connection") {
        assert!(
            !value.contains("x-drop-me"),
            "client's Connection header leaked: {value}"
        );
    }
    assert_eq!(
        header(&seen.headers, "x-keep-me"),
        ["yes"],
        "end-to-end headers pass through"
    );
    Ok(())
}
