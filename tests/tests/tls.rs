//! TLS listeners: certificate choice by SNI, ALPN, HTTP/1.1 and HTTP/2 over
//! TLS, and plain listeners that redirect to https; only TLS 1.2 and 1.3
//! with ECDHE AEAD suites; unusable certificates and keys refused at start
//! and at reload, naming the key.

use std::time::Duration;

use sluice_tests::client::{H1, H2, admin_get, admin_send, fetch, get, worker_connections};
use sluice_tests::tls::{
    TestCa, TestCert, accept_any_config, alpn_protocol, peer_certificate, tls_connect,
};
use sluice_tests::{Manifest, Origin, TestGateway, WAIT, within};

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
    tls_setup_on(1).await
}

impl TlsSetup {
    /// An HTTP/1.1 connection to the `tls` listener, its certificate for
    /// `sni` verified against the test CA.
    async fn h1(&self, sni: &str) -> anyhow::Result<H1> {
        let config = self.ca.client_config(&[b"http/1.1"])?;
        H1::over(tls_connect(self.gateway.addr("tls"), sni, config).await?).await
    }
}

/// [`tls_setup`] served by `workers` workers, with an admin API.
async fn tls_setup_on(workers: usize) -> anyhow::Result<TlsSetup> {
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
    let manifest = Manifest::new()
        .raw("[admin]\nlisten = \"127.0.0.1:0\"")
        .listener("tls", &tls)
        .upstream("app", &[origin.addr()], "")
        .route("all", "{}", "app", "")
        .build();
    let gateway = TestGateway::start_with_workers(&manifest, workers).await?;
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

    // Full certificate verification against the test CA, for the SNI certificate.
    let mut conn = setup.h1("b.example.com").await?;
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

/// With two workers a connection may be accepted by one and handed to the
/// other before its handshake (see `proxy::spread`): every TLS connection
/// is served, and the workers end up with about as many each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_are_spread_over_two_workers_and_all_served() -> anyhow::Result<()> {
    let setup = tls_setup_on(2).await?;
    let mut open = Vec::new();
    for i in 0..40 {
        let mut conn = setup.h1("b.example.com").await?;
        let reply = conn
            .request(get("b.example.com", &format!("/n/{i}")))
            .await?;
        assert_eq!(reply.status, 200, "connection {i}: {}", reply.excerpt());
        assert_eq!(reply.json()?["path"], format!("/n/{i}"));
        open.push(conn);
    }
    let metrics = admin_get(setup.gateway.admin_addr(), "/metrics", None).await?;
    let text = metrics.text();
    let per_worker = worker_connections(&text, 2);
    assert_eq!(per_worker.iter().sum::<u64>(), 40, "{per_worker:?}");
    assert!(
        per_worker[0].abs_diff(per_worker[1]) <= 2,
        "connections per worker: {per_worker:?}"
    );
    drop(open);
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

// ---------------------------------------------------------------------------
// Protocol versions and cipher suites, probed with hand-written ClientHellos
// (rustls cannot speak TLS 1.1 or CBC, and CI needs no openssl)

/// TLS record content types.
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
/// Alert descriptions (RFC 8446 §6).
const HANDSHAKE_FAILURE: u8 = 40;
const PROTOCOL_VERSION: u8 = 70;
/// `TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256`: the suite the listener would
/// pick for the test CA's ECDSA certificates.
const ECDHE_ECDSA_AES128_GCM: u16 = 0xc02b;

fn push_extension(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    out.extend(kind.to_be_bytes());
    out.extend((data.len() as u16).to_be_bytes());
    out.extend(data);
}

/// A ClientHello record as a TLS 1.2 or older client sends it: `version`
/// is the highest it speaks and there is no supported_versions extension.
/// It offers `suites`, SNI `a.example.com`, X25519/P-256/P-384, ECDSA and
/// RSA signatures, extended master secret and secure renegotiation.
fn client_hello(version: u16, suites: &[u16]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend(version.to_be_bytes());
    body.extend([0x5a; 32]);
    body.push(0);
    body.extend(((suites.len() * 2) as u16).to_be_bytes());
    for suite in suites {
        body.extend(suite.to_be_bytes());
    }
    body.extend([1, 0]);
    let name = b"a.example.com";
    let mut sni = Vec::new();
    sni.extend(((name.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend((name.len() as u16).to_be_bytes());
    sni.extend(name);
    let mut extensions = Vec::new();
    push_extension(&mut extensions, 0x0000, &sni);
    push_extension(&mut extensions, 0x000a, &[0, 6, 0, 0x1d, 0, 0x17, 0, 0x18]);
    push_extension(&mut extensions, 0x000b, &[1, 0]);
    push_extension(&mut extensions, 0x000d, &[0, 8, 4, 3, 8, 4, 4, 1, 5, 3]);
    push_extension(&mut extensions, 0x0017, &[]);
    push_extension(&mut extensions, 0xff01, &[0]);
    body.extend((extensions.len() as u16).to_be_bytes());
    body.extend(extensions);
    let mut handshake = vec![1];
    handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![HANDSHAKE, 3, 1];
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

/// What the listener answered a ClientHello with.
#[derive(Debug)]
enum HelloAnswer {
    /// A ServerHello choosing this version and suite.
    ServerHello { version: u16, suite: u16 },
    /// A fatal alert with this description, then the connection closed.
    Alert(u8),
}

/// Sends `hello` and reads the listener's first record.
async fn answer_to(addr: std::net::SocketAddr, hello: &[u8]) -> anyhow::Result<HelloAnswer> {
    use anyhow::Context as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = sluice_tests::client::connect(addr).await?;
    stream.write_all(hello).await?;
    let mut header = [0u8; 5];
    within("the first TLS record", WAIT, stream.read_exact(&mut header))
        .await?
        .context("closed without a TLS record")?;
    let mut payload = vec![0u8; usize::from(u16::from_be_bytes([header[3], header[4]]))];
    within(
        "the TLS record's payload",
        WAIT,
        stream.read_exact(&mut payload),
    )
    .await?
    .context("closed mid-record")?;
    match header[0] {
        ALERT => {
            anyhow::ensure!(
                payload.len() == 2 && payload[0] == 2,
                "not a fatal alert: {payload:?}"
            );
            let mut rest = Vec::new();
            within(
                "the connection to close after the alert",
                Duration::from_secs(2),
                stream.read_to_end(&mut rest),
            )
            .await??;
            anyhow::ensure!(rest.is_empty(), "more after a fatal alert: {rest:?}");
            Ok(HelloAnswer::Alert(payload[1]))
        }
        HANDSHAKE => {
            anyhow::ensure!(
                payload.first() == Some(&2),
                "not a ServerHello: {payload:?}"
            );
            let version = u16::from_be_bytes([payload[4], payload[5]]);
            let session_id = usize::from(payload[38]);
            let at = 39 + session_id;
            let suite = u16::from_be_bytes([payload[at], payload[at + 1]]);
            Ok(HelloAnswer::ServerHello { version, suite })
        }
        other => anyhow::bail!("unexpected record type {other}"),
    }
}

/// The hand-written hello is sound: from a TLS 1.2 client offering
/// ECDHE-ECDSA-AES128-GCM it gets a ServerHello for exactly that. (The
/// refusals below use the same hello with one thing changed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_written_tls12_hello_with_an_ecdhe_aead_suite_gets_a_server_hello()
-> anyhow::Result<()> {
    let setup = tls_setup().await?;
    let addr = setup.gateway.addr("tls");
    let answer = answer_to(
        addr,
        &client_hello(0x0303, &[0x002f, ECDHE_ECDSA_AES128_GCM]),
    )
    .await?;
    assert!(
        matches!(
            answer,
            HelloAnswer::ServerHello {
                version: 0x0303,
                suite: ECDHE_ECDSA_AES128_GCM
            }
        ),
        "{answer:?}"
    );
    Ok(())
}

/// TLS 1.1, 1.0 and SSL 3.0 clients are refused with a protocol_version
/// alert, even when they offer a suite the listener would otherwise take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_offering_tls11_or_older_get_a_protocol_version_alert() -> anyhow::Result<()> {
    let setup = tls_setup().await?;
    let addr = setup.gateway.addr("tls");
    for (label, version) in [
        ("TLS 1.1", 0x0302),
        ("TLS 1.0", 0x0301),
        ("SSL 3.0", 0x0300),
    ] {
        let hello = client_hello(version, &[ECDHE_ECDSA_AES128_GCM, 0xc009, 0xc013, 0x002f]);
        let answer = answer_to(addr, &hello).await?;
        assert!(
            matches!(answer, HelloAnswer::Alert(PROTOCOL_VERSION)),
            "{label}: {answer:?}"
        );
    }
    // The listener still serves a modern client.
    let reply = setup
        .h1("a.example.com")
        .await?
        .request(get("a.example.com", "/"))
        .await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    Ok(())
}

/// A TLS 1.2 client with nothing but CBC, static-RSA, DHE, 3DES or RC4
/// suites is refused with a handshake_failure alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_clients_without_an_ecdhe_aead_suite_are_refused() -> anyhow::Result<()> {
    let setup = tls_setup().await?;
    let addr = setup.gateway.addr("tls");
    let cases: [(&str, &[u16]); 7] = [
        ("AES128-SHA (openssl -cipher AES128-SHA)", &[0x002f]),
        ("ECDHE-ECDSA-AES128-SHA (CBC)", &[0xc009, 0xc00a]),
        (
            "ECDHE-ECDSA/RSA-AES-SHA256/384 (CBC)",
            &[0xc023, 0xc024, 0xc027, 0xc028],
        ),
        ("AES128-GCM-SHA256 (RSA key exchange)", &[0x009c, 0x009d]),
        (
            "DHE-RSA-AES128-GCM-SHA256 (finite-field DHE)",
            &[0x009e, 0x009f],
        ),
        ("DES-CBC3-SHA", &[0x000a]),
        ("RC4-SHA", &[0x0005]),
    ];
    for (label, suites) in cases {
        let answer = answer_to(addr, &client_hello(0x0303, suites)).await?;
        assert!(
            matches!(answer, HelloAnswer::Alert(HANDSHAKE_FAILURE)),
            "{label}: {answer:?}"
        );
    }
    Ok(())
}

/// A real TLS 1.2 client restricted to ECDHE-ECDSA-AES128-GCM-SHA256
/// completes the handshake, verifies the certificate and is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_client_with_ecdhe_ecdsa_aes128_gcm_is_served() -> anyhow::Result<()> {
    use rustls::crypto::ring;
    let setup = tls_setup().await?;
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256],
        ..ring::default_provider()
    };
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS12])?
        .with_root_certificates(setup.ca.roots()?)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let stream = tls_connect(
        setup.gateway.addr("tls"),
        "a.example.com",
        std::sync::Arc::new(config),
    )
    .await?;
    let session = stream.get_ref().1;
    assert_eq!(
        session.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    assert_eq!(
        session.negotiated_cipher_suite().map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)
    );
    let reply = H1::over(stream)
        .await?
        .request(get("a.example.com", "/tls12"))
        .await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    assert_eq!(reply.json()?["path"], "/tls12");
    Ok(())
}

// ---------------------------------------------------------------------------
// Bad certificates and keys

/// The `tls = [...]` line for these (cert, key) paths.
fn tls_line(pairs: &[(&std::path::Path, &std::path::Path)]) -> String {
    let entries: Vec<String> = pairs
        .iter()
        .enumerate()
        .map(|(i, (cert, key))| {
            let sni = if i == 0 {
                String::new()
            } else {
                format!(", sni = [\"n{i}.example.com\"]")
            };
            format!(
                "{{ cert = {:?}, key = {:?}{sni} }}",
                cert.display().to_string(),
                key.display().to_string()
            )
        })
        .collect();
    format!("tls = [{}]", entries.join(", "))
}

/// Every way a listener's certificate or key can be unusable is refused
/// when the manifest loads (what `sluice run` and `sluice check` do),
/// naming the file, the listener key, the path and the problem.
#[test]
fn unusable_certificates_and_keys_are_named_at_start() -> anyhow::Result<()> {
    let ca = TestCa::new()?;
    let dir = tempfile::tempdir()?;
    let (a_cert, a_key) = ca.issue(&["a.example.com"])?.write(dir.path(), "a")?;
    let (b_cert, b_key) = ca.issue(&["b.example.com"])?.write(dir.path(), "b")?;
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("garbage.pem"), "this is not PEM\n")?;
    std::fs::write(
        path("bad-base64.pem"),
        "-----BEGIN CERTIFICATE-----\n!!!! not base64 !!!!\n-----END CERTIFICATE-----\n",
    )?;
    std::fs::write(
        path("bad-der.pem"),
        "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END CERTIFICATE-----\n",
    )?;
    std::fs::write(
        path("bad-key.key"),
        "-----BEGIN PRIVATE KEY-----\nAAECAwQFBgcICQ==\n-----END PRIVATE KEY-----\n",
    )?;
    std::fs::write(path("empty.pem"), "")?;
    let missing = path("missing.pem");
    let cases: Vec<(&str, String, Vec<String>)> = vec![
        (
            "key of another certificate",
            tls_line(&[(&a_cert, &b_key)]),
            vec![
                "listener[0].tls[0].key: private key".into(),
                format!("{:?}", b_key.display().to_string()),
                "does not belong to certificate".into(),
                format!("{:?}", a_cert.display().to_string()),
            ],
        ),
        (
            "mismatch in the second certificate",
            tls_line(&[(&a_cert, &a_key), (&b_cert, &a_key)]),
            vec![
                "listener[0].tls[1].key: private key".into(),
                "does not belong to certificate".into(),
            ],
        ),
        (
            "missing certificate file",
            tls_line(&[(&missing, &a_key)]),
            vec![
                "listener[0].tls[0].cert: cannot read certificate".into(),
                "missing.pem".into(),
            ],
        ),
        (
            "missing key file",
            tls_line(&[(&a_cert, &missing)]),
            vec![
                "listener[0].tls[0].key: cannot read private key".into(),
                "missing.pem".into(),
            ],
        ),
        (
            "certificate file without PEM",
            tls_line(&[(&path("garbage.pem"), &a_key)]),
            vec!["listener[0].tls[0].cert: no PEM certificate found".into()],
        ),
        (
            "empty certificate file",
            tls_line(&[(&path("empty.pem"), &a_key)]),
            vec!["listener[0].tls[0].cert: no PEM certificate found".into()],
        ),
        (
            "a key where the certificate goes",
            tls_line(&[(&a_key, &a_key)]),
            vec!["listener[0].tls[0].cert: no PEM certificate found".into()],
        ),
        (
            "PEM that is not base64",
            tls_line(&[(&path("bad-base64.pem"), &a_key)]),
            vec!["listener[0].tls[0].cert: cannot read certificate".into()],
        ),
        (
            "a certificate that is not DER",
            tls_line(&[(&path("bad-der.pem"), &a_key)]),
            vec![
                "listener[0].tls[0].cert: certificate".into(),
                "bad-der.pem\" is not a valid X.509 certificate".into(),
            ],
        ),
        (
            "key file without PEM",
            tls_line(&[(&a_cert, &path("garbage.pem"))]),
            vec!["listener[0].tls[0].key: cannot read private key".into()],
        ),
        (
            "a certificate where the key goes",
            tls_line(&[(&a_cert, &a_cert)]),
            vec!["listener[0].tls[0].key: cannot read private key".into()],
        ),
        (
            "a key that is not a key",
            tls_line(&[(&a_cert, &path("bad-key.key"))]),
            vec!["listener[0].tls[0].key: unsupported private key".into()],
        ),
    ];
    for (label, tls, expected) in cases {
        let manifest = Manifest::new()
            .listener("tls", &tls)
            .upstream("app", &["127.0.0.1:9".parse()?], "")
            .route("all", "{}", "app", "")
            .build();
        let error = match sluice::Config::parse(&manifest, std::path::Path::new("sluice.toml")) {
            Ok(_) => panic!("{label}: the manifest loaded"),
            Err(error) => error.to_string(),
        };
        assert_eq!(error.lines().count(), 1, "{label}: one problem: {error}");
        assert!(
            error.starts_with("sluice.toml: listener[0].tls["),
            "{label}: {error}"
        );
        for part in &expected {
            assert!(
                error.contains(part.as_str()),
                "{label}: {error:?} lacks {part:?}"
            );
        }
    }
    Ok(())
}

/// `POST /reload` with a key that does not match its certificate, or with
/// the certificate file overwritten by garbage, is refused with 422 naming
/// the key, and the running certificate keeps serving; a good new
/// certificate is then taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_with_an_unusable_certificate_is_refused_and_the_old_one_serves()
-> anyhow::Result<()> {
    let ca = TestCa::new()?;
    let dir = tempfile::tempdir()?;
    let a = ca.issue(&["a.example.com"])?;
    let b = ca.issue(&["a.example.com"])?;
    let (a_cert, a_key) = a.write(dir.path(), "a")?;
    let (b_cert, b_key) = b.write(dir.path(), "b")?;
    let origin = Origin::echo("app").await?;
    let manifest = |tls: &str| {
        Manifest::new()
            .listener("tls", tls)
            .raw("[admin]\nlisten = \"127.0.0.1:0\"\n")
            .upstream("app", &[origin.addr()], "")
            .route("all", "{}", "app", "")
            .build()
    };
    let gateway = TestGateway::start(&manifest(&tls_line(&[(&a_cert, &a_key)]))).await?;
    let addr = gateway.addr("tls");
    let config = setup_client(&ca)?;
    let served = |expected: sluice_tests::tls::TestCert, label: &'static str| {
        let config = config.clone();
        async move {
            let stream = tls_connect(addr, "a.example.com", config).await?;
            let cert =
                peer_certificate(&stream).ok_or_else(|| anyhow::anyhow!("no certificate"))?;
            anyhow::ensure!(
                cert == expected.der,
                "{label}: another certificate is served"
            );
            let reply = H1::over(stream)
                .await?
                .request(get("a.example.com", "/"))
                .await?;
            anyhow::ensure!(reply.status == 200, "{label}: {}", reply.excerpt());
            anyhow::Ok(())
        }
    };
    served(a.clone(), "before").await?;
    // A connection open across the refused reloads keeps working too.
    let kept = tls_connect(addr, "a.example.com", config.clone()).await?;
    let mut kept = H1::over(kept).await?;

    gateway.rewrite(&manifest(&tls_line(&[(&b_cert, &a_key)])))?;
    let reply = admin_send(gateway.admin_addr(), "POST", "/reload", None, "").await?;
    assert_eq!(reply.status, 422, "{}", reply.excerpt());
    let error = reply.json()?["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("listener[0].tls[0].key: private key")
            && error.contains("does not belong to certificate"),
        "{error}"
    );
    served(a.clone(), "after a mismatched key").await?;

    // The running certificate's own file overwritten with garbage.
    gateway.rewrite(&manifest(&tls_line(&[(&a_cert, &a_key)])))?;
    let good_pem = std::fs::read(&a_cert)?;
    std::fs::write(&a_cert, "not a certificate any more\n")?;
    let reply = admin_send(gateway.admin_addr(), "POST", "/reload", None, "").await?;
    assert_eq!(reply.status, 422, "{}", reply.excerpt());
    let error = reply.json()?["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("listener[0].tls[0].cert: no PEM certificate found"),
        "{error}"
    );
    served(a.clone(), "after a garbage certificate file").await?;
    let reply = kept.request(get("a.example.com", "/kept")).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    std::fs::write(&a_cert, good_pem)?;

    gateway.rewrite(&manifest(&tls_line(&[(&b_cert, &b_key)])))?;
    let reply = admin_send(gateway.admin_addr(), "POST", "/reload", None, "").await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    served(b, "after a good reload").await?;
    Ok(())
}

/// A client config trusting `ca`, speaking HTTP/1.1.
fn setup_client(ca: &TestCa) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
    ca.client_config(&[b"http/1.1"])
}
