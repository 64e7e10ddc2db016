//! Library part of the `sae-trainer` stage (the binary is a thin `main` over it).

pub mod encode;
