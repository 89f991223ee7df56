//! Root material and the active authority.
//!
//! Plug-in mode reads one of two `cacerts` layouts, chosen as istiod chooses
//! (`detectSigningCABundle`): a `tls.crt` in the directory selects the first, else the second.
//!
//! - **`kubernetes.io/tls`** (cert-manager's Secret, a `Certificate` with `isCA: true`):
//!   `tls.crt` (the signing CA certificate first, optionally followed by its issuer chain),
//!   `tls.key` (its key: PKCS#1, SEC1 or PKCS#8 PEM) and `ca.crt` (the trust anchors, one or
//!   more). The chain is the rest of `tls.crt` followed by the certificate of `ca.crt` that
//!   issued its top (istiod: `tls.crt` then `ca.crt`). `ca.crt` is served as the roots even
//!   when it is an intermediate rather than a self-signed root, as istiod does: the mesh then
//!   trusts that certificate as its anchor. When the Istio files are present too they are
//!   ignored, with a warning at every load.
//! - **Istio**: `ca-cert.pem` (the signing CA certificate), `ca-key.pem` (its key),
//!   `cert-chain.pem` (optional: the chain from `ca-cert` up to the root; a copy of `ca-cert`
//!   in it is ignored) and `root-cert.pem` (one or more roots; several during rotation).
//!
//! Self-signed mode, when the directory holds neither `tls.crt` nor `ca-cert.pem`, generates a
//! root on first start and keeps it in the state directory (`root-cert.pem`, `root-key.pem`
//! 0600), reused on restart.
//!
//! An optional `ca-crl.pem` in the plug-in directory holds CRLs as Istio 1.27 reads them: one
//! per CA certificate of the signing chain (`ca-cert.pem` + `cert-chain.pem`, or `tls.crt` +
//! `ca.crt`), each signed by that CA, in both layouts. It is part
//! of the material: validated on every load (parse, signature by the CA it names, coverage of
//! the whole chain), and a bad one refuses the change like a bad certificate would, so the
//! last good set keeps serving. An expired CRL (past nextUpdate) is loaded and served anyway
//! (its revocations stay in force; dropping it would un-revoke) and reported: an error log
//! at load and at every re-publication, and `citadel_server_crl_expired{issuer}` = 1.
//!
//! Loading is all-or-nothing: the material must parse, the key must match, the chain must
//! link up, and a probe certificate issued with it must verify against the served roots
//! before an [`Authority`] exists. The server holds the current one in an `ArcSwap`, so a
//! reload swaps it atomically and in-flight requests finish with the one they started with.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rampart_certs::{
    CertInfo, CertificateAuthority, CrlExpiry, CrlSet, KeyAlgorithm, PrivateKey, RootParams,
    SpiffeId, TrustBundle, TrustDomain, TrustDomainPolicy, Usage,
};
use rustls_pki_types::CertificateDer;

use crate::error::CitadelError;
use crate::signer::{SigningCertFacts, X509Signer};

/// The files of Istio's plug-in layout.
pub const CA_CERT: &str = "ca-cert.pem";
/// The signing key.
pub const CA_KEY: &str = "ca-key.pem";
/// The chain from the signing certificate to the root.
pub const CERT_CHAIN: &str = "cert-chain.pem";
/// The root(s).
pub const ROOT_CERT: &str = "root-cert.pem";
/// The optional CRLs: in an Istio `cacerts` directory (plug-in CRLs, read by the CA) and beside
/// CA material made with `rampart certs` (written by `rampart certs revoke|crl`).
pub const CA_CRL: &str = "ca-crl.pem";
/// The `kubernetes.io/tls` layout (cert-manager): the signing certificate, then optionally its
/// issuer chain. Its presence selects this layout.
pub const TLS_CRT: &str = "tls.crt";
/// The `kubernetes.io/tls` layout: the signing key.
pub const TLS_KEY: &str = "tls.key";
/// The `kubernetes.io/tls` layout: the trust anchor(s).
pub const TLS_CA: &str = "ca.crt";
/// Self-signed mode: the root certificate in the state directory.
pub const SELF_SIGNED_CERT: &str = "root-cert.pem";
/// Self-signed mode: the root key in the state directory (0600).
pub const SELF_SIGNED_KEY: &str = "root-key.pem";

/// Lifetime of a generated self-signed root (Istio: 10 years).
pub const SELF_SIGNED_ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Where the active material came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaterialSource {
    /// Istio `cacerts` plug-in directory.
    Plugin(PathBuf),
    /// Self-signed root kept in the state directory.
    SelfSigned(PathBuf),
}

impl std::fmt::Display for MaterialSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MaterialSource::Plugin(d) => write!(f, "plug-in cacerts {}", d.display()),
            MaterialSource::SelfSigned(d) => write!(f, "self-signed root in {}", d.display()),
        }
    }
}

/// A served root: its certificate and facts.
#[derive(Debug, Clone)]
pub struct RootInfo {
    /// SHA-256 fingerprint of the DER, hex.
    pub fingerprint: String,
    /// Subject, for display.
    pub subject: String,
    /// Not-before.
    pub not_before: SystemTime,
    /// Not-after.
    pub not_after: SystemTime,
}

/// Subject and validity of one certificate of the signing chain.
#[derive(Debug, Clone)]
pub struct ChainCertValidity {
    /// Subject, for display.
    pub subject: String,
    /// Not-before.
    pub not_before: SystemTime,
    /// Not-after.
    pub not_after: SystemTime,
}

/// One immutable set of signing material: the signer, the chain sent after every leaf, and
/// the trust bundle (every still-valid root of `root-cert.pem`, or `ca.crt`).
pub struct Authority {
    signer: Arc<dyn X509Signer>,
    facts: SigningCertFacts,
    /// The chain after the leaf: intermediates (the signing certificate first, unless it is a
    /// root), each a PEM string, then one PEM string holding every served root.
    chain_after_leaf: Vec<String>,
    /// DER intermediates between a leaf and the roots (for TLS serving chains).
    intermediates: Vec<CertificateDer<'static>>,
    bundle: TrustBundle,
    roots: Vec<RootInfo>,
    signing_root: RootInfo,
    chain_not_after: SystemTime,
    /// Validity of every certificate of the signing chain, the signing certificate first.
    chain_validity: Vec<ChainCertValidity>,
    source: MaterialSource,
    fingerprint_of_inputs: [u8; 32],
    plugin_crls: Option<Arc<CrlSet>>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("source", &self.source)
            .field("roots", &self.roots)
            .field("signing_root", &self.signing_root.fingerprint)
            .field("key", &"[secret key elided]")
            .finish()
    }
}

// === impl Authority ===

impl Authority {
    /// Builds an authority from a loaded signer and the roots to serve, after a probe
    /// issuance verifies against those roots.
    pub fn new(
        signer: Arc<dyn X509Signer>,
        served_roots: Vec<CertificateDer<'static>>,
        trust_domain: &TrustDomain,
        source: MaterialSource,
        fingerprint_of_inputs: [u8; 32],
        now: SystemTime,
    ) -> Result<Self, CitadelError> {
        let dir = match &source {
            MaterialSource::Plugin(d) | MaterialSource::SelfSigned(d) => d.clone(),
        };
        let selftest = |reason: String| CitadelError::MaterialSelfTest {
            dir: dir.clone(),
            reason,
        };
        let chain = signer.chain_to_root();
        let signing_root_der = chain
            .last()
            .cloned()
            .ok_or_else(|| selftest("empty chain".into()))?;
        let signing_root_info = CertInfo::parse(&signing_root_der)?;

        // Serve every root that is still valid; the signing root must be among them.
        let mut roots_der = Vec::new();
        let mut roots = Vec::new();
        for root in served_roots {
            let info = CertInfo::parse(&root)?;
            if info.not_after <= now {
                tracing::warn!(root = %info.sha256_fingerprint, subject = %info.subject, material = %source, "a root of the material (root-cert.pem, or ca.crt) has expired; not served");
                continue;
            }
            if roots_der.iter().any(|r: &CertificateDer<'_>| r == &root) {
                continue;
            }
            roots.push(RootInfo {
                fingerprint: info.sha256_fingerprint.clone(),
                subject: info.subject.clone(),
                not_after: info.not_after,
                not_before: info.not_before,
            });
            roots_der.push(root);
        }
        if !roots_der.contains(&signing_root_der) {
            return Err(selftest(format!(
                "the signing chain ends at root {} ({}), which is not among the served roots",
                signing_root_info.sha256_fingerprint, signing_root_info.subject
            )));
        }
        let bundle = TrustBundle::from_der(roots_der.clone())?;

        // Everything between a leaf and the roots.
        let intermediates: Vec<CertificateDer<'static>> = chain
            .iter()
            .filter(|c| !roots_der.contains(c))
            .cloned()
            .collect();
        let mut chain_not_after = signing_root_info.not_after;
        let mut chain_validity = Vec::with_capacity(chain.len());
        for c in &chain {
            let info = CertInfo::parse(c)?;
            chain_not_after = chain_not_after.min(info.not_after);
            chain_validity.push(ChainCertValidity {
                subject: info.subject,
                not_before: info.not_before,
                not_after: info.not_after,
            });
        }
        let mut chain_after_leaf: Vec<String> = intermediates
            .iter()
            .map(|c| rampart_certs::certs_to_pem(std::slice::from_ref(c)))
            .collect();
        // The signing root first, then the other roots.
        let mut ordered = vec![signing_root_der.clone()];
        ordered.extend(
            roots_der
                .iter()
                .filter(|r| **r != signing_root_der)
                .cloned(),
        );
        chain_after_leaf.push(rampart_certs::certs_to_pem(&ordered));

        let facts = SigningCertFacts::of(signer.ca_cert()).map_err(selftest)?;

        // Probe: issue a workload certificate and verify it like a client would.
        let probe_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256)?;
        let probe_id = SpiffeId::istio(trust_domain, "citadel-probe", "probe")?;
        let probe = signer
            .sign_workload(&crate::signer::WorkloadTemplate {
                spki_der: &probe_key.public_key_spki_der(),
                id: &probe_id,
                ttl: Duration::from_secs(60),
                now,
            })
            .map_err(|e| selftest(format!("probe issuance failed: {e}")))?;
        let mut presented = vec![probe];
        presented.extend(intermediates.iter().cloned());
        rampart_certs::verify_workload_chain(
            &presented,
            &bundle,
            &TrustDomainPolicy::local(trust_domain.clone()),
            now,
            Usage::ClientAuth,
        )
        .map_err(|e| {
            selftest(format!(
                "probe certificate does not verify against the served roots: {e}"
            ))
        })?;

        Ok(Authority {
            signer,
            facts,
            chain_after_leaf,
            intermediates,
            bundle,
            roots,
            signing_root: RootInfo {
                fingerprint: signing_root_info.sha256_fingerprint,
                subject: signing_root_info.subject,
                not_before: signing_root_info.not_before,
                not_after: signing_root_info.not_after,
            },
            chain_not_after,
            chain_validity,
            source,
            fingerprint_of_inputs,
            plugin_crls: None,
        })
    }

    /// This authority with the plug-in CRLs (`ca-crl.pem`) it was loaded with.
    pub fn with_plugin_crls(mut self, crls: Option<CrlSet>) -> Self {
        self.plugin_crls = crls.map(Arc::new);
        self
    }

    /// The validated plug-in CRLs (`ca-crl.pem`), if the material had them.
    pub fn plugin_crls(&self) -> Option<&Arc<CrlSet>> {
        self.plugin_crls.as_ref()
    }

    /// The signer.
    pub fn signer(&self) -> &dyn X509Signer {
        self.signer.as_ref()
    }

    /// Facts about the signing certificate, for validating what it signs.
    pub fn signing_facts(&self) -> &SigningCertFacts {
        &self.facts
    }

    /// PEM strings sent after the leaf: intermediates, then one string with the roots.
    pub fn chain_after_leaf(&self) -> &[String] {
        &self.chain_after_leaf
    }

    /// DER certificates between a leaf and the roots.
    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.intermediates
    }

    /// The trust bundle: every still-valid root.
    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// The served roots.
    pub fn roots(&self) -> &[RootInfo] {
        &self.roots
    }

    /// The root the signing chain ends at.
    pub fn signing_root(&self) -> &RootInfo {
        &self.signing_root
    }

    /// The earliest not-after in the signing chain.
    pub fn chain_not_after(&self) -> SystemTime {
        self.chain_not_after
    }

    /// Subject and validity of every certificate of the signing chain: the signing
    /// certificate first, the root last (one entry when the signing certificate is the root).
    pub fn chain_validity(&self) -> &[ChainCertValidity] {
        &self.chain_validity
    }

    /// Where the material came from.
    pub fn source(&self) -> &MaterialSource {
        &self.source
    }

    /// SHA-256 over the input files, to detect changes.
    pub fn input_fingerprint(&self) -> [u8; 32] {
        self.fingerprint_of_inputs
    }

    /// Issues the CA's own TLS serving certificate with a fresh key.
    pub fn issue_serving_cert(
        &self,
        dns: &[String],
        ips: &[IpAddr],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKey), CitadelError> {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256)?;
        let leaf = self
            .signer
            .sign_server(&key.public_key_spki_der(), dns, ips, ttl, now)?;
        let mut chain = vec![leaf];
        chain.extend(self.intermediates.iter().cloned());
        Ok((chain, key))
    }
}

/// Which `cacerts` layout a plug-in directory uses (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginLayout {
    /// Istio's: `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`.
    Istio,
    /// `kubernetes.io/tls` (cert-manager): `tls.crt`, `tls.key`, `ca.crt`.
    KubernetesTls,
}

impl PluginLayout {
    /// The file holding the signing certificate.
    pub fn cert_file(self) -> &'static str {
        match self {
            PluginLayout::Istio => CA_CERT,
            PluginLayout::KubernetesTls => TLS_CRT,
        }
    }

    /// The file holding the signing key.
    pub fn key_file(self) -> &'static str {
        match self {
            PluginLayout::Istio => CA_KEY,
            PluginLayout::KubernetesTls => TLS_KEY,
        }
    }

    /// The file holding the served roots.
    pub fn roots_file(self) -> &'static str {
        match self {
            PluginLayout::Istio => ROOT_CERT,
            PluginLayout::KubernetesTls => TLS_CA,
        }
    }

    /// The files the signing chain is made of, for messages.
    pub fn chain_files(self) -> &'static str {
        match self {
            PluginLayout::Istio => "ca-cert.pem and cert-chain.pem",
            PluginLayout::KubernetesTls => "tls.crt and ca.crt",
        }
    }
}

impl std::fmt::Display for PluginLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PluginLayout::Istio => "Istio (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem)",
            PluginLayout::KubernetesTls => "kubernetes.io/tls (tls.crt, tls.key, ca.crt)",
        })
    }
}

/// The raw bytes of a material directory's files (both layouts), read once so that loading
/// and change detection see the same content.
#[derive(Default)]
pub struct PluginFiles {
    ca_cert: Option<String>,
    ca_key: Option<zeroize::Zeroizing<String>>,
    cert_chain: Option<String>,
    root_cert: Option<String>,
    ca_crl: Option<String>,
    tls_crt: Option<String>,
    tls_key: Option<zeroize::Zeroizing<String>>,
    tls_ca: Option<String>,
}

impl PluginFiles {
    /// Reads the files of both layouts and the optional `ca-crl.pem`; missing ones are `None`.
    pub fn read(dir: &Path) -> Result<Self, CitadelError> {
        let read = |name: &str| -> Result<Option<String>, CitadelError> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(s) => Ok(Some(s)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(CitadelError::io(path, e)),
            }
        };
        Ok(PluginFiles {
            ca_cert: read(CA_CERT)?,
            ca_key: read(CA_KEY)?.map(zeroize::Zeroizing::new),
            cert_chain: read(CERT_CHAIN)?,
            root_cert: read(ROOT_CERT)?,
            ca_crl: read(CA_CRL)?,
            tls_crt: read(TLS_CRT)?,
            tls_key: read(TLS_KEY)?.map(zeroize::Zeroizing::new),
            tls_ca: read(TLS_CA)?,
        })
    }

    /// The layout in use, as istiod picks it: `tls.crt` present => `kubernetes.io/tls`,
    /// else `ca-cert.pem` present => Istio, else none (self-signed mode).
    pub fn layout(&self) -> Option<PluginLayout> {
        if self.tls_crt.is_some() {
            Some(PluginLayout::KubernetesTls)
        } else if self.ca_cert.is_some() {
            Some(PluginLayout::Istio)
        } else {
            None
        }
    }

    /// Whether this looks like plug-in material (a `tls.crt` or a `ca-cert.pem` is present).
    pub fn is_plugin(&self) -> bool {
        self.layout().is_some()
    }

    /// Files present in the directory that the layout in use ignores: the Istio files when
    /// `tls.crt` selected the `kubernetes.io/tls` layout. (Stray `tls.key`/`ca.crt` without
    /// `tls.crt` are not material: istiod ignores them too.)
    pub fn ignored_files(&self) -> Vec<&'static str> {
        if self.layout() != Some(PluginLayout::KubernetesTls) {
            return Vec::new();
        }
        [
            (CA_CERT, self.ca_cert.is_some()),
            (CA_KEY, self.ca_key.is_some()),
            (CERT_CHAIN, self.cert_chain.is_some()),
            (ROOT_CERT, self.root_cert.is_some()),
        ]
        .into_iter()
        .filter_map(|(f, present)| present.then_some(f))
        .collect()
    }

    /// SHA-256 over all files of both layouts (with presence markers).
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [
            self.ca_cert.as_deref(),
            self.ca_key.as_deref().map(|s| s.as_str()),
            self.cert_chain.as_deref(),
            self.root_cert.as_deref(),
            self.ca_crl.as_deref(),
            self.tls_crt.as_deref(),
            self.tls_key.as_deref().map(|s| s.as_str()),
            self.tls_ca.as_deref(),
        ] {
            match part {
                Some(s) => {
                    ctx.update(&[1]);
                    ctx.update(&(s.len() as u64).to_be_bytes());
                    ctx.update(s.as_bytes());
                }
                None => ctx.update(&[0]),
            }
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }
}

/// Loads plug-in material from `dir` (already read into `files`), in the layout
/// [`PluginFiles::layout`] picks. Every error names the file of that layout it is about.
pub fn load_plugin(
    dir: &Path,
    files: &PluginFiles,
    trust_domain: &TrustDomain,
    now: SystemTime,
) -> Result<Authority, CitadelError> {
    let layout = files
        .layout()
        .ok_or_else(|| CitadelError::CacertsIncomplete {
            dir: dir.to_path_buf(),
            file: "tls.crt or ca-cert.pem",
        })?;
    let missing = |file: &'static str| CitadelError::CacertsIncomplete {
        dir: dir.to_path_buf(),
        file,
    };
    let (cert_pem, key_pem, roots_pem) = match layout {
        PluginLayout::Istio => (&files.ca_cert, &files.ca_key, &files.root_cert),
        PluginLayout::KubernetesTls => (&files.tls_crt, &files.tls_key, &files.tls_ca),
    };
    let cert_pem = cert_pem
        .as_deref()
        .ok_or_else(|| missing(layout.cert_file()))?;
    let key_pem = key_pem.as_ref().ok_or_else(|| missing(layout.key_file()))?;
    let roots_pem = roots_pem
        .as_deref()
        .ok_or_else(|| missing(layout.roots_file()))?;
    tracing::info!(dir = %dir.display(), layout = %layout, "reading plug-in CA material");
    let ignored = files.ignored_files();
    if !ignored.is_empty() {
        tracing::warn!(
            dir = %dir.display(),
            ignored = %ignored.join(", "),
            "cacerts holds both layouts: tls.crt selects the kubernetes.io/tls layout (tls.crt, tls.key, ca.crt), as in istiod; the Istio-layout files are IGNORED"
        );
    }

    let cert_path = dir.join(layout.cert_file());
    let key_path = dir.join(layout.key_file());
    let roots_path = dir.join(layout.roots_file());
    let mut cert_certs = rampart_certs::parse_certs_pem(cert_pem)
        .map_err(|e| CitadelError::invalid(&cert_path, e))?
        .into_iter();
    let ca_cert = cert_certs
        .next()
        .ok_or_else(|| CitadelError::invalid(&cert_path, "no certificate"))?;
    let key =
        PrivateKey::from_pkcs8_pem(key_pem).map_err(|e| CitadelError::invalid(&key_path, e))?;
    let roots = rampart_certs::parse_certs_pem(roots_pem)
        .map_err(|e| CitadelError::invalid(&roots_path, e))?;
    let chain: Vec<CertificateDer<'static>> = match layout {
        PluginLayout::KubernetesTls => {
            // The rest of tls.crt (its issuer chain, if any), then the certificate of ca.crt
            // that issued the top of it, unless that top is in ca.crt itself.
            let mut chain: Vec<_> = cert_certs.filter(|c| *c != ca_cert).collect();
            let top = chain.last().unwrap_or(&ca_cert).clone();
            if !roots.contains(&top) {
                let issuer = issuer_among(&top, &roots).ok_or_else(|| {
                    let subject = CertInfo::parse(&top)
                        .map(|i| i.subject)
                        .unwrap_or_else(|_| "?".into());
                    CitadelError::invalid(
                        &roots_path,
                        format!(
                            "no certificate in it issued the last certificate of tls.crt ({subject}); ca.crt must hold the CA that issued the chain"
                        ),
                    )
                })?;
                chain.push(issuer);
            }
            chain
        }
        PluginLayout::Istio => match &files.cert_chain {
            Some(pem) if !pem.trim().is_empty() => rampart_certs::parse_certs_pem(pem)
                .map_err(|e| CitadelError::invalid(dir.join(CERT_CHAIN), e))?
                .into_iter()
                .filter(|c| *c != ca_cert)
                .collect(),
            _ => {
                // No chain file: the signing certificate is a root itself, or was issued
                // directly by one of the roots.
                if roots.contains(&ca_cert) {
                    Vec::new()
                } else {
                    let info = CertInfo::parse(&ca_cert)
                        .map_err(|e| CitadelError::invalid(&cert_path, e))?;
                    let issuer = roots
                        .iter()
                        .find(|r| CertInfo::parse(r).is_ok_and(|ri| ri.subject == info.issuer))
                        .cloned()
                        .ok_or_else(|| {
                            CitadelError::invalid(
                                dir.join(CERT_CHAIN),
                                "missing, and no root in root-cert.pem issued ca-cert.pem",
                            )
                        })?;
                    vec![issuer]
                }
            }
        },
    };
    let ca = CertificateAuthority::new(ca_cert, key, chain).map_err(|e| match e {
        rampart_certs::Error::KeyMismatch => CitadelError::invalid(
            &key_path,
            format!(
                "{e}: it is not the key of the certificate in {}",
                layout.cert_file()
            ),
        ),
        e => CitadelError::invalid(&cert_path, e),
    })?;
    let crls = match &files.ca_crl {
        Some(pem) => Some(load_plugin_crls(
            dir,
            layout,
            pem,
            &ca.chain_to_root(),
            now,
        )?),
        None => None,
    };
    Ok(Authority::new(
        Arc::new(ca),
        roots,
        trust_domain,
        MaterialSource::Plugin(dir.to_path_buf()),
        files.fingerprint(),
        now,
    )?
    .with_plugin_crls(crls))
}

/// The certificate of `candidates` that issued `cert`: its subject is `cert`'s issuer and its
/// key verifies `cert`'s signature (several roots may share a subject during a rotation).
fn issuer_among(
    cert: &CertificateDer<'_>,
    candidates: &[CertificateDer<'static>],
) -> Option<CertificateDer<'static>> {
    let (_, child) = x509_parser::parse_x509_certificate(cert).ok()?;
    candidates
        .iter()
        .find(|c| {
            x509_parser::parse_x509_certificate(c).is_ok_and(|(_, parent)| {
                parent.subject().as_raw() == child.issuer().as_raw()
                    && child.verify_signature(Some(parent.public_key())).is_ok()
            })
        })
        .cloned()
}

/// Validates a plug-in `ca-crl.pem` against the signing chain `cas` (signing certificate
/// first, root last): every CRL signed by the CA it names, one per CA certificate, and every
/// CA certificate covered. Expired CRLs are kept and reported (module docs).
pub(crate) fn load_plugin_crls(
    dir: &Path,
    layout: PluginLayout,
    pem: &str,
    cas: &[CertificateDer<'static>],
    now: SystemTime,
) -> Result<CrlSet, CitadelError> {
    let path = dir.join(CA_CRL);
    if pem.trim().is_empty() {
        return Err(CitadelError::invalid(
            &path,
            "empty (a cut-off write?); remove the file to run without plug-in CRLs",
        ));
    }
    let set = CrlSet::from_pem(pem, cas, now, CrlExpiry::Keep)
        .map_err(|e| CitadelError::invalid(&path, e))?;
    set.require_coverage(cas).map_err(|e| {
        CitadelError::invalid(
            &path,
            format!(
                "{e}: it needs one CRL per CA certificate of {}",
                layout.chain_files()
            ),
        )
    })?;
    for crl in set.expired(now) {
        tracing::error!(
            file = %path.display(),
            issuer = %crl.issuer(),
            next_update = %crate::audit::rfc3339(crl.next_update()),
            "plug-in CRL has EXPIRED (past its nextUpdate); still served and enforced: publish a fresh one"
        );
    }
    Ok(set)
}

/// After a rotation: the previous self-signed root, served beside the new one until it expires.
pub const SELF_SIGNED_PREVIOUS_CERT: &str = "root-cert-previous.pem";

/// The self-signed root is renewed when less than this fraction of its lifetime is left
/// (Istio's `CITADEL_SELF_SIGNED_ROOT_CERT_GRACE_PERIOD_PERCENTILE` default, 20%).
pub const SELF_SIGNED_ROOT_GRACE: f64 = 0.2;

/// Whether a root with these dates is due for renewal at `now`.
pub fn self_signed_rotation_due(
    not_before: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
) -> bool {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    let left = not_after.duration_since(now).unwrap_or_default();
    left.as_secs_f64() < life.as_secs_f64() * SELF_SIGNED_ROOT_GRACE
}

fn self_signed_params(trust_domain: &TrustDomain, ttl: Duration) -> RootParams {
    RootParams {
        common_name: "Rampart self-signed root".into(),
        organization: trust_domain.to_string(),
        validity: ttl,
    }
}

/// Loads the self-signed root from `state_dir`, generating and persisting it (valid for
/// `ttl`) on first start.
///
/// A root with less than [`SELF_SIGNED_ROOT_GRACE`] of its life left is renewed here, as
/// Istio's self-signed root rotator does: a new certificate for the **same key and subject**,
/// so every certificate issued under the old root also verifies under the new one and the
/// other way round. The old root is kept in [`SELF_SIGNED_PREVIOUS_CERT`] and served in the
/// bundle until it expires, for peers that pinned it.
pub fn load_or_create_self_signed(
    state_dir: &Path,
    trust_domain: &TrustDomain,
    ttl: Duration,
    now: SystemTime,
) -> Result<Authority, CitadelError> {
    let cert_path = state_dir.join(SELF_SIGNED_CERT);
    let key_path = state_dir.join(SELF_SIGNED_KEY);
    let previous_path = state_dir.join(SELF_SIGNED_PREVIOUS_CERT);
    let read_key = || -> Result<PrivateKey, CitadelError> {
        let key_pem = zeroize::Zeroizing::new(
            std::fs::read_to_string(&key_path).map_err(|e| CitadelError::io(&key_path, e))?,
        );
        PrivateKey::from_pkcs8_pem(&key_pem).map_err(|e| CitadelError::invalid(&key_path, e))
    };
    let ca = if key_path.exists() && !cert_path.exists() {
        // The key without its certificate: an interrupted first start, or the state an older
        // `rampart up` left (it deleted this file, taking it for the bundle). The key is the
        // trust; the certificate is public and is made again for the same key and subject,
        // so certificates issued before still verify.
        let renewed = CertificateAuthority::self_signed_root(
            &self_signed_params(trust_domain, ttl),
            read_key()?,
            now,
        )?;
        rampart_certs::write_file_atomic(
            &cert_path,
            rampart_certs::certs_to_pem(std::slice::from_ref(renewed.cert())).as_bytes(),
            0o644,
        )
        .map_err(|e| CitadelError::io(&cert_path, e))?;
        tracing::warn!(
            cert = %cert_path.display(),
            key = %key_path.display(),
            "self-signed root certificate missing beside its key; made it again for the same key and subject"
        );
        renewed
    } else if cert_path.exists() || key_path.exists() {
        let cert_pem =
            std::fs::read_to_string(&cert_path).map_err(|e| CitadelError::io(&cert_path, e))?;
        let cert = rampart_certs::parse_certs_pem(&cert_pem)
            .map_err(|e| CitadelError::invalid(&cert_path, e))?
            .into_iter()
            .next()
            .ok_or_else(|| CitadelError::invalid(&cert_path, "no certificate"))?;
        let info = CertInfo::parse(&cert).map_err(|e| CitadelError::invalid(&cert_path, e))?;
        let ca = CertificateAuthority::new(cert.clone(), read_key()?, Vec::new())
            .map_err(|e| CitadelError::invalid(&cert_path, e))?;
        if self_signed_rotation_due(info.not_before, info.not_after, now) {
            // Same key and subject: old and new roots verify each other's certificates.
            let renewed = CertificateAuthority::self_signed_root(
                &self_signed_params(trust_domain, ttl),
                read_key()?,
                now,
            )?;
            rampart_certs::write_file_atomic(
                &previous_path,
                rampart_certs::certs_to_pem(std::slice::from_ref(&cert)).as_bytes(),
                0o644,
            )
            .map_err(|e| CitadelError::io(&previous_path, e))?;
            rampart_certs::write_file_atomic(
                &cert_path,
                rampart_certs::certs_to_pem(std::slice::from_ref(renewed.cert())).as_bytes(),
                0o644,
            )
            .map_err(|e| CitadelError::io(&cert_path, e))?;
            tracing::info!(
                dir = %state_dir.display(),
                old_root = %info.sha256_fingerprint,
                old_not_after = %crate::audit::rfc3339(info.not_after),
                "self-signed root renewed (same key and subject); the old root stays in the bundle until it expires"
            );
            renewed
        } else {
            ca
        }
    } else {
        std::fs::create_dir_all(state_dir).map_err(|e| CitadelError::io(state_dir, e))?;
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256)?;
        let params = self_signed_params(trust_domain, ttl);
        // Key first (0600, atomic), then the certificate: a crash in between leaves a key
        // without a certificate, which the next start certifies again (never a new key).
        key.write_pem_file(&key_path)?;
        let ca = CertificateAuthority::self_signed_root(&params, key, now)?;
        rampart_certs::write_file_atomic(
            &cert_path,
            rampart_certs::certs_to_pem(std::slice::from_ref(ca.cert())).as_bytes(),
            0o644,
        )
        .map_err(|e| CitadelError::io(&cert_path, e))?;
        tracing::info!(dir = %state_dir.display(), "generated a self-signed root");
        ca
    };
    let root = ca.cert().clone();
    let mut fp = [0u8; 32];
    fp.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, root.as_ref()).as_ref());
    let mut served = vec![root];
    if let Ok(text) = std::fs::read_to_string(&previous_path) {
        // Expired ones are dropped by `Authority::new`; a broken file is only a warning.
        match rampart_certs::parse_certs_pem(&text) {
            Ok(certs) => served.extend(certs),
            Err(e) => {
                tracing::warn!(file = %previous_path.display(), error = %e, "previous self-signed root unreadable; not served")
            }
        }
    }
    Authority::new(
        Arc::new(ca),
        served,
        trust_domain,
        MaterialSource::SelfSigned(state_dir.to_path_buf()),
        fp,
        now,
    )
}

/// Loads whatever the configuration points at: plug-in material if `cacerts_dir` holds a
/// `tls.crt` or a `ca-cert.pem`, the self-signed root otherwise.
pub fn load_initial(
    cacerts_dir: &Path,
    state_dir: &Path,
    trust_domain: &TrustDomain,
    self_signed_ttl: Duration,
    now: SystemTime,
) -> Result<Authority, CitadelError> {
    let files = PluginFiles::read(cacerts_dir)?;
    if files.is_plugin() {
        load_plugin(cacerts_dir, &files, trust_domain, now)
    } else {
        load_or_create_self_signed(state_dir, trust_domain, self_signed_ttl, now)
    }
}
