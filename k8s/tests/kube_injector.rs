//! The injection webhook's caBundle, kept equal to the CA's roots by the Lease holder
//! (`rampart_k8s::injector`).
//!
//! THE KUBERNETES API SERVER IS FAKED (`support/fake_api.rs`): the MutatingWebhookConfiguration
//! lives in the in-process fake. No cluster is involved; tests/kubernetes_e2e.rs runs the
//! same against a real API server, which then calls the webhook.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use rampart_k8s::injector::{
    BundleSync, KeeperTiming, WEBHOOK_CONFIG, keep_ca_bundle, sync_ca_bundle,
};
use serde_json::{Value, json};
use support::fake_api::FakeApi;

const CONFIGS: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations";
const ROOTS_A: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
const ROOTS_B: &str = "-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n";

/// A real self-signed root, PEM (the keeper parses roots to build the union during a
/// rotation).
fn real_root(name: &str) -> String {
    let key = rampart_certs::PrivateKey::generate(rampart_certs::KeyAlgorithm::EcdsaP256).unwrap();
    let params = rampart_certs::RootParams {
        common_name: name.to_owned(),
        ..rampart_certs::RootParams::default()
    };
    let ca = rampart_certs::CertificateAuthority::self_signed_root(
        &params,
        key,
        std::time::SystemTime::now(),
    )
    .unwrap();
    rampart_certs::certs_to_pem(std::slice::from_ref(ca.cert()))
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn webhook(name: &str, bundle: Option<&str>) -> Value {
    let mut client_config = json!({
        "service": {"name": "rampart-ca", "namespace": "istio-system", "path": "/inject", "port": 443}
    });
    if let Some(b) = bundle {
        client_config["caBundle"] = b64(b).into();
    }
    json!({
        "name": name,
        "clientConfig": client_config,
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
        "namespaceSelector": {"matchLabels": {"rampart-injection": "enabled"}},
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
        "failurePolicy": "Fail",
    })
}

fn put_config(fake: &FakeApi, hooks: Vec<Value>) {
    fake.put(
        CONFIGS,
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": WEBHOOK_CONFIG, "labels": {"app": "rampart-ca"}},
            "webhooks": hooks,
            // A field k8s-openapi's types do not have: a replace would drop it.
            "futureField": {"kept": true},
        }),
    );
}

fn bundles(fake: &FakeApi) -> Vec<Option<String>> {
    let c = fake.get(CONFIGS, WEBHOOK_CONFIG).unwrap();
    c["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            w["clientConfig"]["caBundle"].as_str().map(|b| {
                String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).unwrap())
                    .unwrap()
            })
        })
        .collect()
}

fn writes(fake: &FakeApi) -> usize {
    fake.calls()
        .iter()
        .filter(|c| {
            (c.starts_with("PUT ") || c.starts_with("PATCH "))
                && c.contains("mutatingwebhookconfigurations")
        })
        .count()
}

#[tokio::test]
async fn every_webhook_gets_the_roots_and_nothing_else_changes() {
    let fake = FakeApi::new();
    let client = fake.client();
    assert_eq!(
        sync_ca_bundle(&client, WEBHOOK_CONFIG, ROOTS_A)
            .await
            .unwrap(),
        BundleSync::Missing
    );
    put_config(
        &fake,
        vec![
            webhook("a.rampart.io", None),
            webhook("b.rampart.io", Some(ROOTS_A)),
        ],
    );
    let before = fake.get(CONFIGS, WEBHOOK_CONFIG).unwrap();
    assert_eq!(
        sync_ca_bundle(&client, WEBHOOK_CONFIG, ROOTS_A)
            .await
            .unwrap(),
        BundleSync::Updated(1)
    );
    assert_eq!(
        bundles(&fake),
        vec![Some(ROOTS_A.to_owned()), Some(ROOTS_A.to_owned())]
    );
    // Only caBundle changed: the object minus caBundle and resourceVersion is as it was,
    // including a field this client's types do not know (it was patched, not replaced).
    let strip = |mut v: Value| {
        v["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("resourceVersion");
        for w in v["webhooks"].as_array_mut().unwrap() {
            w["clientConfig"]
                .as_object_mut()
                .unwrap()
                .remove("caBundle");
        }
        v
    };
    let after = fake.get(CONFIGS, WEBHOOK_CONFIG).unwrap();
    assert_eq!(strip(after), strip(before));
    assert!(
        fake.calls().iter().any(|c| c.starts_with("PATCH ")),
        "{:?}",
        fake.calls()
    );
    // Current: read, not written.
    let w = writes(&fake);
    assert_eq!(
        sync_ca_bundle(&client, WEBHOOK_CONFIG, ROOTS_A)
            .await
            .unwrap(),
        BundleSync::Unchanged
    );
    assert_eq!(writes(&fake), w);
    // The roots rotate (two during the overlap): both webhooks follow.
    let both = format!("{ROOTS_A}{ROOTS_B}");
    assert_eq!(
        sync_ca_bundle(&client, WEBHOOK_CONFIG, &both)
            .await
            .unwrap(),
        BundleSync::Updated(2)
    );
    assert_eq!(bundles(&fake), vec![Some(both.clone()), Some(both)]);
}

/// Only the Lease holder writes; a refused write is reported and retried, and succeeds once
/// the API server allows it.
#[tokio::test]
async fn only_the_holder_keeps_it_and_a_refusal_is_retried() {
    let fake = FakeApi::new();
    put_config(&fake, vec![webhook("a.rampart.io", None)]);
    let holder = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<Result<BundleSync, String>>>> = Arc::default();
    let roots = Arc::new(Mutex::new(ROOTS_A.to_owned()));
    let task = {
        let (h, s, r) = (holder.clone(), seen.clone(), roots.clone());
        tokio::spawn(keep_ca_bundle(
            fake.client(),
            WEBHOOK_CONFIG.to_owned(),
            fast(),
            move || r.lock().unwrap().clone(),
            move || h.load(Ordering::Relaxed),
            move |res| s.lock().unwrap().push(res.clone()),
        ))
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        seen.lock().unwrap().is_empty(),
        "a replica without the Lease looked"
    );
    assert_eq!(bundles(&fake), vec![None]);
    assert!(
        !fake
            .calls()
            .iter()
            .any(|c| c.contains("mutatingwebhookconfigurations")),
        "{:?}",
        fake.calls()
    );

    fake.refuse_writes(CONFIGS, true);
    holder.store(true, Ordering::Relaxed);
    eventually("the refusal reported", || {
        seen.lock().unwrap().iter().any(
            |r| matches!(r, Err(e) if e.contains("403") || e.to_lowercase().contains("forbidden")),
        )
    })
    .await;
    assert_eq!(bundles(&fake), vec![None]);

    fake.refuse_writes(CONFIGS, false);
    eventually("the roots set once writes are allowed", || {
        bundles(&fake) == vec![Some(ROOTS_A.to_owned())]
    })
    .await;
    // A rotation reaches it at a later look.
    *roots.lock().unwrap() = ROOTS_B.to_owned();
    eventually("the rotated roots set", || {
        bundles(&fake) == vec![Some(ROOTS_B.to_owned())]
    })
    .await;
    task.abort();
}

/// Waits (up to 5 s, polling every 20 ms without blocking the runtime) until `done`.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    for _ in 0..250 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not within 5 s: {what}");
}

fn fast() -> KeeperTiming {
    KeeperTiming {
        check: Duration::from_millis(20),
        repair: Duration::from_millis(200),
        overlap: Duration::from_millis(600),
    }
}

/// Two writers that read the same version: the second patch fails its `test` of the
/// resourceVersion (422) instead of landing on a webhook list that may have changed; a
/// later look succeeds.
#[tokio::test]
async fn a_patch_made_from_a_stale_read_is_refused() {
    let fake = FakeApi::new();
    put_config(&fake, vec![webhook("a.rampart.io", None)]);
    fake.hold_gets(CONFIGS, WEBHOOK_CONFIG, 2);
    let (c1, c2) = (fake.client(), fake.client());
    let (r1, r2) = tokio::join!(
        sync_ca_bundle(&c1, WEBHOOK_CONFIG, ROOTS_A),
        sync_ca_bundle(&c2, WEBHOOK_CONFIG, ROOTS_B)
    );
    let results = [r1.map_err(|e| e.to_string()), r2.map_err(|e| e.to_string())];
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "{results:?}");
    let err = results.iter().find_map(|r| r.as_ref().err()).unwrap();
    assert!(
        err.contains("422") || err.contains("Invalid") || err.contains("test"),
        "{err}"
    );
    // The next look, from a fresh read, sets what it wants.
    assert_eq!(
        sync_ca_bundle(&c1, WEBHOOK_CONFIG, ROOTS_B).await.unwrap(),
        BundleSync::Updated(1)
    );
    assert_eq!(bundles(&fake), vec![Some(ROOTS_B.to_owned())]);
}

/// After the CA's roots change, the bundle holds the old and the new roots (replicas still
/// serving the old chain stay verifiable), then the new ones alone; a bundle someone else
/// changed is set back at the next read.
#[tokio::test]
async fn a_root_rotation_overlaps_then_the_new_roots_alone() {
    let fake = FakeApi::new();
    put_config(&fake, vec![webhook("a.rampart.io", None)]);
    let (a, b) = (real_root("root A"), real_root("root B"));
    let roots = Arc::new(Mutex::new(a.clone()));
    let task = {
        let r = roots.clone();
        tokio::spawn(keep_ca_bundle(
            fake.client(),
            WEBHOOK_CONFIG.to_owned(),
            fast(),
            move || r.lock().unwrap().clone(),
            || true,
            |_| {},
        ))
    };
    eventually("root A", || bundles(&fake) == vec![Some(a.clone())]).await;
    *roots.lock().unwrap() = b.clone();
    let both = format!("{b}{a}");
    eventually("roots B and A together", || {
        bundles(&fake) == vec![Some(both.clone())]
    })
    .await;
    eventually("root B alone after the overlap", || {
        bundles(&fake) == vec![Some(b.clone())]
    })
    .await;
    // Someone sets it back to A: repaired at the next read.
    put_config(&fake, vec![webhook("a.rampart.io", Some(&a))]);
    eventually("root B again after an outside change", || {
        bundles(&fake) == vec![Some(b.clone())]
    })
    .await;
    task.abort();
}
