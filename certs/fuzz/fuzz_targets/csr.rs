//! CSR parsing and self-signature verification on arbitrary bytes (DER, and PEM when the
//! bytes are text): never panics; a verified CSR's accessors never panic either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rampart_certs::VerifiedCsr;

fuzz_target!(|data: &[u8]| {
    if let Ok(csr) = VerifiedCsr::from_der(data) {
        assert!(!csr.public_key_spki_der().is_empty());
        let _ = csr.requested_spiffe_id();
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(csr) = VerifiedCsr::from_pem(text) {
            let _ = csr.requested_spiffe_id();
        }
    }
});
