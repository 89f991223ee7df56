//! The sidecar injection webhook of the real `rampart ca` binary (`--inject-webhook`), called
//! as the Kubernetes API server calls it: an `admission.k8s.io/v1` AdmissionReview POSTed
//! over TLS by `curl`, over HTTP/2 and HTTP/1.1, trusting only the CA's roots. The JSON Patch
//! it answers, applied to the Pod, must give exactly what `rampart inject` makes of the same
//! Pod. tests/kubernetes_e2e.rs has the real API server call it.

mod support;
use support::{Proc, free_port};

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

const NAME: &str = "rampart-ca.istio-system.svc";
const IMAGE: &str = "registry.example/rampart:test";
const CA_ADDRESS: &str = "rampart-ca.istio-system.svc:15012";

struct Ca {
    _proc: Proc,
    webhook_port: u16,
    metrics: String,
}

fn start_ca(dir: &Path) -> Ca {
    let log = dir.join("ca.log");
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["ca", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .arg("--cacerts")
        .arg(dir.join("cacerts"))
        .arg("--state")
        .arg(dir.join("state"))
        .arg("--bundle-out")
        .arg(dir.join("bundle.pem"))
        .args(["--server-dns", NAME])
        .args(["--inject-webhook", &format!("127.0.0.1:{port}")])
        .args(["--inject-image", IMAGE, "--inject-ca-address", CA_ADDRESS])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start rampart ca");
    let rx = support::stdout_lines(&mut child);
    let proc = Proc { child, log };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut metrics = None;
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("rampart ca did not start:\n{}", proc.log()));
        if let Some(rest) = line.strip_prefix("rampart ca: metrics on ") {
            metrics = Some(rest.trim().to_owned());
        }
        if let Some(rest) = line.strip_prefix("rampart ca: sidecar injection webhook on https://") {
            assert_eq!(rest, format!("127.0.0.1:{port}/inject"));
            return Ca {
                _proc: proc,
                webhook_port: port,
                metrics: metrics.expect("metrics line before the webhook line"),
            };
        }
    }
}

fn pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {
            "serviceAccountName": "web",
            "containers": [{"name": "web", "image": "nginx", "ports": [{"containerPort": 8080}]}]
        }
    })
}

fn review(object: &Value) -> String {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0df28fbd-5f5f-11e8-bc74-36e6bb280816",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
            "dryRun": false
        }
    })
    .to_string()
}

/// curl's exit code and standard output for a POST of `body` to the webhook.
fn curl(dir: &Path, ca: &Ca, extra: &[&str], url_host: &str, body: &str) -> (i32, String) {
    let body_file = dir.join("review.json");
    std::fs::write(&body_file, body).unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args([
            "--resolve",
            &format!("{url_host}:{}:127.0.0.1", ca.webhook_port),
        ])
        .args(extra)
        .args(["-H", "content-type: application/json", "--data-binary"])
        .arg(format!("@{}", body_file.display()))
        .arg(format!("https://{url_host}:{}/inject", ca.webhook_port))
        .output()
        .expect("run curl");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `rampart inject` of the same Pod with the same options, as JSON.
fn injected_by_cli(dir: &Path, pod: &Value) -> Value {
    let file = dir.join("pod.yaml");
    std::fs::write(&file, serde_json::to_string(pod).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["inject", "-q", "--image", IMAGE, "--ca-address", CA_ADDRESS])
        .arg("-f")
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_saphyr::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap()
}

fn apply_patch(answer: &Value, to: &Value) -> Value {
    let patch = answer["response"]["patch"].as_str().expect("a patch");
    let patch: json_patch::Patch = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(patch)
            .unwrap(),
    )
    .unwrap();
    let mut pod = to.clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    pod
}

#[test]
fn the_api_servers_review_gets_the_patch_rampart_inject_would_make() {
    let dir = tempfile::tempdir().unwrap();
    let ca = start_ca(dir.path());
    let cacert = dir.path().join("bundle.pem");
    let cacert = cacert.to_str().unwrap();
    let expected = injected_by_cli(dir.path(), &pod());
    assert_eq!(
        expected["spec"]["initContainers"][0]["name"],
        "rampart-agent"
    );
    for (http, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let (code, out) = curl(
            dir.path(),
            &ca,
            &[http, "--cacert", cacert, "-w", "\n%{http_version}"],
            NAME,
            &review(&pod()),
        );
        assert_eq!(code, 0, "{http}: {out}");
        // The protocol really spoken (curl falls back to HTTP/1.1 without h2 in ALPN).
        let (out, spoken) = out.rsplit_once('\n').unwrap();
        assert_eq!(spoken, version, "{http}");
        let answer: Value = serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(
            answer["response"]["uid"],
            "0df28fbd-5f5f-11e8-bc74-36e6bb280816"
        );
        assert_eq!(answer["response"]["allowed"], true);
        assert_eq!(answer["response"]["patchType"], "JSONPatch");
        assert_eq!(apply_patch(&answer, &pod()), expected, "{http}");
    }

    // Its twins: an opted-out Pod is let through unchanged; a Pod that cannot be injected is
    // refused with the reason the user sees.
    let mut opted_out = pod();
    opted_out["metadata"]["annotations"] = json!({"sidecar.istio.io/inject": "false"});
    let (code, out) = curl(
        dir.path(),
        &ca,
        &["--cacert", cacert],
        NAME,
        &review(&opted_out),
    );
    assert_eq!(code, 0, "{out}");
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none(), "{out}");
    let mut clash = pod();
    clash["spec"]["volumes"] = json!([{"name": "istio-token", "emptyDir": {}}]);
    let (code, out) = curl(
        dir.path(),
        &ca,
        &["--cacert", cacert],
        NAME,
        &review(&clash),
    );
    assert_eq!(code, 0, "{out}");
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["response"]["allowed"], false, "{out}");
    let msg = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(msg.contains("istio-token"), "{msg}");

    // The counters on the CA's /metrics.
    let metrics = Command::new("curl")
        .args(["-sS", "--max-time", "5", &ca.metrics])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    for (outcome, n) in [("injected", 2), ("skipped", 1), ("refused", 1)] {
        let line = format!("rampart_injector_reviews_total{{outcome=\"{outcome}\"}} {n}");
        assert!(metrics.contains(&line), "{line} not in:\n{metrics}");
    }
}

/// The webhook is TLS with the CA's serving certificate only: a client that does not trust
/// the CA's roots, or asks for a name the certificate does not carry, gets no answer; a
/// plaintext request gets no HTTP answer either.
#[test]
fn only_a_client_trusting_the_ca_for_the_served_name_gets_an_answer() {
    let dir = tempfile::tempdir().unwrap();
    let ca = start_ca(dir.path());
    let cacert = dir.path().join("bundle.pem");
    let cacert = cacert.to_str().unwrap();
    let body = review(&pod());
    // The twin that works, so the refusals below are about trust, not the setup.
    let (code, out) = curl(dir.path(), &ca, &["--cacert", cacert], NAME, &body);
    assert_eq!(code, 0, "{out}");
    // System roots only: the CA's root is not among them.
    let (code, out) = curl(dir.path(), &ca, &[], NAME, &body);
    assert_eq!(code, 60, "{out}");
    // A name the serving certificate does not carry.
    let (code, out) = curl(
        dir.path(),
        &ca,
        &["--cacert", cacert],
        "other.istio-system.svc",
        &body,
    );
    assert_eq!(code, 60, "{out}");
    assert!(
        out.contains("subject name") || out.contains("match"),
        "{out}"
    );
    // Plaintext HTTP to the TLS port.
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["-H", "content-type: application/json", "--data", &body])
        .arg(format!("http://127.0.0.1:{}/inject", ca.webhook_port))
        .output()
        .unwrap();
    assert_ne!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "200",
        "plaintext answered"
    );
    assert!(!out.status.success());
}

#[test]
fn bad_injection_options_are_refused_at_start_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["ca", "--listen", "127.0.0.1:0"])
        .arg("--cacerts")
        .arg(dir.path().join("cacerts"))
        .arg("--state")
        .arg(dir.path().join("state"))
        .args([
            "--inject-webhook",
            "127.0.0.1:0",
            "--inject-ca-address",
            "no-port-here",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--inject-ca-address"), "{err}");
    assert!(
        !dir.path().join("state").exists(),
        "the CA started before refusing: {err}"
    );
}

/// Peers that open connections and send nothing cannot lock the API server out: at the
/// connection limit (256) the oldest is closed for the new one, so a review made while 300
/// idle connections are held is answered at once.
#[test]
fn idle_connections_do_not_lock_out_a_review() {
    let dir = tempfile::tempdir().unwrap();
    let ca = start_ca(dir.path());
    let cacert = dir.path().join("bundle.pem");
    let cacert = cacert.to_str().unwrap();
    let idle: Vec<std::net::TcpStream> = (0..300)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", ca.webhook_port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let (code, out) = curl(
        dir.path(),
        &ca,
        &["--cacert", cacert, "--max-time", "3"],
        NAME,
        &review(&pod()),
    );
    assert_eq!(code, 0, "a review behind 300 idle connections: {out}");
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    // The oldest idle ones were closed to make room: their reads end (EOF or reset) where an
    // open one's read times out.
    let closed = idle
        .iter()
        .filter(|s| {
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let mut b = [0u8; 1];
            match std::io::Read::read(&mut &**s, &mut b) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
            }
        })
        .count();
    assert!(closed >= 40, "only {closed} idle connections were closed");
    drop(idle);
    eprintln!(
        "answered behind 300 idle connections in {:?}",
        started.elapsed()
    );
}
