//! The relay's view: arbitrary bytes on a request stream.
#![no_main]
use libfuzzer_sys::fuzz_target;
use securechat_common::{codec, Request};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = codec::decode::<Request>(data) {
        // Whatever decodes must re-encode (the relay may log or store it).
        let _ = codec::encode(&req);
        if let Request::Send { envelope } = req {
            let _ = envelope.check_shape();
            let _ = envelope.signed_bytes();
        }
    }
});
