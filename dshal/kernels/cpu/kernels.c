/* dshal's C kernels for the cpu backend: the work of a decode step (and a few prefill
 * helpers) that torch spreads over many small calls or reads memory badly for.
 *
 * Why C: a decode step multiplies one activation row by every weight it uses, so it is a
 * chain of matrix-vector products bound by how fast the weights stream from memory. MKL's
 * GEMV reads several rows at a time; with short rows (a few KB) each row is its own short
 * stream that the hardware prefetcher barely ramps up on. These kernels read a weight
 * row after row in memory order (one stream), with enough independent accumulators for the
 * compiler to vectorize the dot products. The rest (router, expert loop and grouping,
 * RMSNorm, rotary, FP8 blocks) replaces 5-20 small torch calls each with one call.
 *
 * Every kernel computes a row's (a token's) result from that row alone, in the same order
 * whatever the other rows of the call: a decode step's rows do not change each other's bits
 * (README, "Batch and chunk invariance"; tests/test_cpu_kernels.py checks it).
 *
 * Built at first use by dshal/kernels/cpu/_library.py with the system C compiler, for the
 * machine it runs on; no Python API is used (loaded with ctypes; each kernel has a checked
 * wrapper in dshal/kernels/cpu/__init__.py). Sizes are int64_t.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Independent partial sums per dot product: wide enough for two AVX-512 or four AVX2
 * FMA chains, so a hot (cached) row is not latency-bound. */
#define LANES 32
/* An expert id that no expert of the call serves (dshal.ops.moe.NO_EXPERT): the slot adds nothing. */
#define NO_EXPERT (-1)

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

/* dot(a, b, n) and dot(a, c, n) in one pass over a, each the same sums in the same order as
 * dot() (bit for bit): a row's result does not depend on the row it is paired with. */
static void dot2(const float *restrict a, const float *restrict b, const float *restrict c, int64_t n, float *out_b,
                 float *out_c)
{
    float acc_b[LANES] = {0.0f}, acc_c[LANES] = {0.0f};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) {
            acc_b[j] += a[i + j] * b[i + j];
            acc_c[j] += a[i + j] * c[i + j];
        }
    float tail_b = 0.0f, tail_c = 0.0f;
    for (; i < n; i++) {
        tail_b += a[i] * b[i];
        tail_c += a[i] * c[i];
    }
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int j = 0; j < width; j++) {
            acc_b[j] += acc_b[j + width];
            acc_c[j] += acc_c[j + width];
        }
    *out_b = acc_b[0] + tail_b;
    *out_c = acc_c[0] + tail_c;
}

/* y[i, r] = dot(w[r, :], x[i, :]) (+ bias[r]) for m rows x [m, k]; w is [n, k] row-major,
 * read once in memory order (each weight row serves every x row while it is in L1);
 * bias may be NULL. */
void dshal_gemv_f32(const float *w, const float *x, const float *bias, float *y, int64_t m, int64_t n, int64_t k)
{
    for (int64_t r = 0; r < n; r++) {
        int64_t i = 0;
        for (; i + 2 <= m; i += 2) /* two rows per pass over the weight row */
            dot2(w + r * k, x + i * k, x + (i + 1) * k, k, y + i * n + r, y + (i + 1) * n + r);
        if (i < m)
            y[i * n + r] = dot(w + r * k, x + i * k, k);
        for (i = 0; bias && i < m; i++)
            y[i * n + r] += bias[r];
    }
}

/* The slots (slot t * top_k + s is token t's s-th expert ids[slot]) sorted by expert, stably
 * (counting sort) into order; a slot whose id is NO_EXPERT (-1: served elsewhere, an expert-
 * parallel rank's share) is left out, and *kept counts the others (order's valid length).
 * counts holds `experts` int64. Returns 0, or 1 + the first slot whose id is neither -1 nor
 * in [0, experts) (order and *kept unset). */
static int64_t slots_by_expert(const int64_t *ids, int64_t slots, int64_t experts, int64_t *counts, int64_t *order,
                               int64_t *kept)
{
    for (int64_t j = 0; j < slots; j++)
        if (ids[j] < NO_EXPERT || ids[j] >= experts)
            return j + 1;
    for (int64_t e = 0; e < experts; e++)
        counts[e] = 0;
    for (int64_t j = 0; j < slots; j++)
        if (ids[j] != NO_EXPERT)
            counts[ids[j]]++;
    int64_t start = 0;
    for (int64_t e = 0; e < experts; e++) { /* counts becomes each expert's next free position */
        const int64_t n = counts[e];
        counts[e] = start;
        start += n;
    }
    for (int64_t j = 0; j < slots; j++)
        if (ids[j] != NO_EXPERT)
            order[counts[ids[j]]++] = j;
    *kept = start;
    return 0;
}

/* The end of the run of sorted slots from `first` that share its expert. */
static int64_t expert_run_end(const int64_t *ids, const int64_t *order, int64_t first, int64_t slots)
{
    int64_t last = first + 1;
    while (last < slots && ids[order[last]] == ids[order[first]])
        last++;
    return last;
}

/* out[t] = sum over s in slot order of gate_weights[t, s] * y[t * top_k + s], for y
 * [tokens * top_k, hidden] (each slot's expert output) and out [tokens, hidden]. A NO_EXPERT
 * slot is skipped: neither its y row (never written) nor its weight (NaN, say) is read, so a
 * token's sum is the one its served slots alone give. */
static void weighted_sum_per_token(const float *y, const float *gate_weights, const int64_t *ids, int64_t tokens,
                                   int64_t top_k, int64_t hidden, float *out)
{
    for (int64_t t = 0; t < tokens; t++) {
        float *o = out + t * hidden;
        for (int64_t r = 0; r < hidden; r++)
            o[r] = 0.0f;
        for (int64_t s = 0; s < top_k; s++) {
            if (ids[t * top_k + s] == NO_EXPERT)
                continue;
            const float weight = gate_weights[t * top_k + s];
            const float *ys = y + (t * top_k + s) * hidden;
            for (int64_t r = 0; r < hidden; r++)
                o[r] += weight * ys[r];
        }
    }
}

/* A few tokens through their top_k routed SwiGLU experts (a decode step's batch):
 *   out[t] = sum_s gate_weights[t, s] * w2[e] @ (silu(w13[e, :inter] @ x[t]) * (w13[e, inter:] @ x[t])),
 *   e = ids[t, s], summed over s in slot order.
 * The slots (slot t * top_k + s) are grouped by expert first (counting sort), so each
 * expert's weights are read once for every token routed to it, row after row, each row
 * serving all of them while it is in L1. Every value of token t comes from x[t] and its own
 * routing alone, through the same dot products in the same order whatever the other
 * tokens: a token's result does not depend on the batch it is in (bitwise). A slot whose id
 * is NO_EXPERT (-1) adds nothing to its token (an expert-parallel rank's share of the slots):
 * a token's result is then the one it gets alone with the same slots dropped.
 * x [tokens, hidden]; w13 [experts, 2 * inter, hidden], w2 [experts, hidden, inter];
 * ids, gate_weights [tokens, top_k]; counts: experts int64; order: tokens * top_k int64;
 * scratch: tokens * top_k * (2 * inter + hidden) floats; out [tokens, hidden].
 * Returns 0, or 1 + the first slot whose id is neither -1 nor in [0, experts) (out is then unset). */
int64_t dshal_moe_tokens_f32(const float *x, const float *w13, const float *w2, const int64_t *ids,
                             const float *gate_weights, int64_t tokens, int64_t top_k, int64_t experts, int64_t hidden,
                             int64_t inter, int64_t *counts, int64_t *order, float *scratch, float *out)
{
    const int64_t slots = tokens * top_k;
    int64_t kept;
    const int64_t bad = slots_by_expert(ids, slots, experts, counts, order, &kept);
    if (bad)
        return bad;
    float *h = scratch, *y = scratch + slots * 2 * inter; /* per slot: [2 * inter] then [hidden] */
    for (int64_t first = 0, last; first < kept; first = last) { /* one run of slots per expert */
        last = expert_run_end(ids, order, first, kept);
        const int64_t e = ids[order[first]];
        const float *up = w13 + e * 2 * inter * hidden;
        for (int64_t r = 0; r < 2 * inter; r++) {
            int64_t j = first;
            for (; j + 2 <= last; j += 2) /* two slots per pass over the weight row */
                dot2(up + r * hidden, x + (order[j] / top_k) * hidden, x + (order[j + 1] / top_k) * hidden, hidden,
                     h + order[j] * 2 * inter + r, h + order[j + 1] * 2 * inter + r);
            if (j < last)
                h[order[j] * 2 * inter + r] = dot(up + r * hidden, x + (order[j] / top_k) * hidden, hidden);
        }
        for (int64_t j = first; j < last; j++) {
            float *hs = h + order[j] * 2 * inter;
            for (int64_t r = 0; r < inter; r++) {
                const float g = hs[r];
                hs[r] = g / (1.0f + expf(-g)) * hs[inter + r];
            }
        }
        const float *down = w2 + e * hidden * inter;
        for (int64_t r = 0; r < hidden; r++) {
            int64_t j = first;
            for (; j + 2 <= last; j += 2)
                dot2(down + r * inter, h + order[j] * 2 * inter, h + order[j + 1] * 2 * inter, inter,
                     y + order[j] * hidden + r, y + order[j + 1] * hidden + r);
            if (j < last)
                y[order[j] * hidden + r] = dot(down + r * inter, h + order[j] * 2 * inter, inter);
        }
    }
    weighted_sum_per_token(y, gate_weights, ids, tokens, top_k, hidden, out);
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
    for (int64_t j = 0; j < slots; j++) /* NO_EXPERT too: the grouped GEMM serves every slot */
        if (ids[j] < 0 || ids[j] >= experts)
            return j + 1;
    int64_t kept;
    slots_by_expert(ids, slots, experts, counts, order, &kept);
    for (int64_t e = 0; e < experts; e++) /* after the sort, each expert's next free position is its end */
        ends[e] = (int32_t)counts[e];
    /* Empty rows (hidden 0) come as NULL pointers, which memcpy may not be given even for 0 bytes. */
    for (int64_t j = 0; hidden > 0 && j < slots; j++)
        memcpy(xs + j * hidden, x + (order[j] / k) * hidden, (size_t)hidden * sizeof(float));
    return 0;
}

/* The combining half: out[t] = sum of weights[slot] * y[j] over the sorted rows j whose
 * slot = order[j] belongs to token t = slot / k, summed in expert order. y [slots, hidden]
 * in expert order, weights [tokens * k] per slot, out [tokens, hidden] (overwritten).
 * Returns 0, or 1 + the first j whose order[j] is outside [0, tokens * k) (out unset):
 * order indexes both weights and out, and the caller may pass any int64 tensor. */
int64_t dshal_moe_combine_f32(const float *y, const int64_t *order, const float *weights, int64_t tokens, int64_t k,
                              int64_t hidden, float *out)
{
    for (int64_t j = 0; j < tokens * k; j++)
        if (order[j] < 0 || order[j] >= tokens * k)
            return j + 1;
    for (int64_t i = 0; i < tokens * hidden; i++)
        out[i] = 0.0f;
    for (int64_t j = 0; j < tokens * k; j++) {
        const float w = weights[order[j]];
        const float *row = y + j * hidden;
        float *dst = out + (order[j] / k) * hidden;
        for (int64_t i = 0; i < hidden; i++)
            dst[i] += w * row[i];
    }
    return 0;
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

/* ---------------------------------------------------------------- FP8 (E4M3) blocks
 * DeepSeek-V3's FP8 linears: weights in an E4M3 format with one float32 scale per 128x128
 * block; the activation row is quantized to the same format per 128 values first (as
 * dshal.ops.linear defines it), then y[r] = sum over blocks j of
 * dot(xq_j, w_rj) * x_scale[j] * w_scale[r / 128, j].
 * An Fp8Format describes E4M3 (fn: bias 7, max 448, NaN = S.1111.111) or E4M3FNUZ (bias 8,
 * max 240, NaN = 0x80, no negative zero). */
typedef struct {
    int bias;
    float max;
    int fnuz;
} Fp8Format;

/* Round finite v, |v| <= the format's max, to the nearest E4M3 value, ties to even. */
static float fp8_round(float v, const Fp8Format *fmt)
{
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    int exp = (int)((bits >> 23) & 0xFF) - 127;
    const int min_exp = 1 - fmt->bias; /* below it the grid step stays that of min_exp */
    if (exp < min_exp)
        exp = min_exp;
    /* step = 2^(exp - 3); scaling by a power of two is exact, and adding 1.5 * 2^23
     * rounds to an integer, ties to even (float32 round-to-nearest). */
    uint32_t inv_bits = (uint32_t)(127 + 3 - exp) << 23, step_bits = (uint32_t)(127 + exp - 3) << 23;
    float inv_step, step;
    memcpy(&inv_step, &inv_bits, sizeof inv_step);
    memcpy(&step, &step_bits, sizeof step);
    const float shifted = v * inv_step + 12582912.0f; /* C forbids folding (a + c) - c away */
    const float r = (shifted - 12582912.0f) * step;
    return (fmt->fnuz && r == 0.0f) ? 0.0f : r;
}

/* Quantize n values of x per blocks of `block`: xq gets the FP8 grid values (as floats),
 * scales[j] = amax_j / max (at least FLT_MIN; 1 for an all-zero block), amax over finite
 * values. NaN stays NaN; +-Inf saturates to +-max, as the op's clamp-then-cast does. */
static void fp8_quantize_row(const float *x, int64_t n, int64_t block, const Fp8Format *fmt, float *xq, float *scales)
{
    for (int64_t start = 0, j = 0; start < n; start += block, j++) {
        const int64_t len = n - start < block ? n - start : block;
        float amax = 0.0f;
        for (int64_t i = 0; i < len; i++) {
            const float a = fabsf(x[start + i]);
            if (isfinite(a) && a > amax)
                amax = a;
        }
        float scale = 1.0f;
        if (amax > 0.0f) {
            scale = amax / fmt->max;
            if (scale < 1.17549435e-38f)
                scale = 1.17549435e-38f;
        }
        scales[j] = scale;
        for (int64_t i = 0; i < len; i++) {
            float v = x[start + i] / scale;
            if (isnan(v)) {
                xq[start + i] = v;
                continue;
            }
            v = v > fmt->max ? fmt->max : (v < -fmt->max ? -fmt->max : v);
            xq[start + i] = fp8_round(v, fmt);
        }
    }
}

/* The float value of every byte of an E4M3 format (NaN codes included). Normal numbers
 * move their exponent/mantissa bits into a float32 and re-bias; subnormals are
 * mantissa * 2^(1 - bias - 3). */
static void fp8_table(const Fp8Format *fmt, float *table)
{
    for (uint32_t code = 0; code < 256; code++) {
        const uint32_t mag = code & 0x7Fu, exp = mag >> 3;
        float v;
        if (exp == 0) {
            v = ldexpf((float)mag, 1 - fmt->bias - 3);
        } else {
            const uint32_t bits = ((exp + 127u - (uint32_t)fmt->bias) << 23) | ((mag & 7u) << 20);
            memcpy(&v, &bits, sizeof v);
        }
        v = (code & 0x80u) ? -v : v;
        const int is_nan = fmt->fnuz ? code == 0x80u : mag == 0x7Fu;
        table[code] = is_nan ? NAN : v;
    }
}

/* dot(a, decoded bytes b) over n values, b decoded through `table` (a vector gather). */
static float dot_fp8(const float *restrict a, const uint8_t *restrict b, int64_t n, const float *restrict table)
{
    float acc[LANES] = {0.0f};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++)
            acc[j] += a[i + j] * table[b[i + j]];
    float tail = 0.0f;
    for (; i < n; i++)
        tail += a[i] * table[b[i]];
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int j = 0; j < width; j++)
            acc[j] += acc[j + width];
    return acc[0] + tail;
}

/* y[r] = sum_j dot(xq_j, w[r, block j]) * xs[j] * w_scale[r / 128, j] for an already
 * quantized row (xq, xs); w [n, k] FP8 bytes, w_scale [ceil(n/128), ceil(k/128)]. */
static void fp8_block_gemv(const float *xq, const float *xs, const uint8_t *w, const float *w_scale, int64_t n,
                           int64_t k, const Fp8Format *fmt, float *y)
{
    const int64_t blocks = (k + 127) / 128;
    float table[256];
    fp8_table(fmt, table);
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *row = w + r * k;
        const float *rs = w_scale + (r / 128) * blocks;
        float acc = 0.0f;
        for (int64_t j = 0; j < blocks; j++) {
            const int64_t len = k - j * 128 < 128 ? k - j * 128 : 128;
            acc += dot_fp8(xq + j * 128, row + j * 128, len, table) * (xs[j] * rs[j]);
        }
        y[r] = acc;
    }
}

/* m rows x [m, k] (float32) times an FP8 block-scaled weight into y [m, n]: each row
 * quantized as above; one row decodes the weight inside its dot products, several rows
 * decode each 128-value block once and reuse it for every row. bias may be NULL; scratch
 * holds m * (k + ceil(k/128)) + 128 floats. fnuz selects E4M3FNUZ over E4M3FN. */
void dshal_fp8_block_gemm_f32(const float *x, const uint8_t *w, const float *w_scale, const float *bias, float *y,
                              float *scratch, int64_t m, int64_t n, int64_t k, int64_t fnuz)
{
    const Fp8Format fmt = fnuz ? (Fp8Format){8, 240.0f, 1} : (Fp8Format){7, 448.0f, 0};
    const int64_t blocks = (k + 127) / 128;
    float *xq = scratch, *xs = scratch + m * k, *decoded = xs + m * blocks;
    for (int64_t i = 0; i < m; i++)
        fp8_quantize_row(x + i * k, k, 128, &fmt, xq + i * k, xs + i * blocks);
    if (m == 1) {
        fp8_block_gemv(xq, xs, w, w_scale, n, k, &fmt, y);
    } else {
        float table[256];
        fp8_table(&fmt, table);
        for (int64_t r = 0; r < n; r++) {
            const uint8_t *row = w + r * k;
            const float *rs = w_scale + (r / 128) * blocks;
            for (int64_t i = 0; i < m; i++)
                y[i * n + r] = 0.0f;
            for (int64_t j = 0; j < blocks; j++) {
                const int64_t len = k - j * 128 < 128 ? k - j * 128 : 128;
                for (int64_t t = 0; t < len; t++)
                    decoded[t] = table[row[j * 128 + t]];
                for (int64_t i = 0; i < m; i++)
                    y[i * n + r] += dot(xq + i * k + j * 128, decoded, len) * (xs[i * blocks + j] * rs[j]);
            }
        }
    }
    for (int64_t i = 0; bias && i < m; i++)
        for (int64_t r = 0; r < n; r++)
            y[i * n + r] += bias[r];
}

/* v rounded to bfloat16 (nearest, ties to even; NaN stays NaN), returned as a float. */
static float round_bf16(float v)
{
    if (isnan(v))
        return v;
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* One FP8 weight row w (k values, block scales rs) against `count` quantized activation rows:
 * for each j < count, with row = order[j] / per_row, out[order[j] * out_stride] =
 * sum over blocks b of dot(act[row] block b, w block b) * (act_scales[row][b] * rs[b]): the
 * sums of fp8_block_gemv, in its order. Several rows: each block decoded once for all. */
static void fp8_block_rows(const uint8_t *w, const float *rs, int64_t k, const float *act, int64_t act_stride,
                           const float *act_scales, int64_t blocks, const int64_t *order, int64_t count,
                           int64_t per_row, const float *table, float *decoded, float *out, int64_t out_stride)
{
    if (count == 1) { /* decoded inside the dot products, as fp8_block_gemv does */
        const int64_t row = order[0] / per_row;
        const float *a = act + row * act_stride, *as = act_scales + row * blocks;
        float acc = 0.0f;
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t len = k - b * 128 < 128 ? k - b * 128 : 128;
            acc += dot_fp8(a + b * 128, w + b * 128, len, table) * (as[b] * rs[b]);
        }
        out[order[0] * out_stride] = acc;
        return;
    }
    for (int64_t j = 0; j < count; j++)
        out[order[j] * out_stride] = 0.0f;
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t len = k - b * 128 < 128 ? k - b * 128 : 128;
        for (int64_t i = 0; i < len; i++)
            decoded[i] = table[w[b * 128 + i]];
        for (int64_t j = 0; j < count; j++) {
            const int64_t row = order[j] / per_row;
            out[order[j] * out_stride] += dot(act + row * act_stride + b * 128, decoded, len) * (act_scales[row * blocks + b] * rs[b]);
        }
    }
}

/* A few tokens through their top_k routed SwiGLU experts with FP8 block-scaled weights, as
 * dshal.ops.moe_experts defines it: per expert, h = linear(x, w13[e]) and
 * y = linear(silu(h_gate) * h_up, w2[e]), each activation row quantized per 128 values, the
 * weighted y summed in float32 in slot order. With bf16, h, the SwiGLU product and y are
 * rounded to bfloat16 where the op rounds them to the activation dtype. As
 * dshal_moe_tokens_f32: each expert's weight rows are read (and decoded) once for every
 * token routed to it, and a token's result depends on its own row and routing only; a
 * NO_EXPERT (-1) slot adds nothing.
 * w13 [E, 2I, H] and w2 [E, H, I] are FP8 bytes; s13 [E, ceil(2I/128), ceil(H/128)],
 * s2 [E, ceil(H/128), ceil(I/128)]; counts: E int64; order: T * top_k int64; scratch:
 * T * (H + ceil(H/128)) + T * top_k * (3I + ceil(I/128) + H) + 128 floats.
 * Returns 0, or 1 + the first slot whose id is neither -1 nor in [0, experts) (out unset). */
int64_t dshal_moe_tokens_fp8(const float *x, const uint8_t *w13, const uint8_t *w2, const float *s13, const float *s2,
                             const int64_t *ids, const float *gate_weights, int64_t tokens, int64_t top_k,
                             int64_t experts, int64_t hidden, int64_t inter, int64_t fnuz, int64_t bf16,
                             int64_t *counts, int64_t *order, float *scratch, float *out)
{
    const int64_t slots = tokens * top_k;
    int64_t kept;
    const int64_t bad = slots_by_expert(ids, slots, experts, counts, order, &kept);
    if (bad)
        return bad;
    const Fp8Format fmt = fnuz ? (Fp8Format){8, 240.0f, 1} : (Fp8Format){7, 448.0f, 0};
    const int64_t hb = (hidden + 127) / 128, ib = (inter + 127) / 128, ub = (2 * inter + 127) / 128;
    /* per token: the quantized row and its scales; per slot: h [2I], the quantized SwiGLU
     * product and its scales, y [H]; then one decoded 128-value block */
    float *xq = scratch, *xs = xq + tokens * hidden, *h = xs + tokens * hb, *aq = h + slots * 2 * inter;
    float *as = aq + slots * inter, *y = as + slots * ib, *decoded = y + slots * hidden;
    float table[256];
    fp8_table(&fmt, table);
    for (int64_t t = 0; t < tokens; t++)
        fp8_quantize_row(x + t * hidden, hidden, 128, &fmt, xq + t * hidden, xs + t * hb);
    for (int64_t first = 0, last; first < kept; first = last) {
        last = expert_run_end(ids, order, first, kept);
        const int64_t e = ids[order[first]];
        const uint8_t *up = w13 + e * 2 * inter * hidden;
        for (int64_t r = 0; r < 2 * inter; r++)
            fp8_block_rows(up + r * hidden, s13 + e * ub * hb + (r / 128) * hb, hidden, xq, hidden, xs, hb, order + first,
                           last - first, top_k, table, decoded, h + r, 2 * inter);
        for (int64_t j = first; j < last; j++) {
            float *hs = h + order[j] * 2 * inter;
            for (int64_t r = 0; r < inter; r++) {
                float g = hs[r], u = hs[inter + r];
                if (bf16) {
                    g = round_bf16(g);
                    u = round_bf16(u);
                }
                const float a = g / (1.0f + expf(-g)) * u;
                hs[r] = bf16 ? round_bf16(a) : a;
            }
            fp8_quantize_row(hs, inter, 128, &fmt, aq + order[j] * inter, as + order[j] * ib);
        }
        const uint8_t *down = w2 + e * hidden * inter;
        for (int64_t r = 0; r < hidden; r++)
            fp8_block_rows(down + r * inter, s2 + e * hb * ib + (r / 128) * ib, inter, aq, inter, as, ib, order + first,
                           last - first, 1, table, decoded, y + r, hidden);
    }
    for (int64_t j = 0; bf16 && j < kept; j++) /* each expert's output in the activation dtype (served slots) */
        for (int64_t r = 0; r < hidden; r++)
            y[order[j] * hidden + r] = round_bf16(y[order[j] * hidden + r]);
    weighted_sum_per_token(y, gate_weights, ids, tokens, top_k, hidden, out);
    return 0;
}

/* One 128-value block of a row (len <= 128 values) quantized to FP8 and dequantized again,
 * exactly as dshal.ops.linear's reference computes it in float32 (prefill activations):
 *   amax = max |x| over the finite values; scale = amax / max (at least FLT_MIN; 1 when
 *   amax is 0); v = x / scale clamped to [-max, max] (NaN stays NaN); q = v rounded to the
 *   format, nearest, ties to even (torch's float32 -> FP8 cast); out = q * scale.
 * Bit for bit what torch's steps give, NaN included: E4M3FN keeps the NaN's sign and
 * decodes it as +-0x7FF00000; E4M3FNUZ has one NaN, which decodes to 0x7F800001 and the
 * float32 multiply quiets to 0x7FC00001; FNUZ has no negative zero. Branch-free per value
 * so that the compiler vectorizes both passes. */
static void fp8_fake_quant_block(const float *restrict x, int64_t len, int fnuz, float *restrict out)
{
    const float max = fnuz ? 240.0f : 448.0f;
    const int32_t min_exp = fnuz ? 127 - 7 : 127 - 6; /* biased: the subnormal grid's exponent */
    /* amax over the finite values as an integer max (a plain reduction, vectorized): |x|'s
     * bits are ordered like the floats; adding 2^23 modulo 2^31 moves NaN and +-Inf
     * (0x7F800000 and up) below every finite value, whose image is at least 2^23. */
    uint32_t shifted_max = 0;
    for (int64_t i = 0; i < len; i++) {
        uint32_t b;
        memcpy(&b, x + i, sizeof b);
        b = ((b & 0x7FFFFFFFu) + 0x00800000u) & 0x7FFFFFFFu;
        shifted_max = b > shifted_max ? b : shifted_max;
    }
    const uint32_t amax_bits = shifted_max >= 0x00800000u ? shifted_max - 0x00800000u : 0u;
    float amax, scale = 1.0f;
    memcpy(&amax, &amax_bits, sizeof amax);
    if (amax > 0.0f) {
        scale = amax / max;
        if (scale < 1.17549435e-38f)
            scale = 1.17549435e-38f;
    }
    for (int64_t i = 0; i < len; i++) {
        const float v = x[i] / scale;
        uint32_t vb;
        memcpy(&vb, &v, sizeof vb);
        float a = fabsf(v);
        a = a > max ? max : a; /* +-Inf saturates; NaN compares false and stays */
        uint32_t ab;
        memcpy(&ab, &a, sizeof ab);
        int32_t e = (int32_t)(ab >> 23);
        e = e < min_exp ? min_exp : e;
        /* a / step rounded to an integer (ties to even) by adding 1.5 * 2^23, then times
         * step = 2^(e - 3): three mantissa bits; both scalings are exact powers of two. */
        const uint32_t inv_bits = (uint32_t)(254 + 3 - e) << 23, step_bits = (uint32_t)(e - 3) << 23;
        float inv_step, step;
        memcpy(&inv_step, &inv_bits, sizeof inv_step);
        memcpy(&step, &step_bits, sizeof step);
        const float shifted = a * inv_step + 12582912.0f;
        const float r = (shifted - 12582912.0f) * step;
        uint32_t rb;
        memcpy(&rb, &r, sizeof rb);
        const uint32_t sign = vb & 0x80000000u;
        rb |= (fnuz && rb == 0u) ? 0u : sign;
        float q;
        memcpy(&q, &rb, sizeof q);
        float y = q * scale;
        const uint32_t nan_bits = fnuz ? 0x7FC00001u : (0x7FF00000u | sign);
        float nan_value;
        memcpy(&nan_value, &nan_bits, sizeof nan_value);
        out[i] = a != a ? nan_value : y;
    }
}

/* rows x [rows, k] (row r at x + r * row_stride, its k values contiguous; float32, or
 * bfloat16 when bf16 is set) into out [rows, k] float32: each row quantized per 128
 * values to E4M3FN (fnuz = 0) or E4M3FNUZ (fnuz = 1) and dequantized again, as
 * fp8_fake_quant_block defines it (the last block of a row may be shorter). */
void dshal_fp8_fake_quant_rows(const void *x, int64_t bf16, int64_t row_stride, int64_t rows, int64_t k, int64_t fnuz,
                               float *out)
{
    float widened[128];
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t start = 0; start < k; start += 128) {
            const int64_t len = k - start < 128 ? k - start : 128;
            const float *block;
            if (bf16) {
                const uint16_t *src = (const uint16_t *)x + r * row_stride + start;
                for (int64_t i = 0; i < len; i++) {
                    const uint32_t b = (uint32_t)src[i] << 16;
                    memcpy(widened + i, &b, sizeof b);
                }
                block = widened;
            } else {
                block = (const float *)x + r * row_stride + start;
            }
            if (fnuz)
                fp8_fake_quant_block(block, len, 1, out + r * k + start);
            else
                fp8_fake_quant_block(block, len, 0, out + r * k + start);
        }
    }
}
