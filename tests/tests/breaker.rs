//! `builtin:circuit-breaker` through real requests to real origins: an
//! upstream's breaker opening on consecutive failures, on the failure rate
//! and on the slow-call rate; half-open letting exactly the permitted trial
//! calls through and then closing or opening again; endpoint scope ejecting
//! an outlier (longer each time in a row, never more than
//! `max_ejection_percent`) while traffic fails over; state shared by every
//! pooled instance; and what `GET /upstreams` shows.
//!
//! Each test names its plugin differently: a plugin's state and metrics are
//! kept by name for the whole process, and tests run in parallel.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_tests::client::{H1, get};
use sluice_tests::origin::ORIGIN_HEADER;
use sluice_tests::{Manifest, Mode, Origin, Reply, TestGateway, WAIT, within};

/// A gateway with an admin listener, plugin `name` (the breaker with
/// `config`, an inline TOML table), upstream `app` (its TOML lines) and one
/// route to it through the breaker; `extra` is more raw TOML.
async fn gateway(
    name: &str,
    config: &str,
    upstream: &str,
    extra: &str,
) -> anyhow::Result<TestGateway> {
    Manifest::new()
        .listener("web", "")
        .raw("[admin]\nlisten = \"127.0.0.1:0\"\n")
        .raw(&format!(
            "[plugin.{name}]\nsource = \"builtin:circuit-breaker\"\nconfig = {config}\ndeadline = \"1s\"\n"
        ))
        .raw(&format!("[upstream.app]\n{upstream}\n"))
        .raw(extra)
        .route("all", "{}", "app", &format!("policies = [\"{name}\"]"))
        .start()
        .await
}

/// `endpoints = [...]` for these origins, in order.
fn endpoints(origins: &[&Origin]) -> String {
    let list: Vec<String> = origins
        .iter()
        .map(|o| format!("\"{}\"", o.addr()))
        .collect();
    format!("endpoints = [{}]", list.join(", "))
}

/// `GET /upstreams`, parsed.
async fn upstreams(gateway: &TestGateway) -> anyhow::Result<Value> {
    let mut admin: H1 = H1::connect(gateway.admin_addr()).await?;
    let reply = admin.request(get("admin.test", "/upstreams")).await?;
    anyhow::ensure!(reply.status == 200, "{}", reply.excerpt());
    reply.json()
}

/// Upstream `name` in a `GET /upstreams` answer.
fn upstream<'a>(json: &'a Value, name: &str) -> &'a Value {
    json.as_array()
        .and_then(|all| all.iter().find(|u| u["name"] == name))
        .unwrap_or(&Value::Null)
}

/// The state `plugin` reported for upstream `app` (`null` when none).
fn app_circuit<'a>(json: &'a Value, plugin: &str) -> &'a Value {
    &upstream(json, "app")["circuits"][plugin]
}

fn origin_of(reply: &Reply) -> Option<&str> {
    reply.header(ORIGIN_HEADER)
}

/// Checks `reply` is the breaker's own 503, not the origin's.
fn assert_refused(reply: &Reply, max_retry_after: u64) {
    assert_eq!(reply.status, 503, "{}", reply.excerpt());
    assert_eq!(origin_of(reply), None, "answered by the gateway: {reply:?}");
    let retry_after: u64 = reply
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a whole Retry-After: {reply:?}"));
    assert!(
        (1..=max_retry_after).contains(&retry_after),
        "Retry-After {retry_after}, expected 1..={max_retry_after}"
    );
    assert!(
        reply
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "{reply:?}"
    );
    assert!(
        reply.text().contains("circuit breaker open"),
        "{}",
        reply.excerpt()
    );
}

/// `n` connections to `addr`, opened before they are used.
async fn connections(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<H1>> {
    let mut all = Vec::with_capacity(n);
    for _ in 0..n {
        all.push(H1::connect(addr).await?);
    }
    Ok(all)
}

/// One request on each connection, all at once; the replies in connection order.
async fn burst(clients: Vec<H1>) -> anyhow::Result<(Vec<H1>, Vec<Reply>)> {
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let reply = client.request(get("app.test", "/")).await;
                (client, reply)
            })
        })
        .collect();
    let mut clients = Vec::with_capacity(tasks.len());
    let mut replies = Vec::with_capacity(tasks.len());
    for task in tasks {
        let (client, reply) = within("a burst request", WAIT, task).await??;
        clients.push(client);
        replies.push(reply?);
    }
    Ok((clients, replies))
}

fn count_status(replies: &[Reply], status: u16) -> usize {
    replies.iter().filter(|r| r.status == status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_failures_open_the_upstream_breaker() -> anyhow::Result<()> {
    let name = "cb-consecutive";
    let origin = Origin::start("failing", Mode::Status(500)).await?;
    let gw = gateway(
        name,
        r#"{ consecutive_failures = 5, wait_duration = "60s" }"#,
        &endpoints(&[&origin]),
        "",
    )
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    for i in 0..5 {
        let reply = client.request(get("app.test", "/")).await?;
        assert_eq!(reply.status, 500, "request {i}: {}", reply.excerpt());
        assert_eq!(origin_of(&reply), Some("failing"));
    }
    assert_eq!(origin.requests(), 5);

    for _ in 0..10 {
        let reply = client.request(get("app.test", "/")).await?;
        assert_refused(&reply, 60);
    }
    assert_eq!(origin.requests(), 5, "an open breaker keeps requests away");

    let json = upstreams(&gw).await?;
    let circuit = app_circuit(&json, name);
    assert_eq!(circuit["state"], "open", "{json}");
    assert_eq!(circuit["opened"], 1, "{json}");
    assert_eq!(gw.counter(name, "breaker_opened"), 1);
    assert_eq!(gw.counter(name, "breaker_rejected"), 10);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_rate_over_a_count_window_opens_at_the_threshold() -> anyhow::Result<()> {
    let name = "cb-rate";
    let origin = Origin::echo("flaky").await?;
    let gw = gateway(
        name,
        r#"{ failure_rate = 50, window = 10, minimum_calls = 10, wait_duration = "60s" }"#,
        &endpoints(&[&origin]),
        "",
    )
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    for _ in 0..5 {
        assert_eq!(client.request(get("app.test", "/")).await?.status, 200);
    }
    origin.set_mode(Mode::Status(503));
    // Nine calls, four failed: below the minimum, nothing is judged.
    for _ in 0..4 {
        assert_eq!(client.request(get("app.test", "/")).await?.status, 503);
    }
    let json = upstreams(&gw).await?;
    assert!(app_circuit(&json, name).is_null(), "still closed: {json}");
    // The tenth: 5 of 10 failed, 50% — the threshold itself trips.
    let tenth = client.request(get("app.test", "/")).await?;
    assert_eq!(origin_of(&tenth), Some("flaky"), "{}", tenth.excerpt());
    assert_eq!(origin.requests(), 10);
    for _ in 0..5 {
        let reply = client.request(get("app.test", "/")).await?;
        assert_refused(&reply, 60);
    }
    assert_eq!(origin.requests(), 10);
    let json = upstreams(&gw).await?;
    assert_eq!(app_circuit(&json, name)["state"], "open", "{json}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_count_as_failures() -> anyhow::Result<()> {
    let name = "cb-errors";
    let dead = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        listener.local_addr()?
    };
    let gw = gateway(
        name,
        r#"{ consecutive_failures = 3, wait_duration = "60s" }"#,
        &format!("endpoints = [\"{dead}\"]\npassive = {{ max_fails = 0 }}"),
        "",
    )
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    for _ in 0..3 {
        let reply = client.request(get("app.test", "/")).await?;
        assert_eq!(reply.status, 502, "{}", reply.excerpt());
    }
    let reply = client.request(get("app.test", "/")).await?;
    assert_refused(&reply, 60);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_admits_exactly_the_permitted_calls_then_reopens_or_closes() -> anyhow::Result<()>
{
    let name = "cb-half-open";
    let origin = Origin::start("failing", Mode::Status(500)).await?;
    let gw = gateway(
        name,
        r#"{ consecutive_failures = 5, wait_duration = "1s", permitted_half_open = 4 }"#,
        &endpoints(&[&origin]),
        "",
    )
    .await?;
    let addr = gw.addr("web");
    let mut client: H1 = H1::connect(addr).await?;
    for _ in 0..5 {
        assert_eq!(client.request(get("app.test", "/")).await?.status, 500);
    }
    assert_refused(&client.request(get("app.test", "/")).await?, 1);
    assert_eq!(origin.requests(), 5);

    // After the wait, 20 requests at once: 4 trial calls reach the
    // (still failing) origin, the other 16 are refused. (With fewer trial
    // calls than `consecutive_failures`, the trial ends only when all of
    // them are in, so every permit is handed out first.)
    let clients = connections(addr, 20).await?;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let (_clients, replies) = burst(clients).await?;
    assert_eq!(count_status(&replies, 500), 4, "{replies:?}");
    assert_eq!(count_status(&replies, 503), 16, "{replies:?}");
    for reply in replies.iter().filter(|r| r.status == 503) {
        assert_refused(reply, 1);
    }
    assert_eq!(origin.requests(), 5 + 4);
    let json = upstreams(&gw).await?;
    assert_eq!(app_circuit(&json, name)["state"], "open", "{json}");
    assert_eq!(app_circuit(&json, name)["opened"], 2, "{json}");

    // The origin recovers; after the next wait, 4 good trial calls close it.
    origin.set_mode(Mode::Echo);
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let first = client.request(get("app.test", "/")).await?;
    assert_eq!(first.status, 200, "{}", first.excerpt());
    let json = upstreams(&gw).await?;
    assert_eq!(app_circuit(&json, name)["state"], "half-open", "{json}");
    for _ in 0..3 {
        assert_eq!(client.request(get("app.test", "/")).await?.status, 200);
    }
    let json = upstreams(&gw).await?;
    assert_eq!(app_circuit(&json, name)["state"], "closed", "{json}");
    for _ in 0..20 {
        assert_eq!(client.request(get("app.test", "/")).await?.status, 200);
    }
    assert_eq!(origin.requests(), 5 + 4 + 4 + 20);
    assert_eq!(gw.counter(name, "breaker_opened"), 2);
    assert_eq!(gw.counter(name, "breaker_closed"), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_calls_open_the_breaker() -> anyhow::Result<()> {
    let name = "cb-slow";
    let origin = Origin::echo("sluggish").await?;
    let gw = gateway(
        name,
        r#"{ slow_call_rate = 50, slow_call_duration = "250ms", failure_rate = 0, window = 4, wait_duration = "60s" }"#,
        &endpoints(&[&origin]),
        "",
    )
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    for _ in 0..3 {
        assert_eq!(client.request(get("app.test", "/")).await?.status, 200);
    }
    origin.set_mode(Mode::Delay(Duration::from_millis(500)));
    // One slow call in the last four: 25%.
    assert_eq!(client.request(get("app.test", "/")).await?.status, 200);
    let json = upstreams(&gw).await?;
    assert!(app_circuit(&json, name).is_null(), "still closed: {json}");
    // Two in the last four: 50% trips (slow successes are still served).
    assert_eq!(client.request(get("app.test", "/")).await?.status, 200);
    let started = Instant::now();
    let reply = client.request(get("app.test", "/")).await?;
    assert_refused(&reply, 60);
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "refused without waiting for the slow origin"
    );
    assert_eq!(origin.requests(), 5);
    let json = upstreams(&gw).await?;
    assert_eq!(app_circuit(&json, name)["state"], "open", "{json}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_scope_ejects_the_outlier_and_fails_over() -> anyhow::Result<()> {
    let name = "cb-eject";
    let ok0 = Origin::echo("ok0").await?;
    let ok1 = Origin::echo("ok1").await?;
    let bad = Origin::start("bad", Mode::Status(500)).await?;
    let gw = gateway(
        name,
        r#"{ scope = "endpoint", consecutive_failures = 3, failure_rate = 0, slow_call_rate = 0, wait_duration = "60s" }"#,
        &endpoints(&[&ok0, &ok1, &bad]),
        "",
    )
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    let mut sent = 0;
    while bad.requests() < 3 {
        anyhow::ensure!(sent < 30, "the bad endpoint got {} of 30", bad.requests());
        let reply = client.request(get("app.test", "/")).await?;
        let expected = if origin_of(&reply) == Some("bad") {
            500
        } else {
            200
        };
        assert_eq!(reply.status, expected, "{}", reply.excerpt());
        sent += 1;
    }
    for _ in 0..30 {
        let reply = client.request(get("app.test", "/")).await?;
        assert_eq!(reply.status, 200, "{}", reply.excerpt());
        assert_ne!(origin_of(&reply), Some("bad"));
    }
    assert_eq!(bad.requests(), 3, "ejected after exactly 3 failures");

    let json = upstreams(&gw).await?;
    let list = &upstream(&json, "app")["endpoints"];
    let ejected = &list[2];
    assert_eq!(ejected["address"], bad.addr().to_string());
    assert_eq!(ejected["outlier_ejections"], 1, "{json}");
    assert_eq!(ejected["candidate"], false, "{json}");
    assert_eq!(ejected["health"], "down", "{json}");
    let left = ejected["ejected_for_ms"].as_u64().unwrap_or(0);
    assert!((50_000..=60_000).contains(&left), "{json}");
    assert_eq!(ejected["circuits"][name]["state"], "open", "{json}");
    for healthy in [&list[0], &list[1]] {
        assert_eq!(healthy["candidate"], true, "{json}");
        assert_eq!(healthy["outlier_ejections"], 0, "{json}");
        assert!(healthy["circuits"].is_null(), "{json}");
    }
    assert!(
        app_circuit(&json, name).is_null(),
        "endpoint scope reports per endpoint: {json}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ejection_percent_keeps_enough_endpoints_in_service() -> anyhow::Result<()> {
    let name = "cb-max-percent";
    let ok = Origin::echo("ok").await?;
    let bad1 = Origin::start("bad1", Mode::Status(500)).await?;
    let bad2 = Origin::start("bad2", Mode::Status(500)).await?;
    let gw = gateway(
        name,
        r#"{ scope = "endpoint", consecutive_failures = 2, failure_rate = 0, slow_call_rate = 0, wait_duration = "60s", max_ejection_percent = 34 }"#,
        &endpoints(&[&ok, &bad1, &bad2]),
        "",
    )
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    let mut failures = 0;
    for _ in 0..30 {
        let reply = client.request(get("app.test", "/")).await?;
        failures += usize::from(reply.status == 500);
    }
    let json = upstreams(&gw).await?;
    let list = upstream(&json, "app")["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let ejected: Vec<&Value> = list.iter().filter(|e| e["candidate"] == false).collect();
    assert_eq!(
        ejected.len(),
        1,
        "one of three is 33% ≤ 34%, two are not: {json}"
    );
    assert_eq!(ejected[0]["outlier_ejections"], 1, "{json}");
    assert_eq!(ejected[0]["circuits"][name]["state"], "open", "{json}");
    let kept = if ejected[0]["address"] == bad1.addr().to_string() {
        &bad2
    } else {
        &bad1
    };
    let kept_status = list
        .iter()
        .find(|e| e["address"] == kept.addr().to_string())
        .cloned()
        .unwrap_or_default();
    assert_eq!(kept_status["outlier_ejections"], 0, "{json}");
    assert_eq!(kept_status["candidate"], true, "{json}");
    assert!(
        kept.requests() > 5,
        "the failing endpoint that could not be ejected still serves: {}",
        kept.requests()
    );
    assert!(failures > 5, "{failures}");
    assert!(gw.counter(name, "breaker_eject_refused") >= 1);
    assert_eq!(gw.counter(name, "breaker_opened"), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejected_endpoint_is_tried_again_ejected_longer_and_closes_when_it_recovers()
-> anyhow::Result<()> {
    let name = "cb-readmit";
    let ok = Origin::echo("ok").await?;
    let flaky = Origin::start("flaky", Mode::Status(500)).await?;
    let gw = gateway(
        name,
        r#"{ scope = "endpoint", consecutive_failures = 2, failure_rate = 0, slow_call_rate = 0, wait_duration = "1s", permitted_half_open = 2 }"#,
        &endpoints(&[&ok, &flaky]),
        "",
    )
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    /// Sends requests until `origin` has seen `count` (at most 20 more).
    async fn until(client: &mut H1, origin: &Origin, count: usize) -> anyhow::Result<()> {
        for _ in 0..20 {
            if origin.requests() >= count {
                return Ok(());
            }
            client.request(get("app.test", "/")).await?;
        }
        anyhow::bail!(
            "{} saw {} requests, expected {count}",
            origin.name(),
            origin.requests()
        )
    }

    until(&mut client, &flaky, 2).await?;
    let json = upstreams(&gw).await?;
    let endpoint = &upstream(&json, "app")["endpoints"][1];
    assert_eq!(endpoint["outlier_ejections"], 1, "{json}");
    assert!(
        endpoint["ejected_for_ms"].as_u64().unwrap_or(0) <= 1_000,
        "{json}"
    );
    assert_eq!(endpoint["circuits"][name]["state"], "open", "{json}");

    // Back after 1 s, still failing: its two trial calls eject it again, for 2 s.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    until(&mut client, &flaky, 4).await?;
    let json = upstreams(&gw).await?;
    let endpoint = &upstream(&json, "app")["endpoints"][1];
    assert_eq!(endpoint["outlier_ejections"], 2, "{json}");
    let left = endpoint["ejected_for_ms"].as_u64().unwrap_or(0);
    assert!(
        (1_000..=2_000).contains(&left),
        "the second ejection in a row lasts twice as long: {json}"
    );
    assert_eq!(endpoint["circuits"][name]["state"], "open", "{json}");
    assert_eq!(endpoint["circuits"][name]["opened"], 2, "{json}");
    for _ in 0..5 {
        let reply = client.request(get("app.test", "/")).await?;
        assert_eq!(origin_of(&reply), Some("ok"), "{}", reply.excerpt());
    }
    assert_eq!(flaky.requests(), 4);

    // It recovers: after its ejection, two good trial calls close the breaker.
    flaky.set_mode(Mode::Echo);
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    for _ in 0..10 {
        let reply = client.request(get("app.test", "/")).await?;
        assert_eq!(reply.status, 200, "{}", reply.excerpt());
    }
    assert!(flaky.requests() >= 4 + 2, "{}", flaky.requests());
    let json = upstreams(&gw).await?;
    let endpoint = &upstream(&json, "app")["endpoints"][1];
    assert_eq!(endpoint["circuits"][name]["state"], "closed", "{json}");
    assert_eq!(endpoint["candidate"], true, "{json}");
    assert!(endpoint["ejected_for_ms"].is_null(), "{json}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn state_is_shared_by_every_pooled_instance() -> anyhow::Result<()> {
    let name = "cb-pooled";
    let origin = Origin::echo("app").await?;
    let gw = gateway(
        name,
        r#"{ consecutive_failures = 5, wait_duration = "60s" }"#,
        &endpoints(&[&origin]),
        "",
    )
    .await?;
    let addr = gw.addr("web");
    let mut clients = connections(addr, 8).await?;

    // Concurrent traffic grows the plugin's instance pool: only calls that
    // overlap make new instances, and a breaker call takes microseconds, so
    // this may take many bursts on a busy machine (up to 10 s of them).
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if gw.plugin(name).stats.instances >= 3 {
            break;
        }
        let (back, replies) = burst(clients).await?;
        clients = back;
        assert_eq!(count_status(&replies, 200), replies.len(), "{replies:?}");
    }
    let instances = gw.plugin(name).stats.instances;
    assert!(
        instances >= 3,
        "concurrency should have made several instances: {instances}"
    );

    // Sequential failures, each on the next connection: the pool hands out
    // its instances in turn, so several instances see them; still exactly
    // five reach the origin.
    origin.set_mode(Mode::Status(500));
    let before = origin.requests();
    let mut statuses = Vec::new();
    for i in 0..16 {
        let reply = clients[i % 8].request(get("app.test", "/")).await?;
        statuses.push(reply.status.as_u16());
    }
    assert_eq!(origin.requests() - before, 5, "{statuses:?}");
    assert_eq!(&statuses[..5], &[500; 5]);
    assert!(statuses[5..].iter().all(|s| *s == 503), "{statuses:?}");

    let (_, replies) = burst(clients).await?;
    assert_eq!(count_status(&replies, 503), 8, "{replies:?}");
    assert_eq!(origin.requests() - before, 5);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_failures_open_the_breaker_once() -> anyhow::Result<()> {
    let name = "cb-concurrent";
    let origin = Origin::start("failing", Mode::Status(500)).await?;
    let gw = gateway(
        name,
        r#"{ consecutive_failures = 5, wait_duration = "60s" }"#,
        &endpoints(&[&origin]),
        "",
    )
    .await?;
    let addr = gw.addr("web");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                let mut client: H1 = H1::connect(addr).await?;
                let mut statuses = Vec::new();
                for _ in 0..10 {
                    statuses.push(client.request(get("app.test", "/")).await?.status.as_u16());
                }
                anyhow::Ok(statuses)
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(within("a client", WAIT, task).await???);
    }
    let hits = origin.requests();
    // Five failures trip it; each of the seven other connections may have
    // had one request past the check at that moment.
    assert!(
        (5..=12).contains(&hits),
        "{hits} requests reached the origin"
    );
    assert_eq!(all.iter().filter(|s| **s == 500).count(), hits);
    assert_eq!(all.iter().filter(|s| **s == 503).count(), 80 - hits);
    let json = upstreams(&gw).await?;
    assert_eq!(
        app_circuit(&json, name)["opened"],
        1,
        "one transition: {json}"
    );
    assert_eq!(gw.counter(name, "breaker_opened"), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_open_can_steer_to_a_fallback_upstream() -> anyhow::Result<()> {
    let name = "cb-steer";
    let failing = Origin::start("failing", Mode::Status(500)).await?;
    let backup = Origin::echo("backup").await?;
    let gw = gateway(
        name,
        r#"{ consecutive_failures = 3, wait_duration = "60s", when_open = { steer = "fallback" } }"#,
        &endpoints(&[&failing]),
        &format!("[upstream.fallback]\nendpoints = [\"{}\"]\n", backup.addr()),
    )
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    for _ in 0..3 {
        assert_eq!(client.request(get("app.test", "/")).await?.status, 500);
    }
    for _ in 0..5 {
        let reply = client.request(get("app.test", "/")).await?;
        assert_eq!(reply.status, 200, "{}", reply.excerpt());
        assert_eq!(origin_of(&reply), Some("backup"));
    }
    assert_eq!(failing.requests(), 3);
    assert_eq!(gw.counter(name, "breaker_steered"), 5);
    let json = upstreams(&gw).await?;
    assert_eq!(app_circuit(&json, name)["state"], "open", "{json}");
    assert!(
        upstream(&json, "fallback")["circuits"].is_null(),
        "the fallback's own breaker stays closed: {json}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_is_refused_naming_the_key() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    for (config, key) in [
        (
            r#"{ window = 10, window_duration = "10s" }"#,
            "window_duration",
        ),
        (r#"{ failure_rate = 150 }"#, "failure_rate"),
        (r#"{ wait_duration = 60 }"#, "wait_duration"),
        (
            r#"{ scope = "endpoint", when_open = "reject" }"#,
            "when_open",
        ),
        (r#"{ max_ejection_percent = 10 }"#, "max_ejection_percent"),
        (r#"{ trip_after = 5 }"#, "trip_after"),
    ] {
        let error = gateway("cb-bad", config, &endpoints(&[&origin]), "")
            .await
            .map(drop)
            .expect_err(config);
        let message = format!("{error:#}");
        assert!(message.contains(key), "{config}: {message}");
    }
    Ok(())
}
