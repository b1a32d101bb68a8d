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
 * Work: output positions in blocks of BL = 80 (one block covers an 8x8 map's 72 grid
 * positions); per block, the kept stripes are processed tap-major in chunks of FC filters that
 * all keep that tap, so every loaded input vector feeds FC * NV fused multiply-adds held in
 * registers (no scatter, no materialised shifted copy); a tap's last, partly filled chunk runs
 * a variant with fewer filters instead of multiplying padding. The batch is processed in
 * groups of images small enough that the packed group is still in L2 when it is convolved
 * (packing the whole batch first sent every packed float through memory twice).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#ifndef VL
#define VL 16           /* floats per vector; split by the compiler where the CPU has fewer */
#endif
typedef float vec __attribute__((vector_size(4 * VL)));
#ifndef NV
#define NV 5            /* vectors per block: 80 outputs, one block for an 8x8 map */
#endif
#define BL (VL * NV)    /* output positions per block */
#ifndef FC
#define FC 4            /* filters per chunk */
#endif

static inline vec vload(const float* p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float* p, vec v) { memcpy(p, &v, sizeof v); }

int prunekit_stripe_block(void) { return BL; }
int prunekit_stripe_chunk(void) { return FC; }

/* Ask for the next input plane while this one is copied: packing is a pure copy, so
 * without this every cache miss on x stalls it (measured: most of the packing time). */
static inline void prefetch_plane(const float* plane, int64_t floats, int exists) {
    if (!exists) return;
    for (int64_t k = 0; k < floats; k += 16) __builtin_prefetch(plane + k, 0, 3);
}

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
        #pragma omp parallel for schedule(static) num_threads(threads) if(threads > 1)
        for (int64_t c = 0; c < C; c++)
            memset(B + lead + c * plane, 0, sizeof(float) * p * row_len);  /* top rows */
        #pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if(threads > 1)
        for (int64_t n = 0; n < N; n++)
            for (int64_t c = 0; c < C; c++) {
                const float* src = x + (n * C + c) * H * W;
                prefetch_plane(src + H * W, H * W, n * C + c + 1 < N * C);
                float* dst = B + lead + c * plane + (p + n * rows_per_image) * row_len;
                for (int64_t h = 0; h < H; h++) {
                    float* d = dst + h * row_len;
                    const float* r = src + h * W;
                    for (int64_t w = 0; w < W; w++) d[w] = r[w];
                    for (int64_t w = W; w < row_len; w++) d[w] = 0.0f;
                }
                memset(dst + H * row_len, 0, sizeof(float) * (rows_per_image - H) * row_len);
            }
        return;
    }
    /* phase (a, b), phase row r, phase column q <- padded pixel (r * s + a, q * s + b), read
     * straight from the input row: staging the row in a zero-padded buffer costs a
     * store-forwarding stall per vector (measured: most of the packing time). Rows and columns
     * outside the image are zero, written inline (a libc call per short row costs more than
     * the row). */
    int64_t q_lo[s], q_hi[s];  /* per column phase b: the phase columns inside the image */
    for (int64_t b = 0; b < s; b++) {
        q_hi[b] = (W + p - b + s - 1) / s;
        if (q_hi[b] > row_len) q_hi[b] = row_len;
        q_lo[b] = (p - b + s - 1) / s;
        if (q_lo[b] > q_hi[b]) q_lo[b] = q_hi[b];
    }
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if(threads > 1)
    for (int64_t n = 0; n < N; n++)
        for (int64_t c = 0; c < C; c++) {
            const float* src = x + (n * C + c) * H * W;
            prefetch_plane(src + H * W, H * W, n * C + c + 1 < N * C);
            for (int64_t a = 0; a < s; a++)
                for (int64_t r = 0; r < rows_per_image; r++) {
                    const int64_t h = r * s + a - p;
                    for (int64_t b = 0; b < s; b++) {
                        float* out = B + lead + ((a * s + b) * C + c) * plane
                                     + (n * rows_per_image + r) * row_len;
                        if (h < 0 || h >= H) {
                            for (int64_t q = 0; q < row_len; q++) out[q] = 0.0f;
                            continue;
                        }
                        const float* row = src + h * W + b - p;
                        const int64_t lo = q_lo[b], hi = q_hi[b];
                        for (int64_t q = 0; q < lo; q++) out[q] = 0.0f;
                        if (s == 2)  /* a constant stride lets the compiler vectorise */
                            for (int64_t q = lo; q < hi; q++) out[q] = row[2 * q];
                        else
                            for (int64_t q = lo; q < hi; q++) out[q] = row[q * s];
                        for (int64_t q = hi; q < row_len; q++) out[q] = 0.0f;
                    }
                }
        }
}

/* One chunk on one block: the first `live` filters of the chunk (live <= FC, a compile-time
 * constant at every call site), every input channel, accumulated into acc. */
static inline __attribute__((always_inline)) void chunk_fma(
        const float* xs, const float* wk, const int32_t* filt, int64_t C, int64_t plane,
        float* acc, const int live) {
    vec r[FC][NV];
    for (int j = 0; j < live; j++)
        for (int v = 0; v < NV; v++) r[j][v] = (vec){0};
    for (int64_t c = 0; c < C; c++) {
        vec xv[NV];
        for (int v = 0; v < NV; v++) {
            xv[v] = vload(xs + c * plane + VL * v);
            /* keep the (unaligned, cache-line-splitting) input vector in a register: left
             * alone, gcc re-loads it as a memory operand of every FMA, FC times per c */
            __asm__("" : "+v"(xv[v]));
        }
        for (int j = 0; j < live; j++) {
            const float wj = wk[c * FC + j];
            for (int v = 0; v < NV; v++) r[j][v] += wj * xv[v];
        }
    }
    for (int j = 0; j < live; j++) {
        float* a = acc + (int64_t)filt[j] * BL;
        for (int v = 0; v < NV; v++) vstore(a + VL * v, vload(a + VL * v) + r[j][v]);
    }
}

/* chunks k = 0..nchunks-1: input offset chunk_off[k] (relative to B + lead, may be negative
 * down to -lead), FC filter indices chunk_filt[k * FC + j] (F = a dummy row for padding),
 * weights chunk_w[(k * C + c) * FC + j]. Block b covers q in [b * BL, (b + 1) * BL); its real
 * outputs are the runs run_start[b] .. run_start[b + 1] - 1: (q, dest, len), written to
 * out[dest + f * out_fstride + j] for j < len (out is NCHW, dest includes n * F * Ho * Wo).
 * acc: BL * (F + 1) floats, 64-byte aligned, private to the caller's thread. */
static void stripe_conv_blocks(const float* B, int64_t lead, const float* chunk_w,
                               const int64_t* chunk_off, const int32_t* chunk_filt,
                               int64_t nchunks, const float* bias, int64_t C, int64_t plane,
                               int64_t F, int64_t b, const int64_t* run_start,
                               const int64_t* run_q, const int64_t* run_dest,
                               const int64_t* run_len, float* out, int64_t out_fstride,
                               float* acc) {
    if (run_start[b] == run_start[b + 1]) return;  /* padding only */
    const int64_t q0 = b * BL;
    for (int64_t f = 0; f <= F; f++) {
        const float bv = (bias && f < F) ? bias[f] : 0.0f;
        for (int k = 0; k < BL; k++) acc[f * BL + k] = bv;
    }
    const float* base = B + lead + q0;
    for (int64_t k = 0; k < nchunks; k++) {
        const int32_t* filt = chunk_filt + k * FC;
        const float* xs = base + chunk_off[k];
        const float* wk = chunk_w + k * C * FC;
        int live = FC;  /* a tap's last chunk may be padded with the dummy filter F */
        while (live > 1 && filt[live - 1] == F) live--;
        switch (live) {  /* specialised: padded slots cost no multiply-adds */
            case 1: chunk_fma(xs, wk, filt, C, plane, acc, 1); break;
            case 2: chunk_fma(xs, wk, filt, C, plane, acc, 2); break;
            case 3: chunk_fma(xs, wk, filt, C, plane, acc, 3); break;
#if FC > 4
            case 4: chunk_fma(xs, wk, filt, C, plane, acc, 4); break;
            case 5: chunk_fma(xs, wk, filt, C, plane, acc, 5); break;
#endif
#if FC > 6
            case 6: chunk_fma(xs, wk, filt, C, plane, acc, 6); break;
            case 7: chunk_fma(xs, wk, filt, C, plane, acc, 7); break;
#endif
            default: chunk_fma(xs, wk, filt, C, plane, acc, FC); break;
        }
    }
    for (int64_t u = run_start[b]; u < run_start[b + 1]; u++) {
        const int64_t q = run_q[u] - q0, len = run_len[u];
        for (int64_t f = 0; f < F; f++) {  /* runs are short (one output row): no libc call */
            float* o = out + run_dest[u] + f * out_fstride;
            const float* a = acc + f * BL + q;
            for (int64_t j = 0; j < len; j++) o[j] = a[j];
        }
    }
}

/* Everything about one (conv, input shape) pair that does not change between calls; built once
 * by stripe_native.py, so each forward is a single call with four arguments. The batch is
 * processed in groups of G images (N % G == 0) whose packed input (length floats) stays in the
 * core's L2 cache between packing and convolving; in_group/out_group are the strides of a group
 * in x and out. */
typedef struct {
    int64_t N, C, H, W, s, p, lead, plane, rows_per_image, row_len;
    const float* chunk_w;
    const int64_t* chunk_off;
    const int32_t* chunk_filt;
    int64_t nchunks;
    const float* bias;
    int64_t F, nblocks;
    const int64_t *run_start, *run_q, *run_dest, *run_len;
    int64_t out_fstride, packed_end, length, G, in_group, out_group;
} stripe_plan;

#define CONV_BLOCK(B, o, b, acc)                                                               \
    stripe_conv_blocks(B, P->lead, P->chunk_w, P->chunk_off, P->chunk_filt, P->nchunks,       \
                       P->bias, P->C, P->plane, P->F, b, P->run_start, P->run_q, P->run_dest, \
                       P->run_len, o, P->out_fstride, acc)

/* buf: threads * P->length floats when N / G >= threads (each thread packs and convolves whole
 * groups on its own), else P->length floats (the threads share each group's packing and
 * split its blocks). */
void prunekit_stripe_forward(const stripe_plan* P, const float* x, float* buf, float* out,
                             int threads) {
    const int64_t groups = P->N / P->G;
    if (threads < 1) threads = 1;
    if (groups >= threads) {
        #pragma omp parallel num_threads(threads)
        {
            float* B = buf + (int64_t)omp_get_thread_num() * P->length;
            float* acc = aligned_alloc(64, sizeof(float) * BL * (P->F + 1));
            /* beyond the packed input: read only for dropped outputs, zeroed so that garbage
             * (NaN, denormals) never slows the arithmetic */
            memset(B + P->packed_end, 0, sizeof(float) * (P->length - P->packed_end));
            #pragma omp for schedule(static)
            for (int64_t g = 0; g < groups; g++) {
                stripe_pack(x + g * P->in_group, B, P->G, P->C, P->H, P->W, P->s, P->p,
                            P->lead, P->plane, P->rows_per_image, P->row_len, 1);
                float* o = out + g * P->out_group;
                for (int64_t b = 0; b < P->nblocks; b++) CONV_BLOCK(B, o, b, acc);
            }
            free(acc);
        }
        return;
    }
    memset(buf + P->packed_end, 0, sizeof(float) * (P->length - P->packed_end));
    for (int64_t g = 0; g < groups; g++) {
        stripe_pack(x + g * P->in_group, buf, P->G, P->C, P->H, P->W, P->s, P->p, P->lead,
                    P->plane, P->rows_per_image, P->row_len, threads);
        float* o = out + g * P->out_group;
        #pragma omp parallel num_threads(threads)
        {
            float* acc = aligned_alloc(64, sizeof(float) * BL * (P->F + 1));
            #pragma omp for schedule(static)
            for (int64_t b = 0; b < P->nblocks; b++) CONV_BLOCK(buf, o, b, acc);
            free(acc);
        }
    }
}
