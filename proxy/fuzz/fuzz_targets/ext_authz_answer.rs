//! What a CUSTOM policy's gRPC provider answers (`envoy.service.auth.v3.CheckResponse`
//! bytes), decoded and applied as the inbound applies it. A provider is trusted with its
//! verdict, not with the proxy: no answer panics, removes `Host`, passes hop-by-hop or
//! framing headers (`Content-Length`, `Transfer-Encoding`, ...) to the app or the client, or
//! gives the client a status outside 200-599.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rampart_proxy::fuzzing::ext_authz_answer;

fuzz_target!(|data: &[u8]| {
    let _ = ext_authz_answer(data);
});
