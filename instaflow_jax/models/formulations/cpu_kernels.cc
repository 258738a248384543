// Kernels for XLA:CPU as FFI custom calls: multi-head attention (forward and backward) and
// GroupNorm's forward pass with its SiLU.
//
// Attention. XLA runs attention as whole-tensor operations, so the [batch, heads, q, kv]
// scores and weights go through memory about thirteen times per layer in a training step.
// Here each (batch, head) pair is done by one thread, a few query rows at a time, while
// their scores sit in L1; the backward pass recomputes the weights from the saved
// log-sum-exp, as flash attention does.
//
// Layout: q [..., q_len, heads, dim], k and v [..., kv_len, heads, dim] (float32, as the
// projections produce them: no transposes). The forward pass returns out (q's layout) and
// the log-sum-exp [..., heads, q_len]. Leading dimensions are batch dimensions (vmap adds
// its own there). dim is a multiple of kDimBlock.
//
// GroupNorm. XLA makes five single-threaded passes over the activations (bias, mean,
// centred squares, normalise, SiLU); here three passes (mean, variance, normalise with the
// SiLU), each split over pixel blocks on both cores. x is [batch, ..., channels] with
// channels a multiple of kLanes.
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
using Buffer = ffi::Buffer<ffi::F32>;
using ResultBuffer = ffi::ResultBuffer<ffi::F32>;

namespace {

// One register of floats, in GCC's vector extension: the loops below compile to
// whole-register instructions on any x86 (two halves where there is no AVX-512).
constexpr int64_t kLanes = 16;
typedef float Vec __attribute__((vector_size(4 * kLanes)));
typedef int32_t IntVec __attribute__((vector_size(4 * kLanes)));
constexpr int64_t kDimBlock = 4;  // head dims summed together in contract_keys
constexpr int64_t kRows = 4;      // query rows that share each load of k and v
constexpr int64_t kTile = 16;     // query rows whose gradients go into dk, dv in one pass

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }
inline Vec splat(float x) { return Vec{} + x; }
inline Vec add(Vec a, Vec b) { return a + b; }
inline Vec max(Vec a, Vec b) { return (a > b) | (a != a) ? a : b; }  // NaN wins

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

// The sums of 16 registers at once, lane i holding register i's: four rounds that each
// add the two halves of every group of lanes, two registers at a time (45 operations
// where 16 separate reductions take 128).
inline Vec sum_each(const Vec (&v)[kLanes]) {
  Vec w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)
    w[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1],
                             IntVec{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}) +
           __builtin_shuffle(v[2 * i], v[2 * i + 1],
                             IntVec{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  for (int i = 0; i < 4; ++i)
    x[i] = __builtin_shuffle(w[2 * i], w[2 * i + 1],
                             IntVec{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27}) +
           __builtin_shuffle(w[2 * i], w[2 * i + 1],
                             IntVec{4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31});
  for (int i = 0; i < 2; ++i)
    y[i] = __builtin_shuffle(x[2 * i], x[2 * i + 1],
                             IntVec{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29}) +
           __builtin_shuffle(x[2 * i], x[2 * i + 1],
                             IntVec{2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31});
  return __builtin_shuffle(y[0], y[1],
                           IntVec{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}) +
         __builtin_shuffle(y[0], y[1],
                           IntVec{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31});
}

int64_t padded(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// exp(x) for x <= ~0 to about 1e-7 relative error (Cephes' expf polynomial); below -87 it
// returns exp(-87) instead of underflowing into denormals. NaN stays NaN.
inline Vec exp_vec(Vec x) {
  const Vec lowest = splat(-87.0f), shifter = splat(12582912.0f);  // 1.5 * 2^23 rounds
  x = x < lowest ? lowest : x;
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

// out[r][j] = sum_c x[r][c] * m[c][j] for R rows and V registers of keys from j: R * V
// independent sums, each load of m serving R rows.
template <int64_t R, int64_t V>
inline void combine_block(const float* x, int64_t x_stride, const float* m, int64_t dim,
                          int64_t n, int64_t j, float* out) {
  Vec acc[R][V] = {};
  for (int64_t c = 0; c < dim; ++c) {
    Vec mc[V];
    for (int64_t u = 0; u < V; ++u) mc[u] = load(m + c * n + j + u * kLanes);
    for (int64_t r = 0; r < R; ++r) {
      const Vec xr = splat(x[r * x_stride + c]);
      for (int64_t u = 0; u < V; ++u) acc[r][u] += xr * mc[u];
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t u = 0; u < V; ++u) store(out + r * n + j + u * kLanes, acc[r][u]);
}

// out[r][j] = sum_c x[r][c] * m[c][j] for R rows and j < n (n a multiple of kLanes):
// scores from queries, or the weights' gradient from output gradients. Twelve sums at a
// time where the keys allow: a multiply-add's latency is about twelve times its
// throughput here.
template <int64_t R>
void combine_rows(const float* x, int64_t x_stride, const float* m, int64_t dim, int64_t n,
                  float* out) {
  constexpr int64_t kWide = 12 / R;
  int64_t j = 0;
  for (; j + kWide * kLanes <= n; j += kWide * kLanes)
    combine_block<R, kWide>(x, x_stride, m, dim, n, j, out);
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) combine_block<R, 2>(x, x_stride, m, dim, n, j, out);
  for (; j < n; j += kLanes) combine_block<R, 1>(x, x_stride, m, dim, n, j, out);
}

// out[r][c] = scale[r] * sum_j a[r][j] * m[c][j] for R rows: attention outputs from
// weights, or the queries' gradient from the scores' gradient.
template <int64_t R>
void contract_keys(const float* a, const float* m, int64_t dim, int64_t n, const float* scale,
                   float* out, int64_t out_stride) {
  for (int64_t c0 = 0; c0 < dim; c0 += kDimBlock) {
    Vec acc[R * kDimBlock] = {};  // [r][c]
    for (int64_t j = 0; j < n; j += kLanes) {
      Vec mc[kDimBlock];
      for (int64_t c = 0; c < kDimBlock; ++c) mc[c] = load(m + (c0 + c) * n + j);
      for (int64_t r = 0; r < R; ++r) {
        const Vec ar = load(a + r * n + j);
        for (int64_t c = 0; c < kDimBlock; ++c) acc[r * kDimBlock + c] += ar * mc[c];
      }
    }
    float sums[R * kDimBlock];
    if constexpr (R * kDimBlock == kLanes) {
      store(sums, sum_each(acc));
    } else {
      for (int64_t i = 0; i < R * kDimBlock; ++i) sums[i] = reduce_lanes(acc[i], add);
    }
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < kDimBlock; ++c)
        out[r * out_stride + c0 + c] = scale[r] * sums[r * kDimBlock + c];
  }
}

// m[c][j] += sum_r x[r][c] * a[r][j]: the keys' or values' gradient, R rows at a time
// so that m (up to dim x kv_len, more than L1 holds) is read and written once per R rows.
template <int64_t R>
void add_outer(const float* x, int64_t x_stride, const float* a, int64_t dim, int64_t n,
               float* m) {
  for (int64_t c = 0; c < dim; ++c) {
    Vec xc[R];
    for (int64_t r = 0; r < R; ++r) xc[r] = splat(x[r * x_stride + c]);
    float* mc = m + c * n;
    for (int64_t j = 0; j < n; j += kLanes) {
      Vec even = load(mc + j), odd{};  // two chains, half as long
      for (int64_t r = 0; r + 1 < R; r += 2) {
        even += xc[r] * load(a + r * n + j);
        odd += xc[r + 1] * load(a + (r + 1) * n + j);
      }
      if (R % 2) even += xc[R - 1] * load(a + (R - 1) * n + j);
      store(mc + j, even + odd);
    }
  }
}

// The largest of x[0..n), NaN if any is NaN.
float row_max(const float* x, int64_t n) {
  Vec acc[4];  // four chains
  std::fill(acc, acc + 4, splat(-INFINITY));
  for (int64_t j = 0, i = 0; j < n; j += kLanes, i = (i + 1) % 4) acc[i] = max(acc[i], load(x + j));
  return reduce_lanes(max(max(acc[0], acc[1]), max(acc[2], acc[3])), max);
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
// whole registers. The padding (n - kv_len keys) is zero. kLanes keys at a time, so that
// both the rows read and the runs written stay in L1.
void pack_transposed(const float* src, const Shape& s, int64_t n, float* dst) {
  std::fill(dst, dst + s.dim * n, 0.0f);
  for (int64_t j0 = 0; j0 < s.kv_len; j0 += kLanes) {
    const int64_t keys = std::min(kLanes, s.kv_len - j0);
    for (int64_t c = 0; c < s.dim; ++c)
      for (int64_t j = j0; j < j0 + keys; ++j) dst[c * n + j] = src[j * s.row() + c];
  }
}

void unpack_transposed(const float* src, const Shape& s, int64_t n, float* dst) {
  for (int64_t j0 = 0; j0 < s.kv_len; j0 += kLanes) {
    const int64_t keys = std::min(kLanes, s.kv_len - j0);
    for (int64_t j = j0; j < j0 + keys; ++j)
      for (int64_t c = 0; c < s.dim; ++c) dst[j * s.row() + c] = src[c * n + j];
  }
}

// `rows` query rows times the softmax scale, packed [rows, dim].
void scaled_rows(const float* q, int64_t rows, const Shape& s, float* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < s.dim; ++c) out[r * s.dim + c] = q[r * s.row() + c] * s.scale;
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
    scaled_rows(q + first, R, s, q_scaled);
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
    float *k_t, *v_t, *grad_k_t, *grad_v_t;
    float *w, *grad_scores, *q_scaled;  // [kTile, n], [kTile, n], [kTile, dim]
  };

  // Rows first .. first + R - 1, at row t of the tile's buffers: their weights, the
  // scores' gradient and the queries' gradient.
  template <int64_t R>
  void rows(int64_t first, int64_t lse_first, int64_t t, int64_t n, const Buffers& b) const {
    float* q_scaled = b.q_scaled + t * s.dim;
    float* w = b.w + t * n;
    float* grad_scores = b.grad_scores + t * n;
    scaled_rows(q + first, R, s, q_scaled);
    combine_rows<R>(q_scaled, s.dim, b.k_t, s.dim, n, w);
    combine_rows<R>(grad_out + first, s.row(), b.v_t, s.dim, n, grad_scores);
    float scale[R];
    for (int64_t r = 0; r < R; ++r) {
      float* wr = w + r * n;
      float* dsr = grad_scores + r * n;
      exponentiate(wr, lse[lse_first + r], s.kv_len, n);
      // The scores' gradient: w * (g . v_j - g . out).
      float g_dot_out = 0.0f;
      const int64_t row = first + r * s.row();
      for (int64_t c = 0; c < s.dim; ++c) g_dot_out += grad_out[row + c] * out[row + c];
      for (int64_t j = 0; j < n; j += kLanes)
        store(dsr + j, load(wr + j) * (load(dsr + j) - g_dot_out));
      scale[r] = s.scale;
    }
    contract_keys<R>(grad_scores, b.k_t, s.dim, n, scale, grad_q + first, s.row());
  }

  // `count` <= kTile rows from `first`, then their share of dk and dv.
  void tile(int64_t first, int64_t lse_first, int64_t count, int64_t n, const Buffers& b) const {
    int64_t t = 0;
    for (; t + kRows <= count; t += kRows)
      rows<kRows>(first + t * s.row(), lse_first + t, t, n, b);
    for (; t < count; ++t) rows<1>(first + t * s.row(), lse_first + t, t, n, b);
    if (count == kTile) {
      add_outer<kTile>(b.q_scaled, s.dim, b.grad_scores, s.dim, n, b.grad_k_t);
      add_outer<kTile>(grad_out + first, s.row(), b.w, s.dim, n, b.grad_v_t);
      return;
    }
    for (t = 0; t < count; ++t) {
      add_outer<1>(b.q_scaled + t * s.dim, s.dim, b.grad_scores + t * n, s.dim, n, b.grad_k_t);
      add_outer<1>(grad_out + first + t * s.row(), s.row(), b.w + t * n, s.dim, n, b.grad_v_t);
    }
  }

  void pair(int64_t p, Scratch& scratch) const {
    const int64_t n = padded(s.kv_len), block = s.dim * n;
    Buffers b;
    b.k_t = scratch.zeros(4 * block + 2 * kTile * n + kTile * s.dim);
    b.v_t = b.k_t + block;
    b.grad_k_t = b.v_t + block;
    b.grad_v_t = b.grad_k_t + block;
    b.w = b.grad_v_t + block;
    b.grad_scores = b.w + kTile * n;
    b.q_scaled = b.grad_scores + kTile * n;
    pack_transposed(k + s.kv_offset(p), s, n, b.k_t);
    pack_transposed(v + s.kv_offset(p), s, n, b.v_t);
    for (int64_t i = 0; i < s.q_len; i += kTile)
      tile(s.q_offset(p) + i * s.row(), s.lse_offset(p) + i, std::min(kTile, s.q_len - i), n, b);
    unpack_transposed(b.grad_k_t, s, n, grad_k + s.kv_offset(p));
    unpack_transposed(b.grad_v_t, s, n, grad_v + s.kv_offset(p));
  }
};

// Runs task(i) for every i in [0, count) on this thread and the pool's, each thread with
// the task object make_task() gives it (its own scratch memory). Helpers take indices from
// a shared counter, and this thread waits only for indices already taken: a helper that
// starts late (or never, on a busy pool) finds nothing left and cannot hold it up. The
// state is shared because a late helper may outlive this call.
template <typename MakeTask>
void parallel_for(int64_t count, ffi::ThreadPool pool, const MakeTask& make_task) {
  struct State {
    MakeTask make_task;
    int64_t count;
    std::atomic<int64_t> next{0}, done{0};
    State(const MakeTask& m, int64_t c) : make_task(m), count(c) {}
    void work() {
      auto task = make_task();
      for (int64_t i; (i = next.fetch_add(1)) < count;) {
        task(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>(make_task, count);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state] { state->work(); });
  state->work();
  while (state->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

// Runs job.pair(p, scratch) for every (batch, head) pair.
template <typename Job>
void for_each_pair(const Job& job, ffi::ThreadPool pool) {
  parallel_for(job.s.pairs(), pool, [job] {
    return [job, scratch = Scratch()](int64_t p) mutable { job.pair(p, scratch); };
  });
}

ffi::Error shape_of(const Buffer& q, const Buffer& k, Shape* s) {
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

const float* in(const Buffer& b) { return b.typed_data(); }
float* result(ResultBuffer& b) { return b->typed_data(); }

ffi::Error forward(ffi::ThreadPool pool, Buffer q, Buffer k, Buffer v, ResultBuffer out,
                   ResultBuffer lse) {
  Shape s;
  if (ffi::Error error = shape_of(q, k, &s); error.failure()) return error;
  for_each_pair(Forward{in(q), in(k), in(v), result(out), result(lse), s}, pool);
  return ffi::Error::Success();
}

ffi::Error backward(ffi::ThreadPool pool, Buffer q, Buffer k, Buffer v, Buffer out,
                    Buffer lse, Buffer grad_out, ResultBuffer grad_q, ResultBuffer grad_k,
                    ResultBuffer grad_v) {
  Shape s;
  if (ffi::Error error = shape_of(q, k, &s); error.failure()) return error;
  for_each_pair(Backward{in(q), in(k), in(v), in(out), in(lse), in(grad_out), result(grad_q),
                         result(grad_k), result(grad_v), s},
                pool);
  return ffi::Error::Success();
}

// ---- GroupNorm ---------------------------------------------------------------------------

inline Vec silu(Vec x) {
  const Vec e = exp_vec(x > 0 ? -x : x);  // exp(-|x|) <= 1: exp_vec's range, no overflow
  const Vec one = splat(1.0f);
  return x * ((x > 0 ? one : e) / (one + e));
}

constexpr int64_t kBlockPixels = 256;  // pixels per task
constexpr int64_t kSumPixels = 32;     // summed in float, then added into doubles

// out[c] = sum over pixels [begin, end) of f(x[p, c], c), per channel.
template <typename F>
void channel_sums(const float* x, int64_t channels, int64_t begin, int64_t end, F f,
                  double* out) {
  std::vector<float> partial(channels);
  std::fill(out, out + channels, 0.0);
  for (int64_t p0 = begin; p0 < end; p0 += kSumPixels) {
    std::fill(partial.begin(), partial.end(), 0.0f);
    for (int64_t p = p0; p < std::min(end, p0 + kSumPixels); ++p)
      for (int64_t c = 0; c < channels; c += kLanes)
        store(&partial[c], load(&partial[c]) + f(load(x + p * channels + c), c));
    for (int64_t c = 0; c < channels; ++c) out[c] += partial[c];
  }
}

struct GroupNormShape {
  int64_t batch, pixels, channels, groups, blocks;
  int64_t tasks() const { return batch * blocks; }
  int64_t per_group() const { return channels / groups; }
};

struct GroupNormJob {
  const float *x, *scale, *bias;
  float* y;
  GroupNormShape s;
  float epsilon;
  bool with_silu;
  std::vector<double> sums;          // per task and channel
  std::vector<float> mean, factor;   // per image and channel: the group's mean, inv_std * scale

  const float* image(int64_t task) const { return x + task / s.blocks * s.pixels * s.channels; }
  int64_t first_pixel(int64_t task) const { return task % s.blocks * kBlockPixels; }
  int64_t end_pixel(int64_t task) const {
    return std::min(s.pixels, first_pixel(task) + kBlockPixels);
  }

  // Each channel of image b gets finish(the mean over its group of the per-channel sums).
  template <typename Finish>
  void group_values(int64_t b, Finish finish, float* into) const {
    const int64_t per_group = s.per_group();
    for (int64_t g = 0; g < s.groups; ++g) {
      double total = 0;
      for (int64_t t = b * s.blocks; t < (b + 1) * s.blocks; ++t)
        for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c)
          total += sums[t * s.channels + c];
      const float value = finish(float(total / double(s.pixels * per_group)));
      std::fill(into + g * per_group, into + (g + 1) * per_group, value);
    }
  }

  template <typename F>
  void sum_blocks(ffi::ThreadPool pool, F per_image_f) {
    parallel_for(s.tasks(), pool, [this, per_image_f] {
      return [this, per_image_f](int64_t t) {
        channel_sums(image(t), s.channels, first_pixel(t), end_pixel(t),
                     per_image_f(t / s.blocks), &sums[t * s.channels]);
      };
    });
  }

  void run(ffi::ThreadPool pool) {
    const int64_t c_all = s.batch * s.channels;
    sums.resize(s.tasks() * s.channels);
    mean.resize(c_all);
    factor.resize(c_all);
    sum_blocks(pool, [](int64_t) { return [](Vec v, int64_t) { return v; }; });
    for (int64_t b = 0; b < s.batch; ++b)
      group_values(b, [](float m) { return m; }, &mean[b * s.channels]);
    // Two passes, as torch: the variance of the centred values, not E[x^2] - E[x]^2.
    sum_blocks(pool, [this](int64_t b) {
      const float* m = &mean[b * s.channels];
      return [m](Vec v, int64_t c) { const Vec d = v - load(m + c); return d * d; };
    });
    for (int64_t b = 0; b < s.batch; ++b) {
      float* f = &factor[b * s.channels];
      group_values(b, [this](float var) { return 1.0f / std::sqrt(var + epsilon); }, f);
      for (int64_t c = 0; c < s.channels; ++c) f[c] *= scale[c];
    }
    parallel_for(s.tasks(), pool, [this] {
      return [this](int64_t t) { normalise(t); };
    });
  }

  void normalise(int64_t t) const {
    const int64_t b = t / s.blocks;
    const float *m = &mean[b * s.channels], *f = &factor[b * s.channels];
    for (int64_t p = first_pixel(t); p < end_pixel(t); ++p) {
      const int64_t at = (b * s.pixels + p) * s.channels;
      for (int64_t c = 0; c < s.channels; c += kLanes) {
        const Vec v = (load(x + at + c) - load(m + c)) * load(f + c) + load(bias + c);
        store(y + at + c, with_silu ? silu(v) : v);
      }
    }
  }
};

ffi::Error group_norm(ffi::ThreadPool pool, Buffer x, Buffer scale, Buffer bias, ResultBuffer y,
                      int64_t groups, float epsilon, bool with_silu) {
  const auto d = x.dimensions();
  if (d.size() < 2) return ffi::Error::InvalidArgument("group norm takes [batch, ..., channels]");
  const int64_t channels = d[d.size() - 1];
  if (channels % kLanes || groups <= 0 || channels % groups)
    return ffi::Error::InvalidArgument("group norm's channels must be a multiple of 16 and of the groups");
  int64_t pixels = 1;
  for (size_t a = 1; a + 1 < d.size(); ++a) pixels *= d[a];
  const GroupNormShape s{d[0], pixels, channels, groups, (pixels + kBlockPixels - 1) / kBlockPixels};
  GroupNormJob{in(x), in(scale), in(bias), result(y), s, epsilon, with_silu}.run(pool);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(InstaflowAttentionForward, forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Buffer>()  // q
                                  .Arg<Buffer>()  // k
                                  .Arg<Buffer>()  // v
                                  .Ret<Buffer>()  // out
                                  .Ret<Buffer>());  // log-sum-exp

XLA_FFI_DEFINE_HANDLER_SYMBOL(InstaflowAttentionBackward, backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Buffer>()  // q
                                  .Arg<Buffer>()  // k
                                  .Arg<Buffer>()  // v
                                  .Arg<Buffer>()  // out
                                  .Arg<Buffer>()  // log-sum-exp
                                  .Arg<Buffer>()  // the gradient of out
                                  .Ret<Buffer>()  // of q
                                  .Ret<Buffer>()  // of k
                                  .Ret<Buffer>());  // of v

XLA_FFI_DEFINE_HANDLER_SYMBOL(InstaflowGroupNorm, group_norm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Buffer>()  // x
                                  .Arg<Buffer>()  // scale
                                  .Arg<Buffer>()  // bias
                                  .Ret<Buffer>()  // y
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("epsilon")
                                  .Attr<bool>("with_silu"));
