//! The `pipeline` subcommands and the flags they share.

pub mod bench;
pub mod copy;
pub mod inspect;
pub mod report;
pub mod run;

pub use pipeline::cli::{interrupt_flag, parse_bytes, progress, ClientArgs};

/// Sums every value (16 lanes, so it vectorises): how readers prove they read it all.
pub fn sum_f32(vals: &[f32]) -> f64 {
    let mut acc = [0f32; 16];
    let chunks = vals.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().sum();
    for ch in chunks {
        for (a, x) in acc.iter_mut().zip(ch) {
            *a += x;
        }
    }
    acc.iter().map(|&x| x as f64).sum::<f64>() + rest as f64
}

pub fn peak_rss_mib() -> Option<f64> {
    pipeline::sys::peak_rss_mib()
}
