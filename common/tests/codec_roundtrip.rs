//! Property tests: every protocol message survives encode → decode unchanged,
//! the encoded length matches the header, and any cut of a frame is
//! "incomplete", never a wrong message or a panic.

use bytes::BytesMut;
use proptest::collection::vec;
use proptest::prelude::*;
use securechat_common::codec::{self, CodecError, FrameCodec};
use securechat_common::envelope::{Envelope, MessageId, ENVELOPE_VERSION};
use securechat_common::protocol::{AckOutcome, ErrorCode, ErrorReply, Push, Request, Response};
use tokio_util::codec::Decoder;
use zeroize::Zeroizing;

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_.-]{2,31}"
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..max)
}

fn secret() -> impl Strategy<Value = Zeroizing<String>> {
    ".{0,40}".prop_map(Zeroizing::new)
}

fn msg_id() -> impl Strategy<Value = MessageId> {
    any::<[u8; 16]>().prop_map(MessageId)
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (
        msg_id(),
        name(),
        name(),
        any::<u64>(),
        bytes(512),
        any::<[u8; 12]>(),
        bytes(2048),
        bytes(512),
    )
        .prop_map(
            |(id, sender, recipient, timestamp_ms, wrapped_key, nonce, ciphertext, signature)| {
                Envelope {
                    version: ENVELOPE_VERSION,
                    id,
                    sender,
                    recipient,
                    seq: timestamp_ms.rotate_left(17) | 1,
                    timestamp_ms,
                    wrapped_key,
                    nonce,
                    ciphertext,
                    signature,
                }
            },
        )
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(vec![
        ErrorCode::BadRequest,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnsupportedVersion,
        ErrorCode::InvalidUsername,
        ErrorCode::InvalidEmail,
        ErrorCode::WeakPassword,
        ErrorCode::InvalidPublicKey,
        ErrorCode::UsernameTaken,
        ErrorCode::NoPendingRegistration,
        ErrorCode::WrongCode,
        ErrorCode::CodeExpired,
        ErrorCode::TooManyAttempts,
        ErrorCode::MailFailed,
        ErrorCode::InvalidCredentials,
        ErrorCode::InvalidTotp,
        ErrorCode::TotpReused,
        ErrorCode::InvalidSignature,
        ErrorCode::NoChallenge,
        ErrorCode::SessionExpired,
        ErrorCode::NotAuthenticated,
        ErrorCode::FreshLoginRequired,
        ErrorCode::UnknownUser,
        ErrorCode::NotSender,
        ErrorCode::MessageTooLarge,
        ErrorCode::QuotaExceeded,
        ErrorCode::RateLimited,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
    ])
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (name(), ".{0,60}", secret(), bytes(600)).prop_map(
            |(username, email, password, public_key)| {
                Request::Register {
                    username,
                    email,
                    password,
                    public_key,
                }
            }
        ),
        (name(), secret()).prop_map(|(username, code)| Request::Verify { username, code }),
        Just(Request::Challenge),
        (name(), secret(), secret(), bytes(512)).prop_map(
            |(username, password, totp, signature)| {
                Request::Login {
                    username,
                    password,
                    totp,
                    signature,
                }
            }
        ),
        (name(), bytes(64), bytes(512)).prop_map(|(username, token, signature)| Request::Resume {
            username,
            token: Zeroizing::new(token),
            signature
        }),
        Just(Request::Logout),
        name().prop_map(|username| Request::LookupKey { username }),
        (bytes(600), bytes(512)).prop_map(|(public_key, signature)| Request::PublishKey {
            public_key,
            signature
        }),
        envelope().prop_map(|envelope| Request::Send { envelope }),
        (msg_id(), any::<bool>()).prop_map(|(id, ok)| Request::Ack {
            id,
            outcome: if ok {
                AckOutcome::Stored
            } else {
                AckOutcome::Rejected
            }
        }),
        Just(Request::Online),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        any::<u64>().prop_map(|expires_in_secs| Response::RegisterPending { expires_in_secs }),
        (secret(), secret()).prop_map(|(otpauth_uri, secret_base32)| Response::Verified {
            otpauth_uri,
            secret_base32
        }),
        bytes(64).prop_map(|nonce| Response::Challenge { nonce }),
        (
            name(),
            prop::option::of(bytes(64)),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(username, token, session_expires_unix, unread)| {
                Response::LoggedIn {
                    username,
                    token: token.map(Zeroizing::new),
                    session_expires_unix,
                    unread,
                }
            }),
        Just(Response::Ok),
        (name(), bytes(600)).prop_map(|(username, public_key)| Response::Key {
            username,
            public_key
        }),
        (msg_id(), any::<bool>()).prop_map(|(id, duplicate)| Response::Stored { id, duplicate }),
        vec(name(), 0..20).prop_map(|users| Response::Online { users }),
        (error_code(), ".{0,80}")
            .prop_map(|(code, message)| Response::Error(ErrorReply::new(code, message))),
    ]
}

fn round_trip<T>(msg: &T) -> Result<(), TestCaseError>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let frame = codec::encode(msg).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let declared = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    prop_assert_eq!(declared + 4, frame.len());
    let back: T = codec::decode(&frame).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, msg);

    // Every strict prefix is "wait for more", and at end of stream an error.
    for cut in [0, 1, 3, 4, 5, frame.len() / 2, frame.len() - 1] {
        let mut buf = BytesMut::from(&frame[..cut]);
        let mut codec = FrameCodec::<T>::new();
        prop_assert!(codec
            .decode(&mut buf)
            .map_err(|e| TestCaseError::fail(e.to_string()))?
            .is_none());
        let eof = codec.decode_eof(&mut buf);
        if cut == 0 {
            prop_assert!(matches!(eof, Ok(None)));
        } else {
            prop_assert!(matches!(eof, Err(CodecError::Truncated)));
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn requests_round_trip(req in request()) {
        round_trip(&req)?;
    }

    #[test]
    fn responses_round_trip(resp in response()) {
        round_trip(&resp)?;
    }

    #[test]
    fn pushes_round_trip(env in envelope(), received_unix in any::<u64>()) {
        round_trip(&Push::Deliver { envelope: env, received_unix })?;
    }

    #[test]
    fn arbitrary_bytes_never_panic(junk in bytes(4096)) {
        let _ = codec::decode::<Request>(&junk);
        let _ = codec::decode::<Response>(&junk);
        let _ = codec::decode::<Push>(&junk);
    }
}
