//! A real SMTP server for tests, in-process: mailin-embedded's server on a
//! free loopback port, keeping every mail it accepts in memory.
//!
//! ```text
//!  SmtpTls::Plain     relay ── smtp://            ──► mailin (no STARTTLS)
//!  SmtpTls::StartTls  relay ── smtp://?tls=required ► mailin (STARTTLS)
//!  SmtpTls::Implicit  relay ── smtps://           ──► TLS front ─► mailin
//! ```
//!
//! The TLS servers present a certificate for `127.0.0.1` and `localhost`
//! issued by a test CA made for this server alone ([`SmtpServer::ca_file`]),
//! so the relay only gets through when it trusts that CA. mailin-embedded
//! speaks STARTTLS only; the implicit-TLS server is the same plain server
//! behind a small tokio-rustls front that ends TLS and relays the bytes.
//!
//! The server threads live until the test process ends: mailin-embedded
//! has no way to stop a server, and an idle listener costs nothing.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mailin_embedded::{response, Handler, Response, Server, SslConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// How the server offers TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain text only; STARTTLS is not offered.
    Plain,
    /// STARTTLS offered (the relay's `smtp://…?tls=required`).
    StartTls,
    /// TLS from the first byte (the relay's `smtps://…`).
    Implicit,
}

/// A running SMTP server that stores every message it accepts.
#[derive(Debug)]
pub struct SmtpServer {
    addr: SocketAddr,
    tls: SmtpTls,
    /// Holds `ca.pem`, `cert.pem` and `key.pem` of the TLS modes.
    certs: tempfile::TempDir,
    mails: Arc<Mutex<Vec<String>>>,
    seen: Mutex<HashSet<usize>>,
}

/// Collects each mail's DATA into the shared list. mailin-embedded clones
/// the handler for every connection, so `current` is per connection.
#[derive(Clone)]
struct Collector {
    mails: Arc<Mutex<Vec<String>>>,
    current: Vec<u8>,
}

impl Handler for Collector {
    fn data_start(
        &mut self,
        _domain: &str,
        _from: &str,
        _is8bit: bool,
        _to: &[String],
    ) -> Response {
        self.current.clear();
        response::OK
    }

    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.current.extend_from_slice(buf);
        Ok(())
    }

    fn data_end(&mut self) -> Response {
        let text = String::from_utf8_lossy(&std::mem::take(&mut self.current)).into_owned();
        lock(&self.mails).push(text);
        response::OK
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A test CA and a server certificate it issued for `127.0.0.1` and
/// `localhost`, written as PEM files into `dir`.
struct TestCerts {
    cert_path: PathBuf,
    key_path: PathBuf,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn make_certs(dir: &Path) -> anyhow::Result<TestCerts> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "securechat test SMTP CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let leaf_key = KeyPair::generate()?;
    let mut leaf_params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "securechat test SMTP server");
    let leaf = leaf_params.signed_by(&leaf_key, &ca)?;

    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    std::fs::write(&cert_path, leaf.pem() + &ca.pem())?;
    std::fs::write(&key_path, leaf_key.serialize_pem())?;
    Ok(TestCerts {
        cert_path,
        key_path,
        chain: vec![leaf.der().clone(), ca.der().clone()],
        key: PrivatePkcs8KeyDer::from(leaf_key.serialize_der()).into(),
    })
}

/// Start mailin-embedded on `listener` in a thread of its own.
fn spawn_mailin(
    listener: TcpListener,
    ssl: SslConfig,
    mails: &Arc<Mutex<Vec<String>>>,
) -> anyhow::Result<()> {
    let mut server = Server::new(Collector {
        mails: Arc::clone(mails),
        current: Vec::new(),
    });
    server
        .with_name("smtp.securechat.test")
        .with_num_threads(4)
        .with_ssl(ssl)
        .map_err(|e| anyhow::anyhow!("SMTP server TLS set-up: {e}"))?
        .with_tcp_listener(listener);
    std::thread::Builder::new()
        .name("test-smtp".into())
        .spawn(move || {
            if let Err(e) = server.serve() {
                eprintln!("test SMTP server stopped: {e}");
            }
        })?;
    Ok(())
}

/// Accept TLS on `front` and relay each connection's plain bytes to `inner`.
fn spawn_tls_front(front: TcpListener, inner: SocketAddr, certs: &TestCerts) -> anyhow::Result<()> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs.chain.clone(), certs.key.clone_key())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    front.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("test-smtps".into())
        .spawn(move || {
            runtime.block_on(async move {
                let Ok(front) = tokio::net::TcpListener::from_std(front) else {
                    return;
                };
                while let Ok((tcp, _)) = front.accept().await {
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        // A failed handshake (an untrusting client) just ends
                        // the connection, as a real server's would.
                        let Ok(mut tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        if let Ok(mut plain) = tokio::net::TcpStream::connect(inner).await {
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                        }
                    });
                }
            });
        })?;
    Ok(())
}

fn loopback_listener() -> anyhow::Result<TcpListener> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a loopback port for SMTP")
}

impl SmtpServer {
    /// Start a plain-text server on a free loopback port. It accepts
    /// connections as soon as this returns.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(SmtpTls::Plain)
    }

    /// Start a server offering `tls`, with a fresh test CA.
    pub fn start_with(tls: SmtpTls) -> anyhow::Result<Self> {
        // mailin-embedded builds its rustls config with the process-wide
        // provider; name it in case more than one is compiled in.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let certs_dir = tempfile::tempdir()?;
        let certs = make_certs(certs_dir.path())?;
        let mails = Arc::new(Mutex::new(Vec::new()));
        let listener = loopback_listener()?;
        let addr = listener.local_addr()?;
        match tls {
            SmtpTls::Plain => spawn_mailin(listener, SslConfig::None, &mails)?,
            SmtpTls::StartTls => {
                let ssl = SslConfig::Trusted {
                    cert_path: certs.cert_path.display().to_string(),
                    key_path: certs.key_path.display().to_string(),
                    chain_path: certs_dir.path().join("ca.pem").display().to_string(),
                };
                spawn_mailin(listener, ssl, &mails)?;
            }
            SmtpTls::Implicit => {
                let inner = loopback_listener()?;
                let inner_addr = inner.local_addr()?;
                spawn_mailin(inner, SslConfig::None, &mails)?;
                spawn_tls_front(listener, inner_addr, &certs)?;
            }
        }
        Ok(Self {
            addr,
            tls,
            certs: certs_dir,
            mails,
            seen: Mutex::new(HashSet::new()),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How the server offers TLS.
    pub fn tls(&self) -> SmtpTls {
        self.tls
    }

    /// The URL to give the relay: `smtp://127.0.0.1:PORT`, with
    /// `?tls=required` for STARTTLS, or `smtps://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        match self.tls {
            SmtpTls::Plain => format!("smtp://{}", self.addr),
            SmtpTls::StartTls => format!("smtp://{}?tls=required", self.addr),
            SmtpTls::Implicit => format!("smtps://{}", self.addr),
        }
    }

    /// The PEM file of the test CA that issued the TLS certificate; `None`
    /// for a plain server.
    pub fn ca_file(&self) -> Option<PathBuf> {
        (self.tls != SmtpTls::Plain).then(|| self.certs.path().join("ca.pem"))
    }

    /// Every message delivered so far, as text (headers and body), oldest
    /// first.
    pub fn messages(&self) -> Vec<String> {
        lock(&self.mails).clone()
    }

    /// Wait for a not yet consumed mail to `to` and return its code (the
    /// line `Verification code: NNNNNN`).
    pub async fn wait_for_code(&self, to: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            for (i, text) in self.messages().iter().enumerate() {
                let mut seen = lock(&self.seen);
                if seen.contains(&i) || !text.contains(to) {
                    continue;
                }
                if let Some(code) = code_in(text) {
                    seen.insert(i);
                    return Ok(code);
                }
            }
            if Instant::now() > deadline {
                bail!("no verification mail to {to} arrived within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The six-digit code in a mail, from its `Verification code: ` line.
pub fn code_in(mail: &str) -> Option<String> {
    mail.lines().find_map(|line| {
        let code = line.trim_end().strip_prefix("Verification code: ")?;
        (code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit())).then(|| code.to_string())
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};

    /// Talk SMTP by hand: the server takes a mail and keeps its text.
    #[test]
    fn plain_server_keeps_a_mail() {
        let smtp = SmtpServer::start().unwrap();
        let stream = std::net::TcpStream::connect(smtp.addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        let mut expect = |code: &str| loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            assert!(line.starts_with(code), "expected {code}, got {line:?}");
            if line.as_bytes().get(3) != Some(&b'-') {
                break;
            }
        };
        expect("220");
        for (cmd, code) in [
            ("EHLO client.test", "250"),
            ("MAIL FROM:<relay@securechat.test>", "250"),
            ("RCPT TO:<ann@example.org>", "250"),
            ("DATA", "354"),
            (
                "To: ann@example.org\r\n\r\nVerification code: 123456\r\n.",
                "250",
            ),
            ("QUIT", "221"),
        ] {
            writer.write_all(format!("{cmd}\r\n").as_bytes()).unwrap();
            expect(code);
        }
        let mails = smtp.messages();
        assert_eq!(mails.len(), 1);
        assert_eq!(code_in(&mails[0]).as_deref(), Some("123456"));
        assert!(smtp.ca_file().is_none());
        assert_eq!(smtp.url(), format!("smtp://{}", smtp.addr()));
    }

    #[test]
    fn tls_servers_hand_out_their_ca() {
        for (tls, scheme) in [
            (SmtpTls::StartTls, "smtp://"),
            (SmtpTls::Implicit, "smtps://"),
        ] {
            let smtp = SmtpServer::start_with(tls).unwrap();
            let ca = std::fs::read_to_string(smtp.ca_file().unwrap()).unwrap();
            assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));
            assert!(smtp.url().starts_with(scheme));
        }
    }

    #[test]
    fn code_line_is_found() {
        assert_eq!(
            code_in("a\r\nVerification code: 012345\r\n").as_deref(),
            Some("012345")
        );
        assert_eq!(code_in("Verification code: 12345"), None);
    }
}
