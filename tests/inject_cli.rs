//! `rampart inject -f FILE|-`: the sidecar (agent and proxy) added to Pod-bearing manifests,
//! at Istio's Pod paths (DESIGN §6); everything else passed through byte for byte; bad input
//! refused with the document index and nothing printed.

mod support;

use std::io::Write as _;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      serviceAccountName: web
      containers:
      - name: app
        image: example/web:1
        ports:
        - containerPort: 8080
        env:
        - name: MODE
          value: \"on\"
";

/// A Service with comments and flow style: must come out exactly as it went in.
const SERVICE: &str = "\
# the web Service
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}   # flow style kept
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
";

const CONFIGMAP: &str = "\
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  enabled: \"false\"
  script: |
    echo one
    echo two
";

fn pod_template(kind: &str, name: &str) -> String {
    let pod = format!(
        "metadata:\n  labels: {{app: {name}}}\nspec:\n  containers:\n  - name: main\n    image: example/{name}:1\n    ports: [{{containerPort: 9000}}]\n"
    );
    let indent = |s: &str, n: usize| {
        s.lines()
            .map(|l| format!("{}{l}\n", " ".repeat(n)))
            .collect::<String>()
    };
    match kind {
        "Pod" => format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n{}",
            &pod[pod.find("spec:").unwrap()..]
        ),
        "CronJob" => format!(
            "apiVersion: batch/v1\nkind: CronJob\nmetadata:\n  name: {name}\nspec:\n  schedule: \"*/5 * * * *\"\n  jobTemplate:\n    spec:\n      template:\n{}",
            indent(
                &pod.replace("spec:\n", "spec:\n  restartPolicy: OnFailure\n"),
                8
            )
        ),
        "Job" => format!(
            "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: {name}\nspec:\n  template:\n{}",
            indent(
                &pod.replace("spec:\n", "spec:\n  restartPolicy: Never\n"),
                4
            )
        ),
        _ => format!(
            "apiVersion: apps/v1\nkind: {kind}\nmetadata:\n  name: {name}\nspec:\n  selector:\n    matchLabels: {{app: {name}}}\n  template:\n{}",
            indent(&pod, 4)
        ),
    }
}

/// Runs `rampart inject ARGS` with `stdin` (if any), bounded in time.
fn inject(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .arg("inject")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run rampart inject");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("rampart inject did not finish within 60s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("output")
}

fn inject_stdin(text: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec!["-f", "-"];
    args.extend_from_slice(extra);
    let out = inject(&args, Some(text));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "inject failed: {stderr}");
    (String::from_utf8(out.stdout).unwrap(), stderr)
}

fn docs(yaml: &str) -> Vec<Value> {
    yaml.split("\n---\n")
        .map(|d| serde_saphyr::from_str::<Value>(d).unwrap_or_else(|e| panic!("{e}\n{d}")))
        .collect()
}

fn pod_spec(obj: &Value) -> &Value {
    match obj["kind"].as_str().unwrap() {
        "Pod" => &obj["spec"],
        "CronJob" => &obj["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        _ => &obj["spec"]["template"]["spec"],
    }
}

fn pod_meta(obj: &Value) -> &Value {
    match obj["kind"].as_str().unwrap() {
        "Pod" => &obj["metadata"],
        "CronJob" => &obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"],
        _ => &obj["spec"]["template"]["metadata"],
    }
}

fn container<'a>(spec: &'a Value, list: &str, name: &str) -> &'a Value {
    spec[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} in {spec}"))
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {list} {name} in {spec}"))
}

fn args_of(c: &Value) -> Vec<String> {
    c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

/// The value after `flag` in `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> &'a str {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} not in {args:?}"));
    &args[i + 1]
}

fn env_value<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    c["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| e.get("value").or(e.get("valueFrom")).unwrap())
}

fn volume<'a>(spec: &'a Value, name: &str) -> &'a Value {
    spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

fn mount_path<'a>(c: &'a Value, volume: &str) -> &'a str {
    c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume)
        .unwrap_or_else(|| panic!("{} does not mount {volume}", c["name"]))["mountPath"]
        .as_str()
        .unwrap()
}

/// A Deployment gets the agent and the proxy (native sidecars, before the app), the projected
/// token with audience istio-ca at Istio's path, the root from ConfigMap istio-ca-root-cert
/// at Istio's path, the SDS socket they share, and HTTP_PROXY in the app; the app container
/// and the rest of the object are kept.
#[test]
fn deployment_gets_agent_proxy_token_root_and_http_proxy() {
    let (out, notes) = inject_stdin(DEPLOYMENT, &[]);
    let d = &docs(&out)[0];
    assert_eq!(d["kind"], "Deployment");
    assert_eq!(d["spec"]["replicas"], 2);
    let spec = pod_spec(d);
    assert_eq!(spec["serviceAccountName"], "web");

    // The sidecars, in order, first among the init containers, restartPolicy Always.
    let init: Vec<&str> = spec["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(init, ["rampart-agent", "rampart-proxy"]);
    let agent = container(spec, "initContainers", "rampart-agent");
    let proxy = container(spec, "initContainers", "rampart-proxy");
    for c in [agent, proxy] {
        assert_eq!(c["restartPolicy"], "Always");
        assert_eq!(
            c["image"],
            format!("ghcr.io/rampart-mesh/rampart:{}", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(c["securityContext"]["runAsNonRoot"], true);
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["runAsUser"], 1337);
        for (var, field) in [
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace"),
            ("POD_IP", "status.podIP"),
            ("NODE_NAME", "spec.nodeName"),
            ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ] {
            assert_eq!(
                env_value(c, var).unwrap()["fieldRef"]["fieldPath"],
                field,
                "{var} in {}",
                c["name"]
            );
        }
    }

    // The projected token: audience istio-ca, 12 h, file istio-token.
    let token = &volume(spec, "istio-token")["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "istio-ca");
    assert_eq!(token["expirationSeconds"], 43200);
    assert_eq!(token["path"], "istio-token");
    assert_eq!(
        volume(spec, "istiod-ca-cert")["configMap"]["name"],
        "istio-ca-root-cert"
    );
    assert!(volume(spec, "workload-socket")["emptyDir"].is_object());

    // The agent: Istio's token and root paths (DESIGN §6), the CA address, the SDS socket.
    let a = args_of(agent);
    assert_eq!(a[0], "agent");
    assert_eq!(
        format!("{}/istio-token", mount_path(agent, "istio-token")),
        "/var/run/secrets/tokens/istio-token"
    );
    assert_eq!(flag(&a, "--token"), "/var/run/secrets/tokens/istio-token");
    assert_eq!(
        format!("{}/root-cert.pem", mount_path(agent, "istiod-ca-cert")),
        "/var/run/secrets/istio/root-cert.pem"
    );
    assert_eq!(
        flag(&a, "--ca-root"),
        "/var/run/secrets/istio/root-cert.pem"
    );
    assert_eq!(flag(&a, "--ca-addr"), "istiod.istio-system.svc:15012");
    assert_eq!(flag(&a, "--ca-server-name"), "istiod.istio-system.svc");
    assert_eq!(flag(&a, "--namespace"), "$(POD_NAMESPACE)");
    assert_eq!(flag(&a, "--service-account"), "$(SERVICE_ACCOUNT)");
    let socket = "/var/run/secrets/workload-spiffe-uds/socket";
    assert_eq!(flag(&a, "--sds-socket"), socket);
    assert_eq!(
        mount_path(agent, "workload-socket"),
        "/var/run/secrets/workload-spiffe-uds"
    );
    // The kubelet makes the emptyDir 0777: the agent is told to trust it, which holds
    // because no app container mounts it (only the two sidecars).
    assert!(a.iter().any(|x| x == "--trust-socket-dir"), "{a:?}");
    for c in spec["containers"].as_array().unwrap() {
        let mounts = c["volumeMounts"].as_array().cloned().unwrap_or_default();
        assert!(
            mounts.iter().all(|m| m["name"] != "workload-socket"),
            "an app container mounts the socket volume: {c}"
        );
    }

    // The proxy: config from the control plane for this Pod, certificates over the socket.
    let p = args_of(proxy);
    assert_eq!(p[0], "proxy");
    assert_eq!(flag(&p, "--control-plane"), "istiod.istio-system.svc:15012");
    assert_eq!(flag(&p, "--workload"), "$(POD_NAMESPACE)/$(POD_NAME)");
    assert_eq!(flag(&p, "--sds-socket"), socket);
    assert_eq!(flag(&p, "--admin"), "127.0.0.1:15000");
    assert_eq!(
        mount_path(proxy, "workload-socket"),
        "/var/run/secrets/workload-spiffe-uds"
    );
    let ready = &proxy["readinessProbe"]["exec"]["command"];
    assert_eq!(
        ready,
        &serde_json::json!(["rampart", "probe", "http://127.0.0.1:15000/ready"])
    );
    assert_eq!(proxy["startupProbe"]["exec"]["command"], *ready);

    // The app: kept, plus the outbound proxy; its own env kept as it was (a string "on").
    let app = container(spec, "containers", "app");
    assert_eq!(spec["containers"].as_array().unwrap().len(), 1);
    assert_eq!(app["image"], "example/web:1");
    assert_eq!(env_value(app, "MODE").unwrap(), "on");
    assert_eq!(
        env_value(app, "HTTP_PROXY").unwrap(),
        "http://127.0.0.1:15001"
    );
    assert_eq!(
        env_value(app, "http_proxy").unwrap(),
        "http://127.0.0.1:15001"
    );
    assert!(
        env_value(app, "NO_PROXY")
            .unwrap()
            .as_str()
            .unwrap()
            .contains("127.0.0.1")
    );
    // The sidecars themselves do not go through the proxy.
    assert!(env_value(agent, "HTTP_PROXY").is_none());

    // Marked injected; tlsMode label for Istio's sidecars; the app stays kubectl's default.
    let meta = pod_meta(d);
    let status: Value = serde_json::from_str(
        meta["annotations"]["sidecar.rampart.io/status"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        status["initContainers"],
        serde_json::json!(["rampart-agent", "rampart-proxy"])
    );
    assert_eq!(meta["labels"]["security.istio.io/tlsMode"], "istio");
    assert_eq!(meta["labels"]["app"], "web");
    assert_eq!(
        meta["annotations"]["kubectl.kubernetes.io/default-container"],
        "app"
    );

    // The person is told what the app must do.
    assert!(
        notes.contains("the app must listen on 127.0.0.1:8080"),
        "{notes}"
    );
    assert!(notes.contains("1 Pod template(s) injected"), "{notes}");
}

/// Injecting an injected manifest changes nothing (byte for byte), and says so.
#[test]
fn injecting_twice_changes_nothing() {
    let input = format!(
        "{DEPLOYMENT}---\n{SERVICE}---\n{}",
        pod_template("Pod", "solo")
    );
    let (once, _) = inject_stdin(&input, &[]);
    assert_ne!(once, input, "the first pass must inject");
    let (twice, notes) = inject_stdin(&once, &[]);
    assert_eq!(twice, once);
    assert!(notes.contains("already injected"), "{notes}");
    assert!(notes.contains("0 Pod template(s) injected"), "{notes}");
}

/// `sidecar.istio.io/inject: "false"` (annotation or label) and hostNetwork Pods are passed
/// through untouched with a note; the same Pod without the opt-out is injected.
#[test]
fn opt_out_and_host_network_are_skipped_with_a_note() {
    let opted_out = DEPLOYMENT.replace(
        "      labels: {app: web}\n",
        "      labels: {app: web}\n      annotations:\n        sidecar.istio.io/inject: \"false\"\n",
    );
    let (out, notes) = inject_stdin(&opted_out, &[]);
    assert_eq!(out, opted_out);
    assert!(
        notes.contains("sidecar.istio.io/inject: \"false\": not injected"),
        "{notes}"
    );

    let label_opt_out = DEPLOYMENT.replace(
        "      labels: {app: web}\n",
        "      labels: {app: web, sidecar.istio.io/inject: \"false\"}\n",
    );
    let (out, _) = inject_stdin(&label_opt_out, &[]);
    assert_eq!(out, label_opt_out);

    let host = DEPLOYMENT.replace(
        "      serviceAccountName: web\n",
        "      serviceAccountName: web\n      hostNetwork: true\n",
    );
    let (out, notes) = inject_stdin(&host, &[]);
    assert_eq!(out, host);
    assert!(notes.contains("hostNetwork Pod: not injected"), "{notes}");

    // Twins: inject "true", and hostNetwork false, are injected.
    let opted_in = opted_out.replace("inject: \"false\"", "inject: \"true\"");
    let (out, _) = inject_stdin(&opted_in, &[]);
    assert!(out.contains("rampart-proxy"), "{out}");
    let (out, _) = inject_stdin(
        &host.replace("hostNetwork: true", "hostNetwork: false"),
        &[],
    );
    assert!(out.contains("rampart-proxy"), "{out}");
}

/// Every Pod-bearing kind is injected at its own template path; Services and ConfigMaps come
/// out byte for byte (comments, flow style and all), in the input's order.
#[test]
fn multi_document_stream_injects_each_workload_kind_and_passes_the_rest() {
    let kinds = [
        "Deployment",
        "StatefulSet",
        "DaemonSet",
        "ReplicaSet",
        "Job",
        "CronJob",
        "Pod",
    ];
    let mut input = String::from(SERVICE);
    for (i, k) in kinds.iter().enumerate() {
        input.push_str("---\n");
        input.push_str(&pod_template(k, &format!("w{i}")));
    }
    input.push_str("---\n");
    input.push_str(CONFIGMAP);
    let (out, notes) = inject_stdin(&input, &[]);
    assert!(notes.contains("7 Pod template(s) injected"), "{notes}");
    let pieces: Vec<&str> = out.split("---\n").collect();
    assert_eq!(pieces.len(), kinds.len() + 2);
    assert_eq!(pieces[0], SERVICE, "the Service must be unchanged");
    assert_eq!(
        *pieces.last().unwrap(),
        CONFIGMAP,
        "the ConfigMap must be unchanged"
    );
    let objs = docs(&out);
    for (i, k) in kinds.iter().enumerate() {
        let o = &objs[i + 1];
        assert_eq!(o["kind"], *k);
        assert_eq!(o["metadata"]["name"], format!("w{i}"));
        let spec = pod_spec(o);
        container(spec, "initContainers", "rampart-agent");
        container(spec, "initContainers", "rampart-proxy");
        assert_eq!(
            env_value(container(spec, "containers", "main"), "HTTP_PROXY").unwrap(),
            "http://127.0.0.1:15001",
            "{k}"
        );
        assert!(
            pod_meta(o)["annotations"]["sidecar.rampart.io/status"].is_string(),
            "{k}"
        );
    }
    // Job and CronJob keep their restartPolicy: native sidecars let them complete.
    assert_eq!(pod_spec(&objs[5])["restartPolicy"], "Never");
    assert_eq!(pod_spec(&objs[6])["restartPolicy"], "OnFailure");
}

/// Broken input: exit 2, an error naming the document (1-based) and the reason, and nothing
/// on standard output; also with -o, the file is not written.
#[test]
fn bad_input_names_the_document_and_prints_nothing() {
    let broken = format!("{SERVICE}---\n{DEPLOYMENT}---\nkind: Deployment\nmetadata: {{name: x\n");
    let out = inject(&["-f", "-"], Some(&broken));
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("document 3: not valid YAML"), "{err}");

    let scalar = format!("{DEPLOYMENT}---\njust a string\n");
    let out = inject(&["-f", "-"], Some(&scalar));
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("document 2: not a Kubernetes object"), "{err}");

    let no_containers = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  template:\n    spec: {}\n";
    let out = inject(&["-f", "-"], Some(no_containers));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("document 1 (Deployment x): spec.template.spec.containers is missing"),
        "{err}"
    );

    // A container already named like a sidecar, without the status annotation: refused.
    let clash = DEPLOYMENT.replace("name: app", "name: rampart-proxy");
    let out = inject(&["-f", "-"], Some(&clash));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already named rampart-proxy"));

    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.yaml");
    let output = dir.path().join("out.yaml");
    std::fs::write(&input, &broken).unwrap();
    let out = inject(
        &[
            "-f",
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(!output.exists(), "nothing may be written on error");

    let out = inject(
        &["-f", dir.path().join("missing.yaml").to_str().unwrap()],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.yaml"));

    let out = inject(&["-f", "-", "--ca-address", "no-port"], Some(DEPLOYMENT));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca-address"));
}

/// `-f FILE -o FILE`, `--image` and `--ca-address` (the name the agent verifies follows it).
#[test]
fn file_in_file_out_with_image_and_ca_address() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.yaml");
    let output = dir.path().join("out.yaml");
    std::fs::write(&input, DEPLOYMENT).unwrap();
    let out = inject(
        &[
            "-f",
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
            "--image",
            "registry.example/rampart:dev",
            "--ca-address",
            "rampart-ca.istio-system.svc:15012",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    let d = &docs(&std::fs::read_to_string(&output).unwrap())[0];
    let spec = pod_spec(d);
    let agent = container(spec, "initContainers", "rampart-agent");
    let proxy = container(spec, "initContainers", "rampart-proxy");
    assert_eq!(agent["image"], "registry.example/rampart:dev");
    assert_eq!(proxy["image"], "registry.example/rampart:dev");
    let a = args_of(agent);
    assert_eq!(flag(&a, "--ca-addr"), "rampart-ca.istio-system.svc:15012");
    assert_eq!(flag(&a, "--ca-server-name"), "rampart-ca.istio-system.svc");
    assert_eq!(
        flag(&args_of(proxy), "--control-plane"),
        "rampart-ca.istio-system.svc:15012"
    );
}

/// The sidecars' arguments are accepted by the real binary's parser: every flag is one that
/// `rampart agent` / `rampart proxy` has (their values parsed too: clap reads every argument
/// before it reaches a trailing --help). A made-up flag is refused the same way.
#[test]
fn sidecar_arguments_are_accepted_by_the_binary() {
    let (out, _) = inject_stdin(DEPLOYMENT, &[]);
    let spec = pod_spec(&docs(&out)[0]).clone();
    for name in ["rampart-agent", "rampart-proxy"] {
        let args: Vec<String> = args_of(container(&spec, "initContainers", name))
            .into_iter()
            .map(|a| {
                a.replace("$(POD_NAMESPACE)", "shop")
                    .replace("$(POD_NAME)", "web-1")
                    .replace("$(SERVICE_ACCOUNT)", "web")
                    .replace("$(POD_IP)", "10.1.2.3")
            })
            .collect();
        let sub = args[0].clone();
        let help = run_rampart(&[sub.as_str(), "--help"]);
        let checked = args.clone();
        let out = rampart_status(
            &checked
                .iter()
                .map(String::as_str)
                .chain(["--help"])
                .collect::<Vec<_>>(),
        );
        assert!(
            out.0,
            "{name}: `rampart {checked:?} --help` refused: {}",
            out.1
        );
        for a in checked.iter().filter(|a| a.starts_with("--")) {
            assert!(
                help.contains(a.as_str()),
                "{name}: {a} not in `rampart {sub} --help`"
            );
        }
        // Twin: an unknown flag before --help is refused.
        let mut bad: Vec<&str> = checked.iter().map(String::as_str).collect();
        bad.extend(["--no-such-flag", "x", "--help"]);
        let out = rampart_status(&bad);
        assert!(!out.0, "{name}: a made-up flag was accepted");
        assert!(out.1.contains("--no-such-flag"), "{}", out.1);
    }
    // The exec probe the proxy gets is a real subcommand.
    assert!(run_rampart(&["probe", "--help"]).contains("URL"));
}

fn rampart_status(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run rampart");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn run_rampart(args: &[&str]) -> String {
    let (ok, text) = rampart_status(args);
    assert!(ok, "rampart {args:?}: {text}");
    text
}

/// `rampart probe`: 0 for a 2xx answer, 1 for another status or no answer.
#[test]
fn probe_exits_zero_only_for_a_2xx_answer() {
    use std::io::{BufRead as _, BufReader};
    use std::net::TcpListener;
    let serve = |status: &'static str| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((s, _)) = l.accept() {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                while r.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                    line.clear();
                }
                let mut s = s;
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                );
            }
        });
        addr
    };
    let ok = serve("200 OK");
    assert!(rampart_status(&["probe", &format!("http://{ok}/ready")]).0);
    let not_ready = serve("503 Service Unavailable");
    let (pass, text) = rampart_status(&["probe", &format!("http://{not_ready}/ready")]);
    assert!(!pass);
    assert!(text.contains("503"), "{text}");
    // Nothing listening: a failure, not a pass.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    assert!(
        !rampart_status(&[
            "probe",
            "--timeout",
            "2s",
            &format!("http://{closed}/ready")
        ])
        .0
    );
}

/// `kubectl get -o yaml` prints a `List`: its Pod-bearing items are injected, the others kept.
#[test]
fn list_items_are_injected_one_by_one() {
    let list = "\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: web}
  spec: {ports: [{port: 80}]}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: web}
  spec:
    selector: {matchLabels: {app: web}}
    template:
      metadata: {labels: {app: web}}
      spec:
        containers: [{name: app, image: example/web:1, ports: [{containerPort: 8080}]}]
";
    let (out, notes) = inject_stdin(list, &[]);
    assert!(notes.contains("1 Pod template(s) injected"), "{notes}");
    let l = &docs(&out)[0];
    assert_eq!(l["kind"], "List");
    let items = l["items"].as_array().unwrap();
    assert_eq!(
        items[0],
        serde_json::json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                           "spec": {"ports": [{"port": 80}]}})
    );
    let spec = pod_spec(&items[1]);
    container(spec, "initContainers", "rampart-agent");
    container(spec, "initContainers", "rampart-proxy");
    // And again: nothing changes.
    let (twice, _) = inject_stdin(&out, &[]);
    assert_eq!(twice, out);
}

/// Every field inject writes is one Kubernetes has: each injected object goes through
/// k8s-openapi's type and back unchanged (a misspelt field would be dropped).
#[test]
fn injected_objects_round_trip_through_kubernetes_types() {
    use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
    use k8s_openapi::api::batch::v1::{CronJob, Job};
    use k8s_openapi::api::core::v1::Pod;
    fn check<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) {
        let typed: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"));
        assert_eq!(
            &serde_json::to_value(&typed).unwrap(),
            v,
            "{} lost a field in a typed round trip",
            v["kind"]
        );
    }
    let kinds = [
        "Deployment",
        "StatefulSet",
        "DaemonSet",
        "ReplicaSet",
        "Job",
        "CronJob",
        "Pod",
    ];
    let input: Vec<String> = kinds
        .iter()
        .enumerate()
        .map(|(i, k)| pod_template(k, &format!("w{i}")))
        .collect();
    let (out, _) = inject_stdin(&input.join("---\n"), &[]);
    for o in docs(&out) {
        match o["kind"].as_str().unwrap() {
            "Deployment" => check::<Deployment>(&o),
            "StatefulSet" => check::<StatefulSet>(&o),
            "DaemonSet" => check::<DaemonSet>(&o),
            "ReplicaSet" => check::<ReplicaSet>(&o),
            "Job" => check::<Job>(&o),
            "CronJob" => check::<CronJob>(&o),
            "Pod" => check::<Pod>(&o),
            k => panic!("unexpected {k}"),
        }
        assert!(out.contains("restartPolicy: Always"));
    }
}

/// The kubelet's network probes go through the proxy (Istio's probe rewriting): `httpGet`
/// (by number or port name) and `tcpSocket` probes become `httpGet` of
/// `/app-health/<container>/<kind>` on port 15020, their timing kept; the proxy gets
/// `--status-listen $(POD_IP):15020` and the originals in `ISTIO_KUBE_APP_PROBERS`. Then
/// the real `rampart proxy`, given exactly that variable, answers the rewritten probes by
/// doing the originals against an app on 127.0.0.1: the app's status and the probe's
/// headers pass; a closed app port is 503; other paths are 404.
#[test]
fn probes_are_rewritten_and_the_proxy_does_the_originals() {
    let app = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app_port = app.local_addr().unwrap().port();
    let manifest = format!(
        "\
apiVersion: v1
kind: Pod
metadata:
  name: web
spec:
  containers:
  - name: app
    image: example/web:1
    ports:
    - name: http
      containerPort: {app_port}
    readinessProbe:
      httpGet:
        path: /healthz?deep=1
        port: http
        httpHeaders:
        - name: X-Probe
          value: kubelet
      periodSeconds: 7
      timeoutSeconds: 2
    livenessProbe:
      tcpSocket:
        port: {app_port}
      initialDelaySeconds: 3
    startupProbe:
      grpc:
        port: {app_port}
"
    );
    let (out, notes) = inject_stdin(&manifest, &[]);
    let pod = &docs(&out)[0];
    let spec = pod_spec(pod);
    let app_c = container(spec, "containers", "app");
    assert_eq!(
        app_c["readinessProbe"],
        serde_json::json!({"httpGet": {"path": "/app-health/app/readyz", "port": 15020,
            "scheme": "HTTP"}, "periodSeconds": 7, "timeoutSeconds": 2})
    );
    assert_eq!(
        app_c["livenessProbe"],
        serde_json::json!({"httpGet": {"path": "/app-health/app/livez", "port": 15020,
            "scheme": "HTTP"}, "initialDelaySeconds": 3})
    );
    // gRPC probes are not passed through: left as they are, with a note.
    assert_eq!(app_c["startupProbe"]["grpc"]["port"], app_port);
    assert!(
        notes.contains("startupProbe: not rewritten (a gRPC probe)"),
        "{notes}"
    );
    let proxy = container(spec, "initContainers", "rampart-proxy");
    assert_eq!(flag(&args_of(proxy), "--status-listen"), "$(POD_IP):15020");
    let probers = env_value(proxy, "ISTIO_KUBE_APP_PROBERS")
        .and_then(Value::as_str)
        .expect("ISTIO_KUBE_APP_PROBERS on the proxy")
        .to_owned();
    let originals: Value = serde_json::from_str(&probers).unwrap();
    assert_eq!(
        originals["/app-health/app/readyz"]["httpGet"]["port"], app_port,
        "the port name is resolved: {originals}"
    );

    // The app: answers /healthz?deep=1 with 200 when the probe header came, else 500.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    {
        let seen = seen.clone();
        std::thread::spawn(move || {
            for s in app.incoming() {
                let Ok(mut s) = s else { return };
                let mut buf = [0u8; 4096];
                let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let ok = head.starts_with("GET /healthz?deep=1 ")
                    && head.to_ascii_lowercase().contains("x-probe: kubelet");
                seen.lock().unwrap().push(head);
                let status = if ok {
                    "200 OK"
                } else {
                    "500 Internal Server Error"
                };
                let _ = s.write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                );
            }
        });
    }
    let probe_addr = std::net::SocketAddr::from(([127, 0, 0, 1], support::free_port()));
    let dir = tempfile::tempdir().unwrap();
    let proxy = probe_proxy(dir.path(), probe_addr, &probers);
    let get = |path: &str| -> (u16, String) {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "5", "-w", "\n%{http_code}"])
            .args(["-A", "kube-probe/1.33"])
            .arg(format!("http://{probe_addr}{path}"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.parse().unwrap_or(0), body.to_owned())
    };
    let start = Instant::now();
    while get("/app-health/app/livez").0 == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the probe port never opened"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(get("/app-health/app/readyz").0, 200);
    let head = seen.lock().unwrap().last().cloned().unwrap();
    assert!(
        head.contains("kube-probe/1.33"),
        "the kubelet's User-Agent passed: {head}"
    );
    assert_eq!(get("/app-health/app/livez").0, 200);
    // Only the probes: no other path reaches the app.
    // (The TCP probe's bare connections reach the app too; count HTTP requests only.)
    let requests = || {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|h| h.starts_with("GET "))
            .count()
    };
    let before = requests();
    assert_eq!(get("/healthz").0, 404);
    assert_eq!(get("/app-health/app/startupz").0, 404);
    assert_eq!(requests(), before);
    // Metrics are served there once the proxy has started; this one never gets its
    // configuration (no control plane), so Prometheus is told so, and the probes still work.
    let (code, body) = get("/stats/prometheus");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not started"), "{body}");
    assert_eq!(requests(), before);
    drop(proxy);

    // Its twin: with the app's port closed, both probes fail.
    let closed_port = support::free_port();
    let dead = probers.replace(&app_port.to_string(), &closed_port.to_string());
    let proxy = probe_proxy(dir.path(), probe_addr, &dead);
    let start = Instant::now();
    while get("/app-health/app/livez").0 == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the probe port never opened"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, body) = get("/app-health/app/readyz");
    assert_eq!(code, 503, "{body}");
    assert_eq!(get("/app-health/app/livez").0, 503);
    drop(proxy);
}

/// Probes stay as they are (with a note each) when the Pod opts out of rewriting
/// (`sidecar.istio.io/rewriteAppHTTPProbers: "false"`) or an app declares port 15020; then
/// the proxy gets no probe listener.
#[test]
fn probe_rewriting_opt_outs() {
    let pod = |annotations: &str, port: u16| {
        format!(
            "\
apiVersion: v1
kind: Pod
metadata:
  name: web
  annotations: {annotations}
spec:
  containers:
  - name: app
    image: example/web:1
    ports:
    - containerPort: {port}
    readinessProbe:
      httpGet:
        path: /healthz
        port: {port}
"
        )
    };
    for (manifest, why) in [
        (
            pod("{sidecar.istio.io/rewriteAppHTTPProbers: \"false\"}", 8080),
            "rewriteAppHTTPProbers",
        ),
        (pod("{}", 15020), "port 15020"),
    ] {
        let (out, notes) = inject_stdin(&manifest, &[]);
        let pod = &docs(&out)[0];
        let spec = pod_spec(pod);
        let app = container(spec, "containers", "app");
        assert_eq!(app["readinessProbe"]["httpGet"]["path"], "/healthz");
        assert!(
            notes.contains("not rewritten") && notes.contains(why),
            "{notes}"
        );
        let proxy = container(spec, "initContainers", "rampart-proxy");
        assert!(env_value(proxy, "ISTIO_KUBE_APP_PROBERS").is_none());
        // The status port still serves metrics, unless the app has that port itself.
        assert_eq!(
            args_of(proxy).contains(&"--status-listen".to_owned()),
            why != "port 15020",
            "{why}"
        );
    }
}

/// Prometheus' annotation-based discovery is pointed at the proxy's metrics on the status
/// port, as Istio's injector does; a Pod that opts out (`prometheus.istio.io/merge-metrics:
/// "false"`, `prometheus.io/scrape: "false"`) keeps its annotations; one with its own
/// `prometheus.io/*` settings has them merged (the proxy scrapes the app and serves both),
/// also without `prometheus.io/port` when the port Prometheus would have scraped is clear
/// (the one declared port, or 80 with none); an app that declares port 15020 leaves the
/// proxy without a status port.
#[test]
fn scrape_annotations_point_at_the_status_port() {
    let pod = |annotations: &str, port: u16| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  annotations: {annotations}\n\
             spec:\n  containers:\n  - name: app\n    image: example/web:1\n    ports:\n    \
             - containerPort: {port}\n"
        )
    };
    let scrape = |annotations: &str, port: u16| {
        let (out, notes) = inject_stdin(&pod(annotations, port), &[]);
        let meta = pod_meta(&docs(&out)[0]).clone();
        let get = |k: &str| meta["annotations"][k].as_str().map(str::to_owned);
        (
            [
                get("prometheus.io/scrape"),
                get("prometheus.io/port"),
                get("prometheus.io/path"),
            ],
            notes,
        )
    };
    let some = |v: &str| Some(v.to_owned());
    let (set, _) = scrape("{}", 8080);
    assert_eq!(
        set,
        [some("true"), some("15020"), some("/stats/prometheus")]
    );
    // The Deployment's Pod template gets them too.
    let (out, _) = inject_stdin(DEPLOYMENT, &[]);
    let deployment = docs(&out);
    assert_eq!(
        pod_meta(&deployment[0])["annotations"]["prometheus.io/port"],
        "15020"
    );

    // Twins: opt-outs and the app's own settings are left alone.
    let (set, notes) = scrape("{prometheus.istio.io/merge-metrics: \"false\"}", 8080);
    assert_eq!(set, [None, None, None], "{notes}");
    let (set, _) = scrape("{prometheus.io/scrape: \"false\"}", 8080);
    assert_eq!(set, [some("false"), None, None]);
    // The app's own settings are merged (Istio's metrics merging): the proxy gets them in
    // ISTIO_PROMETHEUS_ANNOTATIONS and Prometheus is pointed at the proxy, which serves both.
    let manifest = pod(
        "{prometheus.io/scrape: \"true\", prometheus-io/port: \"9090\", prometheus.io/path: m}",
        8080,
    );
    let (out, notes) = inject_stdin(&manifest, &[]);
    let merged = &docs(&out)[0];
    let ann = &pod_meta(merged)["annotations"];
    assert_eq!(ann["prometheus.io/port"], "15020", "{ann}");
    assert_eq!(ann["prometheus.io/path"], "/stats/prometheus");
    assert!(
        ann.get("prometheus-io/port").is_none(),
        "the variant is gone: {ann}"
    );
    let proxy = container(pod_spec(merged), "initContainers", "rampart-proxy");
    let env: Value = serde_json::from_str(
        env_value(proxy, "ISTIO_PROMETHEUS_ANNOTATIONS")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no ISTIO_PROMETHEUS_ANNOTATIONS: {proxy}")),
    )
    .unwrap();
    assert_eq!(
        env,
        serde_json::json!({"scrape": "true", "port": "9090", "path": "/m"})
    );
    assert!(
        notes.contains("metrics merged: the app's metrics (127.0.0.1:9090/m)"),
        "{notes}"
    );
    // Without prometheus.io/port: the port Prometheus would have scraped, the one declared
    // (or 80 when none is, as Prometheus and istio-agent default).
    let merged_env = |manifest: &str| {
        let (out, notes) = inject_stdin(manifest, &[]);
        let doc = &docs(&out)[0];
        let proxy = container(pod_spec(doc), "initContainers", "rampart-proxy");
        let env = env_value(proxy, "ISTIO_PROMETHEUS_ANNOTATIONS")
            .and_then(Value::as_str)
            .map(|e| serde_json::from_str::<Value>(e).unwrap());
        let port = pod_meta(doc)["annotations"]["prometheus.io/port"].clone();
        (env, port, notes)
    };
    let (env, port, notes) = merged_env(&pod("{prometheus.io/scrape: \"true\"}", 8080));
    assert_eq!(
        env,
        Some(serde_json::json!({"scrape": "true", "port": "8080", "path": "/metrics"}))
    );
    assert_eq!(port, "15020");
    assert!(notes.contains("the one declared port"), "{notes}");
    let portless = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  annotations: \
                    {prometheus.io/scrape: \"true\", prometheus.io/path: /m}\nspec:\n  \
                    containers:\n  - name: app\n    image: example/web:1\n";
    let (env, _, notes) = merged_env(portless);
    assert_eq!(
        env,
        Some(serde_json::json!({"scrape": "true", "port": "80", "path": "/m"}))
    );
    assert!(notes.contains("no declared TCP port: port 80"), "{notes}");
    // An exporter in a native sidecar is scraped by Prometheus too: two ports, not merged.
    let with_exporter = format!(
        "{}  initContainers:\n  - name: exporter\n    image: example/exporter:1\n    \
         restartPolicy: Always\n    ports:\n    - containerPort: 9102\n",
        pod("{prometheus.io/scrape: \"true\"}", 8080)
    );
    let (env, port, notes) = merged_env(&with_exporter);
    assert_eq!((env, port), (None, Value::Null));
    assert!(notes.contains("the Pod declares 2 ports"), "{notes}");
    // Twins: with two declared ports it is not clear which: the Pod's settings stay, with
    // a note; a named port that is the sidecar's is not merged either.
    let two = pod("{prometheus.io/scrape: \"true\"}", 8080).replace(
        "    - containerPort: 8080\n",
        "    - containerPort: 8080\n    - containerPort: 9090\n",
    );
    let (env, port, notes) = merged_env(&two);
    assert_eq!((env, port), (None, Value::Null));
    assert!(
        notes.contains("annotations are kept (no prometheus.io/port, and the Pod declares 2 ports")
            && notes.contains("STRICT"),
        "{notes}"
    );
    let (env, port, notes) = merged_env(&pod(
        "{prometheus.io/scrape: \"true\", prometheus.io/port: \"15000\"}",
        8080,
    ));
    assert_eq!((env, port.as_str()), (None, Some("15000")));
    assert!(
        notes.contains("prometheus.io/port \"15000\" is not a port the app may use"),
        "{notes}"
    );
    // Names count as Prometheus reads them, values as Go's ParseBool.
    let (set, _) = scrape("{prometheus-io/scrape: \"F\"}", 8080);
    assert_eq!(set, [None, None, None]);
    let (set, _) = scrape("{prometheus.istio.io/merge-metrics: \"FALSE\"}", 8080);
    assert_eq!(set, [None, None, None]);
    // `no` is not a Go boolean: the annotations are set.
    let (set, _) = scrape("{prometheus.istio.io/merge-metrics: \"no\"}", 8080);
    assert_eq!(set[1], some("15020"));
    let (set, notes) = scrape("{}", 15020);
    assert_eq!(set, [None, None, None]);
    assert!(notes.contains("the proxy's status port"), "{notes}");
}

/// The edges of probe rewriting: a `$` in a probe survives the kubelet's `$(VAR)`/`$$`
/// expansion of env values (written `$$`); the app's own native sidecars (init containers
/// with `restartPolicy: Always`) are rewritten too; `host: ""` is no host; a probe of the
/// sidecar's own ports (15000, 15001) is left alone with a note.
#[test]
fn probe_rewriting_edges() {
    let manifest = "\
apiVersion: v1
kind: Pod
metadata:
  name: web
spec:
  initContainers:
  - name: cache
    image: example/cache:1
    restartPolicy: Always
    readinessProbe:
      tcpSocket:
        port: 6379
  containers:
  - name: app
    image: example/web:1
    ports:
    - containerPort: 8080
    readinessProbe:
      httpGet:
        host: \"\"
        path: /health$$check
        port: 8080
    livenessProbe:
      tcpSocket:
        port: 15001
";
    let (out, notes) = inject_stdin(manifest, &[]);
    let pod = &docs(&out)[0];
    let spec = pod_spec(pod);
    let app = container(spec, "containers", "app");
    assert_eq!(
        app["readinessProbe"]["httpGet"]["path"],
        "/app-health/app/readyz"
    );
    assert_eq!(app["livenessProbe"]["tcpSocket"]["port"], 15001);
    assert!(
        notes.contains("livenessProbe: not rewritten (port 15001 is the sidecar's own)"),
        "{notes}"
    );
    let cache = container(spec, "initContainers", "cache");
    assert_eq!(
        cache["readinessProbe"]["httpGet"]["path"],
        "/app-health/cache/readyz"
    );
    let proxy = container(spec, "initContainers", "rampart-proxy");
    let raw = env_value(proxy, "ISTIO_KUBE_APP_PROBERS")
        .and_then(Value::as_str)
        .unwrap();
    // What the kubelet hands the proxy: `$$` -> `$` (no `$(...)` reference in it).
    assert!(!raw.contains("$("), "{raw}");
    let expanded = raw.replace("$$", "$");
    let originals: Value = serde_json::from_str(&expanded).unwrap();
    assert_eq!(
        originals["/app-health/app/readyz"]["httpGet"]["path"], "/health$$check",
        "the probe's own `$$` reaches the proxy unchanged: {expanded}"
    );
    assert_eq!(
        originals["/app-health/cache/readyz"]["tcpSocket"]["port"],
        6379
    );
    assert!(originals.get("/app-health/app/livez").is_none());
}

/// `rampart proxy` with only its app probe listener of use (no agent, no control plane: the
/// probe listener serves from the start), given `probers` as the kubelet would; killed when
/// dropped, also when an assertion fails.
fn probe_proxy(
    dir: &std::path::Path,
    listen: std::net::SocketAddr,
    probers: &str,
) -> support::Proc {
    let log = dir.join(format!("proxy-{}.log", listen.port()));
    let child = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["proxy", "--control-plane", "127.0.0.1:1"])
        .args(["--workload", "shop/web"])
        .arg("--sds-socket")
        .arg(dir.join("no-agent.sock"))
        .args(["--app-probes-listen", &listen.to_string()])
        .env("ISTIO_KUBE_APP_PROBERS", probers)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    support::Proc { child, log }
}
