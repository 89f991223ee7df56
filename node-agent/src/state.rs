//! What the agent serves: the current SVID (chain + key) and trust bundle, published through
//! a `watch` channel so every open SDS / Workload API stream sees each change.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use prost::Message;
use rampart_certs::{CertInfo, CrlSet, PrivateKey, SpiffeId, TrustBundle, TrustDomain};
use rampart_proto::envoy::config::core::v3::{DataSource, data_source::Specifier};
use rampart_proto::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use rampart_proto::sds::{ROOT_RESOURCE, WORKLOAD_RESOURCE};
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::Error;

/// A workload X.509 SVID: the certificate chain the CA returned (leaf first, without the
/// root) and the private key made here. No `Debug` of the key, no `Clone`.
pub struct Svid {
    pub(crate) id: SpiffeId,
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) chain_pem: String,
    pub(crate) key: PrivateKey,
    pub(crate) key_pem: Zeroizing<String>,
    pub(crate) leaf: CertInfo,
    pub(crate) received_at: SystemTime,
    /// Resource version: the leaf's serial, unique across agent restarts.
    pub(crate) version: String,
    /// The encoded Envoy `Secret` for resource `default` (holds the key: zeroized on drop).
    pub(crate) sds_secret: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id.to_string())
            .field("serial", &self.leaf.serial_hex)
            .field("not_after", &self.leaf.not_after)
            .field("key", &"[secret key elided]")
            .finish()
    }
}

// === impl Svid ===

impl Svid {
    /// Build an SVID from a chain (leaf first; a trailing root is kept out of the served
    /// chain by the caller) and its key. Checks the key matches the leaf.
    pub fn new(
        id: SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKey,
        received_at: SystemTime,
    ) -> Result<Self, Error> {
        let leaf_der = chain
            .first()
            .ok_or_else(|| Error::BadCaResponse("empty certificate chain".into()))?;
        let leaf = CertInfo::parse(leaf_der)?;
        if leaf_spki(leaf_der)? != key.public_key_spki_der() {
            return Err(Error::BadCaResponse(
                "leaf certificate's public key is not the key this agent generated".into(),
            ));
        }
        let chain_pem = rampart_certs::certs_to_pem(&chain);
        let key_pem = key.to_pkcs8_pem();
        let version = leaf.serial_hex.to_lowercase();
        let sds_secret = encode_tls_certificate(chain_pem.as_bytes(), key_pem.as_bytes());
        Ok(Svid {
            id,
            chain,
            chain_pem,
            key,
            key_pem,
            leaf,
            received_at,
            version,
            sds_secret,
        })
    }

    /// The SPIFFE ID in the certificate.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.id
    }

    /// The leaf certificate's details.
    pub fn leaf(&self) -> &CertInfo {
        &self.leaf
    }

    /// The chain as PEM (leaf first, no root).
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }

    /// The chain as DER (leaf first, no root).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }
}

/// The SubjectPublicKeyInfo (DER) of a certificate.
pub(crate) fn leaf_spki(der: &CertificateDer<'_>) -> Result<Vec<u8>, Error> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| Error::BadCaResponse(format!("leaf certificate does not parse: {e}")))?;
    Ok(cert.public_key().raw.to_vec())
}

/// The trust bundle served as `ROOTCA` and in Workload API bundles.
#[derive(Debug)]
pub struct Bundle {
    pub(crate) trust_domain: TrustDomain,
    pub(crate) bundle: TrustBundle,
    pub(crate) pem: String,
    /// Resource version: a digest of the (sorted) roots, so equal bundles get equal versions.
    pub(crate) version: String,
    pub(crate) sds_secret: Vec<u8>,
}

// === impl Bundle ===

impl Bundle {
    /// Wrap a trust bundle for `trust_domain`.
    pub fn new(trust_domain: TrustDomain, bundle: TrustBundle) -> Self {
        let mut ders: Vec<&[u8]> = bundle.roots().iter().map(|c| c.as_ref()).collect();
        ders.sort();
        ders.dedup();
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for d in &ders {
            ctx.update(&(d.len() as u64).to_be_bytes());
            ctx.update(d);
        }
        let version = hex::encode(&ctx.finish().as_ref()[..8]);
        let pem = bundle.to_pem();
        let sds_secret = encode_validation_context(pem.as_bytes(), None);
        Bundle {
            trust_domain,
            bundle,
            pem,
            version,
            sds_secret,
        }
    }

    /// The roots.
    pub fn trust_bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// The roots as PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }
}

/// The CA's revocation lists as this agent serves them: only CRLs whose signature verified
/// with a CA certificate the agent trusts (a root of the bundle or an intermediate of a
/// verified chain). Served in `ROOTCA`'s `validation_context.crl` and as `ca-crl.pem`.
#[derive(Debug)]
pub struct ServedCrls {
    pub(crate) set: CrlSet,
    pub(crate) pem: String,
    /// Whether the set covers every CA certificate of the chains this agent holds (their
    /// intermediates and the root they end in): then Envoy checks the whole chain,
    /// otherwise only the leaf (`only_verify_leaf_cert_crl`), since Envoy refuses a chain
    /// with a CA certificate no CRL covers once any CRL is configured.
    pub(crate) covers_chain: bool,
}

// === impl ServedCrls ===

impl ServedCrls {
    /// Wrap a validated set.
    pub fn new(set: CrlSet, covers_chain: bool) -> Self {
        let pem = set.to_pem();
        ServedCrls {
            set,
            pem,
            covers_chain,
        }
    }

    /// The validated CRLs.
    pub fn set(&self) -> &CrlSet {
        &self.set
    }

    /// The CRLs as concatenated PEM (what `ca-crl.pem` and `ROOTCA`'s `crl` hold).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Whether `crl` in `ROOTCA` is checked for the whole chain (else leaf only).
    pub fn covers_chain(&self) -> bool {
        self.covers_chain
    }
}

/// One consistent view of what is served.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The current SVID, if one is valid. `None` before the first issuance and after the
    /// current one expired without renewal (fail closed).
    pub svid: Option<Arc<Svid>>,
    /// The trust bundle.
    pub bundle: Option<Arc<Bundle>>,
    /// Why `svid` is `None` after one was served (e.g. `expired at <time>`); `None` while
    /// one is served or before the first issuance.
    pub withdrawn: Option<String>,
    /// The validated CRLs served with the trust bundle; `None` (or an empty set) when the
    /// CA serves none.
    pub crls: Option<Arc<ServedCrls>>,
}

/// The publishing side of what one workload identity is served. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SecretStore {
    tx: Arc<watch::Sender<Snapshot>>,
}

impl Default for SecretStore {
    fn default() -> Self {
        Self::new()
    }
}

// === impl SecretStore ===

impl SecretStore {
    /// An empty store (nothing served until an SVID and bundle are installed).
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Snapshot::default());
        SecretStore { tx: Arc::new(tx) }
    }

    /// Publish a new SVID (and a new bundle if it changed) to every open stream.
    pub fn install(&self, svid: Svid, bundle: Option<Bundle>) {
        self.tx.send_modify(|s| {
            s.svid = Some(Arc::new(svid));
            s.withdrawn = None;
            if let Some(b) = bundle {
                let changed = s.bundle.as_ref().is_none_or(|old| old.version != b.version);
                if changed {
                    s.bundle = Some(Arc::new(b));
                }
            }
        });
    }

    /// Stop serving the SVID (`reason`, e.g. it expired): streams are told, files removed by
    /// the caller.
    pub fn revoke_svid(&self, reason: String) {
        self.tx.send_modify(|s| {
            s.svid = None;
            s.withdrawn = Some(reason);
        });
    }

    /// Publish a new validated CRL set (`ROOTCA` gets a new version; every open stream is
    /// pushed). A set equal to the served one (same etag and coverage) changes nothing.
    pub fn set_crls(&self, crls: Arc<ServedCrls>) {
        self.tx.send_if_modified(|s| {
            let same = s.crls.as_ref().is_some_and(|old| {
                old.set.etag() == crls.set.etag() && old.covers_chain == crls.covers_chain
            });
            if same {
                return false;
            }
            s.crls = Some(crls);
            true
        });
    }

    /// The current snapshot.
    pub fn current(&self) -> Snapshot {
        self.tx.borrow().clone()
    }

    /// Subscribe to changes.
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.tx.subscribe()
    }

    /// Number of open subscribers (streams), for metrics and tests.
    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }
}

// === SDS encoding ===
//
// The encoded `default` and `ROOTCA` secrets are made once per change, here, and served
// as they are by `crate::sds` to every stream.

fn inline(bytes: &[u8]) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(bytes.to_vec())),
    })
}

/// Encode the `default` secret (chain + key). The buffer holds the key: zeroized on drop.
pub(crate) fn encode_tls_certificate(chain_pem: &[u8], key_pem: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut s = Secret {
        name: WORKLOAD_RESOURCE.to_owned(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain_pem),
            private_key: inline(key_pem),
            ..Default::default()
        })),
    };
    let out = Zeroizing::new(s.encode_to_vec());
    // Scrub the temporary message's copy of the key too.
    if let Some(secret::Type::TlsCertificate(t)) = &mut s.r#type
        && let Some(DataSource {
            specifier: Some(Specifier::InlineBytes(b)),
        }) = &mut t.private_key
    {
        zeroize::Zeroize::zeroize(b);
    }
    out
}

/// Encode the `ROOTCA` secret: the trust bundle, and the CRLs when there are any
/// (`crl`: inline PEM; `only_verify_leaf_cert_crl` unless they cover the whole chain).
pub(crate) fn encode_validation_context(bundle_pem: &[u8], crls: Option<&ServedCrls>) -> Vec<u8> {
    let crls = crls.filter(|c| !c.set().is_empty());
    Secret {
        name: ROOT_RESOURCE.to_owned(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(bundle_pem),
                crl: crls.and_then(|c| inline(c.pem().as_bytes())),
                only_verify_leaf_cert_crl: crls.is_some_and(|c| !c.covers_chain()),
                ..Default::default()
            },
        )),
    }
    .encode_to_vec()
}
