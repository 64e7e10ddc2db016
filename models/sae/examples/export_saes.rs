//! Writes SAE directories with this crate's savers, for checking that SAELens itself
//! loads them (`tests/saelens/check_saelens_loads.py`): every fixture SAE (SAELens 6 and
//! 5) saved again in training and inference form, plus f16 and bf16 copies.
//!
//! ```text
//! cargo run -p sae --example export_saes -- OUT_DIR
//! ```

use kernels::Device;
use sae::io;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .ok_or("usage: export_saes OUT_DIR")?,
    );
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let mut sources: Vec<(String, PathBuf)> = Vec::new();
    for arch in [
        "standard",
        "gated",
        "jumprelu",
        "jumprelu_tanh",
        "topk",
        "batchtopk",
        "matryoshka_batchtopk",
    ] {
        sources.push((format!("v6_{arch}"), fixtures.join("saes").join(arch)));
    }
    for case in [
        "standard_unit_decoder",
        "standard_constant_norm_rescale",
        "standard_layer_norm",
        "gated",
        "jumprelu",
        "topk",
    ] {
        sources.push((format!("v5_{case}"), fixtures.join("seed_v5").join(case)));
    }
    for (name, src) in sources {
        let sae = io::load(&src, &Device::Cpu)?;
        io::save_training(&sae, &out.join(format!("{name}.training")), true)?;
        io::save_inference(&sae, &out.join(format!("{name}.inference")), true)?;
        for dtype in [schemas::Dtype::F16, schemas::Dtype::BF16] {
            let mut half = sae.clone();
            let mut cfg = half.cfg().clone();
            cfg.dtype = dtype;
            half.set_cfg(cfg)?;
            io::save_inference(
                &half,
                &out.join(format!("{name}.inference.{}", dtype.as_str())),
                true,
            )?;
        }
        println!("{name}");
    }
    Ok(())
}
