/* Sparse direct convolution over kept stripes (SWP), CPU, float32.
 *
 * Compiled on first use by prunekit/nn/stripe_native.py (cc -O3 -march=native
 * -ffp-contract=fast -fopenmp) and called through ctypes; no Python or torch headers, so it
 * builds in well under a second.
 *
 * Layout ("exact grid"): a kernel tap (i, j) reads input row s*oh + i*d - p and column
 * s*ow + j*d - p. Writing i*d - p = s*u + a and j*d - p = s*v + b (0 <= a, b < s), the input is
 * repacked into planes, one per (a, b, v) that a kept tap uses, each of R = Ho + u_max - u_min
 * rows of exactly Wo columns:  P[(a,b,v)][c][r][ow] = x[c][s*(r + u_min) + a][s*(ow + v) + b]
 * (zero outside the image). Output position q = oh*Wo + ow is then the output's own NCHW index,
 * and every tap reads P[(a,b,v)][c][q + (u - u_min)*Wo]: a constant offset per tap, no
 * padding columns computed and dropped, and column shifts never wrap into the next row
 * because the shift is baked into the plane. A 3x3 stride-1 conv packs 3 shifted copies of
 * its input, a stride-2 one 6 phase planes of a quarter size.
 *
 * Work: per image, output positions in blocks of BL = 64 (CIFAR maps: 1024, 256 and 64
 * positions, so no block is partial); per block, the kept stripes are processed tap-major in
 * chunks of FC filters that all keep that tap, so every loaded input vector feeds FC * NV
 * fused multiply-adds held in registers; a tap's last, partly filled chunk runs a variant with
 * fewer filters instead of multiplying padding. The batch is processed in groups of images
 * small enough that a group's planes are still in L2 when they are convolved.
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
#define NV 4            /* vectors per block */
#endif
#define BL (VL * NV)    /* output positions per block */
#ifndef FC
#define FC 4            /* filters per chunk */
#endif

static inline vec vload(const float* p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float* p, vec v) { memcpy(p, &v, sizeof v); }
typedef float vec8 __attribute__((vector_size(32)));
typedef int32_t ivec8 __attribute__((vector_size(32)));
static inline void vstore8(float* p, vec8 v) { memcpy(p, &v, sizeof v); }
/* p[0], p[2], ..., p[14]: one stride-2 row segment */
static inline vec8 even8(const float* p) {
    vec8 a, b;
    memcpy(&a, p, sizeof a);
    memcpy(&b, p + 8, sizeof b);
    return __builtin_shuffle(a, b, (ivec8){0, 2, 4, 6, 8, 10, 12, 14});
}

int prunekit_stripe_block(void) { return BL; }
int prunekit_stripe_chunk(void) { return FC; }

/* Everything about one (conv, input shape) pair that does not change between calls; built once
 * by stripe_native.py, so each forward is a single call. The batch is processed in groups of G
 * images (N % G == 0); within a group, plane = G * R * Wo floats per channel, set k's planes
 * start at k * C * plane, image n's rows at n * R * Wo. sets[3k .. 3k+2] = (a, b, v) of set k.
 * Chunk k: input offset chunk_off[k] (set, channel 0, row shift), FC filter indices
 * chunk_filt[k * FC + j] (F = padding), weights chunk_w[(k * C + c) * FC + j]. */
typedef struct {
    int64_t N, C, H, W, s, Ho, Wo, G, R, u_min, plane, nsets;
    const int64_t* sets;
    const float* chunk_w;
    const int64_t* chunk_off;
    const int32_t* chunk_filt;
    int64_t nchunks;
    const float* bias;
    int64_t F, packed_end, length;
} stripe_plan;

/* The loader compares this with its own mirror of the struct: a process that imported an
 * older stripe_native.py must not drive a newer kernel with a different layout. */
int64_t prunekit_stripe_plan_size(void) { return (int64_t)sizeof(stripe_plan); }

/* Ask for the next input plane while this one is copied: packing is a pure copy, so without
 * this every cache miss on x stalls it. */
static inline void prefetch_plane(const float* plane, int64_t floats, int exists) {
    if (!exists) return;
    for (int64_t k = 0; k < floats; k += 16) __builtin_prefetch(plane + k, 0, 3);
}

/* Pack images [0, G) of x (already offset to the group) into B. Zeros are written inline: a
 * libc call per short row costs more than the row. */
static void stripe_pack(const stripe_plan* P, const float* restrict x, float* restrict B,
                        int threads) {
    const int64_t C = P->C, H = P->H, W = P->W, s = P->s, Wo = P->Wo, R = P->R, G = P->G;
    const float* x_end = x + G * C * H * W;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if(threads > 1)
    for (int64_t n = 0; n < G; n++)
        for (int64_t c = 0; c < C; c++) {
            const float* restrict src = x + (n * C + c) * H * W;
            prefetch_plane(src + H * W, H * W, n * C + c + 1 < G * C);
            for (int64_t k = 0; k < P->nsets; k++) {
                const int64_t a = P->sets[3 * k], b = P->sets[3 * k + 1], v = P->sets[3 * k + 2];
                /* columns ow with 0 <= s * (ow + v) + b < W (0 <= b < s, so ow >= -v) */
                int64_t lo = -v;
                int64_t hi = (W - b + s - 1) / s - v;
                if (lo < 0) lo = 0;
                if (hi > Wo) hi = Wo;
                if (lo > hi) lo = hi;
                float* restrict dst = B + k * C * P->plane + c * P->plane + n * R * Wo;
                if (s == 1 && Wo == W) {
                    /* same-size stride-1 conv: the plane is the image shifted by u_min rows
                     * and v columns, so one long copy, then zero the wrapped edge columns and
                     * the rows outside the image (a short loop per row costs more than this) */
                    int64_t r0 = -P->u_min - a, r1 = H - P->u_min - a;
                    if (r0 < 0) r0 = 0;
                    if (r1 > R) r1 = R;
                    if (r0 > r1) r0 = r1;
                    int64_t first = r0 * W, last = r1 * W;  /* dst range, shifted by `shift` */
                    const int64_t shift = (P->u_min + a) * W + v;
                    if (first + shift < 0) first = -shift;
                    if (last + shift > H * W) last = H * W - shift;
                    for (int64_t q = 0; q < first; q++) dst[q] = 0.0f;
                    for (int64_t q = first; q < last; q++) dst[q] = src[q + shift];
                    for (int64_t q = last; q < R * Wo; q++) dst[q] = 0.0f;
                    for (int64_t r = r0; r < r1; r++) {
                        for (int64_t q = 0; q < lo; q++) dst[r * Wo + q] = 0.0f;
                        for (int64_t q = hi; q < Wo; q++) dst[r * Wo + q] = 0.0f;
                    }
                    continue;
                }
                for (int64_t r = 0; r < R; r++) {
                    float* restrict out = dst + r * Wo;
                    const int64_t h = s * (r + P->u_min) + a;
                    if (h < 0 || h >= H) {
                        for (int64_t q = 0; q < Wo; q++) out[q] = 0.0f;
                        continue;
                    }
                    const float* restrict row = src + h * W + s * v + b;  /* row[s*ow] = x[h][col] */
                    if (s == 2 && Wo % 8 == 0 && row >= x && row + 2 * Wo <= x_end) {
                        /* whole row at once, 8 outputs per shuffle (the compiler's loop ends
                         * in a scalar tail for 8 or 15 outputs), then zero the columns that
                         * fall outside the image */
                        for (int64_t q = 0; q < Wo; q += 8) vstore8(out + q, even8(row + 2 * q));
                        for (int64_t q = 0; q < lo; q++) out[q] = 0.0f;
                        for (int64_t q = hi; q < Wo; q++) out[q] = 0.0f;
                        continue;
                    }
                    for (int64_t q = 0; q < lo; q++) out[q] = 0.0f;
                    if (s == 1)
                        for (int64_t q = lo; q < hi; q++) out[q] = row[q];
                    else if (s == 2)  /* constant strides let the compiler vectorise */
                        for (int64_t q = lo; q < hi; q++) out[q] = row[2 * q];
                    else
                        for (int64_t q = lo; q < hi; q++) out[q] = row[s * q];
                    for (int64_t q = hi; q < Wo; q++) out[q] = 0.0f;
                }
            }
        }
}

/* One chunk on one block: the first `live` filters of the chunk (live <= FC, a compile-time
 * constant at every call site), every input channel, accumulated into dst + filter * stride.
 * Only real filters are ever live (the padding filter F is never the first of a chunk), so
 * dst needs no row for F. */
static inline __attribute__((always_inline)) void chunk_fma(
        const float* xs, const float* wk, const int32_t* filt, int64_t C, int64_t plane,
        float* dst, int64_t stride, const int live) {
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
        float* a = dst + (int64_t)filt[j] * stride;
        for (int v = 0; v < NV; v++) vstore(a + VL * v, vload(a + VL * v) + r[j][v]);
    }
}

/* Block `blk` of a packed group: image blk / per_image, positions q0 .. q0 + BL - 1 of it;
 * out points at the group's first image. acc: BL * F floats, private to the thread. */
static void stripe_block(const stripe_plan* P, const float* B, int64_t blk, float* out,
                         float* acc) {
    const int64_t HoWo = P->Ho * P->Wo, per_image = (HoWo + BL - 1) / BL, F = P->F;
    const int64_t n = blk / per_image, q0 = (blk % per_image) * BL;
    const int64_t len = HoWo - q0 < BL ? HoWo - q0 : BL;
    /* a full block accumulates straight into the output (q is its own NCHW index): filter f's
     * BL outputs at o + f * HoWo, the padding filter F in acc; a partial block at an image's
     * end goes through acc, whose rows are BL long, and is copied out */
    float* o = out + n * F * HoWo + q0;
    const int direct = len == BL;
    float* dst = direct ? o : acc;
    const int64_t stride = direct ? HoWo : BL;
    for (int64_t f = 0; f < F; f++) {
        const float bv = P->bias ? P->bias[f] : 0.0f;
        for (int k = 0; k < BL; k++) dst[f * stride + k] = bv;
    }
    const float* base = B + n * P->R * P->Wo + q0;
    for (int64_t k = 0; k < P->nchunks; k++) {
        const int32_t* filt = P->chunk_filt + k * FC;
        const float* xs = base + P->chunk_off[k];
        const float* wk = P->chunk_w + k * P->C * FC;
        int live = FC;  /* a tap's last chunk may be padded with the dummy filter F */
        while (live > 1 && filt[live - 1] == F) live--;
        switch (live) {  /* specialised: padded slots cost no multiply-adds */
            case 1: chunk_fma(xs, wk, filt, P->C, P->plane, dst, stride, 1); break;
            case 2: chunk_fma(xs, wk, filt, P->C, P->plane, dst, stride, 2); break;
            case 3: chunk_fma(xs, wk, filt, P->C, P->plane, dst, stride, 3); break;
#if FC > 4
            case 4: chunk_fma(xs, wk, filt, P->C, P->plane, dst, stride, 4); break;
            case 5: chunk_fma(xs, wk, filt, P->C, P->plane, dst, stride, 5); break;
#endif
#if FC > 6
            case 6: chunk_fma(xs, wk, filt, P->C, P->plane, dst, stride, 6); break;
            case 7: chunk_fma(xs, wk, filt, P->C, P->plane, dst, stride, 7); break;
#endif
            default: chunk_fma(xs, wk, filt, P->C, P->plane, dst, stride, FC); break;
        }
    }
    if (direct) return;
    for (int64_t f = 0; f < F; f++) {
        const float* a = acc + f * BL;
        float* d = o + f * HoWo;
        for (int64_t j = 0; j < len; j++) d[j] = a[j];
    }
}

/* buf: threads * P->length floats when N / G >= threads (each thread packs and convolves whole
 * groups on its own), else P->length floats (the threads share each group's packing and
 * split its blocks). */
void prunekit_stripe_forward(const stripe_plan* P, const float* x, float* buf, float* out,
                             int threads) {
    const int64_t groups = P->N / P->G;
    const int64_t blocks = P->G * ((P->Ho * P->Wo + BL - 1) / BL);
    const int64_t in_group = P->G * P->C * P->H * P->W, out_group = P->G * P->F * P->Ho * P->Wo;
    if (threads < 1) threads = 1;
    if (groups >= threads) {
        #pragma omp parallel num_threads(threads)
        {
            float* B = buf + (int64_t)omp_get_thread_num() * P->length;
            float* acc = aligned_alloc(64, sizeof(float) * BL * P->F);
            /* beyond the packed planes: read only for the dropped tail of a partial block,
             * zeroed so that garbage (NaN, denormals) never slows the arithmetic */
            memset(B + P->packed_end, 0, sizeof(float) * (P->length - P->packed_end));
            #pragma omp for schedule(static)
            for (int64_t g = 0; g < groups; g++) {
                stripe_pack(P, x + g * in_group, B, 1);
                for (int64_t b = 0; b < blocks; b++)
                    stripe_block(P, B, b, out + g * out_group, acc);
            }
            free(acc);
        }
        return;
    }
    memset(buf + P->packed_end, 0, sizeof(float) * (P->length - P->packed_end));
    for (int64_t g = 0; g < groups; g++) {
        stripe_pack(P, x + g * in_group, buf, threads);
        #pragma omp parallel num_threads(threads)
        {
            float* acc = aligned_alloc(64, sizeof(float) * BL * P->F);
            #pragma omp for schedule(static)
            for (int64_t b = 0; b < blocks; b++)
                stripe_block(P, buf, b, out + g * out_group, acc);
            free(acc);
        }
    }
}
