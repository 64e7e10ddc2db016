//! Shard directories written by `pipeline copy`: a writer killed with SIGKILL mid-shard
//! continues to exactly the uninterrupted stream, no half file ever carries a final
//! name, and damage is reported naming the file.

mod support;

use pipeline::shards::read_manifest;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use support::*;

const SPEC: &str = "synthetic:activations?batches=60&rows=64&d=256&seed=5";

/// Checks every file under a final name in `dir`: the manifest parses, and each shard
/// is a whole Arrow IPC file. Returns how many shard files were seen.
fn check_no_half_files(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut shards = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains(".tmp-") {
            continue;
        }
        let path = e.path();
        if name == "manifest.json" {
            let text = std::fs::read_to_string(&path).unwrap();
            serde_json::from_str::<schemas::streams::Manifest>(&text)
                .unwrap_or_else(|err| panic!("half manifest ({err}): {text}"));
        } else {
            let f = std::fs::File::open(&path).unwrap();
            arrow_ipc::reader::FileReader::try_new(f, None)
                .unwrap_or_else(|err| panic!("{name} is not a whole IPC file: {err}"));
            shards += 1;
        }
    }
    shards
}

#[test]
fn a_writer_killed_mid_shard_continues_to_the_same_stream() {
    let d = tempfile::tempdir().unwrap();
    let whole = d.path().join("whole");
    run_json(&["copy", SPEC, s(&whole), "--shard-bytes", "300KiB"]);
    let want = read_manifest(&whole).unwrap();
    assert!(
        want.complete && want.shards.len() >= 10,
        "{} shards",
        want.shards.len()
    );

    let out = d.path().join("cache");
    // a watcher checks every final name while the writer runs, is killed and resumes
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (out, stop) = (out.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut looks = 0u64;
            while !stop.load(Ordering::SeqCst) {
                check_no_half_files(&out);
                looks += 1;
            }
            looks
        })
    };
    let mut w = spawn(&[
        "copy",
        SPEC,
        s(&out),
        "--shard-bytes",
        "300KiB",
        "--delay-ms",
        "15",
    ]);
    let has_tmp = |dir: &PathBuf| {
        std::fs::read_dir(dir).is_ok_and(|rd| {
            rd.flatten().any(|e| {
                e.file_name().to_string_lossy().contains("shard-")
                    && e.file_name().to_string_lossy().contains(".tmp-")
            })
        })
    };
    wait_for("two shards and a third being written", || {
        read_manifest(&out).is_ok_and(|m| m.shards.len() >= 2) && has_tmp(&out)
    });
    w.child.kill().unwrap(); // SIGKILL, mid-shard
    w.wait(LIMIT);
    let cut = read_manifest(&out).unwrap();
    assert!(!cut.complete && cut.batches < 60);
    assert!(
        has_tmp(&out),
        "the killed writer left its shard under a temporary name"
    );

    let e = run_err(&["copy", SPEC, s(&out)]);
    assert!(e.contains("--resume") && e.contains(s(&out)), "{e}");
    let r = run_json(&["copy", SPEC, s(&out), "--resume", "--shard-bytes", "300KiB"]);
    assert_eq!(r["from_position"], cut.batches);
    stop.store(true, Ordering::SeqCst);
    let looks = watcher.join().unwrap();
    assert!(looks > 10, "the watcher looked {looks} times");

    let got = read_manifest(&out).unwrap();
    assert!(!has_tmp(&out));
    assert_eq!(
        got.shards, want.shards,
        "same shards, bytes and checksums as uninterrupted"
    );
    assert_eq!(batches(s(&out)), batches(SPEC));
    let inspected = run_json(&["inspect", s(&out)]);
    assert_eq!(inspected["verified"], true);
    assert_eq!(inspected["batches"], 60);
}

#[test]
fn damage_is_reported_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("c");
    run_json(&["copy", SPEC, s(&out), "--shard-bytes", "300KiB"]);

    // one bit flipped inside shard 1
    let victim = out.join("shard-00001.arrow");
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&victim, &bytes).unwrap();
    for args in [vec!["inspect", s(&out)], vec!["copy", s(&out), "-"]] {
        let e = run_err(&args);
        assert!(
            e.contains("shard-00001.arrow") && e.contains("checksum mismatch"),
            "{e}"
        );
    }
    // reading from a position past the damage does not touch it
    let tail = run_json(&["copy", s(&out), "-", "--position", "20"]);
    assert_eq!(tail["batches"], 40);
    bytes[mid] ^= 0x10;
    std::fs::write(&victim, &bytes).unwrap();

    // a shard listed but missing
    std::fs::remove_file(out.join("shard-00002.arrow")).unwrap();
    let e = run_err(&["inspect", s(&out)]);
    assert!(
        e.contains("shard-00002.arrow") && e.contains("listed in manifest.json but missing"),
        "{e}"
    );

    // a manifest that disagrees with a shard
    let dir2 = d.path().join("c2");
    run_json(&["copy", SPEC, s(&dir2), "--shard-bytes", "300KiB"]);
    let mpath = dir2.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    let rows = m["shards"][0]["rows"].as_u64().unwrap();
    m["shards"][0]["rows"] = (rows + 1).into();
    m["rows"] = (m["rows"].as_u64().unwrap() + 1).into();
    std::fs::write(&mpath, m.to_string()).unwrap();
    let e = run_err(&["inspect", s(&dir2)]);
    assert!(
        e.contains("shard-00000.arrow") && e.contains("manifest.json says"),
        "{e}"
    );

    // an existing output is refused without --overwrite; --overwrite replaces it whole
    let e = run_err(&["copy", SPEC, s(&dir2)]);
    assert!(e.contains("--overwrite"), "{e}");
    run_json(&[
        "copy",
        "synthetic:tokens?batches=3&rows=2&context=5",
        s(&dir2),
        "--overwrite",
    ]);
    assert_eq!(read_manifest(&dir2).unwrap().batches, 3);
    assert_eq!(
        std::fs::read_dir(d.path()).unwrap().count(),
        2,
        "no staging directory left"
    );
}

#[test]
fn running_out_of_space_leaves_no_file_under_a_final_name() {
    // A 1 MiB tmpfs in a mount namespace of our own: real ENOSPC.
    let probe = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"])
        .output();
    if !available(
        probe.is_ok_and(|o| o.status.success()),
        "unshare -m with tmpfs mounts (root)",
        "UNSHARE",
    ) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let script = format!(
        "mount -t tmpfs -o size=1m tmpfs {m} || exit 90
         {bin} copy '{SPEC}' {m}/out --shard-bytes 200KiB; echo \"copy-rc=$?\"
         echo '--- ls'; ls -A {m}/out
         echo '--- inspect'; {bin} inspect {m}/out",
        m = s(&mnt),
        bin = bin().display()
    );
    let o = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(out.contains("copy-rc=1"), "the copy fails: {out} {err}");
    assert!(
        err.contains("No space left on device") && err.contains(".tmp-"),
        "the error names the file and the cause: {err}"
    );
    let listing: Vec<&str> = out
        .split("--- ls")
        .nth(1)
        .unwrap()
        .split("--- inspect")
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert!(!listing.is_empty());
    assert!(listing.iter().all(|f| !f.contains(".tmp-")), "{listing:?}");
    let inspected: serde_json::Value =
        serde_json::from_str(out.split("--- inspect").nth(1).unwrap()).unwrap();
    assert_eq!(inspected["complete"], false);
    assert_eq!(inspected["verified"], true);
    let listed: Vec<String> = inspected["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["file"].as_str().unwrap().to_string())
        .collect();
    let mut files: Vec<&str> = listing
        .into_iter()
        .filter(|f| *f != "manifest.json")
        .collect();
    files.sort();
    assert_eq!(files, listed, "every shard file is a complete, listed one");
}
