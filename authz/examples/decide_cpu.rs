//! CPU time per decision, measured from this process's user+system time in
//! `/proc/self/stat` (Linux), so the figure does not depend on how busy the machine is.
//! `cargo run --release -p rampart-authz --example decide_cpu`
//!
//! Same configurations and request as `benches/decide.rs`.

use std::hint::black_box;
use std::time::Instant;

#[path = "../benches/common/mod.rs"]
mod common;

/// utime + stime of this process, in clock ticks (usually 100 per second).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the full line: 12 and 13 here.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn main() {
    const ITERS: u32 = 2_000_000;
    for n in [10usize, 1_000, 10_000] {
        let (engine, w, ctx) = common::setup(n);
        for _ in 0..100_000 {
            black_box(engine.authorize(black_box(&w), black_box(&ctx)));
        }
        let (t0, c0) = (Instant::now(), cpu_ticks());
        for _ in 0..ITERS {
            black_box(engine.authorize(black_box(&w), black_box(&ctx)));
        }
        let (wall, cpu) = (t0.elapsed(), cpu_ticks() - c0);
        let cpu_us = cpu as f64 * 10_000.0 / f64::from(ITERS); // 100 ticks/s = 10_000 us/tick
        println!(
            "{n:>6} policies: {cpu_us:.2} us CPU/decision, {:.2} us wall/decision",
            wall.as_secs_f64() * 1e6 / f64::from(ITERS)
        );
    }
}
