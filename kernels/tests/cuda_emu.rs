//! The CUDA kernels' logic on the CPU: `kernels/cuda/emu/check.cpp` compiles
//! `kernels/cuda/*.cu` with g++ against a small CUDA emulation (`cuda_emu.h`: blocks of
//! threads, barriers, warp shuffles, atomics) and checks every kernel against a plain
//! reference loop, exact or at a stated tolerance, under AddressSanitizer and UBSan (an
//! out-of-bounds access fails it). It needs no GPU and no CUDA, so the
//! index arithmetic, scans, radix selection and compaction are tested in every build;
//! what only a GPU shows (memory ordering, launch limits, speed) is left to the `cuda_*`
//! tests on a device. A second test checks that every launch in `src/cuda.rs` passes as
//! many arguments as its kernel takes. Without g++ the first says it was skipped, unless
//! `SAESTREAM_REQUIRE_GXX=1` (CI) makes that a failure.

use std::path::Path;
use std::process::Command;

#[test]
fn every_cuda_kernel_matches_its_reference_on_the_cpu_emulation() {
    let have_gxx = Command::new("g++").arg("--version").output().is_ok();
    if !have_gxx {
        assert!(
            std::env::var("SAESTREAM_REQUIRE_GXX").map_or(true, |v| v != "1"),
            "SAESTREAM_REQUIRE_GXX=1 but g++ cannot be run"
        );
        eprintln!("skipped: no g++ here");
        return;
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda/emu/check.cpp");
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda-emu-check");
    let built = Command::new("g++")
        // AddressSanitizer and UBSan make any out-of-bounds access or undefined
        // behaviour in a kernel a failure (compute-sanitizer's memcheck, on the CPU).
        .args(["-std=c++20", "-O1", "-g", "-ffp-contract=off", "-pthread"])
        .args([
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=undefined",
            "-o",
        ])
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "g++ failed on {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&built.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "kernel checks failed:\n{out}\n{err}");
    assert!(out.contains("all kernel checks passed"), "{out}");
}

/// The kernels' parameter lists, by name, from the CUDA source.
fn kernel_arity(src: &str) -> std::collections::HashMap<String, usize> {
    let mut out = std::collections::HashMap::new();
    for part in src.split("__global__ void ").skip(1) {
        let part = part
            .strip_prefix("__launch_bounds__(")
            .map_or(part, |p| p.split_once(')').unwrap().1.trim_start());
        let (name, rest) = part.split_once('(').unwrap();
        let params = rest.split_once(')').unwrap().0;
        out.insert(name.trim().to_string(), params.split(',').count());
    }
    out
}

/// Splits `a, f(b, c), d` at its top-level commas.
fn top_level_args(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' if depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(s[start..].trim());
    out.retain(|a| !a.is_empty());
    out
}

#[test]
fn every_launch_passes_as_many_arguments_as_its_kernel_takes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cu = ["cuda/sae.cu", "cuda/ops.cu"]
        .map(|f| std::fs::read_to_string(dir.join(f)).unwrap())
        .join("\n");
    let arity = kernel_arity(&cu);
    let rs = std::fs::read_to_string(dir.join("src/cuda.rs")).unwrap();
    let mut checked = 0;
    for call in rs.split("launch!(").skip(1) {
        // the macro call's text up to its closing parenthesis
        let mut depth = 1;
        let end = call
            .char_indices()
            .find(|&(_, c)| {
                depth += (c == '(') as i32 - (c == ')') as i32;
                depth == 0
            })
            .unwrap()
            .0;
        let body = &call[..end];
        let Some(name) = body.split('"').nth(1) else {
            continue; // the macro's own definition
        };
        let args = top_level_args(body.split_once(';').unwrap().1);
        let want = arity
            .get(name)
            .unwrap_or_else(|| panic!("launch of {name}, which the CUDA source lacks"));
        assert_eq!(args.len(), *want, "launch of {name}: {args:?}");
        checked += 1;
    }
    assert!(checked >= 60, "only {checked} launches found");
}
