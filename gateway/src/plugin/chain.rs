//! A route's policies, run in the request path.
//!
//! The phases, in the order a request meets them:
//!
//! 1. [`Chain::on_request`] — each policy in manifest order may continue,
//!    rewrite the request's headers, steer it to another upstream, or answer
//!    it (which ends the chain; the upstream is never contacted).
//! 2. The upstream's balancer, if it is a plugin, picks the endpoint
//!    ([`super::Plugin::pick`], called by the proxy).
//! 3. [`Chain::on_response`] — when the response head arrives, the balancer
//!    plugin and then each policy in reverse order may rewrite the
//!    response's headers.
//! 4. [`Chain::on_outcome`] — after the exchange, the balancer and every
//!    policy that learns see the outcome.
//!
//! A failed call (trap, deadline, invalid answer) follows that plugin's
//! `on_error`: `open` skips it, `closed` answers 503. Either way the failure
//! is logged and counted.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::host::RequestState;
use super::{Action, HookError, OnError, Outcome, Plugin, Reply};
use crate::upstream::{Directory, EndpointSet};

/// The policies of one route, in manifest order.
#[derive(Debug, Clone, Default)]
pub(crate) struct Chain {
    policies: Arc<[Arc<Plugin>]>,
    response_hooks: bool,
    outcome_hooks: bool,
}

/// What the request phase decided.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Forward upstream (to the request's `upstream`, which a policy may have changed).
    Forward,
    /// A policy answered.
    Answer(LocalReply),
    /// A `closed` policy failed: answer 503.
    Failed(Arc<str>),
}

/// A response a policy made.
#[derive(Debug)]
pub(crate) struct LocalReply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    /// The policy that answered.
    pub(crate) by: Arc<str>,
}

impl Chain {
    /// A chain of `policies`, in order.
    pub(crate) fn new(policies: Vec<Arc<Plugin>>) -> Chain {
        Chain {
            response_hooks: policies.iter().any(|p| p.has_response_hook()),
            outcome_hooks: policies.iter().any(|p| p.has_outcome_hook()),
            policies: policies.into(),
        }
    }

    /// The chain with `plugin` in place of the plugin of the same name.
    pub(crate) fn replacing(&self, plugin: &Arc<Plugin>) -> Chain {
        if !self.policies.iter().any(|p| p.name == plugin.name) {
            return self.clone();
        }
        Chain::new(
            self.policies
                .iter()
                .map(|p| {
                    if p.name == plugin.name {
                        plugin.clone()
                    } else {
                        p.clone()
                    }
                })
                .collect(),
        )
    }

    /// Whether the chain runs plugin `name`.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.policies.iter().any(|p| &*p.name == name)
    }

    /// Whether the route has no policies.
    pub(crate) fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Whether any policy rewrites responses (so the request head must be kept for it).
    pub(crate) fn has_response_hooks(&self) -> bool {
        self.response_hooks
    }

    /// Whether any policy learns from outcomes.
    pub(crate) fn has_outcome_hooks(&self) -> bool {
        self.outcome_hooks
    }

    /// Runs each policy's `on-request`. `upstream_named` resolves a steering
    /// target to the upstream's own name, or `None` when there is no such upstream.
    pub(crate) async fn on_request(
        &self,
        mut req: RequestState,
        upstream_named: impl Fn(&str) -> Option<Arc<EndpointSet>>,
    ) -> (RequestState, Verdict) {
        for plugin in self.policies.iter().filter(|p| p.has_request_hook()) {
            let (back, result) = plugin.on_request(req).await;
            req = back;
            let failure = match result {
                Ok(Action::Continue) => continue,
                Ok(Action::Steer(name)) => match upstream_named(&name) {
                    Some(upstream) => {
                        req.upstream = upstream;
                        continue;
                    }
                    None => plugin.refused(format!("steered to unknown upstream \"{name}\"")),
                },
                Ok(Action::Respond(reply)) => match local_reply(reply, &plugin.name) {
                    Ok(reply) => return (req, Verdict::Answer(reply)),
                    Err(message) => plugin.refused(message),
                },
                Err(error) => error,
            };
            if let Some(verdict) = apply_on_error(plugin, "on-request", &failure) {
                return (req, verdict);
            }
        }
        (req, Verdict::Forward)
    }

    /// Runs the balancer's `on-response` (when it has one), then each
    /// policy's, last policy first. `Err` names a `closed` policy that
    /// failed: the client gets 503 instead.
    pub(crate) async fn on_response(
        &self,
        balancer: Option<&Arc<Plugin>>,
        mut req: RequestState,
        mut resp: http::response::Parts,
    ) -> (http::response::Parts, Result<(), Arc<str>>) {
        let hooks = balancer
            .into_iter()
            .chain(self.policies.iter().rev())
            .filter(|p| p.has_response_hook());
        for plugin in hooks {
            let (back_req, back_resp, result) = plugin.on_response(req, resp).await;
            req = back_req;
            resp = back_resp;
            if let Err(failure) = result
                && let Some(Verdict::Failed(name)) = apply_on_error(plugin, "on-response", &failure)
            {
                return (resp, Err(name));
            }
        }
        (resp, Ok(()))
    }

    /// Tells the balancer (when it learns) and each learning policy how the
    /// exchange with `upstream` went. Failures are logged and counted; the
    /// response has already been decided.
    pub(crate) async fn on_outcome(
        &self,
        balancer: Option<&Arc<Plugin>>,
        upstream: &Arc<EndpointSet>,
        directory: &Directory,
        outcome: &Outcome,
    ) {
        let hooks = balancer
            .into_iter()
            .chain(self.policies.iter())
            .filter(|p| p.has_outcome_hook());
        for plugin in hooks {
            if let Err(failure) = plugin.on_outcome(upstream, directory, outcome).await {
                tracing::warn!(
                    plugin = &*plugin.name,
                    hook = "on-outcome",
                    error = %failure,
                    "policy call failed"
                );
            }
        }
    }
}

/// Logs a failed call and returns what the request becomes: `None` to go on
/// (`open`), a 503 verdict to stop (`closed`).
pub(crate) fn apply_on_error(plugin: &Plugin, hook: &str, failure: &HookError) -> Option<Verdict> {
    let closed = plugin.on_error() == OnError::Closed;
    if matches!(failure, HookError::State(_)) {
        // An outage of the state backend fails every such call; the backend
        // logs the outage itself, and /metrics counts the calls.
        tracing::debug!(
            plugin = &*plugin.name,
            hook,
            error = %failure,
            on_error = if closed { "closed" } else { "open" },
            "policy call failed"
        );
        return closed.then(|| Verdict::Failed(plugin.name.clone()));
    }
    tracing::warn!(
        plugin = &*plugin.name,
        hook,
        error = %failure,
        on_error = if closed { "closed" } else { "open" },
        "policy call failed"
    );
    closed.then(|| Verdict::Failed(plugin.name.clone()))
}

/// Checks a guest's reply and turns it into a response head and body.
fn local_reply(reply: Reply, by: &Arc<str>) -> Result<LocalReply, String> {
    let status = StatusCode::from_u16(reply.status)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| format!("answered with invalid status {}", reply.status))?;
    let mut headers = HeaderMap::with_capacity(reply.headers.len());
    for (name, value) in reply.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("answered with invalid header name {name:?}"))?;
        if name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
            // The gateway frames the body it sends.
            continue;
        }
        let value = HeaderValue::from_str(&value)
            .map_err(|_| format!("answered with an invalid value for header {name}"))?;
        headers.append(name, value);
    }
    Ok(LocalReply {
        status,
        headers,
        body: Bytes::from(reply.body),
        by: by.clone(),
    })
}
