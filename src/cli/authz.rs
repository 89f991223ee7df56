//! `rampart authz check`: explain the decision for a hypothetical request against a folder of
//! Istio security policies, without deploying anything.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context as _;
use rampart_authz::{
    Engine, ExtAuthz, FileJwksFetcher, HttpRequest, JwksCache, MeshConfig, MtlsMode, Peer,
    RequestContext, Workload, load_paths,
};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum AuthzCommand {
    /// Explain the authorization decision for a hypothetical request.
    Check(CheckArgs),
}

impl AuthzCommand {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            AuthzCommand::Check(args) => args.run(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Output {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
pub(crate) struct CheckArgs {
    /// Folder with the policy YAML (searched recursively) and optionally `mesh.yaml`.
    #[arg(long, value_name = "DIR")]
    config: PathBuf,
    /// The request to explain (YAML: destination, source, protocol, request, now).
    #[arg(long, value_name = "FILE")]
    request: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Read the JWKS of `jwksUri` URI from a local file (repeatable), for offline checks.
    #[arg(long = "jwks-file", value_name = "URI=PATH")]
    jwks_files: Vec<String>,
    /// Pretend configured CUSTOM (ext_authz) providers allow (default: they deny, as nothing
    /// is reachable from this command).
    #[arg(long)]
    custom_allow: bool,
    /// Exit with status 1 when the decision is DENY (default: 0 whenever a decision is made).
    #[arg(long)]
    exit_code: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RequestFile {
    destination: Destination,
    #[serde(default)]
    source: Source,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    request: Option<RequestPart>,
    #[serde(default)]
    now: Option<String>,
    #[serde(default)]
    sni: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Destination {
    namespace: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    ip: Option<String>,
    port: u16,
    #[serde(default)]
    service_account: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Source {
    #[serde(default)]
    principal: Option<String>,
    #[serde(default)]
    ip: Option<String>,
    #[serde(default)]
    remote_ip: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestPart {
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    jwt: Option<String>,
}

struct CliExt(bool);

impl ExtAuthz for CliExt {
    fn check(&self, _: &str, _: &Workload, _: &RequestContext) -> bool {
        self.0
    }
}

fn parse_ip(field: &str, v: &Option<String>) -> anyhow::Result<Option<IpAddr>> {
    match v {
        None => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|_| super::bad_input(format!("request: {field}: {s:?} is not an IP address"))),
    }
}

/// Every `.yaml`/`.yml` file under `dir` except `dir/mesh.yaml` and `dir/workloads.yaml`
/// (a mesh folder's config and registry, not policies: `--config` may be the folder `rampart
/// up` runs). The same files the proxy reads as policies: a top-level `mesh.yml` is one.
fn policy_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d)
            .map_err(|e| super::bad_input(format!("--config {}: {e}", d.display())))?;
        for entry in entries {
            let p = entry?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if (name.ends_with(".yaml") || name.ends_with(".yml"))
                && !(d == dir
                    && (name == rampart_mesh::MESH_FILE || name == rampart_mesh::WORKLOADS_FILE))
            {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

impl CheckArgs {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        if !self.config.is_dir() {
            return Err(super::bad_input(format!(
                "--config {}: not a folder",
                self.config.display()
            )));
        }
        let mesh_path = self.config.join("mesh.yaml");
        let mesh = if mesh_path.is_file() {
            let text = std::fs::read_to_string(&mesh_path)
                .with_context(|| format!("reading {}", mesh_path.display()))?;
            MeshConfig::from_yaml(&text)
                .map_err(|e| super::bad_input(format!("{}: {e}", mesh_path.display())))?
        } else if self.config.join("mesh.yml").is_file() {
            // As the proxy refuses such a folder: the settings in it would be lost.
            return Err(super::bad_input(format!(
                "{}: the mesh config is read from mesh.yaml only; rename this file",
                self.config.join("mesh.yml").display()
            )));
        } else {
            MeshConfig::default()
        };
        let req_text = std::fs::read_to_string(&self.request)
            .map_err(|e| super::bad_input(format!("--request {}: {e}", self.request.display())))?;
        let rf: RequestFile = serde_saphyr::from_str(&req_text)
            .map_err(|e| super::bad_input(format!("--request {}: {e}", self.request.display())))?;

        let loaded = load_paths(&policy_files(&self.config)?);
        for w in &loaded.warnings {
            eprintln!("warning: {w}");
        }
        if !loaded.problems.is_empty() {
            // The proxy refuses a folder with any invalid document whole, keeping its last
            // good configuration: judging what is left would describe a state that never
            // serves.
            for p in &loaded.problems {
                eprintln!("config problem: {p}");
            }
            return Err(super::bad_input(format!(
                "--config {}: {} problem(s): the proxy would refuse this configuration (and keep serving its last good one); no decision made",
                self.config.display(),
                loaded.problems.len()
            )));
        }
        let engine = Engine::new(loaded.resources, mesh);
        for w in engine.warnings() {
            eprintln!("warning: {w}");
        }

        let now = match &rf.now {
            None => SystemTime::now(),
            Some(t) => humantime::parse_rfc3339_weak(t)
                .map_err(|e| super::bad_input(format!("request: now: {t:?}: {e}")))?,
        };
        let http = match rf.protocol.as_deref().unwrap_or("http") {
            "http" | "HTTP" | "grpc" | "http2" => true,
            "tcp" | "TCP" => false,
            other => {
                return Err(super::bad_input(format!(
                    "request: protocol {other:?} (expected http or tcp)"
                )));
            }
        };
        let workload = Workload {
            namespace: rf.destination.namespace.clone(),
            labels: rf.destination.labels.clone(),
            service_account: rf.destination.service_account.clone(),
        };
        let port = rf.destination.port;
        let mtls = engine.peer_authentication(&workload, port);
        let mut principal = rf.source.principal.clone().filter(|p| !p.is_empty());
        if let Some(p) = &principal {
            check_source_principal(p)?;
        }
        let mut notes = Vec::new();
        if principal.is_some() && mtls.mode == MtlsMode::Disable {
            notes.push(
                "PeerAuthentication DISABLE: mTLS is not terminated, the peer has no principal"
                    .to_string(),
            );
            principal = None;
        }
        let http_req = if http {
            let r = rf.request.unwrap_or_default();
            let mut h = HttpRequest::new(
                r.method.as_deref().unwrap_or("GET"),
                r.path.as_deref().unwrap_or("/"),
                r.host.as_deref().unwrap_or(""),
            );
            for (k, v) in &r.headers {
                h = h.with_header(k, v);
            }
            if let Some(t) = r.jwt.filter(|t| !t.is_empty()) {
                h = h.with_header("authorization", &format!("Bearer {t}"));
            }
            Some(h)
        } else {
            None
        };
        let ctx = RequestContext {
            source: Peer {
                principal: principal.clone(),
                ip: parse_ip("source.ip", &rf.source.ip)?,
                remote_ip: parse_ip("source.remoteIp", &rf.source.remote_ip)?,
            },
            destination_ip: parse_ip("destination.ip", &rf.destination.ip)?,
            destination_port: port,
            sni: rf.sni.clone(),
            http: http_req,
            jwt: None,
        };

        let mtls_json = serde_json::to_value(&mtls)?;
        let mut out: Value = if principal.is_none() && mtls.mode == MtlsMode::Strict {
            // STRICT refuses plaintext at the connection: no policy is consulted.
            let pa = mtls
                .policy
                .as_ref()
                .map(|p| p.to_string())
                .unwrap_or_default();
            json!({
                "decision": "DENY",
                "status": 403,
                "policy": mtls.policy,
                "reason_code": "mtls_required",
                "reason": format!("PeerAuthentication {pa} requires mTLS (STRICT) and the connection is plaintext: refused before any request is read"),
            })
        } else {
            // Key sets for jwksUri: local files only.
            let mut fetcher = FileJwksFetcher {
                base_dir: Some(self.config.clone()),
                overrides: BTreeMap::new(),
            };
            for m in &self.jwks_files {
                let (uri, path) = m.split_once('=').ok_or_else(|| {
                    super::bad_input(format!("--jwks-file {m:?}: expected URI=PATH"))
                })?;
                fetcher
                    .overrides
                    .insert(uri.to_string(), PathBuf::from(path));
            }
            let mut cache = JwksCache::default();
            cache.refresh(&engine, &fetcher, now);
            for f in engine.jwks_uris() {
                if let Some(e) = cache.last_error(&f.uri) {
                    eprintln!(
                        "warning: jwksUri {}: {e} (tokens of that issuer are refused; use --jwks-file)",
                        f.uri
                    );
                }
            }
            // As the proxy at its edge: a client's copies of the JWT output headers never
            // reach policy (only a verified token sets them).
            let mut ctx = ctx;
            if let Some(h) = ctx.http.as_mut() {
                let outputs = engine.jwt_output_headers(&workload);
                h.headers.retain(|(k, _)| {
                    let keep = !outputs.iter().any(|o| o.eq_ignore_ascii_case(k));
                    if !keep {
                        notes.push(format!(
                            "header {k:?} removed: only a verified token sets it (a RequestAuthentication output header)"
                        ));
                    }
                    keep
                });
            }
            let authn = ctx
                .http
                .as_ref()
                .map(|h| engine.authenticate_request(&workload, h, now, &cache));
            let d = engine.check(&workload, &ctx, now, &cache, &CliExt(self.custom_allow));
            let mut v = serde_json::to_value(&d)?;
            let why = engine.explain(&workload, &ctx, now, &cache, &d);
            if !why.is_empty() {
                v["explanation"] = json!(why);
            }
            if let Some(a) = authn {
                v["authn"] = serde_json::to_value(&a)?;
            }
            v
        };
        out["mtls"] = mtls_json;
        out["source"] = json!({"principal": principal, "ip": rf.source.ip});
        out["destination_port"] = json!(port);
        out["protocol"] = json!(if http { "http" } else { "tcp" });
        // Policies that apply but decide nothing: AUDIT and dry-run ones.
        let considered: Vec<String> = out["considered"]
            .as_array()
            .map(|l| l.iter().map(policy_name).collect())
            .unwrap_or_default();
        let reported: Vec<String> = engine
            .policies_for(&workload)
            .iter()
            .map(|p| p.to_string())
            .filter(|p| !considered.contains(p))
            .collect();
        if out.get("considered").is_some() && !reported.is_empty() {
            out["not_enforced"] = json!(reported);
        }
        if !notes.is_empty() {
            out["notes"] = json!(notes);
        }
        let denied = out["decision"] == "DENY";
        match self.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&out)?),
            Output::Text => print_text(&out),
        }
        Ok(if denied && self.exit_code {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        })
    }
}

/// A request file's `source.principal` is the peer's SPIFFE ID as its certificate carries
/// it (`spiffe://td/ns/x/sa/y`). The form policies write (`td/ns/x/sa/y`, no scheme) is no
/// peer identity: it would match no `principals` value and silently judge another request.
fn check_source_principal(p: &str) -> anyhow::Result<()> {
    if let Err(e) = rampart_certs::SpiffeId::parse(p) {
        let hint = if !p.contains("://")
            && rampart_certs::SpiffeId::parse(&format!("spiffe://{p}")).is_ok()
        {
            format!(
                "the peer's identity is its SPIFFE ID URI: write \"spiffe://{p}\" (policies write principals without the scheme; request files with it)"
            )
        } else {
            format!("not a SPIFFE ID ({e})")
        };
        return Err(super::bad_input(format!(
            "request: source.principal {p:?}: {hint}"
        )));
    }
    Ok(())
}

/// `namespace/name` of a serialized [`rampart_authz::PolicyRef`].
fn policy_name(p: &Value) -> String {
    format!(
        "{}/{}",
        p["namespace"].as_str().unwrap_or(""),
        p["name"].as_str().unwrap_or("")
    )
}

/// A serialized [`rampart_authz::RuleMatch`] as `ns/name rule N`.
fn rule_match(m: &Value) -> String {
    format!("{} rule {}", policy_name(&m["policy"]), m["rule"])
}

fn print_text(v: &Value) {
    let policy = match &v["policy"] {
        Value::Object(p) => format!(
            " {}/{}",
            p.get("namespace").and_then(Value::as_str).unwrap_or(""),
            p.get("name").and_then(Value::as_str).unwrap_or("")
        ),
        _ => String::new(),
    };
    let rule = match v["rule"].as_u64() {
        Some(r) => format!(" rule {r}"),
        None => String::new(),
    };
    println!(
        "{} {}{policy}{rule}: {}",
        v["decision"].as_str().unwrap_or("?"),
        v["status"],
        v["reason"].as_str().unwrap_or("")
    );
    if let Some(list) = v["explanation"].as_array() {
        for w in list {
            println!("  why: {}", w.as_str().unwrap_or(""));
        }
    }
    let m = &v["mtls"];
    let from = match &m["policy"] {
        Value::Object(p) => format!(
            "{} PeerAuthentication {}/{}",
            m["level"].as_str().unwrap_or("?"),
            p.get("namespace").and_then(Value::as_str).unwrap_or(""),
            p.get("name").and_then(Value::as_str).unwrap_or("")
        ),
        _ => "no PeerAuthentication applies: Istio's default".to_string(),
    };
    println!("  mTLS: {} ({from})", m["mode"].as_str().unwrap_or("?"));
    if let Some(a) = v.get("authn") {
        match a["outcome"].as_str() {
            Some("authenticated") => println!(
                "  JWT: authenticated as {}",
                a["principal"].as_str().unwrap_or("(no iss/sub)")
            ),
            Some("no_token") => println!("  JWT: no token (no request principal)"),
            Some("rejected") => println!("  JWT: rejected: {}", a["reason"].as_str().unwrap_or("")),
            _ => {}
        }
    }
    let from = match (
        v["source"]["principal"].as_str(),
        v["source"]["ip"].as_str(),
    ) {
        (Some(p), Some(ip)) => format!("{p} at {ip}"),
        (Some(p), None) => p.to_string(),
        (None, Some(ip)) => format!("plaintext peer at {ip}"),
        (None, None) => "plaintext peer".to_string(),
    };
    println!(
        "  source: {from}; destination port {} ({})",
        v["destination_port"],
        v["protocol"].as_str().unwrap_or("?")
    );
    if let Some(p) = v["normalized_path"].as_str() {
        println!("  path: {p} (normalized)");
    }
    if let Some(list) = v["considered"].as_array() {
        let names: Vec<String> = list.iter().map(policy_name).collect();
        if names.is_empty() {
            println!("  considered: none (no enforced ALLOW, DENY or CUSTOM policy applies)");
        } else {
            println!("  considered: {}", names.join(", "));
        }
    }
    if let Some(list) = v["not_enforced"].as_array() {
        let names: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
        println!("  not enforced (AUDIT, dry-run): {}", names.join(", "));
    }
    if let Some(a) = v.get("audit") {
        println!("  audit: {} matched", rule_match(a));
    }
    if let Some(d) = v.get("dry_run") {
        if let Some(m) = d.get("deny") {
            println!("  dry-run: DENY {} would deny", rule_match(m));
        }
        if let Some(a) = d.get("allow") {
            match a.get("matched") {
                Some(m) => println!("  dry-run: ALLOW {} would allow", rule_match(m)),
                None => println!("  dry-run: ALLOW policies would deny (no rule matches)"),
            }
        }
    }
    if let Some(h) = v["headers"].as_array() {
        for m in h {
            println!("  header: {m}");
        }
    }
    if let Some(list) = v["notes"].as_array() {
        for n in list {
            println!("  note: {}", n.as_str().unwrap_or(""));
        }
    }
}
