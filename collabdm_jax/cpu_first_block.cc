// DM's ConvNet first block on the CPU, one image at a time in cache:
//   out = avgpool2x2(relu(instance_norm(conv3x3(x, pad)) * scale + beta)).
// An XLA FFI custom call (see cpu_first_block.py, which builds and
// registers it). Each image's conv map (32x32x128 floats, 512 KiB at the
// reference shapes) stays in the core's L2 between the convolution, the
// two statistics passes and the normalise-ReLU-pool pass; XLA:CPU's fused
// version of the same block wrote and re-read it through memory several
// times. Images are shared out over XLA's intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t n, h, w, ci, co, pad, ho, wo, hq, wq;
};

// conv3x3 (no bias: instance norm cancels it) of one image into y [ho, wo, co].
template <int CO>
void Conv(const float* x, const float* k, float* y, const Geometry& g) {
  const int64_t co = CO > 0 ? CO : g.co;
  for (int64_t i = 0; i < g.ho; ++i) {
    for (int64_t j = 0; j < g.wo; ++j) {
      float acc[CO > 0 ? CO : 1024];
      for (int64_t c = 0; c < co; ++c) acc[c] = 0.f;
      for (int64_t di = 0; di < 3; ++di) {
        const int64_t r = i + di - g.pad;
        if (r < 0 || r >= g.h) continue;
        for (int64_t dj = 0; dj < 3; ++dj) {
          const int64_t q = j + dj - g.pad;
          if (q < 0 || q >= g.w) continue;
          const float* xv = x + (r * g.w + q) * g.ci;
          const float* kv = k + (di * 3 + dj) * g.ci * co;
          for (int64_t ci = 0; ci < g.ci; ++ci) {
            const float a = xv[ci];
            const float* kr = kv + ci * co;
            for (int64_t c = 0; c < co; ++c) acc[c] += a * kr[c];
          }
        }
      }
      float* out = y + (i * g.wo + j) * co;
      for (int64_t c = 0; c < co; ++c) out[c] = acc[c];
    }
  }
}

// The block of one image; y is scratch for its conv map. Statistics as
// models.InstanceNorm: mean, then the biased variance of the centred
// values (sums in double).
template <int CO>
void ForwardImage(const float* x, const float* k, const float* scale,
                  const float* beta, float eps, float* out, float* y,
                  double* sums, float* gain, float* shift,
                  const Geometry& g) {
  const int64_t co = CO > 0 ? CO : g.co;
  Conv<CO>(x, k, y, g);
  const int64_t hw = g.ho * g.wo;
  for (int64_t c = 0; c < co; ++c) sums[c] = 0.0;
  for (int64_t p = 0; p < hw; ++p) {
    const float* v = y + p * co;
    for (int64_t c = 0; c < co; ++c) sums[c] += v[c];
  }
  float mean[CO > 0 ? CO : 1024];
  for (int64_t c = 0; c < co; ++c) mean[c] = static_cast<float>(sums[c] / hw);
  for (int64_t c = 0; c < co; ++c) sums[c] = 0.0;
  for (int64_t p = 0; p < hw; ++p) {
    const float* v = y + p * co;
    for (int64_t c = 0; c < co; ++c) {
      const float d = v[c] - mean[c];
      sums[c] += d * d;
    }
  }
  for (int64_t c = 0; c < co; ++c) {
    const float var = static_cast<float>(sums[c] / hw);
    gain[c] = scale[c] / std::sqrt(var + eps);
    shift[c] = beta[c] - mean[c] * gain[c];
  }
  for (int64_t i = 0; i < g.hq; ++i) {
    for (int64_t j = 0; j < g.wq; ++j) {
      const float* a = y + ((2 * i) * g.wo + 2 * j) * co;
      const float* b = a + co;
      const float* c2 = a + g.wo * co;
      const float* d = c2 + co;
      float* o = out + (i * g.wq + j) * co;
      for (int64_t c = 0; c < co; ++c) {
        const float s = std::max(a[c] * gain[c] + shift[c], 0.f) +
                        std::max(b[c] * gain[c] + shift[c], 0.f) +
                        std::max(c2[c] * gain[c] + shift[c], 0.f) +
                        std::max(d[c] * gain[c] + shift[c], 0.f);
        o[c] = 0.25f * s;
      }
    }
  }
}

// Checks the shapes and fills the geometry of one call.
ffi::Error Check(const ffi::Buffer<ffi::F32>& x,
                 const ffi::Buffer<ffi::F32>& kernel, int64_t padding,
                 Geometry* g) {
  auto xd = x.dimensions();
  auto kd = kernel.dimensions();
  if (xd.size() != 4 || kd.size() != 4 || kd[0] != 3 || kd[1] != 3 ||
      kd[2] != xd[3]) {
    return ffi::Error::InvalidArgument(
        "first block: x must be [N, H, W, C] and the kernel [3, 3, C, C_out]");
  }
  g->n = xd[0]; g->h = xd[1]; g->w = xd[2]; g->ci = xd[3]; g->co = kd[3];
  g->pad = padding;
  g->ho = g->h + 2 * padding - 2; g->wo = g->w + 2 * padding - 2;
  g->hq = g->ho / 2; g->wq = g->wo / 2;
  if (g->co > 1024 || g->ho < 2 || g->wo < 2 || padding < 0) {
    return ffi::Error::InvalidArgument("first block: unsupported size");
  }
  return ffi::Error::Success();
}

// Runs body(first image, next) on the caller and the pool's other threads;
// next() hands out the following image, -1 when none is left. Returns when
// every image is done. Images go to whichever thread asks first, so a busy
// pool only means the caller does more of them; a task that starts after
// the last image touches nothing but the shared counters.
struct Progress {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

template <typename Body>
void ParallelOverImages(ffi::ThreadPool& pool, int64_t n, Body body) {
  auto progress = std::make_shared<Progress>();
  auto task = [progress, n, body]() {
    auto next = [&]() -> int64_t {
      progress->done.fetch_add(1, std::memory_order_release);
      const int64_t i = progress->next.fetch_add(1);
      return i < n ? i : -1;
    };
    const int64_t first = progress->next.fetch_add(1);
    if (first >= n) return;
    body(first, next);
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(task)(task));
  task();
  while (progress->done.load(std::memory_order_acquire) < n) {
    std::this_thread::yield();
  }
}

ffi::Error FirstBlockForwardImpl(ffi::ThreadPool pool,
                                 ffi::Buffer<ffi::F32> x,
                                 ffi::Buffer<ffi::F32> kernel,
                                 ffi::Buffer<ffi::F32> scale,
                                 ffi::Buffer<ffi::F32> beta,
                                 ffi::ResultBuffer<ffi::F32> out,
                                 int64_t padding, float eps) {
  Geometry g;
  if (ffi::Error e = Check(x, kernel, padding, &g); e.failure()) return e;
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  const float* sp = scale.typed_data();
  const float* bp = beta.typed_data();
  float* op = out->typed_data();
  const int64_t in_size = g.h * g.w * g.ci, out_size = g.hq * g.wq * g.co;
  ParallelOverImages(pool, g.n, [=](int64_t begin, auto&& next) {
    std::vector<float> y(g.ho * g.wo * g.co);
    std::vector<double> sums(g.co);
    std::vector<float> gain(g.co), shift(g.co);
    for (int64_t i = begin; i >= 0; i = next()) {
      if (g.co == 128) {
        ForwardImage<128>(xp + i * in_size, kp, sp, bp, eps, op + i * out_size,
                          y.data(), sums.data(), gain.data(), shift.data(), g);
      } else {
        ForwardImage<0>(xp + i * in_size, kp, sp, bp, eps, op + i * out_size,
                        y.data(), sums.data(), gain.data(), shift.data(), g);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CollabdmFirstBlockForward, FirstBlockForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("padding")
                                  .Attr<float>("eps"));
