// NF4 → float32/bfloat16 dequantization on the CPU (built and loaded by nf4_cpu.py).
//
// The frozen base's weights are decoded on every use (forward, and again in backward), so on a CPU
// this decode sits on the training step's critical path next to the GEMMs. One pass does both
// levels: a block's scale is decoded from its double-quantized uint8 code (dynamic map × second
// absmax + offset) and its 4-bit codes are looked up and scaled, 8 values per AVX2 instruction group
// (two 8-entry permutes and a blend instead of a table in memory), the blocks split over OpenMP
// threads (torch's own runtime: the library links the libgomp torch loaded).
//
// The arithmetic is the reference's, in the same order and without contraction (built with
// -ffp-contract=off): level × absmax, and for the absmax code × absmax2 + offset, each rounded to
// float32, so the values are bit-identical to nf4_reference and to bitsandbytes (tested); bfloat16
// is float32 rounded to nearest even, as torch's cast does.
//
// Layout (bitsandbytes'): value i is the high nibble of byte i/2 when i is even, the low one when
// odd; block b holds values [b·blocksize, (b+1)·blocksize); absmax2 has one entry per 256 blocks.

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kAbsmax2Block = 256;

struct Args {
  const uint8_t* packed;
  const float* absmax;         // per block, or null when double-quantized
  const uint8_t* codes;        // per block (double quantization), else null
  const float* absmax2;        // per 256 blocks (double quantization)
  const float* code_map;       // the 256-entry dynamic map (double quantization)
  float offset;
  const float* levels;         // the 16 NF4 levels
  int64_t numel;
  int64_t blocksize;
  bool bf16;
  void* out;
};

inline float block_scale(const Args& a, int64_t b) {
  if (a.codes == nullptr) return a.absmax[b];
  float s = a.code_map[a.codes[b]] * a.absmax2[b / kAbsmax2Block];
  return s + a.offset;
}

inline uint16_t to_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN, as torch rounds it
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

inline void store(const Args& a, int64_t i, float v) {
  if (a.bf16) {
    static_cast<uint16_t*>(a.out)[i] = to_bf16(v);
  } else {
    static_cast<float*>(a.out)[i] = v;
  }
}

// Values [v0, v1) of one block, one at a time: the tail and machines without AVX2.
void scalar_range(const Args& a, int64_t v0, int64_t v1, float scale) {
  for (int64_t i = v0; i < v1; ++i) {
    uint8_t byte = a.packed[i >> 1];
    uint8_t code = (i & 1) ? (byte & 0xf) : (byte >> 4);
    store(a, i, a.levels[code] * scale);
  }
}

__attribute__((target("avx2"))) inline __m256i bf16_bits(__m256 v) {
  __m256i bits = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb), 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
}

// A whole block whose first value is even (a byte boundary) and whose length is a multiple of 8.
__attribute__((target("avx2"))) void avx2_block(const Args& a, int64_t v0, int64_t len, float scale) {
  const __m256 lo = _mm256_loadu_ps(a.levels), hi = _mm256_loadu_ps(a.levels + 8);
  const __m256 s = _mm256_set1_ps(scale);
  const __m128i dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i shifts = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
  const __m256i nibble = _mm256_set1_epi32(0xf);
  const uint8_t* p = a.packed + (v0 >> 1);
  for (int64_t j = 0; j < len; j += 8) {
    int32_t four;
    std::memcpy(&four, p + (j >> 1), 4);
    __m128i bytes = _mm_shuffle_epi8(_mm_cvtsi32_si128(four), dup);
    __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(bytes), shifts), nibble);
    __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // bit 3 → sign: levels 8..15
    __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), upper);
    v = _mm256_mul_ps(v, s);
    if (a.bf16) {
      __m256i b = bf16_bits(v);
      __m128i packed16 = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(a.out) + v0 + j), packed16);
    } else {
      _mm256_storeu_ps(static_cast<float*>(a.out) + v0 + j, v);
    }
  }
}

void run_blocks(const Args& a, int64_t b0, int64_t b1, bool avx2) {
  for (int64_t b = b0; b < b1; ++b) {
    int64_t v0 = b * a.blocksize;
    int64_t v1 = v0 + a.blocksize < a.numel ? v0 + a.blocksize : a.numel;
    float scale = block_scale(a, b);
    int64_t fast = avx2 && (v0 % 2 == 0) ? ((v1 - v0) / 8) * 8 : 0;
    if (fast) avx2_block(a, v0, fast, scale);
    scalar_range(a, v0 + fast, v1, scale);
  }
}

}  // namespace

// Returns 0, or -1 for arguments it does not take (the caller then uses another path). `simd` 0 runs
// the scalar loop only (what a machine without AVX2 runs; tests compare the two).
extern "C" int qtrain_nf4_dequantize(const uint8_t* packed, const float* absmax, const uint8_t* codes,
                                     const float* absmax2, const float* code_map, float offset, const float* levels,
                                     int64_t numel, int64_t blocksize, int bf16, void* out, int num_threads,
                                     int simd) {
  if (numel < 0 || blocksize <= 0 || (absmax == nullptr && (codes == nullptr || absmax2 == nullptr ||
                                                            code_map == nullptr))) {
    return -1;
  }
  Args a{packed, absmax, codes, absmax2, code_map, offset, levels, numel, blocksize, bf16 != 0, out};
  const bool avx2 = simd != 0 && __builtin_cpu_supports("avx2");
  const int64_t n_blocks = (numel + blocksize - 1) / blocksize;
  const int64_t per_task = blocksize >= 16384 ? 1 : 16384 / blocksize;  // ~16K values per task
  const int64_t tasks = (n_blocks + per_task - 1) / per_task;
  int threads = num_threads < 1 ? 1 : num_threads;
  if (tasks < threads) threads = static_cast<int>(tasks < 1 ? 1 : tasks);
  if (threads == 1) {  // no parallel region at all: also what a forked child (one torch thread) runs
    run_blocks(a, 0, n_blocks, avx2);
    return 0;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    int64_t b0 = t * per_task, b1 = b0 + per_task < n_blocks ? b0 + per_task : n_blocks;
    run_blocks(a, b0, b1, avx2);
  }
  return 0;
}
