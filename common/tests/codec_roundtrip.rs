//! Property tests: every protocol message survives encode → decode unchanged,
//! the encoded length matches the header, and any cut of a frame is
//! "incomplete", never a wrong message or a panic.
//!
//! Hostile input is fed at both layers. Frames with a *valid* length prefix
//! carry hostile bodies (random bytes, a valid body cut short, a flipped
//! byte, a wrong version byte, bytes after the body), so the body decoder
//! itself is exercised, and each answer must be the right class of error.
//! Messages as large as a frame may be round-trip; one byte more is refused
//! on encode, and on decode before the body is buffered.

use bytes::{BufMut, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use securechat_common::codec::{self, CodecError, FrameCodec};
use securechat_common::envelope::{Envelope, MessageId, ENVELOPE_VERSION};
use securechat_common::limits::MAX_FRAME_LEN;
use securechat_common::protocol::{
    AckOutcome, ErrorCode, ErrorReply, Push, Request, Response, PROTOCOL_VERSION,
};
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;
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
                    kind: securechat_common::envelope::Kind::Direct,
                    timestamp_ms,
                    slots: vec![securechat_common::envelope::Slot {
                        name: recipient,
                        seq: timestamp_ms.rotate_left(17) | 1,
                        wrapped_key,
                    }],
                    other_slots: vec![[3; 32]],
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
        ErrorCode::Busy,
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
        prop::collection::vec((msg_id(), any::<bool>()), 0..40).prop_map(|acks| {
            Request::AckMany {
                acks: acks
                    .into_iter()
                    .map(|(id, ok)| {
                        let outcome = if ok {
                            AckOutcome::Stored
                        } else {
                            AckOutcome::Rejected
                        };
                        (id, outcome)
                    })
                    .collect(),
            }
        }),
        prop::collection::vec(name(), 0..40).prop_map(|users| Request::WatchPresence { users }),
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

/// A frame whose length prefix is right for `version` + `body`.
fn frame_of(version: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body.len());
    out.put_u32(u32::try_from(body.len() + 1).expect("test bodies are small"));
    out.put_u8(version);
    out.extend_from_slice(body);
    out
}

/// The postcard body of `msg` (the frame without length and version).
fn body_of<T: Serialize>(msg: &T) -> Vec<u8> {
    codec::encode(msg).expect("encodable")[5..].to_vec()
}

fn fail(what: &str, got: &dyn Debug) -> TestCaseError {
    TestCaseError::fail(format!("{what}: got {got:?}"))
}

/// A frame with a valid length prefix and version reached the body decoder:
/// the answer is a message or a body error (malformed, trailing bytes),
/// never a framing error. A message that decoded encodes and decodes back
/// to itself.
fn assert_body_verdict<T>(bytes: &[u8]) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    match codec::decode::<T>(bytes) {
        Ok(msg) => {
            let again = codec::encode(&msg).map_err(|e| fail("re-encoding", &e))?;
            let back: T = codec::decode(&again).map_err(|e| fail("decoding again", &e))?;
            prop_assert_eq!(back, msg);
            Ok(())
        }
        Err(CodecError::Malformed(_) | CodecError::TrailingBytes(_)) => Ok(()),
        Err(other) => Err(fail("a body error for a well-framed body", &other)),
    }
}

/// Each hostile shape of a valid frame of `msg`, with its exact answer.
fn hostile_frames<T>(msg: &T, at: Index, mask: u8, extra: &[u8]) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let body = body_of(msg);

    // Cut short, with the length prefix saying so: the body decoder runs out
    // of input. (A postcard encoding has no prefix that is itself complete.)
    let cut = at.index(body.len());
    match codec::decode::<T>(&frame_of(PROTOCOL_VERSION, &body[..cut])) {
        Err(CodecError::Malformed(_)) => {}
        other => {
            return Err(fail(
                &format!("body cut to {cut} of {}", body.len()),
                &other,
            ))
        }
    }

    // Bytes after the body inside the frame, then after the frame.
    let mut long = body.clone();
    long.extend_from_slice(extra);
    match codec::decode::<T>(&frame_of(PROTOCOL_VERSION, &long)) {
        Err(CodecError::TrailingBytes(n)) if n == extra.len() => {}
        other => return Err(fail("bytes after the body", &other)),
    }
    let mut after = frame_of(PROTOCOL_VERSION, &body);
    after.extend_from_slice(extra);
    match codec::decode::<T>(&after) {
        Err(CodecError::TrailingBytes(n)) if n == extra.len() => {}
        other => return Err(fail("bytes after the frame", &other)),
    }

    // Another version byte: refused before the body is looked at.
    let version = PROTOCOL_VERSION ^ mask;
    match codec::decode::<T>(&frame_of(version, &body)) {
        Err(CodecError::UnsupportedVersion(v)) if v == version => {}
        other => return Err(fail(&format!("version {version}"), &other)),
    }

    // One byte flipped anywhere in the frame.
    let mut frame = frame_of(PROTOCOL_VERSION, &body);
    let pos = at.index(frame.len());
    frame[pos] ^= mask;
    let result = codec::decode::<T>(&frame);
    if pos < 4 {
        // The length prefix: too large, longer than the bytes there, or a
        // strict prefix of the body.
        let declared = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        let ok = match &result {
            Err(CodecError::TooLarge { len, max }) => {
                declared > MAX_FRAME_LEN && *len == declared && *max == MAX_FRAME_LEN
            }
            Err(CodecError::Truncated) => declared <= MAX_FRAME_LEN && declared > body.len() + 1,
            Err(CodecError::Empty) => declared == 0,
            Err(CodecError::Malformed(_)) => declared >= 1 && declared <= body.len(),
            _ => false,
        };
        if !ok {
            return Err(fail(
                &format!("length prefix flipped to {declared}"),
                &result,
            ));
        }
    } else if pos == 4 {
        match result {
            Err(CodecError::UnsupportedVersion(v)) if v == PROTOCOL_VERSION ^ mask => {}
            other => return Err(fail("flipped version byte", &other)),
        }
    } else {
        assert_body_verdict::<T>(&frame)?;
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

    /// Raw bytes from the network: mostly a length prefix far over the
    /// limit, so this covers the framing layer only (see below for bodies).
    #[test]
    fn arbitrary_bytes_never_panic(junk in bytes(4096)) {
        let _ = codec::decode::<Request>(&junk);
        let _ = codec::decode::<Response>(&junk);
        let _ = codec::decode::<Push>(&junk);
    }

    /// Random bodies in well-formed frames, half of them behind a variant
    /// tag that exists, so the field decoders run too.
    #[test]
    fn random_bodies_reach_the_body_decoder(
        tag in prop::option::of(0u8..16),
        rest in bytes(4096),
    ) {
        let body: Vec<u8> = tag.into_iter().chain(rest).collect();
        let frame = frame_of(PROTOCOL_VERSION, &body);
        assert_body_verdict::<Request>(&frame)?;
        assert_body_verdict::<Response>(&frame)?;
        assert_body_verdict::<Push>(&frame)?;
    }

    #[test]
    fn hostile_request_frames_get_the_right_error(
        req in request(),
        at in any::<Index>(),
        mask in 1u8..,
        extra in vec(any::<u8>(), 1..64),
    ) {
        hostile_frames(&req, at, mask, &extra)?;
    }

    #[test]
    fn hostile_response_frames_get_the_right_error(
        resp in response(),
        at in any::<Index>(),
        mask in 1u8..,
        extra in vec(any::<u8>(), 1..64),
    ) {
        hostile_frames(&resp, at, mask, &extra)?;
    }
}

/// `Send` of `env` with a ciphertext sized so that the frame (version and
/// body, the length prefix excluded) is exactly `MAX_FRAME_LEN + over`.
fn send_of_frame_len(env: Envelope, over: usize) -> Request {
    let frame_len = |ciphertext_len: usize| {
        let req = Request::Send {
            envelope: Envelope {
                ciphertext: vec![0x5a; ciphertext_len],
                ..env.clone()
            },
        };
        (postcard::to_stdvec(&req).expect("encodable").len() + 1, req)
    };
    let (base, _) = frame_len(0);
    // The ciphertext's length prefix grows from 1 to 3 bytes on the way.
    let (len, req) = frame_len(MAX_FRAME_LEN + over - base - 2);
    assert_eq!(len, MAX_FRAME_LEN + over, "sizing the ciphertext");
    req
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    /// A `Send` whose frame is exactly the limit round-trips, also when it
    /// arrives in pieces.
    #[test]
    fn send_of_exactly_the_frame_limit_round_trips(env in envelope()) {
        let req = send_of_frame_len(env, 0);
        let frame = codec::encode(&req).map_err(|e| fail("encoding at the limit", &e))?;
        prop_assert_eq!(frame.len(), 4 + MAX_FRAME_LEN);
        let back: Request = codec::decode(&frame).map_err(|e| fail("decoding at the limit", &e))?;
        prop_assert_eq!(&back, &req);

        let mut codec = FrameCodec::<Request>::new();
        let half = frame.len() / 2;
        let mut buf = BytesMut::from(&frame[..half]);
        prop_assert!(codec.decode(&mut buf).map_err(|e| fail("first half", &e))?.is_none());
        buf.extend_from_slice(&frame[half..]);
        let whole = codec.decode(&mut buf).map_err(|e| fail("second half", &e))?;
        prop_assert_eq!(whole.as_ref(), Some(&req));
        prop_assert!(buf.is_empty());
    }

    /// One byte over the limit: refused on encode, and on decode as soon as
    /// the length prefix is read, without buffering the body.
    #[test]
    fn send_one_byte_over_the_frame_limit_is_refused(env in envelope()) {
        let req = send_of_frame_len(env, 1);
        match codec::encode(&req) {
            Err(CodecError::TooLarge { len, max }) => {
                prop_assert_eq!(len, MAX_FRAME_LEN + 1);
                prop_assert_eq!(max, MAX_FRAME_LEN);
            }
            other => return Err(fail("encoding one byte over the limit", &other)),
        }

        // What a peer that ignores the limit would send.
        let frame = frame_of(PROTOCOL_VERSION, &postcard::to_stdvec(&req).expect("encodable"));
        prop_assert_eq!(frame.len(), 4 + MAX_FRAME_LEN + 1);
        let mut buf = BytesMut::with_capacity(64);
        buf.extend_from_slice(&frame[..64]);
        let before = buf.capacity();
        match FrameCodec::<Request>::new().decode(&mut buf) {
            Err(CodecError::TooLarge { len, .. }) => prop_assert_eq!(len, MAX_FRAME_LEN + 1),
            other => return Err(fail("decoding one byte over the limit", &other)),
        }
        prop_assert_eq!(buf.capacity(), before, "the decoder reserved room for the body");
        match codec::decode::<Request>(&frame) {
            Err(CodecError::TooLarge { len, .. }) => prop_assert_eq!(len, MAX_FRAME_LEN + 1),
            other => return Err(fail("decoding the whole over-limit frame", &other)),
        }
    }
}

#[test]
fn an_empty_frame_is_refused() {
    let frame = 0u32.to_be_bytes();
    assert!(matches!(
        codec::decode::<Request>(&frame),
        Err(CodecError::Empty)
    ));
}
