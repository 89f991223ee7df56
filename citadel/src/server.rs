//! The gRPC server: `istio.v1.auth.IstioCertificateService/CreateCertificate` over TLS 1.3,
//! the reload loop for the plug-in directory, and the metrics endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rampart_certs::tls::SpiffeClientVerifier;
use rampart_certs::{CertInfo, SpiffeId, TrustDomainPolicy};
use rampart_proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use rampart_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::Instrument as _;

use crate::audit::{AuditLog, AuditRecord, rfc3339};
use crate::authn::{
    CallerEvidence, ExternalAuthenticator, JwksReload, TokenAuthenticator, authenticate_with,
};
use crate::authority::{
    Authority, MaterialSource, PluginFiles, load_initial, load_or_create_self_signed, load_plugin,
    self_signed_rotation_due,
};
use crate::config::{CaConfig, NodeAgentGrant};
use crate::error::CitadelError;
use crate::issue::{IssuePolicy, issue};
use crate::metrics::{Metrics, serve_metrics};
use crate::refusal::Refusal;
use crate::tls::{certified_key, server_config};
use rampart_certs::tls::CertStore;

/// Lifetime of the CA's own serving certificate; renewed at half-life.
pub const SERVING_CERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Metadata key Istio's node agents (ztunnel) use to ask for a workload's identity.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// What the TLS handshake told us about the peer; attached to every request on the
/// connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// Remote address.
    pub remote: SocketAddr,
    cert: Option<Arc<PeerCert>>,
}

#[derive(Debug)]
struct PeerCert {
    chain: Vec<CertificateDer<'static>>,
    id: Result<SpiffeId, String>,
    not_after: SystemTime,
    /// (authority generation, verdict): re-checked against the current bundle after a reload,
    /// so removing a root from the bundle also cuts off open connections.
    checked: Mutex<(u64, Result<(), String>)>,
}

/// The state shared by the request path and the reload loop.
pub struct CaState {
    config: CaConfig,
    policy: IssuePolicy,
    authority: ArcSwap<Authority>,
    generation: AtomicU64,
    tokens: TokenAuthenticator,
    node_agents: HashMap<SpiffeId, NodeAgentGrant>,
    audit: AuditLog,
    metrics: Arc<Metrics>,
    permits: Semaphore,
    serving: Arc<CertStore>,
    serving_renew_at: Mutex<SystemTime>,
    last_failed_input: Mutex<Option<[u8; 32]>>,
    revocations: crate::revocation::Revocations,
    /// Judges bearer tokens instead of the JWKS files (Kubernetes mode).
    external: Option<Arc<dyn ExternalAuthenticator>>,
    /// Shares revocations with other replicas (Kubernetes mode), set once.
    share: std::sync::OnceLock<Arc<dyn crate::admin::RevocationShare>>,
    /// Serializes merges of identity revocations (the watch and the sync pass may both
    /// bring the same new rule).
    rule_merge: Mutex<()>,
    /// The gRPC server: [`GRPC_NOT_STARTED`], [`GRPC_SERVING`] or [`GRPC_STOPPED`].
    grpc: std::sync::atomic::AtomicU8,
    /// `<state>/ca.lock` (one CA per state directory): held until the [`RunningCa`] serving
    /// this state is shut down or dropped, or the process ends.
    state_lock: Mutex<Option<StateLock>>,
}

const GRPC_NOT_STARTED: u8 = 0;
const GRPC_SERVING: u8 = 1;
const GRPC_STOPPED: u8 = 2;

impl std::fmt::Debug for CaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaState")
            .field("authority", &self.authority.load())
            .finish_non_exhaustive()
    }
}

/// The outcome of looking at the plug-in directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// Nothing changed.
    Unchanged,
    /// New material is active.
    Reloaded,
    /// The change was refused; the old material keeps signing.
    Refused(String),
}

// === impl CaState ===

impl CaState {
    /// Builds the CA state: loads (or creates) the root material, reads the JWKS files, opens
    /// the audit log and issues the serving certificate.
    pub fn new(config: CaConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>, CitadelError> {
        Self::new_with_external(config, metrics, None)
    }

    /// As [`CaState::new`], with bearer tokens judged by `external` (Kubernetes mode:
    /// TokenReview and node authorization) instead of the configured JWKS files.
    pub fn new_with_external(
        config: CaConfig,
        metrics: Arc<Metrics>,
        external: Option<Arc<dyn ExternalAuthenticator>>,
    ) -> Result<Arc<Self>, CitadelError> {
        config.validate()?;
        // Before anything in the directory is read or made (a new self-signed root).
        let lock = StateLock::acquire(&config.state_dir)?;
        Self::new_locked(config, metrics, external, lock)
    }

    /// As [`CaState::new_with_external`], with the state directory's lock already taken
    /// (Kubernetes mode writes the root from `istio-ca-secret` into the directory first).
    pub fn new_locked(
        config: CaConfig,
        metrics: Arc<Metrics>,
        external: Option<Arc<dyn ExternalAuthenticator>>,
        state_lock: StateLock,
    ) -> Result<Arc<Self>, CitadelError> {
        config.validate()?;
        if state_lock.dir != config.state_dir {
            return Err(CitadelError::Config(format!(
                "the lock held is {}'s, the state directory is {}",
                state_lock.dir.display(),
                config.state_dir.display()
            )));
        }
        // What can refuse the start without touching the material first (a JWKS that does
        // not parse, an audit log another CA holds): no self-signed root is made for a CA
        // that then does not run.
        let tokens = TokenAuthenticator::from_config(
            &config.jwt_issuers,
            &config.audience,
            &config.trust_domain,
        )?;
        let audit = AuditLog::open(&config.audit_log_path())?;
        let now = SystemTime::now();
        let authority = load_initial(
            &config.cacerts_dir,
            &config.state_dir,
            &config.trust_domain,
            config.self_signed_root_ttl,
            now,
        )?;
        let revocations =
            crate::revocation::Revocations::open(&config.state_dir, config.crl_validity)?;
        revocations.publish(&authority, now);
        metrics.set_crls(&revocations.current().set);
        let (chain, key) = authority.issue_serving_cert(
            &config.server_dns_names,
            &config.server_ips,
            SERVING_CERT_TTL,
            now,
        )?;
        let serving_renew_at = renew_time(&chain[0], now);
        let serving = Arc::new(CertStore::new());
        serving.set(certified_key(chain, &key)?);
        metrics.set_expiry(
            authority.signing_root().not_after,
            authority.chain_not_after(),
        );
        write_bundle(&config, &authority)?;
        Ok(Arc::new(CaState {
            policy: IssuePolicy {
                default_ttl: config.default_ttl,
                max_ttl: config.max_ttl,
                max_csr_bytes: config.max_csr_bytes,
            },
            node_agents: config
                .node_agents
                .iter()
                .map(|g| (g.id.clone(), g.clone()))
                .collect(),
            permits: Semaphore::new(config.max_concurrency),
            config,
            authority: ArcSwap::from_pointee(authority),
            generation: AtomicU64::new(0),
            tokens,
            audit,
            metrics,
            serving,
            serving_renew_at: Mutex::new(serving_renew_at),
            last_failed_input: Mutex::new(None),
            revocations,
            external,
            share: std::sync::OnceLock::new(),
            rule_merge: Mutex::new(()),
            grpc: std::sync::atomic::AtomicU8::new(GRPC_NOT_STARTED),
            state_lock: Mutex::new(Some(state_lock)),
        }))
    }

    /// The active authority.
    pub fn authority(&self) -> Arc<Authority> {
        self.authority.load_full()
    }

    /// Sets where revocations are shared with other replicas (once; later calls are
    /// ignored), so that `rampart ca revoke` reports whether they got there.
    pub fn set_revocation_share(&self, share: Arc<dyn crate::admin::RevocationShare>) {
        let _ = self.share.set(share);
    }

    /// Where revocations are shared with other replicas, if anywhere.
    pub fn revocation_share(&self) -> Option<Arc<dyn crate::admin::RevocationShare>> {
        self.share.get().cloned()
    }

    /// Why this CA cannot issue now, one reason per line (`GET /ready`); empty when it can.
    ///
    /// What is checked, and nothing else: the gRPC server runs (it is started, and has not
    /// stopped); every certificate of the signing chain in force is within its validity (the
    /// signer refuses outside it, and clients refuse a chain with an expired certificate);
    /// the CA's TLS serving certificate is within its validity (renewed at half-life by the
    /// reload loop; clients refuse an expired one); the last audit log write succeeded (a
    /// failed one refuses its certificates; the writer re-tries every
    /// [`AUDIT_RETRY`](crate::audit::AUDIT_RETRY)). Cheap: atomics, one `ArcSwap` load, one
    /// short lock the writer never holds across I/O, and the parse of one certificate; no
    /// signing, no lock of the issuance path.
    pub fn not_ready_reasons(&self, now: SystemTime) -> Vec<String> {
        let mut out = Vec::new();
        match self.grpc.load(Ordering::Acquire) {
            GRPC_SERVING => {}
            GRPC_NOT_STARTED => out.push("gRPC listener not serving yet".to_owned()),
            _ => out.push(crate::metrics::GRPC_STOPPED_REASON.to_owned()),
        }
        let authority = self.authority.load();
        let chain = authority.chain_validity();
        for (i, c) in chain.iter().enumerate() {
            let what = match i {
                0 => "signing certificate",
                i if i + 1 == chain.len() => "root certificate",
                _ => "intermediate certificate",
            };
            if now >= c.not_after {
                out.push(format!(
                    "{what} {} expired at {}",
                    c.subject,
                    rfc3339(c.not_after)
                ));
            } else if now < c.not_before {
                out.push(format!(
                    "{what} {} not valid before {}",
                    c.subject,
                    rfc3339(c.not_before)
                ));
            }
        }
        match self.serving.current() {
            None => out.push("no TLS serving certificate".to_owned()),
            Some(ck) => match ck.cert.first().map(|c| CertInfo::parse(c)) {
                Some(Ok(info)) if now >= info.not_after => out.push(format!(
                    "TLS serving certificate expired at {} (its renewal failed: see the log)",
                    rfc3339(info.not_after)
                )),
                Some(Ok(_)) => {}
                Some(Err(e)) => out.push(format!("TLS serving certificate unreadable: {e}")),
                None => out.push("no TLS serving certificate".to_owned()),
            },
        }
        if let Some(f) = self.audit.last_failure() {
            out.push(format!(
                "audit log {}: last write failed: {} (failing since {}; issuance is refused \
                 until a write succeeds, retried every {} s)",
                self.audit.path().display(),
                f.error,
                rfc3339(f.since),
                crate::audit::AUDIT_RETRY.as_secs()
            ));
        }
        out
    }

    /// Lets go of `<state>/ca.lock` and of the audit log: the CA serving this state stopped.
    /// (In-process only: connections the gRPC server accepted run as tasks of their own and
    /// may outlive [`RunningCa::shutdown`] until their clients close them, but their
    /// issuances now fail; a process that ends takes them along.)
    fn release_state_lock(&self) {
        // The audit log's writer first: its file lock goes with it (an `--audit-log` outside
        // the state directory is locked on its own).
        self.audit.close();
        self.state_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The CA's serving certificate as rustls resolves it: renewed and swapped with the
    /// material, for other listeners of the process that present it (the injection webhook).
    pub fn serving_store(&self) -> Arc<CertStore> {
        self.serving.clone()
    }

    /// The CA's current serving certificate chain.
    pub fn serving_chain(&self) -> Vec<CertificateDer<'static>> {
        self.serving
            .current()
            .map(|ck| ck.cert.clone())
            .unwrap_or_default()
    }

    /// The issuance rules in force.
    pub fn policy(&self) -> &IssuePolicy {
        &self.policy
    }

    /// The bearer-token authenticator.
    pub fn tokens(&self) -> &TokenAuthenticator {
        &self.tokens
    }

    /// Looks at the plug-in directory and activates valid new material. Invalid material is
    /// refused with an error log and `citadel_server_cacerts_reload_failure_count`; the old
    /// material keeps signing. Then re-signs and re-publishes the CRLs if the material changed
    /// or the CA's own CRL is half through its lifetime.
    pub fn reload_now(&self) -> ReloadOutcome {
        let outcome = self.reload_material();
        let now = SystemTime::now();
        if outcome == ReloadOutcome::Reloaded || self.revocations.due(now) {
            self.republish_crls(now);
        }
        outcome
    }

    /// The CA's revocations and the CRLs it publishes.
    pub fn revocations(&self) -> &crate::revocation::Revocations {
        &self.revocations
    }

    /// The issuance audit log file.
    pub fn audit_log_path(&self) -> std::path::PathBuf {
        self.config.audit_log_path()
    }

    fn republish_crls(&self, now: SystemTime) {
        let authority = self.authority.load();
        self.revocations.publish(&authority, now);
        self.crls_published();
    }

    /// After a publication: metrics, and re-check of open callers' certificates.
    fn crls_published(&self) {
        self.metrics.set_crls(&self.revocations.current().set);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Revokes certificates this CA issued: each `(serial, identity, not-after)` is persisted
    /// in the revocation list before the CRL is re-signed and published (at once).
    pub fn revoke(
        &self,
        entries: &[(String, String, SystemTime)],
        reason: Option<rampart_certs::RevocationReason>,
    ) -> Result<Vec<crate::revocation::RevokedSerial>, CitadelError> {
        let now = SystemTime::now();
        let authority = self.authority.load();
        let out = self.revocations.revoke(&authority, entries, reason, now)?;
        self.crls_published();
        for r in &out {
            self.metrics.revoked(r.new);
            tracing::warn!(serial = %r.serial, identity = %r.spiffe_id, not_after = %r.not_after, new = r.new, reason = ?reason.map(|r| r.name()), "certificate REVOKED; CRL re-signed and published");
        }
        Ok(out)
    }

    /// Revokes what identity revocation `rule` covers among `entries` (this CA's audit log)
    /// and is not revoked yet. `Ok` also when the revocations were recorded but could not be
    /// published (a CA that cannot sign CRLs says so at every revocation): they are applied.
    fn apply_identity_rule(
        &self,
        rule: &crate::revocation::IdentityRevocation,
        entries: &[crate::audit::AuditEntry],
        now: SystemTime,
    ) -> Result<Vec<crate::revocation::RevokedSerial>, CitadelError> {
        let held = self.revocations.state();
        let targets: Vec<(String, String, SystemTime)> = entries
            .iter()
            .filter(|e| rule.covers(e, now) && held.find(&e.serial).is_none())
            .filter_map(|e| Some((e.serial.clone(), e.spiffe_id.clone(), e.expires_at()?)))
            .collect();
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let reason = rule.reason.as_deref().and_then(|r| r.parse().ok());
        match self.revoke(&targets, reason) {
            Ok(r) => Ok(r),
            Err(e) => {
                let held = self.revocations.state();
                if targets.iter().all(|(s, ..)| held.find(s).is_some()) {
                    tracing::error!(identity = %rule.spiffe_id, error = %e, "identity revocation recorded here but not published");
                    Ok(Vec::new())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Takes the identity revocations of other replicas this CA lacks (each checked alone)
    /// and revokes what each covers among the certificates this CA issued: the audit log is
    /// read once for the batch; a rule is recorded once applied; a rule that cannot be
    /// applied now is reported in `failed` and left unrecorded (tried again when it comes
    /// again), without stopping the others. One merge at a time.
    pub fn merge_identity_rules(
        &self,
        rules: &[crate::revocation::IdentityRevocation],
    ) -> crate::revocation::RuleMergeOutcome {
        let _one = self.rule_merge.lock().unwrap_or_else(|p| p.into_inner());
        let now = SystemTime::now();
        let mut out = self.revocations.new_identity_rules(rules, now);
        for (id, why) in &out.refused {
            tracing::error!(identity = %id, reason = %why, "refused a shared identity revocation (the others apply)");
        }
        if out.applied.is_empty() {
            return out;
        }
        let entries = match crate::audit::read_audit_log(&self.audit_log_path()) {
            Ok((entries, _)) => entries,
            Err(e) => {
                for a in std::mem::take(&mut out.applied) {
                    out.failed.push((a.rule.spiffe_id, e.to_string()));
                }
                tracing::error!(error = %e, "cannot read the audit log to apply identity revocations; retrying when they come again");
                return out;
            }
        };
        let mut applied = Vec::with_capacity(out.applied.len());
        for mut a in std::mem::take(&mut out.applied) {
            match self.apply_identity_rule(&a.rule, &entries, now) {
                Ok(revoked) => {
                    a.revoked = revoked;
                    applied.push(a);
                }
                Err(e) => {
                    tracing::error!(identity = %a.rule.spiffe_id, error = %e, "could not apply a shared identity revocation; retrying when it comes again");
                    out.failed.push((a.rule.spiffe_id, e.to_string()));
                }
            }
        }
        // Applied, then recorded (in one write): a failure or a crash before this leaves the
        // rules unrecorded, so they are applied again when the shared object brings them.
        let rules: Vec<_> = applied.iter().map(|a| a.rule.clone()).collect();
        if let Err(e) = self.revocations.record_identity_rules(&rules) {
            tracing::error!(error = %e, "applied identity revocations not recorded; applying them again when they come again");
            for a in applied {
                out.failed.push((a.rule.spiffe_id, e.to_string()));
            }
            return out;
        }
        for a in &applied {
            tracing::warn!(identity = %a.rule.spiffe_id, issued_before = %a.rule.issued_before, revoked = a.revoked.len(), "identity REVOKED by another CA replica; the certificates this replica issued to it are revoked");
        }
        out.applied = applied;
        out
    }

    /// Adds revocations made elsewhere (another replica's, shared through the cluster in
    /// Kubernetes mode) with [`Revocations::merge`](crate::Revocations::merge): an invalid
    /// entry is refused alone, the others persisted and the CRL re-signed and published at
    /// once, as for a local revocation. Nothing is removed; a not-after only moves later.
    pub fn merge_revocations(
        &self,
        entries: &[crate::revocation::StoredRevocation],
    ) -> Result<crate::revocation::MergeOutcome, CitadelError> {
        let now = SystemTime::now();
        let authority = self.authority.load();
        let out = self.revocations.merge(&authority, entries, now)?;
        if out.resigned {
            self.crls_published();
        }
        if !out.added.is_empty() || !out.extended.is_empty() {
            for serial in &out.added {
                tracing::warn!(%serial, "certificate REVOKED by another CA replica; CRL re-signed and published");
            }
            for serial in &out.extended {
                tracing::info!(%serial, "a revocation's not-after was moved later by another replica's entry");
            }
        }
        for (serial, why) in &out.refused {
            tracing::error!(%serial, reason = %why, "refused a shared revocation entry (the others apply)");
        }
        Ok(out)
    }

    fn reload_material(&self) -> ReloadOutcome {
        let now = SystemTime::now();
        self.renew_serving_cert_if_due(now);
        let dir = &self.config.cacerts_dir;
        let files = match PluginFiles::read(dir) {
            Ok(f) => f,
            Err(e) => return self.refuse(None, e.to_string()),
        };
        let current = self.authority.load();
        let fp = files.fingerprint();
        let is_plugin_now = matches!(current.source(), MaterialSource::Plugin(_));
        if !files.is_plugin() {
            if is_plugin_now {
                return self.refuse(
                    Some(fp),
                    format!(
                        "{} has neither tls.crt nor ca-cert.pem any more; keeping the current plug-in material",
                        dir.display()
                    ),
                );
            }
            if let Some(outcome) = self.reload_self_signed_if_replaced(&current, now) {
                return outcome;
            }
            return self.renew_self_signed_if_due(&current, now);
        }
        if is_plugin_now && current.input_fingerprint() == fp {
            // Back to what is in force after a refused change (the good key put back, say):
            // nothing to load, but say so, or the last word in the log is the refusal.
            let refused_before = self
                .last_failed_input
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .is_some();
            if refused_before {
                tracing::info!(
                    dir = %dir.display(),
                    "the directory holds the material in force again; the refused change is gone"
                );
            }
            return ReloadOutcome::Unchanged;
        }
        if *self
            .last_failed_input
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            == Some(fp)
        {
            return ReloadOutcome::Unchanged;
        }
        match load_plugin(dir, &files, &self.config.trust_domain, now) {
            Ok(new) => match self.activate(new, now) {
                Ok(()) => ReloadOutcome::Reloaded,
                Err(e) => self.refuse(Some(fp), e.to_string()),
            },
            Err(e) => self.refuse(Some(fp), e.to_string()),
        }
    }

    /// Self-signed mode: the state folder's root certificate was replaced on disk (in
    /// Kubernetes mode, by the renewed root another replica wrote back to its Secret: same
    /// key and subject): load it. `None` when the file says a root served now (or cannot be
    /// read: the renewal check below then decides).
    fn reload_self_signed_if_replaced(
        &self,
        current: &Authority,
        now: SystemTime,
    ) -> Option<ReloadOutcome> {
        if !matches!(current.source(), MaterialSource::SelfSigned(_)) {
            return None;
        }
        let path = self
            .config
            .state_dir
            .join(crate::authority::SELF_SIGNED_CERT);
        let pem = std::fs::read_to_string(&path).ok()?;
        let cert = rampart_certs::parse_certs_pem(&pem)
            .ok()?
            .into_iter()
            .next()?;
        let info = rampart_certs::CertInfo::parse(&cert).ok()?;
        // Any root served now (the signing one, or a previous one a bundle file could start
        // with) is no replacement.
        if current
            .roots()
            .iter()
            .any(|r| r.fingerprint == info.sha256_fingerprint)
        {
            return None;
        }
        let loaded = load_or_create_self_signed(
            &self.config.state_dir,
            &self.config.trust_domain,
            self.config.self_signed_root_ttl,
            now,
        );
        Some(match loaded.and_then(|new| self.activate(new, now)) {
            Ok(()) => ReloadOutcome::Reloaded,
            Err(e) => self.refuse(None, format!("loading the replaced self-signed root: {e}")),
        })
    }

    /// Self-signed mode: renew the root once it enters its grace period (same key and
    /// subject, old root kept in the bundle until it expires).
    fn renew_self_signed_if_due(&self, current: &Authority, now: SystemTime) -> ReloadOutcome {
        let root = current.signing_root();
        if !self_signed_rotation_due(root.not_before, root.not_after, now) {
            return ReloadOutcome::Unchanged;
        }
        let renewed = load_or_create_self_signed(
            &self.config.state_dir,
            &self.config.trust_domain,
            self.config.self_signed_root_ttl,
            now,
        );
        match renewed.and_then(|new| self.activate(new, now)) {
            Ok(()) => ReloadOutcome::Reloaded,
            Err(e) => self.refuse(None, format!("renewing the self-signed root: {e}")),
        }
    }

    fn refuse(&self, fp: Option<[u8; 32]>, reason: String) -> ReloadOutcome {
        tracing::error!(
            dir = %self.config.cacerts_dir.display(),
            error = %reason,
            "REFUSED new CA material; the previous material keeps signing"
        );
        self.metrics.reload(false);
        *self
            .last_failed_input
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = fp;
        ReloadOutcome::Refused(reason)
    }

    fn activate(&self, new: Authority, now: SystemTime) -> Result<(), CitadelError> {
        let (chain, key) = new.issue_serving_cert(
            &self.config.server_dns_names,
            &self.config.server_ips,
            SERVING_CERT_TTL,
            now,
        )?;
        let renew_at = renew_time(&chain[0], now);
        let ck = certified_key(chain, &key)?;
        // Build everything first, then switch: nothing can fail after the first store.
        self.serving.set(ck);
        *self
            .serving_renew_at
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = renew_at;
        self.metrics
            .set_expiry(new.signing_root().not_after, new.chain_not_after());
        let roots: Vec<String> = new.roots().iter().map(|r| r.fingerprint.clone()).collect();
        tracing::info!(
            source = %new.source(),
            signing_root = %new.signing_root().fingerprint,
            served_roots = ?roots,
            "activated new CA material"
        );
        if let Err(e) = write_bundle(&self.config, &new) {
            tracing::error!(error = %e, "writing the trust bundle file failed");
        }
        self.authority.store(Arc::new(new));
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.metrics.reload(true);
        *self
            .last_failed_input
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }

    fn renew_serving_cert_if_due(&self, now: SystemTime) {
        let due = *self
            .serving_renew_at
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if now < due {
            return;
        }
        let authority = self.authority.load();
        let result = authority
            .issue_serving_cert(
                &self.config.server_dns_names,
                &self.config.server_ips,
                SERVING_CERT_TTL,
                now,
            )
            .and_then(|(chain, key)| {
                let at = renew_time(&chain[0], now);
                Ok((certified_key(chain, &key)?, at))
            });
        match result {
            Ok((ck, at)) => {
                self.serving.set(ck);
                *self
                    .serving_renew_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = at;
                tracing::info!("renewed the CA serving certificate");
            }
            Err(e) => tracing::error!(error = %e, "renewing the CA serving certificate failed"),
        }
    }

    /// The whole request path after transport: authenticate, issue, audit.
    pub async fn create_certificate(
        &self,
        req: &IstioCertificateRequest,
        evidence: &CallerEvidence<'_>,
        peer: &str,
    ) -> Result<IstioCertificateResponse, Refusal> {
        let now = SystemTime::now();
        let caller = authenticate_with(
            self.external.as_deref(),
            &self.tokens,
            &self.node_agents,
            &self.config.trust_domain,
            evidence,
            now,
        )
        .await?;
        let authority = self.authority.load_full();
        let issued = issue(
            &authority,
            &self.policy,
            &req.csr,
            req.validity_duration,
            &caller.id,
            now,
        )?;
        let record = AuditRecord {
            time: rfc3339(now),
            serial: issued.facts.serial_hex.clone(),
            spiffe_id: caller.id.to_string(),
            not_after: rfc3339(issued.facts.not_after),
            caller: caller.audit_name(),
            auth: caller.method.as_str(),
            peer: peer.to_owned(),
        };
        self.audit
            .append(&record)
            .await
            .map_err(|e| Refusal::AuditFailed(e.to_string()))?;
        // Only the debug-level "issued" event shows these after this point: at info level
        // recording them would only format three strings per certificate for nothing.
        if tracing::enabled!(tracing::Level::DEBUG) {
            let span = tracing::Span::current();
            span.record("caller", tracing::field::display(&record.caller));
            span.record("identity", tracing::field::display(&record.spiffe_id));
            span.record("serial", tracing::field::display(&record.serial));
            tracing::debug!(auth = caller.method.as_str(), "issued");
        }
        Ok(IstioCertificateResponse {
            cert_chain: issued.cert_chain,
        })
    }

    /// The SPIFFE ID of the client certificate the caller of a request (its `extensions`)
    /// presented on the CA's port, checked now as CreateCertificate checks it (the bundle in
    /// force, the trust domain, expiry, the CA's CRLs), or why there is none.
    pub fn caller_certificate_id(
        &self,
        extensions: &tonic::Extensions,
    ) -> Result<SpiffeId, String> {
        let peer = extensions
            .get::<PeerInfo>()
            .ok_or("the connection is not the CA's TLS listener")?;
        let pc = peer
            .cert
            .as_ref()
            .ok_or("no client certificate was presented")?;
        self.client_identity(pc, SystemTime::now())
    }

    fn client_identity(&self, pc: &PeerCert, now: SystemTime) -> Result<SpiffeId, String> {
        if now > pc.not_after {
            return Err("client certificate expired".into());
        }
        let generation = self.generation.load(Ordering::Acquire);
        {
            let mut checked = pc.checked.lock().unwrap_or_else(|p| p.into_inner());
            if checked.0 != generation {
                let authority = self.authority.load();
                // The check a mesh server makes in the handshake, deferred to here
                // (citadel::tls): the bundle in force, our trust domain, EKU clientAuth. A
                // revoked certificate cannot renew itself (a stolen key must not buy a fresh
                // certificate): the CA's own CRLs apply to its callers.
                let crls = self.revocations.current();
                let verifier = SpiffeClientVerifier::required(
                    authority.bundle().clone(),
                    TrustDomainPolicy::local(self.config.trust_domain.clone()),
                );
                verifier.set_revocation(Some(crls.check.clone()));
                let verdict = verifier
                    .verify_chain(&pc.chain, now)
                    .map(|_| ())
                    .map_err(|e| {
                        format!("client certificate does not verify against the trust bundle: {e}")
                    });
                *checked = (generation, verdict);
            }
            checked.1.clone()?;
        }
        pc.id.clone()
    }

    fn peer_cert(&self, chain: Vec<CertificateDer<'static>>) -> PeerCert {
        let td = &self.config.trust_domain;
        let (id, not_after) = match CertInfo::parse(&chain[0]) {
            Ok(info) => {
                let id = match info.uri_sans.as_slice() {
                    [one] => SpiffeId::parse(one)
                        .map_err(|e| e.to_string())
                        .and_then(|id| {
                            if id.trust_domain() == td {
                                Ok(id)
                            } else {
                                Err(format!("{id} is not in trust domain {td}"))
                            }
                        }),
                    other => Err(format!(
                        "client certificate has {} URI SANs, expected one SPIFFE ID",
                        other.len()
                    )),
                };
                (id, info.not_after)
            }
            Err(e) => (Err(e.to_string()), SystemTime::UNIX_EPOCH),
        };
        PeerCert {
            chain,
            id,
            not_after,
            // Never checked yet: the first request verifies the chain (the handshake only
            // proved possession of the key).
            checked: Mutex::new((u64::MAX, Err("client certificate not verified yet".into()))),
        }
    }
}

fn write_bundle(config: &CaConfig, authority: &Authority) -> Result<(), CitadelError> {
    if let Some(path) = &config.bundle_out {
        rampart_certs::write_file_atomic(path, authority.bundle().to_pem().as_bytes(), 0o644)
            .map_err(|e| CitadelError::io(path, e))?;
    }
    Ok(())
}

fn renew_time(leaf: &CertificateDer<'_>, now: SystemTime) -> SystemTime {
    match CertInfo::parse(leaf) {
        Ok(info) => {
            let life = info
                .not_after
                .duration_since(info.not_before)
                .unwrap_or_default();
            info.not_before + life / 2
        }
        Err(_) => now + Duration::from_secs(3600),
    }
}

/// The lock file in a CA's state directory.
pub const STATE_LOCK_FILE: &str = "ca.lock";

/// An exclusive `flock` on `<state>/ca.lock`, with the holder's process id written into the
/// file; let go when dropped and by the kernel when the process ends (also on `kill -9`).
///
/// One CA per state directory: a second CA on the same directory would make its own
/// self-signed root beside the first's, take over its admin socket and append to its audit
/// log (and cut back lines the other is writing when a batch fails). It is refused, naming the
/// holder, before it reads or writes anything there.
#[derive(Debug)]
pub struct StateLock {
    _file: std::fs::File,
    dir: std::path::PathBuf,
}

impl StateLock {
    /// Creates the directory (0700) if needed and takes its lock, or says who holds it.
    pub fn acquire(dir: &std::path::Path) -> Result<Self, CitadelError> {
        use std::io::{Read as _, Seek as _, Write as _};
        use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
        create_private_dir(dir)?;
        let path = dir.join(STATE_LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(
                (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC).bits() as i32,
            )
            .open(&path)
            .map_err(|e| CitadelError::io(&path, e))?;
        // Ours alone: a regular file with no other name (the pid is written into it below).
        let meta = file.metadata().map_err(|e| CitadelError::io(&path, e))?;
        if !meta.is_file() || meta.nlink() != 1 {
            return Err(CitadelError::Config(format!(
                "{}: not a regular file of its own (remove it; the CA makes it again)",
                path.display()
            )));
        }
        // A lock let go a moment ago can still be held by a child forked in between (until
        // its exec closes the descriptor): a second's retries before calling it in use.
        let mut waited = Duration::ZERO;
        let locked = loop {
            match file.try_lock() {
                Err(std::fs::TryLockError::WouldBlock) if waited < Duration::from_secs(1) => {
                    std::thread::sleep(Duration::from_millis(20));
                    waited += Duration::from_millis(20);
                }
                other => break other,
            }
        };
        match locked {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut head = [0u8; 16];
                let n = file.read(&mut head).unwrap_or(0);
                let pid = std::str::from_utf8(&head[..n])
                    .ok()
                    .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
                let who = match pid {
                    Some(p) => format!("process {p}"),
                    None => "another process".to_owned(),
                };
                return Err(CitadelError::Config(format!(
                    "state directory {} is in use by {who} (it holds {}): one CA per state \
                     directory; stop the other CA or give this one its own --state",
                    dir.display(),
                    path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(CitadelError::io(&path, e)),
        }
        let pid = std::process::id().to_string();
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(pid.as_bytes()))
            .map_err(|e| CitadelError::io(&path, e))?;
        Ok(StateLock {
            _file: file,
            dir: dir.to_path_buf(),
        })
    }
}

fn create_private_dir(dir: &std::path::Path) -> Result<(), CitadelError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| CitadelError::io(dir, e))
}

/// The tonic service.
#[derive(Debug, Clone)]
pub struct CaService {
    state: Arc<CaState>,
}

impl CaService {
    /// Wraps the state.
    pub fn new(state: Arc<CaState>) -> Self {
        CaService { state }
    }

    async fn handle(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<IstioCertificateResponse, Refusal> {
        let state = &self.state;
        let deadline = state.config.request_timeout;
        let work = async {
            let _permit = state
                .permits
                .acquire()
                .await
                .map_err(|_| Refusal::Overloaded)?;
            let now = SystemTime::now();
            let md = request.metadata();
            let authorization = match md.get("authorization") {
                Some(v) => Some(v.to_str().map_err(|_| {
                    Refusal::MalformedAuthorization("header is not visible ASCII".into())
                })?),
                None => None,
            };
            let peer = request.extensions().get::<PeerInfo>();
            let client_cert = peer
                .and_then(|p| p.cert.as_ref())
                .map(|pc| state.client_identity(pc, now));
            let msg = request.get_ref();
            let impersonate = msg
                .metadata
                .as_ref()
                .and_then(|s| s.fields.get(IMPERSONATED_IDENTITY))
                .map(|v| match &v.kind {
                    Some(prost_types::value::Kind::StringValue(s)) => Ok(s.as_str()),
                    _ => Err(Refusal::BadImpersonation("value is not a string".into())),
                })
                .transpose()?;
            let cluster_id = match md.get("clusterid") {
                Some(v) => Some(v.to_str().map_err(|_| {
                    Refusal::ClusterIdMismatch("clusterid header is not visible ASCII".into())
                })?),
                None => None,
            };
            let evidence = CallerEvidence {
                authorization,
                client_cert,
                impersonate,
                cluster_id,
            };
            let peer_addr = peer.map(|p| p.remote.to_string()).unwrap_or_default();
            state.create_certificate(msg, &evidence, &peer_addr).await
        };
        match tokio::time::timeout(deadline, work).await {
            Ok(r) => r,
            Err(_) => Err(Refusal::Deadline(deadline)),
        }
    }
}

/// The caller's address as the `issue` span shows it (`-` when unknown), formatted by the
/// subscriber only, without a String of its own.
struct PeerAddr(Option<SocketAddr>);

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("-"),
        }
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        let metrics = &self.state.metrics;
        metrics.csr_received();
        metrics.inflight_add(1);
        // One span per issuance: the caller's address, then who it proved to be, the
        // identity certified and the serial, so a certificate seen in an agent's or a proxy's
        // log can be followed back here (and to the audit log).
        let peer = request.extensions().get::<PeerInfo>().map(|p| p.remote);
        let span = tracing::info_span!(
            "issue",
            peer = tracing::field::display(PeerAddr(peer)),
            caller = tracing::field::Empty,
            identity = tracing::field::Empty,
            serial = tracing::field::Empty,
        );
        let result = self.handle(request).instrument(span.clone()).await;
        metrics.inflight_add(-1);
        let _enter = span.enter();
        match result {
            Ok(resp) => {
                metrics.issued();
                Ok(tonic::Response::new(resp))
            }
            Err(refusal) => {
                metrics.refused(&refusal);
                if refusal.code() == tonic::Code::Internal {
                    tracing::error!(reason = %refusal, "CreateCertificate failed");
                } else {
                    tracing::info!(reason = %refusal, "CreateCertificate refused");
                }
                Err(refusal.into())
            }
        }
    }
}

impl crate::admin::AdminBackend for CaState {
    fn audit_log(&self) -> std::path::PathBuf {
        self.audit_log_path()
    }

    fn revoke_entries(
        &self,
        entries: &[(String, String, SystemTime)],
        reason: Option<rampart_certs::RevocationReason>,
    ) -> Result<Vec<crate::revocation::RevokedSerial>, CitadelError> {
        self.revoke(entries, reason)
    }

    fn published(&self) -> Arc<crate::revocation::PublishedCrls> {
        self.revocations.current()
    }

    fn revocation_share(&self) -> Option<Arc<dyn crate::admin::RevocationShare>> {
        CaState::revocation_share(self)
    }

    fn add_identity_rule(
        &self,
        rule: crate::revocation::IdentityRevocation,
    ) -> Result<bool, CitadelError> {
        self.revocations.add_identity_rule(rule)
    }

    fn holds_all(&self, entries: &[(String, String, SystemTime)]) -> bool {
        let held = self.revocations.state();
        entries.iter().all(|(s, ..)| held.find(s).is_some())
    }
}

/// `rampart.ca.v1.Revocation`: the served CRLs, for callers authenticated like
/// CreateCertificate (a bearer token or a client certificate of the mesh; no impersonation).
#[derive(Debug, Clone)]
pub struct RevocationService {
    state: Arc<CaState>,
}

impl RevocationService {
    /// Wraps the state.
    pub fn new(state: Arc<CaState>) -> Self {
        RevocationService { state }
    }
}

#[tonic::async_trait]
impl rampart_proto::rampart::ca::v1::revocation_server::Revocation for RevocationService {
    async fn get_crls(
        &self,
        request: tonic::Request<rampart_proto::rampart::ca::v1::GetCrlsRequest>,
    ) -> Result<tonic::Response<rampart_proto::rampart::ca::v1::GetCrlsResponse>, tonic::Status>
    {
        let state = &self.state;
        let now = SystemTime::now();
        let authorization = match request.metadata().get("authorization") {
            Some(v) => Some(v.to_str().map_err(|_| {
                tonic::Status::from(Refusal::MalformedAuthorization(
                    "header is not visible ASCII".into(),
                ))
            })?),
            None => None,
        };
        let peer = request.extensions().get::<PeerInfo>();
        let client_cert = peer
            .and_then(|p| p.cert.as_ref())
            .map(|pc| state.client_identity(pc, now));
        let cluster_id = match request.metadata().get("clusterid") {
            Some(v) => Some(v.to_str().map_err(|_| {
                tonic::Status::from(Refusal::ClusterIdMismatch(
                    "clusterid header is not visible ASCII".into(),
                ))
            })?),
            None => None,
        };
        let evidence = CallerEvidence {
            authorization,
            client_cert,
            impersonate: None,
            cluster_id,
        };
        let caller = authenticate_with(
            state.external.as_deref(),
            &state.tokens,
            &state.node_agents,
            &state.config.trust_domain,
            &evidence,
            now,
        )
        .await
        .inspect_err(|r| {
            tracing::info!(reason = %r, "GetCrls refused");
        })?;
        let cur = state.revocations.current();
        let etag = cur.set.etag().to_owned();
        let not_modified =
            !request.get_ref().if_none_match.is_empty() && request.get_ref().if_none_match == etag;
        tracing::debug!(caller = %caller.id, version = cur.version, not_modified, "GetCrls");
        Ok(tonic::Response::new(
            rampart_proto::rampart::ca::v1::GetCrlsResponse {
                version: cur.version,
                etag,
                not_modified,
                crls: if not_modified {
                    Vec::new()
                } else {
                    cur.set.ders().into_iter().map(|d| d.to_vec()).collect()
                },
                issuers: if not_modified {
                    Vec::new()
                } else {
                    state
                        .authority()
                        .signer()
                        .chain_to_root()
                        .into_iter()
                        .map(|c| c.to_vec())
                        .collect()
                },
                next_update: cur.set.next_update().map_or(0, |t| {
                    t.duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs() as i64)
                }),
            },
        ))
    }
}

/// What an established connection did last, and whether the accept loop has asked it to
/// close (the idlest connection, evicted to make room at the connection limit).
struct Activity {
    /// [`now_ms`] when a byte last moved either way.
    last_ms: AtomicU64,
    close: AtomicBool,
    waker: Mutex<Option<std::task::Waker>>,
}

/// Milliseconds on a monotonic clock private to this process.
fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    u64::try_from(
        EPOCH
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }
}

/// How long a connection must have moved no byte before it may be evicted.
const EVICT_AFTER_IDLE: Duration = Duration::from_secs(2);

/// The established connections, so that at the connection limit the one idle longest can be
/// closed instead of every new client waiting behind connections that do nothing (a peer
/// that completes handshakes and then goes silent cannot hold the CA's slots).
#[derive(Default)]
struct Live {
    next: u64,
    conns: HashMap<u64, Arc<Activity>>,
}

/// A connection's entry in [`Live`], removed when the connection is dropped.
struct LiveEntry {
    live: Arc<Mutex<Live>>,
    id: u64,
}

impl Drop for LiveEntry {
    fn drop(&mut self) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.conns.remove(&self.id);
    }
}

impl Live {
    fn add(this: &Arc<Mutex<Live>>) -> (Arc<Activity>, LiveEntry) {
        let activity = Arc::new(Activity {
            last_ms: AtomicU64::new(now_ms()),
            close: AtomicBool::new(false),
            waker: Mutex::new(None),
        });
        let mut live = this.lock().unwrap_or_else(|p| p.into_inner());
        let id = live.next;
        live.next += 1;
        live.conns.insert(id, activity.clone());
        (
            activity,
            LiveEntry {
                live: this.clone(),
                id,
            },
        )
    }

    /// Ask the connection idle longest (at least [`EVICT_AFTER_IDLE`]) to close; whether
    /// there was one.
    fn evict_idlest(&self) -> bool {
        let now = now_ms();
        let min_idle = u64::try_from(EVICT_AFTER_IDLE.as_millis()).unwrap_or(u64::MAX);
        let victim = self
            .conns
            .values()
            .filter(|a| !a.close.load(Ordering::Relaxed))
            .min_by_key(|a| a.last_ms.load(Ordering::Relaxed))
            .filter(|a| now.saturating_sub(a.last_ms.load(Ordering::Relaxed)) >= min_idle);
        let Some(a) = victim else {
            return false;
        };
        a.close.store(true, Ordering::Release);
        if let Some(w) = a.waker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            w.wake();
        }
        true
    }
}

/// A TLS connection with what its handshake proved.
struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
    activity: Arc<Activity>,
    _live: LiveEntry,
    _slot: ConnSlot,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        // Evicted: end of stream, and the server closes the connection.
        if me.activity.close.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut me.inner).poll_read(cx, buf) {
            Poll::Pending => {
                *me.activity.waker.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(cx.waker().clone());
                if me.activity.close.load(Ordering::Acquire) {
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    me.activity.touch();
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A running CA.
#[derive(Debug)]
pub struct RunningCa {
    /// Where the gRPC server listens.
    pub local_addr: SocketAddr,
    /// Where the metrics endpoint listens.
    pub metrics_addr: Option<SocketAddr>,
    state: Arc<CaState>,
    shutdown: Option<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningCa {
    /// The shared state (authority, metrics, reload).
    pub fn state(&self) -> &Arc<CaState> {
        &self.state
    }

    /// Stops accepting, lets in-flight requests finish (up to 5 s), then stops. The state
    /// directory is free for another CA when this returns.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let tasks = std::mem::take(&mut self.tasks);
        let mut iter = tasks.into_iter();
        if let Some(mut server) = iter.next()
            && tokio::time::timeout(Duration::from_secs(5), &mut server)
                .await
                .is_err()
        {
            server.abort();
            let _ = server.await;
        }
        // Awaited after the abort: the tasks this CA started (reloads, CRL re-signing, the
        // admin socket) are gone before the directory is free for another CA.
        for t in iter {
            t.abort();
            let _ = t.await;
        }
        self.state.release_state_lock();
    }

    /// Runs until the server stops (or the returned future is dropped).
    pub async fn wait(mut self) {
        if let Some(server) = self.tasks.first_mut() {
            let _ = server.await;
        }
    }
}

impl Drop for RunningCa {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.state.release_state_lock();
    }
}

/// Starts the CA: binds the gRPC (TLS) and metrics listeners and spawns the server, the
/// reload loop and the metrics endpoint on the current tokio runtime.
pub async fn start(config: CaConfig) -> Result<RunningCa, CitadelError> {
    let metrics = Metrics::new();
    let state = CaState::new(config, metrics.clone())?;
    start_with_state(state).await
}

/// Like [`start`], with a prepared state.
pub async fn start_with_state(state: Arc<CaState>) -> Result<RunningCa, CitadelError> {
    start_with_routes(state, tonic::service::Routes::default()).await
}

/// Like [`start_with_state`], also serving `extra` gRPC services on the CA's port and TLS
/// (as istiod serves the CA and XDS on one port): each reads its caller's verified
/// certificate identity with [`CaState::caller_certificate_id`].
pub async fn start_with_routes(
    state: Arc<CaState>,
    extra: tonic::service::Routes,
) -> Result<RunningCa, CitadelError> {
    let cfg = &state.config;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| CitadelError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| CitadelError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let mut tasks = Vec::new();

    let tls = Arc::new(server_config(state.serving.clone())?);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let (conn_tx, conn_rx) = mpsc::channel::<Result<TlsConn, std::io::Error>>(1024);
    let accept_task = tokio::spawn(accept_loop(listener, acceptor, conn_tx, state.clone()));

    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let svc = IstioCertificateServiceServer::new(CaService::new(state.clone()))
        .max_decoding_message_size(cfg.max_csr_bytes * 2 + 64 * 1024);
    let crl_svc = rampart_proto::rampart::ca::v1::revocation_server::RevocationServer::new(
        RevocationService::new(state.clone()),
    );
    let incoming = tokio_stream::wrappers::ReceiverStream::new(conn_rx);
    let grpc_state = state.clone();
    let server_task = tokio::spawn(async move {
        let routes = extra.add_service(svc).add_service(crl_svc);
        grpc_state.grpc.store(GRPC_SERVING, Ordering::Release);
        let result = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(1024))
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = shutdown_rx.await;
            })
            .await;
        grpc_state.grpc.store(GRPC_STOPPED, Ordering::Release);
        if let Err(e) = result {
            tracing::error!(error = %e, "gRPC server stopped");
        }
    });
    tasks.push(server_task);
    tasks.push(accept_task);

    let metrics_addr = match cfg.metrics {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| CitadelError::Listen { addr, source })?;
            let bound = l
                .local_addr()
                .map_err(|source| CitadelError::Listen { addr, source })?;
            let health = state.clone();
            tasks.push(tokio::spawn(serve_metrics(
                l,
                state.metrics.clone(),
                Arc::new(move |now| health.not_ready_reasons(now)),
            )));
            Some(bound)
        }
        None => None,
    };

    tasks.push(tokio::spawn(reload_loop(state.clone())));
    // The admin socket (revocation). Not binding it (a state directory path too long for a
    // Unix socket, a non-socket file in the way) leaves the CA serving without the admin
    // interface: logged as an error, since revocation then needs a restart to fix.
    let admin_path = crate::admin::admin_socket_path(&cfg.state_dir);
    match crate::admin::serve_admin(state.clone(), &admin_path) {
        Ok(task) => tasks.push(task),
        Err(e) => tracing::error!(
            socket = %admin_path.display(),
            error = %e,
            "admin socket not available: `rampart ca revoke` cannot reach this CA"
        ),
    }

    Ok(RunningCa {
        local_addr,
        metrics_addr,
        state,
        shutdown: Some(shutdown_tx),
        tasks,
    })
}

/// The TLS handshakes in progress, oldest first, so a new arrival at the limit can drop the
/// oldest (a stalled handshake) instead of being turned away itself.
#[derive(Default)]
struct Handshakes {
    next: u64,
    pending: std::collections::BTreeMap<u64, tokio::task::AbortHandle>,
}

/// One open TCP connection's slot: the connection-limit permit and the gauge, both given
/// back when the connection (in handshake or served by tonic) is dropped.
struct ConnSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.metrics.connections_open_add(-1);
    }
}

/// Accepts TCP connections within the limits: a connection slot is taken **before**
/// `accept` (at the limit, new connections wait in the kernel's backlog or are refused by
/// it, costing the CA nothing); at most `max_handshakes` TLS handshakes run at once, each
/// for at most `handshake_timeout`, and a new connection beyond that drops the oldest
/// pending handshake. Every give-up is counted in `citadel_server_connection_refused_count`.
async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    conn_tx: mpsc::Sender<Result<TlsConn, std::io::Error>>,
    state: Arc<CaState>,
) {
    use crate::metrics::ConnectionRefusal;
    let slots = Arc::new(Semaphore::new(state.config.max_connections));
    let handshakes = Arc::new(Mutex::new(Handshakes::default()));
    let live = Arc::new(Mutex::new(Live::default()));
    let metrics = state.metrics.clone();
    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                metrics.connection_refused(ConnectionRefusal::ConnectionLimit);
                tracing::warn!(
                    limit = state.config.max_connections,
                    "connection limit reached; closing the idlest connection, else waiting for one to close"
                );
                // Until a slot frees, close the connection idle longest whenever there is one
                // idle long enough (checked twice a second).
                loop {
                    let evicted = live
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .evict_idlest();
                    if evicted {
                        metrics.connection_refused(ConnectionRefusal::IdleEvicted);
                    }
                    tokio::select! {
                        p = slots.clone().acquire_owned() => match p {
                            Ok(p) => break p,
                            Err(_) => return,
                        },
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        };
        let (tcp, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        metrics.connections_open_add(1);
        let slot = ConnSlot {
            _permit: permit,
            metrics: metrics.clone(),
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, tx, st, hs, lv) = (
            acceptor.clone(),
            conn_tx.clone(),
            state.clone(),
            handshakes.clone(),
            live.clone(),
        );
        let timeout = state.config.handshake_timeout;
        // Registered under the lock before the task can look for itself, so it always finds
        // (and removes) its own entry.
        let mut table = handshakes.lock().unwrap_or_else(|p| p.into_inner());
        if table.pending.len() >= state.config.max_handshakes
            && let Some((_, oldest)) = table.pending.pop_first()
        {
            oldest.abort();
            metrics.handshakes_add(-1);
            metrics.connection_refused(ConnectionRefusal::HandshakeEvicted);
            tracing::debug!("handshake limit reached; dropped the oldest pending handshake");
        }
        let id = table.next;
        table.next += 1;
        metrics.handshakes_add(1);
        let task = tokio::spawn(async move {
            let result = tokio::time::timeout(timeout, acceptor.accept(tcp)).await;
            {
                let mut table = hs.lock().unwrap_or_else(|p| p.into_inner());
                if table.pending.remove(&id).is_none() {
                    // Evicted just as it finished: the eviction already counted it.
                    return;
                }
            }
            st.metrics.handshakes_add(-1);
            let tls = match result {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    st.metrics
                        .connection_refused(ConnectionRefusal::HandshakeFailed);
                    let error = e
                        .get_ref()
                        .and_then(|i| i.downcast_ref::<rustls::Error>())
                        .and_then(rampart_certs::tls::kx_refusal)
                        .unwrap_or_else(|| e.to_string());
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        // Closed before the handshake ended: a port probe (`up`'s readiness
                        // check, a load balancer's) more often than anything to look into.
                        tracing::debug!(%remote, %error, "connection closed during the TLS handshake");
                    } else {
                        tracing::info!(%remote, %error, "TLS handshake refused");
                    }
                    return;
                }
                Err(_) => {
                    st.metrics
                        .connection_refused(ConnectionRefusal::HandshakeTimeout);
                    tracing::debug!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .filter(|c| !c.is_empty())
                .map(|c| {
                    Arc::new(st.peer_cert(c.iter().map(|c| c.clone().into_owned()).collect()))
                });
            let (activity, entry) = Live::add(&lv);
            let _ = tx
                .send(Ok(TlsConn {
                    inner: tls,
                    info: PeerInfo { remote, cert },
                    activity,
                    _live: entry,
                    _slot: slot,
                }))
                .await;
        });
        table.pending.insert(id, task.abort_handle());
        drop(table);
    }
}

/// Watches the plug-in directory (inotify via `notify`, plus a poll every
/// `reload_poll_interval` in case events are missed or the directory appears later).
async fn reload_loop(state: Arc<CaState>) {
    let (ev_tx, mut ev_rx) = mpsc::channel::<()>(16);
    let dir = state.config.cacerts_dir.clone();
    // Keep the watcher alive for the life of the loop.
    let _watcher = {
        use notify::Watcher;
        let tx = ev_tx.clone();
        match notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok() {
                let _ = tx.try_send(());
            }
        }) {
            Ok(mut w) => match w.watch(&dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => Some(w),
                Err(e) => {
                    tracing::debug!(dir = %dir.display(), error = %e, "not watching cacerts directory (polling only)");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "file watching unavailable; polling cacerts directory");
                None
            }
        }
    };
    // Often enough to re-sign the CA's CRL well before it expires, too.
    let mut tick = tokio::time::interval(
        state
            .config
            .reload_poll_interval
            .min(state.config.crl_validity / 8),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(()) = ev_rx.recv() => {
                // Let a burst of writes (four files) settle, then look once.
                tokio::time::sleep(Duration::from_millis(300)).await;
                while ev_rx.try_recv().is_ok() {}
            }
        }
        let st = state.clone();
        let _ = tokio::task::spawn_blocking(move || {
            st.reload_now();
            for outcome in st.tokens.reload_jwks() {
                match outcome {
                    JwksReload::Reloaded { issuer } => {
                        tracing::info!(%issuer, "JWKS file changed; new token-signing keys in force");
                    }
                    JwksReload::Refused { issuer, reason } => {
                        tracing::error!(%issuer, error = %reason, "JWKS file refused; the previous keys stay in force");
                    }
                }
            }
        })
        .await;
    }
}
