//! The CA's configuration, validated once at start-up.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rampart_certs::{SpiffeId, TrustDomain};

use crate::error::CitadelError;

/// The audience bearer tokens must carry.
pub const DEFAULT_AUDIENCE: &str = "istio-ca";
/// Default DNS SAN of the CA's serving certificate (what Istio agents dial).
pub const DEFAULT_SERVER_DNS_NAME: &str = "istiod.istio-system.svc";
/// Every DNS SAN of the serving certificate by default: Istio's name, and `localhost` for
/// clients on the same machine that dial it by name.
pub const DEFAULT_SERVER_DNS_NAMES: &[&str] = &[DEFAULT_SERVER_DNS_NAME, "localhost"];

/// Default limit of open TCP connections (in handshake or established).
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default limit of TLS handshakes in progress; a newer arrival drops the oldest.
pub const DEFAULT_MAX_HANDSHAKES: usize = 512;
/// Default time a TCP connection gets to finish its TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A trusted token issuer and the JWKS file holding its keys.
#[derive(Debug, Clone)]
pub struct JwtIssuerConfig {
    /// The `iss` value tokens must carry.
    pub issuer: String,
    /// Path of the JWKS (JSON Web Key Set) file.
    pub jwks_path: PathBuf,
}

/// Everything `rampart ca` is configured with.
#[derive(Debug, Clone)]
pub struct CaConfig {
    /// gRPC listen address (default `127.0.0.1:15012`).
    pub listen: SocketAddr,
    /// Istio `cacerts` plug-in directory (watched).
    pub cacerts_dir: PathBuf,
    /// State directory: self-signed root and key (0600), audit log.
    pub state_dir: PathBuf,
    /// Audit log file (default `<state>/audit.jsonl`).
    pub audit_log: Option<PathBuf>,
    /// If set, the trust bundle (every served root, PEM) is written here at start and after
    /// every reload, for clients that need a root file.
    pub bundle_out: Option<PathBuf>,
    /// The mesh trust domain.
    pub trust_domain: TrustDomain,
    /// Token issuers accepted for bearer authentication.
    pub jwt_issuers: Vec<JwtIssuerConfig>,
    /// The audience tokens must carry (default `istio-ca`).
    pub audience: String,
    /// Lifetime when the request asks for none.
    pub default_ttl: Duration,
    /// Requests above this lifetime are refused.
    pub max_ttl: Duration,
    /// Prometheus metrics listen address.
    pub metrics: Option<SocketAddr>,
    /// DNS SANs of the serving certificate.
    pub server_dns_names: Vec<String>,
    /// IP SANs of the serving certificate (default `127.0.0.1`).
    pub server_ips: Vec<IpAddr>,
    /// Identities allowed to ask for other identities via `ImpersonatedIdentity`, each with
    /// the workloads it may act for.
    pub node_agents: Vec<NodeAgentGrant>,
    /// Largest accepted CSR, in bytes of PEM.
    pub max_csr_bytes: usize,
    /// Deadline for one request.
    pub request_timeout: Duration,
    /// Requests processed at once; more wait (within the deadline) for a slot.
    pub max_concurrency: usize,
    /// Open TCP connections at most; at the limit the CA stops accepting (the kernel's backlog
    /// holds or refuses the rest) until one closes.
    pub max_connections: usize,
    /// TLS handshakes in progress at most; a new connection beyond it drops the oldest
    /// pending handshake (so stalled handshakes cannot lock real clients out).
    pub max_handshakes: usize,
    /// Time a connection gets to finish its TLS handshake.
    pub handshake_timeout: Duration,
    /// How often the cacerts directory is re-read even without a change notification.
    pub reload_poll_interval: Duration,
    /// Lifetime of a self-signed root made by this CA (renewed with 20% of it left).
    pub self_signed_root_ttl: Duration,
    /// Lifetime of the CRL the CA signs for its signing certificate (nextUpdate - thisUpdate);
    /// re-signed with half of it left and at every revocation.
    pub crl_validity: Duration,
}

// === impl CaConfig ===

impl CaConfig {
    /// A configuration with Istio's defaults, for `trust_domain`, with the given directories.
    pub fn new(cacerts_dir: PathBuf, state_dir: PathBuf, trust_domain: TrustDomain) -> Self {
        CaConfig {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15012),
            cacerts_dir,
            state_dir,
            audit_log: None,
            bundle_out: None,
            trust_domain,
            jwt_issuers: Vec::new(),
            audience: DEFAULT_AUDIENCE.to_owned(),
            default_ttl: rampart_certs::DEFAULT_WORKLOAD_CERT_TTL,
            max_ttl: rampart_certs::MAX_WORKLOAD_CERT_TTL,
            metrics: None,
            server_dns_names: DEFAULT_SERVER_DNS_NAMES
                .iter()
                .map(|n| (*n).to_owned())
                .collect(),
            server_ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            node_agents: Vec::new(),
            max_csr_bytes: 16 * 1024,
            request_timeout: Duration::from_secs(10),
            max_concurrency: 1024,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            reload_poll_interval: Duration::from_secs(5),
            self_signed_root_ttl: crate::authority::SELF_SIGNED_ROOT_TTL,
            crl_validity: crate::revocation::DEFAULT_CRL_VALIDITY,
        }
    }

    /// Checks combinations of settings.
    pub fn validate(&self) -> Result<(), CitadelError> {
        let bad = |m: String| Err(CitadelError::Config(m));
        if self.default_ttl.is_zero() {
            return bad("default TTL must be positive".into());
        }
        if self.max_ttl < self.default_ttl {
            return bad(format!(
                "max TTL {:?} is below the default TTL {:?}",
                self.max_ttl, self.default_ttl
            ));
        }
        if self.max_ttl > rampart_certs::MAX_WORKLOAD_CERT_TTL {
            return bad(format!(
                "max TTL {:?} is above the longest workload lifetime this CA issues ({:?})",
                self.max_ttl,
                rampart_certs::MAX_WORKLOAD_CERT_TTL
            ));
        }
        if self.self_signed_root_ttl < Duration::from_secs(3600) {
            return bad(format!(
                "self-signed root lifetime {:?} is below one hour (it would be renewed continuously)",
                self.self_signed_root_ttl
            ));
        }
        if self.self_signed_root_ttl < self.max_ttl {
            return bad(format!(
                "self-signed root lifetime {:?} is shorter than the longest workload lifetime {:?}",
                self.self_signed_root_ttl, self.max_ttl
            ));
        }
        if self.crl_validity < Duration::from_secs(60) {
            return bad(format!(
                "CRL validity {:?} is below one minute",
                self.crl_validity
            ));
        }
        if self.max_concurrency == 0 {
            return bad("max concurrency must be at least 1".into());
        }
        if self.max_connections == 0 || self.max_handshakes == 0 {
            return bad("max connections and max handshakes must be at least 1".into());
        }
        if self.max_handshakes > self.max_connections {
            return bad(format!(
                "max handshakes {} is above max connections {} (each handshake is a connection)",
                self.max_handshakes, self.max_connections
            ));
        }
        if self.handshake_timeout.is_zero() {
            return bad("handshake timeout must be positive".into());
        }
        if self.max_csr_bytes < 128 {
            return bad("CSR size limit below 128 bytes cannot fit any CSR".into());
        }
        if self.request_timeout.is_zero() {
            return bad("request timeout must be positive".into());
        }
        if self.server_dns_names.is_empty() && self.server_ips.is_empty() {
            return bad("the serving certificate needs at least one DNS name or IP".into());
        }
        if let Some(out) = &self.bundle_out {
            let target = comparable(out);
            for (what, own) in self.own_files() {
                if comparable(&own) == target {
                    return bad(format!(
                        "--bundle-out {} is the CA's own {what} {}: the bundle would overwrite \
                         it (and a restart that deletes the bundle would lose it); write the \
                         bundle somewhere else",
                        out.display(),
                        own.display()
                    ));
                }
            }
        }
        for grant in &self.node_agents {
            let agent = &grant.id;
            if agent.trust_domain() != &self.trust_domain {
                return bad(format!(
                    "node agent {agent} is not in trust domain {}",
                    self.trust_domain
                ));
            }
            if grant.may_act_for.is_empty() {
                return bad(format!(
                    "node agent {agent} may act for no workload; give at least one pattern"
                ));
            }
        }
        Ok(())
    }

    /// The files this CA reads or keeps as its own (never a target of `bundle_out`): the
    /// self-signed root material and audit log in the state directory, and the plug-in
    /// material in the cacerts directory.
    pub fn own_files(&self) -> Vec<(&'static str, PathBuf)> {
        use crate::authority::{
            CA_CERT, CA_CRL, CA_KEY, CERT_CHAIN, ROOT_CERT, SELF_SIGNED_CERT, SELF_SIGNED_KEY,
            SELF_SIGNED_PREVIOUS_CERT, TLS_CA, TLS_CRT, TLS_KEY,
        };
        let state = |f: &str| self.state_dir.join(f);
        let plug = |f: &str| self.cacerts_dir.join(f);
        vec![
            ("self-signed root", state(SELF_SIGNED_CERT)),
            ("self-signed root key", state(SELF_SIGNED_KEY)),
            (
                "previous self-signed root",
                state(SELF_SIGNED_PREVIOUS_CERT),
            ),
            ("audit log", self.audit_log_path()),
            ("plug-in CA certificate", plug(CA_CERT)),
            ("plug-in CA key", plug(CA_KEY)),
            ("plug-in certificate chain", plug(CERT_CHAIN)),
            ("plug-in root bundle", plug(ROOT_CERT)),
            ("plug-in CRL", plug(CA_CRL)),
            ("plug-in CA certificate (kubernetes.io/tls)", plug(TLS_CRT)),
            ("plug-in CA key (kubernetes.io/tls)", plug(TLS_KEY)),
            ("plug-in trust anchors (kubernetes.io/tls)", plug(TLS_CA)),
            (
                "revocation list",
                state(crate::revocation::REVOCATIONS_FILE),
            ),
            ("published CRLs", state(crate::revocation::PUBLISHED_CRLS)),
            ("admin socket", state(crate::revocation::ADMIN_SOCKET)),
        ]
    }

    /// The audit log path.
    pub fn audit_log_path(&self) -> PathBuf {
        self.audit_log
            .clone()
            .unwrap_or_else(|| self.state_dir.join("audit.jsonl"))
    }
}

/// `path` made comparable with another spelling of the same file: absolute, symlinks
/// resolved as far as they exist (a dangling link is followed to where it points), and `.`
/// and `..` removed lexically where nothing exists yet to resolve (the state directory
/// before the first start), so `state/../state/root-cert.pem` is the root either way.
fn comparable(path: &Path) -> PathBuf {
    comparable_at(path, 8)
}

fn comparable_at(path: &Path, links_left: u8) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    if let Ok(real) = std::fs::canonicalize(&abs) {
        return real;
    }
    if let (true, Ok(target)) = (links_left > 0, std::fs::read_link(&abs)) {
        let target = match abs.parent() {
            Some(dir) if target.is_relative() => dir.join(target),
            _ => target,
        };
        return comparable_at(&target, links_left - 1);
    }
    let lexical = lexical_normalize(&abs);
    match (lexical.parent(), lexical.file_name()) {
        (Some(dir), Some(name)) => match std::fs::canonicalize(dir) {
            Ok(d) => d.join(name),
            Err(_) => lexical,
        },
        _ => lexical,
    }
}

/// `.` and `..` removed without touching the file system.
fn lexical_normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// A node agent allowed to request certificates for other workloads (Istio's
/// `ImpersonatedIdentity`, as ztunnel does), and the workloads it may act for. Istio
/// restricts ztunnel to the pods of its node through the Kubernetes API; standalone, the
/// restriction is this static list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAgentGrant {
    /// The node agent's own identity (proved by token or client certificate).
    pub id: SpiffeId,
    /// Whom it may act for; never empty (see [`CaConfig::validate`]).
    pub may_act_for: Vec<WorkloadPattern>,
}

impl NodeAgentGrant {
    /// Whether the agent may act for `target` (a workload ID of the CA's trust domain).
    pub fn allows(&self, target: &SpiffeId) -> bool {
        self.may_act_for.iter().any(|p| p.matches(target))
    }
}

/// Which workloads: `*` (any in the trust domain), `NAMESPACE/*`, or
/// `NAMESPACE/SERVICE_ACCOUNT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkloadPattern {
    /// Every workload of the trust domain.
    Any,
    /// Every service account of one namespace.
    Namespace(String),
    /// One service account.
    ServiceAccount {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
}

impl WorkloadPattern {
    /// Whether `id` (an Istio-form `ns/NS/sa/SA` ID) is covered.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        let Some((ns, sa)) = id.istio_parts() else {
            return matches!(self, WorkloadPattern::Any);
        };
        match self {
            WorkloadPattern::Any => true,
            WorkloadPattern::Namespace(n) => n == ns,
            WorkloadPattern::ServiceAccount { namespace, name } => namespace == ns && name == sa,
        }
    }
}

impl std::str::FromStr for WorkloadPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            Err(format!(
                "{s:?}: {why} (expected *, NAMESPACE/* or NAMESPACE/SERVICE_ACCOUNT)"
            ))
        };
        if s == "*" {
            return Ok(WorkloadPattern::Any);
        }
        let Some((ns, sa)) = s.split_once('/') else {
            return bad("no '/'");
        };
        let name_ok = |x: &str| {
            !x.is_empty()
                && x.len() <= 253
                && x.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        };
        if !name_ok(ns) {
            return bad("namespace is empty or has characters a namespace cannot have");
        }
        if sa == "*" {
            return Ok(WorkloadPattern::Namespace(ns.to_owned()));
        }
        if !name_ok(sa) {
            return bad("service account is empty or has characters a name cannot have");
        }
        Ok(WorkloadPattern::ServiceAccount {
            namespace: ns.to_owned(),
            name: sa.to_owned(),
        })
    }
}

impl std::fmt::Display for WorkloadPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkloadPattern::Any => f.write_str("*"),
            WorkloadPattern::Namespace(ns) => write!(f, "{ns}/*"),
            WorkloadPattern::ServiceAccount { namespace, name } => write!(f, "{namespace}/{name}"),
        }
    }
}

#[cfg(test)]
mod pattern_tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn patterns_parse_match_and_refuse() {
        let web = id("spiffe://cluster.local/ns/default/sa/web");
        let odd = id("spiffe://cluster.local/custom/path");
        let any: WorkloadPattern = "*".parse().unwrap();
        let ns: WorkloadPattern = "default/*".parse().unwrap();
        let one: WorkloadPattern = "default/web".parse().unwrap();
        let other: WorkloadPattern = "default/api".parse().unwrap();
        assert!(any.matches(&web) && any.matches(&odd));
        assert!(ns.matches(&web) && !ns.matches(&odd));
        assert!(one.matches(&web) && !other.matches(&web));
        assert!(
            !"kube-system/*"
                .parse::<WorkloadPattern>()
                .unwrap()
                .matches(&web)
        );
        for (text, shown) in [("*", "*"), ("default/*", "default/*"), ("a/b", "a/b")] {
            assert_eq!(text.parse::<WorkloadPattern>().unwrap().to_string(), shown);
        }
        for bad in [
            "", "default", "/web", "default/", "*/web", "a b/c", "ns/sa/x",
        ] {
            let e = bad.parse::<WorkloadPattern>().expect_err(bad);
            assert!(e.contains("expected *"), "{bad}: {e}");
        }
    }
}

#[cfg(test)]
mod bundle_out_tests {
    use super::*;

    #[test]
    fn bundle_out_may_not_be_one_of_the_cas_own_files() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let td: TrustDomain = "cluster.local".parse().unwrap();
        let mut cfg = CaConfig::new(dir.path().join("cacerts"), state.clone(), td);
        // The self-signed root, spelled directly and through `..` (what `rampart up` used to
        // pass), the key, and the plug-in root bundle: each refused, naming both paths.
        for (out, own) in [
            (state.join("root-cert.pem"), state.join("root-cert.pem")),
            (
                dir.path().join("state/../state/root-cert.pem"),
                state.join("root-cert.pem"),
            ),
            (state.join("root-key.pem"), state.join("root-key.pem")),
            (
                dir.path().join("cacerts/root-cert.pem"),
                dir.path().join("cacerts/root-cert.pem"),
            ),
            (state.join("audit.jsonl"), state.join("audit.jsonl")),
            // The kubernetes.io/tls (cert-manager) layout's files, the key above all.
            (
                dir.path().join("cacerts/tls.key"),
                dir.path().join("cacerts/tls.key"),
            ),
            (
                dir.path().join("cacerts/tls.crt"),
                dir.path().join("cacerts/tls.crt"),
            ),
            (
                dir.path().join("cacerts/../cacerts/ca.crt"),
                dir.path().join("cacerts/ca.crt"),
            ),
        ] {
            cfg.bundle_out = Some(out.clone());
            let e = cfg.validate().expect_err("refused").to_string();
            assert!(
                e.contains(&out.display().to_string()) && e.contains(&own.display().to_string()),
                "{e}"
            );
            assert!(e.contains("somewhere else"), "{e}");
        }
        // Before the first start the state directory does not exist: `..` is still seen
        // through, and a dangling link to the root-to-be is followed.
        let fresh = dir.path().join("fresh");
        let mut cfg2 = CaConfig::new(
            dir.path().join("cacerts"),
            fresh.clone(),
            "cluster.local".parse().unwrap(),
        );
        cfg2.bundle_out = Some(dir.path().join("fresh/../fresh/root-cert.pem"));
        assert!(
            cfg2.validate().is_err(),
            "not-yet-existing state dir spelled with .."
        );
        let link = dir.path().join("bundle-link.pem");
        std::os::unix::fs::symlink(fresh.join("root-cert.pem"), &link).unwrap();
        cfg2.bundle_out = Some(link);
        assert!(cfg2.validate().is_err(), "dangling link to the root-to-be");
        cfg2.bundle_out = Some(dir.path().join("fresh-bundle.pem"));
        cfg2.validate().expect("twin: a separate file");

        // Positive twin: a file of its own, even beside the state directory.
        for ok in [
            dir.path().join("trust-bundle.pem"),
            state.join("bundle.pem"),
        ] {
            cfg.bundle_out = Some(ok);
            cfg.validate().expect("a separate bundle file is fine");
        }
    }
}
