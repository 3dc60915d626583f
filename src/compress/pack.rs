//! Fixed-width bit packing of small unsigned symbols (int4, int2, binary codes, codebook
//! indices): symbol i takes bits [i·w, (i+1)·w) of the stream, least significant bit first
//! within each little-endian byte.

/// Bits needed to hold symbols `0..alphabet` (at least 1).
pub fn width_for(alphabet: usize) -> u8 {
    let mut w = 1u8;
    while (1usize << w) < alphabet && w < 32 {
        w += 1;
    }
    w
}

/// Bytes that `count` symbols of `width` bits take.
pub fn packed_len(count: usize, width: u8) -> usize {
    (count * width as usize).div_ceil(8)
}

/// Packs symbols (each `< 2^width`, `width` in 1..=16).
pub fn pack(symbols: &[u32], width: u8) -> Vec<u8> {
    let w = u32::from(width);
    if w == 8 {
        return symbols.iter().map(|&s| s as u8).collect();
    }
    let mut out = Vec::with_capacity(packed_len(symbols.len(), width));
    let mut acc: u64 = 0;
    let mut filled = 0u32;
    let mask = (1u64 << w) - 1;
    for &s in symbols {
        acc |= (u64::from(s) & mask) << filled;
        filled += w;
        while filled >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            filled -= 8;
        }
    }
    if filled > 0 {
        out.push(acc as u8);
    }
    out
}

/// Unpacks `count` symbols; None when `bytes` is too short or `width` is out of range.
pub fn unpack(bytes: &[u8], width: u8, count: usize) -> Option<Vec<u32>> {
    if !(1..=16).contains(&width) || bytes.len() < packed_len(count, width) {
        return None;
    }
    let w = u32::from(width);
    if w == 8 {
        return Some(bytes[..count].iter().map(|&b| u32::from(b)).collect());
    }
    let mask = (1u64 << w) - 1;
    let mut out = Vec::with_capacity(count);
    let mut acc: u64 = 0;
    let mut filled = 0u32;
    let mut next = bytes.iter();
    while out.len() < count {
        while filled < w {
            acc |= u64::from(*next.next()?) << filled;
            filled += 8;
        }
        out.push((acc & mask) as u32);
        acc >>= w;
        filled -= w;
    }
    Some(out)
}

/// The slow, obvious version: one bit at a time.
pub fn pack_reference(symbols: &[u32], width: u8) -> Vec<u8> {
    let mut out = vec![0u8; packed_len(symbols.len(), width)];
    for (i, &s) in symbols.iter().enumerate() {
        for b in 0..width as usize {
            if s >> b & 1 == 1 {
                let bit = i * width as usize + b;
                out[bit / 8] |= 1 << (bit % 8);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Symbols that fit a width, and the width.
    #[derive(Debug, Clone)]
    struct PackProblem {
        width: u8,
        symbols: Vec<u32>,
    }

    fn problem() -> impl Strategy<Value = PackProblem> {
        (1u8..=16).prop_flat_map(|width| {
            prop::collection::vec(0u32..(1 << width), 0..200)
                .prop_map(move |symbols| PackProblem { width, symbols })
        })
    }

    proptest! {
        #[test]
        fn pack_matches_reference_and_round_trips(p in problem()) {
            let fast = pack(&p.symbols, p.width);
            prop_assert_eq!(&fast, &pack_reference(&p.symbols, p.width));
            prop_assert_eq!(unpack(&fast, p.width, p.symbols.len()), Some(p.symbols.clone()));
        }
    }

    #[test]
    fn int4_packs_two_per_byte() {
        assert_eq!(pack(&[0x1, 0xF, 0x3], 4), vec![0xF1, 0x03]);
        assert_eq!(unpack(&[0xF1], 4, 3), None);
    }
}
