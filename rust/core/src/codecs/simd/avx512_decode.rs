//! AVX-512 dequantize (F, BW, VL, VBMI) of 2-, 3-, 4- and 8-bit codes (the widths `avx512::by_codec!`
//! dispatches; the unpacking tables cover 1 to 7 bits). Codes are unpacked a vector at a time
//! at any bit offset: a byte permute (vpermb) gives each 64-bit lane the bytes that
//! hold its codes and a multishift (vpmultishiftqb) moves each code into its slot. Masked loads
//! and stores take the ends of a run, so no element goes to scalar code and no byte past the
//! codes is read or written.
//!
//! With one scale per group and codes of at most 4 bits, the 2^bits outputs of a group are
//! decoded (the same multiply and add as `scalar`) and narrowed once, and every element is a
//! table lookup: vpermw for 16-bit outputs, 32 per vector; vpermps for fp32. Otherwise (8-bit
//! codes, or a scale per element) each element is decoded and narrowed. Either way the values
//! are `scalar`'s, bit for bit.

use std::arch::x86_64::*;

use super::avx2::{
    codec_of, looked_up, lut, out_size, prefetch_in, prefetch_out, AFF, OF16, OF32, SYM, SYMF,
};

/// Byte permutation and multishift control that unpack codes of `b` bits, starting at bit `r`
/// (0..8) of the loaded bytes, into `slots` slots of `64 / slots` bytes (32 words or 16
/// dwords). Qword lane `l` gets the 8 bytes from the byte that holds its first code; each slot's
/// bytes then take the 8 bits from its code on (the caller masks the code's `b` bits).
const fn unpack_table(b: usize, slots: usize) -> [[[u8; 64]; 2]; 8] {
    let mut t = [[[0u8; 64]; 2]; 8];
    if b == 0 || b > 8 {
        return t;
    }
    let per_lane = slots / 8;
    let width = 64 / slots;
    let mut r = 0;
    while r < 8 {
        let mut l = 0;
        while l < 8 {
            let src = (r + per_lane * l * b) / 8;
            let mut j = 0;
            while j < 8 {
                t[r][0][8 * l + j] = (src + j) as u8;
                j += 1;
            }
            let mut i = 0;
            while i < per_lane {
                let shift = r + (per_lane * l + i) * b - 8 * src;
                let mut k = 0;
                while k < width {
                    t[r][1][8 * l + i * width + k] = shift as u8;
                    k += 1;
                }
                i += 1;
            }
            l += 1;
        }
        r += 1;
    }
    t
}

const fn unpack_tables(slots: usize) -> [[[[u8; 64]; 2]; 8]; 9] {
    let mut t = [[[[0u8; 64]; 2]; 8]; 9];
    let mut b = 1;
    while b < 8 {
        t[b] = unpack_table(b, slots);
        b += 1;
    }
    t
}

/// By bits, then bit offset: (permutation, control) into words and into dwords.
static UNPACK_WORDS: [[[[u8; 64]; 2]; 8]; 9] = unpack_tables(32);
static UNPACK_DWORDS: [[[[u8; 64]; 2]; 8]; 9] = unpack_tables(16);

/// How to read the vectors of one run: codes of `B` bits from bit `r` of byte `p` on.
#[derive(Clone, Copy)]
struct Reader {
    perm: __m512i,
    ctrl: __m512i,
    /// code mask in every slot
    mask: __m512i,
    r: usize,
    /// The end of the codes.
    end: *const u8,
}

impl Reader {
    /// A reader of 32 word slots (`WORDS`) or 16 dword slots, for codes from bit `bit` on.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn new<const B: u8, const WORDS: bool>(bit: usize, end: *const u8) -> Reader {
        let r = bit & 7;
        let t = if WORDS {
            &UNPACK_WORDS[B as usize][r]
        } else {
            &UNPACK_DWORDS[B as usize][r]
        };
        let low = (1u32 << B) - 1;
        Reader {
            perm: _mm512_loadu_si512(t[0].as_ptr().cast()),
            ctrl: _mm512_loadu_si512(t[1].as_ptr().cast()),
            mask: if WORDS {
                _mm512_set1_epi16(low as i16)
            } else {
                _mm512_set1_epi32(low as i32)
            },
            r,
            end,
        }
    }

    /// The `n` codes (at most a vector) from byte `p`, one per slot; slots past `n` hold junk.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
    unsafe fn codes<const B: u8, const WORDS: bool>(&self, p: *const u8, n: usize) -> __m512i {
        // Unmasked loads, of no more bytes than the lanes read (a 64-byte load at a 4- or
        // 8-byte step crosses a cache line most times, and that doubled the time per vector),
        // except near the end of the codes.
        let width = load_width(B, WORDS);
        let whole = p <= self.end.wrapping_sub(width);
        let bytes = (self.r + n * B as usize).div_ceil(8);
        if B == 8 {
            let d = if whole {
                _mm_loadu_si128(p.cast())
            } else {
                _mm_maskz_loadu_epi8(low_bits(bytes) as __mmask16, p.cast())
            };
            return _mm512_cvtepu8_epi32(d);
        }
        let d = if !whole {
            _mm512_maskz_loadu_epi8(low_bits(bytes), p.cast())
        } else if width == 16 {
            _mm512_zextsi128_si512(_mm_loadu_si128(p.cast()))
        } else if width == 32 {
            _mm512_zextsi256_si512(_mm256_loadu_si256(p.cast()))
        } else {
            _mm512_loadu_si512(p.cast())
        };
        let c = _mm512_multishift_epi64_epi8(self.ctrl, _mm512_permutexvar_epi8(self.perm, d));
        if B <= 4 {
            // The lookups read the low 4 (vpermps) or 5 (vpermw) bits of a slot, and the
            // tables repeat every 2^B entries (`levels`), so the bits above the code can stay.
            c
        } else {
            _mm512_and_si512(c, self.mask)
        }
    }
}

/// Bytes to load for one vector: enough for every byte the permutation of `unpack_table`
/// reads, at most `(7 + (slots - 1) * b) / 8 + 8` (16 for 2- to 4-bit dwords, 32 for words).
const fn load_width(b: u8, words: bool) -> usize {
    let slots = if words { 32 } else { 16 };
    // The last slot's code starts at most at bit 7 + (slots - 1) * b; 8 bytes from its byte.
    let last = ((7 + (slots - 1) * b as usize) >> 3) + 8;
    if b == 8 || last <= 16 {
        16
    } else if last <= 32 {
        32
    } else {
        64
    }
}

/// The lowest `n` (1..=64) bits set.
#[inline]
fn low_bits(n: usize) -> u64 {
    u64::MAX >> (64 - n)
}

/// Levels of codec `K` for the indices 0..16, repeating every 2^B (so that an index may keep
/// the bits above its code).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn levels<const K: u8, const B: u8>() -> __m512 {
    if looked_up::<K>() {
        return _mm512_loadu_ps(lut::<K>().as_ptr());
    }
    let codec = codec_of::<K, B>();
    let low = ((1u32 << B) - 1) as usize;
    let mut a = [0f32; 16];
    for (c, v) in a.iter_mut().enumerate() {
        *v = codec.level((c & low) as u8);
    }
    _mm512_loadu_ps(a.as_ptr())
}

/// The 16 levels of a group with scale `s` and min `m` (affine), as fp32.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn group_levels<const K: u8>(lv: __m512, s: f32, m: f32) -> __m512 {
    let v = _mm512_mul_ps(lv, _mm512_set1_ps(s));
    if K == AFF {
        _mm512_add_ps(v, _mm512_set1_ps(m))
    } else {
        v
    }
}

/// The 16 outputs of a group with scale `s` and min `m` (affine) as output type `O`: floats, or
/// 16 words twice (for vpermw's 5-bit indices).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
unsafe fn table<const K: u8, const O: u8>(lv: __m512, s: f32, m: f32) -> __m512i {
    let v = group_levels::<K>(lv, s, m);
    if O == OF32 {
        _mm512_castps_si512(v)
    } else {
        narrow::<O>(v, v)
    }
}

/// Output type bf16 narrowed by AVX-512 BF16 (`narrow_bf16_native`), for the kernels of the
/// `avx512bf16` table only: the functions it is used in must enable avx512bf16 and avx512dq
/// (an entry point that does is what the instruction inlines into).
pub(super) const OBF16N: u8 = 3;

/// Two vectors of fp32 as 32 words of output type `O` (fp16 or bf16), `a`'s first, rounded as
/// `half`'s `from_f32`. Narrowing two at a time gives one full 64-byte store: stored alone, the
/// conversion folds into its store form (vcvtps2ph / vpmovdw to memory), which AMD cores run
/// several times slower.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
unsafe fn narrow<const O: u8>(a: __m512, b: __m512) -> __m512i {
    if O == OF16 {
        let lo = _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(a);
        let hi = _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(b);
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
    } else if O == OBF16N {
        narrow_bf16_native(a, b)
    } else {
        narrow_bf16(a, b)
    }
}

/// `narrow` to bf16 in integer registers (any AVX-512 CPU).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn narrow_bf16(a: __m512, b: __m512) -> __m512i {
    // Word 2i + 1 (index bit 5 picks `b`): the high half of each rounded dword.
    static HIGH_WORDS: [u16; 32] = {
        let mut t = [0u16; 32];
        let mut i = 0;
        while i < 32 {
            t[i] = 2 * i as u16 + 1;
            i += 1;
        }
        t
    };
    let idx = _mm512_loadu_si512(HIGH_WORDS.as_ptr().cast());
    _mm512_permutex2var_epi16(bf16_round(a), idx, bf16_round(b))
}

/// `narrow_bf16` by one vcvtne2ps2bf16 where neither vector holds a subnormal. The instruction
/// rounds to nearest even and makes a NaN its high half with the quiet bit set, as `half`
/// does, but flushes subnormal inputs to a signed zero where `half` rounds them: those pairs
/// take `narrow_bf16`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16")]
unsafe fn narrow_bf16_native(a: __m512, b: __m512) -> __m512i {
    const SUBNORMAL: i32 = 0x20; // vfpclassps category: denormal
    let sub = _mm512_fpclass_ps_mask::<SUBNORMAL>(a) | _mm512_fpclass_ps_mask::<SUBNORMAL>(b);
    if sub == 0 {
        // The first operand fills the high half.
        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(b, a))
    } else {
        narrow_bf16(a, b)
    }
}

/// fp32 with its high half rounded to bf16 as `half::bf16::from_f32`: round to nearest even by
/// adding 0x7fff plus the lowest kept bit, and a NaN kept NaN by setting the quiet bit (the
/// AVX-512 BF16 instruction would flush subnormals to zero instead). Five operations where
/// shifting the lowest kept bit down and the result back took eight and a slow vpmovdw.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn bf16_round(v: __m512) -> __m512i {
    let x = _mm512_castps_si512(v);
    let odd = _mm512_test_epi32_mask(x, _mm512_set1_epi32(0x1_0000));
    let down = _mm512_add_epi32(x, _mm512_set1_epi32(0x7fff));
    let biased = _mm512_mask_add_epi32(down, odd, x, _mm512_set1_epi32(0x8000));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    _mm512_mask_or_epi32(biased, nan, x, _mm512_set1_epi32(0x40_0000))
}

/// 16 dword codes decoded with scales `s` and mins `m` (affine), as fp32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
unsafe fn decode16<const K: u8, const B: u8>(
    c: __m512i,
    lv: __m512,
    s: __m512,
    m: __m512,
) -> __m512 {
    let lv = if B <= 4 {
        _mm512_permutexvar_ps(c, lv)
    } else if K == SYM || K == SYMF {
        _mm512_cvtepi32_ps(_mm512_sub_epi32(c, _mm512_set1_epi32(1 << (B - 1))))
    } else {
        _mm512_cvtepi32_ps(c)
    };
    let v = _mm512_mul_ps(lv, s);
    if K == AFF {
        _mm512_add_ps(v, m)
    } else {
        v
    }
}

/// The reader `run` needs for codes from bit `bit` on: words for the 16-bit lookups (TAB).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn reader<const B: u8, const O: u8, const TAB: bool>(bit: usize, end: *const u8) -> Reader {
    if TAB && O != OF32 {
        Reader::new::<B, true>(bit, end)
    } else {
        Reader::new::<B, false>(bit, end)
    }
}

/// Decode `n` elements from element `e` of `codes` into `o` (`rd`: `reader` at `e`'s bit):
/// looked up in `tab` (`table`), or, without TAB, decoded with the scale and min at `sp`/`mp`
/// (one per element with VEC, fp16 with H, else fp32; without VEC one fp32 for all).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn run<
    const K: u8,
    const B: u8,
    const O: u8,
    const TAB: bool,
    const VEC: bool,
    const H: bool,
>(
    codes: *const u8,
    rd: &Reader,
    e: usize,
    n: usize,
    tab: __m512i,
    lv: __m512,
    sp: *const u8,
    mp: *const u8,
    o: *mut u8,
) {
    let size = out_size::<O>();
    let words = TAB && O != OF32;
    let lanes = if words { 32 } else { 16 };
    let bit = e * B as usize;
    debug_assert_eq!(rd.r, bit & 7);
    let mut p = codes.add(bit / 8);
    let step = lanes * B as usize / 8;
    let (vs, vm) = if VEC {
        (_mm512_setzero_ps(), _mm512_setzero_ps())
    } else {
        let m = if K == AFF { *mp.cast::<f32>() } else { 0.0 };
        (_mm512_set1_ps(*sp.cast::<f32>()), _mm512_set1_ps(m))
    };
    // 32 words looked up from the codes at `p` (`k` <= 32 of them valid).
    macro_rules! words {
        ($k:expr, $p:expr) => {
            _mm512_permutexvar_epi16(rd.codes::<B, true>($p, $k), tab)
        };
    }
    // 16 fp32 values of elements `i..i + k` (k <= 16) from the codes at `p`.
    macro_rules! floats {
        ($i:expr, $k:expr, $p:expr) => {{
            let (i, k, p): (usize, usize, *const u8) = ($i, $k, $p);
            let c = rd.codes::<B, false>(p, k);
            if TAB {
                _mm512_permutexvar_ps(c, _mm512_castsi512_ps(tab))
            } else {
                // Whole vectors load unmasked (faster); a tail reads only its own lanes.
                let keep = low_bits(k) as __mmask16;
                let load = |q: *const u8| {
                    if H {
                        let q = q.add(2 * i).cast();
                        _mm512_cvtph_ps(if k == 16 {
                            _mm256_loadu_si256(q)
                        } else {
                            _mm256_maskz_loadu_epi16(keep, q.cast())
                        })
                    } else {
                        let q = q.add(4 * i).cast::<f32>();
                        if k == 16 {
                            _mm512_loadu_ps(q)
                        } else {
                            _mm512_maskz_loadu_ps(keep, q)
                        }
                    }
                };
                let s = if VEC { load(sp) } else { vs };
                let m = if VEC && K == AFF { load(mp) } else { vm };
                decode16::<K, B>(c, lv, s, m)
            }
        }};
    }
    let mut i = 0;
    if words {
        while i + 32 <= n {
            prefetch_out(o, i * size);
            // The codes too: with the hardware prefetcher alone, 16-bit rows ran 5-20% slower.
            prefetch_in(p, 0);
            _mm512_storeu_si512(o.add(i * size).cast(), words!(32, p));
            p = p.add(step);
            i += 32;
        }
        if i < n {
            let k = n - i;
            let dst = o.add(i * size);
            if k == 16 {
                // A 16-element group (NVFP4): half a vector, unmasked.
                _mm256_storeu_si256(dst.cast(), _mm512_castsi512_si256(words!(k, p)));
            } else {
                _mm512_mask_storeu_epi16(dst.cast(), low_bits(k) as __mmask32, words!(k, p));
            }
        }
    } else if O == OF32 {
        while i + 16 <= n {
            prefetch_out(o, i * size);
            _mm512_storeu_ps(o.add(i * size).cast(), floats!(i, 16, p));
            p = p.add(step);
            i += 16;
        }
        if i < n {
            let v = floats!(i, n - i, p);
            _mm512_mask_storeu_ps(o.add(i * size).cast(), low_bits(n - i) as __mmask16, v);
        }
    } else {
        let half = 2 * B as usize; // code bytes of 16 elements
        while i + 32 <= n {
            let v = narrow::<O>(floats!(i, 16, p), floats!(i + 16, 16, p.add(half)));
            prefetch_out(o, i * size);
            if B == 8 {
                prefetch_in(p, 0);
            }
            _mm512_storeu_si512(o.add(i * size).cast(), v);
            p = p.add(2 * half);
            i += 32;
        }
        if i < n {
            let k = n - i;
            let a = floats!(i, k.min(16), p);
            let b = if k > 16 {
                floats!(i + 16, k - 16, p.add(half))
            } else {
                a
            };
            let dst = o.add(i * size).cast();
            _mm512_mask_storeu_epi16(dst, low_bits(k) as __mmask32, narrow::<O>(a, b));
        }
    }
}

/// The entry points, compiled with the instruction sets `$features`: the helpers above inline
/// into them (an intrinsic only inlines into a function that enables its instruction set, and
/// the bodies are too large for the inliner to move into a caller that does).
macro_rules! entry_points {
    ($features:literal) => {
        /// `out[i] = decode(code[first + i], s[i / g], m[i / g])`: groups of `g` (the last may be
        /// shorter), each decoded with its own table (or scale) in one pass.
        #[target_feature(enable = $features)]
        pub(in crate::codecs::simd) unsafe fn dq_groups<const K: u8, const B: u8, const O: u8>(
            codes: &[u8],
            first: usize,
            g: usize,
            s: &[f32],
            m: &[f32],
            out: &mut [u8],
        ) {
            let size = out_size::<O>();
            let n = out.len() / size;
            if n == 0 {
                return;
            }
            assert!(g > 0 && (first + n) * B as usize <= codes.len() * 8);
            let groups = n.div_ceil(g);
            assert!(s.len() >= groups && (K != AFF || m.len() >= groups));
            let lv = levels::<K, B>();
            let (p, o) = (codes.as_ptr(), out.as_mut_ptr());
            let end = p.wrapping_add(codes.len());
            let zero = _mm512_setzero_si512();
            // Groups of a whole number of bytes all start at the same bit offset: one reader.
            let same = (g * B as usize).is_multiple_of(8);
            let bit0 = first * B as usize;
            let (rt, rv) = (
                reader::<B, O, true>(bit0, end),
                reader::<B, O, false>(bit0, end),
            );
            let mut j0 = 0;
            if B <= 4 && O != OF32 && g == 16 && same {
                // 16-element groups (NVFP4) two at a time: one 32-word table (a group per half) and
                // one 64-byte store per pair; alone, each group paid a whole vector's overhead.
                let half = _mm512_maskz_set1_epi16(0xffff_0000, 16);
                let low = _mm512_set1_epi16(15);
                let step = 32 * B as usize / 8;
                let mut pc = p.add(bit0 / 8);
                while j0 + 2 <= groups && (j0 + 2) * 16 <= n {
                    let sp = s.as_ptr().add(j0);
                    let (m0, m1) = if K == AFF {
                        (m[j0], m[j0 + 1])
                    } else {
                        (0.0, 0.0)
                    };
                    // One narrowing for both tables: `narrow(a, b)` puts a's 16 words first.
                    let tab = narrow::<O>(
                        group_levels::<K>(lv, *sp, m0),
                        group_levels::<K>(lv, *sp.add(1), m1),
                    );
                    // (code & 15) | 16 in the upper half: the second group's table.
                    let c =
                        _mm512_ternarylogic_epi32::<0xea>(rt.codes::<B, true>(pc, 32), low, half);
                    let dst = o.add(j0 * 16 * size);
                    prefetch_out(dst, 0);
                    prefetch_in(pc, 0);
                    _mm512_storeu_si512(dst.cast(), _mm512_permutexvar_epi16(c, tab));
                    pc = pc.add(step);
                    j0 += 2;
                }
            }
            if B <= 4 && O != OF32 && same && g.is_multiple_of(32) {
                // Whole groups of 32-word vectors in one loop, a table per group (g32: Q4_0,
                // MXFP4): `run`'s setup per group cost as much as the group's one vector.
                let step = 32 * B as usize / 8;
                let mut pc = p.add(bit0 / 8);
                let mut dst = o;
                while (j0 + 1) * g <= n {
                    let mj = if K == AFF { *m.get_unchecked(j0) } else { 0.0 };
                    let tab = table::<K, O>(lv, *s.get_unchecked(j0), mj);
                    let mut k = 0;
                    while k < g {
                        let c = rt.codes::<B, true>(pc, 32);
                        prefetch_out(dst, k * size);
                        prefetch_in(pc, 0);
                        _mm512_storeu_si512(
                            dst.add(k * size).cast(),
                            _mm512_permutexvar_epi16(c, tab),
                        );
                        pc = pc.add(step);
                        k += 32;
                    }
                    dst = dst.add(g * size);
                    j0 += 1;
                }
            }
            if B == 8 && O != OF32 && g.is_multiple_of(32) {
                // 8-bit codes to 16-bit outputs, whole groups in one loop: through `run`, each
                // 64-element group paid a call's setup for two vectors, and the decode is
                // compute-bound here (in cache 22 GB/s against memcpy's 49).
                let mut pc = p.add(first);
                let mut dst = o;
                while (j0 + 1) * g <= n {
                    let vs = _mm512_set1_ps(*s.get_unchecked(j0));
                    let vm = if K == AFF {
                        _mm512_set1_ps(*m.get_unchecked(j0))
                    } else {
                        _mm512_setzero_ps()
                    };
                    let mut k = 0;
                    while k < g {
                        let c0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(pc.add(k).cast()));
                        let c1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(pc.add(k + 16).cast()));
                        let v = narrow::<O>(
                            decode16::<K, B>(c0, lv, vs, vm),
                            decode16::<K, B>(c1, lv, vs, vm),
                        );
                        prefetch_out(dst, k * size);
                        prefetch_in(pc, k);
                        _mm512_storeu_si512(dst.add(k * size).cast(), v);
                        k += 32;
                    }
                    pc = pc.add(g);
                    dst = dst.add(g * size);
                    j0 += 1;
                }
            }
            for j in j0..groups {
                let e = j * g;
                let len = g.min(n - e);
                let bit = (first + e) * B as usize;
                let sp = s.as_ptr().add(j).cast::<u8>();
                let mp = if K == AFF {
                    m.as_ptr().add(j).cast()
                } else {
                    sp
                };
                let dst = o.add(e * size);
                if B <= 4 {
                    let mj = if K == AFF { m[j] } else { 0.0 };
                    let tab = table::<K, O>(lv, s[j], mj);
                    let rd = if same {
                        rt
                    } else {
                        reader::<B, O, true>(bit, end)
                    };
                    run::<K, B, O, true, false, false>(
                        p,
                        &rd,
                        first + e,
                        len,
                        tab,
                        lv,
                        sp,
                        mp,
                        dst,
                    );
                } else {
                    let rd = if same {
                        rv
                    } else {
                        reader::<B, O, false>(bit, end)
                    };
                    run::<K, B, O, false, false, false>(
                        p,
                        &rd,
                        first + e,
                        len,
                        zero,
                        lv,
                        sp,
                        mp,
                        dst,
                    );
                }
            }
        }

        /// `out[i] = decode(code[first + i], s, m)`.
        #[target_feature(enable = $features)]
        pub(in crate::codecs::simd) unsafe fn dq_bcast<const K: u8, const B: u8, const O: u8>(
            codes: &[u8],
            first: usize,
            s: f32,
            m: f32,
            out: &mut [u8],
        ) {
            let g = (out.len() / out_size::<O>()).max(1);
            dq_groups::<K, B, O>(codes, first, g, &[s], &[m], out)
        }

        /// `out[i] = decode(code[first + i], s[i], m[i])` (`m` is empty without mins).
        #[target_feature(enable = $features)]
        pub(in crate::codecs::simd) unsafe fn dq_vec<const K: u8, const B: u8, const O: u8>(
            codes: &[u8],
            first: usize,
            s: &[f32],
            m: &[f32],
            out: &mut [u8],
        ) {
            let n = out.len() / out_size::<O>();
            assert!(s.len() >= n && (K != AFF || m.len() >= n));
            let (sp, mp) = (s.as_ptr().cast(), m.as_ptr().cast());
            vec_run::<K, B, O, false>(codes, first, sp, mp, out)
        }

        /// `dq_vec` with the scales and mins as fp16 bytes, widened as they are loaded.
        #[target_feature(enable = $features)]
        pub(in crate::codecs::simd) unsafe fn dq_vec_f16<const K: u8, const B: u8, const O: u8>(
            codes: &[u8],
            first: usize,
            s: &[u8],
            m: &[u8],
            out: &mut [u8],
        ) {
            let n = out.len() / out_size::<O>();
            assert!(s.len() >= 2 * n && (K != AFF || m.len() >= 2 * n));
            vec_run::<K, B, O, true>(codes, first, s.as_ptr(), m.as_ptr(), out)
        }

        /// The body of `dq_vec` (H: fp16 scales and mins), whose callers checked `sp`/`mp`.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn vec_run<const K: u8, const B: u8, const O: u8, const H: bool>(
            codes: &[u8],
            first: usize,
            sp: *const u8,
            mp: *const u8,
            out: &mut [u8],
        ) {
            let n = out.len() / out_size::<O>();
            if n == 0 {
                return;
            }
            assert!((first + n) * B as usize <= codes.len() * 8);
            let mp = if K == AFF { mp } else { sp };
            let zero = _mm512_setzero_si512();
            let lv = levels::<K, B>();
            let (p, o) = (codes.as_ptr(), out.as_mut_ptr());
            let end = p.wrapping_add(codes.len());
            let rd = reader::<B, O, false>(first * B as usize, end);
            run::<K, B, O, false, true, H>(p, &rd, first, n, zero, lv, sp, mp, o);
        }
    };
}

/// The `avx512` table's entry points.
pub(super) mod exact {
    use super::*;
    entry_points!("avx512f,avx512bw,avx512vl,avx512vbmi,avx2,f16c");
}

/// The `avx512bf16` table's entry points: the same, also with the instruction sets of
/// `narrow_bf16_native` (output type `OBF16N`).
pub(super) mod native {
    use super::*;
    entry_points!("avx512f,avx512bw,avx512vl,avx512vbmi,avx2,f16c,avx512dq,avx512bf16");
}
