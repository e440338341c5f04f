/* Memory read bandwidth, the roofline for decoding: every thread sums its own slice of a 1 GiB
 * buffer, four interleaved streams per thread (as matmul reads its four rows per block), in
 * huge pages (as dsv2 -w auto loads the weights). Prints the best of five passes, in GB/s. */
#define _DEFAULT_SOURCE  /* madvise */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

int main(void) {
    size_t n = (size_t)1 << 28;  /* floats: 1 GiB */
    float *a = aligned_alloc((size_t)1 << 21, n * sizeof(float));
    if (!a) return 1;
#ifdef MADV_HUGEPAGE
    madvise(a, n * sizeof(float), MADV_HUGEPAGE);
#endif
    memset(a, 0, n * sizeof(float));
    double best = 0;
    float sink = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = omp_get_wtime();
#pragma omp parallel reduction(+ : sink)
        {
            int nt = omp_get_num_threads(), id = omp_get_thread_num();
            size_t per = n / nt, quarter = per / 4;
            const float *p = a + id * per;
            float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (size_t i = 0; i < quarter; i++) { s0 += p[i]; s1 += p[quarter + i]; s2 += p[2 * quarter + i]; s3 += p[3 * quarter + i]; }
            sink += s0 + s1 + s2 + s3;
        }
        double gbs = n * sizeof(float) / (omp_get_wtime() - t0) / 1e9;
        if (gbs > best) best = gbs;
    }
    printf("%.1f\n", best + sink * 0);
    free(a);
    return 0;
}
