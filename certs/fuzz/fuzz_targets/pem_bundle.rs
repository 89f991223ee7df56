//! PEM certificate bundles: parsing never panics; what parses re-encodes to PEM that
//! parses to the same certificates; inspecting and building a trust bundle never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rampart_certs::{CertInfo, TrustBundle, certs_to_pem, parse_certs_pem};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(certs) = parse_certs_pem(text) else {
        return;
    };
    let again = parse_certs_pem(&certs_to_pem(&certs)).expect("re-encoded PEM parses");
    assert_eq!(again, certs);
    for cert in &certs {
        let _ = CertInfo::parse(cert);
    }
    if let Ok(bundle) = TrustBundle::from_der(certs) {
        let _ = format!("{bundle:?}");
        let _ = bundle.to_pem();
    }
});
