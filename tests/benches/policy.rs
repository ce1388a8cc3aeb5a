//! Per-call costs of the policy runtime, in-process (no sockets): an empty
//! policy, a header-reading policy, a 4-policy chain, the edge chain of the
//! `chain` scenario hook by hook (rate limit, circuit breaker, geo, Wasm
//! round-robin), a pick by each
//! first-party balancer (and the core's native round-robin) over 3 and 100
//! endpoints, and instantiation with and without wasmtime's pooling
//! allocator.
//!
//! `cargo bench -p sluice-tests --bench policy`

// criterion's macros generate undocumented functions.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::bench::{self, Policy, PolicyChain};

const BLOCK: &str = env!("SLUICE_EXAMPLE_BLOCK_WASM");

/// The first-party balancers, each picked over 3 and 100 endpoints.
const BALANCERS: [&str; 8] = [
    "round-robin",
    "weighted",
    "least-request",
    "p2c-ewma",
    "random",
    "ip-hash",
    "consistent-hash",
    "sticky-cookie",
];

/// A request with eight ordinary headers.
fn request() -> bench::Request {
    let mut req = http::Request::builder().uri("/api/items?page=2");
    for (name, value) in [
        ("host", "api.example.com"),
        ("user-agent", "bench/1.0"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, br"),
        ("accept-language", "en-GB,en;q=0.9"),
        ("cookie", "session=abc123; theme=dark"),
        ("x-request-id", "0123456789abcdef"),
        // A German address: the edge chain's geo policy finds it.
        ("x-forwarded-for", "193.99.144.80"),
    ] {
        req = req.header(name, value);
    }
    bench::request(req.body(()).expect("a valid request"))
}

fn load(name: &str, source: &str, config: &str, pooling: bool) -> Policy {
    bench::load(name, source, config, pooling).expect("the plugin loads")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// Times `iters` sequential calls of `call` inside one task, so the figure is
/// the call itself, not the executor.
fn time_calls<F, Fut>(rt: &tokio::runtime::Runtime, iters: u64, mut call: F) -> Duration
where
    F: FnMut(bench::Request) -> Fut,
    Fut: std::future::Future<Output = (bench::Request, bool)>,
{
    rt.block_on(async {
        let mut req = request();
        let started = Instant::now();
        for _ in 0..iters {
            let (back, ok) = call(req).await;
            assert!(ok, "the policy let the request through");
            req = back;
        }
        started.elapsed()
    })
}

fn policies(c: &mut Criterion) {
    let rt = runtime();
    let empty = load("bench-empty", "builtin:headers", "{}", false);
    let block = load("bench-block", BLOCK, "{}", false);
    let mut group = c.benchmark_group("policy-call");
    group.bench_function("empty", |b| {
        b.iter_custom(|iters| time_calls(&rt, iters, |req| empty.on_request(req)))
    });
    group.bench_function("read-one-header", |b| {
        b.iter_custom(|iters| time_calls(&rt, iters, |req| block.on_request(req)))
    });
    let chain: PolicyChain = bench::chain(&[
        &load("bench-chain-1", BLOCK, "{}", false),
        &load("bench-chain-2", "builtin:headers", "{}", false),
        &load("bench-chain-3", BLOCK, r#"{"header": "x-deny"}"#, false),
        &load(
            "bench-chain-4",
            "builtin:headers",
            r#"{"request": {"set": {"x-env": "prod"}}}"#,
            false,
        ),
    ]);
    group.bench_function("chain-of-4", |b| {
        b.iter_custom(|iters| time_calls(&rt, iters, |req| chain.on_request(req)))
    });
    group.finish();

    edge_chain(c, &rt);

    let mut group = c.benchmark_group("balancer-pick");
    for endpoints in [3u16, 100] {
        let upstream = bench::upstream(endpoints);
        group.bench_function(format!("core-weighted/{endpoints}"), |b| {
            b.iter(|| upstream.core_pick())
        });
    }
    for name in BALANCERS {
        let balancer = load(
            &format!("bench-{name}"),
            &format!("builtin:{name}"),
            "{}",
            false,
        );
        for endpoints in [3u16, 100] {
            let upstream = bench::upstream(endpoints);
            group.bench_function(format!("{name}/{endpoints}"), |b| {
                b.iter_custom(|iters| {
                    time_calls(&rt, iters, |req| async {
                        let (back, picked) = balancer.pick(req, &upstream).await;
                        (back, picked.is_some())
                    })
                })
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("instantiate");
    group.sample_size(30);
    for (label, pooling) in [("on-demand", false), ("pooling", true)] {
        let policy = load(&format!("bench-inst-{label}"), BLOCK, "{}", pooling);
        group.bench_function(label, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iters {
                        policy.instantiate().await.expect("instantiates");
                    }
                    started.elapsed()
                })
            })
        });
    }
    group.finish();
}

/// The edge chain of `bench/compare-sluice-chain.toml`, hook by hook and
/// whole: rate limit, circuit breaker and geo `on-request`, the Wasm
/// round-robin's `pick`, the breaker's `on-outcome` (the five calls each
/// forwarded request makes), with the same configs.
fn edge_chain(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let geo_db = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../data/geo/geo-whois-asn-country.mmdb"
    );
    let limit = load(
        "edge-limit",
        "builtin:rate-limit",
        // The chain scenario's limit is 1,000,000 r/s; calls here run faster
        // than that, so the rate is higher (the work per call is the same).
        r#"{"rate": "100000000r/s", "burst": 100000, "nodelay": true, "key": "route"}"#,
        false,
    );
    let breaker = load(
        "edge-breaker",
        "builtin:circuit-breaker",
        r#"{"failure_rate": 50, "window": 100, "minimum_calls": 100, "wait_duration": "10s"}"#,
        false,
    );
    let geo = bench::load_with_geo(
        "edge-geo",
        "builtin:geo",
        r#"{"regions": {"us-east": ["US", "CA"], "eu-west": ["GB", "DE", "FR", "continent:EU"]},
            "upstreams": {"us-east": "app", "eu-west": "app"}, "default": "us-east",
            "failover": ["us-east", "eu-west"], "trusted_proxies": ["127.0.0.1", "::1"]}"#,
        std::path::Path::new(geo_db),
    )
    .expect("geo loads");
    let balancer = load("edge-rr", "builtin:round-robin", "{}", false);
    let upstream = bench::upstream(2);

    let mut group = c.benchmark_group("edge-chain");
    for (name, policy) in [("limit", &limit), ("breaker", &breaker), ("geo", &geo)] {
        group.bench_function(format!("{name}-on-request"), |b| {
            b.iter_custom(|iters| time_calls(rt, iters, |req| policy.on_request(req)))
        });
    }
    group.bench_function("round-robin-pick", |b| {
        b.iter_custom(|iters| {
            time_calls(rt, iters, |req| async {
                let (back, picked) = balancer.pick(req, &upstream).await;
                (back, picked.is_some())
            })
        })
    });
    group.bench_function("breaker-on-outcome", |b| {
        b.iter_custom(|iters| {
            time_calls(rt, iters, |req| async {
                (req, breaker.on_outcome(&upstream, 900).await)
            })
        })
    });
    group.bench_function("all-five", |b| {
        b.iter_custom(|iters| {
            time_calls(rt, iters, |req| async {
                let mut ok = true;
                let mut req = req;
                for policy in [&limit, &breaker, &geo] {
                    let (back, proceed) = policy.on_request(req).await;
                    ok &= proceed;
                    req = back;
                }
                let (req, picked) = balancer.pick(req, &upstream).await;
                ok &= picked.is_some() && breaker.on_outcome(&upstream, 900).await;
                (req, ok)
            })
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = policies
}
criterion_main!(benches);
