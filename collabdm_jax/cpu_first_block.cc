// DM's ConvNet first block on the CPU, one image at a time in cache:
//   out = avgpool2x2(relu(instance_norm(conv3x3(x, pad)) * scale + beta)),
// and its gradient with respect to x: XLA FFI custom calls that
// cpu_first_block.py builds and registers. XLA:CPU's fusions of the block
// wrote each image's conv map (32x32x128 floats, 512 KiB at the reference
// shapes) to memory and re-read it several times. Here the forward pass
// never stores it: the instance-norm statistics come from the image's
// patch moments (ChannelMoments), then each pooling window is computed,
// normalised, rectified and averaged in registers. The backward pass keeps
// one map per image in the core's L2. Images are shared out over XLA's
// intra-op pool.
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

typedef float V16 __attribute__((vector_size(64)));
typedef double V8d __attribute__((vector_size(64)));

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

inline V8d LoadD(const double* p) {
  V8d v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline double TotalD(V8d v) {
  double s = 0.0;
  for (int l = 0; l < 8; ++l) s += v[l];
  return s;
}

// Sum over the ho x wo window of the row-major plane a (row stride wp) of
// a[i * wp + j] * b[i * wp + j], in double.
double WindowDot(const double* a, const double* b, int64_t ho, int64_t wo,
                 int64_t wp) {
  V8d acc0{}, acc1{};
  double tail = 0.0;
  for (int64_t i = 0; i < ho; ++i) {
    const double* ra = a + i * wp;
    const double* rb = b + i * wp;
    int64_t j = 0;
    for (; j + 16 <= wo; j += 16) {
      acc0 += LoadD(ra + j) * LoadD(rb + j);
      acc1 += LoadD(ra + j + 8) * LoadD(rb + j + 8);
    }
    for (; j + 8 <= wo; j += 8) acc0 += LoadD(ra + j) * LoadD(rb + j);
    for (; j < wo; ++j) tail += ra[j] * rb[j];
  }
  return TotalD(acc0 + acc1) + tail;
}

// The same window's sum of a alone.
double WindowSum(const double* a, int64_t ho, int64_t wo, int64_t wp) {
  V8d acc{};
  double tail = 0.0;
  for (int64_t i = 0; i < ho; ++i) {
    const double* ra = a + i * wp;
    int64_t j = 0;
    for (; j + 8 <= wo; j += 8) acc += LoadD(ra + j);
    for (; j < wo; ++j) tail += ra[j];
  }
  return TotalD(acc) + tail;
}

// Every channel's instance-norm statistics without the conv map. With P_p
// the zero-padded 3x3 patch at output position p (K = 9 ci taps, in the
// kernel's row order (di, dj, ci)), mu = mean_p P_p and
// C = mean_p P_p P_p^T - mu mu^T, channel c of y = P w_c has mean mu . w_c
// and biased variance w_c^T C w_c: one pass over the image for the K x K
// moments instead of two over its 32x32x128 map. In double, as the
// variance of centred values it replaces (the raw second moment loses
// nothing to cancellation in double unless an image's mean is ~1e4 times
// its spread). Fills mean[c] and var[c].
void ChannelMoments(const float* x, const float* k, const Geometry& g,
                    double* mean, double* var, std::vector<double>& scratch) {
  const int64_t kk = 9 * g.ci, hw = g.ho * g.wo;
  const int64_t hp = g.h + 2 * g.pad, wp = g.w + 2 * g.pad;
  // Padded planes, channel-major (each tap reads a shifted window of one).
  scratch.assign(g.ci * hp * wp + kk + kk * kk + 2 * kk * g.co, 0.0);
  double* plane = scratch.data();
  double* mu = plane + g.ci * hp * wp;
  double* cov = mu + kk;
  for (int64_t r = 0; r < g.h; ++r)
    for (int64_t q = 0; q < g.w; ++q)
      for (int64_t ci = 0; ci < g.ci; ++ci)
        plane[(ci * hp + r + g.pad) * wp + q + g.pad] =
            x[(r * g.w + q) * g.ci + ci];
  auto tap = [&](int64_t a) {
    const int64_t di = a / (3 * g.ci), dj = (a / g.ci) % 3, ci = a % g.ci;
    return plane + (ci * hp + di) * wp + dj;
  };
  for (int64_t a = 0; a < kk; ++a)
    mu[a] = WindowSum(tap(a), g.ho, g.wo, wp) / hw;
  for (int64_t a = 0; a < kk; ++a)
    for (int64_t b = a; b < kk; ++b)
      cov[a * kk + b] = cov[b * kk + a] =
          WindowDot(tap(a), tap(b), g.ho, g.wo, wp) / hw - mu[a] * mu[b];
  // var = sum_a w_a * (C w)_a, channel by channel, in double.
  double* w = cov + kk * kk;
  double* cw = w + kk * g.co;
  for (int64_t i = 0; i < kk * g.co; ++i) w[i] = k[i];
  for (int64_t i = 0; i < kk * g.co; ++i) cw[i] = 0.0;
  for (int64_t a = 0; a < kk; ++a)
    for (int64_t b = 0; b < kk; ++b) {
      const double cab = cov[a * kk + b];
      for (int64_t c = 0; c < g.co; ++c) cw[a * g.co + c] += cab * w[b * g.co + c];
    }
  for (int64_t c = 0; c < g.co; ++c) mean[c] = var[c] = 0.0;
  for (int64_t a = 0; a < kk; ++a)
    for (int64_t c = 0; c < g.co; ++c) {
      mean[c] += mu[a] * w[a * g.co + c];
      var[c] += w[a * g.co + c] * cw[a * g.co + c];
    }
  for (int64_t c = 0; c < g.co; ++c) var[c] = std::max(var[c], 0.0);
}

// gain = scale / sqrt(var + eps), shift = beta - mean * gain.
void NormAffine(const double* mean, const double* var, const float* scale,
                const float* beta, float eps, float* gain, float* shift,
                int64_t co) {
  for (int64_t c = 0; c < co; ++c) {
    gain[c] = scale[c] / std::sqrt(static_cast<float>(var[c]) + eps);
    shift[c] = beta[c] - static_cast<float>(mean[c]) * gain[c];
  }
}

// The zero-padded image, channel-last [hp, wp, ci]: every tap a plain read.
void PadImage(const float* x, const Geometry& g, std::vector<float>& xpad) {
  const int64_t wp = g.w + 2 * g.pad;
  xpad.assign((g.h + 2 * g.pad) * wp * g.ci, 0.f);
  for (int64_t r = 0; r < g.h; ++r)
    std::copy(x + r * g.w * g.ci, x + (r + 1) * g.w * g.ci,
              xpad.data() + ((r + g.pad) * wp + g.pad) * g.ci);
}

// Channel c of the conv at output position (i, j), one tap after another
// (the channels past the last vector).
inline float ConvAt(const float* xpad, const float* k, const Geometry& g,
                    int64_t wp, int64_t i, int64_t j, int64_t c) {
  float y = 0.f;
  for (int64_t t = 0; t < 9 * g.ci; ++t)
    y += xpad[((i + t / (3 * g.ci)) * wp + j + (t / g.ci) % 3) * g.ci +
              t % g.ci] * k[t * g.co + c];
  return y;
}

// One pooling window's output for the channels [c0, c0 + 16 V): its four
// conv outputs (corner = the window's top-left tap in the padded image),
// normalised, rectified and averaged in registers. The four positions go
// together, so each kernel vector loaded serves four FMAs.
template <int V>
inline void PoolWindow(const float* corner, const float* k, int64_t ci_n,
                       int64_t co, int64_t wp, int64_t c0, const float* gain,
                       const float* shift, float* o) {
  V16 acc[4][V] = {};  // [position (p, q)][channel vector]
  for (int64_t di = 0; di < 3; ++di)
    for (int64_t dj = 0; dj < 3; ++dj)
      for (int64_t ci = 0; ci < ci_n; ++ci) {
        const float* kv = k + ((di * 3 + dj) * ci_n + ci) * co + c0;
        V16 kvec[V];
        for (int v = 0; v < V; ++v) kvec[v] = Load(kv + 16 * v);
        for (int pq = 0; pq < 4; ++pq) {
          const V16 a =
              Splat(corner[((pq / 2 + di) * wp + pq % 2 + dj) * ci_n + ci]);
          for (int v = 0; v < V; ++v) acc[pq][v] += a * kvec[v];
        }
      }
  for (int v = 0; v < V; ++v) {
    const int64_t c = c0 + 16 * v;
    const V16 gv = Load(gain + c), sv = Load(shift + c);
    V16 sum{};
    for (int pq = 0; pq < 4; ++pq) {
      const V16 z = acc[pq][v] * gv + sv;
      sum += z > 0.f ? z : V16{};
    }
    Store(o + c, sum * 0.25f);
  }
}

// The block of one image: the statistics first (ChannelMoments), then one
// pass over the pooling windows (PoolWindow), so the conv map is never
// stored: 64 channels at a time, then 16, then one.
void ForwardImage(const float* x, const float* k, const float* scale,
                  const float* beta, float eps, float* out,
                  std::vector<double>& scratch, std::vector<float>& xpad,
                  double* mean, double* var, float* gain, float* shift,
                  const Geometry& g) {
  const int64_t co = g.co, ci_n = g.ci, wp = g.w + 2 * g.pad;
  const int64_t quad_co = co / 64 * 64, vec_co = co / 16 * 16;
  ChannelMoments(x, k, g, mean, var, scratch);
  NormAffine(mean, var, scale, beta, eps, gain, shift, co);
  PadImage(x, g, xpad);
  for (int64_t i = 0; i < g.hq; ++i) {
    for (int64_t j = 0; j < g.wq; ++j) {
      const float* corner = xpad.data() + ((2 * i) * wp + 2 * j) * ci_n;
      float* o = out + (i * g.wq + j) * co;
      for (int64_t c0 = 0; c0 < quad_co; c0 += 64)
        PoolWindow<4>(corner, k, ci_n, co, wp, c0, gain, shift, o);
      for (int64_t c0 = quad_co; c0 < vec_co; c0 += 16)
        PoolWindow<1>(corner, k, ci_n, co, wp, c0, gain, shift, o);
      for (int64_t c = vec_co; c < co; ++c) {
        float sum = 0.f;
        for (int64_t pq = 0; pq < 4; ++pq) {
          const float acc =
              ConvAt(xpad.data(), k, g, wp, 2 * i + pq / 2, 2 * j + pq % 2, c);
          sum += std::max(acc * gain[c] + shift[c], 0.f);
        }
        o[c] = 0.25f * sum;
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
    std::vector<double> scratch, mean(g.co), var(g.co);
    std::vector<float> xpad, gain(g.co), shift(g.co);
    for (int64_t i = begin; i >= 0; i = next())
      ForwardImage(xp + i * in_size, kp, sp, bp, eps, op + i * out_size,
                   scratch, xpad, mean.data(), var.data(), gain.data(),
                   shift.data(), g);
  });
  return ffi::Error::Success();
}


// ---------------------------------------------------------------------------
// Backward pass, channel-last like the forward. With yhat = (y - mean) rstd
// (statistics from ChannelMoments), z = scale yhat + beta, dz the pooling's
// gradient (a quarter of dout in each window, 0 on an unpooled last row or
// column) and dv = scale relu'(z) dz, instance norm's gradient is
//   dy = rstd (dv - mean_p dv - yhat mean_p (dv yhat)),
// and dx the transposed conv of dy. Three passes over the image's map, which
// stays in the core's cache:
//   1. conv, yhat stored, the two sums over positions;
//   2. dy in place of yhat;
//   3. dx, four pixels of a row at a time (a row's last few one by one).
// The map is stored with a zero border of two positions, so pass 3 reads
// every tap without bounds checks.

struct BackwardScratch {
  std::vector<double> moments, mean, var, s1, s2;
  std::vector<float> xpad, storage, meanf, rstd, a, b;
  float* map;  // storage's first 64-byte boundary: whole-line vector reads
  BackwardScratch(const Geometry& g)
      : mean(g.co), var(g.co), s1(g.co), s2(g.co),
        storage((g.ho + 4) * (g.wo + 4) * g.co + 16, 0.f), meanf(g.co),
        rstd(g.co), a(g.co), b(g.co) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(storage.data());
    map = storage.data() + ((64 - p % 64) % 64) / sizeof(float);
  }
};

// The conv at P consecutive positions (i, j..j+P-1) of an output row for
// V vectors of channels from c0: each kernel vector loaded serves P FMAs.
template <int P, int V>
inline void ConvTile(const float* xpad, const float* k, const Geometry& g,
                     int64_t wp, int64_t i, int64_t j, int64_t c0,
                     V16 (&acc)[P][V]) {
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v) acc[p][v] = V16{};
  for (int64_t di = 0; di < 3; ++di)
    for (int64_t dj = 0; dj < 3; ++dj)
      for (int64_t ci = 0; ci < g.ci; ++ci) {
        const float* kv = k + ((di * 3 + dj) * g.ci + ci) * g.co + c0;
        V16 kvec[V];
        for (int v = 0; v < V; ++v) kvec[v] = Load(kv + 16 * v);
        const float* xv = xpad + ((i + di) * wp + j + dj) * g.ci + ci;
        for (int p = 0; p < P; ++p) {
          const V16 x = Splat(xv[p * g.ci]);
          for (int v = 0; v < V; ++v) acc[p][v] += x * kvec[v];
        }
      }
}

// dout at the pooling window of output position (i, j), or nullptr off the
// pooled area (an odd side's last row or column gets no gradient).
inline const float* PoolingGradient(const float* dout, const Geometry& g,
                                    int64_t i, int64_t j) {
  if (i >= 2 * g.hq || j >= 2 * g.wq) return nullptr;
  return dout + ((i / 2) * g.wq + j / 2) * g.co;
}

// Passes 1 and 2 for the channels [c0, c0 + 16 V) of output row i, the
// channels' constants held in registers across the row. Pass 1 stores yhat
// and adds the row's dv and dv yhat to s1 and s2; pass 2 turns yhat into dy.
template <int V>
void RowPass1(const float* xp, const float* k, const float* dout,
              const float* scale, const float* beta, BackwardScratch& s,
              const Geometry& g, int64_t wp, int64_t i, int64_t c0,
              float* row) {
  V16 mv[V], rv[V], sv[V], bv[V], s1[V], s2[V];
  for (int v = 0; v < V; ++v) {
    const int64_t c = c0 + 16 * v;
    mv[v] = Load(s.meanf.data() + c);
    rv[v] = Load(s.rstd.data() + c);
    sv[v] = Load(scale + c);
    bv[v] = Load(beta + c);
    s1[v] = s2[v] = V16{};
  }
  auto finish = [&](const V16* acc, int64_t j) {
    float* m = row + j * g.co;
    const float* dz4 = PoolingGradient(dout, g, i, j);
    for (int v = 0; v < V; ++v) {
      const int64_t c = c0 + 16 * v;
      const V16 yh = (acc[v] - mv[v]) * rv[v];
      Store(m + c, yh);
      if (dz4) {
        const V16 dz = Load(dz4 + c) * 0.25f * sv[v];
        const V16 dv = yh * sv[v] + bv[v] > 0.f ? dz : V16{};
        s1[v] += dv;
        s2[v] += dv * yh;
      }
    }
  };
  int64_t j = 0;
  for (; j + 4 <= g.wo; j += 4) {
    V16 acc[4][V];
    ConvTile<4, V>(xp, k, g, wp, i, j, c0, acc);
    for (int p = 0; p < 4; ++p) finish(acc[p], j + p);
  }
  for (; j < g.wo; ++j) {
    V16 acc[1][V];
    ConvTile<1, V>(xp, k, g, wp, i, j, c0, acc);
    finish(acc[0], j);
  }
  for (int v = 0; v < V; ++v) {
    const int64_t c = c0 + 16 * v;
    for (int l = 0; l < 16; ++l) {
      s.s1[c + l] += s1[v][l];
      s.s2[c + l] += s2[v][l];
    }
  }
}

template <int V>
void RowPass2(const float* dout, const float* scale, const float* beta,
              BackwardScratch& s, const Geometry& g, int64_t i, int64_t c0,
              float* row) {
  V16 sv[V], bv[V], av[V], bbv[V], rv[V];
  for (int v = 0; v < V; ++v) {
    const int64_t c = c0 + 16 * v;
    sv[v] = Load(scale + c);
    bv[v] = Load(beta + c);
    av[v] = Load(s.a.data() + c);
    bbv[v] = Load(s.b.data() + c);
    rv[v] = Load(s.rstd.data() + c);
  }
  for (int64_t j = 0; j < g.wo; ++j) {
    float* m = row + j * g.co;
    const float* dz4 = PoolingGradient(dout, g, i, j);
    for (int v = 0; v < V; ++v) {
      const int64_t c = c0 + 16 * v;
      const V16 yh = Load(m + c);
      V16 dv{};
      if (dz4) {
        const V16 dz = Load(dz4 + c) * 0.25f * sv[v];
        dv = yh * sv[v] + bv[v] > 0.f ? dz : V16{};
      }
      Store(m + c, (dv - av[v] - yh * bbv[v]) * rv[v]);
    }
  }
}

// dx of P consecutive pixels (r, q..q+P-1) of input channel ci from the
// padded dy map (at(i, j): output position (i, j)): each kernel vector
// loaded serves P pixels, two independent sums a pixel.
template <int P, typename At>
inline void DxTile(const float* k, int64_t co, int64_t ci_n, int64_t ci,
                   int64_t pad, const At& at, int64_t r, int64_t q,
                   float* out) {
  const int64_t pair_co = co / 32 * 32, vec_co = co / 16 * 16;
  V16 acc[P][2] = {};
  float tail[P] = {};
  for (int64_t di = 0; di < 3; ++di)
    for (int64_t dj = 0; dj < 3; ++dj) {
      const float* kv = k + ((di * 3 + dj) * ci_n + ci) * co;
      const float* d = at(r + pad - di, q + pad - dj);
      int64_t c = 0;
      for (; c < pair_co; c += 32) {
        const V16 k0 = Load(kv + c), k1 = Load(kv + c + 16);
        for (int p = 0; p < P; ++p) {
          acc[p][0] += Load(d + p * co + c) * k0;
          acc[p][1] += Load(d + p * co + c + 16) * k1;
        }
      }
      for (; c < vec_co; c += 16) {
        const V16 k0 = Load(kv + c);
        for (int p = 0; p < P; ++p) acc[p][0] += Load(d + p * co + c) * k0;
      }
      for (c = vec_co; c < co; ++c)
        for (int p = 0; p < P; ++p) tail[p] += d[p * co + c] * kv[c];
    }
  for (int p = 0; p < P; ++p)
    out[p * ci_n] = static_cast<float>(Total(acc[p][0] + acc[p][1])) + tail[p];
}

void BackwardImage(const float* x, const float* k, const float* scale,
                   const float* beta, float eps, const float* dout, float* dx,
                   BackwardScratch& s, const Geometry& g) {
  const int64_t co = g.co, ci_n = g.ci, hw = g.ho * g.wo;
  const int64_t wp = g.w + 2 * g.pad, mw = g.wo + 4;  // padded widths
  const int64_t pair_co = co / 32 * 32, vec_co = co / 16 * 16;
  ChannelMoments(x, k, g, s.mean.data(), s.var.data(), s.moments);
  for (int64_t c = 0; c < co; ++c) {
    s.meanf[c] = static_cast<float>(s.mean[c]);
    s.rstd[c] = 1.f / std::sqrt(static_cast<float>(s.var[c]) + eps);
    s.s1[c] = s.s2[c] = 0.0;
  }
  PadImage(x, g, s.xpad);
  const float* xp = s.xpad.data();
  auto at = [&](int64_t i, int64_t j) {  // the map at output position (i, j)
    return s.map + ((i + 2) * mw + j + 2) * co;
  };
  // Pass 1: yhat and the sums, 32 channels at a time, then 16, then one.
  for (int64_t i = 0; i < g.ho; ++i) {
    for (int64_t c0 = 0; c0 < pair_co; c0 += 32)
      RowPass1<2>(xp, k, dout, scale, beta, s, g, wp, i, c0,
                  at(i, 0));
    for (int64_t c0 = pair_co; c0 < vec_co; c0 += 16)
      RowPass1<1>(xp, k, dout, scale, beta, s, g, wp, i, c0,
                  at(i, 0));
    for (int64_t j = 0; j < g.wo; ++j) {
      const float* dz4 = PoolingGradient(dout, g, i, j);
      for (int64_t c = vec_co; c < co; ++c) {
        const float yh =
            (ConvAt(xp, k, g, wp, i, j, c) - s.meanf[c]) * s.rstd[c];
        at(i, j)[c] = yh;
        if (dz4 && yh * scale[c] + beta[c] > 0.f) {
          const float dv = dz4[c] * 0.25f * scale[c];
          s.s1[c] += dv;
          s.s2[c] += dv * yh;
        }
      }
    }
  }
  for (int64_t c = 0; c < co; ++c) {
    s.a[c] = static_cast<float>(s.s1[c] / hw);
    s.b[c] = static_cast<float>(s.s2[c] / hw);
  }
  // Pass 2: dy = rstd (dv - a - yhat b).
  for (int64_t i = 0; i < g.ho; ++i) {
    for (int64_t c0 = 0; c0 < pair_co; c0 += 32)
      RowPass2<2>(dout, scale, beta, s, g, i, c0, at(i, 0));
    for (int64_t c0 = pair_co; c0 < vec_co; c0 += 16)
      RowPass2<1>(dout, scale, beta, s, g, i, c0, at(i, 0));
    for (int64_t j = 0; j < g.wo; ++j) {
      float* m = at(i, j);
      const float* dz4 = PoolingGradient(dout, g, i, j);
      for (int64_t c = vec_co; c < co; ++c) {
        const float yh = m[c];
        const float dv = dz4 && yh * scale[c] + beta[c] > 0.f
                             ? dz4[c] * 0.25f * scale[c] : 0.f;
        m[c] = (dv - s.a[c] - yh * s.b[c]) * s.rstd[c];
      }
    }
  }
  // Pass 3: dx[r, q, ci] = sum over taps and channels of k dy[r + pad - di,
  // q + pad - dj] (the border reads zeros), four pixels at a time, then the
  // rest of the row one by one (reading only the row's own positions).
  for (int64_t ci = 0; ci < ci_n; ++ci)
    for (int64_t r = 0; r < g.h; ++r) {
      int64_t q = 0;
      for (; q + 4 <= g.w; q += 4)
        DxTile<4>(k, co, ci_n, ci, g.pad, at, r, q,
                  dx + (r * g.w + q) * ci_n + ci);
      for (; q < g.w; ++q)
        DxTile<1>(k, co, ci_n, ci, g.pad, at, r, q,
                  dx + (r * g.w + q) * ci_n + ci);
    }
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
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  const float* sp = scale.typed_data();
  const float* bp = beta.typed_data();
  const float* dp = dout.typed_data();
  float* op = dx->typed_data();
  const int64_t in_size = g.h * g.w * g.ci, out_size = g.hq * g.wq * g.co;
  ParallelOverImages(pool, g.n, [=](int64_t begin, auto&& next) {
    BackwardScratch scratch(g);
    for (int64_t i = begin; i >= 0; i = next())
      BackwardImage(xp + i * in_size, kp, sp, bp, eps, dp + i * out_size,
                    op + i * in_size, scratch, g);
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
