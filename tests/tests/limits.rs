//! Listener and route limits: body size (413), header size (431), the time a
//! client has to send its request head, and the connection cap.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use sluice_tests::client::{ChannelBody, H1, channel_body, connect, fetch, get, request};
use sluice_tests::{Manifest, Origin, WAIT, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_over_the_limit_gets_413_without_reaching_the_origin() -> anyhow::Result<()>
{
    let origin = Origin::echo("app").await?;
    let gateway = Manifest::new()
        .listener("web", "max_body_bytes = \"16KiB\"")
        .upstream("app", &[origin.addr()], "")
        .route(
            "small",
            r#"{ path_prefix = "/small/" }"#,
            "app",
            "max_body_bytes = 1024",
        )
        .route("rest", "{}", "app", "")
        .start()
        .await?;
    let addr = gateway.addr("web");

    // The route's limit.
    let reply = fetch(
        addr,
        request("POST", "app.test", "/small/upload", vec![b'x'; 4096]),
    )
    .await?;
    assert_eq!(reply.status, 413, "{}", reply.excerpt());
    // The listener's limit applies where the route sets none.
    let reply = fetch(
        addr,
        request("POST", "app.test", "/big", vec![b'x'; 32 * 1024]),
    )
    .await?;
    assert_eq!(reply.status, 413, "{}", reply.excerpt());
    assert_eq!(
        origin.requests(),
        0,
        "a body known to be too large must not be forwarded"
    );
    assert_eq!(
        origin.connections(),
        0,
        "not even a connection to the origin"
    );

    // At the limit is fine.
    let reply = fetch(
        addr,
        request("POST", "app.test", "/small/upload", vec![b'x'; 1024]),
    )
    .await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    assert_eq!(reply.json()?["body_bytes"], 1024);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_growing_past_the_limit_gets_413() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let gateway = Manifest::simple(origin.addr(), "max_body_bytes = 2048", "")
        .start()
        .await?;

    let (tx, body) = channel_body(16);
    let mut conn = H1::<ChannelBody>::connect(gateway.addr("web")).await?;
    let req = Request::builder()
        .method("POST")
        .uri("/upload")
        .header("host", "app.test")
        .body(body)?;
    // Send 4 KiB in 512-byte chunks without a length; keep the channel open
    // so only the limit, not the end of the body, can finish the exchange.
    for _ in 0..8 {
        tx.send(Bytes::from(vec![b'y'; 512])).await?;
    }
    let response = conn.send(req).await?;
    assert_eq!(response.status(), 413);
    drop(tx);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_within_the_limit_passes() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let gateway = Manifest::simple(origin.addr(), "max_body_bytes = 2048", "")
        .start()
        .await?;

    let (tx, body) = channel_body(16);
    let mut conn = H1::<ChannelBody>::connect(gateway.addr("web")).await?;
    let req = Request::builder()
        .method("POST")
        .uri("/upload")
        .header("host", "app.test")
        .body(body)?;
    for _ in 0..4 {
        tx.send(Bytes::from(vec![b'y'; 512])).await?;
    }
    drop(tx);
    let reply = conn.request(req).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    assert_eq!(reply.json()?["body_bytes"], 2048);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_head_gets_431() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let gateway = Manifest::simple(origin.addr(), "max_header_bytes = \"8KiB\"", "")
        .start()
        .await?;

    let mut req = get("app.test", "/");
    req.headers_mut().insert(
        "x-huge",
        http::HeaderValue::from_bytes(&vec![b'h'; 20 * 1024])?,
    );
    let reply = fetch(gateway.addr("web"), req).await?;
    assert_eq!(reply.status, 431, "{}", reply.excerpt());
    assert_eq!(origin.requests(), 0);

    // A head under the limit is served.
    let mut req = get("app.test", "/");
    req.headers_mut().insert(
        "x-fine",
        http::HeaderValue::from_bytes(&vec![b'h'; 4 * 1024])?,
    );
    let reply = fetch(gateway.addr("web"), req).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_stalls_mid_head_is_disconnected_after_header_read_timeout()
-> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let gateway = Manifest::simple(origin.addr(), "header_read_timeout = \"500ms\"", "")
        .start()
        .await?;

    let mut stream = connect(gateway.addr("web")).await?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Partial: ")
        .await?;
    let started = Instant::now();
    let mut received = Vec::new();
    // EOF (Ok) or a reset (Err) both mean the gateway dropped us.
    let read = within(
        "the gateway to drop a client stuck mid-head",
        Duration::from_secs(5),
        async { stream.read_to_end(&mut received).await },
    )
    .await?;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(400),
        "dropped after {elapsed:?}: sooner than header_read_timeout ({read:?})"
    );
    assert!(
        received.is_empty() || received.starts_with(b"HTTP/1.1 408"),
        "nothing but a 408 may be sent: {:?}",
        String::from_utf8_lossy(&received)
    );
    assert_eq!(origin.requests(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_max_connections_wait_until_one_closes() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let gateway = Manifest::simple(origin.addr(), "max_connections = 2", "")
        .start()
        .await?;
    let addr = gateway.addr("web");

    // Two keep-alive connections, each proven served, then held idle.
    let mut first = H1::connect(addr).await?;
    let mut second = H1::connect(addr).await?;
    assert_eq!(first.request(get("app.test", "/1")).await?.status, 200);
    assert_eq!(second.request(get("app.test", "/2")).await?.status, 200);

    // A third connection: the TCP connect completes (the kernel's backlog)
    // but the gateway does not serve it while two are open.
    let mut third = H1::connect(addr).await?;
    let pending = third.send_unbounded(get("app.test", "/3"));
    tokio::pin!(pending);
    let early = tokio::time::timeout(Duration::from_millis(500), pending.as_mut()).await;
    assert!(
        early.is_err(),
        "the third connection was served while two were open: {early:?}"
    );
    assert_eq!(origin.requests(), 2);

    // Closing one frees a slot; the waiting request is then served.
    drop(first);
    let response = within("the third connection to be served", WAIT, pending).await??;
    assert_eq!(response.status(), 200);

    // The still-open second connection keeps working.
    assert_eq!(second.request(get("app.test", "/4")).await?.status, 200);
    Ok(())
}
