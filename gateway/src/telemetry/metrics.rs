//! Prometheus metrics: what the request path counts, and the `GET /metrics`
//! exposition that reads it together with the live upstream and plugin state.
//!
//! The request path touches only atomics it already holds a handle to (a
//! route's [`RouteMetrics`], a listener's [`ConnectionCounts`]): no map
//! lookups, no locks, no allocation. Everything else — endpoint health and
//! load, plugin call statistics, reloads and swaps — is read when scraped.
//! Counters survive reloads and live swaps: a new config adopts the handles
//! of the routes and listeners it keeps ([`crate::Config`] does that on reload).

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::config::Config;
use crate::plugin::CallTotals;
use crate::upstream::EndpointStatus;

/// Upper bounds of the request duration buckets, in seconds.
const DURATION_BOUNDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The status classes counted: 1xx to 5xx.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// What one route's requests did: answers by status class and how long the
/// response head took. Shared by every worker.
#[derive(Debug, Default)]
pub(crate) struct RouteMetrics {
    responses: [AtomicU64; CLASSES.len()],
    duration: Histogram,
}

impl RouteMetrics {
    /// Counts one answer with `status`, whose head was ready after `elapsed`.
    pub(crate) fn record(&self, status: http::StatusCode, elapsed: Duration) {
        let class = usize::from(status.as_u16() / 100).clamp(1, CLASSES.len()) - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
        self.duration.observe(elapsed);
    }
}

/// A fixed-bucket latency histogram on atomics ([`DURATION_BOUNDS`]).
#[derive(Debug, Default)]
struct Histogram {
    /// Per bucket (not cumulative); the last counts what exceeds every bound.
    buckets: [AtomicU64; DURATION_BOUNDS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = DURATION_BOUNDS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(DURATION_BOUNDS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Sum in seconds, count, and `(upper bound, count)` per bucket (the
    /// last bound is +Inf; the encoder makes them cumulative).
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let bounds = DURATION_BOUNDS.iter().copied().chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds.zip(self.buckets.iter().map(load)).collect();
        let count = buckets.iter().map(|&(_, n)| n).sum();
        (load(&self.sum_ns) as f64 / 1e9, count, buckets)
    }
}

fn load(value: &AtomicU64) -> u64 {
    value.load(Ordering::Relaxed)
}

/// One listener's connections, over every worker.
#[derive(Debug, Default)]
pub(crate) struct ConnectionCounts {
    accepted: AtomicU64,
    closed: AtomicU64,
}

impl ConnectionCounts {
    /// Counts a connection as open until the returned guard drops.
    pub(crate) fn open(self: &Arc<Self>) -> OpenConnection {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        OpenConnection(self.clone())
    }
}

/// A connection counted as open.
#[derive(Debug)]
pub(crate) struct OpenConnection(Arc<ConnectionCounts>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Changes made to the running gateway, by outcome.
#[derive(Debug, Default)]
pub(crate) struct ChangeCounts {
    reloads: [AtomicU64; 2],
    swaps: [AtomicU64; 2],
}

impl ChangeCounts {
    /// Counts a manifest reload, applied or refused.
    pub(crate) fn reload(&self, applied: bool) {
        self.reloads[usize::from(!applied)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a plugin swap or rollback, applied or refused.
    pub(crate) fn swap(&self, applied: bool) {
        self.swaps[usize::from(!applied)].fetch_add(1, Ordering::Relaxed);
    }
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The whole exposition for `config`, served by workers with
/// `worker_connections` client connections each, in the OpenMetrics text
/// format (which Prometheus scrapes natively).
pub(crate) fn render(config: Arc<Config>, worker_connections: Vec<usize>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot {
        config,
        worker_connections,
    }));
    let mut text = String::with_capacity(16 << 10);
    // Writing to a String cannot fail; a collector error would be a bug here.
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        tracing::error!(%error, "metrics exposition failed");
        let _ = writeln!(text, "# exposition failed: {error}");
    }
    text
}

/// What a scrape reads: the running config (routes, listeners, upstreams,
/// plugins, change counters) and each worker's connection count.
#[derive(Debug)]
struct Snapshot {
    config: Arc<Config>,
    worker_connections: Vec<usize>,
}

/// Writes one metric family: its descriptor, then each member's labels and
/// sample.
fn family<T>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    members: impl IntoIterator<Item = (Labels, T)>,
    mut sample: impl FnMut(&mut MetricEncoder<'_>, T) -> Result<(), std::fmt::Error>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in members {
        let mut member = metric.encode_family(&labels)?;
        sample(&mut member, value)?;
    }
    Ok(())
}

fn counter(encoder: &mut MetricEncoder<'_>, value: u64) -> Result<(), std::fmt::Error> {
    encoder.encode_counter::<NoLabelSet, _, u64>(&value, None)
}

fn gauge(encoder: &mut MetricEncoder<'_>, value: i64) -> Result<(), std::fmt::Error> {
    encoder.encode_gauge(&value)
}

fn histogram(
    encoder: &mut MetricEncoder<'_>,
    (sum, count, buckets): (f64, u64, Vec<(f64, u64)>),
) -> Result<(), std::fmt::Error> {
    encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
}

type Labels = Vec<(&'static str, String)>;

/// A metric's name, help text, and how to read its value.
type Described<F> = (&'static str, &'static str, F);
type EndpointGauge = fn(&EndpointStatus) -> i64;
type PluginCounter = fn(&CallTotals) -> u64;

fn label(key: &'static str, value: &str) -> Labels {
    vec![(key, value.to_string())]
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let config = &*self.config;
        let e = &mut encoder;

        // Requests, by route (`route=""`: no route matched) and status class.
        let routes: Vec<(&str, &RouteMetrics)> = config.routes.metrics().collect();
        family(
            e,
            "sluice_requests",
            "Requests answered, by route and status class (gateway-made answers included).",
            MetricType::Counter,
            routes.iter().flat_map(|&(route, metrics)| {
                CLASSES
                    .iter()
                    .zip(&metrics.responses)
                    .map(move |(class, n)| {
                        let labels = vec![
                            ("route", route.to_string()),
                            ("class", (*class).to_string()),
                        ];
                        (labels, load(n))
                    })
            }),
            counter,
        )?;
        family(
            e,
            "sluice_request_duration_seconds",
            "Time from a request's head arriving to its response head leaving, by route.",
            MetricType::Histogram,
            routes
                .iter()
                .map(|&(route, metrics)| (label("route", route), metrics.duration.snapshot())),
            histogram,
        )?;

        // Connections, by listener.
        let listeners = || {
            config
                .listeners
                .iter()
                .map(|l| (label("listener", &l.name), &*l.connections))
        };
        family(
            e,
            "sluice_connections_accepted",
            "Client connections accepted, by listener.",
            MetricType::Counter,
            listeners().map(|(l, c)| (l, load(&c.accepted))),
            counter,
        )?;
        family(
            e,
            "sluice_connections_active",
            "Client connections open now, by listener.",
            MetricType::Gauge,
            listeners().map(|(l, c)| {
                let open = load(&c.accepted).saturating_sub(load(&c.closed));
                (l, i64::try_from(open).unwrap_or(i64::MAX))
            }),
            gauge,
        )?;

        family(
            e,
            "sluice_worker_connections",
            "Client connections each worker thread serves now (accepted connections are spread evenly).",
            MetricType::Gauge,
            self.worker_connections
                .iter()
                .enumerate()
                .map(|(worker, &open)| {
                    let open = i64::try_from(open).unwrap_or(i64::MAX);
                    (label("worker", &worker.to_string()), open)
                }),
            gauge,
        )?;

        // Upstream endpoints: health and load, read live.
        let endpoints: Vec<(Labels, EndpointStatus)> = config
            .upstreams
            .iter()
            .flat_map(|u| {
                let statuses = u.endpoint_set.status(u.health.is_some());
                statuses.into_iter().map(move |s| {
                    let labels = vec![
                        ("upstream", u.name.clone()),
                        ("endpoint", s.address.clone()),
                    ];
                    (labels, s)
                })
            })
            .collect();
        let endpoint_gauges: [Described<EndpointGauge>; 3] = [
            (
                "sluice_upstream_endpoint_healthy",
                "1 while the endpoint takes traffic, 0 while health checks, passive health or an ejection hold it out.",
                |s| i64::from(s.health == "up"),
            ),
            (
                "sluice_upstream_endpoint_in_flight",
                "Requests in flight to the endpoint.",
                |s| i64::from(s.in_flight),
            ),
            (
                "sluice_upstream_endpoint_latency_ewma_microseconds",
                "Decaying average of the endpoint's response-head latency.",
                |s| i64::from(s.latency_ewma_us),
            ),
        ];
        for (name, help, value) in endpoint_gauges {
            let members = endpoints.iter().map(|(l, s)| (l.clone(), value(s)));
            family(e, name, help, MetricType::Gauge, members, gauge)?;
        }
        family(
            e,
            "sluice_upstream_endpoint_ejections",
            "Times a plugin or outlier detection ejected the endpoint.",
            MetricType::Counter,
            endpoints
                .iter()
                .map(|(l, s)| (l.clone(), s.ejections + s.outlier_ejections)),
            counter,
        )?;

        family(
            e,
            "sluice_upstream_queued",
            "Requests waiting in the upstream's queue for a connection, every endpoint being at max_connections.",
            MetricType::Gauge,
            config.upstreams.iter().map(|u| {
                (
                    label("upstream", &u.name),
                    i64::try_from(u.endpoint_set.queued()).unwrap_or(i64::MAX),
                )
            }),
            gauge,
        )?;

        // Plugins: the host's call statistics, kept per plugin name.
        let plugins: Vec<(Labels, CallTotals)> = config
            .plugins
            .values()
            .map(|p| (label("plugin", &p.name), p.call_totals()))
            .collect();
        let plugin_counters: [Described<PluginCounter>; 5] = [
            (
                "sluice_plugin_calls",
                "Hook calls made to the plugin.",
                |t| t.calls,
            ),
            (
                "sluice_plugin_errors",
                "Hook calls that failed: invalid results, traps, deadlines and host-call limits.",
                |t| t.errors,
            ),
            (
                "sluice_plugin_traps",
                "Hook calls that trapped (panic, unreachable, out of memory).",
                |t| t.traps,
            ),
            (
                "sluice_plugin_timeouts",
                "Hook calls stopped at their deadline.",
                |t| t.timeouts,
            ),
            (
                "sluice_plugin_host_call_limits",
                "Hook calls stopped for making more host calls than max_host_calls.",
                |t| t.host_call_limits,
            ),
        ];
        for (name, help, value) in plugin_counters {
            let members = plugins.iter().map(|(l, t)| (l.clone(), value(t)));
            family(e, name, help, MetricType::Counter, members, counter)?;
        }
        family(
            e,
            "sluice_plugin_call_duration_seconds",
            "Hook call latency, by plugin (bucket bounds are powers of two microseconds).",
            MetricType::Histogram,
            plugins
                .iter()
                .map(|(l, t)| (l.clone(), (t.latency_sum_s, t.calls, t.latency.clone()))),
            histogram,
        )?;

        // What the plugins count themselves (the `metrics` import).
        let reports: Vec<crate::plugin::PluginReport> =
            config.plugins.values().map(|p| p.report()).collect();
        let guest = |r: &crate::plugin::PluginReport, name: &str| -> Labels {
            vec![("plugin", r.name.clone()), ("name", name.to_string())]
        };
        family(
            e,
            "sluice_policy_counter",
            "Counters a plugin reports through its `metrics` import, by plugin and name.",
            MetricType::Counter,
            reports
                .iter()
                .flat_map(|r| r.counters.iter().map(move |(n, v)| (guest(r, n), *v))),
            counter,
        )?;
        family(
            e,
            "sluice_policy_gauge",
            "Gauges a plugin reports through its `metrics` import, by plugin and name.",
            MetricType::Gauge,
            reports
                .iter()
                .flat_map(|r| r.gauges.iter().map(move |(n, v)| (guest(r, n), *v))),
            gauge,
        )?;

        // The shared state backend, when `[state] backend = "redis"`.
        if let Some(store) = &config.state {
            let counts = store.counts();
            let backend = || label("backend", "redis");
            family(
                e,
                "sluice_state_backend_up",
                "1 while the gateway is connected to its shared state backend, 0 while it reconnects.",
                MetricType::Gauge,
                [(backend(), i64::from(counts.up))],
                gauge,
            )?;
            family(
                e,
                "sluice_state_operations",
                "Shared state operations, by result (ok, error: refused or disconnected, timeout).",
                MetricType::Counter,
                [
                    ("ok", counts.ok),
                    ("error", counts.errors),
                    ("timeout", counts.timeouts),
                ]
                .map(|(result, n)| {
                    (
                        vec![
                            ("backend", "redis".to_string()),
                            ("result", result.to_string()),
                        ],
                        n,
                    )
                }),
                counter,
            )?;
            family(
                e,
                "sluice_state_fallbacks",
                "Plugin state calls answered from in-process state because the shared backend failed (on_error = \"open\").",
                MetricType::Counter,
                [(backend(), counts.fallbacks)],
                counter,
            )?;
        }

        // Changes to the running gateway.
        let changes: [(&str, &str, &[AtomicU64; 2]); 2] = [
            (
                "sluice_reloads",
                "Manifest reloads (SIGHUP, POST /reload), by result.",
                &config.changes.reloads,
            ),
            (
                "sluice_plugin_swaps",
                "Live plugin changes through the admin API (uploads, config changes, rollbacks), by result.",
                &config.changes.swaps,
            ),
        ];
        for (name, help, counts) in changes {
            let members = [("applied", &counts[0]), ("refused", &counts[1])]
                .map(|(result, n)| (label("result", result), load(n)));
            family(e, name, help, MetricType::Counter, members, counter)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_count_by_class_and_bucket() {
        let route = RouteMetrics::default();
        route.record(http::StatusCode::OK, Duration::from_micros(300));
        route.record(http::StatusCode::NOT_FOUND, Duration::from_millis(3));
        route.record(http::StatusCode::BAD_GATEWAY, Duration::from_secs(30));
        let counts: Vec<u64> = route.responses.iter().map(load).collect();
        assert_eq!(counts, [0, 1, 0, 1, 1]);
        let (sum, count, buckets) = route.duration.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 30.0033).abs() < 1e-6, "sum {sum}");
        assert_eq!(buckets[0], (0.0005, 1), "300 µs is under the first bound");
        assert_eq!(buckets[3], (0.005, 1), "3 ms is between 2.5 and 5 ms");
        assert_eq!(
            buckets.last(),
            Some(&(f64::INFINITY, 1)),
            "30 s is over 10 s"
        );
    }

    #[test]
    fn open_connections_are_counted_until_dropped() {
        let counts = Arc::new(ConnectionCounts::default());
        let a = counts.open();
        let b = counts.open();
        drop(a);
        assert_eq!((load(&counts.accepted), load(&counts.closed)), (2, 1));
        drop(b);
        assert_eq!(load(&counts.closed), 2);
    }
}
