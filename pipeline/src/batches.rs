//! Training batches from a row source: in file order, or mixed by SAELens's mixing
//! buffer with a seeded permutation. Deterministic for a given source and seed, so a
//! resumed run can skip the batches it already trained on and continue identically.

use crate::mixer::MixPlan;
use crate::source::RowSource;
use crate::stream::SourceError;

pub struct Batches {
    source: Box<dyn RowSource>,
    d: usize,
    batch: usize,
    plan: MixPlan,
    /// Rows not yet served (row-major), and each one's index in the source.
    storage: Vec<f32>,
    origin: Vec<u64>,
    /// Rows read from the source so far.
    read: u64,
    /// Batches ready to serve, in order, with their rows' source indices.
    ready: std::collections::VecDeque<(Vec<f32>, Vec<u64>)>,
    /// The source indices of the last batch served.
    last: Vec<u64>,
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
            plan: MixPlan::new(
                batch,
                shuffle.then_some(buffer_batches.max(1) * batch),
                seed,
            ),
            storage: Vec::new(),
            origin: Vec::new(),
            read: 0,
            ready: Default::default(),
            last: Vec::new(),
            exhausted: false,
            served: 0,
        }
    }

    pub fn d_in(&self) -> usize {
        self.d
    }

    pub fn describe(&self) -> String {
        self.source.describe()
    }

    /// Tokens per sequence, where the source records it (a SAELens cache).
    pub fn context_size(&self) -> Option<i64> {
        self.source.context_size()
    }

    /// The next `[batch, d_in]` batch, or `None` when the source has run out (a final
    /// partial batch is dropped, as SAELens does).
    pub fn next_batch(&mut self) -> Result<Option<Vec<f32>>, SourceError> {
        while self.ready.is_empty() && !self.exhausted {
            match self.source.next_chunk()? {
                Some(rows) => {
                    let n = (rows.len() / self.d.max(1)) as u64;
                    self.origin.extend(self.read..self.read + n);
                    self.read += n;
                    self.storage.extend_from_slice(&rows);
                    self.serve(false);
                }
                None => {
                    self.exhausted = true;
                    self.serve(true);
                }
            }
        }
        let Some((b, origin)) = self.ready.pop_front() else {
            return Ok(None);
        };
        self.served += 1;
        self.last = origin;
        Ok(Some(b))
    }

    /// Where the rows of the last batch served are in the source (row indices counted
    /// from 0 across its files), so a bad value can be named where it is stored.
    pub fn last_rows(&self) -> &[u64] {
        &self.last
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

    /// Moves whole batches from `storage` to `ready`, as [`MixPlan`] says.
    fn serve(&mut self, at_end: bool) {
        let rows = self.storage.len() / self.d;
        let (order, take_rows) = self.plan.plan(rows, at_end);
        if let Some(order) = order {
            let mut shuffled = Vec::with_capacity(self.storage.len());
            for &r in &order {
                let r = r as usize;
                shuffled.extend_from_slice(&self.storage[r * self.d..(r + 1) * self.d]);
            }
            self.storage = shuffled;
            self.origin = order.iter().map(|&r| self.origin[r as usize]).collect();
        }
        if take_rows == 0 {
            return;
        }
        let rest = self.storage.split_off(take_rows * self.d);
        let rest_origin = self.origin.split_off(take_rows);
        for (b, o) in self
            .storage
            .chunks(self.batch * self.d)
            .zip(self.origin.chunks(self.batch))
        {
            self.ready.push_back((b.to_vec(), o.to_vec()));
        }
        self.storage = rest;
        self.origin = rest_origin;
    }
}
