// CPU kernel for qlab's most common fake-quant: a symmetric integer grid with absmax scales
// shared by groups of consecutive elements along one axis (per tensor, per channel, per group).
// Python side, eligibility and build: qlab/numerics/native.py.
//
// XLA:CPU runs fake_quant as a reduction fusion and an elementwise fusion, two passes over
// memory that are compute-bound on 2 cores (benchmarks/fake_quant.py). This kernel does a
// group's two passes back to back while the group is in cache, with fewer instructions per
// element (the max of |x| runs on the magnitude bits as integers), on all CPUs.
// Groups too large for the cache are split into bands of rows: every band's partial maxima
// first, then every band's outputs.
//
// The arithmetic is step for step that of qlab/numerics/quantize.py as XLA:CPU executes it,
// so results are bit-identical (tests/test_native.py checks it):
//   amax  = max |x| over the group's finite values (0 if none)
//   s     = amax * (1 / denom); s = 1 where s is not positive and finite
//   s     = round-to-nearest-even into the scale dtype (f16 clipped to [2^-24, 65504]), back to f32
//   q     = clamp(roundeven(x * (1 / s)), qmin, qmax), with -0 replaced by +0; NaN stays NaN
//   y     = q * s
// Denormals: XLA:CPU runs with flush-to-zero / denormals-are-zero; worker threads copy the
// calling thread's floating-point control register so every thread computes alike.
//
// View: x is [outer, n, inner] (row-major); groups are `group` consecutive indices of the n
// axis (the last group may be shorter: identical to zero padding, which never raises a max).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#include <vector>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#ifdef __linux__
#include <sched.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QLAB_X86 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// y may be x itself (a donated input): element j is read before it is written, so the loops
// vectorize safely, which the compiler cannot prove on its own.
#if defined(__clang__)
#define QLAB_INPLACE_SAFE _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define QLAB_INPLACE_SAFE _Pragma("GCC ivdep")
#else
#define QLAB_INPLACE_SAFE
#endif

namespace {

struct Params {
  int64_t outer, n, inner, group;
  float qmin, qmax, inv_denom;
  int32_t scale_kind;  // 0 f32, 1 f16, 2 bf16
};

inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// f32 -> f16 -> f32 for a value already clipped to [2^-24, 65504], round to nearest even.
inline float round_f16(float s) {
  uint32_t u = bits_of(s);
  int32_t e = int32_t((u >> 23) & 0xff) - 127;
  if (e >= -14) {  // normal f16: keep 10 mantissa bits
    uint32_t rest = u & 0x1fff, h = u >> 13;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h += 1;
    return float_of(h << 13);
  }
  // subnormal f16: a multiple of 2^-24 (scaling by powers of two is exact)
  float t = s * 16777216.0f;
  return ((t + 12582912.0f) - 12582912.0f) * (1.0f / 16777216.0f);  // t <= 1024: see code()
}

inline float round_bf16(float s) {
  uint32_t u = bits_of(s);
  u += 0x7fff + ((u >> 16) & 1);
  return float_of(u & 0xffff0000u);
}

inline float stored_scale(float amax, const Params& p) {
  float s = amax * p.inv_denom;
  if (!(s > 0.0f) || !std::isfinite(s)) s = 1.0f;
  if (p.scale_kind == 1) {
    s = std::min(std::max(s, 5.9604644775390625e-08f), 65504.0f);
    s = round_f16(s);
  } else if (p.scale_kind == 2) {
    s = round_bf16(s);
  }
  return s;
}

// clamp(roundeven(v * inv)) == roundeven(clamp(v * inv)) for integer bounds; after the clamp
// |r| <= 255, where adding and removing 1.5 * 2^23 rounds to the nearest even integer (and
// turns -0 into +0). NaN compares false, passes the clamp and stays NaN, as in XLA's clamp.
inline float code(float v, float inv, float qmin, float qmax) {
  float r = v * inv;
  r = r < qmin ? qmin : r;
  r = r > qmax ? qmax : r;
  return (r + 12582912.0f) - 12582912.0f;
}

// Max |x| over finite values. The hot loop takes the max of the magnitude bits as unsigned
// integers (same order as the floats, NaN and inf above every finite value) on the integer
// units; only a group that holds a NaN or inf is scanned again with the finite filter.
constexpr uint32_t kAbsMask = 0x7fffffffu, kInfBits = 0x7f800000u;

inline float finite_abs(float v) {
  float a = std::fabs(v);
  return a < INFINITY ? a : 0.0f;
}

// Rows are taken kRows at a time so that each per-column value (running max, scale, 1/scale)
// is loaded once per kRows elements: loading it for every element made these loops twice as
// slow as memory bandwidth allows.
constexpr int64_t kRows = 8;

// m[j] = max(m[j], |x[r, j]|) over rows [0, rows) of a row-major block with row stride `stride`.
void col_absmax_bits(const float* x, int64_t rows, int64_t stride, int64_t w, uint32_t* m) {
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) {
    const uint32_t* b = reinterpret_cast<const uint32_t*>(x + r * stride);
    for (int64_t j = 0; j < w; ++j) {
      uint32_t v = m[j];
      for (int64_t k = 0; k < kRows; ++k) {
        const uint32_t u = b[k * stride + j] & kAbsMask;
        v = u > v ? u : v;
      }
      m[j] = v;
    }
  }
  for (; r < rows; ++r) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(x + r * stride);
    for (int64_t j = 0; j < w; ++j) {
      const uint32_t u = row[j] & kAbsMask;
      m[j] = u > m[j] ? u : m[j];
    }
  }
}

float col_finite_absmax(const float* x, int64_t rows, int64_t stride) {
  float m = 0.0f;
  for (int64_t r = 0; r < rows; ++r) m = std::max(m, finite_abs(x[r * stride]));
  return m;
}

uint32_t seg_absmax_bits(const float* x, int64_t len) {
  const uint32_t* v = reinterpret_cast<const uint32_t*>(x);
  uint32_t m = 0;
  for (int64_t i = 0; i < len; ++i) {
    uint32_t u = v[i] & kAbsMask;
    m = u > m ? u : m;
  }
  return m;
}

// Scales from magnitude bits; a column whose max is NaN/inf is rescanned (rows, stride); with
// w = 1 and stride 1 the "column" is a contiguous segment.
void scales_from_bits(const uint32_t* m, int64_t w, const float* x, int64_t rows, int64_t stride,
                      const Params& p, float* s, float* inv) {
  for (int64_t j = 0; j < w; ++j) {
    float a = m[j] < kInfBits ? float_of(m[j]) : col_finite_absmax(x + j, rows, stride);
    s[j] = stored_scale(a, p);
    inv[j] = 1.0f / s[j];
  }
}

constexpr int64_t kStrip = 1024;  // columns per strip: the strip's scales stay in L1

// Where results go: the fake-quantized values `y`, or (quantize) the integer codes and the
// scales. Offsets are element indices into x's layout.
struct Out {
  float* y = nullptr;
  uint8_t* codes = nullptr;  // int8 or uint8 codes, stored as bytes
  float* scale = nullptr;  // [outer, ngroups, inner]
  bool signed_codes = true;
};

// codes of w elements (NaN has no code: 0, as qlab.quantize stores); `inv` advances with the
// element when `stride` is 1, stays fixed when it is 0.
template <bool Signed>
void emit_codes(const float* __restrict x, uint8_t* __restrict codes, int64_t w, const float* __restrict inv,
                int64_t stride, float qmin, float qmax) {
  for (int64_t j = 0; j < w; ++j) {
    float r = code(x[j], inv[j * stride], qmin, qmax);
    r = r != r ? 0.0f : r;
    const int32_t c = static_cast<int32_t>(r);
    codes[j] = Signed ? static_cast<uint8_t>(static_cast<int8_t>(c)) : static_cast<uint8_t>(c);
  }
}

inline void emit(const Out& o, const float* x, int64_t at, int64_t w, const float* inv, int64_t stride,
                 float qmin, float qmax) {
  if (o.signed_codes) {
    emit_codes<true>(x + at, o.codes + at, w, inv, stride, qmin, qmax);
  } else {
    emit_codes<false>(x + at, o.codes + at, w, inv, stride, qmin, qmax);
  }
}

// code(x * inv) * s over a rows x inner block starting at element `at`, strip by strip.
void apply_block(const float* x, const Out& o, int64_t at, int64_t rows, int64_t inner, const float* s,
                 const float* inv, float qmin, float qmax) {
  for (int64_t c0 = 0; c0 < inner; c0 += kStrip) {
    const int64_t w = std::min(kStrip, inner - c0);
    const float* sv = s + c0;
    const float* iv = inv + c0;
    int64_t r = 0;
    if (o.y) {
      for (; r + kRows <= rows; r += kRows) {
        const int64_t base = at + r * inner + c0;
        const float* b = x + base;
        float* out = o.y + base;
        QLAB_INPLACE_SAFE
        for (int64_t j = 0; j < w; ++j) {
          const float a = iv[j], c = sv[j];
          for (int64_t k = 0; k < kRows; ++k) out[k * inner + j] = code(b[k * inner + j], a, qmin, qmax) * c;
        }
      }
    }
    for (; r < rows; ++r) {
      const int64_t base = at + r * inner + c0;
      const float* row = x + base;
      if (o.y) {
        float* out = o.y + base;
        QLAB_INPLACE_SAFE
        for (int64_t j = 0; j < w; ++j) out[j] = code(row[j], iv[j], qmin, qmax) * sv[j];
      } else {
        emit(o, x, base, w, iv, 1, qmin, qmax);
      }
    }
  }
}

void apply_seg(const float* x, const Out& o, int64_t at, int64_t len, float s, float inv, float qmin,
               float qmax) {
  if (o.y) {
    float* out = o.y + at;
    const float* v = x + at;
    QLAB_INPLACE_SAFE
    for (int64_t i = 0; i < len; ++i) out[i] = code(v[i], inv, qmin, qmax) * s;
  } else {
    emit(o, x, at, len, &inv, 0, qmin, qmax);
  }
}

// Worker threads of this library, one fewer than the CPUs this process may use (the caller
// works too). XLA:CPU's intra-op pool (ffi::ThreadPool) was tried first: its threads picked
// up scheduled work only milliseconds later, after the caller had done most of it alone.
// Idle workers sleep on a condition variable.
class WorkerPool {
 public:
  WorkerPool() {
    int64_t cpus = std::thread::hardware_concurrency();
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) cpus = CPU_COUNT(&set);
#endif
    for (int64_t i = 1; i < std::max<int64_t>(cpus, 1); ++i) {
      std::thread([this] { Loop(); }).detach();
      ++threads_;
    }
  }
  int64_t num_threads() const { return threads_; }
  void Schedule(std::function<void()> f) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(f));
    }
    cv_.notify_one();
  }

 private:
  void Loop() {
    for (;;) {
      std::function<void()> f;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return !queue_.empty(); });
        f = std::move(queue_.front());
        queue_.pop_front();
      }
      f();
    }
  }
  int64_t threads_ = 0;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
};

WorkerPool& Workers() {
  static WorkerPool* pool = new WorkerPool();  // never destroyed: workers outlive static destructors
  return *pool;
}

// Runs task(t) for t in [0, ntasks) on the caller and the worker pool. The caller waits only
// for tasks that were claimed, never for workers still queued, so it cannot deadlock when the
// workers are busy (e.g. with another call's tasks); state queued workers touch is shared-owned.
struct Shared {
  std::atomic<int64_t> next{0}, finished{0};
  int64_t ntasks = 0;
  unsigned csr = 0;
  const void* fn = nullptr;
  void (*call)(const void*, int64_t) = nullptr;
};

inline void drain(Shared& sh) {
#ifdef QLAB_X86
  unsigned old = _mm_getcsr();
  _mm_setcsr(sh.csr);
#endif
  for (;;) {
    int64_t t = sh.next.fetch_add(1, std::memory_order_relaxed);
    if (t >= sh.ntasks) break;
    sh.call(sh.fn, t);
    sh.finished.fetch_add(1, std::memory_order_release);
  }
#ifdef QLAB_X86
  _mm_setcsr(old);
#endif
}

template <typename F>
void parallel_for(int64_t ntasks, int64_t work_per_task, const F& f) {
  auto sh = std::make_shared<Shared>();
  sh->ntasks = ntasks;
  sh->fn = &f;
  sh->call = [](const void* fn, int64_t t) { (*static_cast<const F*>(fn))(t); };
#ifdef QLAB_X86
  sh->csr = _mm_getcsr();
#endif
  int64_t workers = 0;
  if (ntasks > 1 && ntasks * work_per_task >= (int64_t(1) << 16)) {
    workers = std::min<int64_t>(Workers().num_threads(), ntasks - 1);
  }
  for (int64_t i = 0; i < workers; ++i) Workers().Schedule([sh] { drain(*sh); });
  drain(*sh);
  while (sh->finished.load(std::memory_order_acquire) < ntasks) std::this_thread::yield();
}

// A group whose block (group rows x inner) is at most this size is done in one task, both
// passes while it is in cache; larger groups are split into bands of rows: all bands' maxima
// first, then all bands' outputs (forwards: walking backwards, to reuse what the first pass
// left in the last-level cache, measured slower).
constexpr int64_t kFusedBytes = int64_t(4) << 20;
constexpr int64_t kBandBytes = int64_t(512) << 10;

ffi::Error Run(const float* xp, int64_t size, const Out& out, int64_t n, int64_t inner,
               int64_t group, float qmin, float qmax, float inv_denom, int32_t scale_kind) {
  if (n <= 0 || inner <= 0 || group <= 0 || size % (n * inner) != 0) {
    return ffi::Error::InvalidArgument("qlab fake_quant kernel: bad view (n, inner, group)");
  }
  if (scale_kind < 0 || scale_kind > 2) {
    return ffi::Error::InvalidArgument("qlab fake_quant kernel: scale_kind must be 0 (f32), 1 (f16) or 2 (bf16)");
  }
  Params p{size / (n * inner), n, inner, std::min(group, n), qmin, qmax, inv_denom, scale_kind};
  const int64_t ngroups = (p.n + p.group - 1) / p.group;
  const int64_t nblocks = p.outer * ngroups;
  auto block_rows = [&](int64_t b, int64_t* start) {  // first element and row count of block b
    const int64_t o = b / ngroups, g = b % ngroups;
    *start = (o * p.n + g * p.group) * p.inner;
    return std::min(p.group, p.n - g * p.group);
  };
  const int64_t block_bytes = p.group * p.inner * 4;
  const int64_t threads = std::max<int64_t>(1, Workers().num_threads());

  if (block_bytes <= kFusedBytes && (nblocks >= 2 * threads || size < (int64_t(1) << 16))) {
    // one task per run of whole blocks
    const int64_t per = std::max<int64_t>(1, kBandBytes / block_bytes);
    const int64_t ntasks = (nblocks + per - 1) / per;
    parallel_for(ntasks, per * p.group * p.inner, [&](int64_t t) {
      std::vector<uint32_t> m(p.inner);
      std::vector<float> sv(p.inner), iv(p.inner);
      for (int64_t b = t * per; b < std::min(nblocks, (t + 1) * per); ++b) {
        int64_t start;
        const int64_t rows = block_rows(b, &start);
        if (p.inner == 1) {
          const uint32_t mb = seg_absmax_bits(xp + start, rows);
          float sc, inv;
          scales_from_bits(&mb, 1, xp + start, rows, 1, p, &sc, &inv);
          if (out.scale) out.scale[b] = sc;
          apply_seg(xp, out, start, rows, sc, inv, p.qmin, p.qmax);
        } else {
          std::fill(m.begin(), m.end(), 0u);
          col_absmax_bits(xp + start, rows, p.inner, p.inner, m.data());
          scales_from_bits(m.data(), p.inner, xp + start, rows, p.inner, p, sv.data(), iv.data());
          if (out.scale) std::copy(sv.begin(), sv.end(), out.scale + b * p.inner);
          apply_block(xp, out, start, rows, p.inner, sv.data(), iv.data(), p.qmin, p.qmax);
        }
      }
    });
    return ffi::Error::Success();
  }

  // Large groups: bands of rows (for inner == 1, runs of elements) within each block.
  const int64_t row_bytes = p.inner * 4;
  const int64_t band = std::max<int64_t>(1, std::min(p.group, kBandBytes / row_bytes));
  const int64_t nbands = (p.group + band - 1) / band;
  const int64_t ntasks = nblocks * nbands;
  std::vector<uint32_t> partial(ntasks * p.inner, 0u);
  auto band_rows = [&](int64_t t, int64_t* start) {
    const int64_t b = t / nbands, k = t % nbands;
    const int64_t rows = block_rows(b, start);
    *start += k * band * p.inner;
    return std::max<int64_t>(0, std::min(band, rows - k * band));
  };
  parallel_for(ntasks, band * p.inner, [&](int64_t t) {
    int64_t start;
    const int64_t rows = band_rows(t, &start);
    uint32_t* m = partial.data() + t * p.inner;
    if (p.inner == 1) {
      *m = seg_absmax_bits(xp + start, rows);
    } else {
      col_absmax_bits(xp + start, rows, p.inner, p.inner, m);
    }
  });
  std::vector<float> sv(nblocks * p.inner), iv(nblocks * p.inner);
  parallel_for(nblocks, nbands * p.inner, [&](int64_t b) {
    uint32_t* m = partial.data() + b * nbands * p.inner;
    for (int64_t k = 1; k < nbands; ++k) {
      const uint32_t* mk = m + k * p.inner;
      for (int64_t j = 0; j < p.inner; ++j) m[j] = mk[j] > m[j] ? mk[j] : m[j];
    }
    int64_t start;
    const int64_t rows = block_rows(b, &start);
    scales_from_bits(m, p.inner, xp + start, rows, p.inner, p, sv.data() + b * p.inner, iv.data() + b * p.inner);
  });
  if (out.scale) std::copy(sv.begin(), sv.end(), out.scale);
  parallel_for(ntasks, band * p.inner, [&](int64_t t) {
    const int64_t b = t / nbands;
    int64_t start;
    const int64_t rows = band_rows(t, &start);
    if (p.inner == 1) {
      apply_seg(xp, out, start, rows, sv[b], iv[b], p.qmin, p.qmax);
    } else {
      apply_block(xp, out, start, rows, p.inner, sv.data() + b * p.inner, iv.data() + b * p.inner, p.qmin,
                  p.qmax);
    }
  });
  return ffi::Error::Success();
}

ffi::Error FakeQuantIntImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y, int64_t n,
                            int64_t inner, int64_t group, float qmin, float qmax, float inv_denom,
                            int32_t scale_kind) {
  Out out;
  out.y = y->typed_data();
  return Run(x.typed_data(), static_cast<int64_t>(x.element_count()), out, n, inner, group, qmin, qmax,
             inv_denom, scale_kind);
}

ffi::Error QuantizeIntImpl(ffi::Buffer<ffi::F32> x, ffi::Result<ffi::AnyBuffer> codes,
                           ffi::ResultBuffer<ffi::F32> scale, int64_t n, int64_t inner, int64_t group,
                           float qmin, float qmax, float inv_denom, int32_t scale_kind) {
  const int64_t size = static_cast<int64_t>(x.element_count());
  const auto ct = codes->element_type();
  if ((ct != ffi::DataType::S8 && ct != ffi::DataType::U8) || static_cast<int64_t>(codes->element_count()) != size) {
    return ffi::Error::InvalidArgument("qlab quantize kernel: codes must be int8/uint8 of x's size");
  }
  const int64_t groups = (n + std::min(group, n) - 1) / std::min(group, n);
  if (n <= 0 || inner <= 0 || size % (n * inner) != 0 ||
      static_cast<int64_t>(scale->element_count()) != size / (n * inner) * groups * inner) {
    return ffi::Error::InvalidArgument("qlab quantize kernel: scale must hold outer x groups x inner values");
  }
  Out out;
  out.codes = static_cast<uint8_t*>(codes->untyped_data());
  out.signed_codes = ct == ffi::DataType::S8;
  out.scale = scale->typed_data();
  return Run(x.typed_data(), size, out, n, inner, group, qmin, qmax, inv_denom, scale_kind);
}

// The attributes both handlers take (qlab/numerics/native.py: _attrs).
template <typename Binding>
auto WithViewAttrs(Binding b) {
  return std::move(b)
      .template Attr<int64_t>("n")
      .template Attr<int64_t>("inner")
      .template Attr<int64_t>("group")
      .template Attr<float>("qmin")
      .template Attr<float>("qmax")
      .template Attr<float>("inv_denom")
      .template Attr<int32_t>("scale_kind");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QlabFakeQuantInt, FakeQuantIntImpl,
                              WithViewAttrs(ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QlabQuantizeInt, QuantizeIntImpl,
                              WithViewAttrs(ffi::Ffi::Bind()
                                                .Arg<ffi::Buffer<ffi::F32>>()
                                                .Ret<ffi::AnyBuffer>()
                                                .Ret<ffi::Buffer<ffi::F32>>()));
