//! Request path normalization on arbitrary text (the `:path` a client sends): never panics,
//! under every mode; a normalized path is a fixed point (normalizing it again under the same
//! mode gives the same path and is never refused); it keeps the query apart untouched; and
//! under every mode but NONE an absolute result has no dot segments and no backslash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rampart_authz::{PathNormalization, normalize_path};

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    for mode in [
        PathNormalization::None,
        PathNormalization::Base,
        PathNormalization::MergeSlashes,
        PathNormalization::DecodeAndMergeSlashes,
    ] {
        let Ok(once) = normalize_path(raw, mode) else {
            continue;
        };
        let before_fragment = raw.split('#').next().unwrap_or_default();
        assert_eq!(
            once.query.as_deref(),
            before_fragment.split_once('?').map(|(_, q)| q),
            "{mode:?}: query of {raw:?}"
        );
        // The path alone (a `?` cannot be in it: it would have started the query).
        let twice = normalize_path(&once.path, mode)
            .unwrap_or_else(|e| panic!("{mode:?}: {:?} from {raw:?} refused: {e:?}", once.path));
        assert_eq!(
            twice.path, once.path,
            "{mode:?}: not idempotent for {raw:?}"
        );
        assert_eq!(twice.query, None);
        let p = &once.path;
        if mode != PathNormalization::None && p.starts_with('/') {
            assert!(!p.contains('\\'), "{mode:?}: {p:?} from {raw:?}");
            assert!(
                !p.split('/').any(|s| s == "." || s == ".."),
                "{mode:?}: dot segment in {p:?} from {raw:?}"
            );
            // Merged: no `//`, but for a path of slashes only, which Envoy turns into `//`.
            if mode != PathNormalization::Base && p != "//" {
                assert!(!p.contains("//"), "{mode:?}: {p:?} from {raw:?}");
            }
        }
    }
});
