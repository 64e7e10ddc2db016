//! Library part of the `sae-trainer` stage (the binary is a thin `main` over it).

pub mod bench;
pub mod encode;
pub mod schedule;
pub mod train;
pub mod trainer;
