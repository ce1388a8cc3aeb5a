//! `builtin:geo` through real requests, with the bundled country database
//! (`data/geo/geo-whois-asn-country.mmdb`): clients reach their region's
//! origin, which sees `x-sluice-country` and `x-sluice-region`; IPv4 and
//! IPv6 clients; `X-Forwarded-For` and country headers believed only from a
//! trusted peer; unknown and unlisted countries going to the default
//! region; failover, in order, when a region's endpoints fail their health
//! checks, and back when they recover; panic mode when every region is
//! down; and a bad config refused with its key named.
//!
//! The client addresses are real ones, checked against the bundled
//! database (a WHOIS-based one: it says where a network is registered):
//!
//! | address                | country | whose                      |
//! |------------------------|---------|----------------------------|
//! | `8.8.8.8`              | US      | Google Public DNS          |
//! | `193.99.144.80`        | DE      | heise online              |
//! | `212.58.244.22`        | GB      | BBC                        |
//! | `80.67.169.12`         | FR      | French Data Network DNS    |
//! | `195.113.0.1`          | CZ      | CESNET                     |
//! | `133.11.0.1`           | JP      | University of Tokyo        |
//! | `165.21.83.88`         | SG      | SingNet                    |
//! | `139.130.4.5`          | AU      | Telstra                    |
//! | `200.160.2.3`          | BR      | NIC.br                     |
//! | `2001:4860:4860::8888` | US      | Google Public DNS (IPv6)   |
//! | `2a01:4f8::1`          | DE      | Hetzner                    |
//! | `2001:2f8::1`          | JP      | a Japanese /32             |
//! | `192.0.2.1`, loopback  | none    | documentation, loopback    |
//!
//! Each test names its plugin differently: a plugin's metrics are kept by
//! name for the whole process, and tests run in parallel.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use sluice_tests::client::{H1, get};
use sluice_tests::origin::ORIGIN_HEADER;
use sluice_tests::{Manifest, Mode, Origin, Reply, TestGateway, WAIT};

/// The bundled database, by absolute path.
const DATABASE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../data/geo/geo-whois-asn-country.mmdb"
);

/// Each region's failover order.
const PER_REGION: &str = "{ us-east = [\"eu-west\", \"ap-southeast\"], eu-west = [\"ap-southeast\", \"us-east\"], ap-southeast = [\"us-east\", \"eu-west\"] }";

/// Three regions, with a continent entry for the rest of Europe, and
/// `failover` (a TOML value). `default` and `extra` (more `key = value`
/// pairs, each with a leading comma) vary by test.
fn config(default: &str, failover: &str, extra: &str) -> String {
    format!(
        "{{ regions = {{ us-east = [\"US\", \"CA\", \"MX\"], eu-west = [\"GB\", \"DE\", \"FR\", \"continent:EU\"], ap-southeast = [\"JP\", \"SG\", \"AU\"] }}, \
         upstreams = {{ us-east = \"us\", eu-west = \"eu\", ap-southeast = \"ap\" }}, \
         default = \"{default}\", failover = {failover}{extra} }}"
    )
}

/// A gateway with the bundled database, plugin `name` (`builtin:geo` with
/// `config`), upstreams `us`, `eu` and `ap` (each `endpoints = [...]` plus
/// `upstream_extra`), and one route to `us` through the plugin.
fn manifest(name: &str, config: &str, regions: [String; 3], upstream_extra: &str) -> Manifest {
    let mut manifest = Manifest::new()
        .listener("web", "")
        .raw(&format!("[geo]\ndatabase = {DATABASE:?}\n"))
        .raw(&format!(
            "[plugin.{name}]\nsource = \"builtin:geo\"\nconfig = {config}\ndeadline = \"1s\"\n"
        ));
    for (upstream, endpoints) in ["us", "eu", "ap"].iter().zip(regions) {
        manifest = manifest.raw(&format!(
            "[upstream.{upstream}]\n{endpoints}\n{upstream_extra}\n"
        ));
    }
    manifest.route("all", "{}", "us", &format!("policies = [\"{name}\"]"))
}

/// [`manifest`] in front of the three `origins`, started.
async fn start(name: &str, config: &str, origins: &[Origin; 3]) -> anyhow::Result<TestGateway> {
    manifest(name, config, endpoints(origins), "").start().await
}

/// `endpoints = ["ADDR"]`.
fn endpoint(addr: SocketAddr) -> String {
    format!("endpoints = [\"{addr}\"]")
}

/// One echo origin per region, named after its upstream.
async fn origins() -> anyhow::Result<[Origin; 3]> {
    Ok([
        Origin::echo("us").await?,
        Origin::echo("eu").await?,
        Origin::echo("ap").await?,
    ])
}

/// Each origin's `endpoints = [...]`, in region order.
fn endpoints(origins: &[Origin; 3]) -> [String; 3] {
    [
        endpoint(origins[0].addr()),
        endpoint(origins[1].addr()),
        endpoint(origins[2].addr()),
    ]
}

/// A `GET /` with these headers.
fn request(headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut req = get("app.test", "/");
    for (name, value) in headers {
        req.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}")),
            http::HeaderValue::from_str(value).unwrap_or_else(|e| panic!("{value}: {e}")),
        );
    }
    req
}

/// Where a request went: the origin that answered, and the country and
/// region headers that origin saw.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Landed {
    origin: String,
    country: Option<String>,
    region: Option<String>,
}

impl Landed {
    fn of(reply: &Reply) -> anyhow::Result<Landed> {
        anyhow::ensure!(reply.status == 200, "{}", reply.excerpt());
        let json = reply.json()?;
        let seen = |name: &str| json["headers"][name].as_str().map(str::to_string);
        Ok(Landed {
            origin: reply.header(ORIGIN_HEADER).unwrap_or("").to_string(),
            country: seen("x-sluice-country"),
            region: seen("x-sluice-region"),
        })
    }

    fn expect(origin: &str, country: Option<&str>, region: &str) -> Landed {
        Landed {
            origin: origin.to_string(),
            country: country.map(str::to_string),
            region: Some(region.to_string()),
        }
    }
}

/// Sends a request with these headers and says where it landed.
async fn send(client: &mut H1, headers: &[(&str, &str)]) -> anyhow::Result<Landed> {
    Landed::of(&client.request(request(headers)).await?)
}

/// Sends a request forwarded for `client_ip` (by a trusted loopback peer).
async fn from(client: &mut H1, client_ip: &str) -> anyhow::Result<Landed> {
    send(client, &[("x-forwarded-for", client_ip)]).await
}

/// Sends requests forwarded for `client_ip` until one lands on `origin`
/// (health checks take a few intervals to notice a change), bounded by [`WAIT`].
async fn until_origin(client: &mut H1, client_ip: &str, origin: &str) -> anyhow::Result<Landed> {
    let start = Instant::now();
    loop {
        let reply = client
            .request(request(&[("x-forwarded-for", client_ip)]))
            .await?;
        if reply.status == 200 && reply.header(ORIGIN_HEADER) == Some(origin) {
            return Landed::of(&reply);
        }
        anyhow::ensure!(
            start.elapsed() < WAIT,
            "a request from {client_ip} never reached {origin} within {WAIT:?}; the last: {:?} {}",
            reply.header(ORIGIN_HEADER),
            reply.excerpt()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An address that refuses connections and that no other test can take:
/// a bound socket that never listens.
fn refusing() -> anyhow::Result<(tokio::net::TcpSocket, SocketAddr)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let addr = socket.local_addr()?;
    Ok((socket, addr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reach_their_region_s_origin_with_country_and_region_headers() -> anyhow::Result<()>
{
    let name = "geo-regions";
    let origins = origins().await?;
    let gw = start(
        name,
        &config("us-east", PER_REGION, ", trusted_proxies = [\"127.0.0.1\"]"),
        &origins,
    )
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    let cases = [
        ("8.8.8.8", "US", "us", "us-east"),
        ("193.99.144.80", "DE", "eu", "eu-west"),
        ("212.58.244.22", "GB", "eu", "eu-west"),
        ("80.67.169.12", "FR", "eu", "eu-west"),
        // Not listed itself: continent:EU.
        ("195.113.0.1", "CZ", "eu", "eu-west"),
        ("133.11.0.1", "JP", "ap", "ap-southeast"),
        ("165.21.83.88", "SG", "ap", "ap-southeast"),
        ("139.130.4.5", "AU", "ap", "ap-southeast"),
    ];
    for (ip, country, origin, region) in cases {
        assert_eq!(
            from(&mut client, ip).await?,
            Landed::expect(origin, Some(country), region),
            "{ip}"
        );
    }
    assert_eq!(origins[0].requests(), 1);
    assert_eq!(origins[1].requests(), 4);
    assert_eq!(origins[2].requests(), 3);
    assert_eq!(gw.counter(name, "geo_failover"), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_client_addresses_are_located() -> anyhow::Result<()> {
    let name = "geo-ipv6";
    let origins = origins().await?;
    let gw = start(
        name,
        &config("us-east", PER_REGION, ", trusted_proxies = [\"127.0.0.1\"]"),
        &origins,
    )
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    let cases = [
        ("2001:4860:4860::8888", "US", "us", "us-east"),
        ("2a01:4f8::1", "DE", "eu", "eu-west"),
        ("[2a01:4f8::1]:443", "DE", "eu", "eu-west"),
        ("2001:2f8::1", "JP", "ap", "ap-southeast"),
        // IPv4-mapped: located as its IPv4 address.
        ("::ffff:133.11.0.1", "JP", "ap", "ap-southeast"),
    ];
    for (ip, country, origin, region) in cases {
        assert_eq!(
            from(&mut client, ip).await?,
            Landed::expect(origin, Some(country), region),
            "{ip}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_peer_is_trusted_by_its_range() -> anyhow::Result<()> {
    let name = "geo-ipv6-peer";
    let origins = origins().await?;
    let gw = manifest(
        name,
        &config(
            "ap-southeast",
            PER_REGION,
            ", trusted_proxies = [\"::1/128\"]",
        ),
        endpoints(&origins),
        "",
    )
    .raw("[[listener]]\nname = \"v6\"\nlisten = \"[::1]:0\"\n")
    .start()
    .await?;
    let mut v6: H1 = H1::connect(gw.addr("v6")).await?;
    assert_eq!(
        from(&mut v6, "193.99.144.80").await?,
        Landed::expect("eu", Some("DE"), "eu-west")
    );
    assert_eq!(
        send(&mut v6, &[]).await?,
        Landed::expect("ap", None, "ap-southeast"),
        "::1 itself is nowhere: the default region"
    );
    // 127.0.0.1 is not trusted: its X-Forwarded-For is not read.
    let mut v4: H1 = H1::connect(gw.addr("web")).await?;
    assert_eq!(
        from(&mut v4, "193.99.144.80").await?,
        Landed::expect("ap", None, "ap-southeast")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_unlisted_countries_go_to_the_default_region() -> anyhow::Result<()> {
    let name = "geo-default";
    let origins = origins().await?;
    let gw = start(
        name,
        &config("eu-west", PER_REGION, ", trusted_proxies = [\"127.0.0.1\"]"),
        &origins,
    )
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    // No X-Forwarded-For: the loopback peer, which the database does not know.
    assert_eq!(
        send(&mut client, &[]).await?,
        Landed::expect("eu", None, "eu-west")
    );
    // A documentation address; the client's own x-sluice-country is removed.
    assert_eq!(
        send(
            &mut client,
            &[("x-forwarded-for", "192.0.2.1"), ("x-sluice-country", "JP")]
        )
        .await?,
        Landed::expect("eu", None, "eu-west")
    );
    // Known, but in no region and on no listed continent.
    assert_eq!(
        from(&mut client, "200.160.2.3").await?,
        Landed::expect("eu", Some("BR"), "eu-west")
    );
    assert_eq!(gw.counter(name, "geo_country_unknown"), 2);
    assert_eq!(origins[1].requests(), 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_peer_s_forwarded_for_and_country_headers_are_ignored() -> anyhow::Result<()> {
    let name = "geo-untrusted";
    let origins = origins().await?;
    let gw = start(
        name,
        &config(
            "ap-southeast",
            PER_REGION,
            ", trusted_proxies = [\"10.0.0.0/8\"], trusted_country_headers = [\"cf-ipcountry\"]",
        ),
        &origins,
    )
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    let landed = send(
        &mut client,
        &[
            ("x-forwarded-for", "193.99.144.80"),
            ("cf-ipcountry", "US"),
            ("x-sluice-country", "DE"),
            ("x-sluice-region", "eu-west"),
        ],
    )
    .await?;
    assert_eq!(
        landed,
        Landed::expect("ap", None, "ap-southeast"),
        "127.0.0.1 is not a trusted proxy: the client is 127.0.0.1, which is nowhere"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_s_country_header_decides() -> anyhow::Result<()> {
    let name = "geo-header";
    let origins = origins().await?;
    let trust = ", trusted_proxies = [\"127.0.0.0/8\"], \
                 trusted_country_headers = [\"cf-ipcountry\", \"x-country\"]";
    let gw = start(name, &config("us-east", PER_REGION, trust), &origins).await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    // The header wins over the database (8.8.8.8 is in the US).
    assert_eq!(
        send(
            &mut client,
            &[("x-forwarded-for", "8.8.8.8"), ("cf-ipcountry", "JP")]
        )
        .await?,
        Landed::expect("ap", Some("JP"), "ap-southeast")
    );
    // Cloudflare's "unknown" is skipped; the next header in the list says.
    assert_eq!(
        send(
            &mut client,
            &[
                ("x-forwarded-for", "8.8.8.8"),
                ("cf-ipcountry", "XX"),
                ("x-country", "de")
            ]
        )
        .await?,
        Landed::expect("eu", Some("DE"), "eu-west")
    );
    // Tor ("T1") is no country: the database decides.
    assert_eq!(
        send(
            &mut client,
            &[("x-forwarded-for", "133.11.0.1"), ("cf-ipcountry", "T1")]
        )
        .await?,
        Landed::expect("ap", Some("JP"), "ap-southeast")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_database_only_trusted_headers_place_clients() -> anyhow::Result<()> {
    let name = "geo-no-database";
    let origins = origins().await?;
    let manifest = format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n\n\
         [plugin.{name}]\nsource = \"builtin:geo\"\nconfig = {}\n\n\
         [upstream.us]\n{}\n[upstream.eu]\n{}\n[upstream.ap]\n{}\n\n\
         [[route]]\nname = \"all\"\nmatch = {{}}\nupstream = \"us\"\npolicies = [\"{name}\"]\n",
        config(
            "ap-southeast",
            PER_REGION,
            ", trusted_proxies = [\"127.0.0.1\"], trusted_country_headers = [\"cf-ipcountry\"]"
        ),
        endpoint(origins[0].addr()),
        endpoint(origins[1].addr()),
        endpoint(origins[2].addr()),
    );
    let gw = TestGateway::start(&manifest).await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    assert_eq!(
        from(&mut client, "193.99.144.80").await?,
        Landed::expect("ap", None, "ap-southeast")
    );
    assert_eq!(
        send(&mut client, &[("cf-ipcountry", "FR")]).await?,
        Landed::expect("eu", Some("FR"), "eu-west")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_without_healthy_endpoints_fails_over_in_order() -> anyhow::Result<()> {
    let name = "geo-failover";
    let us = Origin::echo("us").await?;
    let ap = Origin::echo("ap").await?;
    let (_held, dead) = refusing()?;
    let gw = manifest(
        name,
        &config("us-east", PER_REGION, ", trusted_proxies = [\"127.0.0.1\"]"),
        [endpoint(us.addr()), endpoint(dead), endpoint(ap.addr())],
        // Only the checks decide: a refused request would otherwise keep an
        // endpoint out for the passive `fail_timeout` after it is back.
        "health = { type = \"tcp\", interval = \"100ms\", timeout = \"1s\", rise = 1, fall = 1 }\n\
         passive = { max_fails = 0 }",
    )
    .start()
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    // eu-west's only endpoint refuses connections: its clients go to the
    // first region of its order, ap-southeast.
    until_origin(&mut client, "193.99.144.80", "ap").await?;
    for _ in 0..10 {
        assert_eq!(
            from(&mut client, "193.99.144.80").await?,
            Landed::expect("ap", Some("DE"), "ap-southeast")
        );
    }
    assert!(gw.counter(name, "geo_failover") >= 10);
    // Other regions' clients are not moved.
    assert_eq!(
        from(&mut client, "8.8.8.8").await?,
        Landed::expect("us", Some("US"), "us-east")
    );

    // ap-southeast goes down too: the next in the order, us-east.
    let ap_addr = ap.addr();
    drop(ap);
    until_origin(&mut client, "193.99.144.80", "us").await?;
    assert_eq!(
        from(&mut client, "193.99.144.80").await?,
        Landed::expect("us", Some("DE"), "us-east")
    );
    // And ap-southeast's own clients fail over by their order: us-east first.
    assert_eq!(
        from(&mut client, "133.11.0.1").await?,
        Landed::expect("us", Some("JP"), "us-east")
    );

    // ap-southeast comes back: eu-west's clients return to it, and its own too.
    let ap = Origin::builder("ap").addr(ap_addr).start().await?;
    until_origin(&mut client, "193.99.144.80", "ap").await?;
    assert_eq!(
        from(&mut client, "133.11.0.1").await?,
        Landed::expect("ap", Some("JP"), "ap-southeast")
    );
    drop(ap);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_return_when_their_region_recovers() -> anyhow::Result<()> {
    let name = "geo-recover";
    let origins = origins().await?;
    origins[1].set_mode(Mode::Status(503));
    let gw = manifest(
        name,
        &config(
            "us-east",
            "[\"us-east\", \"ap-southeast\", \"eu-west\"]",
            ", trusted_proxies = [\"127.0.0.1\"]",
        ),
        endpoints(&origins),
        "health = { path = \"/health\", interval = \"100ms\", timeout = \"1s\", rise = 1, fall = 1 }\n\
         passive = { max_fails = 0 }",
    )
    .start()
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    // eu-west's origin fails its checks: one global order, us-east first.
    let landed = until_origin(&mut client, "212.58.244.22", "us").await?;
    assert_eq!(landed, Landed::expect("us", Some("GB"), "us-east"));
    // It passes them again: its clients come back.
    origins[1].set_mode(Mode::Echo);
    let landed = until_origin(&mut client, "212.58.244.22", "eu").await?;
    assert_eq!(landed, Landed::expect("eu", Some("GB"), "eu-west"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_region_is_down_clients_stay_home_in_panic_mode() -> anyhow::Result<()> {
    let name = "geo-panic";
    let origins = origins().await?;
    for origin in &origins {
        origin.set_mode(Mode::Status(503));
    }
    let gw = manifest(
        name,
        &config("us-east", PER_REGION, ", trusted_proxies = [\"127.0.0.1\"]"),
        endpoints(&origins),
        "health = { path = \"/health\", interval = \"100ms\", timeout = \"1s\", rise = 1, fall = 1 }",
    )
    .start()
    .await?;
    let mut client: H1 = H1::connect(gw.addr("web")).await?;
    // Every check fails: the plugin sees no healthy endpoint anywhere.
    let start = Instant::now();
    while gw.counter(name, "geo_panic") == 0 {
        anyhow::ensure!(start.elapsed() < WAIT, "no request saw every region down");
        client
            .request(request(&[("x-forwarded-for", "193.99.144.80")]))
            .await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let panics = gw.counter(name, "geo_panic");
    for (ip, origin) in [
        ("193.99.144.80", "eu"),
        ("133.11.0.1", "ap"),
        ("8.8.8.8", "us"),
    ] {
        let reply = client.request(request(&[("x-forwarded-for", ip)])).await?;
        assert_eq!(reply.status, 503, "{}", reply.excerpt());
        assert_eq!(
            reply.header(ORIGIN_HEADER),
            Some(origin),
            "{ip}: answered by its own region's origin"
        );
    }
    assert_eq!(gw.counter(name, "geo_panic"), panics + 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_is_refused_naming_the_key() -> anyhow::Result<()> {
    let origins = origins().await?;
    let cases = [
        (
            config("us-east", PER_REGION, ", trusted_proxies = [\"127.0.0.1\"]")
                .replace("\"DE\"", "\"GER\""),
            "regions.eu-west[1]",
        ),
        (
            config("us-west", PER_REGION, ""),
            "\"default\": region \"us-west\" has no upstream",
        ),
        (
            config("us-east", PER_REGION, ", trusted_proxy = []"),
            "\"trusted_proxy\": unknown key",
        ),
        (
            config(
                "us-east",
                PER_REGION,
                ", trusted_country_headers = [\"cf-ipcountry\"]",
            ),
            "\"trusted_country_headers\"",
        ),
    ];
    for (i, (config, expected)) in cases.iter().enumerate() {
        let error = manifest(&format!("geo-bad-{i}"), config, endpoints(&origins), "")
            .start()
            .await
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(error.contains(expected), "{expected}: {error}");
    }
    Ok(())
}
