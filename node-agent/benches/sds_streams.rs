//! SDS fan-out benchmark: N concurrent SDS streams on one SDS server, memory per stream and
//! time to push a rotation to all of them.
//!
//! `cargo bench -p rampart-node-agent --bench sds_streams -- 100 1000 10000`
//!
//! The server runs in a child process (this binary, re-executed with `SDS_BENCH_SERVER`) so
//! its resident memory is measured alone. It serves the agent's real SDS service
//! (`rampart_node_agent::serve_sds`) over a Unix socket, with a certificate issued by an
//! in-process CA; on "rotate" it installs a new certificate, as the lifecycle manager does.
//! The parent opens N StreamSecrets streams (`default` + `ROOTCA`, 100 streams per HTTP/2
//! connection, as if N/100 Envoys multiplexed their secrets), waits for every first response
//! and ACKs it, reads the server's RSS, then triggers a rotation and measures until every
//! stream has received the new version.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rampart_certs::{
    CertificateAuthority, KeyAlgorithm, PrivateKey, RootParams, SpiffeId, TrustBundle,
};
use rampart_node_agent::{Bundle, Metrics, SecretStore, Svid, connect_unix, serve_sds};
use rampart_proto::envoy::extensions::transport_sockets::tls::v3::SECRET_TYPE_URL;
use rampart_proto::envoy::service::discovery::v3::DiscoveryRequest;
use rampart_proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use tokio_util::sync::CancellationToken;

const PER_CONN: usize = 100;

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn issue(ca: &CertificateAuthority, id: &SpiffeId) -> Svid {
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let leaf = ca
        .issue_workload(
            &key.public_key_spki_der(),
            id,
            Duration::from_secs(3600),
            SystemTime::now(),
        )
        .unwrap();
    Svid::new(id.clone(), vec![leaf], key, SystemTime::now()).unwrap()
}

fn server(sock: PathBuf) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let ca = CertificateAuthority::self_signed_root(
            &RootParams::default(),
            PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
            SystemTime::now(),
        )
        .unwrap();
        let id = SpiffeId::istio(&"cluster.local".parse().unwrap(), "bench", "sa").unwrap();
        let store = SecretStore::new();
        let bundle = Bundle::new(
            id.trust_domain().clone(),
            TrustBundle::from_der(vec![ca.cert().clone()]).unwrap(),
        );
        store.install(issue(&ca, &id), Some(bundle));
        let sd = CancellationToken::new();
        let (s2, sd2) = (store.clone(), sd.clone());
        tokio::spawn(async move { serve_sds(&sock, s2, Arc::new(Metrics::new()), sd2).await });
        // Commands on stdin (a plain thread: tokio's stdin needs a feature we do not enable).
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(4);
        std::thread::spawn(move || {
            for line in std::io::stdin().lines().map_while(Result::ok) {
                if tx.blocking_send(line).is_err() {
                    break;
                }
            }
        });
        while let Some(line) = rx.recv().await {
            match line.trim() {
                "rotate" => {
                    store.install(issue(&ca, &id), None);
                    println!("rotated");
                }
                "rss" => println!("rss {}", rss_kib()),
                _ => break,
            }
        }
        sd.cancel();
    });
}

fn main() {
    if let Ok(sock) = std::env::var("SDS_BENCH_SERVER") {
        server(PathBuf::from(sock));
        return;
    }
    let mut ns: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    if ns.is_empty() {
        ns = vec![100, 1000];
    }
    println!(
        "| streams | connections | server RSS idle (MiB) | RSS with streams (MiB) | per stream (KiB) | open all (s) | rotation push p50 (ms) | p99 (ms) | all (ms) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for n in ns {
        run(n);
    }
}

fn run(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sds.sock");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("SDS_BENCH_SERVER", &sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let mut ask = |cmd: &str, stdin: &mut std::process::ChildStdin| {
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
        line.clear();
        out.read_line(&mut line).unwrap();
        line.trim().to_owned()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The socket appears (renamed into place) once it is bound.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let idle: u64 = ask("rss", &mut stdin)
        .trim_start_matches("rss ")
        .parse()
        .unwrap_or(0);
    let conns = n.div_ceil(PER_CONN);
    let (first_tx, mut first_rx) = tokio::sync::mpsc::channel::<()>(n);
    let (push_tx, mut push_rx) = tokio::sync::mpsc::channel::<Instant>(n);
    let t_open = Instant::now();
    let _guards = rt.block_on(async {
        let mut guards = Vec::new();
        for c in 0..conns {
            let ch = connect_unix(&sock).await.unwrap();
            for _ in 0..PER_CONN.min(n - c * PER_CONN) {
                let mut client = SecretDiscoveryServiceClient::new(ch.clone());
                let (tx, rx) = tokio::sync::mpsc::channel(2);
                let first_tx = first_tx.clone();
                let push_tx = push_tx.clone();
                let names = vec!["default".to_owned(), "ROOTCA".to_owned()];
                tx.send(DiscoveryRequest {
                    resource_names: names.clone(),
                    type_url: SECRET_TYPE_URL.into(),
                    ..Default::default()
                })
                .await
                .unwrap();
                guards.push(tokio::spawn(async move {
                    let mut stream = client
                        .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await
                        .unwrap()
                        .into_inner();
                    let r = stream.message().await.unwrap().unwrap();
                    tx.send(DiscoveryRequest {
                        resource_names: names.clone(),
                        type_url: SECRET_TYPE_URL.into(),
                        version_info: r.version_info.clone(),
                        response_nonce: r.nonce.clone(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                    first_tx.send(()).await.unwrap();
                    let r2 = stream.message().await.unwrap().unwrap();
                    let _ = push_tx.send(Instant::now()).await;
                    assert_ne!(r2.version_info, r.version_info);
                    // keep the stream open until the end of the run
                    let _ = stream.message().await;
                    drop(tx);
                }));
            }
        }
        for _ in 0..n {
            first_rx.recv().await.unwrap();
        }
        guards
    });
    let open_s = t_open.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    let loaded: u64 = ask("rss", &mut stdin)
        .trim_start_matches("rss ")
        .parse()
        .unwrap_or(0);
    let t0 = Instant::now();
    writeln!(stdin, "rotate").unwrap();
    stdin.flush().unwrap();
    let mut lat: Vec<f64> = rt.block_on(async {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = push_rx.recv().await.unwrap();
            v.push(t.duration_since(t0).as_secs_f64() * 1000.0);
        }
        v
    });
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q) as usize];
    println!(
        "| {n} | {conns} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} | {:.1} |",
        idle as f64 / 1024.0,
        loaded as f64 / 1024.0,
        (loaded.saturating_sub(idle)) as f64 / n as f64,
        open_s,
        p(0.5),
        p(0.99),
        lat.last().unwrap()
    );
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    rt.shutdown_timeout(Duration::from_secs(1));
}
