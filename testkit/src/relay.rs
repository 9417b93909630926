//! An in-process relay on `127.0.0.1:0` with a temporary data directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use securechat_client::relay::{RelayClient, ServerTrust};
use securechat_relay::clock::Clock;
use securechat_relay::ratelimit::Limit;
use securechat_relay::{Config, Relay, RelayError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::smtp::SmtpServer;

/// A running relay; stop it with [`TestRelay::stop`] (dropping it also
/// asks it to stop).
#[derive(Debug)]
pub struct TestRelay {
    addr: SocketAddr,
    status_addr: Option<SocketAddr>,
    fingerprint: [u8; 32],
    data_dir: PathBuf,
    clock: Clock,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), RelayError>>>,
}

/// A test configuration: loopback, any port, status page on, mail to
/// `smtp` (or the outbox), rate limits and time limits high enough that a
/// test's deliberate failures do not trip them, and an adjustable clock that the
/// test moves with [`TestRelay::clock`] instead of sleeping.
pub fn test_config(data_dir: &Path, smtp: Option<&SmtpServer>) -> Config {
    let mut config = Config::new(data_dir);
    config.listen = "127.0.0.1:0".parse().unwrap_or(config.listen);
    config.status_listen = "127.0.0.1:0".parse().ok();
    config.mail.smtp_url = smtp.map(SmtpServer::url);
    config.mail.smtp_ca = smtp.and_then(SmtpServer::ca_file);
    config.mail.from = "relay@securechat.test".into();
    config.login_limits.free_failures = 100;
    config.attempts_per_source = Limit {
        max: 1000,
        window: Duration::from_secs(60),
    };
    config.sends_per_sender = Limit {
        max: 1_000_000,
        window: Duration::from_secs(60),
    };
    config.shutdown_grace = Duration::from_secs(3);
    // Tests that move the clock by minutes keep their connections; a test
    // of this limit sets it.
    config.unauthenticated_timeout = Duration::from_secs(24 * 3600);
    config.clock = Clock::adjustable();
    config
}

impl TestRelay {
    /// Bind and start serving in a task of the current runtime.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let data_dir = config.data_dir.clone();
        let clock = config.clock.clone();
        let relay = Relay::bind(config)
            .await
            .context("binding the test relay")?;
        let (stop, stopped) = oneshot::channel::<()>();
        let addr = relay.local_addr();
        let status_addr = relay.status_addr();
        let fingerprint = relay.cert_fingerprint();
        let task = tokio::spawn(relay.run(async move {
            let _ = stopped.await;
        }));
        Ok(Self {
            addr,
            status_addr,
            fingerprint,
            data_dir,
            clock,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The relay's QUIC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The status page address.
    pub fn status_addr(&self) -> Option<SocketAddr> {
        self.status_addr
    }

    /// SHA-256 of the relay's certificate.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The relay's clock: [`Clock::advance`] moves the relay's time (with
    /// [`test_config`], whose clock is adjustable). Give it to the test's
    /// users ([`TestUser::use_clock`](crate::TestUser::use_clock)) so their
    /// TOTP codes follow.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// A new QUIC connection that pins this relay's certificate.
    pub async fn connect(&self) -> anyhow::Result<RelayClient> {
        RelayClient::connect(self.addr, ServerTrust::Fingerprint(self.fingerprint))
            .await
            .context("connecting to the test relay")
    }

    /// Shut down gracefully and wait until the relay has released its data.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.context("relay task panicked")??;
        }
        Ok(())
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
