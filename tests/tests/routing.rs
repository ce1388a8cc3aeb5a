//! Routing through real requests: the most specific route wins whatever the
//! manifest order, ties go to the earlier route, and a request no route
//! matches gets a short 404 without reaching any origin.

use sluice_tests::client::{fetch, get, request};
use sluice_tests::{Manifest, Origin, Reply};

/// Routes listed least specific first, so manifest order alone would pick
/// wrongly: `(route name, match table)`. Each route has its own upstream and
/// origin, named like the route.
const ROUTES: &[(&str, &str)] = &[
    ("any", "{}"),
    ("api-prefix", r#"{ path_prefix = "/api/" }"#),
    (
        "api-post",
        r#"{ path_prefix = "/api/", methods = ["POST"] }"#,
    ),
    (
        "api-post-canary",
        r#"{ path_prefix = "/api/", methods = ["POST"], headers = { "x-canary" = "1" } }"#,
    ),
    ("api-v2-prefix", r#"{ path_prefix = "/api/v2/" }"#),
    ("api-v2-status", r#"{ path = "/api/v2/status" }"#),
    ("wildcard-host", r#"{ host = "*.example.com" }"#),
    ("exact-host", r#"{ host = "api.example.com" }"#),
    (
        "exact-host-admin",
        r#"{ host = "api.example.com", path_prefix = "/admin/" }"#,
    ),
    // Equally specific: the earlier one wins. Names sort the other way, so
    // sorting by name would fail this.
    (
        "zeta-tie",
        r#"{ path_prefix = "/tie/", headers = { "x-a" = "1" } }"#,
    ),
    (
        "alpha-tie",
        r#"{ path_prefix = "/tie/", headers = { "x-b" = "1" } }"#,
    ),
];

fn served_by(reply: &Reply) -> anyhow::Result<String> {
    anyhow::ensure!(reply.status == 200, "{}", reply.excerpt());
    let json = reply.json()?;
    Ok(json["origin"].as_str().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn most_specific_route_wins_regardless_of_manifest_order() -> anyhow::Result<()> {
    let mut origins = Vec::new();
    let mut manifest = Manifest::new().listener("web", "");
    for (name, matcher) in ROUTES {
        let origin = Origin::echo(name).await?;
        manifest = manifest
            .upstream(name, &[origin.addr()], "")
            .route(name, matcher, name, "");
        origins.push(origin);
    }
    let gateway = manifest.start().await?;
    let addr = gateway.addr("web");

    let with_headers = |mut req: http::Request<_>, headers: &[(&'static str, &'static str)]| {
        for (name, value) in headers {
            req.headers_mut()
                .insert(*name, http::HeaderValue::from_static(value));
        }
        req
    };
    let cases = [
        (
            "exact path over longer prefix",
            get("other.test", "/api/v2/status"),
            "api-v2-status",
        ),
        (
            "longer prefix over shorter",
            get("other.test", "/api/v2/users"),
            "api-v2-prefix",
        ),
        ("prefix over any", get("other.test", "/api/x"), "api-prefix"),
        ("any path", get("other.test", "/"), "any"),
        (
            "method list counts as a condition",
            request("POST", "other.test", "/api/x", "{}"),
            "api-post",
        ),
        (
            "method plus header beats method alone",
            with_headers(
                request("POST", "other.test", "/api/x", "{}"),
                &[("x-canary", "1")],
            ),
            "api-post-canary",
        ),
        (
            "header alone does not satisfy a route that also lists methods",
            with_headers(get("other.test", "/api/x"), &[("x-canary", "1")]),
            "api-prefix",
        ),
        (
            "wildcard host over any path specificity",
            get("www.example.com", "/api/v2/status"),
            "wildcard-host",
        ),
        (
            "exact host over wildcard",
            get("api.example.com", "/api/v2/status"),
            "exact-host",
        ),
        (
            "exact host with prefix over exact host alone",
            get("api.example.com", "/admin/users"),
            "exact-host-admin",
        ),
        (
            "host case and port are ignored",
            get("API.Example.COM:8080", "/admin/users"),
            "exact-host-admin",
        ),
        (
            "a wildcard does not match the bare domain",
            get("example.com", "/"),
            "any",
        ),
        (
            "ties go to manifest order",
            with_headers(get("other.test", "/tie/x"), &[("x-a", "1"), ("x-b", "1")]),
            "zeta-tie",
        ),
        (
            "the second of a tie still serves its own requests",
            with_headers(get("other.test", "/tie/x"), &[("x-b", "1")]),
            "alpha-tie",
        ),
    ];
    let mut failures = Vec::new();
    for (why, req, expected) in cases {
        let target = format!(
            "{} {} (host {:?})",
            req.method(),
            req.uri(),
            req.headers().get("host")
        );
        let got = served_by(&fetch(addr, req).await?)?;
        if got != expected {
            failures.push(format!(
                "{why}: {target} went to {got:?}, expected {expected:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "misrouted:\n{}", failures.join("\n"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_request_gets_a_short_404_and_reaches_no_origin() -> anyhow::Result<()> {
    let origin = Origin::echo("api").await?;
    let gateway = Manifest::new()
        .listener("web", "")
        .upstream("api", &[origin.addr()], "")
        .route(
            "api",
            r#"{ host = "api.example.com", path_prefix = "/v1/" }"#,
            "api",
            "",
        )
        .start()
        .await?;
    let addr = gateway.addr("web");

    for req in [
        get("api.example.com", "/v2/x"),
        get("other.example.com", "/v1/x"),
        get("api.example.com", "/"),
    ] {
        let reply = fetch(addr, req).await?;
        assert_eq!(reply.status, 404, "{}", reply.excerpt());
        assert!(
            !reply.body.is_empty() && reply.body.len() < 200,
            "404 body should be short: {}",
            reply.excerpt()
        );
    }
    // A matching request still works, proving the 404s were routing decisions.
    let reply = fetch(addr, get("api.example.com", "/v1/x")).await?;
    assert_eq!(served_by(&reply)?, "api");
    assert_eq!(
        origin.requests(),
        1,
        "only the matching request may reach the origin"
    );
    Ok(())
}
