//! Library part of the `activation-producer` stage (the binary is a thin `main` over it).

pub mod bench;
pub mod dump;
pub mod eval;

use anyhow::{bail, Context, Result};
use kernels::Device;
use lm::{HookedTransformer, TokenBatch};
use std::path::Path;

/// Loads the model and the token file, checking the tokens against the model.
pub fn load_model_and_tokens(
    model: &Path,
    tokens: &Path,
    device: &str,
) -> Result<(HookedTransformer, TokenBatch)> {
    let device = Device::parse(device)?;
    let model = HookedTransformer::load(model, &device)
        .with_context(|| format!("cannot load the model in {}", model.display()))?;
    let rows = pipeline::read_tokens(tokens)?;
    let batch = TokenBatch::new(&rows.ids, rows.n_seq, rows.seq_len, model.cfg())
        .with_context(|| format!("tokens in {}", tokens.display()))?;
    Ok((model, batch))
}

/// Python slice semantics (`slice(start, stop, step)`, negative indices from the end)
/// over `0..len`, positive steps only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqposSlice {
    pub start: Option<i64>,
    pub stop: Option<i64>,
    pub step: Option<i64>,
}

impl SeqposSlice {
    /// Parses `START:STOP[:STEP]`, each part optional (`1:`, `:-1`, `::2`).
    pub fn parse(s: &str) -> Result<SeqposSlice> {
        let parts: Vec<&str> = s.split(':').collect();
        if !(2..=3).contains(&parts.len()) {
            bail!(
                "--seqpos-slice '{s}': expected START:STOP or START:STOP:STEP (parts may be empty)"
            );
        }
        let num = |p: &str, what: &str| -> Result<Option<i64>> {
            let p = p.trim();
            if p.is_empty() {
                return Ok(None);
            }
            p.parse()
                .map(Some)
                .with_context(|| format!("--seqpos-slice '{s}': {what} '{p}' is not an integer"))
        };
        let out = SeqposSlice {
            start: num(parts[0], "START")?,
            stop: num(parts[1], "STOP")?,
            step: match parts.get(2) {
                Some(p) => num(p, "STEP")?,
                None => None,
            },
        };
        if out.step.is_some_and(|st| st <= 0) {
            bail!("--seqpos-slice '{s}': STEP must be positive");
        }
        Ok(out)
    }

    /// The positions selected out of `0..len`.
    pub fn positions(&self, len: usize) -> Vec<usize> {
        let n = len as i64;
        let clamp = |v: i64| if v < 0 { (v + n).max(0) } else { v.min(n) };
        let start = self.start.map_or(0, clamp);
        let stop = self.stop.map_or(n, clamp);
        let step = self.step.unwrap_or(1);
        (start..stop)
            .step_by(step as usize)
            .map(|p| p as usize)
            .collect()
    }
}

/// Refuses to replace an existing output unless asked.
pub fn check_output(path: &Path, overwrite: bool) -> Result<()> {
    if path.exists() && !overwrite {
        bail!(
            "{} already exists; pass --overwrite to replace it",
            path.display()
        );
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            bail!("the output's directory {} does not exist", parent.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqpos_slice_follows_python() {
        let p = |s: &str, n| SeqposSlice::parse(s).unwrap().positions(n);
        assert_eq!(p("1:", 5), vec![1, 2, 3, 4]);
        assert_eq!(p(":-1", 5), vec![0, 1, 2, 3]);
        assert_eq!(p("::2", 5), vec![0, 2, 4]);
        assert_eq!(p("-3:10:2", 5), vec![2, 4]);
        assert_eq!(p("4:2", 5), Vec::<usize>::new());
        assert_eq!(p(":", 3), vec![0, 1, 2]);
        assert!(SeqposSlice::parse("1").is_err());
        assert!(SeqposSlice::parse("a:2")
            .unwrap_err()
            .to_string()
            .contains("START 'a'"));
        assert!(SeqposSlice::parse("::0")
            .unwrap_err()
            .to_string()
            .contains("positive"));
    }
}
