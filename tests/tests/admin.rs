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
