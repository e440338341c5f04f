/*
 * dsv2.cu: the DeepSeek-V2 forward pass on NVIDIA GPUs, mirroring dsv2.c step by step.
 *
 * dsv2.c stays the host program (checkpoint, tokenizer, sampler, CLI); built with -DDSV2_CUDA
 * and linked with this file (make cuda -> ./dsv2cu), its forward() sends tokens here. Weights
 * (f32, bf16 or q8, read as stored) are copied to the GPUs once; activations and accumulation are
 * float32 (fp16 overflows in this model's MoE). Attention is the absorbed MLA decode over a latent
 * cache on the GPU: kv_lora_rank + qk_rope_head_dim floats per token per layer. The router's E
 * probabilities come back to the host, which picks experts with dsv2.c's own route_tokens; only
 * the chosen experts run. Several GPUs: -g 0,1 splits the layers by free memory and moves the
 * hidden state between devices; -g 0,0 runs the same split on one device (tests the split).
 *
 * Status: built for sm_80 and sm_90 with nvcc 13 (warnings are errors); not yet run on a GPU.
 */
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <algorithm>
#include <vector>

/* Config, Mat, Layer, Weights and the interface below (cuda_create, cuda_forward, cuda_destroy):
 * declared once, in dsv2.c, which this includes up to the end of its type declarations. */
extern "C" {
#define DSV2_TYPES_ONLY
#include "dsv2.c"
#undef DSV2_TYPES_ONLY
}


#define CUDA_CHECK(call)                                                                             \
    do {                                                                                             \
        cudaError_t err_ = (call);                                                                   \
        if (err_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "dsv2: error: CUDA: %s (%s:%d)\n", cudaGetErrorString(err_), __FILE__, __LINE__); \
            exit(1);                                                                                 \
        }                                                                                            \
    } while (0)

/* ------------------------------------------------------------------------- */
/* Kernels (each mirrors the dsv2.c function named in its comment)            */
/* ------------------------------------------------------------------------- */

/* A weight matrix on the device: as stored in the checkpoint. */
struct DevMat {
    const void *data = nullptr;
    const float *scale = nullptr;
    int dtype = DTYPE_F32, rows = 0, cols = 0, group = 1;
};

__device__ __forceinline__ float weight_at(const DevMat &W, size_t i) {
    if (W.dtype == DTYPE_BF16) return __uint_as_float((uint32_t)((const uint16_t *)W.data)[i] << 16);
    if (W.dtype == DTYPE_Q8) return ((const int8_t *)W.data)[i] * W.scale[i / W.group];
    return ((const float *)W.data)[i];
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* matmul with n = 1 (dsv2.c: matmul): one warp per output row, float32 sums.
 * Rows map to weights in groups so that per-head slices of kv_b_proj need no copy: output row o
 * reads weight row (o / rows_per_group) * group_stride + group_offset + o % rows_per_group, and
 * x + (o / rows_per_group) * x_stride. A plain matrix: rows_per_group = rows, the rest 0. */
__global__ void matvec_kernel(float *y, DevMat W, const float *x, int rows, int rows_per_group, int group_stride,
                              int group_offset, int x_stride, int accumulate, float alpha) {
    int o = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (o >= rows) return;
    int g = o / rows_per_group;
    size_t row = (size_t)g * group_stride + group_offset + o % rows_per_group;
    const float *xg = x + (size_t)g * x_stride;
    float sum = 0.0f;
    for (int i = lane; i < W.cols; i += 32) sum += weight_at(W, row * W.cols + i) * xg[i];
    sum = warp_sum(sum);
    if (lane == 0) y[o] = accumulate ? y[o] + alpha * sum : alpha * sum;
}

/* y^T = x^T W over one head's rows (dsv2.c: matvec_transposed): q_abs[h] = W_UK[h]^T q_nope[h]. */
__global__ void absorb_query_kernel(float *q_abs, DevMat kv_b, const float *q, int rank, int nope, int q_head_dim, int kv_head_rows) {
    int h = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= rank) return;
    const float *q_nope = q + (size_t)h * q_head_dim;
    float sum = 0.0f;
    for (int r = 0; r < nope; r++) sum += q_nope[r] * weight_at(kv_b, ((size_t)h * kv_head_rows + r) * rank + c);
    q_abs[(size_t)h * rank + c] = sum;
}

/* RMSNorm of one vector (dsv2.c: rmsnorm), one block. */
__global__ void rmsnorm_kernel(float *out, const float *x, const float *w, int n, float eps) {
    __shared__ float partial[32];
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += x[i] * x[i];
    ss = warp_sum(ss);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.0f;
        v = warp_sum(v);
        if (threadIdx.x == 0) partial[0] = rsqrtf(v / n + eps);
    }
    __syncthreads();
    float inv = partial[0];
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = w[i] * (x[i] * inv);
}

/* RoPE on interleaved pairs (dsv2.c: rope_rotate), for `count` vectors `stride` apart. */
__global__ void rope_kernel(float *x, int count, int stride, const float *cos_row, const float *sin_row, int half) {
    int v = blockIdx.x, i = threadIdx.x;
    if (v >= count || i >= half) return;
    float *p = x + (size_t)v * stride;
    float a = p[2 * i], b = p[2 * i + 1];
    p[2 * i] = a * cos_row[i] - b * sin_row[i];
    p[2 * i + 1] = a * sin_row[i] + b * cos_row[i];
}

/* Scores against the latent cache (dsv2.c: mla_attend_absorbed): one warp per (head, position). */
__global__ void latent_scores_kernel(float *scores, const float *q_abs, const float *q, const float *cache, int positions, int rank,
                                     int rope, int nope, int q_head_dim, int context, float scale) {
    int h = blockIdx.y, j = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (j >= positions) return;
    const float *cj = cache + (size_t)j * (rank + rope), *qa = q_abs + (size_t)h * rank, *q_pe = q + (size_t)h * q_head_dim + nope;
    float sum = 0.0f;
    for (int i = lane; i < rank; i += 32) sum += qa[i] * cj[i];
    for (int i = lane; i < rope; i += 32) sum += q_pe[i] * cj[rank + i];
    sum = warp_sum(sum);
    if (lane == 0) scores[(size_t)h * context + j] = scale * sum;
}

/* In-place softmax of each head's scores (dsv2.c: softmax), one block per head. */
__global__ void softmax_kernel(float *scores, int n, int stride) {
    __shared__ float red[32];
    float *s = scores + (size_t)blockIdx.x * stride;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) mx = fmaxf(mx, s[i]);
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = mx;
    __syncthreads();
    mx = red[0];
    for (int k = 1; k < (int)blockDim.x / 32; k++) mx = fmaxf(mx, red[k]);
    __syncthreads();
    float sum = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { s[i] = expf(s[i] - mx); sum += s[i]; }
    sum = warp_sum(sum);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = sum;
    __syncthreads();
    sum = 0.0f;
    for (int k = 0; k < (int)blockDim.x / 32; k++) sum += red[k];
    for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] /= sum;
}

/* u[h] = sum_j P[h][j] c_j (dsv2.c: mla_attend_absorbed). */
__global__ void latent_sum_kernel(float *u, const float *scores, const float *cache, int positions, int rank, int rope, int context) {
    int h = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rank) return;
    const float *p = scores + (size_t)h * context;
    float sum = 0.0f;
    for (int j = 0; j < positions; j++) sum += p[j] * cache[(size_t)j * (rank + rope) + i];
    u[(size_t)h * rank + i] = sum;
}

__global__ void silu_mul_kernel(float *g, const float *u, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

__global__ void add_kernel(float *x, const float *y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

__global__ void embed_kernel(float *x, DevMat E, int token) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < E.cols) x[i] = weight_at(E, (size_t)token * E.cols + i);
}

/* ------------------------------------------------------------------------- */
/* The model on the GPUs                                                      */
/* ------------------------------------------------------------------------- */

struct DevLayer {
    int device = 0, is_moe = 0, has_mlp = 0;
    const float *input_norm = nullptr, *post_attention_norm = nullptr, *q_a_norm = nullptr, *kv_a_norm = nullptr;
    DevMat q_proj, q_a_proj, q_b_proj, kv_a_proj, kv_b_proj, o_proj, mlp_gate, mlp_up, mlp_down, router;
    std::vector<DevMat> expert_gate, expert_up, expert_down;
    float *cache = nullptr;  /* [context][kv_lora_rank + rope] */
};

struct DevScratch {  /* per device */
    float *x, *xn, *branch, *q_latent, *q, *kv_a, *q_abs, *u, *head_out, *scores, *hidden, *hidden2, *expert, *probs, *logits;
    float *rope_cos, *rope_sin;
};

struct Gpu {
    Config cfg;
    int context, n_devices;
    std::vector<int> device_ids;
    std::vector<DevLayer> layers;
    std::vector<DevScratch> scratch;
    DevMat embed, lm_head;
    const float *final_norm = nullptr;
    int embed_device = 0, head_device = 0;
    RouteFn route;
    void *route_ctx;
    float softmax_scale = 0;  /* (nope+rope)^-1/2 * mscale^2, from the host */
    std::vector<float> host_logits, host_probs, host_x;
    std::vector<int> topk_idx;
    std::vector<float> topk_weight;
};

static size_t mat_data_bytes(const Mat &m) {
    size_t elem = m.dtype == DTYPE_Q8 ? 1 : m.dtype == DTYPE_BF16 ? 2 : 4;
    return (size_t)m.rows * m.cols * elem;
}
static size_t mat_scale_bytes(const Mat &m) {
    return m.dtype == DTYPE_Q8 ? (size_t)m.rows * (m.cols / m.group) * sizeof(float) : 0;
}

static void *upload_bytes(const void *host, size_t bytes) {
    void *dev;
    CUDA_CHECK(cudaMalloc(&dev, bytes ? bytes : 1));
    CUDA_CHECK(cudaMemcpy(dev, host, bytes, cudaMemcpyHostToDevice));
    return dev;
}

/* A weight matrix to the current device, as stored. */
static DevMat upload(const Mat &m) {
    DevMat d;
    d.dtype = m.dtype; d.rows = m.rows; d.cols = m.cols; d.group = m.group;
    d.data = upload_bytes(m.data, mat_data_bytes(m));
    if (m.dtype == DTYPE_Q8) d.scale = (const float *)upload_bytes(m.scale, mat_scale_bytes(m));
    return d;
}

static const float *upload_vec(const float *v, int n) { return (const float *)upload_bytes(v, (size_t)n * sizeof(float)); }

static float *dev_alloc(size_t floats) {
    float *p;
    CUDA_CHECK(cudaMalloc(&p, (floats ? floats : 1) * sizeof(float)));
    CUDA_CHECK(cudaMemset(p, 0, (floats ? floats : 1) * sizeof(float)));
    return p;
}

/* A layer's weight bytes, to split the layers by free memory on each device. */
static double layer_weight_bytes(const Layer &L, const Config *c) {
    const Mat *m[] = {&L.q_proj, &L.q_a_proj, &L.q_b_proj, &L.kv_a_proj, &L.kv_b_proj, &L.o_proj,
                      &L.mlp_gate, &L.mlp_up, &L.mlp_down, &L.router};
    double b = 0;
    for (const Mat *x : m) b += x->data ? mat_data_bytes(*x) + mat_scale_bytes(*x) : 0;
    if (L.is_moe)
        for (int e = 0; e < c->n_routed_experts; e++)
            for (const Mat *x : {&L.expert_gate[e], &L.expert_up[e], &L.expert_down[e]})
                b += mat_data_bytes(*x) + mat_scale_bytes(*x);
    return b;
}

static void matvec(float *y, const DevMat &W, const float *x, int accumulate = 0, float alpha = 1.0f) {
    int warps = 8;
    matvec_kernel<<<(W.rows + warps - 1) / warps, 32 * warps>>>(y, W, x, W.rows, W.rows, 0, 0, 0, accumulate, alpha);
}

/* The RoPE/YaRN tables come from the host: the CPU's own numbers (dsv2.c: rope_tables). */
static void upload_rope(Gpu *g, DevScratch &s, const float *cos_table, const float *sin_table) {
    size_t n = (size_t)g->context * g->cfg.qk_rope_head_dim / 2;
    s.rope_cos = dev_alloc(n);
    s.rope_sin = dev_alloc(n);
    CUDA_CHECK(cudaMemcpy(s.rope_cos, cos_table, n * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(s.rope_sin, sin_table, n * sizeof(float), cudaMemcpyHostToDevice));
}

/* "0", "0,1", "0,0": the devices to split the layers over. */
static void parse_devices(Gpu *g, const char *gpus) {
    int available = 0;
    CUDA_CHECK(cudaGetDeviceCount(&available));
    for (const char *p = gpus; *p;) {
        char *end;
        long id = strtol(p, &end, 10);
        if (end == p || id < 0 || id >= available) {
            fprintf(stderr, "dsv2: error: -g %s: device ids must be in [0, %d)\n", gpus, available);
            exit(1);
        }
        g->device_ids.push_back((int)id);
        p = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') { fprintf(stderr, "dsv2: error: -g expects a list like 0,1\n"); exit(1); }
    }
    g->n_devices = (int)g->device_ids.size();
}

/* Split the layers so each device gets a share proportional to its free memory. */
static void split_layers(Gpu *g, const Weights *w) {
    const Config *c = &w->cfg;
    int L = c->num_hidden_layers;
    std::vector<double> free_bytes(g->n_devices);
    double total_free = 0, total_layers = 0;
    for (int l = 0; l < L; l++) total_layers += layer_weight_bytes(w->layers[l], c);
    for (int d = 0; d < g->n_devices; d++) {
        size_t fr, tot;
        CUDA_CHECK(cudaSetDevice(g->device_ids[d]));
        CUDA_CHECK(cudaMemGetInfo(&fr, &tot));
        free_bytes[d] = (double)fr / std::count(g->device_ids.begin(), g->device_ids.end(), g->device_ids[d]);
        total_free += free_bytes[d];
    }
    g->layers.resize(L);
    double done = 0, share = total_layers * free_bytes[0] / total_free;
    int device = 0;
    for (int l = 0; l < L; l++) {
        double b = layer_weight_bytes(w->layers[l], c);
        if (done + b / 2 > share && device + 1 < g->n_devices) { device++; share += total_layers * free_bytes[device] / total_free; }
        done += b;
        g->layers[l].device = device;
    }
}

static void alloc_scratch(Gpu *g, DevScratch &s, const float *rope_cos, const float *rope_sin) {
    const Config *c = &g->cfg;
    int H = c->num_attention_heads, D = c->hidden_size, E = c->n_routed_experts, r = c->kv_lora_rank, dr = c->qk_rope_head_dim;
    int widest = std::max(std::max(c->intermediate_size, c->moe_intermediate_size * std::max(c->n_shared_experts, 1)), D);
    s.x = dev_alloc(D); s.xn = dev_alloc(D); s.branch = dev_alloc(D); s.q_latent = dev_alloc(c->q_lora_rank);
    s.q = dev_alloc((size_t)H * (c->qk_nope_head_dim + dr)); s.kv_a = dev_alloc(r + dr); s.q_abs = dev_alloc((size_t)H * r);
    s.u = dev_alloc((size_t)H * r); s.head_out = dev_alloc((size_t)H * c->v_head_dim); s.scores = dev_alloc((size_t)H * g->context);
    s.hidden = dev_alloc(widest); s.hidden2 = dev_alloc(widest); s.expert = dev_alloc(D); s.probs = dev_alloc(E);
    s.logits = dev_alloc(c->vocab_size);
    upload_rope(g, s, rope_cos, rope_sin);
}

/* One layer's weights to its device, by name from the host's Weights, and its latent cache. */
static void upload_layer(Gpu *g, DevLayer &dl, const Layer &L) {
    const Config *c = &g->cfg;
    CUDA_CHECK(cudaSetDevice(g->device_ids[dl.device]));
    dl.input_norm = upload_vec(L.input_norm, c->hidden_size);
    if (c->q_lora_rank > 0) {
        dl.q_a_proj = upload(L.q_a_proj); dl.q_a_norm = upload_vec(L.q_a_norm, c->q_lora_rank); dl.q_b_proj = upload(L.q_b_proj);
    } else dl.q_proj = upload(L.q_proj);
    dl.kv_a_proj = upload(L.kv_a_proj); dl.kv_a_norm = upload_vec(L.kv_a_norm, c->kv_lora_rank);
    dl.kv_b_proj = upload(L.kv_b_proj); dl.o_proj = upload(L.o_proj);
    dl.post_attention_norm = upload_vec(L.post_attention_norm, c->hidden_size);
    dl.is_moe = L.is_moe;
    if (dl.is_moe) {
        dl.router = upload(L.router);
        for (int e = 0; e < c->n_routed_experts; e++) {
            dl.expert_gate.push_back(upload(L.expert_gate[e]));
            dl.expert_up.push_back(upload(L.expert_up[e]));
            dl.expert_down.push_back(upload(L.expert_down[e]));
        }
    }
    dl.has_mlp = L.has_mlp;
    if (dl.has_mlp) { dl.mlp_gate = upload(L.mlp_gate); dl.mlp_up = upload(L.mlp_up); dl.mlp_down = upload(L.mlp_down); }
    dl.cache = dev_alloc((size_t)g->context * (c->kv_lora_rank + c->qk_rope_head_dim));
}

extern "C" void *cuda_create(const Weights *w, int context, const char *gpus, RouteFn route, void *route_ctx,
                             const float *rope_cos, const float *rope_sin, float softmax_scale) {
    const Config *c = &w->cfg;
    Gpu *g = new Gpu();
    g->cfg = *c;
    g->context = context;
    g->route = route;
    g->route_ctx = route_ctx;
    g->softmax_scale = softmax_scale;
    parse_devices(g, gpus);
    split_layers(g, w);
    g->scratch.resize(g->n_devices);
    for (int d = 0; d < g->n_devices; d++) {
        CUDA_CHECK(cudaSetDevice(g->device_ids[d]));
        alloc_scratch(g, g->scratch[d], rope_cos, rope_sin);
    }
    int L = c->num_hidden_layers;
    for (int l = 0; l < L; l++) upload_layer(g, g->layers[l], w->layers[l]);
    g->embed_device = 0;
    g->head_device = g->layers[L - 1].device;
    CUDA_CHECK(cudaSetDevice(g->device_ids[g->embed_device]));
    g->embed = upload(w->embed);
    CUDA_CHECK(cudaSetDevice(g->device_ids[g->head_device]));
    g->final_norm = upload_vec(w->final_norm, c->hidden_size);
    g->lm_head = upload(w->lm_head);
    g->host_logits.resize(c->vocab_size);
    g->host_probs.resize(c->n_routed_experts);
    g->host_x.resize(c->hidden_size);
    g->topk_idx.resize(c->num_experts_per_tok);
    g->topk_weight.resize(c->num_experts_per_tok);
    fprintf(stderr, "GPU split (-g %s): the device of each layer:", gpus);
    for (int l = 0; l < L; l++) fprintf(stderr, " %d", g->device_ids[g->layers[l].device]);
    fprintf(stderr, "\n");
    return g;
}

/* SwiGLU on the device (dsv2.c: swiglu_mlp): out (+)= alpha * down(silu(gate x) * up x). */
static void swiglu(DevScratch &s, float *out, const float *x, const DevMat &gate, const DevMat &up, const DevMat &down, int accumulate, float alpha) {
    matvec(s.hidden, gate, x);
    matvec(s.hidden2, up, x);
    silu_mul_kernel<<<(gate.rows + 255) / 256, 256>>>(s.hidden, s.hidden2, gate.rows);
    matvec(out, down, s.hidden, accumulate, alpha);
}

/* Moves the hidden state to another device (a peer copy, or a plain copy on the same device). */
static void move_hidden(Gpu *g, int from, int to) {
    if (from == to) return;
    int D = g->cfg.hidden_size;
    CUDA_CHECK(cudaMemcpyPeer(g->scratch[to].x, g->device_ids[to], g->scratch[from].x, g->device_ids[from], D * sizeof(float)));
}

/* One token at position pos (dsv2.c: forward_batch with n = 1). */
static float *forward_token(Gpu *g, int token, int pos) {
    const Config *c = &g->cfg;
    int H = c->num_attention_heads, D = c->hidden_size, nope = c->qk_nope_head_dim, rope = c->qk_rope_head_dim;
    int r = c->kv_lora_rank, dv = c->v_head_dim, q_head_dim = nope + rope, kv_head_rows = nope + dv, half = rope / 2;
    int K = c->num_experts_per_tok, E = c->n_routed_experts;
    float softmax_scale = g->softmax_scale;
    int dev = g->embed_device;
    CUDA_CHECK(cudaSetDevice(g->device_ids[dev]));
    embed_kernel<<<(D + 255) / 256, 256>>>(g->scratch[dev].x, g->embed, token);
    for (int l = 0; l < c->num_hidden_layers; l++) {
        DevLayer &L = g->layers[l];
        if (L.device != dev) { move_hidden(g, dev, L.device); dev = L.device; CUDA_CHECK(cudaSetDevice(g->device_ids[dev])); }
        DevScratch &s = g->scratch[dev];
        const float *cos_row = s.rope_cos + (size_t)pos * half, *sin_row = s.rope_sin + (size_t)pos * half;
        rmsnorm_kernel<<<1, 256>>>(s.xn, s.x, L.input_norm, D, (float)c->rms_norm_eps);
        if (c->q_lora_rank > 0) {
            matvec(s.q_latent, L.q_a_proj, s.xn);
            rmsnorm_kernel<<<1, 256>>>(s.q_latent, s.q_latent, L.q_a_norm, c->q_lora_rank, 1e-6f);
            matvec(s.q, L.q_b_proj, s.q_latent);
        } else matvec(s.q, L.q_proj, s.xn);
        rope_kernel<<<H, half>>>(s.q + nope, H, q_head_dim, cos_row, sin_row, half);
        matvec(s.kv_a, L.kv_a_proj, s.xn);
        rmsnorm_kernel<<<1, 256>>>(s.kv_a, s.kv_a, L.kv_a_norm, r, 1e-6f);
        rope_kernel<<<1, half>>>(s.kv_a + r, 1, rope, cos_row, sin_row, half);
        CUDA_CHECK(cudaMemcpyAsync(L.cache + (size_t)pos * (r + rope), s.kv_a, (r + rope) * sizeof(float), cudaMemcpyDeviceToDevice));
        absorb_query_kernel<<<dim3((r + 127) / 128, H), 128>>>(s.q_abs, L.kv_b_proj, s.q, r, nope, q_head_dim, kv_head_rows);
        latent_scores_kernel<<<dim3((pos + 1 + 7) / 8, H), 256>>>(s.scores, s.q_abs, s.q, L.cache, pos + 1, r, rope, nope, q_head_dim,
                                                                   g->context, softmax_scale);
        softmax_kernel<<<H, 256>>>(s.scores, pos + 1, g->context);
        latent_sum_kernel<<<dim3((r + 127) / 128, H), 128>>>(s.u, s.scores, L.cache, pos + 1, r, rope, g->context);
        /* o[h] = W_UV[h] u[h]: kv_b_proj rows h*(nope+v)+nope.. of each head, x = u[h] */
        matvec_kernel<<<(H * dv + 7) / 8, 256>>>(s.head_out, L.kv_b_proj, s.u, H * dv, dv, kv_head_rows, nope, r, 0, 1.0f);
        matvec(s.branch, L.o_proj, s.head_out);
        add_kernel<<<(D + 255) / 256, 256>>>(s.x, s.branch, D);
        rmsnorm_kernel<<<1, 256>>>(s.xn, s.x, L.post_attention_norm, D, (float)c->rms_norm_eps);
        if (L.has_mlp) swiglu(s, s.branch, s.xn, L.mlp_gate, L.mlp_up, L.mlp_down, 0, 1.0f);
        else CUDA_CHECK(cudaMemset(s.branch, 0, D * sizeof(float)));
        if (L.is_moe) {  /* router on the GPU, the choice on the host (dsv2.c's route_tokens) */
            matvec(s.probs, L.router, s.xn);
            softmax_kernel<<<1, 256>>>(s.probs, E, E);
            CUDA_CHECK(cudaMemcpy(g->host_probs.data(), s.probs, E * sizeof(float), cudaMemcpyDeviceToHost));
            g->route(g->route_ctx, g->host_probs.data(), g->topk_idx.data(), g->topk_weight.data());
            for (int k = 0; k < K; k++) {
                int e = g->topk_idx[k];
                swiglu(s, s.branch, s.xn, L.expert_gate[e], L.expert_up[e], L.expert_down[e], 1, g->topk_weight[k]);
            }
        }
        add_kernel<<<(D + 255) / 256, 256>>>(s.x, s.branch, D);
    }
    if (dev != g->head_device) { move_hidden(g, dev, g->head_device); dev = g->head_device; CUDA_CHECK(cudaSetDevice(g->device_ids[dev])); }
    DevScratch &s = g->scratch[dev];
    rmsnorm_kernel<<<1, 256>>>(s.xn, s.x, g->final_norm, D, (float)c->rms_norm_eps);
    matvec(s.logits, g->lm_head, s.xn);
    CUDA_CHECK(cudaGetLastError());
    CUDA_CHECK(cudaMemcpy(g->host_logits.data(), s.logits, c->vocab_size * sizeof(float), cudaMemcpyDeviceToHost));
    return g->host_logits.data();
}

extern "C" float *cuda_forward(void *gpu, const int *tokens, int n, int pos) {
    float *logits = nullptr;
    for (int i = 0; i < n; i++) logits = forward_token((Gpu *)gpu, tokens[i], pos + i);
    return logits;
}

extern "C" void cuda_destroy(void *gpu) {
    /* Device memory goes with the process; the host side is freed here. */
    delete (Gpu *)gpu;
}
