// The SAE hot path on CUDA: hand-written kernels, compiled at run time by NVRTC (no
// CUDA toolkit at build time). Row-major f32 throughout, matching the CPU backend:
// activations [rows, d_in], W_enc [d_in, d_sae], W_dec [d_sae, d_in], sparse latents as
// CSR (offsets [rows + 1], column indices ascending within a row, values), as
// kernels::Csr. The rest of the op API is in ops.cu, compiled with this file.
//
// Launch shapes are chosen by the host (kernels/src/cuda.rs); each kernel says which.

#define FULL_MASK 0xffffffffu

// ---------------------------------------------------------------------------------
// Top-k by radix select on order-preserving keys.

// Larger float -> larger unsigned key (NaN sorts above +inf and is never expected).
__device__ __forceinline__ unsigned int float_key(float f) {
    unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ unsigned int masked_key(const float* row, const float* mask, int c) {
    return (mask && !(mask[c] > 0.f)) ? 0u : float_key(row[c]);
}

// Block-wide exclusive prefix sum of one int per thread; returns the total.
// blockDim.x must be a multiple of 32 and at most 1024; `scratch` holds 33 ints.
__device__ int block_exclusive_scan(int v, int* scratch, int* total) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int x = v;
    for (int o = 1; o < 32; o <<= 1) {
        int y = __shfl_up_sync(FULL_MASK, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) scratch[warp] = x;
    __syncthreads();
    if (warp == 0) {
        int nw = blockDim.x >> 5;
        int w = lane < nw ? scratch[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
            int y = __shfl_up_sync(FULL_MASK, w, o);
            if (lane >= o) w += y;
        }
        if (lane < nw) scratch[lane] = w;  // inclusive sums of warps
        if (lane == nw - 1) scratch[32] = w;
    }
    __syncthreads();
    int before = (warp > 0 ? scratch[warp - 1] : 0) + x - v;
    *total = scratch[32];
    __syncthreads();
    return before;
}

// Per-row top-k (k <= cols). One block per row, blockDim 1024 (a multiple of 32).
// Finds the k-th largest key by 4 passes of 8-bit radix select, then writes the chosen
// latents in ascending index order; among equal values the lower indices win.
// With `mask` (may be null), columns where mask[c] <= 0 get the lowest key and never
// win (the host checks that at least k columns are allowed).
extern "C" __global__ void __launch_bounds__(1024) topk_rows(const float* x, int cols, int k,
                                                          const float* mask,
                                                          unsigned* out_idx, float* out_val) {
    __shared__ unsigned int hist[256];
    __shared__ unsigned int s_prefix, s_need;
    __shared__ int scratch[33];
    const float* row = x + (long long)blockIdx.x * cols;
    unsigned int prefix = 0, sel = 0, need = (unsigned int)k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            unsigned int key = masked_key(row, mask, c);
            if ((key & sel) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned int seen = 0;
            int d = 255;
            for (; d > 0; --d) {
                if (seen + hist[d] >= need) break;
                seen += hist[d];
            }
            s_prefix = prefix | ((unsigned int)d << shift);
            s_need = need - seen;
        }
        __syncthreads();
        prefix = s_prefix;
        need = s_need;
        sel |= 255u << shift;
    }
    // prefix is the k-th largest key; `need` of the elements equal to it are taken.
    int written = 0, ties_taken = 0;
    for (int base = 0; base < cols; base += blockDim.x) {
        int c = base + threadIdx.x;
        unsigned int key = c < cols ? masked_key(row, mask, c) : 0u;
        int tie = (c < cols && key == prefix) ? 1 : 0;
        int tie_total;
        int tie_before = block_exclusive_scan(tie, scratch, &tie_total);
        int take = (c < cols && key > prefix) ||
                   (tie && ties_taken + tie_before < (int)need);
        int take_total;
        int pos = block_exclusive_scan(take, scratch, &take_total);
        if (take) {
            long long o = (long long)blockIdx.x * k + written + pos;
            out_idx[o] = (unsigned)c;
            out_val[o] = row[c];
        }
        written += take_total;
        ties_taken += tie_total;
    }
}

// Histogram pass of a radix select over a whole array (batch top-k): counts the digit
// at `shift` of every key whose bits under `mask` equal `prefix`. Grid-stride; `hist`
// has 256 zeroed counters; the host picks the bucket and runs the next pass.
extern "C" __global__ void radix_hist(const float* x, long long n, unsigned int prefix,
                                      unsigned int mask, int shift,
                                      unsigned long long* hist) {
    __shared__ unsigned int local[256];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) local[i] = 0;
    __syncthreads();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        unsigned int key = float_key(x[i]);
        if ((key & mask) == prefix) atomicAdd(&local[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 256; i += blockDim.x)
        if (local[i]) atomicAdd(&hist[i], (unsigned long long)local[i]);
}

// ---------------------------------------------------------------------------------
// Sparse products over CSR latents (offsets[rows + 1], column indices, values), the
// device forms of the CPU ops csr_matmul, csr_sampled_dot and csr_col_dot (csr_t_matmul
// is in ops.cu): the decode and the backward touch the active latents only.

// x *= s (grid-stride; s == 0 writes zeros): ops::scale and the `beta` of csr_col_dot.
extern "C" __global__ void scale_inplace(float* x, long long n, float s) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] = s == 0.f ? 0.f : x[i] * s;
}

// x[r, c] += alpha * v[c] (grid-stride): the decoder bias.
extern "C" __global__ void add_row_vec(float* x, const float* v, long long n, int cols,
                                       float alpha) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] += alpha * v[i % cols];
}

// out[r, :] = beta * out[r, :] + alpha * sum_e val[e] * w[idx[e], :] over row r's
// entries (csr_matmul; the sparse decode). One block per row, threads over d.
extern "C" __global__ void csr_matmul(const unsigned* off, const unsigned* idx,
                                      const float* val, const float* w, int d,
                                      float alpha, float beta, float* out) {
    unsigned e0 = off[blockIdx.x], e1 = off[blockIdx.x + 1];
    float* o = out + (long long)blockIdx.x * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0.f;
        for (unsigned e = e0; e < e1; ++e) acc += val[e] * w[(long long)idx[e] * d + c];
        o[c] = (beta == 0.f ? 0.f : beta * o[c]) + alpha * acc;
    }
}

// out[e] = x[r, :] . w[idx[e], :] for each entry e of row r (csr_sampled_dot; the
// gradient at the active latents). One block per row, one warp per entry.
extern "C" __global__ void csr_sampled_dot(const unsigned* off, const unsigned* idx,
                                           const float* x, const float* w, int d,
                                           float* out) {
    unsigned e0 = off[blockIdx.x], e1 = off[blockIdx.x + 1];
    const float* xr = x + (long long)blockIdx.x * d;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (unsigned e = e0 + warp; e < e1; e += nw) {
        const float* wr = w + (long long)idx[e] * d;
        float acc = 0.f;
        for (int c = lane; c < d; c += 32) acc += xr[c] * wr[c];
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(FULL_MASK, acc, o);
        if (lane == 0) out[e] = acc;
    }
}

// out[idx[e]] += alpha * val[e] * (other ? other[e] : 1) (csr_col_dot after
// scale_inplace by beta; the encoder-bias gradient). Grid-stride over the entries.
extern "C" __global__ void csr_col_dot(const unsigned* idx, const float* val,
                                       const float* other, long long nnz, float alpha,
                                       float* out) {
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < nnz;
         e += (long long)gridDim.x * blockDim.x)
        atomicAdd(&out[idx[e]], alpha * val[e] * (other ? other[e] : 1.f));
}

// ---------------------------------------------------------------------------------
// Optimizer.

// torch.optim.Adam (no weight decay, no amsgrad) on one parameter, operation for
// operation as the CPU backend does it (m by torch's lerp, which switches formula at
// |w| = 0.5), with explicit round-to-nearest intrinsics so that no multiply-add is
// fused: the result is bit-identical to the CPU's. The gradient is first scaled by
// `clip` (torch clip_grad_norm_'s factor; 1 when not clipping).
// step_size = lr / (1 - b1^t), w = 1 - b1, bc2_sqrt = sqrt(1 - b2^t), all from f64.
extern "C" __global__ void adam_step(float* p, const float* g, float* m, float* v,
                                     long long n, float step_size, float w, float b2,
                                     float one_minus_b2, float eps, float bc2_sqrt,
                                     float clip) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float gi = clip == 1.f ? g[i] : __fmul_rn(g[i], clip);
        float mi = m[i];
        mi = fabsf(w) < 0.5f
                 ? __fadd_rn(mi, __fmul_rn(w, __fsub_rn(gi, mi)))
                 : __fsub_rn(gi, __fmul_rn(__fsub_rn(gi, mi), __fsub_rn(1.f, w)));
        float vi = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(one_minus_b2, gi), gi));
        m[i] = mi;
        v[i] = vi;
        float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
        p[i] = __fadd_rn(p[i], __fdiv_rn(__fmul_rn(-step_size, mi), denom));
    }
}
