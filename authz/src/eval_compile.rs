//! AuthorizationPolicy → precompiled rules, translated the way Istio's RBAC builder does
//! (`pilot/pkg/security/authz/model`): the same string forms, the same `spiffe://` prefixing,
//! namespace and service-account regexes, trust-domain alias expansion, and the same handling
//! of HTTP-only attributes on TCP ports.

use std::collections::BTreeMap;
use std::sync::Arc;

use ipnet::IpNet;

use crate::eval_match::{PathMatch, RequestPrincipalMatch, StrMatch, glob_to_regex, parse_cidr};
use crate::explain::PolicyRef;
use crate::model::{Action, AuthorizationPolicy, Condition, Operation, Source};
use crate::model::{DRY_RUN_ANNOTATION, parse_go_bool};

/// Which attribute a condition looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Key {
    /// Peer certificate URI SAN (principals, namespaces, serviceAccounts, trustDomains,
    /// `source.principal`, `source.namespace`, ...).
    PeerPrincipal,
    SourceIp,
    RemoteIp,
    DestIp,
    DestPort,
    Sni,
    Host,
    Method,
    Path,
    Header(String),
    RequestPrincipal,
    /// A JWT claim at a nested path (`aud` for audiences, `azp` for presenter).
    Claim(Vec<String>),
    /// `experimental.envoy.filters.*`: Envoy dynamic metadata, which this engine never has.
    /// Validation refuses such policies (`ENVOY_METADATA_UNSUPPORTED`); this only keeps a
    /// resource built without validation from matching on it.
    Metadata,
}

impl Key {
    /// HTTP-only attributes (field reference §3.4).
    pub(crate) fn http_only(&self) -> bool {
        matches!(
            self,
            Key::Host
                | Key::Method
                | Key::Path
                | Key::Header(_)
                | Key::RequestPrincipal
                | Key::Claim(_)
        )
    }
}

/// One compiled value of a condition.
#[derive(Debug, Clone)]
pub(crate) enum Val {
    Str(StrMatch),
    /// Case-insensitive string (hosts).
    StrI(StrMatch),
    Path(PathMatch),
    Cidr(IpNet),
    Port(u16),
    ReqPrincipal(RequestPrincipalMatch),
}

/// `key` must match one of `pos` (when non-empty) and none of `neg`.
#[derive(Debug, Clone)]
pub(crate) struct Cond {
    pub(crate) key: Key,
    pub(crate) pos: Vec<Val>,
    pub(crate) neg: Vec<Val>,
    /// The field and values as written, for explanations only (never read per request).
    pub(crate) label: Arc<Label>,
}

/// A condition as the policy wrote it: `principals`/`notPrincipals` and their values, or a
/// `when` key and its `values`/`notValues`.
#[derive(Debug)]
pub(crate) struct Label {
    pub(crate) field: String,
    pub(crate) not_field: String,
    pub(crate) values: Vec<String>,
    pub(crate) not_values: Vec<String>,
}

/// One compiled rule. `from`/`to` empty means the field was absent (any).
#[derive(Debug, Clone)]
pub(crate) struct CRule {
    pub(crate) index: usize,
    pub(crate) from: Vec<Vec<Cond>>,
    pub(crate) to: Vec<Vec<Cond>>,
    pub(crate) when: Vec<Cond>,
}

/// A compiled AuthorizationPolicy.
#[derive(Debug, Clone)]
pub(crate) struct CompiledPolicy {
    pub(crate) policy: Arc<PolicyRef>,
    pub(crate) action: Action,
    pub(crate) dry_run: bool,
    pub(crate) provider: Option<String>,
    pub(crate) selector: BTreeMap<String, String>,
    pub(crate) has_target_refs: bool,
    /// Rules for HTTP ports.
    pub(crate) http: Vec<CRule>,
    /// Rules for TCP ports (HTTP-only attributes handled per §3.4).
    pub(crate) tcp: Vec<CRule>,
    /// Translation problems (values Istio would also drop).
    pub(crate) warnings: Vec<String>,
}

/// Compile a validated policy.
pub(crate) fn compile_policy(p: &AuthorizationPolicy, trust_domains: &[String]) -> CompiledPolicy {
    let action = p.spec.action();
    let policy = Arc::new(PolicyRef {
        kind: "AuthorizationPolicy",
        namespace: p.namespace().to_string(),
        name: p.name().to_string(),
    });
    let dry_run = p
        .metadata
        .annotations
        .get(DRY_RUN_ANNOTATION)
        .and_then(|v| parse_go_bool(v))
        .unwrap_or(false);
    let mut warnings = Vec::new();
    let mut http = Vec::new();
    let mut tcp = Vec::new();
    for (i, r) in p.spec.rules().iter().enumerate() {
        let ctx = RuleCtx {
            action,
            policy_ns: p.namespace(),
            trust_domains,
        };
        match compile_rule(i, r, &ctx, &mut warnings) {
            Some(rule) => {
                if let Some(t) = tcp_variant(&rule, action) {
                    tcp.push(t);
                }
                http.push(rule);
            }
            None => warnings.push(format!(
                "rule {i} dropped: it holds a value that cannot be translated (as Istio drops it)"
            )),
        }
    }
    CompiledPolicy {
        policy,
        action,
        dry_run,
        provider: p.spec.provider.as_ref().and_then(|x| x.name.clone()),
        selector: p
            .spec
            .selector
            .as_ref()
            .map(|s| s.match_labels.clone())
            .unwrap_or_default(),
        has_target_refs: p.spec.has_target_refs(),
        http,
        tcp,
        warnings,
    }
}

/// The TCP form of a rule: ALLOW/CUSTOM drop a rule that uses any HTTP-only attribute (less
/// is allowed); DENY/AUDIT drop only those attributes (more is denied).
fn tcp_variant(rule: &CRule, action: Action) -> Option<CRule> {
    let uses_http = rule
        .from
        .iter()
        .chain(rule.to.iter())
        .flatten()
        .chain(rule.when.iter())
        .any(|c| c.key.http_only());
    match action {
        Action::Allow | Action::Custom => {
            if uses_http {
                None
            } else {
                Some(rule.clone())
            }
        }
        Action::Deny | Action::Audit => {
            let strip = |cs: &Vec<Cond>| -> Vec<Cond> {
                cs.iter().filter(|c| !c.key.http_only()).cloned().collect()
            };
            Some(CRule {
                index: rule.index,
                from: rule.from.iter().map(strip).collect(),
                to: rule.to.iter().map(strip).collect(),
                when: strip(&rule.when),
            })
        }
    }
}

struct RuleCtx<'a> {
    action: Action,
    policy_ns: &'a str,
    trust_domains: &'a [String],
}

impl RuleCtx<'_> {
    /// ALLOW/CUSTOM: a bad value drops the whole rule; DENY/AUDIT: it drops just the value
    /// (Istio `checkError`).
    fn strict(&self) -> bool {
        matches!(self.action, Action::Allow | Action::Custom)
    }
}

/// A value that cannot be translated.
struct BadValue(String);

/// Turns one policy value into matchers.
type ValFn<'a> = &'a dyn Fn(&str) -> Result<Vec<Val>, BadValue>;

/// One field: attribute, field name, values, not-values, translation.
type FieldSpec<'a> = (Key, &'static str, &'a [String], &'a [String], ValFn<'a>);

fn compile_rule(
    index: usize,
    r: &crate::model::Rule,
    ctx: &RuleCtx<'_>,
    warnings: &mut Vec<String>,
) -> Option<CRule> {
    let mut when = Vec::new();
    for c in &r.when {
        if let Some(c) = compile_condition(c, ctx, warnings)? {
            when.push(c);
        }
    }
    let mut from = Vec::new();
    for f in r.from.iter().flatten() {
        let s = f.source.clone().unwrap_or_default();
        from.push(compile_source(&s, ctx, warnings)?);
    }
    let mut to = Vec::new();
    for t in r.to.iter().flatten() {
        let o = t.operation.clone().unwrap_or_default();
        to.push(compile_operation(&o, ctx, warnings)?);
    }
    Some(CRule {
        index,
        from,
        to,
        when,
    })
}

/// Build one condition from value lists with `f`, applying the bad-value rule.
fn cond(
    key: Key,
    field: &str,
    values: &[String],
    not_values: &[String],
    ctx: &RuleCtx<'_>,
    warnings: &mut Vec<String>,
    f: &dyn Fn(&str) -> Result<Vec<Val>, BadValue>,
) -> Option<Option<Cond>> {
    if values.is_empty() && not_values.is_empty() {
        return Some(None);
    }
    let mut conv = |vs: &[String]| -> Option<Vec<Val>> {
        let mut out = Vec::new();
        for v in vs {
            match f(v) {
                Ok(mut m) => out.append(&mut m),
                Err(BadValue(why)) => {
                    warnings.push(why);
                    if ctx.strict() {
                        return None;
                    }
                }
            }
        }
        Some(out)
    };
    let pos = conv(values)?;
    let neg = conv(not_values)?;
    if pos.is_empty() && neg.is_empty() {
        // Every value was dropped (DENY/AUDIT): the attribute is ignored, as Istio does.
        return Some(None);
    }
    let label = Arc::new(Label {
        field: field.to_string(),
        not_field: match field.split_once(' ') {
            // A `when` key: `request.headers[x] notValues`.
            Some((k, _)) => format!("{k} notValues"),
            None => format!("not{}{}", field[..1].to_ascii_uppercase(), &field[1..]),
        },
        values: values.to_vec(),
        not_values: not_values.to_vec(),
    });
    Some(Some(Cond {
        key,
        pos,
        neg,
        label,
    }))
}

fn principal_vals(v: &str, tds: &[String]) -> Result<Vec<Val>, BadValue> {
    Ok(replace_trust_domain_aliases(v, tds)
        .iter()
        .map(|p| Val::Str(StrMatch::istio_with_prefix(p, "spiffe://")))
        .collect())
}

fn namespace_val(v: &str) -> Result<Vec<Val>, BadValue> {
    Ok(vec![Val::Str(StrMatch::regex(&format!(
        ".*/ns/{}/.*",
        glob_to_regex(v)
    )))])
}

fn service_account_val(v: &str, policy_ns: &str) -> Result<Vec<Val>, BadValue> {
    let (ns, sa) = v.split_once('/').unwrap_or((policy_ns, v));
    Ok(vec![Val::Str(StrMatch::regex(&format!(
        "spiffe://.+/ns/{}/(.+/|)sa/{}(/.+)?",
        regex::escape(ns),
        regex::escape(sa)
    )))])
}

fn trust_domain_vals(v: &str, tds: &[String]) -> Result<Vec<Val>, BadValue> {
    // Values equal to the local trust domain or an alias expand to all of them.
    let expanded: Vec<String> = if tds.iter().any(|t| t == v) {
        tds.to_vec()
    } else {
        vec![v.to_string()]
    };
    Ok(expanded
        .iter()
        .map(|v| {
            let m = if v == "*" {
                StrMatch::regex("spiffe://[^/]+/.*")
            } else if let Some(s) = v.strip_prefix('*') {
                StrMatch::regex(&format!("spiffe://[^/]*{}/.*", regex::escape(s)))
            } else if let Some(p) = v.strip_suffix('*') {
                StrMatch::regex(&format!("spiffe://{}[^/]*/.*", regex::escape(p)))
            } else {
                StrMatch::Prefix(format!("spiffe://{v}/").into())
            };
            Val::Str(m)
        })
        .collect())
}

fn cidr_val(v: &str) -> Result<Vec<Val>, BadValue> {
    parse_cidr(v)
        .map(|n| vec![Val::Cidr(n)])
        .ok_or_else(|| BadValue(format!("invalid IP address or CIDR {v:?}")))
}

fn port_val(v: &str) -> Result<Vec<Val>, BadValue> {
    v.parse::<u16>()
        .map(|p| vec![Val::Port(p)])
        .map_err(|_| BadValue(format!("invalid port {v:?}")))
}

fn compile_source(s: &Source, ctx: &RuleCtx<'_>, w: &mut Vec<String>) -> Option<Vec<Cond>> {
    let tds = ctx.trust_domains;
    let ns = ctx.policy_ns;
    let mut out = Vec::new();
    let specs: [FieldSpec<'_>; 7] = [
        (
            Key::PeerPrincipal,
            "principals",
            &s.principals,
            &s.not_principals,
            &|v| principal_vals(v, tds),
        ),
        (
            Key::RequestPrincipal,
            "requestPrincipals",
            &s.request_principals,
            &s.not_request_principals,
            &|v| Ok(vec![Val::ReqPrincipal(RequestPrincipalMatch::new(v))]),
        ),
        (
            Key::PeerPrincipal,
            "namespaces",
            &s.namespaces,
            &s.not_namespaces,
            &namespace_val,
        ),
        (
            Key::PeerPrincipal,
            "serviceAccounts",
            &s.service_accounts,
            &s.not_service_accounts,
            &|v| service_account_val(v, ns),
        ),
        (
            Key::PeerPrincipal,
            "trustDomains",
            &s.trust_domains,
            &s.not_trust_domains,
            &|v| trust_domain_vals(v, tds),
        ),
        (
            Key::SourceIp,
            "ipBlocks",
            &s.ip_blocks,
            &s.not_ip_blocks,
            &cidr_val,
        ),
        (
            Key::RemoteIp,
            "remoteIpBlocks",
            &s.remote_ip_blocks,
            &s.not_remote_ip_blocks,
            &cidr_val,
        ),
    ];
    for (key, field, pos, neg, f) in specs {
        if let Some(c) = cond(key, field, pos, neg, ctx, w, f)? {
            out.push(c);
        }
    }
    Some(out)
}

fn compile_operation(o: &Operation, ctx: &RuleCtx<'_>, w: &mut Vec<String>) -> Option<Vec<Cond>> {
    let mut out = Vec::new();
    let specs: [FieldSpec<'_>; 4] = [
        (Key::Host, "hosts", &o.hosts, &o.not_hosts, &|v| {
            Ok(vec![Val::StrI(StrMatch::header(v))])
        }),
        (Key::Method, "methods", &o.methods, &o.not_methods, &|v| {
            Ok(vec![Val::Str(StrMatch::header(v))])
        }),
        (Key::Path, "paths", &o.paths, &o.not_paths, &|v| {
            Ok(vec![Val::Path(PathMatch::new(v))])
        }),
        (Key::DestPort, "ports", &o.ports, &o.not_ports, &port_val),
    ];
    for (key, field, pos, neg, f) in specs {
        if let Some(c) = cond(key, field, pos, neg, ctx, w, f)? {
            out.push(c);
        }
    }
    Some(out)
}

/// Split `a[b][c]` → `("a", ["b", "c"])`.
fn split_brackets(key: &str) -> Option<(&str, Vec<String>)> {
    let open = key.find('[')?;
    let head = &key[..open];
    let mut rest = &key[open..];
    let mut parts = Vec::new();
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let close = inner.find(']')?;
        if close == 0 {
            return None;
        }
        parts.push(inner[..close].to_string());
        rest = &inner[close + 1..];
    }
    Some((head, parts))
}

fn compile_condition(
    c: &Condition,
    ctx: &RuleCtx<'_>,
    w: &mut Vec<String>,
) -> Option<Option<Cond>> {
    let k = c.key();
    let tds = ctx.trust_domains;
    let ns = ctx.policy_ns;
    let field = format!("{k} values");
    let field = field.as_str();
    let str_vals =
        |v: &str| -> Result<Vec<Val>, BadValue> { Ok(vec![Val::Str(StrMatch::istio(v))]) };
    let built: Option<Option<Cond>> = match k {
        "source.ip" => cond(
            Key::SourceIp,
            field,
            &c.values,
            &c.not_values,
            ctx,
            w,
            &cidr_val,
        ),
        "remote.ip" => cond(
            Key::RemoteIp,
            field,
            &c.values,
            &c.not_values,
            ctx,
            w,
            &cidr_val,
        ),
        "destination.ip" => cond(
            Key::DestIp,
            field,
            &c.values,
            &c.not_values,
            ctx,
            w,
            &cidr_val,
        ),
        "destination.port" => cond(
            Key::DestPort,
            field,
            &c.values,
            &c.not_values,
            ctx,
            w,
            &port_val,
        ),
        "connection.sni" => cond(Key::Sni, field, &c.values, &c.not_values, ctx, w, &str_vals),
        "source.namespace" => cond(
            Key::PeerPrincipal,
            field,
            &c.values,
            &c.not_values,
            ctx,
            w,
            &namespace_val,
        ),
        "source.principal" => cond(
            Key::PeerPrincipal,
            field,
            &c.values,
            &c.not_values,
            ctx,
            w,
            &|v| principal_vals(v, tds),
        ),
        "source.serviceAccount" => cond(
            Key::PeerPrincipal,
            field,
            &c.values,
            &c.not_values,
            ctx,
            w,
            &|v| service_account_val(v, ns),
        ),
        "source.trustDomain" => cond(
            Key::PeerPrincipal,
            field,
            &c.values,
            &c.not_values,
            ctx,
            w,
            &|v| trust_domain_vals(v, tds),
        ),
        "request.auth.principal" => cond(
            Key::RequestPrincipal,
            field,
            &c.values,
            &c.not_values,
            ctx,
            w,
            &|v| Ok(vec![Val::ReqPrincipal(RequestPrincipalMatch::new(v))]),
        ),
        "request.auth.audiences" => cond(
            Key::Claim(vec!["aud".into()]),
            field,
            &c.values,
            &c.not_values,
            ctx,
            w,
            &str_vals,
        ),
        "request.auth.presenter" => cond(
            Key::Claim(vec!["azp".into()]),
            field,
            &c.values,
            &c.not_values,
            ctx,
            w,
            &str_vals,
        ),
        _ => match split_brackets(k) {
            Some(("request.headers", parts)) if parts.len() == 1 => cond(
                Key::Header(parts[0].to_ascii_lowercase()),
                field,
                &c.values,
                &c.not_values,
                ctx,
                w,
                &|v| Ok(vec![Val::Str(StrMatch::header(v))]),
            ),
            Some(("request.auth.claims", parts)) => cond(
                Key::Claim(parts),
                field,
                &c.values,
                &c.not_values,
                ctx,
                w,
                &str_vals,
            ),
            Some((h, _)) if h.starts_with("experimental.envoy.filters.") => cond(
                Key::Metadata,
                field,
                &c.values,
                &c.not_values,
                ctx,
                w,
                &str_vals,
            ),
            _ => {
                w.push(format!("unknown attribute {k:?}"));
                // Istio refuses to build such a rule at all.
                return None;
            }
        },
    };
    // `Some(None)`: every value was dropped, the condition is ignored.
    built
}

/// Istio's `ReplaceTrustDomainAliases` for one principal value (without `spiffe://`): a value
/// of the form `<td>/ns/<ns>/sa/<sa>` whose trust domain is `cluster.local`, the local trust
/// domain or an alias (wildcards allowed on either side) is expanded to every trust domain of
/// the bundle; a `*` trust domain or any other shape is kept as written.
pub(crate) fn replace_trust_domain_aliases(principal: &str, tds: &[String]) -> Vec<String> {
    let parts: Vec<&str> = principal.split('/').collect();
    if parts.len() != 5 || parts[0] == "*" {
        return vec![principal.to_string()];
    }
    let td = parts[0];
    let in_bundle = td == "cluster.local" || tds.iter().any(|t| td_string_match(td, t));
    if !in_bundle {
        return vec![principal.to_string()];
    }
    let mut out: Vec<String> = Vec::new();
    for t in tds {
        let np = if suffix_pattern_match(t, td) {
            principal.to_string()
        } else {
            format!("{t}/{}", parts[1..].join("/"))
        };
        if !out.contains(&np) {
            out.push(np);
        }
    }
    out
}

fn prefix_pattern_match(a: &str, pattern: &str) -> bool {
    pattern.strip_suffix('*').is_some_and(|p| a.starts_with(p))
}

fn suffix_pattern_match(a: &str, pattern: &str) -> bool {
    pattern.strip_prefix('*').is_some_and(|s| a.ends_with(s))
}

/// Istio trustdomain `stringMatch` for one list entry: the pattern may be on either side.
fn td_string_match(a: &str, s: &str) -> bool {
    a == s
        || s == "*"
        || prefix_pattern_match(a, s)
        || prefix_pattern_match(s, a)
        || suffix_pattern_match(a, s)
        || suffix_pattern_match(s, a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn alias_expansion_matches_istio_goldens() {
        // simple-policy-multiple-td-aliases: td1 + aliases cluster.local, some-td.
        let b = v(&["td1", "cluster.local", "some-td"]);
        assert_eq!(
            replace_trust_domain_aliases("cluster.local/ns/r/sa/p", &b),
            v(&[
                "td1/ns/r/sa/p",
                "cluster.local/ns/r/sa/p",
                "some-td/ns/r/sa/p"
            ])
        );
        assert_eq!(
            replace_trust_domain_aliases("some-td/ns/r/sa/p", &b),
            v(&[
                "td1/ns/r/sa/p",
                "cluster.local/ns/r/sa/p",
                "some-td/ns/r/sa/p"
            ])
        );
        // simple-policy-principal-with-wildcard: td1 + alias foobar.
        let b = v(&["td1", "foobar"]);
        assert_eq!(
            replace_trust_domain_aliases("*/ns/foo/sa/x", &b),
            v(&["*/ns/foo/sa/x"])
        );
        assert_eq!(
            replace_trust_domain_aliases("*bar/ns/foo/sa/x", &b),
            v(&["td1/ns/foo/sa/x", "*bar/ns/foo/sa/x"])
        );
        // td-aliases-source-principal: new-td + old-td, some-trustdomain.
        let b = v(&["new-td", "old-td", "some-trustdomain"]);
        assert_eq!(
            replace_trust_domain_aliases("*-td/ns/foo/sa/prefix-td", &b),
            v(&[
                "*-td/ns/foo/sa/prefix-td",
                "some-trustdomain/ns/foo/sa/prefix-td"
            ])
        );
        // Foreign trust domain: untouched. Not a SPIFFE shape: untouched.
        assert_eq!(
            replace_trust_domain_aliases("other/ns/a/sa/b", &b),
            v(&["other/ns/a/sa/b"])
        );
        assert_eq!(
            replace_trust_domain_aliases("principal", &b),
            v(&["principal"])
        );
    }

    #[test]
    fn bracket_keys() {
        assert_eq!(
            split_brackets("request.auth.claims[a][b]"),
            Some(("request.auth.claims", v(&["a", "b"])))
        );
        assert_eq!(
            split_brackets("request.auth.claims[foo.com/name]"),
            Some(("request.auth.claims", v(&["foo.com/name"])))
        );
        assert_eq!(split_brackets("request.headers[]"), None);
        assert_eq!(split_brackets("source.ip"), None);
    }
}
