/* A whole decode step of a Llama-family model (every layer and the final norm) in one call.

   At batch 1 a layer's own arithmetic is ~0.2 ms, but run op by op from Python it costs another
   ~0.1 ms of dispatch, allocation and thread start-up per layer and op kind: about 40% of the
   step. Here the step is one OpenMP parallel region; the parts (kernels.h) are the very functions
   the PyTorch path calls one at a time, in the same order, so both paths give the same bits, and
   a barrier between parts is all that is left of the overhead.

   Per layer, for M sequences with one new token each (x and residual are (M, hidden)):
     x, r = add_rms_norm(x, r)            qkv = x Wqkv (+ b)       rope(q, k); write k, v
     a = paged attention(q)               x = a Wo                 x, r = add_rms_norm(x, r)
     g = x Wgate_up                       x = (silu(g1) * g2) Wdown
   then x = add_rms_norm(x, r) with the final norm's weight.
*/
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"

typedef struct {
    const float *input_norm, *post_attention_norm; /* (hidden,) */
    Int4Weight qkv, o, gate_up, down;
    char *k_cache, *v_cache; /* this layer's (Hkv, slots, row) */
} DecodeLayer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate;
    float eps, scale;
    const float *cos, *sin;  /* (max_position, head_dim) rotary tables */
    const float *final_norm; /* (hidden,) */
    int64_t slots, kind, block_size;
} DecodeModel;

typedef struct {
    int64_t M;
    const int64_t *positions, *slot_mapping; /* (M,) */
    const int64_t *tables, *lens;            /* (M, max_blocks) block ids, (M,) tokens to read */
    int64_t max_blocks;
    float *x; /* (M, hidden): the token embeddings in, the final hidden states out */
} DecodeBatch;

/* Float buffers of a step, in this order, each M rows of the given width. */
enum { RESIDUAL, NORMED, QKV, ATTN, GATE_UP, ACT, NUM_BUFFERS };

static void widths(const DecodeModel *m, int64_t w[NUM_BUFFERS]) {
    w[RESIDUAL] = w[NORMED] = m->hidden;
    w[QKV] = (m->heads + 2 * m->kv_heads) * m->head_dim;
    w[ATTN] = m->heads * m->head_dim;
    w[GATE_UP] = 2 * m->intermediate;
    w[ACT] = m->intermediate;
}

static int64_t max_inputs(const DecodeLayer *l) {
    const Int4Weight *ws[4] = {&l->qkv, &l->o, &l->gate_up, &l->down};
    int64_t k = 0;
    for (int i = 0; i < 4; i++) k = int4_inputs(ws[i]) > k ? int4_inputs(ws[i]) : k;
    return k;
}

static PagedKV paged_kv(const DecodeModel *m, const DecodeLayer *l, const DecodeBatch *b,
                        float *partials) {
    PagedKV kv = {l->k_cache, l->v_cache, m->slots,      m->kind,  m->block_size,
                  b->tables,  b->lens,    b->max_blocks, partials, NULL};
    return kv;
}

static int64_t attention_floats(const DecodeModel *m, const DecodeBatch *b) {
    PagedKV kv = {0};
    kv.lens = b->lens; /* all the count reads */
    return paged_attention_scratch_floats(&kv, b->M, m->kv_heads, m->heads / m->kv_heads,
                                          m->head_dim);
}

/* Bytes of scratch decode_layers needs for batch b; -1 when a layer's shapes are outside what
   its parts take (the caller keeps the PyTorch path). */
int64_t decode_scratch_bytes(const DecodeModel *m, const DecodeLayer *layers, int64_t n_layers,
                             const DecodeBatch *b) {
    const int64_t M = b->M;
    if (m->heads % m->kv_heads || m->head_dim % 2 ||
        !paged_attention_supports(m->heads / m->kv_heads, m->head_dim))
        return -1;
    int64_t w[NUM_BUFFERS], floats = attention_floats(m, b), k = 0;
    widths(m, w);
    for (int i = 0; i < NUM_BUFFERS; i++) floats += M * w[i];
    for (int64_t i = 0; i < n_layers; i++) {
        const DecodeLayer *l = layers + i;
        if (int4_supported(&l->qkv) || int4_supported(&l->o) || int4_supported(&l->gate_up) ||
            int4_supported(&l->down) || l->qkv.n_out != w[QKV] || l->o.n_out != m->hidden ||
            l->gate_up.n_out != w[GATE_UP] || l->down.n_out != m->hidden)
            return -1;
        k = max_inputs(l) > k ? max_inputs(l) : k;
    }
    /* floats (the buffers, then attention's partials), then per row k int8 codes and k / 32
       (scale, code sum) pairs */
    return (int64_t)sizeof(float) * floats + M * k + 8 * M * (k / 32);
}

static void matmul_part(const Int4Weight *w, const float *x, int64_t ldx, int64_t M,
                        const QuantRows *a, float *y) {
    int4_quantize_part(w, x, ldx, M, a);
    int4_tiles_part(w, M, a, y, w->n_out);
}

/* Returns 0, or -1 when the shapes are outside what the parts take (see decode_scratch_bytes). */
int decode_layers(const DecodeModel *m, const DecodeLayer *layers, int64_t n_layers,
                  const DecodeBatch *b, void *scratch, int64_t num_threads) {
    const int64_t M = b->M, H = m->hidden, D = m->head_dim, Hq = m->heads, Hkv = m->kv_heads;
    if (decode_scratch_bytes(m, layers, n_layers, b) < 0) return -1;
    int64_t w[NUM_BUFFERS], k = 0;
    widths(m, w);
    float *buf[NUM_BUFFERS], *p = scratch, *partials;
    for (int i = 0; i < NUM_BUFFERS; i++) buf[i] = p, p += M * w[i];
    partials = p, p += attention_floats(m, b);
    for (int64_t i = 0; i < n_layers; i++) k = max_inputs(layers + i) > k ? max_inputs(layers + i) : k;
    QuantRows a = {(int8_t *)p, NULL, NULL};
    a.d = (float *)(a.q + M * k);
    a.s = (int32_t *)(a.d + M * (k / 32));

    float *x = b->x, *res = buf[RESIDUAL], *nrm = buf[NORMED], *qkv = buf[QKV];
    const int64_t ldqkv = w[QKV];
#pragma omp parallel num_threads(num_threads)
    for (int64_t i = 0; i < n_layers; i++) {
        const DecodeLayer *l = layers + i;
        PagedKV kv = paged_kv(m, l, b, partials);
        add_rms_norm_part(x, i ? res : NULL, l->input_norm, res, nrm, M, H, m->eps);
        matmul_part(&l->qkv, nrm, H, M, &a, qkv);
        rope_part(qkv, ldqkv, M, Hq + Hkv, D, m->cos, m->sin, b->positions);
        write_kv_part(qkv + Hq * D, qkv + (Hq + Hkv) * D, ldqkv, ldqkv, l->k_cache, l->v_cache,
                      b->slot_mapping, M, Hkv, D, m->slots, m->kind);
        paged_attention_part(qkv, ldqkv, &kv, M, Hkv, Hq / Hkv, D, m->scale, buf[ATTN], w[ATTN],
                             NULL);
        matmul_part(&l->o, buf[ATTN], w[ATTN], M, &a, x);
        add_rms_norm_part(x, res, l->post_attention_norm, res, nrm, M, H, m->eps);
        matmul_part(&l->gate_up, nrm, H, M, &a, buf[GATE_UP]);
        silu_mul_part(buf[GATE_UP], w[GATE_UP], M, m->intermediate, buf[ACT]);
        matmul_part(&l->down, buf[ACT], w[ACT], M, &a, x);
        if (i == n_layers - 1) add_rms_norm_part(x, res, m->final_norm, res, x, M, H, m->eps);
    }
    return 0;
}
