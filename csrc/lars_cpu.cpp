// Fused LARS step on CPU: per cache block of tensors, one read pass for the norms, then one
// read-modify-write pass for the update that finds w and g still in cache.
//
// The loop and foreach paths move ~15 tensor-sized streams per step through main memory (temporaries,
// separate mul/add passes); this one moves 5: read w, g, buf and write buf, w (plus a second read of w, g
// that hits the cache). Work is split into fixed-size chunks, so big and small tensors share the thread
// pool evenly, and per-chunk partial sums are combined in a fixed order: the result does not depend on the
// number of threads.
// Narrow includes (not torch/extension.h, which pulls in the whole C++ frontend): half the build time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "dense_layout.h"

namespace {

// torch's CPU `add(a, b, alpha)` computes fma(b, alpha, a) where the CPU has FMA; doing the same keeps this
// path bit-identical to the reference loop on the updates (the build passes -mfma when the CPU has it).
inline float mul_add(float b, float alpha, float a) {
#ifdef __FMA__
  return std::fma(b, alpha, a);
#else
  return b * alpha + a;
#endif
}

constexpr int64_t kChunk = 1 << 15;  // elements per work item: 128 KiB of fp32
constexpr int64_t kBatch = 1 << 20;  // elements per cache block: w + g = 8 MiB, well inside a 32 MiB L3

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// GCC/Clang vector of 8 floats: 256-bit with AVX (implied by -mfma), two SSE registers otherwise.
typedef float float8 __attribute__((vector_size(32)));

inline float8 load8(const float* p) {
  float8 v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

// Sums of squares of w[0:n] and g[0:n], fp32 in vector lanes (two accumulators each to hide add
// latency), combined in double. Explicit vectors: the compiler will not reorder a float sum by itself.
inline void sum_squares2(const float* w, const float* g, int64_t n, double* w2, double* g2) {
  float8 aw0 = {}, aw1 = {}, ag0 = {}, ag1 = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const float8 w0 = load8(w + i), w1 = load8(w + i + 8), g0 = load8(g + i), g1 = load8(g + i + 8);
    aw0 += w0 * w0;
    aw1 += w1 * w1;
    ag0 += g0 * g0;
    ag1 += g1 * g1;
  }
  double sw = 0, sg = 0;
  for (int k = 0; k < 8; ++k) {
    sw += static_cast<double>(aw0[k]) + aw1[k];
    sg += static_cast<double>(ag0[k]) + ag1[k];
  }
  for (; i < n; ++i) {
    sw += static_cast<double>(w[i]) * w[i];
    sg += static_cast<double>(g[i]) * g[i];
  }
  *w2 = sw;
  *g2 = sg;
}


void check_group(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                 const std::vector<at::Tensor>& bufs) {
  TORCH_CHECK(params.size() == grads.size() && params.size() == bufs.size(),
              "lars_step_cpu: params, grads and bufs must have the same length");
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    for (const auto* t : {&p, &grads[i], &bufs[i]}) {
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat,
                  "lars_step_cpu: fp32 CPU tensors only");
      TORCH_CHECK(t->sizes() == p.sizes(),
                  "lars_step_cpu: param, grad and buffer must share one shape");
    }
    TORCH_CHECK(fastssl::same_dense_layout(p, grads[i], bufs[i]),
                "lars_step_cpu: param, grad and buffer must be dense with one layout");
  }
}

}  // namespace

// One LARS step over a parameter group, in place on params and bufs. See fastssl/optim/lars.py.
void lars_step_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                   const std::vector<at::Tensor>& bufs, double lr, double momentum, double weight_decay,
                   double eta, bool nesterov, bool exclude, int64_t batch_elems) {
  check_group(params, grads, bufs);
  const int64_t n_tensors = static_cast<int64_t>(params.size());
  std::vector<Chunk> chunks;
  std::vector<int64_t> first_chunk(n_tensors + 1, 0);
  for (int64_t t = 0; t < n_tensors; ++t) {
    first_chunk[t] = static_cast<int64_t>(chunks.size());
    const int64_t n = params[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({t, b, std::min(n, b + kChunk)});
  }
  first_chunk[n_tensors] = static_cast<int64_t>(chunks.size());
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  std::vector<float*> w(n_tensors), buf(n_tensors);
  std::vector<const float*> g(n_tensors);
  for (int64_t t = 0; t < n_tensors; ++t) {
    w[t] = params[t].data_ptr<float>();
    g[t] = grads[t].data_ptr<float>();
    buf[t] = bufs[t].data_ptr<float>();
  }

  const float m = static_cast<float>(momentum);
  const float wd = exclude ? 0.0f : static_cast<float>(weight_decay);
  const float neg_lr = static_cast<float>(-lr);
  std::vector<float> trust(n_tensors, 1.0f);
  std::vector<double> w2(n_chunks), g2(n_chunks);

  // Pass 1 over chunks [c0, c1) of tensors [t0, t1): partial sums of squares, then the trust ratios.
  auto norms = [&](int64_t t0, int64_t t1, int64_t c0, int64_t c1) {
    at::parallel_for(c0, c1, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const Chunk& ch = chunks[c];
        sum_squares2(w[ch.tensor] + ch.begin, g[ch.tensor] + ch.begin, ch.end - ch.begin, &w2[c], &g2[c]);
      }
    });
    for (int64_t t = t0; t < t1; ++t) {
      double sw = 0, sg = 0;
      for (int64_t c = first_chunk[t]; c < first_chunk[t + 1]; ++c) {
        sw += w2[c];
        sg += g2[c];
      }
      // Norms rounded to fp32 like torch's, then the ratio in fp32 as the reference twin computes it.
      const float wn = static_cast<float>(std::sqrt(sw));
      const float gn = static_cast<float>(std::sqrt(sg));
      if (wn > 0.0f && gn > 0.0f) {
        trust[t] = static_cast<float>(eta) * wn / (gn + static_cast<float>(weight_decay) * wn);
      }
    }
  };

  // Pass 2, chunks in reverse order (the most recently read by pass 1 first, still in cache):
  // d = trust * (g + wd * w) (or g when excluded); buf = m * buf + d; w -= lr * (buf | d + m * buf).
  auto update = [&](int64_t c0, int64_t c1) {
    at::parallel_for(c0, c1, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const Chunk& ch = chunks[c1 - 1 - (r - c0)];
        const float tr = trust[ch.tensor];
        float* __restrict__ wp = w[ch.tensor] + ch.begin;
        const float* __restrict__ gp = g[ch.tensor] + ch.begin;
        float* __restrict__ bp = buf[ch.tensor] + ch.begin;
        const int64_t n = ch.end - ch.begin;
        if (nesterov) {
          for (int64_t i = 0; i < n; ++i) {
            const float d = exclude ? gp[i] : mul_add(wp[i], wd, gp[i]) * tr;
            const float b = bp[i] * m + d;
            bp[i] = b;
            wp[i] = mul_add(mul_add(b, m, d), neg_lr, wp[i]);
          }
        } else {
          for (int64_t i = 0; i < n; ++i) {
            const float d = exclude ? gp[i] : mul_add(wp[i], wd, gp[i]) * tr;
            const float b = bp[i] * m + d;
            bp[i] = b;
            wp[i] = mul_add(b, neg_lr, wp[i]);
          }
        }
      }
    });
  };

  // Cache blocking: tensors are taken in batches of about `batch_elems` values (a bigger tensor is a batch of
  // its own); pass 1 of a batch leaves its w and g in the cache, where pass 2 finds them, so main memory sees
  // one read of w, g, buf and one write of w, buf (5 streams) instead of 7.
  if (batch_elems <= 0) batch_elems = kBatch;
  for (int64_t t0 = 0; t0 < n_tensors;) {
    int64_t t1 = t0 + 1, elems = params[t0].numel();
    while (t1 < n_tensors && elems + params[t1].numel() <= batch_elems) elems += params[t1++].numel();
    if (!exclude) norms(t0, t1, first_chunk[t0], first_chunk[t1]);
    update(first_chunk[t0], first_chunk[t1]);
    t0 = t1;
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lars_step", &lars_step_cpu, "Fused LARS step over one parameter group (fp32, CPU)", py::arg("params"),
        py::arg("grads"), py::arg("bufs"), py::arg("lr"), py::arg("momentum"), py::arg("weight_decay"),
        py::arg("eta"), py::arg("nesterov"), py::arg("exclude"), py::arg("batch_elems") = 0);
}
