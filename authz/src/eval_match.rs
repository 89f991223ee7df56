//! Precompiled value matchers, with Istio's string rules (field reference §3.3, §3.5, §2.4):
//! exact `abc`, prefix `abc*`, suffix `*abc`, presence `*`; a `*` anywhere else is literal.

use ipnet::IpNet;
use regex::Regex;
use serde_json::Value;
use std::net::IpAddr;

/// A compiled string matcher (Envoy `StringMatcher` semantics).
#[derive(Debug, Clone)]
pub(crate) enum StrMatch {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    /// Starts with the first part and ends with the second, non-overlapping (`p.*s`).
    PrefixSuffix(Box<str>, Box<str>),
    /// Regex `.+`: any non-empty value.
    NonEmpty,
    /// Envoy `presentMatch`: the attribute exists (empty value included).
    Present,
    /// Full-match regex.
    Regex(Box<Regex>),
}

impl StrMatch {
    /// Istio's `StringMatcher(v)`: `*` → `.+`, `*x` → suffix, `x*` → prefix, else exact.
    pub(crate) fn istio(v: &str) -> StrMatch {
        Self::istio_with_prefix(v, "")
    }

    /// Istio's `StringMatcherWithPrefix(v, prefix)` as the current builder writes it: `*` →
    /// `.+` (prefix ignored); `*x` → `prefix.*x`; `x*` → prefix `prefix+x`; else exact.
    pub(crate) fn istio_with_prefix(v: &str, prefix: &str) -> StrMatch {
        if v == "*" {
            StrMatch::NonEmpty
        } else if let Some(s) = v.strip_prefix('*') {
            if prefix.is_empty() {
                StrMatch::Suffix(s.into())
            } else {
                StrMatch::PrefixSuffix(prefix.into(), s.into())
            }
        } else if let Some(p) = v.strip_suffix('*') {
            StrMatch::Prefix(format!("{prefix}{p}").into())
        } else {
            StrMatch::Exact(format!("{prefix}{v}").into())
        }
    }

    /// Istio's header matcher: `*` → present, else as [`StrMatch::istio`].
    pub(crate) fn header(v: &str) -> StrMatch {
        if v == "*" {
            StrMatch::Present
        } else {
            Self::istio(v)
        }
    }

    /// A full-match regex (anchored here).
    pub(crate) fn regex(re: &str) -> StrMatch {
        match Regex::new(&format!("^(?:{re})$")) {
            Ok(r) => StrMatch::Regex(Box::new(r)),
            // Patterns are built from escaped input; an invalid one never matches.
            Err(_) => StrMatch::Regex(Box::new(Regex::new("[^\\s\\S]").expect("static regex"))),
        }
    }

    pub(crate) fn matches(&self, s: &str) -> bool {
        match self {
            StrMatch::Exact(e) => s == &**e,
            StrMatch::Prefix(p) => s.starts_with(&**p),
            StrMatch::Suffix(x) => s.ends_with(&**x),
            StrMatch::PrefixSuffix(p, x) => {
                s.len() >= p.len() + x.len() && s.starts_with(&**p) && s.ends_with(&**x)
            }
            StrMatch::NonEmpty => !s.is_empty(),
            StrMatch::Present => true,
            StrMatch::Regex(r) => r.is_match(s),
        }
    }

    /// Case-insensitive variant (Envoy `ignore_case`, used for `hosts`).
    pub(crate) fn matches_ignore_case(&self, s: &str) -> bool {
        fn starts(s: &str, p: &str) -> bool {
            s.len() >= p.len() && s.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
        }
        fn ends(s: &str, x: &str) -> bool {
            s.len() >= x.len()
                && s.as_bytes()[s.len() - x.len()..].eq_ignore_ascii_case(x.as_bytes())
        }
        match self {
            StrMatch::Exact(e) => s.eq_ignore_ascii_case(e),
            StrMatch::Prefix(p) => starts(s, p),
            StrMatch::Suffix(x) => ends(s, x),
            StrMatch::PrefixSuffix(p, x) => {
                s.len() >= p.len() + x.len() && starts(s, p) && ends(s, x)
            }
            StrMatch::NonEmpty | StrMatch::Present | StrMatch::Regex(_) => self.matches(s),
        }
    }
}

/// Escape `v` for a regex, turning every `*` into `.*` (Istio's namespace matcher).
pub(crate) fn glob_to_regex(v: &str) -> String {
    v.split('*')
        .map(regex::escape)
        .collect::<Vec<_>>()
        .join(".*")
}

/// RFC 3986 `pchar` minus `/`, as Envoy's URI template uses for `*`/`**`.
fn is_template_char(c: u8) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'%'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'+'
                | b','
                | b';'
                | b':'
                | b'@'
                | b'='
        )
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TplPart {
    Lit(Box<str>),
    /// `{*}`: one or more template characters, no `/`.
    One,
    /// `{**}`: zero or more template characters or `/`.
    Any,
}

/// An Envoy URI template (`{*}` = one non-empty segment, `{**}` = zero or more segments).
#[derive(Debug, Clone)]
pub(crate) struct PathTemplate {
    parts: Vec<TplPart>,
}

impl PathTemplate {
    pub(crate) fn is_template(v: &str) -> bool {
        v.contains("{*}") || v.contains("{**}")
    }

    pub(crate) fn new(v: &str) -> PathTemplate {
        let mut parts = Vec::new();
        let mut rest = v;
        while !rest.is_empty() {
            let one = rest.find("{*}");
            let any = rest.find("{**}");
            let next = match (one, any) {
                (Some(a), Some(b)) if b <= a => Some((b, TplPart::Any, 4)),
                (Some(a), _) => Some((a, TplPart::One, 3)),
                (None, Some(b)) => Some((b, TplPart::Any, 4)),
                (None, None) => None,
            };
            match next {
                Some((i, part, len)) => {
                    if i > 0 {
                        parts.push(TplPart::Lit(rest[..i].into()));
                    }
                    parts.push(part);
                    rest = &rest[i + len..];
                }
                None => {
                    parts.push(TplPart::Lit(rest.into()));
                    rest = "";
                }
            }
        }
        PathTemplate { parts }
    }

    pub(crate) fn matches(&self, path: &str) -> bool {
        match_parts(&self.parts, path.as_bytes())
    }
}

fn match_parts(parts: &[TplPart], s: &[u8]) -> bool {
    let Some((first, rest)) = parts.split_first() else {
        return s.is_empty();
    };
    match first {
        TplPart::Lit(l) => s.starts_with(l.as_bytes()) && match_parts(rest, &s[l.len()..]),
        TplPart::One => {
            // At least one character, stop at the first non-template char or '/'.
            let max = s.iter().take_while(|c| is_template_char(**c)).count();
            (1..=max).rev().any(|n| match_parts(rest, &s[n..]))
        }
        TplPart::Any => {
            let max = s
                .iter()
                .take_while(|c| **c == b'/' || is_template_char(**c))
                .count();
            (0..=max).rev().any(|n| match_parts(rest, &s[n..]))
        }
    }
}

/// A `paths` value: a string matcher on the normalized path without query, or a URI template.
#[derive(Debug, Clone)]
pub(crate) enum PathMatch {
    Str(StrMatch),
    Template(PathTemplate),
}

impl PathMatch {
    pub(crate) fn new(v: &str) -> PathMatch {
        if PathTemplate::is_template(v) {
            PathMatch::Template(PathTemplate::new(v))
        } else {
            PathMatch::Str(StrMatch::istio(v))
        }
    }

    pub(crate) fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Str(m) => m.matches(path),
            PathMatch::Template(t) => t.matches(path),
        }
    }
}

/// Parse an IP or CIDR as Istio does (`1.2.3.4` is `/32`, `::1` is `/128`).
pub(crate) fn parse_cidr(v: &str) -> Option<IpNet> {
    if let Ok(n) = v.parse::<IpNet>() {
        return Some(n.trunc());
    }
    v.parse::<IpAddr>().ok().map(IpNet::from)
}

/// `requestPrincipals` / `request.auth.principal`: the policy value split at its **last** `/`
/// into an `iss` and a `sub` matcher (field reference §2.4).
#[derive(Debug, Clone)]
pub(crate) struct RequestPrincipalMatch {
    iss: StrMatch,
    sub: StrMatch,
}

impl RequestPrincipalMatch {
    pub(crate) fn new(value: &str) -> Self {
        let (found, iss, sub) = match value.rfind('/') {
            Some(i) => (true, &value[..i], &value[i + 1..]),
            None => (false, value, ""),
        };
        let (iss_m, sub_m) = if value == "*" {
            (StrMatch::NonEmpty, StrMatch::NonEmpty)
        } else if let Some(vs) = value.strip_prefix('*') {
            if found {
                let im = if iss == "*" {
                    StrMatch::NonEmpty
                } else {
                    StrMatch::Suffix(iss[1..].into())
                };
                (im, StrMatch::Exact(sub.into()))
            } else {
                (StrMatch::NonEmpty, StrMatch::Suffix(vs.into()))
            }
        } else if let Some(vp) = value.strip_suffix('*') {
            if found {
                let sm = if sub == "*" {
                    StrMatch::NonEmpty
                } else {
                    StrMatch::Prefix(sub[..sub.len() - 1].into())
                };
                (StrMatch::Exact(iss.into()), sm)
            } else {
                (StrMatch::Prefix(vp.into()), StrMatch::NonEmpty)
            }
        } else {
            (StrMatch::Exact(iss.into()), StrMatch::Exact(sub.into()))
        };
        RequestPrincipalMatch {
            iss: iss_m,
            sub: sub_m,
        }
    }

    /// Both claims must be present strings (Envoy metadata string matchers).
    pub(crate) fn matches(&self, iss: Option<&str>, sub: Option<&str>) -> bool {
        match (iss, sub) {
            (Some(i), Some(s)) => self.iss.matches(i) && self.sub.matches(s),
            _ => false,
        }
    }
}

/// A JWT claim matcher (`request.auth.audiences`, `.presenter`, `.claims[..]`): the claim is
/// a string that matches, or a list with a string element that matches.
pub(crate) fn claim_matches(v: &Value, m: &StrMatch) -> bool {
    match v {
        Value::String(s) => m.matches(s),
        Value::Array(items) => items
            .iter()
            .any(|i| i.as_str().is_some_and(|s| m.matches(s))),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn istio_string_forms() {
        assert!(StrMatch::istio("abc").matches("abc"));
        assert!(!StrMatch::istio("abc").matches("abcd"));
        assert!(StrMatch::istio("abc*").matches("abcd"));
        assert!(StrMatch::istio("abc*").matches("abc"));
        assert!(!StrMatch::istio("abc*").matches("xabc"));
        assert!(StrMatch::istio("*abc").matches("xabc"));
        assert!(!StrMatch::istio("*abc").matches("abcx"));
        assert!(StrMatch::istio("*").matches("x"));
        assert!(!StrMatch::istio("*").matches(""));
        // A middle `*` is literal.
        assert!(StrMatch::istio("a*c").matches("a*c"));
        assert!(!StrMatch::istio("a*c").matches("abc"));
        // `**` is a suffix `*`, literal.
        assert!(StrMatch::istio("**").matches("x*"));
        assert!(!StrMatch::istio("**").matches("x"));
        assert!(StrMatch::header("*").matches(""));
    }

    #[test]
    fn prefixed_suffix_does_not_overlap() {
        let m = StrMatch::istio_with_prefix("*x", "spiffe://");
        assert!(m.matches("spiffe://ax"));
        assert!(m.matches("spiffe://x"));
        assert!(!m.matches("spiffe:/x"));
        assert!(!m.matches("other://x"));
    }

    #[test]
    fn ignore_case() {
        let m = StrMatch::istio("*.Example.com");
        assert!(m.matches_ignore_case("A.EXAMPLE.COM"));
        assert!(!m.matches_ignore_case("EXAMPLE.COM"));
        assert!(StrMatch::istio("Foo*").matches_ignore_case("fOOx"));
    }

    #[test]
    fn templates_from_field_reference() {
        let t = PathMatch::new("/allow/admin/{**}");
        assert!(t.matches("/allow/admin/"));
        assert!(t.matches("/allow/admin/a/b.txt"));
        assert!(!t.matches("/allow/admin"));
        let t = PathMatch::new("/store/{**}/cart");
        assert!(t.matches("/store//cart"));
        assert!(t.matches("/store/a/b/cart"));
        assert!(!t.matches("/store/cart"));
        let t = PathMatch::new("/foo/{*}/bar/{**}");
        assert!(!t.matches("/foo//bar/x"));
        assert!(t.matches("/foo/a/bar/x/y"));
        assert!(t.matches("/foo/a/bar/"));
        assert!(!t.matches("/foo/a/b/bar/x"));
        let t = PathMatch::new("/path/template/{*}");
        assert!(t.matches("/path/template/x"));
        assert!(!t.matches("/path/template/"));
        assert!(!t.matches("/path/template/x/y"));
        // Characters outside pchar never match an operator.
        assert!(!t.matches("/path/template/a*b"));
        assert!(!t.matches("/path/template/a?b"));
        let t = PathMatch::new("/{**}/path/template");
        assert!(t.matches("/a/b/path/template"));
        assert!(t.matches("//path/template"));
        assert!(!t.matches("/path/template"));
    }

    #[test]
    fn request_principal_table() {
        // (policy value, iss, sub, matches)
        let cases: &[(&str, &str, &str, bool)] = &[
            ("*", "i", "s", true),
            ("*", "i", "", false),
            ("iss/sub", "iss", "sub", true),
            ("iss/sub", "iss", "sub2", false),
            // last `/` split: issuer is a URL
            ("https://ex.com/a/sub", "https://ex.com/a", "sub", true),
            ("https://ex.com/a/sub", "https://ex.com", "a/sub", false),
            // a sub containing `/` can never match exactly
            ("iss/a/b", "iss", "a/b", false),
            ("*ex.com/sub", "https://ex.com", "sub", true),
            ("*/sub", "anything", "sub", true),
            ("*sub", "x", "my-sub", true),
            ("iss/s*", "iss", "sabc", true),
            ("iss/*", "iss", "x", true),
            ("iss/*", "iss", "", false),
            ("is*", "issuer", "x", true),
            ("iss", "iss", "", true),
            ("iss", "iss", "x", false),
        ];
        for (v, i, s, want) in cases {
            let m = RequestPrincipalMatch::new(v);
            assert_eq!(m.matches(Some(i), Some(s)), *want, "{v} vs {i}/{s}");
        }
        assert!(!RequestPrincipalMatch::new("*").matches(None, Some("s")));
    }

    #[test]
    fn cidrs() {
        let n = parse_cidr("5.6.0.0/16").unwrap();
        assert!(n.contains(&"5.6.7.8".parse::<IpAddr>().unwrap()));
        let n = parse_cidr("1.2.3.4").unwrap();
        assert!(n.contains(&"1.2.3.4".parse::<IpAddr>().unwrap()));
        assert!(!n.contains(&"1.2.3.5".parse::<IpAddr>().unwrap()));
        assert!(
            parse_cidr("5.6.7.8/16")
                .unwrap()
                .contains(&"5.6.0.1".parse::<IpAddr>().unwrap())
        );
        assert!(parse_cidr("::1").is_some());
        assert!(parse_cidr("nope").is_none());
    }

    fn seg() -> impl Strategy<Value = String> {
        "[a-z0-9._~-]{1,6}"
    }

    proptest! {
        #[test]
        fn exact_prefix_suffix_agree_with_std(s in "[ -~]{0,20}", v in "[a-z/]{1,8}") {
            prop_assert_eq!(StrMatch::istio(&v).matches(&s), s == v);
            prop_assert_eq!(StrMatch::istio(&format!("{v}*")).matches(&s), s.starts_with(&v));
            prop_assert_eq!(StrMatch::istio(&format!("*{v}")).matches(&s), s.ends_with(&v));
            prop_assert_eq!(StrMatch::istio("*").matches(&s), !s.is_empty());
        }

        #[test]
        fn ignore_case_is_case_blind(s in "[a-zA-Z.]{0,12}", v in "[a-zA-Z.]{1,6}") {
            for pat in [v.clone(), format!("{v}*"), format!("*{v}")] {
                let m = StrMatch::istio(&pat);
                prop_assert_eq!(
                    m.matches_ignore_case(&s),
                    StrMatch::istio(&pat.to_ascii_lowercase()).matches(&s.to_ascii_lowercase())
                );
            }
        }

        #[test]
        fn template_one_is_exactly_one_segment(a in seg(), segs in proptest::collection::vec(seg(), 0..4)) {
            let t = PathMatch::new(&format!("/{a}/{{*}}"));
            let path = format!("/{a}/{}", segs.join("/"));
            prop_assert_eq!(t.matches(&path), segs.len() == 1);
        }

        #[test]
        fn template_any_is_any_suffix_under_dir(a in seg(), segs in proptest::collection::vec(seg(), 0..4)) {
            let t = PathMatch::new(&format!("/{a}/{{**}}"));
            let path = format!("/{a}/{}", segs.join("/"));
            prop_assert!(t.matches(&path));
            // never the directory itself without its slash
            let dir = format!("/{a}");
            prop_assert!(!t.matches(&dir));
        }

        #[test]
        fn template_agrees_with_regex(tpl in proptest::collection::vec(prop_oneof![seg(), Just("{*}".to_string()), Just("{**}".to_string())], 1..4),
                                      path in proptest::collection::vec(prop_oneof![seg(), Just(String::new())], 0..5)) {
            let tpl = format!("/{}", tpl.join("/"));
            let path = format!("/{}", path.join("/"));
            let pchar = "[a-zA-Z0-9\\-._~%!$&'()+,;:@=]";
            let re = tpl.split("{**}").map(|p| p.split("{*}").map(regex::escape).collect::<Vec<_>>().join(&format!("{pchar}+")))
                .collect::<Vec<_>>().join(&format!("(?:{pchar}|/)*"));
            let re = Regex::new(&format!("^{re}$")).unwrap();
            prop_assert_eq!(PathMatch::new(&tpl).matches(&path), re.is_match(&path), "{} vs {}", tpl, path);
        }

        #[test]
        fn request_principal_exact_roundtrip(iss in "[a-z:/.]{1,12}", sub in "[a-z]{1,6}") {
            let v = format!("{iss}/{sub}");
            prop_assert!(RequestPrincipalMatch::new(&v).matches(Some(&iss), Some(&sub)));
        }
    }
}
