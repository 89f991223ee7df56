//! `rampart up DIR`: the whole mesh of a folder on this machine.
//!
//! Starts, as children of this process (each in its own process group, logs under
//! `<stateDir>/logs/`): the CA (`rampart ca`, trusting a JWT issuer `up` creates), one node
//! agent per workload (`rampart agent`, own SDS socket, own token), each workload's app (its
//! `command`, with `HTTP_PROXY` pointing at its proxy's outbound listener), and one proxy per
//! workload (`rampart proxy`). Waits for each stage to be ready, prints who listens where,
//! then supervises: a child that dies is reported (exit status, last log lines) and the rest
//! is stopped (exit 1); Ctrl-C or SIGTERM stops apps and proxies first (drain deadline), then
//! the agents, then the CA, and exits 0.
//!
//! Edits to the folder are checked as they happen (once a second). An invalid edit is refused
//! with file, field and reason, and nothing running is touched (the proxies refuse it too). A
//! valid one is applied: the proxies take policy, ports and listener addresses live
//! themselves; here, a removed workload's app, proxy and agent are stopped (SIGTERM, SIGKILL
//! after the drain timeout, as on Ctrl-C), an added one is started stage by stage and its
//! table line printed, a changed `command` (or, for an app with one, `proxy.outbound`)
//! restarts the app, a changed `proxy.admin` restarts the proxy, and a changed
//! `serviceAccount` restarts all three under the new identity. A workload that fails to
//! start live is stopped again and left out (saving again retries it); the rest keeps
//! running. `mesh.yaml` CA settings and the trust domain apply on the next `up`.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use rampart_certs::jwt::{JwtSigner, ServiceAccount};
use rampart_certs::{KeyAlgorithm, PrivateKey};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::mpsc;

use super::meshdir::{MeshFolder, Workload};
use super::up_plan::{Action, Role, plan};

/// Issuer of the tokens node agents present to the CA.
pub(crate) const DEFAULT_ISSUER: &str = "https://rampart.local/up";
/// Audience the CA expects in caller tokens.
const CA_AUDIENCE: &str = "istio-ca";
/// Lifetime of agent tokens; they are re-minted well before expiry.
const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
const TOKEN_REFRESH: Duration = Duration::from_secs(3600);
/// What `rampart ca` prints once its listener is bound.
const CA_READY_MARKER: &str = "rampart ca: listening on";
/// Log lines kept per child for the crash report.
const TAIL_LINES: usize = 20;
/// Longest Unix socket path (sockaddr_un.sun_path less the NUL).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, clap::Args)]
pub(crate) struct UpArgs {
    #[command(flatten)]
    compliance: super::ComplianceArgs,
    /// The mesh folder: mesh.yaml, workloads.yaml, policy YAML, jwks/.
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    /// State directory (CA root and audit log, tokens, sockets, logs). Default: mesh.yaml
    /// `rampart.stateDir`, else `var/rampart`; relative to the current directory.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Istio `cacerts` plug-in directory for the CA (ca-cert.pem, ca-key.pem, cert-chain.pem,
    /// root-cert.pem). Default: `<stateDir>/cacerts`; without ca-cert.pem there the CA makes
    /// and keeps a self-signed root.
    #[arg(long, value_name = "DIR")]
    cacerts: Option<PathBuf>,
    /// How long each stage (CA, agents, apps, proxies) may take to become ready.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    ready_timeout: Duration,
    /// How long apps and proxies get to drain on shutdown before they are killed (agents and
    /// the CA get the same again, each).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Also copy every child's log lines to stderr, prefixed with its name.
    #[arg(long)]
    logs: bool,
    /// Issuer (`iss`) of the tokens `up` mints for the node agents.
    #[arg(long, default_value = DEFAULT_ISSUER, value_name = "ISS")]
    issuer: String,
}

impl UpArgs {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        self.compliance.apply();
        let mesh = MeshFolder::read(&self.dir).map_err(super::bad_input)?;
        // mesh.yaml's `rampart.compliancePolicy: pqc` reaches the CA and agents too (the
        // proxies read it themselves); a `pqc` flag is never loosened by the folder.
        if mesh.compliance_policy == rampart_certs::tls::CompliancePolicy::Pqc {
            rampart_certs::tls::set_compliance_policy(mesh.compliance_policy);
        }
        let policy = check_policy(&self.dir);
        if !policy.problems.is_empty() {
            return Err(super::bad_input(format!(
                "{} has invalid policy:\n  {}",
                self.dir.display(),
                policy.problems.join("\n  ")
            )));
        }
        for w in &policy.warnings {
            eprintln!("rampart up: warning: {w}");
        }
        check_addresses(&mesh).map_err(super::bad_input)?;
        if mesh.workloads.is_empty() {
            return Err(super::bad_input(format!(
                "{}/workloads.yaml declares no workloads",
                self.dir.display()
            )));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let code = rt.block_on(Up::new(self, mesh)?.run())?;
        // Children are stopped by now; don't let a stuck log pump hold the exit.
        rt.shutdown_timeout(Duration::from_secs(1));
        Ok(code)
    }
}

// ---------------------------------------------------------------- checks

struct PolicyCheck {
    problems: Vec<String>,
    warnings: Vec<String>,
    resources: usize,
}

/// Policy YAML of a mesh folder: every .yaml/.yml below DIR except the top-level mesh.yaml and
/// workloads.yaml, validated as `rampart validate` does.
fn check_policy(dir: &Path) -> PolicyCheck {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    if let Err(e) = policy_files(dir, dir, &mut files) {
        problems.push(e);
    }
    if files.is_empty() {
        return PolicyCheck {
            problems,
            warnings: Vec::new(),
            resources: 0,
        };
    }
    let r = rampart_authz::load_paths(&files);
    problems.extend(r.problems.iter().map(|p| p.to_string()));
    PolicyCheck {
        problems,
        warnings: r.warnings.iter().map(|w| w.to_string()).collect(),
        resources: r.resources.len(),
    }
}

fn policy_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = e.path();
        if path.is_dir() {
            policy_files(root, &path, out)?;
        } else if (name.ends_with(".yaml") || name.ends_with(".yml"))
            && !(dir == root && (name == "mesh.yaml" || name == "workloads.yaml"))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// Every listen address in the folder must be distinct (and not the CA's).
fn check_addresses(mesh: &MeshFolder) -> Result<(), String> {
    let mut seen: Vec<(SocketAddr, String)> = vec![(mesh.ca_listen, "the CA".into())];
    let mut add = |a: SocketAddr, what: String| -> Result<(), String> {
        if let Some((_, other)) = seen.iter().find(|(s, _)| *s == a) {
            return Err(format!(
                "workloads.yaml: {what} and {other} both listen on {a}"
            ));
        }
        seen.push((a, what));
        Ok(())
    };
    for w in &mesh.workloads {
        let k = w.key();
        for p in &w.ports {
            if let Some(a) = p.app {
                add(a, format!("{k} port {} app", p.port))?;
            }
            if let Some(a) = p.inbound {
                add(a, format!("{k} port {} inbound", p.port))?;
            }
        }
        if let Some(a) = w.outbound {
            add(a, format!("{k} proxy.outbound"))?;
        }
        if let Some(a) = w.admin {
            add(a, format!("{k} proxy.admin"))?;
        }
        for u in &w.upstreams {
            add(u.listen, format!("{k} upstream {}:{}", u.service, u.port))?;
        }
    }
    Ok(())
}

/// mesh.yaml `rampart.demoToken`: an end-user token `up` mints for demos.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DemoToken {
    /// Signing key file, relative to DIR (a published demo key, never a real one).
    key: PathBuf,
    kid: Option<String>,
    issuer: String,
    audience: String,
    namespace: String,
    service_account: String,
}

/// The `rampart.demoToken` section of DIR/mesh.yaml, if any.
fn read_demo_token(dir: &Path) -> Result<Option<DemoToken>, String> {
    #[derive(serde::Deserialize, Default)]
    #[serde(default, rename_all = "camelCase")]
    struct Mesh {
        rampart: Rampart,
    }
    #[derive(serde::Deserialize, Default)]
    #[serde(default, rename_all = "camelCase")]
    struct Rampart {
        demo_token: Option<DemoToken>,
    }
    let text = match std::fs::read_to_string(dir.join("mesh.yaml")) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("mesh.yaml: {e}")),
    };
    if text.trim().is_empty() {
        return Ok(None);
    }
    let m: Mesh =
        serde_saphyr::from_str(&text).map_err(|e| format!("mesh.yaml: rampart.demoToken: {e}"))?;
    Ok(m.rampart.demo_token)
}

// ---------------------------------------------------------------- children

struct Child {
    name: String,
    role: Role,
    /// The workload (`namespace/name`) it serves; `None` for the CA.
    workload: Option<String>,
    /// Stopped on purpose (workload removed or restarted live): its exit is not a death.
    retired: bool,
    pid: i32,
    log: PathBuf,
    tail: Arc<Mutex<VecDeque<String>>>,
    /// Set once the child printed its `ready_marker` line.
    said_ready: Arc<std::sync::atomic::AtomicBool>,
    exited: Option<ExitStatus>,
}

enum Event {
    Exit(usize, std::io::Result<ExitStatus>),
    Signal(&'static str),
}

/// Why a wait ended early.
enum Stop {
    Signal(&'static str),
    Died(usize),
    Failed(String),
}

struct Up {
    args: UpArgs,
    mesh: MeshFolder,
    exe: PathBuf,
    dir: PathBuf,
    state: PathBuf,
    logs: PathBuf,
    children: Vec<Child>,
    tx: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
    signer: JwtSigner,
    bundle: PathBuf,
    demo_token: Option<(PathBuf, String)>,
}

fn describe_status(s: &std::io::Result<ExitStatus>) -> String {
    match s {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => s.to_string(),
        },
        Err(e) => format!("could not be waited for: {e}"),
    }
}

fn socket_name(w: &Workload) -> String {
    format!("{}.{}.sock", w.namespace, w.name)
}

impl Up {
    fn new(args: UpArgs, mesh: MeshFolder) -> anyhow::Result<Up> {
        let exe = std::env::current_exe().context("finding the rampart executable")?;
        let dir =
            std::fs::canonicalize(&args.dir).with_context(|| format!("{}", args.dir.display()))?;
        let state = args
            .state_dir
            .clone()
            .or_else(|| mesh.state_dir.clone())
            .unwrap_or_else(|| PathBuf::from("var/rampart"));
        std::fs::create_dir_all(&state)
            .with_context(|| format!("creating the state directory {}", state.display()))?;
        let state = std::fs::canonicalize(&state)?;
        for sub in ["logs", "jwt", "tokens", "sds", "ca"] {
            std::fs::create_dir_all(state.join(sub))?;
        }
        let longest = state.join("sds").join(
            mesh.workloads
                .iter()
                .map(socket_name)
                .max_by_key(String::len)
                .unwrap_or_default(),
        );
        if longest.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(super::bad_input(format!(
                "SDS socket path {} is longer than a Unix socket allows ({MAX_SOCKET_PATH} bytes); use a shorter --state-dir",
                longest.display()
            )));
        }
        // The key that signs agent tokens: made here, kept 0600 in the state dir.
        let key_path = state.join("jwt/up-signing-key.pem");
        let key = if key_path.exists() {
            PrivateKey::read_pem_file(&key_path)
                .with_context(|| format!("reading {}", key_path.display()))?
        } else {
            let k = PrivateKey::generate(KeyAlgorithm::EcdsaP256).context("making a JWT key")?;
            k.write_pem_file(&key_path)
                .with_context(|| format!("writing {}", key_path.display()))?;
            k
        };
        let signer = JwtSigner::with_thumbprint_kid(&key).context("JWT signer")?;
        let jwks = signer.jwks().context("JWKS")?.to_json();
        rampart_certs::write_file_atomic(
            &state.join("jwt/jwks.json"),
            serde_json::to_string_pretty(&jwks)?.as_bytes(),
            0o644,
        )
        .context("writing the JWKS")?;
        let (tx, rx) = mpsc::unbounded_channel();
        Ok(Up {
            logs: state.join("logs"),
            // The CA writes its trust bundle here for the agents; never into `ca/`, where
            // `root-cert.pem` is its persisted self-signed root (the CA refuses that).
            bundle: state.join("trust-bundle.pem"),
            args,
            mesh,
            exe,
            dir,
            state,
            children: Vec::new(),
            tx,
            rx,
            signer,
            demo_token: None,
        })
    }

    /// Mint the demo end-user token mesh.yaml `rampart.demoToken` asks for (a published demo
    /// key; for trying RequestAuthentication out), written 0600 to `<stateDir>/demo-token.jwt`.
    fn mint_demo_token(&self) -> anyhow::Result<Option<(PathBuf, String)>> {
        let Some(demo) = read_demo_token(&self.dir).map_err(super::bad_input)? else {
            return Ok(None);
        };
        let key_path = self.dir.join(&demo.key);
        let key = PrivateKey::read_pem_file(&key_path).map_err(|e| {
            super::bad_input(format!(
                "mesh.yaml: rampart.demoToken.key: {}: {e}",
                key_path.display()
            ))
        })?;
        let signer = match &demo.kid {
            Some(kid) => JwtSigner::new(&key, kid.clone()),
            None => JwtSigner::with_thumbprint_kid(&key),
        }
        .map_err(|e| super::bad_input(format!("mesh.yaml: rampart.demoToken: {e}")))?;
        let account = ServiceAccount::new(&demo.namespace, &demo.service_account)
            .map_err(|e| super::bad_input(format!("mesh.yaml: rampart.demoToken: {e}")))?;
        let claims = super::token::workload_claims(
            &demo.issuer,
            &account,
            std::slice::from_ref(&demo.audience),
            SystemTime::now(),
            TOKEN_TTL,
        );
        let token = signer.sign(&claims).context("signing the demo token")?;
        let path = self.state.join("demo-token.jwt");
        rampart_certs::write_file_atomic(&path, token.as_bytes(), 0o600)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Some((path, demo.issuer)))
    }

    fn mint_tokens(&self) -> anyhow::Result<()> {
        for w in &self.mesh.workloads {
            self.mint_token(w)?;
        }
        Ok(())
    }

    fn mint_token(&self, w: &Workload) -> anyhow::Result<()> {
        let account = ServiceAccount::new(&w.namespace, &w.service_account)
            .map_err(|e| anyhow::anyhow!("{}: {e}", w.key()))?;
        let claims = super::token::workload_claims(
            &self.args.issuer,
            &account,
            &[CA_AUDIENCE.to_string()],
            SystemTime::now(),
            TOKEN_TTL,
        );
        let token = self.signer.sign(&claims).context("signing a token")?;
        rampart_certs::write_file_atomic(&self.token_path(w), token.as_bytes(), 0o600)
            .with_context(|| format!("writing the token of {}", w.key()))
    }

    fn token_path(&self, w: &Workload) -> PathBuf {
        self.state
            .join("tokens")
            .join(format!("{}.{}.jwt", w.namespace, w.name))
    }

    fn sds_path(&self, w: &Workload) -> PathBuf {
        self.state.join("sds").join(socket_name(w))
    }

    /// Start one child in its own process group, logs to `<logs>/<file>.log`; returns its
    /// index in `children`.
    fn spawn(
        &mut self,
        name: String,
        role: Role,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
        ready_marker: Option<&'static str>,
    ) -> anyhow::Result<usize> {
        let file = name.replace(['/', ' '], "-");
        let log = self.logs.join(format!("{file}.log"));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let log_file = Arc::new(Mutex::new(log_file));
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        // Plain log lines in the log files.
        cmd.env("NO_COLOR", "1");
        // `rampart up --compliance-policy pqc` reaches the CA, agents and proxies it starts.
        if role != Role::App
            && rampart_certs::tls::compliance_policy() == rampart_certs::tls::CompliancePolicy::Pqc
        {
            cmd.env("COMPLIANCE_POLICY", "pqc");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().with_context(|| {
            format!("{name}: starting {} {}", program.display(), args.join(" "))
        })?;
        let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let echo = self.args.logs.then(|| name.clone());
        let said_ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let marker = ready_marker.map(|m| (m, said_ready.clone()));
        if let Some(out) = child.stdout.take() {
            tokio::spawn(pump(
                out,
                log_file.clone(),
                tail.clone(),
                echo.clone(),
                marker.clone(),
            ));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(pump(err, log_file, tail.clone(), echo, marker));
        }
        let idx = self.children.len();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send(Event::Exit(idx, status));
        });
        self.children.push(Child {
            name,
            role,
            workload: None,
            retired: false,
            pid,
            log,
            tail,
            said_ready,
            exited: None,
        });
        Ok(idx)
    }

    fn running(&self, role: Role) -> Vec<usize> {
        (0..self.children.len())
            .filter(|i| self.children[*i].role == role && self.children[*i].exited.is_none())
            .collect()
    }

    fn signal_group(&self, idx: usize, sig: rustix::process::Signal) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.children[idx].pid) {
            let _ = rustix::process::kill_process_group(pid, sig);
        }
    }

    /// Poll `ready` until it holds, a child exits, a signal arrives or the deadline passes.
    async fn wait_ready<F, Fut>(&mut self, stage: &str, mut ready: F) -> Result<(), Stop>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let deadline = Instant::now() + self.args.ready_timeout;
        loop {
            if let Ok(ev) = self.rx.try_recv() {
                match ev {
                    Event::Signal(s) => return Err(Stop::Signal(s)),
                    Event::Exit(i, st) => {
                        self.children[i].exited =
                            Some(st.unwrap_or_else(|_| ExitStatus::from_raw(1 << 8)));
                        if !self.children[i].retired {
                            return Err(Stop::Died(i));
                        }
                    }
                }
            }
            let why = match ready().await {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                return Err(Stop::Failed(format!(
                    "{stage} not ready within {}: {why}",
                    humantime::format_duration(self.args.ready_timeout)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn run(mut self) -> anyhow::Result<ExitCode> {
        // Signals first, so a Ctrl-C during start-up stops what has started.
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
            let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
            let tx = self.tx.clone();
            tokio::spawn(async move {
                loop {
                    let s = tokio::select! {
                        _ = int.recv() => "SIGINT",
                        _ = term.recv() => "SIGTERM",
                    };
                    if tx.send(Event::Signal(s)).is_err() {
                        return;
                    }
                }
            });
        }
        let result = self.start().await;
        let (code, reason) = match result {
            Ok(()) => {
                print!("{}", self.table());
                if let Some((path, issuer)) = &self.demo_token {
                    println!(
                        "\ndemo end-user token (issuer {issuer}, valid {}): {}",
                        humantime::format_duration(TOKEN_TTL),
                        path.display()
                    );
                }
                let _ = std::io::stdout().flush();
                eprintln!("rampart up: ready; Ctrl-C stops everything");
                self.supervise().await
            }
            Err(e) => self.failure(e),
        };
        if let Some(r) = reason {
            eprintln!("{r}");
        }
        self.shutdown().await;
        Ok(ExitCode::from(code))
    }

    fn failure(&self, stop: Stop) -> (u8, Option<String>) {
        match stop {
            Stop::Signal(s) => (
                0,
                Some(format!(
                    "rampart up: {s} received during start-up; stopping"
                )),
            ),
            Stop::Died(i) => (1, Some(self.death_report(i))),
            Stop::Failed(why) => (1, Some(format!("rampart up: {why}; stopping"))),
        }
    }

    fn death_report(&self, i: usize) -> String {
        let c = &self.children[i];
        let status = c
            .exited
            .map(|s| describe_status(&Ok(s)))
            .unwrap_or_else(|| "unknown status".into());
        let mut out = format!(
            "rampart up: {} exited unexpectedly ({status}); last lines of {}:",
            c.name,
            c.log.display()
        );
        let tail = c.tail.lock().map(|t| t.clone()).unwrap_or_default();
        if tail.is_empty() {
            out.push_str("\n  (no output)");
        }
        for l in tail {
            let _ = write!(out, "\n  {l}");
        }
        out.push_str("\nrampart up: stopping the rest");
        out
    }

    async fn start(&mut self) -> Result<(), Stop> {
        self.mint_tokens()
            .map_err(|e| Stop::Failed(format!("{e:#}")))?;
        self.demo_token = self
            .mint_demo_token()
            .map_err(|e| Stop::Failed(format!("{e:#}")))?;
        // 1. The CA, trusting our issuer.
        let _ = std::fs::remove_file(&self.bundle);
        let cacerts = self
            .args
            .cacerts
            .clone()
            .unwrap_or_else(|| self.state.join("cacerts"));
        let mut ca_args: Vec<String> = vec![
            "ca".into(),
            "--listen".into(),
            self.mesh.ca_listen.to_string(),
            "--cacerts".into(),
            cacerts.display().to_string(),
            "--state".into(),
            self.state.join("ca").display().to_string(),
            "--trust-domain".into(),
            self.mesh.trust_domain.clone(),
            "--jwt-issuer".into(),
            self.args.issuer.clone(),
            "--jwks".into(),
            self.state.join("jwt/jwks.json").display().to_string(),
            "--bundle-out".into(),
            self.bundle.display().to_string(),
        ];
        if let Some(t) = self.mesh.cert_ttl {
            ca_args.extend([
                "--default-ttl".into(),
                humantime::format_duration(t).to_string(),
            ]);
        }
        if let Some(t) = self.mesh.max_cert_ttl {
            ca_args.extend([
                "--max-ttl".into(),
                humantime::format_duration(t).to_string(),
            ]);
        }
        let exe = self.exe.clone();
        self.spawn(
            "ca".into(),
            Role::Ca,
            &exe,
            &ca_args,
            &[],
            Some(CA_READY_MARKER),
        )
        .map_err(|e| Stop::Failed(format!("{e:#}")))?;
        // Ready = it said it listens (a connect alone could reach someone else on the port),
        // its trust bundle is written, and the port accepts.
        let (bundle, ca) = (self.bundle.clone(), self.mesh.ca_listen);
        let said = self.children[self.children.len() - 1].said_ready.clone();
        self.wait_ready("the CA", || {
            let (bundle, said) = (bundle.clone(), said.clone());
            async move {
                if !said.load(std::sync::atomic::Ordering::Acquire) {
                    return Err(format!("no {CA_READY_MARKER:?} line in its log yet"));
                }
                if !bundle.exists() {
                    return Err(format!("no trust bundle at {} yet", bundle.display()));
                }
                tcp_ready(ca).await
            }
        })
        .await?;

        // 2-4. Per workload: node agents, then apps, then proxies.
        let workloads = self.mesh.workloads.clone();
        self.start_workloads(&workloads).await
    }

    /// Start the node agents, then the apps (so inbound proxies have something to forward
    /// to when they open), then the proxies of `workloads`, each stage waited for.
    async fn start_workloads(&mut self, workloads: &[Workload]) -> Result<(), Stop> {
        for w in workloads {
            self.spawn_agent(w)?;
        }
        let socks: Vec<PathBuf> = workloads.iter().map(|w| self.sds_path(w)).collect();
        self.wait_ready("the node agents", || {
            let socks = socks.clone();
            async move {
                for s in &socks {
                    tokio::net::UnixStream::connect(s)
                        .await
                        .map_err(|e| format!("SDS socket {}: {e}", s.display()))?;
                }
                Ok(())
            }
        })
        .await?;
        for w in workloads {
            self.spawn_app(w)?;
        }
        self.wait_apps(workloads).await?;
        for w in workloads {
            self.spawn_proxy(w)?;
        }
        self.wait_proxies(workloads).await
    }

    fn spawn_agent(&mut self, w: &Workload) -> Result<(), Stop> {
        let sock = self.sds_path(w);
        let _ = std::fs::remove_file(&sock);
        let mut a: Vec<String> = vec![
            "agent".into(),
            "--ca-addr".into(),
            self.mesh.ca_listen.to_string(),
            "--ca-root".into(),
            self.bundle.display().to_string(),
            "--token".into(),
            self.token_path(w).display().to_string(),
            "--trust-domain".into(),
            self.mesh.trust_domain.clone(),
            "--sds-socket".into(),
            sock.display().to_string(),
        ];
        if let Some(t) = self.mesh.cert_ttl {
            a.extend(["--ttl".into(), humantime::format_duration(t).to_string()]);
        }
        let exe = self.exe.clone();
        self.spawn_for(w, format!("agent {}", w.key()), Role::Agent, &exe, &a, &[])
    }

    /// Start the app of `w`, if the registry gives it a command.
    fn spawn_app(&mut self, w: &Workload) -> Result<(), Stop> {
        let Some(cmd) = &w.command else {
            return Ok(());
        };
        let program = if cmd[0] == "rampart" {
            self.exe.clone()
        } else {
            PathBuf::from(&cmd[0])
        };
        let mut env = vec![
            ("RAMPART_WORKLOAD", w.key()),
            ("SPIFFE_ID", w.spiffe_id(&self.mesh.trust_domain)),
        ];
        if let Some(o) = w.outbound {
            let url = format!("http://{o}");
            env.extend([
                ("HTTP_PROXY", url.clone()),
                ("http_proxy", url),
                ("NO_PROXY", "localhost,127.0.0.1,::1".into()),
                ("no_proxy", "localhost,127.0.0.1,::1".into()),
            ]);
        }
        self.spawn_for(
            w,
            format!("app {}", w.key()),
            Role::App,
            &program,
            &cmd[1..],
            &env,
        )
    }

    fn spawn_proxy(&mut self, w: &Workload) -> Result<(), Stop> {
        let a: Vec<String> = vec![
            "proxy".into(),
            "--mesh".into(),
            self.dir.display().to_string(),
            "--workload".into(),
            w.key(),
            "--sds-socket".into(),
            self.sds_path(w).display().to_string(),
        ];
        let exe = self.exe.clone();
        self.spawn_for(w, format!("proxy {}", w.key()), Role::Proxy, &exe, &a, &[])
    }

    fn spawn_for(
        &mut self,
        w: &Workload,
        name: String,
        role: Role,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
    ) -> Result<(), Stop> {
        let i = self
            .spawn(name, role, program, args, env, None)
            .map_err(|e| Stop::Failed(format!("{e:#}")))?;
        self.children[i].workload = Some(w.key());
        Ok(())
    }

    /// The apps of `workloads` that have a command accept connections on their ports.
    async fn wait_apps(&mut self, workloads: &[Workload]) -> Result<(), Stop> {
        let app_addrs: Vec<SocketAddr> = workloads
            .iter()
            .filter(|w| w.command.is_some())
            .flat_map(|w| w.ports.iter().filter_map(|p| p.app))
            .collect();
        self.wait_ready("the apps", || {
            let addrs = app_addrs.clone();
            async move {
                for a in addrs {
                    tcp_ready(a).await?;
                }
                Ok(())
            }
        })
        .await
    }

    async fn wait_proxies(&mut self, workloads: &[Workload]) -> Result<(), Stop> {
        let workloads = workloads.to_vec();
        self.wait_ready("the proxies", || {
            let workloads = workloads.clone();
            async move {
                for w in &workloads {
                    proxy_ready(w).await?;
                }
                Ok(())
            }
        })
        .await
    }

    fn table(&self) -> String {
        let mut out = format!(
            "CA              {} (trust domain {}, trust bundle {})\nstate, logs     {}, {}\n\n",
            self.mesh.ca_listen,
            self.mesh.trust_domain,
            self.bundle.display(),
            self.state.display(),
            self.logs.display()
        );
        out.push_str(&self.workload_table(&self.mesh.workloads));
        out
    }

    /// Who listens where, for `workloads` (with the header line).
    fn workload_table(&self, workloads: &[Workload]) -> String {
        let mut rows: Vec<[String; 6]> = vec![[
            "WORKLOAD".into(),
            "IDENTITY".into(),
            "APP".into(),
            "INBOUND (port/protocol -> proxy)".into(),
            "OUTBOUND".into(),
            "ADMIN".into(),
        ]];
        let none = || "-".to_string();
        for w in workloads {
            let mut first = true;
            let ports: Vec<&super::meshdir::Port> = w.ports.iter().collect();
            let n = ports.len().max(1) + w.upstreams.len();
            for i in 0..n {
                let (app, inbound) = if let Some(p) = ports.get(i) {
                    (
                        p.app.map(|a| a.to_string()).unwrap_or_else(none),
                        format!(
                            "{}/{} -> {}",
                            p.port,
                            p.protocol,
                            p.inbound.map(|a| a.to_string()).unwrap_or_else(none)
                        ),
                    )
                } else if i >= ports.len().max(1) {
                    let u = &w.upstreams[i - ports.len().max(1)];
                    (
                        String::new(),
                        format!("upstream {}:{} at {}", u.service, u.port, u.listen),
                    )
                } else {
                    (none(), none())
                };
                rows.push([
                    if first { w.key() } else { String::new() },
                    if first {
                        w.spiffe_id(&self.mesh.trust_domain)
                    } else {
                        String::new()
                    },
                    app,
                    inbound,
                    if first {
                        w.outbound.map(|a| a.to_string()).unwrap_or_else(none)
                    } else {
                        String::new()
                    },
                    if first {
                        w.admin.map(|a| a.to_string()).unwrap_or_else(none)
                    } else {
                        String::new()
                    },
                ]);
                first = false;
            }
        }
        super::align_columns(&rows)
    }

    /// Wait for a signal or a death; meanwhile apply folder edits and refresh tokens.
    async fn supervise(&mut self) -> (u8, Option<String>) {
        let mut fingerprint = folder_fingerprint(&self.dir, &self.state);
        let mut last_mint = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                ev = self.rx.recv() => match ev {
                    Some(Event::Signal(s)) => {
                        return (0, Some(format!("rampart up: {s} received; stopping")));
                    }
                    Some(Event::Exit(i, st)) => {
                        self.children[i].exited = Some(st.unwrap_or_else(|_| ExitStatus::from_raw(1 << 8)));
                        if self.children[i].retired {
                            continue;
                        }
                        // Let the log pumps catch the last lines.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        return (1, Some(self.death_report(i)));
                    }
                    None => return (1, Some("rampart up: internal channel closed".into())),
                },
                _ = tick.tick() => {
                    let mut now = folder_fingerprint(&self.dir, &self.state);
                    if now != fingerprint {
                        // Let a writer finish: act on a folder that holds still for 300 ms
                        // (a half-written registry can be valid and name fewer workloads).
                        for _ in 0..10 {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            let again = folder_fingerprint(&self.dir, &self.state);
                            if again == now {
                                break;
                            }
                            now = again;
                        }
                        fingerprint = now;
                        // An edit saved meanwhile is seen on the next tick.
                        let edit = self.check_edit();
                        if let Err(stop) = self.apply_edit(edit).await {
                            return self.failure(stop);
                        }
                    }
                    if last_mint.elapsed() >= TOKEN_REFRESH {
                        last_mint = Instant::now();
                        if let Err(e) = self.mint_tokens() {
                            eprintln!("rampart up: warning: refreshing agent tokens: {e:#}");
                        }
                    }
                }
            }
        }
    }

    /// Check the folder after an edit: the new mesh if it is valid, else why it is refused
    /// (file, field, reason).
    fn check_edit(&self) -> Result<MeshFolder, String> {
        let mesh = MeshFolder::read(&self.dir)?;
        let policy = check_policy(&self.dir);
        if !policy.problems.is_empty() {
            return Err(format!(
                "{} policy problem(s):\n  {}",
                policy.problems.len(),
                policy.problems.join("\n  ")
            ));
        }
        check_addresses(&mesh)?;
        if mesh.workloads.is_empty() {
            return Err(
                "workloads.yaml: workloads: declares no workloads (to stop the whole mesh, stop `rampart up`)"
                    .to_string(),
            );
        }
        for w in &mesh.workloads {
            let sock = self.sds_path(w);
            if sock.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(format!(
                    "workloads.yaml: workload {}: its SDS socket path {} is longer than a Unix socket allows ({MAX_SOCKET_PATH} bytes); use shorter names or a shorter --state-dir",
                    w.key(),
                    sock.display()
                ));
            }
        }
        eprintln!(
            "rampart up: {} changed: valid ({} policy resource(s)); the proxies apply it live",
            self.dir.display(),
            policy.resources
        );
        Ok(mesh)
    }

    /// Carry out `plan(running, edit)`: stop removed workloads, restart changed ones, start
    /// added ones (printing their table lines). A workload that fails to start is stopped
    /// again and left out (saving the folder again retries it); the rest keeps running. `Err`
    /// only for what ends `up` (a signal, an unrelated death).
    async fn apply_edit(&mut self, edit: Result<MeshFolder, String>) -> Result<(), Stop> {
        let old = self.mesh.clone();
        let actions = plan(&old, edit.as_ref().map_err(String::as_str));
        let Ok(new) = edit else {
            for a in &actions {
                if let Action::Refuse(why) = a {
                    eprintln!(
                        "rampart up: invalid edit in {} refused: {why}\nrampart up: nothing was started or stopped; the running mesh keeps its last good config",
                        self.dir.display()
                    );
                }
            }
            return Ok(());
        };
        let find = |list: &[Workload], key: &str| list.iter().find(|w| w.key() == key).cloned();
        let mut failed: Vec<String> = Vec::new();
        for action in actions {
            match action {
                // Refusals only come with an invalid edit, handled above.
                Action::Refuse(_) => {}
                // The CA and the agents keep what they started with.
                Action::KeepSettings(notes) => eprintln!(
                    "rampart up: note: mesh.yaml {} changed: the CA and node agents keep the settings they started with until the next `rampart up`",
                    notes.join(", ")
                ),
                Action::Stop(key) => {
                    eprintln!(
                        "rampart up: workload {key} removed from workloads.yaml: stopping its app, proxy and node agent"
                    );
                    self.stop_workload(&key, &[Role::App, Role::Proxy, Role::Agent])
                        .await?;
                    if let Some(w) = find(&old.workloads, &key) {
                        let _ = std::fs::remove_file(self.token_path(&w));
                        let _ = std::fs::remove_file(self.sds_path(&w));
                    }
                    eprintln!("rampart up: workload {key} stopped");
                }
                Action::Restart {
                    workload,
                    roles,
                    why,
                } => {
                    let Some(w) = find(&new.workloads, &workload) else {
                        continue;
                    };
                    eprintln!("rampart up: workload {workload}: {why}");
                    self.stop_workload(&workload, &roles).await?;
                    if self.start_live(&w, &roles).await? {
                        eprintln!("rampart up: workload {workload} restarted");
                        self.print_table_line(&w);
                    } else {
                        failed.push(workload);
                    }
                }
                Action::ApplyLive(key) => {
                    // Who listens where now (the proxy moved its listeners itself).
                    if let Some(w) = find(&new.workloads, &key) {
                        self.print_table_line(&w);
                    }
                }
                Action::Start(key) => {
                    let Some(w) = find(&new.workloads, &key) else {
                        continue;
                    };
                    eprintln!(
                        "rampart up: workload {key} added to workloads.yaml: starting its node agent, app and proxy"
                    );
                    if self
                        .start_live(&w, &[Role::Agent, Role::App, Role::Proxy])
                        .await?
                    {
                        self.print_table_line(&w);
                        eprintln!(
                            "rampart up: workload {key} is running as {}",
                            w.spiffe_id(&old.trust_domain)
                        );
                    } else {
                        failed.push(key);
                    }
                }
            }
        }
        let in_force = new
            .workloads
            .into_iter()
            .filter(|w| !failed.contains(&w.key()))
            .collect();
        self.mesh = MeshFolder {
            workloads: in_force,
            ..old
        };
        Ok(())
    }

    fn print_table_line(&self, w: &Workload) {
        print!("{}", self.workload_table(std::slice::from_ref(w)));
        let _ = std::io::stdout().flush();
    }

    /// Start `roles` of `w` while the mesh runs; on a failure of its own, stop what was
    /// started, say why, and return `Ok(false)`.
    async fn start_live(&mut self, w: &Workload, roles: &[Role]) -> Result<bool, Stop> {
        let key = w.key();
        let r = async {
            if roles.contains(&Role::Agent) {
                self.mint_token(w)
                    .map_err(|e| Stop::Failed(format!("{e:#}")))?;
                self.start_workloads(std::slice::from_ref(w)).await
            } else {
                if roles.contains(&Role::App) {
                    self.spawn_app(w)?;
                    self.wait_apps(std::slice::from_ref(w)).await?;
                }
                if roles.contains(&Role::Proxy) {
                    self.spawn_proxy(w)?;
                    self.wait_proxies(std::slice::from_ref(w)).await?;
                }
                Ok(())
            }
        }
        .await;
        let why = match r {
            Ok(()) => return Ok(true),
            Err(Stop::Failed(why)) => why,
            Err(Stop::Died(i)) if self.children[i].workload.as_deref() == Some(key.as_str()) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let c = &self.children[i];
                let tail = c.tail.lock().map(|t| t.clone()).unwrap_or_default();
                format!(
                    "{} exited ({}); last lines of {}:\n  {}",
                    c.name,
                    c.exited
                        .map(|s| describe_status(&Ok(s)))
                        .unwrap_or_else(|| "unknown status".into()),
                    c.log.display(),
                    Vec::from(tail).join("\n  ")
                )
            }
            Err(other) => return Err(other),
        };
        eprintln!(
            "rampart up: workload {key} could not start: {why}\nrampart up: stopping what was started for {key}; the rest of the mesh keeps running; save workloads.yaml again to retry"
        );
        self.stop_workload(&key, &[Role::App, Role::Proxy, Role::Agent])
            .await?;
        Ok(false)
    }

    /// Stop the running children of workload `key` with these roles: apps and proxies
    /// first, then the agent; each SIGTERM, then SIGKILL after the drain timeout (as on
    /// Ctrl-C). They are marked retired first, so their exit is not taken for a crash.
    async fn stop_workload(&mut self, key: &str, roles: &[Role]) -> Result<(), Stop> {
        for stage in [&[Role::App, Role::Proxy][..], &[Role::Agent][..]] {
            let idx: Vec<usize> = (0..self.children.len())
                .filter(|&i| {
                    let c = &self.children[i];
                    c.exited.is_none()
                        && c.workload.as_deref() == Some(key)
                        && stage.contains(&c.role)
                        && roles.contains(&c.role)
                })
                .collect();
            if let Some(stop) = self.stop_children(&idx).await {
                return Err(stop);
            }
        }
        Ok(())
    }

    /// SIGTERM these children's process groups, wait up to the drain timeout, SIGKILL what
    /// is left. Returns what must end `up` if it happened meanwhile (a signal, or another
    /// child's death).
    async fn stop_children(&mut self, idx: &[usize]) -> Option<Stop> {
        if idx.is_empty() {
            return None;
        }
        let mut deferred: Option<Stop> = None;
        for &i in idx {
            self.children[i].retired = true;
            self.signal_group(i, rustix::process::Signal::TERM);
        }
        for (limit, kill) in [
            (self.args.drain_timeout, true),
            (Duration::from_secs(5), false),
        ] {
            let deadline = Instant::now() + limit;
            while idx.iter().any(|i| self.children[*i].exited.is_none()) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match tokio::time::timeout(left, self.rx.recv()).await {
                    Ok(Some(Event::Exit(j, st))) => {
                        self.children[j].exited =
                            Some(st.unwrap_or_else(|_| ExitStatus::from_raw(1 << 8)));
                        if !self.children[j].retired && deferred.is_none() {
                            deferred = Some(Stop::Died(j));
                        }
                    }
                    // Shutting down anyway: `shutdown` takes over (it stops these too).
                    Ok(Some(Event::Signal(s))) => return Some(Stop::Signal(s)),
                    Ok(None) | Err(_) => break,
                }
            }
            if kill {
                for &i in idx {
                    if self.children[i].exited.is_none() {
                        eprintln!(
                            "rampart up: {} did not stop within {}; killing it",
                            self.children[i].name,
                            humantime::format_duration(self.args.drain_timeout)
                        );
                        self.signal_group(i, rustix::process::Signal::KILL);
                    }
                }
            }
        }
        // Sweep what is left in each process group.
        for &i in idx {
            self.signal_group(i, rustix::process::Signal::KILL);
        }
        deferred
    }

    /// Stop in order: apps and proxies (drain deadline), agents, CA. A second signal kills.
    async fn shutdown(&mut self) {
        let stages: [(&[Role], &str); 3] = [
            (&[Role::App, Role::Proxy], "apps and proxies"),
            (&[Role::Agent], "node agents"),
            (&[Role::Ca], "CA"),
        ];
        let mut hurry = false;
        for (roles, what) in stages {
            let idx: Vec<usize> = roles.iter().flat_map(|r| self.running(*r)).collect();
            if idx.is_empty() {
                continue;
            }
            eprintln!("rampart up: stopping the {what}");
            for &i in &idx {
                self.signal_group(i, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + self.args.drain_timeout;
            while !hurry && idx.iter().any(|i| self.children[*i].exited.is_none()) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match tokio::time::timeout(left, self.rx.recv()).await {
                    Ok(Some(Event::Exit(i, st))) => {
                        self.children[i].exited =
                            Some(st.unwrap_or_else(|_| ExitStatus::from_raw(1 << 8)));
                    }
                    Ok(Some(Event::Signal(s))) => {
                        eprintln!("rampart up: {s} again: killing what is left");
                        hurry = true;
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            for &i in &idx {
                if self.children[i].exited.is_none() {
                    if !hurry {
                        eprintln!(
                            "rampart up: {} did not stop within {}; killing it",
                            self.children[i].name,
                            humantime::format_duration(self.args.drain_timeout)
                        );
                    }
                    self.signal_group(i, rustix::process::Signal::KILL);
                }
            }
            // Reap the killed ones (bounded), and sweep leftovers of each group.
            let reap_deadline = Instant::now() + Duration::from_secs(5);
            while idx.iter().any(|i| self.children[*i].exited.is_none()) {
                let left = reap_deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, self.rx.recv()).await {
                    Ok(Some(Event::Exit(i, st))) => {
                        self.children[i].exited =
                            Some(st.unwrap_or_else(|_| ExitStatus::from_raw(1 << 8)));
                    }
                    Ok(Some(Event::Signal(_))) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            for &i in &idx {
                self.signal_group(i, rustix::process::Signal::KILL);
            }
        }
        eprintln!("rampart up: stopped");
    }
}

async fn pump<R: tokio::io::AsyncRead + Unpin>(
    r: R,
    file: Arc<Mutex<std::fs::File>>,
    tail: Arc<Mutex<VecDeque<String>>>,
    echo: Option<String>,
    marker: Option<(&'static str, Arc<std::sync::atomic::AtomicBool>)>,
) {
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some((m, flag)) = &marker
            && line.contains(m)
        {
            flag.store(true, std::sync::atomic::Ordering::Release);
        }
        if let Ok(mut f) = file.lock() {
            let _ = writeln!(f, "{line}");
        }
        if let Some(name) = &echo {
            eprintln!("{name} | {line}");
        }
        if let Ok(mut t) = tail.lock() {
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line);
        }
    }
}

async fn tcp_ready(a: SocketAddr) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(a)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("{a}: {e}")),
        Err(_) => Err(format!("{a}: connect timed out")),
    }
}

/// A proxy is ready when its admin `/ready` answers 200 (or, without an admin address, when
/// its listeners accept connections).
async fn proxy_ready(w: &Workload) -> Result<(), String> {
    if let Some(admin) = w.admin {
        let (status, _) = super::admin_http::get(admin, "/ready", Duration::from_secs(1)).await?;
        if status == 200 {
            return Ok(());
        }
        return Err(format!("proxy {}: /ready answered {status}", w.key()));
    }
    for p in &w.ports {
        if let Some(a) = p.inbound {
            tcp_ready(a).await?;
        }
    }
    if let Some(a) = w.outbound {
        tcp_ready(a).await?;
    }
    Ok(())
}

/// Paths, sizes and modification times of everything below DIR (dot entries skipped, and
/// the state directory `skip`, should it be inside DIR: its logs change all the time).
fn folder_fingerprint(dir: &Path, skip: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    fn walk(dir: &Path, skip: &Path, out: &mut Vec<(PathBuf, u64, Option<SystemTime>)>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.filter_map(Result::ok) {
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let p = e.path();
            match e.metadata() {
                Ok(m) if m.is_dir() && p == skip => {}
                Ok(m) if m.is_dir() => walk(&p, skip, out),
                Ok(m) => out.push((p, m.len(), m.modified().ok())),
                Err(_) => {}
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, skip, &mut v);
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(workloads: &str, policy: Option<&str>) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("mesh.yaml"), "trustDomain: cluster.local\n").unwrap();
        std::fs::write(d.path().join("workloads.yaml"), workloads).unwrap();
        if let Some(p) = policy {
            std::fs::create_dir(d.path().join("policy")).unwrap();
            std::fs::write(d.path().join("policy/p.yaml"), p).unwrap();
        }
        d
    }

    #[test]
    fn duplicate_listen_addresses_are_refused() {
        let d = folder(
            "workloads:\n- name: a\n  namespace: ns1\n  ports: [{port: 80, app: 127.0.0.1:9000, inbound: 127.0.0.1:9001}]\n  proxy: {admin: 127.0.0.1:9000}\n",
            None,
        );
        let m = MeshFolder::read(d.path()).unwrap();
        let e = check_addresses(&m).unwrap_err();
        assert!(e.contains("127.0.0.1:9000"), "{e}");
        assert!(e.contains("ns1/a proxy.admin"), "{e}");
        let ca = folder(
            "workloads:\n- {name: a, namespace: ns1, proxy: {admin: 127.0.0.1:15012}}\n",
            None,
        );
        let e = check_addresses(&MeshFolder::read(ca.path()).unwrap()).unwrap_err();
        assert!(e.contains("the CA"), "{e}");
    }

    #[test]
    fn policy_check_skips_mesh_and_registry_and_reports_problems() {
        let good = folder(
            "workloads: []\n",
            Some(
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: PERMISSIVE}}\n",
            ),
        );
        let r = check_policy(good.path());
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.resources, 1);
        let bad = folder(
            "workloads: []\n",
            Some(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: ns1}\nspec: {action: DENY}\n",
            ),
        );
        let r = check_policy(bad.path());
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert!(r.problems[0].contains("p.yaml"), "{:?}", r.problems);
    }

    #[test]
    fn fingerprint_changes_on_edit() {
        let d = folder("workloads: []\n", None);
        let state = d.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let a = folder_fingerprint(d.path(), &state);
        std::fs::write(state.join("x.log"), "log line\n").unwrap();
        assert_eq!(
            a,
            folder_fingerprint(d.path(), &state),
            "the state dir is skipped"
        );
        std::fs::write(d.path().join("new.yaml"), "x: 1\n").unwrap();
        assert_ne!(a, folder_fingerprint(d.path(), &state));
    }
}
