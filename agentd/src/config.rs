//! Typed configuration the library runs with, and the `agentd.toml` format.
//!
//! The binary reads flags and the file and merges them (flags win); the
//! library only ever sees an [`AgentConfig`].

use std::net::SocketAddr;
use std::path::PathBuf;

use securechat_common::KeySize;
use serde::{Deserialize, Serialize};

use securechat_client::relay::ServerTrust;
use securechat_client::Paths;

/// Everything agentd needs to run.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Where files and the socket live.
    pub paths: Paths,
    /// The relay to use, if configured.
    pub relay: Option<RelaySettings>,
    /// Size of newly generated identity keys.
    pub key_size: KeySize,
}

/// How to reach and trust the relay.
#[derive(Clone, Debug)]
pub struct RelaySettings {
    /// `HOST:PORT` as the user wrote it; resolved again at every connection
    /// attempt (see [`RelaySettings::resolve`]).
    pub display: String,
    /// The host name the relay's certificate must carry when it is checked
    /// against a CA ([`ServerTrust::CaCert`]); ignored for a pinned one.
    pub server_name: String,
    /// How the relay certificate is checked.
    pub trust: ServerTrust,
}

impl RelaySettings {
    /// Look the relay's address up now: a name that does not resolve yet
    /// (no network at boot, DNS down) is an error to retry, not a reason to
    /// stop, and a relay that moves is found at its new address.
    pub async fn resolve(&self) -> Result<SocketAddr, std::io::Error> {
        tokio::net::lookup_host(self.display.as_str())
            .await?
            .next()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address found"))
    }
}

/// Check that `addr_text` has the form `HOST:PORT` (`[v6]:PORT` too)
/// without looking it up.
pub fn check_host_port(addr_text: &str) -> Result<(), String> {
    let bad = || format!("relay address {addr_text:?}: use HOST:PORT, e.g. relay.example.org:7443");
    let (host, port) = addr_text.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(())
}

/// The host part of `HOST:PORT` (`[v6]:PORT` too), for TLS name checks.
pub fn host_of(addr_text: &str) -> &str {
    let host = match addr_text.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => addr_text,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The `agentd.toml` file in the home directory.
///
/// ```toml
/// relay = "relay.example.org:7443"
/// relay_fingerprint = "sha256:3f2a…"   # or: relay_cert = "/path/ca.pem"
/// key_bits = 3072
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Relay `HOST:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    /// SHA-256 of the relay certificate (`relay fingerprint` prints it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_fingerprint: Option<String>,
    /// PEM file with the CA certificate that signed the relay's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_cert: Option<PathBuf>,
    /// RSA size for new identity keys: 2048, 3072 or 4096.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_bits: Option<usize>,
}

#[cfg(test)]
mod host_tests {
    use super::host_of;

    #[test]
    fn host_part_of_relay_addresses() {
        assert_eq!(host_of("relay.example.org:7443"), "relay.example.org");
        assert_eq!(host_of("127.0.0.1:7443"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7443"), "::1");
        assert_eq!(host_of("relay.example.org"), "relay.example.org");
    }

    #[test]
    fn relay_addresses_need_a_port() {
        use super::check_host_port;
        for good in ["relay.example.org:7443", "127.0.0.1:1", "[::1]:7443"] {
            assert!(check_host_port(good).is_ok(), "{good}");
        }
        for bad in [
            "relay.example.org",
            ":7443",
            "relay:port",
            "relay:99999",
            "",
        ] {
            assert!(check_host_port(bad).is_err(), "{bad}");
        }
    }
}
