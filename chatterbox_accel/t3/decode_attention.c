/* One decode step's attention on a CPU, float32: for each batch row b and head h,
 *   out[b,h,:] = softmax_t(q[b,h,:] . k[b,h,t,:] * scale) @ v[b,h,t,:],  t = 0 .. pos[b]
 * reading each row's cache only up to its own position (SDPA with a positional mask reads
 * every row up to the longest one, and costs about twice the memory traffic at 16 rows).
 * Any strides for b, h and t; the head dimension must be contiguous. Built and loaded by
 * cpu_attention.py; OpenMP threads are torch's own (the same libgomp, by soname). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

int decode_attention(const float *q, const float *k, const float *v, float *out, const int64_t *pos,
                     int64_t B, int64_t H, int64_t D, int64_t kv,
                     int64_t qb, int64_t qh, int64_t kb, int64_t kh, int64_t kt,
                     int64_t vb, int64_t vh, int64_t vt, int64_t ob, int64_t oh,
                     float scale, int threads) {
    int failed = 0;
#ifdef _OPENMP
    #pragma omp parallel num_threads(threads) reduction(|: failed)
#endif
    {
        float *p = malloc(sizeof(float) * (size_t)kv);
        float *acc = malloc(sizeof(float) * (size_t)D);
        if (p == NULL || acc == NULL) failed = 1;
#ifdef _OPENMP
        #pragma omp for collapse(2) schedule(static)
#endif
        for (int64_t b = 0; b < B; b++) {
            for (int64_t h = 0; h < H; h++) {
                if (p == NULL || acc == NULL) continue;
                int64_t n = pos[b] + 1;
                if (n > kv) n = kv;
                if (n < 1) n = 1;
                const float *qq = q + b * qb + h * qh;
                const float *kk = k + b * kb + h * kh;
                const float *vv = v + b * vb + h * vh;
                float m = -INFINITY;
                for (int64_t t = 0; t < n; t++) {
                    const float *kr = kk + t * kt;
                    float s = 0.f;
                    for (int64_t d = 0; d < D; d++) s += qq[d] * kr[d];
                    s *= scale;
                    p[t] = s;
                    if (s > m) m = s;
                }
                float sum = 0.f;
                for (int64_t t = 0; t < n; t++) {
                    float e = expf(p[t] - m);
                    p[t] = e;
                    sum += e;
                }
                for (int64_t d = 0; d < D; d++) acc[d] = 0.f;
                for (int64_t t = 0; t < n; t++) {
                    const float *vr = vv + t * vt;
                    float e = p[t];
                    for (int64_t d = 0; d < D; d++) acc[d] += e * vr[d];
                }
                float *o = out + b * ob + h * oh;
                float inv = 1.f / sum;
                for (int64_t d = 0; d < D; d++) o[d] = acc[d] * inv;
            }
        }
        free(p);
        free(acc);
    }
    return failed;
}
