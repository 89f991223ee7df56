//! Differential test against Istio's own translation: for every `authz-builder/{http,tcp}`
//! case of the corpus, the expected Envoy RBAC filters (`*-out*.yaml`, Istio's golden files)
//! are interpreted here with Envoy's RBAC semantics and compared, request by request, with the
//! engine's decision on the same input policies. Requests are generated from the values that
//! appear in the policies (so matches and near misses both occur), thousands per case.
//! CUSTOM (ext_authz) cases are left out: their filters describe an external call.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

use common::*;
use ipnet::IpNet;
use rampart_authz::{
    ENVOY_METADATA_UNSUPPORTED, Engine, HttpRequest, JwtClaims, MeshConfig, PathNormalization,
    Peer, RequestContext, Verdict, load_path, normalize_path,
};
use regex::Regex;
use serde_json::Value;

// ---- a small Envoy RBAC interpreter ----------------------------------------------------

fn string_match(m: &Value, s: Option<&str>) -> bool {
    let Some(s) = s else { return false };
    let ic = m["ignoreCase"].as_bool().unwrap_or(false);
    let norm = |x: &str| {
        if ic {
            x.to_ascii_lowercase()
        } else {
            x.to_string()
        }
    };
    let s2 = norm(s);
    if let Some(e) = m["exact"].as_str() {
        return s2 == norm(e);
    }
    if let Some(p) = m["prefix"].as_str() {
        return s2.starts_with(&norm(p));
    }
    if let Some(x) = m["suffix"].as_str() {
        return s2.ends_with(&norm(x));
    }
    if let Some(c) = m["contains"].as_str() {
        return s2.contains(&norm(c));
    }
    if let Some(r) = m["safeRegex"]["regex"].as_str() {
        return cached_regex(&format!("^(?:{r})$")).is_match(s);
    }
    panic!("string matcher not understood: {m}");
}

fn cached_regex(re: &str) -> Regex {
    thread_local! {
        static CACHE: std::cell::RefCell<std::collections::HashMap<String, Regex>> =
            Default::default();
    }
    CACHE.with(|c| {
        c.borrow_mut()
            .entry(re.to_string())
            .or_insert_with(|| Regex::new(re).unwrap())
            .clone()
    })
}

fn header(ctx: &RequestContext, name: &str) -> Option<String> {
    let h = ctx.http.as_ref()?;
    match name {
        ":authority" => Some(h.host.clone()),
        ":method" => Some(h.method.clone()),
        ":path" => Some(h.path.clone()),
        n => h.header(n).map(|c| c.into_owned()),
    }
}

fn header_match(m: &Value, ctx: &RequestContext) -> bool {
    let v = header(ctx, m["name"].as_str().unwrap());
    if m["presentMatch"].as_bool() == Some(true) {
        return v.is_some();
    }
    string_match(&m["stringMatch"], v.as_deref())
}

fn cidr(m: &Value, ip: Option<IpAddr>) -> bool {
    let net: IpNet = format!(
        "{}/{}",
        m["addressPrefix"].as_str().unwrap(),
        m["prefixLen"].as_u64().unwrap()
    )
    .parse()
    .unwrap();
    ip.is_some_and(|ip| net.contains(&ip))
}

fn template_regex(t: &str) -> Regex {
    let pchar = "[a-zA-Z0-9\\-._~%!$&'()+,;:@=]";
    let mut re = String::from("^");
    let mut rest = t;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("**") {
            re.push_str(&format!("(?:{pchar}|/)*"));
            rest = r;
        } else if let Some(r) = rest.strip_prefix('*') {
            re.push_str(&format!("{pchar}+"));
            rest = r;
        } else {
            let c = rest.chars().next().unwrap();
            re.push_str(&regex::escape(&c.to_string()));
            rest = &rest[c.len_utf8()..];
        }
    }
    re.push('$');
    cached_regex(&re)
}

fn value_match(m: &Value, v: Option<&Value>) -> bool {
    if let Some(sm) = m.get("stringMatch") {
        return string_match(sm, v.and_then(Value::as_str));
    }
    if let Some(or) = m.get("orMatch") {
        return or["valueMatchers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| value_match(x, v));
    }
    if let Some(l) = m.get("listMatch") {
        return v
            .and_then(Value::as_array)
            .is_some_and(|items| items.iter().any(|i| value_match(&l["oneOf"], Some(i))));
    }
    panic!("value matcher not understood: {m}");
}

fn metadata(m: &Value, ctx: &RequestContext) -> bool {
    if m["filter"] != "envoy.filters.http.jwt_authn" {
        return false; // no other dynamic metadata exists here
    }
    let Some(jwt) = &ctx.jwt else { return false };
    let path: Vec<&str> = m["path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key"].as_str().unwrap())
        .collect();
    assert_eq!(path[0], "payload");
    let mut cur = jwt.claims.get(path[1]);
    for k in &path[2..] {
        cur = cur.and_then(|c| c.get(*k));
    }
    value_match(&m["value"], cur)
}

fn permission(p: &Value, ctx: &RequestContext, path_only: &str) -> bool {
    let o = p.as_object().unwrap();
    let (k, v) = o.iter().next().unwrap();
    match k.as_str() {
        "any" => true,
        "andRules" => v["rules"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| permission(r, ctx, path_only)),
        "orRules" => v["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| permission(r, ctx, path_only)),
        "notRule" => !permission(v, ctx, path_only),
        "header" => header_match(v, ctx),
        "urlPath" => ctx.http.is_some() && string_match(&v["path"], Some(path_only)),
        "uriTemplate" => {
            ctx.http.is_some()
                && template_regex(v["typedConfig"]["pathTemplate"].as_str().unwrap())
                    .is_match(path_only)
        }
        "destinationPort" => v.as_u64() == Some(u64::from(ctx.destination_port)),
        "destinationIp" => cidr(v, ctx.destination_ip),
        "requestedServerName" => string_match(v, ctx.sni.as_deref()),
        "metadata" => metadata(v, ctx),
        other => panic!("permission {other} not understood"),
    }
}

/// Envoy's downstream remote address on a sidecar inbound (`use_remote_address: false`,
/// `xff_num_trusted_hops: 0`): the rightmost X-Forwarded-For entry if it is an address.
fn remote_ip(ctx: &RequestContext) -> Option<IpAddr> {
    if ctx.source.remote_ip.is_some() {
        return ctx.source.remote_ip;
    }
    let joined: Vec<&str> = ctx
        .http
        .iter()
        .flat_map(|h| h.headers.iter())
        .filter(|(k, _)| k.eq_ignore_ascii_case("x-forwarded-for"))
        .map(|(_, v)| v.as_str())
        .collect();
    let joined = joined.join(",");
    let last = joined.split(',').next_back().unwrap_or("").trim();
    match last.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)),
        Ok(ip) => Some(ip),
        Err(_) => ctx.source.ip,
    }
}

fn principal(p: &Value, ctx: &RequestContext) -> bool {
    let o = p.as_object().unwrap();
    let (k, v) = o.iter().next().unwrap();
    match k.as_str() {
        "any" => true,
        "andIds" => v["ids"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| principal(r, ctx)),
        "orIds" => v["ids"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| principal(r, ctx)),
        "notId" => !principal(v, ctx),
        "authenticated" => string_match(&v["principalName"], ctx.source.principal.as_deref()),
        "directRemoteIp" => cidr(v, ctx.source.ip),
        "remoteIp" => cidr(v, remote_ip(ctx)),
        "header" => header_match(v, ctx),
        "metadata" => metadata(v, ctx),
        other => panic!("principal {other} not understood"),
    }
}

/// (action, some policy matched) for an RBAC `rules`/`shadowRules` block.
fn rbac(rules: &Value, ctx: &RequestContext, path_only: &str) -> (String, bool) {
    let action = rules["action"].as_str().unwrap_or("ALLOW").to_string();
    let matched = rules["policies"].as_object().is_some_and(|ps| {
        ps.values().any(|p| {
            p["permissions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| permission(x, ctx, path_only))
                && p["principals"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| principal(x, ctx))
        })
    });
    (action, matched)
}

#[derive(Debug, PartialEq)]
struct Expect {
    allowed: bool,
    audited: bool,
    shadow_deny: bool,
    shadow_allow: Option<bool>,
}

fn envoy_decision(filters: &[Value], ctx: &RequestContext) -> Expect {
    // Envoy's HTTP connection manager normalizes the path (BASE) before RBAC runs.
    let mut ctx = ctx.clone();
    if let Some(h) = ctx.http.as_mut() {
        h.path = normalize_path(&h.path, PathNormalization::Base)
            .unwrap()
            .to_forward();
    }
    let ctx = &ctx;
    let path_only = ctx
        .http
        .as_ref()
        .map(|h| h.path.split('?').next().unwrap().to_string())
        .unwrap_or_default();
    let mut e = Expect {
        allowed: true,
        audited: false,
        shadow_deny: false,
        shadow_allow: None,
    };
    let mut denied = false;
    let mut allow_filters = Vec::new();
    for f in filters {
        let tc = &f["typedConfig"];
        if let Some(rules) = tc.get("rules") {
            let (a, m) = rbac(rules, ctx, &path_only);
            match a.as_str() {
                "DENY" => denied |= m,
                "ALLOW" => allow_filters.push(m),
                "LOG" => e.audited |= m,
                other => panic!("action {other}"),
            }
        }
        if let Some(rules) = tc.get("shadowRules") {
            let (a, m) = rbac(rules, ctx, &path_only);
            match a.as_str() {
                "DENY" => e.shadow_deny |= m,
                "ALLOW" => e.shadow_allow = Some(m),
                other => panic!("shadow action {other}"),
            }
        }
    }
    e.allowed = !denied && allow_filters.iter().all(|m| *m);
    e
}

fn engine_decision(engine: &Engine, ctx: &RequestContext) -> Expect {
    let d = engine.authorize(&httpbin(), ctx);
    Expect {
        allowed: d.decision == Verdict::Allow,
        audited: d.audit.is_some(),
        shadow_deny: d.dry_run.deny.is_some(),
        shadow_allow: d
            .dry_run
            .allow
            .as_ref()
            .map(|s| s.verdict == Verdict::Allow),
    }
}

// ---- request generation from the policies' own values ----------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[(self.next() % v.len() as u64) as usize]
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.next() % 100 < pct
    }
}

fn strings(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::String(s) => {
            out.insert(s.clone());
        }
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

/// Concrete values a pattern could match or nearly match.
fn concretize(v: &str) -> Vec<String> {
    let mut out = vec![
        v.replace("{**}", "a/b")
            .replace("{*}", "seg")
            .replace('*', ""),
        v.replace("{**}", "")
            .replace("{*}", "x")
            .replace('*', "abc"),
        v.to_string(),
        v.to_ascii_uppercase(),
    ];
    out.retain(|s| !s.is_empty());
    out
}

struct Pools {
    words: Vec<String>,
    ips: Vec<String>,
    ports: Vec<u16>,
    header_names: Vec<String>,
    tds: Vec<String>,
}

fn pools(input: &Path) -> Pools {
    let text = std::fs::read_to_string(input).unwrap();
    let mut all = BTreeSet::new();
    for doc in text.split("\n---") {
        if let Ok(v) = serde_saphyr::from_str::<Value>(doc) {
            strings(&v["spec"]["rules"], &mut all);
        }
    }
    let mut words: BTreeSet<String> = ["x", "/", "GET", "foo", "cluster.local/ns/foo/sa/x"]
        .map(String::from)
        .into();
    let mut ips = vec!["127.0.0.1".to_string()];
    let mut ports = vec![80u16, 8080, 443];
    let mut header_names = vec!["x-other".to_string(), "x-forwarded-for".to_string()];
    for s in &all {
        if let Some(h) = s
            .strip_prefix("request.headers[")
            .and_then(|x| x.strip_suffix(']'))
        {
            header_names.push(h.to_string());
        }
        if let Ok(p) = s.parse::<u16>() {
            ports.push(p);
        }
        let ipish = s.split('/').next().unwrap();
        if ipish.parse::<IpAddr>().is_ok() {
            ips.push(ipish.to_string());
            if let Ok(IpAddr::V4(v4)) = ipish.parse::<IpAddr>() {
                let o = v4.octets();
                ips.push(format!(
                    "{}.{}.{}.{}",
                    o[0],
                    o[1],
                    o[2],
                    o[3].wrapping_add(7)
                ));
            }
        }
        for c in concretize(s) {
            words.insert(c);
        }
    }
    Pools {
        words: words.into_iter().collect(),
        ips,
        ports,
        header_names,
        tds: [
            "cluster.local",
            "td1",
            "some-td",
            "foobar",
            "new-td",
            "old-td",
            "some-trustdomain",
            "another.local",
            "bad-td",
            "untrusted",
            "x",
        ]
        .map(String::from)
        .to_vec(),
    }
}

fn gen_request(r: &mut Rng, p: &Pools, http: bool) -> RequestContext {
    let word = |r: &mut Rng| r.pick(&p.words).clone();
    let principal = if r.chance(20) {
        None
    } else if r.chance(30) {
        Some(format!("spiffe://{}", word(r)))
    } else {
        let td = r.pick(&p.tds).clone();
        let w = word(r);
        let (ns, sa) = match w.split_once('/') {
            Some((a, b)) if !b.contains('/') => (a.to_string(), b.to_string()),
            _ => (
                if r.chance(50) {
                    "foo".to_string()
                } else {
                    word(r).replace('/', "")
                },
                word(r).replace('/', ""),
            ),
        };
        Some(format!("spiffe://{td}/ns/{ns}/sa/{sa}"))
    };
    let ip = |r: &mut Rng| Some(r.pick(&p.ips).parse::<IpAddr>().unwrap());
    let mut ctx = RequestContext {
        source: Peer {
            principal,
            ip: ip(r),
            remote_ip: if r.chance(50) { ip(r) } else { None },
        },
        destination_ip: ip(r),
        destination_port: *r.pick(&p.ports),
        sni: if r.chance(50) { Some(word(r)) } else { None },
        http: None,
        jwt: None,
    };
    if http {
        let path = {
            let w = word(r);
            if w.starts_with('/') {
                w
            } else {
                format!("/{w}")
            }
        };
        let mut h = HttpRequest::new(&word(r), &path, &word(r));
        for name in &p.header_names {
            if r.chance(50) {
                let value = if name == "x-forwarded-for" && r.chance(70) {
                    // A list ending in an address (as a gateway appends it), or not.
                    let last = r.pick(&p.ips).clone();
                    match r.next() % 3 {
                        0 => last,
                        1 => format!("{}, {last}", r.pick(&p.ips)),
                        _ => format!("{last}, {}", word(r)),
                    }
                } else {
                    word(r)
                };
                h = h.with_header(name, &value);
            }
        }
        ctx.http = Some(h);
        if r.chance(60) {
            let mut claims = serde_json::Map::new();
            for k in ["iss", "sub", "azp"] {
                if r.chance(85) {
                    claims.insert(k.into(), Value::String(word(r)));
                }
            }
            if r.chance(70) {
                claims.insert(
                    "aud".into(),
                    if r.chance(50) {
                        Value::String(word(r))
                    } else {
                        serde_json::json!([word(r), word(r)])
                    },
                );
            }
            if r.chance(50) {
                claims.insert("nested1".into(), serde_json::json!({"nested2": word(r)}));
            }
            ctx.jwt = Some(JwtClaims { claims });
        }
    }
    ctx
}

fn mesh_for(case: &str) -> MeshConfig {
    let (td, aliases): (&str, &[&str]) = match case {
        "simple-policy-td-aliases" => ("td1", &["cluster.local"]),
        "simple-policy-multiple-td-aliases" => ("td1", &["cluster.local", "some-td"]),
        "simple-policy-principal-with-wildcard" => ("td1", &["foobar"]),
        "td-aliases-source-principal" => ("new-td", &["old-td", "some-trustdomain"]),
        _ => ("cluster.local", &[]),
    };
    MeshConfig {
        trust_domain: td.into(),
        trust_domain_aliases: aliases.iter().map(|s| s.to_string()).collect(),
        ..MeshConfig::default()
    }
}

#[test]
fn engine_agrees_with_istio_rbac_goldens() {
    let Some(corpus) = corpus_dir() else { return };
    let mut cases = 0;
    let mut refused = 0;
    let mut requests = 0;
    let mut allowed_seen = 0;
    for (sub, http) in [("http", true), ("tcp", false)] {
        let dir = corpus.join("authz-builder").join(sub);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter_map(|n| n.strip_suffix("-in.yaml").map(str::to_string))
            .filter(|n| !n.starts_with("custom-"))
            .collect();
        names.sort();
        for case in names {
            let mut filters = Vec::new();
            for suffix in ["-out.yaml", "-out1.yaml", "-out2.yaml"] {
                let p = dir.join(format!("{case}{suffix}"));
                if p.is_file() {
                    filters.push(
                        serde_saphyr::from_str::<Value>(&std::fs::read_to_string(p).unwrap())
                            .unwrap(),
                    );
                }
            }
            assert!(!filters.is_empty(), "{sub}/{case}: no golden");
            let input = dir.join(format!("{case}-in.yaml"));
            let loaded = load_path(&input);
            // Deliberate difference from Istio (docs/AUTHZ.md): a policy conditioned on Envoy
            // dynamic metadata is refused, so there is nothing to compare for these inputs.
            if std::fs::read_to_string(&input)
                .unwrap()
                .contains("experimental.envoy.filters.")
            {
                assert!(
                    !loaded.problems.is_empty()
                        && loaded
                            .problems
                            .iter()
                            .all(|p| p.reason == ENVOY_METADATA_UNSUPPORTED),
                    "{sub}/{case}: {:?}",
                    loaded.problems
                );
                refused += 1;
                continue;
            }
            assert!(loaded.problems.is_empty(), "{case}: {:?}", loaded.problems);
            let engine = Engine::new(loaded.resources, mesh_for(&case));
            let pools = pools(&input);
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ case.len() as u64);
            for i in 0..1500 {
                let ctx = gen_request(&mut rng, &pools, http);
                let want = envoy_decision(&filters, &ctx);
                let got = engine_decision(&engine, &ctx);
                assert_eq!(got, want, "{sub}/{case} request #{i}: {ctx:#?}");
                allowed_seen += usize::from(got.allowed);
                requests += 1;
            }
            cases += 1;
        }
    }
    assert!(
        cases + refused >= 20,
        "only {cases} cases ({refused} refused on purpose)"
    );
    assert!(cases >= 15, "only {cases} cases compared");
    eprintln!(
        "builder oracle: {cases} cases, {requests} requests, {allowed_seen} allowed; \
         {refused} refused on purpose (experimental.envoy.filters.*)"
    );
}
