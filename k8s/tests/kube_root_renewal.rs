//! A renewed self-signed root written back to Secret `istio-ca-secret`, so replicas do not
//! diverge at root renewal: the Lease holder replaces the Secret (with its resourceVersion),
//! the others follow the Secret's watch and load it; a 409 means another replica wrote first,
//! and its root is loaded.
//!
//! THE KUBERNETES API SERVER IS FAKED (`support/fake_api.rs`): the Secret lives in the
//! in-process fake, which answers 409 Conflict to a replace with a stale resourceVersion, as
//! a real one does. No cluster is involved.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use rampart_certs::TrustDomain;
use rampart_citadel::{CaConfig, CaState, Metrics, ReloadOutcome, load_initial};
use rampart_k8s::material::{
    CA_SECRET, Origin, RootSync, follow_ca_secret, sync_ca_material, sync_self_signed_root,
};
use serde_json::json;
use support::fake_api::FakeApi;

const SECRETS: &str = "/api/v1/namespaces/istio-system/secrets";
/// Short enough that a root made 9 hours ago is due for renewal (under 20% of it left).
const TTL: Duration = Duration::from_secs(10 * 3600);

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn secret_field(fake: &FakeApi, key: &str) -> String {
    let s = fake.get(SECRETS, CA_SECRET).expect("secret exists");
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(s["data"][key].as_str().expect("field"))
            .unwrap(),
    )
    .unwrap()
}

/// Secret istio-ca-secret holding a self-signed root made 9 hours ago for 10 hours: due for
/// renewal now. Returns its (cert, key) PEM.
fn put_due_root(fake: &FakeApi) -> (String, String) {
    let scratch = tempfile::tempdir().unwrap();
    let made = SystemTime::now() - Duration::from_secs(9 * 3600);
    rampart_citadel::load_or_create_self_signed(scratch.path(), &td(), TTL, made).unwrap();
    let read = |f: &str| std::fs::read_to_string(scratch.path().join(f)).unwrap();
    let (cert, key) = (read("root-cert.pem"), read("root-key.pem"));
    fake.put(
        SECRETS,
        json!({"apiVersion": "v1", "kind": "Secret", "type": "istio.io/ca-root",
               "metadata": {"name": CA_SECRET, "namespace": "istio-system"},
               "data": {"ca-cert.pem": b64(&cert), "ca-key.pem": b64(&key),
                        "cert-chain.pem": "", "root-cert.pem": b64(&cert)}}),
    );
    (cert, key)
}

/// A replica's folders, loaded from the Secret as `rampart ca --kubernetes` does.
async fn replica(fake: &FakeApi, dir: &Path) {
    let origin = sync_ca_material(
        &fake.client(),
        "istio-system",
        &dir.join("cacerts"),
        &dir.join("state"),
        &td(),
        TTL,
    )
    .await
    .unwrap();
    assert_eq!(origin, Origin::SelfSigned { created: false });
}

fn local_root(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("state/root-cert.pem")).unwrap()
}

fn ca_state(dir: &Path) -> Arc<CaState> {
    let mut cfg = CaConfig::new(dir.join("cacerts"), dir.join("state"), td());
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.self_signed_root_ttl = TTL;
    cfg.max_ttl = Duration::from_secs(3600);
    cfg.default_ttl = Duration::from_secs(3600);
    cfg.reload_poll_interval = Duration::from_secs(3600);
    CaState::new(cfg, Metrics::new()).unwrap()
}

fn fingerprint(pem: &str) -> String {
    let der = rampart_certs::parse_certs_pem(pem).unwrap().remove(0);
    rampart_certs::CertInfo::parse(&der)
        .unwrap()
        .sha256_fingerprint
}

#[tokio::test]
async fn the_holders_renewed_root_reaches_the_other_replica_through_the_secret() {
    let fake = FakeApi::new();
    let (old_cert, old_key) = put_due_root(&fake);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    replica(&fake, a.path()).await;
    replica(&fake, b.path()).await;
    // Each CA renews the due root at start, each its own certificate (same key and subject):
    // without the Secret they would now publish and sign under different roots.
    let (ca_a, ca_b) = (ca_state(a.path()), ca_state(b.path()));
    let root_a = ca_a.authority().signing_root().fingerprint.clone();
    assert_ne!(root_a, fingerprint(&old_cert), "A renewed");
    assert_ne!(
        ca_b.authority().signing_root().fingerprint,
        root_a,
        "B renewed on its own: diverged"
    );

    // B follows the Secret; it does not hold the Lease, and the Secret's root is due: B waits.
    let (tx, mut pulled) = tokio::sync::mpsc::unbounded_channel();
    let follower = {
        let ca_b = ca_b.clone();
        tokio::spawn(follow_ca_secret(
            fake.client(),
            "istio-system".into(),
            b.path().join("state"),
            Duration::from_secs(3600),
            || false,
            move || {
                let _ = tx.send(ca_b.reload_now());
            },
        ))
    };
    assert_eq!(
        sync_self_signed_root(
            &fake.client(),
            "istio-system",
            &b.path().join("state"),
            false,
            SystemTime::now()
        )
        .await
        .unwrap(),
        RootSync::Waiting,
        "not the holder: B does not write"
    );
    assert_eq!(fake.count(&format!("PUT {SECRETS}")), 0);

    // A holds the Lease: its renewed root goes into the Secret, key unchanged.
    let outcome = sync_self_signed_root(
        &fake.client(),
        "istio-system",
        &a.path().join("state"),
        true,
        SystemTime::now(),
    )
    .await
    .unwrap();
    assert_eq!(outcome, RootSync::Pushed);
    assert_eq!(secret_field(&fake, "ca-cert.pem"), local_root(a.path()));
    assert_eq!(secret_field(&fake, "root-cert.pem"), local_root(a.path()));
    assert_eq!(*secret_field(&fake, "ca-key.pem"), old_key);

    // B's watch sees the Secret change: B loads A's root and its CA signs under it.
    let reloaded = tokio::time::timeout(Duration::from_secs(10), pulled.recv())
        .await
        .expect("B pulls within 10 s")
        .unwrap();
    assert_eq!(reloaded, ReloadOutcome::Reloaded);
    assert_eq!(local_root(b.path()), local_root(a.path()));
    assert_eq!(ca_b.authority().signing_root().fingerprint, root_a);
    assert!(
        ca_b.authority()
            .roots()
            .iter()
            .any(|r| r.fingerprint == fingerprint(&old_cert)),
        "the old root stays served until it expires"
    );
    // The twin of the reload: the state folder now says a served root, nothing to load.
    assert_eq!(ca_b.reload_now(), ReloadOutcome::Unchanged);
    assert_eq!(ca_a.reload_now(), ReloadOutcome::Unchanged);
    // Settled: A and B agree with the Secret, so nothing more to do on either side.
    for (dir, holder) in [(a.path(), true), (b.path(), false)] {
        let again = sync_self_signed_root(
            &fake.client(),
            "istio-system",
            &dir.join("state"),
            holder,
            SystemTime::now(),
        )
        .await
        .unwrap();
        assert_eq!(again, RootSync::Unchanged);
    }
    assert_eq!(fake.count(&format!("PUT {SECRETS}")), 1);
    follower.abort();
}

#[tokio::test]
async fn two_writers_at_once_one_wins_the_other_loads_its_root() {
    let fake = FakeApi::new();
    put_due_root(&fake);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in [a.path(), b.path()] {
        replica(&fake, d).await;
        // Renews the due root in the state folder, as the CA does.
        load_initial(
            &d.join("cacerts"),
            &d.join("state"),
            &td(),
            TTL,
            SystemTime::now(),
        )
        .unwrap();
    }
    assert_ne!(local_root(a.path()), local_root(b.path()));
    // Both believe they hold the Lease (a hand-over) and read the Secret before either writes.
    fake.hold_gets(SECRETS, CA_SECRET, 2);
    let sync = |d: &Path| {
        let client = fake.client();
        let state = d.join("state");
        async move {
            sync_self_signed_root(&client, "istio-system", &state, true, SystemTime::now())
                .await
                .unwrap()
        }
    };
    let (ra, rb) = tokio::join!(sync(a.path()), sync(b.path()));
    let mut outcomes = [ra, rb];
    outcomes.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(
        outcomes,
        [RootSync::Pulled, RootSync::Pushed],
        "the second replace carries a stale resourceVersion (409): that replica loads the winner's"
    );
    assert_eq!(local_root(a.path()), local_root(b.path()));
    assert_eq!(secret_field(&fake, "ca-cert.pem"), local_root(a.path()));
    assert_eq!(
        fake.count(&format!("PUT {SECRETS}")),
        2,
        "one won, one got 409"
    );
}

#[tokio::test]
async fn a_secret_with_another_key_is_not_followed() {
    let fake = FakeApi::new();
    put_due_root(&fake);
    let a = tempfile::tempdir().unwrap();
    replica(&fake, a.path()).await;
    let before = local_root(a.path());
    // Someone puts a different root (another key) into the Secret.
    let other = tempfile::tempdir().unwrap();
    rampart_citadel::load_or_create_self_signed(other.path(), &td(), TTL, SystemTime::now())
        .unwrap();
    let read = |f: &str| std::fs::read_to_string(other.path().join(f)).unwrap();
    fake.put(
        SECRETS,
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": CA_SECRET, "namespace": "istio-system"},
               "data": {"ca-cert.pem": b64(&read("root-cert.pem")),
                        "ca-key.pem": b64(&read("root-key.pem"))}}),
    );
    for holder in [false, true] {
        let err = sync_self_signed_root(
            &fake.client(),
            "istio-system",
            &a.path().join("state"),
            holder,
            SystemTime::now(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("another key"), "{err}");
    }
    assert_eq!(local_root(a.path()), before, "nothing written locally");
    assert_eq!(
        fake.count(&format!("PUT {SECRETS}")),
        0,
        "nor into the Secret"
    );
}
