//! SAELens's `compute_geometric_median` (Weiszfeld iterations), used to initialise
//! `b_dec` with `b_dec_init_method: geometric_median`.

/// Result of [`geometric_median`].
#[derive(Clone, Debug)]
pub struct GeometricMedian {
    pub median: Vec<f32>,
    pub iterations: usize,
    /// True when the objective stopped improving by more than `ftol` (relative).
    pub converged: bool,
}

/// The geometric median of `points` (`[n, d]` row-major), with SAELens's defaults:
/// start at the mean, reweight by `1 / max(distance, eps)`, stop after `maxiter`
/// iterations or when the objective improves by at most `ftol` times its value.
pub fn geometric_median(
    points: &[f32],
    d: usize,
    eps: f64,
    maxiter: usize,
    ftol: f64,
) -> GeometricMedian {
    let n = points.len() / d;
    assert!(
        n > 0 && points.len() == n * d,
        "geometric_median: need [n, {d}] points"
    );
    let rows = || points.chunks(d);
    let weighted_average = |w: &[f64]| {
        let total: f64 = w.iter().sum();
        let mut m = vec![0f64; d];
        for (row, &wi) in rows().zip(w) {
            m.iter_mut()
                .zip(row)
                .for_each(|(m, &x)| *m += x as f64 * wi / total);
        }
        m
    };
    let dist = |m: &[f64], row: &[f32]| {
        row.iter()
            .zip(m)
            .map(|(&x, m)| (x as f64 - m).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let objective = |m: &[f64]| rows().map(|r| dist(m, r)).sum::<f64>();
    let mut median = weighted_average(&vec![1.0; n]);
    let mut obj = objective(&median);
    let mut iterations = 0;
    let mut converged = false;
    for _ in 0..maxiter {
        iterations += 1;
        let w: Vec<f64> = rows().map(|r| 1.0 / dist(&median, r).max(eps)).collect();
        median = weighted_average(&w);
        let prev = obj;
        obj = objective(&median);
        if (prev - obj).abs() <= ftol * obj {
            converged = true;
            break;
        }
    }
    GeometricMedian {
        median: median.into_iter().map(|v| v as f32).collect(),
        iterations,
        converged,
    }
}

/// SAELens's defaults: `eps = 1e-6`, `maxiter = 100`, `ftol = 1e-20`.
pub fn geometric_median_default(points: &[f32], d: usize) -> GeometricMedian {
    geometric_median(points, d, 1e-6, 100, 1e-20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collinear_points_give_the_ordinary_median() {
        // On a line the geometric median is the median: 2.0 here, not the mean 21.2.
        let pts = [0.0f32, 0.0, 1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 100.0, 0.0];
        let g = geometric_median_default(&pts, 2);
        assert!(
            (g.median[0] - 2.0).abs() < 1e-3 && g.median[1].abs() < 1e-6,
            "{:?}",
            g.median
        );
    }

    #[test]
    fn symmetric_points_give_their_centre_and_the_median_minimises_distance() {
        let pts = [1.0f32, 1.0, -1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 0.5, 0.5];
        let g = geometric_median_default(&pts, 2);
        let obj = |m: &[f32]| {
            pts.chunks(2)
                .map(|p| ((p[0] - m[0]).powi(2) + (p[1] - m[1]).powi(2)).sqrt())
                .sum::<f32>()
        };
        let best = obj(&g.median);
        for (dx, dy) in [(1e-2, 0.0), (-1e-2, 0.0), (0.0, 1e-2), (0.0, -1e-2)] {
            assert!(obj(&[g.median[0] + dx, g.median[1] + dy]) > best);
        }
    }
}
