// What two passes over memory cost on this machine: the floor under any per-channel fake-quant
// of a weight whose channels span all its rows (the max of each column needs every row before
// the first output), against the one-pass reference of benchmarks/fake_quant.py.
//
//     g++ -O3 -march=native -pthread benchmarks/read_floor.cc -o /tmp/read_floor && /tmp/read_floor
//
// float32[4096, 4096] on all CPUs, each case after a pass that rewrites the array (as a fresh
// input would be), the cases interleaved; min and median over repeats. Rows:
//   multiply in place   x *= 1.0001 (the reference: one read, one write)
//   read-only max|x|    one read, no write (the first pass of a two-pass op)
//   max, then multiply  both in turn: the least a two-pass in-place op can cost
//   strips of w cols    both passes per column strip (4096 x w floats: 4 and 16 MB), in the hope
//                       that the second pass finds the strip in cache (it does not run faster here)
// No kernel and no XLA here: only memory traffic, so the ratios are what the hardware allows.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <thread>
#include <vector>

namespace {

constexpr int64_t kN = int64_t(4096) * 4096;

int64_t num_cpus() { return std::max(1u, std::thread::hardware_concurrency()); }

// f(i) for i in [0, num_cpus()), one thread per CPU (the caller runs i = 0).
void per_cpu(const std::function<void(int64_t)>& f) {
  std::vector<std::thread> ts;
  for (int64_t i = 1; i < num_cpus(); ++i) ts.emplace_back(f, i);
  f(0);
  for (auto& th : ts) th.join();
}

// f(begin, end) on contiguous slices of [0, kN), one per CPU.
void on_all_cpus(const std::function<void(int64_t, int64_t)>& f) {
  const int64_t t = num_cpus();
  per_cpu([&](int64_t i) { f(kN * i / t, kN * (i + 1) / t); });
}

float g_sink;  // keeps the read-only pass from being optimized away

void multiply(float* x) {
  on_all_cpus([x](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) x[i] *= 1.0001f;
  });
}

// max |x| as the max of the magnitude bits (integers order like the floats; the loop vectorizes,
// where a float max chain would be bound by its latency, not by memory).
void read_max(const float* x) {
  on_all_cpus([x](int64_t a, int64_t b) {
    const uint32_t* u = reinterpret_cast<const uint32_t*>(x);
    uint32_t m = 0;
    for (int64_t i = a; i < b; ++i) m = std::max(m, u[i] & 0x7fffffffu);
    g_sink += float(m);
  });
}

// Both passes strip by strip: columns [c, c + w) of every row, max then multiply, so a strip
// (4096 x w floats) could be re-read from cache. Each CPU takes every t-th strip.
void strips(float* x, int64_t w) {
  const int64_t rows = 4096, cols = kN / rows, t = num_cpus();
  per_cpu([=](int64_t first) {
    std::vector<uint32_t> m(w);
    for (int64_t c = first * w; c < cols; c += t * w) {
      std::fill(m.begin(), m.end(), 0u);
      for (int64_t r = 0; r < rows; r += 8) {  // 8 rows per load of m, as qlab's kernel does
        const uint32_t* u = reinterpret_cast<const uint32_t*>(x + r * cols + c);
        for (int64_t j = 0; j < w; ++j) {
          uint32_t v = m[j];
          for (int64_t k = 0; k < 8; ++k) v = std::max(v, u[k * cols + j] & 0x7fffffffu);
          m[j] = v;
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* row = x + r * cols + c;
        for (int64_t j = 0; j < w; ++j) row[j] *= 1.0001f;
      }
      g_sink += float(m[0]);
    }
  });
}

void rewrite(float* x) {
  on_all_cpus([x](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) x[i] = x[i] * 0.5f + 1.0f;
  });
}

}  // namespace

int main(int argc, char** argv) {
  const int repeats = argc > 1 ? std::atoi(argv[1]) : 40;
  float* x = static_cast<float*>(std::aligned_alloc(64, kN * sizeof(float)));
  for (int64_t i = 0; i < kN; ++i) x[i] = float(i % 1000) * 1e-3f;
  const char* names[] = {"multiply in place", "read-only max|x|", "max, then multiply", "strips of 256 cols",
                         "strips of 1024 cols"};
  constexpr int kCases = 5;
  std::vector<double> ms[kCases];
  for (int r = 0; r < repeats; ++r) {
    for (int c = 0; c < kCases; ++c) {
      rewrite(x);
      const auto t0 = std::chrono::steady_clock::now();
      if (c >= 3) {
        strips(x, c == 3 ? 256 : 1024);
      } else {
        if (c != 0) read_max(x);
        if (c != 1) multiply(x);
      }
      ms[c].push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
  }
  double mins[kCases], meds[kCases];
  for (int c = 0; c < kCases; ++c) {
    std::sort(ms[c].begin(), ms[c].end());
    mins[c] = ms[c][0];
    meds[c] = ms[c][ms[c].size() / 2];
  }
  std::printf("%-20s %8s %8s %10s %10s\n", "case", "min ms", "med ms", "x ref(min)", "x ref(med)");
  for (int c = 0; c < kCases; ++c) {
    std::printf("%-20s %8.2f %8.2f %10.2f %10.2f\n", names[c], mins[c], meds[c], mins[c] / mins[0], meds[c] / meds[0]);
  }
  std::printf("summary: float32[4096,4096], %u CPUs: a read-only pass costs %.2fx of x*1.0001 in place; "
              "a two-pass in-place op costs at least %.2fx, %.2fx in cache-sized column strips (min times)\n",
              unsigned(num_cpus()), mins[1] / mins[0], mins[2] / mins[0],
              std::min(mins[3], mins[4]) / mins[0]);
  return g_sink == -1.0f;  // never: the sink must stay live
}
