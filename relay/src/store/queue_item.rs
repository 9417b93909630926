//! What one entry of a user's queue holds: a message for them, or a notice
//! that a message they sent expired undelivered.
//!
//! ```text
//!  queue (bob, 7)   = (stored, postcard QueueItem::Envelope(alice's envelope for bob))
//!        │ not acknowledged within the retention time: the sweep removes it and
//!        ▼ queues for its recorded sender, in the same commit,
//!  queue (alice, 9) = (now, postcard QueueItem::Expired{notice, id, "bob", stored})
//!        │ pushed as Push::Expired; Ack{id: notice} deletes it like a message
//! ```
//!
//! A notice has no sender: it counts in its owner's queue totals (so the
//! unread count and the status page include it) but against no one's share,
//! and when it expires in turn it is dropped without a notice of its own.
//!
//! Entries written before notices existed hold a bare postcard envelope;
//! they do not decode as a [`QueueItem`] and the push task skips them with
//! an error in the log.

use securechat_common::crypto::sha256;
use securechat_common::{Envelope, MessageId};
use serde::{Deserialize, Serialize};

use super::{from_bytes, to_bytes, StoreError};

/// Domain separation for [`ExpiredNotice::id_for`].
const NOTICE_ID_LABEL: &[u8] = b"securechat-relay-expired-notice-v1\0";

/// One queue entry, as stored (postcard).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueItem {
    /// A message: one recipient's copy of an envelope, postcard-encoded as
    /// the relay queued it. Kept as bytes: storing and listing it need no
    /// decoding, only pushing it does.
    Envelope(Vec<u8>),
    /// A message the queue's owner sent was removed undelivered.
    Expired(ExpiredNotice),
}

/// A notice to a sender that a message of theirs expired on the relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpiredNotice {
    /// The id its owner acknowledges it with ([`ExpiredNotice::id_for`]).
    pub notice: MessageId,
    /// The expired message's id.
    pub id: MessageId,
    /// Its recipient.
    pub recipient: String,
    /// When the relay had stored it (Unix seconds).
    pub stored_unix: u64,
}

impl QueueItem {
    /// The stored bytes.
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        to_bytes(self)
    }

    /// The stored bytes of [`QueueItem::Envelope`] holding `envelope`,
    /// without first copying it into one: the send path's commit writes
    /// this for every message.
    pub fn encode_envelope(envelope: &[u8]) -> Result<Vec<u8>, StoreError> {
        /// The envelope variant, borrowed. Variant indexes and field order
        /// must stay those of [`QueueItem`] (a test compares the bytes).
        #[derive(Serialize)]
        enum Borrowed<'a> {
            Envelope(Bytes<'a>),
        }
        /// Written in one piece: serde writes a `[u8]` byte by byte as a
        /// sequence, which costs more than the rest of the encoding. In
        /// postcard both are a length and the bytes.
        struct Bytes<'a>(&'a [u8]);
        impl Serialize for Bytes<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(self.0)
            }
        }
        to_bytes(&Borrowed::Envelope(Bytes(envelope)))
    }

    /// Read stored bytes back; an entry from before notices existed fails.
    ///
    /// Strict: bytes left over fail too. Postcard alone would accept them,
    /// and an old bare envelope whose version byte happens to be a variant
    /// here would pass for a short notice followed by the rest.
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let (item, rest) = postcard::take_from_bytes::<Self>(bytes)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if !rest.is_empty() {
            return Err(StoreError::Corrupt(format!(
                "{} bytes after a queue entry",
                rest.len()
            )));
        }
        Ok(item)
    }

    /// The id the owner acknowledges this entry with: the message's own id,
    /// or the notice's.
    pub fn ack_id(&self) -> Result<MessageId, StoreError> {
        match self {
            QueueItem::Envelope(bytes) => Ok(from_bytes::<Envelope>(bytes)?.id),
            QueueItem::Expired(notice) => Ok(notice.notice),
        }
    }
}

impl ExpiredNotice {
    /// The notice for message `id` to `recipient`, which was stored at
    /// `stored_unix` in queue position `seq`.
    pub fn new(id: MessageId, recipient: &str, seq: u64, stored_unix: u64) -> Self {
        Self {
            notice: Self::id_for(&id, recipient, seq),
            id,
            recipient: recipient.to_string(),
            stored_unix,
        }
    }

    /// The notice's id: the first 16 bytes of SHA-256 over a label, the
    /// message id, the recipient and the message's queue position.
    ///
    /// Derived, so that the sweep needs no randomness and gives the same
    /// answer if run again over the same state. Not the message id itself,
    /// nor a function of what users know alone: the sender's dedupe index
    /// would otherwise let anyone who knows the id (a broadcast's other
    /// recipients) pre-empt the notice by sending the sender a message with
    /// that id first. The queue position is internal to the relay; it also
    /// tells apart two expiries of the same id to the same recipient (the id
    /// may be queued again once the first has been forgotten).
    pub fn id_for(id: &MessageId, recipient: &str, seq: u64) -> MessageId {
        let mut input = Vec::with_capacity(NOTICE_ID_LABEL.len() + 16 + 4 + recipient.len() + 8);
        input.extend_from_slice(NOTICE_ID_LABEL);
        input.extend_from_slice(&id.0);
        // Length-prefixed, so that no two (recipient, seq) pairs share bytes.
        input.extend_from_slice(&(recipient.len() as u32).to_be_bytes());
        input.extend_from_slice(recipient.as_bytes());
        input.extend_from_slice(&seq.to_be_bytes());
        let digest = sha256(&input);
        let mut out = [0u8; 16];
        out.copy_from_slice(&digest[..16]);
        MessageId(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn items_round_trip_and_bare_envelopes_do_not_decode() {
        let notice = QueueItem::Expired(ExpiredNotice::new(MessageId([1; 16]), "bob", 7, 100));
        let bytes = notice.encode().unwrap();
        assert_eq!(QueueItem::decode(&bytes).unwrap(), notice);
        let message = QueueItem::Envelope(vec![3, 1, 2]);
        assert_eq!(
            QueueItem::decode(&message.encode().unwrap()).unwrap(),
            message
        );
        // A version 3 envelope starts with its version byte, 3: no variant.
        assert!(QueueItem::decode(&[3, 0, 0, 0]).is_err());
        // Whole, or not at all.
        let mut longer = message.encode().unwrap();
        longer.push(0);
        assert!(QueueItem::decode(&longer).is_err());
        assert!(QueueItem::decode(&[]).is_err());
    }

    #[test]
    fn a_borrowed_envelope_encodes_like_an_owned_one() {
        for envelope in [vec![], vec![3, 1, 2], vec![0xff; 700]] {
            let owned = QueueItem::Envelope(envelope.clone()).encode().unwrap();
            assert_eq!(QueueItem::encode_envelope(&envelope).unwrap(), owned);
            assert_eq!(
                QueueItem::decode(&owned).unwrap(),
                QueueItem::Envelope(envelope)
            );
        }
    }

    #[test]
    fn notice_ids_depend_on_every_input_and_are_not_the_message_id() {
        let id = MessageId([5; 16]);
        let base = ExpiredNotice::id_for(&id, "bob", 7);
        assert_eq!(base, ExpiredNotice::id_for(&id, "bob", 7), "derived");
        assert_ne!(base, id);
        assert_ne!(base, ExpiredNotice::id_for(&MessageId([6; 16]), "bob", 7));
        assert_ne!(base, ExpiredNotice::id_for(&id, "carol", 7));
        assert_ne!(base, ExpiredNotice::id_for(&id, "bob", 8));
        let notice = ExpiredNotice::new(id, "bob", 7, 100);
        assert_eq!(notice.notice, base);
        assert_eq!(QueueItem::Expired(notice).ack_id().unwrap(), base);
    }
}
