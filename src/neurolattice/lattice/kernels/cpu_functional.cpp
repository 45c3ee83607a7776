// Fused functional-tier aggregation on the CPU (docs/lattice.md, "How the fast path works").
//
//   hagg_i = sum_j softmax_j(s_ij) h_ij,   h_ij = gelu(P_{i+o_j} + Q_i),   s_ij = v . h_ij + bias_{i+o_j}
//
// SIMD across cells: one vector holds W consecutive cells along z (W = one AVX-512 or AVX2
// register of T), and the hidden index e is the loop. P and Q come transposed, [.., H, Z] per
// z-row, so lane c of row e is one contiguous load; the score v . h is W fused multiply-adds
// into one vector (no horizontal sum), and the online softmax's max, exp and rescale run on W
// cells at once. A run's running max m, denominator d and weighted sum acc (H vectors) stay
// in L1; no [N, H] temporary exists per offset. Work items are z-rows (batch, x, y), handed
// out to threads by an atomic counter. The backward recomputes h from P, Q, v and the saved
// m and d; its scatter into dP touches planes x - px .. x + px only, so the items run in
// 2 px + 1 phases of planes that far apart and never write the same cell at once.
//
// Runs: a z-row is cut into runs of `run` cells (run <= W; the tests force 1). Where Z >= run
// the last run is shifted back to end at Z (overlapping the previous one by `skip` cells, which
// the backward masks out), so every run of a long row is a whole vector; only rows shorter
// than W take the partial-vector path.
//
// No torch headers: plain C++17, built by neurolattice/lattice/kernels/cpu_functional.py with
// the system compiler and loaded through ctypes. float32 runs gelu and exp on GCC/clang
// vector types; float64 uses libm's erf and exp lane by lane, so it matches the torch path to
// rounding.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace {

#ifdef __AVX512F__
constexpr int kVectorBytes = 64;
#else
constexpr int kVectorBytes = 32;
#endif

template <typename T> struct Lanes {
    static constexpr int W = kVectorBytes / sizeof(T);
    typedef T V __attribute__((vector_size(kVectorBytes)));
};
typedef int32_t vi __attribute__((vector_size(kVectorBytes)));
typedef Lanes<float>::V vf;

// Whole vectors through constant-size memcpy (plain unaligned loads and stores); n < W lanes
// through a zero-padded copy.
template <typename V, typename T> inline V load(const T* p, int n) {
    V x{};
    if (n == static_cast<int>(sizeof(V) / sizeof(T))) std::memcpy(&x, p, sizeof(V));
    else std::memcpy(&x, p, n * sizeof(T));
    return x;
}
template <typename V, typename T> inline void store(T* p, V x, int n) {
    if (n == static_cast<int>(sizeof(V) / sizeof(T))) std::memcpy(p, &x, sizeof(V));
    else std::memcpy(p, &x, n * sizeof(T));
}

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

template <typename T> struct Math;

// float: gelu(u) = u Phi(u), Phi(u) = (1 + erf(u / sqrt 2)) / 2, and gelu'(u) = Phi(u) + u phi(u).
// erf is Eigen's float rational approximation (x P(x^2) / Q(x^2) on x clamped to [-4, 4], beyond
// which erf is +-1 in float; a few float ulp): 13 fused multiply-adds and one division, no exp,
// so the forward's gelu is ~20 vector operations. The density phi needs the exp (backward only).
template <> struct Math<float> {
    typedef vf V;
    static inline V erf(V a) {
        const V x = a < -4.0f ? vf{} - 4.0f : (a > 4.0f ? vf{} + 4.0f : a);
        const V x2 = x * x;
        V p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
        p = p * x2 + -2.10102402082508e-06f;
        p = p * x2 + -5.69250639462346e-05f;
        p = p * x2 + -7.34990630326855e-04f;
        p = p * x2 + -2.95459980854025e-03f;
        p = p * x2 + -1.60960333262415e-02f;
        V q = x2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
        q = q * x2 + -1.68282697438203e-03f;
        q = q * x2 + -7.37332916720468e-03f;
        q = q * x2 + -1.42647390514189e-02f;
        return x * p / q;
    }
    template <bool grad> static inline V gelu(V u, V& dh) {
        const V cdf = 0.5f + 0.5f * erf(u * 0.70710678118654752f);
        if (grad) dh = cdf + u * exp_nonpositive(-0.5f * u * u) * 0.39894228040143268f;
        return u * cdf;
    }
    static inline V exp(V x) { return exp_nonpositive(x); }  // x <= 0 here
};

// float64: exactly the erf form torch uses, lane by lane.
template <> struct Math<double> {
    typedef Lanes<double>::V V;
    static constexpr int W = Lanes<double>::W;
    template <bool grad> static inline V gelu(V u, V& dh) {
        V h;
        for (int c = 0; c < W; ++c) {
            const double cdf = 0.5 * (1.0 + std::erf(u[c] * 0.70710678118654752));
            h[c] = u[c] * cdf;
            if (grad) dh[c] = cdf + u[c] * std::exp(-0.5 * u[c] * u[c]) * 0.39894228040143268;
        }
        return h;
    }
    static inline V exp(V x) {
        for (int c = 0; c < W; ++c) x[c] = std::exp(x[c]);
        return x;
    }
};

// The lattice block one call works on: B x X x Y x Z cells, P padded by (px, py, pz).
// Transposed tensors ([.., H, Z] per z-row) index a row, then e * Z (+ z).
struct Shape {
    int B, X, Y, Z, px, py, pz, H;
    int Zp() const { return Z + 2 * pz; }
    int64_t padded_row(int b, int x, int y) const {      // z-row of the padded lattice
        return (static_cast<int64_t>(b) * (X + 2 * px) + x + px) * (Y + 2 * py) + y + py;
    }
    int64_t row(int b, int x, int y) const { return (static_cast<int64_t>(b) * X + x) * Y + y; }
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

// Run r of a z-row: cells start .. start + n - 1, of which the first `skip` belong to the previous run.
struct Run {
    int start, n, skip;
};
inline Run run_at(int z0, int run, int Z) {
    if (Z - z0 >= run || Z < run) return {z0, std::min(run, Z - z0), 0};
    return {Z - run, run, z0 - (Z - run)};
}

template <typename T>
void forward(const T* p_t, const T* q_t, const T* v, const T* bias, const int32_t* offsets, int K,
             Shape sh, int run, T* hagg, T* run_max, T* den, int threads) {
    using V = typename Math<T>::V;
    const int H = sh.H, Z = sh.Z, Zp = sh.Zp();
    const T inf = std::numeric_limits<T>::infinity();
    parallel_items(static_cast<int64_t>(sh.B) * sh.X * sh.Y, threads, [&](int64_t item) {
        const int b = static_cast<int>(item / (static_cast<int64_t>(sh.X) * sh.Y));
        const int x = static_cast<int>(item / sh.Y % sh.X), y = static_cast<int>(item % sh.Y);
        std::vector<V> buf(3 * H);
        V *acc = buf.data(), *h = acc + H, *q = h + H;      // per e: the run's acc, h and Q
        {
            const T* q_row = q_t + sh.row(b, x, y) * H * Z;
            for (int z0 = 0; z0 < Z; z0 += run) {
                const auto [start, n, skip] = run_at(z0, run, Z);
                for (int e = 0; e < H; ++e) {
                    q[e] = load<V>(q_row + e * Z + start, n);
                    acc[e] = V{};
                }
                V m = V{} + std::numeric_limits<T>::lowest(), d{};
                for (int k = 0; k < K; ++k) {
                    const int dx = offsets[3 * k], dy = offsets[3 * k + 1], dz = offsets[3 * k + 2];
                    const int64_t prow = sh.padded_row(0, x + dx, y + dy);
                    const T* p = p_t + (sh.padded_row(b, x + dx, y + dy) * H * Zp + start + dz + sh.pz);
                    // first h and the score s = v . h + bias, one lane per cell
                    V s = bias ? load<V>(bias + prow * Zp + start + dz + sh.pz, n) : V{};
                    for (int e = 0; e < H; ++e) {
                        V unused;
                        h[e] = Math<T>::template gelu<false>(load<V>(p + e * Zp, n) + q[e], unused);
                        s += v[e] * h[e];
                    }
                    // then the online softmax: rescale by exp(m - m_new), add exp(s - m_new) h
                    const V m_new = s > m ? s : m;
                    const V r = Math<T>::exp(m - m_new);
                    const V w = s == -inf ? V{} : Math<T>::exp(s - m_new);
                    d = d * r + w;
                    m = m_new;
                    for (int e = 0; e < H; ++e) acc[e] = acc[e] * r + w * h[e];
                }
                const V inv = d > T(0) ? T(1) / (d > T(0) ? d : V{} + T(1)) : V{};
                const int64_t i0 = sh.row(b, x, y) * Z + start;
                for (int c = skip; c < n; ++c) {
                    T* out = hagg + (i0 + c) * H;
                    for (int e = 0; e < H; ++e) out[e] = acc[e][c] * inv[c];
                    run_max[i0 + c] = m[c];
                    den[i0 + c] = d[c];
                }
            }
        }
    });
}

template <typename T>
void backward(const T* p_t, const T* q_t, const T* v, const T* bias, const int32_t* offsets, int K, Shape sh,
              int run, const T* grad, const T* hagg, const T* run_max, const T* den, T* d_p_t, T* d_q, T* d_v,
              int threads) {
    using V = typename Math<T>::V;
    constexpr int W = Lanes<T>::W;
    const int H = sh.H, Z = sh.Z, Zp = sh.Zp(), phases = 2 * sh.px + 1;
    const T inf = std::numeric_limits<T>::infinity();
    std::vector<T> d_v_parts;              // one d_v per item, summed at the end (no shared writes)
    d_v_parts.assign(static_cast<size_t>(sh.B) * sh.X * H, T(0));
    for (int phase = 0; phase < phases; ++phase) {
        const int planes = (sh.X - phase + phases - 1) / phases;   // x = phase, phase + phases, ...
        if (planes <= 0) continue;
        parallel_items(static_cast<int64_t>(sh.B) * planes, threads, [&](int64_t item) {
            const int b = static_cast<int>(item / planes), x = phase + static_cast<int>(item % planes) * phases;
            std::vector<V> buf(6 * H);
            // per e: G (dL/dhagg), Q, h, gelu'(u), the run's dL/dQ and this item's dL/dv
            V *g = buf.data(), *q = g + H, *h = q + H, *dh = h + H, *dq = dh + H, *dv = dq + H;
            for (int y = 0; y < sh.Y; ++y) {
                const T* q_row = q_t + sh.row(b, x, y) * H * Z;
                for (int z0 = 0; z0 < Z; z0 += run) {
                    const auto [start, n, skip] = run_at(z0, run, Z);
                    const int64_t i0 = sh.row(b, x, y) * Z + start;
                    V live{}, centre{};            // live: 1 on this run's own cells with a neighbour
                    for (int e = 0; e < H; ++e) {
                        q[e] = load<V>(q_row + e * Z + start, n);
                        dq[e] = V{};
                    }
                    for (int c = 0; c < n; ++c) {   // G transposed, G . hagg
                        T dot = 0;
                        for (int e = 0; e < H; ++e) {
                            g[e][c] = grad[(i0 + c) * H + e];
                            dot += g[e][c] * hagg[(i0 + c) * H + e];
                        }
                        centre[c] = dot;
                        live[c] = c >= skip && den[i0 + c] > 0 ? T(1) : T(0);
                    }
                    for (int c = n; c < W; ++c)
                        for (int e = 0; e < H; ++e) g[e][c] = 0;
                    const V m = load<V>(run_max + i0, n);
                    const V dd = load<V>(den + i0, n);
                    const V inv_den = live > T(0) ? T(1) / (live > T(0) ? dd : V{} + T(1)) : V{};
                    for (int k = 0; k < K; ++k) {
                        const int dx = offsets[3 * k], dy = offsets[3 * k + 1], dz = offsets[3 * k + 2];
                        const int64_t prow = sh.padded_row(0, x + dx, y + dy);
                        const int64_t j0 = sh.padded_row(b, x + dx, y + dy) * H * Zp + start + dz + sh.pz;
                        const T* p = p_t + j0;
                        // u = P_{i+o} + Q_i; h, gelu'(u); s = v . h + bias and G . h
                        V s = bias ? load<V>(bias + prow * Zp + start + dz + sh.pz, n) : V{};
                        V gh{};
                        for (int e = 0; e < H; ++e) {
                            h[e] = Math<T>::template gelu<true>(load<V>(p + e * Zp, n) + q[e], dh[e]);
                            s += v[e] * h[e];
                            gh += g[e] * h[e];
                        }
                        // w = softmax weight, d_s = w (G . h - G . hagg), d_u = (w G + d_s v) gelu'(u)
                        const auto counted = (live > T(0)) & (s != -inf);
                        const V w = counted ? Math<T>::exp(counted ? s - m : V{}) * inv_den : V{};
                        const V d_s = w * (gh - centre);
                        T* dp = d_p_t + j0;
                        for (int e = 0; e < H; ++e) {
                            const V du = (w * g[e] + d_s * v[e]) * dh[e];
                            dq[e] += du;
                            dv[e] += d_s * h[e];
                            if (n == W) {
                                store<V>(dp + e * Zp, load<V>(dp + e * Zp, W) + du, W);
                            } else {
                                for (int c = 0; c < n; ++c) dp[e * Zp + c] += du[c];
                            }
                        }
                    }
                    for (int c = skip; c < n; ++c)
                        for (int e = 0; e < H; ++e) d_q[(i0 + c) * H + e] += dq[e][c];
                }
            }
            T* part = d_v_parts.data() + (static_cast<int64_t>(b) * sh.X + x) * H;
            for (int e = 0; e < H; ++e)
                for (int c = 0; c < W; ++c) part[e] += dv[e][c];
            std::fill(dv, dv + H, V{});
        });
    }
    for (size_t part = 0; part < d_v_parts.size(); part += H)
        for (int e = 0; e < H; ++e) d_v[e] += d_v_parts[part + e];
}

// out[i] += sum over rows r of rows[r][i], for i < span: in blocks of 4 vector registers, each
// block loading its span from every row (the ~70 rows one output row reads stay in L2) and
// storing once.
template <typename T> void add_spans(T* out, const std::vector<const T*>& rows, int64_t span) {
    using V = typename Lanes<T>::V;
    constexpr int W = Lanes<T>::W;
    int64_t i = 0;
    for (; i + 4 * W <= span; i += 4 * W) {
        V a0{}, a1{}, a2{}, a3{};
        for (const T* p : rows) {
            a0 += load<V>(p + i, W);
            a1 += load<V>(p + i + W, W);
            a2 += load<V>(p + i + 2 * W, W);
            a3 += load<V>(p + i + 3 * W, W);
        }
        store<V>(out + i, load<V>(out + i, W) + a0, W);
        store<V>(out + i + W, load<V>(out + i + W, W) + a1, W);
        store<V>(out + i + 2 * W, load<V>(out + i + 2 * W, W) + a2, W);
        store<V>(out + i + 3 * W, load<V>(out + i + 3 * W, W) + a3, W);
    }
    for (; i < span; i += W) {
        const int n = static_cast<int>(std::min<int64_t>(W, span - i));
        V a{};
        for (const T* p : rows) a += load<V>(p + i, n);
        store<V>(out + i, load<V>(out + i, n) + a, n);
    }
}

// Stencil sums (the tier sums): for each tier t, out_t[c] += sum over its offsets o of
// in_t[c + pad + o], C channels per cell, out [B, X, Y, Z, C] and in padded by (px, py, pz). An
// offset moves a z-row of Z cells by one constant distance in memory, so a z-row of the output
// is a sum of K contiguous spans of Z * C elements (add_spans). Items are z-rows (batch, x, y).
template <typename T>
void stencil_sums(const T* const* ins, T* const* outs, const int32_t* counts, const int32_t* offsets, int tiers,
                  const int32_t* shape, int threads) {
    const int B = shape[0], X = shape[1], Y = shape[2], Z = shape[3], px = shape[4], py = shape[5], pz = shape[6],
              C = shape[7];
    const int Yp = Y + 2 * py, Zp = Z + 2 * pz;
    std::vector<int64_t> delta;            // per offset: its distance in memory, in elements
    for (int t = 0, k = 0; t < tiers; ++t)
        for (int j = 0; j < counts[t]; ++j, ++k)
            delta.push_back((static_cast<int64_t>(offsets[3 * k]) * Yp + offsets[3 * k + 1]) * Zp * C
                            + static_cast<int64_t>(offsets[3 * k + 2]) * C);
    const int64_t span = static_cast<int64_t>(Z) * C;
    parallel_items(static_cast<int64_t>(B) * X * Y, threads, [&](int64_t item) {
        const int b = static_cast<int>(item / (static_cast<int64_t>(X) * Y));
        const int x = static_cast<int>(item / Y % X), y = static_cast<int>(item % Y);
        const int64_t centre = (((static_cast<int64_t>(b) * (X + 2 * px) + x + px) * Yp + y + py) * Zp + pz) * C;
        const int64_t row = ((static_cast<int64_t>(b) * X + x) * Y + y) * span;
        std::vector<const T*> rows;
        for (int t = 0, k0 = 0; t < tiers; k0 += counts[t], ++t) {
            rows.clear();
            for (int k = k0; k < k0 + counts[t]; ++k) rows.push_back(ins[t] + centre + delta[k]);
            add_spans(outs[t] + row, rows, span);
        }
    });
}

// The adjoint of stencil_sums, written where it lands: d_in[j] = sum_t sum_{o in tier t} g_t[j - pad - o]
// over the sources inside the B x X x Y x Z block (in is padded, the g_t are not). Items are
// (batch, padded x-plane) pairs, each writing its own plane only; for a padded z-row, the offsets
// of one dz whose source row (x - px - dx, y - py - dy) lies inside the block all land on the same
// span of Z * C elements, starting at (pz + dz) * C: they are summed in registers (add_spans)
// and added once. Nothing is read outside the block, so no padded copy of the
// g_t is made, and work is the forward's, not that of the padded volume.
template <typename T>
void stencil_adjoint(const T* const* grads, T* d_in, const int32_t* counts, const int32_t* offsets, int tiers,
                     const int32_t* shape, int threads) {
    const int B = shape[0], X = shape[1], Y = shape[2], Z = shape[3], px = shape[4], py = shape[5], pz = shape[6],
              C = shape[7];
    const int Xp = X + 2 * px, Yp = Y + 2 * py, Zp = Z + 2 * pz;
    struct Source { int tier, dx, dy; };
    std::vector<std::vector<Source>> by_dz(2 * pz + 1);      // the offsets grouped by dz + pz
    for (int t = 0, k = 0; t < tiers; ++t)
        for (int j = 0; j < counts[t]; ++j, ++k)
            by_dz[offsets[3 * k + 2] + pz].push_back({t, offsets[3 * k], offsets[3 * k + 1]});
    const int64_t span = static_cast<int64_t>(Z) * C;
    parallel_items(static_cast<int64_t>(B) * Xp, threads, [&](int64_t item) {
        const int b = static_cast<int>(item / Xp), jx = static_cast<int>(item % Xp);
        std::vector<const T*> rows;
        for (int jy = 0; jy < Yp; ++jy) {
            T* out_row = d_in + ((static_cast<int64_t>(b) * Xp + jx) * Yp + jy) * Zp * C;
            for (int g = 0; g <= 2 * pz; ++g) {
                rows.clear();
                for (const Source& s : by_dz[g]) {
                    const int x = jx - px - s.dx, y = jy - py - s.dy;
                    if (x >= 0 && x < X && y >= 0 && y < Y)
                        rows.push_back(grads[s.tier] + ((static_cast<int64_t>(b) * X + x) * Y + y) * span);
                }
                if (rows.empty()) continue;
                add_spans(out_row + static_cast<int64_t>(g) * C, rows, span);   // dz = g - pz lands at pz + dz
            }
        }
    });
}

}  // namespace

#define NL_EXPORT(T, SUFFIX)                                                                                 \
    extern "C" int nl_functional_lanes_##SUFFIX() { return Lanes<T>::W; }                                    \
    extern "C" void nl_functional_forward_##SUFFIX(const T* p_t, const T* q_t, const T* v, const T* bias,   \
                                                    const int32_t* offsets, int K, const int32_t* shape,     \
                                                    T* hagg, T* run_max, T* den, int threads) {             \
        const Shape sh{shape[0], shape[1], shape[2], shape[3], shape[4], shape[5], shape[6], shape[7]};      \
        const int run = std::clamp(shape[8], 1, Lanes<T>::W);                                                \
        forward(p_t, q_t, v, bias, offsets, K, sh, run, hagg, run_max, den, threads);                        \
    }                                                                                                        \
    extern "C" void nl_functional_backward_##SUFFIX(const T* p_t, const T* q_t, const T* v, const T* bias,  \
                                                     const int32_t* offsets, int K, const int32_t* shape,    \
                                                     const T* grad, const T* hagg, const T* run_max,         \
                                                     const T* den, T* d_p_t, T* d_q, T* d_v, int threads) {  \
        const Shape sh{shape[0], shape[1], shape[2], shape[3], shape[4], shape[5], shape[6], shape[7]};      \
        const int run = std::clamp(shape[8], 1, Lanes<T>::W);                                                \
        backward(p_t, q_t, v, bias, offsets, K, sh, run, grad, hagg, run_max, den, d_p_t, d_q, d_v, threads);\
    }

#define NL_EXPORT_SUMS(T, SUFFIX)                                                                            \
    extern "C" void nl_stencil_sums_##SUFFIX(const T* const* ins, T* const* outs, const int32_t* counts,      \
                                             const int32_t* offsets, int tiers, const int32_t* shape,        \
                                             int threads) {                                                  \
        stencil_sums(ins, outs, counts, offsets, tiers, shape, threads);                                     \
    }                                                                                                        \
    extern "C" void nl_stencil_adjoint_##SUFFIX(const T* const* grads, T* d_in, const int32_t* counts,        \
                                                const int32_t* offsets, int tiers, const int32_t* shape,     \
                                                int threads) {                                               \
        stencil_adjoint(grads, d_in, counts, offsets, tiers, shape, threads);                                \
    }

NL_EXPORT_SUMS(float, f32)
NL_EXPORT_SUMS(double, f64)
NL_EXPORT(float, f32)
NL_EXPORT(double, f64)
