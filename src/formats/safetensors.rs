//! safetensors, through the `safetensors` crate (which validates the header, offsets and
//! overlaps itself; see its `Metadata::validate`).

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

pub fn read(bytes: &[u8]) -> Result<TensorSet, FormatError> {
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| FormatError::invalid(format!("safetensors: {e}")))?;
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| FormatError::invalid(format!("safetensors: {e}")))?;
    if st.len() > super::limits::MAX_TENSORS {
        return Err(FormatError::invalid("too many tensors"));
    }
    // Keep the file's own order (by offset) so inventories read the way the file does.
    let mut tensors = Vec::with_capacity(st.len());
    for name in meta.offset_keys() {
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
    safetensors::serialize(views, meta).map_err(|e| FormatError::Write(e.to_string()))
}
