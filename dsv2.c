/*
 * dsv2.c: DeepSeek-V2 inference in one readable C file.
 *
 * One architecture covers DeepSeek-V2 (236B), V2-Chat, V2-Lite (16B), V2-Lite-Chat,
 * Coder-V2 and V2.5; only the numbers in the checkpoint header differ.
 * The file reads top to bottom like the paper (arXiv:2405.04434):
 *   config and checkpoint (mmap) -> building blocks (matmul for f32/bf16/q8, RMSNorm, RoPE/YaRN)
 *   -> Multi-head Latent Attention (eq. 9-19) -> DeepSeekMoE (eq. 20-22) -> forward
 *   -> tokenizer (byte-level BPE) -> sampler -> generation and chat -> CLI.
 *
 * The math follows the official Hugging Face remote code (modeling_deepseek.py),
 * which is what the test fixtures were computed with.
 *
 * Build: make dsv2      Run: ./dsv2 model.bin -i "Hello"
 */
#define _DEFAULT_SOURCE  /* MAP_POPULATE, madvise */
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
_Noreturn static void die(const char *fmt, ...) {
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

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1, DTYPE_Q8 = 2 };
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
    int32_t q8_group;               /* q8 files: weights per scale, along the input dimension */
    int32_t reserved_int[4];
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
    if (c->dtype != DTYPE_F32 && c->dtype != DTYPE_BF16 && c->dtype != DTYPE_Q8) die("unknown weight dtype %d", c->dtype);
    if (c->dtype == DTYPE_Q8) check_range("q8_group", c->q8_group, 1, 4096);
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

/* A weight matrix [rows, cols] in row-major order, as nn.Linear stores it: y = W x.
 * q8: int8 weights, and one float scale per `group` consecutive weights of a row. */
typedef struct {
    const void *data;
    const float *scale;  /* q8 only: [rows][cols / group] */
    int dtype, rows, cols, group;
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

static size_t dtype_size(int dtype) { return dtype == DTYPE_Q8 ? 1 : dtype == DTYPE_BF16 ? 2 : 4; }

/* Lays tensors out in the one order export.py writes them; each starts TENSOR_ALIGN-aligned. */
typedef struct {
    const char *base;  /* NULL while only measuring the size */
    size_t offset;
    int weight_dtype, q8_group;
    size_t *tensor_start, *tensor_bytes;  /* optional: where each tensor lies (training, tests) */
    int n_tensors;
} Cursor;

static const void *take(Cursor *cur, size_t bytes) {
    cur->offset = (cur->offset + TENSOR_ALIGN - 1) / TENSOR_ALIGN * TENSOR_ALIGN;
    const void *p = cur->base ? cur->base + cur->offset : NULL;
    if (cur->tensor_start) { cur->tensor_start[cur->n_tensors] = cur->offset; cur->tensor_bytes[cur->n_tensors] = bytes; }
    cur->n_tensors++;
    cur->offset += bytes;
    return p;
}
static Mat take_mat(Cursor *cur, int rows, int cols, int dtype) {
    Mat m = {NULL, NULL, dtype, rows, cols, dtype == DTYPE_Q8 ? cur->q8_group : cols};
    if (cols % m.group) die("q8 group %d does not divide a matrix width %d", m.group, cols);
    m.data = take(cur, (size_t)rows * cols * dtype_size(dtype));
    if (dtype == DTYPE_Q8) m.scale = take(cur, (size_t)rows * (cols / m.group) * sizeof(float));
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

enum { WEIGHTS_AUTO = 0, WEIGHTS_MMAP = 1, WEIGHTS_LOAD = 2 };

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
        int populate = MAP_POPULATE;  /* fault every page in now, not one expert at a time while decoding */
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
        ssize_t got = pread(fd, (char *)map + done, size - done < (64 << 20) ? size - done : (64 << 20), (off_t)done);
        if (got <= 0) die("cannot read %s: %s", path, got < 0 ? strerror(errno) : "unexpected end of file");
#ifdef POSIX_FADV_DONTNEED
        if (drop_cache) posix_fadvise(fd, (off_t)done, got, POSIX_FADV_DONTNEED);
#endif
        done += (size_t)got;
    }
    mprotect(map, size, PROT_READ);
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
    if (memcmp(c->magic, DSV2_MAGIC, 4) != 0) die("%s is not a dsv2 checkpoint (bad magic); convert it with export.py", path);
    if (c->version != DSV2_VERSION) die("%s has checkpoint version %u; this build reads version %d", path, c->version, DSV2_VERSION);
    validate_config(c);
    alloc_layers(w);
    Cursor measure = {NULL, HEADER_SIZE, c->dtype, c->q8_group, NULL, NULL, 0};
    size_t end = layout_weights(w, &measure);
    if (c->tokenizer_offset && (c->tokenizer_offset < end || c->tokenizer_offset + c->tokenizer_size > c->file_size))
        die("%s: tokenizer section out of bounds", path);
    if (c->file_size < end) die("%s: header says %llu bytes but the config needs %zu", path, (unsigned long long)c->file_size, end);
    if (size != c->file_size) die("%s is truncated or padded: %zu bytes on disk, header says %llu", path, size, (unsigned long long)c->file_size);
    w->map = map_checkpoint(fd, size, weights_mode, path);
    close(fd);
    w->map_size = size;
    Cursor fill = {(const char *)w->map, HEADER_SIZE, c->dtype, c->q8_group, NULL, NULL, 0};
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
        float inv = amax > 0 ? 127.0f / amax : 0.0f;
        scale[g] = amax / 127.0f;
#pragma omp simd
        for (int i = 0; i < group; i++) q[(size_t)g * group + i] = (int8_t)(int)rintf(xg[i] * inv);  /* ties to even */
    }
}

/* q8 x q8, four rows: an int32 sum per group (int8 products; the compiler vectorizes it), then
 * the group's two scales. dot4x4_q8_group32_vnni below does the same with AVX-512 VNNI. */
static inline void dot4_q8_portable(const Mat *W, const size_t row[4], const int8_t *xq, const float *xs, int group, float out[4]) {
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
        a += ia * (s0[g] * xs[g]); b += ib * (s1[g] * xs[g]); c += ic * (s2[g] * xs[g]); d += id * (s3[g] * xs[g]);
    }
    out[0] = a; out[1] = b; out[2] = c; out[3] = d;
}

/* Intrinsics, in one place: the int8 dot product with AVX-512 VNNI (vpdpbusd: 64 int8 products
 * summed into 16 int32 in one instruction), four weight rows by four tokens per call so each
 * weight load serves every token of a prefill batch. vpdpbusd multiplies unsigned by signed
 * bytes, so the weights are read as w + 128 (one xor) and each token's 128 * sum(x) comes off
 * again: it starts the int32 sum, so every (row, token) pair costs one vpdpbusd. The tests run
 * both this and dot4_q8_portable above; dsv2_simd = 0 forces the portable one. */
int dsv2_simd = 1;  /* not static: a build without VNNI has no other use of it, and the tests set it */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
static inline void dot4x4_q8_group32_vnni(const Mat *W, const size_t row[4], const int8_t *const xq[4], const float *const xs[4], int nt, float out[4][4]) {
    int groups = W->cols / 32, g = 0;
    const int8_t *w[4];
    const float *ws[4];
    __m512 acc[4][4];
    __m512i pair[4];
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    for (int k = 0; k < 4; k++) {
        w[k] = (const int8_t *)W->data + row[k];
        ws[k] = W->scale + row[k] / 32;
        pair[k] = _mm512_setr_epi32(2 * k, 2 * k, 2 * k, 2 * k, 2 * k, 2 * k, 2 * k, 2 * k,
                                    2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1);
        for (int t = 0; t < 4; t++) acc[k][t] = _mm512_setzero_ps();
    }
    for (; g + 2 <= groups; g += 2) {  /* 64 bytes = two groups per step; int32 lanes 0-7 and 8-15 */
        __m512i w_unsigned[4];
        for (int k = 0; k < 4; k++) w_unsigned[k] = _mm512_xor_si512(_mm512_loadu_si512((const void *)(w[k] + g * 32)), bias);
        __m256 w_scale = _mm256_setr_ps(ws[0][g], ws[0][g + 1], ws[1][g], ws[1][g + 1], ws[2][g], ws[2][g + 1], ws[3][g], ws[3][g + 1]);
        for (int t = 0; t < nt; t++) {
            __m512i xv = _mm512_loadu_si512((const void *)(xq[t] + g * 32));
            __m512i minus_bias_x = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, xv));
            double xs_pair;
            memcpy(&xs_pair, xs[t] + g, sizeof xs_pair);
            __m512 sc = _mm512_castps256_ps512(_mm256_mul_ps(w_scale, _mm256_castpd_ps(_mm256_set1_pd(xs_pair))));
            for (int k = 0; k < 4; k++) {
                __m512i dot = _mm512_dpbusd_epi32(minus_bias_x, w_unsigned[k], xv);
                acc[k][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(pair[k], sc), acc[k][t]);
            }
        }
    }
    for (int k = 0; k < 4; k++)
        for (int t = 0; t < nt; t++) {
            float sum = _mm512_reduce_add_ps(acc[k][t]);
            for (int h = g; h < groups; h++) {  /* an odd last group */
                int32_t dot = 0;
                for (int i = 0; i < 32; i++) dot += w[k][h * 32 + i] * xq[t][h * 32 + i];
                sum += dot * ws[k][h] * xs[t][h];
            }
            out[t][k] = sum;
        }
}
#endif

/* Four rows of W (row[k]: element offsets) dotted with one token. x is the token's activations;
 * xq/xs their int8 form for q8 weights. */
static void dot4_rows(const Mat *W, const size_t row[4], const float *x, const int8_t *xq, const float *xs, float out[4]) {
    int cols = W->cols;
    float a = 0, b = 0, c = 0, d = 0;
    if (W->dtype == DTYPE_F32) {
        const float *w0 = (const float *)W->data + row[0], *w1 = (const float *)W->data + row[1];
        const float *w2 = (const float *)W->data + row[2], *w3 = (const float *)W->data + row[3];
#pragma omp simd reduction(+ : a, b, c, d)
        for (int i = 0; i < cols; i++) { a += w0[i] * x[i]; b += w1[i] * x[i]; c += w2[i] * x[i]; d += w3[i] * x[i]; }
    } else if (W->dtype == DTYPE_BF16) {
        const uint16_t *w0 = (const uint16_t *)W->data + row[0], *w1 = (const uint16_t *)W->data + row[1];
        const uint16_t *w2 = (const uint16_t *)W->data + row[2], *w3 = (const uint16_t *)W->data + row[3];
#pragma omp simd reduction(+ : a, b, c, d)
        for (int i = 0; i < cols; i++) {
            a += bf16_to_f32(w0[i]) * x[i]; b += bf16_to_f32(w1[i]) * x[i];
            c += bf16_to_f32(w2[i]) * x[i]; d += bf16_to_f32(w3[i]) * x[i];
        }
    } else {  /* q8; a constant group of 32 (the real models) lets the compiler unroll it */
        if (W->group == 32) dot4_q8_portable(W, row, xq, xs, 32, out);
        else dot4_q8_portable(W, row, xq, xs, W->group, out);
        return;
    }
    out[0] = a; out[1] = b; out[2] = c; out[3] = d;
}

/* Scratch for quantized activations, sized once by init_run_state (q8 models only): q and
 * scale hold the int8 inputs of several products; at[i] is where product i's begin. */
typedef struct { int8_t *q; float *scale; size_t capacity, *at; int max_products; } ActivationScratch;

/* One matrix product for n tokens: y[t] = W x[t] (x: [n][W->cols], y: [n][W->rows]). */
typedef struct { float *y; const Mat *W; const float *x; int n; } Product;

/* Block b of product p against every token: rows b, b + Q, b + 2Q, b + 3Q (Q: the number of
 * blocks), read from memory once and reused from cache for up to four tokens per kernel call.
 * xq/xs: the int8 tokens for q8 weights. With AVX-512 VNNI and groups of 32 one kernel call
 * shares each weight load among the tokens. */
static void matmul_block(const Product *p, int b, const int8_t *xq, const float *xs) {
    const Mat *W = p->W;
    int rows = W->rows, cols = W->cols, groups = cols / W->group, blocks = (rows + 3) / 4;
    size_t row[4];  /* rows past the end repeat the last and are not stored */
    for (int k = 0; k < 4; k++) row[k] = (size_t)(b + k * blocks < rows ? b + k * blocks : rows - 1) * cols;
    for (int t0 = 0; t0 < p->n; t0 += 4) {
        float out[4][4];
        int tokens = p->n - t0 < 4 ? p->n - t0 : 4;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
        if (dsv2_simd && W->dtype == DTYPE_Q8 && W->group == 32) {
            const int8_t *tq[4];
            const float *ts[4];
            for (int tt = 0; tt < 4; tt++) {
                int t = t0 + (tt < tokens ? tt : tokens - 1);
                tq[tt] = xq + (size_t)t * cols;
                ts[tt] = xs + (size_t)t * groups;
            }
            switch (tokens) {  /* a constant count each, so every loop unrolls */
            case 1: dot4x4_q8_group32_vnni(W, row, tq, ts, 1, out); break;
            case 2: dot4x4_q8_group32_vnni(W, row, tq, ts, 2, out); break;
            case 3: dot4x4_q8_group32_vnni(W, row, tq, ts, 3, out); break;
            default: dot4x4_q8_group32_vnni(W, row, tq, ts, 4, out);
            }
        } else
#endif
            for (int tt = 0; tt < tokens; tt++) {
                size_t t = (size_t)t0 + tt;
                dot4_rows(W, row, p->x + t * cols, xq ? xq + t * cols : NULL, xs ? xs + t * groups : NULL, out[tt]);
            }
        for (int tt = 0; tt < tokens; tt++)
            for (int k = 0; k < 4 && b + k * blocks < rows; k++) p->y[(size_t)(t0 + tt) * rows + b + k * blocks] = out[tt][k];
    }
}

/* Several independent products in one parallel pass (e.g. every expert's gate and up): the
 * threads split the blocks of all of them by work, so each reads four far-apart streams of
 * weights (more reads in flight than one stream, which decoding, bound by memory, needs:
 * tests/bandwidth.c) and waits for the others once, not once per product. Consecutive products
 * with the same input share its int8 form. act may be NULL when no weight is q8. */
/* Product i reads the same int8 input as product i - 1 (e.g. an expert's up after its gate). */
static int shares_previous_input(const Product *p, int i) {
    return i > 0 && p[i].W->dtype == DTYPE_Q8 && p[i - 1].W->dtype == DTYPE_Q8 && p[i].x == p[i - 1].x &&
           p[i].n == p[i - 1].n && p[i].W->cols == p[i - 1].W->cols && p[i].W->group == p[i - 1].W->group;
}

static void matmul_many(const Product *p, int count, ActivationScratch *act) {
    long long work = 0;  /* total: sum of blocks * cols * tokens */
    size_t used = 0;
    for (int i = 0; i < count; i++) {
        const Mat *W = p[i].W;
        work += (long long)(W->rows + 3) / 4 * W->cols * p[i].n;
        if (W->dtype != DTYPE_Q8) continue;
        if (!act || count > act->max_products) die("internal: activation scratch missing or too small");
        if (shares_previous_input(p, i)) act->at[i] = act->at[i - 1];
        else { act->at[i] = used; used += (size_t)p[i].n * W->cols; }
    }
    if (used > (act ? act->capacity : 0)) die("internal: activation scratch too small");
#pragma omp parallel if (work > 16384)
    {
        int threads = 1, id = 0;
#ifdef _OPENMP
        threads = omp_get_num_threads();
        id = omp_get_thread_num();
#endif
        int job = 0;  /* quantize the inputs, one token per job, round robin */
        for (int i = 0; i < count; i++) {
            const Mat *W = p[i].W;
            if (W->dtype != DTYPE_Q8 || shares_previous_input(p, i)) continue;
            for (int t = 0; t < p[i].n; t++, job++)
                if (job % threads == id)
                    quantize_activations(act->q + act->at[i] + (size_t)t * W->cols, act->scale + (act->at[i] + (size_t)t * W->cols) / W->group,
                                         p[i].x + (size_t)t * W->cols, W->cols, W->group);
        }
#pragma omp barrier
        long long begin = work * id / threads, end = work * (id + 1) / threads, before = 0;
        for (int i = 0; i < count; i++) {  /* this thread's blocks: those that start in [begin, end) */
            const Mat *W = p[i].W;
            long long cost = (long long)W->cols * p[i].n, blocks = (W->rows + 3) / 4;
            long long lo = begin > before ? (begin - before + cost - 1) / cost : 0, hi = end > before ? (end - before + cost - 1) / cost : 0;
            const int8_t *xq = W->dtype == DTYPE_Q8 ? act->q + act->at[i] : NULL;
            const float *xs = W->dtype == DTYPE_Q8 ? act->scale + act->at[i] / W->group : NULL;
            for (long long b = lo; b < (hi < blocks ? hi : blocks); b++) matmul_block(&p[i], (int)b, xq, xs);
            before += blocks * cost;
        }
    }
}

/* y = W x for n tokens: the one matrix product, for every weight type. */
static void matmul(float *y, const Mat *W, const float *x, int n, ActivationScratch *act) {
    Product p = {y, W, x, n};
    matmul_many(&p, 1, act);
}

/* Row r of W as floats: embedding lookup, and the rows W_UK^T sums in the absorbed query. */
static void mat_row_to_f32(float *out, const Mat *W, int r) {
    size_t at = (size_t)r * W->cols;
    if (W->dtype == DTYPE_BF16)
        for (int c = 0; c < W->cols; c++) out[c] = bf16_to_f32(((const uint16_t *)W->data)[at + c]);
    else if (W->dtype == DTYPE_Q8)
        for (int g = 0; g < W->cols / W->group; g++) {
            float sc = W->scale[at / W->group + g];
            for (int c = g * W->group; c < (g + 1) * W->group; c++) out[c] = ((const int8_t *)W->data)[at + c] * sc;
        }
    else memcpy(out, (const float *)W->data + at, (size_t)W->cols * sizeof(float));
}

/* y = W^T x: sums the rows of W weighted by x (row: scratch of W->cols). Absorbs W_UK into q. */
static void matvec_transposed(float *y, const Mat *W, const float *x, float *row) {
    memset(y, 0, (size_t)W->cols * sizeof(float));
    for (int r = 0; r < W->rows; r++) {
        mat_row_to_f32(row, W, r);
        float xr = x[r];
#pragma omp simd
        for (int c = 0; c < W->cols; c++) y[c] += xr * row[c];
    }
}

/* Rows [row0, row0+rows) of W, as a matrix of its own (e.g. one head's slice of kv_b_proj). */
static Mat mat_rows(const Mat *W, int row0, int rows) {
    Mat m = *W;
    m.data = (const char *)W->data + (size_t)row0 * W->cols * dtype_size(W->dtype);
    if (W->scale) m.scale = W->scale + (size_t)row0 * (W->cols / W->group);
    m.rows = rows;
    return m;
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

/* ------------------------------------------------------------------------- */
/* Decoupled RoPE with YaRN (paper eq. 14-15; YaRN: arXiv:2309.00071)          */
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
/* Run state: activations for a batch of tokens and the KV cache, allocated   */
/* once before decoding (nothing is allocated per token).                     */
/* ------------------------------------------------------------------------- */

enum { ATTN_ABSORB = 0, ATTN_NAIVE = 1 };

typedef struct {
    float *masked;                    /* [E] router probabilities with unselected groups zeroed */
    float *group_score;               /* [n_group] */
    unsigned char *taken, *group_taken;
} RouterScratch;

/* Tokens per forward call: a longer prompt goes through in chunks of this many. */
#define MAX_BATCH 64

typedef struct {
    int attn_mode, context;           /* context: positions the cache holds */
    double softmax_scale;
    float *rope_cos, *rope_sin;       /* [context][rope_dim/2] */
    float *x, *xn, *branch;           /* residual stream, its norm, a block's output [B][D] */
    float *q_latent;                  /* [B][q_lora_rank] */
    float *q;                         /* [B][H * (nope+rope)] */
    float *kv_a;                      /* [B][kv_lora_rank + rope] */
    float *kv;                        /* naive: each token's K_nope|V for all heads [B][H*(nope+v)] */
    float *q_absorbed;                /* absorb: [H][kv_lora_rank] */
    float *row;                       /* absorb: [H][kv_lora_rank] one weight row as floats */
    float *latent_out;                /* absorb: [H][B][kv_lora_rank] */
    float *head_tmp;                  /* absorb: [H][B][v] */
    float *scores;                    /* [H][context] */
    float *head_out;                  /* [B][H * v] */
    float *hidden, *hidden2;          /* MLP scratch: [B][I] dense, [B*K][I_moe] + [B][I_shared] MoE */
    float *expert_in, *expert_out;    /* the tokens routed to each expert, expert by expert [B*K][D] */
    int *expert_tokens;               /* [B*K]: which (token, choice) each row of expert_in is */
    Product *products;                /* the products of one parallel pass */
    Mat *head_mats;                   /* absorb: [H] each head's W_UV rows */
    float *router_probs;              /* [B][E] */
    int *topk_idx;                    /* [B][K] */
    float *topk_weight;               /* [B][K] */
    RouterScratch router;
    ActivationScratch act;            /* int8 activations for q8 weights */
    float *logits;                    /* [vocab] of the batch's last token */
    float *cache;                     /* [L][context][cache_width] */
    size_t cache_width;               /* floats per token per layer */
    /* Optional taps (NULL = off), filled by forward() for the batch's last token, for inspection
     * and tests: the residual stream after each layer [L][D], and each MoE layer's routing [L][K]. */
    float *tap_hidden, *tap_route_weight;
    int *tap_route_idx;
} RunState;

/* Floats per token per layer: the latent (absorb) or full per-head keys and values (naive). */
static size_t kv_cache_width(const Config *c, int attn_mode) {
    if (attn_mode == ATTN_ABSORB) return (size_t)c->kv_lora_rank + c->qk_rope_head_dim;
    return (size_t)c->num_attention_heads * (c->qk_nope_head_dim + c->qk_rope_head_dim + c->v_head_dim);
}

static int max_int(int a, int b) { return a > b ? a : b; }

static void init_run_state(RunState *s, const Config *c, int attn_mode, int context) {
    int D = c->hidden_size, H = c->num_attention_heads, B = MAX_BATCH, E = c->n_routed_experts, K = c->num_experts_per_tok;
    int q_head_dim = c->qk_nope_head_dim + c->qk_rope_head_dim, r = c->kv_lora_rank;
    int moe_width = c->moe_intermediate_size * (K + c->n_shared_experts);  /* per token: routed + shared */
    int mlp_width = max_int(c->intermediate_size, moe_width);
    int widest = max_int(max_int(max_int(D * (K + 1), mlp_width), max_int(c->q_lora_rank, H * r)), H * c->v_head_dim);
    int max_products = max_int(2 * (E < B * K ? E : B * K) + 2, H);  /* an MoE pass: gate and up per expert */
    memset(s, 0, sizeof *s);
    s->attn_mode = attn_mode;
    s->context = context;
    s->softmax_scale = attention_softmax_scale(c);
    s->rope_cos = xcalloc((size_t)context * c->qk_rope_head_dim / 2, sizeof(float));
    s->rope_sin = xcalloc((size_t)context * c->qk_rope_head_dim / 2, sizeof(float));
    rope_tables(c, context, s->rope_cos, s->rope_sin);
    s->x = xcalloc((size_t)B * D, sizeof(float));
    s->xn = xcalloc((size_t)B * D, sizeof(float));
    s->branch = xcalloc((size_t)B * D, sizeof(float));
    s->q_latent = xcalloc((size_t)B * c->q_lora_rank, sizeof(float));
    s->q = xcalloc((size_t)B * H * q_head_dim, sizeof(float));
    s->kv_a = xcalloc((size_t)B * (r + c->qk_rope_head_dim), sizeof(float));
    s->kv = xcalloc((size_t)B * H * (c->qk_nope_head_dim + c->v_head_dim), sizeof(float));
    s->q_absorbed = xcalloc((size_t)H * r, sizeof(float));
    s->row = xcalloc((size_t)H * r, sizeof(float));
    s->latent_out = xcalloc((size_t)H * B * r, sizeof(float));
    s->head_tmp = xcalloc((size_t)H * B * c->v_head_dim, sizeof(float));
    s->scores = xcalloc((size_t)H * context, sizeof(float));
    s->head_out = xcalloc((size_t)B * H * c->v_head_dim, sizeof(float));
    s->hidden = xcalloc((size_t)B * mlp_width, sizeof(float));
    s->hidden2 = xcalloc((size_t)B * mlp_width, sizeof(float));
    s->expert_in = xcalloc((size_t)B * K * D, sizeof(float));
    s->expert_out = xcalloc((size_t)B * K * D, sizeof(float));
    s->expert_tokens = xcalloc((size_t)B * K, sizeof(int));
    s->products = xcalloc(max_products, sizeof(Product));
    s->head_mats = xcalloc(H, sizeof(Mat));
    s->router_probs = xcalloc((size_t)B * E, sizeof(float));
    s->topk_idx = xcalloc((size_t)B * K, sizeof(int));
    s->topk_weight = xcalloc((size_t)B * K, sizeof(float));
    s->router.masked = xcalloc(E, sizeof(float));
    s->router.group_score = xcalloc(c->n_group, sizeof(float));
    s->router.taken = xcalloc(E, 1);
    s->router.group_taken = xcalloc(c->n_group, 1);
    if (c->dtype == DTYPE_Q8) {
        s->act.capacity = (size_t)B * widest;
        s->act.q = xcalloc(s->act.capacity, 1);
        s->act.scale = xcalloc(s->act.capacity, sizeof(float));
        s->act.max_products = max_products;
        s->act.at = xcalloc(max_products, sizeof(size_t));
    }
    s->logits = xcalloc(c->vocab_size, sizeof(float));
    s->cache_width = kv_cache_width(c, attn_mode);
    s->cache = xcalloc((size_t)c->num_hidden_layers * context * s->cache_width, sizeof(float));
}

static void free_run_state(RunState *s) {
    void *bufs[] = {s->rope_cos, s->rope_sin, s->x, s->xn, s->branch, s->q_latent, s->q, s->kv_a, s->kv,
                    s->q_absorbed, s->row, s->latent_out, s->head_tmp, s->scores, s->head_out, s->hidden,
                    s->hidden2, s->expert_in, s->expert_out, s->expert_tokens, s->router_probs, s->topk_idx,
                    s->topk_weight, s->router.masked, s->router.group_score, s->router.taken,
                    s->router.group_taken, s->act.q, s->act.scale, s->act.at, s->products, s->head_mats, s->logits, s->cache};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
}

/* SwiGLU's middle: gate <- silu(gate) * up, elementwise over count values. */
static void swiglu(float *gate, const float *up, size_t count) {
    for (size_t i = 0; i < count; i++) gate[i] = silu(gate[i]) * up[i];
}

/* SwiGLU MLP for n tokens (the dense layers): out = down( silu(gate x) * up x ). */
static void swiglu_mlp(RunState *s, float *out, const float *x, int n, const Mat *gate, const Mat *up, const Mat *down) {
    Product gate_up[2] = {{s->hidden, gate, x, n}, {s->hidden2, up, x, n}};
    matmul_many(gate_up, 2, &s->act);
    swiglu(s->hidden, s->hidden2, (size_t)n * gate->rows);
    matmul(out, down, s->hidden, n, &s->act);
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

/* Queries for n tokens from pos (eq. 12-14): with q LoRA, q = W_UQ norm(W_DQ h); else q = W_Q h. */
static void mla_query(RunState *s, const Config *c, const Layer *L, int n, int pos) {
    if (c->q_lora_rank > 0) {  /* q_latent = W_DQ h came with the latent (mla) */
        for (int t = 0; t < n; t++)  /* eps 1e-6 is fixed in the official code */
            rmsnorm(s->q_latent + (size_t)t * c->q_lora_rank, s->q_latent + (size_t)t * c->q_lora_rank, L->q_a_norm, c->q_lora_rank, 1e-6);
        matmul(s->q, &L->q_b_proj, s->q_latent, n, &s->act);
    }
    int q_head_dim = c->qk_nope_head_dim + c->qk_rope_head_dim, H = c->num_attention_heads, half = c->qk_rope_head_dim / 2;
    for (int t = 0; t < n; t++)
        for (int h = 0; h < H; h++)
            rope_rotate(s->q + ((size_t)t * H + h) * q_head_dim + c->qk_nope_head_dim, s->rope_cos + (size_t)(pos + t) * half,
                        s->rope_sin + (size_t)(pos + t) * half, c->qk_rope_head_dim);
}

/* Compressed KV for n tokens (eq. 9, 15): kv_a = [c_kv | k_pe]; c = norm(c_kv); k_pe rotated. */
static void mla_latent(RunState *s, const Config *c, const Layer *L, int n, int pos) {
    int half = c->qk_rope_head_dim / 2, width = c->kv_lora_rank + c->qk_rope_head_dim;
    for (int t = 0; t < n; t++) {
        float *a = s->kv_a + (size_t)t * width;
        rmsnorm(a, a, L->kv_a_norm, c->kv_lora_rank, 1e-6);
        rope_rotate(a + c->kv_lora_rank, s->rope_cos + (size_t)(pos + t) * half, s->rope_sin + (size_t)(pos + t) * half, c->qk_rope_head_dim);
    }
}

/* Absorbed attention over the latent cache, for every head and token of the batch. */
static void mla_attend_absorbed(RunState *s, const Config *c, const Layer *L, float *layer_cache, int n, int pos) {
    int H = c->num_attention_heads, nope = c->qk_nope_head_dim, rope = c->qk_rope_head_dim, vdim = c->v_head_dim;
    int rank = c->kv_lora_rank, q_head_dim = nope + rope, kv_head_rows = nope + vdim;
    size_t width = s->cache_width;
    memcpy(layer_cache + (size_t)pos * width, s->kv_a, (size_t)n * width * sizeof(float));
#pragma omp parallel for schedule(static)
    for (int h = 0; h < H; h++) {
        float *q_abs = s->q_absorbed + (size_t)h * rank, *att = s->scores + (size_t)h * s->context;
        Mat w_uk = mat_rows(&L->kv_b_proj, h * kv_head_rows, nope);
        for (int t = 0; t < n; t++) {
            const float *q_nope = s->q + ((size_t)t * H + h) * q_head_dim, *q_pe = q_nope + nope;
            float *u = s->latent_out + ((size_t)h * n + t) * rank;
            int last = pos + t;                                   /* causal: up to this token */
            matvec_transposed(q_abs, &w_uk, q_nope, s->row + (size_t)h * rank);  /* q_abs = W_UK^T q_nope */
            for (int j = 0; j <= last; j++) {
                const float *cj = layer_cache + (size_t)j * width;
                att[j] = (float)s->softmax_scale * (dot_f32(q_abs, cj, rank) + dot_f32(q_pe, cj + rank, rope));
            }
            softmax(att, last + 1);
            memset(u, 0, (size_t)rank * sizeof(float));            /* u = sum_j P_j c_j */
            for (int j = 0; j <= last; j++) {
                const float *cj = layer_cache + (size_t)j * width;
                float p = att[j];
#pragma omp simd
                for (int i = 0; i < rank; i++) u[i] += p * cj[i];
            }
        }
    }
    for (int h = 0; h < H; h++) {                                  /* o = W_UV u, all heads in one pass */
        s->head_mats[h] = mat_rows(&L->kv_b_proj, h * kv_head_rows + nope, vdim);
        s->products[h] = (Product){s->head_tmp + (size_t)h * n * vdim, &s->head_mats[h], s->latent_out + (size_t)h * n * rank, n};
    }
    matmul_many(s->products, H, &s->act);
    for (int t = 0; t < n; t++)
        for (int h = 0; h < H; h++)
            memcpy(s->head_out + ((size_t)t * H + h) * vdim, s->head_tmp + ((size_t)h * n + t) * vdim, vdim * sizeof(float));
}

/* Naive attention: decompress each token's per-head K and V, cache them, attend as in MHA. */
static void mla_attend_naive(RunState *s, const Config *c, const Layer *L, float *layer_cache, int n, int pos) {
    int H = c->num_attention_heads, nope = c->qk_nope_head_dim, rope = c->qk_rope_head_dim, vdim = c->v_head_dim;
    int q_head_dim = nope + rope, kv_head_rows = nope + vdim, latent = c->kv_lora_rank + rope;
    size_t width = s->cache_width, head_width = (size_t)q_head_dim + vdim;
    for (int t = 0; t < n; t++)                                   /* kv_b_proj takes the normed latent only */
        memcpy(s->hidden + (size_t)t * c->kv_lora_rank, s->kv_a + (size_t)t * latent, c->kv_lora_rank * sizeof(float));
    matmul(s->kv, &L->kv_b_proj, s->hidden, n, &s->act);          /* [k_nope | v] per head, eq. 10-11 */
    for (int t = 0; t < n; t++) {                                  /* cached per head: [k_nope | k_pe | v] */
        float *slot = layer_cache + (size_t)(pos + t) * width;
        const float *kv = s->kv + (size_t)t * H * kv_head_rows;
        for (int h = 0; h < H; h++) {
            float *k = slot + h * head_width;
            memcpy(k, kv + (size_t)h * kv_head_rows, nope * sizeof(float));
            memcpy(k + nope, s->kv_a + (size_t)t * latent + c->kv_lora_rank, rope * sizeof(float));
            memcpy(k + q_head_dim, kv + (size_t)h * kv_head_rows + nope, vdim * sizeof(float));
        }
    }
#pragma omp parallel for schedule(static)
    for (int h = 0; h < H; h++) {
        float *att = s->scores + (size_t)h * s->context;
        for (int t = 0; t < n; t++) {
            const float *q = s->q + ((size_t)t * H + h) * q_head_dim;
            float *out = s->head_out + ((size_t)t * H + h) * vdim;
            int last = pos + t;
            for (int j = 0; j <= last; j++)
                att[j] = (float)s->softmax_scale * dot_f32(q, layer_cache + j * width + h * head_width, q_head_dim);
            softmax(att, last + 1);
            memset(out, 0, vdim * sizeof(float));
            for (int j = 0; j <= last; j++) {
                const float *v = layer_cache + j * width + h * head_width + q_head_dim;
                for (int i = 0; i < vdim; i++) out[i] += att[j] * v[i];
            }
        }
    }
}

/* MLA for n tokens at positions pos..: s->xn in, s->branch out (eq. 19: u = W_O [o_1; ...; o_H]). */
static void mla(RunState *s, const Config *c, const Layer *L, int layer, int n, int pos) {
    float *layer_cache = s->cache + (size_t)layer * s->context * s->cache_width;
    int lora = c->q_lora_rank > 0;  /* eq. 9 and eq. 12 (or 14) read the same input: one pass */
    Product from_input[2] = {{lora ? s->q_latent : s->q, lora ? &L->q_a_proj : &L->q_proj, s->xn, n}, {s->kv_a, &L->kv_a_proj, s->xn, n}};
    matmul_many(from_input, 2, &s->act);
    mla_query(s, c, L, n, pos);
    mla_latent(s, c, L, n, pos);
    if (s->attn_mode == ATTN_ABSORB) mla_attend_absorbed(s, c, L, layer_cache, n, pos);
    else mla_attend_naive(s, c, L, layer_cache, n, pos);
    matmul(s->branch, &L->o_proj, s->head_out, n, &s->act);
}

/* ------------------------------------------------------------------------- */
/* DeepSeekMoE (paper section 2.2, eq. 20-22)                                 */
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
 * Fills idx/weight (K entries, ascending expert id). probs: [E]. */
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

/* MoE FFN for n tokens (eq. 20): the shared experts on every token, plus each routed expert on
 * just the tokens that chose it (its weights read once for all of them), weighted. */
static void moe(RunState *s, const Config *c, const Layer *L, int n) {
    int D = c->hidden_size, E = c->n_routed_experts, K = c->num_experts_per_tok, I = c->moe_intermediate_size;
    matmul(s->router_probs, &L->router, s->xn, n, &s->act);
    for (int t = 0; t < n; t++) {
        softmax(s->router_probs + (size_t)t * E, E);
        route_tokens(c, s->router_probs + (size_t)t * E, s->topk_idx + (size_t)t * K, s->topk_weight + (size_t)t * K, &s->router);
    }
    /* Each expert's tokens, gathered expert by expert into rows of expert_in; then every gate and
     * up product (routed and shared) in one pass, SwiGLU, and every down product in a second. */
    Product *p = s->products;
    int rows = 0, count = 0;
    for (int e = 0; e < E; e++) {
        int first = rows;
        for (int t = 0; t < n; t++)
            for (int k = 0; k < K; k++)
                if (s->topk_idx[t * K + k] == e) {
                    s->expert_tokens[rows] = t * K + k;
                    memcpy(s->expert_in + (size_t)rows * D, s->xn + (size_t)t * D, D * sizeof(float));
                    rows++;
                }
        if (rows == first) continue;
        p[count++] = (Product){s->hidden + (size_t)first * I, &L->expert_gate[e], s->expert_in + (size_t)first * D, rows - first};
        p[count++] = (Product){s->hidden2 + (size_t)first * I, &L->expert_up[e], s->expert_in + (size_t)first * D, rows - first};
    }
    float *shared_gate = s->hidden + (size_t)rows * I, *shared_up = s->hidden2 + (size_t)rows * I;
    if (L->has_mlp) {
        p[count++] = (Product){shared_gate, &L->mlp_gate, s->xn, n};
        p[count++] = (Product){shared_up, &L->mlp_up, s->xn, n};
    }
    matmul_many(p, count, &s->act);
    swiglu(s->hidden, s->hidden2, (size_t)rows * I + (L->has_mlp ? (size_t)n * L->mlp_gate.rows : 0));
    int routed = L->has_mlp ? count - 2 : count;
    for (int j = 0; j < routed; j += 2) {  /* down: gate j's rows of hidden -> the same rows of expert_out */
        size_t first = (size_t)(p[j].x - s->expert_in) / D;
        p[j / 2] = (Product){s->expert_out + first * D, &L->expert_down[s->topk_idx[s->expert_tokens[first]]], s->hidden + first * I, p[j].n};
    }
    count = routed / 2;
    if (L->has_mlp) p[count++] = (Product){s->branch, &L->mlp_down, shared_gate, n};
    else memset(s->branch, 0, (size_t)n * D * sizeof(float));
    matmul_many(p, count, &s->act);
    for (int j = 0; j < rows; j++) {  /* eq. 20: h + shared + sum of g_i * expert_i */
        int t = s->expert_tokens[j] / K;
        float wgt = s->topk_weight[s->expert_tokens[j]];
        for (int i = 0; i < D; i++) s->branch[(size_t)t * D + i] += wgt * s->expert_out[(size_t)j * D + i];
    }
}

/* ------------------------------------------------------------------------- */
/* Forward: n tokens at positions pos.. through every layer, extending the KV */
/* cache. Decoding is n = 1; a prompt goes through as a matrix, in chunks.    */
/* Returns the logits of the last token.                                      */
/* ------------------------------------------------------------------------- */

static float *forward_batch(const Weights *w, RunState *s, const int *tokens, int n, int pos) {
    const Config *c = &w->cfg;
    int D = c->hidden_size, L = c->num_hidden_layers, K = c->num_experts_per_tok;
    for (int t = 0; t < n; t++) mat_row_to_f32(s->x + (size_t)t * D, &w->embed, tokens[t]);
    for (int l = 0; l < L; l++) {
        const Layer *layer = &w->layers[l];
        for (int t = 0; t < n; t++) rmsnorm(s->xn + (size_t)t * D, s->x + (size_t)t * D, layer->input_norm, D, c->rms_norm_eps);
        mla(s, c, layer, l, n, pos);
        for (size_t i = 0; i < (size_t)n * D; i++) s->x[i] += s->branch[i];
        for (int t = 0; t < n; t++) rmsnorm(s->xn + (size_t)t * D, s->x + (size_t)t * D, layer->post_attention_norm, D, c->rms_norm_eps);
        if (layer->is_moe) moe(s, c, layer, n);
        else swiglu_mlp(s, s->branch, s->xn, n, &layer->mlp_gate, &layer->mlp_up, &layer->mlp_down);
        for (size_t i = 0; i < (size_t)n * D; i++) s->x[i] += s->branch[i];
        if (s->tap_hidden) memcpy(s->tap_hidden + (size_t)l * D, s->x + (size_t)(n - 1) * D, D * sizeof(float));
        if (s->tap_route_idx && layer->is_moe) {
            memcpy(s->tap_route_idx + (size_t)l * K, s->topk_idx + (size_t)(n - 1) * K, K * sizeof(int));
            memcpy(s->tap_route_weight + (size_t)l * K, s->topk_weight + (size_t)(n - 1) * K, K * sizeof(float));
        }
    }
    float *last = s->x + (size_t)(n - 1) * D;
    rmsnorm(last, last, w->final_norm, D, c->rms_norm_eps);
    matmul(s->logits, &w->lm_head, last, 1, &s->act);
    return s->logits;
}

#ifdef DSV2_CUDA
/* The GPU build (make cuda): dsv2.cu runs the same forward pass on NVIDIA GPUs. This file stays
 * the host program; it hands dsv2.cu the config and every tensor in file order, and forward()
 * below sends tokens there. */
typedef struct {
    const void *data;
    const float *scale;
    int dtype, rows, cols, group;  /* rows = 1 for a vector */
} GpuTensor;
void *cuda_create(const Config *c, const GpuTensor *tensors, int n_tensors, int context, const char *gpus,
                  void (*route)(const Config *, const float *, int *, float *), const float *rope_cos,
                  const float *rope_sin, float softmax_scale);
float *cuda_forward(void *gpu, const int *tokens, int n, int pos);
void cuda_destroy(void *gpu);
static void *gpu_model;  /* set by main with -g */

/* Routing on the host, the same code as the CPU path: the GPU sends E probabilities per token. */
static void route_for_gpu(const Config *c, const float *probs, int *idx, float *weight) {
    static RouterScratch r;
    static int E, G;
    if (E != c->n_routed_experts || G != c->n_group) {
        free(r.masked); free(r.group_score); free(r.taken); free(r.group_taken);
        E = c->n_routed_experts; G = c->n_group;
        r.masked = xcalloc(E, sizeof(float)); r.group_score = xcalloc(G, sizeof(float));
        r.taken = xcalloc(E, 1); r.group_taken = xcalloc(G, 1);
    }
    route_tokens(c, probs, idx, weight, &r);
}

/* Every tensor in file order, as dsv2.cu walks them. */
static void *gpu_model_create(const Weights *w, const RunState *s, const char *gpus) {
    const Config *c = &w->cfg;
    GpuTensor *t = xcalloc(3 + (size_t)c->num_hidden_layers * (16 + 3 * (size_t)c->n_routed_experts), sizeof(GpuTensor));
    int n = 0;
#define GPU_VEC(p, len) t[n++] = (GpuTensor){(p), NULL, DTYPE_F32, 1, (len), (len)}
#define GPU_MAT(m) t[n++] = (GpuTensor){(m).data, (m).scale, (m).dtype, (m).rows, (m).cols, (m).group}
    GPU_MAT(w->embed);
    for (int l = 0; l < c->num_hidden_layers; l++) {
        const Layer *L = &w->layers[l];
        GPU_VEC(L->input_norm, c->hidden_size);
        if (c->q_lora_rank > 0) { GPU_MAT(L->q_a_proj); GPU_VEC(L->q_a_norm, c->q_lora_rank); GPU_MAT(L->q_b_proj); }
        else GPU_MAT(L->q_proj);
        GPU_MAT(L->kv_a_proj); GPU_VEC(L->kv_a_norm, c->kv_lora_rank); GPU_MAT(L->kv_b_proj); GPU_MAT(L->o_proj);
        GPU_VEC(L->post_attention_norm, c->hidden_size);
        if (L->is_moe) {
            GPU_MAT(L->router);
            for (int e = 0; e < c->n_routed_experts; e++) { GPU_MAT(L->expert_gate[e]); GPU_MAT(L->expert_up[e]); GPU_MAT(L->expert_down[e]); }
        }
        if (L->has_mlp) { GPU_MAT(L->mlp_gate); GPU_MAT(L->mlp_up); GPU_MAT(L->mlp_down); }
    }
    GPU_VEC(w->final_norm, c->hidden_size);
    GPU_MAT(w->lm_head);
#undef GPU_VEC
#undef GPU_MAT
    /* the RoPE/YaRN tables and the softmax scale are the host's: one place computes them */
    void *gpu = cuda_create(c, t, n, s->context, gpus, route_for_gpu, s->rope_cos, s->rope_sin, (float)s->softmax_scale);
    free(t);
    return gpu;
}
#endif

/* Any number of tokens: in chunks of MAX_BATCH. */
static float *forward(const Weights *w, RunState *s, const int *tokens, int n, int pos) {
#ifdef DSV2_CUDA
    if (gpu_model) return cuda_forward(gpu_model, tokens, n, pos);
#endif
    float *logits = NULL;
    for (int done = 0; done < n; done += MAX_BATCH) {
        int chunk = n - done < MAX_BATCH ? n - done : MAX_BATCH;
        logits = forward_batch(w, s, tokens + done, chunk, pos + done);
    }
    return logits;
}

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
    if (b < d->lower || b > d->upper) {  /* the sequence so far is one bad subpart; b starts afresh */
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

/* Dies unless text is valid UTF-8: prompts are text, and a wrong byte would silently become U+FFFD. */
static void utf8_validate(const unsigned char *text, size_t len) {
    Utf8Decoder d = {0};
    uint32_t cp[2];
    size_t start = 0;
    for (size_t i = 0; i < len; i++) {
        if (d.needed == 0) start = i;
        int k = utf8_feed(&d, text[i], cp);
        if (k == 2 || (k == 1 && cp[0] == 0xFFFD && !(i >= 2 && text[i - 2] == 0xEF && text[i - 1] == 0xBF && text[i] == 0xBD)))
            die("the input is not valid UTF-8 (bad byte sequence at byte %zu)", k == 2 ? start : i);
    }
    if (d.needed) die("the input is not valid UTF-8 (it ends inside a character)");
}

static int utf8_encode(uint32_t cp, char *out) {
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) { out[0] = (char)(0xC0 | cp >> 6); out[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | cp >> 12); out[1] = (char)(0x80 | ((cp >> 6) & 0x3F)); out[2] = (char)(0x80 | (cp & 0x3F));
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
typedef struct { int op, x, y; } ReInst;  /* SPLIT: try x, then y. LOOKAHEAD: x = negative, y = continuation */

enum { NODE_CLASS, NODE_CAT, NODE_ALT, NODE_REPEAT, NODE_EOL, NODE_BOL, NODE_LOOK, NODE_EMPTY };
typedef struct { int kind, a, b, min, max, greedy; } ReNode;  /* max -1 = unbounded; LOOK: greedy = negative */

typedef struct {
    ReInst *code;
    int n_code;
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

/* After a backslash: adds a class escape (\s, \p{..}, ...) to c, or returns the literal it denotes. */
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
                if (!parse_escape(ps, &unused, &hi)) regex_fail(ps, "class escape used as a range end");
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
    case ')': case '|': case '*': case '+': case '?': case '{': regex_fail(ps, "unexpected operator");
    default: class_add_range(&c, ch, ch); return finish_class(ps, &c);
    }
    return -1;
}

static int parse_number(ReParser *ps) {
    int v = 0, digits = 0;
    while (peek(ps) >= '0' && peek(ps) <= '9' && v < 100000) { v = v * 10 + (int)(ps->p[ps->at++] - '0'); digits++; }
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
            if (min < 0 || peek(ps) != '}' || (max >= 0 && max < min) || max > 1000) { ps->at = save; regex_fail(ps, "bad {m,n}"); }
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

static int emit(ReParser *ps, int op, int x, int y) {
    Regex *re = ps->re;
    re->code = realloc(re->code, (size_t)(re->n_code + 1) * sizeof(ReInst));
    if (!re->code) die("out of memory");
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
            for (int pc = first_split; pc < re->n_code; pc++)  /* every optional copy can exit to the end */
                if (re->code[pc].op == OP_SPLIT && re->code[pc].y == -1) {
                    re->code[pc].y = re->n_code;
                    if (!n.greedy) { re->code[pc].y = re->code[pc].x; re->code[pc].x = re->n_code; }
                }
        }
        break;
    }
    }
}

static void regex_compile(Regex *re, const char *pattern, size_t len, const Property *props, int n_props) {
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

typedef struct { int *pc_pos; int n, cap; } BacktrackStack;

static void stack_push(BacktrackStack *st, int pc, int pos) {
    if (st->n + 2 > st->cap) {
        st->cap = st->cap ? 2 * st->cap : 256;
        st->pc_pos = realloc(st->pc_pos, (size_t)st->cap * sizeof(int));
        if (!st->pc_pos) die("out of memory");
    }
    st->pc_pos[st->n++] = pc;
    st->pc_pos[st->n++] = pos;
}

/* Runs the program from pc at s[pos]; returns the end of the first (leftmost-first) match, or -1. */
static int regex_run(const Regex *re, int pc, const uint32_t *s, int pos, int n, BacktrackStack *st) {
    int base = st->n;
    stack_push(st, pc, pos);
    while (st->n > base) {
        pos = st->pc_pos[--st->n];
        pc = st->pc_pos[--st->n];
        for (;;) {
            const ReInst *in = &re->code[pc];
            if (in->op == OP_CLASS) {
                if (pos < n && class_has(&re->classes[in->x], s[pos])) { pc++; pos++; continue; }
                break;
            } else if (in->op == OP_SPLIT) {
                stack_push(st, in->y, pos);
                pc = in->x;
            } else if (in->op == OP_JMP) {
                pc = in->x;
            } else if (in->op == OP_MATCH) {
                st->n = base;
                return pos;
            } else if (in->op == OP_EOL) {  /* Ruby-syntax $: end of input or before a newline */
                if (pos == n || s[pos] == '\n') pc++;
                else break;
            } else if (in->op == OP_BOL) {
                if (pos == 0 || s[pos - 1] == '\n') pc++;
                else break;
            } else {  /* OP_LOOKAHEAD */
                int matched = regex_run(re, pc + 1, s, pos, n, st) >= 0;
                if (matched == !in->x) pc = in->y;
                else break;
            }
        }
    }
    return -1;
}

/* --- The tokenizer proper --- */

typedef struct {
    int n_ids, bos_id, eos_id, add_bos, chat_template;
    unsigned char *kind;                 /* per id: TOKEN_* */
    const unsigned char **bytes;         /* per id: what it decodes to */
    uint32_t *len;
    int n_added;                         /* added tokens, matched in the raw text before anything else */
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
} Tokenizer;

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

static uint64_t merge_hash_key(uint32_t left, uint32_t right) { return ((uint64_t)left << 32 | right) + 1; }
static size_t merge_slot(const Tokenizer *t, uint64_t key) {
    size_t h = (size_t)((key * 0x9E3779B97F4A7C15ull) >> 17) & t->merge_mask;
    while (t->merge_key[h] && t->merge_key[h] != key) h = (h + 1) & t->merge_mask;
    return h;
}
static int merge_lookup(const Tokenizer *t, int left, int right) {
    size_t h = merge_slot(t, merge_hash_key((uint32_t)left, (uint32_t)right));
    return t->merge_key[h] ? t->merge_rank[h] : -1;
}

static void tokenizer_parse(Tokenizer *t, const unsigned char *blob, size_t size, const char *path) {
    BlobReader r = {blob, blob + size, path};
    if (size < 8 || memcmp(blob_take(&r, 4), TOKENIZER_MAGIC, 4)) die("%s: no tokenizer found (bad magic)", path);
    uint32_t version = blob_u32(&r);
    if (version != TOKENIZER_VERSION) die("%s: tokenizer version %u; this build reads version %d", path, version, TOKENIZER_VERSION);
    t->n_ids = (int)blob_u32(&r);
    t->bos_id = (int32_t)blob_u32(&r);
    t->eos_id = (int32_t)blob_u32(&r);
    t->add_bos = (int)blob_u32(&r);
    t->chat_template = (int)blob_u32(&r);
    if (t->n_ids < 1 || t->n_ids > (1 << 24) || t->bos_id >= t->n_ids || t->eos_id >= t->n_ids)
        die("tokenizer in %s is corrupt (%d ids, bos %d, eos %d)", path, t->n_ids, t->bos_id, t->eos_id);
    t->kind = xcalloc(t->n_ids, 1);
    t->bytes = xcalloc(t->n_ids, sizeof(char *));
    t->len = xcalloc(t->n_ids, sizeof(uint32_t));
    for (int b = 0; b < 256; b++) t->byte_id[b] = -1;
    for (int i = 0; i < t->n_ids; i++) {
        t->kind[i] = *blob_take(&r, 1);
        t->len[i] = blob_u32(&r);
        t->bytes[i] = blob_take(&r, t->len[i]);
        if (t->kind[i] == TOKEN_BPE && t->len[i] == 1) t->byte_id[t->bytes[i][0]] = i;
    }
    t->n_added = (int)blob_u32(&r);
    if (t->n_added > t->n_ids) die("tokenizer in %s is corrupt (added tokens)", path);
    t->added_id = xcalloc(t->n_added, sizeof(int));
    t->added_text = xcalloc(t->n_added, sizeof(char *));
    t->added_len = xcalloc(t->n_added, sizeof(uint32_t));
    for (int i = 0; i < t->n_added; i++) {
        t->added_id[i] = (int)blob_u32(&r);
        t->added_len[i] = blob_u32(&r);
        t->added_text[i] = blob_take(&r, t->added_len[i]);
        if (t->added_id[i] < 0 || t->added_id[i] >= t->n_ids || t->added_len[i] == 0) die("tokenizer in %s is corrupt (added token %d)", path, i);
        t->added_start[t->added_text[i][0] + 1]++;
    }
    for (int b = 0; b < 256; b++) t->added_start[b + 1] += t->added_start[b];
    t->added_by_byte = xcalloc(t->n_added, sizeof(int));
    int fill[256];
    memcpy(fill, t->added_start, sizeof fill);
    for (int i = 0; i < t->n_added; i++) t->added_by_byte[fill[t->added_text[i][0]]++] = i;
    t->n_merges = (int)blob_u32(&r);
    if (t->n_merges < 0 || t->n_merges > (1 << 24)) die("tokenizer in %s is corrupt (merges)", path);
    t->merges = xcalloc((size_t)t->n_merges * 3, sizeof(uint32_t));
    memcpy(t->merges, blob_take(&r, (size_t)t->n_merges * 12), (size_t)t->n_merges * 12);
    size_t slots = 16;
    while (slots < 2 * (size_t)t->n_merges) slots *= 2;
    t->merge_mask = slots - 1;
    t->merge_key = xcalloc(slots, sizeof(uint64_t));
    t->merge_rank = xcalloc(slots, sizeof(int));
    for (int m = 0; m < t->n_merges; m++) {
        uint32_t *mg = t->merges + 3 * (size_t)m;
        if (mg[0] >= (uint32_t)t->n_ids || mg[1] >= (uint32_t)t->n_ids || mg[2] >= (uint32_t)t->n_ids)
            die("tokenizer in %s is corrupt (merge %d)", path, m);
        uint64_t key = merge_hash_key(mg[0], mg[1]);
        size_t h = merge_slot(t, key);
        if (!t->merge_key[h]) { t->merge_key[h] = key; t->merge_rank[h] = m; }  /* the first (lowest) rank wins */
    }
    t->n_regex = (int)blob_u32(&r);
    if (t->n_regex < 0 || t->n_regex > 64) die("tokenizer in %s is corrupt (pre-tokenizer)", path);
    const unsigned char **pattern = xcalloc(t->n_regex, sizeof(char *));
    uint32_t *pattern_len = xcalloc(t->n_regex, sizeof(uint32_t));
    for (int i = 0; i < t->n_regex; i++) {
        pattern_len[i] = blob_u32(&r);
        pattern[i] = blob_take(&r, pattern_len[i]);
    }
    t->n_props = (int)blob_u32(&r);
    if (t->n_props < 0 || t->n_props > 64) die("tokenizer in %s is corrupt (properties)", path);
    t->props = xcalloc(t->n_props, sizeof(Property));
    for (int i = 0; i < t->n_props; i++) {
        uint32_t n = blob_u32(&r);
        if (n >= sizeof t->props[i].name) die("tokenizer in %s is corrupt (property name)", path);
        memcpy(t->props[i].name, blob_take(&r, n), n);
        t->props[i].n = (int)blob_u32(&r);
        if (t->props[i].n < 0 || t->props[i].n > (1 << 20)) die("tokenizer in %s is corrupt (property ranges)", path);
        t->props[i].ranges = xcalloc(t->props[i].n, sizeof(Range));
        memcpy(t->props[i].ranges, blob_take(&r, (size_t)t->props[i].n * 8), (size_t)t->props[i].n * 8);
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

static void free_tokenizer(Tokenizer *t) {
    for (int i = 0; i < t->n_regex; i++) regex_free(&t->regex[i]);
    for (int i = 0; i < t->n_props; i++) free(t->props[i].ranges);
    free(t->regex); free(t->props); free(t->kind); free(t->bytes); free(t->len);
    free(t->added_id); free(t->added_by_byte); free(t->added_text); free(t->added_len); free(t->merges);
    free(t->merge_key); free(t->merge_rank); free(t->stack.pc_pos);
    if (t->map) munmap(t->map, t->map_size);
}

/* Growable list of token ids. */
typedef struct { int *ids; int n, cap; } IdList;
static void ids_push(IdList *l, int id) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->ids = realloc(l->ids, (size_t)l->cap * sizeof(int));
        if (!l->ids) die("out of memory");
    }
    l->ids[l->n++] = id;
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
        if (child + 1 < *n && (h[child + 1].rank < h[child].rank || (h[child + 1].rank == h[child].rank && h[child + 1].pos < h[child].pos))) child++;
        if (last.rank < h[child].rank || (last.rank == h[child].rank && last.pos <= h[child].pos)) break;
        h[i] = h[child];
        i = child;
    }
    h[i] = last;
    return top;
}

static void bpe_piece(const Tokenizer *t, const unsigned char *text, int n, IdList *out) {
    if (n == 0) return;
    int *sym = xcalloc(n, sizeof(int)), *next = xcalloc(n, sizeof(int)), *prev = xcalloc(n, sizeof(int));
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
        if (prev[i] >= 0 && (rank = merge_lookup(t, sym[prev[i]], sym[i])) >= 0) heap_push(heap, &heap_n, (MergeCandidate){rank, prev[i]});
        if (next[i] >= 0 && (rank = merge_lookup(t, sym[i], sym[next[i]])) >= 0) heap_push(heap, &heap_n, (MergeCandidate){rank, i});
    }
    for (int i = 0; i >= 0; i = next[i]) ids_push(out, sym[i]);
    free(sym); free(next); free(prev); free(heap);
}

/* The pre-tokenizer: each regex splits every current piece (Isolated: matches and gaps both
 * stay), in order; a match never crosses a piece boundary. Pieces are [start, end) code points. */
static int pretokenize(Tokenizer *t, const uint32_t *cps, int n, int **pieces_out) {
    int cap = 2 * n + 2, count = n > 0, *pieces = xcalloc(cap, sizeof(int)), *next = xcalloc(cap, sizeof(int));
    pieces[0] = 0; pieces[1] = n;
    for (int r = 0; r < t->n_regex; r++) {
        int m = 0;
        for (int k = 0; k < count; k++) {
            int start = pieces[2 * k], len = pieces[2 * k + 1] - start, last = 0;
            const uint32_t *s = cps + start;
            for (int p = 0; p < len;) {
                int end = regex_run(&t->regex[r], 0, s, p, len, &t->stack);
                if (end <= p) { p++; continue; }
                if (p > last) { next[2 * m] = start + last; next[2 * m + 1] = start + p; m++; }
                next[2 * m] = start + p; next[2 * m + 1] = start + end; m++;
                last = p = end;
            }
            if (last < len) { next[2 * m] = start + last; next[2 * m + 1] = start + len; m++; }
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
    for (int i = 0; i < len; i++)  /* valid UTF-8 (checked by the caller): one code point per sequence */
        if (utf8_feed(&d, text[i], cp)) { cps[n++] = cp[0]; offset[n] = i + 1; }
    int *pieces, count = pretokenize(t, cps, n, &pieces);
    for (int k = 0; k < count; k++)
        bpe_piece(t, text + offset[pieces[2 * k]], offset[pieces[2 * k + 1]] - offset[pieces[2 * k]], out);
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
typedef struct {
    Utf8Decoder utf8;
    FILE *file;           /* write here, or */
    char *buf;            /* append here (tests) */
    size_t n, cap;
} TextSink;

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

/* One chat turn as text, with the model's template (tokenizer_config.json's chat_template):
 *   DeepSeek-V2: <bos>{system}\n\nUser: {user}\n\nAssistant:      (no space after "Assistant:")
 *   DeepSeek-V3: <bos>{system}<｜User｜>{user}<｜Assistant｜>
 * The first turn carries BOS and the optional system prompt. The caller feeds EOS after each reply. */
static char *render_chat_turn(const Tokenizer *t, const char *system, const char *user, int first_turn) {
    size_t n = strlen(user) + (system ? strlen(system) : 0) + (t->bos_id >= 0 ? t->len[t->bos_id] : 0) + 64;
    char *out = xcalloc(n, 1), *p = out;
    if (first_turn && t->bos_id >= 0) { memcpy(p, t->bytes[t->bos_id], t->len[t->bos_id]); p += t->len[t->bos_id]; }
    if (t->chat_template == CHAT_DEEPSEEK_V2)
        snprintf(p, n - (p - out), "%s%sUser: %s\n\nAssistant:", first_turn && system ? system : "", first_turn && system ? "\n\n" : "", user);
    else if (t->chat_template == CHAT_DEEPSEEK_V3)
        snprintf(p, n - (p - out), "%s<\xEF\xBD\x9CUser\xEF\xBD\x9C>%s<\xEF\xBD\x9C" "Assistant\xEF\xBD\x9C>", first_turn && system ? system : "", user);
    else die("this tokenizer has no known chat template (DeepSeek-V2 or V3)");
    return out;
}

/* A file holding a tokenizer: a model with one inside, or a standalone .tok from export.py. */
static int load_tokenizer_file(Tokenizer *t, const char *path, const Weights *w) {
    memset(t, 0, sizeof *t);
    if (w) {
        if (!w->cfg.tokenizer_offset) return 0;
        tokenizer_parse(t, (const unsigned char *)w->map + w->cfg.tokenizer_offset, w->cfg.tokenizer_size, path);
        if (t->n_ids > w->cfg.vocab_size) die("%s: the tokenizer has %d ids, more than the model's vocab_size %d", path, t->n_ids, w->cfg.vocab_size);
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

/* Feeds prompt[0..n) at positions *pos onwards, then samples up to max_new tokens, streaming each
 * (as text through the tokenizer, or as ids without one) and feeding it back. The last sampled
 * token is returned, not fed: chat feeds it with the next turn. stop_at_eos ends at EOS. */
static int generate(const Weights *w, RunState *s, Sampler *sp, const Tokenizer *tok, TextSink *sink,
                    const int *prompt, int n_prompt, int *pos, int max_new, int stop_at_eos) {
    if (n_prompt < 1) die("the prompt is empty: give at least one token");
    check_context(*pos + n_prompt, s->context);
    double t0 = now_seconds();
    float *logits = NULL;
    logits = forward(w, s, prompt, n_prompt, *pos);
    *pos += n_prompt;
    double t1 = now_seconds();
    int generated = 0, next = -1;
    while (generated < max_new) {
        if (generated > 0) {
            if (*pos >= s->context) { fprintf(stderr, "\n[context of %d positions is full]\n", s->context); break; }
            logits = forward(w, s, &next, 1, (*pos)++);
        }
        next = sample(sp, logits);
        generated++;
        if (stop_at_eos && next == w->cfg.eos_token_id) break;
        if (tok) { decode_token(tok, sink, next, 1); fflush(stdout); }
        else { printf("%s%d", generated > 1 ? " " : "", next); fflush(stdout); }
    }
    if (tok) sink_flush(sink);
    else printf("\n");
    double t2 = now_seconds();
    fprintf(stderr, "\nprompt: %d tokens, %.1f tok/s | generation: %d tokens, %.1f tok/s\n", n_prompt,
            n_prompt / fmax(t1 - t0, 1e-9), generated, generated > 1 ? (generated - 1) / fmax(t2 - t1, 1e-9) : 0.0);
    return next;
}

/* Multi-turn chat on stdin/stdout. The first user message may come from -i. Each turn is rendered
 * with the model's template, encoded, and appended to the same KV cache. */
static void chat(const Weights *w, RunState *s, Sampler *sp, Tokenizer *tok, const char *system, const char *first, int max_new) {
    TextSink out = {.file = stdout};
    char line[65536];
    int pos = 0, pending[2], n_pending = 0;
    for (int turn = 0;; turn++) {
        const char *user = turn == 0 && first ? first : NULL;
        if (!user) {
            fprintf(stderr, "User: ");
            if (!fgets(line, sizeof line, stdin)) break;
            line[strcspn(line, "\n")] = '\0';
            user = line;
        }
        char *text = render_chat_turn(tok, system, user, turn == 0);
        IdList ids = {0};
        for (int i = 0; i < n_pending; i++) ids_push(&ids, pending[i]);
        tokenizer_encode(tok, text, strlen(text), 0, &ids);
        printf("Assistant:");
        int last = generate(w, s, sp, tok, &out, ids.ids, ids.n, &pos, max_new, 1);
        printf("\n");
        n_pending = 0;  /* the reply ends with EOS in the cache, as the template has it */
        if (last != w->cfg.eos_token_id && last >= 0) pending[n_pending++] = last;
        pending[n_pending++] = w->cfg.eos_token_id;
        free(ids.ids);
        free(text);
    }
}

/* -m logits: every position's logits, float32 little-endian, [T][vocab], from the decode path. */
static void write_logits(const Weights *w, RunState *s, const int *ids, int n, const char *out_path) {
    FILE *out = fopen(out_path, "wb");
    if (!out) die("cannot open %s for writing: %s", out_path, strerror(errno));
    for (int pos = 0; pos < n; pos++) {
        float *logits = forward(w, s, &ids[pos], 1, pos);
        if (fwrite(logits, sizeof(float), w->cfg.vocab_size, out) != (size_t)w->cfg.vocab_size) die("cannot write %s", out_path);
    }
    if (fclose(out) != 0) die("cannot write %s", out_path);
}

/* ------------------------------------------------------------------------- */
/* Training (tiny f32 models): forward with saved activations, backward for   */
/* every operation, the expert-level balance loss (paper eq. 23-25, as the    */
/* official MoEGate computes it in training mode) and AdamW. Parameters,      */
/* gradients and Adam moments all use the checkpoint's own f32 layout, so a    */
/* training state is a checkpoint: saving is one write.                       */
/* ------------------------------------------------------------------------- */

typedef struct {
    Config cfg;
    char *buf;              /* [0, HEADER_SIZE) header, then every tensor as in the file */
    size_t size;
    Weights w;              /* Mats and norm pointers into buf */
    size_t *tensor_start, *tensor_bytes;
    int n_tensors;
} Params;

static void params_init(Params *p, const Config *c) {
    memset(p, 0, sizeof *p);
    p->cfg = *c;
    p->cfg.dtype = DTYPE_F32;
    p->cfg.q8_group = 0;
    p->w.cfg = p->cfg;
    alloc_layers(&p->w);
    Cursor measure = {NULL, HEADER_SIZE, DTYPE_F32, 0, NULL, NULL, 0};
    p->size = layout_weights(&p->w, &measure);
    p->n_tensors = measure.n_tensors;
    p->tensor_start = xcalloc(p->n_tensors, sizeof(size_t));
    p->tensor_bytes = xcalloc(p->n_tensors, sizeof(size_t));
    p->buf = xcalloc(p->size, 1);
    Cursor fill = {p->buf, HEADER_SIZE, DTYPE_F32, 0, p->tensor_start, p->tensor_bytes, 0};
    layout_weights(&p->w, &fill);
}

static void params_free(Params *p) {
    Weights *w = &p->w;
    w->map = NULL;
    free_weights(w);
    free(p->buf); free(p->tensor_start); free(p->tensor_bytes);
}

static float *params_data(const Params *p) { return (float *)(p->buf + HEADER_SIZE); }
static size_t params_count(const Params *p) { return (p->size - HEADER_SIZE) / sizeof(float); }
static float *mut(const void *p) { return (float *)(uintptr_t)p; }  /* the Weights view is const; training writes */

/* An f32 checkpoint's tensors into p (initialised from its config). */
static void params_load(Params *p, const char *path) {
    Weights w;
    memset(&w, 0, sizeof w);
    load_weights(&w, path, WEIGHTS_MMAP);
    if (w.cfg.dtype != DTYPE_F32) die("%s: training needs an f32 checkpoint (export with --dtype f32)", path);
    params_init(p, &w.cfg);
    memcpy(p->buf + HEADER_SIZE, (const char *)w.map + HEADER_SIZE, p->size - HEADER_SIZE);
    free_weights(&w);
}

/* Writes p as a checkpoint (with the tokenizer blob, if any): the same format ./dsv2 runs. */
static void params_save(const Params *p, const char *path, const void *tokenizer, size_t tokenizer_size) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) die("cannot write %s: %s", tmp, strerror(errno));
    Config c = p->cfg;
    size_t tok_offset = (p->size + TENSOR_ALIGN - 1) / TENSOR_ALIGN * TENSOR_ALIGN;
    c.tokenizer_offset = tokenizer_size ? tok_offset : 0;
    c.tokenizer_size = tokenizer_size;
    c.file_size = tokenizer_size ? tok_offset + tokenizer_size : p->size;
    static const char zeros[TENSOR_ALIGN] = {0};
    int ok = fwrite(&c, sizeof c, 1, f) == 1 && fwrite(p->buf + HEADER_SIZE, 1, p->size - HEADER_SIZE, f) == p->size - HEADER_SIZE;
    if (tokenizer_size)
        ok = ok && fwrite(zeros, 1, tok_offset - p->size, f) == tok_offset - p->size && fwrite(tokenizer, 1, tokenizer_size, f) == tokenizer_size;
    if (fclose(f) != 0 || !ok) die("cannot write %s", tmp);
    if (rename(tmp, path) != 0) die("cannot rename %s to %s: %s", tmp, path, strerror(errno));
}

/* Forward-pass values kept for the backward pass, per layer. N = batch * seq tokens. */
typedef struct {
    float *x_in, *xn1, *rstd1;        /* layer input, its norm [N][D], 1/rms [N] */
    float *q_a, *q_an, *rstd_q;       /* q LoRA: down-projection, normed */
    float *q;                         /* [N][H*dq], rope applied */
    float *c, *rstd_c;                /* normed latent [N][r] */
    float *k_pe;                      /* rotated shared rope key [N][dr] */
    float *kv;                        /* [N][H*(dn+dv)] */
    float *probs;                     /* attention probabilities [B][H][T][T] */
    float *attn;                      /* [N][H*dv] */
    float *x_mid, *xn2, *rstd2;       /* after attention, its norm */
    float *g, *u;                     /* dense MLP or shared experts: gate and up [N][width] */
    float *scores;                    /* router softmax [N][E] */
    int *idx;                         /* [N][K] chosen experts */
    float *wt;                        /* [N][K] their weights */
    float *eg, *eu, *eo;              /* per (token, k): expert gate, up [N*K][Im], output [N*K][D] */
} LayerActs;

typedef struct {
    int B, T, N;
    LayerActs *layers;
    float *x_final, *xf, *rstd_f;     /* last residual, final norm */
    float *logits;                    /* [N][V], softmax probabilities after the loss */
    float *aux;                       /* [L] balance loss per layer (0 for dense layers) */
    double ce;                        /* mean cross-entropy */
    /* scratch */
    float *t1, *t2, *t3, *t4;
    int *list;
} TrainState;

static void train_state_init(TrainState *ts, const Config *c, int B, int T) {
    int N = B * T, D = c->hidden_size, H = c->num_attention_heads, E = c->n_routed_experts, K = c->num_experts_per_tok;
    int dq = c->qk_nope_head_dim + c->qk_rope_head_dim, r = c->kv_lora_rank, Im = c->moe_intermediate_size;
    int width = max_int(c->intermediate_size, Im * c->n_shared_experts);
    int widest = max_int(max_int(max_int(D, width), max_int(H * dq, H * (c->qk_nope_head_dim + c->v_head_dim))), max_int(r + c->qk_rope_head_dim, c->vocab_size));
    memset(ts, 0, sizeof *ts);
    ts->B = B; ts->T = T; ts->N = N;
    ts->layers = xcalloc(c->num_hidden_layers, sizeof(LayerActs));
    for (int l = 0; l < c->num_hidden_layers; l++) {
        LayerActs *a = &ts->layers[l];
        a->x_in = xcalloc((size_t)N * D, 4); a->xn1 = xcalloc((size_t)N * D, 4); a->rstd1 = xcalloc(N, 4);
        a->q_a = xcalloc((size_t)N * c->q_lora_rank, 4); a->q_an = xcalloc((size_t)N * c->q_lora_rank, 4); a->rstd_q = xcalloc(N, 4);
        a->q = xcalloc((size_t)N * H * dq, 4);
        a->c = xcalloc((size_t)N * r, 4); a->rstd_c = xcalloc(N, 4); a->k_pe = xcalloc((size_t)N * c->qk_rope_head_dim, 4);
        a->kv = xcalloc((size_t)N * H * (c->qk_nope_head_dim + c->v_head_dim), 4);
        a->probs = xcalloc((size_t)B * H * T * T, 4);
        a->attn = xcalloc((size_t)N * H * c->v_head_dim, 4);
        a->x_mid = xcalloc((size_t)N * D, 4); a->xn2 = xcalloc((size_t)N * D, 4); a->rstd2 = xcalloc(N, 4);
        a->g = xcalloc((size_t)N * width, 4); a->u = xcalloc((size_t)N * width, 4);
        a->scores = xcalloc((size_t)N * E, 4); a->idx = xcalloc((size_t)N * K, sizeof(int)); a->wt = xcalloc((size_t)N * K, 4);
        a->eg = xcalloc((size_t)N * K * Im, 4); a->eu = xcalloc((size_t)N * K * Im, 4); a->eo = xcalloc((size_t)N * K * D, 4);
    }
    ts->x_final = xcalloc((size_t)N * D, 4); ts->xf = xcalloc((size_t)N * D, 4); ts->rstd_f = xcalloc(N, 4);
    ts->logits = xcalloc((size_t)N * c->vocab_size, 4);
    ts->aux = xcalloc(c->num_hidden_layers, 4);
    size_t scratch = (size_t)N * (widest + 4 * (size_t)max_int(K, 1) * (D + Im));
    ts->t1 = xcalloc(scratch, 4); ts->t2 = xcalloc(scratch, 4); ts->t3 = xcalloc(scratch, 4); ts->t4 = xcalloc(scratch, 4);
    ts->list = xcalloc((size_t)N * K, sizeof(int));
}

static void train_state_free(TrainState *ts, const Config *c) {
    for (int l = 0; l < c->num_hidden_layers; l++) {
        LayerActs *a = &ts->layers[l];
        void *bufs[] = {a->x_in, a->xn1, a->rstd1, a->q_a, a->q_an, a->rstd_q, a->q, a->c, a->rstd_c, a->k_pe, a->kv,
                        a->probs, a->attn, a->x_mid, a->xn2, a->rstd2, a->g, a->u, a->scores, a->idx, a->wt, a->eg, a->eu, a->eo};
        for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    }
    void *bufs[] = {ts->layers, ts->x_final, ts->xf, ts->rstd_f, ts->logits, ts->aux, ts->t1, ts->t2, ts->t3, ts->t4, ts->list};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
}

/* RMSNorm over n rows that also keeps 1/rms for the backward pass. */
static void rmsnorm_rows(float *out, float *rstd, const float *x, const float *w, int n, int dim, double eps) {
    for (int t = 0; t < n; t++) {
        double ss = 0;
        for (int i = 0; i < dim; i++) ss += (double)x[(size_t)t * dim + i] * x[(size_t)t * dim + i];
        rstd[t] = (float)(1.0 / sqrt(ss / dim + eps));
        rmsnorm(out + (size_t)t * dim, x + (size_t)t * dim, w, dim, eps);
    }
}

/* d/dx and d/dw of y = w * x * rstd: dx += rstd * (w dy) - x rstd^3 mean(w dy * x). */
static void rmsnorm_backward(float *dx, float *dw, const float *x, const float *w, const float *rstd, const float *dy, int n, int dim) {
    for (int t = 0; t < n; t++) {
        const float *xt = x + (size_t)t * dim, *dyt = dy + (size_t)t * dim;
        double dot = 0;
        for (int i = 0; i < dim; i++) { dot += (double)w[i] * dyt[i] * xt[i]; dw[i] += dyt[i] * xt[i] * rstd[t]; }
        float r = rstd[t], k = (float)(dot / dim) * r * r * r;
        for (int i = 0; i < dim; i++) dx[(size_t)t * dim + i] += r * w[i] * dyt[i] - k * xt[i];
    }
}

/* y = W x over n rows: dW += dy^T x, and dx += dy W (dx may be NULL). */
static void linear_backward(const Mat *W, const Mat *dW, const float *x, const float *dy, float *dx, int n) {
    int rows = W->rows, cols = W->cols;
    float *gw = mut(dW->data);
    const float *w = W->data;
#pragma omp parallel for schedule(static)
    for (int o = 0; o < rows; o++)
        for (int t = 0; t < n; t++) {
            float d = dy[(size_t)t * rows + o];
            if (d == 0.0f) continue;
            for (int i = 0; i < cols; i++) gw[(size_t)o * cols + i] += d * x[(size_t)t * cols + i];
        }
    if (!dx) return;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < n; t++)
        for (int o = 0; o < rows; o++) {
            float d = dy[(size_t)t * rows + o];
            if (d == 0.0f) continue;
            for (int i = 0; i < cols; i++) dx[(size_t)t * cols + i] += d * w[(size_t)o * cols + i];
        }
}

/* The transpose of the rotation: rotate back by the same angle. */
static void rope_rotate_backward(float *d, const float *cos_row, const float *sin_row, int dim) {
    for (int i = 0; i < dim / 2; i++) {
        float a = d[2 * i], b = d[2 * i + 1];
        d[2 * i] = a * cos_row[i] + b * sin_row[i];
        d[2 * i + 1] = -a * sin_row[i] + b * cos_row[i];
    }
}

static float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

/* SwiGLU forward over n rows keeping gate and up (g, u), into out. */
static void swiglu_train(float *out, float *g, float *u, float *h, const float *x, int n, const Mat *gate, const Mat *up, const Mat *down) {
    matmul(g, gate, x, n, NULL);
    matmul(u, up, x, n, NULL);
    for (size_t i = 0; i < (size_t)n * gate->rows; i++) h[i] = silu(g[i]) * u[i];
    matmul(out, down, h, n, NULL);
}

/* Backward of swiglu_train: dx += ..., weight grads accumulate. h, dh: scratch [n][width]. */
static void swiglu_backward(const float *dy, const float *x, const float *g, const float *u, int n, const Mat *gate, const Mat *up,
                            const Mat *down, const Mat *dgate, const Mat *dup, const Mat *ddown, float *dx, float *h, float *dh) {
    size_t m = (size_t)n * gate->rows;
    for (size_t i = 0; i < m; i++) h[i] = silu(g[i]) * u[i];
    memset(dh, 0, m * sizeof(float));
    linear_backward(down, ddown, h, dy, dh, n);
    for (size_t i = 0; i < m; i++) {  /* dh -> dg (in h), du (in dh) */
        float sg = sigmoidf(g[i]), dsilu = sg * (1.0f + g[i] * (1.0f - sg));
        float dhi = dh[i];
        h[i] = dhi * u[i] * dsilu;
        dh[i] = dhi * silu(g[i]);
    }
    linear_backward(gate, dgate, x, h, dx, n);
    linear_backward(up, dup, x, dh, dx, n);
}

/* One training forward over B sequences of T tokens: saves activations; returns mean CE +
 * sum of the balance losses. The logits become softmax probabilities. */
static double train_forward(const Params *p, TrainState *ts, RunState *rs, const int *inputs, const int *targets) {
    const Config *c = &p->cfg;
    const Weights *w = &p->w;
    int B = ts->B, T = ts->T, N = ts->N, D = c->hidden_size, H = c->num_attention_heads, V = c->vocab_size;
    int dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim, dv = c->v_head_dim, dq = dn + dr, r = c->kv_lora_rank;
    int E = c->n_routed_experts, K = c->num_experts_per_tok, half = dr / 2, kvw = dn + dv;
    float *x = ts->x_final;
    for (int t = 0; t < N; t++) mat_row_to_f32(x + (size_t)t * D, &w->embed, inputs[t]);
    for (int l = 0; l < c->num_hidden_layers; l++) {
        const Layer *L = &w->layers[l];
        LayerActs *a = &ts->layers[l];
        memcpy(a->x_in, x, (size_t)N * D * 4);
        rmsnorm_rows(a->xn1, a->rstd1, x, L->input_norm, N, D, c->rms_norm_eps);
        if (c->q_lora_rank > 0) {
            matmul(a->q_a, &L->q_a_proj, a->xn1, N, NULL);
            rmsnorm_rows(a->q_an, a->rstd_q, a->q_a, L->q_a_norm, N, c->q_lora_rank, 1e-6);
            matmul(a->q, &L->q_b_proj, a->q_an, N, NULL);
        } else matmul(a->q, &L->q_proj, a->xn1, N, NULL);
        float *kv_a = ts->t1;
        matmul(kv_a, &L->kv_a_proj, a->xn1, N, NULL);
        for (int t = 0; t < N; t++) {
            int pos = t % T;
            for (int i = 0; i < r; i++) ts->t2[(size_t)t * r + i] = kv_a[(size_t)t * (r + dr) + i];
            memcpy(a->k_pe + (size_t)t * dr, kv_a + (size_t)t * (r + dr) + r, dr * 4);
            rope_rotate(a->k_pe + (size_t)t * dr, rs->rope_cos + (size_t)pos * half, rs->rope_sin + (size_t)pos * half, dr);
            for (int h = 0; h < H; h++)
                rope_rotate(a->q + ((size_t)t * H + h) * dq + dn, rs->rope_cos + (size_t)pos * half, rs->rope_sin + (size_t)pos * half, dr);
        }
        rmsnorm_rows(a->c, a->rstd_c, ts->t2, L->kv_a_norm, N, r, 1e-6);
        matmul(a->kv, &L->kv_b_proj, a->c, N, NULL);
        /* causal attention per sequence and head (eq. 16-18), decompressed K and V */
#pragma omp parallel for collapse(2) schedule(static)
        for (int b = 0; b < B; b++)
            for (int h = 0; h < H; h++) {
                float *P = a->probs + (((size_t)b * H + h) * T) * T;
                for (int i = 0; i < T; i++) {
                    const float *qi = a->q + ((size_t)(b * T + i) * H + h) * dq;
                    for (int j = 0; j <= i; j++) {
                        const float *kj = a->kv + ((size_t)(b * T + j) * H + h) * kvw;
                        P[i * T + j] = (float)rs->softmax_scale * (dot_f32(qi, kj, dn) + dot_f32(qi + dn, a->k_pe + (size_t)(b * T + j) * dr, dr));
                    }
                    softmax(P + (size_t)i * T, i + 1);
                    for (int j = i + 1; j < T; j++) P[i * T + j] = 0.0f;
                    float *o = a->attn + ((size_t)(b * T + i) * H + h) * dv;
                    memset(o, 0, dv * 4);
                    for (int j = 0; j <= i; j++) {
                        const float *vj = a->kv + ((size_t)(b * T + j) * H + h) * kvw + dn;
                        for (int d = 0; d < dv; d++) o[d] += P[i * T + j] * vj[d];
                    }
                }
            }
        matmul(ts->t1, &L->o_proj, a->attn, N, NULL);
        for (size_t i = 0; i < (size_t)N * D; i++) x[i] += ts->t1[i];
        memcpy(a->x_mid, x, (size_t)N * D * 4);
        rmsnorm_rows(a->xn2, a->rstd2, x, L->post_attention_norm, N, D, c->rms_norm_eps);
        ts->aux[l] = 0.0f;
        if (L->has_mlp) swiglu_train(ts->t1, a->g, a->u, ts->t2, a->xn2, N, &L->mlp_gate, &L->mlp_up, &L->mlp_down);
        else memset(ts->t1, 0, (size_t)N * D * 4);
        if (L->is_moe) {
            int Im = c->moe_intermediate_size;
            matmul(a->scores, &L->router, a->xn2, N, NULL);
            for (int t = 0; t < N; t++) {
                softmax(a->scores + (size_t)t * E, E);
                route_tokens(c, a->scores + (size_t)t * E, a->idx + (size_t)t * K, a->wt + (size_t)t * K, &rs->router);
            }
            for (int e = 0; e < E; e++) {  /* each expert on its tokens: slot t*K+k holds its values */
                int m = 0;
                for (int s = 0; s < N * K; s++) if (a->idx[s] == e) ts->list[m++] = s;
                if (!m) continue;
                for (int j = 0; j < m; j++) memcpy(ts->t3 + (size_t)j * D, a->xn2 + (size_t)(ts->list[j] / K) * D, D * 4);
                swiglu_train(ts->t4, ts->t2, ts->t2 + (size_t)m * Im, ts->t2 + (size_t)2 * m * Im, ts->t3, m,
                             &L->expert_gate[e], &L->expert_up[e], &L->expert_down[e]);
                for (int j = 0; j < m; j++) {
                    int slot = ts->list[j];
                    memcpy(a->eg + (size_t)slot * Im, ts->t2 + (size_t)j * Im, Im * 4);
                    memcpy(a->eu + (size_t)slot * Im, ts->t2 + (size_t)(m + j) * Im, Im * 4);
                    memcpy(a->eo + (size_t)slot * D, ts->t4 + (size_t)j * D, D * 4);
                }
            }
            for (int s = 0; s < N * K; s++)
                for (int i = 0; i < D; i++) ts->t1[(size_t)(s / K) * D + i] += a->wt[s] * a->eo[(size_t)s * D + i];
            /* expert-level balance loss: alpha * sum_e f_e P_e; counts are constants */
            double aux = 0;
            int groups = c->seq_aux ? B : 1, per = N / groups;
            for (int b = 0; b < groups; b++)
                for (int e = 0; e < E; e++) {
                    int count = 0;
                    double mean = 0;
                    for (int t = b * per; t < (b + 1) * per; t++) {
                        mean += a->scores[(size_t)t * E + e];
                        for (int k = 0; k < K; k++) count += a->idx[t * K + k] == e;
                    }
                    aux += (count / ((double)per * K / E)) * (mean / per);
                }
            ts->aux[l] = (float)(c->aux_loss_alpha * aux / groups);
        }
        for (size_t i = 0; i < (size_t)N * D; i++) x[i] += ts->t1[i];
    }
    rmsnorm_rows(ts->xf, ts->rstd_f, x, w->final_norm, N, D, c->rms_norm_eps);
    matmul(ts->logits, &w->lm_head, ts->xf, N, NULL);
    double ce = 0;
    for (int t = 0; t < N; t++) {
        float *lg = ts->logits + (size_t)t * V;
        softmax(lg, V);
        ce -= log(fmax(lg[targets[t]], 1e-30));
    }
    ts->ce = ce / N;
    double total = ts->ce;
    for (int l = 0; l < c->num_hidden_layers; l++) total += ts->aux[l];
    return total;
}

/* Gradients of the total loss (mean CE + sum of balance losses) into grads (accumulated). */
static void train_backward(const Params *p, const Params *grads, TrainState *ts, RunState *rs, const int *inputs, const int *targets) {
    const Config *c = &p->cfg;
    const Weights *w = &p->w, *gw = &grads->w;
    int B = ts->B, T = ts->T, N = ts->N, D = c->hidden_size, H = c->num_attention_heads, V = c->vocab_size;
    int dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim, dv = c->v_head_dim, dq = dn + dr, r = c->kv_lora_rank;
    int E = c->n_routed_experts, K = c->num_experts_per_tok, half = dr / 2, kvw = dn + dv;
    size_t ND = (size_t)N * D;
    float *dlogits = ts->logits;  /* softmax probabilities -> (p - onehot) / N, in place */
    for (int t = 0; t < N; t++) {
        for (int v = 0; v < V; v++) dlogits[(size_t)t * V + v] /= N;
        dlogits[(size_t)t * V + targets[t]] -= 1.0f / N;
    }
    float *dx = xcalloc(ND, 4), *dxf = xcalloc(ND, 4);
    linear_backward(&w->lm_head, &gw->lm_head, ts->xf, dlogits, dxf, N);
    rmsnorm_backward(dx, mut(gw->final_norm), ts->x_final, w->final_norm, ts->rstd_f, dxf, N, D);
    float *dxn = xcalloc(ND, 4);
    int Im = c->moe_intermediate_size;
    for (int l = c->num_hidden_layers - 1; l >= 0; l--) {
        const Layer *L = &w->layers[l], *G = &gw->layers[l];
        LayerActs *a = &ts->layers[l];
        /* MLP / MoE branch: h_out = x_mid + f(norm(x_mid)) */
        memset(dxn, 0, ND * 4);
        if (L->has_mlp)
            swiglu_backward(dx, a->xn2, a->g, a->u, N, &L->mlp_gate, &L->mlp_up, &L->mlp_down, &G->mlp_gate, &G->mlp_up, &G->mlp_down,
                            dxn, ts->t1, ts->t2);
        if (L->is_moe) {
            float *dwt = ts->t3, *dscore = ts->t4;  /* [N*K], [N*E] */
            for (int s = 0; s < N * K; s++) dwt[s] = dot_f32(dx + (size_t)(s / K) * D, a->eo + (size_t)s * D, D);
            for (int e = 0; e < E; e++) {
                int m = 0;
                for (int s = 0; s < N * K; s++) if (a->idx[s] == e) ts->list[m++] = s;
                if (!m) continue;
                float *xin = ts->t1, *dy = ts->t1 + (size_t)m * D, *g = dy + (size_t)m * D, *u = g + (size_t)m * Im;
                float *h = u + (size_t)m * Im, *dh = h + (size_t)m * Im, *dxe = dh + (size_t)m * Im;
                for (int j = 0; j < m; j++) {
                    int s = ts->list[j];
                    memcpy(xin + (size_t)j * D, a->xn2 + (size_t)(s / K) * D, D * 4);
                    for (int i = 0; i < D; i++) dy[(size_t)j * D + i] = a->wt[s] * dx[(size_t)(s / K) * D + i];
                    memcpy(g + (size_t)j * Im, a->eg + (size_t)s * Im, Im * 4);
                    memcpy(u + (size_t)j * Im, a->eu + (size_t)s * Im, Im * 4);
                }
                memset(dxe, 0, (size_t)m * D * 4);
                swiglu_backward(dy, xin, g, u, m, &L->expert_gate[e], &L->expert_up[e], &L->expert_down[e], &G->expert_gate[e],
                                &G->expert_up[e], &G->expert_down[e], dxe, h, dh);
                for (int j = 0; j < m; j++)
                    for (int i = 0; i < D; i++) dxn[(size_t)(ts->list[j] / K) * D + i] += dxe[(size_t)j * D + i];
            }
            memset(dscore, 0, (size_t)N * E * 4);
            for (int t = 0; t < N; t++) {  /* routing weights -> scores */
                const float *sc = a->scores + (size_t)t * E;
                if (K > 1 && c->norm_topk_prob) {
                    double z = 1e-20, wdw = 0;
                    for (int k = 0; k < K; k++) { z += sc[a->idx[t * K + k]]; wdw += dwt[t * K + k] * a->wt[t * K + k]; }
                    for (int k = 0; k < K; k++) dscore[(size_t)t * E + a->idx[t * K + k]] += (float)((dwt[t * K + k] - wdw) / z);
                } else
                    for (int k = 0; k < K; k++) dscore[(size_t)t * E + a->idx[t * K + k]] += (float)(dwt[t * K + k] * c->routed_scaling_factor);
            }
            int groups = c->seq_aux ? B : 1, per = N / groups;  /* d aux / d score: alpha f_e / (groups * per) */
            for (int b = 0; b < groups; b++)
                for (int e = 0; e < E; e++) {
                    int count = 0;
                    for (int t = b * per; t < (b + 1) * per; t++)
                        for (int k = 0; k < K; k++) count += a->idx[t * K + k] == e;
                    float dd = (float)(c->aux_loss_alpha * (count / ((double)per * K / E)) / ((double)per * groups));
                    for (int t = b * per; t < (b + 1) * per; t++) dscore[(size_t)t * E + e] += dd;
                }
            for (int t = 0; t < N; t++) {  /* softmax backward: s * (ds - sum ds s) */
                float *ds = dscore + (size_t)t * E;
                const float *sc = a->scores + (size_t)t * E;
                double sum = 0;
                for (int e = 0; e < E; e++) sum += ds[e] * sc[e];
                for (int e = 0; e < E; e++) ds[e] = sc[e] * (ds[e] - (float)sum);
            }
            linear_backward(&L->router, &G->router, a->xn2, dscore, dxn, N);
        }
        rmsnorm_backward(dx, mut(G->post_attention_norm), a->x_mid, L->post_attention_norm, a->rstd2, dxn, N, D);
        /* attention branch: x_mid = x_in + o_proj(attn(norm(x_in))) */
        float *dattn = ts->t1, *dquery = ts->t2, *dkv = ts->t3, *dkpe = ts->t4;
        memset(dattn, 0, (size_t)N * H * dv * 4);
        linear_backward(&L->o_proj, &G->o_proj, a->attn, dx, dattn, N);
        memset(dquery, 0, (size_t)N * H * dq * 4);
        memset(dkv, 0, (size_t)N * H * kvw * 4);
        memset(dkpe, 0, (size_t)N * dr * 4);
#pragma omp parallel for collapse(2) schedule(static)
        for (int b = 0; b < B; b++)
            for (int h = 0; h < H; h++) {
                const float *P = a->probs + (((size_t)b * H + h) * T) * T;
                float *dp = xcalloc(T, 4);
                for (int i = 0; i < T; i++) {
                    const float *doi = dattn + ((size_t)(b * T + i) * H + h) * dv;
                    double sum = 0;
                    for (int j = 0; j <= i; j++) {
                        const float *vj = a->kv + ((size_t)(b * T + j) * H + h) * kvw + dn;
                        float *dvj = dkv + ((size_t)(b * T + j) * H + h) * kvw + dn;
                        dp[j] = dot_f32(doi, vj, dv);
                        for (int d = 0; d < dv; d++) dvj[d] += P[i * T + j] * doi[d];
                        sum += dp[j] * P[i * T + j];
                    }
                    const float *qi = a->q + ((size_t)(b * T + i) * H + h) * dq;
                    float *dqi = dquery + ((size_t)(b * T + i) * H + h) * dq;
                    for (int j = 0; j <= i; j++) {
                        float ds = P[i * T + j] * (dp[j] - (float)sum) * (float)rs->softmax_scale;
                        const float *kj = a->kv + ((size_t)(b * T + j) * H + h) * kvw, *kpe = a->k_pe + (size_t)(b * T + j) * dr;
                        float *dkj = dkv + ((size_t)(b * T + j) * H + h) * kvw, *dkpej = dkpe + (size_t)(b * T + j) * dr;
                        for (int d = 0; d < dn; d++) { dqi[d] += ds * kj[d]; dkj[d] += ds * qi[d]; }
                        for (int d = 0; d < dr; d++) {
                            dqi[dn + d] += ds * kpe[d];
#pragma omp atomic
                            dkpej[d] += ds * qi[dn + d];
                        }
                    }
                }
                free(dp);
            }
        memset(dxn, 0, ND * 4);
        float *dc = xcalloc((size_t)N * r, 4), *dkv_a = xcalloc((size_t)N * (r + dr), 4), *craw = xcalloc((size_t)N * r, 4);
        linear_backward(&L->kv_b_proj, &G->kv_b_proj, a->c, dkv, dc, N);
        for (int t = 0; t < N; t++) {
            int pos = t % T;
            for (int h = 0; h < H; h++)
                rope_rotate_backward(dquery + ((size_t)t * H + h) * dq + dn, rs->rope_cos + (size_t)pos * half, rs->rope_sin + (size_t)pos * half, dr);
            rope_rotate_backward(dkpe + (size_t)t * dr, rs->rope_cos + (size_t)pos * half, rs->rope_sin + (size_t)pos * half, dr);
            memcpy(dkv_a + (size_t)t * (r + dr) + r, dkpe + (size_t)t * dr, dr * 4);
        }
        /* the raw latent before kv_a_layernorm: recompute it (x_norm * kv_a_proj rows 0..r-1) */
        float *kv_a = xcalloc((size_t)N * (r + dr), 4), *dcraw = xcalloc((size_t)N * r, 4);
        matmul(kv_a, &L->kv_a_proj, a->xn1, N, NULL);
        for (int t = 0; t < N; t++) memcpy(craw + (size_t)t * r, kv_a + (size_t)t * (r + dr), r * 4);
        rmsnorm_backward(dcraw, mut(G->kv_a_norm), craw, L->kv_a_norm, a->rstd_c, dc, N, r);
        for (int t = 0; t < N; t++) memcpy(dkv_a + (size_t)t * (r + dr), dcraw + (size_t)t * r, r * 4);
        linear_backward(&L->kv_a_proj, &G->kv_a_proj, a->xn1, dkv_a, dxn, N);
        if (c->q_lora_rank > 0) {
            float *dqan = xcalloc((size_t)N * c->q_lora_rank, 4), *dqa = xcalloc((size_t)N * c->q_lora_rank, 4);
            linear_backward(&L->q_b_proj, &G->q_b_proj, a->q_an, dquery, dqan, N);
            rmsnorm_backward(dqa, mut(G->q_a_norm), a->q_a, L->q_a_norm, a->rstd_q, dqan, N, c->q_lora_rank);
            linear_backward(&L->q_a_proj, &G->q_a_proj, a->xn1, dqa, dxn, N);
            free(dqan); free(dqa);
        } else linear_backward(&L->q_proj, &G->q_proj, a->xn1, dquery, dxn, N);
        rmsnorm_backward(dx, mut(G->input_norm), a->x_in, L->input_norm, a->rstd1, dxn, N, D);
        free(dc); free(dkv_a); free(craw); free(kv_a); free(dcraw);
    }
    for (int t = 0; t < N; t++) {  /* embedding rows */
        float *row = mut(gw->embed.data) + (size_t)inputs[t] * D;
        for (int i = 0; i < D; i++) row[i] += dx[(size_t)t * D + i];
    }
    free(dx); free(dxf); free(dxn);
}

/* AdamW as torch.optim.AdamW, on every parameter (zero gradients still decay). step counts from 1. */
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

typedef struct {
    int steps, batch, seq_len, eval_every, seed;
    float lr;
    const char *corpus, *out;
} TrainOptions;

/* Random windows of seq_len + 1 tokens: inputs and the targets shifted by one. */
static void sample_batch(const int *tokens, int n_tokens, int B, int T, int *inputs, int *targets, uint64_t *rng) {
    for (int b = 0; b < B; b++) {
        int start = (int)(random_u32(rng) % (uint32_t)(n_tokens - T - 1));
        for (int t = 0; t < T; t++) { inputs[b * T + t] = tokens[start + t]; targets[b * T + t] = tokens[start + t + 1]; }
    }
}

/* Mean CE over fixed windows of the held-out text (the same windows every time). */
static double validation_loss(const Params *p, TrainState *ts, RunState *rs, const int *tokens, int n_tokens, int *inputs, int *targets) {
    int B = ts->B, T = ts->T, windows = 0;
    double sum = 0;
    for (int start = 0; start + B * (T + 1) <= n_tokens && windows < 8; start += B * (T + 1), windows++) {
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

/* The loss curve as a small SVG: train loss (line) and validation loss (dots). */
static void write_loss_svg(const char *path, const float *train, const float *val, int n) {
    FILE *f = fopen(path, "w");
    if (!f) { fprintf(stderr, "dsv2: warning: cannot write %s\n", path); return; }
    float lo = 1e9f, hi = -1e9f;
    for (int i = 0; i < n; i++) {
        lo = fminf(lo, train[i]); hi = fmaxf(hi, train[i]);
        if (!isnan(val[i])) { lo = fminf(lo, val[i]); hi = fmaxf(hi, val[i]); }
    }
    if (hi <= lo) hi = lo + 1;
    const int W = 640, Hh = 400, m = 50;
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" font-size=\"12\">\n", W, Hh);
    fprintf(f, "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n<text x=\"%d\" y=\"20\">loss (nats/token): train (line), validation (dots); step 1..%d</text>\n", m, n);
    fprintf(f, "<text x=\"5\" y=\"%d\">%.2f</text><text x=\"5\" y=\"%d\">%.2f</text>\n", m, hi, Hh - m, lo);
    fprintf(f, "<polyline fill=\"none\" stroke=\"steelblue\" stroke-width=\"1.5\" points=\"");
    for (int i = 0; i < n; i++)
        fprintf(f, "%.1f,%.1f ", m + (W - 2.0 * m) * i / (n > 1 ? n - 1 : 1), m + (Hh - 2.0 * m) * (hi - train[i]) / (hi - lo));
    fprintf(f, "\"/>\n");
    for (int i = 0; i < n; i++)
        if (!isnan(val[i]))
            fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"darkorange\"/>\n", m + (W - 2.0 * m) * i / (n > 1 ? n - 1 : 1),
                    m + (Hh - 2.0 * m) * (hi - val[i]) / (hi - lo));
    fprintf(f, "</svg>\n");
    fclose(f);
}

/* Adam's moments and step beside a checkpoint (OUT.adam), so training can resume from it. */
static int adam_state_io(const char *model_path, float *m, float *v, size_t n, int *step, int save) {
    char path[4096];
    snprintf(path, sizeof path, "%s.adam", model_path);
    FILE *f = fopen(path, save ? "wb" : "rb");
    if (!f) return 0;
    uint64_t count = n;
    int32_t s = *step;
    int ok;
    if (save) ok = fwrite(&count, 8, 1, f) == 1 && fwrite(&s, 4, 1, f) == 1 && fwrite(m, 4, n, f) == n && fwrite(v, 4, n, f) == n;
    else ok = fread(&count, 8, 1, f) == 1 && count == n && fread(&s, 4, 1, f) == 1 && fread(m, 4, n, f) == n && fread(v, 4, n, f) == n;
    if (fclose(f) != 0) ok = 0;
    if (!save && ok) *step = s;
    return ok;
}

static void train(const char *init_path, const TrainOptions *o) {
    Params p, g;
    params_load(&p, init_path);
    const Config *c = &p.cfg;
    Weights view;  /* the initial file, for its tokenizer */
    memset(&view, 0, sizeof view);
    load_weights(&view, init_path, WEIGHTS_MMAP);
    Tokenizer tok;
    if (!load_tokenizer_file(&tok, init_path, &view)) die("%s has no tokenizer: training encodes text with the model's own", init_path);
    if (o->seq_len > c->max_position_embeddings) die("-c %d exceeds max_position_embeddings %d", o->seq_len, c->max_position_embeddings);
    size_t text_len = 0;
    char *text = read_file(o->corpus, &text_len);
    size_t split = text_len;  /* the last 5% of lines are held out */
    {
        size_t total = 0, seen = 0;
        for (size_t i = 0; i < text_len; i++) total += text[i] == '\n';
        for (size_t i = 0; i < text_len && total > 20; i++)
            if (text[i] == '\n' && ++seen == total - total / 20) { split = i + 1; break; }
    }
    IdList train_ids = {0}, val_ids = {0};
    tokenizer_encode(&tok, text, split, 0, &train_ids);
    tokenizer_encode(&tok, text + split, text_len - split, 0, &val_ids);
    int B = o->batch, T = o->seq_len;
    if (train_ids.n < T + 2) die("%s is too short for sequences of %d tokens", o->corpus, T);
    fprintf(stderr, "train: %d tokens, validation: %d tokens (last 5%% of lines); batch %d x %d, %d steps\n",
            train_ids.n, val_ids.n, B, T, o->steps);
    params_init(&g, c);
    TrainState ts;
    train_state_init(&ts, c, B, T);
    RunState rs;
    init_run_state(&rs, c, ATTN_ABSORB, T);
    size_t n = params_count(&p);
    float *m = xcalloc(n, 4), *v = xcalloc(n, 4);
    int done = 0;
    if (adam_state_io(init_path, m, v, n, &done, 0)) fprintf(stderr, "resuming after step %d (%s.adam)\n", done, init_path);
    AdamW opt = {o->lr, 0.9f, 0.95f, 1e-8f, 0.1f};
    int *inputs = xcalloc((size_t)B * T, sizeof(int)), *targets = xcalloc((size_t)B * T, sizeof(int));
    float *train_curve = xcalloc(o->steps, 4), *val_curve = xcalloc(o->steps, 4);
    char csv_path[4096], svg_path[4096];
    snprintf(csv_path, sizeof csv_path, "%s.csv", o->out);
    snprintf(svg_path, sizeof svg_path, "%s.svg", o->out);
    FILE *csv = fopen(csv_path, "w");
    if (!csv) die("cannot write %s", csv_path);
    fprintf(csv, "step,loss,cross_entropy,validation,lr,tokens_per_s\n");
    uint64_t rng = (uint64_t)o->seed * 0x9E3779B97F4A7C15ull + 7;
    for (int s = 0; s < o->steps; s++) {
        int step = done + s + 1, total_steps = done + o->steps, warmup = total_steps / 20 + 1;
        opt.lr = step <= warmup ? o->lr * step / warmup  /* warmup, then cosine down to 10% */
                                : o->lr * (0.1f + 0.45f * (1 + cosf(3.14159265f * (step - warmup) / fmaxf(1, total_steps - warmup))));
        double t0 = now_seconds();
        sample_batch(train_ids.ids, train_ids.n, B, T, inputs, targets, &rng);
        double loss = train_forward(&p, &ts, &rs, inputs, targets);
        memset(params_data(&g), 0, n * 4);
        train_backward(&p, &g, &ts, &rs, inputs, targets);
        adamw_step(&p, &g, m, v, &opt, step);
        double tps = B * T / (now_seconds() - t0), ce = ts.ce;
        train_curve[s] = (float)loss;
        val_curve[s] = NAN;
        int last = s == o->steps - 1;
        if ((s + 1) % o->eval_every == 0 || last) val_curve[s] = (float)validation_loss(&p, &ts, &rs, val_ids.ids, val_ids.n, inputs, targets);
        if (isnan(val_curve[s])) fprintf(csv, "%d,%.5f,%.5f,,%.3g,%.0f\n", step, loss, ce, opt.lr, tps);
        else fprintf(csv, "%d,%.5f,%.5f,%.5f,%.3g,%.0f\n", step, loss, ce, val_curve[s], opt.lr, tps);
        if (s % 10 == 0 || last || !isnan(val_curve[s])) {
            fprintf(stderr, "step %5d  loss %.4f  ce %.4f  lr %.2e  %.0f tok/s", step, loss, ce, opt.lr, tps);
            if (!isnan(val_curve[s])) fprintf(stderr, "  val %.4f", val_curve[s]);
            fprintf(stderr, "  expert load (min-max share per layer):");
            for (int l = 0; l < c->num_hidden_layers; l++) {
                if (!p.w.layers[l].is_moe) continue;
                int count[c->n_routed_experts];
                memset(count, 0, sizeof count);
                for (int k = 0; k < B * T * c->num_experts_per_tok; k++) count[ts.layers[l].idx[k]]++;
                int lo = count[0], hi = count[0];
                for (int e = 1; e < c->n_routed_experts; e++) { lo = count[e] < lo ? count[e] : lo; hi = count[e] > hi ? count[e] : hi; }
                fprintf(stderr, " %.0f-%.0f%%", 100.0 * lo / (B * T * c->num_experts_per_tok), 100.0 * hi / (B * T * c->num_experts_per_tok));
            }
            fprintf(stderr, "\n");
        }
        if (!isnan(val_curve[s]) || last) {  /* checkpoint: the normal model format, plus Adam's state */
            params_save(&p, o->out, (const char *)view.map + c->tokenizer_offset, c->tokenizer_size);
            int at = step;
            if (!adam_state_io(o->out, m, v, n, &at, 1)) fprintf(stderr, "dsv2: warning: cannot write %s.adam\n", o->out);
        }
    }
    fclose(csv);
    write_loss_svg(svg_path, train_curve, val_curve, o->steps);
    fprintf(stderr, "wrote %s, %s, %s\n", o->out, csv_path, svg_path);
    free(m); free(v); free(inputs); free(targets); free(train_curve); free(val_curve); free(text);
    free(train_ids.ids); free(val_ids.ids);
    free_run_state(&rs);
    train_state_free(&ts, c);
    free_tokenizer(&tok);
    free_weights(&view);
    params_free(&p);
    params_free(&g);
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
    return m->data ? (double)m->rows * m->cols * dtype_size(m->dtype) + (m->scale ? (double)m->rows * (m->cols / m->group) * 4 : 0) : 0;
}

/* Weight bytes one decoded token reads: attention, dense MLPs, the router, the shared experts and
 * num_experts_per_tok routed experts per MoE layer, and lm_head (one embedding row is noise).
 * This over memory bandwidth is the decode roofline. */
static double decode_bytes_per_token(const Weights *w) {
    const Config *c = &w->cfg;
    double bytes = mat_bytes(&w->lm_head);
    for (int l = 0; l < c->num_hidden_layers; l++) {
        const Layer *L = &w->layers[l];
        const Mat *m[] = {&L->q_proj, &L->q_a_proj, &L->q_b_proj, &L->kv_a_proj, &L->kv_b_proj, &L->o_proj,
                          &L->mlp_gate, &L->mlp_up, &L->mlp_down, &L->router};
        for (size_t i = 0; i < sizeof m / sizeof m[0]; i++) bytes += mat_bytes(m[i]);
        if (L->is_moe)
            bytes += c->num_experts_per_tok * (mat_bytes(&L->expert_gate[0]) + mat_bytes(&L->expert_up[0]) + mat_bytes(&L->expert_down[0]));
    }
    return bytes;
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
            "usage: ./dsv2 FILE [options]          FILE: a model (.bin) or, for encode/decode, a tokenizer (.tok)\n"
            "  -m MODE    generate (default) | chat | logits | encode | decode\n"
            "  -i TEXT    the prompt (text, or whitespace-separated ids for a model without a tokenizer)\n"
            "  -f FILE    read the prompt (or the text to encode, the ids to decode) from a file\n"
            "  -o FILE    logits: output file (float32 [T][vocab]); decode: output file (default stdout)\n"
            "  -y TEXT    chat: system prompt\n"
            "  -n N       tokens to generate (default 256)\n"
            "  -t T       temperature, 0 = greedy (default 1.0)\n"
            "  -p P       top-p (default 0.9)\n"
            "  -s SEED    random seed (default: time)\n"
            "  -a MODE    attention: absorb (default, latent cache) | naive (per-head K/V cache)\n"
            "  -c N       context length (default min(max_position_embeddings, 4096))\n"
            "  -w MODE    weights: auto (default) | mmap (read in place) | load (into huge-page memory)\n"
            "  -g LIST    (the CUDA build, ./dsv2cu; also --gpus LIST) GPUs to split the layers over: 0, 0,1 or 0,0\n"
            "training (-m train, an f32 model with a tokenizer): -f corpus.txt -o out.bin -n steps (default 256)\n"
            "  -b N       sequences per batch (default 8); -c N: tokens per sequence (default 128)\n"
            "  -r LR      peak learning rate (default 3e-3); -e N: validate and checkpoint every N steps (default 100)\n");
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

static int is_tokenizer_file(const char *path) {
    char magic[4] = {0};
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open %s: %s", path, strerror(errno));
    size_t got = fread(magic, 1, 4, f);
    fclose(f);
    return got == 4 && !memcmp(magic, TOKENIZER_MAGIC, 4);
}

int main(int argc, char **argv) {
    if (argc < 2 || argv[1][0] == '-') usage();
    const char *path = argv[1], *mode = "generate", *prompt = NULL, *prompt_file = NULL, *out_path = NULL, *system = NULL, *gpus = NULL;
    long steps = 256, context = 0;
    float temperature = 1.0f, topp = 0.9f;
    uint64_t seed = (uint64_t)time(NULL);
    int attn_mode = ATTN_ABSORB, weights_mode = WEIGHTS_AUTO, batch = 8, eval_every = 100, steps_given = 0;
    float lr = 3e-3f;
    for (int i = 2; i < argc; i += 2) {
        const char *flag = strcmp(argv[i], "--gpus") ? argv[i] : "-g";  /* the one long name, as multi-GPU tools spell it */
        if (flag[0] != '-' || strlen(flag) != 2) die("unknown argument \"%s\" (run ./dsv2 for usage)", argv[i]);
        if (i + 1 >= argc) die("option %s needs a value", argv[i]);
        const char *v = argv[i + 1];
        switch (flag[1]) {
        case 'm': mode = v; break;
        case 'i': prompt = v; break;
        case 'f': prompt_file = v; break;
        case 'o': out_path = v; break;
        case 'y': system = v; break;
        case 'g': gpus = v; break;
        case 'n': steps = parse_int_arg("-n", v, 0, 1 << 24); steps_given = 1; break;
        case 'b': batch = (int)parse_int_arg("-b", v, 1, 4096); break;
        case 'e': eval_every = (int)parse_int_arg("-e", v, 1, 1 << 24); break;
        case 'r': lr = parse_float_arg("-r", v, 0, 1); break;
        case 't': temperature = parse_float_arg("-t", v, 0, 100); break;
        case 'p': topp = parse_float_arg("-p", v, 0, 1); break;
        case 's': seed = (uint64_t)parse_int_arg("-s", v, 0, 0x7fffffffL); break;
        case 'c': context = parse_int_arg("-c", v, 1, 1 << 24); break;
        case 'w':
            if (!strcmp(v, "auto")) weights_mode = WEIGHTS_AUTO;
            else if (!strcmp(v, "mmap")) weights_mode = WEIGHTS_MMAP;
            else if (!strcmp(v, "load")) weights_mode = WEIGHTS_LOAD;
            else die("-w expects auto, mmap or load, got \"%s\"", v);
            break;
        case 'a':
            if (!strcmp(v, "absorb")) attn_mode = ATTN_ABSORB;
            else if (!strcmp(v, "naive")) attn_mode = ATTN_NAIVE;
            else die("-a expects absorb or naive, got \"%s\"", v);
            break;
        default: die("unknown option %s (run ./dsv2 for usage)", argv[i]);
        }
    }
    const char *modes[] = {"generate", "chat", "logits", "encode", "decode", "train"};
    int m = 0;
    while (m < 6 && strcmp(mode, modes[m])) m++;
    if (m == 6) die("unknown mode \"%s\" (generate | chat | logits | encode | decode | train)", mode);
    if (m == 5) {
        if (!prompt_file || !out_path) die("-m train needs -f CORPUS and -o OUT");
        if (is_tokenizer_file(path)) die("%s is a tokenizer, not a model", path);
        TrainOptions o = {steps_given ? (int)steps : 256, batch, context ? (int)context : 128, eval_every, (int)seed, lr, prompt_file, out_path};
        train(path, &o);
        return 0;
    }
    int is_chat = m == 1, is_logits = m == 2, is_encode = m == 3, is_decode = m == 4;
    if (prompt && prompt_file) die("give the prompt with -i or -f, not both");
    if (is_logits && !out_path) die("-m logits needs -o FILE");

    size_t input_len = 0;
    char *file_text = prompt_file ? read_file(prompt_file, &input_len) : NULL;
    const char *input = file_text ? file_text : prompt;
    if (prompt) input_len = strlen(prompt);

    Weights w;
    Tokenizer tok;
    memset(&w, 0, sizeof w);
    int tokenizer_only = is_tokenizer_file(path), has_tokenizer;
    if (tokenizer_only) {
        if (!is_encode && !is_decode) die("%s is a tokenizer, not a model: only -m encode and -m decode work on it", path);
        has_tokenizer = load_tokenizer_file(&tok, path, NULL);
    } else {
        load_weights(&w, path, weights_mode);
        has_tokenizer = load_tokenizer_file(&tok, path, &w);
    }
    if ((is_encode || is_decode || is_chat) && !has_tokenizer) die("%s has no tokenizer (export the model from a folder with tokenizer.json)", path);

    if (is_encode) {  /* the input's bytes exactly, no BOS */
        if (!input) die("-m encode needs the text with -f FILE or -i TEXT");
        IdList ids = {0};
        tokenizer_encode(&tok, input, input_len, 0, &ids);
        for (int i = 0; i < ids.n; i++) printf("%s%d", i ? " " : "", ids.ids[i]);
        printf("\n");
        free(ids.ids);
    } else if (is_decode) {
        if (!input) die("-m decode needs the ids with -f FILE or -i IDS");
        int n = 0, *ids = parse_ids(input, 1 << 30, &n);
        FILE *f = out_path ? fopen(out_path, "wb") : stdout;
        if (!f) die("cannot open %s for writing: %s", out_path, strerror(errno));
        TextSink sink = {.file = f};
        for (int i = 0; i < n; i++) decode_token(&tok, &sink, ids[i], 0);
        sink_flush(&sink);
        if (out_path && fclose(f) != 0) die("cannot write %s", out_path);
        free(ids);
    } else {
        const Config *c = &w.cfg;
        if (context == 0) context = c->max_position_embeddings < 4096 ? c->max_position_embeddings : 4096;
        if (context > c->max_position_embeddings) die("-c %ld exceeds max_position_embeddings %d", context, c->max_position_embeddings);
        IdList ids = {0};
        int text_prompt = has_tokenizer && !is_logits;
        if (is_chat) {
            if (c->eos_token_id < 0) die("chat needs an eos_token_id in the model config");
        } else if (text_prompt) {
            tokenizer_encode(&tok, input ? input : "", input ? input_len : 0, tok.add_bos, &ids);
        } else if (input) {
            ids.ids = parse_ids(input, c->vocab_size, &ids.n);
        } else if (c->bos_token_id >= 0) {
            ids_push(&ids, c->bos_token_id);
        }
        if (!is_chat) {
            if (ids.n < 1) die("no tokens to run: the prompt is empty");
            check_context(ids.n, (int)context);
        }
        RunState s;
        init_run_state(&s, c, attn_mode, (int)context);
#ifdef DSV2_CUDA
        gpu_model = gpu_model_create(&w, &s, gpus ? gpus : "0");
#else
        if (gpus) die("-g needs the CUDA build (make cuda, then ./dsv2cu)");
#endif
        print_kv_cache_sizes(c, (int)context, attn_mode);
        fprintf(stderr, "weights: %s, %.3f GB read per decoded token, %d threads\n",
                c->dtype == DTYPE_Q8 ? "q8" : c->dtype == DTYPE_BF16 ? "bf16" : "f32", decode_bytes_per_token(&w) / 1e9,
#ifdef _OPENMP
                omp_get_max_threads()
#else
                1
#endif
        );
        Sampler sp = {c->vocab_size, temperature, topp, seed * 0x9E3779B97F4A7C15ull + 1, xcalloc(c->vocab_size, sizeof(int))};
        if (is_logits) {
            write_logits(&w, &s, ids.ids, ids.n, out_path);
        } else if (is_chat) {
            chat(&w, &s, &sp, &tok, system, input, (int)steps);
        } else {
            int pos = 0;
            TextSink sink = {.file = stdout};
            if (text_prompt && input) { fwrite(input, 1, input_len, stdout); fflush(stdout); }
            /* With a tokenizer, generation is text and stops at EOS; without, ids in and out. */
            generate(&w, &s, &sp, text_prompt ? &tok : NULL, &sink, ids.ids, ids.n, &pos, (int)steps, text_prompt);
            if (text_prompt) printf("\n");
        }
        free(sp.order);
        free_run_state(&s);
        free(ids.ids);
#ifdef DSV2_CUDA
        cuda_destroy(gpu_model);
        gpu_model = NULL;
#endif
    }
    free(file_text);
    if (has_tokenizer) free_tokenizer(&tok);
    if (!tokenizer_only) free_weights(&w);
    return 0;
}
#endif
