//! Sealed, signed messages: what the relay stores and forwards without being
//! able to read.
//!
//! Sealing a message for one or more recipients:
//!
//! 1. a fresh 256-bit key encrypts the body once with AES-256-GCM; the
//!    header (version, id, sender, kind, timestamp) is the associated data;
//! 2. that key is wrapped with RSA-OAEP-SHA256 for each recipient's key, in
//!    one [`Slot`] per recipient (name, sequence number, wrapped key);
//! 3. the sender signs once, with RSA-PSS-SHA256, a transcript binding the
//!    header, the SHA-256 digest of every slot, the nonce and the ciphertext.
//!
//! ```text
//!  header │ slots: [bob: seq 7, key→bob] [carol: seq 3, key→carol] … │ nonce │ ciphertext │ sig
//!                       │ the relay splits a broadcast into one copy per recipient:
//!                       ▼
//!  header │ slots: [bob: seq 7, key→bob] │ other slots: [sha256(carol's slot)] … │ nonce │ ciphertext │ sig
//! ```
//!
//! Signing slot digests rather than slots lets the relay hand each
//! recipient only its own wrapped key (plus 32 bytes per other recipient)
//! while the one signature still verifies: a broadcast to many costs one
//! encryption and one signature, and no recipient's copy grows with the
//! others' keys.
//!
//! Opening checks that exactly one slot names the recipient, then the
//! signature, and only then decrypts: a relay that re-addresses, replays
//! into another conversation, turns a direct message into a broadcast or
//! alters any byte is caught before any plaintext exists.
//!
//! The [`Kind`] is signed: a recipient knows whether the sender meant it
//! for them alone, for everyone, or as a delivery receipt.
//!
//! The sequence number in each slot counts the sender's messages to that
//! recipient (1, 2, 3, …). It is signed, so the relay cannot change it: the
//! recipient's agent sees a message the relay dropped as a gap, a reordered
//! one as late, and a replayed one as a number it has seen already.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{put_field, random_bytes, sha256, CryptoError, IdentityKey, PublicKey};
use crate::limits::{
    MAX_CIPHERTEXT_LEN, MAX_MESSAGE_LEN, MAX_RECIPIENTS, MAX_RSA_OUTPUT_LEN, USERNAME_LEN,
};

/// Envelope format version. Version 3 added the signed [`Kind`] and
/// several recipients per envelope.
pub const ENVELOPE_VERSION: u8 = 3;

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

/// What the sender meant the message to be; signed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Text for exactly one recipient.
    Direct,
    /// Text for everyone (the room): the sender sealed it for every user.
    Broadcast,
    /// A delivery receipt for exactly one recipient: the body is a
    /// [`ReceiptBody`] naming messages the sender's agent has stored.
    Receipt,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Direct => 0,
            Kind::Broadcast => 1,
            Kind::Receipt => 2,
        }
    }
}

/// The body of a [`Kind::Receipt`] message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptBody {
    /// Messages from the receipt's recipient that the receipt's sender has
    /// stored, at most [`crate::limits::MAX_RECEIPT_IDS`].
    pub stored: Vec<MessageId>,
}

/// One recipient's part of an envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// Recipient's username.
    pub name: String,
    /// The sender's count of messages to this recipient, from 1.
    pub seq: u64,
    /// The message key, RSA-OAEP-SHA256 encrypted for the recipient.
    pub wrapped_key: Vec<u8>,
}

impl Slot {
    /// The SHA-256 the signature covers in place of the slot.
    pub fn digest(&self) -> [u8; 32] {
        let mut out = Vec::with_capacity(64 + self.name.len() + self.wrapped_key.len());
        out.extend_from_slice(b"securechat-slot-v3\0");
        put_field(&mut out, self.name.as_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        put_field(&mut out, &self.wrapped_key);
        sha256(&out)
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
    /// Direct message, broadcast or receipt.
    pub kind: Kind,
    /// Sender's clock at sealing, Unix milliseconds.
    pub timestamp_ms: u64,
    /// The recipients' slots: all of them as the sender submits it, the
    /// recipient's own once the relay has split it (see [`Envelope::split`]).
    pub slots: Vec<Slot>,
    /// Digests of the slots the relay took out when splitting.
    pub other_slots: Vec<[u8; 32]>,
    /// AES-GCM nonce.
    pub nonce: [u8; NONCE_LEN],
    /// AES-256-GCM ciphertext of the body, tag included.
    pub ciphertext: Vec<u8>,
    /// Sender's RSA-PSS-SHA256 signature over [`Envelope::signed_bytes`].
    pub signature: Vec<u8>,
}

impl Envelope {
    /// The associated data of the body cipher: the header fields.
    fn header_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.sender.len());
        out.extend_from_slice(b"securechat-envelope-v3\0");
        out.push(self.version);
        out.extend_from_slice(&self.id.0);
        put_field(&mut out, self.sender.as_bytes());
        out.push(self.kind.byte());
        out.extend_from_slice(&self.timestamp_ms.to_be_bytes());
        out
    }

    /// Every slot digest, sorted: the same set before and after a split.
    fn slot_digests(&self) -> Vec<[u8; 32]> {
        let mut all: Vec<[u8; 32]> = self.slots.iter().map(Slot::digest).collect();
        all.extend_from_slice(&self.other_slots);
        all.sort_unstable();
        all
    }

    /// The bytes the sender signs: the header, every slot's digest, and the
    /// sealed body.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = self.header_bytes();
        let digests = self.slot_digests();
        out.extend_from_slice(&(digests.len() as u64).to_be_bytes());
        for d in &digests {
            out.extend_from_slice(d);
        }
        out.extend_from_slice(&self.nonce);
        put_field(&mut out, &self.ciphertext);
        out
    }

    /// How many recipients the sender sealed it for.
    pub fn recipient_count(&self) -> usize {
        self.slots.len() + self.other_slots.len()
    }

    /// The recipients whose slots this copy carries.
    pub fn recipients(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    /// The one recipient of a direct message or receipt (or of a split copy).
    pub fn recipient(&self) -> Option<&str> {
        match self.slots.as_slice() {
            [only] => Some(&only.name),
            _ => None,
        }
    }

    /// The slot for `name`, if this copy carries it.
    pub fn slot(&self, name: &str) -> Option<&Slot> {
        self.slots.iter().find(|s| s.name == name)
    }

    /// One copy per recipient, each carrying its own slot and only the
    /// digests of the others; the signature verifies on every copy.
    pub fn split(&self) -> Vec<Envelope> {
        let digests: Vec<[u8; 32]> = self.slots.iter().map(Slot::digest).collect();
        self.slots
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                let mut others = self.other_slots.clone();
                others.extend(
                    digests
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i)
                        .map(|(_, d)| *d),
                );
                Envelope {
                    slots: vec![slot.clone()],
                    other_slots: others,
                    ..self.clone_header()
                }
            })
            .collect()
    }

    fn clone_header(&self) -> Envelope {
        Envelope {
            version: self.version,
            id: self.id,
            sender: self.sender.clone(),
            kind: self.kind,
            timestamp_ms: self.timestamp_ms,
            slots: Vec::new(),
            other_slots: Vec::new(),
            nonce: self.nonce,
            ciphertext: self.ciphertext.clone(),
            signature: self.signature.clone(),
        }
    }

    /// Structural checks that need no key: version, kind against the number
    /// of recipients, distinct names, and every size bound.
    ///
    /// The relay runs this on every submitted envelope; `open` runs it too.
    pub fn check_shape(&self) -> Result<(), CryptoError> {
        let bad = |what: &str| Err(CryptoError::Malformed(what.to_string()));
        if self.version != ENVELOPE_VERSION {
            return bad("unknown envelope version");
        }
        if self.slots.is_empty() {
            return bad("no recipient");
        }
        let count = self.recipient_count();
        if count > MAX_RECIPIENTS {
            return bad("too many recipients in one envelope");
        }
        if count != 1 && self.kind != Kind::Broadcast {
            return bad("a direct message or receipt has exactly one recipient");
        }
        if !USERNAME_LEN.contains(&self.sender.chars().count()) {
            return bad("sender name out of bounds");
        }
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.seq == 0 {
                return bad("sequence number 0 (they start at 1)");
            }
            if !USERNAME_LEN.contains(&slot.name.chars().count()) {
                return bad("recipient name out of bounds");
            }
            if slot.wrapped_key.is_empty() || slot.wrapped_key.len() > MAX_RSA_OUTPUT_LEN {
                return bad("wrapped key size out of bounds");
            }
            if self.slots[..i].iter().any(|s| s.name == slot.name) {
                return bad("a recipient named twice");
            }
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

/// Everything needed to seal one direct message.
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

/// One recipient of [`seal_for`].
#[derive(Debug, Clone, Copy)]
pub struct To<'a> {
    /// Username.
    pub name: &'a str,
    /// Their (pinned) public key.
    pub key: &'a PublicKey,
    /// The sender's sequence number for them.
    pub seq: u64,
}

/// Everything about a message but its recipients and body.
#[derive(Debug, Clone, Copy)]
pub struct Header<'a> {
    /// The sender's identity key (signs).
    pub sender_key: &'a IdentityKey,
    /// The sender's username.
    pub sender: &'a str,
    /// What it is.
    pub kind: Kind,
    /// The message id.
    pub id: MessageId,
    /// Unix milliseconds.
    pub timestamp_ms: u64,
}

/// Encrypt `plaintext` for one recipient as a direct message and sign it.
pub fn seal(params: &SealParams<'_>, plaintext: &[u8]) -> Result<Envelope, CryptoError> {
    seal_for(
        &Header {
            sender_key: params.sender_key,
            sender: params.sender,
            kind: Kind::Direct,
            id: params.id,
            timestamp_ms: params.timestamp_ms,
        },
        &[To {
            name: params.recipient,
            key: params.recipient_key,
            seq: params.seq,
        }],
        plaintext,
    )
}

/// Encrypt `plaintext` once, wrap its key for each of `to`, and sign once.
pub fn seal_for(
    header: &Header<'_>,
    to: &[To<'_>],
    plaintext: &[u8],
) -> Result<Envelope, CryptoError> {
    if plaintext.len() > MAX_MESSAGE_LEN {
        return Err(CryptoError::TooLarge(plaintext.len()));
    }
    let key = Zeroizing::new(random_bytes::<32>()?);
    let nonce = random_bytes::<NONCE_LEN>()?;
    let slots = to
        .iter()
        .map(|t| {
            Ok(Slot {
                name: t.name.to_string(),
                seq: t.seq,
                wrapped_key: t.key.wrap_key(key.as_slice())?,
            })
        })
        .collect::<Result<Vec<_>, CryptoError>>()?;
    let mut env = Envelope {
        version: ENVELOPE_VERSION,
        id: header.id,
        sender: header.sender.to_string(),
        kind: header.kind,
        timestamp_ms: header.timestamp_ms,
        slots,
        other_slots: Vec::new(),
        nonce,
        ciphertext: Vec::new(),
        signature: Vec::new(),
    };
    env.check_shape_unsigned()?;
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
    env.signature = header.sender_key.sign(&env.signed_bytes())?;
    Ok(env)
}

impl Envelope {
    /// [`Envelope::check_shape`] before the body and signature exist.
    fn check_shape_unsigned(&self) -> Result<(), CryptoError> {
        let mut probe = self.clone_header();
        probe.slots = self.slots.clone();
        probe.other_slots = self.other_slots.clone();
        probe.ciphertext = vec![0; AES_256_GCM.tag_len()];
        probe.signature = vec![0; 1];
        probe.check_shape()
    }
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
    let Some(slot) = env.slot(recipient) else {
        return Err(CryptoError::WrongRecipient {
            expected: recipient.to_string(),
            actual: env.recipients().collect::<Vec<_>>().join(","),
        });
    };
    sender_key.verify(&env.signed_bytes(), &env.signature)?;
    let key = recipient_key.unwrap_key(&slot.wrapped_key)?;
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::crypto::KeySize;

    struct Keys {
        alice: IdentityKey,
        bob: IdentityKey,
        carol: IdentityKey,
    }

    fn keys() -> Keys {
        Keys {
            alice: IdentityKey::generate(KeySize::Rsa2048).unwrap(),
            bob: IdentityKey::generate(KeySize::Rsa2048).unwrap(),
            carol: IdentityKey::generate(KeySize::Rsa2048).unwrap(),
        }
    }

    fn sealed(p: &Keys, text: &[u8]) -> Envelope {
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

    fn broadcast(p: &Keys, text: &[u8]) -> Envelope {
        seal_for(
            &Header {
                sender_key: &p.alice,
                sender: "alice",
                kind: Kind::Broadcast,
                id: MessageId::random().unwrap(),
                timestamp_ms: 1_700_000_000_000,
            },
            &[
                To {
                    name: "bob",
                    key: p.bob.public_key(),
                    seq: 4,
                },
                To {
                    name: "carol",
                    key: p.carol.public_key(),
                    seq: 9,
                },
            ],
            text,
        )
        .unwrap()
    }

    #[test]
    fn seal_open_round_trip() {
        let p = keys();
        let env = sealed(&p, b"hi bob");
        assert_eq!(env.kind, Kind::Direct);
        let body = open(&env, "bob", &p.bob, p.alice.public_key()).unwrap();
        assert_eq!(body.as_slice(), b"hi bob");
        assert!(!env.ciphertext.windows(6).any(|w| w == b"hi bob"));
    }

    #[test]
    fn any_change_to_a_bound_field_fails() {
        let p = keys();
        let env = sealed(&p, b"hi bob");
        let mutations: [fn(&mut Envelope); 10] = [
            |e| e.id.0[0] ^= 1,
            |e| e.slots[0].seq += 1,
            |e| e.sender = "mallory".into(),
            |e| e.timestamp_ms += 1,
            |e| e.slots[0].wrapped_key[5] ^= 1,
            |e| e.nonce[0] ^= 1,
            |e| e.ciphertext[0] ^= 1,
            |e| e.signature[9] ^= 1,
            |e| e.kind = Kind::Receipt,
            |e| {
                e.kind = Kind::Broadcast;
                e.other_slots.push([7; 32]);
            },
        ];
        for mutate in mutations {
            let mut bad = env.clone();
            mutate(&mut bad);
            assert!(open(&bad, "bob", &p.bob, p.alice.public_key()).is_err());
        }
        let mut readdressed = env.clone();
        readdressed.slots[0].name = "carol".into();
        assert!(matches!(
            open(&readdressed, "bob", &p.bob, p.alice.public_key()),
            Err(CryptoError::WrongRecipient { .. })
        ));
        assert!(open(&readdressed, "carol", &p.carol, p.alice.public_key()).is_err());
        // Signed by someone else than the pinned sender key.
        assert_eq!(
            open(&env, "bob", &p.bob, p.bob.public_key()),
            Err(CryptoError::BadSignature)
        );
    }

    #[test]
    fn a_broadcast_is_sealed_once_and_opens_for_each_after_a_split() {
        let p = keys();
        let env = broadcast(&p, b"hello room");
        assert_eq!(env.slots.len(), 2);
        let copies = env.split();
        assert_eq!(copies.len(), 2);
        for (copy, (name, key)) in copies.iter().zip([("bob", &p.bob), ("carol", &p.carol)]) {
            assert_eq!(copy.recipient(), Some(name));
            assert_eq!(copy.other_slots.len(), 1);
            assert_eq!(copy.kind, Kind::Broadcast);
            let body = open(copy, name, key, p.alice.public_key()).unwrap();
            assert_eq!(body.as_slice(), b"hello room");
        }
        // The whole envelope opens too; a copy cannot be opened by the other.
        open(&env, "carol", &p.carol, p.alice.public_key()).unwrap();
        assert!(open(&copies[0], "carol", &p.carol, p.alice.public_key()).is_err());
        // A relay that drops a digest, or swaps in a slot of its own, is caught.
        let mut short = copies[0].clone();
        short.other_slots.clear();
        assert!(open(&short, "bob", &p.bob, p.alice.public_key()).is_err());
        let mut as_direct = copies[0].clone();
        as_direct.other_slots.clear();
        as_direct.kind = Kind::Direct;
        assert!(open(&as_direct, "bob", &p.bob, p.alice.public_key()).is_err());
    }

    #[test]
    fn shapes_that_make_no_sense_are_refused() {
        let p = keys();
        let mut two = broadcast(&p, b"x");
        two.kind = Kind::Direct;
        assert!(matches!(two.check_shape(), Err(CryptoError::Malformed(_))));
        let mut dup = broadcast(&p, b"x");
        dup.slots[1].name = "bob".into();
        assert!(matches!(dup.check_shape(), Err(CryptoError::Malformed(_))));
        let mut none = sealed(&p, b"x");
        none.slots.clear();
        assert!(matches!(none.check_shape(), Err(CryptoError::Malformed(_))));
        let mut many = broadcast(&p, b"x");
        many.other_slots = vec![[1; 32]; MAX_RECIPIENTS];
        assert!(matches!(many.check_shape(), Err(CryptoError::Malformed(_))));
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
