/* Sparse direct convolution over kept stripes (SWP), CPU, float32.
 *
 * Compiled on first use by prunekit/nn/stripe_native.py (gcc/cc -O3 -march=native -fopenmp)
 * and called through ctypes; no Python or torch headers, so it builds in well under a second.
 *
 * Layout ("flat grid"): the input is repacked channel-major with the batch folded into the
 * rows, B[phase][c][q], q = (n * rows_per_image + r) * row_len + col, so that every kernel tap
 * (i, j) of every output position q reads B[phase(t)][c][q + shift(t)]: a kernel tap is a
 * constant offset. Stride 1 shares padding between neighbouring rows/images (p zero columns
 * after each row, p zero rows after each image), stride s > 1 splits the padded input into s*s
 * phases. Output positions q that are not real outputs (padding columns/rows) are computed and
 * dropped: 6-27% extra work on CIFAR maps.
 *
 * Work: output positions in blocks of BL = 64; per block, the kept stripes are processed
 * tap-major in chunks of FC filters that all keep that tap, so every loaded input vector feeds
 * FC * NV fused multiply-adds held in registers (no scatter, no materialised shifted copy).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float vec __attribute__((vector_size(64)));  /* 16 floats; split by the compiler if needed */
#ifndef NV
#define NV 4            /* vectors per block */
#endif
#define BL (16 * NV)    /* output positions per block */
#ifndef FC
#define FC 4            /* filters per chunk */
#endif

static inline vec vload(const float* p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float* p, vec v) { memcpy(p, &v, sizeof v); }

int prunekit_stripe_block(void) { return BL; }
int prunekit_stripe_chunk(void) { return FC; }

/* x: [N, C, H, W] -> B (length >= lead + P * C * plane + tail; this writes every position a real
 * output reads, padding zeros included, so B need not be zeroed; the rest is only ever read
 * for outputs that are dropped):
 * stride 1 (P = 1): row_len = W + p, rows_per_image = H + p, data of image n row h at
 *   lead + c * plane + (p + n * (H + p) + h) * row_len (columns 0..W-1, then p zeros), p zero
 *   rows on top of each channel plane and after each image, lead zeros before B's first plane;
 * stride s (P = s * s): hq = ceil((H + 2p) / s), wq = ceil((W + 2p) / s), padded pixel
 *   (r, col) = (h + p, w + p) goes to phase (r % s, col % s), row n * hq + r / s, column col / s,
 *   and phase positions outside the image are zero. */
static void stripe_pack(const float* x, float* B, int64_t N, int64_t C, int64_t H, int64_t W,
                          int64_t s, int64_t p, int64_t lead, int64_t plane, int64_t rows_per_image,
                          int64_t row_len, int threads) {
    memset(B, 0, sizeof(float) * lead);
    if (s == 1) {
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t c = 0; c < C; c++)
            memset(B + lead + c * plane, 0, sizeof(float) * p * row_len);  /* top rows */
        #pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
        for (int64_t n = 0; n < N; n++)
            for (int64_t c = 0; c < C; c++) {
                const float* src = x + (n * C + c) * H * W;
                float* dst = B + lead + c * plane + (p + n * rows_per_image) * row_len;
                for (int64_t h = 0; h < H; h++) {
                    memcpy(dst + h * row_len, src + h * W, sizeof(float) * W);
                    memset(dst + h * row_len + W, 0, sizeof(float) * (row_len - W));
                }
                memset(dst + H * row_len, 0, sizeof(float) * (rows_per_image - H) * row_len);
            }
        return;
    }
    /* phase (a, b), phase row r, phase column q <- padded pixel (r * s + a, q * s + b) */
    #pragma omp parallel for collapse(3) schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t a = 0; a < s; a++) {
                const float* src = x + (n * C + c) * H * W;
                for (int64_t b = 0; b < s; b++) {
                    float* dst = B + lead + ((a * s + b) * C + c) * plane
                                 + n * rows_per_image * row_len;
                    int64_t q_lo = (p - b + s - 1) / s;                /* first q with w >= 0 */
                    int64_t q_hi = (W + p - b + s - 1) / s;            /* first q with w >= W */
                    if (q_hi > row_len) q_hi = row_len;
                    if (q_lo > q_hi) q_lo = q_hi;
                    for (int64_t r = 0; r < rows_per_image; r++) {
                        float* out = dst + r * row_len;
                        const int64_t h = r * s + a - p;
                        if (h < 0 || h >= H) {
                            memset(out, 0, sizeof(float) * row_len);
                            continue;
                        }
                        const float* row = src + h * W + b - p;
                        memset(out, 0, sizeof(float) * q_lo);
                        if (s == 2)  /* a constant stride lets the compiler vectorise */
                            for (int64_t q = q_lo; q < q_hi; q++) out[q] = row[2 * q];
                        else
                            for (int64_t q = q_lo; q < q_hi; q++) out[q] = row[q * s];
                        memset(out + q_hi, 0, sizeof(float) * (row_len - q_hi));
                    }
                }
            }
}

/* chunks k = 0..nchunks-1: input offset chunk_off[k] (relative to B + lead, may be negative
 * down to -lead), FC filter indices chunk_filt[k * FC + j] (F = a dummy row for padding),
 * weights chunk_w[(k * C + c) * FC + j]. Block b covers q in [b * BL, (b + 1) * BL); its real
 * outputs are the runs run_start[b] .. run_start[b + 1] - 1: (q, dest, len), written to
 * out[dest + f * out_fstride + j] for j < len (out is NCHW, dest includes n * F * Ho * Wo). */
static void stripe_conv(const float* B, int64_t lead, const float* chunk_w,
                          const int64_t* chunk_off, const int32_t* chunk_filt, int64_t nchunks,
                          const float* bias, int64_t C, int64_t plane, int64_t F, int64_t nblocks,
                          const int64_t* run_start, const int64_t* run_q, const int64_t* run_dest,
                          const int64_t* run_len, float* out, int64_t out_fstride, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        float* acc = aligned_alloc(64, sizeof(float) * BL * (F + 1));
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; b++) {
            if (run_start[b] == run_start[b + 1]) continue;  /* padding only */
            const int64_t q0 = b * BL;
            for (int64_t f = 0; f <= F; f++) {
                const float bv = (bias && f < F) ? bias[f] : 0.0f;
                for (int k = 0; k < BL; k++) acc[f * BL + k] = bv;
            }
            const float* base = B + lead + q0;
            for (int64_t k = 0; k < nchunks; k++) {
                vec r[FC][NV];
                for (int j = 0; j < FC; j++)
                    for (int v = 0; v < NV; v++) r[j][v] = (vec){0};
                const float* xs = base + chunk_off[k];
                const float* wk = chunk_w + k * C * FC;
                for (int64_t c = 0; c < C; c++) {
                    vec xv[NV];
                    for (int v = 0; v < NV; v++) xv[v] = vload(xs + c * plane + 16 * v);
                    for (int j = 0; j < FC; j++) {
                        const float wj = wk[c * FC + j];
                        for (int v = 0; v < NV; v++) r[j][v] += wj * xv[v];
                    }
                }
                for (int j = 0; j < FC; j++) {
                    float* a = acc + (int64_t)chunk_filt[k * FC + j] * BL;
                    for (int v = 0; v < NV; v++) vstore(a + 16 * v, vload(a + 16 * v) + r[j][v]);
                }
            }
            for (int64_t u = run_start[b]; u < run_start[b + 1]; u++) {
                const int64_t q = run_q[u] - q0, len = run_len[u];
                for (int64_t f = 0; f < F; f++)
                    memcpy(out + run_dest[u] + f * out_fstride, acc + f * BL + q, sizeof(float) * len);
            }
        }
        free(acc);
    }
}

/* Everything about one (conv, input shape) pair that does not change between calls; built once
 * by stripe_native.py, so each forward is a single call with four arguments. */
typedef struct {
    int64_t N, C, H, W, s, p, lead, plane, rows_per_image, row_len;
    const float* chunk_w;
    const int64_t* chunk_off;
    const int32_t* chunk_filt;
    int64_t nchunks;
    const float* bias;
    int64_t F, nblocks;
    const int64_t *run_start, *run_q, *run_dest, *run_len;
    int64_t out_fstride, packed_end, length;
} stripe_plan;

void prunekit_stripe_forward(const stripe_plan* P, const float* x, float* B, float* out,
                             int threads) {
    memset(B + P->packed_end, 0, sizeof(float) * (P->length - P->packed_end));
    stripe_pack(x, B, P->N, P->C, P->H, P->W, P->s, P->p, P->lead, P->plane,
                P->rows_per_image, P->row_len, threads);
    stripe_conv(B, P->lead, P->chunk_w, P->chunk_off, P->chunk_filt, P->nchunks, P->bias,
                P->C, P->plane, P->F, P->nblocks, P->run_start, P->run_q, P->run_dest,
                P->run_len, out, P->out_fstride, threads);
}
