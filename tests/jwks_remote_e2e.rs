//! Remote `jwksUri` end to end: a real `rampart proxy` fetches the JWKS of a
//! RequestAuthentication from a real HTTPS server nobody here wrote (Python's `http.server`
//! wrapped in `ssl`, serving a directory), whose certificate is signed (by `openssl x509`)
//! with a root from `rampart certs root`, trusted through `rampart.jwksCaFile`.
//!
//! One proxy, one IdP port, in order:
//! 1. IdP down at start: tokens get 401 naming the unreachable JWKS; the proxy log says why
//!    (fail closed); requests without a token still pass, as in Istio.
//! 2. IdP up: the failing fetch is retried; a valid token → 200; a tampered signature → 401.
//! 3. IdP down after a good fetch: the last good keys keep serving (200).
//! 4. IdP rotates its key: the periodic refresh (`rampart.jwksRefresh: 1s`) picks it up.
//! 5. Refresh 1h, IdP rotates again: a burst of tokens with the new, unknown `kid` triggers
//!    one early refetch and all are accepted at once; further unknown-`kid` tokens are 401
//!    and cause no fetch (rate limit).
//! 6. Wrong CA in `rampart.jwksCaFile`: the TLS handshake is refused, tokens get 401; fixing
//!    the setting retries at once and tokens pass again.

mod support;
use support::python;
use support::{Proc, free_port, wait_for};

#[path = "../proxy/tests/support/sds_standin.rs"]
mod sds_standin;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use sds_standin::TestCa;

const TD: &str = "cluster.local";
const ISSUER: &str = "https://idp.test";

fn rampart(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rampart {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The in-test app: HTTP/1.1, answers 200 `app` to everything.
fn app(port: u16) {
    let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                loop {
                    let mut len = 0usize;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    let resp = "HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\napp\n";
                    if w.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", "000"));
    (code.to_string(), body.to_string())
}

const IDP_SERVER: &str = r#"
import functools, http.server, ssl, sys
port, root, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print("serving", flush=True)
server.serve_forever()
"#;

/// The IdP: Python's HTTPS file server over `root` (which holds `jwks.json`).
struct Idp {
    port: u16,
    dir: PathBuf,
}

impl Idp {
    fn start(&self, n: u32) -> Proc {
        let log = self.dir.join(format!("idp-{n}.log"));
        let child = Command::new(python())
            .arg("-u")
            .arg(self.dir.join("idp.py"))
            .arg(self.port.to_string())
            .arg(self.dir.join("www"))
            .arg(self.dir.join("cert.pem"))
            .arg(self.dir.join("key.pem"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let p = Proc { child, log };
        let ca = self.dir.join("ca.pem");
        let url = format!("https://127.0.0.1:{}/jwks.json", self.port);
        wait_for(
            "the IdP to serve",
            Duration::from_secs(15),
            || curl(&["--cacert", ca.to_str().unwrap(), &url]).0 == "200",
            || p.log(),
        );
        p
    }

    /// Publish `jwks` (atomically: the server reads the file per request).
    fn publish(&self, jwks: &[u8]) {
        let tmp = self.dir.join("www/.jwks.tmp");
        std::fs::write(&tmp, jwks).unwrap();
        std::fs::rename(tmp, self.dir.join("www/jwks.json")).unwrap();
    }
}

fn fetches(idp: &Proc) -> usize {
    idp.log().matches("\"GET /jwks.json").count()
}

fn write_mesh(mesh: &Path, ca_file: &str, refresh: &str) {
    std::fs::write(
        mesh.join("mesh.yaml"),
        format!("trustDomain: {TD}\nrampart:\n  jwksCaFile: {ca_file}\n  jwksRefresh: {refresh}\n"),
    )
    .unwrap();
}

fn write_policy(mesh: &Path, jwks_uri: &str) {
    write_rules(
        mesh,
        &format!("  - issuer: {ISSUER}\n    jwksUri: {jwks_uri}\n"),
    );
}

/// The RequestAuthentication with `rules` (YAML list items under `jwtRules`), and the DENY
/// of `/jwt/*` without a request principal.
fn write_rules(mesh: &Path, rules: &str) {
    std::fs::write(
        mesh.join("policy/jwt.yaml"),
        format!(
            r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: idp, namespace: api}}
spec:
  selector: {{matchLabels: {{app: backend}}}}
  jwtRules:
{rules}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: require-jwt, namespace: api}}
spec:
  selector: {{matchLabels: {{app: backend}}}}
  action: DENY
  rules:
  - to: [{{operation: {{paths: ["/jwt/*"]}}}}]
    from: [{{source: {{notRequestPrincipals: ["*"]}}}}]
"#
        ),
    )
    .unwrap();
}

fn keygen(dir: &Path, name: &str) -> (PathBuf, Vec<u8>) {
    let key = dir.join(format!("{name}.pem"));
    rampart(&["token", "keygen", "--out", key.to_str().unwrap()]);
    let jwks = rampart(&["token", "jwks", "--key", key.to_str().unwrap()]).stdout;
    (key, jwks)
}

fn token(key: &Path) -> String {
    token_of(key, ISSUER)
}

fn token_of(key: &Path, issuer: &str) -> String {
    let out = rampart(&[
        "token",
        "issue",
        "--key",
        key.to_str().unwrap(),
        "--issuer",
        issuer,
        "--ns",
        "web",
        "--sa",
        "client",
        "--aud",
        "backend",
    ]);
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn kid(jwks: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(jwks).unwrap();
    v["keys"][0]["kid"].as_str().unwrap().to_string()
}

#[test]
fn remote_jwks_over_https() {
    let w = tempfile::tempdir().unwrap();
    let wp = w.path();
    let mesh = wp.join("mesh");
    std::fs::create_dir_all(mesh.join("policy")).unwrap();
    let (app_port, inbound, admin_port, idp_port) =
        (free_port(), free_port(), free_port(), free_port());
    app(app_port);
    std::fs::write(
        mesh.join("workloads.yaml"),
        format!(
            r#"workloads:
- name: backend
  namespace: api
  labels: {{app: backend}}
  ports:
  - {{port: 8080, protocol: http, app: "127.0.0.1:{app_port}", inbound: "127.0.0.1:{inbound}"}}
  proxy: {{admin: "127.0.0.1:{admin_port}"}}
"#
        ),
    )
    .unwrap();

    // PKI: the mesh root (for SDS), the IdP's root and server certificate, a wrong root.
    let ca_dir = wp.join("ca");
    let idp_ca = wp.join("idp-ca");
    let wrong_ca = wp.join("wrong-ca");
    rampart(&["certs", "root", "--out", ca_dir.to_str().unwrap()]);
    rampart(&[
        "certs",
        "root",
        "--out",
        idp_ca.to_str().unwrap(),
        "--cn",
        "IdP Root",
    ]);
    rampart(&[
        "certs",
        "root",
        "--out",
        wrong_ca.to_str().unwrap(),
        "--cn",
        "Wrong Root",
    ]);
    let idp_dir = wp.join("idp");
    std::fs::create_dir_all(idp_dir.join("www")).unwrap();
    std::fs::write(idp_dir.join("idp.py"), IDP_SERVER).unwrap();
    std::fs::copy(idp_ca.join("root-cert.pem"), idp_dir.join("ca.pem")).unwrap();
    std::fs::write(
        idp_dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-subj", "/CN=idp.test", "-keyout"])
        .arg(idp_dir.join("key.pem"))
        .arg("-out")
        .arg(idp_dir.join("csr.pem")));
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "1", "-set_serial", "4242", "-in"])
        .arg(idp_dir.join("csr.pem"))
        .arg("-CA")
        .arg(idp_ca.join("root-cert.pem"))
        .arg("-CAkey")
        .arg(idp_ca.join("root-key.pem"))
        .arg("-extfile")
        .arg(idp_dir.join("ext.cnf"))
        .arg("-out")
        .arg(idp_dir.join("cert.pem")));
    std::fs::copy(idp_ca.join("root-cert.pem"), mesh.join("idp-ca.pem")).unwrap();
    std::fs::copy(wrong_ca.join("root-cert.pem"), mesh.join("wrong-ca.pem")).unwrap();
    let idp = Idp {
        port: idp_port,
        dir: idp_dir,
    };

    // Signing keys at the IdP: k1, then k2, then k3; `other` is never published.
    let (k1, jwks1) = keygen(wp, "k1");
    let (k2, jwks2) = keygen(wp, "k2");
    let (k3, jwks3) = keygen(wp, "k3");
    let (other, _) = keygen(wp, "other");
    let (t1, t2, t3, forged) = (token(&k1), token(&k2), token(&k3), token(&other));
    idp.publish(&jwks1);

    let uri = format!("https://127.0.0.1:{idp_port}/jwks.json");
    write_mesh(&mesh, "idp-ca.pem", "1s");
    write_policy(&mesh, &uri);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = TestCa::from_dir(&ca_dir);
    let sds = wp.join("sds.sock");
    let _standin = rt.block_on(async {
        sds_standin::start(
            &sds,
            Some(ca.secrets(&format!("spiffe://{TD}/ns/api/sa/backend"), 1)),
        )
    });
    let proxy = start_proxy(&mesh, &sds, wp.join("proxy.log"));
    let plog = || proxy.log();
    let admin = format!("http://127.0.0.1:{admin_port}");
    let url = format!("http://127.0.0.1:{inbound}/jwt/hello");
    let with = |t: &str| curl(&["-H", &format!("authorization: Bearer {t}"), &url]);
    let dump = || -> serde_json::Value {
        serde_json::from_str(&curl(&[&format!("{admin}/config_dump")]).1).unwrap_or_default()
    };
    let entry = || dump()["jwks"]["uris"][0].clone();

    // --- 1. IdP down at start: fail closed, reason logged ---
    wait_for(
        "proxy ready (first JWKS round done)",
        Duration::from_secs(30),
        || curl(&[&format!("{admin}/ready")]).0 == "200",
        plog,
    );
    let (code, body) = with(&t1);
    assert_eq!(code, "401", "{body}");
    // Envoy's phrase only: the URI and the socket error are for the log, not the client.
    assert_eq!(body.trim(), "Jwks remote fetch is failed");
    let l = proxy.log();
    assert!(
        l.lines().any(|l| l.contains("request denied")
            && l.contains(&uri)
            && l.contains("connecting to")),
        "{l}"
    );
    let l = proxy.log();
    assert!(
        l.contains("JWKS fetch failed") && l.contains(&uri) && l.contains("are refused (401)"),
        "{l}"
    );
    let e = entry();
    assert_eq!(e["state"], "failed", "{e}");
    assert_eq!(e["source"], "remote", "{e}");
    assert_eq!(e["keys"], 0, "{e}");
    // No token: passes authentication (Istio), then the DENY rule needs a principal.
    let (code, _) = curl(&[&url]);
    assert_eq!(code, "403");
    let (code, body) = curl(&[&format!("http://127.0.0.1:{inbound}/open")]);
    assert_eq!((code.as_str(), body.as_str()), ("200", "app\n"));

    // --- 2. IdP up: retried, valid → 200, tampered → 401 ---
    let server = idp.start(1);
    wait_for(
        "the valid token to pass once the IdP is up",
        Duration::from_secs(15),
        || with(&t1).0 == "200",
        plog,
    );
    let (code, body) = with(&t1);
    assert_eq!((code.as_str(), body.as_str()), ("200", "app\n"));
    let (head, sig) = t1.rsplit_once('.').unwrap();
    let flipped = if sig.starts_with('A') { "B" } else { "A" };
    let tampered = format!("{head}.{flipped}{}", &sig[1..]);
    let (code, body) = with(&tampered);
    assert_eq!(code, "401", "{body}");
    assert!(body.contains("Jwt verification fails"), "{body}");
    let e = entry();
    assert_eq!(e["state"], "ok", "{e}");
    assert_eq!(e["keys"], 1, "{e}");
    assert_eq!(e["kids"], serde_json::json!([kid(&jwks1)]), "{e}");
    assert!(e["last_fetch"].is_string(), "{e}");
    assert_eq!(e["last_error"], serde_json::Value::Null, "{e}");
    let d = dump();
    assert_eq!(d["jwks"]["refresh"], "1s");
    assert!(
        !d.to_string().contains("\"x\":"),
        "no key material in config_dump: {d}"
    );

    // --- 3. IdP down after a good fetch: last good keys keep serving ---
    drop(server);
    wait_for(
        "a failed refresh",
        Duration::from_secs(15),
        || entry()["state"] == "stale",
        plog,
    );
    assert!(
        entry()["last_error"]
            .as_str()
            .unwrap()
            .contains("connecting to")
    );
    let (code, body) = with(&t1);
    assert_eq!(code, "200", "last good keys must keep serving: {body}");
    assert!(proxy.log().contains("the last good keys keep serving"));

    // --- 4. rotation picked up by the periodic refresh ---
    idp.publish(&jwks2);
    let _server = idp.start(2);
    wait_for(
        "the refresh to pick up k2",
        Duration::from_secs(15),
        || entry()["kids"] == serde_json::json!([kid(&jwks2)]),
        plog,
    );
    let (code, body) = with(&t2);
    assert_eq!(code, "200", "{body}");

    // --- 5. refresh 1h; unknown kid → one early refetch, then rate-limited ---
    write_mesh(&mesh, "idp-ca.pem", "1h");
    wait_for(
        "the 1h refresh to be in force",
        Duration::from_secs(15),
        || {
            let e = entry();
            dump()["jwks"]["refresh"] == "1h" && e["next_attempt_in_s"].as_u64() > Some(1800)
        },
        plog,
    );
    drop(_server);
    idp.publish(&jwks3);
    let server = idp.start(3);
    let before = fetches(&server);
    // A burst right after the rotation: one early refetch, every request waits for it.
    let burst: Vec<_> = (0..4)
        .map(|_| {
            let (t, url) = (t3.clone(), url.clone());
            std::thread::spawn(move || curl(&["-H", &format!("authorization: Bearer {t}"), &url]))
        })
        .collect();
    for h in burst {
        let (code, body) = h.join().unwrap();
        assert_eq!(
            code,
            "200",
            "unknown kid must trigger an early refetch: {body}\n{}",
            plog()
        );
    }
    assert_eq!(
        proxy
            .log()
            .matches("unknown kid: refetching the JWKS early")
            .count(),
        1,
        "{}",
        plog()
    );
    assert_eq!(fetches(&server), before + 1, "{}", server.log());
    // k1 was removed at the IdP; `other` was never there: 401 with Envoy's phrase for a kid
    // the key set lacks, and no new fetch (rate limit).
    for t in [&t1, &forged, &forged] {
        let (code, body) = with(t);
        assert_eq!(code, "401", "{body}");
        assert_eq!(
            body.trim(),
            "Jwks doesn't have key to match kid or alg from Jwt"
        );
    }
    assert_eq!(fetches(&server), before + 1, "{}", server.log());

    // --- 6. wrong CA: handshake refused (fail closed); fixing it retries at once ---
    let uri2 = format!("https://localhost:{idp_port}/jwks.json");
    write_mesh(&mesh, "wrong-ca.pem", "1h");
    write_policy(&mesh, &uri2);
    wait_for(
        "the wrong-CA fetch to fail",
        Duration::from_secs(15),
        || {
            let e = entry();
            e["uri"] == uri2.as_str() && e["state"] == "failed"
        },
        plog,
    );
    let err = entry()["last_error"].as_str().unwrap().to_string();
    assert!(
        err.contains("TLS handshake") && err.contains("UnknownIssuer"),
        "{err}"
    );
    let (code, body) = with(&t3);
    assert_eq!(code, "401", "{body}");
    assert_eq!(body.trim(), "Jwks remote fetch is failed");
    assert!(plog().contains("UnknownIssuer"), "{}", plog());
    assert_eq!(dump()["jwks"]["uris"].as_array().unwrap().len(), 1);
    write_mesh(&mesh, "idp-ca.pem", "1h");
    wait_for(
        "the fixed CA to be used at once",
        Duration::from_secs(15),
        || with(&t3).0 == "200",
        plog,
    );

    // --- 7. OpenID discovery: an issuer with neither jwks nor jwksUri ---
    // The IdP's configuration at <issuer>/.well-known/openid-configuration names the key set
    // (k3's); a second issuer's configuration claims another issuer (a mix-up): refused.
    let base = format!("https://127.0.0.1:{idp_port}");
    let (good_iss, mixup_iss) = (format!("{base}/tenant"), format!("{base}/mixup"));
    for (dir, doc) in [
        (
            "tenant",
            format!(r#"{{"issuer": "{good_iss}", "jwks_uri": "{base}/jwks.json"}}"#),
        ),
        (
            "mixup",
            format!(r#"{{"issuer": "https://elsewhere.example", "jwks_uri": "{base}/jwks.json"}}"#),
        ),
    ] {
        let d = idp.dir.join("www").join(dir).join(".well-known");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("openid-configuration"), doc).unwrap();
    }
    write_rules(
        &mesh,
        &format!("  - issuer: {good_iss}\n  - issuer: {mixup_iss}\n"),
    );
    let discovered = token_of(&k3, &good_iss);
    wait_for(
        "a token of the discovered issuer to pass",
        Duration::from_secs(15),
        || with(&discovered).0 == "200",
        plog,
    );
    let uris = dump()["jwks"]["uris"].clone();
    let good_entry = uris
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["uri"] == format!("{good_iss}/.well-known/openid-configuration").as_str())
        .unwrap_or_else(|| panic!("{uris}"))
        .clone();
    assert_eq!(good_entry["openid_discovery"], true, "{good_entry}");
    assert_eq!(good_entry["jwks_uri"], format!("{base}/jwks.json").as_str());
    assert_eq!(good_entry["state"], "ok", "{good_entry}");
    assert!(
        server
            .log()
            .contains("\"GET /tenant/.well-known/openid-configuration"),
        "{}",
        server.log()
    );
    // Twins: the mix-up issuer's token (same key), and a token of another key.
    let (code, body) = with(&token_of(&k3, &mixup_iss));
    assert_eq!(code, "401", "{body}");
    assert_eq!(body.trim(), "Jwks remote fetch is failed");
    assert!(
        plog().contains("is the configuration of issuer \"https://elsewhere.example\""),
        "{}",
        plog()
    );
    let (code, _) = with(&token_of(&other, &good_iss));
    assert_eq!(code, "401");
    drop(server);
    drop(proxy);
}

fn start_proxy(mesh: &Path, sds: &Path, log: PathBuf) -> Proc {
    Proc {
        child: Command::new(env!("CARGO_BIN_EXE_rampart"))
            .args(["proxy", "--mesh"])
            .arg(mesh)
            .args(["--workload", "api/backend", "--sds-socket"])
            .arg(sds)
            .args(["--drain-timeout", "1s"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
        log,
    }
}

/// `http://` jwksUri is fetched (Istio allows it) with a warning; a jwksUri mapped to a local
/// file is read from the file and never fetched, side by side with the remote one.
#[test]
fn plain_http_and_local_files() {
    let w = tempfile::tempdir().unwrap();
    let wp = w.path();
    let mesh = wp.join("mesh");
    std::fs::create_dir_all(mesh.join("policy")).unwrap();
    std::fs::create_dir_all(mesh.join("jwks")).unwrap();
    let (app_port, inbound, admin_port, idp_port) =
        (free_port(), free_port(), free_port(), free_port());
    app(app_port);
    std::fs::write(
        mesh.join("workloads.yaml"),
        format!(
            r#"workloads:
- name: backend
  namespace: api
  labels: {{app: backend}}
  ports:
  - {{port: 8080, protocol: http, app: "127.0.0.1:{app_port}", inbound: "127.0.0.1:{inbound}"}}
  proxy: {{admin: "127.0.0.1:{admin_port}"}}
"#
        ),
    )
    .unwrap();
    std::fs::write(mesh.join("mesh.yaml"), format!("trustDomain: {TD}\n")).unwrap();
    let uri = format!("http://127.0.0.1:{idp_port}/jwks.json");
    write_policy(&mesh, &uri);
    // A second issuer whose jwksUri is answered from jwks/offline.example.json.
    std::fs::write(
        mesh.join("policy/offline.yaml"),
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n\
         metadata: {name: offline, namespace: api}\nspec:\n  jwtRules:\n\
         \x20 - issuer: https://offline.example\n\
         \x20   jwksUri: https://offline.example/keys\n",
    )
    .unwrap();
    let (k1, jwks1) = keygen(wp, "k1");
    let (off, jwks_off) = keygen(wp, "off");
    std::fs::write(mesh.join("jwks/offline.example.json"), &jwks_off).unwrap();
    let off_token = {
        let out = rampart(&[
            "token",
            "issue",
            "--key",
            off.to_str().unwrap(),
            "--issuer",
            "https://offline.example",
            "--ns",
            "web",
            "--sa",
            "client",
        ]);
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let www = wp.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("jwks.json"), &jwks1).unwrap();
    let idp_log = wp.join("idp.log");
    let idp = Proc {
        child: Command::new(python())
            .args(["-u", "-m", "http.server", &idp_port.to_string()])
            .args(["--bind", "127.0.0.1", "--directory"])
            .arg(&www)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&idp_log).unwrap())
            .spawn()
            .unwrap(),
        log: idp_log,
    };
    wait_for(
        "the plain IdP to serve",
        Duration::from_secs(15),
        || curl(&[&uri]).0 == "200",
        || idp.log(),
    );

    let ca_dir = wp.join("ca");
    rampart(&["certs", "root", "--out", ca_dir.to_str().unwrap()]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = TestCa::from_dir(&ca_dir);
    let sds = wp.join("sds.sock");
    let _standin = rt.block_on(async {
        sds_standin::start(
            &sds,
            Some(ca.secrets(&format!("spiffe://{TD}/ns/api/sa/backend"), 1)),
        )
    });
    let proxy = start_proxy(&mesh, &sds, wp.join("proxy.log"));
    let admin = format!("http://127.0.0.1:{admin_port}");
    wait_for(
        "proxy ready",
        Duration::from_secs(30),
        || curl(&[&format!("{admin}/ready")]).0 == "200",
        || proxy.log(),
    );
    let url = format!("http://127.0.0.1:{inbound}/jwt/hello");
    let with = |t: &str| curl(&["-H", &format!("authorization: Bearer {t}"), &url]);
    let (code, body) = with(&token(&k1));
    assert_eq!(code, "200", "{body}\n{}", proxy.log());
    let (code, body) = with(&off_token);
    assert_eq!(code, "200", "{body}\n{}", proxy.log());
    let l = proxy.log();
    assert!(
        l.contains("jwksUri uses plain http") && l.contains(&uri),
        "{l}"
    );
    let dump: serde_json::Value =
        serde_json::from_str(&curl(&[&format!("{admin}/config_dump")]).1).unwrap();
    let uris = dump["jwks"]["uris"].as_array().unwrap();
    let by_uri = |u: &str| uris.iter().find(|e| e["uri"] == u).unwrap().clone();
    assert_eq!(by_uri(&uri)["source"], "remote");
    assert_eq!(by_uri(&uri)["state"], "ok");
    let off_entry = by_uri("https://offline.example/keys");
    assert_eq!(off_entry["source"], "file", "{off_entry}");
    assert_eq!(off_entry["state"], "ok", "{off_entry}");
    assert_eq!(off_entry["kids"], serde_json::json!([kid(&jwks_off)]));
    assert!(!l.contains("JWKS fetch failed"), "{l}");
}
