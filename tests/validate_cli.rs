//! `rampart validate PATH...`: exit 0 with a one-line summary when everything is valid, exit 1
//! with one line per problem otherwise.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const GOOD: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-get, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: foo}
spec: {mtls: {mode: STRICT}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: httpbin, namespace: foo}
spec: {replicas: 1}
";

const BAD: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-nothing, namespace: foo}
spec: {action: DENY}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: foo}
spec: {jwtRules: [{issuer: x, jwksUri: \"ftp://keys\"}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: fine, namespace: foo}
spec: {}
";

fn rampart(args: &[&Path]) -> Output {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .arg("validate")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run rampart");
    // Bounded: validation of a few small files must finish quickly.
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("rampart validate did not finish within 60s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("mkdir");
    }
    std::fs::write(&path, content).expect("write");
    path
}

#[test]
fn valid_files_exit_zero_with_a_one_line_summary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), "good.yaml", GOOD);
    let out = rampart(&[&file]);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout} stderr: {}",
        text(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.contains("1 AuthorizationPolicy"), "{stdout}");
    assert!(stdout.contains("1 PeerAuthentication"), "{stdout}");
    assert!(stdout.contains("1 file"), "{stdout}");
    assert!(stdout.contains("1 other document(s) skipped"), "{stdout}");
}

#[test]
fn invalid_files_exit_one_with_one_line_per_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), "bad.yaml", BAD);
    let out = rampart(&[&file]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "stdout: {stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let name = file.display().to_string();
    assert_eq!(
        lines[0],
        format!(
            "{name}: document 1: spec.rules: DENY action without `rules` is meaningless as it will never be triggered, add an empty rule `{{}}` if you want it be triggered for every request"
        )
    );
    assert!(
        lines[1].starts_with(&format!(
            "{name}: document 2: spec.jwtRules[0].jwksUri: URI scheme \"ftp\" is not supported"
        )),
        "{}",
        lines[1]
    );
}

#[test]
fn folders_are_searched_and_every_path_is_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "policies/a.yaml", GOOD);
    write(
        dir.path(),
        "policies/nested/b.yml",
        &GOOD
            .replace("allow-get", "allow-get-2")
            .replace("name: default", "name: other"),
    );
    write(dir.path(), "policies/readme.txt", "not yaml: [");
    let out = rampart(&[&dir.path().join("policies")]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout} {}", text(&out.stderr));
    assert!(
        stdout.contains("2 AuthorizationPolicy") && stdout.contains("2 files"),
        "{stdout}"
    );

    // A good folder plus a bad file: still exit 1, and only the bad file's problems printed.
    let bad = write(dir.path(), "bad.yaml", BAD);
    let out = rampart(&[&dir.path().join("policies"), &bad]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout).lines().count(), 2);

    // A path that does not exist is a problem, not a success.
    let out = rampart(&[&dir.path().join("missing")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("cannot read"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn warnings_go_to_stderr_and_do_not_fail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        "warn.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: w, namespace: foo}\nspec: {selector: {}}\n",
    );
    let out = rampart(&[&file]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("warning:") && text(&out.stderr).contains("without labels"));
    assert_eq!(text(&out.stdout).lines().count(), 1);
}

#[test]
fn no_path_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .arg("validate")
        .output()
        .expect("run rampart");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_mesh_folder_is_checked_whole_not_mistaken_for_policy() {
    // The bundled quickstart: mesh.yaml and workloads.yaml are not policy documents, and
    // together with the policy they form a valid mesh folder.
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart");
    let out = rampart(&[&quickstart]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("valid mesh folder"), "{stdout}");
    assert!(stdout.contains("3 workload(s)"), "{stdout}");

    // Its negative twin: a registry with an unknown port protocol and a broken policy, each
    // named with file and field, exit 1.
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "mesh.yaml", "trustDomain: cluster.local\n");
    write(
        dir.path(),
        "workloads.yaml",
        "workloads:\n- name: web\n  namespace: ns1\n  ports:\n  - {port: 8080, protocol: smtp, app: 127.0.0.1:18080, inbound: 127.0.0.1:15080}\n  proxy: {outbound: 127.0.0.1:15001, admin: 127.0.0.1:15000}\n",
    );
    write(dir.path(), "policy/bad.yaml", BAD);
    let out = rampart(&[dir.path()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("workloads.yaml: workloads[0].ports[0].protocol"),
        "{stdout}"
    );
    assert!(stdout.contains("policy/bad.yaml"), "{stdout}");
    assert!(!stdout.contains("valid mesh folder"), "{stdout}");
}

/// A mesh folder's warnings: what only the folder as a whole shows (a CUSTOM policy whose
/// provider mesh.yaml lacks, or cannot use) and the policy-load warnings `validate <policy
/// dir>` prints. They go to stderr and do not fail the check (the proxies serve the folder,
/// denying what those rules match): exit 0.
#[test]
fn a_mesh_folder_warns_about_providers_and_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        dir.path(),
        "workloads.yaml",
        "workloads:\n- name: backend\n  namespace: api\n  labels: {app: backend}\n  ports:\n  - {port: 8080, protocol: http, app: 127.0.0.1:18080, inbound: 127.0.0.1:15081}\n  proxy: {outbound: 127.0.0.1:15001, admin: 127.0.0.1:15000}\n",
    );
    write(
        dir.path(),
        "policy/ext.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext, namespace: api}\nspec:\n  selector: {matchLabels: {app: backend}}\n  action: CUSTOM\n  provider: {name: opa}\n  rules: [{to: [{operation: {paths: ['/admin*']}}]}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: all, namespace: api}\nspec: {selector: {}}\n",
    );
    let run = |extra: Option<&Path>| {
        let mut args = vec![dir.path()];
        args.extend(extra);
        let out = rampart(&args);
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    // No mesh.yaml: no provider named opa.
    let (code, stdout, stderr) = run(None);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("valid mesh folder"), "{stdout}");
    assert!(
        stderr.contains(
            "warning: {}: policy/ext.yaml: document 1: AuthorizationPolicy api/ext: CUSTOM provider \"opa\" is not defined"
                .replace("{}", &dir.path().display().to_string())
                .as_str()
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("policy/ext.yaml: document 2: spec.selector: AuthorizationPolicy api/all:")
            && stderr.contains("without labels"),
        "{stderr}"
    );
    // Defined but unusable: named with why.
    write(
        dir.path(),
        "mesh.yaml",
        "extensionProviders:\n- name: opa\n  envoyExtAuthzHttp: {service: ext-authz, port: 9191}\n",
    );
    let (code, _, stderr) = run(None);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("CUSTOM provider \"opa\" cannot be used")
            && stderr.contains("fully qualified"),
        "{stderr}"
    );
    // --no-warnings: none printed.
    let (code, _, stderr) = run(Some(Path::new("--no-warnings")));
    assert_eq!(code, Some(0));
    assert!(!stderr.contains("warning:"), "{stderr}");
    // Twin: a usable provider: the selector warning alone.
    write(
        dir.path(),
        "mesh.yaml",
        "extensionProviders:\n- name: opa\n  envoyExtAuthzGrpc: {service: 127.0.0.1, port: 9191}\n",
    );
    let (code, _, stderr) = run(None);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stderr.matches("warning:").count(), 1, "{stderr}");
    assert!(!stderr.contains("CUSTOM"), "{stderr}");
}
