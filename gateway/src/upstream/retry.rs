//! Retries: which failures are retried, how long to back off, and the
//! budget that keeps retries from multiplying an outage.
//!
//! `retries = { attempts, per_try_timeout, on, backoff, budget }` on an
//! upstream. The proxy asks [`RetryPolicy::should_retry`] after each failed
//! try; a retry goes to an endpoint not tried yet for the request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};

use crate::plugin::ErrorKind;

/// One retry condition (`on = [...]`), with Envoy's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RetryOn {
    /// The TCP connection failed or timed out: the request never left.
    ConnectFailure,
    /// An HTTP/2 upstream refused the stream (REFUSED_STREAM), so it never
    /// processed it. Upstreams speak HTTP/1.1 today: this never fires yet.
    RefusedStream,
    /// The connection broke before the response head, or the try timed out.
    Reset,
    /// A 502, 503 or 504 answer, or any failure that the gateway itself
    /// turns into one (connect failure, reset, timeout).
    GatewayError,
    /// Any 5xx answer, or any failure.
    ServerError,
}

impl RetryOn {
    /// Every condition and its manifest name.
    pub(crate) const NAMES: [(&'static str, RetryOn); 5] = [
        ("connect-failure", RetryOn::ConnectFailure),
        ("refused-stream", RetryOn::RefusedStream),
        ("reset", RetryOn::Reset),
        ("gateway-error", RetryOn::GatewayError),
        ("5xx", RetryOn::ServerError),
    ];

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// What a try ended with, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TryResult {
    /// No response: the exchange failed this way.
    Failed(ErrorKind),
    /// The upstream answered with this status.
    Answered(StatusCode),
}

/// Exponential backoff with jitter between tries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Backoff {
    /// The wait before the first retry.
    pub(crate) initial: Duration,
    /// Each later wait is the previous one times this.
    pub(crate) multiplier: f64,
    /// No wait is longer than this.
    pub(crate) max: Duration,
    /// The share of each wait that is random: a wait `w` becomes a value in
    /// `[w × (1 − jitter), w]`, so concurrent clients do not retry in step.
    pub(crate) jitter: f64,
}

impl Backoff {
    /// Envoy's defaults: 25 ms, doubling, at most 250 ms, half of it random.
    pub(crate) fn from_initial(initial: Duration) -> Backoff {
        Backoff {
            initial,
            multiplier: 2.0,
            max: initial.saturating_mul(10),
            jitter: 0.5,
        }
    }

    /// The wait before retry number `retry` (1 for the first retry), with
    /// `random` uniform in `[0, 1)` supplying the jitter.
    pub(crate) fn delay(&self, retry: u32, random: f64) -> Duration {
        let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
        let full = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = full.min(self.max.as_secs_f64());
        let jittered = capped * (1.0 - self.jitter * random.clamp(0.0, 1.0));
        Duration::try_from_secs_f64(jittered).unwrap_or(self.max)
    }
}

/// The retry settings of one upstream.
#[derive(Debug)]
pub(crate) struct RetryPolicy {
    /// Tries in all, the first included (at least 2 when retries are on).
    pub(crate) attempts: u32,
    /// How long each try may wait for the response head; `None` = the
    /// upstream's `timeout`.
    pub(crate) per_try_timeout: Option<Duration>,
    on: u8,
    pub(crate) backoff: Backoff,
    pub(crate) budget: RetryBudget,
}

impl RetryPolicy {
    /// A policy retrying on `on`.
    pub(crate) fn new(
        attempts: u32,
        per_try_timeout: Option<Duration>,
        on: &[RetryOn],
        backoff: Backoff,
        budget: RetryBudget,
    ) -> RetryPolicy {
        RetryPolicy {
            attempts,
            per_try_timeout,
            on: on.iter().fold(0, |bits, c| bits | c.bit()),
            backoff,
            budget,
        }
    }

    /// Whether `other` retries exactly as this policy does (its budget's
    /// counts aside): a reload keeps the running policy, and its budget,
    /// when they match.
    pub(crate) fn same_settings(&self, other: &RetryPolicy) -> bool {
        self.attempts == other.attempts
            && self.per_try_timeout == other.per_try_timeout
            && self.on == other.on
            && self.backoff == other.backoff
            && self.budget.percent == other.budget.percent
            && self.budget.min_per_sec == other.budget.min_per_sec
    }

    fn retries_on(&self, condition: RetryOn) -> bool {
        self.on & condition.bit() != 0
    }

    /// Whether a try that ended with `result` may be tried again, given the
    /// request's `method` and whether its body can be sent again. Requests
    /// that may have reached the upstream are retried only when idempotent;
    /// a request whose body was (partly) sent is never retried. The budget
    /// is not consulted here: see [`RetryBudget::try_withdraw`].
    pub(crate) fn is_retriable(
        &self,
        result: TryResult,
        method: &Method,
        body_replayable: bool,
    ) -> bool {
        if !body_replayable {
            return false;
        }
        let never_sent = matches!(
            result,
            TryResult::Failed(ErrorKind::ConnectFailed | ErrorKind::ConnectTimeout)
        );
        if !never_sent && !is_idempotent(method) {
            return false;
        }
        let any = |conditions: &[RetryOn]| conditions.iter().any(|c| self.retries_on(*c));
        match result {
            TryResult::Failed(ErrorKind::ConnectFailed | ErrorKind::ConnectTimeout) => any(&[
                RetryOn::ConnectFailure,
                RetryOn::GatewayError,
                RetryOn::ServerError,
            ]),
            TryResult::Failed(ErrorKind::UpstreamError | ErrorKind::Timeout) => {
                any(&[RetryOn::Reset, RetryOn::GatewayError, RetryOn::ServerError])
            }
            TryResult::Failed(ErrorKind::NoEndpoint) => false,
            TryResult::Answered(status) => match status.as_u16() {
                502..=504 => any(&[RetryOn::GatewayError, RetryOn::ServerError]),
                500..=599 => self.retries_on(RetryOn::ServerError),
                _ => false,
            },
        }
    }
}

/// RFC 9110's idempotent methods: sending one twice has the effect of once.
pub(crate) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Width of one budget bucket.
const BUCKET: Duration = Duration::from_secs(1);
/// Buckets in the window (so the window is 10 s, as linkerd's budget).
const BUCKETS: usize = 10;

/// Caps retries at a share of requests over the last 10 s, plus a floor per
/// second so a quiet upstream can still retry (linkerd's and Finagle's
/// retry budget). Counts are kept in per-second buckets of atomics: no lock,
/// two atomic adds per request. Concurrent retries may overshoot the cap by
/// the few that raced.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    /// Retries allowed per 100 requests.
    percent: u32,
    /// Retries allowed per second whatever the traffic.
    min_per_sec: u32,
    epoch: Instant,
    buckets: [Bucket; BUCKETS],
}

#[derive(Debug, Default)]
struct Bucket {
    /// The second this bucket counts, since the epoch, plus one (0 = unused).
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

impl RetryBudget {
    /// A budget of `percent` retries per 100 requests, and at least
    /// `min_per_sec` a second.
    pub(crate) fn new(percent: u32, min_per_sec: u32) -> RetryBudget {
        RetryBudget {
            percent,
            min_per_sec,
            epoch: Instant::now(),
            buckets: Default::default(),
        }
    }

    fn now_second(&self) -> u64 {
        (self.epoch.elapsed().as_secs() / BUCKET.as_secs()).saturating_add(1)
    }

    /// The bucket for `second`, cleared when it last counted an older one.
    fn bucket(&self, second: u64) -> &Bucket {
        let index = usize::try_from(second % BUCKETS as u64).unwrap_or(0);
        let bucket = &self.buckets[index];
        let seen = bucket.second.load(Ordering::Relaxed);
        if seen != second
            && bucket
                .second
                .compare_exchange(seen, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            bucket.requests.store(0, Ordering::Relaxed);
            bucket.retries.store(0, Ordering::Relaxed);
        }
        bucket
    }

    /// Counts a request (its first try).
    pub(crate) fn deposit(&self) {
        self.bucket(self.now_second())
            .requests
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub(crate) fn try_withdraw(&self) -> bool {
        let now = self.now_second();
        let (mut requests, mut retries) = (0u64, 0u64);
        for bucket in &self.buckets {
            let second = bucket.second.load(Ordering::Relaxed);
            if second != 0 && second + (BUCKETS as u64) > now {
                requests += bucket.requests.load(Ordering::Relaxed);
                retries += bucket.retries.load(Ordering::Relaxed);
            }
        }
        let floor = u64::from(self.min_per_sec) * BUCKETS as u64;
        let allowed = requests * u64::from(self.percent) / 100 + floor;
        if retries >= allowed {
            return false;
        }
        self.bucket(now).retries.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(on: &[RetryOn]) -> RetryPolicy {
        RetryPolicy::new(
            3,
            None,
            on,
            Backoff::from_initial(Duration::from_millis(25)),
            RetryBudget::new(20, 0),
        )
    }

    #[test]
    fn conditions_follow_envoy() {
        let get = Method::GET;
        let connect = TryResult::Failed(ErrorKind::ConnectFailed);
        let reset = TryResult::Failed(ErrorKind::UpstreamError);
        let unavailable = TryResult::Answered(StatusCode::SERVICE_UNAVAILABLE);
        let internal = TryResult::Answered(StatusCode::INTERNAL_SERVER_ERROR);
        let ok = TryResult::Answered(StatusCode::OK);

        let p = policy(&[RetryOn::ConnectFailure]);
        assert!(p.is_retriable(connect, &get, true));
        assert!(!p.is_retriable(reset, &get, true));
        assert!(!p.is_retriable(unavailable, &get, true));

        let p = policy(&[RetryOn::GatewayError]);
        assert!(p.is_retriable(connect, &get, true));
        assert!(p.is_retriable(reset, &get, true));
        assert!(p.is_retriable(unavailable, &get, true));
        assert!(!p.is_retriable(internal, &get, true));
        assert!(!p.is_retriable(ok, &get, true));

        let p = policy(&[RetryOn::ServerError]);
        assert!(p.is_retriable(internal, &get, true));
        assert!(!p.is_retriable(ok, &get, true));
    }

    #[test]
    fn non_idempotent_requests_retry_only_when_never_sent() {
        let p = policy(&[RetryOn::ServerError]);
        let post = Method::POST;
        assert!(p.is_retriable(TryResult::Failed(ErrorKind::ConnectFailed), &post, true));
        assert!(!p.is_retriable(TryResult::Failed(ErrorKind::UpstreamError), &post, true));
        assert!(!p.is_retriable(TryResult::Answered(StatusCode::BAD_GATEWAY), &post, true));
        assert!(
            !p.is_retriable(
                TryResult::Failed(ErrorKind::ConnectFailed),
                &Method::GET,
                false
            ),
            "a body that cannot be sent again is never retried"
        );
    }

    #[test]
    fn backoff_grows_caps_and_jitters_downwards() {
        let b = Backoff {
            initial: Duration::from_millis(10),
            multiplier: 3.0,
            max: Duration::from_millis(50),
            jitter: 0.5,
        };
        assert_eq!(b.delay(1, 0.0), Duration::from_millis(10));
        assert_eq!(b.delay(2, 0.0), Duration::from_millis(30));
        assert_eq!(b.delay(3, 0.0), Duration::from_millis(50));
        assert_eq!(b.delay(2, 0.999_999).as_millis(), 15);
    }

    #[test]
    fn budget_caps_retries_at_its_share() {
        let budget = RetryBudget::new(20, 0);
        for _ in 0..100 {
            budget.deposit();
        }
        let granted = (0..100).filter(|_| budget.try_withdraw()).count();
        assert_eq!(granted, 20);
        let floor = RetryBudget::new(0, 1);
        let granted = (0..100).filter(|_| floor.try_withdraw()).count();
        assert_eq!(granted, 10, "one a second over the 10 s window");
    }
}
