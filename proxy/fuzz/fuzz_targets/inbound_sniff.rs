//! The first bytes a client sends to an inbound port: the TLS-or-plaintext sniff and, for
//! what looks like TLS, the proxy's own mTLS server handshake (its inbound rustls
//! configuration: workload certificate, client certificate required). Never panics; how the
//! bytes are cut into reads does not change the outcome; and no byte string completes the
//! handshake (a client without a certificate chaining to the bundle cannot get in).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rampart_proxy::fuzzing::inbound_first_bytes;

fuzz_target!(|data: &[u8]| {
    let Some((cut, stream)) = data.split_first_chunk::<2>() else {
        return;
    };
    let whole = inbound_first_bytes(stream, &[]);
    assert_eq!(whole.0, stream.first() == Some(&0x16));
    assert!(!whole.1, "handshake completed without a client certificate");
    let at = usize::from(u16::from_be_bytes(*cut)) % (stream.len() + 1);
    assert_eq!(inbound_first_bytes(stream, &[at]), whole, "cut at {at}");
});
