//! The data behind the charts: Pareto sets, fixed and streaming histograms, top-n.

use serde::Serialize;

/// Which points of (L0, score) are Pareto-best: no other point has an L0 at most as
/// large and a score at least as high, one of them strictly. Points with a non-finite
/// coordinate are never best (and never dominate).
pub fn pareto_best(points: &[(f64, f64)]) -> Vec<bool> {
    let ok = |p: &(f64, f64)| p.0.is_finite() && p.1.is_finite();
    points
        .iter()
        .map(|p| {
            ok(p)
                && !points
                    .iter()
                    .any(|q| ok(q) && q.0 <= p.0 && q.1 >= p.1 && (q.0 < p.0 || q.1 > p.1))
        })
        .collect()
}

/// Counts in `bins` equal bins over `[lo, hi]`; values outside go to the end bins
/// (so that SAELens's log10(0 + 1e-10) = -10 of a dead latent is counted, not lost).
/// Non-finite values are skipped.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Histogram {
    pub lo: f64,
    pub hi: f64,
    pub counts: Vec<u64>,
}

impl Histogram {
    pub fn new(values: impl IntoIterator<Item = f64>, lo: f64, hi: f64, bins: usize) -> Self {
        assert!(hi > lo && bins > 0, "a histogram needs lo < hi and a bin");
        let mut counts = vec![0u64; bins];
        let w = (hi - lo) / bins as f64;
        for v in values.into_iter().filter(|v| v.is_finite()) {
            let i = ((v - lo) / w).floor().clamp(0.0, (bins - 1) as f64) as usize;
            counts[i] += 1;
        }
        Histogram { lo, hi, counts }
    }

    /// `(left edge, right edge, count)` of each bin.
    pub fn bins(&self) -> Vec<(f64, f64, u64)> {
        let w = (self.hi - self.lo) / self.counts.len() as f64;
        self.counts
            .iter()
            .enumerate()
            .map(|(i, &c)| (self.lo + i as f64 * w, self.lo + (i + 1) as f64 * w, c))
            .collect()
    }
}

/// Bins of a streaming histogram of positive values.
pub const STREAM_BINS: usize = 32;

/// A histogram of positive values whose range is not known in advance, in bounded
/// memory: [`STREAM_BINS`] bins of a power-of-two width from 0; a value past the last
/// bin doubles the width, merging bins in pairs. Because every edge stays a multiple of
/// the width (and dividing by a power of two is exact), the counts are exactly those a
/// histogram with the final width would have counted from the start.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StreamHistogram {
    /// 0 until the first value.
    pub bin_width: f32,
    pub counts: Vec<u64>,
}

impl StreamHistogram {
    pub fn add(&mut self, v: f32) {
        if !(v.is_finite() && v > 0.0) {
            return;
        }
        if self.bin_width == 0.0 {
            // The first value lands in the lower half.
            self.bin_width = 2f32.powi((v / (STREAM_BINS as f32 / 2.0)).log2().ceil() as i32);
            self.counts = vec![0; STREAM_BINS];
        }
        while v >= self.bin_width * STREAM_BINS as f32 {
            for i in 0..STREAM_BINS / 2 {
                self.counts[i] = self.counts[2 * i] + self.counts[2 * i + 1];
            }
            self.counts[STREAM_BINS / 2..]
                .iter_mut()
                .for_each(|c| *c = 0);
            self.bin_width *= 2.0;
        }
        self.counts[(v / self.bin_width) as usize] += 1;
    }
}

/// The `n` largest values with their indices, largest first (ties: lower index first).
/// Non-finite values are skipped.
pub fn top_n(values: &[f32], n: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..values.len())
        .filter(|&i| values[i].is_finite())
        .collect();
    let cmp = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    if idx.len() > n {
        idx.select_nth_unstable_by(n, cmp);
        idx.truncate(n);
    }
    idx.sort_by(cmp);
    idx.into_iter().map(|i| (i, values[i])).collect()
}

/// The `n` smallest values with their indices, smallest first (ties: lower index first).
pub fn bottom_n(values: &[f32], n: usize) -> Vec<(usize, f32)> {
    let neg: Vec<f32> = values.iter().map(|v| -v).collect();
    top_n(&neg, n).into_iter().map(|(i, v)| (i, -v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pareto set by a brute-force definition on random points, plus the edge cases.
    #[test]
    fn pareto_best_is_the_undominated_set() {
        let pts = [
            (10.0, 0.5),
            (20.0, 0.9),
            (15.0, 0.6),
            (15.0, 0.55), // dominated by (15, 0.6): same L0, lower score
            (25.0, 0.85), // dominated by (20, 0.9)
            (5.0, f64::NAN),
            (10.0, 0.5), // a duplicate dominates nothing and is not dominated
        ];
        assert_eq!(
            pareto_best(&pts),
            vec![true, true, true, false, false, false, true]
        );
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as f64 / (1u64 << 31) as f64
        };
        let pts: Vec<(f64, f64)> = (0..200).map(|_| (rnd() * 100.0, rnd())).collect();
        let best = pareto_best(&pts);
        // Sorted by L0, the best points are exactly the running maxima of the score.
        let mut order: Vec<usize> = (0..pts.len()).collect();
        order.sort_by(|&a, &b| pts[a].0.total_cmp(&pts[b].0));
        let mut max = f64::NEG_INFINITY;
        for i in order {
            assert_eq!(best[i], pts[i].1 > max, "point {i} {:?}", pts[i]);
            max = max.max(pts[i].1);
        }
    }

    #[test]
    fn density_histogram_bins_and_end_bins() {
        // log10 densities: two dead latents at -10, one at exactly 0, one below the range.
        let v = [-10.0, -10.0, -3.1, -3.0, -2.99, 0.0, -12.0, f64::NAN, -0.01];
        let h = Histogram::new(v, -10.0, 0.0, 40);
        assert_eq!(h.counts.iter().sum::<u64>(), 8);
        assert_eq!(h.counts[0], 3); // -10, -10 and the clamped -12
        assert_eq!(h.counts[39], 2); // 0 (the right edge) and -0.01
                                     // -3.1 is in [-3.25, -3.0); -3.0 and -2.99 in [-3.0, -2.75)
        assert_eq!(h.counts[27], 1);
        assert_eq!(h.counts[28], 2);
        let b = h.bins();
        assert_eq!(b[28].0, -3.0);
        assert_eq!(b[28].1, -2.75);
    }

    /// The streaming histogram equals a fixed one with its final width.
    #[test]
    fn stream_histogram_equals_a_histogram_with_its_final_width() {
        let mut seed = 3u64;
        let mut vals = Vec::new();
        for i in 0..5000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let u = (seed >> 40) as f32 / (1u64 << 24) as f32;
            // grows over time: the width must double several times
            vals.push(u * (1.0 + i as f32 / 50.0));
        }
        vals.extend([0.0, -1.0, f32::NAN]);
        let mut h = StreamHistogram::default();
        vals.iter().for_each(|&v| h.add(v));
        let w = h.bin_width;
        let max = vals
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .fold(0f32, f32::max);
        assert!(max < w * STREAM_BINS as f32 && max >= w * STREAM_BINS as f32 / 2.0);
        let mut brute = vec![0u64; STREAM_BINS];
        for &v in vals.iter().filter(|v| v.is_finite() && **v > 0.0) {
            brute[(v / w).floor() as usize] += 1;
        }
        assert_eq!(h.counts, brute);
        assert_eq!(h.counts.iter().sum::<u64>(), 5000);
    }

    #[test]
    fn top_and_bottom_n() {
        let v = [0.5, 2.0, f32::NAN, 2.0, -1.0, 7.0];
        assert_eq!(top_n(&v, 3), vec![(5, 7.0), (1, 2.0), (3, 2.0)]);
        assert_eq!(bottom_n(&v, 2), vec![(4, -1.0), (0, 0.5)]);
        assert_eq!(top_n(&v, 10).len(), 5);
    }
}
