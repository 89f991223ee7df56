//! Handshakes between configurations from `rampart_certs::tls`, over in-memory buffers:
//! the right peer is accepted and its SPIFFE ID returned; wrong CA, other trust domain,
//! expired, wrong expected SAN, missing client certificate and a forged handshake
//! signature are refused. A loopback run with `openssl s_client` shows TLS 1.2 is refused
//! and TLS 1.3 with a client certificate works with a peer we did not write.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rampart_certs::tls::{self, ClientAuth, PeerError, ServerAuth};
use rampart_certs::{
    CertificateAuthority, CertificateDer, ChainError, IntermediateParams, KeyAlgorithm, PrivateKey,
    RootParams, SpiffeId, TrustBundle, TrustDomain, TrustDomainPolicy,
};
use rustls::{CertificateError, ClientConnection, ServerConnection};

// === fixtures ===

struct Ca {
    ca: CertificateAuthority,
}

impl Ca {
    fn root(name: &str) -> Ca {
        Self::root_at(name, SystemTime::now() - Duration::from_secs(3 * 24 * 3600))
    }

    fn root_at(name: &str, now: SystemTime) -> Ca {
        let params = RootParams {
            common_name: name.into(),
            ..RootParams::default()
        };
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        Ca {
            ca: CertificateAuthority::self_signed_root(&params, key, now).unwrap(),
        }
    }

    fn intermediate(&self) -> Ca {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let now = SystemTime::now() - Duration::from_secs(24 * 3600);
        let cert = self
            .ca
            .issue_intermediate(
                &IntermediateParams::default(),
                &key.public_key_spki_der(),
                now,
            )
            .unwrap();
        Ca {
            ca: CertificateAuthority::new(cert, key, self.ca.chain_to_root()).unwrap(),
        }
    }

    fn bundle(&self) -> TrustBundle {
        TrustBundle::from_der(vec![self.ca.root().clone()]).unwrap()
    }

    /// A workload identity, issued `age` ago for `ttl`; the chain excludes the root.
    fn workload_issued(&self, id: &str, age: Duration, ttl: Duration) -> Identity {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let id = SpiffeId::parse(id).unwrap();
        let leaf = self
            .ca
            .issue_workload(
                &key.public_key_spki_der(),
                &id,
                ttl,
                SystemTime::now() - age,
            )
            .unwrap();
        let mut chain = vec![leaf];
        let to_root = self.ca.chain_to_root();
        chain.extend(to_root[..to_root.len() - 1].iter().cloned());
        Identity { chain, key }
    }

    fn workload(&self, id: &str) -> Identity {
        self.workload_issued(id, Duration::ZERO, Duration::from_secs(3600))
    }
}

struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKey,
}

impl Identity {
    fn pair(&self) -> Option<(Vec<CertificateDer<'static>>, &PrivateKey)> {
        Some((self.chain.clone(), &self.key))
    }
}

fn td(name: &str) -> TrustDomain {
    name.parse().unwrap()
}

fn local() -> TrustDomainPolicy {
    TrustDomainPolicy::local(td("cluster.local"))
}

const SERVER: &str = "spiffe://cluster.local/ns/ns1/sa/server";
const CLIENT: &str = "spiffe://cluster.local/ns/ns2/sa/client";

fn spiffe_client(bundle: TrustBundle, expected: &[&str]) -> ServerAuth {
    ServerAuth::Spiffe {
        bundle,
        trust_domains: local(),
        expected: expected
            .iter()
            .map(|e| SpiffeId::parse(e).unwrap())
            .collect(),
    }
}

// === in-memory handshake ===

#[derive(Debug)]
enum Failed {
    /// The client refused (the server's certificate, or the server's alert).
    Client(rustls::Error),
    /// The server refused.
    Server(rustls::Error),
}

fn pump(from: &mut dyn FnMut(&mut Vec<u8>) -> bool, buf: &mut Vec<u8>) -> bool {
    buf.clear();
    let mut moved = false;
    while from(buf) {
        moved = true;
    }
    moved
}

/// Drive a handshake to completion (both sides done and quiet) or to the first error.
fn handshake(
    client: rustls::ClientConfig,
    server: rustls::ServerConfig,
    name: &str,
) -> Result<(ClientConnection, ServerConnection), Failed> {
    let mut c =
        ClientConnection::new(Arc::new(client), name.to_owned().try_into().unwrap()).unwrap();
    let mut s = ServerConnection::new(Arc::new(server)).unwrap();
    let mut buf = Vec::new();
    for _ in 0..20 {
        let c_sent = pump(
            &mut |b| c.wants_write() && c.write_tls(b).unwrap() > 0,
            &mut buf,
        );
        if c_sent {
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
            }
            s.process_new_packets().map_err(Failed::Server)?;
        }
        let s_sent = pump(
            &mut |b| s.wants_write() && s.write_tls(b).unwrap() > 0,
            &mut buf,
        );
        if s_sent {
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
            }
            c.process_new_packets().map_err(Failed::Client)?;
        }
        if !c_sent && !s_sent {
            assert!(
                !c.is_handshaking() && !s.is_handshaking(),
                "handshake stalled"
            );
            return Ok((c, s));
        }
    }
    panic!("handshake did not finish");
}

fn server_refused(result: Result<(ClientConnection, ServerConnection), Failed>) -> rustls::Error {
    match result {
        Err(Failed::Server(e)) => e,
        other => panic!("expected the server to refuse, got {other:?}"),
    }
}

fn client_refused(result: Result<(ClientConnection, ServerConnection), Failed>) -> rustls::Error {
    match result {
        Err(Failed::Client(e)) => e,
        other => panic!("expected the client to refuse, got {other:?}"),
    }
}

// === mesh mTLS ===

#[test]
fn mutual_spiffe_handshake_returns_both_identities() {
    let ca = Ca::root("A");
    let server = ca.workload(SERVER);
    let client = ca.workload(CLIENT);
    let mut server_cfg = tls::server_config(
        server.chain.clone(),
        &server.key,
        ClientAuth::Required {
            bundle: ca.bundle(),
            trust_domains: local(),
        },
    )
    .unwrap();
    server_cfg.alpn_protocols = vec![b"h2".to_vec()];
    let mut client_cfg =
        tls::client_config(spiffe_client(ca.bundle(), &[SERVER]), client.pair()).unwrap();
    client_cfg.alpn_protocols = vec![b"h2".to_vec()];

    let (c, s) = handshake(
        client_cfg,
        server_cfg,
        "outbound_.8080_._.b.ns1.svc.cluster.local",
    )
    .unwrap();
    assert_eq!(
        tls::peer_spiffe_id(&s).unwrap().unwrap().to_string(),
        CLIENT
    );
    assert_eq!(
        tls::peer_spiffe_id(&c).unwrap().unwrap().to_string(),
        SERVER
    );
    assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(c.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        c.negotiated_cipher_suite().unwrap().suite(),
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
    );
    assert_eq!(
        c.negotiated_key_exchange_group().unwrap().name(),
        rustls::NamedGroup::X25519MLKEM768
    );
}

#[test]
fn sessions_are_never_resumed() {
    let ca = Ca::root("A");
    let server = ca.workload(SERVER);
    let client = ca.workload(CLIENT);
    let server_cfg = Arc::new(
        tls::server_config(
            server.chain.clone(),
            &server.key,
            ClientAuth::Required {
                bundle: ca.bundle(),
                trust_domains: local(),
            },
        )
        .unwrap(),
    );
    let client_cfg =
        Arc::new(tls::client_config(spiffe_client(ca.bundle(), &[]), client.pair()).unwrap());
    for _ in 0..2 {
        let (c, _) = handshake(
            Arc::unwrap_or_clone(client_cfg.clone()),
            Arc::unwrap_or_clone(server_cfg.clone()),
            "x",
        )
        .unwrap();
        assert_eq!(c.handshake_kind(), Some(rustls::HandshakeKind::Full));
    }
    // Negative twin: the same configurations with rustls's default resumption settings do
    // resume, so the check above can see resumption.
    let mut server_cfg = Arc::unwrap_or_clone(server_cfg);
    server_cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(16);
    server_cfg.send_tls13_tickets = 2;
    let mut client_cfg = Arc::unwrap_or_clone(client_cfg);
    client_cfg.resumption = rustls::client::Resumption::in_memory_sessions(16);
    let kinds: Vec<_> = (0..2)
        .map(|_| {
            let (c, _) = handshake(client_cfg.clone(), server_cfg.clone(), "x").unwrap();
            c.handshake_kind()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            Some(rustls::HandshakeKind::Full),
            Some(rustls::HandshakeKind::Resumed)
        ]
    );
}

#[test]
fn intermediates_are_followed_to_the_root() {
    let root = Ca::root("A");
    let inter = root.intermediate();
    let server = inter.workload(SERVER);
    let client = inter.workload(CLIENT);
    assert_eq!(server.chain.len(), 2);
    let server_cfg = tls::server_config(
        server.chain.clone(),
        &server.key,
        ClientAuth::Required {
            bundle: root.bundle(),
            trust_domains: local(),
        },
    )
    .unwrap();
    let client_cfg = tls::client_config(spiffe_client(root.bundle(), &[]), client.pair()).unwrap();
    let (_, s) = handshake(client_cfg, server_cfg, "any").unwrap();
    assert_eq!(
        tls::peer_spiffe_id(&s).unwrap().unwrap().to_string(),
        CLIENT
    );
}

#[test]
fn a_server_from_another_ca_is_refused() {
    let ours = Ca::root("ours");
    let theirs = Ca::root("theirs");
    let server = theirs.workload(SERVER);
    let server_cfg =
        tls::server_config(server.chain.clone(), &server.key, ClientAuth::None).unwrap();
    let client_cfg = tls::client_config(spiffe_client(ours.bundle(), &[SERVER]), None).unwrap();
    let err = client_refused(handshake(client_cfg, server_cfg, "x"));
    assert_eq!(
        err,
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
}

#[test]
fn a_client_from_another_ca_is_refused() {
    let ours = Ca::root("ours");
    let theirs = Ca::root("theirs");
    let server = ours.workload(SERVER);
    let client = theirs.workload(CLIENT);
    let server_cfg = tls::server_config(
        server.chain.clone(),
        &server.key,
        ClientAuth::Required {
            bundle: ours.bundle(),
            trust_domains: local(),
        },
    )
    .unwrap();
    let client_cfg = tls::client_config(spiffe_client(ours.bundle(), &[]), client.pair()).unwrap();
    let err = server_refused(handshake(client_cfg, server_cfg, "x"));
    assert_eq!(
        err,
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
}

#[test]
fn another_trust_domain_is_refused_unless_aliased() {
    let ca = Ca::root("A");
    let server = ca.workload(SERVER);
    let foreign = ca.workload("spiffe://other.domain/ns/ns2/sa/client");
    let server_cfg = |trust_domains| {
        tls::server_config(
            server.chain.clone(),
            &server.key,
            ClientAuth::Required {
                bundle: ca.bundle(),
                trust_domains,
            },
        )
        .unwrap()
    };
    let client_cfg =
        || tls::client_config(spiffe_client(ca.bundle(), &[]), foreign.pair()).unwrap();

    let err = server_refused(handshake(client_cfg(), server_cfg(local()), "x"));
    match tls::peer_error(&err) {
        Some(PeerError::Chain(ChainError::ForeignTrustDomain { trust_domain, .. })) => {
            assert_eq!(trust_domain.as_str(), "other.domain");
        }
        other => panic!("{err}: {other:?}"),
    }

    let aliased = TrustDomainPolicy::with_aliases(td("cluster.local"), vec![td("other.domain")]);
    let (_, s) = handshake(client_cfg(), server_cfg(aliased), "x").unwrap();
    assert_eq!(
        tls::peer_spiffe_id(&s)
            .unwrap()
            .unwrap()
            .trust_domain()
            .as_str(),
        "other.domain"
    );

    // And the client side: a server from another trust domain.
    let foreign_server = ca.workload("spiffe://other.domain/ns/ns1/sa/server");
    let server_cfg = tls::server_config(
        foreign_server.chain.clone(),
        &foreign_server.key,
        ClientAuth::None,
    )
    .unwrap();
    let client_cfg = tls::client_config(spiffe_client(ca.bundle(), &[]), None).unwrap();
    let err = client_refused(handshake(client_cfg, server_cfg, "x"));
    assert!(
        matches!(
            tls::peer_error(&err),
            Some(PeerError::Chain(ChainError::ForeignTrustDomain { .. }))
        ),
        "{err}"
    );
}

#[test]
fn expired_certificates_are_refused_on_both_sides() {
    let ca = Ca::root("A");
    let fresh_server = ca.workload(SERVER);
    let expired_server = ca.workload_issued(
        SERVER,
        Duration::from_secs(48 * 3600),
        Duration::from_secs(3600),
    );
    let expired_client = ca.workload_issued(
        CLIENT,
        Duration::from_secs(48 * 3600),
        Duration::from_secs(3600),
    );

    let server_cfg = tls::server_config(
        expired_server.chain.clone(),
        &expired_server.key,
        ClientAuth::None,
    )
    .unwrap();
    let client_cfg = tls::client_config(spiffe_client(ca.bundle(), &[]), None).unwrap();
    let err = client_refused(handshake(client_cfg, server_cfg, "x"));
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
        ),
        "{err}"
    );

    let server_cfg = tls::server_config(
        fresh_server.chain.clone(),
        &fresh_server.key,
        ClientAuth::Required {
            bundle: ca.bundle(),
            trust_domains: local(),
        },
    )
    .unwrap();
    let client_cfg =
        tls::client_config(spiffe_client(ca.bundle(), &[]), expired_client.pair()).unwrap();
    let err = server_refused(handshake(client_cfg, server_cfg, "x"));
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
        ),
        "{err}"
    );
}

#[test]
fn a_server_with_an_unexpected_identity_is_refused() {
    let ca = Ca::root("A");
    let server = ca.workload(SERVER);
    let server_cfg =
        || tls::server_config(server.chain.clone(), &server.key, ClientAuth::None).unwrap();
    let want = "spiffe://cluster.local/ns/ns1/sa/payments";
    let client_cfg = tls::client_config(spiffe_client(ca.bundle(), &[want]), None).unwrap();
    let err = client_refused(handshake(client_cfg, server_cfg(), "x"));
    match tls::peer_error(&err) {
        Some(PeerError::UnexpectedIdentity { expected, found }) => {
            assert_eq!(found.to_string(), SERVER);
            assert_eq!(expected[0].to_string(), want);
        }
        other => panic!("{err}: {other:?}"),
    }
    // Its positive twin: the same server is accepted when it is one of the expected.
    let client_cfg = tls::client_config(spiffe_client(ca.bundle(), &[want, SERVER]), None).unwrap();
    assert!(handshake(client_cfg, server_cfg(), "x").is_ok());
}

#[test]
fn required_client_auth_refuses_a_client_without_certificate() {
    let ca = Ca::root("A");
    let server = ca.workload(SERVER);
    let server_cfg = tls::server_config(
        server.chain.clone(),
        &server.key,
        ClientAuth::Required {
            bundle: ca.bundle(),
            trust_domains: local(),
        },
    )
    .unwrap();
    let client_cfg = tls::client_config(spiffe_client(ca.bundle(), &[]), None).unwrap();
    let err = server_refused(handshake(client_cfg, server_cfg, "x"));
    assert_eq!(err, rustls::Error::NoCertificatesPresented);
}

#[test]
fn deferred_client_auth_accepts_no_certificate_and_the_chain_is_judged_after() {
    let ca = Ca::root("A");
    let other = Ca::root("B");
    let server = ca.workload(SERVER);
    let store = Arc::new(tls::CertStore::new());
    store.set(tls::certified_key(server.chain.clone(), &server.key).unwrap());
    let server_cfg = || {
        tls::server_config_with(
            store.clone(),
            Some(Arc::new(tls::danger::DeferredClientVerifier::new())),
        )
        .unwrap()
    };
    let client_cfg = |id: Option<&Identity>| {
        tls::client_config(spiffe_client(ca.bundle(), &[]), id.and_then(Identity::pair)).unwrap()
    };
    // What the server checks once the handshake is done (the CA, per request).
    let judge = tls::SpiffeClientVerifier::required(ca.bundle(), local());
    let chain = |s: &ServerConnection| -> Vec<CertificateDer<'static>> {
        s.peer_certificates().unwrap_or_default().to_vec()
    };

    let (_, s) = handshake(client_cfg(None), server_cfg(), "x").unwrap();
    assert_eq!(tls::peer_spiffe_id(&s).unwrap(), None);

    let good = ca.workload(CLIENT);
    let (_, s) = handshake(client_cfg(Some(&good)), server_cfg(), "x").unwrap();
    assert_eq!(
        judge
            .verify_chain(&chain(&s), SystemTime::now())
            .unwrap()
            .to_string(),
        CLIENT
    );

    // A foreign certificate passes the handshake (its key is proved) and is refused by the
    // deferred check.
    let bad = other.workload(CLIENT);
    let (_, s) = handshake(client_cfg(Some(&bad)), server_cfg(), "x").unwrap();
    assert_eq!(
        judge.verify_chain(&chain(&s), SystemTime::now()),
        Err(ChainError::UnknownIssuer)
    );
    assert_eq!(
        judge.verify_chain(&[], SystemTime::now()),
        Err(ChainError::EmptyChain)
    );
}

#[test]
fn a_certificate_without_spiffe_id_is_refused() {
    let ca = Ca::root("A");
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let leaf = ca
        .ca
        .issue_server(
            &key.public_key_spki_der(),
            &["istiod.istio-system.svc".into()],
            &[],
            None,
            Duration::from_secs(3600),
            SystemTime::now(),
        )
        .unwrap();
    let server_cfg = tls::server_config(vec![leaf], &key, ClientAuth::None).unwrap();
    let client_cfg = tls::client_config(spiffe_client(ca.bundle(), &[]), None).unwrap();
    let err = client_refused(handshake(client_cfg, server_cfg, "x"));
    assert_eq!(
        tls::peer_error(&err),
        Some(&PeerError::Chain(ChainError::NoSpiffeId))
    );
}

#[test]
fn the_handshake_signature_is_still_checked() {
    // A server presenting a valid certificate whose key it does not hold: it signs the
    // handshake with another key. Only rustls's signature check can catch this.
    let ca = Ca::root("A");
    let server = ca.workload(SERVER);
    let impostor_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let signing_key = tls::provider()
        .key_provider
        .load_private_key(rustls::pki_types::PrivateKeyDer::Pkcs8(
            impostor_key.secret_pkcs8_der().to_vec().into(),
        ))
        .unwrap();
    let certified = Arc::new(rustls::sign::CertifiedKey::new(
        server.chain.clone(),
        signing_key,
    ));
    #[derive(Debug)]
    struct Fixed(Arc<rustls::sign::CertifiedKey>);
    impl rustls::server::ResolvesServerCert for Fixed {
        fn resolve(
            &self,
            _: rustls::server::ClientHello<'_>,
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            Some(self.0.clone())
        }
    }
    let server_cfg = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(tls::PROTOCOL_VERSIONS)
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(certified)));
    let client_cfg = tls::client_config(spiffe_client(ca.bundle(), &[SERVER]), None).unwrap();
    let err = client_refused(handshake(client_cfg, server_cfg, "x"));
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::BadSignature)
        ),
        "{err}"
    );

    // And rustls refuses to build a config whose key does not match its leaf.
    assert!(matches!(
        tls::server_config(server.chain.clone(), &impostor_key, ClientAuth::None),
        Err(tls::TlsError::Config(_))
    ));
}

// === DNS verification (node agent -> CA) ===

#[test]
fn dns_verifier_checks_names_and_addresses_against_the_bundle() {
    let ca = Ca::root("A");
    let other = Ca::root("B");
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let leaf = ca
        .ca
        .issue_server(
            &key.public_key_spki_der(),
            &["istiod.istio-system.svc".into()],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            None,
            Duration::from_secs(3600),
            SystemTime::now(),
        )
        .unwrap();
    let server_cfg = || tls::server_config(vec![leaf.clone()], &key, ClientAuth::None).unwrap();
    let dns = |bundle| tls::client_config(ServerAuth::Dns { bundle }, None).unwrap();

    assert!(handshake(dns(ca.bundle()), server_cfg(), "istiod.istio-system.svc").is_ok());
    assert!(handshake(dns(ca.bundle()), server_cfg(), "127.0.0.1").is_ok());

    let err = client_refused(handshake(dns(ca.bundle()), server_cfg(), "evil.example"));
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            )
        ),
        "{err}"
    );
    let err = client_refused(handshake(dns(ca.bundle()), server_cfg(), "127.0.0.2"));
    assert!(matches!(err, rustls::Error::InvalidCertificate(_)), "{err}");
    let err = client_refused(handshake(
        dns(other.bundle()),
        server_cfg(),
        "istiod.istio-system.svc",
    ));
    assert_eq!(
        err,
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
}

// === policy ===

#[test]
fn the_provider_is_tls13_only_with_the_listed_suites_and_groups() {
    let p = tls::provider();
    let suites: Vec<_> = p.cipher_suites.iter().map(|s| s.suite()).collect();
    assert_eq!(
        suites,
        [
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        ]
    );
    assert!(
        p.cipher_suites
            .iter()
            .all(|s| s.version() == &rustls::version::TLS13)
    );
    let groups: Vec<_> = p.kx_groups.iter().map(|g| g.name()).collect();
    assert_eq!(
        groups,
        [
            rustls::NamedGroup::X25519MLKEM768,
            rustls::NamedGroup::X25519,
            rustls::NamedGroup::secp256r1,
            rustls::NamedGroup::secp384r1,
        ]
    );
    assert_eq!(tls::PROTOCOL_VERSIONS, [&rustls::version::TLS13]);
}

// === a peer we did not write: openssl s_client over loopback ===

/// Serve one TLS connection with `config` on a loopback port; report the client's SPIFFE
/// ID or the error.
fn serve_once(
    config: rustls::ServerConfig,
) -> (u16, std::thread::JoinHandle<Result<Option<String>, String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let (mut sock, _) = listener.accept().map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        sock.set_write_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut conn = ServerConnection::new(Arc::new(config)).unwrap();
        while conn.is_handshaking() {
            if let Err(e) = conn.complete_io(&mut sock) {
                // Send the alert if rustls queued one, then report.
                let _ = conn.write_tls(&mut sock);
                return Err(e.to_string());
            }
        }
        let id = tls::peer_spiffe_id(&conn)
            .map_err(|e| e.to_string())?
            .map(|id| id.to_string());
        let mut stream = rustls::Stream::new(&mut conn, &mut sock);
        stream.write_all(b"hello\n").map_err(|e| e.to_string())?;
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        Ok(id)
    });
    (port, handle)
}

fn s_client(port: u16, args: &[&str]) -> std::process::Output {
    let mut child = Command::new("openssl")
        .arg("s_client")
        .arg("-connect")
        .arg(format!("127.0.0.1:{port}"))
        .args(["-servername", "istiod.istio-system.svc"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl must be installed");
    drop(child.stdin.take());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("openssl s_client did not finish in 30s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn openssl_tls12_is_refused_and_tls13_with_a_client_certificate_works() {
    let ca = Ca::root("A");
    let server = ca.workload(SERVER);
    let client = ca.workload(CLIENT);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("root.pem");
    std::fs::write(&ca_file, ca.bundle().to_pem()).unwrap();
    let cert_file = dir.path().join("client.pem");
    std::fs::write(&cert_file, rampart_certs::certs_to_pem(&client.chain)).unwrap();
    let key_file = dir.path().join("client-key.pem");
    client.key.write_pem_file(&key_file).unwrap();
    let config = || {
        tls::server_config(
            server.chain.clone(),
            &server.key,
            ClientAuth::Required {
                bundle: ca.bundle(),
                trust_domains: local(),
            },
        )
        .unwrap()
    };

    // TLS 1.2 only: no shared version.
    let (port, handle) = serve_once(config());
    let out = s_client(port, &["-tls1_2"]);
    assert!(!out.status.success(), "openssl TLS 1.2 handshake succeeded");
    let err = handle.join().unwrap().unwrap_err();
    assert!(err.contains("peer is incompatible"), "{err}");

    // TLS 1.3 with a client certificate: openssl verifies our chain, we verify its.
    let (port, handle) = serve_once(config());
    let out = s_client(
        port,
        &[
            "-tls1_3",
            "-CAfile",
            ca_file.to_str().unwrap(),
            "-verify_return_error",
            "-cert",
            cert_file.to_str().unwrap(),
            "-key",
            key_file.to_str().unwrap(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Verify return code: 0 (ok)"), "{stdout}");
    assert!(stdout.contains("TLSv1.3"), "{stdout}");
    assert_eq!(handle.join().unwrap().unwrap().as_deref(), Some(CLIENT));
}

// === rotation without rebuilding configurations ===

#[test]
fn an_empty_cert_store_fails_closed_and_rotation_is_picked_up() {
    let ca = Ca::root("A");
    let store = Arc::new(tls::CertStore::new());
    let server_cfg = tls::server_config_with(store.clone(), None).unwrap();
    let client_cfg = tls::client_config(spiffe_client(ca.bundle(), &[]), None).unwrap();

    // Nothing to present yet: the server refuses, it does not fall back to anything.
    assert!(matches!(
        handshake(client_cfg.clone(), server_cfg.clone(), "x"),
        Err(Failed::Server(_))
    ));

    let first = ca.workload(SERVER);
    store.set(tls::certified_key(first.chain.clone(), &first.key).unwrap());
    let (c, _) = handshake(client_cfg.clone(), server_cfg.clone(), "x").unwrap();
    assert_eq!(
        tls::peer_spiffe_id(&c).unwrap().unwrap().to_string(),
        SERVER
    );

    let renamed = "spiffe://cluster.local/ns/ns1/sa/server-v2";
    let second = ca.workload(renamed);
    store.set(tls::certified_key(second.chain.clone(), &second.key).unwrap());
    let (c, _) = handshake(client_cfg, server_cfg, "x").unwrap();
    assert_eq!(
        tls::peer_spiffe_id(&c).unwrap().unwrap().to_string(),
        renamed
    );

    // A key that does not match its certificate is refused when loaded.
    assert!(tls::certified_key(first.chain.clone(), &second.key).is_err());
    assert!(matches!(
        tls::certified_key(Vec::new(), &first.key),
        Err(tls::TlsError::EmptyChain)
    ));
}

#[test]
fn verifier_trust_can_be_rotated_in_place() {
    let old = Ca::root("old");
    let new = Ca::root("new");
    let server = old.workload(SERVER);
    let client_new = new.workload(CLIENT);

    let verifier = Arc::new(tls::SpiffeClientVerifier::required(old.bundle(), local()));
    let store = Arc::new(tls::CertStore::new());
    store.set(tls::certified_key(server.chain.clone(), &server.key).unwrap());
    let server_cfg = tls::server_config_with(store, Some(verifier.clone())).unwrap();

    let client_store = Arc::new(tls::CertStore::new());
    client_store.set(tls::certified_key(client_new.chain.clone(), &client_new.key).unwrap());
    let server_verifier = Arc::new(tls::SpiffeServerVerifier::new(
        old.bundle(),
        local(),
        Vec::new(),
    ));
    let client_cfg = tls::client_config_with(server_verifier.clone(), Some(client_store)).unwrap();

    // The client's certificate is from the new root, which the server does not trust yet.
    let err = server_refused(handshake(client_cfg.clone(), server_cfg.clone(), "x"));
    assert_eq!(
        err,
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );

    // Overlap: both roots trusted, same configuration objects.
    verifier.set_trust(old.bundle().merge(&new.bundle()), local());
    let (_, s) = handshake(client_cfg.clone(), server_cfg.clone(), "x").unwrap();
    assert_eq!(
        tls::peer_spiffe_id(&s).unwrap().unwrap().to_string(),
        CLIENT
    );

    // The client drops the old root: the server (still on the old root) is refused.
    server_verifier.set_trust(new.bundle(), local());
    let err = client_refused(handshake(client_cfg, server_cfg, "x"));
    assert_eq!(
        err,
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
}

#[test]
fn a_revoked_client_is_refused_by_the_server_verifier_and_another_is_not() {
    let root = Ca::root("R");
    let inter = root.intermediate();
    let server = inter.workload(SERVER);
    let revoked = inter.workload(CLIENT);
    let fine = inter.workload("spiffe://cluster.local/ns/ns3/sa/fine");
    let serial = rampart_certs::CertInfo::parse(&revoked.chain[0])
        .unwrap()
        .serial_hex;
    let now = SystemTime::now();
    let crl = inter
        .ca
        .sign_crl(&rampart_certs::CrlParams {
            this_update: now,
            next_update: now + Duration::from_secs(600),
            crl_number: 1,
            revoked: vec![rampart_certs::RevokedCert {
                serial_hex: serial.clone(),
                revoked_at: now,
                reason: Some(rampart_certs::RevocationReason::KeyCompromise),
            }],
        })
        .unwrap();
    let set = rampart_certs::CrlSet::new(
        vec![crl],
        &[inter.ca.cert().clone()],
        now,
        rampart_certs::CrlExpiry::Refuse,
    )
    .unwrap();

    let verifier = Arc::new(tls::SpiffeClientVerifier::required(root.bundle(), local()));
    let store = Arc::new(tls::CertStore::new());
    store.set(tls::certified_key(server.chain.clone(), &server.key).unwrap());
    let server_cfg = tls::server_config_with(store, Some(verifier.clone())).unwrap();
    let client_for = |who: &Identity| {
        tls::client_config(spiffe_client(root.bundle(), &[SERVER]), who.pair()).unwrap()
    };
    // Before the CRL is installed the client is accepted.
    handshake(client_for(&revoked), server_cfg.clone(), "x").unwrap();
    verifier.set_revocation(Some(rampart_certs::RevocationCheck::new(
        set,
        rampart_certs::UnknownStatus::Allow,
    )));
    let err = server_refused(handshake(client_for(&revoked), server_cfg.clone(), "x"));
    match tls::peer_error(&err) {
        Some(PeerError::Chain(ChainError::Revoked {
            serial: s, subject, ..
        })) => {
            assert_eq!(*s, serial);
            assert_eq!(subject, CLIENT);
        }
        other => panic!("expected a revocation refusal, got {other:?} ({err})"),
    }
    let (_, s) = handshake(client_for(&fine), server_cfg.clone(), "x").unwrap();
    assert_eq!(
        tls::peer_spiffe_id(&s).unwrap().unwrap().to_string(),
        "spiffe://cluster.local/ns/ns3/sa/fine"
    );
    // Removing the check lets the revoked client back in.
    verifier.set_revocation(None);
    handshake(client_for(&revoked), server_cfg, "x").unwrap();
}

#[test]
fn a_revoked_server_is_refused_by_the_client_verifier_and_another_is_not() {
    let root = Ca::root("R");
    let inter = root.intermediate();
    let revoked = inter.workload(SERVER);
    let fine = inter.workload(SERVER);
    let client = inter.workload(CLIENT);
    let now = SystemTime::now();
    let serial = rampart_certs::CertInfo::parse(&revoked.chain[0])
        .unwrap()
        .serial_hex;
    let crl = inter
        .ca
        .sign_crl(&rampart_certs::CrlParams {
            this_update: now,
            next_update: now + Duration::from_secs(600),
            crl_number: 1,
            revoked: vec![rampart_certs::RevokedCert {
                serial_hex: serial.clone(),
                revoked_at: now,
                reason: None,
            }],
        })
        .unwrap();
    let set = rampart_certs::CrlSet::new(
        vec![crl],
        &[inter.ca.cert().clone()],
        now,
        rampart_certs::CrlExpiry::Refuse,
    )
    .unwrap();
    let verifier = Arc::new(tls::SpiffeServerVerifier::new(
        root.bundle(),
        local(),
        vec![SpiffeId::parse(SERVER).unwrap()],
    ));
    verifier.set_revocation(Some(rampart_certs::RevocationCheck::new(
        set,
        rampart_certs::UnknownStatus::Allow,
    )));
    assert!(verifier.revocation().is_some());
    let client_cfg = tls::client_config_with_verifier(verifier, client.pair()).unwrap();
    let server_for = |who: &Identity| {
        tls::server_config(
            who.chain.clone(),
            &who.key,
            ClientAuth::Required {
                bundle: root.bundle(),
                trust_domains: local(),
            },
        )
        .unwrap()
    };
    let err = client_refused(handshake(client_cfg.clone(), server_for(&revoked), "x"));
    match tls::peer_error(&err) {
        Some(PeerError::Chain(ChainError::Revoked { serial: s, .. })) => assert_eq!(*s, serial),
        other => panic!("expected a revocation refusal, got {other:?} ({err})"),
    }
    handshake(client_cfg, server_for(&fine), "x").unwrap();
}
