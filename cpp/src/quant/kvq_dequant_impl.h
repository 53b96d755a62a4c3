// Dequantization of a quantized KV record (format: quant/kvq.h), compiled once per instruction
// set: the attention kernels include it inside their own namespace (an inline function shared
// across files built with different flags could be linked to the wrong one), and quant/kvq.cc
// for the reference. Plain loops, or intrinsics doing their operations lane by lane: without
// FMA contraction (the attention files' flags) every path dequantizes to the same floats.
//
// Not a standalone header: the including file defines the namespace and includes quant/kvq.h,
// <cstring> and (where built for AVX2 or AVX-512) <immintrin.h>.

// 16 codes as floats: out = mul * code + add (keys) or mul * (code - add) (values), in vectors
// where the including file is built for AVX2 or AVX-512; the codes are 16 bytes (8 bits) or 8
// bytes b of 4-bit ones (b[0] & 15, b[0] >> 4, b[1] & 15, ...). The same operations lane by lane
// as the scalar loops below, so the same floats; the compiler left those loops scalar (a
// TinyLlama-shaped layer's attention at 1024 positions spent 40% of its time in them).
#if defined(__AVX2__)
#define ACCEL_DQ_VECTORS 1
template <int kBits>
inline __m128i dq_codes16(const uint8_t* b) {
  if constexpr (kBits == 8) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  } else {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b)), m = _mm_set1_epi8(15);
    return _mm_unpacklo_epi8(_mm_and_si128(v, m), _mm_and_si128(_mm_srli_epi16(v, 4), m));
  }
}
template <int kBits, bool kSubtract>
inline void dq16(const uint8_t* b, float mul, float add, float* out) {
  const __m128i codes = dq_codes16<kBits>(b);
#if defined(__AVX512F__)
  const __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes));
  _mm512_storeu_ps(out, kSubtract ? _mm512_mul_ps(_mm512_set1_ps(mul), _mm512_sub_ps(x, _mm512_set1_ps(add)))
                                  : _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(mul), x), _mm512_set1_ps(add)));
#else
  for (int h = 0; h < 2; ++h) {
    const __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(h ? _mm_srli_si128(codes, 8) : codes));
    _mm256_storeu_ps(out + 8 * h, kSubtract ? _mm256_mul_ps(_mm256_set1_ps(mul), _mm256_sub_ps(x, _mm256_set1_ps(add)))
                                            : _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(mul), x), _mm256_set1_ps(add)));
  }
#endif
}
#endif

inline void dequantize_k(const KvqLayout& l, const uint8_t* rec, float* kt) {
  float unit[3];
  std::memcpy(unit, rec, sizeof(unit));
  const int hd = l.head_dim, bs = l.block_size;
  const uint8_t* codes = rec + l.k_codes;
  for (int c = 0; c < hd; ++c) {
    const float step = unit[0] * static_cast<float>(rec[l.sc + c]);
    const float min = unit[1] + unit[2] * static_cast<float>(rec[l.mc + c]);
    float* row = kt + static_cast<int64_t>(c) * bs;
    const int64_t base = static_cast<int64_t>(c) * bs;
#ifdef ACCEL_DQ_VECTORS
    if (bs % 16 == 0) {
      for (int j = 0; j < bs; j += 16) {
        if (l.bits == 8)
          dq16<8, false>(codes + base + j, step, min, row + j);
        else
          dq16<4, false>(codes + (base + j) / 2, step, min, row + j);
      }
      continue;
    }
#endif
    if (l.bits == 8) {
      for (int j = 0; j < bs; ++j) row[j] = step * static_cast<float>(codes[base + j]) + min;
    } else if (bs % 2 == 0) {
      const uint8_t* b = codes + base / 2;
      for (int j = 0; j < bs / 2; ++j) {
        row[2 * j] = step * static_cast<float>(b[j] & 15) + min;
        row[2 * j + 1] = step * static_cast<float>(b[j] >> 4) + min;
      }
    } else {
      for (int j = 0; j < bs; ++j) {
        const int64_t i = base + j;
        row[j] = step * static_cast<float>((codes[i >> 1] >> ((i & 1) * 4)) & 15) + min;
      }
    }
  }
}

inline void dequantize_v(const KvqLayout& l, const uint8_t* rec, float* v) {
  const int hd = l.head_dim, bs = l.block_size;
  const uint8_t* codes = rec + l.v_codes;
  for (int j = 0; j < bs; ++j) {
    uint16_t h;
    std::memcpy(&h, rec + l.v_step + 2 * j, sizeof(h));
    const uint32_t bits = static_cast<uint32_t>(h) << 16;  // bfloat16
    float step;
    std::memcpy(&step, &bits, sizeof(step));
    const float zero = static_cast<float>(rec[l.v_zero + j]);
    float* row = v + static_cast<int64_t>(j) * hd;
    const int64_t base = static_cast<int64_t>(j) * hd;
#ifdef ACCEL_DQ_VECTORS
    if (hd % 16 == 0) {
      for (int c = 0; c < hd; c += 16) {
        if (l.bits == 8)
          dq16<8, true>(codes + base + c, step, zero, row + c);
        else
          dq16<4, true>(codes + (base + c) / 2, step, zero, row + c);
      }
      continue;
    }
#endif
    if (l.bits == 8) {
      for (int c = 0; c < hd; ++c) row[c] = step * (static_cast<float>(codes[base + c]) - zero);
    } else {  // head_dim is even: a row starts on a byte
      const uint8_t* b = codes + base / 2;
      for (int c = 0; c < hd / 2; ++c) {
        row[2 * c] = step * (static_cast<float>(b[c] & 15) - zero);
        row[2 * c + 1] = step * (static_cast<float>(b[c] >> 4) - zero);
      }
    }
  }
}

#undef ACCEL_DQ_VECTORS
