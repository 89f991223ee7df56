//! Revocations shared between CA replicas through ConfigMap `rampart-ca-revocations`
//! (`rampart_k8s::revocations`): two real CA states (each its own state directory,
//! `revocations.json` and signed CRL), each with its own sync task.
//!
//! THE KUBERNETES API SERVER IS FAKED (`support/fake_api.rs`): objects, watches and
//! resourceVersions (409 on a stale one). No cluster is involved.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use rampart_certs::{RevocationReason, TrustDomain};
use rampart_citadel::{CaConfig, CaState, Metrics, REVOCATIONS_FILE, RevocationState};
use rampart_k8s::revocations::{REVOCATIONS_CONFIGMAP, REVOCATIONS_KEY, RevocationSync};
use serde_json::{Value, json};
use support::fake_api::FakeApi;

const NS: &str = "istio-system";
const COLL: &str = "/api/v1/namespaces/istio-system/configmaps";
const ID: &str = "spiffe://cluster.local/ns/app/sa/app";

struct Replica {
    dir: tempfile::TempDir,
    state: Arc<CaState>,
    sync: Option<tokio::task::JoinHandle<()>>,
    metrics: Arc<rampart_k8s::revocations::RevocationSyncMetrics>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(t) = self.sync.take() {
            t.abort();
        }
    }
}

/// A CA (self-signed root in its own temp dir) sharing its revocations through `client`.
fn replica(client: kube::Client) -> Replica {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = CaConfig::new(
        dir.path().join("cacerts"),
        dir.path().join("state"),
        TrustDomain::new("cluster.local").unwrap(),
    );
    cfg.reload_poll_interval = Duration::from_secs(3600);
    let state = CaState::new(cfg, Metrics::new()).unwrap();
    let sync =
        RevocationSync::new(client, NS, state.clone()).with_retry(Duration::from_millis(100));
    let metrics = sync.metrics();
    Replica {
        dir,
        state,
        sync: Some(tokio::spawn(sync.run())),
        metrics,
    }
}

impl Replica {
    /// Revokes `serial` here, as `rampart ca revoke` through the admin socket does.
    fn revoke(&self, serial: &str) {
        let out = self
            .state
            .revoke(
                &[(
                    serial.to_owned(),
                    ID.to_owned(),
                    SystemTime::now() + Duration::from_secs(3600),
                )],
                Some(RevocationReason::KeyCompromise),
            )
            .unwrap();
        assert!(out[0].new);
    }

    /// Whether `serial` is on the CRL this replica serves (GetCrls, istio-ca-crl).
    fn on_crl(&self, serial: &str) -> bool {
        let cur = self.state.revocations().current();
        let own = cur.own.as_ref().expect("the CA signs its own CRL");
        own.revoked_certs().any(|r| r.serial_hex == serial)
    }

    /// Whether `serial` is in this replica's revocations.json (read from disk).
    fn persisted(&self, serial: &str) -> bool {
        load(self.dir.path()).find(serial).is_some()
    }
}

fn load(dir: &Path) -> RevocationState {
    RevocationState::load(&dir.join("state").join(REVOCATIONS_FILE)).unwrap()
}

/// The entries of the shared object (empty when it does not exist).
fn shared(fake: &FakeApi) -> Vec<Value> {
    let Some(cm) = fake.get(COLL, REVOCATIONS_CONFIGMAP) else {
        return Vec::new();
    };
    let text = cm["data"][REVOCATIONS_KEY].as_str().unwrap();
    let doc: Value = serde_json::from_str(text).unwrap();
    doc["revoked"].as_array().unwrap().clone()
}

fn shared_serials(fake: &FakeApi) -> Vec<String> {
    shared(fake)
        .iter()
        .map(|e| e["serial"].as_str().unwrap_or("").to_owned())
        .collect()
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_replica_reaches_the_other_replicas_crl_and_state() {
    let fake = FakeApi::new();
    let a = replica(fake.client());
    let b = replica(fake.client());
    // Negative first: nothing revoked, nothing shared, nothing on B's CRL.
    assert!(!b.on_crl("0a1b2c3d"));
    a.revoke("0a1b2c3d");
    assert!(a.on_crl("0a1b2c3d"), "the local revocation applies at once");
    wait_until("B's CRL has A's revocation", || b.on_crl("0a1b2c3d")).await;
    assert!(b.persisted("0a1b2c3d"), "merged into B's revocations.json");
    let (ea, eb) = (
        load(a.dir.path()).find("0a1b2c3d").cloned().unwrap(),
        load(b.dir.path()).find("0a1b2c3d").cloned().unwrap(),
    );
    assert_eq!(ea, eb, "B keeps A's time, reason, identity and not-after");
    assert_eq!(eb.reason.as_deref(), Some("keyCompromise"));
    assert_eq!(shared_serials(&fake), ["0a1b2c3d"]);
    // (counted just after the write and the merge that the waits above saw)
    wait_until("A counts its upload", || a.metrics.uploaded() == 1).await;
    wait_until("B counts its merge", || b.metrics.merged() == 1).await;
    // The twin: a serial revoked nowhere is on neither CRL, in neither file, not shared.
    for r in [&a, &b] {
        assert!(!r.on_crl("0badbeef"));
        assert!(!r.persisted("0badbeef"));
    }
    assert!(!shared_serials(&fake).contains(&"0badbeef".to_owned()));
    // The watch asked for the one object by name.
    assert!(
        fake.calls()
            .iter()
            .any(|c| c.starts_with(&format!("GET {COLL}?"))
                && c.contains("fieldSelector=metadata.name%3Drampart-ca-revocations")),
        "{:#?}",
        fake.calls()
    );

    // A third replica started later (or restarted with an empty state) gets it at start.
    let c = replica(fake.client());
    wait_until("a new replica has the shared revocation", || {
        c.on_crl("0a1b2c3d")
    })
    .await;
    assert!(!c.on_crl("0badbeef"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_revocations_on_both_replicas_end_with_both_serials() {
    let fake = FakeApi::new();
    let a = replica(fake.client());
    let b = replica(fake.client());
    a.revoke("01");
    wait_until("B has the first revocation", || b.on_crl("01")).await;
    // Let both replicas' passes after that settle (no read of the object for 500 ms), so the
    // two held reads below are the two revocations' passes.
    let get = format!("GET {COLL}/{REVOCATIONS_CONFIGMAP}");
    loop {
        let n = fake.count(&get);
        tokio::time::sleep(Duration::from_millis(500)).await;
        if fake.count(&get) == n {
            break;
        }
    }
    let put = format!("PUT {COLL}/{REVOCATIONS_CONFIGMAP}");
    let puts_before = fake.count(&put);
    // Both read the object before either writes: one replace is refused (409), re-read,
    // merged and written again.
    fake.hold_gets(COLL, REVOCATIONS_CONFIGMAP, 2);
    assert!(!a.on_crl("02") && !b.on_crl("03"));
    a.revoke("02");
    b.revoke("03");
    wait_until("both CRLs have both serials", || {
        ["01", "02", "03"]
            .iter()
            .all(|s| a.on_crl(s) && b.on_crl(s))
    })
    .await;
    wait_until("the object has both serials", || {
        let mut s = shared_serials(&fake);
        s.sort();
        s == ["01", "02", "03"]
    })
    .await;
    assert!(
        fake.count(&put) - puts_before >= 3,
        "two replaces from one resourceVersion, one refused and written again: {:#?}",
        fake.calls()
    );
    for s in ["01", "02", "03"] {
        assert!(a.persisted(s) && b.persisted(s), "{s} persisted on both");
    }
    // The twin: nothing else appeared.
    for r in [&a, &b] {
        assert!(!r.on_crl("04"));
        assert_eq!(load(r.dir.path()).revoked.len(), 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_shared_entry_is_refused_alone_and_never_dropped() {
    let fake = FakeApi::new();
    let now = "2026-01-01T00:00:00Z";
    let doc = json!({"revoked": [
        {"serial": "0a0a", "revoked_at": now, "reason": "keyCompromise"},
        {"serial": "zz-not-hex", "revoked_at": now},
        {"serial": "0c0c", "revoked_at": now, "reason": "notAReason"},
        {"serial": "0d0d"},
        {"serial": "0e0e", "revoked_at": "yesterday"},
        {"serial": "0f0f", "revoked_at": now, "spiffe_id": ID},
    ]});
    fake.put(
        COLL,
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": REVOCATIONS_CONFIGMAP, "namespace": NS},
               "data": {REVOCATIONS_KEY: doc.to_string()}}),
    );
    let b = replica(fake.client());
    wait_until("the valid entries are on B's CRL", || {
        b.on_crl("0a0a") && b.on_crl("0f0f")
    })
    .await;
    wait_until("the refusals are counted", || b.metrics.refused() == 4).await;
    // The invalid ones are not on the CRL, and B's file stays loadable with the valid two.
    for s in ["0c0c", "0d0d", "0e0e"] {
        assert!(!b.on_crl(s), "{s} refused");
    }
    let mut mine: Vec<_> = load(b.dir.path())
        .revoked
        .into_iter()
        .map(|r| r.serial)
        .collect();
    mine.sort();
    assert_eq!(mine, ["0a0a", "0f0f"]);
    // A local revocation is added beside them: entries are only ever added.
    b.revoke("1234");
    wait_until("B's revocation is shared", || {
        shared_serials(&fake).contains(&"1234".to_owned())
    })
    .await;
    assert_eq!(
        shared_serials(&fake),
        ["0a0a", "zz-not-hex", "0c0c", "0d0d", "0e0e", "0f0f", "1234"]
    );
}

/// A client of `fake` whose every request fails (connection refused) while `down`.
fn flaky_client(fake: &FakeApi, down: Arc<AtomicBool>) -> kube::Client {
    let inner = fake.client();
    let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
        let (inner, down) = (inner.clone(), down.clone());
        async move {
            if down.load(Ordering::SeqCst) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "API server unreachable (test)",
                ));
            }
            inner.send(req).await.map_err(std::io::Error::other)
        }
    });
    kube::Client::new(svc, "default")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_api_down_a_local_revocation_applies_and_is_shared_when_it_is_back() {
    let fake = FakeApi::new();
    let down = Arc::new(AtomicBool::new(true));
    let a = replica(flaky_client(&fake, down.clone()));
    let b = replica(fake.client());
    a.revoke("abcd");
    // Applied and persisted locally although the API is unreachable.
    assert!(a.on_crl("abcd"));
    assert!(a.persisted("abcd"));
    wait_until("A reports the failed upload and retries", || {
        a.metrics.failing() && a.metrics.failures() >= 2
    })
    .await;
    // The twin: while A cannot reach the API, B does not have it.
    assert!(!b.on_crl("abcd"));
    assert!(shared(&fake).is_empty());

    down.store(false, Ordering::SeqCst);
    wait_until("B has A's revocation once the API is back", || {
        b.on_crl("abcd")
    })
    .await;
    assert!(b.persisted("abcd"));
    wait_until("A reports sharing works again", || !a.metrics.failing()).await;
    assert_eq!(shared_serials(&fake), ["abcd"]);
    assert!(!b.on_crl("abce"));
}

/// What `rampart ca revoke` waits on: shared once the serial is in the object; failing, with
/// the API's reason, when the object cannot be written; and shared after the API is back
/// (asked again, as a rerun of the command does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_learns_whether_its_serials_were_shared() {
    use rampart_citadel::ShareState;
    let fake = FakeApi::new();
    let down = Arc::new(AtomicBool::new(false));
    let a = replica(flaky_client(&fake, down.clone()));
    let share = a
        .state
        .revocation_share()
        .expect("the sync registered itself");
    let wait = |serial: &str| {
        let (share, serial) = (share.clone(), serial.to_owned());
        tokio::task::spawn_blocking(move || share.wait_shared(&[serial], Duration::from_secs(10)))
    };

    a.revoke("0b0b");
    let r = wait("0b0b").await.unwrap();
    assert_eq!(r.state, ShareState::Shared, "{r:?}");
    assert_eq!(r.target, "ConfigMap istio-system/rampart-ca-revocations");
    assert_eq!(shared_serials(&fake), ["0b0b"]);

    // The twin: the API refuses the write. The wait ends at the failed attempt, with its reason.
    fake.refuse_writes(COLL, true);
    a.revoke("0c0c");
    let r = wait("0c0c").await.unwrap();
    assert_eq!(r.state, ShareState::Failing, "{r:?}");
    let why = r.error.unwrap_or_default();
    assert!(why.contains("403") && why.contains("forbidden"), "{why}");
    assert_eq!(shared_serials(&fake), ["0b0b"]);
    // Unreachable API: failing too.
    down.store(true, Ordering::SeqCst);
    let r = wait("0c0c").await.unwrap();
    assert_eq!(r.state, ShareState::Failing, "{r:?}");
    assert!(r.error.is_some());

    // Back: asking again gets a pass now (not after the backoff) and the answer is shared.
    fake.refuse_writes(COLL, false);
    down.store(false, Ordering::SeqCst);
    let r = wait("0c0c").await.unwrap();
    assert_eq!(r.state, ShareState::Shared, "{r:?}");
    assert_eq!(shared_serials(&fake), ["0b0b", "0c0c"]);
}

/// Who can write the object cannot take a revocation off the replicas' CRLs by moving its
/// not-after into the past: the replica holding the entry writes its own back, a replica that
/// starts meanwhile ends with it on its CRL, and a not-after only ever moves later. An entry
/// past the prune horizon (expired more than a week ago) leaves the object and is merged
/// nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_moved_into_the_past_is_written_back_and_old_entries_leave() {
    let fake = FakeApi::new();
    let a = replica(fake.client());
    a.revoke("7a7a");
    wait_until("the object has A's entry", || {
        shared_serials(&fake) == ["7a7a"]
    })
    .await;
    let honest = shared(&fake)[0]["not_after"].as_str().unwrap().to_owned();

    // Long past the prune horizon (a week after expiry) whenever this runs.
    let month_ago = "2020-01-01T00:00:00Z";
    let mut cm = fake.get(COLL, REVOCATIONS_CONFIGMAP).unwrap();
    let doc = json!({"revoked": [
        {"serial": "7a7a", "revoked_at": month_ago, "not_after": month_ago},
        {"serial": "7b7b", "revoked_at": month_ago, "not_after": month_ago},
    ]});
    cm["data"][REVOCATIONS_KEY] = json!(doc.to_string());
    fake.put(COLL, cm);
    let b = replica(fake.client());

    wait_until("A writes its entry back and drops the expired one", || {
        let e = shared(&fake);
        e.len() == 1 && e[0]["serial"] == "7a7a" && e[0]["not_after"] == honest.as_str()
    })
    .await;
    wait_until("B enforces A's revocation", || b.on_crl("7a7a")).await;
    assert_eq!(
        load(b.dir.path())
            .find("7a7a")
            .unwrap()
            .not_after
            .as_deref(),
        Some(honest.as_str())
    );
    assert!(a.on_crl("7a7a"));
    // The twin: the entry that expired years ago is on no CRL and in neither file.
    for r in [&a, &b] {
        assert!(!r.on_crl("7b7b"));
        assert!(!r.persisted("7b7b"));
    }
}

/// An invalid copy of a serial does not count as the serial being shared: neither a copy
/// spoiled in place (a replica refuses to merge it) nor a spoiled copy with a far not-after
/// beside a valid one moved into the past. The replica holding the entry writes it back, and
/// a replica started after the change enforces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_copy_does_not_hide_a_missing_or_shortened_entry() {
    let fake = FakeApi::new();
    let a = replica(fake.client());
    a.revoke("8a8a");
    a.revoke("8b8b");
    wait_until("the object has A's entries", || {
        shared_serials(&fake).len() == 2
    })
    .await;
    let honest: Vec<Value> = shared(&fake);
    let past = "2020-01-01T00:00:00Z";
    let mut cm = fake.get(COLL, REVOCATIONS_CONFIGMAP).unwrap();
    let doc = json!({"revoked": [
        // 8a8a spoiled in place: an unknown reason makes every replica refuse it.
        {"serial": "8a8a", "revoked_at": past, "reason": "bogus"},
        // 8b8b moved into the past, and a spoiled copy claiming a far not-after.
        {"serial": "8b8b", "revoked_at": past, "not_after": past},
        {"serial": "8b8b", "revoked_at": "x", "not_after": "9999-01-01T00:00:00Z"},
    ]});
    cm["data"][REVOCATIONS_KEY] = json!(doc.to_string());
    fake.put(COLL, cm);
    let b = replica(fake.client());

    wait_until("A writes both entries back as they were", || {
        let now = shared(&fake);
        honest.iter().all(|e| now.contains(e))
    })
    .await;
    wait_until("B enforces both", || b.on_crl("8a8a") && b.on_crl("8b8b")).await;
    assert!(a.on_crl("8a8a") && a.on_crl("8b8b"));
    // The twin: nothing else was revoked on B.
    assert!(!b.on_crl("8c8c"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_entries_from_the_object_un_revokes_nothing() {
    let fake = FakeApi::new();
    let a = replica(fake.client());
    let b = replica(fake.client());
    a.revoke("5151");
    wait_until("B has it", || b.on_crl("5151")).await;

    // Someone with write access empties the list: the replicas write their entries back,
    // and keep enforcing them meanwhile.
    let mut cm = fake.get(COLL, REVOCATIONS_CONFIGMAP).unwrap();
    cm["data"][REVOCATIONS_KEY] = json!("{\"revoked\": []}");
    fake.put(COLL, cm);
    assert!(a.on_crl("5151") && b.on_crl("5151"));
    wait_until("the entry is back in the object", || {
        shared_serials(&fake) == ["5151"]
    })
    .await;

    // Deleting the object: it is written again.
    fake.delete(COLL, REVOCATIONS_CONFIGMAP);
    wait_until("the object is back with the entry", || {
        shared_serials(&fake) == ["5151"]
    })
    .await;
    for r in [&a, &b] {
        assert!(r.on_crl("5151") && r.persisted("5151"));
        // The twin: only what was revoked.
        assert!(!r.on_crl("5152"));
    }
}

/// `rampart ca revoke --spiffe-id` on one replica: only that replica's audit log knows the
/// certificates it issued, so it also records an identity revocation; every other replica
/// revokes what it issued to the identity before that time, and shares those serials.
/// Certificates issued to the identity afterwards, and to other identities, stay valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_revocation_reaches_the_certificates_other_replicas_issued() {
    use rampart_citadel::IdentityRevocation;
    use std::io::Write;
    let fake = FakeApi::new();
    let a = replica(fake.client());
    let b = replica(fake.client());
    let rfc = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    // What B issued (its audit log): two of ID, one an hour from now (after the rule), and one
    // of another identity.
    let other = "spiffe://cluster.local/ns/app/sa/other";
    {
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(b.dir.path().join("state/audit.jsonl"))
            .unwrap();
        for (serial, id, issued) in [
            ("9c9c", ID, now - hour),
            ("9d9d", ID, now + hour),
            ("9e9e", other, now - hour),
        ] {
            writeln!(
                log,
                r#"{{"time":"{}","serial":"{serial}","spiffe_id":"{id}","not_after":"{}","caller":"t"}}"#,
                rfc(issued),
                rfc(issued + 2 * hour)
            )
            .unwrap();
        }
    }
    let rule = IdentityRevocation {
        spiffe_id: ID.into(),
        issued_before: rfc(now),
        reason: Some("keyCompromise".into()),
    };
    assert!(
        a.state
            .revocations()
            .add_identity_rule(rule.clone())
            .unwrap()
    );
    let share = a.state.revocation_share().unwrap();
    let key = rule.validated().unwrap().key();
    let r = tokio::task::spawn_blocking(move || share.wait_shared(&[key], Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(r.state, rampart_citadel::ShareState::Shared, "{r:?}");

    wait_until("B revokes what it issued to ID before the rule", || {
        b.on_crl("9c9c")
    })
    .await;
    wait_until("A has B's serial through the object", || a.on_crl("9c9c")).await;
    assert!(b.persisted("9c9c") && a.persisted("9c9c"));
    // The twins: issued after the rule, or to another identity: valid everywhere.
    for r in [&a, &b] {
        for s in ["9d9d", "9e9e"] {
            assert!(!r.on_crl(s), "{s}");
        }
    }
    let doc = fake.get(COLL, REVOCATIONS_CONFIGMAP).unwrap();
    let text = doc["data"][REVOCATIONS_KEY].as_str().unwrap();
    assert!(
        text.contains("\"identities\"") && text.contains(ID),
        "{text}"
    );
}

/// A rule this replica cannot apply now (its audit log unreadable) does not stop it from
/// sharing its own revocations, and is applied once it can be; a rule dated in the future
/// is refused by every replica and leaves the object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_that_cannot_be_applied_blocks_nothing_and_a_future_rule_is_refused() {
    use std::io::Write;
    let fake = FakeApi::new();
    let b = replica(fake.client());
    let rfc = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let audit = b.dir.path().join("state/audit.jsonl");
    let line = format!(
        r#"{{"time":"{}","serial":"5d5d","spiffe_id":"{ID}","not_after":"{}","caller":"t"}}"#,
        rfc(now - hour),
        rfc(now + hour)
    );
    // The audit log cannot be read (a directory in its place).
    let _ = std::fs::remove_file(&audit);
    std::fs::create_dir(&audit).unwrap();
    let mut cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": REVOCATIONS_CONFIGMAP, "namespace": NS}});
    let doc = json!({"revoked": [], "identities": [
        {"spiffe_id": ID, "issued_before": rfc(now), "reason": "keyCompromise"},
        {"spiffe_id": "spiffe://cluster.local/ns/app/sa/later", "issued_before": "2999-01-01T00:00:00Z"},
    ]});
    cm["data"] = json!({ REVOCATIONS_KEY: doc.to_string() });
    fake.put(COLL, cm);

    b.revoke("6e6e");
    wait_until(
        "B shares its own revocation despite the rule it cannot apply",
        || shared_serials(&fake).contains(&"6e6e".to_owned()),
    )
    .await;
    let rules = || -> Vec<Value> {
        let text = fake.get(COLL, REVOCATIONS_CONFIGMAP).unwrap()["data"][REVOCATIONS_KEY]
            .as_str()
            .unwrap()
            .to_owned();
        let doc: Value = serde_json::from_str(&text).unwrap();
        doc["identities"].as_array().cloned().unwrap_or_default()
    };
    let r = rules();
    assert_eq!(
        r.len(),
        1,
        "the future rule left the object, the other stays: {r:?}"
    );
    assert_eq!(r[0]["spiffe_id"], ID);
    // Not applied, so not recorded (to be applied when it comes again), and reported.
    assert!(load(b.dir.path()).identities.is_empty());
    assert_eq!(b.metrics.rules_failing(), 1);

    // The audit log readable again: the rule is applied at the next pass.
    std::fs::remove_dir(&audit).unwrap();
    writeln!(std::fs::File::create(&audit).unwrap(), "{line}").unwrap();
    b.revoke("6f6f");
    wait_until("B applies the rule once it can", || b.on_crl("5d5d")).await;
    wait_until("the failing gauge clears", || {
        b.metrics.rules_failing() == 0
    })
    .await;
    let state = load(b.dir.path());
    assert_eq!(state.identities.len(), 1, "{:?}", state.identities);
    assert_eq!(state.identities[0].spiffe_id, ID);
}

/// A rule held here that is now in the future (the clock stepped back since it was
/// recorded) is not shared: the object would drop it at every write and this replica write
/// it back, a loop of writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_held_from_the_future_is_not_written_in_a_loop() {
    use rampart_citadel::IdentityRevocation;
    let fake = FakeApi::new();
    let a = replica(fake.client());
    let later = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600));
    a.state
        .revocations()
        .add_identity_rule(IdentityRevocation {
            spiffe_id: ID.into(),
            issued_before: later.to_string(),
            reason: None,
        })
        .unwrap();
    a.revoke("4a4a");
    wait_until("A shares its revocation", || {
        shared_serials(&fake) == ["4a4a"]
    })
    .await;
    let writes = || fake.count(&format!("PUT {COLL}/"));
    let before = writes();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        writes() - before <= 1,
        "{} writes in a second",
        writes() - before
    );
    let text = fake.get(COLL, REVOCATIONS_CONFIGMAP).unwrap()["data"][REVOCATIONS_KEY]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!text.contains("identities"), "{text}");
}
