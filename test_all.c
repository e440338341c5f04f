/*
 * test_all.c: the dsv2 test suite.
 *
 *   ./test_all            unit tests, then every fixture folder under tests/fixtures
 *   ./test_all DIR...     every check that applies to each fixture folder given
 *   ./test_all --units    the unit tests of the building blocks alone
 *
 * Unit tests call dsv2.c's functions directly (it is included below). End-to-end
 * checks go through what users run: the real export.py and the real ./dsv2 binary.
 * Environment: PYTHON (default python3), DSV2_BIN (default ./dsv2), DSV2_GPU_BUILD (set: DSV2_BIN
 * is the GPU build, which refuses -a naive, so the CLI checks run absorbed attention only).
 * Ends with the line "N passed, N failed"; exits non-zero if anything failed.
 */
#define DSV2_NO_MAIN
#include "dsv2.c"

#include <dirent.h>
#include <stddef.h>
#include <sys/wait.h>

static int n_passed, n_failed;

static void check(int ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf(ok ? "  ok    " : "  FAIL  ");
    vprintf(fmt, ap);
    printf("\n");
    fflush(stdout);
    va_end(ap);
    if (ok) n_passed++;
    else n_failed++;
}

static float max_abs_diff(const float *a, const float *b, size_t n) {
    float m = 0.0f;
    for (size_t i = 0; i < n; i++) {
        float d = fabsf(a[i] - b[i]);
        if (!(d <= m)) m = d;  /* NaN propagates as a failure */
    }
    return m;
}

static uint64_t test_rng = 0x1234567ull;
static float rand_normal(void) {  /* Box-Muller from the sampler's generator */
    float u1 = random_f32(&test_rng) + 1e-7f, u2 = random_f32(&test_rng);
    return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
}

/* ------------------------------------------------------------------------- */
/* Running commands                                                           */
/* ------------------------------------------------------------------------- */

static const char *python, *dsv2_bin;
static char tmp_dir[256];

/* Runs a shell command with stdout and stderr captured to files; returns the exit status,
 * or -1 if it died from a signal (a crash). */
static int run(const char *cmd, char *err_out, size_t err_size) {
    char full[8192], err_path[512];
    snprintf(err_path, sizeof err_path, "%s/stderr.txt", tmp_dir);
    snprintf(full, sizeof full, "( %s\n) </dev/null >%s/stdout.txt 2>%s", cmd, tmp_dir, err_path);
    int status = system(full);
    if (err_out) {
        err_out[0] = '\0';
        FILE *f = fopen(err_path, "r");
        if (f) {
            size_t n = fread(err_out, 1, err_size - 1, f);
            err_out[n] = '\0';
            fclose(f);
        }
    }
    if (status == -1 || !WIFEXITED(status)) return -1;
    int code = WEXITSTATUS(status);
    return code >= 128 ? -1 : code;  /* the shell reports a child's signal as 128+n */
}

static char *stdout_text(void) {
    char path[512];
    snprintf(path, sizeof path, "%s/stdout.txt", tmp_dir);
    return read_file(path, NULL);
}

static int count_lines(const char *s) {
    int n = 0;
    for (; *s; s++) n += *s == '\n';
    return n;
}

/* A command that must fail cleanly: exit status 1, exactly one line on stderr naming an error. */
static void expect_clean_error(const char *what, const char *cmd, const char *needle) {
    char err[4096];
    int code = run(cmd, err, sizeof err);
    int one_line = count_lines(err) == 1 && strstr(err, "error") != NULL;
    int names_it = needle == NULL || strstr(err, needle) != NULL;
    check(code == 1 && one_line && names_it, "bad input: %s -> exit %d, \"%.*s\"", what, code,
          (int)strcspn(err, "\n"), err);
}

/* ------------------------------------------------------------------------- */
/* Fixture files: manifest.txt says where each reference tensor lies.         */
/* ------------------------------------------------------------------------- */

typedef struct {
    char name[128], dtype[8], file[64];
    int ndim;
    long dims[4];
    long offset;
} RefTensor;

static int find_ref(const char *dir, const char *name, RefTensor *out) {
    char path[512], line[1024];
    snprintf(path, sizeof path, "%s/manifest.txt", dir);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    int found = 0;
    while (!found && fgets(line, sizeof line, f)) {
        if (line[0] == '#') continue;
        RefTensor t;
        int used = 0;
        memset(&t, 0, sizeof t);
        if (sscanf(line, "%127s %7s %d%n", t.name, t.dtype, &t.ndim, &used) != 3 || strcmp(t.name, name)) continue;
        if (t.ndim < 1 || t.ndim > 4) continue;
        char *p = line + used;
        for (int d = 0; d < t.ndim; d++) t.dims[d] = strtol(p, &p, 10);
        if (sscanf(p, "%63s %ld", t.file, &t.offset) == 2) { *out = t; found = 1; }
    }
    fclose(f);
    return found;
}

static long ref_count(const RefTensor *t) {
    long n = 1;
    for (int d = 0; d < t->ndim; d++) n *= t->dims[d];
    return n;
}

/* Loads a reference tensor (f32 or i32, 4 bytes each); NULL if the fixture lacks it. */
static void *load_ref(const char *dir, const char *name, RefTensor *t) {
    if (!find_ref(dir, name, t)) return NULL;
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, t->file);
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    long n = ref_count(t);
    void *buf = xcalloc(n, 4);
    int ok = fseek(f, t->offset, SEEK_SET) == 0 && fread(buf, 4, n, f) == (size_t)n;
    fclose(f);
    if (!ok) { free(buf); return NULL; }
    return buf;
}

static void write_ids(const char *path, const int *ids, int n) {
    FILE *f = fopen(path, "w");
    if (!f) die("cannot write %s", path);
    for (int i = 0; i < n; i++) fprintf(f, "%s%d", i ? " " : "", ids[i]);
    fprintf(f, "\n");
    fclose(f);
}

/* ------------------------------------------------------------------------- */
/* Unit tests of the building blocks                                          */
/* ------------------------------------------------------------------------- */

static void test_rmsnorm_softmax(void) {
    float x[4] = {1, -2, 3, -4}, w[4] = {1, 0.5f, 2, 1}, out[4];
    rmsnorm(out, x, w, 4, 1e-6);
    double rms = sqrt((1 + 4 + 9 + 16) / 4.0 + 1e-6);
    float want[4] = {(float)(1 / rms), (float)(-2 * 0.5 / rms), (float)(3 * 2 / rms), (float)(-4 / rms)};
    check(max_abs_diff(out, want, 4) < 1e-6f, "rmsnorm matches w*x/sqrt(mean(x^2)+eps)");
    float big[3] = {1000.0f, 1001.0f, 999.0f};
    softmax(big, 3);
    double e = exp(1.0), sum = 1 + e + 1 / e;
    check(fabsf(big[1] - (float)(e / sum)) < 1e-6f && fabsf(big[0] + big[1] + big[2] - 1) < 1e-6f,
          "softmax is exact and stable for large logits");
}

/* The real DeepSeek-V2 RoPE config: the spec derives low=10, high=23 and scale 0.1147214. */
static void test_yarn_real_config(void) {
    Config c;
    memset(&c, 0, sizeof c);
    c.qk_nope_head_dim = 128; c.qk_rope_head_dim = 64; c.rope_theta = 10000; c.rope_scaling = ROPE_YARN;
    c.rope_factor = 40; c.original_max_position_embeddings = 4096; c.beta_fast = 32; c.beta_slow = 1;
    c.mscale = 0.707; c.mscale_all_dim = 0.707;
    double inv_freq[32];
    rope_inv_freq(&c, inv_freq);
    int ok = 1;
    for (int i = 0; i < 32; i++) {
        double extra = 1.0 / pow(10000.0, 2.0 * i / 64), ramp = fmin(fmax((i - 10) / 13.0, 0), 1);
        double want = extra * (1 - ramp) + extra / 40 * ramp;
        if (fabs(inv_freq[i] - want) > 1e-12 * extra) ok = 0;
    }
    check(ok, "YaRN inv_freq for the real V2 config: keep i<=10, /40 from i>=23, linear blend between");
    check(fabs(attention_softmax_scale(&c) - 0.1147214) < 1e-6, "softmax scale with mscale^2 = %.7f (spec 0.1147214)",
          attention_softmax_scale(&c));
    c.rope_scaling = ROPE_PLAIN;
    check(fabs(attention_softmax_scale(&c) - 1 / sqrt(192.0)) < 1e-12, "softmax scale without YaRN is dq^-1/2");
}

/* Rotating q at position m and k at n leaves q.k depending on m-n only. */
static void test_rope_relative(void) {
    Config c;
    memset(&c, 0, sizeof c);
    c.qk_rope_head_dim = 8; c.rope_theta = 10000; c.rope_scaling = ROPE_PLAIN;
    float cos_t[20 * 4], sin_t[20 * 4], q[8], k[8], q1[8], k1[8], q2[8], k2[8];
    rope_tables(&c, 20, cos_t, sin_t);
    for (int i = 0; i < 8; i++) { q[i] = rand_normal(); k[i] = rand_normal(); }
    memcpy(q1, q, sizeof q); memcpy(k1, k, sizeof k); memcpy(q2, q, sizeof q); memcpy(k2, k, sizeof k);
    rope_rotate(q1, cos_t + 7 * 4, sin_t + 7 * 4, 8);
    rope_rotate(k1, cos_t + 3 * 4, sin_t + 3 * 4, 8);
    rope_rotate(q2, cos_t + 15 * 4, sin_t + 15 * 4, 8);
    rope_rotate(k2, cos_t + 11 * 4, sin_t + 11 * 4, 8);
    check(fabsf(dot_f32(q1, k1, 8) - dot_f32(q2, k2, 8)) < 1e-5f, "rope: q.k depends only on relative position");
    float x[8] = {1, 0, 0, 1, 1, 1, 2, 3}, y[8];
    memcpy(y, x, sizeof x);
    rope_rotate(y, cos_t, sin_t, 8);
    check(max_abs_diff(x, y, 8) == 0.0f, "rope: position 0 is the identity");
    /* pair (x0, x1) rotates by pos*inv_freq[0] = pos radians */
    float p[8] = {1, 0, 0, 0, 0, 0, 0, 0};
    rope_rotate(p, cos_t + 2 * 4, sin_t + 2 * 4, 8);
    check(fabsf(p[0] - cosf(2)) < 1e-6f && fabsf(p[1] - sinf(2)) < 1e-6f, "rope: interleaved pairs (x[2i], x[2i+1]) rotate");
}

static void test_routing(void) {
    Config c;
    memset(&c, 0, sizeof c);
    c.n_routed_experts = 8; c.num_experts_per_tok = 2; c.topk_method = TOPK_GREEDY; c.n_group = 1;
    c.routed_scaling_factor = 2.0;
    float masked[8], group_score[8];
    unsigned char taken[8], group_taken[8];
    RouterScratch r = {masked, group_score, taken, group_taken};
    float probs[8] = {0.05f, 0.30f, 0.05f, 0.10f, 0.25f, 0.05f, 0.15f, 0.05f};
    int idx[3];
    float wt[3];
    route_tokens(&c, probs, idx, wt, &r);
    check(idx[0] == 1 && idx[1] == 4 && fabsf(wt[0] - 0.6f) < 1e-6f && fabsf(wt[1] - 0.5f) < 1e-6f,
          "greedy top-2, ascending ids, weights x routed_scaling_factor");
    c.norm_topk_prob = 1;
    route_tokens(&c, probs, idx, wt, &r);
    check(fabsf(wt[0] - 0.30f / 0.55f) < 1e-6f && fabsf(wt[1] - 0.25f / 0.55f) < 1e-6f,
          "norm_topk_prob renormalises and skips routed_scaling_factor");
    c.num_experts_per_tok = 1;
    route_tokens(&c, probs, idx, wt, &r);
    check(idx[0] == 1 && fabsf(wt[0] - 0.6f) < 1e-6f, "norm_topk_prob with k=1 scales instead (as the official code)");
    /* Groups of 2: {0,1} max .30, {2,3} .10, {4,5} .25, {6,7} .15. Keep 2 groups -> {0,1},{4,5}.
     * Plain top-3 would take expert 6 (0.15); group-limited must take 0 or 5 (0.05) instead. */
    c.norm_topk_prob = 0; c.num_experts_per_tok = 3; c.topk_method = TOPK_GROUP_LIMITED_GREEDY;
    c.n_group = 4; c.topk_group = 2; c.routed_scaling_factor = 1.0;
    route_tokens(&c, probs, idx, wt, &r);
    check(idx[0] == 0 && idx[1] == 1 && idx[2] == 4, "group_limited_greedy: group score is the max, other groups masked (got %d %d %d)",
          idx[0], idx[1], idx[2]);
    float ties[8] = {0.125f, 0.125f, 0.125f, 0.125f, 0.125f, 0.125f, 0.125f, 0.125f};
    c.topk_method = TOPK_GREEDY; c.n_group = 1; c.num_experts_per_tok = 3;
    route_tokens(&c, ties, idx, wt, &r);
    check(idx[0] == 0 && idx[1] == 1 && idx[2] == 2, "routing ties go to the lower expert id");
}

/* A small random model in memory, laid out exactly like a checkpoint. */
static void *random_model(Weights *w, const Config *c) {
    memset(w, 0, sizeof *w);
    w->cfg = *c;
    alloc_layers(w);
    Cursor measure = {NULL, 0, DTYPE_F32, 0, NULL, 0, NULL};
    size_t size = layout_weights(w, &measure);
    float *buf = xcalloc(size / 4 + 1, 4);
    for (size_t i = 0; i < size / 4; i++) buf[i] = 0.3f * rand_normal();
    Cursor fill = {(const char *)buf, 0, DTYPE_F32, 0, NULL, 0, NULL};
    layout_weights(w, &fill);
    for (int l = 0; l < c->num_hidden_layers; l++) {  /* norms near 1, as trained models have */
        Layer *L = &w->layers[l];
        for (int i = 0; i < c->kv_lora_rank; i++) ((float *)L->kv_a_norm)[i] = 1.0f + 0.1f * rand_normal();
    }
    return buf;
}

static Config small_config(int q_lora_rank) {
    Config c;
    memset(&c, 0, sizeof c);
    c.dtype = DTYPE_F32; c.vocab_size = 32; c.hidden_size = 24; c.num_hidden_layers = 2; c.num_attention_heads = 3;
    c.q_lora_rank = q_lora_rank; c.kv_lora_rank = 12; c.qk_nope_head_dim = 8; c.qk_rope_head_dim = 6; c.v_head_dim = 10;
    c.intermediate_size = 20; c.moe_intermediate_size = 6; c.n_routed_experts = 4; c.n_shared_experts = 1;
    c.num_experts_per_tok = 2; c.topk_method = TOPK_GREEDY; c.n_group = 1; c.topk_group = 1; c.first_k_dense_replace = 1;
    c.moe_layer_freq = 1; c.max_position_embeddings = 16; c.bos_token_id = 0; c.eos_token_id = 1;
    c.rope_scaling = ROPE_YARN; c.original_max_position_embeddings = 4; c.rope_factor = 4; c.beta_fast = 32;
    c.beta_slow = 1; c.mscale = 0.707; c.mscale_all_dim = 0.707; c.rms_norm_eps = 1e-6; c.rope_theta = 10000;
    c.routed_scaling_factor = 1.0;
    return c;
}

/* The absorption identity, on one layer: both forms give the same attention output. */
static void test_naive_equals_absorb(int q_lora_rank) {
    Config c = small_config(q_lora_rank);
    Weights w;
    void *buf = random_model(&w, &c);
    RunState naive, absorb;
    init_run_state(&naive, &c, ATTN_NAIVE, 10);
    init_run_state(&absorb, &c, ATTN_ABSORB, 10);
    float worst = 0.0f;
    for (int pos = 0; pos < 10; pos++) {
        for (int i = 0; i < c.hidden_size; i++) naive.xn[i] = absorb.xn[i] = rand_normal();
        mla(&naive, &c, &w.layers[1], 1, 1, pos);
        mla(&absorb, &c, &w.layers[1], 1, 1, pos);
        worst = fmaxf(worst, max_abs_diff(naive.branch, absorb.branch, c.hidden_size));
    }
    check(worst < 1e-4f, "naive == absorb MLA on one layer over 10 positions (q_lora_rank %d): max diff %.2e", q_lora_rank, worst);
    check(absorb.cache_width == (size_t)(c.kv_lora_rank + c.qk_rope_head_dim), "absorb cache holds kv_lora_rank + rope dim per token");
    free_run_state(&naive);
    free_run_state(&absorb);
    free_weights(&w);
    free(buf);
}

static void test_bf16(void) {
    uint16_t b[3] = {0x3F80, 0xC000, 0x3EAB};  /* 1, -2, 0.333984375 */
    float x[3] = {1, 1, 3}, y[1];
    Mat W = {b, NULL, DTYPE_BF16, 1, 3, 3};
    matmul(y, &W, x, 1, NULL);
    check(fabsf(y[0] - (1 - 2 + 3 * 0.333984375f)) < 1e-6f, "bf16 widening and matmul");
}

/* matmul for every weight type against a double-precision reference; q8 within its rounding. */
/* matvec_transposed (the absorbed query's W^UK^T q) on a q8 or q4 W whose weights as floats are
 * deq, for 1-3 tokens (decoding) and 11 (a prompt: attention's weighted sums), against double:
 * the largest error over the largest |y|. */
static double transposed_error(const Mat *W, const float *deq) {
    int rows = W->rows, cols = W->cols, xs = rows + 3, ys = cols + 5;  /* strides past the rows */
    float *x = malloc(11 * xs * sizeof(float)), *y = malloc(11 * ys * sizeof(float)), *row = malloc(cols * sizeof(float));
    double err = 0, largest = 0;
    for (int i = 0; i < 11 * xs; i++) x[i] = rand_normal();
    for (int n = 1; n <= 11; n += n < 3 ? 1 : 8) {
        matvec_transposed(y, ys, W, x, xs, n, row);
        for (int t = 0; t < n; t++)
            for (int c = 0; c < cols; c++) {
                double sum = 0;
                for (int r = 0; r < rows; r++) sum += (double)deq[(size_t)r * cols + c] * x[t * xs + r];
                err = fmax(err, fabs(y[t * ys + c] - sum));
                largest = fmax(largest, fabs(sum));
            }
    }
    free(x); free(y); free(row);
    return err / largest;
}

static void test_matmul_dtypes(void) {
    /* 35 groups: AVX2 takes 8 at a time, then 3; AVX-VNNI's scale table 32, then 3 */
    enum { ROWS = 37, COLS = 1120, N = 5, G = 32 };
    static float w[ROWS * COLS], x[N * COLS], y[N * ROWS], wq_scale[ROWS * COLS / 16];
    static int8_t wq[ROWS * COLS], xq[N * COLS];
    static float xs[N * COLS / 16];
    static int32_t xsum[N * COLS / 16];
    double ref[N * ROWS], max_ref = 0;
    for (int i = 0; i < ROWS * COLS; i++) w[i] = rand_normal();
    for (int i = 0; i < N * COLS; i++) x[i] = rand_normal();
    for (int t = 0; t < N; t++)
        for (int r = 0; r < ROWS; r++) {
            double sum = 0;
            for (int c = 0; c < COLS; c++) sum += (double)w[r * COLS + c] * x[t * COLS + c];
            ref[t * ROWS + r] = sum;
            max_ref = fmax(max_ref, fabs(sum));
        }
    Mat W = {w, NULL, DTYPE_F32, ROWS, COLS, COLS};
    matmul(y, &W, x, N, NULL);
    double err = 0;
    for (int i = 0; i < N * ROWS; i++) err = fmax(err, fabs(y[i] - ref[i]));
    check(err < 1e-4, "f32 matmul of 5 tokens, 37 rows (blocks of 4 with a ragged end): max err %.1e", err);
    quantize_activations(wq, wq_scale, w, ROWS * COLS, G);  /* the same symmetric scheme as export.py */
    size_t at[1];
    MatmulScratch act = {xq, xs, xsum, N * COLS, at, 1, 0, NULL, 0, NULL};  /* q8: no panels */
    Mat Q = {wq, wq_scale, DTYPE_Q8, ROWS, COLS, G};
    float y_simd[N * ROWS];
    act.kernel = KERNEL_PORTABLE;
    matmul(y, &Q, x, N, &act);
    err = 0;
    for (int i = 0; i < N * ROWS; i++) err = fmax(err, fabs(y[i] - ref[i]));
    check(err < 0.02 * max_ref, "q8 matmul (int8 weights and activations, groups of 32) within 2%% of the max: %.1e of %.1f", err, max_ref);
    /* every SIMD kernel built for this CPU against the portable one, 1 to 4 tokens per call */
    const char *built = "portable C only";
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVXVNNI__)
    built = "AVX-512 VNNI, AVX-VNNI and AVX2";
#elif defined(__AVX512VNNI__) && defined(__AVX512BW__)
    built = "AVX-512 VNNI and AVX2";
#elif defined(__AVXVNNI__) && defined(__AVX2__) && defined(__FMA__)
    built = "AVX-VNNI and AVX2";
#elif defined(__AVX2__) && defined(__FMA__)
    built = "AVX2";
#elif defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
    built = "NEON with sdot";
#endif
    const int kernels[] = {KERNEL_BEST, KERNEL_NO_VNNI, KERNEL_AVX_VNNI};
    const char *names[] = {"best", "without VNNI (AVX2 or NEON)", "AVX-VNNI (256 bits) where built"};
    for (int k = 0; k < 3; k++) {
        act.kernel = kernels[k];
        float worst = 0;
        for (int n = 1; n <= N; n++) {  /* 1 to 4 tokens per kernel call, and 4 + 1 */
            matmul(y_simd, &Q, x, n, &act);
            worst = fmaxf(worst, max_abs_diff(y, y_simd, (size_t)n * ROWS));
        }
        check(worst < 1e-4f, "q8 kernel %s (built: %s) agrees with the portable C kernel on 1-5 tokens (%.1e)",
              names[k], built, worst);
    }
    float deq[ROWS * COLS];
    for (int r = 0; r < ROWS; r++) mat_row_to_f32(deq + r * COLS, &Q, r);
    double transposed = transposed_error(&Q, deq);
    check(transposed < 1e-5, "q8 transposed product W^T x, groups of 32, 1-3 and 11 tokens, vs double: %.1e of the largest", transposed);
    act.kernel = KERNEL_BEST;
    Mat Q16 = {wq, wq_scale, DTYPE_Q8, ROWS, COLS, 16};  /* other group sizes take the generic path */
    quantize_activations(wq, wq_scale, w, ROWS * COLS, 16);
    matmul(y, &Q16, x, N, &act);
    err = 0;
    for (int i = 0; i < N * ROWS; i++) err = fmax(err, fabs(y[i] - ref[i]));
    check(err < 0.02 * max_ref, "q8 matmul with groups of 16: %.1e of %.1f", err, max_ref);
    for (int r = 0; r < ROWS; r++) mat_row_to_f32(deq + r * COLS, &Q16, r);
    transposed = transposed_error(&Q16, deq);
    check(transposed < 1e-5, "q8 transposed product W^T x, groups of 16: %.1e of the largest", transposed);
}

/* The f32/bf16 kernels built for this CPU (AVX-512 and AVX2 where built) against the portable
 * one and a double reference: 1-41 tokens (bf16 widened in registers below 4, once per chunk
 * from 4; from PANEL_MIN_TOKENS the token panels: full ones, and the narrow kernel for the
 * tokens left over), columns past one 512-column chunk and not a multiple of the SIMD width,
 * 13 rows (groups of three 4-row blocks and one left over, rows past the end). */
static void test_matmul_float_kernels(void) {
    enum { ROWS = 13, COLS = 1100, N = 41 };
    static float w[ROWS * COLS], wb[ROWS * COLS], x[N * COLS], y[N * ROWS], y_simd[N * ROWS];
    static uint16_t b[ROWS * COLS];
    for (int i = 0; i < ROWS * COLS; i++) {
        w[i] = rand_normal();
        b[i] = f32_to_bf16(w[i]);
        wb[i] = bf16_to_f32(b[i]);
    }
    for (int i = 0; i < N * COLS; i++) x[i] = rand_normal();
    int8_t xq[N * COLS];
    float xs[N * COLS / 32];
    int32_t xsum[N * COLS / 32];
    size_t at[1], panel_at[1];
    const int kernels[] = {KERNEL_BEST, KERNEL_NO_VNNI};
    const char *names[] = {"best built", "AVX2 where built"};
    MatmulScratch act = {xq, xs, xsum, N * COLS, at, 1, KERNEL_PORTABLE, NULL, 0, panel_at};
    for (int dtype = 0; dtype < 2; dtype++)
        for (int k = 0; k < 2; k++) {
            Mat W = {dtype ? (void *)b : (void *)w, NULL, dtype ? DTYPE_BF16 : DTYPE_F32, ROWS, COLS, COLS};
            const float *wf = dtype ? wb : w;
            double ref_err = 0, worst = 0;
            for (int n = 1; n <= N; n++) {
                act.kernel = KERNEL_PORTABLE;
                matmul(y, &W, x, n, &act);
                act.kernel = kernels[k];
                matmul(y_simd, &W, x, n, &act);
                for (int t = 0; t < n; t++)
                    for (int r = 0; r < ROWS; r++) {
                        double sum = 0;
                        for (int c = 0; c < COLS; c++) sum += (double)wf[r * COLS + c] * x[t * COLS + c];
                        ref_err = fmax(ref_err, fabs(y_simd[t * ROWS + r] - sum));
                        worst = fmax(worst, fabs(y_simd[t * ROWS + r] - y[t * ROWS + r]));
                    }
            }
            check(ref_err < 1e-3 && worst < 1e-3, "%s kernel (%s) on 1-41 tokens, 1100 columns: %.1e from the portable one, %.1e from double",
                  dtype ? "bf16" : "f32", names[k], worst, ref_err);
        }
    free(act.panels);
}

/* Absorbed attention's kernels against a double reference on the cache's types (f32, bf16, q8),
 * ragged sizes (heads past the register blocks, rows past the tiles and splits, columns past the
 * vectors): attend_latents' scaled scores S[h][j] = scale Q[h] . W[j] and its softmax-weighted
 * sums u[h] = sum_j softmax(S[h])_j W[j] by every kernel built (8,500 rows: 34 tiles in 9
 * splits), and weighted_rows_sum's u[h] = sum_j P[h][j] W[j]; all the same to the bit with 1
 * thread and with 3. First the splits: every tile in one, at most ATT_MAX_SPLITS of them, each
 * of at least ATT_SPLIT_TILES tiles (a split's sums cost a zeroing and a merge). */
static void test_attention_kernels(void) {
    int splits_ok = 1;
    for (int rows = 1; rows <= 300000; rows += 1 + rows / 7) {
        int tiles, all = (rows + 255) / 256, splits = attention_splits(rows, 256, &tiles);
        splits_ok &= splits >= 1 && splits <= ATT_MAX_SPLITS && tiles >= ATT_SPLIT_TILES &&
                     (splits - 1) * tiles < all && splits * tiles >= all;
    }
    check(splits_ok, "attention splits: 1 to %d of at least %d tiles, every tile in one, for 1 to 300,000 rows",
          ATT_MAX_SPLITS, ATT_SPLIT_TILES);
    enum { MAXH = 32, MAXROWS = 8500, COLS = 72, COUNT = 64 };
    static float w[MAXROWS * COLS], deq[MAXROWS * COLS], q[MAXH * COLS], p[MAXH * MAXROWS];
    static float s1[MAXH * MAXROWS], s3[MAXH * MAXROWS], u1[MAXH * COUNT], u3[MAXH * COUNT];
    static float v1[MAXH * COUNT], v3[MAXH * COUNT], qr[MAXH * COLS];
    static double ref_s[MAXROWS];
    static uint16_t wb[MAXROWS * COLS];
    static int8_t wq[MAXROWS * COLS];
    static float wscale[MAXROWS * COLS / 8], v_portable[MAXH * COUNT];
    const float scale = 0.125f;
    for (int i = 0; i < MAXROWS * COLS; i++) w[i] = rand_normal();
    for (int i = 0; i < MAXH * COLS; i++) q[i] = rand_normal();
    for (int i = 0; i < MAXH * MAXROWS; i++) p[i] = random_f32(&test_rng);
    for (int i = 0; i < MAXROWS * COLS; i++) wb[i] = f32_to_bf16(w[i]);
    Mat q8_cache = {wq, wscale, DTYPE_Q8, MAXROWS, COLS, cache_q8_group(COUNT, COLS)};
    for (int j = 0; j < MAXROWS; j++) cache_store_q8(&q8_cache, j, w + j * COLS, COUNT);
    /* heads 16, 32: in lanes; 700 rows: a last tile of 188 (16 x 11 + 12, a part pass) */
    const int heads[] = {1, 5, 16, 19, 32}, rows_list[] = {1, 3, 67, 700, 8500};
    const int kernels[] = {KERNEL_PORTABLE, KERNEL_BEST, KERNEL_NO_VNNI, KERNEL_AVX_VNNI};
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    for (int dtype = 0; dtype < 3; dtype++) {
        const void *data = dtype == 0 ? (const void *)w : dtype == 1 ? (const void *)wb : (const void *)wq;
        int type = dtype == 0 ? DTYPE_F32 : dtype == 1 ? DTYPE_BF16 : DTYPE_Q8;
        double score_err = 0, attend_err = 0, sum_err = 0, kernels_apart = 0;
        int same = 1;
        for (int i = 0; i < MAXH * COLS; i++)  /* a bf16 cache meets bf16 queries */
            qr[i] = dtype == 1 ? bf16_to_f32(f32_to_bf16(q[i])) : q[i];
        for (int h = 0; dtype == 2 && h < MAXH; h++)  /* a q8 cache: int8 queries, parts apart */
            for (int part = 0; part < 2; part++) {
                int at = h * COLS + part * COUNT, len = part ? COLS - COUNT : COUNT;
                int8_t qq[COLS];
                float qs;
                quantize_activations(qq, &qs, q + at, len, len);
                for (int k = 0; k < len; k++) qr[at + k] = qq[k] * qs;
            }
        for (int a = 0; a < 5; a++)
            for (int b = 0; b < 5; b++) {
                int H = heads[a], rows = rows_list[b];
                Mat W = {data, dtype == 2 ? wscale : NULL, type, rows, COLS, dtype == 2 ? q8_cache.group : COLS};
                for (int j = 0; j < rows; j++) mat_row_to_f32(deq + j * COLS, &W, j);
                for (int k = 0; k < 4; k++) {
                    for (int nt = 1; nt <= 3; nt += 2) {
#ifdef _OPENMP
                        omp_set_num_threads(nt);
#endif
                        AttendScratch att;
                        attend_scratch_init(&att, H, COUNT, COLS);
                        attend_latents_with(nt == 1 ? v1 : v3, COUNT, nt == 1 ? s1 : s3, q, &W, COUNT,
                                            scale, &att, kernels[k]);
                        attend_scratch_free(&att);
                        weighted_rows_sum(nt == 1 ? u1 : u3, COUNT, p, rows, &W, H, COUNT);
                    }
                    same &= !memcmp(s1, s3, sizeof(float) * H * rows) && !memcmp(u1, u3, sizeof(float) * H * COUNT) &&
                            !memcmp(v1, v3, sizeof(float) * H * COUNT);
                    for (int i = 0; i < H * COUNT; i++)  /* each kernel against the portable one */
                        if (k == 0) v_portable[i] = v1[i];
                        else kernels_apart = fmax(kernels_apart, fabs(v1[i] - v_portable[i]));
                    for (int h = 0; h < H; h++) {
                        double top = -INFINITY, total = 0;
                        for (int j = 0; j < rows; j++) {
                            double ref = 0;
                            for (int c = 0; c < COLS; c++) ref += (double)qr[h * COLS + c] * deq[j * COLS + c];
                            ref_s[j] = ref * scale;
                            top = fmax(top, ref_s[j]);
                            score_err = fmax(score_err, fabs(s1[h * rows + j] - ref_s[j]));
                        }
                        for (int j = 0; j < rows; j++) total += exp(ref_s[j] - top);
                        for (int c = 0; c < COUNT; c++) {
                            double ref = 0, attended = 0;
                            for (int j = 0; j < rows; j++) {
                                ref += (double)p[h * rows + j] * deq[j * COLS + c];
                                attended += exp(ref_s[j] - top) / total * deq[j * COLS + c];
                            }
                            sum_err = fmax(sum_err, fabs(u1[h * COUNT + c] - ref) / (rows > 131 ? 10 : 1));
                            attend_err = fmax(attend_err, fabs(v1[h * COUNT + c] - attended));
                        }
                    }
                }
            }
#ifdef _OPENMP
        omp_set_num_threads(threads);
#endif
        /* a bf16 cache's probabilities are bf16, each within 2^-9 of e^(S - max): 3 rows of
         * N(0, 1) numbers reach 2.1e-3 from double (every kernel alike); a q8 cache's weights
         * are u8, each within 1/510 of the tile's largest (3 rows: 9.0e-3, under 3 x 3 / 510).
         * The bf16 kernels' scores are a rounding apart, so a probability may round to the other
         * bf16 neighbour (3.5e-4 apart measured); q8 kernels sum the same integers, and came out
         * identical */
        double attend_max = dtype == 1 ? 4e-3 : dtype == 2 ? 2e-2 : 1e-5;
        double apart_max = dtype == 1 ? 2e-3 : 1e-5;
        check(score_err < 1e-4 && attend_err < attend_max && sum_err < 1e-4 && same && kernels_apart < apart_max,
              "attention on a %s cache, 1-32 heads x 1-8500 rows: scores %.1e, softmax-weighted sums %.1e, "
              "weighted sums %.1e from double; kernels %.1e from the portable one; 1 and 3 threads %s",
              storage_name(type), score_err, attend_err, sum_err, kernels_apart, same ? "identical" : "DIFFER");
    }
}

/* q4 weights, quantized here independently of export.py by llama.cpp Q4_0's rule (the largest-
 * magnitude weight of a group maps to -8), packed two to a byte: dsv2.c reads each weight back
 * exactly (q4_at, mat_row_to_f32), and every kernel built (chunks of 2048 columns unpacked to
 * int8, then the q8 kernels) agrees with the portable one and with a double reference on 1-6
 * tokens, 37 rows, 2144 columns (a second, ragged chunk; an odd number of groups, which the
 * VNNI kernel, reading nibbles directly, ends one group at a time). */
static void test_matmul_q4(void) {
    enum { ROWS = 37, COLS = 2144, N = 6, G = 32 };  /* 67 groups: an odd last one */
    static float w[ROWS * COLS], deq[ROWS * COLS], x[N * COLS], y[N * ROWS], y_k[N * ROWS], scale[ROWS * COLS / G];
    static uint8_t packed[ROWS * COLS / 2];
    for (int i = 0; i < ROWS * COLS; i++) w[i] = rand_normal();
    for (int i = 0; i < N * COLS; i++) x[i] = rand_normal();
    for (int g = 0; g < ROWS * COLS / G; g++) {
        const float *wg = w + g * G;
        float m = 0;
        for (int i = 0; i < G; i++) if (fabsf(wg[i]) > fabsf(m)) m = wg[i];
        scale[g] = m / -8.0f;
        for (int i = 0; i < G; i++) {
            int q = (int)rintf(wg[i] / scale[g]);
            q = q < -8 ? -8 : q > 7 ? 7 : q;
            deq[g * G + i] = q * scale[g];
            uint8_t *b = &packed[g * G / 2 + i % (G / 2)];
            *b = (uint8_t)(i < G / 2 ? (*b & 0xF0) | (q + 8) : (*b & 0x0F) | ((q + 8) << 4));
        }
    }
    Mat Q = {packed, scale, DTYPE_Q4, ROWS, COLS, G};
    float row[COLS];
    int exact = 1;
    for (int r = 0; r < ROWS; r++) {
        mat_row_to_f32(row, &Q, r);
        exact &= !memcmp(row, deq + (size_t)r * COLS, sizeof row);
    }
    check(exact, "q4 weights read back exactly: every row of %d x %d equals (nibble - 8) x scale", ROWS, COLS);
    double transposed = transposed_error(&Q, deq);
    check(transposed < 1e-5, "q4 transposed product W^T x (scale joined to x, nibbles read directly), 1-3 and 11 tokens, vs double: %.1e of the largest", transposed);
    MatmulScratch *act = matmul_scratch_new(1, N * COLS);
    const int kernels[] = {KERNEL_BEST, KERNEL_NO_VNNI, KERNEL_AVX_VNNI};
    double worst = 0, ref_err = 0, largest = 0;
    for (int n = 1; n <= N; n++) {
        act->kernel = KERNEL_PORTABLE;
        matmul(y, &Q, x, n, act);
        for (int t = 0; t < n; t++)
            for (int r = 0; r < ROWS; r++) {
                double sum = 0;
                for (int c = 0; c < COLS; c++) sum += (double)deq[r * COLS + c] * x[t * COLS + c];
                ref_err = fmax(ref_err, fabs(y[t * ROWS + r] - sum));
                largest = fmax(largest, fabs(sum));
            }
        for (int k = 0; k < 3; k++) {
            act->kernel = kernels[k];
            matmul(y_k, &Q, x, n, act);
            worst = fmax(worst, max_abs_diff(y, y_k, (size_t)n * ROWS));
        }
    }
    check(worst < 1e-4 * largest && ref_err < 0.02 * largest, "q4 matmul, every kernel built (%s) vs the portable one on 1-6 tokens: %.1e; vs double with float inputs: %.1e of %.1f (int8 activations)",
          q8_kernel(&(Mat){NULL, NULL, DTYPE_Q8, 1, 32, 32}, KERNEL_BEST) ? "SIMD" : "portable only", worst, ref_err, largest);
    matmul_scratch_free(act);
}

/* W against counts[i] tokens of x with KERNEL_NO_VNNI and with the portable kernel: the largest
 * difference; *largest: the largest portable output. */
static double lanes_against_portable(const Mat *W, const float *x, const int *counts, int k,
                                     MatmulScratch *act, float *y_ref, float *y, double *largest) {
    double worst = 0;
    *largest = 0;
    for (int i = 0; i < k; i++) {
        act->kernel = KERNEL_PORTABLE;
        matmul(y_ref, W, x, counts[i], act);
        act->kernel = KERNEL_NO_VNNI;
        matmul(y, W, x, counts[i], act);
        for (int j = 0; j < counts[i] * W->rows; j++) *largest = fmax(*largest, fabs(y_ref[j]));
        worst = fmax(worst, max_abs_diff(y_ref, y, (size_t)counts[i] * W->rows));
    }
    return worst;
}

/* q8 prefill with the tokens in the lanes (AVX2 without VNNI, from Q8_LANES_MIN tokens): rows
 * not a multiple of 3 or 12, columns past one 512-column chunk, tokens not a multiple of 16.
 * Through matmul against the portable 4 x 4 kernel, and the AVX2 kernel against its plain C
 * copy bit for bit on the same panel. */
static void test_q8_lanes(void) {
    enum { G = 32, ROWS = 29, COLS = 544, N = 40 };
    static float w[ROWS * COLS], x[N * COLS], y_ref[N * ROWS], y[N * ROWS];
    static int8_t wq[ROWS * COLS];
    static float ws[ROWS * COLS / G];
    for (int i = 0; i < ROWS * COLS; i++) w[i] = rand_normal();
    for (int i = 0; i < N * COLS; i++) x[i] = rand_normal();
    quantize_activations(wq, ws, w, ROWS * COLS, G);
    Mat W = {wq, ws, DTYPE_Q8, ROWS, COLS, G};
    MatmulScratch *act = matmul_scratch_new(1, N * COLS);
    const int counts[] = {16, 21, N};
    double largest, worst = lanes_against_portable(&W, x, counts, 3, act, y_ref, y, &largest);
    int lanes = q8_lanes_kernel(&W, N, KERNEL_NO_VNNI) != NULL;
    check(worst < 1e-5 * largest, "q8 prefill, tokens in the lanes (%s) vs the portable kernel, %d x %d, 16, 21 and 40 tokens: %.1e of %.1f",
          lanes ? "AVX2, taken" : "not built here", ROWS, COLS, worst, largest);
    static uint8_t w4[ROWS * COLS / 2];  /* the same weights at q4: byte j of a group, nibbles j and j + 16 */
    static float s4[ROWS * COLS / G];
    for (int g = 0; g < ROWS * COLS / G; g++) {
        float m = 0;
        for (int j = 0; j < G; j++) m = fabsf(w[g * G + j]) > fabsf(m) ? w[g * G + j] : m;
        s4[g] = m / -8;
        for (int j = 0; j < G; j++) {
            int q = (int)fminf(fmaxf(roundf(w[g * G + j] / s4[g]), -8), 7) + 8;
            uint8_t *b = &w4[g * G / 2 + j % (G / 2)];
            *b = (uint8_t)(j < G / 2 ? (*b & 0xF0) | q : (*b & 0x0F) | (q << 4));
        }
    }
    Mat W4 = {w4, s4, DTYPE_Q4, ROWS, COLS, G};
    worst = lanes_against_portable(&W4, x, counts, 3, act, y_ref, y, &largest);
    lanes = q8_lanes_kernel(&W4, N, KERNEL_NO_VNNI) != NULL;
    check(worst < 1e-5 * largest, "q4 prefill, tokens in the lanes (%s) vs the portable kernel, %d x %d, 16, 21 and 40 tokens: %.1e of %.1f",
          lanes ? "AVX2, taken" : "not built here", ROWS, COLS, worst, largest);
    act->kernel = KERNEL_PORTABLE;
    matmul(y_ref, &W, x, N, act);  /* the q8 reference again, for the kernel check below */
#if defined(__AVX2__) && defined(__FMA__)
    static float panel[N * COLS], y_c[N * ROWS];  /* q8_lanes_floats(40, 544): 48 x 272 + 48 x 17 */
    static int8_t xq[N * COLS];
    static float xs[N * COLS / G];
    for (int t = 0; t < N; t++) {
        quantize_activations(xq + t * COLS, xs + t * COLS / G, x + t * COLS, COLS, G);
        q8_lanes_put(panel, xq + t * COLS, xs + t * COLS / G, t, N, COLS);
    }
    Product p = {y, &W, x, N}, pc = {y_c, &W, x, N};
    for (int b = 0; b < (ROWS + 3) / 4; b += 3) {
        q8_lanes_blocks(&p, b, 3, panel, q8_lanes_rows_avx2);
        q8_lanes_blocks(&pc, b, 3, panel, q8_lanes_rows_portable);
    }
    check(!memcmp(y, y_c, sizeof y) && max_abs_diff(y, y_ref, (size_t)N * ROWS) < 1e-5 * largest,
          "q8_lanes_rows_avx2 == its plain C copy bit for bit (%d x %d, 40 tokens), and both agree with the 4 x 4 kernel", ROWS, COLS);
#endif
    matmul_scratch_free(act);
}

/* Several products in one pass (threads split their blocks by work; consecutive products with
 * the same input share its int8 form) give exactly what one product at a time gives. */
static void test_matmul_many(void) {
    enum { G = 32, A_ROWS = 13, B_ROWS = 401, C_ROWS = 7, COLS = 64, C_COLS = 96, N = 9 };  /* enough work for every thread; f32 panels */
    static float wa[A_ROWS * COLS], wb[B_ROWS * COLS], wc[C_ROWS * C_COLS], x[N * COLS], xc[2 * C_COLS];
    static int8_t qa[A_ROWS * COLS], qb[B_ROWS * COLS], qc[C_ROWS * C_COLS];
    static float sa[A_ROWS * COLS / G], sb[B_ROWS * COLS / G], sc[C_ROWS * C_COLS / G];
    static float y[3][N * B_ROWS], y_many[3][N * B_ROWS];
    for (int i = 0; i < A_ROWS * COLS; i++) wa[i] = rand_normal();
    for (int i = 0; i < B_ROWS * COLS; i++) wb[i] = rand_normal();
    for (int i = 0; i < C_ROWS * C_COLS; i++) wc[i] = rand_normal();
    for (int i = 0; i < N * COLS; i++) x[i] = rand_normal();
    for (int i = 0; i < 2 * C_COLS; i++) xc[i] = rand_normal();
    quantize_activations(qa, sa, wa, A_ROWS * COLS, G);
    quantize_activations(qb, sb, wb, B_ROWS * COLS, G);
    quantize_activations(qc, sc, wc, C_ROWS * C_COLS, G);
    static int8_t aq[N * COLS * 2 + 2 * C_COLS];
    static float as[sizeof aq / G];
    static int32_t asum[sizeof aq / G];
    size_t at[3], panel_at[3];
    MatmulScratch act = {aq, as, asum, sizeof aq, at, 3, 0, NULL, 0, panel_at};
    for (int dtype = DTYPE_F32; dtype <= DTYPE_Q8; dtype += DTYPE_Q8 - DTYPE_F32) {
        int q8 = dtype == DTYPE_Q8;
        Mat A = {q8 ? (void *)qa : wa, q8 ? sa : NULL, dtype, A_ROWS, COLS, q8 ? G : COLS};
        Mat B = {q8 ? (void *)qb : wb, q8 ? sb : NULL, dtype, B_ROWS, COLS, q8 ? G : COLS};
        Mat C = {q8 ? (void *)qc : wc, q8 ? sc : NULL, dtype, C_ROWS, C_COLS, q8 ? G : C_COLS};
        Product p[3] = {{y_many[0], &A, x, N}, {y_many[1], &B, x, N}, {y_many[2], &C, xc, 2}};
        matmul_many(p, 3, &act);
        matmul(y[0], &A, x, N, &act);
        matmul(y[1], &B, x, N, &act);
        matmul(y[2], &C, xc, 2, &act);
        int same = !memcmp(y[0], y_many[0], sizeof(float) * N * A_ROWS) && !memcmp(y[1], y_many[1], sizeof(float) * N * B_ROWS) &&
                   !memcmp(y[2], y_many[2], sizeof(float) * 2 * C_ROWS);
        check(same, "three products in one pass == one at a time, bit for bit (%s; two share an input)", q8 ? "q8" : "f32");
    }
    free(act.panels);
}

/* A config no fixture has: norm_topk_prob, seq_aux off, MoE every other layer, no shared
 * experts, no YaRN, q LoRA, group-limited routing. */
static Config unusual_config(void) {
    Config c = small_config(8);
    c.num_hidden_layers = 3; c.first_k_dense_replace = 0; c.moe_layer_freq = 2; c.n_shared_experts = 0;
    c.norm_topk_prob = 1; c.seq_aux = 0; c.aux_loss_alpha = 0.1; c.rope_scaling = ROPE_PLAIN;
    c.topk_method = TOPK_GROUP_LIMITED_GREEDY; c.n_group = 2; c.topk_group = 1;
    return c;
}

/* The prompt as one batch gives the same result as feeding it token by token. */
static void test_batch_equals_single(int attn_mode, Config c, const char *label) {
    Weights w;
    void *buf = random_model(&w, &c);
    RunState one, batch;
    init_run_state(&one, &c, attn_mode, 12);
    init_run_state(&batch, &c, attn_mode, 12);
    int tokens[12] = {3, 17, 5, 29, 8, 8, 1, 30, 12, 0, 7, 21};
    float *a = NULL, *b;
    for (int pos = 0; pos < 12; pos++) a = forward(&w, &one, &tokens[pos], 1, pos);
    b = forward(&w, &batch, tokens, 12, 0);
    float d = max_abs_diff(a, b, c.vocab_size);
    float cache = max_abs_diff(one.cache, batch.cache, (size_t)c.num_hidden_layers * 12 * one.cache_width);
    check(d < 1e-5f && cache < 1e-5f, "batched prefill == token by token (%s, %s config): logits %.1e, cache %.1e",
          attn_mode == ATTN_ABSORB ? "absorb" : "naive", label, d, cache);
    free_run_state(&one);
    free_run_state(&batch);
    enum { LONG = MAX_BATCH + 5 };  /* a prompt past one forward call: two chunks */
    init_run_state(&one, &c, attn_mode, LONG);
    init_run_state(&batch, &c, attn_mode, LONG);
    int many[LONG];
    for (int i = 0; i < LONG; i++) many[i] = (i * 7 + 3) % c.vocab_size;
    for (int pos = 0; pos < LONG; pos++) a = forward(&w, &one, &many[pos], 1, pos);
    b = forward(&w, &batch, many, LONG, 0);
    d = max_abs_diff(a, b, c.vocab_size);
    cache = max_abs_diff(one.cache, batch.cache, (size_t)c.num_hidden_layers * LONG * one.cache_width);
    check(d < 1e-5f && cache < 1e-5f, "a %d-token prompt (MAX_BATCH %d + 5: two forward chunks) == token by token (%s, %s config): logits %.1e, cache %.1e",
          LONG, MAX_BATCH, attn_mode == ATTN_ABSORB ? "absorb" : "naive", label, d, cache);
    free_run_state(&one);
    free_run_state(&batch);
    free_weights(&w);
    free(buf);
}

/* The share of a buffer's whole pages that are in memory (mincore), or -1. */
static double resident_share(const void *p, size_t bytes) {
    uintptr_t page = 4096, start = ((uintptr_t)p + page - 1) & ~(page - 1);
    uintptr_t end = ((uintptr_t)p + bytes) & ~(page - 1);
    if (end <= start) return 1;
    size_t n = (end - start) / page, in = 0;
    unsigned char *v = xcalloc(n, 1);
    int ok = mincore((void *)start, end - start, v) == 0;
    for (size_t i = 0; i < n; i++) in += v[i] & 1;
    free(v);
    return ok ? (double)in / n : -1;
}

/* A run's buffers hold min(context, MAX_BATCH) tokens and are in memory before the first
 * prompt (prefault): its first touch of them once cost 0.3-0.5 s of page faults. */
static void test_run_state_prefault(void) {
    Config c = small_config(8);
    c.hidden_size = 256; c.intermediate_size = 512; c.moe_intermediate_size = 128;
    c.max_position_embeddings = 4096;
    int contexts[2] = {40, MAX_BATCH + 88}, ok = 1;
    double worst = 1;
    for (int i = 0; i < 2; i++) {
        RunState s;
        init_run_state(&s, &c, ATTN_ABSORB, contexts[i]);
        int B = contexts[i] < MAX_BATCH ? contexts[i] : MAX_BATCH;
        ok &= s.batch == B;
        int moe_width = c.moe_intermediate_size * (c.num_experts_per_tok + c.n_shared_experts);
        int mlp_width = moe_width > c.intermediate_size ? moe_width : c.intermediate_size;
        double share[4] = {
            resident_share(s.x, (size_t)B * c.hidden_size * sizeof(float)),
            resident_share(s.hidden, (size_t)B * mlp_width * sizeof(float)),
            resident_share(s.expert_in, (size_t)B * c.num_experts_per_tok * c.hidden_size * sizeof(float)),
            s.matmul->panels ? resident_share(s.matmul->panels, s.matmul->panel_capacity * sizeof(float)) : 1};
        for (int k = 0; k < 4; k++) worst = share[k] < worst ? share[k] : worst;
        free_run_state(&s);
    }
    check(ok && worst == 1, "run buffers: min(context, MAX_BATCH) tokens, in memory before the first prompt (least resident share %.2f)", worst);
}

/* A config whose latent is wider than every MLP (kv_lora_rank 160 against widths 20 and 18): the
 * naive form once copied the latent into the MLP scratch and overflowed it (ASan: make test-asan).
 * A 12-token prompt through both forms must agree. */
static void test_wide_latent(void) {
    Config c = small_config(0);
    c.kv_lora_rank = 160;
    Weights w;
    void *buf = random_model(&w, &c);
    RunState naive, absorb;
    init_run_state(&naive, &c, ATTN_NAIVE, 12);
    init_run_state(&absorb, &c, ATTN_ABSORB, 12);
    int tokens[12] = {3, 17, 5, 29, 8, 8, 1, 30, 12, 0, 7, 21};
    float *a = forward(&w, &naive, tokens, 12, 0), *b = forward(&w, &absorb, tokens, 12, 0);
    float d = max_abs_diff(a, b, c.vocab_size);
    check(d < 1e-4f, "kv_lora_rank 160 > every MLP width: naive == absorb on a 12-token prompt (%.1e)", d);
    free_run_state(&naive);
    free_run_state(&absorb);
    free_weights(&w);
    free(buf);
}

/* Backward against finite differences on a config no fixture has: norm_topk_prob, seq_aux off,
 * MoE every other layer, no shared experts, no YaRN, q LoRA, group-limited routing. */
static void test_gradient_finite_differences(void) {
    Config c = unusual_config();
    Params p, g;
    params_init(&p, &c);
    params_init(&g, &c);
    float *x = params_data(&p);
    size_t n = params_count(&p);
    for (size_t i = 0; i < n; i++) x[i] = 0.3f * rand_normal();
    for (int l = 0; l < c.num_hidden_layers; l++) {  /* norms near 1 */
        Layer *L = &p.w.layers[l];
        float *norms[] = {mut(L->input_norm), mut(L->post_attention_norm), mut(L->q_a_norm), mut(L->kv_a_norm)};
        int lens[] = {c.hidden_size, c.hidden_size, c.q_lora_rank, c.kv_lora_rank};
        for (int k = 0; k < 4; k++) for (int i = 0; i < lens[k]; i++) norms[k][i] = 1.0f + 0.1f * rand_normal();
    }
    enum { B = 2, T = 6 };
    int inputs[B * T], targets[B * T];
    for (int i = 0; i < B * T; i++) { inputs[i] = (int)(random_u32(&test_rng) % c.vocab_size); targets[i] = (int)(random_u32(&test_rng) % c.vocab_size); }
    TrainState ts;
    train_state_init(&ts, &c, B, T);
    RunState rs;
    init_run_state(&rs, &c, ATTN_ABSORB, T);
    train_forward(&p, &ts, &rs, inputs, targets);
    train_backward(&p, &g, &ts, &rs, inputs, targets);
    const float *grad = params_data(&g);
    int checked = 0, good = 0;
    double worst = 0;
    for (int k = 0; k < 400 && checked < 40; k++) {  /* elements with a gradient large enough to measure */
        size_t i = random_u32(&test_rng) % n;
        if (fabsf(grad[i]) < 2e-3f) continue;
        /* a step that flips a top-k choice meets a jump in the loss (not differentiable there):
         * then a quarter of the step, once */
        float keep = x[i];
        double rel = 1;
        for (float h = 1e-2f; h > 2e-3f && rel >= 0.05; h /= 4) {
            x[i] = keep + h;
            double up = train_forward(&p, &ts, &rs, inputs, targets);
            x[i] = keep - h;
            double down = train_forward(&p, &ts, &rs, inputs, targets);
            x[i] = keep;
            double numeric = (up - down) / (2 * h);
            rel = fabs(numeric - grad[i]) / fmax(fabs(numeric), fabs(grad[i]));
        }
        checked++;
        good += rel < 0.05;
        if (rel < 0.05) worst = fmax(worst, rel);
    }
    /* both steps can still straddle a flip: allow 2 of 40 */
    check(checked >= 30 && good >= checked - 2, "grad vs finite differences on an unseen config (norm_topk_prob, no seq_aux, moe every 2nd layer, "
          "no shared experts, no YaRN): %d/%d within 5%%, worst of those %.1e", good, checked, worst);
    free_run_state(&rs);
    train_state_free(&ts, &c);
    params_free(&p);
    params_free(&g);
}

/* ------------------------------------------------------------------------- */
/* Fixture checks                                                             */
/* ------------------------------------------------------------------------- */

static int export_model(const char *dir, const char *out, const char *dtype_flag) {
    char cmd[2048], err[4096];
    snprintf(cmd, sizeof cmd, "%s export.py %s %s %s", python, dir, out, dtype_flag);
    int code = run(cmd, err, sizeof err);
    check(code == 0, "export.py %s %s -> exit %d %.*s", dir, dtype_flag, code, code ? (int)strcspn(err, "\n") : 0, err);
    return code == 0;
}

/* In-process: the exported model's RoPE tables, latent cache, routing and hidden states. */
static void check_internals(const char *dir, const char *model_path) {
    Weights w;
    memset(&w, 0, sizeof w);
    load_weights(&w, model_path, WEIGHTS_MMAP);
    const Config *c = &w.cfg;
    RefTensor t_ids, t;
    int *prompt = load_ref(dir, "prompt_ids", &t_ids);
    int T = (int)t_ids.dims[0], L = c->num_hidden_layers, D = c->hidden_size, K = c->num_experts_per_tok;
    RunState s;
    init_run_state(&s, c, ATTN_ABSORB, c->max_position_embeddings);
    float *inv = load_ref(dir, "rope.inv_freq", &t), *cos_ref = load_ref(dir, "rope.cos", &t), *sin_ref;
    if (inv) {
        double inv_freq[c->qk_rope_head_dim / 2];
        float inv_f[c->qk_rope_head_dim / 2];
        rope_inv_freq(c, inv_freq);
        for (int i = 0; i < c->qk_rope_head_dim / 2; i++) inv_f[i] = (float)inv_freq[i];
        float d = max_abs_diff(inv_f, inv, c->qk_rope_head_dim / 2);
        check(d < 1e-6f, "%s: YaRN inv_freq (max diff %.1e)", dir, d);
        free(inv);
    }
    if (cos_ref && (sin_ref = load_ref(dir, "rope.sin", &t))) {
        size_t n = (size_t)t.dims[0] * t.dims[1];
        float d = fmaxf(max_abs_diff(s.rope_cos, cos_ref, n), max_abs_diff(s.rope_sin, sin_ref, n));
        check(d < 1e-5f, "%s: rope cos/sin tables with mscale (max diff %.1e)", dir, d);
        free(sin_ref);
    }
    free(cos_ref);
    float *hidden = xcalloc((size_t)T * L * D, sizeof(float)), *rw = xcalloc((size_t)T * L * K, sizeof(float));
    int *ri = xcalloc((size_t)T * L * K, sizeof(int));
    s.trace = trace_new(c, s.context);
    for (int pos = 0; pos < T; pos++) {
        forward(&w, &s, &prompt[pos], 1, pos);
        memcpy(hidden + (size_t)pos * L * D, s.trace->hidden, (size_t)L * D * sizeof(float));
        memcpy(ri + (size_t)pos * L * K, s.trace->route_idx, (size_t)L * K * sizeof(int));
        memcpy(rw + (size_t)pos * L * K, s.trace->route_weight, (size_t)L * K * sizeof(float));
    }
    trace_free(s.trace);
    for (int l = 0; l < L; l++) {
        char name[64];
        snprintf(name, sizeof name, "hidden.layer.%d", l);
        float *ref = load_ref(dir, name, &t), worst = 0.0f;
        if (ref) {
            for (int pos = 0; pos < T; pos++)
                worst = fmaxf(worst, max_abs_diff(hidden + ((size_t)pos * L + l) * D, ref + (size_t)pos * D, D));
            check(worst < 1e-4f, "%s: hidden state after layer %d (max diff %.1e)", dir, l, worst);
            free(ref);
        }
        snprintf(name, sizeof name, "cache.%d.c_kv", l);
        float *c_kv = load_ref(dir, name, &t);
        snprintf(name, sizeof name, "cache.%d.k_pe", l);
        float *k_pe = load_ref(dir, name, &t);
        if (c_kv && k_pe) {
            worst = 0.0f;
            const float *cache = (const float *)s.cache + (size_t)l * s.context * s.cache_width;
            for (int pos = 0; pos < T; pos++) {
                worst = fmaxf(worst, max_abs_diff(cache + pos * s.cache_width, c_kv + (size_t)pos * c->kv_lora_rank, c->kv_lora_rank));
                worst = fmaxf(worst, max_abs_diff(cache + pos * s.cache_width + c->kv_lora_rank, k_pe + (size_t)pos * c->qk_rope_head_dim, c->qk_rope_head_dim));
            }
            check(worst < 1e-4f, "%s: latent KV cache (c_kv, rotated k_pe) of layer %d (max diff %.1e)", dir, l, worst);
        }
        free(c_kv);
        free(k_pe);
        snprintf(name, sizeof name, "route.%d.idx", l);
        int *idx = load_ref(dir, name, &t);
        snprintf(name, sizeof name, "route.%d.weight", l);
        float *wt = load_ref(dir, name, &t);
        if (idx && wt) {
            int same = 1;
            worst = 0.0f;
            for (int pos = 0; pos < T; pos++)
                for (int k = 0; k < K; k++) {
                    size_t at = ((size_t)pos * L + l) * K + k;
                    same &= ri[at] == idx[pos * K + k];
                    worst = fmaxf(worst, fabsf(rw[at] - wt[pos * K + k]));
                }
            check(same && worst < 1e-4f, "%s: routing of layer %d: same experts, weights max diff %.1e", dir, l, worst);
        }
        free(idx);
        free(wt);
    }
    free(hidden); free(rw); free(ri); free(prompt);
    free_run_state(&s);
    free_weights(&w);
}

/* Through the CLI: logits at every prompt and generated position, and the greedy continuation. */
static void check_cli(const char *dir, const char *model_path, const char *label) {
    RefTensor tp, tg, tl, tgl;
    int *prompt = load_ref(dir, "prompt_ids", &tp), *gen = load_ref(dir, "gen_ids", &tg);
    float *logits = load_ref(dir, "logits", &tl), *gen_logits = load_ref(dir, "gen_logits", &tgl);
    if (!prompt || !gen || !logits || !gen_logits) { check(0, "%s: fixture lacks prompt/gen references", dir); return; }
    int T = (int)tp.dims[0], N = (int)tg.dims[0], V = (int)tl.dims[1];
    int *all = xcalloc(T + N, sizeof(int));
    memcpy(all, prompt, T * sizeof(int));
    memcpy(all + T, gen, N * sizeof(int));
    char ids_path[512], out_path[512], cmd[2048];
    snprintf(ids_path, sizeof ids_path, "%s/ids.txt", tmp_dir);
    snprintf(out_path, sizeof out_path, "%s/logits.bin", tmp_dir);
    write_ids(ids_path, all, T + N - 1);  /* the last generated token is never fed back */
    const char *modes[] = {"naive", "absorb"};
    /* the GPU build (DSV2_GPU_BUILD=1, from tests/test_cuda.sh) runs absorbed attention only */
    for (int m = getenv("DSV2_GPU_BUILD") ? 1 : 0; m < 2; m++) {
        snprintf(cmd, sizeof cmd, "%s %s -m logits -f %s -o %s -a %s", dsv2_bin, model_path, ids_path, out_path, modes[m]);
        unlink(out_path);  /* a crashed run must not leave the previous run's logits to compare */
        int code = run(cmd, NULL, 0);
        size_t bytes = 0;
        float *got = code == 0 ? (float *)read_file(out_path, &bytes) : NULL;
        if (!got || bytes != (size_t)(T + N - 1) * V * sizeof(float)) {
            check(0, "%s %s -a %s: logits mode exit %d, %zu bytes", dir, label, modes[m], code, bytes);
            free(got);
            continue;
        }
        float prefill = max_abs_diff(got, logits, (size_t)T * V);
        float decode = max_abs_diff(got + (size_t)(T - 1) * V, gen_logits, (size_t)N * V);
        check(prefill <= 1e-4f, "%s %s -a %s: logits at all %d prompt positions, max |diff| %.2e", dir, label, modes[m], T, prefill);
        check(decode <= 1e-4f, "%s %s -a %s: logits at all %d generated positions, max |diff| %.2e", dir, label, modes[m], N, decode);
        free(got);
        write_ids(ids_path, prompt, T);
        snprintf(cmd, sizeof cmd, "%s %s -f %s -t 0 -n %d -a %s", dsv2_bin, model_path, ids_path, N, modes[m]);
        code = run(cmd, NULL, 0);
        char *text = stdout_text();
        int n_out = 0, *out = code == 0 ? parse_ids(text, V, &n_out) : NULL;
        check(code == 0 && n_out == N && !memcmp(out, gen, N * sizeof(int)), "%s %s -a %s: greedy continuation of %d tokens identical",
              dir, label, modes[m], N);
        free(out);
        free(text);
        write_ids(ids_path, all, T + N - 1);
    }
    free(all); free(prompt); free(gen); free(logits); free(gen_logits);
}

/* A fixture's prompt ids, also written to ids_path (TMP/ids.txt) for the CLI; NULL if none. */
static int *fixture_prompt(const char *dir, char *ids_path, size_t size, int *T) {
    RefTensor tp;
    int *prompt = load_ref(dir, "prompt_ids", &tp);
    if (!prompt) return NULL;
    *T = (int)tp.dims[0];
    snprintf(ids_path, size, "%s/ids.txt", tmp_dir);
    write_ids(ids_path, prompt, *T);
    return prompt;
}

/* q8 on a fixture through the CLI: top-1 agreement with the reference logits, max |dlogit|
 * printed only: on tiny random models one routing flip moves a logit a lot (not a bug), so the
 * quality of q8 is measured by KL on the trained built-in model (test_quantized_quality). */
static void check_q8(const char *dir, const char *model_path) {
    RefTensor tl;
    char ids_path[512], out_path[512], cmd[2048];
    int T = 0, *prompt = fixture_prompt(dir, ids_path, sizeof ids_path, &T);
    float *logits = load_ref(dir, "logits", &tl);
    if (!prompt || !logits) { free(prompt); free(logits); return; }
    int V = (int)tl.dims[1];
    snprintf(out_path, sizeof out_path, "%s/logits.bin", tmp_dir);
    snprintf(cmd, sizeof cmd, "%s %s -m logits -f %s -o %s", dsv2_bin, model_path, ids_path, out_path);
    size_t bytes = 0;
    float *got = run(cmd, NULL, 0) == 0 ? (float *)read_file(out_path, &bytes) : NULL;
    if (!got || bytes != (size_t)T * V * sizeof(float)) { check(0, "%s q8: logits mode", dir); free(got); free(prompt); free(logits); return; }
    double max_err = 0;
    int top1 = 0;
    for (int t = 0; t < T; t++) {
        top1 += argmax(got + (size_t)t * V, V) == argmax(logits + (size_t)t * V, V);
        for (int v = 0; v < V; v++) max_err = fmax(max_err, fabs(got[(size_t)t * V + v] - logits[(size_t)t * V + v]));
    }
    check(top1 >= T / 2, "%s q8: top-1 agreement %d/%d (max |dlogit| %.3f, not a criterion)", dir, top1, T, max_err);
    free(got); free(prompt); free(logits);
}

/* -m layers through the CLI on a fixture's prompt, compared with the official hidden states,
 * latent cache and routing by tests/compare_layers.py (what test_cuda.sh runs on ./dsv2cu
 * against ./dsv2): the exported model agrees; its q8 twin must be named as different from the
 * first layer on. */
static void check_layers(const char *dir, const char *model_path, int expect_same) {
    char ids_path[512], out_path[600], cmd[2048];
    int T, *prompt = fixture_prompt(dir, ids_path, sizeof ids_path, &T);
    if (!prompt) return;
    snprintf(out_path, sizeof out_path, "%s/run.layers", tmp_dir);
    snprintf(cmd, sizeof cmd, "%s %s -m layers -f %s -o %s && %s tests/compare_layers.py %s %s", dsv2_bin, model_path, ids_path,
             out_path, python, out_path, dir);
    int code = run(cmd, NULL, 0);
    char *text = stdout_text();
    const char *first = text ? strstr(text, "first difference: ") : NULL;
    if (expect_same)
        check(code == 0 && text && strstr(text, "experts identical"), "%s: -m layers = the official hidden states, latent cache and routing at all %d positions (compare_layers.py exit %d)",
              dir, T, code);
    else
        check(code == 1 && first && strstr(first, "layer 0,"), "%s q8: compare_layers.py names the first difference: %.*s", dir,
              first ? (int)strcspn(first, "\n") : 0, first ? first : "");
    free(text);
    free(prompt);
}

/* -m trace through the CLI on a fixture's prompt: the CSV's expert rows are the official routing
 * decisions at every position of every MoE layer (same experts, gate values within 1e-5), and
 * the four SVGs are written with axes and a legend or colour bar. */
static void check_trace(const char *dir, const char *model_path) {
    RefTensor t;
    char ids_path[512], csv_path[600], cmd[2048];
    int T, *prompt = fixture_prompt(dir, ids_path, sizeof ids_path, &T);
    if (!prompt) return;
    snprintf(csv_path, sizeof csv_path, "%s/trace.csv", tmp_dir);
    snprintf(cmd, sizeof cmd, "%s %s -m trace -f %s -o %s", dsv2_bin, model_path, ids_path, csv_path);
    int code = run(cmd, NULL, 0);
    char *csv = code == 0 ? read_file(csv_path, NULL) : NULL;
    if (!csv) { check(0, "%s: -m trace exit %d", dir, code); free(prompt); return; }
    int layers_checked = 0, all_same = 1;
    float worst = 0;
    for (int l = 0; l < 64; l++) {
        char name[64];
        snprintf(name, sizeof name, "route.%d.idx", l);
        int *idx = load_ref(dir, name, &t);
        snprintf(name, sizeof name, "route.%d.weight", l);
        float *wt = load_ref(dir, name, &t);
        if (!idx || !wt) { free(idx); free(wt); continue; }
        int K = (int)t.dims[1], found = 0;
        for (char *line = strchr(csv, '\n'); line && line[1]; line = strchr(line + 1, '\n')) {
            int pos, token, layer, rank, expert;
            float g;
            if (sscanf(line + 1, "%d,%d,%d,expert,,%d,%d,%f,", &pos, &token, &layer, &rank, &expert, &g) != 6 || layer != l ||
                pos >= T)
                continue;
            int k = 0;
            while (k < K && idx[pos * K + k] != expert) k++;
            if (k == K) { all_same = 0; continue; }
            found++;
            worst = fmaxf(worst, fabsf(g - wt[pos * K + k]) / fmaxf(1.0f, fabsf(wt[pos * K + k])));
        }
        all_same &= found == T * K;
        layers_checked++;
        free(idx); free(wt);
    }
    check(layers_checked > 0 && all_same && worst <= 1e-5f, "%s: -m trace routing = the official decisions at all %d positions of %d MoE layers (gate values within %.1e, relative above 1)",
          dir, T, layers_checked, worst);
    static const char *const kinds[] = {"routing", "load", "attention", "kv"};
    int svg_ok = 1;
    for (int k = 0; k < 4; k++) {
        char path[700];
        snprintf(path, sizeof path, "%s/trace.%s.svg", tmp_dir, kinds[k]);
        char *svg = access(path, R_OK) == 0 ? read_file(path, NULL) : NULL;
        int ticks = 0;
        for (const char *p = svg; p && (p = strstr(p, "<line")); p++) ticks++;
        svg_ok &= svg && !strncmp(svg, "<svg", 4) && strstr(svg, "</svg>") && ticks >= 4 &&
                  strstr(svg, "class=\"axis-label\"") && (strstr(svg, "class=\"legend\"") || strstr(svg, "class=\"colorbar\""));
        free(svg);
    }
    check(svg_ok, "%s: -m trace -o wrote 4 SVGs, each with ticks, axis labels and a legend or colour bar", dir);
    free(csv); free(prompt);
}

/* -m eval's perplexity is exp(mean NLL) of the next tokens under -m logits' distributions. */
static void check_eval(const char *dir, const char *model_path) {
    char ids_path[512], out_path[512], cmd[2048];
    int T, *prompt = fixture_prompt(dir, ids_path, sizeof ids_path, &T);
    if (!prompt) return;
    snprintf(out_path, sizeof out_path, "%s/logits.bin", tmp_dir);
    snprintf(cmd, sizeof cmd, "%s %s -m logits -f %s -o %s", dsv2_bin, model_path, ids_path, out_path);
    size_t bytes = 0;
    float *logits = run(cmd, NULL, 0) == 0 ? (float *)read_file(out_path, &bytes) : NULL;
    snprintf(cmd, sizeof cmd, "%s %s -m eval -f %s", dsv2_bin, model_path, ids_path);
    int code = run(cmd, NULL, 0);
    char *text = stdout_text(), *at = strstr(text, "mean NLL ");
    double nll = NAN, ppl = NAN;
    if (at) sscanf(at, "mean NLL %lf nats/token, perplexity %lf", &nll, &ppl);
    int V = logits ? (int)(bytes / sizeof(float) / T) : 0;
    double sum = 0;
    for (int t = 0; logits && t + 1 < T; t++) {
        double lp[V];
        log_probs(logits + (size_t)t * V, V, lp);
        sum -= lp[prompt[t + 1]];
    }
    double mean = sum / (T - 1);
    check(code == 0 && logits && fabs(nll - mean) < 1e-5 && fabs(ppl - exp(mean)) < 1e-5 * exp(mean),
          "%s: -m eval perplexity %.6f = exp(mean NLL %.6f) from -m logits (%.6f)", dir, ppl, nll, mean);
    free(logits); free(text); free(prompt);
}

/* tests/reference.py, the float64 numpy transcription: against the official references of a
 * fixture (both MLA forms, <= 1e-6), then as a fixture maker for configs no official fixture has
 * (the JSON files in tests/configs), whose folders go through every check ./test_all DIR runs. */
static void test_fixture_dir(const char *dir);

static void test_reference(void) {
    printf("tests/reference.py\n");
    const char *sets[] = {"tests/fixtures/lite", "tests/fixtures/v2", "tests/fixtures/v2-bf16-sharded"};
    for (int i = 0; i < 3; i++) {
        char cmd[1024];
        snprintf(cmd, sizeof cmd, "%s tests/reference.py --check %s", python, sets[i]);
        int code = run(cmd, NULL, 0);
        char *text = stdout_text();
        text[strcspn(text, "\n")] = '\0';
        check(code == 0, "reference.py = the official code (logits <= 1e-6, naive and absorbed): %s", text);
        free(text);
    }
    {  /* given an official fixture's folder, it writes that fixture's references again */
        char dir[512], cmd[2048];
        snprintf(dir, sizeof dir, "%s/fixture-again", tmp_dir);
        snprintf(cmd, sizeof cmd, "%s tests/reference.py tests/fixtures/v2 %s", python, dir);
        int code = run(cmd, NULL, 0);
        RefTensor a, b;
        float *mine = code == 0 ? load_ref(dir, "logits", &a) : NULL, *theirs = load_ref("tests/fixtures/v2", "logits", &b);
        float d = mine && theirs && ref_count(&a) == ref_count(&b) ? max_abs_diff(mine, theirs, ref_count(&a)) : INFINITY;
        check(d <= 1e-6f, "reference.py tests/fixtures/v2 DIR writes the official logits again (max diff %.1e)", d);
        free(mine);
        free(theirs);
    }
    const char *configs[] = {"tests/configs/unseen-groups.json", "tests/configs/unseen-sparse.json"};
    for (int i = 0; i < 2; i++) {
        char dir[512], cmd[2048], err[4096];
        snprintf(dir, sizeof dir, "%s/fixture-%d", tmp_dir, i);
        snprintf(cmd, sizeof cmd, "%s tests/reference.py %s %s", python, configs[i], dir);
        int code = run(cmd, err, sizeof err);
        check(code == 0, "reference.py %s makes a fixture (exit %d) %.*s", configs[i], code, code ? (int)strcspn(err, "\n") : 0, err);
        if (code == 0) test_fixture_dir(dir);
    }
}

/* The thread tuner moves to the fastest thread count: a fake step costs 1 ms per thread away
 * from 2 (plus 1 ms), so from 4 threads it must settle on 2, and stay there. */
/* Runs the tuner for steps whose time (ms) is step_ms(threads, step); returns the trial steps
 * from step `from` on and leaves the tuner in t. */
static int tune(ThreadTuner *t, int max, int steps, int from, double (*step_ms)(int, int)) {
    tuner_init(t);
    t->max = t->n = max;
    int trials = 0;
    for (int step = 0; step < steps; step++) {
        tuner_begin(t);
        int used = t->trial ? t->trial : t->n;
        trials += t->trial && step >= from;
        tuner_record(t, step_ms(used, step) * 1e-3);  /* the step's time, not slept: exact */
    }
    tuner_done(t);
    return trials;
}
static double steady_best_at_2(int threads, int step) { (void)step; return 1 + abs(threads - 2); }
static double idle_2_threads(int threads, int step) { (void)step; return threads == 2 ? 2 : 4; }
static double busy_core(int threads, int step) {  /* 2 threads: every 3rd step waits 12 ms */
    return threads == 1 ? 3 : step % 3 == 0 ? 14 : 2;
}

/* Steady steps (an idle machine): no trial for TUNE_QUIET steps, then rare ones that still
 * find the fastest count; erratic steps (a busy core): trials at once, and the switch. */
static void test_thread_tuner(void) {
    ThreadTuner t;
    int late = tune(&t, 4, 1500, 1000, steady_best_at_2);
    check(t.n == 2 && late <= 2 * 2 * TUNE_TRIAL, "thread tuner, steady steps: from 4 threads it settles on the fastest count (now %d), "
          "%d trial steps in the last 500", t.n, late);
    int early = tune(&t, 2, 300, 0, idle_2_threads);
    check(t.n == 2 && early == 0, "thread tuner, idle: no trial in the first 300 steady steps (%d trial steps)", early);
    tune(&t, 2, TUNE_PERIOD, 0, busy_core);
    check(t.n == 1, "thread tuner, a busy core (erratic 2-thread steps): 1 thread after %d steps (now %d)", TUNE_PERIOD, t.n);
}

/* A script whose lines are "ok    ..." or "FAIL  ...": each line one check. */
static void script_checks(const char *script, const char *label) {
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "PYTHON=%s DSV2_BIN=%s %s", python, dsv2_bin, script);
    int code = run(cmd, NULL, 0), lines = 0;
    char *text = stdout_text();
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        int ok = !strncmp(line, "ok    ", 6), failed = !strncmp(line, "FAIL  ", 6);
        if (ok || failed) { check(ok, "%s", line + 6); lines++; }
    }
    check(code == 0 && lines > 0, "%s: %d checks, exit %d", label, lines, code);
    free(text);
}

/* q8 quality where it means something: the trained built-in model, q8 (export.py from the f32
 * file) against f32, over held-out text it never trained on (Revelation, tests/heldout.txt). */
/* Runs cmd (a -m eval -r ...) and reads its KL(reference || this), top-1 agreement and the two
 * perplexities; returns the exit status. */
static int eval_against(const char *cmd, double *kl, double *agree, double *ppl, double *ref_ppl) {
    int code = run(cmd, NULL, 0);
    char *text = stdout_text(), *kl_at = strstr(text, "KL(reference || this) mean "), *top_at = strstr(text, "top-1 agreement ");
    *kl = *agree = *ppl = *ref_ppl = NAN;
    if (kl_at) sscanf(kl_at, "KL(reference || this) mean %lf", kl);
    if (top_at) sscanf(top_at, "top-1 agreement %lf", agree);
    char *p = strstr(text, "perplexity "), *r = strstr(text, "reference: mean NLL");
    if (p) sscanf(p, "perplexity %lf", ppl);
    if (r && (r = strstr(r, "perplexity "))) sscanf(r, "perplexity %lf", ref_ppl);
    free(text);
    return code;
}

/* A quantized twin of the built-in model against its f32 original on the held-out text: KL and
 * top-1 within bounds. Measured when written: q8 KL 3.1e-4, top-1 99.1%; q4 (llama.cpp Q4_0's
 * rule, float32 scales) KL 0.0132, top-1 92.3%; the bounds leave room for another CPU's kernel,
 * not for a wrong one. */
static void test_quantized_quality(const char *dtype, double max_kl, double min_agree) {
    char path[512], cmd[2048], err[4096];
    snprintf(path, sizeof path, "%s/tiny-%s.bin", tmp_dir, dtype);
    snprintf(cmd, sizeof cmd, "%s export.py models/tiny/model.bin %s --dtype %s", python, path, dtype);
    int code = run(cmd, err, sizeof err);
    check(code == 0, "export.py models/tiny/model.bin --dtype %s (a dsv2 file into %s): exit %d %.*s", dtype, dtype, code,
          code ? (int)strcspn(err, "\n") : 0, err);
    snprintf(cmd, sizeof cmd, "%s %s -m eval -f tests/heldout.txt -r models/tiny/model.bin", dsv2_bin, path);
    double kl, agree, ppl, ref_ppl;
    code = eval_against(cmd, &kl, &agree, &ppl, &ref_ppl);
    check(code == 0 && kl < max_kl && agree >= min_agree, "built-in model, %s vs f32 on held-out text: KL(f32 || %s) %.2e nats/token, top-1 agreement %.2f%%, "
          "perplexity %.3f vs %.3f", dtype, dtype, kl, agree, ppl, ref_ppl);
}

/* export.py q8 or q4 -> f32 (for q8 what the GPU's q8 is checked against: the weights' exact
 * values, with float activations): every weight of every matrix checked equals what the
 * quantized file holds (int8 or nibble x its group's scale, dsv2.c's mat_row_to_f32), bit for
 * bit; a quantized file is not quantized again. */
static void test_dequantized(const char *dtype) {
    char quantized[512], f32[512], cmd[2048], err[4096];
    snprintf(quantized, sizeof quantized, "%s/tiny-%s.bin", tmp_dir, dtype);
    snprintf(f32, sizeof f32, "%s/tiny-%s-dequantized.bin", tmp_dir, dtype);
    snprintf(cmd, sizeof cmd, "%s export.py %s %s --dtype f32", python, quantized, f32);
    int code = run(cmd, err, sizeof err);
    check(code == 0, "export.py %s.bin OUT --dtype f32 (dequantized): exit %d %.*s", dtype, code, code ? (int)strcspn(err, "\n") : 0, err);
    if (code) return;
    Weights a, b;
    memset(&a, 0, sizeof a); memset(&b, 0, sizeof b);
    load_weights(&a, quantized, WEIGHTS_MMAP);
    load_weights(&b, f32, WEIGHTS_MMAP);
    size_t differ = 0, total = 0;
    const Mat *pairs[][2] = {{&a.embed, &b.embed}, {&a.lm_head, &b.lm_head}, {&a.layers[1].expert_down[3], &b.layers[1].expert_down[3]},
                             {&a.layers[0].kv_b_proj, &b.layers[0].kv_b_proj}, {&a.layers[1].mlp_up, &b.layers[1].mlp_up}};
    for (size_t m = 0; m < sizeof pairs / sizeof *pairs; m++) {
        const Mat *Q = pairs[m][0], *F = pairs[m][1];
        float *row = floats(Q->cols);
        for (int r = 0; r < Q->rows; r++) {
            mat_row_to_f32(row, Q, r);
            for (int c = 0; c < Q->cols; c++, total++) {
                size_t i = (size_t)r * Q->cols + c;
                int q = Q->dtype == DTYPE_Q8 ? ((const int8_t *)Q->data)[i] : q4_at(Q->data, i, Q->group);
                float want = q * Q->scale[i / Q->group];
                differ += ((const float *)F->data)[i] != want || row[c] != want;
            }
        }
        free(row);
    }
    check(total > 0 && differ == 0 && b.cfg.dtype == DTYPE_F32, "%s dequantized to f32: %zu of %zu weights (embedding, lm_head, an expert, kv_b, shared experts) differ from q x scale",
          dtype, differ, total);
    free_weights(&a);
    free_weights(&b);
    snprintf(cmd, sizeof cmd, "%s export.py %s %s.again --dtype q8", python, quantized, quantized);
    code = run(cmd, err, sizeof err);
    check(code == 1 && strstr(err, "already"), "export.py %s.bin OUT --dtype q8: refused, exit %d", dtype, code);
}

/* -k: the latent cache in bf16 or q8 against the exact f32 cache, on the held-out text. The KL
 * must be small and above 0 (the cache type changed something). */
static void test_cache_types(void) {
    const char *types[] = {"bf16", "q8"};
    const double max_kl[] = {0.001, 0.002};
    char cmd[2048], err[4096];
    for (int k = 0; k < 2; k++) {
        snprintf(cmd, sizeof cmd, "%s models/tiny/model.bin -m eval -f tests/heldout.txt -k %s -r models/tiny/model.bin", dsv2_bin, types[k]);
        double kl, agree, ppl, ref_ppl;
        int code = eval_against(cmd, &kl, &agree, &ppl, &ref_ppl);
        check(code == 0 && kl > 0 && kl < max_kl[k] && agree >= 98.0, "built-in model, -k %s cache vs f32 on held-out text: KL %.2e nats/token (< %g), "
              "top-1 agreement %.2f%%, perplexity %.3f vs %.3f", types[k], kl, max_kl[k], agree, ppl, ref_ppl);
    }
    snprintf(cmd, sizeof cmd, "%s models/tiny/model.bin -i hi -n 1 -k q8 -a naive", dsv2_bin);
    int code = run(cmd, err, sizeof err);
    check(code == 1 && strstr(err, "dsv2: error: -k") && !strchr(strchr(err, '\n') + 1, '\n'), "-k q8 with -a naive: exit %d, one error line", code);
}

/* bf16 rounds to nearest even, as torch and export.py do; NaN and infinities survive. */
static void test_bf16_round_to_even(void) {
    float in[] = {1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, -1.0f - 0x1p-9f, INFINITY, NAN, 3.0e38f};
    uint16_t want[] = {0x3f80, 0x3f82, 0xbf80, 0x7f80, 0, 0x7f62};
    int ok = 1;
    for (int i = 0; i < 6; i++) {
        uint16_t b = f32_to_bf16(in[i]);
        ok &= isnan(in[i]) ? isnan(bf16_to_f32(b)) : b == want[i];
    }
    check(ok, "f32 -> bf16 rounds to nearest even (ties to even up and down), NaN stays NaN, inf stays inf");
}

/* ------------------------------------------------------------------------- */
/* Training checks: losses, gradients and AdamW steps against train.bin.      */
/* ------------------------------------------------------------------------- */

static double meta_value(const char *dir, const char *key) {
    char path[512], line[512];
    snprintf(path, sizeof path, "%s/meta.txt", dir);
    FILE *f = fopen(path, "r");
    double v = NAN;
    size_t n = strlen(key);
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, key, n) && line[n] == ' ') v = atof(line + n + 1);
    if (f) fclose(f);
    return v;
}

/* The fixture's tensors named PREFIX<hf name> as a Hugging Face folder, converted by export.py:
 * they land in exactly the layout of our parameters. Returns the file's bytes (NULL on failure). */
static char *reference_as_checkpoint(const char *dir, const char *prefix, size_t *size) {
    char folder[512], path[600], line[1024], cmd[2048];
    snprintf(folder, sizeof folder, "%s/ref_%s", tmp_dir, prefix);
    snprintf(cmd, sizeof cmd, "rm -rf %s && mkdir -p %s && cp %s/config.json %s/", folder, folder, dir, folder);
    if (run(cmd, NULL, 0) != 0) return NULL;
    snprintf(path, sizeof path, "%s/manifest.txt", dir);
    FILE *m = fopen(path, "r");
    if (!m) return NULL;
    char *json = xcalloc(1 << 20, 1);
    size_t json_n = 0, data_n = 0, plen = strlen(prefix);
    char **names = NULL;
    long *counts = NULL;
    int n = 0;
    strcat(json, "{");
    json_n = 1;
    while (fgets(line, sizeof line, m)) {
        char name[256];
        if (line[0] == '#' || sscanf(line, "%255s", name) != 1 || strncmp(name, prefix, plen)) continue;
        RefTensor t;
        if (!find_ref(dir, name, &t)) continue;
        long count = ref_count(&t);
        json_n += snprintf(json + json_n, (1 << 20) - json_n, "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[", n ? "," : "", name + plen);
        for (int d = 0; d < t.ndim; d++) json_n += snprintf(json + json_n, (1 << 20) - json_n, "%s%ld", d ? "," : "", t.dims[d]);
        json_n += snprintf(json + json_n, (1 << 20) - json_n, "],\"data_offsets\":[%zu,%zu]}", data_n, data_n + count * 4);
        data_n += count * 4;
        names = realloc(names, (n + 1) * sizeof(char *));
        counts = realloc(counts, (n + 1) * sizeof(long));
        names[n] = strdup(name);
        counts[n++] = count;
    }
    fclose(m);
    json_n += snprintf(json + json_n, (1 << 20) - json_n, "}");
    while (json_n % 8) json[json_n++] = ' ';
    snprintf(path, sizeof path, "%s/model.safetensors", folder);
    FILE *f = fopen(path, "wb");
    uint64_t header = json_n;
    fwrite(&header, 8, 1, f);
    fwrite(json, 1, json_n, f);
    for (int i = 0; i < n; i++) {
        RefTensor t;
        float *data = find_ref(dir, names[i], &t) ? load_ref(dir, names[i], &t) : NULL;
        if (data) fwrite(data, 4, counts[i], f);
        free(data);
        free(names[i]);
    }
    fclose(f);
    free(names); free(counts); free(json);
    snprintf(path, sizeof path, "%s/ref.bin", folder);
    snprintf(cmd, sizeof cmd, "%s export.py %s %s --dtype f32", python, folder, path);
    if (run(cmd, NULL, 0) != 0) return NULL;
    return read_file(path, size);
}

/* Per tensor: max |ours - ref| / max |ref| (relative), or max |ours - ref| (absolute). With
 * grad_ref (absolute mode), elements whose reference gradient is below 100 * eps are left out of
 * the result and their largest difference goes to *tiny_worst instead (AdamW amplifies float32
 * noise there, up to lr: see the fixtures' README). With grad_now as well (step 2, our gradient
 * at theta1), so are elements whose two gradients are both below 1e-3 of the tensor's largest:
 * AdamW divides by their root mean square, so the gradient's float32 noise (about 1e-6 of the
 * largest) moves them by up to lr times a few percent. */
static double worst_tensor_error(const Params *p, const float *ours, const char *ref_file, int relative, int *worst_index,
                                 const char *grad_ref, const float *grad_now, double eps, double *tiny_worst, int *n_tiny) {
    double worst = 0;
    for (int i = 0; i < p->n_tensors; i++) {
        const float *a = (const float *)((const char *)ours - HEADER_SIZE + p->tensors[i].offset);
        const float *b = (const float *)(ref_file + p->tensors[i].offset);
        const float *g = grad_ref ? (const float *)(grad_ref + p->tensors[i].offset) : NULL;
        const float *g1 = grad_now ? (const float *)((const char *)grad_now - HEADER_SIZE + p->tensors[i].offset) : NULL;
        size_t n = p->tensors[i].bytes / 4;
        double max_diff = 0, max_ref = 0, g1_max = 0;
        for (size_t k = 0; g1 && k < n; k++) g1_max = fmax(g1_max, fabs(g1[k]));
        for (size_t k = 0; k < n; k++) {
            double d = fabs(a[k] - b[k]);
            int noisy = g && (fabs(g[k]) < 100 * eps || (g1 && fmax(fabs(g[k]), fabs(g1[k])) < 1e-3 * g1_max));
            if (noisy) { *tiny_worst = fmax(*tiny_worst, d); (*n_tiny)++; continue; }
            max_diff = fmax(max_diff, d);
            max_ref = fmax(max_ref, fabs(b[k]));
        }
        double e = relative ? (max_ref > 0 ? max_diff / max_ref : max_diff) : max_diff;
        if (!(e <= worst)) { worst = e; *worst_index = i; }
    }
    return worst;
}

static void check_training(const char *dir, const char *model_path) {
    RefTensor ti, tt, tl;
    int *inputs = load_ref(dir, "train.inputs", &ti), *targets = load_ref(dir, "train.targets", &tt);
    if (!inputs || !targets) { free(inputs); free(targets); return; }
    int B = (int)ti.dims[0], T = (int)ti.dims[1];
    Params p, g;
    params_load(&p, model_path);
    params_init(&g, &p.cfg);
    TrainState ts;
    train_state_init(&ts, &p.cfg, B, T);
    RunState rs;
    init_run_state(&rs, &p.cfg, ATTN_ABSORB, T);
    AdamW opt = {(float)meta_value(dir, "train.lr"), (float)meta_value(dir, "train.beta1"), (float)meta_value(dir, "train.beta2"),
                 (float)meta_value(dir, "train.eps"), (float)meta_value(dir, "train.weight_decay")};
    size_t n = params_count(&p);
    float *m = xcalloc(n, 4), *v = xcalloc(n, 4);
    char *grad_ref = NULL;  /* the reference gradient at step 0, in our layout (with its header) */
    for (int step = 0; step <= 2; step++) {
        double total = train_forward(&p, &ts, &rs, inputs, targets);
        char name[64];
        snprintf(name, sizeof name, "train.step%d.loss.ce", step);
        float *ce = load_ref(dir, name, &tl);
        snprintf(name, sizeof name, "train.step%d.loss.aux", step);
        float *aux = load_ref(dir, name, &tl);
        int n_aux = aux ? (int)tl.dims[0] : 0, k = 0;
        double aux_err = 0;
        for (int l = 0; l < p.cfg.num_hidden_layers; l++)
            if (p.w.layers[l].is_moe && k < n_aux) aux_err = fmax(aux_err, fabs(ts.aux[l] - aux[k++]));
        snprintf(name, sizeof name, "train.step%d.loss.total", step);
        float *tot = load_ref(dir, name, &tl);
        /* at theta1 and theta2 our parameters carry AdamW's amplified float32 noise (see below) */
        double tol = step == 0 ? 1e-5 : 5e-5;
        if (ce && tot)
            check(fabs(ts.ce - ce[0]) < tol && aux_err < tol && k == n_aux && fabs(total - tot[0]) < tol,
                  "%s: training loss at step %d: CE %.6f (ref %.6f), balance loss max diff %.1e, total %.6f (ref %.6f), tolerance %.0e", dir, step,
                  ts.ce, ce[0], aux_err, total, tot[0], tol);
        free(ce); free(aux); free(tot);
        if (step == 2) break;
        memset(params_data(&g), 0, n * 4);
        train_backward(&p, &g, &ts, &rs, inputs, targets);
        if (step == 0) {
            size_t size = 0;
            grad_ref = reference_as_checkpoint(dir, "grad.", &size);
            if (!grad_ref || size < p.size) { check(0, "%s: reference gradients", dir); break; }
            int worst_i = -1, n_tiny = 0;
            double tiny = 0, e = worst_tensor_error(&p, params_data(&g), grad_ref, 1, &worst_i, NULL, NULL, 0, &tiny, &n_tiny);
            check(e <= 1e-4, "%s: grad of every parameter at step 0 (CE + balance loss), worst max|d|/max|g| %.1e (tensor #%d)", dir, e, worst_i);
            /* the optimizer alone: our AdamW on the reference gradient */
            Params exact;
            params_init(&exact, &p.cfg);
            memcpy(params_data(&exact), params_data(&p), n * 4);
            float *m0 = xcalloc(n, 4), *v0 = xcalloc(n, 4);
            Params ref_g = g;
            ref_g.buf = grad_ref;
            adamw_step(&exact, &ref_g, m0, v0, &opt, 1);
            char *step1 = reference_as_checkpoint(dir, "step1.", &size);
            e = step1 ? worst_tensor_error(&p, params_data(&exact), step1, 0, &worst_i, NULL, NULL, 0, &tiny, &n_tiny) : 1e9;
            check(e <= 1e-6, "%s: AdamW step on the reference gradient equals torch's (max |d| %.1e)", dir, e);
            free(step1); free(m0); free(v0);
            params_free(&exact);
        }
        adamw_step(&p, &g, m, v, &opt, step + 1);
        size_t size = 0;
        snprintf(name, sizeof name, "step%d.", step + 1);
        char *ref = reference_as_checkpoint(dir, name, &size);
        int worst_i = -1, n_tiny = 0;
        double tiny = 0;
        double e = ref && size >= p.size ? worst_tensor_error(&p, params_data(&p), ref, 0, &worst_i, grad_ref, step ? params_data(&g) : NULL, opt.eps, &tiny, &n_tiny) : 1e9;
        /* step 2 also carries step 1's differences and float32 noise in the gradient at theta1 */
        double tolerance = step == 0 ? 1e-5 : 5e-5;
        check(e <= tolerance && tiny <= opt.lr, "%s: parameters after AdamW step %d: max |d| %.1e (<= %.0e) where |g| >= 100 eps%s; %.1e (<= lr) on the %d other elements",
              dir, step + 1, e, tolerance, step ? " and >= 1e-3 of the tensor's largest" : "", tiny, n_tiny);
        free(ref);
    }
    free(grad_ref);
    free(m); free(v); free(inputs); free(targets);
    free_run_state(&rs);
    train_state_free(&ts, &p.cfg);
    params_free(&p);
    params_free(&g);
}

static int weights_are_bf16(const char *dir) {
    char path[512], line[256];
    snprintf(path, sizeof path, "%s/meta.txt", dir);
    FILE *f = fopen(path, "r");
    int bf16 = 0;
    while (f && fgets(line, sizeof line, f)) if (!strncmp(line, "weights_dtype BF16", 18)) bf16 = 1;
    if (f) fclose(f);
    return bf16;
}

static void test_tokenizer_dir(const char *dir);

static void test_fixture_dir(const char *dir) {
    printf("%s\n", dir);
    char path[512];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    if (access(path, R_OK) == 0) test_tokenizer_dir(dir);
    RefTensor t;
    if (!find_ref(dir, "logits", &t)) return;
    char model[512];
    snprintf(model, sizeof model, "%s/model.bin", tmp_dir);
    /* f32 weights are checked as f32; bf16 weights both as stored and widened to f32 */
    const char *flags[] = {"--dtype f32", "", NULL};
    int n = weights_are_bf16(dir) ? 2 : 1;
    for (int i = 0; i < n && flags[i]; i++) {
        if (!export_model(dir, model, flags[i])) continue;
        Weights w;
        memset(&w, 0, sizeof w);
        load_weights(&w, model, WEIGHTS_MMAP);
        const char *label = w.cfg.dtype == DTYPE_BF16 ? "bf16" : "f32";
        free_weights(&w);
        if (i == 0) {
            check_internals(dir, model);
            check_training(dir, model);
            check_trace(dir, model);
            check_eval(dir, model);
            check_layers(dir, model, 1);
        }
        check_cli(dir, model, label);
    }
    if (export_model(dir, model, "--dtype q8")) {
        check_q8(dir, model);
        check_layers(dir, model, 0);
    }
}

/* ------------------------------------------------------------------------- */
/* Tokenizer fixtures: cases.txt / decode_cases.txt / llamacpp_cases.txt /    */
/* pretok_cases.txt next to a tokenizer.json (format in their README).        */
/* ------------------------------------------------------------------------- */

typedef struct {
    char name[256];
    char *text, *decode, *decode_skip, *ids;  /* text fields unescaped; ids as written */
    size_t text_len, decode_len, decode_skip_len;
    int has_text, has_ids, has_decode, has_decode_skip;
    char **pieces;
    size_t *piece_len;
    int n_pieces;
} TokCase;

/* Undoes the case files' escapes: \\ \n \r \t \xHH. */
static char *unescape(const char *s, size_t *len) {
    size_t n = strlen(s), k = 0;
    char *out = xcalloc(n + 1, 1);
    for (size_t i = 0; i < n; i++) {
        if (s[i] != '\\' || i + 1 >= n) { out[k++] = s[i]; continue; }
        char e = s[++i];
        if (e == 'n') out[k++] = '\n';
        else if (e == 'r') out[k++] = '\r';
        else if (e == 't') out[k++] = '\t';
        else if (e == 'x' && i + 2 < n + 1) { char hex[3] = {s[i + 1], s[i + 2], 0}; out[k++] = (char)strtol(hex, NULL, 16); i += 2; }
        else out[k++] = e;
    }
    *len = k;
    return out;
}

static void free_case(TokCase *c) {
    free(c->text); free(c->decode); free(c->decode_skip); free(c->ids);
    for (int i = 0; i < c->n_pieces; i++) free(c->pieces[i]);
    free(c->pieces); free(c->piece_len);
    memset(c, 0, sizeof *c);
}

/* Reads the next record; returns 0 at the end of the file. */
static int next_case(FILE *f, TokCase *c) {
    static char line[1 << 20];
    memset(c, 0, sizeof *c);
    int any = 0;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        if (line[0] == '#') continue;
        if (line[0] == '\0') { if (any) return 1; continue; }
        any = 1;
        char *sp = strchr(line, ' ');
        const char *payload = sp ? sp + 1 : "";
        if (sp) *sp = '\0';
        if (!strcmp(line, "case")) snprintf(c->name, sizeof c->name, "%s", payload);
        else if (!strcmp(line, "text")) { c->text = unescape(payload, &c->text_len); c->has_text = 1; }
        else if (!strcmp(line, "ids")) { c->ids = strdup(payload); c->has_ids = 1; }
        else if (!strcmp(line, "decode")) { c->decode = unescape(payload, &c->decode_len); c->has_decode = 1; }
        else if (!strcmp(line, "decode_skip")) { c->decode_skip = unescape(payload, &c->decode_skip_len); c->has_decode_skip = 1; }
        else if (!strcmp(line, "piece")) {
            c->pieces = realloc(c->pieces, (c->n_pieces + 1) * sizeof(char *));
            c->piece_len = realloc(c->piece_len, (c->n_pieces + 1) * sizeof(size_t));
            c->pieces[c->n_pieces] = unescape(payload, &c->piece_len[c->n_pieces]);
            c->n_pieces++;
        }
    }
    return any;
}

static void write_bytes(const char *path, const char *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) die("cannot write %s", path);
    if (n) fwrite(data, 1, n, f);
    fclose(f);
}

static int same_ids(const char *a, const char *b) {  /* compares two id lists, ignoring spacing */
    for (;;) {
        while (*a == ' ' || *a == '\n') a++;
        while (*b == ' ' || *b == '\n') b++;
        if (!*a || !*b) return !*a && !*b;
        char *ea, *eb;
        long x = strtol(a, &ea, 10), y = strtol(b, &eb, 10);
        if (ea == a || eb == b || x != y) return 0;
        a = ea; b = eb;
    }
}

/* Encode and decode every case through the CLI; decode_skip in-process. */
static void check_token_cases(const char *dir, const char *file, const char *tok_path, Tokenizer *tok) {
    char path[512], in_path[512], out_path[512], cmd[2048];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    FILE *f = fopen(path, "r");
    if (!f) return;
    snprintf(in_path, sizeof in_path, "%s/case.in", tmp_dir);
    snprintf(out_path, sizeof out_path, "%s/case.out", tmp_dir);
    int n = 0, enc_ok = 0, dec_ok = 0, skip_ok = 0, n_enc = 0, n_dec = 0, n_skip = 0;
    TokCase c;
    while (next_case(f, &c)) {
        n++;
        if (c.has_text && c.has_ids) {
            n_enc++;
            write_bytes(in_path, c.text, c.text_len);
            snprintf(cmd, sizeof cmd, "%s %s -m encode -f %s", dsv2_bin, tok_path, in_path);
            int code = run(cmd, NULL, 0);
            char *got = stdout_text();
            if (code == 0 && same_ids(got, c.ids)) enc_ok++;
            else printf("  encode mismatch in %s case %s\n    want %.200s\n    got  %.200s\n", file, c.name, c.ids, got);
            free(got);
        }
        if (c.has_ids && c.has_decode) {
            n_dec++;
            write_bytes(in_path, c.ids, strlen(c.ids));
            snprintf(cmd, sizeof cmd, "%s %s -m decode -f %s -o %s", dsv2_bin, tok_path, in_path, out_path);
            size_t len = 0;
            char *got = run(cmd, NULL, 0) == 0 ? read_file(out_path, &len) : NULL;
            if (got && len == c.decode_len && !memcmp(got, c.decode, len)) dec_ok++;
            else printf("  decode mismatch in %s case %s\n", file, c.name);
            free(got);
        }
        if (c.has_ids && c.has_decode_skip) {
            n_skip++;
            int k = 0, *ids = parse_ids(c.ids, 1 << 30, &k);
            TextSink sink = {0};
            for (int i = 0; i < k; i++) decode_token(tok, &sink, ids[i], 1);
            sink_flush(&sink);
            if (sink.n == c.decode_skip_len && (sink.n == 0 || !memcmp(sink.buf, c.decode_skip, sink.n))) skip_ok++;
            else printf("  decode_skip mismatch in %s case %s\n", file, c.name);
            free(sink.buf);
            free(ids);
        }
        free_case(&c);
    }
    fclose(f);
    if (n_enc) check(enc_ok == n_enc, "%s %s: ./dsv2 -m encode gives the reference ids in %d/%d cases", dir, file, enc_ok, n_enc);
    if (n_dec) check(dec_ok == n_dec, "%s %s: ./dsv2 -m decode gives the reference bytes in %d/%d cases", dir, file, dec_ok, n_dec);
    if (n_skip) check(skip_ok == n_skip, "%s %s: decode with specials skipped in %d/%d cases", dir, file, skip_ok, n_skip);
}

static void check_pretok_cases(const char *dir, Tokenizer *tok) {
    char path[512];
    snprintf(path, sizeof path, "%s/pretok_cases.txt", dir);
    FILE *f = fopen(path, "r");
    if (!f) return;
    int n = 0, ok = 0;
    TokCase c;
    while (next_case(f, &c)) {
        if (!c.has_text) { free_case(&c); continue; }
        n++;
        uint32_t *cps = xcalloc(c.text_len + 1, sizeof(uint32_t)), cp[2];
        size_t *offset = xcalloc(c.text_len + 2, sizeof(size_t));
        int m = 0;
        Utf8Decoder d = {0};
        for (size_t i = 0; i < c.text_len; i++)
            if (utf8_feed(&d, (uint8_t)c.text[i], cp)) { cps[m++] = cp[0]; offset[m] = i + 1; }
        int *pieces, count = pretokenize(tok, cps, m, &pieces), same = count == c.n_pieces;
        for (int k = 0; same && k < count; k++) {
            size_t a = offset[pieces[2 * k]], b = offset[pieces[2 * k + 1]];
            same = b - a == c.piece_len[k] && !memcmp(c.text + a, c.pieces[k], b - a);
        }
        if (same) ok++;
        else printf("  pre-tokenizer mismatch in case %s (%d pieces, want %d)\n", c.name, count, c.n_pieces);
        free(pieces); free(cps); free(offset);
        free_case(&c);
    }
    fclose(f);
    check(ok == n, "%s: pre-tokenizer pieces identical in %d/%d cases", dir, ok, n);
}

/* The chat layout documented for each template, and its ids for the V2 example. */
static void check_chat_template(const char *dir, Tokenizer *tok) {
    if (tok->chat_template == CHAT_NONE) return;
    char bos[64] = "", want1[512], want2[512], want3[512];
    if (tok->bos_id >= 0 && tok->len[tok->bos_id] < sizeof bos) memcpy(bos, tok->bytes[tok->bos_id], tok->len[tok->bos_id]);
    char *t1 = render_chat_turn(tok, NULL, "Hello", 1), *t2 = render_chat_turn(tok, "Be brief.", "Hi", 1);
    char *t3 = render_chat_turn(tok, "Be brief.", "More?", 0);
    if (tok->chat_template == CHAT_DEEPSEEK_V2) {
        snprintf(want1, sizeof want1, "%sUser: Hello\n\nAssistant:", bos);
        snprintf(want2, sizeof want2, "%sBe brief.\n\nUser: Hi\n\nAssistant:", bos);
        snprintf(want3, sizeof want3, "User: More?\n\nAssistant:");
    } else {
        snprintf(want1, sizeof want1, "%s<\xEF\xBD\x9CUser\xEF\xBD\x9C>Hello<\xEF\xBD\x9C" "Assistant\xEF\xBD\x9C>", bos);
        snprintf(want2, sizeof want2, "%sBe brief.<\xEF\xBD\x9CUser\xEF\xBD\x9C>Hi<\xEF\xBD\x9C" "Assistant\xEF\xBD\x9C>", bos);
        snprintf(want3, sizeof want3, "<\xEF\xBD\x9CUser\xEF\xBD\x9C>More?<\xEF\xBD\x9C" "Assistant\xEF\xBD\x9C>");
    }
    check(!strcmp(t1, want1) && !strcmp(t2, want2) && !strcmp(t3, want3),
          "%s: chat template (%s) renders first turn, system prompt and later turns as documented", dir,
          tok->chat_template == CHAT_DEEPSEEK_V2 ? "DeepSeek-V2" : "DeepSeek-V3");
    IdList two = {0};  /* two turns as chat() feeds them: BOS once, at the start */
    tokenizer_encode(tok, t2, strlen(t2), 0, &two);
    ids_push(&two, tok->eos_id);
    tokenizer_encode(tok, t3, strlen(t3), 0, &two);
    int bos_count = 0;
    for (int i = 0; i < two.n; i++) bos_count += two.ids[i] == tok->bos_id;
    check(bos_count == 1 && two.ids[0] == tok->bos_id, "%s: a two-turn chat holds BOS once, first (%d)", dir, bos_count);
    free(two.ids);
    if (tok->chat_template == CHAT_DEEPSEEK_V2 && tok->n_ids > 100000) {
        IdList ids = {0};
        tokenizer_encode(tok, t1, strlen(t1), 0, &ids);
        char got[256] = "";
        for (int i = 0; i < ids.n && strlen(got) < 200; i++) snprintf(got + strlen(got), sizeof got - strlen(got), "%s%d", i ? " " : "", ids.ids[i]);
        check(!strcmp(got, "100000 5726 25 37727 185 185 77398 25"), "%s: chat prompt ids, BOS once, no space after Assistant: (%s)", dir, got);
        free(ids.ids);
    }
    free(t1); free(t2); free(t3);
}

/* Random strings from the characters of the fixture texts (the same scripts, new sequences):
 * decode(encode(x)) must give x back byte for byte. V2's 13 single-character added tokens decode
 * to U+FFFD by design (as HF does), so they are left out of the alphabet. */
static void check_roundtrip_random(const char *dir, Tokenizer *tok) {
    char path[512];
    snprintf(path, sizeof path, "%s/cases.txt", dir);
    FILE *f = fopen(path, "r");
    if (!f) return;
    uint32_t *alphabet = xcalloc(1 << 20, sizeof(uint32_t));
    int n_alpha = 0;
    TokCase c;
    while (next_case(f, &c)) {
        Utf8Decoder d = {0};
        uint32_t cp[2];
        for (size_t i = 0; c.has_text && i < c.text_len && n_alpha < (1 << 20); i++)
            if (utf8_feed(&d, (uint8_t)c.text[i], cp) == 1 && cp[0] != 0xFFFD) {
                int quirk = 0;  /* V2's 13 single-character added tokens */
                const uint32_t odd[13] = {0xF8, 0xF6, 0xFA, 0xFF, 0xF5, 0xF7, 0xFB, 0xFD, 0xC0, 0xF9, 0xC1, 0xFE, 0xFC};
                for (int k = 0; k < 13; k++) quirk |= cp[0] == odd[k];
                if (!quirk && cp[0] != '<' && cp[0] != 0xFF5C) alphabet[n_alpha++] = cp[0];  /* no special-token text */
            }
        free_case(&c);
    }
    fclose(f);
    int ok = 0, trials = 200;
    char *text = xcalloc(4 * 400 + 1, 1);
    for (int trial = 0; trial < trials; trial++) {
        size_t len = 0;
        int chars = 1 + (int)(random_u32(&test_rng) % 300);
        for (int k = 0; k < chars; k++) {  /* runs of neighbouring characters keep words, numbers and scripts together */
            int at = (int)(random_u32(&test_rng) % n_alpha), run = 1 + (int)(random_u32(&test_rng) % 8);
            for (int r = 0; r < run && at + r < n_alpha && len + 4 < 4 * 400; r++, k++) len += utf8_encode(alphabet[at + r], text + len);
        }
        IdList ids = {0};
        tokenizer_encode(tok, text, len, 0, &ids);
        TextSink sink = {0};
        for (int i = 0; i < ids.n; i++) decode_token(tok, &sink, ids.ids[i], 0);
        sink_flush(&sink);
        ok += sink.n == len && (len == 0 || !memcmp(sink.buf, text, len));
        free(sink.buf);
        free(ids.ids);
    }
    check(ok == trials, "%s: %d/%d random strings from the fixtures' characters survive encode -> decode", dir, ok, trials);
    free(text);
    free(alphabet);
}

static void test_tokenizer_dir(const char *dir) {
    char json[512], tok_path[512], cmd[2048], err[4096];
    snprintf(json, sizeof json, "%s/tokenizer.json", dir);
    snprintf(tok_path, sizeof tok_path, "%s/tokenizer.tok", tmp_dir);
    snprintf(cmd, sizeof cmd, "%s export.py --tokenizer %s %s", python, json, tok_path);
    int code = run(cmd, err, sizeof err);
    check(code == 0, "export.py --tokenizer %s -> exit %d %.*s", json, code, code ? (int)strcspn(err, "\n") : 0, err);
    if (code) return;
    Tokenizer tok;
    load_tokenizer_file(&tok, tok_path, NULL);
    check_pretok_cases(dir, &tok);
    check_chat_template(dir, &tok);
    check_roundtrip_random(dir, &tok);
    const char *files[] = {"cases.txt", "decode_cases.txt", "llamacpp_cases.txt"};
    for (int i = 0; i < 3; i++) check_token_cases(dir, files[i], tok_path, &tok);
    free_tokenizer(&tok);
}

/* ------------------------------------------------------------------------- */
/* Bad inputs: one error line, exit 1, never a crash.                         */
/* ------------------------------------------------------------------------- */

static void copy_prefix(const char *from, const char *to, size_t bytes, long patch_at, const void *patch, size_t patch_len) {
    size_t size = 0;
    char *data = read_file(from, &size);
    if (bytes > size) bytes = size;
    if (patch) memcpy(data + patch_at, patch, patch_len);
    FILE *f = fopen(to, "wb");
    fwrite(data, 1, bytes, f);
    fclose(f);
    free(data);
}

static void test_bad_inputs(const char *fixture) {
    printf("bad inputs\n");
    char model[512], bad[512], cmd[4096], dir[512];
    snprintf(model, sizeof model, "%s/good.bin", tmp_dir);
    snprintf(bad, sizeof bad, "%s/bad.bin", tmp_dir);
    if (!export_model(fixture, model, "")) return;
    size_t size = 0;
    free(read_file(model, &size));

    copy_prefix(model, bad, size - 100, 0, NULL, 0);
    snprintf(cmd, sizeof cmd, "%s %s -i 1", dsv2_bin, bad);
    expect_clean_error("truncated checkpoint", cmd, "truncated");
    copy_prefix(model, bad, 300, 0, NULL, 0);
    expect_clean_error("checkpoint cut inside the header", cmd, NULL);
    copy_prefix(model, bad, size, 0, "GGUF", 4);
    expect_clean_error("wrong magic", cmd, "magic");
    uint32_t version = 99;
    copy_prefix(model, bad, size, 4, &version, 4);
    expect_clean_error("wrong version", cmd, "version");
    int32_t zero = 0;
    copy_prefix(model, bad, size, offsetof(Config, hidden_size), &zero, 4);
    expect_clean_error("config out of range (hidden_size 0)", cmd, "hidden_size");
    int32_t topk = 7;
    copy_prefix(model, bad, size, offsetof(Config, topk_method), &topk, 4);
    expect_clean_error("unknown topk_method in the header", cmd, "topk_method");
    snprintf(cmd, sizeof cmd, "%s %s/model.safetensors -i 1", dsv2_bin, fixture);
    expect_clean_error("a safetensors file instead of a dsv2 checkpoint", cmd, "magic");
    snprintf(cmd, sizeof cmd, "%s %s/no-such-model.bin -i 1", dsv2_bin, tmp_dir);
    expect_clean_error("missing model file", cmd, "cannot open");
    snprintf(cmd, sizeof cmd, "%s %s -i \"1 2 99999\"", dsv2_bin, model);
    expect_clean_error("token id >= vocab_size", cmd, "out of range");
    snprintf(cmd, sizeof cmd, "%s %s -i \"1 -2\"", dsv2_bin, model);
    expect_clean_error("negative token id", cmd, "out of range");
    snprintf(cmd, sizeof cmd, "%s %s -i \"1 two 3\"", dsv2_bin, model);
    expect_clean_error("non-numeric token id", cmd, "integers");
    snprintf(cmd, sizeof cmd, "%s %s -c 4 -i \"1 2 3 4 5\"", dsv2_bin, model);
    expect_clean_error("more prompt tokens than the context", cmd, "context");
    snprintf(cmd, sizeof cmd, "%s %s -m logits -c 4 -i \"1 2 3 4 5\" -o %s/x.bin", dsv2_bin, model, tmp_dir);
    expect_clean_error("logits mode: more tokens than the context", cmd, "context");
    snprintf(cmd, sizeof cmd, "%s %s -c 100000000", dsv2_bin, model);
    expect_clean_error("context beyond max_position_embeddings", cmd, NULL);
    snprintf(cmd, sizeof cmd, "%s %s -m logits -f %s/no-such-ids.txt -o %s/x.bin", dsv2_bin, model, tmp_dir, tmp_dir);
    expect_clean_error("missing prompt file", cmd, "cannot open");
    snprintf(cmd, sizeof cmd, "%s %s -a fast", dsv2_bin, model);
    expect_clean_error("unknown attention mode", cmd, "absorb or naive");
    snprintf(cmd, sizeof cmd, "%s %s -m logits -i \"\" -o %s/x.bin", dsv2_bin, model, tmp_dir);
    expect_clean_error("empty id list", cmd, NULL);

    /* tokenizers */
    char tok[512];
    snprintf(tok, sizeof tok, "%s/v2.tok", tmp_dir);
    snprintf(cmd, sizeof cmd, "%s export.py --tokenizer tests/fixtures/tokenizer/tokenizer.json %s", python, tok);
    if (run(cmd, NULL, 0) == 0) {
        char bad_text[512];
        snprintf(bad_text, sizeof bad_text, "%s/bad.txt", tmp_dir);
        write_bytes(bad_text, "ok \xC3\x28 bad", 9);
        snprintf(cmd, sizeof cmd, "%s %s -m encode -f %s", dsv2_bin, tok, bad_text);
        expect_clean_error("invalid UTF-8 to encode", cmd, "UTF-8");
        write_bytes(bad_text, "cut \xE4\xB8", 6);
        expect_clean_error("UTF-8 cut inside a character", cmd, "UTF-8");
        snprintf(cmd, sizeof cmd, "printf '' > %s/empty.txt && %s %s -m encode -f %s/empty.txt", tmp_dir, dsv2_bin, tok, tmp_dir);
        char *out = NULL;
        int code = run(cmd, NULL, 0);
        out = stdout_text();
        check(code == 0 && !strcmp(out, "\n"), "empty input encodes to no ids");
        free(out);
        size_t tok_size = 0;
        free(read_file(tok, &tok_size));
        copy_prefix(tok, bad, tok_size / 2, 0, NULL, 0);
        snprintf(cmd, sizeof cmd, "%s %s -m encode -i hello", dsv2_bin, bad);
        expect_clean_error("truncated tokenizer file", cmd, "truncated");
        snprintf(cmd, sizeof cmd, "%s %s -m generate -i hello", dsv2_bin, tok);
        expect_clean_error("a tokenizer given where a model is needed", cmd, "not a model");
    } else check(0, "export.py --tokenizer");
    snprintf(cmd, sizeof cmd, "%s %s -m encode -i hello", dsv2_bin, model);
    expect_clean_error("encode with a model that has no tokenizer", cmd, "no tokenizer");
    snprintf(cmd, sizeof cmd, "%s %s -m chat -i hello", dsv2_bin, model);
    expect_clean_error("chat with a model that has no tokenizer", cmd, "no tokenizer");
    snprintf(cmd, sizeof cmd,
             "%s -c \"import json; t = json.load(open('tests/fixtures/tokenizer/tokenizer.json')); t['model']['type'] = 'WordPiece'; "
             "json.dump(t, open('%s/wp.json', 'w'))\" && %s export.py --tokenizer %s/wp.json %s/wp.tok",
             python, tmp_dir, python, tmp_dir, tmp_dir);
    expect_clean_error("a tokenizer.json of an unsupported model type", cmd, "WordPiece");

    /* export.py on broken Hugging Face folders */
    snprintf(dir, sizeof dir, "%s/hf", tmp_dir);
    const char *edits[][3] = {
        {"unknown topk_method", "c['topk_method'] = 'noaux_tc'", "topk_method"},
        {"missing field kv_lora_rank", "del c['kv_lora_rank']", "kv_lora_rank"},
        {"misspelled default topk_method 'gready'", "c['topk_method'] = 'gready'", "topk_method"},
        {"rope_scaling of an unsupported type", "c['rope_scaling'] = {'type': 'dynamic', 'factor': 2}", "rope_scaling"},
        {"shape that contradicts the weights", "c['hidden_size'] = 64", "shape"},
    };
    for (size_t i = 0; i < sizeof edits / sizeof edits[0]; i++) {
        snprintf(cmd, sizeof cmd,
                 "rm -rf %s && mkdir -p %s && ln -s $(realpath %s)/model.safetensors %s/ && "
                 "%s -c \"import json; c = json.load(open('%s/config.json')); %s; json.dump(c, open('%s/config.json', 'w'))\" && "
                 "%s export.py %s %s/x.bin",
                 dir, dir, fixture, dir, python, fixture, edits[i][1], dir, python, dir, tmp_dir);
        char what[128];
        snprintf(what, sizeof what, "export.py with %s", edits[i][0]);
        expect_clean_error(what, cmd, edits[i][2]);
    }
    snprintf(cmd, sizeof cmd, "rm -rf %s && mkdir -p %s && cp %s/config.json %s/ && head -c 1000 %s/model.safetensors > %s/model.safetensors && %s export.py %s %s/x.bin",
             dir, dir, fixture, dir, fixture, dir, python, dir, tmp_dir);
    expect_clean_error("export.py with a truncated safetensors file", cmd, "truncated");
    snprintf(cmd, sizeof cmd, "%s export.py %s/nowhere %s/x.bin", python, tmp_dir, tmp_dir);
    expect_clean_error("export.py with a missing folder", cmd, NULL);
}

/* The offset of a block of a model file, from ./dsv2 FILE -m layout (storage: "f32", "q8", ...). */
static long layout_offset(const char *model, const char *name, const char *storage) {
    char cmd[1024], want[256];
    snprintf(cmd, sizeof cmd, "%s %s -m layout", dsv2_bin, model);
    if (run(cmd, NULL, 0) != 0) return -1;
    char *out = stdout_text(), *line = out;
    long found = -1;
    snprintf(want, sizeof want, " %s ", name);
    for (; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
        char *end = strchr(line, '\n');
        if (end) *end = '\0';
        if (strstr(line, want) && strlen(line) > strlen(storage) && !strcmp(line + strlen(line) - strlen(storage), storage) &&
            line[strlen(line) - strlen(storage) - 1] == ' ') { found = atol(line); }
        if (end) *end = '\n';
        if (found >= 0) break;
    }
    free(out);
    return found;
}

/* An error found while running (after the model's start-up lines): exit 1, one error line, last. */
static void expect_runtime_error(const char *what, const char *cmd, const char *needle) {
    char err[8192];
    int code = run(cmd, err, sizeof err);
    int errors = 0;
    for (const char *p = err; (p = strstr(p, "error")); p++) errors++;
    size_t n = strlen(err);
    while (n && err[n - 1] == '\n') err[--n] = '\0';
    const char *last = strrchr(err, '\n') ? strrchr(err, '\n') + 1 : err;
    check(code == 1 && errors == 1 && !strncmp(last, "dsv2: error:", 12) && (!needle || strstr(last, needle)),
          "bad input: %s -> exit %d, \"%s\"", what, code, last);
}

/* A command that must end within a few seconds, with exit 0 or one clean error line. */
static void expect_bounded(const char *what, const char *cmd) {
    char full[4096], err[4096];
    snprintf(full, sizeof full, "timeout 20 %s", cmd);
    double t0 = now_seconds();
    int code = run(full, err, sizeof err);
    double took = now_seconds() - t0;
    int clean = code == 0 || (code == 1 && count_lines(err) == 1 && !strncmp(err, "dsv2: error:", 12));
    check(clean && took < 10, "bounded: %s -> exit %d in %.2f s %.*s", what, code, took, (int)strcspn(err, "\n"), err);
}

/* The defects of the reliability sweep (issue 13, D1-D11): each through the real CLI. */
static void test_reliability(const char *fixture) {
    printf("reliability\n");
    char model[512], bad[512], q8[512], cmd[4096], err[4096];
    snprintf(model, sizeof model, "%s/rel.bin", tmp_dir);
    snprintf(bad, sizeof bad, "%s/rel-bad.bin", tmp_dir);
    snprintf(q8, sizeof q8, "%s/rel-q8.bin", tmp_dir);
    if (!export_model(fixture, model, "--dtype f32") || !export_model(fixture, q8, "--dtype q8")) return;
    size_t size = 0;
    free(read_file(model, &size));
    snprintf(cmd, sizeof cmd, "%s %s -i \"1 2 3\" -n 4", dsv2_bin, bad);
    uint64_t huge[2] = {0xFFFFFFFFFFFFFF00ull, 0x200};  /* D1: offset + size wraps around */
    copy_prefix(model, bad, size, offsetof(Config, tokenizer_offset), huge, sizeof huge);
    expect_clean_error("D1 tokenizer offset + size that wraps around", cmd, "tokenizer");
    int32_t zero = 0, minus = -1;
    copy_prefix(model, bad, size, offsetof(Config, n_routed_experts), &zero, 4);  /* D3 */
    expect_clean_error("D3 a header with fewer tensors than the file (n_routed_experts 0)", cmd, "wrong header");
    int32_t bf16 = DTYPE_BF16;
    copy_prefix(model, bad, size, offsetof(Config, dtype), &bf16, 4);
    expect_clean_error("D3 an f32 file relabelled bf16", cmd, NULL);
    double nan = NAN, inf = INFINITY, big = 1e300;  /* D4 */
    copy_prefix(model, bad, size, offsetof(Config, mscale), &nan, 8);
    expect_clean_error("D4 mscale NaN", cmd, "mscale");
    copy_prefix(model, bad, size, offsetof(Config, rope_theta), &inf, 8);
    expect_clean_error("D4 rope_theta inf", cmd, "rope_theta");
    copy_prefix(model, bad, size, offsetof(Config, routed_scaling_factor), &big, 8);
    expect_clean_error("D4 routed_scaling_factor 1e300", cmd, "routed_scaling_factor");
    int32_t wide[2] = {1 << 20, 4096};  /* D5: moe_intermediate_size * n_shared_experts overflows */
    {
        char *data = read_file(model, NULL);
        memcpy(data + offsetof(Config, moe_intermediate_size), &wide[0], 4);
        memcpy(data + offsetof(Config, n_shared_experts), &wide[1], 4);
        write_bytes(bad, data, size);
        free(data);
    }
    expect_clean_error("D5 moe_intermediate_size x n_shared_experts past int32", cmd, "config");
    copy_prefix(model, bad, size, offsetof(Config, n_group), &minus, 4);  /* D6 */
    expect_clean_error("D6 n_group -1 under greedy routing", cmd, "n_group");
    long norm_at = layout_offset(model, "model.norm.weight", "f32");  /* D2: NaN logits */
    if (norm_at > 0) {
        float nanf_v = NAN;
        copy_prefix(model, bad, size, norm_at, &nanf_v, 4);
        expect_runtime_error("D2 weights that make the logits NaN", cmd, "not finite");
        snprintf(cmd, sizeof cmd, "%s %s -m logits -i \"1 2 3\" -o %s/nan.bin", dsv2_bin, bad, tmp_dir);
        expect_runtime_error("D2 -m logits of NaN logits", cmd, "not finite");
    } else check(0, "layout offset of model.norm.weight");
    size_t q8_size = 0;
    free(read_file(q8, &q8_size));
    long scale_at = layout_offset(q8, "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "q8-scales");
    if (scale_at > 0) {  /* D7: a NaN scale must reach the logits, not become a finite number */
        float nanf_v = NAN;
        copy_prefix(q8, bad, q8_size, scale_at, &nanf_v, 4);
        snprintf(cmd, sizeof cmd, "%s %s -i \"1 2 3\" -n 4", dsv2_bin, bad);
        expect_runtime_error("D7 a NaN q8 scale", cmd, "not finite");
        long embed_at = layout_offset(q8, "model.embed_tokens.weight", "q8-scales");
        copy_prefix(q8, bad, q8_size, embed_at, &nanf_v, 4);  /* token 0's first group: NaN input */
        snprintf(cmd, sizeof cmd, "%s %s -i \"0 1 2\" -n 4", dsv2_bin, bad);
        expect_runtime_error("D7 a NaN activation into the q8 quantizer", cmd, "not finite");
    } else check(0, "layout offset of a q8 scale block");
    snprintf(cmd, sizeof cmd, "%s %s -i \"1 2 3\" -n 8 -t 1e-38 -s 1", dsv2_bin, model);
    int code = run(cmd, err, sizeof err);
    check(code == 0, "D2 temperature 1e-38 samples (as greedy) -> exit %d %.*s", code, (int)strcspn(err, "\n"), err);
    snprintf(cmd, sizeof cmd, "%s %s -i \"1 2 3\" -n 8 -t 0 -s 1", dsv2_bin, model);
    char *greedy = (run(cmd, NULL, 0), stdout_text());
    snprintf(cmd, sizeof cmd, "%s %s -i \"1 2 3\" -n 8 -t 1e-38 -s 1", dsv2_bin, model);
    char *tiny = (run(cmd, NULL, 0), stdout_text());
    check(!strcmp(greedy, tiny), "D2 temperature 1e-38 gives the greedy tokens: %.40s", tiny);
    free(greedy); free(tiny);
    snprintf(cmd, sizeof cmd, "(%s %s -i \"1 2 3\" -n 4 > /dev/full)", dsv2_bin, model);  /* D9 */
    expect_runtime_error("D9 generate to a full disk (/dev/full)", cmd, "cannot write");
    /* -o onto a device: written in place, never renamed over (which replaced /dev/full with a
     * regular file when run as root); a full device is an error, /dev/stdout a pipe's input */
    const char *modes[] = {"logits", "layers", "trace"};
    for (int m = 0; m < 3; m++) {
        snprintf(cmd, sizeof cmd, "%s %s -m %s -i \"1 2 3\" -o /dev/full", dsv2_bin, model, modes[m]);
        struct stat st;
        expect_runtime_error(modes[m], cmd, "cannot write /dev/full");
        check(stat("/dev/full", &st) == 0 && S_ISCHR(st.st_mode), "-m %s -o /dev/full: /dev/full is still a character device", modes[m]);
    }
    Weights w;
    memset(&w, 0, sizeof w);
    load_weights(&w, model, WEIGHTS_MMAP);
    long vocab = w.cfg.vocab_size;
    free_weights(&w);
    snprintf(cmd, sizeof cmd, "%s %s -m logits -i \"1 2 3\" -o /dev/stdout | wc -c", dsv2_bin, model);
    code = run(cmd, NULL, 0);
    char *bytes = stdout_text();
    struct stat st;
    check(code == 0 && bytes && atol(bytes) == 3L * 4 * vocab && lstat("/dev/stdout", &st) == 0 && !S_ISREG(st.st_mode),
          "-m logits -o /dev/stdout into a pipe: %s bytes, /dev/stdout not replaced", bytes ? strtok(bytes, "\n") : "no");
    free(bytes);
}

/* D8: tokenizers whose pre-tokenizer regex has nested quantifiers, and the real V2 tokenizer on
 * long runs of one character class: every encode ends within seconds (a result, or one error). */
static void test_regex_bounded(void) {
    static const char *patterns[] = {"(a+)+$", "(a|a)*c", "(a|aa)+$", "(a*)*b", "((a+)+)+b", "(?=(a+)+$)a",
                                     "(a+a+)+y", "(a+|b+)*c", "a{1000}{1000}", "(a{300}){300}", "(\\s+|a)+$", "([a-z]+)*\\d"};
    char cmd[4096], json[512], tok[512], text[512];
    snprintf(text, sizeof text, "%s/aaa.txt", tmp_dir);
    char *aaa = xcalloc(20002, 1);
    memset(aaa, 'a', 40);
    aaa[40] = '!';  /* no match at the end: a plain backtracker tries 2^40 ways (D8) */
    write_bytes(text, aaa, 41);
    for (size_t i = 0; i < sizeof patterns / sizeof patterns[0]; i++) {
        snprintf(json, sizeof json, "%s/re%zu.json", tmp_dir, i);
        snprintf(tok, sizeof tok, "%s/re%zu.tok", tmp_dir, i);
        FILE *f = fopen(json, "w");
        fprintf(f, "%s", patterns[i]);
        fclose(f);
        snprintf(cmd, sizeof cmd,
                 "%s -c \"import json; p = open('%s').read(); t = json.load(open('models/tiny/tokenizer.json')); "
                 "t['pre_tokenizer'] = {'type': 'Sequence', 'pretokenizers': [{'type': 'Split', 'pattern': {'Regex': p}, "
                 "'behavior': 'Isolated', 'invert': False}, {'type': 'ByteLevel', 'add_prefix_space': False, 'use_regex': False}]}; "
                 "json.dump(t, open('%s', 'w'))\" && %s export.py --tokenizer %s %s",
                 python, json, json, python, json, tok);
        char what[128], err[4096];
        int code = run(cmd, err, sizeof err);
        if (code != 0) {  /* export.py refuses what dsv2 would refuse (e.g. a nullable repeat) */
            check(code == 1 && count_lines(err) == 1 && strstr(err, "export.py: error:"),
                  "export.py refuses the regex %s cleanly: %.*s", patterns[i], (int)strcspn(err, "\n"), err);
            continue;
        }
        snprintf(cmd, sizeof cmd, "%s %s -m encode -f %s", dsv2_bin, tok, text);
        snprintf(what, sizeof what, "the regex %s on 40 a's and a '!'", patterns[i]);
        expect_bounded(what, cmd);
    }
    /* the real V2 tokenizer: 20000 spaces, then a letter (\s+$ is quadratic for a plain backtracker) */
    snprintf(tok, sizeof tok, "%s/v2.tok", tmp_dir);
    memset(aaa, ' ', 20000);
    aaa[20000] = 'x';
    write_bytes(text, aaa, 20001);
    snprintf(cmd, sizeof cmd, "%s export.py --tokenizer tests/fixtures/tokenizer/tokenizer.json %s >/dev/null && "
             "%s %s -m encode -f %s", python, tok, dsv2_bin, tok, text);
    expect_bounded("the V2 tokenizer on 20000 spaces and a letter", cmd);
    char *out = stdout_text();
    check(count_lines(out) == 1 && strlen(out) > 2, "... and it gives ids (%.30s)", out);
    free(out);
    free(aaa);
}

/* The built-in model chats: its tokenizer (the blob in model.bin is exactly what export.py makes
 * of models/tiny/tokenizer.json) has DeepSeek-V2's template; a model without one is refused at
 * start-up; piped chat input gets no prompt, so an error starts its line (D11); a line longer
 * than 64 KiB is one turn (D10). */
static void test_chat(void) {
    printf("chat\n");
    Weights w;
    memset(&w, 0, sizeof w);
    load_weights(&w, "models/tiny/model.bin", WEIGHTS_MMAP);
    Tokenizer tok;
    if (load_tokenizer_file(&tok, "models/tiny/model.bin", &w)) {
        check(tok.chat_template == CHAT_DEEPSEEK_V2, "models/tiny/model.bin has the DeepSeek-V2 chat template");
        check_chat_template("models/tiny", &tok);
        free_tokenizer(&tok);
    } else check(0, "models/tiny/model.bin has a tokenizer");
    char cmd[4096], path[512];
    snprintf(path, sizeof path, "%s/tiny.tok", tmp_dir);
    snprintf(cmd, sizeof cmd, "%s export.py --tokenizer models/tiny/tokenizer.json %s", python, path);
    size_t n = 0;
    char *blob = run(cmd, NULL, 0) == 0 ? read_file(path, &n) : NULL;
    check(blob && n == w.cfg.tokenizer_size && !memcmp(blob, (char *)w.map + w.cfg.tokenizer_offset, n),
          "the built-in model's tokenizer is export.py's of models/tiny/tokenizer.json (%zu bytes)", n);
    free(blob);
    free_weights(&w);
    snprintf(cmd, sizeof cmd, "%s -c \"import json; c = json.load(open('models/tiny/tokenizer_config.json')); "
             "del c['chat_template']; import os; os.makedirs('%s/nochat', exist_ok=True); "
             "json.dump(c, open('%s/nochat/tokenizer_config.json', 'w'))\" && cp models/tiny/config.json "
             "models/tiny/tokenizer.json %s/nochat/ && %s export.py --random %s/nochat/config.json %s/nochat.bin --layers 1 "
             ">/dev/null && %s %s/nochat.bin -m chat < /dev/null",
             python, tmp_dir, tmp_dir, tmp_dir, python, tmp_dir, tmp_dir, dsv2_bin, tmp_dir);
    expect_clean_error("chat with a model whose tokenizer has no chat template, refused at start", cmd, "chat template");
    char text[512];
    snprintf(text, sizeof text, "%s/chat.txt", tmp_dir);
    write_bytes(text, "bad \xC3\x28 line\n", 13);
    snprintf(cmd, sizeof cmd, "%s models/tiny/model.bin -m chat -n 4 -s 1 < %s", dsv2_bin, text);
    expect_runtime_error("D11 invalid UTF-8 piped into chat: the error starts its line", cmd, "UTF-8");
    char err[8192];
    int code;
    /* D10: one line of 65,540 bytes, on a random model of the tiny shape with a long context */
    snprintf(cmd, sizeof cmd, "mkdir -p %s/long && cp models/tiny/tokenizer.json models/tiny/tokenizer_config.json %s/long/ && "
             "%s -c \"import json; c = json.load(open('models/tiny/config.json')); c.update(hidden_size=32, num_attention_heads=1, "
             "kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, intermediate_size=32, "
             "n_routed_experts=None, max_position_embeddings=32768); json.dump(c, open('%s/long/config.json', 'w'))\" && "
             "%s export.py --random %s/long/config.json %s/long.bin --layers 1 >/dev/null && "
             "%s -c \"print('the ' * 16385)\" > %s && %s %s/long.bin -m chat -n 1 -s 1 -c 32768 < %s",
             tmp_dir, tmp_dir, python, tmp_dir, python, tmp_dir, tmp_dir, python, text, dsv2_bin, tmp_dir, text);
    code = run(cmd, err, sizeof err);
    char *out = stdout_text();
    int turns = 0;
    for (char *p = out; (p = strstr(p, "Assistant:")); p++) turns++;
    check(code == 0 && turns == 1, "D10 a chat line of 65,540 bytes is one turn: exit %d, %d replies", code, turns);
    free(out);
}

/* q8 activations at the edges: a subnormal group (127 / amax overflows: found by the fuzzer) and
 * a group holding a NaN (D7: its scale becomes NaN, so the NaN reaches the logits). */
static void test_quantize_edges(void) {
    float x[8] = {1e-40f, -1e-40f, 5e-41f, 0.0f, 1.0f, NAN, 2.0f, -3.0f}, scale[2];
    int8_t q[8];
    quantize_activations(q, scale, x, 8, 4);
    check(q[0] == 127 && q[1] == -127 && q[2] == 64 && q[3] == 0 && scale[0] > 0,
          "q8 quantization of a subnormal group: %d %d %d %d", q[0], q[1], q[2], q[3]);
    check(isnan(scale[1]), "q8 quantization of a group with a NaN gives a NaN scale");
}

/* exp_vectorized (attention's softmax) against expf in ulps over [-87, 88], every 2^-10; below
 * -87 it gives e^-87; NaN stays NaN. */
static void test_exp_vectorized(void) {
    double worst = 0;
    for (double x = -87.0; x <= 88.0; x += 1.0 / 1024) {
        float got = exp_vectorized((float)x), want = expf((float)x);
        worst = fmax(worst, fabs((double)got - want) / (nextafterf(want, INFINITY) - want));
    }
    float low = exp_vectorized(-500.0f), nan = exp_vectorized(NAN);
    check(worst <= 2 && low == exp_vectorized(-87.0f) && isnan(nan),
          "exp_vectorized within %.2g ulp of expf on [-87, 88]; e^-500 -> %g; NaN -> %g", worst, low, nan);
}

/* D2 in process: top-p over two equally likely tokens with p = 0.01 keeps none by the cutoff. */
static void test_sampler_edges(void) {
    float logits[2] = {0.0f, 0.0f};
    ProbIndex cand[2];
    Sampler sp = {2, 1.0f, 0.01f, 42, cand};
    int id = sample(&sp, logits);
    check(id == 0 || id == 1, "top-p that leaves no candidate still returns a token (%d)", id);
    float big[2] = {3e38f, 1.0f};
    Sampler cold = {2, 1e-38f, 0.9f, 42, cand};
    check(sample(&cold, big) == 0, "a temperature that overflows the logits samples the best token");
}

/* export.py on broken inputs (issue 13, D12-D15): one "export.py: error:" line and exit 1, never
 * a traceback; nothing dsv2 would refuse is written; a failed export leaves the previous good
 * output as it was and no OUT.tmp behind. Folders come from tests/mutate_hf.py. */
static void test_export_reliability(void) {
    printf("export.py reliability\n");
    char good[512], out[512], dir[512], cmd[8192], err[4096];
    snprintf(good, sizeof good, "%s/good-export.bin", tmp_dir);
    snprintf(out, sizeof out, "%s/export.bin", tmp_dir);
    snprintf(dir, sizeof dir, "%s/mutated", tmp_dir);
    if (!export_model("tests/fixtures/lite", good, "--dtype f32")) return;
    size_t good_size = 0;
    char *good_bytes = read_file(good, &good_size);
    static const char *cases[][4] = {  /* source folder, kind, edit, what the error names */
        {"lite", "config", "c = [1, 2]", "JSON object"},
        {"lite", "config", "c['moe_layer_freq'] = 0", "moe_layer_freq"},
        {"lite", "config", "c['rope_scaling'] = 'yarn'", "rope_scaling"},
        {"lite", "config", "c['rope_scaling']['factor'] = 'big'", "factor"},
        {"lite", "config", "c['hidden_size'] = 2**31", "hidden_size"},
        {"lite", "config", "c['num_hidden_layers'] = 10**12", "num_hidden_layers"},
        {"lite", "config", "c['rms_norm_eps'] = 0", "rms_norm_eps"},
        {"lite", "config", "c['n_shared_experts'] = -1", "n_shared_experts"},
        {"lite", "config", "c['rope_theta'] = float('nan')", "rope_theta"},
        {"lite", "config", "c['routed_scaling_factor'] = 1e300", "routed_scaling_factor"},
        {"lite", "config", "c['n_group'] = -1", "n_group"},
        {"lite", "header", "h = [1]", "JSON object"},
        {"lite", "header", "del h[sorted(k for k in h if k != '__metadata__')[0]]['dtype']", "dtype"},
        {"lite", "header", "h[sorted(k for k in h if k != '__metadata__')[0]]['shape'] = ['a']", "shape"},
        {"lite", "header", "k = sorted(x for x in h if x != '__metadata__')[0]; b, e = h[k]['data_offsets']; "
                           "h[k]['data_offsets'] = [-64, e - b - 64]", "offsets"},
        {"lite", "data", "import struct; d[0:4] = struct.pack('<f', float('nan'))", "NaN"},
        {"lite", "data", "import struct; d[-4:] = struct.pack('<f', float('inf'))", "NaN or infinity"},
        {"v2-bf16-sharded", "index", "i['weight_map'][next(iter(i['weight_map']))] = 5", "weight_map"},
        {"v2-bf16-sharded", "index", "i = [1]", "cannot read"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(cmd, sizeof cmd, "cp %s %s && %s tests/mutate_hf.py tests/fixtures/%s %s %s \"%s\" && %s export.py %s %s",
                 good, out, python, cases[i][0], dir, cases[i][1], cases[i][2], python, dir, out);
        int code = run(cmd, err, sizeof err);
        char tmp[600];
        snprintf(tmp, sizeof tmp, "%s.tmp", out);
        size_t n = 0;
        char *now = read_file(out, &n);
        int kept = n == good_size && !memcmp(now, good_bytes, n) && access(tmp, F_OK) != 0;
        free(now);
        check(code == 1 && count_lines(err) == 1 && !strncmp(err, "export.py: error:", 17) && strstr(err, cases[i][3]) && kept,
              "export.py, %s %s: exit %d, earlier output %s, \"%.*s\"", cases[i][1], cases[i][2], code,
              kept ? "kept, no .tmp" : "REPLACED or .tmp left", (int)strcspn(err, "\n"), err);
    }
    free(good_bytes);
    static const char *tok_cases[][2] = {  /* edits of the V2 tokenizer.json, exported alone */
        {"t['model'] = [1]", "JSON objects"},
        {"t['added_tokens'] = 5", "added_tokens"},
        {"t['added_tokens'][0]['content'] = ''", "non-empty"},
        {"t['added_tokens'][1]['id'] = t['added_tokens'][0]['id']", "reuses id"},
        {"k = list(t['model']['vocab']); t['model']['vocab'][k[1]] = t['model']['vocab'][k[0]]", "two tokens"},
        {"t['model']['vocab'][next(iter(t['model']['vocab']))] = -5", "not an integer"},
        {"t['pre_tokenizer']['pretokenizers'][0]['pattern']['Regex'] = '(ab'", "missing )"},
        {"t['pre_tokenizer']['pretokenizers'][0]['pattern']['Regex'] = 'a{3,1}'", "{m,n}"},
        {"t['pre_tokenizer']['pretokenizers'][0]['pattern']['Regex'] = '\\\\p{Greek}'", "unknown Unicode property"},
    };
    snprintf(cmd, sizeof cmd, "%s tests/header_rules.py %s 60", python, dsv2_bin);  /* the same rules */
    int code = run(cmd, err, sizeof err);
    char *summary = stdout_text();
    size_t len = strlen(summary);
    while (len && summary[len - 1] == '\n') summary[--len] = '\0';
    check(code == 0, "%s", strrchr(summary, '\n') ? strrchr(summary, '\n') + 1 : summary);
    free(summary);
    /* transformers v5 writes rope_parameters: the same model as its rope_scaling twin, byte for byte */
    static const char *twins[][2] = {
        {"c['rope_parameters'] = dict(c.pop('rope_scaling'), rope_theta=c.pop('rope_theta', 10000))", "pass"},
        {"c.pop('rope_scaling'); c['rope_parameters'] = {'rope_type': 'default', 'rope_theta': 10000}",
         "c['rope_scaling'] = None"},
    };
    for (int i = 0; i < 2; i++) {
        char a[600], b[600];
        snprintf(a, sizeof a, "%s/twin-a.bin", tmp_dir);
        snprintf(b, sizeof b, "%s/twin-b.bin", tmp_dir);
        snprintf(cmd, sizeof cmd, "%s tests/mutate_hf.py tests/fixtures/lite %s config \"%s\" && %s export.py %s %s --dtype f32 && "
                 "%s tests/mutate_hf.py tests/fixtures/lite %s config \"%s\" && %s export.py %s %s --dtype f32 && cmp %s %s",
                 python, dir, twins[i][0], python, dir, a, python, dir, twins[i][1], python, dir, b, a, b);
        int same = run(cmd, err, sizeof err) == 0;
        check(same, "a rope_parameters config (%s) exports like its rope_scaling twin", i ? "rope_type default" : "yarn");
    }
    char tok_dir[512], tok_out[512];
    snprintf(tok_dir, sizeof tok_dir, "%s/mutated-tok", tmp_dir);
    snprintf(tok_out, sizeof tok_out, "%s/mutated.tok", tmp_dir);
    for (size_t i = 0; i < sizeof tok_cases / sizeof tok_cases[0]; i++) {
        snprintf(cmd, sizeof cmd, "rm -f %s && %s tests/mutate_hf.py tests/fixtures/tokenizer %s tokenizer \"%s\" && "
                 "%s export.py --tokenizer %s/tokenizer.json %s", tok_out, python, tok_dir, tok_cases[i][0], python, tok_dir, tok_out);
        int code = run(cmd, err, sizeof err);
        check(code == 1 && count_lines(err) == 1 && strstr(err, "export.py: error:") && strstr(err, tok_cases[i][1]) &&
              access(tok_out, F_OK) != 0,
              "export.py --tokenizer, %s: exit %d, \"%.*s\"", tok_cases[i][0], code, (int)strcspn(err, "\n"), err);
    }
}

/* The README's Training commands, exactly as written there (the first code block after
 * "## Training"), in a fresh folder with a small non-ASCII corpus.txt; `python3` is the python
 * with numpy, `./dsv2` and export.py the repository's. */
static void test_readme_training(void) {
    printf("README training commands\n");
    size_t n = 0;
    char *readme = read_file("README.md", &n), *at = strstr(readme, "## Training");
    char *block = at ? strstr(at, "```\n") : NULL, *end = block ? strstr(block + 4, "```") : NULL;
    if (!block || !end) { check(0, "README.md has a Training section with a code block"); free(readme); return; }
    *end = '\0';
    char dir[512], cmd[8192], err[8192], cwd[1024], corpus[600];
    if (!getcwd(cwd, sizeof cwd)) die("getcwd");
    snprintf(dir, sizeof dir, "%s/readme-training", tmp_dir);
    snprintf(corpus, sizeof corpus, "%s/corpus.txt", dir);
    snprintf(cmd, sizeof cmd, "mkdir -p %s", dir);
    if (system(cmd) != 0) die("mkdir");
    FILE *f = fopen(corpus, "w");
    for (int i = 0; i < 150; i++)
        fprintf(f, "In the beginning God created the heaven and the earth. Schöne Grüße, café, naïve — “%d”.\n"
                   "Und die Erde war wüst und leer; 起初神创造天地。 And God said, Let there be light: and there was light.\n", i);
    fclose(f);
    int lines = 0, ok = 1;
    for (char *line = block + 4; *line && ok;) {
        char *nl = strchr(line, '\n');
        if (nl) *nl = '\0';
        if (*line) {
            const char *rest = line;
            char prog[2200];
            if (!strncmp(line, "python3 export.py", 17)) { snprintf(prog, sizeof prog, "%s %s/export.py", python, cwd); rest = line + 17; }
            else if (!strncmp(line, "./dsv2", 6)) { snprintf(prog, sizeof prog, "%s/%s", cwd, dsv2_bin); rest = line + 6; }
            else { check(0, "README training line is a python3 export.py or ./dsv2 command: %s", line); ok = 0; break; }
            snprintf(cmd, sizeof cmd, "cd %s && %s%s < /dev/null", dir, prog, rest);
            int code = run(cmd, err, sizeof err);
            lines++;
            check(code == 0, "README: %s -> exit %d %.*s", line, code, code ? (int)strcspn(err, "\n") : 0, err);
            ok = code == 0;
        }
        line = nl ? nl + 1 : line + strlen(line);
    }
    check(lines >= 4, "the README's Training block has its %d commands", lines);
    free(readme);
}

/* The training CLI end to end on the built-in model's config: a few steps from random weights,
 * the checkpoint runs as a normal model, the CSV and SVG appear, and training resumes. */
static void test_train_cli(void) {
    printf("training CLI\n");
    char init[512], out[512], corpus[512], cmd[4096], err[8192];
    snprintf(init, sizeof init, "%s/init.bin", tmp_dir);
    snprintf(out, sizeof out, "%s/trained.bin", tmp_dir);
    snprintf(corpus, sizeof corpus, "%s/corpus.txt", tmp_dir);
    FILE *f = fopen(corpus, "w");
    for (int i = 0; i < 200; i++) fprintf(f, "In the beginning God created the heaven and the earth. And the earth was without form, and void %d.\n", i);
    fclose(f);
    snprintf(cmd, sizeof cmd, "%s export.py --random models/tiny/config.json %s --dtype f32 --layers 2", python, init);
    int code = run(cmd, err, sizeof err);
    check(code == 0, "export.py --random models/tiny/config.json (2 layers, with its tokenizer)");
    if (code) return;
    snprintf(cmd, sizeof cmd, "%s %s -m train -f %s -o %s -n 6 -b 2 -c 32 -e 3 -r 0.01 -s 1", dsv2_bin, init, corpus, out);
    code = run(cmd, err, sizeof err);
    char *csv_text = NULL;
    snprintf(cmd, sizeof cmd, "%s.csv", out);
    if (code == 0 && access(cmd, R_OK) == 0) csv_text = read_file(cmd, NULL);
    float first = 0, last = 0;
    if (csv_text) {
        char *line = strchr(csv_text, '\n');
        if (line) first = (float)atof(strchr(line + 1, ',') + 1);
        char *end = csv_text + strlen(csv_text) - 2;
        while (end > csv_text && *end != '\n') end--;
        last = (float)atof(strchr(end + 1, ',') + 1);
    }
    check(code == 0 && csv_text && count_lines(csv_text) == 7 && strstr(err, "expert load") && last < first,
          "6 training steps: exit %d, loss %.3f -> %.3f, expert load printed, CSV of 6 steps", code, first, last);
    free(csv_text);
    snprintf(cmd, sizeof cmd, "%s.svg", out);
    check(access(cmd, R_OK) == 0, "loss curve written as SVG");
    snprintf(cmd, sizeof cmd, "%s %s -i \"In the beginning\" -n 8 -t 0", dsv2_bin, out);
    code = run(cmd, NULL, 0);
    char *text = stdout_text();
    check(code == 0 && !strncmp(text, "In the beginning", 16), "the checkpoint runs as a normal model: \"%.60s\"", text);
    free(text);
    snprintf(cmd, sizeof cmd, "%s %s -m train -f %s -o %s.2 -n 2 -b 2 -c 32 -e 10", dsv2_bin, out, corpus, out);
    code = run(cmd, err, sizeof err);
    check(code == 0 && strstr(err, "resuming after step 6"), "training resumes from a checkpoint and its Adam state");
    /* resumed into the same file: the CSV keeps its rows and grows, the schedule goes on where it
     * was (past its 6 steps: the floor, 10% of -r), and the SVG draws all of it */
    snprintf(cmd, sizeof cmd, "%s %s -m train -f %s -o %s -n 3 -b 2 -c 32 -e 10 -r 0.01 -s 2", dsv2_bin, out, corpus, out);
    code = run(cmd, err, sizeof err);
    snprintf(cmd, sizeof cmd, "%s.csv", out);
    csv_text = code == 0 ? read_file(cmd, NULL) : NULL;
    int rows = csv_text ? count_lines(csv_text) - 1 : 0;
    char *row7 = csv_text ? strstr(csv_text, "\n7,") : NULL;
    double lr7 = -1;
    if (row7) {  /* step,loss,cross_entropy,validation,lr,... */
        const char *p = row7 + 1;
        for (int k = 0; k < 4 && p; k++) p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL;
        if (p) lr7 = atof(p);
    }
    snprintf(cmd, sizeof cmd, "%s.svg", out);
    char *svg = access(cmd, R_OK) == 0 ? read_file(cmd, NULL) : NULL;
    check(code == 0 && rows == 9 && fabs(lr7 - 0.001) < 1e-6 && svg && strstr(svg, "steps 1..9"),
          "resumed training appends to the CSV (%d rows), continues the schedule (lr at step 7: %g) and redraws the SVG",
          rows, lr7);
    free(csv_text);
    free(svg);
    /* killed mid-way (SIGKILL, no chance to clean up): the CSV has whole rows, the SVG is whole */
    snprintf(cmd, sizeof cmd, "rm -f %s.4.csv %s.4.svg; %s %s -m train -f %s -o %s.4 -n 100000 -b 2 -c 32 -e 3 & pid=$!; "
             "for i in $(seq 1200); do [ -f %s.4.svg ] && [ $(wc -l < %s.4.csv) -ge 6 ] && break; sleep 0.05; done; "
             "kill -9 $pid; wait $pid", out, out, dsv2_bin, init, corpus, out, out, out);
    run(cmd, NULL, 0);
    snprintf(cmd, sizeof cmd, "%s.4.csv", out);
    char *killed = access(cmd, R_OK) == 0 ? read_file(cmd, NULL) : NULL;
    int whole = killed && strlen(killed) > 0 && killed[strlen(killed) - 1] == '\n', killed_rows = 0;
    for (char *p = killed; whole && p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL) {
        int commas = 0;
        for (char *q = p; *q && *q != '\n'; q++) commas += *q == ',';
        whole = commas == 5;
        killed_rows++;
    }
    snprintf(cmd, sizeof cmd, "%s.4.svg", out);
    char *killed_svg = access(cmd, R_OK) == 0 ? read_file(cmd, NULL) : NULL;
    check(whole && killed_rows > 3 && killed_svg && strstr(killed_svg, "</svg>\n"),
          "a training run killed mid-way leaves a whole CSV (%d lines) and a whole SVG", killed_rows);
    free(killed);
    free(killed_svg);
    snprintf(cmd, sizeof cmd, "%s tests/fixtures/lite/model.safetensors -m train -f %s -o %s.3", dsv2_bin, corpus, out);
    expect_clean_error("training from a file that is not a checkpoint", cmd, "magic");
}

/* f32 -> bf16 in export.py must round to nearest even exactly like the fixture's bf16 set. */
/* dsv2.c's reading rules (tests/style.py): eq. 9-25 tagged in model code, no intrinsic before the
 * end of the forward pass, lines <= 100 characters, functions <= 80 lines. */
static void test_style(void) {
    char cmd[512], err[4096];
    snprintf(cmd, sizeof cmd, "%s tests/style.py dsv2.c", python);
    int code = run(cmd, err, sizeof err);
    char *out = stdout_text();
    size_t n = strlen(out);
    if (n && out[n - 1] == '\n') out[n - 1] = '\0';
    check(code == 0, "reading rules of dsv2.c: %s", out);
    free(out);
}

/* The file layout written once in each language: export.py --print-layout lists every block it
 * wrote (offset, bytes, name, shape, storage), ./dsv2 -m layout lists the blocks its loader walks
 * in the same file. Any difference in order, shape, alignment or q8 scales fails here. */
static void test_layout_agrees(const char *source, const char *flags) {
    char model[512], cmd[2048], err[4096];
    snprintf(model, sizeof model, "%s/layout.bin", tmp_dir);
    snprintf(cmd, sizeof cmd, "%s export.py %s %s %s --print-layout", python, source, model, flags);
    int code = run(cmd, err, sizeof err);
    char *written = stdout_text();
    snprintf(cmd, sizeof cmd, "%s %s -m layout", dsv2_bin, model);
    int code2 = run(cmd, err, sizeof err);
    char *walked = stdout_text();
    int lines = count_lines(walked);
    check(code == 0 && code2 == 0 && lines > 3 && !strcmp(written, walked),
          "layout of %s %s: export.py wrote and dsv2 walks the same %d blocks (exit %d, %d)", source, flags, lines,
          code, code2);
    free(written);
    free(walked);
}

static void test_bf16_rounding(const char *f32_dir, const char *bf16_dir) {
    char a[512], b[512];
    snprintf(a, sizeof a, "%s/rounded.bin", tmp_dir);
    snprintf(b, sizeof b, "%s/stored.bin", tmp_dir);
    if (!export_model(f32_dir, a, "--dtype bf16") || !export_model(bf16_dir, b, "")) return;
    size_t na = 0, nb = 0;
    char *da = read_file(a, &na), *db = read_file(b, &nb);
    check(na == nb && !memcmp(da, db, na), "export.py --dtype bf16 of %s is byte-identical to %s (round to nearest even)", f32_dir, bf16_dir);
    free(da);
    free(db);
}

int main(int argc, char **argv) {
    python = getenv("PYTHON") ? getenv("PYTHON") : "python3";
    dsv2_bin = getenv("DSV2_BIN") ? getenv("DSV2_BIN") : "./dsv2";
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/dsv2_test_XXXXXX");
    if (!mkdtemp(tmp_dir)) die("cannot create a temporary directory");

    int units_only = argc == 2 && !strcmp(argv[1], "--units");  /* the building blocks alone */
    if (argc > 1 && !units_only) {
        for (int i = 1; i < argc; i++) test_fixture_dir(argv[i]);
    } else {
        printf("building blocks\n");
        test_rmsnorm_softmax();
        test_yarn_real_config();
        test_rope_relative();
        test_routing();
        test_bf16();
        test_matmul_dtypes();
        test_matmul_float_kernels();
        test_attention_kernels();
        test_exp_vectorized();
        test_matmul_q4();
        test_bf16_round_to_even();
        test_matmul_many();
        test_q8_lanes();
        test_batch_equals_single(ATTN_ABSORB, small_config(8), "small");
        test_batch_equals_single(ATTN_NAIVE, small_config(8), "small");
        test_batch_equals_single(ATTN_ABSORB, unusual_config(), "unusual");
        test_batch_equals_single(ATTN_NAIVE, unusual_config(), "unusual");
        test_run_state_prefault();
        test_gradient_finite_differences();
        test_naive_equals_absorb(0);
        test_naive_equals_absorb(8);
        test_wide_latent();
        test_sampler_edges();
        test_quantize_edges();
        test_thread_tuner();
        if (units_only) goto done;
        const char *fixtures[] = {"tests/fixtures/lite", "tests/fixtures/v2", "tests/fixtures/v2-bf16-sharded",
                                  "tests/fixtures/tokenizer", "tests/fixtures/tokenizer/deepseek-v3"};
        for (int i = 0; i < 5; i++) test_fixture_dir(fixtures[i]);
        printf("export\n");
        test_bf16_rounding("tests/fixtures/v2", "tests/fixtures/v2-bf16-sharded");
        test_style();
        test_layout_agrees("tests/fixtures/lite", "--dtype f32");
        test_layout_agrees("tests/fixtures/v2", "--dtype q8");
        test_layout_agrees("tests/fixtures/v2-bf16-sharded", "");
        test_layout_agrees("--random models/tiny/config.json", "--dtype q8");
        test_layout_agrees("tests/fixtures/v2", "--dtype q4");
        test_bad_inputs("tests/fixtures/lite");
        test_reliability("tests/fixtures/lite");
        test_regex_bounded();
        test_chat();
        test_export_reliability();
        test_readme_training();
        test_train_cli();
        printf("watching the model\n");
        test_quantized_quality("q8", 0.005, 95.0);
        test_dequantized("q8");
        test_quantized_quality("q4", 0.03, 90.0);
        test_dequantized("q4");
        test_cache_types();
        test_reference();
        if (!getenv("DSV2_SKIP_DOCS")) {  /* make test-asan skips these: they run ./dsv2 itself */
            printf("docs\n");
            script_checks("tests/docs.sh", "every sh block of docs/walkthrough.md and docs/exercises.md");
            script_checks("tests/exercises.sh", "each exercise's check fails on a wrong answer");
        }
    }
done:;
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmp_dir);
    if (system(cmd) != 0) fprintf(stderr, "warning: could not remove %s\n", tmp_dir);
    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed != 0;
}
