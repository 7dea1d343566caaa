// Runs cpu_first_block.cc's per-image forward and input-gradient kernels
// over edge geometries, for tests/test_cpu_first_block.py to build with
// AddressSanitizer and UndefinedBehaviorSanitizer: any out-of-bounds read or
// write aborts with a nonzero exit. The including test passes the source's
// path as KERNEL_SOURCE.
#include KERNEL_SOURCE

#include <cstdio>
#include <random>

int main() {
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  // h, w, c_in, c_out, padding: the reference and CIFAR shapes, odd sides,
  // widths off every vector multiple, rows whose width is not a multiple of
  // the four pixels the gradient takes at a time, no padding.
  const int shapes[][5] = {{28, 28, 1, 128, 3}, {32, 32, 3, 128, 1},
                           {7, 5, 1, 16, 0},    {10, 10, 3, 40, 1},
                           {6, 10, 1, 96, 1},   {4, 4, 2, 20, 0},
                           {9, 11, 3, 8, 1},    {5, 6, 1, 33, 0},
                           {3, 3, 1, 64, 1},    {2, 7, 2, 17, 2}};
  for (const auto& s : shapes) {
    Geometry g;
    g.n = 1; g.h = s[0]; g.w = s[1]; g.ci = s[2]; g.co = s[3]; g.pad = s[4];
    g.ho = g.h + 2 * g.pad - 2; g.wo = g.w + 2 * g.pad - 2;
    g.hq = g.ho / 2; g.wq = g.wo / 2;
    std::vector<float> x(g.h * g.w * g.ci), k(9 * g.ci * g.co),
        scale(g.co, 1.f), beta(g.co, 0.1f), out(g.hq * g.wq * g.co),
        dout(g.hq * g.wq * g.co), dx(g.h * g.w * g.ci);
    for (auto& v : x) v = normal(rng);
    for (auto& v : k) v = 0.3f * normal(rng);
    for (auto& v : dout) v = normal(rng);
    std::vector<double> scratch, mean(g.co), var(g.co);
    std::vector<float> xpad, gain(g.co), shift(g.co);
    ForwardImage(x.data(), k.data(), scale.data(), beta.data(), 1e-5f,
                 out.data(), scratch, xpad, mean.data(), var.data(),
                 gain.data(), shift.data(), g);
    BackwardScratch b(g);
    BackwardImage(x.data(), k.data(), scale.data(), beta.data(), 1e-5f,
                  dout.data(), dx.data(), b, g);
    std::printf("%d %d %d %d %d ok\n", s[0], s[1], s[2], s[3], s[4]);
  }
  return 0;
}
