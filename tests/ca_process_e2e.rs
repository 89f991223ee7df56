//! `rampart ca` (the real binary) under abuse: killed with SIGKILL in the middle of issuing
//! (the root is kept, the audit log parses and holds every certificate a client received),
//! and flooded with TCP connections that never finish a TLS handshake (a real client still
//! gets its certificate, the CA's memory stays bounded); its monitoring port's `/ready` and
//! `/healthz` with an unwritable audit log and an expired signing certificate.

mod support;
use support::Proc;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rampart_certs::jwt::JwtSigner;
use rampart_certs::{CertInfo, KeyAlgorithm, PrivateKey, SpiffeId, TrustBundle};
use rampart_proto::istio::v1::auth::IstioCertificateRequest;
use rampart_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use tonic::transport::Channel;

const ISS: &str = "https://issuer.test";

struct Ca {
    proc: Proc,
    addr: SocketAddr,
    pid: i32,
}

/// Writes a JWKS for a fresh signer into `dir` and returns the signer.
fn issuer(dir: &Path) -> JwtSigner {
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let signer = JwtSigner::new(&key, "k1").unwrap();
    std::fs::write(
        dir.join("jwks.json"),
        signer.jwks().unwrap().to_json().to_string(),
    )
    .unwrap();
    signer
}

fn token(signer: &JwtSigner, ns: &str, sa: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    signer
        .sign(
            &serde_json::json!({"iss": ISS, "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "aud": ["istio-ca"], "iat": now, "exp": now + 600}),
        )
        .unwrap()
}

/// `rampart ca` with its plug-in folder and state in `dir`, listening on `listen`, trusting
/// the issuer `issuer(dir)` made.
fn ca_command(dir: &Path, listen: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rampart"));
    c.args(["ca", "--listen", listen])
        .arg("--cacerts")
        .arg(dir.join("cacerts"))
        .arg("--state")
        .arg(dir.join("state"))
        .args(["--jwt-issuer", ISS, "--jwks"])
        .arg(dir.join("jwks.json"));
    c
}

/// Starts `rampart ca` with its state in `dir`, on `listen`, plus `extra` flags; waits for
/// its "listening on" line.
fn start_ca(dir: &Path, listen: &str, extra: &[&str]) -> Ca {
    let log = dir.join(format!(
        "ca-{}.log",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let mut cmd = ca_command(dir, listen);
    cmd.arg("--bundle-out")
        .arg(dir.join("bundle.pem"))
        .args(extra);
    let (proc, addr) = support::ca_listening(cmd, log);
    let addr = addr.parse().unwrap();
    let pid = proc.child.id() as i32;
    Ca { proc, addr, pid }
}

fn root_fingerprint(dir: &Path) -> String {
    let pem = std::fs::read_to_string(dir.join("state/root-cert.pem")).unwrap();
    let certs = rampart_certs::parse_certs_pem(&pem).unwrap();
    CertInfo::parse(&certs[0]).unwrap().sha256_fingerprint
}

async fn client(dir: &Path, addr: SocketAddr) -> IstioCertificateServiceClient<Channel> {
    let bundle =
        TrustBundle::from_pem(&std::fs::read_to_string(dir.join("bundle.pem")).unwrap()).unwrap();
    let tls = rampart_citadel::client::config(&bundle, None).unwrap();
    rampart_citadel::client::connect(addr, "127.0.0.1", Arc::new(tls))
        .await
        .expect("connect to the CA")
}

/// One CreateCertificate; the issued leaf's serial (lowercase hex, as the audit log has it).
async fn issue_one(
    c: &mut IstioCertificateServiceClient<Channel>,
    csr: &str,
    token: &str,
) -> Result<String, tonic::Status> {
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: csr.to_owned(),
        validity_duration: 3600,
        metadata: None,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let chain = c.create_certificate(req).await?.into_inner().cert_chain;
    let leaf = rampart_certs::parse_certs_pem(&chain[0]).unwrap();
    Ok(CertInfo::parse(&leaf[0]).unwrap().serial_hex)
}

fn audit_serials(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("state/audit.jsonl")).unwrap();
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("audit line {} does not parse ({e}): {l:?}", i + 1));
            v["serial"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// SIGKILL while many clients are issuing: after a restart on the same state the root is the
/// same, the audit log parses line by line, and every certificate a client received before
/// the kill is in it (the record is flushed before the response is sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_issuance_keeps_root_and_every_acknowledged_certificate_audited() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let signer = issuer(dir);
    let ca = start_ca(dir, "127.0.0.1:0", &[]);
    let root = root_fingerprint(dir);
    let tok = token(&signer, "default", "web");
    let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
    let csrs: Vec<String> = (0..8)
        .map(|_| {
            let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
            rampart_certs::build_csr(&key, &id).unwrap()
        })
        .collect();

    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for conn in 0..4 {
        let c = client(dir, ca.addr).await;
        for w in 0..8 {
            let (mut c, acked, stop, tok) = (c.clone(), acked.clone(), stop.clone(), tok.clone());
            let csr = csrs[(conn * 8 + w) % csrs.len()].clone();
            workers.push(tokio::spawn(async move {
                let mut errors = 0;
                while !stop.load(Ordering::Relaxed) && errors < 3 {
                    match issue_one(&mut c, &csr, &tok).await {
                        Ok(serial) => acked.lock().unwrap().push(serial),
                        Err(_) => errors += 1,
                    }
                }
            }));
        }
    }
    // Let a few hundred issuances through, then kill the CA with requests in flight.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 300 {
        assert!(Instant::now() < deadline, "CA too slow:\n{}", ca.proc.log());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pid = rustix::process::Pid::from_raw(ca.pid).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
    let killed_at = acked.lock().unwrap().len();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        tokio::time::timeout(Duration::from_secs(30), w)
            .await
            .expect("clients notice the dead CA")
            .unwrap();
    }
    drop(ca);
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= killed_at);

    // Restart on the same state: same root, a log that parses, every acknowledged serial.
    let ca = start_ca(dir, "127.0.0.1:0", &[]);
    assert_eq!(root_fingerprint(dir), root, "the root survives SIGKILL");
    let audited: std::collections::HashSet<String> = audit_serials(dir).into_iter().collect();
    let missing: Vec<&String> = acked.iter().filter(|s| !audited.contains(*s)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged certificates missing from the audit log: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
    // And the restarted CA issues and audits again, appending after the old records.
    let mut c = client(dir, ca.addr).await;
    let serial = issue_one(&mut c, &csrs[0], &tok)
        .await
        .expect("issues again");
    let after = audit_serials(dir);
    assert_eq!(after.last(), Some(&serial));
    eprintln!(
        "acknowledged {} before/around the kill; audit log holds {}",
        acked.len(),
        after.len() - 1
    );
}

/// Raises this process's soft open-file limit to the hard one; returns the new soft limit.
fn raise_nofile() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        },
    );
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

fn vm_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// `n` TCP connections to `addr` that start a TLS ClientHello (a record header announcing
/// 512 bytes, then 6 of them) and then say nothing more.
fn stalled_handshakes(addr: SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    use std::io::Write as _;
    let partial_hello = [
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    (0..n)
        .map(|i| {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("flood connection {i}: {e}"));
            s.write_all(&partial_hello).unwrap();
            s
        })
        .collect()
}

fn scrape_metric(addr: &str, series: &str) -> u64 {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// 2,000 connections that never finish a TLS handshake: a real client still gets a
/// certificate within 1 s (the newest arrival drops the oldest stalled handshake), the CA's
/// memory stays bounded, and the dropped handshakes are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_flood_does_not_lock_out_a_real_client_or_grow_memory() {
    let nofile = raise_nofile();
    let flood = 2000usize.min(nofile.saturating_sub(300) as usize);
    assert!(
        flood >= 1000,
        "hard open-file limit {nofile} too low for the flood test"
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let signer = issuer(dir);
    let metrics_port = support::free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let ca = start_ca(dir, "127.0.0.1:0", &["--metrics", &metrics]);
    let tok = token(&signer, "default", "web");
    let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let csr = rampart_certs::build_csr(&key, &id).unwrap();
    // Warm up (serving path, allocator) before the baseline.
    let mut c = client(dir, ca.addr).await;
    issue_one(&mut c, &csr, &tok).await.unwrap();
    drop(c);
    let before = vm_rss_kib(ca.pid);

    let addr = ca.addr;
    let conns = tokio::task::spawn_blocking(move || stalled_handshakes(addr, flood))
        .await
        .unwrap();
    // Let the CA take them all in.
    let deadline = Instant::now() + Duration::from_secs(30);
    while scrape_metric(&metrics, "citadel_server_connections ") < 500 {
        assert!(Instant::now() < deadline, "{}", ca.proc.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let started = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(1), async {
        let mut c = client(dir, ca.addr).await;
        issue_one(&mut c, &csr, &tok).await
    })
    .await;
    let took = started.elapsed();
    let serial = got
        .unwrap_or_else(|_| {
            panic!(
                "no certificate within 1 s during the flood:\n{}",
                ca.proc.log()
            )
        })
        .expect("the real client gets its certificate");
    assert!(!serial.is_empty());
    let after = vm_rss_kib(ca.pid);
    let evicted = scrape_metric(
        &metrics,
        "citadel_server_connection_refused_count{reason=\"handshake_evicted\"} ",
    );
    let in_progress = scrape_metric(&metrics, "citadel_server_handshakes_in_progress ");
    eprintln!(
        "flood of {flood} stalled handshakes: client served in {took:?}; CA VmRSS {before} KiB \
         -> {after} KiB; {evicted} handshakes evicted, {in_progress} in progress"
    );
    assert!(
        in_progress <= rampart_citadel::DEFAULT_MAX_HANDSHAKES as u64,
        "handshakes in progress bounded: {in_progress}"
    );
    // Beyond the limit each arrival dropped the oldest (on a slow machine some of the first
    // ones may have timed out instead).
    let timed_out = scrape_metric(
        &metrics,
        "citadel_server_connection_refused_count{reason=\"handshake_timeout\"} ",
    );
    assert!(
        (evicted + timed_out) as usize >= flood - rampart_citadel::DEFAULT_MAX_HANDSHAKES,
        "every handshake beyond the limit was dropped: {evicted} evicted, {timed_out} timed out"
    );
    assert!(
        after < before + 64 * 1024,
        "CA memory grew from {before} KiB to {after} KiB under the flood"
    );
    drop(conns);
}

/// The connection limit bounds the CA's descriptors: with `--max-connections 64`, 300 idle
/// connections leave the CA with at most 64 client sockets (the rest wait in the kernel's
/// backlog), the pause is counted, and once the stalled ones time out a real client is
/// served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_bounds_descriptors_and_the_ca_recovers() {
    raise_nofile();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let signer = issuer(dir);
    let metrics = format!("127.0.0.1:{}", support::free_port());
    let ca = start_ca(
        dir,
        "127.0.0.1:0",
        &[
            "--metrics",
            &metrics,
            "--max-connections",
            "64",
            "--max-handshakes",
            "64",
            "--handshake-timeout",
            "1s",
        ],
    );
    let idle_fds = open_fds(ca.pid);
    let addr = ca.addr;
    let conns = tokio::task::spawn_blocking(move || stalled_handshakes(addr, 300))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while scrape_metric(
        &metrics,
        "citadel_server_connection_refused_count{reason=\"connection_limit\"} ",
    ) == 0
    {
        assert!(Instant::now() < deadline, "{}", ca.proc.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..10 {
        let open = open_fds(ca.pid);
        assert!(
            open <= idle_fds + 64 + 2,
            "CA holds {open} descriptors (idle {idle_fds}, limit 64)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The stalled connections time out in batches of 64 per second; the client is served
    // once the backlog ahead of it has drained.
    let tok = token(&signer, "default", "web");
    let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let csr = rampart_certs::build_csr(&key, &id).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), async {
        let mut c = client(dir, ca.addr).await;
        issue_one(&mut c, &csr, &tok).await
    })
    .await
    .expect("served after the stalled connections timed out");
    got.expect("certificate");
    assert!(
        scrape_metric(
            &metrics,
            "citadel_server_connection_refused_count{reason=\"handshake_timeout\"} "
        ) >= 64
    );
    drop(conns);
}

/// `--bundle-out` pointed at the CA's own persisted root (what `rampart up` used to do) is
/// refused at startup naming both paths, and the root is left as it was; a bundle file of
/// its own starts (the positive twin is every other test of this file).
#[test]
fn bundle_out_onto_the_cas_own_root_is_refused_at_startup() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    issuer(dir);
    let ca = start_ca(dir, "127.0.0.1:0", &[]);
    drop(ca);
    let root = std::fs::read(dir.join("state/root-cert.pem")).unwrap();
    let own = dir.join("state/root-cert.pem");
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["ca", "--listen", "127.0.0.1:0"])
        .arg("--cacerts")
        .arg(dir.join("cacerts"))
        .arg("--state")
        .arg(dir.join("state"))
        .arg("--bundle-out")
        .arg(&own)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("self-signed root") && err.matches(&*own.display().to_string()).count() == 2,
        "names both paths: {err}"
    );
    assert_eq!(std::fs::read(&own).unwrap(), root, "root untouched");
}

/// A port another process holds stops `rampart ca` before it makes a root or an audit log,
/// with a hint at who holds it; its twin, a free port, starts (and, given no --jwt-issuer,
/// warns that only certificate holders can be served).
#[test]
fn a_taken_port_stops_the_ca_before_it_makes_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().to_string();
    // `rampart ca` with `flags` on this state: its exit code and stderr.
    let refused = |flags: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
            .arg("ca")
            .args(flags)
            .arg("--cacerts")
            .arg(dir.join("cacerts"))
            .arg("--state")
            .arg(dir.join("state"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(!dir.join("state").exists(), "state made: {err}");
        err
    };
    let err = refused(&["--listen", &taken]);
    assert!(err.contains(&format!("--listen {taken}")), "{err}");
    assert!(err.contains("ss -ltnp"), "{err}");
    drop(squatter);
    // Two of its own flags on one free port: refused as early, naming both.
    let err = refused(&["--listen", &taken, "--metrics", &taken]);
    assert!(
        err.contains(&format!("--metrics {taken}: the same address as --listen")),
        "{err}"
    );
    let ca = start_ca_without_issuer(dir);
    assert!(dir.join("state/root-cert.pem").exists());
    wait_for_log(&ca, "no --jwt-issuer");
}

/// `rampart ca` with no --jwt-issuer/--jwks, started and listening.
fn start_ca_without_issuer(dir: &Path) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rampart"));
    cmd.args(["ca", "--listen", "127.0.0.1:0"])
        .arg("--cacerts")
        .arg(dir.join("cacerts"))
        .arg("--state")
        .arg(dir.join("state"));
    support::ca_listening(cmd, dir.join("ca-no-issuer.log")).0
}

fn wait_for_log(p: &Proc, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.log().contains(needle) {
        assert!(Instant::now() < deadline, "no {needle:?} in\n{}", p.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One CA per state directory, across processes too: a second `rampart ca` on it exits
/// naming the first one's pid, before it touches anything (the first keeps its admin socket
/// and keeps issuing); once the first is killed with SIGKILL (no clean-up of its own ran), the
/// directory is free and the next CA starts with the same root.
#[tokio::test]
async fn a_second_ca_process_on_a_state_in_use_is_refused_until_the_first_is_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let signer = issuer(dir);
    let ca = start_ca(dir, "127.0.0.1:0", &[]);
    let root = root_fingerprint(dir);
    let out = ca_command(dir, "127.0.0.1:0").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("is in use by process {}", ca.pid)) && err.contains("ca.lock"),
        "{err}"
    );
    let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let csr = rampart_certs::build_csr(&key, &id).unwrap();
    let tok = token(&signer, "default", "web");
    let mut c = client(dir, ca.addr).await;
    let serial = issue_one(&mut c, &csr, &tok)
        .await
        .expect("the first CA still issues");
    assert!(audit_serials(dir).contains(&serial));
    // The first CA's admin socket is still its own: a revocation through it is answered.
    let revoke = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["ca", "revoke", "--serial", &serial, "--state"])
        .arg(dir.join("state"))
        .output()
        .unwrap();
    assert!(
        revoke.status.success(),
        "{}",
        String::from_utf8_lossy(&revoke.stderr)
    );

    let pid = rustix::process::Pid::from_raw(ca.pid).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
    drop(ca);
    let ca = start_ca(dir, "127.0.0.1:0", &[]);
    assert_eq!(root_fingerprint(dir), root);
    let mut c = client(dir, ca.addr).await;
    issue_one(&mut c, &csr, &tok)
        .await
        .expect("the new CA issues");
    drop(c);

    // A clean stop (SIGTERM) takes the admin socket along; the lock file stays (a flock file
    // is never unlinked: a CA waiting on the old inode would hold a lock nobody else sees).
    let admin = dir.join("state/admin.sock");
    assert!(admin.exists(), "the running CA's admin socket");
    let mut ca = ca;
    let pid = rustix::process::Pid::from_raw(ca.pid).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = ca.proc.child.wait().unwrap();
    assert!(status.success(), "{status:?}\n{}", ca.proc.log());
    assert!(!admin.exists(), "admin.sock left after a clean stop");
    assert!(dir.join("state/ca.lock").exists());
    // ... and `rampart ca revoke` says the CA is not running.
    let revoke = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["ca", "revoke", "--serial", &serial, "--state"])
        .arg(dir.join("state"))
        .output()
        .unwrap();
    assert!(!revoke.status.success());
    assert!(
        String::from_utf8_lossy(&revoke.stderr).contains("admin socket"),
        "{}",
        String::from_utf8_lossy(&revoke.stderr)
    );
}

/// Peers that complete TLS handshakes and then go silent cannot hold the CA's connection
/// slots: at the limit, the connection idle longest (2 s or more) is closed to make room, so
/// a real client is served within seconds while all the slots are held by idle peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_established_connections_are_evicted_at_the_limit() {
    raise_nofile();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let signer = issuer(dir);
    let metrics = format!("127.0.0.1:{}", support::free_port());
    let ca = start_ca(
        dir,
        "127.0.0.1:0",
        &[
            "--metrics",
            &metrics,
            "--max-connections",
            "64",
            "--max-handshakes",
            "64",
        ],
    );
    // 64 TLS 1.3 connections (Python's ssl, no client certificate) that say nothing more.
    let holder = r#"
import socket, ssl, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.set_alpn_protocols(["h2"])
conns = [ctx.wrap_socket(socket.create_connection((host, port), timeout=10)) for _ in range(n)]
print("ready", len(conns), flush=True)
sys.stdin.read()
"#;
    let mut py = Command::new(support::python())
        .args(["-c", holder, "127.0.0.1", &ca.addr.port().to_string(), "64"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(py.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready 64", "{}", ca.proc.log());
    let tok = token(&signer, "default", "web");
    let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let csr = rampart_certs::build_csr(&key, &id).unwrap();
    let start = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(15), async {
        let mut c = client(dir, ca.addr).await;
        issue_one(&mut c, &csr, &tok).await
    })
    .await
    .expect("served while idle peers held every slot");
    got.expect("certificate");
    assert!(
        scrape_metric(
            &metrics,
            "citadel_server_connection_refused_count{reason=\"idle_evicted\"} "
        ) >= 1,
        "{}",
        ca.proc.log()
    );
    eprintln!(
        "served after {:?} with 64 idle TLS peers holding the limit",
        start.elapsed()
    );
    let _ = py.kill();
    let _ = py.wait();
}

/// `rampart ca bench --addr ... --pid PID` reports the CA process's own CPU time per
/// certificate (issue #15's measure, from /proc, so the load generator's share is not in
/// it). Correctness of the tool only: no figure is asserted. Its twin: a token the CA does
/// not accept makes the run fail with errors and no per-certificate figure.
#[test]
fn ca_bench_reports_the_cas_cpu_per_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let signer = issuer(dir.path());
    let ca = start_ca(dir.path(), "127.0.0.1:0", &[]);
    let bench = |token: &str| {
        let token_file = dir.path().join("bench-token");
        std::fs::write(&token_file, token).unwrap();
        Command::new(env!("CARGO_BIN_EXE_rampart"))
            .args(["ca", "bench", "--addr", &ca.addr.to_string()])
            .arg("--ca-root")
            .arg(dir.path().join("bundle.pem"))
            .arg("--token")
            .arg(&token_file)
            .args(["--spiffe-id", "spiffe://cluster.local/ns/bench/sa/load"])
            .args(["--duration", "1s", "--csrs", "8", "--connections", "1"])
            .args(["--concurrency", "4", "--pid", &ca.pid.to_string()])
            .output()
            .unwrap()
    };
    let out = bench(&token(&signer, "bench", "load"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        ca.proc.log()
    );
    assert!(stdout.contains("errors 0"), "{stdout}");
    assert!(
        stdout.contains(&format!("CA pid {}:", ca.pid)) && stdout.contains("us per certificate"),
        "{stdout}"
    );
    // The token proves another service account than the CSRs ask for.
    let wrong = token(&signer, "bench", "someone-else");
    let out = bench(&wrong);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.starts_with("issued 0 certs"), "{stdout}");
    assert!(!stdout.contains("per certificate"), "{stdout}");
}

/// One plain HTTP/1.1 GET on the CA's monitoring port: (status, body), or `None` while
/// nothing answers.
fn monitor(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// `rampart ca`'s monitoring port: /ready 200 once it serves, /healthz 200, /metrics the
/// Prometheus text (with citadel_server_ready), any other path 404, and idle peers filling
/// the port do not lock /ready out. Then the audit log made
/// unwritable (the file moved away and a directory put at its path: refused to root too,
/// with EISDIR, unlike a chmod, so the test means the same as root and as a user): /ready
/// 503 naming the audit log while /healthz stays 200, and an issuance is refused naming the
/// audit log. Still 503 once the directory is gone (no new, empty log is started); back to
/// 200 by itself once the file is back at its path (the writer re-tries every second), and
/// the next certificate follows the first in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_and_healthz_on_the_monitoring_port_follow_an_unwritable_audit_log() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let signer = issuer(dir);
    let metrics = format!("127.0.0.1:{}", support::free_port());
    let ca = start_ca(dir, "127.0.0.1:0", &["--metrics", &metrics]);
    let log = || ca.proc.log();
    support::wait_for(
        "/ready 200",
        Duration::from_secs(20),
        || monitor(&metrics, "/ready") == Some((200, "ready\n".into())),
        log,
    );
    assert_eq!(monitor(&metrics, "/healthz"), Some((200, "ok\n".into())));
    let (status, text) = monitor(&metrics, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(text.contains("\ncitadel_server_csr_count 0\n"), "{text}");
    assert!(text.contains("\ncitadel_server_ready 1\n"), "{text}");
    for path in ["/", "/foo", "/metrics/x", "/readyz"] {
        let (status, body) = monitor(&metrics, path).unwrap();
        assert_eq!(status, 404, "{path}: {body}");
        assert!(!body.contains("citadel_server"), "{path}: {body}");
    }
    // Peers holding more idle connections than the port keeps do not lock the probe out
    // (the oldest is closed for a new one).
    let held: Vec<std::net::TcpStream> = (0..20)
        .map(|_| std::net::TcpStream::connect(&metrics).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(monitor(&metrics, "/ready"), Some((200, "ready\n".into())));
    drop(held);

    let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let csr = rampart_certs::build_csr(&key, &id).unwrap();
    let t = token(&signer, "default", "web");
    let mut c = client(dir, ca.addr).await;
    let first = issue_one(&mut c, &csr, &t).await.expect("issued");

    let audit = dir.join("state/audit.jsonl");
    std::fs::rename(&audit, dir.join("state/audit.jsonl.moved")).unwrap();
    std::fs::create_dir(&audit).unwrap();
    let mut said = String::new();
    support::wait_for(
        "/ready 503 naming the audit log",
        Duration::from_secs(20),
        || match monitor(&metrics, "/ready") {
            Some((503, body)) => {
                said = body;
                true
            }
            _ => false,
        },
        log,
    );
    let expect = format!(
        "not ready: audit log {}: last write failed: ",
        audit.display()
    );
    assert!(said.starts_with(&expect), "{said}");
    assert!(said.contains("replaced"), "{said}");
    assert_eq!(said.lines().count(), 1, "{said}");
    assert_eq!(monitor(&metrics, "/healthz"), Some((200, "ok\n".into())));
    let (_, text) = monitor(&metrics, "/metrics").unwrap();
    assert!(text.contains("\ncitadel_server_ready 0\n"), "{text}");
    let refused = issue_one(&mut c, &csr, &t).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Internal, "{refused:?}");
    assert!(refused.message().contains("audit"), "{refused:?}");

    // The directory gone is not enough: a new, empty log would hide `first` from
    // revocation by identity, so issuance stays refused until the file is back.
    std::fs::remove_dir(&audit).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(monitor(&metrics, "/ready").map(|r| r.0), Some(503));
    assert!(issue_one(&mut c, &csr, &t).await.is_err());
    std::fs::rename(dir.join("state/audit.jsonl.moved"), &audit).unwrap();
    support::wait_for(
        "/ready 200 again",
        Duration::from_secs(20),
        || monitor(&metrics, "/ready") == Some((200, "ready\n".into())),
        log,
    );
    let again = issue_one(&mut c, &csr, &t).await.expect("issued again");
    assert_eq!(audit_serials(dir), vec![first, again]);
}

/// Plug-in material whose signing certificate (an intermediate) lives 25 s: the CA starts
/// and is ready; once the intermediate expires, /ready says 503 naming it and when it
/// expired (and the serving certificate, which cannot outlive it), while /healthz stays 200
/// (a restart cannot fix it). Negative twin: a CA started again on the same, now expired,
/// material refuses to start and says why, so this state is only reached by time passing.
#[test]
fn ready_names_a_signing_certificate_that_expired_while_serving() {
    use rampart_certs::{CertificateAuthority, IntermediateParams, RootParams};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    issuer(dir);
    let now = SystemTime::now();
    let root = CertificateAuthority::self_signed_root(
        &RootParams {
            common_name: "readiness root".into(),
            organization: "test".into(),
            validity: Duration::from_secs(3650 * 86400),
        },
        PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
        now,
    )
    .unwrap();
    let int_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let int = root
        .issue_intermediate(
            &IntermediateParams {
                common_name: "readiness intermediate".into(),
                validity: Duration::from_secs(25),
                ..Default::default()
            },
            &int_key.public_key_spki_der(),
            now,
        )
        .unwrap();
    let cacerts = dir.join("cacerts");
    std::fs::create_dir_all(&cacerts).unwrap();
    let pem = |c: &rampart_certs::CertificateDer<'_>| {
        rampart_certs::certs_to_pem(std::slice::from_ref(c))
    };
    std::fs::write(cacerts.join("ca-cert.pem"), pem(&int)).unwrap();
    std::fs::write(
        cacerts.join("ca-key.pem"),
        int_key.to_pkcs8_pem().as_bytes(),
    )
    .unwrap();
    std::fs::write(
        cacerts.join("cert-chain.pem"),
        format!("{}{}", pem(&int), pem(root.cert())),
    )
    .unwrap();
    std::fs::write(cacerts.join("root-cert.pem"), pem(root.cert())).unwrap();
    let info = CertInfo::parse(&int).unwrap();

    let metrics = format!("127.0.0.1:{}", support::free_port());
    let ca = start_ca(dir, "127.0.0.1:0", &["--metrics", &metrics]);
    let log = || ca.proc.log();
    support::wait_for(
        "/ready 200 while the intermediate is valid",
        info.not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
        || monitor(&metrics, "/ready") == Some((200, "ready\n".into())),
        log,
    );
    let mut said = String::new();
    support::wait_for(
        "/ready 503 once the intermediate expired",
        Duration::from_secs(30),
        || match monitor(&metrics, "/ready") {
            Some((503, body)) => {
                said = body;
                true
            }
            _ => false,
        },
        log,
    );
    assert!(SystemTime::now() >= info.not_after, "not before it expired");
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(
        lines[0],
        format!(
            "not ready: signing certificate {} expired at {}",
            info.subject,
            rampart_certs::timestamp::rfc3339(info.not_after)
        ),
        "{said}"
    );
    assert!(info.subject.contains("readiness intermediate"), "{said}");
    assert!(
        lines[1..]
            .iter()
            .all(|l| l.starts_with("not ready: TLS serving certificate expired at ")),
        "{said}"
    );
    assert_eq!(monitor(&metrics, "/healthz"), Some((200, "ok\n".into())));
    drop(ca);

    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["ca", "--listen", "127.0.0.1:0"])
        .arg("--cacerts")
        .arg(&cacerts)
        .arg("--state")
        .arg(dir.join("state"))
        .args(["--jwt-issuer", ISS, "--jwks"])
        .arg(dir.join("jwks.json"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "root material in {} does not work: probe issuance failed: CA certificate is not \
             valid at the requested time",
            cacerts.display()
        )),
        "{err}"
    );
}
