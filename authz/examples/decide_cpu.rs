//! CPU time per decision, measured from this process's user+system time in
//! `/proc/self/stat` (Linux), so the figure does not depend on how busy the machine is.
//! `cargo run --release -p rampart-authz --example decide_cpu`
//!
//! Same configurations and request as `benches/decide.rs`.

use std::hint::black_box;
use std::time::Instant;

use rampart_authz::{Engine, HttpRequest, MeshConfig, Peer, RequestContext, Workload, load_str};

/// `n` policies: 10 per namespace, each selecting one app of that namespace, alternating
/// ALLOW and DENY, with principals, paths, methods and a header condition; plus one
/// mesh-wide DENY in the root namespace.
fn config(n: usize) -> String {
    let mut y = String::from(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: mesh-deny, namespace: istio-system}\nspec: {action: DENY, rules: [{from: [{source: {ipBlocks: [203.0.113.0/24]}}]}]}\n",
    );
    for i in 0..n {
        let ns = i / 10;
        let app = i % 10;
        let action = if i % 2 == 0 { "ALLOW" } else { "DENY" };
        y.push_str(&format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i}, namespace: ns-{ns}}}\nspec:\n  selector: {{matchLabels: {{app: app-{app}}}}}\n  action: {action}\n  rules:\n  - from: [{{source: {{principals: [cluster.local/ns/ns-{ns}/sa/client-{app}, 'cluster.local/ns/shared/*']}}}}]\n    to: [{{operation: {{methods: [GET, HEAD], paths: ['/api/v{app}/*', /healthz]}}}}]\n  - from: [{{source: {{namespaces: [admin-{ns}]}}}}]\n    to: [{{operation: {{paths: ['/admin/{{**}}']}}}}]\n    when: [{{key: 'request.headers[x-debug]', values: ['{i}']}}]\n"
        ));
    }
    y
}

fn request() -> RequestContext {
    RequestContext {
        source: Peer {
            principal: Some("spiffe://cluster.local/ns/ns-0/sa/client-4".into()),
            ip: Some("10.0.1.1".parse().unwrap()),
            remote_ip: None,
        },
        destination_ip: Some("10.0.0.10".parse().unwrap()),
        destination_port: 8080,
        sni: None,
        http: Some(
            HttpRequest::new(
                "GET",
                "/api/v4/items/42?x=1",
                "app-4.ns-0.svc.cluster.local",
            )
            .with_header("user-agent", "bench")
            .with_header("accept", "*/*"),
        ),
        jwt: None,
    }
}

/// utime + stime of this process, in clock ticks (usually 100 per second).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the full line: 12 and 13 here.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn main() {
    const ITERS: u32 = 2_000_000;
    for n in [10usize, 1_000, 10_000] {
        let loaded = load_str("bench.yaml", &config(n));
        assert!(loaded.problems.is_empty());
        let engine = Engine::new(loaded.resources, MeshConfig::default());
        let w = Workload::new("ns-0", [("app", "app-4"), ("version", "v1")]);
        let ctx = request();
        assert!(engine.authorize(&w, &ctx).is_allowed());
        for _ in 0..100_000 {
            black_box(engine.authorize(black_box(&w), black_box(&ctx)));
        }
        let (t0, c0) = (Instant::now(), cpu_ticks());
        for _ in 0..ITERS {
            black_box(engine.authorize(black_box(&w), black_box(&ctx)));
        }
        let (wall, cpu) = (t0.elapsed(), cpu_ticks() - c0);
        let cpu_us = cpu as f64 * 10_000.0 / f64::from(ITERS); // 100 ticks/s = 10_000 us/tick
        println!(
            "{n:>6} policies: {cpu_us:.2} us CPU/decision, {:.2} us wall/decision",
            wall.as_secs_f64() * 1e6 / f64::from(ITERS)
        );
    }
}
