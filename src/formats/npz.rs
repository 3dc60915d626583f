//! NumPy .npy and .npz. Headers are parsed by `ndarray-npy`; data is kept as raw bytes so any
//! supported dtype round-trips bit for bit. The ZIP layer (ZIP64 included) is the `zip` crate.

use super::limits::{
    Inflation, MAX_DEFLATE_RATIO, MAX_NPY_HEADER_BYTES, MAX_NPZ_MEMBER_BYTES, MAX_TENSORS,
};
use super::{element_count, Container, DType, Format, FormatError, Tensor, TensorSet};
use ndarray_npy::npy::header::{Header, Layout};
use py_literal::Value as PyValue;
use std::io::{Cursor, Read, Write};

fn dtype_from_descr(descr: &str) -> Result<DType, FormatError> {
    // numpy writes '|' for one-byte types and '<' for little-endian; big-endian is refused
    // rather than silently byte-swapped.
    let d = match descr {
        "<f4" => DType::F32,
        "<f2" => DType::F16,
        "<f8" => DType::F64,
        "|i1" | "<i1" => DType::I8,
        "|u1" | "<u1" => DType::U8,
        "<i2" => DType::I16,
        "<u2" => DType::U16,
        "<i4" => DType::I32,
        "<u4" => DType::U32,
        "<i8" => DType::I64,
        "<u8" => DType::U64,
        "|b1" => DType::Bool,
        other => {
            return Err(FormatError::Unsupported(format!(
                ".npy dtype {other} (object, string, structured and big-endian arrays are not model weights)"
            )))
        }
    };
    Ok(d)
}

fn descr_of(d: DType) -> Result<&'static str, FormatError> {
    Ok(match d {
        DType::F32 => "<f4",
        DType::F16 => "<f2",
        DType::F64 => "<f8",
        DType::I8 => "|i1",
        DType::U8 => "|u1",
        DType::I16 => "<i2",
        DType::U16 => "<u2",
        DType::I32 => "<i4",
        DType::U32 => "<u4",
        DType::I64 => "<i8",
        DType::U64 => "<u8",
        DType::Bool => "|b1",
        DType::BF16 => {
            return Err(FormatError::Write(
                "NumPy has no bfloat16 dtype; cast to float16 or keep float32 for .npy/.npz".into(),
            ))
        }
    })
}

/// A parsed .npy header: dtype, shape, layout, and where the data starts.
struct NpyHeader {
    dtype: DType,
    shape: Vec<usize>,
    fortran: bool,
    data_start: usize,
    data_len: usize,
}

/// Parses an .npy header from its first bytes (the data need not follow).
fn parse_npy_header(bytes: &[u8], name: &str) -> Result<NpyHeader, FormatError> {
    // The header length sits at bytes 8..10 (v1) or 8..12 (v2/v3); check it before the
    // header parser allocates.
    let major = *bytes
        .get(6)
        .ok_or_else(|| FormatError::invalid(format!("{name}: truncated .npy")))?;
    let header_len = match major {
        1 => bytes
            .get(8..10)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize),
        2 | 3 => bytes
            .get(8..12)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize),
        v => {
            return Err(FormatError::invalid(format!(
                "{name}: unknown .npy version {v}"
            )))
        }
    }
    .ok_or_else(|| FormatError::invalid(format!("{name}: truncated .npy")))?;
    if header_len > MAX_NPY_HEADER_BYTES {
        return Err(FormatError::invalid(format!(
            "{name}: .npy header too large"
        )));
    }
    let mut cursor = Cursor::new(bytes);
    let header = Header::from_reader(&mut cursor)
        .map_err(|e| FormatError::invalid(format!("{name}: bad .npy header: {e}")))?;
    let descr = match &header.type_descriptor {
        PyValue::String(s) => s.clone(),
        other => {
            return Err(FormatError::Unsupported(format!(
                "{name}: .npy dtype {other} (structured arrays are not model weights)"
            )))
        }
    };
    let dtype =
        dtype_from_descr(&descr).map_err(|e| FormatError::Unsupported(format!("{name}: {e}")))?;
    let count = element_count(&header.shape)
        .ok_or_else(|| FormatError::invalid(format!("{name}: shape overflows")))?;
    let data_len = count
        .checked_mul(dtype.size())
        .ok_or_else(|| FormatError::invalid(format!("{name}: size overflows")))?;
    Ok(NpyHeader {
        dtype,
        shape: header.shape,
        fortran: header.layout == Layout::Fortran,
        data_start: cursor.position() as usize,
        data_len,
    })
}

/// Reads one .npy from bytes: (dtype, shape, C-order data, was_fortran).
fn parse_npy(bytes: &[u8], name: &str) -> Result<(DType, Vec<usize>, Vec<u8>, bool), FormatError> {
    let h = parse_npy_header(bytes, name)?;
    let data = bytes
        .get(h.data_start..)
        .ok_or_else(|| FormatError::invalid(format!("{name}: truncated .npy")))?;
    if data.len() != h.data_len {
        return Err(FormatError::invalid(format!(
            "{name}: .npy holds {} data bytes, its header says {}",
            data.len(),
            h.data_len
        )));
    }
    let data = if h.fortran && h.shape.len() > 1 {
        fortran_to_c(data, &h.shape, h.dtype.size())
    } else {
        data.to_vec()
    };
    Ok((h.dtype, h.shape, data, h.fortran))
}

/// [`parse_npy`] on a buffer it may keep: the data stays where it was read (no second copy of
/// a large member).
fn parse_npy_owned(
    mut buf: Vec<u8>,
    name: &str,
) -> Result<(DType, Vec<usize>, Vec<u8>), FormatError> {
    let h = parse_npy_header(&buf, name)?;
    if h.fortran && h.shape.len() > 1 {
        let (dtype, shape, data, _) = parse_npy(&buf, name)?;
        return Ok((dtype, shape, data));
    }
    let have = buf.len().saturating_sub(h.data_start);
    if buf.len() < h.data_start || have != h.data_len {
        return Err(FormatError::invalid(format!(
            "{name}: .npy holds {have} data bytes, its header says {}",
            h.data_len
        )));
    }
    buf.drain(..h.data_start);
    Ok((h.dtype, h.shape, buf))
}

/// Validates an .npy file from its header and length alone, without reading the data:
/// uploads of huge arrays are checked in constant memory.
pub fn inspect_npy_path(path: &std::path::Path) -> Result<(DType, Vec<usize>, u64), FormatError> {
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut head = Vec::new();
    (&mut file)
        .take((MAX_NPY_HEADER_BYTES + 16) as u64)
        .read_to_end(&mut head)?;
    let h = parse_npy_header(&head, "array")?;
    if h.shape.len() > crate::model::MAX_RANK {
        return Err(FormatError::invalid(format!(
            "array: rank {} is more than {}",
            h.shape.len(),
            crate::model::MAX_RANK
        )));
    }
    if len != (h.data_start + h.data_len) as u64 {
        return Err(FormatError::invalid(format!(
            "array: .npy holds {} data bytes, its header says {}",
            len.saturating_sub(h.data_start as u64),
            h.data_len
        )));
    }
    // Count NaN/Inf in 1 MiB slices (constant memory, whatever the file's size).
    let mut non_finite = 0u64;
    if h.dtype.is_float() {
        use std::io::{Seek, SeekFrom};
        file.seek(SeekFrom::Start(h.data_start as u64))?;
        let slice = (1 << 20) / h.dtype.size() * h.dtype.size();
        let mut buf = vec![0u8; slice];
        loop {
            let mut filled = 0;
            while filled < slice {
                let n = file.read(&mut buf[filled..])?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            non_finite += crate::model::non_finite(h.dtype, &buf[..filled]);
            if filled < slice {
                break;
            }
        }
    }
    Ok((h.dtype, h.shape, non_finite))
}

/// Reorders Fortran-order elements into C order.
fn fortran_to_c(data: &[u8], shape: &[usize], item: usize) -> Vec<u8> {
    let n = data.len() / item.max(1);
    let mut out = vec![0u8; data.len()];
    let rank = shape.len();
    let mut index = vec![0usize; rank];
    for c_pos in 0..n {
        // Fortran offset of the current C-order multi-index.
        let mut f_off = 0usize;
        let mut stride = 1usize;
        for (d, &i) in index.iter().enumerate() {
            f_off += i * stride;
            stride *= shape[d];
        }
        out[c_pos * item..(c_pos + 1) * item]
            .copy_from_slice(&data[f_off * item..(f_off + 1) * item]);
        for d in (0..rank).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out
}

pub fn read_npy_file(bytes: &[u8]) -> Result<TensorSet, FormatError> {
    let (dtype, shape, data, _) = parse_npy(bytes, "array")?;
    let tensor = Tensor::new("array".into(), dtype, shape, data)?;
    Ok(TensorSet {
        format: Format::Npy,
        tensors: vec![tensor],
        container: Container::Npy,
    })
}

fn u16_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?) as u64)
}
fn u32_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as u64)
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Every member name in a zip's central directory, in order, repeats included (zip64 too).
/// None when the directory cannot be walked here; the zip reader has validated the archive
/// already, so that only skips this check.
pub fn central_directory_names(b: &[u8]) -> Option<Vec<String>> {
    const EOCD: &[u8] = b"PK\x05\x06";
    let from = b.len().saturating_sub(22 + 65_535);
    let eocd = (from..=b.len().checked_sub(22)?)
        .rev()
        .find(|&i| &b[i..i + 4] == EOCD)?;
    let (mut entries, mut offset) = (u16_at(b, eocd + 10)?, u32_at(b, eocd + 16)?);
    if entries == 0xFFFF || offset == 0xFFFF_FFFF {
        // Zip64: the locator sits just before the record and points at the zip64 record.
        let loc = eocd.checked_sub(20)?;
        if &b[loc..loc + 4] != b"PK\x06\x07" {
            return None;
        }
        let z = usize::try_from(u64_at(b, loc + 8)?).ok()?;
        if b.get(z..z + 4)? != b"PK\x06\x06" {
            return None;
        }
        entries = u64_at(b, z + 32)?;
        offset = u64_at(b, z + 48)?;
    }
    let mut at = usize::try_from(offset).ok()?;
    let mut names = Vec::new();
    for _ in 0..entries.min(MAX_TENSORS as u64 + 1) {
        if b.get(at..at + 4)? != b"PK\x01\x02" {
            return None;
        }
        let (n, x, c) = (
            u16_at(b, at + 28)? as usize,
            u16_at(b, at + 30)? as usize,
            u16_at(b, at + 32)? as usize,
        );
        names.push(String::from_utf8_lossy(b.get(at + 46..at + 46 + n)?).into_owned());
        at += 46 + n + x + c;
    }
    Some(names)
}

pub fn read_npz(bytes: &[u8]) -> Result<TensorSet, FormatError> {
    read_npz_with(bytes, &Inflation::default())
}

/// Reads an .npz whose members together inflate to at most `inflation.max_bytes`, and to at
/// most `inflation.max_ratio` times the file's size; each member is read once, into the
/// buffer that becomes its tensor.
pub fn read_npz_with(bytes: &[u8], inflation: &Inflation) -> Result<TensorSet, FormatError> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| FormatError::invalid(format!("npz: {e}")))?;
    // The zip reader indexes members by name, so a repeated name would vanish here: read the
    // names from the central directory itself.
    if let Some(names) = central_directory_names(bytes) {
        let stems: Vec<&str> = names
            .iter()
            .map(|n| n.strip_suffix(".npy").unwrap_or(n))
            .collect();
        super::limits::unique_names(stems.iter().copied(), "npz member")?;
    }
    if zip.len() > MAX_TENSORS {
        return Err(FormatError::invalid("npz: too many members"));
    }
    let mut tensors = Vec::with_capacity(zip.len());
    let mut compressed = false;
    let mut inflated = 0u64;
    let ratio_cap = (bytes.len() as u64).saturating_mul(inflation.max_ratio);
    for i in 0..zip.len() {
        let mut member = zip
            .by_index(i)
            .map_err(|e| FormatError::invalid(format!("npz member {i}: {e}")))?;
        if member.is_dir() {
            continue;
        }
        let full = member.name().to_string();
        let Some(name) = full.strip_suffix(".npy") else {
            return Err(FormatError::invalid(format!(
                "npz member {full:?} is not an .npy array"
            )));
        };
        let size = member.size();
        if member.compression() != zip::CompressionMethod::Stored {
            compressed = true;
            if size > member.compressed_size().saturating_mul(MAX_DEFLATE_RATIO) + 4096 {
                return Err(FormatError::invalid(format!(
                    "npz member {full:?} claims an impossible compression ratio"
                )));
            }
        }
        if size > MAX_NPZ_MEMBER_BYTES || size > bytes.len() as u64 * MAX_DEFLATE_RATIO {
            return Err(FormatError::invalid(format!(
                "npz member {full:?} is too large ({size} bytes)"
            )));
        }
        inflated = inflated.saturating_add(size);
        if inflated > inflation.max_bytes {
            return Err(FormatError::TooLarge(format!(
                "the .npz inflates to more than {} bytes (MODELPRESS_MAX_INFLATED_BYTES); refused at member {full:?}",
                inflation.max_bytes
            )));
        }
        if inflated > ratio_cap.max(1 << 20) {
            return Err(FormatError::TooLarge(format!(
                "the .npz ({} bytes) inflates more than {}x (MODELPRESS_MAX_INFLATION_RATIO); refused at member {full:?}",
                bytes.len(),
                inflation.max_ratio
            )));
        }
        // The declared size is only a hint: grow past 64 MiB as bytes really arrive.
        let mut buf = Vec::with_capacity(size.min(64 << 20) as usize);
        (&mut member)
            .take(size + 1)
            .read_to_end(&mut buf)
            .map_err(|e| FormatError::invalid(format!("npz member {full:?}: {e}")))?;
        if buf.len() as u64 != size {
            return Err(FormatError::invalid(format!(
                "npz member {full:?}: size differs from its directory entry"
            )));
        }
        let (dtype, shape, data) = parse_npy_owned(buf, name)?;
        tensors.push(Tensor::new(name.to_string(), dtype, shape, data)?);
    }
    if tensors.is_empty() {
        return Err(FormatError::invalid("npz holds no arrays"));
    }
    super::limits::unique_names(tensors.iter().map(|t| t.name.as_str()), "npz member")?;
    Ok(TensorSet {
        format: Format::Npz,
        tensors,
        container: Container::Npz { compressed },
    })
}

fn npy_bytes(t: &Tensor) -> Result<Vec<u8>, FormatError> {
    let header = Header {
        type_descriptor: PyValue::String(descr_of(t.dtype)?.to_string()),
        layout: Layout::Standard,
        shape: t.shape.clone(),
    };
    let mut out = header
        .to_bytes()
        .map_err(|e| FormatError::Write(e.to_string()))?;
    out.extend_from_slice(&t.data);
    Ok(out)
}

pub fn write_npy(t: &Tensor) -> Result<Vec<u8>, FormatError> {
    npy_bytes(t)
}

/// Writes an .npz; `comment` lands in the ZIP archive comment (numpy ignores it).
pub fn write_npz(
    tensors: &[Tensor],
    compressed: bool,
    comment: Option<String>,
) -> Result<Vec<u8>, FormatError> {
    let w = |e: zip::result::ZipError| FormatError::Write(e.to_string());
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let method = if compressed {
        zip::CompressionMethod::Deflated
    } else {
        zip::CompressionMethod::Stored
    };
    for t in tensors {
        let bytes = npy_bytes(t)?;
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(method)
            .large_file(bytes.len() as u64 >= u32::MAX as u64);
        zip.start_file(format!("{}.npy", t.name), opts).map_err(w)?;
        zip.write_all(&bytes)?;
    }
    if let Some(c) = comment {
        zip.set_comment(c);
    }
    Ok(zip.finish().map_err(w)?.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn central_directory_names_match_what_was_written() {
        let t = |name: &str| Tensor::new(name.into(), DType::F32, vec![2], vec![0; 8]).unwrap();
        for compressed in [false, true] {
            let bytes = write_npz(&[t("a"), t("b/c")], compressed, None).unwrap();
            assert_eq!(
                central_directory_names(&bytes).unwrap(),
                ["a.npy", "b/c.npy"]
            );
        }
        assert_eq!(central_directory_names(b"not a zip"), None);
    }
}
