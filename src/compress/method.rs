//! What a compression method is to the pipeline, and the registry of methods.
//!
//! Each method lives in one file: its parameters (serde, `deny_unknown_fields`, so a typo is
//! a 422 that names the field), its label, its size estimate (the plan), the orderings it
//! refuses (checked at submit time) and its apply. The form it leaves a tensor in (how it
//! decodes and is stored) is a [`super::form::Form`] in the same file. [`METHODS`] is the one
//! list the spec parser, the OpenAPI enum and the README table follow.

use super::activations::ActivationSpec;
use super::coding::{DecodeError, Repr, Section};
use super::form::Encoding;
use super::gptq::Hessian;
use super::CompressError;
use crate::model::Tensor;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::sync::Arc;

/// What a step does to a tensor's stored form, which decides the orderings it allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Sets weights to exact zeros; the tensor keeps its form (re-zeroed).
    Prune,
    /// Replaces the tensor's form by one with fewer bits per weight.
    Encode,
    /// Replaces the tensor's form by float32 factors.
    Factorize,
    /// Entropy-codes the archive form; the values do not change.
    Entropy,
}

/// Working state of one selected tensor. Invariant: `encoding`, when present, decodes to
/// exactly `values`.
pub struct Working {
    pub values: Vec<f32>,
    pub encoding: Option<Encoding>,
    /// Labels of the steps that ran on this tensor.
    pub methods: Vec<String>,
    pub huffman: bool,
    /// A pruning step ran on this tensor (Deep Compression's "P" column applies).
    pub pruned: bool,
    /// Steps that left the tensor alone, with the reason.
    pub skipped: Vec<String>,
    pub details: Map<String, Value>,
    /// What calibration measured of the tensor's inputs, or why nothing was.
    pub calibration: Result<Arc<Hessian>, String>,
    /// Static int8: the last encoding step asked for activation ranges by this spec.
    pub activations: Option<ActivationSpec>,
    /// A calibrated step rounded to nearest instead, and why (a `calibration_missing`
    /// warning).
    pub calibration_missed: Option<String>,
}

impl Working {
    pub fn new(values: Vec<f32>) -> Working {
        Working {
            values,
            encoding: None,
            methods: Vec::new(),
            huffman: false,
            pruned: false,
            skipped: Vec::new(),
            details: Map::new(),
            calibration: Err(NO_CALIBRATION.into()),
            activations: None,
            calibration_missed: None,
        }
    }

    /// A calibrated step found no statistics for `t`: it rounds to nearest, and says so.
    pub fn calibration_missed(&mut self, t: &Tensor, why: &str) {
        self.details.insert(
            "calibration".into(),
            Value::String(format!("round to nearest: {why}")),
        );
        self.calibration_missed = Some(format!("{:?}: {why}", t.name));
    }

    /// After a pruning step: make the encoding agree with the new zeros.
    pub fn rezero(&mut self, t: &Tensor, label: &str) -> Result<(), CompressError> {
        if let Some(e) = &mut self.encoding {
            e.form_mut()
                .rezero(&self.values, &t.shape)
                .map_err(|why| refused_in_run(t, label, why))?;
        }
        Ok(())
    }
}

/// Why a tensor has no calibration statistics when the run had no calibration data.
pub const NO_CALIBRATION: &str = "the job has no calibration data";

/// What a step needs measured on calibration data before it runs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Needs {
    /// The second moment of each selected weight's inputs (GPTQ).
    pub hessian: bool,
    /// Ranges of the activations around each selected weight's consumers (static int8).
    pub activations: Option<ActivationSpec>,
}

/// What a step did to one tensor.
pub enum Applied {
    Ran,
    /// Left the tensor as it was, for this reason (e.g. a factorization that saves nothing).
    Skipped(String),
}

/// One step of a pipeline.
pub trait Method: std::fmt::Debug + Send + Sync {
    /// The step as the report names it, e.g. `quantize(int8,symmetric,channel)`.
    fn label(&self) -> String;
    fn kind(&self) -> Kind;
    /// What the step needs measured on calibration data (nothing, for most).
    fn needs(&self) -> Needs {
        Needs::default()
    }
    /// Bytes of the tensor's stored form in `model.<ext>` when this is the last step that
    /// sets its form; `pruned_first` when a pruning step runs on it before. None: known only
    /// after running (the plan then gives the bytes before, an upper bound).
    fn estimate(&self, t: &Tensor, pruned_first: bool) -> Option<u64>;
    /// Why fine-tuning cannot train through the form this step leaves (None: it can, by
    /// fake quantization or a fixed mask).
    fn untrainable(&self) -> Option<&'static str> {
        if self.kind() == Kind::Factorize {
            Some("factors are not trained yet")
        } else if self.needs().hessian {
            Some("fine-tuning re-quantizes by rounding to nearest, not GPTQ")
        } else if self.needs().activations.is_some() {
            Some("static activation ranges are not measured again after fine-tuning yet")
        } else {
            None
        }
    }
    /// Whether fine-tuning trains the form it leaves as factors (A·B, each trained).
    fn trains_factors(&self) -> bool {
        false
    }
    /// This step with each tensor's rank fixed (name -> rank): run again on trained factors'
    /// product, it gives factors of the same rank instead of choosing anew. None for steps
    /// without a rank.
    fn with_ranks(
        &self,
        _ranks: &std::collections::HashMap<String, usize>,
    ) -> Option<std::sync::Arc<dyn Method>> {
        None
    }
    /// Whether fine-tuning trains the form it leaves as shared values (a codebook whose
    /// entries train with their indices fixed, as Deep Compression fine-tunes centroids)
    /// rather than by fake quantization.
    fn shares_values(&self) -> bool {
        false
    }
    /// Whether the form it leaves can hold an exact zero (binary weights cannot).
    fn has_zero(&self) -> bool {
        true
    }
    /// Why this step cannot follow `earlier` (the last step that set the tensor's form).
    fn refuses_after(&self, earlier: &dyn Method) -> Option<String> {
        refusal(self.kind(), earlier)
    }
    /// For steps that decide over every selected tensor at once (global pruning): runs
    /// before [`Method::apply`] is called on each.
    fn apply_jointly(
        &self,
        _tensors: &[&Tensor],
        _work: &mut [&mut Working],
    ) -> Result<(), CompressError> {
        Ok(())
    }
    /// Applies the step to one tensor.
    fn apply(&self, t: &Tensor, w: &mut Working) -> Result<Applied, CompressError>;
}

/// The orderings every method shares: nothing but another factorization (or entropy coding)
/// follows a factorization, and pruning needs a form that holds zeros.
pub fn refusal(kind: Kind, earlier: &dyn Method) -> Option<String> {
    match (kind, earlier.kind()) {
        (Kind::Encode, Kind::Factorize) => {
            Some(format!("{} (factors stay float32)", earlier.label()))
        }
        (Kind::Prune, Kind::Factorize) => Some(format!("{}; prune first", earlier.label())),
        (Kind::Prune, _) if !earlier.has_zero() => {
            Some(format!("{} (it has no zero)", earlier.label()))
        }
        (Kind::Prune | Kind::Encode | Kind::Factorize | Kind::Entropy, _) => None,
    }
}

pub fn refused_in_run(t: &Tensor, label: &str, why: impl std::fmt::Display) -> CompressError {
    CompressError::InvalidSpec(format!("tensor {:?}: {label} cannot follow {why}", t.name))
}

/// Builds a method from its parameters (the step's object without the common fields);
/// `at` turns a parameter name into its path in the spec, e.g. `pipeline[2].bits`.
pub type Parse =
    fn(&Map<String, Value>, &dyn Fn(&str) -> String) -> Result<Box<dyn Method>, CompressError>;

/// A method as the registry lists it.
pub struct Registration {
    pub name: &'static str,
    /// One line for the README and the OpenAPI description.
    pub about: &'static str,
    /// The file that holds it.
    pub file: &'static str,
    pub parse: Parse,
    /// The archive encodings of the forms it leaves, with their decoders.
    pub forms: &'static [Decoder],
}

/// Rebuilds a tensor of `shape` from its archive entry and sections.
pub type Decode = fn(&Repr, &[usize], &Section<'_, '_>) -> Result<Vec<f32>, DecodeError>;

/// Rebuilds a tensor's values from a form's archive entry (`model.mpz`).
pub struct Decoder {
    /// The entry's `encoding`.
    pub encoding: &'static str,
    pub decode: Decode,
}

/// Every method, in the order the documentation lists them.
pub static METHODS: &[Registration] = &[
    super::prune::METHOD,
    super::quantize::METHOD,
    super::kmeans::METHOD,
    super::ternary::BINARY,
    super::ternary::TERNARY,
    super::nf4::METHOD,
    super::cast::METHOD,
    super::lowrank::METHOD,
    super::separable::SEPARABLE,
    super::separable::TUCKER2,
    super::huffman::METHOD,
];

/// The decoder of an archive encoding, from the method that registers it.
pub fn decoder(encoding: &str) -> Option<&'static Decoder> {
    METHODS
        .iter()
        .flat_map(|m| m.forms)
        .find(|d| d.encoding == encoding)
}

pub fn find(name: &str) -> Option<&'static Registration> {
    METHODS.iter().find(|m| m.name == name)
}

/// "prune, quantize, … or huffman", for messages.
pub fn names() -> String {
    let names: Vec<&str> = METHODS.iter().map(|m| m.name).collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.join(""),
    }
}

pub fn spec_err(field: &str, msg: impl std::fmt::Display) -> CompressError {
    CompressError::InvalidSpec(format!("{field}: {msg}"))
}

/// Deserializes a method's parameters; a refusal names the field by its path in the spec.
pub fn params<T: DeserializeOwned>(
    obj: &Map<String, Value>,
    method: &str,
    at: &dyn Fn(&str) -> String,
) -> Result<T, CompressError> {
    serde_path_to_error::deserialize::<_, T>(Value::Object(obj.clone())).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if let Some(rest) = inner.strip_prefix("unknown field `") {
            let field = rest.split('`').next().unwrap_or_default();
            return spec_err(&at(field), format!("unknown field for method {method:?}"));
        }
        let field = path.trim_start_matches('.');
        if field.is_empty() {
            spec_err(&at("method"), format!("{method}: {inner}"))
        } else {
            spec_err(&at(field), inner)
        }
    })
}

/// An integer parameter within `lo..=hi`.
pub fn int_in(v: Option<u64>, field: &str, lo: u64, hi: u64) -> Result<Option<u64>, CompressError> {
    match v {
        Some(b) if !(lo..=hi).contains(&b) => Err(spec_err(
            field,
            format!("must be an integer from {lo} to {hi}"),
        )),
        v => Ok(v),
    }
}

/// A fraction in [0, 1] (`closed`) or [0, 1).
pub fn fraction(v: Option<f64>, field: &str, closed: bool) -> Result<Option<f64>, CompressError> {
    match v {
        Some(s)
            if !(if closed {
                (0.0..=1.0).contains(&s)
            } else {
                (0.0..1.0).contains(&s)
            }) =>
        {
            Err(spec_err(
                field,
                if closed {
                    "must be a number in [0, 1]"
                } else {
                    "must be a number in [0, 1)"
                },
            ))
        }
        v => Ok(v),
    }
}
