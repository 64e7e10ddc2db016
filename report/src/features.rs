//! The feature browser's data and page: for each latent, its top activating contexts
//! (one per sequence: a window around the sequence's maximum, the latent's activation
//! at every token of it), its density, a histogram of its activations, and the tokens
//! its decoder direction promotes and suppresses through the unembedding.
//!
//! Memory is bounded by what is kept per latent, whatever the number of tokens:
//! `top_k × (before + after + 1) × 8` bytes of contexts, the histogram's
//! [`STREAM_BINS`] counters and `2 × n_logits × 8` bytes of logit effects.

use crate::charts;
use crate::data::{StreamHistogram, STREAM_BINS};
use crate::html::{esc, missing, num_cell, page};
use serde_json::{json, Value};
use std::fmt::Write;

#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Contexts kept per latent.
    pub top_k: usize,
    /// Tokens shown before and after the maximum.
    pub before: usize,
    pub after: usize,
}

impl Settings {
    /// Bytes kept per latent (the statement in `--help`).
    pub fn bytes_per_latent(&self, n_logits: usize) -> usize {
        self.top_k * (self.before + self.after + 1) * 8 + STREAM_BINS * 8 + 2 * n_logits * 8 + 64
    }
}

/// One context: sequence `seq`, maximum at position `pos`; the window starts at `start`.
#[derive(Clone, Debug, PartialEq)]
pub struct Context {
    pub seq: u64,
    pub pos: u32,
    pub activation: f32,
    pub start: u32,
    pub tokens: Vec<u32>,
    /// The latent's activation at each token of the window (0 at excluded tokens).
    pub acts: Vec<f32>,
}

#[derive(Clone, Debug)]
pub struct Latent {
    pub index: usize,
    /// Tokens it fired on (activation ≠ 0).
    pub fired: u64,
    pub sum: f64,
    pub max: f32,
    pub hist: StreamHistogram,
    /// Best first: by activation, then by earlier sequence.
    pub top: Vec<Context>,
    /// Token ids and logit effects, largest first / most negative first.
    pub promoted: Vec<(u32, f32)>,
    pub suppressed: Vec<(u32, f32)>,
}

/// Collects the statistics of some latents over a stream of sequences.
pub struct Collector {
    pub settings: Settings,
    pub latents: Vec<Latent>,
    /// Tokens counted (excluded ones are not).
    pub tokens: u64,
    pub sequences: u64,
}

/// Latents handled together by one thread: a block reads each row's cache lines once.
const BLOCK: usize = 32;

impl Collector {
    pub fn new(latents: &[usize], settings: Settings) -> Collector {
        Collector {
            settings,
            latents: latents
                .iter()
                .map(|&index| Latent {
                    index,
                    fired: 0,
                    sum: 0.0,
                    max: 0.0,
                    hist: StreamHistogram::default(),
                    top: Vec::new(),
                    promoted: Vec::new(),
                    suppressed: Vec::new(),
                })
                .collect(),
            tokens: 0,
            sequences: 0,
        }
    }

    /// Adds `n_seq` whole sequences (`seq0`, `seq0 + 1`, …) of `seq_len` tokens:
    /// `ids` and `keep` per token, `acts` the latents `[n_seq * seq_len, d_sae]`.
    /// Tokens not kept (special tokens) are neither counted nor candidates.
    pub fn add(
        &mut self,
        seq0: u64,
        seq_len: usize,
        ids: &[u32],
        keep: &[bool],
        acts: &[f32],
        d_sae: usize,
    ) {
        let rows = ids.len();
        assert!(
            seq_len > 0
                && rows.is_multiple_of(seq_len)
                && keep.len() == rows
                && acts.len() == rows * d_sae
        );
        let n_seq = rows / seq_len;
        let st = self.settings;
        use rayon::prelude::*;
        self.latents.par_chunks_mut(BLOCK).for_each(|block| {
            let mut best = vec![(0f32, 0usize); block.len()];
            for s in 0..n_seq {
                best.iter_mut().for_each(|b| *b = (0.0, 0));
                for p in 0..seq_len {
                    let r = s * seq_len + p;
                    if !keep[r] {
                        continue;
                    }
                    let row = &acts[r * d_sae..(r + 1) * d_sae];
                    for (l, b) in block.iter_mut().zip(best.iter_mut()) {
                        let v = row[l.index];
                        if v != 0.0 {
                            l.fired += 1;
                            l.sum += v as f64;
                            l.hist.add(v);
                            if v > b.0 {
                                *b = (v, p);
                            }
                        }
                    }
                }
                for (l, &(v, p)) in block.iter_mut().zip(&best) {
                    if v <= 0.0 {
                        continue;
                    }
                    l.max = l.max.max(v);
                    // A tie keeps the earlier sequence.
                    if l.top.len() == st.top_k && l.top.last().is_none_or(|c| v <= c.activation) {
                        continue;
                    }
                    let start = p.saturating_sub(st.before);
                    let end = (p + st.after + 1).min(seq_len);
                    let base = s * seq_len;
                    let ctx = Context {
                        seq: seq0 + s as u64,
                        pos: p as u32,
                        activation: v,
                        start: start as u32,
                        tokens: ids[base + start..base + end].to_vec(),
                        acts: (start..end)
                            .map(|q| {
                                if keep[base + q] {
                                    acts[(base + q) * d_sae + l.index]
                                } else {
                                    0.0
                                }
                            })
                            .collect(),
                    };
                    let at = l.top.partition_point(|c| c.activation >= v);
                    l.top.insert(at, ctx);
                    l.top.truncate(st.top_k);
                }
            }
        });
        self.tokens += keep.iter().filter(|&&k| k).count() as u64;
        self.sequences += n_seq as u64;
    }
}

impl Latent {
    pub fn density(&self, tokens: u64) -> f64 {
        if tokens == 0 {
            0.0
        } else {
            self.fired as f64 / tokens as f64
        }
    }
    pub fn mean(&self) -> Option<f64> {
        (self.fired > 0).then(|| self.sum / self.fired as f64)
    }
    /// The histogram's bins up to the last non-empty one.
    fn bins(&self) -> Vec<(f64, f64, u64)> {
        let w = self.hist.bin_width as f64;
        let last = self
            .hist
            .counts
            .iter()
            .rposition(|&c| c > 0)
            .map_or(0, |i| i + 1);
        self.hist.counts[..last]
            .iter()
            .enumerate()
            .map(|(i, &c)| (i as f64 * w, (i + 1) as f64 * w, c))
            .collect()
    }
}

/// What the page says about the run that made it.
pub struct PageInfo {
    /// `sae`, `model`, `hook_name`, `d_sae`, ... (shown and written to the JSON as given).
    pub meta: Value,
    /// Why there are no logit effects, when there are none.
    pub logits_note: Option<String>,
}

/// Token ids as text, for display.
pub type Decode<'a> = &'a dyn Fn(u32) -> String;

fn token_json(t: u32, v: f32, decode: Decode) -> Value {
    json!({"token": t, "str": decode(t), "value": v})
}

/// The data of the page, for other tools.
pub fn to_json(c: &Collector, info: &PageInfo, decode: Decode) -> Value {
    let latents: Vec<Value> = c
        .latents
        .iter()
        .map(|l| {
            json!({
                "index": l.index,
                "density": l.density(c.tokens),
                "fired": l.fired,
                "max_activation": l.max,
                "mean_activation": l.mean(),
                "histogram": {"bin_width": l.hist.bin_width, "counts": l.hist.counts},
                "top_contexts": l.top.iter().map(|x| json!({
                    "seq": x.seq, "pos": x.pos, "activation": x.activation, "start": x.start,
                    "tokens": x.tokens, "token_strs": x.tokens.iter().map(|&t| decode(t)).collect::<Vec<_>>(),
                    "acts": x.acts,
                })).collect::<Vec<_>>(),
                "promoted": l.promoted.iter().map(|&(t, v)| token_json(t, v, decode)).collect::<Vec<_>>(),
                "suppressed": l.suppressed.iter().map(|&(t, v)| token_json(t, v, decode)).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "meta": info.meta,
        "tokens": c.tokens,
        "sequences": c.sequences,
        "top_k": c.settings.top_k,
        "window": {"before": c.settings.before, "after": c.settings.after},
        "logits_note": info.logits_note,
        "latents": latents,
    })
}

/// A token for display on one line: newlines and tabs shown as symbols.
fn show(t: &str) -> String {
    esc(&t.replace('\n', "↵").replace('\t', "⇥").replace('\r', ""))
}

fn context_html(x: &Context, decode: Decode) -> String {
    let mut o = format!(
        "<div class=\"ctx\"><span class=\"act\">{:.3}</span>",
        x.activation
    );
    for (i, (&t, &a)) in x.tokens.iter().zip(&x.acts).enumerate() {
        let rel = if x.activation > 0.0 {
            (a / x.activation).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let cls = if x.start as usize + i == x.pos as usize {
            " class=\"max\""
        } else {
            ""
        };
        if rel > 0.0 {
            let _ = write!(
                o,
                "<span{cls} style=\"--a:{rel:.2}\" title=\"{a:.3}\">{}</span>",
                show(&decode(t))
            );
        } else {
            let _ = write!(o, "<span{cls}>{}</span>", show(&decode(t)));
        }
    }
    o + "</div>"
}

fn logit_table(title: &str, v: &[(u32, f32)], decode: Decode) -> String {
    let mut o =
        format!("<table><thead><tr><th class=\"l\">{title}</th><th>logit</th></tr></thead><tbody>");
    for &(t, x) in v {
        let _ = write!(
            o,
            "<tr><td class=\"l\"><span class=\"tok\">{}</span></td><td>{x:+.3}</td></tr>",
            show(&decode(t))
        );
    }
    o + "</tbody></table>"
}

/// The page: an index of the latents (sortable by density and maximum) and a section per
/// latent that fired; those that never did are listed together.
pub fn render_html(c: &Collector, info: &PageInfo, decode: Decode) -> String {
    let m = &info.meta;
    let s = |k: &str| {
        m[k].as_str()
            .map(String::from)
            .unwrap_or_else(|| m[k].to_string())
    };
    let mut b = format!(
        "<h1>Feature browser: {}</h1><p class=\"sub\">hook {} · model {} · {} sequences, {} tokens (special tokens excluded) · top {} contexts per latent, {} tokens before and {} after the maximum</p>",
        esc(&s("sae")),
        esc(&s("hook_name")),
        esc(&s("model")),
        c.sequences,
        c.tokens,
        c.settings.top_k,
        c.settings.before,
        c.settings.after
    );
    if let Some(n) = &info.logits_note {
        b += &missing(n);
    }
    let (live, dead): (Vec<&Latent>, Vec<&Latent>) = c.latents.iter().partition(|l| l.fired > 0);
    let _ = write!(
        b,
        "<h2>Latents</h2><p class=\"sub\">{} latents shown, {} fired at least once; click a column to sort</p>\
<table class=\"sortable\" id=\"index\"><thead><tr><th class=\"sort\">latent</th><th class=\"sort\">density</th>\
<th class=\"sort\">max activation</th><th class=\"sort\">mean activation</th><th class=\"l\">promotes</th><th class=\"l\">top context</th></tr></thead><tbody>",
        c.latents.len(),
        live.len()
    );
    for l in &live {
        // the top context around its maximum, the maximum in bold
        let snippet = l.top.first().map_or(String::new(), |x| {
            let m = (x.pos - x.start) as usize;
            let text = |ts: &[u32]| ts.iter().map(|&t| decode(t)).collect::<String>();
            let before = text(&x.tokens[..m]);
            let before: String = before
                .chars()
                .skip(before.chars().count().saturating_sub(40))
                .collect();
            let after: String = text(&x.tokens[m + 1..]).chars().take(20).collect();
            format!(
                "{}<b>{}</b>{}",
                show(&before),
                show(&decode(x.tokens[m])),
                show(&after)
            )
        });
        let promotes: Vec<String> = l
            .promoted
            .iter()
            .take(3)
            .map(|&(t, _)| format!("<span class=\"tok\">{}</span>", show(&decode(t))))
            .collect();
        let _ = write!(
            b,
            "<tr><td data-v=\"{0}\"><a href=\"#l-{0}\">{0}</a></td>{1}{2}{3}<td class=\"l\">{4}</td><td class=\"l\">{5}</td></tr>",
            l.index,
            num_cell(Some(l.density(c.tokens)), 5),
            num_cell(Some(l.max as f64), 3),
            num_cell(l.mean(), 3),
            promotes.join(" "),
            snippet
        );
    }
    b.push_str("</tbody></table>");
    if !dead.is_empty() {
        let ids: Vec<String> = dead.iter().map(|l| l.index.to_string()).collect();
        let _ = write!(
            b,
            "<p class=\"sub\">never fired ({}): {}</p>",
            dead.len(),
            ids.join(", ")
        );
    }
    for l in &live {
        let _ = write!(
            b,
            "<section class=\"latent\" id=\"l-{0}\"><h3>Latent {0}</h3><p class=\"sub\">density {1:.5} ({2} of {3} tokens) · max {4:.3} · mean {5:.3}</p><div class=\"cols\">",
            l.index,
            l.density(c.tokens),
            l.fired,
            c.tokens,
            l.max,
            l.mean().unwrap_or(0.0)
        );
        if let Some(ch) = charts::bars(
            "activations (tokens it fired on)",
            "activation",
            "tokens",
            &l.bins(),
            (260, 96),
        ) {
            b += &ch.html();
        }
        if !l.promoted.is_empty() {
            b += &logit_table("promotes", &l.promoted, decode);
            b += &logit_table("suppresses", &l.suppressed, decode);
        }
        b.push_str("</div>");
        for x in &l.top {
            b += &context_html(x, decode);
        }
        b.push_str("</section>");
    }
    page(&format!("features of {}", s("sae")), &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random sparse latents over several batches, against a brute-force scan.
    #[test]
    fn top_contexts_equal_a_brute_force_scan() {
        let (d_sae, t, n_seq, batches) = (70, 9, 5, 4);
        let settings = Settings {
            top_k: 3,
            before: 2,
            after: 1,
        };
        let latents: Vec<usize> = (0..d_sae).step_by(1).collect();
        let mut c = Collector::new(&latents, settings);
        let mut seed = 11u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 40) as u32
        };
        // per sequence: index, ids, kept, latents
        type Seq = (u64, Vec<u32>, Vec<bool>, Vec<f32>);
        let mut all: Vec<Seq> = Vec::new();
        for bi in 0..batches {
            let rows = n_seq * t;
            let ids: Vec<u32> = (0..rows).map(|_| rnd() % 50).collect();
            let keep: Vec<bool> = ids.iter().map(|&i| i != 0).collect();
            let acts: Vec<f32> = (0..rows * d_sae)
                .map(|_| {
                    let r = rnd();
                    // sparse, with ties (quantised values)
                    if r % 5 == 0 {
                        (r % 7) as f32 * 0.5
                    } else {
                        0.0
                    }
                })
                .collect();
            c.add((bi * n_seq) as u64, t, &ids, &keep, &acts, d_sae);
            for s in 0..n_seq {
                let r = s * t..(s + 1) * t;
                all.push((
                    (bi * n_seq + s) as u64,
                    ids[r.clone()].to_vec(),
                    keep[r.clone()].to_vec(),
                    acts[r.start * d_sae..r.end * d_sae].to_vec(),
                ));
            }
        }
        let kept: u64 = all
            .iter()
            .map(|x| x.2.iter().filter(|&&k| k).count() as u64)
            .sum();
        assert_eq!(c.tokens, kept);
        assert_eq!(c.sequences, (batches * n_seq) as u64);
        for (li, l) in c.latents.iter().enumerate() {
            let j = latents[li];
            // per sequence: the first position of the maximum over kept tokens
            let mut cands: Vec<(f32, u64, usize)> = Vec::new();
            let mut fired = 0;
            for (seq, _, keep, acts) in &all {
                let mut best: Option<(f32, usize)> = None;
                for p in 0..t {
                    let v = acts[p * d_sae + j];
                    if keep[p] && v != 0.0 {
                        fired += 1;
                        if best.is_none_or(|b| v > b.0) {
                            best = Some((v, p));
                        }
                    }
                }
                if let Some((v, p)) = best {
                    cands.push((v, *seq, p));
                }
            }
            cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            cands.truncate(settings.top_k);
            assert_eq!(l.fired, fired, "latent {j}");
            assert_eq!(l.top.len(), cands.len(), "latent {j}");
            for (x, &(v, seq, p)) in l.top.iter().zip(&cands) {
                assert_eq!(
                    (x.activation, x.seq, x.pos as usize),
                    (v, seq, p),
                    "latent {j}"
                );
                let (_, ids, keep, acts) = &all[seq as usize];
                let start = p.saturating_sub(2);
                let end = (p + 2).min(t);
                assert_eq!(x.start as usize, start);
                assert_eq!(x.tokens, ids[start..end]);
                let want: Vec<f32> = (start..end)
                    .map(|q| if keep[q] { acts[q * d_sae + j] } else { 0.0 })
                    .collect();
                assert_eq!(x.acts, want);
            }
            let max = cands.first().map_or(0.0, |c| c.0);
            assert_eq!(l.max, max);
        }
    }

    #[test]
    fn page_and_json_say_what_they_hold() {
        let mut c = Collector::new(
            &[0, 2],
            Settings {
                top_k: 2,
                before: 1,
                after: 1,
            },
        );
        // 1 sequence of 3 tokens; latent 0 fires at position 1, latent 2 never
        c.add(
            0,
            3,
            &[5, 6, 7],
            &[true; 3],
            &[0.0, 0.0, 0.0, 1.5, 0.0, 0.0, 0.5, 0.0, 0.0],
            3,
        );
        c.latents[0].promoted = vec![(6, 2.0)];
        c.latents[0].suppressed = vec![(7, -1.0)];
        let info = PageInfo {
            meta: json!({"sae": "s<1>", "hook_name": "h", "model": "m"}),
            logits_note: None,
        };
        let dec = |t: u32| format!("t{t}\n");
        let html = render_html(&c, &info, &dec);
        assert!(html.contains("Feature browser: s&lt;1&gt;"));
        assert!(html.contains("id=\"l-0\""));
        assert!(!html.contains("id=\"l-2\""));
        assert!(html.contains("never fired (1): 2"));
        assert!(html.contains("<span class=\"max\" style=\"--a:1.00\" title=\"1.500\">t6↵</span>"));
        assert_eq!(html.matches("data-kind=\"bars\"").count(), 1);
        let j = to_json(&c, &info, &dec);
        assert_eq!(j["latents"][0]["density"], json!(2.0 / 3.0));
        assert_eq!(
            j["latents"][0]["top_contexts"][0]["token_strs"],
            json!(["t5\n", "t6\n", "t7\n"])
        );
        assert_eq!(j["latents"][1]["fired"], json!(0));
        assert_eq!(j["latents"][0]["promoted"][0]["str"], json!("t6\n"));
    }
}
