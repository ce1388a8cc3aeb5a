//! The gateway keeps upstream connections alive and reuses them.

use sluice_tests::client::{H1, fetch, get};
use sluice_tests::{Manifest, Origin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_reuse_upstream_connections() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let gateway = Manifest::simple(origin.addr(), "", "keepalive = 8")
        .start()
        .await?;
    let addr = gateway.addr("web");

    // 150 requests on one client connection...
    let mut conn = H1::connect(addr).await?;
    for i in 0..150 {
        let reply = conn.request(get("app.test", &format!("/n/{i}"))).await?;
        assert_eq!(reply.status, 200, "request {i}: {}", reply.excerpt());
    }
    // ...and 50 on a fresh client connection each: the upstream pool is the
    // gateway's, not tied to the client connection.
    for i in 0..50 {
        let reply = fetch(addr, get("app.test", &format!("/fresh/{i}"))).await?;
        assert_eq!(reply.status, 200, "fresh request {i}: {}", reply.excerpt());
    }
    assert_eq!(origin.requests(), 200);
    let connections = origin.connections();
    assert!(
        connections <= 4,
        "200 sequential requests opened {connections} upstream connections"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_zero_opens_a_connection_per_request() -> anyhow::Result<()> {
    // The counterpart: with no idle connections kept, every request connects
    // anew. Shows the count above measures pooling, not chance.
    let origin = Origin::echo("app").await?;
    let gateway = Manifest::simple(origin.addr(), "", "keepalive = 0")
        .start()
        .await?;
    let mut conn = H1::connect(gateway.addr("web")).await?;
    for i in 0..10 {
        let reply = conn.request(get("app.test", &format!("/n/{i}"))).await?;
        assert_eq!(reply.status, 200, "request {i}: {}", reply.excerpt());
    }
    assert_eq!(origin.requests(), 10);
    assert_eq!(origin.connections(), 10);
    Ok(())
}
