//! Helpers shared by the authz integration tests.
#![allow(dead_code, unreachable_pub)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rampart_authz::{
    Decision, Engine, HttpRequest, JwtClaims, MeshConfig, Peer, RequestContext, Verdict, Workload,
    load_str,
};

/// The conformance corpus, or `None` (with a plain message) when it is absent.
pub fn corpus_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("RAMPART_CONFORMANCE_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/istio"),
    };
    if dir.join("field-reference.md").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "conformance corpus MISSING at {} (set RAMPART_CONFORMANCE_DIR): corpus checks NOT run",
            dir.display()
        );
        None
    }
}

/// Load YAML that must be valid and compile it under `mesh`.
pub fn engine_with(yaml: &str, mesh: MeshConfig) -> Engine {
    let r = load_str("test.yaml", yaml);
    assert!(
        r.problems.is_empty(),
        "test policy refused: {:?}",
        r.problems
    );
    Engine::new(r.resources, mesh)
}

pub fn engine(yaml: &str) -> Engine {
    engine_with(yaml, MeshConfig::default())
}

/// The workload Istio's builder tests use: namespace foo, app=httpbin, version=v1.
pub fn httpbin() -> Workload {
    Workload::new("foo", [("app", "httpbin"), ("version", "v1")])
}

/// A request builder.
#[derive(Clone)]
pub struct Req(pub RequestContext);

pub fn http(method: &str, path: &str) -> Req {
    Req(RequestContext {
        source: Peer {
            principal: None,
            ip: Some("10.0.1.1".parse().unwrap()),
            remote_ip: None,
        },
        destination_ip: Some("10.0.0.10".parse().unwrap()),
        destination_port: 8080,
        sni: None,
        http: Some(HttpRequest::new(
            method,
            path,
            "httpbin.foo.svc.cluster.local",
        )),
        jwt: None,
    })
}

pub fn tcp(port: u16) -> Req {
    let mut r = http("GET", "/");
    r.0.http = None;
    r.0.destination_port = port;
    r
}

impl Req {
    pub fn peer(mut self, p: &str) -> Self {
        self.0.source.principal = Some(p.to_string());
        self
    }
    pub fn ip(mut self, ip: &str) -> Self {
        self.0.source.ip = Some(ip.parse::<IpAddr>().unwrap());
        self
    }
    pub fn remote(mut self, ip: &str) -> Self {
        self.0.source.remote_ip = Some(ip.parse::<IpAddr>().unwrap());
        self
    }
    pub fn dest_ip(mut self, ip: &str) -> Self {
        self.0.destination_ip = Some(ip.parse::<IpAddr>().unwrap());
        self
    }
    pub fn port(mut self, p: u16) -> Self {
        self.0.destination_port = p;
        self
    }
    pub fn host(mut self, h: &str) -> Self {
        self.0.http.as_mut().unwrap().host = h.to_string();
        self
    }
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.0
            .http
            .as_mut()
            .unwrap()
            .headers
            .push((k.to_string(), v.to_string()));
        self
    }
    pub fn sni(mut self, s: &str) -> Self {
        self.0.sni = Some(s.to_string());
        self
    }
    pub fn jwt(mut self, claims: serde_json::Value) -> Self {
        self.0.jwt = Some(JwtClaims {
            claims: claims.as_object().unwrap().clone(),
        });
        self
    }
}

pub fn decide(e: &Engine, w: &Workload, r: &Req) -> Decision {
    e.authorize(w, &r.0)
}

pub fn allowed(e: &Engine, r: &Req) -> bool {
    let d = decide(e, &httpbin(), r);
    d.decision == Verdict::Allow
}

/// Wrap rules in an AuthorizationPolicy selecting httpbin.
pub fn policy(name: &str, action: &str, rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: httpbin}}}}\n  action: {action}\n  rules: {rules}\n"
    )
}
