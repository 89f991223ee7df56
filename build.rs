//! Release builds of the `rampart` binary lay out its code in the order of
//! `build/text-order.txt` (lld's `--symbol-ordering-file`): the functions a `rampart proxy`
//! executes come first and sit together, so an idle proxy has a few MiB of the binary's 19 MB
//! of text resident instead of most of it (the kernel maps up to 64 KiB around every code page
//! that faults). docs/PERFORMANCE.md, "Text ordering"; benches/profile/text-order.sh
//! regenerates the file.
//!
//! The ordering never breaks a build: names the linker does not find (stale after code
//! changes) are skipped silently (`--no-warn-symbol-ordering`), and the flag is only passed
//! where the linker is known to be lld: a release build for x86_64-unknown-linux-gnu by rustc
//! 1.90 or later (which links with its own lld there) with no linker chosen in RUSTFLAGS or
//! cargo's configuration. `RAMPART_TEXT_ORDER=off` leaves it out.

use std::env;
use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if env::var("PROFILE").as_deref() != Ok("release") {
        return;
    }
    println!("cargo::rerun-if-env-changed=RAMPART_TEXT_ORDER");
    if env::var("RAMPART_TEXT_ORDER").as_deref() == Ok("off") {
        return;
    }
    let manifest_dir = env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default();
    let order = Path::new(&manifest_dir)
        .join("build")
        .join("text-order.txt");
    println!("cargo::rerun-if-changed={}", order.display());
    match skip_reason(&order) {
        None => {
            println!(
                "cargo::rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
                order.display()
            );
            println!("cargo::rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
        }
        Some(why) => println!("cargo::warning=text ordering of `rampart` left out: {why}"),
    }
}

/// Why the ordering file cannot be passed to this build's linker, if it cannot.
fn skip_reason(order: &Path) -> Option<String> {
    if !order.is_file() {
        return Some(format!("no {}", order.display()));
    }
    if order.to_string_lossy().contains(',') {
        // -Wl, splits its argument at commas
        return Some(format!("{} has a comma in its path", order.display()));
    }
    let target = env::var("TARGET").unwrap_or_default();
    if target != "x86_64-unknown-linux-gnu" {
        return Some(format!("target {target} may not link with lld"));
    }
    if env::var_os("RUSTC_LINKER").is_some() {
        return Some("cargo's configuration chooses the linker".into());
    }
    let rustflags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if let Some(flag) = rustflags.split('\x1f').find(|flag| {
        ["linker", "link-self-contained", "fuse-ld"]
            .iter()
            .any(|word| flag.contains(word))
    }) {
        return Some(format!("RUSTFLAGS choose the linker ({flag})"));
    }
    match rustc_minor() {
        Some(minor) if minor >= 90 => None,
        Some(minor) => Some(format!(
            "rustc 1.{minor} links with the system linker, not lld"
        )),
        None => Some("rustc's version is unknown".into()),
    }
}

/// The minor version of the rustc that builds this crate (`rustc 1.95.0 (...)` gives 95).
fn rustc_minor() -> Option<u32> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let output = Command::new(rustc).arg("--version").output().ok()?;
    let version = String::from_utf8(output.stdout).ok()?;
    let mut parts = version.split_whitespace().nth(1)?.split('.');
    (parts.next()? == "1").then_some(())?;
    parts.next()?.parse().ok()
}
