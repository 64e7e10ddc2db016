//! Several upstreams of one schema as one stream: batches taken round-robin in upstream
//! order (an upstream that has ended is passed over), never in arrival order, so the
//! result does not depend on timing. Each upstream reads ahead into its own bounded
//! queue, so waiting on one does not stall the others' transport.

use crate::stream::{open_source, BatchSource, OpenOptions, StreamError};
use arrow_array::RecordBatch;
use arrow_schema::{Schema, SchemaRef};

pub struct Merge {
    ups: Vec<Box<dyn BatchSource>>,
    ended: Vec<bool>,
    /// The upstream the next batch comes from.
    next: usize,
    position: u64,
}

/// Where upstream `i` of `n` starts for the merged stream to start at `position`
/// (the count of positions before it that are `i` mod `n`; exact while no upstream has
/// ended before `position`).
pub fn upstream_start(position: u64, i: usize, n: usize) -> u64 {
    (position + (n - 1 - i) as u64) / n as u64
}

/// The first difference between two schemas, in words; `None` when equal.
pub fn schema_difference(a: &Schema, b: &Schema) -> Option<String> {
    if a.fields().len() != b.fields().len() {
        let names = |s: &Schema| {
            s.fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Some(format!("columns [{}] vs [{}]", names(a), names(b)));
    }
    for (x, y) in a.fields().iter().zip(b.fields()) {
        if x != y {
            return Some(format!(
                "column '{}' {} vs column '{}' {}",
                x.name(),
                x.data_type(),
                y.name(),
                y.data_type()
            ));
        }
    }
    let mut keys: Vec<&String> = a.metadata().keys().chain(b.metadata().keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        let (x, y) = (a.metadata().get(k), b.metadata().get(k));
        if x != y {
            return Some(format!("metadata '{k}': {x:?} vs {y:?}"));
        }
    }
    None
}

impl Merge {
    /// Opens every upstream at its share of `opts.position` and checks that all have
    /// the first one's schema and metadata.
    pub fn open(specs: &[String], opts: &OpenOptions) -> Result<Merge, StreamError> {
        let n = specs.len();
        let mut ups = Vec::with_capacity(n);
        for (i, spec) in specs.iter().enumerate() {
            let o = OpenOptions {
                position: upstream_start(opts.position, i, n),
                ..opts.clone()
            };
            ups.push(open_source(spec, &o)?);
        }
        Merge::new(ups, opts.position)
    }

    /// Merges sources already opened at their shares of `position`.
    pub fn new(ups: Vec<Box<dyn BatchSource>>, position: u64) -> Result<Merge, StreamError> {
        if ups.is_empty() {
            return Err(StreamError::Other(
                "a merge needs at least one upstream".into(),
            ));
        }
        let first = ups[0].schema();
        for u in &ups[1..] {
            if let Some(d) = schema_difference(&first, &u.schema()) {
                return Err(StreamError::Other(format!(
                    "cannot merge {} and {}: their schemas differ ({d})",
                    ups[0].describe(),
                    u.describe()
                )));
            }
        }
        let n = ups.len();
        Ok(Merge {
            ended: vec![false; n],
            next: (position % n as u64) as usize,
            ups,
            position,
        })
    }

    /// Each upstream's position (to record for a resume).
    pub fn upstream_positions(&self) -> Vec<u64> {
        self.ups.iter().map(|u| u.position()).collect()
    }
}

impl BatchSource for Merge {
    fn schema(&self) -> SchemaRef {
        self.ups[0].schema()
    }
    fn position(&self) -> u64 {
        self.position
    }
    fn next_batch(&mut self) -> Result<Option<RecordBatch>, StreamError> {
        let n = self.ups.len();
        for _ in 0..n {
            let i = self.next;
            self.next = (self.next + 1) % n;
            if self.ended[i] {
                continue;
            }
            match self.ups[i].next_batch()? {
                Some(b) => {
                    self.position += 1;
                    return Ok(Some(b));
                }
                None => self.ended[i] = true,
            }
        }
        Ok(None)
    }
    fn describe(&self) -> String {
        let names: Vec<String> = self.ups.iter().map(|u| u.describe()).collect();
        format!("merge of {}", names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::Synthetic;

    fn src(seed: u64, batches: u64, at: u64) -> Box<dyn BatchSource> {
        Box::new(
            Synthetic::open(
                &format!("tokens?batches={batches}&rows=2&context=3&seed={seed}"),
                at,
            )
            .unwrap(),
        )
    }

    #[test]
    fn round_robin_in_upstream_order_and_resumable() {
        let all = |mut m: Merge| {
            let mut v = vec![];
            while let Some(b) = m.next_batch().unwrap() {
                v.push(b);
            }
            v
        };
        // upstream lengths 4, 4, 3: the last round passes over the short one
        let m = Merge::new(vec![src(1, 4, 0), src(2, 4, 0), src(3, 3, 0)], 0).unwrap();
        let got = all(m);
        let mut want = vec![];
        let mut singles: Vec<Box<dyn BatchSource>> = vec![src(1, 4, 0), src(2, 4, 0), src(3, 3, 0)];
        for _ in 0..4 {
            for s in singles.iter_mut() {
                if let Some(b) = s.next_batch().unwrap() {
                    want.push(b);
                }
            }
        }
        assert_eq!(got.len(), 11);
        assert_eq!(got, want);
        // starting at position 7 = reading from 0 and dropping 7
        let starts: Vec<u64> = (0..3).map(|i| upstream_start(7, i, 3)).collect();
        assert_eq!(starts, [3, 2, 2]);
        let m = Merge::new(
            vec![
                src(1, 4, starts[0]),
                src(2, 4, starts[1]),
                src(3, 3, starts[2]),
            ],
            7,
        )
        .unwrap();
        assert_eq!(all(m), want[7..]);
    }

    #[test]
    fn schema_mismatch_names_both() {
        let a: Box<dyn BatchSource> = src(1, 2, 0);
        let b: Box<dyn BatchSource> =
            Box::new(Synthetic::open("tokens?batches=2&rows=2&context=4", 0).unwrap());
        let e = Merge::new(vec![a, b], 0).err().unwrap().to_string();
        assert!(
            e.contains("synthetic:tokens?batches=2&rows=2&context=3&seed=1")
                && e.contains("context=4")
                && e.contains("input_ids"),
            "{e}"
        );
    }
}
