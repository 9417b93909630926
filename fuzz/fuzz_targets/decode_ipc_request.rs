//! agentd's view: arbitrary bytes as one line on the local socket, decoded
//! the way agentd's IPC server decodes every request line.
#![no_main]
use libfuzzer_sys::fuzz_target;
use securechat_common::ipc::{decode_line, encode_line, IpcRequest};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = decode_line::<IpcRequest>(data) {
        // Whatever decodes re-encodes within the limit and decodes the same.
        if let Ok(line) = encode_line(&req) {
            let again = decode_line::<IpcRequest>(&line).expect("re-decodes");
            assert!(again == req, "round trip changed the request");
        }
    }
});
