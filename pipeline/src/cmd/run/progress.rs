//! The run's live display: per stage tokens/s and the fill of the queue it serves, the
//! bottleneck named, and per SAE its step, loss, L0 and explained variance. Redrawn in
//! place on a terminal; plain lines otherwise.

use super::procs::Stage;
use pipeline::flight::{self, ClientConfig};
use schemas::streams::StreamStatus;
use schemas::sweep::Sweep;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// A served queue counts as full from this fill on (its producer is held back).
const FULL: f64 = 0.5;

pub struct Display {
    tty: bool,
    /// Lines drawn last time (to redraw over them on a terminal).
    drawn: usize,
    /// Per stage: when and how many tokens it had made, for the rate.
    last: HashMap<String, (Instant, u64)>,
    client: ClientConfig,
    context_size: u64,
    /// How often each stage (or group of stages) was named the bottleneck.
    counts: BTreeMap<String, u64>,
}

/// One stage's line.
struct Row {
    name: String,
    tokens: u64,
    rate: Option<f64>,
    /// Fill of the queue it serves (0..1); None for trainers and stages that ended.
    fill: Option<f64>,
    running: bool,
}

impl Display {
    pub fn new(sweep: &Sweep) -> Display {
        let client = ClientConfig {
            connect_timeout: Duration::from_millis(300),
            ..Default::default()
        };
        Display {
            tty: std::io::stderr().is_terminal(),
            drawn: 0,
            last: HashMap::new(),
            client,
            context_size: sweep.stream().context_size as u64,
            counts: BTreeMap::new(),
        }
    }

    /// How often to draw: every second on a terminal, else every `every` seconds.
    pub fn interval(&self, every: f64) -> Duration {
        Duration::from_secs_f64(if self.tty { every.min(1.0) } else { every })
    }

    fn status(&self, url: &str) -> Option<StreamStatus> {
        let streams = flight::remote_streams(url, &self.client).ok()?;
        streams.into_iter().next()?.status
    }

    pub fn draw(&mut self, sweep: &Sweep, run_dir: &Path, stages: &[Stage], elapsed: Duration) {
        let now = Instant::now();
        let mut rows = Vec::new();
        for s in stages {
            let (tokens, fill) = match (&s.url, s.running()) {
                (Some(url), true) => match self.status(url) {
                    Some(st) => {
                        let tokens = if s.name == "tokenizer" {
                            st.rows * self.context_size
                        } else {
                            st.rows
                        };
                        // Ended but not yet read by everyone: waiting on its consumers.
                        let waiting = st.finished && st.consumers.iter().any(|c| !c.done);
                        let fill = if waiting {
                            1.0
                        } else {
                            st.window_bytes as f64 / st.window_limit_bytes.max(1) as f64
                        };
                        (Some(tokens), Some(fill))
                    }
                    None => (None, None),
                },
                (None, true) => (trainer_tokens(run_dir, s), None),
                _ => (None, None),
            };
            let tokens = tokens.unwrap_or_else(|| self.last.get(&s.name).map_or(0, |l| l.1));
            let rate = self.last.get(&s.name).and_then(|(t, n)| {
                let dt = now.duration_since(*t).as_secs_f64();
                (dt > 0.0 && tokens >= *n).then(|| (tokens - n) as f64 / dt)
            });
            self.last.insert(s.name.clone(), (now, tokens));
            rows.push(Row {
                name: s.name.clone(),
                tokens,
                rate,
                fill,
                running: s.running(),
            });
        }
        let (who, text) = bottleneck(&rows);
        if !who.is_empty() {
            *self.counts.entry(who).or_default() += 1;
        }
        self.record(run_dir, stages, &rows, &text, elapsed);
        let mut lines = vec![format!("[{:>5.0}s] {text}", elapsed.as_secs_f64())];
        for r in &rows {
            lines.push(format!(
                "  {:<12} {:>12} tokens {:>10} tok/s  {}",
                r.name,
                r.tokens,
                r.rate.map_or("-".into(), |x| format!("{x:.0}")),
                match (r.running, r.fill) {
                    (false, _) => "done".to_string(),
                    (true, Some(f)) => format!("queue {:>3.0}%", 100.0 * f),
                    (true, None) => String::new(),
                }
            ));
        }
        for p in &sweep.points {
            let m = super::last_metrics(&run_dir.join("saes").join(&p.name));
            lines.push(if m.is_null() {
                format!("  {:<32} waiting for data", p.name)
            } else {
                format!(
                    "  {:<32} step {:>6}/{}  loss {:>10.4}  L0 {:>7.2}  EV {:>6.3}",
                    p.name,
                    m["step"].as_u64().map_or(0, |s| s + 1),
                    p.train.total_training_steps(),
                    m["losses/overall_loss"].as_f64().unwrap_or(f64::NAN),
                    m["metrics/l0"].as_f64().unwrap_or(f64::NAN),
                    m["metrics/explained_variance"].as_f64().unwrap_or(f64::NAN),
                )
            });
        }
        let mut err = std::io::stderr().lock();
        if self.tty && self.drawn > 0 {
            // back to the first line drawn last time, and clear below
            let _ = write!(err, "\x1b[{}A\x1b[J", self.drawn);
        }
        for l in &lines {
            let _ = writeln!(err, "{l}");
        }
        self.drawn = lines.len();
    }
}

impl Display {
    /// `progress.json`: this sample and the bottleneck counts so far (the report's
    /// stage table reads it, during the run and after).
    fn record(
        &mut self,
        run_dir: &Path,
        stages: &[Stage],
        rows: &[Row],
        text: &str,
        elapsed: Duration,
    ) {
        let stages: Vec<_> = rows
            .iter()
            .zip(stages)
            .map(|(r, st)| {
                // an ended stage's own count is exact; a running one's is sampled
                let tokens = (!r.running)
                    .then(|| st.summary_tokens())
                    .flatten()
                    .unwrap_or(r.tokens);
                let secs = st.seconds();
                json!({
                    "name": r.name,
                    "tokens": tokens,
                    "tokens_per_second": if r.running { r.rate } else { None },
                    "mean_tokens_per_second": (secs > 0.0 && tokens > 0).then(|| tokens as f64 / secs),
                    "seconds": secs,
                    "queue_fill": r.fill,
                    "running": r.running,
                })
            })
            .collect();
        // Once every stage has ended: the bottleneck rule on each stage's mean rate over
        // its life (a run too short for two samples still says what bounded it).
        let overall = rows.iter().all(|r| !r.running).then(|| {
            let means: Vec<Row> = rows
                .iter()
                .zip(&stages)
                .map(|(r, v)| Row {
                    name: r.name.clone(),
                    tokens: 0,
                    rate: v["mean_tokens_per_second"].as_f64(),
                    fill: None,
                    running: true,
                })
                .collect();
            bottleneck(&means).1
        });
        let v = json!({
            "elapsed_seconds": elapsed.as_secs_f64(),
            "bottleneck": text,
            "bottleneck_counts": self.counts,
            "bottleneck_overall": overall,
            "stages": stages,
        });
        // A display that cannot write its sample is no reason to stop a run.
        let _ = pipeline::shards::atomic_write(
            &run_dir.join(schemas::run_files::PROGRESS),
            serde_json::to_string_pretty(&v)
                .unwrap_or_default()
                .as_bytes(),
        );
    }
}

/// Tokens a trainer process has read: the most any of its SAEs has trained on.
fn trainer_tokens(run_dir: &Path, s: &Stage) -> Option<u64> {
    s.points
        .iter()
        .filter_map(|p| {
            super::last_metrics(&run_dir.join("saes").join(p))["details/n_training_tokens"].as_u64()
        })
        .max()
}

/// The stages holding the others back. When a queue is full, those just downstream of
/// the last full one (their input waits for them while their own output does not). With
/// no full queue (windows larger than the run), the kind of stage with the lowest
/// throughput: producers share the work (their rates add up), every trainer reads the
/// whole stream (the slowest sets the pace). Stages of one kind count together.
///
/// Returns who (the stages named, for counting) and the line shown.
fn bottleneck(rows: &[Row]) -> (String, String) {
    let kind = |n: &str| n.split('-').next().unwrap_or(n).to_string();
    let mut kinds: Vec<(String, Vec<&Row>)> = Vec::new();
    for r in rows.iter().filter(|r| r.running) {
        match kinds.last_mut() {
            Some((k, v)) if *k == kind(&r.name) => v.push(r),
            _ => kinds.push((kind(&r.name), vec![r])),
        }
    }
    let names = |v: &[&Row]| {
        v.iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let fill = |v: &[&Row]| v.iter().filter_map(|r| r.fill).fold(0.0f64, f64::max);
    if kinds.is_empty() {
        return (String::new(), String::new());
    }
    if let Some(i) = kinds.iter().rposition(|(_, v)| fill(v) >= FULL) {
        return match kinds.get(i + 1) {
            Some((_, next)) => (
                names(next),
                format!(
                    "bottleneck: {} ({}'s queue is {:.0}% full)",
                    names(next),
                    names(&kinds[i].1),
                    100.0 * fill(&kinds[i].1)
                ),
            ),
            None => (
                names(&kinds[i].1),
                format!("bottleneck: {}", names(&kinds[i].1)),
            ),
        };
    }
    let rate = |k: &str, v: &[&Row]| -> Option<f64> {
        let rates: Option<Vec<f64>> = v.iter().map(|r| r.rate).collect();
        let rates = rates?;
        Some(match k {
            "producer" => rates.iter().sum(),
            _ => rates.iter().copied().fold(f64::INFINITY, f64::min),
        })
    };
    let slowest = kinds
        .iter()
        .filter_map(|(k, v)| Some((rate(k, v)?, v)))
        .min_by(|a, b| a.0.total_cmp(&b.0));
    match slowest {
        Some((r, v)) => (
            names(v),
            format!("bottleneck: {} (the slowest, {r:.0} tok/s)", names(v)),
        ),
        None => (String::new(), "bottleneck: (measuring)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, fill: Option<f64>) -> Row {
        Row {
            name: name.into(),
            tokens: 0,
            rate: Some(1000.0),
            fill,
            running: true,
        }
    }

    #[test]
    fn the_bottleneck_is_downstream_of_the_last_full_queue() {
        let chain = |f: [f64; 4]| {
            vec![
                row("tokenizer", Some(f[0])),
                row("producer-0", Some(f[1])),
                row("producer-1", Some(f[2])),
                row("shuffler", Some(f[3])),
                row("trainer-0", None),
            ]
        };
        let (who, text) = bottleneck(&chain([1.0, 0.9, 0.2, 1.0]));
        assert!(text.starts_with("bottleneck: trainer-0 (shuffler's"));
        assert_eq!(who, "trainer-0");
        let (who, text) = bottleneck(&chain([1.0, 0.1, 0.1, 0.0]));
        assert!(text.starts_with("bottleneck: producer-0, producer-1 (tokenizer's"));
        assert_eq!(who, "producer-0, producer-1");
        assert!(bottleneck(&chain([0.0, 0.1, 0.7, 0.1]))
            .1
            .starts_with("bottleneck: shuffler"));
        // no full queue: the slowest kind (two producers at 1000 tok/s make 2000)
        let mut rows = chain([0.0, 0.0, 0.0, 0.0]);
        rows[4].rate = Some(900.0);
        assert!(bottleneck(&rows)
            .1
            .starts_with("bottleneck: trainer-0 (the slowest"));
        rows[4].rate = Some(5000.0);
        rows[1].rate = Some(300.0);
        rows[2].rate = Some(300.0);
        assert!(bottleneck(&rows)
            .1
            .starts_with("bottleneck: producer-0, producer-1 (the slowest, 600"));
    }
}
