//! Named tolerances for comparing a fast path with its reference (convention 10).

/// How close two results must be.
#[derive(Debug, Clone, Copy)]
pub enum Tolerance {
    /// Bit for bit.
    Exact,
    /// Round-to-nearest quantization: |a - b| ≤ step/2, plus f32 rounding of the dequantize.
    HalfStep(f32),
}

impl Tolerance {
    pub fn assert_i8(self, a: &[i8], b: &[i8]) {
        assert_eq!(a, b, "{self:?}");
    }

    pub fn assert_close(self, expected: f32, got: f32) {
        match self {
            Tolerance::Exact => assert_eq!(expected.to_bits(), got.to_bits()),
            Tolerance::HalfStep(step) => {
                let bound = step * 0.5 * (1.0 + 1e-5) + expected.abs() * f32::EPSILON * 2.0;
                assert!(
                    (expected - got).abs() <= bound,
                    "{expected} vs {got}: error {} over half step {}",
                    (expected - got).abs(),
                    step * 0.5
                );
            }
        }
    }
}
