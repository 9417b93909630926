//! Verification mail: SMTP through lettre, or an outbox folder.
//!
//! With an SMTP URL (`smtp://host:port` plain, `smtp://host?tls=required`
//! STARTTLS, `smtps://host` implicit TLS, optionally `user:pass@`), codes go
//! out through lettre's async transport. The server's certificate must chain
//! to a public root (webpki-roots) or to a CA in [`MailConfig::smtp_ca`], for
//! a mail server with a private CA. Without a URL, each mail is written
//! as an `.eml` file (mode 0600) into `<data-dir>/outbox/` and the log says
//! where — enough for a single-machine setup or a test.
//!
//! Every mail body contains a line exactly `Verification code: NNNNNN`.
//!
//! The SMTP URL may hold a password: it is never logged or shown as it is.
//! [`mask_smtp_url`] gives the form for logs (`smtp://user:***@host`), and
//! [`MailConfig`]'s `Debug` uses it. [`Mailer::check`] tries the server once
//! (connect, EHLO, TLS, login, NOOP) so the relay can warn at start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// How long one SMTP delivery may take.
const SMTP_TIMEOUT: Duration = Duration::from_secs(20);

/// Where verification mail goes.
#[derive(Clone, PartialEq, Eq)]
pub struct MailConfig {
    /// SMTP server URL; `None` writes mail to the outbox folder.
    pub smtp_url: Option<String>,
    /// A PEM file of CA certificates to trust for the SMTP server's TLS
    /// certificate, besides the public roots. Needs a TLS URL.
    pub smtp_ca: Option<PathBuf>,
    /// The From address.
    pub from: String,
}

impl std::fmt::Debug for MailConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailConfig")
            .field("smtp_url", &self.smtp_url.as_deref().map(mask_smtp_url))
            .field("smtp_ca", &self.smtp_ca)
            .field("from", &self.from)
            .finish()
    }
}

impl MailConfig {
    /// Where mail goes, as the start-up summary shows it: the masked SMTP
    /// URL, or `outbox`.
    pub fn describe(&self) -> String {
        match &self.smtp_url {
            Some(url) => mask_smtp_url(url),
            None => "outbox".into(),
        }
    }
}

/// `url` with any password replaced by `***`: `smtp://user:***@host:587`.
/// A URL that cannot be split into its parts is shown as `<smtp url>`
/// rather than risk showing a secret.
pub fn mask_smtp_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<smtp url>".into();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let masked = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_string(),
    };
    // The query holds only settings (tls=required); a fragment or path
    // has no business here, but is shown masked all the same.
    let tail = if tail.contains('#') || tail.starts_with('/') && tail.len() > 1 {
        "/…"
    } else {
        tail
    };
    format!("{scheme}://{masked}{tail}")
}

impl Default for MailConfig {
    fn default() -> Self {
        Self {
            smtp_url: None,
            smtp_ca: None,
            from: "securechat relay <relay@localhost>".into(),
        }
    }
}

/// Why a mail could not be sent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MailError {
    /// The SMTP URL or From address is unusable.
    #[error("mail configuration: {0}")]
    Config(String),
    /// The recipient address is not acceptable to the mailer.
    #[error("invalid recipient address: {0}")]
    Address(String),
    /// Building the message failed.
    #[error("cannot build the mail: {0}")]
    Build(String),
    /// The SMTP server refused or could not be reached.
    #[error("SMTP delivery failed: {0}")]
    Smtp(String),
    /// The start-up check could not reach or use the SMTP server.
    #[error("SMTP server check failed: {0}")]
    Check(String),
    /// Writing to the outbox failed.
    #[error("cannot write to the outbox {path}: {source}")]
    Outbox {
        /// The outbox folder.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Outbox(PathBuf),
}

/// Sends verification codes.
pub struct Mailer {
    transport: Transport,
    from: Mailbox,
    /// The SMTP URL, masked, for log lines.
    server: Option<String>,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.transport {
            Transport::Smtp(_) => f.write_str("Mailer(smtp)"),
            Transport::Outbox(dir) => write!(f, "Mailer(outbox {})", dir.display()),
        }
    }
}

impl Mailer {
    /// Build the mailer; with no SMTP URL the outbox is `<data_dir>/outbox`.
    pub fn new(config: &MailConfig, data_dir: &Path) -> Result<Self, MailError> {
        let from: Mailbox = config
            .from
            .parse()
            .map_err(|e| MailError::Config(format!("From address {:?}: {e}", config.from)))?;
        let transport = match &config.smtp_url {
            Some(url) => {
                let mut builder = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
                    // The URL may hold credentials: do not echo it.
                    .map_err(|e| MailError::Config(format!("SMTP URL: {e}")))?;
                if let Some(ca) = &config.smtp_ca {
                    builder = builder.tls(tls_trusting(url, ca)?);
                }
                Transport::Smtp(builder.timeout(Some(SMTP_TIMEOUT)).build())
            }
            None => Transport::Outbox(data_dir.join("outbox")),
        };
        let server = config.smtp_url.as_deref().map(mask_smtp_url);
        Ok(Self {
            transport,
            from,
            server,
        })
    }

    /// The outbox folder, when mail is not sent over SMTP.
    pub fn outbox_dir(&self) -> Option<&Path> {
        match &self.transport {
            Transport::Outbox(dir) => Some(dir),
            Transport::Smtp(_) => None,
        }
    }

    /// Try the SMTP server once: connect, EHLO, TLS as configured, log in if
    /// the URL has credentials, NOOP. `Ok(Some(server))` (masked) when it
    /// answers, `Ok(None)` with the outbox (nothing to check).
    pub async fn check(&self) -> Result<Option<String>, MailError> {
        let Transport::Smtp(smtp) = &self.transport else {
            return Ok(None);
        };
        let server = self.server.clone().unwrap_or_default();
        match smtp.test_connection().await {
            Ok(true) => Ok(Some(server)),
            Ok(false) => Err(MailError::Check(format!(
                "{server} accepted the connection but did not answer NOOP"
            ))),
            Err(e) => Err(MailError::Check(format!("{server}: {e}"))),
        }
    }

    /// Check that `addr` is an address the mailer can send to.
    pub fn check_address(addr: &str) -> Result<(), MailError> {
        addr.parse::<Mailbox>()
            .map(drop)
            .map_err(|e| MailError::Address(e.to_string()))
    }

    /// Mail a verification code for `username` to `to`.
    pub async fn send_code(
        &self,
        to: &str,
        username: &str,
        code: &str,
        valid_for: Duration,
    ) -> Result<(), MailError> {
        let to_box: Mailbox = to
            .parse()
            .map_err(|e: lettre::address::AddressError| MailError::Address(e.to_string()))?;
        let minutes = valid_for.as_secs().div_ceil(60);
        let body = format!(
            "Hello {username},\n\n\
             someone (hopefully you) registered the securechat account \"{username}\" \
             with this address.\n\n\
             Verification code: {code}\n\n\
             The code is valid for {minutes} minutes. If this was not you, ignore this mail.\n"
        );
        let message = Message::builder()
            .from(self.from.clone())
            .to(to_box)
            .subject(format!("securechat verification code for {username}"))
            .header(ContentType::TEXT_PLAIN)
            .body(body)
            .map_err(|e| MailError::Build(e.to_string()))?;
        match &self.transport {
            Transport::Smtp(smtp) => {
                smtp.send(message)
                    .await
                    .map_err(|e| MailError::Smtp(e.to_string()))?;
                tracing::info!(%username, "verification mail sent over SMTP");
            }
            Transport::Outbox(dir) => {
                let path = write_outbox(dir.clone(), username, message.formatted()).await?;
                tracing::info!(%username, path = %path.display(), "verification mail written to the outbox");
            }
        }
        Ok(())
    }
}

/// The TLS mode `url` asks for, with the certificates in the PEM file `ca`
/// trusted besides the public roots. lettre's URL parser only knows the
/// public roots, so the mode is read here again and the TLS part replaced.
fn tls_trusting(url: &str, ca: &Path) -> Result<Tls, MailError> {
    let parsed = url::Url::parse(url).map_err(|e| MailError::Config(format!("SMTP URL: {e}")))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| MailError::Config("SMTP URL without a host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let tls_query = parsed
        .query_pairs()
        .find(|(k, _)| k == "tls")
        .map(|(_, v)| v.into_owned());
    let ca_error =
        |what: String| MailError::Config(format!("SMTP CA file {}: {what}", ca.display()));
    let pem = std::fs::read(ca).map_err(|e| ca_error(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ca_error(format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(ca_error("holds no CERTIFICATE block".into()));
    }
    let mut params = TlsParameters::builder(host);
    for cert in certs {
        let cert = Certificate::from_der(cert.to_vec()).map_err(|e| ca_error(e.to_string()))?;
        params = params.add_root_certificate(cert);
    }
    let params = params
        .build()
        .map_err(|e| ca_error(format!("unusable: {e}")))?;
    match (parsed.scheme(), tls_query.as_deref()) {
        ("smtps", _) => Ok(Tls::Wrapper(params)),
        ("smtp", Some("required")) => Ok(Tls::Required(params)),
        ("smtp", Some("opportunistic")) => Ok(Tls::Opportunistic(params)),
        _ => Err(MailError::Config(
            "an SMTP CA file needs a TLS SMTP URL: smtps://host or smtp://host?tls=required".into(),
        )),
    }
}

async fn write_outbox(dir: PathBuf, username: &str, bytes: Vec<u8>) -> Result<PathBuf, MailError> {
    let suffix = securechat_common::crypto::random_bytes::<4>()
        .map(hex::encode)
        .unwrap_or_default();
    let now = crate::clock::unix_now();
    let path = dir.join(format!("{now}-{username}-{suffix}.eml"));
    let outbox_err = |dir: &Path| {
        let path = dir.to_path_buf();
        move |source| MailError::Outbox { path, source }
    };
    let file = path.clone();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        crate::tls::write_private(&file, &bytes)
    })
    .await
    .map_err(|e| MailError::Build(e.to_string()))?
    .map_err(outbox_err(path.parent().unwrap_or(Path::new("."))))?;
    Ok(path)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn outbox_mail_holds_the_code_line() {
        let dir = tempfile::tempdir().unwrap();
        let mailer = Mailer::new(&MailConfig::default(), dir.path()).unwrap();
        mailer
            .send_code(
                "alice@example.org",
                "alice",
                "012345",
                Duration::from_secs(600),
            )
            .await
            .unwrap();
        let outbox = mailer.outbox_dir().unwrap();
        let entry = std::fs::read_dir(outbox).unwrap().next().unwrap().unwrap();
        let text = std::fs::read_to_string(entry.path()).unwrap();
        assert!(text
            .lines()
            .any(|l| l.trim_end() == "Verification code: 012345"));
    }

    #[test]
    fn ca_file_needs_a_tls_url_and_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let config = |url: &str| MailConfig {
            smtp_url: Some(url.into()),
            smtp_ca: Some(ca.clone()),
            ..MailConfig::default()
        };
        let err = Mailer::new(&config("smtps://127.0.0.1:465"), dir.path()).unwrap_err();
        assert!(err.to_string().contains("no CERTIFICATE"), "{err}");

        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&ca, cert.pem()).unwrap();
        let err = Mailer::new(&config("smtp://127.0.0.1:25"), dir.path()).unwrap_err();
        assert!(err.to_string().contains("needs a TLS SMTP URL"), "{err}");
        for url in ["smtps://127.0.0.1:465", "smtp://localhost:587?tls=required"] {
            Mailer::new(&config(url), dir.path()).unwrap();
        }
        let missing = MailConfig {
            smtp_ca: Some(dir.path().join("missing.pem")),
            ..config("smtps://127.0.0.1:465")
        };
        let err = Mailer::new(&missing, dir.path()).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
    }

    #[test]
    fn smtp_urls_are_masked() {
        for (url, shown) in [
            ("smtp://127.0.0.1:25", "smtp://127.0.0.1:25"),
            (
                "smtps://relay:s3cret@mail.example.org",
                "smtps://relay:***@mail.example.org",
            ),
            (
                "smtp://u%40x:p:a@ss@host:587?tls=required",
                "smtp://u%40x:***@host:587?tls=required",
            ),
            ("smtp://user@host", "smtp://user@host"),
            ("not a url with s3cret", "<smtp url>"),
            ("smtp://host/path#s3cret", "smtp://host/…"),
        ] {
            assert_eq!(mask_smtp_url(url), shown);
        }
        let config = MailConfig {
            smtp_url: Some("smtp://a:s3cret@h".into()),
            from: "x@y".into(),
            smtp_ca: None,
        };
        assert!(!format!("{config:?}").contains("s3cret"));
        assert_eq!(config.describe(), "smtp://a:***@h");
    }

    #[test]
    fn bad_from_address_is_a_config_error() {
        let config = MailConfig {
            from: "not an address".into(),
            ..MailConfig::default()
        };
        assert!(matches!(
            Mailer::new(&config, Path::new("/tmp")),
            Err(MailError::Config(_))
        ));
    }
}
