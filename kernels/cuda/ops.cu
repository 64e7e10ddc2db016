// The rest of the op API on CUDA (kernels/src/ops.rs): element-wise ops, row and column
// reductions, the sparsity losses and their backwards, batch top-k's compaction and the
// small CSR helpers. Appended to sae.cu by kernels/src/cuda.rs (one NVRTC program), so
// float_key, block_sum and block_exclusive_scan come from there.
//
// Launch shapes, as the host (kernels/src/cuda.rs) uses them:
//   grid-stride: any grid, n elements;
//   per row: one block per row, blockDim a multiple of 32;
//   column chunks: grid (ceil(cols / blockDim.x), ceil(rows / COL_CHUNK)), one thread per
//   column looping over its chunk of rows (coalesced), one atomic per thread per chunk.
// Column sums accumulate in double scratch buffers the host adds into the f32 output,
// as the CPU backend accumulates in f64.

#define COL_CHUNK 64
// A column-chunk thread's column, and a loop over its block's chunk of rows.
#define CHUNK_COL ((int)(blockIdx.x * blockDim.x + threadIdx.x))
#define FOR_CHUNK_ROWS(r)                                                            \
    for (int r = blockIdx.y * COL_CHUNK, r##_end = min(rows, r + COL_CHUNK); r < r##_end; \
         ++r)
#define GRID_STRIDE(i, n)                                                        \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); \
         i += (long long)gridDim.x * blockDim.x)

__device__ __forceinline__ double block_sum_d(double v, double* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(FULL_MASK, v, o);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int nw = (blockDim.x + 31) >> 5;
    v = threadIdx.x < nw ? scratch[threadIdx.x] : 0.0;
    if (warp == 0)
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(FULL_MASK, v, o);
    __syncthreads();
    return v;  // valid in thread 0
}

// The JumpReLU straight-through estimator's rectangle kernel.
__device__ __forceinline__ float rectangle(float x) { return (x > -0.5f && x < 0.5f) ? 1.f : 0.f; }

// ---------------------------------------------------------------------------------
// Element-wise.

extern "C" __global__ void fill_f32(float* x, long long n, float v) {
    GRID_STRIDE(i, n) x[i] = v;
}

// bf16 bits of x, rounded to nearest even (NaN stays a quiet NaN): the inputs of the
// bf16 GEMMs.
extern "C" __global__ void f32_to_bf16(const float* x, unsigned short* y, long long n) {
    GRID_STRIDE(i, n) {
        unsigned u = __float_as_uint(x[i]);
        if ((u & 0x7fffffffu) > 0x7f800000u) y[i] = (unsigned short)((u >> 16) | 0x40u);
        else y[i] = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
}

// y += alpha * x
extern "C" __global__ void axpy_f32(float* y, const float* x, long long n, float alpha) {
    GRID_STRIDE(i, n) y[i] += alpha * x[i];
}

// y *= x
extern "C" __global__ void mul_f32(float* y, const float* x, long long n) {
    GRID_STRIDE(i, n) y[i] *= x[i];
}

extern "C" __global__ void exp_f32(const float* x, float* out, long long n) {
    GRID_STRIDE(i, n) out[i] = expf(x[i]);
}

extern "C" __global__ void tanh_f32(float* x, long long n) {
    GRID_STRIDE(i, n) x[i] = tanhf(x[i]);
}

// x[r, c] *= v[c]
extern "C" __global__ void mul_row_vec(float* x, const float* v, long long n, int cols) {
    GRID_STRIDE(i, n) x[i] *= v[i % cols];
}

// x[r, :] = x[r, :] * scale[r] + shift[r]
extern "C" __global__ void row_affine(float* x, const float* scale, const float* shift,
                                      long long n, int cols) {
    GRID_STRIDE(i, n) {
        long long r = i / cols;
        x[i] = x[i] * scale[r] + shift[r];
    }
}

// dst[r, :] += c[r] * src[r, :]
extern "C" __global__ void add_scaled_rows(float* dst, const float* src, const float* c,
                                           long long n, int cols) {
    GRID_STRIDE(i, n) {
        float k = c[i / cols];
        if (k != 0.f) dst[i] += k * src[i];
    }
}

extern "C" __global__ void relu_f32(const float* h, float* f, long long n) {
    GRID_STRIDE(i, n) f[i] = fmaxf(h[i], 0.f);
}

// dh = df * (h > 0)
extern "C" __global__ void relu_backward(const float* h, const float* df, float* dh,
                                         long long n) {
    GRID_STRIDE(i, n) dh[i] = h[i] > 0.f ? df[i] : 0.f;
}

// x *= (g > 0); a NaN gate closes.
extern "C" __global__ void mask_positive(float* x, const float* g, long long n) {
    GRID_STRIDE(i, n) if (!(g[i] > 0.f)) x[i] = 0.f;
}

// f = h * (h > t[c])
extern "C" __global__ void jumprelu(const float* h, const float* t, float* f, long long n,
                                    int cols) {
    GRID_STRIDE(i, n) {
        float v = h[i];
        f[i] = v > t[i % cols] ? v : 0.f;
    }
}

// out = (p - t)^2 * w[r] (w = 1 when null)
extern "C" __global__ void sq_err(const float* p, const float* t, const float* w, float* out,
                                  long long n, int cols) {
    GRID_STRIDE(i, n) {
        float d = p[i] - t[i];
        out[i] = d * d * (w ? w[i / cols] : 1.f);
    }
}

// out = a / (b + eps)
extern "C" __global__ void div_eps(const float* a, const float* b, float eps, float* out,
                                   long long n) {
    GRID_STRIDE(i, n) out[i] = a[i] / (b[i] + eps);
}

// dh = df * (1 - tanh(h)^2) * (h > 0)
extern "C" __global__ void tanh_relu_backward(const float* h, const float* df, float* dh,
                                              long long n) {
    GRID_STRIDE(i, n) {
        float v = h[i];
        float t = tanhf(v);
        dh[i] = v > 0.f ? df[i] * (1.f - t * t) : 0.f;
    }
}

// dst[r, :] = src[r, start : start + dst_cols]
extern "C" __global__ void copy_cols(const float* src, int src_cols, int start, float* dst,
                                     int dst_cols, long long n) {
    GRID_STRIDE(i, n) {
        long long r = i / dst_cols;
        dst[i] = src[r * src_cols + start + i % dst_cols];
    }
}

// dst[r, start : start + src_cols] += src[r, :]
extern "C" __global__ void add_cols(float* dst, int dst_cols, int start, const float* src,
                                    int src_cols, long long n) {
    GRID_STRIDE(i, n) {
        long long r = i / src_cols;
        dst[r * dst_cols + start + i % src_cols] += src[i];
    }
}

// dst = beta * dst + alpha * (float)src (beta 0 ignores dst): a double column
// accumulator into its f32 output, rounded as the CPU backend rounds it.
extern "C" __global__ void add_f64(float* dst, const double* src, long long n, float alpha,
                                   float beta) {
    GRID_STRIDE(i, n) dst[i] = (beta == 0.f ? 0.f : beta * dst[i]) + alpha * (float)src[i];
}

// ---------------------------------------------------------------------------------
// Whole-array reductions into one zeroed double (or unsigned) on the device.

// Sum of x (of x^2 when `square`).
extern "C" __global__ void sum_f64(const float* x, long long n, int square, double* out) {
    __shared__ double scratch[32];
    double acc = 0.0;
    GRID_STRIDE(i, n) acc += square ? (double)x[i] * x[i] : (double)x[i];
    acc = block_sum_d(acc, scratch);
    if (threadIdx.x == 0) atomicAdd(out, acc);
}

// sum w * (p - t)^2 element-wise; g = gscale * 2 w (p - t) when g is given.
extern "C" __global__ void weighted_sq_err(const float* p, const float* t, const float* w,
                                           float gscale, float* g, long long n,
                                           double* out) {
    __shared__ double scratch[32];
    double acc = 0.0;
    GRID_STRIDE(i, n) {
        float d = p[i] - t[i];
        acc += (double)(w[i] * d * d);
        if (g) g[i] = gscale * 2.f * w[i] * d;
    }
    acc = block_sum_d(acc, scratch);
    if (threadIdx.x == 0) atomicAdd(out, acc);
}

// The bits of the smallest positive value (positive floats order as their bits); the
// host starts `out` at +inf's bits.
extern "C" __global__ void min_positive(const float* x, long long n, unsigned* out) {
    unsigned best = 0x7f800000u;
    GRID_STRIDE(i, n) {
        float v = x[i];
        if (v > 0.f) best = min(best, __float_as_uint(v));
    }
    for (int o = 16; o > 0; o >>= 1) best = min(best, __shfl_down_sync(FULL_MASK, best, o));
    if ((threadIdx.x & 31) == 0) atomicMin(out, best);
}

// ---------------------------------------------------------------------------------
// Row reductions: one block per row.

// mode 0: ||x[r]||_2; 1: x[r] . y[r]; 2: #nonzero x[r]; 3: #{c : x[r, c] > y[c]}.
extern "C" __global__ void row_reduce(const float* x, const float* y, int cols, int mode,
                                      float* out) {
    __shared__ double scratch[32];
    long long base = (long long)blockIdx.x * cols;
    double acc = 0.0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = x[base + c];
        if (mode == 0) acc += (double)v * v;
        else if (mode == 1) acc += (double)v * y[base + c];
        else if (mode == 2) acc += v != 0.f ? 1.0 : 0.0;
        else acc += v > y[c] ? 1.0 : 0.0;
    }
    acc = block_sum_d(acc, scratch);
    if (threadIdx.x == 0) out[blockIdx.x] = (float)(mode == 0 ? sqrt(acc) : acc);
}

// Mean and unbiased standard deviation of each row (two passes, in double).
extern "C" __global__ void row_mean_std(const float* x, int cols, float* mean, float* sd) {
    __shared__ double scratch[32];
    __shared__ double s_mu;
    const float* row = x + (long long)blockIdx.x * cols;
    double acc = 0.0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) acc += row[c];
    acc = block_sum_d(acc, scratch);
    if (threadIdx.x == 0) s_mu = acc / cols;
    __syncthreads();
    double mu = s_mu, ss = 0.0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        double d = row[c] - mu;
        ss += d * d;
    }
    ss = block_sum_d(ss, scratch);
    if (threadIdx.x == 0) {
        mean[blockIdx.x] = (float)mu;
        sd[blockIdx.x] = (float)sqrt(ss / (cols - 1.0));
    }
}

// out[r] = ||x[r, :] - mu||_2 with mu the column means.
extern "C" __global__ void centered_row_norms(const float* x, const float* mu, int cols,
                                              float* out) {
    __shared__ double scratch[32];
    const float* row = x + (long long)blockIdx.x * cols;
    double acc = 0.0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        double d = row[c] - mu[c];
        acc += d * d;
    }
    acc = block_sum_d(acc, scratch);
    if (threadIdx.x == 0) out[blockIdx.x] = (float)sqrt(acc);
}

// Squared error of row r, weighted by w[r] (1 when null), added to `total`; writes
// g = gscale * 2 w[r] (p - t) when g is given.
extern "C" __global__ void mse_rows(const float* p, const float* t, const float* w,
                                    float gscale, float* g, int cols, double* total) {
    __shared__ double scratch[32];
    long long base = (long long)blockIdx.x * cols;
    float wr = w ? w[blockIdx.x] : 1.f;
    double acc = 0.0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float d = p[base + c] - t[base + c];
        acc += (double)d * d;
        if (g) g[base + c] = gscale * 2.f * wr * d;
    }
    acc = block_sum_d(acc, scratch);
    if (threadIdx.x == 0) atomicAdd(total, acc * wr);
}

// norms[r] = ||f[r, :] * n||_p (n = 1 when null), in double.
extern "C" __global__ void lp_norms(const float* f, const float* nrm, float p, int cols,
                                    double* norms) {
    __shared__ double scratch[32];
    long long base = (long long)blockIdx.x * cols;
    double acc = 0.0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float w = f[base + c] * (nrm ? nrm[c] : 1.f);
        if (p == 1.f) acc += fabsf(w);
        else if (p == 2.f) acc += (double)w * w;
        else acc += pow((double)fabsf(w), (double)p);
    }
    acc = block_sum_d(acc, scratch);
    if (threadIdx.x == 0)
        norms[blockIdx.x] = p == 1.f ? acc : p == 2.f ? sqrt(acc) : pow(acc, 1.0 / p);
}

// ---------------------------------------------------------------------------------
// Column reductions over row chunks (see the top of the file).

// out[c] += (mode 0: sum of x[:, c]; 1: number of nonzero x[:, c]), in double.
extern "C" __global__ void col_reduce(const float* x, int rows, int cols, int mode,
                                      double* out) {
    int c = CHUNK_COL;
    if (c >= cols) return;
    double acc = 0.0;
    FOR_CHUNK_ROWS(r) {
        float v = x[(long long)r * cols + c];
        acc += mode == 0 ? (double)v : (v != 0.f ? 1.0 : 0.0);
    }
    atomicAdd(&out[c], acc);
}

// JumpReLU backward: dh += df (h > t) (+ the estimator when ste_to_input);
// dt_acc[c] -= sum_r (t/bw) rect((h - t)/bw) df.
extern "C" __global__ void jumprelu_backward(const float* h, const float* t, const float* df,
                                             float bw, int ste_to_input, float* dh,
                                             double* dt_acc, int rows, int cols) {
    int c = CHUNK_COL;
    if (c >= cols) return;
    float tv = t[c];
    double acc = 0.0;
    FOR_CHUNK_ROWS(r) {
        long long i = (long long)r * cols + c;
        float hv = h[i], g = df[i];
        float ste = (tv / bw) * rectangle((hv - tv) / bw) * g;
        acc -= ste;
        float d = hv > tv ? g : 0.f;
        if (ste_to_input) d += ste;
        dh[i] += d;
    }
    atomicAdd(&dt_acc[c], acc);
}

// Backward of the step (h > t) given g[r]: ste = (1/bw) rect((h - t)/bw) g[r];
// dt_acc[c] -= sum_r ste; dh += ste when ste_to_input.
extern "C" __global__ void step_backward(const float* h, const float* t, const float* g,
                                         float bw, int ste_to_input, float* dh,
                                         double* dt_acc, int rows, int cols) {
    int c = CHUNK_COL;
    if (c >= cols) return;
    float tv = t[c], inv_bw = 1.f / bw;
    double acc = 0.0;
    FOR_CHUNK_ROWS(r) {
        long long i = (long long)r * cols + c;
        float ste = inv_bw * rectangle((h[i] - tv) / bw) * g[r];
        acc -= ste;
        if (ste_to_input) dh[i] += ste;
    }
    atomicAdd(&dt_acc[c], acc);
}

// tanh penalty: total += sum tanh(s f n[c]); df += c (1 - th^2) s n[c];
// dn_acc[c] += sum_r c (1 - th^2) s f.
extern "C" __global__ void tanh_sparsity(const float* f, const float* nrm, float s,
                                         float coef, float* df, double* dn_acc,
                                         double* total, int rows, int cols) {
    __shared__ double scratch[32];
    int c = CHUNK_COL;
    double tot = 0.0, acc = 0.0;
    if (c < cols) {
        float nc = nrm[c];
        FOR_CHUNK_ROWS(r) {
            long long i = (long long)r * cols + c;
            float th = tanhf(s * f[i] * nc);
            tot += th;
            float du = coef * (1.f - th * th);
            df[i] += du * s * nc;
            acc += du * s * f[i];
        }
        atomicAdd(&dn_acc[c], acc);
    }
    tot = block_sum_d(tot, scratch);
    if (threadIdx.x == 0) atomicAdd(total, tot);
}

// Gradient of sum_r ||f[r] * n||_p given the row norms: dw = sign(w) |w|^(p-1) /
// norm^(p-1) (sign(w) for p = 1; zero rows get none for p != 1); df += coef dw n[c];
// dn_acc[c] += sum_r coef dw f (when dn_acc is given).
extern "C" __global__ void lp_backward(const float* f, const float* nrm, const double* norms,
                                       float p, float coef, float* df, double* dn_acc,
                                       int rows, int cols) {
    int c = CHUNK_COL;
    if (c >= cols) return;
    float nc = nrm ? nrm[c] : 1.f;
    double acc = 0.0;
    FOR_CHUNK_ROWS(r) {
        double norm = norms[r];
        if (norm == 0.0 && p != 1.f) continue;
        long long i = (long long)r * cols + c;
        float w = f[i] * nc;
        float sg = copysignf(1.f, w);  // Rust's signum: +-1 for +-0
        float dw = p == 1.f ? (w != 0.f ? sg : 0.f)
                            : (float)(sg * pow((double)fabsf(w), (double)p - 1.0) /
                                      pow(norm, (double)p - 1.0));
        float g = coef * dw;
        df[i] += g * nc;
        acc += g * f[i];
    }
    if (dn_acc) atomicAdd(&dn_acc[c], acc);
}

// Pre-activation loss on dead latents: u = t[c] - h; where u > 0 and dead[c] != 0:
// total += u dead n; dh -= coef dead n; dt_acc += coef dead n; dn_acc += coef u dead.
extern "C" __global__ void pre_act_loss(const float* h, const float* t, const float* dead,
                                        const float* nrm, float coef, float* dh,
                                        double* dt_acc, double* dn_acc, double* total,
                                        int rows, int cols) {
    __shared__ double scratch[32];
    int c = CHUNK_COL;
    double tot = 0.0;
    if (c < cols && dead[c] != 0.f) {
        float tc = t[c], dc = dead[c], nc = nrm[c];
        double at = 0.0, an = 0.0;
        FOR_CHUNK_ROWS(r) {
            long long i = (long long)r * cols + c;
            float u = tc - h[i];
            if (u > 0.f) {
                tot += u * dc * nc;
                float g = coef * dc * nc;
                dh[i] -= g;
                at += g;
                an += coef * u * dc;
            }
        }
        atomicAdd(&dt_acc[c], at);
        atomicAdd(&dn_acc[c], an);
    }
    tot = block_sum_d(tot, scratch);
    if (threadIdx.x == 0) atomicAdd(total, tot);
}

// ---------------------------------------------------------------------------------
// Batch top-k: after the threshold key is known (radix_hist passes), count each row's
// positive entries above and at the threshold, then write the chosen ones in column
// order (the host hands out the ties in row-major order, as the CPU does).

// One block per row.
extern "C" __global__ void batch_count(const float* x, int cols, unsigned thr,
                                       unsigned* above, unsigned* ties) {
    __shared__ double scratch[32];
    const float* row = x + (long long)blockIdx.x * cols;
    double a = 0.0, t = 0.0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = row[c];
        if (v > 0.f) {
            unsigned k = float_key(v);
            a += k > thr ? 1.0 : 0.0;
            t += k == thr ? 1.0 : 0.0;
        }
    }
    a = block_sum_d(a, scratch);
    t = block_sum_d(t, scratch);
    if (threadIdx.x == 0) {
        above[blockIdx.x] = (unsigned)a;
        ties[blockIdx.x] = (unsigned)t;
    }
}

// One block per row, blockDim 1024 (block_exclusive_scan's limits): writes the positive
// entries with key > thr and the first take_ties[r] with key == thr, columns ascending,
// from off[r].
extern "C" __global__ void __launch_bounds__(1024) batch_write(const float* x, int cols,
                                                            unsigned thr, const unsigned* off,
                                                            const unsigned* take_ties,
                                                            unsigned* out_idx,
                                                            float* out_val) {
    __shared__ int scratch[33];
    const float* row = x + (long long)blockIdx.x * cols;
    int want_ties = (int)take_ties[blockIdx.x];
    long long o0 = off[blockIdx.x];
    int written = 0, ties_seen = 0;
    for (int base = 0; base < cols; base += blockDim.x) {
        int c = base + threadIdx.x;
        float v = c < cols ? row[c] : 0.f;
        unsigned k = float_key(v);
        int pos_v = v > 0.f;
        int tie = pos_v && k == thr;
        int tie_total;
        int tie_before = block_exclusive_scan(tie, scratch, &tie_total);
        int take = (pos_v && k > thr) || (tie && ties_seen + tie_before < want_ties);
        int take_total;
        int pos = block_exclusive_scan(take, scratch, &take_total);
        if (take) {
            out_idx[o0 + written + pos] = (unsigned)c;
            out_val[o0 + written + pos] = v;
        }
        written += take_total;
        ties_seen += tie_total;
    }
}

// ---------------------------------------------------------------------------------
// The weight gradients of a sparse layer, out = beta * out + alpha * A^T @ x (A a CSR
// [rows, m], x [rows, d], out [m, d] or [d, m] when transposed), with no atomics on the
// output: A is first turned into its CSC form (each latent's (row, value) entries, in
// no particular order) by a counting sort, then one block per latent sums its rows of x.

// counts[idx[e]] += 1 (grid-stride; counts zeroed).
extern "C" __global__ void csr_col_count(const unsigned* idx, long long nnz, unsigned* counts) {
    GRID_STRIDE(e, nnz) atomicAdd(&counts[idx[e]], 1u);
}

// off[i] = sum of in[0..i] for i <= n (off has n + 1 entries). One block of 1024 threads.
extern "C" __global__ void __launch_bounds__(1024) exclusive_scan_u32(const unsigned* in,
                                                                   unsigned* off, int n) {
    __shared__ int scratch[33];
    unsigned running = 0;
    for (int base = 0; base < n; base += blockDim.x) {
        int i = base + threadIdx.x;
        int total;
        int before = block_exclusive_scan(i < n ? (int)in[i] : 0, scratch, &total);
        if (i < n) off[i] = running + (unsigned)before;
        running += (unsigned)total;
    }
    if (threadIdx.x == 0) off[n] = running;
}

// Each entry of row r (one block per row) into its column's segment of the CSC form.
extern "C" __global__ void csr_to_csc(const unsigned* off, const unsigned* idx,
                                      const float* val, const unsigned* col_off,
                                      unsigned* cursor, unsigned* csc_row, float* csc_val) {
    for (unsigned e = off[blockIdx.x] + threadIdx.x; e < off[blockIdx.x + 1]; e += blockDim.x) {
        unsigned j = idx[e];
        unsigned p = col_off[j] + atomicAdd(&cursor[j], 1u);
        csc_row[p] = blockIdx.x;
        csc_val[p] = val[e];
    }
}

// One block per latent j, threads over d: out[j] (a row, or a column when transposed)
// = beta * out[j] + sum over j's entries (alpha * v) x[r, :].
extern "C" __global__ void csc_t_matmul(const unsigned* col_off, const unsigned* csc_row,
                                        const float* csc_val, const float* x, int d, int m,
                                        int transposed, float alpha, float beta, float* out) {
    unsigned e0 = col_off[blockIdx.x], e1 = col_off[blockIdx.x + 1];
    long long j = blockIdx.x;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        long long o = transposed ? (long long)c * m + j : j * d + c;
        float acc = 0.f;
        for (unsigned e = e0; e < e1; ++e) acc += (alpha * csc_val[e]) * x[(long long)csc_row[e] * d + c];
        out[o] = (beta == 0.f ? 0.f : beta * out[o]) + acc;
    }
}

// ---------------------------------------------------------------------------------
// CSR helpers (offsets[rows + 1], column indices, values). Per row: one block per row.

// out[r, idx[e]] = val[e] (out zeroed by the host first).
extern "C" __global__ void csr_to_dense(const unsigned* off, const unsigned* idx,
                                        const float* val, int cols, float* out) {
    long long base = (long long)blockIdx.x * cols;
    for (unsigned e = off[blockIdx.x] + threadIdx.x; e < off[blockIdx.x + 1]; e += blockDim.x)
        out[base + idx[e]] = val[e];
}

// out[e] = dense[r, idx[e]]
extern "C" __global__ void csr_gather(const unsigned* off, const unsigned* idx,
                                      const float* dense, int cols, float* out) {
    long long base = (long long)blockIdx.x * cols;
    for (unsigned e = off[blockIdx.x] + threadIdx.x; e < off[blockIdx.x + 1]; e += blockDim.x)
        out[e] = dense[base + idx[e]];
}

// dense[r, idx[e]] += val[e] (a row's columns are distinct: no races).
extern "C" __global__ void csr_scatter_add(const unsigned* off, const unsigned* idx,
                                           const float* val, int cols, float* dense) {
    long long base = (long long)blockIdx.x * cols;
    for (unsigned e = off[blockIdx.x] + threadIdx.x; e < off[blockIdx.x + 1]; e += blockDim.x)
        dense[base + idx[e]] += val[e];
}

// val[e] *= v[idx[e]] (grid-stride over the entries).
extern "C" __global__ void csr_scale_cols(const unsigned* idx, float* val, const float* v,
                                          long long nnz) {
    GRID_STRIDE(e, nnz) val[e] *= v[idx[e]];
}

// out[idx[e]] += 1 for each nonzero value (out zeroed first; grid-stride).
extern "C" __global__ void csr_col_nnz(const unsigned* idx, const float* val, long long nnz,
                                       float* out) {
    GRID_STRIDE(e, nnz) if (val[e] != 0.f) atomicAdd(&out[idx[e]], 1.f);
}

// out[r] = number of nonzero values in row r (grid-stride over rows).
extern "C" __global__ void csr_row_nnz(const unsigned* off, const float* val, long long rows,
                                       float* out) {
    GRID_STRIDE(r, rows) {
        int n = 0;
        for (unsigned e = off[r]; e < off[r + 1]; ++e) n += val[e] != 0.f;
        out[r] = (float)n;
    }
}
