//! JWT and JWK-set parsing on arbitrary text: never panics. A key set that parses
//! re-encodes (`to_json`) to the same keys; a token is parsed and verified against a fixed
//! key set without panicking, and a verified token's accessors never panic.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use rampart_certs::jwt::{self, Jwks, UnverifiedJwt};

/// One key of each type the verifier knows (RFC 7515 A.3 P-256, RFC 8037 A.2 Ed25519,
/// RFC 7638 RSA), so every algorithm path is reachable.
fn keys() -> &'static Jwks {
    static KEYS: OnceLock<Jwks> = OnceLock::new();
    KEYS.get_or_init(|| {
        Jwks::from_json(r#"{"keys":[
            {"kty":"EC","crv":"P-256","kid":"ec",
             "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty":"OKP","crv":"Ed25519","kid":"ed",
             "x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty":"RSA","kid":"rsa","e":"AQAB",
             "n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"}
        ]}"#)
        .expect("fixed key set parses")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    if let Ok(set) = Jwks::parse(text) {
        let again = Jwks::from_json(&set.to_json().to_string()).expect("re-encoded set parses");
        assert_eq!(again.keys(), set.keys());
        for key in set.keys() {
            assert_eq!(key.thumbprint().len(), 43);
        }
    }

    if let Ok(token) = UnverifiedJwt::parse(text) {
        let _ = token.unverified_issuer();
        let _ = token.header().kid();
    }
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    if let Ok(verified) = jwt::verify(text, keys(), now, jwt::DEFAULT_LEEWAY) {
        let _ = (verified.issuer(), verified.subject(), verified.audiences());
        let _ = (
            verified.expires_at(),
            verified.not_before(),
            verified.issued_at(),
        );
        let _ = verified.service_account();
    }
});
