//! Packing tokenized documents into `context_size` windows exactly as SAELens 6's
//! `concat_and_batch_sequences` does (and `PretokenizeRunner` around it).
//!
//! Concatenating mode: a window starts with `begin_batch_token` (unless the document's
//! first token already is it); each document starts with `begin_sequence_token` (same
//! rule); between documents inside a window `sequence_separator_token` is inserted
//! (same rule). Prefix tokens count toward the window; a document runs on into the next
//! window; the trailing partial window is dropped. With `disable_concat_sequences` each
//! document gives at most one window (its first `context_size` tokens, with the begin
//! token in front), and shorter documents are skipped.

/// Token ids that SAELens may insert, already resolved from `bos`/`eos`/`sep`/an id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackOptions {
    pub context_size: usize,
    pub begin_batch_token: Option<u32>,
    pub begin_sequence_token: Option<u32>,
    pub sequence_separator_token: Option<u32>,
    pub disable_concat_sequences: bool,
}

impl PackOptions {
    /// Settings SAELens cannot pack with: a zero context, or (concatenating) a
    /// one-token context that the begin-batch token fills, which never advances through
    /// a document (SAELens loops forever there).
    pub fn check(&self) -> Result<(), String> {
        if self.context_size == 0 {
            return Err("context_size must be positive".into());
        }
        if self.context_size == 1
            && self.begin_batch_token.is_some()
            && !self.disable_concat_sequences
        {
            return Err("context_size 1 leaves no room for document tokens after the begin-batch token; use a larger context or no begin-batch token".into());
        }
        Ok(())
    }
}

/// Packs a stream of documents; windows come out as they fill.
#[derive(Clone, Debug)]
pub struct Packer {
    opts: PackOptions,
    window: Option<Vec<u32>>,
}

impl Packer {
    /// Panics on settings [`PackOptions::check`] refuses (callers check user input first).
    pub fn new(opts: PackOptions) -> Packer {
        if let Err(e) = opts.check() {
            panic!("{e}");
        }
        Packer { opts, window: None }
    }

    /// Adds one document; every window it completes is appended to `out`.
    pub fn push(&mut self, doc: &[u32], out: &mut Vec<Vec<u32>>) {
        if self.opts.disable_concat_sequences {
            self.push_alone(doc, out);
        } else {
            self.push_concat(doc, out);
        }
    }

    /// Drops the partial window (SAELens does at the end of each `map` batch).
    pub fn reset(&mut self) {
        self.window = None;
    }

    fn push_alone(&self, doc: &[u32], out: &mut Vec<Vec<u32>>) {
        let ctx = self.opts.context_size;
        // The begin-batch token stands in for a missing begin-sequence token here.
        let begin = self
            .opts
            .begin_sequence_token
            .or(self.opts.begin_batch_token);
        if doc.is_empty() {
            return;
        }
        let mut seq: Vec<u32> = doc.to_vec();
        if let Some(b) = begin {
            if doc.len() + 1 >= ctx && doc[0] != b {
                seq = std::iter::once(b)
                    .chain(doc[..ctx - 1].iter().copied())
                    .collect();
            }
        }
        if seq.len() >= ctx {
            out.push(seq[..ctx].to_vec());
        }
    }

    fn push_concat(&mut self, doc: &[u32], out: &mut Vec<Vec<u32>>) {
        let ctx = self.opts.context_size;
        let mut offset = 0;
        let mut start_of_doc = true;
        while offset < doc.len() {
            let mut prefix: Vec<u32> = Vec::new();
            let mut start_pending = false;
            let mut first = doc[offset];
            if start_of_doc {
                if let Some(b) = self.opts.begin_sequence_token {
                    if first != b {
                        prefix.insert(0, b);
                        start_pending = true;
                        first = b;
                    }
                }
            }
            match self.window.as_mut() {
                None => {
                    if let Some(b) = self.opts.begin_batch_token {
                        if first != b {
                            prefix.insert(0, b);
                        }
                    }
                    let needed = ctx.saturating_sub(prefix.len());
                    let mut w: Vec<u32> = prefix[..prefix.len().min(ctx)].to_vec();
                    w.extend_from_slice(&doc[offset..(offset + needed).min(doc.len())]);
                    offset += needed;
                    start_of_doc = start_pending && prefix.len() > ctx;
                    self.window = Some(w);
                }
                Some(w) => {
                    if let Some(s) = self.opts.sequence_separator_token {
                        if first != s {
                            prefix.insert(0, s);
                        }
                    }
                    let needed = ctx.saturating_sub(w.len() + prefix.len());
                    let prefix_fits = ctx.saturating_sub(w.len());
                    w.extend_from_slice(&prefix[..prefix.len().min(prefix_fits)]);
                    w.extend_from_slice(&doc[offset..(offset + needed).min(doc.len())]);
                    offset += needed;
                    start_of_doc = start_pending && prefix.len() > prefix_fits;
                }
            }
            if self.window.as_ref().is_some_and(|w| w.len() == ctx) {
                out.push(self.window.take().unwrap());
            }
        }
    }
}

/// SAELens's `PretokenizeRunner`: documents are packed in groups of `group_size`
/// (`pretokenize_batch_size`, 1000 by default), each group starting a fresh window and
/// dropping its own partial last window.
pub fn pack_documents<'a>(
    docs: impl IntoIterator<Item = &'a [u32]>,
    opts: PackOptions,
    group_size: usize,
) -> Vec<Vec<u32>> {
    let mut packer = Packer::new(opts);
    let mut out = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        if group_size > 0 && i > 0 && i % group_size == 0 {
            packer.reset();
        }
        packer.push(doc, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOS: u32 = 100;
    const SEP: u32 = 101;

    fn opts(ctx: usize, bb: Option<u32>, bs: Option<u32>, sep: Option<u32>) -> PackOptions {
        PackOptions {
            context_size: ctx,
            begin_batch_token: bb,
            begin_sequence_token: bs,
            sequence_separator_token: sep,
            disable_concat_sequences: false,
        }
    }

    fn pack(docs: &[&[u32]], o: PackOptions) -> Vec<Vec<u32>> {
        pack_documents(docs.iter().copied(), o, 0)
    }

    // Every expected window below is what SAELens 6.54.12's own
    // `concat_and_batch_sequences` returns for the same input (checked by running it).

    #[test]
    fn saelens_default_bos_then_separators() {
        let o = opts(5, Some(BOS), None, Some(BOS));
        let w = pack(&[&[1, 2, 3], &[4, 5, 6, 7, 8, 9], &[10]], o);
        // [BOS 1 2 3 | BOS] [BOS 4 5 6 7] then 8 9 run on: [BOS 8 9 | BOS 10] ...
        assert_eq!(
            w,
            vec![
                vec![BOS, 1, 2, 3, BOS],
                vec![BOS, 4, 5, 6, 7],
                vec![BOS, 8, 9, BOS, 10]
            ]
        );
    }

    #[test]
    fn a_document_starting_with_the_token_gets_no_second_copy() {
        let o = opts(4, Some(BOS), None, Some(BOS));
        let w = pack(&[&[BOS, 1, 2, 3], &[BOS, 4, 5]], o);
        assert_eq!(w, vec![vec![BOS, 1, 2, 3]]);
        // [BOS 4 5] is the trailing partial window: dropped.
    }

    #[test]
    fn begin_sequence_token_and_separator_together() {
        let o = opts(6, Some(BOS), Some(SEP), Some(BOS));
        let w = pack(&[&[1, 2], &[3, 4, 5, 6]], o);
        // window 1: BOS SEP 1 2, then separator BOS + SEP 3 4 ... fills to 6:
        // [BOS SEP 1 2 BOS SEP] and 3 4 5 6 continue (no new SEP: not the document start).
        assert_eq!(w, vec![vec![BOS, SEP, 1, 2, BOS, SEP]]);
        let w = pack(&[&[1, 2], &[3, 4, 5, 6], &[7, 8, 9, 10, 11, 12]], o);
        assert_eq!(w[1], vec![BOS, 3, 4, 5, 6, BOS]);
    }

    #[test]
    fn prefix_that_does_not_fit_starts_the_document_in_the_next_window() {
        // Window has one slot left: the separator fits, the begin-sequence token does not,
        // so the document starts again (with its SEP) in the next window.
        let o = opts(4, None, Some(SEP), Some(BOS));
        let w = pack(&[&[1, 2], &[3, 4, 5]], o);
        assert_eq!(w, vec![vec![SEP, 1, 2, BOS], vec![SEP, 3, 4, 5]]);
    }

    #[test]
    fn no_special_tokens_is_plain_concatenation() {
        let o = opts(3, None, None, None);
        let w = pack(&[&[1, 2], &[3, 4, 5, 6], &[7, 8]], o);
        assert_eq!(w, vec![vec![1, 2, 3], vec![4, 5, 6]]);
    }

    #[test]
    fn disable_concat_keeps_one_window_per_long_document() {
        let mut o = opts(4, Some(BOS), None, Some(BOS));
        o.disable_concat_sequences = true;
        let w = pack(
            &[
                &[1, 2],
                &[3, 4, 5],
                &[BOS, 6, 7, 8, 9],
                &[10, 11, 12, 13, 14],
            ],
            o,
        );
        // [1 2] is too short; [3 4 5] gets BOS (len + 1 >= 4); the BOS document is cut.
        assert_eq!(
            w,
            vec![
                vec![BOS, 3, 4, 5],
                vec![BOS, 6, 7, 8],
                vec![BOS, 10, 11, 12]
            ]
        );
        o.begin_batch_token = None;
        let w = pack(&[&[3, 4, 5], &[10, 11, 12, 13, 14]], o);
        assert_eq!(w, vec![vec![10, 11, 12, 13]]);
    }

    #[test]
    fn groups_restart_the_window() {
        let o = opts(3, Some(BOS), None, Some(BOS));
        let docs: Vec<&[u32]> = vec![&[1], &[2], &[3], &[4]];
        // One group: BOS 1 BOS | 2 ... → [BOS 1 BOS] [BOS 2 BOS] [BOS 3 BOS] ...
        assert_eq!(pack_documents(docs.clone(), o, 0).len(), 3);
        // Groups of 2: [BOS 1 BOS] + partial [BOS 2] dropped; same for the second group.
        assert_eq!(
            pack_documents(docs, o, 2),
            vec![vec![BOS, 1, BOS], vec![BOS, 3, BOS]]
        );
    }
}
