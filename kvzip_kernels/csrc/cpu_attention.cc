// Fused flash-attention forward for float32 on x86-64 CPUs (AVX2 + FMA), as an XLA FFI custom call.
//
// XLA:CPU lowers softmax attention to two matmuls around a [T, S] softmax, so long encoder sequences (Whisper's
// 1,500 frames) stream a 9 MB logits array per head through memory. Here each (batch*head, query block) work item
// walks the keys in blocks with an online softmax: the logits of one query block and one key block live in an
// L2-sized tile, and no [T, S] array ever exists.
//
// Layout, per head (packed once per head per thread, reused by every query block of that head):
//   K^T panels [ceil(S/16)][D][16]   (keys past S are zero)
//   V panels   [ceil(D/16)][S16][16] (columns past D and keys past S are zero)
// Both products run a 6x16 register-blocked micro-kernel (12 ymm accumulators, broadcast A, FMA with two B
// vectors), the shape that keeps both FMA pipes busy with 16 ymm registers.
//
// Logits are kept in base 2: the queries are multiplied by scale * log2(e) when packed, so the softmax needs
// exp2(s - m), one multiply fewer per logit than exp.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMr = 6;     // micro-kernel rows
constexpr int kNr = 16;    // micro-kernel columns: two ymm vectors
constexpr int kMb = 48;    // query rows per work item (8 micro-kernel strips): K/V panels are reused 8 times per load
constexpr int kNb = 256;   // keys per block: the [48, 256] logits tile (48 KB) stays in L2 next to the packed head
constexpr int kMaxD = 256;

// Owned, 64-byte aligned float scratch (aligned loads never split a cache line).
struct Scratch {
  float* ptr = nullptr;
  explicit Scratch(size_t n) {
    size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
    ptr = static_cast<float*>(std::aligned_alloc(64, bytes == 0 ? 64 : bytes));
  }
  ~Scratch() { std::free(ptr); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// 2^x for x <= 0 (or -inf), relative error ~1e-7. x = n + f with n = round(x), |f| <= 1/2; 2^f by a degree-6
// polynomial (coefficients fitted for relative error on [-1/2, 1/2]); 2^n added into the exponent bits. Inputs
// below -126 are clamped first (so the exponent arithmetic cannot wrap into NaN or a negative number) and then
// zeroed by the mask: exp2 of a masked key (-inf) is exactly 0.
inline __m256 exp2_nonpositive(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-126.0f);
  const __m256 valid = _mm256_cmp_ps(x, lowest, _CMP_GE_OQ);
  const __m256 nan = _mm256_and_ps(x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));  // NaN in, NaN out (else 0 bits)
  x = _mm256_max_ps(x, lowest);
  // Adding 1.5 * 2^23 rounds x to an integer held in the low mantissa bits of t (round to nearest even).
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 t = _mm256_add_ps(x, magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.534581242594868e-04f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3399930903688073e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618489071726799e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550328642129898e-02f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022646248340607e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471824645996e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  // n's low bits, shifted into the exponent field, scale p (in [0.7, 1.42]) by 2^n without leaving normal range.
  const __m256i e = _mm256_slli_epi32(_mm256_castps_si256(t), 23);
  const __m256 r = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
  return _mm256_or_ps(_mm256_and_ps(r, valid), nan);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// c[6][16] = (alpha ? c * alpha[row] : 0) + a[6][0:depth] (row stride lda) @ b[depth][16]; c has row stride ldc.
// Both products of the attention: the logits (a = queries, b = one K^T panel, no alpha) and the values (a = the
// exponentials, b = one V panel), where the online softmax's rescale of the accumulator is folded into its load
// (one pass less over the accumulator).
inline void micro_6x16(const float* a, int64_t lda, const float* b, int depth, float* c, int64_t ldc,
                       const float* alpha) {
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  if (alpha == nullptr) {
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
  } else {
    __m256 s = _mm256_broadcast_ss(alpha);
    c00 = _mm256_mul_ps(s, _mm256_load_ps(c)); c01 = _mm256_mul_ps(s, _mm256_load_ps(c + 8));
    s = _mm256_broadcast_ss(alpha + 1);
    c10 = _mm256_mul_ps(s, _mm256_load_ps(c + ldc)); c11 = _mm256_mul_ps(s, _mm256_load_ps(c + ldc + 8));
    s = _mm256_broadcast_ss(alpha + 2);
    c20 = _mm256_mul_ps(s, _mm256_load_ps(c + 2 * ldc)); c21 = _mm256_mul_ps(s, _mm256_load_ps(c + 2 * ldc + 8));
    s = _mm256_broadcast_ss(alpha + 3);
    c30 = _mm256_mul_ps(s, _mm256_load_ps(c + 3 * ldc)); c31 = _mm256_mul_ps(s, _mm256_load_ps(c + 3 * ldc + 8));
    s = _mm256_broadcast_ss(alpha + 4);
    c40 = _mm256_mul_ps(s, _mm256_load_ps(c + 4 * ldc)); c41 = _mm256_mul_ps(s, _mm256_load_ps(c + 4 * ldc + 8));
    s = _mm256_broadcast_ss(alpha + 5);
    c50 = _mm256_mul_ps(s, _mm256_load_ps(c + 5 * ldc)); c51 = _mm256_mul_ps(s, _mm256_load_ps(c + 5 * ldc + 8));
  }
#pragma GCC unroll 4
  for (int x = 0; x < depth; ++x) {
    const __m256 b0 = _mm256_load_ps(b + x * kNr);
    const __m256 b1 = _mm256_load_ps(b + x * kNr + 8);
    __m256 y = _mm256_broadcast_ss(a + x);
    c00 = _mm256_fmadd_ps(y, b0, c00); c01 = _mm256_fmadd_ps(y, b1, c01);
    y = _mm256_broadcast_ss(a + lda + x);
    c10 = _mm256_fmadd_ps(y, b0, c10); c11 = _mm256_fmadd_ps(y, b1, c11);
    y = _mm256_broadcast_ss(a + 2 * lda + x);
    c20 = _mm256_fmadd_ps(y, b0, c20); c21 = _mm256_fmadd_ps(y, b1, c21);
    y = _mm256_broadcast_ss(a + 3 * lda + x);
    c30 = _mm256_fmadd_ps(y, b0, c30); c31 = _mm256_fmadd_ps(y, b1, c31);
    y = _mm256_broadcast_ss(a + 4 * lda + x);
    c40 = _mm256_fmadd_ps(y, b0, c40); c41 = _mm256_fmadd_ps(y, b1, c41);
    y = _mm256_broadcast_ss(a + 5 * lda + x);
    c50 = _mm256_fmadd_ps(y, b0, c50); c51 = _mm256_fmadd_ps(y, b1, c51);
  }
  _mm256_store_ps(c, c00); _mm256_store_ps(c + 8, c01);
  _mm256_store_ps(c + ldc, c10); _mm256_store_ps(c + ldc + 8, c11);
  _mm256_store_ps(c + 2 * ldc, c20); _mm256_store_ps(c + 2 * ldc + 8, c21);
  _mm256_store_ps(c + 3 * ldc, c30); _mm256_store_ps(c + 3 * ldc + 8, c31);
  _mm256_store_ps(c + 4 * ldc, c40); _mm256_store_ps(c + 4 * ldc + 8, c41);
  _mm256_store_ps(c + 5 * ldc, c50); _mm256_store_ps(c + 5 * ldc + 8, c51);
}

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  float* out;
  int64_t heads, t, s, d;
  float scale;
  int64_t query_blocks() const { return (t + kMb - 1) / kMb; }
  int64_t items() const { return heads * query_blocks(); }
};

// Work items in (head, query block) order, split into one contiguous range per thread, so a thread repacks K and V
// only when it crosses into the next head. A thread that runs out steals the back half of the largest remaining
// range: the cores of this machine are shared with other processes, and with a static split the call lasts as
// long as its most interrupted thread. Each range is [begin, end) packed in one 64-bit atomic, so the owner
// (taking from the front) and a thief (cutting the back) agree by compare-and-swap.
struct alignas(64) WorkRange {
  std::atomic<uint64_t> bounds{0};
  static uint64_t pack(uint64_t begin, uint64_t end) { return (begin << 32) | end; }
  void set(int64_t begin, int64_t end) { bounds.store(pack(begin, end), std::memory_order_relaxed); }
  int64_t remaining() const {
    const uint64_t v = bounds.load(std::memory_order_relaxed);
    return static_cast<int64_t>(v & 0xffffffffu) - static_cast<int64_t>(v >> 32);
  }
  int64_t take_front() {
    uint64_t v = bounds.load(std::memory_order_relaxed);
    while (true) {
      const uint64_t begin = v >> 32, end = v & 0xffffffffu;
      if (begin >= end) return -1;
      if (bounds.compare_exchange_weak(v, pack(begin + 1, end), std::memory_order_relaxed)) {
        return static_cast<int64_t>(begin);
      }
    }
  }
  // Cuts the back half (rounded up) off this range; returns false when nothing is left.
  bool steal_back(int64_t* begin_out, int64_t* end_out) {
    uint64_t v = bounds.load(std::memory_order_relaxed);
    while (true) {
      const uint64_t begin = v >> 32, end = v & 0xffffffffu;
      if (begin >= end) return false;
      const uint64_t cut = end - (end - begin + 1) / 2;
      if (bounds.compare_exchange_weak(v, pack(begin, cut), std::memory_order_relaxed)) {
        *begin_out = static_cast<int64_t>(cut);
        *end_out = static_cast<int64_t>(end);
        return true;
      }
    }
  }
};

int64_t next_item(WorkRange* ranges, int64_t threads, int64_t self) {
  while (true) {
    const int64_t item = ranges[self].take_front();
    if (item >= 0) return item;
    int64_t victim = -1, most = 0;
    for (int64_t i = 0; i < threads; ++i) {
      const int64_t left = ranges[i].remaining();
      if (i != self && left > most) {
        most = left;
        victim = i;
      }
    }
    if (victim < 0) return -1;
    int64_t begin, end;
    if (ranges[victim].steal_back(&begin, &end)) ranges[self].set(begin, end);
  }
}

void run_items(const Problem& pr, WorkRange* ranges, int64_t threads, int64_t self) {
  const int64_t d = pr.d, s = pr.s;
  const int64_t dp = (d + kNr - 1) / kNr * kNr;   // value columns padded to whole panels
  const int64_t s16 = (s + kNr - 1) / kNr * kNr;  // keys padded to whole panels
  const int64_t d_panels = dp / kNr;
  Scratch kt(s16 * d), vp(d_panels * s16 * kNr), qs(kMb * d), tile(kMb * kNb), acc(kMb * dp);
  // Out of memory: take no items; the other threads steal this one's range (attention() reports what is left).
  if (!kt.ptr || !vp.ptr || !qs.ptr || !tile.ptr || !acc.ptr) return;
  alignas(64) float m[kMb], l[kMb], alpha[kMb];
  const float qscale = pr.scale * 1.4426950408889634f;  // base-2 logits: exp(x) = exp2(x * log2(e))
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t nqb = pr.query_blocks();
  int64_t packed = -1;

  for (int64_t item; (item = next_item(ranges, threads, self)) >= 0;) {
    const int64_t h = item / nqb, q0 = (item % nqb) * kMb;
    const float* kh = pr.k + h * s * d;
    const float* vh = pr.v + h * s * d;
    if (h != packed) {
      for (int64_t j = 0; j < s16 / kNr; ++j) {
        float* panel = kt.ptr + j * d * kNr;
        for (int64_t c = 0; c < kNr; ++c) {
          const int64_t key = j * kNr + c;
          if (key < s) {
            for (int64_t x = 0; x < d; ++x) panel[x * kNr + c] = kh[key * d + x];
          } else {
            for (int64_t x = 0; x < d; ++x) panel[x * kNr + c] = 0.0f;
          }
        }
      }
      for (int64_t pnl = 0; pnl < d_panels; ++pnl) {
        float* panel = vp.ptr + pnl * s16 * kNr;
        const int64_t cols = std::min<int64_t>(kNr, d - pnl * kNr);  // 8 in a last half panel (D = 16j + 8)
        const __m256 zero = _mm256_setzero_ps();
        for (int64_t key = 0; key < s16; ++key) {
          const float* src = vh + key * d + pnl * kNr;
          _mm256_store_ps(panel + key * kNr, key < s ? _mm256_loadu_ps(src) : zero);
          _mm256_store_ps(panel + key * kNr + 8, key < s && cols == kNr ? _mm256_loadu_ps(src + 8) : zero);
        }
      }
      packed = h;
    }

    const int64_t rows = std::min<int64_t>(kMb, pr.t - q0);
    const int64_t strips = (rows + kMr - 1) / kMr;
    const int64_t rows_pad = strips * kMr;  // padded query rows are zero: their logits are 0, never written out
    const float* qh = pr.q + (h * pr.t + q0) * d;
    for (int64_t r = 0; r < rows_pad; ++r) {
      for (int64_t x = 0; x < d; ++x) qs.ptr[r * d + x] = r < rows ? qh[r * d + x] * qscale : 0.0f;
      m[r] = neg_inf;
      l[r] = 0.0f;
    }
    std::memset(acc.ptr, 0, sizeof(float) * rows_pad * dp);

    for (int64_t k0 = 0; k0 < s; k0 += kNb) {
      const int64_t nk = std::min<int64_t>(kNb, s - k0);
      const int64_t panels = (nk + kNr - 1) / kNr;
      const int64_t nk_pad = panels * kNr;
      // Logits, panel-major: one K^T panel (D x 16) stays in L1 across the block's strips.
      for (int64_t j = 0; j < panels; ++j) {
        const float* panel = kt.ptr + (k0 / kNr + j) * d * kNr;
        for (int64_t st = 0; st < strips; ++st) {
          micro_6x16(qs.ptr + st * kMr * d, d, panel, static_cast<int>(d), tile.ptr + st * kMr * kNb + j * kNr, kNb,
                     nullptr);
        }
      }
      // Keys past S (zero-padded panels) must not enter the max or the sum.
      if (nk_pad > nk) {
        for (int64_t r = 0; r < rows_pad; ++r) {
          for (int64_t c = nk; c < nk_pad; ++c) tile.ptr[r * kNb + c] = neg_inf;
        }
      }
      for (int64_t r = 0; r < rows_pad; ++r) {
        float* row = tile.ptr + r * kNb;
        __m256 mx = _mm256_set1_ps(neg_inf);
        __m256 nan = _mm256_setzero_ps();  // max_ps drops a NaN operand: a NaN logit is tracked apart, as jnp does
        for (int64_t c = 0; c < nk_pad; c += 8) {
          const __m256 x = _mm256_load_ps(row + c);
          mx = _mm256_max_ps(mx, x);
          nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        }
        const float m_new = _mm256_movemask_ps(nan) ? std::numeric_limits<float>::quiet_NaN()
                                                    : std::max(m[r], hmax(mx));
        alpha[r] = std::exp2(m[r] - m_new);  // 0 on the first block (m = -inf)
        const __m256 mv = _mm256_set1_ps(m_new);
        __m256 sum = _mm256_setzero_ps();
        for (int64_t c = 0; c < nk_pad; c += 8) {
          const __m256 pv = exp2_nonpositive(_mm256_sub_ps(_mm256_load_ps(row + c), mv));
          _mm256_store_ps(row + c, pv);
          sum = _mm256_add_ps(sum, pv);
        }
        l[r] = l[r] * alpha[r] + hsum(sum);
        m[r] = m_new;
      }
      // acc = acc * alpha + P V, panel-major: one V panel (keys x 16) is reused by every strip.
      for (int64_t pnl = 0; pnl < d_panels; ++pnl) {
        const float* panel = vp.ptr + pnl * s16 * kNr + k0 * kNr;
        for (int64_t st = 0; st < strips; ++st) {
          micro_6x16(tile.ptr + st * kMr * kNb, kNb, panel, static_cast<int>(nk_pad),
                     acc.ptr + st * kMr * dp + pnl * kNr, dp, alpha + st * kMr);
        }
      }
    }

    float* oh = pr.out + (h * pr.t + q0) * d;
    for (int64_t r = 0; r < rows; ++r) {
      const float inv = 1.0f / l[r];
      for (int64_t x = 0; x < d; ++x) oh[r * d + x] = acc.ptr[r * dp + x] * inv;
    }
  }
}

int available_cores() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

// Returns false when items were left undone (every thread failed to allocate its scratch).
bool attention(const Problem& pr) {
  const int64_t items = pr.items();
  if (items == 0) return true;
  const int64_t threads = std::min<int64_t>(available_cores(), items);
  // Equal contiguous shares to start with (items cost the same, but for a head's last, shorter query block);
  // stealing evens out whatever the other processes on these cores take.
  std::vector<WorkRange> ranges(threads);
  for (int64_t i = 0; i < threads; ++i) ranges[i].set(items * i / threads, items * (i + 1) / threads);
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int64_t i = 1; i < threads; ++i) {
    try {
      pool.emplace_back(run_items, std::cref(pr), ranges.data(), threads, i);
    } catch (const std::system_error&) {
      break;  // no more threads: the running ones steal the ranges of those never started
    }
  }
  run_items(pr, ranges.data(), threads, 0);  // the calling XLA thread runs the first share instead of idling
  for (auto& th : pool) th.join();
  for (int64_t i = 0; i < threads; ++i) {
    if (ranges[i].remaining() > 0) return false;
  }
  return true;
}

ffi::Error AttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                         ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), od = out->dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || od.size() != 4) {
    return ffi::Error::InvalidArgument("cpu attention: q, k, v and the output must have rank 4");
  }
  for (int i = 0; i < 4; ++i) {
    if (kd[i] != vd[i] || od[i] != qd[i]) return ffi::Error::InvalidArgument("cpu attention: shape mismatch");
  }
  if (qd[0] != kd[0] || qd[1] != kd[1] || qd[3] != kd[3]) {
    return ffi::Error::InvalidArgument("cpu attention: q and k differ in batch, heads or head size");
  }
  if (qd[3] % 8 != 0 || qd[3] > kMaxD || qd[3] <= 0) {
    return ffi::Error::InvalidArgument("cpu attention: head size must be a positive multiple of 8, at most 256");
  }
  if (kd[2] <= 0 && qd[2] > 0) return ffi::Error::InvalidArgument("cpu attention: no keys");
  Problem pr{q.typed_data(), k.typed_data(), v.typed_data(), out->typed_data(), qd[0] * qd[1], qd[2], kd[2], qd[3],
             scale};
  if (pr.items() >= (int64_t{1} << 31)) {  // work ranges hold item indices in 32 bits
    return ffi::Error::InvalidArgument("cpu attention: too many (batch * head, query block) items");
  }
  if (!attention(pr)) return ffi::Error::Internal("cpu attention: out of memory for the packed K/V scratch");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KvzipCpuAttentionF32, AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

// Asked through ctypes before the handler is registered, for systems where /proc/cpuinfo cannot tell: compiled for
// the baseline x86-64 ISA, so asking never runs an AVX instruction on a CPU without it.
extern "C" __attribute__((target("arch=x86-64"))) int KvzipCpuAttentionCpuSupported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
