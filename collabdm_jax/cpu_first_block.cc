// DM's ConvNet first block on the CPU, one image at a time in cache:
//   out = avgpool2x2(relu(instance_norm(conv3x3(x, pad)) * scale + beta)),
// and its gradient with respect to x: XLA FFI custom calls that
// cpu_first_block.py builds and registers. Each image's conv map
// (32x32x128 floats, 512 KiB at the reference shapes) stays in the core's
// L2 between the convolution, the statistics and the normalise-ReLU-pool
// pass; XLA:CPU's fusions of the same block wrote and re-read it through
// memory several times. Images are shared out over XLA's intra-op pool.
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


// ---------------------------------------------------------------------------
// Backward pass: dx from dout, channel by channel on "wide" planes. A plane
// keeps the padded input's row stride wp = w + 2 pad, so output position
// P = i * wp + j (j < wo valid, the last two columns of a row are junk)
// reads tap (di, dj) at P + di * wp + dj: every tap is one shifted,
// contiguous run, and 64 outputs are 4 AVX-512 accumulators held in
// registers across the taps.

typedef float V16 __attribute__((vector_size(64)));

inline V16 Load(const float* p) {
  V16 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, V16 v) { __builtin_memcpy(p, &v, sizeof(v)); }

inline V16 Splat(float a) { return V16{} + a; }

inline double Total(V16 v) {
  double s = 0.0;
  for (int l = 0; l < 16; ++l) s += v[l];
  return s;
}

struct Wide {
  int64_t hp, wp, plane, blocks, margin;
};

Wide WideOf(const Geometry& g) {
  Wide w;
  w.hp = g.h + 2 * g.pad;
  w.wp = g.w + 2 * g.pad;
  w.plane = g.ho * w.wp;
  w.blocks = (w.plane + 63) / 64;
  w.margin = 2 * w.wp + 2;
  return w;
}

struct BackwardScratch {
  std::vector<float> xpad, y, valid, dz, dyhat, dy, dxpad;
  BackwardScratch(const Geometry& g, const Wide& w)
      : xpad(g.ci * (w.hp * w.wp + 64 * w.blocks + 2 * w.wp + 64)),
        y(64 * w.blocks), valid(64 * w.blocks), dz(64 * w.blocks),
        dyhat(64 * w.blocks),
        dy(2 * w.margin + 64 * w.blocks + 2 * w.wp + 64),
        dxpad(g.ci * 64 * ((w.hp * w.wp + 63) / 64)) {
    for (int64_t p = 0; p < w.plane; ++p) valid[p] = p % w.wp < g.wo;
  }
};

void BackwardImage(const float* x, const float* k, const float* scale,
                   const float* beta, float eps, const float* dout, float* dx,
                   BackwardScratch& s, const Geometry& g, const Wide& w) {
  const int64_t co = g.co, ci_n = g.ci, hw = g.ho * g.wo;
  const int64_t xplane = s.xpad.size() / ci_n;
  const int64_t dplane = s.dxpad.size() / ci_n;
  std::fill(s.xpad.begin(), s.xpad.end(), 0.f);
  for (int64_t r = 0; r < g.h; ++r)
    for (int64_t q = 0; q < g.w; ++q)
      for (int64_t ci = 0; ci < ci_n; ++ci)
        s.xpad[ci * xplane + (r + g.pad) * w.wp + q + g.pad] =
            x[(r * g.w + q) * ci_n + ci];
  std::fill(s.dxpad.begin(), s.dxpad.end(), 0.f);
  float* y = s.y.data();
  float* dyv = s.dy.data() + w.margin;
  for (int64_t c = 0; c < co; ++c) {
    // Conv map of channel c.
    for (int64_t b = 0; b < w.blocks; ++b) {
      V16 a0{}, a1{}, a2{}, a3{};
      for (int64_t ci = 0; ci < ci_n; ++ci)
        for (int64_t di = 0; di < 3; ++di)
          for (int64_t dj = 0; dj < 3; ++dj) {
            const V16 kv = Splat(k[((di * 3 + dj) * ci_n + ci) * co + c]);
            const float* src =
                s.xpad.data() + ci * xplane + 64 * b + di * w.wp + dj;
            a0 += kv * Load(src);
            a1 += kv * Load(src + 16);
            a2 += kv * Load(src + 32);
            a3 += kv * Load(src + 48);
          }
      Store(y + 64 * b, a0);
      Store(y + 64 * b + 16, a1);
      Store(y + 64 * b + 32, a2);
      Store(y + 64 * b + 48, a3);
    }
    // Statistics over the valid positions; yhat in place.
    V16 sum{};
    for (int64_t p = 0; p < 64 * w.blocks; p += 16)
      sum += Load(y + p) * Load(s.valid.data() + p);
    const float mean = static_cast<float>(Total(sum) / hw);
    V16 sq{};
    for (int64_t p = 0; p < 64 * w.blocks; p += 16) {
      const V16 d = (Load(y + p) - mean) * Load(s.valid.data() + p);
      sq += d * d;
    }
    const float rstd =
        1.f / std::sqrt(static_cast<float>(Total(sq) / hw) + eps);
    // dz: a quarter of dout in each pooling window, 0 elsewhere.
    std::fill(s.dz.begin(), s.dz.end(), 0.f);
    for (int64_t i = 0; i < 2 * g.hq; ++i)
      for (int64_t j2 = 0; j2 < g.wq; ++j2) {
        const float v = 0.25f * dout[((i / 2) * g.wq + j2) * co + c];
        s.dz[i * w.wp + 2 * j2] = v;
        s.dz[i * w.wp + 2 * j2 + 1] = v;
      }
    // dyhat = scale * relu'(yhat * scale + beta) * dz; its sums.
    const float sc = scale[c], be = beta[c];
    V16 s1{}, s2{};
    for (int64_t p = 0; p < 64 * w.blocks; p += 16) {
      const V16 yh = (Load(y + p) - mean) * rstd;
      Store(y + p, yh);
      const V16 t = yh * sc + be;
      V16 dv = Load(s.dz.data() + p) * sc;
      dv = t > 0.f ? dv : V16{};
      Store(s.dyhat.data() + p, dv);
      s1 += dv;
      s2 += dv * yh;
    }
    const float a = static_cast<float>(Total(s1) / hw);
    const float bb = static_cast<float>(Total(s2) / hw);
    // Instance norm's gradient, 0 on the junk columns.
    for (int64_t p = 0; p < 64 * w.blocks; p += 16) {
      const V16 dy = (Load(s.dyhat.data() + p) - a - Load(y + p) * bb) *
                     rstd * Load(s.valid.data() + p);
      Store(dyv + p, dy);
    }
    for (int64_t p = w.plane; p < 64 * w.blocks; ++p) dyv[p] = 0.f;
    // Input gradient: padded position Q gathers k(di, dj) dy[Q - di wp - dj].
    for (int64_t ci = 0; ci < ci_n; ++ci) {
      float* dst = s.dxpad.data() + ci * dplane;
      for (int64_t b = 0; b < dplane / 64; ++b) {
        V16 a0{}, a1{}, a2{}, a3{};
        for (int64_t di = 0; di < 3; ++di)
          for (int64_t dj = 0; dj < 3; ++dj) {
            const V16 kv = Splat(k[((di * 3 + dj) * ci_n + ci) * co + c]);
            const float* src = dyv + 64 * b - di * w.wp - dj;
            a0 += kv * Load(src);
            a1 += kv * Load(src + 16);
            a2 += kv * Load(src + 32);
            a3 += kv * Load(src + 48);
          }
        float* d = dst + 64 * b;
        Store(d, Load(d) + a0);
        Store(d + 16, Load(d + 16) + a1);
        Store(d + 32, Load(d + 32) + a2);
        Store(d + 48, Load(d + 48) + a3);
      }
    }
  }
  for (int64_t r = 0; r < g.h; ++r)
    for (int64_t q = 0; q < g.w; ++q)
      for (int64_t ci = 0; ci < ci_n; ++ci)
        dx[(r * g.w + q) * ci_n + ci] =
            s.dxpad[ci * dplane + (r + g.pad) * w.wp + q + g.pad];
}

ffi::Error FirstBlockBackwardImpl(ffi::ThreadPool pool,
                                  ffi::Buffer<ffi::F32> x,
                                  ffi::Buffer<ffi::F32> kernel,
                                  ffi::Buffer<ffi::F32> scale,
                                  ffi::Buffer<ffi::F32> beta,
                                  ffi::Buffer<ffi::F32> dout,
                                  ffi::ResultBuffer<ffi::F32> dx,
                                  int64_t padding, float eps) {
  Geometry g;
  if (ffi::Error e = Check(x, kernel, padding, &g); e.failure()) return e;
  const Wide w = WideOf(g);
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  const float* sp = scale.typed_data();
  const float* bp = beta.typed_data();
  const float* dp = dout.typed_data();
  float* op = dx->typed_data();
  const int64_t in_size = g.h * g.w * g.ci, out_size = g.hq * g.wq * g.co;
  ParallelOverImages(pool, g.n, [=](int64_t begin, auto&& next) {
    BackwardScratch scratch(g, w);
    for (int64_t i = begin; i >= 0; i = next()) {
      BackwardImage(xp + i * in_size, kp, sp, bp, eps, dp + i * out_size,
                    op + i * in_size, scratch, g, w);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(CollabdmFirstBlockBackward,
                              FirstBlockBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("padding")
                                  .Attr<float>("eps"));
