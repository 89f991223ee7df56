//! The decision engine: compiled, indexed policies evaluated in Istio's order
//! (CUSTOM, DENY, ALLOW; AUDIT on the side; dry-run policies reported, never enforced).

use std::borrow::Cow;
use std::sync::Arc;

use crate::eval_compile::{CRule, CompiledPolicy, Cond, Key, Val, compile_policy};
use crate::eval_match::claim_matches;
use crate::eval_mesh::MeshConfig;
use crate::eval_request::{HttpRequest, RequestContext, Workload};
use crate::explain::{
    Decision, DryRun, HeaderMutation, PolicyRef, ReasonCode, RuleMatch, ShadowAllow, Verdict,
};
use crate::jwt::{AuthnOutcome, JwksSource, ReqAuthnSet};
use crate::model::{Action, Resource};
use crate::normalize::normalize_path;
use crate::resolve::{EffectiveMtls, PeerAuthnSet, SelectorIndex, applies};
use std::time::SystemTime;

/// The extension-provider hook for CUSTOM policies (Istio's ext_authz). The proxy implements it
/// over the network; the engine stays pure.
pub trait ExtAuthz {
    /// Ask provider `provider` about this request; `true` allows it.
    fn check(&self, provider: &str, workload: &Workload, ctx: &RequestContext) -> bool;

    /// Whether CUSTOM was already decided for this request (allowed, or no rule matched), so
    /// [`Engine::check`] need not judge it first again.
    fn settled(&self) -> bool {
        false
    }
}

/// The provider already allowed this request (CUSTOM runs once, before authentication).
struct Answered;

impl ExtAuthz for Answered {
    fn check(&self, _: &str, _: &Workload, _: &RequestContext) -> bool {
        true
    }

    fn settled(&self) -> bool {
        true
    }
}

/// No extension provider is reachable: every CUSTOM check denies (fail closed).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoExtAuthz;

impl ExtAuthz for NoExtAuthz {
    fn check(&self, _: &str, _: &Workload, _: &RequestContext) -> bool {
        false
    }
}

/// Compiled security policies of a mesh: answers which mTLS mode a port has, how a request
/// authenticates, and whether it is authorized, with an explanation.
#[derive(Debug)]
pub struct Engine {
    mesh: MeshConfig,
    authz: Vec<CompiledPolicy>,
    authz_index: SelectorIndex,
    peer: PeerAuthnSet,
    pub(crate) reqauthn: ReqAuthnSet,
    warnings: Vec<String>,
}

/// The per-request view of attributes, computed once.
struct Attrs<'a> {
    ctx: &'a RequestContext,
    path: Option<String>,
}

impl Engine {
    /// Compile validated resources (as the loader hands them out) under `mesh`.
    pub fn new(resources: impl IntoIterator<Item = Resource>, mesh: MeshConfig) -> Engine {
        let tds = mesh.trust_domains();
        let mut aps = Vec::new();
        let mut pas = Vec::new();
        let mut ras = Vec::new();
        for r in resources {
            match r {
                Resource::AuthorizationPolicy(p) => aps.push(p),
                Resource::PeerAuthentication(p) => pas.push(p),
                Resource::RequestAuthentication(p) => ras.push(p),
            }
        }
        // Deterministic order: by namespace, then name.
        aps.sort_by(|a, b| (a.namespace(), a.name()).cmp(&(b.namespace(), b.name())));
        let mut warnings = Vec::new();
        let mut authz = Vec::with_capacity(aps.len());
        let mut authz_index = SelectorIndex::default();
        for p in &aps {
            let c = compile_policy(p, &tds);
            let at = c.policy.located(&p.origin);
            warnings.extend(c.warnings.iter().map(|w| format!("{at}: {w}")));
            if c.has_target_refs {
                continue;
            }
            if c.action == Action::Custom {
                let prov = c.provider.as_deref().unwrap_or("");
                match mesh.provider(prov).map(|p| &p.authz) {
                    None => warnings.push(format!(
                        "{at}: CUSTOM provider {prov:?} is not defined in the mesh config extensionProviders; requests its rules match are denied"
                    )),
                    Some(Err(e)) => warnings.push(format!(
                        "{at}: CUSTOM provider {prov:?} cannot be used ({e}); requests its rules match are denied"
                    )),
                    Some(Ok(_)) => {}
                }
            }
            authz_index.insert(authz.len(), &c.policy.namespace, &c.selector);
            authz.push(c);
        }
        let reqauthn = ReqAuthnSet::new(ras, &mut warnings);
        Engine {
            mesh,
            authz,
            authz_index,
            peer: PeerAuthnSet::new(pas),
            reqauthn,
            warnings,
        }
    }

    /// The mesh settings in use.
    pub fn mesh(&self) -> &MeshConfig {
        &self.mesh
    }

    /// The `jwksUri` of every RequestAuthentication rule, once each (the first rule's
    /// `timeout` wins), in policy order: what a JWKS fetcher has to keep fresh.
    pub fn jwks_uris(&self) -> Vec<crate::JwksFetch> {
        let mut out: Vec<crate::JwksFetch> = Vec::new();
        for (uri, timeout, discovery) in self.reqauthn.jwks_uris() {
            if !out.iter().any(|f| f.uri == uri) {
                out.push(crate::JwksFetch {
                    uri,
                    timeout,
                    discovery,
                });
            }
        }
        out
    }

    /// Translation warnings (values dropped the way Istio drops them, CUSTOM providers that
    /// cannot be used), each naming the file and document, the policy and why.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// What makes policy deny for this workload alone, beyond [`Engine::warnings`]: several
    /// CUSTOM providers selecting it (Istio allows one per workload; matching requests are
    /// denied). Empty when nothing does.
    pub fn workload_warnings(&self, workload: &Workload) -> Vec<String> {
        let customs: Vec<&CompiledPolicy> = self
            .applicable(workload)
            .into_iter()
            .filter(|p| p.action == Action::Custom && !p.dry_run)
            .collect();
        let mut providers: Vec<&str> = customs
            .iter()
            .map(|p| p.provider.as_deref().unwrap_or(""))
            .collect();
        providers.sort_unstable();
        providers.dedup();
        if providers.len() < 2 {
            return Vec::new();
        }
        let names: Vec<String> = customs.iter().map(|p| p.policy.to_string()).collect();
        vec![format!(
            "several CUSTOM providers ({}) select this workload, through {}; requests their rules match are denied (one provider per workload, as Istio)",
            providers.join(", "),
            names.join(", ")
        )]
    }

    /// The effective PeerAuthentication mode for `port` of `workload` (workload > namespace >
    /// mesh, port-level modes, UNSET inherits, default PERMISSIVE).
    pub fn peer_authentication(&self, workload: &Workload, port: u16) -> EffectiveMtls {
        self.peer
            .effective(&self.mesh.root_namespace, workload, port)
    }

    /// Authenticate `request` with the RequestAuthentications that apply to `workload`:
    /// no token → [`AuthnOutcome::NoToken`]; invalid token → rejected with 401; audience not
    /// allowed → 403. `now` is the clock for `exp`/`nbf` (60 s skew); `keys` supplies
    /// `jwksUri` key sets (inline `jwks` need none). Signatures are checked with
    /// `rampart_certs::jwt` (RS*, PS*, ES256/384, EdDSA).
    pub fn authenticate_request(
        &self,
        workload: &Workload,
        request: &HttpRequest,
        now: SystemTime,
        keys: &dyn JwksSource,
    ) -> AuthnOutcome {
        crate::jwt::authenticate(
            &self.reqauthn,
            &self.mesh.root_namespace,
            workload,
            request,
            now,
            keys,
        )
    }

    /// Every header that a RequestAuthentication applying to `workload` writes from a
    /// verified token (`outputPayloadToHeader`, `outputClaimToHeaders`), lowercased and
    /// deduplicated. A proxy removes the client's copies of these before authentication,
    /// so that only a verified token can set them (as Envoy's jwt_authn does).
    pub fn jwt_output_headers(&self, workload: &Workload) -> Vec<String> {
        self.reqauthn
            .output_headers(&self.mesh.root_namespace, workload)
    }

    /// One request through every stage, in the order of an Istio sidecar's filters: CUSTOM
    /// first, on the request as sent (ext_authz runs before jwt_authn, so a provider's
    /// denial answers before any token is looked at, and the provider is asked once); then
    /// authentication, where a rejected token answers 401/403 before any other
    /// AuthorizationPolicy; then DENY and ALLOW, with the verified claims (if any) feeding
    /// `requestPrincipals`/`request.auth.*`. On allow the decision carries the JWT header
    /// mutations. `ctx.jwt` is overwritten.
    pub fn check(
        &self,
        workload: &Workload,
        ctx: &RequestContext,
        now: SystemTime,
        keys: &dyn JwksSource,
        ext: &dyn ExtAuthz,
    ) -> Decision {
        let mut ext = ext;
        if !ext.settled() && self.has_custom(workload) {
            let mut sent = ctx.clone();
            sent.jwt = None;
            let d = self.authorize_with(workload, &sent, ext);
            if matches!(
                d.reason_code,
                ReasonCode::CustomDenied | ReasonCode::CustomProviderInvalid
            ) {
                return d;
            }
            ext = &Answered;
        }
        let (c, headers) = match self.authenticated(workload, ctx, now, keys) {
            Ok(ok) => ok,
            Err(d) => return *d,
        };
        let mut d = self.authorize_with(workload, &c, ext);
        if d.is_allowed() {
            d.headers = headers;
        }
        d
    }

    /// The request as DENY and ALLOW judge it: the verified claims set (or none), and the
    /// JWT header mutations applied, as the app will receive it (Envoy's jwt_authn runs
    /// before RBAC on one header map); or the decision refusing its token.
    fn authenticated(
        &self,
        workload: &Workload,
        ctx: &RequestContext,
        now: SystemTime,
        keys: &dyn JwksSource,
    ) -> Result<(RequestContext, Vec<HeaderMutation>), Box<Decision>> {
        let mut c = ctx.clone();
        c.jwt = None;
        let Some(http) = &ctx.http else {
            return Ok((c, Vec::new()));
        };
        let mut headers = Vec::new();
        match self.authenticate_request(workload, http, now, keys) {
            AuthnOutcome::NoToken => {}
            AuthnOutcome::Authenticated {
                claims, headers: h, ..
            } => {
                c.jwt = Some(claims);
                headers = h;
            }
            AuthnOutcome::Rejected {
                status,
                reason,
                policy,
            } => {
                let code = if status == 403 {
                    ReasonCode::JwtAudienceMismatch
                } else {
                    ReasonCode::JwtInvalid
                };
                let mut d = Decision::new(Verdict::Deny, status, code, reason);
                d.policy = policy.map(Arc::new);
                return Err(Box::new(d));
            }
        }
        // Claim and payload headers set, a token not forwarded gone.
        if let Some(h) = c.http.as_mut() {
            apply_mutations(&mut h.headers, &headers);
            for m in &headers {
                if let HeaderMutation::RemoveQueryParam { name } = m {
                    h.path = crate::explain::remove_query_param(&h.path, name);
                }
            }
        }
        Ok((c, headers))
    }

    /// Why `decision` (what [`Engine::check`] answered for these arguments) came out so, rule
    /// by rule, one line each: for a denial because no ALLOW rule matched, each ALLOW rule's
    /// first condition that failed (`ns/name rule 0: to.operation.methods: DELETE not in
    /// [GET]`); for a DENY that matched a TCP connection after its HTTP-only fields were
    /// dropped, that. Request header values and claim values are never shown (names are); a
    /// verified token's request principal (`iss/sub`) is.
    ///
    /// For `rampart authz check`: it re-evaluates every rule, so the proxy never calls it
    /// per request (its decision's one-line reason is enough for its log).
    pub fn explain(
        &self,
        workload: &Workload,
        ctx: &RequestContext,
        now: SystemTime,
        keys: &dyn JwksSource,
        decision: &Decision,
    ) -> Vec<String> {
        let Ok((c, _)) = self.authenticated(workload, ctx, now, keys) else {
            return Vec::new(); // the token's refusal is the reason
        };
        let mut attrs = Attrs {
            ctx: &c,
            path: None,
        };
        if let Some(h) = &c.http {
            match normalize_path(&h.path, self.mesh.path_normalization) {
                Ok(n) => attrs.path = Some(n.path),
                Err(_) => return Vec::new(),
            }
        }
        let http = c.http.is_some();
        let mut out = Vec::new();
        match decision.reason_code {
            ReasonCode::NoAllowMatched => {
                for p in self
                    .applicable(workload)
                    .into_iter()
                    .filter(|p| p.action == Action::Allow && !p.dry_run)
                {
                    if p.http.is_empty() {
                        out.push(format!("{}: no rules (allows nothing)", p.policy));
                    }
                    for r in &p.http {
                        let rule = if http {
                            Some(r)
                        } else {
                            p.tcp.iter().find(|t| t.index == r.index)
                        };
                        let why = match rule {
                            None => format!(
                                "dropped on this TCP port: it uses HTTP-only fields ({})",
                                http_only_fields(r).join(", ")
                            ),
                            Some(rule) => match why_not(rule, &attrs, Reading::Every) {
                                Some(why) => why,
                                None => continue,
                            },
                        };
                        out.push(format!("{} rule {}: {why}", p.policy, r.index));
                    }
                }
            }
            ReasonCode::DenyMatched if !http => {
                let (Some(pr), Some(i)) = (&decision.policy, decision.rule) else {
                    return out;
                };
                let found = self
                    .applicable(workload)
                    .into_iter()
                    .find(|p| p.policy == *pr)
                    .and_then(|p| p.http.iter().find(|r| r.index == i));
                if let Some(r) = found {
                    let dropped = http_only_fields(r);
                    if !dropped.is_empty() {
                        out.push(format!(
                            "{pr} rule {i}: its HTTP-only fields ({}) were dropped on this TCP port, so it matched on the rest (as Istio); add `ports` to keep a DENY rule off TCP ports",
                            dropped.join(", ")
                        ));
                    }
                }
            }
            _ => {}
        }
        out
    }

    fn finish(
        audit: Option<RuleMatch>,
        dry_run: DryRun,
        considered: Vec<Arc<PolicyRef>>,
        path: Option<String>,
        mut d: Decision,
    ) -> Decision {
        d.audit = audit;
        d.dry_run = dry_run;
        d.considered = considered;
        d.normalized_path = path;
        d
    }

    /// The AuthorizationPolicies that apply to `workload` (namespace/name), in evaluation order.
    pub fn policies_for(&self, workload: &Workload) -> Vec<PolicyRef> {
        self.applicable(workload)
            .into_iter()
            .map(|p| (*p.policy).clone())
            .collect()
    }

    /// Whether an enforced CUSTOM AuthorizationPolicy applies to `workload` (a proxy asks an
    /// extension provider only then).
    pub fn has_custom(&self, workload: &Workload) -> bool {
        self.applicable(workload)
            .iter()
            .any(|p| p.action == Action::Custom && !p.dry_run)
    }

    fn applicable(&self, w: &Workload) -> Vec<&CompiledPolicy> {
        let mut ids = Vec::new();
        self.authz_index
            .candidates(&self.mesh.root_namespace, w, &mut ids);
        ids.into_iter()
            .map(|i| &self.authz[i])
            .filter(|p| {
                applies(
                    &p.policy.namespace,
                    &p.selector,
                    p.has_target_refs,
                    &self.mesh.root_namespace,
                    w,
                )
            })
            .collect()
    }

    /// Authorize a connection (TCP) or request (HTTP) to `workload`. CUSTOM policies that match
    /// are denied (no extension provider is wired: fail closed); see [`Engine::authorize_with`].
    pub fn authorize(&self, workload: &Workload, ctx: &RequestContext) -> Decision {
        self.authorize_with(workload, ctx, &NoExtAuthz)
    }

    /// Authorize with an extension-provider hook for CUSTOM policies.
    pub fn authorize_with(
        &self,
        workload: &Workload,
        ctx: &RequestContext,
        ext: &dyn ExtAuthz,
    ) -> Decision {
        let mut attrs = Attrs { ctx, path: None };
        if let Some(h) = &ctx.http {
            match normalize_path(&h.path, self.mesh.path_normalization) {
                Ok(n) => attrs.path = Some(n.path),
                Err(e) => {
                    return Decision::new(
                        Verdict::Deny,
                        400,
                        ReasonCode::BadPath,
                        format!("bad request path: {}", e.reason),
                    );
                }
            }
        }
        let policies = self.applicable(workload);
        let http = ctx.http.is_some();
        let first_match = |p: &CompiledPolicy| -> Option<RuleMatch> {
            let rules = if http { &p.http } else { &p.tcp };
            rules
                .iter()
                .find(|r| rule_matches(r, &attrs, Reading::for_action(p.action)))
                .map(|r| RuleMatch {
                    policy: p.policy.clone(),
                    action: p.action,
                    rule: r.index,
                })
        };

        let considered: Vec<Arc<PolicyRef>> = policies
            .iter()
            .filter(|p| p.action != Action::Audit && !p.dry_run)
            .map(|p| p.policy.clone())
            .collect();
        let mut dry_run = DryRun::default();
        let mut audit = None;
        for p in &policies {
            match (p.action, p.dry_run) {
                (Action::Audit, _) if audit.is_none() => audit = first_match(p),
                (Action::Deny, true) if dry_run.deny.is_none() => dry_run.deny = first_match(p),
                (Action::Allow, true) => {
                    let m = first_match(p);
                    match &mut dry_run.allow {
                        Some(s) if s.matched.is_some() => {}
                        slot => {
                            *slot = Some(ShadowAllow {
                                verdict: if m.is_some() {
                                    Verdict::Allow
                                } else {
                                    Verdict::Deny
                                },
                                matched: m,
                            })
                        }
                    }
                }
                _ => {}
            }
        }
        // 1. CUSTOM.
        let customs: Vec<&&CompiledPolicy> = policies
            .iter()
            .filter(|p| p.action == Action::Custom && !p.dry_run)
            .collect();
        if !customs.is_empty() {
            let mut providers: Vec<&str> = customs
                .iter()
                .map(|p| p.provider.as_deref().unwrap_or(""))
                .collect();
            providers.sort_unstable();
            providers.dedup();
            for p in &customs {
                if let Some(m) = first_match(p) {
                    let prov = p.provider.as_deref().unwrap_or("");
                    let usable = match self.mesh.provider(prov).map(|p| &p.authz) {
                        None => Err(format!(
                            "CUSTOM provider {prov:?} is not defined in the mesh config extensionProviders; matching requests are denied (fail closed)"
                        )),
                        Some(Err(e)) => Err(format!(
                            "CUSTOM provider {prov:?} cannot be used: {e}; matching requests are denied (fail closed)"
                        )),
                        Some(Ok(_)) => Ok(()),
                    };
                    if usable.is_err() || providers.len() > 1 {
                        let why = if let Err(why) = usable {
                            why
                        } else {
                            format!(
                                "several CUSTOM providers ({}) select this workload; matching requests are denied (fail closed)",
                                providers.join(", ")
                            )
                        };
                        return Self::finish(
                            audit,
                            dry_run,
                            considered,
                            attrs.path,
                            Decision::new(
                                Verdict::Deny,
                                403,
                                ReasonCode::CustomProviderInvalid,
                                why,
                            )
                            .with_match(&m),
                        );
                    }
                    if !ext.check(prov, workload, ctx) {
                        return Self::finish(
                            audit,
                            dry_run,
                            considered,
                            attrs.path,
                            Decision::new(
                                Verdict::Deny,
                                403,
                                ReasonCode::CustomDenied,
                                format!("extension provider {prov:?} denied the request"),
                            )
                            .with_match(&m),
                        );
                    }
                    // Allowed by the provider: DENY and ALLOW still apply.
                    break;
                }
            }
        }

        // 2. DENY: any match denies.
        for p in policies
            .iter()
            .filter(|p| p.action == Action::Deny && !p.dry_run)
        {
            if let Some(m) = first_match(p) {
                return Self::finish(
                    audit,
                    dry_run,
                    considered,
                    attrs.path,
                    Decision::new(
                        Verdict::Deny,
                        403,
                        ReasonCode::DenyMatched,
                        format!("DENY policy {} rule {} matched", m.policy, m.rule),
                    )
                    .with_match(&m),
                );
            }
        }

        // 3-5. ALLOW.
        let allows: Vec<&&CompiledPolicy> = policies
            .iter()
            .filter(|p| p.action == Action::Allow && !p.dry_run)
            .collect();
        if allows.is_empty() {
            return Self::finish(
                audit,
                dry_run,
                considered,
                attrs.path,
                Decision::new(
                    Verdict::Allow,
                    200,
                    ReasonCode::NoAllowPolicy,
                    "no ALLOW policy applies to the workload".to_string(),
                ),
            );
        }
        for p in &allows {
            if let Some(m) = first_match(p) {
                return Self::finish(
                    audit,
                    dry_run,
                    considered,
                    attrs.path,
                    Decision::new(
                        Verdict::Allow,
                        200,
                        ReasonCode::AllowMatched,
                        format!("ALLOW policy {} rule {} matched", m.policy, m.rule),
                    )
                    .with_match(&m),
                );
            }
        }
        let names: Vec<String> = allows.iter().map(|p| p.policy.to_string()).collect();
        let mut why = format!(
            "ALLOW policies apply to the workload but none matched ({})",
            names.join(", ")
        );
        if !http && allows.iter().any(|p| p.tcp.len() < p.http.len()) {
            why.push_str("; rules with HTTP-only attributes never match on a TCP port");
        }
        Self::finish(
            audit,
            dry_run,
            considered,
            attrs.path,
            Decision::new(Verdict::Deny, 403, ReasonCode::NoAllowMatched, why),
        )
    }
}

/// How a header sent more than once is read against a value. Envoy used to match the values
/// joined with `,` only, so `x-role: user` + `x-role: admin` slipped past a DENY on `admin`
/// while the app read `admin` (CVE-2026-26308); it now matches each value on its own. We
/// read them so that a repeated header never helps a request: a rule whose match denies
/// (DENY, AUDIT, CUSTOM) matches a value if the joined value or **any** single value does; a
/// rule whose match allows (ALLOW) only if the joined value or **every** single value does.
/// `notValues` takes the opposite reading, so it too errs towards DENY firing and ALLOW not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// Any single value may match (rules that deny).
    Any,
    /// Every single value must match (rules that allow).
    Every,
}

impl Reading {
    fn for_action(action: Action) -> Reading {
        match action {
            Action::Allow => Reading::Every,
            Action::Deny | Action::Audit | Action::Custom => Reading::Any,
        }
    }

    fn flip(self) -> Reading {
        match self {
            Reading::Any => Reading::Every,
            Reading::Every => Reading::Any,
        }
    }
}

fn rule_matches(r: &CRule, a: &Attrs<'_>, reading: Reading) -> bool {
    let all = |cs: &Vec<Cond>| cs.iter().all(|c| cond_matches(c, a, reading));
    (r.from.is_empty() || r.from.iter().any(all))
        && (r.to.is_empty() || r.to.iter().any(all))
        && r.when.iter().all(|c| cond_matches(c, a, reading))
}

fn cond_matches(c: &Cond, a: &Attrs<'_>, reading: Reading) -> bool {
    (c.pos.is_empty() || c.pos.iter().any(|v| val_matches(&c.key, v, a, reading)))
        && !c
            .neg
            .iter()
            .any(|v| val_matches(&c.key, v, a, reading.flip()))
}

/// Does attribute `key` of the request match `v`? An absent attribute never matches.
fn val_matches(key: &Key, v: &Val, a: &Attrs<'_>, reading: Reading) -> bool {
    let ctx = a.ctx;
    match key {
        Key::PeerPrincipal => ctx
            .source
            .principal
            .as_deref()
            .is_some_and(|p| str_val(v, p)),
        Key::SourceIp => ctx.source.ip.is_some_and(|ip| cidr_val(v, ip)),
        Key::RemoteIp => ctx.remote_ip().is_some_and(|ip| cidr_val(v, ip)),
        Key::DestIp => ctx.destination_ip.is_some_and(|ip| cidr_val(v, ip)),
        Key::DestPort => matches!(v, Val::Port(p) if *p == ctx.destination_port),
        Key::Sni => ctx.sni.as_deref().is_some_and(|s| str_val(v, s)),
        Key::Host => ctx.http.as_ref().is_some_and(|h| str_val(v, &h.host)),
        Key::Method => ctx.http.as_ref().is_some_and(|h| str_val(v, &h.method)),
        Key::Path => match (v, a.path.as_deref()) {
            (Val::Path(m), Some(p)) => m.matches(p),
            _ => false,
        },
        Key::Header(name) => ctx.http.as_ref().is_some_and(|h| {
            let joined = header_value(h, name, a).is_some_and(|hv| str_val(v, &hv));
            if joined || name.starts_with(':') {
                return joined;
            }
            let mut values = h.header_values(name).peekable();
            if values.peek().is_none() {
                return false;
            }
            match reading {
                Reading::Any => values.any(|hv| str_val(v, hv)),
                Reading::Every => values.all(|hv| str_val(v, hv)),
            }
        }),
        Key::RequestPrincipal => match (v, &ctx.jwt) {
            (Val::ReqPrincipal(m), Some(j)) => m.matches(j.str_claim("iss"), j.str_claim("sub")),
            _ => false,
        },
        Key::Claim(path) => match (v, &ctx.jwt) {
            (Val::Str(m), Some(j)) => j.path(path).is_some_and(|c| claim_matches(c, m)),
            _ => false,
        },
        Key::Metadata => false,
    }
}

fn header_value<'a>(
    h: &'a crate::eval_request::HttpRequest,
    name: &str,
    a: &Attrs<'_>,
) -> Option<Cow<'a, str>> {
    match name {
        ":method" => Some(Cow::Borrowed(h.method.as_str())),
        ":authority" => Some(Cow::Borrowed(h.host.as_str())),
        ":path" => Some(Cow::Owned(match (&a.path, h.path.find('?')) {
            (Some(p), Some(q)) => format!("{p}{}", &h.path[q..]),
            (Some(p), None) => p.clone(),
            (None, _) => h.path.clone(),
        })),
        _ => h.header(name),
    }
}

fn str_val(v: &Val, s: &str) -> bool {
    match v {
        Val::Str(m) => m.matches(s),
        Val::StrI(m) => m.matches_ignore_case(s),
        _ => false,
    }
}

fn cidr_val(v: &Val, ip: std::net::IpAddr) -> bool {
    // `::ffff:10.1.2.3` is the IPv4 client 10.1.2.3 (a dual-stack listener's view of it).
    matches!(v, Val::Cidr(n) if n.contains(&ip.to_canonical()))
}

// === explanations (rampart authz check only) ===

/// The HTTP-only fields a rule uses, as written (`to.operation.methods`, `when
/// request.headers[x]`), once each.
fn http_only_fields(r: &CRule) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |place: &str, c: &Cond| {
        if c.key.http_only() {
            let f = format!("{place}{}", c.label.field.trim_end_matches(" values"));
            if !out.contains(&f) {
                out.push(f);
            }
        }
    };
    for c in r.from.iter().flatten() {
        add("from.source.", c);
    }
    for c in r.to.iter().flatten() {
        add("to.operation.", c);
    }
    for c in &r.when {
        add("when ", c);
    }
    out
}

/// Why rule `r` does not match (its first failing part: `from`, then `to`, then `when`), or
/// `None` when it matches.
fn why_not(r: &CRule, a: &Attrs<'_>, reading: Reading) -> Option<String> {
    let first_failing = |cs: &Vec<Cond>| {
        cs.iter()
            .find(|c| !cond_matches(c, a, reading))
            .map(|c| describe_failure(c, a, reading))
    };
    for (list, place) in [(&r.from, "from"), (&r.to, "to")] {
        if list.is_empty() {
            continue;
        }
        let inner = if place == "from" {
            "source"
        } else {
            "operation"
        };
        let fails: Vec<Option<String>> = list.iter().map(first_failing).collect();
        if fails.iter().any(Option::is_none) {
            continue;
        }
        let fails: Vec<String> = fails.into_iter().flatten().collect();
        return Some(if let [one] = fails.as_slice() {
            format!("{place}.{inner}.{one}")
        } else {
            let each: Vec<String> = fails
                .iter()
                .enumerate()
                .map(|(j, f)| format!("{place}[{j}].{inner}.{f}"))
                .collect();
            format!("no `{place}` entry matched: {}", each.join("; "))
        });
    }
    r.when.iter().enumerate().find_map(|(j, c)| {
        (!cond_matches(c, a, reading))
            .then(|| format!("when[{j}] {}", describe_failure(c, a, reading)))
    })
}

/// `field: what the request had, and why that fails`; a header's or a claim's value, and the
/// values a policy lists for them, are not shown (they may be secrets).
fn describe_failure(c: &Cond, a: &Attrs<'_>, reading: Reading) -> String {
    let l = &c.label;
    let secret = matches!(c.key, Key::Header(_) | Key::Claim(_));
    let field = |f: &str| f.trim_end_matches(" values").to_string();
    let list = |vs: &[String]| {
        if secret {
            format!("{} listed value(s)", vs.len())
        } else {
            format!("[{}]", vs.join(", "))
        }
    };
    let seen = attribute_seen(&c.key, a);
    let pos_fails = !c.pos.is_empty() && !c.pos.iter().any(|v| val_matches(&c.key, v, a, reading));
    if pos_fails {
        match seen {
            Err(absent) => format!("{}: {absent}", field(&l.field)),
            Ok(v) => format!("{}: {v} not in {}", field(&l.field), list(&l.values)),
        }
    } else {
        let v = seen.unwrap_or_else(|absent| absent);
        format!("{}: {v} is in {}", l.not_field, list(&l.not_values))
    }
}

/// What the request has for `key`, for an explanation (`Err`: it has none). Header values
/// and claims are never shown.
fn attribute_seen(key: &Key, a: &Attrs<'_>) -> Result<String, String> {
    let ctx = a.ctx;
    let http = ctx.http.as_ref();
    let ip = |v: Option<std::net::IpAddr>, what: &str| {
        v.map(|ip| format!("{what} {ip}"))
            .ok_or_else(|| format!("no {what}"))
    };
    match key {
        Key::PeerPrincipal => ctx
            .source
            .principal
            .as_ref()
            .map(|p| format!("peer {p}"))
            .ok_or_else(|| "no peer identity (plaintext)".to_string()),
        Key::SourceIp => ip(ctx.source.ip, "peer address"),
        Key::RemoteIp => ip(ctx.remote_ip(), "remote address"),
        Key::DestIp => ip(ctx.destination_ip, "destination address"),
        Key::DestPort => Ok(format!("port {}", ctx.destination_port)),
        Key::Sni => ctx
            .sni
            .as_ref()
            .map(|s| format!("SNI {s}"))
            .ok_or_else(|| "no SNI".to_string()),
        Key::Host => http
            .map(|h| format!("host {}", h.host))
            .ok_or_else(|| "no host (TCP)".to_string()),
        Key::Method => http
            .map(|h| h.method.clone())
            .ok_or_else(|| "no method (TCP)".to_string()),
        Key::Path => a
            .path
            .as_ref()
            .map(|p| format!("path {p}"))
            .ok_or_else(|| "no path (TCP)".to_string()),
        Key::Header(name) => match http.and_then(|h| header_value(h, name, a)) {
            Some(_) => Ok(format!("the {name} header's value")),
            None => Err(format!("no {name} header")),
        },
        Key::RequestPrincipal => match &ctx.jwt {
            None => Err("no JWT sent".to_string()),
            Some(j) => Ok(format!(
                "request principal {}/{}",
                j.str_claim("iss").unwrap_or(""),
                j.str_claim("sub").unwrap_or("")
            )),
        },
        Key::Claim(path) => match &ctx.jwt {
            None => Err("no JWT sent".to_string()),
            Some(j) => match j.path(path) {
                Some(_) => Ok(format!("the token's {} claim", path.join("."))),
                None => Err(format!("the token has no {} claim", path.join("."))),
            },
        },
        Key::Metadata => Err("Envoy metadata (never available here)".to_string()),
    }
}

/// `mutations` applied to a request's header list as the proxy applies them to the request
/// (names compare case-insensitively; a set replaces every earlier value).
fn apply_mutations(headers: &mut Vec<(String, String)>, mutations: &[HeaderMutation]) {
    for m in mutations {
        match m {
            HeaderMutation::Set { name, value } => {
                headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
                headers.push((name.to_ascii_lowercase(), value.clone()));
            }
            HeaderMutation::Remove { name } => {
                headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
            }
            HeaderMutation::RemoveQueryParam { .. } => {}
        }
    }
}
