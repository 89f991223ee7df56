//! The SPIFFE Workload API (`SpiffeWorkloadAPI`) over a Unix socket.
//!
//! X.509: `FetchX509SVID` and `FetchX509Bundles` stream the current SVID / bundle at once (or
//! as soon as the first one exists) and again on every change. Every call must carry the
//! metadata `workload.spiffe.io: true`; otherwise `INVALID_ARGUMENT`, as the spec says.
//!
//! JWT: the Istio CA API (`CreateCertificate`) has no way to mint JWT-SVIDs or publish JWT
//! bundles, so `FetchJWTSVID`, `FetchJWTBundles` and `ValidateJWTSVID` answer `UNIMPLEMENTED`
//! with a message saying so (after the header check, so a malformed call still learns that
//! first).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use rampart_proto::spiffe::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use rampart_proto::spiffe::workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, SECURITY_HEADER,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;
use crate::state::{Bundle, SecretStore, Snapshot, Svid};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The Workload API for one workload identity.
#[derive(Debug, Clone)]
pub struct WorkloadApiService {
    store: SecretStore,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get(SECURITY_HEADER).map(|v| v.to_str()) {
        Some(Ok("true")) => Ok(()),
        _ => Err(Status::invalid_argument(format!(
            "security header missing from request: metadata {SECURITY_HEADER}: true is required"
        ))),
    }
}

fn concat_der<'a>(
    certs: impl IntoIterator<Item = &'a rustls_pki_types::CertificateDer<'a>>,
) -> Vec<u8> {
    let mut out = Vec::new();
    for c in certs {
        out.extend_from_slice(c.as_ref());
    }
    out
}

fn bundle_der(b: &Bundle) -> Vec<u8> {
    concat_der(b.bundle.roots())
}

fn svid_response(svid: &Svid, bundle: &Bundle) -> X509svidResponse {
    X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: svid.id.to_string(),
            x509_svid: concat_der(&svid.chain),
            x509_svid_key: svid.key.secret_pkcs8_der().to_vec(),
            bundle: bundle_der(bundle),
            hint: String::new(),
        }],
        ..Default::default()
    }
}

fn bundles_response(bundle: &Bundle) -> X509BundlesResponse {
    let mut bundles = HashMap::new();
    // Keyed by the trust domain's SPIFFE ID (`spiffe://<td>`), as SPIRE does.
    bundles.insert(
        format!("spiffe://{}", bundle.trust_domain),
        bundle_der(bundle),
    );
    X509BundlesResponse {
        bundles,
        ..Default::default()
    }
}

/// Stream `make(snapshot)` whenever the (svid, bundle) versions it depends on change.
fn watch_stream<T: Send + 'static>(
    mut rx: watch::Receiver<Snapshot>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    key: fn(&Snapshot) -> Option<String>,
    make: fn(&Snapshot) -> Option<T>,
) -> BoxStream<T> {
    let (tx, out) = mpsc::channel(2);
    tokio::spawn(async move {
        metrics.workload_api_streams.inc();
        let mut last: Option<String> = None;
        loop {
            let snap = rx.borrow_and_update().clone();
            let k = key(&snap);
            if k.is_some()
                && k != last
                && let Some(msg) = make(&snap)
            {
                if tx.send(Ok(msg)).await.is_err() {
                    break;
                }
                last = k;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { break },
                _ = tx.closed() => break,
                _ = shutdown.cancelled() => {
                    let _ = tx.send(Err(Status::unavailable("node agent shutting down"))).await;
                    break;
                }
            }
        }
        metrics.workload_api_streams.dec();
    });
    Box::pin(ReceiverStream::new(out))
}

// === impl WorkloadApiService ===

impl WorkloadApiService {
    /// Serve what `store` holds.
    pub fn new(store: SecretStore, metrics: Arc<Metrics>) -> Self {
        WorkloadApiService {
            store,
            metrics,
            shutdown: CancellationToken::new(),
        }
    }

    /// End open streams (with `UNAVAILABLE`) when `token` is cancelled.
    pub fn with_shutdown(mut self, token: CancellationToken) -> Self {
        self.shutdown = token;
        self
    }

    /// The tonic service.
    pub fn into_server(self) -> SpiffeWorkloadApiServer<Self> {
        SpiffeWorkloadApiServer::new(self)
    }
}

const NO_JWT: &str = "JWT-SVIDs are not available from this agent: its CA speaks Istio's \
                      CreateCertificate API, which issues X.509 certificates only";

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApiService {
    type FetchJWTBundlesStream = BoxStream<JwtBundlesResponse>;
    type FetchX509SVIDStream = BoxStream<X509svidResponse>;
    type FetchX509BundlesStream = BoxStream<X509BundlesResponse>;

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(&request)?;
        Err(Status::unimplemented(NO_JWT))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&request)?;
        Err(Status::unimplemented(NO_JWT))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&request)?;
        Err(Status::unimplemented(NO_JWT))
    }

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&request)?;
        Ok(Response::new(watch_stream(
            self.store.subscribe(),
            self.metrics.clone(),
            self.shutdown.clone(),
            |s| match (&s.svid, &s.bundle) {
                (Some(v), Some(b)) => Some(format!("{}/{}", v.version, b.version)),
                _ => None,
            },
            |s| match (&s.svid, &s.bundle) {
                (Some(v), Some(b)) => Some(svid_response(v, b)),
                _ => None,
            },
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&request)?;
        Ok(Response::new(watch_stream(
            self.store.subscribe(),
            self.metrics.clone(),
            self.shutdown.clone(),
            |s| s.bundle.as_ref().map(|b| b.version.clone()),
            |s| s.bundle.as_deref().map(bundles_response),
        )))
    }
}
