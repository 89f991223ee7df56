//! Revocation with the real binary, driven like an incident: certificates are issued to a
//! Python grpcio client, `rampart ca audit` finds them, `rampart ca revoke` (the admin socket)
//! revokes every certificate of an identity, `rampart.ca.v1.Revocation/GetCrls` (Python
//! grpcio, CRLs parsed and signature-checked with `cryptography`) serves the new CRL at once,
//! the revoked certificate can no longer renew while another can, and after `kill -9` and a
//! restart the revocation is still published.
//!
//! Needs the Python venv (`RAMPART_PYTHON` or target/py) and `openssl` on PATH.

mod support;
use support::{Proc, python};

use std::path::{Path, PathBuf};
use std::process::Command;

const ISS: &str = "https://kubernetes.default.svc.cluster.local";
const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const DB: &str = "spiffe://cluster.local/ns/default/sa/db";

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

fn py(name: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(python())
        .arg(script(name))
        .args(args)
        .output()
        .expect("run python");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn py_ok(name: &str, args: &[&str]) -> String {
    let (ok, text) = py(name, args);
    assert!(ok, "python {name} {args:?} failed:\n{text}");
    text
}

fn rampart(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(args)
        .output()
        .expect("run rampart")
}

fn rampart_ok(args: &[&str]) -> String {
    let out = rampart(args);
    assert!(
        out.status.success(),
        "rampart {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Ca {
    _proc: Proc,
    addr: String,
}

fn start_ca(dir: &Path) -> Ca {
    let log = dir.join(format!("ca-{}.log", std::process::id()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rampart"));
    cmd.args(["ca", "--listen", "127.0.0.1:0"])
        .arg("--cacerts")
        .arg(dir.join("cacerts"))
        .arg("--state")
        .arg(dir.join("state"))
        .args(["--jwt-issuer", ISS, "--jwks"])
        .arg(dir.join("jwks.json"));
    let (proc, addr) = support::ca_listening(cmd, log);
    Ca { _proc: proc, addr }
}

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn p(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    fn token(&self, sa: &str) -> String {
        let tok = py_ok(
            "ca_client.py",
            &[
                "token",
                "--key",
                &self.p("issuer.key"),
                "--iss",
                ISS,
                "--sub",
                &format!("system:serviceaccount:default:{sa}"),
            ],
        );
        let path = self.p(&format!("{sa}.token"));
        std::fs::write(&path, tok.trim()).unwrap();
        path
    }

    /// Issues a certificate for `id` with a token; writes `<name>.pem`/`<name>.key`; returns
    /// its serial (lowercase hex).
    fn issue(&self, ca: &Ca, sa: &str, id: &str, name: &str) -> String {
        let out = py_ok(
            "ca_client.py",
            &[
                "request",
                "--addr",
                &ca.addr,
                "--root",
                &self.p("state/root-cert.pem"),
                "--server-name",
                "127.0.0.1",
                "--token",
                &self.token(sa),
                "--spiffe-id",
                id,
                "--ttl",
                "3600",
                "--out-chain",
                &self.p(&format!("{name}.pem")),
                "--out-key",
                &self.p(&format!("{name}.key")),
            ],
        );
        let line = out
            .lines()
            .find_map(|l| l.strip_prefix("issued: "))
            .unwrap_or_else(|| panic!("{out}"));
        line.split_whitespace().next().unwrap().to_owned()
    }

    /// A renewal authenticated by the certificate `name` alone.
    fn renew(&self, ca: &Ca, name: &str, id: &str, expect: &str) -> String {
        let (ok, out) = py(
            "ca_client.py",
            &[
                "request",
                "--addr",
                &ca.addr,
                "--root",
                &self.p("state/root-cert.pem"),
                "--server-name",
                "127.0.0.1",
                "--client-cert",
                &self.p(&format!("{name}.pem")),
                "--client-key",
                &self.p(&format!("{name}.key")),
                "--spiffe-id",
                id,
                "--expect",
                expect,
            ],
        );
        assert!(ok, "renewal of {name} expecting {expect}:\n{out}");
        out
    }

    fn getcrls(&self, ca: &Ca, auth: &[&str], extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["getcrls", "--addr", &ca.addr, "--server-name", "127.0.0.1"];
        let root = self.p("state/root-cert.pem");
        args.extend(["--root", &root]);
        args.extend(auth);
        args.extend(extra);
        let out = py_ok("crl_client.py", &args);
        serde_json::from_str(out.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{out}: {e}"))
    }
}

fn revoked(answer: &serde_json::Value) -> Vec<String> {
    answer["crls"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["revoked"].as_array().unwrap().iter())
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// Serials as `cryptography` prints them (no leading zeros) and as the CA does (hex bytes).
fn same_serial(a: &str, b: &str) -> bool {
    a.trim_start_matches('0') == b.trim_start_matches('0')
}

#[test]
fn revoke_an_identity_publish_at_once_enforce_and_survive_kill_9() {
    let env = Env {
        dir: tempfile::tempdir().unwrap(),
    };
    py_ok(
        "ca_client.py",
        &[
            "issuer",
            "--out-key",
            &env.p("issuer.key"),
            "--out-jwks",
            &env.p("jwks.json"),
        ],
    );
    let ca = start_ca(env.dir.path());
    let web1 = env.issue(&ca, "web", WEB, "web1");
    let web2 = env.issue(&ca, "web", WEB, "web2");
    let db = env.issue(&ca, "db", DB, "db");

    // The audit query finds what to revoke.
    let state = env.p("state");
    let table = rampart_ok(&["ca", "audit", "--state", &state, "--spiffe-id", WEB]);
    assert!(table.contains(&web1) && table.contains(&web2), "{table}");
    assert!(!table.contains(&db), "{table}");
    // The columns line up: CALLER starts where the header says, on every row, also with
    // identities of different lengths (web's and db's) in one table.
    let all = rampart_ok(&["ca", "audit", "--state", &state]);
    assert!(all.contains(DB) && all.contains(WEB), "{all}");
    for t in [&table, &all] {
        let mut lines = t.lines();
        let at = lines.next().unwrap().find("CALLER").unwrap();
        for row in lines {
            assert_eq!(row.get(at - 2..at), Some("  "), "{t}");
            assert!(row.get(at..at + 1).is_some_and(|c| c != " "), "{t}");
        }
    }
    let json = rampart_ok(&["ca", "audit", "--state", &state, "--json", "--since", "1h"]);
    let rows: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3, "{json}");
    assert!(
        rows.iter()
            .all(|r| r["caller"].is_string() && r["not_after"].is_string())
    );
    let none = rampart_ok(&[
        "ca",
        "audit",
        "--state",
        &state,
        "--json",
        "--since",
        "2099-01-01T00:00:00Z",
    ]);
    assert!(none.trim().is_empty(), "{none}");

    // GetCrls: authenticated, cheap when nothing changed, refused without credentials.
    let db_token = env.token("db");
    let auth = ["--token", db_token.as_str()];
    let first = env.getcrls(&ca, &auth, &[]);
    assert_eq!(first["crls"].as_array().unwrap().len(), 1, "{first}");
    assert_eq!(first["crls"][0]["signature_ok"], true, "{first}");
    assert!(revoked(&first).is_empty(), "{first}");
    assert_eq!(first["issuers"].as_array().unwrap().len(), 1, "{first}");
    assert!(
        first["issuers"][0]
            .as_str()
            .unwrap()
            .contains("Rampart self-signed root"),
        "{first}"
    );
    let etag = first["etag"].as_str().unwrap().to_owned();
    let again = env.getcrls(&ca, &auth, &["--if-none-match", &etag]);
    assert_eq!(again["not_modified"], true, "{again}");
    assert!(again["crls"].as_array().unwrap().is_empty(), "{again}");
    let anon = env.getcrls(&ca, &[], &["--expect", "UNAUTHENTICATED"]);
    assert_eq!(anon["error"], "UNAUTHENTICATED", "{anon}");

    // Renewal by certificate works before the revocation (and makes a third web
    // certificate, which the revocation by identity must catch too).
    env.renew(&ca, "web1", WEB, "ok");
    let web_rows = rampart_ok(&[
        "ca",
        "audit",
        "--state",
        &state,
        "--spiffe-id",
        WEB,
        "--json",
    ]);
    assert_eq!(web_rows.lines().count(), 3, "{web_rows}");

    // Revoke every certificate of the identity.
    let out = rampart_ok(&[
        "ca",
        "revoke",
        "--state",
        &state,
        "--spiffe-id",
        WEB,
        "--reason",
        "keyCompromise",
    ]);
    assert!(out.contains(&web1) && out.contains(&web2), "{out}");
    assert_eq!(out.matches("revoked serial").count(), 3, "{out}");
    let after = env.getcrls(&ca, &auth, &["--if-none-match", &etag]);
    assert_eq!(after["not_modified"], false, "{after}");
    assert!(
        after["version"].as_u64() > first["version"].as_u64(),
        "{after}"
    );
    assert_eq!(after["crls"][0]["signature_ok"], true, "{after}");
    let list = revoked(&after);
    for s in [&web1, &web2] {
        assert!(
            list.iter().any(|r| same_serial(r, s)),
            "{s} not in {list:?}"
        );
    }
    assert!(!list.iter().any(|r| same_serial(r, &db)), "{list:?}");

    // Enforced at the CA: the revoked certificate cannot renew; the other one can, and
    // authenticates GetCrls by its certificate.
    let refused = env.renew(&ca, "web1", WEB, "UNAUTHENTICATED");
    assert!(refused.contains("revoked"), "{refused}");
    env.renew(&ca, "db", DB, "ok");
    let by_cert = env.getcrls(
        &ca,
        &[
            "--client-cert",
            &env.p("db.pem"),
            "--client-key",
            &env.p("db.key"),
        ],
        &[],
    );
    assert_eq!(revoked(&by_cert).len(), 3, "{by_cert}");

    // Idempotent.
    let out = rampart_ok(&["ca", "revoke", "--state", &state, "--serial", &web1]);
    assert!(out.contains("already revoked"), "{out}");

    // kill -9, then a revoke attempt fails loudly (no CA), then a restart still publishes.
    let version = after["version"].as_u64().unwrap();
    drop(ca); // SIGKILL
    let out = rampart(&["ca", "revoke", "--state", &state, "--serial", &db]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("admin socket"),
        "{out:?}"
    );
    let ca = start_ca(env.dir.path());
    let restarted = env.getcrls(&ca, &auth, &[]);
    let list = revoked(&restarted);
    for s in [&web1, &web2] {
        assert!(
            list.iter().any(|r| same_serial(r, s)),
            "{s} not in {list:?} after restart"
        );
    }
    assert!(
        restarted["version"].as_u64().unwrap() > version,
        "{restarted}"
    );
    env.renew(&ca, "web2", WEB, "UNAUTHENTICATED");
}
