//! `builtin:rate-limit` through real requests to a real origin: a rate with
//! `nodelay` admitting its burst and then the rate (within 5%) under
//! concurrent keep-alive clients; a rate without `nodelay` pacing its burst
//! at the origin; tiers with their own rates and budgets; keys by API key,
//! header pair and `X-Forwarded-For` behind trusted proxies; the
//! `RateLimit-*` headers; a sliding window of N requests per T; and bad
//! configs refused with the key named.
//!
//! Each test names its plugin differently: a plugin's state is kept by
//! name for the whole process, and tests run in parallel.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sluice_tests::client::{H1, get};
use sluice_tests::origin::ORIGIN_HEADER;
use sluice_tests::{Manifest, Origin, Reply, TestGateway, WAIT, within};

/// A gateway with plugin `name` (the rate limit with `config`, an inline
/// TOML table) on one catch-all route to `origin`.
async fn gateway(name: &str, config: &str, origin: &Origin) -> anyhow::Result<TestGateway> {
    Manifest::new()
        .listener("web", "")
        .raw(&plugin(name, config))
        .upstream("app", &[origin.addr()], "")
        .route("all", "{}", "app", &format!("policies = [\"{name}\"]"))
        .start()
        .await
}

/// `[plugin.NAME]` for the rate limit with `config`. The deadline is
/// generous: a noisy machine must not turn a slow call into a skipped policy.
fn plugin(name: &str, config: &str) -> String {
    format!(
        "[plugin.{name}]\nsource = \"builtin:rate-limit\"\nconfig = {config}\ndeadline = \"1s\"\non_error = \"closed\"\n"
    )
}

/// A gateway with plugins `first` and `second` (name and config each):
/// requests with `x-route: <first's name>` go through `first`, the others
/// through `second`.
async fn two_plugins(
    origin: &Origin,
    first: (&str, &str),
    second: (&str, &str),
) -> anyhow::Result<TestGateway> {
    Manifest::new()
        .listener("web", "")
        .raw(&plugin(first.0, first.1))
        .raw(&plugin(second.0, second.1))
        .upstream("app", &[origin.addr()], "")
        .route(
            first.0,
            &format!("{{ headers = {{ \"x-route\" = \"{}\" }} }}", first.0),
            "app",
            &format!("policies = [\"{}\"]", first.0),
        )
        .route(
            second.0,
            "{}",
            "app",
            &format!("policies = [\"{}\"]", second.0),
        )
        .start()
        .await
}

/// `GET /` with `headers`.
async fn send(client: &mut H1, headers: &[(&str, &str)]) -> anyhow::Result<Reply> {
    let mut request = get("app.test", "/");
    for (name, value) in headers {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes())?,
            value.parse()?,
        );
    }
    client.request(request).await
}

/// How many of `n` requests with `headers`, one after another, are admitted
/// (checking each reply is the origin's 200 or the limit's 429).
async fn admitted(client: &mut H1, n: usize, headers: &[(&str, &str)]) -> anyhow::Result<usize> {
    let mut admitted = 0;
    for _ in 0..n {
        let reply = send(client, headers).await?;
        match reply.status.as_u16() {
            200 => {
                assert!(reply.header(ORIGIN_HEADER).is_some(), "{reply:?}");
                admitted += 1;
            }
            429 => assert_eq!(reply.header(ORIGIN_HEADER), None, "{reply:?}"),
            _ => panic!("unexpected {}", reply.excerpt()),
        }
    }
    Ok(admitted)
}

/// A whole-number header.
fn number(reply: &Reply, name: &str) -> u64 {
    reply
        .header(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no whole {name} in {reply:?}"))
}

/// Checks `reply` is the limit's own 429 with `RateLimit-Limit: limit`,
/// nothing remaining, `Retry-After` and `RateLimit-Reset` within bounds.
fn assert_limited(reply: &Reply, limit: u64, retry_after: (u64, u64), reset: (u64, u64)) {
    assert_eq!(reply.status, 429, "{}", reply.excerpt());
    assert_eq!(reply.header(ORIGIN_HEADER), None, "answered by the gateway");
    assert_eq!(reply.text(), "rate limit exceeded\n");
    assert!(
        reply
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "{reply:?}"
    );
    let seconds = number(reply, "retry-after");
    assert!(
        (retry_after.0..=retry_after.1).contains(&seconds),
        "Retry-After {seconds}, expected {retry_after:?}"
    );
    assert_eq!(number(reply, "ratelimit-limit"), limit);
    assert_eq!(number(reply, "ratelimit-remaining"), 0);
    let seconds = number(reply, "ratelimit-reset");
    assert!(
        (reset.0..=reset.1).contains(&seconds),
        "RateLimit-Reset {seconds}, expected {reset:?}"
    );
}

/// Checks the plugin never failed (a failure would skip or refuse requests
/// for the wrong reason).
fn assert_no_errors(gateway: &TestGateway, name: &str) {
    let stats = gateway.plugin(name).stats;
    assert_eq!(
        (stats.errors, stats.traps, stats.timeouts),
        (0, 0, 0),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodelay_admits_the_burst_then_the_rate_within_5_percent() -> anyhow::Result<()> {
    let name = "rl-accuracy";
    let origin = Origin::echo("app").await?;
    let gw = gateway(
        name,
        r#"{ rate = "10r/s", burst = 20, nodelay = true }"#,
        &origin,
    )
    .await?;
    let addr = gw.addr("web");
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(H1::connect(addr).await?);
    }
    let run = Duration::from_secs(5);
    let start = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let mut replies = Vec::new();
                while start.elapsed() < run {
                    let sent = start.elapsed();
                    let reply = send(&mut client, &[]).await?;
                    replies.push((sent, reply));
                    // Keep knocking, but leave the CPU to the tests alongside.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                anyhow::Ok(replies)
            })
        })
        .collect();
    let mut replies = Vec::new();
    for task in tasks {
        replies.extend(within("a client's 5 s of requests", run + WAIT, task).await???);
    }
    let last_sent = replies
        .iter()
        .map(|(sent, _)| *sent)
        .max()
        .unwrap_or_default();
    let ok: Vec<&Reply> = replies
        .iter()
        .map(|(_, r)| r)
        .filter(|r| r.status == 200)
        .collect();
    let limited: Vec<&Reply> = replies
        .iter()
        .map(|(_, r)| r)
        .filter(|r| r.status == 429)
        .collect();
    assert_eq!(
        ok.len() + limited.len(),
        replies.len(),
        "only 200s and 429s"
    );
    // The burst (20 beyond the first) at once, then 10 a second.
    let expected = 21.0 + 10.0 * last_sent.as_secs_f64();
    let admitted = ok.len() as f64;
    eprintln!(
        "admitted {admitted} of {} in {last_sent:?} (expected {expected:.1})",
        replies.len()
    );
    assert!(
        (admitted - expected).abs() <= expected * 0.05,
        "admitted {admitted} of {} in {last_sent:?}, expected {expected:.1} ± 5%",
        replies.len()
    );
    assert_eq!(
        origin.requests(),
        ok.len(),
        "every 200 came from the origin"
    );
    assert!(
        limited.len() > 100,
        "the clients kept knocking: {}",
        limited.len()
    );
    for reply in &limited {
        // Refused at most one interval (100 ms) early; full again after the
        // burst's 2.1 s at most.
        assert_limited(reply, 21, (1, 1), (1, 3));
    }
    for reply in &ok {
        assert_eq!(
            reply.header("ratelimit-limit"),
            None,
            "headers = \"denied\""
        );
    }
    assert_eq!(
        gw.plugin(name).counters.get("ratelimit_denied").copied(),
        Some(limited.len() as u64)
    );
    assert_no_errors(&gw, name);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nodelay_the_burst_is_paced_at_the_rate_and_the_excess_refused()
-> anyhow::Result<()> {
    let name = "rl-paced";
    let origin = Origin::echo("app").await?;
    let gw = gateway(name, r#"{ rate = "10r/s", burst = 5 }"#, &origin).await?;
    let addr = gw.addr("web");
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(H1::connect(addr).await?);
    }
    let start = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let reply = send(&mut client, &[]).await?;
                anyhow::Ok((start.elapsed(), reply))
            })
        })
        .collect();
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(within("a paced request", WAIT, task).await???);
    }
    let ok = replies.iter().filter(|(_, r)| r.status == 200).count();
    assert_eq!(ok, 6, "the first request and a burst of 5");
    for (took, reply) in replies.iter().filter(|(_, r)| r.status != 200) {
        assert_limited(reply, 6, (1, 1), (1, 1));
        assert!(
            *took < Duration::from_millis(400),
            "refused at once, not after the paced ones: {took:?}"
        );
    }
    // Each admitted request reaches the origin one interval after the one
    // before: never early, and late only by the machine's noise.
    let arrivals = origin.arrivals();
    assert_eq!(arrivals.len(), 6);
    let first = arrivals[0];
    for (i, at) in arrivals.iter().enumerate() {
        let offset = at.duration_since(first);
        let due = Duration::from_millis(100 * i as u64);
        assert!(
            offset + Duration::from_millis(25) >= due && offset <= due + Duration::from_millis(250),
            "request {i} reached the origin {offset:?} after the first, expected about {due:?}"
        );
    }
    let offsets: Vec<Duration> = arrivals.iter().map(|at| at.duration_since(first)).collect();
    eprintln!("arrivals at the origin: {offsets:?}");
    let span = arrivals[5].duration_since(first);
    assert!(
        span >= Duration::from_millis(475) && span <= Duration::from_millis(750),
        "the burst of 5 took {span:?} to reach the origin, expected about 500 ms"
    );
    assert_no_errors(&gw, name);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiers_have_their_own_rates_and_budgets() -> anyhow::Result<()> {
    let name = "rl-tiers";
    let origin = Origin::echo("app").await?;
    // One request a minute refills nothing during the test: the budgets are the bursts.
    let gw = gateway(
        name,
        r#"{ key = "header:x-api-key", tier_header = "x-api-tier", default_tier = "free", tiers = { free = { rate = "1r/m", burst = 2, nodelay = true }, pro = { rate = "1r/m", burst = 5, nodelay = true }, enterprise = "unlimited" } }"#,
        &origin,
    )
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    let free_a = [("x-api-key", "key-a"), ("x-api-tier", "free")];
    assert_eq!(admitted(&mut client, 5, &free_a).await?, 3);
    let reply = send(&mut client, &free_a).await?;
    // One a minute: the next in just under 60 s, full again in 3 minutes.
    assert_limited(&reply, 3, (55, 60), (175, 180));

    let pro_a = [("x-api-key", "key-a"), ("x-api-tier", "pro")];
    assert_eq!(
        admitted(&mut client, 10, &pro_a).await?,
        6,
        "pro: its own rate, its own budget"
    );
    assert_limited(&send(&mut client, &pro_a).await?, 6, (55, 60), (355, 360));

    let b = [("x-api-key", "key-b")];
    assert_eq!(
        admitted(&mut client, 5, &b).await?,
        3,
        "no tier: the default, free"
    );
    let gold_b = [("x-api-key", "key-b"), ("x-api-tier", "gold")];
    assert_eq!(
        admitted(&mut client, 2, &gold_b).await?,
        0,
        "an unknown tier is free: spent"
    );

    let enterprise_a = [("x-api-key", "key-a"), ("x-api-tier", "enterprise")];
    for _ in 0..30 {
        let reply = send(&mut client, &enterprise_a).await?;
        assert_eq!(reply.status, 200, "{}", reply.excerpt());
    }
    assert_no_errors(&gw, name);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_header_pairs_do_not_share_a_budget() -> anyhow::Result<()> {
    let keyed = "rl-keys";
    let paired = "rl-pairs";
    let origin = Origin::echo("app").await?;
    let gw = two_plugins(
        &origin,
        (
            keyed,
            r#"{ rate = "1r/m", burst = 1, nodelay = true, key = "header:x-api-key", missing = "deny" }"#,
        ),
        (
            paired,
            r#"{ rate = "1r/m", burst = 1, nodelay = true, key = ["header:x-tenant", "header:x-user"], missing = "group" }"#,
        ),
    )
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;

    let one = [("x-route", "rl-keys"), ("x-api-key", "one")];
    let two = [("x-route", "rl-keys"), ("x-api-key", "two")];
    assert_eq!(admitted(&mut client, 4, &one).await?, 2);
    assert_eq!(
        admitted(&mut client, 4, &two).await?,
        2,
        "another key, another budget"
    );
    let anonymous = send(&mut client, &[("x-route", "rl-keys")]).await?;
    // Refused, but not for a spent budget: no Retry-After, no quota.
    assert_eq!(anonymous.status, 429, "{}", anonymous.excerpt());
    assert_eq!(anonymous.header(ORIGIN_HEADER), None);
    assert_eq!(anonymous.header("retry-after"), None);
    assert_eq!(anonymous.header("ratelimit-remaining"), None);

    let alice = [("x-tenant", "acme"), ("x-user", "alice")];
    let bob = [("x-tenant", "acme"), ("x-user", "bob")];
    let other_alice = [("x-tenant", "initech"), ("x-user", "alice")];
    assert_eq!(admitted(&mut client, 4, &alice).await?, 2);
    assert_eq!(admitted(&mut client, 4, &bob).await?, 2);
    assert_eq!(admitted(&mut client, 4, &other_alice).await?, 2);
    // A missing header counts as one value of its own ("group"): every
    // request of tenant acme without a user shares one budget.
    assert_eq!(admitted(&mut client, 3, &[("x-tenant", "acme")]).await?, 2);
    assert_eq!(admitted(&mut client, 1, &[("x-tenant", "acme")]).await?, 0);
    assert_eq!(admitted(&mut client, 3, &[("x-user", "alice")]).await?, 2);
    assert_eq!(
        gw.plugin(keyed)
            .counters
            .get("ratelimit_key_missing")
            .copied(),
        Some(1)
    );
    assert_no_errors(&gw, keyed);
    assert_no_errors(&gw, paired);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_trusted_proxies_clients_are_keyed_by_x_forwarded_for() -> anyhow::Result<()> {
    let trusting = "rl-trusting";
    let direct = "rl-direct";
    let origin = Origin::echo("app").await?;
    let gw = two_plugins(
        &origin,
        (
            trusting,
            r#"{ rate = "1r/m", nodelay = true, trusted_proxies = ["127.0.0.0/8"] }"#,
        ),
        (direct, r#"{ rate = "1r/m", nodelay = true }"#),
    )
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    for ip in ["203.0.113.1", "203.0.113.2", "2001:db8::1"] {
        let headers = [("x-route", "rl-trusting"), ("x-forwarded-for", ip)];
        assert_eq!(admitted(&mut client, 2, &headers).await?, 1, "{ip}");
    }
    // The same /64: one IPv6 client.
    let same_net = [
        ("x-route", "rl-trusting"),
        ("x-forwarded-for", "2001:db8::2"),
    ];
    assert_eq!(admitted(&mut client, 1, &same_net).await?, 0);
    // Without trusted proxies a forged X-Forwarded-For changes nothing.
    assert_eq!(
        admitted(&mut client, 1, &[("x-forwarded-for", "198.51.100.1")]).await?,
        1
    );
    assert_eq!(
        admitted(&mut client, 1, &[("x-forwarded-for", "198.51.100.2")]).await?,
        0
    );
    assert_no_errors(&gw, trusting);
    assert_no_errors(&gw, direct);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_all_puts_the_quota_on_admitted_responses() -> anyhow::Result<()> {
    let name = "rl-headers";
    let origin = Origin::echo("app").await?;
    let gw = gateway(
        name,
        r#"{ rate = "1r/m", burst = 4, nodelay = true, headers = "all" }"#,
        &origin,
    )
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    for remaining in (0..5).rev() {
        let reply = send(&mut client, &[]).await?;
        assert_eq!(reply.status, 200, "{}", reply.excerpt());
        assert_eq!(number(&reply, "ratelimit-limit"), 5);
        assert_eq!(number(&reply, "ratelimit-remaining"), remaining);
        let reset = number(&reply, "ratelimit-reset");
        let full = 60 * (5 - remaining);
        assert!(
            (full - 5..=full).contains(&reset),
            "reset {reset}, expected about {full}"
        );
    }
    assert_limited(&send(&mut client, &[]).await?, 5, (55, 60), (295, 300));
    assert_no_errors(&gw, name);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quota_headers_on_admitted_responses_on_response_is_never_called()
-> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let quiet = gateway(
        "rl-quiet",
        r#"{ rate = "100r/s", burst = 100, nodelay = true }"#,
        &origin,
    )
    .await?;
    let all = gateway(
        "rl-loud",
        r#"{ rate = "100r/s", burst = 100, nodelay = true, headers = "all" }"#,
        &origin,
    )
    .await?;
    for (gw, name, hooks, calls_per_request) in [
        (&quiet, "rl-quiet", vec!["on-request"], 1),
        (&all, "rl-loud", vec!["on-request", "on-response"], 2),
    ] {
        assert_eq!(gw.plugin(name).hooks, hooks, "{name}");
        let before = gw.plugin(name).stats.calls;
        let mut client: H1 = H1::connect(gw.addr("web")).await?;
        assert_eq!(admitted(&mut client, 10, &[]).await?, 10);
        assert_eq!(
            gw.plugin(name).stats.calls - before,
            10 * calls_per_request,
            "{name}: Wasm calls for 10 requests"
        );
        assert_no_errors(gw, name);
    }
    Ok(())
}

/// How far into its current `window` the wall clock is (the host's
/// windows start at multiples of their length since the Unix epoch).
fn into_window(window: Duration) -> anyhow::Result<Duration> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
    let into = now.as_millis() % window.as_millis();
    Ok(Duration::from_millis(u64::try_from(into)?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sliding_window_denies_the_excess_and_admits_again_after_the_window() -> anyhow::Result<()>
{
    let name = "rl-window";
    let origin = Origin::echo("app").await?;
    // HAProxy's "over 100 requests in 10 s per IP", scaled down: 20 in 2 s.
    let gw = gateway(
        name,
        r#"{ requests = 20, window = "2s", key = "client-ip" }"#,
        &origin,
    )
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    let window = Duration::from_secs(2);
    // Start just after a window begins, so that the burst fills one window.
    tokio::time::sleep(window - into_window(window)? + Duration::from_millis(20)).await;
    assert_eq!(admitted(&mut client, 20, &[]).await?, 20);
    let mut refusal = None;
    for _ in 0..5 {
        let reply = send(&mut client, &[]).await?;
        // Early in the window: the next request fits 100 ms into the next
        // window (when 19/20 of these 20 weigh), and the count is gone at
        // the end of the window after that.
        assert_limited(&reply, 20, (2, 3), (3, 4));
        refusal = Some((Instant::now(), reply));
    }
    let into = into_window(window)?;
    assert!(
        into < Duration::from_millis(900),
        "the burst ran until {into:?} into its window"
    );
    let (refused_at, reply) = refusal.ok_or_else(|| anyhow::anyhow!("no refusal"))?;
    let retry_after = Duration::from_secs(number(&reply, "retry-after"));

    // Once Retry-After has passed, requests are admitted again: as many as
    // the fading count of the previous window leaves room for.
    tokio::time::sleep(retry_after.saturating_sub(refused_at.elapsed())).await;
    let into = into_window(window)?;
    let reply = send(&mut client, &[]).await?;
    assert_eq!(reply.status, 200, "after Retry-After: {}", reply.excerpt());
    let more = admitted(&mut client, 20, &[]).await?;
    let room = 20.0 * into.as_secs_f64() / window.as_secs_f64() - 1.0;
    eprintln!("{into:?} into the next window: 1 + {more} admitted (room for {room:.1} more)");
    assert!(
        (more as f64 - room).abs() <= 2.5,
        "{into:?} into the next window: {more} more admitted, expected about {room:.1}"
    );
    assert_eq!(origin.requests(), 20 + 1 + more);
    assert_no_errors(&gw, name);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_is_refused_naming_the_key() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    for (config, expected) in [
        (
            r#"{ default_tier = "pro", tiers = { pro = { rate = "10 per sec" } } }"#,
            r#"tiers.pro.rate: "10 per sec" is not a rate (as "10r/s" or "600r/m")"#,
        ),
        (r#"{ rate = "10r/s", brust = 20 }"#, "brust: unknown key"),
        (r#"{ requests = 100 }"#, "window: missing"),
        (
            r#"{ rate = "10r/s", key = ["client-ip", "cookie:sid"] }"#,
            "key[1]",
        ),
        (
            r#"{ default_tier = "gold", tiers = { free = { rate = 1 } } }"#,
            "default_tier",
        ),
        (r#"{ rate = "10r/s", burst = 2, delay = 5 }"#, "delay"),
        (r#"{ rate = "10r/s", status = 200 }"#, "status"),
    ] {
        let error = gateway("rl-bad", config, &origin)
            .await
            .map(drop)
            .expect_err(config);
        let message = format!("{error:#}");
        assert!(message.contains(expected), "{config}: {message}");
    }
    Ok(())
}
