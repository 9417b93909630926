//! Where agentd keeps its files and its socket; chat-cli uses the same rule.
//!
//! ```text
//! home (0700)   --home DIR | $SECURECHAT_HOME | $XDG_DATA_HOME/securechat
//! ├── identity.key    PKCS#8 DER, 0600 (or passphrase-encrypted)
//! ├── identity.key.new  a rotation in flight: the new key, until the relay
//! │                   is known to hold it (then renamed over identity.key)
//! ├── reseal.commit   a passphrase change in flight: `*.reseal` files are
//! │                   renamed over their targets (see keystore)
//! ├── old-keys/       keys replaced by rotate-key, to open older messages
//! ├── agent.redb      inbox, pinned keys, seen ids, held messages
//! ├── session         session token, 0600
//! ├── agentd.toml     relay address and certificate pin
//! └── agentd.socket   while agentd runs: the path of its socket, so that
//!                     chat-cli and a second agentd can find it
//! socket        $SECURECHAT_SOCKET (agentd: --socket) if set,
//!               else <home>/agent.sock when a home was given explicitly,
//!               else $XDG_RUNTIME_DIR/securechat/agent.sock (directory 0700),
//!               else <home>/agent.sock
//! ```
//!
//! `su -`, cron and some ssh sessions have no `XDG_RUNTIME_DIR`, so agentd
//! and chat-cli may not start from the same rule; chat-cli therefore tries
//! every place agentd may have used ([`socket_candidates`]).

use std::path::{Path, PathBuf};

/// Environment variable that names the home directory.
pub const HOME_ENV: &str = "SECURECHAT_HOME";

/// Environment variable that names the socket (both agentd and chat-cli).
pub const SOCKET_ENV: &str = "SECURECHAT_SOCKET";

/// Why the paths could not be worked out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// Neither a home was given nor could the XDG data directory be found.
    #[error("cannot find a home directory; pass --home DIR or set SECURECHAT_HOME")]
    NoHome,
}

/// The resolved locations of agentd's files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paths {
    /// The home directory.
    pub home: PathBuf,
    /// The local socket.
    pub socket: PathBuf,
}

impl Paths {
    /// Resolve the paths. `home` is the `--home` flag or `SECURECHAT_HOME`
    /// (clap reads both); when it is `None` the XDG defaults apply.
    pub fn resolve(home: Option<PathBuf>) -> Result<Self, PathError> {
        match home {
            Some(home) => Ok(Self::in_home(home)),
            None => {
                let dirs = directories::BaseDirs::new().ok_or(PathError::NoHome)?;
                let home = dirs.data_dir().join("securechat");
                let socket = match dirs.runtime_dir() {
                    Some(run) => run.join("securechat").join("agent.sock"),
                    None => home.join("agent.sock"),
                };
                Ok(Self { home, socket })
            }
        }
    }

    /// Everything inside `home`, the socket included.
    pub fn in_home(home: PathBuf) -> Self {
        let socket = home.join("agent.sock");
        Self { home, socket }
    }

    /// The identity key file.
    pub fn identity_key(&self) -> PathBuf {
        self.home.join("identity.key")
    }

    /// The new key of a rotation that has not finished yet.
    pub fn pending_key(&self) -> PathBuf {
        self.home.join("identity.key.new")
    }

    /// Marker that makes a passphrase change's staged files final.
    pub fn reseal_marker(&self) -> PathBuf {
        self.home.join("reseal.commit")
    }

    /// Directory of keys replaced by `rotate-key`.
    pub fn old_keys(&self) -> PathBuf {
        self.home.join("old-keys")
    }

    /// The key that encrypts the inbox (protected like the identity key).
    pub fn inbox_key(&self) -> PathBuf {
        self.home.join("inbox.key")
    }

    /// The redb database.
    pub fn database(&self) -> PathBuf {
        self.home.join("agent.redb")
    }

    /// The session token file.
    pub fn session(&self) -> PathBuf {
        self.home.join("session")
    }

    /// The configuration file.
    pub fn config_file(&self) -> PathBuf {
        self.home.join("agentd.toml")
    }

    /// The socket's directory.
    pub fn socket_dir(&self) -> &Path {
        self.socket.parent().unwrap_or(Path::new("/"))
    }

    /// The file in which a running agentd records its socket's path.
    pub fn running_file(&self) -> PathBuf {
        self.home.join("agentd.socket")
    }

    /// The socket path a running agentd recorded in [`Paths::running_file`],
    /// if any (it may be stale after a crash).
    pub fn recorded_socket(&self) -> Option<PathBuf> {
        let text = std::fs::read_to_string(self.running_file()).ok()?;
        let line = text.lines().next()?.trim();
        (!line.is_empty()).then(|| PathBuf::from(line))
    }
}

/// Every place agentd's socket may be, in the order chat-cli tries them.
/// `home` is the explicit home (`--home` or `SECURECHAT_HOME`), `socket`
/// the explicit socket (`SECURECHAT_SOCKET`): when that is given it is the
/// only candidate.
///
/// Otherwise: the socket a running agentd of this home recorded, then,
/// for an explicit home, `<home>/agent.sock`; for the default home,
/// `$XDG_RUNTIME_DIR/securechat/agent.sock`, `/run/user/<uid>/securechat/agent.sock`
/// (where a service's socket is when this shell has no `XDG_RUNTIME_DIR`)
/// and `<home>/agent.sock` (where agentd puts it without one).
pub fn socket_candidates(
    home: Option<PathBuf>,
    socket: Option<PathBuf>,
) -> Result<Vec<PathBuf>, PathError> {
    if let Some(socket) = socket {
        return Ok(vec![socket]);
    }
    let explicit = home.is_some();
    let paths = Paths::resolve(home)?;
    let mut out = Vec::new();
    let mut push = |p: PathBuf| {
        if !out.contains(&p) {
            out.push(p);
        }
    };
    if let Some(recorded) = paths.recorded_socket() {
        push(recorded);
    }
    if !explicit {
        push(paths.socket.clone());
        let uid = rustix::process::geteuid().as_raw();
        push(
            Path::new("/run/user")
                .join(uid.to_string())
                .join("securechat/agent.sock"),
        );
    }
    push(paths.home.join("agent.sock"));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_home_holds_the_socket() {
        let p = Paths::resolve(Some("/tmp/x".into())).unwrap();
        assert_eq!(p.socket, Path::new("/tmp/x/agent.sock"));
        assert_eq!(p.socket_dir(), Path::new("/tmp/x"));
        assert_eq!(p.identity_key(), Path::new("/tmp/x/identity.key"));
    }

    #[test]
    fn an_explicit_socket_is_the_only_candidate() {
        let c = socket_candidates(Some("/tmp/x".into()), Some("/tmp/s.sock".into())).unwrap();
        assert_eq!(c, vec![PathBuf::from("/tmp/s.sock")]);
    }

    #[test]
    fn an_explicit_home_looks_at_the_recorded_socket_then_its_own() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().to_path_buf();
        let c = socket_candidates(Some(home.clone()), None).unwrap();
        assert_eq!(c, vec![home.join("agent.sock")]);
        let p = Paths::in_home(home.clone());
        std::fs::write(p.running_file(), "/run/elsewhere/agent.sock\n").unwrap();
        let c = socket_candidates(Some(home.clone()), None).unwrap();
        assert_eq!(
            c,
            vec![
                PathBuf::from("/run/elsewhere/agent.sock"),
                home.join("agent.sock")
            ]
        );
    }
}
