// Single-query attention over a left-padded KV cache, for CPU decoding (loaded by cpu.py).
// One task per (row, KV head): one pass over its keys for all query heads of the group, a softmax, one pass over
// its values, both in blocks of one vector's width of columns. Rows see columns start[b] .. col, so no mask tensor is
// read. Accumulation is in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {
using Vec = at::vec::Vectorized<float>;
constexpr int VS = Vec::size();

template <typename T> inline Vec load_vec(const T* p) {
  if constexpr (std::is_same_v<T, float>) return Vec::loadu(p);
  else { Vec o; at::vec::load_to_float<T>(p, o); return o; }
}

// into L2: rows fetched ahead into L1 filled its miss buffers and stalled the loop
template <typename T> inline void prefetch_row(const T* p, int64_t D) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t o = 0; o < D * static_cast<int64_t>(sizeof(T)); o += 64) __builtin_prefetch(c + o, 0, 2);
}

// a row's first visible column: its padding ends there (never past the query's own column)
inline int64_t first_col(const int64_t* start, int64_t b, int64_t col) {
  return std::min<int64_t>(std::max<int64_t>(start[b], 0), col);
}

struct Args {
  int64_t B, Hq, Hkv, D, col;  // col < the cache width (checked by the caller)
  int64_t qsb, qsh, ksb, ksh, kss, vsb, vsh, vss;
  float scale;
};

// softmax of g rows of n scores in place; returns 1 / row sums
inline void softmax_rows(float* sc, int64_t g, int64_t n, float* inv) {
  for (int64_t j = 0; j < g; ++j) {
    float* r = sc + j * n;
    Vec mv(-std::numeric_limits<float>::infinity());
    int64_t s = 0;
    for (; s + VS <= n; s += VS) mv = at::vec::maximum(mv, Vec::loadu(r + s));
    float m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, mv);
    for (; s < n; ++s) m = std::max(m, r[s]);
    Vec vm(m), acc(0.f);
    s = 0;
    for (; s + VS <= n; s += VS) { Vec e = (Vec::loadu(r + s) - vm).exp_u20(); e.store(r + s); acc = acc + e; }
    float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
    for (; s < n; ++s) { r[s] = std::exp(r[s] - m); sum += r[s]; }
    inv[j] = 1.f / sum;
  }
}

// lane i of the result is the sum of the lanes of r[i], for VS vectors r (overwritten): log2(VS) rounds of pairwise
// shuffles, about three instructions per vector instead of a full horizontal reduction each
inline Vec sum_lanes(Vec* r) {
  for (int w = VS; w > 1; w /= 2)
    for (int i = 0; i < w / 2; ++i) {
      const auto eo = at::vec::deinterleave2(r[2 * i], r[2 * i + 1]);
      r[i] = eo.first + eo.second;
    }
  return r[0];
}

// VS rows of ND vectors (row stride st) as float32: the rows themselves for float, else converted into buf;
// sets `out_st` to the stride of the rows returned
template <typename T, int ND>
inline const float* rows_f32(const T* p, int64_t st, float* buf, int64_t& out_st) {
  if constexpr (std::is_same_v<T, float>) { out_st = st; return p; }
  else {
    for (int r = 0; r < VS; ++r)
      for (int c = 0; c < ND; ++c) load_vec(p + r * st + c * VS).store(buf + (r * ND + c) * VS);
    out_st = ND * VS;
    return buf;
  }
}

// vectorised path: the head size is ND vectors
template <typename T, int ND>
void run_vec(const T* q, const T* k, const T* v, const int64_t* start, T* out, const Args& a) {
  const int64_t g = a.Hq / a.Hkv;
  at::parallel_for(0, a.B * a.Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sc(g * (a.col + 1)), inv(g);
    std::vector<Vec> qv(g * ND), acc(g * ND);
    float kbuf[VS * ND * VS];                              // one block of keys or values in float32
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / a.Hkv, h = bh % a.Hkv;
      const int64_t lo = first_col(start, b, a.col), n = a.col - lo + 1;   // visible columns lo .. col
      for (int64_t j = 0; j < g; ++j)
        for (int c = 0; c < ND; ++c) qv[j * ND + c] = load_vec(q + b * a.qsb + (h * g + j) * a.qsh + c * VS) * Vec(a.scale);
      const T* kb = k + b * a.ksb + h * a.ksh + lo * a.kss;
      const T* vb = v + b * a.vsb + h * a.vsh + lo * a.vss;
      int64_t s = 0;
      for (; s + VS <= n; s += VS) {                          // scores, VS keys at a time
        int64_t kst;
        const float* kf = rows_f32<T, ND>(kb + s * a.kss, a.kss, kbuf, kst);
        for (int r = 0; r < VS; ++r) prefetch_row(vb + (s + r) * a.vss, a.D);   // the value pass reads these rows next
        for (int64_t j = 0; j < g; ++j) {
          Vec part[VS];
          for (int r = 0; r < VS; ++r) {
            Vec d = qv[j * ND] * Vec::loadu(kf + r * kst);
            for (int c = 1; c < ND; ++c) d = at::vec::fmadd(qv[j * ND + c], Vec::loadu(kf + r * kst + c * VS), d);
            part[r] = d;
          }
          sum_lanes(part).store(sc.data() + j * n + s);
        }
      }
      for (; s < n; ++s) {                                    // the last keys one at a time
        Vec kr[ND];
        prefetch_row(vb + s * a.vss, a.D);                    // the value pass reads this row next
        for (int c = 0; c < ND; ++c) kr[c] = load_vec(kb + s * a.kss + c * VS);
        for (int64_t j = 0; j < g; ++j) {
          Vec d = qv[j * ND] * kr[0];
          for (int c = 1; c < ND; ++c) d = at::vec::fmadd(qv[j * ND + c], kr[c], d);
          sc[j * n + s] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, d);
        }
      }
      softmax_rows(sc.data(), g, n, inv.data());
      std::fill(acc.begin(), acc.end(), Vec(0.f));
      const int64_t nb = (bh + 1) / a.Hkv, nh = (bh + 1) % a.Hkv;   // the next task's keys
      const int64_t nlo = bh + 1 < end ? first_col(start, nb, a.col) : a.col + 1;
      const T* nk = k + nb * a.ksb + nh * a.ksh + nlo * a.kss;
      s = 0;
      for (; s + VS <= n; s += VS) {                          // weighted values, VS rows at a time
        int64_t vst;
        const float* vf = rows_f32<T, ND>(vb + s * a.vss, a.vss, kbuf, vst);
        for (int r = 0; r < VS; ++r) if (nlo + s + r <= a.col) prefetch_row(nk + (s + r) * a.kss, a.D);
        for (int64_t j = 0; j < g; ++j) {                     // one head's accumulator stays in registers
          Vec o[ND];
          for (int c = 0; c < ND; ++c) o[c] = acc[j * ND + c];
          for (int r = 0; r < VS; ++r) {
            const Vec p(sc[j * n + s + r]);
            for (int c = 0; c < ND; ++c) o[c] = at::vec::fmadd(p, Vec::loadu(vf + r * vst + c * VS), o[c]);
          }
          for (int c = 0; c < ND; ++c) acc[j * ND + c] = o[c];
        }
      }
      for (; s < n; ++s) {                                    // the last values one at a time
        Vec vr[ND];
        if (nlo + s <= a.col) prefetch_row(nk + s * a.kss, a.D);
        for (int c = 0; c < ND; ++c) vr[c] = load_vec(vb + s * a.vss + c * VS);
        for (int64_t j = 0; j < g; ++j) {
          const Vec p(sc[j * n + s]);
          for (int c = 0; c < ND; ++c) acc[j * ND + c] = at::vec::fmadd(p, vr[c], acc[j * ND + c]);
        }
      }
      for (int64_t j = 0; j < g; ++j) {
        T* o = out + (b * a.Hq + h * g + j) * a.D;
        float buf[ND * VS];
        for (int c = 0; c < ND; ++c) (acc[j * ND + c] * Vec(inv[j])).store(buf + c * VS);
        for (int64_t d = 0; d < a.D; ++d) o[d] = static_cast<T>(buf[d]);
      }
    }
  });
}

// any head size
template <typename T>
void run_scalar(const T* q, const T* k, const T* v, const int64_t* start, T* out, const Args& a) {
  const int64_t g = a.Hq / a.Hkv;
  at::parallel_for(0, a.B * a.Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sc(g * (a.col + 1)), inv(g), acc(g * a.D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / a.Hkv, h = bh % a.Hkv;
      const int64_t lo = first_col(start, b, a.col), n = a.col - lo + 1;   // visible columns lo .. col
      for (int64_t j = 0; j < g; ++j) {
        const T* qr = q + b * a.qsb + (h * g + j) * a.qsh;
        for (int64_t s = 0; s < n; ++s) {
          const T* kr = k + b * a.ksb + h * a.ksh + (lo + s) * a.kss;
          float d = 0.f;
          for (int64_t e = 0; e < a.D; ++e) d += static_cast<float>(qr[e]) * static_cast<float>(kr[e]);
          sc[j * n + s] = d * a.scale;
        }
      }
      softmax_rows(sc.data(), g, n, inv.data());
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t s = 0; s < n; ++s) {
        const T* vr = v + b * a.vsb + h * a.vsh + (lo + s) * a.vss;
        for (int64_t j = 0; j < g; ++j)
          for (int64_t e = 0; e < a.D; ++e) acc[j * a.D + e] += sc[j * n + s] * static_cast<float>(vr[e]);
      }
      for (int64_t j = 0; j < g; ++j) {
        T* o = out + (b * a.Hq + h * g + j) * a.D;
        for (int64_t e = 0; e < a.D; ++e) o[e] = static_cast<T>(acc[j * a.D + e] * inv[j]);
      }
    }
  });
}

template <typename T>
void dispatch(const T* q, const T* k, const T* v, const int64_t* st, T* o, const Args& a, bool vec) {
  if (vec && a.D % VS == 0) {
    switch (a.D / VS) {
      case 1: return run_vec<T, 1>(q, k, v, st, o, a);
      case 2: return run_vec<T, 2>(q, k, v, st, o, a);
      case 4: return run_vec<T, 4>(q, k, v, st, o, a);
      case 8: return run_vec<T, 8>(q, k, v, st, o, a);
      case 16: return run_vec<T, 16>(q, k, v, st, o, a);
    }
  }
  run_scalar<T>(q, k, v, st, o, a);
}
}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& start, const at::Tensor& col, bool vectorized) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "decode_attention runs on CPU tensors");
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "q must be (B, Hq, 1, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(), "k and v must both be (B, Hkv, S, D), got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "the head dimension must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k and v must share a dtype");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1), W = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && Hkv > 0 && Hq % Hkv == 0, "q ", q.sizes(), " and k ", k.sizes(), " do not fit");
  TORCH_CHECK(start.dim() == 1 && start.size(0) == B, "start must be (B,)");
  auto st = start.to(at::kLong).contiguous();
  const int64_t c = col.item<int64_t>();
  TORCH_CHECK(c >= 0 && c < W, "column ", c, " is outside the cache width ", W);
  auto out = at::empty({B, Hq, 1, D}, q.options());
  Args a{B, Hq, Hkv, D, c, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
         v.stride(0), v.stride(1), v.stride(2), static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)))};
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "decode_attention supports float32, bfloat16 and float16, got ", dt);
  AT_DISPATCH_SWITCH(dt, "decode_attention",
    AT_DISPATCH_CASE(at::kFloat, [&] { dispatch<scalar_t>(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), st.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), a, vectorized); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] { dispatch<scalar_t>(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), st.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), a, vectorized); })
    AT_DISPATCH_CASE(at::kHalf, [&] { dispatch<scalar_t>(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), st.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), a, vectorized); }));
  return out;
}

TORCH_LIBRARY(phi4_kernels_cpu, m) {
  // flexible layout: the compiler may pass the cache views as they are (any strides with a contiguous head dim)
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor start, Tensor col, bool vectorized=True) -> Tensor",
        {at::Tag::flexible_layout});
}
TORCH_LIBRARY_IMPL(phi4_kernels_cpu, CPU, m) { m.impl("decode_attention", &decode_attention); }
