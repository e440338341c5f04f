/*
 * Each kernel of dsv2.cu against dsv2.c's function on the same inputs, in the manner of llm.c's
 * dev/cuda: prints the largest error (relative to the reference's largest value), the tolerance
 * and the kernel's bandwidth, and fails loudly. make cuda builds it; tests/test_cuda.sh runs it
 * first, so the first GPU run names the first kernel that is wrong before any model runs.
 *
 *   build/cuda_kernels          last line: N passed, N failed (exit 1 if any failed)
 *
 * The CPU side is tests/cuda_kernels_ref.c (dsv2.c's functions, exported). Shapes are the real
 * ones of DeepSeek-V2-Lite and DeepSeek-V2 plus ragged sizes; weights are random.
 */
#include "../dsv2.cu"

extern "C" {
Config ref_config(int v2);
Mat ref_make_mat(const float *w, int rows, int cols, int dtype);
void ref_free_mat(Mat *m);
void ref_matvec(float *y, const Mat *W, const float *x);
void ref_row(float *out, const Mat *W, int r);
void ref_rmsnorm(float *out, const float *x, const float *w, int n, double eps);
void ref_softmax(float *x, int n);
void ref_swiglu(float *gate, const float *up, size_t n);
void ref_rope_tables(const Config *c, int positions, float *cos_table, float *sin_table);
void ref_rope(float *x, const float *cos_row, const float *sin_row, int dim);
float ref_softmax_scale(const Config *c);
void ref_route(const Config *c, const float *probs, int *idx, float *weight);
void ref_attention(const Config *c, const Mat *kv_b, const float *q, const float *cache, int pos, float *head_out);
}

static int passed = 0, failed = 0;
static uint64_t rng = 0x9E3779B97F4A7C15ull;

static float uniform(void) {  /* in [-1, 1) */
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (float)((rng >> 40) / 8388608.0 - 1.0);
}
static std::vector<float> randoms(size_t n, float scale = 1.0f) {
    std::vector<float> v(n);
    for (auto &x : v) x = scale * uniform();
    return v;
}

static float *to_device(Gpu *g, const std::vector<float> &v) { return (float *)upload_bytes(g, v.data(), v.size() * sizeof(float)); }
static std::vector<float> to_host(const float *d, size_t n) {
    std::vector<float> v(n);
    CUDA_CHECK(cudaMemcpy(v.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost));
    return v;
}

/* max |gpu - ref| / max(1, max |ref|) */
static double rel_err(const std::vector<float> &gpu, const std::vector<float> &ref) {
    double worst = 0, scale = 1;
    for (size_t i = 0; i < ref.size(); i++) {
        scale = std::max(scale, (double)fabsf(ref[i]));
        double d = fabs((double)gpu[i] - ref[i]);
        if (!(d <= worst)) worst = std::isnan(d) ? INFINITY : d;
    }
    return worst / scale;
}

/* Mean milliseconds of one launch of f, after a warm-up, over 20 launches. */
template <class F> static double time_ms(F f) {
    f();
    CUDA_CHECK(cudaDeviceSynchronize());
    cudaEvent_t a, b;
    CUDA_CHECK(cudaEventCreate(&a)); CUDA_CHECK(cudaEventCreate(&b));
    CUDA_CHECK(cudaEventRecord(a));
    for (int i = 0; i < 20; i++) f();
    CUDA_CHECK(cudaEventRecord(b));
    CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    CUDA_CHECK(cudaEventDestroy(a)); CUDA_CHECK(cudaEventDestroy(b));
    CUDA_CHECK(cudaGetLastError());
    return ms / 20;
}

static void report(bool ok, const char *what, double err, double tol, double bytes, double ms) {
    (ok ? passed : failed)++;
    printf("  %s  %-58s max err %.1e (tolerance %.0e)  %8.3f ms  %7.1f GB/s\n", ok ? "ok  " : "FAIL", what, err, tol, ms,
           ms > 0 ? bytes / ms / 1e6 : 0.0);
    fflush(stdout);
}

static const char *dtype_name(int d) { return d == DTYPE_Q8 ? "q8" : d == DTYPE_BF16 ? "bf16" : "f32"; }
static size_t elem_bytes(int d) { return d == DTYPE_Q8 ? 1 : d == DTYPE_BF16 ? 2 : 4; }

static void check_rmsnorm(Gpu *g, int n) {
    auto x = randoms(n, 3.0f), w = randoms(n);
    float *dx = to_device(g, x), *dw = to_device(g, w), *dout = dev_alloc(g, n);
    double ms = time_ms([&] { rmsnorm_kernel<<<1, 256>>>(dout, dx, dw, n, 1e-6f); });
    std::vector<float> ref(n);
    ref_rmsnorm(ref.data(), x.data(), w.data(), n, 1e-6);
    char what[128];
    snprintf(what, sizeof what, "rmsnorm, width %d", n);
    double err = rel_err(to_host(dout, n), ref);
    report(err <= 1e-5, what, err, 1e-5, 3.0 * n * 4, ms);
}

static void check_matvec(Gpu *g, int rows, int cols, int dtype, const char *label) {
    auto w = randoms((size_t)rows * cols, 0.05f), x = randoms(cols);
    Mat m = ref_make_mat(w.data(), rows, cols, dtype);
    DevMat dm = upload(g, m);
    float *dx = to_device(g, x), *dy = dev_alloc(g, rows);
    double ms = time_ms([&] { matvec(dy, dm, dx); });
    std::vector<float> ref(rows);
    ref_matvec(ref.data(), &m, x.data());
    char what[128];
    snprintf(what, sizeof what, "matvec %s %d x %d (%s)", dtype_name(dtype), rows, cols, label);
    double err = rel_err(to_host(dy, rows), ref);
    double bytes = (double)rows * cols * elem_bytes(dtype) + (dtype == DTYPE_Q8 ? rows * (cols / 32) * 4.0 : 0);
    report(err <= 1e-5, what, err, 1e-5, bytes, ms);
    ref_free_mat(&m);
}

static void check_embed(Gpu *g, int dtype) {
    int rows = 1000, cols = 2048, token = 777;
    auto w = randoms((size_t)rows * cols);
    Mat m = ref_make_mat(w.data(), rows, cols, dtype);
    DevMat dm = upload(g, m);
    float *dx = dev_alloc(g, cols);
    double ms = time_ms([&] { embed_kernel<<<(cols + 255) / 256, 256>>>(dx, dm, token); });
    std::vector<float> ref(cols);
    ref_row(ref.data(), &m, token);
    char what[128];
    snprintf(what, sizeof what, "embedding row, %s", dtype_name(dtype));
    double err = rel_err(to_host(dx, cols), ref);
    report(err == 0, what, err, 0, cols * (elem_bytes(dtype) + 4.0), ms);
    ref_free_mat(&m);
}

static void check_rope(Gpu *g, const Config *c, int pos) {
    int H = c->num_attention_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim, dq = dn + dr, half = dr / 2;
    int positions = pos + 1;
    std::vector<float> cos_t((size_t)positions * half), sin_t((size_t)positions * half);
    ref_rope_tables(c, positions, cos_t.data(), sin_t.data());
    auto q = randoms((size_t)H * dq);
    float *dq_ = to_device(g, q), *dcos = to_device(g, cos_t), *dsin = to_device(g, sin_t);
    rope_kernel<<<H, half>>>(dq_ + dn, H, dq, dcos + (size_t)pos * half, dsin + (size_t)pos * half, half);
    auto got = to_host(dq_, q.size());
    double ms = time_ms([&] { rope_kernel<<<H, half>>>(dq_ + dn, H, dq, dcos + (size_t)pos * half, dsin + (size_t)pos * half, half); });
    for (int h = 0; h < H; h++) ref_rope(q.data() + (size_t)h * dq + dn, cos_t.data() + (size_t)pos * half, sin_t.data() + (size_t)pos * half, dr);
    char what[128];
    snprintf(what, sizeof what, "RoPE/YaRN, %d heads, position %d", H, pos);
    double err = rel_err(got, q);
    report(err <= 1e-6, what, err, 1e-6, 2.0 * H * dr * 4, ms);
}

/* Absorbed attention for one token over pos + 1 cached positions (dsv2.c: mla_attend_absorbed). */
static void check_attention(const Config *c, int positions, int dtype) {
    int H = c->num_attention_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim, dv = c->v_head_dim, r = c->kv_lora_rank;
    int W = r + dr, pos = positions - 1;
    auto kv_b = randoms((size_t)H * (dn + dv) * r, 0.05f), q = randoms((size_t)H * (dn + dr)), cache = randoms((size_t)positions * W);
    Mat m = ref_make_mat(kv_b.data(), H * (dn + dv), r, dtype);
    Gpu t;  /* scratch for this context */
    t.cfg = *c;
    t.context = positions;
    DevScratch s;
    std::vector<float> no_rope((size_t)positions * dr / 2);
    alloc_scratch(&t, s, no_rope.data(), no_rope.data());
    DevMat dm = upload(&t, m);
    float *dcache = to_device(&t, cache);
    CUDA_CHECK(cudaMemcpy(s.q, q.data(), q.size() * sizeof(float), cudaMemcpyHostToDevice));
    float scale = ref_softmax_scale(c);
    double ms = time_ms([&] { attend_absorbed(c, s, dm, dcache, pos, positions, scale); });
    auto got = to_host(s.head_out, (size_t)H * dv);
    std::vector<float> ref((size_t)H * dv);
    ref_attention(c, &m, q.data(), cache.data(), pos, ref.data());
    char what[128];
    snprintf(what, sizeof what, "absorbed attention, %d heads, %d positions, kv_b %s", H, positions, dtype_name(dtype));
    double err = rel_err(got, ref);
    double bytes = (double)positions * W * 4 + (double)H * (dn + dv) * r * elem_bytes(dtype);
    report(err <= 1e-4, what, err, 1e-4, bytes, ms);
    for (auto &a : t.allocations) CUDA_CHECK(cudaFree(a.second));
    ref_free_mat(&m);
}

static void check_swiglu(Gpu *g, int n) {
    auto gate = randoms(n, 4.0f), up = randoms(n);
    float *dg = to_device(g, gate), *du = to_device(g, up);
    silu_mul_kernel<<<(n + 255) / 256, 256>>>(dg, du, n);
    auto got = to_host(dg, n);
    float *dg2 = to_device(g, gate);
    double ms = time_ms([&] { silu_mul_kernel<<<(n + 255) / 256, 256>>>(dg2, du, n); });
    ref_swiglu(gate.data(), up.data(), n);
    char what[128];
    snprintf(what, sizeof what, "SwiGLU silu(gate) * up, %d", n);
    double err = rel_err(got, gate);
    report(err <= 1e-6, what, err, 1e-6, 3.0 * n * 4, ms);
}

/* The router's probabilities on the GPU, then dsv2.c's route_tokens on both: same experts. */
static void check_routing(Gpu *g, const Config *c) {
    int E = c->n_routed_experts, D = c->hidden_size, K = c->num_experts_per_tok;
    auto w = randoms((size_t)E * D, 0.05f), x = randoms(D);
    Mat m = ref_make_mat(w.data(), E, D, DTYPE_F32);
    DevMat dm = upload(g, m);
    DevScratch s;
    s.probs = dev_alloc(g, E);
    float *dx = to_device(g, x);
    double ms = time_ms([&] { router_probs(s, dm, dx); });
    auto got = to_host(s.probs, E);
    std::vector<float> ref(E);
    ref_matvec(ref.data(), &m, x.data());
    ref_softmax(ref.data(), E);
    std::vector<int> idx_gpu(K), idx_ref(K);
    std::vector<float> wt_gpu(K), wt_ref(K);
    ref_route(c, got.data(), idx_gpu.data(), wt_gpu.data());
    ref_route(c, ref.data(), idx_ref.data(), wt_ref.data());
    char what[128];
    snprintf(what, sizeof what, "router softmax, %d experts x %d, top-%d the same", E, D, K);
    double err = rel_err(got, ref);
    report(err <= 1e-6 && idx_gpu == idx_ref, what, err, 1e-6, (double)E * D * 4, ms);
    ref_free_mat(&m);
}

int main(void) {
    int device_count = 0;
    if (cudaGetDeviceCount(&device_count) != cudaSuccess || device_count == 0) {
        fprintf(stderr, "cuda_kernels: error: no CUDA device\n");
        return 1;
    }
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    printf("GPU 0: %s, compute capability %d.%d, %.1f GiB\n", prop.name, prop.major, prop.minor, prop.totalGlobalMem / 1073741824.0);
    Gpu g;
    {  /* the roofline's denominator: bytes read + written per second by a 4 GiB copy */
        size_t bytes = (size_t)4 << 30;
        void *a = dev_malloc(&g, bytes), *b = dev_malloc(&g, bytes);
        double ms = time_ms([&] { CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); });
        printf("memory bandwidth, device-to-device copy: %.0f GB/s (read + write)\n", 2.0 * bytes / ms / 1e6);
        for (auto &x : g.allocations) CUDA_CHECK(cudaFree(x.second));
        g.allocations.clear();
    }
    Config lite = ref_config(0), v2 = ref_config(1);
    g.cfg = lite;
    for (int n : {512, 1536, 2048, 5120}) check_rmsnorm(&g, n);
    for (int dtype : {DTYPE_F32, DTYPE_BF16, DTYPE_Q8}) {
        check_matvec(&g, 2048, 2048, dtype, "V2-Lite o_proj");
        check_matvec(&g, 1408, 2048, dtype, "an expert's gate");
        check_matvec(&g, 2048, 1408, dtype, "an expert's down");
        check_matvec(&g, 576, 5120, dtype, "V2 kv_a_proj");
        check_matvec(&g, 102400, 2048, dtype, "V2-Lite lm_head");
        check_matvec(&g, 37, dtype == DTYPE_Q8 ? 1120 : 1100, dtype, "ragged");
        check_matvec(&g, 3, 32, dtype, "tiny");
        check_embed(&g, dtype);
    }
    for (const Config *c : {&lite, &v2})
        for (int pos : {0, 3, 4095, 60000}) check_rope(&g, c, pos);
    for (const Config *c : {&lite, &v2})
        for (int positions : {1, 100, 5000})
            for (int dtype : {DTYPE_BF16, DTYPE_Q8}) check_attention(c, positions, dtype);
    for (int n : {1408, 10944, 12288}) check_swiglu(&g, n);
    check_routing(&g, &lite);
    check_routing(&g, &v2);
    for (auto &a : g.allocations) CUDA_CHECK(cudaFree(a.second));
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
