//! `rampart bench`: load generators for what wrk cannot drive.
//!
//! - `rampart bench tls`: full mTLS handshakes against a target (a Rampart proxy's inbound
//!   listener, an Envoy sidecar, or `rampart bench tls-server`), many at once, each connection
//!   closed once its handshake is done. Reports handshakes per second, latency, and the CPU
//!   that the processes named by `--pid` spent per handshake, read from `/proc/PID/stat`, so
//!   the load generator's own share (it does a client handshake for every server one) does
//!   not blur the figure.
//! - `rampart bench tls-server`: the floor to compare against: a bare rustls server with the
//!   same TLS configuration Rampart's proxies use (TLS 1.3, the same key exchange groups, a
//!   required SPIFFE client certificate) and nothing else: it accepts, handshakes, and waits
//!   for the client to close.
//!
//! Both take the CA from a directory holding `root-cert.pem` and `root-key.pem` (what
//! `rampart certs root --out DIR` writes, and what `benches/mtls-pair/run.sh --standin`
//! reads as `MTLS_PAIR_CA`) and mint their own leaves under it, so they are trusted by
//! proxies configured from the same root. Session resumption is off on both sides, as it is in
//! the proxies: every connection is a full handshake.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use rampart_certs::tls::{self, ClientAuth, ServerAuth};
use rampart_certs::{
    CertificateAuthority, CertificateDer, KeyAlgorithm, PrivateKey, SpiffeId, TrustBundle,
    TrustDomainPolicy,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Load generators for benchmarks.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum BenchCommand {
    /// Full mTLS handshakes against a target, as many at once as `--connections`.
    Tls(TlsArgs),
    /// A bare rustls mTLS server (Rampart's TLS configuration, nothing else): the floor.
    TlsServer(TlsServerArgs),
}

impl BenchCommand {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            BenchCommand::Tls(a) => a.run(),
            BenchCommand::TlsServer(a) => a.run(),
        }
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct TlsArgs {
    #[command(flatten)]
    compliance: super::ComplianceArgs,
    /// Address to connect to.
    #[arg(long)]
    target: SocketAddr,
    /// CA directory (`root-cert.pem`, `root-key.pem`) the client leaf is minted from and the
    /// server is verified against.
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    /// Roots (PEM) to verify the server against, instead of the `--ca` root.
    #[arg(long, value_name = "FILE")]
    trust: Option<PathBuf>,
    /// The client's identity.
    #[arg(long, default_value = "spiffe://cluster.local/ns/bench/sa/client")]
    client_id: String,
    /// The identity the server must present.
    #[arg(long, default_value = "spiffe://cluster.local/ns/bench/sa/backend")]
    server_id: String,
    /// SNI to send (Istio's form for a sidecar's inbound).
    #[arg(
        long,
        default_value = "outbound_.8080_._.backend.bench.svc.cluster.local"
    )]
    sni: String,
    /// ALPN protocols to offer, comma-separated.
    #[arg(long, default_value = "istio-http/1.1,istio")]
    alpn: String,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Run time (after `--warmup`).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Handshakes before measuring starts.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Processes whose CPU per handshake is reported (repeatable).
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// Worker threads of the load generator.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

#[derive(Debug, clap::Args)]
pub(crate) struct TlsServerArgs {
    #[command(flatten)]
    compliance: super::ComplianceArgs,
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:26443")]
    listen: SocketAddr,
    /// CA directory (`root-cert.pem`, `root-key.pem`) the server leaf is minted from and
    /// client certificates are verified against.
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    /// The server's identity.
    #[arg(long, default_value = "spiffe://cluster.local/ns/bench/sa/backend")]
    id: String,
    /// Worker threads (the proxy's default is one).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// A root loaded from a CA directory, and leaves minted under it.
struct Pki {
    ca: CertificateAuthority,
}

impl Pki {
    fn load(dir: &Path) -> anyhow::Result<Pki> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).with_context(|| format!("--ca: read {}", p.display()))
        };
        let cert = rampart_certs::parse_certs_pem(&read("root-cert.pem")?)
            .map_err(|e| super::bad_input(format!("--ca: root-cert.pem: {e}")))?
            .into_iter()
            .next()
            .ok_or_else(|| super::bad_input("--ca: root-cert.pem holds no certificate"))?;
        let key = PrivateKey::from_pem(&read("root-key.pem")?)
            .map_err(|e| super::bad_input(format!("--ca: root-key.pem: {e}")))?;
        let ca = CertificateAuthority::new(cert, key, Vec::new())
            .map_err(|e| super::bad_input(format!("--ca: {e}")))?;
        Ok(Pki { ca })
    }

    fn bundle(&self) -> anyhow::Result<TrustBundle> {
        Ok(TrustBundle::from_der(vec![self.ca.root().clone()])?)
    }

    fn leaf(&self, id: &SpiffeId) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKey)> {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256)?;
        let now = SystemTime::now() - Duration::from_secs(60);
        let leaf = self.ca.issue_workload(
            &key.public_key_spki_der(),
            id,
            Duration::from_secs(24 * 3600),
            now,
        )?;
        let mut chain = vec![leaf];
        chain.extend(self.ca.chain_to_root().into_iter().skip(1));
        Ok((chain, key))
    }
}

fn parse_id(flag: &str, s: &str) -> anyhow::Result<SpiffeId> {
    SpiffeId::parse(s).map_err(|e| super::bad_input(format!("{flag} {s:?}: {e}")))
}

/// User and system CPU time of a process so far (`/proc/PID/stat` fields 14 and 15, in
/// USER_HZ ticks, which Linux fixes at 100 per second for this interface).
pub(crate) fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("{path}: no ')'"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so fields 14 and 15 are at 11 and 12.
    let tick = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{path}: field {}", i + 3))
    };
    Ok(Duration::from_millis((tick(11)? + tick(12)?) * 10))
}

impl TlsArgs {
    fn run(self) -> anyhow::Result<ExitCode> {
        self.compliance.apply();
        if self.connections == 0 {
            return Err(super::bad_input("--connections must be at least 1"));
        }
        super::process::raise_nofile_limit();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.threads.max(1))
            .enable_all()
            .build()
            .context("start tokio runtime")?;
        rt.block_on(self.run_async())
    }

    async fn run_async(self) -> anyhow::Result<ExitCode> {
        let pki = Pki::load(&self.ca)?;
        let client_id = parse_id("--client-id", &self.client_id)?;
        let server_id = parse_id("--server-id", &self.server_id)?;
        let (chain, key) = pki.leaf(&client_id)?;
        let bundle = match &self.trust {
            Some(path) => TrustBundle::from_pem(
                &std::fs::read_to_string(path)
                    .with_context(|| format!("--trust: read {}", path.display()))?,
            )
            .map_err(|e| super::bad_input(format!("--trust {}: {e}", path.display())))?,
            None => pki.bundle()?,
        };
        let mut config = tls::client_config(
            ServerAuth::Spiffe {
                bundle,
                trust_domains: TrustDomainPolicy::local(server_id.trust_domain().clone()),
                expected: vec![server_id],
            },
            Some((chain, &key)),
        )?;
        config.alpn_protocols = self
            .alpn
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.as_bytes().to_vec())
            .collect();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let sni = rustls::pki_types::ServerName::try_from(self.sni.clone())
            .map_err(|e| super::bad_input(format!("--sni {:?}: {e}", self.sni)))?;

        let measuring = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
        let mut tasks = Vec::with_capacity(self.connections);
        for _ in 0..self.connections {
            let (connector, sni, target) = (connector.clone(), sni.clone(), self.target);
            let (measuring, stop, done, errors, first_error) = (
                measuring.clone(),
                stop.clone(),
                done.clone(),
                errors.clone(),
                first_error.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let r = handshake(&connector, &sni, target).await;
                    let counted =
                        measuring.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed);
                    match r {
                        Ok(()) if counted => {
                            done.fetch_add(1, Ordering::Relaxed);
                            latencies.push(t.elapsed());
                        }
                        Ok(()) => {}
                        Err(e) => {
                            if counted {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                            first_error
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                            // A refused target would otherwise spin.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                latencies
            }));
        }
        tokio::time::sleep(self.warmup).await;
        let cpu0: Vec<Duration> = self
            .pids
            .iter()
            .map(|p| process_cpu(*p))
            .collect::<Result<_, _>>()?;
        let own0 = process_cpu(std::process::id())?;
        let t0 = Instant::now();
        measuring.store(true, Ordering::Relaxed);
        tokio::time::sleep(self.duration).await;
        stop.store(true, Ordering::Relaxed);
        let elapsed = t0.elapsed();
        let cpu1: Vec<Duration> = self
            .pids
            .iter()
            .map(|p| process_cpu(*p))
            .collect::<Result<_, _>>()?;
        let own1 = process_cpu(std::process::id())?;
        let mut latencies = Vec::new();
        for t in tasks {
            latencies.extend(t.await.unwrap_or_default());
        }
        latencies.sort_unstable();
        let n = done.load(Ordering::Relaxed);
        let errors = errors.load(Ordering::Relaxed);
        let pct = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        println!(
            "{} handshakes in {:.2}s: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, errors {}, {} in flight",
            n,
            elapsed.as_secs_f64(),
            n as f64 / elapsed.as_secs_f64(),
            pct(0.50).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            errors,
            self.connections
        );
        let per = |d: Duration| {
            if n == 0 {
                f64::NAN
            } else {
                d.as_secs_f64() * 1e6 / n as f64
            }
        };
        for ((pid, a), b) in self.pids.iter().zip(&cpu0).zip(&cpu1) {
            let used = b.saturating_sub(*a);
            println!(
                "pid {pid}: {:.2}s CPU = {:.1} us per handshake ({:.0} handshakes per CPU-second)",
                used.as_secs_f64(),
                per(used),
                n as f64 / used.as_secs_f64().max(1e-9)
            );
        }
        let own = own1.saturating_sub(own0);
        println!(
            "load generator: {:.2}s CPU = {:.1} us per handshake",
            own.as_secs_f64(),
            per(own)
        );
        if let Some(e) = first_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            eprintln!("rampart bench tls: first error: {e}");
        }
        Ok(if n > 0 && errors == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
}

/// One full handshake, then a clean close (close_notify, FIN).
async fn handshake(
    connector: &tokio_rustls::TlsConnector,
    sni: &rustls::pki_types::ServerName<'static>,
    target: SocketAddr,
) -> Result<(), String> {
    let tcp = tokio::net::TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect {target}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let mut tls = connector
        .connect(sni.clone(), tcp)
        .await
        .map_err(|e| format!("handshake with {target}: {e}"))?;
    // The handshake is done; a server that refuses the client certificate says so in its
    // first flight after it, so read until it closes or a short wait passes.
    tls.shutdown()
        .await
        .map_err(|e| format!("close to {target}: {e}"))?;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(2), tls.read(&mut buf)).await {
        Ok(Ok(_)) | Err(_) => Ok(()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(()),
        Ok(Err(e)) => Err(format!("after the handshake with {target}: {e}")),
    }
}

impl TlsServerArgs {
    fn run(self) -> anyhow::Result<ExitCode> {
        self.compliance.apply();
        super::process::raise_nofile_limit();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.threads.max(1))
            .enable_all()
            .build()
            .context("start tokio runtime")?;
        rt.block_on(self.run_async())
    }

    async fn run_async(self) -> anyhow::Result<ExitCode> {
        let pki = Pki::load(&self.ca)?;
        let id = parse_id("--id", &self.id)?;
        let (chain, key) = pki.leaf(&id)?;
        let mut config = tls::server_config(
            chain,
            &key,
            ClientAuth::Required {
                bundle: pki.bundle()?,
                trust_domains: TrustDomainPolicy::local(id.trust_domain().clone()),
            },
        )?;
        config.alpn_protocols = ["istio-http/1.1", "istio", "http/1.1"]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .with_context(|| format!("listen on {}", self.listen))?;
        eprintln!(
            "rampart bench tls-server: {id} on {} (pid {})",
            listener.local_addr()?,
            std::process::id()
        );
        let serve = async {
            loop {
                let (tcp, _) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = [0u8; 256];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                    let _ = tls.shutdown().await;
                });
            }
        };
        tokio::select! {
            () = serve => {}
            () = super::process::shutdown_signal() => {}
        }
        Ok(ExitCode::SUCCESS)
    }
}
