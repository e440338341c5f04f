/* The CPU side of tests/cuda_kernels.cu: dsv2.c's own functions, made callable from the kernel
 * checks (dsv2.c's functions are static; this file includes it and exports one wrapper each). */
#define DSV2_NO_MAIN
#include "../dsv2.c"

/* A random-weights config of a real shape with one layer: "lite" (V2-Lite) or "v2" (236B). */
Config ref_config(int v2) {
    Config c;
    memset(&c, 0, sizeof c);
    c.dtype = DTYPE_F32;
    c.vocab_size = 102400; c.num_hidden_layers = 1; c.kv_lora_rank = 512;
    c.qk_nope_head_dim = 128; c.qk_rope_head_dim = 64; c.v_head_dim = 128;
    c.n_shared_experts = 2; c.num_experts_per_tok = 6; c.first_k_dense_replace = 1;
    c.moe_layer_freq = 1; c.max_position_embeddings = 163840; c.bos_token_id = 100000;
    c.eos_token_id = 100001; c.rope_scaling = ROPE_YARN; c.original_max_position_embeddings = 4096;
    c.rms_norm_eps = 1e-6; c.rope_theta = 10000; c.rope_factor = 40; c.beta_fast = 32;
    c.beta_slow = 1; c.mscale = 0.707; c.mscale_all_dim = 0.707; c.aux_loss_alpha = 0.001;
    if (v2) {
        c.hidden_size = 5120; c.intermediate_size = 12288; c.moe_intermediate_size = 1536;
        c.num_attention_heads = 128; c.q_lora_rank = 1536;
        c.n_routed_experts = 160; c.topk_method = TOPK_GROUP_LIMITED_GREEDY; c.n_group = 8;
        c.topk_group = 3; c.routed_scaling_factor = 16.0;
    } else {
        c.hidden_size = 2048; c.intermediate_size = 10944; c.moe_intermediate_size = 1408;
        c.num_attention_heads = 16; c.q_lora_rank = 0;
        c.n_routed_experts = 64; c.topk_method = TOPK_GREEDY; c.n_group = 1; c.topk_group = 1;
        c.routed_scaling_factor = 1.0;
    }
    return c;
}

/* W [rows, cols] from floats, stored as dtype (q8: groups of 32, as export.py writes them). */
Mat ref_make_mat(const float *w, int rows, int cols, int dtype) {
    size_t n = (size_t)rows * cols;
    Mat m = {NULL, NULL, dtype, rows, cols, dtype == DTYPE_Q8 ? 32 : cols};
    if (dtype == DTYPE_F32) {
        float *d = floats(n);
        memcpy(d, w, n * sizeof(float));
        m.data = d;
    } else if (dtype == DTYPE_BF16) {
        uint16_t *d = xcalloc(n, 2);
        for (size_t i = 0; i < n; i++) d[i] = f32_to_bf16(w[i]);
        m.data = d;
    } else {
        int8_t *d = xcalloc(n, 1);
        float *scale = floats(n / 32);
        quantize_activations(d, scale, w, (int)n, 32);
        m.data = d;
        m.scale = scale;
    }
    return m;
}

void ref_free_mat(Mat *m) { free((void *)m->data); free((void *)m->scale); }

/* The exact float32 values W holds (q8: int8 x scale; bf16 widened): the GPU multiplies float
 * activations by these, so they are the reference's weights. */
static Mat as_f32(const Mat *W) {
    float *d = floats((size_t)W->rows * W->cols);
    for (int r = 0; r < W->rows; r++) mat_row_to_f32(d + (size_t)r * W->cols, W, r);
    Mat m = {d, NULL, DTYPE_F32, W->rows, W->cols, W->cols};
    return m;
}

void ref_matvec(float *y, const Mat *W, const float *x) {
    Mat f = as_f32(W);
    MatmulScratch *scratch = matmul_scratch_new(1, W->cols);
    matmul(y, &f, x, 1, scratch);
    matmul_scratch_free(scratch);
    free((void *)f.data);
}

void ref_row(float *out, const Mat *W, int r) { mat_row_to_f32(out, W, r); }
void ref_rmsnorm(float *out, const float *x, const float *w, int n, double eps) { rmsnorm(out, x, w, n, eps); }
void ref_softmax(float *x, int n) { softmax(x, n); }
void ref_swiglu(float *gate, const float *up, size_t n) { swiglu(gate, up, n); }
void ref_rope_tables(const Config *c, int positions, float *cos_table, float *sin_table) {
    rope_tables(c, positions, cos_table, sin_table);
}
void ref_rope(float *x, const float *cos_row, const float *sin_row, int dim) { rope_rotate(x, cos_row, sin_row, dim); }
float ref_softmax_scale(const Config *c) { return (float)attention_softmax_scale(c); }

void ref_route(const Config *c, const float *probs, int *idx, float *weight) {
    RouterScratch r = {floats(c->n_routed_experts), floats(c->n_group), xcalloc(c->n_routed_experts, 1),
                       xcalloc(c->n_group, 1)};
    route_tokens(c, probs, idx, weight, &r);
    free(r.masked); free(r.group_score); free(r.taken); free(r.group_taken);
}

/* Absorbed MLA for the token at position pos (dsv2.c: mla_attend_absorbed): q [H][dn+dr] already
 * rotated, cache [pos+1][r+dr] (row pos: this token's), head_out [H][dv]. */
void ref_attention(const Config *c, const Mat *kv_b, const float *q, const float *cache, int pos,
                   float *head_out) {
    int H = c->num_attention_heads, W = c->kv_lora_rank + c->qk_rope_head_dim;
    RunState s;
    init_run_state(&s, c, ATTN_ABSORB, pos + 1);
    memcpy(s.cache, cache, (size_t)pos * W * sizeof(float));
    memcpy(s.kv_a, cache + (size_t)pos * W, W * sizeof(float));
    memcpy(s.q, q, (size_t)H * (c->qk_nope_head_dim + c->qk_rope_head_dim) * sizeof(float));
    Layer L;
    memset(&L, 0, sizeof L);
    L.kv_b_proj = as_f32(kv_b);
    mla_attend_absorbed(&s, c, &L, 0, 1, pos);
    memcpy(head_out, s.head_out, (size_t)H * c->v_head_dim * sizeof(float));
    free((void *)L.kv_b_proj.data);
    free_run_state(&s);
}
