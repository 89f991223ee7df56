//! The CA client: Istio's `CreateCertificate` and Rampart's companion `GetCrls` over TLS,
//! verified against the configured root.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rampart_proto::istio::v1::auth::IstioCertificateRequest;
use rampart_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use rampart_proto::rampart::ca::v1::GetCrlsRequest;
use rampart_proto::rampart::ca::v1::revocation_client::RevocationClient;
use rustls_pki_types::ServerName;
use tonic::metadata::MetadataValue;

use crate::Error;
use crate::config::{CaConfig, read_nonempty};

/// A boxed future, for object-safe async traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One CSR to sign.
#[derive(Debug)]
pub struct SignRequest<'a> {
    /// PEM CSR.
    pub csr_pem: &'a str,
    /// Requested lifetime.
    pub ttl: Duration,
    /// File with the bearer token, read now (so rotated tokens are used).
    pub token_path: &'a Path,
}

/// Something that turns a CSR into a certificate chain: the Istio CA over the network, or a
/// test double.
pub trait CertificateSigner: Send + Sync + 'static {
    /// Ask for a certificate; returns the `cert_chain` strings as the CA sent them.
    fn sign<'a>(&'a self, req: SignRequest<'a>) -> BoxFuture<'a, Result<Vec<String>, Error>>;
}

/// Istio-compatible CA client (`istio.v1.auth.IstioCertificateService/CreateCertificate`).
///
/// Each call reads the CA root file and the token file afresh, dials, verifies the CA's
/// serving certificate (TLS 1.3, ALPN h2, server name `server_name`) and sends one request.
/// CSRs are rare (one per rotation), so a fresh connection each time is simpler than a pool
/// and picks up CA restarts and root changes without bookkeeping.
#[derive(Debug, Clone)]
pub struct IstioCaClient {
    cfg: Arc<CaConfig>,
    /// The connection CRL polls reuse (polls are frequent; CSRs dial afresh). Dropped on
    /// any error, so the next poll dials again (and re-reads the root file).
    crl_channel: Arc<std::sync::Mutex<Option<tonic::transport::Channel>>>,
}

// === impl IstioCaClient ===

impl IstioCaClient {
    /// A client for `cfg`.
    pub fn new(cfg: CaConfig) -> Self {
        IstioCaClient {
            cfg: Arc::new(cfg),
            crl_channel: Arc::default(),
        }
    }

    /// TLS 1.3 per Rampart's crypto policy (`rampart_certs::tls`), server checked by name
    /// against the roots in the CA root file (read now, so a changed file takes effect).
    fn tls_config(&self) -> Result<rustls::ClientConfig, Error> {
        let pem = read_nonempty(&self.cfg.root_path)?;
        let bundle = rampart_certs::TrustBundle::from_pem(&pem)?;
        let mut cfg =
            rampart_certs::tls::client_config(rampart_certs::tls::ServerAuth::Dns { bundle }, None)
                .map_err(|e| Error::InvalidConfig {
                    field: "ca-root",
                    reason: format!("{}: {e}", self.cfg.root_path.display()),
                })?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(cfg)
    }

    /// Dial the CA and verify its serving certificate.
    async fn channel(&self) -> Result<tonic::transport::Channel, Error> {
        let addr = self.cfg.addr.clone();
        let unreachable = |reason: String| Error::CaUnreachable {
            addr: addr.clone(),
            reason,
        };
        let tls = tokio_rustls::TlsConnector::from(Arc::new(self.tls_config()?));
        let server_name = ServerName::try_from(self.cfg.server_name.clone()).map_err(|e| {
            Error::InvalidConfig {
                field: "ca-server-name",
                reason: format!("{}: {e}", self.cfg.server_name),
            }
        })?;
        let dial = addr.clone();
        // What to check when the CA's certificate is not trusted: the commonest
        // misconfiguration, which otherwise reads as a bare "UnknownIssuer".
        let trust_hint = Arc::new(format!(
            "--ca-root {} must hold the root that issued the CA's serving certificate, and --ca-server-name {} must be a name in it",
            self.cfg.root_path.display(),
            self.cfg.server_name
        ));
        let connector = tower::service_fn(move |_uri: http::Uri| {
            let tls = tls.clone();
            let server_name = server_name.clone();
            let dial = dial.clone();
            let trust_hint = trust_hint.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(&dial).await?;
                tcp.set_nodelay(true)?;
                let stream = tls.connect(server_name, tcp).await.map_err(|e| {
                    let tls_error = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
                    // A key-exchange refusal (e.g. compliance policy pqc against a
                    // classical-only CA) says so instead of a bare TLS alert.
                    if let Some(why) = tls_error.and_then(rampart_certs::tls::kx_refusal) {
                        return std::io::Error::other(why);
                    }
                    match tls_error {
                        Some(rustls::Error::InvalidCertificate(c)) => std::io::Error::other(
                            format!("the CA's certificate is not trusted ({c:?}): {trust_hint}"),
                        ),
                        _ => e,
                    }
                })?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| unreachable(e.to_string()))?
            .connect_with_connector(connector)
            .await
            .map_err(|e| unreachable(error_chain(&e)))?;
        Ok(channel)
    }

    /// `authorization: Bearer <token>` (and `clusterid`) on `request`.
    fn authorize<T>(
        &self,
        request: &mut tonic::Request<T>,
        token_path: &Path,
    ) -> Result<(), Error> {
        let token = read_nonempty(token_path)?;
        let bearer: MetadataValue<_> =
            format!("Bearer {token}")
                .parse()
                .map_err(|_| Error::BadToken {
                    path: token_path.to_owned(),
                    reason: "not a valid header value".into(),
                })?;
        request.metadata_mut().insert("authorization", bearer);
        if let Some(cluster) = &self.cfg.cluster_id {
            let v = cluster.parse().map_err(|_| Error::InvalidConfig {
                field: "cluster-id",
                reason: "not a valid header value".into(),
            })?;
            request.metadata_mut().insert("clusterid", v);
        }
        Ok(())
    }

    fn status_error(&self, status: tonic::Status) -> Error {
        // A status made on this side from a transport failure (connect refused, TLS, a
        // broken connection) carries its cause; one the CA sent does not.
        let local = std::error::Error::source(&status).is_some();
        match status.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown
                if local || status.message().contains("transport") =>
            {
                Error::CaUnreachable {
                    addr: self.cfg.addr.clone(),
                    reason: status.message().to_owned(),
                }
            }
            code => Error::CaRefused {
                code: format!("{code:?}"),
                message: status.message().to_owned(),
            },
        }
    }

    async fn call(&self, req: SignRequest<'_>) -> Result<Vec<String>, Error> {
        // Read the token before dialing: a missing token is a local error, not the CA's.
        read_nonempty(req.token_path)?;
        let channel = self.channel().await?;
        let mut client = IstioCertificateServiceClient::new(channel);
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: req.csr_pem.to_owned(),
            validity_duration: i64::try_from(req.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: None,
        });
        self.authorize(&mut request, req.token_path)?;
        match client.create_certificate(request).await {
            Ok(resp) => Ok(resp.into_inner().cert_chain),
            Err(status) => Err(self.status_error(status)),
        }
    }

    async fn crls(&self, if_none_match: &str, token_path: &Path) -> Result<CrlPoll, Error> {
        read_nonempty(token_path)?;
        let cached = self
            .crl_channel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let channel = match cached {
            Some(c) => c,
            None => {
                let c = self.channel().await?;
                *self.crl_channel.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
                c
            }
        };
        let result = self.get_crls_on(channel, if_none_match, token_path).await;
        // A refusal (a token the CA does not accept) came over a working connection: keep
        // it. Anything else may be the connection's fault: dial afresh next time.
        if let Err(e) = &result
            && !matches!(e, Error::CaRefused { .. } | Error::BadToken { .. })
        {
            *self.crl_channel.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        result
    }

    async fn get_crls_on(
        &self,
        channel: tonic::transport::Channel,
        if_none_match: &str,
        token_path: &Path,
    ) -> Result<CrlPoll, Error> {
        let mut client = RevocationClient::new(channel);
        let mut request = tonic::Request::new(GetCrlsRequest {
            if_none_match: if_none_match.to_owned(),
        });
        self.authorize(&mut request, token_path)?;
        match client.get_crls(request).await {
            Ok(resp) => {
                let r = resp.into_inner();
                Ok(CrlPoll {
                    version: r.version,
                    etag: r.etag,
                    crls: if r.not_modified { None } else { Some(r.crls) },
                })
            }
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                Err(Error::CrlsUnsupported {
                    addr: self.cfg.addr.clone(),
                })
            }
            Err(status) => Err(self.status_error(status)),
        }
    }
}

/// One answer of the CA's CRL service (`rampart.ca.v1.Revocation/GetCrls`).
#[derive(Debug, Clone)]
pub struct CrlPoll {
    /// The CA's version of its set (increases on every change).
    pub version: u64,
    /// Content hash of the served set (empty when the CA serves none).
    pub etag: String,
    /// The DER CRLs; `None` when the set equals the one named in `if_none_match`.
    pub crls: Option<Vec<Vec<u8>>>,
}

/// Where the agent gets the CA's CRLs: the CA over the network, or a test double.
pub trait CrlSource: Send + Sync + 'static {
    /// The current set, or "not modified" when its etag is `if_none_match`. Authenticated
    /// with the bearer token in `token_path` (read now).
    fn get_crls<'a>(
        &'a self,
        if_none_match: &'a str,
        token_path: &'a Path,
    ) -> BoxFuture<'a, Result<CrlPoll, Error>>;
}

impl CrlSource for IstioCaClient {
    fn get_crls<'a>(
        &'a self,
        if_none_match: &'a str,
        token_path: &'a Path,
    ) -> BoxFuture<'a, Result<CrlPoll, Error>> {
        let timeout = self.cfg.request_timeout;
        let addr = self.cfg.addr.clone();
        Box::pin(async move {
            match tokio::time::timeout(timeout, self.crls(if_none_match, token_path)).await {
                Ok(r) => r,
                Err(_) => Err(Error::CaUnreachable {
                    addr,
                    reason: format!("no answer within {timeout:?}"),
                }),
            }
        })
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        // Many errors print their source in their own text too: say each cause once.
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

impl CertificateSigner for IstioCaClient {
    fn sign<'a>(&'a self, req: SignRequest<'a>) -> BoxFuture<'a, Result<Vec<String>, Error>> {
        let timeout = self.cfg.request_timeout;
        let addr = self.cfg.addr.clone();
        Box::pin(async move {
            match tokio::time::timeout(timeout, self.call(req)).await {
                Ok(r) => r,
                Err(_) => Err(Error::CaUnreachable {
                    addr,
                    reason: format!("no answer within {timeout:?}"),
                }),
            }
        })
    }
}
