//! Import cycles between the top-level modules of each workspace crate.
//!
//! A module `a` depends on `b` when any file of `a` (its `a.rs` and everything under `a/`)
//! names `crate::b` (in a `use` line, a `use crate::{b, c}` group, or a path in code). A
//! cycle is a strongly connected set of two or more modules. Cycles make a crate hard to read
//! and change (STYLE.md: layered modules, as in linkerd2-proxy and ztunnel), so a new one
//! fails this test. The cycles that exist today are listed in `KNOWN` with the work that
//! removes them; when one disappears, this test asks for its line to go too, so the list
//! never hides a cycle that has come back.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Crate source folders, relative to the workspace root.
const CRATES: &[&str] = &[
    "certs/src",
    "proto/src",
    "authz/src",
    "mesh/src",
    "citadel/src",
    "k8s/src",
    "node-agent/src",
    "proxy/src",
    "src",
];

/// Cycles present when this check was written: (crate folder, modules in the cycle).
const KNOWN: &[(&str, &[&str])] = &[];

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to (`runtime/outbound.rs` -> `runtime`), or `None`
/// for the crate root (`lib.rs`, `main.rs`), which may name every module.
fn top_module(root: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(root).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (!matches!(name.as_str(), "lib" | "main")).then_some(name)
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Code without `//` comments (doc comments name modules in prose).
fn strip_line_comments(src: &str) -> String {
    src.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules named after each `crate::` in `src`, including the first names of
/// each item of a `crate::{a, b::c, d::{e}}` group.
fn crate_paths(src: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = src;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| is_ident(c) || c == '$') {
            continue; // `$crate::`, `my_crate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group, split at depth-0 commas.
            let mut depth = 0usize;
            let mut start = 0usize;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        push_first(&group[start..j], &mut out);
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        push_first(&group[start..j], &mut out);
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            push_first(rest, &mut out);
        }
    }
    out
}

fn push_first(path: &str, out: &mut BTreeSet<String>) {
    let name: String = path
        .trim_start()
        .chars()
        .take_while(|c| is_ident(*c))
        .collect();
    if !name.is_empty() && name != "self" {
        out.insert(name);
    }
}

/// Module -> modules it names.
fn graph(root: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(root, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| top_module(root, f)).collect();
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let Some(m) = top_module(root, f) else {
            continue;
        };
        let src = strip_line_comments(&std::fs::read_to_string(f).unwrap());
        let deps = g.entry(m.clone()).or_default();
        for d in crate_paths(&src) {
            if d != m && modules.contains(&d) {
                deps.insert(d);
            }
        }
    }
    g
}

/// Strongly connected sets of two or more modules (Tarjan).
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        out: Vec<BTreeSet<String>>,
    }
    impl<'a> T<'a> {
        fn visit(&mut self, v: &'a str) {
            self.index.insert(v, self.next);
            self.low.insert(v, self.next);
            self.next += 1;
            self.stack.push(v);
            self.on.insert(v);
            for w in self.g.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let l = self.low[w].min(self.low[v]);
                    self.low.insert(v, l);
                } else if self.on.contains(w) {
                    let l = self.index[w].min(self.low[v]);
                    self.low.insert(v, l);
                }
            }
            if self.low[v] == self.index[v] {
                let mut set = BTreeSet::new();
                while let Some(w) = self.stack.pop() {
                    self.on.remove(w);
                    set.insert(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if set.len() > 1 {
                    self.out.push(set);
                }
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out
}

#[test]
fn parser_reads_groups_paths_and_skips_comments() {
    let src = "use crate::a::X;\nuse crate::{b, c::{D, E}, self};\n// crate::zz in prose\nfn f() { crate::d::g(); $crate::no; }\n";
    let got = crate_paths(&strip_line_comments(src));
    let want: BTreeSet<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
    assert_eq!(got, want);
}

#[test]
fn finder_sees_a_cycle_and_its_absence() {
    let mk = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    let c = cycles(&mk(&[("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]));
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].len(), 3);
    assert!(cycles(&mk(&[("a", "b"), ("b", "c"), ("a", "c")])).is_empty());
}

#[test]
fn no_new_module_cycles() {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut problems = Vec::new();
    for dir in CRATES {
        let found = cycles(&graph(&ws.join(dir)));
        let known: Vec<BTreeSet<String>> = KNOWN
            .iter()
            .filter(|(d, _)| d == dir)
            .map(|(_, m)| m.iter().map(|s| s.to_string()).collect())
            .collect();
        for c in &found {
            if !known.iter().any(|k| c.is_subset(k)) {
                problems.push(format!("{dir}: new import cycle between {c:?}"));
            }
        }
        for k in &known {
            if !found.iter().any(|c| c == k) {
                problems.push(format!(
                    "{dir}: the known cycle {k:?} is now {found:?}: update KNOWN in tests/module_cycles.rs"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The proxy's `runtime` is wiring: it builds the parts and hands each the handles it
/// needs; a module that reaches back into it would bring the old all-in-one `Shared` back.
#[test]
fn proxy_runtime_is_imported_by_no_module() {
    let g = graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy/src"));
    assert!(g.contains_key("runtime"), "{g:?}");
    let importers: Vec<&String> = g
        .iter()
        .filter(|(m, deps)| *m != "runtime" && deps.contains("runtime"))
        .map(|(m, _)| m)
        .collect();
    assert!(
        importers.is_empty(),
        "modules importing proxy's runtime: {importers:?}"
    );
}
