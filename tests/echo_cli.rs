//! `rampart echo`: one port answers HTTP/1.1 and h2c (prior knowledge) with JSON describing the
//! request, and echoes anything else byte for byte. Driven with curl and a raw TCP socket.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Shutdown, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

struct Echo {
    child: Child,
    addr: String,
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(name: Option<&str>) -> Echo {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rampart"));
    cmd.args(["echo", "--listen", "127.0.0.1:0"]);
    if let Some(n) = name {
        cmd.args(["--name", n]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn rampart echo");
    let stdout = child.stdout.take().expect("stdout");
    // The first line names the bound address; a reader thread bounds the wait.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("rampart echo printed no listening line within 20s");
    let addr = line
        .trim()
        .strip_prefix("rampart echo listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Echo { child, addr }
}

fn curl(args: &[&str]) -> Value {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--fail"])
        .args(args)
        .output()
        .expect("curl must be installed (.ci/test installs it)");
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "curl {args:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn http1_request_is_described() {
    let echo = start(Some("backend"));
    let url = format!("http://{}/api/hello?x=1&y=two", echo.addr);
    let v = curl(&[
        &url,
        "-H",
        "x-forwarded-client-cert: By=spiffe://cluster.local/ns/api/sa/backend;URI=spiffe://cluster.local/ns/web/sa/frontend",
        "-H",
        "x-multi: a",
        "-H",
        "x-multi: b",
    ]);
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/api/hello");
    assert_eq!(v["query"], "x=1&y=two");
    assert_eq!(v["version"], "HTTP/1.1");
    assert_eq!(v["service"], "backend");
    assert_eq!(
        v["headers"]["x-forwarded-client-cert"],
        "By=spiffe://cluster.local/ns/api/sa/backend;URI=spiffe://cluster.local/ns/web/sa/frontend"
    );
    assert_eq!(v["headers"]["x-multi"], "a, b");
    assert_eq!(v["headers"]["host"], echo.addr.as_str());
    let remote = v["remote_addr"].as_str().expect("remote_addr");
    assert!(remote.starts_with("127.0.0.1:"), "remote_addr {remote}");
    assert_eq!(v["body_bytes"], 0);
}

#[test]
fn h2c_prior_knowledge_request_is_described() {
    let echo = start(None);
    let url = format!("http://{}/h2/path", echo.addr);
    let v = curl(&["--http2-prior-knowledge", "-X", "PUT", "-d", "12345", &url]);
    assert_eq!(v["method"], "PUT");
    assert_eq!(v["path"], "/h2/path");
    assert_eq!(v["query"], Value::Null);
    assert_eq!(v["version"], "HTTP/2.0");
    assert_eq!(v["authority"], echo.addr.as_str());
    assert_eq!(v["body_bytes"], 5);
    assert!(v.get("service").is_none());
}

#[test]
fn same_port_serves_both_http_versions_on_one_connection_each() {
    let echo = start(None);
    let url = format!("http://{}/a", echo.addr);
    // Two requests over one HTTP/1.1 keep-alive connection, then h2c on the same port.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--fail", &url, &url])
        .output()
        .expect("curl");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.matches("\"version\": \"HTTP/1.1\"").count(),
        2,
        "{text}"
    );
    let v = curl(&["--http2-prior-knowledge", &url]);
    assert_eq!(v["version"], "HTTP/2.0");
}

fn tcp_roundtrip(addr: &str, payload: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let writer = {
        let mut w = s.try_clone().unwrap();
        let payload = payload.to_vec();
        std::thread::spawn(move || {
            w.write_all(&payload).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        })
    };
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("read echo");
    writer.join().unwrap();
    got
}

#[test]
fn raw_tcp_is_echoed_byte_for_byte() {
    let echo = start(None);
    assert_eq!(tcp_roundtrip(&echo.addr, b"hello tcp\n"), b"hello tcp\n");
    // Binary that starts like a TLS ClientHello, and a large payload, come back unchanged.
    let mut big: Vec<u8> = vec![0x16, 0x03, 0x01];
    big.extend((0..300_000u32).map(|i| (i * 7 % 251) as u8));
    assert_eq!(tcp_roundtrip(&echo.addr, &big), big);
    // Something that begins like a method but is not one is still echoed.
    assert_eq!(tcp_roundtrip(&echo.addr, b"GETX nope"), b"GETX nope");
}

#[test]
fn bad_listen_address_is_an_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["echo", "--listen", "not-an-address"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
