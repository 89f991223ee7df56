//! A throwaway PKI for tests in any crate (feature `test-util`): a root, an intermediate
//! signed by it, and workload leaves from the intermediate, all made with this crate's own
//! CA code. Helpers panic on failure, as test helpers should.
//!
//! ```
//! # #[cfg(feature = "test-util")] {
//! use rampart_certs::test_util::TestPki;
//! let pki = TestPki::new("cluster.local");
//! let leaf = pki.workload("default", "sleep");
//! let id = rampart_certs::verify_workload_chain(
//!     &leaf.chain,
//!     &pki.bundle(),
//!     &pki.policy(),
//!     std::time::SystemTime::now(),
//!     rampart_certs::Usage::ClientAuth,
//! )
//! .unwrap();
//! assert_eq!(id, leaf.id);
//! # }
//! ```

use std::path::Path;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;

use crate::{
    CertificateAuthority, DEFAULT_WORKLOAD_CERT_TTL, IntermediateParams, KeyAlgorithm, PrivateKey,
    RootParams, SpiffeId, TrustBundle, TrustDomain, TrustDomainPolicy, certs_to_pem,
    write_file_atomic,
};

/// A root CA and an intermediate CA under it, for one trust domain.
pub struct TestPki {
    /// The trust domain leaves are issued in by [`TestPki::workload`].
    pub trust_domain: TrustDomain,
    /// The self-signed root.
    pub root: CertificateAuthority,
    /// The intermediate that signs leaves.
    pub intermediate: CertificateAuthority,
    intermediate_key: PrivateKey,
    root_key: PrivateKey,
}

/// A leaf certificate with its key.
pub struct TestLeaf {
    /// The SPIFFE ID in the leaf.
    pub id: SpiffeId,
    /// Leaf, intermediate, root.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKey,
}

impl TestLeaf {
    /// The chain as PEM (leaf first, root last).
    pub fn chain_pem(&self) -> String {
        certs_to_pem(&self.chain)
    }

    /// The chain without the root, as a TLS peer sends it.
    pub fn presented_chain(&self) -> Vec<CertificateDer<'static>> {
        let mut c = self.chain.clone();
        c.pop();
        c
    }
}

impl TestPki {
    /// A fresh root and intermediate (ECDSA P-256), valid from a little before now.
    pub fn new(trust_domain: &str) -> Self {
        Self::new_at(trust_domain, SystemTime::now())
    }

    /// A fresh root and intermediate whose lifetimes start at `now`.
    pub fn new_at(trust_domain: &str, now: SystemTime) -> Self {
        let trust_domain = TrustDomain::new(trust_domain).expect("valid trust domain");
        let root_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("root key");
        let root = CertificateAuthority::self_signed_root(
            &RootParams {
                common_name: format!("Test Root {trust_domain}"),
                ..RootParams::default()
            },
            root_key.clone_key(),
            now,
        )
        .expect("root CA");
        let intermediate_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
        let cert = root
            .issue_intermediate(
                &IntermediateParams {
                    common_name: format!("Test Intermediate {trust_domain}"),
                    ..IntermediateParams::default()
                },
                &intermediate_key.public_key_spki_der(),
                now,
            )
            .expect("intermediate certificate");
        let intermediate =
            CertificateAuthority::new(cert, intermediate_key.clone_key(), root.chain_to_root())
                .expect("intermediate CA");
        Self {
            trust_domain,
            root,
            intermediate,
            intermediate_key,
            root_key,
        }
    }

    /// A bundle holding just this root.
    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::from_der(vec![self.root.cert().clone()]).expect("bundle")
    }

    /// A policy accepting only this trust domain.
    pub fn policy(&self) -> TrustDomainPolicy {
        TrustDomainPolicy::local(self.trust_domain.clone())
    }

    /// The root certificate as PEM.
    pub fn root_pem(&self) -> String {
        certs_to_pem(std::slice::from_ref(self.root.cert()))
    }

    /// A workload leaf `spiffe://<td>/ns/<ns>/sa/<sa>`, valid for 24h from now.
    pub fn workload(&self, namespace: &str, service_account: &str) -> TestLeaf {
        let id = SpiffeId::istio(&self.trust_domain, namespace, service_account)
            .expect("valid namespace and service account");
        self.leaf(&id, DEFAULT_WORKLOAD_CERT_TTL, SystemTime::now())
    }

    /// A workload leaf for any SPIFFE ID (any trust domain), issued at `now` for `ttl`.
    pub fn leaf(&self, id: &SpiffeId, ttl: Duration, now: SystemTime) -> TestLeaf {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("leaf key");
        let cert = self
            .intermediate
            .issue_workload(&key.public_key_spki_der(), id, ttl, now)
            .expect("leaf certificate");
        let mut chain = vec![cert];
        chain.extend(self.intermediate.chain_to_root());
        TestLeaf {
            id: id.clone(),
            chain,
            key,
        }
    }

    /// Writes Istio's plug-in CA layout for the intermediate into `dir`: `ca-cert.pem`,
    /// `ca-key.pem` (0600), `cert-chain.pem` (intermediate, root), `root-cert.pem`.
    pub fn write_cacerts(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let pem = |c: &[CertificateDer<'static>]| certs_to_pem(c).into_bytes();
        write_file_atomic(
            &dir.join("ca-cert.pem"),
            &pem(std::slice::from_ref(self.intermediate.cert())),
            0o644,
        )?;
        write_file_atomic(
            &dir.join("ca-key.pem"),
            self.intermediate_key.to_pkcs8_pem().as_bytes(),
            0o600,
        )?;
        write_file_atomic(
            &dir.join("cert-chain.pem"),
            &pem(&self.intermediate.chain_to_root()),
            0o644,
        )?;
        write_file_atomic(
            &dir.join("root-cert.pem"),
            &pem(std::slice::from_ref(self.root.cert())),
            0o644,
        )
    }

    /// Writes the root's `root-cert.pem` and `root-key.pem` (0600) into `dir`.
    pub fn write_root(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        write_file_atomic(
            &dir.join("root-cert.pem"),
            self.root_pem().as_bytes(),
            0o644,
        )?;
        write_file_atomic(
            &dir.join("root-key.pem"),
            self.root_key.to_pkcs8_pem().as_bytes(),
            0o600,
        )
    }
}

/// The private key encoding of a [`CertManagerCa`]'s `tls.key`, as cert-manager writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertManagerKey {
    /// ECDSA P-256 in SEC1 (`EC PRIVATE KEY`): cert-manager's default for ECDSA.
    EcSec1,
    /// RSA 2048 in PKCS#1 (`RSA PRIVATE KEY`): cert-manager's default for RSA.
    RsaPkcs1,
    /// ECDSA P-256 in PKCS#8 (`PRIVATE KEY`): `privateKey.encoding: PKCS8`.
    EcPkcs8,
}

/// What a [`CertManagerCa`] looks like.
#[derive(Debug, Clone, Copy)]
pub struct CertManagerOptions {
    /// The signing key's encoding.
    pub key: CertManagerKey,
    /// Whether a middle CA sits between the root and the signing certificate (then `tls.crt`
    /// holds the signing certificate followed by the middle one, as cert-manager's CA issuer
    /// writes a chain).
    pub issuer_chain: bool,
    /// Whether the signing certificate is a CA (`isCA: true`); `false` makes a plain leaf
    /// (basicConstraints CA:FALSE, no keyCertSign), for negative tests.
    pub is_ca: bool,
    /// Whether the middle CA of `issuer_chain` is a CA; `false` makes it a plain leaf that
    /// still signs the signing certificate (openssl does not check), for negative tests.
    pub middle_is_ca: bool,
}

impl Default for CertManagerOptions {
    fn default() -> Self {
        CertManagerOptions {
            key: CertManagerKey::EcSec1,
            issuer_chain: false,
            is_ca: true,
            middle_is_ca: true,
        }
    }
}

/// The `kubernetes.io/tls` Secret cert-manager writes for a `Certificate` with `isCA: true`,
/// made with the `openssl` CLI (so not with this crate's own code): `tls.crt` (the signing
/// certificate, then its issuer chain without the root), `tls.key`, `ca.crt` (the root).
pub struct CertManagerCa {
    /// `tls.crt`.
    pub tls_crt: String,
    /// `tls.key`.
    pub tls_key: String,
    /// `ca.crt`.
    pub ca_crt: String,
    /// The signing certificate (the first of `tls.crt`).
    pub signing_cert: CertificateDer<'static>,
    /// The certificates between the signing certificate and the root (PEM; empty without
    /// an issuer chain), for `openssl verify -untrusted`.
    pub issuer_chain_pem: String,
}

impl CertManagerCa {
    /// Makes the material; `name` goes into the subjects. Panics if `openssl` fails.
    pub fn new(name: &str, opts: CertManagerOptions) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let work = std::env::temp_dir().join(format!(
            "rampart-cert-manager-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).expect("scratch folder");
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(&work)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let read = |f: &str| std::fs::read_to_string(work.join(f)).expect("openssl output");
        std::fs::write(
            work.join("ext.cnf"),
            "[ca]\nbasicConstraints=critical,CA:TRUE\n\
             keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign,cRLSign\n\
             subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid:always\n\
             [leaf]\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth,clientAuth\n\
             subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid:always\n",
        )
        .expect("extension file");
        let ec_key = |out: &str| {
            run(&[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                out,
            ])
        };
        let issue = |csr_key: &str, subject: &str, issuer: &str, section: &str, out: &str| {
            run(&[
                "req", "-new", "-key", csr_key, "-subj", subject, "-out", "req.csr",
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                "req.csr",
                "-CA",
                &format!("{issuer}.crt"),
                "-CAkey",
                &format!("{issuer}.key"),
                "-CAcreateserial",
                "-days",
                "365",
                "-sha256",
                "-extfile",
                "ext.cnf",
                "-extensions",
                section,
                "-out",
                out,
            ]);
        };
        ec_key("root.key");
        run(&[
            "req",
            "-x509",
            "-new",
            "-key",
            "root.key",
            "-sha256",
            "-days",
            "3650",
            "-subj",
            &format!("/O=cert-manager test/CN={name} root"),
            "-config",
            "ext.cnf",
            "-extensions",
            "ca",
            "-out",
            "root.crt",
        ]);
        let issuer = if opts.issuer_chain {
            ec_key("middle.key");
            issue(
                "middle.key",
                &format!("/O=cert-manager test/CN={name} middle"),
                "root",
                if opts.middle_is_ca { "ca" } else { "leaf" },
                "middle.crt",
            );
            "middle"
        } else {
            "root"
        };
        match opts.key {
            CertManagerKey::EcSec1 => ec_key("tls.key"),
            CertManagerKey::RsaPkcs1 => run(&["genrsa", "-traditional", "-out", "tls.key", "2048"]),
            CertManagerKey::EcPkcs8 => run(&[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "tls.key",
            ]),
        }
        issue(
            "tls.key",
            &format!("/O=cert-manager test/CN={name} intermediate"),
            issuer,
            if opts.is_ca { "ca" } else { "leaf" },
            "signing.crt",
        );
        let issuer_chain_pem = if opts.issuer_chain {
            read("middle.crt")
        } else {
            String::new()
        };
        let signing_pem = read("signing.crt");
        let signing_cert = crate::parse_certs_pem(&signing_pem)
            .expect("openssl wrote a certificate")
            .remove(0);
        let ca = CertManagerCa {
            tls_crt: format!("{signing_pem}{issuer_chain_pem}"),
            tls_key: read("tls.key"),
            ca_crt: read("root.crt"),
            signing_cert,
            issuer_chain_pem,
        };
        let _ = std::fs::remove_dir_all(&work);
        ca
    }

    /// Writes `tls.crt`, `tls.key` (0600) and `ca.crt` into `dir`, as a mounted Secret.
    pub fn write_to(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        write_file_atomic(&dir.join("tls.crt"), self.tls_crt.as_bytes(), 0o644)?;
        write_file_atomic(&dir.join("tls.key"), self.tls_key.as_bytes(), 0o600)?;
        write_file_atomic(&dir.join("ca.crt"), self.ca_crt.as_bytes(), 0o644)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChainError, Usage, parse_certs_pem, verify_workload_chain};

    #[test]
    fn leaves_verify_against_their_own_pki_only() {
        let pki = TestPki::new("cluster.local");
        let other = TestPki::new("cluster.local");
        let leaf = pki.workload("default", "sleep");
        let now = SystemTime::now();
        let id = verify_workload_chain(
            &leaf.presented_chain(),
            &pki.bundle(),
            &pki.policy(),
            now,
            Usage::ServerAuth,
        )
        .unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        let err = verify_workload_chain(
            &leaf.presented_chain(),
            &other.bundle(),
            &other.policy(),
            now,
            Usage::ServerAuth,
        )
        .unwrap_err();
        assert!(matches!(
            err,
            ChainError::UnknownIssuer | ChainError::BadSignature
        ));
    }

    #[test]
    fn cacerts_layout_loads_back() {
        let pki = TestPki::new("cluster.local");
        let dir = tempfile::tempdir().unwrap();
        pki.write_cacerts(dir.path()).unwrap();
        let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap();
        let cert = parse_certs_pem(&read("ca-cert.pem")).unwrap().remove(0);
        let key = PrivateKey::from_pkcs8_pem(&read("ca-key.pem")).unwrap();
        let chain = parse_certs_pem(&read("cert-chain.pem")).unwrap();
        assert_eq!(chain[0], cert);
        CertificateAuthority::new(cert, key, chain[1..].to_vec()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
