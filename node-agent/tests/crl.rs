//! CRL distribution through the agent, against the fake CA's `rampart.ca.v1.Revocation`
//! (root -> intermediate -> workload): validated CRLs reach `ROOTCA` and `ca-crl.pem`, cheap
//! polls, the last good set survives bad answers and outages, and a revoked certificate of
//! the agent's own is replaced at once.

mod common;

use std::time::Duration;

use common::{Bed, bed, crl_by, new_hierarchy_with_root, wait_for};
use rampart_certs::parse_crls_pem;
use rampart_node_agent::{Agent, ServedSecret, fetch_secrets};
use tokio_util::sync::CancellationToken;

async fn rootca(sock: &std::path::Path) -> Option<ServedSecret> {
    fetch_secrets(sock, Duration::from_secs(5))
        .await
        .ok()?
        .into_iter()
        .find(|s| s.name == "ROOTCA")
}

async fn leaf_serial(sock: &std::path::Path) -> Option<String> {
    fetch_secrets(sock, Duration::from_secs(5))
        .await
        .ok()?
        .into_iter()
        .find(|s| s.name == "default")
        .map(|s| s.certs[0].serial_hex.clone())
}

/// Waits until `ROOTCA` carries exactly `n` CRLs; returns it.
async fn rootca_with(sock: &std::path::Path, n: usize, what: &str) -> ServedSecret {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(r) = rootca(sock).await {
            let count = r
                .crl_pem
                .as_deref()
                .map(|p| parse_crls_pem(p).map(|c| c.len()).unwrap_or(0))
                .unwrap_or(0);
            if count == n {
                return r;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crls_are_validated_served_and_kept_through_bad_answers_and_outages() {
    let b = bed(Duration::from_secs(3600)).await;
    let other_serial = "0badc0de";
    b.ca.set_crls(Some(vec![
        b.ca.intermediate_crl(1, &[other_serial]).der().to_vec(),
    ]));
    let sd = CancellationToken::new();
    let running = Agent::new(b.cfg.clone())
        .unwrap()
        .start(sd.clone())
        .await
        .unwrap();
    // The intermediate's CRL only: served, checked for the leaf only (the root has none).
    let r1 = rootca_with(&b.sock, 1, "the intermediate's CRL in ROOTCA").await;
    assert!(r1.crl_leaf_only, "{r1:?}");
    let out = b.dir.path().join("out");
    wait_for("ca-crl.pem", Duration::from_secs(5), || {
        out.join("ca-crl.pem").exists()
    })
    .await;
    let serial = leaf_serial(&b.sock).await.unwrap();

    // Both CRLs: the whole chain is covered, a new ROOTCA version.
    let good = vec![
        b.ca.intermediate_crl(2, &[other_serial]).der().to_vec(),
        b.ca.root_crl(1, &[]).der().to_vec(),
    ];
    b.ca.set_crls(Some(good.clone()));
    let r2 = rootca_with(&b.sock, 2, "both CRLs in ROOTCA").await;
    assert!(!r2.crl_leaf_only);
    assert_ne!(r2.version_info, r1.version_info);
    assert_eq!(
        std::fs::read_to_string(out.join("ca-crl.pem")).unwrap(),
        r2.crl_pem.clone().unwrap()
    );
    // An unchanged set is answered "not modified" (polls every 300 ms here).
    let (calls, nm) = b.ca.crl_calls();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (calls2, nm2) = b.ca.crl_calls();
    assert!(calls2 >= calls + 3, "{calls} -> {calls2}");
    assert!(nm2 >= nm + 3, "{nm} -> {nm2} not-modified answers");

    // Negative twins. A CRL of another CA in the set: refused, the others still served.
    let (_, other_root) = new_hierarchy_with_root("Other CA");
    let mut with_foreign = good.clone();
    with_foreign.push(crl_by(&other_root, 1, &[&serial]).der().to_vec());
    b.ca.set_crls(Some(with_foreign));
    wait_for("the foreign CRL refused", Duration::from_secs(5), || {
        !running
            .metrics()
            .render()
            .contains("rampart_agent_crls_refused_total 0")
    })
    .await;
    let r3 = rootca_with(&b.sock, 2, "the two valid CRLs").await;
    assert_eq!(r3.crl_pem, r2.crl_pem);
    // A truncated CRL: the answer is refused as a whole, the last good set keeps serving.
    let mut truncated = good.clone();
    let cut = b.ca.intermediate_crl(3, &[&serial]).der().to_vec();
    truncated[0] = cut[..cut.len() / 2].to_vec();
    b.ca.set_crls(Some(truncated));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r4 = rootca_with(&b.sock, 2, "the last good set").await;
    assert_eq!(r4.crl_pem, r2.crl_pem);
    // ... and the same bad set is not downloaded again: later polls are "not modified".
    let (calls, nm) = b.ca.crl_calls();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (calls2, nm2) = b.ca.crl_calls();
    assert!(
        nm2 - nm >= 2 && nm2 - nm == calls2 - calls,
        "{calls}/{nm} -> {calls2}/{nm2}"
    );
    // The CRL service down: the last good set keeps serving; our certificate too.
    b.ca.set_crl_down(true);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r5 = rootca_with(&b.sock, 2, "the last good set while the CA is down").await;
    assert_eq!(r5.crl_pem, r2.crl_pem);
    assert_eq!(leaf_serial(&b.sock).await.as_deref(), Some(serial.as_str()));
    b.ca.set_crl_down(false);

    // Our own serial revoked by our CA: withdrawn, renewed at once, the fresh one served.
    let calls_before = b.ca.calls();
    b.ca.set_crls(Some(vec![
        b.ca.intermediate_crl(4, &[&serial]).der().to_vec(),
        b.ca.root_crl(2, &[]).der().to_vec(),
    ]));
    let mut fresh = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        match leaf_serial(&b.sock).await {
            Some(s) if s != serial => {
                fresh = Some(s);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let fresh = fresh.expect("a fresh certificate after revocation");
    assert_ne!(fresh, serial);
    assert_eq!(b.ca.calls(), calls_before + 1, "one renewal");
    assert!(
        running
            .metrics()
            .render()
            .contains("rampart_agent_cert_revoked_total{spiffe_id=\"spiffe://cluster.local/ns/shop/sa/cart\"} 1"),
        "{}",
        running.metrics().render()
    );
    // The fresh certificate stays (nothing revokes it).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(leaf_serial(&b.sock).await.as_deref(), Some(fresh.as_str()));
    running.shutdown().await;
}

/// A CA without the CRL service (istiod): certificates are served, ROOTCA has no `crl`, no
/// `ca-crl.pem` is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_without_crl_service_serves_no_crl() {
    let b = bed(Duration::from_secs(3600)).await;
    let sd = CancellationToken::new();
    let running = Agent::new(b.cfg.clone())
        .unwrap()
        .start(sd.clone())
        .await
        .unwrap();
    let r = rootca_with(&b.sock, 0, "ROOTCA").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(r.crl_pem.is_none() && !r.crl_leaf_only);
    assert!(rootca(&b.sock).await.unwrap().crl_pem.is_none());
    assert!(!b.dir.path().join("out/ca-crl.pem").exists());
    assert!(b.ca.crl_calls().0 >= 1, "the agent asked");
    running.shutdown().await;
}

/// A CRL poll over the kept connection to a CA that has since stopped is "unreachable", not a
/// refusal by the CA (the agent's log said "CA refused the CSR" for it); its twin, an
/// UNAVAILABLE status the CA itself sends, stays the CA's refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_ca_is_unreachable_and_a_refusal_is_the_cas() {
    use rampart_node_agent::{CrlSource as _, Error, IstioCaClient};
    let Bed {
        dir: _dir,
        mut ca,
        cfg,
        ..
    } = bed(Duration::from_secs(3600)).await;
    ca.set_crls(Some(Vec::new()));
    let token = cfg.workloads[0].token_path.clone();
    let client = IstioCaClient::new(cfg.ca.clone());
    client.get_crls("", &token).await.expect("the CA serves");
    // The CA itself answers UNAVAILABLE: its refusal, named as such.
    ca.set_crl_down(true);
    let e = client.get_crls("", &token).await.unwrap_err();
    assert!(matches!(e, Error::CaRefused { .. }), "{e:?}");
    assert!(e.to_string().contains("the CA refused the request"), "{e}");
    // The CA is gone: the kept connection fails, which is no answer of the CA's.
    ca.set_crl_down(false);
    ca.stop().await;
    let e = client.get_crls("", &token).await.unwrap_err();
    assert!(matches!(e, Error::CaUnreachable { .. }), "{e:?}");
    // And after a fresh dial too.
    let e = client.get_crls("", &token).await.unwrap_err();
    assert!(matches!(e, Error::CaUnreachable { .. }), "{e:?}");
}

/// A `--ca-root` that does not hold the CA's root is the commonest misconfiguration: the
/// error says the CA's certificate is not trusted and which flags to check, once (it read
/// "unreachable: ... UnknownIssuer: ... UnknownIssuer"). Twin: the right root is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_root_that_does_not_hold_the_cas_root_is_named() {
    use rampart_node_agent::{CrlSource as _, IstioCaClient};
    let Bed { dir, ca, cfg, .. } = bed(Duration::from_secs(3600)).await;
    ca.set_crls(Some(Vec::new()));
    let token = cfg.workloads[0].token_path.clone();
    IstioCaClient::new(cfg.ca.clone())
        .get_crls("", &token)
        .await
        .expect("the right root: served");
    let other = dir.path().join("other-root.pem");
    let st = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-keyout",
            "/dev/null",
            "-subj",
            "/CN=another root",
            "-days",
            "1",
        ])
        .arg("-out")
        .arg(&other)
        .output()
        .expect("openssl");
    assert!(st.status.success(), "{st:?}");
    let mut wrong = cfg.ca.clone();
    wrong.root_path = other.clone();
    let e = IstioCaClient::new(wrong)
        .get_crls("", &token)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("the CA's certificate is not trusted"), "{e}");
    assert!(e.contains(&format!("--ca-root {}", other.display())), "{e}");
    assert_eq!(e.matches("UnknownIssuer").count(), 1, "{e}");
}
