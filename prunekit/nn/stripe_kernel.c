/* Sparse direct convolution over kept stripes (SWP, "Pruning Filter in Filter", Meng et al.,
 * NeurIPS 2020: out[f] = sum over kept stripes (f, i, j) of W[f, :, i, j] . x shifted by
 * (i*d, j*d)), CPU, float32.
 *
 * Compiled on first use by prunekit/nn/stripe_build.py (cc -O3 -march=native
 * -ffp-contract=fast [-fopenmp]) and called through ctypes; no Python or torch headers.
 * Portable C (GCC/clang vector extensions, no intrinsics): 8-float vectors where the CPU has
 * AVX (AVX2, AVX-512: ymm registers), 4-float ones elsewhere (SSE2, NEON, scalar splits).
 * With -DPRUNEKIT_WIDE on an AVX-512 CPU, 16-float ones (zmm): a second library, on which
 * stripe_native.py lays out the convs whose output rows are multiples of 16 (a tile's
 * stores, loads and broadcasts then each cover twice the outputs).
 *
 * Layout ("padded phase planes"): the zero-padded input xp[h][w] = x[h - p][w - p] is split by
 * the stride s into phase planes P[(a, b)][r][q] = xp[s*r + a][s*q + b], each Hq x Wq =
 * ceil((H + 2p) / s) x ceil((W + 2p) / s), one per phase (a, b) that a kept tap uses. Writing
 * the tap's offset i*d = s*u + a and j*d = s*v + b, output (oh, ow) of tap (i, j) reads
 * P[(a, b)][oh + u][ow + v]: one constant offset per tap into one plane, for any stride,
 * padding and dilation. So a stride-1 conv packs ONE padded copy of its input (not three
 * shifted ones) and a stride-2 conv four quarter-size phase planes (one copy in all, not 1.5).
 * Packed order [image][phase][channel][Hq][Wq] for a group of G images. A stride-2 conv that
 * uses both column phases of a row phase packs them in one pass over the input rows
 * (pack_pair_s2: each row split into even and odd columns), which halves the packing's reads
 * and row overheads; packing was a quarter of a stride-2 layer's time at batch 64.
 *
 * Work: the outputs of a group are a list of vectors (VL consecutive positions of one output
 * row; the last of a row is partial when VL does not divide Wo), each with its input offset
 * (in a plane), output offset and lane count. They are processed in blocks of BV vectors
 * (chosen by stripe_native.py so that a block's inputs and outputs stay in L1); within a
 * block, the kept stripes run in chunks: up to FC filters and one or more taps, every filter
 * keeping every tap of its chunk (stripe_chunks.chunks), so a tile sums over taps x channels
 * before it adds into the outputs. A chunk of `live` filters sweeps the block in tiles of
 * NV(live) vectors, NV chosen so that live * NV accumulators plus the operands fill the
 * vector registers (REGS) whatever `live` is: every loaded input vector feeds `live` fused
 * multiply-adds and every broadcast weight NV. Tiles are specialised for every (live, nv) at
 * compile time. Where VL divides Wo, outputs accumulate straight into the NCHW output
 * (P->direct, stripe_native.DIRECT_OUTPUT; when every filter is in one chunk, as in a dense
 * conv, a tile's store writes the finished output: bias, residual and ReLU, no separate
 * passes over the block's outputs); elsewhere into a block buffer (F x BV vectors, contiguous)
 * that is copied out lane by lane. The batch is processed in groups small enough
 * that a group's planes are still in L2 when they are convolved.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
#endif

#if defined(PRUNEKIT_WIDE) && defined(__AVX512F__)
#define VL 16           /* zmm: the second build (stripe_native.wide_library), for convs whose
                         * output rows are whole 16-float vectors */
#elif defined(__AVX__)
#define VL 8            /* floats per vector: ymm (also on AVX-512: no frequency drop) */
#else
#define VL 4            /* SSE2, NEON; the compiler splits or scalarises elsewhere */
#endif
#if defined(__AVX512F__) || defined(__aarch64__)
#define REGS 32         /* vector registers */
#define FC 8            /* filters per chunk */
#else
#define REGS 16         /* AVX2, SSE */
#define FC 4
#endif
#define ACC (REGS * 3 / 4)  /* accumulators per tile, about (the block size is a multiple) */
#define NVMAX 12        /* vectors per tile at most (each needs a pointer register) */
#define BVMAX 96        /* vectors per block at most */

typedef float vec __attribute__((vector_size(4 * VL)));
typedef int32_t ivec __attribute__((vector_size(4 * VL)));
static inline vec vload(const float* p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float* p, vec v) { memcpy(p, &v, sizeof v); }
/* (vec){0} + f would keep the scalar addition (0 + -0.0 is +0.0): a plain broadcast instead */
static inline vec splat(float f) {
#if VL == 16
    return (vec){f, f, f, f, f, f, f, f, f, f, f, f, f, f, f, f};
#elif VL == 8
    return (vec){f, f, f, f, f, f, f, f};
#else
    return (vec){f, f, f, f};
#endif
}

/* Keep the (unaligned) input vector in a register: left alone, gcc re-loads it as a memory
 * operand of every FMA, `live` times per channel. The constraint names a register class that
 * holds a vector of this width on this architecture; elsewhere no hint. */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__AVX512F__)
#define KEEP(x) __asm__("" : "+v"(x))
#elif (defined(__x86_64__) || defined(__i386__)) && defined(__SSE2__)
#define KEEP(x) __asm__("" : "+x"(x))
#elif defined(__aarch64__)
#define KEEP(x) __asm__("" : "+w"(x))
#else
#define KEEP(x) ((void)0)
#endif

int prunekit_stripe_vl(void) { return VL; }
int prunekit_stripe_chunk(void) { return FC; }
int prunekit_stripe_acc(void) { return ACC; }
int prunekit_stripe_max_block(void) { return BVMAX; }

/* Everything about one (conv, input shape) pair that does not change between calls; built once
 * by stripe_native.py, so each forward is a single call. Group of G images (N % G == 0): image
 * n's planes at n * img, phase k's at k * C * plane, channel c's at c * plane; phases[2k],
 * phases[2k + 1] = (a, b). vecs[3m .. 3m + 2] = input offset (image, row, column in phase 0,
 * channel 0), output offset (in the group's NCHW output) and lanes of vector m of a group.
 * Chunk k: live[k] filters chunk_filt[k * FC + j] that all keep the taps e = chunk_tap0[k] ..
 * chunk_tap0[k + 1] - 1; tap e's input offset chunk_off[e] (phase, row shift u, column shift
 * v), its weights chunk_w[(e * C + c) * FC + j]. */
typedef struct {
    int64_t N, C, H, W, s, p, Ho, Wo, G, Hq, Wq, plane, img, nphases;
    const int64_t* phases;
    int64_t nvec;
    const int64_t* vecs;
    int64_t direct, BV;
    const float* chunk_w;
    const int64_t* chunk_off;
    const int32_t* chunk_filt;
    const int32_t* chunk_live;
    const int32_t* chunk_tap0;
    int64_t nchunks;
    const float* bias;
    int64_t F, packed_end, length;
    int64_t single;              /* every filter in at most one chunk (dense convs): the tiles'
                                  * stores write the finished outputs (direct output) */
    const int32_t* orphans;      /* filters no chunk covers (every stripe removed) */
    int64_t norphans;
} stripe_plan;

/* The loader compares this with its own mirror of the struct: a process that imported an
 * older stripe_build.py must not drive a newer kernel with a different layout. */
int64_t prunekit_stripe_plan_size(void) { return (int64_t)sizeof(stripe_plan); }

typedef float vec8 __attribute__((vector_size(32)));
typedef int32_t ivec8 __attribute__((vector_size(32)));
/* p[0], p[2], ..., p[14]: 8 columns of a stride-2 phase (gcc's own loop for row[2 * q] is
 * scalar) */
static inline vec8 even8(const float* p) {
    vec8 a, b;
    memcpy(&a, p, sizeof a);
    memcpy(&b, p + 8, sizeof b);
    return __builtin_shuffle(a, b, (ivec8){0, 2, 4, 6, 8, 10, 12, 14});
}

#if defined(__GNUC__) && !defined(__clang__)
/* rows are short (9 to 34 floats): a memset / memmove call per row, which gcc would make of
 * the zero and copy loops, costs more than the row */
#define NO_LIBC_LOOPS __attribute__((optimize("no-tree-loop-distribute-patterns")))
#else
#define NO_LIBC_LOOPS
#endif

static inline void zero_floats(float* out, int64_t n) {
    int64_t q = 0;
    for (; q + VL <= n; q += VL) vstore(out + q, (vec){0});
    for (; q < n; q++) out[q] = 0.0f;
}

/* The columns q of phase b with 0 <= s*q + b - p < W: [*lo, *hi), within [0, Wq). */
static inline void phase_columns(int64_t W, int64_t s, int64_t p, int64_t b, int64_t Wq,
                                 int64_t* lo, int64_t* hi) {
    *lo = p - b > 0 ? (p - b + s - 1) / s : 0;
    *hi = (W + p - b + s - 1) / s;
    if (*hi > Wq) *hi = Wq;
    if (*lo > *hi) *lo = *hi;
}

/* Phase plane (a, b) of one channel: dst[r][q] = x[s*r + a - p][s*q + b - p], 0 outside,
 * row by row: the zero columns, then the image's columns over them. x_end: the end of the
 * input (a stride-2 row is read 16 floats at a time). */
static NO_LIBC_LOOPS void pack_plane(const float* restrict src, float* restrict dst, int64_t H,
                                     int64_t W, int64_t s, int64_t p, int64_t a, int64_t b,
                                     int64_t Hq, int64_t Wq, const float* x_end) {
    int64_t lo, hi;
    phase_columns(W, s, p, b, Wq, &lo, &hi);
    const int64_t shift = b - p;
    const int edges = Wq >= VL && lo <= VL && Wq - hi <= VL;
    for (int64_t r = 0; r < Hq; r++) {
        float* restrict out = dst + r * Wq;
        const int64_t h = s * r + a - p;
        if (h < 0 || h >= H) {
            zero_floats(out, Wq);
            continue;
        }
        const float* restrict row = src + h * W + shift;  /* row[s*q] = x[h][s*q + b - p] */
        if (edges)  /* the zero columns: one vector store at each end, no loop to mispredict */
            vstore(out, (vec){0}), vstore(out + Wq - VL, (vec){0});
        else
            zero_floats(out, Wq);
        int64_t q = lo;
        if (s == 1) {
            for (; q + VL <= hi; q += VL) vstore(out + q, vload(row + q));
            for (; q < hi; q++) out[q] = row[q];
        } else if (s == 2) {
            for (; q + 8 <= hi && row + 2 * q + 16 <= x_end; q += 8) {
                const vec8 e = even8(row + 2 * q);
                memcpy(out + q, &e, sizeof e);
            }
            for (; q < hi; q++) out[q] = row[2 * q];
        } else {
            for (; q < hi; q++) out[q] = row[s * q];
        }
    }
}

/* Both column phases (a, 0) and (a, 1) of a stride-2 plane in one pass over the rows: each
 * input row is read once and split into its even and odd columns (16 floats per step), where
 * pack_plane would read it once per phase, and the row overheads (the branch, the zero
 * columns) are shared. Column x of the padded row (x + p) belongs to phase (x + p) % 2 at
 * column (x + p) / 2. */
static NO_LIBC_LOOPS void pack_pair_s2(const float* restrict src, float* restrict d0,
                                       float* restrict d1, int64_t H, int64_t W, int64_t p,
                                       int64_t a, int64_t Hq, int64_t Wq) {
    float* restrict dst[2] = {d0, d1};
    int64_t lo[2], hi[2];
    for (int b = 0; b < 2; b++) phase_columns(W, 2, p, b, Wq, &lo[b], &hi[b]);
    const int edges = Wq >= VL && lo[0] <= VL && lo[1] <= VL && Wq - hi[0] <= VL
                      && Wq - hi[1] <= VL;
    const int be = (int)(p % 2), bo = 1 - be;         /* phases of even / odd columns */
    const int64_t qe = (p - be) / 2, qo = (1 + p - bo) / 2;  /* their first column */
    for (int64_t r = 0; r < Hq; r++) {
        float* restrict out0 = d0 + r * Wq;
        float* restrict out1 = d1 + r * Wq;
        const int64_t h = 2 * r + a - p;
        if (h < 0 || h >= H) {
            zero_floats(out0, Wq), zero_floats(out1, Wq);
            continue;
        }
        if (edges) {
            vstore(out0, (vec){0}), vstore(out0 + Wq - VL, (vec){0});
            vstore(out1, (vec){0}), vstore(out1 + Wq - VL, (vec){0});
        } else {
            zero_floats(out0, Wq), zero_floats(out1, Wq);
        }
        const float* restrict row = src + h * W;
        float* restrict oe = dst[be] + r * Wq + qe;
        float* restrict oo = dst[bo] + r * Wq + qo;
        int64_t x = 0;
        for (; x + 16 <= W; x += 16) {
            vec8 u, v;
            memcpy(&u, row + x, sizeof u);
            memcpy(&v, row + x + 8, sizeof v);
            const vec8 even = __builtin_shuffle(u, v, (ivec8){0, 2, 4, 6, 8, 10, 12, 14});
            const vec8 odd = __builtin_shuffle(u, v, (ivec8){1, 3, 5, 7, 9, 11, 13, 15});
            memcpy(oe + x / 2, &even, sizeof even);
            memcpy(oo + x / 2, &odd, sizeof odd);
        }
        for (; x < W; x++) dst[(x + p) % 2][r * Wq + (x + p) / 2] = row[x];
    }
}

/* Pack images [0, G) of x (already offset to the group) into B. */
static void stripe_pack(const stripe_plan* P, const float* restrict x, float* restrict B,
                        int threads) {
    const int64_t C = P->C, HW = P->H * P->W;
    const float* x_end = x + P->G * C * HW;
    (void)threads;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if(threads > 1)
    for (int64_t n = 0; n < P->G; n++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t k = 0; k < P->nphases; k++) {
                const int64_t a = P->phases[2 * k], b = P->phases[2 * k + 1];
                float* plane = B + n * P->img + (k * C + c) * P->plane;
                /* phases are sorted: (a, 0) and (a, 1) are neighbours when both are used */
                if (P->s == 2 && b == 0 && k + 1 < P->nphases && P->phases[2 * k + 2] == a
                        && P->phases[2 * k + 3] == 1) {
                    pack_pair_s2(x + (n * C + c) * HW, plane, plane + C * P->plane, P->H, P->W,
                                 P->p, a, P->Hq, P->Wq);
                    k++;
                    continue;
                }
                pack_plane(x + (n * C + c) * HW, plane, P->H, P->W, P->s, P->p, a, b, P->Hq,
                           P->Wq, x_end);
            }
}

/* One tile: `live` filters (of this chunk) x `nv` vectors, every input channel; both are
 * compile-time constants at every instantiation. The accumulators are named scalars r<j>_<v>
 * (not an array, which gcc keeps in memory) and every statement is guarded by a constant
 * condition, so only the live * nv used ones exist. Registers: live * nv accumulators plus,
 * when live >= nv, the nv input vectors of a channel (each feeds `live` FMAs) and one weight,
 * else the `live` broadcast weights of a channel (each feeds nv FMAs) and one input vector;
 * tile_vectors() keeps the sum within the register file. */
#define FOR_V(M, j) M(j, 0) M(j, 1) M(j, 2) M(j, 3) M(j, 4) M(j, 5) \
                    M(j, 6) M(j, 7) M(j, 8) M(j, 9) M(j, 10) M(j, 11)
#if FC > 4
#define FOR_J(M, v) M(0, v) M(1, v) M(2, v) M(3, v) M(4, v) M(5, v) M(6, v) M(7, v)
#define FOR_JV(M) FOR_V(M, 0) FOR_V(M, 1) FOR_V(M, 2) FOR_V(M, 3) \
                  FOR_V(M, 4) FOR_V(M, 5) FOR_V(M, 6) FOR_V(M, 7)
#else
#define FOR_J(M, v) M(0, v) M(1, v) M(2, v) M(3, v)
#define FOR_JV(M) FOR_V(M, 0) FOR_V(M, 1) FOR_V(M, 2) FOR_V(M, 3)
#endif
#define ACC_DECL(j, v) vec r##j##_##v = (vec){0}; (void)r##j##_##v;
#define PTR_DECL(_, v) const float* p##v = v < nv ? xs[v] : xs[0]; (void)p##v;
#define X_DECL(_, v) vec x##v = (vec){0}; (void)x##v;
#define W_DECL(j, _) vec w##j = (vec){0}; (void)w##j;
#define W_LOAD(j, _) if (j < live) { w##j = splat(wk[c * FC + j]); KEEP(w##j); }
#define FMA_W(j, v) if (j < live) r##j##_##v += w##j * x##v;
#define X_STEP(_, v) if (v < nv) { x##v = vload(p##v + o); KEEP(x##v); FOR_J(FMA_W, v) }
#define X_LOAD(_, v) if (v < nv) { x##v = vload(p##v + o); KEEP(x##v); }
#define FMA_X(j, v) if (v < nv) r##j##_##v += wj * x##v;
#define W_STEP(j, _) if (j < live) { const float wj = wk[c * FC + j]; FOR_V(FMA_X, j) }
#define ACC_STORE(j, v) if (j < live && v < nv) { float* d = dst[v] + (int64_t)filt[j] * fstride; \
                                                  vstore(d, vload(d) + r##j##_##v); }
/* The output epilogue, applied while a block's outputs are written (still in L1): the residual
 * (a tensor laid out exactly like the output, or NULL) is added, then ReLU when `relu`. ReLU
 * keeps NaN (`v < 0 ? 0 : v`), as torch.relu does. */
typedef struct {
    const float* residual;  /* the group's first image, like `out` */
    int relu;
} epilogue;

static inline vec epilogue_vec(vec v, const epilogue* E, int64_t o) {
    if (E->residual) v += vload(E->residual + o);
    if (E->relu) {  /* lanes below zero cleared by mask: one compare and one and-not */
        const ivec below = v < splat(0.0f);
        v = (vec)((ivec)v & ~below);
    }
    return v;
}

static inline float epilogue_one(float v, const epilogue* E, int64_t o) {
    if (E->residual) v += E->residual[o];
    return E->relu && v < 0.0f ? 0.0f : v;
}

/* Direct output, each filter in one chunk: the tile's sums are its filters' whole outputs, so
 * the store writes bias + sum with the epilogue applied at once, where the separate passes
 * wrote the bias, read it back and added, then read and wrote again for the epilogue (the
 * same sums in the same order). */
#define ACC_STORE_FUSED(j, v) if (j < live && v < nv) { \
        float* d = dst[v] + (int64_t)filt[j] * fstride; \
        const vec a = splat(S->bias ? S->bias[filt[j]] : 0.0f) + r##j##_##v; \
        vstore(d, epilogue_vec(a, S->E, d - S->out)); }
/* How a tile stores its accumulators: NULL (added into an initialised output or block
 * buffer), or finished (see ACC_STORE_FUSED): the bias, the epilogue and the group's output
 * (the epilogue's offsets are relative to it). */
typedef struct {
    const float* bias;
    const epilogue* E;
    const float* out;
} fused_store;

static inline __attribute__((always_inline)) void tile(
        const float* const* xs, float* const* dst, int64_t fstride, const float* wt,
        const int32_t* filt, const int64_t* toff, int ntap, int64_t C, int64_t cs,
        const fused_store* S, const int live, const int nv) {
    FOR_JV(ACC_DECL)
    FOR_V(PTR_DECL, _)
    FOR_V(X_DECL, _)
    FOR_J(W_DECL, _)
    for (int t = 0; t < ntap; t++) {  /* the chunk's taps: one sum over taps and channels */
        const float* wk = wt + (int64_t)t * C * FC;
        int64_t o = toff[t];
        for (int64_t c = 0; c < C; c++, o += cs) {
            if (live < nv) {  /* weights in registers, input vectors streamed */
                FOR_J(W_LOAD, _)
                FOR_V(X_STEP, _)
            } else {          /* input vectors in registers, weights streamed */
                FOR_V(X_LOAD, _)
                FOR_J(W_STEP, _)
            }
        }
    }
    if (S) {
        FOR_JV(ACC_STORE_FUSED)
    } else {
        FOR_JV(ACC_STORE)
    }
}

typedef void (*tile_fn)(const float* const*, float* const*, int64_t, const float*,
                        const int32_t*, const int64_t*, int, int64_t, int64_t,
                        const fused_store*);
#define T(L, N) static void tile_##L##_##N(const float* const* xs, float* const* dst, \
        int64_t fs, const float* wt, const int32_t* filt, const int64_t* toff, int ntap, \
        int64_t C, int64_t cs, const fused_store* S) { \
        tile(xs, dst, fs, wt, filt, toff, ntap, C, cs, S, L, (L) * (N) <= REGS ? (N) : 0); }
#define ROW(L) T(L, 1) T(L, 2) T(L, 3) T(L, 4) T(L, 5) T(L, 6) \
               T(L, 7) T(L, 8) T(L, 9) T(L, 10) T(L, 11) T(L, 12)
#define REF(L) {tile_##L##_1, tile_##L##_2, tile_##L##_3, tile_##L##_4, tile_##L##_5, \
                tile_##L##_6, tile_##L##_7, tile_##L##_8, tile_##L##_9, tile_##L##_10, \
                tile_##L##_11, tile_##L##_12}
ROW(1) ROW(2) ROW(3) ROW(4)
#if FC > 4
ROW(5) ROW(6) ROW(7) ROW(8)
static const tile_fn tiles[FC][NVMAX] = {REF(1), REF(2), REF(3), REF(4),
                                         REF(5), REF(6), REF(7), REF(8)};
#else
static const tile_fn tiles[FC][NVMAX] = {REF(1), REF(2), REF(3), REF(4)};
#endif

/* Vectors per tile for a chunk of L filters: as many accumulators as fit next to the
 * operands (see tile()), L * nv + min(L, nv) + 1 <= REGS: nv > L with the weights held
 * (NV_A), else nv <= L with the input vectors held (NV_B). */
#define NV_A(L) ((REGS - 1 - (L)) / (L) < NVMAX ? (REGS - 1 - (L)) / (L) : NVMAX)
#define NV_B(L) ((REGS - 1) / ((L) + 1) < (L) ? (REGS - 1) / ((L) + 1) : (L))
#define NV_OF(L) (NV_A(L) > (L) ? NV_A(L) : NV_B(L))

/* A chunk of `live` filters over the nb vectors of a block: full tiles inline, the last
 * partial one through the table. */
static inline __attribute__((always_inline)) void chunk_sweep(
        const int64_t* vi, int64_t nb, float* const* dst, int64_t fstride, const float* B,
        const float* wt, const int32_t* filt, const int64_t* toff, int ntap, int64_t C,
        int64_t cs, const fused_store* S, const int live) {
    const int nt = NV_OF(live);
    int64_t v0 = 0;
    for (; v0 + nt <= nb; v0 += nt) {
        const float* xs[NVMAX];
        for (int t = 0; t < nt; t++) xs[t] = B + vi[3 * (v0 + t)];
        tile(xs, dst + v0, fstride, wt, filt, toff, ntap, C, cs, S, live, nt);
    }
    if (v0 < nb) {
        const float* xs[NVMAX];
        for (int t = 0; t < nb - v0; t++) xs[t] = B + vi[3 * (v0 + t)];
        tiles[live - 1][nb - v0 - 1](xs, dst + v0, fstride, wt, filt, toff, ntap, C, cs, S);
    }
}
#define SWEEP(L) static void sweep_##L(const int64_t* vi, int64_t nb, float* const* dst, \
        int64_t fs, const float* B, const float* wt, const int32_t* filt, const int64_t* toff, \
        int ntap, int64_t C, int64_t cs, const fused_store* S) { \
        chunk_sweep(vi, nb, dst, fs, B, wt, filt, toff, ntap, C, cs, S, L); }
typedef void (*sweep_fn)(const int64_t*, int64_t, float* const*, int64_t, const float*,
                         const float*, const int32_t*, const int64_t*, int, int64_t, int64_t,
                         const fused_store*);
SWEEP(1) SWEEP(2) SWEEP(3) SWEEP(4)
#if FC > 4
SWEEP(5) SWEEP(6) SWEEP(7) SWEEP(8)
static const sweep_fn sweeps[FC] = {sweep_1, sweep_2, sweep_3, sweep_4,
                                    sweep_5, sweep_6, sweep_7, sweep_8};
#else
static const sweep_fn sweeps[FC] = {sweep_1, sweep_2, sweep_3, sweep_4};
#endif

/* Vectors [m0, m0 + nb) of a packed group. out: the group's first image; acc: the block
 * buffer (F * BV * VL floats, private to the thread). */
static void stripe_block(const stripe_plan* P, const float* B, int64_t m0, int64_t nb,
                         float* out, const epilogue* E, float* acc) {
    const int64_t F = P->F, HoWo = P->Ho * P->Wo;
    const int64_t* vi = P->vecs + 3 * m0;
    float* dst[BVMAX];
    int64_t fstride;
    const int fused = E->residual || E->relu;
    if (P->direct && P->single) {
        /* the tiles store the finished outputs; only filters in no chunk are written here */
        for (int64_t v = 0; v < nb; v++) dst[v] = out + vi[3 * v + 1];
        for (int64_t i = 0; i < P->norphans; i++) {
            const int64_t f = P->orphans[i];
            const vec bv = splat(P->bias ? P->bias[f] : 0.0f);
            for (int64_t v = 0; v < nb; v++) {
                const int64_t o = vi[3 * v + 1] + f * HoWo;
                vstore(out + o, fused ? epilogue_vec(bv, E, o) : bv);
            }
        }
        const fused_store S = {P->bias, E, out};
        for (int64_t k = 0; k < P->nchunks; k++) {
            const int32_t e = P->chunk_tap0[k];
            sweeps[P->chunk_live[k] - 1](vi, nb, dst, HoWo, B, P->chunk_w + e * P->C * FC,
                                         P->chunk_filt + k * FC, P->chunk_off + e,
                                         P->chunk_tap0[k + 1] - e, P->C, P->plane, &S);
        }
        return;
    }
    if (P->direct) {
        for (int64_t v = 0; v < nb; v++) dst[v] = out + vi[3 * v + 1];
        fstride = HoWo;
    } else {
        for (int64_t v = 0; v < nb; v++) dst[v] = acc + v * VL;
        fstride = P->BV * VL;
    }
    for (int64_t f = 0; f < F; f++) {
        const vec bv = splat(P->bias ? P->bias[f] : 0.0f);
        for (int64_t v = 0; v < nb; v++) vstore(dst[v] + f * fstride, bv);
    }
    for (int64_t k = 0; k < P->nchunks; k++) {
        const int live = P->chunk_live[k];
        const int32_t e = P->chunk_tap0[k];
        sweeps[live - 1](vi, nb, dst, fstride, B, P->chunk_w + e * P->C * FC,
                         P->chunk_filt + k * FC, P->chunk_off + e, P->chunk_tap0[k + 1] - e,
                         P->C, P->plane, NULL);
    }
    if (P->direct && !fused) return;
    for (int64_t f = 0; f < F; f++)
        for (int64_t v = 0; v < nb; v++) {
            const int64_t o = vi[3 * v + 1] + f * HoWo;
            const float* a = P->direct ? out + o : acc + f * fstride + v * VL;
            float* d = out + o;
            if (vi[3 * v + 2] == VL) {
                vstore(d, fused ? epilogue_vec(vload(a), E, o) : vload(a));
                continue;
            }
            for (int64_t l = 0; l < vi[3 * v + 2]; l++)
                d[l] = fused ? epilogue_one(a[l], E, o + l) : a[l];
        }
}

static void group_blocks(const stripe_plan* P, const float* B, float* out,
                         const float* residual, int relu, float* acc, int64_t b) {
    const int64_t m0 = b * P->BV;
    const int64_t nb = P->nvec - m0 < P->BV ? P->nvec - m0 : P->BV;
    const epilogue E = {residual, relu};
    stripe_block(P, B, m0, nb, out, &E, acc);
}

/* The block buffer (F * BV * VL floats) of the calling thread, kept between calls and grown
 * when a conv needs more: at batch 1 a conv takes 10-60 us, and an aligned_alloc and free per
 * conv (and per OpenMP thread) was a measurable part of it. Held until the thread ends (at
 * most the largest F * BV * VL floats seen: 1.5 MB for F = 512). NULL when it cannot grow. */
static _Thread_local float* thread_acc;
static _Thread_local size_t thread_acc_bytes;
static void release_acc(void) { free(thread_acc); thread_acc = NULL; thread_acc_bytes = 0; }

static float* block_buffer(const stripe_plan* P) {
    size_t bytes = sizeof(float) * (size_t)(P->F * P->BV * VL);
    bytes = (bytes + 63) / 64 * 64;  /* aligned_alloc wants a multiple of the alignment */
    if (bytes > thread_acc_bytes) {
        release_acc();
        thread_acc = aligned_alloc(64, bytes);
        if (thread_acc) thread_acc_bytes = bytes;
    }
    return thread_acc;
}

/* Groups [g0, g1) on the calling thread alone, each packed into B and then convolved. */
static void run_groups(const stripe_plan* P, const float* x, float* B, float* out,
                       const float* residual, int relu, float* acc, int64_t g0, int64_t g1,
                       int64_t step) {
    const int64_t groups = P->N / P->G;
    const int64_t blocks = (P->nvec + P->BV - 1) / P->BV;
    const int64_t in_group = P->G * P->C * P->H * P->W, out_group = P->G * P->F * P->Ho * P->Wo;
    for (int64_t g = g0; g < g1; g += step) {
        stripe_pack(P, x + g * in_group, B, 1);
        /* the next group's input (this thread's, under the static schedule) is fetched into
         * L2 a slice per block while this group computes: packing it then reads from L2, not
         * memory (a stride-2 layer's packing at batch 64 was memory-bound) */
        const char* next = (const char*)(x + (g + step) * in_group);
        const int64_t lines = g + step < groups ? in_group * 4 / 64 : 0;
        const int64_t per = (lines + blocks - 1) / blocks;
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t end = (b + 1) * per < lines ? (b + 1) * per : lines;
            for (int64_t l = b * per; l < end; l++) __builtin_prefetch(next + 64 * l, 0, 2);
            group_blocks(P, B, out + g * out_group, residual ? residual + g * out_group : NULL,
                         relu, acc, b);
        }
    }
}

/* buf: threads * P->length floats when N / G >= threads (each thread packs and convolves whole
 * groups on its own), else P->length floats (the threads share each group's packing and
 * split its blocks). residual: NULL, or N x F x Ho x Wo floats (contiguous) added to the
 * output; relu: nonzero for ReLU after that. One thread runs without an OpenMP region.
 * Returns 0, or -1 when a block buffer could not be allocated. */
int prunekit_stripe_forward_fused(const stripe_plan* P, const float* x, float* buf, float* out,
                                  const float* residual, int relu, int threads) {
    const int64_t groups = P->N / P->G;
    const int64_t blocks = (P->nvec + P->BV - 1) / P->BV;
    const int64_t out_group = P->G * P->F * P->Ho * P->Wo;
    int failed = 0;
    if (threads < 1) threads = 1;
    if (threads == 1) {
        float* acc = block_buffer(P);
        if (!acc) return -1;
        /* beyond the packed planes: read only by the dropped lanes of partial vectors, zeroed
         * so that garbage (NaN, denormals) never slows the arithmetic */
        memset(buf + P->packed_end, 0, sizeof(float) * (P->length - P->packed_end));
        run_groups(P, x, buf, out, residual, relu, acc, 0, groups, 1);
        return 0;
    }
    if (groups >= threads) {
        #pragma omp parallel num_threads(threads) reduction(|:failed)
        {
            const int t = omp_get_thread_num(), team = omp_get_num_threads();
            float* B = buf + (int64_t)t * P->length;
            float* acc = block_buffer(P);
            memset(B + P->packed_end, 0, sizeof(float) * (P->length - P->packed_end));
            if (!acc) failed = 1;
            /* thread t takes groups t, t + team, ... (the team may be smaller than asked
             * for; the next group a thread prefetches is its own) */
            else run_groups(P, x, B, out, residual, relu, acc, t, groups, team);
        }
        return failed ? -1 : 0;
    }
    memset(buf + P->packed_end, 0, sizeof(float) * (P->length - P->packed_end));
    for (int64_t g = 0; g < groups; g++) {
        stripe_pack(P, x + g * P->G * P->C * P->H * P->W, buf, threads);
        #pragma omp parallel num_threads(threads) reduction(|:failed)
        {
            float* acc = block_buffer(P);
            if (!acc) failed = 1;
            #pragma omp for schedule(static)
            for (int64_t b = 0; b < blocks; b++)
                if (acc) group_blocks(P, buf, out + g * out_group,
                                      residual ? residual + g * out_group : NULL, relu, acc, b);
        }
    }
    return failed ? -1 : 0;
}

int prunekit_stripe_forward(const stripe_plan* P, const float* x, float* buf, float* out,
                            int threads) {
    return prunekit_stripe_forward_fused(P, x, buf, out, NULL, 0, threads);
}

/* One conv of a sequence: its plan, the forward that runs it (NULL: this library's; a plan
 * built for the other vector width names that library's prunekit_stripe_forward_fused) and
 * the value slots it reads and writes (res < 0: no residual); threads as for
 * prunekit_stripe_forward_fused. */
typedef int (*stripe_forward_fn)(const stripe_plan*, const float*, float*, float*,
                                 const float*, int, int);
typedef struct {
    const stripe_plan* plan;
    stripe_forward_fn forward;
    int64_t x, out, res, relu, threads;
} stripe_step;

static inline stripe_forward_fn step_forward(const stripe_step* S) {
    return S->forward ? S->forward : prunekit_stripe_forward_fused;
}

int64_t prunekit_stripe_step_size(void) { return (int64_t)sizeof(stripe_step); }

/* Runs n convs in order in one call: values[k] is the address of value slot k (the
 * sequence's inputs, then its intermediate and final outputs); buf as for one conv, large
 * enough for every step. At batch 1 a conv of a pruned CIFAR network takes 20-60 us, and a
 * call through Python (module, checks, output allocation, ctypes) adds 15-25 us to each.
 * Returns 0, or the failing step's index + 1. */
int64_t prunekit_stripe_sequence(const stripe_step* steps, int64_t n, float* const* values,
                                 float* buf) {
    for (int64_t k = 0; k < n; k++) {
        const stripe_step* S = &steps[k];
        if (step_forward(S)(S->plan, values[S->x], buf, values[S->out],
                            S->res >= 0 ? values[S->res] : NULL, (int)S->relu,
                            (int)S->threads) != 0)
            return k + 1;
    }
    return 0;
}

/* The sequence in chunks of images: every step runs on one chunk (the plans are for a chunk's
 * batch) before the next chunk starts, so at batch 64 a chunk's activations stay in L2 from
 * the conv that writes them to the convs that read them, where a whole batch's (4 MB a layer
 * for 16 x 32 x 32) went through memory between every pair of convs. Chunks are spread over
 * `threads` (chunk c on thread c % threads; each step then on one thread). values[k]: value
 * k's address for chunk 0 on thread 0; stride[k] > 0: floats from one chunk to the next (an
 * input or returned output, whole batches); stride[k] == 0: an intermediate in the
 * workspace, which each thread has its own copy of, `work` floats after the previous
 * thread's. buf: `scratch` floats of packing buffer per thread. Returns 0, or the failing
 * step's index + 1. */
int64_t prunekit_stripe_sequence_chunked(const stripe_step* steps, int64_t n, int64_t nvalues,
                                         float* const* values, const int64_t* stride,
                                         int64_t chunks, int64_t work, float* buf,
                                         int64_t scratch, int threads) {
    int64_t failed = 0;
    if (threads < 1) threads = 1;
    if (threads > chunks) threads = (int)chunks;
    #pragma omp parallel num_threads(threads) if(threads > 1)
    {
        const int t = omp_get_thread_num(), team = omp_get_num_threads();
        int64_t mine = 0;  /* (a max-reduction's private copy would start at INT64_MIN) */
        float** local = malloc(sizeof(float*) * (size_t)nvalues);
        if (!local) mine = n + 1;
        for (int64_t c = t; local && c < chunks && !mine; c += team) {
            for (int64_t k = 0; k < nvalues; k++)
                local[k] = values[k] + (stride[k] ? c * stride[k] : (int64_t)t * work);
            for (int64_t k = 0; k < n && !mine; k++) {
                const stripe_step* S = &steps[k];
                if (step_forward(S)(S->plan, local[S->x], buf + t * scratch, local[S->out],
                                    S->res >= 0 ? local[S->res] : NULL, (int)S->relu, 1) != 0)
                    mine = k + 1;
            }
        }
        free(local);
        if (mine) {
            #pragma omp critical(prunekit_sequence_failed)
            if (!failed || mine < failed) failed = mine;
        }
    }
    return failed;
}
