//! Typed configuration the library runs with, and the `agentd.toml` format.
//!
//! The binary reads flags and the file and merges them (flags win); the
//! library only ever sees an [`AgentConfig`].

use std::net::SocketAddr;
use std::path::PathBuf;

use securechat_common::KeySize;
use serde::{Deserialize, Serialize};

use crate::paths::Paths;
use crate::relay_client::ServerTrust;

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
    /// As the user wrote it (for status output).
    pub display: String,
    /// Resolved UDP address.
    pub addr: SocketAddr,
    /// How the relay certificate is checked.
    pub trust: ServerTrust,
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
