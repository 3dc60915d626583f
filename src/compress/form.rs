//! The form a method leaves a tensor in. A [`Form`] knows how to decode itself, how to stay
//! exact when a later step prunes, how it is stored (its parts in `model.<ext>` with the
//! description a loader reads, and its payload in `model.mpz`), what fine-tuning trains in
//! it, and how it lowers itself into `model.onnx` (through [`super::lower::Graph`]). Each
//! form is implemented in the file of the method that makes it; an [`Encoding`] holds any
//! of them, so a new form needs no change outside its file.

use super::coding::{CodingStats, Payload, StageBytes};
use super::lower::Graph;
use super::lowrank::Factors;
use crate::model::{DType, Role, Tensor};
use serde_json::Value;

/// How a compressed tensor is stored: one method's form. Invariant: decoding gives exactly
/// the working values.
#[derive(Debug)]
pub struct Encoding(Box<dyn Form>);

impl Clone for Encoding {
    fn clone(&self) -> Encoding {
        Encoding(self.0.boxed())
    }
}

impl Encoding {
    pub fn new(form: impl Form + Clone + 'static) -> Encoding {
        Encoding(Box::new(form))
    }
    pub fn form(&self) -> &dyn Form {
        self.0.as_ref()
    }
    pub fn form_mut(&mut self) -> &mut dyn Form {
        self.0.as_mut()
    }
    pub fn decode(&self, shape: &[usize]) -> Vec<f32> {
        self.form().decode(shape)
    }
}

/// A form as a new box (what [`Encoding`]'s `Clone` needs of a trait object).
pub trait Boxed {
    fn boxed(&self) -> Box<dyn Form>;
}

impl<T: Form + Clone + 'static> Boxed for T {
    fn boxed(&self) -> Box<dyn Form> {
        Box::new(self.clone())
    }
}

/// A tensor's stored form in `model.<ext>`.
pub struct Stored {
    /// Bytes of every part.
    pub bytes: u64,
    /// The quantization axis, for the report.
    pub axis: Option<usize>,
    /// What a loader needs to rebuild the dense weight (`__metadata__` / the archive comment).
    pub description: Value,
}

/// What fine-tuning updates in a tensor of a form.
#[derive(Debug, Clone)]
pub enum Trained {
    /// The dense weight, seen through the form (fake quantization): the pipeline encodes
    /// the trained weight again.
    Dense,
    /// The low-rank factors themselves; the pipeline factorizes their product again at the
    /// same rank.
    Factors(Factors),
    /// The shared values (a codebook) with each weight's slot fixed.
    Shared(super::SharedValues),
}

pub trait Form: std::fmt::Debug + Send + Sync + Boxed {
    /// The dense values, bit for bit the working values of the run.
    fn decode(&self, shape: &[usize]) -> Vec<f32>;
    /// What fine-tuning updates in a tensor of this form.
    fn trained(&self, shape: &[usize]) -> Trained;
    /// A later pruning step zeroed some of `values`: make the form agree, or say why it
    /// cannot hold them.
    fn rezero(&mut self, values: &[f32], shape: &[usize]) -> Result<(), String>;
    /// Appends the form's parts for `model.<ext>`.
    fn store(&self, t: &Tensor, parts: &mut Parts) -> Stored;
    /// The form's payload in `model.mpz`; `huffman` allows entropy coding, `pruned` says a
    /// pruning step ran (for the Deep Compression stage sizes).
    fn payload(
        &self,
        values: &[f32],
        huffman: bool,
        pruned: bool,
    ) -> (Payload, Option<CodingStats>, StageBytes);
    /// Why the form cannot go into `model.onnx` for a weight of `shape` in a model of
    /// `opset` (the weight then stays dense there, and the report says why).
    fn deploy_refusal(&self, _shape: &[usize], _opset: i64) -> Option<String> {
        None
    }
    /// Writes the form into `model.onnx` through `g`; returns the form's name for the report
    /// (e.g. `Cast+Mul`, `unpack(uint4)+Gather(codebook)`).
    fn lower(&self, g: &mut dyn Graph, shape: &[usize]) -> String;
}

/// The tensors of `model.<ext>` being written; parts of tensor `base` are named
/// `base.__suffix`.
pub struct Parts<'a> {
    pub tensors: &'a mut Vec<Tensor>,
    pub base: &'a str,
}

impl Parts<'_> {
    pub fn name(&self, suffix: &str) -> String {
        format!("{}.__{suffix}", self.base)
    }
    /// Appends a part; returns its bytes.
    pub fn push(&mut self, name: String, dtype: DType, shape: Vec<usize>, data: Vec<u8>) -> u64 {
        let n = data.len() as u64;
        self.tensors.push(Tensor {
            name,
            dtype,
            shape,
            data,
            role: Role::Other,
            output_axis: None,
        });
        n
    }
    /// Appends float32 values as part `base.__suffix`; returns its name and bytes.
    pub fn push_f32(&mut self, suffix: &str, shape: Vec<usize>, v: &[f32]) -> (String, u64) {
        let name = self.name(suffix);
        let n = self.push(name.clone(), DType::F32, shape, f32_le(v));
        (name, n)
    }
}

pub fn f32_le(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
