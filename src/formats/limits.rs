//! Caps applied to every parsed model. Each length read from a file is checked against
//! these before anything is allocated (convention 8).

/// Most tensors one model may hold. Real files hold hundreds to a few thousand (a large
/// language model's shard about a thousand); every tensor costs memory in the inventory and
/// in a job whatever its size, so a file of a million empty tensors is refused, not held.
pub const MAX_TENSORS: usize = 100_000;
/// Largest safetensors header: a hundred thousand entries of ~120 bytes with room for the
/// free-form `__metadata__` (the `safetensors` crate itself allows 100 MB).
pub const MAX_SAFETENSORS_HEADER_BYTES: usize = 32 << 20;
pub use crate::model::{MAX_ELEMENTS, MAX_NAME_BYTES, MAX_RANK};
/// Largest .npy header (numpy itself never writes more than a few hundred bytes).
pub const MAX_NPY_HEADER_BYTES: usize = 1 << 20;
/// Largest uncompressed .npz member: bounds zip bombs.
pub const MAX_NPZ_MEMBER_BYTES: u64 = 16 << 30;
/// Largest ratio between an .npz member's declared size and its compressed size: deflate
/// cannot exceed ~1032:1, so anything above that is a lie.
pub const MAX_DEFLATE_RATIO: u64 = 1100;

/// What a compressed upload (.npz) may inflate to: all members together, in bytes and as a
/// ratio to the file's size. The server sets them from its configuration; a decompression
/// bomb is refused before its members are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inflation {
    pub max_bytes: u64,
    pub max_ratio: u64,
}

impl Default for Inflation {
    fn default() -> Self {
        Inflation {
            max_bytes: MAX_NPZ_MEMBER_BYTES,
            max_ratio: MAX_DEFLATE_RATIO,
        }
    }
}

/// Refuses a file that gives two tensors (or arrays) one name: a reader would keep one of
/// them and drop the other without a word (an .npz's second member, a safetensors header's
/// last key, a second ONNX initializer). `what` says where, e.g. "npz member".
pub fn unique_names<'a>(
    names: impl IntoIterator<Item = &'a str>,
    what: &str,
) -> Result<(), super::FormatError> {
    let mut seen = std::collections::HashSet::new();
    for n in names {
        if !seen.insert(n) {
            // A hostile name can be long: say enough of it to find it.
            let shown: String = n.chars().take(200).collect();
            let more = if shown.len() < n.len() { "…" } else { "" };
            return Err(super::FormatError::invalid(format!(
                "two {what}s are named {shown:?}{more}; names must be unique"
            )));
        }
    }
    Ok(())
}
