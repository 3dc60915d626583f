//! Per-tensor and total figures for `report.json`.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct TensorReport {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    pub role: String,
    /// The steps applied, in order, e.g. `["prune(0.5)", "quantize(int8,symmetric,channel)"]`.
    pub methods: Vec<String>,
    /// Why a step left this tensor alone (e.g. factors not smaller than the matrix).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    /// The channel axis used by per-channel quantization.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization_axis: Option<usize>,
    pub parameters: u64,
    pub nonzero: u64,
    pub sparsity: f64,
    /// True on-disk bits per weight in `model.<ext>` (codes + scales + zero points).
    pub bits_per_weight: f64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// True bytes of the tensor's sections in `model.mpz`.
    pub archive_bytes: u64,
    /// How the archive stores it: layout, Huffman, bits per weight before and after coding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coding: Option<super::coding::CodingStats>,
    pub relative_l2_error: f64,
    /// Signal-to-quantization-noise ratio; null when the tensor is reproduced exactly.
    pub sqnr_db: Option<f64>,
    pub max_abs_error: f64,
    /// Method-specific figures: structure kept, k-means inertia, ranks, parameters and
    /// multiply-adds before and after.
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub details: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Totals {
    pub tensors: u64,
    pub tensors_compressed: u64,
    pub parameters: u64,
    pub nonzero_parameters: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub mean_bits_per_weight: f64,
    /// Σ `archive_bytes`: the tensors' share of `model.mpz`.
    pub archive_tensor_bytes: u64,
}

impl Totals {
    /// Counts one tensor: its parameters, the non-zero ones, and its bytes before, after and
    /// in the archive.
    pub fn add(
        &mut self,
        parameters: u64,
        nonzero: u64,
        (before, after, archive): (u64, u64, u64),
    ) {
        self.tensors += 1;
        self.parameters += parameters;
        self.nonzero_parameters += nonzero;
        self.bytes_before += before;
        self.bytes_after += after;
        self.archive_tensor_bytes += archive;
    }
}

/// Deep Compression's columns over all tensors (Han et al., Table 1): bytes and ratio after
/// pruning (sparse, relative indices, f32 values), after quantization (fixed-width codes,
/// codebooks and scales included) and after Huffman coding. Untouched tensors count at their
/// own size in every column; graph and headers are not tensor bytes.
#[derive(Debug, Clone, Serialize, Default)]
pub struct StageTotals {
    pub bytes_original: u64,
    pub bytes_after_pruning: u64,
    pub bytes_after_quantization: u64,
    pub bytes_after_huffman: u64,
    pub ratio_after_pruning: f64,
    pub ratio_after_quantization: f64,
    pub ratio_after_huffman: f64,
}

impl StageTotals {
    pub fn add(&mut self, original: u64, s: &super::coding::StageBytes) {
        self.bytes_original += original;
        self.bytes_after_pruning += s.pruned;
        self.bytes_after_quantization += s.quantized;
        self.bytes_after_huffman += s.huffman;
    }
    pub fn finish(mut self) -> StageTotals {
        let r = |b: u64| {
            if b > 0 {
                self.bytes_original as f64 / b as f64
            } else {
                0.0
            }
        };
        self.ratio_after_pruning = r(self.bytes_after_pruning);
        self.ratio_after_quantization = r(self.bytes_after_quantization);
        self.ratio_after_huffman = r(self.bytes_after_huffman);
        self
    }
}

/// Something a user must know about a job that still succeeded; clients switch on `code`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Warning {
    /// Stable: `nothing_compressed` (no tensor was changed), `weight_error_high` (a tensor's
    /// SQNR is below [`WEIGHT_SQNR_FLOOR_DB`], or an output channel that held weights decodes
    /// to all zeros without a pruning step: the model is likely broken), `dense_fallback` (an
    /// encoded tensor stays dense in the deployable file), `slower_than_original` (model.onnx
    /// ran more than 1.5x and 1 ms slower than the original in tract), `finetune_no_gain` (no
    /// epoch of fine-tuning lowered the validation loss: the untrained weights are stored).
    pub code: String,
    pub message: String,
}

impl Warning {
    pub fn new(code: &str, message: impl Into<String>) -> Warning {
        Warning {
            code: code.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The input's format name, filled in by the caller (the core never sees containers).
    pub format: String,
    pub steps: Vec<serde_json::Value>,
    pub tensors: Vec<TensorReport>,
    pub totals: Totals,
    pub deep_compression: StageTotals,
    pub notes: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<Warning>,
}

/// Error figures of `after` against `before`.
pub struct ErrorStats {
    pub relative_l2_error: f64,
    pub sqnr_db: Option<f64>,
    pub max_abs_error: f64,
}

/// Below this weight SQNR a compressed tensor is called likely broken (`weight_error_high`):
/// binary and ternary weights without retraining land there (mnist-8 ternary 6.2 dB, top-1
/// 0.92 against 0.98), int4 per channel does not (12.6 dB and above on the shared cases).
pub const WEIGHT_SQNR_FLOOR_DB: f64 = 10.0;

/// Output channels (along `axis`) that held a nonzero weight before and decode to all zeros
/// after: a scale too coarse for them (silero_vad's `encoder.3.weight` under one int8 scale
/// per tensor). Slow and obvious: one pass, per-channel flags.
pub fn collapsed_channels(before: &[f32], after: &[f32], shape: &[usize], axis: usize) -> usize {
    let layout = super::quantize::ChannelLayout::new(shape, Some(axis));
    let ch = layout.channels.max(1);
    let (mut had, mut has) = (vec![false; ch], vec![false; ch]);
    for (b, (x, y)) in before
        .chunks(layout.inner.max(1))
        .zip(after.chunks(layout.inner.max(1)))
        .enumerate()
    {
        let c = b % ch;
        had[c] |= x.iter().any(|v| *v != 0.0);
        has[c] |= y.iter().any(|v| *v != 0.0);
    }
    had.iter().zip(&has).filter(|(h, n)| **h && !**n).count()
}

pub fn error_stats(before: &[f32], after: &[f32]) -> ErrorStats {
    let mut signal = 0f64;
    let mut noise = 0f64;
    let mut max_abs = 0f64;
    for (&a, &b) in before.iter().zip(after) {
        let (a, b) = (f64::from(a), f64::from(b));
        signal += a * a;
        noise += (a - b) * (a - b);
        max_abs = max_abs.max((a - b).abs());
    }
    ErrorStats {
        relative_l2_error: if signal > 0.0 {
            (noise / signal).sqrt()
        } else if noise > 0.0 {
            // Infinite, but JSON has no infinity.
            f64::MAX
        } else {
            0.0
        },
        sqnr_db: (noise > 0.0 && signal > 0.0).then(|| 10.0 * (signal / noise).log10()),
        max_abs_error: max_abs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapsed_channels_counts_channels_that_lost_every_weight() {
        // [3 channels, 2] along axis 0, and the same along axis 1 of its transpose.
        let before = [1.0, 0.5, 0.0, 0.0, 2.0, -1.0];
        let after = [0.0, 0.0, 0.0, 0.0, 2.0, 0.0];
        assert_eq!(collapsed_channels(&before, &after, &[3, 2], 0), 1);
        let before_t = [1.0, 0.0, 2.0, 0.5, 0.0, -1.0];
        let after_t = [0.0, 0.0, 2.0, 0.0, 0.0, 0.0];
        assert_eq!(collapsed_channels(&before_t, &after_t, &[2, 3], 1), 1);
        assert_eq!(collapsed_channels(&before, &before, &[3, 2], 0), 0);
    }
}
