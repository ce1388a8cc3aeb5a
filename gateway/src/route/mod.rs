//! Route table: which route serves a request.
//!
//! Routes are sorted once, at config load, from most to least specific:
//! exact host over `*.suffix` over any host; then exact path over longer
//! prefix over shorter prefix over any path; then more conditions over fewer
//! (a method list counts one, each header one). Ties keep manifest order. A lookup walks that order and takes the first route whose every
//! matcher holds, so it allocates nothing and takes no lock.

use std::cmp::Ordering;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

use crate::telemetry::metrics::RouteMetrics;

/// How a route matches the request's host (lower-case, port removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostMatch {
    /// Any host.
    Any,
    /// Exactly this host.
    Exact(String),
    /// `*.example.com`: any host ending in `.example.com` (not `example.com` itself).
    /// Holds the suffix with its leading dot.
    Wildcard(String),
}

/// How a route matches the request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PathMatch {
    /// Any path.
    Any,
    /// Exactly this path (query excluded).
    Exact(String),
    /// Paths starting with this string.
    Prefix(String),
}

/// Every condition a route puts on a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RouteMatch {
    pub(crate) host: HostMatch,
    pub(crate) path: PathMatch,
    /// Empty means any method.
    pub(crate) methods: Vec<Method>,
    /// Every header must be present with exactly this value.
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
}

/// A validated route.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub(crate) name: std::sync::Arc<str>,
    pub(crate) matcher: RouteMatch,
    /// Index into the config's upstream list.
    pub(crate) upstream: usize,
    /// Request bodies larger than this get 413; `None` is unlimited.
    pub(crate) max_body_bytes: Option<u64>,
    /// The route's policies, run on each request in order.
    pub(crate) chain: crate::plugin::chain::Chain,
    /// Position in the manifest, the tie-breaker between equally specific routes.
    pub(crate) order: usize,
    /// What its requests did, for `/metrics`; kept across reloads and swaps.
    pub(crate) metrics: Arc<RouteMetrics>,
}

/// The facts about a request that routing looks at.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestFacts<'a> {
    /// Lower-case host without port, empty when the request named none.
    pub(crate) host: &'a str,
    pub(crate) path: &'a str,
    pub(crate) method: &'a Method,
    pub(crate) headers: &'a HeaderMap,
}

impl HostMatch {
    fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Any => true,
            HostMatch::Exact(exact) => exact == host,
            HostMatch::Wildcard(suffix) => {
                host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
        }
    }

    /// Rank and length: exact beats wildcard beats any; longer suffixes are more specific.
    fn specificity(&self) -> (u8, usize) {
        match self {
            HostMatch::Any => (0, 0),
            HostMatch::Wildcard(suffix) => (1, suffix.len()),
            HostMatch::Exact(exact) => (2, exact.len()),
        }
    }

    /// Whether every host this matches is also matched by `self`.
    fn covers(&self, other: &HostMatch) -> bool {
        match (self, other) {
            (HostMatch::Any, _) => true,
            (HostMatch::Exact(a), HostMatch::Exact(b)) => a == b,
            (HostMatch::Wildcard(a), HostMatch::Wildcard(b)) => b.ends_with(a.as_str()),
            (HostMatch::Wildcard(_), HostMatch::Exact(b)) => self.matches(b),
            _ => false,
        }
    }
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Any => true,
            PathMatch::Exact(exact) => exact == path,
            PathMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
        }
    }

    fn specificity(&self) -> (u8, usize) {
        match self {
            PathMatch::Any => (0, 0),
            PathMatch::Prefix(prefix) => (1, prefix.len()),
            PathMatch::Exact(exact) => (2, exact.len()),
        }
    }

    fn covers(&self, other: &PathMatch) -> bool {
        match (self, other) {
            (PathMatch::Any, _) => true,
            (PathMatch::Exact(a), PathMatch::Exact(b)) => a == b,
            (PathMatch::Prefix(a), PathMatch::Exact(b) | PathMatch::Prefix(b)) => {
                b.starts_with(a.as_str())
            }
            _ => false,
        }
    }
}

impl RouteMatch {
    /// Whether the request satisfies every condition.
    pub(crate) fn matches(&self, req: &RequestFacts<'_>) -> bool {
        self.host.matches(req.host)
            && self.path.matches(req.path)
            && (self.methods.is_empty() || self.methods.contains(req.method))
            && self
                .headers
                .iter()
                .all(|(name, value)| req.headers.get_all(name).iter().any(|v| v == value))
    }

    /// Compares specificity: `Greater` means `self` is more specific.
    fn specificity_cmp(&self, other: &RouteMatch) -> Ordering {
        self.host
            .specificity()
            .cmp(&other.host.specificity())
            .then_with(|| self.path.specificity().cmp(&other.path.specificity()))
            .then_with(|| self.condition_count().cmp(&other.condition_count()))
    }

    /// Conditions beyond host and path: a method list counts one, each header one.
    fn condition_count(&self) -> usize {
        usize::from(!self.methods.is_empty()) + self.headers.len()
    }

    /// Whether every request `other` matches is also matched by `self`.
    fn covers(&self, other: &RouteMatch) -> bool {
        self.host.covers(&other.host)
            && self.path.covers(&other.path)
            && (self.methods.is_empty()
                || (!other.methods.is_empty()
                    && other.methods.iter().all(|m| self.methods.contains(m))))
            && self.headers.iter().all(|h| other.headers.contains(h))
    }
}

/// Routes in lookup order.
#[derive(Debug, Clone, Default)]
pub(crate) struct RouteTable {
    routes: Vec<Route>,
    /// Requests no route matched, for `/metrics`.
    unrouted: Arc<RouteMetrics>,
}

impl RouteTable {
    /// Sorts the routes into lookup order.
    pub(crate) fn new(mut routes: Vec<Route>) -> Self {
        routes.sort_by(|a, b| {
            b.matcher
                .specificity_cmp(&a.matcher)
                .then(a.order.cmp(&b.order))
        });
        RouteTable {
            routes,
            unrouted: Arc::default(),
        }
    }

    /// The route that serves this request, if any.
    pub(crate) fn find(&self, req: &RequestFacts<'_>) -> Option<&Route> {
        self.routes.iter().find(|route| route.matcher.matches(req))
    }

    /// The same routes with `plugin` in place of the plugin of that name
    /// in every chain (a live swap).
    pub(crate) fn replacing(&self, plugin: &std::sync::Arc<crate::plugin::Plugin>) -> RouteTable {
        let routes = self
            .routes
            .iter()
            .map(|route| Route {
                chain: route.chain.replacing(plugin),
                ..route.clone()
            })
            .collect();
        RouteTable {
            routes,
            unrouted: self.unrouted.clone(),
        }
    }

    /// Where requests no route matched are counted.
    pub(crate) fn unrouted(&self) -> &Arc<RouteMetrics> {
        &self.unrouted
    }

    /// Each route's metrics by name, in manifest order, then the unrouted
    /// requests' under the empty name.
    pub(crate) fn metrics(&self) -> impl Iterator<Item = (&str, &RouteMetrics)> {
        let mut routes: Vec<&Route> = self.routes.iter().collect();
        routes.sort_by_key(|r| r.order);
        routes
            .into_iter()
            .map(|r| (&*r.name, &*r.metrics))
            .chain([("", &*self.unrouted)])
    }

    /// Takes over the counters of `old`'s routes that this table keeps (by
    /// name), so a reload does not reset them.
    pub(crate) fn adopt_metrics(&mut self, old: &RouteTable) {
        for route in &mut self.routes {
            if let Some(kept) = old.routes.iter().find(|r| r.name == route.name) {
                route.metrics = kept.metrics.clone();
            }
        }
        self.unrouted = old.unrouted.clone();
    }

    /// Whether any route's chain runs plugin `name`.
    pub(crate) fn uses_plugin(&self, name: &str) -> bool {
        self.routes.iter().any(|r| r.chain.contains(name))
    }

    /// Routes in lookup order (`/health` reports each one).
    pub(crate) fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// For each route that can never be chosen, its name and the name of the
    /// route that always wins over it.
    pub(crate) fn shadowed(&self) -> Vec<(&str, &str)> {
        let mut dead = Vec::new();
        for (i, route) in self.routes.iter().enumerate() {
            if let Some(winner) = self.routes[..i]
                .iter()
                .find(|w| w.matcher.covers(&route.matcher))
            {
                dead.push((&*route.name, &*winner.name));
            }
        }
        dead
    }
}

/// The host a request is for: the URI authority (HTTP/2, absolute-form) or
/// the `Host` header, lower-cased, without port. Borrowed when already lower-case.
pub(crate) fn request_host<'a>(
    uri: &'a http::Uri,
    headers: &'a HeaderMap,
) -> std::borrow::Cow<'a, str> {
    let raw = uri
        .host()
        .or_else(|| {
            headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("");
    let without_port = strip_port(raw);
    if without_port.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(without_port.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(without_port)
    }
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port → v6 address in brackets, kept with brackets for matching.
        return match rest.find(']') {
            Some(end) => &host[..end + 2],
            None => host,
        };
    }
    match host.rfind(':') {
        Some(colon) if host[colon + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..colon],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, order: usize, host: HostMatch, path: PathMatch) -> Route {
        Route {
            chain: Default::default(),
            name: name.into(),
            matcher: RouteMatch {
                host,
                path,
                methods: vec![],
                headers: vec![],
            },
            upstream: 0,
            max_body_bytes: None,
            order,
            metrics: Default::default(),
        }
    }

    fn find<'t>(table: &'t RouteTable, host: &str, path: &str) -> Option<&'t str> {
        let headers = HeaderMap::new();
        table
            .find(&RequestFacts {
                host,
                path,
                method: &Method::GET,
                headers: &headers,
            })
            .map(|r| &*r.name)
    }

    #[test]
    fn most_specific_route_wins_regardless_of_order() {
        let table = RouteTable::new(vec![
            route("any", 0, HostMatch::Any, PathMatch::Any),
            route(
                "prefix",
                1,
                HostMatch::Any,
                PathMatch::Prefix("/v1/".into()),
            ),
            route(
                "longer",
                2,
                HostMatch::Any,
                PathMatch::Prefix("/v1/users".into()),
            ),
            route(
                "exact",
                3,
                HostMatch::Any,
                PathMatch::Exact("/v1/users".into()),
            ),
            route(
                "wild",
                4,
                HostMatch::Wildcard(".example.com".into()),
                PathMatch::Any,
            ),
            route(
                "host",
                5,
                HostMatch::Exact("api.example.com".into()),
                PathMatch::Any,
            ),
        ]);
        assert_eq!(find(&table, "other", "/v1/users"), Some("exact"));
        assert_eq!(find(&table, "other", "/v1/users/7"), Some("longer"));
        assert_eq!(find(&table, "other", "/v1/x"), Some("prefix"));
        assert_eq!(find(&table, "other", "/"), Some("any"));
        assert_eq!(find(&table, "www.example.com", "/v1/users"), Some("wild"));
        assert_eq!(find(&table, "example.com", "/"), Some("any"));
        assert_eq!(find(&table, "api.example.com", "/v1/users"), Some("host"));
    }

    #[test]
    fn shadowed_routes_are_reported() {
        let table = RouteTable::new(vec![
            route("first", 0, HostMatch::Any, PathMatch::Prefix("/a".into())),
            route("same", 1, HostMatch::Any, PathMatch::Prefix("/a".into())),
            route("fine", 2, HostMatch::Any, PathMatch::Prefix("/ab".into())),
        ]);
        assert_eq!(table.shadowed(), vec![("same", "first")]);
    }

    #[test]
    fn host_port_and_case_are_ignored() {
        let headers = HeaderMap::new();
        let uri: http::Uri = "http://API.Example.com:8080/x".parse().expect("uri");
        assert_eq!(request_host(&uri, &headers), "api.example.com");
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, HeaderValue::from_static("[::1]:80"));
        assert_eq!(request_host(&"/".parse().expect("uri"), &headers), "[::1]");
    }
}
