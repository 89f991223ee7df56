//! A STAND-IN SDS server for tests and benchmarks: a small tonic server on a Unix socket that
//! serves `default` (a workload certificate issued from an in-memory
//! `rampart_certs::CertificateAuthority`) and `ROOTCA`, so the proxy's own tests can run
//! without the node agent crate (the proxy never depends on it); the end-to-end tests of the
//! whole mesh use the real agent. It can also push what a correct agent never would. It speaks the wire protocol the proxy expects (state-of-the-world
//! `StreamSecrets`, versions, nonces) and records every ACK/NACK the proxy sends.
#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prost::Message;
use rampart_certs::{
    CertificateAuthority, KeyAlgorithm, PrivateKey, RootParams, SpiffeId, certs_to_pem,
};
use rampart_proto::envoy::config::core::v3::{DataSource, data_source::Specifier};
use rampart_proto::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, SECRET_TYPE_URL, Secret, TlsCertificate, secret,
};
use rampart_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use rampart_proto::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// The secrets served at one moment.
#[derive(Clone)]
pub struct Secrets {
    pub version: u64,
    pub chain_pem: String,
    pub key_pem: String,
    pub bundle_pem: String,
    /// CRLs (PEM) served in `ROOTCA`'s `validation_context.crl`; empty: none.
    pub crl_pem: String,
}

/// What the proxy answered to a push.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Ack { resource: String, version: String },
    Nack { resource: String, message: String },
}

/// A CA that issues workload certificates.
pub struct TestCa {
    pub ca: CertificateAuthority,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let params = RootParams {
            common_name: name.into(),
            ..RootParams::default()
        };
        TestCa {
            ca: CertificateAuthority::self_signed_root(&params, key, SystemTime::now()).unwrap(),
        }
    }

    pub fn root_pem(&self) -> String {
        certs_to_pem(&[self.ca.root().clone()])
    }

    /// A leaf for `id` with a fresh key: (chain PEM, key PEM).
    pub fn issue(&self, id: &str, ttl: Duration) -> (String, String) {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let id = SpiffeId::parse(id).unwrap();
        let leaf = self
            .ca
            .issue_workload(&key.public_key_spki_der(), &id, ttl, SystemTime::now())
            .unwrap();
        let mut chain = vec![leaf];
        chain.extend(
            self.ca
                .chain_to_root()
                .into_iter()
                .filter(|c| c != self.ca.root()),
        );
        (certs_to_pem(&chain), key.to_pkcs8_pem().to_string())
    }

    pub fn secrets(&self, id: &str, version: u64) -> Secrets {
        let (chain_pem, key_pem) = self.issue(id, Duration::from_secs(3600));
        Secrets {
            version,
            chain_pem,
            key_pem,
            bundle_pem: self.root_pem(),
            crl_pem: String::new(),
        }
    }
}

pub struct StandIn {
    pub tx: watch::Sender<Option<Secrets>>,
    pub replies: Arc<Mutex<Vec<Reply>>>,
}

struct Svc {
    rx: watch::Receiver<Option<Secrets>>,
    replies: Arc<Mutex<Vec<Reply>>>,
}

fn inline(s: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(s.as_bytes().to_vec())),
    })
}

fn response(name: &str, s: &Secrets, nonce: u64) -> DiscoveryResponse {
    let secret = match name {
        "default" => Secret {
            name: name.into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline(&s.chain_pem),
                private_key: inline(&s.key_pem),
                ..Default::default()
            })),
        },
        _ => Secret {
            name: name.into(),
            r#type: Some(secret::Type::ValidationContext(
                CertificateValidationContext {
                    trusted_ca: inline(&s.bundle_pem),
                    crl: (!s.crl_pem.is_empty())
                        .then(|| inline(&s.crl_pem))
                        .flatten(),
                    ..Default::default()
                },
            )),
        },
    };
    DiscoveryResponse {
        version_info: s.version.to_string(),
        resources: vec![prost_types::Any {
            type_url: SECRET_TYPE_URL.into(),
            value: secret.encode_to_vec(),
        }],
        type_url: SECRET_TYPE_URL.into(),
        nonce: format!("n{nonce}"),
        ..Default::default()
    }
}

type RespStream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SecretDiscoveryService for Svc {
    type DeltaSecretsStream = RespStream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = RespStream<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented("stand-in: StreamSecrets only"))
    }

    async fn fetch_secrets(
        &self,
        _: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented("stand-in: StreamSecrets only"))
    }

    async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let mut inbound = req.into_inner();
        let mut rx = self.rx.clone();
        let replies = self.replies.clone();
        let (tx, out) = mpsc::channel(4);
        tokio::spawn(async move {
            let Ok(Some(first)) = inbound.message().await else {
                return;
            };
            let name = first.resource_names.first().cloned().unwrap_or_default();
            let mut nonce = 0u64;
            let mut sent_version = None;
            loop {
                let current = rx.borrow_and_update().clone();
                if let Some(s) = current
                    && sent_version != Some(s.version)
                {
                    nonce += 1;
                    sent_version = Some(s.version);
                    if tx.send(Ok(response(&name, &s, nonce))).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(r)) => {
                            let reply = match r.error_detail {
                                Some(e) => Reply::Nack { resource: name.clone(), message: e.message },
                                None => Reply::Ack { resource: name.clone(), version: r.version_info },
                            };
                            replies.lock().unwrap().push(reply);
                        }
                        _ => return,
                    },
                    c = rx.changed() => if c.is_err() { return },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }
}

/// Serve on `socket` until the runtime stops. Push new secrets with `tx.send(Some(..))`.
pub fn start(socket: &Path, initial: Option<Secrets>) -> StandIn {
    let (tx, rx) = watch::channel(initial);
    let replies = Arc::new(Mutex::new(Vec::new()));
    let svc = Svc {
        rx,
        replies: replies.clone(),
    };
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(SecretDiscoveryServiceServer::new(svc))
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await
            .unwrap();
    });
    StandIn { tx, replies }
}

impl TestCa {
    /// Load a root written by `rampart certs root --out DIR`.
    pub fn from_dir(dir: &Path) -> TestCa {
        let cert = rampart_certs::parse_certs_pem(
            &std::fs::read_to_string(dir.join("root-cert.pem")).unwrap(),
        )
        .unwrap()
        .remove(0);
        let key = PrivateKey::from_pem(&std::fs::read_to_string(dir.join("root-key.pem")).unwrap())
            .unwrap();
        TestCa {
            ca: CertificateAuthority::new(cert, key, Vec::new()).unwrap(),
        }
    }
}
