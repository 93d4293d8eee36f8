// ROAD's linear imputer without its noise (operator 4, CPU, float32): every unknown pixel becomes the weighted mean
// of its 8 neighbours (1/6 across, 1/12 diagonal, neighbours outside the image left out), one sparse SPD system per
// image over its unknown pixels, the same for every channel. The algorithm is the pure-torch solver's
// (lightning_vis/metrics/perturbation.py, which runs on other devices and dtypes): conjugate gradients
// preconditioned by a symmetric multigrid V-cycle (bilinear interpolation onto the unknown pixels, the coarse grid
// one point past an even fine grid, Galerkin coarse operators, two l1-Jacobi sweeps scaled by 4/3 before and after,
// the coarsest grid of <= 100 points solved by a pseudo-inverse). Here each image's whole solve is one pass of fused
// loops over its own buffers, planes with a zero border (no bounds checks, so the compiler vectorises the rows; AVX2
// where the CPU has it, chosen at run time), instead of a dozen tensor operations per step; images are shared out
// over threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace lightning_vis {
namespace {

#if defined(__x86_64__) && !defined(__clang__)
#define LV_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LV_CLONES
#endif

constexpr int64_t kCoarsest = 100;  // points of the coarsest grid (COARSEST in perturbation.py)
constexpr float kAcross = 1.0f / 6, kDiagonal = 1.0f / 12;

// A grid of h x w points stored as planes of (h + 3) x (w + 3) floats: point (y, x) at (y + 1) * pitch + x + 1, a
// zero border of one point before and two after (the restriction of an even grid reads one point past its end).
struct Grid {
  int64_t h = 0, w = 0, pitch = 0, size = 0;
  Grid() = default;
  Grid(int64_t h_, int64_t w_) : h(h_), w(w_), pitch(w_ + 3), size((h_ + 3) * (w_ + 3)) {}
  int64_t at(int64_t y, int64_t x) const { return (y + 1) * pitch + x + 1; }
};

// out = the finest grid's operator applied to x, at the unknown pixels m (zero elsewhere); x is zero at known ones.
LV_CLONES void fine_op(const float* __restrict x, const float* __restrict d, const float* __restrict m,
                       float* __restrict out, int64_t h, int64_t w, int64_t p) {
  for (int64_t y = 1; y <= h; ++y) {
    const int64_t o = y * p;
    for (int64_t i = o + 1; i <= o + w; ++i) {
      const float across = x[i - 1] + x[i + 1] + x[i - p] + x[i + p];
      const float diagonal = x[i - p - 1] + x[i - p + 1] + x[i + p - 1] + x[i + p + 1];
      out[i] = m[i] * (d[i] * x[i] - kAcross * across - kDiagonal * diagonal);
    }
  }
}

// out = a coarse grid's 9-point stencils (planes c[e], offset (dy, dx) at e = 3 (dy + 1) + dx + 1) applied to x
LV_CLONES void stencil_op(const float* __restrict x, const float* __restrict c, float* __restrict out, int64_t h,
                          int64_t w, int64_t p, int64_t size) {
  const float *c0 = c, *c1 = c + size, *c2 = c + 2 * size, *c3 = c + 3 * size, *c4 = c + 4 * size,
              *c5 = c + 5 * size, *c6 = c + 6 * size, *c7 = c + 7 * size, *c8 = c + 8 * size;
  for (int64_t y = 1; y <= h; ++y) {
    const int64_t o = y * p;
    for (int64_t i = o + 1; i <= o + w; ++i)
      out[i] = c0[i] * x[i - p - 1] + c1[i] * x[i - p] + c2[i] * x[i - p + 1] + c3[i] * x[i - 1] + c4[i] * x[i] +
               c5[i] * x[i + 1] + c6[i] * x[i + p - 1] + c7[i] * x[i + p] + c8[i] * x[i + p + 1];
  }
}

// x += wt * (r - t), over whole planes (wt is zero on the border and at inactive points)
LV_CLONES void relax(float* __restrict x, const float* __restrict wt, const float* __restrict r,
                     const float* __restrict t, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += wt[i] * (r[i] - t[i]);
}

// sum of a[i] * b[i] in float, 16 partial sums (vectorised; CG's step sizes need no more)
LV_CLONES float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) acc[k] += a[i + k] * b[i + k];
  float s = 0;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int k = 0; k < 16; ++k) s += acc[k];
  return s;
}

// x += alpha p, r -= alpha ap
LV_CLONES void cg_update(float* __restrict x, float* __restrict r, const float* __restrict p,
                         const float* __restrict ap, float alpha, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    x[i] += alpha * p[i];
    r[i] -= alpha * ap[i];
  }
}

// p = z + beta p
LV_CLONES void cg_direction(float* __restrict p, const float* __restrict z, float beta, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = z[i] + beta * p[i];
}

// Coarse parents of fine index y along one axis: coarse point j sits on fine point 2j (weight 1); an odd y lies
// halfway between (y - 1) / 2 and (y + 1) / 2 (weights 1/2).
struct Parents {
  int n;
  int64_t idx[2];
  double wt[2];
};

Parents parents(int64_t y) {
  if (y % 2 == 0) return {1, {y / 2, 0}, {1.0, 0.0}};
  return {2, {(y - 1) / 2, (y + 1) / 2}, {0.5, 0.5}};
}

struct Level {
  Grid g;
  std::vector<float> coef;    // 9 planes (coarse grids; the finest grid's operator is fine_op)
  std::vector<float> weight;  // the smoother's 4 / (3 * l1 row sum), zero at inactive points and on the border
  std::vector<float> inv;     // the coarsest grid: its pseudo-inverse over the h * w points
  std::vector<float> x, r, t; // per-channel work planes (x and r on the coarse grids only)
};

struct Solver {
  int64_t C;
  Grid g;                     // the image's grid
  std::vector<float> d, m;    // the diagonal (the in-image neighbours' weights) and the unknown pixels (1 / 0)
  std::vector<Level> levels;

  Solver(const bool* known, int64_t C_, int64_t h, int64_t w) : C(C_), g(h, w) {
    d.assign(g.size, 0.f);
    m.assign(g.size, 0.f);
    levels.emplace_back();
    levels[0].g = g;
    levels[0].weight.assign(g.size, 0.f);
    std::vector<float> fine(9 * g.size, 0.f);  // the finest grid's stencils, for the Galerkin product only
    for (int64_t y = 0; y < h; ++y)
      for (int64_t x = 0; x < w; ++x)
        if (!known[y * w + x]) m[g.at(y, x)] = 1.f;
    for (int64_t y = 0; y < h; ++y)
      for (int64_t x = 0; x < w; ++x) {
        const int64_t i = g.at(y, x);
        double s = 0;
        for (int e = 0; e < 9; ++e) {
          const int64_t y2 = y + e / 3 - 1, x2 = x + e % 3 - 1;
          if (e == 4 || y2 < 0 || y2 >= h || x2 < 0 || x2 >= w) continue;
          const double wt = (e % 2) ? 1.0 / 6 : 1.0 / 12;  // odd offsets are across, even ones diagonal
          s += wt;
          fine[e * g.size + i] = float(-wt) * m[i] * m[g.at(y2, x2)];
        }
        d[i] = float(s);
        fine[4 * g.size + i] = float(s) * m[i];
        levels[0].weight[i] = m[i] * float(4.0 / (3.0 * 2.0 * s));  // l1 row sum <= twice the diagonal
      }
    while (levels.back().g.h * levels.back().g.w > kCoarsest) {
      Level next = coarsen(levels.size() == 1 ? fine : levels.back().coef, levels.back().g);
      levels.push_back(std::move(next));
    }
    if (levels.size() > 1) pseudo_inverse(levels.back());
    for (size_t l = 0; l < levels.size(); ++l) {  // the finest grid's x and r are solve()'s own
      Level& L = levels[l];
      if (l > 0) {
        L.x.assign(C * L.g.size, 0.f);
        L.r.assign(C * L.g.size, 0.f);
      }
      L.t.assign(C * L.g.size, 0.f);
    }
  }

  // The Galerkin coarse grid R F P of fine stencils F: P bilinear onto the fine grid's active points (F's rows and
  // columns are zero elsewhere), R = P^T. P is the product of an interpolation along x and one along y, so the
  // product is taken one axis at a time (R_y (R_x F P_x) P_y): about 30 multiply-adds per fine point instead of 45.
  static Level coarsen(const std::vector<float>& F, const Grid& f) {
    Level L;
    L.g = Grid(f.h / 2 + 1, f.w / 2 + 1);
    const Grid& g = L.g;
    const Grid m(f.h, g.w);  // after the x pass: fine rows, coarse columns
    std::vector<float> G(9 * m.size, 0.f);
    for (int64_t y = 0; y < f.h; ++y)
      for (int64_t x = 0; x < f.w; ++x) {
        const int64_t i = f.at(y, x);
        if (F[4 * f.size + i] == 0.f) continue;  // an inactive point: its row and column are zero
        const Parents px = parents(x);
        for (int e = 0; e < 9; ++e) {
          const float k = F[e * f.size + i];
          if (k == 0.f) continue;
          const int dy = e / 3 - 1;
          const Parents qx = parents(x + e % 3 - 1);
          for (int a = 0; a < px.n; ++a)
            for (int c = 0; c < qx.n; ++c)
              G[((dy + 1) * 3 + int(qx.idx[c] - px.idx[a]) + 1) * m.size + m.at(y, px.idx[a])] +=
                  float(px.wt[a] * qx.wt[c]) * k;
          }
      }
    L.coef.assign(9 * g.size, 0.f);
    for (int64_t y = 0; y < f.h; ++y) {
      const Parents py = parents(y);
      for (int64_t X = 0; X < g.w; ++X) {
        const int64_t i = m.at(y, X);
        if (G[4 * m.size + i] == 0.f) continue;
        for (int e = 0; e < 9; ++e) {
          const float k = G[e * m.size + i];
          if (k == 0.f) continue;
          const Parents qy = parents(y + e / 3 - 1);
          for (int a = 0; a < py.n; ++a)
            for (int c = 0; c < qy.n; ++c)
              L.coef[(int(qy.idx[c] - py.idx[a] + 1) * 3 + e % 3) * g.size + g.at(py.idx[a], X)] +=
                  float(py.wt[a] * qy.wt[c]) * k;
        }
      }
    }
    L.weight.assign(g.size, 0.f);
    for (int64_t y = 0; y < g.h; ++y)
      for (int64_t x = 0; x < g.w; ++x) {
        const int64_t I = g.at(y, x);
        if (!(L.coef[4 * g.size + I] > 0.f)) {  // reaches no active fine point: inactive
          for (int e = 0; e < 9; ++e) L.coef[e * g.size + I] = 0.f;
          continue;
        }
        float l1 = 0;
        for (int e = 0; e < 9; ++e) l1 += std::abs(L.coef[e * g.size + I]);
        L.weight[I] = 4.f / (3.f * l1);
      }
    return L;
  }

  // The coarsest grid's pseudo-inverse (as torch.linalg.pinv, hermitian, its default cut-off), inactive points' rows
  // and columns zero.
  static void pseudo_inverse(Level& L) {
    const Grid& g = L.g;
    const int64_t n = g.h * g.w;
    auto A = at::zeros({n, n}, at::kDouble);
    auto a = A.accessor<double, 2>();
    for (int64_t y = 0; y < g.h; ++y)
      for (int64_t x = 0; x < g.w; ++x) {
        const int64_t i = y * g.w + x, I = g.at(y, x);
        if (L.weight[I] == 0.f) {
          a[i][i] = 1.0;
          continue;
        }
        for (int e = 0; e < 9; ++e) {
          const int64_t y2 = y + e / 3 - 1, x2 = x + e % 3 - 1;
          if (y2 >= 0 && y2 < g.h && x2 >= 0 && x2 < g.w) a[i][y2 * g.w + x2] += L.coef[e * g.size + I];
        }
      }
    auto inv = at::linalg_pinv(A, std::numeric_limits<double>::epsilon() * double(n), /*hermitian=*/true)
                   .contiguous();
    const double* p = inv.data_ptr<double>();
    L.inv.assign(n * n, 0.f);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j)
        if (L.weight[g.at(i / g.w, i % g.w)] != 0.f && L.weight[g.at(j / g.w, j % g.w)] != 0.f)
          L.inv[i * n + j] = float(p[i * n + j]);
  }

  void op(size_t level, const float* x, float* out) {
    const Level& L = levels[level];
    for (int64_t c = 0; c < C; ++c) {
      const int64_t o = c * L.g.size;
      if (level == 0)
        fine_op(x + o, d.data(), m.data(), out + o, L.g.h, L.g.w, L.g.pitch);
      else
        stencil_op(x + o, L.coef.data(), out + o, L.g.h, L.g.w, L.g.pitch, L.g.size);
    }
  }

  void jacobi(size_t level, float* x, const float* r) {
    Level& L = levels[level];
    op(level, x, L.t.data());
    for (int64_t c = 0; c < C; ++c) {
      const int64_t o = c * L.g.size;
      relax(x + o, L.weight.data(), r + o, L.t.data() + o, L.g.size);
    }
  }

  // z = one V-cycle applied to r, on grid `level` (C planes each)
  void vcycle(size_t level, const float* r, float* z) {
    Level& L = levels[level];
    const Grid& g = L.g;
    const bool last = level + 1 == levels.size();
    if (last && level > 0) {
      const int64_t n = g.h * g.w;
      std::vector<float> v(n);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t o = c * g.size;
        for (int64_t j = 0; j < n; ++j) v[j] = r[o + g.at(j / g.w, j % g.w)];
        for (int64_t i = 0; i < n; ++i) {
          float s = 0;
          for (int64_t j = 0; j < n; ++j) s += L.inv[i * n + j] * v[j];
          z[o + g.at(i / g.w, i % g.w)] = s;
        }
      }
      return;
    }
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < g.size; ++i) z[c * g.size + i] = L.weight[i] * r[c * g.size + i];
    for (int s = 0; s < (last ? 19 : 1); ++s) jacobi(level, z, r);  // a grid too small to coarsen: Jacobi alone
    if (last) return;
    Level& Lc = levels[level + 1];
    const Grid& gc = Lc.g;
    op(level, z, L.t.data());
    for (int64_t c = 0; c < C; ++c) {
      float* t = L.t.data() + c * g.size;
      const float* rc = r + c * g.size;
      for (int64_t i = 0; i < g.size; ++i) t[i] = L.weight[i] != 0.f ? rc[i] - t[i] : 0.f;  // the residual
      // restriction: the adjoint of the interpolation below, a full weighting at stride 2
      float* out = Lc.r.data() + c * gc.size;
      for (int64_t Y = 0; Y < gc.h; ++Y)
        for (int64_t X = 0; X < gc.w; ++X) {
          const int64_t j = g.at(2 * Y, 2 * X), p = g.pitch;
          out[gc.at(Y, X)] = t[j] + 0.5f * (t[j - 1] + t[j + 1] + t[j - p] + t[j + p]) +
                             0.25f * (t[j - p - 1] + t[j - p + 1] + t[j + p - 1] + t[j + p + 1]);
        }
    }
    vcycle(level + 1, Lc.r.data(), Lc.x.data());
    std::vector<float> row(gc.w + 1);
    for (int64_t c = 0; c < C; ++c) {  // bilinear interpolation onto the active fine points, added to z
      const float* xc = Lc.x.data() + c * gc.size;
      float* zc = z + c * g.size;
      for (int64_t y = 0; y < g.h; ++y) {
        const float* a = xc + gc.at(y / 2, 0);
        const float* b = xc + gc.at((y + 1) / 2, 0);
        for (int64_t X = 0; X < gc.w; ++X) row[X] = 0.5f * (a[X] + b[X]);
        const int64_t o = g.at(y, 0);
        const float* wt = L.weight.data() + o;
        float* zr = zc + o;
        for (int64_t x = 0; x < g.w; x += 2) zr[x] += wt[x] != 0.f ? row[x / 2] : 0.f;
        for (int64_t x = 1; x < g.w; x += 2) zr[x] += wt[x] != 0.f ? 0.5f * (row[x / 2] + row[x / 2 + 1]) : 0.f;
      }
    }
    for (int s = 0; s < 2; ++s) jacobi(level, z, r);
  }

  // v: the image's C planes (H x W, contiguous); its unknown pixels are overwritten with the solution.
  void solve(float* v, double tol, int64_t max_iter) {
    const int64_t S = g.size, h = g.h, w = g.w;
    std::vector<float> known(C * S, 0.f), x(C * S, 0.f), r(C * S, 0.f), z(C * S, 0.f), p(C * S, 0.f),
        ap(C * S, 0.f);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t y = 0; y < h; ++y)
        for (int64_t xx = 0; xx < w; ++xx)
          known[c * S + g.at(y, xx)] = m[g.at(y, xx)] != 0.f ? 0.f : v[(c * h + y) * w + xx];
    // b = what the known neighbours contribute: minus the operator's off-diagonal part applied to the known values
    op(0, known.data(), r.data());  // at unknown pixels: d * 0 - (their weighted known neighbours)
    for (int64_t i = 0; i < C * S; ++i) r[i] = -r[i];
    std::vector<double> bn(C), rz(C);
    for (int64_t c = 0; c < C; ++c) bn[c] = std::max(std::sqrt(double(dot(&r[c * S], &r[c * S], S))), 1e-30);
    vcycle(0, r.data(), z.data());
    p = z;
    for (int64_t c = 0; c < C; ++c) rz[c] = dot(&r[c * S], &z[c * S], S);
    for (int64_t step = 0; step < max_iter; ++step) {
      bool done = true;
      for (int64_t c = 0; c < C && done; ++c) done = std::sqrt(double(dot(&r[c * S], &r[c * S], S))) / bn[c] <= tol;
      if (done) break;
      op(0, p.data(), ap.data());
      for (int64_t c = 0; c < C; ++c) {
        const float alpha = float(rz[c] / std::max(double(dot(&p[c * S], &ap[c * S], S)), 1e-30));
        cg_update(&x[c * S], &r[c * S], &p[c * S], &ap[c * S], alpha, S);
      }
      vcycle(0, r.data(), z.data());
      for (int64_t c = 0; c < C; ++c) {
        const double rz_new = dot(&r[c * S], &z[c * S], S);
        const float beta = float(rz_new / std::max(rz[c], 1e-30));
        cg_direction(&p[c * S], &z[c * S], beta, S);
        rz[c] = rz_new;
      }
    }
    for (int64_t c = 0; c < C; ++c)
      for (int64_t y = 0; y < h; ++y)
        for (int64_t xx = 0; xx < w; ++xx)
          if (m[g.at(y, xx)] != 0.f) v[(c * h + y) * w + xx] = x[c * S + g.at(y, xx)];
  }
};

at::Tensor impute_cpu(const at::Tensor& images, const at::Tensor& known, double tol, int64_t max_iter) {
  TORCH_CHECK(images.dim() == 4, "impute: images must be (B, C, H, W), got ", images.sizes());
  TORCH_CHECK(known.dim() == 3 && known.size(0) == images.size(0) && known.size(1) == images.size(2) &&
                  known.size(2) == images.size(3),
              "impute: known must be (B, H, W) matching the images ", images.sizes(), ", got ", known.sizes());
  TORCH_CHECK(known.scalar_type() == at::kBool, "impute: known must be bool, got ", known.scalar_type());
  TORCH_CHECK(images.scalar_type() == at::kFloat, "impute: images must be float32, got ", images.scalar_type());
  TORCH_CHECK(tol >= 0 && max_iter >= 0, "impute: tol and max_iter must be >= 0, got ", tol, " and ", max_iter);
  auto out = images.contiguous().clone();
  const auto k = known.contiguous();
  const int64_t B = out.size(0), C = out.size(1), H = out.size(2), W = out.size(3);
  if (out.numel() == 0) return out;
  const bool* kp = k.data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(std::any_of(kp + b * H * W, kp + (b + 1) * H * W, [](bool v) { return v; }), "impute: image ", b,
                " has every pixel removed: nothing to impute from");
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) Solver(kp + b * H * W, C, H, W).solve(op + b * C * H * W, tol, max_iter);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lightning_vis, CPU, m) { m.impl("impute", &impute_cpu); }

}  // namespace lightning_vis
