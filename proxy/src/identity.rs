//! The proxy's identity: the workload certificate and trust bundle received over SDS, and the
//! rustls configurations built from them (swapped atomically on every valid push).
//!
//! Fail closed: until both `default` and `ROOTCA` have been received and checked there is no
//! configuration, and every handshake (inbound and outbound) is refused. The certificate is
//! rechecked against the bundle whenever either changes, and its validity window at every
//! use (see [`IdentityHolder`]).
//!
//! Revocation: the `ROOTCA` secret may carry CRLs (`validation_context.crl`, as Istio's agent
//! serves them to Envoy). They are validated against the bundle's roots and our chain's
//! intermediates (a set with a CRL that does not verify is NACKed; the last good set stays),
//! installed in both verifiers, so every later handshake (inbound and outbound) refuses a
//! revoked peer, and established connections whose peer is now revoked are closed
//! ([`crate::peers`]). Issuers with no CRL: `rampart.crlUnknownStatus` (allow, as
//! Istio/ztunnel, or deny).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use rampart_certs::tls::{self, ClientAuth, SpiffeClientVerifier, SpiffeServerVerifier};
use rampart_certs::{
    CertInfo, CertificateDer, Crl, CrlError, CrlExpiry, CrlSet, PrivateKey, RevocationCheck,
    SpiffeId, TrustBundle, TrustDomainPolicy, UnknownStatus, Usage,
};
use rustls::{ClientConfig, ServerConfig};

use crate::peers::LiveConns;

/// What an mTLS connection the proxy originates will carry, and so the ALPN values it offers.
///
/// As an Istio sidecar's outbound cluster does (its `alpn_override` per upstream protocol):
/// the Istio value first, then `istio` (what an Istio inbound's PERMISSIVE filter chain
/// matches to tell mesh mTLS from the app's own TLS), then the plain value, which is what
/// servers negotiate: Envoy inbounds advertise only `h2`/`http/1.1` (plus
/// `istio-peer-exchange` on TCP ports), and so do ours first. TCP offers `istio` alone: we do
/// not speak Istio's TCP metadata exchange, so we never offer `istio-peer-exchange`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Alpn {
    /// Opaque TCP: `istio`.
    Tcp,
    /// HTTP/1.1: `istio-http/1.1`, `istio`, `http/1.1`.
    Http1,
    /// HTTP/2: `istio-h2`, `istio`, `h2`.
    H2,
}

impl Alpn {
    /// The protocols offered in the ClientHello, in order.
    pub(crate) fn offered(self) -> Vec<Vec<u8>> {
        let list: &[&[u8]] = match self {
            Alpn::Tcp => &[b"istio"],
            Alpn::Http1 => &[b"istio-http/1.1", b"istio", b"http/1.1"],
            Alpn::H2 => &[b"istio-h2", b"istio", b"h2"],
        };
        list.iter().map(|p| p.to_vec()).collect()
    }
}

/// What the inbound side negotiates, in its order of preference (rustls picks the first of
/// these that the client offered). The plain values first, so HTTP clients get what they
/// speak; Istio's HTTP values, which name the same protocols; then `istio`, which an Envoy
/// sidecar offers for TCP and for mTLS of unknown protocol (`istio-peer-exchange, istio`).
/// `istio-peer-exchange` is not among them: it promises Istio's TCP metadata exchange, which
/// we do not speak, and every Istio client that offers it offers `istio` too. Which HTTP
/// version a connection carries is read from its first bytes, not from ALPN, so `istio`
/// serves HTTP ports as well as TCP ones.
pub(crate) const INBOUND_ALPN: &[&[u8]] = &[
    b"h2",
    b"http/1.1",
    b"istio-h2",
    b"istio-http/1.1",
    b"istio-http/1.0",
    b"istio",
];

/// Whether a negotiated ALPN value means HTTP/2.
pub(crate) fn is_h2(negotiated: Option<&[u8]>) -> bool {
    matches!(negotiated, Some(b"h2" | b"istio-h2"))
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
    /// Our leaf's validity window (checked at every use).
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
    serial: String,
    /// Revocation checking in both verifiers (`None`: no CRL and unknown status allowed).
    pub(crate) revocation: Option<RevocationCheck>,
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
        let verifier = SpiffeServerVerifier::new(
            self.bundle.clone(),
            self.trust_domains.clone(),
            vec![expected.clone()],
        );
        verifier.set_revocation(self.revocation.clone());
        let mut c = tls::client_config_with_verifier(
            Arc::new(verifier),
            Some((self.chain.clone(), &self.key)),
        )
        .map_err(|e| e.to_string())?;
        c.alpn_protocols = alpn.offered();
        let c = Arc::new(c);
        map.insert((expected.clone(), alpn), c.clone());
        Ok(c)
    }
}

/// A workload certificate as received (well-formed, ours, key matching).
struct Cert {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKey,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
}

/// Secrets as received and which certificate is in use.
#[derive(Default)]
struct Pending {
    /// The newest certificate received.
    latest: Option<Arc<Cert>>,
    /// The certificate of the installed state (may be older than `latest` while `latest`
    /// does not chain to the bundle yet).
    in_use: Option<Arc<Cert>>,
    bundle: Option<TrustBundle>,
    /// The CRLs of the last accepted `ROOTCA`, as received.
    crl_list: Vec<Crl>,
    /// Those of them that verify against the CAs known now (the bundle's roots and the
    /// intermediates of our chains); revalidated when a certificate brings new ones.
    crls: CrlSet,
    /// Issuers without a CRL (`rampart.crlUnknownStatus`).
    unknown: UnknownStatus,
    /// Why there is no installed state (`None` while one is installed).
    unusable: Option<String>,
}

/// Why the proxy's own identity cannot be used right now (each refused handshake counts one,
/// as `rampart_proxy_own_identity_refusals_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No certificate or no trust bundle received yet.
    NotReceived = 0,
    /// The certificate does not chain to the current trust bundle.
    Untrusted = 1,
    /// Our leaf is past not-after.
    Expired = 2,
    /// Our leaf is before not-before.
    NotYetValid = 3,
}

impl Refusal {
    const ALL: [Refusal; 4] = [
        Refusal::NotReceived,
        Refusal::Untrusted,
        Refusal::Expired,
        Refusal::NotYetValid,
    ];

    fn label(self) -> &'static str {
        match self {
            Refusal::NotReceived => "not_received",
            Refusal::Untrusted => "untrusted_chain",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
        }
    }
}

/// Holds the current TLS state and rebuilds it when secrets or trust domains change.
///
/// Fail closed, checked at two depths:
/// - whenever the certificate, the bundle or the trust domains change, the newest
///   certificate's chain is verified against the current bundle (certificate first or bundle
///   first, and again on every bundle rotation). One that does not chain is not used: the
///   previous certificate stays in use if it still chains, otherwise there is no state and
///   the reason says why. It becomes usable as soon as a matching bundle (or certificate)
///   arrives;
/// - every use ([`IdentityHolder::status`]) checks the installed leaf's validity window
///   against the clock, so an expired (or not yet valid) certificate of our own is never
///   presented, and a fresh push restores service with no restart.
pub(crate) struct IdentityHolder {
    pub(crate) expected_id: SpiffeId,
    state: ArcSwapOption<TlsState>,
    pending: Mutex<Pending>,
    trust_domains: Mutex<TrustDomainPolicy>,
    refusals: [AtomicU64; 4],
    /// The last refusal kind logged at error level (+1; 0 = none), so the transition is
    /// logged once, not once per connection.
    last_logged: AtomicU64,
    /// Established mTLS connections (closed when their peer is revoked).
    pub(crate) live: Arc<LiveConns>,
}

use rampart_certs::timestamp::rfc3339;

impl IdentityHolder {
    pub(crate) fn new(expected_id: SpiffeId, trust_domains: TrustDomainPolicy) -> Self {
        IdentityHolder {
            expected_id,
            state: ArcSwapOption::empty(),
            pending: Mutex::new(Pending::default()),
            trust_domains: Mutex::new(trust_domains),
            refusals: Default::default(),
            last_logged: AtomicU64::new(0),
            live: Arc::new(LiveConns::default()),
        }
    }

    /// The installed state if it can be used now, else why not (for `/ready`, `/certs`).
    pub(crate) fn status(&self) -> Result<Arc<TlsState>, String> {
        self.status_at(SystemTime::now()).map_err(|(_, why)| why)
    }

    /// `status` for a handshake: a refusal is counted and its first occurrence logged.
    /// Register an established mTLS connection (see [`LiveConns::register`]) whose handshake
    /// ran with `seen`. A CRL that arrived during the handshake was not in `seen`'s verifier
    /// and its sweep of registered connections came before this one: when the state changed
    /// since, the chain is checked against the current revocation lists here. Registering
    /// first, then reading the state, leaves no gap (a CRL stores its state before it sweeps,
    /// under the registry's lock). `Err` (with the reason): revoked, the connection dropped.
    pub(crate) fn register<IO>(
        &self,
        seen: &Arc<TlsState>,
        io: IO,
        chain: &[rampart_certs::CertificateDer<'static>],
        usage: rampart_certs::Usage,
        peer_id: String,
    ) -> Result<crate::peers::Revocable<IO>, String> {
        let conn = self.live.register(io, chain, usage, peer_id);
        let Some(now) = self.state.load_full() else {
            return Ok(conn);
        };
        if Arc::ptr_eq(&now, seen) {
            return Ok(conn);
        }
        let (Some(check), Some((leaf, intermediates))) = (&now.revocation, chain.split_first())
        else {
            return Ok(conn);
        };
        match rampart_certs::verify_workload_cert_with_revocation(
            leaf,
            intermediates,
            &now.bundle,
            &now.trust_domains,
            SystemTime::now(),
            usage,
            Some(check),
        ) {
            Err(rampart_certs::ChainError::Revoked { serial, issuer, .. }) => {
                self.live.count_closed();
                Err(format!(
                    "the peer's certificate (serial {serial}, issuer {issuer}) was revoked during the handshake"
                ))
            }
            _ => Ok(conn),
        }
    }

    pub(crate) fn for_handshake(&self) -> Result<Arc<TlsState>, String> {
        match self.status_at(SystemTime::now()) {
            Ok(s) => {
                self.last_logged.store(0, Ordering::Relaxed);
                Ok(s)
            }
            Err((kind, why)) => {
                self.refusals[kind as usize].fetch_add(1, Ordering::Relaxed);
                let tag = kind as u64 + 1;
                if self.last_logged.swap(tag, Ordering::Relaxed) != tag {
                    tracing::error!(id = %self.expected_id, reason = %why, "own identity unusable: every mTLS handshake is refused until this is fixed");
                }
                Err(why)
            }
        }
    }

    fn status_at(&self, now: SystemTime) -> Result<Arc<TlsState>, (Refusal, String)> {
        let Some(state) = self.state.load_full() else {
            let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            return Err(match &p.unusable {
                Some(why) => (Refusal::Untrusted, why.clone()),
                None if p.latest.is_none() => (
                    Refusal::NotReceived,
                    "no workload certificate from SDS yet".to_string(),
                ),
                None => (
                    Refusal::NotReceived,
                    "no trust bundle (ROOTCA) from SDS yet".to_string(),
                ),
            });
        };
        if now >= state.not_after {
            return Err((
                Refusal::Expired,
                format!(
                    "own certificate expired at {} (serial {}); waiting for a fresh one over SDS",
                    rfc3339(state.not_after),
                    state.serial
                ),
            ));
        }
        if now < state.not_before {
            return Err((
                Refusal::NotYetValid,
                format!(
                    "own certificate is not valid before {} (serial {})",
                    rfc3339(state.not_before),
                    state.serial
                ),
            ));
        }
        Ok(state)
    }

    /// Prometheus lines: refusals by reason, and whether the identity is usable now.
    pub(crate) fn render_metrics(&self) -> String {
        let mut out = String::from("# TYPE rampart_proxy_own_identity_refusals_total counter\n");
        for r in Refusal::ALL {
            out.push_str(&format!(
                "rampart_proxy_own_identity_refusals_total{{reason=\"{}\"}} {}\n",
                r.label(),
                self.refusals[r as usize].load(Ordering::Relaxed)
            ));
        }
        out.push_str("# TYPE rampart_proxy_own_identity_usable gauge\n");
        out.push_str(&format!(
            "rampart_proxy_own_identity_usable {}\n",
            u8::from(self.status().is_ok())
        ));
        {
            let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            out.push_str("# TYPE rampart_proxy_crls gauge\n");
            out.push_str(&format!("rampart_proxy_crls {}\n", p.crls.len()));
            out.push_str("# TYPE rampart_proxy_crls_expired gauge\n");
            out.push_str(&format!(
                "rampart_proxy_crls_expired {}\n",
                p.crls.expired(SystemTime::now()).len()
            ));
        }
        self.live.render_metrics(&mut out);
        if let Some(s) = self.state.load_full() {
            let secs = s
                .not_after
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            out.push_str("# TYPE rampart_proxy_own_cert_not_after_seconds gauge\n");
            out.push_str(&format!(
                "rampart_proxy_own_cert_not_after_seconds {secs}\n"
            ));
        }
        out
    }

    /// Check a workload certificate pushed as `default`: its SPIFFE ID must be ours, the key
    /// must match, and it must be inside its validity window now (else NACK, the current one
    /// stays). Whether it chains to the trust bundle is decided with the bundle (now, or when
    /// one arrives): see [`IdentityHolder`].
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
        let info = CertInfo::parse(leaf).map_err(|e| format!("leaf certificate: {e}"))?;
        let now = SystemTime::now();
        if now >= info.not_after {
            return Err(format!(
                "certificate expired at {}",
                rfc3339(info.not_after)
            ));
        }
        if now < info.not_before {
            return Err(format!(
                "certificate is not valid before {}",
                rfc3339(info.not_before)
            ));
        }
        let key = PrivateKey::from_pem(key_pem).map_err(|e| format!("private key: {e}"))?;
        // rustls checks the key matches the leaf.
        tls::server_config(chain.clone(), &key, ClientAuth::None)
            .map_err(|e| format!("certificate and key: {e}"))?;
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.latest = Some(Arc::new(Cert {
            chain,
            key,
            not_before: info.not_before,
            not_after: info.not_after,
            serial: info.serial_hex,
        }));
        // Its intermediates may be the issuers of CRLs held back until now.
        let before = p.crls.clone();
        if let Some(bundle) = p.bundle.clone()
            && let Ok(crls) = validate_crls(&p.crl_list, &issuers_of(&bundle, &p))
        {
            p.crls = crls;
        }
        let td = self.trust_domains();
        self.rebuild(&mut p, td)?;
        if p.crls != before {
            self.after_crl_change(&p);
        }
        Ok(())
    }

    /// Check a trust bundle pushed as `ROOTCA`, with its CRLs (PEM, possibly empty); the
    /// certificate is checked against it again. Every CRL must verify against the bundle's
    /// roots or our chain's intermediates, else the push is refused whole (the last good
    /// bundle and CRLs stay). An expired CRL is kept (its revocations stay in force) and
    /// reported.
    pub(crate) fn offer_bundle(&self, pem: &str, crl_pem: &str) -> Result<(), String> {
        let bundle = TrustBundle::from_pem(pem).map_err(|e| format!("trust bundle: {e}"))?;
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let list = if crl_pem.trim().is_empty() {
            Vec::new()
        } else {
            rampart_certs::parse_crls_pem(crl_pem).map_err(|e| format!("crl: {e}"))?
        };
        let crls = validate_crls(&list, &issuers_of(&bundle, &p))?;
        let before = p.crls.clone();
        p.bundle = Some(bundle);
        p.crl_list = list;
        p.crls = crls;
        let td = self.trust_domains();
        self.rebuild(&mut p, td)?;
        if p.crls != before {
            self.after_crl_change(&p);
        }
        Ok(())
    }

    /// `rampart.crlUnknownStatus` from the mesh configuration.
    pub(crate) fn set_unknown_status(&self, unknown: UnknownStatus) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.unknown == unknown {
            return;
        }
        p.unknown = unknown;
        let td = self.trust_domains();
        if let Err(e) = self.rebuild(&mut p, td) {
            tracing::error!(error = %e, "cannot rebuild TLS configuration for the new unknown-status policy");
        }
    }

    /// Close established connections the new CRLs revoke.
    fn after_crl_change(&self, p: &Pending) {
        let (Some(bundle), Some(state)) = (p.bundle.as_ref(), self.state.load_full()) else {
            return;
        };
        let expired: Vec<String> = p
            .crls
            .crls()
            .filter(|c| c.is_expired(SystemTime::now()))
            .map(|c| c.issuer().to_string())
            .collect();
        for issuer in &expired {
            tracing::warn!(%issuer, "CRL past its nextUpdate: its revocations stay in force; the CA should publish a fresh one");
        }
        tracing::info!(crls = p.crls.len(), "CRL set changed");
        if let Some(check) = &state.revocation {
            let n = self
                .live
                .close_revoked(check, bundle, &state.trust_domains, SystemTime::now());
            if n > 0 {
                tracing::warn!(
                    closed = n,
                    "closed established connections of revoked peers"
                );
            }
        }
    }

    fn trust_domains(&self) -> TrustDomainPolicy {
        self.trust_domains
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// New trust-domain aliases from the mesh folder.
    pub(crate) fn set_trust_domains(&self, td: TrustDomainPolicy) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let mut cur = self.trust_domains.lock().unwrap_or_else(|e| e.into_inner());
        if *cur == td {
            return;
        }
        *cur = td.clone();
        drop(cur);
        if let Err(e) = self.rebuild(&mut p, td) {
            tracing::error!(error = %e, "cannot rebuild TLS configuration for new trust domains");
        }
    }

    /// Does `c` chain to `bundle`? Checked inside the leaf's validity window (expiry is
    /// checked at each use, with its own reason).
    fn chains(c: &Cert, bundle: &TrustBundle, td: &TrustDomainPolicy) -> Result<(), String> {
        let now = SystemTime::now();
        let at = now.clamp(c.not_before, c.not_after);
        rampart_certs::verify_workload_cert(
            &c.chain[0],
            &c.chain[1..],
            bundle,
            td,
            at,
            Usage::ServerAuth,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    /// Pick the certificate to use with the current bundle and install it (or none).
    fn rebuild(&self, p: &mut Pending, td: TrustDomainPolicy) -> Result<(), String> {
        let (Some(latest), Some(bundle)) = (p.latest.clone(), p.bundle.clone()) else {
            return Ok(());
        };
        let chosen = match Self::chains(&latest, &bundle, &td) {
            Ok(()) => latest,
            Err(e) => {
                let keep = p
                    .in_use
                    .clone()
                    .filter(|old| !Arc::ptr_eq(old, &latest))
                    .filter(|old| Self::chains(old, &bundle, &td).is_ok());
                match keep {
                    Some(old) => {
                        tracing::warn!(
                            id = %self.expected_id,
                            newest = %latest.serial,
                            kept = %old.serial,
                            error = %e,
                            "newest certificate does not chain to the current trust bundle; \
                             keeping the previous one until a matching bundle arrives"
                        );
                        old
                    }
                    None => {
                        let why = format!(
                            "own certificate (serial {}) does not chain to the current trust \
                             bundle: {e}",
                            latest.serial
                        );
                        tracing::error!(id = %self.expected_id, reason = %why, "not using the certificate: every mTLS handshake is refused until a matching bundle or certificate arrives");
                        p.in_use = None;
                        p.unusable = Some(why);
                        self.state.store(None);
                        return Ok(());
                    }
                }
            }
        };
        let revocation = (!p.crls.is_empty() || p.unknown == UnknownStatus::Deny)
            .then(|| RevocationCheck::new(p.crls.clone(), p.unknown));
        let verifier = SpiffeClientVerifier::required(bundle.clone(), td.clone());
        verifier.set_revocation(revocation.clone());
        let mut server = tls::server_config_with_client_verifier(
            chosen.chain.clone(),
            &chosen.key,
            Arc::new(verifier),
        )
        .map_err(|e| e.to_string())?;
        server.alpn_protocols = INBOUND_ALPN.iter().map(|p| p.to_vec()).collect();
        let state = TlsState {
            id: self.expected_id.clone(),
            chain: chosen.chain.clone(),
            bundle: bundle.clone(),
            trust_domains: td,
            server: Arc::new(server),
            key: chosen.key.clone_key(),
            clients: Mutex::new(HashMap::new()),
            installed_at: SystemTime::now(),
            not_before: chosen.not_before,
            not_after: chosen.not_after,
            serial: chosen.serial.clone(),
            revocation,
        };
        tracing::info!(id = %self.expected_id, serial = %chosen.serial, not_after = %rfc3339(chosen.not_after), roots = bundle.roots().len(), "installed certificate and trust bundle");
        p.in_use = Some(chosen);
        p.unusable = None;
        self.state.store(Some(Arc::new(state)));
        Ok(())
    }
}

/// The CA certificates CRLs may speak for: the bundle's roots and the intermediates of the
/// certificates we hold.
fn issuers_of(bundle: &TrustBundle, p: &Pending) -> Vec<CertificateDer<'static>> {
    let mut out: Vec<CertificateDer<'static>> = bundle.roots().to_vec();
    for c in [p.latest.as_ref(), p.in_use.as_ref()].into_iter().flatten() {
        for i in c.chain.iter().skip(1) {
            if !out.contains(i) {
                out.push(i.clone());
            }
        }
    }
    out
}

/// Validate each CRL on its own against `issuers` (now; an expired one is kept and
/// reported). A CRL whose issuer is none of them is held back, not refused: it may be for
/// an intermediate whose certificate has not arrived yet (`ROOTCA` before `default`), and
/// it can revoke nothing of ours until then. Any other failure (a bad signature by a CA we
/// know, a CA that may not sign CRLs, a malformed CRL) refuses the push.
fn validate_crls(list: &[Crl], issuers: &[CertificateDer<'static>]) -> Result<CrlSet, String> {
    let now = SystemTime::now();
    let mut valid = Vec::new();
    for crl in list {
        match CrlSet::new(vec![crl.clone()], issuers, now, CrlExpiry::Keep) {
            Ok(_) => valid.push(crl.clone()),
            Err(CrlError::UnknownIssuer { issuer }) => {
                tracing::info!(%issuer, "CRL of a CA we do not know (yet): not applied");
            }
            Err(e) => return Err(format!("crl: {e}")),
        }
    }
    CrlSet::new(valid, issuers, now, CrlExpiry::Keep).map_err(|e| format!("crl: {e}"))
}

/// Lowercase hex SHA-256 of a DER certificate (the `Hash=` of `x-forwarded-client-cert`).
pub(crate) fn cert_sha256_hex(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rampart_certs::certs_to_pem;
    use rampart_certs::test_util::{TestLeaf, TestPki};

    use super::*;

    fn id() -> SpiffeId {
        SpiffeId::istio(&"cluster.local".parse().unwrap(), "ns", "sa").unwrap()
    }

    fn holder() -> IdentityHolder {
        IdentityHolder::new(
            id(),
            TrustDomainPolicy::local("cluster.local".parse().unwrap()),
        )
    }

    fn leaf(pki: &TestPki, ttl: Duration) -> TestLeaf {
        pki.leaf(&id(), ttl, SystemTime::now())
    }

    fn offer(h: &IdentityHolder, l: &TestLeaf) -> Result<(), String> {
        h.offer_cert(&certs_to_pem(&l.presented_chain()), &l.key.to_pkcs8_pem())
    }

    fn bundle(h: &IdentityHolder, pkis: &[&TestPki]) {
        let pem: String = pkis.iter().map(|p| p.root_pem()).collect();
        h.offer_bundle(&pem, "").unwrap();
    }

    fn serial(l: &TestLeaf) -> String {
        CertInfo::parse(&l.chain[0]).unwrap().serial_hex
    }

    fn in_use(h: &IdentityHolder) -> Result<String, String> {
        h.status().map(|s| s.serial.clone())
    }

    /// An in-memory TLS handshake: the ALPN value negotiated, or the error that ended it.
    fn negotiate(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
    ) -> Result<Option<Vec<u8>>, rustls::Error> {
        let name = rustls::pki_types::ServerName::try_from("outbound_.80_._.backend").unwrap();
        let mut c = rustls::ClientConnection::new(client, name)?;
        let mut s = rustls::ServerConnection::new(server)?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets()?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(s.alpn_protocol().map(<[u8]>::to_vec));
            }
        }
        panic!("handshake did not finish");
    }

    /// Istio's ALPN both ways: what we offer per protocol, and what our inbound picks from
    /// what an Envoy sidecar offers (TCP: `istio-peer-exchange, istio`; HTTP: Istio's
    /// `alpn_override` lists; a client without ALPN). A client offering nothing we speak is
    /// refused, as is `istio-peer-exchange` alone (we do not speak the metadata exchange).
    #[test]
    fn istio_alpn_offered_and_negotiated() {
        let pki = TestPki::new("cluster.local");
        let h = holder();
        bundle(&h, &[&pki]);
        offer(&h, &leaf(&pki, Duration::from_secs(3600))).unwrap();
        let st = h.for_handshake().unwrap();
        let ours = |alpn| st.client(&id(), alpn).unwrap();
        assert_eq!(ours(Alpn::Tcp).alpn_protocols, vec![b"istio".to_vec()]);
        assert_eq!(
            ours(Alpn::Http1).alpn_protocols,
            vec![
                b"istio-http/1.1".to_vec(),
                b"istio".to_vec(),
                b"http/1.1".to_vec()
            ]
        );
        assert_eq!(
            ours(Alpn::H2).alpn_protocols,
            vec![b"istio-h2".to_vec(), b"istio".to_vec(), b"h2".to_vec()]
        );
        let server = st.server.clone();
        for (alpn, want) in [
            (Alpn::Tcp, &b"istio"[..]),
            (Alpn::Http1, b"http/1.1"),
            (Alpn::H2, b"h2"),
        ] {
            let got = negotiate(ours(alpn), server.clone()).unwrap();
            assert_eq!(got.as_deref(), Some(want), "{alpn:?}");
        }
        let envoy = |offer: &[&[u8]]| {
            let mut c = (*ours(Alpn::Tcp)).clone();
            c.alpn_protocols = offer.iter().map(|p| p.to_vec()).collect();
            negotiate(Arc::new(c), server.clone())
        };
        type Offer<'a> = &'a [&'a [u8]];
        let cases: &[(Offer<'_>, Option<&[u8]>)] = &[
            (&[b"istio-peer-exchange", b"istio"], Some(b"istio")),
            (
                &[b"istio-http/1.0", b"istio", b"http/1.0"],
                Some(b"istio-http/1.0"),
            ),
            (
                &[b"istio-http/1.1", b"istio", b"http/1.1"],
                Some(b"http/1.1"),
            ),
            (&[b"istio-h2", b"istio", b"h2"], Some(b"h2")),
            (&[b"istio"], Some(b"istio")),
            (&[], None),
        ];
        for (offer, want) in cases {
            assert_eq!(envoy(offer).unwrap().as_deref(), *want, "{offer:?}");
        }
        for offer in [&[&b"istio-peer-exchange"[..]][..], &[b"spdy/3", b"h3"]] {
            let e = envoy(offer).unwrap_err();
            assert!(
                matches!(e, rustls::Error::NoApplicationProtocol),
                "{offer:?}: {e:?}"
            );
        }
        assert!(is_h2(Some(b"h2")) && is_h2(Some(b"istio-h2")));
        assert!(!is_h2(Some(b"http/1.1")) && !is_h2(Some(b"istio")) && !is_h2(None));
    }

    /// Our own leaf past not-after is never presented: the reason names the expiry. A fresh
    /// certificate pushed afterwards restores service with no restart.
    #[test]
    fn own_expired_certificate_is_refused_until_a_fresh_one_arrives() {
        let pki = TestPki::new("cluster.local");
        let h = holder();
        bundle(&h, &[&pki]);
        let l1 = leaf(&pki, Duration::from_secs(60));
        offer(&h, &l1).unwrap();
        let na = CertInfo::parse(&l1.chain[0]).unwrap().not_after;
        let later = SystemTime::now() + Duration::from_secs(120);
        let (kind, why) = h
            .status_at(later)
            .err()
            .expect("expired certificate must not be used");
        assert_eq!(kind, Refusal::Expired);
        assert_eq!(
            why,
            format!(
                "own certificate expired at {} (serial {}); waiting for a fresh one over SDS",
                rfc3339(na),
                serial(&l1)
            )
        );
        let l2 = leaf(&pki, Duration::from_secs(3600));
        offer(&h, &l2).unwrap();
        assert_eq!(h.status_at(later).unwrap().serial, serial(&l2));
    }

    /// A CRL that arrives while a handshake is under way: the handshake's verifier (taken
    /// before) lets the peer in, the CRL's sweep ran before the connection was registered;
    /// registering checks the chain against the CRLs in force now and refuses it. Twins: the
    /// same late registration of an unrevoked peer, and a registration with no change since
    /// the handshake, are let in.
    #[test]
    fn a_crl_arriving_during_a_handshake_still_closes_the_connection() {
        let pki = TestPki::new("cluster.local");
        let h = holder();
        bundle(&h, &[&pki]);
        offer(&h, &leaf(&pki, Duration::from_secs(3600))).unwrap();
        let peer_id = SpiffeId::istio(&"cluster.local".parse().unwrap(), "web", "fe").unwrap();
        let (bad, good) = (
            pki.leaf(&peer_id, Duration::from_secs(3600), SystemTime::now()),
            pki.leaf(&peer_id, Duration::from_secs(3600), SystemTime::now()),
        );
        let seen = h.for_handshake().unwrap();
        // No change since the handshake: registered without a second look.
        let c = h.register(
            &seen,
            (),
            &bad.presented_chain(),
            Usage::ClientAuth,
            "fe".into(),
        );
        assert!(c.is_ok());
        drop(c);
        // The CRL revoking `bad` lands (its sweep finds nothing registered).
        let now = SystemTime::now();
        let crl = pki
            .intermediate
            .sign_crl(&rampart_certs::CrlParams {
                this_update: now - Duration::from_secs(60),
                next_update: now + Duration::from_secs(600),
                crl_number: 1,
                revoked: vec![rampart_certs::RevokedCert {
                    serial_hex: serial(&bad),
                    revoked_at: now,
                    reason: Some(rampart_certs::RevocationReason::KeyCompromise),
                }],
            })
            .unwrap()
            .to_pem();
        h.offer_bundle(&pki.root_pem(), &crl).unwrap();
        let before = h.live.closed.load(Ordering::Relaxed);
        let why = h
            .register(
                &seen,
                (),
                &bad.presented_chain(),
                Usage::ClientAuth,
                "fe".into(),
            )
            .err()
            .expect("a peer revoked during its handshake is refused");
        assert!(
            why.contains(&serial(&bad)) && why.contains("revoked"),
            "{why}"
        );
        assert_eq!(h.live.len(), 0, "not left in the registry");
        assert_eq!(h.live.closed.load(Ordering::Relaxed), before + 1);
        let ok = h.register(
            &seen,
            (),
            &good.presented_chain(),
            Usage::ClientAuth,
            "fe".into(),
        );
        assert!(ok.is_ok(), "an unrevoked peer registers late too");
    }

    /// Negative twin: inside its window the same certificate is used; before not-before it
    /// is not (and a certificate that is not yet valid, or already expired, when pushed is
    /// NACKed while the current one stays).
    #[test]
    fn own_certificate_is_used_only_inside_its_validity_window() {
        let pki = TestPki::new("cluster.local");
        let h = holder();
        bundle(&h, &[&pki]);
        let l1 = leaf(&pki, Duration::from_secs(600));
        offer(&h, &l1).unwrap();
        assert_eq!(in_use(&h).unwrap(), serial(&l1));
        let nb = CertInfo::parse(&l1.chain[0]).unwrap().not_before;
        let (kind, why) = h.status_at(nb - Duration::from_secs(1)).err().unwrap();
        assert_eq!(kind, Refusal::NotYetValid);
        assert!(
            why.starts_with("own certificate is not valid before"),
            "{why}"
        );
        let future = TestPki::new_at(
            "cluster.local",
            SystemTime::now() + Duration::from_secs(3600),
        );
        let early = future.leaf(
            &id(),
            Duration::from_secs(600),
            SystemTime::now() + Duration::from_secs(3600),
        );
        let h2 = holder();
        bundle(&h2, &[&future]);
        let err = offer(&h2, &early).unwrap_err();
        assert!(err.contains("not valid before"), "{err}");
        let err = offer(&h, &early).unwrap_err();
        assert!(err.contains("not valid before"), "{err}");
        assert_eq!(in_use(&h).unwrap(), serial(&l1), "current one stays");
    }

    /// Certificate first, then a bundle it does not chain to: not used, named reason; then
    /// the matching bundle: usable.
    #[test]
    fn certificate_before_bundle_is_checked_when_the_bundle_arrives() {
        let a = TestPki::new("cluster.local");
        let b = TestPki::new("cluster.local");
        let h = holder();
        let l = leaf(&a, Duration::from_secs(600));
        offer(&h, &l).unwrap();
        assert_eq!(
            in_use(&h).unwrap_err(),
            "no trust bundle (ROOTCA) from SDS yet"
        );
        bundle(&h, &[&b]);
        let why = in_use(&h).unwrap_err();
        assert!(
            why.contains("does not chain to the current trust bundle"),
            "{why}"
        );
        assert!(h.status().is_err());
        bundle(&h, &[&a]);
        assert_eq!(in_use(&h).unwrap(), serial(&l));
    }

    /// Bundle first, then a certificate that does not chain to it: not used (the push is
    /// kept, ACKed), usable once the matching bundle arrives; a matching certificate is used
    /// at once.
    #[test]
    fn bundle_before_certificate_is_checked_when_the_certificate_arrives() {
        let a = TestPki::new("cluster.local");
        let b = TestPki::new("cluster.local");
        let h = holder();
        assert_eq!(
            in_use(&h).unwrap_err(),
            "no workload certificate from SDS yet"
        );
        bundle(&h, &[&a]);
        let lb = leaf(&b, Duration::from_secs(600));
        offer(&h, &lb).unwrap();
        let why = in_use(&h).unwrap_err();
        assert!(
            why.contains("does not chain to the current trust bundle"),
            "{why}"
        );
        let la = leaf(&a, Duration::from_secs(600));
        offer(&h, &la).unwrap();
        assert_eq!(in_use(&h).unwrap(), serial(&la));
    }

    /// Bundle rotation that drops the old root: the certificate from the old root stops being
    /// used at once; the next certificate from the new root restores service. With both roots
    /// (the overlap) the old certificate is still fine.
    #[test]
    fn bundle_rotation_dropping_the_old_root_rechecks_the_certificate() {
        let old = TestPki::new("cluster.local");
        let new = TestPki::new("cluster.local");
        let h = holder();
        bundle(&h, &[&old]);
        let l1 = leaf(&old, Duration::from_secs(600));
        offer(&h, &l1).unwrap();
        bundle(&h, &[&old, &new]);
        assert_eq!(in_use(&h).unwrap(), serial(&l1), "overlap: still trusted");
        bundle(&h, &[&new]);
        let why = in_use(&h).unwrap_err();
        assert!(
            why.starts_with(&format!(
                "own certificate (serial {}) does not chain",
                serial(&l1)
            )),
            "{why}"
        );
        let l2 = leaf(&new, Duration::from_secs(600));
        offer(&h, &l2).unwrap();
        assert_eq!(in_use(&h).unwrap(), serial(&l2));
    }

    /// A newest certificate that does not chain yet (it raced ahead of its bundle on the
    /// other SDS stream) does not displace the previous one that still chains; when the
    /// bundle arrives the newest is used.
    #[test]
    fn newest_certificate_ahead_of_its_bundle_keeps_the_previous_one() {
        let old = TestPki::new("cluster.local");
        let new = TestPki::new("cluster.local");
        let h = holder();
        bundle(&h, &[&old]);
        let l1 = leaf(&old, Duration::from_secs(600));
        offer(&h, &l1).unwrap();
        let l2 = leaf(&new, Duration::from_secs(600));
        offer(&h, &l2).unwrap();
        assert_eq!(in_use(&h).unwrap(), serial(&l1));
        bundle(&h, &[&old, &new]);
        assert_eq!(in_use(&h).unwrap(), serial(&l2));
    }

    /// Refused handshakes are counted by reason; the usable gauge follows the state.
    #[test]
    fn refusals_are_counted_by_reason() {
        let a = TestPki::new("cluster.local");
        let b = TestPki::new("cluster.local");
        let h = holder();
        assert!(h.for_handshake().is_err());
        bundle(&h, &[&b]);
        offer(&h, &leaf(&a, Duration::from_secs(600))).unwrap();
        assert!(h.for_handshake().is_err());
        assert!(h.for_handshake().is_err());
        let m = h.render_metrics();
        assert!(
            m.contains("rampart_proxy_own_identity_refusals_total{reason=\"not_received\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("rampart_proxy_own_identity_refusals_total{reason=\"untrusted_chain\"} 2"),
            "{m}"
        );
        assert!(m.contains("rampart_proxy_own_identity_usable 0"), "{m}");
        bundle(&h, &[&a]);
        assert!(h.for_handshake().is_ok());
        assert!(
            h.render_metrics()
                .contains("rampart_proxy_own_identity_usable 1")
        );
    }
}
