//! Envoy SDS v3 (`envoy.service.secret.v3.SecretDiscoveryService`) over a Unix socket.
//!
//! Resources: `default` (`tls_certificate`: inline chain + key) and `ROOTCA`
//! (`validation_context.trusted_ca`: inline bundle; plus, when the CA serves CRLs that
//! validated, `validation_context.crl`: the CRLs as concatenated PEM, and
//! `only_verify_leaf_cert_crl` when they do not cover every CA certificate of the agent's
//! chains), all PEM in `inline_bytes` as Istio's agent sends them. The `ROOTCA` version is
//! the root-set digest, followed by `-crl-<etag>` (and `-leaf`) while CRLs are served, so a
//! changed CRL set is a new version pushed on every open stream.
//!
//! xDS rules followed (envoy `api-docs/xds_protocol`):
//! - every response carries a fresh `nonce` and a `version_info` derived from the versions of
//!   the resources in it (leaf serial for `default`, root-set digest for `ROOTCA`), so
//!   versions are stable across agent restarts and equal content gives equal versions;
//! - a request whose `response_nonce` is not the last nonce sent on the stream is stale and
//!   ignored (Envoy will answer the newer response);
//! - a request with the last nonce and no `error_detail` is an ACK: nothing is sent until a
//!   subscribed resource changes;
//! - a NACK (`error_detail` set on a request carrying the last nonce sent on the stream) is
//!   counted and logged with its detail (cut to 256 characters, Debug-escaped, at WARN at
//!   most once per 10 s per stream); nothing is re-sent until the content changes, so a
//!   client that rejects a secret does not loop. An `error_detail` with an empty nonce
//!   answers nothing of ours: not a NACK, the request is served as an initial one;
//! - a request with an empty nonce (first on a stream, or after reconnect) or a changed set
//!   of names is answered with the full state of the subscribed resources;
//! - unknown names end the stream with `NOT_FOUND` naming the resource: Istio's agent also
//!   fails the stream when it cannot generate a requested secret, and Envoy retries with
//!   backoff; silently never answering would leave Envoy waiting on its init timeout.
//! - a response is only sent once every subscribed resource exists (before the first
//!   certificate arrives, the stream waits); when the certificate expires without renewal,
//!   streams holding `default` end with `UNAVAILABLE` (fail closed; delta streams get it in
//!   `removed_resources`).

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::Stream;
use rampart_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use rampart_proto::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use rampart_proto::sds::{ROOT_RESOURCE, SECRET_TYPE_URL, WORKLOAD_RESOURCE};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::Metrics;
use crate::state::{Bundle, SecretStore, ServedCrls, Snapshot, encode_validation_context};
use crate::throttle::{LogThrottle, StreamThrottle, truncated};

static NONCE: AtomicU64 = AtomicU64::new(1);

fn next_nonce() -> String {
    NONCE.fetch_add(1, Ordering::Relaxed).to_string()
}

/// The `ROOTCA` version and encoded secret for `bundle` with `crls`.
fn root_resource(bundle: &Bundle, crls: Option<&ServedCrls>) -> (String, Vec<u8>) {
    match crls.filter(|c| !c.set().is_empty()) {
        None => (bundle.version.clone(), bundle.sds_secret.clone()),
        Some(c) => (
            format!(
                "{}-crl-{}{}",
                bundle.version,
                c.set().etag(),
                if c.covers_chain() { "" } else { "-leaf" }
            ),
            encode_validation_context(bundle.pem.as_bytes(), Some(c)),
        ),
    }
}

/// The current version and encoded resource for `name`, if it is available.
fn resource(snap: &Snapshot, name: &str) -> Option<(String, prost_types::Any)> {
    match name {
        WORKLOAD_RESOURCE => snap.svid.as_ref().map(|s| {
            (
                s.version.clone(),
                prost_types::Any {
                    type_url: SECRET_TYPE_URL.to_owned(),
                    value: s.sds_secret.to_vec(),
                },
            )
        }),
        ROOT_RESOURCE => snap.bundle.as_ref().map(|b| {
            let (version, value) = root_resource(b, snap.crls.as_deref());
            (
                version,
                prost_types::Any {
                    type_url: SECRET_TYPE_URL.to_owned(),
                    value,
                },
            )
        }),
        _ => None,
    }
}

fn check_names<'a>(names: impl IntoIterator<Item = &'a String>) -> Result<(), Status> {
    for n in names {
        if n != WORKLOAD_RESOURCE && n != ROOT_RESOURCE {
            return Err(Status::not_found(format!(
                "unknown SDS resource {n:?}: this agent serves {WORKLOAD_RESOURCE:?} (workload \
                 certificate and key) and {ROOT_RESOURCE:?} (trust bundle)"
            )));
        }
    }
    Ok(())
}

fn check_type(type_url: &str) -> Result<(), Status> {
    if type_url.is_empty() || type_url == SECRET_TYPE_URL {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "type_url {type_url:?} is not {SECRET_TYPE_URL:?}"
        )))
    }
}

/// The SDS service for one workload identity.
#[derive(Debug, Clone)]
pub struct SdsService {
    store: SecretStore,
    metrics: Arc<Metrics>,
    fetch_timeout: Duration,
    shutdown: CancellationToken,
}

// === impl SdsService ===

impl SdsService {
    /// Serve what `store` holds.
    pub fn new(store: SecretStore, metrics: Arc<Metrics>) -> Self {
        SdsService {
            store,
            metrics,
            fetch_timeout: Duration::from_secs(5),
            shutdown: CancellationToken::new(),
        }
    }

    /// End open streams (with `UNAVAILABLE`) when `token` is cancelled, so a graceful
    /// server shutdown does not wait for clients that never hang up.
    pub fn with_shutdown(mut self, token: CancellationToken) -> Self {
        self.shutdown = token;
        self
    }

    /// The tonic service.
    pub fn into_server(self) -> SecretDiscoveryServiceServer<Self> {
        SecretDiscoveryServiceServer::new(self)
    }
}

/// Decrements the open-streams gauge when a stream task ends.
struct StreamGauge(Arc<Metrics>);
impl StreamGauge {
    fn new(m: Arc<Metrics>) -> Self {
        m.sds_streams.inc();
        StreamGauge(m)
    }
}
impl Drop for StreamGauge {
    fn drop(&mut self) {
        self.0.sds_streams.dec();
    }
}

/// State of one state-of-the-world stream.
struct SotwStream {
    subscribed: BTreeSet<String>,
    last_nonce: Option<String>,
    /// Versions in the last response, by name.
    sent: BTreeMap<String, String>,
    nack_log: StreamThrottle,
    /// In front of `nack_log`: [`NACK_WARNINGS`] (tests: their own).
    nack_global: &'static LogThrottle,
}

/// How much of a client's NACK message (and node id, version, names) is logged.
const NACK_LOG_CHARS: usize = 256;
/// At most one NACK warning per stream in this time; the others are logged at DEBUG.
const NACK_LOG_EVERY: Duration = Duration::from_secs(10);
/// NACK lines at WARN over all streams of the process.
static NACK_WARNINGS: LogThrottle = LogThrottle::new(NACK_LOG_EVERY);

/// Whether `nonce` (a request's `response_nonce`) answers the last response of a stream:
/// only then is an `error_detail` a NACK of ours. A request with an empty nonce answers
/// nothing, and one with a stale nonce answers an older response.
fn answers_last(last_nonce: Option<&str>, nonce: &str) -> bool {
    !nonce.is_empty() && last_nonce == Some(nonce)
}

/// Log a NACK: everything the client wrote is cut to [`NACK_LOG_CHARS`] and Debug-escaped
/// (a newline in it cannot forge a log line), at WARN at most once per [`NACK_LOG_EVERY`]
/// per stream and at most once per [`NACK_LOG_EVERY`] over all streams ([`NACK_WARNINGS`]:
/// opening new streams does not buy new lines); the rest at DEBUG.
#[allow(clippy::too_many_arguments)]
fn log_nack(
    throttle: &mut StreamThrottle,
    global: &LogThrottle,
    what: &str,
    node: &str,
    version: &str,
    nonce: &str,
    names: &[String],
    err: &rampart_proto::google::rpc::Status,
) {
    let node = truncated(node, NACK_LOG_CHARS);
    let version = truncated(version, NACK_LOG_CHARS);
    let names = format!("{names:?}");
    let names = truncated(&names, NACK_LOG_CHARS);
    let message = truncated(&err.message, NACK_LOG_CHARS);
    let allowed = throttle
        .allow_at(std::time::Instant::now())
        .and_then(|dropped| global.allow().map(|elsewhere| (dropped, elsewhere)));
    match allowed {
        Some((dropped, elsewhere)) => tracing::warn!(
            node = ?node,
            version = ?version,
            nonce = ?nonce,
            resources = %names,
            code = err.code,
            message = ?message,
            dropped,
            dropped_all_streams = elsewhere,
            "{what}: client rejected (NACK) our secrets (at most one such line per 10 s per \
             stream and per agent; `dropped` counts those left out)"
        ),
        None => tracing::debug!(
            node = ?node,
            version = ?version,
            code = err.code,
            message = ?message,
            "{what}: client rejected (NACK) our secrets"
        ),
    }
}

enum Step {
    Continue,
    Send(DiscoveryResponse),
}

// === impl SotwStream ===

impl SotwStream {
    fn new(subscribed: BTreeSet<String>) -> Self {
        SotwStream {
            subscribed,
            last_nonce: None,
            sent: BTreeMap::new(),
            nack_log: StreamThrottle::new(NACK_LOG_EVERY),
            nack_global: &NACK_WARNINGS,
        }
    }

    /// `req` rejects the last response sent on this stream.
    fn is_nack(&self, req: &DiscoveryRequest) -> bool {
        req.error_detail.is_some() && answers_last(self.last_nonce.as_deref(), &req.response_nonce)
    }

    fn on_request(&mut self, req: &DiscoveryRequest, snap: &Snapshot) -> Result<Step, Status> {
        check_type(&req.type_url)?;
        let node = req.node.as_ref().map(|n| n.id.as_str()).unwrap_or("");
        if !req.response_nonce.is_empty()
            && self.last_nonce.as_deref() != Some(req.response_nonce.as_str())
        {
            tracing::debug!(
                node = ?truncated(node, NACK_LOG_CHARS),
                nonce = ?truncated(&req.response_nonce, NACK_LOG_CHARS),
                "SDS: ignoring request with stale nonce"
            );
            return Ok(Step::Continue);
        }
        if let Some(err) = &req.error_detail {
            if self.is_nack(req) {
                log_nack(
                    &mut self.nack_log,
                    self.nack_global,
                    "SDS",
                    node,
                    &req.version_info,
                    &req.response_nonce,
                    &req.resource_names,
                    err,
                );
                return Ok(Step::Continue);
            }
            // An empty nonce answers no response of ours: not a NACK (Envoy never sends
            // one); the request is taken as the initial request it is.
            tracing::debug!(
                node = ?truncated(node, NACK_LOG_CHARS),
                "SDS: error_detail on a request answering no response; ignored"
            );
        }
        check_names(&req.resource_names)?;
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        let initial = req.response_nonce.is_empty();
        if !initial && names == self.subscribed {
            tracing::trace!(node, version = %req.version_info, "SDS: ACK");
            return Ok(Step::Continue);
        }
        self.subscribed = names;
        self.sent.clear();
        self.maybe_push(snap, true)
    }

    /// A response with every subscribed resource, if all exist and (unless `force`) one of
    /// them changed since the last response.
    fn maybe_push(&mut self, snap: &Snapshot, force: bool) -> Result<Step, Status> {
        if self.subscribed.is_empty() {
            return Ok(Step::Continue);
        }
        if self.sent.contains_key(WORKLOAD_RESOURCE) && snap.svid.is_none() {
            let why = snap.withdrawn.as_deref().unwrap_or("expired");
            return Err(Status::unavailable(format!(
                "workload certificate {why} and could not be renewed yet; the agent no longer \
                 serves it (fail closed)"
            )));
        }
        let mut versions = BTreeMap::new();
        let mut resources = Vec::with_capacity(self.subscribed.len());
        for name in &self.subscribed {
            match resource(snap, name) {
                Some((v, any)) => {
                    versions.insert(name.clone(), v);
                    resources.push(any);
                }
                // Not available yet: wait for the store to change.
                None => return Ok(Step::Continue),
            }
        }
        if !force && versions == self.sent {
            return Ok(Step::Continue);
        }
        let version_info = versions
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let nonce = next_nonce();
        self.last_nonce = Some(nonce.clone());
        self.sent = versions;
        Ok(Step::Send(DiscoveryResponse {
            version_info,
            resources,
            type_url: SECRET_TYPE_URL.to_owned(),
            nonce,
            ..Default::default()
        }))
    }
}

/// State of one delta stream.
struct DeltaStream {
    subscribed: BTreeSet<String>,
    /// What the client holds, by name.
    has: BTreeMap<String, String>,
    last_nonce: Option<String>,
    nack_log: StreamThrottle,
    /// In front of `nack_log`: [`NACK_WARNINGS`] (tests: their own).
    nack_global: &'static LogThrottle,
}

// === impl DeltaStream ===

impl DeltaStream {
    fn new() -> Self {
        DeltaStream {
            subscribed: BTreeSet::new(),
            has: BTreeMap::new(),
            last_nonce: None,
            nack_log: StreamThrottle::new(NACK_LOG_EVERY),
            nack_global: &NACK_WARNINGS,
        }
    }

    /// `req` rejects the last response sent on this stream.
    fn is_nack(&self, req: &DeltaDiscoveryRequest) -> bool {
        req.error_detail.is_some() && answers_last(self.last_nonce.as_deref(), &req.response_nonce)
    }

    fn on_request(&mut self, req: &DeltaDiscoveryRequest) -> Result<(), Status> {
        check_type(&req.type_url)?;
        let node = req.node.as_ref().map(|n| n.id.as_str()).unwrap_or("");
        if !req.response_nonce.is_empty() {
            if self.last_nonce.as_deref() != Some(req.response_nonce.as_str()) {
                tracing::debug!(
                    node = ?truncated(node, NACK_LOG_CHARS),
                    nonce = ?truncated(&req.response_nonce, NACK_LOG_CHARS),
                    "SDS delta: stale nonce"
                );
            } else if let Some(err) = &req.error_detail {
                log_nack(
                    &mut self.nack_log,
                    self.nack_global,
                    "SDS delta",
                    node,
                    "",
                    &req.response_nonce,
                    &req.resource_names_subscribe,
                    err,
                );
            }
        }
        check_names(&req.resource_names_subscribe)?;
        if self.last_nonce.is_none() {
            for (n, v) in &req.initial_resource_versions {
                self.has.insert(n.clone(), v.clone());
            }
        }
        for n in &req.resource_names_subscribe {
            self.subscribed.insert(n.clone());
        }
        for n in &req.resource_names_unsubscribe {
            self.subscribed.remove(n);
            self.has.remove(n);
        }
        Ok(())
    }

    fn maybe_push(&mut self, snap: &Snapshot) -> Option<DeltaDiscoveryResponse> {
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        for name in &self.subscribed {
            match resource(snap, name) {
                Some((v, any)) => {
                    if self.has.get(name) != Some(&v) {
                        self.has.insert(name.clone(), v.clone());
                        resources.push(Resource {
                            version: v,
                            resource: Some(any),
                            name: name.clone(),
                            ..Default::default()
                        });
                    }
                }
                None => {
                    if self.has.remove(name).is_some() {
                        removed.push(name.clone());
                    }
                }
            }
        }
        if resources.is_empty() && removed.is_empty() {
            return None;
        }
        let nonce = next_nonce();
        self.last_nonce = Some(nonce.clone());
        Some(DeltaDiscoveryResponse {
            system_version_info: String::new(),
            resources,
            type_url: SECRET_TYPE_URL.to_owned(),
            nonce,
            removed_resources: removed,
            ..Default::default()
        })
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Drive one stream: requests from the client and changes of the store, one task.
async fn run_sotw(
    mut inbound: Streaming<DiscoveryRequest>,
    mut rx: watch::Receiver<Snapshot>,
    out: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let _gauge = StreamGauge::new(metrics.clone());
    let mut st = SotwStream::new(BTreeSet::new());
    loop {
        let step = tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    if st.is_nack(&req) {
                        metrics.sds_nacks.inc();
                    }
                    // `borrow`, not `borrow_and_update`: a change that raced with this request
                    // (e.g. an ACK of the previous version) must still wake the push branch.
                    let snap = rx.borrow().clone();
                    st.on_request(&req, &snap)
                }
                Ok(None) | Err(_) => return,
            },
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let snap = rx.borrow_and_update().clone();
                st.maybe_push(&snap, false)
            }
            _ = out.closed() => return,
            _ = shutdown.cancelled() => Err(Status::unavailable("node agent shutting down")),
        };
        match step {
            Ok(Step::Continue) => {}
            Ok(Step::Send(resp)) => {
                metrics.sds_pushes.inc();
                if out.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
            Err(status) => {
                let _ = out.send(Err(status)).await;
                return;
            }
        }
    }
}

async fn run_delta(
    mut inbound: Streaming<DeltaDiscoveryRequest>,
    mut rx: watch::Receiver<Snapshot>,
    out: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let _gauge = StreamGauge::new(metrics.clone());
    let mut st = DeltaStream::new();
    loop {
        let snap = tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    if st.is_nack(&req) {
                        metrics.sds_nacks.inc();
                    }
                    if let Err(status) = st.on_request(&req) {
                        let _ = out.send(Err(status)).await;
                        return;
                    }
                    rx.borrow_and_update().clone()
                }
                Ok(None) | Err(_) => return,
            },
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
                rx.borrow_and_update().clone()
            }
            _ = out.closed() => return,
            _ = shutdown.cancelled() => {
                let _ = out.send(Err(Status::unavailable("node agent shutting down"))).await;
                return;
            }
        };
        if let Some(resp) = st.maybe_push(&snap) {
            metrics.sds_pushes.inc();
            if out.send(Ok(resp)).await.is_err() {
                return;
            }
        }
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for SdsService {
    type DeltaSecretsStream = BoxStream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = BoxStream<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(run_delta(
            request.into_inner(),
            self.store.subscribe(),
            tx,
            self.metrics.clone(),
            self.shutdown.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(run_sotw(
            request.into_inner(),
            self.store.subscribe(),
            tx,
            self.metrics.clone(),
            self.shutdown.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let req = request.into_inner();
        check_type(&req.type_url)?;
        check_names(&req.resource_names)?;
        if req.resource_names.is_empty() {
            return Err(Status::invalid_argument(
                "FetchSecrets needs resource_names (\"default\" and/or \"ROOTCA\")",
            ));
        }
        let mut st = SotwStream::new(req.resource_names.iter().cloned().collect());
        let mut rx = self.store.subscribe();
        let wait = async {
            loop {
                let snap = rx.borrow_and_update().clone();
                if let Step::Send(resp) = st.maybe_push(&snap, true)? {
                    return Ok(resp);
                }
                if rx.changed().await.is_err() {
                    return Err(Status::unavailable("agent shutting down"));
                }
            }
        };
        match tokio::time::timeout(self.fetch_timeout, wait).await {
            Ok(Ok(resp)) => Ok(Response::new(resp)),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(Status::unavailable(
                "no certificate available yet (the CA has not issued one); retry",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use prost::Message;
    use rampart_proto::envoy::config::core::v3::{DataSource, data_source::Specifier};
    use rampart_proto::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};

    use rampart_certs::{
        CertificateAuthority, KeyAlgorithm, PrivateKey, RootParams, SpiffeId, TrustBundle,
    };

    use super::*;
    use crate::state::Svid;

    fn snapshot(ca: &CertificateAuthority) -> Snapshot {
        let id = SpiffeId::istio(&"cluster.local".parse().unwrap(), "a", "b").unwrap();
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let leaf = ca
            .issue_workload(
                &key.public_key_spki_der(),
                &id,
                Duration::from_secs(60),
                SystemTime::now(),
            )
            .unwrap();
        Snapshot {
            svid: Some(Arc::new(
                Svid::new(id.clone(), vec![leaf], key, SystemTime::now()).unwrap(),
            )),
            bundle: Some(Arc::new(Bundle::new(
                id.trust_domain().clone(),
                TrustBundle::from_der(vec![ca.cert().clone()]).unwrap(),
            ))),
            withdrawn: None,
            crls: None,
        }
    }

    fn req(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            type_url: SECRET_TYPE_URL.into(),
            version_info: version.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn sent(step: Step) -> DiscoveryResponse {
        match step {
            Step::Send(r) => r,
            Step::Continue => panic!("expected a response"),
        }
    }

    fn quiet(step: Step) {
        assert!(matches!(step, Step::Continue), "expected no response");
    }

    #[test]
    fn sotw_ack_nack_stale_and_changes() {
        let ca = CertificateAuthority::self_signed_root(
            &RootParams::default(),
            PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
            SystemTime::now(),
        )
        .unwrap();
        let snap1 = snapshot(&ca);
        let mut st = SotwStream::new(BTreeSet::new());
        let names = ["default", "ROOTCA"];
        // Initial request: both resources.
        let r1 = sent(st.on_request(&req(&names, "", ""), &snap1).unwrap());
        assert_eq!(r1.resources.len(), 2);
        assert!(r1.version_info.starts_with("ROOTCA=") && r1.version_info.contains(",default="));
        // ACK: nothing.
        quiet(
            st.on_request(&req(&names, &r1.version_info, &r1.nonce), &snap1)
                .unwrap(),
        );
        // Same state pushed again: nothing (versions unchanged).
        quiet(st.maybe_push(&snap1, false).unwrap());
        // NACK: logged, nothing re-sent.
        let mut nack = req(&names, "", &r1.nonce);
        nack.error_detail = error_detail("bad");
        quiet(st.on_request(&nack, &snap1).unwrap());
        // Stale nonce, even with a different name set: ignored.
        quiet(st.on_request(&req(&["ROOTCA"], "", "old"), &snap1).unwrap());
        // Rotation: pushed with a new version and nonce.
        let mut snap2 = snapshot(&ca);
        snap2.bundle = snap1.bundle.clone();
        let r2 = sent(st.maybe_push(&snap2, false).unwrap());
        assert_ne!(r2.version_info, r1.version_info);
        assert_ne!(r2.nonce, r1.nonce);
        // Name change with the current nonce: answered with the new set only.
        let r3 = sent(
            st.on_request(&req(&["ROOTCA"], &r2.version_info, &r2.nonce), &snap2)
                .unwrap(),
        );
        assert_eq!(r3.resources.len(), 1);
        assert!(r3.version_info.starts_with("ROOTCA="));
        // Leaf rotation does not disturb a ROOTCA-only stream (same roots, same version).
        quiet(st.maybe_push(&snapshot(&ca), false).unwrap());
        // Unknown name: NOT_FOUND; wrong type: INVALID_ARGUMENT.
        let e = st.on_request(&req(&["x"], "", ""), &snap2).err().unwrap();
        assert_eq!(e.code(), tonic::Code::NotFound);
        let mut bad = req(&names, "", "");
        bad.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        assert_eq!(
            st.on_request(&bad, &snap2).err().unwrap().code(),
            tonic::Code::InvalidArgument
        );
    }

    /// What the WARN-level log says while `f` runs.
    fn warnings(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buf {
            type Writer = Buf;
            fn make_writer(&'a self) -> Buf {
                self.clone()
            }
        }
        let buf = Buf::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(buf.clone())
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(sub, f);
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    fn error_detail(message: &str) -> Option<rampart_proto::google::rpc::Status> {
        Some(rampart_proto::google::rpc::Status {
            code: 3,
            message: message.into(),
            details: vec![],
        })
    }

    /// Before, a request with an empty nonce skipped the stale-nonce check, so any
    /// `error_detail` was logged at WARN as a NACK, unescaped and whole: newlines forged log
    /// lines and 20 requests wrote 60 MiB. Now only a request answering the last response
    /// is a NACK (counted, logged); its text is cut and escaped, and one stream gets one
    /// WARN per 10 s. Twin: the same detail with an empty nonce is no NACK, logs no WARN,
    /// and the request is served as the initial request it is.
    #[test]
    fn only_a_nack_of_our_last_response_is_logged_cut_escaped_and_rate_limited() {
        let ca = CertificateAuthority::self_signed_root(
            &RootParams::default(),
            PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
            SystemTime::now(),
        )
        .unwrap();
        let snap = snapshot(&ca);
        let forged = format!(
            "bad\n2026-01-01T00:00:00Z ERROR forged line{}",
            "x".repeat(100_000)
        );

        let mut st = SotwStream::new(BTreeSet::new());
        st.nack_global = fresh_global();
        let mut first = req(&["default"], "", "");
        first.error_detail = error_detail(&forged);
        assert!(!st.is_nack(&first));
        let mut step = None;
        let log = warnings(|| step = Some(st.on_request(&first, &snap).unwrap()));
        assert!(log.is_empty(), "{log}");
        let r1 = sent(step.unwrap());

        let mut nack = req(&["default"], &r1.version_info, &r1.nonce);
        nack.error_detail = error_detail(&forged);
        assert!(st.is_nack(&nack));
        let log = warnings(|| {
            for _ in 0..20 {
                quiet(st.on_request(&nack, &snap).unwrap());
            }
        });
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(log.contains("NACK") && log.contains("bad\\n2026"), "{log}");
        assert!(log.len() < 2048, "{} bytes logged", log.len());
        // A stale nonce with a detail is not a NACK either.
        let mut stale = req(&["default"], "", "0");
        stale.error_detail = error_detail("old");
        assert!(!st.is_nack(&stale));

        // Delta: the same rule (it had it already) and the same cut and escaping.
        let mut delta = DeltaStream::new();
        delta.nack_global = fresh_global();
        let mut d = DeltaDiscoveryRequest {
            type_url: SECRET_TYPE_URL.into(),
            resource_names_subscribe: vec!["default".into()],
            error_detail: error_detail(&forged),
            ..Default::default()
        };
        assert!(!delta.is_nack(&d));
        assert!(warnings(|| delta.on_request(&d).unwrap()).is_empty());
        let r = delta.maybe_push(&snap).unwrap();
        d.response_nonce = r.nonce;
        assert!(delta.is_nack(&d));
        let log = warnings(|| {
            delta.on_request(&d).unwrap();
            delta.on_request(&d).unwrap();
        });
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(log.len() < 2048, "{} bytes logged", log.len());
    }

    /// A process-wide throttle of its own (the real one is shared by every test).
    fn fresh_global() -> &'static LogThrottle {
        Box::leak(Box::new(LogThrottle::new(NACK_LOG_EVERY)))
    }

    /// Each stream had a throttle of its own only, so a client opening 100 streams and
    /// NACKing once on each got 100 WARN lines. Now one process-wide throttle stands in
    /// front: one line. Twin: streams under different process-wide throttles (as the
    /// agent's before) log one line each, so it is that throttle which holds them back.
    #[test]
    fn new_streams_do_not_buy_new_nack_warnings() {
        let ca = CertificateAuthority::self_signed_root(
            &RootParams::default(),
            PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
            SystemTime::now(),
        )
        .unwrap();
        let snap = snapshot(&ca);
        let nack_on_new_streams = |global: &dyn Fn() -> &'static LogThrottle| {
            warnings(|| {
                for _ in 0..100 {
                    let mut st = SotwStream::new(BTreeSet::new());
                    st.nack_global = global();
                    let r = sent(st.on_request(&req(&["default"], "", ""), &snap).unwrap());
                    let mut nack = req(&["default"], &r.version_info, &r.nonce);
                    nack.error_detail = error_detail("rejected");
                    quiet(st.on_request(&nack, &snap).unwrap());
                }
            })
        };
        let shared = fresh_global();
        let log = nack_on_new_streams(&|| shared);
        assert_eq!(log.lines().count(), 1, "{log}");
        let log = nack_on_new_streams(&fresh_global);
        assert_eq!(log.lines().count(), 100);
    }

    /// (trusted_ca, crl, only_verify_leaf_cert_crl) of an encoded `ROOTCA`.
    fn rootca_fields(any: &prost_types::Any) -> (Vec<u8>, Option<Vec<u8>>, bool) {
        let bytes = |d: &Option<DataSource>| match d {
            Some(DataSource {
                specifier: Some(Specifier::InlineBytes(b)),
            }) => Some(b.clone()),
            _ => None,
        };
        match Secret::decode(any.value.as_slice()).unwrap().r#type {
            Some(secret::Type::ValidationContext(v)) => (
                bytes(&v.trusted_ca).expect("trusted_ca inline"),
                bytes(&v.crl),
                v.only_verify_leaf_cert_crl,
            ),
            other => panic!("not a validation context: {other:?}"),
        }
    }

    #[test]
    fn rootca_carries_the_crls_and_changes_version_with_them() {
        let ca = CertificateAuthority::self_signed_root(
            &RootParams::default(),
            PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
            SystemTime::now(),
        )
        .unwrap();
        let mut snap = snapshot(&ca);
        let mut st = SotwStream::new(BTreeSet::new());
        let mut delta = DeltaStream {
            subscribed: ["ROOTCA".to_string()].into(),
            ..DeltaStream::new()
        };
        let d1 = delta.maybe_push(&snap).expect("initial delta response");
        let r1 = sent(st.on_request(&req(&["ROOTCA"], "", ""), &snap).unwrap());
        let (roots, crl0, leaf0) = rootca_fields(&r1.resources[0]);
        assert!(crl0.is_none() && !leaf0);
        let now = SystemTime::now();
        let crl = ca
            .sign_crl(&rampart_certs::CrlParams {
                this_update: now,
                next_update: now + Duration::from_secs(600),
                crl_number: 1,
                revoked: vec![],
            })
            .unwrap();
        let set = rampart_certs::CrlSet::new(
            vec![crl.clone()],
            &[ca.cert().clone()],
            now,
            rampart_certs::CrlExpiry::Refuse,
        )
        .unwrap();
        snap.crls = Some(Arc::new(ServedCrls::new(set.clone(), true)));
        let r2 = sent(st.maybe_push(&snap, false).unwrap());
        assert_ne!(r2.version_info, r1.version_info);
        // Delta streams get the new ROOTCA too, once.
        let d2 = delta
            .maybe_push(&snap)
            .expect("delta push of the CRL change");
        assert_ne!(d2.resources[0].version, d1.resources[0].version);
        assert!(delta.maybe_push(&snap).is_none());
        let (roots2, crl2, leaf2) = rootca_fields(&r2.resources[0]);
        assert_eq!(crl2.as_deref(), Some(crl.to_pem().as_bytes()));
        assert!(!leaf2);
        assert_eq!(roots2, roots);
        // Same set again: nothing. Not covering the chain: leaf only, a new version.
        quiet(st.maybe_push(&snap, false).unwrap());
        snap.crls = Some(Arc::new(ServedCrls::new(set, false)));
        let r3 = sent(st.maybe_push(&snap, false).unwrap());
        assert!(rootca_fields(&r3.resources[0]).2);
        // No CRL any more: the plain bundle again, with its plain version.
        snap.crls = Some(Arc::new(ServedCrls::new(
            rampart_certs::CrlSet::empty(),
            false,
        )));
        let r4 = sent(st.maybe_push(&snap, false).unwrap());
        assert_eq!(r4.version_info, r1.version_info);
        assert!(rootca_fields(&r4.resources[0]).1.is_none());
    }

    #[test]
    fn sotw_waits_for_missing_resources_and_fails_closed_on_expiry() {
        let ca = CertificateAuthority::self_signed_root(
            &RootParams::default(),
            PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
            SystemTime::now(),
        )
        .unwrap();
        let mut st = SotwStream::new(BTreeSet::new());
        // Nothing issued yet: the request waits.
        quiet(
            st.on_request(&req(&["default"], "", ""), &Snapshot::default())
                .unwrap(),
        );
        let snap = snapshot(&ca);
        let r = sent(st.maybe_push(&snap, false).unwrap());
        assert_eq!(r.resources.len(), 1);
        // The certificate was withdrawn (expired): the stream ends UNAVAILABLE.
        let gone = Snapshot {
            svid: None,
            bundle: snap.bundle.clone(),
            withdrawn: Some("expired".into()),
            crls: None,
        };
        let e = st.maybe_push(&gone, false).err().unwrap();
        assert_eq!(e.code(), tonic::Code::Unavailable);
    }
}
