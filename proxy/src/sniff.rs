//! Telling a TLS client from a plaintext one on an inbound port (PERMISSIVE serves both,
//! STRICT refuses plaintext): the proxy peeks at the first byte the client sent.

/// TLS record content type `handshake` (RFC 8446 §5.1): every TLS client's first byte.
const TLS_HANDSHAKE: u8 = 0x16;

/// Whether a connection whose first byte is `first` is a TLS client (terminate mTLS) rather
/// than plaintext.
pub(crate) fn is_tls(first: u8) -> bool {
    first == TLS_HANDSHAKE
}

/// The inbound path for a client that sent `data`: sniff it, and when it looks like TLS feed
/// it (cut into socket reads at `cuts`) to a rustls server configured exactly as the proxy's
/// inbound listener (this workload's certificate, client certificates required). Returns
/// whether it was taken for TLS and whether the handshake completed.
#[cfg(feature = "fuzzing")]
pub(crate) fn inbound_first_bytes(data: &[u8], cuts: &[usize]) -> (bool, bool) {
    use std::sync::{Arc, OnceLock};

    static SERVER: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();
    let Some(&first) = data.first() else {
        return (false, false);
    };
    if !is_tls(first) {
        return (false, false);
    }
    let config = SERVER.get_or_init(fuzz_server_config).clone();
    let mut conn = rustls::ServerConnection::new(config).expect("server connection");
    let mut rest = data;
    for &cut in cuts.iter().chain(std::iter::once(&usize::MAX)) {
        let (mut chunk, tail) = rest.split_at(cut.min(rest.len()));
        rest = tail;
        while !chunk.is_empty() {
            match conn.read_tls(&mut chunk) {
                Ok(0) | Err(_) => return (true, false),
                Ok(_) => {}
            }
            if conn.process_new_packets().is_err() {
                return (true, false);
            }
            // What the server answers goes nowhere (the client never replies).
            let mut sink = Vec::new();
            while conn.wants_write() {
                if conn.write_tls(&mut sink).is_err() {
                    return (true, false);
                }
            }
        }
    }
    (true, !conn.is_handshaking())
}

/// The inbound server configuration of workload `default/fuzz`, from a fresh CA, installed
/// through the same checks as certificates received over SDS.
#[cfg(feature = "fuzzing")]
fn fuzz_server_config() -> std::sync::Arc<rustls::ServerConfig> {
    use std::time::{Duration, SystemTime};

    use rampart_certs::{
        CertificateAuthority, KeyAlgorithm, PrivateKey, RootParams, SpiffeId, TrustDomain,
        TrustDomainPolicy, certs_to_pem,
    };

    let now = SystemTime::now();
    let ca_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("CA key");
    let ca = CertificateAuthority::self_signed_root(&RootParams::default(), ca_key, now)
        .expect("root CA");
    let td = TrustDomain::new("cluster.local").expect("trust domain");
    let id = SpiffeId::istio(&td, "default", "fuzz").expect("SPIFFE ID");
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("workload key");
    let leaf = ca
        .issue_workload(
            &key.public_key_spki_der(),
            &id,
            Duration::from_secs(24 * 3600),
            now,
        )
        .expect("workload certificate");
    let holder = crate::identity::IdentityHolder::new(id, TrustDomainPolicy::local(td));
    holder
        .offer_bundle(&certs_to_pem(&[ca.root().clone()]), "")
        .expect("bundle");
    holder
        .offer_cert(&certs_to_pem(&[leaf]), &key.to_pkcs8_pem())
        .expect("certificate");
    holder.status().expect("installed").server.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_tls_handshake_record_is_tls() {
        assert!(is_tls(0x16));
        // Plaintext HTTP/1.1, the HTTP/2 preface, a TLS alert record, SSLv2-style hello.
        for first in [b'G', b'P', 0x15, 0x80, 0x00] {
            assert!(!is_tls(first), "{first:#x}");
        }
    }
}
