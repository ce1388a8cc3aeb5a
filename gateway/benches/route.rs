//! Route matching: a lookup in a realistic route table (21 routes: exact
//! hosts, `*.suffix` wildcards, any host; exact paths and prefixes; method
//! lists; header matches), built from a manifest by the gateway's own
//! validation, for a handful of requests that end at different depths of the
//! lookup order, including one no route matches (the whole table is walked).
//! Each lookup does what the proxy does per request: derive the host (URI
//! authority or `Host`, lower-cased, port removed), then walk the table.
//!
//! `cargo bench -p sluice --bench route`

// criterion's macros generate undocumented functions.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::bench::{self, Routes};

/// The route table: most specific first is the gateway's job, so the
/// manifest lists routes in no particular order.
const MANIFEST: &str = r#"
[[listener]]
name   = "web"
listen = "127.0.0.1:8080"

[upstream.app]
endpoints = ["127.0.0.1:9101"]

[[route]]
name = "static"
match = { path_prefix = "/static/" }
upstream = "app"

[[route]]
name = "users-read"
match = { host = "api.example.com", path_prefix = "/v1/users/", methods = ["GET", "HEAD"] }
upstream = "app"

[[route]]
name = "users-write"
match = { host = "api.example.com", path_prefix = "/v1/users/", methods = ["POST", "PUT", "PATCH", "DELETE"] }
upstream = "app"

[[route]]
name = "orders-canary"
match = { host = "api.example.com", path_prefix = "/v1/orders/", headers = { "x-canary" = "1" } }
upstream = "app"

[[route]]
name = "orders"
match = { host = "api.example.com", path_prefix = "/v1/orders/" }
upstream = "app"

[[route]]
name = "api-health"
match = { host = "api.example.com", path = "/v1/health" }
upstream = "app"

[[route]]
name = "api-v2"
match = { host = "api.example.com", path_prefix = "/v2/" }
upstream = "app"

[[route]]
name = "api-other"
match = { host = "api.example.com" }
upstream = "app"

[[route]]
name = "admin"
match = { host = "admin.example.com", headers = { "x-internal" = "yes" } }
upstream = "app"

[[route]]
name = "home"
match = { host = "www.example.com", path = "/" }
upstream = "app"

[[route]]
name = "www-static"
match = { host = "www.example.com", path_prefix = "/static/" }
upstream = "app"

[[route]]
name = "www"
match = { host = "www.example.com" }
upstream = "app"

[[route]]
name = "cart"
match = { host = "*.shop.example.com", path_prefix = "/cart/", methods = ["GET", "POST"] }
upstream = "app"

[[route]]
name = "checkout"
match = { host = "*.shop.example.com", path_prefix = "/checkout/" }
upstream = "app"

[[route]]
name = "shop"
match = { host = "*.shop.example.com" }
upstream = "app"

[[route]]
name = "acme"
match = { host = "*.example.com", path_prefix = "/.well-known/acme-challenge/" }
upstream = "app"

[[route]]
name = "tenant"
match = { host = "*.example.com" }
upstream = "app"

[[route]]
name = "healthz"
match = { path = "/healthz" }
upstream = "app"

[[route]]
name = "ws"
match = { path_prefix = "/ws/", headers = { "upgrade" = "websocket" } }
upstream = "app"

[[route]]
name = "metrics"
match = { path_prefix = "/metrics", methods = ["GET"] }
upstream = "app"

[[route]]
name = "grpc"
match = { path_prefix = "/grpc/", methods = ["POST"], headers = { "content-type" = "application/grpc" } }
upstream = "app"
"#;

/// A request with `host`, the target and eight more ordinary headers
/// (plus `extra`), as HTTP/1.1 sends it (origin-form target, `Host` header).
fn request(method: &str, host: &str, target: &str, extra: &[(&str, &str)]) -> http::Request<()> {
    let mut req = http::Request::builder()
        .method(method)
        .uri(target)
        .header("host", host);
    for (name, value) in [
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        ),
        ("accept", "application/json, text/plain, */*"),
        ("accept-encoding", "gzip, deflate, br"),
        ("accept-language", "en-GB,en;q=0.9"),
        ("cookie", "session=abc123; theme=dark"),
        ("x-request-id", "0123456789abcdef"),
        ("x-forwarded-for", "203.0.113.7"),
        ("connection", "keep-alive"),
    ]
    .into_iter()
    .chain(extra.iter().copied())
    {
        req = req.header(name, value);
    }
    req.body(()).expect("a valid request")
}

/// Benchmark name, request, and the route it must find.
fn cases() -> Vec<(&'static str, http::Request<()>, Option<&'static str>)> {
    vec![
        (
            "exact-host-prefix-method",
            request("GET", "api.example.com", "/v1/users/42?fields=name", &[]),
            Some("users-read"),
        ),
        (
            "exact-host-header",
            request(
                "POST",
                "api.example.com",
                "/v1/orders/7",
                &[("x-canary", "1")],
            ),
            Some("orders-canary"),
        ),
        (
            "host-with-port-and-case",
            request("GET", "WWW.Example.com:8080", "/static/app.js", &[]),
            Some("www-static"),
        ),
        (
            "wildcard-host",
            request("POST", "eu.shop.example.com", "/cart/items", &[]),
            Some("cart"),
        ),
        (
            "any-host-prefix",
            request("GET", "cdn.other.net", "/static/css/site.css", &[]),
            Some("static"),
        ),
        (
            "any-host-headers",
            request(
                "POST",
                "grpc.internal",
                "/grpc/pkg.Service/Call",
                &[("content-type", "application/grpc")],
            ),
            Some("grpc"),
        ),
        (
            "no-match",
            request("GET", "unknown.test", "/nope", &[]),
            None,
        ),
    ]
}

fn route_match(c: &mut Criterion) {
    let routes: Routes = bench::routes(MANIFEST).expect("the route table validates");
    assert_eq!(routes.count(), 21);
    let cases = cases();
    for (name, req, expected) in &cases {
        assert_eq!(routes.find(req), *expected, "{name}");
    }

    let mut group = c.benchmark_group("route-match");
    for (name, req, _) in &cases {
        group.bench_function(*name, |b| {
            b.iter(|| routes.find(black_box(req)).is_some());
        });
    }
    group.bench_function("all-7-in-turn", |b| {
        b.iter(|| {
            cases
                .iter()
                .filter(|(_, req, _)| routes.find(black_box(req)).is_some())
                .count()
        });
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = route_match
}
criterion_main!(benches);
