//! k-means on one tensor of a model, for `benches/kmeans_vs_sklearn.py`: prints one JSON line
//! per k with the inertia (float64 sum of squared distances to the nearest centroid) and the
//! median wall time of the fit plus assignment.
//!
//! usage: cargo bench --bench kmeans -- MODEL TENSOR K[,K...] [ALGORITHM]

use modelpress::compress::kmeans::{self, Algorithm};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [model, tensor, ks, rest @ ..] = args.as_slice() else {
        eprintln!("usage: kmeans MODEL TENSOR K[,K...] [auto|optimal|lloyd]");
        std::process::exit(2);
    };
    let algorithm = match rest.first().map(String::as_str) {
        None | Some("auto") => Algorithm::Auto,
        Some("optimal") => Algorithm::Optimal,
        Some("lloyd") => Algorithm::Lloyd,
        Some(other) => {
            eprintln!("unknown algorithm {other}");
            std::process::exit(2);
        }
    };
    let set = modelpress::formats::read_path(std::path::Path::new(model)).expect("model");
    let t = set
        .tensors
        .iter()
        .find(|t| &t.name == tensor)
        .expect("tensor");
    let values = t.to_f32().expect("float tensor");
    for k in ks.split(',').map(|k| k.parse::<usize>().expect("k")) {
        let mut times = Vec::new();
        let mut result = None;
        for _ in 0..5 {
            let start = Instant::now();
            let fit = kmeans::fit(&values, k, algorithm);
            let codes = kmeans::assign(&values, &fit.centroids);
            times.push(start.elapsed().as_secs_f64());
            result = Some((fit, codes));
        }
        times.sort_by(f64::total_cmp);
        let (fit, codes) = result.expect("ran");
        println!(
            "{}",
            serde_json::json!({
                "tensor": tensor,
                "n": values.len(),
                "k": k,
                "inertia": kmeans::inertia(&values, &fit.centroids, &codes),
                "seconds": times[times.len() / 2],
                "algorithm": fit.algorithm,
                "iterations": fit.iterations,
            })
        );
    }
}
