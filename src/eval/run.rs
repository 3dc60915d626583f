//! Runs an ONNX model in-process with tract on a dataset in the shared cases' convention
//! (`.npz`, arrays named after the graph inputs, samples on axis 0, optional `labels`) and
//! collects one output over every row.

use crate::model::{DType, Tensor as ModelTensor};
use std::collections::HashMap;
use tract_onnx::prelude::*;

type TractTensor = Tensor;

/// How rows are fed (`case.json` → `eval.feed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// Slices of this many rows (the model's batch axis is dynamic).
    Batched(usize),
    /// One row at a time (the model fixes its batch to 1).
    PerSample,
    /// The arrays as stored, in one run (stateful models fed a whole sequence).
    Whole,
}

impl Feed {
    pub fn parse(s: &str) -> Option<Feed> {
        Some(match s {
            "batched" => Feed::Batched(64),
            "per_sample" => Feed::PerSample,
            "whole" => Feed::Whole,
            _ => return None,
        })
    }
}

/// The feeds to try in order: the one asked for; else whole when the arrays do not share
/// axis 0, else slices of `batch` rows and then one row at a time (for models that fix their
/// batch to 1).
pub fn feeds_to_try(data: &Dataset, asked: Option<Feed>, batch: usize) -> Vec<Feed> {
    let rows_shared = data
        .describe()
        .map(|(_, rows)| rows.is_some())
        .unwrap_or(false);
    match asked {
        Some(f) => vec![f],
        None if !rows_shared => vec![Feed::Whole],
        None => vec![Feed::Batched(batch), Feed::PerSample],
    }
}

/// Model inputs by name, and the labels when the file has them.
pub struct Dataset {
    pub arrays: Vec<ModelTensor>,
    pub labels: Option<Vec<i64>>,
}

impl Dataset {
    /// Reads an `.npz` in the convention; `labels` must be int64 [N].
    pub fn from_npz(bytes: &[u8]) -> Result<Dataset, String> {
        Self::from_npz_with(bytes, &Default::default()).map_err(|e| e.to_string())
    }

    /// [`Dataset::from_npz`] within the upload's inflation caps.
    pub fn from_npz_with(
        bytes: &[u8],
        inflation: &crate::formats::limits::Inflation,
    ) -> Result<Dataset, crate::formats::FormatError> {
        use crate::formats::FormatError;
        let set = crate::formats::npz::read_npz_with(bytes, inflation)?;
        let mut arrays = Vec::new();
        let mut labels = None;
        for t in set.tensors {
            if t.name == "labels" {
                if t.dtype != DType::I64 || t.shape.len() != 1 {
                    return Err(FormatError::invalid(format!(
                        "labels must be int64 [N], not {} {:?}",
                        t.dtype.name(),
                        t.shape
                    )));
                }
                labels = Some(
                    t.data
                        .chunks_exact(8)
                        .map(|c| {
                            i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
                        })
                        .collect(),
                );
            } else {
                arrays.push(t);
            }
        }
        Ok(Dataset { arrays, labels })
    }
}

/// What an uploaded dataset holds, for its catalog row.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ArrayInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

impl Dataset {
    /// The arrays (labels left out), their common row count when they share axis 0, and
    /// whether labels exist. Refuses a dataset with no array, or labels that do not match
    /// the rows.
    pub fn describe(&self) -> Result<(Vec<ArrayInfo>, Option<u64>), String> {
        if self.arrays.is_empty() {
            return Err("the .npz holds no input array (only `labels`, or nothing)".into());
        }
        let infos: Vec<ArrayInfo> = self
            .arrays
            .iter()
            .map(|t| ArrayInfo {
                name: t.name.clone(),
                dtype: t.dtype.name().into(),
                shape: t.shape.clone(),
            })
            .collect();
        let first = self.arrays[0].shape.first().copied();
        let rows = first
            .filter(|n| self.arrays.iter().all(|t| t.shape.first() == Some(n)))
            .map(|n| n as u64);
        if let Some(l) = &self.labels {
            if rows != Some(l.len() as u64) {
                return Err(format!(
                    "{} labels, but the arrays do not all have {} rows on axis 0",
                    l.len(),
                    l.len()
                ));
            }
        }
        Ok((infos, rows))
    }
}

/// One output over every row, as float32.
pub struct Outputs {
    pub name: String,
    pub values: Vec<f32>,
    /// Rows (axis 0) of the collected output.
    pub rows: usize,
    /// Seconds spent running the plans (loading and planning left out).
    pub run_seconds: f64,
}

/// Why a run produced no outputs.
#[derive(Debug, Clone, PartialEq)]
pub enum RunFailure {
    /// `tick` asked to stop (the job was cancelled).
    Stopped,
    Failed(String),
}

impl std::fmt::Display for RunFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunFailure::Stopped => f.write_str("stopped"),
            RunFailure::Failed(m) => f.write_str(m),
        }
    }
}

impl From<String> for RunFailure {
    fn from(m: String) -> Self {
        RunFailure::Failed(m)
    }
}

fn datum(d: DType) -> Option<DatumType> {
    Some(match d {
        DType::F32 => DatumType::F32,
        DType::F64 => DatumType::F64,
        DType::F16 => DatumType::F16,
        DType::I8 => DatumType::I8,
        DType::U8 => DatumType::U8,
        DType::I16 => DatumType::I16,
        DType::U16 => DatumType::U16,
        DType::I32 => DatumType::I32,
        DType::U32 => DatumType::U32,
        DType::I64 => DatumType::I64,
        DType::U64 => DatumType::U64,
        DType::Bool => DatumType::Bool,
        DType::BF16 => return None,
    })
}

/// Rows `lo..hi` of an array as a tract tensor (the whole array when `rows` is None).
fn slice(t: &ModelTensor, rows: Option<(usize, usize)>) -> Result<TractTensor, String> {
    let dt =
        datum(t.dtype).ok_or_else(|| format!("{}: bfloat16 inputs are not supported", t.name))?;
    let (shape, bytes) = match rows {
        None => (t.shape.clone(), &t.data[..]),
        Some((lo, hi)) => {
            let n = *t
                .shape
                .first()
                .ok_or_else(|| format!("{} has no sample axis", t.name))?;
            let row = t.data.len() / n.max(1);
            let mut shape = t.shape.clone();
            shape[0] = hi - lo;
            (shape, &t.data[lo * row..hi * row])
        }
    };
    macro_rules! typed {
        ($t:ty, $n:expr) => {{
            let v: Vec<$t> = bytes
                .chunks_exact($n)
                .map(|c| <$t>::from_le_bytes(c.try_into().unwrap_or([0; $n])))
                .collect();
            TractTensor::from_shape(&shape, &v)
        }};
    }
    match dt {
        DatumType::F32 => typed!(f32, 4),
        DatumType::F64 => typed!(f64, 8),
        DatumType::F16 => {
            let v: Vec<f16> = bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]))
                .collect();
            TractTensor::from_shape(&shape, &v)
        }
        DatumType::I8 => typed!(i8, 1),
        DatumType::U8 => typed!(u8, 1),
        DatumType::I16 => typed!(i16, 2),
        DatumType::U16 => typed!(u16, 2),
        DatumType::I32 => typed!(i32, 4),
        DatumType::U32 => typed!(u32, 4),
        DatumType::I64 => typed!(i64, 8),
        DatumType::U64 => typed!(u64, 8),
        _ => {
            let v: Vec<bool> = bytes.iter().map(|b| *b != 0).collect();
            TractTensor::from_shape(&shape, &v)
        }
    }
    .map_err(|e| e.to_string())
}

/// The first output the graph declares as a float tensor (models often pass their int64
/// inputs through as the first output: paraphrase-MiniLM-L3's `output` is its token ids).
fn first_float_output(model: &[u8], names: &[String]) -> usize {
    use prost::Message;
    let Ok(proto) = tract_onnx::pb::ModelProto::decode(model) else {
        return 0;
    };
    let float = |v: &tract_onnx::pb::ValueInfoProto| {
        matches!(
            v.r#type.as_ref().and_then(|t| t.value.as_ref()),
            Some(tract_onnx::pb::type_proto::Value::TensorType(t))
                if [1, 10, 11, 16].contains(&t.elem_type)
        )
    };
    proto
        .graph
        .iter()
        .flat_map(|g| g.output.iter())
        .find(|v| float(v))
        .and_then(|v| names.iter().position(|n| *n == v.name))
        .unwrap_or(0)
}

/// Which values a run hands over for each slice of rows.
#[derive(Debug, Clone, Copy)]
pub enum Select<'a> {
    /// One declared output by name (default: the first float output).
    Output(Option<&'a str>),
    /// Values of the graph by their ONNX names: intermediate values and graph inputs too (a
    /// calibration reads what each weight's consumer sees).
    Values(&'a [String]),
}

/// What a run of slices did: the names of the values handed over and the seconds spent in
/// the plans (loading and planning left out).
pub struct Ran {
    pub names: Vec<String>,
    pub run_seconds: f64,
}

/// Receives each slice's selected values with their names.
pub type Sink<'a> = dyn FnMut(&[String], &[TValue]) -> Result<(), String> + 'a;

/// Runs `model` (ONNX bytes) on `data` slice by slice and hands the selected values of each
/// slice to `sink`, with their names. Inputs are matched to arrays by name. `tick(done, total)` is called
/// before each slice of rows; it returns false to stop.
pub fn run_slices(
    model: &[u8],
    data: &Dataset,
    feed: Feed,
    select: Select,
    tick: &mut dyn FnMut(usize, usize) -> bool,
    sink: &mut Sink,
) -> Result<Ran, RunFailure> {
    let mut base = tract_onnx::onnx()
        .model_for_read(&mut std::io::Cursor::new(model))
        .map_err(|e| format!("tract cannot load the model: {e}"))?;
    let input_names: Vec<String> = base
        .input_outlets()
        .map_err(|e| e.to_string())?
        .iter()
        .map(|o| base.node(o.node).name.clone())
        .collect();
    let names = match select {
        Select::Output(output) => {
            let output_names: Vec<String> = base
                .output_outlets()
                .map_err(|e| e.to_string())?
                .iter()
                .map(|o| {
                    base.outlet_label(*o)
                        .map(str::to_string)
                        .unwrap_or_else(|| base.node(o.node).name.clone())
                })
                .collect();
            let out_index = match output {
                None => first_float_output(model, &output_names),
                Some(name) => output_names.iter().position(|n| n == name).ok_or_else(|| {
                    format!("the model has no output {name:?} (outputs: {output_names:?})")
                })?,
            };
            let outlet = base.output_outlets().map_err(|e| e.to_string())?[out_index];
            base.select_output_outlets(&[outlet])
                .map_err(|e| e.to_string())?;
            vec![output_names[out_index].clone()]
        }
        Select::Values(values) => {
            let mut outlets = Vec::with_capacity(values.len());
            for v in values {
                let outlet = base
                    .find_outlet_label(v)
                    .or_else(|| base.node_by_name(v).ok().map(|n| OutletId::new(n.id, 0)))
                    .ok_or_else(|| format!("the model has no value {v:?}"))?;
                outlets.push(outlet);
            }
            base.select_output_outlets(&outlets)
                .map_err(|e| e.to_string())?;
            values.to_vec()
        }
    };
    let mut arrays = Vec::with_capacity(input_names.len());
    for name in &input_names {
        arrays.push(
            data.arrays
                .iter()
                .find(|t| &t.name == name)
                .ok_or_else(|| format!("the dataset has no array for the graph input {name:?}"))?,
        );
    }
    let count = match feed {
        Feed::Whole => 1,
        _ => {
            let n = arrays
                .first()
                .and_then(|t| t.shape.first())
                .copied()
                .unwrap_or(0);
            if let Some(t) = arrays.iter().find(|t| t.shape.first() != Some(&n)) {
                return Err(RunFailure::Failed(format!(
                    "array {:?} has {:?} rows; the others {n}",
                    t.name,
                    t.shape.first()
                )));
            }
            n
        }
    };
    let step = match feed {
        Feed::Batched(b) => b.max(1),
        Feed::PerSample => 1,
        Feed::Whole => 1,
    };
    // One plan per distinct feed shape (a full batch and the last, shorter one).
    type Plan = std::sync::Arc<TypedRunnableModel>;
    let mut plans: HashMap<Vec<Vec<usize>>, Plan> = HashMap::new();
    let mut run_seconds = 0.0;
    let mut lo = 0;
    while lo < count {
        if !tick(lo, count) {
            return Err(RunFailure::Stopped);
        }
        let hi = (lo + step).min(count);
        let range = (feed != Feed::Whole).then_some((lo, hi));
        let inputs: Vec<TractTensor> = arrays
            .iter()
            .map(|t| slice(t, range))
            .collect::<Result<_, _>>()?;
        let key: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
        if !plans.contains_key(&key) {
            let mut m = base.clone();
            for (i, t) in inputs.iter().enumerate() {
                m.set_input_fact(i, InferenceFact::dt_shape(t.datum_type(), t.shape()))
                    .map_err(|e| e.to_string())?;
            }
            let plan = m
                .into_optimized()
                .and_then(|m| m.into_runnable())
                .map_err(|e| format!("tract cannot plan the model: {e}"))?;
            plans.insert(key.clone(), plan);
        }
        let plan = &plans[&key];
        let feed_values: TVec<TValue> = inputs.into_iter().map(TValue::from).collect();
        let started = std::time::Instant::now();
        let out = plan
            .run(feed_values)
            .map_err(|e| format!("tract cannot run the model: {e}"))?;
        run_seconds += started.elapsed().as_secs_f64();
        if out.len() < names.len() {
            return Err(RunFailure::Failed(
                "the model gave fewer outputs than it declares".into(),
            ));
        }
        sink(&names, &out)?;
        lo = hi;
    }
    Ok(Ran { names, run_seconds })
}

/// Runs `model` (ONNX bytes) on `data`; `output` names the output to collect (default: the
/// first float output). Inputs are matched to arrays by name. `tick(done, total)` is called
/// before each slice of rows; it returns false to stop.
pub fn run(
    model: &[u8],
    data: &Dataset,
    feed: Feed,
    output: Option<&str>,
    tick: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Outputs, RunFailure> {
    let mut values = Vec::new();
    let mut rows = 0usize;
    let ran = run_slices(
        model,
        data,
        feed,
        Select::Output(output),
        tick,
        &mut |names, out| {
            let t = out[0]
                .cast_to::<f32>()
                .map_err(|e| format!("output {:?} is not numeric: {e}", names[0]))?;
            rows += t.shape().first().copied().unwrap_or(1);
            values.extend(
                t.to_plain_array_view::<f32>()
                    .map_err(|e| e.to_string())?
                    .iter()
                    .copied(),
            );
            Ok(())
        },
    )?;
    Ok(Outputs {
        name: ran.names[0].clone(),
        values,
        rows,
        run_seconds: ran.run_seconds,
    })
}
