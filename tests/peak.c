/* The machine's arithmetic peak, the roofline for prefill: every thread runs independent chains
 * of 8-wide float FMAs (2 flops per lane) and, on x86 with AVX2, of int8 products the way the
 * q8 kernel does them (vpmaddubsw + vpmaddwd: 32 multiply-adds per pair, 64 ops). Prints the
 * best of five passes in GFLOP/s and GOP/s. Portable C elsewhere: the compiler's best for the
 * float loop, and the int8 figure is left out.  cc -O3 -march=native -fopenmp tests/peak.c */
#include <omp.h>
#include <stdio.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

enum { CHAINS = 10, STEPS = 1 << 24 };

/* The float chains in registers with AVX2: the plain C below kept acc in memory under GCC 12
 * (each FMA waiting on a store and a load: 83.5 GFLOP/s on 2 Zen 5 cores, 1/3 of the peak). */
static double fma_pass(void) {
    double t0 = omp_get_wtime(), sink = 0;
#pragma omp parallel reduction(+ : sink)
    {
#if defined(__AVX2__) && defined(__FMA__)
        __m256 acc[CHAINS], m = _mm256_set1_ps(0.999999f), a = _mm256_set1_ps(1e-7f);
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm256_set1_ps((float)c * 1e-3f);
        for (int s = 0; s < STEPS / 8; s++)
            for (int c = 0; c < CHAINS; c++) acc[c] = _mm256_fmadd_ps(acc[c], m, a);
        float lanes[8];
        for (int c = 0; c < CHAINS; c++) {
            _mm256_storeu_ps(lanes, acc[c]);
            for (int l = 0; l < 8; l++) sink += lanes[l];
        }
#else
        float acc[CHAINS][8];
        for (int c = 0; c < CHAINS; c++)
            for (int l = 0; l < 8; l++) acc[c][l] = (float)(c + l) * 1e-3f;
        for (int s = 0; s < STEPS / 8; s++)
            for (int c = 0; c < CHAINS; c++)
#pragma omp simd
                for (int l = 0; l < 8; l++) acc[c][l] = acc[c][l] * 0.999999f + 1e-7f;
        for (int c = 0; c < CHAINS; c++)
            for (int l = 0; l < 8; l++) sink += acc[c][l];
#endif
    }
    double dt = omp_get_wtime() - t0;
    if (sink == 42) printf(" ");  /* keeps the loop */
    return 2.0 * 8 * CHAINS * (STEPS / 8) * omp_get_max_threads() / dt / 1e9;
}

#if defined(__AVX2__) && defined(__FMA__)
/* Each chain multiplies its own x: with one x for all, GCC computed the product once per step
 * and the chains only added it (1,178 "GOP/s" on 2 Zen 5 cores). Six named chains, not an array:
 * GCC kept an array on the stack (a store and a load in every chain), and six spilled with AVX2's
 * 16 registers. The products hang off no chain; four adds a step are enough to keep them fed. */
#define INT8_STEP(acc, x)                                                                      \
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones));       \
    __asm__ volatile("" : "+x"(x)) /* not hoisted out of the loop */
static double int8_pass(void) {
    double t0 = omp_get_wtime();
    int sink = 0;
#pragma omp parallel reduction(+ : sink)
    {
        const __m256i w = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
        __m256i x0 = _mm256_set1_epi8(-5), x1 = _mm256_set1_epi8(-4), x2 = _mm256_set1_epi8(-3),
                x3 = _mm256_set1_epi8(-2);
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (int s = 0; s < STEPS / 8; s++) {
            INT8_STEP(a0, x0); INT8_STEP(a1, x1); INT8_STEP(a2, x2); INT8_STEP(a3, x3);
        }
        __m256i all = _mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3));
        sink += _mm256_extract_epi32(all, 0);
    }
    double dt = omp_get_wtime() - t0;
    if (sink == 42) printf(" ");
    return 64.0 * 4 * (STEPS / 8) * omp_get_max_threads() / dt / 1e9;
}
#endif

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
/* AVX-512: 16-wide FMAs, and the int8 products as the VNNI q8 kernel does them (vpdpbusd zmm:
 * 64 multiply-adds, 128 ops) */
static double fma512_pass(void) {
    double t0 = omp_get_wtime(), sink = 0;
#pragma omp parallel reduction(+ : sink)
    {
        __m512 acc[CHAINS], m = _mm512_set1_ps(0.999999f), a = _mm512_set1_ps(1e-7f);
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_set1_ps((float)c * 1e-3f);
        for (int s = 0; s < STEPS / 16; s++)
            for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_fmadd_ps(acc[c], m, a);
        for (int c = 0; c < CHAINS; c++) sink += _mm512_reduce_add_ps(acc[c]);
    }
    double dt = omp_get_wtime() - t0;
    if (sink == 42) printf(" ");
    return 2.0 * 16 * CHAINS * (STEPS / 16) * omp_get_max_threads() / dt / 1e9;
}

static double vnni_pass(void) {
    double t0 = omp_get_wtime();
    int sink = 0;
#pragma omp parallel reduction(+ : sink)
    {
        __m512i acc[CHAINS], w = _mm512_set1_epi8(3), x = _mm512_set1_epi8(-5);
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_setzero_si512();
        for (int s = 0; s < STEPS / 16; s++) {
            for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_dpbusd_epi32(acc[c], w, x);
            __asm__ volatile("" : "+v"(w), "+v"(x));
        }
        for (int c = 0; c < CHAINS; c++) sink += _mm512_reduce_add_epi32(acc[c]);
    }
    double dt = omp_get_wtime() - t0;
    if (sink == 42) printf(" ");
    return 128.0 * CHAINS * (STEPS / 16) * omp_get_max_threads() / dt / 1e9;
}
#endif

int main(void) {
    double flops = 0, ops = 0;
    for (int pass = 0; pass < 5; pass++) {
        double f = fma_pass();
        flops = f > flops ? f : flops;
#if defined(__AVX2__) && defined(__FMA__)
        double o = int8_pass();
        ops = o > ops ? o : ops;
#endif
    }
    printf("%d threads: f32 FMA (8 wide) %.1f GFLOP/s", omp_get_max_threads(), flops);
    if (ops > 0) printf(", int8 (vpmaddubsw + vpmaddwd) %.1f GOP/s", ops);
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
    double flops512 = 0, vnni = 0;
    for (int pass = 0; pass < 5; pass++) {
        double f = fma512_pass(), v = vnni_pass();
        flops512 = f > flops512 ? f : flops512;
        vnni = v > vnni ? v : vnni;
    }
    printf(", f32 FMA (16 wide) %.1f GFLOP/s, int8 (vpdpbusd zmm) %.1f GOP/s", flops512, vnni);
#endif
    printf("\n");
    return 0;
}
