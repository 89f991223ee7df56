//! The proxy's identity: the workload certificate and trust bundle received over SDS, and the
//! rustls configurations built from them (swapped atomically on every valid push).
//!
//! Fail closed: until both `default` and `ROOTCA` have been received and checked there is no
//! configuration, and every handshake (inbound and outbound) is refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use rampart_certs::tls::{self, ClientAuth, ServerAuth};
use rampart_certs::{
    CertInfo, CertificateDer, PrivateKey, SpiffeId, TrustBundle, TrustDomainPolicy, Usage,
};
use rustls::{ClientConfig, ServerConfig};

/// ALPN choice for a connection the proxy originates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Alpn {
    /// No ALPN (opaque TCP).
    None,
    /// `http/1.1`.
    Http1,
    /// `h2`.
    H2,
}

/// Material installed from SDS plus the configurations built from it.
pub(crate) struct TlsState {
    pub(crate) id: SpiffeId,
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) bundle: TrustBundle,
    pub(crate) trust_domains: TrustDomainPolicy,
    pub(crate) server: Arc<ServerConfig>,
    key: PrivateKey,
    clients: Mutex<HashMap<(SpiffeId, Alpn), Arc<ClientConfig>>>,
    pub(crate) installed_at: SystemTime,
}

impl TlsState {
    /// A client configuration presenting our identity and accepting only `expected`.
    pub(crate) fn client(
        &self,
        expected: &SpiffeId,
        alpn: Alpn,
    ) -> Result<Arc<ClientConfig>, String> {
        let mut map = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&(expected.clone(), alpn)) {
            return Ok(c.clone());
        }
        let mut c = tls::client_config(
            ServerAuth::Spiffe {
                bundle: self.bundle.clone(),
                trust_domains: self.trust_domains.clone(),
                expected: vec![expected.clone()],
            },
            Some((self.chain.clone(), &self.key)),
        )
        .map_err(|e| e.to_string())?;
        c.alpn_protocols = match alpn {
            Alpn::None => vec![],
            Alpn::Http1 => vec![b"http/1.1".to_vec()],
            Alpn::H2 => vec![b"h2".to_vec()],
        };
        let c = Arc::new(c);
        map.insert((expected.clone(), alpn), c.clone());
        Ok(c)
    }
}

/// Pending secrets (as last received) and the installed state.
#[derive(Default)]
struct Pending {
    cert: Option<(Vec<CertificateDer<'static>>, PrivateKey)>,
    bundle: Option<TrustBundle>,
}

/// Holds the current TLS state and rebuilds it when secrets or trust domains change.
pub(crate) struct IdentityHolder {
    pub(crate) expected_id: SpiffeId,
    state: ArcSwapOption<TlsState>,
    pending: Mutex<Pending>,
    trust_domains: Mutex<TrustDomainPolicy>,
}

impl IdentityHolder {
    pub(crate) fn new(expected_id: SpiffeId, trust_domains: TrustDomainPolicy) -> Self {
        IdentityHolder {
            expected_id,
            state: ArcSwapOption::empty(),
            pending: Mutex::new(Pending::default()),
            trust_domains: Mutex::new(trust_domains),
        }
    }

    /// The installed state, if any (none: fail closed).
    pub(crate) fn current(&self) -> Option<Arc<TlsState>> {
        self.state.load_full()
    }

    /// Check a workload certificate pushed as `default`: its SPIFFE ID must be ours, the key
    /// must match, and (when a bundle is known) the chain must verify against it.
    pub(crate) fn offer_cert(&self, chain_pem: &str, key_pem: &str) -> Result<(), String> {
        let chain = rampart_certs::parse_certs_pem(chain_pem)
            .map_err(|e| format!("certificate chain: {e}"))?;
        let leaf = chain.first().ok_or("certificate chain is empty")?;
        let id = tls::leaf_spiffe_id(leaf).map_err(|e| format!("leaf certificate: {e}"))?;
        if id != self.expected_id {
            return Err(format!(
                "certificate identity {id} is not this workload's {}",
                self.expected_id
            ));
        }
        let key = PrivateKey::from_pem(key_pem).map_err(|e| format!("private key: {e}"))?;
        // rustls checks the key matches the leaf.
        tls::server_config(chain.clone(), &key, ClientAuth::None)
            .map_err(|e| format!("certificate and key: {e}"))?;
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let td = self
            .trust_domains
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(bundle) = &p.bundle {
            rampart_certs::verify_workload_cert(
                leaf,
                &chain[1..],
                bundle,
                &td,
                SystemTime::now(),
                Usage::ServerAuth,
            )
            .map_err(|e| format!("certificate does not verify against the trust bundle: {e}"))?;
        }
        p.cert = Some((chain, key));
        self.rebuild(&p, td)
    }

    /// Check a trust bundle pushed as `ROOTCA`.
    pub(crate) fn offer_bundle(&self, pem: &str) -> Result<(), String> {
        let bundle = TrustBundle::from_pem(pem).map_err(|e| format!("trust bundle: {e}"))?;
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.bundle = Some(bundle);
        let td = self
            .trust_domains
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.rebuild(&p, td)
    }

    /// New trust-domain aliases from the mesh folder.
    pub(crate) fn set_trust_domains(&self, td: TrustDomainPolicy) {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let mut cur = self.trust_domains.lock().unwrap_or_else(|e| e.into_inner());
        if *cur == td {
            return;
        }
        *cur = td.clone();
        drop(cur);
        if let Err(e) = self.rebuild(&p, td) {
            tracing::error!(error = %e, "cannot rebuild TLS configuration for new trust domains");
        }
    }

    fn rebuild(&self, p: &Pending, td: TrustDomainPolicy) -> Result<(), String> {
        let (Some((chain, key)), Some(bundle)) = (&p.cert, &p.bundle) else {
            return Ok(());
        };
        let mut server = tls::server_config(
            chain.clone(),
            key,
            ClientAuth::Required {
                bundle: bundle.clone(),
                trust_domains: td.clone(),
            },
        )
        .map_err(|e| e.to_string())?;
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let state = TlsState {
            id: self.expected_id.clone(),
            chain: chain.clone(),
            bundle: bundle.clone(),
            trust_domains: td,
            server: Arc::new(server),
            key: key.clone_key(),
            clients: Mutex::new(HashMap::new()),
            installed_at: SystemTime::now(),
        };
        let serial = CertInfo::parse(&chain[0])
            .map(|i| i.serial_hex)
            .unwrap_or_default();
        tracing::info!(id = %self.expected_id, serial, roots = bundle.roots().len(), "installed certificate and trust bundle");
        self.state.store(Some(Arc::new(state)));
        Ok(())
    }
}

/// Lowercase hex SHA-256 of a DER certificate (the `Hash=` of `x-forwarded-client-cert`).
pub(crate) fn cert_sha256_hex(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}
