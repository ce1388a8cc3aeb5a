//! Active health checks: HAProxy's `check inter … rise … fall …`.
//!
//! One task per endpoint probes it every `interval` (plus or minus
//! `jitter`, and starting at a random point of the first interval, so the
//! checks of many endpoints do not align): a TCP connect, or an HTTP `GET`
//! on a fresh connection whose status must fall in `expect`. `fall`
//! failures in a row take the endpoint out of the candidates, `rise`
//! successes in a row bring it back. An endpoint starts up; until it has
//! passed one check, a single failure takes it down (as HAProxy, which
//! starts servers at the lowest healthy level).
//!
//! The tasks stop when the [`HealthChecks`] handle is dropped: when the
//! config they belong to is replaced. A reload hands the checks of the
//! upstreams it keeps unchanged to the new handle, so they run on.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::AbortHandle;

use super::EndpointSet;

/// How an endpoint is probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Probe {
    /// A TCP connect that succeeds.
    Tcp,
    /// An HTTP/1.1 `GET path` with `Host: host` answered with a status in `expect`.
    Http {
        path: http::uri::PathAndQuery,
        host: Option<HeaderValue>,
        expect: RangeInclusive<u16>,
    },
}

/// `health = { ... }` of one upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HealthCheck {
    pub(crate) probe: Probe,
    /// Time between probes of one endpoint.
    pub(crate) interval: Duration,
    /// How long one probe may take.
    pub(crate) timeout: Duration,
    /// Successes in a row that bring a down endpoint back.
    pub(crate) rise: u32,
    /// Failures in a row that take an up endpoint down.
    pub(crate) fall: u32,
    /// Each wait is `interval` plus or minus up to this much.
    pub(crate) jitter: Duration,
}

/// Running checks; dropping the handle stops them.
#[derive(Debug, Default)]
pub struct HealthChecks {
    running: Vec<SetChecks>,
}

/// The checks of one endpoint set; dropping them stops them.
#[derive(Debug)]
struct SetChecks {
    set: Weak<EndpointSet>,
    tasks: Vec<AbortHandle>,
}

impl HealthChecks {
    /// Starts `check` on every endpoint of `set`, on the current runtime.
    pub(crate) fn start(&mut self, set: &Arc<EndpointSet>, check: &Arc<HealthCheck>) {
        let tasks = (0..set.endpoints.len())
            .map(|id| {
                tokio::spawn(check_endpoint(Arc::downgrade(set), id, check.clone())).abort_handle()
            })
            .collect();
        self.running.push(SetChecks {
            set: Arc::downgrade(set),
            tasks,
        });
    }

    /// Moves the checks running on `set` from `running` to `self`, or
    /// starts `check` on it when none run: a reload keeps the checks of the
    /// endpoint sets it keeps, so their rise/fall counts carry on.
    pub(crate) fn keep_or_start(
        &mut self,
        running: &mut HealthChecks,
        set: &Arc<EndpointSet>,
        check: &Arc<HealthCheck>,
    ) {
        match running.running.iter().position(|c| {
            c.set.strong_count() > 0 && std::ptr::eq(c.set.as_ptr(), Arc::as_ptr(set))
        }) {
            Some(index) => self.running.push(running.running.swap_remove(index)),
            None => self.start(set, check),
        }
    }
}

impl Drop for SetChecks {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Probes endpoint `id` of `set` until the set is gone.
async fn check_endpoint(set: Weak<EndpointSet>, id: usize, check: Arc<HealthCheck>) {
    let first = check.interval.mul_f64(fastrand::f64());
    tokio::time::sleep(first).await;
    let mut passes = 0u32;
    let mut failures = 0u32;
    let mut ever_passed = false;
    loop {
        let Some((addr, authority)) = set.upgrade().and_then(|set| {
            let e = set.endpoints.get(id)?;
            Some((e.addr, e.address.clone()))
        }) else {
            return;
        };
        let verdict = match tokio::time::timeout(
            check.timeout,
            probe(addr, &authority, &check.probe),
        )
        .await
        {
            Ok(verdict) => verdict,
            Err(_) => Err(format!("no answer within {:?}", check.timeout)),
        };
        let Some(set) = set.upgrade() else {
            return;
        };
        let Some(endpoint) = set.endpoints.get(id) else {
            return;
        };
        match verdict {
            Ok(()) => {
                failures = 0;
                passes = passes.saturating_add(1);
                ever_passed = true;
                if passes >= check.rise && set.set_checked(endpoint, true, None) {
                    tracing::warn!(
                        upstream = &*set.name,
                        endpoint = %addr,
                        passes,
                        "health check: endpoint is up"
                    );
                }
            }
            Err(error) => {
                passes = 0;
                failures = failures.saturating_add(1);
                tracing::debug!(upstream = &*set.name, endpoint = %addr, %error, "health check failed");
                if (failures >= check.fall || !ever_passed)
                    && set.set_checked(endpoint, false, Some(error.clone()))
                {
                    tracing::warn!(
                        upstream = &*set.name,
                        endpoint = %addr,
                        failures,
                        %error,
                        "health check: endpoint is down"
                    );
                }
            }
        }
        drop(set);
        tokio::time::sleep(next_wait(check.interval, check.jitter, fastrand::f64())).await;
    }
}

/// `interval` moved by up to `jitter` either way, `random` in `[0, 1)` deciding.
fn next_wait(interval: Duration, jitter: Duration, random: f64) -> Duration {
    let shift = jitter.mul_f64((2.0 * random - 1.0).abs());
    let wait = if random < 0.5 {
        interval.saturating_sub(shift)
    } else {
        interval.saturating_add(shift)
    };
    wait.max(Duration::from_millis(1))
}

/// One probe of `addr`.
async fn probe(addr: SocketAddr, authority: &str, probe: &Probe) -> Result<(), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let Probe::Http { path, host, expect } = probe else {
        return Ok(());
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let connection = tokio::spawn(connection);
    let host = match host {
        Some(host) => host.clone(),
        None => HeaderValue::from_str(authority).map_err(|e| format!("host: {e}"))?,
    };
    let request = Request::get(path.as_str())
        .header(header::HOST, host)
        .header(header::USER_AGENT, "sluice-health-check")
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let sent = sender.send_request(request).await;
    connection.abort();
    let response = sent.map_err(|e| format!("request: {e}"))?;
    let status = response.status().as_u16();
    if expect.contains(&status) {
        Ok(())
    } else {
        Err(format!(
            "status {status}, expected {}-{}",
            expect.start(),
            expect.end()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_stay_within_the_jitter() {
        let interval = Duration::from_millis(1000);
        let jitter = Duration::from_millis(100);
        assert_eq!(next_wait(interval, jitter, 0.5), interval);
        assert_eq!(next_wait(interval, jitter, 0.0), Duration::from_millis(900));
        let late = next_wait(interval, jitter, 0.999);
        assert!(late > Duration::from_millis(1099) && late <= Duration::from_millis(1100));
        assert_eq!(
            next_wait(Duration::from_millis(5), jitter, 0.0),
            Duration::from_millis(1),
            "never zero"
        );
    }
}
