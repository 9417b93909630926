//! Key custody on disk: the identity key, keys replaced by rotation, and the
//! session token.
//!
//! `identity.key` is either plain PKCS#8 DER (starts with a DER SEQUENCE
//! byte) or passphrase-encrypted:
//!
//! ```text
//! "SCKEY1\0" │ salt (16) │ nonce (12) │ AES-256-GCM(PKCS#8 DER) + tag
//! ```
//!
//! The AES key is argon2id(passphrase, salt) with OWASP parameters. Every
//! write goes through a 0600 temporary file and a rename.

use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use securechat_common::crypto::{random_bytes, CryptoError};
use securechat_common::IdentityKey;
use zeroize::Zeroizing;

use crate::files::{ensure_private_dir, read_optional, write_private};

const MAGIC: &[u8] = b"SCKEY1\0";
const SALT_LEN: usize = 16;

/// Why a key or session file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyStoreError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The passphrase does not decrypt the key.
    #[error("wrong passphrase")]
    WrongPassphrase,
    /// The file is damaged or not a key.
    #[error("{0} is not a usable identity key")]
    Corrupt(PathBuf),
    /// Key derivation or encryption failed.
    #[error("key protection failed: {0}")]
    Crypto(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeyStoreError + '_ {
    move |source| KeyStoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A passphrase-derived key that encrypts key files.
pub struct Sealer {
    salt: [u8; SALT_LEN],
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    /// Derive a sealer from a passphrase with a fresh salt.
    pub fn new(passphrase: &str) -> Result<Self, KeyStoreError> {
        let salt = random_bytes::<SALT_LEN>().map_err(|e| KeyStoreError::Crypto(e.to_string()))?;
        Self::derive(passphrase, salt)
    }

    fn derive(passphrase: &str, salt: [u8; SALT_LEN]) -> Result<Self, KeyStoreError> {
        let crypto = |e: argon2::Error| KeyStoreError::Crypto(e.to_string());
        // OWASP: argon2id, 19 MiB, 2 iterations, 1 lane.
        let params = argon2::Params::new(19 * 1024, 2, 1, Some(32)).map_err(crypto)?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut key = Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into(passphrase.as_bytes(), &salt, key.as_mut_slice())
            .map_err(crypto)?;
        Ok(Self { salt, key })
    }

    fn aead(&self) -> Result<LessSafeKey, KeyStoreError> {
        UnboundKey::new(&AES_256_GCM, self.key.as_slice())
            .map(LessSafeKey::new)
            .map_err(|_| KeyStoreError::Crypto("AES key".into()))
    }

    fn seal(&self, plain: &[u8]) -> Result<Vec<u8>, KeyStoreError> {
        let nonce =
            random_bytes::<NONCE_LEN>().map_err(|e| KeyStoreError::Crypto(e.to_string()))?;
        let mut body = plain.to_vec();
        self.aead()?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(MAGIC),
                &mut body,
            )
            .map_err(|_| KeyStoreError::Crypto("encryption failed".into()))?;
        let mut out = Vec::with_capacity(MAGIC.len() + SALT_LEN + NONCE_LEN + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        // The plaintext copy was encrypted in place; nothing secret is left.
        Ok(out)
    }
}

/// A key file that is encrypted and waits for its passphrase.
#[derive(Clone)]
pub struct LockedKey {
    blob: Vec<u8>,
}

impl std::fmt::Debug for LockedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LockedKey(..)")
    }
}

impl LockedKey {
    /// Decrypt with `passphrase`, returning the key and the sealer that
    /// re-encrypts files with the same passphrase.
    pub fn unlock(&self, passphrase: &str) -> Result<(IdentityKey, Sealer), KeyStoreError> {
        let rest = &self.blob[MAGIC.len()..];
        if rest.len() < SALT_LEN + NONCE_LEN + 16 {
            return Err(KeyStoreError::WrongPassphrase);
        }
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&rest[..SALT_LEN]);
        let sealer = Sealer::derive(passphrase, salt)?;
        let key = open_with(&sealer, &self.blob)?;
        Ok((key, sealer))
    }
}

fn open_with(sealer: &Sealer, blob: &[u8]) -> Result<IdentityKey, KeyStoreError> {
    let rest = blob
        .get(MAGIC.len()..)
        .ok_or(KeyStoreError::WrongPassphrase)?;
    if rest.len() < SALT_LEN + NONCE_LEN + 16 || rest[..SALT_LEN] != sealer.salt {
        return Err(KeyStoreError::WrongPassphrase);
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&rest[SALT_LEN..SALT_LEN + NONCE_LEN]);
    let mut body = Zeroizing::new(rest[SALT_LEN + NONCE_LEN..].to_vec());
    let plain = sealer
        .aead()?
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(MAGIC),
            &mut body,
        )
        .map_err(|_| KeyStoreError::WrongPassphrase)?;
    IdentityKey::from_pkcs8(plain).map_err(|_| KeyStoreError::WrongPassphrase)
}

/// What is on disk for the identity key.
#[derive(Debug)]
pub enum Loaded {
    /// No key yet (generated on `register`).
    Missing,
    /// An unencrypted key.
    Plain(IdentityKey),
    /// An encrypted key; needs `unlock`.
    Locked(LockedKey),
}

fn parse(path: &Path, data: Vec<u8>) -> Result<Loaded, KeyStoreError> {
    let data = Zeroizing::new(data);
    if data.starts_with(MAGIC) {
        return Ok(Loaded::Locked(LockedKey {
            blob: data.to_vec(),
        }));
    }
    IdentityKey::from_pkcs8(&data)
        .map(Loaded::Plain)
        .map_err(|_: CryptoError| KeyStoreError::Corrupt(path.to_path_buf()))
}

/// Load the identity key file.
pub fn load_identity(path: &Path) -> Result<Loaded, KeyStoreError> {
    match read_optional(path).map_err(io_err(path))? {
        None => Ok(Loaded::Missing),
        Some(data) => parse(path, data),
    }
}

/// Write a key file (encrypted when a sealer is given), atomically, 0600.
pub fn save_key(
    path: &Path,
    key: &IdentityKey,
    sealer: Option<&Sealer>,
) -> Result<(), KeyStoreError> {
    let der = key
        .to_pkcs8()
        .map_err(|e| KeyStoreError::Crypto(e.to_string()))?;
    let bytes = match sealer {
        Some(s) => Zeroizing::new(s.seal(&der)?),
        None => der,
    };
    write_private(path, &bytes).map_err(io_err(path))
}

/// Load every key in `old-keys/`; encrypted ones need `sealer`.
pub fn load_old_keys(
    dir: &Path,
    sealer: Option<&Sealer>,
) -> Result<Vec<IdentityKey>, KeyStoreError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "key"))
        .collect();
    paths.sort();
    for path in paths {
        let data = std::fs::read(&path).map_err(io_err(&path))?;
        match parse(&path, data)? {
            Loaded::Plain(k) => out.push(k),
            Loaded::Locked(l) => match sealer {
                Some(s) => out.push(open_with(s, &l.blob)?),
                None => return Err(KeyStoreError::WrongPassphrase),
            },
            Loaded::Missing => {}
        }
    }
    Ok(out)
}

/// Save `key` into `old-keys/` under a new name.
pub fn archive_key(
    dir: &Path,
    key: &IdentityKey,
    sealer: Option<&Sealer>,
) -> Result<(), KeyStoreError> {
    ensure_private_dir(dir).map_err(io_err(dir))?;
    let name = format!("{}.key", key.public_key().fingerprint().to_hex());
    save_key(&dir.join(name), key, sealer)
}

/// A stored session: who is logged in and the token to resume with.
pub struct Session {
    /// Account name.
    pub username: String,
    /// The relay's session token.
    pub token: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Read the session file (`username` line, hex token line).
pub fn load_session(path: &Path) -> Result<Option<Session>, KeyStoreError> {
    let Some(data) = read_optional(path).map_err(io_err(path))? else {
        return Ok(None);
    };
    let data = Zeroizing::new(data);
    let text = std::str::from_utf8(&data).map_err(|_| KeyStoreError::Corrupt(path.into()))?;
    let mut lines = text.lines();
    let (Some(username), Some(token)) = (lines.next(), lines.next()) else {
        return Err(KeyStoreError::Corrupt(path.into()));
    };
    let token =
        Zeroizing::new(hex::decode(token.trim()).map_err(|_| KeyStoreError::Corrupt(path.into()))?);
    Ok(Some(Session {
        username: username.trim().to_string(),
        token,
    }))
}

/// Write the session file (0600).
pub fn save_session(path: &Path, session: &Session) -> Result<(), KeyStoreError> {
    let text = Zeroizing::new(format!(
        "{}\n{}\n",
        session.username,
        hex::encode(session.token.as_slice())
    ));
    write_private(path, text.as_bytes()).map_err(io_err(path))
}

/// Delete the session file.
pub fn remove_session(path: &Path) -> Result<(), KeyStoreError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use securechat_common::KeySize;

    #[test]
    fn plain_and_encrypted_keys_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("identity.key");
        assert!(matches!(load_identity(&path).unwrap(), Loaded::Missing));
        let key = IdentityKey::generate(KeySize::Rsa2048).unwrap();
        save_key(&path, &key, None).unwrap();
        let Loaded::Plain(again) = load_identity(&path).unwrap() else {
            panic!("not plain")
        };
        assert_eq!(again.public_key(), key.public_key());

        let sealer = Sealer::new("correct horse").unwrap();
        save_key(&path, &key, Some(&sealer)).unwrap();
        let Loaded::Locked(locked) = load_identity(&path).unwrap() else {
            panic!("not locked")
        };
        assert!(matches!(
            locked.unlock("wrong"),
            Err(KeyStoreError::WrongPassphrase)
        ));
        let (k, s) = locked.unlock("correct horse").unwrap();
        assert_eq!(k.public_key(), key.public_key());
        let old = tmp.path().join("old");
        archive_key(&old, &k, Some(&s)).unwrap();
        assert_eq!(load_old_keys(&old, Some(&s)).unwrap().len(), 1);
    }

    #[test]
    fn session_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("session");
        assert!(load_session(&path).unwrap().is_none());
        save_session(
            &path,
            &Session {
                username: "alice".into(),
                token: Zeroizing::new(vec![1, 2, 3]),
            },
        )
        .unwrap();
        let s = load_session(&path).unwrap().unwrap();
        assert_eq!(
            (s.username.as_str(), s.token.as_slice()),
            ("alice", &[1u8, 2, 3][..])
        );
        remove_session(&path).unwrap();
        assert!(load_session(&path).unwrap().is_none());
    }
}
