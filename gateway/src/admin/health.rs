//! `/health/live`, `/health/ready` and `/health`: whether the gateway
//! answers, whether it can serve every route, and the detail behind both.
//!
//! Live and ready are for load balancers and orchestrators, which probe
//! without credentials: they answer without the token and say nothing a
//! client could not learn by sending a request. `/health` names listeners,
//! routes, upstreams and plugin versions, so it needs the token.
//!
//! Ready means every listener of the running config is bound on every
//! worker, and every route's upstream has at least one healthy endpoint,
//! primary or backup, by the same endpoint state `GET /upstreams` shows
//! (active checks, passive failures, ejections). Only a route's own
//! upstream counts, not ones a policy may steer to. `sluice run` binds the
//! admin API after every worker serves and closes it when the drain
//! begins, so a draining gateway stops answering probes.

use std::time::SystemTime;

use http::StatusCode;
use serde::Serialize;

use super::Control;
use crate::config::{Config, UpstreamConfig};

/// `GET /health/live`.
#[derive(Debug, Serialize)]
pub(crate) struct Live {
    status: &'static str,
}

/// The answer whenever the admin API answers.
pub(crate) fn live() -> Live {
    Live { status: "live" }
}

/// `GET /health/ready`.
#[derive(Debug, Serialize)]
pub(crate) struct Ready {
    /// `ready` or `not ready`.
    status: &'static str,
    /// Routes whose upstream has no healthy endpoint, by name.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    routes_without_healthy_endpoints: Vec<String>,
    /// What keeps the gateway from being ready, in words.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    problems: Vec<String>,
}

/// 200 when ready, 503 naming what is not.
pub(crate) fn ready(control: &Control) -> (StatusCode, Ready) {
    let routes = routes(&control.config());
    let mut ready = Ready {
        status: "ready",
        routes_without_healthy_endpoints: Vec::new(),
        problems: Vec::new(),
    };
    if control.workers() == 0 {
        ready
            .problems
            .push("no worker serves the listeners".to_string());
    }
    for listener in listeners(control).iter().filter(|l| l.bound.is_none()) {
        ready.problems.push(format!(
            "listener \"{}\" ({}) is not bound",
            listener.name, listener.listen
        ));
    }
    for route in routes.iter().filter(|r| r.healthy == 0) {
        ready.problems.push(format!(
            "route \"{}\": upstream \"{}\" has no healthy endpoint (0 of {} up)",
            route.name, route.upstream, route.total
        ));
        ready
            .routes_without_healthy_endpoints
            .push(route.name.clone());
    }
    if ready.problems.is_empty() {
        (StatusCode::OK, ready)
    } else {
        ready.status = "not ready";
        (StatusCode::SERVICE_UNAVAILABLE, ready)
    }
}

/// `GET /health`: the detail behind ready.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    /// `ready` or `not ready`, as `/health/ready` answers now.
    status: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    problems: Vec<String>,
    /// RFC 3339, UTC.
    started_at: String,
    uptime_ms: u64,
    config: ConfigReport,
    workers: usize,
    listeners: Vec<ListenerReport>,
    routes: Vec<RouteHealth>,
    plugins: Vec<PluginVersion>,
}

/// Where the running manifest came from and when.
#[derive(Debug, Serialize)]
struct ConfigReport {
    source: String,
    /// When it was loaded: at the start or the last successful reload.
    loaded_at: String,
    /// Successful reloads since the start.
    reloads: u64,
}

/// One `[[listener]]`.
#[derive(Debug, Serialize)]
struct ListenerReport {
    name: String,
    /// The configured address.
    listen: String,
    /// The address every worker serves it on; `None` while it is not bound.
    bound: Option<String>,
    tls: bool,
}

/// One route and how much of its upstream can take traffic.
#[derive(Debug, Serialize)]
struct RouteHealth {
    name: String,
    upstream: String,
    /// Healthy endpoints, primaries and backups.
    healthy: usize,
    total: usize,
    /// The backups among them, when the upstream has any.
    #[serde(skip_serializing_if = "Option::is_none")]
    backups: Option<Count>,
}

#[derive(Debug, Clone, Serialize)]
struct Count {
    healthy: usize,
    total: usize,
}

/// One loaded plugin's running version.
#[derive(Debug, Serialize)]
struct PluginVersion {
    name: String,
    source: String,
    /// SHA-256 of the running component.
    version: String,
}

/// The detailed report.
pub(crate) fn report(control: &Control) -> Report {
    let config = control.config();
    let serving = control.serving();
    let (_, ready) = ready(control);
    Report {
        status: ready.status,
        problems: ready.problems,
        started_at: rfc3339(serving.started_at),
        uptime_ms: u64::try_from(serving.uptime.as_millis()).unwrap_or(u64::MAX),
        config: ConfigReport {
            source: config.source().display().to_string(),
            loaded_at: rfc3339(serving.loaded_at),
            reloads: serving.reloads,
        },
        workers: control.workers(),
        listeners: listeners(control),
        routes: routes(&config),
        plugins: config
            .plugins
            .values()
            .map(|p| {
                let report = p.report();
                PluginVersion {
                    name: report.name,
                    source: report.source,
                    version: report.version,
                }
            })
            .collect(),
    }
}

/// Every listener of the running config, and where it is bound.
fn listeners(control: &Control) -> Vec<ListenerReport> {
    let bound = control.bound_listeners();
    control
        .config()
        .listener_addrs()
        .into_iter()
        .map(|(name, addr, tls)| ListenerReport {
            bound: bound
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, local)| local.to_string()),
            name,
            listen: addr.to_string(),
            tls,
        })
        .collect()
}

/// Every route, in manifest order, with its upstream's endpoint counts.
fn routes(config: &Config) -> Vec<RouteHealth> {
    // One look at each upstream, however many routes share it.
    let counts: Vec<(usize, usize, Option<Count>)> =
        config.upstreams.iter().map(endpoint_counts).collect();
    let mut routes: Vec<_> = config.routes.routes().iter().collect();
    routes.sort_by_key(|r| r.order);
    routes
        .into_iter()
        .map(|route| {
            let (healthy, total, backups) =
                counts.get(route.upstream).cloned().unwrap_or((0, 0, None));
            RouteHealth {
                name: route.name.to_string(),
                upstream: config
                    .upstreams
                    .get(route.upstream)
                    .map(|u| u.name.clone())
                    .unwrap_or_default(),
                healthy,
                total,
                backups,
            }
        })
        .collect()
}

/// Healthy and total endpoints of `upstream`, and of its backups when it has any.
fn endpoint_counts(upstream: &UpstreamConfig) -> (usize, usize, Option<Count>) {
    let status = upstream.endpoint_set.status(upstream.health.is_some());
    let up = |backup: bool| {
        status
            .iter()
            .filter(|e| e.backup == backup && e.health == "up")
            .count()
    };
    let backups = status.iter().filter(|e| e.backup).count();
    let backup_count = (backups > 0).then(|| Count {
        healthy: up(true),
        total: backups,
    });
    (up(false) + up(true), status.len(), backup_count)
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}
