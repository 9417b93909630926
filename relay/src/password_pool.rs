//! Threads of their own for password hashing, with a bounded queue.
//!
//! argon2id is slow and memory-hard on purpose (19 MiB and tens of
//! milliseconds per check). On tokio's blocking pool a burst of logins would
//! make database work ([`store::blocking`](crate::store::blocking)) wait
//! behind it, and an unbounded queue of checks would let anyone hold the
//! relay's CPU. So:
//!
//! ```text
//!  handler ─ try_reserve ─┬─ full ──► ErrorCode::Busy ("relay busy, retry in a moment")
//!                         └─ Slot ─ run(check) ─► channel ─► worker 1..N (std threads)
//!                                       ▲                        │
//!                                       └──── answer (oneshot) ◄─┘
//! ```
//!
//! At most `workers + queue` checks are admitted at once: `workers` run, the
//! rest wait. A place is held until its check has *finished* (not until the
//! requester stops waiting), so a client that hangs up cannot make room for
//! more work than the pool does. Dropping the pool closes the channel; the
//! workers finish their current check and exit, and the drop joins them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use crate::accounts::{AccountError, Passwords};

type Job = Box<dyn FnOnce(&Passwords) + Send>;

/// Why a password check did not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// Every worker is busy and the queue is full; retry in a moment.
    #[error("all password workers are busy and the queue is full")]
    Busy,
    /// The pool stopped (the relay is shutting down) before the check ran.
    #[error("the password workers have stopped")]
    Stopped,
}

/// The password workers. See the [module docs](self).
pub struct PasswordPool {
    jobs: Option<mpsc::Sender<Job>>,
    admitted: Arc<AtomicUsize>,
    capacity: usize,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for PasswordPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordPool")
            .field("workers", &self.workers.len())
            .field("capacity", &self.capacity)
            .field("in_use", &self.in_use())
            .finish()
    }
}

/// A place in the pool, reserved by [`PasswordPool::try_reserve`] and
/// used by [`PasswordPool::run`]; given back when its check has finished
/// (or when dropped unused).
#[derive(Debug)]
pub struct Slot {
    admitted: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PasswordPool {
    /// Start `workers` threads (at least one) sharing `passwords`, admitting
    /// `queue` more checks to wait for them.
    pub fn new(passwords: Passwords, workers: usize, queue: usize) -> Result<Self, AccountError> {
        let workers = workers.max(1);
        let passwords = Arc::new(passwords);
        let (jobs, receiver) = mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        let mut handles = Vec::with_capacity(workers);
        for n in 0..workers {
            let receiver = Arc::clone(&receiver);
            let passwords = Arc::clone(&passwords);
            let handle = std::thread::Builder::new()
                .name(format!("argon2-{n}"))
                .spawn(move || worker(&receiver, &passwords))
                .map_err(AccountError::Workers)?;
            handles.push(handle);
        }
        Ok(Self {
            jobs: Some(jobs),
            admitted: Arc::new(AtomicUsize::new(0)),
            capacity: workers + queue,
            workers: handles,
        })
    }

    /// Reserve a place for one check, or [`PoolError::Busy`] if every
    /// place is taken.
    pub fn try_reserve(&self) -> Result<Slot, PoolError> {
        self.admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .map(|_| Slot {
                admitted: Arc::clone(&self.admitted),
            })
            .map_err(|_| PoolError::Busy)
    }

    /// Run `check` on a worker in the place `slot` holds; the place is given
    /// back when `check` has returned.
    pub async fn run<T, F>(&self, slot: Slot, check: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce(&Passwords) -> T + Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        let job: Job = Box::new(move |passwords| {
            let out = check(passwords);
            drop(slot);
            // The requester may be gone; the check ran all the same.
            let _ = answer.send(out);
        });
        let jobs = self.jobs.as_ref().ok_or(PoolError::Stopped)?;
        jobs.send(job).map_err(|_| PoolError::Stopped)?;
        answered.await.map_err(|_| PoolError::Stopped)
    }

    /// Checks running or waiting now.
    pub fn in_use(&self) -> usize {
        self.admitted.load(Ordering::Acquire)
    }
}

impl Drop for PasswordPool {
    fn drop(&mut self) {
        // Closing the channel ends each worker after its current check.
        self.jobs = None;
        for handle in self.workers.drain(..) {
            if handle.join().is_err() {
                tracing::error!("a password worker panicked");
            }
        }
    }
}

fn worker(jobs: &Mutex<mpsc::Receiver<Job>>, passwords: &Passwords) {
    loop {
        // Only the receive is under the lock; checks run in parallel.
        let job = match jobs.lock() {
            Ok(receiver) => receiver.recv(),
            Err(poisoned) => poisoned.into_inner().recv(),
        };
        let Ok(job) = job else {
            return;
        };
        // A panicking check drops its answer (the requester sees Stopped)
        // and must not take the worker with it.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(passwords)));
        if ran.is_err() {
            tracing::error!("a password check panicked");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Barrier;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn admits_workers_plus_queue_and_frees_a_place_when_a_check_ends() {
        let pool = Arc::new(PasswordPool::new(Passwords::new().unwrap(), 1, 1).unwrap());
        // Hold the one worker until the test lets go.
        let gate = Arc::new(Barrier::new(2));
        let first = pool.try_reserve().unwrap();
        let held = {
            let (pool, gate) = (Arc::clone(&pool), Arc::clone(&gate));
            tokio::spawn(async move { pool.run(first, move |_| gate.wait()).await })
        };
        let queued = pool.try_reserve().unwrap();
        assert!(matches!(pool.try_reserve(), Err(PoolError::Busy)));
        assert_eq!(pool.in_use(), 2);
        gate.wait();
        held.await.unwrap().unwrap();
        // The queued place runs a real check; then everything is free.
        let phc = pool.run(queued, |p| p.hash("a password")).await.unwrap();
        let phc = phc.unwrap();
        let slot = pool.try_reserve().unwrap();
        assert!(pool
            .run(slot, move |p| p.verify(&phc, "a password"))
            .await
            .unwrap());
        assert_eq!(pool.in_use(), 0);
    }

    #[tokio::test]
    async fn a_panicking_check_keeps_the_worker() {
        let pool = PasswordPool::new(Passwords::new().unwrap(), 1, 0).unwrap();
        let slot = pool.try_reserve().unwrap();
        let r = pool.run(slot, |_| -> u8 { panic!("boom") }).await;
        assert!(matches!(r, Err(PoolError::Stopped)));
        let slot = pool.try_reserve().unwrap();
        assert_eq!(pool.run(slot, |_| 7).await.unwrap(), 7);
    }
}
