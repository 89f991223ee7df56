//! The node agent's HTTP/2 `:authority` rewrite (`uds_authority`) on arbitrary client bytes: it
//! frames and HPACK-decodes whatever a local process sends on the Unix socket. Never
//! panics; how the bytes are cut into socket reads does not change the result; and its
//! output is a fixed point (rewriting it again gives the same bytes), so every header block
//! it emits decodes and carries an authority it would keep.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rampart_node_agent::fuzzing::authority_rewrite;

fuzz_target!(|data: &[u8]| {
    let Some((cut, stream)) = data.split_first_chunk::<2>() else {
        return;
    };
    let whole = authority_rewrite(&[stream]);
    let at = usize::from(u16::from_be_bytes(*cut)) % (stream.len() + 1);
    let (a, b) = stream.split_at(at);
    let split = authority_rewrite(&[a, b]);
    match (&whole, &split) {
        (Ok(x), Ok(y)) => assert_eq!(x, y, "result depends on read boundaries (cut at {at})"),
        (Err(_), Err(_)) => {}
        _ => panic!("one read: {whole:?}; two reads cut at {at}: {split:?}"),
    }
    if let Ok(out) = whole {
        let again = authority_rewrite(&[&out]).expect("rewritten stream is accepted again");
        assert_eq!(again, out, "rewrite is not a fixed point");
    }
});
