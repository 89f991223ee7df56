//! Decision cost for a typical HTTP request with 10, 1,000 and 10,000 AuthorizationPolicies
//! spread over namespaces and workload selectors.
//!
//! `cargo bench -p rampart-authz --bench decide -- --measurement-time 3 --warm-up-time 1`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
mod common;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("authorize");
    for n in [10usize, 1_000, 10_000] {
        let (engine, w, ctx) = common::setup(n);
        g.bench_function(format!("{n}_policies"), |b| {
            b.iter(|| black_box(engine.authorize(black_box(&w), black_box(&ctx))))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
