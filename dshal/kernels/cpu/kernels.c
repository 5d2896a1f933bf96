/* dshal's C kernels for the cpu backend: one-row (decode step) float32 products.
 *
 * Why C: a decode step multiplies one activation row by every weight it uses, so it is a
 * chain of matrix-vector products bound by how fast the weights stream from memory. MKL's
 * GEMV reads several rows at a time; with short rows (a few KB) each row is its own short
 * stream that the hardware prefetcher barely ramps up on. These kernels read a weight
 * row after row in memory order (one stream), with enough independent accumulators for the
 * compiler to vectorize the dot products.
 *
 * Built at first use by dshal/kernels/cpu/__init__.py with the system C compiler, for the
 * machine it runs on; no Python API is used (loaded with ctypes). Sizes are int64_t.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Independent partial sums per dot product: wide enough for two AVX-512 or four AVX2
 * FMA chains, so a hot (cached) row is not latency-bound. */
#define LANES 32

static float dot(const float *restrict a, const float *restrict b, int64_t n)
{
    float acc[LANES] = {0.0f};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++)
            acc[j] += a[i + j] * b[i + j];
    float tail = 0.0f;
    for (; i < n; i++)
        tail += a[i] * b[i];
    for (int width = LANES / 2; width > 0; width /= 2) /* pairwise: keeps rounding error low */
        for (int j = 0; j < width; j++)
            acc[j] += acc[j + width];
    return acc[0] + tail;
}

/* y[r] = dot(w[r, :], x) (+ bias[r]); w is [n, k] row-major, bias may be NULL. */
void dshal_gemv_f32(const float *w, const float *x, const float *bias, float *y, int64_t n, int64_t k)
{
    for (int64_t r = 0; r < n; r++) {
        float v = dot(w + r * k, x, k);
        y[r] = bias ? v + bias[r] : v;
    }
}

/* One token through its top_k routed SwiGLU experts:
 *   out = sum_s gate_weights[s] * w2[e] @ (silu(w13[e, :inter] @ x) * (w13[e, inter:] @ x)),
 *   e = ids[s].
 * w13 is [experts, 2 * inter, hidden], w2 [experts, hidden, inter]; scratch holds 2 * inter
 * floats. Returns 0, or 1 + the slot whose id is outside [0, experts) (out is then unset). */
int64_t dshal_moe_token_f32(const float *x, const float *w13, const float *w2, const int64_t *ids,
                            const float *gate_weights, int64_t top_k, int64_t experts, int64_t hidden,
                            int64_t inter, float *scratch, float *out)
{
    for (int64_t s = 0; s < top_k; s++)
        if (ids[s] < 0 || ids[s] >= experts)
            return s + 1;
    for (int64_t r = 0; r < hidden; r++)
        out[r] = 0.0f;
    for (int64_t s = 0; s < top_k; s++) {
        const float *up = w13 + ids[s] * 2 * inter * hidden;
        const float *down = w2 + ids[s] * hidden * inter;
        for (int64_t r = 0; r < 2 * inter; r++)
            scratch[r] = dot(up + r * hidden, x, hidden);
        for (int64_t r = 0; r < inter; r++) {
            float g = scratch[r];
            scratch[r] = g / (1.0f + expf(-g)) * scratch[inter + r];
        }
        const float weight = gate_weights[s];
        for (int64_t r = 0; r < hidden; r++)
            out[r] += weight * dot(down + r * inter, scratch, inter);
    }
    return 0;
}

/* RMSNorm of `rows` rows of width n, optionally fused with the residual add:
 *   s = x (+ residual);  y = s / sqrt(mean(s^2) + eps) * weight
 * With residual (non-NULL) the sum s is also written to sum_out (the next residual).
 * One pass to add and square, one to scale: the row stays in L1 between them. */
void dshal_rms_norm_f32(const float *x, const float *residual, const float *weight, float eps, float *y,
                        float *sum_out, int64_t rows, int64_t n)
{
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *yr = y + r * n;
        const float *s = xr;
        if (residual) {
            const float *rr = residual + r * n;
            float *sr = sum_out + r * n;
            for (int64_t i = 0; i < n; i++)
                sr[i] = xr[i] + rr[i];
            s = sr;
        }
        const float inv_rms = 1.0f / sqrtf(dot(s, s, n) / (float)n + eps);
        for (int64_t i = 0; i < n; i++)
            yr[i] = s[i] * inv_rms * weight[i];
    }
}

/* The index of the largest v[i] among i in [0, n) with usable[i], the lowest index on ties;
 * -1 if none is usable. */
static int64_t argmax_usable(const float *v, const unsigned char *usable, int64_t n)
{
    int64_t best = -1;
    for (int64_t i = 0; i < n; i++)
        if (usable[i] && (best < 0 || v[i] > v[best]))
            best = i;
    return best;
}

/* DeepSeek-V3's router (dshal.ops.moe_gate), one token at a time:
 *   scores = sigmoid(logits); choice = scores (+ bias);
 *   with 1 < topk_group < n_group: a group's score is the sum of its two best choices (its
 *   one choice for groups of one), and only the topk_group best groups stay choosable;
 *   ids = the top_k best choices (best first); weights = scores[ids], divided by their
 *   sum + 1e-20 when norm, times scaling.
 * logits [tokens, experts], bias [experts] or NULL; weights_out [tokens, top_k],
 * ids_out [tokens, top_k]; scratch: 2 * experts + n_group floats, usable: experts +
 * n_group bytes. Returns 0, or 1 if a logit or bias is not finite (outputs unset: the
 * caller takes the reference, whose NaN ordering this kernel does not copy). */
int64_t dshal_moe_gate_f32(const float *logits, const float *bias, int64_t tokens, int64_t experts, int64_t top_k,
                           int64_t n_group, int64_t topk_group, float scaling, int64_t norm, float *scratch,
                           unsigned char *usable, float *weights_out, int64_t *ids_out)
{
    for (int64_t i = 0; i < tokens * experts; i++)
        if (!isfinite(logits[i]))
            return 1;
    for (int64_t e = 0; bias && e < experts; e++)
        if (!isfinite(bias[e]))
            return 1;
    float *scores = scratch, *choice = scratch + experts, *group_score = scratch + 2 * experts;
    unsigned char *group_kept = usable + experts;
    const int64_t per_group = experts / n_group;
    const int limit_groups = n_group > 1 && topk_group < n_group;
    for (int64_t t = 0; t < tokens; t++) {
        const float *lg = logits + t * experts;
        for (int64_t e = 0; e < experts; e++) {
            scores[e] = 1.0f / (1.0f + expf(-lg[e]));
            choice[e] = bias ? scores[e] + bias[e] : scores[e];
            usable[e] = 1;
        }
        if (limit_groups) {
            for (int64_t g = 0; g < n_group; g++) {
                const float *c = choice + g * per_group;
                int64_t first = 0;
                for (int64_t i = 1; i < per_group; i++)
                    if (c[i] > c[first])
                        first = i;
                int64_t second = -1;
                for (int64_t i = 0; i < per_group; i++)
                    if (i != first && (second < 0 || c[i] > c[second]))
                        second = i;
                group_score[g] = second < 0 ? c[first] : c[first] + c[second];
                group_kept[g] = 1; /* reused below as "not yet picked" */
            }
            unsigned char *kept = group_kept; /* pick topk_group groups, then keep only theirs */
            for (int64_t e = 0; e < experts; e++)
                usable[e] = 0;
            for (int64_t pick = 0; pick < topk_group; pick++) {
                int64_t g = argmax_usable(group_score, kept, n_group);
                kept[g] = 0;
                for (int64_t i = 0; i < per_group; i++)
                    usable[g * per_group + i] = 1;
            }
        }
        float *w = weights_out + t * top_k;
        int64_t *ids = ids_out + t * top_k;
        float sum = 0.0f;
        for (int64_t s = 0; s < top_k; s++) {
            int64_t e = argmax_usable(choice, usable, experts);
            usable[e] = 0;
            ids[s] = e;
            w[s] = scores[e];
            sum += scores[e];
        }
        for (int64_t s = 0; s < top_k; s++)
            w[s] = (norm ? w[s] / (sum + 1e-20f) : w[s]) * scaling;
    }
    return 0;
}

/* The expert-grouping half of a multi-token moe_experts: the tokens * k slots (slot
 * t * k + s is token t's s-th expert ids[slot]) sorted by expert, stably (counting sort):
 * order[j] is the j-th slot in expert order, ends[e] the number of slots of experts <= e
 * (the offsets a grouped GEMM takes), and xs[j] = x[order[j] / k] (the rows gathered).
 * counts holds `experts` int64. Returns 0, or 1 + the first slot whose id is outside
 * [0, experts) (outputs unset). */
int64_t dshal_moe_group_f32(const float *x, const int64_t *ids, int64_t tokens, int64_t k, int64_t experts,
                            int64_t hidden, int64_t *counts, int64_t *order, int32_t *ends, float *xs)
{
    const int64_t slots = tokens * k;
    for (int64_t e = 0; e < experts; e++)
        counts[e] = 0;
    for (int64_t j = 0; j < slots; j++) {
        if (ids[j] < 0 || ids[j] >= experts)
            return j + 1;
        counts[ids[j]]++;
    }
    int64_t start = 0;
    for (int64_t e = 0; e < experts; e++) { /* counts becomes each expert's next free position */
        const int64_t n = counts[e];
        counts[e] = start;
        start += n;
        ends[e] = (int32_t)start;
    }
    for (int64_t j = 0; j < slots; j++)
        order[counts[ids[j]]++] = j;
    for (int64_t j = 0; j < slots; j++)
        memcpy(xs + j * hidden, x + (order[j] / k) * hidden, (size_t)hidden * sizeof(float));
    return 0;
}

/* The combining half: out[t] = sum of weights[slot] * y[j] over the sorted rows j whose
 * slot = order[j] belongs to token t = slot / k, summed in expert order. y [slots, hidden]
 * in expert order, weights [tokens * k] per slot, out [tokens, hidden] (overwritten). */
void dshal_moe_combine_f32(const float *y, const int64_t *order, const float *weights, int64_t tokens, int64_t k,
                           int64_t hidden, float *out)
{
    for (int64_t i = 0; i < tokens * hidden; i++)
        out[i] = 0.0f;
    for (int64_t j = 0; j < tokens * k; j++) {
        const float w = weights[order[j]];
        const float *row = y + j * hidden;
        float *dst = out + (order[j] / k) * hidden;
        for (int64_t i = 0; i < hidden; i++)
            dst[i] += w * row[i];
    }
}

/* Rotary embedding of `rows` rows of d values (row r at x + r * row_stride, its values
 * contiguous) into out [rows, d]. Row r takes angle row (r / inner) % periods of cos/sin
 * [periods, d / 2]. Pairs are (2i, 2i + 1) when interleaved, else (i, i + d / 2); each
 * (a, b) becomes (a cos - b sin, b cos + a sin). */
void dshal_rotary_f32(const float *x, int64_t row_stride, const float *cos, const float *sin, int64_t rows, int64_t d,
                      int64_t inner, int64_t periods, int64_t interleaved, float *out)
{
    const int64_t half = d / 2;
    int64_t r = 0;
    while (r < rows) { /* rows come in runs of `inner` that share one angle row */
        for (int64_t p = 0; p < periods && r < rows; p++) {
            const float *c = cos + p * half, *s = sin + p * half;
            for (int64_t i_run = 0; i_run < inner && r < rows; i_run++, r++) {
                const float *xr = x + r * row_stride;
                float *o = out + r * d;
                if (interleaved) {
                    for (int64_t i = 0; i < half; i++) {
                        const float a = xr[2 * i], b = xr[2 * i + 1];
                        o[2 * i] = a * c[i] - b * s[i];
                        o[2 * i + 1] = b * c[i] + a * s[i];
                    }
                } else {
                    for (int64_t i = 0; i < half; i++) {
                        const float a = xr[i], b = xr[i + half];
                        o[i] = a * c[i] - b * s[i];
                        o[i + half] = b * c[i] + a * s[i];
                    }
                }
            }
        }
    }
}
