// Both attention levels of ACF (docs/model.md#forward-pass, eqs. (2a)-(5)) fused into one pass per user.
//
// Everything that does not depend on the (user, slot) pair is precomputed by GEMMs
// outside (per distinct item k: xt_k = W2x r_k and y_k = W1x r_k, packed as
// xy [K, M, H + D]; per user: uc = W2u u + b2u + b2x and ut = W1u u + b1u; per slot:
// pp = W1p p + b1p + b1x: each bias goes where it costs least). Since W1x xbar = sum_m beta_m W1x r_m, the pooled
// feature enters the item attention through y and xbar itself is never needed.
// What is left per (user i, slot l, component m) is relu + dot + softmax, done
// here in registers: the [B, P, M, H] hidden activations are never stored.
//
// Determinism: the forward and the per-user part of the backward write disjoint rows.
// Gradients shared between users (per-item xy rows, w1, w2, c1, c2) are summed in a
// fixed order (per item over its slots in (i, l) order; over users in user order), so
// results do not depend on the number of threads. No atomics.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "acf_cpu.h"

namespace acf_fast {
namespace {

struct Dims {
  int64_t B, P, K, M, H, D;
};

Dims check_attention(const at::Tensor& xy, const at::Tensor& uc, const at::Tensor& ut,
                     const at::Tensor& pp, const at::Tensor& prof, const at::Tensor& slot_item,
                     const at::Tensor& w2, const at::Tensor& w1) {
  TORCH_CHECK(uc.dim() == 2 && ut.dim() == 2, "acf_attention: uc and ut must be 2-d");
  TORCH_CHECK(slot_item.dim() == 2 && slot_item.scalar_type() == at::kLong,
              "acf_attention: slot_item must be a [B, P] int64 tensor");
  Dims d{ut.size(0), slot_item.size(1), xy.size(0), xy.dim() == 3 ? xy.size(1) : 0,
         uc.size(1), ut.size(1)};
  TORCH_CHECK(xy.dim() == 3 && xy.size(2) == d.H + d.D, "acf_attention: xy must be [K, M, ",
              d.H + d.D, "], got ", xy.sizes());
  TORCH_CHECK(uc.size(0) == d.B && slot_item.size(0) == d.B, "acf_attention: batch sizes differ");
  TORCH_CHECK(pp.sizes() == at::IntArrayRef({d.B, d.P, d.D}) &&
                  prof.sizes() == at::IntArrayRef({d.B, d.P, d.D}),
              "acf_attention: pp and prof must be [B, P, D]");
  TORCH_CHECK(w2.numel() == d.H && w1.numel() == d.D, "acf_attention: w2 must have H and w1 D entries");
  const auto t = xy.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble, "acf_attention: dtype must be float32 or float64");
  for (const auto* x : {&uc, &ut, &pp, &prof, &w2, &w1})
    TORCH_CHECK(x->scalar_type() == t, "acf_attention: all floating inputs must be ", t);
  return d;
}

// The hot loops take __restrict pointers: Python's build flags include
// -fno-strict-aliasing, under which GCC otherwise assumes a float store may change the
// pointers captured by the parallel_for lambdas and gives up vectorising.
template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

// w . relu(a + b): the component-attention score before c2.
template <typename T>
inline T relu_dot(const T* __restrict a, const T* __restrict b, const T* __restrict w, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    const T v = a[j] + b[j];
    s += w[j] * (v > T(0) ? v : T(0));
  }
  return s;
}

// out += g * x
template <typename T>
inline void axpy(T* __restrict out, T g, const T* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] += g * x[j];
}

// v = a + b; out += [v > 0] g w  (and, when part is given, part += [v > 0] g v).
// Written with a 0/1 factor, not a branch: GCC will not speculate the product under
// its default -ftrapping-math, and the branchy loop neither vectorises nor predicts.
template <typename T>
inline void relu_grad(T* __restrict out, T* __restrict part, const T* __restrict a,
                      const T* __restrict b, const T* __restrict w, T g, int64_t n) {
  if (part == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] += T(a[j] + b[j] > T(0)) * (g * w[j]);
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T v = a[j] + b[j];
    const T on = T(v > T(0));
    out[j] += on * (g * w[j]);
    part[j] += on * (g * v);
  }
}

// In place softmax of x[0:n]; n >= 1.
template <typename T>
inline void softmax_inplace(T* x, int64_t n) {
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, x[j]);
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - mx);
    sum += x[j];
  }
  const T inv = T(1) / sum;
  for (int64_t j = 0; j < n; ++j) x[j] *= inv;
}

// xx[0:D] = sum_m beta[m] * y_km for item k (y rows have stride HD inside xy).
template <typename T>
inline void pool_y(const T* xy_k, const T* beta, const Dims& d, T* __restrict xx) {
  const int64_t HD = d.H + d.D;
  std::fill(xx, xx + d.D, T(0));
  for (int64_t m = 0; m < d.M; ++m) axpy(xx, beta[m], xy_k + m * HD + d.H, d.D);
}

template <typename T>
void attention_forward_impl(const Dims& d, const T* xy, const T* uc, const T* ut, const T* pp,
                            const T* prof, const int64_t* slot, const T* w2, T c2, const T* w1,
                            T c1, T* user, T* alpha, T* beta) {
  const int64_t HD = d.H + d.D;
  const int64_t block = 4;  // users per task
  parallel_tasks((d.B + block - 1) / block, [&](int64_t task) {
    std::vector<T> xx(d.D), z(d.D), a(d.P);
    for (int64_t i = task * block; i < std::min(d.B, (task + 1) * block); ++i) {
      const T* uci = uc + i * d.H;
      const T* uti = ut + i * d.D;
      bool any = false;
      for (int64_t l = 0; l < d.P; ++l) {
        T* bl = beta + (i * d.P + l) * d.M;
        const int64_t k = slot[i * d.P + l];
        if (k < 0) {  // padded slot: no attention, and beta reported as 0
          std::fill(bl, bl + d.M, T(0));
          continue;
        }
        any = true;
        const T* xy_k = xy + k * d.M * HD;
        for (int64_t m = 0; m < d.M; ++m) bl[m] = relu_dot(xy_k + m * HD, uci, w2, d.H) + c2;
        softmax_inplace(bl, d.M);
        pool_y(xy_k, bl, d, xx.data());
        const T* ppl = pp + (i * d.P + l) * d.D;
        for (int64_t j = 0; j < d.D; ++j) z[j] = uti[j] + ppl[j] + xx[j];
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < d.D; ++j) s += w1[j] * (z[j] > T(0) ? z[j] : T(0));
        a[l] = s + c1;
      }
      T* al = alpha + i * d.P;
      // masked softmax over slots; a profile with no real item gives alpha = 0
      T mx = -std::numeric_limits<T>::infinity();
      for (int64_t l = 0; l < d.P; ++l)
        if (slot[i * d.P + l] >= 0) mx = std::max(mx, a[l]);
      T sum = 0;
      for (int64_t l = 0; l < d.P; ++l) {
        al[l] = slot[i * d.P + l] >= 0 ? std::exp(a[l] - mx) : T(0);
        sum += al[l];
      }
      const T inv = any ? T(1) / sum : T(0);
      T* ui = user + i * d.D;
      std::copy(uti, uti + d.D, ui);
      for (int64_t l = 0; l < d.P; ++l) {
        al[l] *= inv;
        if (al[l] == T(0)) continue;
        axpy(ui, al[l], prof + (i * d.P + l) * d.D, d.D);
      }
    }
  });
}

template <typename T>
void attention_backward_impl(const Dims& d, const T* g_user, const T* g_alpha, const T* g_beta,
                             const T* xy, const T* uc, const T* ut, const T* pp, const T* prof,
                             const int64_t* slot, const T* w2, const T* w1, const T* alpha,
                             const T* beta, T* g_xy, T* g_uc, T* g_ut, T* g_pp, T* g_prof,
                             T* g_w2, T* g_c2, T* g_w1, T* g_c1) {
  const int64_t HD = d.H + d.D;
  // Per-user partial sums of the shared parameters' gradients, reduced in user order.
  std::vector<T> w1_part(d.B * d.D, T(0)), w2_part(d.B * d.H, T(0)), c_part(d.B * 2, T(0));
  // dL/d(score before softmax over m) per (user, slot, component), for the item pass.
  std::vector<T> g_e(d.B * d.P * d.M, T(0));

  const int64_t block = 4;  // users (or items, below) per task
  parallel_tasks((d.B + block - 1) / block, [&](int64_t task) {
    std::vector<T> ga(d.P), xx(d.D), gb(d.M);
    for (int64_t i = task * block; i < std::min(d.B, (task + 1) * block); ++i) {
      const T* gu = g_user + i * d.D;
      const T* al = alpha + i * d.P;
      const T* uci = uc + i * d.H;
      const T* uti = ut + i * d.D;
      T* gut = g_ut + i * d.D;
      T* guc = g_uc + i * d.H;
      T* w1p = w1_part.data() + i * d.D;
      T* w2p = w2_part.data() + i * d.H;
      std::copy(gu, gu + d.D, gut);  // user = ut + ...
      // user = ut + sum_l alpha_l p_l
      T s = 0;
      for (int64_t l = 0; l < d.P; ++l) {
        const int64_t sl = i * d.P + l;
        const T* pl = prof + sl * d.D;
        T* gpl = g_prof + sl * d.D;
        for (int64_t j = 0; j < d.D; ++j) gpl[j] = al[l] * gu[j];
        ga[l] = slot[sl] >= 0 ? dot(gu, pl, d.D) + g_alpha[sl] : T(0);
        s += al[l] * ga[l];
      }
      for (int64_t l = 0; l < d.P; ++l) {
        const int64_t sl = i * d.P + l;
        const int64_t k = slot[sl];
        T* gz = g_pp + sl * d.D;  // dL/dz = dL/dpp = dL/dxx
        if (k < 0) {
          std::fill(gz, gz + d.D, T(0));
          continue;
        }
        const T gal = al[l] * (ga[l] - s);  // through the softmax over slots
        c_part[2 * i] += gal;
        const T* bl = beta + sl * d.M;
        const T* xy_k = xy + k * d.M * HD;
        pool_y(xy_k, bl, d, xx.data());
        const T* ppl = pp + sl * d.D;
        for (int64_t j = 0; j < d.D; ++j) {
          const T z = uti[j] + ppl[j] + xx[j];
          const bool on = z > T(0);
          w1p[j] += on ? gal * z : T(0);
          gz[j] = on ? gal * w1[j] : T(0);
          gut[j] += gz[j];
        }
        // xx = sum_m beta_m y_km  ->  dL/dbeta_m, then through the softmax over m
        T sb = 0;
        for (int64_t m = 0; m < d.M; ++m) {
          gb[m] = dot(gz, xy_k + m * HD + d.H, d.D) + g_beta[sl * d.M + m];
          sb += bl[m] * gb[m];
        }
        T* ge = g_e.data() + sl * d.M;
        for (int64_t m = 0; m < d.M; ++m) {
          ge[m] = bl[m] * (gb[m] - sb);
          c_part[2 * i + 1] += ge[m];
          if (ge[m] == T(0)) continue;
          relu_grad(guc, w2p, xy_k + m * HD, uci, w2, ge[m], d.H);
        }
      }
    }
  });

  // Per distinct item: sum over the slots that hold it, in (user, slot) order.
  std::vector<int64_t> start(d.K + 1, 0), order(d.B * d.P);
  for (int64_t sl = 0; sl < d.B * d.P; ++sl)
    if (slot[sl] >= 0) ++start[slot[sl] + 1];
  for (int64_t k = 0; k < d.K; ++k) start[k + 1] += start[k];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t sl = 0; sl < d.B * d.P; ++sl)
      if (slot[sl] >= 0) order[fill[slot[sl]]++] = sl;
  }
  parallel_tasks((d.K + block - 1) / block, [&](int64_t task) {
    for (int64_t k = task * block; k < std::min(d.K, (task + 1) * block); ++k) {
      // zeroed here, not up front: the block is about to be accumulated into, so this
      // costs no extra pass over memory
      std::fill(g_xy + k * d.M * HD, g_xy + (k + 1) * d.M * HD, T(0));
      for (int64_t o = start[k]; o < start[k + 1]; ++o) {
        const int64_t sl = order[o];
        const int64_t i = sl / d.P;
        const T* gz = g_pp + sl * d.D;
        const T* uci = uc + i * d.H;
        for (int64_t m = 0; m < d.M; ++m) {
          const int64_t row = (k * d.M + m) * HD;
          axpy(g_xy + row + d.H, beta[sl * d.M + m], gz, d.D);
          const T gem = g_e[sl * d.M + m];
          if (gem == T(0)) continue;
          relu_grad<T>(g_xy + row, nullptr, xy + row, uci, w2, gem, d.H);
        }
      }
    }
  });

  for (int64_t i = 0; i < d.B; ++i) {
    for (int64_t j = 0; j < d.D; ++j) g_w1[j] += w1_part[i * d.D + j];
    for (int64_t h = 0; h < d.H; ++h) g_w2[h] += w2_part[i * d.H + h];
    g_c1[0] += c_part[2 * i];
    g_c2[0] += c_part[2 * i + 1];
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_cpu(
    const at::Tensor& xy, const at::Tensor& uc, const at::Tensor& ut, const at::Tensor& pp,
    const at::Tensor& prof, const at::Tensor& slot_item, const at::Tensor& w2,
    const at::Tensor& c2, const at::Tensor& w1, const at::Tensor& c1) {
  const Dims d = check_attention(xy, uc, ut, pp, prof, slot_item, w2, w1);
  auto xy_c = xy.contiguous(), uc_c = uc.contiguous(), ut_c = ut.contiguous();
  auto pp_c = pp.contiguous(), prof_c = prof.contiguous(), slot_c = slot_item.contiguous();
  auto w2_c = w2.contiguous(), w1_c = w1.contiguous();
  const auto* sp = slot_c.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < slot_c.numel(); ++j)
    TORCH_CHECK(sp[j] >= -1 && sp[j] < d.K, "acf_attention: slot_item ", sp[j], " out of range");
  auto user = at::empty({d.B, d.D}, ut.options());
  auto alpha = at::empty({d.B, d.P}, ut.options());
  auto beta = at::empty({d.B, d.P, d.M}, ut.options());
  AT_DISPATCH_FLOATING_TYPES(xy.scalar_type(), "acf_attention_cpu", [&] {
    attention_forward_impl<scalar_t>(
        d, xy_c.const_data_ptr<scalar_t>(), uc_c.const_data_ptr<scalar_t>(),
        ut_c.const_data_ptr<scalar_t>(), pp_c.const_data_ptr<scalar_t>(),
        prof_c.const_data_ptr<scalar_t>(), sp, w2_c.const_data_ptr<scalar_t>(),
        c2.item<scalar_t>(), w1_c.const_data_ptr<scalar_t>(), c1.item<scalar_t>(),
        user.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>());
  });
  return {user, alpha, beta};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
attention_backward_cpu(const at::Tensor& g_user, const at::Tensor& g_alpha,
                       const at::Tensor& g_beta, const at::Tensor& xy, const at::Tensor& uc,
                       const at::Tensor& ut, const at::Tensor& pp, const at::Tensor& prof,
                       const at::Tensor& slot_item, const at::Tensor& w2, const at::Tensor& w1,
                       const at::Tensor& alpha, const at::Tensor& beta) {
  const Dims d = check_attention(xy, uc, ut, pp, prof, slot_item, w2, w1);
  TORCH_CHECK(g_user.sizes() == ut.sizes() && alpha.sizes() == slot_item.sizes() &&
                  g_alpha.sizes() == alpha.sizes() && g_beta.sizes() == beta.sizes() &&
                  beta.sizes() == at::IntArrayRef({d.B, d.P, d.M}),
              "acf_attention_backward: gradient / saved shapes do not match");
  const auto t = xy.scalar_type();
  auto c = [t](const at::Tensor& x) { return x.to(t).contiguous(); };
  auto gu = c(g_user), ga = c(g_alpha), gbt = c(g_beta), xy_c = c(xy), uc_c = c(uc), ut_c = c(ut);
  auto pp_c = c(pp), prof_c = c(prof), w2_c = c(w2), w1_c = c(w1), al = c(alpha), be = c(beta);
  auto slot_c = slot_item.contiguous();
  auto g_xy = at::empty_like(xy_c);
  auto g_uc = at::empty_like(uc_c), g_ut = at::empty_like(ut_c);
  auto g_pp = at::empty_like(pp_c), g_prof = at::empty_like(prof_c);
  auto g_w2 = at::zeros_like(w2_c), g_w1 = at::zeros_like(w1_c);
  auto g_c2 = at::zeros({1}, xy_c.options()), g_c1 = at::zeros({1}, xy_c.options());
  g_uc.zero_();
  AT_DISPATCH_FLOATING_TYPES(t, "acf_attention_backward_cpu", [&] {
    attention_backward_impl<scalar_t>(
        d, gu.const_data_ptr<scalar_t>(), ga.const_data_ptr<scalar_t>(),
        gbt.const_data_ptr<scalar_t>(), xy_c.const_data_ptr<scalar_t>(),
        uc_c.const_data_ptr<scalar_t>(), ut_c.const_data_ptr<scalar_t>(),
        pp_c.const_data_ptr<scalar_t>(), prof_c.const_data_ptr<scalar_t>(),
        slot_c.const_data_ptr<int64_t>(), w2_c.const_data_ptr<scalar_t>(),
        w1_c.const_data_ptr<scalar_t>(), al.const_data_ptr<scalar_t>(),
        be.const_data_ptr<scalar_t>(), g_xy.data_ptr<scalar_t>(), g_uc.data_ptr<scalar_t>(),
        g_ut.data_ptr<scalar_t>(), g_pp.data_ptr<scalar_t>(), g_prof.data_ptr<scalar_t>(),
        g_w2.data_ptr<scalar_t>(), g_c2.data_ptr<scalar_t>(), g_w1.data_ptr<scalar_t>(),
        g_c1.data_ptr<scalar_t>());
  });
  return {g_xy, g_uc, g_ut, g_pp, g_prof, g_w2.view(w2.sizes()), g_c2, g_w1.view(w1.sizes()),
          g_c1};
}

}  // namespace acf_fast

// The schemas are in acf_library.cpp.
TORCH_LIBRARY_IMPL(acf_fast, CPU, m) {
  m.impl("acf_attention", &acf_fast::attention_cpu);
  m.impl("acf_attention_backward", &acf_fast::attention_backward_cpu);
}
