//! `idle_timeout`: a client connection with no request in flight is closed
//! after the timeout, on HTTP/1.1 and HTTP/2; one with a slow request in
//! flight is not.

use std::time::{Duration, Instant};

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice_tests::client::{H1, connect, get};
use sluice_tests::{Manifest, Mode, Origin, WAIT, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Waits for `closed` (the connection ending) and checks that the idle
/// timeout did it: not before ~300 ms, and long before header_read_timeout (10 s).
async fn closed_by_idle_timeout<T>(closed: impl Future<Output = T>) -> anyhow::Result<T> {
    let idle_from = Instant::now();
    let ended = within(
        "the idle connection to be closed",
        Duration::from_secs(5),
        closed,
    )
    .await?;
    let closed_after = idle_from.elapsed();
    assert!(
        closed_after >= Duration::from_millis(250),
        "closed too early: {closed_after:?}"
    );
    Ok(ended)
}

const IDLE: &str = "idle_timeout = \"300ms\"\nheader_read_timeout = \"10s\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connection_is_closed_after_idle_timeout() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let gateway = Manifest::simple(origin.addr(), IDLE, "").start().await?;
    let stream = connect(gateway.addr("web")).await?;
    let (mut sender, connection) = within(
        "HTTP/2 handshake",
        WAIT,
        http2::handshake(TokioExecutor::new(), TokioIo::new(stream)),
    )
    .await??;
    let connection = tokio::spawn(connection);
    let uri = "http://app.test/first";
    let response = within(
        "response",
        WAIT,
        sender.send_request(
            http::Request::get(uri).body(http_body_util::Empty::<bytes::Bytes>::new())?,
        ),
    )
    .await??;
    assert_eq!(response.status(), 200);
    drop(response);

    // The server's GOAWAY ends the client connection future.
    let _ = closed_by_idle_timeout(connection).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http1_keepalive_connection_is_closed_after_idle_timeout() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let gateway = Manifest::simple(origin.addr(), IDLE, "").start().await?;
    let mut stream = connect(gateway.addr("web")).await?;
    stream
        .write_all(b"GET /a HTTP/1.1\r\nhost: app.test\r\n\r\n")
        .await?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = within("response", WAIT, stream.read(&mut buf)).await??;
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    let mut rest = Vec::new();
    closed_by_idle_timeout(stream.read_to_end(&mut rest)).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_in_flight_keeps_its_connection_past_idle_timeout() -> anyhow::Result<()> {
    let origin = Origin::start("slow", Mode::Delay(Duration::from_millis(1200))).await?;
    let gateway = Manifest::simple(origin.addr(), IDLE, "").start().await?;
    let mut client: H1 = H1::connect(gateway.addr("web")).await?;
    let reply = client.request(get("app.test", "/slow")).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    // And the same connection still serves a second request right away.
    let reply = client.request(get("app.test", "/again")).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    Ok(())
}
