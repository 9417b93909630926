//! The state every connection task, request handler, push task and
//! background task shares: settings, the store and its commit queue, the
//! online users, the limits and the counters.
//!
//! It sits below everything that uses it: the accept loop (`server`)
//! builds one and hands it to each connection (`connection`), whose
//! requests (`handlers`) and push stream (`push`) read and change it, and
//! the status listener (`status`) reports it. None of its parts knows any
//! of those.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::admission::Admission;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::hub::Hub;
use crate::logins::LiveLogins;
use crate::mail::Mailer;
use crate::metrics::{Histogram, RateHistory, Stats};
use crate::password_pool::PasswordPool;
use crate::ratelimit::{GuessLimiter, RateLimiter, Source};
use crate::shared_limits::SharedLimits;
use crate::store::{QueueWriter, Store};

/// State shared by every connection and background task.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) store: Arc<dyn Store>,
    /// Sends and acks, batched into group commits.
    pub(crate) queue: QueueWriter,
    pub(crate) mailer: Mailer,
    /// argon2 on threads of its own, bounded.
    pub(crate) passwords: PasswordPool,
    pub(crate) hub: Arc<Hub>,
    /// With several relays on one Redis: presence across them.
    pub(crate) cluster: Option<Arc<Cluster>>,
    /// Connections per session token, to end them with their session.
    pub(crate) logins: LiveLogins,
    pub(crate) stats: Arc<Stats>,
    /// Durable-commit latency, observed by the queue writer.
    pub(crate) commit_latency: Arc<Histogram>,
    /// Accepted and delivered messages per second, for the status page.
    pub(crate) rates: RateHistory,
    /// Open connections, in all and per source, against their caps.
    pub(crate) admission: Arc<Admission>,
    /// Login, resume, register and verify attempts per source.
    pub(crate) source_limiter: RateLimiter<Source>,
    /// Password guesses in `Login`, per (account, source) and per account.
    pub(crate) login_guesses: GuessLimiter,
    /// Password checks of a repeated `Register` for a pending name: kept
    /// apart from logins, so retrying a registration never delays a login.
    pub(crate) register_guesses: GuessLimiter,
    /// `Send` requests per sender.
    pub(crate) send_limiter: RateLimiter<String>,
    /// With several relays on one Redis: the same limits counted across them.
    pub(crate) shared_limits: Option<Arc<SharedLimits>>,
    pub(crate) next_conn_id: AtomicU64,
}
