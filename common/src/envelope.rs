//! Sealed, signed messages: what the relay stores and forwards without being
//! able to read.
//!
//! Sealing a message for a recipient:
//!
//! 1. a fresh 256-bit key encrypts the body with AES-256-GCM; the header
//!    (version, id, sender, recipient, sequence number, timestamp) is the
//!    associated data;
//! 2. that key is wrapped with RSA-OAEP-SHA256 for the recipient's key;
//! 3. the sender signs, with RSA-PSS-SHA256, a transcript binding version,
//!    id, sender, recipient, sequence number, timestamp, wrapped key, nonce
//!    and ciphertext.
//!
//! Opening checks the recipient name, then the signature, and only then
//! decrypts: a relay that re-addresses, replays into another conversation or
//! alters any byte is caught before any plaintext exists.
//!
//! The sequence number counts the sender's messages to this recipient
//! (1, 2, 3, …). It is signed, so the relay cannot change it: the
//! recipient's agent sees a message the relay dropped as a gap, a reordered
//! one as late, and a replayed one as a number it has seen already.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{put_field, random_bytes, CryptoError, IdentityKey, PublicKey};
use crate::limits::{MAX_CIPHERTEXT_LEN, MAX_MESSAGE_LEN, MAX_RSA_OUTPUT_LEN, USERNAME_LEN};

/// Envelope format version.
pub const ENVELOPE_VERSION: u8 = 2;

/// A message id: 16 random bytes chosen by the sender; the relay and the
/// recipient deduplicate on it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId(pub [u8; 16]);

impl MessageId {
    /// A fresh random id.
    pub fn random() -> Result<Self, CryptoError> {
        random_bytes().map(Self)
    }

    /// Parse the 32-hex-digit form.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }
}

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// A sealed and signed message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// [`ENVELOPE_VERSION`].
    pub version: u8,
    /// Unique id chosen by the sender.
    pub id: MessageId,
    /// Sender's username.
    pub sender: String,
    /// Recipient's username.
    pub recipient: String,
    /// The sender's count of messages to this recipient, from 1.
    pub seq: u64,
    /// Sender's clock at sealing, Unix milliseconds.
    pub timestamp_ms: u64,
    /// The message key, RSA-OAEP-SHA256 encrypted for the recipient.
    pub wrapped_key: Vec<u8>,
    /// AES-GCM nonce.
    pub nonce: [u8; NONCE_LEN],
    /// AES-256-GCM ciphertext of the body, tag included.
    pub ciphertext: Vec<u8>,
    /// Sender's RSA-PSS-SHA256 signature over [`Envelope::signed_bytes`].
    pub signature: Vec<u8>,
}

impl Envelope {
    /// The associated data of the body cipher: every header field.
    fn header_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.sender.len() + self.recipient.len());
        out.extend_from_slice(b"securechat-envelope-v2\0");
        out.push(self.version);
        out.extend_from_slice(&self.id.0);
        put_field(&mut out, self.sender.as_bytes());
        put_field(&mut out, self.recipient.as_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.timestamp_ms.to_be_bytes());
        out
    }

    /// The bytes the sender signs: the header plus every sealed field.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = self.header_bytes();
        put_field(&mut out, &self.wrapped_key);
        out.extend_from_slice(&self.nonce);
        put_field(&mut out, &self.ciphertext);
        out
    }

    /// Structural checks that need no key: version and every size bound.
    ///
    /// The relay runs this on every submitted envelope; `open` runs it too.
    pub fn check_shape(&self) -> Result<(), CryptoError> {
        let bad = |what: &str| Err(CryptoError::Malformed(what.to_string()));
        if self.version != ENVELOPE_VERSION {
            return bad("unknown envelope version");
        }
        if self.seq == 0 {
            return bad("sequence number 0 (they start at 1)");
        }
        for name in [&self.sender, &self.recipient] {
            if !USERNAME_LEN.contains(&name.chars().count()) {
                return bad("sender or recipient name out of bounds");
            }
        }
        if self.wrapped_key.is_empty() || self.wrapped_key.len() > MAX_RSA_OUTPUT_LEN {
            return bad("wrapped key size out of bounds");
        }
        if self.signature.is_empty() || self.signature.len() > MAX_RSA_OUTPUT_LEN {
            return bad("signature size out of bounds");
        }
        if self.ciphertext.len() < AES_256_GCM.tag_len() {
            return bad("ciphertext shorter than the AEAD tag");
        }
        if self.ciphertext.len() > MAX_CIPHERTEXT_LEN {
            return Err(CryptoError::TooLarge(
                self.ciphertext.len() - AES_256_GCM.tag_len(),
            ));
        }
        Ok(())
    }
}

/// Everything needed to seal one message.
#[derive(Debug)]
pub struct SealParams<'a> {
    /// The sender's identity key (signs).
    pub sender_key: &'a IdentityKey,
    /// The sender's username.
    pub sender: &'a str,
    /// The recipient's username.
    pub recipient: &'a str,
    /// The recipient's (pinned) public key.
    pub recipient_key: &'a PublicKey,
    /// The message id.
    pub id: MessageId,
    /// The sender's sequence number for this recipient (from 1).
    pub seq: u64,
    /// Unix milliseconds.
    pub timestamp_ms: u64,
}

/// Encrypt `plaintext` for the recipient and sign it.
pub fn seal(params: &SealParams<'_>, plaintext: &[u8]) -> Result<Envelope, CryptoError> {
    if plaintext.len() > MAX_MESSAGE_LEN {
        return Err(CryptoError::TooLarge(plaintext.len()));
    }
    let key = Zeroizing::new(random_bytes::<32>()?);
    let nonce = random_bytes::<NONCE_LEN>()?;
    let mut env = Envelope {
        version: ENVELOPE_VERSION,
        id: params.id,
        sender: params.sender.to_string(),
        recipient: params.recipient.to_string(),
        seq: params.seq,
        timestamp_ms: params.timestamp_ms,
        wrapped_key: params.recipient_key.wrap_key(key.as_slice())?,
        nonce,
        ciphertext: Vec::new(),
        signature: Vec::new(),
    };
    let cipher = aead_key(key.as_slice())?;
    let mut body = plaintext.to_vec();
    cipher
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(env.header_bytes()),
            &mut body,
        )
        .map_err(|_| CryptoError::Generation)?;
    env.ciphertext = body;
    env.signature = params.sender_key.sign(&env.signed_bytes())?;
    Ok(env)
}

/// Verify and decrypt an envelope addressed to `recipient`.
///
/// `sender_key` is the key the caller trusts for `env.sender` (pinned, not
/// merely whatever the directory says today).
pub fn open(
    env: &Envelope,
    recipient: &str,
    recipient_key: &IdentityKey,
    sender_key: &PublicKey,
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    env.check_shape()?;
    if env.recipient != recipient {
        return Err(CryptoError::WrongRecipient {
            expected: recipient.to_string(),
            actual: env.recipient.clone(),
        });
    }
    sender_key.verify(&env.signed_bytes(), &env.signature)?;
    let key = recipient_key.unwrap_key(&env.wrapped_key)?;
    let cipher = aead_key(&key)?;
    let mut body = Zeroizing::new(env.ciphertext.clone());
    let len = cipher
        .open_in_place(
            Nonce::assume_unique_for_key(env.nonce),
            Aad::from(env.header_bytes()),
            &mut body,
        )
        .map_err(|_| CryptoError::Decrypt)?
        .len();
    body.truncate(len);
    Ok(body)
}

fn aead_key(key: &[u8]) -> Result<LessSafeKey, CryptoError> {
    UnboundKey::new(&AES_256_GCM, key)
        .map(LessSafeKey::new)
        .map_err(|_| CryptoError::Decrypt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::KeySize;

    struct Pair {
        alice: IdentityKey,
        bob: IdentityKey,
    }

    fn keys() -> Pair {
        Pair {
            alice: IdentityKey::generate(KeySize::Rsa2048).unwrap(),
            bob: IdentityKey::generate(KeySize::Rsa2048).unwrap(),
        }
    }

    fn sealed(p: &Pair, text: &[u8]) -> Envelope {
        seal(
            &SealParams {
                sender_key: &p.alice,
                sender: "alice",
                recipient: "bob",
                recipient_key: p.bob.public_key(),
                id: MessageId::random().unwrap(),
                seq: 1,
                timestamp_ms: 1_700_000_000_000,
            },
            text,
        )
        .unwrap()
    }

    #[test]
    fn seal_open_round_trip() {
        let p = keys();
        let env = sealed(&p, b"hi bob");
        let body = open(&env, "bob", &p.bob, p.alice.public_key()).unwrap();
        assert_eq!(body.as_slice(), b"hi bob");
        assert!(!env.ciphertext.windows(6).any(|w| w == b"hi bob"));
    }

    #[test]
    fn any_change_to_a_bound_field_fails() {
        let p = keys();
        let env = sealed(&p, b"hi bob");
        let mutations: [fn(&mut Envelope); 8] = [
            |e| e.id.0[0] ^= 1,
            |e| e.seq += 1,
            |e| e.sender = "mallory".into(),
            |e| e.timestamp_ms += 1,
            |e| e.wrapped_key[5] ^= 1,
            |e| e.nonce[0] ^= 1,
            |e| e.ciphertext[0] ^= 1,
            |e| e.signature[9] ^= 1,
        ];
        for mutate in mutations {
            let mut bad = env.clone();
            mutate(&mut bad);
            assert!(open(&bad, "bob", &p.bob, p.alice.public_key()).is_err());
        }
        let mut readdressed = env.clone();
        readdressed.recipient = "carol".into();
        assert!(matches!(
            open(&readdressed, "bob", &p.bob, p.alice.public_key()),
            Err(CryptoError::WrongRecipient { .. })
        ));
        // Signed by someone else than the pinned sender key.
        assert_eq!(
            open(&env, "bob", &p.bob, p.bob.public_key()),
            Err(CryptoError::BadSignature)
        );
    }

    #[test]
    fn oversized_plaintext_is_refused() {
        let p = keys();
        let params = SealParams {
            sender_key: &p.alice,
            sender: "alice",
            recipient: "bob",
            recipient_key: p.bob.public_key(),
            id: MessageId::random().unwrap(),
            seq: 1,
            timestamp_ms: 0,
        };
        assert!(matches!(
            seal(&params, &vec![0u8; MAX_MESSAGE_LEN + 1]),
            Err(CryptoError::TooLarge(_))
        ));
    }
}
