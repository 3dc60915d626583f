//! `modelpress compress`, `inspect` and `decompress`: the same pipeline as a job, no server.

use crate::compress::{self, Control};
use crate::config::{CompressArgs, DecompressArgs, EvaluateArgs, InspectArgs};
use crate::formats;

use indicatif::{ProgressBar, ProgressStyle};

/// `println!` that stops quietly when stdout is closed (`modelpress inspect | head`) instead
/// of panicking on the broken pipe.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

struct BarControl(ProgressBar);

impl Control for BarControl {
    fn progress(&self, fraction: f64, stage: &str) {
        self.0.set_position((fraction * 1000.0) as u64);
        self.0.set_message(stage.to_string());
    }
    fn cancelled(&self) -> bool {
        false
    }
}

/// Runs the command; returns the process exit code (0 ok, 1 failed, 2 bad input).
/// The spec's `key` block when a file option stands for its dataset (`given`): the block,
/// created if the spec has none, names a placeholder id, loses the fields in `drop` (datasets
/// the CLI has no file for), and is parsed. A block without its file is an error.
fn data_block(
    spec: &mut serde_json::Value,
    key: &str,
    given: bool,
    drop: &[&str],
) -> Result<(), String> {
    let Some(obj) = spec.as_object_mut() else {
        return Ok(());
    };
    if !given {
        // The block names a stored dataset, which the CLI has no way to read: without its
        // file the job would run as if the block were not there.
        return match obj.contains_key(key) {
            true => Err(format!(
                "{key}: the CLI reads this block's dataset from --{key}-data FILE.npz"
            )),
            false => Ok(()),
        };
    }
    let block = obj.entry(key).or_insert_with(|| serde_json::json!({}));
    if let Some(b) = block.as_object_mut() {
        b.insert("dataset_id".into(), uuid::Uuid::nil().to_string().into());
        for field in drop {
            b.remove(*field);
        }
    }
    Ok(())
}

pub fn compress(args: CompressArgs) -> i32 {
    let spec = match (&args.preset, &args.spec) {
        (Some(p), _) => serde_json::json!({"preset": p}),
        (None, Some(path)) => match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(v) => v,
            Err(e) => {
                eprintln!("error: cannot read spec {}: {e}", path.display());
                return 2;
            }
        },
        (None, None) => {
            eprintln!("error: give --preset or --spec");
            return 2;
        }
    };
    // --calibration-data and --finetune-data stand for the spec's blocks of those names (a job
    // names a stored dataset).
    let mut spec = spec;
    let blocks = data_block(
        &mut spec,
        "calibration",
        args.calibration_data.is_some(),
        &[],
    )
    .and_then(|()| {
        let validation = &["validation_dataset_id"];
        data_block(
            &mut spec,
            "finetune",
            args.finetune_data.is_some(),
            validation,
        )?;
        data_block(
            &mut spec,
            "distill",
            args.distill_data.is_some(),
            validation,
        )
    });
    if let Err(e) = blocks {
        eprintln!("error: invalid spec: {e}");
        return 2;
    }
    let plan = match crate::job::parse_spec(&spec) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: invalid spec: {e}");
            return 2;
        }
    };
    if args.dry_run {
        return dry_run(&args.input, &plan.compress);
    }
    let Some(output) = args.output.as_deref() else {
        eprintln!("error: give -o OUTDIR");
        return 2;
    };
    if let Err(e) = std::fs::create_dir_all(output) {
        eprintln!("error: cannot create {}: {e}", output.display());
        return 1;
    }
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(1000)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {percent:>3}% {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let ctl = BarControl(bar);
    let calibration = plan
        .calibration
        .as_ref()
        .zip(args.calibration_data.as_deref())
        .map(|(spec, dataset)| crate::job::CalibrationInput { spec, dataset });
    let finetune = plan
        .finetune
        .as_ref()
        .zip(args.finetune_data.as_deref())
        .map(|(spec, dataset)| crate::job::FinetuneInput {
            spec,
            dataset,
            validation: None,
        });
    let distill = plan
        .distill
        .as_ref()
        .zip(args.distill_data.as_deref())
        .map(|(spec, dataset)| crate::job::DistillInput {
            spec,
            dataset,
            validation: None,
        });
    let data = crate::job::Data {
        eval: None,
        calibration,
        finetune,
        distill,
    };
    let result = crate::job::execute(&args.input, &plan, output, &ctl, data);
    ctl.0.finish_and_clear();
    match result {
        Ok(out) => {
            let s = &out.summary;
            say!(
                "compressed {} -> {} bytes (ratio {:.2}x), {} parameters, {} nonzero, {:.2} bits/weight",
                s.original_bytes, s.compressed_bytes, s.ratio, s.parameters, s.nonzero_parameters, s.mean_bits_per_weight
            );
            if let Some(l) = &s.latency {
                match (l.original_ms, l.deployable_ms, &l.skipped) {
                    (Some(o), Some(d), _) => say!(
                        "latency (tract, 1 thread): original {o:.3} ms, model.onnx {d:.3} ms ({:.2}x){}",
                        d / o,
                        if l.slower_than_original { ", slower than the original" } else { "" }
                    ),
                    (_, _, Some(why)) => say!("latency not measured: {why}"),
                    _ => {}
                }
            }
            for w in &s.warnings {
                eprintln!("warning[{}]: {}", w.code, w.message);
            }
            for a in &out.artifacts {
                say!(
                    "  {:<24} {:>12} bytes  sha256 {}",
                    a.name,
                    a.size_bytes,
                    a.sha256
                );
            }
            0
        }
        Err(crate::job::RunError::InvalidModel(m)) => {
            eprintln!("error: invalid model: {m}");
            2
        }
        Err(e) => {
            eprintln!("error: {}", crate::util::error_chain(&e));
            1
        }
    }
}

/// Reads a model, or prints why not and gives the exit code (2: the file is at fault).
fn read_model(path: &std::path::Path) -> Result<formats::TensorSet, i32> {
    formats::read_path(path).map_err(|e| {
        eprintln!("error: {e}");
        if e.is_user_error() {
            2
        } else {
            1
        }
    })
}

fn dry_run(input: &std::path::Path, plan: &compress::Plan) -> i32 {
    let set = match read_model(input) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let planned = compress::plan(&set.tensors, plan);
    let (before, after): (u64, u64) = planned.iter().fold((0, 0), |(b, a), t| {
        (b + t.bytes_before, a + t.estimated_bytes_after)
    });
    for t in planned.iter().filter(|t| !t.steps.is_empty()) {
        say!(
            "{:<48} {:>12} -> {:>12} bytes  {}",
            t.name,
            t.bytes_before,
            t.estimated_bytes_after,
            t.steps.join(" -> ")
        );
    }
    let touched = planned.iter().filter(|t| !t.steps.is_empty()).count();
    say!(
        "{touched} of {} tensors touched; tensor bytes {before} -> {after} (estimated)",
        planned.len()
    );
    0
}

pub fn inspect(args: InspectArgs) -> i32 {
    let set = match read_model(&args.input) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let inv = formats::inventory(&set);
    if args.json {
        let doc = serde_json::json!({"format": set.format, "parameter_count": set.parameter_count(), "tensors": inv});
        say!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return 0;
    }
    say!(
        "format: {}   tensors: {}   parameters: {}",
        set.format.as_str(),
        inv.len(),
        set.parameter_count()
    );
    say!(
        "{:<48} {:<20} {:<9} {:>12} role",
        "name",
        "shape",
        "dtype",
        "parameters"
    );
    for t in &inv {
        say!(
            "{:<48} {:<20} {:<9} {:>12} {}",
            t.name,
            format!("{:?}", t.shape),
            t.dtype,
            t.parameters,
            t.role
        );
    }
    0
}

/// Rebuilds the dense model from an archive; exit 2 when the archive is at fault.
pub fn decompress(args: DecompressArgs) -> i32 {
    let bytes = match std::fs::read(&args.input) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", args.input.display());
            return 1;
        }
    };
    let set = match crate::compress::archive::read(&bytes) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return if e.is_user_error() { 2 } else { 1 };
        }
    };
    drop(bytes);
    let out = match formats::write_bytes(&set) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    if let Err(e) = std::fs::write(&args.output, &out) {
        eprintln!("error: cannot write {}: {e}", args.output.display());
        return 1;
    }
    say!(
        "rebuilt {} ({} tensors, {} format) -> {} bytes  sha256 {}",
        args.output.display(),
        set.tensors.len(),
        set.format.as_str(),
        out.len(),
        crate::util::sha256_hex(&out)
    );
    0
}

/// `modelpress evaluate`: runs both models on the dataset and prints the scores as JSON.
pub fn evaluate(args: EvaluateArgs) -> i32 {
    use crate::eval::{metrics, run};
    let Some(metric) = metrics::Metric::parse(&args.metric) else {
        eprintln!(
            "error: --metric must be top1, agreement, relative_error, decision_agreement or cosine"
        );
        return 2;
    };
    let Some(feed) = run::Feed::parse(&args.feed) else {
        eprintln!("error: --feed must be batched, per_sample or whole");
        return 2;
    };
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let result = (|| -> Result<serde_json::Value, String> {
        let data = run::Dataset::from_npz(&read(&args.data)?)?;
        if metric == metrics::Metric::Top1 && data.labels.is_none() {
            return Err("top1 needs `labels` in the dataset".into());
        }
        let original = read(&args.original)?;
        let candidate = read(&args.candidate)?;
        let o = run::run(
            &original,
            &data,
            feed,
            args.output.as_deref(),
            &mut |_, _| true,
        )
        .map_err(|e| format!("original: {e}"))?;
        let c = run::run(&candidate, &data, feed, Some(&o.name), &mut |_, _| true)
            .map_err(|e| format!("candidate: {e}"))?;
        let labels = data.labels.as_deref().filter(|l| l.len() == o.rows);
        let scores = metrics::score(metric, &o.values, &c.values, o.rows, labels, args.threshold)
            .map_err(|e| e.to_string())?;
        let mut doc = serde_json::to_value(&scores).map_err(|e| e.to_string())?;
        doc["metric"] = serde_json::json!(metric);
        doc["value"] = serde_json::json!(scores.value(metric));
        doc["output"] = serde_json::json!(o.name);
        doc["engine"] = serde_json::json!("tract, in-process");
        doc["original_bytes"] = serde_json::json!(original.len());
        doc["candidate_bytes"] = serde_json::json!(candidate.len());
        Ok(doc)
    })();
    match result {
        Ok(doc) => {
            say!("{doc}");
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}

/// `modelpress keys create|list|revoke`: API keys in the server's database (the server need
/// not be running; a running one sees a new or revoked key at its next request).
pub fn keys(args: crate::config::KeysArgs) -> i32 {
    use crate::auth::{create_key, valid_tenant, Scope};
    use crate::config::KeysCommand;
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    rt.block_on(async move {
        if args.database_url.is_none() {
            if let Err(e) = std::fs::create_dir_all(&args.data_dir) {
                eprintln!("error: {}: {e}", args.data_dir.display());
                return 1;
            }
        }
        let store = match crate::queue::open(
            &args.database_url(),
            std::sync::Arc::new(crate::queue::SystemClock),
        )
        .await
        {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: the database: {e}");
                return 1;
            }
        };
        let code = match args.command {
            KeysCommand::Create { tenant, scope } => {
                let Some(scope) = Scope::parse(&scope) else {
                    eprintln!("error: --scope must be read, write or admin");
                    return 2;
                };
                if !valid_tenant(&tenant) {
                    eprintln!("error: --tenant must be 1 to 64 of A-Z a-z 0-9 _ . -");
                    return 2;
                }
                match create_key(store.as_ref(), &tenant, scope).await {
                    Ok((key, rec)) => {
                        eprintln!(
                            "created key {} for tenant {} with scope {}; it is shown once, store it now:",
                            rec.id, rec.tenant_id, rec.scope
                        );
                        println!("{key}");
                        0
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        1
                    }
                }
            }
            KeysCommand::List { json } => match store.list_keys().await {
                Ok(keys) => {
                    let time = |t: Option<i64>| t.map(crate::util::rfc3339);
                    if json {
                        let items: Vec<serde_json::Value> = keys
                            .iter()
                            .map(|k| {
                                serde_json::json!({
                                    "id": k.id, "tenant": k.tenant_id, "scope": k.scope,
                                    "prefix": k.prefix, "created_at": crate::util::rfc3339(k.created_at),
                                    "revoked_at": time(k.revoked_at), "last_used_at": time(k.last_used_at),
                                })
                            })
                            .collect();
                        println!("{}", serde_json::Value::Array(items));
                    } else {
                        println!("{:<36}  {:<16}  {:<5}  {:<11}  {:<24}  {:<24}  last used", "id", "tenant", "scope", "key", "created", "revoked");
                        for k in &keys {
                            println!(
                                "{:<36}  {:<16}  {:<5}  {:<11}  {:<24}  {:<24}  {}",
                                k.id,
                                k.tenant_id,
                                k.scope,
                                format!("{}…", k.prefix),
                                crate::util::rfc3339(k.created_at),
                                time(k.revoked_at).unwrap_or_else(|| "-".into()),
                                time(k.last_used_at).unwrap_or_else(|| "-".into())
                            );
                        }
                    }
                    0
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    1
                }
            },
            KeysCommand::Revoke { id } => {
                let Ok(id) = uuid::Uuid::parse_str(&id) else {
                    eprintln!("error: {id:?} is not a key id (see `modelpress keys list`)");
                    return 2;
                };
                match store.revoke_key(id).await {
                    Ok(k) => {
                        eprintln!("revoked key {} of tenant {}", k.id, k.tenant_id);
                        0
                    }
                    Err(crate::queue::QueueError::NotFound) => {
                        eprintln!("error: no key with id {id}");
                        1
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        1
                    }
                }
            }
        };
        store.close().await;
        code
    })
}

/// `modelpress verify DIR`: 0 when manifest.json is signed by the trusted key (or, with
/// `--trust-embedded-key`, by the key it names, which is printed to compare) and every
/// artifact present matches; 1 when anything does not, or when no key is trusted; 2 when the
/// key cannot be had.
pub fn verify(args: crate::config::VerifyArgs) -> i32 {
    use crate::manifest::{parse_public_key, verify_dir};
    let trusted = match (&args.key, &args.server) {
        (Some(k), _) => match parse_public_key(k) {
            Ok(k) => Some(k),
            Err(e) => {
                eprintln!("error: --key: {e}");
                return 2;
            }
        },
        (None, Some(server)) => match fetch_signing_key(server) {
            Ok(k) => Some(k),
            Err(e) => {
                eprintln!("error: {server}/v1/signing-key: {e}");
                return 2;
            }
        },
        (None, None) if args.trust_embedded_key => None,
        (None, None) => {
            eprintln!(
                "verification FAILED: no trusted key: pass --key (from GET /v1/signing-key) or --server; \
                 --trust-embedded-key checks the manifest against the key it names, which anyone can re-sign with"
            );
            return 1;
        }
    };
    match verify_dir(&args.dir, trusted.as_ref()) {
        Ok(v) => {
            for name in &v.checked {
                say!("ok       {name}");
            }
            for name in &v.missing {
                say!("missing  {name} (not in {})", args.dir.display());
            }
            let trust = if trusted.is_some() {
                "the trusted key"
            } else {
                "the key it names, trusted as asked (pass --key or --server to pin the server's)"
            };
            say!(
                "manifest of job {} signed by {trust} {}: {} artifacts match",
                v.job_id,
                v.key_id,
                v.checked.len()
            );
            if !v.missing.is_empty() && !args.allow_missing {
                eprintln!(
                    "error: {} listed artifacts are missing (download them, or pass --allow-missing)",
                    v.missing.len()
                );
                return 1;
            }
            0
        }
        Err(e) => {
            eprintln!("verification FAILED: {e}");
            1
        }
    }
}

fn fetch_signing_key(server: &str) -> Result<ed25519_dalek::VerifyingKey, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let url = format!("{}/v1/signing-key", server.trim_end_matches('/'));
    let doc: serde_json::Value = rt.block_on(async {
        let resp = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?
            .get(&url)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("answered {}", resp.status()));
        }
        resp.json().await.map_err(|e| e.to_string())
    })?;
    let hex_key = doc["public_key"]
        .as_str()
        .ok_or("no public_key in the answer")?;
    crate::manifest::parse_public_key(hex_key).map_err(|e| e.to_string())
}
