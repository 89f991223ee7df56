//! The mesh folder's workload registry (`workloads.yaml`, written by a user): parsing never
//! panics; an accepted registry's workloads have valid SPIFFE IDs (the proxy builds them
//! with `expect`), resolve by their own service host and port; and resolving any authority
//! (the `Host` an app sends to the outbound proxy) never panics.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rampart_certs::TrustDomain;
use rampart_mesh::{Registry, parse_registry};

const FIXED: &str = "workloads:
- name: frontend
  namespace: web
  ports:
  - {port: 8080, protocol: http, app: 127.0.0.1:18080, inbound: 127.0.0.1:15080}
- name: db
  namespace: api
  ports:
  - {port: 80, protocol: tcp, app: '[::1]:18232', inbound: 127.0.0.1:15232}
";

fn fixed() -> &'static Registry {
    static REG: OnceLock<Registry> = OnceLock::new();
    REG.get_or_init(|| parse_registry("fixed.yaml", FIXED).expect("fixed registry"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = fixed().resolve(text, "web");
    let Ok(reg) = parse_registry("workloads.yaml", text) else {
        return;
    };
    let td = TrustDomain::new("cluster.local").expect("trust domain");
    for w in &reg.workloads {
        let _ = (w.key(), w.spiffe_id(&td), w.authz_workload());
        for p in &w.ports {
            let host = format!("{}:{}", w.service_host(), p.port);
            let (rw, rp) = reg
                .resolve(&host, "other")
                .expect("own service host resolves");
            assert_eq!((rw.key(), rp.port), (w.key(), p.port), "{host}");
        }
    }
});
