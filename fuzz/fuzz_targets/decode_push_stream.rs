//! agentd's view: arbitrary bytes on the push stream, fed in arbitrary chunks.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use securechat_common::{FrameCodec, Push};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut codec = FrameCodec::<Push>::new();
    let mut buf = BytesMut::new();
    for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = codec.decode_eof(&mut buf);
});
