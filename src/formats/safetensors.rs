//! safetensors, through the `safetensors` crate (which validates the header, offsets and
//! overlaps itself; see its `Metadata::validate`).

use super::limits::{MAX_SAFETENSORS_HEADER_BYTES, MAX_TENSORS};
use super::{Container, DType, Format, FormatError, Tensor, TensorSet};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::HashMap;

fn dtype_from(d: Dtype) -> Result<DType, FormatError> {
    Ok(match d {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        Dtype::I8 => DType::I8,
        Dtype::U8 => DType::U8,
        Dtype::I16 => DType::I16,
        Dtype::U16 => DType::U16,
        Dtype::I32 => DType::I32,
        Dtype::U32 => DType::U32,
        Dtype::I64 => DType::I64,
        Dtype::U64 => DType::U64,
        Dtype::BOOL => DType::Bool,
        other => {
            return Err(FormatError::Unsupported(format!(
                "safetensors dtype {other:?}"
            )))
        }
    })
}

fn dtype_to(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F64 => Dtype::F64,
        DType::I8 => Dtype::I8,
        DType::U8 => Dtype::U8,
        DType::I16 => Dtype::I16,
        DType::U16 => Dtype::U16,
        DType::I32 => Dtype::I32,
        DType::U32 => Dtype::U32,
        DType::I64 => Dtype::I64,
        DType::U64 => Dtype::U64,
        DType::Bool => Dtype::BOOL,
    }
}

/// The keys of a JSON object in file order, a repeated key kept each time (serde's maps
/// and the safetensors crate keep only the last). Read before anything else parses the
/// header, it stops at the tensor cap: a header of a million entries is refused having
/// held a hundred thousand names, not a million parsed entries three times over.
struct HeaderKeys(Vec<String>);

impl<'de> serde::Deserialize<'de> for HeaderKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = HeaderKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<HeaderKeys, A::Error> {
                let (mut keys, mut tensors) = (Vec::new(), 0usize);
                while let Some(k) = m.next_key::<String>()? {
                    m.next_value::<serde::de::IgnoredAny>()?;
                    tensors += usize::from(k != "__metadata__");
                    keys.push(k);
                    if tensors > MAX_TENSORS {
                        return Err(serde::de::Error::custom(format!(
                            "too many tensors (at most {MAX_TENSORS})"
                        )));
                    }
                }
                Ok(HeaderKeys(keys))
            }
        }
        d.deserialize_map(Keys)
    }
}

/// The header's JSON text: its length (the file's first 8 bytes) is checked against the
/// file and [`MAX_SAFETENSORS_HEADER_BYTES`] before it is read.
fn header(bytes: &[u8]) -> Result<&[u8], FormatError> {
    let len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        .ok_or_else(|| {
            FormatError::invalid("safetensors: shorter than its 8-byte header length")
        })?;
    if len > MAX_SAFETENSORS_HEADER_BYTES as u64 {
        return Err(FormatError::invalid(format!(
            "safetensors: a {len}-byte header (at most {MAX_SAFETENSORS_HEADER_BYTES})"
        )));
    }
    bytes.get(8..8 + len as usize).ok_or_else(|| {
        FormatError::invalid(format!(
            "safetensors: a {len}-byte header in a shorter file"
        ))
    })
}

pub fn read(bytes: &[u8]) -> Result<TensorSet, FormatError> {
    let keys: HeaderKeys = serde_json::from_slice(header(bytes)?)
        .map_err(|e| FormatError::invalid(format!("safetensors header: {e}")))?;
    super::limits::unique_names(keys.0.iter().map(String::as_str), "safetensors header key")?;
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| FormatError::invalid(format!("safetensors: {e}")))?;
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| FormatError::invalid(format!("safetensors: {e}")))?;
    // Keep the file's own order (by offset) so inventories read the way the file does;
    // empty tensors share an offset, and keep their order in the header.
    let position: HashMap<&str, usize> = keys
        .0
        .iter()
        .enumerate()
        .map(|(i, k)| (k.as_str(), i))
        .collect();
    let mut names = meta.offset_keys();
    names.sort_by_key(|n| {
        let offset = meta.info(n).map(|i| i.data_offsets.0);
        (offset, position.get(n.as_str()).copied())
    });
    let mut tensors = Vec::with_capacity(st.len());
    for name in names {
        let view = st
            .tensor(&name)
            .map_err(|e| FormatError::invalid(format!("safetensors: {e}")))?;
        let dtype = dtype_from(view.dtype())?;
        tensors.push(Tensor::new(
            name,
            dtype,
            view.shape().to_vec(),
            view.data().to_vec(),
        )?);
    }
    Ok(TensorSet {
        format: Format::Safetensors,
        tensors,
        container: Container::Safetensors {
            metadata: meta.metadata().clone(),
        },
    })
}

/// Writes tensors with the original metadata plus `extra` entries.
pub fn write(
    tensors: &[Tensor],
    metadata: Option<HashMap<String, String>>,
    extra: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, FormatError> {
    let mut views = Vec::with_capacity(tensors.len());
    for t in tensors {
        let v = TensorView::new(dtype_to(t.dtype), t.shape.clone(), &t.data)
            .map_err(|e| FormatError::Write(format!("{}: {e}", t.name)))?;
        views.push((t.name.clone(), v));
    }
    let meta = match (metadata, extra) {
        (None, None) => None,
        (a, b) => {
            let mut m = a.unwrap_or_default();
            m.extend(b.unwrap_or_default());
            Some(m)
        }
    };
    let bytes =
        safetensors::serialize(views, meta).map_err(|e| FormatError::Write(e.to_string()))?;
    canonical_header(bytes)
}

/// Rewrites the header with sorted keys. The crate serialises `__metadata__` from a HashMap,
/// whose order changes from process to process; artifacts must be byte-identical for the
/// same input (ETags, CLI = server). Offsets are relative to the data, so they stay valid.
fn canonical_header(bytes: Vec<u8>) -> Result<Vec<u8>, FormatError> {
    use std::collections::BTreeMap;
    let bad = || FormatError::Write("safetensors writer produced an unreadable header".into());
    let n = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        .ok_or_else(bad)?;
    let end = usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&e| e <= bytes.len())
        .ok_or_else(bad)?;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..end]).map_err(|_| bad())?;
    let sorted: BTreeMap<String, serde_json::Value> = header
        .into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::Object(m) => (
                k,
                serde_json::to_value(m.into_iter().collect::<BTreeMap<_, _>>()).unwrap_or_default(),
            ),
            other => (k, other),
        })
        .collect();
    let mut text = serde_json::to_vec(&sorted).map_err(|_| bad())?;
    // The format aligns the data start to 8 bytes by padding the header with spaces.
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - end);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[end..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file of `n` empty tensors (the header amplification of the outside test:
    /// every entry costs memory, none costs bytes).
    fn empty_tensors(n: usize) -> Vec<u8> {
        let entries: Vec<String> = (0..n)
            .map(|i| format!(r#""t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}"#))
            .collect();
        let header = format!("{{{}}}", entries.join(","));
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out
    }

    #[test]
    fn a_header_of_more_tensors_than_the_cap_is_refused() {
        let err = read(&empty_tensors(MAX_TENSORS + 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("too many tensors"), "{err}");
        assert_eq!(read(&empty_tensors(1000)).unwrap().tensors.len(), 1000);
    }

    #[test]
    fn a_header_longer_than_the_cap_is_refused_before_it_is_read() {
        let len = MAX_SAFETENSORS_HEADER_BYTES + 8;
        let mut file = (len as u64).to_le_bytes().to_vec();
        file.extend_from_slice(b"{}");
        file.resize(8 + len, b' ');
        let err = read(&file).unwrap_err().to_string();
        assert!(err.contains("-byte header (at most"), "{err}");
        let err = read(&file[..100]).unwrap_err().to_string();
        assert!(err.contains("-byte header"), "{err}");
    }
}
