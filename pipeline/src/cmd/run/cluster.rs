//! The job files of cluster runs: a Slurm heterogeneous-job `sbatch` script (one
//! component per role) and a Kubernetes JobSet (one replicated job per role). Each
//! process is `pipeline stage ROLE`: its role from its arguments, its index from
//! `SLURM_PROCID` (Slurm) or the pod's completion index (Kubernetes).

use super::launch::{Role, StageSpec};
use schemas::sweep::{SlurmResources, Sweep};
use std::fmt::Write;
use std::path::Path;

/// The het-job components, in order: the tokenizer's (whose first node is the job's
/// first host, where the rendezvous runs), the producers', the shuffler's, the trainers'.
pub fn components(specs: &[StageSpec]) -> Vec<(Role, usize)> {
    Role::ALL
        .into_iter()
        .map(|r| (r, specs.iter().filter(|s| s.role == r).count()))
        .filter(|(_, n)| *n > 0)
        .collect()
}

fn resources(sweep: &Sweep, r: Role) -> &SlurmResources {
    let s = &sweep.pipeline.slurm;
    match r {
        Role::Tokenizer => &s.tokenizer,
        Role::Producer => &s.producer,
        Role::Shuffler => &s.shuffler,
        Role::Trainer => &s.trainer,
    }
}

fn q(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The `sbatch` script of a planned run. `pipeline` is the binary the nodes run (on a
/// shared file system, like the run directory).
pub fn sbatch(sweep: &Sweep, run_dir: &Path, specs: &[StageSpec], pipeline: &Path) -> String {
    let s = &sweep.pipeline.slurm;
    let run = run_dir.display().to_string();
    let name = s.job_name.clone().unwrap_or_else(|| {
        format!(
            "saestream-{}",
            run_dir
                .file_name()
                .map_or("run".into(), |n| n.to_string_lossy().to_string())
        )
    });
    let mut o = String::from("#!/bin/bash\n");
    let _ = writeln!(
        o,
        "# The stages of {run}, one heterogeneous-job component per role"
    );
    let _ = writeln!(
        o,
        "# (written by `pipeline plan --slurm`; submit with sbatch)."
    );
    let _ = writeln!(o, "#SBATCH --job-name={name}");
    let _ = writeln!(o, "#SBATCH --output={run}/logs/slurm-%j.out");
    let comps = components(specs);
    for (k, (role, n)) in comps.iter().enumerate() {
        if k > 0 {
            o.push_str("#SBATCH hetjob\n");
        }
        let r = resources(sweep, *role);
        let _ = writeln!(o, "# component {k}: {} ×{n}", role.name());
        let _ = writeln!(o, "#SBATCH --ntasks={n}");
        if let Some(p) = r.partition.as_ref().or(s.partition.as_ref()) {
            let _ = writeln!(o, "#SBATCH --partition={p}");
        }
        if let Some(t) = &s.time {
            let _ = writeln!(o, "#SBATCH --time={t}");
        }
        if let Some(a) = &s.account {
            let _ = writeln!(o, "#SBATCH --account={a}");
        }
        if let Some(c) = r.cpus {
            let _ = writeln!(o, "#SBATCH --cpus-per-task={c}");
        }
        if let Some(g) = r.gpus {
            let _ = writeln!(o, "#SBATCH --gpus-per-task={g}");
        }
        if let Some(m) = &r.mem {
            let _ = writeln!(o, "#SBATCH --mem={m}");
        }
    }
    for l in &s.extra {
        let _ = writeln!(o, "{l}");
    }
    let _ = writeln!(o, "set -u");
    let _ = writeln!(o, "RUN={}", q(&run));
    let _ = writeln!(o, "PIPELINE={}", q(&pipeline.display().to_string()));
    let listen = format!("0.0.0.0:{}", sweep.pipeline.rendezvous_port.unwrap_or(0));
    let _ = writeln!(
        o,
        "# The rendezvous, on the job's first host; it writes $RUN/rendezvous.json, where"
    );
    let _ = writeln!(o, "# every stage and the orchestrator find it.");
    let _ = writeln!(
        o,
        "\"$PIPELINE\" rendezvous --run-dir \"$RUN\" --listen {listen} --advertise \"$(hostname)\" &"
    );
    let _ = writeln!(o, "RDV=$!");
    let _ = writeln!(o, "PIDS=()");
    for (k, (role, _)) in comps.iter().enumerate() {
        let _ = writeln!(
            o,
            "srun --het-group={k} --kill-on-bad-exit=1 \"$PIPELINE\" stage {} --run-dir \"$RUN\" &",
            role.name()
        );
        let _ = writeln!(o, "PIDS+=($!)");
    }
    let _ = writeln!(o, "RC=0");
    let _ = writeln!(o, "for p in \"${{PIDS[@]}}\"; do wait \"$p\" || RC=1; done");
    let _ = writeln!(o, "wait \"$RDV\"");
    let _ = writeln!(o, "exit $RC");
    o
}

/// A Kubernetes JobSet of a planned run: one replicated job per role (`parallelism` =
/// its processes, indexed completions for the index), the run directory on a shared
/// volume claim named `saestream-run`, and the run's CA and token from the Secret
/// `saestream-tls`. Peers find each other through the rendezvous, which runs beside the
/// tokenizer and is reached by the JobSet's DNS name.
pub fn jobset(sweep: &Sweep, run_dir: &Path, specs: &[StageSpec]) -> String {
    let run = run_dir.display().to_string();
    let name = sweep
        .pipeline
        .slurm
        .job_name
        .clone()
        .unwrap_or_else(|| "saestream".into());
    let image = sweep
        .pipeline
        .k8s_image
        .clone()
        .unwrap_or_else(|| "saestream:latest".into());
    let port = sweep.pipeline.rendezvous_port.unwrap_or(29417);
    // pod DNS name of the first tokenizer pod: <jobset>-<job>-<index>-0.<jobset>
    let rdv_host = format!("{name}-tokenizer-0-0.{name}");
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# The stages of {run} (written by `pipeline plan --k8s`)."
    );
    let _ = writeln!(o, "apiVersion: jobset.x-k8s.io/v1alpha2");
    let _ = writeln!(o, "kind: JobSet");
    let _ = writeln!(o, "metadata:\n  name: {name}");
    let _ = writeln!(o, "spec:");
    let _ = writeln!(o, "  network:\n    enableDNSHostnames: true");
    let _ = writeln!(o, "  replicatedJobs:");
    for (role, n) in components(specs) {
        let r = resources(sweep, role);
        let mut cmd = vec![
            "pipeline".to_string(),
            "stage".into(),
            role.name().into(),
            "--run-dir".into(),
            run.clone(),
            "--rendezvous".into(),
            format!("grpc+tls://{rdv_host}:{port}"),
        ];
        if role == Role::Tokenizer {
            // the rendezvous beside the tokenizer, then the tokenizer
            cmd = vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "pipeline rendezvous --run-dir {run} --listen 0.0.0.0:{port} --advertise {rdv_host} & exec {}",
                    cmd.join(" ")
                ),
            ];
        }
        let _ = writeln!(o, "  - name: {}", role.name());
        let _ = writeln!(o, "    replicas: 1");
        let _ = writeln!(o, "    template:\n      spec:");
        let _ = writeln!(o, "        parallelism: {n}\n        completions: {n}");
        let _ = writeln!(
            o,
            "        completionMode: Indexed\n        backoffLimit: 0"
        );
        let _ = writeln!(o, "        template:\n          spec:");
        let _ = writeln!(o, "            restartPolicy: Never");
        let _ = writeln!(o, "            containers:");
        let _ = writeln!(o, "            - name: {}", role.name());
        let _ = writeln!(o, "              image: {image}");
        let _ = writeln!(o, "              command: {}", serde_json::json!(cmd));
        let _ = writeln!(o, "              env:");
        let _ = writeln!(
            o,
            "              - name: SLURM_PROCID  # the index `pipeline stage` reads"
        );
        let _ = writeln!(o, "                valueFrom:\n                  fieldRef:");
        let _ = writeln!(
            o,
            "                    fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']"
        );
        let _ = writeln!(o, "              resources:\n                limits:");
        if let Some(c) = r.cpus {
            let _ = writeln!(o, "                  cpu: {c}");
        }
        if let Some(m) = &r.mem {
            let _ = writeln!(
                o,
                "                  memory: {}",
                m.replace('G', "Gi").replace("GiB", "Gi")
            );
        }
        if let Some(g) = r.gpus {
            let _ = writeln!(o, "                  nvidia.com/gpu: {g}");
        }
        let _ = writeln!(o, "              volumeMounts:");
        let _ = writeln!(o, "              - {{name: run, mountPath: {run}}}");
        let _ = writeln!(
            o,
            "              - {{name: tls, mountPath: {run}/tls, readOnly: true}}"
        );
        let _ = writeln!(o, "            volumes:");
        let _ = writeln!(
            o,
            "            - {{name: run, persistentVolumeClaim: {{claimName: saestream-run}}}}"
        );
        let _ = writeln!(
            o,
            "            - {{name: tls, secret: {{secretName: saestream-tls, defaultMode: 0400}}}}"
        );
    }
    let _ = writeln!(o, "---");
    let _ = writeln!(
        o,
        "# The run's CA, its key and the token; create from {run}/tls:"
    );
    let _ = writeln!(
        o,
        "#   kubectl create secret generic saestream-tls --from-file={run}/tls/ca.pem --from-file={run}/tls/ca.key --from-file={run}/tls/token"
    );
    o
}
