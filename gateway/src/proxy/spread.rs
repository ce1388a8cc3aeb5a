//! Spreading client connections evenly over the worker threads.
//!
//! Each worker accepts on a `SO_REUSEPORT` socket of its own, and the
//! kernel picks the socket by a hash of the connection's addresses: 64
//! connections land 27/37 about as often as 32/32, and the busier worker's
//! clients wait longer (in `wrk -c64` runs at 2 workers, splits of 40/24
//! had a p99 a third above the even ones'). So a worker that accepts a
//! connection while it serves more than one connection over the
//! least-loaded worker hands the connection to that worker, as HAProxy's
//! listeners spread their connections over its threads. A connection is
//! counted for its worker when it is assigned, before that worker runs, so
//! a burst accepted by one worker spreads too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, mpsc};

/// The worker threads of one gateway process and how many client
/// connections each serves.
#[derive(Debug)]
pub(crate) struct Workers {
    seats: Box<[Seat]>,
}

/// One worker's count and inbox, on a cache line of its own: every accept
/// on every worker reads every count.
#[derive(Debug)]
#[repr(align(64))]
struct Seat {
    open: AtomicUsize,
    inbox: mpsc::UnboundedSender<Handoff>,
}

/// One worker's place among its process's workers ([`Worker::all`]), given to its gateway
/// ([`crate::Gateway::from_listeners`]).
#[derive(Debug)]
pub struct Worker {
    pub(crate) seat: WorkerSeat,
    pub(crate) inbox: mpsc::UnboundedReceiver<Handoff>,
}

/// Which worker this is, among which: what an accept loop needs to assign
/// its connections.
#[derive(Debug, Clone)]
pub(crate) struct WorkerSeat {
    workers: Arc<Workers>,
    index: usize,
}

/// A connection accepted by one worker for another to serve.
#[derive(Debug)]
pub(crate) struct Handoff {
    /// The listener that accepted it (by name: each worker has its own).
    pub(crate) listener: Arc<str>,
    pub(crate) stream: std::net::TcpStream,
    pub(crate) peer: SocketAddr,
    /// The accepting worker's `max_connections` slot, held while it is open.
    pub(crate) permit: OwnedSemaphorePermit,
    pub(crate) load: Load,
}

/// A connection counted for a worker until this drops.
#[derive(Debug)]
pub(crate) struct Load {
    workers: Arc<Workers>,
    index: usize,
}

impl Drop for Load {
    fn drop(&mut self) {
        self.workers.seats[self.index]
            .open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Worker {
    /// The places of a process's `count` workers (at least one), which
    /// share their connection counts.
    pub fn all(count: usize) -> Vec<Worker> {
        let (senders, inboxes): (Vec<_>, Vec<_>) =
            (0..count.max(1)).map(|_| mpsc::unbounded_channel()).unzip();
        let workers = Arc::new(Workers {
            seats: senders
                .into_iter()
                .map(|inbox| Seat {
                    open: AtomicUsize::new(0),
                    inbox,
                })
                .collect(),
        });
        inboxes
            .into_iter()
            .enumerate()
            .map(|(index, inbox)| Worker {
                seat: WorkerSeat {
                    workers: workers.clone(),
                    index,
                },
                inbox,
            })
            .collect()
    }
}

impl Workers {
    fn open(&self, index: usize) -> usize {
        self.seats[index].open.load(Ordering::Relaxed)
    }

    /// Counts one more connection for worker `index`, until the load drops.
    fn count(self: &Arc<Self>, index: usize) -> Load {
        self.seats[index].open.fetch_add(1, Ordering::Relaxed);
        Load {
            workers: self.clone(),
            index,
        }
    }
}

impl WorkerSeat {
    /// This worker's index.
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// The client connections this worker serves now.
    pub(crate) fn open_connections(&self) -> usize {
        self.workers.open(self.index)
    }

    /// Picks the worker for a connection this one accepted and counts it
    /// there: this worker, unless it serves more than one connection over
    /// the least-loaded one.
    pub(crate) fn assign(&self) -> Load {
        let workers = &self.workers;
        let mine = workers.open(self.index);
        let (least, fewest) = (0..workers.seats.len())
            .map(|index| (index, workers.open(index)))
            .min_by_key(|&(_, open)| open)
            .unwrap_or((self.index, mine));
        workers.count(if mine > fewest + 1 { least } else { self.index })
    }

    /// Sends `handoff` to the worker its load is counted for. Gives it
    /// back if that worker no longer takes connections (it has stopped).
    pub(crate) fn hand_off(&self, handoff: Handoff) -> Result<(), Handoff> {
        let seat = &self.workers.seats[handoff.load.index];
        seat.inbox.send(handoff).map_err(|refused| refused.0)
    }

    /// A load counted for this worker, for a connection it serves itself.
    pub(crate) fn count_here(&self) -> Load {
        self.workers.count(self.index)
    }
}

impl Load {
    /// The worker this connection is counted for.
    pub(crate) fn worker(&self) -> usize {
        self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seats(count: usize) -> Vec<WorkerSeat> {
        Worker::all(count).into_iter().map(|w| w.seat).collect()
    }

    fn counts(seats: &[WorkerSeat]) -> Vec<usize> {
        seats.iter().map(WorkerSeat::open_connections).collect()
    }

    #[test]
    fn a_worker_keeps_connections_while_it_is_at_most_one_over_the_least_loaded() {
        let seats = seats(2);
        // Every connection arrives at worker 0, as a skewed hash would have it.
        let loads: Vec<Load> = (0..9).map(|_| seats[0].assign()).collect();
        let on = |worker| loads.iter().filter(|l| l.worker() == worker).count();
        assert_eq!((on(0), on(1)), (5, 4));
        assert_eq!(seats[0].open_connections(), 5);
        assert_eq!(seats[1].open_connections(), 4);
    }

    #[test]
    fn closed_connections_are_uncounted_and_new_ones_refill_the_emptier_worker() {
        let seats = seats(3);
        let mut loads: Vec<Load> = (0..6).map(|_| seats[2].assign()).collect();
        assert_eq!(counts(&seats), [2, 1, 3]);
        // Worker 1's client leaves; the next two arrivals at worker 2 go there.
        loads.retain(|l| l.worker() != 1);
        assert_eq!(seats[1].open_connections(), 0);
        loads.extend((0..2).map(|_| seats[2].assign()));
        assert_eq!(counts(&seats), [2, 2, 3]);
        drop(loads);
        assert!(seats.iter().all(|s| s.open_connections() == 0));
    }

    #[test]
    fn a_handoff_to_a_stopped_worker_is_given_back() {
        let mut workers = Worker::all(2);
        let stopped = workers.pop().expect("two workers");
        let seat = workers.pop().expect("two workers").seat;
        drop(stopped.inbox);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let permit = Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .unwrap();
        let load = seat.workers.count(1);
        let handoff = Handoff {
            listener: Arc::from("l"),
            peer: stream.local_addr().unwrap(),
            stream,
            permit,
            load,
        };
        let back = seat.hand_off(handoff).expect_err("worker 1 has stopped");
        assert_eq!(back.load.worker(), 1);
        drop(back);
        assert_eq!(seat.workers.open(1), 0);
    }
}
