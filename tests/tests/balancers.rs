//! The first-party balancers (`builtin:*`), through real requests to real
//! origins: how requests are spread, how a slow or dead endpoint is
//! avoided, backups, and what `GET /upstreams` shows.
//!
//! Every origin answers with an `x-origin` header naming itself, so a test
//! counts where requests went from the client's side.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request};
use http_body_util::Full;
use sluice_tests::client::{H1, admin_get, get};
use sluice_tests::origin::ORIGIN_HEADER;
use sluice_tests::{Manifest, Mode, Origin, Reply, TestGateway, WAIT, within};

/// Origins called `prefix0`, `prefix1`, ... answering in `mode`.
async fn origins(prefix: &str, n: usize, mode: Mode) -> anyhow::Result<Vec<Origin>> {
    let mut started = Vec::with_capacity(n);
    for i in 0..n {
        started.push(Origin::start(&format!("{prefix}{i}"), mode).await?);
    }
    Ok(started)
}

/// `endpoints = [...]` entries with weights and flags, as inline tables.
fn endpoint_tables(origins: &[&Origin], extra: &[&str]) -> String {
    let list: Vec<String> = origins
        .iter()
        .zip(extra.iter().chain(std::iter::repeat(&"")))
        .map(|(o, x)| {
            let sep = if x.is_empty() { "" } else { ", " };
            format!("{{ addr = \"{}\"{sep}{x} }}", o.addr())
        })
        .collect();
    format!("endpoints = [{}]", list.join(", "))
}

/// A gateway with one route to upstream `app` = `endpoints` (TOML lines),
/// plus extra raw TOML.
async fn gateway(upstream: &str, raw: &str) -> anyhow::Result<TestGateway> {
    Manifest::new()
        .listener("web", "")
        .raw(&format!("[upstream.app]\n{upstream}\n"))
        .raw(raw)
        .route("all", "{}", "app", "")
        .start()
        .await
}

fn origin_of(reply: &Reply) -> String {
    reply.header(ORIGIN_HEADER).unwrap_or("(none)").to_string()
}

/// Sends `n` GETs one after another on one connection; the origins in order.
async fn sequence(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<String>> {
    let mut client: H1 = H1::connect(addr).await?;
    let mut seen = Vec::with_capacity(n);
    for _ in 0..n {
        let reply = client.request(get("app.test", "/")).await?;
        anyhow::ensure!(reply.status == 200, "{}", reply.excerpt());
        seen.push(origin_of(&reply));
    }
    Ok(seen)
}

/// Sends `total` GETs over `clients` concurrent connections; counts per origin.
async fn spread(
    addr: SocketAddr,
    clients: usize,
    total: usize,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let share = total / clients + usize::from(c < total % clients);
        tasks.push(tokio::spawn(sequence(addr, share)));
    }
    let mut counts = BTreeMap::new();
    for task in tasks {
        for origin in task.await?? {
            *counts.entry(origin).or_insert(0) += 1;
        }
    }
    Ok(counts)
}

fn share(counts: &BTreeMap<String, usize>, origin: &str) -> f64 {
    let total: usize = counts.values().sum();
    counts.get(origin).copied().unwrap_or(0) as f64 / total.max(1) as f64
}

fn with_header(name: &'static str, value: &str) -> Request<Full<Bytes>> {
    let mut req = get("app.test", "/");
    req.headers_mut().insert(
        name,
        HeaderValue::from_str(value).expect("valid header value"),
    );
    req
}

/// A connection from client address `ip` (any 127.0.0.0/8 address works on Linux loopback).
async fn client_from(ip: IpAddr, gateway: SocketAddr) -> anyhow::Result<H1> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(ip, 0))?;
    let stream = within("TCP connect", WAIT, socket.connect(gateway)).await??;
    stream.set_nodelay(true)?;
    H1::over(stream).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_rotates_exactly() -> anyhow::Result<()> {
    let all = origins("rr", 3, Mode::Echo).await?;
    let refs: Vec<&Origin> = all.iter().collect();
    let gw = gateway(
        &format!(
            "{}\nbalancer = \"round-robin\"",
            endpoint_tables(&refs, &[])
        ),
        "",
    )
    .await?;
    let seen = sequence(gw.addr("web"), 30).await?;
    assert_eq!(&seen[..3], ["rr0", "rr1", "rr2"], "{seen:?}");
    for (i, origin) in seen.iter().enumerate() {
        assert_eq!(
            origin,
            &seen[i % 3],
            "request {i} broke the rotation: {seen:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_is_smooth_and_exact_over_ten_thousand_requests() -> anyhow::Result<()> {
    let all = origins("w", 3, Mode::Echo).await?;
    let refs: Vec<&Origin> = all.iter().collect();
    let gw = gateway(
        &format!(
            "{}\nbalancer = \"weighted\"",
            endpoint_tables(&refs, &["weight = 5", "weight = 3", "weight = 2"])
        ),
        "",
    )
    .await?;
    let addr = gw.addr("web");

    // One client, in order: never more than the weight in a row.
    let seen = sequence(addr, 1_000).await?;
    let mut run = 1;
    for pair in seen.windows(2) {
        run = if pair[0] == pair[1] { run + 1 } else { 1 };
        let limit = match pair[1].as_str() {
            "w0" => 5,
            "w1" => 3,
            _ => 2,
        };
        assert!(
            run <= limit,
            "{run} requests in a row to {}: {seen:?}",
            pair[1]
        );
    }
    // nginx's smooth WRR never sends even two in a row for 5:3:2.
    assert!(
        seen.windows(2).all(|p| p[0] != p[1] || p[0] == "w0"),
        "{seen:?}"
    );

    // Concurrent clients: the split holds within 2% over 10,000 requests.
    let mut counts = spread(addr, 8, 9_000).await?;
    for origin in seen {
        *counts.entry(origin).or_insert(0) += 1;
    }
    assert_eq!(counts.values().sum::<usize>(), 10_000);
    for (origin, expected) in [("w0", 0.5), ("w1", 0.3), ("w2", 0.2)] {
        let got = share(&counts, origin);
        assert!(
            (got - expected).abs() <= 0.02,
            "{origin}: {got} of traffic, expected {expected}: {counts:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_steers_away_from_a_slow_endpoint() -> anyhow::Result<()> {
    let fast = origins("lr", 2, Mode::Echo).await?;
    let slow = Origin::start("lr-slow", Mode::Delay(Duration::from_millis(200))).await?;
    let gw = gateway(
        &format!(
            "{}\nbalancer = \"least-request\"",
            endpoint_tables(&[&fast[0], &fast[1], &slow], &[])
        ),
        "",
    )
    .await?;
    let counts = spread(gw.addr("web"), 8, 800).await?;
    let slow_share = share(&counts, "lr-slow");
    assert!(
        slow_share < 0.1,
        "the slow endpoint got {slow_share} of traffic: {counts:?}"
    );
    assert!(counts.get("lr0").copied().unwrap_or(0) > 200, "{counts:?}");
    assert!(counts.get("lr1").copied().unwrap_or(0) > 200, "{counts:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_ewma_sends_little_to_a_ten_times_slower_endpoint() -> anyhow::Result<()> {
    let fast = origins("p2c", 2, Mode::Delay(Duration::from_millis(3))).await?;
    let slow = Origin::start("p2c-slow", Mode::Delay(Duration::from_millis(30))).await?;
    let gw = gateway(
        &format!(
            "{}\nbalancer = \"p2c-ewma\"",
            endpoint_tables(&[&fast[0], &fast[1], &slow], &[])
        ),
        "",
    )
    .await?;
    let counts = spread(gw.addr("web"), 4, 600).await?;
    let slow_share = share(&counts, "p2c-slow");
    assert!(
        slow_share < 0.1,
        "the slow endpoint got {slow_share} of traffic: {counts:?}"
    );
    assert!(
        share(&counts, "p2c0") > 0.3 && share(&counts, "p2c1") > 0.3,
        "{counts:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_spreads_evenly() -> anyhow::Result<()> {
    let all = origins("rand", 3, Mode::Echo).await?;
    let refs: Vec<&Origin> = all.iter().collect();
    let gw = gateway(
        &format!("{}\nbalancer = \"random\"", endpoint_tables(&refs, &[])),
        "",
    )
    .await?;
    let counts = spread(gw.addr("web"), 4, 3_000).await?;
    for origin in ["rand0", "rand1", "rand2"] {
        let got = share(&counts, origin);
        assert!(
            (got - 1.0 / 3.0).abs() < 0.05,
            "{origin}: {got}: {counts:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_keeps_each_client_on_one_endpoint() -> anyhow::Result<()> {
    let all = origins("ip", 3, Mode::Echo).await?;
    let refs: Vec<&Origin> = all.iter().collect();
    let gw = gateway(
        &format!("{}\nbalancer = \"ip-hash\"", endpoint_tables(&refs, &[])),
        "",
    )
    .await?;
    let mut placed = BTreeMap::new();
    for last in 1..=30u8 {
        let ip = IpAddr::from([127, 0, 1, last]);
        let mut seen = Vec::new();
        // A new connection each time: affinity follows the address, not the connection.
        for _ in 0..4 {
            let mut client = client_from(ip, gw.addr("web")).await?;
            let reply = client.request(get("app.test", "/")).await?;
            assert_eq!(reply.status, 200, "{}", reply.excerpt());
            seen.push(origin_of(&reply));
        }
        assert!(
            seen.iter().all(|o| o == &seen[0]),
            "client {ip} moved: {seen:?}"
        );
        placed.insert(ip, seen[0].clone());
    }
    let used: std::collections::BTreeSet<&String> = placed.values().collect();
    assert_eq!(
        used.len(),
        3,
        "30 clients should land on every endpoint: {placed:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_moves_few_keys_when_an_endpoint_goes() -> anyhow::Result<()> {
    const N: usize = 5;
    const KEYS: usize = 400;
    let mut all = origins("ch", N, Mode::Echo).await?;
    let refs: Vec<&Origin> = all.iter().collect();
    let gw = gateway(
        &format!(
            "{}\nbalancer = \"hash\"\npassive = {{ max_fails = 1, fail_timeout = \"60s\" }}",
            endpoint_tables(&refs, &[])
        ),
        // A roomy deadline: these tests are about placement, not about a
        // call outliving 10 ms on a CI machine busy with other tests.
        "[plugin.hash]\nsource = \"builtin:consistent-hash\"\nconfig = { key = \"header:x-user\" }\ndeadline = \"1s\"\n",
    )
    .await?;
    let addr = gw.addr("web");
    let mut client: H1 = H1::connect(addr).await?;
    let mut before = HashMap::new();
    for key in 0..KEYS {
        let reply = client
            .request(with_header("x-user", &format!("user-{key}")))
            .await?;
        assert_eq!(reply.status, 200, "{}", reply.excerpt());
        before.insert(key, origin_of(&reply));
    }
    for key in 0..KEYS {
        let reply = client
            .request(with_header("x-user", &format!("user-{key}")))
            .await?;
        assert_eq!(
            origin_of(&reply),
            before[&key],
            "key {key} moved with nothing changed"
        );
    }

    // Take one endpoint away; the first request that meets it marks it down.
    let gone = all.remove(2);
    let gone_name = gone.name().to_string();
    drop(gone);
    let victim = (0..KEYS)
        .find(|k| before[k] == gone_name)
        .expect("some key mapped to the removed endpoint");
    let failed = client
        .request(with_header("x-user", &format!("user-{victim}")))
        .await?;
    assert_eq!(failed.status, 502, "{}", failed.excerpt());

    let mut moved = 0;
    for key in 0..KEYS {
        let reply = client
            .request(with_header("x-user", &format!("user-{key}")))
            .await?;
        assert_eq!(reply.status, 200, "{}", reply.excerpt());
        let now = origin_of(&reply);
        assert_ne!(now, gone_name);
        if before[&key] == gone_name {
            continue;
        }
        if now != before[&key] {
            moved += 1;
        }
    }
    let orphaned = before.values().filter(|o| **o == gone_name).count();
    let total_moved = orphaned + moved;
    let limit = (1.5 / N as f64 * KEYS as f64) as usize;
    assert!(
        total_moved <= limit,
        "{total_moved} of {KEYS} keys moved ({orphaned} had to), limit {limit}"
    );
    Ok(())
}

/// The affinity cookie's `name=value` from a `Set-Cookie` header.
fn cookie_pair(reply: &Reply, name: &str) -> Option<String> {
    reply
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| v.split(';').next().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_cookie_pins_a_client_and_repins_when_its_endpoint_dies() -> anyhow::Result<()> {
    let mut all = origins("sticky", 3, Mode::Echo).await?;
    let refs: Vec<&Origin> = all.iter().collect();
    let gw = gateway(
        &format!(
            "{}\nbalancer = \"sticky\"\npassive = {{ max_fails = 1, fail_timeout = \"60s\" }}",
            endpoint_tables(&refs, &[])
        ),
        "[plugin.sticky]\nsource = \"builtin:sticky-cookie\"\nconfig = { cookie = \"_fly_affinity\", ttl = \"1h\", secure = true }\ndeadline = \"1s\"\n",
    )
    .await?;
    let addr = gw.addr("web");
    let mut client: H1 = H1::connect(addr).await?;

    let first = client.request(get("app.test", "/")).await?;
    assert_eq!(first.status, 200, "{}", first.excerpt());
    let set = first
        .headers
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("the first answer pins the client")
        .to_string();
    assert!(
        set.contains("Max-Age=3600") && set.contains("Secure") && set.contains("Path=/"),
        "{set}"
    );
    let pin = cookie_pair(&first, "_fly_affinity").expect("the affinity cookie");
    let pinned = origin_of(&first);

    for _ in 0..20 {
        let reply = client
            .request(with_header("cookie", &format!("a=b; {pin}")))
            .await?;
        assert_eq!(origin_of(&reply), pinned, "the pinned client moved");
        assert!(
            cookie_pair(&reply, "_fly_affinity").is_none(),
            "a pinned client is not re-pinned"
        );
    }

    // The pinned endpoint dies: after the one failure that marks it down,
    // the client is re-pinned to another endpoint and stays there.
    let index = all
        .iter()
        .position(|o| o.name() == pinned)
        .expect("pinned origin");
    drop(all.remove(index));
    let failed = client.request(with_header("cookie", &pin)).await?;
    assert_eq!(failed.status, 502, "{}", failed.excerpt());
    let moved = client.request(with_header("cookie", &pin)).await?;
    assert_eq!(moved.status, 200, "{}", moved.excerpt());
    let repinned = origin_of(&moved);
    assert_ne!(repinned, pinned);
    let new_pin = cookie_pair(&moved, "_fly_affinity").expect("the client is re-pinned");
    assert_ne!(new_pin, pin);
    for _ in 0..10 {
        let reply = client.request(with_header("cookie", &new_pin)).await?;
        assert_eq!(origin_of(&reply), repinned);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_serve_only_when_every_primary_is_down() -> anyhow::Result<()> {
    for balancer in ["", "balancer = \"round-robin\""] {
        let mut primaries = origins("primary", 2, Mode::Echo).await?;
        let backup = Origin::echo("backup").await?;
        let gw = gateway(
            &format!(
                "{}\n{balancer}\npassive = {{ max_fails = 1, fail_timeout = \"60s\" }}",
                endpoint_tables(
                    &[&primaries[0], &primaries[1], &backup],
                    &["", "", "backup = true"]
                )
            ),
            "[admin]\nlisten = \"127.0.0.1:0\"\n",
        )
        .await?;
        let addr = gw.addr("web");
        let counts = spread(addr, 2, 40).await?;
        assert_eq!(counts.get("backup"), None, "{balancer}: {counts:?}");

        // One primary down: the other takes everything, still no backup.
        drop(primaries.remove(0));
        let mut client: H1 = H1::connect(addr).await?;
        let mut statuses = Vec::new();
        for _ in 0..6 {
            let reply = client.request(get("app.test", "/")).await?;
            statuses.push((reply.status.as_u16(), origin_of(&reply)));
        }
        let failures = statuses.iter().filter(|(s, _)| *s != 200).count();
        assert!(failures <= 1, "{balancer}: {statuses:?}");
        assert!(
            statuses.iter().all(|(s, o)| *s != 200 || o == "primary1"),
            "{balancer}: {statuses:?}"
        );

        // Both down: the backup serves.
        drop(primaries);
        let mut served = Vec::new();
        for _ in 0..6 {
            let reply = client.request(get("app.test", "/")).await?;
            served.push((reply.status.as_u16(), origin_of(&reply)));
        }
        assert!(
            served.iter().filter(|(s, _)| *s != 200).count() <= 1,
            "{balancer}: {served:?}"
        );
        assert!(
            served[2..].iter().all(|(s, o)| *s == 200 && o == "backup"),
            "{balancer}: {served:?}"
        );

        let status = admin_get(gw.admin_addr(), "/upstreams", None).await?;
        assert_eq!(status.status, 200, "{}", status.excerpt());
        let json = status.json()?;
        let endpoints = &json[0]["endpoints"];
        assert_eq!(endpoints[0]["health"], "down", "{json}");
        assert_eq!(endpoints[1]["health"], "down", "{json}");
        assert_eq!(endpoints[2]["health"], "up", "{json}");
        assert_eq!(endpoints[2]["candidate"], true, "{json}");
        assert!(
            endpoints[2]["selected"].as_u64().unwrap_or(0) >= 4,
            "{json}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_upstreams_shows_live_endpoint_state_behind_a_token() -> anyhow::Result<()> {
    let fast = Origin::echo("view0").await?;
    let slow = Origin::start("view1", Mode::Delay(Duration::from_millis(20))).await?;
    let token = "s3cret-token-for-tests";
    let gw = gateway(
        &format!(
            "{}\nbalancer = \"weighted\"",
            endpoint_tables(
                &[&fast, &slow],
                &["weight = 3, labels = { zone = \"a\" }", "weight = 1"]
            )
        ),
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n"),
    )
    .await?;
    spread(gw.addr("web"), 2, 40).await?;

    let admin = gw.admin_addr();
    let refused = admin_get(admin, "/upstreams", None).await?;
    assert_eq!(refused.status, 401, "{}", refused.excerpt());
    assert!(refused.json()?["error"].is_string());
    let wrong = admin_get(admin, "/upstreams", Some("s3cret-token-for-tesTS")).await?;
    assert_eq!(wrong.status, 401, "{}", wrong.excerpt());

    let reply = admin_get(admin, "/upstreams", Some(token)).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    let json = reply.json()?;
    let app = &json[0];
    assert_eq!(app["name"], "app");
    assert_eq!(app["balancer"], "weighted");
    let endpoints = app["endpoints"].as_array().expect("endpoints");
    assert_eq!(endpoints.len(), 2);
    assert_eq!(endpoints[0]["address"], fast.addr().to_string());
    assert_eq!(endpoints[0]["weight"], 3);
    assert_eq!(endpoints[0]["labels"]["zone"], "a");
    assert_eq!(endpoints[0]["health"], "up");
    assert_eq!(endpoints[0]["in_flight"], 0);
    assert_eq!(endpoints[0]["selected"], 30, "{json}");
    assert_eq!(endpoints[1]["selected"], 10, "{json}");
    let slow_ewma = endpoints[1]["latency_ewma_us"].as_u64().unwrap_or(0);
    assert!(
        slow_ewma >= 15_000,
        "the slow endpoint's latency average: {json}"
    );

    let missing = admin_get(admin, "/nope", Some(token)).await?;
    assert_eq!(missing.status, 404);
    Ok(())
}

/// The core rotation passes over an endpoint whose connections are all
/// busy at `max_connections` while another has room (HAProxy's round-robin
/// skips a full server): a stalled backend makes no request wait that the
/// other could serve at once. Here `slow` holds its one connection for
/// 1.5 s; the four requests sent meanwhile all go to `fast` without waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_core_rotation_passes_over_an_endpoint_with_every_connection_busy() -> anyhow::Result<()>
{
    let slow = Origin::start("slow", Mode::Delay(Duration::from_millis(1500))).await?;
    let fast = Origin::echo("fast").await?;
    let gw = gateway(
        &format!(
            "{}\nmax_connections = 1",
            endpoint_tables(&[&slow, &fast], &[])
        ),
        "",
    )
    .await?;
    let addr = gw.addr("web");
    // Requests until one is held at `slow` (the rotation may start at either).
    let mut held = Vec::new();
    while slow.requests() == 0 {
        held.push(tokio::spawn(sequence(addr, 1)));
        within("a request to reach an origin", WAIT, async {
            while slow.requests() == 0 && fast.requests() < held.len() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await?;
    }
    let started = std::time::Instant::now();
    let served = sequence(addr, 4).await?;
    let took = started.elapsed();
    assert_eq!(served, ["fast", "fast", "fast", "fast"], "took {took:?}");
    assert!(took < Duration::from_millis(1000), "{took:?}");
    for request in held {
        let origins = request.await??;
        assert!(origins == ["slow"] || origins == ["fast"], "{origins:?}");
    }
    Ok(())
}

/// Holds one request at each of `origins` (each at `max_connections = 1`),
/// so that every endpoint is full; returns the held requests.
async fn fill(
    addr: SocketAddr,
    origins: &[&Origin],
) -> anyhow::Result<Vec<tokio::task::JoinHandle<anyhow::Result<Vec<String>>>>> {
    let mut held = Vec::new();
    for _ in origins {
        held.push(tokio::spawn(sequence(addr, 1)));
    }
    within("a request held at every origin", WAIT, async {
        while origins.iter().any(|o| o.requests() == 0) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await?;
    Ok(held)
}

/// With every endpoint full, a request waits in the upstream's queue and
/// goes to whichever endpoint frees a connection first (HAProxy's backend
/// queue), not to the one the rotation happens to name: here `slow` holds
/// its one connection for 3 s and `quick` answers each request in 200 ms,
/// so the three requests that found both full are all served by `quick`,
/// one after another, while `slow` is still busy. While they wait,
/// `/upstreams` and `/metrics` count them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_endpoint_full_a_request_waits_for_the_first_to_free() -> anyhow::Result<()> {
    let slow = Origin::start("slow", Mode::Delay(Duration::from_millis(3000))).await?;
    let quick = Origin::start("quick", Mode::Delay(Duration::from_millis(200))).await?;
    let gw = gateway(
        &format!(
            "{}
max_connections = 1",
            endpoint_tables(&[&slow, &quick], &[])
        ),
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .await?;
    let addr = gw.addr("web");
    let held = fill(addr, &[&slow, &quick]).await?;

    let started = std::time::Instant::now();
    let waiting: Vec<_> = (0..3).map(|_| tokio::spawn(sequence(addr, 1))).collect();
    // All three wait: both endpoints are full.
    within("three requests in the upstream's queue", WAIT, async {
        loop {
            let json = admin_get(gw.admin_addr(), "/upstreams", None)
                .await?
                .json()?;
            if json[0]["queued"].as_u64().unwrap_or(0) >= 2 {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await??;
    let metrics = admin_get(gw.admin_addr(), "/metrics", None).await?;
    assert!(
        metrics
            .text()
            .contains("sluice_upstream_queued{upstream=\"app\"}"),
        "{}",
        metrics.excerpt()
    );
    let mut served = Vec::new();
    for request in waiting {
        served.extend(request.await??);
    }
    let took = started.elapsed();
    assert_eq!(served, ["quick", "quick", "quick"], "took {took:?}");
    assert!(took < Duration::from_millis(2500), "{took:?}");
    assert_eq!(slow.requests(), 1, "only the held request reached slow");
    let json = admin_get(gw.admin_addr(), "/upstreams", None)
        .await?
        .json()?;
    assert_eq!(json[0]["queued"], 0, "{json}");
    for request in held {
        request.await??;
    }
    Ok(())
}

/// A request that waits in the upstream's queue past the upstream's
/// `timeout` is answered 503 `queue-timeout` when the timeout passes, and
/// leaves the queue. The endpoints are held by uploads whose clients stall
/// (time waiting for a client does not count against `timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_queued_past_the_upstream_timeout_is_answered_503() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt as _;

    let a = Origin::echo("a").await?;
    let b = Origin::echo("b").await?;
    let gw = gateway(
        &format!(
            "{}\nmax_connections = 1\ntimeout = \"300ms\"",
            endpoint_tables(&[&a, &b], &[])
        ),
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .await?;
    let addr = gw.addr("web");
    let in_flight = || async {
        let json = admin_get(gw.admin_addr(), "/upstreams", None)
            .await?
            .json()?;
        let endpoints = json[0]["endpoints"].as_array().cloned().unwrap_or_default();
        anyhow::Ok(
            endpoints
                .iter()
                .map(|e| e["in_flight"].as_u64().unwrap_or(0))
                .sum::<u64>(),
        )
    };
    let mut uploads = Vec::new();
    for _ in 0..2 {
        let mut upload = tokio::net::TcpStream::connect(addr).await?;
        upload
            .write_all(b"POST / HTTP/1.1\r\nhost: app.test\r\ncontent-length: 100\r\n\r\nabc")
            .await?;
        uploads.push(upload);
    }
    within("both endpoints busy with a stalled upload", WAIT, async {
        while in_flight().await? < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::Ok(())
    })
    .await??;

    let started = std::time::Instant::now();
    let reply = H1::connect(addr)
        .await?
        .request(get("app.test", "/"))
        .await?;
    let took = started.elapsed();
    assert_eq!(reply.status, 503, "{}", reply.excerpt());
    assert!(
        reply.text().contains("no upstream connection came free"),
        "{}",
        reply.excerpt()
    );
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(took < Duration::from_millis(2000), "{took:?}");
    let json = admin_get(gw.admin_addr(), "/upstreams", None)
        .await?
        .json()?;
    assert_eq!(json[0]["queued"], 0, "{json}");
    assert_eq!(
        a.requests() + b.requests(),
        2,
        "only the uploads reached an origin"
    );
    drop(uploads);
    Ok(())
}
