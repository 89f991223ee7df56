//! The generated code in `src/gen/` is checked in. This test regenerates it from `proto/` with
//! protox (no system `protoc`) and tonic-prost-build, and fails on any difference.
//!
//! To accept a change to the `.proto` files: `RAMPART_REGENERATE_PROTO=1 cargo test -p
//! rampart-proto --test regenerate`, then review and commit `src/gen/`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The `.proto` files we compile, relative to `proto/`.
const PROTOS: &[&str] = &[
    "security/v1alpha1/ca.proto",
    "envoy/service/secret/v3/sds.proto",
    "envoy/extensions/transport_sockets/tls/v3/secret.proto",
    "spiffe/workload/workload.proto",
    "rampart/ca/v1/revocation.proto",
    "rampart/config/v1/config.proto",
    "envoy/service/auth/v3/external_auth.proto",
];

/// Generated types that carry private keys get no derived `Debug`; `src/lib.rs` implements a
/// redacting one by hand.
const NO_DERIVED_DEBUG: &[&str] = &[".envoy.config.core.v3.DataSource", ".X509SVID"];

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn generate(out: &Path) {
    let root = crate_dir().join("proto");
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    let fds = protox::compile(&files, [&root]).expect("compile .proto files with protox");
    tonic_prost_build::configure()
        .out_dir(out)
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .emit_rerun_if_changed(false)
        .skip_debug(NO_DERIVED_DEBUG.iter().copied())
        // Resource bodies are shared between the streams they go to, not copied.
        .bytes(".rampart.config.v1.Resource.body")
        .compile_fds(fds)
        .expect("generate Rust code");
}

fn read_dir(dir: &Path) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(dir).expect("read generated dir") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            files.insert(
                name,
                fs::read_to_string(&path).expect("read generated file"),
            );
        }
    }
    files
}

#[test]
fn generated_code_is_up_to_date() {
    let tmp = tempfile::tempdir().expect("tempdir");
    generate(tmp.path());
    let fresh = read_dir(tmp.path());
    assert!(!fresh.is_empty(), "generation produced no files");
    let checked_in_dir = crate_dir().join("src").join("gen");

    if std::env::var_os("RAMPART_REGENERATE_PROTO").is_some_and(|v| v == "1") {
        fs::create_dir_all(&checked_in_dir).unwrap();
        for (name, _) in read_dir(&checked_in_dir) {
            if !fresh.contains_key(&name) {
                fs::remove_file(checked_in_dir.join(&name)).unwrap();
            }
        }
        for (name, text) in &fresh {
            fs::write(checked_in_dir.join(name), text).unwrap();
        }
        return;
    }

    let checked_in = read_dir(&checked_in_dir);
    let fresh_names: Vec<_> = fresh.keys().collect();
    let checked_names: Vec<_> = checked_in.keys().collect();
    assert_eq!(
        fresh_names, checked_names,
        "generated file set differs from proto/src/gen; run with RAMPART_REGENERATE_PROTO=1"
    );
    for (name, text) in &fresh {
        assert!(
            checked_in[name] == *text,
            "proto/src/gen/{name} is stale; run `RAMPART_REGENERATE_PROTO=1 cargo test -p rampart-proto --test regenerate`"
        );
    }
}
