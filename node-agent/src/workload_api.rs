//! The SPIFFE Workload API (`SpiffeWorkloadAPI`) over a Unix socket.
//!
//! X.509: `FetchX509SVID` and `FetchX509Bundles` stream the current SVID / bundle at once and
//! again on every change. Every call must carry the metadata `workload.spiffe.io: true`;
//! otherwise `INVALID_ARGUMENT`, as the spec says.
//!
//! No valid SVID (none issued yet, or the last one expired and was withdrawn): the spec
//! (SPIFFE Workload API §5.2.1, §6.2.1) prescribes `PERMISSION_DENIED` when the caller is not
//! entitled to any SVID, and says a client receiving it on an open stream SHOULD stop using
//! the SVIDs it had. So `FetchX509SVID` answers `PERMISSION_DENIED` at once (never a silent
//! wait) with a message naming the reason, and an open stream whose SVID is withdrawn ends
//! with `PERMISSION_DENIED`; clients retry after a backoff (py-spiffe and go-spiffe retry
//! every code but `INVALID_ARGUMENT` and `CANCELLED`). `FetchX509Bundles` does the same while
//! there is no trust bundle yet (a bundle outlives an expired SVID). `UNAVAILABLE` is kept for
//! the agent shutting down.
//!
//! JWT: the Istio CA API (`CreateCertificate`) has no way to mint JWT-SVIDs or publish JWT
//! bundles, so `FetchJWTSVID`, `FetchJWTBundles` and `ValidateJWTSVID` answer `UNIMPLEMENTED`
//! with a message saying so (after the header check, so a malformed call still learns that
//! first; `FetchJWTSVID` without any valid SVID answers `PERMISSION_DENIED` first, as the
//! spec prescribes for a caller with no identity).

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

/// `PERMISSION_DENIED` when `snap` has no valid SVID to serve, naming why.
fn no_svid(snap: &Snapshot) -> Option<Status> {
    if snap.svid.is_some() {
        return None;
    }
    Some(Status::permission_denied(match &snap.withdrawn {
        Some(why) => format!(
            "no valid X.509-SVID for this workload: its certificate {why} and has not been \
             renewed (the agent keeps trying); stop using it"
        ),
        None => "no X.509-SVID has been issued to this workload yet (the agent is still \
                 requesting one from the CA); retry after a backoff"
            .to_string(),
    }))
}

/// `PERMISSION_DENIED` when `snap` has no trust bundle yet.
fn no_bundle(snap: &Snapshot) -> Option<Status> {
    snap.bundle.is_none().then(|| {
        Status::permission_denied(
            "no trust bundle has been received for this workload yet (the agent is still \
             requesting its first certificate from the CA); retry after a backoff",
        )
    })
}

/// Stream `make(snapshot)` whenever the (svid, bundle) versions it depends on change; end
/// with `gone(snapshot)` when that says there is nothing valid to serve.
fn watch_stream<T: Send + 'static>(
    mut rx: watch::Receiver<Snapshot>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    gone: fn(&Snapshot) -> Option<Status>,
    key: fn(&Snapshot) -> Option<String>,
    make: fn(&Snapshot) -> Option<T>,
) -> Result<BoxStream<T>, Status> {
    // Answer at once when there is nothing to serve: a client must never hang silently.
    if let Some(status) = gone(&rx.borrow_and_update()) {
        return Err(status);
    }
    let (tx, out) = mpsc::channel(2);
    tokio::spawn(async move {
        metrics.workload_api_streams.inc();
        let mut last: Option<String> = None;
        loop {
            let snap = rx.borrow_and_update().clone();
            if let Some(status) = gone(&snap) {
                let _ = tx.send(Err(status)).await;
                break;
            }
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
    Ok(Box::pin(ReceiverStream::new(out)))
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
        if let Some(status) = no_svid(&self.store.current()) {
            return Err(status);
        }
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
            no_svid,
            |s| match (&s.svid, &s.bundle) {
                (Some(v), Some(b)) => Some(format!("{}/{}", v.version, b.version)),
                _ => None,
            },
            |s| match (&s.svid, &s.bundle) {
                (Some(v), Some(b)) => Some(svid_response(v, b)),
                _ => None,
            },
        )?))
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
            no_bundle,
            |s| s.bundle.as_ref().map(|b| b.version.clone()),
            |s| s.bundle.as_deref().map(bundles_response),
        )?))
    }
}
