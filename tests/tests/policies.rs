//! Policy plugins in the request path, through real requests: every hook,
//! builtin plugins, and what a misbehaving plugin costs.
//!
//! The probe plugin (`tests/plugins/probe`) is driven by request headers:
//! `x-probe-answer`, `x-probe-steer` and `x-probe-mode` choose what its
//! `on-request` does; see its source for the full list.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::HeaderValue;
use sluice_tests::client::{H1, fetch, get};
use sluice_tests::{Manifest, Origin, TestGateway};

const PROBE: &str = env!("SLUICE_TEST_PROBE_WASM");

/// A plugin name no other test uses: a plugin's state and metrics are kept
/// by name for the whole process.
fn unique(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn probe_table(name: &str, extra: &str) -> String {
    format!("[plugin.{name}]\nsource = \"{PROBE}\"\n{extra}\n")
}

/// One origin, one route through the probe called `name`.
async fn probe_gateway(origin: &Origin, name: &str, extra: &str) -> anyhow::Result<TestGateway> {
    policy_gateway(origin, name, &probe_table(name, extra)).await
}

/// One origin, one route through policy `name`, declared by `plugin_table`
/// (its `[plugin.<name>]` table).
async fn policy_gateway(
    origin: &Origin,
    name: &str,
    plugin_table: &str,
) -> anyhow::Result<TestGateway> {
    Manifest::new()
        .listener("web", "")
        .upstream("app", &[origin.addr()], "")
        .raw(plugin_table)
        .route("all", "{}", "app", &format!("policies = [\"{name}\"]"))
        .start()
        .await
}

fn probe_request(header: &str, value: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut req = get("app.test", "/");
    req.headers_mut().insert(
        http::HeaderName::from_bytes(header.as_bytes()).expect("valid header name"),
        HeaderValue::from_str(value).expect("valid header value"),
    );
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_policy_rewrites_the_request_and_the_response() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let name = unique("probe");
    let gateway = probe_gateway(&origin, &name, "config = { tag = \"v1\" }").await?;

    let reply = fetch(
        gateway.addr("web"),
        probe_request("x-probe-remove", "secret"),
    )
    .await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    let seen = origin.last_request().expect("the origin saw the request");
    assert_eq!(
        seen.headers
            .get("x-probe-tag")
            .and_then(|v| v.to_str().ok()),
        Some("v1"),
        "on-request set a header from its config"
    );
    assert!(
        seen.headers.get("x-probe-remove").is_none(),
        "on-request removed a header"
    );
    assert_eq!(
        reply.header("x-probe-status"),
        Some("200"),
        "on-response saw the upstream's status and set a header"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_answers_without_contacting_the_upstream() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let name = unique("probe");
    let gateway = probe_gateway(&origin, &name, "").await?;

    let reply = fetch(gateway.addr("web"), probe_request("x-probe-answer", "429")).await?;
    assert_eq!(reply.status, 429);
    assert_eq!(reply.header("x-probe"), Some("answered"));
    assert_eq!(reply.text(), "answered by probe\n");
    assert_eq!(origin.requests(), 0, "the upstream never saw the request");

    let bad = fetch(gateway.addr("web"), probe_request("x-probe-answer", "1000")).await?;
    assert_eq!(
        bad.status, 503,
        "an invalid status is a policy error; on_error defaults to closed"
    );
    assert_eq!(origin.requests(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_steers_to_another_upstream() -> anyhow::Result<()> {
    let main = Origin::echo("main").await?;
    let canary = Origin::echo("canary").await?;
    let name = unique("probe");
    let gateway = Manifest::new()
        .listener("web", "")
        .upstream("main", &[main.addr()], "")
        .upstream("canary", &[canary.addr()], "")
        .raw(&probe_table(&name, "on_error = \"open\""))
        .route("all", "{}", "main", &format!("policies = [\"{name}\"]"))
        .start()
        .await?;

    let steered = fetch(
        gateway.addr("web"),
        probe_request("x-probe-steer", "canary"),
    )
    .await?;
    assert_eq!(steered.header("x-origin"), Some("canary"));
    let plain = fetch(gateway.addr("web"), get("app.test", "/")).await?;
    assert_eq!(plain.header("x-origin"), Some("main"));

    // An unknown upstream is a policy error; with on_error = "open" the
    // request goes on to the route's own upstream.
    let unknown = fetch(
        gateway.addr("web"),
        probe_request("x-probe-steer", "nowhere"),
    )
    .await?;
    assert_eq!(unknown.status, 200);
    assert_eq!(unknown.header("x-origin"), Some("main"));
    assert_eq!(gateway.plugin(&name).stats.errors, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_reach_the_policy_after_each_forwarded_request() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let name = unique("probe");
    let gateway = probe_gateway(&origin, &name, "").await?;
    let mut client = H1::connect(gateway.addr("web")).await?;
    for _ in 0..5 {
        let reply = client.request(get("app.test", "/")).await?;
        assert_eq!(reply.status, 200);
    }
    // Answered requests are not forwarded and produce no outcome.
    let answered = client
        .request(probe_request("x-probe-answer", "403"))
        .await?;
    assert_eq!(answered.status, 403);
    client.request(get("app.test", "/")).await?;
    let seen = origin.last_request().expect("the origin saw requests");
    assert_eq!(
        seen.headers
            .get("x-probe-outcomes")
            .and_then(|v| v.to_str().ok()),
        Some("5"),
        "five forwarded requests were reported before the sixth"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_report_upstream_failures() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    // A port with nothing listening: bind, learn the port, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let name = unique("probe");
    let gateway = Manifest::new()
        .listener("web", "")
        .upstream("app", &[origin.addr()], "")
        .upstream("dead", &[dead], "")
        .raw(&probe_table(&name, ""))
        .route(
            "dead",
            "{ path_prefix = \"/dead/\" }",
            "dead",
            &format!("policies = [\"{name}\"]"),
        )
        .route("all", "{}", "app", &format!("policies = [\"{name}\"]"))
        .start()
        .await?;
    let failed = fetch(gateway.addr("web"), get("app.test", "/dead/x")).await?;
    assert_eq!(failed.status, 502);
    fetch(gateway.addr("web"), get("app.test", "/")).await?;
    let seen = origin.last_request().expect("the origin saw a request");
    let last = seen
        .headers
        .get("x-probe-last-outcome")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        last.contains("dead") && last.contains("ConnectFailed"),
        "the failed exchange was reported with its route and error kind: {last:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builtin_round_robin_balancer_rotates() -> anyhow::Result<()> {
    let a = Origin::echo("a").await?;
    let b = Origin::echo("b").await?;
    let c = Origin::echo("c").await?;
    let gateway = Manifest::new()
        .listener("web", "")
        .upstream(
            "app",
            &[a.addr(), b.addr(), c.addr()],
            "balancer = \"round-robin\"",
        )
        .route("all", "{}", "app", "")
        .start()
        .await?;
    let mut order = Vec::new();
    for _ in 0..9 {
        let reply = fetch(gateway.addr("web"), get("app.test", "/")).await?;
        assert_eq!(reply.status, 200, "{}", reply.excerpt());
        order.push(reply.header("x-origin").unwrap_or_default().to_string());
    }
    let cycle = &order[..3];
    let mut distinct = cycle.to_vec();
    distinct.sort();
    assert_eq!(distinct, ["a", "b", "c"], "{order:?}");
    for chunk in order.chunks(3) {
        assert_eq!(chunk, cycle, "each cycle repeats the first: {order:?}");
    }
    let report = gateway.plugin("round-robin");
    assert_eq!(report.source, "builtin:round-robin");
    assert!(report.stats.calls >= 9);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builtin_headers_policy_rewrites_both_ways() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let gateway = policy_gateway(
        &origin,
        "hdr",
        r#"
        [plugin.hdr]
        source = "builtin:headers"
        config = { request = { set = { "x-env" = "prod" }, remove = ["x-debug"] }, response = { add = { "x-served-by" = "sluice" }, remove = ["x-origin"] } }
        "#,
    )
    .await?;
    let reply = fetch(gateway.addr("web"), probe_request("x-debug", "1")).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    let seen = origin.last_request().expect("the origin saw the request");
    assert_eq!(
        seen.headers.get("x-env").and_then(|v| v.to_str().ok()),
        Some("prod")
    );
    assert!(seen.headers.get("x-debug").is_none());
    assert_eq!(reply.header("x-served-by"), Some("sluice"));
    assert_eq!(reply.header("x-origin"), None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headers_policy_with_one_direction_skips_the_other_hook() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let gateway = policy_gateway(
        &origin,
        "hdr-out",
        r#"
        [plugin.hdr-out]
        source = "builtin:headers"
        config = { response = { set = { "x-served-by" = "sluice" } } }
        "#,
    )
    .await?;
    // `init` skipped `on-request`: only `on-response` is ever called.
    assert_eq!(gateway.plugin("hdr-out").hooks, ["on-response"]);
    let before = gateway.plugin("hdr-out").stats.calls;
    for _ in 0..3 {
        let reply = fetch(gateway.addr("web"), probe_request("x-debug", "1")).await?;
        assert_eq!(reply.status, 200, "{}", reply.excerpt());
        assert_eq!(reply.header("x-served-by"), Some("sluice"));
    }
    assert_eq!(gateway.plugin("hdr-out").stats.calls - before, 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_are_pooled_unless_configured_per_request() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let pooled = unique("probe");
    let fresh = unique("probe");
    let gateway = Manifest::new()
        .listener("web", "")
        .upstream("app", &[origin.addr()], "")
        .raw(&probe_table(&pooled, ""))
        .raw(&probe_table(&fresh, "instances = \"per-request\""))
        .route(
            "fresh",
            "{ path_prefix = \"/fresh/\" }",
            "app",
            &format!("policies = [\"{fresh}\"]"),
        )
        .route("all", "{}", "app", &format!("policies = [\"{pooled}\"]"))
        .start()
        .await?;
    let mut client = H1::connect(gateway.addr("web")).await?;
    for _ in 0..40 {
        assert_eq!(client.request(get("app.test", "/")).await?.status, 200);
        assert_eq!(
            client.request(get("app.test", "/fresh/")).await?.status,
            200
        );
    }
    let pooled = gateway.plugin(&pooled).stats;
    let fresh = gateway.plugin(&fresh).stats;
    // Instances are pooled per thread: sequential requests need one on each
    // thread their calls ran on (this test's runtime has two workers, and
    // its `block_on` thread), plus the one made at load.
    assert!(
        pooled.instances <= 4,
        "pooled instances are reused: {pooled:?}"
    );
    assert!(
        fresh.instances >= 40 * 3,
        "per-request makes an instance for each of the three hook calls: {fresh:?}"
    );
    Ok(())
}

/// Sends a request whose policy call misbehaves, then checks the answer, the
/// counters, and that the next requests are served normally.
async fn misbehaviour_costs_one_request(mode: &str, on_error: &str) -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let name = unique("probe");
    let gateway = probe_gateway(
        &origin,
        &name,
        &format!("on_error = \"{on_error}\"\ndeadline = \"50ms\"\nmemory = \"16MiB\""),
    )
    .await?;

    let started = Instant::now();
    let bad = fetch(gateway.addr("web"), probe_request("x-probe-mode", mode)).await?;
    let took = started.elapsed();
    match on_error {
        "closed" => {
            assert_eq!(bad.status, 503, "{mode}: {}", bad.excerpt());
            assert_eq!(
                origin.requests(),
                0,
                "{mode}: a failed-closed request is not forwarded"
            );
        }
        _ => {
            assert_eq!(
                bad.status,
                200,
                "{mode}: fail-open forwards: {}",
                bad.excerpt()
            );
            assert_eq!(origin.requests(), 1);
        }
    }
    assert!(
        took < Duration::from_secs(5),
        "{mode}: the call was stopped (took {took:?})"
    );

    for _ in 0..5 {
        let good = fetch(gateway.addr("web"), get("app.test", "/")).await?;
        assert_eq!(good.status, 200, "{mode}: later requests are served");
    }
    let stats = gateway.plugin(&name).stats;
    assert_eq!(
        stats.errors, 1,
        "{mode}: exactly one failed call: {stats:?}"
    );
    if mode == "loop" {
        assert_eq!(stats.timeouts, 1, "{stats:?}");
    } else {
        assert_eq!(stats.traps, 1, "{stats:?}");
    }
    assert!(
        stats.instances >= 2,
        "{mode}: the failed instance was replaced: {stats:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_policy_costs_one_request() -> anyhow::Result<()> {
    misbehaviour_costs_one_request("loop", "closed").await?;
    misbehaviour_costs_one_request("loop", "open").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allocating_policy_costs_one_request() -> anyhow::Result<()> {
    misbehaviour_costs_one_request("alloc", "closed").await?;
    misbehaviour_costs_one_request("alloc", "open").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_policy_costs_one_request() -> anyhow::Result<()> {
    misbehaviour_costs_one_request("trap", "closed").await?;
    misbehaviour_costs_one_request("trap", "open").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_policy_costs_one_request() -> anyhow::Result<()> {
    misbehaviour_costs_one_request("panic", "closed").await?;
    misbehaviour_costs_one_request("panic", "open").await
}

/// Ordinary requests served back to back on one connection for `window`.
async fn served_within(addr: std::net::SocketAddr, window: Duration) -> anyhow::Result<usize> {
    let mut client = H1::connect(addr).await?;
    let started = Instant::now();
    let mut served = 0;
    while started.elapsed() < window {
        assert_eq!(client.request(get("app.test", "/")).await?.status, 200);
        served += 1;
    }
    Ok(served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_requests_flow_while_a_policy_loops() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let name = unique("probe");
    let gateway = probe_gateway(&origin, &name, "deadline = \"300ms\"").await?;
    let addr = gateway.addr("web");
    let window = Duration::from_millis(300);
    let alone = served_within(addr, window).await?;

    // Two requests each spin a policy call for its whole 300 ms deadline,
    // one per gateway thread. A looping call yields every epoch tick
    // (250 µs) instead of holding its thread, so ordinary requests on the
    // same threads keep going.
    let loops: Vec<_> = (0..2)
        .map(|_| tokio::spawn(fetch(addr, probe_request("x-probe-mode", "loop"))))
        .collect();
    let beside = served_within(addr, window).await?;
    for handle in loops {
        assert_eq!(handle.await??.status, 503);
    }
    // Two spinning calls take most of both cores for the window, so the
    // rest gets a share, not all of it; before calls yielded per tick it
    // was one request in the whole window.
    assert!(
        beside * 10 >= alone,
        "ordinary requests kept flowing beside two looping calls: {beside} vs {alone} alone in {window:?}"
    );
    assert_eq!(gateway.plugin(&name).stats.timeouts, 2);
    Ok(())
}
