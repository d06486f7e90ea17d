//! The per-element math of the quantized encodings (spec 4.5-4.7), in scalar form. The SIMD kernels
//! must produce exactly the same codes and values.

use super::fp4::{self, E2M1_LEVELS};
use crate::format::{Encoding, GroupParams};

/// bitsandbytes' NF4 levels (spec 4.7).
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Decision thresholds between neighbouring NF4 levels, computed in fp32 as the spec says.
pub fn nf4_midpoints() -> [f32; 15] {
    let mut m = [0f32; 15];
    for (k, v) in m.iter_mut().enumerate() {
        *v = (NF4_LEVELS[k] + NF4_LEVELS[k + 1]) / 2.0;
    }
    m
}

/// `SymmetricFull` is symmetric with all 2^bits levels (spec 4.6, `levels: "full"`): it decodes
/// as `Symmetric` and quantizes with the signed value of largest magnitude.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Affine {
        bits: u8,
    },
    Symmetric {
        bits: u8,
    },
    SymmetricFull {
        bits: u8,
    },
    Nf4,
    /// E2M1 elements, E8M0 block scales (spec 4.8).
    Mxfp4,
    /// E2M1 elements, E4M3 block scales times the fp32 tensor scale (spec 4.9), whose bits this
    /// holds (`from_encoding` gives 1.0: decoders set it from the `tensor_scale` part, and
    /// `quantize` computes it from the data).
    Nvfp4 {
        tensor_scale: u32,
    },
}

impl Codec {
    pub fn from_encoding(enc: &Encoding) -> Option<(Codec, GroupParams)> {
        match enc {
            Encoding::Affine(p) => Some((Codec::Affine { bits: p.bits }, *p)),
            Encoding::Symmetric(p) => Some((Codec::Symmetric { bits: p.bits }, *p)),
            Encoding::SymmetricFull(p) => Some((Codec::SymmetricFull { bits: p.bits }, *p)),
            Encoding::Nf4(p) => Some((Codec::Nf4, *p)),
            Encoding::Mxfp4(p) => Some((Codec::Mxfp4, *p)),
            Encoding::Nvfp4(p) => Some((Codec::nvfp4(1.0), *p)),
            _ => None,
        }
    }

    pub fn nvfp4(tensor_scale: f32) -> Codec {
        Codec::Nvfp4 {
            tensor_scale: tensor_scale.to_bits(),
        }
    }

    /// The NVFP4 tensor scale; 1.0 for the other codecs.
    #[inline]
    pub fn tensor_scale(self) -> f32 {
        match self {
            Codec::Nvfp4 { tensor_scale } => f32::from_bits(tensor_scale),
            _ => 1.0,
        }
    }

    pub fn is_fp4(self) -> bool {
        matches!(self, Codec::Mxfp4 | Codec::Nvfp4 { .. })
    }

    #[inline]
    pub fn bits(self) -> u8 {
        match self {
            Codec::Affine { bits } | Codec::Symmetric { bits } | Codec::SymmetricFull { bits } => {
                bits
            }
            Codec::Nf4 | Codec::Mxfp4 | Codec::Nvfp4 { .. } => 4,
        }
    }

    pub fn has_mins(self) -> bool {
        matches!(self, Codec::Affine { .. })
    }

    /// Whether a group's statistics are its min and max (else only its largest magnitude).
    pub fn signed_stats(self) -> bool {
        matches!(self, Codec::Affine { .. } | Codec::SymmetricFull { .. })
    }

    /// The codec that decodes this one's codes: the decode kernels know `Symmetric` only, and
    /// the full-level variant decodes the same way.
    #[inline]
    pub fn decoder(self) -> Codec {
        match self {
            Codec::SymmetricFull { bits } => Codec::Symmetric { bits },
            c => c,
        }
    }

    /// Offset of the symmetric codes, `2^(b-1)`.
    #[inline]
    pub fn zero(self) -> i32 {
        1 << (self.bits() - 1)
    }

    /// The value of `code` before scaling: `x̂ = level(code) * s + m`.
    #[inline]
    pub fn level(self, code: u8) -> f32 {
        match self {
            Codec::Affine { .. } => code as f32,
            Codec::Symmetric { .. } | Codec::SymmetricFull { .. } => {
                (code as i32 - self.zero()) as f32
            }
            Codec::Nf4 => NF4_LEVELS[code as usize & 15],
            Codec::Mxfp4 | Codec::Nvfp4 { .. } => E2M1_LEVELS[code as usize & 15],
        }
    }

    /// The 2^bits levels, for table-driven kernels.
    pub fn levels(self) -> Vec<f32> {
        (0..1u32 << self.bits())
            .map(|c| self.level(c as u8))
            .collect()
    }

    #[inline]
    pub fn decode(self, code: u8, s: f32, m: f32) -> f32 {
        match self {
            Codec::Affine { .. } => code as f32 * s + m,
            _ => self.level(code) * s,
        }
    }

    /// Code of one element, given the group's stored min `m` (0 unless affine) and `inv`, the
    /// group's `encode_factor`.
    #[inline]
    pub fn encode(self, x: f32, inv: f32, m: f32, mids: &[f32; 15]) -> u8 {
        match self {
            Codec::Affine { bits } => {
                let qmax = ((1u32 << bits) - 1) as f32;
                ((x - m) * inv).round_ties_even().clamp(0.0, qmax) as u8
            }
            Codec::Symmetric { bits } => {
                let qmax = ((1i32 << (bits - 1)) - 1) as f32;
                let q = (x * inv).round_ties_even().clamp(-qmax, qmax) as i32;
                (q + self.zero()) as u8
            }
            Codec::SymmetricFull { .. } => {
                let z = self.zero() as f32;
                let q = (x * inv).round_ties_even().clamp(-z, z - 1.0) as i32;
                (q + self.zero()) as u8
            }
            Codec::Nf4 => {
                let t = x * inv;
                mids.iter().filter(|&&mid| t > mid).count() as u8
            }
            // x / 2^k, exactly, as a product with 2^-k.
            Codec::Mxfp4 => fp4::e2m1_code(x, x * inv),
            // Divided, as NVIDIA's reference does (the product with 1/d can round differently).
            Codec::Nvfp4 { .. } => fp4::e2m1_code(x, x / inv),
        }
    }

    /// What `encode` takes as `inv` for a group of stored scale `s`: `1/s` (0 for s = 0), except
    /// for NVFP4, which divides by the group's full scale `s * tensor_scale`.
    #[inline]
    pub fn encode_factor(self, s: f32) -> f32 {
        match self {
            Codec::Nvfp4 { .. } => s * self.tensor_scale(),
            _ if s == 0.0 => 0.0,
            _ => 1.0 / s,
        }
    }

    /// Stored scale and min of a group from its statistics `(lo, hi)` (min and max where
    /// `signed_stats`, else `hi = max |x|`), before rounding to the scale dtype (the FP4 formats
    /// round here, to their own scale types).
    #[inline]
    pub fn raw_params(self, lo: f32, hi: f32) -> (f32, f32) {
        match self {
            Codec::Affine { bits } => ((hi - lo) / ((1u32 << bits) - 1) as f32, lo),
            Codec::Symmetric { bits } => (hi / ((1i32 << (bits - 1)) - 1) as f32, 0.0),
            Codec::SymmetricFull { .. } => {
                // The value of largest magnitude, the positive one on a tie, goes to level -zero.
                let v = if hi >= -lo { hi } else { lo };
                (v / -(self.zero() as f32), 0.0)
            }
            Codec::Nf4 => (hi, 0.0),
            // The stored value already: a power of two, or an E4M3 value.
            Codec::Mxfp4 => (fp4::e8m0_value(fp4::e8m0_of_amax(hi)), 0.0),
            Codec::Nvfp4 { .. } => (fp4::nvfp4_block_scale(hi, self.tensor_scale()), 0.0),
        }
    }
}

/// Read code `e` of a packed LSB-first stream.
#[inline]
pub fn read_code(codes: &[u8], e: usize, bits: u8) -> u8 {
    let bit = e * bits as usize;
    let byte = bit / 8;
    let shift = bit % 8;
    let lo = codes[byte] as u16;
    let hi = if shift + bits as usize > 8 {
        codes[byte + 1] as u16
    } else {
        0
    };
    (((lo | (hi << 8)) >> shift) & ((1u16 << bits) - 1)) as u8
}

/// OR code `c` into position `e` of a zero-initialized packed stream.
#[inline]
pub fn write_code(codes: &mut [u8], e: usize, bits: u8, c: u8) {
    let bit = e * bits as usize;
    let byte = bit / 8;
    let shift = bit % 8;
    let v = (c as u16) << shift;
    codes[byte] |= v as u8;
    if shift + bits as usize > 8 {
        codes[byte + 1] |= (v >> 8) as u8;
    }
}
