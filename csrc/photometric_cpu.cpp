// The photometric stage fused on CPU: one view of a batch, uint8 or float crops in, normalized float32
// channels-last out (see pipelines/photometric.py, whose torch path is this kernel's reference twin).
//
// The torch path makes ~30 passes over the batch in memory (each op reads and writes whole tensors, hue
// builds several temporaries, blur pads and shifts). Here each image is processed in strips of whole rows
// small enough to stay in L1: a strip is loaded once (any input strides), every op runs over it as a plain
// loop over float arrays (vectorized by the compiler), and it is written once, normalized and interleaved.
// Two things are not pointwise:
//  * contrast blends with the image's mean luma at its place in the image's order: a first pass over the strips
//    applies the ops before contrast and sums the luma (the second pass recomputes them rather than keeping
//    the image in a buffer);
//  * Gaussian blur: strips of images that blur go through the horizontal pass into a per-thread image
//    buffer, then a vertical pass per output row accumulates the kernel's rows, solarizes and normalizes.
// The maths is the torch path's op for op in fp32 (same luma weights, hexcone hue with the same tie order,
// same clamps, same blur weights and padding); the build disables FMA contraction so products round as
// torch's separate ops do (the blur alone uses FMAs, as torch's convolution does). Images are handed to threads dynamically (their cost varies with hue and blur);
// each image's result does not depend on the thread count.
// Narrow includes (not torch/extension.h): half the build time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// pipelines.photometric.GRAY_WEIGHTS (ITU-R 601-2 luma), rounded to fp32 as torch rounds the scalars.
constexpr float kWR = 0.2989f, kWG = 0.587f, kWB = 0.114f;
// Pixels per strip (whole rows): 3 channels x 2048 x 4 B = 24 KiB, inside a 32 KiB L1.
constexpr int64_t kStripPixels = 2048;

enum Op : int64_t { kBrightness = 0, kContrast = 1, kSaturation = 2, kHue = 3 };
enum Flag : int32_t { kGray = 1, kBlur = 2, kSolarize = 4 };

inline float clamp01(float v) { return std::min(std::max(v, 0.0f), 1.0f); }
inline float luma(float r, float g, float b) { return r * kWR + g * kWG + b * kWB; }

// ---- pointwise ops over a strip (n pixels, planar r, g, b) ------------------------------------------------

void brightness(float* __restrict__ r, float* __restrict__ g, float* __restrict__ b, int64_t n, float f) {
  for (int64_t i = 0; i < n; ++i) {
    r[i] = clamp01(r[i] * f);
    g[i] = clamp01(g[i] * f);
    b[i] = clamp01(b[i] * f);
  }
}

// x * f + other * (1 - f), clamped: torch's _blend_ with a per-pixel `other` (saturation: the pixel's luma).
void saturation(float* __restrict__ r, float* __restrict__ g, float* __restrict__ b, int64_t n, float f) {
  const float keep = 1.0f - f;
  for (int64_t i = 0; i < n; ++i) {
    const float y = luma(r[i], g[i], b[i]) * keep;
    r[i] = clamp01(r[i] * f + y);
    g[i] = clamp01(g[i] * f + y);
    b[i] = clamp01(b[i] * f + y);
  }
}

// Contrast: the same blend with a per-image constant `term` = mean luma * (1 - f).
void contrast(float* __restrict__ r, float* __restrict__ g, float* __restrict__ b, int64_t n, float f,
              float term) {
  for (int64_t i = 0; i < n; ++i) {
    r[i] = clamp01(r[i] * f + term);
    g[i] = clamp01(g[i] * f + term);
    b[i] = clamp01(b[i] * f + term);
  }
}

// Hue rotation on the hexcone, torch path's _shift_hue: h in sextants from the max channel (ties: red, then
// green, then blue), shifted by 6 * shift, taken modulo 6 as torch.remainder does (fmod, then + 6 where the
// remainder is negative), then each channel = clamp(ramp(h)) * chroma + min.
// GENERAL: any shift; otherwise |shift| <= 0.5, where h lies in [-4, 8] (num / chroma is within [-1, 5]) and
// the remainder is h - 6 for h >= 6 (exact, as fmod's) or h + 6 for h < 0: selects the compiler vectorizes.
template <bool GENERAL>
void hue(float* __restrict__ r, float* __restrict__ g, float* __restrict__ b, int64_t n, float shift) {
  const float shift6 = 6.0f * shift;
  for (int64_t i = 0; i < n; ++i) {
    const float rv = r[i], gv = g[i], bv = b[i];
    const float maxc = std::max(std::max(rv, gv), bv);
    const float minc = std::min(std::min(rv, gv), bv);
    const float chroma = maxc - minc;
    const float num_r = gv - bv, num_g = (bv - rv) + 2.0f * chroma, num_b = (rv - gv) + 4.0f * chroma;
    const float num = maxc == rv ? num_r : (maxc == gv ? num_g : num_b);
    float h = num / std::max(chroma, 1e-12f) + shift6;
    if (GENERAL) {
      float m = std::fmod(h, 6.0f);
      h = (m != 0.0f && m < 0.0f) ? m + 6.0f : m;
    } else {
      h = h >= 6.0f ? h - 6.0f : h;
      h = h < 0.0f ? h + 6.0f : h;
    }
    r[i] = clamp01(std::abs(h - 3.0f) - 1.0f) * chroma + minc;
    g[i] = clamp01(2.0f - std::abs(h - 2.0f)) * chroma + minc;
    b[i] = clamp01(2.0f - std::abs(h - 4.0f)) * chroma + minc;
  }
}

void grayscale(float* __restrict__ r, float* __restrict__ g, float* __restrict__ b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float y = luma(r[i], g[i], b[i]);
    r[i] = y;
    g[i] = y;
    b[i] = y;
  }
}

void solarize(float* __restrict__ v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = v[i] >= 0.5f ? 1.0f - v[i] : v[i];
}

// Sum of the luma of a strip: fp32 partial sums in 8 independent lanes (vectorizable without reordering a
// float sum), combined in double.
double luma_sum(const float* __restrict__ r, const float* __restrict__ g, const float* __restrict__ b,
                int64_t n) {
  float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) lane[l] += luma(r[i + l], g[i + l], b[i + l]);
  }
  double s = 0.0;
  for (int l = 0; l < 8; ++l) s += lane[l];
  for (; i < n; ++i) s += luma(r[i], g[i], b[i]);
  return s;
}

// x * scale + bias per channel, interleaved into a channels-last row (torch: addcmul(bias, x, scale)).
void store_normalized(float* __restrict__ out, const float* __restrict__ r, const float* __restrict__ g,
                      const float* __restrict__ b, int64_t n, const float* scale, const float* bias) {
  const float s0 = scale[0], s1 = scale[1], s2 = scale[2], b0 = bias[0], b1 = bias[1], b2 = bias[2];
  for (int64_t i = 0; i < n; ++i) {
    out[3 * i] = r[i] * s0 + b0;
    out[3 * i + 1] = g[i] * s1 + b1;
    out[3 * i + 2] = b[i] * s2 + b2;
  }
}

// GCC/Clang vector of 8 floats: one AVX register, two SSE ones without AVX.
typedef float float8 __attribute__((vector_size(32)));

inline float8 load8(const float* p) {
  float8 v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

// dst[x] = sum_i w[i] * rows[i][x] for x in [0, n), products added in kernel order (the torch path's). Blocks
// of 16 pixels keep their sums in registers across the k taps: one load and one multiply-add per tap and 8
// pixels. The blur alone contracts a * b + c into an FMA where the CPU has one (the torch path's grouped
// convolution uses FMAs too); every other op rounds its products as torch's separate ops do.
#if defined(__FMA__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=fast")))
#endif
void weighted_rows(const float* const* rows, const float* wk, int64_t k, int64_t n, float* __restrict__ dst) {
  int64_t x = 0;
  for (; x + 16 <= n; x += 16) {
    float8 acc0 = {}, acc1 = {};
    for (int64_t i = 0; i < k; ++i) {
      const float wi = wk[i];
      acc0 += load8(rows[i] + x) * wi;
      acc1 += load8(rows[i] + x + 8) * wi;
    }
    std::memcpy(dst + x, &acc0, sizeof(acc0));
    std::memcpy(dst + x + 8, &acc1, sizeof(acc1));
  }
  for (; x < n; ++x) {
    float acc = 0.0f;
    for (int64_t i = 0; i < k; ++i) acc += rows[i][x] * wk[i];
    dst[x] = acc;
  }
}

// ---- input rows -------------------------------------------------------------------------------------------

template <typename T>
inline float to_unit(T v) {
  if constexpr (std::is_same_v<T, uint8_t>) {
    return static_cast<float>(v) * static_cast<float>(1.0 / 255.0);  // torch: x.float().mul_(1 / 255)
  } else {
    return v;
  }
}

// One input row into planar float arrays. SW: the element stride along a row when known at compile time
// (1: NCHW planes, 3 with channel stride 1: channels-last), 0 for any other stride.
template <typename T, int64_t SW>
void load_row(const T* __restrict__ src, int64_t s_c, int64_t s_w, int64_t w, float* __restrict__ r,
              float* __restrict__ g, float* __restrict__ b) {
  const int64_t sw = SW ? SW : s_w;
  const T* __restrict__ pr = src;
  const T* __restrict__ pg = src + s_c;
  const T* __restrict__ pb = src + 2 * s_c;
  for (int64_t x = 0; x < w; ++x) {
    r[x] = to_unit(pr[x * sw]);
    g[x] = to_unit(pg[x * sw]);
    b[x] = to_unit(pb[x * sw]);
  }
}

template <typename T>
void load_row_interleaved(const T* __restrict__ src, int64_t w, float* __restrict__ r, float* __restrict__ g,
                          float* __restrict__ b) {
  for (int64_t x = 0; x < w; ++x) {
    r[x] = to_unit(src[3 * x]);
    g[x] = to_unit(src[3 * x + 1]);
    b[x] = to_unit(src[3 * x + 2]);
  }
}

// ---- the batch --------------------------------------------------------------------------------------------

struct Job {
  int64_t height, width;
  int64_t s_b, s_c, s_h, s_w;
  const float* factors;  // (B, 4): brightness, contrast, saturation, hue shift
  const int32_t* flags;  // (B,) bits: gray 1, blur 2, solarize 4
  const float* sigma;    // (B,)
  const int64_t* order;  // (B, 4): each image's permutation of the jitter ops
  int64_t kernel;
  bool reflect;  // blur padding: reflect where pad < min(H, W), else replicate (as torch's path)
  float scale[3], bias[3];
  float* out;
};

// Source row index for output row `i` of an axis of `n` pixels padded by the blur (i may be < 0 or >= n).
inline int64_t pad_index(int64_t i, int64_t n, bool reflect) {
  if (reflect) return i < 0 ? -i : (i >= n ? 2 * (n - 1) - i : i);
  return std::min(std::max(i, int64_t{0}), n - 1);
}

template <typename T>
class Worker {
 public:
  Worker(const Job& job, const T* x) : job_(job), x_(x) {
    const int64_t w = job.width;
    rows_per_strip_ = std::max<int64_t>(1, kStripPixels / std::max<int64_t>(w, 1));
    strip_.resize(3 * rows_per_strip_ * w);
  }

  void run(int64_t img) {
    const Job& j = job_;
    const float* fac = j.factors + 4 * img;
    const int32_t flags = j.flags[img];
    const int64_t h = j.height, w = j.width, n_pix = h * w;
    if (n_pix == 0) return;
    // The image's order, less the ops its factors make identities (exact no-ops), as the torch path skips them.
    int64_t order[4];
    int64_t n_ops = 0;
    for (int64_t k = 0; k < 4; ++k) {
      const int64_t op = j.order[4 * img + k];
      if (fac[op] != (op == kHue ? 0.0f : 1.0f)) order[n_ops++] = op;
    }
    const int64_t c_pos = std::find(order, order + n_ops, kContrast) - order;

    // Contrast's mean luma after the ops before it (skipped at factor 1: the blend is then exact identity).
    float contrast_term = 0.0f;
    if (c_pos < n_ops && fac[kContrast] != 1.0f) {
      double sum = 0.0;
      for (int64_t y0 = 0; y0 < h; y0 += rows_per_strip_) {
        const int64_t rows = std::min(rows_per_strip_, h - y0), n = rows * w;
        load(img, y0, rows);
        for (int64_t k = 0; k < c_pos; ++k) apply(order[k], fac, 0.0f, n);
        sum += luma_sum(r(), g(), b(), n);
      }
      const float mean = static_cast<float>(sum / static_cast<double>(n_pix));
      contrast_term = mean * (1.0f - fac[kContrast]);
    }

    const bool blur = flags & kBlur;
    if (blur && hbuf_.empty()) hbuf_.resize(3 * n_pix);
    float* out_img = j.out + img * n_pix * 3;
    for (int64_t y0 = 0; y0 < h; y0 += rows_per_strip_) {
      const int64_t rows = std::min(rows_per_strip_, h - y0), n = rows * w;
      load(img, y0, rows);
      for (int64_t k = 0; k < n_ops; ++k) apply(order[k], fac, contrast_term, n);
      if (flags & kGray) grayscale(r(), g(), b(), n);
      if (blur) {
        for (int64_t c = 0; c < 3; ++c) {
          for (int64_t y = 0; y < rows; ++y) {
            blur_row(plane(c) + y * w, hbuf_.data() + c * n_pix + (y0 + y) * w, w, fac_weights(img));
          }
        }
        continue;
      }
      if (flags & kSolarize) {
        for (int64_t c = 0; c < 3; ++c) solarize(plane(c), n);
      }
      store_normalized(out_img + y0 * w * 3, r(), g(), b(), n, j.scale, j.bias);
    }
    if (blur) vertical_blur(img, flags & kSolarize, out_img);
  }

 private:
  float* plane(int64_t c) { return strip_.data() + c * rows_per_strip_ * job_.width; }
  float* r() { return plane(0); }
  float* g() { return plane(1); }
  float* b() { return plane(2); }

  void load(int64_t img, int64_t y0, int64_t rows) {
    const Job& j = job_;
    const int64_t w = j.width;
    for (int64_t y = 0; y < rows; ++y) {
      const T* src = x_ + img * j.s_b + (y0 + y) * j.s_h;
      float *pr = r() + y * w, *pg = g() + y * w, *pb = b() + y * w;
      if (j.s_w == 1) {
        load_row<T, 1>(src, j.s_c, 1, w, pr, pg, pb);
      } else if (j.s_w == 3 && j.s_c == 1) {
        load_row_interleaved<T>(src, w, pr, pg, pb);
      } else {
        load_row<T, 0>(src, j.s_c, j.s_w, w, pr, pg, pb);
      }
    }
  }

  void apply(int64_t op, const float* fac, float contrast_term, int64_t n) {
    const float f = fac[op];
    switch (op) {
      case kBrightness: brightness(r(), g(), b(), n, f); break;
      case kContrast: contrast(r(), g(), b(), n, f, contrast_term); break;
      case kSaturation: saturation(r(), g(), b(), n, f); break;
      default:  // hue runs only where the image's shift is non-zero, as the torch path's subset
        if (f == 0.0f) break;
        if (std::abs(f) <= 0.5f) {
          hue<false>(r(), g(), b(), n, f);
        } else {
          hue<true>(r(), g(), b(), n, f);
        }
    }
  }

  // The image's normalized Gaussian weights, computed as the torch path does in fp32:
  // t = arange(k) - (k - 1) / 2; w = exp(-0.5 * (t / sigma)^2); w /= sum(w).
  const float* fac_weights(int64_t img) {
    if (weights_img_ == img) return weights_.data();
    const int64_t k = job_.kernel;
    weights_.resize(k);
    const float sigma = job_.sigma[img];
    const float half = static_cast<float>((k - 1) / 2.0);
    float sum = 0.0f;
    for (int64_t i = 0; i < k; ++i) {
      const float t = (static_cast<float>(i) - half) / sigma;
      weights_[i] = std::exp(-0.5f * (t * t));
      sum += weights_[i];
    }
    for (int64_t i = 0; i < k; ++i) weights_[i] /= sum;
    weights_img_ = img;
    return weights_.data();
  }

  // Horizontal pass of one row: pad it into `padded_`, then dst[x] = sum_i w[i] * padded[x + i].
  void blur_row(const float* __restrict__ src, float* __restrict__ dst, int64_t w, const float* wk) {
    const int64_t k = job_.kernel, pad = k / 2;
    padded_.resize(w + 2 * pad);
    rows_.resize(k);
    float* __restrict__ p = padded_.data();
    for (int64_t x = 0; x < w; ++x) p[pad + x] = src[x];
    for (int64_t i = 0; i < pad; ++i) {
      p[i] = src[pad_index(i - pad, w, job_.reflect)];
      p[pad + w + i] = src[pad_index(w + i, w, job_.reflect)];
    }
    for (int64_t i = 0; i < k; ++i) rows_[i] = p + i;
    weighted_rows(rows_.data(), wk, k, w, dst);
  }

  // Vertical pass per output row over the horizontally blurred planes, then solarize + normalize.
  void vertical_blur(int64_t img, bool solar, float* out_img) {
    const int64_t h = job_.height, w = job_.width, n_pix = h * w, k = job_.kernel, pad = k / 2;
    const float* wk = fac_weights(img);
    acc_.resize(3 * w);
    rows_.resize(k);
    for (int64_t y = 0; y < h; ++y) {
      for (int64_t c = 0; c < 3; ++c) {
        const float* plane = hbuf_.data() + c * n_pix;
        for (int64_t i = 0; i < k; ++i) rows_[i] = plane + pad_index(y - pad + i, h, job_.reflect) * w;
        weighted_rows(rows_.data(), wk, k, w, acc_.data() + c * w);
        if (solar) solarize(acc_.data() + c * w, w);
      }
      store_normalized(out_img + y * w * 3, acc_.data(), acc_.data() + w, acc_.data() + 2 * w, w, job_.scale,
                       job_.bias);
    }
  }

  const Job& job_;
  const T* x_;
  int64_t rows_per_strip_ = 1;
  std::vector<float> strip_, hbuf_, padded_, acc_, weights_;
  std::vector<const float*> rows_;
  int64_t weights_img_ = -1;
};

template <typename T>
void run_batch(const Job& job, const T* x, int64_t batch) {
  // Dynamic scheduling: one task per thread, each takes the next image until none is left (images differ in
  // cost). Whichever threads run, every image is processed once, by the same code.
  std::atomic<int64_t> next{0};
  const int64_t tasks = std::min<int64_t>(batch, at::get_num_threads());
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    Worker<T> worker(job, x);
    for (int64_t img = next++; img < batch; img = next++) worker.run(img);
  });
}

void check_cpu(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous() && t.numel() == numel,
              "photometric_cpu: ", name, " must be a contiguous CPU tensor of ", dtype, " with ", numel,
              " elements");
}

}  // namespace

// See pipelines/photometric.py (_apply_cpp) for the arguments.
at::Tensor photometric_cpu(const at::Tensor& x, const at::Tensor& factors, const at::Tensor& order,
                           const at::Tensor& flags, const at::Tensor& sigma, int64_t kernel,
                           const at::Tensor& scale, const at::Tensor& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.size(1) == 3,
              "photometric_cpu: x must be a (B, 3, H, W) CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kByte || x.scalar_type() == at::kFloat,
              "photometric_cpu: x must be uint8 or float32");
  const int64_t batch = x.size(0), h = x.size(2), w = x.size(3);
  check_cpu(factors, at::kFloat, 4 * batch, "factors");
  check_cpu(flags, at::kInt, batch, "flags");
  check_cpu(sigma, at::kFloat, batch, "sigma");
  check_cpu(scale, at::kFloat, 3, "scale");
  check_cpu(bias, at::kFloat, 3, "bias");
  check_cpu(order, at::kLong, 4 * batch, "order");
  for (int64_t i = 0; i < batch; ++i) {
    int seen = 0;
    for (int64_t k = 0; k < 4; ++k) {
      const int64_t op = order.data_ptr<int64_t>()[4 * i + k];
      TORCH_CHECK(op >= 0 && op < 4, "photometric_cpu: jitter ops are 0..3");
      seen |= 1 << op;
    }
    TORCH_CHECK(seen == 15, "photometric_cpu: each image's order must be a permutation of 0..3");
  }
  TORCH_CHECK(kernel >= 1 && kernel % 2 == 1, "photometric_cpu: the blur kernel size must be odd");

  at::Tensor out = at::empty({batch, 3, h, w}, x.options().dtype(at::kFloat), at::MemoryFormat::ChannelsLast);
  if (out.numel() == 0) return out;
  Job job;
  job.height = h;
  job.width = w;
  job.s_b = x.stride(0);
  job.s_c = x.stride(1);
  job.s_h = x.stride(2);
  job.s_w = x.stride(3);
  job.factors = factors.data_ptr<float>();
  job.flags = flags.data_ptr<int32_t>();
  job.sigma = sigma.data_ptr<float>();
  job.order = order.data_ptr<int64_t>();
  job.kernel = kernel;
  job.reflect = kernel / 2 < std::min(h, w);
  for (int c = 0; c < 3; ++c) {
    job.scale[c] = scale.data_ptr<float>()[c];
    job.bias[c] = bias.data_ptr<float>()[c];
  }
  job.out = out.data_ptr<float>();
  if (x.scalar_type() == at::kByte) {
    run_batch<uint8_t>(job, x.data_ptr<uint8_t>(), batch);
  } else {
    run_batch<float>(job, x.data_ptr<float>(), batch);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("photometric", &photometric_cpu, "Fused photometric stage of one view (CPU)", py::arg("x"),
        py::arg("factors"), py::arg("order"), py::arg("flags"), py::arg("sigma"), py::arg("kernel"),
        py::arg("scale"), py::arg("bias"), py::call_guard<py::gil_scoped_release>());
}
