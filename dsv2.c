/*
 * dsv2.c: DeepSeek-V2 in one readable C file.
 *
 * One architecture covers DeepSeek-V2 (236B), V2-Chat, V2-Lite (16B), V2-Lite-Chat, Coder-V2 and
 * V2.5; only the numbers in the checkpoint header differ. The math follows the official Hugging
 * Face remote code (modeling_deepseek.py), which computed the test fixtures; the equation tags
 * (eq. N) are those of the paper, arXiv:2405.04434.
 *
 * How to read it. Part 1 is the model, in the paper's order; stop at the end of forward_batch and
 * you have read all of DeepSeek-V2 and nothing else:
 *   config -> weights -> matmul (the interface) -> RMSNorm -> RoPE/YaRN -> run state
 *   -> Multi-head Latent Attention (eq. 9-19) -> DeepSeekMoE (eq. 20-25) -> forward
 *   -> sampler -> generation and chat -> CLI.
 * Part 2 is the machinery, one banner each: fast kernels (q8, SIMD, threads), loading (the file
 * layout, mmap, huge pages, the GPU upload), the tokenizer, training.
 *
 * Shapes, one legend for the whole file:
 *   n tokens in a batch (N = B*T sequences x tokens in training), D hidden_size, H heads,
 *   dn qk_nope_head_dim, dr qk_rope_head_dim, dq = dn + dr, dv v_head_dim, r kv_lora_rank,
 *   rq q_lora_rank, E routed experts, K experts per token, Im moe_intermediate_size,
 *   I intermediate_size, V vocab_size, L layers.
 *
 * Build: make dsv2 (or cc -O3 -fopenmp dsv2.c -lm)      Run: ./dsv2 model.bin -i "Hello"
 */
#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE /* MAP_POPULATE, madvise; before any system header */
#endif
#include <assert.h>
#include <stddef.h>
#include <stdint.h>

/* ========================================================================================== */
/* PART 1: THE MODEL                                                                          */
/* ========================================================================================== */

/* ------------------------------------------------------------------------------------------ */
/* Config: the checkpoint header. Every hyper-parameter the forward pass uses is stored here;  */
/* nothing is inferred from a model name. export.py writes it from config.json.                */
/* ------------------------------------------------------------------------------------------ */

#define DSV2_MAGIC "DSV2"
#define DSV2_VERSION 1
#define HEADER_SIZE 512
#define TENSOR_ALIGN 64

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1, DTYPE_Q8 = 2, DTYPE_Q4 = 3 };
enum { TOPK_GREEDY = 0, TOPK_GROUP_LIMITED_GREEDY = 1 };
enum { ROPE_PLAIN = 0, ROPE_YARN = 1 };

typedef struct {
    char magic[4];                  /* "DSV2" */
    uint32_t version;
    int32_t dtype;                  /* storage of the weight matrices; norms and router: f32 */
    int32_t vocab_size;             /* V */
    int32_t hidden_size;            /* D = d in the paper: the width of h_t */
    int32_t num_hidden_layers;      /* L */
    int32_t num_attention_heads;    /* H = n_h */
    int32_t q_lora_rank;            /* rq = d'_c, the query latent; 0: q = W^Q h (V2-Lite) */
    int32_t kv_lora_rank;           /* r = d_c, the KV latent c^KV: what the cache stores */
    int32_t qk_nope_head_dim;       /* dn = d_h, per head: the part of q, k without position */
    int32_t qk_rope_head_dim;       /* dr = d^R_h, per head: the decoupled rotary part */
    int32_t v_head_dim;             /* dv, per head (d_h in the paper, which takes dv = dn) */
    int32_t intermediate_size;      /* I: width of a dense layer's SwiGLU MLP */
    int32_t moe_intermediate_size;  /* Im: width of each expert */
    int32_t n_routed_experts;       /* E = N_r; 0: no MoE layers at all */
    int32_t n_shared_experts;       /* N_s: always-on experts, run as one MLP of width N_s*Im */
    int32_t num_experts_per_tok;    /* K = K_r: routed experts per token */
    int32_t topk_method;            /* TOPK_GREEDY or TOPK_GROUP_LIMITED_GREEDY (device-limited) */
    int32_t n_group;                /* expert groups: the paper's D devices, E/G experts each */
    int32_t topk_group;             /* M: the groups (devices) one token's experts may span */
    int32_t norm_topk_prob;         /* 1: gate weights renormalised to sum 1 (then no scaling) */
    int32_t first_k_dense_replace;  /* layers 0..k-1 are dense */
    int32_t moe_layer_freq;         /* past those, every this-many-th layer is MoE */
    int32_t max_position_embeddings;/* the longest context */
    int32_t bos_token_id;           /* -1: none */
    int32_t eos_token_id;           /* -1: none */
    int32_t rope_scaling;           /* ROPE_PLAIN or ROPE_YARN */
    int32_t original_max_position_embeddings;  /* YaRN: the context RoPE was trained for */
    int32_t seq_aux;                /* balance loss per sequence (1) or per batch (0) */
    int32_t q8_group;               /* q8 and q4 files: weights per scale, along the input dim */
    int32_t reserved_int[4];
    double rms_norm_eps;            /* epsilon of the layer norms (the latent norms: 1e-6) */
    double rope_theta;              /* RoPE base */
    double routed_scaling_factor;   /* gate weights are multiplied by it (no renormalisation) */
    double rope_factor;             /* YaRN s: how far the context is stretched */
    double beta_fast, beta_slow;    /* YaRN: the frequency band that is blended */
    double mscale, mscale_all_dim;  /* YaRN: attention magnitude correction */
    double aux_loss_alpha;          /* alpha_1, weight of the expert-level balance loss */
    double reserved_float[7];
    uint64_t tokenizer_offset;      /* 0: no tokenizer in this file */
    uint64_t tokenizer_size;
    uint64_t file_size;             /* total bytes: catches truncated copies */
    uint64_t reserved_u64;
    char pad[HEADER_SIZE - 8 - 32 * 4 - 16 * 8 - 4 * 8];
} Config;
static_assert(sizeof(Config) == HEADER_SIZE, "header layout must match export.py");

/* ------------------------------------------------------------------------------------------ */
/* Weights. Each tensor by its checkpoint name, the paper's symbol and its shape [rows, cols]. */
/* The file order is the loader's walk, layout_weights in Part 2, and export.py's tensor_plan. */
/* ------------------------------------------------------------------------------------------ */

/* A weight matrix [rows, cols] in row-major order, as nn.Linear stores it: y = W x.
 * q8: int8 weights and one float scale per `group` consecutive weights of a row. */
typedef struct {
    const void *data;
    const float *scale;  /* q8 only: [rows][cols / group] */
    int dtype, rows, cols, group;
} Mat;

typedef struct {
    const float *input_norm;            /* input_layernorm                  [D] */
    Mat q_proj;                         /* self_attn.q_proj        W^Q      [H*dq, D] (rq == 0) */
    Mat q_a_proj;                       /* self_attn.q_a_proj      W^DQ     [rq, D]   (rq > 0) */
    const float *q_a_norm;              /* self_attn.q_a_layernorm          [rq] */
    Mat q_b_proj;                       /* self_attn.q_b_proj  [W^UQ; W^QR] [H*dq, rq], per head:
                                         * dn rows of W^UQ, then dr rows of W^QR */
    Mat kv_a_proj;                      /* self_attn.kv_a_proj_with_mqa [W^DKV; W^KR] [r+dr, D]:
                                         * r latent rows, then the dr rows of the shared rope key */
    const float *kv_a_norm;             /* self_attn.kv_a_layernorm         [r] */
    Mat kv_b_proj;                      /* self_attn.kv_b_proj [W^UK; W^UV] [H*(dn+dv), r], per
                                         * head: dn rows of W^UK, then dv rows of W^UV */
    Mat o_proj;                         /* self_attn.o_proj        W^O      [D, H*dv] */
    const float *post_attention_norm;   /* post_attention_layernorm         [D] */
    int is_moe;
    Mat router;                         /* mlp.gate                e_i      [E, D], always f32 */
    Mat *expert_gate, *expert_up;       /* mlp.experts.{e}.gate_proj, up_proj   FFN^(r)_e [Im, D] */
    Mat *expert_down;                   /* mlp.experts.{e}.down_proj            FFN^(r)_e [D, Im] */
    int has_mlp;
    Mat mlp_gate, mlp_up, mlp_down;     /* dense: mlp.gate_proj, up_proj [I, D], down_proj [D, I];
                                         * MoE: mlp.shared_experts.* FFN^(s), width N_s*Im */
} Layer;

typedef struct {
    Config cfg;
    Mat embed;                          /* model.embed_tokens      [V, D] */
    Layer *layers;                      /* [L] */
    const float *final_norm;            /* model.norm              [D] */
    Mat lm_head;                        /* lm_head                 [V, D] (not tied to embed) */
    void *map;                          /* the checkpoint's bytes in memory */
    size_t map_size;
} Weights;

/* The GPU build (make cuda -> ./dsv2cu): dsv2.cu includes this file up to here (DSV2_TYPES_ONLY)
 * for the types above and implements these. route picks the experts on the host (route_tokens).
 * Weights are read in place from the loaded Weights: there is no second copy of the layout. */
typedef void (*RouteFn)(void *ctx, const float *probs, int *idx, float *weight);
void *cuda_create(const Weights *w, int context, const char *gpus, RouteFn route, void *route_ctx,
                  const float *rope_cos, const float *rope_sin, float softmax_scale);
float *cuda_forward(void *gpu, const int *tokens, int n, int pos);
void cuda_destroy(void *gpu);
/* -m layers on the GPU: after each layer of every later token, copy the hidden state [L][D], the
 * cache row just written [L][r+dr] and the routing [L][K] into these host arrays (NULL: stop). */
void cuda_tap(void *gpu, float *hidden, float *latent, int *route_idx, float *route_weight);

#ifndef DSV2_TYPES_ONLY
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define PI 3.14159265358979323846

/* Every bad input ends here: one line on stderr, exit 1. */
_Noreturn static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fflush(stdout);
    fprintf(stderr, "dsv2: error: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) die("out of memory allocating %zu x %zu bytes", n, size);
    return p;
}

static int max_int(int a, int b) { return a > b ? a : b; }

/* A zeroed buffer in huge pages where the OS allows, as the weights are: in 4 KiB pages, walking
 * 8K cached rows missed the TLB per row, and a prompt's first touch of its 25 MB activation
 * buffers cost a page fault per 4 KiB (13 ns a float here, a tenth of a 512-token prefill). */
static void *xcalloc_huge(size_t bytes) {
    void *p = xcalloc(bytes, 1);  /* big callocs are fresh mappings, not yet touched */
#ifdef MADV_HUGEPAGE
    uintptr_t page = 4096, start = ((uintptr_t)p + page - 1) & ~(page - 1);
    uintptr_t end = ((uintptr_t)p + bytes) & ~(page - 1);
    if (end > start + (2u << 20)) madvise((void *)start, end - start, MADV_HUGEPAGE);
#endif
    return p;
}

/* Touches every page of a buffer now: a fresh page's first write costs a fault and the kernel's
 * zeroing of it (0.3-0.5 s for the 250 MB a 512-token V2-Lite prompt uses, on this VM), which
 * the first prompt would otherwise pay in the middle of its products. */
static void prefault(void *p, size_t bytes) {
    volatile char *c = p;
    for (size_t i = 0; i < bytes; i += 4096) c[i] = 0;
}

/* A layer is MoE iff experts exist, it is past the dense prefix, and on the frequency grid. */
static int is_moe_layer(const Config *c, int l) {
    return c->n_routed_experts > 0 && l >= c->first_k_dense_replace && l % c->moe_layer_freq == 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Matrix products: the one interface the model uses. y = W x for every weight type (f32,     */
/* bf16, q8). How it runs fast (int8 activations, SIMD, threads) is Part 2's business.         */
/* ------------------------------------------------------------------------------------------ */

/* One product for n tokens: y[t] = W x[t], x: [n][W->cols], y: [n][W->rows]. */
typedef struct { float *y; const Mat *W; const float *x; int n; } Product;

/* Scratch the products need (the int8 form of q8 inputs); NULL is fine for f32/bf16 weights. */
typedef struct MatmulScratch MatmulScratch;
static MatmulScratch *matmul_scratch_new(int max_products, size_t max_inputs);
static void matmul_scratch_free(MatmulScratch *scratch);
/* Faults in (prefault) the scratch that calls of up to `tokens` tokens use. */
static void matmul_scratch_prefault(MatmulScratch *scratch, const Config *c, int tokens);

/* Several independent products at once (the experts of a layer, the heads' W^UV); the same
 * numbers as one matmul each, in less time. */
static void matmul_many(const Product *p, int count, MatmulScratch *scratch);

/* y = W x for n tokens. */
static void matmul(float *y, const Mat *W, const float *x, int n, MatmulScratch *scratch) {
    Product p = {y, W, x, n};
    matmul_many(&p, 1, scratch);
}

/* Absorbed attention for one token against the cached latents C [rows][r + dr], all H heads at
 * once so that each cached row is read from memory once per token, not once per head:
 *   S[h][j] = scale Q[h] . C[j]                        Q: [H][C->cols], S: [H][C->rows]
 *   u[h]    = sum_j softmax_j(S[h])_j C[j][0..r)       u: H rows u_stride apart
 * Each sum runs in the same order whatever the number of threads. AttendScratch: what it needs,
 * allocated once (nothing is allocated while decoding). */
/* Cached rows per tile (at most; attention_tile), splits of a token's rows. A tile's sums meet
 * floats once (each head's r sums read and written): 256 rows a tile against 64 took attention
 * over 8 layers x 8,400 rows from 5.7-6.7 to 3.8 ms per token with a q8 cache, 6.1 to 5.1 with
 * bf16 (Zen 5, 2 threads); 600 to 2,100 rows gained too. */
enum { ATT_ROWS = 256, ATT_MAX_SPLITS = 32, ATT_TILE_BYTES = 384 << 10, ATT_SPLIT_TILES = 4 };
typedef struct {
    float *qT;        /* the queries, heads in the lanes [H/16][C->cols][16] */
    float *sums;      /* each split's sum_j e^(S[h][j] - max) C[j] [ATT_MAX_SPLITS][H][r] */
    float *max;       /* each split's running max of S[h] [ATT_MAX_SPLITS][H] */
    double *total;    /* each split's sum_j e^(S[h][j] - max) [ATT_MAX_SPLITS][H] */
    float *p;         /* per thread: a tile's e^(S - max) [threads][H][ATT_ROWS] */
    float *q_bf16;      /* a bf16 cache's queries, rounded to bf16 [H][C->cols] */
    uint32_t *q_pairs;  /* the same as bf16 pairs, heads in the lanes [H/16][C->cols / 2][16] */
    uint32_t *p_pairs;  /* per thread: a tile's e^(S - max), bf16 pairs [threads][H][ATT_ROWS/2] */
    int8_t *q_int8;     /* a q8 cache's queries as int8 [H][C->cols] (latent, rope key apart) */
    int32_t *q_words;   /* the same, heads in lanes: [H/lanes][C->cols / 4][lanes], 16 or 8 */
    float *q_scale;     /* their scales [2][H]: latent, rope key */
    int32_t *q_bias;    /* -128 x the sum of each part's int8 numbers [2][H] (the VNNI scores) */
    uint8_t *w_int8;    /* per thread: a tile's weights e^(S - max) s_j as u8 [threads][H][ATT_ROWS]
                         * (threads a cache line apart, as for w_scale: none writes another's) */
    float *w_scale;     /* per thread: their scales [threads][H], a cache line apart */
    int threads, heads;
} AttendScratch;
/* Per-thread strides of w_int8 (bytes) and w_scale (floats): a cache line past their use. */
static size_t w_int8_stride(int H) { return (size_t)H * ATT_ROWS + 64; }
static size_t w_scale_stride(int H) { return (size_t)H + 16; }
static void attend_latents(float *u, size_t u_stride, float *S, const float *Q, const Mat *C,
                           int r, float scale, AttendScratch *a);
static void attend_scratch_init(AttendScratch *a, int H, int r, int width);
static void attend_scratch_free(AttendScratch *a);
/* u[h] = sum_j P[h][j] W[j][0..count) (P: [H][W->rows]): the transposed product W^T P. */
static void weighted_rows_sum(float *u, size_t u_stride, const float *P, size_t p_stride,
                              const Mat *W, int H, int count);

/* Row r of W as floats: the embedding lookup, and the rows that W^UK^T sums; or count of its
 * columns from col0 (a bf16 or q8 KV cache). */
static void mat_row_to_f32(float *out, const Mat *W, int r);
static void mat_cols_to_f32(float *out, const Mat *W, int r, int col0, int count);

/* Rows row0.. of W overwritten by n rows of floats, rounded to W's type (the KV cache). */
static void mat_store_rows(Mat *W, int row0, const float *x, int n);
/* A q8 cache (-k q8) row [c^KV (r numbers) | k^R]: int8, with one scale for c^KV and one for
 * k^R, so that a head's weighted sum of c^KV rows is a single int8 product per row (scores
 * likewise: one per part). As a Mat it has groups of cache_q8_group (the largest power of two
 * up to 64 dividing r and the row), each group's scale its part's:
 *   row j:  int8  c^KV_j[0] ... c^KV_j[r-1] | k^R_j[0] ... k^R_j[dr-1]
 *           scale  s_j, s_j, ... (r / group) | s'_j, ... (dr / group)          */
static int cache_q8_group(int r, int width);
static void cache_store_q8(Mat *C, int row, const float *x, int r);

/* y[t] += x[t][r] * row r of a q8 or q4 W, for n tokens: each group's scale joins x[t][r], so
 * the row is never widened to floats (that took 12% of q4 decoding). */
static void quantized_row_add(float *y, size_t y_stride, const Mat *W, int r, const float *x,
                              size_t x_stride, int n);

/* Bytes of n numbers of a dtype (q4: two to a byte; n is even wherever q4 is stored). */
static size_t dtype_bytes(int dtype, size_t n) {
    return dtype == DTYPE_Q4 ? n / 2 : n * (dtype == DTYPE_Q8 ? 1 : dtype == DTYPE_BF16 ? 2 : 4);
}
static const char *storage_name(int dtype) {
    static const char *const names[] = {"f32", "bf16", "q8", "q4"};  /* DTYPE_ order */
    return names[dtype];
}

/* Rows [row0, row0 + rows) of W as a matrix of its own (one head's slice of kv_b_proj). */
static Mat mat_rows(const Mat *W, int row0, int rows) {
    Mat m = *W;
    m.data = (const char *)W->data + dtype_bytes(W->dtype, (size_t)row0 * W->cols);
    if (W->scale) m.scale = W->scale + (size_t)row0 * (W->cols / W->group);
    m.rows = rows;
    return m;
}

/* y[t] = W^T x[t] for n tokens (y, x: rows y_stride, x_stride apart): the rows of W weighted by
 * x, each row read (and widened: row, scratch of W->cols) once for all n. Absorbs W^UK into q.
 * A prompt goes through attention's weighted sums instead (tokens for heads): several tokens'
 * sums stay in registers (q8 prefill of 512 tokens spent 10% of its time here, row by row). */
static void matvec_transposed(float *y, size_t y_stride, const Mat *W, const float *x,
                              size_t x_stride, int n, float *row) {
    if (n >= 8) {
        weighted_rows_sum(y, y_stride, x, x_stride, W, n, W->cols);
        return;
    }
    for (int t = 0; t < n; t++) memset(y + t * y_stride, 0, (size_t)W->cols * sizeof(float));
    for (int r = 0; r < W->rows; r++) {
        if (W->dtype == DTYPE_Q8 || W->dtype == DTYPE_Q4) {
            quantized_row_add(y, y_stride, W, r, x + r, x_stride, n);
            continue;
        }
        mat_row_to_f32(row, W, r);
        for (int t = 0; t < n; t++) {
            float xr = x[t * x_stride + r], *yt = y + t * y_stride;
#pragma omp simd
            for (int c = 0; c < W->cols; c++) yt[c] += xr * row[c];
        }
    }
}

static float dot_f32(const float *a, const float *b, int n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* ------------------------------------------------------------------------------------------ */
/* RMSNorm, softmax, SiLU                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* RMSNorm: out = w * x / sqrt(mean(x^2) + eps). Accumulated in double: as exact as cheap. */
static void rmsnorm(float *out, const float *x, const float *weight, int n, double eps) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float inv = (float)(1.0 / sqrt(ss / n + eps));
    for (int i = 0; i < n; i++) out[i] = weight[i] * (x[i] * inv);
}

/* In-place softmax. Subtracting the max keeps exp() finite. */
static void softmax(float *x, int n) {
    float max = x[0];
    for (int i = 1; i < n; i++)
        if (x[i] > max) max = x[i];
    double sum = 0.0;
    for (int i = 0; i < n; i++) { x[i] = expf(x[i] - max); sum += x[i]; }
    float inv = (float)(1.0 / sum);
    for (int i = 0; i < n; i++) x[i] *= inv;
}

static inline float silu(float x) { return x / (1.0f + expf(-x)); }

/* ------------------------------------------------------------------------------------------ */
/* Decoupled RoPE with YaRN (paper eq. 14-15; YaRN: arXiv:2309.00071)                          */
/* ------------------------------------------------------------------------------------------ */

/* YaRN's attention magnitude correction: 0.1 m ln(s) + 1 for a context stretch s > 1. */
static double yarn_get_mscale(double scale, double m) {
    return scale <= 1 ? 1.0 : 0.1 * m * log(scale) + 1.0;
}

/* The rotary dimension pair whose wavelength fits num_rotations times in the original context. */
static double yarn_correction_dim(double num_rotations, int dim, double base,
                                  int original_max_pos) {
    return dim * log(original_max_pos / (num_rotations * 2 * PI)) / (2 * log(base));
}

/* inv_freq[i] for i < dim/2. YaRN keeps high frequencies (they fit the original context),
 * divides low ones by the factor, and blends linearly in between. Static: used at every length. */
static void rope_inv_freq(const Config *c, double *inv_freq) {
    int dim = c->qk_rope_head_dim;
    double low = 0, high = 0;
    if (c->rope_scaling == ROPE_YARN) {
        low = fmax(floor(yarn_correction_dim(c->beta_fast, dim, c->rope_theta,
                                             c->original_max_position_embeddings)),
                   0);
        high = fmin(ceil(yarn_correction_dim(c->beta_slow, dim, c->rope_theta,
                                             c->original_max_position_embeddings)),
                    dim - 1);
        if (low == high) high += 0.001;  /* as the official code: avoids a division by zero */
    }
    for (int i = 0; i < dim / 2; i++) {
        double freq_extra = 1.0 / pow(c->rope_theta, 2.0 * i / dim);
        if (c->rope_scaling != ROPE_YARN) { inv_freq[i] = freq_extra; continue; }
        double freq_inter = freq_extra / c->rope_factor;
        double ramp = fmin(fmax((i - low) / (high - low), 0.0), 1.0);
        double keep = 1.0 - ramp;
        inv_freq[i] = freq_inter * (1.0 - keep) + freq_extra * keep;
    }
}

/* cos/sin tables [positions][dim/2], already multiplied by mscale/mscale_all_dim. */
static void rope_tables(const Config *c, int positions, float *cos_table, float *sin_table) {
    int half = c->qk_rope_head_dim / 2;
    double *inv_freq = xcalloc(half, sizeof(double));
    rope_inv_freq(c, inv_freq);
    double m = 1.0;  /* YaRN: mscale / mscale_all_dim, folded into the tables */
    if (c->rope_scaling == ROPE_YARN)
        m = yarn_get_mscale(c->rope_factor, c->mscale) /
            yarn_get_mscale(c->rope_factor, c->mscale_all_dim);
    for (int p = 0; p < positions; p++)
        for (int i = 0; i < half; i++) {
            cos_table[(size_t)p * half + i] = (float)(cos(p * inv_freq[i]) * m);
            sin_table[(size_t)p * half + i] = (float)(sin(p * inv_freq[i]) * m);
        }
    free(inv_freq);
}

/* softmax scale = (nope+rope)^-1/2 * mscale(factor, mscale_all_dim)^2: YaRN's temperature, squared
 * because it applies to both q and k. Easy to miss; the transformers port did. */
static double attention_softmax_scale(const Config *c) {
    double scale = 1.0 / sqrt((double)(c->qk_nope_head_dim + c->qk_rope_head_dim));
    if (c->rope_scaling == ROPE_YARN && c->mscale_all_dim != 0) {
        double m = yarn_get_mscale(c->rope_factor, c->mscale_all_dim);
        scale *= m * m;
    }
    return scale;
}

/* Rotates the pairs (x[2i], x[2i+1]) by the angle of position p, in place. This equals the
 * official code's permute + rotate_half, since q and k are permuted alike. */
static void rope_rotate(float *x, const float *cos_row, const float *sin_row, int dim) {
    for (int i = 0; i < dim / 2; i++) {
        float a = x[2 * i], b = x[2 * i + 1];
        x[2 * i] = a * cos_row[i] - b * sin_row[i];
        x[2 * i + 1] = a * sin_row[i] + b * cos_row[i];
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Run state: activations for a batch of tokens and the KV cache, allocated once before        */
/* decoding (nothing is allocated per token).                                                  */
/* ------------------------------------------------------------------------------------------ */

enum { ATTN_ABSORB = 0, ATTN_NAIVE = 1 };

typedef struct {
    float *masked;                    /* [E] router scores with the unselected groups zeroed */
    float *group_score;               /* [n_group] */
    unsigned char *taken, *group_taken;
} RouterScratch;

/* Tokens per forward call: a longer prompt goes through in chunks of this many. In a chunk of 64
 * each routed expert got about 6 tokens, too few to pay for reading its weights (bf16 prefill of
 * 512 tokens, 8-layer V2-Lite, Zen 5: 74 -> 97 tok/s at 256). 512: each expert's ~48 tokens fill
 * one panel of 32 and one of 16 where ~24 padded one of 32 (113 -> 121 tok/s, 5 alternations;
 * q8 unchanged). */
#define MAX_BATCH 512

typedef struct {
    const Config *cfg;
    int attn_mode, context;           /* context: positions the cache holds */
    int batch;                        /* n <= batch = min(context, MAX_BATCH) tokens a call */
    double softmax_scale;
    float *rope_cos, *rope_sin;       /* [context][dr/2] */
    float *x, *xn, *branch;           /* residual stream h, its norm, a block's output [n][D] */
    float *q_latent;                  /* c^Q [n][rq] */
    float *q;                         /* [n][H*dq]: per head q^C then q^R */
    float *kv_a;                      /* [n][r+dr]: c^KV then k^R */
    float *kv_latent;                 /* naive: the normed c^KV alone [n][r] */
    float *kv;                        /* naive: k^C and v^C of every head [n][H*(dn+dv)] */
    float *q_absorbed;                /* absorb: [W^UK^T q^C; q^R] per token, head [B][H][r+dr] */
    float *row;                       /* absorb: one weight row as floats [H][r] */
    float *latent_out;                /* absorb: sum_j P_j c_j per head [H][n][r] */
    float *head_tmp;                  /* absorb: W^UV of that [H][n][dv] */
    float *scores;                    /* a token's probabilities [H][pos+1] (pos: its own), one
                                       * per attend slot [attend_slots][H][context] */
    float *head_out;                  /* o_{t,i} [n][H*dv] */
    float *hidden, *hidden2;          /* MLP: [n][I] dense; [n*K][Im] + [n][N_s*Im] MoE */
    float *expert_in, *expert_out;    /* the tokens of each expert, expert by expert [n*K][D] */
    int *expert_tokens;               /* [n*K]: which (token, choice) each row of expert_in is */
    Product *products;                /* the products of one matmul_many */
    Mat *head_mats;                   /* absorb: each head's W^UV rows [H] */
    float *router_probs;              /* s_{i,t} [n][E] */
    int *topk_idx;                    /* the chosen experts, ascending [n][K] */
    float *topk_weight;               /* their gate values g_{i,t} [n][K] */
    RouterScratch router;
    MatmulScratch *matmul;
    float *logits;                    /* [V] of the batch's last token */
    float *all_logits;                /* -m eval: [n][V] of every token of the batch, or NULL */
    void *cache;                      /* [L][context][cache_width] of cache_dtype */
    float *cache_scale;               /* q8 cache: one scale per cache_group numbers */
    AttendScratch *attend;            /* absorb: attend_latents' scratch, one per slot: a prompt's
                                       * tokens attend side by side, one a thread */
    int attend_slots;                 /* the threads this process may run */
    size_t cache_width;               /* numbers per token per layer */
    int cache_dtype, cache_group;     /* -k: DTYPE_F32 (default, exact), DTYPE_BF16, DTYPE_Q8 */
    void *gpu;                        /* the GPU build: the model on the GPU, or NULL */
    struct Trace *trace;              /* -m trace and the tests: what each layer did, or NULL */
} RunState;

/* What -m trace watches (and the tests check): each layer's work on the last token of a forward
 * call, filled by trace_layer() when RunState.trace is set. */
typedef struct Trace {
    float *hidden;                    /* the residual stream h after each layer [L][D] */
    int *route_idx;                   /* MoE layers: the chosen experts, ascending [L][K] */
    float *route_weight;              /* their gate values g_i,t [L][K] */
    unsigned char *groups_kept;       /* device-limited routing: the M groups kept [L][n_group] */
    float *shared_norm, *routed_norm; /* |shared experts' output|, |sum_i g_i FFN_i| [L] */
    float *shared;                    /* scratch: the shared experts' output [D] */
    float *attention;                 /* each head's probabilities over positions [L][H][context] */
    int context;
} Trace;

/* Floats per token per layer: the latent (absorb) or full per-head keys and values (naive). */
static size_t kv_cache_width(const Config *c, int attn_mode) {
    if (attn_mode == ATTN_ABSORB) return (size_t)c->kv_lora_rank + c->qk_rope_head_dim;
    int H = c->num_attention_heads;
    return (size_t)H * (c->qk_nope_head_dim + c->qk_rope_head_dim + c->v_head_dim);
}

static float *floats(size_t n) { return xcalloc_huge(n * sizeof(float)); }

/* A run's buffer; those a forward call writes (used) are faulted in now (prefault), not in the
 * middle of the first prompt, which then runs at the speed of the ones after it. */
static float *run_floats(size_t n, int used) {
    float *p = floats(n);
    if (used) prefault(p, n * sizeof(float));
    return p;
}

/* Attention's slots: one (scores and scratch) per thread where a prompt's tokens attend side by
 * side (side_by_side), else one. Slot 0, the one decoding uses, is faulted in now; the others as
 * prompts use them (H x context floats each: 84 MB per thread for V2 at its longest context). */
static void attend_slots_init(RunState *s, int side_by_side) {
    const Config *c = s->cfg;
    int H = c->num_attention_heads;
    s->attend_slots = 1;
#ifdef _OPENMP
    if (side_by_side) s->attend_slots = omp_get_max_threads();
#else
    (void)side_by_side;  /* one thread */
#endif
    s->scores = floats((size_t)s->attend_slots * H * s->context);
    prefault(s->scores, (size_t)H * s->context * sizeof(float));
    s->attend = xcalloc(s->attend_slots, sizeof(AttendScratch));
    for (int i = 0; i < s->attend_slots; i++)
        attend_scratch_init(&s->attend[i], H, c->kv_lora_rank, (int)s->cache_width);
}

static void init_run_state(RunState *s, const Config *c, int attn_mode, int context) {
    int D = c->hidden_size, H = c->num_attention_heads, E = c->n_routed_experts;
    int B = context < MAX_BATCH ? context : MAX_BATCH;
    int K = c->num_experts_per_tok, r = c->kv_lora_rank, dr = c->qk_rope_head_dim;
    int dq = c->qk_nope_head_dim + dr, dv = c->v_head_dim;
    int moe_width = c->moe_intermediate_size * (K + c->n_shared_experts);  /* routed + shared */
    int mlp_width = max_int(c->intermediate_size, moe_width);
    int widest = max_int(max_int(max_int(D * (K + 1), mlp_width),
                                 max_int(c->q_lora_rank, H * (r + dr))),
                         H * dv);  /* the most input floats of one matmul_many */
    int max_products = max_int(2 * (E < B * K ? E : B * K) + 2, H);  /* gate, up per expert */
    int naive = attn_mode == ATTN_NAIVE;  /* its buffers, or absorb's, are the ones written */
    memset(s, 0, sizeof *s);
    s->cfg = c;
    s->attn_mode = attn_mode;
    s->context = context;
    s->batch = B;
    s->softmax_scale = attention_softmax_scale(c);
    s->rope_cos = floats((size_t)context * dr / 2);
    s->rope_sin = floats((size_t)context * dr / 2);
    rope_tables(c, context, s->rope_cos, s->rope_sin);
    s->x = run_floats((size_t)B * D, 1);
    s->xn = run_floats((size_t)B * D, 1);
    s->branch = run_floats((size_t)B * D, 1);
    s->q_latent = run_floats((size_t)B * c->q_lora_rank, 1);
    s->q = run_floats((size_t)B * H * dq, 1);
    s->kv_a = run_floats((size_t)B * (r + dr), 1);
    s->kv_latent = run_floats((size_t)B * r, naive);
    s->kv = run_floats((size_t)B * H * (c->qk_nope_head_dim + dv), naive);
    s->q_absorbed = run_floats((size_t)B * H * (r + dr), !naive);
    s->row = run_floats((size_t)H * r, !naive);
    s->latent_out = run_floats((size_t)H * B * r, !naive);
    s->head_tmp = run_floats((size_t)H * B * dv, !naive);
    s->head_out = run_floats((size_t)B * H * dv, 1);
    s->hidden = run_floats((size_t)B * mlp_width, 1);
    s->hidden2 = run_floats((size_t)B * mlp_width, 1);
    s->expert_in = run_floats((size_t)B * K * D, 1);
    s->expert_out = run_floats((size_t)B * K * D, 1);
    s->expert_tokens = xcalloc((size_t)B * K, sizeof(int));
    s->products = xcalloc(max_products, sizeof(Product));
    s->head_mats = xcalloc(H, sizeof(Mat));
    s->router_probs = run_floats((size_t)B * E, 1);
    s->topk_idx = xcalloc((size_t)B * K, sizeof(int));
    s->topk_weight = run_floats((size_t)B * K, 1);
    s->router.masked = floats(E);
    s->router.group_score = floats(c->n_group);
    s->router.taken = xcalloc(E, 1);
    s->router.group_taken = xcalloc(c->n_group, 1);
    s->matmul = matmul_scratch_new(max_products, (size_t)B * widest);
    matmul_scratch_prefault(s->matmul, c, B);
    s->logits = floats(c->vocab_size);
    s->cache_width = kv_cache_width(c, attn_mode);
    s->cache = xcalloc_huge((size_t)c->num_hidden_layers * context * s->cache_width * 4);
    s->cache_dtype = DTYPE_F32;
    s->cache_group = (int)s->cache_width;
    attend_slots_init(s, !naive && B > 1);
}

/* -k: the absorbed cache in bf16, or in q8 (groups of 32 with a scale, as q8 weights), instead
 * of f32: a half or about a quarter of the bytes that decoding reads per position. */
static void set_cache_dtype(RunState *s, int dtype) {
    if (dtype == s->cache_dtype) return;
    if (s->attn_mode != ATTN_ABSORB)
        die("-k bf16 and -k q8 need the absorbed attention (-a absorb)");
    size_t n = (size_t)s->cfg->num_hidden_layers * s->context * s->cache_width;
    free(s->cache);
    free(s->cache_scale);
    s->cache = xcalloc_huge(dtype_bytes(dtype, n));
    s->cache_scale = NULL;
    s->cache_dtype = dtype;
    s->cache_group = (int)s->cache_width;
    if (dtype == DTYPE_Q8) {
        s->cache_group = cache_q8_group(s->cfg->kv_lora_rank, (int)s->cache_width);
        s->cache_scale = floats(n / s->cache_group);
    }
}

static void free_run_state(RunState *s) {
    void *bufs[] = {s->rope_cos, s->rope_sin, s->x, s->xn, s->branch, s->q_latent, s->q, s->kv_a,
                    s->kv_latent, s->kv, s->q_absorbed, s->row, s->latent_out, s->head_tmp,
                    s->scores, s->head_out, s->hidden, s->hidden2, s->expert_in, s->expert_out,
                    s->expert_tokens, s->router_probs, s->topk_idx, s->topk_weight,
                    s->router.masked, s->router.group_score, s->router.taken,
                    s->router.group_taken, s->products, s->head_mats, s->logits, s->all_logits,
                    s->cache, s->cache_scale};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    for (int i = 0; i < s->attend_slots; i++) attend_scratch_free(&s->attend[i]);
    free(s->attend);
    matmul_scratch_free(s->matmul);
}

/* ------------------------------------------------------------------------------------------ */
/* Multi-head Latent Attention (paper section 2.1, eq. 9-19)                                   */
/*                                                                                            */
/* Keys and values of all heads come from one small latent per token (low-rank joint           */
/* compression):                                                                              */
/*   c^KV_t = W^DKV h_t                 (eq. 9)   kv_a_proj rows 0..r-1, then kv_a_layernorm   */
/*   k^C_t  = W^UK c^KV_t               (eq. 10)  kv_b_proj, the dn rows of each head          */
/*   v^C_t  = W^UV c^KV_t               (eq. 11)  kv_b_proj, the dv rows of each head          */
/* and the query likewise, when q_lora_rank > 0 (else q^C = W^Q h, V2-Lite):                   */
/*   c^Q_t  = W^DQ h_t                  (eq. 12)  q_a_proj, then q_a_layernorm                 */
/*   q^C_t  = W^UQ c^Q_t                (eq. 13)  q_b_proj, the dn rows of each head           */
/* Position enters through a decoupled rotary part, its own query per head and one key shared  */
/* by all heads:                                                                              */
/*   q^R_t  = RoPE(W^QR c^Q_t)          (eq. 14)  q_b_proj, the dr rows of each head           */
/*   k^R_t  = RoPE(W^KR h_t)            (eq. 15)  kv_a_proj rows r..r+dr-1                     */
/*   q_t,i  = [q^C_t,i; q^R_t,i]        (eq. 16)                                               */
/*   k_t,i  = [k^C_t,i; k^R_t]          (eq. 17)                                               */
/*   o_t,i  = sum_j softmax_j(q_t,i . k_j,i / sqrt(dn + dr)) v^C_j,i      (eq. 18)              */
/*   u_t    = W^O [o_t,1; ...; o_t,H]   (eq. 19)  o_proj                                        */
/*                                                                                            */
/* Absorption (the decode form). For head i, by associativity:                                 */
/*   q^C . (W^UK c_j) = (W^UK^T q^C) . c_j        -> scores straight against the latent         */
/*   sum_j P_j (W^UV c_j) = W^UV (sum_j P_j c_j)  -> values straight from the latent            */
/* so the cache keeps only c^KV_j and k^R_j: r + dr floats per token per layer, whatever H.    */
/* Why the rope key is decoupled: RoPE is a position-dependent rotation R_j. Were it applied   */
/* to k^C, the score would be q^T R_t^T R_j W^UK c_j, and the matrix between q and c_j would   */
/* change with every position pair: W^UK could no longer be folded into the query once for    */
/* all j. So k^C carries no position, and a small separate k^R (cached, shared by the heads)   */
/* carries it. The naive form decompresses per-head K and V and caches them, as MHA would.     */
/* ------------------------------------------------------------------------------------------ */

/* Queries for n tokens at positions pos.. (eq. 12-14, 16): q_latent = W^DQ h came with kv_a. */
static void mla_query(RunState *s, const Config *c, const Layer *L, int n, int pos) {
    int dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim, dq = dn + dr;
    int H = c->num_attention_heads, rq = c->q_lora_rank, half = dr / 2;
    if (rq > 0) {
        for (int t = 0; t < n; t++)  /* eq. 12: c^Q = norm(W^DQ h), eps 1e-6 fixed officially */
            rmsnorm(s->q_latent + (size_t)t * rq, s->q_latent + (size_t)t * rq, L->q_a_norm, rq,
                    1e-6);
        matmul(s->q, &L->q_b_proj, s->q_latent, n, s->matmul);  /* eq. 13-14: [q^C; W^QR c^Q] */
    }
    for (int t = 0; t < n; t++)                                 /* eq. 14: q^R = RoPE(.) */
        for (int h = 0; h < H; h++)                             /* eq. 16: q = [q^C; q^R] */
            rope_rotate(s->q + ((size_t)t * H + h) * dq + dn,
                        s->rope_cos + (size_t)(pos + t) * half,
                        s->rope_sin + (size_t)(pos + t) * half, dr);
}

/* The compressed KV for n tokens (eq. 9, 15): kv_a = [c^KV | k^R], normed and rotated. */
static void mla_latent(RunState *s, const Config *c, const Layer *L, int n, int pos) {
    int r = c->kv_lora_rank, dr = c->qk_rope_head_dim, half = dr / 2;
    for (int t = 0; t < n; t++) {
        float *a = s->kv_a + (size_t)t * (r + dr);
        rmsnorm(a, a, L->kv_a_norm, r, 1e-6);                   /* eq. 9: c^KV */
        rope_rotate(a + r, s->rope_cos + (size_t)(pos + t) * half,
                    s->rope_sin + (size_t)(pos + t) * half, dr);  /* eq. 15: k^R = RoPE(W^KR h) */
    }
}

/* The layer's cached rows 0..rows-1 as a matrix [rows][r + dr]: row j is [c^KV_j; k^R_j], in
 * the cache's number type (-k: f32, bf16 or q8). Attention's products read it as weights. */
static Mat cache_rows(const RunState *s, int layer, int rows) {
    size_t row0 = (size_t)layer * s->context;
    Mat m = {(const char *)s->cache + dtype_bytes(s->cache_dtype, row0 * s->cache_width),
             s->cache_scale ? s->cache_scale + row0 * s->cache_width / s->cache_group : NULL,
             s->cache_dtype, rows, (int)s->cache_width, s->cache_group};
    return m;
}

/* Rows pos..pos+n-1 of the layer's cache: the n tokens' [c^KV; k^R], rounded to the cache type
 * (q8: cache_store_q8, one scale for c^KV and one for k^R). */
static void cache_store(RunState *s, int layer, int pos, const float *rows, int n) {
    Mat all = cache_rows(s, layer, s->context);
    if (all.dtype == DTYPE_Q8)
        for (int t = 0; t < n; t++)
            cache_store_q8(&all, pos + t, rows + (size_t)t * all.cols, s->cfg->kv_lora_rank);
    else mat_store_rows(&all, pos, rows, n);
}

/* Token t of n (at pos + t) against the cached rows up to its own, all heads at once, with
 * attend slot `slot`'s scratch and scores. */
static void attend_token(RunState *s, int layer, int t, int n, int pos, int slot) {
    const Config *c = s->cfg;
    int H = c->num_attention_heads, r = c->kv_lora_rank, rows = pos + t + 1;  /* causal */
    Mat latents = cache_rows(s, layer, rows);
    /* eq. 16-17: q.k = q_abs.c^KV_j + q^R.k^R_j for every head and position; eq. 18:
     * u_h = sum_j softmax_j(q.k / sqrt(dn + dr)) c^KV_j, each cached row read once */
    attend_latents(s->latent_out + (size_t)t * r, (size_t)n * r,
                   s->scores + (size_t)slot * H * s->context,
                   s->q_absorbed + (size_t)t * H * s->cache_width, &latents, r,
                   (float)s->softmax_scale, &s->attend[slot]);
}

/* Absorbed attention over the latent cache, token by token with all heads at once: the scores
 * of every head are one product against the cached rows, so each row is read once per token
 * (reading it once per head made decoding slow down with context: 16x the reads for V2-Lite). */
static void mla_attend_absorbed(RunState *s, const Config *c, const Layer *L, int layer, int n,
                                int pos) {
    int H = c->num_attention_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim;
    int dv = c->v_head_dim, r = c->kv_lora_rank, dq = dn + dr, kv_head_rows = dn + dv;
    size_t width = s->cache_width;
    cache_store(s, layer, pos, s->kv_a, n);                      /* [c^KV; k^R] of the n tokens */
#pragma omp parallel for schedule(static)
    for (int h = 0; h < H; h++) {                                /* q_cat = [W^UK^T q^C; q^R] */
        const float *q_nope = s->q + (size_t)h * dq;
        float *q_cat = s->q_absorbed + (size_t)h * width;
        Mat w_uk = mat_rows(&L->kv_b_proj, h * kv_head_rows, dn);
        /* eq. 10, absorbed: the query meets W^UK once, q_abs = W^UK^T q^C */
        matvec_transposed(q_cat, H * width, &w_uk, q_nope, (size_t)H * dq, n,
                          s->row + (size_t)h * r);
        for (int t = 0; t < n; t++)
            memcpy(q_cat + t * H * width + r, q_nope + (size_t)t * H * dq + dn,
                   dr * sizeof(float));
    }
    int slots = s->attend_slots;  /* the threads now running, at most */
#ifdef _OPENMP
    slots = omp_get_max_threads() < slots ? omp_get_max_threads() : slots;
#endif
    if (n == 1 || s->trace || slots == 1)  /* a token's rows split among threads */
        for (int t = 0; t < n; t++) attend_token(s, layer, t, n, pos, 0);
    else  /* a prompt: whole tokens side by side, the longest first (one alone left a core idle) */
#pragma omp parallel for schedule(dynamic, 1) num_threads(slots)
        for (int i = 0; i < n; i++) {
            int slot = 0;
#ifdef _OPENMP
            slot = omp_get_thread_num();
#endif
            attend_token(s, layer, n - 1 - i, n, pos, slot);
        }
    for (int h = 0; s->trace && h < H; h++)  /* -m trace: the last token's probabilities */
        softmax(s->scores + (size_t)h * (pos + n), pos + n);
    for (int h = 0; h < H; h++) {              /* eq. 11, 18: o = W^UV u, all heads in one pass */
        s->head_mats[h] = mat_rows(&L->kv_b_proj, h * kv_head_rows + dn, dv);
        s->products[h] = (Product){s->head_tmp + (size_t)h * n * dv, &s->head_mats[h],
                                   s->latent_out + (size_t)h * n * r, n};
    }
    matmul_many(s->products, H, s->matmul);
    for (int t = 0; t < n; t++)
        for (int h = 0; h < H; h++)
            memcpy(s->head_out + ((size_t)t * H + h) * dv, s->head_tmp + ((size_t)h * n + t) * dv,
                   dv * sizeof(float));
}

/* Naive attention: decompress each token's per-head K and V, cache them, attend as in MHA. */
static void mla_attend_naive(RunState *s, const Config *c, const Layer *L, int layer, int n,
                             int pos) {
    int H = c->num_attention_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim;
    int dv = c->v_head_dim, r = c->kv_lora_rank, dq = dn + dr, kv_head_rows = dn + dv;
    size_t width = s->cache_width, head_width = (size_t)dq + dv;
    float *layer_cache = (float *)s->cache + (size_t)layer * s->context * width;
    for (int t = 0; t < n; t++)                                 /* kv_b_proj takes c^KV only */
        memcpy(s->kv_latent + (size_t)t * r, s->kv_a + (size_t)t * (r + dr), r * sizeof(float));
    matmul(s->kv, &L->kv_b_proj, s->kv_latent, n, s->matmul);  /* eq. 10-11: [k^C | v^C] */
    for (int t = 0; t < n; t++) {                               /* cached per head: [k | v] */
        float *slot = layer_cache + (size_t)(pos + t) * width;
        const float *kv = s->kv + (size_t)t * H * kv_head_rows;
        for (int h = 0; h < H; h++) {
            float *k = slot + h * head_width;                   /* eq. 17: k = [k^C; k^R] */
            memcpy(k, kv + (size_t)h * kv_head_rows, dn * sizeof(float));
            memcpy(k + dn, s->kv_a + (size_t)t * (r + dr) + r, dr * sizeof(float));
            memcpy(k + dq, kv + (size_t)h * kv_head_rows + dn, dv * sizeof(float));
        }
    }
    for (int t = 0; t < n; t++) {
        int rows = pos + t + 1;
#pragma omp parallel for schedule(static)
        for (int h = 0; h < H; h++) {
            float *att = s->scores + (size_t)h * rows;
            const float *q = s->q + ((size_t)t * H + h) * dq;
            float *out = s->head_out + ((size_t)t * H + h) * dv;
            for (int j = 0; j < rows; j++)                      /* eq. 18: q . k / sqrt(dq) */
                att[j] = (float)s->softmax_scale *
                        dot_f32(q, layer_cache + j * width + h * head_width, dq);
            softmax(att, rows);
            memset(out, 0, dv * sizeof(float));                 /* eq. 18: sum_j P_j v_j */
            for (int j = 0; j < rows; j++) {
                const float *v = layer_cache + j * width + h * head_width + dq;
                for (int i = 0; i < dv; i++) out[i] += att[j] * v[i];
            }
        }
    }
}

/* MLA for n tokens at positions pos..: s->xn in, s->branch out. */
static void mla(RunState *s, const Config *c, const Layer *L, int layer, int n, int pos) {
    int lora = c->q_lora_rank > 0;  /* eq. 12 (or W^Q h) and eq. 9 + 15 read h: one pass */
    Product from_input[2] = {
            {lora ? s->q_latent : s->q, lora ? &L->q_a_proj : &L->q_proj, s->xn, n},
            {s->kv_a, &L->kv_a_proj, s->xn, n}};
    matmul_many(from_input, 2, s->matmul);
    mla_query(s, c, L, n, pos);
    mla_latent(s, c, L, n, pos);
    if (s->attn_mode == ATTN_ABSORB) mla_attend_absorbed(s, c, L, layer, n, pos);
    else mla_attend_naive(s, c, L, layer, n, pos);
    matmul(s->branch, &L->o_proj, s->head_out, n, s->matmul);  /* eq. 19: u = W^O [o_1; ...] */
}

/* ------------------------------------------------------------------------------------------ */
/* DeepSeekMoE (paper section 2.2, eq. 20-25)                                                  */
/*                                                                                            */
/* The FFN of an MoE layer is many small experts: N_s shared ones that every token uses and    */
/* E = N_r routed ones, of which each token uses K:                                           */
/*   h'_t  = u_t + sum_{i<=N_s} FFN^(s)_i(u_t) + sum_{i<=N_r} g_i,t FFN^(r)_i(u_t)   (eq. 20)   */
/*   g_i,t = s_i,t if s_i,t is among the K largest of {s_j,t}, else 0                (eq. 21)   */
/*   s_i,t = softmax_i(u_t . e_i)       e_i: row i of the router mlp.gate            (eq. 22)   */
/* (the residual u_t + ... is added by forward_batch; the N_s shared experts are one SwiGLU of */
/* width N_s * Im). Every expert is a SwiGLU MLP: down(silu(gate x) * up x).                   */
/* Device-limited routing (topk_method group_limited_greedy, V2 236B): the experts sit in      */
/* n_group groups of E/n_group (one per device); a token first keeps the topk_group = M groups */
/* with the highest max s_i,t, then takes its top K among their experts, so its experts span   */
/* at most M devices. After selection, the official V2 code either renormalises the K gate     */
/* values to sum 1 (norm_topk_prob) or multiplies them by routed_scaling_factor, never both.   */
/* Training adds the expert-level balance loss, which pushes the router towards even load      */
/* (T tokens of a sequence, or of the batch when seq_aux is 0):                                */
/*   L_ExpBal = alpha_1 sum_i f_i P_i                                                (eq. 23)   */
/*   f_i = N_r / (K T) sum_t 1(token t chose expert i)                               (eq. 24)   */
/*   P_i = 1/T sum_t s_i,t                                                           (eq. 25)   */
/* The paper's device- and communication-level balance losses (eq. 26-31) matter only when     */
/* experts are spread over devices; the released code has none, nor does dsv2.                 */
/* ------------------------------------------------------------------------------------------ */

/* Index of the largest value among those not yet taken; ties go to the lower index. */
static int argmax_untaken(const float *v, const unsigned char *taken, int n) {
    int best = -1;
    for (int i = 0; i < n; i++)
        if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
    return best;
}

/* The router's choice for one token (eq. 21, device-limited when configured): from the scores
 * s_i,t (probs [E]) fills idx and weight, K entries in ascending expert id. */
static void route_tokens(const Config *c, const float *probs, int *idx, float *weight,
                         RouterScratch *r) {
    int E = c->n_routed_experts, K = c->num_experts_per_tok;
    float *masked = r->masked, *group_score = r->group_score;
    unsigned char *taken = r->taken, *group_taken = r->group_taken;
    memcpy(masked, probs, E * sizeof(float));
    if (c->topk_method == TOPK_GROUP_LIMITED_GREEDY) {
        int G = c->n_group, per_group = E / G;
        for (int g = 0; g < G; g++) {  /* a group's score: its best expert's */
            group_score[g] = probs[g * per_group];
            for (int e = 1; e < per_group; e++)
                group_score[g] = fmaxf(group_score[g], probs[g * per_group + e]);
            group_taken[g] = 0;
        }
        for (int k = 0; k < c->topk_group; k++)  /* keep the best M groups */
            group_taken[argmax_untaken(group_score, group_taken, G)] = 1;
        for (int e = 0; e < E; e++)
            if (!group_taken[e / per_group]) masked[e] = 0.0f;
    }
    for (int e = 0; e < E; e++) taken[e] = 0;
    for (int k = 0; k < K; k++) taken[argmax_untaken(masked, taken, E)] = 1;  /* eq. 21: top K */
    double sum = 0.0;
    for (int e = 0, k = 0; e < E; e++)
        if (taken[e]) { idx[k] = e; weight[k] = probs[e]; sum += probs[e]; k++; }
    for (int k = 0; k < K; k++)  /* renormalised or scaled, never both (the official V2 code) */
        weight[k] = (K > 1 && c->norm_topk_prob) ? (float)(weight[k] / (sum + 1e-20))
                                                 : (float)(weight[k] * c->routed_scaling_factor);
}

/* The router for n tokens: scores (eq. 22), then each token's experts and gate values. */
static void router_forward(float *probs, int *idx, float *weight, const float *x, const Mat *router,
                           int n, const Config *c, RouterScratch *r, MatmulScratch *scratch) {
    int E = c->n_routed_experts, K = c->num_experts_per_tok;
    matmul(probs, router, x, n, scratch);                       /* eq. 22: u_t . e_i */
    for (int t = 0; t < n; t++) {
        softmax(probs + (size_t)t * E, E);                      /* eq. 22: s_i,t */
        route_tokens(c, probs + (size_t)t * E, idx + (size_t)t * K, weight + (size_t)t * K, r);
    }
}

/* SwiGLU's middle: gate <- silu(gate) * up, elementwise over count values (a prompt's on every
 * thread: on one, it was 3% of a 512-token prefill while the other core waited). */
static void swiglu(float *gate, const float *up, size_t count) {
#pragma omp parallel for if (count > 65536)
    for (size_t i = 0; i < count; i++) gate[i] = silu(gate[i]) * up[i];
}

/* SwiGLU MLP for n tokens (the dense layers): out = down(silu(gate x) * up x). */
static void swiglu_mlp(RunState *s, float *out, const float *x, int n, const Mat *gate,
                       const Mat *up, const Mat *down) {
    Product gate_up[2] = {{s->hidden, gate, x, n}, {s->hidden2, up, x, n}};
    matmul_many(gate_up, 2, s->matmul);
    swiglu(s->hidden, s->hidden2, (size_t)n * gate->rows);
    matmul(out, down, s->hidden, n, s->matmul);
}

/* The rows of each expert: its tokens gathered, expert by expert, into rows of expert_in, and a
 * gate and an up product per expert that has any. Returns the number of rows. */
static int moe_gather(RunState *s, const Layer *L, int n, int *count) {
    const Config *c = s->cfg;
    int D = c->hidden_size, E = c->n_routed_experts, K = c->num_experts_per_tok;
    int Im = c->moe_intermediate_size, rows = 0;
    for (int e = 0; e < E; e++) {
        int first = rows;
        for (int t = 0; t < n; t++)
            for (int k = 0; k < K; k++)
                if (s->topk_idx[t * K + k] == e) {
                    s->expert_tokens[rows] = t * K + k;
                    memcpy(s->expert_in + (size_t)rows * D, s->xn + (size_t)t * D,
                           D * sizeof(float));
                    rows++;
                }
        if (rows == first) continue;
        const float *in = s->expert_in + (size_t)first * D;
        s->products[(*count)++] = (Product){s->hidden + (size_t)first * Im, &L->expert_gate[e], in,
                                            rows - first};
        s->products[(*count)++] = (Product){s->hidden2 + (size_t)first * Im, &L->expert_up[e], in,
                                            rows - first};
    }
    return rows;
}

/* The MoE FFN for n tokens (eq. 20): s->xn in, s->branch out. The shared experts run on every
 * token, each routed expert on just its tokens (its weights read once for all of them): every
 * gate and up product in one pass, SwiGLU, then every down product in a second. */
static void moe(RunState *s, const Config *c, const Layer *L, int n) {
    int D = c->hidden_size, K = c->num_experts_per_tok, Im = c->moe_intermediate_size;
    router_forward(s->router_probs, s->topk_idx, s->topk_weight, s->xn, &L->router, n, c,
                   &s->router, s->matmul);
    Product *p = s->products;
    int count = 0, rows = moe_gather(s, L, n, &count);
    float *shared_gate = s->hidden + (size_t)rows * Im, *shared_up = s->hidden2 + (size_t)rows * Im;
    if (L->has_mlp) {  /* FFN^(s): the shared experts, one MLP */
        p[count++] = (Product){shared_gate, &L->mlp_gate, s->xn, n};
        p[count++] = (Product){shared_up, &L->mlp_up, s->xn, n};
    }
    matmul_many(p, count, s->matmul);
    swiglu(s->hidden, s->hidden2,
           (size_t)rows * Im + (L->has_mlp ? (size_t)n * L->mlp_gate.rows : 0));
    int routed = L->has_mlp ? count - 2 : count;
    for (int j = 0; j < routed; j += 2) { /* down: gate j's rows of hidden -> those of expert_out */
        size_t first = (size_t)(p[j].x - s->expert_in) / D;
        const Mat *down = &L->expert_down[s->topk_idx[s->expert_tokens[first]]];
        p[j / 2] = (Product){s->expert_out + first * D, down, s->hidden + first * Im, p[j].n};
    }
    count = routed / 2;
    if (L->has_mlp) p[count++] = (Product){s->branch, &L->mlp_down, shared_gate, n};
    else memset(s->branch, 0, (size_t)n * D * sizeof(float));
    matmul_many(p, count, s->matmul);
    if (s->trace) memcpy(s->trace->shared, s->branch + (size_t)(n - 1) * D, D * sizeof(float));
    for (int j = 0; j < rows; j++) {  /* eq. 20: shared + sum_i g_i,t FFN^(r)_i(u_t) */
        int t = s->expert_tokens[j] / K;
        float g = s->topk_weight[s->expert_tokens[j]];
        for (int i = 0; i < D; i++)
            s->branch[(size_t)t * D + i] += g * s->expert_out[(size_t)j * D + i];
    }
}

/* The expert-level balance loss of one MoE layer (eq. 23-25) over B sequences of T tokens, from
 * the router's scores [B*T][E] and choices [B*T][K]. f_i counts are constants for the gradient. */
static double balance_loss(const float *scores, const int *idx, int B, int T, const Config *c) {
    int E = c->n_routed_experts, K = c->num_experts_per_tok, N = B * T;
    int groups = c->seq_aux ? B : 1, per = N / groups;  /* the paper's T: tokens per sequence */
    double loss = 0;
    for (int b = 0; b < groups; b++)
        for (int e = 0; e < E; e++) {
            int count = 0;
            double score_sum = 0;
            for (int t = b * per; t < (b + 1) * per; t++) {
                score_sum += scores[(size_t)t * E + e];
                for (int k = 0; k < K; k++) count += idx[t * K + k] == e;
            }
            double f = count / ((double)per * K / E);            /* eq. 24: f_i */
            double P = score_sum / per;                          /* eq. 25: P_i */
            loss += f * P;                                       /* eq. 23: sum_i f_i P_i */
        }
    return c->aux_loss_alpha * loss / groups;                    /* eq. 23: alpha_1, per sequence */
}

/* -m trace: copies what layer l did for the batch's last token (t = n-1) into s->trace. The
 * attention probabilities are still in s->scores, the routing in s->topk_*, the FFN's output in
 * s->branch (moe() saved its shared part). */
static void trace_layer(RunState *s, const Layer *L, int l, int n, int pos) {
    const Config *c = s->cfg;
    Trace *tr = s->trace;
    int D = c->hidden_size, K = c->num_experts_per_tok, G = c->n_group;
    int H = c->num_attention_heads, t = n - 1;
    memcpy(tr->hidden + (size_t)l * D, s->x + (size_t)t * D, D * sizeof(float));
    for (int h = 0; h < H; h++)  /* the positions attended, 0 .. pos + n - 1, not the context */
        memcpy(tr->attention + ((size_t)l * H + h) * tr->context,
               s->scores + (size_t)h * (pos + n), (size_t)(pos + n) * sizeof(float));
    if (!L->is_moe) return;
    memcpy(tr->route_idx + (size_t)l * K, s->topk_idx + (size_t)t * K, K * sizeof(int));
    memcpy(tr->route_weight + (size_t)l * K, s->topk_weight + (size_t)t * K, K * sizeof(float));
    memcpy(tr->groups_kept + (size_t)l * G, s->router.group_taken, G);
    double shared = 0, routed = 0;
    for (int i = 0; i < D; i++) {
        float sh = tr->shared[i], ro = s->branch[(size_t)t * D + i] - sh;
        shared += (double)sh * sh;
        routed += (double)ro * ro;
    }
    tr->shared_norm[l] = (float)sqrt(shared);
    tr->routed_norm[l] = (float)sqrt(routed);
}

static Trace *trace_new(const Config *c, int context) {
    int L = c->num_hidden_layers, K = c->num_experts_per_tok;
    Trace *tr = xcalloc(1, sizeof *tr);
    tr->context = context;
    tr->hidden = floats((size_t)L * c->hidden_size);
    tr->route_idx = xcalloc((size_t)L * K, sizeof(int));
    tr->route_weight = floats((size_t)L * K);
    tr->groups_kept = xcalloc((size_t)L * c->n_group, 1);
    tr->shared_norm = floats(L);
    tr->routed_norm = floats(L);
    tr->shared = floats(c->hidden_size);
    tr->attention = floats((size_t)L * c->num_attention_heads * context);
    return tr;
}

static void trace_free(Trace *tr) {
    if (!tr) return;
    void *bufs[] = {tr->hidden,      tr->route_idx,   tr->route_weight, tr->groups_kept,
                    tr->shared_norm, tr->routed_norm, tr->shared,       tr->attention};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    free(tr);
}

/* ------------------------------------------------------------------------------------------ */
/* Forward: n tokens at positions pos.. through every layer, extending the KV cache. Decoding  */
/* is n = 1; a prompt goes through as a matrix, in chunks. Returns the last token's logits.    */
/* ------------------------------------------------------------------------------------------ */

static float *forward_batch(const Weights *w, RunState *s, const int *tokens, int n, int pos) {
    const Config *c = &w->cfg;
    int D = c->hidden_size;
    if (n > s->batch) die("internal: %d tokens in one forward call, buffers for %d", n, s->batch);
    for (int t = 0; t < n; t++) mat_row_to_f32(s->x + (size_t)t * D, &w->embed, tokens[t]);
    for (int l = 0; l < c->num_hidden_layers; l++) {  /* a prompt's tokens on every thread */
        const Layer *L = &w->layers[l];
#pragma omp parallel for if (n > 1)
        for (int t = 0; t < n; t++)  /* attention block: h += MLA(norm(h)) */
            rmsnorm(s->xn + (size_t)t * D, s->x + (size_t)t * D, L->input_norm, D, c->rms_norm_eps);
        mla(s, c, L, l, n, pos);
#pragma omp parallel for if (n > 1)
        for (size_t i = 0; i < (size_t)n * D; i++) s->x[i] += s->branch[i];
#pragma omp parallel for if (n > 1)
        for (int t = 0; t < n; t++)  /* FFN block: h += FFN(norm(h)), MoE or dense */
            rmsnorm(s->xn + (size_t)t * D, s->x + (size_t)t * D, L->post_attention_norm, D,
                    c->rms_norm_eps);
        if (L->is_moe) moe(s, c, L, n);
        else swiglu_mlp(s, s->branch, s->xn, n, &L->mlp_gate, &L->mlp_up, &L->mlp_down);
#pragma omp parallel for if (n > 1)
        for (size_t i = 0; i < (size_t)n * D; i++) s->x[i] += s->branch[i];  /* eq. 20: u + ... */
        if (s->trace) trace_layer(s, L, l, n, pos);  /* -m trace: what this layer did */
    }
    int first = s->all_logits ? 0 : n - 1;  /* -m eval scores every token, decoding the last */
    for (int t = first; t < n; t++)
        rmsnorm(s->x + (size_t)t * D, s->x + (size_t)t * D, w->final_norm, D, c->rms_norm_eps);
    if (s->all_logits)
        matmul(s->all_logits, &w->lm_head, s->x, n, s->matmul);
    else matmul(s->logits, &w->lm_head, s->x + (size_t)first * D, 1, s->matmul);
    return s->all_logits ? s->all_logits + (size_t)(n - 1) * c->vocab_size : s->logits;
}

/* Any number of tokens: in chunks of s->batch (or on the GPU, in the CUDA build). */
static float *forward(const Weights *w, RunState *s, const int *tokens, int n, int pos) {
#ifdef DSV2_CUDA
    if (s->gpu) return cuda_forward(s->gpu, tokens, n, pos);
#endif
    float *logits = NULL;
    for (int done = 0; done < n; done += s->batch) {
        int chunk = n - done < s->batch ? n - done : s->batch;
        logits = forward_batch(w, s, tokens + done, chunk, pos + done);
    }
    return logits;
}

/* forward(), and a NaN or an infinity in the logits is an error, never an answer (one scan). */
static float *forward_checked(const Weights *w, RunState *s, const int *tokens, int n, int pos) {
    float *logits = forward(w, s, tokens, n, pos), poison = 0.0f;
    int V = w->cfg.vocab_size;
#pragma omp simd reduction(+ : poison)
    for (int i = 0; i < V; i++) poison += logits[i] * 0.0f;
    if (poison != 0.0f) {
        int bad = 0;
        while (bad < V && isfinite(logits[bad])) bad++;
        die("the logits at position %d are not finite (%g at id %d): the weights or the config "
            "overflow", pos + n - 1, logits[bad], bad);
    }
    return logits;
}

/* ------------------------------------------------------------------------------------------ */
/* Sampler: greedy, temperature, top-p (nucleus).                                              */
/* ------------------------------------------------------------------------------------------ */

typedef struct { float prob; int index; } ProbIndex;

typedef struct {
    int vocab_size;
    float temperature, topp;
    uint64_t rng_state;
    ProbIndex *candidates;  /* [V] scratch for top-p */
} Sampler;

static uint32_t random_u32(uint64_t *state) {  /* xorshift* */
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}
static float random_f32(uint64_t *state) { return (random_u32(state) >> 8) / 16777216.0f; }

static int argmax(const float *v, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[best]) best = i;
    return best;
}

static int compare_prob_desc(const void *a, const void *b) {
    float pa = ((const ProbIndex *)a)->prob, pb = ((const ProbIndex *)b)->prob;
    return (pa < pb) - (pa > pb);
}

static int sample(Sampler *sp, float *logits) {
    int best = argmax(logits, sp->vocab_size);
    /* T = 0, or so small that max / T overflows: all the mass is on the best token */
    if (sp->temperature == 0.0f || !isfinite(logits[best] / sp->temperature)) return best;
    for (int i = 0; i < sp->vocab_size; i++) logits[i] /= sp->temperature;
    softmax(logits, sp->vocab_size);
    float r = random_f32(&sp->rng_state);
    if (sp->topp <= 0.0f || sp->topp >= 1.0f) {
        float cdf = 0.0f;
        for (int i = 0; i < sp->vocab_size; i++) {
            cdf += logits[i];
            if (r < cdf) return i;
        }
        return sp->vocab_size - 1;
    }
    /* Keep the smallest set of most likely tokens whose mass reaches topp; sample within it. */
    ProbIndex *cand = sp->candidates;
    int n = 0;
    float cutoff = (1.0f - sp->topp) / (sp->vocab_size - 1);  /* below it: never in the set */
    for (int i = 0; i < sp->vocab_size; i++)
        if (logits[i] >= cutoff) cand[n++] = (ProbIndex){logits[i], i};
    if (n == 0) return best;  /* a tiny top-p over a tiny vocabulary can leave none */
    qsort(cand, n, sizeof(ProbIndex), compare_prob_desc);
    float mass = 0.0f;
    int last = n - 1;
    for (int i = 0; i < n; i++) {
        mass += cand[i].prob;
        if (mass > sp->topp) { last = i; break; }
    }
    float target = r * mass, cdf = 0.0f;
    for (int i = 0; i <= last; i++) {
        cdf += cand[i].prob;
        if (target < cdf) return cand[i].index;
    }
    return cand[last].index;
}

/* ------------------------------------------------------------------------------------------ */
/* Generation and chat                                                                         */
/* ------------------------------------------------------------------------------------------ */

/* From Part 2, the tokenizer: text <-> ids, and a sink that streams decoded text. */
typedef struct Tokenizer Tokenizer;
typedef struct TextSink TextSink;
typedef struct { int *ids; int n, cap; } IdList;  /* a growable list of token ids */
static Tokenizer *open_tokenizer(const char *path, const Weights *w);  /* NULL: none in w */
static void close_tokenizer(Tokenizer *t);
static void tokenizer_encode(Tokenizer *t, const char *text, size_t len, int add_bos, IdList *out);
static int tokenizer_adds_bos(const Tokenizer *t);
static int tokenizer_can_chat(const Tokenizer *t);  /* it knows a chat template */
static char *render_chat_turn(const Tokenizer *t, const char *system, const char *user,
                              int first_turn);
static TextSink *open_sink(FILE *file);
static void decode_token(const Tokenizer *t, TextSink *o, int id, int skip_special);
static void sink_flush(TextSink *o);

static void ids_push(IdList *l, int id) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->ids = realloc(l->ids, (size_t)l->cap * sizeof(int));
        if (!l->ids) die("out of memory");
    }
    l->ids[l->n++] = id;
}

/* Reads whitespace-separated token ids from text; every id must be < vocab_size. */
static int *parse_ids(const char *text, int vocab_size, int *n_out) {
    size_t cap = 16;
    int n = 0, *ids = xcalloc(cap, sizeof(int));
    const char *p = text;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno ||
            (*end && *end != ' ' && *end != '\t' && *end != '\n' && *end != '\r'))
            die("token ids must be whitespace-separated integers (bad input near \"%.20s\")", p);
        if (v < 0 || v >= vocab_size) die("token id %ld is out of range [0, %d)", v, vocab_size);
        if ((size_t)n == cap) {
            cap *= 2;
            ids = realloc(ids, cap * sizeof(int));
            if (!ids) die("out of memory");
        }
        ids[n++] = (int)v;
        p = end;
    }
    *n_out = n;
    return ids;
}

static char *read_file(const char *path, size_t *size_out) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open %s: %s", path, strerror(errno));
    size_t cap = 4096, n = 0;
    char *buf = xcalloc(cap, 1);
    size_t got;
    while ((got = fread(buf + n, 1, cap - n - 1, f)) > 0) {
        n += got;
        if (n + 1 == cap) {
            cap *= 2;
            buf = realloc(buf, cap);
            if (!buf) die("out of memory reading %s", path);
        }
    }
    if (ferror(f)) die("cannot read %s", path);
    fclose(f);
    buf[n] = '\0';
    if (size_out) *size_out = n;
    return buf;
}

/* An output file written whole or not at all: into PATH.tmp, renamed over PATH once complete.
 * On any write error the temporary is removed, PATH is left as it was, and dsv2 stops. A PATH
 * that exists and is not a regular file (/dev/stdout, /dev/full, a pipe, a symbolic link) is
 * written in place: renaming over it would replace the device or the link with a file. */
typedef struct { FILE *f; char tmp[4096]; const char *path; int in_place; } OutputFile;

static void output_open(OutputFile *o, const char *path) {
    struct stat st;
    o->path = path;
    o->in_place = lstat(path, &st) == 0 && !S_ISREG(st.st_mode);
    if (snprintf(o->tmp, sizeof o->tmp, "%s.tmp", path) >= (int)sizeof o->tmp)
        die("path too long: %s", path);
    o->f = fopen(o->in_place ? path : o->tmp, "wb");
    if (!o->f) die("cannot write %s: %s", o->in_place ? path : o->tmp, strerror(errno));
}

static void output_close(OutputFile *o) {
    int failed = ferror(o->f) != 0;
    if (fclose(o->f) != 0) failed = 1;
    if (failed || (!o->in_place && rename(o->tmp, o->path) != 0)) {
        int err = errno;
        if (!o->in_place) remove(o->tmp);
        die("cannot write %s: %s", o->path, strerror(err ? err : EIO));
    }
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void check_context(int n_tokens, int context) {
    if (n_tokens > context)
        die("%d tokens do not fit the context of %d (raise it with -c, up to "
            "max_position_embeddings)",
            n_tokens, context);
}

/* From Part 2: threads that survive a busy machine (ThreadTuner, how it works: there). */
typedef struct {
    int max, n, trial, steps, trial_steps, usual_steps, won, trials, quiet;
    double start, usual, fastest, trial_time;
} ThreadTuner;
static void tuner_init(ThreadTuner *t);
static void tuner_begin(ThreadTuner *t);
static void tuner_end(ThreadTuner *t);
static void tuner_done(ThreadTuner *t);

/* Feeds prompt[0..n) at positions *pos onwards, then samples up to max_new tokens, streaming each
 * (as text through the tokenizer, or as ids without one) and feeding it back. The last sampled
 * token is returned, not fed: chat feeds it with the next turn. stop_at_eos ends at EOS. */
static int generate(const Weights *w, RunState *s, Sampler *sp, const Tokenizer *tok,
                    TextSink *sink, const int *prompt, int n_prompt, int *pos, int max_new,
                    int stop_at_eos) {
    if (n_prompt < 1) die("the prompt is empty: give at least one token");
    check_context(*pos + n_prompt, s->context);
    double t0 = now_seconds();
    float *logits = forward_checked(w, s, prompt, n_prompt, *pos);  /* the prompt, batched */
    *pos += n_prompt;
    double t1 = now_seconds();
    int generated = 0, next = -1;
    ThreadTuner threads;
    tuner_init(&threads);
    while (generated < max_new) {
        if (generated > 0) {
            if (*pos >= s->context) {
                fprintf(stderr, "\n[context of %d positions is full]\n", s->context);
                break;
            }
            tuner_begin(&threads);
            logits = forward_checked(w, s, &next, 1, (*pos)++);  /* one token at a time */
            tuner_end(&threads);
        }
        next = sample(sp, logits);
        generated++;
        if (stop_at_eos && next == w->cfg.eos_token_id) break;
        if (tok) decode_token(tok, sink, next, 1);
        else printf("%s%d", generated > 1 ? " " : "", next);
        fflush(stdout);
    }
    if (tok) sink_flush(sink);
    else printf("\n");
    tuner_done(&threads);
    double t2 = now_seconds();
    fprintf(stderr, "\nprompt: %d tokens, %.1f tok/s | generation: %d tokens, %.1f tok/s\n",
            n_prompt, n_prompt / fmax(t1 - t0, 1e-9), generated,
            generated > 1 ? (generated - 1) / fmax(t2 - t1, 1e-9) : 0.0);
    return next;
}

/* Multi-turn chat on stdin/stdout. The first user message may come from -i. Each turn is rendered
 * with the model's template, encoded, and appended to the same KV cache. */
static void chat(const Weights *w, RunState *s, Sampler *sp, Tokenizer *tok, const char *system,
                 const char *first, int max_new) {
    TextSink *out = open_sink(stdout);
    char *line = NULL;
    size_t line_cap = 0;
    int pos = 0, pending[2], n_pending = 0, interactive = isatty(STDIN_FILENO);
    for (int turn = 0;; turn++) {
        const char *user = turn == 0 && first ? first : NULL;
        if (!user) {
            if (interactive) fprintf(stderr, "User: ");  /* piped input: no prompt in the way */
            ssize_t got = getline(&line, &line_cap, stdin);  /* a line of any length is one turn */
            if (got < 0) break;
            if (got > 0 && line[got - 1] == '\n') line[--got] = '\0';
            user = line;
        }
        char *text = render_chat_turn(tok, system, user, turn == 0);
        IdList ids = {0};
        for (int i = 0; i < n_pending; i++) ids_push(&ids, pending[i]);
        tokenizer_encode(tok, text, strlen(text), 0, &ids);
        check_context(pos + ids.n, s->context); /* before "Assistant:", so an error starts a line */
        printf("Assistant:");
        int last = generate(w, s, sp, tok, out, ids.ids, ids.n, &pos, max_new, 1);
        printf("\n");
        n_pending = 0;  /* the reply ends with EOS in the cache, as the template has it */
        if (last != w->cfg.eos_token_id && last >= 0) pending[n_pending++] = last;
        pending[n_pending++] = w->cfg.eos_token_id;
        free(ids.ids);
        free(text);
    }
    free(line);
    free(out);
}

/* -m logits: every position's logits, float32 little-endian, [T][V], from the decode path. */
static void write_logits(const Weights *w, RunState *s, const int *ids, int n,
                         const char *out_path) {
    OutputFile out;
    output_open(&out, out_path);
    size_t V = (size_t)w->cfg.vocab_size;
    ThreadTuner threads;
    tuner_init(&threads);
    for (int pos = 0; pos < n; pos++) {
        tuner_begin(&threads);
        fwrite(forward_checked(w, s, &ids[pos], 1, pos), sizeof(float), V, out.f);
        tuner_end(&threads);
    }
    tuner_done(&threads);
    output_close(&out);
}

/* -m layers: the prompt token by token, and after every layer what the tests check against the
 * official fixtures (hidden state, latent cache row, routing), so that two builds (./dsv2 and
 * ./dsv2cu) or two machines can be compared layer by layer: tests/compare_layers.py names the
 * first position, layer and quantity that differ. The file, little-endian:
 *
 *   "DSV2LAYR" | T L D W K (int32: tokens, layers, hidden_size, r + dr, experts per token)
 *   then for each token t < T, for each layer l < L, float32:
 *     +---------------+------------------------+------------------+-----------------+
 *     | hidden h [D]  | latent [c^KV; k^R] [W] | experts [K]      | gates g [K]     |
 *     +---------------+------------------------+------------------+-----------------+
 *   experts as floats, ascending; a dense layer has experts -1 and gates 0. */
static void write_layers(const Weights *w, RunState *s, const int *ids, int n,
                         const char *out_path) {
    const Config *c = &w->cfg;
    int L = c->num_hidden_layers, D = c->hidden_size, K = c->num_experts_per_tok;
    int W = c->kv_lora_rank + c->qk_rope_head_dim;
    if (s->attn_mode != ATTN_ABSORB || s->cache_dtype != DTYPE_F32)
        die("-m layers reads the f32 latent cache: use -a absorb and -k f32 (the defaults)");
    s->trace = trace_new(c, s->context);
    float *latent = floats((size_t)L * W), *row = floats((size_t)2 * K);
#ifdef DSV2_CUDA
    if (s->gpu) cuda_tap(s->gpu, s->trace->hidden, latent, s->trace->route_idx,
                         s->trace->route_weight);
#endif
    OutputFile out;
    output_open(&out, out_path);
    int32_t head[5] = {n, L, D, W, K};
    fwrite("DSV2LAYR", 1, 8, out.f);
    fwrite(head, sizeof head, 1, out.f);
    for (int pos = 0; pos < n; pos++) {
        forward_checked(w, s, &ids[pos], 1, pos);
        for (int l = 0; l < L; l++) {
            if (!s->gpu)  /* the CPU's cache row; the GPU's came with the tap */
                memcpy(latent + (size_t)l * W,
                       (const float *)cache_rows(s, l, pos + 1).data + (size_t)pos * W,
                       W * sizeof(float));
            int moe_layer = is_moe_layer(c, l);
            for (int k = 0; k < K; k++) {
                row[k] = moe_layer ? (float)s->trace->route_idx[(size_t)l * K + k] : -1.0f;
                row[K + k] = moe_layer ? s->trace->route_weight[(size_t)l * K + k] : 0.0f;
            }
            fwrite(s->trace->hidden + (size_t)l * D, sizeof(float), D, out.f);
            fwrite(latent + (size_t)l * W, sizeof(float), W, out.f);
            fwrite(row, sizeof(float), 2 * (size_t)K, out.f);
        }
    }
    output_close(&out);
#ifdef DSV2_CUDA
    if (s->gpu) cuda_tap(s->gpu, NULL, NULL, NULL, NULL);
#endif
    free(latent); free(row);
    trace_free(s->trace);
    s->trace = NULL;
}

/* Bytes in a human unit, into buf. */
static const char *human_bytes(double bytes, char *buf, size_t size) {
    const char *unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (bytes >= 1024 && u < 4) { bytes /= 1024; u++; }
    snprintf(buf, size, "%.1f %s", bytes, unit[u]);
    return buf;
}

static double mat_bytes(const Mat *m) {
    if (!m->data) return 0;
    double scales = m->scale ? (double)m->rows * (m->cols / m->group) * sizeof(float) : 0;
    return (double)dtype_bytes(m->dtype, (size_t)m->rows * m->cols) + scales;
}

/* Weight bytes one decoded token reads: attention, dense MLPs, the router, the shared experts,
 * K routed experts per MoE layer, and lm_head (one embedding row is noise). This over memory
 * bandwidth is the decode roofline. */
static double decode_bytes_per_token(const Weights *w) {
    const Config *c = &w->cfg;
    double bytes = mat_bytes(&w->lm_head);
    for (int l = 0; l < c->num_hidden_layers; l++) {
        const Layer *L = &w->layers[l];
        const Mat *m[] = {&L->q_proj, &L->q_a_proj, &L->q_b_proj, &L->kv_a_proj, &L->kv_b_proj,
                          &L->o_proj, &L->mlp_gate, &L->mlp_up, &L->mlp_down, &L->router};
        for (size_t i = 0; i < sizeof m / sizeof m[0]; i++) bytes += mat_bytes(m[i]);
        if (L->is_moe)
            bytes += c->num_experts_per_tok *
                    (mat_bytes(&L->expert_gate[0]) + mat_bytes(&L->expert_up[0]) +
                     mat_bytes(&L->expert_down[0]));
    }
    return bytes;
}

/* What the latent cache saves: printed at start. */
static void print_kv_cache_sizes(const Config *c, int context, int attn_mode) {
    double latent = (double)kv_cache_width(c, ATTN_ABSORB) * c->num_hidden_layers * sizeof(float);
    double mha = (double)kv_cache_width(c, ATTN_NAIVE) * c->num_hidden_layers * sizeof(float);
    char a[32], b[32], d[32], e[32], f[32];
    int max_pos = c->max_position_embeddings;
    fprintf(stderr, "KV cache (f32, all layers): MLA latent %s/token, %s for all %d positions; "
                    "a standard MHA cache would take %s/token, %s (%.1fx)\n",
            human_bytes(latent, a, 32), human_bytes(latent * max_pos, b, 32), max_pos,
            human_bytes(mha, d, 32), human_bytes(mha * max_pos, e, 32), mha / latent);
    fprintf(stderr, "attention: %s, context %d, cache %s\n",
            attn_mode == ATTN_ABSORB ? "absorb (latent cache)" : "naive (per-head K/V cache)",
            context, human_bytes((attn_mode == ATTN_ABSORB ? latent : mha) * context, f, 32));
}

/* ------------------------------------------------------------------------------------------ */
/* Watching the model: -m trace (what each layer does to each token) and -m eval (how well it  */
/* predicts a text, and how far it is from another model)                                     */
/* ------------------------------------------------------------------------------------------ */

/* From Part 2: a token as printable text, and the pictures (standalone SVG). */
static void token_text(const Tokenizer *t, int id, char *out, size_t size);
static void svg_routing_map(const char *path, const Config *c, const int *top1,
                            const float *weight, int n_tokens);
static void svg_expert_load(const char *path, const Config *c, const int *load, int n_tokens);
static void svg_attention(const char *path, const float *probs, int n, int layer, int head);
static void svg_kv_cache(const char *path, const Config *c);

/* KV cache bytes per token per layer (f32) for the three ways of caching (the paper's Table 1):
 * MLA absorbed keeps c^KV and k^R; MLA naive keeps every head's k and v; standard MHA with
 * head size dn keeps 2 H dn. */
static void kv_bytes_per_token(const Config *c, double bytes[3]) {
    bytes[0] = (double)kv_cache_width(c, ATTN_ABSORB) * sizeof(float);
    bytes[1] = (double)kv_cache_width(c, ATTN_NAIVE) * sizeof(float);
    bytes[2] = 2.0 * c->num_attention_heads * c->qk_nope_head_dim * sizeof(float);
}

/* The entropy (nats) of probs[0..n) and its 5 largest entries, largest first. */
static double attention_summary(const float *probs, int n, int top[5], float top_p[5]) {
    double entropy = 0;
    for (int k = 0; k < 5; k++) { top[k] = -1; top_p[k] = -1.0f; }
    for (int j = 0; j < n; j++) {
        if (probs[j] > 0) entropy -= probs[j] * log(probs[j]);
        for (int k = 0; k < 5; k++)
            if (probs[j] > top_p[k]) {  /* insert at k, shifting the rest down */
                memmove(top + k + 1, top + k, (4 - k) * sizeof(int));
                memmove(top_p + k + 1, top_p + k, (4 - k) * sizeof(float));
                top[k] = j;
                top_p[k] = probs[j];
                break;
            }
    }
    return entropy;
}

/* The gate values' order, largest first: rank[k] of choice k. */
static void rank_by_weight(const float *weight, int K, int *rank) {
    for (int k = 0; k < K; k++) {
        rank[k] = 0;
        for (int j = 0; j < K; j++)
            rank[k] += weight[j] > weight[k] || (weight[j] == weight[k] && j < k);
    }
}

static void trace_ffn(const Config *c, const Trace *tr, FILE *csv, const char *row,
                      const char *text, int l) {
    int K = c->num_experts_per_tok, G = c->n_group, rank[K];
    if (!is_moe_layer(c, l)) { printf("  layer %d  dense FFN\n", l); return; }
    const int *idx = tr->route_idx + (size_t)l * K;
    const float *g = tr->route_weight + (size_t)l * K;
    rank_by_weight(g, K, rank);
    printf("  layer %d  experts", l);
    for (int r = 0; r < K; r++)
        for (int k = 0; k < K; k++)
            if (rank[k] == r) printf(" %d (%.4f)", idx[k], g[k]);
    for (int k = 0; k < K && csv; k++)
        fprintf(csv, "%s,%d,expert,,%d,%d,%.8g,%s\n", row, l, rank[k], idx[k], g[k], text);
    if (c->topk_method == TOPK_GROUP_LIMITED_GREEDY) {
        printf("  groups kept");
        for (int i = 0; i < G; i++)
            if (tr->groups_kept[(size_t)l * G + i]) {
                printf(" %d", i);
                if (csv) fprintf(csv, "%s,%d,group,,,%d,1,%s\n", row, l, i, text);
            }
    }
    float shared = tr->shared_norm[l], routed = tr->routed_norm[l];
    float share = shared + routed > 0 ? shared / (shared + routed) : 0;
    if (c->n_shared_experts > 0)
        printf("  shared experts %.0f%% of the FFN output norm (%.3g vs routed %.3g)", 100 * share,
               shared, routed);
    printf("\n");
    if (csv)
        fprintf(csv, "%s,%d,shared_norm,,,,%.6g,%s\n%s,%d,routed_norm,,,,%.6g,%s\n"
                     "%s,%d,shared_share,,,,%.6g,%s\n",
                row, l, shared, text, row, l, routed, text, row, l, share, text);
}

static void trace_attention(const Config *c, const Trace *tr, FILE *csv, const char *row,
                            const char *text, int l, int pos) {
    int H = c->num_attention_heads, top[5];
    float top_p[5];
    const float *att = tr->attention + (size_t)l * H * tr->context;
    for (int h = 0; h < H; h++) {
        double entropy = attention_summary(att + (size_t)h * tr->context, pos + 1, top, top_p);
        printf("    head %d  entropy %.3f nats  top", h, entropy);
        for (int k = 0; k < 5 && top[k] >= 0; k++) {
            printf(" %d (%.3f)", top[k], top_p[k]);
            if (csv)
                fprintf(csv, "%s,%d,attention,%d,%d,%d,%.6g,%s\n", row, l, h, k, top[k], top_p[k],
                        text);
        }
        printf("\n");
        if (csv) fprintf(csv, "%s,%d,entropy,%d,,,%.6g,%s\n", row, l, h, entropy, text);
    }
}

/* One token's trace: human-readable to stdout, tidy rows to csv (NULL: none). Columns:
 * position,token,layer,kind,head,rank,index,value,text (last: it may hold commas); kinds: expert
 * (index = expert id, rank by gate value, value = g), group (a group kept, index = group),
 * shared_norm, routed_norm, shared_share, attention (head, rank, index = key position, value =
 * probability), entropy (head, value in nats), kv_absorbed / kv_naive / kv_mha (layer -1, value =
 * bytes). */
static void trace_token(const Config *c, const Trace *tr, FILE *csv, int pos, int id,
                        const char *text) {
    int L = c->num_hidden_layers;
    char row[700];
    char quoted[300];  /* the text last, so that the numeric columns never move */
    snprintf(row, sizeof row, "%d,%d", pos, id);
    snprintf(quoted, sizeof quoted, "\"%s\"", text);
    printf("position %d  token %d \"%s\"\n", pos, id, text);
    for (int l = 0; l < L; l++) {
        trace_ffn(c, tr, csv, row, quoted, l);
        trace_attention(c, tr, csv, row, quoted, l, pos);
    }
    double per_token[3];
    kv_bytes_per_token(c, per_token);
    static const char *const kind[3] = {"kv_absorbed", "kv_naive", "kv_mha"};
    char b[3][32];
    for (int i = 0; i < 3; i++) {
        double bytes = per_token[i] * L * (pos + 1);
        human_bytes(bytes, b[i], sizeof b[i]);
        if (csv) fprintf(csv, "%s,-1,%s,,,,%.0f,%s\n", row, kind[i], bytes, quoted);
    }
    printf("  KV cache after %d tokens: MLA absorbed %s, MLA naive %s, standard MHA %s\n", pos + 1,
           b[0], b[1], b[2]);
}

/* Tokens shown in the routing map and the attention heatmap (a lecture slide's worth). */
#define PICTURE_TOKENS 64

/* -m trace: the prompt one token at a time (a text longer than the context in windows of it),
 * each token's trace printed, with -o also a CSV and four SVGs beside it (OUT without .csv, then
 * .routing.svg, .load.svg, .attention.svg, .kv.svg). The heatmap shows layer/head -l L,H. */
static void run_trace(const Weights *w, RunState *s, const Tokenizer *tok, const IdList *ids,
                      const char *out_path, int heat_layer, int heat_head) {
    const Config *c = &w->cfg;
    int L = c->num_hidden_layers, E = c->n_routed_experts, K = c->num_experts_per_tok;
    if (heat_layer < 0) heat_layer = L - 1;
    if (heat_layer >= L || heat_head >= c->num_attention_heads)
        die("-l %d,%d: this model has layers 0..%d and heads 0..%d", heat_layer, heat_head, L - 1,
            c->num_attention_heads - 1);
    if (s->gpu) die("-m trace runs on the CPU (./dsv2)");
    s->trace = trace_new(c, s->context);
    int shown = ids->n < PICTURE_TOKENS ? ids->n : PICTURE_TOKENS;
    int *load = xcalloc((size_t)L * E, sizeof(int)),
        *top1 = xcalloc((size_t)shown * L, sizeof(int));
    float *top1_w = floats((size_t)shown * L), *heat = floats((size_t)shown * shown);
    OutputFile csv = {0};
    if (out_path) {
        output_open(&csv, out_path);
        fprintf(csv.f, "position,token,layer,kind,head,rank,index,value,text\n");
    }
    ThreadTuner threads;
    tuner_init(&threads);
    for (int i = 0; i < ids->n; i++) {
        int pos = i % s->context, id = ids->ids[i];
        tuner_begin(&threads);
        forward_checked(w, s, &id, 1, pos);
        tuner_end(&threads);
        char text[256];
        if (tok) token_text(tok, id, text, sizeof text);
        else snprintf(text, sizeof text, "%d", id);
        trace_token(c, s->trace, csv.f, pos, id, text);
        for (int l = 0; l < L; l++) {
            if (!is_moe_layer(c, l)) continue;
            const int *idx = s->trace->route_idx + (size_t)l * K;
            const float *g = s->trace->route_weight + (size_t)l * K;
            int best = 0;
            for (int k = 0; k < K; k++) {
                load[(size_t)l * E + idx[k]]++;
                if (g[k] > g[best]) best = k;
            }
            if (i < shown) { top1[i * L + l] = idx[best]; top1_w[i * L + l] = g[best]; }
        }
        if (i < shown) {
            const float *att = s->trace->attention +
                    ((size_t)heat_layer * c->num_attention_heads + heat_head) * s->context;
            memcpy(heat + (size_t)i * shown, att, (size_t)(pos + 1) * sizeof(float));
        }
    }
    tuner_done(&threads);
    if (out_path) {
        output_close(&csv);
        char base[4000], path[4096];
        size_t len = strlen(out_path);
        snprintf(base, sizeof base, "%.*s",
                 (int)(len > 4 && !strcmp(out_path + len - 4, ".csv") ? len - 4 : len), out_path);
        static const char *const kinds[] = {"routing", "load", "attention", "kv"};
        for (int k = 0; k < 4; k++) {
            snprintf(path, sizeof path, "%s.%s.svg", base, kinds[k]);
            if (k == 0) svg_routing_map(path, c, top1, top1_w, shown);
            if (k == 1) svg_expert_load(path, c, load, ids->n);
            if (k == 2) svg_attention(path, heat, shown, heat_layer, heat_head);
            if (k == 3) svg_kv_cache(path, c);
            fprintf(stderr, "wrote %s\n", path);
        }
        fprintf(stderr, "wrote %s\n", out_path);
    }
    free(load); free(top1); free(top1_w); free(heat);
    trace_free(s->trace);
    s->trace = NULL;
}

/* log softmax(logits)[i] for every i, in double (an eval sums thousands of these). */
static void log_probs(const float *logits, int V, double *out) {
    double max = logits[0], sum = 0;
    for (int i = 1; i < V; i++) max = fmax(max, logits[i]);
    for (int i = 0; i < V; i++) sum += exp(logits[i] - max);
    double log_sum = max + log(sum);
    for (int i = 0; i < V; i++) out[i] = logits[i] - log_sum;
}

/* Every position's logits [n][V] for n <= s->batch tokens at pos.. (-m eval): one batched pass
 * on the CPU, token by token on the GPU. A NaN or infinity is an error, as for forward_checked. */
static const float *forward_every(const Weights *w, RunState *s, const int *tokens, int n,
                                  int pos) {
    size_t V = (size_t)w->cfg.vocab_size;
    if (!s->all_logits) s->all_logits = floats((size_t)s->batch * V);
    if (s->gpu) {
        float *keep = s->all_logits;
        for (int t = 0; t < n; t++)
            memcpy(keep + t * V, forward_checked(w, s, &tokens[t], 1, pos + t), V * sizeof(float));
        return keep;
    }
    forward_batch(w, s, tokens, n, pos);
    for (size_t i = 0; i < (size_t)n * V; i++)
        if (!isfinite(s->all_logits[i]))
            die("the logits at position %d are not finite (%g at id %d): the weights or the config "
                "overflow", pos + (int)(i / V), s->all_logits[i], (int)(i % V));
    return s->all_logits;
}

/* What -m eval adds up over the scored tokens. */
typedef struct {
    double nll, ref_nll, kl_ref_this, kl_this_ref, kl_max, max_delta;
    int agree, n;
} EvalSums;

/* One scored token: this model's logits p and the reference's q (or NULL), the true next id. */
static void eval_token(EvalSums *e, const float *p, const float *q, int V, int next, double *lp,
                       double *lq) {
    log_probs(p, V, lp);
    e->nll -= lp[next];
    e->n++;
    if (!q) return;
    log_probs(q, V, lq);
    e->ref_nll -= lq[next];
    double rt = 0, tr = 0;
    for (int v = 0; v < V; v++) {
        rt += exp(lq[v]) * (lq[v] - lp[v]);  /* KL(reference || this) */
        tr += exp(lp[v]) * (lp[v] - lq[v]);  /* KL(this || reference) */
        e->max_delta = fmax(e->max_delta, fabs(p[v] - q[v]));
    }
    e->kl_ref_this += rt;
    e->kl_this_ref += tr;
    e->kl_max = fmax(e->kl_max, rt);
    e->agree += argmax(p, V) == argmax(q, V);
}

/* -m eval: the mean negative log-likelihood of each next token of the text and its perplexity;
 * with another model (-r), also the KL divergence between their next-token distributions, how
 * often their top-1 agree, and the largest logit difference. A text longer than the context
 * goes in windows of it, each starting afresh; within a window, in batches of s->batch. */
static void run_eval(const Weights *w, RunState *s, const Weights *ref, RunState *ref_state,
                     const IdList *ids) {
    int V = w->cfg.vocab_size, n = ids->n;
    if (n < 2) die("-m eval needs at least 2 tokens of text (it scores each next token)");
    if (ref && ref->cfg.vocab_size != V)
        die("the two models have different vocabularies (%d and %d ids)", V, ref->cfg.vocab_size);
    double *lp = xcalloc(V, sizeof(double)), *lq = xcalloc(V, sizeof(double));
    EvalSums e = {0};
    for (int i = 0; i + 1 < n;) {
        int pos = i % s->context, chunk = n - 1 - i;  /* the last token predicts nothing */
        chunk = chunk < s->batch ? chunk : s->batch;
        chunk = chunk < s->context - pos ? chunk : s->context - pos;  /* not past the window */
        const float *p = forward_every(w, s, &ids->ids[i], chunk, pos);
        const float *q = ref ? forward_every(ref, ref_state, &ids->ids[i], chunk, pos) : NULL;
        for (int t = 0; t < chunk; t++)
            eval_token(&e, p + (size_t)t * V, q ? q + (size_t)t * V : NULL, V, ids->ids[i + t + 1],
                       lp, lq);
        i += chunk;
    }
    printf("tokens scored: %d (of %d, windows of %d)\n", e.n, n, s->context);
    printf("mean NLL %.6f nats/token, perplexity %.6f\n", e.nll / e.n, exp(e.nll / e.n));
    if (ref) {
        printf("reference: mean NLL %.6f nats/token, perplexity %.6f\n", e.ref_nll / e.n,
               exp(e.ref_nll / e.n));
        printf("KL(reference || this) mean %.6g nats/token (max %.6g); KL(this || reference) mean "
               "%.6g\n",
               e.kl_ref_this / e.n, e.kl_max, e.kl_this_ref / e.n);
        printf("top-1 agreement %.2f%% (%d of %d); max |delta logit| %.6g\n", 100.0 * e.agree / e.n,
               e.agree, e.n, e.max_delta);
    }
    free(lp);
    free(lq);
}

/* ------------------------------------------------------------------------------------------ */
/* CLI: one function per mode                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* From Part 2: loading, the GPU upload, training. */
enum { WEIGHTS_AUTO = 0, WEIGHTS_MMAP = 1, WEIGHTS_LOAD = 2 };
static void load_weights(Weights *w, const char *path, int weights_mode);
static void free_weights(Weights *w);
static void print_layout(const Weights *w);
static int is_tokenizer_file(const char *path);
#ifdef DSV2_CUDA
static void *gpu_model_create(const Weights *w, RunState *s, const char *gpus);
#endif
typedef struct {
    int steps, batch, seq_len, eval_every, seed;
    float lr;
    const char *corpus, *out;
} TrainOptions;
static void train(const char *init_path, const TrainOptions *o);

enum {
    MODE_GENERATE,
    MODE_CHAT,
    MODE_LOGITS,
    MODE_ENCODE,
    MODE_DECODE,
    MODE_TRAIN,
    MODE_LAYOUT,
    MODE_TRACE,
    MODE_EVAL,
    MODE_LAYERS,
    N_MODES
};
static const char *const mode_names[N_MODES] = {"generate", "chat",   "logits", "encode", "decode",
                                                "train",    "layout", "trace",  "eval",   "layers"};

typedef struct {
    const char *path;                 /* the model, or a tokenizer for encode/decode */
    int mode, attn_mode, weights_mode, ref_attn_mode, cache_dtype;
    const char *prompt, *prompt_file, *out_path, *system, *gpus;
    const char *ref_path;             /* eval: the model to compare with (-r) */
    int steps, context, batch, eval_every, heat_layer, heat_head;
    float temperature, topp, lr;
    uint64_t seed;
} Options;

#ifndef DSV2_NO_MAIN
static void usage(void) {
    fprintf(stderr,
            "usage: ./dsv2 FILE [options]     FILE: a model (.bin) or, for encode/decode, a "
            "tokenizer (.tok)\n"
            "  -m MODE    generate (default) | chat | logits | encode | decode | train | layout\n"
            "             | trace | eval | layers\n"
            "  -i TEXT    the prompt (text, or whitespace-separated ids for a model without a "
            "tokenizer)\n"
            "  -f FILE    the prompt (or the text to encode, the ids to decode: default stdin) "
            "from FILE\n"
            "  -o FILE    logits: output file (float32 [T][vocab]; the prompt is text as for "
            "generate);\n"
            "             decode: output file (default "
            "stdout)\n"
            "  -y TEXT    chat: system prompt\n"
            "  -n N       tokens to generate (default 256)\n"
            "  -t T       temperature, 0 = greedy (default 1.0)\n"
            "  -p P       top-p (default 0.9)\n"
            "  -s SEED    random seed (default: time)\n"
            "  -a MODE    attention: absorb (default, latent cache) | naive (per-head K/V cache)\n"
            "  -k TYPE    KV cache numbers (absorb): f32 (default, exact) | bf16 | q8\n"
            "  -c N       context length (default min(max_position_embeddings, 4096))\n"
            "  -w MODE    weights: auto (default) | mmap (read in place) | load (into huge-page "
            "memory)\n"
            "  -g LIST    (the CUDA build, ./dsv2cu; also --gpus LIST) GPUs for the layers: 0, 0,1 "
            "or 0,0\n"
            "layout: every tensor of the file with its offset, bytes, shape and storage\n"
            "trace: per token and layer the experts and gate values, the groups kept, the shared\n"
            "  experts' share, each head's top-5 positions and entropy, the KV cache bytes;\n"
            "  -o trace.csv also writes trace.routing/load/attention/kv.svg\n"
            "  -l L,H     the layer and head of the attention heatmap (default: last layer, 0)\n"
            "layers: -o FILE, each token's state after every layer (hidden state, latent cache\n"
            "  row, experts, gates) for tests/compare_layers.py: where two builds first differ\n"
            "eval: mean NLL per token and perplexity of the text of -f/-i\n"
            "  -r OTHER   also KL divergence, top-1 agreement, max |delta logit| against OTHER\n"
            "  -A MODE    OTHER's attention form (default: that of -a)\n"
            "training (-m train, an f32 model with a tokenizer): -f corpus.txt -o out.bin -n steps "
            "(256)\n"
            "  -b N       sequences per batch (default 8); -c N: tokens per sequence (default "
            "128)\n"
            "  -r LR      peak learning rate (default 3e-3); -e N: validate, checkpoint every N "
            "(100)\n"
            "OMP_NUM_THREADS=N: at most N threads (default: every core; while decoding and "
            "training,\n  when steps turn erratic, as on a busy machine, dsv2 tries one fewer "
            "and keeps it when faster)\n");
    exit(1);
}

static long parse_int_arg(const char *flag, const char *v, long lo, long hi) {
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || *end || end == v || x < lo || x > hi)
        die("%s expects an integer in [%ld, %ld], got \"%s\"", flag, lo, hi, v);
    return x;
}

static float parse_float_arg(const char *flag, const char *v, float lo, float hi) {
    char *end;
    float x = strtof(v, &end);
    if (*end || end == v || !(x >= lo && x <= hi))
        die("%s expects a number in [%g, %g], got \"%s\"", flag, lo, hi, v);
    return x;
}

/* v must be one of names[0..n): returns its index. */
static int parse_choice(const char *flag, const char *v, const char *const *names, int n) {
    for (int i = 0; i < n; i++)
        if (!strcmp(v, names[i])) return i;
    char list[256] = "";  /* "a, b or c" */
    for (int i = 0; i < n; i++)
        snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s",
                 i == 0               ? ""
                         : i == n - 1 ? " or "
                                      : ", ",
                 names[i]);
    die("%s expects %s, got \"%s\"", flag, list, v);
}

static Options parse_options(int argc, char **argv) {
    static const char *const attn_names[] = {"absorb", "naive"},
                             *const weights_names[] = {"auto", "mmap", "load"},
                             *const cache_names[] = {"f32", "bf16", "q8"};  /* DTYPE_ order */
    Options o = {.path = argv[1],
                 .mode = MODE_GENERATE,
                 .attn_mode = ATTN_ABSORB,
                 .weights_mode = WEIGHTS_AUTO,
                 .steps = 256,
                 .batch = 8,
                 .eval_every = 100,
                 .temperature = 1.0f,
                 .topp = 0.9f,
                 .lr = 3e-3f,
                 .ref_attn_mode = -1,
                 .heat_layer = -1,
                 .seed = (uint64_t)time(NULL)};
    const char *r_value = NULL;  /* -r: train's learning rate or eval's reference model */
    for (int i = 2; i < argc; i += 2) {
        const char *flag = strcmp(argv[i], "--gpus") ? argv[i] : "-g"; /* as multi-GPU tools spell
                                                                          it */
        if (flag[0] != '-' || strlen(flag) != 2)
            die("unknown argument \"%s\" (run ./dsv2 for usage)", argv[i]);
        if (i + 1 >= argc) die("option %s needs a value", argv[i]);
        const char *v = argv[i + 1];
        switch (flag[1]) {
        case 'm': o.mode = parse_choice("-m", v, mode_names, N_MODES); break;
        case 'i': o.prompt = v; break;
        case 'f': o.prompt_file = v; break;
        case 'o': o.out_path = v; break;
        case 'y': o.system = v; break;
        case 'g': o.gpus = v; break;
        case 'n': o.steps = (int)parse_int_arg("-n", v, 0, 1 << 24); break;
        case 'b': o.batch = (int)parse_int_arg("-b", v, 1, 4096); break;
        case 'e': o.eval_every = (int)parse_int_arg("-e", v, 1, 1 << 24); break;
        case 'r': r_value = v; break;
        case 'A': o.ref_attn_mode = parse_choice("-A", v, attn_names, 2); break;
        case 'l':
            if (sscanf(v, "%d,%d", &o.heat_layer, &o.heat_head) != 2 || o.heat_layer < 0 ||
                o.heat_head < 0)
                die("-l expects LAYER,HEAD (two integers >= 0), got \"%s\"", v);
            break;
        case 't': o.temperature = parse_float_arg("-t", v, 0, 100); break;
        case 'p': o.topp = parse_float_arg("-p", v, 0, 1); break;
        case 's': o.seed = (uint64_t)parse_int_arg("-s", v, 0, 0x7fffffffL); break;
        case 'c': o.context = (int)parse_int_arg("-c", v, 1, 1 << 24); break;
        case 'w': o.weights_mode = parse_choice("-w", v, weights_names, 3); break;
        case 'a': o.attn_mode = parse_choice("-a", v, attn_names, 2); break;
        case 'k': o.cache_dtype = parse_choice("-k", v, cache_names, 3); break;
        default: die("unknown option %s (run ./dsv2 for usage)", argv[i]);
        }
    }
    if (o.prompt && o.prompt_file) die("give the prompt with -i or -f, not both");
    if (r_value && o.mode == MODE_TRAIN) o.lr = parse_float_arg("-r", r_value, 0, 1);
    else if (r_value && o.mode == MODE_EVAL) o.ref_path = r_value;
    else if (r_value) die("-r is for -m train (learning rate) or -m eval (a model to compare)");
    if (o.ref_attn_mode < 0) o.ref_attn_mode = o.attn_mode;
    return o;
}

/* The text of -i or -f (NULL when neither was given; encode and decode then read stdin). */
static char *read_input(const Options *o, size_t *len) {
    if (o->prompt_file) return read_file(o->prompt_file, len);
    if (!o->prompt && (o->mode == MODE_ENCODE || o->mode == MODE_DECODE))
        return read_file("/dev/stdin", len);
    if (!o->prompt) return NULL;
    *len = strlen(o->prompt);
    return strdup(o->prompt);
}

/* -m encode: the input's bytes exactly, no BOS, ids on one line. */
static void run_encode(Tokenizer *tok, const char *input, size_t len) {
    if (!input) die("-m encode needs the text with -f FILE or -i TEXT");
    IdList ids = {0};
    tokenizer_encode(tok, input, len, 0, &ids);
    for (int i = 0; i < ids.n; i++) printf("%s%d", i ? " " : "", ids.ids[i]);
    printf("\n");
    free(ids.ids);
}

/* -m decode: ids to text, to stdout or -o. */
static void run_decode(Tokenizer *tok, const char *input, const char *out_path) {
    if (!input) die("-m decode needs the ids with -f FILE or -i IDS");
    int n = 0, *ids = parse_ids(input, 1 << 30, &n);
    FILE *f = out_path ? fopen(out_path, "wb") : stdout;
    if (!f) die("cannot open %s for writing: %s", out_path, strerror(errno));
    TextSink *sink = open_sink(f);
    for (int i = 0; i < n; i++) decode_token(tok, sink, ids[i], 0);
    sink_flush(sink);
    if (out_path && fclose(f) != 0) die("cannot write %s", out_path);
    free(sink);
    free(ids);
}

/* The prompt's ids: text through the tokenizer (not for logits), else ids, else just BOS. */
static IdList prompt_ids(const Config *c, Tokenizer *tok, int text_prompt, const char *input,
                         size_t len) {
    IdList ids = {0};
    if (text_prompt)
        tokenizer_encode(tok, input ? input : "", input ? len : 0, tokenizer_adds_bos(tok), &ids);
    else if (input) ids.ids = parse_ids(input, c->vocab_size, &ids.n);
    else if (c->bos_token_id >= 0) ids_push(&ids, c->bos_token_id);
    return ids;
}

/* -m eval, with the -r model loaded beside this one when given. */
static void run_eval_against(const Options *o, const Weights *w, RunState *s, const IdList *ids,
                             int context) {
    if (!o->ref_path) { run_eval(w, s, NULL, NULL, ids); return; }
    Weights ref;
    RunState ref_state;
    memset(&ref, 0, sizeof ref);
    load_weights(&ref, o->ref_path, o->weights_mode);
    if (context > ref.cfg.max_position_embeddings)
        die("-c %d exceeds %s's max_position_embeddings %d", context, o->ref_path,
            ref.cfg.max_position_embeddings);
    init_run_state(&ref_state, &ref.cfg, o->ref_attn_mode, context);
    run_eval(w, s, &ref, &ref_state, ids);
    free_run_state(&ref_state);
    free_weights(&ref);
}

/* generate, chat, logits, trace, eval: the model on a prompt. */
static void run_model(const Options *o, const Weights *w, Tokenizer *tok, const char *input,
                      size_t len) {
    const Config *c = &w->cfg;
    int context = o->context                    ? o->context
            : c->max_position_embeddings < 4096 ? c->max_position_embeddings
                                                : 4096;
    if (context > c->max_position_embeddings)
        die("-c %d exceeds max_position_embeddings %d", context, c->max_position_embeddings);
    if ((o->mode == MODE_LOGITS || o->mode == MODE_LAYERS) && !o->out_path)
        die("-m %s needs -o FILE", mode_names[o->mode]);
    if (o->mode == MODE_CHAT && c->eos_token_id < 0)
        die("chat needs an eos_token_id in the model config");
    if (o->mode == MODE_CHAT && !tokenizer_can_chat(tok))
        die("%s has no chat template: chat needs a DeepSeek-V2 or V3 chat tokenizer "
            "(tokenizer_config.json "
            "with its chat_template), such as the chat models' or models/tiny/model.bin",
            o->path);
    int text_prompt = tok && o->mode != MODE_CHAT;  /* with a tokenizer, prompts are text */
    IdList ids = {0};
    if (o->mode != MODE_CHAT) {
        ids = prompt_ids(c, tok, text_prompt, input, len);
        if (ids.n < 1) die("no tokens to run: the prompt is empty");
        if (o->mode != MODE_TRACE && o->mode != MODE_EVAL) check_context(ids.n, context);
    }
    RunState s;
    init_run_state(&s, c, o->attn_mode, context);
    set_cache_dtype(&s, o->cache_dtype);
#ifdef DSV2_CUDA
    if (o->cache_dtype != DTYPE_F32) die("-k bf16 and -k q8 are for the CPU build");
    if (c->dtype == DTYPE_Q4) die("q4 weights are for the CPU build: use q8 or bf16 with ./dsv2cu");
    if (o->attn_mode != ATTN_ABSORB && o->mode != MODE_TRACE)
        die("-a naive is for the CPU build (./dsv2): the GPU runs absorbed MLA only");
    if (o->mode != MODE_TRACE) s.gpu = gpu_model_create(w, &s, o->gpus ? o->gpus : "0");
#else
    if (o->gpus) die("-g needs the CUDA build (make cuda, then ./dsv2cu)");
#endif
    print_kv_cache_sizes(c, context, o->attn_mode);
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    fprintf(stderr, "weights: %s, %.3f GB read per decoded token, %d threads\n",
            storage_name(c->dtype),
            decode_bytes_per_token(w) / 1e9, threads);
    Sampler sp = {c->vocab_size, o->temperature, o->topp, o->seed * 0x9E3779B97F4A7C15ull + 1,
                  xcalloc(c->vocab_size, sizeof(ProbIndex))};
    if (o->mode == MODE_LOGITS) write_logits(w, &s, ids.ids, ids.n, o->out_path);
    else if (o->mode == MODE_LAYERS) write_layers(w, &s, ids.ids, ids.n, o->out_path);
    else if (o->mode == MODE_TRACE)
        run_trace(w, &s, text_prompt ? tok : NULL, &ids, o->out_path, o->heat_layer, o->heat_head);
    else if (o->mode == MODE_EVAL) run_eval_against(o, w, &s, &ids, context);
    else if (o->mode == MODE_CHAT) chat(w, &s, &sp, tok, o->system, input, o->steps);
    else {  /* with a tokenizer, generation is text and stops at EOS; without, ids in and out */
        int pos = 0;
        TextSink *sink = open_sink(stdout);
        if (text_prompt && input) { fwrite(input, 1, len, stdout); fflush(stdout); }
        generate(w, &s, &sp, text_prompt ? tok : NULL, sink, ids.ids, ids.n, &pos, o->steps,
                 text_prompt);
        if (text_prompt) printf("\n");
        free(sink);
    }
#ifdef DSV2_CUDA
    cuda_destroy(s.gpu);
#endif
    free(sp.candidates);
    free_run_state(&s);
    free(ids.ids);
}

int main(int argc, char **argv) {
    if (argc < 2 || argv[1][0] == '-') usage();
    Options o = parse_options(argc, argv);
    if (o.mode == MODE_TRAIN) {
        if (!o.prompt_file || !o.out_path) die("-m train needs -f CORPUS and -o OUT");
        if (is_tokenizer_file(o.path)) die("%s is a tokenizer, not a model", o.path);
        TrainOptions t = {o.steps,       o.batch,     o.context ? o.context : 128,
                          o.eval_every,  (int)o.seed, o.lr,
                          o.prompt_file, o.out_path};
        train(o.path, &t);
        return 0;
    }
    size_t len = 0;
    char *input = read_input(&o, &len);
    Weights w;
    memset(&w, 0, sizeof w);
    int tokenizer_only = is_tokenizer_file(o.path);
    if (tokenizer_only && o.mode != MODE_ENCODE && o.mode != MODE_DECODE)
        die("%s is a tokenizer, not a model: only -m encode and -m decode work on it", o.path);
    if (!tokenizer_only) load_weights(&w, o.path, o.weights_mode);
    Tokenizer *tok = open_tokenizer(o.path, tokenizer_only ? NULL : &w);
    int needs_tokenizer = o.mode == MODE_ENCODE || o.mode == MODE_DECODE || o.mode == MODE_CHAT;
    if (needs_tokenizer && !tok)
        die("%s has no tokenizer (export the model from a folder with tokenizer.json)", o.path);
    if (o.mode == MODE_ENCODE) run_encode(tok, input, len);
    else if (o.mode == MODE_DECODE) run_decode(tok, input, o.out_path);
    else if (o.mode == MODE_LAYOUT) print_layout(&w);
    else run_model(&o, &w, tok, input, len);
    free(input);
    if (tok) close_tokenizer(tok);
    if (!tokenizer_only) free_weights(&w);
    if (fflush(stdout) != 0 || ferror(stdout)) die("cannot write the output: %s", strerror(errno));
    return 0;
}
#endif

/* ========================================================================================== */
/* PART 2: THE MACHINERY                                                                      */
/* ========================================================================================== */

/* ------------------------------------------------------------------------------------------ */
/* Fast kernels: the matmul interface of Part 1 made fast. q8 weights meet int8 activations   */
/* (one scale per group); each thread reads four far-apart weight rows at a time; SIMD         */
/* intrinsics live in marked per-ISA functions with the portable C kernel beside them, and     */
/* the tests run both.                                                                         */
/* ------------------------------------------------------------------------------------------ */

/* bf16 is the top half of an IEEE float32: widening is a shift. */
static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* f rounded to the nearest bf16 (even on ties), kept as a float: f32_to_bf16 and back, in a
 * form compilers turn into vectors. */
static inline float bf16_rounded(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u = (u & 0x7fffffffu) > 0x7f800000u ? u | 0x400000u : u + 0x7fffu + ((u >> 16) & 1);
    u &= 0xffff0000u;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* float32 to bf16, rounding to nearest even (as torch and export.py do); NaN stays NaN. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

/* Activations for q8 weights: int8 per token, one scale per group (absmax / 127), so the
 * products are int8 x int8 with int32 sums. */
static void quantize_activations(int8_t *q, float *scale, const float *x, int n, int group) {
    for (int g = 0; g < n / group; g++) {
        const float *xg = x + (size_t)g * group;
        float amax = 0.0f;
#pragma omp simd reduction(max : amax)
        for (int i = 0; i < group; i++) {
            float a = fabsf(xg[i]);
            amax = a > amax ? a : amax;
        }
        float poison = 0.0f;  /* NaN iff the group holds a NaN or an infinity (x * 0) */
#pragma omp simd reduction(+ : poison)
        for (int i = 0; i < group; i++) poison += xg[i] * 0.0f;
        if (poison != 0.0f) {  /* NaN or inf in: NaN out, so that it reaches the logits */
            scale[g] = NAN;
            memset(q + (size_t)g * group, 0, group);
            continue;
        }
        float inv = amax > 0 ? 127.0f / amax : 0.0f;
        scale[g] = amax / 127.0f;
        if (isinf(inv)) {  /* a subnormal amax: 127 / amax overflows, x / amax does not */
            for (int i = 0; i < group; i++)
                q[(size_t)g * group + i] = (int8_t)(int)rintf(xg[i] / amax * 127.0f);
            continue;
        }
#pragma omp simd
        for (int i = 0; i < group; i++)
            q[(size_t)g * group + i] = (int8_t)(int)rintf(xg[i] * inv); /* ties to even */
    }
}

/* sum[g]: the sum of group g's int8 values (q: n of them), which the SIMD kernels that read
 * weights as unsigned take back off (bias_sums_avx2). */
static void group_sums(int32_t *sum, const int8_t *q, int n, int group) {
    for (int g = 0; g < n / group; g++) {
        int32_t total = 0;
#pragma omp simd reduction(+ : total)
        for (int i = 0; i < group; i++) total += q[(size_t)g * group + i];
        sum[g] = total;
    }
}

/* q4 weights (export.py's quantize_q4, llama.cpp Q4_0's rule): a group of G weights is G/2
 * bytes, byte j holding weight j in its low nibble and weight j + G/2 in its high one, each as
 * q + 8 with q in [-8, 7]; one float32 scale per group, as for q8.
 *
 *   group of G = 32:  byte  0   1  ...  15
 *                     low   w0  w1 ...  w15
 *                     high  w16 w17 ... w31
 *
 * Weight i of a row-major matrix (i: its element index), as the integer q. */
static inline int q4_at(const void *data, size_t i, int group) {
    size_t in_group = i % group, half = group / 2;
    uint8_t b = ((const uint8_t *)data)[(i - in_group) / 2 + in_group % half];
    return (in_group < half ? b & 15 : b >> 4) - 8;
}

/* n q4 weights (whole groups) as int8: q4 products then run on the q8 kernels. Groups of 32
 * (the real models) take a loop of constant length, which the compiler vectorizes: a scalar
 * loop here made q4 decoding 6x slower than q8. */
static inline void unpack_q4_group(int8_t *restrict out, const uint8_t *restrict in, int half) {
    uint8_t low[half], high[half];  /* unsigned bytes first: one vector op each */
#pragma omp simd
    for (int j = 0; j < half; j++) {
        low[j] = in[j] & 15;
        high[j] = in[j] >> 4;
    }
#pragma omp simd
    for (int j = 0; j < half; j++) {
        out[j] = (int8_t)(low[j] - 8);
        out[j + half] = (int8_t)(high[j] - 8);
    }
}

static void unpack_q4(int8_t *out, const uint8_t *in, int n, int group) {
    if (group == 32)
        for (int g = 0; g < n; g += 32, in += 16, out += 32) unpack_q4_group(out, in, 16);
    else
        for (int g = 0; g < n; g += group, in += group / 2, out += group)
            unpack_q4_group(out, in, group / 2);
}

/* q8 x q8, four rows: an int32 sum per group (int8 products; the compiler vectorizes it), then
 * the group's two scales. dot4x4_q8_group32_vnni below does the same with AVX-512 VNNI. */
static inline void dot4_q8_portable(const Mat *W, const size_t row[4], const int8_t *xq,
                                    const float *xs, int group, float out[4]) {
    int groups = W->cols / group;
    const int8_t *w0 = (const int8_t *)W->data + row[0], *w1 = (const int8_t *)W->data + row[1];
    const int8_t *w2 = (const int8_t *)W->data + row[2], *w3 = (const int8_t *)W->data + row[3];
    const float *s0 = W->scale + row[0] / group, *s1 = W->scale + row[1] / group;
    const float *s2 = W->scale + row[2] / group, *s3 = W->scale + row[3] / group;
    float a = 0, b = 0, c = 0, d = 0;
    for (int g = 0; g < groups; g++) {
        const int8_t *xg = xq + (size_t)g * group;
        size_t o = (size_t)g * group;
        int32_t ia = 0, ib = 0, ic = 0, id = 0;
#pragma omp simd reduction(+ : ia, ib, ic, id)
        for (int i = 0; i < group; i++) {
            ia += w0[o + i] * xg[i]; ib += w1[o + i] * xg[i];
            ic += w2[o + i] * xg[i]; id += w3[o + i] * xg[i];
        }
        a += ia * (s0[g] * xs[g]);
        b += ib * (s1[g] * xs[g]);
        c += ic * (s2[g] * xs[g]);
        d += id * (s3[g] * xs[g]);
    }
    out[0] = a; out[1] = b; out[2] = c; out[3] = d;
}

/* Intrinsics, in one place: the int8 dot product with AVX-512 VNNI (vpdpbusd: 64 int8 products
 * summed into 16 int32 in one instruction), four weight rows by four tokens per call so each
 * weight load serves every token of a prefill batch. vpdpbusd multiplies unsigned by signed
 * bytes, so the weights are read as w + 128 (one xor) and each token's 128 * sum(x) comes off
 * again: it starts the int32 sum, so every (row, token) pair costs one vpdpbusd. The tests run
 * both this and dot4_q8_portable above (MatmulScratch.kernel chooses). */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) || defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

/* The SIMD kernels ask for each weight row's bytes this far ahead of their reads, a 64-byte line
 * at a time: the hardware prefetcher alone left a decoding thread at 17 of its 36 GB/s on Zen 5
 * (q4 decode 47 -> 57 tok/s, q8 37 -> 40, 8-layer V2-Lite; 1024-2048 bytes measured best). */
enum { PREFETCH_AHEAD = 2048 };
/* A kernel shared by its wrappers, each with constant arguments (one token; q4 or q8), is copied
 * into each: as a plain call GCC left one generic copy once the file grew, and q4 decoding on
 * AVX-512 VNNI fell from 49 to 30 tok/s. */
#if defined(__GNUC__)
#define KERNEL_INLINE static inline __attribute__((always_inline))
#else
#define KERNEL_INLINE static inline
#endif
/* A loaded vector kept in a register: the compiler otherwise folds the load into each FMA that
 * uses it (4 loads where 1 does), and FMAs with a memory operand ran at half speed on Zen 5
 * (4x4 f32 kernel: 90 -> 175 GFLOP/s on one core). An empty asm: no instruction is emitted. */
#if defined(__GNUC__)
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define IN_REGISTER(v) (void)0
#endif

static inline void prefetch_ahead(const void *row, size_t bytes_done) {
    if (bytes_done % 64 == 0) __builtin_prefetch((const char *)row + bytes_done + PREFETCH_AHEAD);
}

/* The SIMD kernels' last groups, g0 on (fewer than a step), in plain C: a q8 or q4 row (row:
 * its first element) against a token, added to sum. */
static inline float last_groups(float sum, const Mat *W, size_t row, int g0, const int8_t *x,
                                const float *xs) {
    for (int h = g0; h < W->cols / 32; h++) {
        int32_t dot = 0;
        for (int i = 0; i < 32; i++) {
            size_t at = row + (size_t)h * 32 + i;
            dot += (W->dtype == DTYPE_Q4 ? q4_at(W->data, at, 32) : ((const int8_t *)W->data)[at]) *
                   x[h * 32 + i];
        }
        sum += dot * W->scale[row / 32 + h] * xs[h];
    }
    return sum;
}
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* Groups g and g + 1 of a row as 64 unsigned bytes: q8, w + 128 (one xor), in the token's
 * order; q4, the stored nibbles q + 8 as they are (byte j of a group's 16 holds weight j in its
 * low nibble, weight j + 16 in its high one): the 32 bytes twice, the upper copy shifted right
 * by 4, so the 16-byte lanes hold [g low, g+1 low, g high, g+1 high] (the token is permuted to
 * match, vnni_token). */
static inline __m512i vnni_weights(const int8_t *w, int g, int q4) {
    if (!q4) return _mm512_xor_si512(_mm512_loadu_si512((const void *)(w + g * 32)),
                                     _mm512_set1_epi8((char)0x80));
    __m512i twice = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(w + g * 16)));
    __m512i shifted = _mm512_srlv_epi64(twice, _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0));
    return _mm512_and_si512(shifted, _mm512_set1_epi8(15));
}

/* Groups g and g + 1 of a token's int8 values, in the order vnni_weights gives the weights. */
static inline __m512i vnni_token(const int8_t *x, int g, int q4) {
    __m512i xv = _mm512_loadu_si512((const void *)(x + g * 32));
    return q4 ? _mm512_shuffle_i64x2(xv, xv, _MM_SHUFFLE(3, 1, 2, 0)) : xv;
}

KERNEL_INLINE void dot4x4_group32_vnni(const Mat *W, const size_t row[4],
                                       const int8_t *const xq[4], const float *const xs[4],
                                       int nt, float out[4][4], int q4) {
    int groups = W->cols / 32, g = 0;
    const int8_t *w[4];
    const float *ws[4];
    __m512 acc[4][4];
    __m512i pair[4];
    const __m512i bias = _mm512_set1_epi8(q4 ? 8 : (char)0x80);  /* what the weights carry */
    for (int k = 0; k < 4; k++) {
        w[k] = (const int8_t *)W->data + (q4 ? row[k] / 2 : row[k]);
        ws[k] = W->scale + row[k] / 32;
        int a = 2 * k, b = 2 * k + 1;  /* the int32 lanes of group g, then of g + 1 */
        pair[k] = q4 ? _mm512_setr_epi32(a, a, a, a, b, b, b, b, a, a, a, a, b, b, b, b)
                     : _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b);
        for (int t = 0; t < 4; t++) acc[k][t] = _mm512_setzero_ps();
    }
    for (; g + 2 <= groups; g += 2) { /* 64 weights = two groups per step (pair: their lanes) */
        __m512i w_unsigned[4];
        for (int k = 0; k < 4; k++) {
            w_unsigned[k] = vnni_weights(w[k], g, q4);
            prefetch_ahead(w[k], (size_t)g * (q4 ? 16 : 32));
            prefetch_ahead(ws[k], (size_t)g * sizeof(float));
        }
        __m256 w_scale = _mm256_setr_ps(ws[0][g], ws[0][g + 1], ws[1][g], ws[1][g + 1], ws[2][g],
                                        ws[2][g + 1], ws[3][g], ws[3][g + 1]);
        for (int t = 0; t < nt; t++) {
            __m512i xv = vnni_token(xq[t], g, q4);
            __m512i minus_bias_x = _mm512_sub_epi32(
                    _mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, xv));
            double xs_pair;
            memcpy(&xs_pair, xs[t] + g, sizeof xs_pair);
            __m512 sc = _mm512_castps256_ps512(
                    _mm256_mul_ps(w_scale, _mm256_castpd_ps(_mm256_set1_pd(xs_pair))));
            for (int k = 0; k < 4; k++) {
                __m512i dot = _mm512_dpbusd_epi32(minus_bias_x, w_unsigned[k], xv);
                acc[k][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                            _mm512_permutexvar_ps(pair[k], sc), acc[k][t]);
            }
        }
    }
    for (int k = 0; k < 4; k++)
        for (int t = 0; t < nt; t++) {
            /* an odd last group */
            out[t][k] = last_groups(_mm512_reduce_add_ps(acc[k][t]), W, row[k], g, xq[t], xs[t]);
        }
}

/* One token (decoding) as its own copy: 4 sums in registers, not 16 that spill to the stack. */
static void dot4x4_q8_group32_vnni(const Mat *W, const size_t row[4], const int8_t *const xq[4],
                                   const float *const xs[4], const int32_t *const xsum[4], int nt,
                                   float out[4][4]) {
    (void)xsum;  /* the token's 128 x sums go in with the products (see above) */
    if (nt == 1) dot4x4_group32_vnni(W, row, xq, xs, 1, out, 0);
    else dot4x4_group32_vnni(W, row, xq, xs, nt, out, 0);
}

/* q4 straight from its nibbles (no unpacking into int8 first, as the other CPUs' path does). */
static void dot4x4_q4_group32_vnni(const Mat *W, const size_t row[4], const int8_t *const xq[4],
                                   const float *const xs[4], const int32_t *const xsum[4], int nt,
                                   float out[4][4]) {
    (void)xsum;
    if (nt == 1) dot4x4_group32_vnni(W, row, xq, xs, 1, out, 1);
    else dot4x4_group32_vnni(W, row, xq, xs, nt, out, 1);
}
#endif

/* Intrinsics, AVX2 + FMA (most x86 laptops and desktops): the same four rows by up to four
 * tokens. There is no int8 x int8 instruction, so as llama.cpp does for q8: |w| (unsigned)
 * times x with w's sign (vpsignb), pairs summed into int16 (vpmaddubsw: at most 2 x 128 x 127,
 * no saturation), then into int32 (vpmaddwd by ones). q4 is read from its nibbles: q + 8 is
 * already unsigned (at most 2 x 15 x 128 a pair), and 8 x sum(x) comes off (bias_sums_avx2). Eight
 * groups' int32 sums become one vector (lane i: group i, four_sums_avx2), scaled by the eight
 * groups' scales at once, each row's sums in one register (16 sums and a scale per group and
 * (row, token) had spilled). Zen 5 built for AVX2, 24 matrices 1408 x 2048, 2 threads: one
 * token q8 2.9-3.8 -> 1.5-2.0 ms, q4 (unpacked before) 3.8-5.0 -> 1.0-1.6 ms; 48 tokens the
 * same 52-56 ms. */
#if defined(__AVX2__) && defined(__FMA__)
static inline float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

/* The 32 bytes of group g (q8 weights or int8 tokens). */
static inline __m256i group_avx2(const int8_t *x, int g) {
    return _mm256_loadu_si256((const __m256i *)(x + (size_t)g * 32));
}

/* Group g of a row (32 weights) times the token's group: 8 int32 lanes summing to their dot
 * (less the bias, with vnni or q4: see eight_groups_avx2). */
static inline __m256i group_dot_avx2(const int8_t *w, int g, int q4, const int8_t *x, int vnni) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i xv = group_avx2(x, g);
#if defined(__AVXVNNI__)  /* u8 x s8, four products into each int32 lane */
    if (vnni && !q4)
        return _mm256_dpbusd_avx_epi32(
                _mm256_setzero_si256(),
                _mm256_xor_si256(group_avx2(w, g), _mm256_set1_epi8((char)0x80)), xv);
#endif
    if (!q4) {
        __m256i wv = group_avx2(w, g);
        __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
        return _mm256_madd_epi16(pairs, ones);  /* |w| above: -128 stays 0x80, 128 unsigned */
    }
    __m128i bytes = _mm_loadu_si128((const __m128i *)(w + (size_t)g * 16));
    __m256i shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);  /* the upper copy by 4 */
    __m256i u = _mm256_and_si256(_mm256_srlv_epi32(_mm256_broadcastsi128_si256(bytes), shift),
                                 _mm256_set1_epi8(15));  /* weights 0-15 low, 16-31 high */
#if defined(__AVXVNNI__)
    if (vnni) return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, xv);
#endif
    (void)vnni;
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, xv), ones);  /* 8 x sum(x) still in */
}

/* Four vectors' int32 lanes summed within each 128-bit half: [d0's lanes 0-3, d1's, d2's, d3's
 * | the same of lanes 4-7], by unpacks and adds. vphaddd twice does the same, but Zen 5 issues
 * one about every 2.3 cycles, against several unpacks a cycle (a probe, 8 independent chains:
 * 4.9 ns per 8 vphaddd, 0.6-0.9 per 8 vpunpckldq or vpaddd). */
static inline __m256i four_sums_avx2(__m256i d0, __m256i d1, __m256i d2, __m256i d3) {
    __m256i t0 = _mm256_add_epi32(_mm256_unpacklo_epi32(d0, d1), _mm256_unpackhi_epi32(d0, d1));
    __m256i t1 = _mm256_add_epi32(_mm256_unpacklo_epi32(d2, d3), _mm256_unpackhi_epi32(d2, d3));
    /* t0: [d0 0+2, d1 0+2, d0 1+3, d1 1+3 | lanes 4-7 alike], t1 the same of d2, d3 */
    return _mm256_add_epi32(_mm256_unpacklo_epi64(t0, t1), _mm256_unpackhi_epi64(t0, t1));
}

/* d[i]: group i's 8 lanes; lane i of the result: their sum. */
static inline __m256i group_sums8_avx2(const __m256i d[8]) {
    __m256i a = four_sums_avx2(d[0], d[1], d[2], d[3]);
    __m256i b = four_sums_avx2(d[4], d[5], d[6], d[7]);
    /* a: groups 0-3's lanes 0-3 summed, then their lanes 4-7; b: the same for groups 4-7 */
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20),
                            _mm256_permute2x128_si256(a, b, 0x31));
}

/* The bias times the sums of a token's groups g..g + n - 1 (lane i: group g + i; sum: the
 * token's group sums, from prepare_inputs): what unsigned weights add, q4's q + 8 (shift 3: 8)
 * or q8's w + 128 with vnni (shift 7: 128). Summed once per token, not per call (q4 decode
 * recomputed them for every four rows: 8-layer V2-Lite, Zen 5 built for AVX2, 61.3 -> 66.9
 * tok/s, medians of 7 alternations). */
static inline __m256i bias_sums_avx2(const int32_t *sum, int g, int n, int shift) {
    int32_t part[8] = {0};
    if (n < 8) memcpy(part, sum + g, (size_t)n * sizeof *part);
    __m256i sums = _mm256_loadu_si256((const __m256i *)(n < 8 ? part : sum + g));
    return _mm256_slli_epi32(sums, shift);
}

/* Groups g..g + n - 1 (n <= 8) of one row against a token, less bias (bias_sums_avx2 where the
 * weights were unsigned, else 0), scaled and added to acc. */
static inline __m256 eight_groups_avx2(__m256 acc, const int8_t *w, const float *ws, int g, int n,
                                       int q4, const int8_t *x, const float *xs, __m256i bias,
                                       int vnni) {
    __m256i d[8];
    for (int i = 0; i < 8; i++)
        d[i] = i < n ? group_dot_avx2(w, g + i, q4, x, vnni) : _mm256_setzero_si256();
    __m256 scale;
    if (n == 8) scale = _mm256_mul_ps(_mm256_loadu_ps(ws + g), _mm256_loadu_ps(xs + g));
    else {
        float part[8] = {0};
        for (int i = 0; i < n; i++) part[i] = ws[g + i] * xs[g + i];
        scale = _mm256_loadu_ps(part);
    }
    __m256i dots = _mm256_sub_epi32(group_sums8_avx2(d), bias);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), scale, acc);
}

KERNEL_INLINE void dot4x4_group32_avx2(const Mat *W, const size_t row[4],
                                       const int8_t *const xq[4], const float *const xs[4],
                                       const int32_t *const xsum[4], int nt, float out[4][4],
                                       int q4, int vnni) {
    int groups = W->cols / 32, group_bytes = q4 ? 16 : 32, g;
    const int8_t *w[4];
    const float *ws[4];
    for (int k = 0; k < 4; k++) {
        w[k] = (const int8_t *)W->data + (q4 ? row[k] / 2 : row[k]);
        ws[k] = W->scale + row[k] / 32;
    }
    for (int t = 0; t < nt; t++) {  /* the rows come from L1 for the second token on */
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (g = 0; g + 8 <= groups; g += 8) {  /* four rows in turn: four streams in flight */
            for (int b = 0; t == 0 && b < 8 * group_bytes; b += 64)
                for (int k = 0; k < 4; k++) prefetch_ahead(w[k], (size_t)g * group_bytes + b);
            for (int k = 0; t == 0 && k < 4; k++) prefetch_ahead(ws[k], (size_t)g * sizeof(float));
            __m256i bias = q4 || vnni ? bias_sums_avx2(xsum[t], g, 8, q4 ? 3 : 7)
                                      : _mm256_setzero_si256();
            a0 = eight_groups_avx2(a0, w[0], ws[0], g, 8, q4, xq[t], xs[t], bias, vnni);
            a1 = eight_groups_avx2(a1, w[1], ws[1], g, 8, q4, xq[t], xs[t], bias, vnni);
            a2 = eight_groups_avx2(a2, w[2], ws[2], g, 8, q4, xq[t], xs[t], bias, vnni);
            a3 = eight_groups_avx2(a3, w[3], ws[3], g, 8, q4, xq[t], xs[t], bias, vnni);
        }
        if (g < groups) {  /* the last groups, fewer than 8 */
            int n = groups - g;
            __m256i bias = q4 || vnni ? bias_sums_avx2(xsum[t], g, n, q4 ? 3 : 7)
                                      : _mm256_setzero_si256();
            a0 = eight_groups_avx2(a0, w[0], ws[0], g, n, q4, xq[t], xs[t], bias, vnni);
            a1 = eight_groups_avx2(a1, w[1], ws[1], g, n, q4, xq[t], xs[t], bias, vnni);
            a2 = eight_groups_avx2(a2, w[2], ws[2], g, n, q4, xq[t], xs[t], bias, vnni);
            a3 = eight_groups_avx2(a3, w[3], ws[3], g, n, q4, xq[t], xs[t], bias, vnni);
        }
        out[t][0] = hsum_avx2(a0), out[t][1] = hsum_avx2(a1);
        out[t][2] = hsum_avx2(a2), out[t][3] = hsum_avx2(a3);
    }
}

/* q8, 2-4 tokens: a row at a time, four groups at a time, their |w| in registers (w's signs
 * read from L1) for every token; each (row, token)'s four dots summed (four_sums_avx2) into
 * [g0..g3 lanes 0-3 | g0..g3 lanes 4-7] and scaled by the four scales twice over. */
KERNEL_INLINE void dot4_tokens_q8_avx2(const Mat *W, const size_t row[4],
                                       const int8_t *const xq[4], const float *const xs[4],
                                       int nt, float out[4][4]) {
    int groups = W->cols / 32;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int k = 0; k < 4; k++) {
        const int8_t *w = (const int8_t *)W->data + row[k];
        const float *ws = W->scale + row[k] / 32;
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                         _mm256_setzero_ps()};
        int g = 0;
        for (; g + 4 <= groups; g += 4) {
            __m256i w_abs[4];
            for (int i = 0; i < 4; i++)
                w_abs[i] = _mm256_sign_epi8(group_avx2(w, g + i), group_avx2(w, g + i));
            __m256 w_scale = _mm256_broadcast_ps((const __m128 *)(ws + g));
            prefetch_ahead(w, (size_t)g * 32);
            prefetch_ahead(w, (size_t)g * 32 + 64);
            prefetch_ahead(ws, (size_t)g * 4);
            for (int t = 0; t < 4; t++) {
                if (t >= nt) break;
                __m256i d[4];
                for (int i = 0; i < 4; i++) {
                    __m256i x = _mm256_sign_epi8(group_avx2(xq[t], g + i), group_avx2(w, g + i));
                    d[i] = _mm256_madd_epi16(_mm256_maddubs_epi16(w_abs[i], x), ones);
                }
                __m256i sums = four_sums_avx2(d[0], d[1], d[2], d[3]);
                __m256 x_scale = _mm256_broadcast_ps((const __m128 *)(xs[t] + g));
                __m256 scale = _mm256_mul_ps(w_scale, x_scale);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[t]);
            }
        }
        for (int t = 0; t < nt; t++)  /* the last groups, fewer than 4 */
            out[t][k] = last_groups(hsum_avx2(acc[t]), W, row[k], g, xq[t], xs[t]);
    }
}

static void dot4x4_q8_group32_avx2(const Mat *W, const size_t row[4], const int8_t *const xq[4],
                                   const float *const xs[4], const int32_t *const xsum[4], int nt,
                                   float out[4][4]) {
    if (nt == 1) dot4x4_group32_avx2(W, row, xq, xs, xsum, 1, out, 0, 0);
    else dot4_tokens_q8_avx2(W, row, xq, xs, nt, out);
}

static void dot4x4_q4_group32_avx2(const Mat *W, const size_t row[4], const int8_t *const xq[4],
                                   const float *const xs[4], const int32_t *const xsum[4], int nt,
                                   float out[4][4]) {
    dot4x4_group32_avx2(W, row, xq, xs, xsum, nt, out, 1, 0);
}

/* q8 prefill without VNNI, tokens in the lanes (q8_lanes_rows): 3 rows x 16 tokens over
 * `groups` groups of 32. Rows come widened to int16 (w16[r], a chunk's columns); tokens as
 * int16 pairs of columns, 8 tokens a block (xa, xb: [pair][token][2], 16 values a pair) with
 * their scales [group][token] (sa, sb). Each column pair is one vpmaddwd per row and block
 * against the row's pair broadcast as one 32-bit word, the int32 sums of a group scaled once
 * per 8 tokens: no per-(row, token) reduction (the 4 x 4 kernel spends a third of its time on
 * those, a microbenchmark in docs/speed.md). Adds into out[r * stride + t]. */
#define Q8_LANES_PAIR(acc_a, acc_b, w)                                                          \
    do {                                                                                       \
        __m256i wp = _mm256_broadcastd_epi32(_mm_loadu_si32(w));                                \
        acc_a = _mm256_add_epi32(acc_a, _mm256_madd_epi16(xva, wp));                           \
        acc_b = _mm256_add_epi32(acc_b, _mm256_madd_epi16(xvb, wp));                           \
    } while (0)
static void q8_lanes_rows_avx2(float *out, int stride, const int16_t *const w16[3],
                               const float *const ws[3], const int16_t *xa, const int16_t *xb,
                               const float *sa, const float *sb, int groups) {
    __m256 f0a = _mm256_setzero_ps(), f0b = f0a, f1a = f0a, f1b = f0a, f2a = f0a, f2b = f0a;
    for (int g = 0; g < groups; g++) {
        __m256i i0a = _mm256_setzero_si256(), i0b = i0a, i1a = i0a, i1b = i0a, i2a = i0a,
                i2b = i0a;
        for (int p = g * 16; p < g * 16 + 16; p++) {
            __m256i xva = _mm256_loadu_si256((const __m256i *)(xa + (size_t)p * 16));
            __m256i xvb = _mm256_loadu_si256((const __m256i *)(xb + (size_t)p * 16));
            IN_REGISTER(xva);
            IN_REGISTER(xvb);
            Q8_LANES_PAIR(i0a, i0b, w16[0] + 2 * p);
            Q8_LANES_PAIR(i1a, i1b, w16[1] + 2 * p);
            Q8_LANES_PAIR(i2a, i2b, w16[2] + 2 * p);
        }
        __m256 ta = _mm256_loadu_ps(sa + g * 8), tb = _mm256_loadu_ps(sb + g * 8);
        __m256 w0 = _mm256_set1_ps(ws[0][g]), w1 = _mm256_set1_ps(ws[1][g]),
               w2 = _mm256_set1_ps(ws[2][g]);
        f0a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0a), _mm256_mul_ps(w0, ta), f0a);
        f0b = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0b), _mm256_mul_ps(w0, tb), f0b);
        f1a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1a), _mm256_mul_ps(w1, ta), f1a);
        f1b = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1b), _mm256_mul_ps(w1, tb), f1b);
        f2a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i2a), _mm256_mul_ps(w2, ta), f2a);
        f2b = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i2b), _mm256_mul_ps(w2, tb), f2b);
    }
    __m256 f[3][2] = {{f0a, f0b}, {f1a, f1b}, {f2a, f2b}};
    for (int r = 0; r < 3; r++)
        for (int h = 0; h < 2; h++) {
            float *o = out + (size_t)r * stride + h * 8;
            _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), f[r][h]));
        }
}
#undef Q8_LANES_PAIR
#endif

/* AVX-VNNI (Intel Core 12th generation on and Core Ultra, without AVX-512; Zen 5): the same
 * kernel with vpdpbusd on 256 bits, one instruction for a group's 32 u8 x s8 products where
 * AVX2 needs three (vpsignb, vpmaddubsw, vpmaddwd). q8 weights become unsigned by one xor
 * (w + 128), q4's nibbles already are; the token's bias x sums come off every eight groups.
 * Zen 5 built for AVX2 + AVX-VNNI against AVX2 alone, 8-layer V2-Lite, 5 alternations: q8
 * prefill of 512 tokens 83.8 -> 89.5 tok/s, q4 decode 37.5 -> 42.3 (medians; Intel's
 * vpmaddubsw and vpmaddwd share two ports, so it should gain more there: not measured). */
#if defined(__AVXVNNI__) && defined(__AVX2__) && defined(__FMA__)
static void dot4x4_q8_group32_avxvnni(const Mat *W, const size_t row[4],
                                      const int8_t *const xq[4], const float *const xs[4],
                                      const int32_t *const xsum[4], int nt, float out[4][4]) {
    if (nt == 1) dot4x4_group32_avx2(W, row, xq, xs, xsum, 1, out, 0, 1);
    else dot4x4_group32_avx2(W, row, xq, xs, xsum, nt, out, 0, 1);
}

static void dot4x4_q4_group32_avxvnni(const Mat *W, const size_t row[4],
                                      const int8_t *const xq[4], const float *const xs[4],
                                      const int32_t *const xsum[4], int nt, float out[4][4]) {
    if (nt == 1) dot4x4_group32_avx2(W, row, xq, xs, xsum, 1, out, 1, 1);
    else dot4x4_group32_avx2(W, row, xq, xs, xsum, nt, out, 1, 1);
}
#endif

/* Intrinsics, ARM NEON with the dot-product extension (Apple M-series, Graviton 2+; build with
 * -march=native or -march=armv8.2-a+dotprod): sdot sums four int8 products into each int32 lane,
 * so a group of 32 is two sdot per (row, token); q4 groups are unpacked from their nibbles in
 * registers, once for all tokens of the call. Checked under qemu-user (tests/arm.sh); its speed
 * has not been measured. */
#if defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
KERNEL_INLINE void dot4x4_group32_neon(const Mat *W, const size_t row[4],
                                       const int8_t *const xq[4], const float *const xs[4],
                                       int nt, float out[4][4], int q4) {
    int groups = W->cols / 32;
    const int8_t *w[4];
    const float *ws[4];
    float32x4_t acc[4][4];
    for (int k = 0; k < 4; k++) {
        w[k] = (const int8_t *)W->data + (q4 ? row[k] / 2 : row[k]);
        ws[k] = W->scale + row[k] / 32;
        for (int t = 0; t < 4; t++) acc[k][t] = vdupq_n_f32(0.0f);
    }
    for (int g = 0; g < groups; g++) {
        int8x16_t lo[4], hi[4];  /* weights 0-15 and 16-31 of the group */
        for (int k = 0; k < 4; k++) {
            if (q4) {  /* byte j: weight j in its low nibble, j + 16 in its high one, q + 8 */
                uint8x16_t b = vld1q_u8((const uint8_t *)w[k] + (size_t)g * 16);
                lo[k] = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(b, vdupq_n_u8(15))), vdupq_n_s8(8));
                hi[k] = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(b, 4)), vdupq_n_s8(8));
                continue;
            }
            lo[k] = vld1q_s8(w[k] + (size_t)g * 32);
            hi[k] = vld1q_s8(w[k] + (size_t)g * 32 + 16);
        }
        for (int t = 0; t < nt; t++) {
            int8x16_t x_lo = vld1q_s8(xq[t] + (size_t)g * 32),
                      x_hi = vld1q_s8(xq[t] + (size_t)g * 32 + 16);
            for (int k = 0; k < 4; k++) {
                int32x4_t dot = vdotq_s32(vdotq_s32(vdupq_n_s32(0), lo[k], x_lo), hi[k], x_hi);
                acc[k][t] = vfmaq_n_f32(acc[k][t], vcvtq_f32_s32(dot), ws[k][g] * xs[t][g]);
            }
        }
    }
    for (int k = 0; k < 4; k++)
        for (int t = 0; t < nt; t++) out[t][k] = vaddvq_f32(acc[k][t]);
}

static void dot4x4_q8_group32_neon(const Mat *W, const size_t row[4], const int8_t *const xq[4],
                                   const float *const xs[4], const int32_t *const xsum[4], int nt,
                                   float out[4][4]) {
    (void)xsum;  /* sdot multiplies signed by signed: no bias to take off */
    dot4x4_group32_neon(W, row, xq, xs, nt, out, 0);
}

static void dot4x4_q4_group32_neon(const Mat *W, const size_t row[4], const int8_t *const xq[4],
                                   const float *const xs[4], const int32_t *const xsum[4], int nt,
                                   float out[4][4]) {
    (void)xsum;
    dot4x4_group32_neon(W, row, xq, xs, nt, out, 1);
}
#endif

/* f32 or bf16 weights (bf16: the top half of an f32, widened on the fly), four rows by up to
 * four tokens over len columns: out[t][k] = w[k] . x[t]. The portable kernel; the AVX2 and
 * AVX-512 ones below do the same with FMA. */
static inline float weight_at(const void *w, int bf16, int i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)w)[i]) : ((const float *)w)[i];
}

static inline void dot4x4_float_portable(const void *const w[4], int bf16, const float *const x[4],
                                         int nt, int len, float out[4][4]) {
    for (int t = 0; t < nt; t++) {
        float a = 0, b = 0, c = 0, d = 0;
#pragma omp simd reduction(+ : a, b, c, d)
        for (int i = 0; i < len; i++) {
            a += weight_at(w[0], bf16, i) * x[t][i]; b += weight_at(w[1], bf16, i) * x[t][i];
            c += weight_at(w[2], bf16, i) * x[t][i]; d += weight_at(w[3], bf16, i) * x[t][i];
        }
        out[t][0] = a; out[t][1] = b; out[t][2] = c; out[t][3] = d;
    }
}

/* Intrinsics, AVX2 + FMA and AVX-512: four rows by PASS tokens at a time (2 in AVX2's 16
 * registers, 4 in AVX-512's 32), 4 x PASS independent accumulators (FMA's latency hidden) and
 * each weight load, widened once, used for all PASS tokens. LANES floats per vector; the columns
 * past the last full vector run as in the portable kernel. Each pass width is its own function
 * with a constant count: with the count a parameter, GCC kept the 16 sums on the stack (bf16
 * prefill fell from 60 to 45 tok/s). */
#define DOT4X4_FLOAT_PASS(NAME, P, VEC, LANES, LOAD_F32, LOAD_BF16, ZERO, FMA, HSUM)               \
    static inline void NAME(const void *const w[4], int bf16, const float *const xt[], int valid, \
                            int len, float out[][4]) {                                           \
        VEC acc[4][P];                                                                           \
        for (int k = 0; k < 4; k++)                                                              \
            for (int t = 0; t < P; t++) acc[k][t] = ZERO();                                      \
        int i = 0;                                                                               \
        for (; i + LANES <= len; i += LANES) {                                                   \
            VEC xv[P];                                                                           \
            for (int t = 0; t < P; t++) {                                                        \
                xv[t] = LOAD_F32(xt[t] + i);                                                     \
                IN_REGISTER(xv[t]);                                                              \
            }                                                                                    \
            for (int k = 0; k < 4; k++) {                                                        \
                VEC wv = bf16 ? LOAD_BF16((const uint16_t *)w[k] + i)                            \
                              : LOAD_F32((const float *)w[k] + i);                               \
                IN_REGISTER(wv);                                                                 \
                prefetch_ahead(w[k], (size_t)i * (bf16 ? 2 : 4));                                \
                for (int t = 0; t < P; t++) acc[k][t] = FMA(wv, xv[t], acc[k][t]);               \
            }                                                                                    \
        }                                                                                        \
        for (int k = 0; k < 4; k++)                                                              \
            for (int t = 0; t < valid; t++) {                                                    \
                float sum = HSUM(acc[k][t]);                                                     \
                for (int j = i; j < len; j++) sum += weight_at(w[k], bf16, j) * xt[t][j];        \
                out[t][k] = sum;                                                                 \
            }                                                                                    \
    }
#define DOT4X4_FLOAT_SIMD(NAME, VEC, LANES, PASS, LOAD_F32, LOAD_BF16, ZERO, FMA, HSUM)            \
    DOT4X4_FLOAT_PASS(NAME##_pass, PASS, VEC, LANES, LOAD_F32, LOAD_BF16, ZERO, FMA, HSUM)        \
    DOT4X4_FLOAT_PASS(NAME##_lone, 1, VEC, LANES, LOAD_F32, LOAD_BF16, ZERO, FMA, HSUM)           \
    /* A lone token (decoding) takes its own pass: 4 sums, not PASS x 4 over copies of it. */    \
    static inline void NAME(const void *const w[4], int bf16, const float *const x[4], int nt,    \
                            int len, float out[4][4]) {                                          \
        for (int t0 = 0; t0 < nt; t0 += PASS) {                                                  \
            const float *xt[PASS];                                                               \
            for (int t = 0; t < PASS; t++) xt[t] = x[t0 + t < nt ? t0 + t : nt - 1];             \
            int valid = nt - t0 < PASS ? nt - t0 : PASS;                                         \
            if (valid == 1) NAME##_lone(w, bf16, xt, 1, len, out + t0);                          \
            else NAME##_pass(w, bf16, xt, valid, len, out + t0);                                 \
        }                                                                                        \
    }
#if defined(__AVX2__) && defined(__FMA__)
static inline __m256 load8_bf16(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
DOT4X4_FLOAT_SIMD(dot4x4_float_avx2, __m256, 8, 2, _mm256_loadu_ps, load8_bf16, _mm256_setzero_ps,
                  _mm256_fmadd_ps, hsum_avx2)
#endif
#if defined(__AVX512F__)
static inline __m512 load16_bf16(const uint16_t *p) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
DOT4X4_FLOAT_SIMD(dot4x4_float_avx512, __m512, 16, 4, _mm512_loadu_ps, load16_bf16,
                  _mm512_setzero_ps, _mm512_fmadd_ps, _mm512_reduce_add_ps)
#endif

/* Each kernel for f32 and for bf16 weights: bf16 constant inside, so its branch folds away. */
typedef void (*Dot4x4Float)(const void *const[4], const float *const[4], int, int, float[4][4]);
#define DOT4X4_FLOAT_TYPED(KERNEL)                                                               \
    static void KERNEL##_f32(const void *const w[4], const float *const x[4], int nt, int len,  \
                             float out[4][4]) { KERNEL(w, 0, x, nt, len, out); }                 \
    static void KERNEL##_bf16(const void *const w[4], const float *const x[4], int nt, int len, \
                              float out[4][4]) { KERNEL(w, 1, x, nt, len, out); }
DOT4X4_FLOAT_TYPED(dot4x4_float_portable)
#if defined(__AVX2__) && defined(__FMA__)
DOT4X4_FLOAT_TYPED(dot4x4_float_avx2)
#endif
#if defined(__AVX512F__)
DOT4X4_FLOAT_TYPED(dot4x4_float_avx512)
#endif

/* a * b + acc, one rounding where the CPU has FMA (without it, fmaf is a slow library call). */
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define MULADD(a, b, acc) fmaf(a, b, acc)
#else
#define MULADD(a, b, acc) ((acc) + (a) * (b))
#endif

/* Rows against columns held in the vector lanes: out[r][w] = sum_k c_r[k] xT[k][w] for ROWS rows
 * c_r (row[r], f32 or bf16) and WIDTH lanes of xT ([len][x_stride]). Attention scores put 16
 * heads in the lanes, prefill 16 or 32 tokens. Each row's value is broadcast against one load of
 * xT's WIDTH values shared by every row: no horizontal sums, where the 4 x 4 kernels spend 16
 * per 4 rows x 4 columns. out: [ROWS][WIDTH], added to where add is set; rows past n repeat the
 * last and are not stored. ahead: elements past each row to prefetch meanwhile (the next rows of
 * a cache, a matrix's next chunk), or 0.
 * Intrinsics, AVX2 + FMA and AVX-512; elsewhere the 4 x 4 kernels run, and the tests hold these
 * to them. */
typedef void (*RowsLanes)(float *out, int add, const void *const *row, int n, const float *xT,
                          size_t x_stride, int len, size_t ahead);
/* Column k: every row's weight, WEIGHT(row, k) broadcast, against xT's WIDTH lanes. */
#define ROWS_LANES_COLUMN(K, WEIGHT, VEC, LANES, LOAD, FMA)                                      \
    do {                                                                                         \
        VEC x[HV];                                                                               \
        for (int v = 0; v < HV; v++) {                                                           \
            x[v] = LOAD(xT + (size_t)(K) * x_stride + v * LANES);                                \
            IN_REGISTER(x[v]);                                                                   \
        }                                                                                        \
        for (int r = 0; r < NROWS; r++) {                                                        \
            VEC cv = WEIGHT(c[r], K);                                                            \
            IN_REGISTER(cv);                                                                     \
            for (int v = 0; v < HV; v++) acc[r][v] = FMA(cv, x[v], acc[r][v]);                   \
            if (ahead && (K) % LINE == 0) __builtin_prefetch(c[r] + ahead + (K));                \
        }                                                                                        \
    } while (0)
/* FIRST(c, 0) and NEXT(c, k) broadcast a row's weights: bf16 rows are read as they are, NEXT
 * taking weight k from the 32-bit word at k - 1 (no widened copy of the row). */
#define ROWS_LANES_SIMD(NAME, WTYPE, VEC, LANES, ROWS, WIDTH, FIRST, NEXT, LOAD, ZERO, FMA, STORE) \
    static void NAME(float *out, int add, const void *const *row, int n, const float *xT,       \
                     size_t x_stride, int len, size_t ahead) {                                   \
        enum { HV = WIDTH / LANES, NROWS = ROWS, LINE = 64 / sizeof(WTYPE) };                    \
        const WTYPE *c[ROWS];                                                                    \
        VEC acc[ROWS][HV];                                                                       \
        for (int r = 0; r < ROWS; r++) {                                                         \
            c[r] = (const WTYPE *)row[r < n ? r : n - 1];                                        \
            for (int v = 0; v < HV; v++)                                                         \
                acc[r][v] = add && r < n ? LOAD(out + r * WIDTH + v * LANES) : ZERO();           \
        }                                                                                        \
        ROWS_LANES_COLUMN(0, FIRST, VEC, LANES, LOAD, FMA);                                      \
        for (int k = 1; k < len; k++) ROWS_LANES_COLUMN(k, NEXT, VEC, LANES, LOAD, FMA);         \
        for (int r = 0; r < n && r < ROWS; r++)                                                  \
            for (int v = 0; v < HV; v++) STORE(out + r * WIDTH + v * LANES, acc[r][v]);          \
    }
/* bf16 weight k as a float is its 16 bits on top of 32: the 32-bit word at k - 1 with its low
 * half (weight k - 1, little-endian) cleared, one load-and-mask. Weight 0 goes by bf16_to_f32. */
#define BF16_BITS 0xFFFF0000u
/* scores: 16 heads; prefill: 12 or 6 rows x 32 or 16 tokens (AVX-512: 24 of 32 registers) */
#if defined(__AVX2__) && defined(__FMA__)
#define F32_AVX2(c, k) _mm256_set1_ps((c)[k])
#define BF16_FIRST_AVX2(c, k) _mm256_set1_ps(bf16_to_f32((c)[k]))
#define BF16_NEXT_AVX2(c, k)                                                                     \
    _mm256_castsi256_ps(_mm256_and_si256(_mm256_broadcastd_epi32(_mm_loadu_si32((c) + (k) - 1)), \
                                         _mm256_set1_epi32((int32_t)BF16_BITS)))
#define ROWS_LANES_AVX2(NAME, ROWS, WIDTH)                                                         \
    ROWS_LANES_SIMD(NAME, float, __m256, 8, ROWS, WIDTH, F32_AVX2, F32_AVX2, _mm256_loadu_ps,     \
                    _mm256_setzero_ps, _mm256_fmadd_ps, _mm256_storeu_ps)                        \
    ROWS_LANES_SIMD(NAME##_bf16, uint16_t, __m256, 8, ROWS, WIDTH, BF16_FIRST_AVX2,              \
                    BF16_NEXT_AVX2, _mm256_loadu_ps, _mm256_setzero_ps, _mm256_fmadd_ps,         \
                    _mm256_storeu_ps)
ROWS_LANES_AVX2(score_rows_avx2, 4, 16)
ROWS_LANES_AVX2(prefill_rows_avx2_16, 6, 16)
ROWS_LANES_AVX2(prefill_rows_avx2_8, 6, 8)
#endif
#if defined(__AVX512F__)
#define F32_AVX512(c, k) _mm512_set1_ps((c)[k])
#define BF16_FIRST_AVX512(c, k) _mm512_set1_ps(bf16_to_f32((c)[k]))
#define BF16_NEXT_AVX512(c, k)                                                                   \
    _mm512_castsi512_ps(_mm512_and_epi32(_mm512_broadcastd_epi32(_mm_loadu_si32((c) + (k) - 1)), \
                                         _mm512_set1_epi32((int32_t)BF16_BITS)))
#define ROWS_LANES_AVX512(NAME, ROWS, WIDTH)                                                       \
    ROWS_LANES_SIMD(NAME, float, __m512, 16, ROWS, WIDTH, F32_AVX512, F32_AVX512,                \
                    _mm512_loadu_ps, _mm512_setzero_ps, _mm512_fmadd_ps, _mm512_storeu_ps)       \
    ROWS_LANES_SIMD(NAME##_bf16, uint16_t, __m512, 16, ROWS, WIDTH, BF16_FIRST_AVX512,           \
                    BF16_NEXT_AVX512, _mm512_loadu_ps, _mm512_setzero_ps, _mm512_fmadd_ps,       \
                    _mm512_storeu_ps)
ROWS_LANES_AVX512(score_rows_avx512, 8, 16)
ROWS_LANES_AVX512(prefill_rows_avx512_32, 12, 32)
ROWS_LANES_AVX512(prefill_rows_avx512_16, 12, 16)
#endif
/* A bf16 cache with AVX-512 BF16: `vdpbf16ps` multiplies a pair of bf16 numbers in each float
 * lane, twice an FMA's products. The scores: a row's two numbers k, k + 1 are one 32-bit word,
 * broadcast against the queries' pairs with 16 heads in the lanes ([cols / 2][16] words). */
#if defined(__AVX512BF16__)
#define PAIR_AVX512(c, k) _mm512_castsi512_ps(_mm512_set1_epi32((int32_t)(c)[k]))
#define DPBF16_AVX512(a, b, acc) _mm512_dpbf16_ps(acc, (__m512bh)(a), (__m512bh)(b))
ROWS_LANES_SIMD(score_pairs_avx512, uint32_t, __m512, 16, 8, 16, PAIR_AVX512, PAIR_AVX512,
                _mm512_loadu_ps, _mm512_setzero_ps, DPBF16_AVX512, _mm512_storeu_ps)

/* The weighted sums: sums[h][i] += sum_j p[h][j] rows[j][i] for 8 heads x 32 columns at a time
 * (16 sums in registers), rows two at a time: rows j and j + 1 interleaved into pairs of a
 * column (`vpermt2w`), each head's pair (p[h][j], p[h][j + 1]) broadcast (p_pairs [H][n/2],
 * p_stride apart). An odd last row pairs with zeros. H a multiple of 8, r of 32. The portable
 * weighted_tile computes the same products (bf16 times bf16 is exact in a float). */
static void weighted_pairs_avx512(float *sums, int r, const uint32_t *p_pairs, int p_stride,
                                  const uint16_t *rows, size_t stride, int H, int n) {
    int16_t lo_idx[32], hi_idx[32];  /* word 2l: row j's column l; word 2l + 1: row j + 1's */
    for (int l = 0; l < 16; l++) {
        lo_idx[2 * l] = (int16_t)l, lo_idx[2 * l + 1] = (int16_t)(32 + l);
        hi_idx[2 * l] = (int16_t)(16 + l), hi_idx[2 * l + 1] = (int16_t)(48 + l);
    }
    __m512i low = _mm512_loadu_si512(lo_idx), high = _mm512_loadu_si512(hi_idx);
    for (int c0 = 0; c0 < r; c0 += 32)
        for (int h0 = 0; h0 < H; h0 += 8) {
            __m512 acc[8][2];
            for (int h = 0; h < 8; h++)
                for (int v = 0; v < 2; v++)
                    acc[h][v] = _mm512_loadu_ps(sums + (size_t)(h0 + h) * r + c0 + 16 * v);
            for (int j = 0; j < n; j += 2) {
                __m512i a = _mm512_loadu_si512(rows + (size_t)j * stride + c0);
                __m512i b = j + 1 < n ? _mm512_loadu_si512(rows + (size_t)(j + 1) * stride + c0)
                                      : _mm512_setzero_si512();
                __m512 lo = _mm512_castsi512_ps(_mm512_permutex2var_epi16(a, low, b));
                __m512 hi = _mm512_castsi512_ps(_mm512_permutex2var_epi16(a, high, b));
                IN_REGISTER(lo);
                IN_REGISTER(hi);
                for (int h = 0; h < 8; h++) {
                    __m512 pv = PAIR_AVX512(p_pairs + (size_t)(h0 + h) * p_stride, j / 2);
                    acc[h][0] = DPBF16_AVX512(pv, lo, acc[h][0]);
                    acc[h][1] = DPBF16_AVX512(pv, hi, acc[h][1]);
                }
            }
            for (int h = 0; h < 8; h++)
                for (int v = 0; v < 2; v++)
                    _mm512_storeu_ps(sums + (size_t)(h0 + h) * r + c0 + 16 * v, acc[h][v]);
        }
}
#endif
/* A q8 cache (-k q8) with AVX-512 VNNI: int8 rows against int8 queries and weights in
 * `vpdpbusd` (u8 x s8, four products into each int32 lane), four times the products of an FMA.
 * scores_tile_q8 and weighted_tile_q8 hold the portable loops that compute the same sums. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* acc += u8 x s8, four products a lane, in place: with the intrinsic GCC copied every
 * accumulator to another register (or the stack) and back on each pass of these loops. */
KERNEL_INLINE __m512i dpbusd_into(__m512i acc, __m512i u8, __m512i s8) {
#if defined(__GNUC__)
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
    return acc;
#else
    return _mm512_dpbusd_epi32(acc, u8, s8);
#endif
}
enum { SCORE_Q8_ROWS = 8 };
/* acc[i] += words k0..k1-1 of row c[i] (made unsigned) against the heads' query words; the
 * rows ahead bytes further are fetched meanwhile (without, the rows came from memory at a third
 * of the speed they run from cache). */
KERNEL_INLINE void score_words_q8_vnni(__m512i acc[SCORE_Q8_ROWS],
                                       const int8_t *const c[SCORE_Q8_ROWS],
                                       const int32_t *q_words, int k0, int k1, size_t ahead) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int k = k0; k < k1; k++) {
        __m512i q = _mm512_loadu_si512(q_words + (size_t)k * 16);
        IN_REGISTER(q);
        for (int i = 0; i < SCORE_Q8_ROWS; i++) {
            int32_t word;
            if (k % 16 == 0) __builtin_prefetch(c[i] + ahead + 4 * k);
            memcpy(&word, c[i] + 4 * k, 4);
            acc[i] = dpbusd_into(acc[i], _mm512_xor_si512(_mm512_set1_epi32(word), flip), q);
        }
    }
}
/* Four vectors' 128-bit lanes transposed: v[k] lane i <- a_i lane k. */
KERNEL_INLINE void transpose_lanes_4x4(__m512i v[4], __m512i a0, __m512i a1, __m512i a2,
                                       __m512i a3) {
    __m512i lo01 = _mm512_shuffle_i32x4(a0, a1, 0x44), hi01 = _mm512_shuffle_i32x4(a0, a1, 0xEE);
    __m512i lo23 = _mm512_shuffle_i32x4(a2, a3, 0x44), hi23 = _mm512_shuffle_i32x4(a2, a3, 0xEE);
    v[0] = _mm512_shuffle_i32x4(lo01, lo23, 0x88);
    v[1] = _mm512_shuffle_i32x4(lo01, lo23, 0xDD);
    v[2] = _mm512_shuffle_i32x4(hi01, hi23, 0x88);
    v[3] = _mm512_shuffle_i32x4(hi01, hi23, 0xDD);
}
/* Sixteen vectors of 16 numbers (32 bits each) transposed in place: a[i] lane k <- a[k] lane i.
 * Pairs of rows interleave by 32 then 64 bits within 128-bit lanes, then the lanes move. */
KERNEL_INLINE void transpose_16x16(__m512i a[16]) {
    __m512i b[16];
    for (int i = 0; i < 16; i += 2) {
        b[i] = _mm512_unpacklo_epi32(a[i], a[i + 1]);
        b[i + 1] = _mm512_unpackhi_epi32(a[i], a[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  /* a[4g + m], 128-bit lane l: number 4l + m of rows 4g.. */
        a[i] = _mm512_unpacklo_epi64(b[i], b[i + 2]);
        a[i + 1] = _mm512_unpackhi_epi64(b[i], b[i + 2]);
        a[i + 2] = _mm512_unpacklo_epi64(b[i + 1], b[i + 3]);
        a[i + 3] = _mm512_unpackhi_epi64(b[i + 1], b[i + 3]);
    }
    for (int m = 0; m < 4; m++) {
        __m512i v[4];
        transpose_lanes_4x4(v, a[m], a[4 + m], a[8 + m], a[12 + m]);
        for (int l = 0; l < 4; l++) b[4 * l + m] = v[l];
    }
    for (int i = 0; i < 16; i++) a[i] = b[i];
}
/* The scores of 16 heads, S[h][j] (stride s_stride), 8 rows a pass with the heads in the lanes:
 * a row's numbers k..k+3 (one 32-bit word) are broadcast and made unsigned (xor 0x80: c + 128)
 * against the heads' four query numbers (q_words [cols / 4][16]). Each part's sums start at
 * bias = -128 x the sum of its query numbers, which takes the 128 back off. S[h][j] = aL sl_j
 * qs_l[h] + aR sr_j qs_r[h]; every 16 rows turn to the heads' order in registers (scattering
 * them one number at a time took a third of the kernel's time again). */
static void scores_q8_vnni(float *S, size_t s_stride, const int8_t *rows, size_t stride, int n,
                           const float *sl, const float *sr, const int32_t *q_words,
                           const int32_t *bias_l, const int32_t *bias_r, const float *qs_l,
                           const float *qs_r, int r, int cols) {
    enum { R = SCORE_Q8_ROWS };
    __m512 l = _mm512_loadu_ps(qs_l), rope = _mm512_loadu_ps(qs_r);
    __m512i out[16] = {0};  /* 16 rows' sums, heads in the lanes, then heads' rows */
    for (int j = 0; j < n; j += R) {
        const int8_t *c[R];
        int row[R];  /* past n: the last row again, into lanes the masked stores leave out */
        __m512i acc_l[R], acc_r[R];
        for (int i = 0; i < R; i++) {
            row[i] = j + i < n ? j + i : n - 1;
            c[i] = rows + (size_t)row[i] * stride;
            acc_l[i] = _mm512_loadu_si512(bias_l);
            acc_r[i] = _mm512_loadu_si512(bias_r);
        }
        score_words_q8_vnni(acc_l, c, q_words, 0, r / 4, R * stride);
        score_words_q8_vnni(acc_r, c, q_words, r / 4, cols / 4, R * stride);
        for (int i = 0; i < R; i++) {
            __m512 part_r = _mm512_mul_ps(_mm512_cvtepi32_ps(acc_r[i]),
                                          _mm512_mul_ps(rope, _mm512_set1_ps(sr[row[i]])));
            __m512 scale_l = _mm512_mul_ps(l, _mm512_set1_ps(sl[row[i]]));
            out[j % 16 + i] = _mm512_castps_si512(
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc_l[i]), scale_l, part_r));
        }
        if (j % 16 + R < 16 && j + R < n) continue;
        transpose_16x16(out);
        int j0 = j / 16 * 16;
        __mmask16 keep = n - j0 >= 16 ? 0xFFFF : (__mmask16)((1u << (n - j0)) - 1);
        for (int h = 0; h < 16; h++)
            _mm512_mask_storeu_ps(S + (size_t)h * s_stride + j0, keep, _mm512_castsi512_ps(out[h]));
    }
}

/* The weighted sums: sums[h][i] += w_scale[h] x sum_j w[h][j] c_j[i], i < r (w: u8 [H][ATT_ROWS],
 * zero past n up to a multiple of 4). Four rows' bytes of a column become one 32-bit word
 * (`vpunpck`: 16 columns a vector, 64 columns a block), met by each head's four weights broadcast;
 * 4 heads x 64 columns of int32 sums stay in registers. The unpacks leave column 16l + 4m + i in
 * lane l of vector m; transpose_lanes_4x4 puts the columns back in order before the sums go out. */
static void weighted_q8_vnni(float *sums, int r, const uint8_t *w, const float *w_scale,
                             const int8_t *rows, size_t stride, int H, int n) {
    __m512i quads[ATT_ROWS / 4][4];
    int nq = (n + 3) / 4;
    for (int c0 = 0; c0 < r; c0 += 64) {
        for (int qd = 0; qd < nq; qd++) {
            __m512i a[4];
            for (int i = 0; i < 4; i++)  /* past n: the last row again, under zero weights */
                a[i] = _mm512_loadu_si512(rows + (size_t)(4 * qd + i < n ? 4 * qd + i : n - 1) *
                                                     stride + c0);
            __m512i lo01 = _mm512_unpacklo_epi8(a[0], a[1]);
            __m512i hi01 = _mm512_unpackhi_epi8(a[0], a[1]);
            __m512i lo23 = _mm512_unpacklo_epi8(a[2], a[3]);
            __m512i hi23 = _mm512_unpackhi_epi8(a[2], a[3]);
            quads[qd][0] = _mm512_unpacklo_epi16(lo01, lo23);
            quads[qd][1] = _mm512_unpackhi_epi16(lo01, lo23);
            quads[qd][2] = _mm512_unpacklo_epi16(hi01, hi23);
            quads[qd][3] = _mm512_unpackhi_epi16(hi01, hi23);
        }
        for (int h0 = 0; h0 < H; h0 += 4) {
            __m512i acc[4][4];
            for (int h = 0; h < 4; h++)
                for (int m = 0; m < 4; m++) acc[h][m] = _mm512_setzero_si512();
            for (int qd = 0; qd < nq; qd++) {
                __m512i z[4];
                for (int m = 0; m < 4; m++) {
                    z[m] = quads[qd][m];
                    IN_REGISTER(z[m]);
                }
                for (int h = 0; h < 4; h++) {
                    int32_t word;
                    memcpy(&word, w + (size_t)(h0 + h) * ATT_ROWS + 4 * qd, 4);
                    __m512i wv = _mm512_set1_epi32(word);
                    for (int m = 0; m < 4; m++) acc[h][m] = dpbusd_into(acc[h][m], wv, z[m]);
                }
            }
            for (int h = 0; h < 4; h++) {
                __m512i v[4];
                transpose_lanes_4x4(v, acc[h][0], acc[h][1], acc[h][2], acc[h][3]);
                __m512 f = _mm512_set1_ps(w_scale[h0 + h]);
                float *out = sums + (size_t)(h0 + h) * r + c0;
                for (int k = 0; k < 4; k++)
                    _mm512_storeu_ps(out + 16 * k, _mm512_fmadd_ps(f, _mm512_cvtepi32_ps(v[k]),
                                                                   _mm512_loadu_ps(out + 16 * k)));
            }
        }
    }
}
#endif
/* The same with AVX-VNNI on 256 bits (CPUs without AVX-512: Intel Core 12th generation on;
 * Zen 5 built so): 8 heads in the lanes, 4 rows a pass for the scores (8 int32 sums in 16
 * registers), and 2 heads x 32 columns for the weighted sums. Kernels alone (16 heads x 8
 * layers x 8,400 rows, 2 threads, Zen 5 built for AVX2 + AVX-VNNI): the portable loops 39 ms
 * per token, these 9.9; an f32 cache 15.6-18.1, bf16 18.1-20.8. */
#if defined(__AVXVNNI__) && defined(__AVX2__) && defined(__FMA__)
/* Eight vectors of 8 floats transposed in place: a[i] lane k <- a[k] lane i. */
static inline void transpose_8x8(__m256 a[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(a[i], a[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(a[i], a[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {  /* u[4g + m], 128-bit lane l: number 4l + m of rows 4g.. */
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int m = 0; m < 4; m++) {
        a[m] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x20);
        a[4 + m] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x31);
    }
}

/* acc[i] += words k0..k1-1 of row c[i] (made unsigned) against 8 heads' query words. */
KERNEL_INLINE void score_words_avxvnni(__m256i acc[4], const int8_t *const c[4],
                                       const int32_t *q_words, int k0, int k1, size_t ahead) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    for (int k = k0; k < k1; k++) {
        __m256i q = _mm256_loadu_si256((const __m256i *)(q_words + (size_t)k * 8));
        for (int i = 0; i < 4; i++) {
            int32_t word;
            if (k % 16 == 0) __builtin_prefetch(c[i] + ahead + 4 * k);
            memcpy(&word, c[i] + 4 * k, 4);
            __m256i u = _mm256_xor_si256(_mm256_set1_epi32(word), flip);
            acc[i] = _mm256_dpbusd_avx_epi32(acc[i], u, q);
        }
    }
}

/* scores_q8_vnni for 8 heads (q_words [cols / 4][8]): S[h][j] = aL sl_j qs_l[h] + aR sr_j
 * qs_r[h]; every 8 rows turn to the heads' order in registers. */
static void scores_q8_avxvnni(float *S, size_t s_stride, const int8_t *rows, size_t stride, int n,
                              const float *sl, const float *sr, const int32_t *q_words,
                              const int32_t *bias_l, const int32_t *bias_r, const float *qs_l,
                              const float *qs_r, int r, int cols) {
    enum { R = 4 };
    __m256 l = _mm256_loadu_ps(qs_l), rope = _mm256_loadu_ps(qs_r), out[8];
    for (int i = 0; i < 8; i++) out[i] = _mm256_setzero_ps();  /* rows past n: lanes left out */
    for (int j = 0; j < n; j += R) {
        const int8_t *c[R];
        int row[R];  /* past n: the last row again, into lanes the masked stores leave out */
        __m256i acc_l[R], acc_r[R];
        for (int i = 0; i < R; i++) {
            row[i] = j + i < n ? j + i : n - 1;
            c[i] = rows + (size_t)row[i] * stride;
            acc_l[i] = _mm256_loadu_si256((const __m256i *)bias_l);
            acc_r[i] = _mm256_loadu_si256((const __m256i *)bias_r);
        }
        score_words_avxvnni(acc_l, c, q_words, 0, r / 4, R * stride);
        score_words_avxvnni(acc_r, c, q_words, r / 4, cols / 4, R * stride);
        for (int i = 0; i < R; i++) {
            __m256 part_r = _mm256_mul_ps(_mm256_cvtepi32_ps(acc_r[i]),
                                          _mm256_mul_ps(rope, _mm256_set1_ps(sr[row[i]])));
            out[j % 8 + i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc_l[i]),
                                             _mm256_mul_ps(l, _mm256_set1_ps(sl[row[i]])), part_r);
        }
        if (j % 8 + R < 8 && j + R < n) continue;
        transpose_8x8(out);
        int j0 = j / 8 * 8, count = n - j0 < 8 ? n - j0 : 8;
        __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(count),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        for (int h = 0; h < 8; h++)
            _mm256_maskstore_ps(S + (size_t)h * s_stride + j0, keep, out[h]);
    }
}

/* weighted_q8_vnni with 256 bits: 32 columns a block (the unpacks leave column 16l + 4m + i in
 * 128-bit lane l of vector m), 2 heads x 4 vectors of int32 sums in registers. */
static void weighted_q8_avxvnni(float *sums, int r, const uint8_t *w, const float *w_scale,
                                const int8_t *rows, size_t stride, int H, int n) {
    __m256i quads[ATT_ROWS / 4][4];
    int nq = (n + 3) / 4;
    for (int c0 = 0; c0 < r; c0 += 32) {
        for (int qd = 0; qd < nq; qd++) {
            __m256i a[4];
            for (int i = 0; i < 4; i++)  /* past n: the last row again, under zero weights */
                a[i] = _mm256_loadu_si256((const __m256i *)(
                        rows + (size_t)(4 * qd + i < n ? 4 * qd + i : n - 1) * stride + c0));
            __m256i lo01 = _mm256_unpacklo_epi8(a[0], a[1]);
            __m256i hi01 = _mm256_unpackhi_epi8(a[0], a[1]);
            __m256i lo23 = _mm256_unpacklo_epi8(a[2], a[3]);
            __m256i hi23 = _mm256_unpackhi_epi8(a[2], a[3]);
            quads[qd][0] = _mm256_unpacklo_epi16(lo01, lo23);
            quads[qd][1] = _mm256_unpackhi_epi16(lo01, lo23);
            quads[qd][2] = _mm256_unpacklo_epi16(hi01, hi23);
            quads[qd][3] = _mm256_unpackhi_epi16(hi01, hi23);
        }
        for (int h0 = 0; h0 < H; h0 += 2) {
            __m256i acc[2][4];
            for (int h = 0; h < 2; h++)
                for (int m = 0; m < 4; m++) acc[h][m] = _mm256_setzero_si256();
            for (int qd = 0; qd < nq; qd++)
                for (int h = 0; h < 2; h++) {
                    int32_t word;
                    memcpy(&word, w + (size_t)(h0 + h) * ATT_ROWS + 4 * qd, 4);
                    __m256i wv = _mm256_set1_epi32(word);
                    for (int m = 0; m < 4; m++)
                        acc[h][m] = _mm256_dpbusd_avx_epi32(acc[h][m], wv, quads[qd][m]);
                }
            for (int h = 0; h < 2; h++) {
                __m256i v[4] = {  /* columns 0-7, 8-15, 16-23, 24-31 */
                    _mm256_permute2x128_si256(acc[h][0], acc[h][1], 0x20),
                    _mm256_permute2x128_si256(acc[h][2], acc[h][3], 0x20),
                    _mm256_permute2x128_si256(acc[h][0], acc[h][1], 0x31),
                    _mm256_permute2x128_si256(acc[h][2], acc[h][3], 0x31)};
                __m256 f = _mm256_set1_ps(w_scale[h0 + h]);
                float *out = sums + (size_t)(h0 + h) * r + c0;
                for (int k = 0; k < 4; k++)
                    _mm256_storeu_ps(out + 8 * k, _mm256_fmadd_ps(f, _mm256_cvtepi32_ps(v[k]),
                                                                  _mm256_loadu_ps(out + 8 * k)));
            }
        }
    }
}
#endif
enum { SCORE_HEADS = 16, SCORE_MAX_LEN = 1024, SCORE_MAX_ROWS = 8 };

/* Four q8 rows of W (row[k]: element offsets) dotted with one token's int8 form xq/xs. */
static void dot4_rows_q8(const Mat *W, const size_t row[4], const int8_t *xq, const float *xs,
                         float out[4]) {
    /* a constant group of 32 (the real models) lets the compiler unroll it */
    if (W->group == 32) dot4_q8_portable(W, row, xq, xs, 32, out);
    else dot4_q8_portable(W, row, xq, xs, W->group, out);
}

/* The q8 kernels: the best one built for this CPU, or (tests) a given one. */
/* NO_VNNI: AVX2 or NEON; AVX_VNNI: the 256-bit VNNI kernels where built, else as NO_VNNI */
enum { KERNEL_BEST = 0, KERNEL_PORTABLE = 1, KERNEL_NO_VNNI = 2, KERNEL_AVX_VNNI = 3 };

/* Scratch for quantized activations, sized once by init_run_state (q8 models only): q, scale
 * and sum (each group's sum of q) hold the int8 inputs of several products; at[i] is where
 * product i's begin. */
struct MatmulScratch {
    int8_t *q;
    float *scale;
    int32_t *sum;
    size_t capacity, *at;
    int max_products;
    int kernel;    /* KERNEL_BEST; the tests also force each of the others */
    float *panels; /* f32/bf16 prefill: the inputs as token panels; grown on a prompt's first use */
    size_t panel_capacity, *panel_at;
};

static MatmulScratch *matmul_scratch_new(int max_products, size_t max_inputs) {
    MatmulScratch *s = xcalloc(1, sizeof *s);
    s->capacity = max_inputs;
    s->q = xcalloc_huge(max_inputs);
    s->scale = xcalloc_huge(max_inputs * sizeof(float));
    s->sum = xcalloc_huge(max_inputs * sizeof(int32_t));
    s->max_products = max_products;
    s->at = xcalloc(max_products, sizeof(size_t));
    s->panel_at = xcalloc(max_products, sizeof(size_t));
    return s;
}

static void matmul_scratch_free(MatmulScratch *s) {
    if (!s) return;
    free(s->q); free(s->scale); free(s->sum); free(s->at);
    free(s->panels); free(s->panel_at); free(s);
}

/* One of the 4-row x 4-token q8 kernels above (groups of 32), or NULL when the portable C path
 * is to run: AVX-512 VNNI where built, else AVX2, else NEON with sdot. q4 weights: the same
 * CPU's kernel that reads nibbles, else NULL (matmul_block_q4 unpacks them, q4_direct). */
typedef void (*Dot4x4)(const Mat *, const size_t[4], const int8_t *const[4], const float *const[4],
                       const int32_t *const[4], int, float[4][4]);
static Dot4x4 q8_kernel(const Mat *W, int kernel) {
    if (W->group != 32 || kernel == KERNEL_PORTABLE) return NULL;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (kernel == KERNEL_BEST)
        return W->dtype == DTYPE_Q4 ? dot4x4_q4_group32_vnni : dot4x4_q8_group32_vnni;
#endif
#if defined(__AVXVNNI__) && defined(__AVX2__) && defined(__FMA__)
    if (kernel == KERNEL_BEST || kernel == KERNEL_AVX_VNNI)
        return W->dtype == DTYPE_Q4 ? dot4x4_q4_group32_avxvnni : dot4x4_q8_group32_avxvnni;
#endif
#if defined(__AVX2__) && defined(__FMA__)
    return W->dtype == DTYPE_Q4 ? dot4x4_q4_group32_avx2 : dot4x4_q8_group32_avx2;
#endif
#if defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
    return W->dtype == DTYPE_Q4 ? dot4x4_q4_group32_neon : dot4x4_q8_group32_neon;
#endif
    return NULL;
}

/* q4 straight from its nibbles, or unpacked first (matmul_block_q4)? The AVX2 kernel unpacks
 * a group for each token it meets; a chunk unpacked once for all tokens wins from about 32
 * (24 matrices 1408 x 2048, Zen 5 built for AVX2, ms direct / unpacked: 4 tokens 4.4 / 6.6,
 * 16 tokens 22 / 23, 48 tokens 70 / 50). */
static int q4_direct(const Mat *W, int tokens, int kernel) {
    if (!q8_kernel(W, kernel)) return 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (kernel == KERNEL_BEST) return 1;
#endif
    return tokens < 32;
}

/* q8 and q4 prefill with the tokens in the lanes (q8_lanes_rows_avx2), where the 4-row x 4-token
 * AVX2 kernel would run without VNNI and a product has Q8_LANES_MIN tokens or more (fewer would
 * be mostly padding: the tokens go 16 at a time). */
enum { Q8_LANES_MIN = 16, Q8_LANES_BLOCK = 8, Q8_LANES_TOKENS = 16, Q8_LANES_CHUNK = 512 };
typedef void (*Q8LanesRows)(float *, int, const int16_t *const[3], const float *const[3],
                            const int16_t *, const int16_t *, const float *, const float *, int);
static void q8_lanes_rows_portable(float *out, int stride, const int16_t *const w16[3],
                                   const float *const ws[3], const int16_t *xa,
                                   const int16_t *xb, const float *sa, const float *sb,
                                   int groups);
static Q8LanesRows q8_lanes_kernel(const Mat *W, int tokens, int kernel) {
#if defined(__AVX2__) && defined(__FMA__)
    Dot4x4 rows_tokens = q8_kernel(W, kernel);
    if (tokens >= Q8_LANES_MIN && tokens <= MAX_BATCH &&
        (rows_tokens == dot4x4_q8_group32_avx2 || rows_tokens == dot4x4_q4_group32_avx2))
        return q8_lanes_rows_avx2;
#endif
    (void)W, (void)tokens, (void)kernel, (void)q8_lanes_rows_portable;  /* the tests' reference */
    return NULL;
}

/* n tokens padded to the 16 a q8_lanes_rows call takes. */
static int q8_lanes_padded(int n) {
    return (n + Q8_LANES_TOKENS - 1) / Q8_LANES_TOKENS * Q8_LANES_TOKENS;
}

/* What a product's token panel for q8_lanes_rows takes, in floats: n tokens padded to 16, each
 * as cols int16 values and one scale per group of 32. */
static size_t q8_lanes_floats(int n, int cols) {
    size_t padded = (size_t)q8_lanes_padded(n);
    return padded * cols / 2 + padded * (cols / 32);
}

/* The f32/bf16 kernel: AVX-512 where built, else AVX2 (KERNEL_NO_VNNI forces it), else C. */
static Dot4x4Float float_kernel(int bf16, int kernel) {
#if defined(__AVX512F__)
    if (kernel == KERNEL_BEST) return bf16 ? dot4x4_float_avx512_bf16 : dot4x4_float_avx512_f32;
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (kernel != KERNEL_PORTABLE) return bf16 ? dot4x4_float_avx2_bf16 : dot4x4_float_avx2_f32;
#endif
    (void)kernel;
    return bf16 ? dot4x4_float_portable_bf16 : dot4x4_float_portable_f32;
}

/* The scores kernel with heads in lanes and its rows per call, as float_kernel chooses; NULL
 * without SIMD (the 4 x 4 kernels then run). */
static RowsLanes score_kernel(int kernel, int bf16, int pairs, int *rows) {
    if (pairs) {  /* a bf16 cache against bf16 query pairs */
#if defined(__AVX512BF16__)
        if (kernel == KERNEL_BEST) return *rows = 8, score_pairs_avx512;
#endif
        return *rows = 0, NULL;
    }
#if defined(__AVX512F__)
    if (kernel == KERNEL_BEST) return *rows = 8, bf16 ? score_rows_avx512_bf16 : score_rows_avx512;
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (kernel != KERNEL_PORTABLE) return *rows = 4, bf16 ? score_rows_avx2_bf16 : score_rows_avx2;
#endif
    (void)kernel, (void)bf16;
    return *rows = 0, NULL;
}

/* The prefill kernels (rows_lanes, tokens in the lanes): wide for full panels, narrow for the
 * tokens left over, and their rows per call; 0 without AVX2/AVX-512 (the 4 x 4 kernels run). */
typedef struct {
    RowsLanes wide, narrow, wide_bf16, narrow_bf16;
    int wide_tokens, narrow_tokens, rows;
} PrefillKernels;
static int prefill_kernels(int kernel, PrefillKernels *k) {
#if defined(__AVX512F__)
    if (kernel == KERNEL_BEST)
        return *k = (PrefillKernels){prefill_rows_avx512_32, prefill_rows_avx512_16,
                                     prefill_rows_avx512_32_bf16, prefill_rows_avx512_16_bf16,
                                     32, 16, 12}, 1;
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (kernel != KERNEL_PORTABLE)
        return *k = (PrefillKernels){prefill_rows_avx2_16, prefill_rows_avx2_8,
                                     prefill_rows_avx2_16_bf16, prefill_rows_avx2_8_bf16,
                                     16, 8, 6}, 1;
#endif
    (void)kernel, (void)k;
    return 0;
}

/* f32 and bf16 weights: the four rows in chunks of 512 columns (in L1 while every token passes),
 * each chunk against all tokens, its partial sums added into y. With four tokens or more a bf16
 * chunk is widened once into f32 and shared by all of them; with fewer, widened in registers. */
static void matmul_block_float(const Product *p, int b, const size_t row[4], int kernel) {
    enum { CHUNK = 512 };
    const Mat *W = p->W;
    int rows = W->rows, cols = W->cols, blocks = (rows + 3) / 4, bf16 = W->dtype == DTYPE_BF16;
    int widen = bf16 && p->n >= 4;
    size_t size = bf16 ? sizeof(uint16_t) : sizeof(float);
    Dot4x4Float dot = float_kernel(bf16 && !widen, kernel);
    float wide[4][CHUNK];
    for (int c0 = 0; c0 < cols; c0 += CHUNK) {
        int len = cols - c0 < CHUNK ? cols - c0 : CHUNK;
        const void *w[4];
        for (int k = 0; k < 4; k++) {
            w[k] = (const char *)W->data + (row[k] + c0) * size;
            if (!widen) continue;
            for (int i = 0; i < len; i++) wide[k][i] = bf16_to_f32(((const uint16_t *)w[k])[i]);
            w[k] = wide[k];
        }
        for (int t0 = 0; t0 < p->n; t0 += 4) {
            int tokens = p->n - t0 < 4 ? p->n - t0 : 4;
            const float *x[4];
            float out[4][4];
            for (int tt = 0; tt < 4; tt++)
                x[tt] = p->x + (size_t)(t0 + (tt < tokens ? tt : tokens - 1)) * cols + c0;
            dot(w, x, tokens, len, out);
            for (int tt = 0; tt < tokens; tt++)
                for (int k = 0; k < 4 && b + k * blocks < rows; k++) {
                    float *y = &p->y[(size_t)(t0 + tt) * rows + b + k * blocks];
                    *y = c0 ? *y + out[tt][k] : out[tt][k];
                }
        }
    }
}

/* Four rows of a q8 matrix W (row[k]: element offsets) against every token of p, the int8
 * tokens xq/xs (x_stride, s_stride apart): into y, or added to it (accumulate). With a SIMD q8
 * kernel one call shares each weight load among up to four tokens. */
static void q8_rows_times_tokens(const Product *p, const Mat *W, const size_t row[4], int b,
                                 const int8_t *xq, const float *xs, const int32_t *xsum,
                                 int x_stride, int s_stride, int accumulate, int kernel) {
    int rows = p->W->rows, blocks = (rows + 3) / 4;
    Dot4x4 simd = q8_kernel(W, kernel);
    for (int t0 = 0; t0 < p->n; t0 += 4) {
        float out[4][4];
        int tokens = p->n - t0 < 4 ? p->n - t0 : 4;
        if (simd) {
            const int8_t *tq[4];
            const float *ts[4];
            const int32_t *tsum[4];
            for (int tt = 0; tt < 4; tt++) {
                int t = t0 + (tt < tokens ? tt : tokens - 1);
                tq[tt] = xq + (size_t)t * x_stride;
                ts[tt] = xs + (size_t)t * s_stride;
                tsum[tt] = xsum + (size_t)t * s_stride;
            }
            simd(W, row, tq, ts, tsum, tokens, out);
        } else
            for (int tt = 0; tt < tokens; tt++) {
                size_t t = (size_t)t0 + tt;
                dot4_rows_q8(W, row, xq + t * x_stride, xs + t * s_stride, out[tt]);
            }
        for (int tt = 0; tt < tokens; tt++)
            for (int k = 0; k < 4 && b + k * blocks < rows; k++) {
                float *y = &p->y[(size_t)(t0 + tt) * rows + b + k * blocks];
                *y = accumulate ? *y + out[tt][k] : out[tt][k];
            }
    }
}

/* q4 weights where q4_direct says no (the portable build; AVX2 and NEON from 32 tokens): the
 * four rows a chunk of columns at a time, unpacked to int8 with their scales (a 4-row q8 matrix
 * in L1) once for all tokens, then the q8 kernels: memory reads 4-bit weights, the SIMD units
 * multiply 8-bit ones. */
static void matmul_block_q4(const Product *p, int b, const size_t row[4], const int8_t *xq,
                            const float *xs, const int32_t *xsum, int kernel) {
    enum { CHUNK = 2048 };  /* 8 KiB of int8 and up to 16 KiB of scales: in L1 */
    const Mat *W = p->W;
    int cols = W->cols, group = W->group, chunk = CHUNK / group * group;
    int8_t q[4 * CHUNK];
    float scale[4 * CHUNK / 2];
    for (int c0 = 0; c0 < cols; c0 += chunk) {
        int len = cols - c0 < chunk ? cols - c0 : chunk, groups = len / group;
        for (int k = 0; k < 4; k++) {
            unpack_q4(q + k * len, (const uint8_t *)W->data + (row[k] + c0) / 2, len, group);
            memcpy(scale + k * groups, W->scale + (row[k] + c0) / group, groups * sizeof(float));
        }
        Mat part = {q, scale, DTYPE_Q8, 4, len, group};
        size_t part_row[4] = {0, (size_t)len, 2 * (size_t)len, 3 * (size_t)len};
        q8_rows_times_tokens(p, &part, part_row, b, xq + c0, xs + c0 / group, xsum + c0 / group,
                             cols, cols / group, c0 > 0, kernel);
    }
}

/* Prefill with f32 or bf16 weights, PANEL_ROWS rows (three blocks) against every token. The
 * tokens come transposed into panels of PANEL_TOKENS ([cols][32]: a column's 32 tokens side by
 * side, the last panel padded with zeros), so the kernels hold tokens in the vector lanes and
 * broadcast each weight: no horizontal sums (bf16 prefill of 512 tokens, Zen 5: 77-87 -> 93-106
 * tok/s). A chunk of the rows stays in L1 while every panel passes; bf16 is read as it is. */
enum { PANEL_TOKENS = 32, PANEL_ROWS = 12, PANEL_CHUNK = 512, PANEL_MIN_TOKENS = 8 };
static void matmul_blocks_panels(const Product *p, int b, int count, const float *panels,
                                 const PrefillKernels *kern) {
    const Mat *W = p->W;
    /* blocks b..b + count - 1 as rows 4b.. side by side, not b, b + Q, ..: each token's sums
     * land in one or two cache lines of y */
    int rows = W->rows, cols = W->cols, first = 4 * b, n = 4 * count;
    if (n > rows - first) n = rows - first;
    int bf16 = W->dtype == DTYPE_BF16;
    RowsLanes wide = bf16 ? kern->wide_bf16 : kern->wide;
    RowsLanes narrow = bf16 ? kern->narrow_bf16 : kern->narrow;
    float out[PANEL_ROWS * (MAX_BATCH + PANEL_TOKENS)];  /* every token's sums over the chunks */
    for (int c0 = 0; c0 < cols; c0 += PANEL_CHUNK) {
        int len = cols - c0 < PANEL_CHUNK ? cols - c0 : PANEL_CHUNK;
        /* the first panel fetches what comes next: the rows' next chunk, or the next job's rows */
        size_t ahead = c0 + len < cols ? (size_t)len : (size_t)n * cols - c0;
        const void *at[PANEL_ROWS];
        for (int r = 0; r < n; r++)
            at[r] = (const char *)W->data + dtype_bytes(W->dtype, (size_t)(first + r) * cols + c0);
        for (int t0 = 0; t0 < p->n;) {
            int left = p->n - t0, is_narrow = left <= kern->narrow_tokens;
            int width = is_narrow ? kern->narrow_tokens : kern->wide_tokens;
            const float *x = panels + ((size_t)(t0 / PANEL_TOKENS) * cols + c0) * PANEL_TOKENS +
                             t0 % PANEL_TOKENS;
            for (int r0 = 0; r0 < n; r0 += kern->rows)
                (is_narrow ? narrow : wide)(out + PANEL_ROWS * t0 + r0 * width, c0 > 0, at + r0,
                                            n - r0, x, PANEL_TOKENS, len, t0 ? 0 : ahead);
            t0 += width;
        }
    }
    for (int t0 = 0; t0 < p->n;) {  /* [panel][row][token] -> y [token][row] */
        int left = p->n - t0;
        int width = left <= kern->narrow_tokens ? kern->narrow_tokens : kern->wide_tokens;
        for (int t = 0; t < width && t < left; t++) {
            float *y = p->y + (size_t)(t0 + t) * rows + first;
            for (int r = 0; r < n; r++) y[r] = out[PANEL_ROWS * t0 + r * width + t];
        }
        t0 += width;
    }
}

/* Tokens t0.. of x ([n][cols]) as one panel: panel[k][w] = x[t0 + w][k], zeros past n. A few
 * columns at a time, so the lines written stay in L1 while all 32 tokens fill them. */
static void make_panel(float *panel, const float *x, int n, int cols, int t0) {
    enum { STEP = 16 };
    for (int k0 = 0; k0 < cols; k0 += STEP) {
        int k1 = cols - k0 < STEP ? cols : k0 + STEP;
        for (int w = 0; w < PANEL_TOKENS; w++) {
            const float *xt = t0 + w < n ? x + (size_t)(t0 + w) * cols : NULL;
            for (int k = k0; k < k1; k++) panel[(size_t)k * PANEL_TOKENS + w] = xt ? xt[k] : 0;
        }
    }
}

/* q8_lanes_rows_avx2 in plain C, the same sums in the same order (the tests hold the AVX2
 * kernel to it bit for bit). */
static void q8_lanes_rows_portable(float *out, int stride, const int16_t *const w16[3],
                                   const float *const ws[3], const int16_t *xa,
                                   const int16_t *xb, const float *sa, const float *sb,
                                   int groups) {
    float f[3][Q8_LANES_TOKENS] = {{0}};
    for (int g = 0; g < groups; g++)
        for (int r = 0; r < 3; r++)
            for (int t = 0; t < Q8_LANES_TOKENS; t++) {
                const int16_t *x = (t < Q8_LANES_BLOCK ? xa : xb) + (t % Q8_LANES_BLOCK) * 2;
                int32_t sum = 0;
                for (int k = g * 32; k < g * 32 + 32; k++)
                    sum += (int32_t)w16[r][k] * x[(size_t)(k / 2) * 16 + k % 2];
                float scale = ws[r][g] * (t < Q8_LANES_BLOCK ? sa : sb)[g * 8 + t % 8];
                f[r][t] = fmaf((float)sum, scale, f[r][t]);
            }
    for (int r = 0; r < 3; r++)
        for (int t = 0; t < Q8_LANES_TOKENS; t++) out[(size_t)r * stride + t] += f[r][t];
}

/* Token t of a product's q8_lanes panel (q8_lanes_floats): its int8 values q as int16 pairs of
 * columns, 8 tokens a block ([block][pair][token][2]), then the scales [block][group][token].
 * The product's last token also zeroes the padding up to 16. */
static void q8_lanes_put(float *panel, const int8_t *q, const float *scale, int t, int n,
                         int cols) {
    int groups = cols / 32, padded = q8_lanes_padded(n);
    int16_t *x16 = (int16_t *)panel;
    float *sc = panel + (size_t)padded * cols / 2;
    for (int u = t; u < (t == n - 1 ? padded : t + 1); u++) {
        int block = u / Q8_LANES_BLOCK, lane = u % Q8_LANES_BLOCK;
        int16_t *xb = x16 + (size_t)block * cols * Q8_LANES_BLOCK + lane * 2;
        for (int c = 0; c < cols; c++) xb[(size_t)(c / 2) * 16 + c % 2] = u == t ? q[c] : 0;
        for (int g = 0; g < groups; g++)
            sc[((size_t)block * groups + g) * Q8_LANES_BLOCK + lane] = u == t ? scale[g] : 0;
    }
}

/* Rows 4b .. 4b + 4 count - 1 of a q8 or q4 product against its q8_lanes panel: a chunk of the
 * rows widened to int16 (in L1), then 16 tokens at a time against 3 rows at a time. */
static void q8_lanes_blocks(const Product *p, int b, int count, const float *panel,
                            Q8LanesRows kern) {
    const Mat *W = p->W;
    int rows = W->rows, cols = W->cols, groups = cols / 32, first = 4 * b, n = 4 * count;
    if (n > rows - first) n = rows - first;
    int padded = q8_lanes_padded(p->n);
    const int16_t *x16 = (const int16_t *)panel;
    const float *sc = panel + (size_t)padded * cols / 2;
    float out[PANEL_ROWS * (MAX_BATCH + Q8_LANES_TOKENS)];
    int16_t w16[PANEL_ROWS][Q8_LANES_CHUNK];
    memset(out, 0, sizeof(float) * PANEL_ROWS * padded);
    for (int c0 = 0; c0 < cols; c0 += Q8_LANES_CHUNK) {
        int len = cols - c0 < Q8_LANES_CHUNK ? cols - c0 : Q8_LANES_CHUNK;
        for (int r = 0; r < n; r++) {
            size_t at = (size_t)(first + r) * cols + c0;
            int8_t nibbles[Q8_LANES_CHUNK];  /* q4: its chunk as int8 first */
            const int8_t *w = (const int8_t *)W->data + at;
            if (W->dtype == DTYPE_Q4)
                unpack_q4(nibbles, (const uint8_t *)W->data + at / 2, len, W->group), w = nibbles;
            for (int k = 0; k < len; k++) w16[r][k] = w[k];
        }
        for (int t0 = 0; t0 < padded; t0 += Q8_LANES_TOKENS) {  /* 16 tokens' chunk in L1 */
            size_t block = (size_t)t0 / Q8_LANES_BLOCK;
            const int16_t *xa = x16 + (block * (cols / 2) + c0 / 2) * 16;
            const float *sa = sc + (block * groups + c0 / 32) * Q8_LANES_BLOCK;
            for (int r0 = 0; r0 < n; r0 += 3) {
                const int16_t *w[3];
                const float *ws[3];
                for (int k = 0; k < 3; k++) {  /* past n: the last row again, not stored */
                    int r = r0 + k < n ? r0 + k : n - 1;
                    w[k] = w16[r];
                    ws[k] = W->scale + ((size_t)(first + r) * cols + c0) / 32;
                }
                kern(out + (size_t)r0 * padded + t0, padded, w, ws, xa, xa + (size_t)cols * 8,
                     sa, sa + (size_t)groups * Q8_LANES_BLOCK, len / 32);
            }
        }
    }
    for (int t = 0; t < p->n; t++)
        for (int r = 0; r < n; r++)
            p->y[(size_t)t * rows + first + r] = out[(size_t)r * padded + t];
}

/* Block b of product p against every token: rows b, b + Q, b + 2Q, b + 3Q (Q: the number of
 * blocks), read from memory once and reused from cache for up to four tokens per kernel call.
 * xq/xs: the int8 tokens for q8 and q4 weights. */
static void matmul_block(const Product *p, int b, const int8_t *xq, const float *xs,
                         const int32_t *xsum, int kernel) {
    const Mat *W = p->W;
    int rows = W->rows, cols = W->cols, blocks = (rows + 3) / 4;
    size_t row[4];  /* rows past the end repeat the last and are not stored */
    for (int k = 0; k < 4; k++)
        row[k] = (size_t)(b + k * blocks < rows ? b + k * blocks : rows - 1) * cols;
    if (W->dtype == DTYPE_Q8 || (W->dtype == DTYPE_Q4 && q4_direct(W, p->n, kernel)))
        q8_rows_times_tokens(p, W, row, b, xq, xs, xsum, cols, cols / W->group, 0, kernel);
    else if (W->dtype == DTYPE_Q4) matmul_block_q4(p, b, row, xq, xs, xsum, kernel);
    else matmul_block_float(p, b, row, kernel);
}

/* Several independent products in one parallel pass (e.g. every expert's gate and up): their
 * blocks, in MATMUL_CHUNKS chunks of equal work per thread, go to whichever thread is free
 * (equal fixed shares made the faster of two cores wait 16% of each decode step on this VM,
 * where one core ran 30% slower for a whole run; 4 chunks a thread decoded q4 at 74-85 tok/s,
 * 16 at 66-74, 64 at 58: each chunk starts its streams afresh). Each block reads four
 * far-apart streams of weights (more reads in flight than one stream, which decoding, bound by
 * memory, needs: tests/bandwidth.c). Threads wait for each other once per pass, not once per
 * product. Consecutive products with the same input share its int8 form. act may be NULL when
 * no weight is q8. Every output is one block's, so any split gives the same bits. */
enum { MATMUL_CHUNKS = 4 };

/* q8 and q4 weights meet int8 activations. */
static int int8_input(const Mat *W) { return W->dtype == DTYPE_Q8 || W->dtype == DTYPE_Q4; }

/* Product i reads the same int8 input or panels as product i - 1 (an expert's up, its gate). */
static int shares_previous_input(const Product *p, int i) {
    if (i == 0 || p[i].x != p[i - 1].x || p[i].n != p[i - 1].n || p[i].W->cols != p[i - 1].W->cols)
        return 0;
    if (int8_input(p[i].W)) return int8_input(p[i - 1].W) && p[i].W->group == p[i - 1].W->group;
    return !int8_input(p[i - 1].W);
}

/* Where each product's prepared input goes: act->at (int8 tokens, q8/q4 weights) and, with
 * panels (a prefill kernel built), act->panel_at (token panels, f32/bf16 weights with
 * PANEL_MIN_TOKENS to MAX_BATCH tokens, what the panels' sums buffer holds; SIZE_MAX: none).
 * Returns the work: sum of blocks * cols * tokens. */
static long long plan_inputs(const Product *p, int count, MatmulScratch *act, int panels) {
    long long work = 0;
    size_t used = 0, panel_floats = 0;
    if (act && count > act->max_products) die("internal: activation scratch too small");
    for (int i = 0; i < count; i++) {
        const Mat *W = p[i].W;
        work += (long long)(W->rows + 3) / 4 * W->cols * p[i].n;
        if (int8_input(W) && !act) die("internal: activation scratch missing");
        int lanes = panels && int8_input(W) && q8_lanes_kernel(W, p[i].n, act->kernel);
        if (int8_input(W) && shares_previous_input(p, i)) {
            act->at[i] = act->at[i - 1];
            if (panels) act->panel_at[i] = act->panel_at[i - 1];
            if (panels && (act->panel_at[i] != SIZE_MAX) != lanes)
                die("internal: products sharing an input disagree on its q8 panel");
        } else if (int8_input(W)) {
            act->at[i] = used, used += (size_t)p[i].n * W->cols;
            if (panels) act->panel_at[i] = lanes ? panel_floats : SIZE_MAX;
            if (lanes) panel_floats += q8_lanes_floats(p[i].n, W->cols);
        } else if (!panels) continue;
        else if (p[i].n < PANEL_MIN_TOKENS || p[i].n > MAX_BATCH) act->panel_at[i] = SIZE_MAX;
        else if (shares_previous_input(p, i)) act->panel_at[i] = act->panel_at[i - 1];
        else {
            act->panel_at[i] = panel_floats;
            panel_floats += (size_t)(p[i].n + PANEL_TOKENS - 1) / PANEL_TOKENS * PANEL_TOKENS *
                            W->cols;
        }
    }
    if (used > (act ? act->capacity : 0)) die("internal: activation scratch too small");
    if (panel_floats > (act ? act->panel_capacity : 0)) {  /* a longer prompt than before */
        free(act->panels);
        act->panel_capacity = panel_floats + panel_floats / 4;  /* room for the next layers' */
        act->panels = xcalloc_huge(act->panel_capacity * sizeof(float));
    }
    return work;
}

/* The int8 inputs for q8 and q4 weights (scales and sums: one per q8_group) and, where q8 takes
 * the tokens in the lanes, their panels; else the float token panels: what `tokens` tokens of
 * the widest input take, padded, and each expert's padding. */
static void matmul_scratch_prefault(MatmulScratch *s, const Config *c, int tokens) {
    PrefillKernels kern;
    Mat q8 = {NULL, NULL, c->dtype, 1, 32, c->q8_group};
    int E = c->n_routed_experts, routed = tokens * c->num_experts_per_tok;
    if (c->dtype == DTYPE_Q8 || c->dtype == DTYPE_Q4) {
        prefault(s->q, s->capacity);
        prefault(s->scale, s->capacity / c->q8_group * sizeof(float));
        prefault(s->sum, s->capacity / c->q8_group * sizeof(int32_t));
        if (tokens >= Q8_LANES_MIN && q8_lanes_kernel(&q8, tokens, s->kernel)) {
            /* the widest input's lanes panel, each expert's padding: 1/2 + 1/32 float a value */
            size_t padded = (size_t)q8_lanes_padded(tokens);
            s->panel_capacity = (s->capacity / tokens * padded +
                                 (size_t)((E < routed ? E : routed) + 1) * Q8_LANES_TOKENS *
                                 c->hidden_size) * 17 / 32;
            s->panels = xcalloc_huge(s->panel_capacity * sizeof(float));
            prefault(s->panels, s->panel_capacity * sizeof(float));
        }
    } else if (tokens >= PANEL_MIN_TOKENS && prefill_kernels(s->kernel, &kern)) {
        size_t padded = (size_t)(tokens + PANEL_TOKENS - 1) / PANEL_TOKENS * PANEL_TOKENS;
        s->panel_capacity = s->capacity / tokens * padded +
                            (size_t)((E < routed ? E : routed) + 1) * PANEL_TOKENS * c->hidden_size;
        s->panels = xcalloc_huge(s->panel_capacity * sizeof(float));
        prefault(s->panels, s->panel_capacity * sizeof(float));
    }
}

/* This thread's share of preparing the inputs as plan_inputs placed them: int8 tokens one token
 * a job, token panels one panel a job, round robin. */
static void prepare_inputs(const Product *p, int count, MatmulScratch *act, int panels,
                           int threads, int id) {
    int job = 0;
    for (int i = 0; i < count; i++) {
        const Mat *W = p[i].W;
        if (shares_previous_input(p, i)) continue;
        if (int8_input(W))
            for (int t = 0; t < p[i].n; t++, job++) {
                size_t at = act->at[i] + (size_t)t * W->cols;
                if (job % threads != id) continue;
                quantize_activations(act->q + at, act->scale + at / W->group,
                                     p[i].x + (size_t)t * W->cols, W->cols, W->group);
                group_sums(act->sum + at / W->group, act->q + at, W->cols, W->group);
                if (panels && act->panel_at[i] != SIZE_MAX)
                    q8_lanes_put(act->panels + act->panel_at[i], act->q + at,
                                 act->scale + at / W->group, t, p[i].n, W->cols);
            }
        else if (panels && act->panel_at[i] != SIZE_MAX)
            for (int t0 = 0; t0 < p[i].n; t0 += PANEL_TOKENS, job++)
                if (job % threads == id)
                    make_panel(act->panels + act->panel_at[i] + (size_t)t0 * W->cols, p[i].x,
                               p[i].n, W->cols, t0);
    }
}

static void matmul_many(const Product *p, int count, MatmulScratch *act) {
    PrefillKernels kern;
    int panels = act && act->panel_at && prefill_kernels(act->kernel, &kern);
    long long work = plan_inputs(p, count, act, panels);
#pragma omp parallel if (work > 16384)
    {
        int threads = 1, id = 0;
#ifdef _OPENMP
        threads = omp_get_num_threads();
        id = omp_get_thread_num();
#endif
        prepare_inputs(p, count, act, panels, threads, id);
#pragma omp barrier
        int chunks = MATMUL_CHUNKS * threads;
#pragma omp for schedule(dynamic, 1)
        for (int chunk = 0; chunk < chunks; chunk++) {
            long long begin = work * chunk / chunks, end = work * (chunk + 1) / chunks, before = 0;
            for (int i = 0; i < count; i++) { /* the chunk: blocks starting in [begin, end) */
                const Mat *W = p[i].W;
                long long cost = (long long)W->cols * p[i].n, blocks = (W->rows + 3) / 4;
                long long lo = begin > before ? (begin - before + cost - 1) / cost : 0,
                          hi = end > before ? (end - before + cost - 1) / cost : 0;
                const int8_t *xq = int8_input(W) ? act->q + act->at[i] : NULL;
                const float *xs = int8_input(W) ? act->scale + act->at[i] / W->group : NULL;
                const int32_t *xsum = int8_input(W) ? act->sum + act->at[i] / W->group : NULL;
                const float *xT = panels && act->panel_at[i] != SIZE_MAX
                                  ? act->panels + act->panel_at[i] : NULL;
                Q8LanesRows lanes = xT && int8_input(W) ? q8_lanes_kernel(W, p[i].n, act->kernel)
                                                        : NULL;
                for (long long b = lo, last = hi < blocks ? hi : blocks; b < last;) {
                    int three = last - b < PANEL_ROWS / 4 ? (int)(last - b) : PANEL_ROWS / 4;
                    if (lanes) q8_lanes_blocks(&p[i], (int)b, three, xT, lanes);
                    else if (xT) matmul_blocks_panels(&p[i], (int)b, three, xT, &kern);
                    else matmul_block(&p[i], (int)b, xq, xs, xsum,
                                      act ? act->kernel : KERNEL_BEST);
                    b += xT ? three : 1;
                }
                before += blocks * cost;
            }
        }
    }
}



/* Row r of W as floats: embedding lookup, and the rows W_UK^T sums in the absorbed query. */
static void mat_cols_to_f32(float *out, const Mat *W, int r, int col0, int count) {
    size_t at = (size_t)r * W->cols + col0;
    if (W->dtype == DTYPE_BF16)
        for (int c = 0; c < count; c++) out[c] = bf16_to_f32(((const uint16_t *)W->data)[at + c]);
    else if (W->dtype == DTYPE_Q4 && col0 % W->group == 0 && count % W->group == 0) {
        const float *scale = W->scale + at / W->group;  /* whole groups: unpacked a group at once */
        for (int g = 0; g < count / W->group; g++) {
            int8_t q[256];  /* q4 groups hold at most 256 weights (validate_sizes) */
            unpack_q4(q, (const uint8_t *)W->data + (at + (size_t)g * W->group) / 2, W->group,
                      W->group);
            for (int i = 0; i < W->group; i++) out[g * W->group + i] = q[i] * scale[g];
        }
    } else if (W->dtype == DTYPE_Q8 || W->dtype == DTYPE_Q4) {
        const float *scale = W->scale + (size_t)r * (W->cols / W->group);
        for (int c = 0; c < count;) {  /* group by group: one scale each */
            int g = (col0 + c) / W->group, end = (g + 1) * W->group - col0;
            float sc = scale[g];
            for (; c < count && c < end; c++)
                out[c] = (W->dtype == DTYPE_Q8 ? ((const int8_t *)W->data)[at + c]
                                               : q4_at(W->data, at + c, W->group)) * sc;
        }
    } else memcpy(out, (const float *)W->data + at, (size_t)count * sizeof(float));
}

static void mat_row_to_f32(float *out, const Mat *W, int r) {
    mat_cols_to_f32(out, W, r, 0, W->cols);
}

/* y += a * one group of int8 (half = 0) or q4 weights (half: bytes of nibbles); q4 straight
 * from its nibbles, as unpacking each group into int8 first ran 8x slower. */
static inline void group_add(float *restrict y, const void *group, int count, int half, float a) {
    const uint8_t *nibbles = group;
    const int8_t *q = group;
    if (half) {
#pragma omp simd
        for (int i = 0; i < half; i++) {
            y[i] += a * (float)((nibbles[i] & 15) - 8);
            y[i + half] += a * (float)((nibbles[i] >> 4) - 8);
        }
    } else {
#pragma omp simd
        for (int i = 0; i < count; i++) y[i] += a * (float)q[i];
    }
}

static void quantized_row_add(float *y, size_t y_stride, const Mat *W, int r, const float *x,
                              size_t x_stride, int n) {
    int group = W->group, groups = W->cols / group, half = W->dtype == DTYPE_Q4 ? group / 2 : 0;
    size_t at = (size_t)r * W->cols;
    for (int g = 0; g < groups; g++) {
        const void *weights = (const char *)W->data + dtype_bytes(W->dtype, at + (size_t)g * group);
        float scale = W->scale[at / group + g];
        for (int t = 0; t < n; t++) {
            float a = x[t * x_stride] * scale, *yt = y + t * y_stride + (size_t)g * group;
            if (group == 32) group_add(yt, weights, 32, half ? 16 : 0, a);  /* the real models */
            else group_add(yt, weights, group, half, a);
        }
    }
}

static void mat_store_rows(Mat *W, int row0, const float *x, int n) {
    size_t at = (size_t)row0 * W->cols, count = (size_t)n * W->cols;
    if (W->dtype == DTYPE_F32) memcpy((float *)W->data + at, x, count * sizeof(float));
    else if (W->dtype == DTYPE_BF16)
        for (size_t i = 0; i < count; i++) ((uint16_t *)W->data)[at + i] = f32_to_bf16(x[i]);
    else if (W->dtype == DTYPE_Q8)  /* the cache's types: f32, bf16, q8 (-k) */
        quantize_activations((int8_t *)W->data + at, (float *)W->scale + at / W->group, x,
                             (int)count, W->group);
    else die("internal: no %s cache", storage_name(W->dtype));
}

static int cache_q8_group(int r, int width) {
    int group = 1;
    while (group < 64 && r % (2 * group) == 0 && width % (2 * group) == 0) group *= 2;
    return group;
}

static void cache_store_q8(Mat *C, int row, const float *x, int r) {
    int8_t *q = (int8_t *)C->data + (size_t)row * C->cols;
    float *scale = (float *)C->scale + (size_t)row * (C->cols / C->group), part_scale[2];
    quantize_activations(q, &part_scale[0], x, r, r);  /* c^KV: one group of r */
    if (C->cols > r) quantize_activations(q + r, &part_scale[1], x + r, C->cols - r, C->cols - r);
    for (int g = 0; g < C->cols / C->group; g++) scale[g] = part_scale[g * C->group >= r];
}


/* Attention's kernels, a tile of ATT_ROWS cached rows at a time. The scores (scores_tile) run
 * the rows_lanes or the matmul's float kernels above. The weighted sums (weighted_tile) are plain
 * C that the compiler turns into vectors of VEC_FLOATS, with ATT_HEADS heads' sums held in
 * registers at a time (16 of AVX-512's 32 registers, 8 of AVX2's 16, 16 of NEON's 32) while the
 * tile's rows, hot in L1, stream past. */
#if defined(__AVX512F__)
enum { VEC_FLOATS = 16, ATT_HEADS = 8 };
#elif defined(__AVX__)
enum { VEC_FLOATS = 8, ATT_HEADS = 4 };
#elif defined(__aarch64__)
enum { VEC_FLOATS = 4, ATT_HEADS = 8 };
#else
enum { VEC_FLOATS = 4, ATT_HEADS = 4 };
#endif
enum { WSUM_COLS = 2 * VEC_FLOATS };

/* Rows j0..j0+n-1 of W, columns c0..c0+cols-1, as floats: in place for f32, else converted into
 * block (stride cols); returns the rows and sets *stride. */
static const float *rows_as_f32(const Mat *W, int j0, int n, int c0, int cols, float *block,
                                size_t *stride) {
    if (W->dtype == DTYPE_F32) {
        *stride = W->cols;
        return (const float *)W->data + (size_t)j0 * W->cols + c0;
    }
    for (int j = 0; j < n; j++) mat_cols_to_f32(block + (size_t)j * cols, W, j0 + j, c0, cols);
    *stride = cols;
    return block;
}

/* The scores of cached rows j0..j0+n-1 for every head, S[h * s_stride + j] = Q[h] . W[j] (f32
 * or bf16 rows; q8: scores_tile_q8). With the queries in lanes (qT, see scores_in_lanes) a
 * rows_lanes kernel takes 16 heads by step rows a call; else the matmul's 4-row x 4-token float
 * kernels (rows: cached positions, tokens: heads), on rows side by side as no weight matrix is
 * walked, bf16 rows as they are. */
static void scores_tile(float *S, size_t s_stride, const float *Q, const float *qT, int pairs,
                        const Mat *W, int H, int j0, int n, int kernel) {
    int len = W->cols, bf16 = W->dtype == DTYPE_BF16, step = 0;
    RowsLanes lanes = qT ? score_kernel(kernel, bf16, pairs, &step) : NULL;
    int lanes_len = pairs ? len / 2 : len;  /* pairs: a row is len / 2 words */
    for (int g = 0; lanes && g < H / SCORE_HEADS; g++)
        for (int j = 0; j < n; j += step) {
            int here = n - j < step ? n - j : step;
            const void *at[SCORE_MAX_ROWS];
            float out[SCORE_MAX_ROWS][SCORE_HEADS];
            for (int r = 0; r < here; r++)
                at[r] = (const char *)W->data + dtype_bytes(W->dtype, (size_t)(j0 + j + r) * len);
            lanes(out[0], 0, at, here, qT + (size_t)g * lanes_len * SCORE_HEADS, SCORE_HEADS,
                  lanes_len, (size_t)step * lanes_len);  /* and prefetch the next rows */
            for (int h = 0; h < SCORE_HEADS; h++)
                for (int r = 0; r < here; r++)
                    S[(size_t)(g * SCORE_HEADS + h) * s_stride + j0 + j + r] = out[r][h];
        }
    if (lanes) return;
    Dot4x4Float dot = float_kernel(bf16, kernel);
    size_t stride = len, size = bf16 ? sizeof(uint16_t) : sizeof(float);
    const char *c = (const char *)W->data + dtype_bytes(W->dtype, (size_t)j0 * stride);
    for (int j = 0; j < n; j += 4) {
        for (size_t b = 0; b < 4 * stride * size; b += 64)  /* the next 4 rows, meanwhile */
            __builtin_prefetch(c + (j + 4) * stride * size + b);
        for (int h0 = 0; h0 < H; h0 += 4) {
            const void *w[4];
            const float *x[4];
            float out[4][4];
            for (int k = 0; k < 4; k++) {  /* past the edges: repeat the last row, head */
                w[k] = c + (size_t)(j + k < n ? j + k : n - 1) * stride * size;
                x[k] = Q + (size_t)(h0 + k < H ? h0 + k : H - 1) * len;
            }
            dot(w, x, H - h0 < 4 ? H - h0 : 4, len, out);
            for (int t = 0; t < 4 && h0 + t < H; t++)
                for (int k = 0; k < 4 && j + k < n; k++)
                    S[(size_t)(h0 + t) * s_stride + j0 + j + k] = out[t][k];
        }
    }
}

/* The queries with 16 heads in the lanes, qT [H/16][len][16], for a rows_lanes scores kernel;
 * 0 where none fits (no SIMD, a q8 cache, heads not in groups of 16, rows over 1024). */
static int scores_in_lanes(float *qT, const float *Q, const Mat *W, int H, int kernel) {
    int len = W->cols, step;
    if (!score_kernel(kernel, W->dtype == DTYPE_BF16, 0, &step) || W->dtype == DTYPE_Q8 ||
        H % SCORE_HEADS || len > SCORE_MAX_LEN)
        return 0;
    for (int g = 0; g < H / SCORE_HEADS; g++)
        for (int k = 0; k < len; k++)
            for (int h = 0; h < SCORE_HEADS; h++)
                qT[((size_t)g * len + k) * SCORE_HEADS + h] =
                    Q[(size_t)(g * SCORE_HEADS + h) * len + k];
    return 1;
}

/* A bf16 cache's queries (already bf16 values) as pairs for score_pairs_avx512: word [g][k][h]
 * holds q[16g + h][2k] in its low half, q[16g + h][2k + 1] in its high half, as the cache's row
 * holds its numbers 2k and 2k + 1. 0 where that kernel is not built or does not fit. */
static int scores_in_pairs(uint32_t *pairs, const float *Q, const Mat *W, int H, int kernel) {
    int len = W->cols, step;
    if (!score_kernel(kernel, 1, 1, &step) || W->dtype != DTYPE_BF16 || H % SCORE_HEADS ||
        len % 2 || len / 2 > SCORE_MAX_LEN)
        return 0;
    for (int g = 0; g < H / SCORE_HEADS; g++)
        for (int k = 0; k < len / 2; k++)
            for (int h = 0; h < SCORE_HEADS; h++) {
                const float *q = Q + (size_t)(g * SCORE_HEADS + h) * len + 2 * k;
                pairs[((size_t)g * len / 2 + k) * SCORE_HEADS + h] =
                    f32_to_bf16(q[0]) | (uint32_t)f32_to_bf16(q[1]) << 16;
            }
    return 1;
}

/* A q8 cache's attention (-k q8) in int8, on every CPU the same sums: the queries' two parts
 * (c^KV's r numbers, k^R's) quantized apart as activations are, each head's weights
 * e^(S - max) s_j quantized to u8 per tile; int32 products, then floats. Returns the heads a
 * SIMD call takes, 0 for the portable loops: AVX-512 VNNI runs scores_q8_vnni and
 * weighted_q8_vnni where they fit (16 heads a call, r in blocks of 64), AVX-VNNI the 256-bit
 * ones (8 heads, r in blocks of 32). */
static int attention_q8_lanes(int kernel, int H, int r, int cols) {
    if ((cols - r) % 4 != 0) return 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (kernel == KERNEL_BEST && H % 16 == 0 && r % 64 == 0) return 16;
#endif
#if defined(__AVXVNNI__) && defined(__AVX2__) && defined(__FMA__)
    if ((kernel == KERNEL_BEST || kernel == KERNEL_AVX_VNNI) && H % 8 == 0 && r % 32 == 0)
        return 8;
#endif
    (void)kernel, (void)H, (void)r;
    return 0;
}

/* Each head's query as int8, its two parts apart (scale each: q_scale[0][h], [1][h]), and
 * -128 x each part's sum; with lanes (16 or 8), heads in the lanes for the SIMD scores:
 * q_words [H / lanes][cols / 4][lanes]. */
static void queries_q8(AttendScratch *a, const float *Q, int r, int cols, int lanes) {
    int H = a->heads;
    for (int h = 0; h < H; h++) {
        int8_t *q = a->q_int8 + (size_t)h * cols;
        const float *x = Q + (size_t)h * cols;
        int32_t sum[2] = {0, 0};
        quantize_activations(q, &a->q_scale[h], x, r, r);
        a->q_scale[H + h] = 0;
        if (cols > r) quantize_activations(q + r, &a->q_scale[H + h], x + r, cols - r, cols - r);
        for (int k = 0; k < cols; k++) sum[k >= r] += q[k];
        a->q_bias[h] = -128 * sum[0], a->q_bias[H + h] = -128 * sum[1];
    }
    for (int g = 0; lanes && g < H / lanes; g++)
        for (int k = 0; k < cols / 4; k++)
            for (int h = 0; h < lanes; h++)
                memcpy(&a->q_words[((size_t)g * (cols / 4) + k) * lanes + h],
                       a->q_int8 + (size_t)(lanes * g + h) * cols + 4 * k, 4);
}

/* The scores of a q8 cache's rows j0..j0+n-1 for every head: S[h][j] = aL sl_j qs_l + aR sr_j
 * qs_r, aL and aR the int8 products of the two parts; sets sl, sr: the rows' c^KV and k^R
 * scales. */
static void scores_tile_q8(float *S, size_t s_stride, const AttendScratch *a, const Mat *C, int r,
                           float *sl, float *sr, int j0, int n, int lanes) {
    int H = a->heads, cols = C->cols, groups = cols / C->group;
    const int8_t *rows = (const int8_t *)C->data + (size_t)j0 * cols;
    const float *qs_l = a->q_scale, *qs_r = a->q_scale + H;
    for (int j = 0; j < n; j++) {  /* and the next tile's scales meanwhile (they missed cache) */
        if (j0 + n + j < C->rows) __builtin_prefetch(C->scale + (size_t)(j0 + n + j) * groups);
        sl[j] = C->scale[(size_t)(j0 + j) * groups];
        sr[j] = cols > r ? C->scale[(size_t)(j0 + j) * groups + r / C->group] : 0;
    }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    for (int g = 0; lanes == 16 && g < H / 16; g++)
        scores_q8_vnni(S + (size_t)16 * g * s_stride + j0, s_stride, rows, cols, n, sl, sr,
                       a->q_words + (size_t)g * (cols / 4) * 16, a->q_bias + 16 * g,
                       a->q_bias + H + 16 * g, qs_l + 16 * g, qs_r + 16 * g, r, cols);
#endif
#if defined(__AVXVNNI__) && defined(__AVX2__) && defined(__FMA__)
    for (int g = 0; lanes == 8 && g < H / 8; g++)
        scores_q8_avxvnni(S + (size_t)8 * g * s_stride + j0, s_stride, rows, cols, n, sl, sr,
                          a->q_words + (size_t)g * (cols / 4) * 8, a->q_bias + 8 * g,
                          a->q_bias + H + 8 * g, qs_l + 8 * g, qs_r + 8 * g, r, cols);
#endif
    if (lanes) return;
    for (int j = 0; j < n; j++)
        for (int h = 0; h < H; h++) {
            const int8_t *q = a->q_int8 + (size_t)h * cols, *c = rows + (size_t)j * cols;
            int32_t sum_l = 0, sum_r = 0;
            for (int k = 0; k < r; k++) sum_l += q[k] * c[k];
            for (int k = r; k < cols; k++) sum_r += q[k] * c[k];
            S[(size_t)h * s_stride + j0 + j] =
                MULADD((float)sum_l, qs_l[h] * sl[j], (float)sum_r * (qs_r[h] * sr[j]));
        }
}

/* One head's weights for a tile's weighted sum on a q8 cache: w_j = e_j sl_j (e^(S - max) times
 * the row's c^KV scale) as u8, w_j ~ q_j x max_j w_j / 255, zero past n up to a multiple of 4.
 * Returns that scale (NaN where a w_j is NaN or infinite, so that it reaches the logits). */
static float tile_weights_q8(uint8_t *q, const float *e, const float *sl, int n) {
    float w[ATT_ROWS], top = 0, poison = 0;
#pragma omp simd reduction(max : top) reduction(+ : poison)
    for (int j = 0; j < n; j++) {
        w[j] = e[j] * sl[j];
        top = w[j] > top ? w[j] : top;
        poison += w[j] * 0.0f;
    }
    float to_u8 = top > 0 && poison == 0 ? 255.0f / top : 0;  /* 0: all weights 0 */
    if (isinf(to_u8)) to_u8 = 0;  /* a subnormal largest weight: as good as 0 */
#pragma omp simd
    for (int j = 0; j < n; j++) q[j] = (uint8_t)(int)rintf(w[j] * to_u8);
    for (int j = n; j < (n + 3) / 4 * 4; j++) q[j] = 0;
    return poison == 0 ? top / 255.0f : NAN;
}

/* A q8 cache's weighted sums over rows j0..j0+n-1 of C: each head's weights e^(S - max) sl_j
 * (e: p [H][ATT_ROWS]) as u8 w (tile_weights_q8), then sums[h][i] += w_scale[h] x
 * sum_{j<n} w[h][j] c_j[i] for i < r, int32 sums 64 columns at a time. */
static void weighted_tile_q8(float *sums, int r, const float *p, const float *sl, uint8_t *w,
                             float *w_scale, const Mat *C, int H, int j0, int n, int lanes) {
    const int8_t *rows = (const int8_t *)C->data + (size_t)j0 * C->cols;
    size_t stride = C->cols;
    for (int h = 0; h < H; h++)
        w_scale[h] = tile_weights_q8(w + h * ATT_ROWS, p + h * ATT_ROWS, sl, n);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (lanes == 16) weighted_q8_vnni(sums, r, w, w_scale, rows, stride, H, n);
#endif
#if defined(__AVXVNNI__) && defined(__AVX2__) && defined(__FMA__)
    if (lanes == 8) weighted_q8_avxvnni(sums, r, w, w_scale, rows, stride, H, n);
#endif
    if (lanes) return;
    for (int h = 0; h < H; h++)
        for (int c0 = 0; c0 < r; c0 += 64) {
            int cols = r - c0 < 64 ? r - c0 : 64;
            int32_t acc[64] = {0};
            for (int j = 0; j < n; j++) {
                int32_t wj = w[(size_t)h * ATT_ROWS + j];
                for (int i = 0; i < cols; i++) acc[i] += wj * rows[(size_t)j * stride + c0 + i];
            }
            float *out = sums + (size_t)h * r + c0;
            for (int i = 0; i < cols; i++) out[i] = MULADD(w_scale[h], (float)acc[i], out[i]);
        }
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
/* weighted_rows_block's full block with AVX2 (4 heads x 16 columns: 8 registers of sums), the
 * same FMAs in the same order. From the plain C, GCC kept one of the 8 sums on the stack, a
 * store and a load in every row's chain: the weighted sums took 2.6x the scores' time. */
static void weighted_rows_avx2(float *u, size_t u_stride, const float *p, size_t p_stride,
                               const float *c, size_t c_stride, int n) {
    __m256 acc[ATT_HEADS][2];
    for (int h = 0; h < ATT_HEADS; h++)
        for (int v = 0; v < 2; v++) acc[h][v] = _mm256_loadu_ps(u + h * u_stride + 8 * v);
    for (int j = 0; j < n; j++) {
        __m256 c0 = _mm256_loadu_ps(c + j * c_stride), c1 = _mm256_loadu_ps(c + j * c_stride + 8);
        IN_REGISTER(c0);
        IN_REGISTER(c1);
        for (int h = 0; h < ATT_HEADS; h++) {
            __m256 ph = _mm256_broadcast_ss(p + h * p_stride + j);
            acc[h][0] = _mm256_fmadd_ps(ph, c0, acc[h][0]);
            acc[h][1] = _mm256_fmadd_ps(ph, c1, acc[h][1]);
        }
    }
    for (int h = 0; h < ATT_HEADS; h++)
        for (int v = 0; v < 2; v++) _mm256_storeu_ps(u + h * u_stride + 8 * v, acc[h][v]);
}
#endif

/* u[h][i] += sum_{j<n} p[h][j] c[j][i] for heads x cols; the full block keeps u in registers. */
static void weighted_rows_block(float *u, size_t u_stride, const float *p, size_t p_stride,
                                const float *c, size_t c_stride, int heads, int cols, int n) {
    if (heads == ATT_HEADS && cols == WSUM_COLS) {
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
        weighted_rows_avx2(u, u_stride, p, p_stride, c, c_stride, n);
        return;
#endif
        float acc[ATT_HEADS][WSUM_COLS];
        for (int h = 0; h < ATT_HEADS; h++)
            for (int i = 0; i < WSUM_COLS; i++) acc[h][i] = u[h * u_stride + i];
        for (int j = 0; j < n; j++)
            for (int h = 0; h < ATT_HEADS; h++) {
                float ph = p[h * p_stride + j];
                for (int i = 0; i < WSUM_COLS; i++)
                    acc[h][i] = MULADD(ph, c[j * c_stride + i], acc[h][i]);
            }
        for (int h = 0; h < ATT_HEADS; h++)
            for (int i = 0; i < WSUM_COLS; i++) u[h * u_stride + i] = acc[h][i];
        return;
    }
    for (int j = 0; j < n; j++)  /* edges: the same sums in the same order, from memory */
        for (int h = 0; h < heads; h++) {
            float ph = p[h * p_stride + j];
            for (int i = 0; i < cols; i++)
                u[h * u_stride + i] = MULADD(ph, c[j * c_stride + i], u[h * u_stride + i]);
        }
}

/* u[h][c0..c1) += sum_{j<n} P[h][j] W[j0 + j][c0..c1) for every head: ATT_HEADS heads by
 * WSUM_COLS columns at a time, bf16 and q8 rows as floats a slice at a time. */
static void weighted_tile(float *u, size_t u_stride, const float *P, size_t p_stride,
                          const Mat *W, int H, int c0, int c1, int j0, int n) {
    float block[ATT_ROWS * WSUM_COLS];
    for (int c = c0; c < c1; c += WSUM_COLS) {
        int cols = c1 - c < WSUM_COLS ? c1 - c : WSUM_COLS;
        size_t stride;
        const float *rows = rows_as_f32(W, j0, n, c, cols, block, &stride);
        for (int h0 = 0; h0 < H; h0 += ATT_HEADS)
            weighted_rows_block(u + h0 * u_stride + c, u_stride, P + (size_t)h0 * p_stride,
                                p_stride, rows, stride, H - h0 < ATT_HEADS ? H - h0 : ATT_HEADS,
                                cols, n);
    }
}

/* W^T P for every head, each thread a fixed range of the columns, tile by tile of the rows. */
static void weighted_rows_sum(float *u, size_t u_stride, const float *P, size_t p_stride,
                              const Mat *W, int H, int count) {
    int rows = W->rows, slices = (count + WSUM_COLS - 1) / WSUM_COLS;
    for (int h = 0; h < H; h++) memset(u + h * u_stride, 0, count * sizeof(float));
#pragma omp parallel if ((long long)rows * H * count > 32768)
    {
        int threads = 1, id = 0;
#ifdef _OPENMP
        threads = omp_get_num_threads();
        id = omp_get_thread_num();
#endif
        int c0 = slices * id / threads * WSUM_COLS, c1 = slices * (id + 1) / threads * WSUM_COLS;
        c1 = c1 < count ? c1 : count;
        for (int j0 = 0; j0 < rows && c0 < c1; j0 += ATT_ROWS) {
            int n = rows - j0 < ATT_ROWS ? rows - j0 : ATT_ROWS;
            const float *f32 = W->dtype == DTYPE_F32 ? (const float *)W->data : NULL;
            for (int j = j0 + ATT_ROWS; f32 && j < j0 + 2 * ATT_ROWS && j < rows; j++)
                for (int b = c0; b < c1; b += 16)  /* the next tile, meanwhile: 65536 rows */
                    __builtin_prefetch(f32 + (size_t)j * W->cols + b);  /* 113 -> 148 GFLOP/s */
            weighted_tile(u, u_stride, P + j0, p_stride, W, H, c0, c1, j0, n);
        }
    }
}

/* Rows per tile for a cache's rows: ATT_ROWS, halved while a tile is over ATT_TILE_BYTES, so
 * that it stays in L2 between its scores and its weighted sums (Zen 2 has 512 KiB a core; 256
 * rows of V2's f32 cache are 576 KiB; f32 takes 128, bf16 and q8 256). */
static int attention_tile(const Mat *C) {
    int tile = ATT_ROWS;
    while (tile > 16 && dtype_bytes(C->dtype, (size_t)tile * C->cols) > ATT_TILE_BYTES) tile /= 2;
    return tile;
}

/* A token's rows go in splits of whole tiles (tile rows each), at most ATT_MAX_SPLITS splits: a
 * function of rows alone, so the sums, and the answer, do not change with the number of threads.
 * Each split costs its sums zeroed, then merged (H x r floats each), so a split takes at least
 * ATT_SPLIT_TILES tiles: one tile a split had attention over 8 layers x 8,192 rows of a q8
 * cache take 4.2-4.3 ms per token, four 3.4-3.5 (f32: 9.5-9.9 -> 8.9; 2,048 rows q8: 1.1 ->
 * 0.9; Zen 5, 2 threads). Threads past the splits wait: all 32 splits from 128 tiles on
 * (32,768 rows of a q8 cache, 16,384 of f32).
 * Returns the splits; *tiles: tiles per split. */
static int attention_splits(int rows, int tile, int *tiles) {
    int all = (rows + tile - 1) / tile;
    *tiles = (all + ATT_MAX_SPLITS - 1) / ATT_MAX_SPLITS;
    if (*tiles < ATT_SPLIT_TILES) *tiles = ATT_SPLIT_TILES;
    return (all + *tiles - 1) / *tiles;
}

/* e^x as expf gives it, to 2 ulp, in a loop the compiler turns into vectors: expf is a call per
 * number, and with it the softmax took a quarter of attention's time at depth 8192. x = n ln2
 * + f, |f| <= ln2 / 2 (ln2 in two parts, the first exact in n ln2), e^x = 2^n e^f, e^f by its
 * Taylor series to f^7 (the rest under 1e-8). x clamped to [-87, 88], where 2^n is a normal
 * float: e^x under e^-87 (1.6e-38) comes out as that. NaN stays NaN. */
static inline float exp_vectorized(float x) {
    float in = x > -87.0f ? x : -87.0f;
    in = in < 88.0f ? in : 88.0f;
    float n = rintf(in * 1.44269504f);
    float f = fmaf(n, -0.693359375f, in);
    f = fmaf(n, 2.12194440e-4f, f);
    float e = 1.0f / 5040;
    e = fmaf(e, f, 1.0f / 720);
    e = fmaf(e, f, 1.0f / 120);
    e = fmaf(e, f, 1.0f / 24);
    e = fmaf(e, f, 1.0f / 6);
    e = fmaf(e, f, 0.5f);
    e = fmaf(e, f, 1.0f);
    e = fmaf(e, f, 1.0f);
    int32_t bits = ((int32_t)n + 127) * (1 << 23);
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return x == x ? e * two_n : x;
}

/* One head's part of a tile in attend_latents: its scores s scaled in place; a new running max
 * shrinks the split's sums and total so far; then e = e^(s - max) (rounded to bf16 for a bf16
 * cache, and also packed as bf16 pairs where pairs is given), added to total. */
static void tile_probabilities(float *s, int n, float scale, float *max, double *total,
                               float *sums, int r, int bf16, float *e, uint32_t *pairs) {
    float top = *max;
#pragma omp simd reduction(max : top)
    for (int j = 0; j < n; j++) {
        s[j] *= scale;
        top = s[j] > top ? s[j] : top;
    }
    if (top > *max) {  /* a new max: the sums so far shrink */
        float shrink = expf(*max - top);
        for (int i = 0; *total > 0 && i < r; i++) sums[i] *= shrink;
        *total *= shrink;
        *max = top;
    }
    float m = *max;
    double tile_total = 0;
#pragma omp simd
    for (int j = 0; j < n; j++) e[j] = exp_vectorized(s[j] - m);
    if (bf16) {
#pragma omp simd
        for (int j = 0; j < n; j++) e[j] = bf16_rounded(e[j]);
    }
#pragma omp simd reduction(+ : tile_total)
    for (int j = 0; j < n; j++) tile_total += e[j];
    *total += tile_total;
    if (!pairs) return;
    uint32_t bits[ATT_ROWS + 1];  /* e as bf16 is the top half of its bits */
    memcpy(bits, e, n * sizeof(float));
    bits[n] = 0;  /* an odd last row's partner (weighted_pairs_avx512 pairs it with zeros) */
    for (int j = 0; j < n; j += 2) pairs[j / 2] = bits[j] >> 16 | (bits[j + 1] & 0xffff0000u);
}

/* attend_latents by given kernels (the tests run each). Each split, on one thread, goes tile by
 * tile: the tile's scores for every head, then, while its rows are still in cache, its share of
 * the weighted sum with e^(S - m) under a running max m per head (online softmax: a new max
 * shrinks what the split summed by e^(m_old - m_new)). Then the splits meet, head by head:
 * u_h = sum_s e^(m_s - M) sums_s / sum_s e^(m_s - M) total_s, M the largest m_s. Against
 * scores, softmax and weighted sums each over all rows (the cache read twice), 16 heads x 8 layers
 * of an f32 cache (Zen 5, 2 threads): 8,400 rows 14.1 -> 9.7 ms, 32,768 rows 55.9 -> 30.7 ms. */
static void attend_latents_with(float *u, size_t u_stride, float *S, const float *Q,
                                const Mat *C, int r, float scale, AttendScratch *a, int kernel) {
    int rows = C->rows, H = a->heads, tile = attention_tile(C), tiles;
    int splits = attention_splits(rows, tile, &tiles);
    int bf16 = C->dtype == DTYPE_BF16, threads = 1;
    if (bf16) {  /* a bf16 cache meets bf16 queries and probabilities, on every CPU */
#pragma omp simd
        for (size_t i = 0; i < (size_t)H * C->cols; i++) a->q_bf16[i] = bf16_rounded(Q[i]);
        Q = a->q_bf16;
    }
    int q8 = C->dtype == DTYPE_Q8, lanes = q8 ? attention_q8_lanes(kernel, H, r, C->cols) : 0;
    if (q8) queries_q8(a, Q, r, C->cols, lanes);
    int pairs = bf16 && scores_in_pairs(a->q_pairs, Q, C, H, kernel);
    int in_lanes = !pairs && scores_in_lanes(a->qT, Q, C, H, kernel);
    int weighted_pairs = 0;
#if defined(__AVX512BF16__)
    weighted_pairs = bf16 && kernel == KERNEL_BEST && H % 8 == 0 && r % 32 == 0;
#endif
#ifdef _OPENMP
    threads = omp_get_max_threads() < a->threads ? omp_get_max_threads() : a->threads;
    if (omp_in_parallel()) threads = 1;  /* a prompt's tokens, each on its own thread */
#endif
#pragma omp parallel num_threads(threads) if ((long long)rows * H * C->cols > 32768)
    {
        int id = 0;
#ifdef _OPENMP
        id = omp_get_thread_num();
#endif
        float *p = a->p + (size_t)id * H * ATT_ROWS;
        uint32_t *p_pairs = a->p_pairs + (size_t)id * H * ATT_ROWS / 2;
        uint8_t *w_int8 = a->w_int8 + id * w_int8_stride(H);
        float *w_scale = a->w_scale + id * w_scale_stride(H);
#pragma omp for schedule(dynamic, 1)
        for (int sp = 0; sp < splits; sp++) {
            float *sums = a->sums + (size_t)sp * H * r, *max = a->max + (size_t)sp * H;
            double *total = a->total + (size_t)sp * H;
            memset(sums, 0, (size_t)H * r * sizeof(float));
            for (int h = 0; h < H; h++) max[h] = -INFINITY, total[h] = 0;
            int end = (sp + 1) * tiles * tile < rows ? (sp + 1) * tiles * tile : rows;
            for (int j0 = sp * tiles * tile; j0 < end; j0 += tile) {
                int n = end - j0 < tile ? end - j0 : tile;
                const float *qT = pairs ? (const float *)a->q_pairs : in_lanes ? a->qT : NULL;
                float sl[ATT_ROWS], sr[ATT_ROWS];  /* q8: the rows' c^KV and k^R scales */
                if (q8) scores_tile_q8(S, rows, a, C, r, sl, sr, j0, n, lanes);
                else scores_tile(S, rows, Q, qT, pairs, C, H, j0, n, kernel);
                for (int h = 0; h < H; h++)
                    tile_probabilities(S + (size_t)h * rows + j0, n, scale, &max[h], &total[h],
                                       sums + (size_t)h * r, r, bf16, p + h * ATT_ROWS,
                                       weighted_pairs ? p_pairs + h * ATT_ROWS / 2 : NULL);
                if (q8) {
                    weighted_tile_q8(sums, r, p, sl, w_int8, w_scale, C, H, j0, n, lanes);
                    continue;
                }
#if defined(__AVX512BF16__)
                if (weighted_pairs) {
                    weighted_pairs_avx512(sums, r, p_pairs, ATT_ROWS / 2,
                                          (const uint16_t *)C->data + (size_t)j0 * C->cols,
                                          C->cols, H, n);
                    continue;
                }
#endif
                weighted_tile(sums, r, p, ATT_ROWS, C, H, 0, r, j0, n);
            }
        }
#pragma omp for schedule(static)
        for (int h = 0; h < H; h++) {
            float top = -INFINITY, *out = u + (size_t)h * u_stride;
            double all = 0;
            for (int sp = 0; sp < splits; sp++) top = fmaxf(top, a->max[(size_t)sp * H + h]);
            for (int sp = 0; sp < splits; sp++)
                all += a->total[(size_t)sp * H + h] * exp((double)a->max[(size_t)sp * H + h] - top);
            memset(out, 0, r * sizeof(float));
            for (int sp = 0; sp < splits; sp++) {
                float f = (float)(exp((double)a->max[(size_t)sp * H + h] - top) / all);
                const float *sums = a->sums + ((size_t)sp * H + h) * r;
                for (int i = 0; i < r; i++) out[i] += f * sums[i];
            }
        }
    }
}

static void attend_latents(float *u, size_t u_stride, float *S, const float *Q, const Mat *C,
                           int r, float scale, AttendScratch *a) {
    attend_latents_with(u, u_stride, S, Q, C, r, scale, a, KERNEL_BEST);
}

/* attend_latents' scratch for H heads, r sums and rows width wide, on every thread this
 * process may run. */
static void attend_scratch_init(AttendScratch *a, int H, int r, int width) {
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    *a = (AttendScratch){floats((size_t)H * width), floats((size_t)ATT_MAX_SPLITS * H * r),
                         floats((size_t)ATT_MAX_SPLITS * H),
                         xcalloc((size_t)ATT_MAX_SPLITS * H, sizeof(double)),
                         floats((size_t)threads * H * ATT_ROWS), floats((size_t)H * width),
                         xcalloc((size_t)H * (width + 1) / 2, sizeof(uint32_t)),
                         xcalloc((size_t)threads * H * ATT_ROWS / 2, sizeof(uint32_t)),
                         xcalloc((size_t)H * width, 1),
                         xcalloc((size_t)H * (width + 3) / 4, sizeof(int32_t)), floats(2 * H),
                         xcalloc(2 * (size_t)H, sizeof(int32_t)),
                         xcalloc_huge(threads * w_int8_stride(H)),
                         floats(threads * w_scale_stride(H)),
                         threads, H};
}

static void attend_scratch_free(AttendScratch *a) {
    void *bufs[] = {a->qT,     a->sums,    a->max,     a->total,  a->p,      a->q_bf16,
                    a->q_pairs, a->p_pairs, a->q_int8, a->q_words, a->q_scale, a->q_bias,
                    a->w_int8,  a->w_scale};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
}

/* ------------------------------------------------------------------------------------------ */
/* Threads that survive a busy machine. OpenMP's threads meet at a barrier after every        */
/* parallel loop. When another process takes a core, a thread often waits there for one that  */
/* is not running: measured on 2 cores with a busy loop on one, decoding fell to 25% of its    */
/* idle speed with 2 threads, and 1 thread kept 50%. Passive waiting does not fix it for small */
/* models (their loops are microseconds: the built-in model fell from 3,980 to 740 tok/s idle). */
/* So each decode step (or training step) is timed, in periods of TUNE_PERIOD steps. Once the  */
/* steps are erratic (the mean over the fastest: a thread descheduled now and then), the tuner */
/* tries a few steps with one thread fewer and a few with one more; the fastest count         */
/* stays. Steady steps mean an idle machine, where trials only cost (a 1-thread trial is half  */
/* speed): then one comes only every TUNE_QUIET steps, for a load that slows every step alike. */
/* OMP_NUM_THREADS sets the most it uses.                                                     */
/* ------------------------------------------------------------------------------------------ */

#define TUNE_PERIOD 16      /* steps per period */
#define TUNE_TRIAL 4        /* steps per trial; the first is not counted */
#define TUNE_ERRATIC 1.5    /* a period is erratic when its mean step is this over its fastest */
#define TUNE_QUIET 512      /* steady steps: trials after this many steps without any */

static void tuner_init(ThreadTuner *t) {
    memset(t, 0, sizeof *t);
    t->max = 1;
#ifdef _OPENMP
    t->max = omp_get_max_threads();
#endif
    t->n = t->max;
}

/* The threads for this step: the current count, or a neighbour on trial at a period's end. */
static void tuner_begin(ThreadTuner *t) {
    int phase = t->steps, first = TUNE_PERIOD - 2 * TUNE_TRIAL;
    int candidate = !t->trials || phase < first ? 0 : phase < first + TUNE_TRIAL ? t->n - 1
                                                                                : t->n + 1;
    if (phase == 0) t->usual = t->usual_steps = t->won = 0;
    if (phase == first || phase == first + TUNE_TRIAL) t->trial_time = t->trial_steps = 0;
    t->trial = t->usual_steps > 0 && candidate >= 1 && candidate <= t->max ? candidate : 0;
#ifdef _OPENMP
    omp_set_num_threads(t->trial ? t->trial : t->n);
#endif
    t->start = now_seconds();
}

/* A trial's step time: a trial whose mean step is 10% faster than the period's usual mean
 * becomes the usual count. Means, not medians: the rare step that waits milliseconds for a
 * descheduled thread is what a busy machine costs. */
static void tuner_trial_step(ThreadTuner *t, double dt) {
    if (t->trial_steps++ == 0) return;  /* the first step of a trial is not counted */
    t->trial_time += dt;
    if (t->trial_steps < TUNE_TRIAL) return;
    double mean = t->trial_time / (TUNE_TRIAL - 1);
    if (mean < 0.9 * t->usual / t->usual_steps) {  /* the winner is the next trial's baseline */
        t->n = t->trial;
        t->usual = mean * t->usual_steps;
        t->won = 1;
    }
}

/* The step's time: into the period's usual sum (and fastest step), or the trial's. Erratic
 * usual steps start the trials at once; at the period's end, the next period has trials if a
 * trial won, the steps were erratic, or it is time. */
static void tuner_record(ThreadTuner *t, double dt) {
    if (t->trial) tuner_trial_step(t, dt);
    else {
        t->fastest = t->usual_steps == 0 || dt < t->fastest ? dt : t->fastest;
        t->usual += dt;
        t->usual_steps++;
    }
    int erratic = t->usual_steps >= 4 && t->usual > TUNE_ERRATIC * t->fastest * t->usual_steps;
    if (erratic && !t->trials) {  /* trials now, not at the period's end */
        t->trials = 1;
        t->quiet = 0;
        t->steps = TUNE_PERIOD - 2 * TUNE_TRIAL;
        return;
    }
    if (++t->steps < TUNE_PERIOD) return;
    t->quiet = t->trials ? 0 : t->quiet + TUNE_PERIOD;
    t->trials = t->won || erratic || t->quiet >= TUNE_QUIET;
    t->steps = 0;
}

static void tuner_end(ThreadTuner *t) { tuner_record(t, now_seconds() - t->start); }

/* Back to every thread for whatever runs next. */
static void tuner_done(ThreadTuner *t) {
#ifdef _OPENMP
    omp_set_num_threads(t->max);
#endif
    (void)t;
}

/* ------------------------------------------------------------------------------------------ */
/* Loading: the file layout, checks, mmap and huge pages                                       */
/*                                                                                            */
/*   offset 0     header (struct Config, 512 bytes: magic "DSV2", version, hyper-parameters)   */
/*   offset 512   tensors, each starting at a multiple of 64, in the order of layout_weights:  */
/*                  model.embed_tokens.weight                                                 */
/*                  per layer: input_layernorm, the attention tensors (q_proj, or q_a_proj,    */
/*                  q_a_layernorm, q_b_proj; kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj,     */
/*                  o_proj), post_attention_layernorm, then for an MoE layer the router        */
/*                  (mlp.gate) and experts 0..E-1 (gate, up, down), then the dense MLP or the   */
/*                  shared experts (gate, up, down)                                            */
/*                  model.norm.weight, lm_head.weight                                          */
/*                a matrix: [rows][cols] in the file's dtype; a q8 matrix is int8 [rows][cols] */
/*                followed by its own aligned block of float32 scales [rows][cols / q8_group]; */
/*                vectors (norms) and the router are always float32                            */
/*   optional     the tokenizer blob (header.tokenizer_offset, tokenizer_size)                  */
/*   file_size    the header's total: nothing follows                                          */
/*                                                                                            */
/* export.py writes the same walk (tensor_plan); `./dsv2 FILE -m layout` prints this one and   */
/* `export.py --print-layout` the one it wrote, and make test compares them.                   */
/* ------------------------------------------------------------------------------------------ */

/* Where one stored block lies, for -m layout, training and the tests. */
typedef struct {
    char name[96];
    const char *storage;  /* "f32", "bf16", "q8", or "q8-scales" */
    size_t offset, bytes;
    int rows, cols;       /* rows = 0 for a vector */
} TensorInfo;

/* Walks the layout: with base NULL it only measures; with base set, every Mat points into it. */
typedef struct {
    const char *base;
    size_t offset;
    int weight_dtype, q8_group;
    TensorInfo *info;     /* optional: filled per block */
    int n_tensors;
    const char *prefix;   /* the name of the block being taken: prefix + name */
} Cursor;

static const void *take(Cursor *cur, const char *name, int rows, int cols, const char *storage,
                        size_t bytes) {
    if (bytes > ((size_t)1 << 50) || cur->offset > ((size_t)1 << 50))
        die("config: the tensors would take more than 1 PiB (%s%s)", cur->prefix ? cur->prefix : "",
            name);
    cur->offset = (cur->offset + TENSOR_ALIGN - 1) / TENSOR_ALIGN * TENSOR_ALIGN;
    const void *p = cur->base ? cur->base + cur->offset : NULL;
    if (cur->info) {
        TensorInfo *t = &cur->info[cur->n_tensors];
        *t = (TensorInfo){.storage = storage,
                          .offset = cur->offset,
                          .bytes = bytes,
                          .rows = rows,
                          .cols = cols};
        snprintf(t->name, sizeof t->name, "%s%s", cur->prefix ? cur->prefix : "", name);
    }
    cur->n_tensors++;
    cur->offset += bytes;
    return p;
}

static Mat take_mat(Cursor *cur, const char *name, int rows, int cols, int dtype) {
    int quantized = dtype == DTYPE_Q8 || dtype == DTYPE_Q4;
    Mat m = {NULL, NULL, dtype, rows, cols, quantized ? cur->q8_group : cols};
    if (cols % m.group) die("q8/q4 group %d does not divide a matrix width %d", m.group, cols);
    m.data = take(cur, name, rows, cols, storage_name(dtype),
                  dtype_bytes(dtype, (size_t)rows * cols));
    if (quantized)
        m.scale = take(cur, name, rows, cols / m.group,
                       dtype == DTYPE_Q8 ? "q8-scales" : "q4-scales",
                       (size_t)rows * (cols / m.group) * sizeof(float));
    return m;
}

static const float *take_vec(Cursor *cur, const char *name, int n) {
    return take(cur, name, 0, n, "f32", (size_t)n * sizeof(float));
}

/* One layer's attention tensors, in file order. */
static void layout_attention(Layer *L, const Config *c, Cursor *cur) {
    int D = c->hidden_size, H = c->num_attention_heads, W = cur->weight_dtype, r = c->kv_lora_rank;
    int dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim, dq = dn + dr, rq = c->q_lora_rank;
    if (rq > 0) {
        L->q_a_proj = take_mat(cur, "self_attn.q_a_proj.weight", rq, D, W);
        L->q_a_norm = take_vec(cur, "self_attn.q_a_layernorm.weight", rq);
        L->q_b_proj = take_mat(cur, "self_attn.q_b_proj.weight", H * dq, rq, W);
    } else {
        L->q_proj = take_mat(cur, "self_attn.q_proj.weight", H * dq, D, W);
    }
    L->kv_a_proj = take_mat(cur, "self_attn.kv_a_proj_with_mqa.weight", r + dr, D, W);
    L->kv_a_norm = take_vec(cur, "self_attn.kv_a_layernorm.weight", r);
    L->kv_b_proj = take_mat(cur, "self_attn.kv_b_proj.weight", H * (dn + c->v_head_dim), r, W);
    L->o_proj = take_mat(cur, "self_attn.o_proj.weight", D, H * c->v_head_dim, W);
}

/* One layer's FFN tensors: router and experts (MoE), then the dense MLP or shared experts. */
static void layout_ffn(Layer *L, const Config *c, Cursor *cur, char *prefix, size_t prefix_size) {
    int D = c->hidden_size, W = cur->weight_dtype, Im = c->moe_intermediate_size;
    size_t base = strlen(prefix);
    int64_t width = L->is_moe ? (int64_t)Im * c->n_shared_experts : c->intermediate_size;
    if (width > (1 << 24))
        die("config: the shared experts' width %lld is out of range", (long long)width);
    if (L->is_moe) {
        L->router = take_mat(cur, "mlp.gate.weight", c->n_routed_experts, D, DTYPE_F32);
        for (int e = 0; e < c->n_routed_experts; e++) {
            snprintf(prefix + base, prefix_size - base, "mlp.experts.%d.", e);
            L->expert_gate[e] = take_mat(cur, "gate_proj.weight", Im, D, W);
            L->expert_up[e] = take_mat(cur, "up_proj.weight", Im, D, W);
            L->expert_down[e] = take_mat(cur, "down_proj.weight", D, Im, W);
        }
    }
    snprintf(prefix + base, prefix_size - base, "%s", L->is_moe ? "mlp.shared_experts." : "mlp.");
    L->has_mlp = width > 0;
    if (L->has_mlp) {
        L->mlp_gate = take_mat(cur, "gate_proj.weight", (int)width, D, W);
        L->mlp_up = take_mat(cur, "up_proj.weight", (int)width, D, W);
        L->mlp_down = take_mat(cur, "down_proj.weight", D, (int)width, W);
    }
    prefix[base] = '\0';
}

/* The one walk of the checkpoint layout (the loader, the trainer and the tests use it; the GPU
 * upload reads the Weights it fills). Returns the end offset. */
static size_t layout_weights(Weights *w, Cursor *cur) {
    const Config *c = &w->cfg;
    int D = c->hidden_size, W = cur->weight_dtype;
    char prefix[64] = "";
    cur->prefix = prefix;
    w->embed = take_mat(cur, "model.embed_tokens.weight", c->vocab_size, D, W);
    for (int l = 0; l < c->num_hidden_layers; l++) {
        Layer *L = &w->layers[l];
        snprintf(prefix, sizeof prefix, "model.layers.%d.", l);
        L->is_moe = is_moe_layer(c, l);
        L->input_norm = take_vec(cur, "input_layernorm.weight", D);
        layout_attention(L, c, cur);
        L->post_attention_norm = take_vec(cur, "post_attention_layernorm.weight", D);
        layout_ffn(L, c, cur, prefix, sizeof prefix);
    }
    prefix[0] = '\0';
    w->final_norm = take_vec(cur, "model.norm.weight", D);
    w->lm_head = take_mat(cur, "lm_head.weight", c->vocab_size, D, W);
    cur->prefix = NULL;
    return cur->offset;
}

static void alloc_layers(Weights *w) {
    const Config *c = &w->cfg;
    w->layers = xcalloc(c->num_hidden_layers, sizeof(Layer));
    for (int l = 0; l < c->num_hidden_layers; l++) {
        Layer *L = &w->layers[l];
        L->expert_gate = xcalloc(c->n_routed_experts, sizeof(Mat));
        L->expert_up = xcalloc(c->n_routed_experts, sizeof(Mat));
        L->expert_down = xcalloc(c->n_routed_experts, sizeof(Mat));
    }
}

/* Every block of a config's layout, in file order (count in *n). */
static TensorInfo *layout_table(const Config *c, int *n) {
    Weights w = {.cfg = *c};
    alloc_layers(&w);
    Cursor measure = {NULL, HEADER_SIZE, c->dtype, c->q8_group, NULL, 0, NULL};
    layout_weights(&w, &measure);
    Cursor record = {NULL,
                     HEADER_SIZE,
                     c->dtype,
                     c->q8_group,
                     xcalloc(measure.n_tensors, sizeof(TensorInfo)),
                     0,
                     NULL};
    layout_weights(&w, &record);
    w.map = NULL;
    free_weights(&w);
    *n = record.n_tensors;
    return record.info;
}

/* -m layout: offset, bytes, name, shape and storage of every block, one per line. */
static void print_layout(const Weights *w) {
    int n;
    TensorInfo *t = layout_table(&w->cfg, &n);
    for (int i = 0; i < n; i++) {
        if (t[i].rows)
            printf("%zu %zu %s %dx%d %s\n", t[i].offset, t[i].bytes, t[i].name, t[i].rows,
                   t[i].cols, t[i].storage);
        else
            printf("%zu %zu %s %d %s\n", t[i].offset, t[i].bytes, t[i].name, t[i].cols,
                   t[i].storage);
    }
    if (w->cfg.tokenizer_offset)
        printf("%llu %llu tokenizer\n", (unsigned long long)w->cfg.tokenizer_offset,
               (unsigned long long)w->cfg.tokenizer_size);
    free(t);
}

/* Every header field within the range the code relies on, before anything is allocated: the
 * integers, the doubles (finite, in range) and the products the buffers are sized by (in 64
 * bits, so nothing overflows). export.py applies the same rules (check_header) before it writes. */
static void check_range(const char *name, long long v, long long lo, long long hi) {
    if (v < lo || v > hi) die("config %s = %lld is out of range [%lld, %lld]", name, v, lo, hi);
}

static void check_real(const char *name, double v, double lo, double hi) {
    if (!(v >= lo && v <= hi)) die("config %s = %g is out of range [%g, %g]", name, v, lo, hi);
}

/* The integer fields whose range does not depend on another field. */
static const struct { const char *name; size_t offset; int lo, hi; } header_ints[] = {
    {"vocab_size", offsetof(Config, vocab_size), 1, 1 << 24},
    {"hidden_size", offsetof(Config, hidden_size), 1, 1 << 16},
    {"num_hidden_layers", offsetof(Config, num_hidden_layers), 1, 1024},
    {"num_attention_heads", offsetof(Config, num_attention_heads), 1, 1024},
    {"q_lora_rank", offsetof(Config, q_lora_rank), 0, 1 << 16},
    {"kv_lora_rank", offsetof(Config, kv_lora_rank), 1, 1 << 16},
    {"qk_nope_head_dim", offsetof(Config, qk_nope_head_dim), 0, 4096},
    {"qk_rope_head_dim", offsetof(Config, qk_rope_head_dim), 2, 4096},
    {"v_head_dim", offsetof(Config, v_head_dim), 1, 4096},
    {"intermediate_size", offsetof(Config, intermediate_size), 0, 1 << 20},
    {"moe_intermediate_size", offsetof(Config, moe_intermediate_size), 0, 1 << 20},
    {"max_position_embeddings", offsetof(Config, max_position_embeddings), 1, 1 << 24},
    {"n_routed_experts", offsetof(Config, n_routed_experts), 0, 1 << 16},
    {"n_shared_experts", offsetof(Config, n_shared_experts), 0, 4096},
    {"num_experts_per_tok", offsetof(Config, num_experts_per_tok), 0, 4096},
    {"n_group", offsetof(Config, n_group), 0, 1 << 16},
    {"topk_group", offsetof(Config, topk_group), 0, 1 << 16},
    {"first_k_dense_replace", offsetof(Config, first_k_dense_replace), 0, 1024},
    {"moe_layer_freq", offsetof(Config, moe_layer_freq), 1, 1024},
    {"norm_topk_prob", offsetof(Config, norm_topk_prob), 0, 1},
    {"seq_aux", offsetof(Config, seq_aux), 0, 1},
};

static void validate_sizes(const Config *c) {
    for (size_t i = 0; i < sizeof header_ints / sizeof header_ints[0]; i++) {
        int32_t v;
        memcpy(&v, (const char *)c + header_ints[i].offset, sizeof v);
        check_range(header_ints[i].name, v, header_ints[i].lo, header_ints[i].hi);
    }
    if (c->qk_rope_head_dim % 2)
        die("config qk_rope_head_dim = %d must be even", c->qk_rope_head_dim);
    check_range("bos_token_id", c->bos_token_id, -1, c->vocab_size - 1);
    check_range("eos_token_id", c->eos_token_id, -1, c->vocab_size - 1);
    int q4 = c->dtype == DTYPE_Q4;  /* q4: two weights a byte, so even groups; at most 256 */
    check_range("q8_group", c->q8_group, q4 ? 2 : c->dtype == DTYPE_Q8 ? 1 : 0,
                q4 ? 256 : c->dtype == DTYPE_Q8 ? 4096 : 0);
    if (q4 && c->q8_group % 2) die("config q8_group = %d: q4 groups must be even", c->q8_group);
    long long H = c->num_attention_heads,
              per_head = c->qk_nope_head_dim + c->qk_rope_head_dim + c->v_head_dim;
    long long moe_width =
            (long long)c->moe_intermediate_size * (c->num_experts_per_tok + c->n_shared_experts);
    if (H * per_head > (1 << 20))
        die("config: %lld heads of %lld floats is more than 2^20", H, per_head);
    if (H * c->kv_lora_rank > (1 << 24))
        die("config: %lld heads x kv_lora_rank %d is more than 2^24", H, c->kv_lora_rank);
    if (moe_width > (1 << 24))
        die("config: the experts of one token are %lld wide, more than 2^24", moe_width);
    if ((long long)c->hidden_size * (c->num_experts_per_tok + 1) > (1 << 24))
        die("config: hidden_size x (num_experts_per_tok + 1) is more than 2^24");
}

/* Routing: a layer's K experts, their groups, and the method. */
static void validate_routing(const Config *c) {
    int any_dense = 0, any_moe = 0;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        if (is_moe_layer(c, l)) any_moe = 1;
        else any_dense = 1;
    }
    if (any_dense) check_range("intermediate_size", c->intermediate_size, 1, 1 << 20);
    if (c->topk_method != TOPK_GREEDY && c->topk_method != TOPK_GROUP_LIMITED_GREEDY)
        die("unknown topk_method %d", c->topk_method);
    if (!any_moe) return;
    check_range("moe_intermediate_size", c->moe_intermediate_size, 1, 1 << 20);
    check_range("num_experts_per_tok", c->num_experts_per_tok, 1, c->n_routed_experts);
    if (c->topk_method == TOPK_GROUP_LIMITED_GREEDY) {
        check_range("n_group", c->n_group, 1, c->n_routed_experts);
        if (c->n_routed_experts % c->n_group)
            die("config n_group = %d does not divide n_routed_experts = %d", c->n_group,
                c->n_routed_experts);
        check_range("topk_group", c->topk_group, 1, c->n_group);
        check_range("num_experts_per_tok", c->num_experts_per_tok, 1,
                    c->topk_group * (c->n_routed_experts / c->n_group));
    }
}

static void validate_config(const Config *c) {
    if (c->dtype < DTYPE_F32 || c->dtype > DTYPE_Q4) die("unknown weight dtype %d", c->dtype);
    validate_sizes(c);
    validate_routing(c);
    if (c->rope_scaling != ROPE_PLAIN && c->rope_scaling != ROPE_YARN)
        die("unknown rope_scaling type %d", c->rope_scaling);
    check_real("rms_norm_eps", c->rms_norm_eps, 1e-30, 0.5);
    check_real("rope_theta", c->rope_theta, 1.0 + 1e-9, 1e12);
    check_real("routed_scaling_factor", c->routed_scaling_factor, 1e-6, 1e4);
    check_real("aux_loss_alpha", c->aux_loss_alpha, 0, 1e3);
    if (c->rope_scaling == ROPE_YARN) {
        check_real("rope_scaling.factor", c->rope_factor, 1e-6, 1e6);
        check_range("original_max_position_embeddings", c->original_max_position_embeddings, 1,
                    1 << 24);
        check_real("rope_scaling.beta_fast", c->beta_fast, 1e-6, 1e6);
        check_real("rope_scaling.beta_slow", c->beta_slow, 1e-6, 1e6);
        check_real("rope_scaling.mscale", c->mscale, 0, 1e3);
        check_real("rope_scaling.mscale_all_dim", c->mscale_all_dim, 0, 1e3);
    }
}

/* The file's parts fit together: the tensors end where the tokenizer starts (or the file ends),
 * the tokenizer ends where the file ends, and the file on disk is as long as the header says. */
static void validate_extent(const Config *c, size_t tensors_end, size_t disk_size,
                            const char *path) {
    uint64_t file = c->file_size, tok_at = c->tokenizer_offset, tok_size = c->tokenizer_size;
    uint64_t aligned = (tensors_end + TENSOR_ALIGN - 1) / TENSOR_ALIGN * TENSOR_ALIGN;
    if (disk_size != file)
        die("%s is truncated or padded: %zu bytes on disk, header says %llu", path, disk_size,
            (unsigned long long)file);
    if (tok_at == 0 && tok_size == 0) {
        if (file != tensors_end)
            die("%s: the config describes %zu bytes of tensors but the file holds %llu (wrong "
                "header?)",
                path, tensors_end, (unsigned long long)file);
        return;
    }
    if (tok_at != aligned || tok_size < 8 || tok_size > file || tok_at > file - tok_size ||
        tok_at + tok_size != file)
        die("%s: tokenizer section out of bounds (offset %llu, %llu bytes; the tensors end at %zu, "
            "the file at %llu)", path, (unsigned long long)tok_at, (unsigned long long)tok_size,
            tensors_end, (unsigned long long)file);
}


/* The checkpoint's bytes in memory. WEIGHTS_MMAP maps the file and reads it in place (nothing is
 * copied; the OS pages it in). WEIGHTS_LOAD reads it into anonymous memory backed by huge pages:
 * decoding touches gigabytes per token, and with 4 KiB file pages the page walks cost more than
 * the reads (2.5x slower decode measured on a VM). AUTO loads when the model takes < 3/4 of RAM. */
static void *map_checkpoint(int fd, size_t size, int mode, const char *path) {
    double ram = (double)sysconf(_SC_PHYS_PAGES) * sysconf(_SC_PAGESIZE);
    if (mode == WEIGHTS_AUTO) mode = ram > 0 && size < 0.75 * ram ? WEIGHTS_LOAD : WEIGHTS_MMAP;
    /* A model that does not fit twice: drop each chunk's file cache once copied, leaving memory
     * that huge pages can use (else ~20% of a 17 GB model fell back to 4 KiB pages here). */
    int drop_cache = ram > 0 && 2.0 * size > ram;
    if (mode == WEIGHTS_MMAP) {
#ifdef MAP_POPULATE
        int populate = MAP_POPULATE; /* fault every page in now, not one expert at a time while
                                        decoding */
#else
        int populate = 0;
#endif
        void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE | populate, fd, 0);
        if (map == MAP_FAILED) die("cannot mmap %s: %s", path, strerror(errno));
        return map;
    }
    void *map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) die("cannot allocate %zu bytes for %s (try -w mmap)", size, path);
#ifdef MADV_HUGEPAGE
    madvise(map, size, MADV_HUGEPAGE);
#endif
    for (size_t done = 0; done < size;) {
        ssize_t got = pread(fd, (char *)map + done,
                            size - done < (64 << 20) ? size - done : (64 << 20), (off_t)done);
        if (got <= 0)
            die("cannot read %s: %s", path, got < 0 ? strerror(errno) : "unexpected end of file");
#ifdef POSIX_FADV_DONTNEED
        if (drop_cache) posix_fadvise(fd, (off_t)done, got, POSIX_FADV_DONTNEED);
#endif
        done += (size_t)got;
    }
    /* Left writable: mprotect to read-only here made every page fault afresh on its first read
     * on this VM (0.6-0.8 s of faults, paid by the first decode steps: 8-layer q8 decode of 32
     * tokens right after loading ran at 21-34 tok/s instead of 37-44). */
    return map;
}

static void load_weights(Weights *w, const char *path, int weights_mode) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open model %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) die("cannot stat %s: %s", path, strerror(errno));
    size_t size = (size_t)st.st_size;
    if (size < HEADER_SIZE) die("%s is not a dsv2 checkpoint (only %zu bytes)", path, size);
    if (pread(fd, &w->cfg, HEADER_SIZE, 0) != HEADER_SIZE) die("cannot read header of %s", path);
    const Config *c = &w->cfg;
    if (memcmp(c->magic, DSV2_MAGIC, 4) != 0)
        die("%s is not a dsv2 checkpoint (bad magic); convert it with export.py", path);
    if (c->version != DSV2_VERSION)
        die("%s has checkpoint version %u; this build reads version %d", path, c->version,
            DSV2_VERSION);
    validate_config(c);
    alloc_layers(w);
    Cursor measure = {NULL, HEADER_SIZE, c->dtype, c->q8_group, NULL, 0, NULL};
    validate_extent(c, layout_weights(w, &measure), size, path);
    w->map = map_checkpoint(fd, size, weights_mode, path);
    close(fd);
    w->map_size = size;
    Cursor fill = {(const char *)w->map, HEADER_SIZE, c->dtype, c->q8_group, NULL, 0, NULL};
    layout_weights(w, &fill);
}

static void free_weights(Weights *w) {
    for (int l = 0; l < w->cfg.num_hidden_layers; l++) {
        free(w->layers[l].expert_gate);
        free(w->layers[l].expert_up);
        free(w->layers[l].expert_down);
    }
    free(w->layers);
    if (w->map) munmap(w->map, w->map_size);
}


#ifdef DSV2_CUDA
/* The GPU build: dsv2.cu runs the forward pass; it reads the loaded Weights in place. Routing
 * stays on the host, the same code as the CPU path (the GPU sends E probabilities per token);
 * the RoPE/YaRN tables and the softmax scale are the host's too: one place computes them. */
static void route_for_gpu(void *ctx, const float *probs, int *idx, float *weight) {
    RunState *s = ctx;
    route_tokens(s->cfg, probs, idx, weight, &s->router);
}

static void *gpu_model_create(const Weights *w, RunState *s, const char *gpus) {
    return cuda_create(w, s->context, gpus, route_for_gpu, s, s->rope_cos, s->rope_sin,
                       (float)s->softmax_scale);
}
#endif
/* ------------------------------------------------------------------------- */
/* Tokenizer: byte-level BPE exactly as Hugging Face `tokenizers` runs it.     */
/*   encode: added tokens (leftmost-longest) -> pre-tokenizer regex splits    */
/*           -> BPE merges by rank on each piece's bytes                      */
/*   decode: token bytes -> lossy UTF-8 (one U+FFFD per maximal bad subpart)   */
/* export.py turns tokenizer.json into a blob (format in export.py): the      */
/* pre-tokenizer's regexes travel verbatim and run on the small regex engine  */
/* below, so each model's own rules (V2's, V3's) come from its file.          */
/* ------------------------------------------------------------------------- */

#define TOKENIZER_MAGIC "DSVT"
#define TOKENIZER_VERSION 1
enum { TOKEN_UNUSED = 0, TOKEN_BPE = 1, TOKEN_ADDED = 2, TOKEN_SPECIAL = 3 };
enum { CHAT_NONE = 0, CHAT_DEEPSEEK_V2 = 1, CHAT_DEEPSEEK_V3 = 2 };

/* UTF-8 decoding as WHATWG and Rust's from_utf8_lossy do it: streaming, and each maximal
 * subpart of an ill-formed sequence becomes one U+FFFD. */
typedef struct {
    uint32_t cp;
    int needed, seen;
    uint8_t lower, upper;
} Utf8Decoder;

/* Feeds one byte; writes 0, 1 or 2 code points to out (room for 2) and returns how many. */
static int utf8_feed(Utf8Decoder *d, uint8_t b, uint32_t *out) {
    if (d->needed == 0) {
        d->lower = 0x80; d->upper = 0xBF;
        if (b < 0x80) { out[0] = b; return 1; }
        if (b >= 0xC2 && b <= 0xDF) { d->needed = 1; d->cp = b & 0x1F; }
        else if (b >= 0xE0 && b <= 0xEF) {
            if (b == 0xE0) d->lower = 0xA0;
            if (b == 0xED) d->upper = 0x9F;  /* no surrogates */
            d->needed = 2; d->cp = b & 0x0F;
        } else if (b >= 0xF0 && b <= 0xF4) {
            if (b == 0xF0) d->lower = 0x90;
            if (b == 0xF4) d->upper = 0x8F;  /* nothing above U+10FFFF */
            d->needed = 3; d->cp = b & 0x07;
        } else { out[0] = 0xFFFD; return 1; }
        d->seen = 0;
        return 0;
    }
    if (b < d->lower || b > d->upper) { /* the sequence so far is one bad subpart; b starts afresh
                                         */
        d->needed = 0;
        out[0] = 0xFFFD;
        return 1 + utf8_feed(d, b, out + 1);
    }
    d->lower = 0x80; d->upper = 0xBF;
    d->cp = (d->cp << 6) | (b & 0x3F);
    if (++d->seen < d->needed) return 0;
    d->needed = 0;
    out[0] = d->cp;
    return 1;
}

/* Dies unless text is valid UTF-8: prompts are text, and a wrong byte would silently become U+FFFD.
 */
static void utf8_validate(const unsigned char *text, size_t len) {
    Utf8Decoder d = {0};
    uint32_t cp[2];
    size_t start = 0;
    for (size_t i = 0; i < len; i++) {
        if (d.needed == 0) start = i;
        int k = utf8_feed(&d, text[i], cp);
        if (k == 2 ||
            (k == 1 && cp[0] == 0xFFFD &&
             !(i >= 2 && text[i - 2] == 0xEF && text[i - 1] == 0xBF && text[i] == 0xBD)))
            die("the input is not valid UTF-8 (bad byte sequence at byte %zu)", k == 2 ? start : i);
    }
    if (d.needed) die("the input is not valid UTF-8 (it ends inside a character)");
}

static int utf8_encode(uint32_t cp, char *out) {
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | cp >> 6);
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | cp >> 12);
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | cp >> 18); out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* --- A small backtracking regex engine: the subset tokenizer.json files use. ---
 * Classes [...] with ranges and \s \S \d \p{L} \p{N} \p{M} \p{P} \p{S} (negations too), literals,
 * . ^ $, groups (...) (?:...), lookahead (?!...) (?=...), alternation, ? * + {m,n} and lazy forms.
 * Leftmost-first semantics like Oniguruma. The pattern compiles to a program of a few opcodes
 * that runs with an explicit backtrack stack, so long inputs cannot overflow the C stack. */

typedef struct { uint32_t lo, hi; } Range;
typedef struct { char name[16]; Range *ranges; int n; } Property;

#define CLASS_MAX_PROPS 8
typedef struct {
    Range *ranges;
    int n_ranges, cap_ranges;
    const Property *props[CLASS_MAX_PROPS];
    unsigned char prop_negated[CLASS_MAX_PROPS];
    int n_props, negated;
    uint64_t ascii[2];  /* membership of code points < 128, precomputed */
} CharClass;

enum { OP_CLASS, OP_SPLIT, OP_JMP, OP_MATCH, OP_EOL, OP_BOL, OP_LOOKAHEAD };
typedef struct {
    int op, x, y;
} ReInst; /* SPLIT: try x, then y. LOOKAHEAD: x = negative, y = continuation */

enum { NODE_CLASS, NODE_CAT, NODE_ALT, NODE_REPEAT, NODE_EOL, NODE_BOL, NODE_LOOK, NODE_EMPTY };
typedef struct {
    int kind, a, b, min, max, greedy;
} ReNode; /* max -1 = unbounded; LOOK: greedy = negative */

typedef struct {
    ReInst *code;
    int n_code, cap_code;
    CharClass *classes;
    int n_classes;
} Regex;

typedef struct {  /* parser state */
    const uint32_t *p;
    int n, at;
    ReNode *nodes;
    int n_nodes;
    Regex *re;
    const Property *props;
    int n_props;
    const char *source;
} ReParser;

_Noreturn static void regex_fail(const ReParser *ps, const char *why) {
    die("tokenizer pre-tokenizer regex: %s at character %d of \"%.60s\"", why, ps->at, ps->source);
}

static int new_node(ReParser *ps, int kind, int a, int b) {
    ps->nodes = realloc(ps->nodes, (size_t)(ps->n_nodes + 1) * sizeof(ReNode));
    if (!ps->nodes) die("out of memory");
    ps->nodes[ps->n_nodes] = (ReNode){kind, a, b, 1, 1, 1};
    return ps->n_nodes++;
}

static void class_add_range(CharClass *c, uint32_t lo, uint32_t hi) {
    if (c->n_ranges == c->cap_ranges) {
        c->cap_ranges = c->cap_ranges ? 2 * c->cap_ranges : 8;
        c->ranges = realloc(c->ranges, (size_t)c->cap_ranges * sizeof(Range));
        if (!c->ranges) die("out of memory");
    }
    c->ranges[c->n_ranges++] = (Range){lo, hi};
}

static void class_add_property(ReParser *ps, CharClass *c, const char *name, int negated) {
    for (int i = 0; i < ps->n_props; i++)
        if (!strcmp(ps->props[i].name, name)) {
            if (c->n_props == CLASS_MAX_PROPS) regex_fail(ps, "too many properties in one class");
            c->prop_negated[c->n_props] = (unsigned char)negated;
            c->props[c->n_props++] = &ps->props[i];
            return;
        }
    char why[64];
    snprintf(why, sizeof why, "unknown Unicode property %s", name);
    regex_fail(ps, why);
}

static int in_ranges(const Range *r, int n, uint32_t cp) {
    int lo = 0, hi = n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (cp < r[mid].lo) hi = mid - 1;
        else if (cp > r[mid].hi) lo = mid + 1;
        else return 1;
    }
    return 0;
}

static int class_has_slow(const CharClass *c, uint32_t cp) {
    int in = in_ranges(c->ranges, c->n_ranges, cp);
    for (int i = 0; !in && i < c->n_props; i++)
        in = in_ranges(c->props[i]->ranges, c->props[i]->n, cp) != c->prop_negated[i];
    return in != c->negated;
}

static inline int class_has(const CharClass *c, uint32_t cp) {
    if (cp < 128) return (int)((c->ascii[cp >> 6] >> (cp & 63)) & 1);
    return class_has_slow(c, cp);
}

static int compare_range(const void *a, const void *b) {
    uint32_t x = ((const Range *)a)->lo, y = ((const Range *)b)->lo;
    return (x > y) - (x < y);
}

/* Sorts and merges the ranges (binary search needs them disjoint) and fills the ASCII bitmap. */
static int finish_class(ReParser *ps, CharClass *c) {
    if (c->n_ranges > 1) qsort(c->ranges, c->n_ranges, sizeof(Range), compare_range);
    int n = 0;
    for (int i = 0; i < c->n_ranges; i++) {
        if (n && c->ranges[i].lo <= c->ranges[n - 1].hi + 1) {
            if (c->ranges[i].hi > c->ranges[n - 1].hi) c->ranges[n - 1].hi = c->ranges[i].hi;
        } else c->ranges[n++] = c->ranges[i];
    }
    c->n_ranges = n;
    for (uint32_t cp = 0; cp < 128; cp++)
        if (class_has_slow(c, cp)) c->ascii[cp >> 6] |= 1ull << (cp & 63);
    Regex *re = ps->re;
    re->classes = realloc(re->classes, (size_t)(re->n_classes + 1) * sizeof(CharClass));
    if (!re->classes) die("out of memory");
    re->classes[re->n_classes] = *c;
    int node = new_node(ps, NODE_CLASS, re->n_classes++, 0);
    return node;
}

static uint32_t peek(const ReParser *ps) { return ps->at < ps->n ? ps->p[ps->at] : 0; }
static int at_end(const ReParser *ps) { return ps->at >= ps->n; }

/* After a backslash: adds a class escape (\s, \p{..}, ...) to c, or returns the literal it denotes.
 */
static int parse_escape(ReParser *ps, CharClass *c, uint32_t *literal) {
    if (at_end(ps)) regex_fail(ps, "trailing backslash");
    uint32_t e = ps->p[ps->at++];
    switch (e) {
    case 's': class_add_property(ps, c, "White_Space", 0); return 0;
    case 'S': class_add_property(ps, c, "White_Space", 1); return 0;
    case 'd': class_add_property(ps, c, "Nd", 0); return 0;
    case 'D': class_add_property(ps, c, "Nd", 1); return 0;
    case 'p': case 'P': {
        char name[16];
        int n = 0;
        if (peek(ps) != '{') regex_fail(ps, "expected { after \\p");
        ps->at++;
        while (!at_end(ps) && peek(ps) != '}' && n < 15) name[n++] = (char)ps->p[ps->at++];
        name[n] = '\0';
        if (peek(ps) != '}') regex_fail(ps, "unterminated \\p{...}");
        ps->at++;
        int negated = e == 'P';
        if (name[0] == '^') { negated = !negated; memmove(name, name + 1, strlen(name)); }
        class_add_property(ps, c, name, negated);
        return 0;
    }
    case 'n': *literal = '\n'; return 1;
    case 'r': *literal = '\r'; return 1;
    case 't': *literal = '\t'; return 1;
    case 'f': *literal = '\f'; return 1;
    case 'v': *literal = '\v'; return 1;
    default:
        if ((e >= 'a' && e <= 'z') || (e >= 'A' && e <= 'Z') || (e >= '0' && e <= '9'))
            regex_fail(ps, "unsupported escape");
        *literal = e;  /* an escaped punctuation character stands for itself */
        return 1;
    }
}

static int parse_alternation(ReParser *ps);

static int parse_bracket_class(ReParser *ps) {
    CharClass c;
    memset(&c, 0, sizeof c);
    if (peek(ps) == '^') { c.negated = 1; ps->at++; }
    int first = 1;
    while (!at_end(ps) && (peek(ps) != ']' || first)) {
        first = 0;
        uint32_t lo = ps->p[ps->at++];
        if (lo == '\\' && !parse_escape(ps, &c, &lo)) continue;
        uint32_t hi = lo;
        if (peek(ps) == '-' && ps->at + 1 < ps->n && ps->p[ps->at + 1] != ']') {
            ps->at++;
            hi = ps->p[ps->at++];
            if (hi == '\\') {
                CharClass unused;
                memset(&unused, 0, sizeof unused);
                if (!parse_escape(ps, &unused, &hi))
                    regex_fail(ps, "class escape used as a range end");
            }
            if (hi < lo) regex_fail(ps, "reversed range");
        }
        class_add_range(&c, lo, hi);
    }
    if (at_end(ps)) regex_fail(ps, "unterminated [");
    ps->at++;
    return finish_class(ps, &c);
}

static int parse_atom(ReParser *ps) {
    uint32_t ch = ps->p[ps->at++];
    CharClass c;
    memset(&c, 0, sizeof c);
    switch (ch) {
    case '(': {
        int look = -1;
        if (peek(ps) == '?') {
            ps->at++;
            uint32_t k = ps->at < ps->n ? ps->p[ps->at++] : 0;
            if (k == '!') look = 1;
            else if (k == '=') look = 0;
            else if (k != ':') regex_fail(ps, "unsupported group type");
        }
        int inner = parse_alternation(ps);
        if (peek(ps) != ')') regex_fail(ps, "missing )");
        ps->at++;
        if (look < 0) return inner;
        int node = new_node(ps, NODE_LOOK, inner, 0);
        ps->nodes[node].greedy = look;
        return node;
    }
    case '[': return parse_bracket_class(ps);
    case '.': c.negated = 1; class_add_range(&c, '\n', '\n'); return finish_class(ps, &c);
    case '$': return new_node(ps, NODE_EOL, 0, 0);
    case '^': return new_node(ps, NODE_BOL, 0, 0);
    case '\\': {
        uint32_t lit;
        if (parse_escape(ps, &c, &lit)) class_add_range(&c, lit, lit);
        return finish_class(ps, &c);
    }
    case ')':
    case '|':
    case '*':
    case '+':
    case '?':
    case '{': regex_fail(ps, "unexpected operator");
    default: class_add_range(&c, ch, ch); return finish_class(ps, &c);
    }
    return -1;
}

static int parse_number(ReParser *ps) {
    int v = 0, digits = 0;
    while (peek(ps) >= '0' && peek(ps) <= '9' && v < 100000) {
        v = v * 10 + (int)(ps->p[ps->at++] - '0');
        digits++;
    }
    return digits ? v : -1;
}

static int parse_repeat(ReParser *ps) {
    int node = parse_atom(ps);
    for (;;) {
        uint32_t q = peek(ps);
        int min, max;
        if (q == '?') { min = 0; max = 1; }
        else if (q == '*') { min = 0; max = -1; }
        else if (q == '+') { min = 1; max = -1; }
        else if (q == '{') {
            int save = ps->at++;
            min = parse_number(ps);
            max = min;
            if (peek(ps) == ',') { ps->at++; max = parse_number(ps); }
            if (min < 0 || peek(ps) != '}' || (max >= 0 && max < min) || max > 1000) {
                ps->at = save;
                regex_fail(ps, "bad {m,n}");
            }
        } else return node;
        ps->at++;
        int r = new_node(ps, NODE_REPEAT, node, 0);
        ps->nodes[r].min = min;
        ps->nodes[r].max = max;
        if (peek(ps) == '?') { ps->nodes[r].greedy = 0; ps->at++; }
        else if (peek(ps) == '+') regex_fail(ps, "possessive quantifiers are not supported");
        node = r;
    }
}

static int parse_concat(ReParser *ps) {
    int node = -1;
    while (!at_end(ps) && peek(ps) != '|' && peek(ps) != ')') {
        int next = parse_repeat(ps);
        node = node < 0 ? next : new_node(ps, NODE_CAT, node, next);
    }
    return node < 0 ? new_node(ps, NODE_EMPTY, 0, 0) : node;
}

static int parse_alternation(ReParser *ps) {
    int node = parse_concat(ps);
    while (peek(ps) == '|') {
        ps->at++;
        int right = parse_concat(ps);
        node = new_node(ps, NODE_ALT, node, right);
    }
    return node;
}

static int node_nullable(const ReParser *ps, int i) {
    const ReNode *n = &ps->nodes[i];
    switch (n->kind) {
    case NODE_CLASS: return 0;
    case NODE_CAT: return node_nullable(ps, n->a) && node_nullable(ps, n->b);
    case NODE_ALT: return node_nullable(ps, n->a) || node_nullable(ps, n->b);
    case NODE_REPEAT: return n->min == 0 || node_nullable(ps, n->a);
    default: return 1;
    }
}

/* The most instructions a pattern may compile to: repeats are unrolled, so a{1000}{1000} would
 * be a million (found by the fuzzer); real pre-tokenizers need a few hundred. */
#define REGEX_MAX_CODE 100000

static int emit(ReParser *ps, int op, int x, int y) {
    Regex *re = ps->re;
    if (re->n_code >= REGEX_MAX_CODE)
        regex_fail(ps, "too large once its repeats are unrolled (over 100000 steps)");
    if (re->n_code == re->cap_code) {  /* doubling: unrolled repeats emit many */
        re->cap_code = re->cap_code ? 2 * re->cap_code : 64;
        re->code = realloc(re->code, (size_t)re->cap_code * sizeof(ReInst));
        if (!re->code) die("out of memory");
    }
    re->code[re->n_code] = (ReInst){op, x, y};
    return re->n_code++;
}

static void compile_node(ReParser *ps, int i) {
    ReNode n = ps->nodes[i];
    Regex *re = ps->re;
    switch (n.kind) {
    case NODE_CLASS: emit(ps, OP_CLASS, n.a, 0); break;
    case NODE_CAT: compile_node(ps, n.a); compile_node(ps, n.b); break;
    case NODE_EMPTY: break;
    case NODE_EOL: emit(ps, OP_EOL, 0, 0); break;
    case NODE_BOL: emit(ps, OP_BOL, 0, 0); break;
    case NODE_ALT: {
        int split = emit(ps, OP_SPLIT, 0, 0);
        re->code[split].x = re->n_code;
        compile_node(ps, n.a);
        int jmp = emit(ps, OP_JMP, 0, 0);
        re->code[split].y = re->n_code;
        compile_node(ps, n.b);
        re->code[jmp].x = re->n_code;
        break;
    }
    case NODE_LOOK: {
        int look = emit(ps, OP_LOOKAHEAD, n.greedy, 0);
        compile_node(ps, n.a);
        emit(ps, OP_MATCH, 0, 0);
        re->code[look].y = re->n_code;
        break;
    }
    case NODE_REPEAT: {
        for (int k = 0; k < n.min; k++) compile_node(ps, n.a);
        if (n.max < 0) {
            if (node_nullable(ps, n.a)) regex_fail(ps, "a repeated group that can match empty");
            int split = emit(ps, OP_SPLIT, 0, 0), body = re->n_code;
            compile_node(ps, n.a);
            emit(ps, OP_JMP, split, 0);
            re->code[split].x = n.greedy ? body : re->n_code;
            re->code[split].y = n.greedy ? re->n_code : body;
        } else {
            int first_split = re->n_code;
            for (int k = n.min; k < n.max; k++) {
                emit(ps, OP_SPLIT, re->n_code + 1, -1);
                compile_node(ps, n.a);
            }
            for (int pc = first_split; pc < re->n_code; pc++) /* every optional copy can exit to the
                                                                 end */
                if (re->code[pc].op == OP_SPLIT && re->code[pc].y == -1) {
                    re->code[pc].y = re->n_code;
                    if (!n.greedy) { re->code[pc].y = re->code[pc].x; re->code[pc].x = re->n_code; }
                }
        }
        break;
    }
    }
}

static void regex_compile(Regex *re, const char *pattern, size_t len, const Property *props,
                          int n_props) {
    memset(re, 0, sizeof *re);
    uint32_t *cps = xcalloc(len + 1, sizeof(uint32_t)), out[2];
    int n = 0;
    Utf8Decoder d = {0};
    for (size_t i = 0; i < len; i++) {
        int k = utf8_feed(&d, (uint8_t)pattern[i], out);
        for (int j = 0; j < k; j++) cps[n++] = out[j];
    }
    ReParser ps = {cps, n, 0, NULL, 0, re, props, n_props, pattern};
    int root = parse_alternation(&ps);
    if (!at_end(&ps)) regex_fail(&ps, "unbalanced )");
    compile_node(&ps, root);
    emit(&ps, OP_MATCH, 0, 0);
    free(ps.nodes);
    free(cps);
}

static void regex_free(Regex *re) {
    for (int i = 0; i < re->n_classes; i++) free(re->classes[i].ranges);
    free(re->classes);
    free(re->code);
}

/* The backtrack stack, and what keeps a backtracking engine polynomial. Without captures or
 * backreferences, whether the program can match from instruction pc at position pos depends on
 * (pc, pos) alone; a branch state reached a second time has already failed (its first visit was
 * explored to the end, or the match would have been returned), so it is cut. Marks survive
 * failed attempts at later start positions (this is what makes \s+$ linear on a long run of
 * spaces) and are undone when an attempt succeeds, since the states on its path did not fail.
 * Marking starts after REGEX_MEMO_AFTER steps of an attempt: most attempts are shorter.
 * A step budget backs this up: a pass of a regex over a piece may take REGEX_STEPS_PER_STATE
 * branch steps per (instruction, character) plus a constant; the real tokenizers need under 2. */
typedef struct {
    int *pc_pos;
    int n, cap;
    long long steps, budget;
    uint64_t *seen;          /* bit pc * width + pos: a branch state already visited */
    size_t seen_bits, width;
    size_t *touched;         /* the bits set, to clear them */
    size_t n_touched, cap_touched;
} BacktrackStack;
#define REGEX_STEPS_PER_STATE 16
#define REGEX_MEMO_AFTER 64  /* steps of one attempt before its branch states are marked */

static void stack_push(BacktrackStack *st, int pc, int pos) {
    if (st->n + 2 > st->cap) {
        st->cap = st->cap ? 2 * st->cap : 256;
        st->pc_pos = realloc(st->pc_pos, (size_t)st->cap * sizeof(int));
        if (!st->pc_pos) die("out of memory");
    }
    st->pc_pos[st->n++] = pc;
    st->pc_pos[st->n++] = pos;
}

/* Marks branch state (pc, pos); returns 0 if it was marked already. */
static int visit(BacktrackStack *st, int pc, int pos) {
    size_t bit = (size_t)pc * st->width + pos;
    if (st->seen[bit >> 6] >> (bit & 63) & 1) return 0;
    st->seen[bit >> 6] |= 1ull << (bit & 63);
    if (st->n_touched == st->cap_touched) {
        st->cap_touched = st->cap_touched ? 2 * st->cap_touched : 1024;
        st->touched = realloc(st->touched, st->cap_touched * sizeof(size_t));
        if (!st->touched) die("out of memory");
    }
    st->touched[st->n_touched++] = bit;
    return 1;
}

static void unvisit_since(BacktrackStack *st, size_t mark) {
    for (size_t i = mark; i < st->n_touched; i++)
        st->seen[st->touched[i] >> 6] &= ~(1ull << (st->touched[i] & 63));
    st->n_touched = mark;
}

/* Before a pass of a program of n_code instructions over len characters. */
static void regex_pass_begin(BacktrackStack *st, int n_code, int len) {
    size_t bits = (size_t)n_code * (len + 1);
    if (bits > st->seen_bits) {
        free(st->seen);
        st->seen_bits = bits;
        st->seen = xcalloc(bits / 64 + 1, sizeof(uint64_t));
    }
    st->width = (size_t)len + 1;
    st->steps = 0;
    st->budget = ((long long)len + 1) * n_code * REGEX_STEPS_PER_STATE + 4096;
}

/* Runs the program from pc at s[pos]; returns the end of the first (leftmost-first) match, or
 * -1. Between regex_pass_begin and unvisit_since(st, 0). */
static int regex_run(const Regex *re, int pc, const uint32_t *s, int pos, int n,
                     BacktrackStack *st) {
    int base = st->n;
    size_t mark = st->n_touched;
    long long steps = st->steps, memo_from = steps + REGEX_MEMO_AFTER; /* short attempts skip marks
                                                                        */
    stack_push(st, pc, pos);
    while (st->n > base) {
        pos = st->pc_pos[--st->n];
        pc = st->pc_pos[--st->n];
        for (;;) {
            const ReInst *in = &re->code[pc];
            if (in->op == OP_CLASS) {
                if (pos < n && class_has(&re->classes[in->x], s[pos])) { pc++; pos++; continue; }
                break;
            } else if (in->op == OP_SPLIT) { /* the steps counted: branches (between them, < n_code)
                                              */
                if (++steps > st->budget)
                    die("the tokenizer's pre-tokenizer regex backtracks too much on this input "
                        "(over "
                        "%lld steps; nested quantifiers such as (a+)+ do that)",
                        st->budget);
                if (steps > memo_from && !visit(st, pc, pos)) break; /* reached before: fails */
                stack_push(st, in->y, pos);
                pc = in->x;
            } else if (in->op == OP_JMP) {
                pc = in->x;
            } else if (in->op == OP_MATCH) {
                st->n = base;
                st->steps = steps;
                unvisit_since(st, mark);
                return pos;
            } else if (in->op == OP_EOL) { /* Ruby-syntax $: end of input or before a newline */
                if (pos == n || s[pos] == '\n') pc++;
                else break;
            } else if (in->op == OP_BOL) {
                if (pos == 0 || s[pos - 1] == '\n') pc++;
                else break;
            } else { /* OP_LOOKAHEAD */
                st->steps = steps;
                int matched = regex_run(re, pc + 1, s, pos, n, st) >= 0;
                steps = st->steps;
                if (matched == !in->x) pc = in->y;
                else break;
            }
        }
    }
    st->steps = steps;
    return -1;
}

/* --- The tokenizer proper --- */

struct Tokenizer {
    int n_ids, bos_id, eos_id, add_bos, chat_template;
    unsigned char *kind;                 /* per id: TOKEN_* */
    const unsigned char **bytes;         /* per id: what it decodes to */
    uint32_t *len;
    int n_added; /* added tokens, matched in the raw text before anything else */
    int *added_by_byte, added_start[257];/* added token indices grouped by first byte */
    int *added_id;
    const unsigned char **added_text;
    uint32_t *added_len;
    int n_merges;
    uint32_t *merges;                    /* [rank][3]: left id, right id, merged id */
    uint64_t *merge_key;                 /* hash (left, right) -> rank; key 0 = empty slot */
    int *merge_rank;
    size_t merge_mask;
    int byte_id[256];                    /* the single-byte token of each byte, or -1 */
    int n_regex;
    Regex *regex;
    int n_props;
    Property *props;
    BacktrackStack stack;
    void *map;                           /* a standalone tokenizer file's mapping */
    size_t map_size;
};

typedef struct { const unsigned char *p, *end; const char *path; } BlobReader;

static const unsigned char *blob_take(BlobReader *r, size_t n) {
    if ((size_t)(r->end - r->p) < n) die("tokenizer in %s is truncated or corrupt", r->path);
    const unsigned char *at = r->p;
    r->p += n;
    return at;
}
static uint32_t blob_u32(BlobReader *r) {
    uint32_t v;
    memcpy(&v, blob_take(r, 4), 4);
    return v;
}

static uint64_t merge_hash_key(uint32_t left, uint32_t right) {
    return ((uint64_t)left << 32 | right) + 1;
}
static size_t merge_slot(const Tokenizer *t, uint64_t key) {
    size_t h = (size_t)((key * 0x9E3779B97F4A7C15ull) >> 17) & t->merge_mask;
    while (t->merge_key[h] && t->merge_key[h] != key) h = (h + 1) & t->merge_mask;
    return h;
}
static int merge_lookup(const Tokenizer *t, int left, int right) {
    size_t h = merge_slot(t, merge_hash_key((uint32_t)left, (uint32_t)right));
    return t->merge_key[h] ? t->merge_rank[h] : -1;
}

/* The blob's token table: each id's kind and bytes, then the added tokens by first byte. */
static void parse_tokens(Tokenizer *t, BlobReader *r, const char *path) {
    t->kind = xcalloc(t->n_ids, 1);
    t->bytes = xcalloc(t->n_ids, sizeof(char *));
    t->len = xcalloc(t->n_ids, sizeof(uint32_t));
    for (int b = 0; b < 256; b++) t->byte_id[b] = -1;
    for (int i = 0; i < t->n_ids; i++) {
        t->kind[i] = *blob_take(r, 1);
        t->len[i] = blob_u32(r);
        t->bytes[i] = blob_take(r, t->len[i]);
        if (t->kind[i] == TOKEN_BPE && t->len[i] == 1) t->byte_id[t->bytes[i][0]] = i;
    }
    t->n_added = (int)blob_u32(r);
    if (t->n_added < 0 || t->n_added > t->n_ids)
        die("tokenizer in %s is corrupt (added tokens)", path);
    t->added_id = xcalloc(t->n_added, sizeof(int));
    t->added_text = xcalloc(t->n_added, sizeof(char *));
    t->added_len = xcalloc(t->n_added, sizeof(uint32_t));
    for (int i = 0; i < t->n_added; i++) {
        t->added_id[i] = (int)blob_u32(r);
        t->added_len[i] = blob_u32(r);
        t->added_text[i] = blob_take(r, t->added_len[i]);
        if (t->added_id[i] < 0 || t->added_id[i] >= t->n_ids || t->added_len[i] == 0)
            die("tokenizer in %s is corrupt (added token %d)", path, i);
        t->added_start[t->added_text[i][0] + 1]++;
    }
    for (int b = 0; b < 256; b++) t->added_start[b + 1] += t->added_start[b];
    t->added_by_byte = xcalloc(t->n_added, sizeof(int));
    int fill[256];
    memcpy(fill, t->added_start, sizeof fill);
    for (int i = 0; i < t->n_added; i++) t->added_by_byte[fill[t->added_text[i][0]]++] = i;
}

/* The merges, in rank order, into a hash table of (left, right) -> rank. */
static void parse_merges(Tokenizer *t, BlobReader *r, const char *path) {
    t->n_merges = (int)blob_u32(r);
    if (t->n_merges < 0 || t->n_merges > (1 << 24))
        die("tokenizer in %s is corrupt (merges)", path);
    t->merges = xcalloc((size_t)t->n_merges * 3, sizeof(uint32_t));
    memcpy(t->merges, blob_take(r, (size_t)t->n_merges * 12), (size_t)t->n_merges * 12);
    size_t slots = 16;
    while (slots < 2 * (size_t)t->n_merges) slots *= 2;
    t->merge_mask = slots - 1;
    t->merge_key = xcalloc(slots, sizeof(uint64_t));
    t->merge_rank = xcalloc(slots, sizeof(int));
    for (int m = 0; m < t->n_merges; m++) {
        uint32_t *mg = t->merges + 3 * (size_t)m;
        if (mg[0] >= (uint32_t)t->n_ids || mg[1] >= (uint32_t)t->n_ids ||
            mg[2] >= (uint32_t)t->n_ids)
            die("tokenizer in %s is corrupt (merge %d)", path, m);
        uint64_t key = merge_hash_key(mg[0], mg[1]);
        size_t h = merge_slot(t, key);
        if (!t->merge_key[h]) {
            t->merge_key[h] = key;
            t->merge_rank[h] = m;
        } /* lowest rank wins */
    }
}

/* The pre-tokenizer: its regexes verbatim, and the Unicode property tables they use. */
static void parse_pretokenizer(Tokenizer *t, BlobReader *r, const char *path) {
    t->n_regex = (int)blob_u32(r);
    if (t->n_regex < 0 || t->n_regex > 64) die("tokenizer in %s is corrupt (pre-tokenizer)", path);
    const unsigned char **pattern = xcalloc(t->n_regex, sizeof(char *));
    uint32_t *pattern_len = xcalloc(t->n_regex, sizeof(uint32_t));
    for (int i = 0; i < t->n_regex; i++) {
        pattern_len[i] = blob_u32(r);
        pattern[i] = blob_take(r, pattern_len[i]);
    }
    t->n_props = (int)blob_u32(r);
    if (t->n_props < 0 || t->n_props > 64) die("tokenizer in %s is corrupt (properties)", path);
    t->props = xcalloc(t->n_props, sizeof(Property));
    for (int i = 0; i < t->n_props; i++) {
        uint32_t n = blob_u32(r);
        if (n >= sizeof t->props[i].name) die("tokenizer in %s is corrupt (property name)", path);
        memcpy(t->props[i].name, blob_take(r, n), n);
        t->props[i].n = (int)blob_u32(r);
        if (t->props[i].n < 0 || t->props[i].n > (1 << 20))
            die("tokenizer in %s is corrupt (property ranges)", path);
        t->props[i].ranges = xcalloc(t->props[i].n, sizeof(Range));
        memcpy(t->props[i].ranges, blob_take(r, (size_t)t->props[i].n * 8),
               (size_t)t->props[i].n * 8);
    }
    t->regex = xcalloc(t->n_regex, sizeof(Regex));
    for (int i = 0; i < t->n_regex; i++) {
        char *source = xcalloc(pattern_len[i] + 1, 1);
        memcpy(source, pattern[i], pattern_len[i]);
        regex_compile(&t->regex[i], source, pattern_len[i], t->props, t->n_props);
        free(source);
    }
    free(pattern);
    free(pattern_len);
}

/* The blob export.py writes (its format is drawn in export.py, read_tokenizer). */
static void tokenizer_parse(Tokenizer *t, const unsigned char *blob, size_t size,
                            const char *path) {
    BlobReader r = {blob, blob + size, path};
    if (size < 8 || memcmp(blob_take(&r, 4), TOKENIZER_MAGIC, 4))
        die("%s: no tokenizer found (bad magic)", path);
    uint32_t version = blob_u32(&r);
    if (version != TOKENIZER_VERSION)
        die("%s: tokenizer version %u; this build reads version %d", path, version,
            TOKENIZER_VERSION);
    t->n_ids = (int)blob_u32(&r);
    t->bos_id = (int32_t)blob_u32(&r);
    t->eos_id = (int32_t)blob_u32(&r);
    t->add_bos = (int)blob_u32(&r);
    t->chat_template = (int)blob_u32(&r);
    if (t->n_ids < 1 || t->n_ids > (1 << 24) || t->bos_id >= t->n_ids || t->eos_id >= t->n_ids)
        die("tokenizer in %s is corrupt (%d ids, bos %d, eos %d)", path, t->n_ids, t->bos_id,
            t->eos_id);
    parse_tokens(t, &r, path);
    parse_merges(t, &r, path);
    parse_pretokenizer(t, &r, path);
}

static void free_tokenizer(Tokenizer *t) {
    for (int i = 0; i < t->n_regex; i++) regex_free(&t->regex[i]);
    for (int i = 0; i < t->n_props; i++) free(t->props[i].ranges);
    free(t->regex); free(t->props); free(t->kind); free(t->bytes); free(t->len);
    free(t->added_id);
    free(t->added_by_byte);
    free(t->added_text);
    free(t->added_len);
    free(t->merges);
    free(t->merge_key); free(t->merge_rank); free(t->stack.pc_pos);
    free(t->stack.seen); free(t->stack.touched);
    if (t->map) munmap(t->map, t->map_size);
}


/* BPE on one pre-token: start from single bytes and repeatedly merge the adjacent pair of lowest
 * rank (leftmost on ties), as HF does with a priority queue. */
typedef struct { int rank, pos; } MergeCandidate;

static void heap_push(MergeCandidate *h, int *n, MergeCandidate c) {
    int i = (*n)++;
    while (i > 0) {
        int parent = (i - 1) / 2;
        if (h[parent].rank < c.rank || (h[parent].rank == c.rank && h[parent].pos < c.pos)) break;
        h[i] = h[parent];
        i = parent;
    }
    h[i] = c;
}
static MergeCandidate heap_pop(MergeCandidate *h, int *n) {
    MergeCandidate top = h[0], last = h[--*n];
    int i = 0;
    for (;;) {
        int child = 2 * i + 1;
        if (child >= *n) break;
        if (child + 1 < *n &&
            (h[child + 1].rank < h[child].rank ||
             (h[child + 1].rank == h[child].rank && h[child + 1].pos < h[child].pos)))
            child++;
        if (last.rank < h[child].rank || (last.rank == h[child].rank && last.pos <= h[child].pos))
            break;
        h[i] = h[child];
        i = child;
    }
    h[i] = last;
    return top;
}

static void bpe_piece(const Tokenizer *t, const unsigned char *text, int n, IdList *out) {
    if (n == 0) return;
    int *sym = xcalloc(n, sizeof(int)), *next = xcalloc(n, sizeof(int)),
        *prev = xcalloc(n, sizeof(int));
    MergeCandidate *heap = xcalloc((size_t)2 * n, sizeof(MergeCandidate));
    int heap_n = 0;
    for (int i = 0; i < n; i++) {
        sym[i] = t->byte_id[text[i]];
        if (sym[i] < 0) die("byte 0x%02X has no token in this tokenizer", text[i]);
        next[i] = i + 1 < n ? i + 1 : -1;
        prev[i] = i - 1;
    }
    for (int i = 0; i + 1 < n; i++) {
        int rank = merge_lookup(t, sym[i], sym[i + 1]);
        if (rank >= 0) heap_push(heap, &heap_n, (MergeCandidate){rank, i});
    }
    while (heap_n > 0) {
        MergeCandidate c = heap_pop(heap, &heap_n);
        int i = c.pos, j = next[i];
        if (sym[i] < 0 || j < 0 || merge_lookup(t, sym[i], sym[j]) != c.rank) continue;  /* stale */
        sym[i] = (int)t->merges[3 * (size_t)c.rank + 2];
        sym[j] = -1;
        next[i] = next[j];
        if (next[j] >= 0) prev[next[j]] = i;
        int rank;
        if (prev[i] >= 0 && (rank = merge_lookup(t, sym[prev[i]], sym[i])) >= 0)
            heap_push(heap, &heap_n, (MergeCandidate){rank, prev[i]});
        if (next[i] >= 0 && (rank = merge_lookup(t, sym[i], sym[next[i]])) >= 0)
            heap_push(heap, &heap_n, (MergeCandidate){rank, i});
    }
    for (int i = 0; i >= 0; i = next[i]) ids_push(out, sym[i]);
    free(sym); free(next); free(prev); free(heap);
}

/* The pre-tokenizer: each regex splits every current piece (Isolated: matches and gaps both
 * stay), in order; a match never crosses a piece boundary. Pieces are [start, end) code points. */
static int pretokenize(Tokenizer *t, const uint32_t *cps, int n, int **pieces_out) {
    int cap = 2 * n + 2, count = n > 0, *pieces = xcalloc(cap, sizeof(int)),
        *next = xcalloc(cap, sizeof(int));
    pieces[0] = 0; pieces[1] = n;
    for (int r = 0; r < t->n_regex; r++) {
        int m = 0;
        for (int k = 0; k < count; k++) {
            int start = pieces[2 * k], len = pieces[2 * k + 1] - start, last = 0;
            const uint32_t *s = cps + start;
            regex_pass_begin(&t->stack, t->regex[r].n_code, len);
            for (int p = 0; p < len;) {
                int end = regex_run(&t->regex[r], 0, s, p, len, &t->stack);
                if (end <= p) { p++; continue; }
                if (p > last) { next[2 * m] = start + last; next[2 * m + 1] = start + p; m++; }
                next[2 * m] = start + p; next[2 * m + 1] = start + end; m++;
                last = p = end;
            }
            if (last < len) { next[2 * m] = start + last; next[2 * m + 1] = start + len; m++; }
            unvisit_since(&t->stack, 0);
        }
        int *swap = pieces; pieces = next; next = swap;
        count = m;
    }
    free(next);
    *pieces_out = pieces;
    return count;
}

/* Encodes a text segment that holds no added token: pre-tokenize, then BPE each piece. */
static void encode_segment(Tokenizer *t, const unsigned char *text, int len, IdList *out) {
    if (len == 0) return;
    uint32_t *cps = xcalloc(len + 1, sizeof(uint32_t)), cp[2];
    int *offset = xcalloc(len + 1, sizeof(int)), n = 0;
    Utf8Decoder d = {0};
    for (int i = 0; i < len; i++) /* valid UTF-8 (checked by the caller): one code point per
                                     sequence */
        if (utf8_feed(&d, text[i], cp)) { cps[n++] = cp[0]; offset[n] = i + 1; }
    int *pieces, count = pretokenize(t, cps, n, &pieces);
    for (int k = 0; k < count; k++)
        bpe_piece(t, text + offset[pieces[2 * k]],
                  offset[pieces[2 * k + 1]] - offset[pieces[2 * k]], out);
    free(pieces); free(cps); free(offset);
}

/* text -> ids, as HF's encode(text, add_special_tokens=add_bos). Added tokens are found first,
 * leftmost-longest, in the raw text; what lies between them is encoded segment by segment. */
static void tokenizer_encode(Tokenizer *t, const char *text, size_t len, int add_bos, IdList *out) {
    const unsigned char *s = (const unsigned char *)text;
    utf8_validate(s, len);
    if (add_bos && t->bos_id >= 0) ids_push(out, t->bos_id);
    size_t seg = 0;
    for (size_t i = 0; i < len;) {
        int best = -1;
        for (int k = t->added_start[s[i]]; k < t->added_start[s[i] + 1]; k++) {
            int a = t->added_by_byte[k];
            if (t->added_len[a] <= len - i && (best < 0 || t->added_len[a] > t->added_len[best]) &&
                !memcmp(t->added_text[a], s + i, t->added_len[a]))
                best = a;
        }
        if (best < 0) { i++; continue; }
        encode_segment(t, s + seg, (int)(i - seg), out);
        ids_push(out, t->added_id[best]);
        i += t->added_len[best];
        seg = i;
    }
    encode_segment(t, s + seg, (int)(len - seg), out);
}

/* Decoding streams: bytes go through the lossy UTF-8 decoder, whole characters come out. */
struct TextSink {
    Utf8Decoder utf8;
    FILE *file;           /* write here, or */
    char *buf;            /* append here (tests) */
    size_t n, cap;
};

static TextSink *open_sink(FILE *file) {
    TextSink *o = xcalloc(1, sizeof *o);
    o->file = file;
    return o;
}

static void sink_put(TextSink *o, uint32_t cp) {
    char bytes[4];
    int k = utf8_encode(cp, bytes);
    if (o->file) { fwrite(bytes, 1, k, o->file); return; }
    if (o->n + k + 1 > o->cap) {
        o->cap = (o->cap + k + 1) * 2;
        o->buf = realloc(o->buf, o->cap);
        if (!o->buf) die("out of memory");
    }
    memcpy(o->buf + o->n, bytes, k);
    o->n += k;
    o->buf[o->n] = '\0';
}

static void sink_bytes(TextSink *o, const unsigned char *bytes, size_t n) {
    uint32_t cp[2];
    for (size_t i = 0; i < n; i++) {
        int k = utf8_feed(&o->utf8, bytes[i], cp);
        for (int j = 0; j < k; j++) sink_put(o, cp[j]);
    }
}

/* End of the stream: an unfinished character becomes U+FFFD. */
static void sink_flush(TextSink *o) {
    if (o->utf8.needed) { o->utf8.needed = 0; sink_put(o, 0xFFFD); }
    if (o->file) fflush(o->file);
}

/* One id's bytes into the sink; unknown ids are dropped, specials too when skip_special. */
static void decode_token(const Tokenizer *t, TextSink *o, int id, int skip_special) {
    if (id < 0 || id >= t->n_ids || t->kind[id] == TOKEN_UNUSED) return;
    if (skip_special && t->kind[id] == TOKEN_SPECIAL) return;
    sink_bytes(o, t->bytes[id], t->len[id]);
}

/* One id's bytes as printable text for a trace, safe inside a quoted CSV field: newline as \n,
 * control bytes, the quote and the backslash as \xNN, other bytes as they are. */
static void token_text(const Tokenizer *t, int id, char *out, size_t size) {
    size_t n = 0;
    out[0] = '\0';
    if (id < 0 || id >= t->n_ids || t->kind[id] == TOKEN_UNUSED) return;
    for (uint32_t i = 0; i < t->len[id] && n + 5 < size; i++) {
        unsigned char b = t->bytes[id][i];
        if (b == '\n') n += snprintf(out + n, size - n, "\\n");
        else if (b < 32 || b == 127 || b == '"' || b == '\\')
            n += snprintf(out + n, size - n, "\\x%02x", b);
        else out[n++] = (char)b, out[n] = '\0';
    }
}

/* One chat turn as text, with the model's template (tokenizer_config.json's chat_template):
 *   DeepSeek-V2: <bos>{system}\n\nUser: {user}\n\nAssistant:      (no space after "Assistant:")
 *   DeepSeek-V3: <bos>{system}<｜User｜>{user}<｜Assistant｜>
 * The first turn carries BOS and the optional system prompt. The caller feeds EOS after each reply.
 */
static char *render_chat_turn(const Tokenizer *t, const char *system, const char *user,
                              int first_turn) {
    size_t n = strlen(user) + (system ? strlen(system) : 0) +
            (t->bos_id >= 0 ? t->len[t->bos_id] : 0) + 64;
    char *out = xcalloc(n, 1), *p = out;
    if (first_turn && t->bos_id >= 0) {
        memcpy(p, t->bytes[t->bos_id], t->len[t->bos_id]);
        p += t->len[t->bos_id];
    }
    if (t->chat_template == CHAT_DEEPSEEK_V2)
        snprintf(p, n - (p - out), "%s%sUser: %s\n\nAssistant:", first_turn && system ? system : "",
                 first_turn && system ? "\n\n" : "", user);
    else if (t->chat_template == CHAT_DEEPSEEK_V3)
        snprintf(p, n - (p - out),
                 "%s<\xEF\xBD\x9CUser\xEF\xBD\x9C>%s<\xEF\xBD\x9C"
                 "Assistant\xEF\xBD\x9C>",
                 first_turn && system ? system : "", user);
    else die("this tokenizer has no known chat template (DeepSeek-V2 or V3)");
    return out;
}

/* A file holding a tokenizer: a model with one inside, or a standalone .tok from export.py. */
static int load_tokenizer_file(Tokenizer *t, const char *path, const Weights *w) {
    memset(t, 0, sizeof *t);
    if (w) {
        if (!w->cfg.tokenizer_offset) return 0;
        tokenizer_parse(t, (const unsigned char *)w->map + w->cfg.tokenizer_offset,
                        w->cfg.tokenizer_size, path);
        if (t->n_ids > w->cfg.vocab_size)
            die("%s: the tokenizer has %d ids, more than the model's vocab_size %d", path, t->n_ids,
                w->cfg.vocab_size);
        return 1;
    }
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size < 8) die("%s is too short to be a tokenizer", path);
    t->map_size = (size_t)st.st_size;
    t->map = mmap(NULL, t->map_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (t->map == MAP_FAILED) die("cannot mmap %s: %s", path, strerror(errno));
    tokenizer_parse(t, t->map, t->map_size, path);
    return 1;
}

/* The tokenizer of a model file (NULL when it has none), or of a standalone .tok (w NULL). */
static Tokenizer *open_tokenizer(const char *path, const Weights *w) {
    Tokenizer *t = xcalloc(1, sizeof *t);
    if (!load_tokenizer_file(t, path, w)) { free(t); return NULL; }
    return t;
}

static void close_tokenizer(Tokenizer *t) {
    free_tokenizer(t);
    free(t);
}

static int tokenizer_adds_bos(const Tokenizer *t) { return t->add_bos; }
static int tokenizer_can_chat(const Tokenizer *t) { return t->chat_template != CHAT_NONE; }

/* Whether path holds a standalone tokenizer (.tok) rather than a model. */
static int is_tokenizer_file(const char *path) {
    char magic[4] = {0};
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open %s: %s", path, strerror(errno));
    size_t got = fread(magic, 1, 4, f);
    fclose(f);
    return got == 4 && !memcmp(magic, TOKENIZER_MAGIC, 4);
}

/* ------------------------------------------------------------------------------------------ */
/* Pictures: standalone SVG with axes, ticks, labels and a legend (no dependencies). One       */
/* helper draws them all: -m trace's routing map, expert load, attention heatmap and KV cache */
/* chart, and training's loss curve.                                                          */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    OutputFile out;
    FILE *f;
    double x0, x1, y0, y1;            /* the data range shown */
    int log_x, log_y;                 /* log axes */
    int flip_y;                       /* y grows downwards (row 0 at the top) */
    double left, top, width, height;  /* the plot area, pixels */
} Plot;

static void svg_open(Plot *p, const char *path, int W, int H, const char *title) {
    memset(p, 0, sizeof *p);
    output_open(&p->out, path);
    p->f = p->out.f;
    fprintf(p->f,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
            "viewBox=\"0 0 %d %d\" font-family=\"sans-serif\" font-size=\"12\">\n"
            "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
            "<text x=\"%d\" y=\"22\" font-size=\"15\" text-anchor=\"middle\">%s</text>\n",
            W, H, W, H, W / 2, title);
}

static void svg_close(Plot *p) {
    fprintf(p->f, "</svg>\n");
    output_close(&p->out);
}

/* The plot area and its data range. */
static void plot_area(Plot *p, double left, double top, double width, double height, double x0,
                      double x1, double y0, double y1) {
    p->left = left; p->top = top; p->width = width; p->height = height;
    p->x0 = x0; p->x1 = x1 > x0 ? x1 : x0 + 1; p->y0 = y0; p->y1 = y1 > y0 ? y1 : y0 + 1;
}

static double plot_px(const Plot *p, double x) {
    double u = p->log_x ? (log10(x) - log10(p->x0)) / (log10(p->x1) - log10(p->x0))
                        : (x - p->x0) / (p->x1 - p->x0);
    return p->left + u * p->width;
}

static double plot_py(const Plot *p, double y) {
    double u = p->log_y ? (log10(y) - log10(p->y0)) / (log10(p->y1) - log10(p->y0))
                        : (y - p->y0) / (p->y1 - p->y0);
    return p->top + (p->flip_y ? u : 1 - u) * p->height;
}

/* A round tick step for a linear axis over [lo, hi]: 1, 2 or 5 times a power of ten. */
static double nice_step(double lo, double hi, int max_ticks) {
    double raw = (hi - lo) / max_ticks, mag = pow(10, floor(log10(raw)));
    return raw <= mag ? mag : raw <= 2 * mag ? 2 * mag : raw <= 5 * mag ? 5 * mag : 10 * mag;
}

typedef const char *(*TickLabel)(double v, char *buf, size_t size);

static const char *tick_number(double v, char *buf, size_t size) {
    snprintf(buf, size, "%g", fabs(v) < 1e-12 ? 0.0 : v);
    return buf;
}

static const char *tick_bytes(double v, char *buf, size_t size) {
    const char *unit[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    int u = 0;
    while (v >= 1024 && u < 5) { v /= 1024; u++; }
    snprintf(buf, size, "%g %s", v, unit[u]);
    return buf;
}

static const char *tick_tokens(double v, char *buf, size_t size) {
    if (v >= 1024) snprintf(buf, size, "%gK", v / 1024);
    else snprintf(buf, size, "%g", v);
    return buf;
}

/* One axis's ticks: linear at a round step, log at the powers of `base` in range. */
static int axis_ticks(double lo, double hi, int log_axis, double base, double *ticks) {
    int n = 0;
    if (log_axis) {
        for (double v = pow(base, ceil(log(lo) / log(base) - 1e-9)); v <= hi * (1 + 1e-9) && n < 32;
             v *= base)
            ticks[n++] = v;
        return n;
    }
    double step = nice_step(lo, hi, 6);
    for (double v = ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9 && n < 32; v += step)
        ticks[n++] = v;
    return n;
}

/* The frame, the ticks with their labels, and the axis labels. x_base, y_base: the factor
 * between ticks of a log axis (10; 2 for token counts, 4 for bytes). */
static void plot_axes(Plot *p, const char *x_label, const char *y_label, TickLabel x_fmt,
                      TickLabel y_fmt, double x_base, double y_base) {
    FILE *f = p->f;
    double ticks[32], bottom = p->top + p->height;
    char buf[32];
    fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" "
               "stroke=\"black\"/>\n", p->left, p->top, p->width, p->height);
    int n = axis_ticks(p->x0, p->x1, p->log_x, x_base, ticks);
    for (int i = 0; i < n; i++) {
        double x = plot_px(p, ticks[i]);
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"black\"/>"
                   "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n",
                x, bottom, x, bottom + 5, x, bottom + 18, x_fmt(ticks[i], buf, sizeof buf));
    }
    n = axis_ticks(p->y0, p->y1, p->log_y, y_base, ticks);
    for (int i = 0; i < n; i++) {
        double y = plot_py(p, ticks[i]);
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"black\"/>"
                   "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>"
                   "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%s</text>\n",
                p->left - 5, y, p->left, y, p->left, y, p->left + p->width, y, p->left - 8, y + 4,
                y_fmt(ticks[i], buf, sizeof buf));
    }
    fprintf(f, "<text class=\"axis-label\" x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s"
               "</text>\n", p->left + p->width / 2, bottom + 38, x_label);
    fprintf(f, "<text class=\"axis-label\" transform=\"translate(%.1f,%.1f) rotate(-90)\" "
               "text-anchor=\"middle\">%s</text>\n", p->left - 70, p->top + p->height / 2, y_label);
}

/* A line through n points; dash "" for solid. */
static void plot_line(Plot *p, const double *x, const double *y, int n, const char *color,
                      const char *dash, double stroke_width) {
    fprintf(p->f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"%.1f\"%s%s%s points=\"",
            color, stroke_width, *dash ? " stroke-dasharray=\"" : "", dash, *dash ? "\"" : "");
    for (int i = 0; i < n; i++) fprintf(p->f, "%.1f,%.1f ", plot_px(p, x[i]), plot_py(p, y[i]));
    fprintf(p->f, "\"/>\n");
}

/* The legend: one entry per line, a swatch (a line, dashed or not, or a dot) and its label, in
 * a box at the plot's top right (or at x, y when x >= 0). */
typedef struct { const char *label, *color, *dash; int dot; } LegendEntry;  /* dot 2: a square */

static void plot_legend(Plot *p, const LegendEntry *e, int n, double x, double y) {
    int widest = 0;
    for (int i = 0; i < n; i++) widest = max_int(widest, (int)strlen(e[i].label));
    double w = 40 + 6.5 * widest, h = 8 + 16 * n;
    if (x < 0) { x = p->left + p->width - w - 8; y = p->top + 8; }
    fprintf(p->f,
            "<g class=\"legend\">\n<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" "
            "fill=\"white\" "
            "fill-opacity=\"0.9\" stroke=\"#999\"/>\n",
            x, y, w, h);
    for (int i = 0; i < n; i++) {
        double cy = y + 12 + 16 * i;
        if (e[i].dot == 2)
            fprintf(p->f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"10\" height=\"10\" "
                          "fill=\"%s\"/>\n", x + 13, cy - 5, e[i].color);
        else if (e[i].dot)
            fprintf(p->f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"4\" fill=\"%s\"/>\n", x + 18, cy,
                    e[i].color);
        else
            fprintf(p->f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" "
                          "stroke-width=\"2\" stroke-dasharray=\"%s\"/>\n",
                    x + 6, cy, x + 30, cy, e[i].color, e[i].dash ? e[i].dash : "");
        fprintf(p->f, "<text x=\"%.1f\" y=\"%.1f\">%s</text>\n", x + 36, cy + 4, e[i].label);
    }
    fprintf(p->f, "</g>\n");
}

/* Colours: expert e of E by hue (HSV, full saturation), and a white-to-blue scale for [0, 1]. */
static void expert_color(int e, int E, char *buf, size_t size) {
    double h = 6.0 * e / (E > 0 ? E : 1), x = 1 - fabs(fmod(h, 2) - 1);
    double rgb[6][3] = {{1, x, 0}, {x, 1, 0}, {0, 1, x}, {0, x, 1}, {x, 0, 1}, {1, 0, x}};
    int s = (int)h % 6;
    snprintf(buf, size, "#%02x%02x%02x", (int)(200 * rgb[s][0]), (int)(200 * rgb[s][1]),
             (int)(200 * rgb[s][2]));
}

static void scale_color(double u, char *buf, size_t size) {
    u = u < 0 ? 0 : u > 1 ? 1 : u;
    snprintf(buf, size, "#%02x%02x%02x", (int)(255 - 247 * u), (int)(255 - 207 * u),
             (int)(255 - 148 * u));
}

/* A vertical colour bar from 0 to max beside the plot, its label above it. */
static void plot_colorbar(Plot *p, double max, const char *label) {
    double x = p->left + p->width + 20, h = p->height, steps = 32;
    char color[16], buf[32];
    fprintf(p->f, "<g class=\"colorbar\">\n");
    for (int i = 0; i < steps; i++) {
        scale_color((i + 0.5) / steps, color, sizeof color);
        fprintf(p->f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"14\" height=\"%.2f\" fill=\"%s\"/>\n",
                x, p->top + h * (1 - (i + 1) / steps), h / steps + 0.5, color);
    }
    fprintf(p->f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"14\" height=\"%.1f\" fill=\"none\" "
                  "stroke=\"black\"/>\n<text x=\"%.1f\" y=\"%.1f\">%s</text>"
                  "<text x=\"%.1f\" y=\"%.1f\">0</text><text x=\"%.1f\" y=\"%.1f\">%s</text>\n",
            x, p->top, h, x - 10, p->top - 8, label, x + 18, p->top + h, x + 18, p->top + 10,
            tick_number(max, buf, sizeof buf));
    fprintf(p->f, "</g>\n");
}

/* A filled cell of data size 1 x 1 centred on (x, y). */
static void plot_cell(Plot *p, double x, double y, const char *color, double opacity) {
    double px = plot_px(p, x - 0.5), py0 = plot_py(p, y - 0.5), py1 = plot_py(p, y + 0.5);
    fprintf(p->f, "<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" fill=\"%s\" "
                  "fill-opacity=\"%.3f\"/>\n",
            px, fmin(py0, py1), plot_px(p, x + 0.5) - px, fabs(py1 - py0), color, opacity);
}

/* -m trace: tokens x layers, each cell the token's top expert (colour) and its gate value
 * (intensity, relative to the largest); dense layers grey. */
static void svg_routing_map(const char *path, const Config *c, const int *top1,
                            const float *weight, int n_tokens) {
    int L = c->num_hidden_layers, E = c->n_routed_experts;
    Plot p;
    double row = L < 12 ? 24 : 14;
    svg_open(&p, path, 900, 160 + row * L + 18 * 3, "Routing map: each token's top-1 "
             "routed expert per layer (colour), its gate value (intensity)");
    p.flip_y = 1;
    plot_area(&p, 90, 40, 760, row * L, -0.5, n_tokens - 0.5, -0.5, L - 0.5);
    float max_w = 1e-30f;
    for (int i = 0; i < n_tokens * L; i++) max_w = fmaxf(max_w, weight[i]);
    char color[16];
    for (int t = 0; t < n_tokens; t++)
        for (int l = 0; l < L; l++) {
            if (!is_moe_layer(c, l)) { plot_cell(&p, t, l, "#bbb", 1); continue; }
            expert_color(top1[t * L + l], E, color, sizeof color);
            plot_cell(&p, t, l, color, 0.25 + 0.75 * weight[t * L + l] / max_w);
        }
    plot_axes(&p, "token position", "layer", tick_number, tick_number, 10, 10);
    int step = E > 32 ? (E + 31) / 32 : 1, shown = 0;  /* at most 33 legend entries */
    fprintf(p.f, "<g class=\"legend\">\n");
    for (int i = 0; i <= E; i = i < E && i + step > E ? E : i + step, shown++) {
        double x = 80 + 70.0 * (shown % 11), y = p.top + p.height + 52 + 18.0 * (shown / 11);
        char name[24];
        if (i < E) expert_color(i, E, color, sizeof color);
        snprintf(name, sizeof name, i < E ? "expert %d" : "dense", i);
        fprintf(p.f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"5\" fill=\"%s\"/>"
                     "<text x=\"%.1f\" y=\"%.1f\">%s</text>\n",
                x, y, i < E ? color : "#bbb", x + 8, y + 4, name);
        if (i == E) break;
    }
    fprintf(p.f, "</g>\n");
    svg_close(&p);
}

/* -m trace -f text: how many tokens each routed expert got, one bar chart per MoE layer, with
 * the even load n K / E as a dashed line. */
static void svg_expert_load(const char *path, const Config *c, const int *load, int n_tokens) {
    int L = c->num_hidden_layers, E = c->n_routed_experts, moe_layers = 0, max_load = 1;
    for (int l = 0; l < L; l++)
        if (is_moe_layer(c, l)) {
            moe_layers++;
            for (int e = 0; e < E; e++) max_load = max_int(max_load, load[(size_t)l * E + e]);
        }
    char title[160];
    snprintf(title, sizeof title, "Expert load over %d tokens: tokens routed to each expert, per "
             "MoE layer", n_tokens);
    Plot p;
    svg_open(&p, path, 900, 80 + 130 * max_int(moe_layers, 1), title);
    double even = (double)n_tokens * c->num_experts_per_tok / E;
    int row = 0;
    for (int l = 0; l < L; l++) {
        if (!is_moe_layer(c, l)) continue;
        plot_area(&p, 90, 70 + 130.0 * row++, 760, 80, -0.5, E - 0.5, 0,
                  fmax(max_load, even) * 1.05);
        for (int e = 0; e < E; e++) {
            double x = plot_px(&p, e - 0.4), x2 = plot_px(&p, e + 0.4);
            double y = plot_py(&p, load[(size_t)l * E + e]);
            fprintf(p.f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" "
                         "fill=\"steelblue\"/>\n", x, y, x2 - x, p.top + p.height - y);
        }
        double xs[2] = {-0.5, E - 0.5}, ys[2] = {even, even};
        plot_line(&p, xs, ys, 2, "darkorange", "6,4", 1.5);
        char label[32];
        snprintf(label, sizeof label, "tokens, layer %d", l);
        plot_axes(&p, "routed expert", label, tick_number, tick_number, 10, 10);
        if (row == 1) {
            LegendEntry e[2] = {{"tokens routed to the expert", "steelblue", NULL, 2},
                                {"even load n K / E", "darkorange", "6,4", 0}};
            plot_legend(&p, e, 2, p.left + p.width - 250, 28);
        }
    }
    svg_close(&p);
}

/* -m trace: one head's attention probabilities, query position (rows) x key position. */
static void svg_attention(const char *path, const float *probs, int n, int layer, int head) {
    char title[128], color[16];
    snprintf(title, sizeof title, "Attention of layer %d, head %d: P(query attends to key)", layer,
             head);
    Plot p;
    svg_open(&p, path, 720, 680, title);
    p.flip_y = 1;
    plot_area(&p, 80, 50, 540, 540, -0.5, n - 0.5, -0.5, n - 0.5);
    for (int q = 0; q < n; q++)
        for (int k = 0; k <= q; k++) {
            scale_color(probs[(size_t)q * n + k], color, sizeof color);
            plot_cell(&p, k, q, color, 1);
        }
    plot_axes(&p, "key position", "query position", tick_number, tick_number, 10, 10);
    plot_colorbar(&p, 1, "probability");
    svg_close(&p);
}

/* KV cache bytes (f32, all layers) against context length for MLA absorbed, MLA naive and
 * standard MHA: the loaded model, DeepSeek-V2-Lite and DeepSeek-V2 (their released configs). */
static void svg_kv_cache(const char *path, const Config *c) {
    Config lite = {.num_hidden_layers = 27, .num_attention_heads = 16, .kv_lora_rank = 512,
                   .qk_nope_head_dim = 128, .qk_rope_head_dim = 64, .v_head_dim = 128};
    Config v2 = lite;
    v2.num_hidden_layers = 60;
    v2.num_attention_heads = 128;
    const Config *models[3] = {c, &lite, &v2};
    static const char *const model_names[3] = {"this model", "DeepSeek-V2-Lite", "DeepSeek-V2"};
    static const char *const colors[3] = {"black", "steelblue", "firebrick"};
    static const char *const forms[3] = {"MLA absorbed", "MLA naive", "MHA"},
                             *const dashes[3] = {"", "8,4", "2,3"};
    double lo = 1e300, hi = 0, x[8], y[8];
    for (int m = 0; m < 3; m++) {
        double b[3];
        kv_bytes_per_token(models[m], b);
        for (int k = 0; k < 3; k++) {
            lo = fmin(lo, b[k] * models[m]->num_hidden_layers * 1024);
            hi = fmax(hi, b[k] * models[m]->num_hidden_layers * 131072);
        }
    }
    Plot p;
    svg_open(&p, path, 820, 560, "KV cache size (f32, all layers) against context length");
    p.log_x = p.log_y = 1;
    plot_area(&p, 110, 45, 670, 420, 1024, 131072, pow(4, floor(log(lo) / log(4))),
              pow(4, ceil(log(hi) / log(4))));
    LegendEntry legend[9];
    char labels[9][64];
    for (int m = 0; m < 3; m++) {
        double b[3];
        kv_bytes_per_token(models[m], b);
        for (int k = 0; k < 3; k++) {
            for (int i = 0; i < 8; i++) {
                x[i] = 1024.0 * (1 << i);
                y[i] = b[k] * models[m]->num_hidden_layers * x[i];
            }
            plot_line(&p, x, y, 8, colors[m], dashes[k], 2);
            snprintf(labels[m * 3 + k], sizeof labels[0], "%s, %s", model_names[m], forms[k]);
            legend[m * 3 + k] = (LegendEntry){labels[m * 3 + k], colors[m], dashes[k], 0};
        }
    }
    plot_axes(&p, "context length (tokens)", "KV cache bytes", tick_tokens, tick_bytes, 2, 4);
    plot_legend(&p, legend, 9, p.left + 10, p.top + 8);
    svg_close(&p);
}

/* ------------------------------------------------------------------------------------------ */
/* Training (tiny f32 models), as llm.c writes it: one *_forward / *_backward pair per         */
/* operation, a training forward that saves what the backward needs, and a train_backward     */
/* that is the forward's calls in reverse. The loss is the mean cross-entropy plus the         */
/* expert-level balance loss of every MoE layer (eq. 23-25, as the official MoEGate computes  */
/* it in training mode); the optimizer is AdamW. Parameters, gradients and Adam moments all    */
/* use the checkpoint's own f32 layout, so a training state is a checkpoint: saving is one     */
/* write. Shapes: B sequences of T tokens, N = B*T rows; every *_backward adds into its dx.    */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    Config cfg;
    char *buf;              /* [0, HEADER_SIZE) header, then every tensor as in the file */
    size_t size;
    Weights w;              /* Mats and norm pointers into buf */
    TensorInfo *tensors;    /* where each block lies in buf */
    int n_tensors;
} Params;

static void params_init(Params *p, const Config *c) {
    memset(p, 0, sizeof *p);
    p->cfg = *c;
    p->cfg.dtype = DTYPE_F32;
    p->cfg.q8_group = 0;
    p->w.cfg = p->cfg;
    alloc_layers(&p->w);
    Cursor measure = {NULL, HEADER_SIZE, DTYPE_F32, 0, NULL, 0, NULL};
    p->size = layout_weights(&p->w, &measure);
    p->n_tensors = measure.n_tensors;
    p->tensors = xcalloc(p->n_tensors, sizeof(TensorInfo));
    p->buf = xcalloc(p->size, 1);
    Cursor fill = {p->buf, HEADER_SIZE, DTYPE_F32, 0, p->tensors, 0, NULL};
    layout_weights(&p->w, &fill);
}

static void params_free(Params *p) {
    p->w.map = NULL;
    free_weights(&p->w);
    free(p->buf);
    free(p->tensors);
}

static float *params_data(const Params *p) { return (float *)(p->buf + HEADER_SIZE); }
static size_t params_count(const Params *p) { return (p->size - HEADER_SIZE) / sizeof(float); }
static float *mut(const void *p) { return (float *)(uintptr_t)p; }  /* the Weights view is const */
static void zero(float *x, size_t n) { memset(x, 0, n * sizeof(float)); }

/* --- embedding: out[t] = embed[token t] --- */
static void embedding_forward(float *out, const Mat *embed, const int *tokens, int N) {
    for (int t = 0; t < N; t++) mat_row_to_f32(out + (size_t)t * embed->cols, embed, tokens[t]);
}
static void embedding_backward(const Mat *dembed, const float *dout, const int *tokens, int N) {
    int D = dembed->cols;
    for (int t = 0; t < N; t++) {
        float *row = mut(dembed->data) + (size_t)tokens[t] * D;
        for (int i = 0; i < D; i++) row[i] += dout[(size_t)t * D + i];
    }
}

/* --- RMSNorm over N rows, keeping 1/rms (rstd) for the backward pass --- */
static void rmsnorm_forward(float *out, float *rstd, const float *x, const float *w, int N, int dim,
                            double eps) {
    for (int t = 0; t < N; t++) {
        double ss = 0;
        for (int i = 0; i < dim; i++) ss += (double)x[(size_t)t * dim + i] * x[(size_t)t * dim + i];
        rstd[t] = (float)(1.0 / sqrt(ss / dim + eps));
        rmsnorm(out + (size_t)t * dim, x + (size_t)t * dim, w, dim, eps);
    }
}
/* y = w * x * rstd: dx += rstd * (w dy) - x rstd^3 mean(w dy * x); dw += dy * x * rstd. */
static void rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x,
                             const float *w, const float *rstd, int N, int dim) {
    for (int t = 0; t < N; t++) {
        const float *xt = x + (size_t)t * dim, *dyt = dout + (size_t)t * dim;
        double dot = 0;
        for (int i = 0; i < dim; i++) {
            dot += (double)w[i] * dyt[i] * xt[i];
            dw[i] += dyt[i] * xt[i] * rstd[t];
        }
        float r = rstd[t], k = (float)(dot / dim) * r * r * r;
        for (int i = 0; i < dim; i++) dx[(size_t)t * dim + i] += r * w[i] * dyt[i] - k * xt[i];
    }
}

/* --- matmul: out = W x over N rows --- */
static void matmul_forward(float *out, const Mat *W, const float *x, int N) {
    matmul(out, W, x, N, NULL);
}
/* dW += dout^T x, and dx += dout W (dx may be NULL). */
static void matmul_backward(float *dx, const Mat *dW, const float *dout, const float *x,
                            const Mat *W, int N) {
    int rows = W->rows, cols = W->cols;
    float *gw = mut(dW->data);
    const float *w = W->data;
#pragma omp parallel for schedule(static)
    for (int o = 0; o < rows; o++)
        for (int t = 0; t < N; t++) {
            float d = dout[(size_t)t * rows + o];
            if (d == 0.0f) continue;
            for (int i = 0; i < cols; i++) gw[(size_t)o * cols + i] += d * x[(size_t)t * cols + i];
        }
    if (!dx) return;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++)
        for (int o = 0; o < rows; o++) {
            float d = dout[(size_t)t * rows + o];
            if (d == 0.0f) continue;
            for (int i = 0; i < cols; i++) dx[(size_t)t * cols + i] += d * w[(size_t)o * cols + i];
        }
}

/* --- residual: x += branch (its backward passes dx through unchanged) --- */
static void residual_forward(float *x, const float *branch, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] += branch[i];
}

/* --- RoPE, in place, on `count` vectors of dr per row, `stride` floats apart; row t sits at
 * position t % T (every sequence starts at 0) --- */
static void rope_forward(float *x, int N, int T, int count, int stride, const RunState *rs) {
    int dr = rs->cfg->qk_rope_head_dim, half = dr / 2;
    for (int t = 0; t < N; t++)
        for (int k = 0; k < count; k++)
            rope_rotate(x + ((size_t)t * count + k) * stride, rs->rope_cos + (size_t)(t % T) * half,
                        rs->rope_sin + (size_t)(t % T) * half, dr);
}
/* The transpose of a rotation is the rotation back by the same angle. */
static void rope_backward(float *dx, int N, int T, int count, int stride, const RunState *rs) {
    int dr = rs->cfg->qk_rope_head_dim, half = dr / 2;
    for (int t = 0; t < N; t++)
        for (int k = 0; k < count; k++) {
            float *d = dx + ((size_t)t * count + k) * stride;
            const float *cos_row = rs->rope_cos + (size_t)(t % T) * half,
                        *sin_row = rs->rope_sin + (size_t)(t % T) * half;
            for (int i = 0; i < half; i++) {
                float a = d[2 * i], b = d[2 * i + 1];
                d[2 * i] = a * cos_row[i] + b * sin_row[i];
                d[2 * i + 1] = -a * sin_row[i] + b * cos_row[i];
            }
        }
}

/* --- the latent split: kv_a = [c^KV | k^R], one matrix for eq. 9 and eq. 15 --- */
static void latent_split_forward(float *c_raw, float *k_pe, const float *kv_a, int N, int r,
                                 int dr) {
    for (int t = 0; t < N; t++) {
        memcpy(c_raw + (size_t)t * r, kv_a + (size_t)t * (r + dr), r * sizeof(float));
        memcpy(k_pe + (size_t)t * dr, kv_a + (size_t)t * (r + dr) + r, dr * sizeof(float));
    }
}
static void latent_split_backward(float *dkv_a, const float *dc_raw, const float *dk_pe, int N,
                                  int r, int dr) {
    for (int t = 0; t < N; t++) {
        memcpy(dkv_a + (size_t)t * (r + dr), dc_raw + (size_t)t * r, r * sizeof(float));
        memcpy(dkv_a + (size_t)t * (r + dr) + r, dk_pe + (size_t)t * dr, dr * sizeof(float));
    }
}

/* --- causal attention per sequence and head (eq. 16-18), on decompressed K and V:
 * q [N][H*dq] (q^C | q^R per head), kv [N][H*(dn+dv)] (k^C | v^C per head), k_pe [N][dr]
 * shared by the heads; probs [B][H][T][T] saved; out [N][H*dv] --- */
static void attention_forward(float *out, float *probs, const float *q, const float *kv,
                              const float *k_pe, int B, int T, const Config *c, float scale) {
    int H = c->num_attention_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim,
        dv = c->v_head_dim;
    int dq = dn + dr, kvw = dn + dv;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            float *P = probs + (((size_t)b * H + h) * T) * T;
            for (int i = 0; i < T; i++) {
                const float *qi = q + ((size_t)(b * T + i) * H + h) * dq;
                for (int j = 0; j <= i; j++) {  /* eq. 16-17: q^C . k^C + q^R . k^R */
                    const float *kj = kv + ((size_t)(b * T + j) * H + h) * kvw;
                    P[i * T + j] = scale *
                            (dot_f32(qi, kj, dn) +
                             dot_f32(qi + dn, k_pe + (size_t)(b * T + j) * dr, dr));
                }
                softmax(P + (size_t)i * T, i + 1);  /* eq. 18 */
                for (int j = i + 1; j < T; j++) P[i * T + j] = 0.0f;
                float *o = out + ((size_t)(b * T + i) * H + h) * dv;
                memset(o, 0, dv * sizeof(float));
                for (int j = 0; j <= i; j++) {
                    const float *vj = kv + ((size_t)(b * T + j) * H + h) * kvw + dn;
                    for (int d = 0; d < dv; d++) o[d] += P[i * T + j] * vj[d];
                }
            }
        }
}
/* dprobs through V, the softmax, then the scores into q, k^C (in dkv) and the shared k^R. */
static void attention_backward(float *dq, float *dkv, float *dk_pe, const float *dout,
                               const float *probs, const float *q, const float *kv,
                               const float *k_pe, int B, int T, const Config *c, float scale) {
    int H = c->num_attention_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim,
        dv = c->v_head_dim;
    int dq_width = dn + dr, kvw = dn + dv;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            const float *P = probs + (((size_t)b * H + h) * T) * T;
            float *dp = xcalloc(T, sizeof(float));
            for (int i = 0; i < T; i++) {
                const float *doi = dout + ((size_t)(b * T + i) * H + h) * dv;
                double sum = 0;
                for (int j = 0; j <= i; j++) {
                    const float *vj = kv + ((size_t)(b * T + j) * H + h) * kvw + dn;
                    float *dvj = dkv + ((size_t)(b * T + j) * H + h) * kvw + dn;
                    dp[j] = dot_f32(doi, vj, dv);
                    for (int d = 0; d < dv; d++) dvj[d] += P[i * T + j] * doi[d];
                    sum += dp[j] * P[i * T + j];
                }
                const float *qi = q + ((size_t)(b * T + i) * H + h) * dq_width;
                float *dqi = dq + ((size_t)(b * T + i) * H + h) * dq_width;
                for (int j = 0; j <= i; j++) {
                    float ds = P[i * T + j] * (dp[j] - (float)sum) * scale;
                    const float *kj = kv + ((size_t)(b * T + j) * H + h) * kvw,
                                *kpe = k_pe + (size_t)(b * T + j) * dr;
                    float *dkj = dkv + ((size_t)(b * T + j) * H + h) * kvw,
                          *dkpej = dk_pe + (size_t)(b * T + j) * dr;
                    for (int d = 0; d < dn; d++) { dqi[d] += ds * kj[d]; dkj[d] += ds * qi[d]; }
                    for (int d = 0; d < dr; d++) {
                        dqi[dn + d] += ds * kpe[d];
#pragma omp atomic
                        dkpej[d] += ds * qi[dn + d];  /* every head adds into the shared key */
                    }
                }
            }
            free(dp);
        }
}

/* --- SwiGLU MLP over N rows: out = down(silu(g) * u), g = gate x, u = up x; h is scratch --- */
static void swiglu_forward(float *out, float *g, float *u, float *h, const float *x, int N,
                           const Mat *gate, const Mat *up, const Mat *down) {
    matmul_forward(g, gate, x, N);
    matmul_forward(u, up, x, N);
    for (size_t i = 0; i < (size_t)N * gate->rows; i++) h[i] = silu(g[i]) * u[i];
    matmul_forward(out, down, h, N);
}
static float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }
/* h, dh: scratch [N][width]. The weight gradients go to the grads' Mats dgate, dup, ddown. */
static void swiglu_backward(float *dx, const Mat *dgate, const Mat *dup, const Mat *ddown,
                            const float *dout, const float *x, const float *g, const float *u,
                            int N, const Mat *gate, const Mat *up, const Mat *down, float *h,
                            float *dh) {
    size_t m = (size_t)N * gate->rows;
    for (size_t i = 0; i < m; i++) h[i] = silu(g[i]) * u[i];
    zero(dh, m);
    matmul_backward(dh, ddown, dout, h, down, N);
    for (size_t i = 0; i < m; i++) {  /* dh -> dg (into h), du (into dh) */
        float sg = sigmoidf(g[i]), dsilu = sg * (1.0f + g[i] * (1.0f - sg));
        float dhi = dh[i];
        h[i] = dhi * u[i] * dsilu;
        dh[i] = dhi * silu(g[i]);
    }
    matmul_backward(dx, dgate, h, x, gate, N);
    matmul_backward(dx, dup, dh, x, up, N);
}

/* --- the router (router_forward in Part 1): gate values g_i,t and the balance loss into the
 * scores s_i,t (dscores holds the balance loss's share already), then the softmax and e_i --- */
static void router_backward(float *dx, const Mat *drouter, float *dscores, const float *dwt,
                            const float *scores, const int *idx, const float *wt, const float *x,
                            const Mat *router, int N, const Config *c) {
    int E = c->n_routed_experts, K = c->num_experts_per_tok;
    for (int t = 0; t < N; t++) {  /* gate values -> scores: renormalised, or scaled */
        const float *sc = scores + (size_t)t * E;
        if (K > 1 && c->norm_topk_prob) {
            double z = 1e-20, wdw = 0;
            for (int k = 0; k < K; k++) {
                z += sc[idx[t * K + k]];
                wdw += dwt[t * K + k] * wt[t * K + k];
            }
            for (int k = 0; k < K; k++)
                dscores[(size_t)t * E + idx[t * K + k]] += (float)((dwt[t * K + k] - wdw) / z);
        } else
            for (int k = 0; k < K; k++)
                dscores[(size_t)t * E + idx[t * K + k]] +=
                        (float)(dwt[t * K + k] * c->routed_scaling_factor);
    }
    for (int t = 0; t < N; t++) {  /* softmax backward: s * (ds - sum ds s) */
        float *ds = dscores + (size_t)t * E;
        const float *sc = scores + (size_t)t * E;
        double sum = 0;
        for (int e = 0; e < E; e++) sum += ds[e] * sc[e];
        for (int e = 0; e < E; e++) ds[e] = sc[e] * (ds[e] - (float)sum);
    }
    matmul_backward(dx, drouter, dscores, x, router, N);
}

/* --- the balance loss (balance_loss in Part 1): d/ds_i,t = alpha f_i / (groups * per), the
 * counts f_i constant --- */
static void balance_loss_backward(float *dscores, const int *idx, int B, int T, const Config *c) {
    int E = c->n_routed_experts, K = c->num_experts_per_tok, N = B * T;
    int groups = c->seq_aux ? B : 1, per = N / groups;
    for (int b = 0; b < groups; b++)
        for (int e = 0; e < E; e++) {
            int count = 0;
            for (int t = b * per; t < (b + 1) * per; t++)
                for (int k = 0; k < K; k++) count += idx[t * K + k] == e;
            float d = (float)(c->aux_loss_alpha * (count / ((double)per * K / E)) /
                              ((double)per * groups));
            for (int t = b * per; t < (b + 1) * per; t++) dscores[(size_t)t * E + e] += d;
        }
}

/* --- cross-entropy: logits become softmax probabilities in place; returns the mean --- */
static double crossentropy_forward(float *logits, const int *targets, int N, int V) {
    double ce = 0;
    for (int t = 0; t < N; t++) {
        float *p = logits + (size_t)t * V;
        softmax(p, V);
        ce -= log(fmax(p[targets[t]], 1e-30));
    }
    return ce / N;
}
/* d mean CE / d logits = (p - onehot) / N, in place over the probabilities. */
static void crossentropy_backward(float *probs, const int *targets, int N, int V) {
    for (int t = 0; t < N; t++) {
        for (int v = 0; v < V; v++) probs[(size_t)t * V + v] /= N;
        probs[(size_t)t * V + targets[t]] -= 1.0f / N;
    }
}

/* Forward values kept for the backward pass, per layer (N = B*T rows). */
typedef struct {
    float *x_in, *xn1, *rstd1;        /* the layer's input, its norm [N][D], 1/rms [N] */
    float *q_a, *q_an, *rstd_q;       /* q LoRA: W^DQ h [N][rq], normed: c^Q */
    float *q;                         /* [N][H*dq], RoPE applied */
    float *c_raw, *c, *rstd_c;        /* the latent before and after its norm [N][r] */
    float *k_pe;                      /* the rotated shared rope key [N][dr] */
    float *kv;                        /* k^C | v^C per head [N][H*(dn+dv)] */
    float *probs;                     /* attention probabilities [B][H][T][T] */
    float *attn;                      /* o_t,i [N][H*dv] */
    float *x_mid, *xn2, *rstd2;       /* after attention, its norm */
    float *g, *u;                     /* dense MLP or shared experts: gate, up [N][width] */
    float *scores;                    /* router softmax s_i,t [N][E] */
    int *idx;                         /* [N][K] chosen experts */
    float *wt;                        /* [N][K] their gate values */
    float *eg, *eu, *eo;              /* per slot t*K+k: expert gate, up [N*K][Im], out [N*K][D] */
} LayerActs;

typedef struct {
    int B, T, N;
    LayerActs *layers;
    float *residual;                  /* the residual stream h [N][D]; after the last layer: */
    float *xf, *rstd_f;               /* its final norm */
    float *logits;                    /* [N][V], softmax probabilities after the loss */
    float *aux;                       /* [L] balance loss per layer (0 for dense layers) */
    double ce;                        /* mean cross-entropy */
    float *branch, *kv_a;             /* a block's output [N][D]; kv_a_proj's output [N][r+dr] */
    int *slots;                       /* one expert's (token, choice) slots [N*K] */
    float *expert_x, *expert_out;     /* one expert's rows gathered [N*K][D] */
    float *expert_g, *expert_u;       /* [N*K][Im] */
    float *swiglu_h, *swiglu_dh;      /* SwiGLU scratch [N*max(K*Im, width)] */
    /* gradients of the activations */
    float *dresidual, *dxf, *dnorm;   /* [N][D] */
    float *dwt, *dscores;             /* [N*K], [N][E] */
    float *expert_dout, *expert_dx;   /* [N*K][D] */
    float *dattn, *dq, *dkv, *dk_pe;  /* as attn, q, kv, k_pe */
    float *dc, *dc_raw, *dkv_a;       /* [N][r], [N][r], [N][r+dr] */
    float *dq_an, *dq_a;              /* [N][rq] */
} TrainState;

/* The sizes every training buffer is made of. */
typedef struct { size_t N, D, H, E, K, r, dr, rq, dq, dv, kvw, Im, width; } TrainDims;

static TrainDims train_dims(const Config *c, int B, int T) {
    size_t dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim, dv = c->v_head_dim;
    return (TrainDims){.N = (size_t)B * T, .D = c->hidden_size, .H = c->num_attention_heads,
                       .E = c->n_routed_experts, .K = c->num_experts_per_tok, .r = c->kv_lora_rank,
                       .dr = dr, .rq = c->q_lora_rank, .dq = dn + dr, .dv = dv, .kvw = dn + dv,
                       .Im = c->moe_intermediate_size,
                       .width = max_int(c->intermediate_size,
                                        c->moe_intermediate_size * c->n_shared_experts)};
}

static void layer_acts_init(LayerActs *a, const Config *c, int B, int T) {
    TrainDims d = train_dims(c, B, T);
    size_t N = d.N, D = d.D, H = d.H, E = d.E, K = d.K, r = d.r, dr = d.dr, rq = d.rq, dq = d.dq;
    size_t kvw = d.kvw, Im = d.Im, width = d.width;
    a->x_in = floats(N * D); a->xn1 = floats(N * D); a->rstd1 = floats(N);
    a->q_a = floats(N * rq); a->q_an = floats(N * rq); a->rstd_q = floats(N);
    a->q = floats(N * H * dq);
    a->c_raw = floats(N * r); a->c = floats(N * r); a->rstd_c = floats(N); a->k_pe = floats(N * dr);
    a->kv = floats(N * H * kvw);
    a->probs = floats((size_t)B * H * T * T);
    a->attn = floats(N * H * d.dv);
    a->x_mid = floats(N * D); a->xn2 = floats(N * D); a->rstd2 = floats(N);
    a->g = floats(N * width); a->u = floats(N * width);
    a->scores = floats(N * E); a->idx = xcalloc(N * K, sizeof(int)); a->wt = floats(N * K);
    a->eg = floats(N * K * Im); a->eu = floats(N * K * Im); a->eo = floats(N * K * D);
}

static void layer_acts_free(LayerActs *a) {
    void *bufs[] = {a->x_in,  a->xn1, a->rstd1,  a->q_a,  a->q_an, a->rstd_q, a->q,
                    a->c_raw, a->c,   a->rstd_c, a->k_pe, a->kv,   a->probs,  a->attn,
                    a->x_mid, a->xn2, a->rstd2,  a->g,    a->u,    a->scores, a->idx,
                    a->wt,    a->eg,  a->eu,     a->eo};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
}

static void train_state_init(TrainState *ts, const Config *c, int B, int T) {
    TrainDims d = train_dims(c, B, T);
    size_t N = d.N, D = d.D, H = d.H, E = d.E, K = d.K, r = d.r, dr = d.dr, rq = d.rq, dq = d.dq;
    size_t kvw = d.kvw, Im = d.Im, width = d.width;
    size_t hidden = N * (K * Im > width ? K * Im : width);
    memset(ts, 0, sizeof *ts);
    ts->B = B; ts->T = T; ts->N = (int)N;
    ts->layers = xcalloc(c->num_hidden_layers, sizeof(LayerActs));
    for (int l = 0; l < c->num_hidden_layers; l++) layer_acts_init(&ts->layers[l], c, B, T);
    ts->residual = floats(N * D); ts->xf = floats(N * D); ts->rstd_f = floats(N);
    ts->logits = floats(N * c->vocab_size); ts->aux = floats(c->num_hidden_layers);
    ts->branch = floats(N * D);
    ts->kv_a = floats(N * (r + dr));
    ts->slots = xcalloc(N * K, sizeof(int));
    ts->expert_x = floats(N * K * D); ts->expert_out = floats(N * K * D);
    ts->expert_g = floats(N * K * Im); ts->expert_u = floats(N * K * Im);
    ts->swiglu_h = floats(hidden); ts->swiglu_dh = floats(hidden);
    ts->dresidual = floats(N * D); ts->dxf = floats(N * D); ts->dnorm = floats(N * D);
    ts->dwt = floats(N * K); ts->dscores = floats(N * E);
    ts->expert_dout = floats(N * K * D); ts->expert_dx = floats(N * K * D);
    ts->dattn = floats(N * H * d.dv);
    ts->dq = floats(N * H * dq);
    ts->dkv = floats(N * H * kvw);
    ts->dk_pe = floats(N * dr);
    ts->dc = floats(N * r);
    ts->dc_raw = floats(N * r);
    ts->dkv_a = floats(N * (r + dr));
    ts->dq_an = floats(N * rq); ts->dq_a = floats(N * rq);
}

static void train_state_free(TrainState *ts, const Config *c) {
    for (int l = 0; l < c->num_hidden_layers; l++) layer_acts_free(&ts->layers[l]);
    void *bufs[] = {ts->layers,      ts->residual,  ts->xf,       ts->rstd_f,   ts->logits,
                    ts->aux,         ts->branch,    ts->kv_a,     ts->slots,    ts->expert_x,
                    ts->expert_out,  ts->expert_g,  ts->expert_u, ts->swiglu_h, ts->swiglu_dh,
                    ts->dresidual,   ts->dxf,       ts->dnorm,    ts->dwt,      ts->dscores,
                    ts->expert_dout, ts->expert_dx, ts->dattn,    ts->dq,       ts->dkv,
                    ts->dk_pe,       ts->dc,        ts->dc_raw,   ts->dkv_a,    ts->dq_an,
                    ts->dq_a};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
}

/* The (token, choice) slots t*K+k that chose expert e, in order, into ts->slots. */
static int expert_slots(const TrainState *ts, const int *idx, int e, int K) {
    int m = 0;
    for (int s = 0; s < ts->N * K; s++)
        if (idx[s] == e) ts->slots[m++] = s;
    return m;
}

/* --- the routed experts (eq. 20): out += sum_k g_k FFN^(r)_e_k(x), each expert on its rows;
 * every slot keeps its gate, up and output for the backward pass --- */
static void experts_forward(float *out, LayerActs *a, const Layer *L, TrainState *ts,
                            const Config *c) {
    int D = c->hidden_size, E = c->n_routed_experts, K = c->num_experts_per_tok,
        Im = c->moe_intermediate_size;
    for (int e = 0; e < E; e++) {
        int m = expert_slots(ts, a->idx, e, K);
        if (!m) continue;
        for (int j = 0; j < m; j++)
            memcpy(ts->expert_x + (size_t)j * D, a->xn2 + (size_t)(ts->slots[j] / K) * D, D * 4);
        swiglu_forward(ts->expert_out, ts->expert_g, ts->expert_u, ts->swiglu_h, ts->expert_x, m,
                       &L->expert_gate[e], &L->expert_up[e], &L->expert_down[e]);
        for (int j = 0; j < m; j++) {
            int slot = ts->slots[j];
            memcpy(a->eg + (size_t)slot * Im, ts->expert_g + (size_t)j * Im, Im * 4);
            memcpy(a->eu + (size_t)slot * Im, ts->expert_u + (size_t)j * Im, Im * 4);
            memcpy(a->eo + (size_t)slot * D, ts->expert_out + (size_t)j * D, D * 4);
        }
    }
    for (int s = 0; s < ts->N * K; s++)
        for (int i = 0; i < D; i++)
            out[(size_t)(s / K) * D + i] += a->wt[s] * a->eo[(size_t)s * D + i];
}
/* dx += each expert's input gradient; dwt = d loss / d g (dout . expert output). */
static void experts_backward(float *dx, const Layer *G, float *dwt, const float *dout,
                             const LayerActs *a, const Layer *L, TrainState *ts, const Config *c) {
    int D = c->hidden_size, E = c->n_routed_experts, K = c->num_experts_per_tok,
        Im = c->moe_intermediate_size;
    for (int s = 0; s < ts->N * K; s++)
        dwt[s] = dot_f32(dout + (size_t)(s / K) * D, a->eo + (size_t)s * D, D);
    for (int e = 0; e < E; e++) {
        int m = expert_slots(ts, a->idx, e, K);
        if (!m) continue;
        for (int j = 0; j < m; j++) {
            int s = ts->slots[j];
            memcpy(ts->expert_x + (size_t)j * D, a->xn2 + (size_t)(s / K) * D, D * 4);
            for (int i = 0; i < D; i++)
                ts->expert_dout[(size_t)j * D + i] = a->wt[s] * dout[(size_t)(s / K) * D + i];
            memcpy(ts->expert_g + (size_t)j * Im, a->eg + (size_t)s * Im, Im * 4);
            memcpy(ts->expert_u + (size_t)j * Im, a->eu + (size_t)s * Im, Im * 4);
        }
        zero(ts->expert_dx, (size_t)m * D);
        swiglu_backward(ts->expert_dx, &G->expert_gate[e], &G->expert_up[e], &G->expert_down[e],
                        ts->expert_dout, ts->expert_x, ts->expert_g, ts->expert_u, m,
                        &L->expert_gate[e], &L->expert_up[e], &L->expert_down[e], ts->swiglu_h,
                        ts->swiglu_dh);
        for (int j = 0; j < m; j++)
            for (int i = 0; i < D; i++)
                dx[(size_t)(ts->slots[j] / K) * D + i] += ts->expert_dx[(size_t)j * D + i];
    }
}

/* --- the attention block: h += W^O MLA(norm(h)), decompressed (the naive form) --- */
static void attention_block_forward(float *x, const Layer *L, LayerActs *a, TrainState *ts,
                                    const RunState *rs, const Config *c) {
    int N = ts->N, D = c->hidden_size, H = c->num_attention_heads, r = c->kv_lora_rank,
        dr = c->qk_rope_head_dim;
    int dn = c->qk_nope_head_dim, dq = dn + dr;
    memcpy(a->x_in, x, (size_t)N * D * 4);
    rmsnorm_forward(a->xn1, a->rstd1, x, L->input_norm, N, D, c->rms_norm_eps);
    if (c->q_lora_rank > 0) {
        matmul_forward(a->q_a, &L->q_a_proj, a->xn1, N);                          /* eq. 12 */
        rmsnorm_forward(a->q_an, a->rstd_q, a->q_a, L->q_a_norm, N, c->q_lora_rank, 1e-6);
        matmul_forward(a->q, &L->q_b_proj, a->q_an, N);                           /* eq. 13-14 */
    } else matmul_forward(a->q, &L->q_proj, a->xn1, N);
    matmul_forward(ts->kv_a, &L->kv_a_proj, a->xn1, N);                          /* eq. 9, 15 */
    latent_split_forward(a->c_raw, a->k_pe, ts->kv_a, N, r, dr);
    rope_forward(a->k_pe, N, ts->T, 1, dr, rs);                                  /* eq. 15 */
    rope_forward(a->q + dn, N, ts->T, H, dq, rs);                                /* eq. 14 */
    rmsnorm_forward(a->c, a->rstd_c, a->c_raw, L->kv_a_norm, N, r, 1e-6);       /* eq. 9 */
    matmul_forward(a->kv, &L->kv_b_proj, a->c, N);                               /* eq. 10-11 */
    attention_forward(a->attn, a->probs, a->q, a->kv, a->k_pe, ts->B, ts->T, c,
                      (float)rs->softmax_scale);
    matmul_forward(ts->branch, &L->o_proj, a->attn, N);                          /* eq. 19 */
    residual_forward(x, ts->branch, (size_t)N * D);
}
static void attention_block_backward(float *dx, const Layer *G, const Layer *L, const LayerActs *a,
                                     TrainState *ts, const RunState *rs, const Config *c) {
    int N = ts->N, D = c->hidden_size, H = c->num_attention_heads, r = c->kv_lora_rank,
        dr = c->qk_rope_head_dim;
    int dn = c->qk_nope_head_dim, dq = dn + dr, rq = c->q_lora_rank;
    zero(ts->dattn, (size_t)N * H * c->v_head_dim);
    matmul_backward(ts->dattn, &G->o_proj, dx, a->attn, &L->o_proj, N);
    zero(ts->dq, (size_t)N * H * dq);
    zero(ts->dkv, (size_t)N * H * (dn + c->v_head_dim));
    zero(ts->dk_pe, (size_t)N * dr);
    attention_backward(ts->dq, ts->dkv, ts->dk_pe, ts->dattn, a->probs, a->q, a->kv, a->k_pe, ts->B,
                       ts->T, c, (float)rs->softmax_scale);
    zero(ts->dc, (size_t)N * r);
    matmul_backward(ts->dc, &G->kv_b_proj, ts->dkv, a->c, &L->kv_b_proj, N);
    zero(ts->dc_raw, (size_t)N * r);
    rmsnorm_backward(ts->dc_raw, mut(G->kv_a_norm), ts->dc, a->c_raw, L->kv_a_norm, a->rstd_c, N,
                     r);
    rope_backward(ts->dq + dn, N, ts->T, H, dq, rs);
    rope_backward(ts->dk_pe, N, ts->T, 1, dr, rs);
    latent_split_backward(ts->dkv_a, ts->dc_raw, ts->dk_pe, N, r, dr);
    zero(ts->dnorm, (size_t)N * D);
    matmul_backward(ts->dnorm, &G->kv_a_proj, ts->dkv_a, a->xn1, &L->kv_a_proj, N);
    if (rq > 0) {
        zero(ts->dq_an, (size_t)N * rq);
        matmul_backward(ts->dq_an, &G->q_b_proj, ts->dq, a->q_an, &L->q_b_proj, N);
        zero(ts->dq_a, (size_t)N * rq);
        rmsnorm_backward(ts->dq_a, mut(G->q_a_norm), ts->dq_an, a->q_a, L->q_a_norm, a->rstd_q, N,
                         rq);
        matmul_backward(ts->dnorm, &G->q_a_proj, ts->dq_a, a->xn1, &L->q_a_proj, N);
    } else matmul_backward(ts->dnorm, &G->q_proj, ts->dq, a->xn1, &L->q_proj, N);
    rmsnorm_backward(dx, mut(G->input_norm), ts->dnorm, a->x_in, L->input_norm, a->rstd1, N, D);
}

/* --- the FFN block: h += FFN(norm(h)): the dense MLP, or shared + routed experts (eq. 20) --- */
static void ffn_block_forward(float *x, const Layer *L, LayerActs *a, TrainState *ts, RunState *rs,
                              const Config *c, int l) {
    int N = ts->N, D = c->hidden_size;
    memcpy(a->x_mid, x, (size_t)N * D * 4);
    rmsnorm_forward(a->xn2, a->rstd2, x, L->post_attention_norm, N, D, c->rms_norm_eps);
    ts->aux[l] = 0.0f;
    if (L->has_mlp)
        swiglu_forward(ts->branch, a->g, a->u, ts->swiglu_h, a->xn2, N, &L->mlp_gate, &L->mlp_up,
                       &L->mlp_down);
    else zero(ts->branch, (size_t)N * D);
    if (L->is_moe) {
        router_forward(a->scores, a->idx, a->wt, a->xn2, &L->router, N, c, &rs->router, NULL);
        experts_forward(ts->branch, a, L, ts, c);                              /* eq. 20-22 */
        ts->aux[l] = (float)balance_loss(a->scores, a->idx, ts->B, ts->T, c);  /* eq. 23-25 */
    }
    residual_forward(x, ts->branch, (size_t)N * D);
}
static void ffn_block_backward(float *dx, const Layer *G, const Layer *L, const LayerActs *a,
                               TrainState *ts, const Config *c) {
    int N = ts->N, D = c->hidden_size;
    zero(ts->dnorm, (size_t)N * D);
    if (L->has_mlp)
        swiglu_backward(ts->dnorm, &G->mlp_gate, &G->mlp_up, &G->mlp_down, dx, a->xn2, a->g, a->u,
                        N, &L->mlp_gate, &L->mlp_up, &L->mlp_down, ts->swiglu_h, ts->swiglu_dh);
    if (L->is_moe) {
        experts_backward(ts->dnorm, G, ts->dwt, dx, a, L, ts, c);
        zero(ts->dscores, (size_t)N * c->n_routed_experts);
        balance_loss_backward(ts->dscores, a->idx, ts->B, ts->T, c);
        router_backward(ts->dnorm, &G->router, ts->dscores, ts->dwt, a->scores, a->idx, a->wt,
                        a->xn2, &L->router, N, c);
    }
    rmsnorm_backward(dx, mut(G->post_attention_norm), ts->dnorm, a->x_mid, L->post_attention_norm,
                     a->rstd2, N, D);
}

/* One training forward over B sequences of T tokens, saving activations: returns the mean CE
 * plus the sum of the balance losses. The logits become softmax probabilities. */
static double train_forward(const Params *p, TrainState *ts, RunState *rs, const int *inputs,
                            const int *targets) {
    const Config *c = &p->cfg;
    const Weights *w = &p->w;
    int N = ts->N, D = c->hidden_size;
    embedding_forward(ts->residual, &w->embed, inputs, N);
    for (int l = 0; l < c->num_hidden_layers; l++) {
        attention_block_forward(ts->residual, &w->layers[l], &ts->layers[l], ts, rs, c);
        ffn_block_forward(ts->residual, &w->layers[l], &ts->layers[l], ts, rs, c, l);
    }
    rmsnorm_forward(ts->xf, ts->rstd_f, ts->residual, w->final_norm, N, D, c->rms_norm_eps);
    matmul_forward(ts->logits, &w->lm_head, ts->xf, N);
    ts->ce = crossentropy_forward(ts->logits, targets, N, c->vocab_size);
    double total = ts->ce;
    for (int l = 0; l < c->num_hidden_layers; l++) total += ts->aux[l];
    return total;
}

/* Gradients of that loss into grads (accumulated): the forward's calls in reverse. */
static void train_backward(const Params *p, const Params *grads, TrainState *ts, RunState *rs,
                           const int *inputs, const int *targets) {
    const Config *c = &p->cfg;
    const Weights *w = &p->w, *gw = &grads->w;
    int N = ts->N, D = c->hidden_size;
    crossentropy_backward(ts->logits, targets, N, c->vocab_size);
    zero(ts->dxf, (size_t)N * D);
    matmul_backward(ts->dxf, &gw->lm_head, ts->logits, ts->xf, &w->lm_head, N);
    zero(ts->dresidual, (size_t)N * D);
    rmsnorm_backward(ts->dresidual, mut(gw->final_norm), ts->dxf, ts->residual, w->final_norm,
                     ts->rstd_f, N, D);
    for (int l = c->num_hidden_layers - 1; l >= 0; l--) {
        ffn_block_backward(ts->dresidual, &gw->layers[l], &w->layers[l], &ts->layers[l], ts, c);
        attention_block_backward(ts->dresidual, &gw->layers[l], &w->layers[l], &ts->layers[l], ts,
                                 rs, c);
    }
    embedding_backward(&gw->embed, ts->dresidual, inputs, N);
}

/* An f32 checkpoint's tensors into p (initialised from its config). */
static void params_load(Params *p, const char *path) {
    Weights w;
    memset(&w, 0, sizeof w);
    load_weights(&w, path, WEIGHTS_MMAP);
    if (w.cfg.dtype != DTYPE_F32)
        die("%s: training needs an f32 checkpoint (export with --dtype f32)", path);
    params_init(p, &w.cfg);
    memcpy(p->buf + HEADER_SIZE, (const char *)w.map + HEADER_SIZE, p->size - HEADER_SIZE);
    free_weights(&w);
}

/* Writes p as a checkpoint (with the tokenizer blob, if any): the same format ./dsv2 runs. */
static void params_save(const Params *p, const char *path, const void *tokenizer,
                        size_t tokenizer_size) {
    OutputFile out;
    output_open(&out, path);
    Config c = p->cfg;
    size_t tok_offset = (p->size + TENSOR_ALIGN - 1) / TENSOR_ALIGN * TENSOR_ALIGN;
    c.tokenizer_offset = tokenizer_size ? tok_offset : 0;
    c.tokenizer_size = tokenizer_size;
    c.file_size = tokenizer_size ? tok_offset + tokenizer_size : p->size;
    static const char zeros[TENSOR_ALIGN] = {0};
    fwrite(&c, sizeof c, 1, out.f);
    fwrite(p->buf + HEADER_SIZE, 1, p->size - HEADER_SIZE, out.f);
    if (tokenizer_size) {
        fwrite(zeros, 1, tok_offset - p->size, out.f);
        fwrite(tokenizer, 1, tokenizer_size, out.f);
    }
    output_close(&out);
}


/* AdamW as torch.optim.AdamW, on every parameter (zero gradients still decay). step counts from 1.
 */
typedef struct { float lr, beta1, beta2, eps, weight_decay; } AdamW;

static void adamw_step(Params *p, const Params *g, float *m, float *v, const AdamW *opt, int step) {
    float *x = params_data(p);
    const float *gr = params_data(g);
    size_t n = params_count(p);
    double bc1 = 1.0 - pow(opt->beta1, step), bc2 = sqrt(1.0 - pow(opt->beta2, step));
    float lr_t = (float)(opt->lr / bc1);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        x[i] *= 1.0f - opt->lr * opt->weight_decay;
        m[i] = opt->beta1 * m[i] + (1.0f - opt->beta1) * gr[i];
        v[i] = opt->beta2 * v[i] + (1.0f - opt->beta2) * gr[i] * gr[i];
        x[i] -= lr_t * m[i] / (sqrtf(v[i]) / (float)bc2 + opt->eps);
    }
}

/* --- The training loop: `./dsv2 INIT.bin -m train -f corpus.txt -o model.bin` --- */

/* Random windows of seq_len + 1 tokens: inputs and the targets shifted by one. */
static void sample_batch(const int *tokens, int n_tokens, int B, int T, int *inputs, int *targets,
                         uint64_t *rng) {
    for (int b = 0; b < B; b++) {
        int start = (int)(random_u32(rng) % (uint32_t)(n_tokens - T - 1));
        for (int t = 0; t < T; t++) {
            inputs[b * T + t] = tokens[start + t];
            targets[b * T + t] = tokens[start + t + 1];
        }
    }
}

/* Mean CE over fixed windows of the held-out text (the same windows every time). */
static double validation_loss(const Params *p, TrainState *ts, RunState *rs, const int *tokens,
                              int n_tokens, int *inputs, int *targets) {
    int B = ts->B, T = ts->T, windows = 0;
    double sum = 0;
    for (int start = 0; start + B * (T + 1) <= n_tokens && windows < 8;
         start += B * (T + 1), windows++) {
        for (int b = 0; b < B; b++)
            for (int t = 0; t < T; t++) {
                inputs[b * T + t] = tokens[start + b * (T + 1) + t];
                targets[b * T + t] = tokens[start + b * (T + 1) + t + 1];
            }
        train_forward(p, ts, rs, inputs, targets);
        sum += ts->ce;
    }
    return windows ? sum / windows : NAN;
}

/* The loss curve of a training CSV (every row, so a resumed run's too): train loss per step,
 * its moving average, and the validation loss (dots). */
static void write_loss_svg(const char *path, const char *csv_path) {
    char *text = read_file(csv_path, NULL);
    int n = 0, cap = 256;
    double *step = xcalloc(cap, sizeof(double)), *train = xcalloc(cap, sizeof(double));
    double *val = xcalloc(cap, sizeof(double));
    for (char *line = strchr(text, '\n'); line && line[1]; line = strchr(line + 1, '\n')) {
        int s, fields = 0;
        float loss, ce;
        if (sscanf(line + 1, "%d,%f,%f,", &s, &loss, &ce) != 3) continue;
        if (n == cap) {
            cap *= 2;
            step = realloc(step, cap * sizeof(double));
            train = realloc(train, cap * sizeof(double));
            val = realloc(val, cap * sizeof(double));
            if (!step || !train || !val) die("out of memory");
        }
        const char *v = line + 1;  /* the validation field: after the third comma */
        while (*v && *v != '\n' && fields < 3) fields += *v++ == ',';
        step[n] = s;
        train[n] = loss;
        val[n++] = *v == ',' || *v == '\n' || !*v ? NAN : strtod(v, NULL);
    }
    free(text);
    double lo = 1e300, hi = -1e300, *smooth = xcalloc(n + 1, sizeof(double)), dots_x[n + 1],
           dots_y[n + 1];
    int dots = 0;
    for (int i = 0; i < n; i++) {
        lo = fmin(lo, train[i]);
        hi = fmax(hi, train[i]);
        if (!isnan(val[i])) { dots_x[dots] = step[i]; dots_y[dots++] = val[i]; }
    }
    for (int i = 0; i < dots; i++) { lo = fmin(lo, dots_y[i]); hi = fmax(hi, dots_y[i]); }
    int half = n / 40 > 1 ? n / 40 : 1;  /* a centred moving average over 2 half + 1 steps */
    for (int i = 0; i < n; i++) {
        int a = i - half > 0 ? i - half : 0, b = i + half < n - 1 ? i + half : n - 1;
        for (int j = a; j <= b; j++) smooth[i] += train[j] / (b - a + 1);
    }
    Plot p;
    char title[96];
    snprintf(title, sizeof title, "Training loss, steps %d..%d", n ? (int)step[0] : 0,
             n ? (int)step[n - 1] : 0);
    svg_open(&p, path, 720, 460, title);
    plot_area(&p, 90, 40, 590, 340, n ? step[0] : 0, n ? step[n - 1] : 1, n ? floor(lo) : 0,
              n ? ceil(hi) : 1);
    plot_line(&p, step, train, n, "#9ecae1", "", 1);
    plot_line(&p, step, smooth, n, "steelblue", "", 2);
    for (int i = 0; i < dots; i++)
        fprintf(p.f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3.5\" fill=\"darkorange\"/>\n",
                plot_px(&p, dots_x[i]), plot_py(&p, dots_y[i]));
    plot_axes(&p, "step", "loss (nats/token)", tick_number, tick_number, 10, 10);
    LegendEntry e[3] = {{"train loss, each step", "#9ecae1", NULL, 0},
                        {"train loss, moving average", "steelblue", NULL, 0},
                        {"validation loss", "darkorange", NULL, 1}};
    plot_legend(&p, e, 3, -1, 0);
    svg_close(&p);
    free(step); free(train); free(val); free(smooth);
}

/* Adam's moments and step beside a checkpoint (OUT.adam), so training can resume from it. */
/* OUT.adam: u64 parameter count, i32 steps done, i32 steps of the learning-rate schedule,
 * then the first and second moments, float32 each in the checkpoint's layout. */
static int adam_state_load(const char *model_path, float *m, float *v, size_t n, int *step,
                           int *total) {
    char path[4096];
    snprintf(path, sizeof path, "%s.adam", model_path);
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    uint64_t count = 0;
    int32_t s[2] = {0, 0};
    int ok = fread(&count, 8, 1, f) == 1 && count == n && fread(s, 4, 2, f) == 2 &&
            fread(m, 4, n, f) == n && fread(v, 4, n, f) == n && fgetc(f) == EOF && s[0] >= 1 &&
            s[1] >= 1;
    fclose(f);
    if (!ok)
        die("%s does not match %s (another model's or an older dsv2's optimizer state?)", path,
            model_path);
    *step = s[0];
    *total = s[1];
    return 1;
}

static void adam_state_save(const char *model_path, const float *m, const float *v, size_t n,
                            int step, int total) {
    char path[4096];
    snprintf(path, sizeof path, "%s.adam", model_path);
    OutputFile out;
    output_open(&out, path);
    uint64_t count = n;
    int32_t s[2] = {step, total};
    fwrite(&count, 8, 1, out.f);
    fwrite(s, 4, 2, out.f);
    fwrite(m, 4, n, out.f);
    fwrite(v, 4, n, out.f);
    output_close(&out);
}

/* The corpus as ids: the last 5% of its lines held out for validation. */
static void encode_corpus(Tokenizer *tok, const char *path, IdList *train_ids, IdList *val_ids) {
    size_t text_len = 0;
    char *text = read_file(path, &text_len);
    size_t split = text_len, total = 0, seen = 0;
    for (size_t i = 0; i < text_len; i++) total += text[i] == '\n';
    for (size_t i = 0; i < text_len && total > 20; i++)
        if (text[i] == '\n' && ++seen == total - total / 20) { split = i + 1; break; }
    tokenizer_encode(tok, text, split, 0, train_ids);
    tokenizer_encode(tok, text + split, text_len - split, 0, val_ids);
    free(text);
}

/* Warmup over the first 5% of the schedule's steps, then a cosine down to 10% of the peak. A
 * resumed run continues the schedule it started with. */
static float learning_rate(float peak, int step, int total_steps) {
    int warmup = total_steps / 20 + 1;
    if (step > total_steps) return 0.1f * peak;  /* a resumed run past the schedule: its floor */
    if (step <= warmup) return peak * step / warmup;
    return peak *
            (0.1f +
             0.45f * (1 + cosf(3.14159265f * (step - warmup) / fmaxf(1, total_steps - warmup))));
}

/* One line on stderr: the losses, and each MoE layer's expert load as the min-max share. */
static void log_step(const Params *p, const TrainState *ts, int step, double loss, float lr,
                     double tps, float val) {
    const Config *c = &p->cfg;
    int slots = ts->N * c->num_experts_per_tok;
    fprintf(stderr, "step %5d  loss %.4f  ce %.4f  lr %.2e  %.0f tok/s", step, loss, ts->ce, lr,
            tps);
    if (!isnan(val)) fprintf(stderr, "  val %.4f", val);
    fprintf(stderr, "  expert load (min-max share per layer):");
    int *count = xcalloc(c->n_routed_experts, sizeof(int));
    for (int l = 0; l < c->num_hidden_layers; l++) {
        if (!p->w.layers[l].is_moe) continue;
        memset(count, 0, c->n_routed_experts * sizeof(int));
        for (int k = 0; k < slots; k++) count[ts->layers[l].idx[k]]++;
        int lo = count[0], hi = count[0];
        for (int e = 1; e < c->n_routed_experts; e++) {
            lo = count[e] < lo ? count[e] : lo;
            hi = count[e] > hi ? count[e] : hi;
        }
        fprintf(stderr, " %.0f-%.0f%%", 100.0 * lo / slots, 100.0 * hi / slots);
    }
    free(count);
    fprintf(stderr, "\n");
}

/* Everything one run of training holds. */
typedef struct {
    Params p, g;
    TrainState ts;
    RunState rs;
    Weights view;                 /* the initial file, for its tokenizer */
    Tokenizer tok;
    IdList train_ids, val_ids;
    float *m, *v;                 /* Adam's moments */
    int *inputs, *targets;
} Trainer;

static void trainer_open(Trainer *tr, const char *init_path, const TrainOptions *o) {
    memset(tr, 0, sizeof *tr);
    params_load(&tr->p, init_path);
    const Config *c = &tr->p.cfg;
    load_weights(&tr->view, init_path, WEIGHTS_MMAP);
    if (!load_tokenizer_file(&tr->tok, init_path, &tr->view))
        die("%s has no tokenizer: training encodes text with the model's own", init_path);
    if (tr->tok.bos_id != c->bos_token_id || tr->tok.eos_id != c->eos_token_id)
        die("%s: the tokenizer's BOS/EOS are ids %d/%d but the config's are %d/%d", init_path,
            tr->tok.bos_id, tr->tok.eos_id, c->bos_token_id, c->eos_token_id);
    if (o->seq_len > c->max_position_embeddings)
        die("-c %d exceeds max_position_embeddings %d", o->seq_len, c->max_position_embeddings);
    encode_corpus(&tr->tok, o->corpus, &tr->train_ids, &tr->val_ids);
    int B = o->batch, T = o->seq_len;
    if (tr->train_ids.n < T + 2) die("%s is too short for sequences of %d tokens", o->corpus, T);
    fprintf(stderr,
            "train: %d tokens, validation: %d tokens (last 5%% of lines); batch %d x %d, %d "
            "steps\n",
            tr->train_ids.n, tr->val_ids.n, B, T, o->steps);
    params_init(&tr->g, c);
    train_state_init(&tr->ts, c, B, T);
    init_run_state(&tr->rs, c, ATTN_ABSORB, T);
    size_t n = params_count(&tr->p);
    tr->m = floats(n);
    tr->v = floats(n);
    tr->inputs = xcalloc((size_t)B * T, sizeof(int));
    tr->targets = xcalloc((size_t)B * T, sizeof(int));
}

static void trainer_close(Trainer *tr) {
    void *bufs[] = {tr->m, tr->v, tr->inputs, tr->targets, tr->train_ids.ids, tr->val_ids.ids};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    free_run_state(&tr->rs);
    train_state_free(&tr->ts, &tr->p.cfg);
    free_tokenizer(&tr->tok);
    free_weights(&tr->view);
    params_free(&tr->p);
    params_free(&tr->g);
}

static void train(const char *init_path, const TrainOptions *o) {
    Trainer tr;
    trainer_open(&tr, init_path, o);
    const Config *c = &tr.p.cfg;
    size_t n = params_count(&tr.p);
    int done = 0, total = o->steps, B = o->batch, T = o->seq_len;
    if (adam_state_load(init_path, tr.m, tr.v, n, &done, &total))
        fprintf(stderr, "resuming after step %d of a %d-step schedule (%s.adam)\n", done, total,
                init_path);
    AdamW opt = {o->lr, 0.9f, 0.95f, 1e-8f, 0.1f};
    char csv_path[4096], svg_path[4096];
    snprintf(csv_path, sizeof csv_path, "%s.csv", o->out);
    snprintf(svg_path, sizeof svg_path, "%s.svg", o->out);
    FILE *csv = done && access(csv_path, F_OK) == 0 ? fopen(csv_path, "a") : NULL; /* resumed: add
                                                                                      rows */
    if (!csv && (csv = fopen(csv_path, "w")) != NULL)
        fprintf(csv, "step,loss,cross_entropy,validation,lr,tokens_per_s\n");
    if (!csv) die("cannot write %s: %s", csv_path, strerror(errno));
    uint64_t rng = (uint64_t)o->seed * 0x9E3779B97F4A7C15ull + 7;
    ThreadTuner threads;
    tuner_init(&threads);
    for (int s = 0; s < o->steps; s++) {
        int step = done + s + 1, last = s == o->steps - 1;
        opt.lr = learning_rate(o->lr, step, total);
        double t0 = now_seconds();
        tuner_begin(&threads);
        sample_batch(tr.train_ids.ids, tr.train_ids.n, B, T, tr.inputs, tr.targets, &rng);
        double loss = train_forward(&tr.p, &tr.ts, &tr.rs, tr.inputs, tr.targets);
        if (!isfinite(loss))
            die("training diverged at step %d: the loss is %g (lower -r?)", step, loss);
        zero(params_data(&tr.g), n);
        train_backward(&tr.p, &tr.g, &tr.ts, &tr.rs, tr.inputs, tr.targets);
        adamw_step(&tr.p, &tr.g, tr.m, tr.v, &opt, step);
        tuner_end(&threads);
        double tps = B * T / (now_seconds() - t0), ce = tr.ts.ce;
        float val = NAN;
        if ((s + 1) % o->eval_every == 0 || last)
            val = (float)validation_loss(&tr.p, &tr.ts, &tr.rs, tr.val_ids.ids, tr.val_ids.n,
                                         tr.inputs, tr.targets);
        if (isnan(val)) fprintf(csv, "%d,%.5f,%.5f,,%.3g,%.0f\n", step, loss, ce, opt.lr, tps);
        else fprintf(csv, "%d,%.5f,%.5f,%.5f,%.3g,%.0f\n", step, loss, ce, val, opt.lr, tps);
        if (fflush(csv) != 0)
            die("cannot write %s: %s", csv_path, strerror(errno)); /* a stopped run keeps its rows
                                                                    */
        if (s % 10 == 0 || last || !isnan(val))
            log_step(&tr.p, &tr.ts, step, loss, opt.lr, tps, val);
        if (!isnan(val) || last) {  /* checkpoint: the normal model format, plus Adam's state */
            params_save(&tr.p, o->out, (const char *)tr.view.map + c->tokenizer_offset,
                        c->tokenizer_size);
            adam_state_save(o->out, tr.m, tr.v, n, step, total);
            write_loss_svg(svg_path, csv_path);  /* the whole curve so far, resumed runs too */
        }
    }
    tuner_done(&threads);
    if ((ferror(csv) | fclose(csv)) != 0) die("cannot write %s", csv_path);
    fprintf(stderr, "wrote %s, %s, %s\n", o->out, csv_path, svg_path);
    trainer_close(&tr);
}
#endif /* DSV2_TYPES_ONLY */
