//! `rampart inject`: add Rampart's sidecar (node agent and proxy) to Kubernetes manifests, as
//! `istioctl kube-inject` adds Envoy's. Pure: text in, text and notes out.
//!
//! What a Pod gets (docs/KUBERNETES.md, "Injecting workloads"):
//! - two native sidecars (init containers with `restartPolicy: Always`, Kubernetes 1.29+),
//!   started before the app in this order, so a Job still completes:
//!   `rampart-agent` (the SDS node agent for this Pod's identity) and `rampart-proxy`;
//! - volumes at Istio's paths (DESIGN §6): the projected service-account token `istio-token`
//!   (audience `istio-ca`) at `/var/run/secrets/tokens/istio-token`, the root from ConfigMap
//!   `istio-ca-root-cert` at `/var/run/secrets/istio/root-cert.pem`, and the SDS socket in an
//!   emptyDir at `/var/run/secrets/workload-spiffe-uds/socket`;
//! - `HTTP_PROXY=http://127.0.0.1:15001` (and `NO_PROXY` for loopback) in the app containers:
//!   there are no iptables, so outbound calls go through the proxy by the app's HTTP client;
//! - the label `security.istio.io/tlsMode: istio` (Istio's sidecars then originate mTLS to it)
//!   and the annotation [`STATUS_ANNOTATION`], which makes injection idempotent.
//!
//! Inbound, the proxy listens on `$(POD_IP):<containerPort>` (where clients dial) and the app
//! must listen on `127.0.0.1:<containerPort>`: nothing here can check that, so each injected
//! port is listed in a note.
//!
//! Documents that are not Pod-bearing kinds, Pods that opt out (`sidecar.istio.io/inject:
//! "false"`), hostNetwork Pods and already injected ones are passed through byte for byte.

use serde_json::{Map, Value, json};

/// The annotation on an injected Pod (template): what was added, and by which version.
pub const STATUS_ANNOTATION: &str = "sidecar.rampart.io/status";
/// What istiod's injector leaves on a Pod it injected.
pub const ISTIO_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// Istio's opt-out: annotation (or label) `sidecar.istio.io/inject: "false"`.
pub const INJECT_ANNOTATION: &str = "sidecar.istio.io/inject";
/// The agent's container name.
pub const AGENT_CONTAINER: &str = "rampart-agent";
/// The proxy's container name.
pub const PROXY_CONTAINER: &str = "rampart-proxy";
/// Default CA (and control plane) address, Istio's.
pub const DEFAULT_CA_ADDRESS: &str = "istiod.istio-system.svc:15012";

/// Istio's Pod paths (DESIGN §6).
pub const TOKEN_DIR: &str = "/var/run/secrets/tokens";
pub const TOKEN_PATH: &str = "/var/run/secrets/tokens/istio-token";
pub const ROOT_DIR: &str = "/var/run/secrets/istio";
pub const ROOT_PATH: &str = "/var/run/secrets/istio/root-cert.pem";
pub const SOCKET_DIR: &str = "/var/run/secrets/workload-spiffe-uds";
pub const SOCKET_PATH: &str = "/var/run/secrets/workload-spiffe-uds/socket";

/// The proxy's status port (Istio's), on the Pod IP: the kubelet's rewritten app probes and
/// `/stats/prometheus`; and the environment variable holding the original probes (Istio's
/// name).
pub const APP_PROBE_PORT: u16 = 15020;
/// The note every declared port gets (what the app must do without iptables): the same for
/// every Pod, so the injection webhook does not repeat it as a warning.
pub const LISTEN_NOTE: &str = ": the app must listen on 127.0.0.1:";
pub const APP_PROBERS_ENV: &str = "ISTIO_KUBE_APP_PROBERS";
/// The sidecar's own ports on the Pod's loopback (admin, outbound, probes): a rewritten probe
/// never targets them (the kubelet could not reach them before; through the probe port it
/// would).
const SIDECAR_PORTS: [u64; 3] = [15000, 15001, APP_PROBE_PORT as u64];
/// Istio's opt-out of probe rewriting, on the Pod.
pub const REWRITE_PROBES_ANNOTATION: &str = "sidecar.istio.io/rewriteAppHTTPProbers";
/// Prometheus' annotation-based discovery, pointed at the status port's metrics.
pub const SCRAPE_ANNOTATION: &str = "prometheus.io/scrape";
pub const PORT_ANNOTATION: &str = "prometheus.io/port";
pub const PATH_ANNOTATION: &str = "prometheus.io/path";
/// Istio's opt-out of metrics merging: with `"false"` the Pod's `prometheus.io/*`
/// annotations are left alone.
pub const MERGE_METRICS_ANNOTATION: &str = "prometheus.istio.io/merge-metrics";
/// The note a Pod whose own metrics are merged gets: the same for every such Pod and
/// nothing to act on, so the injection webhook does not repeat it as a warning (as
/// [`LISTEN_NOTE`]).
pub const MERGE_NOTE: &str = "metrics merged";

/// The proxy's outbound listener (the apps' HTTP_PROXY) and admin listener, on loopback.
pub const OUTBOUND_PROXY: &str = "http://127.0.0.1:15001";
pub const ADMIN_ADDR: &str = "127.0.0.1:15000";

/// The uid (and gid) both sidecars run as, Istio's proxy uid: they share the SDS socket,
/// which the agent makes 0600.
pub const SIDECAR_UID: i64 = 1337;

/// Volume names (Istio's).
const TOKEN_VOLUME: &str = "istio-token";
const ROOT_VOLUME: &str = "istiod-ca-cert";
const SOCKET_VOLUME: &str = "workload-socket";

/// How to inject.
#[derive(Debug, Clone)]
pub struct Options {
    /// Image of both sidecars (its entrypoint is the `rampart` binary).
    pub image: String,
    /// CA and control-plane address, `host:port`.
    pub ca_address: String,
    /// Trust domain of the workload identities.
    pub trust_domain: String,
    /// Version written into the status annotation.
    pub version: String,
}

/// The result: the manifests to print and notes for the person (skipped documents, what the
/// apps must do).
#[derive(Debug, Default)]
pub struct Injected {
    pub output: String,
    pub notes: Vec<String>,
    /// Pods (templates) injected.
    pub injected: usize,
}

/// Inject every Pod-bearing document of a multi-document YAML stream. On any error nothing is
/// returned but the error, naming the 1-based document index and the reason.
pub fn inject(input: &str, opts: &Options) -> Result<Injected, String> {
    validate_options(opts)?;
    let mut out = Injected::default();
    let mut pieces = Vec::new();
    for (i, doc) in split_documents(input).into_iter().enumerate() {
        let index = i + 1;
        let value: Value = if only_comments(&doc) {
            Value::Null
        } else {
            serde_saphyr::from_str(&doc).map_err(|e| {
                format!(
                    "document {index}: not valid YAML: {}",
                    first_line(&e.to_string())
                )
            })?
        };
        match value {
            Value::Null => pieces.push(doc),
            Value::Object(mut obj) => {
                let changed =
                    inject_object(&mut obj, opts, &format!("document {index}"), &mut out)?;
                if changed {
                    let text = serde_saphyr::to_string(&Value::Object(obj))
                        .map_err(|e| format!("document {index}: cannot write YAML: {e}"))?;
                    pieces.push(text);
                } else {
                    pieces.push(doc);
                }
            }
            other => {
                return Err(format!(
                    "document {index}: not a Kubernetes object (a YAML {} at the top)",
                    kind_of(&other)
                ));
            }
        }
    }
    let mut text = String::new();
    for (i, p) in pieces.iter().enumerate() {
        if i > 0 {
            text.push_str("---\n");
        }
        text.push_str(p);
        if !p.is_empty() && !p.ends_with('\n') {
            text.push('\n');
        }
    }
    out.output = text;
    Ok(out)
}

/// What [`inject_pod_object`] did with one Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodOutcome {
    /// The sidecar was added; the notes say what the apps must do.
    Injected(Vec<String>),
    /// Left as it was, for the reason given (opted out, already injected, hostNetwork).
    Skipped(String),
}

/// Injects one Pod object (`metadata` + `spec`, as the API server sends it to an admission
/// webhook) in place. An error (a name the sidecar needs already taken, a malformed spec)
/// leaves `pod` unspecified; the caller must not use it then.
pub fn inject_pod_object(
    pod: &mut Map<String, Value>,
    opts: &Options,
) -> Result<PodOutcome, String> {
    validate_options(opts)?;
    let name = pod
        .get("metadata")
        .and_then(|m| m.get("name").or_else(|| m.get("generateName")))
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)")
        .to_owned();
    let mut out = Injected::default();
    let changed = inject_pod(pod, opts, &format!("Pod {name}"), "spec", &mut out)?;
    if changed {
        Ok(PodOutcome::Injected(out.notes))
    } else {
        Ok(PodOutcome::Skipped(out.notes.join("; ")))
    }
}

/// Checks the options (the CA address, image and trust domain) as every injection does.
pub fn validate_options(opts: &Options) -> Result<(), String> {
    let (host, port) = split_host_port(&opts.ca_address).ok_or_else(|| {
        format!(
            "--ca-address {:?}: expected HOST:PORT (e.g. {DEFAULT_CA_ADDRESS})",
            opts.ca_address
        )
    })?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!(
            "--ca-address {:?}: expected HOST:PORT with a port number",
            opts.ca_address
        ));
    }
    if opts.image.trim().is_empty() || opts.image.contains(char::is_whitespace) {
        return Err(format!("--image {:?}: not an image reference", opts.image));
    }
    if opts.trust_domain.is_empty() {
        return Err("--trust-domain must not be empty".into());
    }
    Ok(())
}

/// `host:port` (an IPv6 host in brackets) split at the port.
fn split_host_port(addr: &str) -> Option<(&str, &str)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some((host, port))
}

/// The documents of a YAML stream, split at `---` lines (as kubectl does). A `...` line ends
/// a document.
pub fn split_documents(input: &str) -> Vec<String> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    let mut seen_separator = false;
    for line in input.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        let is_sep = bare == "---"
            || bare.starts_with("--- ")
            || bare.starts_with("---\t")
            || bare.starts_with("---#");
        if is_sep {
            // Text before the first separator is a document only if it holds something;
            // leading comments stay in front of the next document.
            if seen_separator || !only_comments(&cur) {
                docs.push(std::mem::take(&mut cur));
            }
            seen_separator = true;
            let rest = bare[3..].trim();
            if !rest.is_empty() && !rest.starts_with('#') {
                // `--- value`: the document starts on the separator line.
                cur.push_str(rest);
                cur.push('\n');
            }
            continue;
        }
        if bare == "..." {
            continue;
        }
        cur.push_str(line);
    }
    if !cur.is_empty() || docs.is_empty() {
        docs.push(cur);
    }
    // A trailing empty document (input ending in `---`) is dropped.
    if docs.len() > 1 && docs.last().is_some_and(|d| d.trim().is_empty()) {
        docs.pop();
    }
    docs
}

fn only_comments(doc: &str) -> bool {
    doc.lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
}

fn first_line(s: &str) -> &str {
    s.lines().find(|l| !l.trim().is_empty()).unwrap_or(s).trim()
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "mapping",
    }
}

/// Injects one object (or each item of a `List`); true if it changed.
fn inject_object(
    obj: &mut Map<String, Value>,
    opts: &Options,
    at: &str,
    out: &mut Injected,
) -> Result<bool, String> {
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let name = obj
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)")
        .to_owned();
    let at = format!("{at} ({kind} {name})");
    let path: &[&str] = match kind.as_str() {
        "Pod" => &[],
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        "List" => {
            let Some(items) = obj.get_mut("items").and_then(Value::as_array_mut) else {
                return Ok(false);
            };
            let mut changed = false;
            for (i, item) in items.iter_mut().enumerate() {
                if let Value::Object(o) = item {
                    changed |= inject_object(o, opts, &format!("{at} item {}", i + 1), out)?;
                }
            }
            return Ok(changed);
        }
        _ => return Ok(false),
    };
    if kind != "Pod" && !obj.get("apiVersion").is_some_and(Value::is_string) {
        return Err(format!("{at}: no apiVersion"));
    }
    let mut template = &mut *obj;
    for (depth, key) in path.iter().enumerate() {
        let shown = path[..=depth].join(".");
        template = template
            .get_mut(*key)
            .ok_or_else(|| format!("{at}: no {shown}"))?
            .as_object_mut()
            .ok_or_else(|| format!("{at}: {shown} is not a mapping"))?;
    }
    let spec_at = if path.is_empty() {
        "spec".to_owned()
    } else {
        format!("{}.spec", path.join("."))
    };
    inject_pod(template, opts, &at, &spec_at, out)
}

/// Injects a Pod or Pod template (`metadata` + `spec`); true if it changed.
fn inject_pod(
    pod: &mut Map<String, Value>,
    opts: &Options,
    at: &str,
    spec_at: &str,
    out: &mut Injected,
) -> Result<bool, String> {
    let meta = pod
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if meta.is_null() {
        *meta = Value::Object(Map::new());
    }
    let meta = meta
        .as_object_mut()
        .ok_or_else(|| format!("{at}: metadata is not a mapping"))?;
    let annotations = string_map(meta, "annotations", at)?;
    let labels = string_map(meta, "labels", at)?;
    if annotations.contains_key(STATUS_ANNOTATION) {
        out.notes.push(format!(
            "{at}: already injected ({STATUS_ANNOTATION} present): unchanged"
        ));
        return Ok(false);
    }
    for (what, m) in [("annotation", &annotations), ("label", &labels)] {
        if m.get(INJECT_ANNOTATION).is_some_and(is_false) {
            out.notes.push(format!(
                "{at}: {what} {INJECT_ANNOTATION}: \"false\": not injected"
            ));
            return Ok(false);
        }
    }
    let spec = pod
        .get_mut("spec")
        .ok_or_else(|| format!("{at}: no {spec_at}"))?
        .as_object_mut()
        .ok_or_else(|| format!("{at}: {spec_at} is not a mapping"))?;
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        out.notes.push(format!(
            "{at}: hostNetwork Pod: not injected (its ports are the node's; a sidecar cannot \
             take them)"
        ));
        return Ok(false);
    }
    // Istio's injector got there first (a namespace labelled for both, or the Pod label
    // `sidecar.istio.io/inject: "true"` its object selector matches anywhere): two sidecars
    // would fight over the Pod's ports. The Pod stays in Istio's mesh.
    let istio_proxy = ["containers", "initContainers"].iter().any(|list| {
        spec.get(*list).and_then(Value::as_array).is_some_and(|cs| {
            cs.iter()
                .any(|c| c.get("name").and_then(Value::as_str) == Some("istio-proxy"))
        })
    });
    if istio_proxy || annotations.contains_key(ISTIO_STATUS_ANNOTATION) {
        out.notes.push(format!(
            "{at}: already has Istio's sidecar (istio-proxy): not injected (do not label a \
             namespace for both istiod's injection and Rampart's)"
        ));
        return Ok(false);
    }
    let containers = spec
        .get("containers")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{at}: {spec_at}.containers is missing or not a list"))?;
    if containers.is_empty() {
        return Err(format!("{at}: {spec_at}.containers is empty"));
    }
    let mut app_names = Vec::new();
    for (i, c) in containers.iter().enumerate() {
        let name = c
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{at}: {spec_at}.containers[{i}] has no name"))?;
        app_names.push(name.to_owned());
    }
    // Name clashes with what we add are refused, never overwritten.
    let init_names: Vec<String> = match spec.get("initContainers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_owned))
            .collect(),
        Some(_) => return Err(format!("{at}: {spec_at}.initContainers is not a list")),
    };
    for n in [AGENT_CONTAINER, PROXY_CONTAINER] {
        if app_names.iter().chain(&init_names).any(|c| c == n) {
            return Err(format!(
                "{at}: a container is already named {n} but {STATUS_ANNOTATION} is missing: \
                 remove it or restore the annotation"
            ));
        }
    }
    let volume_names: Vec<String> = match spec.get("volumes") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.get("name").and_then(Value::as_str).map(str::to_owned))
            .collect(),
        Some(_) => return Err(format!("{at}: {spec_at}.volumes is not a list")),
    };
    for v in [TOKEN_VOLUME, ROOT_VOLUME, SOCKET_VOLUME] {
        if volume_names.iter().any(|n| n == v) {
            return Err(format!(
                "{at}: a volume is already named {v}: the sidecar needs that name"
            ));
        }
    }

    // The kubelet's network probes of the apps go through the proxy's probe port (Istio's
    // rewriting), unless the Pod opts out or a container declares that port itself.
    let probe_port_taken = ["containers", "initContainers"].iter().any(|list| {
        spec.get(*list).and_then(Value::as_array).is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("ports").and_then(Value::as_array).is_some_and(|ps| {
                    ps.iter().any(|p| {
                        p.get("containerPort").and_then(Value::as_u64)
                            == Some(u64::from(APP_PROBE_PORT))
                    })
                })
            })
        })
    });
    // Notes: what the apps must do without iptables.
    let containers = spec
        .get_mut("containers")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| format!("{at}: {spec_at}.containers is not a list"))?;
    let mut any_port = false;
    // The apps' TCP ports, which Prometheus scrapes when the annotations name none.
    let mut tcp_ports: Vec<u16> = Vec::new();
    let probe_rewrite = if annotations
        .get(REWRITE_PROBES_ANNOTATION)
        .is_some_and(is_false)
    {
        Err(format!("annotation {REWRITE_PROBES_ANNOTATION}: \"false\""))
    } else if probe_port_taken {
        Err(format!(
            "a container declares port {APP_PROBE_PORT}, the proxy's probe port"
        ))
    } else {
        Ok(())
    };
    let mut probers = Map::new();
    for c in containers.iter_mut() {
        let cname = c
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let ports = c.get("ports").and_then(Value::as_array).cloned();
        for p in ports.unwrap_or_default() {
            let Some(port) = p.get("containerPort").and_then(Value::as_u64) else {
                continue;
            };
            any_port = true;
            let tcp = p
                .get("protocol")
                .and_then(Value::as_str)
                .is_none_or(|proto| proto == "TCP");
            if let Ok(port) = u16::try_from(port)
                && tcp
                && !tcp_ports.contains(&port)
            {
                tcp_ports.push(port);
            }
            out.notes.push(format!(
                "{at}: container {cname} port {port}{LISTEN_NOTE}{port}; \
                 the proxy takes $(POD_IP):{port}"
            ));
            if port < 1024 {
                out.notes.push(format!(
                    "{at}: port {port} < 1024: the proxy runs as uid {SIDECAR_UID} and needs \
                     net.ipv4.ip_unprivileged_port_start <= {port} (containerd's default is 0)"
                ));
            }
        }
        rewrite_probes(c, at, &cname, probe_rewrite.as_ref(), &mut probers, out);
        add_app_env(c, at, &cname, out)?;
    }
    // The app's own native sidecars (init containers that keep running) are probed too,
    // and their ports are scraped by Prometheus as the containers' are.
    if let Some(init) = spec.get_mut("initContainers").and_then(Value::as_array_mut) {
        for c in init
            .iter_mut()
            .filter(|c| c.get("restartPolicy").and_then(Value::as_str) == Some("Always"))
        {
            for p in c
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let tcp = p
                    .get("protocol")
                    .and_then(Value::as_str)
                    .is_none_or(|proto| proto == "TCP");
                if let Some(port) = p
                    .get("containerPort")
                    .and_then(Value::as_u64)
                    .and_then(|n| u16::try_from(n).ok())
                    && tcp
                    && !tcp_ports.contains(&port)
                {
                    tcp_ports.push(port);
                }
            }
            let cname = c
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            rewrite_probes(c, at, &cname, probe_rewrite.as_ref(), &mut probers, out);
        }
    }
    if !any_port {
        out.notes.push(format!(
            "{at}: no containerPort declared: no inbound traffic reaches the app through the \
             proxy (declare the ports the app serves)"
        ));
    }

    // Sidecars first, so they start (in order) before the app's own init containers.
    let (host, _) = split_host_port(&opts.ca_address).unwrap_or((&opts.ca_address, ""));
    let status_port = !probe_port_taken;
    let scrape = if status_port {
        scrape_plan(&annotations, &tcp_ports, at, out)
    } else {
        Scrape::Leave
    };
    let app_metrics = match &scrape {
        Scrape::Merge(env) => Some(env.clone()),
        _ => None,
    };
    let sidecars = [
        agent_container(opts, host),
        proxy_container(opts, &probers, status_port, app_metrics),
    ];
    let init = spec
        .entry("initContainers")
        .or_insert_with(|| Value::Array(Vec::new()));
    if init.is_null() {
        *init = Value::Array(Vec::new());
    }
    let init = init.as_array_mut().expect("checked above");
    for (i, s) in sidecars.into_iter().enumerate() {
        init.insert(i, s);
    }
    let vols = spec
        .entry("volumes")
        .or_insert_with(|| Value::Array(Vec::new()));
    if vols.is_null() {
        *vols = Value::Array(Vec::new());
    }
    let vols = vols.as_array_mut().expect("checked above");
    vols.extend(volumes());

    // Metadata last: the annotation means "done".
    let meta = pod
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .expect("made above");
    let labels = meta
        .entry("labels")
        .or_insert_with(|| Value::Object(Map::new()));
    if labels.is_null() {
        *labels = Value::Object(Map::new());
    }
    labels
        .as_object_mut()
        .expect("checked above")
        .insert("security.istio.io/tlsMode".into(), "istio".into());
    let ann = meta
        .entry("annotations")
        .or_insert_with(|| Value::Object(Map::new()));
    if ann.is_null() {
        *ann = Value::Object(Map::new());
    }
    let ann = ann.as_object_mut().expect("checked above");
    if let Some(first) = app_names.first() {
        ann.entry("kubectl.kubernetes.io/default-container")
            .or_insert_with(|| first.clone().into());
    }
    if status_port {
        if !matches!(scrape, Scrape::Leave) {
            for k in annotations.keys() {
                if scrape_label(k).is_some() {
                    ann.remove(k);
                }
            }
            ann.insert(SCRAPE_ANNOTATION.into(), "true".into());
            ann.insert(PORT_ANNOTATION.into(), APP_PROBE_PORT.to_string().into());
            ann.insert(
                PATH_ANNOTATION.into(),
                rampart_proxy::app_probes::METRICS_PATH.into(),
            );
        }
    } else {
        out.notes.push(format!(
            "{at}: a container declares port {APP_PROBE_PORT}, the proxy's status port: the \
             proxy's metrics are on its admin listener ({ADMIN_ADDR}) only, out of \
             Prometheus' reach"
        ));
    }
    let status = json!({
        "version": opts.version,
        "initContainers": [AGENT_CONTAINER, PROXY_CONTAINER],
        "volumes": [TOKEN_VOLUME, ROOT_VOLUME, SOCKET_VOLUME],
    });
    ann.insert(STATUS_ANNOTATION.into(), status.to_string().into());
    out.injected += 1;
    Ok(true)
}

/// What injection does with Prometheus' annotation-based discovery.
enum Scrape {
    /// Point it at the proxy's metrics on the status port (the Pod had no scrape settings).
    Ours,
    /// The same, the Pod's own settings moved to the proxy (`ISTIO_PROMETHEUS_ANNOTATIONS`,
    /// this JSON), which scrapes the app on 127.0.0.1 and serves both (Istio's metrics
    /// merging: under STRICT Prometheus could no longer scrape the app's port itself).
    Merge(String),
    /// Leave the Pod's annotations as they are.
    Leave,
}

/// Which of `prometheus.io/{scrape,port,path}` annotation `k` is, as Prometheus reads
/// names (`prometheus-io/scrape` becomes the same label `prometheus_io_scrape`).
fn scrape_label(k: &str) -> Option<&'static str> {
    let label: String = k
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    match label.as_str() {
        "prometheus_io_scrape" => Some("scrape"),
        "prometheus_io_port" => Some("port"),
        "prometheus_io_path" => Some("path"),
        _ => None,
    }
}

/// Istio's injector's choice: the Pod opts out (`prometheus.istio.io/merge-metrics:
/// "false"`, or `prometheus.io/scrape: "false"`) and is left alone; a Pod with its own
/// `prometheus.io/*` settings has them merged; any other gets the proxy's. Values are read
/// as Go's `strconv.ParseBool`, as Istio's. `tcp_ports` are the declared TCP ports of the
/// Pod's containers and native sidecars (Prometheus scrapes each when no port is named).
fn scrape_plan(
    original: &Map<String, Value>,
    tcp_ports: &[u16],
    at: &str,
    out: &mut Injected,
) -> Scrape {
    let is_false = |v: &Value| {
        v.as_str()
            .and_then(rampart_authz::parse_go_bool)
            .is_some_and(|b| !b)
    };
    if original.get(MERGE_METRICS_ANNOTATION).is_some_and(is_false) {
        return Scrape::Leave;
    }
    let mut own = Map::new();
    for (k, v) in original {
        if let Some(which) = scrape_label(k) {
            own.insert(which.to_owned(), v.clone());
        }
    }
    if own.get("scrape").is_some_and(is_false) {
        return Scrape::Leave;
    }
    if own.is_empty() {
        return Scrape::Ours;
    }
    let usable = |p: u16| p != 0 && p != APP_PROBE_PORT && p != 15000 && p != 15001;
    let named = own
        .get("port")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|p| !p.is_empty());
    // Without `prometheus.io/port`, Prometheus scrapes each declared port, or the Pod's
    // address on port 80 when it declares none (istio-agent's default too). The proxy
    // scrapes one endpoint, so that is merged when it is unambiguous.
    let (port, why) = match (named, tcp_ports) {
        (Some(p), _) => (p.parse::<u16>().ok().filter(|p| usable(*p)), ""),
        (None, []) => (
            Some(80),
            " (no prometheus.io/port and no declared TCP port: port 80)",
        ),
        (None, [one]) => (
            Some(*one).filter(|p| usable(*p)),
            " (no prometheus.io/port: the one declared port)",
        ),
        (None, _) => (None, ""),
    };
    match port {
        Some(p) => {
            // Prometheus reads `metrics` as `/metrics` (Go's URL building adds the slash).
            let path = match own.get("path").and_then(Value::as_str).map(str::trim) {
                None | Some("") => "/metrics".to_owned(),
                Some(p) if p.starts_with('/') => p.to_owned(),
                Some(p) => format!("/{p}"),
            };
            out.notes.push(format!(
                "{at}: {MERGE_NOTE}: the app's metrics (127.0.0.1:{p}{path}){why} are served \
                 with the proxy's at :{APP_PROBE_PORT}{}, where the annotations now point",
                rampart_proxy::app_probes::METRICS_PATH
            ));
            let env = serde_json::json!({
                "scrape": "true",
                "port": p.to_string(),
                "path": path,
            });
            Scrape::Merge(env.to_string())
        }
        None => {
            let which = match (named, tcp_ports) {
                (Some(p), _) => format!("prometheus.io/port {p:?} is not a port the app may use"),
                (None, [one]) => format!(
                    "no prometheus.io/port, and the one declared port, {one}, is the sidecar's"
                ),
                (None, _) => format!(
                    "no prometheus.io/port, and the Pod declares {} ports: name the one to \
                     scrape in prometheus.io/port",
                    tcp_ports.len()
                ),
            };
            // A warning too (the webhook's): the app's metrics are lost under STRICT.
            out.notes.push(format!(
                "{at}: the Pod's prometheus.io annotations are kept ({which}): Prometheus \
                 scrapes the app in plaintext, which the proxy refuses once the port is STRICT; \
                 the proxy serves them at :{APP_PROBE_PORT}{} once they name a port to merge",
                rampart_proxy::app_probes::METRICS_PATH
            ));
            Scrape::Leave
        }
    }
}

/// `metadata.<key>` as a string map (absent: empty); refuses a non-mapping.
fn string_map(
    meta: &Map<String, Value>,
    key: &str,
    at: &str,
) -> Result<Map<String, Value>, String> {
    match meta.get(key) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m.clone()),
        Some(_) => Err(format!("{at}: metadata.{key} is not a mapping")),
    }
}

fn is_false(v: &Value) -> bool {
    match v {
        Value::Bool(b) => !b,
        Value::String(s) => matches!(
            s.to_ascii_lowercase().as_str(),
            "false" | "f" | "0" | "n" | "no" | "off"
        ),
        _ => false,
    }
}

/// HTTP_PROXY / NO_PROXY in an app container (kept if the app sets its own, with a note).
fn add_app_env(c: &mut Value, at: &str, cname: &str, out: &mut Injected) -> Result<(), String> {
    let c = c
        .as_object_mut()
        .ok_or_else(|| format!("{at}: container {cname} is not a mapping"))?;
    let env = c.entry("env").or_insert_with(|| Value::Array(Vec::new()));
    if env.is_null() {
        *env = Value::Array(Vec::new());
    }
    let env = env
        .as_array_mut()
        .ok_or_else(|| format!("{at}: container {cname} env is not a list"))?;
    let no_proxy = "localhost,127.0.0.1,::1";
    for (name, value) in [
        ("HTTP_PROXY", OUTBOUND_PROXY),
        ("http_proxy", OUTBOUND_PROXY),
        ("NO_PROXY", no_proxy),
        ("no_proxy", no_proxy),
    ] {
        if env
            .iter()
            .any(|e| e.get("name").and_then(Value::as_str) == Some(name))
        {
            out.notes.push(format!(
                "{at}: container {cname} sets {name} itself: kept (outbound calls reach the \
                 mesh only through {OUTBOUND_PROXY})"
            ));
            continue;
        }
        env.push(json!({"name": name, "value": value}));
    }
    Ok(())
}

/// Rewrites container `c`'s `httpGet` (HTTP) and `tcpSocket` probes into `httpGet` of
/// `/app-health/<container>/<livez|readyz|startupz>` on the proxy's probe port, keeping
/// their timing, and records each original in `probers` (path -> probe, ports resolved to
/// numbers) for the proxy, which does it against the app on 127.0.0.1. Probes it cannot
/// pass through (gRPC, HTTPS, another `host`, a port name the container does not declare),
/// or all of them when `rewrite` says why not, are left as they are, with a note: they reach
/// the proxy's inbound port as plaintext and fail under STRICT.
fn rewrite_probes(
    c: &mut Value,
    at: &str,
    cname: &str,
    rewrite: Result<&(), &String>,
    probers: &mut Map<String, Value>,
    out: &mut Injected,
) {
    let named_ports: Vec<(String, u64)> = c
        .get("ports")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .filter_map(|p| {
                    Some((
                        p.get("name")?.as_str()?.to_owned(),
                        p.get("containerPort")?.as_u64()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let resolve = |port: Option<&Value>| -> Option<u64> {
        match port? {
            Value::Number(n) => n.as_u64().filter(|p| (1..=65535).contains(p)),
            Value::String(name) => name
                .parse::<u64>()
                .ok()
                .filter(|p| (1..=65535).contains(p))
                .or_else(|| named_ports.iter().find(|(n, _)| n == name).map(|(_, p)| *p)),
            _ => None,
        }
    };
    for (probe, kind) in [
        ("livenessProbe", "livez"),
        ("readinessProbe", "readyz"),
        ("startupProbe", "startupz"),
    ] {
        let Some(p) = c.get_mut(probe).and_then(Value::as_object_mut) else {
            continue;
        };
        let network = ["httpGet", "tcpSocket", "grpc"]
            .iter()
            .any(|k| p.get(*k).is_some());
        if !network {
            continue;
        }
        let why_not = |why: &str| {
            format!(
                "{at}: container {cname} {probe}: not rewritten ({why}): the kubelet dials the \
                 Pod IP, where the proxy listens; it passes in PERMISSIVE mode but fails under \
                 STRICT: use an exec probe or keep the port PERMISSIVE"
            )
        };
        if let Err(why) = rewrite {
            out.notes.push(why_not(why));
            continue;
        }
        // The handler's target: no other host, a port (a number or a declared name) that is
        // not the sidecar's own.
        let target = |handler: &Value| -> Result<u64, String> {
            if handler.get("host").is_some_and(|v| !v.is_null() && v != "") {
                return Err("it names a host".into());
            }
            let port = resolve(handler.get("port"))
                .ok_or("its port is not a number or a declared port name")?;
            if SIDECAR_PORTS.contains(&port) {
                return Err(format!("port {port} is the sidecar's own"));
            }
            Ok(port)
        };
        let original = if let Some(h) = p.get("httpGet") {
            let scheme = h.get("scheme").and_then(Value::as_str).unwrap_or("HTTP");
            if !scheme.eq_ignore_ascii_case("HTTP") {
                out.notes.push(why_not(&format!("scheme {scheme}")));
                continue;
            }
            let port = match target(h) {
                Ok(p) => p,
                Err(why) => {
                    out.notes.push(why_not(&why));
                    continue;
                }
            };
            let path = h.get("path").and_then(Value::as_str).unwrap_or("/");
            let path = if path.starts_with('/') {
                path.to_owned()
            } else {
                format!("/{path}")
            };
            if path.parse::<http::uri::PathAndQuery>().is_err() {
                out.notes.push(why_not(&format!(
                    "its path {path:?} is not a valid request target"
                )));
                continue;
            }
            let mut h = h.clone();
            h["port"] = port.into();
            json!({"httpGet": h})
        } else if let Some(t) = p.get("tcpSocket") {
            match target(t) {
                Ok(port) => json!({"tcpSocket": {"port": port}}),
                Err(why) => {
                    out.notes.push(why_not(&why));
                    continue;
                }
            }
        } else {
            out.notes.push(why_not("a gRPC probe"));
            continue;
        };
        let mut original = original;
        if let Some(t) = p.get("timeoutSeconds") {
            original["timeoutSeconds"] = t.clone();
        }
        let path = format!("/app-health/{cname}/{kind}");
        p.remove("httpGet");
        p.remove("tcpSocket");
        p.insert(
            "httpGet".into(),
            json!({"path": path, "port": APP_PROBE_PORT, "scheme": "HTTP"}),
        );
        probers.insert(path, original);
    }
}

fn downward_env() -> Value {
    json!([
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
    ])
}

fn sidecar_security_context() -> Value {
    json!({
        "runAsUser": SIDECAR_UID,
        "runAsGroup": SIDECAR_UID,
        "runAsNonRoot": true,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
        // Pod Security "restricted" asks every container for it (or the Pod).
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

fn agent_container(opts: &Options, ca_host: &str) -> Value {
    json!({
        "name": AGENT_CONTAINER,
        "image": opts.image,
        "restartPolicy": "Always",
        "args": [
            "agent",
            "--ca-addr", opts.ca_address,
            "--ca-server-name", ca_host,
            "--ca-root", ROOT_PATH,
            "--token", TOKEN_PATH,
            "--trust-domain", opts.trust_domain,
            "--namespace", "$(POD_NAMESPACE)",
            "--service-account", "$(SERVICE_ACCOUNT)",
            "--sds-socket", SOCKET_PATH,
            // The socket's emptyDir is mounted by the two sidecars only; the kubelet makes
            // it 0777, which the agent's directory check would refuse.
            "--trust-socket-dir",
        ],
        "env": downward_env(),
        "resources": {
            "requests": {"cpu": "10m", "memory": "32Mi"},
            "limits": {"memory": "128Mi"},
        },
        "securityContext": sidecar_security_context(),
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true},
            {"name": ROOT_VOLUME, "mountPath": ROOT_DIR, "readOnly": true},
            {"name": SOCKET_VOLUME, "mountPath": SOCKET_DIR},
        ],
    })
}

fn proxy_container(
    opts: &Options,
    probers: &Map<String, Value>,
    status_port: bool,
    app_metrics: Option<String>,
) -> Value {
    let probe = |period: u32, failures: u32| {
        json!({
            "exec": {"command": ["rampart", "probe", format!("http://{ADMIN_ADDR}/ready")]},
            "periodSeconds": period,
            "timeoutSeconds": 3,
            "failureThreshold": failures,
        })
    };
    let mut args = json!([
        "proxy",
        "--control-plane",
        opts.ca_address,
        "--workload",
        "$(POD_NAMESPACE)/$(POD_NAME)",
        "--sds-socket",
        SOCKET_PATH,
        "--admin",
        ADMIN_ADDR,
    ]);
    let mut env = downward_env();
    if status_port {
        let a = args.as_array_mut().expect("an array");
        a.push("--status-listen".into());
        a.push(format!("$(POD_IP):{APP_PROBE_PORT}").into());
    }
    if let Some(json) = app_metrics {
        // `$$`: the kubelet expands `$(VAR)` in env values.
        env.as_array_mut().expect("an array").push(json!({
            "name": rampart_proxy::app_probes::APP_METRICS_ENV,
            "value": json.replace('$', "$$"),
        }));
    }
    if !probers.is_empty() {
        // The kubelet expands `$(VAR)` and `$$` in env values: `$$` keeps a probe's own `$`.
        env.as_array_mut().expect("an array").push(json!({
            "name": APP_PROBERS_ENV,
            "value": Value::Object(probers.clone()).to_string().replace('$', "$$"),
        }));
    }
    json!({
        "name": PROXY_CONTAINER,
        "image": opts.image,
        "restartPolicy": "Always",
        "args": args,
        "env": env,
        // The app containers start once this passes: the proxy has its certificate and config.
        "startupProbe": probe(1, 120),
        "readinessProbe": probe(5, 3),
        "resources": {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"memory": "256Mi"},
        },
        "securityContext": sidecar_security_context(),
        "volumeMounts": [
            {"name": ROOT_VOLUME, "mountPath": ROOT_DIR, "readOnly": true},
            {"name": SOCKET_VOLUME, "mountPath": SOCKET_DIR},
        ],
    })
}

fn volumes() -> Vec<Value> {
    vec![
        json!({
            "name": TOKEN_VOLUME,
            "projected": {"sources": [{"serviceAccountToken": {
                "audience": "istio-ca",
                "expirationSeconds": 43200,
                "path": "istio-token",
            }}]},
        }),
        json!({"name": ROOT_VOLUME, "configMap": {"name": "istio-ca-root-cert"}}),
        json!({"name": SOCKET_VOLUME, "emptyDir": {}}),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_split_at_separator_lines_only() {
        let docs = split_documents("a: 1\n---\nb: |\n  x --- y\n--- # c\nc: 3\n---\n");
        assert_eq!(docs, vec!["a: 1\n", "b: |\n  x --- y\n", "c: 3\n"]);
        let docs = split_documents("# head\n---\na: 1\n");
        assert_eq!(docs, vec!["# head\na: 1\n"]);
        assert_eq!(split_documents(""), vec![""]);
    }

    fn opts() -> Options {
        Options {
            image: "img:1".into(),
            ca_address: DEFAULT_CA_ADDRESS.into(),
            trust_domain: "cluster.local".into(),
            version: "0".into(),
        }
    }

    /// A template without metadata (or with `metadata: null`) gets one; a non-mapping is
    /// refused with the document and the reason.
    #[test]
    fn template_metadata_absent_null_or_wrong() {
        for meta in ["", "    metadata: null\n"] {
            let doc = format!(
                "apiVersion: batch/v1\nkind: Job\nmetadata: {{name: j}}\nspec:\n  template:\n{meta}    spec:\n      containers: [{{name: c, image: i}}]\n"
            );
            let out = inject(&doc, &opts()).unwrap();
            assert_eq!(out.injected, 1, "{meta:?}");
            assert!(out.output.contains(STATUS_ANNOTATION));
        }
        let bad = "apiVersion: batch/v1\nkind: Job\nmetadata: {name: j}\nspec:\n  template:\n    metadata: [1]\n    spec:\n      containers: [{name: c, image: i}]\n";
        let e = inject(bad, &opts()).unwrap_err();
        assert_eq!(e, "document 1 (Job j): metadata is not a mapping");
    }

    #[test]
    fn host_port_split() {
        assert_eq!(
            split_host_port("istiod.istio-system.svc:15012"),
            Some(("istiod.istio-system.svc", "15012"))
        );
        assert_eq!(split_host_port("[::1]:15012"), Some(("::1", "15012")));
        assert_eq!(split_host_port("nohost"), None);
    }
}
