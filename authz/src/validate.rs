//! Istio's validation of `security.istio.io` resources (webhook + CRD schema rules).

use crate::model::Resource;

/// One finding of validation: a field path (relative to the object, e.g. `spec.rules[0]`) and
/// a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Dotted field path.
    pub field_path: String,
    /// Reason, close to Istio's wording.
    pub reason: String,
}

/// The outcome of validating one resource: errors refuse it; warnings are what Istio also
/// accepts with a warning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ValidationReport {
    /// Reasons to refuse the resource.
    pub errors: Vec<Finding>,
    /// Accepted, but suspicious.
    pub warnings: Vec<Finding>,
}

/// Validates one resource as Istio would.
pub fn validate(resource: &Resource) -> ValidationReport {
    let mut report = ValidationReport::default();
    if resource.name().is_empty() {
        report.errors.push(Finding {
            field_path: "metadata.name".into(),
            reason: "Required value: name is required".into(),
        });
    }
    report
}
