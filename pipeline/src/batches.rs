//! Training batches from a row source: in file order, or mixed by SAELens's mixing
//! buffer with a seeded permutation. Deterministic for a given source and seed, so a
//! resumed run can skip the batches it already trained on and continue identically.

use crate::source::RowSource;
use crate::stream::SourceError;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Fraction of the buffer kept back for mixing with new rows (SAELens's default).
const MIX_FRACTION: f64 = 0.5;

pub struct Batches {
    source: Box<dyn RowSource>,
    d: usize,
    batch: usize,
    /// Buffer size in rows, and its RNG; `None` keeps file order.
    mixing: Option<(usize, ChaCha8Rng)>,
    /// Rows not yet served (row-major).
    storage: Vec<f32>,
    /// Batches ready to serve, in order.
    ready: std::collections::VecDeque<Vec<f32>>,
    exhausted: bool,
    /// Batches served so far.
    pub served: u64,
}

impl Batches {
    /// `buffer_batches` batches are pooled and shuffled when `shuffle` (SAELens's
    /// `n_batches_in_buffer`).
    pub fn new(
        source: Box<dyn RowSource>,
        batch: usize,
        shuffle: bool,
        buffer_batches: usize,
        seed: u64,
    ) -> Batches {
        let d = source.d_in();
        Batches {
            source,
            d,
            batch,
            mixing: shuffle.then(|| {
                (
                    buffer_batches.max(1) * batch,
                    ChaCha8Rng::seed_from_u64(seed),
                )
            }),
            storage: Vec::new(),
            ready: Default::default(),
            exhausted: false,
            served: 0,
        }
    }

    pub fn d_in(&self) -> usize {
        self.d
    }

    /// The next `[batch, d_in]` batch, or `None` when the source has run out (a final
    /// partial batch is dropped, as SAELens does).
    pub fn next_batch(&mut self) -> Result<Option<Vec<f32>>, SourceError> {
        while self.ready.is_empty() && !self.exhausted {
            match self.source.next_chunk()? {
                Some(rows) => {
                    self.storage.extend_from_slice(&rows);
                    self.serve(false);
                }
                None => {
                    self.exhausted = true;
                    self.serve(true);
                }
            }
        }
        let b = self.ready.pop_front();
        if b.is_some() {
            self.served += 1;
        }
        Ok(b)
    }

    /// Skips `n` batches (to resume a run where it stopped).
    pub fn skip(&mut self, n: u64) -> Result<(), SourceError> {
        for _ in 0..n {
            if self.next_batch()?.is_none() {
                break;
            }
        }
        Ok(())
    }

    /// Moves whole batches from `storage` to `ready`: without mixing, every full batch;
    /// with mixing, once the buffer is full, a shuffle then all but the kept-back half.
    fn serve(&mut self, at_end: bool) {
        let rows = self.storage.len() / self.d;
        let take_rows = match &mut self.mixing {
            None => rows / self.batch * self.batch,
            Some((size, rng)) => {
                if at_end {
                    rows / self.batch * self.batch
                } else if rows >= *size {
                    let mut order: Vec<u32> = (0..rows as u32).collect();
                    order.shuffle(rng);
                    let mut shuffled = Vec::with_capacity(self.storage.len());
                    for &r in &order {
                        let r = r as usize;
                        shuffled.extend_from_slice(&self.storage[r * self.d..(r + 1) * self.d]);
                    }
                    self.storage = shuffled;
                    let keep = (*size as f64 * MIX_FRACTION) as usize;
                    ((rows - keep) / self.batch).max(1) * self.batch
                } else {
                    0
                }
            }
        };
        if take_rows == 0 {
            return;
        }
        let rest = self.storage.split_off(take_rows * self.d);
        for b in self.storage.chunks(self.batch * self.d) {
            self.ready.push_back(b.to_vec());
        }
        self.storage = rest;
    }
}
