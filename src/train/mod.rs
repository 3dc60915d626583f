//! Compression-aware fine-tuning: the compressed model (the student) learns to reproduce the
//! original (the teacher) on an uploaded dataset, with no labels needed (knowledge
//! distillation, Hinton et al. 2015: KL divergence between temperature-softened outputs).
//!
//! The training engine is candle (reverse-mode autodiff, AdamW); [`graph`] maps the ONNX
//! graph onto its ops. Every float initializer the scored output depends on is trained:
//! - a pruned weight under its fixed mask (pruned weights stay zero);
//! - a weight in a quantized form through fake quantization with a straight-through
//!   estimator: each step the forward pass sees the weight as the pipeline's own steps
//!   encode it ([`Param::project`], the `quantize`/`ternary`/`binary`/`cast` methods
//!   themselves), and the gradient passes to the float weight unchanged;
//! - every other float tensor (biases, layers under `min_params`) as it is.
//!
//! The runner then runs the job's pipeline again on the trained weights, so `model.onnx` holds
//! exactly the forms the training saw. Deterministic for a seed (shuffles from it, one
//! thread pool of fixed size); cancellable between steps; `max_seconds` returns the best
//! epoch so far. The compression core does not depend on this module.

pub mod graph;
pub mod narrow;

use crate::compress::Control;
use crate::eval::run::Dataset;
use crate::model::{DType, Tensor as ModelTensor};
use candle_core::{Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use graph::{GraphError, Program};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

/// What the student is trained to match.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Loss {
    /// KL divergence of temperature-softened class scores (the logits feeding a Softmax
    /// output, or the output itself).
    Kl,
    /// Mean squared error of the outputs, relative to the teacher's mean square.
    Mse,
    /// One minus the cosine of each output row with the teacher's (embeddings).
    Cosine,
}

/// A job's `finetune` block.
#[derive(Debug, Clone, PartialEq)]
pub struct FinetuneSpec {
    pub dataset_id: Uuid,
    /// Rows held out for validation (early stopping and the reported metric), a fraction of
    /// the dataset; or a second dataset.
    pub validation: f64,
    pub validation_dataset_id: Option<Uuid>,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Fraction of the steps the learning rate warms up over (then a cosine decay to 0).
    pub warmup: f64,
    pub loss: Loss,
    /// KL's temperature; None: a quarter of the RMS of the teacher's logits (raw-pixel
    /// models such as mnist-8 have logits in the thousands), at least 1.
    pub temperature: Option<f64>,
    /// Weight of cross-entropy on the dataset's labels (0: labels unused).
    pub alpha: f64,
    /// Weight of the hint loss: each weighted op's output (Conv, MatMul, Gemm) matched to
    /// the teacher's, relative to its mean square (FitNets, Romero et al. 2015).
    pub hint: f64,
    /// The output trained on (default: the first float output).
    pub output: Option<String>,
    pub seed: u64,
    pub max_seconds: f64,
    /// Epochs without a lower validation loss before stopping (the best epoch by that loss
    /// is returned).
    pub patience: usize,
    /// Augmentation: each training row of an image input (4-D, [N, C, H, W]) moves by a
    /// random whole number of pixels up to this many along H and W (edges repeated), and the
    /// teacher scores the moved row (0: none).
    pub shift: usize,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    dataset_id: String,
    validation: Option<f64>,
    validation_dataset_id: Option<String>,
    epochs: Option<u64>,
    batch_size: Option<u64>,
    learning_rate: Option<f64>,
    weight_decay: Option<f64>,
    warmup: Option<f64>,
    loss: Option<Loss>,
    temperature: Option<f64>,
    alpha: Option<f64>,
    hint: Option<f64>,
    output: Option<String>,
    seed: Option<u64>,
    max_seconds: Option<f64>,
    patience: Option<u64>,
    shift: Option<u64>,
}

fn id(v: &str, field: &str) -> Result<Uuid, String> {
    Uuid::parse_str(v)
        .map_err(|_| format!("{field}: {:?} is not a dataset id", crate::util::clip(v)))
}

fn within(v: Option<f64>, field: &str, lo: f64, hi: f64, default: f64) -> Result<f64, String> {
    match v {
        None => Ok(default),
        Some(x) if x.is_finite() && x >= lo && x <= hi => Ok(x),
        Some(_) => Err(format!("{field}: must be a number in [{lo}, {hi}]")),
    }
}

/// Defaults that differ between fine-tuning and distillation.
struct Defaults {
    epochs: u64,
    patience: u64,
    hint: f64,
}

impl FinetuneSpec {
    /// The spec's `finetune` block, if any; an error names the field.
    pub fn parse(spec: &Value) -> Result<Option<FinetuneSpec>, String> {
        let Some(v) = spec.get("finetune") else {
            return Ok(None);
        };
        let defaults = Defaults {
            epochs: 16,
            patience: 5,
            hint: DEFAULT_HINT,
        };
        FinetuneSpec::block(v, "finetune", &defaults).map(Some)
    }

    /// A block of training fields named `name` in errors.
    fn block(v: &Value, name: &str, d: &Defaults) -> Result<FinetuneSpec, String> {
        let p: Params = crate::eval::block(v, name)?;
        let count = |v: Option<u64>, field: &str, lo: u64, hi: u64, default: u64| match v {
            None => Ok(default as usize),
            Some(n) if (lo..=hi).contains(&n) => Ok(n as usize),
            Some(_) => Err(format!(
                "{name}.{field}: must be an integer from {lo} to {hi}"
            )),
        };
        let field = |f: &str| format!("{name}.{f}");
        let temperature = match p.temperature {
            None => None,
            Some(t) if t.is_finite() && t > 0.0 => Some(t),
            Some(_) => return Err(format!("{name}.temperature: must be a number > 0")),
        };
        let learning_rate = match p.learning_rate {
            None => DEFAULT_LEARNING_RATE,
            Some(l) if l.is_finite() && l > 0.0 && l <= 1.0 => l,
            Some(_) => return Err(format!("{name}.learning_rate: must be a number in (0, 1]")),
        };
        Ok(FinetuneSpec {
            dataset_id: id(&p.dataset_id, &field("dataset_id"))?,
            validation: within(p.validation, &field("validation"), 0.01, 0.5, 0.1)?,
            validation_dataset_id: p
                .validation_dataset_id
                .as_deref()
                .map(|v| id(v, &field("validation_dataset_id")))
                .transpose()?,
            epochs: count(p.epochs, "epochs", 1, 1000, d.epochs)?,
            batch_size: count(p.batch_size, "batch_size", 1, 4096, 64)?,
            learning_rate,
            weight_decay: within(p.weight_decay, &field("weight_decay"), 0.0, 1.0, 0.0)?,
            warmup: within(p.warmup, &field("warmup"), 0.0, 0.5, 0.05)?,
            loss: p.loss.unwrap_or(Loss::Kl),
            temperature,
            alpha: within(p.alpha, &field("alpha"), 0.0, 1.0, 0.0)?,
            hint: within(p.hint, &field("hint"), 0.0, 100.0, d.hint)?,
            output: p.output,
            seed: p.seed.unwrap_or(0),
            max_seconds: within(p.max_seconds, &field("max_seconds"), 1.0, 86_400.0, 600.0)?,
            patience: count(p.patience, "patience", 1, 1000, d.patience)?,
            shift: count(p.shift, "shift", 0, 8, 0)?,
        })
    }
}

/// A job's `distill` block: the training fields of `finetune`, and how the student is cut
/// from the teacher.
#[derive(Debug, Clone, PartialEq)]
pub struct DistillSpec {
    pub train: FinetuneSpec,
    /// The share of each narrowable layer's channels the student keeps.
    pub width: f64,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StudentParams {
    width: f64,
}

impl DistillSpec {
    /// The spec's `distill` block, if any; an error names the field.
    pub fn parse(spec: &Value) -> Result<Option<DistillSpec>, String> {
        let Some(v) = spec.get("distill") else {
            return Ok(None);
        };
        let mut rest = v.as_object().cloned().ok_or("distill: must be an object")?;
        let student = rest.remove("student").ok_or(
            "distill.student: required ({\"width\": 0.5} keeps half of each hidden layer)",
        )?;
        let s: StudentParams = crate::eval::block(&student, "distill.student")?;
        if !(s.width.is_finite() && s.width > 0.0 && s.width < 1.0) {
            return Err("distill.student.width: must be a number in (0, 1)".into());
        }
        let defaults = Defaults {
            epochs: DISTILL_EPOCHS,
            patience: 10,
            hint: 0.0,
        };
        Ok(Some(DistillSpec {
            train: FinetuneSpec::block(&Value::Object(rest), "distill", &defaults)?,
            width: s.width,
        }))
    }
}

/// Distillation's default epochs: a narrowed student has further to go than a compressed
/// one (on the digits MLP at half width, see docs/TRAINING.md).
pub const DISTILL_EPOCHS: u64 = 60;

/// AdamW's default learning rate (on mnist-8 after 80 % pruning + int8: 0.9815 top-1 at 3e-3,
/// 0.978 at 1e-2, 0.961 at 3e-4).
pub const DEFAULT_LEARNING_RATE: f64 = 3e-3;

/// The hint loss's default weight.
pub const DEFAULT_HINT: f64 = 1.0;

/// How one parameter of the student trains (the default: as it is).
#[derive(Default)]
pub struct Param {
    /// Flags of the values that must stay zero (pruned), if any.
    pub mask: Option<Vec<bool>>,
    /// The values the forward pass sees for the float weights (the pipeline's encoding), if
    /// the tensor has one.
    #[allow(clippy::type_complexity)]
    pub project: Option<Box<dyn Fn(&[f32]) -> Result<Vec<f32>, String> + Send + Sync>>,
    /// Shared values (a k-means codebook): the values train, each weight reads its slot
    /// (Deep Compression: a centroid's gradient is the sum of its weights' gradients).
    pub shared: Option<crate::compress::SharedValues>,
    /// Low-rank factors: A and B train, the forward pass sees A·B.
    pub factors: Option<crate::compress::lowrank::Factors>,
}

/// A parameter trained as factors: its variable holds A [rows, rank] then B [rank, cols],
/// and the weight is A·B in the tensor's shape.
struct Factored {
    rows: usize,
    rank: usize,
    cols: usize,
    shape: Vec<usize>,
}

impl Factored {
    fn product(&self, v: &Tensor) -> Result<Tensor, TrainError> {
        let a = v
            .narrow(0, 0, self.rows * self.rank)?
            .reshape((self.rows, self.rank))?;
        let b = v
            .narrow(0, self.rows * self.rank, self.rank * self.cols)?
            .reshape((self.rank, self.cols))?;
        Ok(a.matmul(&b)?.reshape(self.shape.as_slice())?)
    }
}

/// A parameter trained as shared values: the slot of each weight (a fixed zero reads slot
/// 0 and is masked), and the weight's shape.
struct Gather {
    slots: Tensor,
    shape: Vec<usize>,
}

/// The student: its graph and the weights it starts from (masked), for each tensor (parallel
/// to `weights`) how it trains, and the teacher it learns to reproduce.
pub struct Student<'a> {
    pub model: &'a tract_onnx::pb::ModelProto,
    pub weights: &'a [ModelTensor],
    pub params: Vec<Param>,
    /// The teacher's graph and weights: the original model. For fine-tuning after
    /// compression, the student's own graph and starting weights; for distillation, the
    /// wider model the student was cut from.
    pub teacher: (&'a tract_onnx::pb::ModelProto, &'a [ModelTensor]),
}

/// One epoch in `training.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Epoch {
    pub epoch: usize,
    pub steps: usize,
    pub train_loss: f64,
    pub validation_metric: f64,
    /// The main loss against the teacher on the validation rows.
    pub validation_loss: f64,
    pub seconds: f64,
}

/// What a training run produced: the trained values of every trained tensor (by index),
/// and its log (`training.json`).
pub struct Trained {
    pub values: Vec<(usize, Vec<f32>)>,
    pub log: Value,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrainError {
    #[error("cancelled")]
    Cancelled,
    /// The model or data cannot be trained (the message says why).
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Failed(String),
}

impl From<GraphError> for TrainError {
    fn from(e: GraphError) -> Self {
        TrainError::Unsupported(e.0)
    }
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Failed(e.to_string())
    }
}

/// A deterministic generator for the shuffles (splitmix64).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn shuffle(&mut self, v: &mut [usize]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// How a dataset is cut into rows: the rows of a batched dataset, or, for a dataset fed
/// whole (a stateful model's one sequence, as silero's `input` [steps, 576] beside its state
/// `h`, `c`), windows of consecutive steps, each run from the state as stored.
struct Rows<'a> {
    data: &'a Dataset,
    /// How many rows (or windows) there are.
    n: usize,
    /// Windows: their length, and the arrays cut along axis 0 (the rest are fed as stored).
    window: Option<(usize, Vec<String>)>,
}

impl<'a> Rows<'a> {
    /// `window` is the window length for a dataset fed whole (the spec's `batch_size`),
    /// shortened so that there are at least two windows.
    fn new(data: &'a Dataset, window: usize) -> Result<Rows<'a>, TrainError> {
        if let Ok((_, Some(n))) = data.describe() {
            if n > 0 {
                return Ok(Rows {
                    data,
                    n: n as usize,
                    window: None,
                });
            }
        }
        let steps = data
            .arrays
            .iter()
            .map(|a| a.shape.first().copied().unwrap_or(0))
            .max()
            .unwrap_or(0);
        if steps < 2 {
            return Err(TrainError::Unsupported(
                "training needs at least 2 rows (or 2 steps of a sequence fed whole)".into(),
            ));
        }
        let seq = data
            .arrays
            .iter()
            .filter(|a| a.shape.first() == Some(&steps))
            .map(|a| a.name.clone())
            .collect();
        let len = window.min(steps / 2).max(1);
        Ok(Rows {
            data,
            n: steps / len,
            window: Some((len, seq)),
        })
    }

    /// Rows one forward pass takes, at most `rows`: windows run one at a time, each from the
    /// stored state.
    fn chunk(&self, rows: usize) -> usize {
        if self.window.is_some() {
            1
        } else {
            rows.max(1)
        }
    }

    /// Labels of `rows` (none for windows).
    fn labels(&self, rows: &[usize]) -> Option<Vec<i64>> {
        match self.window {
            Some(_) => None,
            None => self
                .data
                .labels
                .as_ref()
                .map(|l| rows.iter().map(|&r| l[r]).collect()),
        }
    }

    /// The rows `rows` of each array the program reads, as candle tensors (for windows, the
    /// windows' steps of the sequence arrays, and the other arrays as stored).
    fn feeds(&self, program: &Program, rows: &[usize]) -> Result<Vec<Tensor>, TrainError> {
        program
            .inputs
            .iter()
            .map(|name| {
                let t = self
                    .data
                    .arrays
                    .iter()
                    .find(|t| &t.name == name)
                    .ok_or_else(|| {
                        TrainError::Unsupported(format!("the dataset has no array {name:?}"))
                    })?;
                if t.dtype != DType::F32 {
                    return Err(TrainError::Unsupported(format!(
                        "the engine trains on float32 inputs; {name:?} is {}",
                        t.dtype.name()
                    )));
                }
                let (per, cut) = match &self.window {
                    None => (1, true),
                    Some((len, seq)) => (*len, seq.contains(name)),
                };
                let value = |c: &[u8]| f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                if !cut {
                    let v = t.data.chunks_exact(4).map(value).collect();
                    return Ok(Tensor::from_vec(v, t.shape.as_slice(), &Device::Cpu)?);
                }
                let n = t.shape.first().copied().unwrap_or(0);
                let row = t.data.len() / 4 / n.max(1);
                let mut v = Vec::with_capacity(rows.len() * per * row);
                for &r in rows {
                    v.extend(
                        t.data[r * per * row * 4..(r + 1) * per * row * 4]
                            .chunks_exact(4)
                            .map(value),
                    );
                }
                let mut shape = t.shape.clone();
                shape[0] = rows.len() * per;
                Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
            })
            .collect()
    }

    /// How the rows were cut, for training.json.
    fn describe(&self) -> Value {
        match &self.window {
            None => serde_json::json!({"rows": self.n}),
            Some((len, seq)) => serde_json::json!({
                "windows": self.n, "window_steps": len, "sequence_arrays": seq,
                "note": "a dataset fed whole is cut into windows of consecutive steps, each run from the state as stored"
            }),
        }
    }
}

/// The scores the loss compares (logits when the output is a Softmax's).
fn scores(program: &Program, feeds: &[Tensor], params: &[Tensor]) -> Result<Tensor, TrainError> {
    let (out, logits) = program.forward(feeds, params, program.logits.as_deref())?;
    Ok(logits.unwrap_or(out))
}

/// Each row of a 4-D float feed ([N, C, H, W]) moved by its (dy, dx), the edges repeated:
/// out[n, c, y, x] = in[n, c, clamp(y - dy), clamp(x - dx)]. Other feeds pass unchanged.
fn shifted(feeds: Vec<Tensor>, moves: &[(isize, isize)]) -> Result<Vec<Tensor>, TrainError> {
    feeds
        .into_iter()
        .map(|t| {
            let Ok((n, c, h, w)) = t.dims4() else {
                return Ok(t);
            };
            if n != moves.len() {
                return Ok(t);
            }
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            let mut out = Vec::with_capacity(v.len());
            let clamp = |i: isize, len: usize| i.clamp(0, len as isize - 1) as usize;
            for (r, &(dy, dx)) in moves.iter().enumerate() {
                for ch in 0..c {
                    let plane = &v[(r * c + ch) * h * w..(r * c + ch + 1) * h * w];
                    for y in 0..h {
                        let sy = clamp(y as isize - dy, h);
                        for x in 0..w {
                            out.push(plane[sy * w + clamp(x as isize - dx, w)]);
                        }
                    }
                }
            }
            Ok(Tensor::from_vec(out, (n, c, h, w), &Device::Cpu)?)
        })
        .collect()
}

/// log(sigmoid(z)) = -softplus(-z), computed without overflow:
/// -(relu(-z) + log(1 + exp(-|z|))).
fn log_sigmoid(z: &Tensor) -> Result<Tensor, TrainError> {
    let abs = (z.relu()? + z.neg()?.relu()?)?;
    let soft = (z.neg()?.relu()? + (abs.neg()?.exp()? + 1.0)?.log()?)?;
    Ok(soft.neg()?)
}

fn flat2(t: &Tensor) -> Result<Tensor, TrainError> {
    let n = t.dims().first().copied().unwrap_or(1);
    Ok(t.reshape((n, t.elem_count() / n.max(1)))?)
}

struct Setup<'a> {
    program: &'a Program,
    spec: &'a FinetuneSpec,
    temperature: f64,
    /// The teacher's mean square output (MSE's scale).
    scale: f64,
}

impl Setup<'_> {
    fn loss(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        labels: Option<&Tensor>,
    ) -> Result<Tensor, TrainError> {
        let (s, t) = (flat2(student)?, flat2(teacher)?);
        let main = match self.spec.loss {
            // Each value a yes/no logit: KL of the two Bernoulli distributions, softened.
            Loss::Kl if self.program.binary => {
                let tt = self.temperature;
                let (zs, zt) = ((&s / tt)?, (&t / tt)?);
                let p_t = candle_nn::ops::sigmoid(&zt)?;
                let yes = (log_sigmoid(&zt)? - log_sigmoid(&zs)?)?;
                let no = (log_sigmoid(&zt.neg()?)? - log_sigmoid(&zs.neg()?)?)?;
                let kl = ((&p_t * yes)? + ((1.0 - &p_t)? * no)?)?.mean_all()?;
                (kl * (tt * tt))?
            }
            Loss::Kl => {
                let tt = self.temperature;
                let p_t = candle_nn::ops::softmax(&(&t / tt)?, D::Minus1)?;
                let log_p_t = candle_nn::ops::log_softmax(&(&t / tt)?, D::Minus1)?;
                let log_p_s = candle_nn::ops::log_softmax(&(&s / tt)?, D::Minus1)?;
                let kl = (p_t * (log_p_t - log_p_s)?)?.sum(D::Minus1)?.mean_all()?;
                (kl * (tt * tt))?
            }
            Loss::Mse => ((&s - &t)?.sqr()?.mean_all()? / self.scale)?,
            Loss::Cosine => {
                let dot = (&s * &t)?.sum(D::Minus1)?;
                let ns = s.sqr()?.sum(D::Minus1)?.sqrt()?;
                let nt = t.sqr()?.sum(D::Minus1)?.sqrt()?;
                let cos = (dot / ((ns * nt)? + 1e-12)?)?;
                (1.0 - cos.mean_all()?)?
            }
        };
        match labels {
            Some(l) if self.spec.alpha > 0.0 => {
                let ce = candle_nn::loss::cross_entropy(&s, l)?;
                Ok(((main * (1.0 - self.spec.alpha))? + (ce * self.spec.alpha)?)?)
            }
            _ => Ok(main),
        }
    }
}

/// The validation metric of scores against the teacher's (and labels): for a Sigmoid head
/// (`binary`) the share of decisions (logit above 0, probability above 0.5) the two agree on;
/// else top-1 accuracy with labels, top-1 agreement (KL) or mean cosine.
fn metric(
    student: &[f32],
    teacher: &[f32],
    rows: usize,
    labels: Option<&[i64]>,
    loss: Loss,
    binary: bool,
) -> f64 {
    if binary && loss == Loss::Kl {
        let same = student
            .iter()
            .zip(teacher)
            .filter(|(a, b)| (**a > 0.0) == (**b > 0.0))
            .count();
        return same as f64 / student.len().max(1) as f64;
    }
    let width = student.len() / rows.max(1);
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &x)| if x > b.1 { (i, x) } else { b },
            )
            .0
    };
    match (loss, labels) {
        (Loss::Kl, Some(l)) => {
            (0..rows)
                .filter(|&r| argmax(&student[r * width..(r + 1) * width]) as i64 == l[r])
                .count() as f64
                / rows.max(1) as f64
        }
        (Loss::Kl, None) => {
            (0..rows)
                .filter(|&r| {
                    argmax(&student[r * width..(r + 1) * width])
                        == argmax(&teacher[r * width..(r + 1) * width])
                })
                .count() as f64
                / rows.max(1) as f64
        }
        _ => {
            let mut total = 0.0;
            for r in 0..rows {
                let (a, b) = (
                    &student[r * width..(r + 1) * width],
                    &teacher[r * width..(r + 1) * width],
                );
                let dot: f64 = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| f64::from(*x) * f64::from(*y))
                    .sum();
                let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
                let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
                total += if na > 0.0 && nb > 0.0 {
                    dot / (na * nb)
                } else {
                    0.0
                };
            }
            total / rows.max(1) as f64
        }
    }
}

/// Scores of every row in `rows`, in slices, with `params`.
fn all_scores(
    program: &Program,
    data: &Rows,
    rows: &[usize],
    params: &[Tensor],
) -> Result<Vec<f32>, TrainError> {
    let mut out = Vec::new();
    for chunk in rows.chunks(data.chunk(256)) {
        let feeds = data.feeds(program, chunk)?;
        let s = scores(program, &feeds, params)?;
        out.extend(s.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// The weights the forward pass sees: masked, and projected onto the tensor's encoding with
/// a straight-through gradient.
fn effective(
    vars: &[Var],
    params: &[&Param],
    masks: &[Option<Tensor>],
    gathers: &[Option<Gather>],
    factored: &[Option<Factored>],
) -> Result<Vec<Tensor>, TrainError> {
    let mut out = Vec::with_capacity(vars.len());
    for ((((v, p), mask), gather), factors) in vars
        .iter()
        .zip(params)
        .zip(masks)
        .zip(gathers)
        .zip(factored)
    {
        let mut w = match (gather, factors) {
            // Each weight is its slot's value: index_select's gradient sums over the slot.
            (Some(g), _) => v
                .as_tensor()
                .index_select(&g.slots, 0)?
                .reshape(g.shape.as_slice())?,
            // A·B: each factor's gradient comes through the product.
            (None, Some(f)) => f.product(v.as_tensor())?,
            (None, None) => v.as_tensor().clone(),
        };
        if let Some(m) = mask {
            w = (w * m)?;
        }
        if let (Some(project), None) = (&p.project, gather) {
            let values = w.flatten_all()?.to_vec1::<f32>()?;
            let q = project(&values).map_err(TrainError::Failed)?;
            let q = Tensor::from_vec(q, w.dims(), &Device::Cpu)?;
            // Straight-through: forward q, gradient as if w.
            w = (&w + (q - &w)?.detach())?;
        }
        out.push(w);
    }
    Ok(out)
}

/// Trains the student on `train` (validating on `validation`, or on a held-out fraction of
/// `train`). Progress moves over `span` of the job.
pub fn finetune(
    student: Student,
    train: &Dataset,
    validation: Option<&Dataset>,
    spec: &FinetuneSpec,
    ctl: &dyn Control,
    span: (f64, f64),
) -> Result<Trained, TrainError> {
    let started = std::time::Instant::now();
    let program = Program::build(student.model, student.weights, spec.output.as_deref())?;
    let teacher_program =
        Program::build(student.teacher.0, student.teacher.1, spec.output.as_deref())?;
    let index_of = |name: &str| student.weights.iter().position(|t| t.name == name);
    let indices: Vec<usize> = program
        .params
        .iter()
        .map(|n| index_of(n).ok_or_else(|| TrainError::Failed(format!("no tensor {n:?}"))))
        .collect::<Result<_, _>>()?;
    let dev = Device::Cpu;
    let start_params = params_of(&program, student.weights)?;
    let teacher_params = params_of(&teacher_program, student.teacher.1)?;
    let params: Vec<&Param> = indices.iter().map(|&i| &student.params[i]).collect();
    let masks: Vec<Option<Tensor>> = indices
        .iter()
        .zip(&params)
        .map(|(&i, p)| {
            let fixed: Option<Vec<bool>> = match &p.shared {
                Some(sh) if sh.slots.contains(&u32::MAX) => {
                    Some(sh.slots.iter().map(|&s| s == u32::MAX).collect())
                }
                Some(_) => None,
                None => p.mask.clone(),
            };
            fixed
                .map(|m| {
                    let v: Vec<f32> = m.iter().map(|&z| if z { 0.0 } else { 1.0 }).collect();
                    Tensor::from_vec(v, student.weights[i].shape.as_slice(), &dev)
                })
                .transpose()
        })
        .collect::<Result<_, _>>()?;
    let gathers: Vec<Option<Gather>> = indices
        .iter()
        .zip(&params)
        .map(|(&i, p)| {
            p.shared
                .as_ref()
                .map(|sh| {
                    let slots: Vec<u32> = sh
                        .slots
                        .iter()
                        .map(|&s| if s == u32::MAX { 0 } else { s })
                        .collect();
                    let n = slots.len();
                    Ok::<_, TrainError>(Gather {
                        slots: Tensor::from_vec(slots, n, &dev)?,
                        shape: student.weights[i].shape.clone(),
                    })
                })
                .transpose()
        })
        .collect::<Result<_, _>>()?;
    let factored: Vec<Option<Factored>> = indices
        .iter()
        .zip(&params)
        .map(|(&i, p)| {
            p.factors.as_ref().map(|f| Factored {
                rows: f.rows,
                rank: f.rank,
                cols: f.cols,
                shape: student.weights[i].shape.clone(),
            })
        })
        .collect();
    // The student starts from its weights, masked: its forward pass then sees exactly the
    // compressed model (the pipeline's encoding of those weights).
    let vars: Vec<Var> = start_params
        .iter()
        .zip(&masks)
        .zip(&params)
        .map(|((t, m), p)| {
            let t = match (&p.shared, &p.factors, m) {
                (Some(sh), _, _) => Tensor::from_vec(sh.values.clone(), sh.values.len(), &dev)?,
                (None, Some(f), _) => {
                    let ab: Vec<f32> = f.a.iter().chain(&f.b).copied().collect();
                    let n = ab.len();
                    Tensor::from_vec(ab, n, &dev)?
                }
                (None, None, Some(m)) => (t * m)?,
                (None, None, None) => t.clone(),
            };
            Ok(Var::from_tensor(&t)?)
        })
        .collect::<Result<_, TrainError>>()?;

    // Rows: a held-out fraction, or the validation dataset.
    let train = Rows::new(train, spec.batch_size)?;
    let n = train.n;
    let (train_rows, val_rows, mut rng) = split(n, spec, validation.is_some())?;
    // The augmentation's draws, from the seed too (apart from the shuffles, so that a run
    // without augmentation shuffles as before).
    let mut shift_rng = Rng(spec.seed ^ 0x7368_6966_7400_0000);
    let val_data = match validation {
        Some(v) => Rows::new(v, spec.batch_size)?,
        None => Rows::new(train.data, spec.batch_size)?,
    };
    let val_rows = match validation {
        Some(_) => (0..val_data.n).collect(),
        None => val_rows,
    };
    // The teacher's scores of every row of the training data, by row.
    let all_rows: Vec<usize> = (0..n).collect();
    let teacher_train = all_scores(&teacher_program, &train, &all_rows, &teacher_params)?;
    let width = teacher_train.len() / n.max(1);
    let teacher_val = match validation {
        Some(_) => all_scores(&teacher_program, &val_data, &val_rows, &teacher_params)?,
        None => val_rows
            .iter()
            .flat_map(|&r| teacher_train[r * width..(r + 1) * width].iter().copied())
            .collect(),
    };
    let first = train.feeds(&program, &train_rows[..1])?;
    let student_width = scores(&program, &first, &start_params)?.elem_count();
    if student_width != width {
        return Err(TrainError::Unsupported(format!(
            "the student's output has {student_width} values a row, the teacher's {width}"
        )));
    }
    // Labels drive the metric (and `alpha`) of a Softmax classifier only.
    let labels_of = |d: &Rows, rows: &[usize]| -> Option<Vec<i64>> {
        if program.binary {
            None
        } else {
            d.labels(rows)
        }
    };
    let val_labels = labels_of(&val_data, &val_rows);
    let rms = (train_rows
        .iter()
        .flat_map(|&r| &teacher_train[r * width..(r + 1) * width])
        .map(|v| f64::from(*v).powi(2))
        .sum::<f64>()
        / (train_rows.len() * width).max(1) as f64)
        .sqrt();
    let setup = Setup {
        program: &program,
        spec,
        temperature: spec.temperature.unwrap_or((rms / 4.0).max(1.0)),
        scale: (rms * rms).max(1e-12),
    };
    // The validation metric, and the loss against the teacher on the same rows (which breaks
    // ties of a coarse metric such as top-1 on a few hundred rows).
    let validate = |vars: &[Var]| -> Result<(f64, f64), TrainError> {
        let w = effective(vars, &params, &masks, &gathers, &factored)?;
        let s = all_scores(setup.program, &val_data, &val_rows, &w)?;
        let rows = val_rows.len();
        let m = metric(
            &s,
            &teacher_val,
            rows,
            val_labels.as_deref(),
            spec.loss,
            program.binary,
        );
        let st = Tensor::from_vec(s, (rows, teacher_val.len() / rows.max(1)), &dev)?;
        let tt = Tensor::from_vec(teacher_val.clone(), st.dims(), &dev)?;
        let l = f64::from(setup.loss(&st, &tt, None)?.to_scalar::<f32>()?);
        Ok((m, l))
    };
    let (before, before_loss) = validate(&vars)?;
    // Hints match features of the same name and shape in both (a narrowed layer's differ).
    let hints: Vec<String> = if spec.hint > 0.0 {
        let features = program.features();
        let names: Vec<&str> = features.iter().map(String::as_str).collect();
        let theirs_feeds = train.feeds(&teacher_program, &train_rows[..1])?;
        let ours = program.run(&first, &start_params, &names)?;
        let theirs = teacher_program.run(&theirs_feeds, &teacher_params, &names);
        match theirs {
            Ok(theirs) => features
                .iter()
                .zip(ours.iter().zip(&theirs))
                .filter(|(_, (a, b))| a.dims() == b.dims())
                .map(|(f, _)| f.clone())
                .collect(),
            Err(_) => Vec::new(),
        }
    } else {
        Vec::new()
    };
    // The hint term weighs `hint` times the main loss as the first step measured them.
    let mut hint_scale: Option<f64> = None;
    let mut best = (
        before,
        0usize,
        snapshot(&vars, &masks, &gathers, &factored)?,
        before_loss,
    );
    let mut opt = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: spec.learning_rate,
            weight_decay: spec.weight_decay,
            ..Default::default()
        },
    )?;
    let per_step = train.chunk(spec.batch_size);
    let per_epoch = train_rows.len().div_ceil(per_step);
    let total_steps = (per_epoch * spec.epochs).max(1);
    let warmup = (spec.warmup * total_steps as f64).round() as usize;
    let mut epochs = Vec::new();
    let mut step = 0usize;
    let mut stopped = "epochs";
    let mut since_best = 0;
    'training: for epoch in 1..=spec.epochs {
        let epoch_started = std::time::Instant::now();
        let mut rows = train_rows.clone();
        rng.shuffle(&mut rows);
        let mut loss_sum = 0.0;
        let mut batches = 0;
        for chunk in rows.chunks(per_step) {
            if ctl.cancelled() {
                return Err(TrainError::Cancelled);
            }
            if started.elapsed().as_secs_f64() >= spec.max_seconds {
                stopped = "max_seconds";
                break 'training;
            }
            let lr = if step < warmup {
                spec.learning_rate * (step + 1) as f64 / warmup as f64
            } else {
                let t = (step - warmup) as f64 / (total_steps - warmup).max(1) as f64;
                spec.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            };
            opt.set_learning_rate(lr);
            // Augmentation: each row moved by its own draw, the same for student and teacher.
            let moves: Option<Vec<(isize, isize)>> = (spec.shift > 0).then(|| {
                let span = 2 * spec.shift as u64 + 1;
                let mut draw = || (shift_rng.next() % span) as isize - spec.shift as isize;
                chunk.iter().map(|_| (draw(), draw())).collect()
            });
            let feeds_of = |p: &Program| -> Result<Vec<Tensor>, TrainError> {
                let f = train.feeds(p, chunk)?;
                match &moves {
                    Some(m) => shifted(f, m),
                    None => Ok(f),
                }
            };
            let feeds = feeds_of(&program)?;
            let w = effective(&vars, &params, &masks, &gathers, &factored)?;
            let (s, hint) = if hints.is_empty() {
                (scores(&program, &feeds, &w)?, None)
            } else {
                let mut keep: Vec<&str> =
                    vec![program.logits.as_deref().unwrap_or(&program.output)];
                keep.extend(hints.iter().map(String::as_str));
                let mut got = program.run(&feeds, &w, &keep)?;
                let their_feeds = feeds_of(&teacher_program)?;
                let theirs = teacher_program.run(&their_feeds, &teacher_params, &keep[1..])?;
                let mut h = Tensor::zeros((), candle_core::DType::F32, &dev)?;
                for (a, b) in got[1..].iter().zip(&theirs) {
                    let scale = f64::from(b.sqr()?.mean_all()?.to_scalar::<f32>()?).max(1e-12);
                    h = (h + ((a - b)?.sqr()?.mean_all()? / scale)?)?;
                }
                (got.swap_remove(0), Some((h / hints.len() as f64)?))
            };
            // The teacher's scores: computed once for the stored rows, run again on moved ones.
            let t = if moves.is_some() {
                scores(
                    &teacher_program,
                    &feeds_of(&teacher_program)?,
                    &teacher_params,
                )?
                .reshape(s.dims())?
            } else {
                let t_rows: Vec<f32> = chunk
                    .iter()
                    .flat_map(|&r| teacher_train[r * width..(r + 1) * width].iter().copied())
                    .collect();
                Tensor::from_vec(t_rows, s.dims(), &dev)?
            };
            let labels = labels_of(&train, chunk)
                .map(|l| Tensor::from_vec(l, chunk.len(), &dev))
                .transpose()?;
            let mut loss = setup.loss(&s, &t, labels.as_ref())?;
            if let Some(h) = hint {
                let scale = match hint_scale {
                    Some(s) => s,
                    None => {
                        let (m, v) = (
                            f64::from(loss.to_scalar::<f32>()?),
                            f64::from(h.to_scalar::<f32>()?),
                        );
                        let s = if v > 0.0 && m > 0.0 { m / v } else { 1.0 };
                        hint_scale = Some(s);
                        s
                    }
                };
                loss = (loss + (h * (spec.hint * scale))?)?;
            }
            loss_sum += f64::from(loss.to_scalar::<f32>()?);
            batches += 1;
            opt.backward_step(&loss)?;
            // Pruned weights stay exactly zero (shared values are masked where they are read).
            for ((v, m), g) in vars.iter().zip(&masks).zip(&gathers) {
                if let (Some(m), None) = (m, g) {
                    v.set(&(v.as_tensor() * m)?)?;
                }
            }
            step += 1;
            let f = step as f64 / total_steps as f64;
            ctl.progress(
                span.0 + (span.1 - span.0) * f.min(1.0),
                &format!(
                    "finetune: epoch {epoch}/{}, step {step}/{total_steps}, loss {:.4}",
                    spec.epochs,
                    loss_sum / batches as f64
                ),
            );
            ctl.detail(serde_json::json!({
                "phase": "train",
                "epoch": epoch,
                "epochs": spec.epochs,
                "step": step,
                "steps": total_steps,
                "loss": loss_sum / batches as f64,
                "validation": epochs.last().map(|e: &Epoch| e.validation_metric),
            }));
        }
        let (val, val_loss) = validate(&vars)?;
        epochs.push(Epoch {
            epoch,
            steps: batches,
            train_loss: loss_sum / batches.max(1) as f64,
            validation_metric: val,
            validation_loss: val_loss,
            seconds: epoch_started.elapsed().as_secs_f64(),
        });
        ctl.progress(
            span.0 + (span.1 - span.0) * (step as f64 / total_steps as f64).min(1.0),
            &format!(
                "finetune: epoch {epoch}/{}, validation {val:.4}",
                spec.epochs
            ),
        );
        ctl.detail(serde_json::json!({
            "phase": "train",
            "epoch": epoch,
            "epochs": spec.epochs,
            "step": step,
            "steps": total_steps,
            "loss": epochs.last().map(|e| e.train_loss),
            "validation": val,
        }));
        if val_loss < best.3 {
            best = (
                val,
                epoch,
                snapshot(&vars, &masks, &gathers, &factored)?,
                val_loss,
            );
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= spec.patience {
                stopped = "patience";
                break;
            }
        }
    }
    let (best_metric, best_epoch, values, best_loss) = best;
    let log = serde_json::json!({
        "loss": spec.loss,
        "temperature": setup.temperature,
        "hint": {"weight": spec.hint, "features": hints},
        "shift": spec.shift,
        "rows": {"train": train_rows.len(), "validation": val_rows.len(),
                 "validation_from": if validation.is_some() { "validation_dataset_id" } else { "held out of dataset_id" },
                 "dataset": train.describe()},
        "metric": match (spec.loss, val_labels.is_some(), program.binary) {
            (Loss::Kl, _, true) => "decision_agreement",
            (Loss::Kl, true, false) => "top1",
            (Loss::Kl, false, false) => "agreement",
            _ => "cosine",
        },
        "validation_before": before,
        "best_epoch": best_epoch,
        "best_validation": best_metric,
        "best_validation_loss": best_loss,
        "validation_loss_before": before_loss,
        "stopped": stopped,
        "seconds": started.elapsed().as_secs_f64(),
        "epochs": epochs,
        "parameters": program.params,
    });
    Ok(Trained {
        values: indices.into_iter().zip(values).collect(),
        log,
    })
}

/// The tensors a program reads, in its parameter order, from `tensors` (by name).
fn params_of(program: &Program, tensors: &[ModelTensor]) -> Result<Vec<Tensor>, TrainError> {
    program
        .params
        .iter()
        .map(|name| {
            let t = tensors
                .iter()
                .find(|t| &t.name == name)
                .ok_or_else(|| TrainError::Failed(format!("no tensor {name:?}")))?;
            let v = t
                .to_f32()
                .ok_or_else(|| TrainError::Unsupported(format!("{name:?} is not float")))?;
            Ok(Tensor::from_vec(v, t.shape.as_slice(), &Device::Cpu)?)
        })
        .collect()
}

/// The training and validation rows of a dataset of `n` rows: a held-out fraction (when no
/// validation dataset is given) chosen by the seed, and the generator that then shuffles the
/// epochs.
fn split(
    n: usize,
    spec: &FinetuneSpec,
    separate_validation: bool,
) -> Result<(Vec<usize>, Vec<usize>, Rng), TrainError> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Rng(spec.seed ^ 0x6d70_7472_6169_6e00);
    rng.shuffle(&mut order);
    if separate_validation {
        return Ok((order, Vec::new(), rng));
    }
    if n < 2 {
        return Err(TrainError::Unsupported(
            "finetune needs at least 2 rows".into(),
        ));
    }
    let held = ((n as f64 * spec.validation).round() as usize).clamp(1, n - 1);
    let (v, t) = order.split_at(held);
    let mut v = v.to_vec();
    v.sort_unstable();
    Ok((t.to_vec(), v, rng))
}

/// The RMS of each channel of the values `features` name (value, channel axis;
/// `usize::MAX` for the last) when the model runs on the rows of `data` training learns from
/// (the held-out validation rows left out).
pub fn channel_rms(
    model: &tract_onnx::pb::ModelProto,
    tensors: &[ModelTensor],
    data: &Dataset,
    spec: &FinetuneSpec,
    separate_validation: bool,
    features: &[(String, usize)],
    ctl: &dyn Control,
) -> Result<Vec<Vec<f64>>, TrainError> {
    let data = Rows::new(data, spec.batch_size)?;
    let rows = split(data.n, spec, separate_validation)?.0;
    let program = Program::build(model, tensors, spec.output.as_deref())?;
    let params = params_of(&program, tensors)?;
    let names: Vec<&str> = features.iter().map(|(f, _)| f.as_str()).collect();
    let mut sums: Vec<Vec<f64>> = vec![Vec::new(); features.len()];
    let mut counts = vec![0usize; features.len()];
    for chunk in rows.chunks(data.chunk(256)) {
        if ctl.cancelled() {
            return Err(TrainError::Cancelled);
        }
        let feeds = data.feeds(&program, chunk)?;
        let got = program.run(&feeds, &params, &names)?;
        for (i, (t, (_, axis))) in got.iter().zip(features).enumerate() {
            let dims = t.dims().to_vec();
            let a = if *axis == usize::MAX {
                dims.len().saturating_sub(1)
            } else {
                *axis
            };
            let c = dims.get(a).copied().unwrap_or(1);
            let inner: usize = dims[a + 1..].iter().product();
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            if sums[i].len() != c {
                sums[i] = vec![0.0; c];
            }
            for (j, x) in v.iter().enumerate() {
                sums[i][(j / inner.max(1)) % c] += f64::from(*x).powi(2);
            }
            counts[i] += v.len() / c.max(1);
        }
    }
    Ok(sums
        .into_iter()
        .zip(counts)
        .map(|(s, n)| {
            s.into_iter()
                .map(|x| (x / n.max(1) as f64).sqrt())
                .collect()
        })
        .collect())
}

/// Each parameter's weights as they stand (shared values read through their slots, fixed
/// zeros zero, factors multiplied out).
fn snapshot(
    vars: &[Var],
    masks: &[Option<Tensor>],
    gathers: &[Option<Gather>],
    factored: &[Option<Factored>],
) -> Result<Vec<Vec<f32>>, TrainError> {
    vars.iter()
        .zip(masks)
        .zip(gathers)
        .zip(factored)
        .map(|(((v, m), g), f)| {
            let w = match (g, f) {
                (Some(g), _) => {
                    let w = v.as_tensor().index_select(&g.slots, 0)?;
                    match m {
                        Some(m) => (w * m.flatten_all()?)?,
                        None => w,
                    }
                }
                (None, Some(f)) => f.product(v.as_tensor())?,
                (None, None) => v.as_tensor().clone(),
            };
            Ok(w.flatten_all()?.to_vec1::<f32>()?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The obvious shift: each output pixel looked up with its coordinates clamped.
    fn reference(
        v: &[f32],
        dims: (usize, usize, usize, usize),
        moves: &[(isize, isize)],
    ) -> Vec<f32> {
        let (n, c, h, w) = dims;
        let mut out = vec![0.0; v.len()];
        for r in 0..n {
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        let sy = (y as isize - moves[r].0).max(0).min(h as isize - 1) as usize;
                        let sx = (x as isize - moves[r].1).max(0).min(w as isize - 1) as usize;
                        out[((r * c + ch) * h + y) * w + x] = v[((r * c + ch) * h + sy) * w + sx];
                    }
                }
            }
        }
        out
    }

    proptest! {
        /// `shifted` moves each row of an image feed as the reference does, and leaves feeds
        /// of another rank alone.
        #[test]
        fn shifted_matches_reference(
            n in 1usize..4, c in 1usize..3, h in 1usize..7, w in 1usize..7,
            seed in any::<u64>(),
        ) {
            let mut rng = Rng(seed);
            let v: Vec<f32> = (0..n * c * h * w).map(|_| (rng.next() % 1000) as f32).collect();
            let moves: Vec<(isize, isize)> = (0..n)
                .map(|_| ((rng.next() % 7) as isize - 3, (rng.next() % 7) as isize - 3))
                .collect();
            let image = Tensor::from_vec(v.clone(), (n, c, h, w), &Device::Cpu).unwrap();
            let flat = Tensor::from_vec(v.clone(), n * c * h * w, &Device::Cpu).unwrap();
            let got = shifted(vec![image, flat], &moves).unwrap();
            prop_assert_eq!(
                got[0].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                reference(&v, (n, c, h, w), &moves)
            );
            prop_assert_eq!(got[1].to_vec1::<f32>().unwrap(), v);
        }
    }

    #[test]
    fn shift_is_bounded() {
        let block = |shift: u64| serde_json::json!({"finetune": {"dataset_id": Uuid::nil().to_string(), "shift": shift}});
        assert_eq!(FinetuneSpec::parse(&block(2)).unwrap().unwrap().shift, 2);
        let e = FinetuneSpec::parse(&block(9)).unwrap_err();
        assert!(e.contains("finetune.shift"), "{e}");
    }
}
