// Runs every kernel of kernels/cuda/*.cu on the CPU (cuda_emu.h) against a plain loop
// written from the op's definition (kernels/src/ops.rs), with the launch shapes that
// kernels/src/cuda.rs uses and sizes that are not multiples of the block sizes.
// Exact where the kernel does the reference's arithmetic in its order, else a stated
// relative tolerance. Built and run by kernels/tests/cuda_emu.rs; exits 1 on a failure.
#include "cuda_emu.h"

#include "../sae.cu"
#include "../ops.cu"

#include <cstdio>
#include <numeric>
#include <random>
#include <string>

using F = std::vector<float>;
using U = std::vector<unsigned>;
using D = std::vector<double>;

static int failures = 0;

static void expect(bool ok, const std::string& what) {
    if (!ok) {
        std::printf("FAIL %s\n", what.c_str());
        ++failures;
    }
}

// |a - b| <= tol * max(1, max finite |b|) element-wise, or equal (infinities) or both
// NaN; tol 0: bit-equal.
template <class T>
static void close(const std::vector<T>& a, const std::vector<T>& b, double tol,
                  const std::string& what) {
    if (a.size() != b.size()) return expect(false, what + ": lengths");
    double scale = 1;
    for (auto v : b)
        if (std::isfinite((double)v)) scale = std::max(scale, std::fabs((double)v));
    for (size_t i = 0; i < a.size(); ++i) {
        bool nan = std::isnan((double)a[i]) && std::isnan((double)b[i]);
        bool ok = tol == 0 ? std::memcmp(&a[i], &b[i], sizeof(T)) == 0
                           : a[i] == b[i] || nan ||
                                 std::fabs((double)a[i] - (double)b[i]) <= tol * scale;
        if (!ok) {
            std::printf("  %s[%zu]: kernel %.9g vs reference %.9g\n", what.c_str(), i,
                        (double)a[i], (double)b[i]);
            return expect(false, what);
        }
    }
}

static std::mt19937 rng(7);
static F rnd(size_t n, float lo = -1, float hi = 1) {
    std::uniform_real_distribution<float> d(lo, hi);
    F v(n);
    for (auto& x : v) x = d(rng);
    return v;
}

static Dim3 grid_stride_cfg() { return {3, 1, 1}; }  // fewer threads than elements
static const Dim3 T64{64, 1, 1}, T256{256, 1, 1}, T1024{1024, 1, 1};
static Dim3 rows_cfg(unsigned r) { return {r, 1, 1}; }
static Dim3 chunks_cfg(int rows, int cols) {
    return {(unsigned)((cols + 255) / 256), (unsigned)((rows + 63) / 64), 1};
}

static unsigned key(float f) {
    unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// A CSR matrix with k distinct random columns per row (ascending).
struct Csr {
    int rows, cols;
    U off, idx;
    F val;
};
static Csr random_csr(int rows, int cols, int k) {
    Csr a{rows, cols, {0}, {}, {}};
    for (int r = 0; r < rows; ++r) {
        U c(cols);
        std::iota(c.begin(), c.end(), 0u);
        std::shuffle(c.begin(), c.end(), rng);
        c.resize(k);
        std::sort(c.begin(), c.end());
        for (auto j : c) a.idx.push_back(j);
        F v = rnd(k);
        a.val.insert(a.val.end(), v.begin(), v.end());
        a.off.push_back(a.idx.size());
    }
    return a;
}

static void elementwise() {
    const int R = 37, C = 300;
    const long long n = R * C;
    F x = rnd(n), y = rnd(n), vc = rnd(C), vr = rnd(R), vr2 = rnd(R);
    auto run = [&](auto&& body) { emu_launch(grid_stride_cfg(), T64, body); };
    F o(n), want(n);
    run([&] { fill_f32(o.data(), n, 0.25f); });
    close(o, F(n, 0.25f), 0, "fill_f32");
    o = x;
    run([&] { scale_inplace(o.data(), n, -1.5f); });
    for (long long i = 0; i < n; ++i) want[i] = x[i] * -1.5f;
    close(o, want, 0, "scale_inplace");
    run([&] { scale_inplace(o.data(), n, 0.f); });
    close(o, F(n, 0.f), 0, "scale_inplace 0");
    o = x;
    run([&] { axpy_f32(o.data(), y.data(), n, 0.3f); });
    for (long long i = 0; i < n; ++i) want[i] = x[i] + 0.3f * y[i];
    close(o, want, 0, "axpy_f32");
    o = x;
    run([&] { mul_f32(o.data(), y.data(), n); });
    for (long long i = 0; i < n; ++i) want[i] = x[i] * y[i];
    close(o, want, 0, "mul_f32");
    run([&] { exp_f32(x.data(), o.data(), n); });
    for (long long i = 0; i < n; ++i) want[i] = std::exp(x[i]);
    close(o, want, 0, "exp_f32");
    o = x;
    run([&] { tanh_f32(o.data(), n); });
    for (long long i = 0; i < n; ++i) want[i] = std::tanh(x[i]);
    close(o, want, 0, "tanh_f32");
    o = x;
    run([&] { add_row_vec(o.data(), vc.data(), n, C, -0.5f); });
    for (long long i = 0; i < n; ++i) want[i] = x[i] + -0.5f * vc[i % C];
    close(o, want, 0, "add_row_vec");
    o = x;
    run([&] { mul_row_vec(o.data(), vc.data(), n, C); });
    for (long long i = 0; i < n; ++i) want[i] = x[i] * vc[i % C];
    close(o, want, 0, "mul_row_vec");
    o = x;
    run([&] { row_affine(o.data(), vr.data(), vr2.data(), n, C); });
    for (long long i = 0; i < n; ++i) want[i] = x[i] * vr[i / C] + vr2[i / C];
    close(o, want, 0, "row_affine");
    o = x;
    F c = vr;
    c[3] = 0;
    run([&] { add_scaled_rows(o.data(), y.data(), c.data(), n, C); });
    for (long long i = 0; i < n; ++i) want[i] = c[i / C] != 0 ? x[i] + c[i / C] * y[i] : x[i];
    close(o, want, 0, "add_scaled_rows");
    run([&] { relu_f32(x.data(), o.data(), n); });
    for (long long i = 0; i < n; ++i) want[i] = std::max(x[i], 0.f);
    close(o, want, 0, "relu_f32");
    run([&] { relu_backward(x.data(), y.data(), o.data(), n); });
    for (long long i = 0; i < n; ++i) want[i] = x[i] > 0 ? y[i] : 0.f;
    close(o, want, 0, "relu_backward");
    o = y;
    run([&] { mask_positive(o.data(), x.data(), n); });
    for (long long i = 0; i < n; ++i) want[i] = x[i] > 0 ? y[i] : 0.f;
    close(o, want, 0, "mask_positive");
    run([&] { jumprelu(x.data(), vc.data(), o.data(), n, C); });
    for (long long i = 0; i < n; ++i) want[i] = x[i] > vc[i % C] ? x[i] : 0.f;
    close(o, want, 0, "jumprelu");
    run([&] { sq_err(x.data(), y.data(), vr.data(), o.data(), n, C); });
    for (long long i = 0; i < n; ++i) want[i] = (x[i] - y[i]) * (x[i] - y[i]) * vr[i / C];
    close(o, want, 0, "sq_err");
    run([&] { sq_err(x.data(), y.data(), nullptr, o.data(), n, C); });
    for (long long i = 0; i < n; ++i) want[i] = (x[i] - y[i]) * (x[i] - y[i]);
    close(o, want, 0, "sq_err unweighted");
    run([&] { div_eps(x.data(), y.data(), 2.f, o.data(), n); });
    for (long long i = 0; i < n; ++i) want[i] = x[i] / (y[i] + 2.f);
    close(o, want, 0, "div_eps");
    run([&] { tanh_relu_backward(x.data(), y.data(), o.data(), n); });
    for (long long i = 0; i < n; ++i) {
        float t = std::tanh(x[i]);
        want[i] = x[i] > 0 ? y[i] * (1 - t * t) : 0.f;
    }
    close(o, want, 0, "tanh_relu_backward");
    F sub(R * 40), wsub(R * 40);
    long long ns = R * 40;
    run([&] { copy_cols(x.data(), C, 17, sub.data(), 40, ns); });
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < 40; ++j) wsub[r * 40 + j] = x[r * C + 17 + j];
    close(sub, wsub, 0, "copy_cols");
    o = y;
    run([&] { add_cols(o.data(), C, 250, sub.data(), 40, ns); });
    want = y;
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < 40; ++j) want[r * C + 250 + j] += sub[r * 40 + j];
    close(o, want, 0, "add_cols");
    D acc(C);
    for (int j = 0; j < C; ++j) acc[j] = vc[j] * 1e3;
    o.assign(vc.begin(), vc.end());
    F oc(C), wc(C);
    oc = vc;
    run([&] { add_f64(oc.data(), acc.data(), C, 0.5f, 2.f); });
    for (int j = 0; j < C; ++j) wc[j] = 2.f * vc[j] + 0.5f * (float)acc[j];
    close(oc, wc, 0, "add_f64");
    // bf16 rounding: ties to even, and a NaN stays NaN.
    F b = {1.0f, 1.00390625f, 1.01171875f, -3.3f, __uint_as_float(0x7fc00001u)};
    std::vector<unsigned short> h(b.size());
    long long nb = b.size();
    run([&] { f32_to_bf16(b.data(), h.data(), nb); });
    std::vector<unsigned short> hw = {0x3f80, 0x3f80, 0x3f82, 0xc053, 0x7fc0};
    close(h, hw, 0, "f32_to_bf16");
    // Adam, as torch (and the CPU backend) compute it.
    F p = rnd(1000), g = rnd(1000), m = rnd(1000, 0, 0.1f), v = rnd(1000, 0, 0.1f);
    F p2 = p, m2 = m, v2 = v;
    float ss = 0.01f, w = 0.1f, b2 = 0.999f, omb2 = 0.001f, eps = 1e-8f, bc2 = 0.3f, clip = 0.5f;
    run([&] { adam_step(p.data(), g.data(), m.data(), v.data(), 1000, ss, w, b2, omb2, eps, bc2, clip); });
    for (int i = 0; i < 1000; ++i) {
        float gi = g[i] * clip;
        m2[i] = m2[i] + w * (gi - m2[i]);
        v2[i] = v2[i] * b2 + omb2 * gi * gi;
        p2[i] = p2[i] + (-ss * m2[i]) / (std::sqrt(v2[i]) / bc2 + eps);
    }
    close(p, p2, 0, "adam_step p");
    close(m, m2, 0, "adam_step m");
    close(v, v2, 0, "adam_step v");
}

static void reductions() {
    const int R = 131, C = 300;
    const long long n = (long long)R * C;
    F x = rnd(n), y = rnd(n), t = rnd(C);
    x[5] = 0;
    F o(R), want(R);
    const char* names[] = {"norm", "dot", "nonzero", "step count"};
    for (int mode = 0; mode < 4; ++mode) {
        const float* yy = mode == 1 ? y.data() : mode == 3 ? t.data() : nullptr;
        emu_launch(rows_cfg(R), T256, [&] { row_reduce(x.data(), yy, C, mode, o.data()); });
        for (int r = 0; r < R; ++r) {
            double a = 0;
            for (int j = 0; j < C; ++j) {
                float v = x[r * C + j];
                a += mode == 0 ? (double)v * v : mode == 1 ? (double)v * y[r * C + j]
                     : mode == 2 ? (v != 0) : (v > t[j]);
            }
            want[r] = mode == 0 ? std::sqrt(a) : a;
        }
        close(o, want, 1e-6, std::string("row_reduce ") + names[mode]);
    }
    F mu(R), sd(R), wmu(R), wsd(R);
    emu_launch(rows_cfg(R), T256, [&] { row_mean_std(x.data(), C, mu.data(), sd.data()); });
    for (int r = 0; r < R; ++r) {
        double s = 0, q = 0;
        for (int j = 0; j < C; ++j) s += x[r * C + j];
        double m = s / C;
        for (int j = 0; j < C; ++j) q += (x[r * C + j] - m) * (x[r * C + j] - m);
        wmu[r] = m;
        wsd[r] = std::sqrt(q / (C - 1));
    }
    close(mu, wmu, 1e-6, "row_mean_std mean");
    close(sd, wsd, 1e-6, "row_mean_std std");
    emu_launch(rows_cfg(R), T256, [&] { centered_row_norms(x.data(), t.data(), C, o.data()); });
    for (int r = 0; r < R; ++r) {
        double a = 0;
        for (int j = 0; j < C; ++j) a += (double)(x[r * C + j] - t[j]) * (x[r * C + j] - t[j]);
        want[r] = std::sqrt(a);
    }
    close(o, want, 1e-6, "centered_row_norms");
    for (int mode = 0; mode < 2; ++mode) {
        D acc(C, 0), wacc(C, 0);
        emu_launch(chunks_cfg(R, C), T256, [&] { col_reduce(x.data(), R, C, mode, acc.data()); });
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < C; ++j) wacc[j] += mode == 0 ? x[r * C + j] : (x[r * C + j] != 0);
        close(acc, wacc, 1e-12, mode == 0 ? "col_reduce sum" : "col_reduce nonzero");
    }
    for (int sq = 0; sq < 2; ++sq) {
        D s(1, 0);
        emu_launch(grid_stride_cfg(), T256, [&] { sum_f64(x.data(), n, sq, s.data()); });
        double w = 0;
        for (auto v : x) w += sq ? (double)v * v : v;
        close(s, D{w}, 1e-12, sq ? "sum_f64 squares" : "sum_f64");
    }
    U best = {0x7f800000u};
    emu_launch(grid_stride_cfg(), T256, [&] { min_positive(x.data(), n, best.data()); });
    float mp = INFINITY;
    for (auto v : x)
        if (v > 0) mp = std::min(mp, v);
    close(best, U{__float_as_uint(mp)}, 0, "min_positive");
    // MSE rows (weighted, with gradient) and the element-weighted squared error.
    F w = rnd(R, 0, 1), gr(n), wg(n);
    D tot(1, 0);
    emu_launch(rows_cfg(R), T256, [&] { mse_rows(x.data(), y.data(), w.data(), 0.01f, gr.data(), C, tot.data()); });
    double wt = 0;
    for (int r = 0; r < R; ++r) {
        double s = 0;
        for (int j = 0; j < C; ++j) {
            float d = x[r * C + j] - y[r * C + j];
            s += (double)d * d;
            wg[r * C + j] = 0.01f * 2.f * w[r] * d;
        }
        wt += s * w[r];
    }
    close(gr, wg, 0, "mse_rows grad");
    close(tot, D{wt}, 1e-12, "mse_rows total");
    F ew = rnd(n, 0, 1);
    D tot2(1, 0);
    emu_launch(grid_stride_cfg(), T256, [&] { weighted_sq_err(x.data(), y.data(), ew.data(), 0.5f, gr.data(), n, tot2.data()); });
    double wt2 = 0;
    for (long long i = 0; i < n; ++i) {
        float d = x[i] - y[i];
        wt2 += ew[i] * d * d;
        wg[i] = 0.5f * 2.f * ew[i] * d;
    }
    close(gr, wg, 0, "weighted_sq_err grad");
    close(tot2, D{wt2}, 1e-12, "weighted_sq_err total");
}

static float rect(float x) { return (x > -0.5f && x < 0.5f) ? 1.f : 0.f; }

static void losses() {
    const int R = 131, C = 300;
    const long long n = (long long)R * C;
    F h = rnd(n), df = rnd(n), t = rnd(C, 0, 0.5f), g = rnd(R), nrm = rnd(C, 0.5f, 1.5f);
    F f = rnd(n);
    for (auto& v : f) v = std::max(v, 0.f);
    const float bw = 0.1f;
    for (int ste = 0; ste < 2; ++ste) {
        F dh = rnd(n), wdh = dh;
        D dt(C, 0), wdt(C, 0);
        emu_launch(chunks_cfg(R, C), T256, [&] { jumprelu_backward(h.data(), t.data(), df.data(), bw, ste, dh.data(), dt.data(), R, C); });
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < C; ++j) {
                long long i = (long long)r * C + j;
                float s = (t[j] / bw) * rect((h[i] - t[j]) / bw) * df[i];
                wdt[j] -= s;
                float d = h[i] > t[j] ? df[i] : 0.f;
                if (ste) d += s;
                wdh[i] += d;
            }
        close(dh, wdh, 0, "jumprelu_backward dh");
        close(dt, wdt, 1e-12, "jumprelu_backward dt");
        D dt2(C, 0), wdt2(C, 0);
        wdh = dh;
        emu_launch(chunks_cfg(R, C), T256, [&] { step_backward(h.data(), t.data(), g.data(), bw, ste, dh.data(), dt2.data(), R, C); });
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < C; ++j) {
                long long i = (long long)r * C + j;
                float s = (1.f / bw) * rect((h[i] - t[j]) / bw) * g[r];
                wdt2[j] -= s;
                if (ste) wdh[i] += s;
            }
        close(dh, wdh, 0, "step_backward dh");
        close(dt2, wdt2, 1e-12, "step_backward dt");
    }
    {
        F dfa = rnd(n), wdf = dfa;
        D dn(C, 0), wdn(C, 0), tot(1, 0);
        double wt = 0;
        emu_launch(chunks_cfg(R, C), T256, [&] { tanh_sparsity(f.data(), nrm.data(), 4.f, 0.3f, dfa.data(), dn.data(), tot.data(), R, C); });
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < C; ++j) {
                long long i = (long long)r * C + j;
                float th = std::tanh(4.f * f[i] * nrm[j]);
                wt += th;
                float du = 0.3f * (1.f - th * th);
                wdf[i] += du * 4.f * nrm[j];
                wdn[j] += du * 4.f * f[i];
            }
        close(dfa, wdf, 0, "tanh_sparsity df");
        close(dn, wdn, 1e-12, "tanh_sparsity dn");
        close(tot, D{wt}, 1e-12, "tanh_sparsity total");
    }
    for (float p : {1.f, 2.f, 0.5f}) {
        D norms(R), wn(R);
        emu_launch(rows_cfg(R), T256, [&] { lp_norms(f.data(), nrm.data(), p, C, norms.data()); });
        for (int r = 0; r < R; ++r) {
            double a = 0;
            for (int j = 0; j < C; ++j) {
                float w = f[r * C + j] * nrm[j];
                a += p == 1 ? std::fabs(w) : p == 2 ? (double)w * w : std::pow((double)std::fabs(w), (double)p);
            }
            wn[r] = p == 1 ? a : p == 2 ? std::sqrt(a) : std::pow(a, 1.0 / p);
        }
        close(norms, wn, 1e-12, "lp_norms p=" + std::to_string(p));
        F dfa = rnd(n), wdf = dfa;
        D dn(C, 0), wdn(C, 0);
        emu_launch(chunks_cfg(R, C), T256, [&] { lp_backward(f.data(), nrm.data(), norms.data(), p, 0.7f, dfa.data(), dn.data(), R, C); });
        for (int r = 0; r < R; ++r) {
            if (wn[r] == 0 && p != 1) continue;
            for (int j = 0; j < C; ++j) {
                long long i = (long long)r * C + j;
                float w = f[i] * nrm[j];
                float sg = std::copysign(1.f, w);
                float dw = p == 1 ? (w != 0 ? sg : 0.f)
                                  : (float)(sg * std::pow((double)std::fabs(w), p - 1.0) / std::pow(norms[r], p - 1.0));
                float gg = 0.7f * dw;
                wdf[i] += gg * nrm[j];
                wdn[j] += gg * f[i];
            }
        }
        close(dfa, wdf, 0, "lp_backward df p=" + std::to_string(p));
        close(dn, wdn, 1e-12, "lp_backward dn p=" + std::to_string(p));
    }
    {
        F dead = rnd(C);
        for (auto& v : dead) v = v > 0 ? 1.f : 0.f;
        F dh = rnd(n), wdh = dh;
        D dt(C, 0), dn(C, 0), wdt(C, 0), wdn(C, 0), tot(1, 0);
        double wt = 0;
        emu_launch(chunks_cfg(R, C), T256, [&] { pre_act_loss(h.data(), t.data(), dead.data(), nrm.data(), 0.2f, dh.data(), dt.data(), dn.data(), tot.data(), R, C); });
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < C; ++j) {
                long long i = (long long)r * C + j;
                if (dead[j] == 0) continue;
                float u = t[j] - h[i];
                if (u > 0) {
                    wt += u * dead[j] * nrm[j];
                    float gg = 0.2f * dead[j] * nrm[j];
                    wdh[i] -= gg;
                    wdt[j] += gg;
                    wdn[j] += 0.2f * u * dead[j];
                }
            }
        close(dh, wdh, 0, "pre_act_loss dh");
        close(dt, wdt, 1e-12, "pre_act_loss dt");
        close(dn, wdn, 1e-12, "pre_act_loss dn");
        close(tot, D{wt}, 1e-12, "pre_act_loss total");
    }
}

// Reference top-k of a row: larger values first, lower column among equals.
static U ref_topk(const float* row, int cols, int k, const float* mask) {
    U c;
    for (int j = 0; j < cols; ++j)
        if (!mask || mask[j] > 0) c.push_back(j);
    std::stable_sort(c.begin(), c.end(), [&](unsigned a, unsigned b) { return key(row[a]) > key(row[b]); });
    c.resize(k);
    std::sort(c.begin(), c.end());
    return c;
}

static void selection() {
    // Quantised rows put many equal values at the cut: the lower columns must win.
    for (auto [rows, cols, k, masked, quant] : std::vector<std::tuple<int, int, int, bool, bool>>{
             {7, 100, 1, false, false}, {5, 3000, 64, false, false}, {3, 50, 50, false, false},
             {6, 700, 8, true, false}, {5, 3000, 64, false, true}, {6, 700, 8, true, true},
             {4, 40, 13, false, true}, {2, 24576, 512, false, true}}) {
        F x = rnd(rows * cols);
        if (quant)
            for (auto& v : x) v = std::round(v * 4) / 4;
        F mask = rnd(cols);
        for (auto& v : mask) v = v > 0.3f ? 1.f : 0.f;
        // One row's worth of sentinels past the end: nothing may be written there.
        U idx(rows * k + k, ~0u);
        F val(rows * k + k, -7.f);
        const float* m = masked ? mask.data() : nullptr;
        emu_launch(rows_cfg(rows), T1024, [&] { topk_rows(x.data(), cols, k, m, idx.data(), val.data()); });
        U widx;
        F wval;
        for (int r = 0; r < rows; ++r)
            for (auto j : ref_topk(&x[r * cols], cols, k, m)) {
                widx.push_back(j);
                wval.push_back(x[r * cols + j]);
            }
        widx.insert(widx.end(), k, ~0u);
        wval.insert(wval.end(), k, -7.f);
        std::string what = "topk_rows " + std::to_string(rows) + "x" + std::to_string(cols) +
                           " k=" + std::to_string(k) + (masked ? " masked" : "") + (quant ? " ties" : "");
        close(idx, widx, 0, what + " indices");
        close(val, wval, 0, what + " values");
    }
    // Batch top-k on ReLU outputs with ties at the cut: the host's passes as cuda.rs.
    const int rows = 16, cols = 700;
    F x = rnd(rows * cols);
    for (auto& v : x) v = std::max(0.f, std::round(v * 8) / 8);
    const long long n = rows * cols;
    for (int total : {1, 128, 300}) {
        unsigned prefix = 0, sel = 0;
        unsigned long long need = total;
        for (int shift : {24, 16, 8, 0}) {
            std::vector<unsigned long long> hist(256, 0);
            emu_launch(grid_stride_cfg(), T256, [&] { radix_hist(x.data(), n, prefix, sel, shift, hist.data()); });
            unsigned long long seen = 0;
            int d = 255;
            while (d > 0 && seen + hist[d] < need) seen += hist[d--];
            prefix |= (unsigned)d << shift;
            sel |= 255u << shift;
            need -= seen;
        }
        size_t n_above = total - need;
        // Reference threshold: the total-th largest key.
        U keys;
        for (auto v : x) keys.push_back(key(v));
        std::sort(keys.rbegin(), keys.rend());
        expect(prefix == keys[total - 1], "radix_hist threshold total=" + std::to_string(total));
        U above(rows), ties(rows);
        emu_launch(rows_cfg(rows), T256, [&] { batch_count(x.data(), cols, prefix, above.data(), ties.data()); });
        U off = {0}, take;
        size_t left = total - n_above;
        for (int r = 0; r < rows; ++r) {
            unsigned tk = std::min<size_t>(ties[r], left);
            left -= tk;
            take.push_back(tk);
            off.push_back(off.back() + above[r] + tk);
        }
        U idx(off.back() + 64, ~0u);
        F val(off.back() + 64, -7.f);
        emu_launch(rows_cfg(rows), T1024, [&] { batch_write(x.data(), cols, prefix, off.data(), take.data(), idx.data(), val.data()); });
        // Reference: the positive entries in row-major order, by key, ties by position.
        std::vector<long long> order;
        for (long long i = 0; i < n; ++i) order.push_back(i);
        std::stable_sort(order.begin(), order.end(), [&](long long a, long long b) { return key(x[a]) > key(x[b]); });
        order.resize(total);
        std::sort(order.begin(), order.end());
        U widx;
        F wval;
        for (auto i : order)
            if (x[i] > 0) {
                widx.push_back(i % cols);
                wval.push_back(x[i]);
            }
        widx.insert(widx.end(), 64, ~0u);
        wval.insert(wval.end(), 64, -7.f);
        close(idx, widx, 0, "batch top-k indices total=" + std::to_string(total));
        close(val, wval, 0, "batch top-k values total=" + std::to_string(total));
    }
}

static void sparse() {
    const int rows = 131, m = 500, d = 96, k = 12;
    Csr a = random_csr(rows, m, k);
    const long long nnz = a.idx.size();
    F w = rnd(m * d), x = rnd(rows * d);
    // decode: out = beta out + alpha a @ w
    F out = rnd(rows * d), want = out;
    emu_launch(rows_cfg(rows), T256, [&] { csr_matmul(a.off.data(), a.idx.data(), a.val.data(), w.data(), d, 0.5f, 2.f, out.data()); });
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < d; ++c) {
            float acc = 0;
            for (unsigned e = a.off[r]; e < a.off[r + 1]; ++e) acc += a.val[e] * w[a.idx[e] * d + c];
            want[r * d + c] = 2.f * want[r * d + c] + 0.5f * acc;
        }
    close(out, want, 0, "csr_matmul");
    F sd(nnz), wsd(nnz);
    emu_launch(rows_cfg(rows), T256, [&] { csr_sampled_dot(a.off.data(), a.idx.data(), x.data(), w.data(), d, sd.data()); });
    for (int r = 0; r < rows; ++r)
        for (unsigned e = a.off[r]; e < a.off[r + 1]; ++e) {
            double acc = 0;
            for (int c = 0; c < d; ++c) acc += (double)x[r * d + c] * w[a.idx[e] * d + c];
            wsd[e] = acc;
        }
    close(sd, wsd, 1e-5, "csr_sampled_dot");
    F cd = rnd(m), wcd = cd;
    emu_launch(grid_stride_cfg(), T256, [&] { csr_col_dot(a.idx.data(), a.val.data(), sd.data(), nnz, -0.5f, cd.data()); });
    for (long long e = 0; e < nnz; ++e) wcd[a.idx[e]] += -0.5f * a.val[e] * sd[e];
    close(cd, wcd, 1e-6, "csr_col_dot");
    // The weight gradient through the CSC form, both layouts.
    U counts(m, 0), col_off(m + 1, 0), cursor(m, 0), crow(nnz);
    F cval(nnz);
    emu_launch(grid_stride_cfg(), T256, [&] { csr_col_count(a.idx.data(), nnz, counts.data()); });
    emu_launch({1, 1, 1}, T1024, [&] { exclusive_scan_u32(counts.data(), col_off.data(), m); });
    U wco = {0};
    for (int j = 0; j < m; ++j) wco.push_back(wco.back() + counts[j]);
    close(col_off, wco, 0, "exclusive_scan_u32");
    emu_launch(rows_cfg(rows), T256, [&] { csr_to_csc(a.off.data(), a.idx.data(), a.val.data(), col_off.data(), cursor.data(), crow.data(), cval.data()); });
    for (int t = 0; t < 2; ++t) {
        F g = rnd(m * d), wgr = g;
        float beta = t ? 0.f : 2.f;
        emu_launch(rows_cfg(m), T256, [&] { csc_t_matmul(col_off.data(), crow.data(), cval.data(), x.data(), d, m, t, 0.5f, beta, g.data()); });
        for (int j = 0; j < m; ++j)
            for (int c = 0; c < d; ++c) {
                long long o = t ? (long long)c * m + j : (long long)j * d + c;
                double acc = 0;
                for (int r = 0; r < rows; ++r)
                    for (unsigned e = a.off[r]; e < a.off[r + 1]; ++e)
                        if ((int)a.idx[e] == j) acc += 0.5 * a.val[e] * x[r * d + c];
                wgr[o] = (beta == 0 ? 0.f : beta * wgr[o]) + (float)acc;
            }
        close(g, wgr, 1e-6, t ? "csc_t_matmul transposed" : "csc_t_matmul");
    }
    // CSR helpers.
    F dense(rows * m, 7.f), wd(rows * m, 0.f);
    std::fill(dense.begin(), dense.end(), 0.f);
    emu_launch(rows_cfg(rows), T256, [&] { csr_to_dense(a.off.data(), a.idx.data(), a.val.data(), m, dense.data()); });
    for (int r = 0; r < rows; ++r)
        for (unsigned e = a.off[r]; e < a.off[r + 1]; ++e) wd[r * m + a.idx[e]] = a.val[e];
    close(dense, wd, 0, "csr_to_dense");
    F other = rnd(rows * m), gat(nnz), wgat(nnz);
    emu_launch(rows_cfg(rows), T256, [&] { csr_gather(a.off.data(), a.idx.data(), other.data(), m, gat.data()); });
    for (int r = 0; r < rows; ++r)
        for (unsigned e = a.off[r]; e < a.off[r + 1]; ++e) wgat[e] = other[r * m + a.idx[e]];
    close(gat, wgat, 0, "csr_gather");
    F sc = other, wsc = other;
    emu_launch(rows_cfg(rows), T256, [&] { csr_scatter_add(a.off.data(), a.idx.data(), a.val.data(), m, sc.data()); });
    for (int r = 0; r < rows; ++r)
        for (unsigned e = a.off[r]; e < a.off[r + 1]; ++e) wsc[r * m + a.idx[e]] += a.val[e];
    close(sc, wsc, 0, "csr_scatter_add");
    F vals = a.val, wvals = a.val, v = rnd(m);
    emu_launch(grid_stride_cfg(), T256, [&] { csr_scale_cols(a.idx.data(), vals.data(), v.data(), nnz); });
    for (long long e = 0; e < nnz; ++e) wvals[e] *= v[a.idx[e]];
    close(vals, wvals, 0, "csr_scale_cols");
    F zv = a.val;
    zv[0] = 0;
    F cc(m, 0.f), wcc(m, 0.f), rc(rows), wrc(rows, 0.f);
    emu_launch(grid_stride_cfg(), T256, [&] { csr_col_nnz(a.idx.data(), zv.data(), nnz, cc.data()); });
    long long nrows = rows;
    emu_launch(grid_stride_cfg(), T64, [&] { csr_row_nnz(a.off.data(), zv.data(), nrows, rc.data()); });
    for (int r = 0; r < rows; ++r)
        for (unsigned e = a.off[r]; e < a.off[r + 1]; ++e)
            if (zv[e] != 0) {
                wcc[a.idx[e]] += 1;
                wrc[r] += 1;
            }
    close(cc, wcc, 0, "csr_col_nnz");
    close(rc, wrc, 0, "csr_row_nnz");
}

int main() {
    elementwise();
    reductions();
    losses();
    selection();
    sparse();
    if (failures) {
        std::printf("%d check(s) failed\n", failures);
        return 1;
    }
    std::printf("all kernel checks passed\n");
    return 0;
}
