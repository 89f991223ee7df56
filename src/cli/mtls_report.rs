//! `rampart mtls-report --mesh DIR`: is it safe to switch PeerAuthentication to STRICT?
//!
//! Asks every workload proxy of the folder for its `GET /mtls` counters (plaintext vs mutual
//! TLS connections and requests per inbound port, since start and over a recent window, and
//! who sent plaintext), and gives a verdict per workload: "safe to switch to STRICT", or the
//! plaintext sources that would break. An unreachable proxy is an error, never a pass.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
// What a proxy says (GET /mtls): the proxy serializes the same types.
use rampart_mesh::mtls::{MtlsReport as ProxyMtls, PlaintextSource as Source, PortMtls};
use serde::Serialize;

pub(crate) const AFTER_HELP: &str = "\
Exit status (the first that applies):
  1  a proxy could not be asked (unreachable, bad answer): never counted as a pass
  4  a STRICT port refuses plaintext clients: they are cut off now (fix them or roll back)
  3  a port that is not STRICT receives plaintext: its sources are listed
  5  no plaintext seen, but a port that is not STRICT has seen no traffic at all
  0  every port carries mutual TLS only, or is STRICT and refuses nobody
  2  bad input: the command line, or a workloads.yaml that cannot be read or is refused

JSON: `safe_to_switch_to_strict` is true exactly when the exit status is 0; each workload
has its `verdict` (safe, plaintext, refused, no_traffic, error) and each port its own.

The proxies count since they started and over a recent window (--window chooses which one the
verdict is based on; since-start is the cautious default). No plaintext seen on a port with no
traffic is no proof that no client sends plaintext: hence 5. Only workloads.yaml is needed to
find the proxies: a refused edit elsewhere in the folder is warned about, and the report shows
what the proxies serve (their last good configuration).";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

/// Which counters the verdict is based on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Window {
    /// Everything since the proxy started.
    SinceStart,
    /// The proxy's recent window only (e.g. after fixing a client).
    Recent,
}

#[derive(Debug, clap::Args)]
pub(crate) struct MtlsReportArgs {
    /// The mesh folder (mesh.yaml, workloads.yaml): where each proxy's admin listens.
    #[arg(long, value_name = "DIR")]
    mesh: PathBuf,
    /// Only these workloads (NAMESPACE/NAME, repeatable).
    #[arg(long, value_name = "NS/NAME")]
    workload: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
    /// Counters the verdict is based on.
    #[arg(long, value_enum, default_value = "since-start")]
    window: Window,
    /// How long to wait for each proxy's answer.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

// ---- verdicts ----

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub(crate) enum PortVerdict {
    /// Only mutual TLS seen: switching to STRICT breaks nobody we saw.
    Safe,
    /// Nothing seen at all in the judged window.
    NoTraffic,
    /// The port is STRICT already (plaintext attempts, if any, are being refused, from
    /// `sources`).
    AlreadyStrict {
        refused_plaintext_connections: u64,
        sources: Vec<Source>,
    },
    /// Plaintext arrived: these clients would break under STRICT.
    Plaintext { sources: Vec<Source> },
}

impl PortVerdict {
    fn blocks_strict(&self) -> bool {
        matches!(self, PortVerdict::Plaintext { .. })
    }

    /// A STRICT port that refused plaintext in the judged window: clients are cut off.
    fn refuses(&self) -> bool {
        matches!(self, PortVerdict::AlreadyStrict { refused_plaintext_connections, sources }
            if *refused_plaintext_connections > 0 || !sources.is_empty())
    }
}

/// The verdict for one port from its counters.
pub(crate) fn port_verdict(p: &PortMtls, window: Window, now_unix: u64) -> PortVerdict {
    let counters = match window {
        Window::SinceStart => p.since_start,
        Window::Recent => p.recent.counters,
    };
    let oldest = match window {
        Window::SinceStart => 0,
        Window::Recent => now_unix.saturating_sub(p.recent.window_seconds),
    };
    if p.mode.eq_ignore_ascii_case("STRICT") {
        // Who is being refused: the clients to fix (or the reason to roll back).
        let mut sources: Vec<Source> = p
            .plaintext_sources
            .iter()
            .filter(|s| s.refused > 0 && s.last_seen_unix >= oldest)
            .cloned()
            .collect();
        sources.sort_by(|a, b| b.refused.cmp(&a.refused).then(a.ip.cmp(&b.ip)));
        return PortVerdict::AlreadyStrict {
            refused_plaintext_connections: counters.plaintext_refused,
            sources,
        };
    }
    if counters.plaintext() {
        let mut sources: Vec<Source> = p
            .plaintext_sources
            .iter()
            .filter(|s| s.last_seen_unix >= oldest)
            .cloned()
            .collect();
        sources.sort_by(|a, b| {
            b.requests
                .cmp(&a.requests)
                .then(b.connections.cmp(&a.connections))
                .then(a.ip.cmp(&b.ip))
        });
        return PortVerdict::Plaintext { sources };
    }
    if counters.any() {
        PortVerdict::Safe
    } else {
        PortVerdict::NoTraffic
    }
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct WorkloadReport {
    pub(crate) workload: String,
    pub(crate) admin: Option<SocketAddr>,
    /// `safe`, `plaintext` (a non-STRICT port serves plaintext), `refused` (a STRICT port
    /// refuses plaintext clients), `no_traffic` (no plaintext, but a port that is not STRICT
    /// has seen nothing) or `error`.
    pub(crate) verdict: &'static str,
    pub(crate) summary: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) errors: Vec<String>,
    pub(crate) ports: Vec<PortReport>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct PortReport {
    #[serde(flatten)]
    pub(crate) seen: PortMtls,
    pub(crate) result: PortVerdict,
}

/// Judge one workload from its proxy's answer (or the error asking it), given the ports the
/// registry declares for it.
pub(crate) fn judge(
    workload: &str,
    admin: Option<SocketAddr>,
    declared_ports: &[u16],
    answer: Result<ProxyMtls, String>,
    window: Window,
    now_unix: u64,
) -> WorkloadReport {
    let mut errors = Vec::new();
    let mut ports = Vec::new();
    match answer {
        Err(e) => errors.push(e),
        Ok(a) => {
            if a.workload != workload {
                errors.push(format!(
                    "the proxy at {} reports for workload {:?}, not {workload:?}",
                    admin.map(|a| a.to_string()).unwrap_or_default(),
                    a.workload
                ));
            }
            for d in declared_ports {
                if !a.ports.iter().any(|p| p.port == *d) {
                    errors.push(format!(
                        "port {d} is declared in workloads.yaml but missing from the proxy's report"
                    ));
                }
            }
            for p in a.ports {
                let result = port_verdict(&p, window, now_unix);
                ports.push(PortReport { seen: p, result });
            }
        }
    }
    // Who STRICT refuses now, named whatever else the workload's ports say: in the middle of
    // a rollout one port is STRICT while another still serves plaintext.
    let refused: Vec<String> = ports
        .iter()
        .filter_map(|p| match &p.result {
            PortVerdict::AlreadyStrict { sources, .. } if p.result.refuses() => Some(format!(
                "port {} from {}",
                p.seen.port,
                describe_sources(sources, now_unix)
            )),
            _ => None,
        })
        .collect();
    let refused_note = format!(
        "plaintext REFUSED on {} (those clients are cut off: fix them or roll back)",
        refused.join("; ")
    );
    let (verdict, summary) = if !errors.is_empty() {
        ("error", format!("error: {}", errors.join("; ")))
    } else if !refused.is_empty() {
        let scope = if ports
            .iter()
            .all(|p| matches!(p.result, PortVerdict::AlreadyStrict { .. }))
        {
            "already STRICT on every port".to_string()
        } else {
            let plaintext = plaintext_ports(&ports, now_unix);
            if plaintext.is_empty() {
                "STRICT on some ports".to_string()
            } else {
                format!(
                    "STRICT on some ports, NOT safe on others: plaintext on {}",
                    plaintext.join("; ")
                )
            }
        };
        ("refused", format!("{scope}; {refused_note}"))
    } else if ports.iter().any(|p| p.result.blocks_strict()) {
        (
            "plaintext",
            format!(
                "NOT safe to switch to STRICT: plaintext on {}",
                plaintext_ports(&ports, now_unix).join("; ")
            ),
        )
    } else if ports
        .iter()
        .all(|p| matches!(p.result, PortVerdict::AlreadyStrict { .. }))
        && !ports.is_empty()
    {
        ("safe", "already STRICT on every port".to_string())
    } else if ports
        .iter()
        .any(|p| matches!(p.result, PortVerdict::NoTraffic))
    {
        let quiet: Vec<String> = ports
            .iter()
            .filter(|p| matches!(p.result, PortVerdict::NoTraffic))
            .map(|p| p.seen.port.to_string())
            .collect();
        (
            "no_traffic",
            format!(
                "no plaintext seen, but no traffic at all yet on port {}: silence is no proof",
                quiet.join(", ")
            ),
        )
    } else {
        ("safe", "safe to switch to STRICT".to_string())
    };
    WorkloadReport {
        workload: workload.to_string(),
        admin,
        verdict,
        summary,
        errors,
        ports,
    }
}

/// "port P from SOURCES" for each port serving plaintext that blocks STRICT.
fn plaintext_ports(ports: &[PortReport], now_unix: u64) -> Vec<String> {
    ports
        .iter()
        .filter_map(|p| match &p.result {
            PortVerdict::Plaintext { sources } => Some(format!(
                "port {} from {}",
                p.seen.port,
                describe_sources(sources, now_unix)
            )),
            _ => None,
        })
        .collect()
}

fn describe_sources(sources: &[Source], now_unix: u64) -> String {
    if sources.is_empty() {
        return "unrecorded source(s)".to_string();
    }
    sources
        .iter()
        .map(|s| {
            let refused = if s.refused > 0 {
                format!(", {} refused by STRICT", s.refused)
            } else {
                String::new()
            };
            format!(
                "{} ({}, {}{refused}, last seen {}s ago)",
                s.ip,
                count(s.connections, "connection"),
                count(s.requests, "request"),
                now_unix.saturating_sub(s.last_seen_unix)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// "1 connection", "2 connections".
fn count(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// The exit status for a set of reports, most urgent first: errors (1), then plaintext
/// refused by a STRICT port (4: clients are cut off now, the roll-back signal, which a port
/// still serving plaintext elsewhere must not hide in the middle of a rollout), then
/// plaintext on a port that is not STRICT (3), then ports with no traffic to judge (5); 0
/// when every port carries mutual TLS only or is STRICT and refuses nobody.
pub(crate) fn exit_code(reports: &[WorkloadReport]) -> u8 {
    let any = |v: &str| reports.iter().any(|r| r.verdict == v);
    let plaintext = reports
        .iter()
        .any(|r| r.ports.iter().any(|p| p.result.blocks_strict()));
    if any("error") {
        1
    } else if any("refused") {
        4
    } else if plaintext {
        3
    } else if any("no_traffic") {
        5
    } else {
        0
    }
}

pub(crate) fn render_text(reports: &[WorkloadReport], window: Window) -> String {
    let mut rows: Vec<[String; 8]> = vec![[
        "WORKLOAD".into(),
        "PORT".into(),
        "PROTOCOL".into(),
        "MODE".into(),
        "MTLS conn/req".into(),
        "PLAINTEXT conn/req".into(),
        "RECENT mtls/plain req".into(),
        "PORT VERDICT".into(),
    ]];
    for r in reports {
        if r.ports.is_empty() {
            rows.push([
                r.workload.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                r.verdict.into(),
            ]);
        }
        for p in &r.ports {
            let s = &p.seen;
            rows.push([
                r.workload.clone(),
                s.port.to_string(),
                s.protocol.clone(),
                s.mode.clone(),
                format!(
                    "{}/{}",
                    s.since_start.mtls_connections, s.since_start.mtls_requests
                ),
                format!(
                    "{}/{}",
                    s.since_start.plaintext_connections, s.since_start.plaintext_requests
                ),
                format!(
                    "{}/{} ({}s)",
                    s.recent.counters.mtls_requests,
                    s.recent.counters.plaintext_requests,
                    s.recent.window_seconds
                ),
                match &p.result {
                    PortVerdict::Safe => "mTLS only".into(),
                    PortVerdict::NoTraffic => "no traffic".into(),
                    r @ PortVerdict::AlreadyStrict {
                        refused_plaintext_connections: 0,
                        ..
                    } => {
                        if r.refuses() {
                            "STRICT (plaintext refused)".into()
                        } else {
                            "STRICT".into()
                        }
                    }
                    PortVerdict::AlreadyStrict {
                        refused_plaintext_connections: n,
                        ..
                    } => format!("STRICT ({n} plaintext refused)"),
                    PortVerdict::Plaintext { .. } => "PLAINTEXT".into(),
                },
            ]);
        }
    }
    let mut out = rampart::align_columns(&rows);
    out.push('\n');
    out.push_str(&format!(
        "verdict (based on {}):\n",
        match window {
            Window::SinceStart => "counters since each proxy started",
            Window::Recent => "each proxy's recent window",
        }
    ));
    for r in reports {
        out.push_str(&format!("  {}: {}\n", r.workload, r.summary));
    }
    out
}

impl MtlsReportArgs {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        // Only the registry is needed to find the proxies. A refused edit elsewhere in the
        // folder (a policy typo) must not stop the report: the proxies keep serving their
        // last good configuration, and the report reads what they serve. Say so, though.
        let registry = rampart_mesh::MeshFolder::load_registry(&self.mesh).map_err(|problems| {
            super::bad_input(
                problems
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n  "),
            )
        })?;
        if let Err(problems) = rampart_mesh::MeshFolder::load(&self.mesh) {
            eprintln!(
                "rampart mtls-report: warning: {} does not load ({} problem(s), first: {}); running proxies keep their last good configuration, and this report shows what they serve",
                self.mesh.display(),
                problems.len(),
                problems
                    .first()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            );
        }
        let mut selected = Vec::new();
        for want in &self.workload {
            if !registry.workloads.iter().any(|w| &w.key() == want) {
                return Err(super::bad_input(format!(
                    "--workload {want}: not in {}/workloads.yaml",
                    self.mesh.display()
                )));
            }
        }
        for w in &registry.workloads {
            if self.workload.is_empty() || self.workload.contains(&w.key()) {
                selected.push(w.clone());
            }
        }
        if selected.is_empty() {
            return Err(super::bad_input(format!(
                "{}/workloads.yaml declares no workloads",
                self.mesh.display()
            )));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let now = rampart_certs::timestamp::unix_secs_u64(SystemTime::now());
        let timeout = self.timeout;
        let reports: Vec<WorkloadReport> = rt.block_on(async {
            let asks = selected.iter().map(|w| async move {
                let declared: Vec<u16> = w.ports.iter().map(|p| p.port).collect();
                let answer = match w.proxy.admin {
                    None => Err("no proxy.admin address in workloads.yaml".to_string()),
                    Some(a) => fetch(a, timeout).await,
                };
                judge(&w.key(), w.proxy.admin, &declared, answer, self.window, now)
            });
            futures::future::join_all(asks).await
        });
        let text = match self.output {
            Output::Json => {
                let code = exit_code(&reports);
                let v = serde_json::json!({
                    "window": self.window,
                    "safe_to_switch_to_strict": code == 0,
                    "workloads": reports,
                });
                serde_json::to_string_pretty(&v)? + "\n"
            }
            Output::Text => render_text(&reports, self.window),
        };
        // A reader that stops early (`| head`) is no error of the report's: the exit code
        // still says what it found.
        use std::io::Write as _;
        let _ = std::io::stdout().lock().write_all(text.as_bytes());
        Ok(ExitCode::from(exit_code(&reports)))
    }
}

async fn fetch(admin: SocketAddr, timeout: Duration) -> Result<ProxyMtls, String> {
    let (status, body) = super::admin_http::get(admin, "/mtls", timeout).await?;
    if status != 200 {
        return Err(format!(
            "GET http://{admin}/mtls: status {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)]).trim()
        ));
    }
    serde_json::from_slice(&body)
        .map_err(|e| format!("GET http://{admin}/mtls: not the expected JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use rampart_mesh::mtls::MtlsCounters as Counters;

    use super::*;

    const NOW: u64 = 1_790_000_100;

    fn fixture(json: &str) -> ProxyMtls {
        serde_json::from_str(json).unwrap()
    }

    /// The example from the mesh-folder contract: PERMISSIVE, 2 plaintext connections.
    const CONTRACT: &str = r#"{"workload": "api/backend", "ports": [{"port": 8080, "protocol": "http", "mode": "PERMISSIVE",
      "since_start": {"mtls_connections": 10, "plaintext_connections": 2, "mtls_requests": 50, "plaintext_requests": 3},
      "recent": {"window_seconds": 300, "mtls_connections": 1, "plaintext_connections": 0, "mtls_requests": 4, "plaintext_requests": 0},
      "plaintext_sources": [{"ip": "127.0.0.1", "connections": 2, "requests": 3, "last_seen_unix": 1790000000}]}]}"#;

    const ALL_MTLS: &str = r#"{"workload": "api/backend", "ports": [
      {"port": 8080, "protocol": "http", "mode": "PERMISSIVE",
       "since_start": {"mtls_connections": 10, "plaintext_connections": 0, "mtls_requests": 50, "plaintext_requests": 0},
       "recent": {"window_seconds": 300, "mtls_connections": 1, "plaintext_connections": 0, "mtls_requests": 4, "plaintext_requests": 0},
       "plaintext_sources": []},
      {"port": 9090, "protocol": "tcp", "mode": "STRICT",
       "since_start": {"mtls_connections": 3, "plaintext_connections": 1, "mtls_requests": 0, "plaintext_requests": 0, "plaintext_refused": 2},
       "recent": {"window_seconds": 300, "mtls_connections": 0, "plaintext_connections": 0, "mtls_requests": 0, "plaintext_requests": 0},
       "plaintext_sources": [{"ip": "10.0.0.7", "connections": 1, "requests": 0, "refused": 2, "last_seen_unix": 1789999990}]}]}"#;

    #[test]
    fn plaintext_since_start_blocks_strict_and_names_the_source() {
        let r = judge(
            "api/backend",
            None,
            &[8080],
            Ok(fixture(CONTRACT)),
            Window::SinceStart,
            NOW,
        );
        assert_eq!(r.verdict, "plaintext");
        assert_eq!(exit_code(std::slice::from_ref(&r)), 3);
        match &r.ports[0].result {
            PortVerdict::Plaintext { sources } => {
                assert_eq!(sources.len(), 1);
                assert_eq!(sources[0].ip, "127.0.0.1");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            r.summary.contains(
                "port 8080 from 127.0.0.1 (2 connections, 3 requests, last seen 100s ago)"
            ),
            "{}",
            r.summary
        );
    }

    #[test]
    fn recent_window_without_plaintext_is_safe() {
        // The same counters judged on the recent window: the plaintext client stopped.
        let r = judge(
            "api/backend",
            None,
            &[8080],
            Ok(fixture(CONTRACT)),
            Window::Recent,
            NOW,
        );
        assert_eq!(r.verdict, "safe", "{}", r.summary);
        assert_eq!(r.ports[0].result, PortVerdict::Safe);
        assert_eq!(exit_code(&[r]), 0);
    }

    #[test]
    fn recent_window_lists_only_recent_sources() {
        let mut f = fixture(CONTRACT);
        f.ports[0].recent.counters.plaintext_requests = 1;
        f.ports[0].plaintext_sources.push(Source {
            ip: "127.0.0.2".into(),
            connections: 1,
            requests: 1,
            refused: 0,
            last_seen_unix: NOW - 5,
        });
        // 127.0.0.1 was last seen 100s ago: inside a 300s window; shrink it to 60s.
        f.ports[0].recent.window_seconds = 60;
        let r = judge("api/backend", None, &[8080], Ok(f), Window::Recent, NOW);
        match &r.ports[0].result {
            PortVerdict::Plaintext { sources } => {
                let ips: Vec<&str> = sources.iter().map(|s| s.ip.as_str()).collect();
                assert_eq!(ips, ["127.0.0.2"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn mtls_only_and_already_strict_ports_are_safe() {
        // Port 9090 is STRICT and refused nobody: safe, exit 0.
        let mut quiet = fixture(ALL_MTLS);
        quiet.ports[1].since_start.plaintext_refused = 0;
        quiet.ports[1].plaintext_sources.clear();
        let r = judge(
            "api/backend",
            None,
            &[8080, 9090],
            Ok(quiet),
            Window::SinceStart,
            NOW,
        );
        assert_eq!(r.verdict, "safe", "{}", r.summary);
        assert_eq!(r.summary, "safe to switch to STRICT");
        assert_eq!(exit_code(std::slice::from_ref(&r)), 0);

        // The same with the STRICT port refusing a client: the port beside it is still safe
        // to switch, but clients are being cut off now, and the exit status says so (4).
        let r = judge(
            "api/backend",
            None,
            &[8080, 9090],
            Ok(fixture(ALL_MTLS)),
            Window::SinceStart,
            NOW,
        );
        assert_eq!(r.verdict, "refused", "{}", r.summary);
        assert_eq!(exit_code(std::slice::from_ref(&r)), 4);
        assert!(
            r.summary
                .starts_with("STRICT on some ports; plaintext REFUSED on port 9090 from 10.0.0.7"),
            "{}",
            r.summary
        );
        assert_eq!(r.ports[0].result, PortVerdict::Safe);
        assert_eq!(
            r.ports[1].result,
            // The refused ones, not the plaintext served before the port turned STRICT, and
            // who sent them.
            PortVerdict::AlreadyStrict {
                refused_plaintext_connections: 2,
                sources: fixture(ALL_MTLS).ports[1].plaintext_sources.clone(),
            }
        );
        let text = render_text(&[r], Window::SinceStart);
        assert!(text.contains("STRICT (2 plaintext refused)"), "{text}");
        assert!(
            text.contains("api/backend: STRICT on some ports; plaintext REFUSED"),
            "{text}"
        );
    }

    /// Rolled back to PERMISSIVE after STRICT refused clients: those clients still speak
    /// plaintext, so the switch is not safe, and they are named. Under STRICT, the summary
    /// names them too.
    #[test]
    fn clients_refused_by_strict_are_named_and_block_after_a_rollback() {
        let mut f = fixture(ALL_MTLS);
        f.ports.remove(0);
        f.ports[0].mode = "PERMISSIVE".into();
        let r = judge("api/backend", None, &[9090], Ok(f), Window::SinceStart, NOW);
        assert_eq!(r.verdict, "plaintext", "{}", r.summary);
        assert_eq!(exit_code(std::slice::from_ref(&r)), 3);
        assert!(
            r.summary
                .contains("10.0.0.7 (1 connection, 0 requests, 2 refused by STRICT"),
            "{}",
            r.summary
        );
        // Still STRICT: the refused client is named, and the exit status (4) is the signal
        // to fix it or roll back.
        let mut f = fixture(ALL_MTLS);
        f.ports.remove(0);
        let r = judge("api/backend", None, &[9090], Ok(f), Window::SinceStart, NOW);
        assert_eq!(r.verdict, "refused");
        assert_eq!(exit_code(std::slice::from_ref(&r)), 4);
        assert!(
            r.summary.starts_with(
                "already STRICT on every port; plaintext REFUSED on port 9090 from 10.0.0.7"
            ),
            "{}",
            r.summary
        );
        // Judged on the recent window after the refusals stopped: STRICT and quiet, exit 0.
        let mut f = fixture(ALL_MTLS);
        f.ports.remove(0);
        f.ports[0].recent.counters.plaintext_refused = 0;
        let before_window = NOW - f.ports[0].recent.window_seconds - 1;
        for s in &mut f.ports[0].plaintext_sources {
            s.last_seen_unix = before_window;
        }
        let r = judge("api/backend", None, &[9090], Ok(f), Window::Recent, NOW);
        assert_eq!(r.verdict, "safe", "{}", r.summary);
        assert_eq!(r.summary, "already STRICT on every port");
    }

    /// In the middle of a rollout: port 8080 still serves plaintext, port 9090 is STRICT and
    /// refuses a client. Both are named, and the refusal (4, the roll-back signal) is not
    /// hidden by the plaintext (3). The twin without the refusal is plain 3.
    #[test]
    fn a_refusal_is_not_hidden_by_plaintext_on_another_port() {
        let mut f = fixture(ALL_MTLS);
        f.ports[0] = fixture(CONTRACT).ports[0].clone();
        let r = judge(
            "api/backend",
            None,
            &[8080, 9090],
            Ok(f.clone()),
            Window::SinceStart,
            NOW,
        );
        assert_eq!(r.verdict, "refused", "{}", r.summary);
        assert!(
            r.summary
                .contains("NOT safe on others: plaintext on port 8080 from 127.0.0.1")
                && r.summary
                    .contains("plaintext REFUSED on port 9090 from 10.0.0.7"),
            "{}",
            r.summary
        );
        assert_eq!(exit_code(std::slice::from_ref(&r)), 4);
        f.ports[1].since_start.plaintext_refused = 0;
        f.ports[1].plaintext_sources.clear();
        let r = judge(
            "api/backend",
            None,
            &[8080, 9090],
            Ok(f),
            Window::SinceStart,
            NOW,
        );
        assert_eq!(r.verdict, "plaintext", "{}", r.summary);
        assert_eq!(exit_code(std::slice::from_ref(&r)), 3);
    }

    /// Silence is no proof: a port that is not STRICT and saw nothing is not a pass (5),
    /// while the same port with mutual TLS seen is (0).
    #[test]
    fn no_traffic_is_not_a_pass() {
        let mut f = fixture(ALL_MTLS);
        f.ports.truncate(1);
        f.ports[0].since_start = Counters::default();
        let r = judge("api/backend", None, &[8080], Ok(f), Window::SinceStart, NOW);
        assert_eq!(r.ports[0].result, PortVerdict::NoTraffic);
        assert_eq!(r.verdict, "no_traffic");
        assert_eq!(exit_code(std::slice::from_ref(&r)), 5);
        assert!(
            r.summary.contains("no traffic at all yet on port 8080"),
            "{}",
            r.summary
        );
        let mut f = fixture(ALL_MTLS);
        f.ports.truncate(1);
        let r = judge("api/backend", None, &[8080], Ok(f), Window::SinceStart, NOW);
        assert_eq!(r.verdict, "safe");
        assert_eq!(exit_code(&[r]), 0);
    }

    #[test]
    fn plaintext_under_disable_blocks_too_even_without_recorded_sources() {
        let mut f = fixture(CONTRACT);
        f.ports[0].mode = "DISABLE".into();
        f.ports[0].plaintext_sources.clear();
        let r = judge("api/backend", None, &[8080], Ok(f), Window::SinceStart, NOW);
        assert_eq!(r.verdict, "plaintext");
        assert!(r.summary.contains("unrecorded source(s)"), "{}", r.summary);
    }

    #[test]
    fn unreachable_proxy_and_bad_answers_are_errors_not_passes() {
        let down = judge(
            "api/backend",
            None,
            &[8080],
            Err("connect 127.0.0.1:1: Connection refused".into()),
            Window::SinceStart,
            NOW,
        );
        assert_eq!(down.verdict, "error");
        assert!(down.summary.contains("Connection refused"));
        let mut mtls_only = fixture(ALL_MTLS);
        mtls_only.ports.truncate(1);
        let ok = judge(
            "api/backend",
            None,
            &[8080],
            Ok(mtls_only),
            Window::SinceStart,
            NOW,
        );
        assert_eq!(ok.verdict, "safe", "{}", ok.summary);
        let plain = judge(
            "api/backend",
            None,
            &[8080],
            Ok(fixture(CONTRACT)),
            Window::SinceStart,
            NOW,
        );
        // Errors win over plaintext, plaintext over safe.
        assert_eq!(exit_code(&[ok.clone(), plain.clone(), down]), 1);
        assert_eq!(exit_code(&[ok, plain]), 3);
        // A port the registry declares but the proxy does not report is an error.
        let missing = judge(
            "api/backend",
            None,
            &[8080, 7070],
            Ok(fixture(CONTRACT)),
            Window::SinceStart,
            NOW,
        );
        assert_eq!(missing.verdict, "error");
        assert!(missing.summary.contains("port 7070"));
        // An answer for another workload is an error.
        let other = judge(
            "web/frontend",
            None,
            &[],
            Ok(fixture(CONTRACT)),
            Window::SinceStart,
            NOW,
        );
        assert_eq!(other.verdict, "error");
    }

    #[test]
    fn malformed_answers_do_not_parse() {
        assert!(serde_json::from_str::<ProxyMtls>(r#"{"workload": "a/b"}"#).is_err());
        assert!(
            serde_json::from_str::<ProxyMtls>(
                r#"{"workload": "a/b", "ports": [{"port": 1, "mode": "PERMISSIVE"}]}"#
            )
            .is_err()
        );
    }
}
