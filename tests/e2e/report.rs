//! The run report and the feature browser of a real sweep (the example model and corpus,
//! shortened): written while the run goes and at its end, every chart holding its data,
//! the feature pages' densities equal to SAELens's evals of the same tokens, a missing
//! file said on the page; and both pages opened in headless Chromium (screenshots kept
//! under the target directory), with every chart drawn, no request leaving the page and
//! no console error.

#[path = "../../pipeline/tests/support/mod.rs"]
mod support;

use e2e::{examples, s};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use support::*;

/// Sequences the evals and the feature pages both read from the dataset's start.
const SEQS: usize = 16;

/// 2 TopK SAEs on two hooks, 48 steps of 256 tokens, 2 eval batches of 8 sequences and
/// feature pages of the same 16 sequences.
fn sweep_yaml() -> String {
    format!(
        "model_name: {}\ndataset_path: {}\ncontext_size: 64\n\
store_batch_size_prompts: 8\narchitecture: topk\nk: 8\nd_sae: 256\n\
normalize_activations: expected_average_only_in\nn_batches_for_norm_estimate: 2\n\
training_tokens: 12288\ntrain_batch_size_tokens: 256\nn_batches_in_buffer: 4\nlr: 0.003\n\
log_frequency: 4\nfeature_sampling_window: 10\ndead_feature_window: 10\nseed: 7\n\
n_eval_batches: 2\neval_batch_size_prompts: 8\n\
sweep:\n  hook_name: [blocks.1.hook_resid_post, blocks.3.hook_resid_post]\n\
pipeline:\n  trainers: 2\n  features: {{n_sequences: {SEQS}, top_k: 5}}\n",
        examples().join("model").display(),
        examples().join("corpus.jsonl").display()
    )
}

/// `target/test-artifacts/NAME` (kept after the tests: screenshots, the run).
fn artifacts(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/TEST → target
    let target = exe.ancestors().nth(3).unwrap().to_path_buf();
    let d = target.join("test-artifacts").join(name);
    std::fs::create_dir_all(d.parent().unwrap()).unwrap();
    d
}

/// The sweep, run once for every test here; what the test saw while it ran.
struct Run {
    dir: PathBuf,
    /// The report read when it first appeared, and whether summary.json existed then.
    first_report: String,
    summary_then: bool,
}

fn the_run() -> &'static Run {
    static RUN: OnceLock<Run> = OnceLock::new();
    RUN.get_or_init(|| {
        let root = artifacts("report-run");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let file = root.join("sweep.yaml");
        std::fs::write(&file, sweep_yaml()).unwrap();
        let dir = root.join("run");
        let mut p = spawn(&[
            "run",
            s(&file),
            "--output",
            s(&dir),
            "--progress-every",
            "5",
        ]);
        let report = dir.join("report.html");
        let deadline = Instant::now() + LIMIT;
        let (first_report, summary_then) = loop {
            // summary.json is looked at first: a report seen after it may be the final one
            let summary = dir.join("summary.json").exists();
            if let Ok(t) = std::fs::read_to_string(&report) {
                break (t, summary);
            }
            if let Some(st) = p.child.try_wait().unwrap() {
                panic!(
                    "pipeline run ended ({st}) before any report: {}",
                    p.stderr_text()
                );
            }
            assert!(Instant::now() < deadline, "no report.html within {LIMIT:?}");
            std::thread::sleep(Duration::from_millis(20));
        };
        let (ok, err) = p.wait(LIMIT);
        assert!(ok, "pipeline run: {err}");
        Run {
            dir,
            first_report,
            summary_then,
        }
    })
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn json(p: &Path) -> Value {
    serde_json::from_str(&read(p)).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

const POINTS: [&str; 2] = ["topk-b1.resid_post", "topk-b3.resid_post"];

#[test]
fn the_report_is_written_while_the_run_goes_and_at_its_end() {
    let run = the_run();
    // The live page came before the run's end, from the log lines alone.
    assert!(
        !run.summary_then,
        "the first report appeared only after summary.json"
    );
    assert!(run.first_report.contains("not finished") || run.first_report.contains("running"));
    let html = read(&run.dir.join("report.html"));
    assert!(
        html.contains("finished: training"),
        "{}",
        &html[..500.min(html.len())]
    );
    // 7 curves per SAE, both frontiers (evals ran), a density histogram per SAE
    assert_eq!(html.matches("data-kind=\"line\"").count(), 14);
    assert_eq!(
        html.matches("data-kind=\"scatter\" data-n=\"2\"").count(),
        2
    );
    assert_eq!(html.matches("data-kind=\"bars\"").count(), 2);
    // each curve has one vertex per log line (48 steps, every 4th logged)
    assert!(html.contains("data-kind=\"line\" data-n=\"12\""));
    for k in [
        "model_performance_preservation/ce_loss_score",
        "model_behavior_preservation/kl_div_score",
        "reconstruction_quality/explained_variance",
        "sparsity/l0",
        "Over the whole run, by each stage's mean tokens/s: bottleneck: ",
        "configs/",
    ] {
        assert!(html.contains(k), "{k} missing from the report");
    }
    for p in POINTS {
        assert!(
            html.contains(&format!("saes/{p}/features.html")),
            "{p}'s feature page link"
        );
    }
    // `pipeline report` makes the same page from the same files
    let again = artifacts("report-again.html");
    run_json(&["report", s(&run.dir), "--output", s(&again)]);
    assert_eq!(read(&again), html);

    // A file taken away is said on the page, not an error.
    let copy = artifacts("report-run-no-evals");
    let _ = std::fs::remove_dir_all(&copy);
    let st = std::process::Command::new("cp")
        .args(["-r", s(&run.dir), s(&copy)])
        .status()
        .unwrap();
    assert!(st.success());
    for p in POINTS {
        std::fs::remove_file(copy.join("saes").join(p).join("evals.json")).unwrap();
    }
    std::fs::remove_file(copy.join("progress.json")).unwrap();
    let v = run_json(&["report", s(&copy)]);
    assert_eq!(v["report"], s(&copy.join("report.html")));
    let h = read(&copy.join("report.html"));
    assert!(h.contains("no evals.json in any SAE directory"));
    assert!(h.contains("L0 vs CE loss score: no SAE has both numbers yet"));
    assert!(h.contains("no progress.json"));
    // not a run directory: an error naming it
    let e = run_err(&["report", s(&copy.join("logs"))]);
    assert!(e.contains("not a run directory"), "{e}");
}

#[test]
fn feature_pages_agree_with_the_evals_of_the_same_tokens() {
    let run = the_run();
    for p in POINTS {
        let dir = run.dir.join("saes").join(p);
        let f = json(&dir.join("features.json"));
        let evals = json(&dir.join("evals.json"));
        assert_eq!(f["sequences"], SEQS);
        // SAELens's evals count the same non-special tokens of the same 16 sequences
        let tokens = evals["metrics"]["token_stats"]["total_tokens_eval_sparsity_variance"]
            .as_u64()
            .unwrap();
        assert!(f["tokens"].as_u64().unwrap() <= tokens);
        let density = evals["feature_metrics"]["feature_density"]
            .as_array()
            .unwrap();
        let latents = f["latents"].as_array().unwrap();
        assert_eq!(latents.len(), 256);
        for (l, d) in latents.iter().zip(density) {
            let (a, b) = (l["density"].as_f64().unwrap(), d.as_f64().unwrap());
            assert!(
                (a - b).abs() < 1e-12,
                "{p} latent {}: {a} vs evals {b}",
                l["index"]
            );
            let top = l["top_contexts"].as_array().unwrap();
            assert!(top.len() <= 5);
            if a > 0.0 {
                // best first; the maximum is the latent's largest activation
                assert_eq!(top[0]["activation"], l["max_activation"]);
                let acts: Vec<f64> = top
                    .iter()
                    .map(|c| c["activation"].as_f64().unwrap())
                    .collect();
                assert!(acts.windows(2).all(|w| w[0] >= w[1]), "{acts:?}");
                // the promoted tokens come from the unembedding, largest first
                let pr: Vec<f64> = l["promoted"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t["value"].as_f64().unwrap())
                    .collect();
                assert_eq!(pr.len(), 10);
                assert!(pr.windows(2).all(|w| w[0] >= w[1]));
            } else {
                assert!(top.is_empty());
            }
        }
        let html = read(&dir.join("features.html"));
        assert!(html.contains("Feature browser"));
        assert!(html.contains("id=\"index\""));
        let live = latents
            .iter()
            .filter(|l| l["fired"].as_u64().unwrap() > 0)
            .count();
        assert_eq!(html.matches("<section class=\"latent\"").count(), live);
        assert!(live > 100, "only {live} latents fired");
    }
}

/// Whether headless Chromium can be used here.
fn chromium() -> Option<PathBuf> {
    let p = PathBuf::from("/usr/bin/chromium");
    available(p.is_file(), "chromium", "CHROMIUM").then_some(p)
}

/// What a page did in the browser.
struct Seen {
    requests: Vec<String>,
    console: Vec<String>,
    charts: Value,
    /// The feature index's density column after a click on its header.
    sorted: Option<Vec<f64>>,
}

fn open_in_chromium(
    browser: &headless_chrome::Browser,
    page: &Path,
    shot: &Path,
    full_page: bool,
) -> Seen {
    use headless_chrome::protocol::cdp::types::Event;
    use headless_chrome::protocol::cdp::{Network, Page};
    let tab = browser.new_tab().unwrap();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let console = Arc::new(Mutex::new(Vec::new()));
    {
        let (rq, co) = (requests.clone(), console.clone());
        tab.add_event_listener(Arc::new(move |e: &Event| match e {
            Event::NetworkRequestWillBeSent(r) => {
                rq.lock().unwrap().push(r.params.request.url.clone())
            }
            Event::RuntimeConsoleAPICalled(c) => co.lock().unwrap().push(format!(
                "console.{:?}: {:?}",
                c.params.Type,
                c.params
                    .args
                    .iter()
                    .map(|a| a.value.clone())
                    .collect::<Vec<_>>()
            )),
            Event::RuntimeExceptionThrown(x) => co
                .lock()
                .unwrap()
                .push(format!("exception: {:?}", x.params.exception_details.text)),
            Event::LogEntryAdded(l) => co.lock().unwrap().push(format!(
                "log {:?}: {} ({:?})",
                l.params.entry.level, l.params.entry.text, l.params.entry.url
            )),
            _ => {}
        }))
        .unwrap();
    }
    tab.enable_log().unwrap();
    tab.enable_runtime().unwrap();
    tab.call_method(Network::Enable {
        max_total_buffer_size: None,
        max_resource_buffer_size: None,
        max_post_data_size: None,
        report_direct_socket_traffic: None,
        enable_durable_messages: None,
    })
    .unwrap();
    let url = format!("file://{}", std::fs::canonicalize(page).unwrap().display());
    tab.navigate_to(&url)
        .unwrap()
        .wait_until_navigated()
        .unwrap();
    // every chart: its figure's data count, and what its SVG holds
    let js = r#"JSON.stringify(Array.from(document.querySelectorAll('figure.chart')).map(function(f){
        var svg=f.querySelector('svg'); var r=svg?svg.getBoundingClientRect():{width:0,height:0};
        var verts=0; if(svg){svg.querySelectorAll('polyline[stroke-width="2"]').forEach(function(p){verts+=p.points.numberOfItems;});}
        return {kind:f.dataset.kind, n:+f.dataset.n, w:r.width, h:r.height,
          verts:verts, circles:svg?svg.querySelectorAll('circle').length:0,
          rects:svg?svg.querySelectorAll('rect').length:0};}))"#;
    let v = tab.evaluate(js, false).unwrap().value.unwrap();
    let charts: Value = serde_json::from_str(v.as_str().unwrap()).unwrap();
    // The latent index sorts: a click on "density" orders it largest first.
    let sorted: Option<Vec<f64>> = (!full_page).then(|| {
        let js = r#"(function(){var t=document.getElementById('index');
            t.tHead.rows[0].cells[1].click();
            return JSON.stringify(Array.prototype.map.call(t.tBodies[0].rows, function(r){return +r.cells[1].dataset.v;}));})()"#;
        let v = tab.evaluate(js, false).unwrap().value.unwrap();
        serde_json::from_str(v.as_str().unwrap()).unwrap()
    });
    // The listener hears the console: a probe message must arrive (then it is dropped).
    tab.evaluate("console.log('saestream-probe')", false)
        .unwrap();
    wait_for("the console probe", || {
        console
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.contains("saestream-probe"))
    });
    console
        .lock()
        .unwrap()
        .retain(|c| !c.contains("saestream-probe"));
    let png = if full_page {
        let h = tab
            .evaluate("document.documentElement.scrollHeight", false)
            .unwrap()
            .value
            .unwrap()
            .as_f64()
            .unwrap();
        let clip = Page::Viewport {
            x: 0.0,
            y: 0.0,
            width: 1280.0,
            height: h.min(6000.0),
            scale: 1.0,
        };
        tab.call_method(Page::CaptureScreenshot {
            format: Some(Page::CaptureScreenshotFormatOption::Png),
            quality: None,
            clip: Some(clip),
            from_surface: Some(true),
            capture_beyond_viewport: Some(true),
            optimize_for_speed: None,
        })
        .map(|r| {
            use base64::Engine;
            base64::prelude::BASE64_STANDARD.decode(r.data).unwrap()
        })
        .unwrap()
    } else {
        tab.capture_screenshot(Page::CaptureScreenshotFormatOption::Png, None, None, true)
            .unwrap()
    };
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    std::fs::write(shot, &png).unwrap();
    if !full_page {
        // and the first latent's section (the README's second picture)
        tab.evaluate(
            "document.querySelector('section.latent').scrollIntoView()",
            false,
        )
        .unwrap();
        let png = tab
            .capture_screenshot(Page::CaptureScreenshotFormatOption::Png, None, None, true)
            .unwrap();
        std::fs::write(shot.with_file_name("features-latent.png"), &png).unwrap();
    }
    let _ = tab.close(false);
    let requests = requests.lock().unwrap().clone();
    let console = console.lock().unwrap().clone();
    Seen {
        requests,
        console,
        charts,
        sorted,
    }
}

/// Every chart drew its data: lines their vertices, scatters their points, bars their bars.
fn assert_charts_drawn(what: &str, charts: &Value, at_least: usize) {
    let charts = charts.as_array().unwrap();
    assert!(charts.len() >= at_least, "{what}: {} charts", charts.len());
    for c in charts {
        let n = c["n"].as_u64().unwrap();
        assert!(
            n > 0 && c["w"].as_f64().unwrap() > 100.0 && c["h"].as_f64().unwrap() > 50.0,
            "{what}: {c}"
        );
        let drawn = match c["kind"].as_str().unwrap() {
            "line" => c["verts"].as_u64().unwrap(),
            "scatter" => c["circles"].as_u64().unwrap(),
            // the background is a rect too
            "bars" => c["rects"].as_u64().unwrap() - 1,
            k => panic!("{what}: chart kind {k}"),
        };
        assert!(drawn >= n, "{what}: {c} drew {drawn} of {n}");
    }
}

#[test]
fn chromium_renders_the_report_and_a_feature_page_offline() {
    let Some(path) = chromium() else { return };
    let run = the_run();
    let profile = tempfile::tempdir().unwrap();
    let args: Vec<&std::ffi::OsStr> = [
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    .iter()
    .map(std::ffi::OsStr::new)
    .collect();
    let browser = headless_chrome::Browser::new(headless_chrome::LaunchOptions {
        path: Some(path),
        headless: true,
        sandbox: false,
        window_size: Some((1280, 900)),
        user_data_dir: Some(profile.path().to_path_buf()),
        args,
        idle_browser_timeout: Duration::from_secs(120),
        ..Default::default()
    })
    .expect("headless chromium starts");
    let report = open_in_chromium(
        &browser,
        &run.dir.join("report.html"),
        &artifacts("report.png"),
        true,
    );
    let feats = open_in_chromium(
        &browser,
        &run.dir.join("saes").join(POINTS[0]).join("features.html"),
        &artifacts("features.png"),
        false,
    );
    for (what, seen, charts) in [("report", &report, 18), ("feature page", &feats, 100)] {
        assert_charts_drawn(what, &seen.charts, charts);
        // only the page itself was loaded (and the listener saw that load)
        assert!(!seen.requests.is_empty(), "{what}: no request seen at all");
        assert!(
            seen.requests.iter().all(|u| u.starts_with("file://")),
            "{what} made requests: {:?}",
            seen.requests
        );
        assert!(
            seen.console.is_empty(),
            "{what}: console: {:?}",
            seen.console
        );
    }
    let dens = feats.sorted.as_ref().unwrap();
    assert!(
        dens.len() > 100 && dens.windows(2).all(|w| w[0] >= w[1]),
        "not sorted: {dens:?}"
    );
    assert!(dens[0] > *dens.last().unwrap());
    // The README's screenshots come from here (SAESTREAM_UPDATE_DOCS=1 refreshes docs/).
    if std::env::var("SAESTREAM_UPDATE_DOCS").as_deref() == Ok("1") {
        let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs");
        std::fs::create_dir_all(&docs).unwrap();
        std::fs::copy(artifacts("report.png"), docs.join("report.png")).unwrap();
        std::fs::copy(artifacts("features.png"), docs.join("features.png")).unwrap();
        std::fs::copy(
            artifacts("features-latent.png"),
            docs.join("features-latent.png"),
        )
        .unwrap();
    }
}
