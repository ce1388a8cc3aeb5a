//! `builtin:split` through real requests to real origins: a 95/5 canary
//! split over 10,000 requests, sticky users who never change sides, a
//! rollout raised from 10 % to 30 % that moves users only to the new side,
//! a blue-green pair, overrides by header and cookie, and bad configs
//! refused by key.
//!
//! Every origin names itself in `x-origin`, so a reply tells which upstream
//! served it. Each test names its plugins differently: tests run in
//! parallel in one process.

use std::collections::HashMap;
use std::net::SocketAddr;

use http::HeaderValue;
use sluice_tests::client::{H1, get};
use sluice_tests::origin::ORIGIN_HEADER;
use sluice_tests::{Manifest, Origin, TestGateway, WAIT, within};

/// One origin per upstream name, each called like its upstream.
async fn origins(names: &[&str]) -> anyhow::Result<Vec<Origin>> {
    let mut all = Vec::with_capacity(names.len());
    for name in names {
        all.push(Origin::echo(name).await?);
    }
    Ok(all)
}

/// A manifest with listener "web" and one upstream per origin, named after it.
fn manifest(origins: &[Origin]) -> Manifest {
    origins
        .iter()
        .fold(Manifest::new().listener("web", ""), |manifest, origin| {
            manifest.upstream(origin.name(), &[origin.addr()], "")
        })
}

/// `[plugin.NAME]` running `builtin:split` with `config` (an inline TOML
/// table), with a roomy deadline: these tests are about placement, not about
/// a busy machine's scheduling.
fn plugin(name: &str, config: &str) -> String {
    format!("[plugin.{name}]\nsource = \"builtin:split\"\nconfig = {config}\ndeadline = \"1s\"\n")
}

/// A gateway with the origins' upstreams and one catch-all route to `default`
/// through plugin `name`.
async fn gateway(
    name: &str,
    config: &str,
    origins: &[Origin],
    default: &str,
) -> anyhow::Result<TestGateway> {
    manifest(origins)
        .raw(&plugin(name, config))
        .route("all", "{}", default, &format!("policies = [\"{name}\"]"))
        .start()
        .await
}

/// A GET for `path` with these extra headers.
fn request(
    path: &str,
    headers: &[(&'static str, String)],
) -> anyhow::Result<http::Request<http_body_util::Full<bytes::Bytes>>> {
    let mut req = get("app.test", path);
    for (name, value) in headers {
        req.headers_mut()
            .append(*name, HeaderValue::from_str(value)?);
    }
    Ok(req)
}

/// Extra request headers.
type Headers = Vec<(&'static str, String)>;

/// Sends each of `requests` (path and headers) over `connections`
/// keep-alive connections at once, the requests dealt round-robin; returns
/// the origin that served each, in request order.
async fn serve_all(
    addr: SocketAddr,
    connections: usize,
    requests: Vec<(String, Headers)>,
) -> anyhow::Result<Vec<String>> {
    let total = requests.len();
    let mut lanes: Vec<Vec<(usize, String, Headers)>> =
        (0..connections).map(|_| Vec::new()).collect();
    for (i, (path, headers)) in requests.into_iter().enumerate() {
        lanes[i % connections].push((i, path, headers));
    }
    let tasks: Vec<_> = lanes
        .into_iter()
        .map(|lane| {
            tokio::spawn(async move {
                let mut client: H1 = H1::connect(addr).await?;
                let mut served = Vec::with_capacity(lane.len());
                for (i, path, headers) in lane {
                    let reply = client.request(request(&path, &headers)?).await?;
                    anyhow::ensure!(reply.status == 200, "request {i}: {}", reply.excerpt());
                    let origin = reply
                        .header(ORIGIN_HEADER)
                        .ok_or_else(|| anyhow::anyhow!("request {i}: no {ORIGIN_HEADER}"))?;
                    served.push((i, origin.to_string()));
                }
                anyhow::Ok(served)
            })
        })
        .collect();
    let mut origins = vec![String::new(); total];
    for task in tasks {
        for (i, origin) in within("a lane of requests", WAIT * 6, task).await??? {
            origins[i] = origin;
        }
    }
    Ok(origins)
}

fn count<'a>(served: impl IntoIterator<Item = &'a String>) -> HashMap<&'a str, usize> {
    let mut counts = HashMap::new();
    for origin in served {
        *counts.entry(origin.as_str()).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_95_5_split_is_within_one_percent_over_10k_requests() -> anyhow::Result<()> {
    let origins = origins(&["stable", "canary"]).await?;
    let gw = gateway(
        "split-95-5",
        "{ upstreams = { stable = 95, canary = 5 } }",
        &origins,
        "stable",
    )
    .await?;

    let requests = (0..10_000).map(|_| ("/".to_string(), Vec::new())).collect();
    let served = serve_all(gw.addr("web"), 8, requests).await?;
    let counts = count(&served);
    let canary = counts.get("canary").copied().unwrap_or(0);
    let stable = counts.get("stable").copied().unwrap_or(0);
    assert_eq!(canary + stable, 10_000, "{counts:?}");
    // 5 % ± 1 % (4.6 standard deviations of a binomial draw).
    assert!((400..=600).contains(&canary), "{counts:?}");
    assert_eq!(origins[0].requests() + origins[1].requests(), 10_000);
    assert_eq!(gw.counter("split-95-5", "split_overridden"), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_users_never_change_sides() -> anyhow::Result<()> {
    let origins = origins(&["stable", "canary"]).await?;
    for (plugin_name, sticky, users, rounds) in [
        ("split-sticky-header", "header:x-user-id", 200, 10),
        ("split-sticky-cookie", "cookie:user", 100, 5),
        ("split-sticky-ip", "client-ip", 100, 5),
    ] {
        let trusted = if sticky == "client-ip" {
            // The test client is 127.0.0.1: trust it, and name the users in X-Forwarded-For.
            ", trusted_proxies = [\"127.0.0.1\"]"
        } else {
            ""
        };
        let gw = gateway(
            plugin_name,
            &format!(
                "{{ upstreams = {{ stable = 50, canary = 50 }}, sticky = \"{sticky}\"{trusted} }}"
            ),
            &origins,
            "stable",
        )
        .await?;
        let user_header = |user: usize| -> (&'static str, String) {
            match sticky {
                "header:x-user-id" => ("x-user-id", format!("user-{user}")),
                "cookie:user" => ("cookie", format!("theme=dark; user=u{user}; lang=en")),
                _ => (
                    "x-forwarded-for",
                    format!("198.51.{}.{}", user / 250, user % 250 + 1),
                ),
            }
        };
        // Round by round, so a user's requests are spread over connections and time.
        let requests = (0..rounds)
            .flat_map(|_| (0..users).map(|user| ("/".to_string(), vec![user_header(user)])))
            .collect();
        let served = serve_all(gw.addr("web"), 8, requests).await?;

        let mut sides: Vec<Option<&str>> = vec![None; users];
        for (i, origin) in served.iter().enumerate() {
            let user = i % users;
            let side = sides[user].get_or_insert(origin.as_str());
            assert_eq!(
                *side, origin,
                "{plugin_name}: user {user} moved from {side} to {origin} (request {i})"
            );
        }
        let on_canary = sides.iter().filter(|s| **s == Some("canary")).count();
        // Half of the users, give or take (the hash of fixed names: not flaky).
        assert!(
            (users * 3 / 10..=users * 7 / 10).contains(&on_canary),
            "{plugin_name}: {on_canary} of {users} users on the canary"
        );
        assert_eq!(gw.counter(plugin_name, "split_unkeyed"), 0, "{plugin_name}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_a_rollout_moves_users_only_from_old_to_new() -> anyhow::Result<()> {
    let origins = origins(&["old", "new"]).await?;
    let rollout = |percent: u32| {
        format!(
            "{{ upstreams = [{{ upstream = \"old\", weight = {} }}, {{ upstream = \"new\", weight = {percent} }}], sticky = \"header:x-user-id\", salt = \"checkout-v2\" }}",
            100 - percent
        )
    };
    // The same rollout at 10 % and at 30 %, on two routes.
    let gw = manifest(&origins)
        .raw(&plugin("rollout-10", &rollout(10)))
        .raw(&plugin("rollout-30", &rollout(30)))
        .route(
            "ten",
            "{ path_prefix = \"/ten/\" }",
            "old",
            "policies = [\"rollout-10\"]",
        )
        .route(
            "thirty",
            "{ path_prefix = \"/thirty/\" }",
            "old",
            "policies = [\"rollout-30\"]",
        )
        .start()
        .await?;

    let users = 1_000;
    let requests = ["/ten/", "/thirty/"]
        .into_iter()
        .flat_map(|path| {
            (0..users).map(move |user| {
                (
                    path.to_string(),
                    vec![("x-user-id", format!("customer-{user}"))],
                )
            })
        })
        .collect();
    let served = serve_all(gw.addr("web"), 8, requests).await?;
    let (at_10, at_30) = served.split_at(users);

    for user in 0..users {
        assert!(
            at_10[user] == at_30[user] || (at_10[user] == "old" && at_30[user] == "new"),
            "customer-{user}: {} at 10 %, {} at 30 %",
            at_10[user],
            at_30[user]
        );
    }
    let new_at_10 = at_10.iter().filter(|s| *s == "new").count();
    let new_at_30 = at_30.iter().filter(|s| *s == "new").count();
    assert!(
        (60..=140).contains(&new_at_10),
        "{new_at_10} of {users} at 10 %"
    );
    assert!(
        (240..=360).contains(&new_at_30),
        "{new_at_30} of {users} at 30 %"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_sends_everything_to_the_side_with_the_weight() -> anyhow::Result<()> {
    let origins = origins(&["blue", "green"]).await?;
    let gw = manifest(&origins)
        .raw(&plugin(
            "deploy-blue",
            "{ upstreams = { blue = 100, green = 0 } }",
        ))
        .raw(&plugin(
            "deploy-green",
            "{ upstreams = { blue = 0, green = 100 } }",
        ))
        .route(
            "before",
            "{ path_prefix = \"/before/\" }",
            "blue",
            "policies = [\"deploy-blue\"]",
        )
        .route(
            "after",
            "{ path_prefix = \"/after/\" }",
            "blue",
            "policies = [\"deploy-green\"]",
        )
        .start()
        .await?;
    let requests = ["/before/", "/after/"]
        .into_iter()
        .flat_map(|path| (0..200).map(move |_| (path.to_string(), Vec::new())))
        .collect();
    let served = serve_all(gw.addr("web"), 4, requests).await?;
    let (before, after) = served.split_at(200);
    assert!(before.iter().all(|s| s == "blue"), "{:?}", count(before));
    assert!(after.iter().all(|s| s == "green"), "{:?}", count(after));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_win_over_weights_and_stickiness() -> anyhow::Result<()> {
    let origins = origins(&["stable", "canary", "debug"]).await?;
    let name = "split-overrides";
    let gw = gateway(
        name,
        r#"{ upstreams = { stable = 100, canary = 0 }, sticky = "header:x-user-id",
             overrides = [{ header = "x-debug", upstream = "debug" },
                          { header = "x-canary", value = "1", upstream = "canary" },
                          { cookie = "beta", value = "yes", upstream = "canary" }] }"#,
        &origins,
        "stable",
    )
    .await?;
    let user = ("x-user-id", "user-7".to_string());
    let cases: Vec<(Headers, &str)> = vec![
        (vec![user.clone()], "stable"),
        (vec![user.clone(), ("x-canary", "1".into())], "canary"),
        (vec![user.clone(), ("x-canary", "0".into())], "stable"),
        (vec![("cookie", "a=1; beta=yes".into())], "canary"),
        (vec![("cookie", "beta=no".into())], "stable"),
        // Presence is enough for a rule without a value; the first rule wins.
        (vec![("x-debug", String::new())], "debug"),
        (
            vec![("x-canary", "1".into()), ("x-debug", "on".into())],
            "debug",
        ),
    ];
    let expected: Vec<&str> = cases.iter().map(|(_, side)| *side).collect();
    let requests = cases
        .into_iter()
        .map(|(headers, _)| ("/".to_string(), headers))
        .collect();
    let served = serve_all(gw.addr("web"), 1, requests).await?;
    assert_eq!(served, expected);
    assert_eq!(gw.counter(name, "split_overridden"), 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_is_refused_naming_the_key() -> anyhow::Result<()> {
    let origins = origins(&["stable"]).await?;
    for (config, key) in [
        (
            "{ upstreams = { stable = 0 } }",
            "upstreams: the weights are all 0",
        ),
        (
            "{ upstreams = {} }",
            "upstreams: name at least one upstream",
        ),
        ("{ sticky = \"cookie:user\" }", "upstreams: required"),
        ("{ upstreams = { stable = -5 } }", "upstreams.stable"),
        (
            "{ upstreams = { stable = 1 }, sticky = \"session\" }",
            "sticky",
        ),
        (
            "{ upstreams = { stable = 1 }, overrides = [{ header = \"x-canary\" }] }",
            "overrides[0].upstream",
        ),
        (
            "{ upstreams = { stable = 1 }, weights = 5 }",
            "weights: unknown key",
        ),
    ] {
        let error = gateway("split-bad", config, &origins, "stable")
            .await
            .map(drop)
            .expect_err(config);
        let message = format!("{error:#}");
        assert!(message.contains(key), "{config}: {message}");
    }
    Ok(())
}
