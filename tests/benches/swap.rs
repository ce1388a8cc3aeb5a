//! Live swaps under load: a real gateway (one worker thread, as `sluice run
//! --workers 1`) and a real origin on loopback, closed-loop traffic on
//! keep-alive connections, and plugin swaps through the admin API. For each
//! kind of swap it prints:
//!
//! - **swap to live**: from sending the PUT until the first answer from the
//!   new version, seen by a probe connection that sends one request every
//!   millisecond all along (so the figure does not wait for the 200);
//! - **PUT round trip**: from sending the PUT until its 200;
//! - **req/s in 100 ms windows** on the load connections: the median of
//!   windows with no swap in progress (the baseline) against the minimum
//!   and median of the windows a swap overlaps (the dip); and, because the
//!   baseline drifts on a shared machine, each swap's lowest window as a
//!   share of the quiet windows just before it.
//!
//! The kinds, in order:
//! - **warm**: `PUT /plugins/{name}` alternating two components. After one
//!   unmeasured swap to each, both compiled artifacts are in the on-disk
//!   cache, so every measured swap is a cache hit: read, check and
//!   deserialize the artifact, link, instantiate and `init` one instance.
//! - **config**: `PUT /plugins/{name}/config`: nothing is compiled or
//!   loaded, only a first instance made with the new config.
//! - **cold**: a fresh component each time, so each swap compiles with
//!   cranelift.
//!
//! Every version is the block example (`examples/policies/block-rust`); the
//! "other" component is a copy with a custom section appended (the same
//! code under a new SHA-256, which is all the gateway knows a component
//! by), and each cold swap appends a new one. Versions differ by config:
//! `{}` answers the probe's `x-block: 1` request 403, `{"header":
//! "x-other"}` forwards it (200). So every version costs the same per
//! request and a change in req/s is the swap's own. (Alternating the block
//! example with the test probe, as `tests/tests/admin.rs` does, mixes in
//! the two policies' different costs: the probe makes about 15 host calls
//! over three hooks per request, the block example one.)
//!
//! The load is unpaced on purpose: the gateway runs flat out, so any CPU a
//! swap takes from it shows as fewer requests in that window. The cache is
//! a fresh temporary directory (`SLUICE_CACHE_DIR`), so what is warm and
//! what is cold does not depend on earlier runs, and the cold swaps'
//! artifacts do not pile up in `~/.cache/sluice`.
//!
//! `cargo bench -p sluice-tests --bench swap` (about 70 s; loopback only).

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use sluice_tests::client::{H1, admin_send, get};
use sluice_tests::{Manifest, Mode, Origin, TestGateway};
use tokio::time::{Instant, MissedTickBehavior};

const BLOCK: &str = env!("SLUICE_EXAMPLE_BLOCK_WASM");
const TOKEN: &str = "swap-bench-token-0123456789";

/// Keep-alive connections sending back to back, besides the probe's.
const LOAD_CONNECTIONS: usize = 8;
/// The probe connection sends one request this often (its own load stays
/// small and the same whichever version answers).
const PROBE_EVERY: Duration = Duration::from_millis(1);
/// The throughput is counted in windows of this length.
const WINDOW: Duration = Duration::from_millis(100);
/// Load before anything is measured (connections, pools, first instances).
const SETTLE: Duration = Duration::from_millis(500);
/// No swaps for this long before, between and after the kinds of swap.
const QUIET: Duration = Duration::from_secs(2);
const WARM_SWAPS: usize = 100;
const CONFIG_SWAPS: usize = 20;
const COLD_SWAPS: usize = 10;
/// From one swap's start to the next: room for the window the swap is in,
/// the one after, and [`BEFORE`] quiet ones before the next. A swap that
/// runs long pushes the next to at least [`MIN_GAP`] after its 200.
const SWAP_EVERY: Duration = Duration::from_millis(400);
const COLD_SWAP_EVERY: Duration = Duration::from_secs(1);
const MIN_GAP: Duration = Duration::from_millis(300);
/// Quiet windows just before a swap that its own windows are compared with.
const BEFORE: usize = 2;

/// The probe connection's request (`x-block: 1`) is answered 403 by a
/// version with config `{}` and forwarded (200) by one with
/// [`FORWARDING`].
const BLOCKED: u16 = 403;
const FORWARDED: u16 = 200;
const FORWARDING: &str = r#"{"header":"x-other"}"#;

/// What a swap changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Brings the plugin to a known state; not reported.
    Setup,
    Warm,
    Config,
    Cold,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Setup => "setup",
            Kind::Warm => "warm (cache hit)",
            Kind::Config => "config only",
            Kind::Cold => "cold (compiled)",
        }
    }
}

/// One planned swap: the request and the status the probe gets once the
/// new version serves.
struct Step {
    kind: Kind,
    path: String,
    body: Bytes,
    expect: u16,
}

/// One swap as the admin client saw it.
struct Swap {
    kind: Kind,
    put_sent: Instant,
    ok_at: Instant,
    expect: u16,
}

/// One answer on the probe connection.
struct Answer {
    answered: Instant,
    round_trip: Duration,
    status: u16,
}

/// Requests answered in each [`WINDOW`] since the start.
#[derive(Default)]
struct Windows(Vec<u32>);

impl Windows {
    fn count(&mut self, t0: Instant, at: Instant) {
        let index = window_of(t0, at);
        if self.0.len() <= index {
            self.0.resize(index + 1, 0);
        }
        self.0[index] += 1;
    }

    fn add(&mut self, other: &Windows) {
        if self.0.len() < other.0.len() {
            self.0.resize(other.0.len(), 0);
        }
        for (sum, n) in self.0.iter_mut().zip(&other.0) {
            *sum += n;
        }
    }
}

fn window_of(t0: Instant, at: Instant) -> usize {
    let index = at.saturating_duration_since(t0).as_micros() / WINDOW.as_micros();
    usize::try_from(index).unwrap_or(usize::MAX)
}

fn main() -> anyhow::Result<()> {
    let cache = tempfile::tempdir().context("creating the compiled-component cache")?;
    use_cache_dir(cache.path());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench(cache.path()))
}

/// Points the gateway's compiled-component cache at `dir`.
#[allow(unsafe_code)]
fn use_cache_dir(dir: &Path) {
    // SAFETY: called first in `main`, before any other thread exists, so
    // nothing reads the environment meanwhile.
    unsafe { std::env::set_var("SLUICE_CACHE_DIR", dir) };
}

/// The gateway on a thread of its own, with a current-thread runtime like
/// one `sluice run` worker. The admin API shares that thread (TestGateway
/// serves it on the same runtime), so the PUT's own handling is charged to
/// the worker; `sluice run` serves it on the main thread instead.
struct GatewayThread {
    web: SocketAddr,
    admin: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl GatewayThread {
    async fn start(manifest: String) -> anyhow::Result<GatewayThread> {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("gateway".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    let gateway = TestGateway::start(&manifest).await?;
                    let _ = ready_tx.send((gateway.addr("web"), gateway.admin_addr()));
                    let _ = stopped.await;
                    drop(gateway);
                    anyhow::Ok(())
                })
            })?;
        match ready_rx.await {
            Ok((web, admin)) => Ok(GatewayThread {
                web,
                admin,
                stop,
                thread,
            }),
            Err(_) => match thread.join() {
                Ok(Err(e)) => Err(e.context("starting the gateway")),
                _ => anyhow::bail!("the gateway thread ended before it served"),
            },
        }
    }

    fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the gateway thread panicked"))?
    }
}

async fn bench(cache: &Path) -> anyhow::Result<()> {
    let origin = Origin::start("swap-bench-origin", Mode::Status(200)).await?;
    let manifest = Manifest::new()
        .listener("web", "")
        .raw(&format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"
        ))
        .raw(&format!(
            "[plugin.swapped]\nsource = \"{BLOCK}\"\nconfig = {{}}\n"
        ))
        .upstream("app", &[origin.addr()], "")
        .route("all", "{}", "app", "policies = [\"swapped\"]")
        .build();
    let gateway = GatewayThread::start(manifest).await?;
    let block = Bytes::from(std::fs::read(BLOCK)?);
    let other = fresh(&block, u32::MAX);

    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..LOAD_CONNECTIONS)
        .map(|_| tokio::spawn(load_connection(gateway.web, t0, stop.clone())))
        .collect();
    let prober = tokio::spawn(probe_connection(gateway.web, stop.clone()));

    // Swap to each component once: `other` is compiled now (the block
    // example was at startup), so both are in the cache from here on.
    let mut next = t0 + SETTLE;
    let mut swaps = Vec::new();
    for step in [
        component(Kind::Setup, &other, true),
        component(Kind::Setup, &block, false),
    ] {
        next = run(&mut swaps, gateway.admin, step, next, SWAP_EVERY).await?;
    }
    let artifacts_warm = artifacts(cache)?;

    next += QUIET;
    for i in 0..WARM_SWAPS {
        let step = if i % 2 == 0 {
            component(Kind::Warm, &other, true)
        } else {
            component(Kind::Warm, &block, false)
        };
        next = run(&mut swaps, gateway.admin, step, next, SWAP_EVERY).await?;
    }
    let artifacts_after_warm = artifacts(cache)?;

    next += QUIET;
    for i in 0..CONFIG_SWAPS {
        let (config, expect) = if i % 2 == 0 {
            (FORWARDING, FORWARDED)
        } else {
            ("{}", BLOCKED)
        };
        let step = Step {
            kind: Kind::Config,
            path: "/plugins/swapped/config".to_string(),
            body: Bytes::from_static(config.as_bytes()),
            expect,
        };
        next = run(&mut swaps, gateway.admin, step, next, SWAP_EVERY).await?;
    }

    next += QUIET;
    for i in 0..COLD_SWAPS {
        let nonce = u32::try_from(i).unwrap_or(0);
        let step = component(Kind::Cold, &fresh(&block, nonce), i % 2 == 0);
        next = run(&mut swaps, gateway.admin, step, next, COLD_SWAP_EVERY).await?;
    }
    let artifacts_after_cold = artifacts(cache)?;

    tokio::time::sleep_until(next + QUIET).await;
    let stopped = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let mut windows = Windows::default();
    let mut not_ok = std::collections::BTreeMap::new();
    for task in load {
        let (counted, statuses) = task.await??;
        windows.add(&counted);
        for (status, n) in statuses {
            *not_ok.entry(status).or_insert(0) += n;
        }
    }
    let answers = prober.await??;
    gateway.stop()?;
    drop(origin);

    let elapsed = stopped - t0;
    let total: u64 = windows.0.iter().map(|&n| u64::from(n)).sum();
    println!(
        "swap bench: 1 gateway thread; {LOAD_CONNECTIONS} load connections unpaced + 1 probe \
         connection, keep-alive; {total} load requests in {elapsed:.1?}; {} ms windows",
        WINDOW.as_millis()
    );
    println!("load answers other than 200 (status: count): {not_ok:?}");
    report(&swaps, &answers, &windows, t0, stopped)?;
    println!(
        "compiled artifacts in the cache: {artifacts_warm} after the first swap to each \
         component, {artifacts_after_warm} after the warm swaps (every one a hit), \
         {artifacts_after_cold} after the cold swaps"
    );
    anyhow::ensure!(
        artifacts_after_warm == artifacts_warm,
        "a warm swap compiled: {artifacts_warm} artifacts before, {artifacts_after_warm} after"
    );
    Ok(())
}

/// A swap to component `bytes` with config `{}` or, if `forwards`,
/// [`FORWARDING`].
fn component(kind: Kind, bytes: &Bytes, forwards: bool) -> Step {
    let (path, expect) = if forwards {
        (
            "/plugins/swapped?config=%7B%22header%22%3A%22x-other%22%7D",
            FORWARDED,
        )
    } else {
        ("/plugins/swapped?config=%7B%7D", BLOCKED)
    };
    Step {
        kind,
        path: path.to_string(),
        body: bytes.clone(),
        expect,
    }
}

/// Sends `step` at `at` (or at once if that has passed) and records it;
/// returns when the next swap may start.
async fn run(
    swaps: &mut Vec<Swap>,
    admin: SocketAddr,
    step: Step,
    at: Instant,
    every: Duration,
) -> anyhow::Result<Instant> {
    if let Some(last) = swaps.last() {
        anyhow::ensure!(
            last.expect != step.expect,
            "a swap the probe cannot see: both versions answer {}",
            step.expect
        );
    }
    tokio::time::sleep_until(at).await;
    let put_sent = Instant::now();
    let reply = admin_send(admin, "PUT", &step.path, Some(TOKEN), step.body).await?;
    let ok_at = Instant::now();
    anyhow::ensure!(
        reply.status == 200,
        "swap {} ({:?}): {}",
        swaps.len(),
        step.kind,
        reply.excerpt()
    );
    swaps.push(Swap {
        kind: step.kind,
        put_sent,
        ok_at,
        expect: step.expect,
    });
    Ok((at + every).max(ok_at + MIN_GAP))
}

/// Plain GETs back to back on one keep-alive connection until `stop`:
/// answers per window, and how many had each status other than 200.
async fn load_connection(
    web: SocketAddr,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(Windows, Vec<(u16, u64)>)> {
    let mut conn: H1 = H1::connect(web).await?;
    let mut windows = Windows::default();
    let mut not_ok: Vec<(u16, u64)> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let reply = conn.request(get("app.test", "/")).await?;
        windows.count(t0, Instant::now());
        let status = reply.status.as_u16();
        if status != 200 {
            match not_ok.iter_mut().find(|(s, _)| *s == status) {
                Some((_, n)) => *n += 1,
                None => not_ok.push((status, 1)),
            }
        }
    }
    Ok((windows, not_ok))
}

/// An `x-block: 1` request every [`PROBE_EVERY`] on one keep-alive
/// connection until `stop` (a late one is skipped, not made up): every
/// answer's time and status.
async fn probe_connection(web: SocketAddr, stop: Arc<AtomicBool>) -> anyhow::Result<Vec<Answer>> {
    let mut conn: H1 = H1::connect(web).await?;
    let mut ticks = tokio::time::interval(PROBE_EVERY);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut answers = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        ticks.tick().await;
        let mut req = get("app.test", "/");
        req.headers_mut()
            .insert("x-block", http::HeaderValue::from_static("1"));
        let sent = Instant::now();
        let reply = conn.request(req).await?;
        let answered = Instant::now();
        answers.push(Answer {
            answered,
            round_trip: answered - sent,
            status: reply.status.as_u16(),
        });
    }
    Ok(answers)
}

/// `component` with a custom section appended (name `sluice-bench`, payload
/// `nonce`): the same code under a new SHA-256, so the gateway compiles it
/// afresh.
fn fresh(component: &Bytes, nonce: u32) -> Bytes {
    let name = b"sluice-bench";
    let mut payload = leb128(name.len());
    payload.extend_from_slice(name);
    payload.extend_from_slice(&nonce.to_le_bytes());
    let mut bytes = component.to_vec();
    bytes.push(0); // custom section id
    bytes.extend(leb128(payload.len()));
    bytes.extend(payload);
    Bytes::from(bytes)
}

/// `n` as unsigned LEB128.
fn leb128(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let low = u8::try_from(n & 0x7f).unwrap_or(0);
        n >>= 7;
        if n == 0 {
            out.push(low);
            return out;
        }
        out.push(low | 0x80);
    }
}

/// Compiled artifacts in the cache directory.
fn artifacts(cache: &Path) -> anyhow::Result<usize> {
    let mut n = 0;
    for entry in std::fs::read_dir(cache)? {
        if entry?.path().extension().is_some_and(|e| e == "cwasm") {
            n += 1;
        }
    }
    Ok(n)
}

/// One measured swap: from the PUT to the new version's first answer and
/// to the 200, and the windows it overlapped.
struct Measured {
    kind: Kind,
    to_live: Duration,
    round_trip: Duration,
    busy: RangeInclusive<usize>,
}

/// The figures of one kind of swap.
struct Figures {
    kind: Kind,
    to_live: Vec<Duration>,
    round_trip: Vec<Duration>,
    /// Each swap's lowest window as a share of the quiet ones before it.
    shares: Vec<f64>,
}

/// Prints the figures per kind of swap, and the baseline; fails if a probe
/// answer came from neither version, or from the old one once the new one
/// had answered.
fn report(
    swaps: &[Swap],
    answers: &[Answer],
    windows: &Windows,
    t0: Instant,
    stopped: Instant,
) -> anyhow::Result<()> {
    // The last window is cut short by the stop.
    let full = window_of(t0, stopped).min(windows.0.len());
    let first = window_of(t0, t0 + SETTLE);
    let rate = |w: usize| f64::from(windows.0[w]) / WINDOW.as_secs_f64();
    // Per window: the swap that overlaps it, if any; the window after a swap
    // is neither baseline nor dip (old instances dropped, new ones made).
    let mut during: Vec<Option<Kind>> = vec![None; full];
    let mut after = vec![false; full];
    let mut neither = 0;
    let mut flapped = 0;
    let mut measured = Vec::new();
    for (i, swap) in swaps.iter().enumerate() {
        let until = swaps.get(i + 1).map(|s| s.put_sent);
        // The first answer from the new version after the PUT went out.
        let start = answers.partition_point(|a| a.answered <= swap.put_sent);
        let live = answers[start..]
            .iter()
            .position(|a| a.status == swap.expect)
            .map(|at| start + at)
            .with_context(|| {
                format!("swap {i} ({:?}): the new version never answered", swap.kind)
            })?;
        let live_at = answers[live].answered;
        neither += answers[start..live]
            .iter()
            .filter(|a| a.status != BLOCKED && a.status != FORWARDED)
            .count();
        // Until the next PUT, only the new version answers.
        for answer in &answers[live..] {
            if until.is_some_and(|u| answer.answered > u) {
                break;
            }
            match answer.status {
                s if s == swap.expect => {}
                BLOCKED | FORWARDED => flapped += 1,
                _ => neither += 1,
            }
        }
        let busy = window_of(t0, swap.put_sent)..=window_of(t0, swap.ok_at.max(live_at));
        for w in busy.clone() {
            if let Some(slot) = during.get_mut(w) {
                slot.get_or_insert(swap.kind);
            }
        }
        if let Some(slot) = after.get_mut(busy.end() + 1) {
            *slot = true;
        }
        if swap.kind != Kind::Setup {
            measured.push(Measured {
                kind: swap.kind,
                to_live: live_at - swap.put_sent,
                round_trip: swap.ok_at - swap.put_sent,
                busy,
            });
        }
    }

    let quiet = |w: &usize| *w >= first && *w < full && during[*w].is_none() && !after[*w];
    let baseline: Vec<f64> = (first..full).filter(quiet).map(rate).collect();
    let mut by_kind: Vec<Figures> = Vec::new();
    for swap in measured {
        let before: Vec<f64> = (swap.busy.start().saturating_sub(BEFORE)..*swap.busy.start())
            .filter(quiet)
            .map(rate)
            .collect();
        let lowest = swap
            .busy
            .clone()
            .filter(|&w| w < full)
            .map(rate)
            .fold(f64::INFINITY, f64::min);
        let i = match by_kind.iter().position(|f| f.kind == swap.kind) {
            Some(i) => i,
            None => {
                by_kind.push(Figures {
                    kind: swap.kind,
                    to_live: Vec::new(),
                    round_trip: Vec::new(),
                    shares: Vec::new(),
                });
                by_kind.len() - 1
            }
        };
        let figures = &mut by_kind[i];
        figures.to_live.push(swap.to_live);
        figures.round_trip.push(swap.round_trip);
        if !before.is_empty() && lowest.is_finite() {
            figures.shares.push(lowest / median(&before));
        }
    }

    let mut round_trips: Vec<Duration> = answers.iter().map(|a| a.round_trip).collect();
    round_trips.sort();
    println!(
        "probe: {} answers, one sent every {PROBE_EVERY:?}, round trip p50 {:.2?} (swap to live \
         reads up to about the sum of the two late)",
        answers.len(),
        percentile(&round_trips, 0.5)
    );
    println!(
        "{:<17} {:>4}  {:>28}  {:>28}  {:>17}  {:>17}",
        "swap",
        "n",
        "swap to live p50/p99/max",
        "PUT round trip p50/p99/max",
        "req/s min/median",
        "vs before p50/min"
    );
    for mut figures in by_kind {
        figures.to_live.sort();
        figures.round_trip.sort();
        figures.shares.sort_by(f64::total_cmp);
        let dips: Vec<f64> = (first..full)
            .filter(|&w| during[w] == Some(figures.kind))
            .map(rate)
            .collect();
        println!(
            "{:<17} {:>4}  {:>28}  {:>28}  {:>17}  {:>17}",
            figures.kind.label(),
            figures.to_live.len(),
            triple(&figures.to_live),
            triple(&figures.round_trip),
            format!("{:.0} / {:.0}", min(&dips), median(&dips)),
            format!(
                "{:.0}% / {:.0}%",
                100.0 * median(&figures.shares),
                100.0 * figures.shares.first().copied().unwrap_or(0.0)
            ),
        );
    }
    println!(
        "baseline req/s (no swap in progress): median {:.0} over {} windows (min {:.0}, max {:.0})",
        median(&baseline),
        baseline.len(),
        min(&baseline),
        baseline.iter().copied().fold(0.0, f64::max)
    );
    println!(
        "probe answers from neither version: {neither}; \
         from the old version after the new one answered: {flapped}"
    );
    anyhow::ensure!(
        neither == 0 && flapped == 0,
        "every answer comes from exactly one version, the new one once it answered"
    );
    Ok(())
}

/// p50 / p99 / max in milliseconds.
fn triple(sorted: &[Duration]) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "{:.1} / {:.1} / {:.1} ms",
        ms(percentile(sorted, 0.5)),
        ms(percentile(sorted, 0.99)),
        ms(sorted.last().copied().unwrap_or_default())
    )
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}
