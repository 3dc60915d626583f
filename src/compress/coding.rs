//! The stored form of one tensor in a `model.mpz` archive: which representation, its
//! parameters ([`Repr`], kept as JSON in the archive header) and its byte sections.
//!
//! Index streams (quantized codes, codebook indices) are stored dense or sparse, with fixed
//! width or canonical Huffman codes, whichever is smallest (Huffman only for tensors that a
//! `huffman` step selected). Sparse streams follow Deep Compression: each kept entry stores
//! its gap to the previous one in `gap_bits` bits; a gap too long for that inserts a filler
//! entry holding the zero symbol. Fillers also run to the end, so a tensor never has more
//! than 2^gap_bits zeros after its last entry: the element count is bounded by the stream.
//!
//! Decoding rebuilds the same structs the compression produced and calls the same decode
//! functions, so the values equal `restored` bit for bit.

use super::huffman;
use super::pack;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Most elements a factorized tensor may rebuild per stored factor element: far above any
/// real factorization (a rank-1 65536×65536 matrix reaches 32768), low enough that a
/// hostile header cannot claim terabytes from a few bytes.
pub const MAX_FACTOR_EXPANSION: u128 = 1 << 16;

pub(super) fn check_expansion(n: usize, stored: &[usize]) -> Result<(), DecodeError> {
    let stored: u128 = stored.iter().map(|&s| s as u128).sum();
    if n as u128 > stored.max(1) * MAX_FACTOR_EXPANSION {
        return Err(err("factors too small for the shape they claim"));
    }
    Ok(())
}

/// Widest sparse gap field tried.
pub const MAX_GAP_BITS: u8 = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Dense,
    Sparse,
}

/// How an index stream is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stream {
    /// Symbols take values in 0..alphabet.
    pub alphabet: u32,
    pub layout: Layout,
    pub huffman: bool,
    /// Sparse only: width of a relative index, and the symbol that means zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gap_bits: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zero_symbol: Option<u32>,
    /// Entries in the stream: the element count (dense) or kept entries plus fillers (sparse).
    pub entries: u64,
}

/// A tensor's representation in the archive: `{"encoding": name, …parameters}` in the
/// archive header. `raw` and `sparse_float` are this file's; every other encoding is a
/// form's, written by its [`super::form::Form::payload`] and decoded by the decoder its
/// method registers ([`super::method::Registration::forms`]), so a new form needs no change
/// here. The parameters keep the order the form declares them in, so the header's bytes do
/// not depend on how a JSON map orders its keys.
#[derive(Debug, Clone, PartialEq)]
pub struct Repr {
    encoding: String,
    params: Vec<(String, Ordered)>,
}

impl Repr {
    /// The tensor's bytes in its own dtype. Section `data`.
    pub fn raw() -> Repr {
        Repr {
            encoding: "raw".into(),
            params: Vec::new(),
        }
    }

    /// A form's representation: `params` must serialize to a JSON object.
    pub fn new(encoding: &str, params: &impl Serialize) -> Repr {
        let params = serde_json::to_string(params)
            .ok()
            .and_then(|text| serde_json::from_str::<Ordered>(&text).ok());
        Repr {
            encoding: encoding.into(),
            params: match params {
                Some(Ordered::Object(fields)) => fields,
                _ => Vec::new(),
            },
        }
    }

    pub fn encoding(&self) -> &str {
        &self.encoding
    }

    pub fn is_raw(&self) -> bool {
        self.encoding == "raw"
    }

    /// The parameters as the form's own type.
    pub fn params<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        let object = Ordered::Object(self.params.clone()).into_value();
        serde_json::from_value(object).map_err(|e| DecodeError(format!("{}: {e}", self.encoding)))
    }
}

impl Serialize for Repr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.params.len() + 1))?;
        m.serialize_entry("encoding", &self.encoding)?;
        for (k, v) in &self.params {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Repr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Repr, D::Error> {
        let Ordered::Object(mut fields) = Ordered::deserialize(d)? else {
            return Err(serde::de::Error::custom("a representation is an object"));
        };
        let at = fields.iter().position(|(k, _)| k == "encoding");
        match at.map(|i| fields.remove(i)) {
            Some((_, Ordered::String(encoding))) => Ok(Repr {
                encoding,
                params: fields,
            }),
            _ => Err(serde::de::Error::missing_field("encoding")),
        }
    }
}

/// A JSON value whose objects keep their keys in order (serde_json's map sorts them).
#[derive(Debug, Clone, PartialEq)]
enum Ordered {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Ordered>),
    Object(Vec<(String, Ordered)>),
}

impl Ordered {
    fn into_value(self) -> Value {
        match self {
            Ordered::Null => Value::Null,
            Ordered::Bool(b) => Value::Bool(b),
            Ordered::Number(n) => Value::Number(n),
            Ordered::String(s) => Value::String(s),
            Ordered::Array(a) => Value::Array(a.into_iter().map(Ordered::into_value).collect()),
            Ordered::Object(o) => Value::Object(
                o.into_iter()
                    .map(|(k, v)| (k, v.into_value()))
                    .collect::<Map<_, _>>(),
            ),
        }
    }
}

impl Serialize for Ordered {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self {
            Ordered::Null => s.serialize_unit(),
            Ordered::Bool(b) => s.serialize_bool(*b),
            Ordered::Number(n) => n.serialize(s),
            Ordered::String(x) => s.serialize_str(x),
            Ordered::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for v in a {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
            Ordered::Object(o) => {
                let mut m = s.serialize_map(Some(o.len()))?;
                for (k, v) in o {
                    m.serialize_entry(k, v)?;
                }
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Ordered, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Ordered, E> {
                Ok(Ordered::Null)
            }
            fn visit_none<E>(self) -> Result<Ordered, E> {
                Ok(Ordered::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<Ordered, E> {
                Ok(Ordered::Bool(b))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Ordered, E> {
                Ok(Ordered::Number(n.into()))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Ordered, E> {
                Ok(Ordered::Number(n.into()))
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Ordered, E> {
                serde_json::Number::from_f64(n)
                    .map(Ordered::Number)
                    .ok_or_else(|| E::custom("not a finite number"))
            }
            fn visit_str<E>(self, s: &str) -> Result<Ordered, E> {
                Ok(Ordered::String(s.into()))
            }
            fn visit_string<E>(self, s: String) -> Result<Ordered, E> {
                Ok(Ordered::String(s))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Ordered, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = a.next_element()? {
                    out.push(v);
                }
                Ok(Ordered::Array(out))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Ordered, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = a.next_entry::<String, Ordered>()? {
                    out.push((k, v));
                }
                Ok(Ordered::Object(out))
            }
        }
        d.deserialize_any(Visit)
    }
}

/// Float values with zeros left out. Sections `gaps` (+`gap_lengths`), `values` (f32).
#[derive(Serialize, Deserialize)]
struct SparseFloat {
    stream: Stream,
}

/// One tensor's representation with its sections, ready to write.
#[derive(Debug, Clone)]
pub struct Payload {
    pub repr: Repr,
    pub sections: Vec<(String, Vec<u8>)>,
}

impl Payload {
    pub fn bytes(&self) -> u64 {
        self.sections.iter().map(|(_, b)| b.len() as u64).sum()
    }
}

/// Sizes of the Deep Compression stages for one tensor, in bytes: pruned (sparse, f32
/// values), pruned and quantized (fixed-width codes + tables), and Huffman coded.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct StageBytes {
    pub pruned: u64,
    pub quantized: u64,
    pub huffman: u64,
}

impl StageBytes {
    /// A tensor no stage changed: its own size in every column.
    pub fn unchanged(bytes: u64) -> StageBytes {
        StageBytes {
            pruned: bytes,
            quantized: bytes,
            huffman: bytes,
        }
    }
}

/// What coding a tensor achieved, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct CodingStats {
    pub layout: Layout,
    pub huffman: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gap_bits: Option<u8>,
    /// Bits per weight of the best fixed-width form (codes, relative indices, tables).
    pub fixed_bits_per_weight: f64,
    /// Bits per weight after Huffman coding, when a `huffman` step selected the tensor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coded_bits_per_weight: Option<f64>,
}

/// Kept entries (gaps and symbols, fillers included) of a sparse stream with `b`-bit gaps.
fn sparse_entries(symbols: &[u32], zero: u32, b: u8) -> (Vec<u32>, Vec<u32>) {
    let max_gap = (1usize << b) - 1;
    let (mut gaps, mut syms) = (Vec::new(), Vec::new());
    let mut next = 0usize; // first position not yet covered
    let push_fillers_to =
        |target: usize, gaps: &mut Vec<u32>, syms: &mut Vec<u32>, next: &mut usize| {
            while target - *next > max_gap {
                gaps.push(max_gap as u32);
                syms.push(zero);
                *next += max_gap + 1;
            }
        };
    for (p, &s) in symbols.iter().enumerate() {
        if s == zero {
            continue;
        }
        push_fillers_to(p, &mut gaps, &mut syms, &mut next);
        gaps.push((p - next) as u32);
        syms.push(s);
        next = p + 1;
    }
    push_fillers_to(symbols.len(), &mut gaps, &mut syms, &mut next);
    (gaps, syms)
}

/// Gap counts for width `b` from the kept positions, without building the streams.
fn sparse_gap_histogram(positions: &[usize], n: usize, b: u8) -> (Vec<u64>, u64) {
    let max_gap = (1usize << b) - 1;
    let mut hist = vec![0u64; max_gap + 1];
    let mut fillers = 0u64;
    let mut next = 0usize;
    for &p in positions.iter().chain(std::iter::once(&usize::MAX)) {
        let target = p.min(n);
        let long = (target - next) / (max_gap + 1);
        fillers += long as u64;
        hist[max_gap] += long as u64;
        next += long * (max_gap + 1);
        if p == usize::MAX {
            break;
        }
        hist[p - next] += 1;
        next = p + 1;
    }
    (hist, fillers)
}

/// Bytes of a Huffman length table for an alphabet (5 bits per symbol).
fn lengths_table_bytes(alphabet: usize) -> u64 {
    pack::packed_len(alphabet, 5) as u64
}

fn huffman_bytes(counts: &[u64]) -> u64 {
    let lengths = huffman::code_lengths(counts);
    lengths_table_bytes(counts.len()) + huffman::encoded_bits(counts, &lengths).div_ceil(8)
}

/// The sizes of every way to store a stream, for choosing and for the report.
struct Options {
    dense_fixed: u64,
    dense_huffman: u64,
    /// (gap bits, fixed bytes, huffman bytes) per width tried.
    sparse: Vec<(u8, u64, u64)>,
}

fn options(symbols: &[u32], alphabet: u32, zero: Option<u32>, value_bits: Option<u64>) -> Options {
    let n = symbols.len() as u64;
    let w = u64::from(pack::width_for(alphabet as usize));
    let value_bits_fixed = value_bits.unwrap_or(w);
    let counts = huffman::histogram(symbols, alphabet as usize);
    // With explicit value bits (sparse floats), "dense" means the raw values.
    let (dense_fixed, dense_huffman) = match value_bits {
        Some(v) => ((n * v).div_ceil(8), (n * v).div_ceil(8)),
        None => ((n * w).div_ceil(8), huffman_bytes(&counts)),
    };
    let mut sparse = Vec::new();
    // A sparse entry costs at least one gap bit plus the value: with fixed widths it cannot
    // beat dense once nnz·(1 + v) ≥ n·w, and Huffman-coded sparse streams do not pay off
    // above 90 % density either. Skipping them saves twelve passes over large tensors.
    let nnz = zero.map_or(n, |z| n - counts.get(z as usize).copied().unwrap_or(0));
    let worth_it = nnz * (1 + value_bits_fixed) < n * w.max(value_bits.unwrap_or(0))
        || (nnz as f64) < 0.9 * n as f64;
    if let (Some(z), true) = (zero, worth_it) {
        let positions: Vec<usize> = symbols
            .iter()
            .enumerate()
            .filter(|(_, &s)| s != z)
            .map(|(i, _)| i)
            .collect();
        let mut nonzero_counts = counts.clone();
        nonzero_counts[z as usize] = 0;
        for b in 1..=MAX_GAP_BITS {
            let (gap_hist, fillers) = sparse_gap_histogram(&positions, symbols.len(), b);
            let entries = positions.len() as u64 + fillers;
            let fixed = (entries * (u64::from(b) + value_bits_fixed)).div_ceil(8);
            let mut sym_counts = nonzero_counts.clone();
            sym_counts[z as usize] = fillers;
            let huff = huffman_bytes(&gap_hist)
                + if value_bits.is_some() {
                    (entries * value_bits_fixed).div_ceil(8)
                } else {
                    huffman_bytes(&sym_counts)
                };
            sparse.push((b, fixed, huff));
        }
    }
    Options {
        dense_fixed,
        dense_huffman,
        sparse,
    }
}

impl Options {
    fn best_fixed(&self) -> (Layout, Option<u8>, u64) {
        let mut best = (Layout::Dense, None, self.dense_fixed);
        for &(b, f, _) in &self.sparse {
            if f < best.2 {
                best = (Layout::Sparse, Some(b), f);
            }
        }
        best
    }
    fn best_huffman(&self) -> (Layout, Option<u8>, u64) {
        let mut best = (Layout::Dense, None, self.dense_huffman);
        for &(b, _, h) in &self.sparse {
            if h < best.2 {
                best = (Layout::Sparse, Some(b), h);
            }
        }
        best
    }
}

fn write_lengths(lengths: &[u8]) -> Vec<u8> {
    pack::pack(
        &lengths.iter().map(|&l| u32::from(l)).collect::<Vec<_>>(),
        5,
    )
}

/// Encodes `syms` over `alphabet` with or without Huffman; returns the sections.
fn code_symbols(
    syms: &[u32],
    alphabet: usize,
    huffman: bool,
    name: &str,
    out: &mut Vec<(String, Vec<u8>)>,
) {
    if huffman {
        let lengths = huffman::code_lengths(&huffman::histogram(syms, alphabet));
        let stream = huffman::encode(syms, &lengths).unwrap_or_default();
        out.push((format!("{name}_lengths"), write_lengths(&lengths)));
        out.push((name.to_string(), stream));
    } else {
        out.push((
            name.to_string(),
            pack::pack(syms, pack::width_for(alphabet)),
        ));
    }
}

/// Builds a stream's sections for a chosen layout.
fn build_stream(
    symbols: &[u32],
    alphabet: u32,
    zero: Option<u32>,
    layout: Layout,
    gap_bits: Option<u8>,
    huffman: bool,
    sections: &mut Vec<(String, Vec<u8>)>,
) -> Stream {
    match (layout, zero, gap_bits) {
        (Layout::Sparse, Some(z), Some(b)) => {
            let (gaps, syms) = sparse_entries(symbols, z, b);
            code_symbols(&gaps, 1 << b, huffman, "gaps", sections);
            code_symbols(&syms, alphabet as usize, huffman, "symbols", sections);
            Stream {
                alphabet,
                layout,
                huffman,
                gap_bits: Some(b),
                zero_symbol: Some(z),
                entries: gaps.len() as u64,
            }
        }
        _ => {
            code_symbols(symbols, alphabet as usize, huffman, "symbols", sections);
            Stream {
                alphabet,
                layout: Layout::Dense,
                huffman,
                gap_bits: None,
                zero_symbol: None,
                entries: symbols.len() as u64,
            }
        }
    }
}

/// The archive form of a float tensor changed by pruning only, or untouched: raw, or sparse
/// floats when that is smaller. `restored_bytes` is the tensor in its own dtype.
pub fn floats(
    values: &[f32],
    restored_bytes: &[u8],
    huffman: bool,
) -> (Payload, Option<CodingStats>, StageBytes) {
    let n = values.len().max(1) as f64;
    // A float tensor changed by pruning only, or untouched: raw or sparse floats.
    let zeros = values.iter().filter(|v| **v == 0.0).count();
    let raw = restored_bytes.len() as u64;
    let stage = StageBytes {
        pruned: raw,
        quantized: raw,
        huffman: raw,
    };
    if zeros == 0 || values.is_empty() {
        return (
            Payload {
                repr: Repr::raw(),
                sections: vec![("data".into(), restored_bytes.to_vec())],
            },
            None,
            stage,
        );
    }
    let mask: Vec<u32> = values.iter().map(|&v| u32::from(v != 0.0)).collect();
    let opts = options(&mask, 2, Some(0), Some(32));
    let (_, b_fixed, fixed) = opts.best_fixed();
    let (_, b_huff, huff) = opts.best_huffman();
    let (b, use_h, bytes) = if huffman && huff < fixed {
        (b_huff, true, huff)
    } else {
        (b_fixed, false, fixed)
    };
    let stage = StageBytes {
        pruned: fixed.min(raw),
        quantized: fixed.min(raw),
        huffman: if huffman {
            huff.min(fixed).min(raw)
        } else {
            fixed.min(raw)
        },
    };
    let stats = CodingStats {
        layout: if bytes < raw {
            Layout::Sparse
        } else {
            Layout::Dense
        },
        huffman: use_h && bytes < raw,
        gap_bits: b.filter(|_| bytes < raw),
        fixed_bits_per_weight: fixed.min(raw) as f64 * 8.0 / n,
        coded_bits_per_weight: huffman.then(|| huff.min(fixed).min(raw) as f64 * 8.0 / n),
    };
    let (Some(b), true) = (b, bytes < raw) else {
        return (
            Payload {
                repr: Repr::raw(),
                sections: vec![("data".into(), restored_bytes.to_vec())],
            },
            Some(stats),
            stage,
        );
    };
    let (gaps, flags) = sparse_entries(&mask, 0, b);
    let mut sections = Vec::new();
    code_symbols(&gaps, 1 << b, use_h, "gaps", &mut sections);
    // Entry values: the kept values in order, 0 for fillers.
    let mut kept = Vec::with_capacity(gaps.len());
    let mut next = 0usize;
    for (&g, &f) in gaps.iter().zip(&flags) {
        let p = next + g as usize;
        kept.push(if f == 1 { values[p] } else { 0.0 });
        next = p + 1;
    }
    sections.push(("values".into(), f32_bytes(&kept)));
    (
        Payload {
            repr: Repr::new(
                "sparse_float",
                &SparseFloat {
                    stream: Stream {
                        alphabet: 2,
                        layout: Layout::Sparse,
                        huffman: use_h,
                        gap_bits: Some(b),
                        zero_symbol: Some(0),
                        entries: gaps.len() as u64,
                    },
                },
            ),
            sections,
        },
        Some(stats),
        stage,
    )
}

/// A form stored as index symbols (quantized codes, codebook indices) plus tables: the
/// stream is laid out dense or sparse, fixed width or Huffman coded, whichever is smallest
/// (Huffman only when allowed). `repr` builds the header from the chosen stream.
#[allow(clippy::too_many_arguments)]
pub fn index_stream(
    syms: &[u32],
    alphabet: u32,
    zero: Option<u32>,
    tables: Vec<(String, Vec<u8>)>,
    values: &[f32],
    huffman: bool,
    pruned: bool,
    repr: impl FnOnce(Stream) -> Repr,
) -> (Payload, Option<CodingStats>, StageBytes) {
    let n = values.len().max(1) as f64;
    let table_bytes: u64 = tables.iter().map(|(_, b)| b.len() as u64).sum();
    let opts = options(syms, alphabet, zero, None);
    let fixed = opts.best_fixed();
    let huff = opts.best_huffman();
    let (layout, gap_bits, use_h) = if huffman && huff.2 < fixed.2 {
        (huff.0, huff.1, true)
    } else {
        (fixed.0, fixed.1, false)
    };
    let mut sections = Vec::new();
    let stream = build_stream(syms, alphabet, zero, layout, gap_bits, use_h, &mut sections);
    sections.extend(tables);
    // Stage "pruned": the same positions as a sparse stream of f32 values (the
    // dense float32 tensor when no step pruned it).
    let pruned = match zero.filter(|_| pruned) {
        Some(z) => {
            let mask: Vec<u32> = syms.iter().map(|&s| u32::from(s != z)).collect();
            options(&mask, 2, Some(0), Some(32))
                .best_fixed()
                .2
                .min(values.len() as u64 * 4)
        }
        None => values.len() as u64 * 4,
    };
    let stats = CodingStats {
        layout,
        huffman: use_h,
        gap_bits,
        fixed_bits_per_weight: (fixed.2 + table_bytes) as f64 * 8.0 / n,
        coded_bits_per_weight: huffman
            .then(|| (huff.2.min(fixed.2) + table_bytes) as f64 * 8.0 / n),
    };
    let stage = StageBytes {
        pruned,
        quantized: fixed.2 + table_bytes,
        huffman: (if huffman {
            huff.2.min(fixed.2)
        } else {
            fixed.2
        }) + table_bytes,
    };
    (
        Payload {
            repr: repr(stream),
            sections,
        },
        Some(stats),
        stage,
    )
}

/// A form stored as plain sections (16-bit floats, float32 factors): every stage is its size.
pub fn plain(
    repr: Repr,
    sections: Vec<(String, Vec<u8>)>,
) -> (Payload, Option<CodingStats>, StageBytes) {
    let payload = Payload { repr, sections };
    let bytes = payload.bytes();
    (
        payload,
        None,
        StageBytes {
            pruned: bytes,
            quantized: bytes,
            huffman: bytes,
        },
    )
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Errors decoding a tensor from an archive: always the archive's fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// Fetches an archive entry's named section.
pub type Section<'s, 'a> = dyn Fn(&str) -> Result<&'a [u8], DecodeError> + 's;

pub(super) fn err(msg: impl Into<String>) -> DecodeError {
    DecodeError(msg.into())
}

pub(super) fn f32_section(bytes: &[u8], count: usize, what: &str) -> Result<Vec<f32>, DecodeError> {
    if Some(bytes.len()) != count.checked_mul(4) {
        return Err(err(format!(
            "section {what}: {} bytes, expected {count} f32",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn read_lengths(bytes: &[u8], alphabet: usize) -> Result<Vec<u8>, DecodeError> {
    let l =
        pack::unpack(bytes, 5, alphabet).ok_or_else(|| err("Huffman length table too short"))?;
    Ok(l.into_iter().map(|x| x as u8).collect())
}

fn read_symbols<'a>(
    section: &dyn Fn(&str) -> Result<&'a [u8], DecodeError>,
    name: &str,
    alphabet: usize,
    huffman: bool,
    count: usize,
) -> Result<Vec<u32>, DecodeError> {
    let data = section(name)?;
    let syms = if huffman {
        let lengths = read_lengths(section(&format!("{name}_lengths"))?, alphabet)?;
        huffman::decode(data, &lengths, count).map_err(|e| err(format!("{name}: {e}")))?
    } else {
        let w = pack::width_for(alphabet);
        if data.len() != pack::packed_len(count, w) {
            return Err(err(format!("section {name}: wrong length")));
        }
        pack::unpack(data, w, count).ok_or_else(|| err(format!("section {name}: too short")))?
    };
    if syms.iter().any(|&s| s as usize >= alphabet) {
        return Err(err(format!("section {name}: symbol out of range")));
    }
    Ok(syms)
}

/// The entries must cover the tensor up to a last run shorter than 2^b (the encoder writes
/// fillers to the end): the element count is then backed by the stream, not just claimed.
fn check_coverage(gaps: &[u32], n: usize, b: u8) -> Result<(), DecodeError> {
    let covered: u128 = gaps.iter().map(|&g| u128::from(g) + 1).sum();
    if covered > n as u128 || n as u128 - covered >= 1u128 << b {
        return Err(err("sparse stream does not cover the shape"));
    }
    Ok(())
}

/// Decodes a stream into `n` symbols (zero symbol where a sparse stream has no entry).
pub(super) fn read_stream<'a>(
    s: &Stream,
    n: usize,
    section: &dyn Fn(&str) -> Result<&'a [u8], DecodeError>,
) -> Result<Vec<u32>, DecodeError> {
    let alphabet = s.alphabet as usize;
    if alphabet == 0 || alphabet > 1 << 16 {
        return Err(err("stream alphabet out of range"));
    }
    match s.layout {
        Layout::Dense => {
            if s.entries != n as u64 {
                return Err(err("dense stream length differs from the shape"));
            }
            read_symbols(section, "symbols", alphabet, s.huffman, n)
        }
        Layout::Sparse => {
            let (Some(b), Some(z)) = (s.gap_bits, s.zero_symbol) else {
                return Err(err("sparse stream without gap_bits or zero_symbol"));
            };
            if !(1..=MAX_GAP_BITS).contains(&b) || z as usize >= alphabet {
                return Err(err("sparse stream parameters out of range"));
            }
            let entries = usize::try_from(s.entries).map_err(|_| err("too many entries"))?;
            // Fillers bound every run of zeros, so a stream of e entries covers at most
            // (e + 1)·2^b elements: a larger shape is a lie.
            if (n as u128) > (entries as u128 + 1) << b {
                return Err(err("sparse stream too short for the shape"));
            }
            let gaps = read_symbols(section, "gaps", 1 << b, s.huffman, entries)?;
            let syms = read_symbols(section, "symbols", alphabet, s.huffman, entries)?;
            check_coverage(&gaps, n, b)?;
            scatter(&gaps, &syms, n, z)
        }
    }
}

/// Rebuilds a tensor's values from its representation; `section` fetches a named section.
/// Returns None for `raw` (the caller takes the bytes as they are). A form's encoding is
/// decoded by the decoder its method registers.
pub fn decode<'a>(
    repr: &Repr,
    shape: &[usize],
    section: &Section<'_, 'a>,
) -> Result<Option<Vec<f32>>, DecodeError> {
    let n = crate::model::element_count(shape).ok_or_else(|| err("shape overflows"))?;
    Ok(Some(match repr.encoding() {
        "raw" => return Ok(None),
        "sparse_float" => {
            let p: SparseFloat = repr.params()?;
            decode_sparse_float(&p.stream, n, section)?
        }
        other => {
            let decoder = super::method::decoder(other)
                .ok_or_else(|| err(format!("unknown encoding {other:?}")))?;
            (decoder.decode)(repr, shape, section)?
        }
    }))
}

/// A pruned float tensor: its non-zero values at the positions its gap stream gives.
fn decode_sparse_float<'a>(
    stream: &Stream,
    n: usize,
    section: &Section<'_, 'a>,
) -> Result<Vec<f32>, DecodeError> {
    if stream.layout != Layout::Sparse || stream.alphabet != 2 || stream.zero_symbol != Some(0) {
        return Err(err("sparse_float needs a sparse binary stream"));
    }
    let entries = usize::try_from(stream.entries).map_err(|_| err("too many entries"))?;
    let b = stream.gap_bits.unwrap_or(0);
    if !(1..=MAX_GAP_BITS).contains(&b) || (n as u128) > (entries as u128 + 1) << b {
        return Err(err("sparse stream parameters out of range"));
    }
    let gaps = read_symbols(section, "gaps", 1 << b, stream.huffman, entries)?;
    check_coverage(&gaps, n, b)?;
    let vals = f32_section(section("values")?, entries, "values")?;
    scatter(&gaps, &vals, n, 0.0)
}

/// The `n` elements of a sparse stream: each value `gaps[i]` places after the previous one,
/// `fill` elsewhere.
fn scatter<T: Copy>(gaps: &[u32], values: &[T], n: usize, fill: T) -> Result<Vec<T>, DecodeError> {
    let mut out = vec![fill; n];
    let mut next = 0usize;
    for (&g, &v) in gaps.iter().zip(values) {
        let p = next + g as usize;
        *out.get_mut(p)
            .ok_or_else(|| err("sparse entry beyond the tensor"))? = v;
        next = p + 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Sparse symbol streams with long zero runs, and a gap width.
    #[derive(Debug, Clone)]
    struct SparseProblem {
        symbols: Vec<u32>,
        b: u8,
    }

    fn problem() -> impl Strategy<Value = SparseProblem> {
        (
            prop::collection::vec(prop_oneof![8 => Just(0u32), 1 => 1u32..5], 0..600),
            1u8..=6,
        )
            .prop_map(|(symbols, b)| SparseProblem { symbols, b })
    }

    proptest! {
        #[test]
        fn sparse_stream_round_trips_and_histogram_matches(p in problem()) {
            let (gaps, syms) = sparse_entries(&p.symbols, 0, p.b);
            let positions: Vec<usize> = p.symbols.iter().enumerate().filter(|(_, &s)| s != 0).map(|(i, _)| i).collect();
            let (hist, fillers) = sparse_gap_histogram(&positions, p.symbols.len(), p.b);
            prop_assert_eq!(huffman::histogram(&gaps, 1 << p.b), hist);
            prop_assert_eq!(gaps.len(), positions.len() + fillers as usize);
            for huffman in [false, true] {
                let mut sections = Vec::new();
                let stream = build_stream(&p.symbols, 5, Some(0), Layout::Sparse, Some(p.b), huffman, &mut sections);
                let get = |name: &str| -> Result<&[u8], DecodeError> {
                    sections.iter().find(|(n, _)| n == name).map(|(_, b)| b.as_slice()).ok_or_else(|| err("missing"))
                };
                prop_assert_eq!(read_stream(&stream, p.symbols.len(), &get).unwrap(), p.symbols.clone());
            }
            prop_assert_eq!(syms.len(), gaps.len());
        }
    }
}
