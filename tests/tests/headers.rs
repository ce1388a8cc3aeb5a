//! Header rewriting between client and origin: `X-Forwarded-*`, `Via`,
//! `x-request-id`, and removal of hop-by-hop headers.

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
