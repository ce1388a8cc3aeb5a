//! Per-connection activity: requests in flight and when the last one ended,
//! so a connection with nothing to do can be closed after `idle_timeout`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// What one connection is doing.
#[derive(Debug)]
pub(crate) struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `opened` at which the last request ended.
    last_done_ms: AtomicU64,
}

impl Activity {
    /// A connection that has just opened.
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_done_ms: AtomicU64::new(0),
        })
    }

    /// Marks a request as started; it ends when the returned guard drops
    /// (with the response body).
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Resolves once no request has been in flight for `limit`.
    pub(crate) async fn idle_for(&self, limit: Duration) {
        loop {
            let wait = if self.in_flight.load(Ordering::Acquire) > 0 {
                limit
            } else {
                let last_done = Duration::from_millis(self.last_done_ms.load(Ordering::Acquire));
                let idle = self.opened.elapsed().saturating_sub(last_done);
                if idle >= limit {
                    return;
                }
                limit - idle
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// A request in flight on a connection.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        let now_ms = u64::try_from(activity.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        activity.last_done_ms.store(now_ms, Ordering::Release);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_requests_in_flight() {
        let activity = Activity::new();
        let request = activity.begin();
        let idle = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle_for(Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(
            !idle.is_finished(),
            "a connection with a request in flight is not idle"
        );
        drop(request);
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(idle.is_finished(), "idle 5s after the last request ended");
    }
}
