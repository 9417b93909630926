//! agentd's view: arbitrary bytes as the relay's answer to a request.
#![no_main]
use libfuzzer_sys::fuzz_target;
use securechat_common::{codec, Response};

fuzz_target!(|data: &[u8]| {
    let _ = codec::decode::<Response>(data);
});
