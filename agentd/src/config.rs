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
    /// The relays to use, if configured.
    pub relay: Option<RelaySettings>,
    /// Size of newly generated identity keys.
    pub key_size: KeySize,
}

/// How to reach and trust the relays.
///
/// Several relays in one list share one state (the relays' Redis) and one
/// certificate or CA, so a session made on one resumes on any other; the
/// connection manager moves on to the next when one fails.
#[derive(Clone, Debug)]
pub struct RelaySettings {
    /// The relays in the order to try them; never empty.
    pub addrs: Vec<RelayAddr>,
    /// How every relay's certificate is checked: one pin or one CA for all.
    pub trust: ServerTrust,
}

impl RelaySettings {
    /// The list as `--relay` takes it, `a.example.org:7443,b.example.org:7443`
    /// (one address alone for a single relay).
    pub fn list(&self) -> String {
        let names: Vec<&str> = self.addrs.iter().map(|a| a.display.as_str()).collect();
        names.join(",")
    }
}

/// One relay of the list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayAddr {
    /// `HOST:PORT` as the user wrote it; resolved again at every connection
    /// attempt (see [`RelayAddr::resolve`]).
    pub display: String,
    /// The host name the relay's certificate must carry when it is checked
    /// against a CA ([`ServerTrust::CaCert`]); ignored for a pinned one.
    pub server_name: String,
}

impl RelayAddr {
    /// Check the form of one `HOST:PORT` (not looked up yet).
    pub fn parse(addr_text: &str) -> Result<Self, String> {
        check_host_port(addr_text)?;
        Ok(Self {
            display: addr_text.to_string(),
            server_name: host_of(addr_text).to_string(),
        })
    }

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

/// Parse the `relay` setting: one `HOST:PORT`, or several separated by
/// commas (spaces around them are allowed). Only the form is checked: the
/// names are looked up at each connection attempt, so a relay that does not
/// resolve yet is retried rather than fatal. The error names the bad entry.
pub fn parse_relay_list(text: &str) -> Result<Vec<RelayAddr>, String> {
    let entries: Vec<&str> = text.split(',').map(str::trim).collect();
    if let [one] = entries.as_slice() {
        return Ok(vec![RelayAddr::parse(one)?]);
    }
    let example = "a.example.org:7443,b.example.org:7443";
    let mut addrs: Vec<RelayAddr> = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let n = i + 1;
        if entry.is_empty() {
            return Err(format!(
                "relay list {text:?}: entry {n} is empty; separate the relays with single \
                 commas, e.g. {example}"
            ));
        }
        let addr =
            RelayAddr::parse(entry).map_err(|e| format!("relay list {text:?}, entry {n}: {e}"))?;
        if addrs.contains(&addr) {
            return Err(format!(
                "relay list {text:?}: {entry} is listed twice; name each relay once"
            ));
        }
        addrs.push(addr);
    }
    Ok(addrs)
}

/// Check that `addr_text` has the form `HOST:PORT` (`[v6]:PORT` too)
/// without looking it up.
pub fn check_host_port(addr_text: &str) -> Result<(), String> {
    let bad = || format!("relay address {addr_text:?}: use HOST:PORT, e.g. relay.example.org:7443");
    let (host, port) = addr_text.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(char::is_whitespace) || port.parse::<u16>().is_err() {
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
/// relay = "relay.example.org:7443"     # several: "a.example.org:7443,b.example.org:7443"
/// relay_fingerprint = "sha256:3f2a…"   # or: relay_cert = "/path/ca.pem"
/// key_bits = 3072
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Relay `HOST:PORT`, or several relays sharing one state as
    /// `HOST:PORT,HOST:PORT` (one string, so files of earlier versions,
    /// with one address, read the same; see [`parse_relay_list`]).
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod list_tests {
    use super::{parse_relay_list, ConfigFile};

    fn names(text: &str) -> Vec<String> {
        parse_relay_list(text)
            .unwrap()
            .into_iter()
            .map(|a| a.display)
            .collect()
    }

    #[test]
    fn one_address_is_a_list_of_one() {
        assert_eq!(names("relay.example.org:7443"), ["relay.example.org:7443"]);
        let one = parse_relay_list("[::1]:7443").unwrap();
        assert_eq!(one[0].server_name, "::1");
    }

    #[test]
    fn several_relays_in_order_spaces_allowed() {
        let list = "a.example.org:7443, b.example.org:7444 ,[::1]:7445";
        assert_eq!(
            names(list),
            ["a.example.org:7443", "b.example.org:7444", "[::1]:7445"]
        );
        let addrs = parse_relay_list(list).unwrap();
        assert_eq!(addrs[1].server_name, "b.example.org");
    }

    #[test]
    fn bad_entries_are_named() {
        for (list, says) in [
            ("a:7443,,b:7443", "entry 2 is empty"),
            ("a:7443,", "entry 2 is empty"),
            (",a:7443", "entry 1 is empty"),
            ("a:7443,b:99999", "entry 2: relay address \"b:99999\""),
            ("a:7443,b", "entry 2: relay address \"b\""),
            ("a:7443,b:port", "\"b:port\": use HOST:PORT"),
            ("a :7443,b:7443", "entry 1: relay address \"a :7443\""),
            ("a:7443,a:7443", "a:7443 is listed twice"),
            ("", "relay address \"\": use HOST:PORT"),
            ("relay.example.org", "use HOST:PORT, e.g."),
        ] {
            let e = parse_relay_list(list).unwrap_err();
            assert!(e.contains(says), "{list:?}: {e:?} lacks {says:?}");
        }
    }

    #[test]
    fn an_old_agentd_toml_with_one_relay_still_loads() {
        let old = "relay = \"relay.example.org:7443\"\n\
                   relay_fingerprint = \"sha256:00\"\nkey_bits = 3072\n";
        let file: ConfigFile = toml::from_str(old).unwrap();
        assert_eq!(file.relay.as_deref(), Some("relay.example.org:7443"));
        assert_eq!(
            names(file.relay.as_deref().unwrap()),
            ["relay.example.org:7443"]
        );
    }

    #[test]
    fn a_saved_list_reads_back_the_same() {
        let file = ConfigFile {
            relay: Some("a.example.org:7443,b.example.org:7443".into()),
            relay_fingerprint: Some("sha256:00".into()),
            ..ConfigFile::default()
        };
        let text = toml::to_string(&file).unwrap();
        assert!(
            text.contains("relay = \"a.example.org:7443,b.example.org:7443\""),
            "{text}"
        );
        let back: ConfigFile = toml::from_str(&text).unwrap();
        assert_eq!(back, file);
        assert_eq!(
            names(back.relay.as_deref().unwrap()),
            ["a.example.org:7443", "b.example.org:7443"]
        );
    }
}
