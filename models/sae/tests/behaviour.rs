//! Initialisation rules, folding, noise and `b_dec` initialisation: the SAELens
//! behaviours that are deterministic rules rather than numbers to match.

mod common;

use common::*;
use kernels::{ops, Tensor};
use sae::{io, Architecture, BDecInitMethod, Sae, SaeConfig, StepInput};

fn rows(v: &[f32], cols: usize) -> Vec<&[f32]> {
    v.chunks(cols).collect()
}

fn norm(r: &[f32]) -> f32 {
    r.iter().map(|x| x * x).sum::<f32>().sqrt()
}

#[test]
fn saelens6_initialisation() {
    for arch in [
        Architecture::Standard,
        Architecture::Gated,
        Architecture::JumpRelu,
        Architecture::TopK,
        Architecture::BatchTopK,
        Architecture::MatryoshkaBatchTopK,
    ] {
        let mut c = SaeConfig::new(arch, 16, 40);
        c.k = 4.0;
        c.matryoshka_widths = vec![8, 40];
        c.jumprelu_init_threshold = 0.02;
        let sae = Sae::new(c, &DEV, 1).unwrap();
        let w_dec = sae.params.get("W_dec").to_vec();
        let w_enc = sae.params.get("W_enc").to_vec();
        // decoder rows at decoder_init_norm 0.1, W_enc = W_dec^T exactly
        assert!(
            rows(&w_dec, 16)
                .iter()
                .all(|r| (norm(r) - 0.1).abs() < 1e-6),
            "{arch}"
        );
        for i in 0..16 {
            for j in 0..40 {
                assert_eq!(w_enc[i * 40 + j], w_dec[j * 16 + i], "{arch}");
            }
        }
        for (name, t) in sae.params.iter() {
            let v = t.to_vec();
            match name {
                "W_enc" | "W_dec" => {}
                "threshold" => assert!(v.iter().all(|&x| x == 0.02), "{arch}"),
                _ => assert!(v.iter().all(|&x| x == 0.0), "{arch}: {name} starts at zero"),
            }
        }
        assert_eq!(sae.buffers.topk_threshold, 0.0);
    }
    // None: no renormalisation, still W_enc = W_dec^T (kaiming bound sqrt(6 / d_in))
    let mut c = SaeConfig::new(Architecture::Standard, 16, 40);
    c.decoder_init_norm = None;
    c.scale_sparsity_penalty_by_decoder_norm = true;
    let sae = Sae::new(c, &DEV, 2).unwrap();
    let w = sae.params.get("W_dec").to_vec();
    assert!(w.iter().all(|v| v.abs() <= (6.0f32 / 16.0).sqrt()));
}

#[test]
fn saelens5_initialisation_options() {
    let base = |f: &dyn Fn(&mut SaeConfig)| {
        let mut c = SaeConfig::new(Architecture::Standard, 16, 40);
        c.decoder_init_norm = None;
        f(&mut c);
        Sae::new(c, &DEV, 3).unwrap()
    };
    let transposed = |s: &Sae| {
        let (we, wd) = (
            s.params.get("W_enc").to_vec(),
            s.params.get("W_dec").to_vec(),
        );
        (0..16).all(|i| (0..40).all(|j| we[i * 40 + j] == wd[j * 16 + i]))
    };
    // independent kaiming-uniform encoder and decoder
    let s = base(&|_| {});
    assert!(!transposed(&s));
    assert!(s
        .params
        .get("W_enc")
        .to_vec()
        .iter()
        .all(|v| v.abs() <= (6.0f32 / 40.0).sqrt()));
    // heuristic init: decoder rows at the heuristic norm; transposed encoder
    let s = base(&|c| {
        c.decoder_heuristic_init = true;
        c.decoder_heuristic_init_norm = 0.3;
        c.init_encoder_as_decoder_transpose = true;
    });
    assert!(rows(&s.params.get("W_dec").to_vec(), 16)
        .iter()
        .all(|r| (norm(r) - 0.3).abs() < 1e-5));
    assert!(transposed(&s));
    // unit-norm decoder applied last
    let s = base(&|c| {
        c.decoder_heuristic_init = true;
        c.normalize_sae_decoder = true;
    });
    assert!(rows(&s.params.get("W_dec").to_vec(), 16)
        .iter()
        .all(|r| (norm(r) - 1.0).abs() < 1e-5));
    // orthogonal decoder: W_dec^T W_dec = I (d_sae >= d_in)
    let s = base(&|c| c.decoder_orthogonal_init = true);
    let w = s.params.get("W_dec").to_vec();
    for a in 0..16 {
        for b in 0..16 {
            let dot: f32 = (0..40).map(|j| w[j * 16 + a] * w[j * 16 + b]).sum();
            assert!((dot - (a == b) as u8 as f32).abs() < 1e-5);
        }
    }
    // SAELens 5 JumpReLU: log_threshold = log(init)
    let mut c = SaeConfig::new(Architecture::JumpRelu, 16, 40);
    c.jumprelu_log_threshold = true;
    c.jumprelu_init_threshold = 0.001;
    let s = Sae::new(c, &DEV, 4).unwrap();
    assert!(s
        .params
        .get("log_threshold")
        .to_vec()
        .iter()
        .all(|v| (v - 0.001f32.ln()).abs() < 1e-6));
}

/// `fold_W_dec_norm` leaves the function unchanged and the decoder rows at unit norm.
#[test]
fn fold_w_dec_norm_preserves_outputs() {
    let x = &inputs().batches[0];
    for arch in [
        "standard",
        "gated",
        "jumprelu",
        "jumprelu_tanh",
        "topk",
        "batchtopk",
    ] {
        let mut sae = io::load(&fixtures().join(format!("saes/{arch}")), &DEV).unwrap();
        if arch == "batchtopk" {
            sae = sae.inference_form().unwrap(); // as JumpReLU: batch-independent
        }
        let (a1, o1) = sae.forward(x).unwrap();
        sae.fold_w_dec_norm().unwrap();
        let (a2, o2) = sae.forward(x).unwrap();
        assert!(
            rows(&sae.params.get("W_dec").to_vec(), 128)
                .iter()
                .all(|r| (norm(r) - 1.0).abs() < 1e-5),
            "{arch}"
        );
        let w = |t: &Tensor| t.to_vec().iter().map(|&v| v as f64).collect::<Vec<_>>();
        assert_close(&format!("{arch} sae_out"), &o2.to_vec(), &w(&o1), 1e-5);
        // latents change by the decoder norms (they now carry the scale), not in support
        let (p1, p2) = (a1.to_vec(), a2.to_vec());
        assert!(
            p1.iter().zip(&p2).all(|(a, b)| (*a == 0.0) == (*b == 0.0)),
            "{arch}: support changed"
        );
    }
    // TopK without rescaling refuses, as SAELens does
    let mut sae = io::load(&fixtures().join("seed_v5/topk"), &DEV).unwrap();
    assert!(sae.fold_w_dec_norm().is_err());
}

/// After folding a scaling factor `s`, raw inputs give what scaled inputs gave, scaled
/// back: `folded(x) = original(s x) / s`, with the same latents.
#[test]
fn fold_activation_norm_scaling_factor() {
    let raw = &inputs().batches_raw[0];
    let s = 35.53431835308805;
    let mut scaled = raw.clone();
    ops::scale(&mut scaled, s as f32);
    for arch in ["standard", "gated", "jumprelu", "topk", "batchtopk"] {
        let mut sae = io::load(&fixtures().join(format!("saes/{arch}")), &DEV).unwrap();
        if arch == "batchtopk" {
            // the running threshold must follow: compare the inference (JumpReLU) forms
            sae.buffers.topk_threshold = 0.5;
            let before = sae.inference_form().unwrap();
            sae.fold_activation_norm_scaling_factor(s);
            let after = sae.inference_form().unwrap();
            let (a1, _) = before.forward(&scaled).unwrap();
            let (a2, _) = after.forward(raw).unwrap();
            let z = |t: &Tensor| t.to_vec().iter().map(|v| *v != 0.0).collect::<Vec<_>>();
            assert_eq!(z(&a1), z(&a2), "batchtopk support");
            continue;
        }
        let (a1, o1) = sae.forward(&scaled).unwrap();
        sae.fold_activation_norm_scaling_factor(s);
        assert_eq!(
            sae.cfg().normalize_activations,
            schemas::NormalizeActivations::None
        );
        let (a2, o2) = sae.forward(raw).unwrap();
        let want: Vec<f64> = o1.to_vec().iter().map(|&v| v as f64 / s).collect();
        assert_close(&format!("{arch} out"), &o2.to_vec(), &want, 1e-5);
        let want: Vec<f64> = a1.to_vec().iter().map(|&v| v as f64).collect();
        let scale = if arch == "topk" { 1.0 / s } else { 1.0 };
        let got: Vec<f32> = a2
            .to_vec()
            .iter()
            .map(|&v| (v as f64 / scale) as f32)
            .collect();
        assert_close(&format!("{arch} acts"), &got, &want, 1e-5);
    }
}

/// SAELens's `expected_average_only_in` factor on the fixture pool (recorded in the
/// fixture: 35.53431835308805 = sqrt(128) / 0.31838822).
#[test]
fn norm_scaling_factor_matches_fixture() {
    let info = json(&fixtures().join("saes/saes_info.json"));
    let mean_norm = info["input"]["mean_norm"].as_f64().unwrap();
    let want = info["input"]["scaling_factor"].as_f64().unwrap();
    assert!((sae::norm_scaling_factor(128, mean_norm) - want).abs() < 1e-9 * want);
    // and batches = batches_raw * factor
    let inp = inputs();
    let (r, b) = (inp.batches_raw[1].to_vec(), inp.batches[1].to_vec());
    assert!(r
        .iter()
        .zip(&b)
        .all(|(r, b)| ((r * want as f32) - b).abs() <= 1e-5 * b.abs().max(1.0)));
}

#[test]
fn noise_scale_perturbs_pre_activations_only_in_training() {
    let x = &inputs().batches[0];
    let mut sae = io::load(&fixtures().join("saes/standard"), &DEV).unwrap();
    let step = |sae: &mut Sae, seed| {
        sae.training_forward(&StepInput {
            sae_in: x,
            coefficient: 1.0,
            dead_neuron_mask: None,
            noise_seed: seed,
        })
        .unwrap();
        sae.last_hidden_pre().to_vec()
    };
    let clean = step(&mut sae, 0);
    let mut cfg = sae.cfg().clone();
    cfg.noise_scale = 0.5;
    sae.set_cfg(cfg).unwrap();
    let n1 = step(&mut sae, 7);
    assert_eq!(n1, step(&mut sae, 7), "same seed, same noise");
    assert_ne!(n1, step(&mut sae, 8));
    let diffs: Vec<f64> = n1.iter().zip(&clean).map(|(a, b)| (a - b) as f64).collect();
    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
    let var = diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / diffs.len() as f64;
    assert!(
        mean.abs() < 0.02 && (var.sqrt() - 0.5).abs() < 0.02,
        "noise mean {mean} std {}",
        var.sqrt()
    );
    // inference ignores it
    let (a, _) = sae.forward(x).unwrap();
    let clean_sae = io::load(&fixtures().join("saes/standard"), &DEV).unwrap();
    let (b, _) = clean_sae.forward(x).unwrap();
    assert_eq!(a.to_vec(), b.to_vec());
}

#[test]
fn b_dec_initialisation() {
    let x = &inputs().batches[0];
    let mut sae = io::load(&fixtures().join("saes/standard"), &DEV).unwrap();
    sae.initialize_b_dec(BDecInitMethod::Zeros, x).unwrap();
    assert!(sae.params.get("b_dec").to_vec().iter().all(|&v| v == 0.0));
    sae.initialize_b_dec(BDecInitMethod::Mean, x).unwrap();
    let xv = x.to_vec();
    let mean: Vec<f64> = (0..128)
        .map(|j| (0..128).map(|r| xv[r * 128 + j] as f64).sum::<f64>() / 128.0)
        .collect();
    assert_close("mean b_dec", &sae.params.get("b_dec").to_vec(), &mean, 1e-6);
    sae.initialize_b_dec(BDecInitMethod::GeometricMedian, x)
        .unwrap();
    let gm = sae.params.get("b_dec").to_vec();
    // the geometric median has a smaller sum of distances than the mean
    let dist = |c: &[f32]| {
        xv.chunks(128)
            .map(|r| norm(&r.iter().zip(c).map(|(a, b)| a - b).collect::<Vec<_>>()) as f64)
            .sum::<f64>()
    };
    let mean32: Vec<f32> = mean.iter().map(|&v| v as f32).collect();
    assert!(dist(&gm) < dist(&mean32));
    assert!(sae
        .initialize_b_dec(BDecInitMethod::Mean, &Tensor::zeros(&DEV, &[4, 7]))
        .is_err());
}

/// The decoder-norm projection of SAELens 5 and the unit-norm decoder.
#[test]
fn unit_norm_decoder_helpers() {
    let mut sae = io::load(&fixtures().join("saes/standard"), &DEV).unwrap();
    sae.set_decoder_norm_to_unit_norm();
    assert!(rows(&sae.params.get("W_dec").to_vec(), 128)
        .iter()
        .all(|r| (norm(r) - 1.0).abs() < 1e-5));
    let x = &inputs().batches[0];
    sae.training_forward(&StepInput {
        sae_in: x,
        coefficient: 1.0,
        dead_neuron_mask: None,
        noise_seed: 0,
    })
    .unwrap();
    let mut g = sae.zero_grads();
    sae.backward(&mut g);
    sae.remove_gradient_parallel_to_decoder_directions(&mut g);
    let (gw, w) = (g.get("W_dec").to_vec(), sae.params.get("W_dec").to_vec());
    for (gr, wr) in gw.chunks(128).zip(w.chunks(128)) {
        let dot: f32 = gr.iter().zip(wr).map(|(a, b)| a * b).sum();
        assert!(dot.abs() < 1e-6, "{dot}");
    }
}

/// Issue 18: finite weights and a finite input whose products overflow give an error
/// naming the output and the first bad entry, not NaN latents.
#[test]
fn forward_refuses_to_hand_on_an_overflow() {
    let dev = kernels::Device::Cpu;
    let mut sae = Sae::new(SaeConfig::new(Architecture::Standard, 4, 6), &dev, 1).unwrap();
    *sae.params.get_mut("W_enc") =
        Tensor::from_vec(&dev, &[4, 6], vec![f32::MAX / 2.0; 24]).unwrap();
    let x = Tensor::from_vec(&dev, &[2, 4], vec![1.0; 8]).unwrap();
    let e = sae.forward(&x).unwrap_err().to_string();
    assert!(
        e.contains("the SAE's feature_acts from a finite input")
            && e.contains("12 non-finite value(s)")
            && e.contains("row 0, column 0"),
        "{e}"
    );
    // an ordinary SAE and input pass
    let ok = Sae::new(SaeConfig::new(Architecture::Standard, 4, 6), &dev, 1).unwrap();
    assert!(ok.forward(&x).is_ok());
}
