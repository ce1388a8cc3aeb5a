//! `GET /metrics` on the admin listener: a real gateway serves real traffic
//! (answers of every class, a policy trap, an upstream that is down, a
//! request held in flight), then the scrape is parsed with a Prometheus text
//! parser and every figure is checked against what was sent.

use std::time::Duration;

use prometheus_parse::{Sample, Scrape, Value};
use sluice_tests::client::{H1, admin_get, admin_send, get};
use sluice_tests::{Manifest, Mode, Origin, TestGateway};

const PROBE: &str = env!("SLUICE_TEST_PROBE_WASM");
const TOKEN: &str = "metrics-token-0123456789";

/// Scrapes `/metrics` and parses it, checking the exposition's shape on the way.
async fn scrape(gateway: &TestGateway) -> anyhow::Result<Vec<Sample>> {
    let reply = admin_get(gateway.admin_addr(), "/metrics", Some(TOKEN)).await?;
    anyhow::ensure!(reply.status == 200, "scrape: {}", reply.excerpt());
    let content_type = reply.header("content-type").unwrap_or_default();
    anyhow::ensure!(
        content_type.starts_with("application/openmetrics-text"),
        "content type {content_type}"
    );
    let text = reply.text();
    anyhow::ensure!(
        text.trim_end().ends_with("# EOF"),
        "an OpenMetrics exposition ends with # EOF"
    );
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))?;
    // Every sample line was understood: nothing the parser skipped.
    let sample_lines = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .count();
    let parsed: usize = scrape
        .samples
        .iter()
        .map(|s| match &s.value {
            // Buckets, plus _sum and _count (parsed as their own samples).
            Value::Histogram(buckets) => buckets.len(),
            _ => 1,
        })
        .sum();
    anyhow::ensure!(
        parsed == sample_lines,
        "{parsed} of {sample_lines} sample lines parsed"
    );
    Ok(scrape.samples)
}

/// The value of the sample `metric` whose labels include `labels`.
fn value(samples: &[Sample], metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    find(samples, metric, labels).and_then(|s| match s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
        _ => None,
    })
}

fn find<'s>(samples: &'s [Sample], metric: &str, labels: &[(&str, &str)]) -> Option<&'s Sample> {
    samples.iter().find(|s| {
        s.metric == metric
            && labels
                .iter()
                .all(|(k, v)| s.labels.get(k).is_some_and(|have| have == *v))
    })
}

/// Cumulative bucket counts of histogram `metric` with `labels`, by upper bound.
fn buckets(samples: &[Sample], metric: &str, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
    match find(samples, metric, labels).map(|s| &s.value) {
        Some(Value::Histogram(counts)) => counts.iter().map(|c| (c.less_than, c.count)).collect(),
        _ => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_parses_and_counts_what_the_gateway_did() -> anyhow::Result<()> {
    let origin = Origin::echo("metrics-origin").await?;
    let slow = Origin::builder("metrics-slow")
        .mode(Mode::Delay(Duration::from_millis(1500)))
        .start()
        .await?;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let gateway = Manifest::new()
        .listener("web", "")
        .raw(&format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"
        ))
        .raw(&format!(
            "[plugin.metered]\nsource = \"{PROBE}\"\non_error = \"closed\"\nconfig = {{ tag = \"a\" }}\n"
        ))
        .upstream("app", &[origin.addr()], "")
        .upstream("slow", &[slow.addr()], "")
        .upstream("gone", &[closed], "")
        .route(
            "api",
            "{ path_prefix = \"/api/\" }",
            "app",
            "policies = [\"metered\"]",
        )
        .route("slow", "{ path_prefix = \"/slow/\" }", "slow", "")
        .route("gone", "{ path_prefix = \"/gone/\" }", "gone", "")
        .start()
        .await?;
    let web = gateway.addr("web");

    // Without the token: 401, like every admin path.
    let refused = admin_get(gateway.admin_addr(), "/metrics", None).await?;
    anyhow::ensure!(refused.status == 401, "no token: {}", refused.status);

    let mut conn: H1 = H1::connect(web).await?;
    for _ in 0..10 {
        let reply = conn.request(get("app.test", "/api/x")).await?;
        anyhow::ensure!(reply.status == 200, "api: {}", reply.excerpt());
    }
    let mut answered = get("app.test", "/api/x");
    answered
        .headers_mut()
        .insert("x-probe-answer", http::HeaderValue::from_static("429"));
    anyhow::ensure!(conn.request(answered).await?.status == 429);
    let mut trap = get("app.test", "/api/x");
    trap.headers_mut()
        .insert("x-probe-mode", http::HeaderValue::from_static("trap"));
    let trapped = conn.request(trap).await?;
    anyhow::ensure!(trapped.status == 503, "a closed policy that traps: 503");
    for _ in 0..2 {
        anyhow::ensure!(conn.request(get("app.test", "/nowhere")).await?.status == 404);
    }
    anyhow::ensure!(conn.request(get("app.test", "/gone/")).await?.status == 502);

    // One request held in flight on its own connection while we scrape.
    let held = tokio::spawn(async move {
        let mut conn: H1 = H1::connect(web).await?;
        conn.request(get("app.test", "/slow/")).await
    });
    let mut in_flight = 0.0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let samples = scrape(&gateway).await?;
        in_flight = value(
            &samples,
            "sluice_upstream_endpoint_in_flight",
            &[("upstream", "slow")],
        )
        .unwrap_or(-1.0);
        if in_flight >= 1.0 {
            let active = value(
                &samples,
                "sluice_connections_active",
                &[("listener", "web")],
            );
            anyhow::ensure!(
                active == Some(2.0),
                "two client connections open: {active:?}"
            );
            break;
        }
    }
    anyhow::ensure!(
        in_flight == 1.0,
        "the held request is in flight: {in_flight}"
    );
    anyhow::ensure!(held.await??.status == 200);

    let samples = scrape(&gateway).await?;
    let requests = |route: &str, class: &str| {
        value(
            &samples,
            "sluice_requests_total",
            &[("route", route), ("class", class)],
        )
    };
    anyhow::ensure!(
        requests("api", "2xx") == Some(10.0),
        "{:?}",
        requests("api", "2xx")
    );
    anyhow::ensure!(requests("api", "4xx") == Some(1.0), "the policy's 429");
    anyhow::ensure!(requests("api", "5xx") == Some(1.0), "the trap's 503");
    anyhow::ensure!(requests("", "4xx") == Some(2.0), "unrouted 404s");
    anyhow::ensure!(requests("gone", "5xx") == Some(1.0), "the 502");
    anyhow::ensure!(requests("slow", "2xx") == Some(1.0));

    // Latency: 12 api answers, all under a second; the slow one over one.
    let api = buckets(
        &samples,
        "sluice_request_duration_seconds",
        &[("route", "api")],
    );
    anyhow::ensure!(
        api.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "bounds rise and counts are cumulative: {api:?}"
    );
    anyhow::ensure!(api.last() == Some(&(f64::INFINITY, 12.0)), "{api:?}");
    anyhow::ensure!(
        api.iter().find(|(le, _)| *le == 1.0).map(|b| b.1) == Some(12.0),
        "{api:?}"
    );
    let slow_buckets = buckets(
        &samples,
        "sluice_request_duration_seconds",
        &[("route", "slow")],
    );
    anyhow::ensure!(
        slow_buckets.iter().find(|(le, _)| *le == 1.0).map(|b| b.1) == Some(0.0)
            && slow_buckets.last().map(|b| b.1) == Some(1.0),
        "the held request took over a second: {slow_buckets:?}"
    );
    let sum = value(
        &samples,
        "sluice_request_duration_seconds_sum",
        &[("route", "slow")],
    )
    .unwrap_or_default();
    anyhow::ensure!((1.4..5.0).contains(&sum), "slow route's sum {sum}");

    // Endpoints: the live one up, the closed port down after its failure.
    let healthy = |upstream: &str| {
        value(
            &samples,
            "sluice_upstream_endpoint_healthy",
            &[("upstream", upstream)],
        )
    };
    anyhow::ensure!(healthy("app") == Some(1.0));
    anyhow::ensure!(healthy("gone") == Some(0.0), "passive health took it out");
    anyhow::ensure!(
        value(
            &samples,
            "sluice_upstream_endpoint_in_flight",
            &[("upstream", "slow")]
        ) == Some(0.0)
    );

    // The plugin: one trap, counted as an error; calls include it.
    let plugin = |metric: &str| value(&samples, metric, &[("plugin", "metered")]);
    anyhow::ensure!(plugin("sluice_plugin_traps_total") == Some(1.0));
    anyhow::ensure!(plugin("sluice_plugin_errors_total") == Some(1.0));
    let calls = plugin("sluice_plugin_calls_total").unwrap_or_default();
    anyhow::ensure!(calls >= 12.0, "a call per api request at least: {calls}");
    let call_buckets = buckets(
        &samples,
        "sluice_plugin_call_duration_seconds",
        &[("plugin", "metered")],
    );
    anyhow::ensure!(
        call_buckets.last().map(|b| b.1) == Some(calls),
        "the call histogram counts every call: {call_buckets:?}"
    );

    // What the probe counts itself, through its `metrics` import: every api request.
    let counted = value(
        &samples,
        "sluice_policy_counter_total",
        &[("plugin", "metered"), ("name", "probe_requests")],
    );
    anyhow::ensure!(
        counted == Some(12.0),
        "the probe's own counter: {counted:?}"
    );

    // Connections: two accepted on `web` (the scrapes go to the admin port).
    anyhow::ensure!(
        value(
            &samples,
            "sluice_connections_accepted_total",
            &[("listener", "web")]
        ) == Some(2.0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_survive_a_live_swap_and_count_changes() -> anyhow::Result<()> {
    let origin = Origin::echo("metrics-swap-origin").await?;
    let gateway = Manifest::new()
        .listener("web", "")
        .raw(&format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"
        ))
        .raw(&format!(
            "[plugin.swapped-metrics]\nsource = \"{PROBE}\"\nconfig = {{ tag = \"a\" }}\n"
        ))
        .upstream("app", &[origin.addr()], "")
        .route("all", "{}", "app", "policies = [\"swapped-metrics\"]")
        .start()
        .await?;
    let web = gateway.addr("web");
    let admin = gateway.admin_addr();
    let mut conn: H1 = H1::connect(web).await?;
    for _ in 0..5 {
        anyhow::ensure!(conn.request(get("app.test", "/")).await?.status == 200);
    }
    let applied = admin_send(
        admin,
        "PUT",
        "/plugins/swapped-metrics/config",
        Some(TOKEN),
        br#"{"tag": "b"}"#.to_vec(),
    )
    .await?;
    anyhow::ensure!(applied.status == 200, "{}", applied.excerpt());
    let refused = admin_send(
        admin,
        "PUT",
        "/plugins/swapped-metrics",
        Some(TOKEN),
        b"not a component".to_vec(),
    )
    .await?;
    anyhow::ensure!(refused.status == 422, "{}", refused.excerpt());
    for _ in 0..3 {
        anyhow::ensure!(conn.request(get("app.test", "/")).await?.status == 200);
    }

    let samples = scrape(&gateway).await?;
    let total = value(
        &samples,
        "sluice_requests_total",
        &[("route", "all"), ("class", "2xx")],
    );
    anyhow::ensure!(total == Some(8.0), "counted across the swap: {total:?}");
    let swaps = |result: &str| value(&samples, "sluice_plugin_swaps_total", &[("result", result)]);
    anyhow::ensure!(swaps("applied") == Some(1.0), "{:?}", swaps("applied"));
    anyhow::ensure!(swaps("refused") == Some(1.0), "{:?}", swaps("refused"));
    anyhow::ensure!(value(&samples, "sluice_reloads_total", &[("result", "applied")]) == Some(0.0));
    Ok(())
}
