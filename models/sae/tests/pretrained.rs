//! Pretrained SAEs by `RELEASE:SAE_ID`: a SAELens-style registry and an HF cache built
//! here around fixture SAEs: SAELens 5's TopK (`seed_v5/topk`, a flat `cfg.json` as most
//! hub releases have) and SAELens 6's standard (`saes_inference/standard`).

use kernels::{Device, Tensor};
use sae::pretrained::{parse_spec, resolve};
use schemas::hub::Hub;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn fixture() -> PathBuf {
    fixtures().join("saes_inference/standard")
}

const REGISTRY: &str = r#"
tiny-res:
  repo_id: org/tiny-saes
  model: tiny-gpt2
  config_overrides:
    hook_name: blocks.1.hook_resid_pre
    model_name: tiny-gpt2
  saes:
  - id: blocks.1.hook_resid_pre
    path: v5
    neuronpedia: tiny/1-res
  - id: normed
    path: normed
    norm_scaling_factor: 2.5
  - id: gone
    path: gone
gemma-scope-like:
  repo_id: google/gemma-scope-2b-pt-res
  model: gemma-2-2b
  conversion_func: gemma_2
  saes:
  - id: layer_0/width_16k/average_l0_105
    path: layer_0/width_16k/average_l0_105
"#;

/// registry.yaml and a cache holding org/tiny-saes with `v5/` (the SAELens 5 TopK) and
/// `normed/` (the SAELens 6 standard SAE saved as an expected_average_only_in one).
fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let registry = t.path().join("pretrained_saes.yaml");
    std::fs::write(&registry, REGISTRY).unwrap();
    let cache = t.path().join("hub");
    let commit = "d".repeat(40);
    let repo = cache.join("models--org--tiny-saes");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), &commit).unwrap();
    let snap = repo.join("snapshots").join(&commit);
    for (folder, src) in [
        ("v5", fixtures().join("seed_v5/topk")),
        ("normed", fixture()),
    ] {
        let d = snap.join(folder);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["cfg.json", "sae_weights.safetensors"] {
            std::fs::copy(src.join(f), d.join(f)).unwrap();
        }
    }
    let cfg = snap.join("normed/cfg.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace(
            r#""normalize_activations": "none""#,
            r#""normalize_activations": "expected_average_only_in""#,
        ),
    )
    .unwrap();
    (t, registry, cache)
}

fn recon(sae: &sae::Sae, x: &[f32], rows: usize) -> Vec<f32> {
    let x = Tensor::from_vec(&Device::Cpu, &[rows, sae.cfg().d_in], x.to_vec()).unwrap();
    sae.forward(&x).unwrap().1.to_vec()
}

#[test]
fn a_release_and_id_load_the_cached_sae_with_the_registry_overrides() {
    let (_t, registry, cache) = setup();
    assert_eq!(
        parse_spec("tiny-res:blocks.1.hook_resid_pre"),
        Some(("tiny-res", "blocks.1.hook_resid_pre"))
    );
    assert_eq!(
        parse_spec(fixture().to_str().unwrap()),
        None,
        "an existing path is a path"
    );
    let p = resolve(
        &registry,
        &Hub::offline(&cache),
        "tiny-res",
        "blocks.1.hook_resid_pre",
    )
    .unwrap();
    assert_eq!(p.repo_id, "org/tiny-saes");
    assert!(p.dir.ends_with("v5"));
    let sae = p.load(&Device::Cpu).unwrap();
    // The flat cfg.json says blocks.0.hook_resid_pre; the release overrides it, and the
    // registry's neuronpedia id replaces its null.
    let md = &sae.cfg().metadata;
    assert_eq!(md["hook_name"], "blocks.1.hook_resid_pre", "{md:?}");
    assert_eq!(md["neuronpedia_id"], "tiny/1-res", "{md:?}");
    // Otherwise the same SAE as the fixture directory.
    let plain = sae::io::load(&fixtures().join("seed_v5/topk"), &Device::Cpu).unwrap();
    assert_eq!(plain.cfg().metadata["hook_name"], "blocks.0.hook_resid_pre");
    let x: Vec<f32> = (0..4 * 128)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
        .collect();
    assert_eq!(recon(&sae, &x, 4), recon(&plain, &x, 4));
}

#[test]
fn the_norm_scaling_factor_is_folded_in_as_saelens_does() {
    let (_t, registry, cache) = setup();
    let sae = resolve(&registry, &Hub::offline(&cache), "tiny-res", "normed")
        .unwrap()
        .load(&Device::Cpu)
        .unwrap();
    assert_eq!(
        sae.cfg().normalize_activations,
        schemas::NormalizeActivations::None
    );
    // Folded: sae(x) = plain(2.5 x) / 2.5, within f32 rounding (1e-5 of the largest value).
    let plain = sae::io::load(&fixture(), &Device::Cpu).unwrap();
    let x: Vec<f32> = (0..4 * 128)
        .map(|i| ((i * 53 % 97) as f32 - 48.0) / 60.0)
        .collect();
    let scaled: Vec<f32> = x.iter().map(|v| v * 2.5).collect();
    let want: Vec<f32> = recon(&plain, &scaled, 4).iter().map(|v| v / 2.5).collect();
    let got = recon(&sae, &x, 4);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-5 * scale, "{g} vs {w}");
    }
}

#[test]
fn what_cannot_be_loaded_is_refused_by_name() {
    let (_t, registry, cache) = setup();
    let e = |r: &str, i: &str| {
        resolve(&registry, &Hub::offline(&cache), r, i)
            .unwrap_err()
            .to_string()
    };
    let m = e("gemma-scope-like", "layer_0/width_16k/average_l0_105");
    assert!(
        m.contains("release 'gemma-scope-like'") && m.contains("conversion 'gemma_2'"),
        "{m}"
    );
    let m = e("tiny", "x");
    assert!(
        m.contains("release 'tiny' is not in") && m.contains("similar: tiny-res"),
        "{m}"
    );
    let m = e("tiny-res", "layer_9");
    assert!(
        m.contains("no SAE id 'layer_9'") && m.contains("blocks.1.hook_resid_pre, normed, gone"),
        "{m}"
    );
    let m = e("tiny-res", "gone");
    assert!(
        m.contains("tiny-res:gone")
            && m.contains("lacks gone/cfg.json, gone/sae_weights.safetensors"),
        "{m}"
    );
    let bad = registry.with_file_name("bad.yaml");
    std::fs::write(&bad, "tiny-res: [unclosed").unwrap();
    let m = resolve(&bad, &Hub::offline(&cache), "tiny-res", "x")
        .unwrap_err()
        .to_string();
    assert!(m.contains("not a SAELens registry"), "{m}");
    assert!(Path::new(&registry).exists());
}

#[test]
fn a_release_missing_from_the_cache_is_downloaded_from_the_hub() {
    let (t, registry, _) = setup();
    let hub = schemas::fake_hub::FakeHub::start();
    let src = fixtures().join("seed_v5/topk");
    let read = |f: &str| std::fs::read(src.join(f)).unwrap();
    let c = "e".repeat(40);
    hub.add(
        schemas::hub::RepoKind::Model,
        "org/tiny-saes",
        &c,
        &["main"],
        &[
            ("v5/cfg.json", read("cfg.json")),
            (
                "v5/sae_weights.safetensors",
                read("sae_weights.safetensors"),
            ),
            ("v5/sparsity.safetensors", read("sae_weights.safetensors")),
            ("other/cfg.json", b"{}".to_vec()),
        ],
    );
    let cache = t.path().join("empty-cache");
    let online = Hub {
        cache: cache.clone(),
        endpoint: hub.endpoint.clone(),
        offline: false,
        token: None,
    };
    let p = resolve(&registry, &online, "tiny-res", "blocks.1.hook_resid_pre").unwrap();
    assert_eq!(
        p.dir,
        cache.join(format!("models--org--tiny-saes/snapshots/{c}/v5"))
    );
    for f in [
        "cfg.json",
        "sae_weights.safetensors",
        "sparsity.safetensors",
    ] {
        assert!(p.dir.join(f).is_file(), "{f} downloaded");
    }
    assert!(
        !p.dir.parent().unwrap().join("other").exists(),
        "only this SAE's folder"
    );
    let sae = p.load(&Device::Cpu).unwrap();
    assert_eq!(sae.cfg().metadata["hook_name"], "blocks.1.hook_resid_pre");
    // The release's SAE the hub lacks: named, with the commit it looked at.
    let e = resolve(&registry, &online, "tiny-res", "gone")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tiny-res:gone") && e.contains(&format!("at commit {c} has no gone/cfg.json")),
        "{e}"
    );
}
