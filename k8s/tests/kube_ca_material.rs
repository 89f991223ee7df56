//! CA material from Secrets: plug-in `cacerts`, else the self-signed root in
//! `istio-ca-secret`, created once and never overwritten at start (a renewed root written back
//! by the Lease holder is in kube_root_renewal.rs).
//!
//! THE KUBERNETES API SERVER IS FAKED (`support/fake_api.rs`): Secrets live in the in-process
//! fake, which answers 409 AlreadyExists to the second create, as a real one does. No cluster
//! is involved.

mod support;

use std::path::Path;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use rampart_certs::TrustDomain;
use rampart_citadel::{MaterialSource, load_initial};
use rampart_k8s::material::{
    CA_SECRET, CacertsEvent, Origin, follow_cacerts_reporting, sync_ca_material,
};
use serde_json::json;
use support::fake_api::FakeApi;

const SECRETS: &str = "/api/v1/namespaces/istio-system/secrets";
const TTL: Duration = Duration::from_secs(3600 * 24 * 365);

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

fn secret_field(fake: &FakeApi, name: &str, key: &str) -> Vec<u8> {
    let s = fake.get(SECRETS, name).expect("secret exists");
    base64::engine::general_purpose::STANDARD
        .decode(s["data"][key].as_str().expect("field"))
        .unwrap()
}

/// Loads what a replica would sign with, from its folders, as `rampart ca` does.
fn signing_root(cacerts: &Path, state: &Path) -> (Vec<u8>, MaterialSource) {
    let a = load_initial(cacerts, state, &td(), TTL, SystemTime::now()).unwrap();
    (a.bundle_roots_der(), a.source().clone())
}

trait RootsDer {
    fn bundle_roots_der(&self) -> Vec<u8>;
}

impl RootsDer for rampart_citadel::Authority {
    fn bundle_roots_der(&self) -> Vec<u8> {
        self.roots()
            .iter()
            .flat_map(|r| r.fingerprint.as_bytes().to_vec())
            .collect()
    }
}

#[tokio::test]
async fn two_replicas_starting_together_end_with_one_root() {
    let fake = FakeApi::new();
    // Both replicas' GETs of istio-ca-secret answer only once both have asked: both see
    // "not found", both create, the API server lets one win.
    fake.hold_gets(SECRETS, CA_SECRET, 2);
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let run = |i: usize| {
        let client = fake.client();
        let cacerts = dirs[i].path().join("cacerts");
        let state = dirs[i].path().join("state");
        async move {
            sync_ca_material(&client, "istio-system", &cacerts, &state, &td(), TTL)
                .await
                .unwrap()
        }
    };
    let (a, b) = tokio::join!(run(0), run(1));
    let mut origins = [a, b];
    origins.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(
        origins,
        [
            Origin::SelfSigned { created: false },
            Origin::SelfSigned { created: true }
        ],
        "one created, the other loaded the winner's"
    );
    assert_eq!(
        fake.count(&format!("POST {SECRETS}")),
        2,
        "both tried to create: {:#?}",
        fake.calls()
    );
    let r0 = signing_root(
        &dirs[0].path().join("cacerts"),
        &dirs[0].path().join("state"),
    );
    let r1 = signing_root(
        &dirs[1].path().join("cacerts"),
        &dirs[1].path().join("state"),
    );
    assert!(matches!(r0.1, MaterialSource::SelfSigned(_)));
    assert_eq!(r0.0, r1.0, "both replicas sign under one root");
    // And it is the root in the Secret.
    let in_secret = secret_field(&fake, CA_SECRET, "ca-cert.pem");
    let local = std::fs::read(dirs[0].path().join("state/root-cert.pem")).unwrap();
    assert_eq!(in_secret, local);
    // The key is private on disk.
    use std::os::unix::fs::PermissionsExt;
    for d in &dirs {
        let mode = std::fs::metadata(d.path().join("state/root-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[tokio::test]
async fn existing_istio_ca_secret_is_loaded_never_overwritten() {
    let fake = FakeApi::new();
    let first = tempfile::tempdir().unwrap();
    let o = sync_ca_material(
        &fake.client(),
        "istio-system",
        &first.path().join("c"),
        &first.path().join("s"),
        &td(),
        TTL,
    )
    .await
    .unwrap();
    assert_eq!(o, Origin::SelfSigned { created: true });
    let rv = fake.get(SECRETS, CA_SECRET).unwrap()["metadata"]["resourceVersion"].clone();
    let before = secret_field(&fake, CA_SECRET, "ca-key.pem");
    // A restart with an empty disk: loads the Secret, writes nothing to the API.
    let second = tempfile::tempdir().unwrap();
    let o = sync_ca_material(
        &fake.client(),
        "istio-system",
        &second.path().join("c"),
        &second.path().join("s"),
        &td(),
        TTL,
    )
    .await
    .unwrap();
    assert_eq!(o, Origin::SelfSigned { created: false });
    assert_eq!(fake.count(&format!("POST {SECRETS}")), 1);
    assert_eq!(fake.count(&format!("PUT {SECRETS}")), 0);
    let after = fake.get(SECRETS, CA_SECRET).unwrap();
    assert_eq!(after["metadata"]["resourceVersion"], rv);
    assert_eq!(secret_field(&fake, CA_SECRET, "ca-key.pem"), before);
    assert_eq!(
        std::fs::read(second.path().join("s/root-key.pem")).unwrap(),
        before
    );
}

#[tokio::test]
async fn cacerts_secret_wins_and_is_loaded_as_plugin_material() {
    // Plug-in material made by a root we control.
    let src = tempfile::tempdir().unwrap();
    let root_state = src.path().join("root");
    load_initial(
        &src.path().join("none"),
        &root_state,
        &td(),
        TTL,
        SystemTime::now(),
    )
    .unwrap();
    let root_pem = std::fs::read_to_string(root_state.join("root-cert.pem")).unwrap();
    let key_pem = std::fs::read_to_string(root_state.join("root-key.pem")).unwrap();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let fake = FakeApi::new();
    fake.put(
        SECRETS,
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "cacerts", "namespace": "istio-system"},
               "data": {"ca-cert.pem": b64(&root_pem), "ca-key.pem": b64(&key_pem),
                        "root-cert.pem": b64(&root_pem), "cert-chain.pem": b64(&root_pem)}}),
    );
    let dir = tempfile::tempdir().unwrap();
    let o = sync_ca_material(
        &fake.client(),
        "istio-system",
        &dir.path().join("cacerts"),
        &dir.path().join("state"),
        &td(),
        TTL,
    )
    .await
    .unwrap();
    assert_eq!(o, Origin::Plugin);
    assert!(
        fake.get(SECRETS, CA_SECRET).is_none(),
        "no self-signed root made"
    );
    let (_, source) = signing_root(&dir.path().join("cacerts"), &dir.path().join("state"));
    assert!(matches!(source, MaterialSource::Plugin(_)), "{source:?}");
}

#[tokio::test]
async fn broken_cacerts_secret_is_refused_not_replaced_by_a_self_signed_root() {
    let fake = FakeApi::new();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    fake.put(
        SECRETS,
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "cacerts", "namespace": "istio-system"},
               "data": {"ca-cert.pem": b64("not a certificate"), "ca-key.pem": b64("nor a key"),
                        "root-cert.pem": b64("no")}}),
    );
    let dir = tempfile::tempdir().unwrap();
    let err = sync_ca_material(
        &fake.client(),
        "istio-system",
        &dir.path().join("cacerts"),
        &dir.path().join("state"),
        &td(),
        TTL,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("cacerts"), "{err}");
    assert!(
        fake.get(SECRETS, CA_SECRET).is_none(),
        "fail closed: no fallback root"
    );
    // Why the replica does not start, on the Secret itself (kubectl describe secret cacerts).
    let events = fake.objects(EVENTS);
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["involvedObject"]["kind"], "Secret");
    assert_eq!(e["involvedObject"]["name"], "cacerts");
    assert_eq!(e["reason"], "RampartInvalidCAMaterial");
    assert_eq!(e["type"], "Warning");
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("does not start") && msg.contains("ca-cert.pem"),
        "{msg}"
    );
    assert!(!msg.contains(".check-"), "the scratch folder leaked: {msg}");
}

const EVENTS: &str = "/api/v1/namespaces/istio-system/events";

/// Waits (up to 5 s) until the fake holds `n` Events in istio-system.
async fn events_now(fake: &FakeApi, n: usize) -> Vec<serde_json::Value> {
    for _ in 0..250 {
        let e = fake.objects(EVENTS);
        if e.len() >= n {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not {n} Events within 5 s: {:?}", fake.objects(EVENTS));
}

/// Self-signed root material (cert, key) made in a temporary folder.
fn material() -> (String, String) {
    let src = tempfile::tempdir().unwrap();
    let state = src.path().join("root");
    load_initial(
        &src.path().join("none"),
        &state,
        &td(),
        TTL,
        SystemTime::now(),
    )
    .unwrap();
    (
        std::fs::read_to_string(state.join("root-cert.pem")).unwrap(),
        std::fs::read_to_string(state.join("root-key.pem")).unwrap(),
    )
}

fn put_cacerts(fake: &FakeApi, files: &[(&str, &str)]) {
    put_cacerts_typed(fake, "Opaque", files);
}

/// Secret `cacerts` of type `type_` (`kubernetes.io/tls` is what cert-manager writes).
fn put_cacerts_typed(fake: &FakeApi, type_: &str, files: &[(&str, &str)]) {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let data: serde_json::Map<String, serde_json::Value> = files
        .iter()
        .map(|(k, v)| (k.to_string(), json!(b64(v))))
        .collect();
    fake.put(
        SECRETS,
        json!({"apiVersion": "v1", "kind": "Secret", "type": type_,
               "metadata": {"name": "cacerts", "namespace": "istio-system"}, "data": data}),
    );
}

#[tokio::test]
async fn cacerts_changes_are_followed_and_broken_ones_refused_leaving_the_files() {
    use rampart_k8s::material::refresh_cacerts;
    let (a_cert, a_key) = material();
    let (b_cert, b_key) = material();
    let fake = FakeApi::new();
    put_cacerts(
        &fake,
        &[
            ("ca-cert.pem", &a_cert),
            ("ca-key.pem", &a_key),
            ("root-cert.pem", &a_cert),
            ("cert-chain.pem", &a_cert),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let cacerts = dir.path().join("cacerts");
    let client = fake.client();
    let o = sync_ca_material(
        &client,
        "istio-system",
        &cacerts,
        &dir.path().join("s"),
        &td(),
        TTL,
    )
    .await
    .unwrap();
    assert_eq!(o, Origin::Plugin);
    assert!(
        !refresh_cacerts(&client, "istio-system", &cacerts, &td())
            .await
            .unwrap()
    );

    // Rotated to B, without cert-chain.pem: written, the stale chain file removed.
    put_cacerts(
        &fake,
        &[
            ("ca-cert.pem", &b_cert),
            ("ca-key.pem", &b_key),
            ("root-cert.pem", &b_cert),
        ],
    );
    assert!(
        refresh_cacerts(&client, "istio-system", &cacerts, &td())
            .await
            .unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(cacerts.join("ca-cert.pem")).unwrap(),
        b_cert
    );
    assert!(!cacerts.join("cert-chain.pem").exists());
    assert!(
        !refresh_cacerts(&client, "istio-system", &cacerts, &td())
            .await
            .unwrap()
    );
    let (_, source) = signing_root(&cacerts, &dir.path().join("s"));
    assert!(matches!(source, MaterialSource::Plugin(_)));

    // A key that does not match its certificate: refused, the files stay B.
    put_cacerts(
        &fake,
        &[
            ("ca-cert.pem", &a_cert),
            ("ca-key.pem", &b_key),
            ("root-cert.pem", &a_cert),
        ],
    );
    let err = refresh_cacerts(&client, "istio-system", &cacerts, &td())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("istio-system/cacerts"), "{err}");
    assert_eq!(
        std::fs::read_to_string(cacerts.join("ca-cert.pem")).unwrap(),
        b_cert
    );
    assert_eq!(
        std::fs::read_to_string(cacerts.join("ca-key.pem")).unwrap(),
        b_key
    );
    let leftovers: Vec<_> = std::fs::read_dir(&cacerts)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".check-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "scratch folders removed: {leftovers:?}"
    );
}

/// The next event from a follower matching `want`, skipping others (bounded: 10 s).
async fn next_event(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<CacertsEvent>,
    what: &str,
    want: impl Fn(&CacertsEvent) -> bool,
) -> CacertsEvent {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) if want(&e) => return e,
            Ok(Some(_)) => {}
            Ok(None) => panic!("follower ended waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

/// Starts following Secret cacerts (resync `resync`), its events sent to the receiver.
fn follow(
    fake: &FakeApi,
    cacerts: &Path,
    resync: Duration,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<CacertsEvent>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(follow_cacerts_reporting(
        fake.client(),
        "istio-system".into(),
        cacerts.to_owned(),
        td(),
        resync,
        move |e| {
            let _ = tx.send(e.clone());
        },
    ));
    (task, rx)
}

#[tokio::test]
async fn cacerts_watch_events_reach_the_folder_and_broken_ones_are_refused() {
    let (a_cert, a_key) = material();
    let (b_cert, b_key) = material();
    let fake = FakeApi::new();
    let a = [
        ("ca-cert.pem", a_cert.as_str()),
        ("ca-key.pem", &a_key),
        ("root-cert.pem", &a_cert),
    ];
    put_cacerts(&fake, &a);
    let dir = tempfile::tempdir().unwrap();
    let cacerts = dir.path().join("cacerts");
    let state = dir.path().join("s");
    let origin = sync_ca_material(&fake.client(), "istio-system", &cacerts, &state, &td(), TTL)
        .await
        .unwrap();
    assert_eq!(origin, Origin::Plugin);
    let gets = || fake.count(&format!("GET {SECRETS}/cacerts"));
    let gets_at_start = gets();
    // A resync of an hour: whatever reaches the folder below came by the watch.
    let (task, mut rx) = follow(&fake, &cacerts, Duration::from_secs(3600));
    let first = next_event(&mut rx, "the initial list", |_| true).await;
    assert_eq!(first, CacertsEvent::Written { changed: false });
    let read = |f: &str| std::fs::read_to_string(cacerts.join(f)).unwrap();

    // Rotated to B: the watch event writes B into the folder.
    put_cacerts(
        &fake,
        &[
            ("ca-cert.pem", &b_cert),
            ("ca-key.pem", &b_key),
            ("root-cert.pem", &b_cert),
        ],
    );
    let e = next_event(&mut rx, "B written", |e| {
        matches!(e, CacertsEvent::Written { changed: true })
    })
    .await;
    assert_eq!(e, CacertsEvent::Written { changed: true });
    assert_eq!(read("ca-cert.pem"), b_cert);
    assert_eq!(read("ca-key.pem"), b_key);
    let (_, source) = signing_root(&cacerts, &state);
    assert!(matches!(source, MaterialSource::Plugin(_)));

    // Another Secret of the namespace changing is not this watch's business.
    fake.put(
        SECRETS,
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "unrelated", "namespace": "istio-system"},
               "data": {"ca-cert.pem": "YnJva2Vu"}}),
    );

    // The twin: a key that does not match its certificate is refused; the files stay B.
    put_cacerts(
        &fake,
        &[
            ("ca-cert.pem", &a_cert),
            ("ca-key.pem", &b_key),
            ("root-cert.pem", &a_cert),
        ],
    );
    assert!(
        fake.objects(EVENTS).is_empty(),
        "no Event for good material: {:?}",
        fake.objects(EVENTS)
    );
    let e = next_event(&mut rx, "the refusal", |_| true).await;
    match &e {
        CacertsEvent::Refused(why) => assert!(why.contains("istio-system/cacerts"), "{why}"),
        other => {
            panic!("expected a refusal (and no event for the unrelated Secret), got {other:?}")
        }
    }
    assert_eq!(read("ca-cert.pem"), b_cert);
    assert_eq!(read("ca-key.pem"), b_key);
    // The refusal is also a Warning Event on the Secret, naming the Secret's key (not the
    // scratch folder the material was checked in).
    let events = events_now(&fake, 1).await;
    let ev = &events[0];
    assert_eq!(ev["involvedObject"]["name"], "cacerts");
    assert_eq!(ev["reason"], "RampartInvalidCAMaterial");
    let msg = ev["message"].as_str().unwrap();
    assert!(
        msg.contains("keeps its last good material") && msg.contains("ca-key.pem"),
        "{msg}"
    );
    assert!(!msg.contains(".check-"), "{msg}");

    // Deleted: reported, and the folder keeps the last good material.
    fake.delete(SECRETS, "cacerts");
    let e = next_event(&mut rx, "the deletion", |_| true).await;
    assert_eq!(e, CacertsEvent::Deleted);
    assert_eq!(read("ca-cert.pem"), b_cert);
    assert_eq!(read("ca-key.pem"), b_key);
    assert_eq!(
        gets(),
        gets_at_start,
        "no GET of cacerts while the watch works"
    );
    task.abort();
}

#[tokio::test]
async fn cacerts_is_read_every_resync_while_its_watch_fails() {
    let (a_cert, a_key) = material();
    let (b_cert, b_key) = material();
    let fake = FakeApi::new();
    put_cacerts(
        &fake,
        &[
            ("ca-cert.pem", &a_cert),
            ("ca-key.pem", &a_key),
            ("root-cert.pem", &a_cert),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let cacerts = dir.path().join("cacerts");
    sync_ca_material(
        &fake.client(),
        "istio-system",
        &cacerts,
        &dir.path().join("s"),
        &td(),
        TTL,
    )
    .await
    .unwrap();
    // The API server refuses lists and watches of the namespace's Secrets (an outage, or
    // RBAC without list/watch): the follower falls back to a GET every resync.
    fake.fail_watches(SECRETS, true);
    let (task, mut rx) = follow(&fake, &cacerts, Duration::from_millis(200));
    next_event(&mut rx, "the watch failure", |e| {
        matches!(e, CacertsEvent::WatchFailed(_))
    })
    .await;
    put_cacerts(
        &fake,
        &[
            ("ca-cert.pem", &b_cert),
            ("ca-key.pem", &b_key),
            ("root-cert.pem", &b_cert),
        ],
    );
    next_event(&mut rx, "B written by a resync", |e| {
        matches!(e, CacertsEvent::Written { changed: true })
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(cacerts.join("ca-cert.pem")).unwrap(),
        b_cert
    );
    assert!(fake.count(&format!("GET {SECRETS}/cacerts")) >= 2);
    task.abort();
}

// === cert-manager's kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt) ===

/// Every file in `dir` with its content and mode (scratch folders excluded).
fn folder(dir: &Path) -> Vec<(String, String, u32)> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            let name = e.file_name().into_string().unwrap();
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            (
                name,
                text,
                e.metadata().unwrap().permissions().mode() & 0o777,
            )
        })
        .collect();
    out.sort();
    out
}

fn names(dir: &Path) -> Vec<String> {
    folder(dir).into_iter().map(|(n, _, _)| n).collect()
}

fn mode(dir: &Path, file: &str) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(dir.join(file))
        .unwrap()
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn cert_manager_tls_secret_is_plugin_material_and_layout_switches_leave_no_stale_files() {
    use rampart_certs::test_util::{CertManagerCa, CertManagerOptions};
    use rampart_k8s::material::refresh_cacerts;
    let cm = CertManagerCa::new(
        "cm",
        CertManagerOptions {
            issuer_chain: true,
            ..Default::default()
        },
    );
    let tls = [
        ("tls.crt", cm.tls_crt.as_str()),
        ("tls.key", cm.tls_key.as_str()),
        ("ca.crt", cm.ca_crt.as_str()),
    ];
    let fake = FakeApi::new();
    put_cacerts_typed(&fake, "kubernetes.io/tls", &tls);
    let dir = tempfile::tempdir().unwrap();
    let cacerts = dir.path().join("cacerts");
    let state = dir.path().join("s");
    let client = fake.client();
    let o = sync_ca_material(&client, "istio-system", &cacerts, &state, &td(), TTL)
        .await
        .unwrap();
    assert_eq!(o, Origin::Plugin);
    assert!(
        fake.get(SECRETS, CA_SECRET).is_none(),
        "no self-signed root made"
    );
    assert_eq!(names(&cacerts), ["ca.crt", "tls.crt", "tls.key"]);
    assert_eq!(mode(&cacerts, "tls.key"), 0o600);
    assert_eq!(mode(&cacerts, "tls.crt"), 0o644);
    let signer = |dir: &Path| {
        let a = load_initial(dir, &state, &td(), TTL, SystemTime::now()).unwrap();
        assert!(matches!(a.source(), MaterialSource::Plugin(_)));
        a.signer().ca_cert().clone()
    };
    assert_eq!(signer(&cacerts), cm.signing_cert);

    // Switched to the Istio layout (Opaque): the tls files go.
    let (a_cert, a_key) = material();
    let istio = [
        ("ca-cert.pem", a_cert.as_str()),
        ("ca-key.pem", a_key.as_str()),
        ("root-cert.pem", a_cert.as_str()),
    ];
    put_cacerts(&fake, &istio);
    assert!(
        refresh_cacerts(&client, "istio-system", &cacerts, &td())
            .await
            .unwrap()
    );
    assert_eq!(
        names(&cacerts),
        ["ca-cert.pem", "ca-key.pem", "root-cert.pem"]
    );
    assert_eq!(mode(&cacerts, "ca-key.pem"), 0o600);
    let a_der = rampart_certs::parse_certs_pem(&a_cert).unwrap().remove(0);
    assert_eq!(signer(&cacerts), a_der);

    // And back, as an Opaque Secret with the tls keys: the Istio files go.
    put_cacerts(&fake, &tls);
    assert!(
        refresh_cacerts(&client, "istio-system", &cacerts, &td())
            .await
            .unwrap()
    );
    assert_eq!(names(&cacerts), ["ca.crt", "tls.crt", "tls.key"]);
    assert_eq!(mode(&cacerts, "tls.key"), 0o600);
    assert_eq!(signer(&cacerts), cm.signing_cert);
    let good = folder(&cacerts);

    // Broken tls Secrets are refused naming the file; the folder stays as it was.
    let other = CertManagerCa::new("other", CertManagerOptions::default());
    let broken: [(&[(&str, &str)], &str); 4] = [
        (
            &[
                ("tls.crt", &cm.tls_crt),
                ("tls.key", &other.tls_key),
                ("ca.crt", &cm.ca_crt),
            ],
            "tls.key",
        ),
        (
            &[("tls.crt", &cm.tls_crt), ("tls.key", &cm.tls_key)],
            "missing ca.crt",
        ),
        (
            &[
                ("tls.crt", &cm.tls_crt),
                ("tls.key", &cm.tls_key),
                ("ca.crt", &other.ca_crt),
            ],
            "ca.crt",
        ),
        (
            &[("tls.key", &cm.tls_key), ("ca.crt", &cm.ca_crt)],
            "neither tls.crt",
        ),
    ];
    for (files, needle) in broken {
        put_cacerts_typed(&fake, "kubernetes.io/tls", files);
        let err = refresh_cacerts(&client, "istio-system", &cacerts, &td())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("istio-system/cacerts") && err.contains(needle),
            "{err} should name {needle}"
        );
        assert_eq!(folder(&cacerts), good, "folder untouched after: {err}");
    }

    // At start a broken tls Secret fails closed: no self-signed root instead.
    let fresh = tempfile::tempdir().unwrap();
    put_cacerts_typed(
        &fake,
        "kubernetes.io/tls",
        &[
            ("tls.crt", &cm.tls_crt),
            ("tls.key", &other.tls_key),
            ("ca.crt", &cm.ca_crt),
        ],
    );
    let err = sync_ca_material(
        &client,
        "istio-system",
        &fresh.path().join("cacerts"),
        &fresh.path().join("s"),
        &td(),
        TTL,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("tls.key"), "{err}");
    assert!(fake.get(SECRETS, CA_SECRET).is_none());
}
