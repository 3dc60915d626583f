//! A convolution's input as the rows its weight multiplies (im2col): one row per output
//! position, holding the C·∏kernel inputs of that position's patch in the weight's order
//! (channel, then each kernel axis), zeros where the patch covers padding.

use super::consumers::{ConvGeometry, Pads};

/// (pad before, output length) of one spatial axis.
fn axis(
    input: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
    pads: &Pads,
    i: usize,
) -> (usize, usize) {
    let span = (kernel - 1) * dilation + 1;
    match pads {
        Pads::Explicit { begin, end } => {
            let (b, e) = (begin[i], end[i]);
            let padded = input + b + e;
            let out = if padded >= span {
                (padded - span) / stride + 1
            } else {
                0
            };
            (b, out)
        }
        Pads::SameUpper | Pads::SameLower => {
            let out = input.div_ceil(stride);
            let total = ((out.saturating_sub(1)) * stride + span).saturating_sub(input);
            let before = match pads {
                Pads::SameUpper => total / 2,
                _ => total - total / 2,
            };
            (before, out)
        }
    }
}

/// The patches of `x` (shape [N, C, L] or [N, C, H, W]), row-major [N·positions, patch].
pub fn im2col(x: &[f32], shape: &[usize], g: &ConvGeometry) -> Result<Vec<f32>, String> {
    let spatial = g.kernel.len();
    if shape.len() != spatial + 2 || shape[1] != g.channels {
        return Err(format!(
            "its input has shape {shape:?}, not [N, {}, …] with {spatial} spatial axes",
            g.channels
        ));
    }
    // A 1-D convolution is a 2-D one of height 1.
    let (h, w) = if spatial == 1 {
        (1, shape[2])
    } else {
        (shape[2], shape[3])
    };
    let (kh, kw) = if spatial == 1 {
        (1, g.kernel[0])
    } else {
        (g.kernel[0], g.kernel[1])
    };
    let at = |v: &[usize], two: usize, one: usize| if spatial == 1 { one } else { v[two] };
    let (sh, sw) = (at(&g.strides, 0, 1), g.strides[spatial - 1]);
    let (dh, dw) = (at(&g.dilations, 0, 1), g.dilations[spatial - 1]);
    let (pad_h, oh) = if spatial == 1 {
        (0, 1)
    } else {
        axis(h, kh, sh, dh, &g.pads, 0)
    };
    let (pad_w, ow) = axis(w, kw, sw, dw, &g.pads, spatial - 1);
    let (n, c) = (shape[0], shape[1]);
    let patch = c * kh * kw;
    let mut out = vec![0f32; n * oh * ow * patch];
    for b in 0..n {
        for oy in 0..oh {
            for ox in 0..ow {
                let row = ((b * oh + oy) * ow + ox) * patch;
                for ci in 0..c {
                    let plane = (b * c + ci) * h * w;
                    for ky in 0..kh {
                        let y = (oy * sh + ky * dh) as isize - pad_h as isize;
                        if y < 0 || y >= h as isize {
                            continue;
                        }
                        for kx in 0..kw {
                            let xx = (ox * sw + kx * dw) as isize - pad_w as isize;
                            if xx < 0 || xx >= w as isize {
                                continue;
                            }
                            out[row + (ci * kh + ky) * kw + kx] =
                                x[plane + y as usize * w + xx as usize];
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A convolution computed as patches · weight equals the direct sum, for explicit and
    /// SAME padding, strides and dilations.
    #[test]
    fn patches_times_weight_is_the_convolution() {
        let (n, c, h, w, o) = (2usize, 3usize, 7usize, 6usize, 4usize);
        let x: Vec<f32> = (0..n * c * h * w)
            .map(|i| ((i * 37 % 23) as f32) - 11.0)
            .collect();
        for (kernel, strides, dilations, pads) in [
            (vec![3, 3], vec![1, 1], vec![1, 1], Pads::SameUpper),
            (vec![2, 3], vec![2, 1], vec![1, 2], Pads::SameLower),
            (
                vec![3, 2],
                vec![1, 2],
                vec![1, 1],
                Pads::Explicit {
                    begin: vec![1, 0],
                    end: vec![2, 1],
                },
            ),
        ] {
            let g = ConvGeometry {
                channels: c,
                kernel: kernel.clone(),
                strides: strides.clone(),
                dilations: dilations.clone(),
                pads: pads.clone(),
            };
            let wt: Vec<f32> = (0..o * g.patch_len())
                .map(|i| ((i * 13 % 7) as f32) - 3.0)
                .collect();
            let p = im2col(&x, &[n, c, h, w], &g).unwrap();
            let (pad_h, oh) = axis(h, kernel[0], strides[0], dilations[0], &pads, 0);
            let (pad_w, ow) = axis(w, kernel[1], strides[1], dilations[1], &pads, 1);
            for b in 0..n {
                for oc in 0..o {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let mut direct = 0f32;
                            for ci in 0..c {
                                for ky in 0..kernel[0] {
                                    for kx in 0..kernel[1] {
                                        let y = (oy * strides[0] + ky * dilations[0]) as isize
                                            - pad_h as isize;
                                        let xx = (ox * strides[1] + kx * dilations[1]) as isize
                                            - pad_w as isize;
                                        if y >= 0 && y < h as isize && xx >= 0 && xx < w as isize {
                                            direct += x
                                                [((b * c + ci) * h + y as usize) * w + xx as usize]
                                                * wt[((oc * c + ci) * kernel[0] + ky) * kernel[1]
                                                    + kx];
                                        }
                                    }
                                }
                            }
                            let row =
                                &p[((b * oh + oy) * ow + ox) * g.patch_len()..][..g.patch_len()];
                            let via: f32 = row
                                .iter()
                                .zip(&wt[oc * g.patch_len()..])
                                .map(|(a, b)| a * b)
                                .sum();
                            assert_eq!(direct, via, "{pads:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn same_padding_keeps_the_size() {
        // mnist-8: 28×28, 5×5 kernel, SAME_UPPER: pads 2 each side, 28 positions.
        assert_eq!(axis(28, 5, 1, 1, &Pads::SameUpper, 0), (2, 28));
        // An even kernel puts the odd pad at the end (upper) or the start (lower).
        assert_eq!(axis(10, 4, 1, 1, &Pads::SameUpper, 0), (1, 10));
        assert_eq!(axis(10, 4, 1, 1, &Pads::SameLower, 0), (2, 10));
    }
}
