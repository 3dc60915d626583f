//! Whether a dataset fits a model's graph inputs: every input has an array of its name, its
//! dtype and rank, and the same size on every axis the graph fixes. Axis 0 is the sample
//! axis when rows are fed in slices (a graph may fix it to 1: rows then go one at a time),
//! and must match too when the arrays are fed whole.

use super::run::{ArrayInfo, Feed};
use crate::formats::GraphInput;

fn shape_text(shape: &[Option<u64>]) -> String {
    let axes: Vec<String> = shape
        .iter()
        .map(|d| d.map_or("?".to_string(), |v| v.to_string()))
        .collect();
    format!("[{}]", axes.join(", "))
}

/// Every difference between the dataset and the inputs, or Ok. `rows` is the arrays'
/// common axis-0 length (None when they differ); `feed` the job's choice, if it made one.
pub fn fits(
    inputs: &[GraphInput],
    arrays: &[ArrayInfo],
    rows: Option<u64>,
    feed: Option<Feed>,
) -> Result<(), Vec<String>> {
    let whole = match feed {
        Some(Feed::Whole) => true,
        Some(_) => false,
        None => rows.is_none(),
    };
    let mut diffs = Vec::new();
    if !whole && rows.is_none() {
        diffs.push(
            "the arrays do not share a row count on axis 0, so they cannot be fed in rows \
             (use \"feed\": \"whole\")"
                .to_string(),
        );
    }
    for input in inputs {
        let wanted = || {
            format!(
                "{} {}",
                input.dtype.as_deref().unwrap_or("?"),
                input.shape.as_deref().map_or("[…]".into(), shape_text)
            )
        };
        let Some(a) = arrays.iter().find(|a| a.name == input.name) else {
            diffs.push(format!(
                "no array {:?} for the model's input {:?} ({})",
                input.name,
                input.name,
                wanted()
            ));
            continue;
        };
        if let Some(d) = input.dtype.as_deref().filter(|d| *d != a.dtype) {
            diffs.push(format!(
                "{:?} is {} in the dataset; the model takes {d}",
                a.name, a.dtype
            ));
        }
        let Some(shape) = input.shape.as_deref() else {
            continue;
        };
        if shape.len() != a.shape.len() {
            diffs.push(format!(
                "{:?} has shape {:?} (rank {}) in the dataset; the model takes {} (rank {})",
                a.name,
                a.shape,
                a.shape.len(),
                shape_text(shape),
                shape.len()
            ));
            continue;
        }
        for (axis, (want, have)) in shape.iter().zip(&a.shape).enumerate() {
            if axis == 0 && !whole {
                continue;
            }
            if let Some(w) = want.filter(|w| *w != *have as u64) {
                diffs.push(format!(
                    "{:?} has {have} on axis {axis} in the dataset; the model takes {w} ({})",
                    a.name,
                    shape_text(shape)
                ));
            }
        }
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(diffs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(name: &str, dtype: &str, shape: &[Option<u64>]) -> GraphInput {
        GraphInput {
            name: name.into(),
            dtype: Some(dtype.into()),
            shape: Some(shape.to_vec()),
        }
    }
    fn array(name: &str, dtype: &str, shape: &[usize]) -> ArrayInfo {
        ArrayInfo {
            name: name.into(),
            dtype: dtype.into(),
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn the_shared_cases_conventions_fit() {
        // mnist8: batch fixed to 1, 2,000 rows fed one at a time.
        let mnist = [input(
            "Input3",
            "float32",
            &[Some(1), Some(1), Some(28), Some(28)],
        )];
        let rows = [array("Input3", "float32", &[2000, 1, 28, 28])];
        assert_eq!(fits(&mnist, &rows, Some(2000), None), Ok(()));
        // silero: arrays of different lengths fed whole; the fixed state shapes must match.
        let silero = [
            input("input", "float32", &[None, Some(576)]),
            input("h", "float32", &[Some(1), Some(1), Some(128)]),
        ];
        let whole = [
            array("input", "float32", &[1875, 576]),
            array("h", "float32", &[1, 1, 128]),
        ];
        assert_eq!(fits(&silero, &whole, None, None), Ok(()));
        let bad_state = [
            array("input", "float32", &[1875, 576]),
            array("h", "float32", &[2, 1, 128]),
        ];
        let e = fits(&silero, &bad_state, None, None).unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(e[0].contains("\"h\" has 2 on axis 0"), "{e:?}");
    }

    #[test]
    fn every_difference_is_named() {
        let inputs = [
            input("ids", "int64", &[None, None]),
            input("mask", "int64", &[None, None]),
            input("x", "float32", &[None, Some(64)]),
        ];
        let arrays = [
            array("ids", "int32", &[10, 7]),
            array("x", "float32", &[10, 63]),
        ];
        let e = fits(&inputs, &arrays, Some(10), None).unwrap_err();
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].contains("\"ids\" is int32") && e[0].contains("int64"));
        assert!(e[1].contains("no array \"mask\""));
        assert!(e[2].contains("has 63 on axis 1") && e[2].contains("takes 64"));
        let e = fits(
            &inputs[2..],
            &[array("x", "float32", &[10])],
            Some(10),
            None,
        )
        .unwrap_err();
        assert!(e[0].contains("rank 1") && e[0].contains("rank 2"), "{e:?}");
        let e = fits(
            &inputs[2..],
            &[array("x", "float32", &[10, 64])],
            None,
            Some(Feed::PerSample),
        )
        .unwrap_err();
        assert!(e[0].contains("do not share a row count"), "{e:?}");
    }
}
