//! Helpers shared by the root package's end-to-end tests.

use std::path::{Path, PathBuf};

/// The Python interpreter that has the real clients the tests drive (grpcio, xds-protos,
/// py-spiffe, cryptography, PyJWT): `RAMPART_PYTHON`, else the venv `.ci/test` builds in
/// `target/py`. Fails, naming the fix, when neither exists: these tests never skip silently.
pub(crate) fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("RAMPART_PYTHON") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/py/bin/python");
    assert!(
        p.exists(),
        "no Python venv with the test clients: run .ci/test (it builds target/py from \
         tests/python/requirements.txt) or set RAMPART_PYTHON"
    );
    p
}
