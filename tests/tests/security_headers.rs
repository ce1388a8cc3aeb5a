//! `builtin:security-headers` through real requests to real origins: the
//! default headers on plain http (without HSTS) and on https (with it, over
//! HTTP/1.1 and HTTP/2), `Server` and `X-Powered-By` stripped, the
//! upstream's own values kept unless `override`, defaults turned off by
//! `false` and `""`, and bad configs refused by key.

use sluice_tests::client::{H1, H2, get};
use sluice_tests::origin::ORIGIN_HEADER;
use sluice_tests::tls::{TestCa, tls_connect};
use sluice_tests::{Manifest, Mode, Origin, Reply, TestGateway};

/// What an application server typically adds: the plugin strips these.
const SOFTWARE: &[(&str, &str)] = &[("server", "origin/1.0"), ("x-powered-by", "PHP/8.3")];

/// An application that sets some security headers itself.
const OWN_HEADERS: &[(&str, &str)] = &[
    ("server", "origin/1.0"),
    ("x-frame-options", "SAMEORIGIN"),
    ("referrer-policy", "no-referrer"),
];

/// A gateway with listener "web", upstream "app" (`origin`), and for each
/// `(name, config)` a `builtin:security-headers` plugin and a route
/// `/NAME/` through it; with `tls` (its `tls = [...]` line), a listener "tls" too.
async fn gateway(
    origin: &Origin,
    plugins: &[(&str, &str)],
    tls: Option<&str>,
) -> anyhow::Result<TestGateway> {
    let mut manifest = Manifest::new()
        .listener("web", "")
        .upstream("app", &[origin.addr()], "");
    if let Some(tls) = tls {
        manifest = manifest.listener("tls", tls);
    }
    for (name, config) in plugins {
        manifest = manifest
            .raw(&format!(
                "[plugin.{name}]\nsource = \"builtin:security-headers\"\nconfig = {config}\ndeadline = \"1s\"\n"
            ))
            .route(
                name,
                &format!("{{ path_prefix = \"/{name}/\" }}"),
                "app",
                &format!("policies = [\"{name}\"]"),
            );
    }
    manifest.start().await
}

/// Every value of header `name` in `reply`.
fn all<'a>(reply: &'a Reply, name: &str) -> Vec<&'a str> {
    reply
        .headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect()
}

/// Checks the three defaults besides HSTS.
fn assert_defaults(reply: &Reply) {
    assert_eq!(all(reply, "x-frame-options"), ["DENY"], "{reply:?}");
    assert_eq!(
        all(reply, "x-content-type-options"),
        ["nosniff"],
        "{reply:?}"
    );
    assert_eq!(
        all(reply, "referrer-policy"),
        ["strict-origin-when-cross-origin"],
        "{reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defaults_on_plain_http_strip_the_software_headers_and_leave_out_hsts() -> anyhow::Result<()>
{
    let origin = Origin::start("app", Mode::EchoWithHeaders(SOFTWARE)).await?;
    let gw = gateway(&origin, &[("sh-default", "{}")], None).await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    let reply = client.request(get("app.test", "/sh-default/page")).await?;

    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    assert_defaults(&reply);
    assert_eq!(
        reply.header("strict-transport-security"),
        None,
        "never over plain http"
    );
    assert_eq!(reply.header("server"), None, "{reply:?}");
    assert_eq!(reply.header("x-powered-by"), None, "{reply:?}");
    assert_eq!(
        reply.header("content-security-policy"),
        None,
        "not a default"
    );
    // The rest of the response is untouched.
    assert_eq!(reply.header(ORIGIN_HEADER), Some("app"));
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.json()?["path"], "/sh-default/page");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsts_and_configured_policies_are_sent_over_https() -> anyhow::Result<()> {
    let ca = TestCa::new()?;
    let cert = ca.issue(&["app.example.com"])?;
    let dir = tempfile::tempdir()?;
    let (cert_path, key_path) = cert.write(dir.path(), "app")?;
    let tls = format!(
        "tls = [{{ cert = {:?}, key = {:?} }}]",
        cert_path.display().to_string(),
        key_path.display().to_string()
    );
    let origin = Origin::start("app", Mode::EchoWithHeaders(SOFTWARE)).await?;
    let custom = r#"{ hsts = { max_age = "730d", preload = true },
                      x_frame_options = "sameorigin",
                      content_security_policy = "default-src 'self'; frame-ancestors 'self'",
                      content_security_policy_report_only = "default-src 'none'; report-uri /csp",
                      permissions_policy = "geolocation=(), camera=()",
                      cross_origin_opener_policy = true }"#;
    let gw = gateway(
        &origin,
        &[("sh-tls-default", "{}"), ("sh-tls-custom", custom)],
        Some(&tls),
    )
    .await?;

    let stream = tls_connect(gw.addr("tls"), "app.example.com", ca.client_config(&[])?).await?;
    let mut client: H1<_> = H1::over(stream).await?;
    let reply = client
        .request(get("app.example.com", "/sh-tls-default/"))
        .await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    assert_eq!(
        all(&reply, "strict-transport-security"),
        ["max-age=31536000; includeSubDomains"]
    );
    assert_defaults(&reply);
    assert_eq!(reply.header("server"), None);
    assert_eq!(reply.header("x-powered-by"), None);

    let reply = client
        .request(get("app.example.com", "/sh-tls-custom/"))
        .await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    for (name, value) in [
        (
            "strict-transport-security",
            "max-age=63072000; includeSubDomains; preload",
        ),
        ("x-frame-options", "SAMEORIGIN"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "strict-origin-when-cross-origin"),
        (
            "content-security-policy",
            "default-src 'self'; frame-ancestors 'self'",
        ),
        (
            "content-security-policy-report-only",
            "default-src 'none'; report-uri /csp",
        ),
        ("permissions-policy", "geolocation=(), camera=()"),
        ("cross-origin-opener-policy", "same-origin"),
    ] {
        assert_eq!(all(&reply, name), [value], "{name}: {reply:?}");
    }

    // HTTP/2 over TLS gets the same headers.
    let stream = tls_connect(
        gw.addr("tls"),
        "app.example.com",
        ca.client_config(&[b"h2"])?,
    )
    .await?;
    let mut h2: H2<_> = H2::over(stream).await?;
    let mut req = get("ignored", "/sh-tls-default/");
    req.headers_mut().remove("host");
    *req.uri_mut() = "https://app.example.com/sh-tls-default/".parse()?;
    let reply = h2.request(req).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    assert_eq!(reply.version, http::Version::HTTP_2);
    assert_eq!(
        reply.header("strict-transport-security"),
        Some("max-age=31536000; includeSubDomains")
    );
    assert_defaults(&reply);
    assert_eq!(reply.header("server"), None);

    // The same plugin over plain http: no HSTS.
    let mut plain: H1 = H1::connect(gw.addr("web")).await?;
    let reply = plain.request(get("app.test", "/sh-tls-custom/")).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    assert_eq!(reply.header("strict-transport-security"), None);
    assert!(
        reply.header("content-security-policy").is_some(),
        "{reply:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstreams_own_values_are_kept_unless_override() -> anyhow::Result<()> {
    let origin = Origin::start("app", Mode::EchoWithHeaders(OWN_HEADERS)).await?;
    let gw = gateway(
        &origin,
        &[("sh-keep", "{}"), ("sh-override", "{ override = true }")],
        None,
    )
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;

    let kept = client.request(get("app.test", "/sh-keep/")).await?;
    assert_eq!(kept.status, 200, "{}", kept.excerpt());
    assert_eq!(all(&kept, "x-frame-options"), ["SAMEORIGIN"]);
    assert_eq!(all(&kept, "referrer-policy"), ["no-referrer"]);
    assert_eq!(all(&kept, "x-content-type-options"), ["nosniff"], "added");
    assert_eq!(kept.header("server"), None);

    let replaced = client.request(get("app.test", "/sh-override/")).await?;
    assert_eq!(replaced.status, 200, "{}", replaced.excerpt());
    assert_defaults(&replaced);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn false_and_empty_turn_defaults_off() -> anyhow::Result<()> {
    let origin = Origin::start("app", Mode::EchoWithHeaders(SOFTWARE)).await?;
    let config = r#"{ hsts = { https_only = false, max_age = 600 }, x_frame_options = false,
                      referrer_policy = "", strip = ["X-Powered-By"] }"#;
    let gw = gateway(&origin, &[("sh-relaxed", config)], None).await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    let reply = client.request(get("app.test", "/sh-relaxed/")).await?;

    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    assert_eq!(
        reply.header("strict-transport-security"),
        Some("max-age=600; includeSubDomains"),
        "https_only = false sends it over plain http"
    );
    assert_eq!(reply.header("x-frame-options"), None);
    assert_eq!(reply.header("referrer-policy"), None);
    assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(reply.header("server"), Some("origin/1.0"), "not in strip");
    assert_eq!(reply.header("x-powered-by"), None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_is_refused_naming_the_key() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    for (config, key) in [
        (r#"{ x_frame_options = "ALLOWALL" }"#, "x_frame_options"),
        (r#"{ hsts = { max_age = "1y" } }"#, "hsts.max_age"),
        (
            r#"{ hsts = { preload = true, include_subdomains = false } }"#,
            "hsts.preload",
        ),
        (
            r#"{ content_security_policy = true }"#,
            "content_security_policy",
        ),
        (r#"{ strip = ["bad name"] }"#, "strip[0]"),
        (
            r#"{ frame_options = "DENY" }"#,
            "frame_options: unknown key",
        ),
    ] {
        let error = gateway(&origin, &[("sh-bad", config)], None)
            .await
            .map(drop)
            .expect_err(config);
        let message = format!("{error:#}");
        assert!(message.contains(key), "{config}: {message}");
    }
    Ok(())
}
