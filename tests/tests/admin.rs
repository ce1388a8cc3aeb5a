//! The admin API's changes through real requests: live plugin swaps (a new
//! component, new config) under steady traffic with nothing dropped and the
//! new version answering at once; refused uploads (garbage, a component that
//! cannot do the running one's job, a failing `init`, too large) leaving the
//! running version serving; rollback; reload of a broken manifest; tokens.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use sluice_tests::client::{H1, admin_get, admin_send, get};
use sluice_tests::{Manifest, Origin, TestGateway};
use tokio::time::{Instant, MissedTickBehavior};

const PROBE: &str = env!("SLUICE_TEST_PROBE_WASM");
const BLOCK: &str = env!("SLUICE_EXAMPLE_BLOCK_WASM");

/// A gateway whose route `all` runs plugin `name` (the probe, config
/// `{"tag": "a"}`), with an admin API behind `token`.
///
/// The plugin's deadline is 1 s, not the default 10 ms: these tests are
/// about swaps, and with the file's other tests running beside them on two
/// busy cores, a debug build's call is now and then descheduled past 10 ms
/// and answered 503 by `on_error = "closed"`.
async fn gateway(name: &str, origin: &Origin, token: &str) -> anyhow::Result<TestGateway> {
    Manifest::new()
        .listener("web", "")
        .raw(&format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n"
        ))
        .raw(&format!(
            "[plugin.{name}]\nsource = \"{PROBE}\"\nconfig = {{ tag = \"a\" }}\ndeadline = \"1s\"\n"
        ))
        .upstream("app", &[origin.addr()], "")
        .route("all", "{}", "app", &format!("policies = [\"{name}\"]"))
        .start()
        .await
}

/// A request that the probe lets through (200) and the block example answers (403).
fn probe_request() -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut req = get("app.test", "/");
    req.headers_mut()
        .insert("x-block", http::HeaderValue::from_static("1"));
    req
}

/// Which version answered: `probe` (forwarded, 200) or `block` (403).
fn version_of(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        200 => "probe",
        403 => "block",
        _ => "neither",
    }
}

/// The hot-swap test's load: requests per second in total, spread evenly
/// over this many keep-alive connections, for this long. Each connection
/// needs a round trip under 2 ms on average: a debug build on a 2-vCPU
/// machine, unpaced, does about 11,000 requests/s on 4 connections while
/// other builds run, so the rate holds with room to spare.
const SWAP_LOAD_PER_SEC: u32 = 2_000;
const SWAP_LOAD_CONNECTIONS: u32 = 4;
const SWAP_LOAD_FOR: Duration = Duration::from_secs(10);
/// Swaps during the load: the first once it has settled, then one every
/// [`SWAP_EVERY`], so they spread over the whole run.
const SWAPS: u32 = 20;
const FIRST_SWAP_AFTER: Duration = Duration::from_millis(500);
const SWAP_EVERY: Duration = Duration::from_millis(450);

/// One answer a steady client got.
struct Answer {
    sent: Instant,
    answered: Instant,
    status: http::StatusCode,
}

/// One swap as the admin client saw it: when the PUT went out, when its 200
/// came back, and the version that must answer from then on.
struct Swap {
    put_sent: Instant,
    answered: Instant,
    version: &'static str,
}

/// Sends [`probe_request`]s on one keep-alive connection on a fixed schedule,
/// one every `period` from `first`, until `until`.
async fn steady_client(
    web: std::net::SocketAddr,
    first: Instant,
    period: Duration,
    until: Instant,
) -> anyhow::Result<Vec<Answer>> {
    let mut conn: H1 = H1::connect(web).await?;
    let mut ticks = tokio::time::interval_at(first, period);
    // A late answer is made up for by sending the missed requests back to
    // back, so the count keeps to the schedule instead of drifting below it.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut answers = Vec::new();
    loop {
        let tick = ticks.tick().await;
        if tick >= until || Instant::now() >= until {
            return Ok(answers);
        }
        let sent = Instant::now();
        let reply = conn
            .request(probe_request())
            .await
            .with_context(|| format!("request {} on a steady connection", answers.len()))?;
        answers.push(Answer {
            sent,
            answered: Instant::now(),
            status: reply.status,
        });
    }
}

/// The version that must have answered a request sent at `sent` and
/// answered at `answered`; `None` when a swap was under way in between (its
/// PUT sent, its 200 not yet back), so either version may have.
fn version_due(swaps: &[Swap], sent: Instant, answered: Instant) -> Option<&'static str> {
    let mut version = "probe";
    for swap in swaps {
        if answered <= swap.put_sent {
            break;
        }
        if sent < swap.answered {
            return None;
        }
        version = swap.version;
    }
    Some(version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_a_component_under_load_drops_nothing_and_answers_at_once() -> anyhow::Result<()> {
    let origin = Origin::echo("swap-origin").await?;
    let token = "swap-token-0123456789";
    let gateway = gateway("swapped", &origin, token).await?;
    let web = gateway.addr("web");
    let admin = gateway.admin_addr();
    let probe = std::fs::read(PROBE)?;
    let block = std::fs::read(BLOCK)?;

    // Paced traffic on keep-alive connections for the whole run, each
    // connection's schedule offset a little from the others'.
    let start = Instant::now() + Duration::from_millis(50);
    let until = start + SWAP_LOAD_FOR;
    let period = Duration::from_secs(1) * SWAP_LOAD_CONNECTIONS / SWAP_LOAD_PER_SEC;
    let clients: Vec<_> = (0..SWAP_LOAD_CONNECTIONS)
        .map(|i| {
            let first = start + period * i / SWAP_LOAD_CONNECTIONS;
            tokio::spawn(steady_client(web, first, period, until))
        })
        .collect();

    let mut swaps = Vec::new();
    let mut swap_to_live = Vec::new();
    for round in 0..SWAPS {
        tokio::time::sleep_until(start + FIRST_SWAP_AFTER + SWAP_EVERY * round).await;
        // Each version with a config its `init` accepts.
        let (bytes, path, expect) = if round % 2 == 0 {
            (&block, "/plugins/swapped?config=%7B%7D", "block")
        } else {
            (
                &probe,
                "/plugins/swapped?config=%7B%22tag%22%3A%22b%22%7D",
                "probe",
            )
        };
        let put_sent = Instant::now();
        let reply = admin_send(admin, "PUT", path, Some(token), bytes.clone()).await?;
        let answered = Instant::now();
        anyhow::ensure!(reply.status == 200, "swap {round}: {}", reply.excerpt());
        let body = reply.json()?;
        anyhow::ensure!(body["version"] != body["previous"], "a new version: {body}");
        swaps.push(Swap {
            put_sent,
            answered,
            version: expect,
        });
        // The first request after the 200 meets the new version.
        let mut conn: H1 = H1::connect(web).await?;
        let first = conn.request(probe_request()).await?;
        swap_to_live.push(answered.elapsed());
        anyhow::ensure!(
            version_of(first.status) == expect,
            "swap {round}: the first request after the 200 got {} ({})",
            first.status,
            version_of(first.status)
        );
    }
    let swapped_at = Instant::now();
    anyhow::ensure!(
        swapped_at < until,
        "all {SWAPS} swaps ran under load: the last ended {:?} after the load stopped",
        swapped_at - until
    );

    let mut answers = Vec::new();
    for client in clients {
        // Any failed or reset request fails its client, and the test.
        answers.extend(client.await??);
    }
    let elapsed = answers
        .iter()
        .map(|a| a.answered)
        .max()
        .unwrap_or(start)
        .saturating_duration_since(start);
    let rate = answers.len() as f64 / elapsed.as_secs_f64();
    let bad: Vec<_> = answers
        .iter()
        .filter(|a| version_of(a.status) == "neither")
        .map(|a| (a.sent - start, a.status))
        .collect();
    anyhow::ensure!(
        bad.is_empty(),
        "answers from neither version (sent at, status): {bad:?}"
    );
    // Every answer given while no swap was under way came from the version
    // the last 200 announced, on the steady connections as on new ones.
    let mut settled = 0;
    let mut stale = Vec::new();
    for answer in &answers {
        if let Some(due) = version_due(&swaps, answer.sent, answer.answered) {
            settled += 1;
            let got = version_of(answer.status);
            if got != due {
                stale.push((answer.sent - start, got, due));
            }
        }
    }
    anyhow::ensure!(
        stale.is_empty(),
        "{} of {settled} answers came from the wrong version (sent at, got, due): {:?}",
        stale.len(),
        &stale[..stale.len().min(10)]
    );
    swap_to_live.sort();
    let worst = swap_to_live.last().copied().unwrap_or_default();
    eprintln!(
        "{} requests in {elapsed:.2?} ({rate:.0}/s), {SWAPS} swaps, {settled} answers checked \
         against the swap timeline, swap to live (200 to first answer) worst {worst:?}",
        answers.len()
    );
    let target = f64::from(SWAP_LOAD_PER_SEC);
    anyhow::ensure!(
        rate >= 0.9 * target,
        "the load ran at {rate:.0} requests/s, under 90% of the {target} asked for"
    );
    anyhow::ensure!(
        worst < Duration::from_millis(50),
        "the new version answered within 50 ms of the 200 (worst {worst:?})"
    );
    Ok(())
}

#[tokio::test]
async fn bad_uploads_are_refused_and_the_running_version_keeps_serving() -> anyhow::Result<()> {
    let origin = Origin::echo("refuse-origin").await?;
    let token = "refuse-token-0123456789";
    let gateway = Manifest::new()
        .listener("web", "")
        .raw(&format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n"
        ))
        .raw(&format!("[plugin.guard]\nsource = \"{BLOCK}\"\n"))
        .raw("[plugin.picker]\nsource = \"builtin:round-robin\"\n")
        .upstream("app", &[origin.addr()], "balancer = \"picker\"")
        .route("all", "{}", "app", "policies = [\"guard\"]")
        .start()
        .await?;
    let admin = gateway.admin_addr();
    let web = gateway.addr("web");
    // What identifies the running versions (call statistics move on).
    let running = || async {
        let listed = admin_get(admin, "/plugins", Some(token)).await?.json()?;
        let versions: Vec<String> = listed
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                format!(
                    "{} {} {} {}",
                    p["name"], p["version"], p["config"], p["previous"]
                )
            })
            .collect();
        anyhow::Ok(versions)
    };
    let before = running().await?;

    let garbage = admin_send(
        admin,
        "PUT",
        "/plugins/guard",
        Some(token),
        &b"\0asm garbage"[..],
    )
    .await?;
    anyhow::ensure!(garbage.status == 422, "{}", garbage.excerpt());
    anyhow::ensure!(
        garbage.text().contains("not a valid Wasm component"),
        "{}",
        garbage.text()
    );

    // A policy cannot replace a balancer: it does not export `balance`.
    let probe = std::fs::read(PROBE)?;
    let wrong = admin_send(admin, "PUT", "/plugins/picker", Some(token), probe.clone()).await?;
    anyhow::ensure!(wrong.status == 422, "{}", wrong.excerpt());
    anyhow::ensure!(
        wrong.text().contains("does not export `balance`"),
        "{}",
        wrong.text()
    );

    let failing = admin_send(
        admin,
        "PUT",
        "/plugins/guard?config=%7B%22fail%22%3A%22no%20thanks%22%7D",
        Some(token),
        probe.clone(),
    )
    .await?;
    anyhow::ensure!(failing.status == 422, "{}", failing.excerpt());
    anyhow::ensure!(failing.text().contains("no thanks"), "{}", failing.text());

    let bad_config = admin_send(
        admin,
        "PUT",
        "/plugins/guard/config",
        Some(token),
        "{not json",
    )
    .await?;
    anyhow::ensure!(bad_config.status == 400, "{}", bad_config.excerpt());

    let unknown = admin_send(admin, "PUT", "/plugins/nope", Some(token), probe.clone()).await?;
    anyhow::ensure!(unknown.status == 404, "{}", unknown.excerpt());

    let huge = vec![0u8; sluice::admin::MAX_UPLOAD_BYTES + 1];
    let too_large = admin_send(admin, "PUT", "/plugins/guard", Some(token), huge).await;
    // The gateway answers 413 from Content-Length before reading, and may close.
    if let Ok(reply) = too_large {
        anyhow::ensure!(reply.status == 413, "{}", reply.excerpt());
    }

    let after = running().await?;
    anyhow::ensure!(before == after, "nothing changed:\n{before:?}\n{after:?}");
    let blocked = H1::connect(web).await?.request(probe_request()).await?;
    anyhow::ensure!(
        blocked.status == 403,
        "the running version still serves: {}",
        blocked.status
    );
    Ok(())
}

#[tokio::test]
async fn config_swaps_and_rollback_restore_the_previous_behaviour() -> anyhow::Result<()> {
    let origin = Origin::echo("rollback-origin").await?;
    let token = "rollback-token-0123456789";
    let gateway = Manifest::new()
        .listener("web", "")
        .raw(&format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n"
        ))
        .raw(&format!("[plugin.guard]\nsource = \"{BLOCK}\"\n"))
        .upstream("app", &[origin.addr()], "")
        .route("all", "{}", "app", "policies = [\"guard\"]")
        .start()
        .await?;
    let admin = gateway.admin_addr();
    let web = gateway.addr("web");
    let status = |header: &'static str| async move {
        let mut req = get("app.test", "/");
        req.headers_mut()
            .insert(header, http::HeaderValue::from_static("1"));
        anyhow::Ok(H1::connect(web).await?.request(req).await?.status)
    };
    anyhow::ensure!(status("x-block").await? == 403);
    anyhow::ensure!(status("x-other").await? == 200);

    let nothing = admin_send(admin, "POST", "/plugins/guard/rollback", Some(token), "").await?;
    anyhow::ensure!(
        nothing.status == 409,
        "nothing to roll back to: {}",
        nothing.excerpt()
    );

    let swapped = admin_send(
        admin,
        "PUT",
        "/plugins/guard/config",
        Some(token),
        r#"{"header":"x-other"}"#,
    )
    .await?;
    anyhow::ensure!(swapped.status == 200, "{}", swapped.excerpt());
    let body = swapped.json()?;
    anyhow::ensure!(
        body["version"] == body["previous"],
        "same component: {body}"
    );
    anyhow::ensure!(body["config"]["header"] == "x-other", "{body}");
    anyhow::ensure!(status("x-block").await? == 200);
    anyhow::ensure!(status("x-other").await? == 403);

    let listed: Value = admin_get(admin, "/plugins", Some(token)).await?.json()?;
    let guard = listed
        .as_array()
        .and_then(|l| l.iter().find(|p| p["name"] == "guard"))
        .cloned()
        .unwrap_or_default();
    anyhow::ensure!(guard["config"]["header"] == "x-other", "{listed}");
    anyhow::ensure!(
        guard["previous"].as_array().map(Vec::len) == Some(1),
        "{listed}"
    );

    let back = admin_send(admin, "POST", "/plugins/guard/rollback", Some(token), "").await?;
    anyhow::ensure!(back.status == 200, "{}", back.excerpt());
    anyhow::ensure!(status("x-block").await? == 403);
    anyhow::ensure!(status("x-other").await? == 200);
    Ok(())
}

#[tokio::test]
async fn changes_need_the_token() -> anyhow::Result<()> {
    let origin = Origin::echo("token-origin").await?;
    let gateway = gateway("guarded", &origin, "right-token-0123456789").await?;
    let admin = gateway.admin_addr();
    let probe = std::fs::read(PROBE)?;
    for token in [
        None,
        Some("wrong-token-0123456789"),
        Some("right-token-012345678"),
    ] {
        let reply = admin_send(admin, "PUT", "/plugins/guarded", token, probe.clone()).await?;
        anyhow::ensure!(reply.status == 401, "{token:?}: {}", reply.excerpt());
        let reply = admin_send(admin, "POST", "/reload", token, "").await?;
        anyhow::ensure!(reply.status == 401, "{token:?}: {}", reply.excerpt());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blue_green_flip_through_the_admin_api_drops_nothing() -> anyhow::Result<()> {
    let blue = Origin::echo("flip-blue").await?;
    let green = Origin::echo("flip-green").await?;
    let token = "flip-token-0123456789";
    let gateway = Manifest::new()
        .listener("web", "")
        .raw(&format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n"))
        .raw(
            "[plugin.flip]\nsource = \"builtin:split\"\nconfig = { upstreams = { blue = 100, green = 0 } }\ndeadline = \"1s\"\n",
        )
        .upstream("blue", &[blue.addr()], "")
        .upstream("green", &[green.addr()], "")
        .route("all", "{}", "blue", "policies = [\"flip\"]")
        .start()
        .await?;
    let web = gateway.addr("web");
    let admin = gateway.admin_addr();
    let origin_of = |reply: &sluice_tests::Reply| {
        reply
            .header(sluice_tests::origin::ORIGIN_HEADER)
            .unwrap_or("none")
            .to_string()
    };

    // Two keep-alive clients send steadily; each records who answered, in order.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut conn: H1 = H1::connect(web).await?;
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let reply = conn.request(get("app.test", "/")).await?;
                anyhow::ensure!(reply.status == 200, "a request failed: {}", reply.status);
                seen.push(origin_of(&reply));
            }
            anyhow::Ok(seen)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let flipped = admin_send(
        admin,
        "PUT",
        "/plugins/flip/config",
        Some(token),
        r#"{"upstreams": {"blue": 0, "green": 100}}"#,
    )
    .await?;
    anyhow::ensure!(flipped.status == 200, "{}", flipped.excerpt());
    let first = H1::connect(web)
        .await?
        .request(get("app.test", "/"))
        .await?;
    anyhow::ensure!(
        origin_of(&first) == "flip-green",
        "the next request goes green"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let seen = client.await??;
        // Blue until the flip, green after: one switch, never back.
        let switch = seen
            .iter()
            .position(|o| o == "flip-green")
            .unwrap_or(seen.len());
        anyhow::ensure!(switch > 0, "blue served before the flip");
        anyhow::ensure!(
            seen[..switch].iter().all(|o| o == "flip-blue")
                && seen[switch..].iter().all(|o| o == "flip-green")
                && switch < seen.len(),
            "one clean flip from blue to green: {seen:?}"
        );
    }
    Ok(())
}

/// Sends `bytes` to the admin API on a fresh connection and reads until the
/// gateway closes it (bounded by `limit`); returns all it sent back.
async fn raw_admin(
    admin: std::net::SocketAddr,
    bytes: &[u8],
    limit: Duration,
) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = sluice_tests::client::connect(admin).await?;
    stream.write_all(bytes).await?;
    let mut received = Vec::new();
    sluice_tests::within(
        "the admin API to answer and close",
        limit,
        stream.read_to_end(&mut received),
    )
    .await??;
    Ok(String::from_utf8_lossy(&received).into_owned())
}

/// The names and sizes of every file under `dir`, sorted.
fn files_under(dir: &std::path::Path) -> anyhow::Result<Vec<(String, u64)>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                found.push((entry.path().display().to_string(), meta.len()));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Every credential but the right one is refused alike: none, a wrong one of
/// the right length, shorter, longer (by one and by 8 KiB), empty, another
/// scheme. Reads need the token as much as changes do; the scheme's case
/// does not matter (RFC 9110 §11.1).
#[tokio::test]
async fn every_token_but_the_right_one_gets_401() -> anyhow::Result<()> {
    let origin = Origin::echo("tokens-origin").await?;
    let token = "right-token-0123456789";
    let gateway = gateway("guarded", &origin, token).await?;
    let admin = gateway.admin_addr();
    let before = admin_get(admin, "/plugins", Some(token)).await?;
    anyhow::ensure!(before.status == 200, "{}", before.excerpt());
    let version = before.json()?[0]["version"].clone();
    let probe = std::fs::read(PROBE)?;
    let longer = format!("{token}0");
    let huge = format!("{token}{}", "0".repeat(8 << 10));
    let wrong_values = [
        None,
        Some("Bearer wrong-token-0123456789".to_string()),
        Some("Bearer right-token-012345678".to_string()),
        Some(format!("Bearer {longer}")),
        Some(format!("Bearer {huge}")),
        Some("Bearer ".to_string()),
        Some("Bearer".to_string()),
        Some(format!("Basic {token}")),
        Some(format!("Bearer  {token}")),
        Some(token.to_string()),
    ];
    for value in &wrong_values {
        for (method, path, body) in [
            ("PUT", "/plugins/guarded", probe.clone()),
            ("POST", "/reload", Vec::new()),
            ("GET", "/plugins", Vec::new()),
            ("GET", "/upstreams", Vec::new()),
            ("GET", "/metrics", Vec::new()),
        ] {
            let mut client: H1 = H1::connect(admin).await?;
            let mut req = sluice_tests::client::request(method, "admin.test", path, body);
            if let Some(value) = value {
                req.headers_mut()
                    .insert(http::header::AUTHORIZATION, value.parse()?);
            }
            let reply = client.request(req).await?;
            anyhow::ensure!(
                reply.status == 401,
                "{method} {path} with {:?}: {}",
                value
                    .as_deref()
                    .map(|v| v.chars().take(40).collect::<String>()),
                reply.excerpt()
            );
            anyhow::ensure!(reply.header("www-authenticate") == Some("Bearer"));
            anyhow::ensure!(
                reply.text().contains("a valid bearer token is required"),
                "{}",
                reply.text()
            );
        }
    }
    // The probes answer without a token; the scheme is case-insensitive.
    anyhow::ensure!(admin_get(admin, "/health/live", None).await?.status == 200);
    let mut client: H1 = H1::connect(admin).await?;
    let mut req = get("admin.test", "/plugins");
    req.headers_mut().insert(
        http::header::AUTHORIZATION,
        format!("bearer {token}").parse()?,
    );
    let after = client.request(req).await?;
    anyhow::ensure!(after.status == 200, "{}", after.excerpt());
    anyhow::ensure!(
        after.json()?[0]["version"] == version,
        "no refused upload changed the plugin"
    );
    Ok(())
}

/// `PUT /plugins/NAME` over MAX_UPLOAD_BYTES: a Content-Length over it is
/// answered 413 before any of the body is sent; a chunked upload is cut
/// once it passes the limit, not read to its end. The running version
/// keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_uploads_get_413_without_being_read() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let origin = Origin::echo("big-origin").await?;
    let token = "big-token-0123456789";
    let gateway = gateway("guarded", &origin, token).await?;
    let admin = gateway.admin_addr();
    let limit = sluice::admin::MAX_UPLOAD_BYTES;
    let running = admin_get(admin, "/plugins", Some(token)).await?.json()?[0]["version"].clone();

    // Declared too large: the answer comes though not a byte of body was sent.
    let head = format!(
        "PUT /plugins/guarded HTTP/1.1\r\nHost: admin.test\r\nAuthorization: Bearer {token}\r\nContent-Type: application/wasm\r\nContent-Length: {}\r\n\r\n",
        limit + 1
    );
    let answer = raw_admin(admin, head.as_bytes(), Duration::from_secs(3)).await?;
    anyhow::ensure!(
        answer.starts_with("HTTP/1.1 413 "),
        "a Content-Length over the limit: {answer}"
    );
    anyhow::ensure!(
        answer.contains(&format!("the body is larger than {limit} bytes")),
        "{answer}"
    );

    // Chunked, no length: cut at the limit. The gateway stops reading, so
    // the client can push at most the limit plus the sockets' buffers.
    let stream = sluice_tests::client::connect(admin).await?;
    let (mut read, mut write) = stream.into_split();
    let head = format!(
        "PUT /plugins/guarded HTTP/1.1\r\nHost: admin.test\r\nAuthorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    write.write_all(head.as_bytes()).await?;
    let offered = limit + (64 << 20);
    let writer = tokio::spawn(async move {
        let chunk = vec![b'w'; 1 << 20];
        let framed = [
            format!("{:x}\r\n", chunk.len()).into_bytes(),
            chunk,
            b"\r\n".to_vec(),
        ]
        .concat();
        let mut sent = 0usize;
        while sent < offered {
            if write.write_all(&framed).await.is_err() {
                break;
            }
            sent += 1 << 20;
        }
        sent
    });
    let mut answer = Vec::new();
    sluice_tests::within(
        "the 413 to a chunked upload over the limit",
        Duration::from_secs(30),
        read.read_to_end(&mut answer),
    )
    .await??;
    let sent =
        sluice_tests::within("the writer to stop", Duration::from_secs(30), writer).await??;
    let answer = String::from_utf8_lossy(&answer);
    anyhow::ensure!(
        answer.starts_with("HTTP/1.1 413 "),
        "a chunked upload over the limit: {answer}"
    );
    anyhow::ensure!(
        sent < limit + (24 << 20),
        "the client pushed {sent} bytes: the gateway kept reading past the {limit}-byte limit"
    );

    let after = admin_get(admin, "/plugins", Some(token)).await?.json()?;
    anyhow::ensure!(after[0]["version"] == running, "{after}");
    let served = H1::connect(gateway.addr("web"))
        .await?
        .request(probe_request())
        .await?;
    anyhow::ensure!(served.status == 200, "{}", served.excerpt());
    Ok(())
}

/// A change names one of the manifest's plugins, as its path segment,
/// undecoded. Traversal (`..`, `%2e%2e`, `%2F`), NUL, slashes and very long
/// names are refused with a 4xx saying why, before the body is read (the
/// component in these requests would compile), and no file appears.
#[tokio::test]
async fn plugin_names_outside_the_manifest_are_refused_and_write_nothing() -> anyhow::Result<()> {
    let origin = Origin::echo("names-origin").await?;
    let token = "names-token-0123456789";
    let dir = tempfile::tempdir()?;
    let audit_log = dir.path().join("audit.jsonl");
    let gateway = Manifest::new()
        .listener("web", "")
        .raw(&format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\naudit_log = {:?}\n",
            audit_log.display().to_string()
        ))
        .raw(&format!(
            "[plugin.guard]\nsource = \"{PROBE}\"\nconfig = {{ tag = \"a\" }}\ndeadline = \"1s\"\n"
        ))
        .upstream("app", &[origin.addr()], "")
        .route("all", "{}", "app", "policies = [\"guard\"]")
        .start()
        .await?;
    let admin = gateway.admin_addr();
    let manifest_dir = gateway
        .manifest_path()
        .parent()
        .context("the manifest's directory")?
        .to_path_buf();
    let watched = |path: &std::path::Path| -> anyhow::Result<Vec<(String, u64)>> {
        Ok(files_under(path)?
            .into_iter()
            .filter(|(name, _)| !name.ends_with("audit.jsonl"))
            .collect())
    };
    let before = (watched(dir.path())?, watched(&manifest_dir)?);
    let running = admin_get(admin, "/plugins", Some(token)).await?.json()?[0]["version"].clone();
    let probe = std::fs::read(PROBE)?;
    let long = "a".repeat(5000);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "PUT",
            "/plugins/..%2F..%2Fetc%2Fpasswd".into(),
            400,
            "invalid plugin name",
        ),
        ("PUT", "/plugins/%2e%2e".into(), 400, "invalid plugin name"),
        ("PUT", "/plugins/..".into(), 400, "invalid plugin name"),
        (
            "PUT",
            "/plugins/guard%2F..%2Fx".into(),
            400,
            "invalid plugin name",
        ),
        (
            "PUT",
            "/plugins/gu%00ard".into(),
            400,
            "invalid plugin name",
        ),
        (
            "PUT",
            "/plugins/guard.wasm".into(),
            400,
            "invalid plugin name",
        ),
        (
            "PUT",
            "/plugins/%2e%2e/config".into(),
            400,
            "invalid plugin name",
        ),
        (
            "POST",
            "/plugins/..%2F/rollback".into(),
            400,
            "invalid plugin name",
        ),
        ("PUT", format!("/plugins/{long}"), 404, "(5000 bytes)"),
        (
            "PUT",
            "/plugins/nope".into(),
            404,
            "no plugin named \"nope\" in the manifest",
        ),
        ("PUT", "/plugins/Guard".into(), 404, "(declared: guard)"),
        (
            "PUT",
            "/plugins/guard/../guard".into(),
            404,
            "no admin endpoint",
        ),
        ("PUT", "/plugins/a/b".into(), 404, "no admin endpoint"),
        ("PUT", "/plugins/".into(), 400, "invalid plugin name \"\""),
    ];
    for (method, path, status, says) in &cases {
        let body = if *method == "PUT" {
            probe.clone()
        } else {
            Vec::new()
        };
        let reply = admin_send(admin, method, path, Some(token), body).await?;
        let shown: String = path.chars().take(60).collect();
        anyhow::ensure!(
            reply.status == *status,
            "{method} {shown}: {}",
            reply.excerpt()
        );
        let error = reply.json()?["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        anyhow::ensure!(error.contains(says), "{method} {shown}: {error}");
        anyhow::ensure!(
            error.len() < 1000,
            "{method} {shown}: the answer quotes all of it"
        );
    }

    // Refused before the body is read: the answer comes though the body
    // announced is never sent.
    let head = format!(
        "PUT /plugins/..%2F..%2Fetc%2Fpasswd HTTP/1.1\r\nHost: admin.test\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n",
        probe.len()
    );
    let answer = raw_admin(admin, head.as_bytes(), Duration::from_secs(3)).await?;
    anyhow::ensure!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    let head = format!(
        "PUT /plugins/nope HTTP/1.1\r\nHost: admin.test\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n",
        probe.len()
    );
    let answer = raw_admin(admin, head.as_bytes(), Duration::from_secs(3)).await?;
    anyhow::ensure!(answer.starts_with("HTTP/1.1 404 "), "{answer}");
    // A raw NUL in the path is not HTTP: the parser refuses it.
    let answer = raw_admin(
        admin,
        format!("PUT /plugins/gu\0ard HTTP/1.1\r\nHost: admin.test\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n").as_bytes(),
        Duration::from_secs(3),
    )
    .await?;
    anyhow::ensure!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");

    let after = admin_get(admin, "/plugins", Some(token)).await?.json()?;
    anyhow::ensure!(after[0]["version"] == running, "{after}");
    anyhow::ensure!(
        (watched(dir.path())?, watched(&manifest_dir)?) == before,
        "a refused name created or changed a file"
    );
    for base in [dir.path(), manifest_dir.as_path()] {
        for stray in [
            "..%2F..%2Fetc%2Fpasswd",
            "%2e%2e",
            "guard.wasm",
            "nope",
            "a",
        ] {
            anyhow::ensure!(!base.join(stray).exists(), "{}", base.join(stray).display());
        }
    }
    // Each refusal is on record, with its status.
    let recorded = admin_get(admin, "/audit", Some(token)).await?.json()?;
    let statuses: Vec<u64> = recorded
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["result"] == "refused")
        .filter_map(|e| e["status"].as_u64())
        .collect();
    anyhow::ensure!(
        statuses.iter().filter(|s| **s == 400).count() >= 10
            && statuses.iter().filter(|s| **s == 404).count() >= 4,
        "{recorded}"
    );
    Ok(())
}
