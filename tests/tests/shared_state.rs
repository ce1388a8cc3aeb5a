//! The Redis state backend (`[state] backend = "redis"`) with a real
//! `redis-server` (tests/src/redis.rs) and real gateways:
//!
//! - two `sluice run` processes share one rate-limit budget through Redis
//!   (strict mode within 5 %, batched mode within 10 %), while a plugin
//!   with `state = "local"` on the same gateways gets one budget per
//!   process (twice the admissions, which shows the shared test can fail);
//! - a circuit breaker tripped through one process refuses requests on the
//!   other without forwarding them;
//! - Redis killed under load: `on_error = "open"` keeps serving from
//!   in-process state, `on_error = "closed"` answers 503, no request waits
//!   beyond the operation timeout, the state metrics say so, and both routes
//!   recover once Redis is back on the same port;
//! - a bad `[state]` table is refused naming the key, by `sluice check`
//!   and by a reload, which keeps the old config serving.
//!
//! The gateways that must share state are separate processes: plugin state
//! is kept per plugin name for the whole process, so two gateways in this
//! test process would share it even without Redis. Each test starts its own
//! `redis-server`, and names its plugins and key prefixes differently. Without
//! `redis-server` installed these tests print `skipped` (under `CI=true`
//! they fail).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus_parse::{Sample, Scrape, Value};
use sluice_tests::client::{H1, admin_get, admin_send, get};
use sluice_tests::origin::ORIGIN_HEADER;
use sluice_tests::redis::RedisServer;
use sluice_tests::{Manifest, Mode, Origin, Reply, TestGateway, WAIT, within};

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice-cli");
const TOKEN: &str = "shared-state-token-0123456789";

/// `[admin]` on a free loopback port, with [`TOKEN`].
fn admin() -> String {
    format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n")
}

/// Starts a `redis-server`; `None`: not installed, skip the test.
fn redis() -> anyhow::Result<Option<RedisServer>> {
    tokio::task::block_in_place(RedisServer::start)
}

/// `[state]` on `redis` with key prefix `prefix`, plus `extra` lines.
fn state(redis: &RedisServer, prefix: &str, extra: &str) -> String {
    format!(
        "[state]\nbackend = \"redis\"\nurl = \"{}\"\nprefix = \"{prefix}\"\n{extra}\n",
        redis.url()
    )
}

/// `[plugin.NAME]` with `source`, `config` (an inline table) and `extra`
/// lines. The deadline is generous: a noisy machine must not turn a slow
/// call into a skipped policy.
fn plugin(name: &str, source: &str, config: &str, extra: &str) -> String {
    format!(
        "[plugin.{name}]\nsource = \"{source}\"\nconfig = {config}\ndeadline = \"1s\"\n{extra}\n"
    )
}

/// nginx's `limit_req rate=10r/s burst=20 nodelay`, one budget per route:
/// both gateways count every request of a route under the same key.
const RATE: &str = r#"{ rate = "10r/s", burst = 20, nodelay = true, key = "route" }"#;
const RATE_PER_SECOND: f64 = 10.0;
/// The burst plus the request that starts it.
const BURST: f64 = 21.0;

/// `sluice run --workers 1` as a child process, killed on drop.
struct Sluice {
    child: Child,
    /// Listener "web".
    web: SocketAddr,
    /// The admin API.
    admin: SocketAddr,
    /// What it wrote to stderr, for failure messages.
    stderr: Arc<Mutex<String>>,
    /// Holds the manifest file.
    _dir: tempfile::TempDir,
}

impl Sluice {
    /// Writes `manifest` (with listener "web" and an `[admin]` table), runs
    /// it and waits until the `listening` lines of both are logged.
    fn run(manifest: &str) -> anyhow::Result<Sluice> {
        tokio::task::block_in_place(|| Sluice::run_blocking(manifest))
    }

    fn run_blocking(manifest: &str) -> anyhow::Result<Sluice> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("sluice.toml");
        std::fs::write(&path, manifest)?;
        let mut child = Command::new(SLUICE)
            .args(["run", "--workers", "1", "-c"])
            .arg(&path)
            .env("RUST_LOG", "info,sluice::access=off")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let stderr_pipe = child
            .stderr
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::channel::<String>();
        // Both pipes are read to the end, so the gateway never blocks on a
        // full pipe; stdout lines go to `lines` while anyone listens.
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            let mut listening = true;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if listening && tx.send(line).is_err() {
                    listening = false;
                }
            }
        });
        let collected = stderr.clone();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr_pipe)
                .lines()
                .map_while(Result::ok)
            {
                let mut all = collected.lock().unwrap_or_else(PoisonError::into_inner);
                all.push_str(&line);
                all.push('\n');
            }
        });
        let mut gateway = Sluice {
            child,
            web: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            stderr,
            _dir: dir,
        };
        let (mut web, mut admin) = (None, None);
        let started = Instant::now();
        while web.is_none() || admin.is_none() {
            let left = WAIT.saturating_sub(started.elapsed());
            let Ok(line) = lines.recv_timeout(left) else {
                let status = gateway.child.try_wait()?;
                anyhow::bail!(
                    "sluice run did not log both listeners within {WAIT:?} (exit: {status:?}); stderr:\n{}\n--- manifest ---\n{manifest}",
                    gateway.stderr()
                );
            };
            let Ok(log) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let addr = || {
                log["addr"]
                    .as_str()
                    .unwrap_or_default()
                    .parse::<SocketAddr>()
            };
            if log["message"] == "listening" && log["listener"] == "web" {
                web = Some(addr()?);
            } else if log["message"] == "admin API listening" {
                admin = Some(addr()?);
            }
        }
        gateway.web = web.ok_or_else(|| anyhow::anyhow!("no web listener"))?;
        gateway.admin = admin.ok_or_else(|| anyhow::anyhow!("no admin listener"))?;
        Ok(gateway)
    }

    fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        // SIGKILL to the PID this test started.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Scrapes `GET /metrics` on the admin API at `admin` and parses it.
async fn scrape(admin: SocketAddr) -> anyhow::Result<Vec<Sample>> {
    let reply = admin_get(admin, "/metrics", Some(TOKEN)).await?;
    anyhow::ensure!(reply.status == 200, "scrape: {}", reply.excerpt());
    let text = reply.text();
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))?;
    Ok(scrape.samples)
}

/// The value of sample `metric` whose labels include `labels`.
fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.metric == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(k).is_some_and(|have| have == *v))
        })
        .and_then(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => None,
        })
}

/// The state metrics of one scrape.
#[derive(Debug, Clone, Copy, PartialEq)]
struct StateMetrics {
    up: Option<f64>,
    ok: f64,
    error: f64,
    timeout: f64,
    fallbacks: f64,
}

async fn state_metrics(admin: SocketAddr) -> anyhow::Result<StateMetrics> {
    let samples = scrape(admin).await?;
    let operations = |result: &str| {
        metric(
            &samples,
            "sluice_state_operations_total",
            &[("result", result)],
        )
        .unwrap_or(0.0)
    };
    Ok(StateMetrics {
        up: metric(&samples, "sluice_state_backend_up", &[]),
        ok: operations("ok"),
        error: operations("error"),
        timeout: operations("timeout"),
        fallbacks: metric(&samples, "sluice_state_fallbacks_total", &[]).unwrap_or(0.0),
    })
}

/// Waits (up to `limit`) until `sluice_state_backend_up` is `want`.
async fn wait_backend_up(admin: SocketAddr, want: f64, limit: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let metrics = state_metrics(admin).await?;
        if metrics.up == Some(want) {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < limit,
            "sluice_state_backend_up is not {want} after {limit:?}: {metrics:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One request of a load run.
#[derive(Debug, Clone)]
struct Outcome {
    /// Which target (index into the targets given to [`load`]).
    target: usize,
    /// When it was sent, since the run's start.
    sent: Duration,
    /// How long its answer took.
    took: Duration,
    status: u16,
    /// Whether the origin answered (its `x-origin` header).
    from_origin: bool,
}

/// One keep-alive client per target (gateway address and path), each
/// sending `GET path` one after another, with `pause` in between, until
/// `run` has passed since `start`.
async fn load(
    targets: &[(SocketAddr, &str)],
    start: Instant,
    run: Duration,
    pause: Duration,
) -> anyhow::Result<Vec<Outcome>> {
    let mut clients = Vec::new();
    for &(addr, path) in targets {
        clients.push((H1::connect(addr).await?, path.to_string()));
    }
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(target, (mut client, path)): (usize, (H1, String))| {
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while start.elapsed() < run {
                    let sent = start.elapsed();
                    let reply = client.request(get("app.test", &path)).await?;
                    outcomes.push(Outcome {
                        target,
                        sent,
                        took: start.elapsed() - sent,
                        status: reply.status.as_u16(),
                        from_origin: reply.header(ORIGIN_HEADER).is_some(),
                    });
                    tokio::time::sleep(pause).await;
                }
                anyhow::Ok(outcomes)
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(within("a load client", run + WAIT, task).await???);
    }
    Ok(all)
}

/// What a rate-limited load run admitted.
#[derive(Debug)]
struct Admitted {
    admitted: usize,
    limited: usize,
    /// Admitted per target.
    per_target: Vec<usize>,
    /// The last request's send time: how long the budget had to refill.
    last_sent: Duration,
}

/// Counts 200s (each from the origin) and 429s (each from the gateway);
/// anything else fails the test.
fn admitted(outcomes: &[Outcome], targets: usize) -> Admitted {
    let mut per_target = vec![0; targets];
    let mut limited = 0;
    for outcome in outcomes {
        match outcome.status {
            200 => {
                assert!(
                    outcome.from_origin,
                    "a 200 not from the origin: {outcome:?}"
                );
                per_target[outcome.target] += 1;
            }
            429 => {
                assert!(!outcome.from_origin, "a 429 from the origin: {outcome:?}");
                limited += 1;
            }
            _ => panic!("only 200 and 429 expected: {outcome:?}"),
        }
    }
    Admitted {
        admitted: per_target.iter().sum(),
        limited,
        per_target,
        last_sent: outcomes.iter().map(|o| o.sent).max().unwrap_or_default(),
    }
}

/// Two `sluice run` processes with the same manifest: the admin API,
/// `state_table`, the rate limit `name` (with `RATE` and `plugin_extra`)
/// on route `/name/`, and `more` (raw TOML: plugins and routes).
fn two_gateways(
    origin: &Origin,
    state_table: &str,
    name: &str,
    plugin_extra: &str,
    more: &str,
) -> anyhow::Result<(Sluice, Sluice)> {
    let manifest = Manifest::new()
        .listener("web", "")
        .raw(&admin())
        .raw(state_table)
        .raw(&plugin(name, "builtin:rate-limit", RATE, plugin_extra))
        .upstream("app", &[origin.addr()], "")
        .route(
            name,
            &format!("{{ path_prefix = \"/{name}/\" }}"),
            "app",
            &format!("policies = [\"{name}\"]"),
        )
        .raw(more)
        .build();
    Ok((Sluice::run(&manifest)?, Sluice::run(&manifest)?))
}

/// 4 clients, 2 on each gateway, on `path` for `run`: what they were admitted.
async fn rate_run(a: &Sluice, b: &Sluice, path: &str, run: Duration) -> anyhow::Result<Admitted> {
    let targets = [(a.web, path), (a.web, path), (b.web, path), (b.web, path)];
    // Keep knocking, but leave the CPU to the gateways and the tests alongside.
    let outcomes = load(&targets, Instant::now(), run, Duration::from_millis(2)).await?;
    let result = admitted(&outcomes, targets.len());
    eprintln!("{path}: {result:?}");
    Ok(result)
}

/// The admissions a budget allows in `elapsed`: the burst at once, then the rate.
fn budget(elapsed: Duration) -> f64 {
    BURST + RATE_PER_SECOND * elapsed.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_one_rate_limit_budget_through_redis() -> anyhow::Result<()> {
    let Some(redis) = redis()? else {
        return Ok(());
    };
    let origin = Origin::echo("app").await?;
    let prefix = "sluice-strict:";
    // The same gateways also carry a rate limit kept in process: one
    // budget per gateway, so twice the admissions.
    let local = plugin("rl-local", "builtin:rate-limit", RATE, "state = \"local\"");
    let local_route = "\n[[route]]\nname = \"rl-local\"\nmatch = { path_prefix = \"/rl-local/\" }\nupstream = \"app\"\npolicies = [\"rl-local\"]\n";
    // A generous operation timeout: this test is about sharing, and a
    // busy 2-core machine must not turn a slow round trip into a 503.
    let (a, b) = two_gateways(
        &origin,
        &state(&redis, prefix, "mode = \"strict\"\ntimeout = \"500ms\""),
        "rl-shared",
        "on_error = \"closed\"",
        &format!("{local}\n{local_route}"),
    )?;
    wait_backend_up(a.admin, 1.0, WAIT).await?;
    wait_backend_up(b.admin, 1.0, WAIT).await?;

    let shared = rate_run(&a, &b, "/rl-shared/x", Duration::from_secs(5)).await?;
    let expected = budget(shared.last_sent);
    let got = shared.admitted as f64;
    assert!(
        (got - expected).abs() <= expected * 0.05,
        "two gateways sharing one budget admitted {got}, expected {expected:.1} ± 5% ({shared:?})"
    );
    assert!(
        shared.per_target.iter().all(|&n| n > 0),
        "every client was admitted some: {shared:?}"
    );
    assert!(
        shared.limited > 100,
        "the clients kept knocking: {shared:?}"
    );
    assert_eq!(
        origin.requests(),
        shared.admitted,
        "every 200 came from the origin"
    );
    let keys = redis.keys(&format!("{prefix}*"))?;
    assert!(
        keys.iter()
            .any(|k| k.starts_with(&format!("{prefix}rl-shared:t:"))),
        "no throttle key {prefix}rl-shared:t:... in Redis: {keys:?}"
    );

    // The same load on the plugin with `state = "local"`: each gateway
    // has its own budget, nothing of it is in Redis.
    let local = rate_run(&a, &b, "/rl-local/x", Duration::from_secs(3)).await?;
    let expected = 2.0 * budget(local.last_sent);
    let got = local.admitted as f64;
    assert!(
        (got - expected).abs() <= expected * 0.10,
        "two gateways with a local budget each admitted {got}, expected {expected:.1} ± 10% ({local:?})"
    );
    let local_keys = redis.keys(&format!("{prefix}rl-local*"))?;
    assert!(
        local_keys.is_empty(),
        "local state went to Redis: {local_keys:?}"
    );
    for gateway in [&a, &b] {
        let metrics = state_metrics(gateway.admin).await?;
        assert_eq!(metrics.up, Some(1.0), "{metrics:?}");
        assert!(metrics.ok > 0.0, "{metrics:?}");
        assert_eq!(
            (metrics.error, metrics.timeout, metrics.fallbacks),
            (0.0, 0.0, 0.0),
            "Redis never failed: {metrics:?}\n{}",
            gateway.stderr()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_mode_shares_the_budget_approximately() -> anyhow::Result<()> {
    let Some(redis) = redis()? else {
        return Ok(());
    };
    let origin = Origin::echo("app").await?;
    let prefix = "sluice-batched:";
    let (a, b) = two_gateways(
        &origin,
        &state(
            &redis,
            prefix,
            "mode = \"batched\"\nsync_interval = \"10ms\"\ntimeout = \"500ms\"",
        ),
        "rl-batched",
        "on_error = \"closed\"",
        "",
    )?;
    wait_backend_up(a.admin, 1.0, WAIT).await?;
    wait_backend_up(b.admin, 1.0, WAIT).await?;

    let run = rate_run(&a, &b, "/rl-batched/x", Duration::from_secs(5)).await?;
    let metrics = (state_metrics(a.admin).await?, state_metrics(b.admin).await?);
    eprintln!("state metrics of the two gateways: {metrics:?}");
    for m in [metrics.0, metrics.1] {
        assert!(m.ok > 0.0, "each gateway synced with Redis: {metrics:?}");
    }
    // Batched mode decides locally and syncs with Redis every 10 ms, so
    // each gateway may admit a little on a stale view of the budget (at
    // worst its own share of what the other admitted since the last sync).
    // It is an approximation: within 10 % rather than strict mode's 5 %.
    // Without the sync (one budget per gateway) it would be about twice
    // this.
    let expected = budget(run.last_sent);
    let got = run.admitted as f64;
    assert!(
        (got - expected).abs() <= expected * 0.10,
        "two batched gateways admitted {got}, expected {expected:.1} ± 10% ({run:?})"
    );
    assert!(run.per_target.iter().all(|&n| n > 0), "{run:?}");
    assert!(run.limited > 100, "the clients kept knocking: {run:?}");
    assert_eq!(origin.requests(), run.admitted);
    let keys = redis.keys(&format!("{prefix}*"))?;
    assert!(
        keys.iter()
            .any(|k| k.starts_with(&format!("{prefix}rl-batched:t:"))),
        "no throttle key {prefix}rl-batched:t:... in Redis: {keys:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_tripped_through_one_process_refuses_on_the_other() -> anyhow::Result<()> {
    let Some(redis) = redis()? else {
        return Ok(());
    };
    let name = "cb-shared";
    let prefix = "sluice-breaker:";
    let origin = Origin::start("failing", Mode::Status(500)).await?;
    let manifest = Manifest::new()
        .listener("web", "")
        .raw(&admin())
        .raw(&state(&redis, prefix, ""))
        .raw(&plugin(
            name,
            "builtin:circuit-breaker",
            r#"{ scope = "upstream", consecutive_failures = 3, failure_rate = 0, slow_call_rate = 0, wait_duration = "60s" }"#,
            "on_error = \"closed\"",
        ))
        .upstream("app", &[origin.addr()], "")
        .route("all", "{}", "app", &format!("policies = [\"{name}\"]"))
        .build();
    let a = Sluice::run(&manifest)?;
    let b = Sluice::run(&manifest)?;
    wait_backend_up(a.admin, 1.0, WAIT).await?;
    wait_backend_up(b.admin, 1.0, WAIT).await?;

    // Three failures in a row through A trip the breaker.
    let mut client_a: H1 = H1::connect(a.web).await?;
    for i in 0..3 {
        let reply = client_a.request(get("app.test", "/")).await?;
        assert_eq!(reply.status, 500, "request {i} on A: {}", reply.excerpt());
        assert_eq!(reply.header(ORIGIN_HEADER), Some("failing"));
    }
    let reply = client_a.request(get("app.test", "/")).await?;
    assert_refused(&reply);
    assert_eq!(origin.requests(), 3);

    // B never saw a failure, yet its breaker is the same one: open.
    let mut client_b: H1 = H1::connect(b.web).await?;
    for i in 0..3 {
        let reply = client_b.request(get("app.test", "/")).await?;
        assert!(
            reply.status == 503 && reply.header(ORIGIN_HEADER).is_none(),
            "request {i} on B was not refused by the breaker: {}\n{}",
            reply.excerpt(),
            b.stderr()
        );
        assert_refused(&reply);
    }
    assert_eq!(origin.requests(), 3, "B forwarded nothing to the origin");
    let keys = redis.keys(&format!("{prefix}*"))?;
    assert!(
        keys.iter()
            .any(|k| k.starts_with(&format!("{prefix}{name}:v:"))),
        "no value key {prefix}{name}:v:... in Redis: {keys:?}"
    );
    Ok(())
}

/// Checks `reply` is the breaker's own 503.
fn assert_refused(reply: &Reply) {
    assert_eq!(reply.status, 503, "{}", reply.excerpt());
    assert_eq!(reply.header(ORIGIN_HEADER), None, "answered by the gateway");
    assert!(
        reply.text().contains("circuit breaker open"),
        "{}",
        reply.excerpt()
    );
    let retry_after: u64 = reply
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a whole Retry-After: {reply:?}"));
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_open_serves_closed_refuses_then_both_recover() -> anyhow::Result<()>
{
    let Some(mut redis) = redis()? else {
        return Ok(());
    };
    let origin = Origin::echo("app").await?;
    // Never limited here; 1 r/s keeps each budget's key in Redis for a
    // second per request (a key expires when its budget is full again).
    let generous = r#"{ rate = "1r/s", burst = 100000, nodelay = true }"#;
    let gateway = Manifest::new()
        .listener("web", "")
        .raw(&admin())
        .raw(&state(
            &redis,
            "sluice-outage:",
            "timeout = \"50ms\"\nconnect_timeout = \"200ms\"",
        ))
        .raw(&plugin(
            "outage-open",
            "builtin:rate-limit",
            generous,
            "on_error = \"open\"",
        ))
        .raw(&plugin(
            "outage-closed",
            "builtin:rate-limit",
            generous,
            "on_error = \"closed\"",
        ))
        .upstream("app", &[origin.addr()], "")
        .route(
            "open",
            "{ path_prefix = \"/open/\" }",
            "app",
            "policies = [\"outage-open\"]",
        )
        .route(
            "closed",
            "{ path_prefix = \"/closed/\" }",
            "app",
            "policies = [\"outage-closed\"]",
        )
        .start()
        .await?;
    let web = gateway.addr("web");
    let admin = gateway.admin_addr();
    wait_backend_up(admin, 1.0, WAIT).await?;

    const OPEN: usize = 0;
    let targets = [(web, "/open/x"), (web, "/closed/x")];
    let start = Instant::now();
    let run = Duration::from_secs(3);
    let running =
        tokio::spawn(async move { load(&targets, start, run, Duration::from_millis(5)).await });
    tokio::time::sleep(Duration::from_secs(1).saturating_sub(start.elapsed())).await;
    let before = state_metrics(admin).await?;
    let keys = redis.keys("sluice-outage:*")?;
    for plugin in ["outage-open", "outage-closed"] {
        assert!(
            keys.iter()
                .any(|k| k.starts_with(&format!("sluice-outage:{plugin}:t:"))),
            "{plugin}'s budget is in Redis: {keys:?}"
        );
    }
    // Redis may be gone before kill() returns: requests answered between
    // the two instants may already see the outage.
    let killing = start.elapsed();
    tokio::task::block_in_place(|| redis.kill())?;
    let killed = start.elapsed();
    let outcomes = within("the load", run + WAIT, running).await???;
    let during = state_metrics(admin).await?;

    let slowest = outcomes.iter().map(|o| o.took).max().unwrap_or_default();
    eprintln!(
        "{} requests, slowest {slowest:?}; before the kill {before:?}; after {during:?}",
        outcomes.len()
    );
    for outcome in &outcomes {
        assert!(
            outcome.took < Duration::from_secs(1),
            "a request took {:?} (Redis killed at {killed:?}): {outcome:?}",
            outcome.took
        );
        let route = if outcome.target == OPEN {
            "open"
        } else {
            "closed"
        };
        if outcome.sent < killed {
            // Sent before the kill (it may have been answered after it).
            if outcome.sent + outcome.took < killing {
                assert_eq!(outcome.status, 200, "{route} before the kill: {outcome:?}");
            }
        } else if outcome.target == OPEN {
            assert_eq!(
                outcome.status, 200,
                "open route while Redis is down: {outcome:?}"
            );
            assert!(outcome.from_origin, "{outcome:?}");
        } else if outcome.sent > killed + Duration::from_millis(300) {
            assert_eq!(
                outcome.status, 503,
                "closed route while Redis is down: {outcome:?}"
            );
            assert!(!outcome.from_origin, "{outcome:?}");
        }
    }
    let count = |target: usize, status: u16, after: bool| {
        outcomes
            .iter()
            .filter(|o| o.target == target && o.status == status && (o.sent > killed) == after)
            .count()
    };
    assert!(
        count(OPEN, 200, false) > 10,
        "open route served before the kill"
    );
    assert!(
        count(1, 200, false) > 10,
        "closed route served before the kill"
    );
    assert!(count(OPEN, 200, true) > 20, "open route kept serving");
    assert!(count(1, 503, true) > 20, "closed route refused");

    assert_eq!(before.up, Some(1.0), "{before:?}");
    assert!(before.ok > 0.0, "{before:?}");
    assert_eq!(during.up, Some(0.0), "backend down: {during:?}");
    assert!(during.fallbacks > 0.0, "open route fell back: {during:?}");
    assert!(during.error > 0.0, "failed operations counted: {during:?}");

    // Redis back on the same port: both routes answer 200 within 5 s.
    tokio::task::block_in_place(|| redis.restart())?;
    let restarted = Instant::now();
    let mut open: H1 = H1::connect(web).await?;
    let mut closed: H1 = H1::connect(web).await?;
    loop {
        let sent = Instant::now();
        let open_reply = open.request(get("app.test", "/open/y")).await?;
        let closed_reply = closed.request(get("app.test", "/closed/y")).await?;
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "two requests took {:?}",
            sent.elapsed()
        );
        let metrics = state_metrics(admin).await?;
        if open_reply.status == 200 && closed_reply.status == 200 && metrics.up == Some(1.0) {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "5 s after Redis came back: open {}, closed {}, {metrics:?}\nredis log:\n{}",
            open_reply.excerpt(),
            closed_reply.excerpt(),
            redis.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = state_metrics(admin).await?;
    eprintln!("recovered in {:?}: {after:?}", restarted.elapsed());
    // Requests go to Redis again, not to the fallback.
    for _ in 0..5 {
        assert_eq!(
            closed.request(get("app.test", "/closed/z")).await?.status,
            200
        );
        assert_eq!(open.request(get("app.test", "/open/z")).await?.status, 200);
    }
    let last = state_metrics(admin).await?;
    assert!(last.ok >= after.ok + 10.0, "{after:?} then {last:?}");
    assert_eq!(last.fallbacks, after.fallbacks, "{after:?} then {last:?}");
    let keys = redis.keys("sluice-outage:*")?;
    assert!(
        keys.iter()
            .any(|k| k.starts_with("sluice-outage:outage-closed:t:")),
        "the restarted Redis holds the closed route's key again: {keys:?}"
    );
    Ok(())
}

/// A valid manifest without `[state]`.
const BASE: &str = r#"
[[listener]]
name = "web"
listen = "127.0.0.1:0"

[plugin.limit]
source = "builtin:rate-limit"
config = { rate = "100r/s", burst = 100 }

[upstream.api]
endpoints = ["127.0.0.1:9101"]

[[route]]
name = "api"
match = { path_prefix = "/v1/" }
upstream = "api"
policies = ["limit"]
"#;

#[test]
fn check_refuses_a_bad_state_table_naming_the_key() -> anyhow::Result<()> {
    // Nothing listens on port 1: the config is judged without Redis.
    let cases: &[(&str, String, &str)] = &[
        (
            "missing url",
            format!("{BASE}\n[state]\nbackend = \"redis\"\n"),
            "state.url",
        ),
        (
            "url without a scheme",
            format!("{BASE}\n[state]\nbackend = \"redis\"\nurl = \"127.0.0.1:6379\"\n"),
            "state.url",
        ),
        (
            "url not redis",
            format!("{BASE}\n[state]\nbackend = \"redis\"\nurl = \"http://127.0.0.1:1/0\"\n"),
            "state.url",
        ),
        (
            "unknown mode",
            format!(
                "{BASE}\n[state]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:1/0\"\nmode = \"sometimes\"\n"
            ),
            "state.mode",
        ),
        (
            "unknown backend",
            format!("{BASE}\n[state]\nbackend = \"etcd\"\nurl = \"redis://127.0.0.1:1/0\"\n"),
            "state.backend",
        ),
        (
            "unknown plugin state",
            BASE.replace("burst = 100 }", "burst = 100 }\nstate = \"global\""),
            "plugin.limit.state",
        ),
    ];
    let dir = tempfile::tempdir()?;
    for (i, (case, text, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case{i}.toml"));
        std::fs::write(&path, text)?;
        let out = Command::new(SLUICE)
            .args(["check", "-c"])
            .arg(&path)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{case}: {stderr}");
        assert!(
            stderr.contains(&format!("case{i}.toml: {key}")),
            "{case}: {key:?} not named in {stderr:?}"
        );
    }
    // A valid [state] table passes.
    let path = dir.path().join("good.toml");
    std::fs::write(&path, format!("{BASE}\n[state]\nbackend = \"memory\"\n"))?;
    let out = Command::new(SLUICE)
        .args(["check", "-c"])
        .arg(&path)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_bad_state_table_is_refused_and_the_old_one_keeps_serving()
-> anyhow::Result<()> {
    let Some(redis) = redis()? else {
        return Ok(());
    };
    let origin = Origin::echo("app").await?;
    let name = "reload-limit";
    let manifest = |state_table: &str| {
        Manifest::new()
            .listener("web", "")
            .raw(&admin())
            .raw(state_table)
            .raw(&plugin(
                name,
                "builtin:rate-limit",
                // 1 r/s keeps the key in Redis for a second per request.
                r#"{ rate = "1r/s", burst = 1000, nodelay = true }"#,
                "on_error = \"closed\"",
            ))
            .upstream("app", &[origin.addr()], "")
            .route("all", "{}", "app", &format!("policies = [\"{name}\"]"))
            .build()
    };
    let good = manifest(&state(&redis, "sluice-reload:", ""));
    let gateway = TestGateway::start(&good).await?;
    let admin = gateway.admin_addr();
    wait_backend_up(admin, 1.0, WAIT).await?;
    let mut client: H1 = H1::connect(gateway.addr("web")).await?;
    assert_eq!(client.request(get("app.test", "/")).await?.status, 200);

    let cases = [
        (
            "unknown mode",
            state(&redis, "sluice-reload:", "mode = \"sometimes\""),
            "state.mode",
        ),
        (
            "missing url",
            "[state]\nbackend = \"redis\"\nprefix = \"sluice-reload:\"\n".to_string(),
            "state.url",
        ),
        (
            "bad url",
            "[state]\nbackend = \"redis\"\nurl = \"127.0.0.1:6379\"\n".to_string(),
            "state.url",
        ),
    ];
    for (case, table, key) in cases {
        let before = state_metrics(admin).await?;
        gateway.rewrite(&manifest(&table))?;
        let reply = admin_send(admin, "POST", "/reload", Some(TOKEN), "").await?;
        assert_eq!(reply.status, 422, "{case}: {}", reply.excerpt());
        let error = reply.json()?["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(error.contains(key), "{case}: {key:?} not in {error:?}");

        // The old config serves on, its state still in Redis.
        for _ in 0..3 {
            let reply = client.request(get("app.test", "/")).await?;
            assert_eq!(reply.status, 200, "{case}: {}", reply.excerpt());
        }
        let after = state_metrics(admin).await?;
        assert_eq!(after.up, Some(1.0), "{case}: {after:?}");
        assert!(
            after.ok >= before.ok + 3.0,
            "{case}: the requests did not reach Redis: {before:?} then {after:?}"
        );
    }
    let keys = redis.keys(&format!("sluice-reload:{name}:t:*"))?;
    assert!(!keys.is_empty(), "the budget is in Redis");

    // Fixed: the reload applies.
    gateway.rewrite(&good)?;
    let reply = admin_send(admin, "POST", "/reload", Some(TOKEN), "").await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    assert_eq!(client.request(get("app.test", "/")).await?.status, 200);
    Ok(())
}

/// A hostile plugin that calls `state.counter-add` in a loop spends almost
/// no time in its own code; with Redis each call waits on the network, and
/// those waits extend the plugin's deadline (they are not its work). The
/// extension is capped at one `[state] timeout` per hook call, so the loop
/// is still stopped, even against a hung Redis whose every call takes the
/// whole timeout and falls back (`on_error = "open"`): the request goes on
/// without the policy within deadline + about two timeouts, and the call
/// counts as a deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_looping_on_shared_state_calls_is_still_stopped() -> anyhow::Result<()> {
    let Some(redis) = redis()? else {
        return Ok(());
    };
    let origin = Origin::echo("app").await?;
    let gateway = Manifest::new()
        .listener("web", "")
        .raw(&admin())
        .raw(&state(&redis, "sluice-loop:", "timeout = \"100ms\""))
        .raw(&format!(
            "[plugin.looper]\nsource = \"{}\"\ndeadline = \"50ms\"\non_error = \"open\"\n",
            env!("SLUICE_TEST_PROBE_WASM")
        ))
        .upstream("app", &[origin.addr()], "")
        .route("all", "{}", "app", "policies = [\"looper\"]")
        .start()
        .await?;
    let admin = gateway.admin_addr();
    wait_backend_up(admin, 1.0, WAIT).await?;
    let mut client: H1 = H1::connect(gateway.addr("web")).await?;
    let looping = || {
        let mut req = get("app.test", "/");
        req.headers_mut()
            .insert("x-probe-mode", http::HeaderValue::from_static("state-loop"));
        req
    };

    // Redis answering: the loop reaches it, then the deadline stops it.
    let reply = within(
        "the looping request",
        Duration::from_secs(5),
        client.request(looping()),
    )
    .await??;
    assert_eq!(
        reply.status,
        200,
        "on_error = open goes on: {}",
        reply.excerpt()
    );
    let calls: u64 = redis
        .get("sluice-loop:looper:v:state-loop")?
        .unwrap_or_default()
        .parse()?;
    assert!(calls > 10, "the loop did reach Redis: {calls} calls");

    // Redis hung: every call waits the whole timeout, then falls back.
    redis.pause(true)?;
    let started = Instant::now();
    let reply = within(
        "the looping request against a hung Redis",
        Duration::from_secs(5),
        client.request(looping()),
    )
    .await;
    let took = started.elapsed();
    redis.pause(false)?;
    let reply = reply??;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    // 50 ms deadline + 100 ms of granted waits + the call in flight when the
    // grace ran out (100 ms), with room for a busy machine.
    assert!(took < Duration::from_millis(1500), "took {took:?}");

    let reply = client.request(get("app.test", "/")).await?;
    assert_eq!(
        reply.status,
        200,
        "the next request is served: {}",
        reply.excerpt()
    );
    let samples = scrape(admin).await?;
    // Both loops ended at the deadline; the probe's on-outcome for the
    // second request may have met the hung Redis too.
    let deadlines = metric(
        &samples,
        "sluice_plugin_timeouts_total",
        &[("plugin", "looper")],
    );
    assert!(
        deadlines.is_some_and(|n| (2.0..=3.0).contains(&n)),
        "{deadlines:?}"
    );
    let metrics = state_metrics(admin).await?;
    assert!(metrics.timeout >= 1.0, "{metrics:?}");
    assert!(metrics.fallbacks >= 1.0, "{metrics:?}");
    Ok(())
}
