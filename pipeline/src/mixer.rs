//! SAELens's mixing buffer, in two forms that make the same choices: [`MixPlan`]
//! decides when to shuffle, with which permutation, and how many rows to hand out;
//! [`crate::Batches`] applies it to f32 rows (the trainer reading files) and [`Mixer`] to
//! whole record batches (the shuffler stage: one permutation for every column). So the
//! shuffler's stream equals what the trainer makes of the same rows, bit for bit.

use crate::stream::{batch_bytes, StreamError};
use arrow_array::{RecordBatch, UInt32Array};
use arrow_schema::SchemaRef;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::VecDeque;

/// Fraction of the buffer kept back for mixing with new rows (SAELens's default).
pub const MIX_FRACTION: f64 = 0.5;

/// When and how the buffer is mixed.
pub struct MixPlan {
    batch: usize,
    /// Buffer size in rows and its RNG; `None` keeps stream order.
    mixing: Option<(usize, ChaCha8Rng)>,
    seed: u64,
}

impl MixPlan {
    /// `buffer_rows`: `None` keeps stream order.
    pub fn new(batch: usize, buffer_rows: Option<usize>, seed: u64) -> MixPlan {
        MixPlan {
            batch,
            mixing: buffer_rows.map(|n| (n, ChaCha8Rng::seed_from_u64(seed))),
            seed,
        }
    }

    /// With `rows` stored: the permutation to apply first (if any) and how many rows,
    /// from the front, to hand out as whole batches. Without mixing, every whole batch;
    /// with mixing, once the buffer is full, a shuffle and all but the kept-back half;
    /// at the end, every whole batch left (a final partial batch is dropped, as SAELens
    /// does).
    pub fn plan(&mut self, rows: usize, at_end: bool) -> (Option<Vec<u32>>, usize) {
        let whole = rows / self.batch * self.batch;
        match &mut self.mixing {
            None => (None, whole),
            Some(_) if at_end => (None, whole),
            Some((size, rng)) if rows >= *size => {
                let mut order: Vec<u32> = (0..rows as u32).collect();
                order.shuffle(rng);
                let keep = (*size as f64 * MIX_FRACTION) as usize;
                (
                    Some(order),
                    ((rows - keep) / self.batch).max(1) * self.batch,
                )
            }
            Some(_) => (None, 0),
        }
    }

    /// The RNG's position (for snapshots); 0 without mixing.
    pub fn rng_word_pos(&self) -> u128 {
        self.mixing.as_ref().map_or(0, |(_, r)| r.get_word_pos())
    }

    /// Puts the RNG where a snapshot left it.
    pub fn set_rng_word_pos(&mut self, pos: u128) {
        if let Some((_, r)) = &mut self.mixing {
            *r = ChaCha8Rng::seed_from_u64(self.seed);
            r.set_word_pos(pos);
        }
    }
}

/// The mixing buffer over record batches: every column permuted alike.
pub struct Mixer {
    schema: SchemaRef,
    batch: usize,
    plan: MixPlan,
    /// Rows not yet handed out, as received (or as left by the last shuffle).
    storage: Vec<RecordBatch>,
    rows: usize,
    ready: VecDeque<RecordBatch>,
    bytes: usize,
    /// The most bytes held at once (storage + ready batches).
    pub peak_bytes: usize,
}

impl Mixer {
    pub fn new(schema: SchemaRef, batch: usize, buffer_rows: Option<usize>, seed: u64) -> Mixer {
        Mixer {
            schema,
            batch,
            plan: MixPlan::new(batch, buffer_rows, seed),
            storage: Vec::new(),
            rows: 0,
            ready: VecDeque::new(),
            bytes: 0,
            peak_bytes: 0,
        }
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Adds an upstream batch and mixes if the buffer is full.
    pub fn push(&mut self, b: RecordBatch) -> Result<(), StreamError> {
        self.rows += b.num_rows();
        self.bytes += batch_bytes(&b);
        self.storage.push(b);
        self.peak_bytes = self.peak_bytes.max(self.bytes);
        self.serve(false)
    }

    /// The upstream has ended: hands out every whole batch left.
    pub fn end(&mut self) -> Result<(), StreamError> {
        self.serve(true)
    }

    /// The next batch of exactly `batch` rows, if one is ready.
    pub fn pop(&mut self) -> Option<RecordBatch> {
        let b = self.ready.pop_front()?;
        self.bytes -= batch_bytes(&b);
        Some(b)
    }

    fn serve(&mut self, at_end: bool) -> Result<(), StreamError> {
        let (order, take) = self.plan.plan(self.rows, at_end);
        if take == 0 {
            return Ok(());
        }
        let err = |e: arrow_schema::ArrowError| StreamError::Other(format!("mixing buffer: {e}"));
        let all = arrow_select::concat::concat_batches(&self.schema, &self.storage).map_err(err)?;
        self.storage.clear();
        let order: Vec<u32> = order.unwrap_or_else(|| (0..self.rows as u32).collect());
        // Each piece gathered into its own buffers, so nothing keeps `all` alive.
        let gather = |idx: &[u32]| {
            arrow_select::take::take_record_batch(&all, &UInt32Array::from(idx.to_vec()))
                .map_err(err)
        };
        for chunk in order[..take].chunks(self.batch) {
            self.ready.push_back(gather(chunk)?);
        }
        if take < self.rows {
            self.storage.push(gather(&order[take..])?);
        }
        self.rows -= take;
        drop(all);
        self.bytes = self.storage.iter().map(batch_bytes).sum::<usize>()
            + self.ready.iter().map(batch_bytes).sum::<usize>();
        Ok(())
    }

    /// The RNG's position (for snapshots).
    pub fn rng_word_pos(&self) -> u128 {
        self.plan.rng_word_pos()
    }

    /// The state to snapshot: the rows stored (one batch), the batches ready, the RNG.
    pub fn snapshot(&self) -> Result<(Option<RecordBatch>, Vec<RecordBatch>, u128), StreamError> {
        let stored = if self.storage.is_empty() {
            None
        } else {
            Some(
                arrow_select::concat::concat_batches(&self.schema, &self.storage)
                    .map_err(|e| StreamError::Other(format!("mixing buffer: {e}")))?,
            )
        };
        Ok((
            stored,
            self.ready.iter().cloned().collect(),
            self.plan.rng_word_pos(),
        ))
    }

    /// Restores a [`Mixer::snapshot`].
    pub fn restore(&mut self, stored: Option<RecordBatch>, ready: Vec<RecordBatch>, rng: u128) {
        self.storage = stored.into_iter().collect();
        self.rows = self.storage.iter().map(|b| b.num_rows()).sum();
        self.ready = ready.into();
        self.plan.set_rng_word_pos(rng);
        self.bytes = self.storage.iter().map(batch_bytes).sum::<usize>()
            + self.ready.iter().map(batch_bytes).sum::<usize>();
        self.peak_bytes = self.peak_bytes.max(self.bytes);
    }
}

/// What a shuffler snapshot records besides its rows.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotState {
    pub format: String,
    /// The next output batch's position.
    pub output_position: u64,
    /// The next upstream batch's position (of the merged upstreams).
    pub upstream_position: u64,
    /// The upstreams, in merge order.
    pub upstreams: Vec<String>,
    pub seed: u64,
    pub batch_rows: usize,
    pub buffer_rows: Option<usize>,
    /// The RNG's word position (a u128, as text).
    pub rng_word_pos: String,
    /// Rows stored (the first batch of the buffer file when not 0).
    pub stored_rows: u64,
    /// Batches ready to be sent (the rest of the buffer file).
    pub ready_batches: u64,
}

/// Reads a snapshot directory's `state.json`.
pub fn read_snapshot_state(dir: &std::path::Path) -> Result<SnapshotState, StreamError> {
    use schemas::streams::{SNAPSHOT_FORMAT, SNAPSHOT_STATE_FILE};
    let bad = |m: String| crate::stream::file_err(dir, m);
    let text = std::fs::read_to_string(dir.join(SNAPSHOT_STATE_FILE)).map_err(|e| {
        bad(format!(
            "not a shuffler snapshot ({SNAPSHOT_STATE_FILE}: {e})"
        ))
    })?;
    let st: SnapshotState =
        serde_json::from_str(&text).map_err(|e| bad(format!("{SNAPSHOT_STATE_FILE}: {e}")))?;
    if st.format != SNAPSHOT_FORMAT {
        return Err(bad(format!(
            "format '{}', expected '{SNAPSHOT_FORMAT}'",
            st.format
        )));
    }
    Ok(st)
}

impl Mixer {
    /// Writes a snapshot directory (state + rows), complete or not at all.
    pub fn save_snapshot(
        &self,
        dir: &std::path::Path,
        output_position: u64,
        upstream_position: u64,
        upstreams: &[String],
    ) -> Result<(), StreamError> {
        use schemas::streams::{SNAPSHOT_BUFFER_FILE, SNAPSHOT_FORMAT, SNAPSHOT_STATE_FILE};
        let io = |e: std::io::Error| crate::stream::file_err(dir, e.to_string());
        let (stored, ready, rng) = self.snapshot()?;
        let staged = crate::staging::Staged::dir(dir).map_err(io)?;
        let file = std::fs::File::create(staged.tmp.join(SNAPSHOT_BUFFER_FILE)).map_err(io)?;
        let ipc = |e: arrow_schema::ArrowError| crate::stream::file_err(dir, e.to_string());
        let mut w = arrow_ipc::writer::FileWriter::try_new(file, &self.schema).map_err(ipc)?;
        for b in stored.iter().chain(&ready) {
            w.write(b).map_err(ipc)?;
        }
        w.into_inner().map_err(ipc)?.sync_all().map_err(io)?;
        let state = SnapshotState {
            format: SNAPSHOT_FORMAT.into(),
            output_position,
            upstream_position,
            upstreams: upstreams.to_vec(),
            seed: self.plan.seed,
            batch_rows: self.batch,
            buffer_rows: self.plan.mixing.as_ref().map(|(n, _)| *n),
            rng_word_pos: rng.to_string(),
            stored_rows: stored.as_ref().map_or(0, |b| b.num_rows() as u64),
            ready_batches: ready.len() as u64,
        };
        let json = serde_json::to_string_pretty(&state).expect("serialises");
        std::fs::write(staged.tmp.join(SNAPSHOT_STATE_FILE), json).map_err(io)?;
        staged.commit().map_err(io)
    }

    /// Reads a snapshot directory into this mixer (whose batch size, buffer and seed
    /// must be the snapshot's); returns its state.
    pub fn load_snapshot(&mut self, dir: &std::path::Path) -> Result<SnapshotState, StreamError> {
        use schemas::streams::SNAPSHOT_BUFFER_FILE;
        let bad = |m: String| crate::stream::file_err(dir, m);
        let st = read_snapshot_state(dir)?;
        let mine = (
            self.plan.seed,
            self.batch,
            self.plan.mixing.as_ref().map(|(n, _)| *n),
        );
        if (st.seed, st.batch_rows, st.buffer_rows) != mine {
            return Err(bad(format!(
                "the snapshot was taken with seed {}, batches of {} rows and a buffer of {:?} rows; this run has seed {}, {} and {:?}",
                st.seed, st.batch_rows, st.buffer_rows, mine.0, mine.1, mine.2
            )));
        }
        let rng: u128 = st
            .rng_word_pos
            .parse()
            .map_err(|_| bad("rng_word_pos is not a number".into()))?;
        let file = std::fs::File::open(dir.join(SNAPSHOT_BUFFER_FILE))
            .map_err(|e| bad(format!("{SNAPSHOT_BUFFER_FILE}: {e}")))?;
        let ipc = |e: arrow_schema::ArrowError| bad(format!("{SNAPSHOT_BUFFER_FILE}: {e}"));
        let r = arrow_ipc::reader::FileReader::try_new(file, None).map_err(ipc)?;
        if crate::merge::schema_difference(&r.schema(), &self.schema).is_some() {
            return Err(bad(
                "its rows have another schema than the upstream's".into()
            ));
        }
        let mut batches: Vec<RecordBatch> = r.collect::<Result<_, _>>().map_err(ipc)?;
        let stored = (st.stored_rows > 0).then(|| batches.remove(0));
        if batches.len() as u64 != st.ready_batches
            || stored.as_ref().map_or(0, |b| b.num_rows() as u64) != st.stored_rows
        {
            return Err(bad("its rows disagree with state.json".into()));
        }
        // Batches from the file carry its schema object; ours is the same.
        let fix = |b: RecordBatch| RecordBatch::try_new(self.schema.clone(), b.columns().to_vec());
        let stored = stored.map(fix).transpose().map_err(ipc)?;
        let ready = batches
            .into_iter()
            .map(fix)
            .collect::<Result<Vec<_>, _>>()
            .map_err(ipc)?;
        self.restore(stored, ready, rng);
        Ok(st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::RowSource;
    use crate::stream::OpenOptions;

    /// The record-batch mixer hands out the same rows in the same order as the f32
    /// `Batches` over the same stream (with and without mixing, with a partial end).
    #[test]
    fn mixer_equals_batches() {
        let spec = "synthetic:activations?batches=23&rows=37&d=5&hooks=2&seed=3";
        for (shuffle, bufs) in [(true, 4), (false, 1), (true, 1)] {
            let mut src = crate::open_source(spec, &OpenOptions::default()).unwrap();
            let mut m = Mixer::new(src.schema(), 16, shuffle.then_some(bufs * 16), 9);
            let mut got: Vec<Vec<f32>> = Vec::new();
            let col = |b: &RecordBatch| {
                let l = b
                    .column_by_name("blocks.1.hook_resid_pre")
                    .unwrap()
                    .as_any()
                    .downcast_ref::<arrow_array::FixedSizeListArray>()
                    .unwrap()
                    .clone();
                crate::source::rows_f32(std::path::Path::new("t"), &l, 5).unwrap()
            };
            while let Some(b) = src.next_batch().unwrap() {
                m.push(b).unwrap();
                while let Some(o) = m.pop() {
                    assert_eq!(o.num_rows(), 16);
                    got.push(col(&o));
                }
            }
            m.end().unwrap();
            while let Some(o) = m.pop() {
                got.push(col(&o));
            }
            let rows: Box<dyn RowSource> =
                crate::source::open(spec, Some("blocks.1.hook_resid_pre")).unwrap();
            let mut b = crate::Batches::new(rows, 16, shuffle, bufs, 9);
            let mut want = Vec::new();
            while let Some(x) = b.next_batch().unwrap() {
                want.push(x);
            }
            assert_eq!(got.len(), 23 * 37 / 16);
            assert_eq!(got, want, "shuffle {shuffle}, {bufs} batches");
        }
    }

    /// A snapshot taken mid-stream and restored into a fresh mixer continues with the
    /// identical batches.
    #[test]
    fn snapshot_restores_the_same_continuation() {
        let spec = "synthetic:activations?batches=30&rows=20&d=3&hooks=1&seed=1";
        let run = |stop_at: Option<u64>| {
            let mut src = crate::open_source(spec, &OpenOptions::default()).unwrap();
            let mut m = Mixer::new(src.schema(), 8, Some(64), 5);
            let mut out = Vec::new();
            while let Some(b) = src.next_batch().unwrap() {
                m.push(b).unwrap();
                while let Some(o) = m.pop() {
                    out.push(o);
                }
                if Some(src.position()) == stop_at {
                    let (s, r, rng) = m.snapshot().unwrap();
                    let mut fresh = Mixer::new(src.schema(), 8, Some(64), 5);
                    fresh.restore(s, r, rng);
                    m = fresh;
                }
            }
            m.end().unwrap();
            while let Some(o) = m.pop() {
                out.push(o);
            }
            out
        };
        assert_eq!(run(None), run(Some(11)));
    }
}
