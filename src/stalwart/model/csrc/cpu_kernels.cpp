// stalwart's CPU kernels for fp32 training (`train.cpu_kernels`, model/cpu_kernels.py).
//
// Three things torch's CPU path leaves on the table at GPT-2's shapes:
//
//  * Linear: torch's CPU build calls MKL's sgemm, which on AMD CPUs runs ~15% under OpenBLAS
//    (measured here: 113 vs 130 GFLOP/s a core). The Linears' three products (y = x W^T + b,
//    dx = dy W, dW = dy^T x) go to OpenBLAS (the scipy-openblas32 wheel), one single-threaded
//    call per torch intra-op thread on its own rows, so no second thread pool competes.
//  * Causal attention straight from c_attn's (B, T, 3C) output into c_proj's (B, T, C) input:
//    one (batch, head) at a time on one thread, its q/k/v read in place through the row stride,
//    the T x T scores built 64 rows at a time and only up to the diagonal (62% of the full
//    product at T = 256), softmax while the block is in L1/L2. Like flash attention it keeps
//    only the output and the row log-sum-exp; the backward recomputes the scores.
//  * GPT-2's tanh GELU as x * sigmoid(2z): one pass each way, the exponential a polynomial.
//
// Every result is the same function as torch's to fp32 rounding (tests/test_cpu_kernels.py
// compares each against float64). Each output element is computed by one thread in a fixed
// order, so results do not depend on scheduling: a resumed run stays bit-exact.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

extern "C" {
void scipy_sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                  const int* k, const float* alpha, const float* a, const int* lda,
                  const float* b, const int* ldb, const float* beta, float* c, const int* ldc);
void scipy_openblas_set_num_threads(int);
}

namespace {

// C (m x n, row-major, leading dimension ldc) = alpha op(A) op(B) + beta C, with A and B
// row-major. A row-major matrix is its transpose in BLAS's column-major terms, so this is
// C^T = op(B)^T op(A)^T.
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const char tA = tb ? 'T' : 'N', tB = ta ? 'T' : 'N';
  const int M = n, N = m, K = k, LA = ldb, LB = lda, LC = ldc;
  scipy_sgemm_(&tA, &tB, &M, &N, &K, &alpha, b, &LA, a, &LB, &beta, c, &LC);
}

// exp(x) as 2^n p(r), Cephes' polynomial: within 2 ulp on [-87, 88], clamped outside (the
// callers only need exp of values <= 0, and of -u in the GELU where it saturates anyway).
// Plain arithmetic, so the loops around it vectorise; NaN stays NaN.
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// one contiguous range per intra-op thread
inline int64_t per_thread(int64_t n) {
  const int64_t t = at::get_num_threads();
  return std::max<int64_t>(1, (n + t - 1) / t);
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous(),
              name, ": expected a contiguous float32 CPU tensor");
}

constexpr int64_t BLOCK = 64;  // query rows per block of scores

}  // namespace

// ---- Linear -----------------------------------------------------------------------------

torch::Tensor linear_forward(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> b) {
  check(x, "x");
  check(w, "weight");
  const int64_t K = w.size(1), N = w.size(0), M = x.numel() / K;
  TORCH_CHECK(x.size(-1) == K, "x's last dimension is not the weight's input size");
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = torch::empty(sizes, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  const float* bp = nullptr;
  if (b.has_value()) {
    check(*b, "bias");
    bp = b->data_ptr<float>();
  }
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, per_thread(M), [&](int64_t m0, int64_t m1) {
    if (bp)  // the bias as C's initial value: beta = 1 adds the product in
      for (int64_t i = m0; i < m1; ++i) std::memcpy(yp + i * N, bp, N * sizeof(float));
    gemm(false, true, m1 - m0, N, K, 1.0f, xp + m0 * K, K, wp, K, bp ? 1.0f : 0.0f, yp + m0 * N,
         N);
  });
  return y;
}

std::vector<torch::Tensor> linear_backward(torch::Tensor dy, torch::Tensor x, torch::Tensor w,
                                           bool need_dx, bool need_dw, bool need_db) {
  check(dy, "grad");
  check(x, "x");
  check(w, "weight");
  const int64_t K = w.size(1), N = w.size(0), M = x.numel() / K;
  const float *dyp = dy.data_ptr<float>(), *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  torch::Tensor dx, dw, db;
  if (need_dx) {  // dx = dy W, split by rows
    dx = torch::empty_like(x);
    float* p = dx.data_ptr<float>();
    at::parallel_for(0, M, per_thread(M), [&](int64_t m0, int64_t m1) {
      gemm(false, false, m1 - m0, K, N, 1.0f, dyp + m0 * N, N, wp, K, 0.0f, p + m0 * K, K);
    });
  }
  if (need_dw || need_db) {  // dW = dy^T x and db = sum of dy's rows, split by output rows
    if (need_dw) dw = torch::empty_like(w);
    if (need_db) db = torch::zeros({N}, w.options());
    float* pw = need_dw ? dw.data_ptr<float>() : nullptr;
    float* pb = need_db ? db.data_ptr<float>() : nullptr;
    at::parallel_for(0, N, per_thread(N), [&](int64_t n0, int64_t n1) {
      if (pw) gemm(true, false, n1 - n0, K, M, 1.0f, dyp + n0, N, xp, K, 0.0f, pw + n0 * K, K);
      if (pb) {
        float* acc = pb + n0;
        const int64_t width = n1 - n0;
        for (int64_t i = 0; i < M; ++i) {
          const float* row = dyp + i * N + n0;
#pragma omp simd
          for (int64_t j = 0; j < width; ++j) acc[j] += row[j];
        }
      }
    });
  }
  return {dx, dw, db};
}

// ---- causal attention -------------------------------------------------------------------
// qkv: (B, T, 3C), c_attn's output; q, k, v of head h are the columns [h d, (h+1) d) of the
// three C-wide thirds. Returns y (B, T, C) with head h in the same columns, and the log-sum-exp
// of each row of scores (B, H, T) for the backward.

std::vector<torch::Tensor> attention_forward(torch::Tensor qkv, int64_t n_head) {
  check(qkv, "qkv");
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(2) % (3 * n_head) == 0, "qkv: expected (B, T, 3C)");
  const int64_t B = qkv.size(0), T = qkv.size(1), C3 = qkv.size(2), C = C3 / 3, H = n_head,
                hd = C / H;
  auto y = torch::empty({B, T, C}, qkv.options());
  auto lse = torch::empty({B, H, T}, qkv.options());
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const float* base = qkv.data_ptr<float>();
  float* yb = y.data_ptr<float>();
  float* lb = lse.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(BLOCK * T);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / H, h = job % H;
      const float* q = base + b * T * C3 + h * hd;
      const float *k = q + C, *v = q + 2 * C;
      float* o = yb + b * T * C + h * hd;
      float* l = lb + job * T;
      for (int64_t r0 = 0; r0 < T; r0 += BLOCK) {
        const int64_t r1 = std::min(T, r0 + BLOCK), rows = r1 - r0;  // keys 0 .. r1-1
        gemm(false, true, rows, r1, hd, scale, q + r0 * C3, C3, k, C3, 0.0f, S.data(), r1);
        for (int64_t i = 0; i < rows; ++i) {
          float* s = S.data() + i * r1;
          const int64_t n = r0 + i + 1;  // row r0 + i sees keys 0 .. r0 + i
          float m = s[0];
          for (int64_t j = 1; j < n; ++j) m = s[j] > m ? s[j] : m;
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < n; ++j) {
            const float e = fast_exp(s[j] - m);
            s[j] = e;
            sum += e;
          }
          const float inv = 1.0f / sum;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) s[j] *= inv;
          std::fill(s + n, s + r1, 0.0f);
          l[r0 + i] = m + std::log(sum);
        }
        gemm(false, false, rows, hd, r1, 1.0f, S.data(), r1, v, C3, 0.0f, o + r0 * C, C);
      }
    }
  });
  return {y, lse};
}

torch::Tensor attention_backward(torch::Tensor dy, torch::Tensor qkv, torch::Tensor y,
                                 torch::Tensor lse, int64_t n_head) {
  check(dy, "grad");
  check(qkv, "qkv");
  check(y, "y");
  check(lse, "lse");
  const int64_t B = qkv.size(0), T = qkv.size(1), C3 = qkv.size(2), C = C3 / 3, H = n_head,
                hd = C / H;
  auto dqkv = torch::empty_like(qkv);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const float *base = qkv.data_ptr<float>(), *dyb = dy.data_ptr<float>();
  const float *ob = y.data_ptr<float>(), *lb = lse.data_ptr<float>();
  float* db = dqkv.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> P(BLOCK * T), dP(BLOCK * T), D(T);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / H, h = job % H;
      const float* q = base + b * T * C3 + h * hd;
      const float *k = q + C, *v = q + 2 * C;
      const float *dO = dyb + b * T * C + h * hd, *O = ob + b * T * C + h * hd;
      const float* l = lb + job * T;
      float* dq = db + b * T * C3 + h * hd;
      float *dk = dq + C, *dv = dq + 2 * C;
      for (int64_t t = 0; t < T; ++t) {  // D = rowsum(dO * O): softmax's backward term
        float acc = 0.0f;
        for (int64_t j = 0; j < hd; ++j) acc += dO[t * C + j] * O[t * C + j];
        D[t] = acc;
      }
      // last block first: it reaches every key, so it writes dK and dV whole (beta = 0)
      bool first = true;
      for (int64_t r0 = ((T - 1) / BLOCK) * BLOCK; r0 >= 0; r0 -= BLOCK) {
        const int64_t r1 = std::min(T, r0 + BLOCK), rows = r1 - r0;
        gemm(false, true, rows, r1, hd, scale, q + r0 * C3, C3, k, C3, 0.0f, P.data(), r1);
        for (int64_t i = 0; i < rows; ++i) {  // P = exp(S - lse), recomputed
          float* p = P.data() + i * r1;
          const int64_t n = r0 + i + 1;
          const float li = l[r0 + i];
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) p[j] = fast_exp(p[j] - li);
          std::fill(p + n, p + r1, 0.0f);
        }
        const float beta = first ? 0.0f : 1.0f;
        gemm(true, false, r1, hd, rows, 1.0f, P.data(), r1, dO + r0 * C, C, beta, dv, C3);
        gemm(false, true, rows, r1, hd, 1.0f, dO + r0 * C, C, v, C3, 0.0f, dP.data(), r1);
        for (int64_t i = 0; i < rows; ++i) {  // dS = P (dP - D), times the scores' scale
          float* p = P.data() + i * r1;
          const float* g = dP.data() + i * r1;
          const float Di = D[r0 + i];
          const int64_t n = r0 + i + 1;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) p[j] = p[j] * (g[j] - Di) * scale;
        }
        gemm(false, false, rows, hd, r1, 1.0f, P.data(), r1, k, C3, 0.0f, dq + r0 * C3, C3);
        gemm(true, false, r1, hd, rows, 1.0f, P.data(), r1, q + r0 * C3, C3, beta, dk, C3);
        first = false;
      }
    }
  });
  return dqkv;
}

// ---- GPT-2's GELU -----------------------------------------------------------------------
// 0.5 x (1 + tanh(z)) = x sigmoid(2z), z = sqrt(2/pi) (x + 0.044715 x^3)

namespace {
constexpr float GELU_K = 1.5957691216057308f;  // 2 sqrt(2/pi)
constexpr float GELU_A = 0.044715f;
constexpr int64_t GRAIN = 16384;
}  // namespace

torch::Tensor gelu_forward(torch::Tensor x) {
  check(x, "x");
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, x.numel(), GRAIN, [&](int64_t a, int64_t e) {
#pragma omp simd
    for (int64_t i = a; i < e; ++i) {
      const float v = xp[i];
      const float u = GELU_K * v * (1.0f + GELU_A * v * v);
      yp[i] = v / (1.0f + fast_exp(-u));
    }
  });
  return y;
}

torch::Tensor gelu_backward(torch::Tensor grad, torch::Tensor x) {
  check(grad, "grad");
  check(x, "x");
  auto dx = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *gp = grad.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  at::parallel_for(0, x.numel(), GRAIN, [&](int64_t a, int64_t e) {
#pragma omp simd
    for (int64_t i = a; i < e; ++i) {
      const float v = xp[i], v2 = v * v;
      const float s = 1.0f / (1.0f + fast_exp(-GELU_K * v * (1.0f + GELU_A * v2)));
      dp[i] = gp[i] * (s + v * s * (1.0f - s) * (GELU_K * (1.0f + 3.0f * GELU_A * v2)));
    }
  });
  return dx;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  scipy_openblas_set_num_threads(1);  // one call per torch thread: OpenBLAS starts none
  m.def("linear_forward", &linear_forward);
  m.def("linear_backward", &linear_backward);
  m.def("attention_forward", &attention_forward);
  m.def("attention_backward", &attention_backward);
  m.def("gelu_forward", &gelu_forward);
  m.def("gelu_backward", &gelu_backward);
}
