//! CRLs: `parse_crls` (PEM or DER) never panics; what parses re-encodes to PEM that parses
//! to the same CRLs; accessors, validation against a fixed issuer (`CrlSet::new`, which
//! must refuse every fuzzed CRL: none is signed by the fuzzer's fresh key) and lookups
//! never panic.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use rampart_certs::{
    CertificateAuthority, CertificateDer, CrlExpiry, CrlSet, KeyAlgorithm, PrivateKey, RootParams,
    crls_to_pem, parse_crls, parse_serial_hex,
};

fn issuer() -> &'static CertificateDer<'static> {
    static CA: OnceLock<CertificateDer<'static>> = OnceLock::new();
    CA.get_or_init(|| {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
        CertificateAuthority::self_signed_root(&RootParams::default(), key, SystemTime::now())
            .expect("root")
            .cert()
            .clone()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(crls) = parse_crls(data) else {
        return;
    };
    let again = parse_crls(crls_to_pem(&crls).as_bytes()).expect("re-encoded PEM parses");
    assert_eq!(again, crls);
    for crl in &crls {
        let _ = format!("{crl:?}");
        let _ = (crl.issuer(), crl.this_update(), crl.next_update(), crl.crl_number_hex());
        for entry in crl.revoked_certs() {
            let value = parse_serial_hex(&entry.serial_hex).expect("our own hex parses");
            assert!(crl.find_serial(&value).is_some());
        }
        let _ = crl.is_expired(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
    }
    let issuers = [issuer().clone()];
    let set = CrlSet::new(crls, &issuers, SystemTime::now(), CrlExpiry::Keep);
    assert!(set.is_err(), "a fuzzed CRL validated against a key made in this run");
    let empty = CrlSet::empty();
    assert!(!empty.covers(issuer()));
    assert!(empty.revoked(issuer(), &[1]).is_none());
});
