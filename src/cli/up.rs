//! `rampart up DIR`: the whole mesh of a folder on this machine.
//!
//! Starts, as children of this process (each in its own process group, logs under
//! `<stateDir>/logs/`): the CA (`rampart ca`, trusting a JWT issuer `up` creates), one node
//! agent per workload (`rampart agent`, own SDS socket, own token), each workload's app (its
//! `command`, with `HTTP_PROXY` pointing at its proxy's outbound listener), and one proxy per
//! workload (`rampart proxy`). Waits for each stage to be ready, prints who listens where,
//! then supervises: a child that dies is reported (exit status, last log lines) and the rest
//! is stopped (exit 1); Ctrl-C, SIGTERM or SIGHUP stops apps and proxies first (drain
//! deadline), then the agents, then the CA, and exits 0. The `rampart` children hold a
//! lifeline: their stdin is a pipe only `up` writes to, so when `up` ends without stopping
//! them (`kill -9`), the kernel closes it and they stop themselves.
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

/// `eprintln!` that never panics: once the terminal hangs up (SIGHUP) it answers writes with
/// EIO, and `up` must still stop its children in order.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// `println!` that never panics (see `say!`).
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// `print!` that never panics (see `say!`).
macro_rules! out_nonl {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let mut o = std::io::stdout();
        let _ = write!(o, $($t)*);
        let _ = o.flush();
    }};
}

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
use rampart::up::{
    Action, CA_AUDIENCE, CA_READY_MARKER, DEFAULT_ISSUER, EditCheck, MAX_SOCKET_PATH, Role,
    StateLayout, TOKEN_REFRESH, TOKEN_TTL, agent_args, app_command, ca_args, changed_files,
    check_addresses, check_edit, check_free, check_policy, describe_status, folder_fingerprint,
    mesh_table, plan, proxy_args, read_demo_token, workload_table,
};
use rampart_certs::jwt::{JwtSigner, ServiceAccount};
use rampart_certs::{KeyAlgorithm, PrivateKey};
use rampart_mesh::{MeshFolder, WorkloadEntry as Workload};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::mpsc;

/// Log lines kept per child for the crash report.
const TAIL_LINES: usize = 20;

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
    /// `cacerts` plug-in directory for the CA: Istio's layout (ca-cert.pem, ca-key.pem,
    /// cert-chain.pem, root-cert.pem) or cert-manager's (tls.crt, tls.key, ca.crt).
    /// Default: `<stateDir>/cacerts`; with neither tls.crt nor ca-cert.pem there the CA makes
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
        let mesh = rampart::read_mesh(&self.dir).map_err(super::bad_input)?;
        // mesh.yaml's `rampart.compliancePolicy: pqc` reaches the CA and agents too (the
        // proxies read it themselves); a `pqc` flag is never loosened by the folder.
        if mesh.local.compliance_policy == rampart_certs::tls::CompliancePolicy::Pqc {
            rampart_certs::tls::set_compliance_policy(mesh.local.compliance_policy);
        }
        let policy = check_policy(&self.dir);
        if !policy.problems.is_empty() {
            return Err(super::bad_input(format!(
                "{} has invalid policy:\n  {}",
                self.dir.display(),
                policy.problems.join("\n  ")
            )));
        }
        // What loads but may not do what was meant (a DENY that closes every TCP port, a
        // CUSTOM provider mesh.yaml does not define): said before anything starts, and on
        // each edit that adds one.
        let warnings = rampart::mesh_warnings::mesh_warnings(&mesh);
        for w in &warnings {
            say!("rampart up: warning: {w}");
        }
        check_addresses(&mesh).map_err(super::bad_input)?;
        if mesh.registry.workloads.is_empty() {
            return Err(super::bad_input(format!(
                "{}/workloads.yaml declares no workloads",
                self.dir.display()
            )));
        }
        check_free(&mesh).map_err(super::bad_input)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let code = rt.block_on(Up::new(self, mesh, warnings)?.run())?;
        // Children are stopped by now; don't let a stuck log pump hold the exit.
        rt.shutdown_timeout(Duration::from_secs(1));
        Ok(code)
    }
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

/// The variables `rampart agent`, `rampart proxy` and `rampart ca` read settings from
/// (clap's `env =`): cleared for the children `up` starts, which get theirs from `up`.
const OWN_ENV: [&str; 6] = [
    "CA_ADDR",
    "SECRET_GRACE_PERIOD_RATIO",
    "OUTPUT_CERTS",
    "ISTIO_PROMETHEUS_ANNOTATIONS",
    "ISTIO_KUBE_APP_PROBERS",
    "COMPLIANCE_POLICY",
];

struct Up {
    args: UpArgs,
    mesh: MeshFolder,
    exe: PathBuf,
    dir: PathBuf,
    layout: StateLayout,
    children: Vec<Child>,
    tx: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
    signer: JwtSigner,
    demo_token: Option<(PathBuf, String)>,
    /// The warnings of the configuration running now, printed once each: an edit prints
    /// only the ones it adds.
    warned: std::collections::BTreeSet<String>,
}

impl Up {
    fn new(args: UpArgs, mesh: MeshFolder, warned: Vec<String>) -> anyhow::Result<Up> {
        let exe = std::env::current_exe().context("finding the rampart executable")?;
        let dir =
            std::fs::canonicalize(&args.dir).with_context(|| format!("{}", args.dir.display()))?;
        let state = args
            .state_dir
            .clone()
            .or_else(|| mesh.local.state_dir.clone())
            .unwrap_or_else(|| PathBuf::from("var/rampart"));
        std::fs::create_dir_all(&state)
            .with_context(|| format!("creating the state directory {}", state.display()))?;
        let layout = StateLayout::new(std::fs::canonicalize(&state)?);
        // Private (0700) whatever the umask: the SDS sockets' directory must be writable by
        // the agents' user alone (the agent refuses a group-writable one, which umask 002
        // would make), and tokens and the CA's state are secrets. Tightened on a rerun too.
        for sub in StateLayout::SUBDIRS {
            use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
            let d = layout.state.join(sub);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .with_context(|| format!("creating {}", d.display()))?;
            let mode = std::fs::symlink_metadata(&d)?.permissions().mode();
            if mode & 0o077 != 0 {
                std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))
                    .with_context(|| format!("making {} private", d.display()))?;
            }
        }
        if let Some(longest) = layout.too_long_socket(&mesh.registry.workloads) {
            return Err(super::bad_input(format!(
                "SDS socket path {} is longer than a Unix socket allows ({MAX_SOCKET_PATH} bytes); use a shorter --state-dir",
                longest.display()
            )));
        }
        // The key that signs agent tokens: made here, kept 0600 in the state dir.
        let key_path = layout.signing_key();
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
            &layout.jwks(),
            serde_json::to_string_pretty(&jwks)?.as_bytes(),
            0o644,
        )
        .context("writing the JWKS")?;
        let (tx, rx) = mpsc::unbounded_channel();
        Ok(Up {
            args,
            mesh,
            exe,
            dir,
            layout,
            children: Vec::new(),
            tx,
            rx,
            signer,
            demo_token: None,
            warned: warned.into_iter().collect(),
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
        let path = self.layout.demo_token();
        rampart_certs::write_file_atomic(&path, token.as_bytes(), 0o600)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Some((path, demo.issuer)))
    }

    fn mint_tokens(&self) -> anyhow::Result<()> {
        for w in &self.mesh.registry.workloads {
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
        rampart_certs::write_file_atomic(&self.layout.token_path(w), token.as_bytes(), 0o600)
            .with_context(|| format!("writing the token of {}", w.key()))
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
        let log = self.layout.logs().join(format!("{file}.log"));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let log_file = Arc::new(Mutex::new(log_file));
        // Every child gets a lifeline: its stdin is a pipe whose other end only this process
        // holds (in the task that waits for the child), closed by the kernel when `up` ends
        // however it ends. Our own processes then stop (`process::shutdown_signal`); an app
        // that is another program runs under `rampart app-guard`, which holds the lifeline
        // for it and stops the app's process group (the app itself gets no stdin, and not
        // the variable).
        let guarded: Vec<String>;
        let (program, args) = if program == self.exe.as_path() {
            (program, args)
        } else {
            guarded = ["app-guard".to_string(), "--".to_string()]
                .into_iter()
                .chain(std::iter::once(program.display().to_string()))
                .chain(args.iter().cloned())
                .collect();
            (self.exe.as_path(), guarded.as_slice())
        };
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        // Plain log lines in the log files.
        cmd.env("NO_COLOR", "1");
        // Our own children take their settings from `up`'s flags and the folder, never from
        // variables left in the operator's shell: `OUTPUT_CERTS` there would send every
        // agent's key into one directory (the last writer wins, one identity's expiry
        // deletes another's files), `CA_ADDR` would point them all elsewhere.
        if role != Role::App {
            for k in OWN_ENV {
                cmd.env_remove(k);
            }
        }
        // `rampart up --compliance-policy pqc` reaches the CA, agents and proxies it starts.
        if role != Role::App
            && rampart_certs::tls::compliance_policy() == rampart_certs::tls::CompliancePolicy::Pqc
        {
            cmd.env("COMPLIANCE_POLICY", "pqc");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.env(super::process::LIFELINE_ENV, "stdin");
        let mut child = cmd.spawn().with_context(|| {
            format!("{name}: starting {} {}", program.display(), args.join(" "))
        })?;
        let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        let lifeline = child.stdin.take();
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let echo = self.args.logs.then(|| name.clone());
        let said_ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let marker = ready_marker.map(|m| (m, said_ready.clone()));
        let mut pumps = Vec::with_capacity(2);
        if let Some(out) = child.stdout.take() {
            pumps.push(tokio::spawn(pump(
                out,
                log_file.clone(),
                tail.clone(),
                echo.clone(),
                marker.clone(),
            )));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(tokio::spawn(pump(
                err,
                log_file,
                tail.clone(),
                echo,
                marker,
            )));
        }
        let idx = self.children.len();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            drop(lifeline);
            // Its last words in the log (and the tail a death report shows) before the exit
            // is reported; not longer than a moment, since a process it left behind may hold
            // the pipes open.
            let _ =
                tokio::time::timeout(Duration::from_millis(500), futures::future::join_all(pumps))
                    .await;
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
            // A closed terminal (or a dropped SSH session) stops the mesh as Ctrl-C does,
            // unless SIGHUP was ignored when `up` started (`nohup rampart up &`).
            let mut hup = if sighup_ignored() {
                None
            } else {
                Some(signal(SignalKind::hangup()).context("SIGHUP handler")?)
            };
            let tx = self.tx.clone();
            tokio::spawn(async move {
                loop {
                    let s = tokio::select! {
                        _ = int.recv() => "SIGINT",
                        _ = term.recv() => "SIGTERM",
                        Some(_) = async {
                            match hup.as_mut() {
                                Some(h) => h.recv().await,
                                None => std::future::pending().await,
                            }
                        } => "SIGHUP",
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
                out_nonl!("{}", mesh_table(&self.mesh, &self.layout));
                if let Some((path, issuer)) = &self.demo_token {
                    out!(
                        "\ndemo end-user token (issuer {issuer}, valid {} h): {}",
                        TOKEN_TTL.as_secs() / 3600,
                        path.display()
                    );
                }
                let _ = std::io::stdout().flush();
                say!("rampart up: ready; Ctrl-C stops everything");
                self.supervise().await
            }
            Err(e) => self.failure(e),
        };
        if let Some(r) = reason {
            say!("{r}");
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
        out.push_str(
            "\nrampart up: stopping the rest (`up` restarts nothing; run it again: the state directory keeps the root and identities)",
        );
        out
    }

    async fn start(&mut self) -> Result<(), Stop> {
        self.mint_tokens()
            .map_err(|e| Stop::Failed(format!("{e:#}")))?;
        self.demo_token = self
            .mint_demo_token()
            .map_err(|e| Stop::Failed(format!("{e:#}")))?;
        // 1. The CA, trusting our issuer.
        let _ = std::fs::remove_file(self.layout.bundle());
        let cacerts = self
            .args
            .cacerts
            .clone()
            .unwrap_or_else(|| self.layout.default_cacerts());
        let ca_args = ca_args(&self.mesh, &self.layout, &cacerts, &self.args.issuer);
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
        let (bundle, ca) = (self.layout.bundle(), self.mesh.local.ca_address());
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
        let workloads = self.mesh.registry.workloads.clone();
        self.start_workloads(&workloads).await
    }

    /// Start the node agents, then the apps (so inbound proxies have something to forward
    /// to when they open), then the proxies of `workloads`, each stage waited for.
    async fn start_workloads(&mut self, workloads: &[Workload]) -> Result<(), Stop> {
        for w in workloads {
            self.spawn_agent(w)?;
        }
        let socks: Vec<PathBuf> = workloads.iter().map(|w| self.layout.sds_path(w)).collect();
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
        let _ = std::fs::remove_file(self.layout.sds_path(w));
        let a = agent_args(&self.mesh, &self.layout, w);
        let exe = self.exe.clone();
        self.spawn_for(w, format!("agent {}", w.key()), Role::Agent, &exe, &a, &[])
    }

    /// Start the app of `w`, if the registry gives it a command.
    fn spawn_app(&mut self, w: &Workload) -> Result<(), Stop> {
        let Some(app) = app_command(&self.mesh, w, &self.exe) else {
            return Ok(());
        };
        self.spawn_for(
            w,
            format!("app {}", w.key()),
            Role::App,
            &app.program,
            &app.args,
            &app.env,
        )
    }

    fn spawn_proxy(&mut self, w: &Workload) -> Result<(), Stop> {
        let a = proxy_args(&self.dir, &self.layout, w);
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
            .flat_map(|w| w.ports.iter().map(|p| p.app))
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

    /// Wait for a signal or a death; meanwhile apply folder edits and refresh tokens.
    async fn supervise(&mut self) -> (u8, Option<String>) {
        let mut fingerprint = folder_fingerprint(&self.dir, &self.layout.state);
        // The folder as of the last configuration taken (the start, or the last valid edit):
        // an edit is announced by what differs from it, refused edits in between included.
        let mut applied = fingerprint.clone();
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
                    let mut now = folder_fingerprint(&self.dir, &self.layout.state);
                    if now != fingerprint {
                        // Let a writer finish: act on a folder that holds still for 300 ms
                        // (a half-written registry can be valid and name fewer workloads).
                        for _ in 0..10 {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            let again = folder_fingerprint(&self.dir, &self.layout.state);
                            if again == now {
                                break;
                            }
                            now = again;
                        }
                        let changed = changed_files(&self.dir, &applied, &now);
                        fingerprint = now;
                        // An edit saved meanwhile is seen on the next tick.
                        let edit = self.check_edit(&changed);
                        if edit.is_ok() {
                            applied = fingerprint.clone();
                        }
                        if let Err(stop) = self.apply_edit(edit).await {
                            return self.failure(stop);
                        }
                    }
                    if last_mint.elapsed() >= TOKEN_REFRESH {
                        last_mint = Instant::now();
                        if let Err(e) = self.mint_tokens() {
                            say!("rampart up: warning: refreshing agent tokens: {e:#}");
                        }
                    }
                }
            }
        }
    }

    /// Check the folder after an edit of the files `changed`: the new mesh if it is valid,
    /// else why it is refused (file, field, reason).
    fn check_edit(&mut self, changed: &[String]) -> Result<MeshFolder, String> {
        let EditCheck {
            mesh,
            resources,
            warnings,
        } = check_edit(&self.dir, &self.layout)?;
        // What the edit touched, three names at most; a name is anything in the folder (an
        // app may write there), so it reaches the terminal escaped.
        let mut what = changed
            .iter()
            .take(3)
            .map(|c| c.escape_debug().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        if changed.len() > 3 {
            what.push_str(&format!(" and {} more", changed.len() - 3));
        }
        if what.is_empty() {
            what = self.dir.display().to_string();
        }
        say!(
            "rampart up: {what} changed: valid ({resources} policy resource(s)); the proxies apply it live"
        );
        // A policy that loads can still do what nobody meant (a DENY whose HTTP fields are
        // dropped on a TCP port denies every connection): the warnings this edit adds are as
        // loud as at start. Those already printed for the running configuration are not
        // repeated.
        for w in &warnings {
            if !self.warned.contains(w) {
                say!("rampart up: warning: {w}");
            }
        }
        self.warned = warnings.into_iter().collect();
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
                    say!(
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
                Action::KeepSettings(notes) => say!(
                    "rampart up: note: mesh.yaml {} changed: the CA and node agents keep the settings they started with until the next `rampart up`",
                    notes.join(", ")
                ),
                Action::Stop(key) => {
                    say!(
                        "rampart up: workload {key} removed from workloads.yaml: stopping its app, proxy and node agent"
                    );
                    self.stop_workload(&key, &[Role::App, Role::Proxy, Role::Agent])
                        .await?;
                    if let Some(w) = find(&old.registry.workloads, &key) {
                        let _ = std::fs::remove_file(self.layout.token_path(&w));
                        let _ = std::fs::remove_file(self.layout.sds_path(&w));
                    }
                    say!("rampart up: workload {key} stopped");
                }
                Action::Restart {
                    workload,
                    roles,
                    why,
                } => {
                    let Some(w) = find(&new.registry.workloads, &workload) else {
                        continue;
                    };
                    say!("rampart up: workload {workload}: {why}");
                    self.stop_workload(&workload, &roles).await?;
                    if self.start_live(&w, &roles).await? {
                        say!("rampart up: workload {workload} restarted");
                        self.print_table_line(&w);
                    } else {
                        failed.push(workload);
                    }
                }
                Action::ApplyLive(key) => {
                    // Who listens where now (the proxy moved its listeners itself).
                    if let Some(w) = find(&new.registry.workloads, &key) {
                        self.print_table_line(&w);
                    }
                }
                Action::Start(key) => {
                    let Some(w) = find(&new.registry.workloads, &key) else {
                        continue;
                    };
                    say!(
                        "rampart up: workload {key} added to workloads.yaml: starting its node agent, app and proxy"
                    );
                    if self
                        .start_live(&w, &[Role::Agent, Role::App, Role::Proxy])
                        .await?
                    {
                        self.print_table_line(&w);
                        say!(
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
            .registry
            .workloads
            .into_iter()
            .filter(|w| !failed.contains(&w.key()))
            .collect();
        self.mesh = MeshFolder {
            registry: rampart_mesh::Registry {
                workloads: in_force,
                services: new.registry.services,
            },
            ..old
        };
        Ok(())
    }

    fn print_table_line(&self, w: &Workload) {
        out_nonl!(
            "{}",
            workload_table(&self.mesh.trust_domain, std::slice::from_ref(w))
        );
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
        say!(
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
                        say!(
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
            say!("rampart up: stopping the {what}");
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
                        say!("rampart up: {s} again: killing what is left");
                        hurry = true;
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            for &i in &idx {
                if self.children[i].exited.is_none() {
                    if !hurry {
                        say!(
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
        say!("rampart up: stopped");
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
            say!("{name} | {line}");
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
    if let Some(admin) = w.proxy.admin {
        let (status, _) = super::admin_http::get(admin, "/ready", Duration::from_secs(1)).await?;
        if status == 200 {
            return Ok(());
        }
        return Err(format!("proxy {}: /ready answered {status}", w.key()));
    }
    for p in &w.ports {
        tcp_ready(p.inbound).await?;
    }
    if let Some(a) = w.proxy.outbound {
        tcp_ready(a).await?;
    }
    Ok(())
}

/// Whether SIGHUP was ignored when this process started (`nohup`), read from the `SigIgn`
/// mask of `/proc/self/status` (bit 0 is signal 1, SIGHUP).
fn sighup_ignored() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|st| {
            let mask = st.lines().find_map(|l| l.strip_prefix("SigIgn:"))?;
            u64::from_str_radix(mask.trim(), 16).ok()
        })
        .is_some_and(|m| m & 1 == 1)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// Every variable the commands `up` starts read a setting from is cleared for them:
    /// a new `env =` on a flag of `agent`, `proxy` or `ca` must join `OWN_ENV`.
    #[test]
    fn own_env_covers_every_variable_our_children_read() {
        let cli = super::super::Cli::command();
        let mut read = std::collections::BTreeSet::new();
        for name in ["agent", "proxy", "ca"] {
            let sub = cli
                .get_subcommands()
                .find(|c| c.get_name() == name)
                .unwrap_or_else(|| panic!("no `{name}` subcommand"));
            for arg in sub.get_arguments() {
                if let Some(env) = arg.get_env() {
                    read.insert(env.to_string_lossy().into_owned());
                }
            }
        }
        assert!(read.contains("OUTPUT_CERTS"), "{read:?}");
        for env in &read {
            assert!(
                super::OWN_ENV.contains(&env.as_str()),
                "{env} is read by a child of `up` but not cleared for it"
            );
        }
    }
}
