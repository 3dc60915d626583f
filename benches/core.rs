//! Throughput of the compression core against a plain copy of the same bytes, and of each
//! fast path against its reference. `cargo bench --bench core` prints a Markdown table.
//! Medians of several runs: the machine is noisy.

use modelpress::compress::{huffman, kmeans, lowrank, pack, prune, quantize};
use std::hint::black_box;
use std::time::Instant;

fn median_secs(runs: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn weights(n: usize) -> Vec<f32> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect()
}

fn main() {
    let (rows, cols) = (4096usize, 4096usize);
    let w = weights(rows * cols);
    let bytes = (w.len() * 4) as f64;
    let gbs = |s: f64| bytes / s / 1e9;
    let copy = median_secs(9, || {
        let v = black_box(&w).clone();
        black_box(v);
    });
    let q_rows = median_secs(7, || {
        black_box(quantize::quantize(
            black_box(&w),
            &[rows, cols],
            8,
            quantize::Scheme::Symmetric,
            Some(0),
        ));
    });
    let q_cols = median_secs(7, || {
        black_box(quantize::quantize(
            black_box(&w),
            &[rows, cols],
            8,
            quantize::Scheme::Symmetric,
            Some(1),
        ));
    });
    let q_affine = median_secs(7, || {
        black_box(quantize::quantize(
            black_box(&w),
            &[rows, cols],
            8,
            quantize::Scheme::Affine,
            Some(0),
        ));
    });
    let q_ref = median_secs(3, || {
        black_box(quantize::quantize_reference(
            black_box(&w),
            &[rows, cols],
            8,
            quantize::Scheme::Symmetric,
            Some(0),
        ));
    });
    let prune_fast = median_secs(5, || {
        let mut v = w.clone();
        let k = prune::prune_count(v.len(), 0.5);
        prune::prune_smallest(&mut [v.as_mut_slice()], k);
        black_box(v);
    });
    let prune_ref = median_secs(3, || {
        let mut v = w.clone();
        let k = prune::prune_count(v.len(), 0.5);
        prune::prune_smallest_reference(&mut [v.as_mut_slice()], k);
        black_box(v);
    });
    // k-means on the whole tensor (16 M values): sorted Lloyd, 16 and 256 clusters.
    let km16 = median_secs(3, || {
        let f = kmeans::fit(black_box(&w), 16, kmeans::Algorithm::Lloyd);
        black_box(kmeans::assign(&w, &f.centroids));
    });
    let km256 = median_secs(3, || {
        let f = kmeans::fit(black_box(&w), 256, kmeans::Algorithm::Lloyd);
        black_box(kmeans::assign(&w, &f.centroids));
    });
    // int4 codes of the tensor: packing, and canonical Huffman coding of the same symbols.
    let q4 = quantize::quantize(&w, &[rows, cols], 4, quantize::Scheme::Symmetric, Some(0));
    let symbols: Vec<u32> = q4
        .codes
        .iter()
        .map(|&c| (i32::from(c) + 8) as u32)
        .collect();
    let pack4 = median_secs(7, || {
        black_box(pack::pack(black_box(&symbols), 4));
    });
    let pack4_ref = median_secs(3, || {
        black_box(pack::pack_reference(black_box(&symbols), 4));
    });
    let lengths = huffman::code_lengths(&huffman::histogram(&symbols, 16));
    let coded = huffman::encode(&symbols, &lengths).expect("encode");
    let huff_enc = median_secs(3, || {
        black_box(huffman::encode(black_box(&symbols), &lengths).expect("encode"));
    });
    let huff_dec = median_secs(3, || {
        black_box(huffman::decode(black_box(&coded), &lengths, symbols.len()).expect("decode"));
    });
    // Truncated SVD of a 1024×1024 block: exact and randomized, rank 64.
    let block = &w[..1024 * 1024];
    let svd_exact = median_secs(3, || {
        black_box(
            lowrank::factorize(
                block,
                1024,
                1024,
                lowrank::RankRule::Rank(64),
                lowrank::SvdAlgorithm::Exact,
            )
            .expect("svd"),
        );
    });
    let svd_rand = median_secs(3, || {
        black_box(
            lowrank::factorize(
                block,
                1024,
                1024,
                lowrank::RankRule::Rank(64),
                lowrank::SvdAlgorithm::Randomized,
            )
            .expect("svd"),
        );
    });
    println!(
        "tensor: {rows}x{cols} f32 ({:.0} MiB), median of 3-9 runs, one thread",
        bytes / (1 << 20) as f64
    );
    println!();
    println!("| operation | median s | GB/s (f32 in) | vs plain copy |");
    println!("|---|---:|---:|---:|");
    println!(
        "| plain copy (Vec clone) | {copy:.4} | {:.2} | 1.00 |",
        gbs(copy)
    );
    for (name, s) in [
        (
            "quantize int8 symmetric, per channel, axis 0 (Conv/Linear)",
            q_rows,
        ),
        (
            "quantize int8 symmetric, per channel, last axis (MatMul)",
            q_cols,
        ),
        ("quantize int8 affine, per channel, axis 0", q_affine),
        ("quantize reference (element by element)", q_ref),
        ("prune 50% (select_nth on packed keys)", prune_fast),
        ("prune 50% reference (full sort)", prune_ref),
        ("k-means k=16, sorted Lloyd (fit + assign)", km16),
        ("k-means k=256, sorted Lloyd (fit + assign)", km256),
        ("pack int4 codes", pack4),
        ("pack int4 codes, reference (bit by bit)", pack4_ref),
        ("Huffman encode int4 codes", huff_enc),
        ("Huffman decode int4 codes", huff_dec),
    ] {
        println!("| {name} | {s:.4} | {:.2} | {:.2} |", gbs(s), copy / s);
    }
    println!();
    println!(
        "fast/reference speed-up: quantize {:.1}x, prune {:.1}x, pack {:.1}x",
        q_ref / q_rows,
        prune_ref / prune_fast,
        pack4_ref / pack4
    );
    println!(
        "int4 codes: {:.3} bits/weight packed, {:.3} after Huffman",
        4.0,
        coded.len() as f64 * 8.0 / symbols.len() as f64
    );
    println!(
        "SVD of a 1024x1024 block, rank 64: exact {svd_exact:.3} s, randomized {svd_rand:.3} s ({:.1}x)",
        svd_exact / svd_rand
    );
}
