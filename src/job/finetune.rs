//! Fine-tuning: the model trained as the pipeline will store it (under the pruning masks,
//! through fake quantization, as shared values or low-rank factors), then compressed.

use super::progress::{Span, TRAINING_END};
use super::{read_dataset, FinetuneInput, RunError};
use crate::compress::{self, Control, Plan};
use crate::formats;

/// Threads a training run uses (candle's kernels run on this pool).
const TRAINING_THREADS: usize = 2;

/// One thread pool of fixed size for training: the same seed gives the same weights.
pub(super) fn training_pool() -> Result<rayon::ThreadPool, RunError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(TRAINING_THREADS)
        .build()
        .map_err(RunError::ThreadPool)
}

pub(super) fn train_error(block: &'static str) -> impl Fn(crate::train::TrainError) -> RunError {
    move |e| match e {
        crate::train::TrainError::Cancelled => RunError::Cancelled,
        crate::train::TrainError::Unsupported(m) => RunError::InvalidModel(format!("{block}: {m}")),
        crate::train::TrainError::Failed(message) => RunError::Training { block, message },
    }
}

/// For each tensor a pruning step selects, the weights pruning zeroes: the plan up to its last
/// pruning step, run on `tensors` (zeros that a later quantization rounds to are not pruned:
/// they go on training).
fn pruning_masks(
    tensors: &[formats::Tensor],
    plan: &Plan,
) -> Result<Vec<Option<Vec<bool>>>, RunError> {
    let is_prune = |m: &dyn compress::Method| m.kind() == compress::Kind::Prune;
    let Some(prefix) = compress::through_last(plan, is_prune) else {
        return Ok(vec![None; tensors.len()]);
    };
    let pruned = compress::run(tensors, &prefix, &compress::NoControl)?;
    Ok(tensors
        .iter()
        .zip(&pruned.restored)
        .map(|(t, r)| {
            prefix
                .steps
                .iter()
                .any(|s| is_prune(s.method.as_ref()) && s.select.selects(t))
                .then(|| {
                    r.to_f32()
                        .unwrap_or_default()
                        .iter()
                        .map(|v| *v == 0.0)
                        .collect()
                })
        })
        .collect())
}

/// Fine-tunes the model on the job's dataset as the pipeline will store it (pruned under the
/// pipeline's masks, encoded forms by fake quantization), then compresses the trained weights
/// with the pipeline; returns that outcome and `training.json`.
pub(super) fn retrain(
    set: &formats::TensorSet,
    plan: &Plan,
    f: &FinetuneInput,
    ctl: &dyn Control,
) -> Result<(compress::Outcome, serde_json::Value), RunError> {
    let formats::Container::Onnx(container) = &set.container else {
        return Err(RunError::InvalidSpec(
            "finetune runs the model, so it needs an ONNX model".into(),
        ));
    };
    if let Some(why) = set
        .tensors
        .iter()
        .find_map(|t| compress::untrainable(&t.facts(), plan))
    {
        return Err(RunError::InvalidSpec(format!("finetune: {why}")));
    }
    let data = read_dataset(f.dataset)?;
    let validation = f.validation.map(read_dataset).transpose()?;
    let masks = pruning_masks(&set.tensors, plan)?;
    // Low-rank factors train as factors; the pipeline then factorizes their product again
    // at the same ranks.
    let factors = compress::trained_factors(&set.tensors, plan)?;
    let factored = factors.iter().any(Option::is_some);
    if let Some(t) = set
        .tensors
        .iter()
        .zip(&masks)
        .zip(&factors)
        .find_map(|((t, m), f)| (m.is_some() && f.is_some()).then_some(t))
    {
        return Err(RunError::InvalidSpec(format!(
            "finetune: {:?} is pruned then factorized; the factors of a pruned matrix are not trained yet",
            t.name
        )));
    }
    let sharing = plan.steps.iter().any(|s| s.method.shares_values());
    if factored && sharing {
        return Err(RunError::InvalidSpec(
            "finetune: a pipeline with both value sharing (kmeans) and low-rank factors is not trained yet".into(),
        ));
    }
    let train = |weights: &[formats::Tensor],
                 params: Vec<crate::train::Param>,
                 span: (f64, f64)|
     -> Result<(Vec<formats::Tensor>, serde_json::Value), RunError> {
        let student = crate::train::Student {
            model: &container.model,
            weights,
            params,
            teacher: (&container.model, &set.tensors),
        };
        let trained = training_pool()?
            .install(|| {
                crate::train::finetune(student, &data, validation.as_ref(), f.spec, ctl, span)
            })
            .map_err(train_error("finetune"))?;
        let mut tensors = weights.to_vec();
        for (i, values) in &trained.values {
            tensors[*i].set_f32(values);
        }
        Ok((tensors, trained.log))
    };
    let (tensors, mut log) = if !sharing {
        train(
            &set.tensors,
            trainable(&set.tensors, &masks, plan, None, &factors),
            (0.0, TRAINING_END),
        )?
    } else {
        deep_compression_phases(&set.tensors, plan, &masks, &factors, &train)?
    };
    let before_loss = log["validation_loss_before"].as_f64().unwrap_or(f64::NAN);
    let span = Span::new(ctl, TRAINING_END, 0.9);
    let retrained = if factored {
        compress::run(
            &tensors,
            &compress::pin_ranks(plan, &set.tensors, &factors),
            &span,
        )?
    } else {
        compress::run(&tensors, plan, &span)?
    };
    let moved = Moved {
        original: &set.tensors,
        trained: &tensors,
        stored: &retrained.restored,
        masks: &masks,
        factors: &factors,
        sharing,
    };
    moved.record(plan, &mut log)?;
    let mut retrained = retrained;
    judge(&mut retrained.report, &log, before_loss);
    Ok((retrained, log))
}

/// A training phase: the weights trained from `params` over `span` of the job's progress.
type Train<'a> = dyn Fn(
        &[formats::Tensor],
        Vec<crate::train::Param>,
        (f64, f64),
    ) -> Result<(Vec<formats::Tensor>, serde_json::Value), RunError>
    + 'a;

/// Deep Compression's order: the weights retrain under the pruning masks first (the
/// value-sharing steps left out), then the codebooks are built from the retrained weights
/// and their shared values train with the indices fixed.
fn deep_compression_phases(
    tensors: &[formats::Tensor],
    plan: &Plan,
    masks: &[Option<Vec<bool>>],
    factors: &[Option<compress::lowrank::Factors>],
    train: &Train,
) -> Result<(Vec<formats::Tensor>, serde_json::Value), RunError> {
    {
        let before = compress::without_sharing(plan);
        let half = TRAINING_END / 2.0;
        let (weights, first) = train(
            tensors,
            trainable(tensors, masks, &before, None, factors),
            (0.0, half),
        )?;
        let shared = compress::shared_values(&weights, plan)?;
        let (tensors, second) = train(
            &weights,
            trainable(&weights, masks, plan, Some(&shared), factors),
            (half, TRAINING_END),
        )?;
        let mut log = second.clone();
        log["validation_before"] = first["validation_before"].clone();
        log["validation_loss_before"] = first["validation_loss_before"].clone();
        log["seconds"] = serde_json::json!(
            first["seconds"].as_f64().unwrap_or(0.0) + second["seconds"].as_f64().unwrap_or(0.0)
        );
        log["phases"] = serde_json::json!([
            {"phase": "weights", "trains": "the weights under the pruning masks, the value-sharing steps left out", "log": first},
            {"phase": "shared_values", "trains": "each codebook's values (a centroid's gradient is the sum over its weights), indices fixed", "log": second},
        ]);
        Ok((tensors, log))
    }
}

/// The weights before training, after it, and as the pipeline stores them.
struct Moved<'a> {
    original: &'a [formats::Tensor],
    trained: &'a [formats::Tensor],
    stored: &'a [formats::Tensor],
    masks: &'a [Option<Vec<bool>>],
    factors: &'a [Option<compress::lowrank::Factors>],
    sharing: bool,
}

impl Moved<'_> {
    /// How far the stored model is from the trained one, into `training.json`: pruning's
    /// zeros, factors and shared values each found again.
    fn record(&self, plan: &Plan, log: &mut serde_json::Value) -> Result<(), RunError> {
        let (tensors, masks, factors) = (self.trained, self.masks, self.factors);
        // Pruning again on the trained weights (whose pruned ones are exact zeros) finds the same
        // masks; say so, or how many weights moved.
        let moved: usize = masks
            .iter()
            .zip(pruning_masks(tensors, plan)?)
            .filter_map(|(before, after)| Some((before.as_ref()?, after?)))
            .map(|(b, a)| b.iter().zip(&a).filter(|(b, a)| b != a).count())
            .sum();
        log["zeros_moved"] = serde_json::json!(moved);
        // How far any stored weight of the tensors `is` picks is from its trained value.
        let moved_from = |is: &dyn Fn(&formats::Tensor) -> bool| {
            tensors
                .iter()
                .zip(self.stored)
                .filter(|(t, _)| is(t))
                .flat_map(|(t, r)| {
                    let (a, b) = (
                        t.to_f32().unwrap_or_default(),
                        r.to_f32().unwrap_or_default(),
                    );
                    a.into_iter()
                        .zip(b)
                        .map(|(a, b)| f64::from((a - b).abs()))
                        .collect::<Vec<_>>()
                })
                .fold(0.0, f64::max)
        };
        if factors.iter().any(Option::is_some) {
            // The product of trained factors has their rank exactly: factorized again at that
            // rank it comes back to float precision.
            let names: std::collections::HashSet<&str> = self
                .original
                .iter()
                .zip(factors)
                .filter(|(_, f)| f.is_some())
                .map(|(t, _)| t.name.as_str())
                .collect();
            log["factors_moved"] =
                serde_json::json!(moved_from(&|t| names.contains(t.name.as_str())));
        }
        if self.sharing {
            // k-means again on trained shared values (at most k distinct values per codebook)
            // finds them again.
            log["shared_values_moved"] = serde_json::json!(moved_from(&|t| {
                plan.steps
                    .iter()
                    .any(|s| s.method.shares_values() && s.select.selects(t))
            }));
        }
        Ok(())
    }
}

/// A training that never beat the untrained weights keeps them, with a warning; the trained
/// weights are judged by the validation metric, not by how far they moved.
fn judge(report: &mut compress::report::Report, log: &serde_json::Value, before_loss: f64) {
    // No epoch beat the untrained weights on the validation rows (in any phase): the job
    // stores those.
    let gained = |l: &serde_json::Value| l["best_epoch"] != 0;
    let any_gain = gained(log)
        || log["phases"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| gained(&p["log"])));
    if !any_gain {
        report.warnings.push(compress::report::Warning::new(
            "finetune_no_gain",
            format!(
                "fine-tuning kept the untrained weights: no epoch lowered the validation loss ({:.6} before training; training stopped on {})",
                before_loss, log["stopped"]
            ),
        ));
    }
    // The trained weights are judged by the validation metric, not by how far they moved
    // from the original (they are meant to).
    let r = report;
    if r.warnings.iter().any(|w| w.code == "weight_error_high") {
        r.warnings.retain(|w| w.code != "weight_error_high");
        r.notes.push(
            "after fine-tuning, the weights' error figures compare the stored weights with the trained ones; the model is judged by the validation metric (training.json) and the evaluation".into(),
        );
    }
}

/// How each tensor trains: under its pruning mask, through fake quantization where `plan`
/// encodes it, or as shared values (a codebook from `shared`).
fn trainable(
    tensors: &[formats::Tensor],
    masks: &[Option<Vec<bool>>],
    plan: &Plan,
    shared: Option<&[Option<compress::SharedValues>]>,
    factors: &[Option<compress::lowrank::Factors>],
) -> Vec<crate::train::Param> {
    tensors
        .iter()
        .zip(masks)
        .enumerate()
        .map(|(i, (t, mask))| {
            let shared = shared.and_then(|s| s[i].clone());
            let encodes = plan
                .steps
                .iter()
                .any(|s| s.select.selects(t) && s.method.kind() == compress::Kind::Encode);
            type Project = Box<dyn Fn(&[f32]) -> Result<Vec<f32>, String> + Send + Sync>;
            let project = (encodes && shared.is_none()).then(|| {
                let (t, plan) = (t.clone(), plan.clone());
                Box::new(move |v: &[f32]| {
                    compress::project(&t, &plan, v.to_vec()).map_err(|e| e.to_string())
                }) as Project
            });
            crate::train::Param {
                mask: mask.clone(),
                project,
                shared,
                factors: factors[i].clone(),
            }
        })
        .collect()
}

/// A training run's figures for the job summary (`training.json` has every epoch).
pub(super) fn training_summary(t: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "metric": t["metric"],
        "validation_before": t["validation_before"],
        "validation_after": t["best_validation"],
        "best_epoch": t["best_epoch"],
        "epochs": t["epochs"].as_array().map_or(0, Vec::len),
        "stopped": t["stopped"],
        "seconds": t["seconds"],
        "rows": t["rows"],
    })
}
