//! The certificate lifecycle of one workload identity: key, CSR, check, install, renew.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rampart_certs::{
    CertInfo, CertificateDer, KeyAlgorithm, PrivateKey, SpiffeId, TrustBundle, build_csr,
    parse_serial_hex,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::caclient::{CertificateSigner, SignRequest};
use crate::config::{RotationConfig, read_nonempty};
use crate::metrics::Metrics;
use crate::rotation::{Backoff, random_unit, refresh_delay};
use crate::state::{SecretStore, ServedCrls, Snapshot};
use crate::{Error, files, verify};

/// Wall-clock source. `System` in production; `Tokio` follows tokio's (pausable) clock from
/// a fixed start so rotation can be tested with paused time.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// `SystemTime::now()`.
    System,
    /// `base + (tokio::time::Instant::now() - start)`.
    Tokio {
        /// Tokio instant at `base`.
        start: tokio::time::Instant,
        /// Wall time at `start`.
        base: SystemTime,
    },
    /// [`Clock::Tokio`] whose wall time also moves by `jump` seconds while tokio's clock
    /// stands still, as over a host suspend (tests).
    #[cfg(test)]
    Suspendable {
        /// Tokio instant at `base`.
        start: tokio::time::Instant,
        /// Wall time at `start`.
        base: SystemTime,
        /// Seconds the wall clock jumped.
        jump: &'static std::sync::atomic::AtomicU64,
    },
}

// === impl Clock ===

impl Clock {
    /// A clock driven by tokio time, starting now.
    pub fn tokio_now() -> Self {
        Clock::Tokio {
            start: tokio::time::Instant::now(),
            base: SystemTime::now(),
        }
    }

    /// The current wall time.
    pub fn now(&self) -> SystemTime {
        match self {
            Clock::System => SystemTime::now(),
            Clock::Tokio { start, base } => *base + start.elapsed(),
            #[cfg(test)]
            Clock::Suspendable { start, base, jump } => {
                *base
                    + start.elapsed()
                    + Duration::from_secs(jump.load(std::sync::atomic::Ordering::SeqCst))
            }
        }
    }

    /// Sleep until wall time `t` (immediately if it passed), or for at most [`MAX_SLEEP`]:
    /// timers run on the monotonic clock, which stands still while the host is suspended,
    /// so a caller wakes at least that often to compare `t` with the wall clock again
    /// (after a resume, a certificate whose not-after passed meanwhile is withdrawn and
    /// renewed within `MAX_SLEEP`, not hours later).
    pub(crate) fn sleep_until(&self, t: SystemTime) -> tokio::time::Sleep {
        let d = t.duration_since(self.now()).unwrap_or(Duration::ZERO);
        tokio::time::sleep(d.min(MAX_SLEEP))
    }

    /// Whether wall time `t` has come.
    pub(crate) fn reached(&self, t: SystemTime) -> bool {
        self.now() >= t
    }
}

/// The longest a lifecycle timer sleeps before it looks at the wall clock again.
pub(crate) const MAX_SLEEP: Duration = Duration::from_secs(30);

/// Everything one identity's lifecycle needs.
pub(crate) struct Manager {
    pub(crate) id: SpiffeId,
    pub(crate) token_path: PathBuf,
    pub(crate) ca_root_path: Option<PathBuf>,
    pub(crate) signer: Arc<dyn CertificateSigner>,
    pub(crate) rotation: RotationConfig,
    pub(crate) clock: Clock,
    pub(crate) store: SecretStore,
    pub(crate) output_dir: Option<PathBuf>,
    /// `--trust-output-dir`: the output directory's own mode and owner are not judged.
    pub(crate) trust_output_dir: bool,
    pub(crate) metrics: Arc<Metrics>,
}

enum Event {
    Refresh,
    Expired,
    Revoked(String),
    Shutdown,
}

/// Why the SVID in `snap` must not be served: its serial is on a validated CRL of its issuer.
pub(crate) fn revocation_of(snap: &Snapshot) -> Option<String> {
    let svid = snap.svid.as_ref()?;
    let crls = snap.crls.as_ref()?;
    if crls.set().is_empty() {
        return None;
    }
    let serial = parse_serial_hex(&svid.leaf.serial_hex).ok()?;
    // The leaf's issuer: the next certificate of the chain, or else the bundle root whose
    // subject is the leaf's issuer (a root that signs workloads directly).
    let issuers: Vec<&CertificateDer<'static>> = match svid.chain.get(1) {
        Some(i) => vec![i],
        None => snap
            .bundle
            .as_ref()
            .map(|b| {
                b.trust_bundle()
                    .roots()
                    .iter()
                    .filter(|r| CertInfo::parse(r).is_ok_and(|i| i.subject == svid.leaf.issuer))
                    .collect()
            })
            .unwrap_or_default(),
    };
    issuers.into_iter().find_map(|issuer| {
        crls.set().revoked(issuer, &serial).map(|r| {
            format!(
                "revoked by its CA (serial {}, revoked at {}{})",
                svid.leaf.serial_hex,
                humantime::format_rfc3339_seconds(r.revoked_at),
                r.reason
                    .map(|why| format!(", reason {why}"))
                    .unwrap_or_default()
            )
        })
    })
}

// === impl Manager ===

impl Manager {
    /// One attempt: fresh key, CSR, CA call, checks.
    async fn attempt(&self) -> Result<verify::Checked, Error> {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256)?;
        let csr = build_csr(&key, &self.id)?;
        let chain = self
            .signer
            .sign(SignRequest {
                csr_pem: &csr,
                ttl: self.rotation.ttl,
                token_path: &self.token_path,
            })
            .await?;
        // The configured CA root file is the trust anchor (read now, so an operator's root
        // rotation takes effect); a response is never checked against roots it brings along.
        let Some(root_path) = &self.ca_root_path else {
            return Err(Error::BadCaResponse(
                "no CA root configured to verify the response against".into(),
            ));
        };
        let anchors = TrustBundle::from_pem(&read_nonempty(root_path)?)?;
        verify::check_response(&chain, key, &self.id, &anchors, self.clock.now())
    }

    fn current_not_after(&self) -> Option<SystemTime> {
        self.store.current().svid.map(|s| s.leaf.not_after)
    }

    fn expire(&self) {
        tracing::error!(
            spiffe_id = %self.id,
            "workload certificate expired before it could be renewed; no longer serving it"
        );
        let reason = match self.current_not_after() {
            Some(t) => format!("expired at {}", rampart_certs::timestamp::rfc3339(t)),
            None => "expired".to_string(),
        };
        self.store.revoke_svid(reason);
        if let Some(dir) = &self.output_dir {
            files::remove_svid(dir);
        }
        self.metrics.cert_expired(&self.id.to_string());
    }

    /// Stop serving a certificate the CA revoked (as for an expired one); the caller renews.
    fn withdraw_revoked(&self, why: &str) {
        tracing::error!(
            spiffe_id = %self.id,
            "workload certificate {why}; no longer serving it, renewing now"
        );
        self.store.revoke_svid(why.to_owned());
        if let Some(dir) = &self.output_dir {
            files::remove_svid(dir);
        }
        self.metrics.cert_revoked(&self.id.to_string());
    }

    /// Keep `ca-crl.pem` in the output directory in step with the served CRLs.
    fn sync_crl_file(&self, written: &mut Option<Arc<ServedCrls>>) {
        let Some(dir) = &self.output_dir else {
            return;
        };
        let cur = self.store.current().crls;
        let same = match (&cur, written.as_ref()) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        match files::write_crls(dir, self.trust_output_dir, cur.as_deref()) {
            Ok(()) => *written = cur,
            Err(e) => tracing::error!(spiffe_id = %self.id, "file output: {e}"),
        }
    }

    fn install(&self, checked: verify::Checked) -> Duration {
        let verify::Checked { svid, bundle } = checked;
        let now = self.clock.now();
        let delay = refresh_delay(
            svid.leaf.not_before,
            svid.leaf.not_after,
            svid.received_at,
            now,
            self.rotation.grace_ratio,
            random_unit() * self.rotation.max_jitter,
            self.rotation.min_refresh_interval,
        );
        tracing::info!(
            spiffe_id = %self.id,
            serial = %svid.leaf.serial_hex,
            not_after = %rampart_certs::timestamp::rfc3339(svid.leaf.not_after),
            roots = bundle.bundle.roots().len(),
            refresh_in = ?delay,
            "installed workload certificate"
        );
        self.metrics
            .cert_installed(&self.id.to_string(), svid.leaf.not_after);
        self.store.install(svid, Some(bundle));
        if let Some(dir) = &self.output_dir {
            let snap = self.store.current();
            if let Some(svid) = &snap.svid
                && let Err(e) =
                    files::write_outputs(dir, self.trust_output_dir, svid, snap.bundle.as_deref())
            {
                // The files there are the previous certificate's: a reader would go on using
                // it past its not-after (the expiry watch follows the served one). Remove
                // them; unlinking names in a directory we no longer trust follows no link.
                files::remove_svid(dir);
                tracing::error!(spiffe_id = %self.id, "file output: {e}; the previous certificate's files were removed");
            }
        }
        delay
    }

    /// Wait for the next refresh point, watching for expiry, revocation (a new CRL set naming
    /// the served certificate) and shutdown meanwhile.
    async fn wait(
        &self,
        refresh_at: SystemTime,
        shutdown: &CancellationToken,
        rx: &mut watch::Receiver<Snapshot>,
        crl_file: &mut Option<Arc<ServedCrls>>,
    ) -> Event {
        loop {
            self.sync_crl_file(crl_file);
            if let Some(why) = revocation_of(&rx.borrow_and_update()) {
                return Event::Revoked(why);
            }
            let expiry = self.current_not_after();
            let wake = expiry.map_or(refresh_at, |e| e.min(refresh_at));
            tokio::select! {
                _ = shutdown.cancelled() => return Event::Shutdown,
                _ = self.clock.sleep_until(wake) => {
                    if expiry.is_some_and(|e| self.clock.reached(e)) {
                        return Event::Expired;
                    }
                    if self.clock.reached(refresh_at) {
                        return Event::Refresh;
                    }
                    // A capped sleep ended early: compare with the wall clock again.
                }
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Event::Shutdown;
                    }
                }
            }
        }
    }

    /// Run until `shutdown`: obtain a certificate now, then renew at the grace point; on CA
    /// errors retry with capped exponential backoff while the current certificate (if any)
    /// keeps being served; withdraw it when it expires.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.rotation.backoff_initial, self.rotation.backoff_max);
        let mut next = self.clock.now();
        let mut rx = self.store.subscribe();
        let mut crl_file = None;
        loop {
            match self.wait(next, &shutdown, &mut rx, &mut crl_file).await {
                Event::Shutdown => return,
                Event::Expired => {
                    // Renew right away (the refresh point may still be in the future if the CA
                    // handed out something very short-lived).
                    self.expire();
                    next = next.min(self.clock.now());
                    continue;
                }
                Event::Revoked(why) => {
                    self.withdraw_revoked(&why);
                    backoff.reset();
                    next = self.clock.now();
                    continue;
                }
                Event::Refresh => {}
            }
            let attempt = self.attempt();
            tokio::pin!(attempt);
            let result = loop {
                let expiry = self.current_not_after();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = &mut attempt => break r,
                    _ = self.clock.sleep_until(expiry.unwrap_or(next)), if expiry.is_some() => {
                        if expiry.is_some_and(|e| self.clock.reached(e)) {
                            self.expire();
                        }
                    }
                    changed = rx.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        if let Some(why) = revocation_of(&rx.borrow_and_update()) {
                            self.withdraw_revoked(&why);
                        }
                    }
                }
            };
            match result {
                Ok(checked) => {
                    backoff.reset();
                    let delay = self.install(checked);
                    next = self.clock.now() + delay;
                }
                Err(e) => {
                    self.metrics.ca_error(&self.id.to_string(), &e);
                    let delay = backoff.next_delay(random_unit());
                    let serving = self
                        .current_not_after()
                        .map(|t| rampart_certs::timestamp::rfc3339(t).to_string());
                    tracing::warn!(
                        spiffe_id = %self.id,
                        retry_in = ?delay,
                        still_serving_until = serving.as_deref().unwrap_or("nothing"),
                        "certificate request failed: {e}"
                    );
                    next = self.clock.now() + delay;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use rampart_certs::{CertificateAuthority, RootParams, VerifiedCsr, certs_to_pem};

    use super::*;
    use crate::caclient::BoxFuture;

    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        Ok,
        Down,
        WrongSan,
    }

    /// In-process signer on the tokio clock (paused in these tests).
    struct LocalSigner {
        ca: CertificateAuthority,
        clock: Clock,
        mode: Mutex<Mode>,
        calls: Mutex<Vec<SystemTime>>,
        /// Holds the CA root file the manager trusts.
        _dir: tempfile::TempDir,
    }

    impl CertificateSigner for LocalSigner {
        fn sign<'a>(&'a self, req: SignRequest<'a>) -> BoxFuture<'a, Result<Vec<String>, Error>> {
            Box::pin(async move {
                let now = self.clock.now();
                self.calls.lock().unwrap().push(now);
                let mode = *self.mode.lock().unwrap();
                if mode == Mode::Down {
                    return Err(Error::CaUnreachable {
                        addr: "test".into(),
                        reason: "down".into(),
                    });
                }
                let csr = VerifiedCsr::from_pem(req.csr_pem).unwrap();
                let mut id = csr.requested_spiffe_id().unwrap();
                if mode == Mode::WrongSan {
                    id = SpiffeId::istio(id.trust_domain(), "other", "intruder").unwrap();
                }
                let leaf = self
                    .ca
                    .issue_workload(csr.public_key_spki_der(), &id, req.ttl, now)
                    .unwrap();
                Ok(vec![
                    certs_to_pem(&[leaf]),
                    certs_to_pem(&[self.ca.cert().clone()]),
                ])
            })
        }
    }

    fn setup(ttl: Duration) -> (Manager, Arc<LocalSigner>, SecretStore) {
        setup_with(ttl, Clock::tokio_now())
    }

    fn setup_with(ttl: Duration, clock: Clock) -> (Manager, Arc<LocalSigner>, SecretStore) {
        let ca = CertificateAuthority::self_signed_root(
            &RootParams::default(),
            PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
            clock.now(),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root_path = dir.path().join("root-cert.pem");
        std::fs::write(&root_path, certs_to_pem(&[ca.cert().clone()])).unwrap();
        let signer = Arc::new(LocalSigner {
            ca,
            clock,
            mode: Mutex::new(Mode::Ok),
            calls: Mutex::new(Vec::new()),
            _dir: dir,
        });
        let store = SecretStore::new();
        let m = Manager {
            id: SpiffeId::istio(&"cluster.local".parse().unwrap(), "ns", "sa").unwrap(),
            token_path: PathBuf::from("/dev/null"),
            ca_root_path: Some(root_path),
            signer: signer.clone(),
            rotation: RotationConfig {
                ttl,
                backoff_initial: Duration::from_millis(500),
                backoff_max: Duration::from_secs(8),
                ..RotationConfig::default()
            },
            clock,
            store: store.clone(),
            output_dir: None,
            trust_output_dir: false,
            metrics: Arc::new(Metrics::new()),
        };
        (m, signer, store)
    }

    fn serial(store: &SecretStore) -> Option<String> {
        store.current().svid.map(|s| s.leaf.serial_hex.clone())
    }

    /// Over a host suspend the monotonic clock stands still while the wall clock moves: a
    /// certificate that expired meanwhile is replaced within [`MAX_SLEEP`] of the resume,
    /// not when the monotonic timer (set for the old refresh point) would have fired hours
    /// later. Twin: without the jump nothing is renewed in the same time.
    #[tokio::test(start_paused = true)]
    async fn a_certificate_that_expired_over_a_suspend_is_renewed_on_resume() {
        static JUMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let clock = Clock::Suspendable {
            start: tokio::time::Instant::now(),
            base: SystemTime::now(),
            jump: &JUMP,
        };
        let (m, signer, store) = setup_with(Duration::from_secs(3600), clock);
        let sd = CancellationToken::new();
        let task = tokio::spawn(m.run(sd.clone()));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let first = serial(&store).expect("a certificate");
        // Twin: a minute on, no jump: the same certificate, one CA call.
        tokio::time::sleep(MAX_SLEEP + Duration::from_secs(1)).await;
        assert_eq!(serial(&store).as_deref(), Some(first.as_str()));
        assert_eq!(signer.calls.lock().unwrap().len(), 1);
        // Suspended for two hours: the certificate expired while nothing ran.
        JUMP.store(2 * 3600, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(MAX_SLEEP + Duration::from_secs(1)).await;
        let now = clock.now();
        let svid = store.current().svid.expect("renewed after the resume");
        assert_ne!(svid.leaf.serial_hex, first);
        assert!(svid.leaf.not_after > now, "the one served is valid now");
        assert_eq!(signer.calls.lock().unwrap().len(), 2);
        sd.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn short_ttl_with_backdated_not_before_renews_at_half_life_without_storm() {
        // The CA backdates not-before by 5 minutes; the TTL is 10 s. Renewal must follow the
        // 10 s we really have (about every 5 s, a little earlier with jitter), not the
        // backdated 5 min 10 s lifetime (which would put every refresh point in the past).
        let (m, signer, store) = setup(Duration::from_secs(10));
        let sd = CancellationToken::new();
        let task = tokio::spawn(m.run(sd.clone()));
        tokio::time::sleep(Duration::from_secs(60)).await;
        sd.cancel();
        task.await.unwrap();
        let calls = signer.calls.lock().unwrap().clone();
        // X.509 times have whole seconds, so the usable lifetime is 9..10 s and renewals come
        // every 4..5 s (jitter takes up to 10% of the grace window): 13..=16 calls in 60 s
        // including the first. A storm would be thousands.
        assert!((12..=16).contains(&calls.len()), "{} CA calls", calls.len());
        for w in calls.windows(2) {
            let gap = w[1].duration_since(w[0]).unwrap();
            assert!(
                gap >= Duration::from_millis(3900) && gap <= Duration::from_millis(5100),
                "{gap:?}"
            );
        }
        assert!(store.current().svid.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn ca_down_keeps_cert_with_capped_backoff_then_fails_closed_at_expiry_then_recovers() {
        let (m, signer, store) = setup(Duration::from_secs(40));
        let sd = CancellationToken::new();
        let task = tokio::spawn(m.run(sd.clone()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s1 = serial(&store).expect("first certificate");
        let na = store.current().svid.unwrap().leaf.not_after;
        *signer.mode.lock().unwrap() = Mode::Down;
        // Until expiry: the same certificate is served throughout.
        tokio::time::sleep(Duration::from_secs(35)).await;
        assert_eq!(serial(&store).as_deref(), Some(s1.as_str()));
        let calls = signer.calls.lock().unwrap().clone();
        let gaps: Vec<Duration> = calls[1..]
            .windows(2)
            .map(|w| w[1].duration_since(w[0]).unwrap())
            .collect();
        // Exponential (jitter takes at most half off), capped at 8 s.
        assert!(gaps.len() >= 3, "{gaps:?}");
        assert!(
            gaps.iter().all(|g| *g <= Duration::from_secs(8)),
            "{gaps:?}"
        );
        assert!(gaps.last().unwrap() >= &Duration::from_secs(4), "{gaps:?}");
        // Past not-after: withdrawn.
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(
            store.current().svid.is_none(),
            "expired certificate still served (not_after {na:?})"
        );
        // CA back: a new certificate within the backoff cap.
        *signer.mode.lock().unwrap() = Mode::Ok;
        tokio::time::sleep(Duration::from_secs(9)).await;
        let s2 = serial(&store).expect("renewed after the CA came back");
        assert_ne!(s1, s2);
        sd.cancel();
        task.await.unwrap();
    }

    fn crl_revoking(signer: &LocalSigner, serial: &str, number: u64) -> Arc<ServedCrls> {
        let now = signer.clock.now();
        let crl = signer
            .ca
            .sign_crl(&rampart_certs::CrlParams {
                this_update: now,
                next_update: now + Duration::from_secs(600),
                crl_number: number,
                revoked: vec![rampart_certs::RevokedCert {
                    serial_hex: serial.into(),
                    revoked_at: now,
                    reason: Some(rampart_certs::RevocationReason::KeyCompromise),
                }],
            })
            .unwrap();
        let set = rampart_certs::CrlSet::new(
            vec![crl],
            &[signer.ca.cert().clone()],
            now,
            rampart_certs::CrlExpiry::Refuse,
        )
        .unwrap();
        Arc::new(ServedCrls::new(set, true))
    }

    #[tokio::test(start_paused = true)]
    async fn revoked_own_certificate_is_withdrawn_and_renewed_at_once() {
        let (mut m, signer, store) = setup(Duration::from_secs(3600));
        let out = tempfile::tempdir().unwrap();
        m.output_dir = Some(out.path().to_owned());
        let metrics = m.metrics.clone();
        let sd = CancellationToken::new();
        let task = tokio::spawn(m.run(sd.clone()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s1 = serial(&store).expect("first certificate");
        assert_eq!(signer.calls.lock().unwrap().len(), 1);
        // Negative twin: a CRL of our CA revoking another serial changes nothing, but is
        // written beside root-cert.pem.
        store.set_crls(crl_revoking(&signer, "0badc0de", 1));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(serial(&store).as_deref(), Some(s1.as_str()));
        assert_eq!(signer.calls.lock().unwrap().len(), 1);
        let crl_file = out.path().join(files::CA_CRL_FILE);
        let pem = std::fs::read_to_string(&crl_file).expect("ca-crl.pem written");
        assert!(pem.contains("BEGIN X509 CRL"), "{pem}");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&crl_file).unwrap().permissions().mode() & 0o777,
            0o644
        );
        // Our serial revoked: withdrawn and renewed at once (no waiting for the refresh
        // point an hour away); the fresh certificate is served.
        store.set_crls(crl_revoking(&signer, &s1, 2));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s2 = serial(&store).expect("renewed after revocation");
        assert_ne!(s1, s2);
        assert_eq!(signer.calls.lock().unwrap().len(), 2);
        assert!(
            metrics
                .render()
                .contains("rampart_agent_cert_revoked_total{spiffe_id=\"spiffe://cluster.local/ns/ns/sa/sa\"} 1"),
            "{}",
            metrics.render()
        );
        // The fresh one stays (the CRL does not name it).
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(serial(&store).as_deref(), Some(s2.as_str()));
        assert_eq!(signer.calls.lock().unwrap().len(), 2);
        sd.cancel();
        task.await.unwrap();
    }

    /// The output directory stops being trusted between two certificates (someone opened
    /// it up): the renewed certificate is served but not written, and the previous one's
    /// files are removed, not left on disk to be read past their not-after (the expiry watch
    /// follows the served certificate). Twin: while trusted, renewal replaces them.
    #[tokio::test(start_paused = true)]
    async fn a_renewal_into_a_refused_directory_removes_the_old_files() {
        use std::os::unix::fs::PermissionsExt as _;
        let (mut m, _signer, store) = setup(Duration::from_secs(60));
        let out = tempfile::tempdir().unwrap();
        let dir = out.path().join("out");
        m.output_dir = Some(dir.clone());
        let sd = CancellationToken::new();
        let task = tokio::spawn(m.run(sd.clone()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s1 = serial(&store).expect("first certificate");
        let chain = || std::fs::read_to_string(dir.join(files::CERT_CHAIN_FILE));
        let first = chain().expect("written");
        // Renewed (well before the 60 s not-after) into a trusted directory: replaced.
        tokio::time::sleep(Duration::from_secs(45)).await;
        let s2 = serial(&store).expect("renewed");
        assert_ne!(s1, s2);
        let second = chain().expect("rewritten");
        assert_ne!(first, second);
        // Opened up: the next renewal is served, and the old files go.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        tokio::time::sleep(Duration::from_secs(45)).await;
        let s3 = serial(&store).expect("renewed again");
        assert_ne!(s2, s3);
        assert!(
            chain().is_err(),
            "the previous certificate's chain was left behind"
        );
        assert!(!dir.join(files::KEY_FILE).exists());
        sd.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn wrong_san_from_ca_is_refused_and_old_cert_kept() {
        let (m, signer, store) = setup(Duration::from_secs(20));
        let sd = CancellationToken::new();
        let task = tokio::spawn(m.run(sd.clone()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s1 = serial(&store).unwrap();
        *signer.mode.lock().unwrap() = Mode::WrongSan;
        tokio::time::sleep(Duration::from_secs(15)).await;
        assert!(signer.calls.lock().unwrap().len() >= 3);
        let cur = store.current().svid.unwrap();
        assert_eq!(cur.leaf.serial_hex, s1);
        assert_eq!(cur.leaf.uri_sans, ["spiffe://cluster.local/ns/ns/sa/sa"]);
        sd.cancel();
        task.await.unwrap();
    }
}
