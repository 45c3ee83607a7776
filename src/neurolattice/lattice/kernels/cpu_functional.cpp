// Fused functional-tier aggregation on the CPU (docs/lattice.md, "How the fast path works").
//
//   hagg_i = sum_j softmax_j(s_ij) h_ij,   h_ij = gelu(P_{i+o_j} + Q_i),   s_ij = v . h_ij + bias_{i+o_j}
//
// One pass per run of cells along z: the offsets are walked with the running max m, the
// denominator d and the weighted sum acc of the run kept in small stack buffers (L1), so no
// [N, H] temporary exists per offset. Work items are (batch, x-plane) pairs, handed out to
// threads by an atomic counter. The backward recomputes h from P, Q, v and the saved m and d;
// its scatter into dP touches planes x - px .. x + px only, so the items run in 2 px + 1
// phases of planes that far apart and never write the same cell at once.
//
// No torch headers: plain C++17, built by neurolattice/lattice/kernels/cpu_functional.py with
// the system compiler and loaded through ctypes. float32 runs gelu, exp and dot products on
// GCC/clang vector types (W lanes); float64 uses libm's erf and exp, so it matches the torch
// path to rounding.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <thread>
#include <vector>

namespace {

constexpr int kMaxRun = 16;  // most cells per run: a run's acc, h and gelu' stay in L1 for H <= 128

// float32 math on GCC/clang vector extensions, W lanes (one AVX-512 or AVX2 register), so it
// vectorises whatever the compiler's loop analysis makes of the bit tricks.
#ifdef __AVX512F__
constexpr int W = 16;
#else
constexpr int W = 8;
#endif
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));

// exp(x) for x <= 0: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, and the Taylor
// polynomial of degree 7 (relative error < 1e-8); below -87 it returns ~1e-38.
inline vf exp_nonpositive(vf x) {
    x = x < -87.0f ? vf{} - 87.0f : x;
    const vi ni = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi);  // round(x / ln2), x <= 0
    const vf n = __builtin_convertvector(ni, vf);
    const vf r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    vf p = vf{} + 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * (vf)((ni + 127) << 23);
}

// gelu(u) = u Phi(u) and gelu'(u) = Phi(u) + u phi(u), with Phi(-|u|) = erfc(|u| / sqrt 2) / 2 by
// Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), evaluated on |u| so the negative side has
// no cancellation, and the density from the same exp.
inline void gelu_grad(vf u, vf& h, vf& dh) {
    const vf x = (vf)((vi)u & 0x7fffffff) * 0.70710678118654752f;
    const vf t = 1.0f / (1.0f + 0.3275911f * x);
    const vf poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f
                    + t * (-1.453152027f + t * 1.061405429f))));
    const vf e = exp_nonpositive(-x * x);                    // exp(-u^2 / 2)
    const vf tail = 0.5f * poly * e;                         // Phi(-|u|)
    const vf cdf = u >= 0.0f ? 1.0f - tail : tail;           // Phi(u)
    h = u * cdf;
    dh = cdf + u * e * 0.39894228040143268f;
}

template <typename T> struct Math;

// float: W lanes at a time; the partial vector at the end goes through a zero-padded copy.
template <> struct Math<float> {
    template <bool grad> static inline void gelu_run(const float* p, const float* q, int len, float* h, float* dh) {
        int e = 0;
        for (; e + W <= len; e += W) {      // whole vectors: constant-size copies are plain loads
            vf a, b, hv, dv;
            __builtin_memcpy(&a, p + e, sizeof a);
            __builtin_memcpy(&b, q + e, sizeof b);
            gelu_grad(a + b, hv, dv);
            __builtin_memcpy(h + e, &hv, sizeof hv);
            if (grad) __builtin_memcpy(dh + e, &dv, sizeof dv);
        }
        if (e < len) {
            const int k = len - e;
            vf a{}, b{}, hv, dv;
            __builtin_memcpy(&a, p + e, 4 * k);
            __builtin_memcpy(&b, q + e, 4 * k);
            gelu_grad(a + b, hv, dv);
            __builtin_memcpy(h + e, &hv, 4 * k);
            if (grad) __builtin_memcpy(dh + e, &dv, 4 * k);
        }
    }
    static inline float exp(float x) { return std::exp(x); }
};

// float64: exactly the erf form torch uses.
template <> struct Math<double> {
    template <bool grad> static inline void gelu_run(const double* p, const double* q, int len, double* h, double* dh) {
        for (int e = 0; e < len; ++e) {
            const double u = p[e] + q[e], cdf = 0.5 * (1.0 + std::erf(u * 0.70710678118654752));
            h[e] = u * cdf;
            if (grad) dh[e] = cdf + u * std::exp(-0.5 * u * u) * 0.39894228040143268;
        }
    }
    static inline double exp(double x) { return std::exp(x); }
};

// The lattice block one call works on: B x X x Y x Z cells, P padded by (px, py, pz).
struct Shape {
    int B, X, Y, Z, px, py, pz, H;
    int64_t padded(int b, int x, int y, int z) const {   // index of a cell of the padded lattice
        return ((static_cast<int64_t>(b) * (X + 2 * px) + x + px) * (Y + 2 * py) + y + py) * (Z + 2 * pz) + z + pz;
    }
    int64_t bias_index(int x, int y, int z) const { return padded(0, x, y, z); }
    int64_t cell(int b, int x, int y, int z) const {
        return ((static_cast<int64_t>(b) * X + x) * Y + y) * Z + z;
    }
};

// Run fn(item) for every item in [0, count) on `threads` threads (the caller's among them).
template <typename Fn> void parallel_items(int64_t count, int threads, Fn fn) {
    std::atomic<int64_t> next{0};
    auto worker = [&]() {
        for (int64_t item = next++; item < count; item = next++) fn(item);
    };
    const int extra = static_cast<int>(std::min<int64_t>(threads, count)) - 1;
    std::vector<std::thread> pool;
    for (int t = 0; t < extra; ++t) pool.emplace_back(worker);
    worker();
    for (auto& th : pool) th.join();
}

template <typename T> inline T dot(const T* __restrict a, const T* __restrict b, int H) {
    T s = 0;
    for (int k = 0; k < H; ++k) s += a[k] * b[k];
    return s;
}

// float: W lanes of partial sums, then a pairwise sum of the lanes (not W serial adds).
template <> inline float dot(const float* __restrict a, const float* __restrict b, int H) {
    vf acc{};
    int k = 0;
    for (; k + W <= H; k += W) {
        vf x, y;
        __builtin_memcpy(&x, a + k, sizeof x);
        __builtin_memcpy(&y, b + k, sizeof y);
        acc += x * y;
    }
    float lanes[W];
    __builtin_memcpy(lanes, &acc, sizeof acc);
    for (int w = W / 2; w > 0; w /= 2)
        for (int i = 0; i < w; ++i) lanes[i] += lanes[i + w];
    float s = lanes[0];
    for (; k < H; ++k) s += a[k] * b[k];
    return s;
}

// Scores of a run for one offset: v . h + bias, -inf where the neighbour is padding.
template <typename T>
inline void scores(const T* h, const T* v, const T* bias, int n, int H, T* s) {
    for (int c = 0; c < n; ++c) {
        const T b = bias ? bias[c] : T(0);
        s[c] = b == -std::numeric_limits<T>::infinity() ? b : dot(h + c * H, v, H) + b;
    }
}

template <typename T>
void forward(const T* p_pad, const T* q, const T* v, const T* bias, const int32_t* offsets, int K,
             Shape sh, int run, T* hagg, T* run_max, T* den, int threads) {
    const int H = sh.H;
    parallel_items(static_cast<int64_t>(sh.B) * sh.X, threads, [&](int64_t item) {
        const int b = static_cast<int>(item / sh.X), x = static_cast<int>(item % sh.X);
        std::vector<T> buf(2 * run * H);
        T *a = buf.data(), *h = a + run * H;
        T m[kMaxRun], d[kMaxRun], s[kMaxRun];
        for (int y = 0; y < sh.Y; ++y) {
            for (int z0 = 0; z0 < sh.Z; z0 += run) {
                const int n = std::min(run, sh.Z - z0), len = n * H;
                const int64_t i0 = sh.cell(b, x, y, z0);
                std::fill(a, a + len, T(0));
                std::fill(m, m + n, std::numeric_limits<T>::lowest());
                std::fill(d, d + n, T(0));
                for (int k = 0; k < K; ++k) {
                    const int dx = offsets[3 * k], dy = offsets[3 * k + 1], dz = offsets[3 * k + 2];
                    Math<T>::template gelu_run<false>(p_pad + sh.padded(b, x + dx, y + dy, z0 + dz) * H, q + i0 * H, len, h, h);
                    scores(h, v, bias ? bias + sh.bias_index(x + dx, y + dy, z0 + dz) : nullptr, n, H, s);
                    for (int c = 0; c < n; ++c) {    // online softmax: rescale by exp(m - m_new)
                        const T m_new = std::max(m[c], s[c]);
                        const T r = Math<T>::exp(m[c] - m_new);
                        const T w = s[c] == -std::numeric_limits<T>::infinity() ? T(0) : Math<T>::exp(s[c] - m_new);
                        d[c] = d[c] * r + w;
                        m[c] = m_new;
                        T* ac = a + c * H;
                        const T* hc = h + c * H;
#pragma omp simd
                        for (int e = 0; e < H; ++e) ac[e] = ac[e] * r + w * hc[e];
                    }
                }
                for (int c = 0; c < n; ++c) {
                    const T inv = d[c] > 0 ? T(1) / d[c] : T(0);
                    T* out = hagg + (i0 + c) * H;
#pragma omp simd
                    for (int e = 0; e < H; ++e) out[e] = a[c * H + e] * inv;
                    run_max[i0 + c] = m[c];
                    den[i0 + c] = d[c];
                }
            }
        }
    });
}

template <typename T>
void backward(const T* p_pad, const T* q, const T* v, const T* bias, const int32_t* offsets, int K, Shape sh,
              int run, const T* grad, const T* hagg, const T* run_max, const T* den, T* d_p_pad, T* d_q, T* d_v,
              int threads) {
    const int H = sh.H, phases = 2 * sh.px + 1;
    std::vector<T> d_v_parts;              // one d_v per item, summed at the end (no shared writes)
    d_v_parts.assign(static_cast<size_t>(sh.B) * sh.X * H, T(0));
    for (int phase = 0; phase < phases; ++phase) {
        const int planes = (sh.X - phase + phases - 1) / phases;   // x = phase, phase + phases, ...
        if (planes <= 0) continue;
        parallel_items(static_cast<int64_t>(sh.B) * planes, threads, [&](int64_t item) {
            const int b = static_cast<int>(item / planes), x = phase + static_cast<int>(item % planes) * phases;
            T* dv = d_v_parts.data() + (static_cast<int64_t>(b) * sh.X + x) * H;
            std::vector<T> buf(3 * run * H);
            T *h = buf.data(), *dh = h + run * H, *du = dh + run * H;
            T s[kMaxRun], centre[kMaxRun], inv_den[kMaxRun];
            for (int y = 0; y < sh.Y; ++y) {
                for (int z0 = 0; z0 < sh.Z; z0 += run) {
                    const int n = std::min(run, sh.Z - z0), len = n * H;
                    const int64_t i0 = sh.cell(b, x, y, z0);
                    const T* g = grad + i0 * H;
                    for (int c = 0; c < n; ++c) {   // G . hagg, and 0 for a cell with no neighbour
                        const T dc = den[i0 + c];
                        inv_den[c] = dc > 0 ? T(1) / dc : T(0);
                        centre[c] = dot(g + c * H, hagg + (i0 + c) * H, H);
                    }
                    for (int k = 0; k < K; ++k) {
                        const int dx = offsets[3 * k], dy = offsets[3 * k + 1], dz = offsets[3 * k + 2];
                        const int64_t j0 = sh.padded(b, x + dx, y + dy, z0 + dz);
                        Math<T>::template gelu_run<true>(p_pad + j0 * H, q + i0 * H, len, h, dh);  // u = P_{i+o} + Q_i
                        scores(h, v, bias ? bias + sh.bias_index(x + dx, y + dy, z0 + dz) : nullptr, n, H, s);
                        for (int c = 0; c < n; ++c) {
                            // w = softmax weight, d_s = w (G . h - G . hagg), d_u = (w G + d_s v) gelu'(u)
                            const bool live = inv_den[c] > 0 && s[c] != -std::numeric_limits<T>::infinity();
                            const T w = live ? Math<T>::exp(s[c] - run_max[i0 + c]) * inv_den[c] : T(0);
                            const T* gc = g + c * H;
                            const T* hc = h + c * H;
                            const T d_s = w * (dot(gc, hc, H) - centre[c]);
                            const T* dhc = dh + c * H;
                            T* duc = du + c * H;
#pragma omp simd
                            for (int e = 0; e < H; ++e) {
                                duc[e] = (w * gc[e] + d_s * v[e]) * dhc[e];
                                dv[e] += d_s * hc[e];
                            }
                        }
                        T* dq = d_q + i0 * H;
                        T* dp = d_p_pad + j0 * H;
#pragma omp simd
                        for (int e = 0; e < len; ++e) {
                            dq[e] += du[e];
                            dp[e] += du[e];
                        }
                    }
                }
            }
        });
    }
    for (size_t part = 0; part < d_v_parts.size(); part += H)
        for (int e = 0; e < H; ++e) d_v[e] += d_v_parts[part + e];
}

}  // namespace

#define NL_EXPORT(T, SUFFIX)                                                                                 \
    extern "C" void nl_functional_forward_##SUFFIX(const T* p_pad, const T* q, const T* v, const T* bias,   \
                                                    const int32_t* offsets, int K, const int32_t* shape,     \
                                                    T* hagg, T* run_max, T* den, int threads) {             \
        const Shape sh{shape[0], shape[1], shape[2], shape[3], shape[4], shape[5], shape[6], shape[7]};      \
        const int run = std::clamp(shape[8], 1, kMaxRun);                                                    \
        forward(p_pad, q, v, bias, offsets, K, sh, run, hagg, run_max, den, threads);                             \
    }                                                                                                        \
    extern "C" void nl_functional_backward_##SUFFIX(const T* p_pad, const T* q, const T* v, const T* bias,  \
                                                     const int32_t* offsets, int K, const int32_t* shape,    \
                                                     const T* grad, const T* hagg, const T* run_max,         \
                                                     const T* den, T* d_p_pad, T* d_q, T* d_v, int threads) {\
        const Shape sh{shape[0], shape[1], shape[2], shape[3], shape[4], shape[5], shape[6], shape[7]};      \
        const int run = std::clamp(shape[8], 1, kMaxRun);                                                    \
        backward(p_pad, q, v, bias, offsets, K, sh, run, grad, hagg, run_max, den, d_p_pad, d_q, d_v, threads);   \
    }

NL_EXPORT(float, f32)
NL_EXPORT(double, f64)
