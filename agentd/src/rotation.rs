//! Key rotation that survives a crash at any point.
//!
//! `rotate-key` writes the new key to `identity.key.new` before the relay
//! sees it, so the new key exists on disk whenever the relay may hold it:
//!
//! ```text
//! identity.key.new ─► full login (old key) ─► PublishKey ─► session token
//!   ─► old key archived in old-keys/ ─► identity.key.new renamed over identity.key
//! ```
//!
//! A start that finds `identity.key.new` does not know which key the relay
//! holds. The next resume (or login) finds out: it signs with the current
//! key, and when the relay refuses that signature, with the pending key.
//!
//! * the pending key is accepted: the rotation is finished (archive, rename);
//! * the current key is accepted and the directory lists it: the relay never
//!   took the pending key, so nothing can be sealed to it; it is deleted.
//!
//! Both steps are idempotent, so a crash during either is repaired by the
//! next start in the same way.

use std::sync::Arc;

use securechat_common::protocol::ErrorCode;
use securechat_common::IdentityKey;

use crate::agent::{Agent, Keys, ReadyKeys};
use crate::files::{remove_durable, rename_durable};
use crate::keystore::{self, KeyStoreError};
use securechat_client::relay::{ClientError, LoggedIn, RelayClient};

/// Whether a relay error means "this signature is not by the account key".
fn wrong_key(e: &ClientError) -> bool {
    matches!(e, ClientError::Relay(r) if r.code == ErrorCode::InvalidSignature)
}

/// Make `new` the identity key on disk and in memory: archive the current
/// key, then rename `identity.key.new` (which must hold `new`) over
/// `identity.key`. Idempotent.
pub(crate) fn finish(agent: &Agent, new: &Arc<IdentityKey>) -> Result<ReadyKeys, KeyStoreError> {
    let _guard = agent.rotation_guard();
    let keys = agent
        .ready_keys()
        .map_err(|_| KeyStoreError::Crypto("the identity key is locked".into()))?;
    if keys.current.public_key() == new.public_key() {
        return Ok(keys);
    }
    let paths = &agent.config.paths;
    let pending = paths.pending_key();
    if !pending_file_holds(agent, new, Some(&keys)) {
        return Err(KeyStoreError::Corrupt(pending));
    }
    keystore::archive_key(&paths.old_keys(), &keys.current, keys.sealer.as_deref())?;
    rename_durable(&pending, &paths.identity_key()).map_err(|source| KeyStoreError::Io {
        path: pending.clone(),
        source,
    })?;
    let mut old = keys.old.clone();
    if !old
        .iter()
        .any(|k| k.public_key() == keys.current.public_key())
    {
        old.push(keys.current.clone());
    }
    let ready = ReadyKeys {
        current: new.clone(),
        old,
        pending: None,
        sealer: keys.sealer.clone(),
        inbox: keys.inbox.clone(),
    };
    agent.set_keys(Keys::Ready(ready.clone()));
    tracing::info!(
        "identity key rotated: {} -> {}",
        keys.current.public_key().fingerprint(),
        new.public_key().fingerprint()
    );
    Ok(ready)
}

/// Whether `identity.key.new` holds `key` (a file that does not open counts
/// as someone else's: it is never deleted on a guess).
fn pending_file_holds(agent: &Agent, key: &IdentityKey, keys: Option<&ReadyKeys>) -> bool {
    let sealer = keys.and_then(|k| k.sealer.as_deref());
    match keystore::load_pending(&agent.config.paths.pending_key(), sealer) {
        Ok(Some(k)) => k.public_key() == key.public_key(),
        _ => false,
    }
}

/// Delete the pending key `key`: the relay does not hold it and never did,
/// so nothing can be sealed to it. Idempotent; leaves any other key alone.
pub(crate) fn abandon(agent: &Agent, key: &IdentityKey) -> Result<(), KeyStoreError> {
    let _guard = agent.rotation_guard();
    let keys = agent.ready_keys().ok();
    let path = agent.config.paths.pending_key();
    if pending_file_holds(agent, key, keys.as_ref()) {
        remove_durable(&path).map_err(|source| KeyStoreError::Io {
            path: path.clone(),
            source,
        })?;
        tracing::info!(
            "unfinished key rotation undone: the relay kept the current key ({} dropped)",
            key.public_key().fingerprint()
        );
    }
    if let Some(keys) = keys {
        if keys
            .pending
            .as_ref()
            .is_some_and(|p| p.public_key() == key.public_key())
        {
            agent.set_keys(Keys::Ready(ReadyKeys {
                pending: None,
                ..keys
            }));
        }
    }
    Ok(())
}

/// Write `key` as the pending key of a new rotation, unless one is there.
/// `false`: an earlier rotation is still unsettled.
pub(crate) fn begin(agent: &Agent, key: &IdentityKey) -> Result<bool, KeyStoreError> {
    let _guard = agent.rotation_guard();
    let path = agent.config.paths.pending_key();
    let keys = agent
        .ready_keys()
        .map_err(|_| KeyStoreError::Crypto("the identity key is locked".into()))?;
    if keys.pending.is_some() || path.exists() {
        return Ok(false);
    }
    keystore::save_key(&path, key, keys.sealer.as_deref())?;
    Ok(true)
}

/// Keep `key` as pending in memory too, so that the next connection settles
/// it (after the relay's answer to `PublishKey` was lost).
pub(crate) fn keep_pending(agent: &Agent, key: &Arc<IdentityKey>) {
    let _guard = agent.rotation_guard();
    if let Ok(keys) = agent.ready_keys() {
        agent.set_keys(Keys::Ready(ReadyKeys {
            pending: Some(key.clone()),
            ..keys
        }));
    }
}

/// After a login with the current key while a pending key exists: confirm
/// in the directory that the relay holds the current key, then forget the
/// pending one. Any doubt keeps it for the next connection.
async fn settle_current(agent: &Agent, client: &RelayClient, username: &str, keys: &ReadyKeys) {
    match agent.directory_key(client, username).await {
        Ok(k) if &k == keys.current.public_key() => {
            let Some(pending) = &keys.pending else { return };
            if let Err(e) = abandon(agent, pending) {
                agent.note_error(format!("undoing the unfinished rotation: {e}"));
            }
        }
        Ok(k) => tracing::warn!(
            "the directory lists {} for us, neither of our keys; keeping both",
            k.fingerprint()
        ),
        Err(e) => tracing::warn!("cannot check our key in the directory yet: {e}"),
    }
}

/// Settle what signing with the current key taught us, or sign again with
/// the pending key when the relay refused the current one. `attempt` runs
/// one resume or login with the given key.
pub(crate) async fn with_either_key<F, Fut>(
    agent: &Agent,
    client: &RelayClient,
    username: &str,
    keys: &ReadyKeys,
    attempt: F,
) -> Result<LoggedIn, ClientError>
where
    F: Fn(Arc<IdentityKey>) -> Fut,
    Fut: std::future::Future<Output = Result<LoggedIn, ClientError>>,
{
    let first = attempt(keys.current.clone()).await;
    let Some(pending) = keys.pending.clone() else {
        return first;
    };
    match first {
        Ok(done) => {
            settle_current(agent, client, username, keys).await;
            Ok(done)
        }
        Err(e) if wrong_key(&e) => {
            let done = attempt(pending.clone()).await?;
            finish(agent, &pending).map_err(|e| {
                agent.note_error(format!("finishing the key rotation: {e}"));
                ClientError::Unexpected(format!("finishing the key rotation: {e}"))
            })?;
            Ok(done)
        }
        Err(e) => Err(e),
    }
}
