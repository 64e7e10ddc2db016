//! Interventions at hook points: SAEs spliced in (SAELens's `HookedSAETransformer`)
//! and zero ablation.

use crate::config::LmConfig;
use crate::hooks::{HookPoint, Hooks};
use crate::{LmError, Result};
use kernels::{ops, Tensor};
use sae::Sae;

/// What happens at one hook.
pub enum Intervention<'a> {
    /// The activation is replaced by the SAE's reconstruction. With `use_error_term`
    /// the SAE's error `x - sae(x)` is added back, so the output equals the clean
    /// activation while the SAE's latents are still computed (SAELens's error term,
    /// computed without the splice).
    Sae { sae: &'a Sae, use_error_term: bool },
    /// The activation is replaced by zeros.
    ZeroAblate,
}

struct Item<'a> {
    hook: HookPoint,
    /// `(column offset, width)` of the selected head, if `hook_head_index` is set.
    head: Option<(usize, usize)>,
    what: Intervention<'a>,
}

/// A set of interventions, run by the forward pass as a [`Hooks`] visitor.
#[derive(Default)]
pub struct Interventions<'a> {
    items: Vec<Item<'a>>,
    /// Rows the SAE may replace; the others keep the clean activation (SAELens's
    /// evals leave special tokens alone). `None`: every row.
    pub sae_rows: Option<Vec<bool>>,
}

impl<'a> Interventions<'a> {
    pub fn new() -> Self {
        Interventions::default()
    }

    /// Adds an intervention at `hook`, on head `head` only if given. Checks the
    /// head index and that an SAE's `d_in` matches the activation's width.
    pub fn add(
        &mut self,
        cfg: &LmConfig,
        hook: HookPoint,
        head: Option<usize>,
        what: Intervention<'a>,
    ) -> Result<()> {
        if !hook.per_position() {
            return Err(LmError::Invalid(format!(
                "cannot intervene at '{hook}': only per-position hooks are supported"
            )));
        }
        let head = match head {
            None => None,
            Some(h) => {
                let n = hook.n_heads(cfg).ok_or_else(|| LmError::NoHeads {
                    hook: hook.to_string(),
                })?;
                if h >= n {
                    return Err(LmError::HeadOutOfRange {
                        hook: hook.to_string(),
                        index: h,
                        n_heads: n,
                    });
                }
                Some((h * cfg.d_head, cfg.d_head))
            }
        };
        if let Intervention::Sae { sae, .. } = &what {
            let width = head.map_or(hook.width(cfg, 0), |(_, w)| w);
            if sae.cfg().d_in != width {
                return Err(LmError::Invalid(format!(
                    "the SAE has d_in = {}, but '{hook}'{} has width {width}",
                    sae.cfg().d_in,
                    if head.is_some() { " (one head)" } else { "" }
                )));
            }
        }
        self.items.push(Item { hook, head, what });
        Ok(())
    }
}

/// The columns `start..start + width` of `act` (one head), or all of it.
pub fn head_columns(act: &Tensor, head: Option<(usize, usize)>) -> Tensor {
    match head {
        Some((start, w)) => {
            let mut x = Tensor::zeros(&act.device(), &[act.rows(), w]);
            ops::copy_cols(act, start, &mut x);
            x
        }
        None => act.clone(),
    }
}

fn replace(item: &Item, act: &mut Tensor, sae_rows: Option<&[bool]>) -> Result<()> {
    let x = head_columns(act, item.head);
    let new = match &item.what {
        Intervention::ZeroAblate => Tensor::zeros(&act.device(), x.shape()),
        Intervention::Sae {
            sae,
            use_error_term,
        } => {
            let (_, mut out) = sae.forward(&x)?;
            if *use_error_term {
                let mut err = x.clone();
                ops::axpy(&mut err, -1.0, &out);
                ops::axpy(&mut out, 1.0, &err);
            }
            if let Some(rows) = sae_rows {
                let keep: Vec<bool> = rows.iter().map(|r| !r).collect();
                ops::select_rows(&mut out, &x, &keep);
            }
            out
        }
    };
    match item.head {
        Some((start, _)) => ops::set_cols(act, start, &new),
        None => ops::copy(act, &new),
    }
    Ok(())
}

impl Hooks for Interventions<'_> {
    fn wants(&self, hook: &HookPoint) -> bool {
        self.items.iter().any(|i| i.hook == *hook)
    }

    fn visit(&mut self, hook: &HookPoint, act: &mut Tensor) -> Result<()> {
        for item in self.items.iter().filter(|i| i.hook == *hook) {
            if let Some(rows) = &self.sae_rows {
                if rows.len() != act.rows() {
                    return Err(LmError::Invalid(format!(
                        "the SAE row mask has {} rows, the activation at '{hook}' {}",
                        rows.len(),
                        act.rows()
                    )));
                }
            }
            replace(item, act, self.sae_rows.as_deref())?;
        }
        Ok(())
    }
}
