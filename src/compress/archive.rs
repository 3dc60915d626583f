//! `model.mpz` through the forms' representations: the container is `formats::mpz`'s; what
//! each tensor's entry holds and how it decodes is [`coding::Repr`]'s.

use super::coding::{self, Payload, Repr};
use crate::formats::mpz::{self, Representation, Stored};
use crate::formats::{FormatError, Tensor, TensorSet};

impl Representation for Repr {
    fn decode<'a>(
        &self,
        shape: &[usize],
        section: &dyn Fn(&str) -> Result<&'a [u8], String>,
    ) -> Result<Option<Vec<f32>>, String> {
        let section = |name: &str| section(name).map_err(coding::DecodeError);
        coding::decode(self, shape, &section).map_err(|e| e.0)
    }
}

/// Writes the archive for a run: `restored` are the dense restored tensors, `payloads` one
/// per tensor (a `Raw` payload without sections stores the restored tensor's bytes).
pub fn write(
    set: &TensorSet,
    restored: &[Tensor],
    payloads: &[Payload],
) -> Result<Vec<u8>, FormatError> {
    if restored.len() != payloads.len() {
        return Err(FormatError::Write(
            "one payload per tensor is needed".into(),
        ));
    }
    let stored: Vec<Stored<Repr>> = restored
        .iter()
        .zip(payloads)
        .map(|(t, p)| Stored {
            repr: &p.repr,
            sections: if p.repr.is_raw() && p.sections.is_empty() {
                vec![("data", t.data.as_slice())]
            } else {
                p.sections
                    .iter()
                    .map(|(name, bytes)| (name.as_str(), bytes.as_slice()))
                    .collect()
            },
        })
        .collect();
    mpz::write(set, restored, &stored)
}

/// Parses an archive and rebuilds the dense model: the tensors equal the job's `restored`
/// artifact bit for bit.
pub fn read(bytes: &[u8]) -> Result<TensorSet, FormatError> {
    mpz::read::<Repr>(bytes)
}
