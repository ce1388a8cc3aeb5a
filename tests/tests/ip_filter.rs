//! `builtin:ip-filter` through real requests: IPv4 clients (127.0.0.1) and
//! IPv6 clients (::1, on a listener bound to `[::1]:0`) against allow and
//! deny ranges, deny winning over allow, addresses from `X-Forwarded-For`
//! behind a trusted proxy (and ignored otherwise), the refusal's status and
//! body, and bad ranges refused naming the entry.
//!
//! Each test names its plugins differently: tests run in parallel in one
//! process.

use std::net::SocketAddr;

use http::HeaderValue;
use sluice_tests::client::{H1, get};
use sluice_tests::origin::ORIGIN_HEADER;
use sluice_tests::{Manifest, Origin, Reply, TestGateway};

/// A gateway with listeners "v4" (`127.0.0.1:0`) and "v6" (`[::1]:0`),
/// upstream "app" (`origin`), and for each `(name, config)` a
/// `builtin:ip-filter` plugin and a route `/NAME/` through it.
async fn gateway(origin: &Origin, plugins: &[(&str, &str)]) -> anyhow::Result<TestGateway> {
    let mut manifest = Manifest::new()
        .listener("v4", "")
        .raw("[[listener]]\nname = \"v6\"\nlisten = \"[::1]:0\"\n")
        .upstream("app", &[origin.addr()], "");
    for (name, config) in plugins {
        manifest = manifest
            .raw(&format!(
                "[plugin.{name}]\nsource = \"builtin:ip-filter\"\nconfig = {config}\ndeadline = \"1s\"\n"
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

/// `GET /PLUGIN/` on a new connection to `addr`, with an `X-Forwarded-For`
/// when `forwarded` is given.
async fn fetch(addr: SocketAddr, plugin: &str, forwarded: Option<&str>) -> anyhow::Result<Reply> {
    let mut req = get("app.test", &format!("/{plugin}/"));
    if let Some(forwarded) = forwarded {
        req.headers_mut()
            .insert("x-forwarded-for", HeaderValue::from_str(forwarded)?);
    }
    let mut client: H1 = H1::connect(addr).await?;
    client.request(req).await
}

/// Whether the reply came from the origin (the request passed).
fn passed(reply: &Reply) -> bool {
    reply.status == 200 && reply.header(ORIGIN_HEADER) == Some("app")
}

/// Checks that `reply` is the filter's default refusal.
fn assert_refused(reply: &Reply, what: &str) {
    assert_eq!(reply.status, 403, "{what}: {}", reply.excerpt());
    assert_eq!(
        reply.header(ORIGIN_HEADER),
        None,
        "{what}: answered by the gateway"
    );
    assert_eq!(reply.text(), "forbidden\n", "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_and_ipv6_clients_are_judged_by_allow_and_deny() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let gw = gateway(
        &origin,
        &[
            // Allow lists: loopback v4 only, loopback v6 only, both.
            ("ipf-allow-v4", r#"{ allow = ["127.0.0.0/8"] }"#),
            (
                "ipf-allow-v6",
                r#"{ allow = ["::1/128", "2001:db8::/32"] }"#,
            ),
            ("ipf-allow-both", r#"{ allow = ["127.0.0.1", "::/64"] }"#),
            (
                "ipf-allow-other",
                r#"{ allow = ["10.0.0.0/8", "2001:db8::/32"] }"#,
            ),
            // Block lists.
            ("ipf-deny-v4", r#"{ deny = ["127.0.0.0/24"] }"#),
            ("ipf-deny-v6", r#"{ deny = ["::/0"] }"#),
            // Deny wins over allow, whatever the order.
            (
                "ipf-deny-wins",
                r#"{ deny = ["127.0.0.1/32", "::1"], allow = ["127.0.0.0/8", "::/8"] }"#,
            ),
        ],
    )
    .await?;
    let v4 = gw.addr("v4");
    let v6 = gw.addr("v6");
    assert!(v6.is_ipv6(), "{v6}");

    for (plugin, v4_passes, v6_passes) in [
        ("ipf-allow-v4", true, false),
        ("ipf-allow-v6", false, true),
        ("ipf-allow-both", true, true),
        ("ipf-allow-other", false, false),
        ("ipf-deny-v4", false, true),
        ("ipf-deny-v6", true, false),
        ("ipf-deny-wins", false, false),
    ] {
        for (addr, passes, family) in [(v4, v4_passes, "127.0.0.1"), (v6, v6_passes, "::1")] {
            let reply = fetch(addr, plugin, None).await?;
            let what = format!("{plugin} from {family}");
            if passes {
                assert!(passed(&reply), "{what}: {}", reply.excerpt());
            } else {
                assert_refused(&reply, &what);
            }
        }
    }
    // Refused requests never reached the origin: 1 + 1 + 2 + 1 + 1 passed.
    assert_eq!(origin.requests(), 6);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_the_forwarded_address_is_judged() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let gw = gateway(
        &origin,
        &[
            (
                "ipf-xff",
                r#"{ trusted_proxies = ["127.0.0.1", "::1"], deny = ["203.0.113.0/24", "2001:db8:bad::/48"] }"#,
            ),
            (
                "ipf-xff-allow",
                r#"{ trusted_proxies = ["127.0.0.0/8", "10.0.0.0/8"], allow = ["198.51.100.0/24", "2001:db8::/32"] }"#,
            ),
            // Without trusted proxies, X-Forwarded-For is only a header.
            ("ipf-untrusted", r#"{ deny = ["203.0.113.0/24"] }"#),
        ],
    )
    .await?;
    let v4 = gw.addr("v4");
    let v6 = gw.addr("v6");
    for (addr, plugin, forwarded, passes) in [
        (v4, "ipf-xff", "203.0.113.9", false),
        (v6, "ipf-xff", "203.0.113.9", false),
        (v4, "ipf-xff", "198.51.100.7", true),
        (v4, "ipf-xff", "[2001:db8:bad::5]:4711", false),
        (v4, "ipf-xff", "2001:db8:beef::5", true),
        // The right-most untrusted entry counts: the one the proxy saw.
        (v4, "ipf-xff", "203.0.113.9, 198.51.100.7", true),
        (v4, "ipf-xff", "198.51.100.7, 203.0.113.9", false),
        // Trusted hops are skipped.
        (v4, "ipf-xff-allow", "198.51.100.7, 10.1.1.1", true),
        (v4, "ipf-xff-allow", "192.0.2.1, 10.1.1.1", false),
        (v4, "ipf-xff-allow", "2001:db8::77", true),
        (v6, "ipf-xff-allow", "198.51.100.7", false),
        (v4, "ipf-untrusted", "203.0.113.9", true),
    ] {
        let reply = fetch(addr, plugin, Some(forwarded)).await?;
        let what = format!("{plugin} via {addr} for {forwarded:?}");
        if passes {
            assert!(passed(&reply), "{what}: {}", reply.excerpt());
        } else {
            assert_refused(&reply, &what);
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refusal_status_and_body_are_configurable() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let name = "ipf-status";
    let gw = gateway(
        &origin,
        &[(
            name,
            r#"{ deny = ["0.0.0.0/0", "::/0"], status = 404, body = "not here\n" }"#,
        )],
    )
    .await?;
    for addr in [gw.addr("v4"), gw.addr("v6")] {
        let reply = fetch(addr, name, None).await?;
        assert_eq!(reply.status, 404, "{}", reply.excerpt());
        assert_eq!(reply.text(), "not here\n");
        assert_eq!(
            reply.header("content-type"),
            Some("text/plain; charset=utf-8")
        );
    }
    assert_eq!(origin.requests(), 0);
    assert_eq!(
        gw.plugin(name).counters.get("ip_filter_refused").copied(),
        Some(2)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ranges_are_refused_naming_the_entry() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    for (config, expected) in [
        (
            r#"{ deny = ["192.0.2.0/24", "10.0.0.0/33"] }"#,
            r#"deny[1]: "10.0.0.0/33""#,
        ),
        (
            r#"{ allow = ["2001:db8::/129"] }"#,
            r#"allow[0]: "2001:db8::/129""#,
        ),
        (
            r#"{ allow = ["10.0.0.0/8"], trusted_proxies = ["lb.internal"] }"#,
            r#"trusted_proxies[0]: "lb.internal""#,
        ),
        (r#"{ allow = [] }"#, "allow, deny: give at least one"),
        (r#"{ deny = ["10.0.0.1"], status = 100 }"#, "status"),
    ] {
        let error = gateway(&origin, &[("ipf-bad", config)])
            .await
            .map(drop)
            .expect_err(config);
        let message = format!("{error:#}");
        assert!(message.contains(expected), "{config}: {message}");
    }
    Ok(())
}
