// Multi-head attention for XLA:CPU, forward and backward, as two FFI custom calls.
//
// XLA runs attention as whole-tensor operations, so the [batch, heads, q, kv] scores and
// weights go through memory about thirteen times per layer in a training step. Here each
// (batch, head) pair is done by one thread, a few query rows at a time, while their
// scores sit in L1; the backward pass recomputes the weights from the saved log-sum-exp,
// as flash attention does.
//
// Layout: q [..., q_len, heads, dim], k and v [..., kv_len, heads, dim] (float32, as the
// projections produce them: no transposes). The forward pass returns out (q's layout) and
// the log-sum-exp [..., heads, q_len]. Leading dimensions are batch dimensions, which
// lets vmap and a batch-sharded mesh add theirs. dim is a multiple of kDimBlock.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One register of floats, in GCC's vector extension: the loops below compile to
// whole-register instructions on any x86 (two halves where there is no AVX-512).
constexpr int64_t kLanes = 16;
typedef float Vec __attribute__((vector_size(4 * kLanes)));
typedef int32_t IntVec __attribute__((vector_size(4 * kLanes)));
constexpr int64_t kDimBlock = 4;  // head dims summed together in contract_keys
constexpr int64_t kRows = 4;      // query rows that share each load of k and v

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }
inline Vec splat(float x) { return Vec{} + x; }
inline Vec add(Vec a, Vec b) { return a + b; }
inline Vec max(Vec a, Vec b) { return a > b ? a : b; }

// Folds the upper half of the lanes onto the lower half four times: shuffles instead of a
// chain of sixteen dependent scalar operations.
template <typename Op>
inline float reduce_lanes(Vec v, Op op) {
  static_assert(kLanes == 16, "the shuffles below are for 16 lanes");
  v = op(v, __builtin_shuffle(v, IntVec{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}));
  v = op(v, __builtin_shuffle(v, IntVec{4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3}));
  v = op(v, __builtin_shuffle(v, IntVec{2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1}));
  v = op(v, __builtin_shuffle(v, IntVec{1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0}));
  return v[0];
}

int64_t padded(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// exp(x) for x <= ~0 to about 1e-7 relative error (Cephes' expf polynomial); below -87 it
// returns exp(-87) instead of underflowing into denormals.
inline Vec exp_vec(Vec x) {
  const Vec lowest = splat(-87.0f), shifter = splat(12582912.0f);  // 1.5 * 2^23 rounds
  x = max(x, lowest);
  const Vec t = x * 1.44269504088896341f + shifter;
  const Vec n = t - shifter;
  const Vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
  Vec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const IntVec two_to_n = ((IntVec)t - 0x4B400000 + 127) << 23;
  return p * (Vec)two_to_n;
}

// out[r][j] = sum_c x[r][c] * m[c][j] for R rows and j < n (n a multiple of kLanes):
// scores from queries, or the weights' gradient from output gradients. Each load of m
// serves R rows, and the R sums are independent chains that hide the FMA's latency.
template <int64_t R>
void combine_rows(const float* x, int64_t x_stride, const float* m, int64_t dim, int64_t n,
                  float* out) {
  for (int64_t j = 0; j < n; j += kLanes) {
    Vec acc[R] = {};
    for (int64_t c = 0; c < dim; ++c) {
      const Vec mc = load(m + c * n + j);
      for (int64_t r = 0; r < R; ++r) acc[r] += splat(x[r * x_stride + c]) * mc;
    }
    for (int64_t r = 0; r < R; ++r) store(out + r * n + j, acc[r]);
  }
}

// out[r][c] = scale[r] * sum_j a[r][j] * m[c][j] for R rows: attention outputs from
// weights, or the queries' gradient from the scores' gradient.
template <int64_t R>
void contract_keys(const float* a, const float* m, int64_t dim, int64_t n, const float* scale,
                   float* out, int64_t out_stride) {
  for (int64_t c0 = 0; c0 < dim; c0 += kDimBlock) {
    Vec acc[R][kDimBlock] = {};
    for (int64_t j = 0; j < n; j += kLanes) {
      Vec mc[kDimBlock];
      for (int64_t c = 0; c < kDimBlock; ++c) mc[c] = load(m + (c0 + c) * n + j);
      for (int64_t r = 0; r < R; ++r) {
        const Vec ar = load(a + r * n + j);
        for (int64_t c = 0; c < kDimBlock; ++c) acc[r][c] += ar * mc[c];
      }
    }
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < kDimBlock; ++c)
        out[r * out_stride + c0 + c] = scale[r] * reduce_lanes(acc[r][c], add);
  }
}

// m[c][j] += sum_r x[r][c] * a[r][j]: the keys' or values' gradient.
template <int64_t R>
void add_outer(const float* x, int64_t x_stride, const float* a, int64_t dim, int64_t n,
               float* m) {
  for (int64_t c = 0; c < dim; ++c) {
    Vec xc[R];
    for (int64_t r = 0; r < R; ++r) xc[r] = splat(x[r * x_stride + c]);
    float* mc = m + c * n;
    for (int64_t j = 0; j < n; j += kLanes) {
      Vec acc = load(mc + j);
      for (int64_t r = 0; r < R; ++r) acc += xc[r] * load(a + r * n + j);
      store(mc + j, acc);
    }
  }
}

float row_max(const float* x, int64_t n) {
  Vec acc = splat(-INFINITY);
  for (int64_t j = 0; j < n; j += kLanes) acc = max(acc, load(x + j));
  return reduce_lanes(acc, max);
}

// x[j] = exp(x[j] - shift) for j < valid and 0 in the padding; returns their sum.
float exponentiate(float* x, float shift, int64_t valid, int64_t n) {
  Vec acc{};
  for (int64_t j = 0; j < n; j += kLanes) {
    const Vec e = exp_vec(load(x + j) - shift);
    store(x + j, e);
    acc += e;
  }
  float sum = reduce_lanes(acc, add);
  for (int64_t j = valid; j < n; ++j) {
    sum -= x[j];
    x[j] = 0.0f;
  }
  return sum;
}

struct Shape {
  int64_t batch, q_len, kv_len, heads, dim;
  float scale;
  int64_t row() const { return heads * dim; }  // the stride between tokens
  int64_t pairs() const { return batch * heads; }
  int64_t q_offset(int64_t pair) const {  // of (batch, head) = divmod(pair, heads)
    return (pair / heads) * q_len * row() + (pair % heads) * dim;
  }
  int64_t kv_offset(int64_t pair) const {
    return (pair / heads) * kv_len * row() + (pair % heads) * dim;
  }
  int64_t lse_offset(int64_t pair) const { return pair * q_len; }
};

// Keys or values of one (batch, head) pair as [dim, n]: the loops over keys then read
// whole registers. The padding (n - kv_len keys) is zero.
void pack_transposed(const float* src, const Shape& s, int64_t n, float* dst) {
  std::fill(dst, dst + s.dim * n, 0.0f);
  for (int64_t j = 0; j < s.kv_len; ++j)
    for (int64_t c = 0; c < s.dim; ++c) dst[c * n + j] = src[j * s.row() + c];
}

void unpack_transposed(const float* src, const Shape& s, int64_t n, float* dst) {
  for (int64_t j = 0; j < s.kv_len; ++j)
    for (int64_t c = 0; c < s.dim; ++c) dst[j * s.row() + c] = src[c * n + j];
}

// A thread's working memory, zeroed for each pair and kept across pairs.
struct Scratch {
  std::vector<float> data;
  float* zeros(int64_t size) {
    data.assign(size, 0.0f);
    return data.data();
  }
};

struct Forward {
  const float *q, *k, *v;
  float *out, *lse;
  Shape s;

  template <int64_t R>
  void rows(int64_t first, int64_t lse_first, const float* k_t, const float* v_t, int64_t n,
            float* w, float* q_scaled) const {
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < s.dim; ++c) q_scaled[r * s.dim + c] = q[first + r * s.row() + c] * s.scale;
    combine_rows<R>(q_scaled, s.dim, k_t, s.dim, n, w);
    float inverse_sum[R];
    for (int64_t r = 0; r < R; ++r) {
      float* wr = w + r * n;
      std::fill(wr + s.kv_len, wr + n, -INFINITY);  // the padding's scores
      const float shift = row_max(wr, n);
      const float sum = exponentiate(wr, shift, s.kv_len, n);
      inverse_sum[r] = 1.0f / sum;
      lse[lse_first + r] = shift + std::log(sum);
    }
    contract_keys<R>(w, v_t, s.dim, n, inverse_sum, out + first, s.row());
  }

  void pair(int64_t p, Scratch& scratch) const {
    const int64_t n = padded(s.kv_len);
    float* k_t = scratch.zeros(2 * s.dim * n + kRows * n + kRows * s.dim);
    float* v_t = k_t + s.dim * n;
    float* w = v_t + s.dim * n;  // [kRows, n]
    float* q_scaled = w + kRows * n;
    pack_transposed(k + s.kv_offset(p), s, n, k_t);
    pack_transposed(v + s.kv_offset(p), s, n, v_t);
    int64_t i = 0;
    for (; i + kRows <= s.q_len; i += kRows)
      rows<kRows>(s.q_offset(p) + i * s.row(), s.lse_offset(p) + i, k_t, v_t, n, w, q_scaled);
    for (; i < s.q_len; ++i)
      rows<1>(s.q_offset(p) + i * s.row(), s.lse_offset(p) + i, k_t, v_t, n, w, q_scaled);
  }
};

struct Backward {
  const float *q, *k, *v, *out, *lse, *grad_out;
  float *grad_q, *grad_k, *grad_v;
  Shape s;

  struct Buffers {
    float *k_t, *v_t, *grad_k_t, *grad_v_t, *w, *grad_scores, *q_scaled;
  };

  template <int64_t R>
  void rows(int64_t first, int64_t lse_first, int64_t n, const Buffers& b) const {
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < s.dim; ++c)
        b.q_scaled[r * s.dim + c] = q[first + r * s.row() + c] * s.scale;
    combine_rows<R>(b.q_scaled, s.dim, b.k_t, s.dim, n, b.w);
    combine_rows<R>(grad_out + first, s.row(), b.v_t, s.dim, n, b.grad_scores);
    float scale[R];
    for (int64_t r = 0; r < R; ++r) {
      float* wr = b.w + r * n;
      float* dsr = b.grad_scores + r * n;
      exponentiate(wr, lse[lse_first + r], s.kv_len, n);
      // The scores' gradient: w * (g . v_j - g . out).
      float g_dot_out = 0.0f;
      const int64_t row = first + r * s.row();
      for (int64_t c = 0; c < s.dim; ++c) g_dot_out += grad_out[row + c] * out[row + c];
      for (int64_t j = 0; j < n; j += kLanes)
        store(dsr + j, load(wr + j) * (load(dsr + j) - g_dot_out));
      scale[r] = s.scale;
    }
    contract_keys<R>(b.grad_scores, b.k_t, s.dim, n, scale, grad_q + first, s.row());
    add_outer<R>(b.q_scaled, s.dim, b.grad_scores, s.dim, n, b.grad_k_t);
    add_outer<R>(grad_out + first, s.row(), b.w, s.dim, n, b.grad_v_t);
  }

  void pair(int64_t p, Scratch& scratch) const {
    const int64_t n = padded(s.kv_len), block = s.dim * n;
    Buffers b;
    b.k_t = scratch.zeros(4 * block + 2 * kRows * n + kRows * s.dim);
    b.v_t = b.k_t + block;
    b.grad_k_t = b.v_t + block;
    b.grad_v_t = b.grad_k_t + block;
    b.w = b.grad_v_t + block;                // [kRows, n]
    b.grad_scores = b.w + kRows * n;         // [kRows, n]
    b.q_scaled = b.grad_scores + kRows * n;  // [kRows, dim]
    pack_transposed(k + s.kv_offset(p), s, n, b.k_t);
    pack_transposed(v + s.kv_offset(p), s, n, b.v_t);
    int64_t i = 0;
    for (; i + kRows <= s.q_len; i += kRows)
      rows<kRows>(s.q_offset(p) + i * s.row(), s.lse_offset(p) + i, n, b);
    for (; i < s.q_len; ++i) rows<1>(s.q_offset(p) + i * s.row(), s.lse_offset(p) + i, n, b);
    unpack_transposed(b.grad_k_t, s, n, grad_k + s.kv_offset(p));
    unpack_transposed(b.grad_v_t, s, n, grad_v + s.kv_offset(p));
  }
};

// Runs job.pair(p) for every (batch, head) pair on this thread and the pool's. Helpers
// take pairs from a shared counter, and this thread waits only for pairs already taken:
// a helper that starts late (or never, on a busy pool) finds nothing left and cannot
// hold it up. The state is shared because a late helper may outlive this call.
template <typename Job>
void for_each_pair(const Job& job, ffi::ThreadPool pool) {
  struct State {
    Job job;
    std::atomic<int64_t> next{0}, done{0};
    explicit State(const Job& j) : job(j) {}
    void work() {
      Scratch scratch;
      for (int64_t p; (p = next.fetch_add(1)) < job.s.pairs();) {
        job.pair(p, scratch);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>(job);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), job.s.pairs() - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state] { state->work(); });
  state->work();
  while (state->done.load(std::memory_order_acquire) < job.s.pairs()) std::this_thread::yield();
}

ffi::Error shape_of(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k, Shape* s) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  const size_t rank = qd.size();
  if (rank < 3 || kd.size() != rank)
    return ffi::Error::InvalidArgument("attention takes [..., length, heads, dim] arrays");
  const int64_t dim = qd[rank - 1];
  if (dim % kDimBlock != 0)
    return ffi::Error::InvalidArgument("attention's head dim must be a multiple of 4");
  int64_t batch = 1;
  for (size_t a = 0; a + 3 < rank; ++a) batch *= qd[a];
  *s = Shape{batch, qd[rank - 3], kd[rank - 3], qd[rank - 2], dim, 1.0f / std::sqrt(float(dim))};
  return ffi::Error::Success();
}

const float* in(const ffi::Buffer<ffi::F32>& b) { return b.typed_data(); }
float* result(ffi::Result<ffi::Buffer<ffi::F32>>& b) { return b->typed_data(); }

ffi::Error forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Result<ffi::Buffer<ffi::F32>> out, ffi::Result<ffi::Buffer<ffi::F32>> lse) {
  Shape s;
  if (ffi::Error error = shape_of(q, k, &s); error.failure()) return error;
  for_each_pair(Forward{in(q), in(k), in(v), result(out), result(lse), s}, pool);
  return ffi::Error::Success();
}

ffi::Error backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> grad_out,
                    ffi::Result<ffi::Buffer<ffi::F32>> grad_q, ffi::Result<ffi::Buffer<ffi::F32>> grad_k,
                    ffi::Result<ffi::Buffer<ffi::F32>> grad_v) {
  Shape s;
  if (ffi::Error error = shape_of(q, k, &s); error.failure()) return error;
  for_each_pair(Backward{in(q), in(k), in(v), in(out), in(lse), in(grad_out), result(grad_q),
                         result(grad_k), result(grad_v), s},
                pool);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(InstaflowAttentionForward, forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // log-sum-exp

XLA_FFI_DEFINE_HANDLER_SYMBOL(InstaflowAttentionBackward, backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // log-sum-exp
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the gradient of out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // of q
                                  .Ret<ffi::Buffer<ffi::F32>>()  // of k
                                  .Ret<ffi::Buffer<ffi::F32>>());  // of v
