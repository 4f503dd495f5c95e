// y = x W^T for a weight stored in compressed-tensors' sparse-bitmask layout: the kept values of every
// row, row-major and contiguous (`values`), one bit per weight (`bitmask`, numpy packbits little
// bit order along each row: bit c % 8 of byte c / 8 is column c) and each row's first value index
// (`row_offsets`). Decode (a few tokens) reads only these bytes: a bitmask word says where the next
// popcount values go, and an expand instruction (AVX-512) or a permutation (AVX2) puts them there.
// Values are float32, bfloat16 or float16; products are accumulated in float32. Rows are split over
// torch's intra-op threads. The instruction set is chosen at run time (function target attributes,
// so one translation unit serves every CPU); `path` forces one, for tests.
//
// The caller pads `values` with at least kPad elements past the last kept value, so every path may
// load whole vectors without a mask at the end of the buffer.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define EPTS_X86 1
#endif

namespace {

constexpr int64_t kPad = 64;   // elements of padding the caller leaves after the values
constexpr int64_t kMaxTokens = 8;  // rows of x handled in one pass over the weights
// Software prefetch distance in the values stream (the mask's is a quarter): measured on weights
// streamed from DRAM (11008x4096 bf16, 0.5 and 0.7, 1 and 2 threads), 2 KiB read 6-17 % faster
// than 1 KiB, 4-8 KiB no better, and no prefetch 25 % slower.
constexpr int64_t kPrefetchBytes = 2048;

enum class Path { Portable, Avx2, Avx512, Avx512Bf16 };  // Avx512Bf16: Avx512, with vdpbf16ps for bfloat16

bool cpu_has_avx512() {
#ifdef EPTS_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2");
#else
  return false;
#endif
}

bool cpu_has_avx512_bf16() {
#ifdef EPTS_X86
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#ifdef EPTS_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

Path resolve_path(const std::string& name) {
  static const Path best = cpu_has_avx512_bf16() ? Path::Avx512Bf16
                           : cpu_has_avx512()    ? Path::Avx512
                           : cpu_has_avx2()      ? Path::Avx2
                                                 : Path::Portable;
  if (name == "auto") return best;
  if (name == "portable") return Path::Portable;
  if (name == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "the avx2 path needs AVX2, FMA and F16C, which this CPU lacks");
    return Path::Avx2;
  }
  if (name == "avx512") {
    TORCH_CHECK(cpu_has_avx512(), "the avx512 path needs AVX-512 F/BW/VL/VBMI2, which this CPU lacks");
    return Path::Avx512;
  }
  if (name == "avx512_bf16") {
    TORCH_CHECK(cpu_has_avx512_bf16(), "the avx512_bf16 path needs AVX-512 BF16, which this CPU lacks");
    return Path::Avx512Bf16;
  }
  TORCH_CHECK(false, "path must be auto, avx512_bf16, avx512, avx2 or portable, not ", name);
}

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }

// Every set bit of a row's mask, in order; the row's values are read one after another.
template <int tokens, typename V>
void rows_portable(const float* x, int64_t kpad, const V* values, const uint8_t* mask,
                   int64_t mstride, const int64_t* offsets, int64_t in_features, float* out, int64_t out_stride,
                   int64_t r0, int64_t r1) {
  const int64_t nbytes = (in_features + 7) / 8;
  for (int64_t r = r0; r < r1; ++r) {
    const V* v = values + offsets[r];
    const uint8_t* m = mask + r * mstride;
    float acc[tokens] = {0};
    for (int64_t byte = 0; byte < nbytes; ++byte) {
      unsigned bits = m[byte];
      while (bits) {
        const int64_t col = byte * 8 + __builtin_ctz(bits);
        const float w = to_float(*v++);
        for (int t = 0; t < tokens; ++t) acc[t] += w * x[t * kpad + col];
        bits &= bits - 1;
      }
    }
    for (int t = 0; t < tokens; ++t) out[t * out_stride + r] = acc[t];
  }
}

template <typename V>
void decompress_portable(const V* values, const uint8_t* mask, int64_t mstride, const int64_t* offsets,
                         int64_t in_features, V* dense, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const V* v = values + offsets[r];
    const uint8_t* m = mask + r * mstride;
    V* d = dense + (r - r0) * in_features;
    for (int64_t c = 0; c < in_features; ++c) d[c] = (m[c >> 3] >> (c & 7)) & 1 ? *v++ : V(0.0f);
  }
}

// The row's mask bits for columns [col, col + n), n <= 32, without reading past the row.
inline uint32_t mask_bits(const uint8_t* m, int64_t col, int64_t in_features, int n) {
  const int64_t left = in_features - col;
  if (left >= 32) {
    uint32_t bits;
    std::memcpy(&bits, m + col / 8, 4);
    return n == 32 ? bits : bits & ((1u << n) - 1);
  }
  uint32_t bits = 0;
  const int64_t bytes = (left + 7) / 8;
  for (int64_t b = 0; b < bytes; ++b) bits |= uint32_t(m[col / 8 + b]) << (8 * b);
  return bits;  // bits past the last column are zero (packbits pads with zeros)
}

#ifdef EPTS_X86

#define EPTS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt,bmi2")))
#define EPTS_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512bf16,popcnt,bmi2")))
#define EPTS_AVX2 __attribute__((target("avx2,fma,f16c,popcnt")))

// 32 columns a step: 32 mask bits expand the next popcount values into place (vpexpandw for
// 16-bit values, two vexpandps for float32), converted to two float32 vectors.
template <typename V>
EPTS_AVX512 inline void expand32_avx512(const V* v, uint32_t bits, __m512& lo, __m512& hi) {
  if constexpr (sizeof(V) == 4) {
    const float* f = reinterpret_cast<const float*>(v);
    lo = _mm512_maskz_expandloadu_ps(__mmask16(bits & 0xffff), f);
    hi = _mm512_maskz_expandloadu_ps(__mmask16(bits >> 16), f + __builtin_popcount(bits & 0xffff));
  } else {
    const __m512i w = _mm512_maskz_expandloadu_epi16(__mmask32(bits), v);
    const __m256i w_lo = _mm512_castsi512_si256(w), w_hi = _mm512_extracti64x4_epi64(w, 1);
    if constexpr (std::is_same_v<V, c10::BFloat16>) {
      lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w_lo), 16));
      hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w_hi), 16));
    } else {
      lo = _mm512_cvtph_ps(w_lo);
      hi = _mm512_cvtph_ps(w_hi);
    }
  }
}

template <int tokens, typename V>
EPTS_AVX512 void rows_avx512(const float* x, int64_t kpad, const V* values, const uint8_t* mask,
                             int64_t mstride, const int64_t* offsets, int64_t in_features, float* out,
                             int64_t out_stride, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const V* v = values + offsets[r];
    const uint8_t* m = mask + r * mstride;
    __m512 acc[2 * tokens];
    for (int i = 0; i < 2 * tokens; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t col = 0; col < in_features; col += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(m + col / 8) + kPrefetchBytes / 4, _MM_HINT_T0);
      const uint32_t bits = mask_bits(m, col, in_features, 32);
      if (!bits) continue;
      __m512 lo, hi;
      expand32_avx512(v, bits, lo, hi);
      v += __builtin_popcount(bits);
      for (int t = 0; t < tokens; ++t) {  // two accumulators a token: independent FMA chains
        acc[2 * t] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + t * kpad + col), acc[2 * t]);
        acc[2 * t + 1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + t * kpad + col + 16), acc[2 * t + 1]);
      }
    }
    for (int t = 0; t < tokens; ++t)
      out[t * out_stride + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[2 * t], acc[2 * t + 1]));
  }
}

// bfloat16 weights against bfloat16 inputs (a bfloat16 model's activations are bfloat16 already):
// one vdpbf16ps a token per 32 columns, products exact and summed in float32.
template <int tokens>
EPTS_AVX512_BF16 void rows_avx512_bf16(const uint16_t* x, int64_t kpad, const c10::BFloat16* values,
                                       const uint8_t* mask, int64_t mstride, const int64_t* offsets,
                                       int64_t in_features, float* out, int64_t out_stride, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const c10::BFloat16* v = values + offsets[r];
    const uint8_t* m = mask + r * mstride;
    __m512 acc[2 * tokens];
    for (int i = 0; i < 2 * tokens; ++i) acc[i] = _mm512_setzero_ps();
    int64_t col = 0;
    for (; col + 64 <= in_features; col += 64) {  // two words a step: independent chains
      // Ahead of the hardware prefetcher, which alone left one thread at half the DRAM bandwidth.
      _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(m + col / 8) + kPrefetchBytes / 4, _MM_HINT_T0);
      const uint32_t b0 = mask_bits(m, col, in_features, 32), b1 = mask_bits(m, col + 32, in_features, 32);
      const __m512i w0 = _mm512_maskz_expandloadu_epi16(__mmask32(b0), v);
      v += __builtin_popcount(b0);
      const __m512i w1 = _mm512_maskz_expandloadu_epi16(__mmask32(b1), v);
      v += __builtin_popcount(b1);
      for (int t = 0; t < tokens; ++t) {
        acc[2 * t] = _mm512_dpbf16_ps(acc[2 * t], (__m512bh)w0, (__m512bh)_mm512_loadu_si512(x + t * kpad + col));
        acc[2 * t + 1] =
            _mm512_dpbf16_ps(acc[2 * t + 1], (__m512bh)w1, (__m512bh)_mm512_loadu_si512(x + t * kpad + col + 32));
      }
    }
    for (; col < in_features; col += 32) {
      const uint32_t b0 = mask_bits(m, col, in_features, 32);
      const __m512i w0 = _mm512_maskz_expandloadu_epi16(__mmask32(b0), v);
      v += __builtin_popcount(b0);
      for (int t = 0; t < tokens; ++t)
        acc[2 * t] = _mm512_dpbf16_ps(acc[2 * t], (__m512bh)w0, (__m512bh)_mm512_loadu_si512(x + t * kpad + col));
    }
    for (int t = 0; t < tokens; ++t)
      out[t * out_stride + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[2 * t], acc[2 * t + 1]));
  }
}

template <typename V>
EPTS_AVX512 void decompress_avx512(const V* values, const uint8_t* mask, int64_t mstride, const int64_t* offsets,
                                   int64_t in_features, V* dense, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const V* v = values + offsets[r];
    const uint8_t* m = mask + r * mstride;
    V* d = dense + (r - r0) * in_features;
    for (int64_t col = 0; col < in_features; col += 32) {
      const int n = in_features - col < 32 ? int(in_features - col) : 32;
      const uint32_t bits = mask_bits(m, col, in_features, n);
      if constexpr (sizeof(V) == 4) {
        const float* f = reinterpret_cast<const float*>(v);
        float* o = reinterpret_cast<float*>(d + col);
        const __mmask16 keep_lo = __mmask16(n >= 16 ? 0xffff : (1u << n) - 1);
        const __mmask16 keep_hi = __mmask16(n > 16 ? (n == 32 ? 0xffff : (1u << (n - 16)) - 1) : 0);
        _mm512_mask_storeu_ps(o, keep_lo, _mm512_maskz_expandloadu_ps(__mmask16(bits & 0xffff), f));
        _mm512_mask_storeu_ps(o + 16, keep_hi,
                              _mm512_maskz_expandloadu_ps(__mmask16(bits >> 16), f + __builtin_popcount(bits & 0xffff)));
      } else {
        const __mmask32 keep = n == 32 ? 0xffffffffu : (1u << n) - 1;
        _mm512_mask_storeu_epi16(d + col, keep, _mm512_maskz_expandloadu_epi16(__mmask32(bits), v));
      }
      v += __builtin_popcount(bits);
    }
  }
}

// AVX2 has no expand: 8 columns a step, a mask byte picks a permutation that moves the next
// popcount values into place, and a lane mask zeroes the rest.
struct Avx2Tables {
  alignas(32) int32_t index[256][8];
  Avx2Tables() {
    for (int m = 0; m < 256; ++m) {
      int next = 0;
      for (int lane = 0; lane < 8; ++lane) index[m][lane] = (m >> lane) & 1 ? next++ : 0;
    }
  }
};
const Avx2Tables& avx2_tables() {
  static const Avx2Tables tables;
  return tables;
}

template <typename V>
EPTS_AVX2 inline __m256 expand8_avx2(const V* v, unsigned bits, const Avx2Tables& tables) {
  __m256 packed;
  if constexpr (sizeof(V) == 4) {
    packed = _mm256_loadu_ps(reinterpret_cast<const float*>(v));
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v));
    if constexpr (std::is_same_v<V, c10::BFloat16>) {
      packed = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
      packed = _mm256_cvtph_ps(h);
    }
  }
  const __m256i index = _mm256_load_si256(reinterpret_cast<const __m256i*>(tables.index[bits]));
  const __m256i lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int(bits)), lane_bits), lane_bits);
  return _mm256_and_ps(_mm256_permutevar8x32_ps(packed, index), _mm256_castsi256_ps(keep));
}

template <int tokens, typename V>
EPTS_AVX2 void rows_avx2(const float* x, int64_t kpad, const V* values, const uint8_t* mask,
                         int64_t mstride, const int64_t* offsets, int64_t in_features, float* out,
                         int64_t out_stride, int64_t r0, int64_t r1) {
  const Avx2Tables& tables = avx2_tables();
  const int64_t nbytes = (in_features + 7) / 8;
  for (int64_t r = r0; r < r1; ++r) {
    const V* v = values + offsets[r];
    const uint8_t* m = mask + r * mstride;
    __m256 acc[2 * tokens];
    for (int i = 0; i < 2 * tokens; ++i) acc[i] = _mm256_setzero_ps();
    int64_t byte = 0;
    for (; byte + 1 < nbytes; byte += 2) {  // two bytes a step: independent FMA chains
      _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(m + byte) + kPrefetchBytes / 4, _MM_HINT_T0);
      const unsigned b0 = m[byte], b1 = m[byte + 1];
      const __m256 w0 = expand8_avx2(v, b0, tables);
      v += __builtin_popcount(b0);
      const __m256 w1 = expand8_avx2(v, b1, tables);
      v += __builtin_popcount(b1);
      for (int t = 0; t < tokens; ++t) {
        acc[2 * t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + t * kpad + byte * 8), acc[2 * t]);
        acc[2 * t + 1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + t * kpad + byte * 8 + 8), acc[2 * t + 1]);
      }
    }
    if (byte < nbytes) {
      const unsigned b0 = m[byte];
      const __m256 w0 = expand8_avx2(v, b0, tables);
      for (int t = 0; t < tokens; ++t)
        acc[2 * t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + t * kpad + byte * 8), acc[2 * t]);
    }
    for (int t = 0; t < tokens; ++t) {
      const __m256 s = _mm256_add_ps(acc[2 * t], acc[2 * t + 1]);
      const __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
      const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
      out[t * out_stride + r] = _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps(d, d, 1)));
    }
  }
}

#endif  // EPTS_X86

template <int tokens, typename V>
void run_rows(Path path, const float* x, const uint16_t* x16, int64_t kpad, const V* values, const uint8_t* mask,
              int64_t mstride, const int64_t* offsets, int64_t in_features, float* out, int64_t out_stride,
              int64_t r0, int64_t r1) {
#ifdef EPTS_X86
  if constexpr (std::is_same_v<V, c10::BFloat16>) {
    if (path == Path::Avx512Bf16)
      return rows_avx512_bf16<tokens>(x16, kpad, values, mask, mstride, offsets, in_features, out, out_stride, r0, r1);
  }
  if (path == Path::Avx512 || path == Path::Avx512Bf16)
    return rows_avx512<tokens>(x, kpad, values, mask, mstride, offsets, in_features, out, out_stride, r0, r1);
  if (path == Path::Avx2)
    return rows_avx2<tokens>(x, kpad, values, mask, mstride, offsets, in_features, out, out_stride, r0, r1);
#endif
  rows_portable<tokens>(x, kpad, values, mask, mstride, offsets, in_features, out, out_stride, r0, r1);
}

// The token count as a compile-time constant, so that the accumulators stay in registers.
template <typename V>
void run_rows(Path path, int64_t tokens, const float* x, const uint16_t* x16, int64_t kpad, const V* values, const uint8_t* mask,
              int64_t mstride, const int64_t* offsets, int64_t in_features, float* out, int64_t out_stride,
              int64_t r0, int64_t r1) {
  switch (tokens) {
#define EPTS_TOKENS(n) \
  case n:              \
    return run_rows<n>(path, x, x16, kpad, values, mask, mstride, offsets, in_features, out, out_stride, r0, r1);
    EPTS_TOKENS(1) EPTS_TOKENS(2) EPTS_TOKENS(3) EPTS_TOKENS(4)
    EPTS_TOKENS(5) EPTS_TOKENS(6) EPTS_TOKENS(7) EPTS_TOKENS(8)
#undef EPTS_TOKENS
    default:
      TORCH_CHECK(false, "at most ", kMaxTokens, " tokens a pass, got ", tokens);
  }
}

void check_parts(const torch::Tensor& values, const torch::Tensor& bitmask, const torch::Tensor& row_offsets,
                 int64_t in_features) {
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous(), "values must be a contiguous 1-D tensor");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.scalar_type() == torch::kUInt8 && bitmask.is_contiguous(),
              "bitmask must be a contiguous 2-D uint8 tensor");
  TORCH_CHECK(bitmask.size(1) >= (in_features + 7) / 8, "bitmask has ", bitmask.size(1), " bytes a row; ",
              in_features, " inputs need ", (in_features + 7) / 8);
  TORCH_CHECK(row_offsets.dim() == 1 && row_offsets.scalar_type() == torch::kInt64 &&
                  row_offsets.is_contiguous() && row_offsets.size(0) == bitmask.size(0),
              "row_offsets must be a contiguous int64 tensor with one entry a row");
  TORCH_CHECK(values.device().is_cpu() && bitmask.device().is_cpu() && row_offsets.device().is_cpu(),
              "the bitmask kernels run on the CPU");
  const int64_t rows = bitmask.size(0);
  if (rows == 0) return;
  const uint8_t* last = bitmask.data_ptr<uint8_t>() + (rows - 1) * bitmask.size(1);
  int64_t kept = 0;
  for (int64_t b = 0; b < (in_features + 7) / 8; ++b) kept += __builtin_popcount(last[b]);
  // Raw reads, not row_offsets[i].item(): a decode step calls this for every layer, and tensor
  // indexing costs microseconds.
  const int64_t end = row_offsets.data_ptr<int64_t>()[rows - 1] + kept;
  TORCH_CHECK(end + kPad <= values.numel(), "values hold ", values.numel(), " elements; the bitmask needs ", end,
              " plus ", kPad, " of padding");
}

int64_t grain(int64_t rows) {
  // Contiguous row ranges a thread, a few a thread so that uneven rows even out.
  const int64_t parts = 4 * at::get_num_threads();
  return std::max<int64_t>(16, (rows + parts - 1) / parts);
}

// x: [tokens, in_features] in the values' dtype; returns [tokens, out_features] in that dtype.
torch::Tensor bitmask_linear(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& bitmask,
                             const torch::Tensor& row_offsets, int64_t in_features, const std::string& path_name) {
  check_parts(values, bitmask, row_offsets, in_features);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "x must be [tokens, ", in_features, "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), "x is ", x.scalar_type(), " but the weight is ",
              values.scalar_type());
  const Path path = resolve_path(path_name);
  const int64_t tokens = x.size(0), rows = bitmask.size(0), mstride = bitmask.size(1);
  // x once in float32 (bfloat16 for the vdpbf16ps path), each row padded to a multiple of 64 with
  // zeros: the vector paths then read whole vectors, and columns past the end meet zero mask bits.
  const int64_t kpad = (in_features + 63) / 64 * 64;
  const bool dot16 = path == Path::Avx512Bf16 && values.scalar_type() == torch::kBFloat16;
  const auto xtype = dot16 ? torch::kBFloat16 : torch::kFloat32;
  torch::Tensor xf;
  if (kpad == in_features && x.scalar_type() == xtype && x.is_contiguous()) {
    xf = x;  // already what the paths read
  } else {
    xf = torch::zeros({tokens, kpad}, xtype);
    xf.narrow(1, 0, in_features).copy_(x);
  }
  torch::Tensor out = torch::empty({tokens, rows}, torch::kFloat32);
  const uint8_t* mask = bitmask.data_ptr<uint8_t>();
  const int64_t* offsets = row_offsets.data_ptr<int64_t>();
  for (int64_t t0 = 0; t0 < tokens; t0 += kMaxTokens) {
    const int64_t n = std::min(kMaxTokens, tokens - t0);
    const float* xs = dot16 ? nullptr : xf.data_ptr<float>() + t0 * kpad;
    const uint16_t* xs16 = dot16 ? reinterpret_cast<const uint16_t*>(xf.data_ptr<at::BFloat16>()) + t0 * kpad : nullptr;
    float* os = out.data_ptr<float>() + t0 * rows;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "bitmask_linear", [&] {
      const scalar_t* v = values.data_ptr<scalar_t>();
      at::parallel_for(0, rows, grain(rows), [&](int64_t r0, int64_t r1) {
        run_rows(path, n, xs, xs16, kpad, v, mask, mstride, offsets, in_features, os, rows, r0, r1);
      });
    });
  }
  return out.scalar_type() == values.scalar_type() ? out : out.to(values.scalar_type());
}

// Rows [row0, row1) back to dense: [row1 - row0, in_features] in the values' dtype.
torch::Tensor bitmask_decompress(const torch::Tensor& values, const torch::Tensor& bitmask,
                                 const torch::Tensor& row_offsets, int64_t in_features, int64_t row0, int64_t row1,
                                 const std::string& path_name) {
  check_parts(values, bitmask, row_offsets, in_features);
  TORCH_CHECK(0 <= row0 && row0 <= row1 && row1 <= bitmask.size(0), "rows [", row0, ", ", row1, ") are outside [0, ",
              bitmask.size(0), ")");
  const Path path = resolve_path(path_name);
  torch::Tensor dense = torch::empty({row1 - row0, in_features}, values.options());
  const uint8_t* mask = bitmask.data_ptr<uint8_t>();
  const int64_t* offsets = row_offsets.data_ptr<int64_t>();
  const int64_t mstride = bitmask.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "bitmask_decompress", [&] {
    const scalar_t* v = values.data_ptr<scalar_t>();
    scalar_t* d = dense.data_ptr<scalar_t>();
    at::parallel_for(row0, row1, grain(row1 - row0), [&](int64_t r0, int64_t r1) {
#ifdef EPTS_X86
      if (path == Path::Avx512 || path == Path::Avx512Bf16)
        return decompress_avx512(v, mask, mstride, offsets, in_features, d + (r0 - row0) * in_features, r0, r1);
#endif
      decompress_portable(v, mask, mstride, offsets, in_features, d + (r0 - row0) * in_features, r0, r1);
    });
  });
  return dense;
}

std::vector<std::string> bitmask_paths() {
  std::vector<std::string> paths;
  if (cpu_has_avx512_bf16()) paths.push_back("avx512_bf16");
  if (cpu_has_avx512()) paths.push_back("avx512");
  if (cpu_has_avx2()) paths.push_back("avx2");
  paths.push_back("portable");
  return paths;
}

}  // namespace

TORCH_LIBRARY(epts_sparse, m) {
  m.def("bitmask_linear(Tensor x, Tensor values, Tensor bitmask, Tensor row_offsets, int in_features, str path) -> Tensor");
  m.def("bitmask_decompress(Tensor values, Tensor bitmask, Tensor row_offsets, int in_features, int row0, int row1, "
        "str path) -> Tensor");
  m.def("bitmask_paths() -> str[]", &bitmask_paths);
  m.def("padding() -> int", []() -> int64_t { return kPad; });
}

TORCH_LIBRARY_IMPL(epts_sparse, CPU, m) {
  m.impl("bitmask_linear", bitmask_linear);
  m.impl("bitmask_decompress", bitmask_decompress);
}
