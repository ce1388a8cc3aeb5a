//! Health checks and retries, through real gateways and real origins: a
//! backend dies under load and no client notices; checks take an endpoint
//! out and bring it back; retries go elsewhere, back off, respect the
//! method and the body, and stay within their budget.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_tests::client::{H1, admin_get, get, request};
use sluice_tests::origin::ORIGIN_HEADER;
use sluice_tests::{Manifest, Mode, Origin, TestGateway, WAIT, within};

/// A gateway with one route to upstream `app` over `endpoints`, with the
/// upstream's extra lines, and the admin API on a free port.
async fn gateway(endpoints: &[SocketAddr], upstream: &str) -> anyhow::Result<TestGateway> {
    Manifest::new()
        .listener("web", "")
        .raw("[admin]\nlisten = \"127.0.0.1:0\"\n")
        .upstream("app", endpoints, upstream)
        .route("all", "{}", "app", "")
        .start()
        .await
}

/// The endpoints of upstream `app` as `GET /upstreams` shows them.
async fn endpoint_status(gw: &TestGateway) -> anyhow::Result<Vec<serde_json::Value>> {
    let reply = admin_get(gw.admin_addr(), "/upstreams", None).await?;
    let json = reply.json()?;
    let endpoints = json[0]["endpoints"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no endpoints in {json}"))?;
    Ok(endpoints.clone())
}

/// Polls `/upstreams` until endpoint `id`'s field `key` equals `want`.
async fn wait_for_field(
    gw: &TestGateway,
    id: usize,
    key: &str,
    want: &str,
    limit: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let endpoints = endpoint_status(gw).await?;
        if endpoints[id][key] == want {
            return Ok(());
        }
        if started.elapsed() > limit {
            anyhow::bail!(
                "endpoint {id}: {key} is {} after {limit:?}, expected {want}",
                endpoints[id][key]
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_under_load_costs_no_client_request() -> anyhow::Result<()> {
    let a = Origin::echo("a").await?;
    let b = Origin::echo("b").await?;
    let c = Origin::echo("c").await?;
    let c_addr = c.addr();
    let gw = gateway(
        &[a.addr(), b.addr(), c_addr],
        "health = { path = \"/health\", interval = \"100ms\", timeout = \"200ms\", rise = 2, fall = 2 }\n\
         passive = { max_fails = 1, fail_timeout = \"1s\" }\n\
         retries = { attempts = 3, on = [\"connect-failure\", \"reset\"], backoff = \"5ms\" }",
    )
    .await?;
    let addr = gw.addr("web");

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok) = (stop.clone(), ok.clone());
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut client: H1 = H1::connect(addr).await?;
            while !stop.load(Ordering::Relaxed) {
                let reply = client.request(get("app.test", "/")).await?;
                if reply.status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures.push(format!("{} {}", reply.status, reply.excerpt()));
                }
            }
            anyhow::Ok(failures)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_kill = ok.load(Ordering::Relaxed);
    drop(c);
    // Checks notice within `fall` intervals; meanwhile retries cover.
    within("the checks to mark c down", WAIT, async {
        wait_for_field(&gw, 2, "check", "down", WAIT).await
    })
    .await??;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = Origin::builder("c").addr(c_addr).start().await?;
    within("the checks to bring c back", WAIT, async {
        wait_for_field(&gw, 2, "check", "up", WAIT).await
    })
    .await??;
    let back_at = c.requests();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);

    let mut failures = Vec::new();
    for client in clients {
        failures.extend(within("a client to finish", WAIT, client).await???);
    }
    assert!(failures.is_empty(), "client requests failed: {failures:?}");
    let served = ok.load(Ordering::Relaxed);
    assert!(
        before_kill > 20 && served > before_kill + 50,
        "load ran: {before_kill} before the kill, {served} in all"
    );
    assert!(
        c.requests() > back_at,
        "c takes traffic again once back ({} requests)",
        c.requests()
    );
    let health_checks = c
        .last_request()
        .map(|r| r.uri.path().to_string())
        .unwrap_or_default();
    assert!(!health_checks.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_checks_follow_rise_and_fall() -> anyhow::Result<()> {
    let a = Origin::echo("a").await?;
    let b = Origin::echo("b").await?;
    let gw = gateway(
        &[a.addr(), b.addr()],
        "health = { path = \"/ready\", interval = \"50ms\", jitter = \"10ms\", rise = 3, fall = 2, expect = \"200-299\" }",
    )
    .await?;
    within("a check of b", WAIT, b.wait_for_requests(1, WAIT)).await??;
    let seen = b.last_request().expect("a check arrived");
    assert_eq!(seen.uri.path(), "/ready");
    assert_eq!(
        seen.headers.get("user-agent").and_then(|v| v.to_str().ok()),
        Some("sluice-health-check")
    );

    b.set_mode(Mode::Status(503));
    wait_for_field(&gw, 1, "check", "down", WAIT).await?;
    let endpoints = endpoint_status(&gw).await?;
    assert_eq!(endpoints[1]["health"], "down");
    assert_eq!(endpoints[1]["candidate"], false);
    assert_eq!(endpoints[1]["check_error"], "status 503, expected 200-299");

    // While b is down, every request goes to a.
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    for _ in 0..10 {
        let reply = client.request(get("app.test", "/")).await?;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header(ORIGIN_HEADER), Some("a"));
    }

    // Back after `rise` passes in a row: not before 3 intervals.
    let healed = Instant::now();
    b.set_mode(Mode::Echo);
    wait_for_field(&gw, 1, "check", "up", WAIT).await?;
    assert!(
        healed.elapsed() >= Duration::from_millis(80),
        "rise = 3 at 50 ms needs more than one check ({:?})",
        healed.elapsed()
    );
    let endpoints = endpoint_status(&gw).await?;
    assert_eq!(endpoints[1]["check_changes"], 2, "down once, up once");
    assert_eq!(endpoints[0]["check_changes"], 0);
    let mut origins = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let reply = client.request(get("app.test", "/")).await?;
        origins.insert(reply.header(ORIGIN_HEADER).unwrap_or("").to_string());
    }
    assert!(origins.contains("b"), "b serves again: {origins:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_checks_take_a_closed_port_out() -> anyhow::Result<()> {
    let a = Origin::echo("a").await?;
    let b = Origin::echo("b").await?;
    let gw = gateway(
        &[a.addr(), b.addr()],
        "health = { type = \"tcp\", interval = \"50ms\", rise = 1, fall = 1 }",
    )
    .await?;
    wait_for_field(&gw, 1, "check", "up", WAIT).await?;
    drop(b);
    wait_for_field(&gw, 1, "check", "down", WAIT).await?;
    let endpoints = endpoint_status(&gw).await?;
    let error = endpoints[1]["check_error"].as_str().unwrap_or_default();
    assert!(error.starts_with("connect:"), "{error}");
    assert_eq!(a.requests(), 0, "a TCP check sends no request");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_go_to_an_endpoint_not_tried_yet() -> anyhow::Result<()> {
    let bad0 = Origin::start("bad0", Mode::Status(503)).await?;
    let bad1 = Origin::start("bad1", Mode::Status(502)).await?;
    let good = Origin::echo("good").await?;
    let gw = gateway(
        &[bad0.addr(), bad1.addr(), good.addr()],
        "retries = { attempts = 3, on = [\"gateway-error\"], backoff = \"1ms\", budget = { percent = 300 } }",
    )
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    for i in 0..30 {
        let reply = client.request(get("app.test", "/")).await?;
        assert_eq!(reply.status, 200, "request {i}: {}", reply.excerpt());
        assert_eq!(reply.header(ORIGIN_HEADER), Some("good"));
    }
    // Each endpoint is tried at most once per request.
    assert!(bad0.requests() <= 30 && bad1.requests() <= 30);
    assert_eq!(good.requests(), 30);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_answer_is_returned_when_retries_run_out() -> anyhow::Result<()> {
    let bad = Origin::start("bad", Mode::Status(503)).await?;
    let gw = gateway(
        &[bad.addr()],
        "retries = { attempts = 2, on = [\"5xx\"], backoff = \"1ms\" }",
    )
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    let reply = client.request(get("app.test", "/")).await?;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.text(), "status 503\n", "the upstream's own answer");
    assert_eq!(
        bad.requests(),
        2,
        "one endpoint: the retry goes to it again"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_intervals_grow_as_configured() -> anyhow::Result<()> {
    let bad = Origin::start("bad", Mode::Status(503)).await?;
    let gw = gateway(
        &[bad.addr()],
        "retries = { attempts = 4, on = [\"gateway-error\"], backoff = { initial = \"60ms\", multiplier = 2, max = \"150ms\", jitter = 0 } }",
    )
    .await?;
    let reply = H1::connect(gw.addr("web"))
        .await?
        .request(get("app.test", "/"))
        .await?;
    assert_eq!(reply.status, 503);
    let arrivals = bad.arrivals();
    assert_eq!(arrivals.len(), 4);
    let gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    for (gap, want) in gaps.iter().zip([60u64, 120, 150]) {
        let want = Duration::from_millis(want);
        assert!(
            *gap >= want && *gap < want + Duration::from_millis(60),
            "gaps {gaps:?}, expected 60, 120, 150 ms (capped)"
        );
    }

    // With jitter, each wait falls in [w × (1 − jitter), w].
    let bad2 = Origin::start("bad2", Mode::Status(503)).await?;
    let gw2 = gateway(
        &[bad2.addr()],
        "retries = { attempts = 2, on = [\"gateway-error\"], backoff = { initial = \"100ms\", jitter = 0.5 } }",
    )
    .await?;
    let mut client: H1 = H1::connect(gw2.addr("web")).await?;
    for _ in 0..5 {
        client.request(get("app.test", "/")).await?;
    }
    let arrivals = bad2.arrivals();
    for pair in arrivals.chunks(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(50) && gap < Duration::from_millis(160),
            "a jittered 100 ms wait took {gap:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_idempotent_requests_are_retried_only_when_never_sent() -> anyhow::Result<()> {
    // A POST that reached an upstream answering 503 is not sent again.
    let bad = Origin::start("bad", Mode::Status(503)).await?;
    let gw = gateway(
        &[bad.addr()],
        "retries = { attempts = 3, on = [\"5xx\"], backoff = \"1ms\" }",
    )
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    let reply = client
        .request(request("POST", "app.test", "/orders", "one order"))
        .await?;
    assert_eq!(reply.status, 503);
    assert_eq!(bad.requests(), 1, "a POST that arrived is never repeated");
    let reply = client.request(get("app.test", "/")).await?;
    assert_eq!(reply.status, 503);
    assert_eq!(bad.requests(), 4, "a GET is tried three times");

    // A POST whose connection was refused never left: it is retried, body intact.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let good = Origin::echo("good").await?;
    let gw = gateway(
        &[closed, good.addr()],
        "retries = { attempts = 2, on = [\"connect-failure\"], backoff = \"1ms\" }\n\
         passive = { max_fails = 0 }",
    )
    .await?;
    let body = Bytes::from(vec![b'x'; 100_000]);
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    for _ in 0..4 {
        let reply = client
            .request(request("POST", "app.test", "/upload", body.clone()))
            .await?;
        assert_eq!(reply.status, 200, "{}", reply.excerpt());
        let json = reply.json()?;
        assert_eq!(json["origin"], "good");
        assert_eq!(json["body_bytes"], 100_000);
        assert_eq!(
            json["body_sha256"],
            sluice_tests::origin::hex(&<sha2::Sha256 as sha2::Digest>::digest(&body))
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_try_that_times_out_is_retried_elsewhere() -> anyhow::Result<()> {
    let stalled = Origin::start("stalled", Mode::Stall).await?;
    let good = Origin::echo("good").await?;
    let gw = gateway(
        &[stalled.addr(), good.addr()],
        "retries = { attempts = 2, per_try_timeout = \"150ms\", on = [\"reset\"], backoff = \"1ms\" }\n\
         passive = { max_fails = 0 }",
    )
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    for _ in 0..4 {
        let started = Instant::now();
        let reply = client.request(get("app.test", "/")).await?;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header(ORIGIN_HEADER), Some("good"));
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    assert!(stalled.requests() >= 1, "the stalled endpoint was tried");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_caps_retry_amplification_in_a_full_outage() -> anyhow::Result<()> {
    const REQUESTS: usize = 400;
    let down0 = Origin::start("down0", Mode::Status(503)).await?;
    let down1 = Origin::start("down1", Mode::Status(503)).await?;
    let endpoints = [down0.addr(), down1.addr()];
    let budgeted = gateway(
        &endpoints,
        "retries = { attempts = 3, on = [\"gateway-error\"], backoff = \"1ms\", budget = { percent = 20, min_per_sec = 0 } }",
    )
    .await?;
    let sent = load(budgeted.addr("web"), REQUESTS).await?;
    let reached = down0.requests() + down1.requests();
    eprintln!("budget 20%: {reached} requests reached the backends for {REQUESTS} sent");
    assert_eq!(sent, REQUESTS);
    // 20% of the requests, plus the few that may race past the cap.
    let ceiling = REQUESTS + REQUESTS / 5 + 8;
    assert!(
        reached > REQUESTS + REQUESTS / 10 && reached <= ceiling,
        "{reached} requests reached the backends for {REQUESTS} sent (cap {ceiling})"
    );

    // Without the cap the same outage triples the load.
    let (before0, before1) = (down0.requests(), down1.requests());
    let unbounded = gateway(
        &endpoints,
        "retries = { attempts = 3, on = [\"gateway-error\"], backoff = \"1ms\", budget = { percent = 1000 } }",
    )
    .await?;
    load(unbounded.addr("web"), REQUESTS).await?;
    let reached = down0.requests() + down1.requests() - before0 - before1;
    eprintln!("no budget: {reached} requests reached the backends for {REQUESTS} sent");
    assert_eq!(reached, 3 * REQUESTS);
    Ok(())
}

/// Sends `n` GETs over 4 connections; returns how many got an answer.
async fn load(addr: SocketAddr, n: usize) -> anyhow::Result<usize> {
    let mut tasks = Vec::new();
    for c in 0..4 {
        tasks.push(tokio::spawn(async move {
            let mut client: H1 = H1::connect(addr).await?;
            let mut answered = 0;
            for _ in (c..n).step_by(4) {
                client.request(get("app.test", "/")).await?;
                answered += 1;
            }
            anyhow::Ok(answered)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += within("the load to finish", WAIT * 3, task).await???;
    }
    Ok(total)
}
