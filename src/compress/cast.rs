//! Casts to 16-bit floats (round to nearest even, as IEEE and PyTorch do).

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CastType {
    Float16,
    Bfloat16,
}

impl CastType {
    pub fn name(self) -> &'static str {
        match self {
            CastType::Float16 => "float16",
            CastType::Bfloat16 => "bfloat16",
        }
    }
}

/// The 16-bit patterns of `values` in the target type.
pub fn cast_bits(values: &[f32], to: CastType) -> Vec<u16> {
    match to {
        CastType::Float16 => {
            let mut out = vec![f16::ZERO; values.len()];
            out.convert_from_f32_slice(values);
            out.iter().map(|v| v.to_bits()).collect()
        }
        CastType::Bfloat16 => {
            let mut out = vec![bf16::ZERO; values.len()];
            out.convert_from_f32_slice(values);
            out.iter().map(|v| v.to_bits()).collect()
        }
    }
}

/// The f32 values the 16-bit patterns stand for.
pub fn widen(bits: &[u16], from: CastType) -> Vec<f32> {
    match from {
        CastType::Float16 => bits.iter().map(|&b| f16::from_bits(b).to_f32()).collect(),
        CastType::Bfloat16 => bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect(),
    }
}

/// The slow, obvious version: one element at a time.
pub fn cast_bits_reference(values: &[f32], to: CastType) -> Vec<u16> {
    values
        .iter()
        .map(|&v| match to {
            CastType::Float16 => f16::from_f32(v).to_bits(),
            CastType::Bfloat16 => bf16::from_f32(v).to_bits(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    struct CastProblem {
        values: Vec<f32>,
        to: CastType,
    }

    impl CastProblem {
        fn check(&self) {
            // Exact: the bulk conversion and the scalar one agree bit for bit.
            assert_eq!(
                cast_bits(&self.values, self.to),
                cast_bits_reference(&self.values, self.to)
            );
            // Approximate: relative error within half an ulp of the target type.
            let eps = match self.to {
                CastType::Float16 => 2f32.powi(-11),
                CastType::Bfloat16 => 2f32.powi(-8),
            };
            let back = widen(&cast_bits(&self.values, self.to), self.to);
            for (&v, &b) in self.values.iter().zip(&back) {
                if v.abs() > 1e-4 && v.abs() < 6.0e4 {
                    assert!((v - b).abs() <= v.abs() * eps * 1.0001, "{v} -> {b}");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn cast_matches_reference(values in prop::collection::vec(-7.0e4f32..7.0e4, 0..300), bf in any::<bool>()) {
            CastProblem { values, to: if bf { CastType::Bfloat16 } else { CastType::Float16 } }.check();
        }
    }
}
