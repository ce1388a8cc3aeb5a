//! Hostile plugins, through real requests: a policy that loops, recurses,
//! allocates without bound, traps, sleeps in the host, floods host calls,
//! answers or steers with values the gateway cannot use, a balancer that
//! picks a position that is not a candidate, and a policy that looks for
//! files, sockets and the environment.
//!
//! Each misbehaviour must cost only the request that triggered it: that
//! request gets what the plugin's `on_error` says (`open`: forwarded as if
//! the policy were absent; `closed`: 503), the next request on the route is
//! served normally, `/metrics` counts the failure under the right name, and
//! another route keeps serving — including, measured, its throughput while a
//! hostile route is flooded.
//!
//! The probe (`tests/plugins/probe`) and the picker (`tests/plugins/picker`)
//! are driven by request headers; see their sources.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use http_body_util::Full;
use prometheus_parse::{Scrape, Value};
use sluice_tests::client::{H1, H2, admin_get, get};
use sluice_tests::{Manifest, Origin, TestGateway, WAIT, within};

const PROBE: &str = env!("SLUICE_TEST_PROBE_WASM");
const PICKER: &str = env!("SLUICE_TEST_PICKER_WASM");
const TOKEN: &str = "hostile-token-0123456789";

/// The throughput test takes the machine to itself (write); the others
/// share it (read), so that they do not run beside it.
static MACHINE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A plugin name no other test uses: a plugin's state and metrics are kept
/// by name for the whole process.
fn unique(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn admin() -> String {
    format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n")
}

fn probe_table(name: &str, extra: &str) -> String {
    format!("[plugin.{name}]\nsource = \"{PROBE}\"\n{extra}\n")
}

/// `GET path` with the given extra headers.
fn probe_get(path: &str, headers: &[(&str, &str)]) -> http::Request<Full<Bytes>> {
    let mut req = get("app.test", path);
    for (name, value) in headers {
        req.headers_mut().insert(
            HeaderName::from_bytes(name.as_bytes()).expect("valid header name"),
            HeaderValue::from_str(value).expect("valid header value"),
        );
    }
    req
}

/// The plugin counters `/metrics` shows for `plugin`, without the
/// `sluice_plugin_` prefix and `_total` suffix (`errors`, `traps`, ...).
async fn plugin_counters(gateway: &TestGateway, plugin: &str) -> anyhow::Result<Counters> {
    let reply = admin_get(gateway.admin_addr(), "/metrics", Some(TOKEN)).await?;
    anyhow::ensure!(reply.status == 200, "scrape: {}", reply.excerpt());
    let text = reply.text();
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))?;
    let mut counters = HashMap::new();
    for sample in scrape.samples {
        if sample.labels.get("plugin") != Some(plugin) {
            continue;
        }
        let Some(name) = sample
            .metric
            .strip_prefix("sluice_plugin_")
            .and_then(|m| m.strip_suffix("_total"))
        else {
            continue;
        };
        if let Value::Counter(v) | Value::Untyped(v) = sample.value {
            counters.insert(name.to_string(), v);
        }
    }
    for name in ["calls", "errors", "traps", "timeouts", "host_call_limits"] {
        anyhow::ensure!(
            counters.contains_key(name),
            "/metrics has no sluice_plugin_{name}_total for {plugin}:\n{text}"
        );
    }
    Ok(Counters(counters))
}

/// A plugin's counters at one scrape.
#[derive(Debug, Clone)]
struct Counters(HashMap<String, f64>);

impl Counters {
    fn get(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or_default()
    }

    /// How much each failure counter rose since `before`.
    fn failures_since(&self, before: &Counters) -> [(&'static str, f64); 4] {
        ["errors", "traps", "timeouts", "host_call_limits"]
            .map(|name| (name, self.get(name) - before.get(name)))
    }
}

/// A misbehaviour the probe can be asked for, and how the gateway must count it.
struct Misbehaviour {
    what: &'static str,
    headers: &'static [(&'static str, &'static str)],
    /// The failure counter that rises besides `errors` (`None`: only
    /// `errors`, for an answer the host refused).
    counted_as: Option<&'static str>,
    /// Whether the probe rewrites the request before its answer is refused
    /// (steering does: its header changes stand, only the target is refused).
    rewrites: bool,
}

const MISBEHAVIOURS: &[Misbehaviour] = &[
    Misbehaviour {
        what: "an endless loop",
        headers: &[("x-probe-mode", "loop")],
        counted_as: Some("timeouts"),
        rewrites: false,
    },
    Misbehaviour {
        what: "unbounded recursion",
        headers: &[("x-probe-mode", "recurse")],
        counted_as: Some("traps"),
        rewrites: false,
    },
    Misbehaviour {
        what: "unbounded allocation",
        headers: &[("x-probe-mode", "alloc")],
        counted_as: Some("traps"),
        rewrites: false,
    },
    Misbehaviour {
        what: "a trap",
        headers: &[("x-probe-mode", "trap")],
        counted_as: Some("traps"),
        rewrites: false,
    },
    Misbehaviour {
        what: "a panic",
        headers: &[("x-probe-mode", "panic")],
        counted_as: Some("traps"),
        rewrites: false,
    },
    Misbehaviour {
        what: "a 60 s sleep in the host (WASI)",
        headers: &[("x-probe-mode", "wasi-sleep-ms=60000")],
        counted_as: Some("timeouts"),
        rewrites: false,
    },
    Misbehaviour {
        what: "a flood of log calls",
        headers: &[("x-probe-mode", "flood=log")],
        counted_as: Some("host_call_limits"),
        rewrites: false,
    },
    Misbehaviour {
        what: "a flood of metrics calls",
        headers: &[("x-probe-mode", "flood=metrics")],
        counted_as: Some("host_call_limits"),
        rewrites: false,
    },
    Misbehaviour {
        what: "a flood of clock calls",
        headers: &[("x-probe-mode", "flood=clock")],
        counted_as: Some("host_call_limits"),
        rewrites: false,
    },
    Misbehaviour {
        what: "a flood of random calls",
        headers: &[("x-probe-mode", "flood=random")],
        counted_as: Some("host_call_limits"),
        rewrites: false,
    },
    Misbehaviour {
        what: "a flood of request header reads",
        headers: &[("x-probe-mode", "flood=headers")],
        counted_as: Some("host_call_limits"),
        rewrites: false,
    },
    Misbehaviour {
        what: "a flood of state calls",
        headers: &[("x-probe-mode", "state-loop")],
        counted_as: Some("host_call_limits"),
        rewrites: false,
    },
    Misbehaviour {
        what: "an answer with status 0",
        headers: &[("x-probe-answer", "0")],
        counted_as: None,
        rewrites: false,
    },
    Misbehaviour {
        what: "an answer with status 99",
        headers: &[("x-probe-answer", "99")],
        counted_as: None,
        rewrites: false,
    },
    Misbehaviour {
        what: "an answer with status 100 (not final)",
        headers: &[("x-probe-answer", "100")],
        counted_as: None,
        rewrites: false,
    },
    Misbehaviour {
        what: "an answer with status 1000",
        headers: &[("x-probe-answer", "1000")],
        counted_as: None,
        rewrites: false,
    },
    Misbehaviour {
        what: "an answer with an invalid header name",
        headers: &[("x-probe-answer", "200"), ("x-probe-bad-header", "name")],
        counted_as: None,
        rewrites: false,
    },
    Misbehaviour {
        what: "an answer with a header value holding a line break",
        headers: &[("x-probe-answer", "200"), ("x-probe-bad-header", "value")],
        counted_as: None,
        rewrites: false,
    },
    Misbehaviour {
        what: "steering to an upstream that does not exist",
        headers: &[("x-probe-steer", "nowhere")],
        counted_as: None,
        rewrites: true,
    },
];

/// A gateway with a hostile route (`/hostile/`, through plugin `hostile`
/// with `extra`) and another route (everything else, through plugin
/// `healthy`), both to `origin`; and the admin API. The healthy plugin's
/// deadline is a generous 1 s: on two busy cores a 10 ms one is sometimes
/// missed by a well-behaved call, and these tests are not about that.
async fn two_routes(
    origin: &Origin,
    hostile: &str,
    healthy: &str,
    extra: &str,
) -> anyhow::Result<TestGateway> {
    Manifest::new()
        .listener("web", "")
        .raw(&admin())
        .upstream("app", &[origin.addr()], "")
        .raw(&probe_table(hostile, extra))
        .raw(&probe_table(healthy, "deadline = \"1s\""))
        .route(
            "hostile",
            "{ path_prefix = \"/hostile/\" }",
            "app",
            &format!("policies = [\"{hostile}\"]"),
        )
        .route("other", "{}", "app", &format!("policies = [\"{healthy}\"]"))
        .start()
        .await
}

/// Runs every misbehaviour once against a hostile plugin whose `on_error`
/// is `on_error`, checking for each: the answer `on_error` prescribes
/// within bounded time, the next request on the route served by the policy,
/// the other route served, and the counters in `/metrics`.
async fn each_misbehaviour_costs_one_request(on_error: &str) -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let hostile = unique("hostile");
    let healthy = unique("healthy");
    // A generous deadline, so that what stops a flood is the host-call
    // limit (10,000 calls take milliseconds), not the clock.
    let gateway = two_routes(
        &origin,
        &hostile,
        &healthy,
        &format!("on_error = \"{on_error}\"\ndeadline = \"500ms\"\nmemory = \"16MiB\""),
    )
    .await?;
    let web = gateway.addr("web");
    let mut client: H1 = H1::connect(web).await?;

    for case in MISBEHAVIOURS {
        let what = format!("{} (on_error = {on_error})", case.what);
        let before = plugin_counters(&gateway, &hostile).await?;
        let forwarded = origin.requests();

        // The misbehaving request, on a connection of its own: a failed
        // call does not cost the client its connection either, but that
        // is checked below with `client`.
        let started = Instant::now();
        let mut conn: H1 = H1::connect(web).await?;
        let bad = within(
            &what,
            WAIT,
            conn.request(probe_get("/hostile/x", case.headers)),
        )
        .await??;
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(3),
            "{what}: stopped within the 500 ms deadline and then some, took {took:?}"
        );
        match on_error {
            "closed" => {
                assert_eq!(bad.status, 503, "{what}: {}", bad.excerpt());
                assert_eq!(
                    origin.requests(),
                    forwarded,
                    "{what}: a request failed closed is not forwarded"
                );
            }
            _ => {
                assert_eq!(
                    bad.status,
                    200,
                    "{what}: fail-open forwards: {}",
                    bad.excerpt()
                );
                assert_eq!(origin.requests(), forwarded + 1, "{what}");
                let seen = origin.last_request().expect("the origin saw the request");
                assert_eq!(
                    seen.uri.path(),
                    "/hostile/x",
                    "{what}: the request was forwarded as sent"
                );
                assert_eq!(
                    seen.headers.get("x-probe-tag").is_some(),
                    case.rewrites,
                    "{what}: forwarded as if the policy were absent"
                );
            }
        }
        // The same connection still works after the failure.
        let again = conn.request(probe_get("/hostile/x", &[])).await?;
        assert_eq!(again.status, 200, "{what}: {}", again.excerpt());

        // The next request on the hostile route runs the policy normally.
        let next = client.request(probe_get("/hostile/y", &[])).await?;
        assert_eq!(next.status, 200, "{what}: {}", next.excerpt());
        let seen = origin.last_request().expect("the origin saw the request");
        assert_eq!(
            seen.headers
                .get("x-probe-tag")
                .and_then(|v| v.to_str().ok()),
            Some("none"),
            "{what}: the policy ran on the next request"
        );
        // The other route serves.
        let other = client.request(probe_get("/other", &[])).await?;
        assert_eq!(other.status, 200, "{what}: {}", other.excerpt());

        // Exactly one failure, counted under its name.
        let after = plugin_counters(&gateway, &hostile).await?;
        for (name, rose) in after.failures_since(&before) {
            let expected = if name == "errors" || Some(name) == case.counted_as {
                1.0
            } else {
                0.0
            };
            assert_eq!(
                rose, expected,
                "{what}: sluice_plugin_{name}_total rose by {rose}: {after:?} after {before:?}"
            );
        }
    }
    let healthy = plugin_counters(&gateway, &healthy).await?;
    assert_eq!(
        healthy.get("errors"),
        0.0,
        "the other route's plugin never failed: {healthy:?}"
    );
    assert!(healthy.get("calls") >= MISBEHAVIOURS.len() as f64);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_misbehaviour_fails_closed_for_one_request() -> anyhow::Result<()> {
    let _machine = MACHINE.read().await;
    each_misbehaviour_costs_one_request("closed").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_misbehaviour_fails_open_for_one_request() -> anyhow::Result<()> {
    let _machine = MACHINE.read().await;
    each_misbehaviour_costs_one_request("open").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_finds_no_files_no_sockets_and_no_environment() -> anyhow::Result<()> {
    let _machine = MACHINE.read().await;
    let origin = Origin::echo("app").await?;
    let name = unique("sandboxed");
    let gateway = Manifest::new()
        .listener("web", "")
        .upstream("app", &[origin.addr()], "")
        .raw(&probe_table(&name, "deadline = \"2s\""))
        .route("all", "{}", "app", &format!("policies = [\"{name}\"]"))
        .start()
        .await?;
    let marker = std::path::Path::new("/tmp/sluice-probe");
    if marker.exists() {
        std::fs::remove_file(marker)?;
    }
    let target = origin.addr().to_string();
    let reply = H1::connect(gateway.addr("web"))
        .await?
        .request(probe_get(
            "/",
            &[
                ("x-probe-mode", "sandbox"),
                ("x-probe-sandbox-target", &target),
            ],
        ))
        .await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    let seen = origin.last_request().expect("the origin saw the request");
    let report = seen
        .headers
        .get("x-probe-sandbox")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    println!("the plugin's sandbox report: {report}");
    let found: HashMap<&str, &str> = report
        .split_whitespace()
        .filter_map(|pair| pair.split_once('='))
        .collect();
    for capability in ["fs", "env", "args", "tcp", "listen", "udp", "dns"] {
        let verdict = found.get(capability).copied().unwrap_or("missing");
        assert!(
            verdict.starts_with("denied") || verdict == "none",
            "the plugin reached {capability}: {verdict} (whole report: {report:?})"
        );
    }
    // What the plugin reports is checked against what happened: its
    // connection attempt never reached the origin (the gateway's own
    // connection is the only one), and its file was not created.
    assert_eq!(
        origin.connections(),
        1,
        "only the gateway connected to the origin"
    );
    assert!(!marker.exists(), "the plugin created {}", marker.display());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_calls_are_capped_per_call() -> anyhow::Result<()> {
    let _machine = MACHINE.read().await;
    let origin = Origin::echo("app").await?;
    let capped = unique("capped");
    let default = unique("default");
    let gateway = Manifest::new()
        .listener("web", "")
        .raw(&admin())
        .upstream("app", &[origin.addr()], "")
        .raw(&probe_table(
            &capped,
            "deadline = \"5s\"\nmax_host_calls = 1000",
        ))
        .raw(&probe_table(&default, "deadline = \"5s\""))
        .route(
            "capped",
            "{ path_prefix = \"/capped/\" }",
            "app",
            &format!("policies = [\"{capped}\"]"),
        )
        .route("all", "{}", "app", &format!("policies = [\"{default}\"]"))
        .start()
        .await?;
    let mut client: H1 = H1::connect(gateway.addr("web")).await?;

    // Under the cap, every call: the count starts over with each call.
    for _ in 0..3 {
        let reply = client
            .request(probe_get("/capped/", &[("x-probe-mode", "calls=900")]))
            .await?;
        assert_eq!(
            reply.status,
            200,
            "900 calls fit in 1000: {}",
            reply.excerpt()
        );
    }
    // Over it: stopped at once, far from the 5 s deadline.
    let started = Instant::now();
    let reply = client
        .request(probe_get("/capped/", &[("x-probe-mode", "calls=1100")]))
        .await?;
    let took = started.elapsed();
    assert_eq!(reply.status, 503, "{}", reply.excerpt());
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let counters = plugin_counters(&gateway, &capped).await?;
    assert_eq!(
        (counters.get("host_call_limits"), counters.get("timeouts")),
        (1.0, 0.0),
        "{counters:?}"
    );

    // The default cap is 10,000: a flood of metrics calls gets through
    // about that many (less the few the probe makes before it), then stops.
    let reply = client
        .request(probe_get("/", &[("x-probe-mode", "flood=metrics")]))
        .await?;
    assert_eq!(reply.status, 503, "{}", reply.excerpt());
    let flooded = gateway.counter(&default, "flood");
    assert!(
        (9_990..10_000).contains(&flooded),
        "the flood made {flooded} metrics calls"
    );
    let counters = plugin_counters(&gateway, &default).await?;
    assert_eq!(
        (counters.get("host_call_limits"), counters.get("timeouts")),
        (1.0, 0.0),
        "{counters:?}"
    );
    let reply = client.request(probe_get("/", &[])).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());

    // The cap must allow at least one call.
    let zero = Manifest::new()
        .listener("web", "")
        .upstream("app", &[origin.addr()], "")
        .raw(&probe_table("zero", "max_host_calls = 0"))
        .route("all", "{}", "app", "policies = [\"zero\"]")
        .build();
    let refused = TestGateway::start(&zero)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        refused.contains("plugin.zero.max_host_calls: must be at least 1"),
        "{refused}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_a_policy_must_not_set_are_refused() -> anyhow::Result<()> {
    let _machine = MACHINE.read().await;
    let origin = Origin::echo("app").await?;
    let name = unique("headers");
    let gateway = Manifest::new()
        .listener("web", "")
        .raw(&admin())
        .upstream("app", &[origin.addr()], "")
        .raw(&probe_table(&name, "on_error = \"closed\""))
        .route("all", "{}", "app", &format!("policies = [\"{name}\"]"))
        .start()
        .await?;
    let web = gateway.addr("web");
    let mut client: H1 = H1::connect(web).await?;
    for kind in ["name", "value", "framing"] {
        // On the request and on the response: the host refuses the header
        // and tells the policy, which goes on.
        let reply = client
            .request(probe_get("/", &[("x-probe-bad-header", kind)]))
            .await?;
        assert_eq!(reply.status, 200, "{kind}: {}", reply.excerpt());
        let seen = origin.last_request().expect("the origin saw the request");
        assert_eq!(
            seen.headers
                .get("x-probe-bad-header-result")
                .and_then(|v| v.to_str().ok()),
            Some("refused"),
            "{kind}: the request header was refused"
        );
        assert!(seen.headers.get("x-injected").is_none(), "{kind}");
        assert!(seen.headers.get("x-probe-injected").is_none(), "{kind}");
        assert_eq!(
            reply.header("x-probe-bad-response-header"),
            Some("refused"),
            "{kind}: the response header was refused"
        );
        assert!(reply.headers.get("x-injected").is_none(), "{kind}");
        assert_ne!(reply.header("content-length"), Some("0"), "{kind}");
        assert!(!reply.body.is_empty(), "{kind}: the body arrived whole");
    }
    // An answer whose framing header the gateway owns is sent with the
    // gateway's framing, over HTTP/1.1 and HTTP/2.
    let framing = [("x-probe-answer", "403"), ("x-probe-bad-header", "framing")];
    let reply = client.request(probe_get("/", &framing)).await?;
    assert_eq!(reply.status, 403, "{}", reply.excerpt());
    assert_eq!(reply.text(), "answered by probe\n");
    let mut h2: H2 = H2::connect(web).await?;
    let mut req = probe_get("/", &framing);
    *req.uri_mut() = "http://app.test/".parse()?;
    let reply = h2.request(req).await?;
    assert_eq!(reply.status, 403, "{}", reply.excerpt());
    assert_eq!(reply.text(), "answered by probe\n");
    let counters = plugin_counters(&gateway, &name).await?;
    assert_eq!(counters.get("errors"), 0.0, "{counters:?}");
    Ok(())
}

/// A gateway whose upstream `pool` (origins `a` and `b`) is balanced by the
/// picker with `on_error`; route `/other/` goes to `other` through no plugin.
async fn picker_gateway(
    a: &Origin,
    b: &Origin,
    other: &Origin,
    picker: &str,
    on_error: &str,
) -> anyhow::Result<TestGateway> {
    Manifest::new()
        .listener("web", "")
        .raw(&admin())
        .raw(&format!(
            "[plugin.{picker}]\nsource = \"{PICKER}\"\non_error = \"{on_error}\"\ndeadline = \"200ms\"\n"
        ))
        .upstream(
            "pool",
            &[a.addr(), b.addr()],
            &format!("balancer = \"{picker}\""),
        )
        .upstream("other", &[other.addr()], "")
        .route("other", "{ path_prefix = \"/other/\" }", "other", "")
        .route("all", "{}", "pool", "")
        .start()
        .await
}

async fn a_balancer_that_misbehaves_costs_one_request(on_error: &str) -> anyhow::Result<()> {
    let a = Origin::echo("a").await?;
    let b = Origin::echo("b").await?;
    let other = Origin::echo("other").await?;
    let picker = unique("picker");
    let gateway = picker_gateway(&a, &b, &other, &picker, on_error).await?;
    let mut client: H1 = H1::connect(gateway.addr("web")).await?;

    // Valid positions are honoured.
    for (pick, origin) in [("0", "a"), ("1", "b")] {
        let reply = client.request(probe_get("/", &[("x-pick", pick)])).await?;
        assert_eq!(reply.status, 200, "{}", reply.excerpt());
        assert_eq!(reply.header("x-origin"), Some(origin), "pick {pick}");
    }
    // Declining is an answer, not a failure: 503 whatever on_error says.
    let reply = client
        .request(probe_get("/", &[("x-pick", "none")]))
        .await?;
    assert_eq!(reply.status, 503, "{}", reply.excerpt());

    let cases = [
        ("2", None),
        ("4294967295", None),
        ("loop", Some("timeouts")),
        ("trap", Some("traps")),
    ];
    for (pick, counted_as) in cases {
        let what = format!("pick {pick} (on_error = {on_error})");
        let before = plugin_counters(&gateway, &picker).await?;
        let (a_before, b_before) = (a.requests(), b.requests());
        let reply = within(
            &what,
            WAIT,
            client.request(probe_get("/", &[("x-pick", pick)])),
        )
        .await??;
        let served = a.requests() + b.requests() - a_before - b_before;
        if on_error == "closed" {
            assert_eq!(reply.status, 503, "{what}: {}", reply.excerpt());
            assert_eq!(served, 0, "{what}: no endpoint was contacted");
        } else {
            assert_eq!(reply.status, 200, "{what}: {}", reply.excerpt());
            assert_eq!(served, 1, "{what}: the core picked an endpoint instead");
        }
        // The next pick is the balancer's again, and the other route serves.
        let next = client.request(probe_get("/", &[("x-pick", "1")])).await?;
        assert_eq!(next.header("x-origin"), Some("b"), "{what}");
        let reply = client.request(probe_get("/other/", &[])).await?;
        assert_eq!(reply.header("x-origin"), Some("other"), "{what}");

        let after = plugin_counters(&gateway, &picker).await?;
        for (name, rose) in after.failures_since(&before) {
            let expected = if name == "errors" || Some(name) == counted_as {
                1.0
            } else {
                0.0
            };
            assert_eq!(
                rose, expected,
                "{what}: sluice_plugin_{name}_total: {after:?}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balancer_picking_no_candidate_fails_closed_for_one_request() -> anyhow::Result<()> {
    let _machine = MACHINE.read().await;
    a_balancer_that_misbehaves_costs_one_request("closed").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balancer_picking_no_candidate_fails_open_for_one_request() -> anyhow::Result<()> {
    let _machine = MACHINE.read().await;
    a_balancer_that_misbehaves_costs_one_request("open").await
}

/// Closed-loop load: `connections` clients, each sending `GET path` back to
/// back on its own connection, until `stop`; returns the requests answered
/// with `expect`, and fails on any other answer.
async fn closed_loop(
    addr: SocketAddr,
    connections: usize,
    headers: &'static [(&'static str, &'static str)],
    path: &'static str,
    expect: u16,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<usize> {
    let mut clients = Vec::new();
    for _ in 0..connections {
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut client: H1 = H1::connect(addr).await?;
            let mut done = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let reply = client.request(probe_get(path, headers)).await?;
                anyhow::ensure!(
                    reply.status == expect,
                    "{path} {headers:?}: {}",
                    reply.excerpt()
                );
                done += 1;
            }
            Ok(done)
        }));
    }
    let mut total = 0;
    for client in clients {
        total += client.await??;
    }
    Ok(total)
}

/// What floods the hostile route while the other route's throughput is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flood {
    /// Nothing.
    None,
    /// Ordinary requests, to the other route (the hostile route's plugin
    /// has the default 10 ms deadline, which a well-behaved call sometimes
    /// misses on two busy cores).
    Ordinary,
    /// Requests whose policy loops until its deadline (half of the
    /// connections) or allocates until it runs out of memory or time.
    Hostile,
}

/// Requests per second the other route serves with `load` closed-loop
/// connections for `window`, while `flooders` connections send `flood`;
/// also the flooding requests answered.
async fn measure(
    addr: SocketAddr,
    load: usize,
    flood: Flood,
    flooders: usize,
    window: Duration,
) -> anyhow::Result<(f64, usize)> {
    /// Request headers, and the status they must get.
    type Kind = (&'static [(&'static str, &'static str)], u16);
    const ORDINARY: &[Kind] = &[(&[], 200)];
    const HOSTILE: &[Kind] = &[
        (&[("x-probe-mode", "loop")], 503),
        (&[("x-probe-mode", "alloc")], 503),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let (path, kinds) = match flood {
        Flood::None => ("/", &[][..]),
        Flood::Ordinary => ("/other", ORDINARY),
        Flood::Hostile => ("/hostile/", HOSTILE),
    };
    let floods: Vec<_> = kinds
        .iter()
        .cycle()
        .take(if kinds.is_empty() { 0 } else { flooders })
        .map(|&(headers, status)| {
            tokio::spawn(closed_loop(addr, 1, headers, path, status, stop.clone()))
        })
        .collect();
    let other = tokio::spawn(closed_loop(addr, load, &[], "/other", 200, stop.clone()));
    let started = Instant::now();
    tokio::time::sleep(window).await;
    stop.store(true, Ordering::Relaxed);
    let served = other.await??;
    let elapsed = started.elapsed();
    let mut flooded = 0;
    for flood in floods {
        flooded += flood.await??;
    }
    Ok((served as f64 / elapsed.as_secs_f64(), flooded))
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

/// The other route's throughput alone, beside a flood of ordinary requests
/// (to the other route itself), and beside a flood of requests to the
/// hostile route whose policy loops until its deadline or allocates until it
/// runs out of memory or time.
///
/// Everything (clients, gateway, origin) shares the test's two runtime
/// threads, on a machine that may have two busy cores. Any flood takes its
/// share of those: ordinary requests on as many connections as the other
/// route's load take about half, so "half of its throughput alone" is not a
/// bound a hostile flood could be held to. The main bound is on the hostile
/// flood against the ordinary one instead: the other route must keep 30% of
/// what it keeps beside ordinary traffic, and 10% of what it serves alone.
///
/// Measured on two cores also running other builds: 51-80% and 25-52%
/// (load 3-4), 42-47% and 14-24% (load 5). A plugin's long calls share half
/// the cores (one thread here) and every call yields to other requests
/// at every epoch tick (1 ms). Without the share, looping and allocating calls take every
/// thread: 29-34% and 9-17% (load 3-4), which the bounds catch only about
/// half the time; they are set for the load they must survive. Without the
/// yields the other route gets next to nothing, which they always catch.
///
/// The phases alternate, so that a change in the machine's load hits all
/// three, and the bounds are on the median round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_routes_keep_their_throughput_while_a_route_is_flooded() -> anyhow::Result<()> {
    let _machine = MACHINE.write().await;
    let origin = Origin::echo("app").await?;
    let hostile = unique("hostile");
    let healthy = unique("healthy");
    let gateway = two_routes(&origin, &hostile, &healthy, "on_error = \"closed\"").await?;
    let addr = gateway.addr("web");
    let (load, flooders) = (4, 4);
    let (rounds, window) = (4, Duration::from_secs(1));
    let phase = async |flood: Flood| {
        measure(addr, load, flood, flooders, window)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "beside {flood:?} flood: {e}; other route's plugin {:?}",
                    gateway.plugin(&healthy).stats
                )
            })
    };

    // Warm up: instances made, connections pooled.
    phase(Flood::Ordinary).await?;
    let (mut alone, mut ordinary, mut hostile_rates, mut flooded) =
        (Vec::new(), Vec::new(), Vec::new(), 0);
    for _ in 0..rounds {
        alone.push(phase(Flood::None).await?.0);
        ordinary.push(phase(Flood::Ordinary).await?.0);
        let (rate, hostile_requests) = phase(Flood::Hostile).await?;
        hostile_rates.push(rate);
        flooded += hostile_requests;
    }
    let ratios =
        |of: &[f64], to: &[f64]| -> Vec<f64> { of.iter().zip(to).map(|(a, b)| a / b).collect() };
    let vs_ordinary = median(&ratios(&hostile_rates, &ordinary));
    let vs_alone = median(&ratios(&hostile_rates, &alone));
    let rounded = |rates: &[f64]| rates.iter().map(|r| r.round()).collect::<Vec<_>>();
    println!(
        "other route, {load} closed-loop connections, {rounds} rounds of {window:?} per phase; \
         req/s alone {:?}; beside {flooders} connections of ordinary requests {:?}; \
         beside {flooders} connections of looping/allocating requests {:?} \
         ({flooded} hostile requests, {:.0}/s, each 503); \
         beside hostile vs beside ordinary: {:.0}%, vs alone: {:.0}% (medians)",
        rounded(&alone),
        rounded(&ordinary),
        rounded(&hostile_rates),
        flooded as f64 / (window.as_secs_f64() * rounds as f64),
        vs_ordinary * 100.0,
        vs_alone * 100.0,
    );
    let counters = plugin_counters(&gateway, &hostile).await?;
    println!("hostile plugin: {counters:?}");
    assert!(flooded > 0, "the hostile route was flooded");
    assert!(
        vs_ordinary >= 0.3,
        "beside a hostile flood the other route kept {:.0}% of what it keeps beside \
         ordinary traffic",
        vs_ordinary * 100.0
    );
    assert!(
        vs_alone >= 0.1,
        "beside a hostile flood the other route kept {:.0}% of what it serves alone",
        vs_alone * 100.0
    );
    let healthy = plugin_counters(&gateway, &healthy).await?;
    assert_eq!(healthy.get("errors"), 0.0, "{healthy:?}");
    Ok(())
}
