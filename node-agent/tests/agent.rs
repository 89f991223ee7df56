//! End-to-end tests of the node agent against the FAKE in-process CA (see common/mod.rs),
//! with real clients where the issue asks for them (Python grpcio + xds-protos, py-spiffe).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use rampart_certs::CertInfo;
use rampart_node_agent::{Agent, SecretKind, ServedSecret, fetch_secrets};
use rampart_proto::envoy::extensions::transport_sockets::tls::v3::SECRET_TYPE_URL;
use rampart_proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use rampart_proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(60);

fn default_of(s: &[ServedSecret]) -> &ServedSecret {
    s.iter()
        .find(|s| s.kind == SecretKind::CertChain)
        .expect("default served")
}

fn rootca_of(s: &[ServedSecret]) -> &ServedSecret {
    s.iter()
        .find(|s| s.kind == SecretKind::Ca)
        .expect("ROOTCA served")
}

/// Write the fake CA's first root plus `more` to the agent's `--ca-root` file (atomically).
fn trust_roots(ca: &FakeCa, more: &[rampart_certs::CertificateDer<'static>]) {
    let mut all = vec![ca.first_root.clone()];
    all.extend_from_slice(more);
    let tmp = ca.root_file.with_extension("tmp");
    std::fs::write(&tmp, rampart_certs::certs_to_pem(&all)).unwrap();
    std::fs::rename(&tmp, &ca.root_file).unwrap();
}

async fn serial(sock: &std::path::Path) -> String {
    let s = fetch_secrets(sock, Duration::from_secs(10)).await.unwrap();
    default_of(&s).certs[0].serial_hex.clone()
}

/// A raw SDS stream (Rust tonic client) for tests that watch pushes.
struct RawStream {
    tx: tokio::sync::mpsc::Sender<DiscoveryRequest>,
    rx: tonic::Streaming<DiscoveryResponse>,
}

impl RawStream {
    async fn open(sock: &std::path::Path, names: &[&str]) -> RawStream {
        let ch = rampart_node_agent::connect_unix(sock).await.unwrap();
        let mut client = SecretDiscoveryServiceClient::new(ch);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let s = RawStream {
            tx,
            rx: client
                .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner(),
        };
        s.send(names, "", "").await;
        s
    }
    async fn send(&self, names: &[&str], version: &str, nonce: &str) {
        self.tx
            .send(DiscoveryRequest {
                resource_names: names.iter().map(|s| s.to_string()).collect(),
                type_url: SECRET_TYPE_URL.into(),
                version_info: version.into(),
                response_nonce: nonce.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    async fn next(&mut self, within: Duration) -> Option<Result<DiscoveryResponse, tonic::Status>> {
        match tokio::time::timeout(within, self.rx.message()).await {
            Err(_) => None,
            Ok(Ok(Some(r))) => Some(Ok(r)),
            Ok(Ok(None)) => Some(Err(tonic::Status::cancelled("stream ended"))),
            Ok(Err(s)) => Some(Err(s)),
        }
    }
}

fn decode(resp: &DiscoveryResponse) -> Vec<ServedSecret> {
    resp.resources
        .iter()
        .map(|a| rampart_node_agent::decode_secret(a, &resp.version_info).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sds_client_gets_default_and_rootca_then_a_rotation_push() {
    tokio::time::timeout(T, async {
        // 4 s certificates: refresh about every 2 s.
        let Bed {
            dir: _dir,
            ca,
            cfg,
            sock,
        } = bed(Duration::from_secs(4)).await;
        let out = cfg.workloads[0].output_dir.clone().unwrap();
        let sd = CancellationToken::new();
        let running = Agent::new(cfg).unwrap().start(sd.clone()).await.unwrap();

        let lines = run_py(
            "sds_client.py",
            &[sock.to_str().unwrap(), "rotate"],
            Duration::from_secs(45),
        )
        .await;
        let first = event(&lines, "first");
        let d = &first["secrets"]["default"];
        assert_eq!(first["type_url"], SECRET_TYPE_URL);
        assert_eq!(d["kind"], "tls_certificate");
        assert_eq!(
            d["uris"],
            serde_json::json!(["spiffe://cluster.local/ns/shop/sa/cart"])
        );
        assert_eq!(d["key_matches"], true);
        assert_eq!(d["chain_len"], 2, "leaf + intermediate, no root");
        let r = &first["secrets"]["ROOTCA"];
        assert_eq!(r["kind"], "validation_context");
        assert_eq!(r["roots"].as_array().unwrap().len(), 1);
        let pushed = event(&lines, "pushed");
        assert_ne!(pushed["version"], first["version"]);
        assert_ne!(pushed["nonce"], first["nonce"]);
        assert_ne!(pushed["secrets"]["default"]["serial"], d["serial"]);
        assert_eq!(pushed["secrets"]["default"]["key_matches"], true);
        // NACK: logged, not re-sent in a loop. At most one response in 1.5 s (a regular
        // rotation of the 4 s certificate may fall in the window).
        let after = event(&lines, "after_nack")["responses"].as_u64().unwrap();
        assert!(after <= 1, "NACK caused {after} responses");

        // File output written atomically with the right modes, and matches what SDS serves.
        let key_mode = std::fs::metadata(out.join("key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(key_mode, 0o600);
        let chain = std::fs::read_to_string(out.join("cert-chain.pem")).unwrap();
        let leaf = CertInfo::parse(&rampart_certs::parse_certs_pem(&chain).unwrap()[0]).unwrap();
        assert_eq!(leaf.uri_sans, ["spiffe://cluster.local/ns/shop/sa/cart"]);
        let roots = std::fs::read_to_string(out.join("root-cert.pem")).unwrap();
        assert_eq!(
            rampart_certs::parse_certs_pem(&roots).unwrap(),
            vec![ca.first_root.clone()]
        );
        // The token was sent as a bearer token, and the clusterid header.
        assert!(ca.tokens().iter().all(|t| t.starts_with("Bearer ey")));
        assert!(ca.cluster_ids().iter().all(|c| c == "Kubernetes"));
        running.shutdown().await;
        assert!(!sock.exists(), "socket removed on shutdown");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sds_stale_nonce_ignored_and_unknown_resource_not_found() {
    tokio::time::timeout(T, async {
        let Bed {
            dir: _dir,
            ca: _ca,
            cfg,
            sock,
        } = bed(Duration::from_secs(3600)).await;
        let sd = CancellationToken::new();
        let running = Agent::new(cfg).unwrap().start(sd.clone()).await.unwrap();

        let lines = run_py(
            "sds_client.py",
            &[sock.to_str().unwrap(), "stale"],
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(event(&lines, "after_stale")["responses"], 0);
        let re = event(&lines, "resubscribed");
        let names: Vec<_> = re["secrets"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(names, ["ROOTCA"]);

        let lines = run_py(
            "sds_client.py",
            &[sock.to_str().unwrap(), "unknown"],
            Duration::from_secs(30),
        )
        .await;
        let e = event(&lines, "error");
        assert_eq!(e["code"], "NOT_FOUND");
        assert!(
            e["message"].as_str().unwrap().contains("no-such-secret"),
            "{e}"
        );
        running.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_fetches_x509_svid_and_bundle_and_header_is_required() {
    tokio::time::timeout(T, async {
        let dir = tempfile::tempdir().unwrap();
        let ca = FakeCa::start(dir.path()).await;
        let cfg = agent_config(
            dir.path(),
            &ca.addr.to_string(),
            &ca.root_file,
            Duration::from_secs(3600),
        );
        let wsock = cfg.workloads[0].workload_api_socket.clone().unwrap();
        let sd = CancellationToken::new();
        let running = Agent::new(cfg).unwrap().start(sd.clone()).await.unwrap();

        let lines = run_py(
            "workload_client.py",
            &[wsock.to_str().unwrap()],
            Duration::from_secs(30),
        )
        .await;
        let svid = event(&lines, "svid");
        assert_eq!(svid["spiffe_id"], "spiffe://cluster.local/ns/shop/sa/cart");
        assert_eq!(svid["key_matches"], true);
        assert_eq!(svid["chain_len"], 2);
        let b = event(&lines, "bundles");
        assert_eq!(b["trust_domains"], serde_json::json!(["cluster.local"]));
        assert_eq!(b["roots"], 1);
        let nh = event(&lines, "no_header");
        assert_eq!(nh["code"], "INVALID_ARGUMENT");
        let jwt = event(&lines, "jwt");
        assert_eq!(jwt["code"], "UNIMPLEMENTED");
        assert!(jwt["message"].as_str().unwrap().contains("X.509"), "{jwt}");
        running.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_stopped_mid_life_cert_still_served_then_renewed_when_ca_returns() {
    tokio::time::timeout(T, async {
        let Bed { dir: _dir, mut ca, cfg, sock } = bed(Duration::from_secs(8)).await;
        let sd = CancellationToken::new();
        let running = Agent::new(cfg).unwrap().start(sd.clone()).await.unwrap();
        let s1 = serial(&sock).await;
        ca.stop().await;
        let calls_at_stop = ca.calls();
        // Past the refresh point (~4 s) but before expiry (8 s): still the same cert.
        tokio::time::sleep(Duration::from_millis(5500)).await;
        let served = fetch_secrets(&sock, Duration::from_secs(5)).await.unwrap();
        let leaf = &default_of(&served).certs[0];
        assert_eq!(leaf.serial_hex, s1, "old certificate kept while the CA is down");
        assert!(leaf.not_after > std::time::SystemTime::now(), "and it is still valid");
        assert_eq!(ca.calls(), calls_at_stop);
        let m = running.metrics().render();
        assert!(m.contains("rampart_agent_ca_errors_total{spiffe_id=\"spiffe://cluster.local/ns/shop/sa/cart\",reason=\"unreachable\"}"), "{m}");
        ca.restart().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if serial(&sock).await != s1 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "no renewal after the CA came back");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        running.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_down_past_expiry_fails_closed_then_recovers() {
    tokio::time::timeout(T, async {
        let Bed {
            dir: _dir,
            mut ca,
            cfg,
            sock,
        } = bed(Duration::from_secs(3)).await;
        let out = cfg.workloads[0].output_dir.clone().unwrap();
        let sd = CancellationToken::new();
        let running = Agent::new(cfg).unwrap().start(sd.clone()).await.unwrap();
        let mut stream = RawStream::open(&sock, &["default"]).await;
        let first = stream.next(Duration::from_secs(10)).await.unwrap().unwrap();
        stream
            .send(&["default"], &first.version_info, &first.nonce)
            .await;
        ca.stop().await;
        // The open stream is ended with UNAVAILABLE when the certificate expires.
        let end = loop {
            match stream
                .next(Duration::from_secs(10))
                .await
                .expect("stream must end at expiry")
            {
                Ok(r) => stream.send(&["default"], &r.version_info, &r.nonce).await,
                Err(s) => break s,
            }
        };
        assert_eq!(end.code(), tonic::Code::Unavailable, "{end:?}");
        assert!(end.message().contains("expired"), "{end:?}");
        // New requests get nothing; files are gone.
        assert!(
            fetch_secrets(&sock, Duration::from_millis(800))
                .await
                .is_err()
        );
        assert!(!out.join("cert-chain.pem").exists() && !out.join("key.pem").exists());
        assert!(
            running
                .metrics()
                .render()
                .contains("rampart_agent_cert_expired_total")
        );
        ca.restart().await;
        let s = fetch_secrets(&sock, Duration::from_secs(10)).await.unwrap();
        assert!(default_of(&s).certs[0].not_after > std::time::SystemTime::now());
        running.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_returning_wrong_san_is_refused_and_old_cert_kept() {
    tokio::time::timeout(T, async {
        let Bed {
            dir: _dir,
            ca,
            cfg,
            sock,
        } = bed(Duration::from_secs(6)).await;
        let sd = CancellationToken::new();
        let running = Agent::new(cfg).unwrap().start(sd.clone()).await.unwrap();
        let s1 = serial(&sock).await;
        ca.set_wrong_san(true);
        let calls = ca.calls();
        // Past the refresh point: the agent asked again and got a foreign SAN.
        wait_for("a refused renewal", Duration::from_secs(10), || {
            ca.calls() > calls + 1
        })
        .await;
        let served = fetch_secrets(&sock, Duration::from_secs(5)).await.unwrap();
        let leaf = &default_of(&served).certs[0];
        assert_eq!(
            leaf.serial_hex, s1,
            "wrong-SAN certificate must not be installed"
        );
        assert_eq!(leaf.uri_sans, ["spiffe://cluster.local/ns/shop/sa/cart"]);
        let m = running.metrics().render();
        assert!(m.contains("reason=\"bad_response\""), "{m}");
        // Positive twin: a correct certificate is accepted as soon as the CA behaves.
        ca.set_wrong_san(false);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while serial(&sock).await == s1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no renewal after the CA was fixed"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        running.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_clients_reconnect_and_get_certs() {
    tokio::time::timeout(T, async {
        let Bed {
            dir: _dir,
            ca: _ca,
            cfg,
            sock,
        } = bed(Duration::from_secs(3600)).await;
        let running = Agent::new(cfg.clone())
            .unwrap()
            .start(CancellationToken::new())
            .await
            .unwrap();
        let mut stream = RawStream::open(&sock, &["default", "ROOTCA"]).await;
        let first = stream.next(Duration::from_secs(10)).await.unwrap().unwrap();
        let s1 = default_of(&decode(&first)).certs[0].serial_hex.clone();
        running.shutdown().await;
        // The open stream ends when the agent goes away.
        let end = stream
            .next(Duration::from_secs(10))
            .await
            .expect("stream must end");
        assert!(end.is_err(), "{end:?}");
        // A crashed agent leaves its socket behind: simulate that too.
        let stale = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        drop(stale);
        let running = Agent::new(cfg)
            .unwrap()
            .start(CancellationToken::new())
            .await
            .unwrap();
        // The client reconnects (as Envoy does) and gets a (new) certificate.
        let mut stream = RawStream::open(&sock, &["default", "ROOTCA"]).await;
        let again = stream.next(Duration::from_secs(10)).await.unwrap().unwrap();
        let got = decode(&again);
        assert_ne!(
            default_of(&got).certs[0].serial_hex,
            s1,
            "a new key and certificate"
        );
        assert_eq!(rootca_of(&got).certs.len(), 1);
        running.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_pushes_rootca_with_old_and_new_roots() {
    tokio::time::timeout(T, async {
        let Bed {
            dir: _dir,
            ca,
            cfg,
            sock,
        } = bed(Duration::from_secs(4)).await;
        let running = Agent::new(cfg)
            .unwrap()
            .start(CancellationToken::new())
            .await
            .unwrap();
        let mut stream = RawStream::open(&sock, &["ROOTCA"]).await;
        let first = stream.next(Duration::from_secs(10)).await.unwrap().unwrap();
        stream
            .send(&["ROOTCA"], &first.version_info, &first.nonce)
            .await;
        let roots1 = rootca_of(&decode(&first)).certs.clone();
        assert_eq!(roots1.len(), 1);
        let new_root = ca.rotate_root();
        // The agent trusts only its configured CA root file: the operator (or `rampart up`,
        // through the CA's --bundle-out) adds the new root there for the rotation.
        trust_roots(&ca, std::slice::from_ref(&new_root));
        let new_fp = CertInfo::parse(&new_root).unwrap().sha256_fingerprint;
        // Only ROOTCA is subscribed: the next push is the bundle change, nothing before it
        // (leaf rotations alone do not touch this stream).
        let pushed = stream
            .next(Duration::from_secs(15))
            .await
            .expect("ROOTCA push")
            .unwrap();
        let roots2 = rootca_of(&decode(&pushed)).certs.clone();
        let fps: Vec<_> = roots2
            .iter()
            .map(|c| c.sha256_fingerprint.clone())
            .collect();
        assert_eq!(
            roots2.len(),
            2,
            "old and new root both present during overlap"
        );
        assert!(
            fps.contains(&roots1[0].sha256_fingerprint) && fps.contains(&new_fp),
            "{fps:?}"
        );
        // And the served leaf now chains to the new root.
        let s = fetch_secrets(&sock, Duration::from_secs(5)).await.unwrap();
        assert!(
            default_of(&s).certs[1].subject.contains("new"),
            "{:?}",
            default_of(&s).certs[1].subject
        );
        running.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_token_file_is_used_for_the_next_request() {
    tokio::time::timeout(T, async {
        let dir = tempfile::tempdir().unwrap();
        let ca = FakeCa::start(dir.path()).await;
        let cfg = agent_config(
            dir.path(),
            &ca.addr.to_string(),
            &ca.root_file,
            Duration::from_secs(3),
        );
        let token = cfg.workloads[0].token_path.clone();
        let running = Agent::new(cfg)
            .unwrap()
            .start(CancellationToken::new())
            .await
            .unwrap();
        wait_for("first CSR", Duration::from_secs(10), || ca.calls() >= 1).await;
        let rotated = format!("{}x", token_for("shop", "cart"));
        rampart_certs::write_file_atomic(&token, rotated.as_bytes(), 0o600).unwrap();
        wait_for("a CSR with the new token", Duration::from_secs(10), || {
            ca.tokens()
                .iter()
                .any(|t| t == &format!("Bearer {rotated}"))
        })
        .await;
        running.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_with_unknown_root_or_wrong_name_gets_no_csr_and_nothing_is_served() {
    tokio::time::timeout(T, async {
        let dir = tempfile::tempdir().unwrap();
        let ca = FakeCa::start(dir.path()).await;
        // Another CA's root: the TLS handshake must fail, the CSR is never sent.
        let other = tempfile::tempdir().unwrap();
        let impostor = FakeCa::start(other.path()).await;
        for (root, name) in [
            (impostor.root_file.clone(), "istiod.istio-system.svc"),
            (ca.root_file.clone(), "not-the-ca.example"),
        ] {
            let mut cfg = agent_config(
                dir.path(),
                &ca.addr.to_string(),
                &root,
                Duration::from_secs(3600),
            );
            cfg.ca.server_name = name.into();
            let running = Agent::new(cfg)
                .unwrap()
                .start(CancellationToken::new())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert_eq!(
                ca.calls(),
                0,
                "no CSR reaches a CA we cannot verify ({name})"
            );
            assert!(running.stores()[0].1.current().svid.is_none());
            let m = running.metrics().render();
            assert!(m.contains("reason=\"unreachable\""), "{m}");
            running.shutdown().await;
        }
        // Positive twin: the right root and name work.
        let cfg = agent_config(
            dir.path(),
            &ca.addr.to_string(),
            &ca.root_file,
            Duration::from_secs(3600),
        );
        let running = Agent::new(cfg)
            .unwrap()
            .start(CancellationToken::new())
            .await
            .unwrap();
        wait_for("a certificate", Duration::from_secs(10), || {
            running.stores()[0].1.current().svid.is_some()
        })
        .await;
        running.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_and_fetch_secrets() {
    use rampart_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    tokio::time::timeout(T, async {
        let Bed {
            dir: _dir,
            ca: _ca,
            cfg,
            sock,
        } = bed(Duration::from_secs(4)).await;
        let running = Agent::new(cfg)
            .unwrap()
            .start(CancellationToken::new())
            .await
            .unwrap();
        let ch = rampart_node_agent::connect_unix(&sock).await.unwrap();
        let mut client = SecretDiscoveryServiceClient::new(ch);

        // FetchSecrets: both resources in one response; unknown names NOT_FOUND.
        let r = client
            .fetch_secrets(DiscoveryRequest {
                resource_names: vec!["default".into(), "ROOTCA".into()],
                type_url: SECRET_TYPE_URL.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let got = decode(&r);
        assert_eq!(
            default_of(&got).certs[0].uri_sans,
            ["spiffe://cluster.local/ns/shop/sa/cart"]
        );
        assert!(default_of(&got).has_key);
        assert_eq!(rootca_of(&got).certs.len(), 1);
        assert!(!r.nonce.is_empty() && r.version_info.contains("default="));
        let e = client
            .fetch_secrets(DiscoveryRequest {
                resource_names: vec!["nope".into()],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);

        // DeltaSecrets: subscribe, get both with per-resource versions; ACK; a rotation sends
        // only what changed (the leaf), not the unchanged ROOTCA.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(DeltaDiscoveryRequest {
            type_url: SECRET_TYPE_URL.into(),
            resource_names_subscribe: vec!["default".into(), "ROOTCA".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        let mut stream = client
            .delta_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().unwrap();
        let mut names: Vec<_> = first.resources.iter().map(|r| r.name.clone()).collect();
        names.sort();
        assert_eq!(names, ["ROOTCA", "default"]);
        assert!(first.resources.iter().all(|r| !r.version.is_empty()));
        tx.send(DeltaDiscoveryRequest {
            type_url: SECRET_TYPE_URL.into(),
            response_nonce: first.nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("rotation pushed on the delta stream")
            .unwrap()
            .unwrap();
        let names: Vec<_> = next.resources.iter().map(|r| r.name.clone()).collect();
        assert_eq!(names, ["default"], "unchanged ROOTCA is not re-sent");
        assert_ne!(next.nonce, first.nonce);
        // Unknown name on a delta stream: NOT_FOUND.
        tx.send(DeltaDiscoveryRequest {
            type_url: SECRET_TYPE_URL.into(),
            resource_names_subscribe: vec!["nope".into()],
            response_nonce: next.nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        let end = loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream ended without status"),
                Err(s) => break s,
            }
        };
        assert_eq!(end.code(), tonic::Code::NotFound);

        running.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workloads_on_one_agent_get_their_own_identity_on_their_own_socket() {
    tokio::time::timeout(T, async {
        let dir = tempfile::tempdir().unwrap();
        let ca = FakeCa::start(dir.path()).await;
        let mut cfg = agent_config(
            dir.path(),
            &ca.addr.to_string(),
            &ca.root_file,
            Duration::from_secs(3600),
        );
        let tok2 = dir.path().join("token2");
        std::fs::write(&tok2, token_for("billing", "api")).unwrap();
        cfg.workloads.push(rampart_node_agent::WorkloadConfig {
            spiffe_id: id("billing", "api"),
            token_path: tok2,
            sds_socket: Some(dir.path().join("billing/sds.sock")),
            workload_api_socket: None,
            output_dir: None,
        });
        let s1 = cfg.workloads[0].sds_socket.clone().unwrap();
        let s2 = cfg.workloads[1].sds_socket.clone().unwrap();
        let running = Agent::new(cfg)
            .unwrap()
            .start(CancellationToken::new())
            .await
            .unwrap();
        let a = fetch_secrets(&s1, Duration::from_secs(10)).await.unwrap();
        let b = fetch_secrets(&s2, Duration::from_secs(10)).await.unwrap();
        assert_eq!(
            default_of(&a).certs[0].uri_sans,
            ["spiffe://cluster.local/ns/shop/sa/cart"]
        );
        assert_eq!(
            default_of(&b).certs[0].uri_sans,
            ["spiffe://cluster.local/ns/billing/sa/api"]
        );
        // Each identity presented its own token.
        let toks = ca.tokens();
        assert!(toks.iter().any(|t| t.ends_with(&token_for("shop", "cart"))));
        assert!(
            toks.iter()
                .any(|t| t.ends_with(&token_for("billing", "api")))
        );
        running.shutdown().await;
    })
    .await
    .unwrap();
}

/// Workload API with no SVID yet (the CA refuses): every call answers PERMISSION_DENIED at
/// once, naming the reason (py-spiffe and raw grpcio), never a silent wait. Positive twin:
/// once the CA issues, the same calls succeed (JWT goes back to UNIMPLEMENTED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_answers_permission_denied_before_issuance_then_serves() {
    tokio::time::timeout(T, async {
        let Bed {
            dir: _dir,
            ca,
            cfg,
            sock,
        } = bed(Duration::from_secs(3600)).await;
        let wsock = cfg.workloads[0].workload_api_socket.clone().unwrap();
        ca.set_refuse(true);
        let sd = CancellationToken::new();
        let running = Agent::new(cfg).unwrap().start(sd.clone()).await.unwrap();
        wait_for("a refused CA call", Duration::from_secs(10), || {
            ca.calls() >= 1
        })
        .await;
        let w = wsock.to_str().unwrap();
        let lines = run_py("workload_errors.py", &[w, "probe"], Duration::from_secs(40)).await;
        for name in ["py_spiffe", "x509", "bundles", "jwt"] {
            let e = event(&lines, name);
            assert_eq!(e["code"], "PERMISSION_DENIED", "{name}: {e}");
            assert!(
                e["elapsed"].as_f64().unwrap() < 4.0,
                "{name} answered late: {e}"
            );
        }
        let x = event(&lines, "x509");
        assert!(
            x["message"]
                .as_str()
                .unwrap()
                .contains("no X.509-SVID has been issued"),
            "{x}"
        );
        ca.set_refuse(false);
        serial(&sock).await;
        let lines = run_py("workload_errors.py", &[w, "probe"], Duration::from_secs(40)).await;
        for name in ["py_spiffe", "x509", "bundles"] {
            assert_eq!(event(&lines, name)["code"], "OK", "{lines:?}");
        }
        assert_eq!(event(&lines, "jwt")["code"], "UNIMPLEMENTED", "{lines:?}");
        running.shutdown().await;
    })
    .await
    .unwrap();
}

/// An open FetchX509SVID stream whose SVID expires (CA down) ends with PERMISSION_DENIED
/// naming the expiry, and new calls get the same at once (the bundle is still served).
/// Positive twin: the CA comes back and the SVID is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_stream_ends_permission_denied_at_expiry_then_recovers() {
    tokio::time::timeout(T, async {
        let Bed {
            dir: _dir,
            mut ca,
            cfg,
            sock,
        } = bed(Duration::from_secs(3)).await;
        let wsock = cfg.workloads[0].workload_api_socket.clone().unwrap();
        let sd = CancellationToken::new();
        let running = Agent::new(cfg).unwrap().start(sd.clone()).await.unwrap();
        serial(&sock).await;
        ca.stop().await;
        let w = wsock.to_str().unwrap();
        let lines = run_py(
            "workload_errors.py",
            &[w, "stream"],
            Duration::from_secs(45),
        )
        .await;
        let svid = event(&lines, "svid");
        assert_eq!(svid["spiffe_id"], "spiffe://cluster.local/ns/shop/sa/cart");
        let end = event(&lines, "end");
        assert_eq!(end["code"], "PERMISSION_DENIED", "{lines:?}");
        assert!(
            end["message"].as_str().unwrap().contains("expired at"),
            "{end}"
        );
        for name in ["py_spiffe", "x509", "jwt"] {
            let e = event(&lines, name);
            assert_eq!(e["code"], "PERMISSION_DENIED", "{name}: {e}");
            assert!(
                e["elapsed"].as_f64().unwrap() < 4.0,
                "{name} answered late: {e}"
            );
        }
        assert_eq!(event(&lines, "bundles")["code"], "OK", "{lines:?}");
        ca.restart().await;
        serial(&sock).await;
        let lines = run_py("workload_errors.py", &[w, "probe"], Duration::from_secs(40)).await;
        assert_eq!(event(&lines, "x509")["code"], "OK", "{lines:?}");
        assert_eq!(event(&lines, "py_spiffe")["code"], "OK", "{lines:?}");
        running.shutdown().await;
    })
    .await
    .unwrap();
}

/// Negative twin of the rotation test: the CA switches to a new root the agent was never
/// configured with (its --ca-root holds only the old one). The response carries the new root,
/// but a root cannot vouch for itself: refused, the old certificate and bundle stay. Once the
/// operator adds the new root to --ca-root, the next renewal is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_to_a_root_not_in_ca_root_is_refused_until_configured() {
    tokio::time::timeout(T, async {
        let Bed {
            dir: _dir,
            ca,
            cfg,
            sock,
        } = bed(Duration::from_secs(8)).await;
        let running = Agent::new(cfg)
            .unwrap()
            .start(CancellationToken::new())
            .await
            .unwrap();
        let s1 = serial(&sock).await;
        let new_root = ca.rotate_root();
        let calls = ca.calls();
        wait_for(
            "renewals under the new root",
            Duration::from_secs(15),
            || ca.calls() >= calls + 2,
        )
        .await;
        let served = fetch_secrets(&sock, Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            default_of(&served).certs[0].serial_hex,
            s1,
            "old certificate kept"
        );
        assert_eq!(rootca_of(&served).certs.len(), 1, "new root not served");
        let m = running.metrics().render();
        assert!(m.contains("reason=\"bad_response\""), "{m}");
        trust_roots(&ca, &[new_root]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let served = fetch_secrets(&sock, Duration::from_secs(5)).await.unwrap();
            if rootca_of(&served).certs.len() == 2 {
                assert!(default_of(&served).certs[1].subject.contains("new"));
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not accepted once configured"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        running.shutdown().await;
    })
    .await
    .unwrap();
}

/// Istio's OUTPUT_CERTS on an emptyDir (0777, as the kubelet makes it): refused at start
/// (naming `--trust-output-dir`) unless the agent is told the directory is the Pod's own
/// volume; with it the files are written there. Before the flag the only way was to not
/// use such a directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_output_volume_is_written_only_when_trusted() {
    tokio::time::timeout(T, async {
        let Bed {
            dir: _dir,
            ca: _ca,
            cfg,
            sock: _,
        } = bed(Duration::from_secs(60)).await;
        let out = cfg.workloads[0].output_dir.clone().unwrap();
        std::fs::create_dir(&out).unwrap();
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).unwrap();
        let sd = CancellationToken::new();
        let err = Agent::new(cfg.clone())
            .unwrap()
            .start(sd.clone())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("writable by group or others") && err.contains("--trust-output-dir"),
            "{err}"
        );
        let running = Agent::new(cfg)
            .unwrap()
            .trust_output_dir(true)
            .start(sd.clone())
            .await
            .unwrap();
        let chain = out.join(rampart_node_agent::CERT_CHAIN_FILE);
        while !chain.exists() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        running.shutdown().await;
    })
    .await
    .unwrap();
}
