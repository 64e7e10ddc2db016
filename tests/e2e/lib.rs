//! End-to-end tests live in `e2e/*.rs` (see Cargo.toml); this library holds what they
//! share besides the process helpers (`pipeline/tests/support`).

use std::path::{Path, PathBuf};

/// The repository's test fixtures.
pub fn fx() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A path as an argument.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}
