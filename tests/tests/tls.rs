//! TLS listeners: certificate choice by SNI, ALPN, HTTP/1.1 and HTTP/2 over
//! TLS, and plain listeners that redirect to https.

use sluice_tests::client::{H1, H2, fetch, get};
use sluice_tests::tls::{
    TestCa, TestCert, accept_any_config, alpn_protocol, peer_certificate, tls_connect,
};
use sluice_tests::{Manifest, Origin, TestGateway};

/// A gateway with one TLS listener "tls": a.example.com's certificate is the
/// default, b.example.com's is chosen by SNI.
struct TlsSetup {
    ca: TestCa,
    a: TestCert,
    b: TestCert,
    origin: Origin,
    gateway: TestGateway,
    _dir: tempfile::TempDir,
}

async fn tls_setup() -> anyhow::Result<TlsSetup> {
    let ca = TestCa::new()?;
    let a = ca.issue(&["a.example.com"])?;
    let b = ca.issue(&["b.example.com"])?;
    let dir = tempfile::tempdir()?;
    let (a_cert, a_key) = a.write(dir.path(), "a")?;
    let (b_cert, b_key) = b.write(dir.path(), "b")?;
    let origin = Origin::echo("app").await?;
    let tls = format!(
        "tls = [{{ cert = {:?}, key = {:?} }}, {{ cert = {:?}, key = {:?}, sni = [\"b.example.com\"] }}]",
        a_cert.display().to_string(),
        a_key.display().to_string(),
        b_cert.display().to_string(),
        b_key.display().to_string(),
    );
    let gateway = Manifest::new()
        .listener("tls", &tls)
        .upstream("app", &[origin.addr()], "")
        .route("all", "{}", "app", "")
        .start()
        .await?;
    Ok(TlsSetup {
        ca,
        a,
        b,
        origin,
        gateway,
        _dir: dir,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_named_certificate_and_falls_back_to_the_first() -> anyhow::Result<()> {
    let setup = tls_setup().await?;
    let addr = setup.gateway.addr("tls");
    let config = accept_any_config(&[])?;
    for (sni, expected, which) in [
        ("b.example.com", &setup.b, "b (named by sni)"),
        ("B.Example.Com", &setup.b, "b (SNI is case-insensitive)"),
        ("a.example.com", &setup.a, "a (the default)"),
        ("unknown.example.org", &setup.a, "a (the default)"),
    ] {
        let stream = tls_connect(addr, sni, config.clone()).await?;
        let served =
            peer_certificate(&stream).ok_or_else(|| anyhow::anyhow!("no peer certificate"))?;
        assert!(
            served == expected.der,
            "SNI {sni}: expected certificate {which}, got another one"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_negotiates_h2_when_offered_and_http11_otherwise() -> anyhow::Result<()> {
    let setup = tls_setup().await?;
    let addr = setup.gateway.addr("tls");

    let h2 = tls_connect(
        addr,
        "a.example.com",
        setup.ca.client_config(&[b"h2", b"http/1.1"])?,
    )
    .await?;
    assert_eq!(alpn_protocol(&h2).as_deref(), Some(&b"h2"[..]));
    let mut conn = H2::over(h2).await?;
    let mut req = get("ignored", "/over-h2");
    req.headers_mut().remove("host");
    *req.uri_mut() = "https://a.example.com/over-h2".parse()?;
    let reply = conn.request(req).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    assert_eq!(reply.version, http::Version::HTTP_2);

    let h1 = tls_connect(
        addr,
        "a.example.com",
        setup.ca.client_config(&[b"http/1.1"])?,
    )
    .await?;
    assert_eq!(alpn_protocol(&h1).as_deref(), Some(&b"http/1.1"[..]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_request_reaches_origin_marked_as_https() -> anyhow::Result<()> {
    let setup = tls_setup().await?;
    let addr = setup.gateway.addr("tls");

    // Full certificate verification against the test CA, for the SNI certificate.
    let stream = tls_connect(
        addr,
        "b.example.com",
        setup.ca.client_config(&[b"http/1.1"])?,
    )
    .await?;
    let mut conn = H1::over(stream).await?;
    let reply = conn.request(get("b.example.com", "/secure?q=1")).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    let json = reply.json()?;
    assert_eq!(json["path"], "/secure");
    assert_eq!(json["query"], "q=1");

    let seen = setup
        .origin
        .last_request()
        .ok_or_else(|| anyhow::anyhow!("origin saw no request"))?;
    assert_eq!(
        seen.headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok()),
        Some("https")
    );
    assert_eq!(
        seen.headers.get("host").and_then(|v| v.to_str().ok()),
        Some("b.example.com")
    );
    assert_eq!(
        seen.version,
        http::Version::HTTP_11,
        "TLS is terminated: plain HTTP/1.1 to the origin"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_listener_answers_301_to_https_with_port_path_and_query() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let gateway = Manifest::new()
        .listener("plain", "redirect_https = 8443")
        .listener("plain443", "redirect_https = 443")
        .upstream("app", &[origin.addr()], "")
        .route("all", "{}", "app", "")
        .start()
        .await?;

    let reply = fetch(
        gateway.addr("plain"),
        get("shop.example.com:8080", "/a/b?q=1&r=two"),
    )
    .await?;
    assert_eq!(reply.status, 301);
    assert_eq!(
        reply.header("location"),
        Some("https://shop.example.com:8443/a/b?q=1&r=two")
    );

    let reply = fetch(gateway.addr("plain443"), get("shop.example.com", "/")).await?;
    assert_eq!(reply.status, 301);
    assert_eq!(
        reply.header("location"),
        Some("https://shop.example.com/"),
        "no :443 in the default port's URL"
    );

    assert_eq!(
        origin.requests(),
        0,
        "redirects are answered by the gateway"
    );
    Ok(())
}
