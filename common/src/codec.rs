//! Frame encoding: how protocol messages become bytes and back.
//!
//! ```text
//! ┌──────────────┬─────────┬──────────────────────────┐
//! │ len: u32 BE  │ version │ body: postcard(T)        │
//! │ (version+body)│  u8    │                          │
//! └──────────────┴─────────┴──────────────────────────┘
//! ```
//!
//! The length is checked against the limit before any buffer is reserved, a
//! frame cut short by the end of the stream is an error (a clean end between
//! frames is not), and a body with bytes left over after decoding is rejected.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use tokio_util::codec::{Decoder, Encoder};

use crate::limits::MAX_FRAME_LEN;
use crate::protocol::PROTOCOL_VERSION;

const HEADER_LEN: usize = 4;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The declared or encoded length exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Declared length.
        len: usize,
        /// Limit in force.
        max: usize,
    },
    /// The frame is empty (not even a version byte).
    #[error("empty frame")]
    Empty,
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {0}, this build speaks {PROTOCOL_VERSION}")]
    UnsupportedVersion(u8),
    /// The body is not a valid message.
    #[error("malformed frame body: {0}")]
    Malformed(#[from] postcard::Error),
    /// The body decoded but bytes were left over.
    #[error("{0} trailing bytes after the frame body")]
    TrailingBytes(usize),
    /// The input ended in the middle of a frame.
    #[error("stream ended in the middle of a frame")]
    Truncated,
    /// Reading or writing the underlying stream failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Encode `msg` as one complete frame (header included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Bytes, CodecError> {
    let mut buf = BytesMut::new();
    encode_into(msg, &mut buf, MAX_FRAME_LEN)?;
    Ok(buf.freeze())
}

fn encode_into<T: Serialize>(msg: &T, dst: &mut BytesMut, max: usize) -> Result<(), CodecError> {
    let body = postcard::to_stdvec(msg)?;
    let len = body.len() + 1;
    if len > max {
        return Err(CodecError::TooLarge { len, max });
    }
    dst.reserve(HEADER_LEN + len);
    // `len <= max <= u32::MAX` was checked above.
    dst.put_u32(len as u32);
    dst.put_u8(PROTOCOL_VERSION);
    dst.put_slice(&body);
    Ok(())
}

/// Decode exactly one complete frame from `bytes`; anything else is an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let mut codec = FrameCodec::<T>::new();
    let mut buf = BytesMut::from(bytes);
    match codec.decode(&mut buf)? {
        Some(msg) if buf.is_empty() => Ok(msg),
        Some(_) => Err(CodecError::TrailingBytes(buf.len())),
        None => Err(CodecError::Truncated),
    }
}

fn decode_body<T: DeserializeOwned>(frame: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = frame.split_first().ok_or(CodecError::Empty)?;
    if version != PROTOCOL_VERSION {
        return Err(CodecError::UnsupportedVersion(version));
    }
    let (msg, rest) = postcard::take_from_bytes::<T>(body)?;
    if !rest.is_empty() {
        return Err(CodecError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}

/// A `tokio_util` codec for a stream of frames carrying `T`.
#[derive(Debug)]
pub struct FrameCodec<T> {
    max: usize,
    _msg: PhantomData<fn() -> T>,
}

impl<T> FrameCodec<T> {
    /// A codec with the protocol's [`MAX_FRAME_LEN`].
    pub fn new() -> Self {
        Self::with_max(MAX_FRAME_LEN)
    }

    /// A codec with a custom frame size limit (never above `u32::MAX`).
    pub fn with_max(max: usize) -> Self {
        Self {
            max: max.min(u32::MAX as usize),
            _msg: PhantomData,
        }
    }
}

impl<T> Default for FrameCodec<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: DeserializeOwned> Decoder for FrameCodec<T> {
    type Item = T;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<T>, CodecError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&src[..HEADER_LEN]);
        let len = u32::from_be_bytes(header) as usize;
        if len > self.max {
            return Err(CodecError::TooLarge { len, max: self.max });
        }
        if src.len() < HEADER_LEN + len {
            // Bounded by the check above, so a lying peer cannot make us reserve more.
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let frame = src.split_to(len);
        decode_body(&frame).map(Some)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<T>, CodecError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() => Ok(None),
            None => Err(CodecError::Truncated),
        }
    }
}

impl<T: Serialize> Encoder<T> for FrameCodec<T> {
    type Error = CodecError;

    fn encode(&mut self, item: T, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode_into(&item, dst, self.max)
    }
}

impl<T: Serialize> Encoder<&T> for FrameCodec<T> {
    type Error = CodecError;

    fn encode(&mut self, item: &T, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode_into(item, dst, self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ErrorCode, ErrorReply, Request, Response};

    #[test]
    fn rejects_oversized_length_before_allocating() {
        let mut buf = BytesMut::new();
        buf.put_u32(u32::MAX);
        buf.put_u8(PROTOCOL_VERSION);
        let err = FrameCodec::<Request>::new().decode(&mut buf).unwrap_err();
        assert!(matches!(err, CodecError::TooLarge { .. }));
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn partial_frame_waits_and_eof_mid_frame_errors() {
        let bytes = encode(&Request::Online).unwrap();
        let mut codec = FrameCodec::<Request>::new();
        let mut buf = BytesMut::from(&bytes[..bytes.len() - 1]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(matches!(
            codec.decode_eof(&mut buf),
            Err(CodecError::Truncated)
        ));
        assert!(codec.decode_eof(&mut BytesMut::new()).unwrap().is_none());
    }

    #[test]
    fn rejects_trailing_bytes_and_wrong_version() {
        let mut bytes = encode(&Request::Online).unwrap().to_vec();
        bytes.push(0);
        assert!(matches!(
            decode::<Request>(&bytes),
            Err(CodecError::TrailingBytes(1))
        ));

        let mut bytes = encode(&Request::Online).unwrap().to_vec();
        bytes[HEADER_LEN] = PROTOCOL_VERSION + 1;
        assert!(matches!(
            decode::<Request>(&bytes),
            Err(CodecError::UnsupportedVersion(_))
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for seed in 0u8..=255 {
            let junk: Vec<u8> = (0..64u8)
                .map(|i| i.wrapping_mul(seed).wrapping_add(7))
                .collect();
            // As is, its length prefix (0x07...) is over the limit.
            assert!(matches!(
                decode::<Request>(&junk),
                Err(CodecError::TooLarge { .. })
            ));
            // In a well-formed frame it reaches the body decoder.
            let mut framed = BytesMut::new();
            framed.put_u32(junk.len() as u32 + 1);
            framed.put_u8(PROTOCOL_VERSION);
            framed.put_slice(&junk);
            for result in [
                decode::<Request>(&framed).map(drop),
                decode::<Response>(&framed).map(drop),
            ] {
                assert!(
                    matches!(
                        result,
                        Ok(()) | Err(CodecError::Malformed(_) | CodecError::TrailingBytes(_))
                    ),
                    "{result:?}"
                );
            }
        }
    }

    #[test]
    fn several_frames_in_one_buffer() {
        let mut buf = BytesMut::new();
        let mut codec = FrameCodec::<Response>::new();
        codec.encode(Response::Ok, &mut buf).unwrap();
        let err = Response::Error(ErrorReply::new(ErrorCode::UnknownUser, "no such user"));
        codec.encode(&err, &mut buf).unwrap();
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(Response::Ok));
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(err));
        assert!(buf.is_empty());
    }
}
