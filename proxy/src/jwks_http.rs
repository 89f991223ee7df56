//! JWKS over HTTP(S): the fetcher (its TLS client, limits and timeouts) and the `mesh.yaml`
//! settings it is made from (`rampart.jwksRefresh`, `rampart.jwksCaFile`). Pure of the
//! proxy's state: the configuration holds its settings, the JWKS task ([`crate::jwks`])
//! fetches with it.

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use rampart_mesh::{MESH_FILE, MeshFolder, Problem};

/// Default refresh interval of fetched key sets (Istio's
/// `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`).
pub(crate) const DEFAULT_REFRESH: Duration = Duration::from_secs(20 * 60);
/// Fetch timeout when a rule's `timeout` is zero (Istio's default).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS body accepted.
pub(crate) const MAX_BODY: usize = 1 << 20;
// === fetching ===

fn native_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let r = rustls_native_certs::load_native_certs();
        for e in &r.errors {
            tracing::warn!(error = %e, "loading system CA certificates for JWKS fetching");
        }
        r.certs
    })
}

/// Fetches JWKS documents over HTTP(S). Holds only public trust anchors; the TLS client
/// configuration is built on first use (a proxy with no remote `jwksUri` never reads the
/// system store).
pub(crate) struct HttpFetcher {
    pub(crate) system_roots: bool,
    pub(crate) extra: Vec<CertificateDer<'static>>,
    tls: OnceLock<Result<Arc<ClientConfig>, String>>,
    pub(crate) max_body: usize,
}

impl std::fmt::Debug for HttpFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpFetcher")
            .field("system_roots", &self.system_roots)
            .field("extra_roots", &self.extra.len())
            .field("max_body", &self.max_body)
            .finish()
    }
}

impl HttpFetcher {
    /// A fetcher trusting the system roots plus `extra` for `https`.
    pub(crate) fn new(extra: Vec<CertificateDer<'static>>) -> HttpFetcher {
        HttpFetcher {
            system_roots: true,
            extra,
            tls: OnceLock::new(),
            max_body: MAX_BODY,
        }
    }

    /// A fetcher trusting only `extra` (tests).
    #[cfg(test)]
    pub(crate) fn only(extra: Vec<CertificateDer<'static>>) -> HttpFetcher {
        HttpFetcher {
            system_roots: false,
            ..HttpFetcher::new(extra)
        }
    }

    fn tls(&self) -> Result<Arc<ClientConfig>, String> {
        self.tls
            .get_or_init(|| {
                let mut roots = RootCertStore::empty();
                if self.system_roots {
                    let (_, _) = roots.add_parsable_certificates(native_roots().iter().cloned());
                }
                let (_, _) = roots.add_parsable_certificates(self.extra.iter().cloned());
                if roots.is_empty() {
                    return Err("no trusted CA certificates (the system store is empty and \
                                rampart.jwksCaFile is not set)"
                        .to_string());
                }
                let mut c = ClientConfig::builder_with_provider(rampart_certs::tls::provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| format!("TLS client configuration: {e}"))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                c.alpn_protocols = vec![b"http/1.1".to_vec()];
                Ok(Arc::new(c))
            })
            .clone()
    }

    /// The body at `uri`, or why not (the reason names what failed; callers add the URI).
    pub(crate) async fn fetch(&self, uri: &str, timeout: Duration) -> Result<String, String> {
        // A zero `timeout` would refuse every fetch; treat it as unset (Istio's 5s).
        let timeout = if timeout.is_zero() {
            DEFAULT_TIMEOUT
        } else {
            timeout
        };
        match tokio::time::timeout(timeout, self.fetch_inner(uri)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no complete response within {}",
                humantime::format_duration(timeout)
            )),
        }
    }

    /// The key set of an issuer found by OpenID discovery: the configuration document at
    /// `doc`, then the `jwks_uri` it names, both within `timeout` (one deadline, so a
    /// request waiting on an unknown-`kid` refetch waits no longer than for a `jwksUri`).
    /// Returns that `jwks_uri` and its body.
    pub(crate) async fn fetch_discovered(
        &self,
        doc: &str,
        timeout: Duration,
    ) -> Result<(String, String), String> {
        let timeout = if timeout.is_zero() {
            DEFAULT_TIMEOUT
        } else {
            timeout
        };
        let start = std::time::Instant::now();
        let body = self
            .fetch(doc, timeout)
            .await
            .map_err(|e| format!("OpenID configuration: {e}"))?;
        let jwks_uri =
            discovered_jwks_uri(doc, &body).map_err(|e| format!("OpenID configuration: {e}"))?;
        let left = timeout
            .saturating_sub(start.elapsed())
            .max(Duration::from_millis(1));
        let keys = self
            .fetch(&jwks_uri, left)
            .await
            .map_err(|e| format!("jwks_uri {jwks_uri} (from the OpenID configuration): {e}"))?;
        Ok((jwks_uri, keys))
    }

    async fn fetch_inner(&self, uri: &str) -> Result<String, String> {
        let u: Uri = uri.parse().map_err(|e| format!("not a valid URI: {e}"))?;
        let https = match u.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err("only http:// and https:// jwksUri are fetched".into()),
        };
        let host = u.host().ok_or("the URI has no host")?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let port = u.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = TcpStream::connect((bare, port))
            .await
            .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let authority = u.authority().map(|a| a.as_str()).unwrap_or(host);
        let path = u.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        if https {
            let tls = self.tls()?;
            let name = ServerName::try_from(bare.to_string())
                .map_err(|e| format!("{host} is not a valid TLS server name: {e}"))?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake with {host}:{port}: {e}"))?;
            self.get(stream, authority, path).await
        } else {
            self.get(tcp, authority, path).await
        }
    }

    async fn get<I>(&self, io: I, authority: &str, path: &str) -> Result<String, String>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let conn = tokio::spawn(conn);
        let req = Request::get(path)
            .header(header::HOST, authority)
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, "rampart-proxy")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("building the request: {e}"))?;
        let result = async {
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| format!("HTTP request: {e}"))?;
            let status = resp.status();
            if status.is_redirection() {
                let to = resp
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?");
                return Err(format!("HTTP {status} redirect to {to} is not followed"));
            }
            if status != StatusCode::OK {
                return Err(format!("HTTP {status} (want 200)"));
            }
            let declared = resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > self.max_body as u64) {
                return Err(format!("body larger than {} bytes", self.max_body));
            }
            let body = Limited::new(resp.into_body(), self.max_body)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        format!("body larger than {} bytes", self.max_body)
                    } else {
                        format!("reading the body: {e}")
                    }
                })?
                .to_bytes();
            String::from_utf8(body.to_vec()).map_err(|_| "body is not UTF-8".to_string())
        }
        .await;
        conn.abort();
        result
    }
}

/// The `jwks_uri` of the OpenID configuration `body` served at `doc`. Its `issuer` must
/// be the issuer discovery was for (OpenID Connect Discovery 1.0, section 4.3; a trailing
/// `/` aside), and a document fetched over `https` may not send the key fetch to plain
/// `http`.
pub(crate) fn discovered_jwks_uri(doc: &str, body: &str) -> Result<String, String> {
    let v: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("not a JSON document: {e}"))?;
    let issuer = doc
        .strip_suffix(rampart_authz::OPENID_CONFIGURATION)
        .unwrap_or(doc);
    match v.get("issuer").and_then(serde_json::Value::as_str) {
        Some(i) if i.trim_end_matches('/') == issuer => {}
        Some(i) => {
            return Err(format!(
                "it is the configuration of issuer {i:?}, not {issuer:?}"
            ));
        }
        None => return Err("no \"issuer\"".into()),
    }
    let uri = v
        .get("jwks_uri")
        .and_then(serde_json::Value::as_str)
        .ok_or("no \"jwks_uri\"")?;
    if !(uri.starts_with("https://") || uri.starts_with("http://")) {
        return Err(format!("jwks_uri {uri:?} is not an http(s) URL"));
    }
    if doc.starts_with("https://") && !uri.starts_with("https://") {
        return Err(format!(
            "jwks_uri {uri:?} is plain http, while the configuration came over https"
        ));
    }
    Ok(uri.to_owned())
}

// === settings (per configuration) ===

/// The `mesh.yaml` settings of remote JWKS fetching, checked with the folder.
#[derive(Debug)]
pub(crate) struct RemoteSettings {
    pub(crate) refresh: Duration,
    pub(crate) ca_file: Option<std::path::PathBuf>,
    pub(crate) fetcher: Arc<HttpFetcher>,
}

impl RemoteSettings {
    /// Read `rampart.jwksRefresh` and `rampart.jwksCaFile` (a PEM bundle that must hold at
    /// least one certificate; an unreadable one refuses the folder).
    pub(crate) fn load(folder: &MeshFolder) -> Result<RemoteSettings, Problem> {
        let problem = |reason: String| Problem {
            file: MESH_FILE.into(),
            field: "rampart.jwksCaFile".into(),
            reason,
        };
        let ca_file = folder
            .local
            .jwks_ca_file
            .as_ref()
            .map(|p| folder.dir.join(p));
        // Read with the snapshot (`ReferencedFiles`): building a configuration does no I/O.
        let extra = match (&ca_file, &folder.files.jwks_ca) {
            (None, _) => Vec::new(),
            (Some(p), Some(Ok(text))) => parse_ca_file(p, text).map_err(problem)?,
            (Some(_), Some(Err(e))) => return Err(problem(e.clone())),
            (Some(p), None) => {
                return Err(problem(format!(
                    "{}: not read with the snapshot",
                    p.display()
                )));
            }
        };
        // The folder is loaded often (every watch tick); reuse the fetcher (and its TLS
        // configuration) while the trusted CA certificates stay the same.
        static LAST: Mutex<Option<Arc<HttpFetcher>>> = Mutex::new(None);
        let mut last = lock(&LAST);
        let fetcher = match last.as_ref() {
            Some(f) if f.extra == extra => f.clone(),
            _ => {
                let f = Arc::new(HttpFetcher::new(extra));
                *last = Some(f.clone());
                f
            }
        };
        Ok(RemoteSettings {
            refresh: folder.local.jwks_refresh.unwrap_or(DEFAULT_REFRESH),
            ca_file,
            fetcher,
        })
    }
}

fn parse_ca_file(p: &Path, text: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs =
        rampart_certs::parse_certs_pem(text).map_err(|e| format!("{}: {e}", p.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE block", p.display()));
    }
    let mut store = RootCertStore::empty();
    for c in &certs {
        store
            .add(c.clone())
            .map_err(|e| format!("{}: unusable CA certificate: {e}", p.display()))?;
    }
    Ok(certs)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
