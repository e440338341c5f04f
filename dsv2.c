/*
 * dsv2.c: DeepSeek-V2 inference in one readable C file.
 *
 * One architecture covers DeepSeek-V2 (236B), V2-Chat, V2-Lite (16B), V2-Lite-Chat,
 * Coder-V2 and V2.5; only the numbers in the checkpoint header differ.
 * The file reads top to bottom like the paper (arXiv:2405.04434):
 *   config and checkpoint (mmap) -> building blocks (RMSNorm, matvec, RoPE/YaRN)
 *   -> Multi-head Latent Attention (eq. 9-19) -> DeepSeekMoE (eq. 20-23)
 *   -> forward -> sampler -> generation -> CLI.
 *
 * The math follows the official Hugging Face remote code (modeling_deepseek.py),
 * which is what the test fixtures were computed with.
 *
 * Build: make dsv2      Run: ./dsv2 model.bin -i "Hello"
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
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

/* Every bad input ends here: one line on stderr, non-zero exit. */
static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
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

/* ------------------------------------------------------------------------- */
/* Config: the checkpoint header. Every hyper-parameter the forward pass uses  */
/* is stored here; nothing is inferred from a model name. export.py writes it. */
/* ------------------------------------------------------------------------- */

#define DSV2_MAGIC "DSV2"
#define DSV2_VERSION 1
#define HEADER_SIZE 512
#define TENSOR_ALIGN 64

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1 };
enum { TOPK_GREEDY = 0, TOPK_GROUP_LIMITED_GREEDY = 1 };
enum { ROPE_PLAIN = 0, ROPE_YARN = 1 };

typedef struct {
    char magic[4];
    uint32_t version;
    int32_t dtype;                  /* storage of the weight matrices; norms and router are always f32 */
    int32_t vocab_size;
    int32_t hidden_size;            /* D */
    int32_t num_hidden_layers;      /* L */
    int32_t num_attention_heads;    /* H */
    int32_t q_lora_rank;            /* 0: q = q_proj x (V2-Lite); else q = q_b_proj norm(q_a_proj x) */
    int32_t kv_lora_rank;           /* the latent size that the KV cache stores */
    int32_t qk_nope_head_dim;
    int32_t qk_rope_head_dim;
    int32_t v_head_dim;
    int32_t intermediate_size;      /* dense layers */
    int32_t moe_intermediate_size;  /* each routed expert */
    int32_t n_routed_experts;       /* 0: no MoE layers at all */
    int32_t n_shared_experts;
    int32_t num_experts_per_tok;
    int32_t topk_method;
    int32_t n_group;
    int32_t topk_group;
    int32_t norm_topk_prob;
    int32_t first_k_dense_replace;
    int32_t moe_layer_freq;
    int32_t max_position_embeddings;
    int32_t bos_token_id;
    int32_t eos_token_id;
    int32_t rope_scaling;           /* ROPE_PLAIN or ROPE_YARN */
    int32_t original_max_position_embeddings;
    int32_t seq_aux;
    int32_t reserved_int[5];
    double rms_norm_eps;
    double rope_theta;
    double routed_scaling_factor;
    double rope_factor;             /* rope_scaling.factor */
    double beta_fast, beta_slow;
    double mscale, mscale_all_dim;
    double aux_loss_alpha;
    double reserved_float[7];
    uint64_t tokenizer_offset;      /* 0: no tokenizer in this file */
    uint64_t tokenizer_size;
    uint64_t file_size;             /* total bytes: catches truncated copies */
    uint64_t reserved_u64;
    char pad[HEADER_SIZE - 8 - 32 * 4 - 16 * 8 - 4 * 8];
} Config;
_Static_assert(sizeof(Config) == HEADER_SIZE, "header layout must match export.py");

/* A layer is MoE iff experts exist, it is past the dense prefix, and on the frequency grid. */
static int is_moe_layer(const Config *c, int l) {
    return c->n_routed_experts > 0 && l >= c->first_k_dense_replace && l % c->moe_layer_freq == 0;
}

static void check_range(const char *name, long long v, long long lo, long long hi) {
    if (v < lo || v > hi) die("config %s = %lld is out of range [%lld, %lld]", name, v, lo, hi);
}

static void validate_config(const Config *c) {
    if (c->dtype != DTYPE_F32 && c->dtype != DTYPE_BF16) die("unknown weight dtype %d", c->dtype);
    check_range("vocab_size", c->vocab_size, 1, 1 << 24);
    check_range("hidden_size", c->hidden_size, 1, 1 << 16);
    check_range("num_hidden_layers", c->num_hidden_layers, 1, 1024);
    check_range("num_attention_heads", c->num_attention_heads, 1, 1024);
    check_range("q_lora_rank", c->q_lora_rank, 0, 1 << 16);
    check_range("kv_lora_rank", c->kv_lora_rank, 1, 1 << 16);
    check_range("qk_nope_head_dim", c->qk_nope_head_dim, 0, 4096);
    check_range("qk_rope_head_dim", c->qk_rope_head_dim, 2, 4096);
    if (c->qk_rope_head_dim % 2) die("config qk_rope_head_dim = %d must be even", c->qk_rope_head_dim);
    check_range("v_head_dim", c->v_head_dim, 1, 4096);
    check_range("max_position_embeddings", c->max_position_embeddings, 1, 1 << 24);
    check_range("num_experts_per_tok", c->num_experts_per_tok, 0, 4096);
    check_range("n_routed_experts", c->n_routed_experts, 0, 1 << 16);
    check_range("n_shared_experts", c->n_shared_experts, 0, 4096);
    check_range("first_k_dense_replace", c->first_k_dense_replace, 0, 1024);
    check_range("moe_layer_freq", c->moe_layer_freq, 1, 1024);
    check_range("bos_token_id", c->bos_token_id, -1, c->vocab_size - 1);
    check_range("eos_token_id", c->eos_token_id, -1, c->vocab_size - 1);
    int any_dense = 0, any_moe = 0;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        if (is_moe_layer(c, l)) any_moe = 1;
        else any_dense = 1;
    }
    if (any_dense) check_range("intermediate_size", c->intermediate_size, 1, 1 << 20);
    if (any_moe) {
        check_range("moe_intermediate_size", c->moe_intermediate_size, 1, 1 << 20);
        check_range("num_experts_per_tok", c->num_experts_per_tok, 1, c->n_routed_experts);
        if (c->topk_method == TOPK_GROUP_LIMITED_GREEDY) {
            check_range("n_group", c->n_group, 1, c->n_routed_experts);
            if (c->n_routed_experts % c->n_group) die("config n_group = %d does not divide n_routed_experts = %d", c->n_group, c->n_routed_experts);
            check_range("topk_group", c->topk_group, 1, c->n_group);
            check_range("num_experts_per_tok", c->num_experts_per_tok, 1, c->topk_group * (c->n_routed_experts / c->n_group));
        } else if (c->topk_method != TOPK_GREEDY) die("unknown topk_method %d", c->topk_method);
    }
    if (c->rope_scaling != ROPE_PLAIN && c->rope_scaling != ROPE_YARN) die("unknown rope_scaling type %d", c->rope_scaling);
    if (!(c->rms_norm_eps > 0 && c->rms_norm_eps < 1)) die("config rms_norm_eps = %g is out of range", c->rms_norm_eps);
    if (!(c->rope_theta > 1)) die("config rope_theta = %g is out of range", c->rope_theta);
    if (!isfinite(c->routed_scaling_factor)) die("config routed_scaling_factor is not finite");
    if (c->rope_scaling == ROPE_YARN) {
        if (!(c->rope_factor > 0 && c->rope_factor < 1e6)) die("config rope_scaling.factor = %g is out of range", c->rope_factor);
        check_range("original_max_position_embeddings", c->original_max_position_embeddings, 1, 1 << 24);
        if (!(c->beta_fast > 0 && c->beta_slow > 0)) die("config rope_scaling beta_fast/beta_slow must be positive");
    }
}

/* ------------------------------------------------------------------------- */
/* Weights: mmapped from the checkpoint and read in place (f32 or bf16).      */
/* ------------------------------------------------------------------------- */

/* A weight matrix [rows, cols] in row-major order, as nn.Linear stores it: y = W x. */
typedef struct {
    const void *data;
    int dtype;
    int rows, cols;
} Mat;

typedef struct {
    const float *input_norm, *post_attention_norm;
    Mat q_proj;                            /* when q_lora_rank == 0 */
    Mat q_a_proj, q_b_proj;                /* when q_lora_rank > 0 */
    const float *q_a_norm;
    Mat kv_a_proj;                         /* [kv_lora_rank + rope_dim, D]: latent rows, then the shared rope key */
    const float *kv_a_norm;
    Mat kv_b_proj;                         /* [H*(nope+v), kv_lora_rank], per head: nope rows then v rows */
    Mat o_proj;                            /* [D, H*v] */
    int is_moe;
    Mat mlp_gate, mlp_up, mlp_down;        /* dense MLP, or the shared experts of an MoE layer */
    int has_mlp;
    Mat router;                            /* [E, D] f32 */
    Mat *expert_gate, *expert_up, *expert_down;
} Layer;

typedef struct {
    Config cfg;
    Mat embed, lm_head;
    const float *final_norm;
    Layer *layers;
    void *map;                              /* the mmapped checkpoint */
    size_t map_size;
} Weights;

static size_t dtype_size(int dtype) { return dtype == DTYPE_BF16 ? 2 : 4; }

/* Lays tensors out in the one order export.py writes them; each starts TENSOR_ALIGN-aligned. */
typedef struct {
    const char *base;  /* NULL while only measuring the size */
    size_t offset;
    int weight_dtype;
} Cursor;

static const void *take(Cursor *cur, size_t bytes) {
    cur->offset = (cur->offset + TENSOR_ALIGN - 1) / TENSOR_ALIGN * TENSOR_ALIGN;
    const void *p = cur->base ? cur->base + cur->offset : NULL;
    cur->offset += bytes;
    return p;
}
static Mat take_mat(Cursor *cur, int rows, int cols, int dtype) {
    Mat m = {NULL, dtype, rows, cols};
    m.data = take(cur, (size_t)rows * cols * dtype_size(dtype));
    return m;
}
static const float *take_vec(Cursor *cur, int n) { return take(cur, (size_t)n * sizeof(float)); }

/* Walks the checkpoint layout; fills w when cur->base is set. Returns the end offset. */
static size_t layout_weights(Weights *w, Cursor *cur) {
    const Config *c = &w->cfg;
    int D = c->hidden_size, H = c->num_attention_heads, W = cur->weight_dtype;
    int q_head_dim = c->qk_nope_head_dim + c->qk_rope_head_dim;
    w->embed = take_mat(cur, c->vocab_size, D, W);
    for (int l = 0; l < c->num_hidden_layers; l++) {
        Layer *L = &w->layers[l];
        L->input_norm = take_vec(cur, D);
        if (c->q_lora_rank > 0) {
            L->q_a_proj = take_mat(cur, c->q_lora_rank, D, W);
            L->q_a_norm = take_vec(cur, c->q_lora_rank);
            L->q_b_proj = take_mat(cur, H * q_head_dim, c->q_lora_rank, W);
        } else {
            L->q_proj = take_mat(cur, H * q_head_dim, D, W);
        }
        L->kv_a_proj = take_mat(cur, c->kv_lora_rank + c->qk_rope_head_dim, D, W);
        L->kv_a_norm = take_vec(cur, c->kv_lora_rank);
        L->kv_b_proj = take_mat(cur, H * (c->qk_nope_head_dim + c->v_head_dim), c->kv_lora_rank, W);
        L->o_proj = take_mat(cur, D, H * c->v_head_dim, W);
        L->post_attention_norm = take_vec(cur, D);
        L->is_moe = is_moe_layer(c, l);
        int mlp_width = L->is_moe ? c->moe_intermediate_size * c->n_shared_experts : c->intermediate_size;
        if (L->is_moe) {
            L->router = take_mat(cur, c->n_routed_experts, D, DTYPE_F32);
            for (int e = 0; e < c->n_routed_experts; e++) {
                L->expert_gate[e] = take_mat(cur, c->moe_intermediate_size, D, W);
                L->expert_up[e] = take_mat(cur, c->moe_intermediate_size, D, W);
                L->expert_down[e] = take_mat(cur, D, c->moe_intermediate_size, W);
            }
        }
        L->has_mlp = mlp_width > 0;
        if (L->has_mlp) {
            L->mlp_gate = take_mat(cur, mlp_width, D, W);
            L->mlp_up = take_mat(cur, mlp_width, D, W);
            L->mlp_down = take_mat(cur, D, mlp_width, W);
        }
    }
    w->final_norm = take_vec(cur, D);
    w->lm_head = take_mat(cur, c->vocab_size, D, W);
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

static void load_weights(Weights *w, const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open model %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) die("cannot stat %s: %s", path, strerror(errno));
    size_t size = (size_t)st.st_size;
    if (size < HEADER_SIZE) die("%s is not a dsv2 checkpoint (only %zu bytes)", path, size);
    if (pread(fd, &w->cfg, HEADER_SIZE, 0) != HEADER_SIZE) die("cannot read header of %s", path);
    const Config *c = &w->cfg;
    if (memcmp(c->magic, DSV2_MAGIC, 4) != 0) die("%s is not a dsv2 checkpoint (bad magic); convert it with export.py", path);
    if (c->version != DSV2_VERSION) die("%s has checkpoint version %u; this build reads version %d", path, c->version, DSV2_VERSION);
    validate_config(c);
    alloc_layers(w);
    Cursor measure = {NULL, HEADER_SIZE, c->dtype};
    size_t end = layout_weights(w, &measure);
    if (c->tokenizer_offset && (c->tokenizer_offset < end || c->tokenizer_offset + c->tokenizer_size > c->file_size))
        die("%s: tokenizer section out of bounds", path);
    if (c->file_size < end) die("%s: header says %llu bytes but the config needs %zu", path, (unsigned long long)c->file_size, end);
    if (size != c->file_size) die("%s is truncated or padded: %zu bytes on disk, header says %llu", path, size, (unsigned long long)c->file_size);
    w->map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (w->map == MAP_FAILED) die("cannot mmap %s: %s", path, strerror(errno));
    w->map_size = size;
    Cursor fill = {(const char *)w->map, HEADER_SIZE, c->dtype};
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

/* ------------------------------------------------------------------------- */
/* Building blocks                                                            */
/* ------------------------------------------------------------------------- */

/* bf16 is the top half of an IEEE float32: widening is a shift. */
static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static float dot_f32(const float *a, const float *b, int n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

static float dot_bf16(const uint16_t *a, const float *b, int n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; i++) sum += bf16_to_f32(a[i]) * b[i];
    return sum;
}

/* Row r of W dotted with x: the one place that knows how each dtype is stored. */
static inline float row_dot(const Mat *W, int r, const float *x) {
    size_t at = (size_t)r * W->cols;
    if (W->dtype == DTYPE_BF16) return dot_bf16((const uint16_t *)W->data + at, x, W->cols);
    return dot_f32((const float *)W->data + at, x, W->cols);
}

/* y = W x, parallel over output rows. */
static void matvec(float *y, const Mat *W, const float *x) {
#pragma omp parallel for schedule(static) if (W->rows * (long)W->cols > 32768)
    for (int r = 0; r < W->rows; r++) y[r] = row_dot(W, r, x);
}

/* y = W^T x (serial): accumulates the rows of W weighted by x. Used to absorb W_UK into q. */
static void matvec_transposed(float *y, const Mat *W, const float *x) {
    memset(y, 0, (size_t)W->cols * sizeof(float));
    for (int r = 0; r < W->rows; r++) {
        size_t at = (size_t)r * W->cols;
        float xr = x[r];
        if (W->dtype == DTYPE_BF16) {
            const uint16_t *row = (const uint16_t *)W->data + at;
#pragma omp simd
            for (int c = 0; c < W->cols; c++) y[c] += xr * bf16_to_f32(row[c]);
        } else {
            const float *row = (const float *)W->data + at;
#pragma omp simd
            for (int c = 0; c < W->cols; c++) y[c] += xr * row[c];
        }
    }
}

/* Rows [row0, row0+rows) of W, as a matrix of its own (e.g. one head's slice of kv_b_proj). */
static Mat mat_rows(const Mat *W, int row0, int rows) {
    Mat m = *W;
    m.data = (const char *)W->data + (size_t)row0 * W->cols * dtype_size(W->dtype);
    m.rows = rows;
    return m;
}

/* Copies row r of W into out as floats (embedding lookup). */
static void mat_row_to_f32(float *out, const Mat *W, int r) {
    size_t at = (size_t)r * W->cols;
    for (int c = 0; c < W->cols; c++)
        out[c] = W->dtype == DTYPE_BF16 ? bf16_to_f32(((const uint16_t *)W->data)[at + c]) : ((const float *)W->data)[at + c];
}

/* RMSNorm: out = w * x / sqrt(mean(x^2) + eps). Accumulated in double, as exact as cheap. */
static void rmsnorm(float *out, const float *x, const float *weight, int n, double eps) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float inv = (float)(1.0 / sqrt(ss / n + eps));
    for (int i = 0; i < n; i++) out[i] = weight[i] * (x[i] * inv);
}

/* In-place softmax. Subtracting the max keeps exp() finite. */
static void softmax(float *x, int n) {
    float max = x[0];
    for (int i = 1; i < n; i++) if (x[i] > max) max = x[i];
    double sum = 0.0;
    for (int i = 0; i < n; i++) { x[i] = expf(x[i] - max); sum += x[i]; }
    float inv = (float)(1.0 / sum);
    for (int i = 0; i < n; i++) x[i] *= inv;
}

static inline float silu(float x) { return x / (1.0f + expf(-x)); }

/* SwiGLU MLP (used by dense layers, each routed expert and the shared experts):
 * out = down( silu(gate x) * up x ). hidden, hidden2: scratch of the MLP width. */
static void swiglu_mlp(float *out, const float *x, const Mat *gate, const Mat *up, const Mat *down, float *hidden, float *hidden2) {
    matvec(hidden, gate, x);
    matvec(hidden2, up, x);
    for (int i = 0; i < gate->rows; i++) hidden[i] = silu(hidden[i]) * hidden2[i];
    matvec(out, down, hidden);
}

/* ------------------------------------------------------------------------- */
/* Decoupled RoPE with YaRN (paper eq. 14-16; YaRN: arXiv:2309.00071)          */
/* ------------------------------------------------------------------------- */

/* YaRN's attention magnitude correction: 0.1 m ln(s) + 1 for a context stretch s > 1. */
static double yarn_get_mscale(double scale, double m) { return scale <= 1 ? 1.0 : 0.1 * m * log(scale) + 1.0; }

/* The rotary dimension pair whose wavelength fits num_rotations times in the original context. */
static double yarn_correction_dim(double num_rotations, int dim, double base, int original_max_pos) {
    return dim * log(original_max_pos / (num_rotations * 2 * PI)) / (2 * log(base));
}

/* inv_freq[i] for i < dim/2. YaRN keeps high frequencies (they fit the original context),
 * divides low ones by the factor, and blends linearly in between. Static: used at every length. */
static void rope_inv_freq(const Config *c, double *inv_freq) {
    int dim = c->qk_rope_head_dim;
    double low = 0, high = 0;
    if (c->rope_scaling == ROPE_YARN) {
        low = fmax(floor(yarn_correction_dim(c->beta_fast, dim, c->rope_theta, c->original_max_position_embeddings)), 0);
        high = fmin(ceil(yarn_correction_dim(c->beta_slow, dim, c->rope_theta, c->original_max_position_embeddings)), dim - 1);
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
    double m = c->rope_scaling == ROPE_YARN
                   ? yarn_get_mscale(c->rope_factor, c->mscale) / yarn_get_mscale(c->rope_factor, c->mscale_all_dim)
                   : 1.0;
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

/* ------------------------------------------------------------------------- */
/* Run state: activations and the KV cache, allocated once before decoding.   */
/* ------------------------------------------------------------------------- */

enum { ATTN_ABSORB = 0, ATTN_NAIVE = 1 };

typedef struct {
    float *masked;                    /* [E] router probabilities with unselected groups zeroed */
    float *group_score;               /* [n_group] */
    unsigned char *taken, *group_taken;
} RouterScratch;

typedef struct {
    int attn_mode, context;           /* context: positions the cache holds */
    double softmax_scale;
    float *rope_cos, *rope_sin;       /* [context][rope_dim/2] */
    float *x, *xn, *branch;           /* residual stream, its norm, a block's output [D] */
    float *q_latent;                  /* [q_lora_rank] */
    float *q;                         /* [H * (nope+rope)] */
    float *kv_a;                      /* [kv_lora_rank + rope] */
    float *kv;                        /* naive: this token's K_nope|V for all heads [H*(nope+v)] */
    float *q_absorbed;                /* absorb: [H][kv_lora_rank] */
    float *latent_out;                /* absorb: [H][kv_lora_rank] */
    float *scores;                    /* [H][context] */
    float *head_out;                  /* [H * v] */
    float *hidden, *hidden2;          /* MLP scratch [max width] */
    float *expert_out;                /* [D] */
    float *router_probs;              /* [E] */
    int *topk_idx;                    /* [K] */
    float *topk_weight;               /* [K] */
    RouterScratch router;
    float *logits;                    /* [vocab] */
    float *cache;                     /* [L][context][cache_width] */
    /* Optional taps (NULL = off), filled by forward() for inspection and tests: the residual
     * stream after each layer [L][D], and each MoE layer's routing [L][K]. */
    float *tap_hidden, *tap_route_weight;
    int *tap_route_idx;
    size_t cache_width;               /* floats per token per layer */
} RunState;

/* Floats per token per layer: the latent (absorb) or full per-head keys and values (naive). */
static size_t kv_cache_width(const Config *c, int attn_mode) {
    if (attn_mode == ATTN_ABSORB) return (size_t)c->kv_lora_rank + c->qk_rope_head_dim;
    return (size_t)c->num_attention_heads * (c->qk_nope_head_dim + c->qk_rope_head_dim + c->v_head_dim);
}

static int max_int(int a, int b) { return a > b ? a : b; }

static void init_run_state(RunState *s, const Config *c, int attn_mode, int context) {
    int D = c->hidden_size, H = c->num_attention_heads;
    int q_head_dim = c->qk_nope_head_dim + c->qk_rope_head_dim;
    int mlp_width = max_int(max_int(c->intermediate_size, c->moe_intermediate_size),
                            c->moe_intermediate_size * c->n_shared_experts);
    memset(s, 0, sizeof *s);
    s->attn_mode = attn_mode;
    s->context = context;
    s->softmax_scale = attention_softmax_scale(c);
    s->rope_cos = xcalloc((size_t)context * c->qk_rope_head_dim / 2, sizeof(float));
    s->rope_sin = xcalloc((size_t)context * c->qk_rope_head_dim / 2, sizeof(float));
    rope_tables(c, context, s->rope_cos, s->rope_sin);
    s->x = xcalloc(D, sizeof(float));
    s->xn = xcalloc(D, sizeof(float));
    s->branch = xcalloc(D, sizeof(float));
    s->q_latent = xcalloc(c->q_lora_rank, sizeof(float));
    s->q = xcalloc((size_t)H * q_head_dim, sizeof(float));
    s->kv_a = xcalloc(c->kv_lora_rank + c->qk_rope_head_dim, sizeof(float));
    s->kv = xcalloc((size_t)H * (c->qk_nope_head_dim + c->v_head_dim), sizeof(float));
    s->q_absorbed = xcalloc((size_t)H * c->kv_lora_rank, sizeof(float));
    s->latent_out = xcalloc((size_t)H * c->kv_lora_rank, sizeof(float));
    s->scores = xcalloc((size_t)H * context, sizeof(float));
    s->head_out = xcalloc((size_t)H * c->v_head_dim, sizeof(float));
    s->hidden = xcalloc(mlp_width, sizeof(float));
    s->hidden2 = xcalloc(mlp_width, sizeof(float));
    s->expert_out = xcalloc(D, sizeof(float));
    s->router_probs = xcalloc(c->n_routed_experts, sizeof(float));
    s->topk_idx = xcalloc(c->num_experts_per_tok, sizeof(int));
    s->topk_weight = xcalloc(c->num_experts_per_tok, sizeof(float));
    s->router.masked = xcalloc(c->n_routed_experts, sizeof(float));
    s->router.group_score = xcalloc(c->n_group, sizeof(float));
    s->router.taken = xcalloc(c->n_routed_experts, 1);
    s->router.group_taken = xcalloc(c->n_group, 1);
    s->logits = xcalloc(c->vocab_size, sizeof(float));
    s->cache_width = kv_cache_width(c, attn_mode);
    s->cache = xcalloc((size_t)c->num_hidden_layers * context * s->cache_width, sizeof(float));
}

static void free_run_state(RunState *s) {
    float *bufs[] = {s->rope_cos, s->rope_sin, s->x, s->xn, s->branch, s->q_latent, s->q, s->kv_a, s->kv,
                     s->q_absorbed, s->latent_out, s->scores, s->head_out, s->hidden, s->hidden2,
                     s->expert_out, s->router_probs, s->topk_weight, s->logits, s->cache};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    free(s->topk_idx);
    free(s->router.masked);
    free(s->router.group_score);
    free(s->router.taken);
    free(s->router.group_taken);
}

/* ------------------------------------------------------------------------- */
/* Multi-head Latent Attention (paper section 2.1, eq. 9-19)                  */
/*                                                                           */
/* Keys and values come from one small latent per token, c = norm(W_DKV h)    */
/* (eq. 9); k_nope = W_UK c and v = W_UV c per head (eq. 10-11). Position     */
/* enters only through a decoupled rope key k_pe shared by all heads (eq. 15).*/
/*                                                                           */
/* Absorption (the decode form). For head h:                                 */
/*   q_nope . (W_UK c_j) = (W_UK^T q_nope) . c_j     -> score against the latent */
/*   sum_j P_j (W_UV c_j) = W_UV (sum_j P_j c_j)     -> values from the latent  */
/* so the cache keeps only c_j and k_pe_j: kv_lora_rank + rope_dim floats per */
/* token per layer, whatever the number of heads. The naive form decompresses */
/* per-head K and V and caches them, as a standard multi-head cache would.    */
/* ------------------------------------------------------------------------- */

/* Query for one token (eq. 12-13, 15): with q LoRA, q = W_UQ norm(W_DQ h); else q = W_Q h. */
static void mla_query(RunState *s, const Config *c, const Layer *L, int pos) {
    if (c->q_lora_rank > 0) {
        matvec(s->q_latent, &L->q_a_proj, s->xn);
        rmsnorm(s->q_latent, s->q_latent, L->q_a_norm, c->q_lora_rank, 1e-6);  /* eps fixed in the official code */
        matvec(s->q, &L->q_b_proj, s->q_latent);
    } else {
        matvec(s->q, &L->q_proj, s->xn);
    }
    int q_head_dim = c->qk_nope_head_dim + c->qk_rope_head_dim, half = c->qk_rope_head_dim / 2;
    for (int h = 0; h < c->num_attention_heads; h++)
        rope_rotate(s->q + (size_t)h * q_head_dim + c->qk_nope_head_dim, s->rope_cos + (size_t)pos * half,
                    s->rope_sin + (size_t)pos * half, c->qk_rope_head_dim);
}

/* Compressed KV for one token (eq. 9, 14): kv_a = [c_kv | k_pe]; c = norm(c_kv); k_pe rotated. */
static void mla_latent(RunState *s, const Config *c, const Layer *L, int pos) {
    int half = c->qk_rope_head_dim / 2;
    matvec(s->kv_a, &L->kv_a_proj, s->xn);
    rmsnorm(s->kv_a, s->kv_a, L->kv_a_norm, c->kv_lora_rank, 1e-6);
    rope_rotate(s->kv_a + c->kv_lora_rank, s->rope_cos + (size_t)pos * half, s->rope_sin + (size_t)pos * half,
                c->qk_rope_head_dim);
}

/* Absorbed attention over the latent cache, for every head. */
static void mla_attend_absorbed(RunState *s, const Config *c, const Layer *L, float *layer_cache, int pos) {
    int H = c->num_attention_heads, nope = c->qk_nope_head_dim, rope = c->qk_rope_head_dim;
    int rank = c->kv_lora_rank, q_head_dim = nope + rope, kv_head_rows = nope + c->v_head_dim;
    size_t width = s->cache_width;
    memcpy(layer_cache + (size_t)pos * width, s->kv_a, width * sizeof(float));
#pragma omp parallel for schedule(static)
    for (int h = 0; h < H; h++) {
        const float *q_nope = s->q + (size_t)h * q_head_dim, *q_pe = q_nope + nope;
        float *q_abs = s->q_absorbed + (size_t)h * rank, *u = s->latent_out + (size_t)h * rank;
        float *att = s->scores + (size_t)h * s->context;
        Mat w_uk = mat_rows(&L->kv_b_proj, h * kv_head_rows, nope);
        Mat w_uv = mat_rows(&L->kv_b_proj, h * kv_head_rows + nope, c->v_head_dim);
        matvec_transposed(q_abs, &w_uk, q_nope);                 /* q_abs = W_UK^T q_nope */
        for (int j = 0; j <= pos; j++) {
            const float *cj = layer_cache + (size_t)j * width;
            att[j] = (float)s->softmax_scale * (dot_f32(q_abs, cj, rank) + dot_f32(q_pe, cj + rank, rope));
        }
        softmax(att, pos + 1);
        memset(u, 0, (size_t)rank * sizeof(float));                /* u = sum_j P_j c_j */
        for (int j = 0; j <= pos; j++) {
            const float *cj = layer_cache + (size_t)j * width;
            float p = att[j];
#pragma omp simd
            for (int i = 0; i < rank; i++) u[i] += p * cj[i];
        }
        for (int i = 0; i < c->v_head_dim; i++) s->head_out[(size_t)h * c->v_head_dim + i] = row_dot(&w_uv, i, u);
    }
}

/* Naive attention: decompress this token's per-head K and V, cache them, attend as in MHA. */
static void mla_attend_naive(RunState *s, const Config *c, const Layer *L, float *layer_cache, int pos) {
    int H = c->num_attention_heads, nope = c->qk_nope_head_dim, rope = c->qk_rope_head_dim, vdim = c->v_head_dim;
    int q_head_dim = nope + rope, kv_head_rows = nope + vdim;
    size_t width = s->cache_width, head_width = (size_t)q_head_dim + vdim;
    matvec(s->kv, &L->kv_b_proj, s->kv_a);                       /* [k_nope | v] per head, eq. 10-11 */
    float *slot = layer_cache + (size_t)pos * width;
    for (int h = 0; h < H; h++) {                                /* cached per head: [k_nope | k_pe | v] */
        float *k = slot + h * head_width;
        memcpy(k, s->kv + (size_t)h * kv_head_rows, nope * sizeof(float));
        memcpy(k + nope, s->kv_a + c->kv_lora_rank, rope * sizeof(float));
        memcpy(k + q_head_dim, s->kv + (size_t)h * kv_head_rows + nope, vdim * sizeof(float));
    }
#pragma omp parallel for schedule(static)
    for (int h = 0; h < H; h++) {
        const float *q = s->q + (size_t)h * q_head_dim;
        float *att = s->scores + (size_t)h * s->context, *out = s->head_out + (size_t)h * vdim;
        for (int j = 0; j <= pos; j++)
            att[j] = (float)s->softmax_scale * dot_f32(q, layer_cache + j * width + h * head_width, q_head_dim);
        softmax(att, pos + 1);
        memset(out, 0, vdim * sizeof(float));
        for (int j = 0; j <= pos; j++) {
            const float *v = layer_cache + j * width + h * head_width + q_head_dim;
            for (int i = 0; i < vdim; i++) out[i] += att[j] * v[i];
        }
    }
}

/* MLA for one token at position pos: s->xn in, s->branch out (eq. 19: u = W_O [o_1; ...; o_H]). */
static void mla(RunState *s, const Config *c, const Layer *L, int layer, int pos) {
    float *layer_cache = s->cache + (size_t)layer * s->context * s->cache_width;
    mla_query(s, c, L, pos);
    mla_latent(s, c, L, pos);
    if (s->attn_mode == ATTN_ABSORB) mla_attend_absorbed(s, c, L, layer_cache, pos);
    else mla_attend_naive(s, c, L, layer_cache, pos);
    matvec(s->branch, &L->o_proj, s->head_out);
}

/* ------------------------------------------------------------------------- */
/* DeepSeekMoE (paper section 2.2, eq. 20-23)                                 */
/* ------------------------------------------------------------------------- */

/* Index of the largest value among those not yet taken; ties go to the lower index. */
static int argmax_untaken(const float *v, const unsigned char *taken, int n) {
    int best = -1;
    for (int i = 0; i < n; i++)
        if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
    return best;
}

/* Router (eq. 21-22): softmax over all experts, then top-k; with group_limited_greedy only
 * the topk_group groups with the highest max score stay eligible (device-limited routing).
 * Fills idx/weight (K entries, ascending expert id). probs: [E] in, masked scratch. */
static void route_tokens(const Config *c, const float *probs, int *idx, float *weight, RouterScratch *r) {
    int E = c->n_routed_experts, K = c->num_experts_per_tok;
    float *masked = r->masked, *group_score = r->group_score;
    unsigned char *taken = r->taken, *group_taken = r->group_taken;
    memcpy(masked, probs, E * sizeof(float));
    if (c->topk_method == TOPK_GROUP_LIMITED_GREEDY) {
        int G = c->n_group, per_group = E / G;
        for (int g = 0; g < G; g++) {
            group_score[g] = probs[g * per_group];
            for (int e = 1; e < per_group; e++) group_score[g] = fmaxf(group_score[g], probs[g * per_group + e]);
            group_taken[g] = 0;
        }
        for (int k = 0; k < c->topk_group; k++) group_taken[argmax_untaken(group_score, group_taken, G)] = 1;
        for (int e = 0; e < E; e++) if (!group_taken[e / per_group]) masked[e] = 0.0f;
    }
    for (int e = 0; e < E; e++) taken[e] = 0;
    for (int k = 0; k < K; k++) taken[argmax_untaken(masked, taken, E)] = 1;
    double sum = 0.0;
    for (int e = 0, k = 0; e < E; e++)
        if (taken[e]) { idx[k] = e; weight[k] = probs[e]; sum += probs[e]; k++; }
    /* The official V2 code renormalises instead of scaling, never both. */
    for (int k = 0; k < K; k++)
        weight[k] = (K > 1 && c->norm_topk_prob) ? (float)(weight[k] / (sum + 1e-20))
                                                 : (float)(weight[k] * c->routed_scaling_factor);
}

/* MoE FFN for one token (eq. 20): shared experts always, plus the K routed experts, weighted. */
static void moe(RunState *s, const Config *c, const Layer *L) {
    int D = c->hidden_size;
    matvec(s->router_probs, &L->router, s->xn);
    softmax(s->router_probs, c->n_routed_experts);
    route_tokens(c, s->router_probs, s->topk_idx, s->topk_weight, &s->router);
    if (L->has_mlp) swiglu_mlp(s->branch, s->xn, &L->mlp_gate, &L->mlp_up, &L->mlp_down, s->hidden, s->hidden2);
    else memset(s->branch, 0, D * sizeof(float));
    for (int k = 0; k < c->num_experts_per_tok; k++) {
        int e = s->topk_idx[k];
        swiglu_mlp(s->expert_out, s->xn, &L->expert_gate[e], &L->expert_up[e], &L->expert_down[e], s->hidden, s->hidden2);
        for (int i = 0; i < D; i++) s->branch[i] += s->topk_weight[k] * s->expert_out[i];
    }
}

/* ------------------------------------------------------------------------- */
/* Forward: one token through every layer, using and extending the KV cache.  */
/* ------------------------------------------------------------------------- */

static float *forward(const Weights *w, RunState *s, int token, int pos) {
    const Config *c = &w->cfg;
    int D = c->hidden_size;
    mat_row_to_f32(s->x, &w->embed, token);
    for (int l = 0; l < c->num_hidden_layers; l++) {
        const Layer *L = &w->layers[l];
        rmsnorm(s->xn, s->x, L->input_norm, D, c->rms_norm_eps);
        mla(s, c, L, l, pos);
        for (int i = 0; i < D; i++) s->x[i] += s->branch[i];
        rmsnorm(s->xn, s->x, L->post_attention_norm, D, c->rms_norm_eps);
        if (L->is_moe) moe(s, c, L);
        else swiglu_mlp(s->branch, s->xn, &L->mlp_gate, &L->mlp_up, &L->mlp_down, s->hidden, s->hidden2);
        for (int i = 0; i < D; i++) s->x[i] += s->branch[i];
        if (s->tap_hidden) memcpy(s->tap_hidden + (size_t)l * D, s->x, D * sizeof(float));
        if (s->tap_route_idx && L->is_moe) {
            memcpy(s->tap_route_idx + (size_t)l * c->num_experts_per_tok, s->topk_idx, c->num_experts_per_tok * sizeof(int));
            memcpy(s->tap_route_weight + (size_t)l * c->num_experts_per_tok, s->topk_weight, c->num_experts_per_tok * sizeof(float));
        }
    }
    rmsnorm(s->x, s->x, w->final_norm, D, c->rms_norm_eps);
    matvec(s->logits, &w->lm_head, s->x);
    return s->logits;
}

/* ------------------------------------------------------------------------- */
/* Sampler: greedy, temperature, top-p (nucleus).                             */
/* ------------------------------------------------------------------------- */

typedef struct {
    int vocab_size;
    float temperature, topp;
    uint64_t rng_state;
    int *order;  /* [vocab] scratch for top-p */
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
    for (int i = 1; i < n; i++) if (v[i] > v[best]) best = i;
    return best;
}

static const float *sort_probs;
static int compare_prob_desc(const void *a, const void *b) {
    float pa = sort_probs[*(const int *)a], pb = sort_probs[*(const int *)b];
    return (pa < pb) - (pa > pb);
}

static int sample(Sampler *sp, float *logits) {
    if (sp->temperature == 0.0f) return argmax(logits, sp->vocab_size);
    for (int i = 0; i < sp->vocab_size; i++) logits[i] /= sp->temperature;
    softmax(logits, sp->vocab_size);
    float r = random_f32(&sp->rng_state);
    if (sp->topp <= 0.0f || sp->topp >= 1.0f) {
        float cdf = 0.0f;
        for (int i = 0; i < sp->vocab_size; i++) { cdf += logits[i]; if (r < cdf) return i; }
        return sp->vocab_size - 1;
    }
    /* Keep the smallest set of most likely tokens whose mass reaches topp; sample within it. */
    int n = 0;
    float cutoff = (1.0f - sp->topp) / (sp->vocab_size - 1);  /* tokens below this can never be in the set */
    for (int i = 0; i < sp->vocab_size; i++) if (logits[i] >= cutoff) sp->order[n++] = i;
    sort_probs = logits;
    qsort(sp->order, n, sizeof(int), compare_prob_desc);
    float mass = 0.0f;
    int last = n - 1;
    for (int i = 0; i < n; i++) { mass += logits[sp->order[i]]; if (mass > sp->topp) { last = i; break; } }
    float target = r * mass, cdf = 0.0f;
    for (int i = 0; i <= last; i++) { cdf += logits[sp->order[i]]; if (target < cdf) return sp->order[i]; }
    return sp->order[last];
}

/* ------------------------------------------------------------------------- */
/* Generation                                                                 */
/* ------------------------------------------------------------------------- */

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
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
        if (end == p || errno || (*end && *end != ' ' && *end != '\t' && *end != '\n' && *end != '\r'))
            die("token ids must be whitespace-separated integers (bad input near \"%.20s\")", p);
        if (v < 0 || v >= vocab_size) die("token id %ld is out of range [0, %d)", v, vocab_size);
        if ((size_t)n == cap) { cap *= 2; ids = realloc(ids, cap * sizeof(int)); if (!ids) die("out of memory"); }
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
        if (n + 1 == cap) { cap *= 2; buf = realloc(buf, cap); if (!buf) die("out of memory reading %s", path); }
    }
    if (ferror(f)) die("cannot read %s", path);
    fclose(f);
    buf[n] = '\0';
    if (size_out) *size_out = n;
    return buf;
}

static void check_context(int n_tokens, int context) {
    if (n_tokens > context) die("%d tokens do not fit the context of %d (raise it with -c, up to max_position_embeddings)", n_tokens, context);
}

/* Feeds the prompt token by token, then samples `steps` new tokens, printing their ids. */
static void generate_ids(const Weights *w, RunState *s, Sampler *sp, const int *prompt, int n_prompt, int steps) {
    if (n_prompt < 1) die("the prompt is empty: give at least one token");
    check_context(n_prompt, s->context);
    double t0 = now_seconds();
    float *logits = NULL;
    for (int pos = 0; pos < n_prompt; pos++) logits = forward(w, s, prompt[pos], pos);
    double t1 = now_seconds();
    int generated = 0;
    for (int pos = n_prompt; generated < steps; pos++) {
        int next = sample(sp, logits);
        printf("%s%d", generated ? " " : "", next);
        fflush(stdout);
        generated++;
        if (generated == steps) break;
        if (pos >= s->context) { fprintf(stderr, "dsv2: context of %d is full, stopping\n", s->context); break; }
        logits = forward(w, s, next, pos);
    }
    printf("\n");
    double t2 = now_seconds();
    fprintf(stderr, "prompt: %d tokens, %.1f tok/s | generation: %d tokens, %.1f tok/s\n", n_prompt,
            n_prompt / fmax(t1 - t0, 1e-9), generated, generated > 1 ? (generated - 1) / fmax(t2 - t1, 1e-9) : 0.0);
}

/* -m logits: every position's logits, float32 little-endian, [T][vocab], from the decode path. */
static void write_logits(const Weights *w, RunState *s, const int *ids, int n, const char *out_path) {
    if (n < 1) die("no token ids to run");
    check_context(n, s->context);
    FILE *out = fopen(out_path, "wb");
    if (!out) die("cannot open %s for writing: %s", out_path, strerror(errno));
    for (int pos = 0; pos < n; pos++) {
        float *logits = forward(w, s, ids[pos], pos);
        if (fwrite(logits, sizeof(float), w->cfg.vocab_size, out) != (size_t)w->cfg.vocab_size) die("cannot write %s", out_path);
    }
    if (fclose(out) != 0) die("cannot write %s", out_path);
}

/* Bytes in a human unit, into buf. */
static const char *human_bytes(double bytes, char *buf, size_t size) {
    const char *unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (bytes >= 1024 && u < 4) { bytes /= 1024; u++; }
    snprintf(buf, size, "%.1f %s", bytes, unit[u]);
    return buf;
}

/* What the latent cache saves: printed at start. */
static void print_kv_cache_sizes(const Config *c, int context, int attn_mode) {
    double latent = (double)kv_cache_width(c, ATTN_ABSORB) * c->num_hidden_layers * sizeof(float);
    double mha = (double)kv_cache_width(c, ATTN_NAIVE) * c->num_hidden_layers * sizeof(float);
    char a[32], b[32], d[32], e[32], f[32];
    fprintf(stderr, "KV cache (f32, all layers): MLA latent %s/token, %s for all %d positions; "
                    "a standard MHA cache would take %s/token, %s (%.1fx)\n",
            human_bytes(latent, a, 32), human_bytes(latent * c->max_position_embeddings, b, 32),
            c->max_position_embeddings, human_bytes(mha, d, 32), human_bytes(mha * c->max_position_embeddings, e, 32),
            mha / latent);
    fprintf(stderr, "attention: %s, context %d, cache %s\n", attn_mode == ATTN_ABSORB ? "absorb (latent cache)" : "naive (per-head K/V cache)",
            context, human_bytes((attn_mode == ATTN_ABSORB ? latent : mha) * context, f, 32));
}

/* ------------------------------------------------------------------------- */
/* CLI                                                                        */
/* ------------------------------------------------------------------------- */

#ifndef DSV2_NO_MAIN
static void usage(void) {
    fprintf(stderr,
            "usage: ./dsv2 MODEL [options]\n"
            "  -m MODE    generate (default) | logits\n"
            "  -i TEXT    prompt: whitespace-separated token ids\n"
            "  -f FILE    read the prompt from a file instead\n"
            "  -o FILE    logits mode: output file (float32 [T][vocab])\n"
            "  -n N       tokens to generate (default 64)\n"
            "  -t T       temperature, 0 = greedy (default 1.0)\n"
            "  -p P       top-p (default 0.9)\n"
            "  -s SEED    random seed (default: time)\n"
            "  -a MODE    attention: absorb (default, latent cache) | naive (per-head K/V cache)\n"
            "  -c N       context length (default min(max_position_embeddings, 4096))\n");
    exit(1);
}

static long parse_int_arg(const char *flag, const char *v, long lo, long hi) {
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || *end || end == v || x < lo || x > hi) die("%s expects an integer in [%ld, %ld], got \"%s\"", flag, lo, hi, v);
    return x;
}
static float parse_float_arg(const char *flag, const char *v, float lo, float hi) {
    char *end;
    float x = strtof(v, &end);
    if (*end || end == v || !(x >= lo && x <= hi)) die("%s expects a number in [%g, %g], got \"%s\"", flag, lo, hi, v);
    return x;
}

int main(int argc, char **argv) {
    if (argc < 2 || argv[1][0] == '-') usage();
    const char *model_path = argv[1], *mode = "generate", *prompt = NULL, *prompt_file = NULL, *out_path = NULL;
    long steps = 64, context = 0;
    float temperature = 1.0f, topp = 0.9f;
    uint64_t seed = (uint64_t)time(NULL);
    int attn_mode = ATTN_ABSORB;
    for (int i = 2; i < argc; i += 2) {
        if (argv[i][0] != '-' || strlen(argv[i]) != 2) die("unknown argument \"%s\" (run ./dsv2 for usage)", argv[i]);
        if (i + 1 >= argc) die("option %s needs a value", argv[i]);
        const char *v = argv[i + 1];
        switch (argv[i][1]) {
        case 'm': mode = v; break;
        case 'i': prompt = v; break;
        case 'f': prompt_file = v; break;
        case 'o': out_path = v; break;
        case 'n': steps = parse_int_arg("-n", v, 0, 1 << 24); break;
        case 't': temperature = parse_float_arg("-t", v, 0, 100); break;
        case 'p': topp = parse_float_arg("-p", v, 0, 1); break;
        case 's': seed = (uint64_t)parse_int_arg("-s", v, 0, 0x7fffffffL); break;
        case 'c': context = parse_int_arg("-c", v, 1, 1 << 24); break;
        case 'a':
            if (!strcmp(v, "absorb")) attn_mode = ATTN_ABSORB;
            else if (!strcmp(v, "naive")) attn_mode = ATTN_NAIVE;
            else die("-a expects absorb or naive, got \"%s\"", v);
            break;
        default: die("unknown option %s (run ./dsv2 for usage)", argv[i]);
        }
    }
    int is_logits = !strcmp(mode, "logits");
    if (!is_logits && strcmp(mode, "generate")) die("unknown mode \"%s\" (generate | logits)", mode);
    if (prompt && prompt_file) die("give the prompt with -i or -f, not both");
    if (is_logits && !out_path) die("-m logits needs -o FILE");

    Weights w;
    memset(&w, 0, sizeof w);
    load_weights(&w, model_path);
    const Config *c = &w.cfg;
    if (context == 0) context = c->max_position_embeddings < 4096 ? c->max_position_embeddings : 4096;
    if (context > c->max_position_embeddings) die("-c %ld exceeds max_position_embeddings %d", context, c->max_position_embeddings);

    char *text = prompt_file ? read_file(prompt_file, NULL) : NULL;
    const char *input = text ? text : prompt;
    int n_ids = 0, *ids = NULL;
    if (input) ids = parse_ids(input, c->vocab_size, &n_ids);
    else if (c->bos_token_id >= 0) { ids = xcalloc(1, sizeof(int)); ids[0] = c->bos_token_id; n_ids = 1; }
    if (n_ids < 1) die("no token ids given: the prompt is empty");
    check_context(n_ids, (int)context);

    RunState s;
    init_run_state(&s, c, attn_mode, (int)context);
    print_kv_cache_sizes(c, (int)context, attn_mode);
    if (is_logits) {
        write_logits(&w, &s, ids, n_ids, out_path);
    } else {
        Sampler sp = {c->vocab_size, temperature, topp, seed * 0x9E3779B97F4A7C15ull + 1, xcalloc(c->vocab_size, sizeof(int))};
        generate_ids(&w, &s, &sp, ids, n_ids, (int)steps);
        free(sp.order);
    }
    free_run_state(&s);
    free(ids);
    free(text);
    free_weights(&w);
    return 0;
}
#endif
