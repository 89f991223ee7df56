//! Fuzz YAML -> policy: arbitrary bytes through the loader must never panic, and whatever it
//! accepts must be self-consistent (valid on re-validation, with a real origin).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let result = rampart_authz::load_str("fuzz.yaml", text);
    for resource in &result.resources {
        assert!(resource.origin().doc_index >= 1);
        assert!(!resource.name().is_empty());
        let report = rampart_authz::validate(resource);
        assert!(
            report.errors.is_empty(),
            "accepted but invalid: {:?}",
            report.errors
        );
    }
    for problem in &result.problems {
        assert!(
            problem.doc_index >= 1,
            "load_str reports per document: {problem}"
        );
        assert!(!problem.reason.is_empty());
    }
});
