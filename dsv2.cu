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
 * Memory: plan_memory counts every byte per device (weights, latent caches for the context,
 * scratch, embedding, lm_head) and refuses up front, with the figures, what will not fit.
 * Checking: tests/cuda_kernels.cu runs each kernel against dsv2.c's function on the same inputs;
 * -m layers copies every layer's state to the host (cuda_tap) so that tests/compare_layers.py
 * names the first layer where GPU and CPU differ; tests/gpu_check.sh runs all of it.
 *
 * Status: built for sm_80 and sm_90 plus PTX (newer GPUs) with nvcc 13, warnings are errors;
 * not yet run on a GPU.
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
    std::vector<std::pair<int, void *>> allocations;  /* (device id, pointer): freed by cuda_destroy */
    DevMat embed, lm_head;
    const float *final_norm = nullptr;
    int embed_device = 0, head_device = 0;
    RouteFn route;
    void *route_ctx;
    float softmax_scale = 0;  /* (nope+rope)^-1/2 * mscale^2, from the host */
    std::vector<float> host_logits, host_probs, host_x;
    std::vector<int> topk_idx;
    std::vector<float> topk_weight;
    /* -m layers (cuda_tap): host arrays filled after each layer, or null */
    float *tap_hidden = nullptr, *tap_latent = nullptr, *tap_route_weight = nullptr;
    int *tap_route_idx = nullptr;
};

static size_t mat_data_bytes(const Mat &m) {
    size_t elem = m.dtype == DTYPE_Q8 ? 1 : m.dtype == DTYPE_BF16 ? 2 : 4;
    return (size_t)m.rows * m.cols * elem;
}
static size_t mat_scale_bytes(const Mat &m) {
    return m.dtype == DTYPE_Q8 ? (size_t)m.rows * (m.cols / m.group) * sizeof(float) : 0;
}
static size_t mat_bytes(const Mat &m) { return m.data ? mat_data_bytes(m) + mat_scale_bytes(m) : 0; }

/* Device memory on the current device, recorded so that cuda_destroy frees it. */
static void *dev_malloc(Gpu *g, size_t bytes) {
    void *p;
    int device;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaMalloc(&p, bytes ? bytes : 1));
    g->allocations.push_back({device, p});
    return p;
}

static void *upload_bytes(Gpu *g, const void *host, size_t bytes) {
    void *dev = dev_malloc(g, bytes);
    CUDA_CHECK(cudaMemcpy(dev, host, bytes, cudaMemcpyHostToDevice));
    return dev;
}

/* A weight matrix to the current device, as stored. */
static DevMat upload(Gpu *g, const Mat &m) {
    DevMat d;
    d.dtype = m.dtype; d.rows = m.rows; d.cols = m.cols; d.group = m.group;
    d.data = upload_bytes(g, m.data, mat_data_bytes(m));
    if (m.dtype == DTYPE_Q8) d.scale = (const float *)upload_bytes(g, m.scale, mat_scale_bytes(m));
    return d;
}

static const float *upload_vec(Gpu *g, const float *v, int n) { return (const float *)upload_bytes(g, v, (size_t)n * sizeof(float)); }

static float *dev_alloc(Gpu *g, size_t floats) {
    float *p = (float *)dev_malloc(g, floats * sizeof(float));
    CUDA_CHECK(cudaMemset(p, 0, (floats ? floats : 1) * sizeof(float)));
    return p;
}

/* Every scratch buffer of a device with its size in floats: alloc_scratch allocates these and
 * the memory plan counts the same list. */
static std::vector<std::pair<float **, size_t>> scratch_buffers(const Config *c, int context, DevScratch &s) {
    int H = c->num_attention_heads, D = c->hidden_size, E = c->n_routed_experts, r = c->kv_lora_rank, dr = c->qk_rope_head_dim;
    size_t widest = (size_t)std::max(std::max(c->intermediate_size, c->moe_intermediate_size * std::max(c->n_shared_experts, 1)), D);
    return {{&s.x, D}, {&s.xn, D}, {&s.branch, D}, {&s.q_latent, std::max(c->q_lora_rank, 1)},
            {&s.q, (size_t)H * (c->qk_nope_head_dim + dr)}, {&s.kv_a, (size_t)r + dr}, {&s.q_abs, (size_t)H * r},
            {&s.u, (size_t)H * r}, {&s.head_out, (size_t)H * c->v_head_dim}, {&s.scores, (size_t)H * context},
            {&s.hidden, widest}, {&s.hidden2, widest}, {&s.expert, D}, {&s.probs, (size_t)std::max(E, 1)},
            {&s.logits, c->vocab_size}, {&s.rope_cos, (size_t)context * dr / 2}, {&s.rope_sin, (size_t)context * dr / 2}};
}

static size_t scratch_bytes(const Config *c, int context) {
    DevScratch s;
    size_t floats = 0;
    for (auto &b : scratch_buffers(c, context, s)) floats += b.second;
    return floats * sizeof(float);
}

/* The RoPE/YaRN tables come from the host: the CPU's own numbers (dsv2.c: rope_tables). */
static void alloc_scratch(Gpu *g, DevScratch &s, const float *rope_cos, const float *rope_sin) {
    for (auto &b : scratch_buffers(&g->cfg, g->context, s)) *b.first = dev_alloc(g, b.second);
    size_t n = (size_t)g->context * g->cfg.qk_rope_head_dim / 2;
    CUDA_CHECK(cudaMemcpy(s.rope_cos, rope_cos, n * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(s.rope_sin, rope_sin, n * sizeof(float), cudaMemcpyHostToDevice));
}

/* A layer's bytes on its device: its weights and norms, and its latent cache for the context. */
static double layer_weight_bytes(const Layer &L, const Config *c) {
    const Mat *m[] = {&L.q_proj, &L.q_a_proj, &L.q_b_proj, &L.kv_a_proj, &L.kv_b_proj, &L.o_proj,
                      &L.mlp_gate, &L.mlp_up, &L.mlp_down, &L.router};
    double b = (2.0 * c->hidden_size + c->kv_lora_rank + (c->q_lora_rank > 0 ? c->q_lora_rank : 0)) * sizeof(float);
    for (const Mat *x : m) b += mat_bytes(*x);
    if (L.is_moe)
        for (int e = 0; e < c->n_routed_experts; e++)
            for (const Mat *x : {&L.expert_gate[e], &L.expert_up[e], &L.expert_down[e]}) b += mat_bytes(*x);
    return b;
}
static double layer_cache_bytes(const Config *c, int context) {
    return (double)context * (c->kv_lora_rank + c->qk_rope_head_dim) * sizeof(float);
}

static void matvec(float *y, const DevMat &W, const float *x, int accumulate = 0, float alpha = 1.0f) {
    int warps = 8;
    matvec_kernel<<<(W.rows + warps - 1) / warps, 32 * warps>>>(y, W, x, W.rows, W.rows, 0, 0, 0, accumulate, alpha);
}

/* "0", "0,1", "0,0": the devices to split the layers over. The list is read before any device
 * is asked about, so a malformed one is named as such on any machine. */
static void parse_devices(Gpu *g, const char *gpus) {
    const char *p = gpus;
    do {
        char *end;
        long id = strtol(p, &end, 10);
        if (end == p || id < 0 || id > 4096 || (*end && *end != ',') || (*end == ',' && !end[1])) {
            fprintf(stderr, "dsv2: error: -g \"%s\": expects device ids separated by commas, like 0 or 0,1\n", gpus);
            exit(1);
        }
        g->device_ids.push_back((int)id);
        p = *end == ',' ? end + 1 : end;
    } while (*p);
    g->n_devices = (int)g->device_ids.size();
    int available = 0;
    CUDA_CHECK(cudaGetDeviceCount(&available));
    for (int id : g->device_ids)
        if (id >= available) {
            fprintf(stderr, "dsv2: error: -g %s: device %d does not exist (this machine has %d)\n", gpus, id, available);
            exit(1);
        }
}

/* The memory plan: every byte the model takes on each device (its layers' weights and latent
 * caches, its scratch and RoPE tables, the embedding on the first, the final norm and lm_head on
 * the last), the layers split in proportion to what each device has free after its fixed part.
 * A model that does not fit is refused here with the figures, before anything is uploaded. */
static void plan_memory(Gpu *g, const Weights *w, const char *gpus) {
    const Config *c = &w->cfg;
    int L = c->num_hidden_layers, n = g->n_devices;
    const double reserve = 512.0 * (1 << 20), GiB = 1024.0 * 1024 * 1024;  /* the CUDA context, kernel launches */
    std::vector<double> free_bytes(n), fixed(n), layer_bytes(L), cache(n, 0), weights(n, 0);
    double total_layers = 0, total_room = 0;
    for (int l = 0; l < L; l++) total_layers += layer_bytes[l] = layer_weight_bytes(w->layers[l], c) + layer_cache_bytes(c, g->context);
    for (int d = 0; d < n; d++) {
        size_t fr, tot;
        CUDA_CHECK(cudaSetDevice(g->device_ids[d]));
        CUDA_CHECK(cudaMemGetInfo(&fr, &tot));
        free_bytes[d] = (double)fr / std::count(g->device_ids.begin(), g->device_ids.end(), g->device_ids[d]);
        fixed[d] = scratch_bytes(c, g->context) + (d == 0 ? mat_bytes(w->embed) : 0) +
                   (d == n - 1 ? mat_bytes(w->lm_head) + c->hidden_size * sizeof(float) : 0);
        total_room += std::max(0.0, free_bytes[d] - reserve - fixed[d]);
    }
    g->layers.resize(L);
    int device = 0;
    auto room = [&](int d) { return std::max(0.0, free_bytes[d] - reserve - fixed[d]); };
    double done = 0, share = total_room > 0 ? total_layers * room(0) / total_room : 0;
    for (int l = 0; l < L; l++) {
        while (total_room > 0 && done + layer_bytes[l] / 2 > share && device + 1 < n) {
            device++;
            share += total_layers * room(device) / total_room;
        }
        done += layer_bytes[l];
        g->layers[l].device = device;
        weights[device] += layer_weight_bytes(w->layers[l], c);
        cache[device] += layer_cache_bytes(c, g->context);
    }
    char plan[4096] = "", over[2048] = "";
    int n_over = 0;
    for (int d = 0; d < n; d++) {
        double need = weights[d] + cache[d] + fixed[d] + reserve;
        int first = -1, last = -1;
        for (int l = 0; l < L; l++)
            if (g->layers[l].device == d) { if (first < 0) first = l; last = l; }
        char one[512];
        snprintf(one, sizeof one,
                 "GPU %d%s: layers %d-%d, %.2f GiB (weights %.2f, KV cache %.2f, scratch/embedding/lm_head %.2f, reserve %.2f) of "
                 "%.2f GiB free",
                 g->device_ids[d], n > 1 ? (d ? " (next share)" : " (first share)") : "", first, last, need / GiB, weights[d] / GiB,
                 cache[d] / GiB, fixed[d] / GiB, reserve / GiB, free_bytes[d] / GiB);
        if (strlen(plan) + strlen(one) + 3 < sizeof plan) snprintf(plan + strlen(plan), sizeof plan - strlen(plan), "%s%s", d ? "; " : "", one);
        if (need > free_bytes[d] && n_over++ < 3) snprintf(over + strlen(over), sizeof over - strlen(over), "%s%s", n_over > 1 ? "; " : "", one);
    }
    if (n_over) {
        fprintf(stderr, "dsv2: error: the model does not fit on -g %s with context %d: %d of %d device shares are short: %s "
                "(use a smaller -c, q8 weights or more GPUs)\n", gpus, g->context, n_over, n, over);
        exit(1);
    }
    fprintf(stderr, "GPU plan (-g %s, context %d): %s\n", gpus, g->context, plan);
}

/* One layer's weights to its device, by name from the host's Weights, and its latent cache. */
static void upload_layer(Gpu *g, DevLayer &dl, const Layer &L) {
    const Config *c = &g->cfg;
    CUDA_CHECK(cudaSetDevice(g->device_ids[dl.device]));
    dl.input_norm = upload_vec(g, L.input_norm, c->hidden_size);
    if (c->q_lora_rank > 0) {
        dl.q_a_proj = upload(g, L.q_a_proj); dl.q_a_norm = upload_vec(g, L.q_a_norm, c->q_lora_rank); dl.q_b_proj = upload(g, L.q_b_proj);
    } else dl.q_proj = upload(g, L.q_proj);
    dl.kv_a_proj = upload(g, L.kv_a_proj); dl.kv_a_norm = upload_vec(g, L.kv_a_norm, c->kv_lora_rank);
    dl.kv_b_proj = upload(g, L.kv_b_proj); dl.o_proj = upload(g, L.o_proj);
    dl.post_attention_norm = upload_vec(g, L.post_attention_norm, c->hidden_size);
    dl.is_moe = L.is_moe;
    if (dl.is_moe) {
        dl.router = upload(g, L.router);
        for (int e = 0; e < c->n_routed_experts; e++) {
            dl.expert_gate.push_back(upload(g, L.expert_gate[e]));
            dl.expert_up.push_back(upload(g, L.expert_up[e]));
            dl.expert_down.push_back(upload(g, L.expert_down[e]));
        }
    }
    dl.has_mlp = L.has_mlp;
    if (dl.has_mlp) { dl.mlp_gate = upload(g, L.mlp_gate); dl.mlp_up = upload(g, L.mlp_up); dl.mlp_down = upload(g, L.mlp_down); }
    dl.cache = dev_alloc(g, (size_t)g->context * (c->kv_lora_rank + c->qk_rope_head_dim));
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
    plan_memory(g, w, gpus);
    g->scratch.resize(g->n_devices);
    for (int d = 0; d < g->n_devices; d++) {
        CUDA_CHECK(cudaSetDevice(g->device_ids[d]));
        alloc_scratch(g, g->scratch[d], rope_cos, rope_sin);
    }
    int L = c->num_hidden_layers;
    for (int l = 0; l < L; l++) upload_layer(g, g->layers[l], w->layers[l]);
    g->embed_device = 0;
    g->head_device = g->n_devices - 1;
    CUDA_CHECK(cudaSetDevice(g->device_ids[g->embed_device]));
    g->embed = upload(g, w->embed);
    CUDA_CHECK(cudaSetDevice(g->device_ids[g->head_device]));
    g->final_norm = upload_vec(g, w->final_norm, c->hidden_size);
    g->lm_head = upload(g, w->lm_head);
    g->host_logits.resize(c->vocab_size);
    g->host_probs.resize(std::max(c->n_routed_experts, 1));
    g->host_x.resize(c->hidden_size);
    g->topk_idx.resize(std::max(c->num_experts_per_tok, 1));
    g->topk_weight.resize(std::max(c->num_experts_per_tok, 1));
    return g;
}

/* SwiGLU on the device (dsv2.c: swiglu_mlp): out (+)= alpha * down(silu(gate x) * up x). */
static void swiglu(DevScratch &s, float *out, const float *x, const DevMat &gate, const DevMat &up, const DevMat &down, int accumulate, float alpha) {
    matvec(s.hidden, gate, x);
    matvec(s.hidden2, up, x);
    silu_mul_kernel<<<(gate.rows + 255) / 256, 256>>>(s.hidden, s.hidden2, gate.rows);
    matvec(out, down, s.hidden, accumulate, alpha);
}

/* Absorbed MLA for one token at position pos (dsv2.c: mla_attend_absorbed): s.q (rotated) and
 * the cache rows 0..pos in, s.head_out [H][dv] out. */
static void attend_absorbed(const Config *c, DevScratch &s, const DevMat &kv_b_proj, const float *cache, int pos, int context,
                            float softmax_scale) {
    int H = c->num_attention_heads, nope = c->qk_nope_head_dim, rope = c->qk_rope_head_dim, r = c->kv_lora_rank;
    int dv = c->v_head_dim, q_head_dim = nope + rope, kv_head_rows = nope + dv;
    absorb_query_kernel<<<dim3((r + 127) / 128, H), 128>>>(s.q_abs, kv_b_proj, s.q, r, nope, q_head_dim, kv_head_rows);
    latent_scores_kernel<<<dim3((pos + 1 + 7) / 8, H), 256>>>(s.scores, s.q_abs, s.q, cache, pos + 1, r, rope, nope, q_head_dim,
                                                               context, softmax_scale);
    softmax_kernel<<<H, 256>>>(s.scores, pos + 1, context);
    latent_sum_kernel<<<dim3((r + 127) / 128, H), 128>>>(s.u, s.scores, cache, pos + 1, r, rope, context);
    /* o[h] = W_UV[h] u[h]: kv_b_proj rows h*(nope+v)+nope.. of each head, x = u[h] */
    matvec_kernel<<<(H * dv + 7) / 8, 256>>>(s.head_out, kv_b_proj, s.u, H * dv, dv, kv_head_rows, nope, r, 0, 1.0f);
}

/* The router's probabilities s_i,t (dsv2.c: router_forward before route_tokens) into s.probs. */
static void router_probs(DevScratch &s, const DevMat &router, const float *xn) {
    matvec(s.probs, router, xn);
    softmax_kernel<<<1, 256>>>(s.probs, router.rows, router.rows);
}

/* Moves the hidden state to another device (a peer copy, or a plain copy on the same device). */
static void move_hidden(Gpu *g, int from, int to) {
    if (from == to) return;
    int D = g->cfg.hidden_size;
    CUDA_CHECK(cudaMemcpyPeer(g->scratch[to].x, g->device_ids[to], g->scratch[from].x, g->device_ids[from], D * sizeof(float)));
}

/* -m layers: what layer l left for this token, copied to the host (a synchronous copy per layer:
 * slow, for tests only). */
static void tap_layer(Gpu *g, DevScratch &s, const DevLayer &L, int l, int pos) {
    const Config *c = &g->cfg;
    int D = c->hidden_size, W = c->kv_lora_rank + c->qk_rope_head_dim, K = c->num_experts_per_tok;
    CUDA_CHECK(cudaMemcpy(g->tap_hidden + (size_t)l * D, s.x, D * sizeof(float), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(g->tap_latent + (size_t)l * W, L.cache + (size_t)pos * W, W * sizeof(float), cudaMemcpyDeviceToHost));
    if (L.is_moe) {
        memcpy(g->tap_route_idx + (size_t)l * K, g->topk_idx.data(), K * sizeof(int));
        memcpy(g->tap_route_weight + (size_t)l * K, g->topk_weight.data(), K * sizeof(float));
    }
}

/* One token at position pos (dsv2.c: forward_batch with n = 1). */
static float *forward_token(Gpu *g, int token, int pos) {
    const Config *c = &g->cfg;
    int H = c->num_attention_heads, D = c->hidden_size, nope = c->qk_nope_head_dim, rope = c->qk_rope_head_dim;
    int r = c->kv_lora_rank, q_head_dim = nope + rope, half = rope / 2;
    int K = c->num_experts_per_tok;
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
        attend_absorbed(c, s, L.kv_b_proj, L.cache, pos, g->context, g->softmax_scale);
        matvec(s.branch, L.o_proj, s.head_out);
        add_kernel<<<(D + 255) / 256, 256>>>(s.x, s.branch, D);
        rmsnorm_kernel<<<1, 256>>>(s.xn, s.x, L.post_attention_norm, D, (float)c->rms_norm_eps);
        if (L.has_mlp) swiglu(s, s.branch, s.xn, L.mlp_gate, L.mlp_up, L.mlp_down, 0, 1.0f);
        else CUDA_CHECK(cudaMemset(s.branch, 0, D * sizeof(float)));
        if (L.is_moe) {  /* router on the GPU, the choice on the host (dsv2.c's route_tokens) */
            router_probs(s, L.router, s.xn);
            CUDA_CHECK(cudaMemcpy(g->host_probs.data(), s.probs, c->n_routed_experts * sizeof(float), cudaMemcpyDeviceToHost));
            g->route(g->route_ctx, g->host_probs.data(), g->topk_idx.data(), g->topk_weight.data());
            for (int k = 0; k < K; k++) {
                int e = g->topk_idx[k];
                swiglu(s, s.branch, s.xn, L.expert_gate[e], L.expert_up[e], L.expert_down[e], 1, g->topk_weight[k]);
            }
        }
        add_kernel<<<(D + 255) / 256, 256>>>(s.x, s.branch, D);
        if (g->tap_hidden) tap_layer(g, s, L, l, pos);
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

extern "C" void cuda_tap(void *gpu, float *hidden, float *latent, int *route_idx, float *route_weight) {
    Gpu *g = (Gpu *)gpu;
    g->tap_hidden = hidden; g->tap_latent = latent; g->tap_route_idx = route_idx; g->tap_route_weight = route_weight;
}

extern "C" void cuda_destroy(void *gpu) {
    Gpu *g = (Gpu *)gpu;
    if (!g) return;
    for (auto &a : g->allocations) {
        CUDA_CHECK(cudaSetDevice(a.first));
        CUDA_CHECK(cudaFree(a.second));
    }
    delete g;
}
