//! Request path normalization, applied before any path matching (as Envoy's HTTP connection
//! manager does before the RBAC filter runs), with the options of MeshConfig
//! `pathNormalization.normalization`.
//!
//! Order (field reference §3.5): decode `%2F %2f %5C %5c` (only `DECODE_AND_MERGE_SLASHES`),
//! then RFC 3986 normalization (`BASE`), then merge slashes. The query string is kept apart and
//! never normalized; a fragment is dropped; `%00` anywhere in the path is refused (HTTP 400).
//! `;` parameters are *not* special: Envoy leaves `/admin;x=1` as it is, so it does not equal
//! `/admin` (write `paths: ["/admin*"]`-style prefixes in DENY policies).

use serde::{Deserialize, Serialize};

/// How request paths are normalized before policy evaluation (MeshConfig
/// `pathNormalization.normalization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathNormalization {
    /// No normalization: `/a/../b` is evaluated as sent.
    None,
    /// RFC 3986: resolve `.`/`..`, decode unreserved `%HH`, `\` becomes `/`. The default
    /// (`DEFAULT` in MeshConfig means `BASE`).
    #[default]
    #[serde(alias = "DEFAULT")]
    Base,
    /// `BASE`, then merge consecutive slashes as Envoy does (a path of slashes only stays `//`).
    MergeSlashes,
    /// Decode `%2F`/`%5C` (any case) first, then `BASE`, then merge slashes.
    DecodeAndMergeSlashes,
}

/// A path the proxy must refuse with HTTP 400 before any policy is consulted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PathRejected {
    /// Why the path is refused.
    pub reason: &'static str,
}

/// A request path after normalization: `path` is what policies match (no query) and
/// `query` is kept for forwarding (`?` excluded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NormalizedPath {
    /// The normalized path, without query and fragment.
    pub path: String,
    /// The raw query string without the leading `?`, if any.
    pub query: Option<String>,
}

impl NormalizedPath {
    /// The path to forward upstream (normalized path plus the untouched query).
    pub fn to_forward(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{}", self.path, q),
            None => self.path.clone(),
        }
    }
}

/// Normalize a request path (`:path`, possibly with a query) under `mode`.
pub fn normalize_path(raw: &str, mode: PathNormalization) -> Result<NormalizedPath, PathRejected> {
    // Fragments are never sent by conforming clients; Envoy drops them.
    let raw = match raw.find('#') {
        Some(i) => &raw[..i],
        None => raw,
    };
    let (path, query) = match raw.find('?') {
        Some(i) => (&raw[..i], Some(raw[i + 1..].to_string())),
        None => (raw, None),
    };
    // An absolute-form target without a path (`GET http://host?x`) is the root, as the
    // request is forwarded in origin form.
    let path = if path.is_empty() { "/" } else { path };
    // A path that is not absolute (`admin`, `pkg.Service/Method`, `\admin`, `*`) would be
    // matched as it is, unlike any `paths` entry, while an app may still route it (gRPC-Go
    // before 1.79.3 and some HTTP/1.1 frameworks add the slash): refused, as Envoy's HTTP
    // connection manager refuses every non-relative path before its filters run.
    if !path.starts_with('/') {
        return Err(PathRejected {
            reason: "path does not start with '/'",
        });
    }
    if contains_nul_escape(path) || path.contains('\0') {
        return Err(PathRejected {
            reason: "path contains an encoded NUL (%00)",
        });
    }
    if is_already_normal(path, mode) {
        return Ok(NormalizedPath {
            path: path.to_string(),
            query,
        });
    }
    let path = match mode {
        PathNormalization::None => path.to_string(),
        PathNormalization::Base => canonicalize(path),
        PathNormalization::MergeSlashes => merge_slashes(&canonicalize(path)),
        PathNormalization::DecodeAndMergeSlashes => {
            merge_slashes(&canonicalize(&decode_slashes(path)))
        }
    };
    Ok(NormalizedPath { path, query })
}

/// True when `mode` would not change `p`: it starts with `/`, has no `%`, `\\`, characters
/// that need escaping or dot segments, and (for merging modes) no `//`.
fn is_already_normal(p: &str, mode: PathNormalization) -> bool {
    if mode == PathNormalization::None {
        return true;
    }
    let b = p.as_bytes();
    if b.first() != Some(&b'/') {
        return false;
    }
    let merge = mode != PathNormalization::Base;
    let mut prev = 0u8;
    for (i, &c) in b.iter().enumerate() {
        if c == b'%' || c == b'\\' || must_escape(c) {
            return false;
        }
        if c == b'/' && prev == b'/' && merge {
            return false;
        }
        if c == b'.' && prev == b'/' {
            // `/.` starts a dot segment when followed by `/`, end, or `./`/`.` end.
            let rest = &b[i..];
            if rest == b"." || rest.starts_with(b"./") || rest == b".." || rest.starts_with(b"../")
            {
                return false;
            }
        }
        prev = c;
    }
    true
}

fn contains_nul_escape(p: &str) -> bool {
    p.as_bytes().windows(3).any(|w| w == b"%00")
}

/// `%2F`/`%2f` → `/`, `%5C`/`%5c` → `\` (which canonicalization then turns into `/`).
fn decode_slashes(p: &str) -> String {
    decode_slashes_bytes(p)
}

fn decode_slashes_bytes(p: &str) -> String {
    let b = p.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            match (b[i + 1].to_ascii_uppercase(), b[i + 2].to_ascii_uppercase()) {
                (b'2', b'F') => {
                    out.push(b'/');
                    i += 3;
                    continue;
                }
                (b'5', b'C') => {
                    out.push(b'\\');
                    i += 3;
                    continue;
                }
                _ => {}
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_default()
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

/// Characters a canonical path never carries raw: they are percent-encoded.
fn must_escape(c: u8) -> bool {
    c <= 0x20 || c >= 0x7f || matches!(c, b'"' | b'<' | b'>' | b'`')
}

/// RFC 3986 path canonicalization as Envoy's `normalize_path` does it: `\` → `/`, decode
/// percent-encoded unreserved characters once, escape characters that may not appear raw,
/// and remove `.`/`..` segments. Paths not starting with `/` (e.g. `*`) are left alone.
fn canonicalize(p: &str) -> String {
    if !p.starts_with('/') && !p.starts_with('\\') {
        return p.to_string();
    }
    let b = p.as_bytes();
    let mut buf: Vec<u8> = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'\\' {
            buf.push(b'/');
            i += 1;
        } else if c == b'%' && i + 2 < b.len() {
            match (hex_val(b[i + 1]), hex_val(b[i + 2])) {
                (Some(h), Some(l)) => {
                    let v = h * 16 + l;
                    if is_unreserved(v) && !completes_escape(&buf, v) {
                        buf.push(v);
                    } else {
                        buf.extend_from_slice(&b[i..i + 3]);
                    }
                    i += 3;
                }
                _ => {
                    buf.push(c);
                    i += 1;
                }
            }
        } else if must_escape(c) {
            buf.extend_from_slice(format!("%{c:02X}").as_bytes());
            i += 1;
        } else {
            buf.push(c);
            i += 1;
        }
    }
    // All bytes are ASCII now.
    let s = String::from_utf8(buf).unwrap_or_default();
    remove_dot_segments(&s)
}

/// Whether pushing the decoded byte `v` after `buf` would make a new `%XX` escape together
/// with a stray `%` already in `buf` (one not followed by two hex digits in the input): e.g.
/// `%2%65` would decode to `%2e`, which a second decoding (the upstream app's) turns into
/// `.`, so the path policies matched would not be the path the app acts on. Such a byte is
/// kept encoded, which keeps normalization idempotent. (A `%` copied as part of a valid escape
/// is always followed by its two hex digits in `buf`, so a `%` in the last two places is
/// stray.)
fn completes_escape(buf: &[u8], v: u8) -> bool {
    if !v.is_ascii_hexdigit() {
        return false;
    }
    match buf {
        [.., b'%'] => true,
        [.., b'%', h] => h.is_ascii_hexdigit(),
        _ => false,
    }
}

/// RFC 3986 §5.2.4 on an absolute path: `..` above the root stays at the root.
fn remove_dot_segments(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segs: Vec<&str> = p[1..].split('/').collect();
    let n = segs.len();
    for (i, s) in segs.iter().enumerate() {
        let last = i + 1 == n;
        match *s {
            "." => {
                if last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if last {
                    out.push("");
                }
            }
            other => out.push(other),
        }
    }
    let mut r = String::with_capacity(p.len());
    for s in out {
        r.push('/');
        r.push_str(s);
    }
    if r.is_empty() {
        r.push('/');
    }
    r
}

/// Envoy's `merge_slashes`: a path without `//` is left alone; otherwise its non-empty
/// segments joined with `/`, keeping a leading and a trailing `/`. So a path of slashes only
/// (`//`, `///`) becomes `//`, as Envoy 1.40 forwards it.
fn merge_slashes(p: &str) -> String {
    if !p.contains("//") {
        return p.to_string();
    }
    let mut r = String::with_capacity(p.len());
    if p.starts_with('/') {
        r.push('/');
    }
    let mut first = true;
    for seg in p.split('/').filter(|s| !s.is_empty()) {
        if !first {
            r.push('/');
        }
        r.push_str(seg);
        first = false;
    }
    if p.ends_with('/') {
        r.push('/');
    }
    r
}

#[cfg(test)]
mod tests {
    use super::PathNormalization::*;
    use super::*;

    fn n(p: &str, m: PathNormalization) -> String {
        normalize_path(p, m).unwrap().path
    }

    #[test]
    fn base_examples_from_field_reference() {
        assert_eq!(n("/public/../private", Base), "/private");
        assert_eq!(n("/public/%2e%2e/private", Base), "/private");
        assert_eq!(n("/public/%2E%2E/private", Base), "/private");
        assert_eq!(n("/xyz%30..//abc", Base), "/xyz0..//abc");
        assert_eq!(n("/app//../admin", Base), "/app/admin");
    }

    #[test]
    fn base_rules() {
        assert_eq!(n("/a/./b", Base), "/a/b");
        assert_eq!(n("/a/b/..", Base), "/a/");
        assert_eq!(n("/a/b/.", Base), "/a/b/");
        assert_eq!(n("/../../x", Base), "/x");
        assert_eq!(n("/..", Base), "/");
        assert_eq!(n("/a\\..\\admin", Base), "/admin");
        // Unreserved escapes are decoded once, others kept.
        assert_eq!(n("/%61dmin", Base), "/admin");
        assert_eq!(n("/%7Euser%5F", Base), "/~user_");
        assert_eq!(n("/%252e%252e/x", Base), "/%252e%252e/x");
        assert_eq!(n("/a%2Fb", Base), "/a%2Fb");
        assert_eq!(n("/a%5Cb", Base), "/a%5Cb");
        assert_eq!(n("//admin", Base), "//admin");
        assert_eq!(n("/a b", Base), "/a%20b");
        // Parameters are not special.
        assert_eq!(n("/admin;x=1", Base), "/admin;x=1");
    }

    /// gRPC-Go CVE-2026-33186: a path without its leading slash would dodge every `paths`
    /// rule while the app routes it; refused in every mode. An empty path is the root.
    #[test]
    fn paths_that_are_not_absolute_are_refused() {
        for mode in [None, Base, MergeSlashes, DecodeAndMergeSlashes] {
            for p in [
                "admin",
                "pkg.Admin/Delete",
                "\\admin",
                "*",
                "%2Fadmin",
                ".",
                "admin?x=/y",
            ] {
                assert!(normalize_path(p, mode).is_err(), "{p:?} {mode:?}");
            }
            let r = normalize_path("?x=1", mode).unwrap();
            assert_eq!((r.path.as_str(), r.to_forward().as_str()), ("/", "/?x=1"));
            assert_eq!(n("", mode), "/");
            assert_eq!(n("#f", mode), "/");
        }
    }

    #[test]
    fn slashes_only_merge_to_two_as_envoy() {
        for m in [MergeSlashes, DecodeAndMergeSlashes] {
            assert_eq!(n("//", m), "//");
            assert_eq!(n("///", m), "//");
            assert_eq!(n("//admin", m), "/admin");
            assert_eq!(n("/app//", m), "/app/");
            assert_eq!(n("/", m), "/");
        }
        assert_eq!(n("/%2F", DecodeAndMergeSlashes), "//");
        assert_eq!(n("//", Base), "//");
    }

    #[test]
    fn query_and_fragment() {
        let r = normalize_path("/a/../b?x=/../y#frag", Base).unwrap();
        assert_eq!(r.path, "/b");
        assert_eq!(r.query.as_deref(), Some("x=/../y"));
        assert_eq!(r.to_forward(), "/b?x=/../y");
    }

    #[test]
    fn none_keeps_everything() {
        assert_eq!(n("/a/../b", None), "/a/../b");
        assert_eq!(n("//a\\b", None), "//a\\b");
    }

    #[test]
    fn merge_and_decode() {
        assert_eq!(n("//admin", MergeSlashes), "/admin");
        assert_eq!(n("/a///b//", MergeSlashes), "/a/b/");
        assert_eq!(n("/%2Fadmin", MergeSlashes), "/%2Fadmin");
        assert_eq!(n("/%2Fadmin", DecodeAndMergeSlashes), "/admin");
        assert_eq!(n("/%2fadmin", DecodeAndMergeSlashes), "/admin");
        assert_eq!(n("/x%5C..%5Cadmin", DecodeAndMergeSlashes), "/admin");
        assert_eq!(n("/x%2F..%2Fadmin", DecodeAndMergeSlashes), "/admin");
        assert_eq!(n("/x%2F..%2Fadmin", Base), "/x%2F..%2Fadmin");
    }

    #[test]
    fn nul_is_rejected_in_every_mode() {
        for m in [None, Base, MergeSlashes, DecodeAndMergeSlashes] {
            assert!(normalize_path("/a%00b", m).is_err());
        }
        // ... but only in the path, the query is not inspected.
        assert!(normalize_path("/a?x=%00", Base).is_ok());
    }

    fn slow(p: &str, m: PathNormalization) -> String {
        match m {
            None => p.to_string(),
            Base => canonicalize(p),
            MergeSlashes => merge_slashes(&canonicalize(p)),
            DecodeAndMergeSlashes => merge_slashes(&canonicalize(&decode_slashes(p))),
        }
    }

    proptest::proptest! {
        #[test]
        fn fast_path_agrees_with_full_normalization(p in "/[a/.%2Fc5\\\\;]{0,16}") {
            for m in [None, Base, MergeSlashes, DecodeAndMergeSlashes] {
                if p.contains("%00") { continue; }
                proptest::prop_assert_eq!(normalize_path(&p, m).unwrap().path, slow(&p, m), "{:?}", m);
            }
        }

        #[test]
        fn normalization_is_idempotent(p in "/[a/.%2Fe5cC3467\\\\;]{0,16}") {
            for m in [Base, MergeSlashes, DecodeAndMergeSlashes] {
                if p.contains("%00") { continue; }
                let once = normalize_path(&p, m).unwrap().path;
                let twice = normalize_path(&once, m).unwrap().path;
                proptest::prop_assert_eq!(&once, &twice, "{:?}", m);
            }
        }

        #[test]
        fn normalized_paths_have_no_dot_segments(p in "/[a/.%2Ee\\\\]{0,16}") {
            for m in [Base, MergeSlashes, DecodeAndMergeSlashes] {
                let n = normalize_path(&p, m).unwrap().path;
                proptest::prop_assert!(n.starts_with('/'));
                proptest::prop_assert!(!n.split('/').any(|s| s == "." || s == ".."), "{} -> {}", p, n);
                // Merged: no `//`, but for a path of slashes only, which Envoy turns into `//`.
                if m != Base && n != "//" {
                    proptest::prop_assert!(!n.contains("//"));
                }
            }
        }
    }

    /// Found by the `normalize_path` fuzz target: a stray `%` followed by an encoded hex
    /// digit made a new escape (`%7%41` → `%7A`), so normalizing again decoded it (`z`).
    /// With `%2%65` that smuggled `%2e` past dot-segment removal (`/a/%2%65%2%65/admin`
    /// would reach the app as `/a/%2e%2e/admin`, i.e. `/admin`).
    #[test]
    fn decoding_never_makes_a_new_escape() {
        for m in [Base, MergeSlashes, DecodeAndMergeSlashes] {
            for (raw, want) in [
                ("/`a/`a%41%7%41%7/", "/%60a/%60aA%7%41%7/"),
                ("/%7%41", "/%7%41"),
                ("/a/%2%65%2%65/admin", "/a/%2%65%2%65/admin"),
                ("/%%32%65", "/%%32e"),
                ("/%%300", "/%%300"),
                ("/%41%%42", "/A%%42"),
                ("/100%/%41", "/100%/A"),
            ] {
                let once = n(raw, m);
                assert_eq!(once, want, "{m:?}: {raw}");
                assert_eq!(n(&once, m), once, "{m:?}: {raw}");
            }
        }
        // `%2%65` does not become a dot segment either.
        assert_eq!(n("/a/%2%65%2%65/../b", Base), "/a/b");
    }

    #[test]
    fn non_ascii_survives() {
        assert_eq!(n("/é", Base), "/%C3%A9");
        assert_eq!(n("/%2Fé", DecodeAndMergeSlashes), "/%C3%A9");
    }
}
