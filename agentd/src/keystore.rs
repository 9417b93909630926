//! Key custody on disk: the identity key, keys replaced by rotation, the
//! inbox key, and the session token.
//!
//! `identity.key` is either plain PKCS#8 DER (starts with a DER SEQUENCE
//! byte) or passphrase-encrypted; `inbox.key` (the 32-byte key that
//! encrypts the local inbox, see `store`) is either the plain 32 bytes or
//! encrypted the same way:
//!
//! ```text
//! "SCKEY2\0" │ m KiB │ t │ p (u32 BE each) │ salt (16) │ nonce (12) │ AES-256-GCM(payload) + tag
//! ```
//!
//! The AES key is argon2id(passphrase, salt) with m = 64 MiB, t = 3, p = 1:
//! a stolen file costs an attacker 64 MiB and three passes per guess. The
//! header is the associated data, so the parameters cannot be lowered
//! without the decryption failing. Files of the first format (`SCKEY1`,
//! 19 MiB and two passes) still open; unlocking one rewrites every key file
//! with the current parameters. Every write goes through a 0600 temporary
//! file, fsync and a rename.
//!
//! Setting, changing or removing the passphrase rewrites several files
//! (`identity.key`, `identity.key.new`, `old-keys/*.key`, `inbox.key`). So that a crash
//! never leaves them under different passphrases, [`reseal_all`] stages each
//! as `<file>.reseal`, then writes `reseal.commit`, then renames the staged
//! files into place and removes the marker. [`recover_reseal`] at start
//! finishes the renames when the marker exists and deletes the staged files
//! when it does not.

use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use securechat_common::crypto::{random_bytes, CryptoError};
use securechat_common::IdentityKey;
use zeroize::Zeroizing;

use crate::files::{
    ensure_private_dir, read_optional, remove_durable, rename_durable, sync_dir, write_private,
};
use securechat_client::Paths;

const MAGIC_V1: &[u8] = b"SCKEY1\0";
const MAGIC: &[u8] = b"SCKEY2\0";
const SALT_LEN: usize = 16;
/// Length of the inbox key.
pub const INBOX_KEY_LEN: usize = 32;

/// argon2id cost parameters of a passphrase-encrypted file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KdfParams {
    m_kib: u32,
    t: u32,
    p: u32,
}

impl KdfParams {
    /// What new files use: sized for an offline attack on a stolen file.
    const CURRENT: Self = Self {
        m_kib: 64 * 1024,
        t: 3,
        p: 1,
    };
    /// The first format's fixed parameters (OWASP's interactive minimum).
    const V1: Self = Self {
        m_kib: 19 * 1024,
        t: 2,
        p: 1,
    };
    /// Refuse parameters a damaged or hostile file could use to make an
    /// unlock take forever or nothing at all.
    fn plausible(self) -> bool {
        (8 * 1024..=4 * 1024 * 1024).contains(&self.m_kib)
            && (1..=64).contains(&self.t)
            && (1..=16).contains(&self.p)
    }
}

/// The header of an encrypted file (the AEAD's associated data) and the
/// offset where the salt starts.
fn header(blob: &[u8]) -> Option<(KdfParams, &[u8])> {
    if blob.starts_with(MAGIC_V1) {
        return Some((KdfParams::V1, &blob[..MAGIC_V1.len()]));
    }
    let rest = blob.strip_prefix(MAGIC)?;
    let word = |i: usize| -> Option<u32> {
        Some(u32::from_be_bytes(
            rest.get(i * 4..i * 4 + 4)?.try_into().ok()?,
        ))
    };
    let params = KdfParams {
        m_kib: word(0)?,
        t: word(1)?,
        p: word(2)?,
    };
    Some((params, &blob[..MAGIC.len() + 12]))
}

fn is_encrypted(data: &[u8]) -> bool {
    data.starts_with(MAGIC) || data.starts_with(MAGIC_V1)
}

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
    params: KdfParams,
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
        Self::derive(passphrase, salt, KdfParams::CURRENT)
    }

    fn derive(
        passphrase: &str,
        salt: [u8; SALT_LEN],
        params: KdfParams,
    ) -> Result<Self, KeyStoreError> {
        let crypto = |e: argon2::Error| KeyStoreError::Crypto(e.to_string());
        let argon_params =
            argon2::Params::new(params.m_kib, params.t, params.p, Some(32)).map_err(crypto)?;
        let argon = argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon_params,
        );
        let mut key = Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into(passphrase.as_bytes(), &salt, key.as_mut_slice())
            .map_err(crypto)?;
        Ok(Self { salt, params, key })
    }

    /// True when this sealer came from a file of the first format, whose
    /// key derivation is weaker than today's: the caller rewrites the files.
    pub fn is_outdated(&self) -> bool {
        self.params != KdfParams::CURRENT
    }

    fn aead(&self) -> Result<LessSafeKey, KeyStoreError> {
        UnboundKey::new(&AES_256_GCM, self.key.as_slice())
            .map(LessSafeKey::new)
            .map_err(|_| KeyStoreError::Crypto("AES key".into()))
    }

    fn seal(&self, plain: &[u8]) -> Result<Vec<u8>, KeyStoreError> {
        let nonce =
            random_bytes::<NONCE_LEN>().map_err(|e| KeyStoreError::Crypto(e.to_string()))?;
        if self.is_outdated() {
            // Writing is always in today's format, never the old one.
            return Err(KeyStoreError::Crypto(
                "refusing to write a key file with outdated key derivation".into(),
            ));
        }
        let mut head = MAGIC.to_vec();
        for word in [self.params.m_kib, self.params.t, self.params.p] {
            head.extend_from_slice(&word.to_be_bytes());
        }
        let mut body = plain.to_vec();
        self.aead()?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(head.as_slice()),
                &mut body,
            )
            .map_err(|_| KeyStoreError::Crypto("encryption failed".into()))?;
        let mut out = Vec::with_capacity(head.len() + SALT_LEN + NONCE_LEN + body.len());
        out.extend_from_slice(&head);
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
        let Some((params, head)) = header(&self.blob) else {
            return Err(KeyStoreError::WrongPassphrase);
        };
        if !params.plausible() {
            return Err(KeyStoreError::Crypto(format!(
                "the key file asks for implausible key derivation costs ({params:?})"
            )));
        }
        let salt: [u8; SALT_LEN] = self
            .blob
            .get(head.len()..head.len() + SALT_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(KeyStoreError::WrongPassphrase)?;
        let sealer = Sealer::derive(passphrase, salt, params)?;
        let key = open_with(&sealer, &self.blob)?;
        Ok((key, sealer))
    }
}

/// Decrypt a sealed file's payload with `sealer` (same passphrase, salt and
/// parameters).
fn open_bytes(sealer: &Sealer, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyStoreError> {
    let (params, head) = header(blob).ok_or(KeyStoreError::WrongPassphrase)?;
    let rest = &blob[head.len()..];
    if params != sealer.params
        || rest.len() < SALT_LEN + NONCE_LEN + 16
        || rest[..SALT_LEN] != sealer.salt
    {
        return Err(KeyStoreError::WrongPassphrase);
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&rest[SALT_LEN..SALT_LEN + NONCE_LEN]);
    let mut body = Zeroizing::new(rest[SALT_LEN + NONCE_LEN..].to_vec());
    let len = sealer
        .aead()?
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(head),
            &mut body,
        )
        .map_err(|_| KeyStoreError::WrongPassphrase)?
        .len();
    body.truncate(len);
    Ok(body)
}

fn open_with(sealer: &Sealer, blob: &[u8]) -> Result<IdentityKey, KeyStoreError> {
    let plain = open_bytes(sealer, blob)?;
    IdentityKey::from_pkcs8(&plain).map_err(|_| KeyStoreError::WrongPassphrase)
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
    if is_encrypted(&data) {
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

/// Load the new key of an unfinished rotation (`identity.key.new`), sealed
/// like the identity key.
pub fn load_pending(
    path: &Path,
    sealer: Option<&Sealer>,
) -> Result<Option<IdentityKey>, KeyStoreError> {
    match load_identity(path)? {
        Loaded::Missing => Ok(None),
        Loaded::Plain(k) => Ok(Some(k)),
        Loaded::Locked(l) => match sealer {
            Some(s) => open_with(s, &l.blob).map(Some),
            None => Err(KeyStoreError::WrongPassphrase),
        },
    }
}

/// The plaintext of an identity key file: PKCS#8 DER.
pub fn identity_payload(key: &IdentityKey) -> Result<Zeroizing<Vec<u8>>, KeyStoreError> {
    key.to_pkcs8()
        .map_err(|e| KeyStoreError::Crypto(e.to_string()))
}

/// Write a key file's payload (encrypted when a sealer is given),
/// atomically, 0600.
fn save_payload(path: &Path, plain: &[u8], sealer: Option<&Sealer>) -> Result<(), KeyStoreError> {
    match sealer {
        Some(s) => write_private(path, &s.seal(plain)?),
        None => write_private(path, plain),
    }
    .map_err(io_err(path))
}

/// Write a key file (encrypted when a sealer is given), atomically, 0600.
pub fn save_key(
    path: &Path,
    key: &IdentityKey,
    sealer: Option<&Sealer>,
) -> Result<(), KeyStoreError> {
    save_payload(path, &identity_payload(key)?, sealer)
}

/// The key that encrypts the local inbox (see `store`).
#[derive(Clone)]
pub struct InboxKey(Zeroizing<[u8; INBOX_KEY_LEN]>);

impl std::fmt::Debug for InboxKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InboxKey(..)")
    }
}

impl InboxKey {
    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; INBOX_KEY_LEN] {
        &self.0
    }

    /// A fresh random key.
    pub fn generate() -> Result<Self, KeyStoreError> {
        random_bytes::<INBOX_KEY_LEN>()
            .map(|k| Self(Zeroizing::new(k)))
            .map_err(|e| KeyStoreError::Crypto(e.to_string()))
    }

    /// The plaintext of `inbox.key`.
    pub fn payload(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.0.to_vec())
    }
}

/// Load `inbox.key` (`None` if there is none yet).
pub fn load_inbox_key(
    path: &Path,
    sealer: Option<&Sealer>,
) -> Result<Option<InboxKey>, KeyStoreError> {
    let Some(data) = read_optional(path).map_err(io_err(path))? else {
        return Ok(None);
    };
    let data = Zeroizing::new(data);
    let plain = if is_encrypted(&data) {
        let sealer = sealer.ok_or(KeyStoreError::WrongPassphrase)?;
        open_bytes(sealer, &data)?
    } else {
        Zeroizing::new(data.to_vec())
    };
    let key: [u8; INBOX_KEY_LEN] = plain
        .as_slice()
        .try_into()
        .map_err(|_| KeyStoreError::Corrupt(path.to_path_buf()))?;
    Ok(Some(InboxKey(Zeroizing::new(key))))
}

/// Load `inbox.key`, or make and save one (protected by `sealer`, like the
/// identity key) if there is none yet.
pub fn load_or_create_inbox_key(
    path: &Path,
    sealer: Option<&Sealer>,
) -> Result<InboxKey, KeyStoreError> {
    if let Some(key) = load_inbox_key(path, sealer)? {
        return Ok(key);
    }
    let key = InboxKey::generate()?;
    save_payload(path, &key.payload(), sealer)?;
    Ok(key)
}

/// The file name of `key` in `old-keys/`.
pub fn archive_path(dir: &Path, key: &IdentityKey) -> PathBuf {
    dir.join(format!("{}.key", key.public_key().fingerprint().to_hex()))
}

const STAGED: &str = "reseal";

fn staged_files(paths: &Paths) -> Result<Vec<PathBuf>, KeyStoreError> {
    let mut out = Vec::new();
    for dir in [paths.home.clone(), paths.old_keys()] {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&dir)(e)),
        };
        for entry in entries {
            let path = entry.map_err(io_err(&dir))?.path();
            if path.extension().is_some_and(|x| x == STAGED) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Key files to rewrite together: each target path with its plaintext.
pub type KeyFiles = Vec<(PathBuf, Zeroizing<Vec<u8>>)>;

/// Rewrite every key file with `sealer` (`None`: unencrypted) so that a
/// crash leaves all of them under the old protection or all under the new.
/// `files` lists each target path and its plaintext payload.
pub fn reseal_all(
    paths: &Paths,
    files: &[(PathBuf, Zeroizing<Vec<u8>>)],
    sealer: Option<&Sealer>,
) -> Result<(), KeyStoreError> {
    recover_reseal(paths)?;
    let mut staged = Vec::with_capacity(files.len());
    for (target, payload) in files {
        let mut name = target.as_os_str().to_owned();
        name.push(format!(".{STAGED}"));
        let stage = PathBuf::from(name);
        if let Some(dir) = stage.parent() {
            ensure_private_dir(dir).map_err(io_err(dir))?;
        }
        save_payload(&stage, payload, sealer)?;
        staged.push((stage, target.clone()));
    }
    let marker = paths.reseal_marker();
    write_private(&marker, b"").map_err(io_err(&marker))?;
    for (stage, target) in &staged {
        std::fs::rename(stage, target).map_err(io_err(target))?;
    }
    for dir in [paths.home.clone(), paths.old_keys()] {
        if dir.is_dir() {
            sync_dir(&dir).map_err(io_err(&dir))?;
        }
    }
    remove_durable(&marker).map_err(io_err(&marker))
}

/// Finish or undo a passphrase change that a crash interrupted.
pub fn recover_reseal(paths: &Paths) -> Result<(), KeyStoreError> {
    let marker = paths.reseal_marker();
    let committed = marker.exists();
    for stage in staged_files(paths)? {
        if committed {
            let target = stage.with_extension("");
            rename_durable(&stage, &target).map_err(io_err(&target))?;
        } else {
            remove_durable(&stage).map_err(io_err(&stage))?;
        }
    }
    if committed {
        tracing::info!("finished a passphrase change that was interrupted");
    }
    remove_durable(&marker).map_err(io_err(&marker))
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
    save_key(&archive_path(dir, key), key, sealer)
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
    remove_durable(path).map_err(io_err(path))
}

/// A key file in the first format (argon2id 19 MiB, two passes, only the
/// magic as associated data), as earlier versions wrote it.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn v1_file(key: &IdentityKey, passphrase: &str) -> Vec<u8> {
    let salt = [7u8; SALT_LEN];
    let sealer = Sealer::derive(passphrase, salt, KdfParams::V1).unwrap();
    let nonce = [9u8; NONCE_LEN];
    let mut body = identity_payload(key).unwrap().to_vec();
    sealer
        .aead()
        .unwrap()
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(MAGIC_V1),
            &mut body,
        )
        .unwrap();
    [MAGIC_V1, &salt, &nonce, &body].concat()
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

    /// identity.key and two archived keys, all plain.
    fn home_with_keys(tmp: &Path) -> (Paths, Vec<IdentityKey>) {
        let paths = Paths::in_home(tmp.to_path_buf());
        let keys: Vec<IdentityKey> = (0..3)
            .map(|_| IdentityKey::generate(KeySize::Rsa2048).unwrap())
            .collect();
        save_key(&paths.identity_key(), &keys[0], None).unwrap();
        for k in &keys[1..] {
            archive_key(&paths.old_keys(), k, None).unwrap();
        }
        (paths, keys)
    }

    fn all_files(paths: &Paths, keys: &[IdentityKey]) -> Vec<(PathBuf, Zeroizing<Vec<u8>>)> {
        let mut out = vec![(paths.identity_key(), identity_payload(&keys[0]).unwrap())];
        for k in &keys[1..] {
            out.push((
                archive_path(&paths.old_keys(), k),
                identity_payload(k).unwrap(),
            ));
        }
        out
    }

    #[test]
    fn passphrase_change_is_all_or_nothing_across_a_crash() {
        let tmp = tempfile::tempdir().unwrap();
        let (paths, keys) = home_with_keys(tmp.path());
        let sealer = Sealer::new("new passphrase").unwrap();
        let files = all_files(&paths, &keys);

        // Killed after staging some files, before the commit marker: the
        // staged files are dropped and everything stays plain.
        save_key(
            &PathBuf::from(format!("{}.reseal", files[0].0.display())),
            &keys[0],
            Some(&sealer),
        )
        .unwrap();
        recover_reseal(&paths).unwrap();
        assert!(matches!(
            load_identity(&paths.identity_key()).unwrap(),
            Loaded::Plain(_)
        ));
        assert_eq!(load_old_keys(&paths.old_keys(), None).unwrap().len(), 2);
        assert!(staged_files(&paths).unwrap().is_empty());

        // Killed after the marker, with one staged file already renamed:
        // the rest are renamed at the next start; all are encrypted.
        for (target, payload) in &files {
            save_payload(
                &PathBuf::from(format!("{}.reseal", target.display())),
                payload,
                Some(&sealer),
            )
            .unwrap();
        }
        write_private(&paths.reseal_marker(), b"").unwrap();
        let first = &files[1].0;
        std::fs::rename(format!("{}.reseal", first.display()), first).unwrap();
        recover_reseal(&paths).unwrap();
        assert!(!paths.reseal_marker().exists());
        assert!(staged_files(&paths).unwrap().is_empty());
        let Loaded::Locked(locked) = load_identity(&paths.identity_key()).unwrap() else {
            panic!("identity.key should be encrypted now")
        };
        let (_, s) = locked.unlock("new passphrase").unwrap();
        assert_eq!(load_old_keys(&paths.old_keys(), Some(&s)).unwrap().len(), 2);

        // The whole operation, back to plain.
        reseal_all(&paths, &files, None).unwrap();
        assert!(matches!(
            load_identity(&paths.identity_key()).unwrap(),
            Loaded::Plain(_)
        ));
        assert_eq!(load_old_keys(&paths.old_keys(), None).unwrap().len(), 2);
        assert!(!paths.reseal_marker().exists());
    }

    #[test]
    fn pending_key_opens_with_the_identity_sealer() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("identity.key.new");
        assert!(load_pending(&path, None).unwrap().is_none());
        let key = IdentityKey::generate(KeySize::Rsa2048).unwrap();
        let sealer = Sealer::new("pass").unwrap();
        save_key(&path, &key, Some(&sealer)).unwrap();
        assert!(matches!(
            load_pending(&path, None),
            Err(KeyStoreError::WrongPassphrase)
        ));
        let got = load_pending(&path, Some(&sealer)).unwrap().unwrap();
        assert_eq!(got.public_key(), key.public_key());
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

    #[test]
    fn new_files_use_the_strong_kdf_and_old_ones_still_open() {
        let key = IdentityKey::generate(KeySize::Rsa2048).unwrap();
        let sealer = Sealer::new("pass phrase").unwrap();
        assert!(!sealer.is_outdated());
        let blob = sealer.seal(&identity_payload(&key).unwrap()).unwrap();
        let (params, _) = header(&blob).unwrap();
        assert!(params.m_kib >= 64 * 1024 && params.t >= 3, "{params:?}");

        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("identity.key");
        std::fs::write(&path, v1_file(&key, "old pass")).unwrap();
        let Loaded::Locked(locked) = load_identity(&path).unwrap() else {
            panic!("a v1 file is encrypted")
        };
        assert!(matches!(
            locked.unlock("wrong"),
            Err(KeyStoreError::WrongPassphrase)
        ));
        let (k, old_sealer) = locked.unlock("old pass").unwrap();
        assert_eq!(k.public_key(), key.public_key());
        assert!(old_sealer.is_outdated());
        // Nothing is ever written with the old parameters.
        assert!(old_sealer.seal(b"x").is_err());
    }

    #[test]
    fn lowered_kdf_parameters_do_not_open() {
        let key = IdentityKey::generate(KeySize::Rsa2048).unwrap();
        let sealer = Sealer::new("pass phrase").unwrap();
        let mut blob = sealer.seal(&identity_payload(&key).unwrap()).unwrap();
        // Claim t = 2: the header is authenticated, so this cannot decrypt.
        blob[MAGIC.len() + 7] = 2;
        let locked = LockedKey { blob };
        assert!(matches!(
            locked.unlock("pass phrase"),
            Err(KeyStoreError::WrongPassphrase)
        ));
    }

    #[test]
    fn inbox_key_is_made_once_and_sealed_like_the_identity() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("inbox.key");
        let sealer = Sealer::new("pass").unwrap();
        let made = load_or_create_inbox_key(&path, Some(&sealer)).unwrap();
        let raw = std::fs::read(&path).unwrap();
        assert!(raw.starts_with(MAGIC), "sealed with the passphrase");
        assert!(!raw.windows(8).any(|w| w == &made.as_bytes()[..8]));
        assert!(matches!(
            load_or_create_inbox_key(&path, None),
            Err(KeyStoreError::WrongPassphrase)
        ));
        let again = load_or_create_inbox_key(&path, Some(&sealer)).unwrap();
        assert_eq!(again.as_bytes(), made.as_bytes());
    }
}
