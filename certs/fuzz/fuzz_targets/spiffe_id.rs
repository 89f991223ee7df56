//! SPIFFE ID and trust domain parsing: never panics; whatever parses prints back to
//! exactly the input and parses again to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rampart_certs::{SpiffeId, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(s) {
        assert_eq!(id.to_string(), s);
        assert!(s.len() <= rampart_certs::MAX_SPIFFE_ID_LEN);
        let again = SpiffeId::parse(&id.to_string()).expect("round trip");
        assert_eq!(again, id);
        // Accessors agree with the path.
        if let (Some(ns), Some(sa)) = (id.namespace(), id.service_account()) {
            let rebuilt = SpiffeId::istio(id.trust_domain(), ns, sa).expect("istio form");
            assert_eq!(rebuilt, id);
        }
    }
    if let Ok(td) = TrustDomain::new(s) {
        let again = TrustDomain::new(td.as_str()).expect("round trip");
        assert_eq!(again, td);
    }
});
