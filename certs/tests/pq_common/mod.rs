//! Fixtures shared by `pq_kx.rs` and `pq_policy.rs`: a root, a server and a client
//! identity, classical-only (X25519) rustls peers, and an in-memory handshake driver.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rampart_certs::tls::{self, ServerAuth, SpiffeServerVerifier};
use rampart_certs::{
    CertificateAuthority, CertificateDer, KeyAlgorithm, PrivateKey, RootParams, SpiffeId,
    TrustBundle, TrustDomainPolicy,
};
use rustls::crypto::{CryptoProvider, ring};
use rustls::{ClientConnection, ServerConnection};

pub const SERVER: &str = "spiffe://cluster.local/ns/ns1/sa/server";
pub const CLIENT: &str = "spiffe://cluster.local/ns/ns2/sa/client";

pub fn local() -> TrustDomainPolicy {
    TrustDomainPolicy::local("cluster.local".parse().unwrap())
}

pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKey,
}

pub struct Pki {
    pub ca: CertificateAuthority,
    pub server: Identity,
    pub client: Identity,
}

impl Pki {
    pub fn new() -> Pki {
        // Backdated an hour for clock skew; the leaves live a day, so they are valid for
        // the rest of the test however slow the machine is.
        let now = SystemTime::now() - Duration::from_secs(3600);
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let ca = CertificateAuthority::self_signed_root(&RootParams::default(), key, now).unwrap();
        let issue = |id: &str| {
            let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
            let leaf = ca
                .issue_workload(
                    &key.public_key_spki_der(),
                    &SpiffeId::parse(id).unwrap(),
                    Duration::from_secs(24 * 3600),
                    now,
                )
                .unwrap();
            Identity {
                chain: vec![leaf],
                key,
            }
        };
        let server = issue(SERVER);
        let client = issue(CLIENT);
        Pki { ca, server, client }
    }

    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::from_der(vec![self.ca.root().clone()]).unwrap()
    }

    pub fn spiffe_auth(&self) -> ServerAuth {
        ServerAuth::Spiffe {
            bundle: self.bundle(),
            trust_domains: local(),
            expected: vec![SpiffeId::parse(SERVER).unwrap()],
        }
    }
}

/// Rampart's suites with X25519 as the only group: a classical-only peer.
pub fn classical_provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        kx_groups: vec![ring::kx_group::X25519],
        ..(*tls::provider_for(tls::CompliancePolicy::Default)).clone()
    })
}

/// A rustls client offering X25519 only, verifying our server as a SPIFFE workload.
pub fn classical_client(pki: &Pki) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(classical_provider())
        .with_protocol_versions(tls::PROTOCOL_VERSIONS)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            pki.bundle(),
            local(),
            vec![],
        )))
        .with_no_client_auth()
}

/// A rustls server accepting X25519 only, presenting our server identity.
pub fn classical_server(pki: &Pki) -> rustls::ServerConfig {
    let key =
        rustls::pki_types::PrivateKeyDer::Pkcs8(pki.server.key.secret_pkcs8_der().to_vec().into());
    rustls::ServerConfig::builder_with_provider(classical_provider())
        .with_protocol_versions(tls::PROTOCOL_VERSIONS)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(pki.server.chain.clone(), key)
        .unwrap()
}

#[derive(Debug)]
pub enum Failed {
    /// The client refused or got the server's alert.
    Client(rustls::Error),
    /// The server refused.
    Server(rustls::Error),
}

fn transfer(from: &mut dyn FnMut(&mut Vec<u8>) -> usize) -> Vec<u8> {
    let mut out = Vec::new();
    while from(&mut out) > 0 {}
    out
}

/// Drive a handshake to completion or to the first error, over in-memory buffers.
pub fn handshake(
    client: rustls::ClientConfig,
    server: rustls::ServerConfig,
) -> Result<(ClientConnection, ServerConnection), Failed> {
    let name = "server.ns1.svc".try_into().unwrap();
    let mut c = ClientConnection::new(Arc::new(client), name).unwrap();
    let mut s = ServerConnection::new(Arc::new(server)).unwrap();
    for _ in 0..20 {
        let to_server = transfer(&mut |b| {
            if c.wants_write() {
                c.write_tls(b).unwrap()
            } else {
                0
            }
        });
        if !to_server.is_empty() {
            let mut rd = &to_server[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
            }
            if let Err(e) = s.process_new_packets() {
                // Deliver the server's alert so the client sees it too.
                let alert = transfer(&mut |b| {
                    if s.wants_write() {
                        s.write_tls(b).unwrap()
                    } else {
                        0
                    }
                });
                let mut rd = &alert[..];
                while !rd.is_empty() {
                    if c.read_tls(&mut rd).is_err() {
                        break;
                    }
                }
                let _ = c.process_new_packets();
                return Err(Failed::Server(e));
            }
        }
        let to_client = transfer(&mut |b| {
            if s.wants_write() {
                s.write_tls(b).unwrap()
            } else {
                0
            }
        });
        if !to_client.is_empty() {
            let mut rd = &to_client[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
            }
            c.process_new_packets().map_err(Failed::Client)?;
        }
        if to_server.is_empty() && to_client.is_empty() {
            assert!(
                !c.is_handshaking() && !s.is_handshaking(),
                "handshake stalled"
            );
            return Ok((c, s));
        }
    }
    panic!("handshake did not finish");
}
