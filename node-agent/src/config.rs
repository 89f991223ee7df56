//! Typed agent configuration. The CLI parses flags into these; nothing here holds a secret
//! (tokens and keys are referenced by path and read when needed).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use rampart_certs::{SpiffeId, TrustDomain};

use crate::Error;

/// Istio's default SDS socket path (relative to the working directory, as the CLI default).
pub const DEFAULT_SDS_SOCKET: &str = "./var/run/secrets/workload-spiffe-uds/socket";
/// The DNS name the CA's serving certificate is checked against by default.
pub const DEFAULT_CA_SERVER_NAME: &str = "istiod.istio-system.svc";
/// Istio's `SECRET_GRACE_PERIOD_RATIO` default.
pub const DEFAULT_GRACE_RATIO: f64 = 0.5;

/// How to reach the CA.
#[derive(Debug, Clone)]
pub struct CaConfig {
    /// `host:port` to dial.
    pub addr: String,
    /// PEM file with the root(s) the CA's serving certificate must chain to. Re-read for each
    /// request, so an operator can add a new root during rotation.
    pub root_path: PathBuf,
    /// DNS name (or IP) the CA's serving certificate must carry.
    pub server_name: String,
    /// Optional `clusterid` request header (Istio multi-cluster).
    pub cluster_id: Option<String>,
    /// Deadline for one CSR round trip (connect + TLS + call).
    pub request_timeout: Duration,
}

/// When and how to renew.
#[derive(Debug, Clone)]
pub struct RotationConfig {
    /// Lifetime asked of the CA (`validity_duration`).
    pub ttl: Duration,
    /// Renew when this fraction of the lifetime remains (`SECRET_GRACE_PERIOD_RATIO`).
    pub grace_ratio: f64,
    /// Largest fraction of the grace window a renewal is moved earlier by (random per renewal).
    pub max_jitter: f64,
    /// Never renew sooner than this after the previous renewal (no refresh storm).
    pub min_refresh_interval: Duration,
    /// First retry delay after a CA error.
    pub backoff_initial: Duration,
    /// Retry delay cap.
    pub backoff_max: Duration,
}

impl Default for RotationConfig {
    fn default() -> Self {
        RotationConfig {
            // DESIGN §1: Istio's default workload certificate lifetime.
            ttl: rampart_certs::DEFAULT_WORKLOAD_CERT_TTL,
            grace_ratio: DEFAULT_GRACE_RATIO,
            max_jitter: 0.1,
            min_refresh_interval: Duration::from_secs(1),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }
}

impl RotationConfig {
    /// Check the combination of values.
    pub fn validate(&self) -> Result<(), Error> {
        if !(self.grace_ratio > 0.0 && self.grace_ratio < 1.0) {
            return Err(Error::InvalidConfig {
                field: "grace-ratio",
                reason: format!("{} is not in (0, 1)", self.grace_ratio),
            });
        }
        if !(0.0..1.0).contains(&self.max_jitter) {
            return Err(Error::InvalidConfig {
                field: "jitter",
                reason: format!("{} is not in [0, 1)", self.max_jitter),
            });
        }
        if self.ttl < Duration::from_secs(1) {
            return Err(Error::InvalidConfig {
                field: "ttl",
                reason: "must be at least 1s".into(),
            });
        }
        if self.backoff_initial.is_zero() || self.backoff_max < self.backoff_initial {
            return Err(Error::InvalidConfig {
                field: "backoff",
                reason: "initial must be > 0 and <= max".into(),
            });
        }
        Ok(())
    }
}

/// One workload identity served by this agent, on its own sockets.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// The identity requested from the CA and required in what it returns.
    pub spiffe_id: SpiffeId,
    /// File holding the bearer token (JWT) presented to the CA; read at each request.
    pub token_path: PathBuf,
    /// Envoy SDS socket.
    pub sds_socket: Option<PathBuf>,
    /// SPIFFE Workload API socket.
    pub workload_api_socket: Option<PathBuf>,
    /// Directory for `cert-chain.pem`, `key.pem`, `root-cert.pem`.
    pub output_dir: Option<PathBuf>,
}

/// Everything the agent needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The CA.
    pub ca: CaConfig,
    /// Renewal policy.
    pub rotation: RotationConfig,
    /// The identities served (one set of sockets each).
    pub workloads: Vec<WorkloadConfig>,
    /// Prometheus endpoint (`/metrics`).
    pub metrics_addr: Option<SocketAddr>,
    /// Permission bits of the sockets (0o600 by default: only the agent's user).
    pub socket_mode: u32,
    /// The sockets' directories are volumes only the Pod's sidecar containers mount (the
    /// injector's emptyDir, 0777 and root's as the kubelet makes it): their own mode and
    /// owner are not checked; the directories above them still are.
    pub trust_socket_dir: bool,
    /// How often to ask the CA for its CRLs (`rampart.ca.v1.Revocation/GetCrls`); `None`:
    /// never (no CRL is served, own certificates are not checked for revocation).
    pub crl_poll_interval: Option<Duration>,
}

impl AgentConfig {
    /// Check the combination of values: at least one workload, no socket used twice.
    pub fn validate(&self) -> Result<(), Error> {
        self.rotation.validate()?;
        if self.workloads.is_empty() {
            return Err(Error::InvalidConfig {
                field: "workload",
                reason: "no workload identity configured".into(),
            });
        }
        let mut seen = std::collections::HashSet::new();
        for w in &self.workloads {
            if w.sds_socket.is_none() && w.workload_api_socket.is_none() && w.output_dir.is_none() {
                return Err(Error::InvalidConfig {
                    field: "workload",
                    reason: format!(
                        "{} has no SDS socket, Workload API socket or output dir",
                        w.spiffe_id
                    ),
                });
            }
            for p in [&w.sds_socket, &w.workload_api_socket, &w.output_dir]
                .into_iter()
                .flatten()
            {
                if !seen.insert(p.clone()) {
                    return Err(Error::InvalidConfig {
                        field: "workload",
                        reason: format!("{} is used twice", p.display()),
                    });
                }
            }
        }
        if self
            .crl_poll_interval
            .is_some_and(|d| d < Duration::from_millis(100))
        {
            return Err(Error::InvalidConfig {
                field: "crl-poll-interval",
                reason: "must be at least 100ms".into(),
            });
        }
        if self.socket_mode & !0o777 != 0 || self.socket_mode & 0o600 != 0o600 {
            return Err(Error::InvalidConfig {
                field: "socket-mode",
                reason: format!(
                    "{:o} must be permission bits including owner rw",
                    self.socket_mode
                ),
            });
        }
        if self.socket_mode & 0o007 != 0 {
            return Err(Error::InvalidConfig {
                field: "socket-mode",
                reason: format!(
                    "{:o} lets every local user connect and fetch the workload's private key; \
                     use 600 (the agent's user) or 660 (also its group)",
                    self.socket_mode
                ),
            });
        }
        Ok(())
    }
}

/// Read a file that must not be empty, trimming surrounding whitespace.
pub(crate) fn read_nonempty(path: &Path) -> Result<String, Error> {
    let s = std::fs::read_to_string(path).map_err(|source| Error::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    let t = s.trim();
    if t.is_empty() {
        return Err(Error::EmptyFile {
            path: path.to_owned(),
        });
    }
    Ok(t.to_owned())
}

/// The namespace and service account a Kubernetes-style token names, read from its claims
/// *without* verifying the signature: the CA verifies the token; the agent only uses the
/// claims to know which identity to ask for (and then checks the returned SAN equals it).
///
/// Accepts `sub: system:serviceaccount:<ns>:<sa>` or the `kubernetes.io` claim
/// (`namespace`, `serviceaccount.name`).
pub fn identity_from_token(token: &str) -> Result<(String, String), String> {
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a JWT (expected three dot-separated parts)".into());
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| format!("payload is not base64url: {e}"))?;
    let claims: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("payload is not JSON: {e}"))?;
    if let Some(k8s) = claims.get("kubernetes.io") {
        let ns = k8s.get("namespace").and_then(|v| v.as_str());
        let sa = k8s
            .get("serviceaccount")
            .and_then(|v| v.get("name"))
            .and_then(|v| v.as_str());
        if let (Some(ns), Some(sa)) = (ns, sa) {
            return Ok((ns.to_owned(), sa.to_owned()));
        }
    }
    if let Some(sub) = claims.get("sub").and_then(|v| v.as_str()) {
        let f: Vec<&str> = sub.split(':').collect();
        if let ["system", "serviceaccount", ns, sa] = f.as_slice()
            && !ns.is_empty()
            && !sa.is_empty()
        {
            return Ok(((*ns).to_owned(), (*sa).to_owned()));
        }
        return Err(format!(
            "claim sub {sub:?} is not system:serviceaccount:<namespace>:<service-account>"
        ));
    }
    Err("no sub or kubernetes.io claim naming a namespace and service account".into())
}

/// Resolve a workload's SPIFFE ID: explicit namespace and service account win; missing
/// parts come from the token's claims; if both are given and disagree, that is an error
/// (the CA would refuse the CSR anyway, better to say so at startup).
pub fn resolve_identity(
    trust_domain: &TrustDomain,
    namespace: Option<&str>,
    service_account: Option<&str>,
    token_path: &Path,
) -> Result<SpiffeId, Error> {
    let from_token = match read_nonempty(token_path) {
        Ok(tok) => Some(identity_from_token(&tok)),
        Err(e) if namespace.is_some() && service_account.is_some() => {
            // The token may be provisioned after start; flags are enough.
            tracing::debug!("token not readable yet: {e}");
            None
        }
        Err(e) => return Err(e),
    };
    let (ns, sa) = match (namespace, service_account, from_token) {
        (Some(ns), Some(sa), Some(Ok((tns, tsa)))) => {
            if ns != tns || sa != tsa {
                return Err(Error::InvalidConfig {
                    field: "namespace/service-account",
                    reason: format!(
                        "flags say {ns}/{sa} but the token {} is for {tns}/{tsa}",
                        token_path.display()
                    ),
                });
            }
            (ns.to_owned(), sa.to_owned())
        }
        (Some(ns), Some(sa), _) => (ns.to_owned(), sa.to_owned()),
        (ns, sa, Some(Ok((tns, tsa)))) => {
            // One flag given: it must agree with the token too, or the agent would start
            // and then loop on the CA's "SAN mismatch" refusals.
            let (field, flag, token) = match (ns, sa) {
                (Some(ns), _) => ("namespace", ns, tns.as_str()),
                (_, Some(sa)) => ("service-account", sa, tsa.as_str()),
                _ => ("", "", ""),
            };
            if flag != token {
                return Err(Error::InvalidConfig {
                    field,
                    reason: format!(
                        "--{field} {flag} but the token {} is for {tns}/{tsa}",
                        token_path.display()
                    ),
                });
            }
            (tns.clone(), tsa.clone())
        }
        (_, _, Some(Err(reason))) => {
            return Err(Error::BadToken {
                path: token_path.to_owned(),
                reason: format!(
                    "{reason}; give --namespace and --service-account or a token naming them"
                ),
            });
        }
        (_, _, None) => {
            return Err(Error::InvalidConfig {
                field: "namespace/service-account",
                reason: "not given and no token to read them from".into(),
            });
        }
    };
    SpiffeId::istio(trust_domain, &ns, &sa).map_err(|e| Error::InvalidConfig {
        field: "namespace/service-account",
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_reader_tolerates_a_trailing_newline_and_refuses_blank_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        for text in ["a.b.c", "a.b.c\n", "a.b.c\r\n", "  a.b.c \n\n"] {
            std::fs::write(&path, text).unwrap();
            assert_eq!(read_nonempty(&path).unwrap(), "a.b.c", "{text:?}");
        }
        // Negative twin: a file with nothing but whitespace is no token.
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(read_nonempty(&path), Err(Error::EmptyFile { .. })));
    }

    fn jwt(claims: &str) -> String {
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            e.encode(r#"{"alg":"ES256"}"#),
            e.encode(claims)
        )
    }

    #[test]
    fn token_sub_claim() {
        let t = jwt(r#"{"sub":"system:serviceaccount:shop:cart"}"#);
        assert_eq!(
            identity_from_token(&t).unwrap(),
            ("shop".into(), "cart".into())
        );
    }

    #[test]
    fn token_kubernetes_claim_wins() {
        let t =
            jwt(r#"{"sub":"x","kubernetes.io":{"namespace":"a","serviceaccount":{"name":"b"}}}"#);
        assert_eq!(identity_from_token(&t).unwrap(), ("a".into(), "b".into()));
    }

    #[test]
    fn token_refusals() {
        assert!(identity_from_token("abc").is_err());
        assert!(identity_from_token(&jwt(r#"{"sub":"alice"}"#)).is_err());
        assert!(identity_from_token(&jwt(r#"{"sub":"system:serviceaccount::sa"}"#)).is_err());
        assert!(identity_from_token(&jwt(r#"{"iss":"x"}"#)).is_err());
    }

    #[test]
    fn resolve_flags_and_token_must_agree() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tok");
        std::fs::write(&p, jwt(r#"{"sub":"system:serviceaccount:shop:cart"}"#)).unwrap();
        let td: TrustDomain = "cluster.local".parse().unwrap();
        let id = resolve_identity(&td, None, None, &p).unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
        let id = resolve_identity(&td, Some("shop"), Some("cart"), &p).unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
        let err = resolve_identity(&td, Some("shop"), Some("other"), &p).unwrap_err();
        assert!(err.to_string().contains("shop/cart"), "{err}");
        // One flag, agreeing with the token: fine; disagreeing: refused, naming the flag.
        let id = resolve_identity(&td, Some("shop"), None, &p).unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
        let id = resolve_identity(&td, None, Some("cart"), &p).unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
        let err = resolve_identity(&td, Some("other"), None, &p).unwrap_err();
        assert!(
            err.to_string().contains("--namespace other but the token"),
            "{err}"
        );
        let err = resolve_identity(&td, None, Some("other"), &p).unwrap_err();
        assert!(
            err.to_string()
                .contains("--service-account other but the token"),
            "{err}"
        );
        // no token file yet, both flags: fine
        let id = resolve_identity(&td, Some("a"), Some("b"), &dir.path().join("missing")).unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/a/sa/b");
        // no token file, flags incomplete: error naming the file
        let err = resolve_identity(&td, Some("a"), None, &dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
