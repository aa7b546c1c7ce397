/* CPU kernels for the vectorised transcoder ensemble (see _native.py, which compiles and loads this file).
 *
 * Why C: on a CPU, torch.topk over all E*m pre-activations, the sort that a sparse backward
 * needs (CSR transpose, embedding_bag backward) and the elementwise passes over [B, E, d] tensors
 * cost more than the encoder GEMM itself. These kernels keep the per-member working set (one
 * member's decoder and gradient rows) in cache and touch only the k active latents per sample.
 *
 * Layouts (all row-major, float32, int64 indices):
 *   pre     [B, eb, m]   a chunk of pre-activations for members e0..e0+eb
 *   v, idx  [B, E, S]    padded slot lists: value and latent index (idx < 0 = empty slot)
 *   W       [E, m, d]    decoder (or encoder) rows, one contiguous row per latent
 *   out / r [L, B, E, d] per-level outputs (Matryoshka prefixes; L = 1 without)
 * Every kernel parallelises over members (each thread owns whole members, so gradient
 * accumulation needs no atomics and the result is deterministic) or over samples.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef int64_t i64;

/* ------------------------------------------------------------------ small vector helpers */
#if defined(__AVX512F__)
#include <immintrin.h>
#define SAE_AVX512 1
static inline __mmask16 tailmask(i64 r) { return (__mmask16)(r >= 16 ? 0xFFFF : ((1u << r) - 1u)); }
#endif

/* dot product with four independent accumulators (deterministic order) */
static inline float dotf(const float* restrict a, const float* restrict b, i64 n) {
#ifdef SAE_AVX512
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    i64 i = 0;
    for (; i + 64 <= n; i += 64) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);
    }
    for (; i < n; i += 16) {
        __mmask16 k = tailmask(n - i);
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + i), _mm512_maskz_loadu_ps(k, b + i), s0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
#else
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (i64 i = 0; i < n; i++) s += a[i] * b[i];
    return s;
#endif
}

static inline void axpyf(float alpha, const float* restrict x, float* restrict y, i64 n) {
#pragma omp simd
    for (i64 i = 0; i < n; i++) y[i] += alpha * x[i];
}

/* acc[0..d) += sum_s v[s] * W[idx[s]] over slots with idx >= 0 and v != 0, accumulating a
 * 128-float block of acc in registers while the slots stream past. */
static void gather_accum(float* restrict acc, const float* restrict W, const i64* idx, const float* v, i64 S, i64 d) {
#ifdef SAE_AVX512
    i64 i0 = 0;
    for (; i0 + 128 <= d; i0 += 128) {
        __m512 r0 = _mm512_loadu_ps(acc + i0), r1 = _mm512_loadu_ps(acc + i0 + 16), r2 = _mm512_loadu_ps(acc + i0 + 32),
               r3 = _mm512_loadu_ps(acc + i0 + 48), r4 = _mm512_loadu_ps(acc + i0 + 64), r5 = _mm512_loadu_ps(acc + i0 + 80),
               r6 = _mm512_loadu_ps(acc + i0 + 96), r7 = _mm512_loadu_ps(acc + i0 + 112);
        for (i64 s = 0; s < S; s++) {
            i64 j = idx[s];
            if (j < 0 || v[s] == 0.0f) continue;
            const float* w = W + j * d + i0;
            __m512 a = _mm512_set1_ps(v[s]);
            r0 = _mm512_fmadd_ps(a, _mm512_loadu_ps(w), r0);
            r1 = _mm512_fmadd_ps(a, _mm512_loadu_ps(w + 16), r1);
            r2 = _mm512_fmadd_ps(a, _mm512_loadu_ps(w + 32), r2);
            r3 = _mm512_fmadd_ps(a, _mm512_loadu_ps(w + 48), r3);
            r4 = _mm512_fmadd_ps(a, _mm512_loadu_ps(w + 64), r4);
            r5 = _mm512_fmadd_ps(a, _mm512_loadu_ps(w + 80), r5);
            r6 = _mm512_fmadd_ps(a, _mm512_loadu_ps(w + 96), r6);
            r7 = _mm512_fmadd_ps(a, _mm512_loadu_ps(w + 112), r7);
        }
        _mm512_storeu_ps(acc + i0, r0); _mm512_storeu_ps(acc + i0 + 16, r1);
        _mm512_storeu_ps(acc + i0 + 32, r2); _mm512_storeu_ps(acc + i0 + 48, r3);
        _mm512_storeu_ps(acc + i0 + 64, r4); _mm512_storeu_ps(acc + i0 + 80, r5);
        _mm512_storeu_ps(acc + i0 + 96, r6); _mm512_storeu_ps(acc + i0 + 112, r7);
    }
    if (i0 < d) {
        for (i64 s = 0; s < S; s++) {
            i64 j = idx[s];
            if (j < 0 || v[s] == 0.0f) continue;
            axpyf(v[s], W + j * d + i0, acc + i0, d - i0);
        }
    }
#else
    for (i64 s = 0; s < S; s++) {
        i64 j = idx[s];
        if (j < 0 || v[s] == 0.0f) continue;
        axpyf(v[s], W + j * d, acc, d);
    }
#endif
}

/* ------------------------------------------------------------------ selection */

/* Partition (v, p) so that v[0..k) are the k largest values (unordered). Requires 1 <= k <= n.
 * Hoare quickselect; only a fallback for heavy ties (branchy, so slow on random data). */
static void select_top(float* v, int32_t* p, i64 n, i64 k) {
    i64 lo = 0, hi = n - 1, t = k - 1;
    while (hi > lo) {
        i64 mid = lo + (hi - lo) / 2;
        float a = v[lo], b = v[mid], c = v[hi];
        float piv = (a > b) ? ((b > c) ? b : ((a > c) ? c : a)) : ((a > c) ? a : ((b > c) ? c : b));
        i64 i = lo, j = hi;
        while (i <= j) {
            while (v[i] > piv) i++;
            while (v[j] < piv) j--;
            if (i <= j) {
                float tv = v[i]; v[i] = v[j]; v[j] = tv;
                int32_t tp = p[i]; p[i] = p[j]; p[j] = tp;
                i++; j--;
            }
        }
        if (t <= j) hi = j;
        else if (t >= i) lo = i;
        else break;
    }
}

/* Append (a[j], j) for allowed j with a[j] >= thr (gt0: a[j] > 0 instead) to cv/ci; returns count.
 * cv/ci need 16 entries of slack (vector stores). */
static i64 collect(const float* restrict a, const uint8_t* restrict mask, i64 n, float thr, int gt0,
                   float* restrict cv, int32_t* restrict ci) {
    i64 c = 0, j = 0;
#ifdef SAE_AVX512
    const __m512 t = _mm512_set1_ps(gt0 ? 0.0f : thr);
    const int pred = gt0 ? _CMP_GT_OQ : _CMP_GE_OQ;
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; j + 16 <= n; j += 16) {
        __m512 x = _mm512_loadu_ps(a + j);
        __mmask16 k = pred == _CMP_GT_OQ ? _mm512_cmp_ps_mask(x, t, _CMP_GT_OQ) : _mm512_cmp_ps_mask(x, t, _CMP_GE_OQ);
        if (mask) k &= _mm512_test_epi32_mask(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(mask + j))),
                                              _mm512_set1_epi32(0xFF));
        if (!k) continue;
        _mm512_storeu_ps(cv + c, _mm512_maskz_compress_ps(k, x));
        _mm512_storeu_si512((void*)(ci + c), _mm512_maskz_compress_epi32(k, _mm512_add_epi32(iota, _mm512_set1_epi32((int)j))));
        c += __builtin_popcount((unsigned)k);
    }
#endif
    for (; j < n; j++) {
        float x = a[j];
        int ok = (gt0 ? (x > 0.0f) : (x >= thr)) && (!mask || mask[j]);
        cv[c] = x; ci[c] = (int32_t)j;
        c += ok;
    }
    return c;
}

static inline i64 count_ge(const float* restrict cv, i64 C, float t) {
    i64 c = 0, i = 0;
#ifdef SAE_AVX512
    const __m512 tt = _mm512_set1_ps(t);
    for (; i + 16 <= C; i += 16) c += __builtin_popcount((unsigned)_mm512_cmp_ps_mask(_mm512_loadu_ps(cv + i), tt, _CMP_GE_OQ));
#endif
    for (; i < C; i++) c += cv[i] >= t;
    return c;
}

/* Top-k POSITIVE entries of a[0..n) (only where mask[j] != 0 if mask is given). Writes
 * c = min(k, #positive allowed) entries to ov/oi (unordered) and returns c.
 * Scratch: cv/ci of n + 16 entries, gm of k + 16 floats.
 *
 * 1. Lower bound: split a into k strided groups; the smallest group max is <= the k-th largest
 *    element (the k group maxima are k distinct elements at least that large).
 * 2. Collect the candidates >= that bound (vector compress): about 4-25% of the row.
 * 3. Bisect a threshold t on the candidates until exactly k are >= t (vector counts).
 * Branch-light throughout: a quickselect on random data mispredicts every other compare.
 * Heavy ties fall back to a quickselect. */
static i64 row_topk(const float* restrict a, const uint8_t* restrict mask, i64 n, i64 k,
                    float* ov, i64* oi, float* cv, int32_t* ci, float* gm) {
    if (k <= 0 || n <= 0) return 0;
    float lo = 0.0f;
    int gt0 = 1;
    if (2 * k <= n) {
        i64 G = k, gs = n / G;
        for (i64 g = 0; g < G; g++) gm[g] = 0.0f;
        for (i64 q = 0; q < gs; q++) {
            const float* ar = a + q * G;
            if (mask) {
                const uint8_t* mr = mask + q * G;
#pragma omp simd
                for (i64 g = 0; g < G; g++) { float x = mr[g] ? ar[g] : 0.0f; gm[g] = x > gm[g] ? x : gm[g]; }
            } else {
#pragma omp simd
                for (i64 g = 0; g < G; g++) { float x = ar[g]; gm[g] = x > gm[g] ? x : gm[g]; }
            }
        }
        float mn = FLT_MAX;
        for (i64 g = 0; g < G; g++) mn = gm[g] < mn ? gm[g] : mn;
        if (mn > 0.0f) { lo = mn; gt0 = 0; }
    }
    i64 C = collect(a, mask, n, lo, gt0, cv, ci);
    i64 c;
    if (C <= k) {
        c = C;
    } else {
        float hi = cv[0];
        float lo2 = cv[0];
        for (i64 i = 1; i < C; i++) { hi = cv[i] > hi ? cv[i] : hi; lo2 = cv[i] < lo2 ? cv[i] : lo2; }
        /* invariant: count(>= lo2) = C > k; count(>= hi) >= 1 */
        float t = 0.0f;
        int found = 0;
        for (int it = 0; it < 64; it++) {
            float mid = lo2 + 0.5f * (hi - lo2);
            if (!(mid > lo2) || !(mid < hi)) break;
            i64 cm = count_ge(cv, C, mid);
            if (cm == k) { t = mid; found = 1; break; }
            if (cm > k) lo2 = mid; else hi = mid;
        }
        if (!found && count_ge(cv, C, hi) == k) { t = hi; found = 1; }
        if (found) {
            i64 w = 0;
            for (i64 i = 0; i < C; i++) {
                float x = cv[i];
                cv[w] = x; ci[w] = ci[i];
                w += x >= t;
            }
            c = k;
        } else {
            select_top(cv, ci, C, k);
            c = k;
        }
    }
    for (i64 s = 0; s < c; s++) { ov[s] = cv[s]; oi[s] = ci[s]; }
    return c;
}

/* Row-wise TopK over a chunk pre [B, eb, m] (members e0..e0+eb of E), positive entries only.
 * kk[eb]: k per member; mask [eb, m] (uint8, optional): only these latents may be selected;
 * bias [eb, m] (optional): added to pre IN PLACE first (so later selections on the chunk see it).
 * Writes slots [0, S) of out_v/out_i [B, E, S] at member e0+e; unused slots get v=0, idx=-1. */
void sel_topk(float* pre, i64 B, i64 eb, i64 m, const i64* kk, const uint8_t* mask, const float* bias,
              float* out_v, i64* out_i, i64 E, i64 S, i64 e0, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        float* cv = (float*)malloc((size_t)(m + 16) * sizeof(float));
        int32_t* ci = (int32_t*)malloc((size_t)(m + 16) * sizeof(int32_t));
        float* gm = (float*)malloc((size_t)(m + 16) * sizeof(float));
#pragma omp for schedule(static)
        for (i64 row = 0; row < B * eb; row++) {
            i64 b = row / eb, e = row % eb;
            i64 k = kk[e] < S ? kk[e] : S;
            const uint8_t* mk = mask ? mask + e * m : NULL;
            float* ov = out_v + (b * E + e0 + e) * S;
            i64* oi = out_i + (b * E + e0 + e) * S;
            float* a = pre + row * m;
            if (bias) {  /* add the encoder bias in place: the row is then hot for the selection */
                const float* be = bias + e * m;
#pragma omp simd
                for (i64 j = 0; j < m; j++) a[j] += be[j];
            }
            i64 c = row_topk(a, mk, m, k, ov, oi, cv, ci, gm);
            for (i64 s = c; s < S; s++) { ov[s] = 0.0f; oi[s] = -1; }
        }
        free(cv); free(ci); free(gm);
    }
}

/* BatchTopK threshold: for each member e of the chunk, the n_keep[e]-th largest positive value
 * over all B*m pre-activations of that member (0 if fewer are positive). */
void batch_kth(const float* pre, i64 B, i64 eb, i64 m, const i64* n_keep, float* thr_out, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        i64 n = B * m;
        float* buf = (float*)malloc((size_t)n * sizeof(float));
        float* cv = (float*)malloc((size_t)(n + 16) * sizeof(float));
        int32_t* ci = (int32_t*)malloc((size_t)(n + 16) * sizeof(int32_t));
        float* gm = (float*)malloc((size_t)(n + 16) * sizeof(float));
        i64 kmax = 0;
        for (i64 e = 0; e < eb; e++) kmax = n_keep[e] > kmax ? n_keep[e] : kmax;
        if (kmax > n) kmax = n;
        float* tv = (float*)malloc((size_t)(kmax + 1) * sizeof(float));
        i64* ti = (i64*)malloc((size_t)(kmax + 1) * sizeof(i64));
#pragma omp for schedule(dynamic, 1)
        for (i64 e = 0; e < eb; e++) {
            for (i64 b = 0; b < B; b++) memcpy(buf + b * m, pre + (b * eb + e) * m, (size_t)m * sizeof(float));
            i64 k = n_keep[e] < n ? n_keep[e] : n;
            i64 c = row_topk(buf, NULL, n, k, tv, ti, cv, ci, gm);
            float t = 0.0f;
            if (c == k && c > 0) {
                t = FLT_MAX;
                for (i64 q = 0; q < c; q++) t = tv[q] < t ? tv[q] : t;
            }
            thr_out[e] = t;
        }
        free(buf); free(cv); free(ci); free(gm); free(tv); free(ti);
    }
}

/* Threshold selection over a chunk pre [B, eb, m].
 * Threshold per latent (thr_lat [eb, m]) or per member (thr_mem [eb]); active = x > thr and x > 0.
 * window > 0 also keeps entries with thr - window < x <= thr (value 0, index kept): the
 * JumpReLU pseudo-gradient needs the decoder's gradient at those latents.
 * fill == 0: counts[B*eb] = slots per row. fill == 1: write slots into out [B, E, S] at member
 * e0+e (out_p: the pre-activation of each slot, optional); unused slots v=0, idx=-1. */
void sel_threshold(const float* pre, i64 B, i64 eb, i64 m, const float* thr_lat, const float* thr_mem,
                   float window, int fill, i64* counts, float* out_v, i64* out_i, float* out_p,
                   i64 E, i64 S, i64 e0, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (i64 row = 0; row < B * eb; row++) {
        i64 b = row / eb, e = row % eb;
        const float* a = pre + row * m;
        const float* tl = thr_lat ? thr_lat + e * m : NULL;
        float tm = thr_mem ? thr_mem[e] : 0.0f;
        if (!fill) {
            i64 c = 0;
            for (i64 j = 0; j < m; j++) {
                float t = tl ? tl[j] : tm;
                float x = a[j];
                c += ((x > t) && (x > 0.0f)) || ((window > 0.0f) && (x > t - window));
            }
            counts[row] = c;
        } else {
            float* ov = out_v + (b * E + e0 + e) * S;
            i64* oi = out_i + (b * E + e0 + e) * S;
            float* op = out_p ? out_p + (b * E + e0 + e) * S : NULL;
            i64 c = 0;
            for (i64 j = 0; j < m && c < S; j++) {
                float t = tl ? tl[j] : tm;
                float x = a[j];
                int active = (x > t) && (x > 0.0f);
                int near = (window > 0.0f) && (x > t - window);
                if (active || near) {
                    ov[c] = active ? x : 0.0f; oi[c] = j;
                    if (op) op[c] = x;
                    c++;
                }
            }
            for (i64 s = c; s < S; s++) { ov[s] = 0.0f; oi[s] = -1; if (op) op[s] = 0.0f; }
        }
    }
}

/* ------------------------------------------------------------------ decoder */

/* out[l, b, e, :] = bias + base[b,e] - target[b] + sum over slots with level(idx) <= l of v * W[e, idx]
 * (each term optional). Optionally accumulates sse[l, e] = sum_b |out[l,b,e]|^2 and
 * rsum[e, :] = sum_b out[L-1, b, e, :] (both in double, deterministic order). */
void dec_fwd(const float* v, const i64* idx, i64 B, i64 E, i64 S, const float* W, i64 m, i64 d,
             const int32_t* level, i64 L, const float* bias, const float* base, const float* target,
             float* out, double* sse, double* rsum, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        float* acc = (float*)malloc((size_t)(L * d) * sizeof(float));
#pragma omp for schedule(dynamic, 1)
        for (i64 e = 0; e < E; e++) {
            const float* We = W + e * m * d;
            for (i64 b = 0; b < B; b++) {
                const float* bb = base ? base + (b * E + e) * d : NULL;
                const float* tt = target ? target + b * d : NULL;
                const float* bi = bias ? bias + e * d : NULL;
                for (i64 i = 0; i < d; i++) {
                    float s = 0.0f;
                    if (bi) s += bi[i];
                    if (bb) s += bb[i];
                    if (tt) s -= tt[i];
                    acc[i] = s;
                }
                for (i64 i = d; i < L * d; i++) acc[i] = 0.0f;
                const float* vs = v + (b * E + e) * S;
                const i64* is = idx + (b * E + e) * S;
                if (L == 1) {
                    gather_accum(acc, We, is, vs, S, d);
                } else {
                    for (i64 s = 0; s < S; s++) {
                        i64 j = is[s];
                        if (j < 0 || vs[s] == 0.0f) continue;
                        i64 l = level ? level[j] : 0;
                        axpyf(vs[s], We + j * d, acc + l * d, d);
                    }
                }
                for (i64 l = 1; l < L; l++) axpyf(1.0f, acc + (l - 1) * d, acc + l * d, d);
                for (i64 l = 0; l < L; l++) {
                    float* o = out + ((l * B + b) * E + e) * d;
                    memcpy(o, acc + l * d, (size_t)d * sizeof(float));
                    if (sse) sse[l * E + e] += (double)dotf(acc + l * d, acc + l * d, d);
                }
                if (rsum) {
                    const float* al = acc + (L - 1) * d;
                    double* rs = rsum + e * d;
                    for (i64 i = 0; i < d; i++) rs[i] += al[i];
                }
            }
        }
        free(acc);
    }
}

/* Backward of dec_fwd. The gradient reaching level-l contributions is
 *   G_l[b, e] = sum_{p >= l} coef[p, e] * src[p, b, e]
 * (src = residuals and coef = 2 dLoss/dsse for a squared-error loss; src = dLoss/dout, coef = 1
 * for an arbitrary loss). Writes gv[b, e, s] = <W[e, idx], G_level(idx)> for every slot with
 * idx >= 0, accumulates gW[e, idx] += v * G (optional), gbias[e] += G_0 (optional) and writes
 * gbase[b, e] = G_0 (optional). overwrite_w / _b: zero each member's gW / gbias block first (in cache),
 * so a persistent gradient buffer needs no separate zero-fill pass. */
static inline void build_G(float* G, const float* src, const float* coef, i64 b, i64 e, i64 B, i64 E, i64 L, i64 d) {
    for (i64 l = L - 1; l >= 0; l--) {
        const float* sr = src + ((l * B + b) * E + e) * d;
        float c = coef ? coef[l * E + e] : 1.0f;
        float* Gl = G + l * d;
        if (l == L - 1) {
#pragma omp simd
            for (i64 i = 0; i < d; i++) Gl[i] = c * sr[i];
        } else {
            const float* Gn = G + (l + 1) * d;
#pragma omp simd
            for (i64 i = 0; i < d; i++) Gl[i] = Gn[i] + c * sr[i];
        }
    }
}

void dec_bwd(const float* v, const i64* idx, i64 B, i64 E, i64 S, const float* W, i64 m, i64 d,
             const int32_t* level, i64 L, const float* src, const float* coef,
             float* gv, float* gW, float* gbias, float* gbase, int overwrite_w, int overwrite_b, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        float* G = (float*)malloc((size_t)(L * d) * sizeof(float));
#pragma omp for schedule(dynamic, 1)
        for (i64 e = 0; e < E; e++) {
            const float* We = W + e * m * d;
            float* gWe = gW ? gW + e * m * d : NULL;
            if (overwrite_b && gbias) memset(gbias + e * d, 0, (size_t)d * sizeof(float));
            /* pass 1: value gradients (gather-dot against the decoder rows W[e], in L2) */
            for (i64 b = 0; b < B; b++) {
                build_G(G, src, coef, b, e, B, E, L, d);
                if (gbias) axpyf(1.0f, G, gbias + e * d, d);
                if (gbase) memcpy(gbase + (b * E + e) * d, G, (size_t)d * sizeof(float));
                const i64* is = idx + (b * E + e) * S;
                float* gs = gv + (b * E + e) * S;
                for (i64 s = 0; s < S; s++) {
                    i64 j = is[s];
                    gs[s] = j < 0 ? 0.0f : dotf(We + j * d, G + (level ? level[j] : 0) * d, d);
                }
            }
            /* pass 2: decoder-row gradients (scatter into gW[e], in L2); two passes keep one
             * m x d table in cache at a time instead of two */
            if (gWe) {
                if (overwrite_w) memset(gWe, 0, (size_t)(m * d) * sizeof(float));
                for (i64 b = 0; b < B; b++) {
                    build_G(G, src, coef, b, e, B, E, L, d);
                    const float* vs = v + (b * E + e) * S;
                    const i64* is = idx + (b * E + e) * S;
                    for (i64 s = 0; s < S; s++) {
                        i64 j = is[s];
                        if (j < 0 || vs[s] == 0.0f) continue;
                        axpyf(vs[s], G + (level ? level[j] : 0) * d, gWe + j * d, d);
                    }
                }
            }
        }
        free(G);
    }
}

/* Slots of one (sample, member) with idx >= 0 in level order (stable counting sort): latent oj[t],
 * value ov[t], original slot os[t]; level l owns t in [start[l], start[l+1]). Returns the count. */
static i64 level_order(const i64* is, const float* vs, i64 S, const int32_t* level, i64 L,
                       i64* oj, float* ov, i64* os, i64* start, i64* pos) {
    for (i64 l = 0; l <= L; l++) start[l] = 0;
    for (i64 s = 0; s < S; s++)
        if (is[s] >= 0) start[(level ? level[is[s]] : 0) + 1]++;
    for (i64 l = 0; l < L; l++) { start[l + 1] += start[l]; pos[l] = start[l]; }
    for (i64 s = 0; s < S; s++) {
        i64 j = is[s];
        if (j < 0) continue;
        i64 p = pos[level ? level[j] : 0]++;
        oj[p] = j; ov[p] = vs[s]; os[p] = s;
    }
    return start[L];
}

#ifdef SAE_AVX512
#define R8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
/* 16 lanes of sum_q x_q * y_q over the eight registers x0..x7, y0..y7: two interleaved FMA chains,
 * the same order everywhere it is used */
#define DOT8(x, y) _mm512_add_ps( \
    _mm512_fmadd_ps(x##6, y##6, _mm512_fmadd_ps(x##4, y##4, _mm512_fmadd_ps(x##2, y##2, _mm512_mul_ps(x##0, y##0)))), \
    _mm512_fmadd_ps(x##7, y##7, _mm512_fmadd_ps(x##5, y##5, _mm512_fmadd_ps(x##3, y##3, _mm512_mul_ps(x##1, y##1)))))
/* Forward of columns [i0, i0 + 128) of one (sample, member), everything that is per column fused:
 * eight registers start at bias + base - target and run through the slots in level order; after
 * each level they are that prefix's residual acc[l] (stored, squared into ssev[l]), so every
 * prefix costs one load per FMA and no extra pass. Then, still in cache: G_l = sum_{p >= l} c[p] acc[p]
 * into G (the loss gradient), rsum += acc[L-1], gbias += G_0, gbase = G_0. */
static inline void fwd_block128(float* restrict acc, i64 d, i64 i0, const float* bias, const float* base,
                                const float* target, const float* restrict We, const i64* oj, const float* ov,
                                const i64* start, i64 L, float* restrict ssev, const float* c, float* restrict G,
                                double* rsum, float* gbias, float* gbase) {
#define LD(q) __m512 r##q = bias ? _mm512_loadu_ps(bias + i0 + 16 * q) : _mm512_setzero_ps();
    R8(LD)
#undef LD
    if (base) {
#define AB(q) r##q = _mm512_add_ps(r##q, _mm512_loadu_ps(base + i0 + 16 * q));
        R8(AB)
#undef AB
    }
    if (target) {
#define SB(q) r##q = _mm512_sub_ps(r##q, _mm512_loadu_ps(target + i0 + 16 * q));
        R8(SB)
#undef SB
    }
    for (i64 l = 0; l < L; l++) {
        for (i64 t = start[l]; t < start[l + 1]; t++) {
            if (ov[t] == 0.0f) continue;
            const float* w = We + oj[t] * d + i0;
            __m512 a = _mm512_set1_ps(ov[t]);
#define FM(q) r##q = _mm512_fmadd_ps(a, _mm512_loadu_ps(w + 16 * q), r##q);
            R8(FM)
#undef FM
        }
        float* o = acc + l * d + i0;
#define ST(q) _mm512_storeu_ps(o + 16 * q, r##q);
        R8(ST)
#undef ST
        _mm512_storeu_ps(ssev + 16 * l, _mm512_add_ps(_mm512_loadu_ps(ssev + 16 * l), DOT8(r, r)));
    }
    if (rsum) {
#define RS(q) _mm512_storeu_pd(rsum + i0 + 16 * q, _mm512_add_pd(_mm512_loadu_pd(rsum + i0 + 16 * q), \
                  _mm512_cvtps_pd(_mm512_castps512_ps256(r##q)))); \
              _mm512_storeu_pd(rsum + i0 + 16 * q + 8, _mm512_add_pd(_mm512_loadu_pd(rsum + i0 + 16 * q + 8), \
                  _mm512_cvtps_pd(_mm512_extractf32x8_ps(r##q, 1))));
        R8(RS)
#undef RS
    }
    /* G_{L-1} = c[L-1] acc[L-1] (in registers), then downwards with the stored snapshots */
    {
        __m512 cc = _mm512_set1_ps(c[L - 1]);
#define G0(q) r##q = _mm512_mul_ps(cc, r##q); _mm512_storeu_ps(G + (L - 1) * d + i0 + 16 * q, r##q);
        R8(G0)
#undef G0
    }
    for (i64 l = L - 2; l >= 0; l--) {
        __m512 cc = _mm512_set1_ps(c[l]);
        const float* al = acc + l * d + i0;
#define GL(q) r##q = _mm512_fmadd_ps(cc, _mm512_loadu_ps(al + 16 * q), r##q); _mm512_storeu_ps(G + l * d + i0 + 16 * q, r##q);
        R8(GL)
#undef GL
    }
    if (gbias) {
#define GB(q) _mm512_storeu_ps(gbias + i0 + 16 * q, _mm512_add_ps(_mm512_loadu_ps(gbias + i0 + 16 * q), r##q));
        R8(GB)
#undef GB
    }
    if (gbase) {
#define GS(q) _mm512_storeu_ps(gbase + i0 + 16 * q, r##q);
        R8(GS)
#undef GS
    }
}

/* Backward of columns [i0, i0 + 128) for ONE latent j over its entries t in [c0, c1) of a tile
 * (sample ent_b[t], value ent_v[t]): the decoder row's block and its gradient's block stay in
 * registers while the entries' G rows stream past (one load per two FMAs); each entry's partial
 * dot <W[j], G> is added to gvl[t - c0] (16 lanes, reduced by the caller). */
static inline void bwdT_block128(const float* restrict wj, float* gwj, i64 i0, const float* restrict Gt, i64 rowstride,
                                 const i64* ent_b, const float* ent_v, i64 c0, i64 c1, float* restrict gvl) {
#define LW(q) const __m512 w##q = _mm512_loadu_ps(wj + i0 + 16 * q);
    R8(LW)
#undef LW
#define LA(q) __m512 a##q = gwj ? _mm512_loadu_ps(gwj + i0 + 16 * q) : _mm512_setzero_ps();
    R8(LA)
#undef LA
    for (i64 t = c0; t < c1; t++) {
        const float* gb = Gt + ent_b[t] * rowstride + i0;
#define LG(q) const __m512 g##q = _mm512_loadu_ps(gb + 16 * q);
        R8(LG)
#undef LG
        float* gp = gvl + 16 * (t - c0);
        _mm512_storeu_ps(gp, _mm512_add_ps(_mm512_loadu_ps(gp), DOT8(w, g)));
        if (ent_v[t] != 0.0f) {
            const __m512 va = _mm512_set1_ps(ent_v[t]);
#define AC(q) a##q = _mm512_fmadd_ps(va, g##q, a##q);
            R8(AC)
#undef AC
        }
    }
    if (gwj) {
#define SA(q) _mm512_storeu_ps(gwj + i0 + 16 * q, a##q);
        R8(SA)
#undef SA
    }
}
#undef R8
#endif

/* Columns [i0, d) that no full 128-block covers (any width; also the path without AVX-512):
 * the same work as fwd_block128, one pass per step. */
static void fwd_tail(float* restrict acc, i64 d, i64 i0, const float* bias, const float* base, const float* target,
                     const float* restrict We, const i64* oj, const float* ov, const i64* start, i64 L,
                     float* restrict sstail, const float* c, float* restrict G, double* rsum, float* gbias,
                     float* gbase) {
    if (i0 >= d) return;
    const i64 n = d - i0;
    float* a0 = acc + i0;
    if (bias) memcpy(a0, bias + i0, (size_t)n * sizeof(float));
    else memset(a0, 0, (size_t)n * sizeof(float));
    if (base) axpyf(1.0f, base + i0, a0, n);
    if (target) axpyf(-1.0f, target + i0, a0, n);
    for (i64 l = 0; l < L; l++) {
        float* al = acc + l * d + i0;
        if (l > 0) memcpy(al, acc + (l - 1) * d + i0, (size_t)n * sizeof(float));
        for (i64 t = start[l]; t < start[l + 1]; t++)
            if (ov[t] != 0.0f) axpyf(ov[t], We + oj[t] * d + i0, al, n);
        sstail[l] += dotf(al, al, n);
    }
    if (rsum)
        for (i64 i = 0; i < n; i++) rsum[i0 + i] += (double)acc[(L - 1) * d + i0 + i];
    for (i64 l = L - 1; l >= 0; l--) {
        const float* al = acc + l * d + i0;
        float* Gl = G + l * d + i0;
        if (l == L - 1) {
            for (i64 i = 0; i < n; i++) Gl[i] = c[l] * al[i];
        } else {
            const float* Gn = G + (l + 1) * d + i0;
            for (i64 i = 0; i < n; i++) Gl[i] = Gn[i] + c[l] * al[i];
        }
    }
    if (gbias) axpyf(1.0f, G + i0, gbias + i0, n);
    if (gbase) memcpy(gbase + i0, G + i0, (size_t)n * sizeof(float));
}

/* Decoder forward, squared-error loss and its backward in ONE pass per (member, sample).
 * The loss is fixed: loss[e] = sum_l wsse[l, e] * sse[l, e] with out[l] = bias + base - target +
 * sum_{level <= l} v W[e, idx] (the residual of prefix l). Its gradient is therefore known during
 * the forward: G_l = sum_{p >= l} 2 wsse[p, e] out[p]. Computing it here avoids writing the
 * [L, B, E, d] residual and reading it back, and the decoder rows the forward just gathered are
 * still in L1/L2 for the value-gradient dots.
 * The slots are visited in level order (Matryoshka prefixes), so the forward keeps a 128-column
 * block of the running reconstruction in registers and every prefix is a snapshot of it, and the
 * backward keeps G_l's block in registers for all slots of level l: one load per FMA, except the
 * read-modify-write of the decoder-gradient rows.
 * Outputs: sse [L, E] and rsum [E, d] (accumulated, double), out (optional), gv [B, E, S],
 * gW [E, m, d] (+=, optional), gbias [E, d] (+=, optional), gbase [B, E, d] (=, optional).
 * ow_w / ow_b: zero the member's gW / gbias block first. */
void dec_fused(const float* v, const i64* idx, i64 B, i64 E, i64 S, const float* W, i64 m, i64 d,
               const int32_t* level, i64 L, const float* bias, const float* base, const float* target,
               const float* wsse, float* out, double* sse, double* rsum,
               float* gv, float* gW, float* gbias, float* gbase, int ow_w, int ow_b, int nthreads) {
    /* a tile's G rows ([Tb, L, d], ~256 KB) stay in L2 next to the member's W and gW */
    i64 Tb = 65536 / (L * d > 0 ? L * d : 1);
    Tb = Tb < 1 ? 1 : (Tb > B ? B : Tb);
    const i64 TS = Tb * (S > 0 ? S : 1);
#pragma omp parallel num_threads(nthreads)
    {
        float* acc = (float*)malloc((size_t)(L * d) * sizeof(float));
        float* Gt = (float*)malloc((size_t)(Tb * L * d) * sizeof(float));
        i64* oj = (i64*)malloc((size_t)TS * sizeof(i64));
        i64* os = (i64*)malloc((size_t)TS * sizeof(i64));
        float* ov = (float*)malloc((size_t)TS * sizeof(float));
        i64* nsl = (i64*)malloc((size_t)Tb * sizeof(i64));
        i64* ent_b = (i64*)malloc((size_t)TS * sizeof(i64));
        i64* ent_s = (i64*)malloc((size_t)TS * sizeof(i64));
        float* ent_v = (float*)malloc((size_t)TS * sizeof(float));
        i64* cnt = (i64*)malloc((size_t)(2 * m + 2) * sizeof(i64));
        i64* fill = cnt + m + 1;
        float* gvl = (float*)malloc((size_t)(16 * TS + 16) * sizeof(float));
        i64* start = (i64*)malloc((size_t)(2 * L + 2) * sizeof(i64));
        i64* pos = start + L + 1;
        float* ssv = (float*)malloc((size_t)(18 * L) * sizeof(float));
        float* cl = ssv + 17 * L;
#ifdef SAE_AVX512
        const i64 dfull = d - d % 128;
#else
        const i64 dfull = 0;
#endif
#pragma omp for schedule(dynamic, 1)
        for (i64 e = 0; e < E; e++) {
            const float* We = W + e * m * d;
            float* gWe = gW ? gW + e * m * d : NULL;
            if (ow_w && gWe) memset(gWe, 0, (size_t)(m * d) * sizeof(float));
            if (ow_b && gbias) memset(gbias + e * d, 0, (size_t)d * sizeof(float));
            for (i64 l = 0; l < L; l++) cl[l] = 2.0f * wsse[l * E + e];
            for (i64 b0 = 0; b0 < B; b0 += Tb) {
                const i64 nb = B - b0 < Tb ? B - b0 : Tb;
                /* phase 1, per sample: forward, loss terms and G = dLoss/d(prefix outputs) into the tile */
                for (i64 bl = 0; bl < nb; bl++) {
                    const i64 b = b0 + bl;
                    const float* bb = base ? base + (b * E + e) * d : NULL;
                    const float* tt = target ? target + b * d : NULL;
                    const float* bi = bias ? bias + e * d : NULL;
                    const i64* is = idx + (b * E + e) * S;
                    i64* bj = oj + bl * S;
                    float* bv = ov + bl * S;
                    nsl[bl] = level_order(is, v + (b * E + e) * S, S, level, L, bj, bv, os + bl * S, start, pos);
                    float* G = Gt + bl * L * d;
                    double* rs = rsum ? rsum + e * d : NULL;
                    float* gbi = gbias ? gbias + e * d : NULL;
                    float* gba = gbase ? gbase + (b * E + e) * d : NULL;
                    memset(ssv, 0, (size_t)(17 * L) * sizeof(float));
#ifdef SAE_AVX512
                    for (i64 i0 = 0; i0 < dfull; i0 += 128)
                        fwd_block128(acc, d, i0, bi, bb, tt, We, bj, bv, start, L, ssv, cl, G, rs, gbi, gba);
#endif
                    fwd_tail(acc, d, dfull, bi, bb, tt, We, bj, bv, start, L, ssv + 16 * L, cl, G, rs, gbi, gba);
                    for (i64 l = 0; l < L; l++) {
                        float s2 = ssv[16 * L + l];
#ifdef SAE_AVX512
                        if (dfull) s2 += _mm512_reduce_add_ps(_mm512_loadu_ps(ssv + 16 * l));
#endif
                        sse[l * E + e] += (double)s2;
                        if (out) memcpy(out + ((l * B + b) * E + e) * d, acc + l * d, (size_t)d * sizeof(float));
                    }
                    float* gs = gv + (b * E + e) * S;
                    for (i64 s = 0; s < S; s++) gs[s] = 0.0f;
                }
                /* the tile's slots grouped by latent (samples in order: deterministic) */
                memset(cnt, 0, (size_t)(m + 1) * sizeof(i64));
                for (i64 bl = 0; bl < nb; bl++)
                    for (i64 t = 0; t < nsl[bl]; t++) cnt[oj[bl * S + t] + 1]++;
                for (i64 j = 0; j < m; j++) { cnt[j + 1] += cnt[j]; fill[j] = cnt[j]; }
                for (i64 bl = 0; bl < nb; bl++)
                    for (i64 t = 0; t < nsl[bl]; t++) {
                        i64 p = fill[oj[bl * S + t]]++;
                        ent_b[p] = bl; ent_s[p] = os[bl * S + t]; ent_v[p] = ov[bl * S + t];
                    }
                /* phase 2, per latent: value gradients <W[j], G> and gW[j] += sum v G (G of j's level) */
                for (i64 j = 0; j < m; j++) {
                    const i64 c0 = cnt[j], c1 = cnt[j + 1];
                    if (c0 == c1) continue;
                    const float* wj = We + j * d;
                    float* gwj = gWe ? gWe + j * d : NULL;
                    const float* Gj = Gt + (level ? level[j] : 0) * d;
                    memset(gvl, 0, (size_t)(16 * (c1 - c0)) * sizeof(float));
#ifdef SAE_AVX512
                    for (i64 i0 = 0; i0 < dfull; i0 += 128)
                        bwdT_block128(wj, gwj, i0, Gj, L * d, ent_b, ent_v, c0, c1, gvl);
#endif
                    for (i64 t = c0; t < c1; t++) {
                        const float* gb = Gj + ent_b[t] * L * d;
                        float g = dfull < d ? dotf(wj + dfull, gb + dfull, d - dfull) : 0.0f;
                        if (gwj && dfull < d && ent_v[t] != 0.0f) axpyf(ent_v[t], gb + dfull, gwj + dfull, d - dfull);
#ifdef SAE_AVX512
                        if (dfull) g += _mm512_reduce_add_ps(_mm512_loadu_ps(gvl + 16 * (t - c0)));
#endif
                        gv[((b0 + ent_b[t]) * E + e) * S + ent_s[t]] = g;
                    }
                }
            }
        }
        free(acc); free(Gt); free(oj); free(os); free(ov); free(nsl); free(ent_b); free(ent_s);
        free(ent_v); free(cnt); free(gvl); free(start); free(ssv);
    }
}

/* ------------------------------------------------------------------ encoder backward */

/* gWenc[e, idx] += gv * x[b] and gbenc[e, idx] += gv for every slot with idx >= 0 and v > 0
 * (the gradient through relu / the TopK or JumpReLU gate: only active latents).
 * Per member the active slots are grouped by latent (samples in order, so the sums run in the same
 * order as a per-sample scatter); each gradient row is then built in registers, 128 columns at a
 * time, while the x rows of its samples stream past: one load per FMA and one store per row
 * instead of a read-modify-write per slot. overwrite_w / _b: zero each member's gW / gb block first. */
void enc_bwd(const float* gv, const float* v, const i64* idx, i64 B, i64 E, i64 S,
             const float* x, i64 din, i64 m, float* gW, float* gb, int overwrite_w, int overwrite_b, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        i64* cnt = (i64*)malloc((size_t)(2 * m + 2) * sizeof(i64));
        i64* fill = cnt + m + 1;
        i64* ent_b = (i64*)malloc((size_t)(B * S + 1) * sizeof(i64));
        float* ent_g = (float*)malloc((size_t)(B * S + 1) * sizeof(float));
#pragma omp for schedule(dynamic, 1)
        for (i64 e = 0; e < E; e++) {
            float* gWe = gW ? gW + e * m * din : NULL;
            float* gbe = gb ? gb + e * m : NULL;
            if (overwrite_w && gWe) memset(gWe, 0, (size_t)(m * din) * sizeof(float));
            if (overwrite_b && gbe) memset(gbe, 0, (size_t)m * sizeof(float));
            memset(cnt, 0, (size_t)(m + 1) * sizeof(i64));
            for (i64 b = 0; b < B; b++) {
                const float* vs = v + (b * E + e) * S;
                const float* gs = gv + (b * E + e) * S;
                const i64* is = idx + (b * E + e) * S;
                for (i64 s = 0; s < S; s++)
                    if (is[s] >= 0 && vs[s] > 0.0f && gs[s] != 0.0f) cnt[is[s] + 1]++;
            }
            for (i64 j = 0; j < m; j++) { cnt[j + 1] += cnt[j]; fill[j] = cnt[j]; }
            for (i64 b = 0; b < B; b++) {
                const float* vs = v + (b * E + e) * S;
                const float* gs = gv + (b * E + e) * S;
                const i64* is = idx + (b * E + e) * S;
                for (i64 s = 0; s < S; s++)
                    if (is[s] >= 0 && vs[s] > 0.0f && gs[s] != 0.0f) {
                        i64 p = fill[is[s]]++;
                        ent_b[p] = b; ent_g[p] = gs[s];
                    }
            }
            for (i64 j = 0; j < m; j++) {
                const i64 c0 = cnt[j], c1 = cnt[j + 1];
                if (c0 == c1) continue;
                if (gbe) {
                    float a = gbe[j];
                    for (i64 t = c0; t < c1; t++) a += ent_g[t];
                    gbe[j] = a;
                }
                if (!gWe) continue;
                gather_accum(gWe + j * din, x, ent_b + c0, ent_g + c0, c1 - c0, din);
            }
        }
        free(cnt); free(ent_b); free(ent_g);
    }
}

/* gx[b] += sum over members and active slots of gv * Wenc[e, idx] (gradient w.r.t. the input). */
void enc_bwd_x(const float* gv, const float* v, const i64* idx, i64 B, i64 E, i64 S,
               const float* Wenc, i64 din, i64 m, float* gx, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (i64 b = 0; b < B; b++) {
        float* gxb = gx + b * din;
        for (i64 e = 0; e < E; e++) {
            const float* vs = v + (b * E + e) * S;
            const float* gs = gv + (b * E + e) * S;
            const i64* is = idx + (b * E + e) * S;
            for (i64 s = 0; s < S; s++) {
                i64 j = is[s];
                if (j < 0 || !(vs[s] > 0.0f) || gs[s] == 0.0f) continue;
                axpyf(gs[s], Wenc + (e * m + j) * din, gxb, din);
            }
        }
    }
}

/* ------------------------------------------------------------------ training bookkeeping */

/* since[e, j] += add for every latent, then 0 for every latent active (v > 0) in some slot. */
void fired_update(const float* v, const i64* idx, i64 B, i64 E, i64 S, i64 m, i64* since, i64 add, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (i64 e = 0; e < E; e++) {
        i64* se = since + e * m;
        for (i64 j = 0; j < m; j++) se[j] += add;
        for (i64 b = 0; b < B; b++) {
            const float* vs = v + (b * E + e) * S;
            const i64* is = idx + (b * E + e) * S;
            for (i64 s = 0; s < S; s++)
                if (is[s] >= 0 && vs[s] > 0.0f) se[is[s]] = 0;
        }
    }
}

/* Decoder gradient post-processing, per member (rows stay hot in cache): remove from each
 * gradient row its component along the unit decoder row, and add the member's squared gradient
 * norm to sq[e]. */
void dec_grad_post(float* gW, const float* W, i64 E, i64 m, i64 d, double* sq, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (i64 e = 0; e < E; e++) {
        double acc = 0.0;
        for (i64 j = 0; j < m; j++) {
            float* g = gW + (e * m + j) * d;
            const float* w = W + (e * m + j) * d;
            float dt = dotf(g, w, d);
            if (dt != 0.0f) axpyf(-dt, w, g, d);
            acc += (double)dotf(g, g, d);
        }
        sq[e] += acc;
    }
}

/* sq[e] += |g[e]|^2 for a gradient viewed as [E, n]. */
void member_sqnorm(const float* g, i64 E, i64 n, double* sq, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (i64 e = 0; e < E; e++) {
        double acc = 0.0;
        const float* ge = g + e * n;
        for (i64 i0 = 0; i0 < n; i0 += 4096) {
            i64 len = n - i0 < 4096 ? n - i0 : 4096;
            acc += (double)dotf(ge + i0, ge + i0, len);
        }
        sq[e] += acc;
    }
}

/* W[r] /= |W[r]| for every row (rows with zero norm are left alone). */
void renorm_rows(float* W, i64 rows, i64 d, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (i64 r = 0; r < rows; r++) {
        float* w = W + r * d;
        float n2 = dotf(w, w, d);
        if (n2 > 0.0f) {
            float inv = 1.0f / sqrtf(n2);
#pragma omp simd
            for (i64 i = 0; i < d; i++) w[i] *= inv;
        }
    }
}

/* pre[b, :] += bias for a [B, N] chunk: the GEMM writes the chunk, the bias is added while it is
 * still in cache (torch.addmm(out=...) first copies the broadcast bias through memory). */
void add_bias(float* pre, i64 B, i64 N, const float* bias, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (i64 b = 0; b < B; b++) {
        float* r = pre + b * N;
#pragma omp simd
        for (i64 i = 0; i < N; i++) r[i] += bias[i];
    }
}
